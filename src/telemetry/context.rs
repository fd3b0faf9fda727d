//! [`RequestContext`]: the facts of one request, gathered by the pipeline
//! stages along its path and recorded once, when its response ends (see
//! [`crate::telemetry::Telemetry::finish`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Request};
use tokio::time::Instant;

use crate::ids;
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::{Endpoint, ModelMetrics};

/// What the listener knows about the connection a request came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// The client's address (before any proxy header is believed).
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// HTTP/2 rather than HTTP/1.x.
    pub http2: bool,
}

impl ConnInfo {
    /// A connection from nowhere: internal requests (probes, `sluice chat`).
    pub fn internal() -> Self {
        Self { peer: SocketAddr::from(([127, 0, 0, 1], 0)), tls: false, http2: false }
    }
}

/// The facts of one request.
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
    /// The endpoint class, for metrics.
    pub endpoint: Endpoint,
    /// The connection the request came on.
    pub conn: ConnInfo,
    /// Where the request is recorded.
    pub telemetry: Arc<Telemetry>,
    /// The authenticated client, as the request log names it (a key id).
    pub client: Option<Arc<str>>,
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
        telemetry.metrics.in_flight.fetch_add(1, Relaxed);
        Arc::new(Self(telemetry))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.fetch_sub(1, Relaxed);
    }
}

impl RequestContext {
    /// The context of a request that just arrived on `conn`.
    pub fn new<B>(telemetry: Arc<Telemetry>, request: &Request<B>, conn: ConnInfo) -> Self {
        Self {
            in_flight: InFlight::new(Arc::clone(&telemetry)),
            request_id: ids::request_id(request.headers()),
            started: Instant::now(),
            arrived: SystemTime::now(),
            method: request.method().clone(),
            path: Arc::from(request.uri().path()),
            endpoint: Endpoint::of(request.uri().path()),
            conn,
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
