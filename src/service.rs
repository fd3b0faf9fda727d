//! The hyper service and the request pipeline. [`handle`] is the only place
//! that turns an error into a response, logs it and records it; the stages
//! below it just use `?`.
//!
//! A proxied request runs: authenticate + admit (the client's key, its
//! limits) -> read -> a hot request's cache shortcut -> plan (and whether
//! the key may use the model) -> cache (answer from it, or arrange to fill
//! it) -> send -> decorate.
//! Every request, answered or abandoned, is recorded once by
//! [`proxy::end::finish`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::header::{CONNECTION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;

use crate::access::limits::openai_duration;
use crate::access::table::{Allowed, Client};
use crate::admin;
use crate::cluster::Cluster;
use crate::cluster::limits::SharedVerdict;
use crate::config::OnRedisError;
use crate::error::{CLIENT_ADDRESS, CLIENT_CLOSED, ProxyError, json_response, printable};
use crate::ids::REQUEST_ID;
use crate::proxy::body::SluiceBody;
use crate::proxy::cached::{self, CACHE_STATUS, Found, Step};
use crate::proxy::plan::INFERENCE_PATHS;
use crate::proxy::{self, end, retry};
use crate::state::{Live, Shared};
use crate::telemetry::account::RateHeaders;
use crate::telemetry::{ConnWatch, End, RequestContext};

/// The gateway as a hyper service for one connection; cheap to clone.
#[derive(Clone)]
pub struct Gateway(Arc<Connection>);

/// What a connection's requests share. Each request takes a reference to
/// this, counted by the connection's own thread (its event loop's; an
/// HTTP/2 connection's streams on the workers may run on other workers),
/// rather than to the process's state, whose count every core writes to.
struct Connection {
    shared: Arc<Shared>,
    watch: Arc<ConnWatch>,
}

impl Gateway {
    /// The service for the connection `watch` watches (and knows the facts of).
    pub fn new(shared: Arc<Shared>, watch: Arc<ConnWatch>) -> Self {
        Self(Arc::new(Connection { shared, watch }))
    }
}

impl hyper::service::Service<Request<Incoming>> for Gateway {
    type Response = Response<SluiceBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let conn = Arc::clone(&self.0);
        Box::pin(async move { Ok(handle(&conn.shared, request, Some(Arc::clone(&conn.watch))).await) })
    }
}

/// Answers one request; never fails. A proxied answer is recorded when its
/// body ends (by the metered body); everything else is recorded here,
/// including a request whose client left first (hyper then drops this future
/// mid-way).
pub async fn handle(
    shared: &Shared,
    request: Request<Incoming>,
    watch: Option<Arc<ConnWatch>>,
) -> Response<SluiceBody> {
    let mut ctx = RequestContext::new(Arc::clone(&shared.telemetry), &request, watch);
    ctx.body_unread = request.version() < Version::HTTP_2 && !request.body().is_end_stream();
    let mut pending = Unanswered { ctx, armed: true };
    let ctx = &mut pending.ctx;
    let (mut response, error) = match handle_inner(shared, request, ctx).await {
        Ok(response) => (response, None),
        Err(error) => {
            log_refusal(ctx, &error);
            if let Some(reason) = error.rejection() {
                shared.telemetry.metrics.rejections.count(reason);
            }
            let kind = error.kind();
            let mut response = error.into_response();
            if ctx.body_unread {
                // hyper closes a connection whose request it did not read
                // to the end: said, so the client does not send its next
                // request into a closing socket.
                response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
            }
            (response, Some(kind))
        }
    };
    pending.armed = false;
    let ctx = &pending.ctx;
    decorate(&mut response, ctx);
    let bytes_out = match response.body() {
        SluiceBody::Upstream { .. } => None,
        SluiceBody::Replay { entry, .. } => Some(entry.len() as u64),
        body @ SluiceBody::Full { .. } => Some(body.size_hint().exact().unwrap_or(0)),
    };
    if let Some(bytes_out) = bytes_out {
        let (status, tokens) = (response.status().as_u16(), ctx.cached_tokens);
        end::finish(ctx, End { status, bytes_out, error, tokens, ..End::default() });
    }
    response
}

/// The decorate stage: what every answer carries.
fn decorate(response: &mut Response<SluiceBody>, ctx: &RequestContext) {
    let headers = response.headers_mut();
    // A copy, not a clone: the id's bytes are one allocation of their own,
    // which a clone would promote to a shared one (a second allocation and
    // two atomic counts) only to drop both a moment later.
    headers.insert(REQUEST_ID, crate::ids::copy(&ctx.request_id));
    if ctx.attempts > 1 {
        let (name, value) = retry::no_more_retries();
        headers.insert(name, value);
    }
    if ctx.tenant {
        // The upstream's own limits are the shared account's, not the tenant's.
        for name in UPSTREAM_RATE_HEADERS {
            headers.remove(name);
        }
    }
    if let Some(rate) = &ctx.rate {
        rate_headers(headers, rate);
    }
    if let Some(cache) = ctx.cache {
        headers.insert(CACHE_STATUS, HeaderValue::from_static(cache.label()));
    }
    // Where it went: the upstream and the model name sent there.
    if let Some(upstream) = &ctx.upstream_header {
        headers.insert(SLUICE_UPSTREAM, upstream.clone());
    }
    if let Some(model) = &ctx.upstream_model {
        headers.insert(SLUICE_MODEL, model.clone());
    }
    if let Some(cap) = ctx.max_tokens_capped {
        headers.insert(SLUICE_MAX_TOKENS_CAPPED, HeaderValue::from(cap));
    }
}

/// The upstream that answered (or was tried last).
const SLUICE_UPSTREAM: http::HeaderName = http::HeaderName::from_static("x-sluice-upstream");
/// The model's `max_tokens_cap`, when the request asked for more and was lowered to it.
const SLUICE_MAX_TOKENS_CAPPED: http::HeaderName = http::HeaderName::from_static("x-sluice-max-tokens-capped");
/// The model name sent to it.
const SLUICE_MODEL: http::HeaderName = http::HeaderName::from_static("x-sluice-model");

/// The rate-limit headers an OpenAI-style upstream sends about its account.
const UPSTREAM_RATE_HEADERS: [&str; 6] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

/// OpenAI's `x-ratelimit-*` headers for a limited key's answer.
fn rate_headers(headers: &mut http::HeaderMap, rate: &RateHeaders) {
    use http::HeaderName;
    const REQUESTS: [HeaderName; 3] = [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ];
    const TOKENS: [HeaderName; 3] = [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ];
    let reset = |d| HeaderValue::from_str(&openai_duration(d)).unwrap_or(HeaderValue::from_static("0s"));
    if let Some((limit, remaining, reset_in)) = rate.requests {
        let [l, r, t] = REQUESTS;
        headers.insert(l, HeaderValue::from(limit));
        headers.insert(r, HeaderValue::from(remaining));
        headers.insert(t, reset(reset_in));
    }
    if let Some((limit, remaining, reset_in)) = rate.tokens {
        let [l, r, t] = TOKENS;
        headers.insert(l, HeaderValue::from(limit));
        headers.insert(r, HeaderValue::from(remaining));
        headers.insert(t, reset(reset_in));
    }
}

fn log_refusal(ctx: &RequestContext, error: &ProxyError) {
    let (status, kind) = (error.status(), error.kind());
    // Only the path: a query may carry `api_key`.
    let (method, path, attempts) = (&ctx.method, &*ctx.path, ctx.attempts);
    // The message may quote the client (a model name): never raw control characters.
    // A fast refusal while a breaker is open or Redis is down (`on_error =
    // "deny"`): each said so once, at WARN, when it happened; a WARN line per
    // refused request would flood the log under load.
    let breaker_open = matches!(error, ProxyError::UpstreamUnavailable { .. } | ProxyError::LimitsUnavailable);
    let error = printable(&error.to_string()).into_owned();
    if status.is_server_error() && !breaker_open {
        tracing::warn!(request_id = ctx.request_id.to_str().unwrap_or("-"), %method, path, attempts, status = status.as_u16(), kind, %error, "request failed");
    } else {
        tracing::info!(request_id = ctx.request_id.to_str().unwrap_or("-"), %method, path, status = status.as_u16(), kind, %error, "request refused");
    }
}

/// A request on its way through [`handle`]. If hyper drops the handler before
/// it returns (the client closed the connection or reset the stream), the
/// request is still counted and logged, as `499` / `client_cancelled`.
struct Unanswered {
    ctx: RequestContext,
    /// Cleared once the handler returned an answer.
    armed: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let ctx = &self.ctx;
        tracing::info!(request_id = ctx.request_id.to_str().unwrap_or("-"), method = %ctx.method, path = &*ctx.path, attempts = ctx.attempts, "client left before the answer");
        end::finish(ctx, End { status: CLIENT_CLOSED, error: Some("client_cancelled"), ..End::default() });
    }
}

/// Routes by `(method, path)`; errors bubble up to [`handle`].
async fn handle_inner(
    shared: &Shared,
    request: Request<Incoming>,
    ctx: &mut RequestContext,
) -> Result<Response<SluiceBody>, ProxyError> {
    // One snapshot per request, kept until it is answered: arc-swap's guard
    // (a debt slot of the thread's own) rather than a clone of the `Arc`,
    // whose count every core writes to. A proxied request trades it for the
    // clone once it may wait long (see `forward`).
    let live = shared.live.load();
    ctx.overhead_header = live.config.server.overhead_header;
    check_path(request.uri().path())?;
    let request = seed_alias(request, ctx)?;
    let path = request.uri().path();
    match path {
        "/" | "/health" | "/v1/health" => {
            only_get(&request)?;
            admit(shared, &live, &request, ctx).await?;
            // Upstream names, key fingerprints and errors are the operator's.
            let details =
                live.config.public_health_details || admin::check_admin(&live, path, request.headers()).is_ok();
            Ok(admin::health::health(shared, &live, details))
        }
        "/metrics" if live.config.metrics_enabled => {
            // A scraper's own token, or an operator's key.
            let scraper =
                live.config.metrics_token.as_ref().is_some_and(|t| admin::bearer_is(request.headers(), t.expose()));
            if !scraper {
                operator_only(admit(shared, &live, &request, ctx).await?, path)?;
            }
            only_get(&request)?;
            let mut response = Response::new(SluiceBody::full(admin::metrics::render_metrics(shared, &live)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            Ok(response)
        }
        "/stats" => {
            operator_only(admit(shared, &live, &request, ctx).await?, path)?;
            only_get(&request)?;
            Ok(json_response(StatusCode::OK, admin::stats::render_stats(shared, &live).to_string().into()))
        }
        "/v1/models" => {
            let client = admit(shared, &live, &request, ctx).await?;
            only_get(&request)?;
            let models = match client.as_deref().map(|c| &c.allowed) {
                Some(allowed @ Allowed::Only(_)) => live.routes.models_json_for(|route| allowed.permits(route, route)),
                _ => live.routes.models_json.clone(),
            };
            Ok(json_response(StatusCode::OK, models))
        }
        _ if path.starts_with("/v1/models/") && !path.ends_with("/test") => {
            let client = admit(shared, &live, &request, ctx).await?;
            only_get(&request)?;
            let id = &path["/v1/models/".len()..];
            let permit = |route: &str| client.as_deref().is_none_or(|c| c.allowed.permits(route, route));
            match live.routes.model_json(id, permit) {
                Some(body) => Ok(json_response(StatusCode::OK, body)),
                None => Err(ProxyError::UnknownModel(id.to_string())),
            }
        }
        _ if path.starts_with("/admin/")
            || path.starts_with("/api/v1/admin/")
            || (path.starts_with("/v1/models/") && path.ends_with("/test")) =>
        {
            // Boxed: the admin API's future is larger than a proxied
            // request's, and every request's future would carry its size.
            Box::pin(admin::handle(shared, &live, request)).await
        }
        _ if path.starts_with("/v1/") => forward(shared, live, request, ctx).await,
        _ => Err(ProxyError::NotFound(path.to_string())),
    }
}

/// The proxied pipeline: authenticate + admit -> read -> shortcut -> plan -> cache -> send.
async fn forward(
    shared: &Shared,
    live: arc_swap::Guard<Arc<Live>>,
    request: Request<Incoming>,
    ctx: &mut RequestContext,
) -> Result<Response<SluiceBody>, ProxyError> {
    // A refusal may wait for the body: without the snapshot (see below).
    let client = match admit(shared, &live, &request, ctx).await {
        Ok(client) => client,
        Err(error) => {
            drop(live);
            return Err(refuse(request, error, ctx).await);
        }
    };
    let path = request.uri().path();
    // Files, batches, assistants, stored responses live in the upstream
    // account every client shares: a tenant's key reaches them only when granted.
    if client.as_ref().is_some_and(|c| !c.passthrough) && !INFERENCE_PATHS.contains(&path) {
        let error = ProxyError::PathNotAllowed(path.to_string());
        drop(live);
        return Err(refuse(request, error, ctx).await);
    }
    if proxy::is_model_endpoint(path) && request.method() != Method::POST {
        let error = ProxyError::MethodNotAllowed { method: request.method().clone(), allow: "POST" };
        drop(live);
        return Err(refuse(request, error, ctx).await);
    }
    let received = proxy::receive(&live, request, ctx).await?;
    let mut lookout = None;
    if live.config.cache.enabled {
        match cached::shortcut(&shared.cache, &live, &received, client.as_deref(), ctx) {
            Found::Answer(response) => return Ok(response),
            Found::Plan(found) => lookout = found,
        }
    }
    // From here the request may wait long (a single flight, Redis, the
    // upstream): an owned snapshot, not one of the thread's few guard slots
    // (past them, every load on the thread takes arc-swap's slower path).
    let live = &*arc_swap::Guard::into_inner(live);
    let mut prepared = proxy::prepare(live, received, client.as_deref(), ctx)?;
    if live.config.cache.enabled
        && prepared.plan.cacheable
        && let Step::Answer(response) =
            cached::stage(&shared.cache, live, &mut prepared, lookout.take(), client.as_deref(), ctx).await?
    {
        return Ok(response);
    }
    // Not held (with the client's body) while the request is upstream.
    drop(lookout);
    proxy::mark_forwarded(live, &mut prepared, ctx);
    // The retry loop's future is boxed: inline, every request's future (a
    // cache hit's too) would carry its size, and be copied with it.
    Box::pin(retry::send(prepared, ctx)).await
}

/// A request refused before its body stage (its key, its limits, a path or
/// method it may not use): a small body is read and dropped first, so the
/// client's connection stays open for its next request (a refused client
/// then costs no new connection, or TLS handshake, a request).
async fn refuse(request: Request<Incoming>, error: ProxyError, ctx: &mut RequestContext) -> ProxyError {
    // Boxed: only a refusal pays for the read's future.
    if ctx.body_unread && Box::pin(proxy::read::drain(request)).await {
        ctx.body_unread = false;
    }
    error
}

/// The address a request without a key is limited under: the peer's, or
/// behind `[server] trusted_proxies`, the client's they forwarded.
fn client_ip(live: &Live, request: &Request<Incoming>, watch: &ConnWatch) -> std::net::IpAddr {
    let trusted = |ip: std::net::IpAddr| live.config.server.trusted_proxies.iter().any(|block| block.contains(ip));
    proxy::headers::client_ip(request.headers(), watch.conn.peer.ip(), &trusted)
}

/// `/metrics` and `/stats` show every client's traffic: served to the
/// operator's keys (`[auth] keys`) and on exempt paths, not to tenants.
fn operator_only(client: Option<Arc<Client>>, path: &str) -> Result<(), ProxyError> {
    match client {
        Some(client) if !client.operator => Err(ProxyError::PathNotAllowed(path.to_string())),
        _ => Ok(()),
    }
}

/// The seed service's paths, so its clients switch without a change:
/// `/api/v1/X` is `/v1/X` (the admin API under `/api/v1/admin/` is served
/// by [`admin`] as it is).
fn seed_alias(request: Request<Incoming>, ctx: &mut RequestContext) -> Result<Request<Incoming>, ProxyError> {
    let path = request.uri().path();
    if !path.starts_with("/api/v1/") || path.starts_with("/api/v1/admin/") {
        return Ok(request);
    }
    let (mut parts, body) = request.into_parts();
    let rest = parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).strip_prefix("/api").unwrap_or("/");
    let rest: http::uri::PathAndQuery = rest.parse().map_err(|_| ProxyError::BadPath)?;
    let mut uri = http::uri::Parts::from(parts.uri);
    uri.path_and_query = Some(rest);
    parts.uri = http::Uri::from_parts(uri).map_err(|_| ProxyError::BadPath)?;
    ctx.endpoint = crate::telemetry::metrics::Endpoint::of(parts.uri.path());
    Ok(Request::from_parts(parts, body))
}

/// Refuses paths an upstream (or a proxy in front of it) could resolve
/// outside the base URL sluice puts them under, or read as another path than
/// sluice does: `.` and `..` segments (plain or percent-encoded), `//`, a
/// trailing `/`, an encoded `/` or `\`, a `\`, and percent-encoded
/// characters that need no encoding (`%63` for `c`: an upstream that decodes
/// it would see `/v1/chat/completions` where sluice saw another path). So the
/// one spelling of a path sluice routes by is the one the upstream serves.
fn check_path(path: &str) -> Result<(), ProxyError> {
    let bytes = path.as_bytes();
    // Most paths hold neither `%` nor `.`: a few scans, no allocation.
    if memchr::memchr(b'\\', bytes).is_some()
        || bytes.windows(2).any(|pair| pair == b"//")
        || (bytes.len() > 1 && bytes.ends_with(b"/"))
    {
        return Err(ProxyError::BadPath);
    }
    for i in memchr::memchr_iter(b'%', bytes) {
        let decoded = match (bytes.get(i + 1).and_then(hex), bytes.get(i + 2).and_then(hex)) {
            (Some(hi), Some(lo)) => hi << 4 | lo,
            _ => return Err(ProxyError::BadPath),
        };
        if decoded.is_ascii_alphanumeric() || matches!(decoded, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\') {
            return Err(ProxyError::BadPath);
        }
    }
    // A path that only looks like an inference endpoint (other case, `;x`
    // parameters, encoded spaces) would skip the rules bound to the real one
    // (the model's `max_tokens_cap`, tenant path grants) while a lenient
    // upstream might still serve it as that endpoint.
    if bytes.iter().any(|b| b.is_ascii_uppercase() || matches!(b, b';' | b'%')) && looks_like_inference(path) {
        return Err(ProxyError::BadPath);
    }
    if memchr::memchr(b'.', bytes).is_none() {
        return Ok(());
    }
    // `.` or `..` (an encoded dot was refused above).
    if path.split('/').any(|segment| segment == "." || segment == "..") { Err(ProxyError::BadPath) } else { Ok(()) }
}

/// Whether `path`, lower-cased, cut at `;`, percent-decoded and trimmed, is
/// an inference endpoint (the caller knows `path` itself is not written so).
fn looks_like_inference(path: &str) -> bool {
    let cut = path.split(';').next().unwrap_or_default().as_bytes();
    let mut decoded = Vec::with_capacity(cut.len());
    let mut i = 0;
    while i < cut.len() {
        match (cut[i], cut.get(i + 1).and_then(hex), cut.get(i + 2).and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                decoded.push(hi << 4 | lo);
                i += 3;
            }
            (byte, ..) => {
                decoded.push(byte.to_ascii_lowercase());
                i += 1;
            }
        }
    }
    let text = String::from_utf8_lossy(&decoded);
    INFERENCE_PATHS.contains(&text.trim())
}

fn hex(byte: &u8) -> Option<u8> {
    (*byte as char).to_digit(16).map(|d| d as u8)
}

/// GET-only paths (HEAD too, as HTTP wants).
fn only_get(request: &Request<Incoming>) -> Result<(), ProxyError> {
    match *request.method() {
        Method::GET | Method::HEAD => Ok(()),
        _ => Err(ProxyError::MethodNotAllowed { method: request.method().clone(), allow: "GET, HEAD" }),
    }
}

/// The authenticate and admit stages: the client's key (401 when unknown,
/// revoked or expired), then its limits (429, with `x-ratelimit-*` and
/// `Retry-After`), or, for a request without a key, its address's limit.
/// A refused request never reaches an upstream. With `[redis]`, a key's
/// limits are the ones every instance shares.
async fn admit(
    shared: &Shared,
    live: &Live,
    request: &Request<Incoming>,
    ctx: &mut RequestContext,
) -> Result<Option<Arc<Client>>, ProxyError> {
    let table = &live.clients;
    let client = table.authenticate(request.uri().path(), request.headers(), request.uri().query())?;
    match &client {
        Some(client) => {
            ctx.client = Some(Arc::clone(client) as _);
            ctx.tenant = !client.operator;
            let verdict = match &shared.cluster {
                Some(cluster) if client.limits.any() => Box::pin(admit_shared(cluster, client)).await,
                _ => client.admit(),
            };
            match verdict {
                Ok(rate) => ctx.rate = rate,
                Err((error, rate)) => {
                    ctx.rate = Some(rate);
                    return Err(error);
                }
            }
        }
        None => {
            if let (Some(rpm), Some(watch)) = (live.config.limits.per_ip_rpm, &ctx.watch)
                && live.config.limits.enabled
                && let Err(retry_after) =
                    shared.ip_limits.take(client_ip(live, request, watch), rpm, crate::clock::now_ms())
            {
                return Err(ProxyError::ClientRateLimited {
                    scope: CLIENT_ADDRESS,
                    per: "minute",
                    limit: rpm,
                    retry_after: (retry_after.as_millis() as u64).div_ceil(1000).max(1),
                });
            }
        }
    }
    Ok(client)
}

/// A key's limits as every instance shares them; while Redis cannot say,
/// this instance's own counters (`on_error = "local"`) or a 503 (`"deny"`).
async fn admit_shared(cluster: &Cluster, client: &Client) -> Result<Option<RateHeaders>, (ProxyError, RateHeaders)> {
    match cluster.admit(client).await {
        SharedVerdict::Admitted(rate) => Ok(Some(rate)),
        SharedVerdict::Refused(error, rate) => Err((error, rate)),
        SharedVerdict::Unavailable => match cluster.config.on_error {
            OnRedisError::Local => client.admit(),
            OnRedisError::Deny => Err((ProxyError::LimitsUnavailable, RateHeaders::default())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_could_climb_out_of_the_base_url_are_refused() {
        for bad in [
            "/v1/../../internal/admin",
            "/v1/./chat/completions",
            "/v1/%2e%2e/admin",
            "/v1/%2E./admin",
            "/v1/files/a%2fb",
            "/v1/files/a%5Cb",
            "/v1/files/a\\b",
            "/v1/chat/completions/..",
            "/v1/chat/%63ompletions",
            "/v1//chat/completions",
            "/v1/chat/completions/",
            "/v1/chat%2Dcompletions",
            "/v1/files/%zz",
            "/v1/files/%4",
            "/v1/chat/completions;x",
            "/v1/Chat/Completions",
            "/v1/chat/completions%20",
            "/V1/EMBEDDINGS",
        ] {
            assert!(matches!(check_path(bad), Err(ProxyError::BadPath)), "{bad}");
        }
        for good in [
            "/v1/chat/completions",
            "/v1/files/file-abc.jsonl",
            "/v1/files/..a",
            "/",
            "/v1/threads/t/runs",
            "/v1/models/org%2Bteam%3Amodel",
            "/v1/models/a%20b",
        ] {
            assert!(check_path(good).is_ok(), "{good}");
        }
    }
}
