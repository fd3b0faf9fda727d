//! The respond stage: an upstream answer wrapped for the client. Hop-by-hop
//! headers are stripped, the request id added, and the body metered and
//! passed through frame by frame.

use std::sync::Arc;

use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Response, StatusCode, Version};

use crate::cache::Fill;
use crate::proxy::body::{Meter, MeteredBody, SluiceBody, Timing};
use crate::proxy::headers;
use crate::telemetry::RequestContext;
use crate::upstream::Upstream;
use crate::upstream::body::UpstreamBody;
use crate::upstream::keyring::KeyLease;

/// Microseconds sluice spent on a request, upstream waits excluded (opt-in).
pub const OVERHEAD_HEADER: HeaderName = HeaderName::from_static("x-sluice-overhead-us");

/// Wraps an upstream answer that came on `key` for the client; `lease` keeps
/// the key counted in flight until the body ends. With `fill`, a 200 answer
/// is recorded for the response cache as it passes.
pub fn respond(
    response: Response<UpstreamBody>,
    key: Option<Arc<str>>,
    lease: Option<KeyLease>,
    upstream: &Upstream,
    stream: bool,
    fill: Option<Fill>,
    ctx: &RequestContext,
) -> Response<SluiceBody> {
    let (mut parts, incoming) = response.into_parts();
    headers::to_client(&mut parts.headers, &ctx.request_id);
    // The client connection has its own version; hyper picks the wire format.
    parts.version = Version::HTTP_11;
    let sse = parts.headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if sse {
        // A stream may end with sluice's own error event: no fixed length can hold.
        parts.headers.remove(CONTENT_LENGTH);
    }
    let overhead = ctx.started.elapsed().saturating_sub(ctx.upstream_wait);
    ctx.telemetry().metrics.overhead.observe(overhead);
    if ctx.overhead_header {
        parts.headers.insert(OVERHEAD_HEADER, HeaderValue::from(overhead.as_micros() as u64));
    }
    let timing = if sse || stream {
        Timing::Idle(upstream.timeouts.idle)
    } else {
        Timing::Deadline(ctx.started + upstream.timeouts.total)
    };
    let mut meter = Meter::new(ctx.clone(), key, lease, parts.status.as_u16(), sse);
    if let (Some(fill), StatusCode::OK) = (fill, parts.status) {
        // Copied, not cloned: a header value may be a slice of the read
        // buffer its head was parsed from, and an entry must not keep that
        // whole buffer alive for its TTL.
        let header = |name| parts.headers.get(name).and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
        meter = meter.record(fill.record(header(CONTENT_TYPE), header(CONTENT_ENCODING), sse));
    }
    Response::from_parts(
        parts,
        SluiceBody::Upstream { inner: Box::new(MeteredBody::new(incoming, sse, timing, meter)) },
    )
}
