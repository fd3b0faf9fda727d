//! What an operator does after the demo, followed literally: `sluice init`
//! then `serve` against a provider (the mock), `check` naming every unset
//! variable at once, the application log (access lines, JSON format), the
//! drain seen on `/health`, headers that belong to the client, the model
//! list's entries, the scraper's token and the process metrics.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sluice::mock::MockServer;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::binary::signal;
use crate::support::{ADMIN_TOKEN, CLIENT_KEY, Harness, Opts, h1_client, sample, scrape_at, send};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// `sluice serve -c config` with `env`, its address, and its stderr lines.
async fn serve(config: &Path, env: &[(&str, &str)]) -> (Child, SocketAddr, Arc<Mutex<Vec<String>>>) {
    let mut command = Command::new(BIN);
    command.args(["serve", "-c"]).arg(config).env("SLUICE_LISTEN", "127.0.0.1:0");
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&stderr);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            keep.lock().unwrap().push(line);
        }
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
        .await
        .expect("no listening line")
        .unwrap()
        .unwrap_or_else(|| panic!("exited: {:?}", stderr.lock().unwrap()));
    let addr = line.rsplit("://").next().unwrap().trim().parse().unwrap();
    (child, addr, stderr)
}

fn chat_to(addr: SocketAddr, key: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"messages":[{"role":"user","content":"Hello"}]}"#)))
        .unwrap()
}

#[tokio::test]
async fn the_readme_use_it_steps_work_against_a_provider() {
    let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config/sluice.toml");
    // sluice init --provider openai (pointed at the mock instead of api.openai.com)
    let output = std::process::Command::new(BIN)
        .args(["init", "--provider", "openai", "--json", "--base-url", &mock.base_url(), "-o"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let made: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let client_key = made["client_key"].as_str().unwrap().to_string();
    // The provider key is read from the environment, never written.
    assert!(!std::fs::read_to_string(&config).unwrap().contains("sk-provider"));
    // A second init does not overwrite the first.
    let again = std::process::Command::new(BIN).args(["init", "-o"]).arg(&config).output().unwrap();
    assert!(!again.status.success());
    // OPENAI_API_KEY=... sluice serve -c config/sluice.toml
    let (child, addr, stderr) = serve(&config, &[("OPENAI_API_KEY", "sk-provider")]).await;
    let answer = send(&h1_client(), chat_to(addr, &client_key)).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(mock.state.stats().key("sk-provider"), 1, "the provider key from the environment went upstream");
    // `[log] access = true` (as init writes it): one line for the request.
    crate::support::eventually("the access line", || stderr.lock().unwrap().iter().any(|l| l.contains("status=200")))
        .await;
    signal(&child, "-TERM");
}

#[tokio::test]
async fn check_names_every_unset_variable_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        "[auth]\nkeys = [\"${CLIENT_KEY}\"]\n[admin]\ntoken = \"${ADMIN_TOKEN}\"\n[[upstreams]]\nname = \"openai\"\n\
         base_url = \"https://api.openai.com/v1\"\nkeys = [\"${OPENAI_API_KEY}\"]\n",
    )
    .unwrap();
    let output = std::process::Command::new(BIN)
        .args(["check", "-c"])
        .arg(&config)
        .env_remove("CLIENT_KEY")
        .env_remove("ADMIN_TOKEN")
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for name in ["CLIENT_KEY", "ADMIN_TOKEN", "OPENAI_API_KEY"] {
        assert!(stderr.contains(name), "{name} not named: {stderr}");
    }
}

#[tokio::test]
async fn json_logs_carry_plain_request_ids_and_the_drain_shows_on_health() {
    let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    let opts = Opts {
        server_extra: "drain_delay = \"3s\"",
        tables: "[log]\nformat = \"json\"\naccess = true\n".into(),
        ..Opts::default()
    };
    std::fs::write(&config, crate::support::config_text(&mock.base_url(), &opts)).unwrap();
    let (child, addr, stderr) = serve(&config, &[]).await;
    let request = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("x-request-id", "ops-log-1")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain"}"#)))
        .unwrap();
    assert_eq!(send(&h1_client(), request).await.status, StatusCode::OK);
    crate::support::eventually("the JSON access line", || {
        stderr.lock().unwrap().iter().any(|l| l.contains(r#""request_id":"ops-log-1""#))
    })
    .await;
    // SIGTERM: /health says draining while requests are still served.
    signal(&child, "-TERM");
    let health = || async {
        let request = Request::get(format!("http://{addr}/health")).body(Full::new(Bytes::new())).unwrap();
        send(&h1_client(), request).await
    };
    crate::support::eventually_async("503 draining", || async {
        health().await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert_eq!(health().await.json()["status"], "draining");
    let still = send(&h1_client(), chat_to(addr, CLIENT_KEY)).await;
    assert_eq!(still.status, StatusCode::OK, "requests are served during the drain delay");
}

#[tokio::test]
async fn client_only_headers_stay_home_and_forwarding_is_added() {
    let h = Harness::start().await;
    let request = h
        .post("/v1/chat/completions")
        .header("x-mock-echo", "1")
        .header("openai-organization", "org-client")
        .header("openai-project", "proj-client")
        .header("cookie", "session=1")
        .header("x-forwarded-for", "6.6.6.6")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain"}"#)))
        .unwrap();
    let echoed = h.send(request).await.json();
    let headers = &echoed["headers"];
    for name in ["openai-organization", "openai-project", "cookie"] {
        assert!(headers.get(name).is_none(), "{name} reached the upstream: {headers}");
    }
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "an untrusted client cannot make up a chain");
    assert_eq!(headers["forwarded"], "for=127.0.0.1");
}

/// sluice reads answers (usage for token budgets, error codes for key
/// health, cache entries): it asks for them uncompressed whatever the
/// client accepts.
#[tokio::test]
async fn upstreams_are_asked_for_uncompressed_answers() {
    let h = Harness::start().await;
    for accepted in [Some("gzip, deflate, br, zstd"), None] {
        let mut request = h.post("/v1/chat/completions").header("x-mock-echo", "1");
        if let Some(accepted) = accepted {
            request = request.header("accept-encoding", accepted);
        }
        let echoed = h.send(request.body(Full::new(Bytes::from_static(br#"{"model":"plain"}"#))).unwrap()).await.json();
        assert_eq!(echoed["headers"]["accept-encoding"], "identity", "client sent {accepted:?}");
    }
}

#[tokio::test]
async fn one_model_is_answered_from_the_routing_table() {
    let h = Harness::start().await;
    let get =
        |path: &str| Request::get(h.url(path)).header("x-api-key", CLIENT_KEY).body(Full::new(Bytes::new())).unwrap();
    let mini = h.send(get("/v1/models/mini")).await;
    assert_eq!((mini.status, mini.json()["id"].as_str()), (StatusCode::OK, Some("mini")));
    let none = h.send(get("/v1/models/nope")).await;
    assert_eq!((none.status, none.error_code().as_str()), (StatusCode::NOT_FOUND, "model_not_found"));
    assert_eq!(h.stats().requests, 0, "answered by sluice itself");
}

#[tokio::test]
async fn a_scraper_token_and_the_process_metrics() {
    let tables = "[metrics]\ntoken = \"scraper-token-1\"\n".to_string();
    let h = Harness::start_with(Opts { tables, ..Opts::default() }).await;
    let scrape = |token: &str| {
        Request::get(h.url("/metrics"))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let reply = h.send(scrape("scraper-token-1")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(h.send(scrape("wrong-token")).await.status, StatusCode::UNAUTHORIZED);
    let m = scrape_at(h.gateway.addr).await;
    assert!(sample(&m, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(sample(&m, "process_open_fds", &[]) > 0.0);
    assert!(sample(&m, "process_start_time_seconds", &[]) > 1.7e9);
    assert!(m.samples.iter().any(|s| s.metric == "process_cpu_seconds_total"));
    assert_eq!(sample(&m, "sluice_requests_in_flight", &[]), 0.0, "the scrape does not count itself");
}

#[tokio::test]
async fn an_embedding_model_is_probed_with_an_embeddings_call() {
    let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let text = crate::support::config_text(&mock.base_url(), &Opts::default()).replace(
        "[[models]]\nname = \"plain\"",
        "[[models]]\nname = \"text-embedding-3-small\"\nupstream = \"mock\"\n\n[[models]]\nname = \"plain\"",
    );
    let config = sluice::config::Config::from_toml(&text, Path::new("t.toml"), &|_| None).unwrap();
    let gateway = sluice::server::spawn(sluice::state::Shared::new(config).unwrap()).await.unwrap();
    let request = Request::post(format!("http://{}/v1/models/text-embedding-3-small/test", gateway.addr))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let result = send(&h1_client(), request).await.json();
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(mock.state.stats().path("/v1/embeddings"), 1);
    assert_eq!(mock.state.stats().path("/v1/chat/completions"), 0);
}
