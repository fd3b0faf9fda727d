//! Listening and serving: the accept loop (TCP_NODELAY on every socket), one
//! hyper-util auto connection per socket (HTTP/1.1 and h2c prior knowledge on
//! the same port), and a drain on shutdown bounded by the grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::service::Gateway;
use crate::state::Shared;

/// Time a client gets to send a request's headers on HTTP/1.1.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every connection finished within the grace period.
    Clean,
    /// The grace period ran out with this many connections still open.
    TimedOut(usize),
}

/// Connection counters of one listener.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections accepted since start.
    pub accepted: AtomicUsize,
}

/// Serves the gateway on `listener` until `shutdown` resolves, then drains.
/// `/health` reports `draining` from the moment accepting stops.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> Drain {
    let gateway = Gateway::new(Arc::clone(&shared));
    let stats = Arc::new(ConnStats::default());
    let on_stop = move || shared.draining.store(true, Ordering::Relaxed);
    serve_service(listener, gateway, stats, shutdown, on_stop, grace, H2Limits::default()).await
}

/// HTTP/2 limits per client connection.
#[derive(Debug, Clone, Copy)]
pub struct H2Limits {
    /// Concurrent streams a connection may open.
    pub max_streams: u32,
    /// Streams reset before being accepted, past which the connection is closed
    /// (h2's defence against rapid-reset floods).
    pub max_pending_resets: usize,
}

impl Default for H2Limits {
    /// hyper's and h2's defaults: 200 streams, 20 pending resets.
    fn default() -> Self {
        Self { max_streams: 200, max_pending_resets: 20 }
    }
}

/// The accept loop for any hyper service (the gateway and the mock share it).
/// After `shutdown` resolves: stop accepting, call `on_stop`, ask every
/// connection to finish gracefully, and wait up to `grace` for them.
pub async fn serve_service<S, B>(
    listener: TcpListener,
    service: S,
    stats: Arc<ConnStats>,
    shutdown: impl Future<Output = ()>,
    on_stop: impl FnOnce(),
    grace: Duration,
    h2: H2Limits,
) -> Drain
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(h2.max_streams)
        .max_pending_accept_reset_streams(h2.max_pending_resets);
    let graceful = GracefulShutdown::new();
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
        let connection = builder.serve_connection(TokioIo::new(stream), service.clone()).into_owned();
        let connection = graceful.watch(connection);
        let stats = Arc::clone(&stats);
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, error = %error, "connection ended with an error");
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
        });
    }

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
