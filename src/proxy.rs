//! The request stages of a proxied request, in the order they run:
//! [`read`] the body once under the cap ([`receive`]), a hot request's cache
//! shortcut ([`cached::shortcut`]), [`plan`] where it goes (sniff `model`
//! and `stream`, route, rewrite only when a field must change, decide whether a
//! re-send would be safe), [`retry`] the one loop that sends it, and [`respond`]
//! with the upstream's answer passed through by [`body::MeteredBody`]. Every
//! answer ends in [`end::finish`], the one end-of-response hook.

pub mod body;
pub mod cached;
pub mod end;
pub mod headers;
pub mod plan;
pub mod read;
pub mod respond;
pub mod retry;
pub mod sniff;

use http::{HeaderMap, Method, Request, Uri};
use hyper::body::Incoming;

use crate::access::table::Client;
use crate::cache::Fill;
use crate::error::ProxyError;
use crate::state::Live;
use crate::telemetry::RequestContext;
use crate::upstream::body::ForwardBody;
use plan::Plan;

/// Paths whose body must be a JSON object that names (or defaults) a model.
pub const MODEL_ENDPOINTS: [&str; 4] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"];

/// Whether `path` is one of the endpoints that always carry a model.
pub fn is_model_endpoint(path: &str) -> bool {
    MODEL_ENDPOINTS.contains(&path)
}

/// A request read and planned, ready for the retry loop.
pub struct Prepared {
    /// Where it goes and what is sent.
    pub plan: Plan,
    /// The client's method.
    pub method: Method,
    /// The client's URI (path and query are mapped onto the upstream's base URL).
    pub uri: Uri,
    /// The client's headers, cleaned on the way up by [`headers::to_upstream`].
    pub headers: HeaderMap,
    /// Where a 200 answer is stored, when the cache stage said so.
    pub fill: Option<Fill>,
}

/// A `/v1/*` request whose body stage is done: its head, and its body as read.
pub struct Received {
    /// Method, URI and headers.
    pub parts: http::request::Parts,
    /// The body: read whole, or an upload to stream through.
    pub read: read::Read,
}

/// The body stage of one `/v1/*` request.
pub async fn receive(
    live: &Live,
    request: Request<Incoming>,
    ctx: &mut RequestContext,
) -> Result<Received, ProxyError> {
    let (parts, body) = request.into_parts();
    let max_body = live.config.server.max_body;
    let read = match read::plan(&parts, body, max_body)? {
        read::Plan::Done(read) => read,
        read::Plan::ReadWhole(body, json) => {
            let bytes = read::read_whole(body, max_body).await?;
            if json { read::Read::Json(bytes) } else { read::Read::Whole(bytes) }
        }
    };
    if let read::Read::Json(bytes) | read::Read::Whole(bytes) = &read {
        ctx.bytes_in = bytes.len() as u64;
        ctx.body_unread = false;
    }
    Ok(Received { parts, read })
}

/// The plan stage of one received `/v1/*` request.
pub fn prepare(
    live: &Live,
    received: Received,
    client: Option<&Client>,
    ctx: &mut RequestContext,
) -> Result<Prepared, ProxyError> {
    let Received { parts, read } = received;
    let allowed = client.map(|c| &c.allowed);
    let plan = match read {
        read::Read::Json(bytes) => {
            let plan = plan::plan_json(live, &parts.method, parts.uri.path(), bytes, client)?;
            ctx.stream = plan.stream;
            ctx.model = plan.model.clone();
            ctx.max_tokens_capped = plan.capped;
            plan
        }
        read::Read::Whole(bytes) => plan::plan_opaque(live, &parts.method, ForwardBody::full(bytes), allowed)?,
        read::Read::Upload(body) => plan::plan_opaque(live, &parts.method, body, allowed)?,
    };
    Ok(Prepared { plan, method: parts.method, uri: parts.uri, headers: parts.headers, fill: None })
}

/// Adds the client's address to `X-Forwarded-For` and `Forwarded` (kept from
/// the client only behind `[server] trusted_proxies`). Done once the request
/// is known to go upstream: an answer from the cache needs neither.
pub fn mark_forwarded(live: &Live, prepared: &mut Prepared, ctx: &RequestContext) {
    if let Some(watch) = &ctx.watch {
        let peer = watch.conn.peer.ip();
        let trusted = live.config.server.trusted_proxies.iter().any(|block| block.contains(peer));
        let own = watch.forwarded.get_or_init(|| headers::forwarded_values(peer));
        headers::forwarded(&mut prepared.headers, own, trusted);
    }
}
