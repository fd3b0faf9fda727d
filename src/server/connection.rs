//! One client connection, from accept to close: the TLS handshake (ALPN
//! picks the protocol) or a peek at the first bytes (HTTP/1.1 or h2c prior
//! knowledge on the same port), both bounded in time and cut short by the
//! drain; then hyper's connection, watched so that it ends when it sits idle
//! or when its client stops reading an answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::rt::{Read, Write};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::error::BoxError;
use crate::server::Limits;
use crate::telemetry::metrics::ConnStats;
use crate::telemetry::{ConnInfo, ConnWatch};

/// Time a client gets to send a request's headers on HTTP/1.1 (hyper's
/// header-read timer; it also ends keep-alive connections that stay quiet).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait between two looks at a first packet that held only part
/// of the HTTP/2 preface (rare: a client writing it in pieces).
const SPLIT_PREFACE_WAIT: Duration = Duration::from_millis(5);

/// How long an idle connection gets to finish closing gracefully (an HTTP/2
/// peer answers the closing ping within a round trip) before it is dropped.
const IDLE_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The HTTP/2 connection preface a client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which protocol a new connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// Anything but the HTTP/2 preface, or TLS without `h2` in ALPN.
    Http1,
    /// The whole HTTP/2 preface (h2c with prior knowledge), or ALPN `h2`.
    Http2,
    /// A strict prefix of the preface so far: the client sent it in pieces.
    Unsure,
    /// The client closed without a byte, or the drain began first.
    Closed,
}

pub(crate) fn classify(first: &[u8]) -> Protocol {
    if first.is_empty() {
        Protocol::Closed
    } else if !H2_PREFACE.starts_with(first) {
        Protocol::Http1
    } else if first.len() == H2_PREFACE.len() {
        Protocol::Http2
    } else {
        Protocol::Unsure
    }
}

/// Looks at a connection's first bytes without consuming them, until they
/// say which protocol it speaks. Peeking lets each connection run hyper's
/// HTTP/1.1 or HTTP/2 connection directly on the socket (no rewinding
/// adapter, no task sized for both protocols).
async fn sniff_protocol(stream: &TcpStream, stats: &ConnStats) -> std::io::Result<Protocol> {
    let mut first = [0u8; H2_PREFACE.len()];
    let mut counted = false;
    loop {
        let n = stream.peek(&mut first).await?;
        match classify(&first[..n]) {
            Protocol::Unsure => {
                if !std::mem::replace(&mut counted, true) {
                    stats.split_preface.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(SPLIT_PREFACE_WAIT).await;
            }
            decided => return Ok(decided),
        }
    }
}

/// The hyper connection builders, configured once per listener.
pub(crate) struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Protocols {
    pub(crate) fn new(limits: &Limits) -> Self {
        let header_bytes = usize::try_from(limits.max_header_bytes).unwrap_or(usize::MAX).max(8192);
        let mut http1 = http1::Builder::new();
        http1.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(header_bytes);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_streams)
            .max_pending_accept_reset_streams(limits.max_pending_resets)
            .max_header_list_size(u32::try_from(header_bytes).unwrap_or(u32::MAX))
            // Pings find dead peers; the idle watch below ends quiet live ones.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        Self { http1, http2 }
    }
}

/// What every connection of one listener shares.
pub(crate) struct Listening<F> {
    pub(crate) protocols: Protocols,
    pub(crate) make_service: F,
    pub(crate) tls: Option<TlsAcceptor>,
    pub(crate) stats: Arc<ConnStats>,
    pub(crate) limits: Limits,
}

/// Serves one accepted socket until it closes.
pub(crate) async fn serve<S, B, F>(
    listening: &Listening<F>,
    stream: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    F: Fn(Arc<ConnWatch>) -> S,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let Some(acceptor) = &listening.tls else {
        let sniffed = tokio::select! {
            sniffed = tokio::time::timeout(listening.limits.handshake_timeout, sniff_protocol(&stream, &listening.stats)) => sniffed,
            _ = stop.wait_for(|stopping| *stopping) => return Ok(()),
        };
        let Ok(protocol) = sniffed else {
            return Err("no protocol shown within handshake_timeout".into());
        };
        return drive(listening, TokioIo::new(stream), protocol?, peer, false, stop).await;
    };
    // Boxed: a task is sized for its largest state, and a TLS connection
    // (rustls state inline) would make every plain connection's task that large.
    Box::pin(serve_tls(listening, acceptor, stream, peer, stop)).await
}

/// The TLS half of [`serve`]: handshake, then ALPN picks the protocol.
async fn serve_tls<S, B, F>(
    listening: &Listening<F>,
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    F: Fn(Arc<ConnWatch>) -> S,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let handshake = tokio::select! {
        shaken = tokio::time::timeout(listening.limits.handshake_timeout, acceptor.accept(stream)) => shaken,
        _ = stop.wait_for(|stopping| *stopping) => return Ok(()),
    };
    let Ok(stream) = handshake else {
        return Err("TLS handshake not done within handshake_timeout".into());
    };
    let stream = stream?;
    let protocol = if stream.get_ref().1.alpn_protocol() == Some(b"h2") { Protocol::Http2 } else { Protocol::Http1 };
    drive(listening, TokioIo::new(stream), protocol, peer, true, stop).await
}

/// Runs hyper's connection for `protocol` on `io` under the connection watch.
async fn drive<S, B, F, I>(
    listening: &Listening<F>,
    io: I,
    protocol: Protocol,
    peer: SocketAddr,
    tls: bool,
    stop: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    F: Fn(Arc<ConnWatch>) -> S,
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    I: Read + Write + Unpin + Send + 'static,
{
    let watch = Arc::new(ConnWatch::new(ConnInfo { peer, tls, http2: protocol == Protocol::Http2 }));
    let service = (listening.make_service)(Arc::clone(&watch));
    let limits = &listening.limits;
    match protocol {
        Protocol::Http1 => {
            let connection = listening.protocols.http1.serve_connection(io, service);
            guard(connection, &watch, limits, stop).await
        }
        // Boxed: a task is sized for its largest state, and hyper's h2
        // connection is more than twice an HTTP/1.1 one. Inline, every
        // HTTP/1.1 task would be that large.
        Protocol::Http2 => {
            let connection = listening.protocols.http2.serve_connection(io, service);
            Box::pin(guard(connection, &watch, limits, stop)).await
        }
        Protocol::Unsure | Protocol::Closed => Ok(()),
    }
}

/// Drives a connection to its end, and ends it early: gracefully when the
/// drain begins or it has been idle for `idle_timeout`; at once when an
/// answer has waited `send_timeout` for a client that reads nothing (which
/// drops the answer, and with it the upstream request and its key). The
/// timer samples the watch's counters; the request path reads no clock.
async fn guard<C>(
    connection: C,
    watch: &ConnWatch,
    limits: &Limits,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    C: GracefulConnection,
    C::Error: Into<BoxError>,
{
    let mut connection = std::pin::pin!(connection);
    let every =
        (limits.idle_timeout.min(limits.send_timeout) / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    // One timer per connection: the next check, or once a graceful close of
    // a connection with nothing in flight began (idle past `idle_timeout`,
    // or draining), the moment it is dropped if the peer has not finished
    // (an HTTP/2 peer that never answers the closing ping).
    let wait = IDLE_CLOSE_WAIT.min(limits.handshake_timeout);
    let timer = tokio::time::sleep(every);
    let mut timer = std::pin::pin!(timer);
    let (mut closing, mut draining, mut shut) = (false, false, false);
    // The drain signal, made once and polled in place (the channel only ever
    // turns true once). A drain that began before this point is seen here.
    if *stop.borrow_and_update() {
        draining = true;
        shut = true;
        connection.as_mut().graceful_shutdown();
    }
    let stopped = stop.changed();
    let mut stopped = std::pin::pin!(stopped);
    // The last sample that changed, and when it was taken.
    let (mut seen, mut since) = (watch.sample(), Instant::now());
    loop {
        tokio::select! {
            biased;
            result = connection.as_mut() => return result.map_err(Into::into),
            _ = stopped.as_mut(), if !draining => {
                draining = true;
                if !shut {
                    shut = true;
                    connection.as_mut().graceful_shutdown();
                }
                if !closing && watch.sample().in_flight == 0 {
                    closing = true;
                    timer.as_mut().reset(Instant::now() + wait);
                }
            }
            () = timer.as_mut() => {
                if closing {
                    if watch.sample().in_flight == 0 {
                        return Ok(());
                    }
                    // A request came in as the close began (an HTTP/2 stream
                    // opened before the peer saw the GOAWAY): it is served,
                    // and hyper closes the connection after it.
                    closing = false;
                }
                let now = Instant::now();
                timer.as_mut().reset(now + every);
                let state = watch.sample();
                if state != seen {
                    (seen, since) = (state, now);
                }
                let quiet = now.duration_since(since);
                if state.unread > 0 && quiet >= limits.send_timeout {
                    return Err(format!("the client read nothing for {} ms (send_timeout); closed", quiet.as_millis()).into());
                }
                if state.in_flight == 0 && (draining || quiet >= limits.idle_timeout) {
                    closing = true;
                    timer.as_mut().reset(now + wait);
                    if !shut {
                        shut = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}
