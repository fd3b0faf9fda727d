//! The HTTP/2 upstream pool: several connections per upstream, each stream
//! placed on the connection with the most free stream slots (the peer's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` minus streams open), a new connection
//! when none has a free slot (up to `max_connections`), and past that a
//! bounded FIFO queue whose wait counts against the request's
//! `header_timeout`.
//!
//! Built on `h2` directly, not hyper's `client::conn::http2`: only `h2`
//! tells the client the peer's stream limit (hyper queues streams past it
//! silently inside the connection), and the request bodies sent here are
//! whole `Bytes`, so hyper's body plumbing is not needed.
//!
//! Nothing here re-sends. A stream the peer refused (`REFUSED_STREAM`, or
//! past a graceful GOAWAY's last stream id) or a connection that was going
//! away before the request left is reported as not written, so the retry
//! loop may send it again at once on another connection.

mod body;
mod conn;
mod pools;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use tokio::sync::oneshot;
use tokio::time::Instant;

pub use body::H2Body;
pub use conn::Conn;
pub use pools::Pools;

use crate::telemetry::metrics::Histogram;

/// Requests that may wait for a stream slot at once, per pool (per loop);
/// past it a request fails at once (not written) rather than queue without
/// bound.
pub const MAX_QUEUED: usize = 10_000;

/// How a pool reaches its peer and how long it keeps connections.
#[derive(Clone)]
pub struct Settings {
    /// `host:port` of the upstream.
    pub authority: Authority,
    /// TLS (ALPN `h2`, or `h2` and `http/1.1` when the pool may learn the
    /// peer only speaks HTTP/1.1), or `None` for h2c with prior knowledge.
    pub tls: Option<tokio_rustls::TlsConnector>,
    /// TCP and TLS connect, and the first PING's answer.
    pub connect_timeout: Duration,
    /// A connection without streams this long closes, except the last one.
    pub idle_timeout: Duration,
    /// Connections at most (each loop's pool).
    pub max_connections: usize,
    /// A PING this often on every connection.
    pub keepalive_interval: Duration,
    /// A PING unanswered this long closes the connection.
    pub keepalive_timeout: Duration,
}

/// Why no stream could be had.
#[derive(Debug)]
pub enum AcquireError {
    /// TLS ALPN chose HTTP/1.1: this upstream is not spoken to over HTTP/2.
    NotHttp2,
    /// No connection could be made.
    Connect(String),
    /// The queue is full.
    QueueFull,
}

/// The pool's counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Time requests waited for a stream slot (only those that waited).
    pub queue_wait: Histogram,
    /// Requests waiting now (`sluice_upstream_queued`).
    pub queued: AtomicU64,
}

/// Connections by state, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnCounts {
    /// With at least one stream open.
    pub active: usize,
    /// With none.
    pub idle: usize,
    /// Being opened.
    pub connecting: usize,
}

/// One upstream authority's HTTP/2 connections on one event loop (or the
/// runtime's workers): see [`Pools`].
pub struct Pool {
    settings: Settings,
    state: Mutex<State>,
    /// ALPN chose HTTP/1.1 once (on any loop's pool: shared by them): the
    /// upstream is reached by the other client.
    not_h2: Arc<AtomicBool>,
    next_id: AtomicU64,
    /// The stream limit of the last connection opened.
    expected: AtomicUsize,
    /// Counters for `/metrics`, shared with the other loops' pools.
    pub stats: Arc<PoolStats>,
}

struct State {
    slots: Vec<Slot>,
    connecting: usize,
    waiters: VecDeque<oneshot::Sender<Lease>>,
}

struct Slot {
    conn: Arc<Conn>,
    active: usize,
    idle_since: Option<Instant>,
}

impl Slot {
    fn free(&self) -> usize {
        if self.conn.is_closed() { 0 } else { self.conn.max_streams().saturating_sub(self.active) }
    }
}

/// A stream slot on one connection, given back when dropped.
pub struct Lease {
    pool: Arc<Pool>,
    conn: Option<Arc<Conn>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.release(conn.id());
        }
    }
}

impl Pool {
    /// An empty pool adding to `stats` and sharing what ALPN told (`not_h2`)
    /// with the other loops' pools; connections open on demand.
    pub fn new(settings: Settings, stats: Arc<PoolStats>, not_h2: Arc<AtomicBool>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            state: Mutex::new(State { slots: Vec::new(), connecting: 0, waiters: VecDeque::new() }),
            not_h2,
            next_id: AtomicU64::new(1),
            expected: AtomicUsize::new(100),
            stats,
        })
    }

    /// Whether TLS showed the peer does not speak HTTP/2.
    pub fn is_not_h2(&self) -> bool {
        self.not_h2.load(Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind: use them.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connections by state.
    pub fn counts(&self) -> ConnCounts {
        let state = self.lock();
        let open = state.slots.iter().filter(|s| !s.conn.is_closed());
        let active = open.clone().filter(|s| s.active > 0).count();
        ConnCounts { active, idle: open.count() - active, connecting: state.connecting }
    }

    /// A stream slot: on the connection with the most free slots, on a new
    /// connection, or after a wait in line. The time spent in line is
    /// observed once, however often the request was woken.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, AcquireError> {
        let mut queued_since = None;
        let result = self.acquire_in_line(&mut queued_since).await;
        if let Some(since) = queued_since {
            self.stats.queue_wait.observe(Instant::elapsed(&since));
        }
        result
    }

    async fn acquire_in_line(self: &Arc<Self>, queued_since: &mut Option<Instant>) -> Result<Lease, AcquireError> {
        loop {
            if self.is_not_h2() {
                return Err(AcquireError::NotHttp2);
            }
            let waiting = {
                let mut state = self.lock();
                state.slots.retain(|s| !s.conn.is_closed() || s.active > 0);
                if let Some(slot) = state.slots.iter_mut().filter(|s| s.free() > 0).max_by_key(|s| s.free()) {
                    slot.active += 1;
                    slot.idle_since = None;
                    return Ok(Lease { pool: Arc::clone(self), conn: Some(Arc::clone(&slot.conn)) });
                }
                // Open a connection when the ones being opened will not
                // have room for everyone in line (a cold burst opens one,
                // not one per request), and the cap allows.
                let demand = state.waiters.len() + 1;
                if self.room_to_open(&state) > 0 && state.connecting * self.expected_streams() < demand {
                    state.connecting += 1;
                    None
                } else if state.waiters.len() >= MAX_QUEUED {
                    return Err(AcquireError::QueueFull);
                } else {
                    let (tx, rx) = oneshot::channel();
                    state.waiters.push_back(tx);
                    Some(rx)
                }
            };
            match waiting {
                Some(rx) => {
                    queued_since.get_or_insert_with(Instant::now);
                    self.stats.queued.fetch_add(1, Relaxed);
                    // No lease: the pool woke the line to try again.
                    if let Some(lease) = Queued(&self.stats).wait(rx).await {
                        return Ok(lease);
                    }
                }
                None => return self.open().await,
            }
        }
    }

    /// Connections that may still be opened under `max_connections`.
    fn room_to_open(&self, state: &State) -> usize {
        let open = state.slots.iter().filter(|s| !s.conn.is_closed()).count();
        self.settings.max_connections.saturating_sub(open + state.connecting)
    }

    /// Streams a new connection is expected to take: the last peer limit
    /// seen (100, a common limit, before any).
    fn expected_streams(&self) -> usize {
        self.expected.load(Relaxed).max(1)
    }

    /// Wakes as many of the line as there are connections to open for it:
    /// each woken request opens one (or finds a slot freed meanwhile).
    fn wake_openers(&self, state: &mut State) {
        let needed = state.waiters.len().div_ceil(self.expected_streams()).saturating_sub(state.connecting);
        for _ in 0..needed.min(self.room_to_open(state)) {
            // Dropping its sender wakes the request with no lease.
            state.waiters.pop_front();
        }
    }

    /// Opens a connection for the caller (who counted it as connecting);
    /// its spare slots go to the line. Cancel-safe: a request dropped while
    /// it opens gives its place back (the guard) and the connection closes.
    async fn open(self: &Arc<Self>) -> Result<Lease, AcquireError> {
        let id = self.next_id.fetch_add(1, Relaxed);
        let guard = Opening(self);
        let opened = conn::open(self, id).await;
        std::mem::forget(guard);
        let mut state = self.lock();
        state.connecting -= 1;
        let opened = opened.and_then(|conn| {
            if conn.max_streams() == 0 {
                conn.close();
                return Err(conn::OpenError::Failed("the upstream allows no HTTP/2 streams".into()));
            }
            Ok(conn)
        });
        match opened {
            Ok(conn) => {
                self.expected.store(conn.max_streams(), Relaxed);
                state.slots.push(Slot { conn: Arc::clone(&conn), active: 1, idle_since: None });
                let index = state.slots.len() - 1;
                self.hand_to_waiters(&mut state, index);
                self.wake_openers(&mut state);
                Ok(Lease { pool: Arc::clone(self), conn: Some(conn) })
            }
            Err(error) => {
                self.wake_openers(&mut state);
                if let conn::OpenError::NotHttp2 = error {
                    self.not_h2.store(true, Relaxed);
                    // Everyone in line goes to the other client.
                    state.waiters.clear();
                    return Err(AcquireError::NotHttp2);
                }
                Err(AcquireError::Connect(error.to_string()))
            }
        }
    }

    /// A connection stopped taking streams (going away): the line may need
    /// another one.
    fn closed(&self) {
        let mut state = self.lock();
        state.slots.retain(|s| !s.conn.is_closed() || s.active > 0);
        self.wake_openers(&mut state);
    }

    /// Gives free slots of slot `index` to the line, first come first served.
    fn hand_to_waiters(self: &Arc<Self>, state: &mut State, index: usize) {
        while state.slots[index].free() > 0 {
            let Some(waiter) = state.waiters.pop_front() else { break };
            let slot = &mut state.slots[index];
            slot.active += 1;
            slot.idle_since = None;
            let lease = Lease { pool: Arc::clone(self), conn: Some(Arc::clone(&slot.conn)) };
            if let Err(mut unclaimed) = waiter.send(lease) {
                // That request stopped waiting: the slot stays free (and the
                // lease must not release it again, under this lock).
                unclaimed.conn = None;
                state.slots[index].active -= 1;
            }
        }
        let slot = &mut state.slots[index];
        if slot.active == 0 && slot.idle_since.is_none() {
            slot.idle_since = Some(Instant::now());
        }
    }

    /// A stream on connection `id` ended.
    fn release(self: &Arc<Self>, id: u64) {
        let mut state = self.lock();
        if let Some(index) = state.slots.iter().position(|s| s.conn.id() == id) {
            state.slots[index].active -= 1;
            self.hand_to_waiters(&mut state, index);
        }
    }

    /// Called by a connection's task: closes it if it has been idle for
    /// `idle_timeout` and another open connection stays (one is kept warm).
    /// (Not in the pool: not yet added while it opens, or dropped as closed;
    /// the caller ends a closed one.)
    fn close_if_idle(&self, id: u64) -> bool {
        let mut state = self.lock();
        let open = state.slots.iter().filter(|s| !s.conn.is_closed()).count();
        let Some(index) = state.slots.iter().position(|s| s.conn.id() == id) else { return false };
        let slot = &state.slots[index];
        let idle = slot.active == 0 && slot.idle_since.is_some_and(|t| t.elapsed() >= self.settings.idle_timeout);
        // A connection that takes no new streams ends with its last one.
        let finished = slot.active == 0 && slot.conn.is_closed();
        if finished || (idle && open > 1) {
            slot.conn.close();
            state.slots.remove(index);
            return true;
        }
        false
    }

    /// Whether connection `id` is in the pool.
    fn holds(&self, id: u64) -> bool {
        self.lock().slots.iter().any(|s| s.conn.id() == id)
    }

    /// Called by a connection's task when the connection has ended: as many
    /// of the line as need one are woken to open another.
    fn forget(&self, id: u64) {
        let mut state = self.lock();
        state.slots.retain(|s| s.conn.id() != id);
        self.wake_openers(&mut state);
    }

    /// Sends one request with a whole body on a stream of this pool;
    /// `sent` turns true once a stream slot was had (before that, time went
    /// on waiting in line, and nothing reached the upstream).
    pub async fn send(
        self: &Arc<Self>,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        auth: (&HeaderName, HeaderValue),
        body: Bytes,
        sent: &AtomicBool,
    ) -> Result<Response<H2Body>, SendError> {
        let lease = self.acquire().await.map_err(SendError::Acquire)?;
        let conn = lease.conn.as_ref().map(Arc::clone).ok_or(SendError::Acquire(AcquireError::QueueFull))?;
        let mut request = Request::new(());
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        // A clone copies the map without hashing a name again; the forbidden
        // names are rare, so look for them (cheap comparisons) before removing.
        let mut out = headers.clone();
        if headers.keys().any(|name| CONNECTION_SPECIFIC.contains(name)) {
            for name in &CONNECTION_SPECIFIC {
                out.remove(name);
            }
        }
        out.insert(auth.0.clone(), auth.1);
        *request.headers_mut() = out;
        sent.store(true, Relaxed);
        let (response, stream) = match conn.send(request, body).await {
            Ok(pair) => pair,
            Err(error) => {
                self.closed();
                return Err(SendError::Stream(error, false));
            }
        };
        match response.await {
            Ok(response) => Ok(response.map(|recv| H2Body::new(recv, lease, stream))),
            Err(error) => {
                let unsent = refused_unprocessed(&error);
                if error.is_go_away() {
                    conn.close();
                    self.closed();
                }
                Err(SendError::Stream(error, !unsent))
            }
        }
    }
}

/// Headers HTTP/2 forbids (RFC 9113 8.2.2) or carries otherwise (`host` is
/// `:authority`).
const CONNECTION_SPECIFIC: [HeaderName; 7] = [
    http::header::CONNECTION,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::TE,
    http::header::HOST,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Whether the peer guarantees it did not process the stream: it refused it
/// (`REFUSED_STREAM`), or a graceful GOAWAY left it past the last stream id.
pub fn refused_unprocessed(error: &h2::Error) -> bool {
    let remote = error.is_remote();
    (error.is_reset() && remote && error.reason() == Some(h2::Reason::REFUSED_STREAM))
        || (error.is_go_away() && remote && error.reason() == Some(h2::Reason::NO_ERROR))
}

/// A failed send over the pool.
#[derive(Debug)]
pub enum SendError {
    /// No stream was had; nothing was sent.
    Acquire(AcquireError),
    /// The stream failed; whether the request may have been processed.
    Stream(h2::Error, bool),
}

/// A connection being opened by a request that may be dropped meanwhile:
/// dropped unfinished, it gives the place under `max_connections` back and
/// wakes the line.
struct Opening<'a>(&'a Pool);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.connecting -= 1;
        self.0.wake_openers(&mut state);
    }
}

/// Counts a request in the line while it waits (and stops counting if it
/// is dropped while waiting).
struct Queued<'a>(&'a PoolStats);

impl Queued<'_> {
    async fn wait(self, rx: oneshot::Receiver<Lease>) -> Option<Lease> {
        rx.await.ok()
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Relaxed);
    }
}
