//! The pooled upstream clients. They live outside the reloadable snapshot, so
//! a reload never drops a warm connection: upstreams with the same connect
//! settings share one pool.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::uri::Authority;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{ClientConfig, Http2Mode};
use crate::tasks::Tasks;
use crate::upstream::body::ForwardBody;
use crate::upstream::news::KeyNews;
use crate::upstream::{h1, h2pool};

/// The pooled hyper-util client type, for TLS, HTTP/2 and streamed uploads.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, ForwardBody>;

/// What makes two upstreams' hyper-util clients interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    mode: Http2Mode,
    connect_timeout: Duration,
    ca_file: Option<PathBuf>,
}

/// Pooled clients by (HTTP/2 mode, connect timeout, CA file), and sluice's
/// own HTTP/1.1 pools by (host:port, connect timeout). The locks are taken
/// only while a snapshot is built, never per request.
pub struct ClientRegistry {
    config: ClientConfig,
    /// `[server] event_loops`: the HTTP/1.1 and HTTP/2 pools keep connections per loop.
    event_loops: usize,
    tasks: Tasks,
    clients: Mutex<HashMap<ClientKey, HttpClient>>,
    /// Held weakly, as the HTTP/2 pools: a pool no snapshot uses goes, and
    /// its idle connections close with it.
    h1_pools: Mutex<HashMap<(Authority, Duration), Weak<h1::Pool>>>,
    /// Held weakly: a pool no upstream of any snapshot uses is dropped, and
    /// its connections end with it.
    h2_pools: Mutex<HashMap<H2Key, Weak<h2pool::Pools>>>,
    /// Key health news of every upstream, for other instances.
    news: Arc<KeyNews>,
}

/// What makes two upstreams' HTTP/2 pools interchangeable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct H2Key {
    /// `host:port`.
    pub authority: Authority,
    /// TLS (with these extra CAs), or h2c.
    pub tls: Option<Option<PathBuf>>,
    /// TCP and TLS connect.
    pub connect_timeout: Duration,
    /// Connections at most.
    pub max_connections: usize,
    /// PING interval and timeout.
    pub keepalive: (Duration, Duration),
}

impl ClientRegistry {
    /// An empty registry; clients are built on first use. Their background
    /// work (idle sweeps, key checks) runs under `tasks`; requests may come
    /// from `event_loops` event loops besides the runtime's workers.
    pub fn new(config: ClientConfig, event_loops: usize, tasks: Tasks) -> Self {
        Self {
            config,
            event_loops,
            tasks,
            clients: Mutex::new(HashMap::new()),
            h1_pools: Mutex::new(HashMap::new()),
            h2_pools: Mutex::new(HashMap::new()),
            news: Arc::default(),
        }
    }

    /// Key health news of every upstream built from this registry.
    pub fn news(&self) -> &Arc<KeyNews> {
        &self.news
    }

    /// The settings every client of this registry is built with.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Where upstream background work is spawned.
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// The shared HTTP/1.1 pool for this `host:port`.
    pub fn h1_pool(&self, authority: &Authority, connect_timeout: Duration) -> Result<Arc<h1::Pool>, String> {
        let mut pools = self.h1_pools.lock().map_err(|_| "client registry poisoned".to_string())?;
        pools.retain(|_, pool| pool.strong_count() > 0);
        let key = (authority.clone(), connect_timeout);
        if let Some(pool) = pools.get(&key).and_then(Weak::upgrade) {
            return Ok(pool);
        }
        let pool = Arc::new(h1::Pool::new(
            authority.clone(),
            connect_timeout,
            self.config.pool_idle_timeout,
            self.config.pool_max_idle_per_host,
            self.event_loops,
            self.tasks.clone(),
        ));
        pools.insert(key, Arc::downgrade(&pool));
        Ok(pool)
    }

    /// The shared HTTP/2 pools for these settings (one per event loop and
    /// one for the runtime's workers). Over
    /// TLS they offer `h2` and `http/1.1` in ALPN; a peer that picks HTTP/1.1
    /// is then reached by the hyper-util client instead.
    pub fn h2_pool(&self, key: H2Key) -> Result<Arc<h2pool::Pools>, String> {
        let mut pools = self.h2_pools.lock().map_err(|_| "client registry poisoned".to_string())?;
        pools.retain(|_, pool| pool.strong_count() > 0);
        if let Some(pool) = pools.get(&key).and_then(Weak::upgrade) {
            return Ok(pool);
        }
        let tls = match &key.tls {
            None => None,
            Some(ca_file) => {
                let mut tls = tls_config(ca_file.as_ref())?;
                tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                Some(tokio_rustls::TlsConnector::from(Arc::new(tls)))
            }
        };
        let settings = h2pool::Settings {
            authority: key.authority.clone(),
            tls,
            connect_timeout: key.connect_timeout,
            idle_timeout: self.config.pool_idle_timeout,
            max_connections: key.max_connections,
            keepalive_interval: key.keepalive.0,
            keepalive_timeout: key.keepalive.1,
        };
        let pool = Arc::new(h2pool::Pools::new(&settings, self.event_loops));
        pools.insert(key, Arc::downgrade(&pool));
        Ok(pool)
    }

    /// The shared hyper-util client for these settings.
    pub fn get(
        &self,
        mode: Http2Mode,
        connect_timeout: Duration,
        ca_file: Option<&PathBuf>,
    ) -> Result<HttpClient, String> {
        let key = ClientKey { mode, connect_timeout, ca_file: ca_file.cloned() };
        let mut clients = self.clients.lock().map_err(|_| "client registry poisoned".to_string())?;
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let client = build_client(&self.config, &key)?;
        clients.insert(key, client.clone());
        Ok(client)
    }
}

/// The TLS settings: ring only (with aws-lc-rs also in a tree the implicit
/// default would panic), the public web roots plus the upstream's own CAs.
fn tls_config(ca_file: Option<&PathBuf>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for cert in crate::config::tls::read_certificates(path)? {
            roots.add(cert).map_err(|e| format!("`{}`: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn build_client(config: &ClientConfig, key: &ClientKey) -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(key.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    // ALPN is set by `enable_http*` below (hyper-rustls panics if it is set twice).
    let builder =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls_config(key.ca_file.as_ref())?).https_or_http();
    let connector = match key.mode {
        Http2Mode::Auto => builder.enable_http1().enable_http2().wrap_connector(http),
        Http2Mode::PriorKnowledge => builder.enable_http2().wrap_connector(http),
        Http2Mode::Never => builder.enable_http1().wrap_connector(http),
    };
    let mut client = Client::builder(TokioExecutor::new());
    client
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_max_idle_per_host(config.pool_max_idle_per_host)
        // A request that never left on a pooled connection the upstream closed
        // comes back as an error: the retry loop decides (and counts) a re-send.
        .retry_canceled_requests(false)
        .http2_only(key.mode == Http2Mode::PriorKnowledge)
        .http2_adaptive_window(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_while_idle(false);
    Ok(client.build(connector))
}
