//! The one retry loop: what it repeats, what it never repeats, and what a
//! client can never make it count against a key or a breaker.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use sluice::mock::{Faults, RateFault};

use crate::per_transport;
use crate::support::scripted::{Act, OK_CHAT, Scripted};
use crate::support::{CLIENT_KEY, Harness, Opts, Transport, raw_exchange};

const CHAT: &str = r#"{"model":"plain","messages":[]}"#;

async fn harness(t: Transport, extra: &'static str) -> Harness {
    Harness::start_with(Opts { transport: t, upstream_extra: extra, ..Opts::default() }).await
}

/// `sluice_retries_total{reason}` as the gateway counts it now.
fn retries(h: &Harness, reason: &str) -> u64 {
    let metrics = &h.gateway.shared.telemetry.metrics;
    let labels = sluice::telemetry::metrics::RetryReason::ALL;
    let at = labels.iter().position(|r| r.label() == reason).unwrap();
    metrics.retries[at].load(std::sync::atomic::Ordering::Relaxed)
}

per_transport!(multi_thread: server_errors_at_random_are_absorbed_by_retries);
per_transport!(
    other_client_errors_are_returned_at_once,
    exhausted_budget_returns_the_upstreams_last_answer,
    idempotent_requests_are_retried_other_posts_are_not,
    a_stream_that_sent_bytes_is_never_retried,
);

async fn server_errors_at_random_are_absorbed_by_retries(t: Transport) {
    // At 20% failures a request needs 0.25 retries on average, more than the
    // default retry budget (0.2 of first attempts) allows near the end of a
    // burst: this test is about absorbing errors, so the budget is raised.
    let opts = Opts {
        transport: t,
        upstream_extra: "max_attempts = 5\nretry_base = \"1ms\"",
        routing_extra: "retry_budget = 1.0",
        ..Opts::default()
    };
    let h = Harness::start_with(opts).await;
    // The mock's draws are seeded, but which request meets which draw depends
    // on the interleaving; at 0.2 a request fails all five attempts with
    // probability 0.00032, so more than three of 200 (p < 1e-6) is a bug.
    let fault = RateFault { status: 500, rate: 0.2, seed: 42 };
    h.mock.state.set_faults(Faults { error_rate: Some(fault), ..Faults::default() });
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, url) = (h.h1.clone(), h.url("/v1/chat/completions"));
        set.spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..25 {
                let request = Request::post(&url)
                    .header("authorization", format!("Bearer {CLIENT_KEY}"))
                    .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
                    .unwrap();
                let response = client.request(request).await.unwrap();
                statuses.push(response.status().as_u16());
                response.into_body().collect().await.unwrap();
            }
            statuses
        });
    }
    let statuses: Vec<u16> = set.join_all().await.into_iter().flatten().collect();
    let ok = statuses.iter().filter(|s| **s == 200).count() as u64;
    assert!(statuses.iter().all(|s| *s == 200 || *s == 500), "{statuses:?}");
    assert!(ok >= 197, "only {ok} of 200 succeeded");
    let stats = h.stats();
    assert_eq!(stats.status(200), ok, "every success is one upstream 200");
    assert_eq!(stats.requests, stats.status(200) + stats.status(500));
    // A request that failed for good spent all five attempts on 500s.
    assert!(stats.status(500) >= 5 * (200 - ok));
    assert_eq!(retries(&h, "server_error"), stats.status(500) - (200 - ok), "each 500 but a last one was retried");
    // Each attempt fails with probability 0.2, so attempts per request average 1/0.8.
    let ratio = stats.requests as f64 / 200.0;
    assert!((1.05..=1.5).contains(&ratio), "upstream/client attempt ratio {ratio} (expected 1.25, sd 0.04)");
    let health = h.health().await;
    assert_eq!(health["upstreams"][0]["breaker"], "closed", "the breaker must not open on a working upstream");
    assert_eq!(health["upstreams"][0]["keys_available"], 3, "5xx never cools a key");
}

async fn other_client_errors_are_returned_at_once(t: Transport) {
    let h = harness(t, "").await;
    let request =
        h.post("/v1/chat/completions").header("x-mock-status", "400").body(Full::new(Bytes::from(CHAT))).unwrap();
    let reply = h.send(request).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_code(), "mock_fault", "the upstream's own answer");
    assert_eq!(h.stats().requests, 1, "a 400 is not retried");
    assert!(!reply.headers.contains_key("x-should-retry"));
}

async fn exhausted_budget_returns_the_upstreams_last_answer(t: Transport) {
    let h = harness(t, "max_attempts = 2\nretry_base = \"1ms\"").await;
    let request =
        h.post("/v1/chat/completions").header("x-mock-status", "503").body(Full::new(Bytes::from(CHAT))).unwrap();
    let reply = h.send(request).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.error_code(), "mock_fault", "the upstream's own answer, untouched");
    assert_eq!(reply.headers["x-should-retry"], "false", "sluice retried already: the SDK must not");
    let stats = h.stats();
    assert_eq!(stats.requests, 2);
    assert_eq!(stats.by_key.len(), 2, "the retry went to another key");
    assert_eq!(retries(&h, "server_error"), 1);
    if t == Transport::H1Sluice {
        // The failed answer was read before the retry, so its connection (back
        // in the pool at once, on this client) carried the retry.
        assert_eq!(stats.connections, 1, "the first attempt's connection was held during the retry");
    }
}

async fn idempotent_requests_are_retried_other_posts_are_not(t: Transport) {
    let h = harness(t, "max_attempts = 3\nretry_base = \"1ms\"").await;
    let failing = |request: http::request::Builder| {
        request.header("authorization", format!("Bearer {CLIENT_KEY}")).header("x-mock-status", "503")
    };
    // GET and DELETE are safe to repeat: every attempt is spent.
    let get = h.send(failing(Request::get(h.url("/v1/files/file-1"))).body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(get.status, StatusCode::SERVICE_UNAVAILABLE);
    let delete =
        h.send(failing(Request::delete(h.url("/v1/files/file-1"))).body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(delete.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.stats().path("/v1/files/file-1"), 6);
    // A run is not: the upstream received it, so it may be running.
    let run = failing(Request::post(h.url("/v1/threads/t/runs")))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"assistant_id":"a"}"#)))
        .unwrap();
    let run = h.send(run).await;
    assert_eq!(run.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.stats().path("/v1/threads/t/runs"), 1, "a non-idempotent POST was sent twice");
    assert!(!run.headers.contains_key("x-should-retry"));
}

async fn a_stream_that_sent_bytes_is_never_retried(t: Transport) {
    let h = harness(t, "").await;
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

/// The harness in front of a scripted HTTP/1.1 upstream.
async fn scripted_harness(script: Vec<Act>, extra: &'static str) -> (Scripted, Harness) {
    let upstream = Scripted::start(script).await;
    let base_url = Some(format!("http://{}/v1", upstream.addr));
    let h = Harness::start_with(Opts { base_url, upstream_extra: extra, ..Opts::default() }).await;
    (upstream, h)
}

#[tokio::test]
async fn a_post_the_upstream_read_and_dropped_is_never_sent_again() {
    // The upstream reads the whole request and closes without a word: it may
    // have started the run. The client gets an error; the upstream saw it once.
    let (upstream, h) = scripted_harness(vec![Act::Close], "retry_base = \"1ms\"").await;
    let request = h.post("/v1/threads/t/runs").body(Full::new(Bytes::from_static(br#"{"assistant_id":"a"}"#))).unwrap();
    let reply = h.send(request).await;
    assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::BAD_GATEWAY, "upstream_protocol_error"));
    assert_eq!(upstream.request_lines(), ["POST /v1/threads/t/runs HTTP/1.1"]);
}

#[tokio::test]
async fn an_inference_request_the_upstream_dropped_is_retried_and_counted() {
    let (upstream, h) = scripted_harness(vec![Act::Close, Act::Answer(OK_CHAT)], "retry_base = \"1ms\"").await;
    let reply = h.chat(CHAT).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(upstream.request_lines().len(), 2);
    assert_eq!(retries(&h, "protocol_error"), 1);
    assert_eq!(reply.headers["x-should-retry"], "false");
}

#[tokio::test]
async fn a_stale_pooled_connection_is_retried_by_the_loop_only_when_safe() {
    // Request 1 keeps its connection alive; the upstream then closes it under
    // the next request (its idle timeout racing ours).
    let script = vec![Act::Answer(OK_CHAT), Act::Close, Act::Answer(OK_CHAT), Act::Answer(OK_CHAT), Act::Close];
    let (upstream, h) = scripted_harness(script, "retry_base = \"1ms\"").await;
    assert_eq!(h.chat(CHAT).await.status, StatusCode::OK);
    // A chat on the stale connection: repeated on a new one, and counted.
    assert_eq!(h.chat(CHAT).await.status, StatusCode::OK);
    assert_eq!(retries(&h, "stale_connection"), 1);
    assert_eq!(upstream.accepted(), 2);
    // A run on the stale connection: the upstream read it, so it is not repeated.
    let run = h.post("/v1/threads/t/runs").body(Full::new(Bytes::from_static(br#"{"assistant_id":"a"}"#))).unwrap();
    assert_eq!(h.chat(CHAT).await.status, StatusCode::OK);
    assert_eq!(h.send(run).await.status, StatusCode::BAD_GATEWAY);
    let runs = upstream.request_lines().iter().filter(|l| l.contains("/threads/")).count();
    assert_eq!(runs, 1, "the run was sent once");
    assert_eq!(retries(&h, "stale_connection"), 1, "and no retry was counted for it");
}

#[tokio::test]
async fn an_unreachable_upstream_is_retried_for_any_request_since_nothing_was_sent() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let h = Harness::start_with(Opts {
        base_url: Some(format!("http://{addr}/v1")),
        upstream_extra: "max_attempts = 3\nretry_base = \"1ms\"\nbreaker_failures = 100",
        ..Opts::default()
    })
    .await;
    let run = h.post("/v1/threads/t/runs").body(Full::new(Bytes::from_static(br#"{"assistant_id":"a"}"#))).unwrap();
    let reply = h.send(run).await;
    assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::BAD_GATEWAY, "upstream_unreachable"));
    assert_eq!(retries(&h, "connect_error"), 2, "no byte left sluice: safe to repeat");
    assert!(!reply.json()["error"]["message"].as_str().unwrap().contains(&addr.to_string()), "internal address leaked");
}

/// A chunked upload that grows past `max_body`: the client's fault, answered
/// 413, and no key or breaker hears of it.
fn oversized_chunked_upload(path: &str) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in vec![b'x'; 70 * 1024].chunks(8192) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

per_transport!(client_failures_never_count_against_keys_or_breakers);

async fn client_failures_never_count_against_keys_or_breakers(t: Transport) {
    // max_body is 64 KiB; five failures would open this breaker.
    let h = harness(t, "breaker_failures = 5").await;
    for _ in 0..8 {
        let answer = raw_exchange(h.gateway.addr, &oversized_chunked_upload("/v1/files")).await;
        assert!(answer.starts_with(b"HTTP/1.1 413"), "{}", String::from_utf8_lossy(&answer));
    }
    // An upload that stops half-way: the client is gone.
    for _ in 0..8 {
        let head = format!(
            "POST /v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-type: application/octet-stream\r\ncontent-length: 5000\r\n\r\n"
        );
        let mut stream = tokio::net::TcpStream::connect(h.gateway.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes()).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, &[b'x'; 1000]).await.unwrap();
        drop(stream);
    }
    crate::support::eventually("the broken uploads were recorded", || {
        h.gateway.shared.telemetry.metrics.in_flight.get() == 0
    })
    .await;
    let health = h.health().await;
    assert_eq!(health["upstreams"][0]["breaker"], "closed", "{health}");
    assert_eq!(health["upstreams"][0]["keys_available"], 3);
    assert_eq!(h.chats(2, CHAT).await, [200, 200]);
}

per_transport!(a_model_in_a_job_routes_it_but_never_makes_it_repeatable);

async fn a_model_in_a_job_routes_it_but_never_makes_it_repeatable(t: Transport) {
    let h = harness(t, "max_attempts = 3\nretry_base = \"1ms\"").await;
    // A fine-tuning job names a model; a 503 after the upstream read it must
    // not create a second job.
    let job = h
        .post("/v1/fine_tuning/jobs")
        .header("x-mock-status", "503")
        .body(Full::new(Bytes::from_static(br#"{"model":"mini","training_file":"file-1"}"#)))
        .unwrap();
    assert_eq!(h.send(job).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.stats().path("/v1/fine_tuning/jobs"), 1, "a job was sent twice");
    // Routed by its model (renamed upstream), but the model's generation
    // defaults stay out of a job's body.
    let echoed = h
        .post("/v1/fine_tuning/jobs")
        .header("x-mock-echo", "1")
        .body(Full::new(Bytes::from_static(br#"{"model":"mini","training_file":"file-1"}"#)))
        .unwrap();
    let echoed = h.send(echoed).await.json();
    let body: serde_json::Value = serde_json::from_str(echoed["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["model"], "gpt-4o-mini-2024-07-18", "{echoed}");
    assert!(body.get("max_tokens").is_none() && body.get("temperature").is_none(), "{echoed}");
}

#[tokio::test]
async fn a_retry_is_not_sent_without_time_left_in_the_total_budget() {
    // The first attempt waits out header_timeout (2 s); 500 ms of the total
    // budget would be left, under the least a retry needs: it is not sent
    // just to be cut off while the upstream generates an answer nobody reads.
    let h = harness(Transport::H1Sluice, "total_timeout = \"2500ms\"\nretry_base = \"1ms\"").await;
    let slow =
        h.post("/v1/chat/completions").header("x-mock-latency-ms", "4000").body(Full::new(Bytes::from(CHAT))).unwrap();
    let answer = h.send(slow).await;
    assert_eq!((answer.status, answer.error_code().as_str()), (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"));
    assert_eq!(h.stats().path("/v1/chat/completions"), 1, "an attempt without time to answer was sent");
}

#[tokio::test]
async fn a_slow_upload_is_the_clients_fault_not_the_upstreams() {
    // Five uploads that stall half-way until header_timeout (2 s) fires would
    // open this breaker if their timeouts counted against the upstream.
    let h = harness(Transport::H1Sluice, "breaker_failures = 5").await;
    let mut streams = Vec::new();
    for _ in 0..5 {
        let head = format!(
            "POST /v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-type: application/octet-stream\r\ncontent-length: 5000\r\n\r\n"
        );
        let mut stream = tokio::net::TcpStream::connect(h.gateway.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes()).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, &[b'x'; 1000]).await.unwrap();
        streams.push(stream);
    }
    for mut stream in streams {
        let mut answer = vec![0u8; 12];
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_exact(&mut stream, &mut answer),
        );
        read.await.expect("no answer").unwrap();
        assert_eq!(&answer, b"HTTP/1.1 408", "{}", String::from_utf8_lossy(&answer));
    }
    let health = h.health().await;
    assert_eq!(health["upstreams"][0]["breaker"], "closed", "{health}");
    assert_eq!(health["upstreams"][0]["keys_available"], 3, "{health}");
}
