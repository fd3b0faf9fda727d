//! Bad input and broken upstreams: each gets the right status and an
//! OpenAI-shaped error, and nothing reaches the upstream that should not.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{CLIENT_KEY, Harness, Opts, raw_exchange};

fn body(text: &str) -> Full<Bytes> {
    Full::new(Bytes::from(text.to_string()))
}

#[tokio::test]
async fn malformed_bodies_are_400_and_never_forwarded() {
    let h = Harness::start().await;
    for (text, code) in [
        (r#"{"model":"plain","messages":["#, "invalid_json"),
        (r#"[{"model":"plain"}]"#, "invalid_json"),
        (r#"{"model":42}"#, "invalid_model"),
        (r#"{"model":"plain","stream":"yes"}"#, "invalid_json"),
        ("", "empty_body"),
        ("not json at all", "invalid_json"),
    ] {
        let reply = h.chat(text).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{text:?}");
        assert_eq!(reply.error_code(), code, "{text:?}");
    }
    assert_eq!(h.stats().requests, 0);
}

#[tokio::test]
async fn auth_failures_are_401() {
    let h = Harness::start().await;
    let no_key = h.send(Request::post(h.url("/v1/chat/completions")).body(body(r#"{"model":"plain"}"#)).unwrap()).await;
    assert_eq!(no_key.status, StatusCode::UNAUTHORIZED);
    assert_eq!(no_key.error_code(), "missing_api_key");
    let wrong = h
        .send(
            Request::post(h.url("/v1/chat/completions"))
                .header("authorization", "Bearer sk-wrong")
                .body(body(r#"{"model":"plain"}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.error_code(), "invalid_api_key");
    assert!(!String::from_utf8_lossy(&wrong.body).contains("sk-wrong"), "the presented key is not echoed");
    assert_eq!(h.stats().requests, 0);
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods() {
    let h = Harness::start().await;
    let missing = h.send(Request::get(h.url("/nope")).body(body("")).unwrap()).await;
    assert_eq!((missing.status, missing.error_code().as_str()), (StatusCode::NOT_FOUND, "not_found"));
    let get_chat = h
        .send(Request::get(h.url("/v1/chat/completions")).header("x-api-key", CLIENT_KEY).body(body("")).unwrap())
        .await;
    assert_eq!(
        (get_chat.status, get_chat.error_code().as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    assert!(get_chat.headers.contains_key("allow"));
    let post_health = h.send(Request::post(h.url("/health")).body(body("")).unwrap()).await;
    assert_eq!(post_health.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h.stats().requests, 0);
}

#[tokio::test]
async fn oversized_bodies_are_413_declared_or_not() {
    let h = Harness::start().await; // max_body = 64 KiB
    let big = format!(r#"{{"model":"plain","input":"{}"}}"#, "x".repeat(70 * 1024));
    let declared = h.chat(&big).await;
    assert_eq!((declared.status, declared.error_code().as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"));

    // Chunked, no length declared: cut off at the cap.
    let mut request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in big.as_bytes().chunks(8192) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(h.gateway.addr, &request).await;
    assert!(answer.starts_with(b"HTTP/1.1 413"), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(h.stats().requests, 0);
}

#[tokio::test]
async fn declared_oversize_is_refused_before_the_body_is_sent() {
    let h = Harness::start().await;
    // Headers promise 10 MB; no body byte follows. sluice must answer anyway.
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-type: application/json\r\ncontent-length: 10000000\r\n\r\n"
    );
    let mut stream = tokio::net::TcpStream::connect(h.gateway.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 12];
    tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_exact(&mut head))
        .await
        .expect("answered without the body")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
}

/// An address where nothing listens.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A fake upstream that answers every connection with `reply` and closes.
async fn fake_upstream(reply: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(reply).await;
        }
    });
    addr
}

async fn harness_at(addr: SocketAddr, extra: &'static str) -> Harness {
    Harness::start_with(Opts { base_url: Some(format!("http://{addr}/v1")), upstream_extra: extra, ..Opts::default() })
        .await
}

#[tokio::test]
async fn refused_connection_is_502() {
    let h = harness_at(closed_port().await, "").await;
    let reply = h.chat(r#"{"model":"plain"}"#).await;
    assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::BAD_GATEWAY, "upstream_unreachable"));
}

#[tokio::test]
async fn reset_before_headers_is_502() {
    let h = harness_at(fake_upstream(b"").await, "").await;
    let reply = h.chat(r#"{"model":"plain"}"#).await;
    assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::BAD_GATEWAY, "upstream_protocol_error"));
}

#[tokio::test]
async fn garbage_answer_is_502() {
    let h = harness_at(fake_upstream(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await, "").await;
    let reply = h.chat(r#"{"model":"plain"}"#).await;
    assert_eq!((reply.status, reply.error_code().as_str()), (StatusCode::BAD_GATEWAY, "upstream_protocol_error"));
}

#[tokio::test]
async fn upstream_hop_by_hop_headers_are_stripped() {
    let addr = fake_upstream(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close, x-upstream-hop\r\nx-upstream-hop: 1\r\nkeep-alive: timeout=5\r\nx-kept: yes\r\ncontent-length: 2\r\n\r\n{}").await;
    let h = harness_at(addr, "").await;
    let reply = h.chat(r#"{"model":"plain"}"#).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"{}");
    assert_eq!(reply.headers["x-kept"], "yes");
    assert!(!reply.headers.contains_key("x-upstream-hop") && !reply.headers.contains_key("keep-alive"));
}
