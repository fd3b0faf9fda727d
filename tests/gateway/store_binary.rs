//! The key store with the real binary: usage survives SIGTERM and a restart,
//! and a key made by `sluice keys create` beside a running server works
//! within 2 s.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use sluice::mock::MockServer;

use crate::binary::{signal, start_binary};
use crate::support::{Opts, config_text, h1_client, send};
use crate::tenancy::store_tables;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

fn write_config(dir: &Path, base_url: &str) -> std::path::PathBuf {
    let path = dir.join("sluice.toml");
    let opts = Opts { tables: store_tables(dir, ""), ..Opts::default() };
    std::fs::write(&path, config_text(base_url, &opts)).unwrap();
    path
}

/// Runs the CLI on the config; returns its JSON output.
fn cli(config: &Path, args: &[&str]) -> Value {
    let output = std::process::Command::new(BIN).args(args).arg("--json").arg("-c").arg(config).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

async fn chat(addr: SocketAddr, key: &str) -> StatusCode {
    let request = Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from_static(br#"{"model":"plain","messages":[]}"#)))
        .unwrap();
    send(&h1_client(), request).await.status
}

#[tokio::test]
async fn a_cli_key_works_within_2_s_and_usage_survives_a_restart() {
    let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock.base_url());
    let (mut child, addr) = start_binary(&config).await;

    let user = cli(&config, &["users", "add", "carol"]);
    let id = user["id"].as_i64().unwrap().to_string();
    let created = cli(&config, &["keys", "create", "--user", &id, "--name", "laptop", "--rpm", "100"]);
    let key = created["key"].as_str().unwrap().to_string();
    // The server polls the store's data_version every second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut status = chat(addr, &key).await;
    while status != StatusCode::OK {
        assert!(tokio::time::Instant::now() < deadline, "the CLI's key still refused after 2 s: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = chat(addr, &key).await;
    }
    for _ in 0..4 {
        assert_eq!(chat(addr, &key).await, StatusCode::OK);
    }
    // SIGTERM writes what is counted in memory before the process exits.
    signal(&child, "-TERM");
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("no exit").unwrap();
    assert!(exit.success());
    let usage = cli(&config, &["usage", "--since", "1d"]);
    assert_eq!(usage["total"]["requests"], 5, "{usage}");
    let key_id = created["id"].as_i64().unwrap().to_string();
    let listed = cli(&config, &["keys", "list"]);
    assert!(listed[0]["last_used_at"].is_i64(), "{listed}");
    assert!(!listed.to_string().contains(&key), "a listing never holds the key");

    let (mut child, addr) = start_binary(&config).await;
    assert_eq!(chat(addr, &key).await, StatusCode::OK, "the key survives the restart");
    signal(&child, "-TERM");
    tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("no exit").unwrap();
    let shown = cli(&config, &["keys", "show", &key_id]);
    assert_eq!(shown["usage_30d"]["requests"], 6, "{shown}");
    let revoked = cli(&config, &["keys", "revoke", &key_id]);
    assert_eq!(revoked["revoked"], true);
}
