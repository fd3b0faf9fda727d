//! Listening and serving: the socket (with its backlog), the accept loop
//! (TCP_NODELAY on every socket, at most `max_connections` at once, backing
//! off when accept fails), one task per connection (see [`connection`]), and
//! a drain on shutdown bounded by the grace period.

pub mod connection;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::config::server::{
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_HEADER_BYTES, DEFAULT_SEND_TIMEOUT,
    default_max_connections,
};
use crate::error::BoxError;
use crate::service::Gateway;
use crate::state::Shared;
use crate::tasks::{self, loops::EventLoops};
use crate::telemetry::ConnWatch;
use crate::telemetry::metrics::ConnStats;
use connection::{Listening, Protocols};

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every connection finished within the grace period.
    Clean,
    /// The grace period ran out with this many connections still open.
    TimedOut(usize),
}

/// What a listener allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// HTTP/2 streams a connection may have open at once.
    pub max_streams: u32,
    /// HTTP/2 streams reset before being accepted, past which the connection
    /// is closed (h2's defence against rapid-reset floods).
    pub max_pending_resets: usize,
    /// Connections held at once; past it, new ones wait in the backlog.
    pub max_connections: usize,
    /// Connections one IP address may hold; past it, its new ones are closed.
    pub max_connections_per_ip: usize,
    /// Largest request head, in bytes.
    pub max_header_bytes: u64,
    /// A connection with nothing in flight this long is closed.
    pub idle_timeout: Duration,
    /// An answer its client has not read for this long closes the connection.
    pub send_timeout: Duration,
    /// Longest TLS handshake, or wait for a new connection's first bytes.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    /// hyper's and h2's stream defaults (200 streams, 20 pending resets) and
    /// `[server]`'s defaults for the rest.
    fn default() -> Self {
        Self {
            max_streams: 200,
            max_pending_resets: 20,
            max_connections: default_max_connections(),
            max_connections_per_ip: usize::MAX,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

impl Limits {
    /// The limits `[server]` sets.
    pub fn of(server: &ServerConfig) -> Self {
        Self {
            max_connections: server.max_connections,
            max_connections_per_ip: server.max_connections_per_ip,
            max_header_bytes: server.max_header_bytes,
            idle_timeout: server.idle_timeout,
            send_timeout: server.send_timeout,
            handshake_timeout: server.handshake_timeout,
            ..Self::default()
        }
    }
}

/// The kernel's cap on a listen backlog.
fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok()?.trim().parse().ok()
}

/// Binds `addr` with a listen backlog of `backlog` connections, capped by
/// the kernel's `net.core.somaxconn` (which would cap it silently anyway).
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(somaxconn().map_or(backlog, |cap| backlog.min(cap)))
}

/// Serves the gateway on `listener` until `shutdown` resolves, then drains.
/// `/health` answers 503 `draining` from the moment `shutdown` resolves: for
/// `[server] drain_delay` sluice goes on accepting and serving, so a load
/// balancer checking `/health` takes it out of rotation before the listener
/// closes; then it stops accepting and waits for what is in flight.
/// Connections are served on `loops` when given (`[server] event_loops`);
/// their owner stops them after this returns (the background work that ends
/// here may run on them, and so may its connections).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    loops: Option<&EventLoops>,
) -> Drain {
    let stats = Arc::clone(&shared.telemetry.connections);
    let live = shared.live.load_full();
    let limits = Limits::of(&live.config.server);
    let tls = match shared.certs.as_ref().map(|certs| certs.acceptor()) {
        Some(Ok(acceptor)) => Some(acceptor),
        Some(Err(error)) => {
            tracing::error!(%error, "cannot set up TLS on the listener; serving nothing");
            return Drain::Clean;
        }
        None => None,
    };
    let gateway = {
        let shared = Arc::clone(&shared);
        move |watch: Arc<ConnWatch>| Gateway::new(Arc::clone(&shared), watch)
    };
    let draining = Arc::clone(&shared);
    let drain_delay = live.config.server.drain_delay;
    let shutdown = async move {
        shutdown.await;
        draining.draining.store(true, Ordering::Relaxed);
        if !drain_delay.is_zero() {
            tracing::info!(
                delay_ms = drain_delay.as_millis() as u64,
                "draining: /health says so; still serving until the delay ends"
            );
            tokio::time::sleep(drain_delay).await;
        }
    };
    let drain = serve_service(listener, tls, gateway, stats, shutdown, || {}, grace, limits, loops).await;
    // Background work (key checks, sweepers, signal handlers) stops with the listener.
    shared.tasks.shutdown(grace).await;
    drain
}

/// The accept loop for any hyper service (the gateway and the mock share it).
/// `make_service` builds the service of each connection from its watch (which
/// holds its facts). With `tls`, every connection is a TLS one. After `shutdown`
/// resolves: stop accepting, call `on_stop`, ask every connection to finish
/// gracefully, and wait up to `grace` for them. With `loops`, each connection
/// is served on one of them, in turn; without, on the runtime's workers.
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
    loops: Option<&EventLoops>,
) -> Drain
where
    F: Fn(Arc<ConnWatch>) -> S + Send + Sync + 'static,
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
    let listening = Arc::new(Listening {
        protocols: Protocols::new(&limits),
        make_service,
        tls,
        stats: Arc::clone(&stats),
        limits,
    });
    if let Some(loops) = loops {
        stats.per_loop.get_or_init(|| (0..loops.count()).map(|_| AtomicUsize::new(0)).collect());
    }
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = Arc::new(PerIp::default());
    let connections = TaskTracker::new();
    // Tells every connection that the drain began.
    let (stopping, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let cut = tokio_util::sync::CancellationToken::new();

    loop {
        // At the limit, stop accepting: new connections wait in the kernel's
        // backlog instead of costing a file descriptor and memory here.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    accepted
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off, longer each time.
                    tracing::warn!(%error, backoff_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(held) = per_ip.admit(peer.ip(), limits.max_connections_per_ip) else {
            stats.refused_per_ip.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "connection closed: its address holds max_connections_per_ip");
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "could not set TCP_NODELAY");
        }
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let slot = Slot { stats: Arc::clone(&stats), _held: held, _permit: permit };
        let (listening, stop, cut) = (Arc::clone(&listening), stop_rx.clone(), cut.clone());
        let serve_one = move |stream: TcpStream| async move {
            tokio::select! {
                served = connection::serve(&listening, stream, peer, stop) => {
                    if let Err(error) = served {
                        tracing::debug!(%peer, error = %error, "connection ended with an error");
                    }
                }
                // Past the grace period: the connection (and every answer on
                // it, which records itself as it is dropped) ends here, on
                // its runtime or loop, before the process writes its last usage.
                () = cut.cancelled() => {}
            }
            drop(slot);
        };
        match loops {
            Some(loops) => {
                // Counted as running from here: the drain waits for it too.
                let running = connections.token();
                let dealt = Arc::clone(&stats);
                let handed = loops.hand_over(stream, move |stream| async move {
                    // Counted on the loop, before the connection is served.
                    let here = tasks::loops::current().wrapping_sub(1);
                    if let Some(count) = dealt.per_loop.get().and_then(|counts| counts.get(here)) {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    serve_one(stream).await;
                    drop(running);
                });
                if let Err(error) = handed {
                    tracing::warn!(%peer, %error, "cannot move a connection to an event loop; closed");
                }
            }
            None => {
                connections.spawn(serve_one(stream));
            }
        }
    }

    let _ = stopping.send(true);
    drop(listener);
    on_stop();
    connections.close();
    tracing::info!(
        connections = stats.open.load(Ordering::Relaxed),
        grace_ms = grace.as_millis() as u64,
        "stopped accepting; draining"
    );
    match tokio::time::timeout(grace, connections.wait()).await {
        Ok(()) => {
            tracing::info!("drained cleanly");
            Drain::Clean
        }
        Err(_) => {
            let left = stats.open.load(Ordering::Relaxed);
            tracing::warn!(connections = left, "grace period over; closing what is still open");
            cut.cancel();
            if tokio::time::timeout(CUT_WAIT, connections.wait()).await.is_err() {
                tracing::warn!("connections still closing after the cut; exiting anyway");
            }
            Drain::TimedOut(left)
        }
    }
}

/// What an accepted connection holds until it closes: its place under
/// `max_connections` and its address's limit, and its count in `open`.
struct Slot {
    stats: Arc<ConnStats>,
    _held: Held,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connections held per client address, counted at accept and at close
/// (never per request), under a lock held for a map update.
#[derive(Default)]
struct PerIp(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection counted against its address; dropping it releases it.
struct Held(Arc<PerIp>, std::net::IpAddr);

impl PerIp {
    /// Counts a connection from `ip`, unless its address (IPv6: its /64)
    /// already holds `limit`.
    fn admit(self: &Arc<Self>, ip: std::net::IpAddr, limit: usize) -> Option<Held> {
        let ip = crate::access::ip::counted_as(ip);
        if limit == usize::MAX {
            return Some(Held(Arc::clone(self), ip));
        }
        let mut held = self.0.lock().ok()?;
        let count = held.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(Held(Arc::clone(self), ip))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let Ok(mut held) = self.0.0.lock() else { return };
        if let std::collections::hash_map::Entry::Occupied(mut entry) = held.entry(self.1) {
            *entry.get_mut() = entry.get().saturating_sub(1);
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

/// How long connections cut at the end of the grace period get to finish
/// dropping (their answers record themselves as they go).
const CUT_WAIT: Duration = Duration::from_secs(2);

/// First pause after a failed accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after failed accepts in a row.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

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

/// Binds `shared`'s listen address and serves in a background task, on
/// `[server] event_loops` loops if it asks for them (stopped after the drain).
pub async fn spawn(shared: Arc<Shared>) -> std::io::Result<Running> {
    let config = shared.live.load().config.clone();
    let listener = bind(config.server.listen, config.server.backlog)?;
    let addr = listener.local_addr()?;
    let loops = match config.server.event_loops {
        0 => None,
        count => Some(EventLoops::start(count)?),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let grace = config.server.shutdown_grace;
    let serving = Arc::clone(&shared);
    let task = tokio::spawn(async move {
        let drain = serve(
            listener,
            serving,
            async move {
                let _ = stopped.await;
            },
            grace,
            loops.as_ref(),
        )
        .await;
        if let Some(loops) = loops {
            loops.stop().await;
        }
        drain
    });
    Ok(Running { addr, shared, stop: Some(stop), task })
}

#[cfg(test)]
mod tests {
    use super::connection::{Protocol, classify};

    #[test]
    fn first_bytes_pick_the_protocol() {
        assert_eq!(classify(b"POST /v1/chat/completions HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(classify(b"PUT"), Protocol::Http1);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Protocol::Http2);
        assert_eq!(classify(b"PRI * HTTP/2"), Protocol::Unsure);
        assert_eq!(classify(b"P"), Protocol::Unsure);
        assert_eq!(classify(b""), Protocol::Closed);
    }
}
