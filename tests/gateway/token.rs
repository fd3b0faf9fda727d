//! `kind = "token"` upstreams and per-upstream extra headers.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use sluice::mock::{Faults, KeyFault};

use crate::support::{Harness, Opts, send};

fn login_auth(mock: std::net::SocketAddr) -> String {
    format!("kind = \"token\"\nauth_url = \"http://{mock}/auth/login\"\nusername = \"bot\"\npassword = \"hunter2\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_login_serves_fifty_concurrent_requests() {
    let h = Harness::start_with(Opts { upstream_auth: Some(login_auth), ..Opts::default() }).await;
    // Slow answers (the login too) so all 50 requests wait on the same login.
    h.mock.state.set_faults(Faults { latency_ms: 100, ..Faults::default() });
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let request =
            h.post("/v1/chat/completions").body(Full::new(Bytes::from_static(br#"{"model":"plain"}"#))).unwrap();
        let client = h.h1.clone();
        set.spawn(async move { send(&client, request).await.status });
    }
    while let Some(status) = set.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    let stats = h.stats();
    assert_eq!(stats.by_path.get("/auth/login"), Some(&1), "single-flight login");
    assert_eq!(stats.key("tok-1"), 50);
}

#[tokio::test]
async fn a_401_refreshes_the_token_once_and_the_request_succeeds() {
    let h = Harness::start_with(Opts { upstream_auth: Some(login_auth), ..Opts::default() }).await;
    let faults = [("tok-1".to_string(), KeyFault { status: 401, retry_after: None, code: None })].into_iter().collect();
    h.mock.state.set_faults(Faults { keys: faults, ..Faults::default() });
    let reply = h.chat(r#"{"model":"plain"}"#).await;
    assert_eq!(reply.status, StatusCode::OK);
    let stats = h.stats();
    assert_eq!(stats.by_path.get("/auth/login"), Some(&2));
    assert_eq!((stats.key("tok-1"), stats.key("tok-2")), (1, 1));
    // The fresh token is cached: no more logins.
    assert_eq!(h.chats(5, r#"{"model":"plain"}"#).await, [200; 5]);
    assert_eq!(h.stats().by_path.get("/auth/login"), Some(&2));
    assert!(!h.health().await.to_string().contains("hunter2"), "no password in /health");
}

#[tokio::test]
async fn fixed_token_is_sent_as_bearer() {
    let h = Harness::start_with(Opts {
        upstream_auth: Some(|_| "kind = \"token\"\ntoken = \"tok-fixed\"".to_string()),
        ..Opts::default()
    })
    .await;
    assert_eq!(h.chats(3, r#"{"model":"plain"}"#).await, [200; 3]);
    assert_eq!(h.stats().key("tok-fixed"), 3);
}

#[tokio::test]
async fn extra_headers_carry_a_fresh_uuid_per_request() {
    let extra = "headers = { Referer = \"https://chat.example/c/{uuid}\", X-Client = \"sluice\" }";
    let h = Harness::start_with(Opts { upstream_extra: extra, ..Opts::default() }).await;
    let first = h.echo_chat(r#"{"model":"plain"}"#).await;
    let second = h.echo_chat(r#"{"model":"plain"}"#).await;
    assert_eq!(first["headers"]["x-client"], "sluice");
    let referer = first["headers"]["referer"].as_str().unwrap();
    assert!(referer.starts_with("https://chat.example/c/") && referer.len() == 23 + 36, "{referer}");
    assert_ne!(first["headers"]["referer"], second["headers"]["referer"]);
}
