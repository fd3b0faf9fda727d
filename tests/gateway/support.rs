//! Test harness: a mock, a gateway in front of it, and clients for both protocols.

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

/// Knobs for a harness.
pub struct Opts {
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
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            wildcard: true,
            upstream_extra: "",
            base_url: None,
            max_body: "64KiB",
            upstream_auth: None,
            server_extra: "",
            tables: String::new(),
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
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace = "5s"
max_body = "{max_body}"
{server_extra}

[auth]
keys = ["{CLIENT_KEY}"]

[admin]
token = "{ADMIN_TOKEN}"

[[upstreams]]
name = "mock"
base_url = "{base_url}"
{upstream_auth}
header_timeout = "2s"
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

{tables}
"#,
        server_extra = opts.server_extra,
        tables = opts.tables,
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
        let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
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

/// Waits for `condition` to hold, polling every 5 ms, for at most 5 s.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl Harness {
    /// `GET /health` as JSON.
    pub async fn health(&self) -> serde_json::Value {
        self.send(Request::get(self.url("/health")).body(Full::new(Bytes::new())).unwrap()).await.json()
    }

    /// The state of one upstream key in `/health` (`healthy`, `cooling`, `disabled`).
    pub async fn key_state(&self, key: &str) -> String {
        let health = self.health().await;
        let fingerprint = sluice::config::keys::fingerprint(key);
        health["upstreams"][0]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key"] == fingerprint.as_str())
            .map(|k| k["state"].as_str().unwrap().to_string())
            .unwrap_or_else(|| "absent".to_string())
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
