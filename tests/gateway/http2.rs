//! HTTP/2: clients may speak h2c to sluice, and one upstream h2c connection
//! carries many concurrent requests.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;

use crate::support::{Harness, Opts, send};

#[tokio::test]
async fn one_upstream_connection_carries_concurrent_requests() {
    let h = Harness::start_with(Opts { upstream_extra: "http2 = \"prior-knowledge\"", ..Opts::default() }).await;
    // Warm the single h2 connection so the burst below cannot race to open several.
    assert_eq!(h.chat(r#"{"model":"plain"}"#).await.status, StatusCode::OK);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let request = h
            .post("/v1/chat/completions")
            .header("x-mock-latency-ms", "100")
            .body(Full::new(Bytes::from_static(br#"{"model":"plain"}"#)))
            .unwrap();
        let client = h.h1.clone();
        set.spawn(async move { send(&client, request).await.status });
    }
    while let Some(status) = set.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    let stats = h.stats();
    assert_eq!(stats.requests, 51);
    assert_eq!(stats.http2_requests, 51, "every request went over HTTP/2");
    assert_eq!(stats.connections, 1, "one multiplexed upstream connection");
}

#[tokio::test]
async fn clients_may_speak_h2c_and_http1_on_the_same_port() {
    let h = Harness::start().await;
    for client in [&h.h1, &h.h2] {
        let request =
            h.post("/v1/chat/completions").body(Full::new(Bytes::from_static(br#"{"model":"plain"}"#))).unwrap();
        let reply = send(client, request).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["object"], "chat.completion");
    }
    assert_eq!(h.stats().requests, 2);
}

/// The server tells HTTP/1.1 from h2c by peeking at the first bytes. A client
/// whose first packet is only a prefix of the HTTP/2 preface ("P" could start
/// `POST` or `PRI`) is handed to the protocol-detecting connection, and served.
#[tokio::test]
async fn a_request_whose_first_packet_is_ambiguous_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start().await;
    let body = r#"{"model":"plain"}"#;
    let rest = format!(
        "OST /v1/chat/completions HTTP/1.1\r\nhost: sluice\r\nauthorization: Bearer sk-client-test\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(h.gateway.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream.write_all(b"P").await.unwrap();
    stream.flush().await.unwrap();
    // The rest goes only once the server has judged the lone "P" ambiguous.
    let split = &h.gateway.shared.telemetry.connections.split_preface;
    crate::support::eventually("the split preface was sniffed", || {
        split.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;
    stream.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("chat.completion"), "{answer}");
    assert_eq!(h.stats().requests, 1);
}

/// A client that connects and says nothing is still waiting to be sniffed
/// (HTTP/1.1 or h2c) when the drain begins: it must not hold the drain for the
/// grace period.
#[tokio::test]
async fn a_silent_connection_does_not_hold_up_the_drain() {
    let h = Harness::start().await;
    // Accepted in order: once the request on the second connection is answered,
    // the silent first one has been accepted and is sniffing.
    let _silent = tokio::net::TcpStream::connect(h.gateway.addr).await.unwrap();
    assert_eq!(h.chat(r#"{"model":"plain"}"#).await.status, StatusCode::OK);
    // Waiting on the silent client would run out the 5 s grace: TimedOut(1).
    assert_eq!(h.gateway.shutdown().await, sluice::server::Drain::Clean);
}
