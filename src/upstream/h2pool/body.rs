//! An answer's body from the HTTP/2 pool: the stream's data, each frame's
//! bytes given back to flow control as they are handed on, then trailers.
//! The stream's pool slot is released when the body ends or is dropped (a
//! body dropped early resets its stream).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http_body::{Body, Frame, SizeHint};

use super::Lease;

/// A response body read from an h2 stream.
pub struct H2Body {
    recv: RecvStream,
    /// The request side, kept so the stream is not reset before its answer ends.
    send: Option<SendStream<Bytes>>,
    /// Held until the body ends, so its slot counts as taken meanwhile;
    /// dropped last (fields drop in order), after h2 let go of the stream.
    lease: Option<Lease>,
    data_done: bool,
}

impl std::fmt::Debug for H2Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Body").field("ended", &self.lease.is_none()).finish()
    }
}

impl H2Body {
    pub(super) fn new(recv: RecvStream, lease: Lease, send: SendStream<Bytes>) -> Self {
        Self { recv, send: Some(send), lease: Some(lease), data_done: false }
    }

    fn finish(&mut self) {
        self.send = None;
        self.lease = None;
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.lease.is_none() {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(bytes)) => {
                    // Handed on: the peer may send as much again.
                    let _ = this.recv.flow_control().release_capacity(bytes.len());
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Some(Err(error)) => {
                    this.finish();
                    return Poll::Ready(Some(Err(error)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.finish();
        match trailers {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    /// True once the peer's END_STREAM has been read and handed on: a server
    /// that knows the length may stop polling at the last byte.
    fn is_end_stream(&self) -> bool {
        self.lease.is_none() || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
