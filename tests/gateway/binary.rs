//! The real binary: config checking, and SIGTERM draining an open stream.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use sluice::mock::MockServer;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{CLIENT_KEY, Opts, config_text, h1_client};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

fn write_config(dir: &Path, base_url: &str) -> std::path::PathBuf {
    write_config_with(dir, base_url, &Opts::default())
}

fn write_config_with(dir: &Path, base_url: &str, opts: &Opts) -> std::path::PathBuf {
    let path = dir.join("sluice.toml");
    std::fs::write(&path, config_text(base_url, opts)).unwrap();
    path
}

/// Starts `sluice serve` and returns it with the address it printed.
pub async fn start_binary(config: &Path) -> (Child, SocketAddr) {
    let mut child =
        Command::new(BIN).args(["serve", "-c"]).arg(config).stdout(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("no listening line")
        .unwrap()
        .unwrap();
    let addr = line.rsplit("http://").next().unwrap().trim().parse().unwrap_or_else(|_| panic!("bad line: {line}"));
    (child, addr)
}

pub fn signal(child: &Child, name: &str) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill").args([name, &pid]).status().unwrap();
    assert!(status.success());
}

fn stream_request(addr: SocketAddr, chunks: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("x-mock-chunks", chunks)
        .header("x-mock-gap-ms", "50")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain","stream":true}"#)))
        .unwrap()
}

#[tokio::test]
async fn sigterm_lets_an_open_stream_finish_then_exits_zero() {
    sigterm_drains("").await;
}

/// The same on event loops: the stream lives on a loop, which the process
/// stops (and joins) only after the drain and the last writes.
#[tokio::test]
async fn sigterm_drains_a_stream_on_an_event_loop_then_exits_zero() {
    sigterm_drains("workers = 1\nevent_loops = 2").await;
}

/// A stream open when SIGTERM comes finishes whole, the process exits 0, and
/// the stream's line is in the request log.
async fn sigterm_drains(server_extra: &'static str) {
    let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.jsonl");
    let opts = Opts { server_extra, tables: format!("[log]\nrequests = {log:?}\n"), ..Opts::default() };
    let (mut child, addr) = start_binary(&write_config_with(dir.path(), &mock.base_url(), &opts)).await;

    let response = h1_client().request(stream_request(addr, "20")).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: "));

    signal(&child, "-TERM");
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("stream stalled")
        .expect("stream cut by shutdown")
        .to_bytes();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.trim_end().ends_with("data: [DONE]"), "stream incomplete: {text}");
    assert_eq!(text.matches("tok").count(), 19);

    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("did not exit").unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
    assert_eq!(mock.state.stats().streams_finished, 1);
    let lines = std::fs::read_to_string(&log).unwrap();
    let line: serde_json::Value = serde_json::from_str(lines.trim_end()).expect("one request line");
    assert_eq!((line["status"].as_u64(), line["stream"].as_bool()), (Some(200), Some(true)), "{line}");
}

#[tokio::test]
async fn second_signal_exits_at_once() {
    let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = start_binary(&write_config(dir.path(), &mock.base_url())).await;
    // A stream far longer than the test: only the second signal can end the process.
    let response = h1_client().request(stream_request(addr, "100000")).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    signal(&child, "-TERM");
    // The drain is under way once the listener is gone.
    crate::support::eventually("listener closed", || std::net::TcpStream::connect(addr).is_err()).await;
    signal(&child, "-INT");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("did not exit").unwrap();
    assert_eq!(status.code(), Some(sluice::shutdown::EXIT_FORCED));
}

#[test]
fn check_accepts_a_good_config_and_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(dir.path(), "http://127.0.0.1:9/v1");
    let out = std::process::Command::new(BIN).args(["check", "-c"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));

    let text = std::fs::read_to_string(&good).unwrap().replace("shutdown_grace", "shutdown_grase");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, text).unwrap();
    for command in ["check", "serve"] {
        let out = std::process::Command::new(BIN).args([command, "-c"]).arg(&bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("bad.toml") && stderr.contains("shutdown_grase"), "{command}: {stderr}");
    }
}

#[test]
fn bundled_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sluice.toml");
    let out = std::process::Command::new(BIN)
        .args(["check", "-c"])
        .arg(&example)
        .env("OPENAI_API_KEY", "sk-test-openai")
        .env("CLIENT_KEY", "sk-test-client")
        .env("ADMIN_TOKEN", "test-admin")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
