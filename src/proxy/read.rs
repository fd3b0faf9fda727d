//! The body stage: a body sluice must look at (JSON, or any body of a method
//! that may be repeated) is read once, whole, under `max_body`; an upload is
//! streamed through under the same cap. Past the cap: 413, before a byte is
//! read when the length is declared. The request's `Content-Type` is looked
//! at once, here.

use std::future::Future as _;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http_body::Body as _;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::error::ProxyError;
use crate::proxy::MODEL_ENDPOINTS;
use crate::upstream::body::{ForwardBody, UploadWatch, client_body_error};

/// Longest time a client may take to send a body sluice reads whole. Past it: 408.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// What the body stage produced.
pub enum Read {
    /// A JSON body to route by its `model`.
    Json(Bytes),
    /// Any other body sluice holds whole (empty when the request has none): replayable.
    Whole(Bytes),
    /// An upload, streamed to the upstream as it arrives: sent at most once.
    Upload(ForwardBody),
}

/// How a request's body is to be handled, judged from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A POST whose body sluice reads and routes.
    Json,
    /// A POST of another type (multipart, octet-stream, ...): streamed.
    Upload,
    /// Any other method: its body (usually none) is read whole.
    Other,
}

/// What to do with a request's body: decided from its headers alone, so the
/// only await of the body stage is the read itself.
pub enum Plan {
    /// Nothing to read: the body is known.
    Done(Read),
    /// Read the body whole, then it is JSON (`true`) or not.
    ReadWhole(Incoming, bool),
}

/// Decides how to take the request body, or refuses the request.
pub fn plan(parts: &Parts, body: Incoming, max_body: u64) -> Result<Plan, ProxyError> {
    let kind = kind(parts)?;
    if declared_length(parts).is_some_and(|len| len > max_body) {
        return Err(ProxyError::BodyTooLarge(max_body));
    }
    if body.is_end_stream() {
        let empty = Bytes::new();
        return Ok(Plan::Done(if kind == Kind::Json { Read::Json(empty) } else { Read::Whole(empty) }));
    }
    Ok(match kind {
        Kind::Upload => Plan::Done(Read::Upload(ForwardBody::upload(body, max_body, UploadWatch::default()))),
        Kind::Json => Plan::ReadWhole(body, true),
        Kind::Other => Plan::ReadWhole(body, false),
    })
}

/// A POST is JSON when it says so, says nothing, or goes to a model endpoint
/// (curl's `-d` says form-urlencoded while sending JSON; such bodies must
/// still be routed, not passed blindly). Model endpoints always route by the
/// body's `model`: an upload type there (which would otherwise stream past
/// routing, the model allow-list, renames and defaults), or two
/// `Content-Type` headers (sluice and the upstream could read different
/// ones), is refused.
fn kind(parts: &Parts) -> Result<Kind, ProxyError> {
    if parts.method != Method::POST {
        return Ok(Kind::Other);
    }
    let path = parts.uri.path();
    let endpoint = MODEL_ENDPOINTS.iter().find(|e| **e == path);
    let mut values = parts.headers.get_all(CONTENT_TYPE).iter();
    let Some(first) = values.next() else { return Ok(Kind::Json) };
    let essence = first.to_str().unwrap_or("").split(';').next().unwrap_or("").trim();
    let json = essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json");
    let Some(endpoint) = endpoint else { return Ok(if json { Kind::Json } else { Kind::Upload }) };
    if values.next().is_some() {
        return Err(ProxyError::UnsupportedMediaType(endpoint, "more than one Content-Type".to_string()));
    }
    let upload = essence.get(..10).is_some_and(|prefix| prefix.eq_ignore_ascii_case("multipart/"))
        || essence.eq_ignore_ascii_case("application/octet-stream");
    if upload { Err(ProxyError::UnsupportedMediaType(endpoint, essence.to_string())) } else { Ok(Kind::Json) }
}

fn declared_length(parts: &Parts) -> Option<u64> {
    parts.headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The most of a refused request's body read (and dropped) so that its
/// connection stays open, and the longest wait for it.
const DRAIN_MAX: u64 = 64 << 10;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Reads and drops the body of a request refused before its body stage,
/// when it is small (a declared length of at most [`DRAIN_MAX`]) and comes
/// within [`DRAIN_TIMEOUT`]; whether it ended. hyper keeps a connection
/// open only once its request was read to the end.
pub async fn drain(request: http::Request<Incoming>) -> bool {
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_none_or(|len| len > DRAIN_MAX) {
        return false;
    }
    // Frame by frame, each dropped as it comes: nothing of it is kept.
    let mut body = Limited::new(request.into_body(), DRAIN_MAX as usize);
    let read = async {
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIMEOUT, read).await.unwrap_or(false)
}

/// Reads the whole body under the cap and the read timeout.
pub async fn read_whole(body: Incoming, max_body: u64) -> Result<Bytes, ProxyError> {
    let mut limited = Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX));
    // A small body usually came in with the head, in one frame: taken as it
    // is, without a collector's list or the timer (a clock read for its
    // deadline, a handle to the runtime, and on drop the timer driver's lock,
    // which every worker shares).
    let first = match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut limited).poll_frame(cx))).await {
        Poll::Ready(None) => return Ok(Bytes::new()),
        Poll::Ready(Some(Err(error))) => return Err(client_body_error(error.as_ref(), max_body)),
        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
            Ok(data) if limited.is_end_stream() => return Ok(data),
            Ok(data) => Some(data),
            // Trailers: nothing a body sluice reads holds.
            Err(_) => None,
        },
        Poll::Pending => None,
    };
    let mut collect = std::pin::pin!(limited.collect());
    let read = match std::future::poll_fn(|cx| Poll::Ready(collect.as_mut().poll(cx))).await {
        Poll::Ready(read) => read,
        Poll::Pending => match tokio::time::timeout(BODY_READ_TIMEOUT, collect).await {
            Err(_) => return Err(ProxyError::BodyTimeout(BODY_READ_TIMEOUT.as_secs())),
            Ok(read) => read,
        },
    };
    match (first, read) {
        (None, Ok(rest)) => Ok(rest.to_bytes()),
        (Some(first), Ok(rest)) => {
            let rest = rest.to_bytes();
            // The end of the stream came alone (a chunked body's last chunk,
            // an HTTP/2 END_STREAM in an empty frame).
            if rest.is_empty() {
                return Ok(first);
            }
            let mut whole = bytes::BytesMut::with_capacity(first.len() + rest.len());
            whole.extend_from_slice(&first);
            whole.extend_from_slice(&rest);
            Ok(whole.freeze())
        }
        (_, Err(error)) => Err(client_body_error(error.as_ref(), max_body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: Method, path: &str, content_types: &[&str]) -> Parts {
        let mut request = http::Request::builder().method(method).uri(path);
        for content_type in content_types {
            request = request.header(CONTENT_TYPE, *content_type);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_body_kind_comes_from_method_path_and_content_type() {
        let chat = "/v1/chat/completions";
        assert_eq!(kind(&parts(Method::POST, chat, &[])).unwrap(), Kind::Json);
        assert_eq!(kind(&parts(Method::POST, chat, &["application/x-www-form-urlencoded"])).unwrap(), Kind::Json);
        assert_eq!(
            kind(&parts(Method::POST, "/v1/files", &["multipart/form-data; boundary=x"])).unwrap(),
            Kind::Upload
        );
        assert_eq!(kind(&parts(Method::POST, "/v1/threads/t/runs", &["application/json"])).unwrap(), Kind::Json);
        assert_eq!(kind(&parts(Method::POST, "/v1/x", &["application/vnd.api+json"])).unwrap(), Kind::Json);
        assert_eq!(kind(&parts(Method::GET, "/v1/files", &[])).unwrap(), Kind::Other);
        for refused in
            [&["MULTIPART/form-data"][..], &["application/octet-stream"], &["application/json", "text/plain"]]
        {
            assert!(matches!(kind(&parts(Method::POST, chat, refused)), Err(ProxyError::UnsupportedMediaType(..))));
        }
    }
}
