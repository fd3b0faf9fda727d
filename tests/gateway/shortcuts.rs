//! The cache's shortcuts: a hot request is answered by the bytes its client
//! sent, without planning it, and only where planning it again would lead to
//! the same entry: under the same routing table, for a key granted the
//! model, for a client whose plan is the same, on a route with one target.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::{
    ADMIN_TOKEN, CLIENT_KEY, Harness, Opts, Reply, config_text, h1_client, h2_client, sample, scrape_at,
};

const CHAT: &str = r#"{"model":"plain","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str = r#"{"model":"plain","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn label(reply: &Reply) -> &str {
    reply.headers.get("x-sluice-cache").map_or("none", |v| v.to_str().unwrap())
}

fn chats(h: &Harness) -> u64 {
    h.stats().path("/v1/chat/completions")
}

/// `/stats`' cache block.
async fn cache_stats(h: &Harness) -> serde_json::Value {
    let stats = Request::get(h.url("/stats")).header("x-api-key", CLIENT_KEY).body(Full::new(Bytes::new())).unwrap();
    h.send(stats).await.json()["cache"].clone()
}

fn as_key(h: &Harness, key: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(h.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// A gateway with the cache on, serving on two event loops (where hot
/// answers are kept; a connection stays on one loop).
async fn cached(tables: &str) -> Harness {
    Harness::start_with(Opts {
        tables: format!("[cache]\nenabled = true\n{tables}"),
        server_extra: "event_loops = 2",
        ..Opts::default()
    })
    .await
}

#[tokio::test]
async fn a_hot_request_is_answered_by_its_bytes_as_the_planned_way_answers_it() {
    let h = cached("").await;
    let replies = [h.chat(CHAT).await, h.chat(CHAT).await, h.chat(CHAT).await];
    assert_eq!(replies.each_ref().map(label), ["miss", "hit", "hit"]);
    assert!(replies.iter().all(|r| r.status == StatusCode::OK && r.body == replies[0].body));
    assert_eq!(replies[1].headers.keys().collect::<Vec<_>>().len(), replies[2].headers.keys().count());
    let cache = cache_stats(&h).await;
    assert_eq!((cache["hits"].as_u64(), cache["shortcut_hits"].as_u64()), (Some(2), Some(1)), "{cache}");
    assert_eq!(cache["shortcuts"], 1, "remembered by the first hit, not by the store: {cache}");
    assert_eq!(chats(&h), 1);
    // Counted as the routed model's, like any hit.
    let scrape = scrape_at(h.gateway.addr).await;
    assert_eq!(sample(&scrape, "sluice_requests_total", &[("model", "plain"), ("status", "200")]), 3.0);
    assert_eq!(sample(&scrape, "sluice_cache_shortcut_hits_total", &[]), 1.0);
    // A purge leaves no shortcut to an entry that is gone.
    let purge = Request::post(h.url("/admin/cache/purge"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h.send(purge).await.status, StatusCode::OK);
    assert_eq!(cache_stats(&h).await["shortcuts"], 0);
    assert_eq!(label(&h.chat(CHAT).await), "miss");
    assert_eq!(chats(&h), 2);
}

#[tokio::test]
async fn a_reload_that_changes_the_plan_is_not_answered_by_the_old_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mock = crate::support::start_mock(crate::support::Transport::H1Sluice).await;
    let opts = Opts { tables: "[cache]\nenabled = true\n".into(), ..Opts::default() };
    let text = config_text(&mock.base_url(), &opts);
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, &text).unwrap();
    let config = sluice::config::Config::load(&path).unwrap();
    let gateway = sluice::server::spawn(sluice::state::Shared::new(config).unwrap()).await.unwrap();
    let h = Harness { mock, gateway, h1: h1_client(), h2: h2_client() };
    for expected in ["miss", "hit", "hit"] {
        assert_eq!(label(&h.chat(CHAT).await), expected);
    }
    assert_eq!(cache_stats(&h).await["shortcut_hits"], 1);
    // `plain` is now sent upstream under another name: the same request
    // plans to another body, so the entry of the old one must not answer it.
    let renamed = text.replace(
        "name = \"plain\"\nupstream = \"mock\"\n",
        "name = \"plain\"\nupstream = \"mock\"\nupstream_model = \"plain-2\"\n",
    );
    assert_ne!(renamed, text);
    std::fs::write(&path, renamed).unwrap();
    assert_eq!(h.admin("/admin/reload").await.status, StatusCode::OK);
    assert_eq!(cache_stats(&h).await["shortcuts"], 0, "the old table's shortcuts are gone");
    let after = h.chat(CHAT).await;
    assert_eq!((after.status, label(&after)), (StatusCode::OK, "miss"));
    assert_eq!(chats(&h), 2);
    assert_eq!(after.headers["x-sluice-model"], "plain-2");
    for expected in ["hit", "hit"] {
        assert_eq!(label(&h.chat(CHAT).await), expected);
    }
    assert_eq!(cache_stats(&h).await["shortcut_hits"], 2, "the new plan's shortcut");
    assert_eq!(chats(&h), 2);
}

#[tokio::test]
async fn a_key_not_granted_the_model_is_refused_however_hot_the_request() {
    let h = cached("[[clients]]\nname = \"minis\"\nkey = \"sk-minis\"\nmodels = [\"mini\"]\n").await;
    // Hot enough for a copy of the answer, and served from it.
    for expected in ["miss", "hit", "hit", "hit", "hit"] {
        assert_eq!(label(&h.chat(CHAT).await), expected);
    }
    let cache = cache_stats(&h).await;
    assert_eq!((cache["shortcut_hits"].as_u64(), cache["hot_hits"].as_u64()), (Some(3), Some(2)), "{cache}");
    // The global scope shares the entry, not the grant.
    let refused = h.send(as_key(&h, "sk-minis", CHAT)).await;
    assert_eq!((refused.status, refused.error_code().as_str()), (StatusCode::FORBIDDEN, "model_not_allowed"));
    let granted = r#"{"model":"mini","messages":[{"role":"user","content":"hi"}]}"#;
    for expected in ["miss", "hit", "hit"] {
        assert_eq!(label(&h.send(as_key(&h, "sk-minis", granted)).await), expected);
    }
    assert_eq!(cache_stats(&h).await["shortcut_hits"], 4);
}

#[tokio::test]
async fn a_key_with_a_token_budget_does_not_take_an_unmetered_streams_shortcut() {
    let h = cached("[[clients]]\nname = \"budget\"\nkey = \"sk-budget\"\ntokens_per_day = 100000\n").await;
    for expected in ["miss", "hit", "hit"] {
        assert_eq!(label(&h.send(as_key(&h, CLIENT_KEY, STREAM)).await), expected);
    }
    assert_eq!(cache_stats(&h).await["shortcut_hits"], 1);
    // The budget's stream asks for its usage: another body, another entry,
    // whose answer carries the usage the budget counts.
    let metered = h.send(as_key(&h, "sk-budget", STREAM)).await;
    assert_eq!((metered.status, label(&metered)), (StatusCode::OK, "miss"));
    assert!(String::from_utf8_lossy(&metered.body).contains("\"usage\""), "{:?}", metered.body);
    assert_eq!(chats(&h), 2);
    assert_eq!(label(&h.send(as_key(&h, "sk-budget", STREAM)).await), "hit");
    assert_eq!(label(&h.send(as_key(&h, "sk-budget", STREAM)).await), "hit");
    assert_eq!(cache_stats(&h).await["shortcut_hits"], 2);
}

#[tokio::test]
async fn a_route_that_takes_turns_between_targets_keeps_no_shortcut() {
    let mock = crate::support::start_mock(crate::support::Transport::H1Sluice).await;
    // A second upstream on the same mock, each target with its own model name.
    let spread = format!(
        "[cache]\nenabled = true\n[[upstreams]]\nname = \"other\"\nbase_url = \"{}\"\nkeys = [\"sk-up-9\"]\n\
         [[models]]\nname = \"spread\"\ntargets = [{{ upstream = \"mock\", upstream_model = \"m-a\" }}, \
         {{ upstream = \"other\", upstream_model = \"m-b\" }}]\n",
        mock.base_url()
    );
    let text = config_text(&mock.base_url(), &Opts { tables: spread, ..Opts::default() });
    let config = sluice::config::Config::from_toml(&text, std::path::Path::new("t.toml"), &|_| None).unwrap();
    let gateway = sluice::server::spawn(sluice::state::Shared::new(config).unwrap()).await.unwrap();
    let h = Harness { mock, gateway, h1: h1_client(), h2: h2_client() };
    let body = r#"{"model":"spread","messages":[{"role":"user","content":"hi"}]}"#;
    let mut labels = Vec::new();
    for _ in 0..6 {
        let reply = h.chat(body).await;
        assert_eq!(reply.status, StatusCode::OK);
        labels.push(label(&reply).to_string());
    }
    // Each turn's target gets its own body (the model renamed for it), so
    // its own entry: a shortcut would hold every later request to one of them.
    assert_eq!(labels, ["miss", "miss", "hit", "hit", "hit", "hit"]);
    let cache = cache_stats(&h).await;
    assert_eq!((cache["shortcuts"].as_u64(), cache["shortcut_hits"].as_u64()), (Some(0), Some(0)), "{cache}");
    assert_eq!(chats(&h), 2);
}

#[tokio::test]
async fn a_shortcut_stays_within_its_scope() {
    let h = cached(
        "scope = \"key\"\n[[clients]]\nname = \"a\"\nkey = \"sk-a\"\n[[clients]]\nname = \"b\"\nkey = \"sk-b\"\n",
    )
    .await;
    for expected in ["miss", "hit", "hit", "hit", "hit"] {
        assert_eq!(label(&h.send(as_key(&h, "sk-a", CHAT)).await), expected);
    }
    let cache = cache_stats(&h).await;
    assert_eq!((cache["shortcut_hits"].as_u64(), cache["hot_hits"].as_u64()), (Some(3), Some(2)), "{cache}");
    assert_eq!(label(&h.send(as_key(&h, "sk-b", CHAT)).await), "miss", "b never reaches a's entry");
    assert_eq!(chats(&h), 2);
}

#[tokio::test]
async fn a_hot_answer_is_served_only_while_the_store_holds_what_it_copied() {
    let h = cached("").await;
    let first = h.chat(CHAT).await;
    // The first hit remembers a shortcut, the second copies the answer for
    // the loop it runs on, the rest are served from that copy.
    for _ in 0..4 {
        let reply = h.chat(CHAT).await;
        assert_eq!((label(&reply), &reply.body), ("hit", &first.body));
    }
    let cache = cache_stats(&h).await;
    assert_eq!((cache["hot_answers"].as_u64(), cache["hot_hits"].as_u64()), (Some(1), Some(2)), "{cache}");
    assert_eq!((cache["hits"].as_u64(), cache["shortcut_hits"].as_u64()), (Some(4), Some(3)), "{cache}");
    let scrape = scrape_at(h.gateway.addr).await;
    assert_eq!(sample(&scrape, "sluice_cache_hits_total", &[]), 4.0);
    assert_eq!(sample(&scrape, "sluice_cache_hot_answers", &[]), 1.0);
    // A refresh stores another answer (the mock numbers its ids): the copy
    // of the one it replaced is not served again.
    let refresh = h.post("/v1/chat/completions").header("cache-control", "no-cache").body(Full::new(Bytes::from(CHAT)));
    let refreshed = h.send(refresh.unwrap()).await;
    assert_eq!(label(&refreshed), "bypass");
    assert_ne!(refreshed.body, first.body);
    for _ in 0..3 {
        let reply = h.chat(CHAT).await;
        assert_eq!((label(&reply), &reply.body), ("hit", &refreshed.body));
    }
    assert_eq!(chats(&h), 2);
    // (A copy's age and TTL against the clock: hot.rs's unit tests. The
    // event loops run runtimes of their own, whose clocks a test's paused
    // clock does not move.)
}

#[tokio::test]
async fn a_purge_takes_the_hot_answers_with_the_entries() {
    let h = cached("").await;
    for expected in ["miss", "hit", "hit", "hit"] {
        assert_eq!(label(&h.chat(CHAT).await), expected);
    }
    assert_eq!(cache_stats(&h).await["hot_answers"], 1);
    let purge = Request::post(h.url("/admin/cache/purge"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h.send(purge).await.status, StatusCode::OK);
    let cache = cache_stats(&h).await;
    assert_eq!((cache["hot_answers"].as_u64(), cache["bytes"].as_u64()), (Some(0), Some(0)), "{cache}");
    assert_eq!(label(&h.chat(CHAT).await), "miss");
    assert_eq!(chats(&h), 2);
}
