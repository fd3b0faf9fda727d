//! The body stage: a body sluice must look at (JSON, or any body of a method
//! that may be repeated) is read once, whole, under `max_body`; an upload is
//! streamed through under the same cap. Past the cap: 413, before a byte is
//! read when the length is declared.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::error::ProxyError;
use crate::proxy::is_model_endpoint;
use crate::upstream::body::{ForwardBody, UploadWatch, client_body_error};

/// Longest time a client may take to send a body sluice reads whole. Past it: 408.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// What the body stage produced.
pub enum Read {
    /// The whole body (empty when the request has none): replayable.
    Whole(Bytes),
    /// An upload, streamed to the upstream as it arrives: sent at most once.
    Upload(ForwardBody),
}

/// Reads the request body, or prepares it to stream.
pub async fn read(parts: &Parts, body: Incoming, max_body: u64) -> Result<Read, ProxyError> {
    check_media_type(parts)?;
    if declared_length(parts).is_some_and(|len| len > max_body) {
        return Err(ProxyError::BodyTooLarge(max_body));
    }
    if body.is_end_stream() {
        return Ok(Read::Whole(Bytes::new()));
    }
    if parts.method == Method::POST && !carries_json(parts) {
        // Only off the model endpoints (`check_media_type`).
        return Ok(Read::Upload(ForwardBody::upload(body, max_body, UploadWatch::default())));
    }
    read_whole(body, max_body).await.map(Read::Whole)
}

/// A POST whose body sluice reads: declared JSON, no content type at all, or
/// anything on a model endpoint (curl's `-d` says form-urlencoded while
/// sending JSON; such bodies must still be routed, not passed blindly).
pub fn carries_json(parts: &Parts) -> bool {
    if parts.method != Method::POST {
        return false;
    }
    let Some(content_type) = parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.ends_with("+json")
        || is_model_endpoint(parts.uri.path())
}

/// Model endpoints always route by the body's `model`: an upload content type
/// there (which would otherwise stream past routing, the model allow-list,
/// renames and defaults) is refused.
pub fn check_media_type(parts: &Parts) -> Result<(), ProxyError> {
    let path = parts.uri.path();
    let Some(endpoint) = crate::proxy::MODEL_ENDPOINTS.iter().find(|e| **e == path) else { return Ok(()) };
    let mut content_types = parts.headers.get_all(CONTENT_TYPE).iter();
    let content_type = content_types.next().and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_types.next().is_some() {
        // A singleton field sent twice: sluice and the upstream could read different ones.
        return Err(ProxyError::UnsupportedMediaType(endpoint, "more than one Content-Type".to_string()));
    }
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let upload = essence.to_ascii_lowercase().starts_with("multipart/")
        || essence.eq_ignore_ascii_case("application/octet-stream");
    if upload { Err(ProxyError::UnsupportedMediaType(endpoint, essence.to_string())) } else { Ok(()) }
}

fn declared_length(parts: &Parts) -> Option<u64> {
    parts.headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Reads the whole body under the cap and the read timeout.
async fn read_whole(body: Incoming, max_body: u64) -> Result<Bytes, ProxyError> {
    let limited = Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX));
    match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
        Err(_) => Err(ProxyError::BodyTimeout(BODY_READ_TIMEOUT.as_secs())),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) => Err(client_body_error(error.as_ref(), max_body)),
    }
}
