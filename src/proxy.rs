//! The forward path: read the request body once under the cap, sniff `model`
//! and `stream`, route, rewrite only when a field must change, swap the client's
//! credential for an upstream key, send over the pooled client, and hand the
//! upstream body back frame by frame.

pub mod body;
pub mod breaker;
pub mod h1;
pub mod headers;
pub mod keyring;
pub mod retry;
pub mod retry_after;
pub mod sniff;
pub mod token;
pub mod upstream;

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::body::{ForwardBody, SluiceBody};
use crate::error::ProxyError;
use crate::routes::Route;
use crate::state::Live;
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::{ModelMetrics, Route as MetricRoute};
use retry::Plan;
use upstream::Upstream;

/// Longest time a client may take to send its request body. Past it: 408.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Paths whose body must be a JSON object that names (or defaults) a model.
const MODEL_ENDPOINTS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];

/// Whether `path` is one of the endpoints that always carry a model.
pub fn is_model_endpoint(path: &str) -> bool {
    MODEL_ENDPOINTS.contains(&path)
}

/// The facts of one request, gathered along its path and recorded once when its
/// response ends (see [`crate::telemetry::Telemetry::finish`]).
#[derive(Clone)]
pub struct RequestContext {
    /// `x-request-id`, taken from the client or generated.
    pub request_id: HeaderValue,
    /// When sluice received the request.
    pub started: Instant,
    /// Wall-clock arrival, for the request log.
    pub arrived: SystemTime,
    /// Method.
    pub method: Method,
    /// The request path (never the query: it may carry `api_key`). Copied out
    /// of the request: a `Uri` would share, and so keep alive for the whole
    /// response, hyper's 8 KiB read buffer that the request head was parsed in.
    pub path: Arc<str>,
    /// Route label for metrics.
    pub route: MetricRoute,
    /// Where the request is recorded.
    pub telemetry: Arc<Telemetry>,
    /// Client key index, once authenticated.
    pub client: Option<usize>,
    /// The routed model's counters.
    pub model: Option<Arc<ModelMetrics>>,
    /// The upstream that served it.
    pub upstream: Option<Arc<str>>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// Time spent waiting on the upstream (headers, backoffs): not sluice's overhead.
    pub upstream_wait: Duration,
    /// Time to the answering attempt's headers.
    pub ttfb: Option<Duration>,
    /// Request body bytes read.
    pub bytes_in: u64,
    /// `"stream": true`.
    pub stream: bool,
    /// Add `x-sluice-overhead-us` to proxied answers.
    pub overhead_header: bool,
    /// Counts the request in flight until the last copy of the context (the
    /// handler's, or the metered body's) is gone, even if hyper drops the
    /// handler mid-way because the client left.
    pub in_flight: Arc<InFlight>,
}

/// One request in the in-flight gauge; dropping it takes the request out.
pub struct InFlight(Arc<Telemetry>);

impl InFlight {
    fn new(telemetry: Arc<Telemetry>) -> Arc<Self> {
        telemetry.metrics.in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Arc::new(Self(telemetry))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl RequestContext {
    /// The context of a request that just arrived.
    pub fn new<B>(telemetry: Arc<Telemetry>, request: &Request<B>) -> Self {
        Self {
            in_flight: InFlight::new(Arc::clone(&telemetry)),
            request_id: headers::request_id(request.headers()),
            started: Instant::now(),
            arrived: SystemTime::now(),
            method: request.method().clone(),
            path: Arc::from(request.uri().path()),
            route: MetricRoute::of(request.uri().path()),
            telemetry,
            client: None,
            model: None,
            upstream: None,
            attempts: 0,
            upstream_wait: Duration::ZERO,
            ttfb: None,
            bytes_in: 0,
            stream: false,
            overhead_header: false,
        }
    }
}

/// Forwards one `/v1/*` request to its upstream.
pub async fn forward(
    live: &Live,
    request: Request<Incoming>,
    ctx: &mut RequestContext,
) -> Result<Response<SluiceBody>, ProxyError> {
    let (parts, body) = request.into_parts();
    let max_body = live.config.server.max_body;
    let plan = if carries_json(&parts) {
        let bytes = read_body(body, &parts, max_body).await?;
        ctx.bytes_in = bytes.len() as u64;
        let plan = plan_json(live, parts.uri.path(), bytes)?;
        ctx.stream = plan.stream;
        ctx.model = plan.model.clone();
        plan
    } else {
        // Uploads and body-less requests: not ours to read; streamed through under the cap.
        let upstream = live.fallback_upstream().ok_or(ProxyError::NoModel)?;
        if declared_length(&parts).is_some_and(|len| len > max_body) {
            return Err(ProxyError::BodyTooLarge(max_body));
        }
        Plan {
            upstream: Arc::clone(upstream),
            body: ForwardBody::Stream { inner: Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX)) },
            body_rewritten: false,
            stream: false,
            model: None,
        }
    };
    retry::send(plan, parts.method, parts.uri, parts.headers, ctx).await
}

/// A POST whose body sluice reads: declared JSON, no content type at all, or
/// anything but an upload on a model endpoint (curl's `-d` says form-urlencoded
/// while sending JSON; such bodies must still be routed, not passed blindly).
fn carries_json(parts: &Parts) -> bool {
    if parts.method != Method::POST {
        return false;
    }
    let Some(content_type) = parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let upload = essence.starts_with("multipart/") || essence.eq_ignore_ascii_case("application/octet-stream");
    essence.eq_ignore_ascii_case("application/json")
        || essence.ends_with("+json")
        || (is_model_endpoint(parts.uri.path()) && !upload)
}

fn declared_length(parts: &Parts) -> Option<u64> {
    parts.headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Reads the whole body under the cap. A declared length past the cap is refused
/// before a byte is read; an undeclared one is cut off at the cap.
async fn read_body(body: Incoming, parts: &Parts, max_body: u64) -> Result<Bytes, ProxyError> {
    if declared_length(parts).is_some_and(|len| len > max_body) {
        return Err(ProxyError::BodyTooLarge(max_body));
    }
    let limited = Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX));
    match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
        Err(_) => Err(ProxyError::BodyTimeout(BODY_READ_TIMEOUT.as_secs())),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(ProxyError::BodyTooLarge(max_body)),
        Ok(Err(error)) => Err(ProxyError::BodyRead(error.to_string())),
    }
}

/// Routes a JSON body and rewrites it if the route asks for it.
pub(crate) fn plan_json(live: &Live, path: &str, bytes: Bytes) -> Result<Plan, ProxyError> {
    let model_endpoint = is_model_endpoint(path);
    if bytes.is_empty() && !model_endpoint {
        let upstream = live.fallback_upstream().ok_or(ProxyError::NoModel)?;
        return Ok(Plan {
            upstream: Arc::clone(upstream),
            body: ForwardBody::full(bytes),
            body_rewritten: false,
            stream: false,
            model: None,
        });
    }
    if bytes.is_empty() {
        return Err(ProxyError::EmptyBody);
    }
    let routes = &live.routes;
    let sniffed = sniff::sniff(&bytes, &routes.param_names)?;
    let (route, new_model, insert_model): (&Route, Option<&str>, Option<String>) = match sniffed.model.as_deref() {
        Some(model) => {
            let route = routes.get(model).ok_or_else(|| ProxyError::UnknownModel(model.to_string()))?;
            let rename = match (&route.target, &route.target_json) {
                (Some(target), Some(json)) if target.as_ref() != model => Some(json.as_ref()),
                _ => None,
            };
            (route, rename, None)
        }
        None if !model_endpoint => {
            let upstream = live.fallback_upstream().ok_or(ProxyError::NoModel)?;
            return Ok(Plan {
                upstream: Arc::clone(upstream),
                body: ForwardBody::full(bytes.clone()),
                body_rewritten: false,
                stream: sniffed.stream,
                model: None,
            });
        }
        None => {
            let (name, route) = routes.default_route().ok_or(ProxyError::NoModel)?;
            let json = match &route.target_json {
                Some(json) => json.to_string(),
                None => serde_json::Value::from(name).to_string(),
            };
            (route, None, Some(format!("\"model\":{json}")))
        }
    };
    let upstream = Arc::clone(&live.upstreams[route.upstream]);
    let missing_defaults = route.defaults.iter().filter(|(bit, _)| sniffed.present & (1 << bit) == 0);
    if new_model.is_none() && insert_model.is_none() && missing_defaults.clone().next().is_none() {
        return Ok(Plan {
            upstream,
            body: ForwardBody::full(bytes.clone()),
            body_rewritten: false,
            stream: sniffed.stream,
            model: Some(Arc::clone(&route.metrics)),
        });
    }
    let mut inserts: Vec<&[u8]> = Vec::with_capacity(route.defaults.len() + 1);
    inserts.extend(insert_model.as_deref().map(str::as_bytes));
    inserts.extend(missing_defaults.map(|(_, member)| member.as_ref()));
    let rewritten = sniff::splice(&bytes, &sniffed, new_model, &inserts);
    let model = Some(Arc::clone(&route.metrics));
    Ok(Plan { upstream, body: ForwardBody::full(rewritten), body_rewritten: true, stream: sniffed.stream, model })
}

/// Maps a pooled-client failure to the gateway's error, with the cause chain
/// (which never holds headers or keys) for the log.
pub(crate) fn client_error(upstream: &Upstream, error: &hyper_util::client::legacy::Error) -> ProxyError {
    let mut reason = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    let upstream = upstream.name.to_string();
    if error.is_connect() {
        ProxyError::UpstreamConnect { upstream, reason }
    } else {
        ProxyError::UpstreamProtocol { upstream, reason }
    }
}
