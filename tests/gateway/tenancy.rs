//! Client tenancy against a real SQLite store: users and keys made through
//! the admin API (and its seed-service names), allowed models, revocation,
//! expiry, request limits, token budgets, usage, per-address limits.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use crate::per_transport;
use crate::support::{ADMIN_TOKEN, Harness, Opts, Reply, Transport, advance_clock, h1_client, sample, scrape_at, send};

/// A harness whose gateway keeps its keys in a fresh SQLite file.
pub struct Tenancy {
    pub h: Harness,
    /// Holds the store file for as long as the gateway runs.
    _dir: tempfile::TempDir,
}

/// `[store]` (and anything else) for a store in `dir`.
pub fn store_tables(dir: &std::path::Path, extra: &str) -> String {
    format!("[store]\nurl = \"sqlite://{}\"\n{extra}\n", dir.join("keys.db").display())
}

impl Tenancy {
    pub async fn start(transport: Transport, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tables = store_tables(dir.path(), extra);
        let h = Harness::start_with(Opts { transport, tables, ..Opts::default() }).await;
        Self { h, _dir: dir }
    }

    /// An admin call with a JSON body.
    pub async fn admin(&self, method: Method, path: &str, body: Value) -> Reply {
        let body = if body.is_null() { Bytes::new() } else { Bytes::from(body.to_string()) };
        let request = Request::builder()
            .method(method)
            .uri(self.h.url(path))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
        self.h.send(request).await
    }

    /// Creates a user and a key for it with `policy` merged in; returns (key id, key).
    pub async fn key(&self, policy: Value) -> (i64, String) {
        let user = self.admin(Method::POST, "/admin/users", json!({ "name": format!("u{}", rand_suffix()) })).await;
        assert_eq!(user.status, StatusCode::CREATED, "{:?}", user.body);
        let mut body = json!({ "user_id": user.json()["id"], "name": "test" });
        if let (Value::Object(body), Value::Object(policy)) = (&mut body, policy) {
            body.extend(policy);
        }
        let key = self.admin(Method::POST, "/admin/keys", body).await;
        assert_eq!(key.status, StatusCode::CREATED, "{:?}", key.body);
        let json = key.json();
        (json["id"].as_i64().unwrap(), json["key"].as_str().unwrap().to_string())
    }

    /// A chat with `key`, on a connection of its own (a test that moves the
    /// clock past the idle timeout must not reuse a connection the gateway
    /// closed meanwhile).
    pub async fn chat_as(&self, key: &str, body: Value) -> Reply {
        let request = Request::post(self.h.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        send(&h1_client(), request).await
    }

    /// The key's usage totals as the admin API reports them.
    pub async fn usage(&self, id: i64) -> Value {
        let reply = self.admin(Method::GET, &format!("/admin/keys/{id}/usage"), Value::Null).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        reply.json()["total"].clone()
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn chat(model: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }] })
}

async fn a_key_works_for_its_models_only_and_dies_when_revoked(t: Transport) {
    let tenancy = Tenancy::start(t, "").await;
    let (id, key) = tenancy.key(json!({ "models": ["mini"] })).await;
    assert!(key.starts_with("sk-sluice-") && key.len() == 42, "{key}");
    // Allowed by its alias, and by the canonical name the alias stands for.
    assert_eq!(tenancy.chat_as(&key, chat("mini")).await.status, StatusCode::OK);
    assert_eq!(tenancy.chat_as(&key, chat("gpt-4o-mini")).await.status, StatusCode::OK);
    let refused = tenancy.chat_as(&key, chat("plain")).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.error_code(), "model_not_allowed");
    assert_eq!(refused.json()["error"]["param"], "model");
    assert_eq!(tenancy.h.stats().requests, 2, "the refused request never reached the upstream");
    let revoked = tenancy.admin(Method::DELETE, &format!("/admin/keys/{id}"), Value::Null).await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    let after = tenancy.chat_as(&key, chat("mini")).await;
    assert_eq!((after.status, after.error_code().as_str()), (StatusCode::UNAUTHORIZED, "invalid_api_key"));
    assert_eq!(tenancy.h.stats().requests, 2);
}

async fn rpm_5_admits_exactly_5_of_15_concurrent_requests(t: Transport) {
    let tenancy = std::sync::Arc::new(Tenancy::start(t, "").await);
    let (_, key) = tenancy.key(json!({ "rpm": 5 })).await;
    let tasks: Vec<_> = (0..15)
        .map(|_| {
            let (tenancy, key) = (std::sync::Arc::clone(&tenancy), key.clone());
            tokio::spawn(async move { tenancy.chat_as(&key, chat("plain")).await })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    let admitted: Vec<&Reply> = replies.iter().filter(|r| r.status == StatusCode::OK).collect();
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS).collect();
    assert_eq!((admitted.len(), refused.len()), (5, 10));
    assert_eq!(tenancy.h.stats().requests, 5, "refused requests never reach the upstream");
    for reply in &refused {
        assert_eq!(reply.error_code(), "rate_limit_exceeded");
        let message = reply.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("5 requests per minute"), "{message}");
        let retry_after: u64 = reply.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=61).contains(&retry_after), "{retry_after}");
        assert_eq!(reply.headers["x-ratelimit-limit-requests"], "5");
        assert_eq!(reply.headers["x-ratelimit-remaining-requests"], "0");
        assert!(reply.headers.contains_key("x-ratelimit-reset-requests"));
    }
    let mut remaining: Vec<u32> = admitted
        .iter()
        .map(|r| r.headers["x-ratelimit-remaining-requests"].to_str().unwrap().parse().unwrap())
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, [0, 1, 2, 3, 4]);
    // A client's limit is not an upstream's: every upstream key stays healthy.
    for key in crate::support::UP_KEYS {
        assert_eq!(tenancy.h.key_state(key).await, "healthy");
    }
}

per_transport!(multi_thread: rpm_5_admits_exactly_5_of_15_concurrent_requests);
per_transport!(a_key_works_for_its_models_only_and_dies_when_revoked);

#[tokio::test]
async fn the_minute_window_slides_on_the_clock() {
    let tenancy = Tenancy::start(Transport::H1Sluice, "").await;
    let (_, key) = tenancy.key(json!({ "rpm": 2, "rph": 3 })).await;
    for _ in 0..2 {
        assert_eq!(tenancy.chat_as(&key, chat("plain")).await.status, StatusCode::OK);
    }
    let third = tenancy.chat_as(&key, chat("plain")).await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(third.json()["error"]["message"].as_str().unwrap().contains("per minute"));
    advance_clock(Duration::from_secs(62)).await;
    assert_eq!(tenancy.chat_as(&key, chat("plain")).await.status, StatusCode::OK);
    advance_clock(Duration::from_secs(62)).await;
    let hourly = tenancy.chat_as(&key, chat("plain")).await;
    assert_eq!(hourly.status, StatusCode::TOO_MANY_REQUESTS, "3 per hour spent");
    assert!(hourly.json()["error"]["message"].as_str().unwrap().contains("3 requests per hour"));
    assert_eq!(tenancy.h.stats().requests, 3);
}

#[tokio::test]
async fn expired_keys_and_disabled_users_are_refused() {
    let tenancy = Tenancy::start(Transport::H1Sluice, "").await;
    let (_, expired) = tenancy.key(json!({ "expires_at": 1_000 })).await;
    let reply = tenancy.chat_as(&expired, chat("plain")).await;
    assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::UNAUTHORIZED, "key_expired"));
    let (_, key) = tenancy.key(json!({})).await;
    assert_eq!(tenancy.chat_as(&key, chat("plain")).await.status, StatusCode::OK);
    let keys = tenancy.admin(Method::GET, "/admin/keys", Value::Null).await.json();
    let user = keys["data"].as_array().unwrap().last().unwrap()["user_id"].as_i64().unwrap();
    let disabled = tenancy.admin(Method::PATCH, &format!("/admin/users/{user}"), json!({ "disabled": true })).await;
    assert_eq!(disabled.status, StatusCode::OK);
    let reply = tenancy.chat_as(&key, chat("plain")).await;
    assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::UNAUTHORIZED, "invalid_api_key"));
    let scrape = scrape_at(tenancy.h.gateway.addr).await;
    assert_eq!(sample(&scrape, "sluice_client_rejections_total", &[("reason", "expired")]), 1.0);
    assert_eq!(sample(&scrape, "sluice_client_rejections_total", &[("reason", "invalid")]), 1.0);
}

#[tokio::test]
async fn a_streams_tokens_land_in_the_keys_usage_and_spend_its_budget() {
    let tenancy = Tenancy::start(Transport::H2c, "").await;
    let (id, key) = tenancy.key(json!({ "tokens_per_day": 5 })).await;
    // A budget cannot be dodged by streaming: the gateway asks for the usage
    // event when the client did not, and refuses a stream that declines it.
    let declined = json!({ "model": "plain", "stream": true, "stream_options": { "include_usage": false } });
    let refused = tenancy.chat_as(&key, declined).await;
    assert_eq!(
        (refused.status, refused.json()["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("stream_options"))
    );
    let body = json!({ "model": "plain", "stream": true, "messages": [{ "role": "user", "content": "hi" }] });
    let reply = tenancy.chat_as(&key, body).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers.contains_key("x-ratelimit-limit-tokens"));
    assert!(String::from_utf8_lossy(&reply.body).contains("\"usage\""));
    let mut usage = Value::Null;
    for _ in 0..200 {
        usage = tenancy.usage(id).await;
        if usage["completion_tokens"].as_i64().unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        (usage["requests"].as_i64(), usage["errors"].as_i64()),
        (Some(2), Some(1)),
        "the 400 counts too: {usage}"
    );
    assert!(
        usage["prompt_tokens"].as_i64().unwrap() > 0 && usage["completion_tokens"].as_i64().unwrap() > 0,
        "{usage}"
    );
    // The budget of 5 tokens is spent by that answer.
    let spent = tenancy.chat_as(&key, chat("plain")).await;
    assert_eq!((spent.status, spent.error_code().as_str()), (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota"));
    assert!(spent.headers.contains_key("retry-after"));
    assert_eq!(spent.headers["x-ratelimit-remaining-tokens"], "0");
    assert_eq!(tenancy.h.stats().requests, 1);
}

#[tokio::test]
async fn the_seed_services_routes_answer_as_documented() {
    let tenancy = Tenancy::start(Transport::H1Sluice, "").await;
    let user = tenancy.admin(Method::POST, "/api/v1/admin/users", json!({ "username": "seed", "email": "s@x" })).await;
    assert_eq!(user.status, StatusCode::CREATED, "{:?}", user.body);
    let user_id = user.json()["id"].clone();
    let created =
        tenancy.admin(Method::POST, "/api/v1/admin/api-keys", json!({ "user_id": user_id, "key_name": "mine" })).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let created = created.json();
    let key = created["api_key"].as_str().unwrap().to_string();
    assert_eq!(created["name"], "mine");
    let listed = tenancy.admin(Method::GET, "/api/v1/admin/api-keys", Value::Null).await.json();
    let listed = listed["data"][0].to_string();
    assert!(!listed.contains(&key) && listed.contains(&key[..14]), "listed by prefix only: {listed}");
    assert_eq!(tenancy.admin(Method::GET, "/api/v1/admin/users", Value::Null).await.json()["data"][0]["name"], "seed");
    let request = |path: &str, body: Option<Value>| {
        let builder = Request::builder().uri(tenancy.h.url(path)).header("x-api-key", &key);
        match body {
            Some(body) => builder
                .method(Method::POST)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
            None => builder.method(Method::GET).body(Full::new(Bytes::new())).unwrap(),
        }
    };
    let answer = tenancy.h.send(request("/api/v1/chat/completions", Some(chat("mini")))).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.json()["object"], "chat.completion");
    let models = tenancy.h.send(request("/api/v1/models", None)).await;
    assert_eq!((models.status, models.json()["object"].as_str()), (StatusCode::OK, Some("list")));
    let stats = tenancy.admin(Method::GET, "/api/v1/admin/stats", Value::Null).await;
    assert_eq!(stats.status, StatusCode::OK);
    assert_eq!((stats.json()["users"].as_i64(), stats.json()["keys"]["active"].as_i64()), (Some(1), Some(1)));
    let id = created["id"].as_i64().unwrap();
    assert_eq!(
        tenancy.admin(Method::DELETE, &format!("/api/v1/admin/api-keys/{id}"), Value::Null).await.status,
        StatusCode::OK
    );
    assert_eq!(tenancy.h.send(request("/api/v1/models", None)).await.status, StatusCode::UNAUTHORIZED);
    // The admin API needs its token, under either name.
    let open =
        tenancy.h.send(Request::get(tenancy.h.url("/api/v1/admin/users")).body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(open.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn admin_refusals_name_the_field() {
    let tenancy = Tenancy::start(Transport::H1Sluice, "").await;
    for (body, field) in [
        (json!({ "rpm": "ten" }), "rpm"),
        (json!({ "rph": 2_000_000 }), "rph"),
        (json!({ "models": "mini" }), "models"),
        (json!({ "user_id": 999 }), "user_id"),
        (json!({ "name": "x", "owner": 1 }), "body"),
    ] {
        let reply = tenancy.admin(Method::POST, "/admin/keys", body.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply.error_code(), "invalid_field");
        assert_eq!(reply.json()["error"]["param"], field, "{body}");
    }
    assert_eq!(tenancy.admin(Method::POST, "/admin/users", json!({})).await.json()["error"]["param"], "name");
    tenancy.admin(Method::POST, "/admin/users", json!({ "name": "twice" })).await;
    assert_eq!(
        tenancy.admin(Method::POST, "/admin/users", json!({ "name": "twice" })).await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(tenancy.admin(Method::GET, "/admin/keys/77", Value::Null).await.status, StatusCode::NOT_FOUND);
    assert_eq!(tenancy.admin(Method::PUT, "/admin/users", Value::Null).await.status, StatusCode::METHOD_NOT_ALLOWED);
    let bad_time = tenancy.admin(Method::GET, "/admin/keys/1/usage?from=soon", Value::Null).await;
    assert_eq!(bad_time.json()["error"]["param"], "from");
}

#[tokio::test]
async fn a_patch_applies_to_the_very_next_request() {
    let tenancy = Tenancy::start(Transport::H1Sluice, "").await;
    let (id, key) = tenancy.key(json!({ "rpm": 3 })).await;
    assert_eq!(tenancy.chat_as(&key, chat("plain")).await.status, StatusCode::OK);
    let patched =
        tenancy.admin(Method::PATCH, &format!("/admin/keys/{id}"), json!({ "models": ["mini"], "rpm": 2 })).await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
    assert_eq!(tenancy.chat_as(&key, chat("plain")).await.status, StatusCode::FORBIDDEN);
    // The table was rebuilt, the key's counters were not: both requests of
    // the minute are counted (a request is charged before its model is checked).
    let reply = tenancy.chat_as(&key, chat("mini")).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", reply.body);
    let disabled = tenancy.admin(Method::PATCH, &format!("/admin/keys/{id}"), json!({ "disabled": true })).await;
    assert_eq!(disabled.json()["disabled"], true);
    assert_eq!(tenancy.chat_as(&key, chat("mini")).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn config_clients_get_policies_and_config_keys_stay_unlimited() {
    let tables = "[[clients]]\nname = \"ci\"\nkey = \"sk-ci\"\nmodels = [\"plain\"]\nrpm = 1\n".to_string();
    let h = Harness::start_with(Opts { tables, ..Opts::default() }).await;
    let as_ci = |model: &str| {
        Request::post(h.url("/v1/chat/completions"))
            .header("authorization", "Bearer sk-ci")
            .body(Full::new(Bytes::from(chat(model).to_string())))
            .unwrap()
    };
    assert_eq!(h.send(as_ci("mini")).await.status, StatusCode::FORBIDDEN);
    let limited = h.send(as_ci("plain")).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "the 403 used the one request of the minute");
    // `[auth] keys` keep today's behaviour: no limit, no headers.
    let statuses = h.chats(5, r#"{"model":"plain"}"#).await;
    assert_eq!(statuses, [200; 5]);
    assert!(!h.chat(r#"{"model":"plain"}"#).await.headers.contains_key("x-ratelimit-limit-requests"));
}

#[tokio::test]
async fn requests_without_a_key_are_limited_per_address() {
    let tables = "[limits]\nper_ip_rpm = 3\n".to_string();
    let h = Harness::start_with(Opts { tables, ..Opts::default() }).await;
    let health = || Request::get(h.url("/health")).body(Full::new(Bytes::new())).unwrap();
    for _ in 0..3 {
        assert_eq!(h.send(health()).await.status, StatusCode::OK);
    }
    let refused = h.send(health()).await;
    assert_eq!((refused.status, refused.error_code().as_str()), (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"));
    assert!(refused.json()["error"]["message"].as_str().unwrap().contains("client address"));
    // Requests with a key are the key's business.
    assert_eq!(h.chats(4, r#"{"model":"plain"}"#).await, [200; 4]);
    let scrape = scrape_at(h.gateway.addr).await;
    assert_eq!(sample(&scrape, "sluice_client_rejections_total", &[("reason", "per_ip")]), 1.0);
}

#[tokio::test]
async fn a_limited_key_sees_only_its_models() {
    let tenancy = Tenancy::start(Transport::H1Sluice, "[metrics]\nper_user = true\n").await;
    let (_, key) = tenancy.key(json!({ "models": ["gpt-4o-mini"] })).await;
    let request =
        Request::get(tenancy.h.url("/v1/models")).header("x-api-key", &key).body(Full::new(Bytes::new())).unwrap();
    let models = tenancy.h.send(request).await.json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gpt-4o-mini", "mini"]);
    assert_eq!(tenancy.chat_as(&key, chat("mini")).await.status, StatusCode::OK);
    // The models list and the chat, both ended before their answers arrived
    // here (sluice's own answer at once, the chat's at its body's end).
    let scrape = scrape_at(tenancy.h.gateway.addr).await;
    let users: Vec<&str> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "sluice_user_requests_total")
        .filter_map(|s| s.labels.get("user"))
        .collect();
    assert_eq!(users.len(), 1, "one series per user");
    assert!(sample(&scrape, "sluice_user_requests_total", &[]) >= 1.0);
}

#[tokio::test]
async fn the_request_log_names_the_key_by_id_and_its_user() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.jsonl");
    let tenancy = Tenancy::start(Transport::H1Sluice, &format!("[log]\nrequests = \"{}\"\n", log.display())).await;
    let (id, key) = tenancy.key(json!({})).await;
    assert_eq!(tenancy.chat_as(&key, chat("plain")).await.status, StatusCode::OK);
    assert_eq!(tenancy.h.chat(r#"{"model":"plain"}"#).await.status, StatusCode::OK);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        tenancy.h.gateway.shared.telemetry.flush();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 2 {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "log lines missing: {text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(!text.contains(&key), "the key itself is never logged");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let store_line = lines.iter().find(|l| l["client"] == format!("key:{id}")).expect("a line naming the key id");
    assert!(store_line["user"].as_str().unwrap().starts_with('u'), "{store_line}");
    assert!(lines.iter().any(|l| l["client"] == "config:0" && l.get("user").is_none()), "{text}");
}

#[tokio::test]
async fn a_tenant_reaches_the_inference_endpoints_only_unless_granted() {
    let tenancy = Tenancy::start(Transport::H1Sluice, "").await;
    let (_, key) = tenancy.key(json!({})).await;
    let call = |method: Method, path: &str, key: &str| {
        Request::builder()
            .method(method)
            .uri(tenancy.h.url(path))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // Files, batches and stored responses live in the upstream account every
    // tenant shares.
    for (method, path) in [
        (Method::GET, "/v1/files/file-of-bob"),
        (Method::DELETE, "/v1/files/file-of-bob"),
        (Method::POST, "/v1/batches"),
        (Method::GET, "/v1/responses/resp_of_bob"),
    ] {
        let reply = tenancy.h.send(call(method, path, &key)).await;
        assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::FORBIDDEN, "path_not_allowed"), "{path}");
    }
    assert_eq!(tenancy.h.stats().requests, 0, "nothing reached the upstream");
    // The operator's own key, and a tenant granted passthrough, may (the
    // mock has no files: its 404 shows the request got there).
    assert_eq!(
        tenancy.h.send(call(Method::GET, "/v1/files/file-1", crate::support::CLIENT_KEY)).await.status,
        StatusCode::NOT_FOUND
    );
    let (_, granted) = tenancy.key(json!({ "passthrough": true })).await;
    assert_eq!(tenancy.h.send(call(Method::GET, "/v1/files/file-1", &granted)).await.status, StatusCode::NOT_FOUND);
    assert_eq!(tenancy.h.stats().path("/v1/files/file-1"), 2);
    // The operator's views are the operator's.
    for path in ["/metrics", "/stats"] {
        let reply = tenancy.h.send(call(Method::GET, path, &key)).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(tenancy.h.send(call(Method::GET, path, crate::support::CLIENT_KEY)).await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn leaving_a_stream_before_its_usage_dodges_no_budget() {
    let tenancy = Tenancy::start(Transport::H1Sluice, "").await;
    let (id, key) = tenancy.key(json!({ "tokens_per_day": 100000 })).await;
    let prompt = "x".repeat(2000);
    let body = json!({ "model": "plain", "stream": true, "messages": [{ "role": "user", "content": prompt }] });
    let request = Request::post(tenancy.h.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("x-mock-chunks", "10")
        .header("x-mock-gap-ms", "50")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = crate::support::h1_client().request(request).await.unwrap();
    let mut stream = response.into_body();
    // Two frames, then gone: before the answer, and its usage, ended.
    for _ in 0..2 {
        http_body_util::BodyExt::frame(&mut stream).await.unwrap().unwrap();
    }
    drop(stream);
    let mut usage = Value::Null;
    for _ in 0..200 {
        usage = tenancy.usage(id).await;
        if usage["requests"].as_i64() == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(usage["errors"], 1, "{usage}");
    assert!(usage["prompt_tokens"].as_i64().unwrap() >= 500, "the request's size is charged: {usage}");
}

#[tokio::test]
async fn a_budget_set_later_in_the_day_counts_what_was_used() {
    let tenancy = Tenancy::start(Transport::H1Sluice, "").await;
    let (id, key) = tenancy.key(json!({})).await;
    assert_eq!(tenancy.chat_as(&key, chat("plain")).await.status, StatusCode::OK);
    let mut used = 0;
    for _ in 0..200 {
        let usage = tenancy.usage(id).await;
        used = usage["prompt_tokens"].as_i64().unwrap() + usage["completion_tokens"].as_i64().unwrap();
        if used > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(used > 0);
    let patched = tenancy.admin(Method::PATCH, &format!("/admin/keys/{id}"), json!({ "tokens_per_day": used })).await;
    assert_eq!(patched.status, StatusCode::OK);
    let spent = tenancy.chat_as(&key, chat("plain")).await;
    assert_eq!((spent.status, spent.error_code().as_str()), (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota"));
}
