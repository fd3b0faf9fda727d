//! Timeouts over every transport: no headers in time (504), a non-streaming
//! exchange past `total_timeout`, a stream silent past `idle_timeout` (error
//! event, abnormal end, upstream cancelled), and a stream that keeps talking.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};

use crate::per_transport;
use crate::support::{Harness, Opts, Transport, eventually};

const CHAT: &str = r#"{"model":"plain","messages":[]}"#;

async fn harness(t: Transport, extra: &'static str) -> Harness {
    Harness::start_with(Opts { transport: t, upstream_extra: extra, ..Opts::default() }).await
}

per_transport!(
    slow_upstream_is_504,
    total_timeout_bounds_a_non_streaming_exchange,
    stalled_stream_ends_with_error_event_after_idle_timeout,
    a_stream_that_keeps_talking_outlives_its_idle_timeout,
);

async fn slow_upstream_is_504(t: Transport) {
    // header_timeout = 2 s in the harness.
    let h = harness(t, "max_attempts = 1").await;
    let request =
        h.post("/v1/chat/completions").header("x-mock-latency-ms", "2500").body(Full::new(Bytes::from(CHAT))).unwrap();
    let reply = h.send(request).await;
    assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"));
    assert_eq!(h.stats().requests, 1, "one attempt only");
}

async fn total_timeout_bounds_a_non_streaming_exchange(t: Transport) {
    // header_timeout is 2 s in the harness; total_timeout cuts the wait shorter.
    let h = harness(t, "max_attempts = 1\ntotal_timeout = \"300ms\"").await;
    let request =
        h.post("/v1/chat/completions").header("x-mock-latency-ms", "1500").body(Full::new(Bytes::from(CHAT))).unwrap();
    let reply = h.send(request).await;
    assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"));
    let message = reply.json()["error"]["message"].as_str().unwrap().to_string();
    let waited: u64 = message.split("after ").nth(1).and_then(|m| m.split(' ').next()).unwrap().parse().unwrap();
    assert!(waited <= 300, "the wait was set past total_timeout: {message}");
}

async fn stalled_stream_ends_with_error_event_after_idle_timeout(t: Transport) {
    let h = harness(t, "idle_timeout = \"200ms\"").await;
    let request = h
        .post("/v1/chat/completions")
        .header("x-mock-chunks", "3")
        .header("x-mock-gap-ms", "5000")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain","stream":true}"#)))
        .unwrap();
    let response = h.h1.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut text = String::new();
    let errored = loop {
        match tokio::time::timeout(Duration::from_secs(5), body.frame()).await.expect("no idle timeout") {
            Some(Ok(frame)) => text.push_str(&String::from_utf8_lossy(&frame.into_data().unwrap_or_default())),
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    assert!(errored, "a stalled stream must not end cleanly: {text}");
    assert_eq!(text.matches("tok").count(), 1);
    assert!(text.contains("upstream_stream_error") && text.contains("idle_timeout"), "{text}");
    eventually("the stalled upstream stream is cancelled", || h.stats().streams_cancelled == 1).await;
}

async fn a_stream_that_keeps_talking_outlives_its_idle_timeout(t: Transport) {
    // Twelve events 50 ms apart: 600 ms in all, never 400 ms of silence.
    let h = harness(t, "idle_timeout = \"400ms\"").await;
    let request = h
        .post("/v1/chat/completions")
        .header("x-mock-chunks", "12")
        .header("x-mock-gap-ms", "50")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain","stream":true}"#)))
        .unwrap();
    let reply = crate::support::send(&h.h1, request).await;
    let text = String::from_utf8_lossy(&reply.body);
    assert_eq!(text.matches("tok").count(), 12, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n") && !text.contains("upstream_stream_error"), "{text}");
}
