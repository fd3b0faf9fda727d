//! The mock's paced SSE answer: `chunks` content events, a finish event, an
//! optional usage event, then `[DONE]`; a gap between events; an optional
//! deliberate break; and a count of receivers that went away early.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::time::Sleep;

use super::stats::MockStats;
use crate::error::BoxError;

/// One streaming chat answer.
pub struct SseStream {
    stats: Arc<MockStats>,
    id: u64,
    model: String,
    chunks: u32,
    include_usage: bool,
    prompt_tokens: u64,
    gap: Duration,
    drop_after: Option<u32>,
    next: u32,
    sleep: Option<Pin<Box<Sleep>>>,
    ended: bool,
}

impl SseStream {
    /// A stream; counts itself as started.
    #[expect(clippy::too_many_arguments, reason = "a plain constructor for the mock's knobs")]
    pub fn new(
        stats: Arc<MockStats>,
        id: u64,
        model: String,
        chunks: u32,
        include_usage: bool,
        prompt_tokens: u64,
        gap: Duration,
        drop_after: Option<u32>,
    ) -> Self {
        stats.streams_started.fetch_add(1, Ordering::Relaxed);
        Self {
            stats,
            id,
            model,
            chunks,
            include_usage,
            prompt_tokens,
            gap,
            drop_after,
            next: 0,
            sleep: None,
            ended: false,
        }
    }

    fn total(&self) -> u32 {
        self.chunks + 2 + u32::from(self.include_usage)
    }

    fn event(&self, index: u32) -> Bytes {
        let (id, model) = (self.id, &self.model);
        let text = if index < self.chunks {
            format!(
                r#"data: {{"id":"chatcmpl-mock-{id}","object":"chat.completion.chunk","created":0,"model":"{model}","choices":[{{"index":0,"delta":{{"content":"tok{index} "}},"finish_reason":null}}]}}"#
            )
        } else if index == self.chunks {
            format!(
                r#"data: {{"id":"chatcmpl-mock-{id}","object":"chat.completion.chunk","created":0,"model":"{model}","choices":[{{"index":0,"delta":{{}},"finish_reason":"stop"}}]}}"#
            )
        } else if self.include_usage && index == self.chunks + 1 {
            let (p, c) = (self.prompt_tokens, u64::from(self.chunks));
            format!(
                r#"data: {{"id":"chatcmpl-mock-{id}","object":"chat.completion.chunk","created":0,"model":"{model}","choices":[],"usage":{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{}}}}}"#,
                p + c
            )
        } else {
            "data: [DONE]".to_string()
        };
        Bytes::from(text + "\n\n")
    }
}

impl Body for SseStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended || this.next >= this.total() {
            return Poll::Ready(None);
        }
        if this.next > 0 && !this.gap.is_zero() {
            let gap = this.gap;
            let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
            ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
        }
        if this.drop_after == Some(this.next) && this.next < this.chunks {
            this.ended = true;
            this.stats.streams_dropped.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Some(Err("mock: stream broken on purpose".into())));
        }
        let event = this.event(this.next);
        this.next += 1;
        if this.next == this.total() {
            this.ended = true;
            this.stats.streams_finished.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(Some(Ok(Frame::data(event))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

impl Drop for SseStream {
    fn drop(&mut self) {
        if !self.ended {
            self.stats.streams_cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}
