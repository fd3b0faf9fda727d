//! Routing, rewriting, key rotation, auth, headers: asserted on what the mock saw.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use crate::support::{CLIENT_KEY, Harness, Opts, UP_KEYS};

fn body(text: &str) -> Full<Bytes> {
    Full::new(Bytes::from(text.to_string()))
}

#[tokio::test]
async fn alias_is_renamed_and_defaults_filled() {
    let h = Harness::start().await;
    let echo = h.echo_chat(r#"{"model":"mini","messages":[{"role":"user","content":"hi"}],"temperature":0.9}"#).await;
    let sent: serde_json::Value = serde_json::from_str(echo["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini-2024-07-18", "upstream_model rename");
    assert_eq!(sent["max_tokens"], 1024, "missing default filled");
    assert_eq!(sent["temperature"], 0.9, "present value kept");
    assert_eq!(sent["messages"][0]["content"], "hi");
    assert_eq!(echo["path"], "/v1/chat/completions");
}

#[tokio::test]
async fn missing_model_gets_the_default() {
    let h = Harness::start().await;
    let echo = h.echo_chat(r#"{"messages":[],"max_tokens":5,"temperature":0}"#).await;
    let sent: serde_json::Value = serde_json::from_str(echo["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(sent["max_tokens"], 5);
}

#[tokio::test]
async fn unchanged_body_is_forwarded_byte_for_byte() {
    let h = Harness::start().await;
    let original = "{ \"model\" : \"plain\",\n  \"messages\": [ ] }";
    let echo = h.echo_chat(original).await;
    assert_eq!(echo["body"], original);
    // The wildcard passes unknown names through unchanged, too.
    let original = r#"{"model":"some-new-model","messages":[]}"#;
    assert_eq!(h.echo_chat(original).await["body"], original);
}

#[tokio::test]
async fn unknown_model_without_wildcard_is_404_and_never_sent() {
    let h = Harness::start_with(Opts { wildcard: false, ..Opts::default() }).await;
    let reply = h.chat(r#"{"model":"gpt-9","messages":[]}"#).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code(), "model_not_found");
    assert_eq!(h.stats().requests, 0);
}

#[tokio::test]
async fn keys_rotate_round_robin() {
    let h = Harness::start().await;
    for _ in 0..9 {
        assert_eq!(h.chat(r#"{"model":"plain","messages":[]}"#).await.status, StatusCode::OK);
    }
    let stats = h.stats();
    for key in UP_KEYS {
        assert_eq!(stats.key(key), 3, "{key}: {:?}", stats.by_key);
    }
    assert_eq!(stats.key(CLIENT_KEY), 0, "the client key never reaches the upstream");
}

#[tokio::test]
async fn client_key_accepted_from_every_place_and_never_forwarded() {
    let h = Harness::start().await;
    let url = h.url("/v1/chat/completions");
    let requests = [
        Request::post(&url).header("authorization", format!("Bearer {CLIENT_KEY}")),
        Request::post(&url).header("x-api-key", CLIENT_KEY),
        Request::post(&url).header("api-key", CLIENT_KEY),
        Request::post(format!("{url}?api_key={CLIENT_KEY}&keep=1")),
    ];
    for request in requests {
        let request = request
            .header("x-mock-echo", "1")
            .header("content-type", "application/json")
            .body(body(r#"{"model":"plain"}"#))
            .unwrap();
        let reply = h.send(request).await;
        assert_eq!(reply.status, StatusCode::OK);
        let echo = reply.json();
        let text = echo.to_string();
        assert!(!text.contains(CLIENT_KEY), "client key leaked upstream: {text}");
        assert!(echo["headers"]["authorization"].as_str().unwrap().starts_with("Bearer sk-up-"));
        assert!(echo["headers"].get("x-api-key").is_none() && echo["headers"].get("api-key").is_none());
    }
    assert_eq!(h.stats().by_path.get("/v1/chat/completions"), Some(&4));
}

#[tokio::test]
async fn query_keeps_other_parameters() {
    let h = Harness::start().await;
    let request = Request::post(h.url(&format!("/v1/chat/completions?api_key={CLIENT_KEY}&keep=1")))
        .header("x-mock-echo", "1")
        .body(body(r#"{"model":"plain"}"#))
        .unwrap();
    assert_eq!(h.send(request).await.json()["query"], "keep=1");
}

#[tokio::test]
async fn request_id_is_forwarded_and_returned_or_generated() {
    let h = Harness::start().await;
    let request = h
        .post("/v1/chat/completions")
        .header("x-request-id", "trace-42")
        .header("x-mock-echo", "1")
        .body(body(r#"{"model":"plain"}"#))
        .unwrap();
    let reply = h.send(request).await;
    assert_eq!(reply.headers["x-request-id"], "trace-42");
    assert_eq!(reply.json()["headers"]["x-request-id"], "trace-42");

    let reply = h.chat(r#"{"model":"plain"}"#).await;
    assert_eq!(reply.headers["x-request-id"].len(), 36, "a generated UUID");
    let refused = h.send(Request::get(h.url("/v1/nope-no-key")).body(body("")).unwrap()).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(refused.headers.contains_key("x-request-id"), "errors carry the id too");
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let h = Harness::start().await;
    let request = h
        .post("/v1/chat/completions")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic eA==")
        .header("x-end-to-end", "kept")
        .header("x-mock-echo", "1")
        .body(body(r#"{"model":"plain"}"#))
        .unwrap();
    let echo = h.send(request).await.json();
    let headers = &echo["headers"];
    for gone in ["x-hop", "keep-alive", "proxy-authorization"] {
        assert!(headers.get(gone).is_none(), "{gone} forwarded: {headers}");
    }
    assert_eq!(headers["x-end-to-end"], "kept");
}

#[tokio::test]
async fn other_endpoints_are_forwarded() {
    let h = Harness::start().await;
    let embed = h.send(h.post("/v1/embeddings").body(body(r#"{"model":"mini","input":"x"}"#)).unwrap()).await;
    assert_eq!(embed.status, StatusCode::OK);
    assert_eq!(embed.json()["model"], "gpt-4o-mini-2024-07-18");
    let completion = h.send(h.post("/v1/completions").body(body(r#"{"model":"plain","prompt":"x"}"#)).unwrap()).await;
    assert_eq!(completion.json()["object"], "text_completion");
    // Any other /v1 path with a JSON model is routed by it...
    let other = h
        .send(h.post("/v1/responses").header("x-mock-echo", "1").body(body(r#"{"model":"mini","input":"x"}"#)).unwrap())
        .await;
    let sent: serde_json::Value = serde_json::from_str(other.json()["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini-2024-07-18");
    // ...and one without goes to the default model's upstream untouched.
    let get = Request::get(h.url("/v1/files?purpose=batch"))
        .header("x-api-key", CLIENT_KEY)
        .header("x-mock-echo", "1")
        .body(body(""))
        .unwrap();
    let echo = h.send(get).await.json();
    assert_eq!(
        (echo["method"].as_str(), echo["path"].as_str(), echo["query"].as_str()),
        (Some("GET"), Some("/v1/files"), Some("purpose=batch"))
    );
    let stats = h.stats();
    assert_eq!(stats.by_path.get("/v1/embeddings"), Some(&1));
    assert_eq!(stats.by_path.get("/v1/files"), Some(&1));
}

#[tokio::test]
async fn uploads_stream_through_unchanged() {
    let h = Harness::start().await;
    let multipart = "--XX\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XX--\r\n";
    let request = Request::post(h.url("/v1/files"))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("content-type", "multipart/form-data; boundary=XX")
        .header("x-mock-echo", "1")
        .body(body(multipart))
        .unwrap();
    let echo = h.send(request).await.json();
    assert_eq!(echo["body"], multipart);
    assert_eq!(echo["headers"]["content-type"], "multipart/form-data; boundary=XX");
}

#[tokio::test]
async fn models_list_and_health() {
    let h = Harness::start().await;
    let list = h.send(Request::get(h.url("/v1/models")).header("x-api-key", CLIENT_KEY).body(body("")).unwrap()).await;
    assert_eq!(list.status, StatusCode::OK);
    let ids: Vec<String> =
        list.json()["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["gpt-4o-mini", "mini", "plain"]);
    assert_eq!(list.json()["object"], "list");

    for path in ["/", "/health", "/v1/health"] {
        let reply = h.send(Request::get(h.url(path)).body(body("")).unwrap()).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(reply.json()["status"], "ok");
        assert_eq!(reply.json()["version"], sluice::VERSION);
        assert!(!reply.body.windows(5).any(|w| w == b"sk-up"), "no secrets in /health");
        assert!(reply.json().get("upstreams").is_none(), "upstreams and keys only with the admin token");
    }
    let detailed = h
        .send(
            Request::get(h.url("/health"))
                .header("authorization", format!("Bearer {}", crate::support::ADMIN_TOKEN))
                .body(body(""))
                .unwrap(),
        )
        .await;
    assert_eq!(detailed.json()["upstreams"][0]["keys_total"], 3);
    assert_eq!(h.stats().requests, 0, "answered by sluice itself");
}

#[tokio::test]
async fn upstream_error_responses_pass_through_untouched() {
    let h = Harness::start().await;
    let request =
        h.post("/v1/chat/completions").header("x-mock-status", "418").body(body(r#"{"model":"plain"}"#)).unwrap();
    let reply = h.send(request).await;
    assert_eq!(reply.status.as_u16(), 418);
    assert_eq!(reply.error_code(), "mock_fault", "the upstream's own body");
}
