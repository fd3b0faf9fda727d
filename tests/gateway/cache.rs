//! The response cache: exact match on what goes upstream, single flight,
//! streams replayed byte for byte, client controls, TTL, the byte bound and
//! scopes, asserted on the mock's counters.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::per_transport;
use crate::support::{
    ADMIN_TOKEN, CLIENT_KEY, Harness, Opts, Reply, Transport, advance_clock, config_text, h1_client, h2_client, sample,
    scrape_at, send, start_mock,
};

const CHAT: &str = r#"{"model":"plain","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str = r#"{"model":"plain","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

async fn cached(t: Transport, cache: &str) -> Harness {
    let tables = format!("[cache]\nenabled = true\n{cache}\n");
    Harness::start_with(Opts { transport: t, tables, ..Opts::default() }).await
}

fn label(reply: &Reply) -> &str {
    reply.headers.get("x-sluice-cache").map_or("none", |v| v.to_str().unwrap())
}

fn chats(h: &Harness) -> u64 {
    h.stats().path("/v1/chat/completions")
}

async fn identical_requests_go_upstream_once(t: Transport) {
    let h = cached(t, "").await;
    let first = h.chat(CHAT).await;
    let second = h.chat(CHAT).await;
    assert_eq!((first.status, label(&first)), (StatusCode::OK, "miss"));
    assert_eq!((second.status, label(&second)), (StatusCode::OK, "hit"));
    assert_eq!(first.body, second.body, "the same answer, id included");
    assert!(second.headers.contains_key("age"));
    assert_eq!(chats(&h), 1);
    // One byte different: another request, another call.
    let other = h.chat(&CHAT.replace("hi", "hj")).await;
    assert_eq!(label(&other), "miss");
    assert_eq!(chats(&h), 2);
}

/// The forwarding headers are added once a request is known to go upstream
/// (after the cache stage): a miss, `no-store` and `no-cache` carry them.
#[tokio::test]
async fn requests_sent_past_the_cache_carry_the_forwarding_headers() {
    let h = Harness::start_with(Opts { tables: "[cache]\nenabled = true\n".into(), ..Opts::default() }).await;
    let echo = |control: Option<&'static str>| {
        let mut request =
            h.post("/v1/chat/completions").header("x-mock-echo", "1").header("x-forwarded-for", "6.6.6.6");
        if let Some(control) = control {
            request = request.header("cache-control", control);
        }
        request.body(Full::new(Bytes::from(CHAT))).unwrap()
    };
    for (control, expected) in [(None, "miss"), (Some("no-store"), "bypass"), (Some("no-cache"), "bypass")] {
        let reply = h.send(echo(control)).await;
        assert_eq!((reply.status, label(&reply)), (StatusCode::OK, expected), "{control:?}");
        let headers = &reply.json()["headers"];
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{control:?}: {headers}");
        assert_eq!(headers["forwarded"], "for=127.0.0.1", "{control:?}: {headers}");
    }
    assert_eq!(label(&h.send(echo(None)).await), "hit");
    assert_eq!(chats(&h), 3, "the hit sent nothing");
    // Answers are fetched uncompressed: what the client accepts does not split entries.
    let gzip = h.post("/v1/chat/completions").header("accept-encoding", "gzip").body(Full::new(Bytes::from(CHAT)));
    assert_eq!(label(&h.send(gzip.unwrap()).await), "hit");
    assert_eq!(chats(&h), 3);
}

async fn a_stream_is_replayed_frame_by_frame_with_its_bytes(t: Transport) {
    let h = cached(t, "").await;
    // A gap between events, so each arrives (and is stored) as a frame of its own.
    let stream = || {
        h.post("/v1/chat/completions")
            .header("x-mock-chunks", "6")
            .header("x-mock-gap-ms", "5")
            .body(Full::new(Bytes::from(STREAM)))
            .unwrap()
    };
    let first = h.send(stream()).await;
    assert_eq!(label(&first), "miss");
    // The replay, read frame by frame.
    let response = h.h1.request(stream()).await.unwrap();
    assert_eq!(response.headers()["x-sluice-cache"], "hit");
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut body = response.into_body();
    let (mut frames, mut bytes) = (0, Vec::new());
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames += 1;
            bytes.extend_from_slice(&data);
        }
    }
    assert_eq!(bytes, first.body.to_vec(), "replayed bytes equal the original stream's");
    assert!(frames > 1, "a stream comes back in frames, not one blob");
    assert!(String::from_utf8_lossy(&bytes).ends_with("data: [DONE]\n\n"));
    assert_eq!(chats(&h), 1);
}

per_transport!(identical_requests_go_upstream_once, a_stream_is_replayed_frame_by_frame_with_its_bytes);
per_transport!(multi_thread: twenty_concurrent_identical_requests_make_one_call);

async fn twenty_concurrent_identical_requests_make_one_call(t: Transport) {
    let h = std::sync::Arc::new(cached(t, "").await);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let h = std::sync::Arc::clone(&h);
        tasks.spawn(async move {
            let request = h
                .post("/v1/chat/completions")
                .header("x-mock-latency-ms", "300")
                .body(Full::new(Bytes::from(CHAT)))
                .unwrap();
            h.send(request).await
        });
    }
    let replies: Vec<Reply> = tasks.join_all().await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    assert!(replies.iter().all(|r| r.body == replies[0].body), "20 identical answers");
    assert_eq!(chats(&h), 1, "one upstream call for 20 identical requests");
    assert_eq!(replies.iter().filter(|r| label(r) == "miss").count(), 1);
}

#[tokio::test]
async fn errors_and_cut_streams_are_never_stored() {
    let h = cached(Transport::H1Sluice, "").await;
    let failing =
        || h.post("/v1/chat/completions").header("x-mock-status", "400").body(Full::new(Bytes::from(CHAT))).unwrap();
    assert_eq!(h.send(failing()).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(h.send(failing()).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(chats(&h), 2, "an error answer is not stored");
    let cut = || {
        h.post("/v1/chat/completions")
            .header("x-mock-chunks", "6")
            .header("x-mock-drop-after", "2")
            .header("x-mock-gap-ms", "20")
            .body(Full::new(Bytes::from(STREAM)))
            .unwrap()
    };
    for _ in 0..2 {
        let response = h.h1.request(cut()).await.unwrap();
        let _ = response.into_body().collect().await;
    }
    crate::support::eventually("both cut streams ended", || h.gateway.shared.telemetry.metrics.in_flight.get() == 0)
        .await;
    assert_eq!(chats(&h), 4);
    let third = h.h1.request(cut()).await.unwrap();
    assert_eq!(third.headers()["x-sluice-cache"], "miss", "a cut stream is not stored");
    assert_eq!(h.gateway.shared.cache.entries(), 0);
}

#[tokio::test]
async fn client_controls_no_cache_no_store_and_ttl() {
    let h = cached(Transport::H1Sluice, "").await;
    let with = |name: &'static str, value: &'static str| {
        h.post("/v1/chat/completions").header(name, value).body(Full::new(Bytes::from(CHAT))).unwrap()
    };
    // no-store: neither read nor written.
    let reply = h.send(with("cache-control", "no-store")).await;
    assert_eq!(label(&reply), "bypass");
    assert_eq!(label(&h.chat(CHAT).await), "miss", "no-store wrote nothing");
    assert_eq!(label(&h.chat(CHAT).await), "hit");
    assert_eq!(label(&h.send(with("cache-control", "no-store")).await), "bypass", "and reads nothing");
    // no-cache: skips the lookup, refreshes the entry.
    let refreshed = h.send(with("cache-control", "no-cache")).await;
    assert_eq!(label(&refreshed), "bypass");
    let after = h.chat(CHAT).await;
    assert_eq!((label(&after), &after.body), ("hit", &refreshed.body), "the refreshed answer is the one served");
    assert_eq!(chats(&h), 4, "no-store, the first miss, no-store again, no-cache");
    // A client's TTL: entries older than it are not served to it.
    advance_clock(Duration::from_secs(5)).await;
    assert_eq!(label(&h.send(with("x-sluice-cache-ttl", "2")).await), "miss");
    assert_eq!(label(&h.send(with("x-sluice-cache-ttl", "2")).await), "hit");
    let bad = h.send(with("x-sluice-cache-ttl", "soon")).await;
    assert_eq!(
        (bad.status, bad.json()["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("x-sluice-cache-ttl"))
    );
}

#[tokio::test]
async fn headers_that_may_shape_the_answer_are_part_of_its_key() {
    let h = cached(Transport::H1Sluice, "scope = \"global\"\nkey_headers = [\"X-Model-Revision\"]").await;
    let with = |pairs: &[(&'static str, &'static str)]| {
        let mut request = h.post("/v1/chat/completions");
        for (name, value) in pairs {
            request = request.header(*name, *value);
        }
        request.body(Full::new(Bytes::from(CHAT))).unwrap()
    };
    // A beta feature's answer, asked again and again (hits that would
    // leave a shortcut by the bytes sent)...
    for expected in ["miss", "hit", "hit", "hit"] {
        assert_eq!(label(&h.send(with(&[("openai-beta", "feature=v1")])).await), expected);
    }
    // ...is not the answer to the same body without it, nor with another value.
    assert_eq!(label(&h.send(with(&[])).await), "miss");
    assert_eq!(label(&h.send(with(&[("openai-beta", "feature=v2")])).await), "miss");
    assert_eq!(label(&h.send(with(&[("openai-beta", "feature=v1")])).await), "hit");
    // What SDKs and proxies add, with new values each request, keys nothing.
    for i in ["1", "2"] {
        let added = [("x-stainless-retry-count", i), ("x-amzn-trace-id", i), ("idempotency-key", i)];
        assert_eq!(label(&h.send(with(&added)).await), "hit");
    }
    assert_eq!(chats(&h), 3);
    // A header the operator lists keys answers too.
    for (revision, expected) in [("a", "miss"), ("a", "hit"), ("b", "miss")] {
        assert_eq!(label(&h.send(with(&[("x-model-revision", revision)])).await), expected, "{revision}");
    }
    assert_eq!(chats(&h), 5);
}

#[tokio::test]
async fn a_clients_short_ttl_does_not_shorten_what_the_others_are_served() {
    let h = cached(Transport::H1Sluice, "").await;
    let with_ttl = |secs: &'static str| {
        h.post("/v1/chat/completions").header("x-sluice-cache-ttl", secs).body(Full::new(Bytes::from(CHAT))).unwrap()
    };
    // A TTL of 0 where nothing is stored: that answer could never be
    // served, so it is not kept.
    assert_eq!(label(&h.send(with_ttl("0")).await), "miss");
    assert_eq!(label(&h.chat(CHAT).await), "miss", "nothing was kept under a TTL of 0");
    advance_clock(Duration::from_secs(5)).await;
    // A client that takes nothing older than 2 s goes upstream; its answer
    // replaces the entry, but lives as long as the one it replaced had left.
    assert_eq!(label(&h.send(with_ttl("2")).await), "miss");
    advance_clock(Duration::from_secs(3)).await;
    assert_eq!(label(&h.chat(CHAT).await), "hit", "past the client's 2 s, still served to the others");
    // A TTL of 0 over the entry: a miss for that client, the entry stays.
    assert_eq!(label(&h.send(with_ttl("0")).await), "miss");
    assert_eq!(label(&h.chat(CHAT).await), "hit");
    assert_eq!(chats(&h), 4);
}

#[tokio::test]
async fn a_reload_that_lowers_the_ttl_holds_for_entries_stored_before() {
    let dir = tempfile::tempdir().unwrap();
    let mock = start_mock(Transport::H1Sluice).await;
    let opts = Opts { tables: "[cache]\nenabled = true\nttl = \"1h\"\n".into(), ..Opts::default() };
    let text = config_text(&mock.base_url(), &opts);
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, &text).unwrap();
    let config = sluice::config::Config::load(&path).unwrap();
    let gateway = sluice::server::spawn(sluice::state::Shared::new(config).unwrap()).await.unwrap();
    let h = Harness { mock, gateway, h1: h1_client(), h2: h2_client() };
    for expected in ["miss", "hit", "hit"] {
        assert_eq!(label(&h.chat(CHAT).await), expected);
    }
    std::fs::write(&path, text.replace("ttl = \"1h\"", "ttl = \"2s\"")).unwrap();
    assert_eq!(h.admin("/admin/reload").await.status, StatusCode::OK);
    assert_eq!(label(&h.chat(CHAT).await), "hit", "fresh: within the new TTL");
    advance_clock(Duration::from_secs(3)).await;
    assert_eq!(label(&h.chat(CHAT).await), "miss", "stored under 1 h, but older than the 2 s now set");
    assert_eq!(label(&h.chat(CHAT).await), "hit");
    assert_eq!(chats(&h), 2);
}

#[tokio::test]
async fn entries_expire_on_the_clock() {
    let h = cached(Transport::H1Sluice, "ttl = \"60s\"").await;
    // A connection of its own each time: moving the clock past the idle
    // timeouts closes pooled ones.
    let chat = || async {
        let request = h.post("/v1/chat/completions").body(Full::new(Bytes::from(CHAT))).unwrap();
        send(&h1_client(), request).await
    };
    assert_eq!(label(&chat().await), "miss");
    advance_clock(Duration::from_secs(59)).await;
    assert_eq!(label(&chat().await), "hit");
    advance_clock(Duration::from_secs(2)).await;
    assert_eq!(label(&chat().await), "miss", "past its TTL");
    assert_eq!(chats(&h), 2);
}

#[tokio::test]
async fn the_byte_bound_holds_and_big_answers_stay_out() {
    let h = cached(Transport::H1Sluice, "max_bytes = \"32KiB\"\nmax_entry = \"2KiB\"").await;
    for i in 0..200 {
        let reply = h.chat(&CHAT.replace("hi", &format!("hi {i}"))).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(h.gateway.shared.cache.bytes() <= 32 << 10, "{} bytes held", h.gateway.shared.cache.bytes());
    }
    let stats = h
        .send(Request::get(h.url("/stats")).header("x-api-key", CLIENT_KEY).body(Full::new(Bytes::new())).unwrap())
        .await
        .json();
    let cache = &stats["cache"];
    assert!(cache["evictions"].as_u64().unwrap() > 0 && cache["stores"] == 200, "{cache}");
    // An answer over max_entry is passed on, never stored.
    let long =
        || h.post("/v1/chat/completions").header("x-mock-chunks", "200").body(Full::new(Bytes::from(STREAM))).unwrap();
    assert!(h.send(long()).await.body.len() > 2048);
    assert_eq!(label(&h.send(long()).await), "miss");
}

#[tokio::test]
async fn key_scope_keeps_two_keys_apart() {
    let clients = "[[clients]]\nname = \"a\"\nkey = \"sk-a\"\n[[clients]]\nname = \"b\"\nkey = \"sk-b\"\n";
    let tables = format!("[cache]\nenabled = true\nscope = \"key\"\n{clients}");
    let h = Harness::start_with(Opts { tables, ..Opts::default() }).await;
    let as_key = |key: &str| {
        Request::post(h.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from(CHAT)))
            .unwrap()
    };
    assert_eq!(label(&h.send(as_key("sk-a")).await), "miss");
    assert_eq!(label(&h.send(as_key("sk-b")).await), "miss", "b never sees a's entry");
    assert_eq!(label(&h.send(as_key("sk-a")).await), "hit");
    assert_eq!(label(&h.send(as_key("sk-b")).await), "hit");
    assert_eq!(chats(&h), 2);
}

#[tokio::test]
async fn models_opt_out_purges_and_metrics() {
    let h = cached(Transport::H1Sluice, "").await;
    // `mini` is cached; then purged by an alias of its name.
    let mini = r#"{"model":"mini","messages":[]}"#;
    assert_eq!(label(&h.chat(mini).await), "miss");
    assert_eq!(label(&h.chat(mini).await), "hit");
    let purge = |body: &'static str| {
        Request::post(h.url("/admin/cache/purge"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let purged = h.send(purge(r#"{"model":"mini"}"#)).await;
    assert_eq!(purged.json()["purged"], 1, "{:?}", purged.body);
    assert_eq!(label(&h.chat(mini).await), "miss");
    assert_eq!(h.send(purge("")).await.json()["purged"], 1);
    let scrape = scrape_at(h.gateway.addr).await;
    assert_eq!(sample(&scrape, "sluice_cache_hits_total", &[]), 1.0);
    assert_eq!(sample(&scrape, "sluice_cache_misses_total", &[]), 2.0);
    assert_eq!(sample(&scrape, "sluice_cache_stores_total", &[]), 2.0);
    assert_eq!(sample(&scrape, "sluice_cache_bytes", &[]), 0.0);
    // Without a key the purge does not exist for this caller.
    let open = h.send(Request::post(h.url("/admin/cache/purge")).body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(open.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_model_can_opt_out() {
    let mock = start_mock(Transport::H1Sluice).await;
    let opts = Opts { tables: "[cache]\nenabled = true\n".into(), ..Opts::default() };
    let text = config_text(&mock.base_url(), &opts)
        .replace("name = \"plain\"\nupstream = \"mock\"\n", "name = \"plain\"\nupstream = \"mock\"\ncache = false\n");
    assert!(text.contains("cache = false"));
    let config = sluice::config::Config::from_toml(&text, std::path::Path::new("t.toml"), &|_| None).unwrap();
    let gateway = sluice::server::spawn(sluice::state::Shared::new(config).unwrap()).await.unwrap();
    let h = Harness { mock, gateway, h1: h1_client(), h2: h2_client() };
    assert_eq!(label(&h.chat(CHAT).await), "none", "no cache header for a model that opted out");
    h.chat(CHAT).await;
    assert_eq!(chats(&h), 2);
    assert_eq!(label(&h.chat(r#"{"model":"mini","messages":[]}"#).await), "miss", "other models still cache");
}

#[tokio::test]
async fn a_hit_is_a_request_of_its_key_with_cached_tokens() {
    use crate::tenancy::Tenancy;
    let tenancy = Tenancy::start(Transport::H1Sluice, "[cache]\nenabled = true\n").await;
    let (id, key) = tenancy.key(serde_json::json!({ "rpm": 3 })).await;
    let body = serde_json::json!({ "model": "plain", "messages": [{ "role": "user", "content": "hi" }] });
    let labels: Vec<String> = {
        let mut labels = Vec::new();
        for _ in 0..3 {
            labels.push(label(&tenancy.chat_as(&key, body.clone()).await).to_string());
        }
        labels
    };
    assert_eq!(labels, ["miss", "hit", "hit"]);
    let limited = tenancy.chat_as(&key, body.clone()).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS, "hits count against the key's rpm");
    let usage = tenancy.usage(id).await;
    assert_eq!(usage["requests"], 3, "the refused fourth reached nothing and is not usage: {usage}");
    let (prompt, completion, cached) = (
        usage["prompt_tokens"].as_i64().unwrap(),
        usage["completion_tokens"].as_i64().unwrap(),
        usage["cached_tokens"].as_i64().unwrap(),
    );
    assert!(prompt > 0 && completion > 0, "{usage}");
    assert_eq!(cached, 2 * (prompt + completion), "two hits, each the first answer's tokens, as cached: {usage}");
    assert_eq!(tenancy.h.stats().path("/v1/chat/completions"), 1);
}
