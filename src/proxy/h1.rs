//! The HTTP/1.1 client for cleartext upstreams, run on the request's own task.
//!
//! hyper-util's pooled client hands every request to a separate connection
//! task through a channel, answers through another, and feeds the response
//! body through a third, so one proxied request costs several task wake-ups
//! and a `HeaderMap` clone on top of the syscalls. This client writes the
//! request head and body with one `write` from the task that serves the client,
//! reads the response head into the connection's buffer, and hands body frames
//! on as slices of that buffer: no task, no channel, no copy. A finished
//! connection goes back to a small LIFO pool.
//!
//! Scope: `http://` upstreams whose `http2` is not `prior-knowledge`, and
//! request bodies sluice has read whole (everything it sniffs). TLS, HTTP/2 and
//! streamed uploads go through hyper-util's client.

pub mod body;
mod framing;
mod head;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Method, Response};
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

pub use body::H1Body;

/// First read buffer of a connection; it doubles (up to [`MAX_READ`]) while
/// reads fill it, so big answers take few syscalls and slow streams stay small.
const MIN_READ: usize = 2 * 1024;
/// Largest read buffer reservation.
const MAX_READ: usize = 64 * 1024;
/// How soon after sending a pooled connection must fail, answerless, to count
/// as closed while idle (the upstream's FIN crossed our request): a few round
/// trips. A failure later than this is the upstream failing the request.
const STALE_RACE: Duration = Duration::from_secs(1);
/// Request bodies up to this size are copied behind the head: one `write`.
const INLINE_BODY: usize = 16 * 1024;

/// What can go wrong talking HTTP/1.1 to an upstream.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// No TCP connection could be made.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// `host:port` dialled.
        addr: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The TCP connection was not made within `connect_timeout`.
    #[error("connect to {addr} timed out after {after_ms} ms")]
    ConnectTimeout {
        /// `host:port` dialled.
        addr: String,
        /// The timeout.
        after_ms: u64,
    },
    /// Reading or writing failed (reset, broken pipe).
    #[error("upstream connection failed: {0}")]
    Io(#[from] io::Error),
    /// The upstream closed the connection before its answer was complete.
    #[error("upstream closed the connection before the response was complete")]
    Closed,
    /// The upstream's bytes are not a valid HTTP/1.1 response.
    #[error("malformed upstream response: {0}")]
    Protocol(&'static str),
}

impl H1Error {
    /// Whether no connection was made (the request never left sluice).
    pub fn is_connect(&self) -> bool {
        matches!(self, H1Error::Connect { .. } | H1Error::ConnectTimeout { .. })
    }
}

/// An open connection and the bytes read from it but not yet consumed.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
    /// Size of the next read reservation.
    next_read: usize,
}

impl Conn {
    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.reserve();
        let room = self.buf.capacity() - self.buf.len();
        let n = std::task::ready!(tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut self.io), cx, &mut self.buf))?;
        self.grow_after(n, room);
        Poll::Ready(Ok(n))
    }

    async fn fill(&mut self) -> io::Result<usize> {
        self.reserve();
        let room = self.buf.capacity() - self.buf.len();
        let n = self.io.read_buf(&mut self.buf).await?;
        self.grow_after(n, room);
        Ok(n)
    }

    fn reserve(&mut self) {
        if self.buf.capacity() - self.buf.len() < self.next_read / 4 {
            self.buf.reserve(self.next_read);
        }
    }

    fn grow_after(&mut self, read: usize, room: usize) {
        if read == room {
            self.next_read = (self.next_read * 2).min(MAX_READ);
        }
    }

    /// Whether an idle connection is still usable: the peer has not closed it
    /// and sent nothing unasked. Costs no syscall unless the reactor saw it readable.
    fn is_reusable(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl Idle {
    fn expired(&self, now: Instant, timeout: Duration) -> bool {
        now.duration_since(self.since) >= timeout
    }

    /// Not expired, and not closed (or written to) by the upstream meanwhile.
    fn usable(&self, now: Instant, timeout: Duration) -> bool {
        !self.expired(now, timeout) && self.conn.is_reusable()
    }
}

/// Keep-alive connections to one `host:port`, most recently used first out.
/// The lock is held for a push or a pop only, never across I/O.
pub struct Pool {
    addr: String,
    /// The `Host` header: `host[:port]` as in the URL, without user-info.
    host: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<Idle>>,
    opened: AtomicU64,
    /// Whether the task that closes expired and dead idle connections runs.
    sweeping: AtomicBool,
    /// [`STALE_RACE`], shorter in tests.
    stale_race: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool for `authority` (port 80 when it has none).
    pub fn new(authority: Authority, connect_timeout: Duration, idle_timeout: Duration, max_idle: usize) -> Self {
        let addr = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
        let host = match authority.port() {
            Some(port) => format!("{}:{}", authority.host(), port),
            None => authority.host().to_string(),
        };
        Self {
            addr,
            host,
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
            opened: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
            stale_race: STALE_RACE,
        }
    }

    /// The same pool with another stale-connection window (tests use a short one).
    #[cfg(test)]
    fn with_stale_race(mut self, window: Duration) -> Self {
        self.stale_race = window;
        self
    }

    /// Connections opened so far (for `/stats` and tests).
    pub fn opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }

    /// Connections idle in the pool now.
    pub fn idle(&self) -> usize {
        self.idle.lock().map_or(0, |idle| idle.len())
    }

    /// Sends one request and returns once the response head is in; the body
    /// streams from the same connection, which returns to the pool at its end.
    ///
    /// A pooled connection the upstream closed while it sat idle is retried
    /// once on a fresh connection, when nothing at all came back on it and the
    /// failure came within [`STALE_RACE`] of sending: later than that the
    /// upstream may have run the request (and crashed on it), and a re-send is
    /// the retry loop's decision, counted and on another key, not this one's.
    pub async fn send(
        self: &Arc<Self>,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        auth: &HeaderValue,
        body: &Bytes,
    ) -> Result<Response<H1Body>, H1Error> {
        let inline = body.len() <= INLINE_BODY;
        let mut wire = Vec::with_capacity(512 + if inline { body.len() } else { 0 });
        head::encode_request(&mut wire, method, path_and_query, &self.host, headers, auth, body.len());
        if inline {
            wire.extend_from_slice(body);
        }
        let rest: &[u8] = if inline { b"" } else { body };
        let mut pooled = self.checkout();
        loop {
            let reused = pooled.is_some();
            let mut conn = match pooled.take() {
                Some(conn) => conn,
                None => self.connect().await?,
            };
            let sent = Instant::now();
            match exchange(&mut conn, &wire, rest, method).await {
                Ok(head) => {
                    let keep_alive = head.keep_alive;
                    let body = H1Body::new(conn, head.framing, keep_alive, Arc::clone(self));
                    return Ok(head.response.map(|()| body));
                }
                Err(Failed { error, answered }) if reused && !answered && sent.elapsed() < self.stale_race => {
                    // Closed while idle (a race the readiness check cannot see):
                    // the idle ones behind it are likely stale too.
                    tracing::debug!(upstream = %self.addr, %error, "pooled connection was closed; retrying on a new one");
                    self.clear();
                }
                Err(Failed { error, .. }) => return Err(error),
            }
        }
    }

    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        loop {
            let idle = self.idle.lock().ok()?.pop()?;
            if idle.usable(now, self.idle_timeout) {
                return Some(idle.conn);
            }
        }
    }

    async fn connect(&self) -> Result<Conn, H1Error> {
        let connect = TcpStream::connect(self.addr.as_str());
        let io = match tokio::time::timeout(self.connect_timeout, connect).await {
            Err(_) => {
                return Err(H1Error::ConnectTimeout {
                    addr: self.addr.clone(),
                    after_ms: self.connect_timeout.as_millis() as u64,
                });
            }
            Ok(Err(source)) => return Err(H1Error::Connect { addr: self.addr.clone(), source }),
            Ok(Ok(io)) => io,
        };
        io.set_nodelay(true)?;
        self.opened.fetch_add(1, Relaxed);
        Ok(Conn { io, buf: BytesMut::new(), next_read: MIN_READ })
    }

    /// Takes back a connection whose response ended cleanly.
    fn put(self: &Arc<Self>, mut conn: Conn) {
        if !conn.buf.is_empty() {
            return; // bytes beyond the response: the upstream is confused
        }
        if conn.buf.capacity() > MAX_READ {
            conn.buf = BytesMut::new();
        }
        conn.next_read = MIN_READ;
        let now = Instant::now();
        let expired: Vec<Idle> = {
            let Ok(mut idle) = self.idle.lock() else { return };
            // Oldest first: the front holds the connections idle the longest.
            let n = idle.iter().take_while(|i| i.expired(now, self.idle_timeout)).count();
            let expired = idle.drain(..n).collect();
            if idle.len() < self.max_idle {
                idle.push(Idle { conn, since: now });
            }
            expired
        };
        drop(expired); // closed outside the lock
        if !self.sweeping.swap(true, Relaxed) {
            self.start_sweeper();
        }
    }

    /// Without traffic nothing would close idle connections: one task per pool
    /// (started with its first idle connection, gone with the pool) closes the
    /// expired ones and those the upstream closed, every half idle timeout.
    fn start_sweeper(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let pool = Arc::downgrade(self);
        let every = (self.idle_timeout / 2).max(Duration::from_millis(50));
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }

    fn sweep(&self) {
        let now = Instant::now();
        let closed: Vec<Idle> = {
            let Ok(mut idle) = self.idle.lock() else { return };
            let (keep, close) = std::mem::take(&mut *idle).into_iter().partition(|i| i.usable(now, self.idle_timeout));
            *idle = keep;
            close
        };
        drop(closed);
    }

    fn clear(&self) {
        let stale = self.idle.lock().map(|mut idle| std::mem::take(&mut *idle)).unwrap_or_default();
        drop(stale);
    }
}

/// A failed exchange, and whether any byte of an answer had come back.
struct Failed {
    error: H1Error,
    answered: bool,
}

impl From<io::Error> for Failed {
    fn from(error: io::Error) -> Self {
        Failed { error: error.into(), answered: false }
    }
}

/// How writing a request ended.
enum Sent {
    /// Every byte went out.
    All,
    /// The upstream answered before it took the whole request (a 413 or 401 to
    /// a large body): its answer is the response, and the connection is spent.
    Early(head::ResponseHead),
    /// Writing failed; an answer may still be waiting to be read.
    Failed(io::Error),
}

/// Writes the request and reads until the response head is complete.
async fn exchange(conn: &mut Conn, wire: &[u8], rest: &[u8], method: &Method) -> Result<head::ResponseHead, Failed> {
    let mut write_error = match write_request(conn, [wire, rest], method).await? {
        Sent::All => None,
        Sent::Early(mut head) => {
            head.keep_alive = false;
            return Ok(head);
        }
        Sent::Failed(error) => Some(error),
    };
    loop {
        let answered = !conn.buf.is_empty();
        match head::parse_response(&mut conn.buf, method) {
            Ok(Some(mut head)) => {
                head.keep_alive &= write_error.is_none();
                return Ok(head);
            }
            Ok(None) => {}
            Err(error) => return Err(Failed { error, answered: true }),
        }
        let error = match conn.fill().await {
            Ok(0) => H1Error::Closed,
            Ok(_) => continue,
            Err(error) => error.into(),
        };
        // After a failed write (the upstream closed on a body it refused), the
        // answer it sent first was still worth reading; without one, the write
        // error is what happened.
        let error = match write_error.take() {
            Some(write) if !answered => write.into(),
            _ => error,
        };
        return Err(Failed { error, answered });
    }
}

/// Writes `parts` in order. While the upstream does not take more bytes, it
/// reads whatever the upstream sends meanwhile: an upstream that answers a
/// large body early and stops reading would otherwise leave the write
/// blocked until the header timeout, and the client with a 504 instead of
/// the upstream's own answer.
async fn write_request(conn: &mut Conn, parts: [&[u8]; 2], method: &Method) -> Result<Sent, Failed> {
    let mut written = [0usize; 2];
    std::future::poll_fn(|cx| {
        loop {
            let Some(i) = (0..parts.len()).find(|&i| written[i] < parts[i].len()) else {
                return Poll::Ready(Ok(Sent::All));
            };
            match std::pin::Pin::new(&mut conn.io).poll_write(cx, &parts[i][written[i]..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Sent::Failed(io::ErrorKind::WriteZero.into()))),
                Poll::Ready(Ok(n)) => written[i] += n,
                Poll::Ready(Err(error)) => return Poll::Ready(Ok(Sent::Failed(error))),
                Poll::Pending => loop {
                    match head::parse_response(&mut conn.buf, method) {
                        Ok(Some(head)) => return Poll::Ready(Ok(Sent::Early(head))),
                        Ok(None) => {}
                        Err(error) => return Poll::Ready(Err(Failed { error, answered: true })),
                    }
                    match std::task::ready!(conn.poll_fill(cx)) {
                        // Closed: the read after the write error will tell.
                        Ok(0) => return Poll::Ready(Ok(Sent::Failed(io::ErrorKind::BrokenPipe.into()))),
                        Ok(_) => {}
                        Err(error) => return Poll::Ready(Ok(Sent::Failed(error))),
                    }
                },
            }
        }
    })
    .await
}
