//! `[[upstreams]]`: where requests go, how sluice authenticates there, and how
//! hard it tries (keys, retries, breaker, timeouts).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;
use serde::Deserialize;

use super::keys::{Secret, dedup_keys, read_keys_file};
use super::units::HumanDuration;
use super::{ConfigError, Http2Mode, Validator};

/// Default upstream attempts per client request.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// Default number of distinct keys one request may try.
pub const DEFAULT_MAX_KEY_RETRIES: u32 = 3;
/// Default first backoff before re-using a key (milliseconds).
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_millis(100);
/// Default longest backoff (seconds).
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(2);
/// Default cooldown of a key after a 429 without `Retry-After` (seconds).
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);
/// Default cap on any cooldown, whatever `Retry-After` says (seconds).
pub const DEFAULT_MAX_COOLDOWN: Duration = Duration::from_secs(3600);
/// Default consecutive failed requests that open the breaker.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
/// Default time the breaker stays open before a probe (seconds).
pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(30);
/// Default time to response headers (seconds). Long, because a non-streaming
/// completion sends its headers only when the whole answer is ready.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(300);
/// Default longest silence inside a streaming body (seconds).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default limit on a whole non-streaming exchange (seconds).
pub const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(600);
/// Default HTTP/2 connections per upstream.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;
/// Default time between HTTP/2 PINGs on a pooled connection.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default wait for a PING's answer before the connection is closed.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Default lifetime of a login token: 8 hours.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(8 * 3600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    name: String,
    base_url: String,
    #[serde(default)]
    kind: Kind,
    #[serde(default)]
    keys: Vec<String>,
    keys_file: Option<PathBuf>,
    token: Option<String>,
    auth_url: Option<String>,
    username: Option<String>,
    password: Option<String>,
    token_field: Option<String>,
    token_ttl: Option<HumanDuration>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    http2: Http2Mode,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    strategy: Strategy,
    max_attempts: Option<u32>,
    max_key_retries: Option<u32>,
    retry_base: Option<HumanDuration>,
    retry_max: Option<HumanDuration>,
    cooldown: Option<HumanDuration>,
    max_cooldown: Option<HumanDuration>,
    breaker_failures: Option<u32>,
    breaker_cooldown: Option<HumanDuration>,
    connect_timeout: Option<HumanDuration>,
    header_timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
    total_timeout: Option<HumanDuration>,
    api_version: Option<String>,
    auth_header: Option<String>,
    auth_template: Option<String>,
    max_connections: Option<usize>,
    keepalive_interval: Option<HumanDuration>,
    keepalive_timeout: Option<HumanDuration>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    #[default]
    Openai,
    Token,
    Azure,
}

/// Azure OpenAI: where a deployment's endpoints are and which API version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureConfig {
    /// `api-version` query parameter.
    pub api_version: String,
}

/// How a key is chosen for a request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The next usable key in turn.
    #[default]
    RoundRobin,
    /// The usable key with the fewest requests in flight.
    LeastInFlight,
}

/// How sluice authenticates to an upstream.
#[derive(Debug, Clone)]
pub enum UpstreamAuth {
    /// `kind = "openai"`: `Authorization: Bearer <key>`, one key of the ring per request.
    Keys(Vec<Secret<String>>),
    /// `kind = "token"` with a fixed `token`.
    StaticToken(Secret<String>),
    /// `kind = "token"` with a login: the token is fetched, cached and refreshed.
    Login(LoginConfig),
}

/// A login that yields a bearer token.
#[derive(Debug, Clone)]
pub struct LoginConfig {
    /// Where to POST `{"username","password"}`.
    pub auth_url: http::Uri,
    /// Login name.
    pub username: String,
    /// Login password.
    pub password: Secret<String>,
    /// Dotted path of the token in the JSON answer (default `token`).
    pub token_field: String,
    /// How long a token is used before it is refreshed.
    pub token_ttl: Duration,
}

/// Retry budget of one request.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Upstream attempts at most.
    pub max_attempts: u32,
    /// Distinct keys at most.
    pub max_key_retries: u32,
    /// First backoff before re-using a key.
    pub retry_base: Duration,
    /// Longest backoff.
    pub retry_max: Duration,
}

/// Per-upstream timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP (and TLS) connect.
    pub connect: Duration,
    /// Until response headers.
    pub header: Duration,
    /// Longest silence inside a streaming body.
    pub idle: Duration,
    /// A whole non-streaming exchange.
    pub total: Duration,
}

/// One `[[upstreams]]` entry, validated.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Unique name.
    pub name: String,
    /// Base URL; request paths below `/v1` are appended to its path.
    pub base_url: http::Uri,
    /// Credentials.
    pub auth: UpstreamAuth,
    /// Extra headers; `{uuid}` in a value becomes a fresh UUID per request.
    pub headers: Vec<(HeaderName, String)>,
    /// HTTP/2 mode.
    pub http2: Http2Mode,
    /// Extra trusted CA certificates (PEM) for this upstream's TLS, beside the
    /// public web roots: for private gateways and test upstreams.
    pub ca_file: Option<PathBuf>,
    /// Key choice.
    pub strategy: Strategy,
    /// Retry budget.
    pub retry: RetryPolicy,
    /// Cooldown after a 429 without `Retry-After`.
    pub cooldown: Duration,
    /// Cap on any cooldown.
    pub max_cooldown: Duration,
    /// Consecutive failed requests that open the breaker.
    pub breaker_failures: u32,
    /// Open time before a probe.
    pub breaker_cooldown: Duration,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// The header a key is sent in (`authorization` unless configured).
    pub auth_header: HeaderName,
    /// Its value with `{key}` standing for the key (`Bearer {key}` for
    /// `authorization`, `{key}` for any other header).
    pub auth_template: String,
    /// `kind = "azure"`: deployment paths and `api-version`.
    pub azure: Option<AzureConfig>,
    /// HTTP/2: connections at most (more streams wait in line).
    pub max_connections: usize,
    /// HTTP/2: PING interval and how long an answer may take.
    pub keepalive: (Duration, Duration),
}

impl UpstreamConfig {
    /// The upstream keys (for `kind = "openai"`); empty for token upstreams.
    pub fn keys(&self) -> &[Secret<String>] {
        match &self.auth {
            UpstreamAuth::Keys(keys) => keys,
            UpstreamAuth::StaticToken(_) | UpstreamAuth::Login(_) => &[],
        }
    }
}

impl Validator<'_> {
    pub(super) fn upstream(
        &self,
        i: usize,
        raw: RawUpstream,
        default_connect: Duration,
    ) -> Result<UpstreamConfig, ConfigError> {
        let at = |f: &str| format!("upstreams[{i}].{f}");
        if raw.name.trim().is_empty() {
            return Err(self.invalid(at("name"), "must not be empty"));
        }
        // A query string on the base URL is kept and sent with every request.
        let base_url = self.absolute_url(&at("base_url"), &raw.base_url)?;
        if raw.http2 == Http2Mode::PriorKnowledge && base_url.scheme_str() == Some("https") {
            return Err(self.invalid(
                at("http2"),
                "prior-knowledge is for http:// (h2c); over https use `auto`, which negotiates h2 by ALPN",
            ));
        }
        let ca_file = raw.ca_file.as_ref().map(|file| self.base_dir.join(file));
        if let Some(path) = &ca_file {
            if base_url.scheme_str() != Some("https") {
                return Err(self.invalid(at("ca_file"), "only https:// upstreams use a CA file"));
            }
            crate::config::tls::read_certificates(path).map_err(|e| self.invalid(at("ca_file"), e))?;
        }
        let auth = match raw.kind {
            Kind::Openai | Kind::Azure => self.openai_auth(&at, &raw)?,
            Kind::Token => self.token_auth(&at, &raw)?,
        };
        let azure = match (raw.kind, &raw.api_version) {
            (Kind::Azure, Some(version)) if !crate::config::deployment_name_ok(version.trim()) => {
                return Err(self.invalid(at("api_version"), "only letters, digits, `.`, `_` and `-`"));
            }
            (Kind::Azure, Some(version)) => Some(AzureConfig { api_version: version.trim().to_string() }),
            (Kind::Azure, _) => return Err(self.invalid(at("api_version"), "kind = \"azure\" needs an api_version")),
            (_, Some(_)) => return Err(self.invalid(at("api_version"), "only kind = \"azure\" takes an api_version")),
            (_, None) => None,
        };
        let default_header = if raw.kind == Kind::Azure { "api-key" } else { "authorization" };
        let auth_header = HeaderName::from_bytes(raw.auth_header.as_deref().unwrap_or(default_header).as_bytes())
            .map_err(|_| self.invalid(at("auth_header"), "not a valid header name"))?;
        let auth_template = raw.auth_template.clone().unwrap_or_else(|| {
            if auth_header == http::header::AUTHORIZATION { "Bearer {key}".to_string() } else { "{key}".to_string() }
        });
        if !auth_template.contains("{key}") {
            return Err(self.invalid(at("auth_template"), "must contain {key}"));
        }
        let framing = [
            http::header::HOST,
            http::header::CONTENT_LENGTH,
            http::header::CONTENT_TYPE,
            http::header::TRANSFER_ENCODING,
            http::header::CONNECTION,
            http::header::TE,
            http::header::UPGRADE,
        ];
        if framing.contains(&auth_header) {
            return Err(self.invalid(at("auth_header"), "a header HTTP needs for itself cannot carry the key"));
        }
        if raw.headers.keys().any(|name| name.eq_ignore_ascii_case(auth_header.as_str())) {
            return Err(
                self.invalid(at("headers"), format!("`{auth_header}` carries the key: it cannot be an extra header"))
            );
        }
        let headers = raw
            .headers
            .iter()
            .map(|(name, value)| {
                let field = at(&format!("headers.{name}"));
                let header = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| self.invalid(&field, "not a valid header name"))?;
                let value = value.clone();
                http::HeaderValue::from_str(&value.replace("{uuid}", "00000000-0000-4000-8000-000000000000"))
                    .map_err(|_| self.invalid(&field, "not a valid header value"))?;
                Ok((header, value))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let duration = |d: Option<HumanDuration>, default: Duration| d.map_or(default, |d| d.0);
        let retry = RetryPolicy {
            max_attempts: raw.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            max_key_retries: raw.max_key_retries.unwrap_or(DEFAULT_MAX_KEY_RETRIES),
            retry_base: duration(raw.retry_base, DEFAULT_RETRY_BASE),
            retry_max: duration(raw.retry_max, DEFAULT_RETRY_MAX),
        };
        if retry.max_attempts == 0 || retry.max_key_retries == 0 {
            return Err(self.invalid(at("max_attempts"), "max_attempts and max_key_retries must be at least 1"));
        }
        let breaker_failures = raw.breaker_failures.unwrap_or(DEFAULT_BREAKER_FAILURES);
        if breaker_failures == 0 {
            return Err(self.invalid(at("breaker_failures"), "must be at least 1"));
        }
        let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(self.invalid(at("max_connections"), "must be at least 1"));
        }
        let keepalive = (
            duration(raw.keepalive_interval, DEFAULT_KEEPALIVE_INTERVAL),
            duration(raw.keepalive_timeout, DEFAULT_KEEPALIVE_TIMEOUT),
        );
        if keepalive.0.is_zero() || keepalive.1.is_zero() {
            return Err(
                self.invalid(at("keepalive_interval"), "keepalive_interval and keepalive_timeout must be above 0")
            );
        }
        Ok(UpstreamConfig {
            name: raw.name,
            base_url,
            auth,
            headers,
            http2: raw.http2,
            ca_file,
            strategy: raw.strategy,
            retry,
            cooldown: duration(raw.cooldown, DEFAULT_COOLDOWN),
            max_cooldown: duration(raw.max_cooldown, DEFAULT_MAX_COOLDOWN),
            breaker_failures,
            breaker_cooldown: duration(raw.breaker_cooldown, DEFAULT_BREAKER_COOLDOWN),
            timeouts: Timeouts {
                connect: duration(raw.connect_timeout, default_connect),
                header: duration(raw.header_timeout, DEFAULT_HEADER_TIMEOUT),
                idle: duration(raw.idle_timeout, DEFAULT_IDLE_TIMEOUT),
                total: duration(raw.total_timeout, DEFAULT_TOTAL_TIMEOUT),
            },
            auth_header,
            auth_template,
            azure,
            max_connections,
            keepalive,
        })
    }

    fn absolute_url(&self, field: &str, text: &str) -> Result<http::Uri, ConfigError> {
        // A query may carry a secret (`?key=...`): errors show what precedes it.
        let shown = text.split('?').next().unwrap_or_default();
        let url: http::Uri = text
            .trim_end_matches('/')
            .parse()
            .map_err(|e| self.invalid(field, format!("`{shown}` is not a URL: {e}")))?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.authority().is_none() {
            return Err(self.invalid(field, format!("`{shown}` must be an absolute http:// or https:// URL")));
        }
        Ok(url)
    }

    fn openai_auth(&self, at: &dyn Fn(&str) -> String, raw: &RawUpstream) -> Result<UpstreamAuth, ConfigError> {
        if raw.token.is_some() || raw.auth_url.is_some() {
            return Err(self.invalid(at("kind"), "`token` and `auth_url` need kind = \"token\""));
        }
        let mut keys = self.expand_keys(&at("keys"), raw.keys.clone())?;
        if let Some(file) = &raw.keys_file {
            let path = self.base_dir.join(file);
            keys.extend(read_keys_file(&path).map_err(|e| self.invalid(at("keys_file"), e))?);
        }
        let keys = dedup_keys(keys);
        if keys.is_empty() {
            return Err(self.invalid(at("keys"), "no keys: give `keys` or a `keys_file` with at least one key"));
        }
        if let Some(bad) = keys.iter().position(|k| http::HeaderValue::from_str(k).is_err()) {
            return Err(self.invalid(at("keys"), format!("key #{} has characters not allowed in a header", bad + 1)));
        }
        Ok(UpstreamAuth::Keys(keys.into_iter().map(Secret::new).collect()))
    }

    fn token_auth(&self, at: &dyn Fn(&str) -> String, raw: &RawUpstream) -> Result<UpstreamAuth, ConfigError> {
        if !raw.keys.is_empty() || raw.keys_file.is_some() {
            return Err(self.invalid(at("keys"), "kind = \"token\" takes `token` or `auth_url`, not keys"));
        }
        match (&raw.token, &raw.auth_url) {
            (Some(token), None) => {
                let token = token.clone();
                if token.is_empty() || http::HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
                    return Err(self.invalid(at("token"), "empty or not a valid header value"));
                }
                Ok(UpstreamAuth::StaticToken(Secret::new(token)))
            }
            (None, Some(auth_url)) => {
                let auth_url = self.absolute_url(&at("auth_url"), auth_url)?;
                let required = |value: &Option<String>, field: &str| -> Result<String, ConfigError> {
                    value.clone().ok_or_else(|| self.invalid(at(field), "required with auth_url"))
                };
                Ok(UpstreamAuth::Login(LoginConfig {
                    auth_url,
                    username: required(&raw.username, "username")?,
                    password: Secret::new(required(&raw.password, "password")?),
                    token_field: raw.token_field.clone().unwrap_or_else(|| "token".to_string()),
                    token_ttl: raw.token_ttl.map_or(DEFAULT_TOKEN_TTL, |d| d.0),
                }))
            }
            _ => Err(self.invalid(at("token"), "kind = \"token\" needs exactly one of `token` or `auth_url`")),
        }
    }
}
