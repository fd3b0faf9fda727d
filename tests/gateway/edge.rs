//! The edge: TLS termination (ALPN, renewal on reload, mutual TLS), and the
//! limits that keep one client from taking the listener away from others
//! (connections, handshakes, idle connections, clients that stop reading,
//! header sizes, paths, bodies sluice must route).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::pki::Issued;
use crate::support::{ADMIN_TOKEN, CLIENT_KEY, Harness, Opts, eventually, raw_exchange};

const CHAT: &str = r#"{"model":"plain","messages":[]}"#;

type TlsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTPS client trusting `ca`'s authority: HTTP/2 by ALPN when `h2`, else
/// HTTP/1.1 only (as OpenAI SDKs speak), presenting `identity` if given.
fn tls_client(ca: &Issued, h2: bool, identity: Option<&Issued>) -> TlsClient {
    let builder =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(ca.client_config(&[], identity)).https_only();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let connector =
        if h2 { builder.enable_http2().wrap_connector(http) } else { builder.enable_http1().wrap_connector(http) };
    let mut client = Client::builder(TokioExecutor::new());
    client.http2_only(h2);
    client.build(connector)
}

async fn tls_chat(client: &TlsClient, addr: std::net::SocketAddr) -> Result<(StatusCode, http::Version), String> {
    let request = Request::post(format!("https://127.0.0.1:{}/v1/chat/completions", addr.port()))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(CHAT)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (status, version) = (response.status(), response.version());
    response.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok((status, version))
}

/// A harness whose listener serves `cert`/`key` (copied into `dir`, so a
/// test can renew them in place).
async fn tls_harness(dir: &Path, issued: &Issued, extra: &str) -> Harness {
    std::fs::copy(&issued.cert_file, dir.join("cert.pem")).unwrap();
    std::fs::copy(&issued.key_file, dir.join("key.pem")).unwrap();
    let server_extra = format!(
        "tls = {{ cert = {:?}, key = {:?} {extra} }}",
        dir.join("cert.pem").display().to_string(),
        dir.join("key.pem").display().to_string()
    );
    Harness::start_with(Opts { server_extra: Box::leak(server_extra.into_boxed_str()), ..Opts::default() }).await
}

#[tokio::test]
async fn tls_termination_speaks_h2_and_http1_by_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let issued = Issued::new("listener");
    let h = tls_harness(dir.path(), &issued, "").await;
    assert_eq!(
        tls_chat(&tls_client(&issued, true, None), h.gateway.addr).await.unwrap(),
        (StatusCode::OK, http::Version::HTTP_2)
    );
    assert_eq!(
        tls_chat(&tls_client(&issued, false, None), h.gateway.addr).await.unwrap(),
        (StatusCode::OK, http::Version::HTTP_11)
    );
    // Plain HTTP to a TLS listener gets no answer.
    let plain = raw_exchange(h.gateway.addr, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(!plain.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&plain));
    assert_eq!(h.stats().requests, 2);
}

#[tokio::test]
async fn a_renewed_certificate_is_served_after_reload_and_open_connections_stay() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Issued::new("old"), Issued::new("new"));
    std::fs::copy(&old.cert_file, dir.path().join("cert.pem")).unwrap();
    std::fs::copy(&old.key_file, dir.path().join("key.pem")).unwrap();
    // A reload reads the config file again: this gateway runs from one.
    let mock = sluice::mock::MockServer::start(([127, 0, 0, 1], 0).into()).await.unwrap();
    let config = dir.path().join("sluice.toml");
    let text = crate::support::config_text(&mock.base_url(), &Opts::default()).replace(
        "[server]\n",
        &format!(
            "[server]\ntls = {{ cert = {:?}, key = {:?} }}\n",
            dir.path().join("cert.pem").display().to_string(),
            dir.path().join("key.pem").display().to_string()
        ),
    );
    std::fs::write(&config, text).unwrap();
    let shared = sluice::state::Shared::new(sluice::config::Config::load(&config).unwrap()).unwrap();
    let gateway = sluice::server::spawn(shared).await.unwrap();

    let trusts_old = tls_client(&old, true, None);
    assert_eq!(tls_chat(&trusts_old, gateway.addr).await.unwrap().0, StatusCode::OK);
    assert!(tls_chat(&tls_client(&new, true, None), gateway.addr).await.is_err(), "served the new pair too early");

    std::fs::copy(&new.cert_file, dir.path().join("cert.pem")).unwrap();
    std::fs::copy(&new.key_file, dir.path().join("key.pem")).unwrap();
    gateway.shared.reload().unwrap();
    assert_eq!(tls_chat(&tls_client(&new, true, None), gateway.addr).await.unwrap().0, StatusCode::OK);
    // The connection made before the reload is still open and still served.
    assert_eq!(tls_chat(&trusts_old, gateway.addr).await.unwrap().0, StatusCode::OK);
    assert!(tls_chat(&tls_client(&old, true, None), gateway.addr).await.is_err(), "a new handshake got the old pair");
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (server, clients, stranger) = (Issued::new("listener"), Issued::new("clients"), Issued::new("stranger"));
    let client_ca = format!(", client_ca = {:?}", clients.ca_file.display().to_string());
    let h = tls_harness(dir.path(), &server, &client_ca).await;
    assert_eq!(tls_chat(&tls_client(&server, true, Some(&clients)), h.gateway.addr).await.unwrap().0, StatusCode::OK);
    assert!(tls_chat(&tls_client(&server, true, None), h.gateway.addr).await.is_err(), "no client certificate");
    assert!(tls_chat(&tls_client(&server, true, Some(&stranger)), h.gateway.addr).await.is_err(), "foreign client CA");
    assert_eq!(h.stats().requests, 1);
}

#[test]
fn check_refuses_a_certificate_and_key_that_do_not_match() {
    let (a, b) = (Issued::new("a"), Issued::new("b"));
    let text = format!(
        "[server]\ntls = {{ cert = {:?}, key = {:?} }}\n[auth]\nrequire_api_key = false\n[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1\"\nkeys = [\"k\"]\n",
        a.cert_file.display().to_string(),
        b.key_file.display().to_string()
    );
    let error = sluice::config::Config::from_toml(&text, Path::new("t.toml"), &|_| None).unwrap_err().to_string();
    assert!(error.contains("server.tls") && error.contains("do not fit together"), "{error}");
}

#[tokio::test]
async fn at_max_connections_new_ones_wait_in_the_backlog() {
    let h = Harness::start_with(Opts { server_extra: "max_connections = 2", ..Opts::default() }).await;
    let silent: Vec<TcpStream> =
        vec![TcpStream::connect(h.gateway.addr).await.unwrap(), TcpStream::connect(h.gateway.addr).await.unwrap()];
    let connections = Arc::clone(&h.gateway.shared.telemetry.connections);
    eventually("both silent connections are held", || connections.open.load(std::sync::atomic::Ordering::Relaxed) == 2)
        .await;
    let (client, url) = (h.h1.clone(), h.url("/v1/chat/completions"));
    let mut third = tokio::spawn(async move {
        let request = Request::post(url)
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .body(Full::new(Bytes::from(CHAT)))
            .unwrap();
        client.request(request).await.map(|r| r.status())
    });
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut third).await.is_err(), "served past max_connections");
    assert_eq!(connections.accepted.load(std::sync::atomic::Ordering::Relaxed), 2, "the third was accepted");
    drop(silent);
    let status = tokio::time::timeout(Duration::from_secs(5), third).await.unwrap().unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
}

/// Reads until the peer closes (or 5 s pass); true if it closed.
async fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_connection_that_says_nothing_or_half_a_preface_is_closed() {
    let h = Harness::start_with(Opts { server_extra: "handshake_timeout = \"200ms\"", ..Opts::default() }).await;
    let mut silent = TcpStream::connect(h.gateway.addr).await.unwrap();
    let mut half = TcpStream::connect(h.gateway.addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(closed_by_peer(&mut silent).await, "a silent connection stayed open");
    assert!(closed_by_peer(&mut half).await, "half a preface held the connection");
    assert_eq!(h.chat(CHAT).await.status, StatusCode::OK);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_idle_timeout() {
    let h = Harness::start_with(Opts { server_extra: "idle_timeout = \"300ms\"", ..Opts::default() }).await;
    // h2c: the preface and an empty SETTINGS frame, then nothing.
    let mut h2 = TcpStream::connect(h.gateway.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    assert!(closed_by_peer(&mut h2).await, "an idle h2 connection stayed open");
    assert_eq!(h.gateway.shared.telemetry.connections.open.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn an_idle_http2_client_that_never_answers_does_not_hold_up_the_drain() {
    let h = Harness::start().await;
    let mut h2 = TcpStream::connect(h.gateway.addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let connections = Arc::clone(&h.gateway.shared.telemetry.connections);
    eventually("the h2 connection is served", || connections.open.load(std::sync::atomic::Ordering::Relaxed) == 1)
        .await;
    // Waiting on the silent peer would run out the harness's 5 s grace.
    assert_eq!(h.gateway.shutdown().await, sluice::server::Drain::Clean);
    drop(h2);
}

#[tokio::test]
async fn a_client_that_stops_reading_releases_the_upstream() {
    let h = Harness::start_with(Opts { server_extra: "send_timeout = \"500ms\"", ..Opts::default() }).await;
    // A long, fast stream over HTTP/2 (about 5 MB, past the client's 2 MiB
    // stream window), whose body the client never reads: flow control stops
    // sluice from writing, and nothing else would ever end it.
    let request = h
        .post("/v1/chat/completions")
        .header("x-mock-chunks", "40000")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain","stream":true}"#)))
        .unwrap();
    let response = h.h2.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The answer is dropped: its key lease ends and the request is recorded.
    let live = h.gateway.shared.live.load_full();
    let leased = || {
        live.upstreams[0]
            .keys
            .keys()
            .iter()
            .map(|k| k.counters.in_flight.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>()
    };
    eventually("the key was released", || leased() == 0).await;
    let in_flight = &h.gateway.shared.telemetry.metrics.in_flight;
    eventually("the request was recorded", || in_flight.get() == 0).await;
    drop(response);
    assert_eq!(h.chat(CHAT).await.status, StatusCode::OK, "the listener still serves");
}

#[tokio::test]
async fn oversized_request_headers_are_refused() {
    let h = Harness::start_with(Opts { server_extra: "max_header_bytes = \"16KiB\"", ..Opts::default() }).await;
    let big = "x".repeat(32 * 1024);
    let request = format!("GET /health HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n");
    let answer = raw_exchange(h.gateway.addr, request.as_bytes()).await;
    assert!(answer.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&answer[..answer.len().min(200)]));
}

#[tokio::test]
async fn model_endpoints_refuse_uploads_instead_of_passing_them_through() {
    let h = Harness::start().await;
    let upload = |content_types: &[&str]| {
        let mut request =
            Request::post(h.url("/v1/chat/completions")).header("authorization", format!("Bearer {CLIENT_KEY}"));
        for content_type in content_types {
            request = request.header("content-type", *content_type);
        }
        request.body(Full::new(Bytes::from_static(b"{\"model\":\"anything\"}"))).unwrap()
    };
    // An upload type, or a JSON type beside it (the upstream may read either).
    for content_types in [
        &["application/octet-stream"][..],
        &["multipart/form-data; boundary=x"],
        &["application/json", "application/octet-stream"],
    ] {
        let reply = h.send(upload(content_types)).await;
        assert_eq!(
            (reply.status, reply.error_code().as_str()),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
        );
    }
    assert_eq!(h.stats().requests, 0, "an upload reached the upstream");
}

#[tokio::test]
async fn paths_with_dot_segments_or_encoded_slashes_never_reach_an_upstream() {
    let h = Harness::start().await;
    for path in ["/v1/../../internal/admin", "/v1/%2e%2e/%2e%2e/internal", "/v1/files/a%2Fb", "/v1/./models/x"] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\nconnection: close\r\n\r\n"
        );
        let answer = raw_exchange(h.gateway.addr, request.as_bytes()).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 400") && text.contains("invalid_path"), "{path}: {text}");
    }
    assert_eq!(h.stats().requests, 0);
}

#[tokio::test]
async fn a_body_with_two_models_is_refused() {
    let h = Harness::start().await;
    let reply = h.chat(r#"{"model":"plain","messages":[],"model":"gpt-4o-mini"}"#).await;
    assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::BAD_REQUEST, "duplicate_member"));
    assert_eq!(reply.json()["error"]["param"], "model");
    assert_eq!(h.stats().requests, 0);
}

#[tokio::test]
async fn a_reload_refused_for_a_syntax_error_never_echoes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mock = sluice::mock::MockServer::start(([127, 0, 0, 1], 0).into()).await.unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, crate::support::config_text(&mock.base_url(), &Opts::default())).unwrap();
    let gateway =
        sluice::server::spawn(sluice::state::Shared::new(sluice::config::Config::load(&path).unwrap()).unwrap())
            .await
            .unwrap();
    let broken = std::fs::read_to_string(&path).unwrap().replace("[auth]", "[auth]\nkeys = [\"sk-live-LEAKME\" \"x\"]");
    std::fs::write(&path, broken).unwrap();
    let reply = crate::support::send(
        &crate::support::h1_client(),
        Request::post(format!("http://{}/admin/reload", gateway.addr))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let body = String::from_utf8_lossy(&reply.body);
    assert!(body.contains("line ") && !body.contains("LEAKME"), "{body}");
}

#[tokio::test]
async fn one_address_holds_at_most_max_connections_per_ip() {
    let h = Harness::start_with(Opts { server_extra: "max_connections_per_ip = 2", ..Opts::default() }).await;
    let held = [TcpStream::connect(h.gateway.addr).await.unwrap(), TcpStream::connect(h.gateway.addr).await.unwrap()];
    let mut third = TcpStream::connect(h.gateway.addr).await.unwrap();
    assert!(closed_by_peer(&mut third).await, "a third connection from the same address was kept");
    let connections = &h.gateway.shared.telemetry.connections;
    assert_eq!(connections.refused_per_ip.load(std::sync::atomic::Ordering::Relaxed), 1);
    // Another address is served.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 2], 0))).unwrap();
    let mut other = socket.connect(h.gateway.addr).await.unwrap();
    other.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), other.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    drop(held);
}

/// Reads one HTTP/1.1 answer (head and a `content-length` body) off `stream`:
/// its head, lowercased.
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert!(buf.len() < 16 << 10, "no end of head");
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "the connection closed mid-answer");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap().to_ascii_lowercase();
    let length =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse::<usize>().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    head
}

/// A chat's head with `content-length: length`, under a key sluice refuses.
fn refused_head(length: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-not-a-key\r\n\
         content-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    )
}

#[tokio::test]
async fn a_refusal_before_a_large_body_says_the_connection_closes() {
    let h = Harness::start().await;
    // Past what a refusal reads to keep the connection; then one small
    // enough, whose body never comes (the refusal waits 1 s for it).
    for length in [100_000, 60_000] {
        let mut stream = TcpStream::connect(h.gateway.addr).await.unwrap();
        stream.write_all(refused_head(length).as_bytes()).await.unwrap();
        let head = read_answer(&mut stream).await;
        assert!(head.starts_with("http/1.1 401"), "{head}");
        assert!(head.contains("\r\nconnection: close\r\n"), "the client must not reuse it: {head}");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "closed after the answer");
    }
}

#[tokio::test]
async fn a_refused_request_with_a_small_body_keeps_its_connection() {
    let h = Harness::start().await;
    let mut stream = TcpStream::connect(h.gateway.addr).await.unwrap();
    for _ in 0..3 {
        // The body comes a little after the head, as over a real network:
        // the refusal is decided before it is there.
        stream.write_all(refused_head(CHAT.len()).as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.write_all(CHAT.as_bytes()).await.unwrap();
        let head = read_answer(&mut stream).await;
        assert!(head.starts_with("http/1.1 401"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
    // The same connection still serves.
    stream.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    assert!(read_answer(&mut stream).await.starts_with("http/1.1 200"));
}
