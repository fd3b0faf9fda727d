//! Metrics (checked with a real Prometheus text parser), /stats, the request
//! log and the overhead header, after known traffic.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use prometheus_parse::{Scrape, Value};

use crate::support::{CLIENT_KEY, Harness, Opts, UP_KEYS, sample, scrape_at};

async fn scrape(h: &Harness) -> Scrape {
    scrape_at(h.gateway.addr).await
}

async fn stream_chat(h: &Harness) {
    let request = h
        .post("/v1/chat/completions")
        .header("x-mock-chunks", "4")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        )))
        .unwrap();
    let response = h.h1.request(request).await.unwrap();
    response.into_body().collect().await.unwrap();
}

/// Waits until the metered bodies of finished answers have been recorded.
async fn settled(h: &Harness, expected_chat_200: f64) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let scrape = scrape(h).await;
        let done = sample(&scrape, "sluice_requests_total", &[("route", "chat_completions"), ("status", "200")]);
        if done >= expected_chat_200 {
            return scrape;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {done} chat requests recorded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let h = Harness::start_with(Opts { wildcard: false, ..Opts::default() }).await;
    assert_eq!(h.chats(5, r#"{"model":"mini","messages":[]}"#).await, [200; 5]);
    stream_chat(&h).await;
    stream_chat(&h).await;
    assert_eq!(h.chat(r#"{"model":"gpt-9"}"#).await.status, StatusCode::NOT_FOUND);
    let unauthorized = Request::post(h.url("/v1/chat/completions")).body(Full::new(Bytes::from_static(b"{}"))).unwrap();
    assert_eq!(h.send(unauthorized).await.status, StatusCode::UNAUTHORIZED);

    let m = settled(&h, 7.0).await;
    let chat = [("route", "chat_completions"), ("model", "gpt-4o-mini"), ("upstream", "mock"), ("status", "200")];
    assert_eq!(sample(&m, "sluice_requests_total", &chat), 7.0);
    assert_eq!(
        sample(&m, "sluice_requests_total", &[("route", "chat_completions"), ("model", "-"), ("status", "404")]),
        1.0
    );
    assert_eq!(sample(&m, "sluice_requests_total", &[("route", "chat_completions"), ("status", "401")]), 1.0);
    // The mock reports 7 completion tokens per JSON answer and one per stream chunk.
    assert_eq!(
        sample(&m, "sluice_tokens_total", &[("model", "gpt-4o-mini"), ("kind", "completion")]),
        5.0 * 7.0 + 2.0 * 4.0
    );
    assert!(sample(&m, "sluice_tokens_total", &[("model", "gpt-4o-mini"), ("kind", "prompt")]) > 0.0);
    assert_eq!(sample(&m, "sluice_upstream_attempts_total", &[("outcome", "success")]), 7.0);
    for key in UP_KEYS {
        let fingerprint = sluice::config::keys::fingerprint(key);
        assert_eq!(sample(&m, "sluice_key_state", &[("key", &fingerprint), ("state", "healthy")]), 1.0);
    }
    assert_eq!(sample(&m, "sluice_breaker_state", &[("upstream", "mock")]), 0.0);
    assert_eq!(sample(&m, "sluice_streams_open", &[]), 0.0);
    assert_eq!(sample(&m, "sluice_build_info", &[("version", sluice::VERSION)]), 1.0);
    // Histograms by model, upstream and whether the request streamed.
    let histogram_count = |name: &str, labels: &[(&str, &str)]| -> f64 {
        m.samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
                _ => 0.0,
            })
            .sum()
    };
    let chat = [("model", "gpt-4o-mini"), ("upstream", "mock")];
    assert_eq!(histogram_count("sluice_request_duration_seconds", &[chat[0], chat[1], ("stream", "false")]), 5.0);
    assert_eq!(histogram_count("sluice_request_duration_seconds", &[chat[0], chat[1], ("stream", "true")]), 2.0);
    assert_eq!(histogram_count("sluice_upstream_ttfb_seconds", &[chat[0], ("stream", "true")]), 2.0);
    let top = m.samples.iter().find(|s| s.metric == "sluice_request_duration_seconds").and_then(|s| match &s.value {
        Value::Histogram(buckets) => buckets.iter().map(|b| b.less_than).filter(|b| b.is_finite()).reduce(f64::max),
        _ => None,
    });
    assert_eq!(top, Some(600.0), "buckets reach the longest default timeout");
}

#[tokio::test]
async fn retries_and_failovers_are_counted() {
    let h = Harness::start().await;
    let faults =
        [("sk-up-1".to_string(), sluice::mock::KeyFault { status: 429, retry_after: Some("60".into()), code: None })]
            .into_iter()
            .collect();
    h.mock.state.set_faults(sluice::mock::Faults { keys: faults, ..Default::default() });
    assert_eq!(h.chats(3, r#"{"model":"plain"}"#).await, [200; 3]);
    let m = scrape(&h).await;
    assert_eq!(sample(&m, "sluice_retries_total", &[]), 1.0);
    assert_eq!(sample(&m, "sluice_failovers_total", &[]), 1.0);
    assert_eq!(sample(&m, "sluice_upstream_attempts_total", &[("outcome", "rate_limited")]), 1.0);
    let limited = sluice::config::keys::fingerprint("sk-up-1");
    assert_eq!(sample(&m, "sluice_key_state", &[("key", &limited), ("state", "cooling")]), 1.0);
}

#[tokio::test]
async fn metrics_need_a_key_unless_exempt_and_can_be_off() {
    let h = Harness::start().await;
    let bare = h.send(Request::get(h.url("/metrics")).body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(bare.status, StatusCode::UNAUTHORIZED);
    let off = Harness::start_with(Opts { tables: "[metrics]\nenabled = false\n".into(), ..Opts::default() }).await;
    let reply = off
        .send(Request::get(off.url("/metrics")).header("x-api-key", CLIENT_KEY).body(Full::new(Bytes::new())).unwrap())
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn stats_report_totals_and_keys() {
    let h = Harness::start().await;
    h.chats(4, r#"{"model":"plain"}"#).await;
    h.chat(r#"{"model":5}"#).await;
    let reply = h
        .send(Request::get(h.url("/stats")).header("x-api-key", CLIENT_KEY).body(Full::new(Bytes::new())).unwrap())
        .await;
    let stats = reply.json();
    assert_eq!(stats["requests"], 5);
    assert_eq!(stats["successes"], 4);
    assert_eq!(stats["failures"], 1);
    assert_eq!(stats["success_rate"], 0.8);
    let keys = stats["upstreams"][0]["keys"].as_array().unwrap();
    assert_eq!(keys.iter().map(|k| k["requests"].as_u64().unwrap()).sum::<u64>(), 4);
    assert!(!reply.body.windows(5).any(|w| w == b"sk-up"), "no secrets in /stats");
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let h = Harness::start().await;
    for body in [r#"{"model":"plain"}"#, r#"{"model":"plain","stream":true}"#, r#"{"model":"plain"}"#] {
        for _ in 0..3 {
            assert_eq!(h.chat(body).await.status, StatusCode::OK);
        }
    }
    let stats = h
        .send(Request::get(h.url("/stats")).header("x-api-key", CLIENT_KEY).body(Full::new(Bytes::new())).unwrap())
        .await
        .json();
    // Nine sequential requests, plain and streamed, over one upstream connection.
    assert_eq!(stats["upstreams"][0]["connections"], serde_json::json!({"opened": 1, "idle": 1}));
    assert_eq!(h.stats().requests, 9);
}

#[tokio::test]
async fn request_log_has_one_line_per_request_and_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.jsonl");
    let tables = format!("[log]\nrequests = \"{}\"\n", log.display());
    let h = Harness::start_with(Opts { tables, ..Opts::default() }).await;
    let request = h
        .post(&format!("/v1/chat/completions?api_key={CLIENT_KEY}"))
        .header("x-request-id", "log-test-1")
        .body(Full::new(Bytes::from_static(br#"{"model":"mini"}"#)))
        .unwrap();
    assert_eq!(h.send(request).await.status, StatusCode::OK);
    stream_chat(&h).await;
    assert_eq!(h.chat(r#"{"model":[]}"#).await.status, StatusCode::BAD_REQUEST);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        h.gateway.shared.telemetry.flush();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 3 {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "log lines missing: {text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for secret in [CLIENT_KEY].iter().chain(UP_KEYS.iter()) {
        assert!(!text.contains(secret), "secret {secret} in the request log");
    }
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let first = lines.iter().find(|l| l["request_id"] == "log-test-1").unwrap();
    assert_eq!(first["path"], "/v1/chat/completions");
    assert_eq!(first["model"], "gpt-4o-mini");
    assert_eq!(first["upstream"], "mock");
    assert_eq!(first["status"], 200);
    assert_eq!(first["attempts"], 1);
    assert_eq!(first["completion_tokens"], 7);
    assert_eq!(first["stream"], false);
    assert!(first["key"].as_str().unwrap().starts_with("sk-u"));
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0 && first["bytes_out"].as_u64().unwrap() > 0);
    let streamed = lines.iter().find(|l| l["stream"] == true).unwrap();
    assert_eq!(streamed["completion_tokens"], 4);
    let refused = lines.iter().find(|l| l["status"] == 400).unwrap();
    assert_eq!(refused["error"], "invalid_model");
}

#[tokio::test]
async fn overhead_header_is_opt_in() {
    let h = Harness::start_with(Opts { server_extra: "overhead_header = true", ..Opts::default() }).await;
    // The upstream takes 400 ms; sluice's own share leaves that wait out.
    let request = h
        .post("/v1/chat/completions")
        .header("x-mock-latency-ms", "400")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain"}"#)))
        .unwrap();
    let reply = h.send(request).await;
    let overhead: u64 = reply.headers["x-sluice-overhead-us"].to_str().unwrap().parse().unwrap();
    assert!(overhead < 400_000, "the upstream's wait was counted as overhead: {overhead} µs");
    let plain = Harness::start().await;
    assert!(!plain.chat(r#"{"model":"plain"}"#).await.headers.contains_key("x-sluice-overhead-us"));
}

#[tokio::test]
async fn a_client_leaving_before_the_answer_is_counted_as_499_and_not_left_in_flight() {
    let h = Harness::start().await;
    let request = h
        .post("/v1/chat/completions")
        .header("x-mock-latency-ms", "3000")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain"}"#)))
        .unwrap();
    // Give up on the request while sluice waits for the upstream's headers.
    let pending = tokio::time::timeout(Duration::from_millis(300), h.h1.request(request)).await;
    assert!(pending.is_err());
    // Well before the harness's 2 s header timeout would end the request anyway.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    loop {
        // The scrape itself is not counted.
        if sample(&scrape(&h).await, "sluice_requests_in_flight", &[]) == 0.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the abandoned request is still counted in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Counted, not lost: as 499 (client closed request), once.
    let scrape = scrape(&h).await;
    assert_eq!(sample(&scrape, "sluice_requests_total", &[("status", "499"), ("model", "plain")]), 1.0);
    assert_eq!(sample(&scrape, "sluice_requests_total", &[("model", "plain")]), 1.0);
}

#[tokio::test]
async fn every_metric_the_dashboard_and_alerts_use_exists() {
    let h = Harness::start().await;
    assert_eq!(h.chat(r#"{"model":"plain"}"#).await.status, StatusCode::OK);
    stream_chat(&h).await;
    let scrape = scrape(&h).await;
    let exposed: std::collections::HashSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["config/grafana/sluice.json", "config/prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut used = Vec::new();
        for (start, _) in text.match_indices(['s', 'p']) {
            let rest = &text[start..];
            if !(rest.starts_with("sluice_") || rest.starts_with("process_"))
                || text[..start].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            {
                continue;
            }
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            let base =
                ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name).to_string();
            used.push(base);
        }
        used.sort();
        used.dedup();
        assert!(used.len() >= 5, "{file}: found only {used:?}");
        for name in &used {
            assert!(exposed.contains(name.as_str()), "{file} uses {name}, which /metrics does not expose");
        }
    }
}
