//! The bundled mock, driven over HTTP as the demo and load tests drive it.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sluice::mock::MockServer;

use crate::support::{h1_client, send};

fn request(method: &str, url: String, key: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    if let Some(key) = key {
        builder = builder.header("authorization", format!("Bearer {key}"));
    }
    builder.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

#[tokio::test]
async fn control_endpoint_sets_faults_and_stats_count_them() {
    let mock = MockServer::start(([127, 0, 0, 1], 0).into()).await.unwrap();
    let client = h1_client();
    let base = format!("http://{}", mock.addr);
    let faults = r#"{"keys":{"sk-limited":{"status":429,"retry_after":"2"},"sk-revoked":{"status":401}},"error_rate":{"status":500,"rate":0.5,"seed":3}}"#;
    assert_eq!(send(&client, request("POST", format!("{base}/_control"), None, faults)).await.status, StatusCode::OK);

    let chat = r#"{"model":"m","messages":[]}"#;
    let limited = send(&client, request("POST", format!("{base}/v1/chat/completions"), Some("sk-limited"), chat)).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers["retry-after"], "2");
    let revoked = send(&client, request("POST", format!("{base}/v1/chat/completions"), Some("sk-revoked"), chat)).await;
    assert_eq!(revoked.status, StatusCode::UNAUTHORIZED);
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            send(&client, request("POST", format!("{base}/v1/chat/completions"), Some("sk-ok"), chat))
                .await
                .status
                .as_u16(),
        );
    }
    // Requests 2..=5 of the mock (after the two key faults) draw from seed 3.
    let fault = sluice::mock::RateFault { status: 500, rate: 0.5, seed: 3 };
    let expected: Vec<u16> =
        (2..6).map(|n| if sluice::mock::Faults::rate_hits(&fault, n) { 500 } else { 200 }).collect();
    assert_eq!(statuses, expected);
    let failed = expected.iter().filter(|s| **s == 500).count();

    let stats = send(&client, request("GET", format!("{base}/_stats"), None, "")).await.json();
    assert_eq!(stats["requests"], 6);
    assert_eq!(stats["by_key"]["sk-limited"], 1);
    assert_eq!(stats["by_key"]["sk-ok"], 4);
    assert_eq!(stats["by_status"]["429"], 1);
    assert_eq!(stats["by_status"]["500"].as_u64().unwrap_or(0), failed as u64);
    assert_eq!(stats["by_status"]["200"].as_u64().unwrap_or(0), 4 - failed as u64);

    assert_eq!(send(&client, request("POST", format!("{base}/_reset"), None, "")).await.status, StatusCode::OK);
    assert_eq!(mock.state.stats().requests, 0);
    let bad = send(&client, request("POST", format!("{base}/_control"), None, r#"{"nonsense":1}"#)).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn mock_answers_the_openai_endpoints() {
    let mock = MockServer::start(([127, 0, 0, 1], 0).into()).await.unwrap();
    let client = h1_client();
    let base = mock.base_url();
    let chat =
        send(&client, request("POST", format!("{base}/chat/completions"), Some("k"), r#"{"model":"m"}"#)).await.json();
    assert_eq!(chat["usage"]["completion_tokens"], 7);
    let embeddings =
        send(&client, request("POST", format!("{base}/embeddings"), Some("k"), r#"{"model":"e"}"#)).await.json();
    assert_eq!(embeddings["data"][0]["embedding"].as_array().unwrap().len(), 3);
    let models = send(&client, request("GET", format!("{base}/models"), Some("k"), "")).await.json();
    assert_eq!(models["object"], "list");
    let missing = send(&client, request("GET", format!("{base}/nope"), Some("k"), "")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}
