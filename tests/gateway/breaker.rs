//! The circuit breaker over every transport: it opens on repeated upstream
//! failures, fails fast while open, and one probe (on tokio's clock) closes it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use sluice::mock::{Faults, RateFault};

use crate::per_transport;
use crate::support::{Harness, Opts, Transport, advance_clock, eventually};

const CHAT: &str = r#"{"model":"plain","messages":[]}"#;
/// Another model of the same upstream.
const MINI: &str = r#"{"model":"mini","messages":[]}"#;

/// A chat the mock answers after 2.5 s: past the harness's 2 s `header_timeout`.
async fn slow_chat(h: &Harness, body: &'static str) -> crate::support::Reply {
    let request =
        h.post("/v1/chat/completions").header("x-mock-latency-ms", "2500").body(Full::new(Bytes::from(body))).unwrap();
    h.send(request).await
}

per_transport!(breaker_opens_fails_fast_and_a_probe_closes_it, one_clients_long_requests_open_no_breaker);

async fn breaker_opens_fails_fast_and_a_probe_closes_it(t: Transport) {
    let extra = "max_attempts = 1\nbreaker_failures = 2\nbreaker_cooldown = \"5s\"";
    let h = Harness::start_with(Opts { transport: t, upstream_extra: extra, ..Opts::default() }).await;
    let always = RateFault { status: 500, rate: 1.0, seed: 0 };
    h.mock.state.set_faults(Faults { error_rate: Some(always), ..Faults::default() });
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

    // The upstream recovers. Short of the cooldown the breaker stays open;
    // after it, one probe goes through and closes it.
    h.mock.state.set_faults(Faults::default());
    advance_clock(Duration::from_secs(4)).await;
    assert_eq!(h.chat(CHAT).await.status, StatusCode::SERVICE_UNAVAILABLE);
    advance_clock(Duration::from_secs(2)).await;
    assert_eq!(h.chat(CHAT).await.status, StatusCode::OK);
    assert_eq!(h.stats().requests, 3);
    assert_eq!(h.health().await["upstreams"][0]["breaker"], "closed");
    assert_eq!(h.chats(3, CHAT).await, [200, 200, 200]);
}

#[tokio::test]
async fn breaker_stops_traffic_to_a_dead_port() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&connections);
    tokio::spawn(async move {
        // Accept and drop: a reset on every attempt.
        while let Ok((stream, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
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
    let after_two = connections.load(Ordering::SeqCst);
    assert_eq!(after_two, 4, "two requests, two attempts each");
    assert_eq!(h.chats(5, CHAT).await, [503; 5]);
    assert_eq!(connections.load(Ordering::SeqCst), after_two, "no traffic while open");
}

/// Requests that outlast `header_timeout` while their target answers others
/// (one client's long generations) are that client's 504s: they open no
/// breaker and cool no key, so everyone else keeps being served.
async fn one_clients_long_requests_open_no_breaker(t: Transport) {
    // header_timeout = 2 s in the harness.
    let extra = "max_attempts = 3\nbreaker_failures = 2";
    let h = Harness::start_with(Opts { transport: t, upstream_extra: extra, ..Opts::default() }).await;
    let long = || slow_chat(&h, CHAT);
    let others = async {
        // Once the long ones are with the upstream, another client is answered.
        eventually("the long requests reached the mock", || h.stats().requests >= 3).await;
        h.chat(CHAT).await.status
    };
    let (a, b, c, other) = tokio::join!(long(), long(), long(), others);
    assert_eq!(other, StatusCode::OK);
    for reply in [a, b, c] {
        assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"));
    }
    assert_eq!(h.stats().requests, 4, "no long request was sent twice");
    assert_eq!(h.health().await["upstreams"][0]["breaker"], "closed");
    assert_eq!(h.chats(3, CHAT).await, [200; 3]);
}

/// The other side: when the upstream answers nobody, its timeouts are its
/// own and open the breaker as before.
#[tokio::test]
async fn timeouts_of_an_upstream_that_answers_nobody_open_the_breaker() {
    // header_timeout = 2 s in the harness.
    let extra = "max_attempts = 1\nbreaker_failures = 2";
    let h = Harness::start_with(Opts { upstream_extra: extra, ..Opts::default() }).await;
    let slow = || slow_chat(&h, CHAT);
    let (a, b) = tokio::join!(slow(), slow());
    assert_eq!((a.status, b.status), (StatusCode::GATEWAY_TIMEOUT, StatusCode::GATEWAY_TIMEOUT));
    assert_eq!(h.health().await["upstreams"][0]["breaker"], "open");
    assert_eq!(h.chat(CHAT).await.status, StatusCode::SERVICE_UNAVAILABLE);
}

/// A model that is slow beside another of the same upstream that answers:
/// the upstream is up, so its breaker (which every model shares) stays
/// closed, while the slow model's requests still end as timeouts.
#[tokio::test]
async fn a_slow_model_beside_an_answering_one_opens_no_breaker() {
    // header_timeout = 2 s in the harness.
    let extra = "max_attempts = 1\nbreaker_failures = 2";
    let h = Harness::start_with(Opts { upstream_extra: extra, ..Opts::default() }).await;
    let slow = || slow_chat(&h, MINI);
    let others = async {
        eventually("the slow requests reached the mock", || h.stats().requests >= 2).await;
        h.chat(CHAT).await.status
    };
    let (a, b, other) = tokio::join!(slow(), slow(), others);
    assert_eq!(other, StatusCode::OK);
    assert_eq!((a.status, b.status), (StatusCode::GATEWAY_TIMEOUT, StatusCode::GATEWAY_TIMEOUT));
    assert_eq!(h.health().await["upstreams"][0]["breaker"], "closed");
    assert_eq!(h.chats(3, CHAT).await, [200; 3]);
}

/// Fast refusals (one client's malformed requests) prove nothing about an
/// upstream whose generations hang: its timeouts still open the breaker.
#[tokio::test]
async fn fast_refusals_do_not_hide_a_hung_upstream() {
    let extra = "max_attempts = 1\nbreaker_failures = 2";
    let h = Harness::start_with(Opts { upstream_extra: extra, ..Opts::default() }).await;
    let slow = || slow_chat(&h, CHAT);
    let refused = async {
        eventually("the slow requests reached the mock", || h.stats().requests >= 2).await;
        let request =
            h.post("/v1/chat/completions").header("x-mock-status", "400").body(Full::new(Bytes::from(CHAT))).unwrap();
        h.send(request).await.status
    };
    let (a, b, refusal) = tokio::join!(slow(), slow(), refused);
    assert_eq!(refusal, StatusCode::BAD_REQUEST);
    assert_eq!((a.status, b.status), (StatusCode::GATEWAY_TIMEOUT, StatusCode::GATEWAY_TIMEOUT));
    assert_eq!(h.health().await["upstreams"][0]["breaker"], "open");
}
