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
