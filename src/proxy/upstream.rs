//! Upstreams at run time: where to send a request (URI building) and the pooled
//! HTTP clients that carry it. The clients live outside the reloadable snapshot,
//! so a reload never drops a warm connection.

use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ForwardBody;
use crate::config::{ClientConfig, Http2Mode, UpstreamConfig};
use crate::error::ProxyError;
use crate::proxy::headers::query_without_api_key;
use crate::proxy::keyring::{KeyRing, UpstreamKey};

/// The pooled client type used for every upstream.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, ForwardBody>;

/// One pooled client per HTTP/2 mode (a client's protocol choice is fixed at build time).
#[derive(Clone)]
pub struct UpstreamClients {
    alpn: HttpClient,
    h2c: HttpClient,
    http1: HttpClient,
}

impl UpstreamClients {
    /// Builds the three clients. Fails only if the TLS provider cannot be set up.
    pub fn new(config: &ClientConfig) -> Result<Self, String> {
        Ok(Self {
            alpn: build_client(config, Http2Mode::Auto)?,
            h2c: build_client(config, Http2Mode::PriorKnowledge)?,
            http1: build_client(config, Http2Mode::Never)?,
        })
    }

    /// The client for an upstream's HTTP/2 mode.
    pub fn for_mode(&self, mode: Http2Mode) -> &HttpClient {
        match mode {
            Http2Mode::Auto => &self.alpn,
            Http2Mode::PriorKnowledge => &self.h2c,
            Http2Mode::Never => &self.http1,
        }
    }
}

fn build_client(config: &ClientConfig, mode: Http2Mode) -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    // ring only: with aws-lc-rs also in the tree the implicit default would panic.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(provider)
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .https_or_http();
    let connector = match mode {
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
        .http2_only(mode == Http2Mode::PriorKnowledge)
        .http2_adaptive_window(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_while_idle(false);
    Ok(client.build(connector))
}

/// An upstream as the request path sees it.
#[derive(Debug)]
pub struct Upstream {
    /// Name from the config.
    pub name: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without a trailing slash, e.g. `/v1`.
    base_path: Box<str>,
    /// Its keys.
    pub keys: KeyRing,
    /// HTTP/2 mode, which picks the client.
    pub http2: Http2Mode,
    /// Time allowed until response headers.
    pub header_timeout: Duration,
}

impl Upstream {
    /// Builds the run-time upstream. `reuse` finds the key state of a previous
    /// snapshot by secret, so a reload keeps counters of unchanged keys.
    pub fn new(
        config: &UpstreamConfig,
        reuse: &dyn Fn(&crate::config::keys::Secret<String>) -> Option<Arc<UpstreamKey>>,
    ) -> Result<Self, String> {
        let scheme = config
            .base_url
            .scheme()
            .cloned()
            .ok_or("base_url has no scheme")?;
        let authority = config
            .base_url
            .authority()
            .cloned()
            .ok_or("base_url has no host")?;
        let keys = config
            .keys
            .iter()
            .map(|secret| {
                reuse(secret)
                    .or_else(|| UpstreamKey::new(secret.clone()).map(Arc::new))
                    .ok_or_else(|| "a key is not a valid header value".to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name: Arc::from(config.name.as_str()),
            scheme,
            authority,
            base_path: config.base_url.path().trim_end_matches('/').into(),
            keys: KeyRing::new(keys),
            http2: config.http2,
            header_timeout: config.header_timeout,
        })
    }

    /// The upstream URI for a client path under `/v1` and its query (minus `api_key`).
    pub fn uri_for(&self, client_path: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
        let rest = client_path.strip_prefix("/v1").unwrap_or(client_path);
        let query = query.and_then(query_without_api_key);
        let mut path = String::with_capacity(
            self.base_path.len() + rest.len() + query.as_ref().map_or(0, |q| q.len() + 1),
        );
        path.push_str(&self.base_path);
        path.push_str(rest);
        if path.is_empty() {
            path.push('/');
        }
        if let Some(query) = query {
            path.push('?');
            path.push_str(&query);
        }
        let path_and_query = PathAndQuery::try_from(path)
            .map_err(|e| ProxyError::Internal(format!("bad upstream path: {e}")))?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| ProxyError::Internal(format!("bad upstream URI: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::keys::Secret;

    fn upstream(base: &str) -> Upstream {
        let config = UpstreamConfig {
            name: "u".into(),
            base_url: base.parse().unwrap(),
            keys: vec![Secret::new("sk-1".into())],
            http2: Http2Mode::Auto,
            header_timeout: Duration::from_secs(1),
        };
        Upstream::new(&config, &|_| None).unwrap()
    }

    #[test]
    fn uri_joins_base_path_and_drops_api_key() {
        let u = upstream("https://api.example.com/v1");
        assert_eq!(
            u.uri_for("/v1/chat/completions", Some("api_key=sk&x=1"))
                .unwrap()
                .to_string(),
            "https://api.example.com/v1/chat/completions?x=1"
        );
        let u = upstream("http://127.0.0.1:9000/openai/v1");
        assert_eq!(
            u.uri_for("/v1/models", None).unwrap().to_string(),
            "http://127.0.0.1:9000/openai/v1/models"
        );
        let u = upstream("http://127.0.0.1:9000");
        assert_eq!(
            u.uri_for("/v1/embeddings", Some("api_key=1"))
                .unwrap()
                .to_string(),
            "http://127.0.0.1:9000/embeddings"
        );
    }
}
