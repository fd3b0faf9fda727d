//! Talking to a model through the real upstream path without a listener: the
//! `sluice test` and `sluice chat` commands and `POST /v1/models/{name}/test`.
//! Requests go through routing, rewriting, key choice, retries and the breaker,
//! exactly as a client's would.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::proxy::body::SluiceBody;
use crate::proxy::{Prepared, end, plan, retry};
use crate::state::Shared;
use crate::telemetry::{End, RequestContext};

/// The path chat probes are sent to.
const CHAT_PATH: &str = "/v1/chat/completions";
/// The path embedding models are probed on.
const EMBEDDINGS_PATH: &str = "/v1/embeddings";

/// The outcome of a one-token chat to a model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeResult {
    /// The model asked.
    pub model: String,
    /// 2xx with a body.
    pub ok: bool,
    /// Status of the answer (sluice's own on a gateway error).
    pub status: u16,
    /// Time to the whole answer, in milliseconds.
    pub latency_ms: f64,
    /// The error message when not ok.
    pub detail: Option<String>,
}

/// Sends `body` to the chat endpoint as an internal request.
pub async fn send_chat(shared: &Shared, body: serde_json::Value) -> Result<Response<SluiceBody>, ProxyError> {
    send_to(shared, CHAT_PATH, body).await
}

/// Sends `body` to the model endpoint `path` as an internal request.
async fn send_to(
    shared: &Shared,
    path: &'static str,
    body: serde_json::Value,
) -> Result<Response<SluiceBody>, ProxyError> {
    let live = shared.live.load_full();
    let request = Request::post(path).body(()).map_err(|e| ProxyError::Internal(e.to_string()))?;
    let mut ctx = RequestContext::new(Arc::clone(&shared.telemetry), &request, None);
    let bytes = Bytes::from(body.to_string());
    ctx.bytes_in = bytes.len() as u64;
    let result = match plan::plan_json(&live, &Method::POST, path, bytes, None) {
        Ok(plan) => {
            ctx.stream = plan.stream;
            ctx.model = plan.model.clone();
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let prepared = Prepared { plan, method: Method::POST, uri: Uri::from_static(path), headers, fill: None };
            retry::send(prepared, &mut ctx).await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = &result {
        end::finish(&ctx, End { status: error.status().as_u16(), error: Some(error.kind()), ..End::default() });
    }
    result
}

/// Whether a model is an embedding model, by its name or the name sent
/// upstream (`text-embedding-3-small`, `bge-m3-embed`...): such a model
/// answers embeddings, not chats.
fn is_embedding_model(shared: &Shared, model: &str) -> bool {
    let live = shared.live.load();
    let target = live.routes.get(model).and_then(|r| r.primary().target.as_deref()).unwrap_or(model);
    [model, target].iter().any(|name| name.to_ascii_lowercase().contains("embed"))
}

/// A one-token chat to `model` (an embeddings call to an embedding model);
/// never fails, the result says what happened.
pub async fn probe(shared: &Shared, model: &str, timeout: Duration) -> ProbeResult {
    let started = Instant::now();
    let (path, body) = if is_embedding_model(shared, model) {
        (EMBEDDINGS_PATH, serde_json::json!({ "model": model, "input": "ping" }))
    } else {
        (
            CHAT_PATH,
            serde_json::json!({ "model": model, "max_tokens": 1, "messages": [{ "role": "user", "content": "ping" }] }),
        )
    };
    let outcome = tokio::time::timeout(timeout, async {
        let response = send_to(shared, path, body).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        Ok::<_, ProxyError>((status, bytes))
    })
    .await;
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
    let model = model.to_string();
    match outcome {
        Err(_) => ProbeResult {
            model,
            ok: false,
            status: 504,
            latency_ms,
            detail: Some(format!("no answer within {} s", timeout.as_secs())),
        },
        Ok(Err(error)) => ProbeResult {
            model,
            ok: false,
            status: error.status().as_u16(),
            latency_ms,
            detail: Some(error.to_string()),
        },
        Ok(Ok((status, bytes))) => {
            let ok = (200..300).contains(&status);
            let detail = (!ok).then(|| {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).chars().take(200).collect())
            });
            ProbeResult { model, ok, status, latency_ms, detail }
        }
    }
}

/// Pulls the text of each `choices[0].delta.content` out of SSE bytes, keeping an
/// unfinished line for the next call.
pub fn sse_text(pending: &mut String, chunk: &[u8]) -> String {
    pending.push_str(&String::from_utf8_lossy(chunk));
    let mut text = String::new();
    while let Some(end) = pending.find('\n') {
        let line: String = pending.drain(..=end).collect();
        let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
        let Ok(event) = serde_json::from_str::<serde_json::Value>(data.trim()) else { continue };
        if let Some(piece) = event["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
        if let Some(message) = event["error"]["message"].as_str() {
            text.push_str(&format!("\n[error: {message}]"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_text_across_chunk_boundaries() {
        let mut pending = String::new();
        let first = sse_text(&mut pending, b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choi");
        let second = sse_text(&mut pending, b"ces\":[{\"delta\":{\"content\":\"lo\"}}]}\n\ndata: [DONE]\n\n");
        assert_eq!((first.as_str(), second.as_str()), ("Hel", "lo"));
    }
}
