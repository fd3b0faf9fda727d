//! [`H1Body`]: a response body read from an upstream connection on the
//! request's own task, frame by frame as it arrives.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use super::framing::{Decoded, Framing};
use super::{Conn, H1Error, Pool};

/// The body of an HTTP/1.1 upstream response. When it ends cleanly its
/// connection returns to the pool; dropped early, the connection is closed,
/// which is how the upstream learns the client went away.
///
/// Chunks that arrived in the same read leave as one frame: the client gets
/// the same bytes, as soon as they came, with one chunk header instead of one
/// per event (a 20-event stream read at once cost 20 trips through every body
/// layer and a 60-part `writev`). A lone chunk is handed on without a copy.
#[derive(Debug)]
pub struct H1Body {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    pool: Arc<Pool>,
    /// An error found while gathering chunks, reported after the data before it.
    pending: Option<H1Error>,
}

impl H1Body {
    pub(super) fn new(conn: Conn, framing: Framing, keep_alive: bool, pool: Arc<Pool>) -> Self {
        let mut body = Self { conn: Some(conn), framing, keep_alive, pool, pending: None };
        if body.framing.is_done() {
            body.release();
        }
        body
    }

    /// Hands the connection back when the response left it clean.
    fn release(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && self.framing.reusable()
        {
            self.pool.put(conn);
        }
    }

    /// `first`, joined by every further piece already in the buffer.
    fn gather(&mut self, first: Bytes) -> Bytes {
        let Some(conn) = self.conn.as_mut() else { return first };
        let mut joined: Option<BytesMut> = None;
        loop {
            match self.framing.decode(&mut conn.buf) {
                Ok(Decoded::Data(more)) => {
                    let joined = joined.get_or_insert_with(|| {
                        let mut joined = BytesMut::with_capacity(first.len() + more.len() + conn.buf.len());
                        joined.extend_from_slice(&first);
                        joined
                    });
                    joined.extend_from_slice(&more);
                }
                Ok(Decoded::NeedMore | Decoded::End) => break,
                Err(error) => {
                    self.pending = Some(error);
                    break;
                }
            }
        }
        joined.map_or(first, BytesMut::freeze)
    }

    fn fail(&mut self, error: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        if let Some(error) = this.pending.take() {
            return this.fail(error);
        }
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match this.framing.decode(&mut conn.buf) {
                Err(error) => return this.fail(error),
                Ok(Decoded::Data(data)) => {
                    let data = this.gather(data);
                    if this.framing.is_done() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.framing == Framing::UntilClose => {
                    this.framing = Framing::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(H1Error::Closed),
                Ok(_) => {}
                Err(error) => return this.fail(error.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(left) => SizeHint::with_exact(left),
            Framing::Done => SizeHint::with_exact(0),
            Framing::Chunked(_) | Framing::UntilClose => SizeHint::default(),
        }
    }
}
