//! Each attack that once worked against the release binary, replayed against
//! the real binary on loopback (bounded in count and time), so none comes
//! back: a refusal a client provokes, broken uploads, idle and silent
//! connections, paths and bodies that would slip past routing, a broken
//! config on SIGHUP, a model name that forges log lines, a client that
//! stops reading, slow oversized headers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sluice::mock::MockServer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};

use crate::binary::signal;
use crate::support::{CLIENT_KEY, Opts, config_text, eventually, h1_client, raw_exchange, send};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");
const CHAT: &str = r#"{"model":"plain","messages":[]}"#;

/// A running binary, its address, and every line it wrote to stderr.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
    config: PathBuf,
}

impl Gateway {
    /// `sluice serve` with the harness config plus `server_extra` under
    /// `[server]`, in front of `mock`; under `prlimit --nofile=N` when given.
    async fn start(mock: &MockServer, server_extra: &'static str, nofile: Option<u32>, env: &[(&str, &Path)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("sluice.toml");
        let text = config_text(&mock.base_url(), &Opts { server_extra, ..Opts::default() });
        std::fs::write(&config, text).unwrap();
        let mut command = match nofile {
            Some(n) => {
                let mut command = Command::new("prlimit");
                command.arg(format!("--nofile={n}:{n}")).arg(BIN);
                command
            }
            None => Command::new(BIN),
        };
        command.args(["serve", "-c"]).arg(&config).env("RUST_LOG", "info");
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let keep = Arc::clone(&stderr);
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
            .unwrap();
        let addr = line.rsplit("http://").next().unwrap().trim().parse().unwrap();
        Self { child, addr, stderr, _dir: dir, config }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn chat(&self, extra: &[(&str, &str)]) -> crate::support::Reply {
        let mut request = Request::post(self.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .header("content-type", "application/json");
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        send(&h1_client(), request.body(Full::new(Bytes::from(CHAT))).unwrap()).await
    }

    async fn health(&self) -> serde_json::Value {
        let request = Request::get(self.url("/health"))
            .header("authorization", format!("Bearer {}", crate::support::ADMIN_TOKEN))
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(&h1_client(), request).await.json()
    }

    fn logged(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGTERM, and the exit code within 10 s.
    async fn stop(mut self) -> Option<i32> {
        signal(&self.child, "-TERM");
        tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.expect("no exit").unwrap().code()
    }
}

async fn mock() -> MockServer {
    MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap()
}

#[tokio::test]
async fn a_refusal_a_client_provokes_never_takes_keys_out_of_service() {
    let mock = mock().await;
    let g = Gateway::start(&mock, "", None, &[]).await;
    for _ in 0..30 {
        assert_eq!(g.chat(&[("x-mock-status", "403")]).await.status, StatusCode::FORBIDDEN);
    }
    let health = g.health().await;
    assert_eq!((health["status"].as_str(), health["upstreams"][0]["keys_available"].as_u64()), (Some("ok"), Some(3)));
    assert_eq!(g.chat(&[]).await.status, StatusCode::OK);
    assert_eq!(g.stop().await, Some(0));
}

#[tokio::test]
async fn broken_uploads_never_open_the_breaker() {
    let mock = mock().await;
    let g = Gateway::start(&mock, "", None, &[]).await;
    let head = |length: &str| {
        format!(
            "POST /v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-type: application/octet-stream\r\n{length}\r\n"
        )
    };
    for _ in 0..10 {
        // Chunked past max_body (64 KiB in the harness config)...
        let mut upload = head("transfer-encoding: chunked\r\n").into_bytes();
        for _ in 0..10 {
            upload.extend_from_slice(b"2000\r\n");
            upload.extend_from_slice(&[b'x'; 0x2000]);
            upload.extend_from_slice(b"\r\n");
        }
        upload.extend_from_slice(b"0\r\n\r\n");
        assert!(raw_exchange(g.addr, &upload).await.starts_with(b"HTTP/1.1 413"));
        // ...and cut off half-way.
        let mut stream = TcpStream::connect(g.addr).await.unwrap();
        stream.write_all(head("content-length: 9000\r\n").as_bytes()).await.unwrap();
        stream.write_all(&[b'x'; 3000]).await.unwrap();
        drop(stream);
    }
    let health = g.health().await;
    assert_eq!(health["upstreams"][0]["breaker"], "closed", "{health}");
    assert_eq!(g.chat(&[]).await.status, StatusCode::OK);
    assert_eq!(g.stop().await, Some(0));
}

/// A connection from another loopback address than 127.0.0.1.
async fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test]
async fn idle_http2_connections_from_one_client_leave_room_for_the_others() {
    let mock = mock().await;
    // 256 descriptors: max_connections becomes 96, 24 of them per address.
    let g = Gateway::start(&mock, "", Some(256), &[]).await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(g.addr).await.unwrap();
        let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await;
        idle.push(stream);
    }
    // Another client is still served, at once.
    let mut other = connect_from([127, 0, 0, 2], g.addr).await;
    other.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), other.read_to_end(&mut answer)).await.expect("not served").unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    // And the idle connections do not hold up the drain.
    assert_eq!(g.stop().await, Some(0));
}

#[tokio::test]
async fn the_listen_backlog_is_the_configured_one() {
    let mock = mock().await;
    let g = Gateway::start(&mock, "backlog = 512", None, &[]).await;
    let out =
        std::process::Command::new("ss").args(["-ltnH", &format!("sport = :{}", g.addr.port())]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // For a listening socket, ss shows the backlog as Send-Q (the third column).
    let backlog: u32 = text.split_whitespace().nth(2).unwrap_or_else(|| panic!("{text}")).parse().unwrap();
    let cap: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap().trim().parse().unwrap();
    assert_eq!(backlog, 512.min(cap), "{text}");
    assert_eq!(g.stop().await, Some(0));
}

#[tokio::test]
async fn bodies_and_paths_that_would_slip_past_routing_never_reach_the_upstream() {
    let mock = mock().await;
    let g = Gateway::start(&mock, "", None, &[]).await;
    assert_eq!(
        g.chat(&[("content-type", "application/octet-stream")]).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let twice = send(
        &h1_client(),
        Request::post(g.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .body(Full::new(Bytes::from_static(br#"{"model":"plain","model":"gpt-4o-mini"}"#)))
            .unwrap(),
    )
    .await;
    assert_eq!(twice.status, StatusCode::BAD_REQUEST);
    for path in ["/v1/../../internal/admin", "/v1/%2e%2e/x", "/v1/files/a%2fb"] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\nconnection: close\r\n\r\n"
        );
        assert!(raw_exchange(g.addr, request.as_bytes()).await.starts_with(b"HTTP/1.1 400"), "{path}");
    }
    assert_eq!(mock.state.stats().requests, 0);
    assert_eq!(g.stop().await, Some(0));
}

#[tokio::test]
async fn a_broken_config_on_sighup_is_never_echoed_to_the_log_or_systemd() {
    let mock = mock().await;
    let socket_dir = tempfile::tempdir().unwrap();
    let socket_path = socket_dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let g = Gateway::start(&mock, "", None, &[("NOTIFY_SOCKET", &socket_path)]).await;
    let mut buf = vec![0u8; 4096];
    let _ready = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf)).await.unwrap().unwrap();
    let text =
        std::fs::read_to_string(&g.config).unwrap().replace("[auth]", "[auth]\nkeys = [\"sk-live-LEAKME\" \"x\"]");
    std::fs::write(&g.config, text).unwrap();
    signal(&g.child, "-HUP");
    let mut statuses = String::new();
    for _ in 0..2 {
        let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf)).await.unwrap().unwrap();
        statuses.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(statuses.contains("reload refused") && statuses.contains("line "), "{statuses}");
    eventually("the refusal was logged", || g.logged().iter().any(|l| l.contains("reload refused"))).await;
    let logged = g.logged().join("\n");
    assert!(!statuses.contains("LEAKME") && !logged.contains("LEAKME"), "{statuses}\n{logged}");
    assert_eq!(g.stop().await, Some(0));
}

#[tokio::test]
async fn a_model_name_cannot_forge_log_lines() {
    let mock = mock().await;
    // Without the `*` route an unknown model is refused, and the refusal logged.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, config_text(&mock.base_url(), &Opts { wildcard: false, ..Opts::default() })).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = stdout.next_line().await.unwrap().unwrap();
    let addr: SocketAddr = line.rsplit("http://").next().unwrap().trim().parse().unwrap();
    let forged = r#"{"model":"x\nERROR sluice: forged line\u001b[31m"}"#;
    let reply = send(
        &h1_client(),
        Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .body(Full::new(Bytes::from_static(forged.as_bytes())))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    signal(&child, "-TERM");
    let mut stderr = String::new();
    let mut pipe = child.stderr.take().unwrap();
    let read = pipe.read_to_string(&mut stderr);
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("the gateway did not exit").unwrap();
    assert!(stderr.contains("model_not_found"), "the refusal was not logged: {stderr}");
    assert!(!stderr.lines().any(|l| l.starts_with("ERROR sluice: forged")), "a forged line: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "a raw escape sequence reached the log");
}

#[tokio::test]
async fn a_client_that_stops_reading_releases_the_upstream_key() {
    let mock = mock().await;
    let g = Gateway::start(&mock, "send_timeout = \"1s\"", None, &[]).await;
    let client = crate::support::h2_client();
    let request = Request::post(g.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("x-mock-chunks", "40000")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain","stream":true}"#)))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Never read: within a few send_timeouts the key is released.
    let mut released = false;
    for _ in 0..100 {
        let health = g.health().await;
        let leased: u64 =
            health["upstreams"][0]["keys"].as_array().unwrap().iter().map(|k| k["in_flight"].as_u64().unwrap()).sum();
        if leased == 0 {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(released, "the unread answer still holds its key");
    drop(response);
    assert_eq!(g.stop().await, Some(0));
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn slow_oversized_headers_hold_little_memory() {
    let mock = mock().await;
    let g = Gateway::start(&mock, "", None, &[]).await;
    let pid = g.child.id().unwrap();
    let before = rss_kib(pid);
    // 200 clients each send 100 KB of one header and never finish the head.
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(g.addr).await.unwrap();
        let _ = stream.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nx-pad: ").await;
        let _ = stream.write_all(&[b'a'; 100 * 1024]).await;
        slow.push(stream);
    }
    let mut answer = [0u8; 12];
    // The head cap (64 KiB) refuses each of them; none is held with 100 KB.
    for stream in &mut slow {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await.unwrap().unwrap_or(0);
        assert!(n == 0 || answer.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&answer[..n]));
    }
    let grown_mib = rss_kib(pid).saturating_sub(before) / 1024;
    assert!(grown_mib < 32, "200 slow heads grew the gateway by {grown_mib} MiB");
    assert_eq!(g.stop().await, Some(0));
}
