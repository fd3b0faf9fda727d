//! Test harness: a mock, a gateway in front of it over any upstream
//! transport, and clients for both client protocols.

pub mod pki;
pub mod scripted;
pub mod servers;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sluice::config::Config;
use sluice::mock::{MockServer, StatsSnapshot};
use sluice::server::{self, Running};
use sluice::state::Shared;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The client key every harness accepts.
pub const CLIENT_KEY: &str = "sk-client-test";
/// The upstream keys, in config order.
pub const UP_KEYS: [&str; 3] = ["sk-up-1", "sk-up-2", "sk-up-3"];

/// How sluice talks to the mock: every upstream path users have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Cleartext HTTP/1.1 over sluice's own client (the default).
    H1Sluice,
    /// Cleartext HTTP/1.1 over hyper-util's client (`[client] h1_client = "hyper"`).
    H1Hyper,
    /// Cleartext HTTP/2 with prior knowledge (`http2 = "prior-knowledge"`).
    H2c,
    /// TLS, HTTP/2 chosen by ALPN (how the big providers are reached).
    TlsH2,
    /// TLS to an upstream that offers only HTTP/1.1 in ALPN.
    TlsH1,
}

impl Transport {
    /// Whether requests reach the mock over HTTP/2.
    pub fn is_h2(self) -> bool {
        matches!(self, Self::H2c | Self::TlsH2)
    }
}

/// One test per upstream transport for `async fn NAME(t: Transport)` defined
/// beside it: `per_transport!(NAME, ...)` makes a module `NAME` with the tests
/// `h1_sluice`, `h1_hyper`, `h2c`, `tls_h2`, `tls_h1`. Prefix `multi_thread:`
/// to run them on the multi-thread runtime.
#[macro_export]
macro_rules! per_transport {
    (multi_thread: $($name:ident),+ $(,)?) => {
        $crate::per_transport!(@with (flavor = "multi_thread", worker_threads = 2) $($name),+);
    };
    ($($name:ident),+ $(,)?) => {
        $crate::per_transport!(@with () $($name),+);
    };
    (@with $flavor:tt $($name:ident),+) => {
        $(
            mod $name {
                use $crate::support::Transport;
                #[tokio::test $flavor]
                async fn h1_sluice() { super::$name(Transport::H1Sluice).await }
                #[tokio::test $flavor]
                async fn h1_hyper() { super::$name(Transport::H1Hyper).await }
                #[tokio::test $flavor]
                async fn h2c() { super::$name(Transport::H2c).await }
                #[tokio::test $flavor]
                async fn tls_h2() { super::$name(Transport::TlsH2).await }
                #[tokio::test $flavor]
                async fn tls_h1() { super::$name(Transport::TlsH1).await }
            }
        )+
    };
}

/// Like [`per_transport!`] for the HTTP/2 upstream paths only (`h2c`,
/// `tls_h2`), on the multi-thread runtime.
#[macro_export]
macro_rules! per_transport_h2 {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                use $crate::support::Transport;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn h2c() { super::$name(Transport::H2c).await }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn tls_h2() { super::$name(Transport::TlsH2).await }
            }
        )+
    };
}

/// Knobs for a harness.
pub struct Opts {
    /// How sluice reaches the mock.
    pub transport: Transport,
    /// Add a `*` route.
    pub wildcard: bool,
    /// Extra lines in the `[[upstreams]]` table.
    pub upstream_extra: &'static str,
    /// Point the upstream somewhere other than the mock.
    pub base_url: Option<String>,
    /// `[server] max_body`.
    pub max_body: &'static str,
    /// The upstream's credential lines, given the mock's address; default: three keys.
    pub upstream_auth: Option<fn(SocketAddr) -> String>,
    /// Lines added to `[server]`.
    pub server_extra: &'static str,
    /// Tables appended to the config.
    pub tables: String,
    /// Lines added to `[routing]`.
    pub routing_extra: &'static str,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            transport: Transport::H1Sluice,
            wildcard: true,
            upstream_extra: "",
            base_url: None,
            max_body: "64KiB",
            upstream_auth: None,
            server_extra: "",
            tables: String::new(),
            routing_extra: "",
        }
    }
}

/// The admin token every harness config carries.
pub const ADMIN_TOKEN: &str = "admin-token-test";

/// The config text a harness runs with.
pub fn config_text(base_url: &str, opts: &Opts) -> String {
    config_text_with_auth(base_url, opts, r#"keys = ["sk-up-1", "sk-up-2", "sk-up-3"]"#)
}

/// The config text with other upstream credential lines.
pub fn config_text_with_auth(base_url: &str, opts: &Opts, upstream_auth: &str) -> String {
    let wildcard = if opts.wildcard { "[[models]]\nname = \"*\"\nupstream = \"mock\"\n" } else { "" };
    let (client, transport) = match opts.transport {
        Transport::H1Sluice => ("", String::new()),
        Transport::H1Hyper => ("h1_client = \"hyper\"", String::new()),
        Transport::H2c => ("", "http2 = \"prior-knowledge\"".to_string()),
        Transport::TlsH2 | Transport::TlsH1 => ("", format!("ca_file = {:?}", pki::ca_file())),
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"
max_body = "{max_body}"
{server_extra}

[client]
{client}

[auth]
keys = ["{CLIENT_KEY}"]

[admin]
token = "{ADMIN_TOKEN}"

[[upstreams]]
name = "mock"
base_url = "{base_url}"
{upstream_auth}
header_timeout = "2s"
{transport}
{extra}

[[models]]
name = "gpt-4o-mini"
upstream = "mock"
aliases = ["mini"]
upstream_model = "gpt-4o-mini-2024-07-18"
defaults = {{ max_tokens = 1024, temperature = 0.5 }}

[[models]]
name = "plain"
upstream = "mock"

{wildcard}
[routing]
default_model = "gpt-4o-mini"
{routing_extra}

{tables}
"#,
        server_extra = opts.server_extra,
        client = client,
        transport = transport,
        tables = opts.tables,
        routing_extra = opts.routing_extra,
        max_body = opts.max_body,
        extra = opts.upstream_extra,
    )
}

/// A mock and a gateway in front of it.
pub struct Harness {
    pub mock: MockServer,
    pub gateway: Running,
    pub h1: Client<HttpConnector, Full<Bytes>>,
    pub h2: Client<HttpConnector, Full<Bytes>>,
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The OpenAI error `code`, asserting the error shape on the way.
    pub fn error_code(&self) -> String {
        let json = self.json();
        let error = &json["error"];
        assert!(error["message"].is_string() && error["type"].is_string() && error.get("param").is_some(), "{json}");
        error["code"].as_str().unwrap_or_default().to_string()
    }
}

pub fn h1_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(Opts::default()).await
    }

    pub async fn start_with(opts: Opts) -> Self {
        let mock = start_mock(opts.transport).await;
        let base_url = opts.base_url.clone().unwrap_or_else(|| mock.base_url());
        let text = match opts.upstream_auth {
            Some(auth) => config_text_with_auth(&base_url, &opts, &auth(mock.addr)),
            None => config_text(&base_url, &opts),
        };
        let config = Config::from_toml(&text, Path::new("test.toml"), &|_| None).unwrap();
        let gateway = server::spawn(Shared::new(config).unwrap()).await.unwrap();
        Self { mock, gateway, h1: h1_client(), h2: h2_client() }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.addr)
    }

    /// A POST with the client key and a JSON content type.
    pub fn post(&self, path: &str) -> http::request::Builder {
        Request::post(self.url(path))
            .header("authorization", format!("Bearer {CLIENT_KEY}"))
            .header("content-type", "application/json")
    }

    pub async fn send(&self, request: Request<Full<Bytes>>) -> Reply {
        send(&self.h1, request).await
    }

    /// POSTs a chat body with the client key and returns the whole reply.
    pub async fn chat(&self, body: &str) -> Reply {
        let request = self.post("/v1/chat/completions").body(Full::new(Bytes::from(body.to_string()))).unwrap();
        self.send(request).await
    }

    /// A chat request the mock answers with what it received.
    pub async fn echo_chat(&self, body: &str) -> serde_json::Value {
        let request = self
            .post("/v1/chat/completions")
            .header("x-mock-echo", "1")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let reply = self.send(request).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        reply.json()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.mock.state.stats()
    }
}

/// A mock reachable over `transport`: TLS offering `h2` (and HTTP/1.1) or
/// only HTTP/1.1 in ALPN, or cleartext.
pub async fn start_mock(transport: Transport) -> MockServer {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let alpn: &[&[u8]] = match transport {
        Transport::TlsH2 => &[b"h2", b"http/1.1"],
        Transport::TlsH1 => &[b"http/1.1"],
        Transport::H1Sluice | Transport::H1Hyper | Transport::H2c => return MockServer::serve(listener),
    };
    MockServer::serve_tls(listener, tokio_rustls::TlsAcceptor::from(pki::server_config(alpn)))
}

pub async fn send(client: &Client<HttpConnector, Full<Bytes>>, request: Request<Full<Bytes>>) -> Reply {
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("no answer in 10 s")
        .expect("request failed");
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .expect("body stalled")
        .expect("body failed")
        .to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

/// Writes `request` on a fresh TCP connection and reads until the peer closes
/// (or 10 s pass): for checking bytes on the wire.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    out
}

/// Moves tokio's clock (which sluice's cooldowns, backoffs and breakers read)
/// forward by `by` at once, without waiting. Only while no I/O is awaited:
/// a paused clock would fire I/O timeouts the moment the runtime idles.
pub async fn advance_clock(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

/// Waits for an async `condition` to hold, polling every 20 ms, for at most 5 s.
pub async fn eventually_async<F: std::future::Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for `condition` to hold, polling every 5 ms, for at most 5 s.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Harness {
    /// `GET /health` as JSON, with the details the admin token shows.
    pub async fn health(&self) -> serde_json::Value {
        let request = Request::get(self.url("/health"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.send(request).await.json()
    }

    /// The state of one upstream key in `/health` (`healthy`, `cooling`, `disabled`).
    pub async fn key_state(&self, key: &str) -> String {
        key_state_in(&self.health().await, key)
    }

    /// POSTs to an admin path with the admin token.
    pub async fn admin(&self, path: &str) -> Reply {
        let request = Request::post(self.url(path))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        self.send(request).await
    }

    /// Sends `n` chat requests one after another; returns their statuses.
    pub async fn chats(&self, n: usize, body: &str) -> Vec<u16> {
        let mut statuses = Vec::with_capacity(n);
        for _ in 0..n {
            statuses.push(self.chat(body).await.status.as_u16());
        }
        statuses
    }
}

/// The state of upstream key `key` of the first upstream in a `/health`
/// answer with details (`healthy`, `cooling`, `disabled`, or `absent`).
pub fn key_state_in(health: &serde_json::Value, key: &str) -> String {
    let fingerprint = sluice::config::keys::fingerprint(key);
    health["upstreams"][0]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == fingerprint.as_str())
        .map(|k| k["state"].as_str().unwrap().to_string())
        .unwrap_or_else(|| "absent".to_string())
}

/// `GET /metrics` of the gateway at `addr`, parsed by a real Prometheus parser.
pub async fn scrape_at(addr: SocketAddr) -> prometheus_parse::Scrape {
    let request = Request::get(format!("http://{addr}/metrics"))
        .header("x-api-key", CLIENT_KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send(&h1_client(), request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("unparsable exposition ({e}):\n{text}"))
}

/// The value of the one sample of `name` whose labels include all of `labels`.
pub fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(_) | prometheus_parse::Value::Summary(_) => f64::NAN,
        })
        .collect();
    matching.iter().sum()
}
