//! Shared state over Redis, for several instances behaving as one gateway:
//! client limits exact across instances ([`limits`]: one server-side script
//! per admitted request), upstream key health spread to every instance
//! ([`health`]: published at once, kept in Redis with an expiry for
//! instances that start later) and the response cache ([`cache`]).
//!
//! Circuit breakers stay per instance: a breaker protects this instance's
//! path to an upstream (its connections, its network), and one instance
//! seeing an upstream fail says little about another's path; a key, by
//! contrast, is one account's limit wherever it is used.
//!
//! Redis is never waited on longer than `[redis] timeout`. Every failed or
//! late operation marks Redis down (`/health` says `degraded`) and counts in
//! `sluice_redis_errors_total`; while it is down, requests do not try it at
//! all (limits follow `on_error`), and a probe every [`PROBE_EVERY`] finds it
//! back. The connection manager reconnects by itself.

pub mod cache;
pub mod health;
pub mod limits;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::access::limits::TokenTally;
use crate::config::RedisConfig;
use crate::tasks::Tasks;
use crate::upstream::news::KeyNews;

/// How often Redis is pinged while it is down (and, less often, while up).
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How often Redis is pinged while it answers (requests notice trouble sooner).
const PROBE_WHILE_UP: Duration = Duration::from_secs(2);
/// The channel every instance publishes key health and cache purges on.
pub const CHANNEL: &str = "sluice:events";

/// This process's link to the shared Redis.
pub struct Cluster {
    client: redis::Client,
    conn: ConnectionManager,
    /// The `[redis]` settings the process started with.
    pub config: RedisConfig,
    up: AtomicBool,
    /// Operations that failed or ran past the timeout.
    pub errors: AtomicU64,
    /// Names this process in published messages, so it skips its own.
    pub instance: Box<str>,
    /// Key health news of this instance, to publish.
    news: Arc<KeyNews>,
    /// Tokens of finished answers, to add to the shared day budgets.
    pub tokens: Arc<TokenTally>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("instance", &self.instance).field("up", &self.is_up()).finish_non_exhaustive()
    }
}

impl Cluster {
    /// A link to the Redis of `config`; it connects on first use (a Redis
    /// that is down at start leaves the gateway degraded, not stopped).
    pub fn new(config: RedisConfig, news: Arc<KeyNews>) -> Result<Arc<Self>, String> {
        // The driver's reason names the part at fault, never the URL's text.
        let url = config.url.expose().as_str();
        let client = match &config.ca_file {
            Some(path) => {
                let root_cert = std::fs::read(path).map_err(|e| format!("redis.ca_file {}: {e}", path.display()))?;
                let certificates = redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) };
                redis::Client::build_with_tls(url, certificates)
            }
            None => redis::Client::open(url),
        }
        .map_err(|e| format!("redis.url: {e}"))?;
        let settings = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), settings).map_err(|e| format!("redis: {e}"))?;
        news.listen();
        Ok(Arc::new(Self {
            client,
            conn,
            up: AtomicBool::new(true),
            errors: AtomicU64::new(0),
            instance: format!("{:016x}", crate::ids::next_u64()).into(),
            news,
            tokens: Arc::default(),
            config,
        }))
    }

    /// Whether Redis answered the last operation in time.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Runs one operation on the shared connection within `[redis] timeout`.
    /// `None` when Redis is down (not tried), failed or was late; each
    /// failure is counted and logged once per outage.
    pub async fn run<T, F>(&self, what: &'static str, op: impl FnOnce(ConnectionManager) -> F) -> Option<T>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_up() {
            return None;
        }
        self.attempt(what, op).await
    }

    /// As [`Self::run`], tried even while Redis is marked down (the probe).
    async fn attempt<T, F>(&self, what: &'static str, op: impl FnOnce(ConnectionManager) -> F) -> Option<T>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let error = match tokio::time::timeout(self.config.timeout, op(self.conn.clone())).await {
            Ok(Ok(value)) => {
                if !self.up.swap(true, Relaxed) {
                    tracing::info!(what, "Redis answers again; shared limits, key health and cache resume");
                }
                return Some(value);
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {:?}", self.config.timeout),
        };
        self.errors.fetch_add(1, Relaxed);
        if self.up.swap(false, Relaxed) {
            tracing::warn!(what, %error, on_error = ?self.config.on_error, "Redis failed; limits fall back until it answers again");
        } else {
            tracing::debug!(what, %error, "Redis still failing");
        }
        None
    }

    /// A connection of its own for subscribing (pub/sub takes it whole).
    async fn subscriber(&self) -> Option<redis::aio::PubSub> {
        match tokio::time::timeout(Duration::from_secs(1), self.client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => Some(pubsub),
            Ok(Err(error)) => {
                tracing::debug!(%error, "cannot subscribe to Redis yet");
                None
            }
            Err(_) => None,
        }
    }

    /// Starts the background work: the probe that notices Redis coming back,
    /// the writer of token usage, and the publisher and subscriber of key
    /// health (`instance` is what the subscriber acts on).
    pub fn start(self: &Arc<Self>, tasks: &Tasks, instance: Arc<dyn health::Instance>) {
        let probe = Arc::clone(self);
        let stop = tasks.clone();
        let on_back = Arc::clone(&instance);
        tasks.spawn(async move {
            loop {
                let wait = if probe.is_up() { PROBE_WHILE_UP } else { PROBE_EVERY };
                tokio::select! {
                    () = stop.stopped() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                let was_up = probe.is_up();
                let ping = probe
                    .attempt(
                        "ping",
                        |mut conn| async move { redis::cmd("PING").query_async::<String>(&mut conn).await },
                    )
                    .await;
                if ping.is_some() && !was_up {
                    // What other instances published while this one could not
                    // hear it is read back from the state they keep in Redis.
                    health::resync(&probe, on_back.as_ref()).await;
                }
            }
        });
        limits::start_token_writer(self, tasks);
        health::start(self, tasks, instance);
    }
}
