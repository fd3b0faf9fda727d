//! The one end-of-response hook. Every request ends here exactly once: a
//! proxied answer when its body ends (or is dropped), an answer sluice made
//! when the handler returns it, a request whose client left before any answer
//! when its handler is dropped.

use crate::error::CLIENT_CLOSED;
use crate::telemetry::account::Finished;
use crate::telemetry::{CacheStatus, End, RequestContext};

/// Records a finished request: the client's usage and budget, metrics, the
/// request log.
pub fn finish(ctx: &RequestContext, end: End<'_>) {
    // A request its limits turned away reached nothing: no usage to count.
    let refused = matches!(end.error, Some("rate_limit_exceeded" | "insufficient_quota"));
    if let (Some(client), false) = (&ctx.client, refused) {
        client.finished(&Finished {
            model: ctx.model.as_ref().map(|m| &m.model),
            status: end.status,
            failed: end.status >= 400 || end.error.is_some(),
            tokens: end.tokens.or_else(|| estimate(ctx, &end)),
            cached: ctx.cache == Some(CacheStatus::Hit),
        });
    }
    ctx.telemetry().finish(ctx, end);
}

/// Tokens charged for an answer cut off before its usage arrived (the client
/// left, or the upstream broke): about 4 bytes a token of the request and of
/// what was streamed, so leaving a stream just before its usage event dodges
/// no budget. Only when the request went upstream.
fn estimate(ctx: &RequestContext, end: &End<'_>) -> Option<(u64, u64)> {
    const BYTES_PER_TOKEN: u64 = 4;
    let cut = end.error.is_some() && (end.status == 200 || end.status == CLIENT_CLOSED);
    (cut && ctx.attempts > 0).then_some((ctx.bytes_in / BYTES_PER_TOKEN, end.bytes_out / BYTES_PER_TOKEN))
}
