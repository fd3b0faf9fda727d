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
//! No Redis operation is waited on longer than `[redis] timeout` (a request
//! makes at most two: its limits, then a cache lookup). Every failed or late
//! operation counts in `sluice_redis_errors_total`; one on the shared lane
//! marks Redis down (`/health` says `degraded`); while it is down, requests
//! do not try it at all (limits follow `on_error`), and a probe every
//! [`PROBE_EVERY`] makes fresh connections and writes a key until Redis takes
//! it: a failed-over primary behind the same name is found, and a node that
//! became a read-only replica counts as down.

pub mod cache;
pub mod health;
pub mod limits;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::IntoConnectionInfo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::TcpSettings;
use tokio::sync::Notify;

use crate::access::limits::TokenTally;
use crate::config::RedisConfig;
use crate::tasks::{Tasks, loops};
use crate::upstream::news::KeyNews;

/// How often Redis is pinged while it is down (and, less often, while up).
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How often Redis is pinged while it answers (requests notice trouble sooner).
const PROBE_WHILE_UP: Duration = Duration::from_secs(2);
/// The channel every instance publishes key health and cache purges on.
pub const CHANNEL: &str = "sluice:events";

/// Which connection an operation uses. Cached answers (large values) go on
/// a connection of their own, so they never hold up the limit checks queued
/// behind them, and a slow one never marks Redis down for the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Limits, token counts, key health: what makes instances one gateway.
    Shared = 0,
    /// The response cache.
    Cache = 1,
}

/// This process's link to the shared Redis.
pub struct Cluster {
    client: redis::Client,
    /// The client of [`Lane::Cache`]: `client` again, or `[redis] cache_url`'s.
    cache_client: redis::Client,
    /// One managed connection per [`Lane`], for the runtime's workers and
    /// for each event loop: a connection is driven by the runtime or loop
    /// that first uses it, so each loop has its own (a busy loop never holds
    /// up another's Redis answers). Replaced whole when Redis is found down
    /// (the manager itself reconnects only after I/O errors: a silent old
    /// primary or a read-only replica would keep it failing).
    conns: Box<[[ArcSwap<ConnectionManager>; 2]]>,
    /// The `[redis]` settings the process started with.
    pub config: RedisConfig,
    up: AtomicBool,
    /// Operations that failed or ran past the timeout.
    pub errors: AtomicU64,
    /// Names this process in published messages, so it skips its own.
    pub instance: Box<str>,
    /// Key health news of this instance, to publish.
    news: Arc<KeyNews>,
    /// Set when Redis came back or the subscription was made again: what
    /// others published meanwhile is read back, after this instance's own
    /// unsent news went out (so a reset made while Redis was down is not
    /// undone by the state it resets).
    resync_due: AtomicBool,
    /// Told when Redis came back: the subscription is made again.
    resubscribe: Notify,
    /// The number of the last reset of failed keys this instance made or
    /// heard of (resets are numbered in Redis).
    resets_seen: AtomicU64,
    /// Whether the shared key health was read back once.
    synced: AtomicBool,
    /// The number of the last cache news heard on the subscription (cache
    /// news is numbered in Redis).
    cache_news_heard: AtomicU64,
    /// Subscriptions made so far (`sluice_redis_subscriptions_total`).
    pub subscriptions: AtomicU64,
    /// Tokens of finished answers, to add to the shared day budgets.
    pub tokens: Arc<TokenTally>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("instance", &self.instance).field("up", &self.is_up()).finish_non_exhaustive()
    }
}

/// A TCP connection to Redis: small writes go at once, and a peer that
/// stops acknowledging is given up after this long.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(5);

impl Cluster {
    /// A link to the Redis of `config` for the runtime's workers and
    /// `event_loops` loops; it connects on first use (a Redis that is down at
    /// start leaves the gateway degraded, not stopped).
    pub fn new(config: RedisConfig, event_loops: usize, news: Arc<KeyNews>) -> Result<Arc<Self>, String> {
        // The driver's reason names the part at fault, never the URL's text.
        let client = open_client(config.url.expose(), &config, "redis.url")?;
        let cache_client = match &config.cache_url {
            Some(url) => open_client(url.expose(), &config, "redis.cache_url")?,
            None => client.clone(),
        };
        let conns = (0..=event_loops)
            .map(|_| Ok([connect(&client, &config)?, connect(&cache_client, &config)?].map(ArcSwap::from_pointee)))
            .collect::<Result<_, String>>()?;
        news.listen();
        Ok(Arc::new(Self {
            client,
            cache_client,
            conns,
            up: AtomicBool::new(true),
            errors: AtomicU64::new(0),
            instance: format!("{:016x}", crate::ids::next_u64()).into(),
            news,
            resync_due: AtomicBool::new(false),
            resubscribe: Notify::new(),
            resets_seen: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            cache_news_heard: AtomicU64::new(0),
            subscriptions: AtomicU64::new(0),
            tokens: Arc::default(),
            config,
        }))
    }

    /// Whether Redis answered the last operation in time.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Runs one operation on `lane`'s connection within `[redis] timeout`.
    /// `None` when Redis is down (not tried), failed or was late; each
    /// failure is counted, and on the shared lane marks Redis down (logged
    /// once per outage).
    pub async fn run<T, F>(&self, lane: Lane, what: &'static str, op: impl FnOnce(ConnectionManager) -> F) -> Option<T>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_up() {
            return None;
        }
        self.attempt(lane, what, op).await
    }

    /// As [`Self::run`], tried even while Redis is marked down (the probe).
    async fn attempt<T, F>(&self, lane: Lane, what: &'static str, op: impl FnOnce(ConnectionManager) -> F) -> Option<T>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let conn = ConnectionManager::clone(&loops::here(&self.conns)[lane as usize].load());
        let error = match tokio::time::timeout(self.config.timeout, op(conn)).await {
            Ok(Ok(value)) => {
                if lane == Lane::Shared && !self.up.swap(true, Relaxed) {
                    tracing::info!(what, "Redis answers again; shared limits, key health and cache resume");
                    self.resync_due.store(true, Relaxed);
                    self.news.wake();
                    self.resubscribe.notify_one();
                }
                return Some(value);
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {:?}", self.config.timeout),
        };
        self.errors.fetch_add(1, Relaxed);
        if lane == Lane::Cache {
            tracing::debug!(what, %error, "a Redis cache operation failed");
        } else if self.up.swap(false, Relaxed) {
            tracing::warn!(what, %error, on_error = ?self.config.on_error, "Redis failed; limits fall back until it answers again");
        } else {
            tracing::debug!(what, %error, "Redis still failing");
        }
        None
    }

    /// Fresh connections for both lanes (the old ones close when their last
    /// operation ends): after a failure, a new connection finds a failed-over
    /// primary where the old one would keep talking to the old address.
    fn reconnect(&self) {
        for lanes in &self.conns {
            for (conn, client) in lanes.iter().zip([&self.client, &self.cache_client]) {
                if let Ok(fresh) = connect(client, &self.config) {
                    conn.store(Arc::new(fresh));
                }
            }
        }
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
        tasks.spawn(async move {
            let key = format!("sluice:probe:{}", probe.instance);
            loop {
                let wait = if probe.is_up() { PROBE_WHILE_UP } else { PROBE_EVERY };
                tokio::select! {
                    () = stop.stopped() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                if !probe.is_up() {
                    probe.reconnect();
                }
                // A write: a node that answers PING but has become a read-only
                // replica must count as down.
                let key = key.clone();
                probe
                    .attempt(Lane::Shared, "probe", |mut conn| async move {
                        redis::cmd("SET").arg(key).arg(1).arg("PX").arg(10_000).query_async::<()>(&mut conn).await
                    })
                    .await;
            }
        });
        limits::start_token_writer(self, tasks);
        health::start(self, tasks, instance);
    }
}

/// A client for `url` (TLS with `[redis] ca_file` when given), its TCP
/// connections with Nagle off and a user timeout.
fn open_client(url: &str, config: &RedisConfig, field: &str) -> Result<redis::Client, String> {
    let info = url
        .into_connection_info()
        .map_err(|e| format!("{field}: {e}"))?
        .set_tcp_settings(TcpSettings::default().set_nodelay(true).set_user_timeout(TCP_USER_TIMEOUT));
    match &config.ca_file {
        Some(path) => {
            let root_cert = std::fs::read(path).map_err(|e| format!("redis.ca_file {}: {e}", path.display()))?;
            let certificates = redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) };
            redis::Client::build_with_tls(info, certificates)
        }
        None => redis::Client::open(info),
    }
    .map_err(|e| format!("{field}: {e}"))
}

/// A managed connection that connects on first use.
fn connect(client: &redis::Client, config: &RedisConfig) -> Result<ConnectionManager, String> {
    let settings = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(500))))
        // Every operation is bounded by `run` already; a second timer inside
        // the driver would cost as much again per operation.
        .set_response_timeout(None)
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(200));
    ConnectionManager::new_lazy_with_config(client.clone(), settings).map_err(|e| format!("redis: {e}"))
}
