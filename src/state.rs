//! The reloadable snapshot ([`Live`]) and the process-wide state around it
//! ([`Shared`]). A request loads the snapshot once and keeps it to its end; a
//! reload builds a new one fallibly and swaps it in with one store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::access::auth::ClientKeys;
use crate::config::Config;
use crate::proxy::keyring::UpstreamKey;
use crate::proxy::upstream::{Upstream, UpstreamClients};
use crate::routes::Routes;

/// Everything a request needs that a reload may change.
#[derive(Debug)]
pub struct Live {
    /// The validated config this snapshot was built from.
    pub config: Arc<Config>,
    /// Upstreams in config order; routes point into this list.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Model routes.
    pub routes: Routes,
    /// Accepted client keys.
    pub client_keys: ClientKeys,
}

impl Live {
    /// Builds a snapshot. `previous` lends its key state to keys that stay, so a
    /// reload keeps their counters (and, later, their health).
    pub fn prepare(config: Config, previous: Option<&Live>) -> Result<Self, String> {
        let reuse = |secret: &crate::config::keys::Secret<String>| -> Option<Arc<UpstreamKey>> {
            previous?
                .upstreams
                .iter()
                .flat_map(|u| u.keys.keys())
                .find(|k| k.same_secret(secret))
                .cloned()
        };
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                Upstream::new(u, &reuse)
                    .map(Arc::new)
                    .map_err(|e| format!("upstream `{}`: {e}", u.name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            routes: Routes::new(&config),
            client_keys: ClientKeys::new(&config.auth),
            upstreams,
            config: Arc::new(config),
        })
    }

    /// The upstream that takes requests without a JSON `model`: the default
    /// model's upstream, else the first configured one.
    pub fn fallback_upstream(&self) -> Option<&Arc<Upstream>> {
        let index = self
            .routes
            .default_route()
            .map_or(0, |(_, route)| route.upstream);
        self.upstreams.get(index)
    }
}

/// Process-wide state shared by every connection.
pub struct Shared {
    /// The current snapshot.
    pub live: ArcSwap<Live>,
    /// Pooled upstream clients; they outlive reloads.
    pub clients: UpstreamClients,
    /// Process start, for uptime.
    pub started: Instant,
    /// Set once shutdown began; `/health` then reports `draining`.
    pub draining: AtomicBool,
}

impl Shared {
    /// Builds the shared state from a validated config.
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        let clients = UpstreamClients::new(&config.client)?;
        let live = Live::prepare(config, None)?;
        Ok(Arc::new(Self {
            live: ArcSwap::from_pointee(live),
            clients,
            started: Instant::now(),
            draining: AtomicBool::new(false),
        }))
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}
