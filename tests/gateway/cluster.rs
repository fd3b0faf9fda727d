//! Several instances behaving as one gateway: three gateways in this process
//! in front of one mock, sharing a real `redis-server` (and, where keys are
//! made through the admin API, a real PostgreSQL), each started on a free
//! port in a temp dir. Limits are exact across instances, key health and
//! cached answers travel between them, and Redis or PostgreSQL going away
//! costs no request.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use sluice::config::Config;
use sluice::mock::MockServer;
use sluice::mock::faults::{Faults, KeyFault};
use sluice::server::{self, Running};
use sluice::state::Shared;

use crate::support::pki::Issued;
use crate::support::servers::{PgServer, RedisServer};
use crate::support::{
    ADMIN_TOKEN, CLIENT_KEY, Opts, Reply, Transport, UP_KEYS, config_text, eventually, eventually_async, h1_client,
    key_state_in, sample, scrape_at, send, start_mock,
};

/// A tenant key with its own limits, in every instance's config.
const TENANT: &str = "sk-tenant-cluster";
const CHAT: &str = r#"{"model":"plain","messages":[{"role":"user","content":"hi"}]}"#;

/// Three gateways sharing one Redis (and maybe one PostgreSQL) before one mock.
struct Cluster {
    mock: MockServer,
    gateways: Vec<Running>,
    redis: RedisServer,
    _pg: Option<PgServer>,
}

/// Lines every instance's config adds: `[redis]`, the tenant, and `extra`.
fn tables(redis: &RedisServer, extra: &str) -> String {
    format!(
        "[redis]\nurl = \"{}\"\ntimeout = \"200ms\"\n{extra}\n\n[[clients]]\nname = \"tenant\"\nkey = \"{TENANT}\"\nrpm = 60\n",
        redis.url()
    )
}

impl Cluster {
    /// Three instances; `redis_extra` goes into `[redis]`, `more` after the tables.
    async fn start(redis_extra: &str, more: &str, pg: Option<PgServer>) -> Self {
        Self::start_on(RedisServer::start(), redis_extra, more, pg).await
    }

    /// Three instances on this Redis.
    async fn start_on(redis: RedisServer, redis_extra: &str, more: &str, pg: Option<PgServer>) -> Self {
        Self::start_serving(redis, redis_extra, more, pg, "").await
    }

    /// Three instances on this Redis, `server_extra` in their `[server]`.
    async fn start_serving(
        redis: RedisServer,
        redis_extra: &str,
        more: &str,
        pg: Option<PgServer>,
        server_extra: &'static str,
    ) -> Self {
        let mock = start_mock(Transport::H1Sluice).await;
        let mut text_tables = tables(&redis, redis_extra);
        if let Some(pg) = &pg {
            text_tables.push_str(&format!("\n[store]\nurl = \"{}\"\n", pg.url()));
        }
        text_tables.push_str(more);
        let opts = Opts { tables: text_tables, server_extra, ..Opts::default() };
        let text = config_text(&mock.base_url(), &opts);
        let mut gateways = Vec::new();
        for _ in 0..3 {
            let config = Config::from_toml(&text, Path::new("test.toml"), &|_| None).unwrap();
            gateways.push(server::spawn(Shared::new(config).unwrap()).await.unwrap());
        }
        Self { mock, gateways, redis, _pg: pg }
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{path}", self.gateways[i].addr)
    }

    async fn chat(&self, i: usize, key: &str) -> Reply {
        self.chat_body(i, key, CHAT, &[]).await
    }

    async fn chat_body(&self, i: usize, key: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = Request::post(self.url(i, "/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        send(&h1_client(), request.body(Full::new(Bytes::from(body.to_string()))).unwrap()).await
    }

    async fn admin(&self, i: usize, method: Method, path: &str, body: Value) -> Reply {
        let body = if body.is_null() { Bytes::new() } else { Bytes::from(body.to_string()) };
        let request = Request::builder()
            .method(method)
            .uri(self.url(i, path))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
        send(&h1_client(), request).await
    }

    async fn health(&self, i: usize) -> Value {
        self.admin(i, Method::GET, "/health", Value::Null).await.json()
    }

    /// The state of upstream key `key` in instance `i`'s `/health`.
    async fn key_state(&self, i: usize, key: &str) -> String {
        key_state_in(&self.health(i).await, key)
    }

    /// Waits until every instance reports Redis answering.
    async fn all_up(&self) {
        for i in 0..3 {
            eventually_async("Redis up on every instance", || async move {
                self.health(i).await.get("unreachable").is_none()
            })
            .await;
        }
    }

    fn hits(&self, key: &str) -> u64 {
        self.mock.state.stats().by_key.get(key).copied().unwrap_or(0)
    }
}

/// A synchronous connection to the test's Redis, to look inside it.
fn redis_keys(redis: &RedisServer, pattern: &str) -> Vec<String> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    redis::cmd("KEYS").arg(pattern).query(&mut conn).unwrap()
}

/// Sends `n` chats of `key` spread round-robin over the instances, 30 at a
/// time; returns how many got each status.
async fn burst(cluster: &Cluster, key: &str, n: usize) -> HashMap<u16, usize> {
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i, "/v1/chat/completions")).collect();
    let mut statuses = HashMap::new();
    for wave in (0..n).collect::<Vec<_>>().chunks(30) {
        let mut tasks = Vec::new();
        for i in wave {
            let url = urls[i % 3].clone();
            let key = key.to_string();
            tasks.push(tokio::spawn(async move {
                let request = Request::post(url)
                    .header("authorization", format!("Bearer {key}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
                    .unwrap();
                send(&h1_client(), request).await.status.as_u16()
            }));
        }
        for task in tasks {
            *statuses.entry(task.await.unwrap()).or_insert(0) += 1;
        }
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_is_exact_across_three_instances() {
    let cluster = Cluster::start("", "", None).await;
    let cluster = &cluster;
    cluster.all_up().await;
    let statuses = burst(cluster, TENANT, 300).await;
    assert_eq!(statuses.get(&200), Some(&60), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&240), "{statuses:?}");
    assert_eq!(cluster.mock.state.stats().requests, 60, "only admitted requests reach the upstream");
    // The refusal is shaped as the in-process limiter's.
    let refused = cluster.chat(1, TENANT).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "rate_limit_exceeded");
    assert_eq!(refused.headers["x-ratelimit-limit-requests"], "60");
    assert_eq!(refused.headers["x-ratelimit-remaining-requests"], "0");
    assert!(refused.headers.contains_key("retry-after"));
}

/// The same on event loops: each loop talks to Redis over connections of its
/// own, and the limit stays exact over both loops of all three instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_is_exact_across_instances_served_on_event_loops() {
    let cluster = Cluster::start_serving(RedisServer::start(), "", "", None, "event_loops = 2").await;
    let cluster = &cluster;
    cluster.all_up().await;
    let statuses = burst(cluster, TENANT, 300).await;
    assert_eq!(statuses.get(&200), Some(&60), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&240), "{statuses:?}");
    assert_eq!(cluster.mock.state.stats().requests, 60);
    for i in 0..3 {
        let request = Request::get(cluster.url(i, "/stats")).header("authorization", format!("Bearer {CLIENT_KEY}"));
        let stats = send(&h1_client(), request.body(Full::new(Bytes::new())).unwrap()).await.json();
        let per_loop = &stats["connections"]["per_loop"];
        assert!(
            per_loop.as_array().is_some_and(|n| n.len() == 2 && n.iter().all(|n| n.as_u64() > Some(10))),
            "{stats}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooldown_on_one_instance_stops_the_others_using_the_key() {
    let cluster = Cluster::start("", "", None).await;
    let cluster = &cluster;
    cluster.all_up().await;
    let key_a = UP_KEYS[0];
    let fault = KeyFault { status: 429, retry_after: Some("60".into()), code: None };
    cluster.mock.state.set_faults(Faults { keys: HashMap::from([(key_a.to_string(), fault)]), ..Faults::default() });
    // Instance 0 meets the 429 on key-a and moves on to another key.
    for _ in 0..3 {
        assert_eq!(cluster.chat(0, CLIENT_KEY).await.status, StatusCode::OK);
    }
    assert!(cluster.hits(key_a) >= 1, "instance 0 tried key-a");
    cluster.mock.state.set_faults(Faults::default());
    for i in 1..3 {
        let mut state = String::new();
        for _ in 0..250 {
            state = cluster.key_state(i, key_a).await;
            if state == "cooling" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(state, "cooling", "instance {i} heard of the cooldown");
    }
    let before = cluster.hits(key_a);
    for i in 1..3 {
        for _ in 0..50 {
            assert_eq!(cluster.chat(i, CLIENT_KEY).await.status, StatusCode::OK);
        }
    }
    assert_eq!(cluster.hits(key_a), before, "instances 1 and 2 sent nothing to key-a");
    // An instance that starts later reads the cooldown from Redis.
    let late = {
        let text =
            config_text(&cluster.mock.base_url(), &Opts { tables: tables(&cluster.redis, ""), ..Opts::default() });
        let config = Config::from_toml(&text, Path::new("test.toml"), &|_| None).unwrap();
        server::spawn(Shared::new(config).unwrap()).await.unwrap()
    };
    let late_state = |addr: std::net::SocketAddr| async move {
        let request = Request::get(format!("http://{addr}/health"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        key_state_in(&send(&h1_client(), request).await.json(), key_a) == "cooling"
    };
    eventually_async("a late instance reads the cooldown", || late_state(late.addr)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_and_a_reset_reach_every_instance() {
    let cluster = Cluster::start("", "", None).await;
    let cluster = &cluster;
    cluster.all_up().await;
    let key_b = UP_KEYS[1];
    let fault = KeyFault { status: 401, retry_after: None, code: Some("invalid_api_key".into()) };
    cluster.mock.state.set_faults(Faults { keys: HashMap::from([(key_b.to_string(), fault)]), ..Faults::default() });
    for _ in 0..3 {
        assert_eq!(cluster.chat(2, CLIENT_KEY).await.status, StatusCode::OK);
    }
    cluster.mock.state.set_faults(Faults::default());
    for i in 0..3 {
        eventually_async(
            "key-b disabled everywhere",
            || async move { cluster.key_state(i, key_b).await == "disabled" },
        )
        .await;
    }
    let reset = cluster.admin(0, Method::POST, "/admin/reset-failed-keys", Value::Null).await;
    assert_eq!(reset.status, StatusCode::OK);
    for i in 0..3 {
        eventually_async("key-b healthy everywhere after the reset", || async move {
            cluster.key_state(i, key_b).await == "healthy"
        })
        .await;
    }
    assert!(redis_keys(&cluster.redis, "sluice:off:*").is_empty(), "the reset cleared Redis too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cached_through_one_instance_is_a_hit_on_another() {
    let cluster = Cluster::start("", "[cache]\nenabled = true\n", None).await;
    let cluster = &cluster;
    cluster.all_up().await;
    let first = cluster.chat(0, CLIENT_KEY).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["x-sluice-cache"], "miss");
    let redis = &cluster.redis;
    eventually("the answer is in Redis", || !redis_keys(redis, "sluice:cache:e:*").is_empty()).await;
    let second = cluster.chat(1, CLIENT_KEY).await;
    assert_eq!(second.headers["x-sluice-cache"], "hit");
    assert_eq!(second.body, first.body);
    assert_eq!(cluster.mock.state.stats().requests, 1, "one upstream call for both");
    // A purge on one instance empties Redis and the others' memory.
    let purge = cluster.admin(2, Method::POST, "/admin/cache/purge", json!({})).await;
    assert_eq!(purge.status, StatusCode::OK, "{:?}", purge.body);
    assert!(redis_keys(redis, "sluice:cache:*").is_empty());
    eventually_async("instance 1 dropped its copy", || async move {
        let scrape = scrape_at(cluster.gateways[1].addr).await;
        sample(&scrape, "sluice_cache_entries", &[]) == 0.0
    })
    .await;
    assert_eq!(cluster.chat(1, CLIENT_KEY).await.headers["x-sluice-cache"], "miss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopping_costs_no_request_and_shared_limits_resume_when_it_is_back() {
    let mut cluster = Cluster::start("on_error = \"local\"", "", None).await;
    cluster.all_up().await;
    // Requests run on, one after another over the three instances, while
    // Redis is killed under them.
    let done = Arc::new(AtomicUsize::new(0));
    let urls: Vec<String> = (0..3).map(|i| cluster.url(i, "/v1/chat/completions")).collect();
    let running = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut failed = Vec::new();
            for i in 0..90 {
                let request = Request::post(&urls[i % 3])
                    .header("authorization", format!("Bearer {TENANT}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
                    .unwrap();
                let reply = send(&h1_client(), request).await;
                if reply.status != StatusCode::OK {
                    failed.push((i, reply.status, reply.body));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failed
        })
    };
    eventually("a third of the requests are through", || done.load(Ordering::Relaxed) >= 30).await;
    tokio::task::block_in_place(|| cluster.redis.stop());
    let failed = running.await.unwrap();
    assert!(failed.is_empty(), "requests failed while Redis went away: {failed:?}");
    for i in 0..3 {
        let health = cluster.health(i).await;
        assert_eq!(health["status"], "degraded", "{health}");
        assert_eq!(health["unreachable"], json!(["redis"]), "{health}");
        let scrape = scrape_at(cluster.gateways[i].addr).await;
        assert_eq!(sample(&scrape, "sluice_redis_up", &[]), 0.0);
        let errors = sample(&scrape, "sluice_redis_errors_total", &[]);
        assert!(errors >= 1.0, "instance {i} counted {errors}");
    }
    tokio::task::block_in_place(|| cluster.redis.restart());
    cluster.all_up().await;
    // A fresh Redis: the window starts empty and is shared again.
    let statuses = burst(&cluster, TENANT, 90).await;
    assert_eq!(statuses.get(&200), Some(&60), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&30), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_error_deny_limited_keys_get_503_while_redis_is_down() {
    let mut cluster = Cluster::start("on_error = \"deny\"", "", None).await;
    cluster.all_up().await;
    assert_eq!(cluster.chat(0, TENANT).await.status, StatusCode::OK);
    tokio::task::block_in_place(|| cluster.redis.stop());
    let refused = cluster.chat(1, TENANT).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", refused.body);
    assert_eq!(refused.error_code(), "limits_unavailable");
    // A key without limits does not need Redis.
    assert_eq!(cluster.chat(1, CLIENT_KEY).await.status, StatusCode::OK);
    tokio::task::block_in_place(|| cluster.redis.restart());
    cluster.all_up().await;
    assert_eq!(cluster.chat(2, TENANT).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_spent_through_one_instance_is_spent_on_all() {
    let more = "\n[[clients]]\nname = \"budget\"\nkey = \"sk-budget\"\ntokens_per_day = 10\n";
    let cluster = Cluster::start("", more, None).await;
    let cluster = &cluster;
    cluster.all_up().await;
    // The mock's answer reports more than 10 tokens.
    assert_eq!(cluster.chat(0, "sk-budget").await.status, StatusCode::OK);
    for i in 1..3 {
        eventually_async("the budget is spent everywhere", || async move {
            cluster.chat(i, "sk-budget").await.status == StatusCode::TOO_MANY_REQUESTS
        })
        .await;
    }
    let refused = cluster.chat(2, "sk-budget").await;
    assert_eq!(refused.error_code(), "insufficient_quota");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_made_on_one_instance_work_on_all_and_revoked_stop_everywhere() {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let cluster = Cluster::start("", "", Some(pg)).await;
    let cluster = &cluster;
    let user = cluster.admin(0, Method::POST, "/admin/users", json!({ "name": "alice" })).await;
    assert_eq!(user.status, StatusCode::CREATED, "{:?}", user.body);
    let made =
        cluster.admin(0, Method::POST, "/admin/keys", json!({ "user_id": user.json()["id"], "name": "k" })).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    let (id, key) = (made.json()["id"].as_i64().unwrap(), made.json()["key"].as_str().unwrap().to_string());
    assert_eq!(cluster.chat(0, &key).await.status, StatusCode::OK, "at once on the instance that made it");
    for i in 1..3 {
        let key = key.clone();
        eventually_async("the key works on the other instances", || {
            let key = key.clone();
            let cluster = &cluster;
            async move { cluster.chat(i, &key).await.status == StatusCode::OK }
        })
        .await;
    }
    let revoked = cluster.admin(2, Method::DELETE, &format!("/admin/keys/{id}"), Value::Null).await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    assert_eq!(cluster.chat(2, &key).await.status, StatusCode::UNAUTHORIZED);
    for i in 0..2 {
        let key = key.clone();
        eventually_async("the revoked key is refused everywhere", || {
            let key = key.clone();
            let cluster = &cluster;
            async move { cluster.chat(i, &key).await.status == StatusCode::UNAUTHORIZED }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopping_keeps_known_keys_working_and_loses_no_usage() {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let mut cluster = Cluster::start("", "", Some(pg)).await;
    let user = cluster.admin(0, Method::POST, "/admin/users", json!({ "name": "bob" })).await;
    let made =
        cluster.admin(0, Method::POST, "/admin/keys", json!({ "user_id": user.json()["id"], "name": "k" })).await;
    let (id, key) = (made.json()["id"].as_i64().unwrap(), made.json()["key"].as_str().unwrap().to_string());
    let pg = cluster._pg.as_mut().unwrap();
    tokio::task::block_in_place(|| pg.stop());
    for _ in 0..10 {
        assert_eq!(cluster.chat(0, &key).await.status, StatusCode::OK, "a known key works without the store");
    }
    let write = cluster.admin(0, Method::POST, "/admin/users", json!({ "name": "carol" })).await;
    assert_eq!(write.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", write.body);
    assert_eq!(write.error_code(), "store_unavailable");
    let shared = &cluster;
    eventually_async("the store is named unreachable", || async move {
        shared.health(0).await["unreachable"] == json!(["store"])
    })
    .await;
    let pg = cluster._pg.as_mut().unwrap();
    tokio::task::block_in_place(|| pg.restart());
    let cluster = &cluster;
    eventually_async("the usage counted while it was down is written", || async move {
        let usage = cluster.admin(0, Method::GET, &format!("/admin/keys/{id}/usage"), Value::Null).await;
        usage.status == StatusCode::OK && usage.json()["total"]["requests"] == 10
    })
    .await;
    eventually_async(
        "the store is healthy again",
        || async move { cluster.health(0).await.get("unreachable").is_none() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_a_redis_over_tls() {
    let issued = Issued::new("sluice test redis");
    let redis = RedisServer::start_tls(&issued.cert_file, &issued.key_file);
    assert!(redis.url().starts_with("rediss://"));
    let ca_line = format!("ca_file = {:?}", issued.ca_file);
    let cluster = Cluster::start_on(redis, &ca_line, "", None).await;
    let cluster = &cluster;
    cluster.all_up().await;
    let statuses = burst(cluster, TENANT, 90).await;
    assert_eq!(statuses.get(&200), Some(&60), "{statuses:?}");
    for i in 0..3 {
        let scrape = scrape_at(cluster.gateways[i].addr).await;
        assert_eq!(sample(&scrape, "sluice_redis_errors_total", &[]), 0.0, "instance {i} talked TLS without an error");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_made_while_redis_was_down_holds_when_it_is_back() {
    let mut cluster = Cluster::start("", "", None).await;
    cluster.all_up().await;
    let key_b = UP_KEYS[1];
    let fault = KeyFault { status: 401, retry_after: None, code: Some("invalid_api_key".into()) };
    cluster.mock.state.set_faults(Faults { keys: HashMap::from([(key_b.to_string(), fault)]), ..Faults::default() });
    for _ in 0..3 {
        assert_eq!(cluster.chat(0, CLIENT_KEY).await.status, StatusCode::OK);
    }
    cluster.mock.state.set_faults(Faults::default());
    for i in 0..3 {
        let shared = &cluster;
        eventually_async("key-b disabled everywhere", || async move { shared.key_state(i, key_b).await == "disabled" })
            .await;
    }
    tokio::task::block_in_place(|| cluster.redis.stop());
    let reset = cluster.admin(0, Method::POST, "/admin/reset-failed-keys", Value::Null).await;
    assert_eq!(reset.status, StatusCode::OK);
    assert_eq!(cluster.key_state(0, key_b).await, "healthy");
    // Redis comes back empty here; a real one would still hold the disable.
    // Put it back as it was, to be sure the reset clears it rather than
    // being undone by it.
    tokio::task::block_in_place(|| cluster.redis.restart());
    {
        let client = redis::Client::open(cluster.redis.url()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let id = sluice::upstream::keyring::UpstreamKey::new(sluice::config::keys::Secret::new(key_b.to_string()))
            .unwrap()
            .shared_id
            .to_string();
        let _: () = redis::cmd("SET").arg(format!("sluice:off:{id}")).arg(1).query(&mut conn).unwrap();
    }
    cluster.all_up().await;
    let shared = &cluster;
    for i in 0..3 {
        eventually_async("key-b healthy everywhere once Redis is back", || async move {
            shared.key_state(i, key_b).await == "healthy"
        })
        .await;
    }
    eventually("the disable is gone from Redis", || redis_keys(&shared.redis, "sluice:off:*").is_empty()).await;
    for i in 0..3 {
        assert_eq!(shared.key_state(i, key_b).await, "healthy", "instance {i} kept the reset");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_redis_cannot_take_says_so() {
    let mut cluster = Cluster::start("", "[cache]\nenabled = true\n", None).await;
    cluster.all_up().await;
    assert_eq!(cluster.chat(0, CLIENT_KEY).await.headers["x-sluice-cache"], "miss");
    tokio::task::block_in_place(|| cluster.redis.stop());
    let purge = cluster.admin(0, Method::POST, "/admin/cache/purge", json!({})).await;
    assert_eq!(purge.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", purge.body);
    assert_eq!(purge.error_code(), "redis_unavailable");
    // This instance's own copy went all the same.
    assert_eq!(cluster.chat(0, CLIENT_KEY).await.headers["x-sluice-cache"], "miss");
}

/// The shared window decides exactly as the in-process one, request by
/// request, on the same clock (the script takes a test's time instead of
/// Redis's), and no 60 s span ever holds more than the limit.
#[test]
fn the_shared_window_admits_exactly_what_the_in_process_one_does() {
    use sluice::access::limits::{Verdict, Window};
    let redis = RedisServer::start();
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let script = redis::Script::new(sluice::cluster::limits::ADMIT);
    let (limit, span) = (10u32, std::time::Duration::from_secs(60));
    let local = Window::default();
    let mut t = 1_764_000_000_000u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut admitted_times = Vec::new();
    for step in 0..3000u64 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        t += match step % 300 {
            0..=79 => 3_000,
            80..=159 => rng % 2_000,
            160 => 59_900,
            161..=169 => 200_000, // idle past the window: stale buckets go
            _ => rng % 700,
        };
        let verdict = local.take(limit, span, t);
        let here = matches!(verdict, Verdict::Admitted { .. });
        let answer: String = script
            .key("rl:m")
            .key("rl:h")
            .key("rl:m")
            .arg(limit)
            .arg(0)
            .arg(0)
            .arg(0)
            .arg(t)
            .invoke(&mut conn)
            .unwrap();
        let shared = answer.starts_with("0 ");
        assert_eq!(shared, here, "step {step} at {t}: Redis said {answer:?}");
        // A refusal's wait and an admission's reset agree to the millisecond.
        let wait: u64 = answer.split(' ').nth(2).unwrap().parse().unwrap();
        match verdict {
            Verdict::Refused { retry_after } => assert_eq!(wait, retry_after.as_millis() as u64, "step {step}"),
            Verdict::Admitted { reset, remaining } => {
                assert_eq!(wait, reset.as_millis() as u64, "step {step}");
                assert_eq!(answer.split(' ').nth(1).unwrap(), remaining.to_string(), "step {step}");
            }
        }
        if shared {
            admitted_times.push(t);
        }
    }
    for (i, start) in admitted_times.iter().enumerate() {
        let inside = admitted_times[i..].iter().take_while(|at| **at < start + 60_000).count();
        assert!(inside <= limit as usize, "{inside} admitted within 60 s of {start}");
    }
    assert!(admitted_times.len() > 300, "admitted too little: {}", admitted_times.len());
}

/// Subscribers on the shared channel, as Redis counts them.
fn subscribers(redis: &RedisServer) -> i64 {
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let (_, count): (String, i64) = redis::cmd("PUBSUB").arg("NUMSUB").arg("sluice:events").query(&mut conn).unwrap();
    count
}

/// Lets clients subscribe or not (an ACL rule on Redis's default user;
/// connections open already keep every other command).
fn allow_subscribing(redis: &RedisServer, allowed: bool) {
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let rule = if allowed { "+subscribe" } else { "-subscribe" };
    let _: () = redis::cmd("ACL").arg("SETUSER").arg("default").arg(rule).query(&mut conn).unwrap();
}

/// Closes every subscribed connection Redis has.
fn kill_subscriptions(redis: &RedisServer) {
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let _: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query(&mut conn).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_sent_while_an_instance_was_not_subscribed_still_reaches_its_copy() {
    purge_missed_while_unsubscribed(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_missed_is_seen_though_redis_lost_the_count_of_news() {
    purge_missed_while_unsubscribed(true).await;
}

/// A purge goes out while no instance may subscribe (Redis having lost the
/// news counter just before, if `lose_count`); instance 1 must not serve its
/// copy once subscribed again.
async fn purge_missed_while_unsubscribed(lose_count: bool) {
    let cluster = Cluster::start("", "[cache]\nenabled = true\n", None).await;
    let cluster = &cluster;
    cluster.all_up().await;
    eventually("three instances subscribed", || subscribers(&cluster.redis) == 3).await;
    // Instance 1 stores the answer, and keeps a copy (another instance's
    // answer could be forgotten again when the news of it came late).
    assert_eq!(cluster.chat(1, CLIENT_KEY).await.headers["x-sluice-cache"], "miss");
    eventually("the answer is in Redis", || !redis_keys(&cluster.redis, "sluice:cache:e:*").is_empty()).await;
    eventually("the answer's news is out", || cache_news(&cluster.redis) != 0).await;
    // The subscriptions drop and cannot be made again; the purge goes out to nobody.
    allow_subscribing(&cluster.redis, false);
    kill_subscriptions(&cluster.redis);
    eventually("no instance subscribed", || subscribers(&cluster.redis) == 0).await;
    if lose_count {
        // As a Redis restarted without its data, or one that evicted the
        // counter: counting from the start again must not meet the number
        // instance 1 heard last.
        let mut conn = redis::Client::open(cluster.redis.url()).unwrap().get_connection().unwrap();
        let _: i64 = redis::cmd("DEL").arg("sluice:news:cache").query(&mut conn).unwrap();
    }
    let purge = cluster.admin(0, Method::POST, "/admin/cache/purge", json!({})).await;
    assert_eq!(purge.status, StatusCode::OK, "{:?}", purge.body);
    assert!(redis_keys(&cluster.redis, "sluice:cache:e:*").is_empty(), "the purge emptied Redis");
    // Unheard, the purge leaves instance 1's copy in place while it cannot subscribe.
    assert_eq!(cluster.chat(1, CLIENT_KEY).await.headers["x-sluice-cache"], "hit");
    assert_eq!(cluster.mock.state.stats().requests, 1);
    // Subscribed again, it drops the copies it may have missed news of.
    allow_subscribing(&cluster.redis, true);
    eventually("three instances subscribed again", || subscribers(&cluster.redis) == 3).await;
    eventually_async("instance 1 no longer serves the purged answer", || async move {
        cluster.chat(1, CLIENT_KEY).await.headers["x-sluice-cache"] == "miss"
    })
    .await;
    assert_eq!(cluster.mock.state.stats().requests, 2, "one answer after the purge, from the upstream");
}

/// Entries instance `i` holds in memory, as its `/stats` says.
async fn cache_entries(cluster: &Cluster, i: usize) -> Value {
    let request = Request::get(cluster.url(i, "/stats"))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(&h1_client(), request).await.json()["cache"]["entries"].clone()
}

/// Subscriptions instance `i` made so far, as its `/metrics` says.
async fn subscriptions(cluster: &Cluster, i: usize) -> f64 {
    sample(&scrape_at(cluster.gateways[i].addr).await, "sluice_redis_subscriptions_total", &[])
}

/// The number of the last cache news published (purges, answers stored).
fn cache_news(redis: &RedisServer) -> u64 {
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let number: Option<u64> = redis::cmd("GET").arg("sluice:news:cache").query(&mut conn).unwrap();
    number.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_made_again_with_no_news_missed_keeps_the_copy() {
    let cluster = Cluster::start("", "[cache]\nenabled = true\n", None).await;
    let cluster = &cluster;
    cluster.all_up().await;
    eventually("three instances subscribed", || subscribers(&cluster.redis) == 3).await;
    // Instance 1 stores an answer (its own news: nothing makes it forget it).
    assert_eq!(cluster.chat(1, CLIENT_KEY).await.headers["x-sluice-cache"], "miss");
    // Numbered once published: by then it is on its way to every subscriber,
    // ahead of anything Redis does after.
    eventually("the answer's news is out", || cache_news(&cluster.redis) != 0).await;
    assert_eq!(cache_entries(cluster, 1).await, 1, "instance 1 holds a copy");
    let before = subscriptions(cluster, 1).await;
    assert!(before >= 1.0);
    kill_subscriptions(&cluster.redis);
    eventually_async("instance 1 subscribed again", || async move { subscriptions(cluster, 1).await > before }).await;
    assert_eq!(cache_entries(cluster, 1).await, 1, "no news went unheard: the copy stays");
    assert_eq!(cluster.chat(1, CLIENT_KEY).await.headers["x-sluice-cache"], "hit");
    assert_eq!(cluster.mock.state.stats().requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscriptions_stay_up_through_their_checks() {
    let cluster = Cluster::start("", "", None).await;
    let redis = &cluster.redis;
    eventually("three instances subscribed", || subscribers(redis) == 3).await;
    // Past two of the subscription's checks (one every 2 s): none of them
    // may take a healthy subscription down.
    for _ in 0..250 {
        assert_eq!(subscribers(redis), 3, "a subscription was dropped");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_postgres_is_named_on_health_while_known_keys_work() {
    let pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let cluster = Cluster::start("", "", Some(pg)).await;
    let cluster = &cluster;
    let user = cluster.admin(0, Method::POST, "/admin/users", json!({ "name": "dana" })).await;
    let body = json!({ "user_id": user.json()["id"], "name": "k", "rpm": 0, "rph": 0 });
    let made = cluster.admin(0, Method::POST, "/admin/keys", body).await;
    let key = made.json()["key"].as_str().unwrap().to_string();
    cluster._pg.as_ref().unwrap().freeze(true);
    // An admin call now waits on a database that accepts but never answers.
    let waiting = {
        let url = cluster.url(0, "/admin/users");
        tokio::spawn(async move {
            let request = Request::post(url)
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(br#"{"name":"erin"}"#)))
                .unwrap();
            send(&h1_client(), request).await.status
        })
    };
    let mut named = false;
    for _ in 0..300 {
        let started = std::time::Instant::now();
        let reply = cluster.chat(0, &key).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "a known key works without the store: {:?} after {:?}",
            reply.body,
            started.elapsed()
        );
        if cluster.health(0).await["unreachable"] == json!(["store"]) {
            named = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let ps = std::process::Command::new("ps").args(["-o", "pid,pgid,stat,cmd", "-u", "postgres"]).output().unwrap();
    assert!(
        named,
        "a stalled store is named on /health: {} {}",
        cluster.health(0).await,
        String::from_utf8_lossy(&ps.stdout)
    );
    assert_eq!(waiting.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE, "the admin call gives up");
    cluster._pg.as_ref().unwrap().freeze(false);
    eventually_async(
        "the store is healthy again",
        || async move { cluster.health(0).await.get("unreachable").is_none() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn news_older_than_a_reset_does_not_undo_it_once_redis_is_back() {
    let mut cluster = Cluster::start("", "", None).await;
    cluster.all_up().await;
    let key_b = UP_KEYS[1];
    tokio::task::block_in_place(|| cluster.redis.stop());
    // While Redis is away, instance 0 finds key-b bad, then instance 1's
    // operator resets the failed keys.
    let fault = KeyFault { status: 401, retry_after: None, code: Some("invalid_api_key".into()) };
    cluster.mock.state.set_faults(Faults { keys: HashMap::from([(key_b.to_string(), fault)]), ..Faults::default() });
    for _ in 0..3 {
        assert_eq!(cluster.chat(0, CLIENT_KEY).await.status, StatusCode::OK);
    }
    cluster.mock.state.set_faults(Faults::default());
    assert_eq!(cluster.key_state(0, key_b).await, "disabled");
    let reset = cluster.admin(1, Method::POST, "/admin/reset-failed-keys", Value::Null).await;
    assert_eq!(reset.status, StatusCode::OK);
    tokio::task::block_in_place(|| cluster.redis.restart());
    cluster.all_up().await;
    let shared = &cluster;
    for i in 0..3 {
        eventually_async("key-b healthy everywhere once both went out", || async move {
            shared.key_state(i, key_b).await == "healthy"
        })
        .await;
    }
    // Both pieces of news are out by now (the reset counter moved), and the
    // older one did not win anywhere.
    eventually("the reset reached Redis", || {
        let mut conn = redis::Client::open(shared.redis.url()).unwrap().get_connection().unwrap();
        redis::cmd("GET").arg("sluice:resets").query::<Option<u64>>(&mut conn).unwrap().is_some()
    })
    .await;
    for i in 0..3 {
        assert_eq!(shared.key_state(i, key_b).await, "healthy", "instance {i}");
    }
    assert!(redis_keys(&shared.redis, "sluice:off:*").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_holds_for_quick_answers_spread_over_instances() {
    let per_answer = {
        let probe = Cluster::start("", "", None).await;
        probe.chat(0, CLIENT_KEY).await.json()["usage"]["total_tokens"].as_u64().unwrap()
    };
    // A fresh cluster whose client may spend ten answers' tokens a day.
    let more = format!("\n[[clients]]\nname = \"quick\"\nkey = \"sk-quick\"\ntokens_per_day = {}\n", 10 * per_answer);
    let cluster = Cluster::start("", &more, None).await;
    let cluster = &cluster;
    cluster.all_up().await;
    let mut admitted = 0;
    for i in 0..60 {
        // One after another, round-robin: each answer ends before the next asks.
        match cluster.chat(i % 3, "sk-quick").await.status {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("unexpected {other}"),
        }
    }
    // Ten answers' worth, give or take those whose tokens were still on their
    // way to Redis when the next request asked (a busy machine delays the
    // writer); each instance alone would admit ten, thirty in all.
    assert!((10..=15).contains(&admitted), "{admitted} admitted against a budget of ten answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_can_live_in_a_redis_of_their_own() {
    let cache_redis = RedisServer::start();
    let line = format!("cache_url = \"{}\"", cache_redis.url());
    let cluster = Cluster::start(&line, "[cache]\nenabled = true\n", None).await;
    let cluster = &cluster;
    cluster.all_up().await;
    assert_eq!(cluster.chat(0, TENANT).await.headers["x-sluice-cache"], "miss");
    eventually("the answer is in the cache's Redis", || !redis_keys(&cache_redis, "sluice:cache:e:*").is_empty()).await;
    assert!(redis_keys(&cluster.redis, "sluice:cache:*").is_empty(), "nothing cached where the limits live");
    assert!(!redis_keys(&cluster.redis, "sluice:rl:*").is_empty(), "the limits stay in the main Redis");
    assert_eq!(cluster.chat(2, TENANT).await.headers["x-sluice-cache"], "hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_refreshed_on_one_instance_replaces_the_others_copies() {
    let cluster = Cluster::start("", "[cache]\nenabled = true\n", None).await;
    let cluster = &cluster;
    cluster.all_up().await;
    let first = cluster.chat(0, CLIENT_KEY).await;
    eventually("the answer is in Redis", || !redis_keys(&cluster.redis, "sluice:cache:e:*").is_empty()).await;
    for i in 1..3 {
        let copy = cluster.chat(i, CLIENT_KEY).await;
        assert_eq!((copy.headers["x-sluice-cache"].to_str().unwrap(), &copy.body), ("hit", &first.body));
    }
    // A client asks instance 0 for a fresh answer; the mock's ids differ per answer.
    let fresh = cluster.chat_body(0, CLIENT_KEY, CHAT, &[("cache-control", "no-cache")]).await;
    assert_ne!(fresh.body, first.body);
    for i in 1..3 {
        let fresh = &fresh;
        eventually_async("the other instances serve the fresh answer", || async move {
            cluster.chat(i, CLIENT_KEY).await.body == fresh.body
        })
        .await;
    }
    assert_eq!(cluster.mock.state.stats().requests, 2, "hits all the way, but for the refresh");
}
