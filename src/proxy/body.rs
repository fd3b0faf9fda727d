//! The body sluice answers clients with ([`SluiceBody`]) and [`MeteredBody`]:
//! the upstream response body passed to the client frame by frame, counting
//! bytes and noting how it ended. It never buffers or re-parses: each upstream
//! frame is handed on as it arrives (sluice's HTTP/1.1 client joins the chunks
//! that arrived in one read into one frame; nothing waits for more).
//!
//! If the upstream breaks mid-stream, an SSE response gets one final error event
//! and then an error, so hyper ends the client's response abnormally (no chunked
//! terminator on HTTP/1.1, `RST_STREAM` on HTTP/2) and no client can take the
//! answer for complete.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::cache::{Entry, Recorder};
use crate::error::{BoxError, error_json};
use crate::proxy::end;
use crate::telemetry::usage::find_usage_in;
use crate::telemetry::{End, RequestContext};
use crate::upstream::body::UpstreamBody;
use crate::upstream::keyring::KeyLease;

/// A response body sent to a client. Every variant is `Unpin`.
///
/// The metered body is boxed: inline it made every response 880 bytes, and a
/// response is moved a dozen times on its way out of the handler into hyper
/// (each a memcpy call, cache hits and errors too); one allocation per
/// forwarded answer costs less than those copies.
pub enum SluiceBody {
    /// A complete body made by sluice (errors, health, model lists).
    Full {
        /// The bytes not yet sent.
        bytes: Option<Bytes>,
    },
    /// The upstream's own body, passed through frame by frame.
    Upstream {
        /// The metered upstream body.
        inner: Box<MeteredBody>,
    },
    /// A cached answer, replayed frame by frame as the upstream sent it.
    Replay {
        /// The entry.
        entry: Arc<Entry>,
        /// The next frame to send.
        next: usize,
    },
}

impl From<Bytes> for SluiceBody {
    fn from(bytes: Bytes) -> Self {
        Self::Full { bytes: (!bytes.is_empty()).then_some(bytes) }
    }
}

impl SluiceBody {
    /// A body of exactly these bytes.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::from(bytes.into())
    }
}

impl Body for SluiceBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Upstream { inner } => Pin::new(inner).poll_frame(cx),
            Self::Replay { entry, next } => {
                let frame = entry.frame(*next);
                *next += 1;
                Poll::Ready(frame.map(|b| Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full { bytes } => bytes.is_none(),
            Self::Upstream { inner } => inner.is_end_stream(),
            Self::Replay { entry, next } => entry.frame(*next).is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full { bytes } => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Upstream { inner } => inner.size_hint(),
            // A stream goes out chunked, as the upstream's did; a JSON answer
            // with its length.
            Self::Replay { entry, .. } if entry.sse => SizeHint::default(),
            Self::Replay { entry, .. } => SizeHint::with_exact(entry.len() as u64),
        }
    }
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still streaming (only seen if dropped: the client went away).
    Open,
    /// The upstream body ended cleanly.
    Complete,
    /// The upstream failed (or went silent) mid-body.
    UpstreamError,
}

/// Per-request bookkeeping that is recorded once, when the body ends or is dropped.
pub struct Meter {
    ctx: RequestContext,
    /// The key that answered, for the request log.
    key: Option<Arc<str>>,
    /// The key in use; dropping it ends its in-flight count. `None` when the
    /// answer was read whole before it was passed on (a failed attempt's).
    lease: Option<KeyLease>,
    status: u16,
    sse: bool,
    bytes: u64,
    outcome: Outcome,
    /// The last two data frames (shared, not copied): where `usage` is found.
    tail: [Option<Bytes>; 2],
    /// A frame went to hyper and hyper has not asked for the next one yet:
    /// the client has not taken it (see `ConnWatch`).
    unread: bool,
    /// Keeps the answer for the response cache (a cacheable miss only).
    recorder: Option<Box<Recorder>>,
}

impl Meter {
    /// Starts metering an answer that came on `key` (leased while it streams);
    /// counts an SSE stream as open.
    pub fn new(ctx: RequestContext, key: Option<Arc<str>>, lease: Option<KeyLease>, status: u16, sse: bool) -> Self {
        if sse {
            ctx.telemetry().metrics.streams_open.fetch_add(1, Relaxed);
        }
        Self {
            ctx,
            key,
            lease,
            status,
            sse,
            bytes: 0,
            outcome: Outcome::Open,
            tail: [None, None],
            unread: false,
            recorder: None,
        }
    }

    /// Records the answer for the response cache as it passes.
    pub fn record(mut self, recorder: Recorder) -> Self {
        self.recorder = Some(Box::new(recorder));
        self
    }

    /// A frame goes to hyper, to be written to the client.
    fn handed(&mut self) {
        if let Some(watch) = &self.ctx.watch {
            watch.handed();
            self.unread = true;
        }
    }

    /// hyper asks for more: the client took what it was handed.
    fn client_took(&mut self) {
        if std::mem::take(&mut self.unread)
            && let Some(watch) = &self.ctx.watch
        {
            watch.taken();
        }
    }

    fn saw(&mut self, data: &Bytes) {
        if let Some(recorder) = &mut self.recorder {
            recorder.saw(data);
        }
        self.bytes += data.len() as u64;
        if !data.is_empty() {
            self.tail = [self.tail[1].take(), Some(data.clone())];
        }
    }

    fn usage(&self) -> Option<(u64, u64)> {
        if self.status != 200 || self.outcome != Outcome::Complete {
            return None;
        }
        match &self.tail {
            [earlier, Some(last)] => find_usage_in(earlier.as_deref().unwrap_or_default(), last),
            _ => None,
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.client_took();
        let telemetry = self.ctx.telemetry();
        if self.sse {
            telemetry.metrics.streams_open.fetch_sub(1, Relaxed);
        }
        let error = match self.outcome {
            Outcome::Open => Some("client_cancelled"),
            Outcome::Complete => None,
            Outcome::UpstreamError => Some("upstream_stream_error"),
        };
        let key = self.key.as_ref();
        tracing::debug!(
            request_id = self.ctx.request_id.to_str().unwrap_or("-"),
            key = key.map_or("-", |k| &**k),
            status = self.status,
            bytes = self.bytes,
            outcome = error.unwrap_or("complete"),
            "response finished"
        );
        let tokens = self.usage();
        // Only a whole 200 answer is stored; anything else drops the
        // recording (and sends a single flight's followers upstream).
        if let (Some(recorder), 200, Outcome::Complete) = (self.recorder.take(), self.status, self.outcome) {
            recorder.finish(tokens);
        }
        let end = End { status: self.status, bytes_out: self.bytes, key, tokens, error };
        end::finish(&self.ctx, end);
        // The key's in-flight count ends with the answer.
        drop(self.lease.take());
    }
}

/// How long the SSE error event gets to reach the wire before the stream is
/// aborted. Both transports drop what is still queued when the body errors
/// (HTTP/1.1 closes without flushing, an h2 reset clears the stream's send
/// queue), so the error is held back briefly. Only the failure path waits.
pub const ERROR_EVENT_FLUSH: Duration = Duration::from_millis(100);

enum State {
    Streaming,
    /// The SSE error event went out; the error itself follows once the timer fires.
    Failing(Option<BoxError>, Pin<Box<Sleep>>),
    Done,
}

/// Which timer guards a response body.
#[derive(Debug, Clone, Copy)]
pub enum Timing {
    /// Streams: the longest silence between two frames (`idle_timeout`).
    Idle(Duration),
    /// Everything else: the whole exchange ends by this instant (`total_timeout`).
    Deadline(Instant),
}

pin_project_lite::pin_project! {
    /// The upstream body, metered, passed through frame by frame.
    pub struct MeteredBody {
        #[pin]
        inner: UpstreamBody,
        sse: bool,
        // The last two bytes sent, to know whether an SSE event was cut mid-way.
        tail: [u8; 2],
        state: State,
        timing: Timing,
        // One timer per response. For `Timing::Idle` it is re-armed lazily: the
        // silence is timed from the first `Pending` after data, and the timer is
        // only moved when it fires early (resetting it per frame cost a clock read
        // and a timer-wheel update for every SSE event).
        timer: Pin<Box<Sleep>>,
        // When the upstream last went quiet, and whether data came since.
        quiet_since: Instant,
        fresh: bool,
        meter: Meter,
    }
}

impl MeteredBody {
    /// Wraps an upstream body. `sse` marks a `text/event-stream` response.
    pub fn new(inner: UpstreamBody, sse: bool, timing: Timing, meter: Meter) -> Self {
        let now = Instant::now();
        let deadline = match timing {
            Timing::Idle(idle) => now + idle,
            Timing::Deadline(at) => at,
        };
        Self {
            inner,
            sse,
            tail: *b"\n\n",
            state: State::Streaming,
            timing,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            quiet_since: now,
            fresh: false,
            meter,
        }
    }
}

/// The event a client sees when the upstream stream breaks; starts with a blank
/// line when the upstream was cut inside an event, so the error event stands alone.
fn error_event(reason: &str, at_boundary: bool) -> Bytes {
    let json =
        error_json(&format!("upstream stream interrupted: {reason}"), "upstream_error", None, "upstream_stream_error");
    let prefix: &[u8] = if at_boundary { b"" } else { b"\n\n" };
    let mut event = Vec::with_capacity(prefix.len() + json.len() + 8);
    event.extend_from_slice(prefix);
    event.extend_from_slice(b"data: ");
    event.extend_from_slice(&json);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        this.meter.client_took();
        match this.state {
            State::Done => return Poll::Ready(None),
            State::Failing(error, flush) => {
                ready!(flush.as_mut().poll(cx));
                let error = error.take().unwrap_or_else(|| "upstream stream interrupted".into());
                *this.state = State::Done;
                return Poll::Ready(Some(Err(error)));
            }
            State::Streaming => {}
        }
        let (reason, error): (String, BoxError) = match this.inner.as_mut().poll_frame(cx) {
            Poll::Pending => {
                if let Timing::Idle(idle) = *this.timing {
                    if std::mem::take(this.fresh) {
                        *this.quiet_since = Instant::now();
                    }
                    loop {
                        ready!(this.timer.as_mut().poll(cx));
                        let deadline = *this.quiet_since + idle;
                        if deadline <= Instant::now() {
                            break;
                        }
                        this.timer.as_mut().reset(deadline);
                    }
                } else {
                    ready!(this.timer.as_mut().poll(cx));
                }
                let reason = match this.timing {
                    Timing::Idle(idle) => {
                        format!("no data from the upstream for {} ms (idle_timeout)", idle.as_millis())
                    }
                    Timing::Deadline(_) => "the exchange took longer than total_timeout".to_string(),
                };
                (reason.clone(), reason.into())
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.meter.saw(data);
                    match data.len() {
                        0 => {}
                        1 => *this.tail = [this.tail[1], data[0]],
                        n => *this.tail = [data[n - 2], data[n - 1]],
                    }
                }
                *this.fresh = true;
                // hyper may stop polling once the body says it has ended, so note the
                // clean end here rather than waiting for a `None` that may never be asked for.
                if this.inner.is_end_stream() {
                    this.meter.outcome = Outcome::Complete;
                    *this.state = State::Done;
                } else {
                    this.meter.handed();
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(error))) => (error.to_string(), error),
            Poll::Ready(None) => {
                this.meter.outcome = Outcome::Complete;
                *this.state = State::Done;
                return Poll::Ready(None);
            }
        };
        this.meter.outcome = Outcome::UpstreamError;
        tracing::warn!(
            request_id = this.meter.ctx.request_id.to_str().unwrap_or("-"),
            upstream = this.meter.ctx.upstream.as_deref().unwrap_or("-"),
            bytes_sent = this.meter.bytes,
            %reason,
            "upstream body failed mid-stream; ending the client response abnormally"
        );
        if *this.sse {
            let event = error_event(&reason, this.tail == b"\n\n");
            *this.state = State::Failing(Some(error), Box::pin(tokio::time::sleep(ERROR_EVENT_FLUSH)));
            Poll::Ready(Some(Ok(Frame::data(event))))
        } else {
            *this.state = State::Done;
            Poll::Ready(Some(Err(error)))
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done) || (matches!(self.state, State::Streaming) && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Streaming => self.inner.size_hint(),
            State::Failing(..) | State::Done => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_event_is_one_sse_event() {
        let event = error_event("reset", true);
        let text = std::str::from_utf8(&event).unwrap();
        assert!(text.starts_with("data: {\"error\":"));
        assert!(text.ends_with("\n\n"));
        let json: serde_json::Value = serde_json::from_str(text.trim_start_matches("data: ").trim()).unwrap();
        assert_eq!(json["error"]["type"], "upstream_error");
        assert!(error_event("reset", false).starts_with(b"\n\ndata: "));
    }
}
