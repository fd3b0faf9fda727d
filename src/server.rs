//! Listening and serving: the accept loop (TCP_NODELAY on every socket), TLS
//! when configured (ALPN picks the protocol), otherwise a peek that tells
//! HTTP/1.1 from h2c prior knowledge on the same port, one hyper connection
//! per socket, and a drain on shutdown bounded by the grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::rt::{Read, Write};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::error::BoxError;
use crate::service::Gateway;
use crate::state::Shared;
use crate::telemetry::ConnInfo;
use crate::telemetry::metrics::ConnStats;

/// Time a client gets to send a request's headers on HTTP/1.1, and its first
/// bytes on any new connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a client gets to finish a TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every connection finished within the grace period.
    Clean,
    /// The grace period ran out with this many connections still open.
    TimedOut(usize),
}

/// Serves the gateway on `listener` until `shutdown` resolves, then drains.
/// `/health` reports `draining` from the moment accepting stops.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> Drain {
    let stats = Arc::clone(&shared.telemetry.connections);
    let gateway = {
        let shared = Arc::clone(&shared);
        move |conn: ConnInfo| Gateway::new(Arc::clone(&shared), conn)
    };
    let draining = Arc::clone(&shared);
    let on_stop = move || draining.draining.store(true, Ordering::Relaxed);
    let limits = Limits::default();
    let drain = serve_service(listener, None, gateway, stats, shutdown, on_stop, grace, limits).await;
    // Background work (key checks, sweepers, reload handler) stops with the listener.
    shared.tasks.shutdown(grace).await;
    drain
}

/// HTTP/2 limits per client connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Concurrent streams a connection may open.
    pub max_streams: u32,
    /// Streams reset before being accepted, past which the connection is closed
    /// (h2's defence against rapid-reset floods).
    pub max_pending_resets: usize,
}

impl Default for Limits {
    /// hyper's and h2's defaults: 200 streams, 20 pending resets.
    fn default() -> Self {
        Self { max_streams: 200, max_pending_resets: 20 }
    }
}

/// The HTTP/2 connection preface a client sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which protocol a new connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Anything but the HTTP/2 preface, or TLS without `h2` in ALPN.
    Http1,
    /// The whole HTTP/2 preface (h2c with prior knowledge), or ALPN `h2`.
    Http2,
    /// A strict prefix of the preface so far: the client sent it in pieces.
    Unsure,
    /// The client closed without a byte, or the drain began first.
    Closed,
}

/// Looks at a connection's first bytes without consuming them.
///
/// hyper-util's `auto` connection does the same by reading them and then
/// wraps the socket in a rewinding adapter for its whole life; its future is
/// also sized for both protocols at once. Peeking lets each connection run
/// hyper's HTTP/1.1 or HTTP/2 connection directly on the socket: a smaller
/// task per connection and one layer less on every read and write. The rare
/// client that splits the preface goes to `auto`, which handles it.
async fn sniff_protocol(stream: &TcpStream) -> std::io::Result<Protocol> {
    let mut first = [0u8; H2_PREFACE.len()];
    let n = stream.peek(&mut first).await?;
    Ok(classify(&first[..n]))
}

fn classify(first: &[u8]) -> Protocol {
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

/// The connection builders, configured once per listener.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(h2: Limits) -> Self {
        let mut http1 = http1::Builder::new();
        http1.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2.max_streams)
            .max_pending_accept_reset_streams(h2.max_pending_resets);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
        auto.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2.max_streams)
            .max_pending_accept_reset_streams(h2.max_pending_resets);
        Self { http1, http2, auto }
    }
}

/// What every connection task of one listener shares.
struct Listening<F> {
    protocols: Protocols,
    make_service: F,
    tls: Option<TlsAcceptor>,
    stats: Arc<ConnStats>,
}

/// The accept loop for any hyper service (the gateway and the mock share it).
/// `make_service` builds the service of each connection from its facts. With
/// `tls`, every connection is a TLS one. After `shutdown` resolves: stop
/// accepting, call `on_stop`, ask every connection to finish gracefully, and
/// wait up to `grace` for them.
#[expect(clippy::too_many_arguments, reason = "one accept loop for the gateway and the mock, set up by its caller")]
pub async fn serve_service<S, B, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    make_service: F,
    stats: Arc<ConnStats>,
    shutdown: impl Future<Output = ()>,
    on_stop: impl FnOnce(),
    grace: Duration,
    limits: Limits,
) -> Drain
where
    F: Fn(ConnInfo) -> S + Send + Sync + 'static,
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
    let listening =
        Arc::new(Listening { protocols: Protocols::new(limits), make_service, tls, stats: Arc::clone(&stats) });
    let graceful = GracefulShutdown::new();
    // Tells connections still sniffing their protocol or shaking hands (not
    // yet watched by `graceful`) that the drain began.
    let (stopping, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "could not set TCP_NODELAY");
        }
        let stats = Arc::clone(&stats);
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let (listening, watcher, stop) = (Arc::clone(&listening), graceful.watcher(), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(error) = serve_connection(&listening, stream, peer, watcher, stop).await {
                tracing::debug!(%peer, error = %error, "connection ended with an error");
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
        });
    }

    let _ = stopping.send(true);
    drop(listener);
    on_stop();
    tracing::info!(
        connections = stats.open.load(Ordering::Relaxed),
        grace_ms = grace.as_millis() as u64,
        "stopped accepting; draining"
    );
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => {
            tracing::info!("drained cleanly");
            Drain::Clean
        }
        Err(_) => {
            let left = stats.open.load(Ordering::Relaxed);
            tracing::warn!(connections = left, "grace period over; closing what is still open");
            Drain::TimedOut(left)
        }
    }
}

/// Serves one accepted socket: TLS handshake or protocol sniff first (both
/// bounded in time and cut short by the drain), then hyper's connection.
async fn serve_connection<S, B, F>(
    listening: &Listening<F>,
    stream: TcpStream,
    peer: SocketAddr,
    watcher: Watcher,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    F: Fn(ConnInfo) -> S,
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
            sniffed = tokio::time::timeout(HEADER_READ_TIMEOUT, sniff_protocol(&stream)) => sniffed,
            _ = stop.wait_for(|stopping| *stopping) => Ok(Ok(Protocol::Closed)),
        };
        let protocol = match sniffed {
            Ok(protocol) => protocol?,
            Err(_) => Protocol::Closed,
        };
        return run(listening, TokioIo::new(stream), protocol, peer, false, watcher).await;
    };
    let handshake = tokio::select! {
        shaken = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => shaken,
        _ = stop.wait_for(|stopping| *stopping) => return Ok(()),
    };
    let Ok(stream) = handshake else {
        return Err("TLS handshake timed out".into());
    };
    let stream = stream?;
    let protocol = if stream.get_ref().1.alpn_protocol() == Some(b"h2") { Protocol::Http2 } else { Protocol::Http1 };
    run(listening, TokioIo::new(stream), protocol, peer, true, watcher).await
}

/// Runs hyper's connection for `protocol` on `io` until it ends or the drain
/// finishes it.
async fn run<S, B, F, I>(
    listening: &Listening<F>,
    io: I,
    protocol: Protocol,
    peer: SocketAddr,
    tls: bool,
    watcher: Watcher,
) -> Result<(), BoxError>
where
    F: Fn(ConnInfo) -> S,
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
    let service = |http2| (listening.make_service)(ConnInfo { peer, tls, http2 });
    let protocols = &listening.protocols;
    match protocol {
        Protocol::Http1 => {
            let connection = protocols.http1.serve_connection(io, service(false));
            watcher.watch(connection).await.map_err(BoxError::from)
        }
        // Boxed: a task is sized for its largest state, and hyper's h2 and
        // `auto` connections (1488 and 1520 bytes here) are more than twice an
        // HTTP/1.1 one (640). Inline, every HTTP/1.1 task would be that large.
        Protocol::Http2 => {
            let connection = protocols.http2.serve_connection(io, service(true));
            Box::pin(watcher.watch(connection)).await.map_err(BoxError::from)
        }
        Protocol::Unsure => {
            // `auto` decides by itself; the service is told HTTP/1.1 (the
            // common case of a split first packet).
            listening.stats.split_preface.fetch_add(1, Ordering::Relaxed);
            let connection = protocols.auto.serve_connection(io, service(false)).into_owned();
            Box::pin(watcher.watch(connection)).await
        }
        Protocol::Closed => Ok(()),
    }
}

/// A gateway started in the background, for tests, the demo and benches.
pub struct Running {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    /// The shared state, to inspect or reload.
    pub shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Drain>,
}

impl Running {
    /// Begins shutdown and waits for the drain to finish.
    pub async fn shutdown(mut self) -> Drain {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap_or(Drain::TimedOut(0))
    }
}

/// Binds `shared`'s listen address and serves in a background task.
pub async fn spawn(shared: Arc<Shared>) -> std::io::Result<Running> {
    let config = shared.live.load().config.clone();
    let listener = TcpListener::bind(config.server.listen).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let grace = config.server.shutdown_grace;
    let task = tokio::spawn(serve(
        listener,
        Arc::clone(&shared),
        async move {
            let _ = stopped.await;
        },
        grace,
    ));
    Ok(Running { addr, shared, stop: Some(stop), task })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_pick_the_protocol() {
        assert_eq!(classify(b"POST /v1/chat/completions HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(classify(b"PUT"), Protocol::Http1);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(classify(H2_PREFACE), Protocol::Http2);
        assert_eq!(classify(b"PRI * HTTP/2"), Protocol::Unsure);
        assert_eq!(classify(b"P"), Protocol::Unsure);
        assert_eq!(classify(b""), Protocol::Closed);
    }
}
