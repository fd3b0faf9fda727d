//! One upstream's share of a request: its breaker, its keys, and the
//! attempts the budgets allow on it. [`super::send`] runs this for each
//! target in turn; nothing here moves to another upstream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;

use super::{Request, backoff, header_wait, min_attempt_wait, remaining_total};
use crate::cache::Fill;
use crate::clock::{self, now_ms};
use crate::error::{ErrorSource, ProxyError, error_json};
use crate::proxy::body::SluiceBody;
use crate::proxy::respond;
use crate::telemetry::RequestContext;
use crate::telemetry::metrics::RetryReason;
use crate::upstream::body::{ForwardBody, UpstreamBody};
use crate::upstream::breaker::Admission;
use crate::upstream::keyring::{Failure, KeyLease, blames_the_key, blames_the_request};
use crate::upstream::{Auth, Upstream, headroom, retry_after};

/// Largest failed-attempt answer kept whole (error bodies are small JSON).
const MAX_KEPT_ANSWER: usize = 64 << 10;
/// Longest wait for a failed attempt's answer to arrive whole.
const KEPT_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// The last failed attempt, kept to answer with when the budget runs out.
#[expect(clippy::large_enum_variant, reason = "one on the stack per request, never in a collection")]
pub(super) enum Last {
    /// The upstream's own answer (429, 401/402/403, 5xx), read whole, and the
    /// fingerprint of the key it came on.
    Answer(Response<UpstreamBody>, Failure, Arc<str>),
    /// No answer: connect error, reset, timeout.
    Error(ProxyError),
    /// No answer in time while the target answered other requests: this
    /// request is slow by itself (a long generation), which counts against
    /// no key and no breaker, and is neither retried nor moved elsewhere.
    Slow(ProxyError),
    /// No answer in time while the upstream answered other requests (of
    /// other models): the upstream is up, so its breaker is not told, but
    /// this target may be in trouble: retried and fallen back as a timeout.
    Stalled(ProxyError),
}

/// What one attempt's outcome means for the loop.
#[expect(clippy::large_enum_variant, reason = "one per attempt, moved at once; boxing would allocate per request")]
enum Verdict {
    /// Hand this answer to the client.
    Answer(Response<UpstreamBody>, KeyLease),
    /// Try again (if the budget allows), for this reason.
    Retry(RetryReason),
    /// Stop: answer with the last failure.
    Stop,
}

/// How one upstream's share of a request went.
pub(super) enum Tried {
    /// An answer is on its way to the client.
    Answer(Response<SluiceBody>),
    /// Nothing usable; why, for the caller to fall back or answer.
    Failed(Failed),
}

/// An upstream that gave no usable answer.
pub(super) struct Failed {
    /// Its last failed attempt (`None`: no attempt, no usable key or breaker open).
    pub last: Option<Last>,
    /// Its breaker was open: seconds until it probes.
    pub breaker_open: Option<u64>,
    /// Whether any attempt may have reached it.
    pub sent: bool,
}

/// Tries `upstream` with `body`: keys, retries and backoff within its
/// budgets. A client-caused failure (its upload) is an `Err`.
pub(super) async fn attempt(
    upstream: &Arc<Upstream>,
    body: ForwardBody,
    deployment: Option<&str>,
    headers: &HeaderMap,
    req: &Request<'_>,
    fill: &mut Option<Fill>,
    ctx: &mut RequestContext,
) -> Result<Tried, ProxyError> {
    let telemetry = Arc::clone(ctx.telemetry());
    let metrics = &telemetry.metrics;
    let probe = match upstream.breaker.admit(now_ms()) {
        Admission::Allowed => None,
        Admission::Probe(guard) => Some(guard),
        Admission::Rejected { retry_after_ms } => {
            let failed = Failed { last: None, breaker_open: Some(retry_after_ms.div_ceil(1000)), sent: false };
            return Ok(Tried::Failed(failed));
        }
    };
    let target = upstream.uri_for(req.uri.path(), req.uri.query(), deployment)?;
    let method = req.method;

    // A streamed body cannot be replayed: one attempt only.
    let watch = body.upload_watch();
    let (replay, mut once) = match body {
        ForwardBody::Full { bytes } => (Some(bytes.unwrap_or_default()), None),
        upload @ ForwardBody::Upload { .. } => (None, Some(upload)),
    };
    // An upload the client has not finished sending: whatever fails now may
    // be the client's slowness as much as the upstream's fault.
    let upload_unfinished = || watch.as_ref().is_some_and(|(watch, _)| !watch.is_finished());
    let policy = upstream.retry;
    // A breaker's probe asks one question of an upstream that was failing:
    // one attempt, whatever the budget.
    let max_attempts = if replay.is_some() && probe.is_none() { policy.max_attempts } else { 1 };
    let mut tried: Vec<usize> = Vec::with_capacity(policy.max_key_retries as usize);
    let mut last: Option<Last> = None;
    let mut reuses = 0u32;
    let mut token_refreshed = false;
    let mut skip_backoff = false;
    let mut reason: Option<RetryReason> = None;
    let mut sent = false;

    for attempt in 0..max_attempts {
        let fresh = if tried.len() < policy.max_key_retries as usize {
            upstream.keys.pick(upstream.strategy, now_ms(), |i| !tried.contains(&i))
        } else {
            None
        };
        let lease = match fresh {
            Some(lease) => lease,
            None => {
                // A key already tried, after a backoff; nothing is leased
                // while waiting, and health is judged after the wait (another
                // request may have cooled the key meanwhile).
                if !upstream.keys.any_usable(now_ms()) {
                    break;
                }
                if !std::mem::take(&mut skip_backoff) {
                    reuses += 1;
                    let pause = backoff(policy.retry_base, policy.retry_max, reuses);
                    tokio::time::sleep(pause).await;
                    ctx.upstream_wait += pause;
                }
                match upstream.keys.pick(upstream.strategy, now_ms(), |i| tried.contains(&i)) {
                    Some(lease) => lease,
                    None => break,
                }
            }
        };
        // A retry needs time left to be worth sending: a non-streaming
        // request past its total budget keeps the failure it has.
        if attempt > 0 && !req.stream && remaining_total(upstream, ctx.started) < min_attempt_wait(upstream) {
            break;
        }
        // Retries share a budget per upstream, so an outage does not
        // multiply its load by max_attempts.
        if attempt == 0 {
            upstream.retry_budget.first_attempt(now_ms());
        } else if !matches!(reason, Some(RetryReason::RateLimited | RetryReason::KeyRejected))
            // Moving off a key that is rate-limited or bad adds no load to a
            // failing upstream: only the other retries draw on the budget.
            && !upstream.retry_budget.try_retry(req.retry_budget, now_ms())
        {
            tracing::debug!(request_id = ctx.request_id.to_str().unwrap_or("-"), upstream = %upstream.name, "retry budget spent; no retry");
            break;
        }
        let previous_key = tried.last().copied();
        if !tried.contains(&lease.index()) {
            tried.push(lease.index());
        }
        ctx.attempts += 1;
        if let (true, Some(why)) = (attempt > 0, reason) {
            metrics.retried(why);
            if previous_key != Some(lease.index()) {
                metrics.failovers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::debug!(request_id = ctx.request_id.to_str().unwrap_or("-"), upstream = %upstream.name, attempt, reason = why.label(), key = %lease.key().fingerprint, "retrying");
        }

        let (auth, token_generation) = match &upstream.auth {
            Auth::Keys => (lease.key().auth_header(), 0),
            Auth::Login(source) => match source.cached() {
                Some(cached) => cached,
                None => match Box::pin(source.header(&upstream.client, upstream.timeouts.header)).await {
                    Ok(header) => header,
                    // No token, nothing sent: this upstream's share ends (the
                    // model's next target may take the request).
                    Err(error) => {
                        last = Some(Last::Error(error));
                        break;
                    }
                },
            },
        };
        let body = match (&replay, once.take()) {
            (Some(bytes), _) => ForwardBody::full(Bytes::clone(bytes)),
            (None, Some(stream)) => stream,
            (None, None) => break,
        };
        let wait = header_wait(upstream, req.stream, ctx.started);
        let sent_at = now_ms();
        let started = Instant::now();
        let on_its_way = AtomicBool::new(false);
        let result = tokio::time::timeout(wait, upstream.send(method, &target, headers, auth, body, &on_its_way)).await;
        let waited = started.elapsed();
        ctx.upstream_wait += waited;
        let verdict = match result {
            // Still sending the client's upload when time ran out: the
            // client's slowness, not the upstream's; nothing is charged.
            Err(_) if upload_unfinished() => {
                return Err(ProxyError::BodyTimeout(wait.as_secs()));
            }
            // Still in line for an HTTP/2 stream of a saturated pool: the
            // upstream never saw it; sluice's own limit, charged to nothing.
            Err(_) if !on_its_way.load(Relaxed) => {
                tracing::warn!(request_id = ctx.request_id.to_str().unwrap_or("-"), upstream = %upstream.name, "no HTTP/2 stream came free within header_timeout (max_connections reached)");
                return Err(ProxyError::UpstreamTimeout {
                    upstream: upstream.name.to_string(),
                    after_ms: wait.as_millis() as u64,
                });
            }
            Err(_) => {
                sent = true;
                let after_ms = wait.as_millis() as u64;
                let timeout = ProxyError::UpstreamTimeout { upstream: upstream.name.to_string(), after_ms };
                // A breaker's probe must settle the breaker, and a stream's
                // headers come at once: only a routed non-streaming request
                // can be this slow by itself.
                let upstream_answered = probe.is_none() && upstream.breaker.answered.after(sent_at);
                let target_answered = upstream_answered
                    && !req.stream
                    && ctx.model.as_deref().is_some_and(|target| target.answered.after(sent_at));
                if target_answered {
                    // Others got answers from this target meanwhile: it is
                    // up, and this request is long (likely still being
                    // generated). Charging it to the key or the breaker
                    // would let one client's long requests shut out everyone.
                    tracing::info!(request_id = ctx.request_id.to_str().unwrap_or("-"), upstream = %upstream.name, after_ms, "no answer within header_timeout while the target answered others; counted against nothing");
                    last = Some(Last::Slow(timeout));
                    Verdict::Stop
                } else {
                    lease.key().fail(Failure::Timeout);
                    last = Some(if upstream_answered { Last::Stalled(timeout) } else { Last::Error(timeout) });
                    // A request that timed out was sent: the upstream may be working on it.
                    retry_if(req.replay.allows(true), RetryReason::Timeout)
                }
            }
            Ok(Err(failed)) => {
                if let Some(client_error) = watch.as_ref().and_then(|(watch, max)| watch.failure(*max)) {
                    // The client's upload broke: its own error, nobody else's.
                    return Err(client_error);
                }
                // Not the upstream's (or, mid-upload, maybe not: an upstream
                // may reset a client too slow for it): answered as it is,
                // charged to no key and no breaker.
                if failed.error.source() != ErrorSource::Upstream || upload_unfinished() {
                    return Err(failed.error);
                }
                lease.key().fail(Failure::Connect);
                sent |= failed.written;
                let why = match (&failed.error, failed.stale) {
                    (ProxyError::UpstreamConnect { .. }, _) => RetryReason::Connect,
                    (_, true) => RetryReason::StaleConnection,
                    _ => RetryReason::Protocol,
                };
                tracing::debug!(request_id = ctx.request_id.to_str().unwrap_or("-"), upstream = %upstream.name, error = %failed.error, written = failed.written, stale = failed.stale, "attempt failed");
                let again = failed.error.is_retryable() && req.replay.allows(failed.written);
                last = Some(Last::Error(failed.error));
                retry_if(again, why)
            }
            Ok(Ok(response)) => {
                sent = true;
                let status = response.status().as_u16();
                // Only a success proves the upstream generates: a fast 4xx
                // (a client's malformed request) or 5xx says nothing of it.
                if (200..300).contains(&status) {
                    let now = now_ms();
                    upstream.breaker.answered.note(now);
                    if let Some(target) = ctx.model.as_deref() {
                        target.answered.note(now);
                    }
                }
                // Steer before the 429: a key that says it has nothing left
                // rests until its reset (capped), so the next request takes another.
                if let Some(reset) = headroom::exhausted(response.headers()) {
                    let cool = reset.min(upstream.max_cooldown).min(headroom::MAX_REST);
                    upstream.rest_key(lease.key(), clock::after(cool));
                    tracing::debug!(upstream = %upstream.name, key = %lease.key().fingerprint, cool_ms = cool.as_millis() as u64, "key has no requests or tokens left; cooling until its reset");
                }
                match status {
                    429 => {
                        let asked = response
                            .headers()
                            .get(RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| retry_after::parse(v, SystemTime::now()));
                        let key = Arc::clone(lease.shared());
                        let kept = Box::pin(keep(response, lease, Failure::RateLimited, upstream)).await;
                        let too_large =
                            matches!(&kept, Last::Answer(answer, ..) if blames_the_request(kept_bytes(answer.body())));
                        last = Some(kept);
                        if too_large {
                            // Over the account's per-minute limit by itself: the
                            // client's to shrink. No key is cooled, no other key
                            // of this account asked (each would say the same).
                            tracing::info!(request_id = ctx.request_id.to_str().unwrap_or("-"), upstream = %upstream.name, key = %key.fingerprint, "the upstream refused the request as larger than its rate limit; no key cooled");
                            Verdict::Stop
                        } else {
                            let cooldown = asked.unwrap_or(upstream.cooldown).min(upstream.max_cooldown);
                            upstream.cool_key(&key, clock::after(cooldown));
                            tracing::info!(request_id = ctx.request_id.to_str().unwrap_or("-"), upstream = %upstream.name, key = %key.fingerprint, cooldown_ms = cooldown.as_millis() as u64, "key rate-limited; cooling down");
                            retry_if(req.replay.allows(true), RetryReason::RateLimited)
                        }
                    }
                    401..=403 => match &upstream.auth {
                        Auth::Login(source) if status == 401 && !token_refreshed => {
                            token_refreshed = true;
                            skip_backoff = true;
                            let refreshed =
                                Box::pin(source.refresh(&upstream.client, upstream.timeouts.header, token_generation))
                                    .await;
                            last = Some(Box::pin(keep(response, lease, Failure::Rejected, upstream)).await);
                            match refreshed {
                                Ok(_) => retry_if(req.replay.allows(true), RetryReason::TokenRefresh),
                                Err(error) => {
                                    last = Some(Last::Error(error));
                                    Verdict::Stop
                                }
                            }
                        }
                        Auth::Login(_) => {
                            last = Some(Box::pin(keep(response, lease, Failure::Rejected, upstream)).await);
                            Verdict::Stop
                        }
                        Auth::Keys => {
                            let key = Arc::clone(&upstream.keys.keys()[lease.index()]);
                            let kept = Box::pin(keep(response, lease, Failure::Rejected, upstream)).await;
                            let bad_key =
                                matches!(&kept, Last::Answer(answer, ..) if blames_the_key(kept_bytes(answer.body())));
                            last = Some(kept);
                            if bad_key {
                                upstream.disable_key(&key);
                                tracing::warn!(request_id = ctx.request_id.to_str().unwrap_or("-"), upstream = %upstream.name, key = %key.fingerprint, status, "the upstream says the key is bad; disabled until reset or reload");
                                retry_if(req.replay.allows(true), RetryReason::KeyRejected)
                            } else {
                                // About this request, as far as anyone can tell: the
                                // client gets the answer; the key is checked apart.
                                upstream.verify_key(key, status);
                                Verdict::Stop
                            }
                        }
                    },
                    500..=599 => {
                        lease.key().fail(Failure::ServerError);
                        last = Some(Box::pin(keep(response, lease, Failure::ServerError, upstream)).await);
                        retry_if(req.replay.allows(true), RetryReason::ServerError)
                    }
                    _ => Verdict::Answer(response, lease),
                }
            }
        };
        match verdict {
            Verdict::Answer(response, lease) => {
                lease.key().succeed();
                ctx.ttfb = Some(waited);
                ctx.model.as_deref().unwrap_or(&metrics.unrouted).ttfb[usize::from(req.stream)].observe(waited);
                upstream.breaker.record_success();
                if let Some(probe) = probe {
                    probe.resolve();
                }
                let key = Some(Arc::clone(&lease.key().fingerprint));
                return Ok(Tried::Answer(respond::respond(
                    response,
                    key,
                    Some(lease),
                    upstream,
                    req.stream,
                    fill.take(),
                    ctx,
                )));
            }
            Verdict::Retry(why) => reason = Some(why),
            Verdict::Stop => break,
        }
    }
    // With no attempt made (no usable key), the breaker learned nothing: an
    // unresolved probe guard re-opens it so the next request probes instead.
    if let (Some(probe), true) = (probe, last.is_some()) {
        probe.resolve();
    }
    Ok(Tried::Failed(Failed { last, breaker_open: None, sent }))
}

/// The bytes of an answer [`keep`] read whole.
fn kept_bytes(body: &UpstreamBody) -> &[u8] {
    match body {
        UpstreamBody::Buffered { bytes: Some(bytes) } => bytes,
        UpstreamBody::Buffered { bytes: None }
        | UpstreamBody::Hyper { .. }
        | UpstreamBody::H1 { .. }
        | UpstreamBody::H2 { .. } => b"",
    }
}

fn retry_if(again: bool, why: RetryReason) -> Verdict {
    if again { Verdict::Retry(why) } else { Verdict::Stop }
}

/// Reads a failed attempt's answer whole when it is small and quick, so its
/// connection goes back to the pool and its key lease ends before the loop
/// waits; otherwise drops it (closing the connection) and keeps a gateway
/// error in its place. Awaited boxed (as is a token refresh): both are rare,
/// and inline their state would enlarge, and so make dearer to move, the
/// loop's future on every request.
async fn keep(response: Response<UpstreamBody>, lease: KeyLease, failure: Failure, upstream: &Upstream) -> Last {
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let read = tokio::time::timeout(KEPT_ANSWER_WAIT, Limited::new(body, MAX_KEPT_ANSWER).collect()).await;
    let key = Arc::clone(&lease.key().fingerprint);
    drop(lease);
    match read {
        Ok(Ok(collected)) => {
            let body = UpstreamBody::Buffered { bytes: Some(collected.to_bytes()) };
            Last::Answer(Response::from_parts(parts, body), failure, key)
        }
        // Its status and what it means for the key and the breaker stay; its
        // body is replaced by one saying why.
        Ok(Err(_)) | Err(_) => {
            let mut parts = parts;
            for name in [CONTENT_LENGTH, CONTENT_ENCODING, TRANSFER_ENCODING] {
                parts.headers.remove(name);
            }
            parts.headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let message =
                format!("upstream `{}` answered {status} with a body too large or too slow to pass on", upstream.name);
            let bytes = error_json(&message, "upstream_error", None, "upstream_body_dropped");
            Last::Answer(Response::from_parts(parts, UpstreamBody::Buffered { bytes: Some(bytes) }), failure, key)
        }
    }
}
