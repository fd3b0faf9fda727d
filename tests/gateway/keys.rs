//! Upstream key health over every transport, asserted on the mock's per-key
//! counters: a 429 cools a key (on tokio's clock), a key the upstream calls
//! bad is disabled, and a refusal about the request leaves every key healthy.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use sluice::mock::{Faults, KeyFault};

use crate::per_transport;
use crate::support::{Harness, Opts, Transport, advance_clock, eventually};

const CHAT: &str = r#"{"model":"plain","messages":[]}"#;

/// Standing per-key answers: (key, status, Retry-After, error code).
pub fn key_faults(faults: &[(&str, u16, Option<&str>, Option<&str>)]) -> Faults {
    Faults {
        keys: faults
            .iter()
            .map(|(key, status, retry_after, code)| {
                let fault = KeyFault {
                    status: *status,
                    retry_after: retry_after.map(str::to_string),
                    code: code.map(str::to_string),
                };
                (key.to_string(), fault)
            })
            .collect(),
        ..Faults::default()
    }
}

async fn harness(t: Transport) -> Harness {
    Harness::start_with(Opts { transport: t, ..Opts::default() }).await
}

per_transport!(
    rate_limited_key_cools_for_retry_after_then_comes_back,
    a_key_the_upstream_calls_bad_is_disabled_until_reset,
    a_refusal_about_the_request_leaves_every_key_healthy,
    a_refusal_that_names_no_cause_is_confirmed_before_the_key_is_disabled,
    every_key_rate_limited_gives_429_with_retry_after,
    requests_reach_the_mock_over_the_transport,
    a_request_too_large_for_the_rate_limit_cools_no_key,
);

async fn requests_reach_the_mock_over_the_transport(t: Transport) {
    let h = harness(t).await;
    assert_eq!(h.chats(3, CHAT).await, [200; 3]);
    let stats = h.stats();
    assert_eq!(stats.requests, 3);
    assert_eq!(stats.http2_requests, if t.is_h2() { 3 } else { 0 }, "{t:?}");
}

async fn rate_limited_key_cools_for_retry_after_then_comes_back(t: Transport) {
    let h = harness(t).await;
    h.mock.state.set_faults(key_faults(&[("sk-up-2", 429, Some("2"), None)]));
    let statuses = h.chats(30, CHAT).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let stats = h.stats();
    assert_eq!(stats.key("sk-up-2"), 1, "a cooling key gets no traffic");
    assert_eq!(stats.key("sk-up-1") + stats.key("sk-up-3"), 30);
    assert_eq!(h.key_state("sk-up-2").await, "cooling");

    h.mock.state.set_faults(Faults::default());
    // Not yet: a second short of its Retry-After, the key still cools.
    advance_clock(Duration::from_millis(1000)).await;
    assert_eq!(h.key_state("sk-up-2").await, "cooling");
    // Then it comes back by itself.
    advance_clock(Duration::from_millis(1100)).await;
    assert_eq!(h.key_state("sk-up-2").await, "healthy");
    h.chats(6, CHAT).await;
    assert_eq!(h.stats().key("sk-up-2"), 3, "the key is back in rotation");
}

async fn a_key_the_upstream_calls_bad_is_disabled_until_reset(t: Transport) {
    let h = harness(t).await;
    h.mock.state.set_faults(key_faults(&[("sk-up-3", 401, None, Some("invalid_api_key"))]));
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

async fn a_refusal_about_the_request_leaves_every_key_healthy(t: Transport) {
    let h = harness(t).await;
    // The upstream refuses these requests (a model the key may not use, a
    // header it rejects): nothing in the answer blames the key.
    for _ in 0..6 {
        let request =
            h.post("/v1/chat/completions").header("x-mock-status", "403").body(Full::new(Bytes::from(CHAT))).unwrap();
        let reply = h.send(request).await;
        assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::FORBIDDEN, "mock_fault"));
        assert!(!reply.headers.contains_key("x-should-retry"), "one attempt: the client may retry");
    }
    let stats = h.stats();
    assert_eq!(stats.path("/v1/chat/completions"), 6, "one key per refused request, never a walk");
    // Each key that saw a refusal is checked once with a request of sluice's
    // own, which the key passes.
    eventually("the keys were checked", || h.stats().path("/v1/models") == 3).await;
    for key in crate::support::UP_KEYS {
        assert_eq!(h.key_state(key).await, "healthy", "{key}");
    }
    assert_eq!(h.chats(3, CHAT).await, [200; 3]);
    assert_eq!(h.health().await["status"], "ok");
}

async fn a_request_too_large_for_the_rate_limit_cools_no_key(t: Transport) {
    let h = harness(t).await;
    h.mock.state.set_faults(Faults { max_request_bytes: Some(2000), ..Faults::default() });
    let big = format!(r#"{{"model":"plain","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(4000));
    for _ in 0..3 {
        let reply = h.send(h.post("/v1/chat/completions").body(Full::new(Bytes::from(big.clone()))).unwrap()).await;
        assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"));
        let message = reply.json()["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(message.starts_with("Request too large"), "the upstream's own answer: {message}");
    }
    assert_eq!(h.stats().path("/v1/chat/completions"), 3, "one attempt each, never a walk over the keys");
    for key in crate::support::UP_KEYS {
        assert_eq!(h.key_state(key).await, "healthy", "{key}");
    }
    assert_eq!(h.chats(3, CHAT).await, [200; 3], "every key still serves the others");
}

async fn a_refusal_that_names_no_cause_is_confirmed_before_the_key_is_disabled(t: Transport) {
    let h = harness(t).await;
    // sk-up-2 is refused for everything, without an error code that says why.
    h.mock.state.set_faults(key_faults(&[("sk-up-2", 401, None, None)]));
    let first = h.chats(3, CHAT).await;
    assert_eq!(first.iter().filter(|s| **s == 401).count(), 1, "the refusal goes back as is: {first:?}");
    // sluice's own check of the key fails the same way: now it is the key.
    eventually("the key check disabled the key", || {
        h.gateway.shared.live.load().upstreams[0].keys.keys()[1].state(sluice::clock::now_ms())
            == sluice::upstream::keyring::KeyState::Disabled
    })
    .await;
    assert_eq!(h.chats(10, CHAT).await, [200; 10]);
    assert_eq!(h.stats().key("sk-up-2"), 2, "the refused request and the check, nothing since");
}

async fn every_key_rate_limited_gives_429_with_retry_after(t: Transport) {
    let h = harness(t).await;
    let all =
        [("sk-up-1", 429, Some("30"), None), ("sk-up-2", 429, Some("30"), None), ("sk-up-3", 429, Some("30"), None)];
    h.mock.state.set_faults(key_faults(&all));
    let reply = h.chat(CHAT).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.error_code(), "rate_limited");
    let retry_after: u64 = reply.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(reply.headers["x-should-retry"], "false", "sluice already tried every key");
    assert_eq!(h.stats().requests, 3, "one attempt per key (max_key_retries)");

    // Nothing usable is left: the next request fails fast, without upstream traffic.
    let reply = h.chat(CHAT).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "no_available_key");
    assert!(reply.headers.contains_key("retry-after"));
    assert_eq!(h.stats().requests, 3);
    assert_eq!(h.health().await["status"], "degraded");
}
