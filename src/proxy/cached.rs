//! The cache stage, between plan and send. For a cacheable request (a model
//! endpoint whose route allows caching, with `[cache] enabled`) it builds the
//! key from the scope, the upstream, the path and the exact bytes to be sent
//! (after renames and defaults), then answers from the cache, waits for an
//! identical request already upstream (non-streaming only), or sends the
//! request on with a [`Fill`] that stores its answer if it ends whole.
//!
//! Before the plan, [`shortcut`] looks for a hot request by the bytes the
//! client sent: when an earlier identical request's plan found its entry,
//! the entry is served without planning this one or hashing it with
//! SHA-256 (the key's model grant is checked again). Only a hit found the
//! planned way is remembered so.
//!
//! Client controls: `Cache-Control: no-store` skips the cache both ways,
//! `no-cache` skips the lookup but stores the fresh answer, and
//! `x-sluice-cache-ttl: SECONDS` accepts only entries younger than that and
//! stores with that shorter TTL, except over an entry that had longer to
//! live (one client's TTL never shortens what others are served).

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http::header::{AGE, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Response, Uri};
use tokio::time::Instant;

use bytes::Bytes;
use http::Method;

use crate::access::table::Client;
use crate::cache::flight::Joined;
use crate::cache::hot::Check;
use crate::cache::shortcut::{Sent, Shortcut};
use crate::cache::{CacheKey, Entry, Fill, KeyBuilder, ResponseCache};
use crate::config::CacheScope;
use crate::error::ProxyError;
use crate::proxy::body::SluiceBody;
use crate::proxy::plan::{CACHE_PATHS, named_route};
use crate::proxy::read::Read;
use crate::proxy::{Prepared, Received, headers, sniff};
use crate::routes::Routes;
use crate::state::Live;
use crate::telemetry::{CacheStatus, RequestContext};
use crate::upstream::body::ForwardBody;

/// A client's TTL for this request's entry, in seconds.
pub const CACHE_TTL: HeaderName = HeaderName::from_static("x-sluice-cache-ttl");
/// `hit`, `miss` or `bypass` on every answer the cache could have given.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("x-sluice-cache");

/// The form of the cache key, its first part: a change of what keys an
/// answer changes it, so entries stored under another form (by an older
/// version, in Redis) are never served for this one's requests.
const KEY_FORM: &[u8] = b"sluice-cache-key-2: scope upstream path query body headers";

/// What the stage decided.
pub enum Step {
    /// Send it upstream (with a fill set on it when its answer is to be stored).
    Forward,
    /// Answered from the cache.
    Answer(Response<SluiceBody>),
}

/// The client's cache controls.
#[derive(Debug, Default, PartialEq, Eq)]
struct Controls {
    no_store: bool,
    no_cache: bool,
    ttl: Option<Duration>,
}

impl Controls {
    fn of(headers: &HeaderMap) -> Result<Self, ProxyError> {
        let mut controls = Self::default();
        for value in headers.get_all(CACHE_CONTROL) {
            for directive in value.to_str().unwrap_or("").split(',') {
                let directive = directive.trim();
                controls.no_store |= directive.eq_ignore_ascii_case("no-store");
                controls.no_cache |= directive.eq_ignore_ascii_case("no-cache");
            }
        }
        if let Some(value) = headers.get(CACHE_TTL) {
            let secs = value.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()).ok_or_else(|| {
                ProxyError::BadField { field: "x-sluice-cache-ttl", reason: "must be a whole number of seconds".into() }
            })?;
            controls.ttl = Some(Duration::from_secs(secs));
        }
        Ok(controls)
    }
}

impl Controls {
    /// The oldest entry this client is served: its own TTL, and never past
    /// the configured one (a reload that lowered it holds for entries
    /// stored before it too).
    fn max_age(&self, ttl: Duration) -> Duration {
        self.ttl.map_or(ttl, |own| own.min(ttl))
    }
}

/// A request to a cacheable path the shortcut did not answer: the body its client
/// sent, to be remembered if its plan finds the entry.
pub struct Lookout {
    body: Bytes,
}

/// What the shortcut found.
pub enum Found {
    /// Answered from the cache.
    Answer(Response<SluiceBody>),
    /// Plan the request (with a lookout, when it may be remembered).
    Plan(Option<Lookout>),
}

/// Looks for a received request's answer by the bytes its client sent,
/// before planning it. Refuses nothing: a request it does not answer is
/// planned, and the plan says what is wrong with it (a client control it
/// sent included). While no request is hot, it only keeps the body.
pub fn shortcut(
    cache: &ResponseCache,
    live: &Live,
    received: &Received,
    client: Option<&Client>,
    ctx: &mut RequestContext,
) -> Found {
    let (parts, Read::Json(body)) = (&received.parts, &received.read) else { return Found::Plan(None) };
    if parts.method != Method::POST || body.is_empty() || !CACHE_PATHS.contains(&parts.uri.path()) {
        return Found::Plan(None);
    }
    // Shortcuts know the bytes sent, not the headers: a request whose
    // headers key its answer neither takes nor leaves one.
    let listed = &live.config.cache.key_headers;
    if parts.headers.keys().any(|name| headers::shapes_answer(name, listed)) {
        return Found::Plan(None);
    }
    let lookout = Lookout { body: body.clone() };
    let shortcuts = cache.shortcuts();
    if !shortcuts.any() {
        return Found::Plan(Some(lookout));
    }
    let scope = scope(live.config.cache.scope, client);
    let sent = sent(&scope, client, &parts.uri, body);
    // `no-store` and `no-cache` are the cache stage's to answer.
    let controls = match Controls::of(&parts.headers) {
        Ok(controls) if !controls.no_store && !controls.no_cache => controls,
        _ => return Found::Plan(Some(lookout)),
    };
    let hash = shortcuts.hash(&sent);
    let check = Check {
        generation: live.routes.generation,
        allowed: client.map(|c| &c.allowed),
        now: Instant::now(),
        max_age: Some(controls.max_age(live.config.cache.ttl)),
    };
    // This loop's own copy first: nothing another core writes to.
    let changes = |key: &CacheKey| cache.changes(key);
    if let Some(hot) = cache.hot().find(hash, &sent, &check, changes, |key, entry| cache.holds(key, entry)) {
        (ctx.stream, ctx.model, ctx.max_tokens_capped) = (hot.stream, hot.model, hot.capped);
        return Found::Answer(replay(hot.answer, check.now, ctx));
    }
    let found = shortcuts.get(hash, &sent, check.generation);
    let Some(shortcut) = found.filter(|s| s.permits(check.allowed)) else {
        return Found::Plan(Some(lookout));
    };
    let epoch = cache.changes(&shortcut.key);
    let Some(entry) = cache.lookup(&shortcut.key, check.max_age, check.now) else {
        return Found::Plan(Some(lookout));
    };
    cache.hot().offer(hash, sent, &shortcut, &entry, epoch);
    (ctx.stream, ctx.model, ctx.max_tokens_capped) = (shortcut.stream, shortcut.model.clone(), shortcut.capped);
    cache.counters.shortcut_hits.fetch_add(1, Relaxed);
    Found::Answer(hit(cache, entry, check.now, ctx))
}

/// What a client sent, as a shortcut knows it.
fn sent<'a>(scope: &'a str, client: Option<&Client>, uri: &'a Uri, body: &'a [u8]) -> Sent<'a> {
    let budget = client.is_some_and(|c| c.limits.tokens_per_day.is_some());
    Sent { scope, budget, path: uri.path(), query: uri.query().unwrap_or(""), body }
}

/// Remembers where a request's plan led, when any identical request would
/// be planned the same way: one target, where no round-robin turn picks
/// the upstream (and the body renamed for it).
fn remember(cache: &ResponseCache, routes: &Routes, key: CacheKey, prepared: &Prepared, sent: Sent<'_>) {
    let plan = &prepared.plan;
    if !plan.fallbacks.is_empty() {
        return;
    }
    // The names the key's model grant is checked against, as the plan read them.
    let Ok(sniffed) = sniff::sniff(sent.body, &routes.param_names) else { return };
    let Ok((route, requested, _)) = named_route(routes, sniffed.model.as_deref()) else { return };
    let shortcut = Shortcut {
        generation: routes.generation,
        key,
        route: route.name.clone(),
        requested: requested.into(),
        model: plan.model.clone(),
        stream: plan.stream,
        capped: plan.capped,
    };
    let shortcuts = cache.shortcuts();
    shortcuts.remember(shortcuts.hash(&sent), sent, shortcut);
}

/// Runs the cache stage for a prepared request; `lookout` is what the
/// shortcut kept of a request it did not answer.
pub async fn stage(
    cache: &Arc<ResponseCache>,
    live: &Live,
    prepared: &mut Prepared,
    lookout: Option<Lookout>,
    client: Option<&Client>,
    ctx: &mut RequestContext,
) -> Result<Step, ProxyError> {
    let config = &live.config.cache;
    if !config.enabled || !prepared.plan.cacheable {
        return Ok(Step::Forward);
    }
    let controls = Controls::of(&prepared.headers)?;
    let ForwardBody::Full { bytes } = &prepared.plan.body else { return Ok(Step::Forward) };
    if controls.no_store {
        ctx.cache = Some(CacheStatus::Bypass);
        cache.counters.bypasses.fetch_add(1, Relaxed);
        return Ok(Step::Forward);
    }
    let scope = scope(config.scope, client);
    let mut key = KeyBuilder::default()
        .part(KEY_FORM)
        .part(scope.as_bytes())
        .part(prepared.plan.upstream.name.as_bytes())
        .part(prepared.uri.path().as_bytes())
        .part(prepared.uri.query().unwrap_or("").as_bytes())
        // No Accept-Encoding: sluice asks every upstream for uncompressed answers.
        .part(bytes.as_deref().unwrap_or_default());
    // Headers sent on that may change the answer (`openai-beta`, a
    // provider's version): an answer shaped by one client's headers is not
    // another's.
    for (name, value) in headers::answer_shaping(&prepared.headers, &config.key_headers) {
        key = key.part(name.as_str().as_bytes()).part(value.as_bytes());
    }
    let key = key.finish();
    let mut guard = None;
    if controls.no_cache {
        ctx.cache = Some(CacheStatus::Bypass);
        cache.counters.bypasses.fetch_add(1, Relaxed);
    } else {
        // One clock read for the freshness and the age.
        let now = Instant::now();
        if let Some(entry) = cache.lookup(&key, Some(controls.max_age(config.ttl)), now) {
            if let Some(lookout) = &lookout {
                remember(cache, &live.routes, key, prepared, sent(&scope, client, &prepared.uri, &lookout.body));
            }
            return Ok(Step::Answer(hit(cache, entry, now, ctx)));
        }
        // Another instance may have stored it (one round trip, bounded by
        // `[redis] timeout`).
        if cache.is_shared()
            && let Some(entry) = Box::pin(cache.lookup_shared(&key, Some(controls.max_age(config.ttl)))).await
        {
            return Ok(Step::Answer(hit(cache, entry, Instant::now(), ctx)));
        }
        // Identical non-streaming misses ride on the first one. Streams do
        // not wait: each goes upstream, and the first to end whole is stored.
        if !prepared.plan.stream {
            match cache.flights().join(key) {
                Joined::Leader(leader) => guard = Some(leader),
                Joined::Follower(follower) => {
                    let upstream = &prepared.plan.upstream;
                    let left = upstream.timeouts.total.saturating_sub(ctx.started.elapsed());
                    let started = Instant::now();
                    let answer = follower.wait(upstream.timeouts.header.min(left)).await;
                    ctx.upstream_wait += started.elapsed();
                    if let Some(entry) = answer {
                        return Ok(Step::Answer(hit(cache, entry, Instant::now(), ctx)));
                    }
                    // The leader failed: this request goes upstream itself.
                }
            }
        }
        ctx.cache = Some(CacheStatus::Miss);
        cache.counters.misses.fetch_add(1, Relaxed);
    }
    let ttl = controls.max_age(config.ttl);
    let model = prepared.plan.model.as_ref().map(|m| Arc::clone(&m.model));
    let fill = Fill::new(Arc::clone(cache), key, ttl, config.max_entry, model, guard);
    // A client's shorter TTL stays out of the shared store: there it would
    // replace the entry every instance serves with one that soon expires.
    prepared.fill = Some(if ttl < config.ttl { fill.local_only() } else { fill });
    Ok(Step::Forward)
}

/// Who shares an entry: everyone, a user's keys, or one key.
fn scope(scope: CacheScope, client: Option<&Client>) -> Cow<'static, str> {
    match (scope, client) {
        (CacheScope::Global, _) => Cow::Borrowed("*"),
        (_, None) => Cow::Borrowed("-"),
        // By the key's hash, not its label: `config:N` follows the order of
        // the config, which a change (or another instance's file) may shift.
        // By the user's store id, not its name: a name may be reused.
        (CacheScope::User, Some(client)) => match &client.user_scope {
            Some(user) => Cow::Owned(user.to_string()),
            None => Cow::Owned(format!("key:{}", client.shared_id)),
        },
        (CacheScope::Key, Some(client)) => Cow::Owned(format!("key:{}", client.shared_id)),
    }
}

/// The answer from a stored entry, counted as a hit.
fn hit(cache: &ResponseCache, entry: Arc<Entry>, now: Instant, ctx: &mut RequestContext) -> Response<SluiceBody> {
    cache.counters.hits.fetch_add(1, Relaxed);
    replay(entry, now, ctx)
}

/// The answer from a stored entry (or a loop's copy of one): its status and
/// type, its frames as they came, and how old it is at `now`.
fn replay(entry: Arc<Entry>, now: Instant, ctx: &mut RequestContext) -> Response<SluiceBody> {
    ctx.cache = Some(CacheStatus::Hit);
    ctx.cached_tokens = entry.tokens;
    let age = now.saturating_duration_since(entry.stored_at).as_secs();
    let (content_type, encoding) = (entry.content_type.clone(), entry.content_encoding.clone());
    let mut response = Response::new(SluiceBody::Replay { entry, next: 0 });
    let headers = response.headers_mut();
    if let Some(content_type) = content_type {
        headers.insert(CONTENT_TYPE, content_type);
    }
    if let Some(encoding) = encoding {
        headers.insert(CONTENT_ENCODING, encoding);
    }
    headers.insert(AGE, HeaderValue::from(age));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn controls_from_headers() {
        assert_eq!(Controls::of(&HeaderMap::new()).unwrap(), Controls::default());
        let both = Controls::of(&headers(&[("cache-control", "max-age=0, No-Cache"), ("cache-control", "no-store")]));
        assert_eq!(both.unwrap(), Controls { no_store: true, no_cache: true, ttl: None });
        let ttl = Controls::of(&headers(&[("x-sluice-cache-ttl", " 30 ")])).unwrap();
        assert_eq!(ttl.ttl, Some(Duration::from_secs(30)));
        assert!(matches!(
            Controls::of(&headers(&[("x-sluice-cache-ttl", "soon")])),
            Err(ProxyError::BadField { field: "x-sluice-cache-ttl", .. })
        ));
    }
}
