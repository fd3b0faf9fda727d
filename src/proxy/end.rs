//! The one end-of-response hook. Every request ends here exactly once: a
//! proxied answer when its body ends (or is dropped), an answer sluice made
//! when the handler returns it, a request whose client left before any answer
//! when its handler is dropped.

use crate::telemetry::{End, RequestContext};

/// Records a finished request: metrics, request log.
pub fn finish(ctx: &RequestContext, end: End<'_>) {
    ctx.telemetry.finish(ctx, end);
}
