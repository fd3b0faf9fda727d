//! The HTTP/1.1 client against a scripted raw-TCP upstream on loopback: what
//! it writes, what it reuses, and how it survives an upstream that closes,
//! lies or stalls.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{H1Error, H1Failure, Pool, RUNTIME_IDLE_WITH_LOOPS};
use crate::tasks::Tasks;
use crossbeam_queue::ArrayQueue;

/// What the scripted upstream does with one request.
#[derive(Clone, Copy)]
enum Act {
    /// Write these bytes and keep reading from the connection.
    Answer(&'static [u8]),
    /// Write these bytes, then close the connection.
    AnswerAndClose(&'static [u8]),
    /// Close the connection without answering.
    Close,
}

/// A raw upstream that plays `script` in order, one entry per request
/// received (on whichever connection), and keeps every request it read.
struct Scripted {
    addr: std::net::SocketAddr,
    requests: Arc<StdMutex<Vec<Vec<u8>>>>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl Scripted {
    async fn start(script: Vec<Act>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(StdMutex::new(Vec::new()));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let script = Arc::new(script);
        let (seen, count) = (Arc::clone(&requests), Arc::clone(&accepted));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(serve_conn(stream, Arc::clone(&script), Arc::clone(&seen)));
            }
        });
        Self { addr, requests, accepted }
    }

    fn pool(&self) -> Arc<Pool> {
        self.pool_idle_for(Duration::from_secs(60))
    }

    fn pool_idle_for(&self, idle_timeout: Duration) -> Arc<Pool> {
        let authority = self.addr.to_string().parse().unwrap();
        Arc::new(Pool::new(authority, Duration::from_secs(2), idle_timeout, 8, 0, Tasks::default()))
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

async fn serve_conn(mut stream: TcpStream, script: Arc<Vec<Act>>, seen: Arc<StdMutex<Vec<Vec<u8>>>>) {
    let mut buf = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buf).await else { return };
        let act = {
            let mut seen = seen.lock().unwrap();
            seen.push(request);
            script.get(seen.len() - 1).copied().unwrap_or(Act::Close)
        };
        match act {
            Act::Answer(bytes) => stream.write_all(bytes).await.unwrap(),
            Act::AnswerAndClose(bytes) => {
                stream.write_all(bytes).await.unwrap();
                return;
            }
            Act::Close => return,
        }
    }
}

/// One request (head and `content-length` body), or `None` at end of stream.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length: usize =
                head.lines().find_map(|l| l.strip_prefix("content-length: ")).map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + length {
                return Some(buf.drain(..end + 4 + length).collect());
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

const OK_HELLO: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\nhello";
const SSE_CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
    f\r\ndata: {\"a\":1}\n\n\r\nf\r\ndata: {\"b\":2}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\nx-trailer: t\r\n\r\n";

async fn send(pool: &Arc<Pool>, body: &'static [u8]) -> Result<(StatusCode, Bytes), H1Error> {
    send_once(pool, body).await.map_err(|failed| failed.error)?.await
}

/// Sends one request; the outer error is the exchange's (with its facts), the
/// inner one the body's.
async fn send_once(
    pool: &Arc<Pool>,
    body: &'static [u8],
) -> Result<impl Future<Output = Result<(StatusCode, Bytes), H1Error>>, H1Failure> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let auth = HeaderValue::from_static("Bearer sk-up");
    let response = pool
        .send(
            &Method::POST,
            "/v1/chat/completions",
            &headers,
            (&http::header::AUTHORIZATION, &auth),
            &Bytes::from_static(body),
        )
        .await?;
    Ok(async move {
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    })
}

#[tokio::test]
async fn writes_one_clean_request_and_reuses_the_connection() {
    let upstream = Scripted::start(vec![Act::Answer(OK_HELLO); 3]).await;
    let pool = upstream.pool();
    for _ in 0..3 {
        assert_eq!(send(&pool, b"{\"m\":1}").await.unwrap(), (StatusCode::OK, Bytes::from_static(b"hello")));
    }
    assert_eq!((pool.opened(), upstream.accepted(), pool.idle()), (1, 1, 1));
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(
        requests[0],
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             authorization: Bearer sk-up\r\ncontent-length: 7\r\n\r\n{{\"m\":1}}",
            upstream.addr
        )
    );
}

#[tokio::test]
async fn chunked_stream_passes_through_and_the_connection_is_reused() {
    let upstream = Scripted::start(vec![Act::Answer(SSE_CHUNKED), Act::Answer(OK_HELLO)]).await;
    let pool = upstream.pool();
    let (status, body) = send(&pool, b"{}").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n");
    assert_eq!(send(&pool, b"{}").await.unwrap().1, Bytes::from_static(b"hello"));
    assert_eq!(pool.opened(), 1);
}

#[tokio::test]
async fn chunks_read_together_leave_as_one_frame_and_bad_grammar_follows_the_good_data() {
    let upstream = Scripted::start(vec![
        Act::Answer(SSE_CHUNKED),
        Act::Answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nZZ\r\n"),
    ])
    .await;
    let pool = upstream.pool();
    let none = HeaderMap::new();
    let auth = HeaderValue::from_static("k");
    // One write upstream, one read here: the three events come out as one frame.
    let mut body = pool
        .send(&Method::POST, "/", &none, (&http::header::AUTHORIZATION, &auth), &Bytes::new())
        .await
        .unwrap()
        .into_body();
    let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&frame[..], b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n");
    assert!(body.is_end_stream() && body.frame().await.is_none());

    let mut body = pool
        .send(&Method::POST, "/", &none, (&http::header::AUTHORIZATION, &auth), &Bytes::new())
        .await
        .unwrap()
        .into_body();
    assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), Bytes::from_static(b"abc"));
    assert!(matches!(body.frame().await, Some(Err(H1Error::Protocol(_)))));
}

#[tokio::test]
async fn connection_close_and_unframed_bodies_are_not_reused() {
    let upstream = Scripted::start(vec![
        Act::Answer(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"),
        Act::AnswerAndClose(b"HTTP/1.1 200 OK\r\n\r\nuntil close"),
        Act::Answer(OK_HELLO),
    ])
    .await;
    let pool = upstream.pool();
    assert_eq!(send(&pool, b"{}").await.unwrap().1, Bytes::from_static(b"ok"));
    assert_eq!(send(&pool, b"{}").await.unwrap().1, Bytes::from_static(b"until close"));
    assert_eq!(send(&pool, b"{}").await.unwrap().1, Bytes::from_static(b"hello"));
    assert_eq!((pool.opened(), upstream.accepted()), (3, 3));
}

#[tokio::test]
async fn a_pooled_connection_closed_under_the_request_fails_once_and_says_so() {
    // The second request lands on the kept-alive connection, which the upstream
    // closes without a word once it has read it (its idle timeout racing the
    // request, or a crash). The pool never sends it again by itself: it says
    // the request was written on a reused connection and nothing came back,
    // and the retry loop decides.
    let upstream = Scripted::start(vec![Act::Answer(OK_HELLO), Act::Close, Act::Answer(OK_HELLO)]).await;
    let pool = upstream.pool();
    send(&pool, b"{}").await.unwrap();
    let Err(failed) = send_once(&pool, b"{}").await else { panic!("the closed connection answered") };
    assert!(matches!(failed.error, H1Error::Closed), "{}", failed.error);
    assert!(failed.written && failed.reused && !failed.answered);
    assert_eq!((pool.opened(), upstream.requests().len()), (1, 2), "sent once, on the pooled connection");
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_while_idle_is_skipped() {
    let upstream = Scripted::start(vec![Act::AnswerAndClose(OK_HELLO), Act::Answer(OK_HELLO)]).await;
    let pool = upstream.pool();
    send(&pool, b"{}").await.unwrap();
    assert_eq!(pool.idle(), 1);
    // Once the reactor has seen the upstream's FIN, the idle connection is
    // known dead and is closed rather than used (bounded wait, 5 s).
    for _ in 0..500 {
        pool.sweep();
        if pool.idle() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pool.idle(), 0, "the closed connection was never seen as closed");
    assert_eq!(send(&pool, b"{}").await.unwrap().1, Bytes::from_static(b"hello"));
    assert_eq!(pool.opened(), 2);
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn idle_connections_close_after_the_idle_timeout_without_traffic() {
    let upstream = Scripted::start(vec![Act::Answer(OK_HELLO)]).await;
    let pool = upstream.pool_idle_for(Duration::from_millis(100));
    send(&pool, b"{}").await.unwrap();
    assert_eq!(pool.idle(), 1);
    // No further request: the sweeper alone must close it (bounded wait, 5 s).
    for _ in 0..500 {
        if pool.idle() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pool.idle(), 0, "the idle connection outlived its timeout");
}

#[tokio::test]
async fn a_fresh_connection_that_closes_or_lies_is_an_error_not_a_retry() {
    let upstream = Scripted::start(vec![Act::Close, Act::Answer(b"SSH-2.0-nope\r\n\r\n")]).await;
    let pool = upstream.pool();
    assert!(matches!(send(&pool, b"{}").await, Err(H1Error::Closed)));
    assert!(matches!(send(&pool, b"{}").await, Err(H1Error::Protocol(_))));
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_a_dropped_body_closes_the_connection() {
    let upstream = Scripted::start(vec![
        Act::AnswerAndClose(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf"),
        Act::Answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nopen\r\n"),
        Act::Answer(OK_HELLO),
    ])
    .await;
    let pool = upstream.pool();
    assert!(matches!(send(&pool, b"{}").await, Err(H1Error::Closed)));
    let response = pool
        .send(
            &Method::POST,
            "/",
            &HeaderMap::new(),
            (&http::header::AUTHORIZATION, &HeaderValue::from_static("k")),
            &Bytes::new(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), Bytes::from_static(b"open"));
    drop(body); // the client left mid-stream
    assert_eq!(send(&pool, b"{}").await.unwrap().1, Bytes::from_static(b"hello"));
    assert_eq!(pool.opened(), 3);
}

#[tokio::test]
async fn a_large_body_arrives_whole_and_refused_connects_say_so() {
    let upstream = Scripted::start(vec![Act::Answer(OK_HELLO)]).await;
    let pool = upstream.pool();
    let big: &'static [u8] = Box::leak(vec![b'x'; 3 * super::INLINE_BODY].into_boxed_slice());
    send(&pool, big).await.unwrap();
    assert!(upstream.requests()[0].ends_with(&String::from_utf8_lossy(big).into_owned()));

    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let authority = closed.local_addr().unwrap().to_string().parse().unwrap();
    drop(closed);
    let pool = Arc::new(Pool::new(authority, Duration::from_secs(2), Duration::from_secs(60), 8, 0, Tasks::default()));
    let error = send(&pool, b"{}").await.unwrap_err();
    assert!(error.is_connect(), "{error}");
}

/// An upstream that reads a request's head, answers at once, and then reads no
/// more of the body: holding the connection open, or closing it.
async fn early_answerer(hold: bool) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if stream.read_exact(&mut byte).await.is_err() {
                return;
            }
            head.push(byte[0]);
        }
        let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large";
        stream.write_all(answer).await.unwrap();
        if hold {
            let _ = released.await;
        }
    });
    (addr, release)
}

#[tokio::test]
async fn an_early_answer_to_a_large_body_is_the_response() {
    // Far more than loopback's socket buffers take: the write cannot finish.
    let body: &'static [u8] = Box::leak(vec![b'x'; 32 << 20].into_boxed_slice());
    for hold in [true, false] {
        let (addr, release) = early_answerer(hold).await;
        let pool = Arc::new(Pool::new(
            addr.to_string().parse().unwrap(),
            Duration::from_secs(2),
            Duration::from_secs(60),
            8,
            0,
            Tasks::default(),
        ));
        let sent = tokio::time::timeout(Duration::from_secs(10), send(&pool, body)).await;
        let (status, answer) = sent.expect("the write blocked on an upstream that had answered").unwrap();
        assert_eq!((status, &answer[..]), (StatusCode::PAYLOAD_TOO_LARGE, &b"too large"[..]), "hold: {hold}");
        assert_eq!(pool.idle(), 0, "a connection with half a request on it is never reused");
        drop(release);
    }
}

#[test]
fn the_host_header_never_carries_user_info() {
    let pool = |authority: &str| {
        Pool::new(authority.parse().unwrap(), Duration::from_secs(1), Duration::from_secs(1), 1, 0, Tasks::default())
    };
    assert_eq!(pool("user:pw@10.0.0.5:8000").host, "10.0.0.5:8000");
    assert_eq!(pool("api.example").host, "api.example");
    assert_eq!(pool("api.example").addr, "api.example:80");
}

#[test]
fn idle_connections_are_shared_out_between_the_loops() {
    let capacities = |max_idle, loops| {
        let authority = "127.0.0.1:9".parse().unwrap();
        let pool =
            Pool::new(authority, Duration::from_secs(1), Duration::from_secs(1), max_idle, loops, Tasks::default());
        pool.idle.iter().map(ArrayQueue::capacity).collect::<Vec<_>>()
    };
    assert_eq!(capacities(256, 0), [256], "no loops: one queue for the workers");
    assert_eq!(capacities(256, 2), [RUNTIME_IDLE_WITH_LOOPS, 128, 128], "each loop its share, the workers a few");
    assert_eq!(capacities(5, 2), [RUNTIME_IDLE_WITH_LOOPS, 3, 3], "shares round up");
    assert_eq!(capacities(1, 4), [1, 1, 1, 1, 1]);
}
