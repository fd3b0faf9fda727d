//! Routing one model over several upstreams: weighted targets, fallback
//! tiers, Azure and custom key headers, steering before the 429, the retry
//! budget and the `max_tokens` cap, asserted on the counters of two or more
//! mocks.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sluice::config::Config;
use sluice::mock::{Faults, KeyFault, MockServer, RateFault};
use sluice::server::{self, Running};
use sluice::state::Shared;

use crate::per_transport;
use crate::support::{
    ADMIN_TOKEN, CLIENT_KEY, Reply, Transport, advance_clock, h1_client, pki, sample, scrape_at, send, start_mock,
};

/// Mocks, one per upstream, and a gateway in front of them.
struct Fleet {
    mocks: Vec<MockServer>,
    gateway: Running,
}

/// One upstream of a fleet: its name and extra config lines. Its keys are
/// `sk-NAME-1` and `sk-NAME-2` unless the lines give credentials.
struct Up(&'static str, &'static str);

impl Fleet {
    async fn start(t: Transport, upstreams: &[Up], rest: &str) -> Self {
        let mut mocks = Vec::new();
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\n[auth]\nkeys = [\"{CLIENT_KEY}\"]\n\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n\n"
        );
        if t == Transport::H1Hyper {
            text.push_str("[client]\nh1_client = \"hyper\"\n\n");
        }
        for Up(name, extra) in upstreams {
            let mock = start_mock(t).await;
            let transport = match t {
                Transport::H2c => "http2 = \"prior-knowledge\"".to_string(),
                Transport::TlsH2 | Transport::TlsH1 => format!("ca_file = {:?}", pki::ca_file()),
                Transport::H1Sluice | Transport::H1Hyper => String::new(),
            };
            let keys = if extra.contains("keys") || extra.contains("auth_url") {
                String::new()
            } else {
                format!("keys = [\"sk-{name}-1\", \"sk-{name}-2\"]")
            };
            let timeout = if extra.contains("header_timeout") { "" } else { "header_timeout = \"2s\"" };
            // Azure's endpoints hang off the host (`/openai/deployments/...`), not `/v1`.
            let base_url = mock.base_url();
            let base_url = if extra.contains("azure") { base_url.trim_end_matches("/v1") } else { &base_url };
            text.push_str(&format!(
                "[[upstreams]]\nname = \"{name}\"\nbase_url = \"{base_url}\"\n{keys}\n{timeout}\n{transport}\n{extra}\n\n"
            ));
            mocks.push(mock);
        }
        text.push_str(rest);
        let config =
            Config::from_toml(&text, Path::new("test.toml"), &|_| None).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let gateway = server::spawn(Shared::new(config).unwrap()).await.unwrap();
        Self { mocks, gateway }
    }

    async fn chat(&self, body: &str) -> Reply {
        self.chat_with(body, &[]).await
    }

    async fn chat_with(&self, body: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = Request::post(format!("http://{}/v1/chat/completions", self.gateway.addr))
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        send(&h1_client(), request.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await
    }

    /// GETs `path` with the admin token (or the client key for `/v1/*`).
    async fn get(&self, path: &str) -> Reply {
        let token = if path.starts_with("/v1/") { CLIENT_KEY } else { ADMIN_TOKEN };
        let request = Request::get(format!("http://{}{path}", self.gateway.addr))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(&h1_client(), request).await
    }

    fn requests(&self, mock: usize) -> u64 {
        self.mocks[mock].state.stats().requests
    }

    fn fail_always(&self, mock: usize, status: u16) {
        let fault = RateFault { status, rate: 1.0, seed: 0 };
        self.mocks[mock].state.set_faults(Faults { error_rate: Some(fault), ..Faults::default() });
    }
}

fn header<'a>(reply: &'a Reply, name: &str) -> &'a str {
    reply.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

/// A model on `primary` with `fallback` as the next tier.
const TWO_TIERS: &str = r#"
[[models]]
name = "m"
targets = [
  { upstream = "primary", upstream_model = "m-primary" },
  { upstream = "fallback", upstream_model = "m-fallback", priority = 2 },
]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_traffic_three_to_one() {
    let models = r#"
[[models]]
name = "m"
targets = [{ upstream = "a", upstream_model = "m-a", weight = 3 }, { upstream = "b", weight = 1 }]
"#;
    let fleet = std::sync::Arc::new(Fleet::start(Transport::H1Sluice, &[Up("a", ""), Up("b", "")], models).await);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let fleet = std::sync::Arc::clone(&fleet);
            tokio::spawn(async move {
                for _ in 0..300 {
                    assert_eq!(fleet.chat(CHAT).await.status, StatusCode::OK);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let (a, b) = (fleet.requests(0), fleet.requests(1));
    assert_eq!(a + b, 3000);
    assert!((2250 - 112..=2250 + 112).contains(&a) && (750 - 37..=750 + 37).contains(&b), "{a} / {b}");
    // Each target's model counters are its own.
    let scrape = scrape_at(fleet.gateway.addr).await;
    let on = |upstream| sample(&scrape, "sluice_requests_total", &[("model", "m"), ("upstream", upstream)]);
    assert_eq!((on("a"), on("b")), (a as f64, b as f64));
}

per_transport!(a_dead_primary_falls_back_and_then_gets_only_probes);

async fn a_dead_primary_falls_back_and_then_gets_only_probes(t: Transport) {
    let primary = "max_attempts = 2\nbreaker_failures = 3\nbreaker_cooldown = \"30s\"";
    let fleet = Fleet::start(t, &[Up("primary", primary), Up("fallback", "")], TWO_TIERS).await;
    fleet.fail_always(0, 503);
    for _ in 0..10 {
        let reply = fleet.chat(CHAT).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert_eq!(header(&reply, "x-sluice-upstream"), "fallback");
        assert_eq!(header(&reply, "x-sluice-model"), "m-fallback");
        assert_eq!(reply.json()["model"], "m-fallback", "the fallback got its own model name");
    }
    // Three requests (two attempts each) opened the breaker; then nothing.
    assert_eq!(fleet.requests(0), 6);
    assert_eq!(fleet.requests(1), 10);
    let health = fleet.get("/health").await.json();
    assert_eq!(health["upstreams"][0]["name"], "primary");
    assert_eq!(health["upstreams"][0]["breaker"], "open");
    assert_eq!(health["upstreams"][1]["breaker"], "closed");

    // After the cooldown one request probes the primary (still down) and
    // falls back; the breaker opens again.
    advance_clock(Duration::from_secs(31)).await;
    for _ in 0..5 {
        assert_eq!(fleet.chat(CHAT).await.status, StatusCode::OK);
    }
    assert_eq!(fleet.requests(0), 7, "one probe, not retried");
    assert_eq!(fleet.requests(1), 15);
    let scrape = scrape_at(fleet.gateway.addr).await;
    assert_eq!(sample(&scrape, "sluice_fallbacks_total", &[("reason", "5xx")]), 4.0);
    assert_eq!(sample(&scrape, "sluice_fallbacks_total", &[("reason", "breaker_open")]), 11.0);
}

per_transport!(a_primary_with_every_key_cooling_is_skipped_without_an_attempt);

async fn a_primary_with_every_key_cooling_is_skipped_without_an_attempt(t: Transport) {
    let fleet = Fleet::start(t, &[Up("primary", ""), Up("fallback", "")], TWO_TIERS).await;
    let cool = |key: &str| (key.to_string(), KeyFault { status: 429, retry_after: Some("60".into()), code: None });
    let keys = [cool("sk-primary-1"), cool("sk-primary-2")].into_iter().collect();
    fleet.mocks[0].state.set_faults(Faults { keys, ..Faults::default() });
    // The first request finds out: both keys answer 429 and cool.
    let reply = fleet.chat(CHAT).await;
    assert_eq!((reply.status, header(&reply, "x-sluice-upstream")), (StatusCode::OK, "fallback"));
    assert_eq!(fleet.requests(0), 2);
    // Every later one goes straight to the fallback.
    for _ in 0..10 {
        let reply = fleet.chat(CHAT).await;
        assert_eq!((reply.status, header(&reply, "x-sluice-upstream")), (StatusCode::OK, "fallback"));
    }
    assert_eq!(fleet.requests(0), 2, "no attempt on a primary with no usable key");
    assert_eq!(fleet.requests(1), 11);
    let scrape = scrape_at(fleet.gateway.addr).await;
    assert_eq!(sample(&scrape, "sluice_fallbacks_total", &[("reason", "429")]), 1.0);
    assert_eq!(sample(&scrape, "sluice_fallbacks_total", &[("reason", "no_key")]), 10.0);
}

per_transport!(a_refusal_of_the_request_is_returned_not_fallen_back);

async fn a_refusal_of_the_request_is_returned_not_fallen_back(t: Transport) {
    let fleet = Fleet::start(t, &[Up("primary", ""), Up("fallback", "")], TWO_TIERS).await;
    for status in ["400", "404", "422"] {
        let reply = fleet.chat_with(CHAT, &[("x-mock-status", status)]).await;
        assert_eq!(reply.status.as_str(), status);
        assert_eq!(header(&reply, "x-sluice-upstream"), "primary");
    }
    assert_eq!(fleet.requests(0), 3);
    // A 403 about the request (not the key) is the client's too (the key is
    // checked apart, on the primary).
    let reply = fleet.chat_with(CHAT, &[("x-mock-status", "403")]).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(fleet.requests(1), 0, "nothing reached the fallback");
}

#[tokio::test]
async fn a_streamed_request_falls_back_before_any_byte() {
    let fleet =
        Fleet::start(Transport::H1Sluice, &[Up("primary", "max_attempts = 1"), Up("fallback", "")], TWO_TIERS).await;
    fleet.fail_always(0, 500);
    let reply = fleet.chat(r#"{"model":"m","stream":true,"messages":[]}"#).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(header(&reply, "x-sluice-upstream"), "fallback");
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    assert!(text.contains("m-fallback") && text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!((fleet.requests(0), fleet.requests(1)), (1, 1));
}

#[tokio::test]
async fn a_model_can_narrow_what_falls_back() {
    let models = TWO_TIERS.replace("name = \"m\"", "name = \"m\"\nfallback_on = [\"breaker_open\"]");
    let fleet =
        Fleet::start(Transport::H1Sluice, &[Up("primary", "max_attempts = 1"), Up("fallback", "")], &models).await;
    fleet.fail_always(0, 500);
    let reply = fleet.chat(CHAT).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "5xx is not in this model's fallback_on");
    assert_eq!(header(&reply, "x-sluice-upstream"), "primary");
    assert_eq!(fleet.requests(1), 0);
}

#[tokio::test]
async fn models_and_health_list_a_model_once_with_every_upstream() {
    let fleet = Fleet::start(Transport::H1Sluice, &[Up("primary", ""), Up("fallback", "")], TWO_TIERS).await;
    let models = fleet.get("/v1/models").await.json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["m"]);
    assert_eq!(models["data"][0]["owned_by"], "primary");
    let health = fleet.get("/health").await.json();
    let names: Vec<&str> =
        health["upstreams"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["primary", "fallback"]);
}

per_transport!(azure_gets_its_path_query_and_key_header);

async fn azure_gets_its_path_query_and_key_header(t: Transport) {
    let azure = "kind = \"azure\"\napi_version = \"2024-10-21\"";
    let vendor = "auth_header = \"x-api-key\"";
    let templated = "auth_template = \"Token {key}\"";
    let models = r#"
[[models]]
name = "az"
targets = [{ upstream = "azure", upstream_model = "gpt-4o", deployment = "eu-4o" }]

[[models]]
name = "vendor"
upstream = "vendor"

[[models]]
name = "templated"
upstream = "templated"
"#;
    let fleet = Fleet::start(t, &[Up("azure", azure), Up("vendor", vendor), Up("templated", templated)], models).await;
    let echo = |reply: Reply| {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        reply.json()
    };
    let seen = echo(fleet.chat_with(r#"{"model":"az","messages":[]}"#, &[("x-mock-echo", "1")]).await);
    assert_eq!(seen["path"], "/openai/deployments/eu-4o/chat/completions");
    assert_eq!(seen["query"], "api-version=2024-10-21");
    assert_eq!(seen["headers"]["api-key"], "sk-azure-1");
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    assert!(seen["body"].as_str().unwrap().contains(r#""model":"gpt-4o""#));
    // Without echo, the mock answers the Azure path as a chat and counts the key.
    let reply = fleet.chat(r#"{"model":"az","messages":[]}"#).await;
    assert_eq!((reply.status, header(&reply, "x-sluice-model")), (StatusCode::OK, "gpt-4o"));
    assert_eq!(fleet.mocks[0].state.stats().key("sk-azure-2"), 1);

    let seen = echo(fleet.chat_with(r#"{"model":"vendor","messages":[]}"#, &[("x-mock-echo", "1")]).await);
    assert_eq!(seen["headers"]["x-api-key"], "sk-vendor-1");
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    assert_eq!(seen["path"], "/v1/chat/completions");
    let seen = echo(fleet.chat_with(r#"{"model":"templated","messages":[]}"#, &[("x-mock-echo", "1")]).await);
    assert_eq!(seen["headers"]["authorization"], "Token sk-templated-1");
}

per_transport!(remaining_requests_steer_away_before_the_429);

async fn remaining_requests_steer_away_before_the_429(t: Transport) {
    let keys = "keys = [\"sk-q-1\", \"sk-q-2\", \"sk-q-3\"]";
    let fleet = Fleet::start(t, &[Up("q", keys)], "[[models]]\nname = \"m\"\nupstream = \"q\"\n").await;
    // The first key may make two requests, the others fifty: round-robin
    // alone would send it its third on the 7th request and draw a 429.
    let quota = [("sk-q-1", 2), ("sk-q-2", 50), ("sk-q-3", 50)].map(|(k, n)| (k.to_string(), n)).into_iter().collect();
    fleet.mocks[0].state.set_faults(Faults { quota, quota_reset: Some("6m0s".into()), ..Faults::default() });
    for _ in 0..40 {
        assert_eq!(fleet.chat(CHAT).await.status, StatusCode::OK);
    }
    let stats = fleet.mocks[0].state.stats();
    assert_eq!(stats.status(429), 0, "no request drew a 429");
    assert_eq!(stats.key("sk-q-1"), 2);
    assert_eq!(stats.key("sk-q-2") + stats.key("sk-q-3"), 38);
    let health = fleet.get("/health").await.json();
    let states: Vec<&str> =
        health["upstreams"][0]["keys"].as_array().unwrap().iter().map(|k| k["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["cooling", "healthy", "healthy"], "the spent key waits for its reset");
}

#[tokio::test]
async fn the_retry_budget_caps_attempts_in_a_total_outage() {
    let extra = "keys = [\"sk-o-1\", \"sk-o-2\", \"sk-o-3\"]\nmax_attempts = 3\nbreaker_failures = 100000";
    let fleet =
        Fleet::start(Transport::H1Sluice, &[Up("o", extra)], "[[models]]\nname = \"m\"\nupstream = \"o\"\n").await;
    fleet.fail_always(0, 500);
    let started = tokio::time::Instant::now();
    let requests = 300u64;
    for _ in 0..requests {
        assert_eq!(fleet.chat(CHAT).await.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    // The budget: 0.2 of first attempts over any 10 s, plus a floor of ten
    // retries per 10 s window the run touched.
    let windows = started.elapsed().as_secs() / 10 + 2;
    let attempts = fleet.requests(0);
    let ceiling = requests + requests / 5 + 10 * windows;
    assert!(attempts <= ceiling, "{attempts} attempts for {requests} requests (ceiling {ceiling})");
    assert!(attempts > requests, "some retries were allowed");
    let scrape = scrape_at(fleet.gateway.addr).await;
    let refused = sample(&scrape, "sluice_retry_budget_refused_total", &[("upstream", "o")]) as u64;
    assert!((1..=requests).contains(&refused), "at most one refusal ends a request: {refused}");
    let retried = sample(&scrape, "sluice_retries_total", &[("reason", "server_error")]) as u64;
    assert_eq!(retried, attempts - requests, "every retry sent is counted");
}

#[tokio::test]
async fn max_tokens_over_the_cap_is_clamped_or_refused() {
    let models = r#"
[[models]]
name = "m"
upstream = "u"
max_tokens_cap = 100

[[models]]
name = "strict"
upstream = "u"
max_tokens_cap = 100
max_tokens_over = "refuse"
"#;
    let fleet = Fleet::start(Transport::H1Sluice, &[Up("u", "")], models).await;
    let sent = |reply: Reply| -> serde_json::Value {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        serde_json::from_str(reply.json()["body"].as_str().unwrap()).unwrap()
    };
    let echo = [("x-mock-echo", "1")];
    let reply = fleet.chat_with(r#"{"model":"m","max_tokens":500,"messages":[]}"#, &echo).await;
    assert_eq!(header(&reply, "x-sluice-max-tokens-capped"), "100");
    assert_eq!(sent(reply)["max_tokens"], 100);
    let reply = fleet.chat_with(r#"{"model":"m","max_completion_tokens":900,"messages":[]}"#, &echo).await;
    assert_eq!(sent(reply)["max_completion_tokens"], 100);
    let reply = fleet.chat_with(r#"{"model":"m","max_tokens":50,"messages":[]}"#, &echo).await;
    assert_eq!(header(&reply, "x-sluice-max-tokens-capped"), "", "under the cap: untouched");
    assert_eq!(sent(reply)["max_tokens"], 50);
    let reply = fleet.chat_with(r#"{"model":"m","messages":[]}"#, &echo).await;
    assert_eq!(sent(reply)["max_tokens"], 100, "no limit asked: the cap is the limit");

    let requests_before = fleet.requests(0);
    let reply = fleet.chat(r#"{"model":"strict","max_tokens":500,"messages":[]}"#).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["error"]["param"], "max_tokens");
    assert_eq!(fleet.requests(0), requests_before, "a refused request is never sent");
    assert_eq!(fleet.chat(r#"{"model":"strict","max_tokens":100,"messages":[]}"#).await.status, StatusCode::OK);
}

#[tokio::test]
async fn only_inference_is_spread_or_fallen_back() {
    let fleet =
        Fleet::start(Transport::H1Sluice, &[Up("primary", "max_attempts = 1"), Up("fallback", "")], TWO_TIERS).await;
    fleet.fail_always(0, 500);
    let request = Request::post(format!("http://{}/v1/assistants", fleet.gateway.addr))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"model":"m","name":"helper"}"#)))
        .unwrap();
    let reply = send(&h1_client(), request).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "the primary's answer");
    assert_eq!((fleet.requests(0), fleet.requests(1)), (1, 0), "an assistant lives in one account");
}

#[tokio::test]
async fn a_wildcard_azure_name_cannot_reach_outside_its_deployment() {
    let azure = "kind = \"azure\"\napi_version = \"2024-10-21\"";
    let fleet =
        Fleet::start(Transport::H1Sluice, &[Up("azure", azure)], "[[models]]\nname = \"*\"\nupstream = \"azure\"\n")
            .await;
    for name in ["../../other", "x?api-version=1", "a#b", "a b", "..", "a/b"] {
        let body = serde_json::json!({ "model": name, "messages": [] }).to_string();
        let reply = fleet.chat(&body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{name}");
        assert_eq!(reply.json()["error"]["param"], "model");
    }
    assert_eq!(fleet.requests(0), 0, "nothing was sent");
    let seen = fleet.chat_with(r#"{"model":"gpt-4o.eu_1","messages":[]}"#, &[("x-mock-echo", "1")]).await.json();
    assert_eq!(seen["path"], "/openai/deployments/gpt-4o.eu_1/chat/completions");
}

#[tokio::test]
async fn a_client_header_named_like_the_key_header_never_travels() {
    let vendor = "auth_header = \"x-goog-api-key\"";
    let fleet =
        Fleet::start(Transport::H1Sluice, &[Up("vendor", vendor)], "[[models]]\nname = \"m\"\nupstream = \"vendor\"\n")
            .await;
    let reply = fleet.chat_with(CHAT, &[("x-mock-echo", "1"), ("x-goog-api-key", "junk")]).await;
    let seen = reply.json();
    assert_eq!(seen["headers"]["x-goog-api-key"], "sk-vendor-1", "sluice's key alone: {seen}");
}

#[tokio::test]
async fn limits_that_are_no_plain_number_are_capped_too() {
    let models = r#"
[[models]]
name = "m"
upstream = "u"
max_tokens_cap = 100
defaults = { max_tokens = 64 }

[[models]]
name = "strict"
upstream = "u"
max_tokens_cap = 100
max_tokens_over = "refuse"
"#;
    let fleet = Fleet::start(Transport::H1Sluice, &[Up("u", "")], models).await;
    let sent = |reply: Reply| -> String {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        reply.json()["body"].as_str().unwrap().to_string()
    };
    let echo = [("x-mock-echo", "1")];
    for limit in ["null", "1e6", "100000.0", "\"9999\"", "-1"] {
        let body = format!(r#"{{"model":"m","max_tokens":{limit},"messages":[]}}"#);
        let reply = fleet.chat_with(&body, &echo).await;
        assert_eq!(header(&reply, "x-sluice-max-tokens-capped"), "100", "{limit}");
        let text = sent(reply);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["max_tokens"], 100, "{limit}: {text}");
        assert_eq!(text.matches("max_tokens").count(), 1, "one member: {text}");
        let strict = fleet.chat(&body.replace("\"m\"", "\"strict\"")).await;
        assert_eq!(strict.status, StatusCode::BAD_REQUEST, "{limit}");
    }
    // No limit asked: the model's default (within the cap) goes in, once.
    let text = sent(fleet.chat_with(r#"{"model":"m","messages":[]}"#, &echo).await);
    assert_eq!(text.matches("max_tokens").count(), 1, "{text}");
    assert!(text.contains(r#""max_tokens":64"#), "{text}");
    // A limit member the endpoint does not read does not stand in for one it does.
    let text = sent(fleet.chat_with(r#"{"model":"m","max_output_tokens":1,"messages":[]}"#, &echo).await);
    assert!(text.contains(r#""max_tokens":64"#), "{text}");
}

#[tokio::test]
async fn a_login_upstream_whose_login_fails_falls_back() {
    // Nothing listens on port 9 (discard): the login cannot be made.
    let login = "kind = \"token\"\nauth_url = \"http://127.0.0.1:9/auth/login\"\nusername = \"u\"\npassword = \"p\"";
    let fleet = Fleet::start(Transport::H1Sluice, &[Up("primary", login), Up("fallback", "")], TWO_TIERS).await;
    let reply = fleet.chat(CHAT).await;
    assert_eq!((reply.status, header(&reply, "x-sluice-upstream")), (StatusCode::OK, "fallback"), "{:?}", reply.body);
    assert_eq!((fleet.requests(0), fleet.requests(1)), (0, 1));
}

#[tokio::test]
async fn no_fallback_without_time_left_to_answer() {
    let slow = "max_attempts = 1\nheader_timeout = \"1s\"\ntotal_timeout = \"1s\"";
    let fleet =
        Fleet::start(Transport::H1Sluice, &[Up("primary", slow), Up("fallback", "total_timeout = \"1s\"")], TWO_TIERS)
            .await;
    fleet.mocks[0].state.set_faults(Faults { latency_ms: 3000, ..Faults::default() });
    let reply = fleet.chat(CHAT).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(fleet.requests(1), 0, "the total timeout was spent: nothing is sent that nobody would wait for");
}

#[tokio::test]
async fn a_path_that_only_looks_like_chat_completions_cannot_skip_the_cap() {
    let models = "[[models]]\nname = \"m\"\nupstream = \"u\"\nmax_tokens_cap = 100\n";
    let fleet = Fleet::start(Transport::H1Sluice, &[Up("u", "")], models).await;
    for path in ["/v1/chat/completions;x", "/v1/Chat/Completions", "/v1/chat/completions%20"] {
        let request = Request::post(format!("http://{}{path}", fleet.gateway.addr))
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"model":"m","max_tokens":5000,"messages":[]}"#)))
            .unwrap();
        let reply = send(&h1_client(), request).await;
        assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::BAD_REQUEST, "invalid_path"), "{path}");
    }
    assert_eq!(fleet.requests(0), 0);
}
