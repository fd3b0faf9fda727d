//! The two body types that cross sluice: what it answers clients with
//! ([`SluiceBody`]) and what it sends upstream ([`ForwardBody`]).
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
