//! `[server] event_loops`: client connections served on single-threaded
//! loops instead of the runtime's workers. The core of the other suites runs
//! again here, over every upstream transport, with connections dealt out to
//! two loops: plain and streamed answers, HTTP/2 clients, single flight
//! across loops, idle upstream connections kept per loop, and the drain.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};

use crate::per_transport;
use crate::support::{CLIENT_KEY, Harness, Opts, Reply, Transport, h1_client, send};

/// Answers to this model are cached (the single-flight test needs that).
const CACHED: &str = r#"{"model":"plain","messages":[{"role":"user","content":"hi"}]}"#;
/// The other tests count upstream calls, so they use a model that opts out.
const CHAT: &str = r#"{"model":"uncached","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str = r#"{"model":"uncached","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

async fn on_loops(t: Transport) -> Harness {
    Harness::start_with(Opts {
        transport: t,
        server_extra: "event_loops = 2",
        tables: "[cache]\nenabled = true\n\n[[models]]\nname = \"uncached\"\nupstream = \"mock\"\ncache = false\n"
            .into(),
        ..Opts::default()
    })
    .await
}

/// A chat request in origin form, for a connection of its own.
fn chat() -> http::Request<Full<Bytes>> {
    post().body(Full::new(Bytes::from(CHAT))).unwrap()
}

fn stream(chunks: &str, gap_ms: &str) -> http::Request<Full<Bytes>> {
    post().header("x-mock-chunks", chunks).header("x-mock-gap-ms", gap_ms).body(Full::new(Bytes::from(STREAM))).unwrap()
}

fn post() -> http::request::Builder {
    http::Request::post("/v1/chat/completions")
        .header("host", "sluice")
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("content-type", "application/json")
}

/// One client connection, made now, that every request through it uses
/// (hyper-util's pooled client may open a second one behind a quick
/// request, which would be dealt to the other loop).
struct Connection(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl Connection {
    async fn open(h: &Harness) -> Self {
        let stream = tokio::net::TcpStream::connect(h.gateway.addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        Self(sender)
    }

    async fn send(&mut self, request: http::Request<Full<Bytes>>) -> Reply {
        self.0.ready().await.unwrap();
        let response = self.0.send_request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        Reply { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() }
    }
}

/// Connections each loop was dealt, from `/stats` (asked on a connection
/// of its own, counted too).
async fn per_loop(h: &Harness) -> Vec<u64> {
    let request = http::Request::get(h.url("/stats")).header("authorization", format!("Bearer {CLIENT_KEY}"));
    let stats = send(&h1_client(), request.body(Full::new(Bytes::new())).unwrap()).await.json();
    let counts = stats["connections"]["per_loop"].as_array().unwrap_or_else(|| panic!("no per-loop counts: {stats}"));
    counts.iter().map(|n| n.as_u64().unwrap()).collect()
}

/// Six client connections, dealt three to each loop: every plain and
/// streamed answer whole, each request sent upstream once.
async fn answers_plain_and_streamed_on_every_loop(t: Transport) {
    let h = on_loops(t).await;
    for _ in 0..6 {
        let mut connection = Connection::open(&h).await;
        let plain = connection.send(chat()).await;
        assert_eq!(plain.status, StatusCode::OK, "{:?}", plain.body);
        assert!(plain.json()["choices"][0]["message"]["content"].is_string());
        let streamed = connection.send(stream("5", "0")).await;
        let text = String::from_utf8_lossy(&streamed.body);
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert_eq!(text.matches("tok").count(), 5, "{text}");
    }
    let stats = h.stats();
    assert_eq!(stats.path("/v1/chat/completions"), 12, "each request upstream once");
    assert_eq!(stats.streams_finished, 6);
    assert_eq!(per_loop(&h).await, [4, 3], "dealt in turn (the look at /stats is the seventh)");
}

/// An HTTP/2 client's concurrent streams on one connection, on one loop.
async fn an_http2_client_multiplexes_on_a_loop(t: Transport) {
    let h = on_loops(t).await;
    let stream = tokio::net::TcpStream::connect(h.gateway.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let mut sender = sender.clone();
        let request = http::Request::post(h.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .body(Full::new(Bytes::from(CHAT.replace("hi", &format!("hi {i}")))))
            .unwrap();
        tasks.spawn(async move {
            let response = sender.send_request(request).await.unwrap();
            let status = response.status();
            Reply {
                status,
                headers: http::HeaderMap::new(),
                body: response.into_body().collect().await.unwrap().to_bytes(),
            }
        });
    }
    let replies: Vec<Reply> = tasks.join_all().await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert_eq!(h.stats().path("/v1/chat/completions"), 16);
    assert_eq!(per_loop(&h).await, [1, 1], "sixteen streams on one connection and loop, then the look at /stats");
}

/// Twenty identical requests on their own connections, dealt to both loops,
/// wait for one upstream call: the single flight spans the loops.
async fn identical_requests_on_both_loops_make_one_call(t: Transport) {
    let h = Arc::new(on_loops(t).await);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let h = Arc::clone(&h);
        tasks.spawn(async move {
            let request = h
                .post("/v1/chat/completions")
                .header("x-mock-latency-ms", "300")
                .body(Full::new(Bytes::from(CACHED)))
                .unwrap();
            send(&h1_client(), request).await
        });
    }
    let replies: Vec<Reply> = tasks.join_all().await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert!(replies.iter().all(|r| r.body == replies[0].body), "20 identical answers");
    assert_eq!(h.stats().path("/v1/chat/completions"), 1, "one upstream call for 20 identical requests");
    assert_eq!(per_loop(&h).await, [11, 10], "twenty connections dealt in turn, then the look at /stats");
}

/// A stream in flight on a loop when the drain begins runs to its end, and
/// the drain then ends clean (the loops stop after it).
async fn a_stream_on_a_loop_finishes_in_the_drain(t: Transport) {
    let h = on_loops(t).await;
    let request = h.post("/v1/chat/completions").header("x-mock-chunks", "10").header("x-mock-gap-ms", "30");
    let mut body = h.h1.request(request.body(Full::new(Bytes::from(STREAM))).unwrap()).await.unwrap().into_body();
    assert_eq!(per_loop(&h).await, [1, 1], "the stream on loop 0, the look at /stats on loop 1");
    let Harness { mock, gateway, .. } = h;
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: "));
    let drain = tokio::spawn(gateway.shutdown());
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect()).await.expect("stream stalled");
    let text = String::from_utf8_lossy(&rest.expect("stream cut by the drain").to_bytes()).into_owned();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(drain.await.unwrap(), sluice::server::Drain::Clean);
    assert_eq!(mock.state.stats().streams_finished, 1);
}

per_transport!(
    multi_thread: answers_plain_and_streamed_on_every_loop,
    an_http2_client_multiplexes_on_a_loop,
    identical_requests_on_both_loops_make_one_call,
    a_stream_on_a_loop_finishes_in_the_drain
);

/// sluice's own HTTP/1.1 client keeps idle upstream connections per loop: a
/// socket reports readiness to the loop that opened it, so a request on the
/// other loop opens its own rather than borrow one and wake another core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_loop_reuses_only_its_own_upstream_connections() {
    let h = on_loops(Transport::H1Sluice).await;
    // Client connections are dealt out in turn: `first` to loop 0, `second` to loop 1.
    let (mut first, mut second) = (Connection::open(&h).await, Connection::open(&h).await);
    for _ in 0..3 {
        assert_eq!(first.send(chat()).await.status, StatusCode::OK);
    }
    assert_eq!(h.stats().connections, 1, "loop 0 reuses its upstream connection");
    for _ in 0..3 {
        assert_eq!(second.send(chat()).await.status, StatusCode::OK);
    }
    assert_eq!(h.stats().connections, 2, "loop 1 opened its own and reused it");
    assert_eq!(first.send(chat()).await.status, StatusCode::OK);
    assert_eq!(h.stats().connections, 2);
    assert_eq!(h.stats().path("/v1/chat/completions"), 7);
    assert_eq!(per_loop(&h).await, [2, 1], "two connections, then the look at /stats");
}

/// The HTTP/2 upstream pools are kept per loop too: each loop opens and
/// drives its own connection to the upstream and reuses it.
async fn each_loop_has_its_own_http2_upstream_connection(t: Transport) {
    let h = on_loops(t).await;
    let (mut first, mut second) = (Connection::open(&h).await, Connection::open(&h).await);
    for _ in 0..3 {
        assert_eq!(first.send(chat()).await.status, StatusCode::OK);
        assert_eq!(second.send(chat()).await.status, StatusCode::OK);
    }
    let stats = h.stats();
    assert_eq!((stats.connections, stats.http2_requests), (2, 6), "one HTTP/2 connection a loop, each reused");
}

crate::per_transport_h2!(each_loop_has_its_own_http2_upstream_connection);
