//! The one retry loop. Each attempt picks a key (fresh keys first, then tried
//! ones after a jittered backoff), sends, and lets the answer decide: a usable
//! answer goes to the client at once and is never retried; 429 cools the key;
//! 401/402/403 disable it (a login upstream refreshes its token once instead);
//! 5xx, connect errors and timeouts count against the key and the upstream.
//! The breaker sees one outcome per request, not per attempt.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, Uri, Version};

use crate::body::{ForwardBody, SluiceBody, UpstreamBody};
use crate::clock::{self, now_ms};
use crate::error::ProxyError;
use crate::proxy::body::{Meter, MeteredBody, Timing};
use crate::proxy::breaker::Admission;
use crate::proxy::keyring::{Failure, KeyLease};
use crate::proxy::upstream::{Auth, Upstream};
use crate::proxy::{RequestContext, headers, retry_after};
use crate::telemetry::metrics::ModelMetrics;

/// Where a request goes and what is sent.
pub struct Plan {
    /// The upstream that serves it.
    pub upstream: Arc<Upstream>,
    /// The body to send (replayable when `Full`).
    pub body: ForwardBody,
    /// Whether sluice rewrote the body.
    pub body_rewritten: bool,
    /// `"stream": true` in the request.
    pub stream: bool,
    /// The routed model's counters (`None` for pass-through requests).
    pub model: Option<Arc<ModelMetrics>>,
}

/// The last failed attempt, kept to answer with when the budget runs out.
#[expect(clippy::large_enum_variant, reason = "one on the stack per request, never in a collection")]
enum Last {
    /// The upstream's own answer (429, 401/402/403, 5xx) with the key it came on.
    Answer(Response<UpstreamBody>, KeyLease, Failure),
    /// No answer: connect error, reset, timeout.
    Error(ProxyError),
}

/// Sends `plan` with retries and failover; the first usable answer is returned.
pub async fn send(
    plan: Plan,
    method: Method,
    uri: Uri,
    mut headers: HeaderMap,
    ctx: &mut RequestContext,
) -> Result<Response<SluiceBody>, ProxyError> {
    let upstream = plan.upstream;
    ctx.upstream = Some(Arc::clone(&upstream.name));
    let telemetry = Arc::clone(&ctx.telemetry);
    let metrics = &telemetry.metrics;
    let probe = match upstream.breaker.admit(now_ms()) {
        Admission::Allowed => None,
        Admission::Probe(guard) => Some(guard),
        Admission::Rejected { retry_after_ms } => {
            return Err(ProxyError::UpstreamUnavailable {
                upstream: upstream.name.to_string(),
                retry_after: Some(retry_after_ms.div_ceil(1000)),
            });
        }
    };
    let target = upstream.uri_for(uri.path(), uri.query())?;
    headers::to_upstream(&mut headers, &ctx.request_id, plan.body_rewritten);
    upstream.add_extra_headers(&mut headers);

    // A streamed body cannot be replayed: one attempt only.
    let (replay, mut once) = match plan.body {
        ForwardBody::Full { bytes } => (Some(bytes.unwrap_or_default()), None),
        stream @ ForwardBody::Stream { .. } => (None, Some(stream)),
    };
    let policy = upstream.retry;
    let max_attempts = if replay.is_some() { policy.max_attempts } else { 1 };
    let mut tried: Vec<usize> = Vec::with_capacity(policy.max_key_retries as usize);
    let mut last: Option<Last> = None;
    let mut reuses = 0u32;
    let mut token_refreshed = false;
    let mut skip_backoff = false;

    for attempt in 0..max_attempts {
        let now = now_ms();
        let fresh = if tried.len() < policy.max_key_retries as usize {
            upstream.keys.pick(upstream.strategy, now, |i| !tried.contains(&i))
        } else {
            None
        };
        let (lease, reused) = match fresh {
            Some(lease) => (lease, false),
            None => match upstream.keys.pick(upstream.strategy, now, |i| tried.contains(&i)) {
                Some(lease) => (lease, true),
                None => break,
            },
        };
        let previous_key = tried.last().copied();
        if !tried.contains(&lease.index()) {
            tried.push(lease.index());
        }
        if reused && !std::mem::take(&mut skip_backoff) {
            reuses += 1;
            let pause = backoff(policy.retry_base, policy.retry_max, reuses);
            tokio::time::sleep(pause).await;
            ctx.upstream_wait += pause;
        }
        ctx.attempts += 1;
        if attempt > 0 {
            metrics.retries.fetch_add(1, Relaxed);
            if previous_key != Some(lease.index()) {
                metrics.failovers.fetch_add(1, Relaxed);
            }
            tracing::debug!(request_id = ?ctx.request_id, upstream = %upstream.name, attempt, key = %lease.key().fingerprint, "retrying");
        }

        let (auth, token_generation) = match &upstream.auth {
            Auth::Keys => (lease.key().auth_header(), 0),
            Auth::Login(source) => source.header(&upstream.client, upstream.timeouts.header).await?,
        };
        let body = match (&replay, once.take()) {
            (Some(bytes), _) => ForwardBody::full(Bytes::clone(bytes)),
            (None, Some(stream)) => stream,
            (None, None) => break,
        };
        let wait = header_wait(&upstream, plan.stream, ctx.started);
        let key = lease.key();
        let sent = Instant::now();
        let result = tokio::time::timeout(wait, upstream.send(&method, &target, &headers, auth, body)).await;
        let waited = sent.elapsed();
        ctx.upstream_wait += waited;
        let response = match result {
            Err(_) => {
                key.fail(Failure::Timeout);
                last = Some(Last::Error(ProxyError::UpstreamTimeout {
                    upstream: upstream.name.to_string(),
                    after_ms: wait.as_millis() as u64,
                }));
                continue;
            }
            Ok(Err(error)) => {
                key.fail(Failure::Connect);
                last = Some(Last::Error(error));
                continue;
            }
            Ok(Ok(response)) => response,
        };
        let failure = match response.status().as_u16() {
            429 => {
                let asked = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry_after::parse(v, SystemTime::now()));
                let cooldown = asked.unwrap_or(upstream.cooldown).min(upstream.max_cooldown);
                key.cool_until(clock::after(cooldown));
                tracing::info!(request_id = ?ctx.request_id, upstream = %upstream.name, key = %key.fingerprint, cooldown_ms = cooldown.as_millis() as u64, "key rate-limited; cooling down");
                Failure::RateLimited
            }
            401 if matches!(upstream.auth, Auth::Login(_)) => {
                if let (Auth::Login(source), false) = (&upstream.auth, token_refreshed) {
                    token_refreshed = true;
                    skip_backoff = true;
                    source.refresh(&upstream.client, upstream.timeouts.header, token_generation).await?;
                }
                key.fail(Failure::Rejected);
                Failure::Rejected
            }
            401..=403 => {
                key.disable();
                tracing::warn!(request_id = ?ctx.request_id, upstream = %upstream.name, key = %key.fingerprint, status = response.status().as_u16(), "key refused by the upstream; disabled until reset or reload");
                Failure::Rejected
            }
            500..=599 => {
                key.fail(Failure::ServerError);
                Failure::ServerError
            }
            _ => {
                key.succeed();
                ctx.ttfb = Some(waited);
                metrics.ttfb.observe(waited);
                upstream.breaker.record_success();
                if let Some(probe) = probe {
                    probe.resolve();
                }
                return Ok(respond(response, lease, &upstream, plan.stream, ctx));
            }
        };
        last = Some(Last::Answer(response, lease, failure));
    }
    // With no attempt made (no usable key), the breaker learned nothing: an
    // unresolved probe guard re-opens it so the next request probes instead.
    let attempted = last.is_some();
    let result = give_up(&upstream, last, plan.stream, ctx);
    if let (Some(probe), true) = (probe, attempted) {
        probe.resolve();
    }
    result
}

/// The attempt budget is spent or no key is left: answer with what we have.
fn give_up(
    upstream: &Arc<Upstream>,
    last: Option<Last>,
    stream: bool,
    ctx: &RequestContext,
) -> Result<Response<SluiceBody>, ProxyError> {
    let now = now_ms();
    let retry_after = upstream.keys.earliest_ready(now).map(|at| (at - now).div_ceil(1000).max(1));
    let name = upstream.name.to_string();
    match &last {
        Some(Last::Answer(_, _, Failure::ServerError)) | Some(Last::Error(_)) => upstream.breaker.record_failure(now),
        // The upstream answered: it is alive, whatever it thinks of our keys.
        Some(Last::Answer(..)) => upstream.breaker.record_success(),
        None => {}
    }
    let usable = upstream.keys.any_usable(now);
    match last {
        None => Err(ProxyError::NoAvailableKey { upstream: name, retry_after }),
        Some(Last::Error(error)) => Err(error),
        Some(Last::Answer(_, _, Failure::RateLimited)) if !usable => {
            Err(ProxyError::AllKeysRateLimited { upstream: name, retry_after })
        }
        Some(Last::Answer(_, _, Failure::Rejected)) if !usable && matches!(upstream.auth, Auth::Keys) => {
            Err(ProxyError::NoAvailableKey { upstream: name, retry_after })
        }
        // Budget spent with keys left, or a 5xx: the upstream's own answer, untouched.
        Some(Last::Answer(response, lease, _)) => Ok(respond(response, lease, upstream, stream, ctx)),
    }
}

/// How long to wait for headers: `header_timeout`, and for a non-streaming
/// request no longer than what is left of `total_timeout`.
fn header_wait(upstream: &Upstream, stream: bool, started: Instant) -> Duration {
    let header = upstream.timeouts.header;
    if stream {
        return header;
    }
    header.min(upstream.timeouts.total.saturating_sub(started.elapsed())).max(Duration::from_millis(1))
}

/// Full-jitter exponential backoff: uniform in `[0, min(max, base * 2^(n-1))]`.
pub fn backoff(base: Duration, max: Duration, n: u32) -> Duration {
    let ceiling = base.saturating_mul(1u32 << (n.saturating_sub(1)).min(16)).min(max);
    let millis = ceiling.as_millis() as u64;
    if millis == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(crate::ids::next_u64() % (millis + 1))
}

/// Wraps an upstream answer for the client: hop-by-hop headers stripped, the
/// request id added, the body metered and passed through frame by frame.
fn respond(
    response: Response<UpstreamBody>,
    lease: KeyLease,
    upstream: &Upstream,
    stream: bool,
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
    ctx.telemetry.metrics.overhead.observe(overhead);
    if ctx.overhead_header {
        parts.headers.insert(OVERHEAD_HEADER, HeaderValue::from(overhead.as_micros() as u64));
    }
    let timing = if sse || stream {
        Timing::Idle(upstream.timeouts.idle)
    } else {
        Timing::Deadline(ctx.started + upstream.timeouts.total)
    };
    let meter = Meter::new(ctx.clone(), lease, parts.status.as_u16(), sse);
    Response::from_parts(parts, SluiceBody::Upstream { inner: MeteredBody::new(incoming, sse, timing, meter) })
}

/// Microseconds sluice spent on a request, upstream waits excluded (opt-in).
pub const OVERHEAD_HEADER: HeaderName = HeaderName::from_static("x-sluice-overhead-us");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_full_jitter() {
        let (base, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        for n in 1..10 {
            let ceiling = Duration::from_millis(100 * (1 << (n - 1))).min(max);
            for _ in 0..50 {
                assert!(backoff(base, max, n) <= ceiling);
            }
        }
        let samples: Vec<Duration> = (0..50).map(|_| backoff(base, max, 3)).collect();
        assert!(samples.iter().any(|d| *d != samples[0]), "jittered");
        assert_eq!(backoff(Duration::ZERO, max, 1), Duration::ZERO);
    }
}
