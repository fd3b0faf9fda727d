//! One pooled HTTP/2 connection: opened (TCP, TLS with ALPN, the h2
//! handshake, and one PING whose answer proves the peer's SETTINGS, its
//! stream limit among them, have been read), then driven by its own task,
//! which also pings it (`keepalive_interval`, `keepalive_timeout`) and
//! closes it when idle.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::client::{Connection, ResponseFuture, SendRequest};
use h2::{Ping, PingPong, SendStream};
use http::Request;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::Pool;

/// The stream window sluice grants per stream and per connection (hyper's
/// client defaults): long answers are not throttled by the 64 KiB default.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 5 << 20;
/// Largest response head accepted.
const MAX_HEAD: u32 = 64 << 10;

/// A connection's send side, shared by the pool and its streams.
pub struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    closed: AtomicBool,
    /// Wakes the connection's task when the pool closes it.
    closing: Notify,
}

impl Conn {
    /// Its number in the pool.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether it takes no new streams (closed, going away, or dead).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// Takes no new streams from now on; its task ends it once idle.
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
        self.closing.notify_one();
    }

    /// Streams the peer lets it have open at once.
    pub fn max_streams(&self) -> usize {
        self.send.current_max_send_streams()
    }

    /// Opens a stream with `request`'s head and sends `body` whole (h2
    /// buffers it and sends as flow control allows).
    /// It fails only before a stream was opened: nothing reached the peer.
    pub(super) async fn send(
        &self,
        request: Request<()>,
        body: Bytes,
    ) -> Result<(ResponseFuture, SendStream<Bytes>), h2::Error> {
        let mut send = self.send.clone();
        let outcome = async {
            poll_fn(|cx| send.poll_ready(cx)).await?;
            let end = body.is_empty();
            let (response, mut stream) = send.send_request(request, end)?;
            if !end {
                // A peer may answer from the head alone and reset the stream
                // (NO_ERROR: "keep your body"), even before this line runs:
                // the body is then refused, but the answer stands. The
                // response future tells what happened; a dead stream fails it.
                let _ = stream.send_data(body, true);
            }
            Ok((response, stream))
        }
        .await;
        if outcome.is_err() {
            // Going away or gone: no new streams here.
            self.close();
        }
        outcome
    }
}

/// Why a connection could not be opened.
#[derive(Debug)]
pub(super) enum OpenError {
    /// TLS ALPN chose HTTP/1.1.
    NotHttp2,
    /// Anything else, said for the log.
    Failed(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotHttp2 => f.write_str("the upstream chose HTTP/1.1 in TLS ALPN"),
            Self::Failed(why) => f.write_str(why),
        }
    }
}

/// Opens connection `id` of `pool` and starts its task.
pub(super) async fn open(pool: &Arc<Pool>, id: u64) -> Result<Arc<Conn>, OpenError> {
    let settings = &pool.settings;
    let wait = settings.connect_timeout;
    let authority = &settings.authority;
    let port = authority.port_u16().unwrap_or(if settings.tls.is_some() { 443 } else { 80 });
    let connect = TcpStream::connect((authority.host(), port));
    let tcp = match tokio::time::timeout(wait, connect).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(error)) => return Err(OpenError::Failed(format!("connect to {authority}: {error}"))),
        Err(_) => return Err(OpenError::Failed(format!("connect to {authority}: no answer in {wait:?}"))),
    };
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &settings.tls else {
        return handshake(pool, id, tcp).await;
    };
    let name = rustls::pki_types::ServerName::try_from(authority.host().to_string())
        .map_err(|e| OpenError::Failed(format!("`{}` is not a TLS server name: {e}", authority.host())))?;
    let stream = match tokio::time::timeout(wait, tls.connect(name, tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(OpenError::Failed(format!("TLS with {authority}: {error}"))),
        Err(_) => return Err(OpenError::Failed(format!("TLS with {authority}: no handshake in {wait:?}"))),
    };
    if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(OpenError::NotHttp2);
    }
    // Boxed: the TLS state would make every h2c connection's task as large.
    Box::pin(handshake(pool, id, stream)).await
}

async fn handshake<T>(pool: &Arc<Pool>, id: u64, io: T) -> Result<Arc<Conn>, OpenError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = &pool.settings;
    let shaken = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // As sluice's HTTP/1.1 client: no pushed streams, heads up to 64 KiB.
        .enable_push(false)
        .max_header_list_size(MAX_HEAD)
        .handshake::<_, Bytes>(io);
    let (send, mut connection) = match tokio::time::timeout(settings.connect_timeout, shaken).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(error)) => return Err(OpenError::Failed(format!("HTTP/2 handshake: {error}"))),
        Err(_) => return Err(OpenError::Failed("HTTP/2 handshake: no answer in time".into())),
    };
    let Some(ping) = connection.ping_pong() else {
        return Err(OpenError::Failed("HTTP/2 connection without PING".into()));
    };
    let conn = Arc::new(Conn { id, send, closed: AtomicBool::new(false), closing: Notify::new() });
    let (ready, first_pong) = oneshot::channel();
    let task = Driver {
        conn: Arc::clone(&conn),
        pool: Arc::downgrade(pool),
        keepalive: (settings.keepalive_interval, settings.keepalive_timeout),
        check_every: settings.keepalive_interval.min(settings.idle_timeout / 2).max(Duration::from_millis(10)),
    };
    tokio::spawn(task.run(connection, ping, ready));
    // The peer's SETTINGS come before its answer to our PING: after it, the
    // stream limit is the peer's, not h2's unlimited default.
    match tokio::time::timeout(settings.connect_timeout, first_pong).await {
        Ok(Ok(())) => Ok(conn),
        _ => {
            conn.close();
            Err(OpenError::Failed("HTTP/2 connection: no PING answer in time".into()))
        }
    }
}

/// What a connection's task needs besides the connection.
struct Driver {
    conn: Arc<Conn>,
    pool: Weak<Pool>,
    keepalive: (Duration, Duration),
    check_every: Duration,
}

impl Driver {
    async fn run<T>(self, mut connection: Connection<T, Bytes>, mut ping: PingPong, ready: oneshot::Sender<()>)
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let (interval, timeout) = self.keepalive;
        let mut ready = Some(ready);
        let mut pinged = ping.send_ping(Ping::opaque()).is_ok().then(Instant::now);
        let mut answered = Instant::now();
        let mut tick = tokio::time::interval(self.check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ended = &mut connection => {
                    if let Err(error) = ended {
                        tracing::debug!(conn = self.conn.id, %error, "upstream HTTP/2 connection ended");
                    }
                    break;
                }
                pong = poll_fn(|cx| if pinged.is_some() { ping.poll_pong(cx) } else { Poll::Pending }) => {
                    if pong.is_err() {
                        break;
                    }
                    pinged = None;
                    answered = Instant::now();
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                }
                () = self.conn.closing.notified() => {}
                // The request that opened it gave up before the first PONG.
                () = poll_fn(|cx| match ready.as_mut() {
                    Some(opener) => opener.poll_closed(cx),
                    None => Poll::Pending,
                }) => {}
                _ = tick.tick() => {}
            }
            // The request that opened it was dropped before the first PONG:
            // nobody will add it to the pool.
            if ready.as_ref().is_some_and(oneshot::Sender::is_closed) {
                break;
            }
            if pinged.is_some_and(|at| at.elapsed() >= timeout) {
                tracing::debug!(conn = self.conn.id, "upstream HTTP/2 connection did not answer a PING; closing it");
                break;
            }
            if pinged.is_none() && answered.elapsed() >= interval {
                pinged = ping.send_ping(Ping::opaque()).is_ok().then(Instant::now);
            }
            let Some(pool) = self.pool.upgrade() else { break };
            if pool.close_if_idle(self.conn.id)
                || (self.conn.is_closed() && ready.is_none() && !pool.holds(self.conn.id))
            {
                break;
            }
        }
        self.conn.closed.store(true, Relaxed);
        if let Some(pool) = self.pool.upgrade() {
            pool.forget(self.conn.id);
        }
    }
}
