//! The bodies that cross to and from an upstream: what sluice sends
//! ([`ForwardBody`]) and what an upstream answers with ([`UpstreamBody`]).
//!
//! Both are small enums instead of boxed trait objects: no allocation per
//! request, and each variant says where its bytes come from.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::error::{BoxError, ProxyError};
use crate::upstream::h1::H1Body;
use crate::upstream::h2pool::H2Body;

/// A request body sent to an upstream. Every variant is `Unpin`.
pub enum ForwardBody {
    /// A body read (and maybe rewritten) by sluice: cheap to clone for a retry.
    Full {
        /// The bytes not yet sent.
        bytes: Option<Bytes>,
    },
    /// An upload sluice does not look at, streamed under the cap. It cannot
    /// be replayed, and if it fails, the [`UploadWatch`] says whether the
    /// client's side broke (its fault) or the upstream's.
    Upload {
        /// The client's body, cut off at `max_body`.
        inner: Limited<Incoming>,
        /// Where a failure of the client's side, or its end, is noted.
        watch: UploadWatch,
        /// The cap, for the 413 message.
        max_body: u64,
        /// Fires when the client sent nothing for [`UPLOAD_IDLE_TIMEOUT`].
        idle: Pin<Box<tokio::time::Sleep>>,
    },
}

/// Longest silence of a client inside a streamed upload.
pub const UPLOAD_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl ForwardBody {
    /// A body of exactly these bytes; an empty one sends no frame at all.
    pub fn full(bytes: Bytes) -> Self {
        Self::Full { bytes: (!bytes.is_empty()).then_some(bytes) }
    }

    /// The client's body, streamed under `max_body`, watched by `watch`.
    pub fn upload(body: Incoming, max_body: u64, watch: UploadWatch) -> Self {
        Self::Upload {
            inner: Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX)),
            watch,
            max_body,
            idle: Box::pin(tokio::time::sleep(UPLOAD_IDLE_TIMEOUT)),
        }
    }

    /// For an upload: its watch and cap, to tell the client's failures and
    /// slowness from the upstream's.
    pub fn upload_watch(&self) -> Option<(UploadWatch, u64)> {
        match self {
            Self::Full { .. } => None,
            Self::Upload { watch, max_body, .. } => Some((watch.clone(), *max_body)),
        }
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Upload { inner, watch, max_body, idle } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Err(error))) => watch.note(&client_body_error(error.as_ref(), *max_body)),
                    Poll::Ready(None) => watch.finished(),
                    Poll::Ready(Some(Ok(_))) => {
                        if inner.is_end_stream() {
                            watch.finished();
                        }
                        idle.as_mut().reset(tokio::time::Instant::now() + UPLOAD_IDLE_TIMEOUT);
                    }
                    Poll::Pending => {
                        if idle.as_mut().poll(cx).is_ready() {
                            let error = ProxyError::BodyTimeout(UPLOAD_IDLE_TIMEOUT.as_secs());
                            watch.note(&error);
                            return Poll::Ready(Some(Err(error.into())));
                        }
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full { bytes } => bytes.is_none(),
            Self::Upload { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full { bytes } => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Upload { inner, .. } => inner.size_hint(),
        }
    }
}

/// Notes how a streamed upload failed on the client's side, or that it was
/// sent whole, shared between the body (which sees it) and the retry loop
/// (which must not blame the upstream for the client's failure or
/// slowness). One byte, no lock.
#[derive(Debug, Clone, Default)]
pub struct UploadWatch(Arc<AtomicU8>);

const UPLOAD_OK: u8 = 0;
const UPLOAD_TOO_LARGE: u8 = 1;
const UPLOAD_GONE: u8 = 2;
const UPLOAD_MALFORMED: u8 = 3;
const UPLOAD_TIMEOUT: u8 = 4;
const UPLOAD_DONE: u8 = 5;

impl UploadWatch {
    fn note(&self, error: &ProxyError) {
        let code = match error {
            ProxyError::BodyTooLarge(_) => UPLOAD_TOO_LARGE,
            ProxyError::ClientGone => UPLOAD_GONE,
            ProxyError::BodyTimeout(_) => UPLOAD_TIMEOUT,
            _ => UPLOAD_MALFORMED,
        };
        self.0.store(code, Relaxed);
    }

    fn finished(&self) {
        let _ = self.0.compare_exchange(UPLOAD_OK, UPLOAD_DONE, Relaxed, Relaxed);
    }

    /// Whether the whole upload went out.
    pub fn is_finished(&self) -> bool {
        self.0.load(Relaxed) == UPLOAD_DONE
    }

    /// The client's failure, if its side of the upload broke.
    pub fn failure(&self, max_body: u64) -> Option<ProxyError> {
        match self.0.load(Relaxed) {
            UPLOAD_OK | UPLOAD_DONE => None,
            UPLOAD_TOO_LARGE => Some(ProxyError::BodyTooLarge(max_body)),
            UPLOAD_GONE => Some(ProxyError::ClientGone),
            UPLOAD_TIMEOUT => Some(ProxyError::BodyTimeout(UPLOAD_IDLE_TIMEOUT.as_secs())),
            _ => Some(ProxyError::BodyRead("the upload broke off or was malformed".into())),
        }
    }
}

/// What a failure to read a client's body means: over the cap (413), the
/// client gone (499), or a malformed body (400).
pub fn client_body_error(error: &(dyn StdError + 'static), max_body: u64) -> ProxyError {
    if error.is::<LengthLimitError>() {
        return ProxyError::BodyTooLarge(max_body);
    }
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(hyper) = error.downcast_ref::<hyper::Error>()
            && (hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_closed())
        {
            return ProxyError::ClientGone;
        }
        if let Some(h2) = error.downcast_ref::<h2::Error>()
            && (h2.is_reset() || h2.is_io() || h2.is_go_away())
        {
            return ProxyError::ClientGone;
        }
        if error.downcast_ref::<std::io::Error>().is_some() {
            return ProxyError::ClientGone;
        }
        cause = error.source();
    }
    ProxyError::BodyRead(error.to_string())
}

/// An upstream's response body, from whichever client carried the request.
/// Every variant is `Unpin`.
#[derive(Debug)]
pub enum UpstreamBody {
    /// From hyper-util's pooled client (TLS, HTTP/2, streamed uploads).
    Hyper {
        /// hyper's body.
        inner: Incoming,
    },
    /// From sluice's own HTTP/1.1 client, read on the request's task.
    H1 {
        /// The connection's body reader.
        inner: H1Body,
    },
    /// From sluice's HTTP/2 pool.
    H2 {
        /// The stream's body.
        inner: H2Body,
    },
    /// A failed attempt's answer, read whole so its connection and key were
    /// released before the retry loop waited; kept to answer with if no
    /// attempt does better.
    Buffered {
        /// The bytes not yet handed on.
        bytes: Option<Bytes>,
    },
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Hyper { inner } => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            Self::H1 { inner } => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            Self::H2 { inner } => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            Self::Buffered { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper { inner } => inner.is_end_stream(),
            Self::H1 { inner } => inner.is_end_stream(),
            Self::H2 { inner } => inner.is_end_stream(),
            Self::Buffered { bytes } => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper { inner } => inner.size_hint(),
            Self::H1 { inner } => inner.size_hint(),
            Self::H2 { inner } => inner.size_hint(),
            Self::Buffered { bytes } => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
