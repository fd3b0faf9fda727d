//! The one end-of-response hook. Every request ends here exactly once: a
//! proxied answer when its body ends (or is dropped), an answer sluice made
//! when the handler returns it, a request whose client left before any answer
//! when its handler is dropped.

use crate::telemetry::account::Finished;
use crate::telemetry::{CacheStatus, End, RequestContext};

/// Records a finished request: the client's usage and budget, metrics, the
/// request log.
pub fn finish(ctx: &RequestContext, end: End<'_>) {
    if let Some(client) = &ctx.client {
        client.finished(&Finished {
            model: ctx.model.as_ref().map(|m| &m.model),
            status: end.status,
            failed: end.status >= 400 || end.error.is_some(),
            tokens: end.tokens,
            cached: ctx.cache == Some(CacheStatus::Hit),
        });
    }
    ctx.telemetry.finish(ctx, end);
}
