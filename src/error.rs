//! The one error type of the request path and its OpenAI-shaped rendering.
//!
//! Every error sluice itself produces maps, without a catch-all arm, to an HTTP
//! status, a closed `kind()` label for metrics and logs, where it came from
//! (`source()`: the client, the upstream, or sluice itself) and a retry
//! decision. Upstream error *responses* are not errors here: they pass through
//! untouched. The rendering works for any body type that can be made from
//! `Bytes`, so this module knows no body type.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Error type of sluice's bodies: hyper wants something convertible into a boxed error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Who caused an error. Only `Upstream` errors may count against an upstream
/// key or its breaker: nothing a client sends may change shared health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The request itself: bad input, no credential, a body too large, a client gone.
    Client,
    /// The upstream or its keys: unreachable, broken, slow, rate-limited, open breaker.
    Upstream,
    /// sluice itself.
    Internal,
}

/// Everything that can stop a request inside sluice.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request body is not valid JSON (or not a JSON object).
    #[error("invalid JSON body: {0}")]
    BadJson(String),
    /// The request body is empty where a JSON object is required.
    #[error("request body is empty; a JSON object is required")]
    EmptyBody,
    /// `model` is present but not a string.
    #[error("`model` must be a string")]
    ModelNotString,
    /// A member sluice routes by (`model`, `stream`) appears twice: sluice and
    /// the upstream could read different ones.
    #[error("`{0}` appears more than once in the body")]
    DuplicateMember(&'static str),
    /// A model endpoint was sent an upload instead of a JSON body.
    #[error("`{0}` takes a JSON body, not `{1}`")]
    UnsupportedMediaType(&'static str, String),
    /// The path has `.`/`..` segments or an encoded `/` or `\`, which an
    /// upstream could resolve outside its base URL.
    #[error(
        "the path is not allowed: dot-segments, empty segments, a trailing slash, encoded slashes and needless percent-encoding are refused"
    )]
    BadPath,
    /// The client body could not be read (malformed framing).
    #[error("could not read request body: {0}")]
    BodyRead(String),
    /// The client closed its connection (or reset its stream) before its
    /// request was read whole; nobody is left to answer (logged as 499).
    #[error("the client went away before its request was read")]
    ClientGone,
    /// No client key was presented on a path that requires one.
    #[error("missing API key: send it as `Authorization: Bearer <key>`, `X-API-Key`, `api-key` or `?api_key=`")]
    MissingApiKey,
    /// A client key was presented but is not known.
    #[error("invalid API key")]
    InvalidApiKey,
    /// The client key is known but past its `expires_at`.
    #[error("this API key has expired")]
    KeyExpired,
    /// The client key may not use the requested model.
    #[error("this API key may not use the model `{0}`")]
    ModelNotAllowed(String),
    /// The client key may not use this path (beyond the inference endpoints
    /// without `passthrough`, or the operator's `/metrics` and `/stats`).
    #[error("this API key may not call `{0}`")]
    PathNotAllowed(String),
    /// The client's own request limit is reached (not an upstream's).
    #[error("rate limit reached for this {scope}: {limit} requests per {per}; retry in {retry_after} s")]
    ClientRateLimited {
        /// What is limited: `API key` or `client address`.
        scope: &'static str,
        /// Which window: `minute` or `hour`.
        per: &'static str,
        /// The limit.
        limit: u32,
        /// Seconds until a request fits again.
        retry_after: u64,
    },
    /// The client key's token budget for the day is spent.
    #[error("this API key has used its {budget} tokens for today (UTC); retry in {retry_after} s")]
    QuotaExceeded {
        /// Tokens per day.
        budget: u64,
        /// Seconds until the next UTC day.
        retry_after: u64,
    },
    /// An admin request field is missing or wrong.
    #[error("`{field}`: {reason}")]
    BadField {
        /// The field, as the request names it.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An admin request names a user or key that does not exist.
    #[error("{0} does not exist")]
    NoSuchItem(String),
    /// An admin request would duplicate a unique name.
    #[error("{0}")]
    Conflict(String),
    /// The key store failed or is not configured.
    #[error("key store: {0}")]
    Store(String),
    /// The limits instances share cannot be checked (Redis is down) and
    /// `[redis] on_error = "deny"`.
    #[error("the shared rate limits cannot be checked (Redis is unavailable)")]
    LimitsUnavailable,
    /// An admin action on what instances share could not reach Redis.
    #[error("Redis, which the instances share, did not answer: {0}")]
    RedisUnavailable(&'static str),
    /// The requested model is not routed by this gateway.
    #[error("the model `{0}` does not exist or is not served by this gateway")]
    UnknownModel(String),
    /// A request needs a model (none given) and no default model is configured.
    #[error("no `model` in the request and no default model configured")]
    NoModel,
    /// No handler for this path.
    #[error("unknown path `{0}`")]
    NotFound(String),
    /// The path exists but not for this method.
    #[error("method {method} is not allowed on this path")]
    MethodNotAllowed {
        /// The method the client used.
        method: http::Method,
        /// The `Allow` header value: the methods the path takes.
        allow: &'static str,
    },
    /// The client took too long to send its body (a slow or stalled client).
    #[error("request body not received within {0} s")]
    BodyTimeout(u64),
    /// The request body exceeds `server.max_body`.
    #[error("request body exceeds the limit of {0} bytes")]
    BodyTooLarge(u64),
    /// Could not connect to the upstream (refused, DNS, TLS handshake).
    #[error("upstream `{upstream}` unreachable: {reason}")]
    UpstreamConnect {
        /// Upstream name from the config.
        upstream: String,
        /// What went wrong, without secrets.
        reason: String,
    },
    /// The upstream broke the protocol or reset the exchange before headers.
    #[error("upstream `{upstream}` protocol error: {reason}")]
    UpstreamProtocol {
        /// Upstream name from the config.
        upstream: String,
        /// What went wrong, without secrets.
        reason: String,
    },
    /// The upstream did not answer with headers in time.
    #[error("upstream `{upstream}` timed out after {after_ms} ms")]
    UpstreamTimeout {
        /// Upstream name from the config.
        upstream: String,
        /// The timeout that fired, in milliseconds.
        after_ms: u64,
    },
    /// Logging in to a token upstream failed.
    #[error("login to upstream `{upstream}` failed: {reason}")]
    UpstreamLogin {
        /// Upstream name from the config.
        upstream: String,
        /// What went wrong, without secrets.
        reason: String,
    },
    /// No key of the upstream is usable (all cooling or disabled).
    #[error("no usable key for upstream `{upstream}`: all keys are cooling down or disabled")]
    NoAvailableKey {
        /// Upstream name from the config.
        upstream: String,
        /// Seconds until a cooling key comes back, if any is cooling.
        retry_after: Option<u64>,
    },
    /// Every key this request tried was rate-limited and none is left.
    #[error("every key of upstream `{upstream}` is rate-limited")]
    AllKeysRateLimited {
        /// Upstream name from the config.
        upstream: String,
        /// Seconds until a key comes back.
        retry_after: Option<u64>,
    },
    /// The upstream's circuit breaker is open.
    #[error("upstream `{upstream}` is unavailable (circuit open after repeated failures)")]
    UpstreamUnavailable {
        /// Upstream name from the config.
        upstream: String,
        /// Seconds until a probe may go.
        retry_after: Option<u64>,
    },
    /// `/admin/*` without the right admin token.
    #[error("missing or wrong admin token")]
    AdminUnauthorized,
    /// A reload was refused; the running config stays.
    #[error("reload refused, the running config stays: {0}")]
    ReloadFailed(String),
    /// A bug or impossible state inside sluice; never a client's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadJson(_) | Self::EmptyBody | Self::ModelNotString | Self::BodyRead(_) => StatusCode::BAD_REQUEST,
            Self::DuplicateMember(_) | Self::BadPath => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType(..) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NoModel => StatusCode::BAD_REQUEST,
            // Never sent (the client is gone); nginx's "client closed request".
            Self::ClientGone => StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST),
            Self::MissingApiKey | Self::InvalidApiKey | Self::KeyExpired => StatusCode::UNAUTHORIZED,
            Self::ModelNotAllowed(_) | Self::PathNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::ClientRateLimited { .. } | Self::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BadField { .. } => StatusCode::BAD_REQUEST,
            Self::NoSuchItem(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Store(_) | Self::LimitsUnavailable | Self::RedisUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UnknownModel(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UpstreamConnect { .. } | Self::UpstreamProtocol { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamLogin { .. } => StatusCode::BAD_GATEWAY,
            Self::NoAvailableKey { .. } | Self::UpstreamUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::AllKeysRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::AdminUnauthorized => StatusCode::UNAUTHORIZED,
            Self::ReloadFailed(_) => StatusCode::BAD_REQUEST,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A closed, stable label: used as the OpenAI `code` field and as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadJson(_) => "invalid_json",
            Self::EmptyBody => "empty_body",
            Self::ModelNotString => "invalid_model",
            Self::DuplicateMember(_) => "duplicate_member",
            Self::UnsupportedMediaType(..) => "unsupported_media_type",
            Self::BadPath => "invalid_path",
            Self::BodyRead(_) => "body_read_error",
            Self::ClientGone => "client_cancelled",
            Self::MissingApiKey => "missing_api_key",
            Self::InvalidApiKey => "invalid_api_key",
            Self::KeyExpired => "key_expired",
            Self::ModelNotAllowed(_) => "model_not_allowed",
            Self::PathNotAllowed(_) => "path_not_allowed",
            Self::ClientRateLimited { .. } => "rate_limit_exceeded",
            Self::QuotaExceeded { .. } => "insufficient_quota",
            Self::BadField { .. } => "invalid_field",
            Self::NoSuchItem(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Store(_) => "store_unavailable",
            Self::LimitsUnavailable => "limits_unavailable",
            Self::RedisUnavailable(_) => "redis_unavailable",
            Self::UnknownModel(_) => "model_not_found",
            Self::NoModel => "model_required",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::BodyTooLarge(_) => "request_too_large",
            Self::BodyTimeout(_) => "request_timeout",
            Self::UpstreamConnect { .. } => "upstream_unreachable",
            Self::UpstreamProtocol { .. } => "upstream_protocol_error",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::UpstreamLogin { .. } => "upstream_login_failed",
            Self::NoAvailableKey { .. } => "no_available_key",
            Self::AllKeysRateLimited { .. } => "rate_limited",
            Self::UpstreamUnavailable { .. } => "upstream_unavailable",
            Self::AdminUnauthorized => "invalid_admin_token",
            Self::ReloadFailed(_) => "reload_failed",
            Self::Internal(_) => "internal_error",
        }
    }

    /// Who caused it. Key health and breakers only ever count `Upstream` errors.
    pub fn source(&self) -> ErrorSource {
        match self {
            Self::BadJson(_)
            | Self::EmptyBody
            | Self::ModelNotString
            | Self::DuplicateMember(_)
            | Self::UnsupportedMediaType(..)
            | Self::BadPath
            | Self::BodyRead(_)
            | Self::ClientGone
            | Self::MissingApiKey
            | Self::InvalidApiKey
            | Self::KeyExpired
            | Self::ModelNotAllowed(_)
            | Self::PathNotAllowed(_)
            | Self::ClientRateLimited { .. }
            | Self::QuotaExceeded { .. }
            | Self::BadField { .. }
            | Self::NoSuchItem(_)
            | Self::Conflict(_)
            | Self::UnknownModel(_)
            | Self::NoModel
            | Self::NotFound(_)
            | Self::MethodNotAllowed { .. }
            | Self::BodyTooLarge(_)
            | Self::BodyTimeout(_)
            | Self::AdminUnauthorized
            | Self::ReloadFailed(_) => ErrorSource::Client,
            Self::UpstreamConnect { .. }
            | Self::UpstreamProtocol { .. }
            | Self::UpstreamTimeout { .. }
            | Self::UpstreamLogin { .. }
            | Self::NoAvailableKey { .. }
            | Self::AllKeysRateLimited { .. }
            | Self::UpstreamUnavailable { .. } => ErrorSource::Upstream,
            Self::Internal(_) | Self::Store(_) | Self::LimitsUnavailable | Self::RedisUnavailable(_) => {
                ErrorSource::Internal
            }
        }
    }

    /// The OpenAI error `type` field.
    fn error_type(&self) -> &'static str {
        match self {
            Self::BadJson(_)
            | Self::EmptyBody
            | Self::ModelNotString
            | Self::DuplicateMember(_)
            | Self::UnsupportedMediaType(..)
            | Self::BadPath
            | Self::BodyRead(_)
            | Self::ClientGone
            | Self::UnknownModel(_)
            | Self::NoModel
            | Self::NotFound(_)
            | Self::MethodNotAllowed { .. }
            | Self::BodyTooLarge(_)
            | Self::BodyTimeout(_)
            | Self::ModelNotAllowed(_)
            | Self::PathNotAllowed(_)
            | Self::BadField { .. }
            | Self::NoSuchItem(_)
            | Self::Conflict(_)
            | Self::ReloadFailed(_) => "invalid_request_error",
            Self::AllKeysRateLimited { .. } => "rate_limit_error",
            // OpenAI's own types for a client's request limit and spent budget.
            Self::ClientRateLimited { .. } => "requests",
            Self::QuotaExceeded { .. } => "insufficient_quota",
            Self::MissingApiKey | Self::InvalidApiKey | Self::KeyExpired | Self::AdminUnauthorized => {
                "authentication_error"
            }
            Self::UpstreamConnect { .. }
            | Self::UpstreamProtocol { .. }
            | Self::UpstreamTimeout { .. }
            | Self::UpstreamLogin { .. }
            | Self::NoAvailableKey { .. }
            | Self::UpstreamUnavailable { .. } => "upstream_error",
            Self::Internal(_) | Self::Store(_) | Self::LimitsUnavailable | Self::RedisUnavailable(_) => "server_error",
        }
    }

    /// The OpenAI error `param` field: which request field was at fault, if any.
    fn param(&self) -> Option<&'static str> {
        match self {
            Self::ModelNotString | Self::UnknownModel(_) | Self::NoModel | Self::ModelNotAllowed(_) => Some("model"),
            Self::DuplicateMember(member) | Self::BadField { field: member, .. } => Some(member),
            Self::BadJson(_)
            | Self::EmptyBody
            | Self::UnsupportedMediaType(..)
            | Self::BadPath
            | Self::BodyRead(_)
            | Self::ClientGone
            | Self::MissingApiKey
            | Self::InvalidApiKey
            | Self::KeyExpired
            | Self::PathNotAllowed(_)
            | Self::ClientRateLimited { .. }
            | Self::QuotaExceeded { .. }
            | Self::NoSuchItem(_)
            | Self::Conflict(_)
            | Self::Store(_)
            | Self::LimitsUnavailable
            | Self::RedisUnavailable(_)
            | Self::NotFound(_)
            | Self::MethodNotAllowed { .. }
            | Self::BodyTooLarge(_)
            | Self::BodyTimeout(_)
            | Self::UpstreamConnect { .. }
            | Self::UpstreamProtocol { .. }
            | Self::UpstreamTimeout { .. }
            | Self::UpstreamLogin { .. }
            | Self::NoAvailableKey { .. }
            | Self::AllKeysRateLimited { .. }
            | Self::UpstreamUnavailable { .. }
            | Self::AdminUnauthorized
            | Self::ReloadFailed(_)
            | Self::Internal(_) => None,
        }
    }

    /// Whether another attempt (another key, later) may succeed where this one
    /// failed. The retry loop asks this, and separately whether the request was
    /// sent and is safe to repeat.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::UpstreamConnect { .. } | Self::UpstreamTimeout { .. } => true,
            Self::UpstreamProtocol { .. } => true,
            Self::BadJson(_)
            | Self::EmptyBody
            | Self::ModelNotString
            | Self::DuplicateMember(_)
            | Self::UnsupportedMediaType(..)
            | Self::BadPath
            | Self::BodyRead(_)
            | Self::ClientGone
            | Self::MissingApiKey
            | Self::InvalidApiKey
            | Self::KeyExpired
            | Self::ModelNotAllowed(_)
            | Self::PathNotAllowed(_)
            | Self::ClientRateLimited { .. }
            | Self::QuotaExceeded { .. }
            | Self::BadField { .. }
            | Self::NoSuchItem(_)
            | Self::Conflict(_)
            | Self::Store(_)
            | Self::LimitsUnavailable
            | Self::RedisUnavailable(_)
            | Self::UnknownModel(_)
            | Self::NoModel
            | Self::NotFound(_)
            | Self::MethodNotAllowed { .. }
            | Self::BodyTooLarge(_)
            | Self::BodyTimeout(_)
            | Self::UpstreamLogin { .. }
            | Self::NoAvailableKey { .. }
            | Self::AllKeysRateLimited { .. }
            | Self::UpstreamUnavailable { .. }
            | Self::AdminUnauthorized
            | Self::ReloadFailed(_)
            | Self::Internal(_) => false,
        }
    }

    /// The message a client sees. Upstream failures are named without their
    /// cause: the cause may hold internal addresses, and it goes to the log.
    pub fn client_message(&self) -> String {
        match self {
            Self::UpstreamConnect { upstream, .. } => format!("upstream `{upstream}` is unreachable"),
            Self::UpstreamProtocol { upstream, .. } => {
                format!("upstream `{upstream}` broke off the exchange or answered with invalid HTTP")
            }
            Self::UpstreamLogin { upstream, .. } => format!("login to upstream `{upstream}` failed"),
            Self::Internal(_) => "internal error".to_string(),
            // The cause may name files; it goes to the log.
            Self::Store(_) => "the key store is unavailable".to_string(),
            Self::LimitsUnavailable | Self::RedisUnavailable(_) => self.to_string(),
            Self::BadJson(_)
            | Self::EmptyBody
            | Self::ModelNotString
            | Self::DuplicateMember(_)
            | Self::UnsupportedMediaType(..)
            | Self::BadPath
            | Self::BodyRead(_)
            | Self::ClientGone
            | Self::MissingApiKey
            | Self::InvalidApiKey
            | Self::KeyExpired
            | Self::ModelNotAllowed(_)
            | Self::PathNotAllowed(_)
            | Self::ClientRateLimited { .. }
            | Self::QuotaExceeded { .. }
            | Self::BadField { .. }
            | Self::NoSuchItem(_)
            | Self::Conflict(_)
            | Self::UnknownModel(_)
            | Self::NoModel
            | Self::NotFound(_)
            | Self::MethodNotAllowed { .. }
            | Self::BodyTooLarge(_)
            | Self::BodyTimeout(_)
            | Self::UpstreamTimeout { .. }
            | Self::NoAvailableKey { .. }
            | Self::AllKeysRateLimited { .. }
            | Self::UpstreamUnavailable { .. }
            | Self::AdminUnauthorized
            | Self::ReloadFailed(_) => self.to_string(),
        }
    }

    /// Why a client was turned away by its key or its limits, as
    /// `sluice_client_rejections_total{reason}` labels it; `None` for every
    /// other error.
    pub fn rejection(&self) -> Option<&'static str> {
        match self {
            Self::MissingApiKey | Self::InvalidApiKey => Some("invalid"),
            Self::KeyExpired => Some("expired"),
            Self::ModelNotAllowed(_) => Some("model"),
            Self::PathNotAllowed(_) => Some("path"),
            Self::ClientRateLimited { scope: CLIENT_ADDRESS, .. } => Some("per_ip"),
            Self::ClientRateLimited { per: "minute", .. } => Some("rpm"),
            Self::ClientRateLimited { .. } => Some("rph"),
            Self::QuotaExceeded { .. } => Some("quota"),
            _ => None,
        }
    }

    /// The OpenAI-shaped JSON body for this error.
    pub fn to_json(&self) -> Bytes {
        error_json(&self.client_message(), self.error_type(), self.param(), self.kind())
    }

    /// Renders the error as a complete response, in any body made from bytes.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let mut response = json_response(self.status(), self.to_json());
        let headers = response.headers_mut();
        if let Self::MethodNotAllowed { allow, .. } = self {
            // RFC 9110 wants an Allow header on 405, naming what the path takes.
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if let Self::NoAvailableKey { retry_after: Some(secs), .. }
        | Self::AllKeysRateLimited { retry_after: Some(secs), .. }
        | Self::UpstreamUnavailable { retry_after: Some(secs), .. }
        | Self::ClientRateLimited { retry_after: secs, .. }
        | Self::QuotaExceeded { retry_after: secs, .. } = self
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Self::MissingApiKey | Self::InvalidApiKey | Self::KeyExpired | Self::AdminUnauthorized = self {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The `scope` of a [`ProxyError::ClientRateLimited`] by client address.
pub const CLIENT_ADDRESS: &str = "client address";

/// Status recorded for a request whose client left before its answer
/// (nginx's "client closed request"); never sent, since nobody is listening.
pub const CLIENT_CLOSED: u16 = 499;

/// Text safe for a log line: control characters (newlines, ESC) are shown
/// escaped, so a client value can never forge or recolour a line.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Builds `{"error":{"message","type","param","code"}}`.
pub fn error_json(message: &str, error_type: &str, param: Option<&str>, code: &str) -> Bytes {
    let value = serde_json::json!({
        "error": { "message": message, "type": error_type, "param": param, "code": code }
    });
    Bytes::from(value.to_string())
}

/// A JSON response with the given status and body.
pub fn json_response<B: From<Bytes>>(status: StatusCode, body: Bytes) -> Response<B> {
    let mut response = Response::new(B::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<(ProxyError, u16)> {
        let up = || "u".to_string();
        vec![
            (ProxyError::BadJson("x".into()), 400),
            (ProxyError::EmptyBody, 400),
            (ProxyError::ModelNotString, 400),
            (ProxyError::DuplicateMember("model"), 400),
            (ProxyError::UnsupportedMediaType("/v1/chat/completions", "multipart/form-data".into()), 415),
            (ProxyError::BadPath, 400),
            (ProxyError::BodyRead("x".into()), 400),
            (ProxyError::ClientGone, 499),
            (ProxyError::NoModel, 400),
            (ProxyError::MissingApiKey, 401),
            (ProxyError::InvalidApiKey, 401),
            (ProxyError::KeyExpired, 401),
            (ProxyError::ModelNotAllowed("m".into()), 403),
            (ProxyError::PathNotAllowed("/v1/files".into()), 403),
            (ProxyError::ClientRateLimited { scope: "API key", per: "minute", limit: 5, retry_after: 3 }, 429),
            (ProxyError::QuotaExceeded { budget: 10, retry_after: 3 }, 429),
            (ProxyError::BadField { field: "name", reason: "x".into() }, 400),
            (ProxyError::NoSuchItem("key 3".into()), 404),
            (ProxyError::Conflict("x".into()), 409),
            (ProxyError::Store("x".into()), 503),
            (ProxyError::LimitsUnavailable, 503),
            (ProxyError::RedisUnavailable("x"), 503),
            (ProxyError::UnknownModel("m".into()), 404),
            (ProxyError::NotFound("/x".into()), 404),
            (ProxyError::MethodNotAllowed { method: http::Method::PUT, allow: "GET, HEAD" }, 405),
            (ProxyError::BodyTooLarge(1), 413),
            (ProxyError::BodyTimeout(1), 408),
            (ProxyError::UpstreamConnect { upstream: up(), reason: up() }, 502),
            (ProxyError::UpstreamProtocol { upstream: up(), reason: up() }, 502),
            (ProxyError::UpstreamTimeout { upstream: up(), after_ms: 1 }, 504),
            (ProxyError::UpstreamLogin { upstream: up(), reason: up() }, 502),
            (ProxyError::NoAvailableKey { upstream: up(), retry_after: Some(2) }, 503),
            (ProxyError::AllKeysRateLimited { upstream: up(), retry_after: Some(2) }, 429),
            (ProxyError::UpstreamUnavailable { upstream: up(), retry_after: None }, 503),
            (ProxyError::AdminUnauthorized, 401),
            (ProxyError::ReloadFailed("x".into()), 400),
            (ProxyError::Internal("x".into()), 500),
        ]
    }

    #[test]
    fn every_variant_has_its_status() {
        for (error, status) in all() {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
        }
    }

    #[test]
    fn body_is_openai_shaped() {
        for (error, _) in all() {
            let kind = error.kind();
            let v: serde_json::Value = serde_json::from_slice(&error.to_json()).unwrap();
            let e = &v["error"];
            assert!(e["message"].is_string());
            assert!(e["type"].is_string());
            assert!(e.get("param").is_some());
            assert_eq!(e["code"], kind);
        }
    }

    #[test]
    fn only_upstream_failures_retry() {
        for (error, status) in all() {
            let transient = matches!(
                error,
                ProxyError::UpstreamConnect { .. }
                    | ProxyError::UpstreamProtocol { .. }
                    | ProxyError::UpstreamTimeout { .. }
            );
            assert_eq!(error.is_retryable(), transient, "{error:?} ({status})");
            if transient {
                assert_eq!(error.source(), ErrorSource::Upstream);
            }
        }
    }

    #[test]
    fn client_caused_errors_are_the_clients() {
        for (error, status) in all() {
            let client = (400..500).contains(&status)
                && !matches!(error, ProxyError::AllKeysRateLimited { .. } | ProxyError::AdminUnauthorized);
            if client {
                assert_eq!(error.source(), ErrorSource::Client, "{error:?}");
            }
        }
    }

    #[test]
    fn client_messages_never_carry_the_cause() {
        let error =
            ProxyError::UpstreamConnect { upstream: "u".into(), reason: "connect to 10.1.2.3:443 failed".into() };
        let body = String::from_utf8(error.to_json().to_vec()).unwrap();
        assert!(!body.contains("10.1.2.3"), "{body}");
        assert!(error.to_string().contains("10.1.2.3"), "the log keeps the cause");
    }

    #[test]
    fn printable_escapes_control_characters_only() {
        assert_eq!(printable("gpt-4o"), "gpt-4o");
        assert_eq!(printable("a\nINFO forged\u{1b}[31m"), "a\\nINFO forged\\u{1b}[31m");
        assert!(!printable("x\r\ny").contains('\n'));
    }

    #[test]
    fn allow_names_the_paths_methods() {
        let response: Response<Bytes> =
            ProxyError::MethodNotAllowed { method: http::Method::POST, allow: "GET, HEAD" }.into_response();
        assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
    }
}
