//! Key health, retries and failover, asserted on the mock's per-key counters.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use sluice::mock::{Faults, KeyFault, RateFault};

use crate::support::{CLIENT_KEY, Harness, Opts, eventually};

const CHAT: &str = r#"{"model":"plain","messages":[]}"#;

fn key_faults(faults: &[(&str, u16, Option<&str>)]) -> Faults {
    Faults {
        keys: faults
            .iter()
            .map(|(key, status, retry_after)| {
                (key.to_string(), KeyFault { status: *status, retry_after: retry_after.map(str::to_string) })
            })
            .collect(),
        ..Faults::default()
    }
}

#[tokio::test]
async fn rate_limited_key_cools_for_retry_after_then_comes_back() {
    let h = Harness::start().await;
    h.mock.state.set_faults(key_faults(&[("sk-up-2", 429, Some("2"))]));
    let statuses = h.chats(100, CHAT).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let stats = h.stats();
    assert_eq!(stats.key("sk-up-2"), 1, "a cooling key gets no traffic");
    assert_eq!(stats.key("sk-up-1") + stats.key("sk-up-3"), 100);
    assert_eq!(h.key_state("sk-up-2").await, "cooling");

    h.mock.state.set_faults(Faults::default());
    // The key comes back by itself once its 2 s pass.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while h.key_state("sk-up-2").await != "healthy" {
        assert!(tokio::time::Instant::now() < deadline, "cooldown never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.chats(6, CHAT).await;
    assert!(h.stats().key("sk-up-2") >= 2, "the key is back in rotation");
}

#[tokio::test]
async fn revoked_key_is_disabled_until_reset() {
    let h = Harness::start().await;
    h.mock.state.set_faults(key_faults(&[("sk-up-3", 401, None)]));
    assert!(h.chats(30, CHAT).await.iter().all(|s| *s == 200));
    assert_eq!(h.stats().key("sk-up-3"), 1);
    assert_eq!(h.key_state("sk-up-3").await, "disabled");
    assert_eq!(h.health().await["upstreams"][0]["keys_disabled"], 1);

    // The upstream forgives the key, but sluice does not until told to.
    h.mock.state.set_faults(Faults::default());
    h.chats(9, CHAT).await;
    assert_eq!(h.stats().key("sk-up-3"), 1, "a disabled key never comes back by itself");

    let reset = h.admin("/admin/reset-failed-keys").await;
    assert_eq!(reset.status, StatusCode::OK);
    assert_eq!(reset.json()["reset"], 1);
    h.chats(9, CHAT).await;
    assert_eq!(h.stats().key("sk-up-3"), 4);
}

#[tokio::test]
async fn thirty_percent_server_errors_are_absorbed_by_retries() {
    let h = Harness::start_with(Opts { upstream_extra: "max_attempts = 5", ..Opts::default() }).await;
    h.mock.state.set_faults(Faults { error_rate: Some(RateFault { status: 500, rate: 0.3 }), ..Faults::default() });
    let mut set = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (client, url) = (h.h1.clone(), h.url("/v1/chat/completions"));
        set.spawn(async move {
            let mut ok = 0;
            for _ in 0..25 {
                let request = Request::post(&url)
                    .header("authorization", format!("Bearer {CLIENT_KEY}"))
                    .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
                    .unwrap();
                let response = client.request(request).await.unwrap();
                ok += usize::from(response.status() == StatusCode::OK);
                response.into_body().collect().await.unwrap();
            }
            (worker, ok)
        });
    }
    let mut ok = 0;
    while let Some(result) = set.join_next().await {
        ok += result.unwrap().1;
    }
    assert!(ok >= 198, "only {ok} of 200 succeeded");
    let stats = h.stats();
    assert_eq!(stats.status(200) as usize, ok, "every success is one upstream 200");
    assert_eq!(stats.requests, stats.status(200) + stats.status(500));
    // Each attempt fails with probability 0.3, so attempts per request average 1/0.7.
    let ratio = stats.requests as f64 / 200.0;
    assert!((1.3..=1.6).contains(&ratio), "upstream/client attempt ratio {ratio}");
    let health = h.health().await;
    assert_eq!(health["upstreams"][0]["breaker"], "closed", "the breaker must not open on a working upstream");
    assert_eq!(health["upstreams"][0]["keys_available"], 3, "5xx never cools a key");
}

#[tokio::test]
async fn every_key_rate_limited_gives_429_with_retry_after() {
    let h = Harness::start().await;
    let all = [("sk-up-1", 429, Some("30")), ("sk-up-2", 429, Some("30")), ("sk-up-3", 429, Some("30"))];
    h.mock.state.set_faults(key_faults(&all));
    let reply = h.chat(CHAT).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.error_code(), "rate_limited");
    let retry_after: u64 = reply.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert!(h.stats().requests <= 3, "at most max_key_retries attempts");

    // Nothing usable is left: the next request fails fast, without upstream traffic.
    let reply = h.chat(CHAT).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "no_available_key");
    assert!(reply.headers.contains_key("retry-after"));
    assert_eq!(h.stats().requests, 3);
    assert_eq!(h.health().await["status"], "degraded");
}

#[tokio::test]
async fn other_client_errors_are_returned_at_once() {
    let h = Harness::start().await;
    let request = h
        .post("/v1/chat/completions")
        .header("x-mock-status", "400")
        .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
        .unwrap();
    let reply = h.send(request).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "mock_fault", "the upstream's own answer");
    assert_eq!(h.stats().requests, 1, "a 400 is not retried");
}

#[tokio::test]
async fn exhausted_budget_returns_the_upstreams_last_answer() {
    let h =
        Harness::start_with(Opts { upstream_extra: "max_attempts = 2\nretry_base = \"1ms\"", ..Opts::default() }).await;
    let request = h
        .post("/v1/chat/completions")
        .header("x-mock-status", "503")
        .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
        .unwrap();
    let reply = h.send(request).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "mock_fault");
    let stats = h.stats();
    assert_eq!(stats.requests, 2);
    assert_eq!(stats.by_key.len(), 2, "the retry went to another key");
}

#[tokio::test]
async fn breaker_opens_fails_fast_and_a_probe_closes_it() {
    let extra = "max_attempts = 1\nbreaker_failures = 2\nbreaker_cooldown = \"300ms\"";
    let h = Harness::start_with(Opts { upstream_extra: extra, ..Opts::default() }).await;
    h.mock.state.set_faults(Faults { error_rate: Some(RateFault { status: 500, rate: 1.0 }), ..Faults::default() });
    assert_eq!(h.chats(2, CHAT).await, [500, 500]);
    assert_eq!(h.health().await["upstreams"][0]["breaker"], "open");

    for _ in 0..3 {
        let reply = h.chat(CHAT).await;
        assert_eq!(
            (reply.status, reply.error_code().as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "upstream_unavailable")
        );
        assert!(reply.headers.contains_key("retry-after"));
    }
    assert_eq!(h.stats().requests, 2, "an open breaker sends nothing upstream");

    // The upstream recovers; after the cooldown one probe goes through and closes it.
    h.mock.state.set_faults(Faults::default());
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(h.chat(CHAT).await.status, StatusCode::OK);
    assert_eq!(h.stats().requests, 3);
    assert_eq!(h.health().await["upstreams"][0]["breaker"], "closed");
    assert_eq!(h.chats(3, CHAT).await, [200, 200, 200]);
}

#[tokio::test]
async fn breaker_stops_traffic_to_a_dead_port() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&connections);
    tokio::spawn(async move {
        // Accept and drop: a reset on every attempt.
        while let Ok((stream, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    let extra = "max_attempts = 2\nretry_base = \"1ms\"\nbreaker_failures = 2\nbreaker_cooldown = \"60s\"";
    let h = Harness::start_with(Opts {
        base_url: Some(format!("http://{addr}/v1")),
        upstream_extra: extra,
        ..Opts::default()
    })
    .await;
    assert_eq!(h.chats(2, CHAT).await, [502, 502]);
    let after_two = connections.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(after_two, 4, "two requests, two attempts each");
    assert_eq!(h.chats(5, CHAT).await, [503; 5]);
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), after_two, "no traffic while open");
}

#[tokio::test]
async fn stalled_stream_ends_with_error_event_after_idle_timeout() {
    let h = Harness::start_with(Opts { upstream_extra: "idle_timeout = \"200ms\"", ..Opts::default() }).await;
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

#[tokio::test]
async fn a_stream_that_keeps_talking_outlives_its_idle_timeout() {
    // Twelve events 50 ms apart: 600 ms in all, never 400 ms of silence.
    let h = Harness::start_with(Opts { upstream_extra: "idle_timeout = \"400ms\"", ..Opts::default() }).await;
    let request = h
        .post("/v1/chat/completions")
        .header("x-mock-chunks", "12")
        .header("x-mock-gap-ms", "50")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain","stream":true}"#)))
        .unwrap();
    let started = std::time::Instant::now();
    let reply = crate::support::send(&h.h1, request).await;
    assert!(started.elapsed() > Duration::from_millis(400), "the stream must run past one idle_timeout");
    let text = String::from_utf8_lossy(&reply.body);
    assert_eq!(text.matches("tok").count(), 12, "{text}");
    assert!(text.ends_with("data: [DONE]\n\n") && !text.contains("upstream_stream_error"), "{text}");
}

#[tokio::test]
async fn a_stream_that_sent_bytes_is_never_retried() {
    let h = Harness::start().await;
    let request = h
        .post("/v1/chat/completions")
        .header("x-mock-drop-after", "2")
        .header("x-mock-gap-ms", "20")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain","stream":true}"#)))
        .unwrap();
    let response = h.h1.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.into_body().collect().await.is_err());
    assert_eq!(h.stats().requests, 1, "no retry after bytes reached the client");
}

#[tokio::test]
async fn total_timeout_bounds_a_non_streaming_exchange() {
    // header_timeout is 2 s in the harness; total_timeout cuts the wait shorter.
    let extra = "max_attempts = 1\ntotal_timeout = \"300ms\"";
    let h = Harness::start_with(Opts { upstream_extra: extra, ..Opts::default() }).await;
    let request = h
        .post("/v1/chat/completions")
        .header("x-mock-latency-ms", "1500")
        .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
        .unwrap();
    let reply = h.send(request).await;
    assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"));
    let message = reply.json()["error"]["message"].as_str().unwrap().to_string();
    let waited: u64 = message.split("after ").nth(1).and_then(|m| m.split(' ').next()).unwrap().parse().unwrap();
    assert!(waited <= 300, "waited {waited} ms, past total_timeout: {message}");
}
