//! Upstreams at run time: where a request goes (URI building), how it is
//! authenticated, and the pooled client that carries it. Clients come from a
//! registry outside the reloadable snapshot, so a reload never drops a warm
//! connection: upstreams with the same connect settings share one pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{ForwardBody, UpstreamBody};
use crate::config::keys::Secret;
use crate::config::{ClientConfig, Http2Mode, RetryPolicy, Strategy, Timeouts, UpstreamAuth, UpstreamConfig};
use crate::error::ProxyError;
use crate::proxy::breaker::Breaker;
use crate::proxy::client_error;
use crate::proxy::h1;
use crate::proxy::headers::query_without_api_key;
use crate::proxy::keyring::{KeyRing, UpstreamKey};
use crate::proxy::token::TokenSource;

/// The pooled client type used for every upstream.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, ForwardBody>;

/// Pooled clients by (HTTP/2 mode, connect timeout), and sluice's own
/// HTTP/1.1 pools by (host:port, connect timeout). The locks are taken only
/// while a snapshot is built, never per request.
pub struct ClientRegistry {
    config: ClientConfig,
    clients: Mutex<HashMap<(Http2Mode, Duration), HttpClient>>,
    h1_pools: Mutex<HashMap<(Authority, Duration), Arc<h1::Pool>>>,
}

impl ClientRegistry {
    /// An empty registry; clients are built on first use.
    pub fn new(config: ClientConfig) -> Self {
        Self { config, clients: Mutex::new(HashMap::new()), h1_pools: Mutex::new(HashMap::new()) }
    }

    /// The shared HTTP/1.1 pool for this `host:port`.
    pub fn h1_pool(&self, authority: &Authority, connect_timeout: Duration) -> Result<Arc<h1::Pool>, String> {
        let mut pools = self.h1_pools.lock().map_err(|_| "client registry poisoned".to_string())?;
        let pool = pools.entry((authority.clone(), connect_timeout)).or_insert_with(|| {
            Arc::new(h1::Pool::new(
                authority.clone(),
                connect_timeout,
                self.config.pool_idle_timeout,
                self.config.pool_max_idle_per_host,
            ))
        });
        Ok(Arc::clone(pool))
    }

    /// The shared client for these settings.
    pub fn get(&self, mode: Http2Mode, connect_timeout: Duration) -> Result<HttpClient, String> {
        let mut clients = self.clients.lock().map_err(|_| "client registry poisoned".to_string())?;
        if let Some(client) = clients.get(&(mode, connect_timeout)) {
            return Ok(client.clone());
        }
        let client = build_client(&self.config, mode, connect_timeout)?;
        clients.insert((mode, connect_timeout), client.clone());
        Ok(client)
    }
}

fn build_client(config: &ClientConfig, mode: Http2Mode, connect_timeout: Duration) -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
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

/// How requests to an upstream are authenticated.
#[derive(Debug)]
pub enum Auth {
    /// The ring's key headers as they are.
    Keys,
    /// A login token replaces the (single, synthetic) key's header.
    Login(Arc<TokenSource>),
}

/// An extra header; `{uuid}` in the template becomes a fresh UUID per request.
#[derive(Debug)]
struct ExtraHeader {
    name: HeaderName,
    fixed: Option<HeaderValue>,
    template: String,
}

/// An upstream as the request path sees it.
pub struct Upstream {
    /// Name from the config.
    pub name: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path without a trailing slash, e.g. `/v1`.
    base_path: Box<str>,
    /// Its keys (one synthetic key for token upstreams).
    pub keys: KeyRing,
    /// Login token, if any.
    pub auth: Auth,
    extra_headers: Vec<ExtraHeader>,
    /// The pooled client for this upstream's settings (TLS, HTTP/2, uploads, logins).
    pub client: HttpClient,
    /// sluice's own HTTP/1.1 client, for cleartext upstreams not in h2c mode.
    pub h1: Option<Arc<h1::Pool>>,
    /// Key choice.
    pub strategy: Strategy,
    /// Retry budget.
    pub retry: RetryPolicy,
    /// Cooldown after a 429 without `Retry-After`.
    pub cooldown: Duration,
    /// Cap on any cooldown.
    pub max_cooldown: Duration,
    /// Circuit breaker (kept across reloads while its settings stay).
    pub breaker: Arc<Breaker>,
    /// Timeouts.
    pub timeouts: Timeouts,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("name", &self.name).field("authority", &self.authority).finish_non_exhaustive()
    }
}

/// What a new snapshot may take over from the previous one.
pub trait Carry {
    /// The key state of a key with this secret, if the previous snapshot had it.
    fn key(&self, secret: &Secret<String>) -> Option<Arc<UpstreamKey>>;
    /// The previous upstream of this name.
    fn upstream(&self, name: &str) -> Option<&Upstream>;
}

impl Upstream {
    /// Builds the run-time upstream, taking over key state, breaker and token
    /// from `carry` where they are unchanged.
    pub fn new(config: &UpstreamConfig, clients: &ClientRegistry, carry: &dyn Carry) -> Result<Self, String> {
        let scheme = config.base_url.scheme().cloned().ok_or("base_url has no scheme")?;
        let authority = config.base_url.authority().cloned().ok_or("base_url has no host")?;
        let name: Arc<str> = Arc::from(config.name.as_str());
        let previous = carry.upstream(&config.name);
        let key = |secret: &Secret<String>| {
            carry
                .key(secret)
                .or_else(|| UpstreamKey::new(secret.clone()).map(Arc::new))
                .ok_or_else(|| "a key is not a valid header value".to_string())
        };
        let (secrets, auth) = match &config.auth {
            UpstreamAuth::Keys(keys) => (keys.clone(), Auth::Keys),
            UpstreamAuth::StaticToken(token) => (vec![token.clone()], Auth::Keys),
            UpstreamAuth::Login(login) => {
                let source = previous
                    .and_then(|p| match &p.auth {
                        Auth::Login(source) if source.same_login(login) => Some(Arc::clone(source)),
                        Auth::Login(_) | Auth::Keys => None,
                    })
                    .unwrap_or_else(|| Arc::new(TokenSource::new(Arc::clone(&name), login.clone())));
                // One synthetic key carries the health and counters of the login.
                (vec![Secret::new(format!("login:{}@{}", login.username, login.auth_url))], Auth::Login(source))
            }
        };
        let keys = secrets.iter().map(key).collect::<Result<Vec<_>, _>>()?;
        let breaker = previous
            .map(|p| Arc::clone(&p.breaker))
            .filter(|b| b.same_settings(config.breaker_failures, config.breaker_cooldown))
            .unwrap_or_else(|| Arc::new(Breaker::new(config.breaker_failures, config.breaker_cooldown)));
        let extra_headers = config
            .headers
            .iter()
            .map(|(name, template)| ExtraHeader {
                name: name.clone(),
                fixed: (!template.contains("{uuid}")).then(|| HeaderValue::from_str(template).ok()).flatten(),
                template: template.clone(),
            })
            .collect();
        let h1 = (scheme == Scheme::HTTP && config.http2 != Http2Mode::PriorKnowledge)
            .then(|| clients.h1_pool(&authority, config.timeouts.connect))
            .transpose()?;
        Ok(Self {
            client: clients.get(config.http2, config.timeouts.connect)?,
            h1,
            name,
            scheme,
            authority,
            base_path: config.base_url.path().trim_end_matches('/').into(),
            keys: KeyRing::new(keys),
            auth,
            extra_headers,
            strategy: config.strategy,
            retry: config.retry,
            cooldown: config.cooldown,
            max_cooldown: config.max_cooldown,
            breaker,
            timeouts: config.timeouts,
        })
    }

    /// The upstream URI for a client path under `/v1` and its query (minus `api_key`).
    pub fn uri_for(&self, client_path: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
        let rest = client_path.strip_prefix("/v1").unwrap_or(client_path);
        let query = query.and_then(query_without_api_key);
        let mut path =
            String::with_capacity(self.base_path.len() + rest.len() + query.as_ref().map_or(0, |q| q.len() + 1));
        path.push_str(&self.base_path);
        path.push_str(rest);
        if path.is_empty() {
            path.push('/');
        }
        if let Some(query) = query {
            path.push('?');
            path.push_str(&query);
        }
        let path_and_query =
            PathAndQuery::try_from(path).map_err(|e| ProxyError::Internal(format!("bad upstream path: {e}")))?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| ProxyError::Internal(format!("bad upstream URI: {e}")))
    }

    /// Sends one attempt: a body sluice holds whole goes over its own HTTP/1.1
    /// client when the upstream has one; anything else over hyper-util's.
    pub async fn send(
        &self,
        method: &Method,
        target: &Uri,
        headers: &HeaderMap,
        auth: HeaderValue,
        body: ForwardBody,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        if let (Some(pool), ForwardBody::Full { bytes }) = (&self.h1, &body) {
            let path = target.path_and_query().map_or("/", PathAndQuery::as_str);
            let empty = Bytes::new();
            return match pool.send(method, path, headers, &auth, bytes.as_ref().unwrap_or(&empty)).await {
                Ok(response) => Ok(response.map(|inner| UpstreamBody::H1 { inner })),
                Err(error) => {
                    let upstream = self.name.to_string();
                    let reason = error.to_string();
                    Err(if error.is_connect() {
                        ProxyError::UpstreamConnect { upstream, reason }
                    } else {
                        ProxyError::UpstreamProtocol { upstream, reason }
                    })
                }
            };
        }
        let mut request = Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = target.clone();
        *request.headers_mut() = headers.clone();
        request.headers_mut().insert(AUTHORIZATION, auth);
        match self.client.request(request).await {
            Ok(response) => Ok(response.map(|inner| UpstreamBody::Hyper { inner })),
            Err(error) => Err(client_error(self, &error)),
        }
    }

    /// Adds the configured extra headers, filling `{uuid}` afresh.
    pub fn add_extra_headers(&self, headers: &mut HeaderMap) {
        for extra in &self.extra_headers {
            let value = match &extra.fixed {
                Some(fixed) => fixed.clone(),
                None => match HeaderValue::from_str(&extra.template.replace("{uuid}", &crate::ids::uuid_v4())) {
                    Ok(value) => value,
                    Err(_) => continue,
                },
            };
            headers.insert(extra.name.clone(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    struct Nothing;
    impl Carry for Nothing {
        fn key(&self, _: &Secret<String>) -> Option<Arc<UpstreamKey>> {
            None
        }
        fn upstream(&self, _: &str) -> Option<&Upstream> {
            None
        }
    }

    fn upstream(base: &str, extra: &str) -> Upstream {
        let text = format!(
            "[auth]\nrequire_api_key = false\n[[upstreams]]\nname = \"u\"\nbase_url = \"{base}\"\nkeys = [\"sk-1\"]\n{extra}\n"
        );
        let config = Config::from_toml(&text, std::path::Path::new("t.toml"), &|_| None).unwrap();
        let registry = ClientRegistry::new(config.client.clone());
        Upstream::new(&config.upstreams[0], &registry, &Nothing).unwrap()
    }

    #[test]
    fn uri_joins_base_path_and_drops_api_key() {
        let u = upstream("https://api.example.com/v1", "");
        assert_eq!(
            u.uri_for("/v1/chat/completions", Some("api_key=sk&x=1")).unwrap().to_string(),
            "https://api.example.com/v1/chat/completions?x=1"
        );
        let u = upstream("http://127.0.0.1:9000/openai/v1", "");
        assert_eq!(u.uri_for("/v1/models", None).unwrap().to_string(), "http://127.0.0.1:9000/openai/v1/models");
        let u = upstream("http://127.0.0.1:9000", "");
        assert_eq!(
            u.uri_for("/v1/embeddings", Some("api_key=1")).unwrap().to_string(),
            "http://127.0.0.1:9000/embeddings"
        );
    }

    #[test]
    fn extra_headers_fill_a_fresh_uuid() {
        let u = upstream(
            "http://127.0.0.1:9000/v1",
            "headers = { Referer = \"https://example/chat/{uuid}\", X-Fixed = \"1\" }",
        );
        let (mut a, mut b) = (HeaderMap::new(), HeaderMap::new());
        u.add_extra_headers(&mut a);
        u.add_extra_headers(&mut b);
        assert_eq!(a["x-fixed"], "1");
        let referer = a["referer"].to_str().unwrap();
        assert!(referer.starts_with("https://example/chat/") && referer.len() == "https://example/chat/".len() + 36);
        assert_ne!(a["referer"], b["referer"]);
    }
}
