//! The body types that cross sluice: what it answers clients with
//! ([`SluiceBody`]), what it sends upstream ([`ForwardBody`]) and what an
//! upstream answers with ([`UpstreamBody`]).
//!
//! Both are small enums instead of boxed trait objects: no allocation per
//! request, and each variant says where its bytes come from.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;

use crate::proxy::body::MeteredBody;
use crate::proxy::h1::H1Body;

/// Error type of sluice's bodies: hyper wants something convertible into a boxed error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body sent to a client. Every variant is `Unpin`, so no pin projection.
#[expect(
    clippy::large_enum_variant,
    reason = "moved into hyper once per response; boxing the metered body would cost an allocation per request"
)]
pub enum SluiceBody {
    /// A complete body made by sluice (errors, health, model lists).
    Full {
        /// The bytes not yet sent.
        bytes: Option<Bytes>,
    },
    /// The upstream's own body, passed through frame by frame.
    Upstream {
        /// The metered upstream body.
        inner: MeteredBody,
    },
}

impl SluiceBody {
    /// A body of exactly these bytes.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes: Bytes = bytes.into();
        Self::Full { bytes: (!bytes.is_empty()).then_some(bytes) }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::Full { bytes: None }
    }
}

impl Body for SluiceBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Upstream { inner } => Pin::new(inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full { bytes } => bytes.is_none(),
            Self::Upstream { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full { bytes } => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Upstream { inner } => inner.size_hint(),
        }
    }
}

/// A request body sent to an upstream. Every variant is `Unpin`.
pub enum ForwardBody {
    /// A body read (and maybe rewritten) by sluice: cheap to clone for a retry.
    Full {
        /// The bytes not yet sent.
        bytes: Option<Bytes>,
    },
    /// A body sluice does not look at (uploads, unknown types), streamed under the cap.
    Stream {
        /// The client's body, cut off at `max_body`.
        inner: Limited<Incoming>,
    },
}

impl ForwardBody {
    /// A body of exactly these bytes; an empty one sends no frame at all.
    pub fn full(bytes: Bytes) -> Self {
        Self::Full { bytes: (!bytes.is_empty()).then_some(bytes) }
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Stream { inner } => Pin::new(inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full { bytes } => bytes.is_none(),
            Self::Stream { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full { bytes } => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Stream { inner } => inner.size_hint(),
        }
    }
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
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Hyper { inner } => Pin::new(inner).poll_frame(cx).map_err(Into::into),
            Self::H1 { inner } => Pin::new(inner).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper { inner } => inner.is_end_stream(),
            Self::H1 { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper { inner } => inner.size_hint(),
            Self::H1 { inner } => inner.size_hint(),
        }
    }
}
