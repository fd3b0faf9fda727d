//! `kind = "token"` with a login: sluice POSTs `{"username","password"}` to
//! `auth_url`, reads the token from the JSON answer, and uses it as a bearer
//! token until `token_ttl` (refreshing a little early), or until the upstream
//! answers 401. Concurrent requests share one login: the refresh is single-flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Limited};

use crate::clock::now_ms;
use crate::config::LoginConfig;
use crate::error::ProxyError;
use crate::upstream::body::ForwardBody;
use crate::upstream::registry::HttpClient;

/// Largest login answer read.
const MAX_LOGIN_ANSWER: usize = 64 << 10;

/// A cached token.
#[derive(Debug)]
struct Token {
    header: HeaderValue,
    /// Clock ms after which the token is refreshed before use.
    refresh_at: u64,
    generation: u64,
}

/// The token of one login upstream.
#[derive(Debug)]
pub struct TokenSource {
    upstream: Arc<str>,
    login: LoginConfig,
    current: ArcSwapOption<Token>,
    /// Serializes logins; held only while logging in, never on the hot path.
    refresh: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    /// Logins performed (for tests and `/health`).
    pub logins: AtomicU64,
}

impl TokenSource {
    /// A source with no token yet.
    pub fn new(upstream: Arc<str>, login: LoginConfig) -> Self {
        Self {
            upstream,
            login,
            current: ArcSwapOption::empty(),
            refresh: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            logins: AtomicU64::new(0),
        }
    }

    /// Whether this source logs in the same way (a reload keeps its token then).
    pub fn same_login(&self, other: &LoginConfig) -> bool {
        self.login.auth_url == other.auth_url
            && self.login.username == other.username
            && self.login.password == other.password
            && self.login.token_field == other.token_field
            && self.login.token_ttl == other.token_ttl
    }

    /// The cached token header and its generation, if one is valid now.
    pub fn cached(&self) -> Option<(HeaderValue, u64)> {
        let token = self.current.load();
        let token = token.as_ref()?;
        (now_ms() < token.refresh_at).then(|| (token.header.clone(), token.generation))
    }

    /// A valid token header and its generation, logging in if there is none or it is due.
    pub async fn header(&self, client: &HttpClient, timeout: Duration) -> Result<(HeaderValue, u64), ProxyError> {
        match self.cached() {
            Some(cached) => Ok(cached),
            None => self.login_once(client, timeout, None).await,
        }
    }

    /// After a 401 with token `stale`: log in again unless another request already did.
    pub async fn refresh(
        &self,
        client: &HttpClient,
        timeout: Duration,
        stale: u64,
    ) -> Result<(HeaderValue, u64), ProxyError> {
        self.login_once(client, timeout, Some(stale)).await
    }

    async fn login_once(
        &self,
        client: &HttpClient,
        timeout: Duration,
        stale: Option<u64>,
    ) -> Result<(HeaderValue, u64), ProxyError> {
        let _flight = self.refresh.lock().await;
        // Someone else may have logged in while this request waited for the lock.
        if let Some(token) = self.current.load().as_ref() {
            let fresh = now_ms() < token.refresh_at;
            let newer = stale.is_none_or(|stale| token.generation != stale);
            if fresh && newer {
                return Ok((token.header.clone(), token.generation));
            }
        }
        let header = tokio::time::timeout(timeout, self.login(client))
            .await
            .map_err(|_| self.failed(format!("login timed out after {} ms", timeout.as_millis())))??;
        let generation = self.generation.fetch_add(1, Relaxed) + 1;
        let ttl_ms = self.login.token_ttl.as_millis() as u64;
        // Refresh a little before expiry: a tenth of the lifetime, at most a minute.
        let early = (ttl_ms / 10).min(60_000);
        let refresh_at = now_ms().saturating_add(ttl_ms - early);
        self.current.store(Some(Arc::new(Token { header: header.clone(), refresh_at, generation })));
        self.logins.fetch_add(1, Relaxed);
        tracing::info!(upstream = %self.upstream, generation, "logged in to upstream");
        Ok((header, generation))
    }

    async fn login(&self, client: &HttpClient) -> Result<HeaderValue, ProxyError> {
        let body = serde_json::json!({ "username": self.login.username, "password": self.login.password.expose() });
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.login.auth_url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(ForwardBody::full(Bytes::from(body.to_string())))
            .map_err(|e| self.failed(e.to_string()))?;
        let response = client.request(request).await.map_err(|e| self.failed(e.to_string()))?;
        let status = response.status();
        let answer = Limited::new(response.into_body(), MAX_LOGIN_ANSWER)
            .collect()
            .await
            .map_err(|e| self.failed(format!("reading the answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(self.failed(format!("login answered {status}")));
        }
        let json: serde_json::Value =
            serde_json::from_slice(&answer).map_err(|e| self.failed(format!("answer is not JSON: {e}")))?;
        let token = self
            .login
            .token_field
            .split('.')
            .try_fold(&json, |value, part| value.get(part))
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| self.failed(format!("no string at `{}` in the answer", self.login.token_field)))?;
        let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| self.failed("token is not a valid header value".into()))?;
        header.set_sensitive(true);
        Ok(header)
    }

    fn failed(&self, reason: String) -> ProxyError {
        ProxyError::UpstreamLogin { upstream: self.upstream.to_string(), reason }
    }
}
