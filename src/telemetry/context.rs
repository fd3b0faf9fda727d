//! [`RequestContext`]: the facts of one request, gathered by the pipeline
//! stages along its path and recorded once, when its response ends (see
//! [`crate::telemetry::Telemetry::finish`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Request};
use tokio::time::Instant;

use crate::ids;
use crate::telemetry::Telemetry;
use crate::telemetry::account::{Account, RateHeaders};
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

impl ConnInfo {}

/// What one client connection is doing, so the listener can end it when it
/// sits idle (no request in flight) or when its client stops reading an
/// answer (a frame handed to hyper and not taken back for the next one).
/// Plain counters, a relaxed atomic add per request and per frame and no
/// clock read: the connection's timer samples them and measures the time.
#[derive(Debug)]
pub struct ConnWatch {
    /// The connection's facts.
    pub conn: ConnInfo,
    /// `X-Forwarded-For` and `Forwarded` values naming the peer, made on the
    /// connection's first proxied request and shared by the rest (formatting
    /// an address costs more than the rest of the header work together).
    pub forwarded: std::sync::OnceLock<[HeaderValue; 2]>,
    in_flight: AtomicUsize,
    /// Answers whose last frame the client has not taken yet.
    unread: AtomicUsize,
    /// Bumped by every request's end and every frame the client takes.
    progress: AtomicU64,
}

/// A sample of a [`ConnWatch`], for the connection's timer to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnState {
    /// Requests in flight.
    pub in_flight: usize,
    /// Answers waiting for the client to take a frame.
    pub unread: usize,
    /// The progress counter.
    pub progress: u64,
}

impl ConnWatch {
    /// The watch of a new connection.
    pub fn new(conn: ConnInfo) -> Self {
        Self {
            conn,
            forwarded: std::sync::OnceLock::new(),
            in_flight: AtomicUsize::new(0),
            unread: AtomicUsize::new(0),
            progress: AtomicU64::new(0),
        }
    }

    /// A request began on the connection.
    fn begin_request(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    /// A request ended (answer done or abandoned).
    fn end_request(&self) {
        self.progress.fetch_add(1, Relaxed);
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// An answer handed a frame on to be written to the client.
    pub fn handed(&self) {
        self.unread.fetch_add(1, Relaxed);
    }

    /// The client took the frame (hyper asked for the next one), or the
    /// answer ended.
    pub fn taken(&self) {
        self.progress.fetch_add(1, Relaxed);
        self.unread.fetch_sub(1, Relaxed);
    }

    /// The counters now.
    pub fn sample(&self) -> ConnState {
        ConnState {
            in_flight: self.in_flight.load(Relaxed),
            unread: self.unread.load(Relaxed),
            progress: self.progress.load(Relaxed),
        }
    }
}

/// What the response cache did with a request it could have answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Answered from the cache (or a single flight's leader).
    Hit,
    /// Went upstream; the answer is stored if it ends well.
    Miss,
    /// The client asked to skip the cache, or the model opted out.
    Bypass,
}

impl CacheStatus {
    /// `x-sluice-cache` and request-log value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
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
    /// The connection the request came on, with its facts (`None` for
    /// internal requests: probes, `sluice chat`).
    pub watch: Option<Arc<ConnWatch>>,
    /// The authenticated client: how logs name it, and who is charged.
    pub client: Option<Arc<dyn Account>>,
    /// The `x-ratelimit-*` values of the answer, when the client's key is limited.
    pub rate: Option<RateHeaders>,
    /// A tenant's key (not the operator's): the upstream's own rate-limit
    /// headers, which describe the shared account, are not passed on.
    pub tenant: bool,
    /// What the response cache did, for a request it could have answered.
    pub cache: Option<CacheStatus>,
    /// A cache hit's tokens (cached, not the upstream's).
    pub cached_tokens: Option<(u64, u64)>,
    /// The routed model's counters.
    pub model: Option<Arc<ModelMetrics>>,
    /// The upstream that served it (or was tried last).
    pub upstream: Option<Arc<str>>,
    /// The upstream's name as a header value, for `x-sluice-upstream`.
    pub upstream_header: Option<HeaderValue>,
    /// The model name sent there, for `x-sluice-model` and the request log.
    pub upstream_model: Option<HeaderValue>,
    /// The `max_tokens` the request was lowered to by the model's cap.
    pub max_tokens_capped: Option<u64>,
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
    /// An HTTP/1 request whose body was not read to the end (yet): hyper
    /// closes its connection after the answer, so an error answer says so.
    pub body_unread: bool,
    /// Counts the request in flight until the last copy of the context (the
    /// handler's, or the metered body's) is gone, even if hyper drops the
    /// handler mid-way because the client left.
    pub in_flight: Arc<InFlight>,
}

/// One request in the in-flight gauge (and its connection's count);
/// dropping it takes the request out.
pub struct InFlight(Arc<Telemetry>, Option<Arc<ConnWatch>>);

impl InFlight {
    fn new(telemetry: Arc<Telemetry>, watch: Option<Arc<ConnWatch>>) -> Arc<Self> {
        telemetry.metrics.in_flight.add(1);
        if let Some(watch) = &watch {
            watch.begin_request();
        }
        Arc::new(Self(telemetry, watch))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.add(-1);
        if let Some(watch) = &self.1 {
            watch.end_request();
        }
    }
}

impl RequestContext {
    /// Where the request is recorded (held by its in-flight count: one
    /// reference to the process's telemetry a request, not two).
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.in_flight.0
    }

    /// The context of a request that just arrived on the connection `watch`
    /// watches (`None` for internal requests).
    pub fn new<B>(telemetry: Arc<Telemetry>, request: &Request<B>, watch: Option<Arc<ConnWatch>>) -> Self {
        Self {
            in_flight: InFlight::new(telemetry, watch.clone()),
            watch,
            request_id: ids::request_id(request.headers()),
            started: Instant::now(),
            arrived: SystemTime::now(),
            method: request.method().clone(),
            path: Arc::from(request.uri().path()),
            endpoint: Endpoint::of(request.uri().path()),
            client: None,
            rate: None,
            tenant: false,
            cache: None,
            cached_tokens: None,
            model: None,
            upstream: None,
            upstream_header: None,
            upstream_model: None,
            max_tokens_capped: None,
            attempts: 0,
            upstream_wait: Duration::ZERO,
            ttfb: None,
            bytes_in: 0,
            stream: false,
            overhead_header: false,
            body_unread: false,
        }
    }
}
