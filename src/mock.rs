//! The bundled mock OpenAI upstream: used by the tests, `sluice demo` and the
//! load tests, so it must be fast and it must count.
//!
//! Endpoints: `POST /v1/chat/completions` (JSON with `usage`, or paced SSE),
//! `POST /v1/completions`, `POST /v1/embeddings`, `GET /v1/models`, `POST /auth/login`
//! (answers `{"token":"tok-N"}` for the N-th login); `GET /_stats`
//! (hits per key, path, status; streams started/finished/cancelled/dropped),
//! `POST /_control` (standing faults, see [`Faults`]), `POST /_reset`.
//! Per-request headers: `x-mock-latency-ms`, `x-mock-status`, `x-mock-chunks`,
//! `x-mock-gap-ms`, `x-mock-drop-after`, `x-mock-echo` (answer with the request).
//!
//! The key of a request is its `Authorization: Bearer` token, else its
//! `api-key` (Azure) or `x-api-key` header. Azure paths
//! (`/openai/deployments/{name}/chat/completions`) are answered as the
//! OpenAI ones and counted under their own path.

pub mod faults;
pub mod sse;
pub mod stats;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::error::{BoxError, error_json};
use crate::server::{Limits, serve_service};
use crate::telemetry::metrics::ConnStats;
pub use faults::{Faults, KeyFault, RateFault};
use sse::SseStream;
use stats::MockStats;
pub use stats::StatsSnapshot;

/// The mock takes many concurrent h2 streams on one connection, and as many
/// resets, so a load test of thousands of streams over h2c (whose clients all
/// leave at the deadline) measures the gateway, not these limits.
pub const MOCK_H2_MAX_STREAMS: u32 = 10_000;

/// The mock's shared state.
pub struct MockState {
    stats: Arc<MockStats>,
    conns: Arc<ConnStats>,
    faults: ArcSwap<Faults>,
    /// Request sequence, for ids and for drawing rate faults.
    seq: AtomicU64,
    /// Logins served by `POST /auth/login`.
    logins: AtomicU64,
}

impl MockState {
    /// A copy of every counter.
    pub fn stats(&self) -> StatsSnapshot {
        let conns = &self.conns;
        self.stats.snapshot(conns.accepted.load(Ordering::Relaxed) as u64, conns.open.load(Ordering::Relaxed) as u64)
    }

    /// Replaces the standing faults.
    pub fn set_faults(&self, faults: Faults) {
        self.faults.store(Arc::new(faults));
    }

    /// Zeroes the counters (connection count and id sequence included) and clears the faults.
    pub fn reset(&self) {
        self.stats.reset();
        self.conns.accepted.store(0, Ordering::Relaxed);
        self.seq.store(0, Ordering::Relaxed);
        self.faults.store(Arc::new(Faults::default()));
    }
}

/// A running mock.
pub struct MockServer {
    /// Bound address.
    pub addr: SocketAddr,
    /// Its state, for in-process tests.
    pub state: Arc<MockState>,
    scheme: &'static str,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl MockServer {
    /// Starts a mock on `addr` (use port 0 for a free port).
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self::serve(listener))
    }

    /// Serves on an already bound listener, in the background.
    pub fn serve(listener: TcpListener) -> Self {
        Self::serve_with(listener, None)
    }

    /// Serves TLS on an already bound listener, in the background; the
    /// acceptor's ALPN list says which protocols clients may pick.
    pub fn serve_tls(listener: TcpListener, tls: tokio_rustls::TlsAcceptor) -> Self {
        Self::serve_with(listener, Some(tls))
    }

    /// Serves (TLS if `tls`) with at most `max_streams` concurrent HTTP/2
    /// streams a connection, as providers set some limit.
    pub fn serve_limited(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, max_streams: u32) -> Self {
        Self::serve_full(listener, tls, max_streams)
    }

    fn serve_with(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        Self::serve_full(listener, tls, MOCK_H2_MAX_STREAMS)
    }

    fn serve_full(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, max_streams: u32) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let addr = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let conns = Arc::new(ConnStats::default());
        let state = Arc::new(MockState {
            stats: Arc::new(MockStats::default()),
            conns: Arc::clone(&conns),
            faults: ArcSwap::from_pointee(Faults::default()),
            seq: AtomicU64::new(0),
            logins: AtomicU64::new(0),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = MockService(Arc::clone(&state));
        tokio::spawn(serve_service(
            listener,
            tls,
            move |_| service.clone(),
            conns,
            async move {
                let _ = stopped.await;
            },
            || {},
            Duration::from_secs(1),
            Limits { max_streams, max_pending_resets: MOCK_H2_MAX_STREAMS as usize, ..Limits::default() },
            None,
        ));
        Self { addr, state, scheme, stop: Some(stop) }
    }

    /// The base URL an upstream config points at (`http://ADDR/v1`, or
    /// `https://ADDR/v1` over TLS).
    pub fn base_url(&self) -> String {
        format!("{}://{}/v1", self.scheme, self.addr)
    }

    /// Stops accepting; open connections are given a second to finish.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The mock's answer body: a complete buffer or a paced stream.
pub enum MockBody {
    /// A complete answer.
    Full(Option<Bytes>),
    /// A streaming chat answer.
    Sse(SseStream),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Sse(stream) => Pin::new(stream).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Sse(stream) => stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Sse(_) => SizeHint::default(),
        }
    }
}

#[derive(Clone)]
struct MockService(Arc<MockState>);

impl hyper::service::Service<Request<Incoming>> for MockService {
    type Response = Response<MockBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<MockBody>, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let state = Arc::clone(&self.0);
        Box::pin(async move { Ok(answer(&state, request).await) })
    }
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<MockBody> {
    let mut response = Response::new(MockBody::Full(Some(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: &str) -> Response<MockBody> {
    error_coded(status, message, "mock_fault")
}

fn error_coded(status: StatusCode, message: &str, code: &str) -> Response<MockBody> {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    json(status, error_json(message, kind, None, code))
}

/// The fields of a chat request the mock looks at.
#[derive(Deserialize, Default)]
struct ChatRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

async fn answer(state: &MockState, request: Request<Incoming>) -> Response<MockBody> {
    let path = request.uri().path().to_string();
    if path.starts_with("/_") {
        return control(state, request).await;
    }
    let stats = &state.stats;
    let n = state.seq.fetch_add(1, Ordering::Relaxed);
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if request.version() == Version::HTTP_2 {
        stats.http2_requests.fetch_add(1, Ordering::Relaxed);
    }
    let key = request_key(request.headers());
    let used = stats.by_key.hit(&key);
    stats.by_path.hit(&path);
    let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    stats.peak_in_flight.fetch_max(now, Ordering::Relaxed);
    let faults = state.faults.load_full();
    let mut response = match faults.quota.get(&key) {
        Some(&quota) if used > quota => error(StatusCode::TOO_MANY_REQUESTS, "mock: this key's quota is spent"),
        _ => respond(state, &faults, request, &key, openai_path(&path), n).await,
    };
    if let Some(&quota) = faults.quota.get(&key) {
        let headers = response.headers_mut();
        headers.insert("x-ratelimit-remaining-requests", HeaderValue::from(quota.saturating_sub(used)));
        let reset = faults.quota_reset.as_deref().and_then(|v| HeaderValue::from_str(v).ok());
        headers.insert("x-ratelimit-reset-requests", reset.unwrap_or(HeaderValue::from_static("60s")));
    }
    stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    stats.by_status.hit(response.status().as_str());
    response
}

/// The key a request carries: `Authorization: Bearer`, `api-key` or `x-api-key`.
fn request_key(headers: &http::HeaderMap) -> String {
    let bearer = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    bearer
        .or_else(|| headers.get("api-key").and_then(|v| v.to_str().ok()))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .unwrap_or("-")
        .to_string()
}

/// The OpenAI path an Azure deployment path stands for
/// (`/openai/deployments/NAME/chat/completions` -> `/v1/chat/completions`).
fn openai_path(path: &str) -> &str {
    path.strip_prefix("/openai/deployments/").and_then(|rest| rest.find('/').map(|slash| &rest[slash..])).map_or(
        path,
        |tail| match tail {
            "/chat/completions" => "/v1/chat/completions",
            "/completions" => "/v1/completions",
            "/embeddings" => "/v1/embeddings",
            _ => path,
        },
    )
}

async fn respond(
    state: &MockState,
    faults: &Faults,
    request: Request<Incoming>,
    key: &str,
    path: &str,
    n: u64,
) -> Response<MockBody> {
    let shape = faults.shape(request.headers());
    if shape.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(shape.latency_ms)).await;
    }
    if let Some(fault) = faults.keys.get(key) {
        let mut response = error_coded(
            StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "mock: fault for this key",
            fault.code.as_deref().unwrap_or("mock_fault"),
        );
        if let Some(retry_after) = fault.retry_after.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            response.headers_mut().insert(RETRY_AFTER, retry_after);
        }
        return response;
    }
    if let Some(rate) = &faults.error_rate
        && Faults::rate_hits(rate, n)
    {
        return error(
            StatusCode::from_u16(rate.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "mock: fault at a rate",
        );
    }
    if let Some(status) = shape.status.and_then(|s| StatusCode::from_u16(s).ok()) {
        return error(status, "mock: status asked by x-mock-status");
    }
    if shape.echo {
        return echo(request).await;
    }
    let method = request.method().clone();
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "mock: could not read body"),
    };
    if let Some(limit) = faults.max_request_bytes.filter(|limit| body.len() as u64 > *limit) {
        let message = format!(
            "Request too large for mock in organization org-mock on tokens per min (TPM): Limit {limit}, \
             Requested {}. The input or output tokens must be reduced in order to run successfully.",
            body.len()
        );
        return json(StatusCode::TOO_MANY_REQUESTS, error_json(&message, "tokens", None, "rate_limit_exceeded"));
    }
    match (method, path) {
        (Method::POST, "/v1/chat/completions") => {
            let Ok(chat) = serde_json::from_slice::<ChatRequest>(&body) else {
                return error(StatusCode::BAD_REQUEST, "mock: body is not a chat request");
            };
            let prompt_tokens = (body.len() as u64 / 4).max(1);
            if chat.stream {
                let include_usage = chat.stream_options.is_some_and(|o| o.include_usage);
                let stream = SseStream::new(
                    Arc::clone(&state.stats),
                    n,
                    chat.model,
                    shape.chunks,
                    include_usage,
                    prompt_tokens,
                    Duration::from_millis(shape.gap_ms),
                    shape.drop_after,
                );
                let mut response = Response::new(MockBody::Sse(stream));
                response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                return response;
            }
            let completion = 7;
            json(
                StatusCode::OK,
                format!(
                    r#"{{"id":"chatcmpl-mock-{n}","object":"chat.completion","created":0,"model":"{}","choices":[{{"index":0,"message":{{"role":"assistant","content":"Hello from the sluice mock."}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{prompt_tokens},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
                    chat.model,
                    prompt_tokens + completion
                ),
            )
        }
        (Method::POST, "/v1/completions") => {
            let model = serde_json::from_slice::<ChatRequest>(&body).map(|c| c.model).unwrap_or_default();
            json(
                StatusCode::OK,
                format!(
                    r#"{{"id":"cmpl-mock-{n}","object":"text_completion","created":0,"model":"{model}","choices":[{{"index":0,"text":"Hello from the sluice mock.","finish_reason":"stop"}}],"usage":{{"prompt_tokens":1,"completion_tokens":7,"total_tokens":8}}}}"#
                ),
            )
        }
        (Method::POST, "/v1/embeddings") => {
            let model = serde_json::from_slice::<ChatRequest>(&body).map(|c| c.model).unwrap_or_default();
            json(
                StatusCode::OK,
                format!(
                    r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":[0.1,0.2,0.3]}}],"model":"{model}","usage":{{"prompt_tokens":1,"total_tokens":1}}}}"#
                ),
            )
        }
        (Method::POST, "/auth/login") => {
            // Tokens are numbered by login: the first login yields `tok-1`.
            let login = state.logins.fetch_add(1, Ordering::Relaxed) + 1;
            json(StatusCode::OK, format!(r#"{{"token":"tok-{login}","expires_in":28800}}"#))
        }
        (Method::GET, "/v1/models") => json(
            StatusCode::OK,
            r#"{"object":"list","data":[{"id":"mock-model","object":"model","created":0,"owned_by":"mock"}]}"#,
        ),
        _ => error(StatusCode::NOT_FOUND, "mock: no such endpoint"),
    }
}

/// Answers with the request as the mock saw it: method, path, query, headers, body.
async fn echo(request: Request<Incoming>) -> Response<MockBody> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(name, value)| (name.to_string(), String::from_utf8_lossy(value.as_bytes()).into()))
        .collect();
    let value = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    json(StatusCode::OK, value.to_string())
}

async fn control(state: &MockState, request: Request<Incoming>) -> Response<MockBody> {
    match (request.method().clone(), request.uri().path()) {
        (Method::GET, "/_stats") => match serde_json::to_vec(&state.stats()) {
            Ok(body) => json(StatusCode::OK, body),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        },
        (Method::POST, "/_control") => {
            let body = request.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            match serde_json::from_slice::<Faults>(&body) {
                Ok(faults) => {
                    state.set_faults(faults);
                    json(StatusCode::OK, r#"{"ok":true}"#)
                }
                Err(e) => error(StatusCode::BAD_REQUEST, &format!("mock: bad faults: {e}")),
            }
        }
        (Method::POST, "/_reset") => {
            state.reset();
            json(StatusCode::OK, r#"{"ok":true}"#)
        }
        _ => error(StatusCode::NOT_FOUND, "mock: no such control endpoint"),
    }
}
