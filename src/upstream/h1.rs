//! The HTTP/1.1 client for cleartext upstreams, run on the request's own task.
//!
//! hyper-util's pooled client hands every request to a separate connection
//! task through a channel, answers through another, and feeds the response
//! body through a third, so one proxied request costs several task wake-ups
//! and a `HeaderMap` clone on top of the syscalls. This client writes the
//! request head and body with one `write` from the task that serves the client,
//! reads the response head into the connection's buffer, and hands body frames
//! on as slices of that buffer (a lone chunk without a copy; chunks that
//! arrived in one read joined into one frame): no task, no channel. A finished
//! connection goes back to a small lock-free pool.
//!
//! Scope: `http://` upstreams whose `http2` is not `prior-knowledge`, and
//! request bodies sluice has read whole (everything it sniffs). TLS, HTTP/2 and
//! streamed uploads go through hyper-util's client.
//!
//! It never sends a request twice. A failure reports whether any byte of the
//! request was written and whether the connection came from the pool; the
//! retry loop decides whether a re-send is safe.

pub mod body;
mod framing;
mod head;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use crossbeam_queue::ArrayQueue;
use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response};
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::tasks::{Tasks, loops};
pub use body::H1Body;

/// First read buffer of a connection; it doubles (up to [`MAX_READ`]) while
/// reads fill it, so big answers take few syscalls and slow streams stay small.
const MIN_READ: usize = 2 * 1024;
/// Largest read buffer reservation.
const MAX_READ: usize = 64 * 1024;
/// Idle connections the runtime's workers keep per host when connections
/// are served on event loops (the workers then only run background checks).
const RUNTIME_IDLE_WITH_LOOPS: usize = 4;
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

/// A failed exchange and what the retry loop needs to judge a re-send.
#[derive(Debug)]
pub struct H1Failure {
    /// What went wrong.
    pub error: H1Error,
    /// Whether any byte of the request was written to the connection.
    pub written: bool,
    /// Whether the connection came from the pool (it may have gone stale there).
    pub reused: bool,
    /// Whether any byte of an answer came back.
    pub answered: bool,
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

/// Keep-alive connections to one `host:port`, in bounded lock-free queues:
/// a checkout and a return are one CAS each, and the readiness check of an
/// idle connection (a syscall at most) runs outside any lock, by whoever holds
/// that connection.
pub struct Pool {
    addr: String,
    /// The `Host` header: `host[:port]` as in the URL, without user-info.
    host: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Idle connections, one queue per event loop plus one for the runtime's
    /// workers: a socket's readiness is reported to the loop that opened it,
    /// so a request reuses only connections of its own loop (never waking
    /// another core to learn that its answer arrived).
    idle: Box<[ArrayQueue<Idle>]>,
    opened: AtomicU64,
    /// Whether the task that closes expired and dead idle connections runs.
    sweeping: AtomicBool,
    /// Where that task runs.
    tasks: Tasks,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool for `authority` (port 80 when it has none) keeping up to
    /// `max_idle` idle connections; with `event_loops`, each loop its share
    /// of them (rounded up), and the runtime's workers, which then only make
    /// background checks, a few. Its sweeper runs under `tasks`.
    pub fn new(
        authority: Authority,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
        event_loops: usize,
        tasks: Tasks,
    ) -> Self {
        let max_idle = max_idle.max(1);
        let (runtime_share, loop_share) = match event_loops {
            0 => (max_idle, 0),
            loops => (max_idle.min(RUNTIME_IDLE_WITH_LOOPS), max_idle.div_ceil(loops)),
        };
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
            idle: std::iter::once(runtime_share)
                .chain(std::iter::repeat_n(loop_share, event_loops))
                .map(ArrayQueue::new)
                .collect(),
            opened: AtomicU64::new(0),
            sweeping: AtomicBool::new(false),
            tasks,
        }
    }

    /// Connections opened so far (for `/stats` and tests).
    pub fn opened(&self) -> u64 {
        self.opened.load(Relaxed)
    }

    /// Connections idle in the pool now.
    pub fn idle(&self) -> usize {
        self.idle.iter().map(ArrayQueue::len).sum()
    }

    /// The idle connections of the calling thread's event loop.
    fn idle_here(&self) -> &ArrayQueue<Idle> {
        loops::here(&self.idle)
    }

    /// Sends one request and returns once the response head is in; the body
    /// streams from the same connection, which returns to the pool at its end.
    /// One attempt, never more: a pooled connection the upstream closed while
    /// idle fails the request with `reused` set, for the retry loop to judge.
    pub async fn send(
        self: &Arc<Self>,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        auth: (&HeaderName, &HeaderValue),
        body: &Bytes,
    ) -> Result<Response<H1Body>, H1Failure> {
        let inline = body.len() <= INLINE_BODY;
        let mut wire = Vec::with_capacity(512 + if inline { body.len() } else { 0 });
        head::encode_request(&mut wire, method, path_and_query, &self.host, headers, auth, body.len());
        if inline {
            wire.extend_from_slice(body);
        }
        let rest: &[u8] = if inline { b"" } else { body };
        let (mut conn, reused) = match self.checkout() {
            Some(conn) => (conn, true),
            None => {
                let conn = self.connect().await.map_err(|error| H1Failure {
                    error,
                    written: false,
                    reused: false,
                    answered: false,
                })?;
                (conn, false)
            }
        };
        match exchange(&mut conn, &wire, rest, method).await {
            Ok(head) => {
                let keep_alive = head.keep_alive;
                let body = H1Body::new(conn, head.framing, keep_alive, Arc::clone(self));
                Ok(head.response.map(|()| body))
            }
            Err(Failed { error, written, answered }) => {
                if reused && !answered {
                    // Closed while idle (a race the readiness check cannot see):
                    // the idle ones behind it on this loop are likely stale too.
                    tracing::debug!(upstream = %self.addr, %error, "pooled connection failed before any answer");
                    self.clear();
                }
                Err(H1Failure { error, written, reused, answered })
            }
        }
    }

    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let idle_here = self.idle_here();
        while let Some(idle) = idle_here.pop() {
            if idle.usable(now, self.idle_timeout) {
                return Some(idle.conn);
            }
        }
        None
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

    /// Takes back a connection whose response ended cleanly. A full pool
    /// closes it instead.
    fn put(self: &Arc<Self>, mut conn: Conn) {
        if !conn.buf.is_empty() {
            return; // bytes beyond the response: the upstream is confused
        }
        if conn.buf.capacity() > MAX_READ {
            conn.buf = BytesMut::new();
        }
        conn.next_read = MIN_READ;
        if self.idle_here().push(Idle { conn, since: Instant::now() }).is_err() {
            return;
        }
        if !self.sweeping.swap(true, Relaxed) {
            self.start_sweeper();
        }
    }

    /// Without traffic nothing would close idle connections: one task per pool
    /// (started with its first idle connection, gone with the pool or at
    /// shutdown) closes the expired ones and those the upstream closed, every
    /// half idle timeout.
    fn start_sweeper(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        let every = (self.idle_timeout / 2).max(Duration::from_millis(50));
        let tasks = self.tasks.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = tasks.stopped() => return,
                }
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }

    /// Takes every idle connection out, checks each (outside any lock), and
    /// puts back those still usable; the expired and dead ones close.
    fn sweep(&self) {
        let now = Instant::now();
        for shard in &self.idle {
            let mut keep = Vec::with_capacity(shard.len());
            while let Some(idle) = shard.pop() {
                if idle.usable(now, self.idle_timeout) {
                    keep.push(idle);
                }
            }
            // Oldest first back in, so they are checked out (and re-timed) first.
            keep.sort_by_key(|idle| idle.since);
            for idle in keep {
                let _ = shard.push(idle);
            }
        }
    }

    /// Closes this loop's idle connections (other loops find out their own).
    fn clear(&self) {
        let idle_here = self.idle_here();
        while idle_here.pop().is_some() {}
    }
}

/// A failed exchange: whether any byte of the request went out, and whether
/// any byte of an answer had come back.
struct Failed {
    error: H1Error,
    written: bool,
    answered: bool,
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
    let mut written = 0usize;
    let sent = write_request(conn, [wire, rest], method, &mut written).await;
    let written = written > 0;
    let mut write_error = match sent {
        Ok(Sent::All) => None,
        Ok(Sent::Early(mut head)) => {
            head.keep_alive = false;
            return Ok(head);
        }
        Ok(Sent::Failed(error)) => Some(error),
        Err(error) => return Err(Failed { error, written, answered: true }),
    };
    loop {
        let answered = !conn.buf.is_empty();
        match head::parse_response(&mut conn.buf, method) {
            Ok(Some(mut head)) => {
                head.keep_alive &= write_error.is_none();
                return Ok(head);
            }
            Ok(None) => {}
            Err(error) => return Err(Failed { error, written, answered: true }),
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
        return Err(Failed { error, written, answered });
    }
}

/// Writes `parts` in order, counting the bytes written in `written`. While
/// the upstream does not take more bytes, it reads whatever the upstream sends
/// meanwhile: an upstream that answers a large body early and stops reading
/// would otherwise leave the write blocked until the header timeout, and the
/// client with a 504 instead of the upstream's own answer. An `Err` is a
/// malformed early answer.
async fn write_request(
    conn: &mut Conn,
    parts: [&[u8]; 2],
    method: &Method,
    written: &mut usize,
) -> Result<Sent, H1Error> {
    let mut done = [0usize; 2];
    std::future::poll_fn(|cx| {
        loop {
            let Some(i) = (0..parts.len()).find(|&i| done[i] < parts[i].len()) else {
                return Poll::Ready(Ok(Sent::All));
            };
            match std::pin::Pin::new(&mut conn.io).poll_write(cx, &parts[i][done[i]..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Sent::Failed(io::ErrorKind::WriteZero.into()))),
                Poll::Ready(Ok(n)) => {
                    done[i] += n;
                    *written += n;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Ok(Sent::Failed(error))),
                Poll::Pending => loop {
                    match head::parse_response(&mut conn.buf, method) {
                        Ok(Some(head)) => return Poll::Ready(Ok(Sent::Early(head))),
                        Ok(None) => {}
                        Err(error) => return Poll::Ready(Err(error)),
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
