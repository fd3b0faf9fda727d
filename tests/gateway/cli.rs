//! `sluice test`, `sluice chat`, `sluice models` (the real binary against the
//! mock) and `POST /v1/models/{name}/test`.

use std::process::Command;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sluice::mock::MockServer;

use crate::support::{ADMIN_TOKEN, Harness, Opts, config_text};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// An extra upstream nobody listens on, and a model routed to it.
const DEAD_UPSTREAM: &str = "[[upstreams]]\nname = \"dead\"\nbase_url = \"http://127.0.0.1:1/v1\"\nkeys = [\"sk-dead\"]\nmax_attempts = 1\n\n[[models]]\nname = \"broken\"\nupstream = \"dead\"\n";

async fn config_file(dir: &std::path::Path, mock: &MockServer) -> std::path::PathBuf {
    let path = dir.join("sluice.toml");
    let opts = Opts { tables: DEAD_UPSTREAM.into(), ..Opts::default() };
    std::fs::write(&path, config_text(&mock.base_url(), &opts)).unwrap();
    path
}

#[tokio::test]
async fn test_command_reports_each_model_and_fails_if_one_does() {
    let mock = MockServer::start(([127, 0, 0, 1], 0).into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &mock).await;
    let all = tokio::process::Command::new(BIN).args(["test", "-c"]).arg(&config).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&all.stdout);
    assert!(!all.status.success(), "a failed model must fail the command: {stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("ok") && l.contains("gpt-4o-mini")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("ok") && l.contains("plain")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("FAIL") && l.contains("broken") && l.contains("502")), "{stdout}");
    let probes = mock.state.stats();
    assert_eq!(probes.by_path.get("/v1/chat/completions"), Some(&2), "one chat per working model");

    let one = tokio::process::Command::new(BIN).args(["test", "-c"]).arg(&config).arg("plain").output().await.unwrap();
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stdout));
}

#[tokio::test]
async fn chat_command_streams_the_answer() {
    let mock = MockServer::start(([127, 0, 0, 1], 0).into()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &mock).await;
    let out = tokio::process::Command::new(BIN)
        .args(["chat", "-c"])
        .arg(&config)
        .args(["-m", "mini", "hello"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tok0 tok1 tok2 tok3 tok4 \n");
    assert_eq!(mock.state.stats().streams_finished, 1);
}

#[test]
fn models_command_prints_the_routes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    let tables = "[[upstreams]]\nname = \"other\"\nbase_url = \"http://127.0.0.1:9/v1\"\nkeys = [\"sk-o\"]\n\n[[models]]\nname = \"multi\"\ntargets = [{ upstream = \"mock\", upstream_model = \"m-a\", weight = 3 }, { upstream = \"other\", upstream_model = \"m-b\", priority = 2 }]\n";
    let opts = Opts { tables: tables.into(), ..Opts::default() };
    std::fs::write(&path, config_text("http://127.0.0.1:9/v1", &opts)).unwrap();
    let out = Command::new(BIN).args(["models", "-c"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.lines().any(|l| l.contains("gpt-4o-mini") && l.contains("mini") && l.contains("gpt-4o-mini-2024-07-18")),
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l.starts_with('*') && l.contains("(as requested)")), "{stdout}");
    // Every target on its own line: tier and weight.
    let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    assert!(stdout.lines().any(|l| words(l) == ["multi", "mock", "m-a", "1", "3"]), "{stdout}");
    assert!(stdout.lines().any(|l| words(l) == ["other", "m-b", "2", "1"]), "{stdout}");
}

#[tokio::test]
async fn model_test_endpoint_needs_the_admin_token() {
    let h = Harness::start_with(Opts { tables: DEAD_UPSTREAM.into(), ..Opts::default() }).await;
    let call = |model: &str, token: &str| {
        Request::post(h.url(&format!("/v1/models/{model}/test")))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let ok = h.send(call("mini", ADMIN_TOKEN)).await.json();
    assert_eq!((ok["ok"].as_bool(), ok["status"].as_u64()), (Some(true), Some(200)));
    assert!(ok["latency_ms"].as_f64().unwrap() > 0.0, "the latency was never measured");
    let broken = h.send(call("broken", ADMIN_TOKEN)).await.json();
    assert_eq!((broken["ok"].as_bool(), broken["status"].as_u64()), (Some(false), Some(502)));
    assert!(broken["detail"].as_str().unwrap().contains("dead"));
    assert_eq!(h.send(call("mini", "sk-client-test")).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(h.stats().requests, 1);
}
