//! Hot reload: in process through the admin API, and the real binary under load
//! with SIGHUP.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use sluice::config::Config;
use sluice::mock::MockServer;
use sluice::server;
use sluice::state::Shared;

use crate::support::{ADMIN_TOKEN, CLIENT_KEY, Harness, Opts, config_text_with_auth, h1_client, send};

const KEYS_FILE_AUTH: &str = "keys_file = \"keys.txt\"";

/// A harness whose upstream keys come from `dir/keys.txt`, loaded from `dir/sluice.toml`.
async fn harness_from_files(dir: &Path, keys: &str) -> Harness {
    let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    std::fs::write(dir.join("keys.txt"), keys).unwrap();
    let path = dir.join("sluice.toml");
    std::fs::write(&path, config_text_with_auth(&mock.base_url(), &Opts::default(), KEYS_FILE_AUTH)).unwrap();
    let gateway = server::spawn(Shared::new(Config::load(&path).unwrap()).unwrap()).await.unwrap();
    Harness { mock, gateway, h1: h1_client(), h2: crate::support::h2_client() }
}

#[tokio::test]
async fn admin_reload_swaps_keys_and_keeps_state_of_kept_keys() {
    let dir = tempfile::tempdir().unwrap();
    let h = harness_from_files(dir.path(), "sk-a\nsk-b\n").await;
    assert_eq!(h.chats(4, r#"{"model":"plain"}"#).await, [200; 4]);
    assert_eq!((h.stats().key("sk-a"), h.stats().key("sk-b")), (2, 2));

    std::fs::write(dir.path().join("keys.txt"), "# rotated\nsk-b\nsk-c\n").unwrap();
    let reply = h.admin("/admin/reload-keys").await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!((reply.json()["added"].as_u64(), reply.json()["removed"].as_u64()), (Some(1), Some(1)));

    h.mock.state.reset();
    assert_eq!(h.chats(6, r#"{"model":"plain"}"#).await, [200; 6]);
    let stats = h.stats();
    assert_eq!(stats.key("sk-a"), 0, "a removed key gets nothing after the swap");
    assert_eq!((stats.key("sk-b"), stats.key("sk-c")), (3, 3));
    let health = h.health().await;
    let kept = health["upstreams"][0]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == sluice::config::keys::fingerprint("sk-b").as_str())
        .unwrap()
        .clone();
    assert_eq!(kept["requests"], 5, "sk-b kept its counters across the reload");

    // A broken keys file changes nothing.
    std::fs::write(dir.path().join("keys.txt"), "# nothing left\n").unwrap();
    let refused = h.admin("/admin/reload").await;
    assert_eq!((refused.status, refused.error_code().as_str()), (StatusCode::BAD_REQUEST, "reload_failed"));
    assert!(String::from_utf8_lossy(&refused.body).contains("keys"));
    h.mock.state.reset();
    assert_eq!(h.chats(2, r#"{"model":"plain"}"#).await, [200; 2]);
    assert_eq!(h.stats().key("sk-b") + h.stats().key("sk-c"), 2);
}

#[tokio::test]
async fn reload_brings_back_a_disabled_key_only_if_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let h = harness_from_files(dir.path(), "sk-a\nsk-b\n").await;
    let faults = [(
        "sk-a".to_string(),
        sluice::mock::KeyFault { status: 403, retry_after: None, code: Some("invalid_api_key".into()) },
    )]
    .into_iter()
    .collect();
    h.mock.state.set_faults(sluice::mock::Faults { keys: faults, ..Default::default() });
    h.chats(3, r#"{"model":"plain"}"#).await;
    assert_eq!(h.key_state("sk-a").await, "disabled");
    // Same keys: health is kept.
    assert_eq!(h.admin("/admin/reload").await.status, StatusCode::OK);
    assert_eq!(h.key_state("sk-a").await, "disabled");
}

#[tokio::test]
async fn admin_api_needs_the_token_and_is_absent_without_one() {
    let h = Harness::start().await;
    let call = |token: Option<&str>| {
        let mut request = Request::post(h.url("/admin/reset-failed-keys"));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        request.body(Full::new(Bytes::new())).unwrap()
    };
    assert_eq!(h.send(call(None)).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        h.send(call(Some(CLIENT_KEY))).await.status,
        StatusCode::UNAUTHORIZED,
        "a client key is not an admin token"
    );
    assert_eq!(h.send(call(Some(ADMIN_TOKEN))).await.status, StatusCode::OK);
    let get = Request::get(h.url("/admin/reload"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h.send(get).await.status, StatusCode::METHOD_NOT_ALLOWED);

    // Without [admin] token the admin API does not exist.
    let dir = tempfile::tempdir().unwrap();
    let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let text = crate::support::config_text(&mock.base_url(), &Opts::default())
        .replace(&format!("[admin]\ntoken = \"{ADMIN_TOKEN}\""), "");
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    let gateway = server::spawn(Shared::new(Config::load(&path).unwrap()).unwrap()).await.unwrap();
    let reply = send(
        &h1_client(),
        Request::post(format!("http://{}/admin/reload", gateway.addr))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

/// The real binary, 20 clients in a loop, SIGHUP with a changed keys file mid-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_under_load_drops_nothing() {
    let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.txt"), "sk-old-1\nsk-old-2\n").unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, config_text_with_auth(&mock.base_url(), &Opts::default(), KEYS_FILE_AUTH)).unwrap();
    let (mut child, addr) = crate::binary::start_binary(&path).await;
    let client = h1_client();

    // A stream opened before the reload must finish after it.
    let stream = client
        .request(
            Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("authorization", format!("Bearer {CLIENT_KEY}"))
                .header("x-mock-chunks", "20")
                .header("x-mock-gap-ms", "50")
                .body(Full::new(Bytes::from_static(br#"{"model":"plain","stream":true}"#)))
                .unwrap(),
        )
        .await
        .unwrap();

    let reloaded = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (failures, old_after, new_after) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (client, reloaded, stop) = (client.clone(), Arc::clone(&reloaded), Arc::clone(&stop));
        let (failures, old_after, new_after) = (Arc::clone(&failures), Arc::clone(&old_after), Arc::clone(&new_after));
        workers.spawn(async move {
            let mut sent = 0;
            // Bounded: at most 2000 requests per worker, and `stop` ends it sooner.
            while !stop.load(Ordering::SeqCst) && sent < 2000 {
                sent += 1;
                let after_reload = reloaded.load(Ordering::SeqCst);
                let request = Request::post(format!("http://{addr}/v1/chat/completions"))
                    .header("authorization", format!("Bearer {CLIENT_KEY}"))
                    .header("x-mock-echo", "1")
                    .body(Full::new(Bytes::from_static(br#"{"model":"plain"}"#)))
                    .unwrap();
                let reply = send(&client, request).await;
                if reply.status != StatusCode::OK {
                    failures.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let key = reply.json()["headers"]["authorization"].as_str().unwrap_or_default().to_string();
                if after_reload {
                    if key.contains("sk-old-1") {
                        old_after.fetch_add(1, Ordering::SeqCst);
                    }
                    if key.contains("sk-new") {
                        new_after.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
    }

    let health_keys = |addr: SocketAddr| async move {
        let request = Request::get(format!("http://{addr}/health"))
            .header("authorization", format!("Bearer {}", crate::support::ADMIN_TOKEN))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let health = send(&h1_client(), request).await.json();
        health["upstreams"][0]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["key"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // Traffic flows before the reload.
    crate::support::eventually("traffic before the reload", || mock.state.stats().requests >= 50).await;
    std::fs::write(dir.path().join("keys.txt"), "sk-old-2\nsk-new\n").unwrap();
    crate::binary::signal(&child, "-HUP");
    let new_fingerprint = sluice::config::keys::fingerprint("sk-new");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !health_keys(addr).await.contains(&new_fingerprint) {
        assert!(tokio::time::Instant::now() < deadline, "SIGHUP reload never took effect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reloaded.store(true, Ordering::SeqCst);
    // Traffic flows after it, on the new key.
    let after = Arc::clone(&new_after);
    crate::support::eventually("traffic on the new key", || after.load(Ordering::SeqCst) >= 20).await;

    // A broken keys file: SIGHUP changes nothing, and says so in the metrics.
    std::fs::write(dir.path().join("keys.txt"), "").unwrap();
    crate::binary::signal(&child, "-HUP");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let scrape = crate::support::scrape_at(addr).await;
        if crate::support::sample(&scrape, "sluice_reloads_total", &[("result", "error")]) == 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the broken reload was never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    while let Some(result) = workers.join_next().await {
        result.unwrap();
    }
    let keys = health_keys(addr).await;
    assert!(keys.contains(&new_fingerprint) && keys.len() == 2, "the broken file must not replace the keys: {keys:?}");

    let text = String::from_utf8_lossy(
        &tokio::time::timeout(Duration::from_secs(10), stream.into_body().collect())
            .await
            .unwrap()
            .expect("stream cut by the reload")
            .to_bytes(),
    )
    .to_string();
    assert!(text.trim_end().ends_with("data: [DONE]"), "the open stream must complete: {text}");

    assert_eq!(failures.load(Ordering::SeqCst), 0, "requests failed during the reload");
    assert_eq!(old_after.load(Ordering::SeqCst), 0, "a removed key got traffic after the swap");
    assert!(new_after.load(Ordering::SeqCst) > 0, "the new key got no traffic");
    crate::binary::signal(&child, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}
