//! Upstreams at run time: the long-lived machinery a request is sent through.
//! An [`Upstream`] knows where requests go (URI building), how they are
//! authenticated (its key ring or login token), how hard to try (retry policy,
//! breaker, timeouts) and which pooled client carries them. Per-request stages
//! live in [`crate::proxy`]; this layer never decides to re-send anything.

pub mod body;
pub mod breaker;
pub mod budget;
pub mod h1;
pub mod h2pool;
pub mod headroom;
pub mod keyring;
pub mod news;
pub mod registry;
pub mod retry_after;
pub mod token;

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};

use crate::clock::now_ms;
use crate::config::keys::Secret;
use crate::config::upstream::AzureConfig;
use crate::config::{H1Client, Http2Mode, RetryPolicy, Strategy, Timeouts, UpstreamAuth, UpstreamConfig};
use crate::error::ProxyError;
use crate::tasks::Tasks;
use body::{ForwardBody, UpstreamBody};
use breaker::Breaker;
use budget::RetryBudget;
use keyring::{KeyRing, UpstreamKey};
use news::{KeyEvent, KeyNews};
use registry::{ClientRegistry, H2Key, HttpClient};
use token::TokenSource;

/// Least time between two checks of one key (see [`Upstream::verify_key`]).
pub const KEY_CHECK_GAP: Duration = Duration::from_secs(10);
/// Longest wait for a key check's answer.
const KEY_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed attempt, with what the retry loop needs to judge a re-send.
#[derive(Debug)]
pub struct AttemptError {
    /// What went wrong.
    pub error: ProxyError,
    /// Whether any byte of the request may have reached the upstream. When
    /// false, the upstream cannot have acted on it: a re-send is always safe.
    pub written: bool,
    /// A reused pooled connection failed before any byte of an answer came
    /// back: most likely the upstream closed it while it sat idle.
    pub stale: bool,
}

/// The query string sent upstream: the client's, minus `api_key=` (a client
/// credential), parameters kept in order; `None` when nothing is left.
pub fn query_without_api_key(query: &str) -> Option<String> {
    let kept: Vec<&str> =
        query.split('&').filter(|pair| !pair.is_empty() && pair.split('=').next() != Some("api_key")).collect();
    (!kept.is_empty()).then(|| kept.join("&"))
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
    /// The name as a header value, for `x-sluice-upstream`.
    pub name_header: HeaderValue,
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
    /// sluice's HTTP/2 pools (one per event loop), when the upstream is reached over HTTP/2.
    pub h2: Option<Arc<h2pool::Pools>>,
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
    /// The header keys (and login tokens) are sent in.
    pub auth_name: HeaderName,
    /// The base URL's own query, sent with every request.
    base_query: Option<Box<str>>,
    /// Azure OpenAI's deployment paths and `api-version`.
    pub azure: Option<AzureConfig>,
    /// Caps retries at a share of first attempts (kept across reloads).
    pub retry_budget: Arc<RetryBudget>,
    /// Where key checks run.
    tasks: Tasks,
    /// Where changes of its keys' health go for other instances.
    news: Arc<KeyNews>,
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
        let template = config.auth_template.as_str();
        let key = |secret: &Secret<String>| {
            carry
                .key(secret)
                .filter(|k| k.sent_as(template))
                .or_else(|| UpstreamKey::with_template(secret.clone(), template).map(Arc::new))
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
        // HTTP/2 to the upstream (h2c with prior knowledge, or TLS where
        // ALPN may choose it) goes over sluice's pool of h2 connections.
        let h2 = match (scheme == Scheme::HTTPS, config.http2) {
            (true, Http2Mode::Auto) => Some(Some(config.ca_file.clone())),
            (false, Http2Mode::PriorKnowledge) => Some(None),
            _ => None,
        }
        .map(|tls| {
            clients.h2_pool(H2Key {
                authority: authority.clone(),
                tls,
                connect_timeout: config.timeouts.connect,
                max_connections: config.max_connections,
                keepalive: config.keepalive,
            })
        })
        .transpose()?;
        let own_h1 = clients.config().h1_client == H1Client::Sluice;
        let h1 = (own_h1 && scheme == Scheme::HTTP && config.http2 != Http2Mode::PriorKnowledge)
            .then(|| clients.h1_pool(&authority, config.timeouts.connect))
            .transpose()?;
        Ok(Self {
            client: clients.get(config.http2, config.timeouts.connect, config.ca_file.as_ref())?,
            h1,
            h2,
            name_header: HeaderValue::from_str(&name).map_err(|_| "the upstream name is not a valid header value")?,
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
            auth_name: config.auth_header.clone(),
            base_query: config.base_url.query().map(Into::into),
            azure: config.azure.clone(),
            retry_budget: previous.map_or_else(Arc::default, |p| Arc::clone(&p.retry_budget)),
            tasks: clients.tasks().clone(),
            news: Arc::clone(clients.news()),
        })
    }

    /// Cools `key` after a 429 until clock time `until_ms` (never shortening
    /// a later deadline), and tells the other instances.
    pub fn cool_key(&self, key: &UpstreamKey, until_ms: u64) {
        key.cool_until(until_ms);
        self.news.push(KeyEvent::Cooled { id: Arc::clone(&key.shared_id), for_ms: until_ms.saturating_sub(now_ms()) });
    }

    /// Rests `key` until clock time `until_ms` because it said it has nothing
    /// left (no failure counted), and tells the other instances.
    pub fn rest_key(&self, key: &UpstreamKey, until_ms: u64) {
        key.rest_until(until_ms);
        self.news.push(KeyEvent::Cooled { id: Arc::clone(&key.shared_id), for_ms: until_ms.saturating_sub(now_ms()) });
    }

    /// Disables `key` (the upstream says it is bad), and tells the other instances.
    pub fn disable_key(&self, key: &UpstreamKey) {
        key.disable();
        self.news.push(KeyEvent::Disabled { id: Arc::clone(&key.shared_id) });
    }

    /// The upstream URI for a client path under `/v1` and its query (minus
    /// `api_key`), after the base URL's own query. On Azure, a model endpoint
    /// goes to its deployment's path with the `api-version`.
    pub fn uri_for(&self, client_path: &str, query: Option<&str>, deployment: Option<&str>) -> Result<Uri, ProxyError> {
        let rest = client_path.strip_prefix("/v1").unwrap_or(client_path);
        let client_query = query.and_then(query_without_api_key);
        let mut path = String::with_capacity(self.base_path.len() + rest.len() + 64);
        path.push_str(&self.base_path);
        let mut queries: [Option<&str>; 3] = [self.base_query.as_deref(), None, client_query.as_deref()];
        let api_version;
        match &self.azure {
            // Azure: a model's endpoints live under its deployment, the
            // others (`/openai/models`) under `/openai`; all name the API version.
            Some(azure) => {
                path.push_str("/openai");
                if let Some(deployment) = deployment {
                    path.push_str("/deployments/");
                    path.push_str(deployment);
                }
                path.push_str(rest);
                api_version = format!("api-version={}", azure.api_version);
                queries[1] = Some(&api_version);
            }
            None => path.push_str(rest),
        }
        if path.is_empty() {
            path.push('/');
        }
        for (i, part) in queries.iter().flatten().enumerate() {
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str(part);
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
    /// client or its HTTP/2 pool when the upstream has one; anything else
    /// (streamed uploads, TLS peers that chose HTTP/1.1) over hyper-util's.
    /// `sent` turns true when the request starts out to the upstream (not
    /// while it waits in line for an HTTP/2 stream).
    /// Nothing here re-sends: a failure says whether the request was written
    /// and whether a stale pooled connection was the cause, and the retry loop
    /// decides.
    pub async fn send(
        &self,
        method: &Method,
        target: &Uri,
        headers: &HeaderMap,
        auth: HeaderValue,
        body: ForwardBody,
        sent: &AtomicBool,
    ) -> Result<Response<UpstreamBody>, AttemptError> {
        if let (Some(pool), ForwardBody::Full { bytes }) = (&self.h1, &body) {
            sent.store(true, Relaxed);
            let path = target.path_and_query().map_or("/", PathAndQuery::as_str);
            let empty = Bytes::new();
            return match pool
                .send(method, path, headers, (&self.auth_name, &auth), bytes.as_ref().unwrap_or(&empty))
                .await
            {
                Ok(response) => Ok(response.map(|inner| UpstreamBody::H1 { inner })),
                Err(failed) => {
                    let upstream = self.name.to_string();
                    let reason = failed.error.to_string();
                    let error = if failed.error.is_connect() {
                        ProxyError::UpstreamConnect { upstream, reason }
                    } else {
                        ProxyError::UpstreamProtocol { upstream, reason }
                    };
                    Err(AttemptError { error, written: failed.written, stale: failed.reused && !failed.answered })
                }
            };
        }
        if let (Some(pools), ForwardBody::Full { bytes }) = (&self.h2, &body)
            && let pool = pools.here()
            && !pool.is_not_h2()
        {
            let bytes = bytes.clone().unwrap_or_default();
            match pool.send(method, target, headers, (&self.auth_name, auth.clone()), bytes, sent).await {
                Ok(response) => return Ok(response.map(|inner| UpstreamBody::H2 { inner })),
                // The peer picked HTTP/1.1 in ALPN: the hyper-util client below.
                Err(h2pool::SendError::Acquire(h2pool::AcquireError::NotHttp2)) => {}
                Err(failed) => return Err(self.h2_error(failed)),
            }
        }
        sent.store(true, Relaxed);
        let mut request = Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = target.clone();
        *request.headers_mut() = headers.clone();
        request.headers_mut().insert(self.auth_name.clone(), auth);
        match self.client.request(request).await {
            Ok(response) => Ok(response.map(|inner| UpstreamBody::Hyper { inner })),
            Err(error) => Err(self.client_error(&error)),
        }
    }

    /// Maps a failure of the HTTP/2 pool: nothing was sent unless a stream
    /// was opened and the peer did not refuse it unprocessed.
    fn h2_error(&self, failed: h2pool::SendError) -> AttemptError {
        let upstream = self.name.to_string();
        match failed {
            h2pool::SendError::Acquire(why) => {
                let reason = match why {
                    h2pool::AcquireError::Connect(reason) => reason,
                    h2pool::AcquireError::QueueFull => {
                        format!("more than {} requests wait for an HTTP/2 stream", h2pool::MAX_QUEUED)
                    }
                    h2pool::AcquireError::NotHttp2 => "the upstream does not speak HTTP/2".into(),
                };
                AttemptError { error: ProxyError::UpstreamConnect { upstream, reason }, written: false, stale: false }
            }
            // Not written: a stream refused, or a connection going away before
            // it took the request; counted as a stale connection when retried.
            h2pool::SendError::Stream(error, written) => AttemptError {
                error: ProxyError::UpstreamProtocol { upstream, reason: format!("HTTP/2 stream: {error}") },
                written,
                stale: !written,
            },
        }
    }

    /// Maps a hyper-util failure, with its cause chain (which never holds
    /// headers or keys) for the log. A connect error, a request hyper handed
    /// back unsent (its pooled connection closed first) and an HTTP/2 stream
    /// the peer refused (`REFUSED_STREAM`: guaranteed unprocessed) were not
    /// written; anything else may have been.
    fn client_error(&self, error: &hyper_util::client::legacy::Error) -> AttemptError {
        let mut reason = error.to_string();
        let mut unsent = error.is_connect();
        let mut cause = error.source();
        while let Some(inner) = cause {
            reason.push_str(": ");
            reason.push_str(&inner.to_string());
            unsent |= inner.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled);
            // Only the peer's reset of this stream: a GOAWAY carrying the same
            // code reaches streams the peer may have processed.
            unsent |= inner
                .downcast_ref::<h2::Error>()
                .is_some_and(|e| e.is_reset() && e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM));
            cause = inner.source();
        }
        let upstream = self.name.to_string();
        let error = if error.is_connect() {
            ProxyError::UpstreamConnect { upstream, reason }
        } else {
            ProxyError::UpstreamProtocol { upstream, reason }
        };
        AttemptError { error, written: !unsent, stale: false }
    }

    /// Checks a key that answered a request with 401/402/403 without saying
    /// the key was bad: sluice asks `GET {base_url}/models` with it, a request
    /// no client shapes, and disables the key only if that fails the same way.
    /// So a refusal a client provoked (a model the key may not use, a header
    /// it sent) never takes a shared key out of service. At most one check
    /// per key runs at a time, and at most one per [`KEY_CHECK_GAP`].
    pub fn verify_key(self: &Arc<Self>, key: Arc<UpstreamKey>, status: u16) {
        if !key.begin_check(now_ms(), KEY_CHECK_GAP) {
            return;
        }
        let upstream = Arc::clone(self);
        self.tasks.spawn(async move {
            let answer = upstream.check_key(&key).await;
            key.end_check();
            match answer {
                Some(401..=403) => {
                    upstream.disable_key(&key);
                    tracing::warn!(upstream = %upstream.name, key = %key.fingerprint, status, "a refused request led to a key check that failed too; key disabled until reset or reload");
                }
                Some(checked) => {
                    tracing::info!(upstream = %upstream.name, key = %key.fingerprint, status, checked, "a request was refused, but the key checks out; it stays in service");
                }
                None => tracing::debug!(upstream = %upstream.name, key = %key.fingerprint, "key check got no answer"),
            }
        });
    }

    /// The status `GET {base_url}/models` answers with this key, if any.
    async fn check_key(&self, key: &UpstreamKey) -> Option<u16> {
        let target = self.uri_for("/v1/models", None, None).ok()?;
        let mut headers = HeaderMap::new();
        self.add_extra_headers(&mut headers);
        let sent = AtomicBool::new(false);
        let send =
            self.send(&Method::GET, &target, &headers, key.auth_header(), ForwardBody::full(Bytes::new()), &sent);
        let response = tokio::time::timeout(self.timeouts.header.min(KEY_CHECK_TIMEOUT), send).await.ok()?.ok()?;
        Some(response.status().as_u16())
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
        let registry = ClientRegistry::new(config.client.clone(), 0, crate::tasks::Tasks::default());
        Upstream::new(&config.upstreams[0], &registry, &Nothing).unwrap()
    }

    #[test]
    fn uri_joins_base_path_and_drops_api_key() {
        let u = upstream("https://api.example.com/v1", "");
        assert_eq!(
            u.uri_for("/v1/chat/completions", Some("api_key=sk&x=1"), None).unwrap().to_string(),
            "https://api.example.com/v1/chat/completions?x=1"
        );
        let u = upstream("http://127.0.0.1:9000/openai/v1", "");
        assert_eq!(u.uri_for("/v1/models", None, None).unwrap().to_string(), "http://127.0.0.1:9000/openai/v1/models");
        let u = upstream("http://127.0.0.1:9000", "");
        assert_eq!(
            u.uri_for("/v1/embeddings", Some("api_key=1"), None).unwrap().to_string(),
            "http://127.0.0.1:9000/embeddings"
        );
    }

    #[test]
    fn azure_paths_and_base_queries() {
        let u = upstream("https://eu.openai.azure.com", "kind = \"azure\"\napi_version = \"2024-10-21\"");
        assert_eq!(
            u.uri_for("/v1/chat/completions", Some("x=1"), Some("gpt4o-eu")).unwrap().to_string(),
            "https://eu.openai.azure.com/openai/deployments/gpt4o-eu/chat/completions?api-version=2024-10-21&x=1"
        );
        assert_eq!(
            u.uri_for("/v1/models", None, None).unwrap().to_string(),
            "https://eu.openai.azure.com/openai/models?api-version=2024-10-21"
        );
        assert_eq!(u.auth_name, "api-key", "Azure takes its key in api-key");
        let u = upstream("https://gw.example.com/v1?tenant=a", "");
        assert_eq!(
            u.uri_for("/v1/embeddings", Some("x=1"), None).unwrap().to_string(),
            "https://gw.example.com/v1/embeddings?tenant=a&x=1"
        );
    }

    #[test]
    fn api_key_query_removed() {
        assert_eq!(query_without_api_key("api_key=sk-1"), None);
        assert_eq!(query_without_api_key("a=1&api_key=sk&b=2").as_deref(), Some("a=1&b=2"));
        assert_eq!(query_without_api_key("api_keyx=1").as_deref(), Some("api_keyx=1"));
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
