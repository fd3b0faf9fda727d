//! The reloadable snapshot ([`Live`]) and the process-wide state around it
//! ([`Shared`]). A request loads the snapshot once and keeps it until its
//! response body ends (the metered body holds its upstream); a reload builds a
//! new one fallibly and swaps it in with one store, so a bad file leaves the
//! running snapshot untouched. The snapshot is made of `Arc` parts, so one
//! part (the client table) can be replaced without rebuilding the others:
//! the key store hands over a fresh [`Snapshot`] after every change and
//! [`Shared::rebuild_clients`] swaps in a table built from it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::access::ip::IpLimiter;
use crate::access::limits::TokenTally;
use crate::access::store::{self, Snapshot, StoreHandle, UsageQueue};
use crate::access::table::ClientTable;
use crate::cache::ResponseCache;
use crate::cluster::Cluster;
use crate::cluster::cache::RedisCache;
use crate::cluster::health::Instance;
use crate::config::Config;
use crate::config::keys::Secret;
use crate::config::tls::CertStore;
use crate::routes::Routes;
use crate::tasks::Tasks;
use crate::telemetry::Telemetry;
use crate::telemetry::accesslog::AccessLog;
use crate::upstream::keyring::UpstreamKey;
use crate::upstream::news::KeyEvent;
use crate::upstream::registry::ClientRegistry;
use crate::upstream::{Carry, Upstream};

/// Everything a request needs that a reload may change.
#[derive(Debug)]
pub struct Live {
    /// The validated config this snapshot was built from.
    pub config: Arc<Config>,
    /// Upstreams in config order; routes point into this list.
    pub upstreams: Arc<[Arc<Upstream>]>,
    /// Model routes.
    pub routes: Arc<Routes>,
    /// Accepted client keys with their policies and counters.
    pub clients: Arc<ClientTable>,
}

struct Previous<'a>(Option<&'a Live>);

impl Carry for Previous<'_> {
    fn key(&self, secret: &Secret<String>) -> Option<Arc<UpstreamKey>> {
        self.0?.upstreams.iter().flat_map(|u| u.keys.keys()).find(|k| k.same_secret(secret)).cloned()
    }

    fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.0?.upstreams.iter().find(|u| u.name.as_ref() == name).map(Arc::as_ref)
    }
}

impl Live {
    /// Builds a snapshot. Keys, breakers and login tokens that `previous` had
    /// and the new config keeps are shared, so their health and counters
    /// survive; so do client keys' limit counters. `store` is the key
    /// store's latest snapshot, if there is a store.
    pub fn prepare(
        config: Config,
        clients: &ClientRegistry,
        previous: Option<&Live>,
        store: Option<(&Snapshot, &Arc<UsageQueue>)>,
        shared_tokens: Option<&Arc<TokenTally>>,
    ) -> Result<Self, String> {
        let carry = Previous(previous);
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Upstream::new(u, clients, &carry).map(Arc::new).map_err(|e| format!("upstream `{}`: {e}", u.name)))
            .collect::<Result<Arc<[_]>, _>>()?;
        let routes = Routes::new(&config, previous.map(|p| p.routes.as_ref()));
        let table = ClientTable::build(&config, &routes, store, previous.map(|p| p.clients.as_ref()), shared_tokens);
        Ok(Self { routes: Arc::new(routes), clients: Arc::new(table), upstreams, config: Arc::new(config) })
    }

    /// The upstream that takes requests without a JSON `model`: the default
    /// model's upstream, else the first configured one.
    pub fn fallback_upstream(&self) -> Option<&Arc<Upstream>> {
        let index = self.routes.default_route().map_or(0, |(_, route)| route.primary().upstream);
        self.upstreams.get(index)
    }
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Upstream keys in the new snapshot.
    pub keys: usize,
    /// Keys that were not in the old snapshot.
    pub added: usize,
    /// Keys of the old snapshot that are gone.
    pub removed: usize,
}

/// Process-wide state shared by every connection.
pub struct Shared {
    /// The current snapshot.
    pub live: ArcSwap<Live>,
    /// Pooled upstream clients; they outlive reloads.
    pub clients: ClientRegistry,
    /// Process start, for uptime.
    pub started: Instant,
    /// Process start on the wall clock, seconds since the epoch.
    pub started_unix: u64,
    /// Set once shutdown began; `/health` then reports `draining`.
    pub draining: AtomicBool,
    /// Successful and failed reloads.
    pub reloads: [AtomicU64; 2],
    /// Metrics and the request log.
    pub telemetry: Arc<Telemetry>,
    /// Background tasks, stopped and awaited on shutdown.
    pub tasks: Tasks,
    /// The listener's TLS certificate, when it terminates TLS; reloaded with the config.
    pub certs: Option<Arc<CertStore>>,
    /// The key store, when `[store]` is configured.
    pub store: Option<StoreHandle>,
    /// Per-address windows for requests without a client key (`[limits] per_ip_rpm`).
    pub ip_limits: IpLimiter,
    /// The response cache; bounded by the `max_bytes` the process started with.
    pub cache: Arc<ResponseCache>,
    /// The Redis shared with other instances, when `[redis]` is configured
    /// (fixed for the process: a reload keeps it).
    pub cluster: Option<Arc<Cluster>>,
    feed: Arc<StoreFeed>,
    /// Serializes reloads and client-table swaps (SIGHUP, admin calls and the
    /// store's thread may race); never taken by requests.
    reload_lock: Mutex<()>,
}

/// The store's latest snapshot, and the gateway to rebuild its client table
/// from it. The store's thread publishes here; it holds the gateway weakly.
#[derive(Default)]
struct StoreFeed {
    latest: Mutex<Option<Arc<Snapshot>>>,
    owner: OnceLock<Weak<Shared>>,
}

impl StoreFeed {
    fn publish(&self, snapshot: Snapshot) {
        if let Ok(mut latest) = self.latest.lock() {
            *latest = Some(Arc::new(snapshot));
        }
        if let Some(shared) = self.owner.get().and_then(Weak::upgrade) {
            shared.rebuild_clients();
        }
    }

    fn latest(&self) -> Option<Arc<Snapshot>> {
        self.latest.lock().ok().and_then(|latest| latest.clone())
    }
}

impl Shared {
    /// Builds the shared state from a validated config.
    pub fn new(config: Config) -> Result<Arc<Self>, String> {
        let tasks = Tasks::default();
        let clients = ClientRegistry::new(config.client.clone(), config.server.event_loops, tasks.clone());
        let log = match &config.log.requests {
            Some(path) => Some(
                AccessLog::start(
                    path.clone(),
                    config.log.requests_max_size,
                    config.log.requests_keep,
                    config.server.event_loops,
                )
                .map_err(|e| format!("cannot open the request log `{}`: {e}", path.display()))?,
            ),
            None => None,
        };
        let certs = config.server.tls.as_ref().map(CertStore::load).transpose()?.map(Arc::new);
        let feed = Arc::new(StoreFeed::default());
        let store = match &config.store {
            Some(settings) => {
                let opened = store::open(&settings.url).map_err(|e| format!("{} ({})", e, settings.url))?;
                let publish = Arc::clone(&feed);
                Some(
                    StoreHandle::start(
                        opened,
                        Box::new(move |snapshot| publish.publish(snapshot)),
                        settings.keep_usage,
                    )
                    .map_err(|e| e.to_string())?,
                )
            }
            None => None,
        };
        let snapshot = feed.latest();
        let from_store = snapshot.as_deref().zip(store.as_ref().map(|s| &s.usage));
        let telemetry = Arc::new(Telemetry::new(log));
        telemetry.access_lines.store(config.log.access, Ordering::Relaxed);
        let cluster = config
            .redis
            .clone()
            .map(|redis| Cluster::new(redis, config.server.event_loops, Arc::clone(clients.news())))
            .transpose()?;
        let shared_cache: Option<Box<dyn crate::cache::SharedStore>> = match &cluster {
            Some(cluster) => Some(Box::new(RedisCache::new(Arc::clone(cluster), tasks.clone()))),
            None => None,
        };
        let cache = ResponseCache::within(
            config.cache.max_bytes,
            config.cache.max_entry,
            config.server.event_loops,
            shared_cache,
        );
        let live = Live::prepare(config, &clients, None, from_store, cluster.as_ref().map(|c| &c.tokens))?;
        let shared = Arc::new(Self {
            live: ArcSwap::from_pointee(live),
            clients,
            started: Instant::now(),
            started_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            draining: AtomicBool::new(false),
            reloads: [AtomicU64::new(0), AtomicU64::new(0)],
            telemetry,
            tasks,
            certs,
            store,
            ip_limits: IpLimiter::default(),
            cache,
            cluster,
            feed: Arc::clone(&feed),
            reload_lock: Mutex::new(()),
        });
        if feed.owner.set(Arc::downgrade(&shared)).is_ok() && shared.store.is_some() {
            // A change published before the owner was known is picked up here.
            shared.rebuild_clients();
        }
        if let Some(cluster) = &shared.cluster {
            cluster.start(&shared.tasks, Arc::new(ThisInstance(Arc::downgrade(&shared))));
        }
        Ok(shared)
    }

    /// Builds the client table again from the config and the store's latest
    /// snapshot, and swaps it in; every other part of the snapshot is kept.
    pub fn rebuild_clients(&self) {
        // A panic under the lock left nothing half-written (the swap is one
        // store): go on rather than stop rebuilding for good.
        let _serial = self.reload_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.live.load_full();
        let snapshot = self.feed.latest();
        let from_store = snapshot.as_deref().zip(self.store.as_ref().map(|s| &s.usage));
        let table = ClientTable::build(
            &current.config,
            &current.routes,
            from_store,
            Some(&current.clients),
            self.shared_tokens(),
        );
        self.live.store(Arc::new(Live {
            config: Arc::clone(&current.config),
            upstreams: Arc::clone(&current.upstreams),
            routes: Arc::clone(&current.routes),
            clients: Arc::new(table),
        }));
    }

    /// Writes the usage still counted in memory to the store and stops it
    /// (shutdown, after the drain).
    pub async fn close_store(&self) {
        if let Some(store) = &self.store {
            store.close().await;
        }
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Re-reads the config file the running snapshot came from and swaps in a new
    /// snapshot. On any error the running snapshot stays and the reason is returned.
    pub fn reload(&self) -> Result<ReloadSummary, String> {
        let _serial = self.reload_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = self.reload_inner();
        self.reloads[usize::from(result.is_err())].fetch_add(1, Ordering::Relaxed);
        match &result {
            Ok(summary) => {
                tracing::info!(keys = summary.keys, added = summary.added, removed = summary.removed, "reloaded")
            }
            Err(reason) => tracing::error!(%reason, "reload refused; the running config stays"),
        }
        result
    }

    fn reload_inner(&self) -> Result<ReloadSummary, String> {
        let current = self.live.load_full();
        let path: PathBuf = current.config.source.clone().ok_or("this gateway was not started from a config file")?;
        let config = Config::load(&path).map_err(|e| e.to_string())?;
        if config.server.listen != current.config.server.listen {
            tracing::warn!(old = %current.config.server.listen, new = %config.server.listen, "server.listen changed: takes effect on restart only");
        }
        let (old, new) = (&current.config.server, &config.server);
        if (new.workers, new.event_loops) != (old.workers, old.event_loops) {
            tracing::warn!("server.workers or server.event_loops changed: takes effect on restart only");
        }
        if config.store != current.config.store {
            tracing::warn!("store changed: takes effect on restart only");
        }
        if config.redis != current.config.redis {
            tracing::warn!("redis changed: takes effect on restart only");
        }
        if config.cache.max_bytes != current.config.cache.max_bytes {
            tracing::warn!("cache.max_bytes changed: takes effect on restart only");
        }
        let snapshot = self.feed.latest();
        let from_store = snapshot.as_deref().zip(self.store.as_ref().map(|s| &s.usage));
        let next = Live::prepare(config, &self.clients, Some(&current), from_store, self.shared_tokens())?;
        self.telemetry.access_lines.store(next.config.log.access, Ordering::Relaxed);
        // The certificate and key are read again (renewed files, same paths);
        // other listener TLS changes need a restart.
        match (&self.certs, &next.config.server.tls) {
            (Some(certs), Some(tls)) if certs.files() == tls => certs.reload()?,
            (None, None) => {}
            _ => tracing::warn!("server.tls changed: takes effect on restart only"),
        }
        let old: Vec<&Arc<UpstreamKey>> = current.upstreams.iter().flat_map(|u| u.keys.keys()).collect();
        let new: Vec<&Arc<UpstreamKey>> = next.upstreams.iter().flat_map(|u| u.keys.keys()).collect();
        let summary = ReloadSummary {
            keys: new.len(),
            added: new.iter().filter(|k| !old.iter().any(|o| Arc::ptr_eq(o, k))).count(),
            removed: old.iter().filter(|k| !new.iter().any(|n| Arc::ptr_eq(n, k))).count(),
        };
        self.live.store(Arc::new(next));
        // The new routing table plans afresh: the old table's shortcuts
        // would lead nowhere and only hold their share of the cache.
        self.cache.forget_shortcuts();
        Ok(summary)
    }

    /// Clears cooling and disabled keys and closes breakers, here and (with
    /// `[redis]`) on every instance; returns how many keys here were failed.
    pub fn reset_failed_keys(&self) -> usize {
        let reset = self.reset_keys_here();
        let ids =
            self.live.load().upstreams.iter().flat_map(|u| u.keys.keys()).map(|k| Arc::clone(&k.shared_id)).collect();
        self.clients.news().push(KeyEvent::Reset { ids });
        reset
    }

    /// Clears cooling and disabled keys and closes breakers of this instance.
    fn reset_keys_here(&self) -> usize {
        let live = self.live.load();
        live.upstreams
            .iter()
            .map(|u| {
                u.breaker.reset();
                u.keys.reset()
            })
            .sum()
    }

    /// Where finished answers' tokens go for the day budgets instances share.
    fn shared_tokens(&self) -> Option<&Arc<TokenTally>> {
        self.cluster.as_ref().map(|c| &c.tokens)
    }
}

/// The running gateway as the cluster's subscriber sees it (held weakly: the
/// subscriber must not keep a stopped gateway alive).
struct ThisInstance(Weak<Shared>);

impl Instance for ThisInstance {
    fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.0.upgrade().map(|shared| shared.live.load().upstreams.to_vec()).unwrap_or_default()
    }

    fn reset_keys(&self) {
        if let Some(shared) = self.0.upgrade() {
            shared.reset_keys_here();
        }
    }

    fn forget_cached(&self, key: &str) {
        if let (Some(shared), Some(key)) =
            (self.0.upgrade(), hex::decode(key).ok().and_then(|k| <[u8; 32]>::try_from(k).ok()))
        {
            shared.cache.forget(&key);
        }
    }

    fn forget_cached_copies(&self) {
        if let Some(shared) = self.0.upgrade() {
            let dropped = shared.cache.purge(None);
            if dropped > 0 {
                tracing::info!(
                    dropped,
                    "cache news went unheard while this instance was not subscribed to Redis: its copy of the cache was dropped"
                );
            }
        }
    }

    fn purge_cache(&self, model: Option<&str>) {
        if let Some(shared) = self.0.upgrade() {
            let purged = shared.cache.purge(model);
            tracing::info!(purged, model = model.unwrap_or("*"), "another instance purged the cache; purged here too");
        }
    }
}
