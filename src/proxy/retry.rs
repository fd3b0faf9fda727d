//! The one retry loop. Nothing below it re-sends anything; it decides every
//! re-send from the failure's own classification and the request's
//! [`Replay`] rule, and counts each one by its cause.
//!
//! Each attempt picks a key (fresh keys first, then tried ones after a
//! jittered backoff), sends, and lets the outcome decide:
//! - a usable answer goes to the client at once and is never retried;
//! - 429 cools the key (for `Retry-After`) and moves on;
//! - 401/402/403 move on only when the answer says the key itself is bad
//!   (the key is disabled); any other such answer is about the request and
//!   goes back to the client, counting against nothing, while the key is
//!   checked in the background (see [`Upstream::verify_key`]);
//! - 5xx, connect errors, resets and timeouts count against the key and are
//!   retried when the request may be sent again;
//! - a failure of the client's own upload ends the request with the client's
//!   error (413, 400, 499) and touches no key and no breaker.
//!
//! A failed attempt's answer is read (small and fast) or dropped before the
//! loop waits, so its connection and key lease are free during the backoff.
//! The breaker sees one outcome per request, and only upstream failures.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, TRANSFER_ENCODING};
use http::{HeaderValue, Response};
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;

use crate::clock::{self, now_ms};
use crate::error::{ErrorSource, ProxyError, error_json};
use crate::proxy::body::SluiceBody;
use crate::proxy::{Prepared, headers, respond};
use crate::telemetry::RequestContext;
use crate::telemetry::metrics::RetryReason;
use crate::upstream::body::{ForwardBody, UpstreamBody};
use crate::upstream::breaker::Admission;
use crate::upstream::keyring::{Failure, KeyLease, blames_the_key};
use crate::upstream::{Auth, Upstream, retry_after};

/// Largest failed-attempt answer kept whole (error bodies are small JSON).
const MAX_KEPT_ANSWER: usize = 64 << 10;
/// Longest wait for a failed attempt's answer to arrive whole.
const KEPT_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// The last failed attempt, kept to answer with when the budget runs out.
#[expect(clippy::large_enum_variant, reason = "one on the stack per request, never in a collection")]
enum Last {
    /// The upstream's own answer (429, 401/402/403, 5xx), read whole, and the
    /// fingerprint of the key it came on.
    Answer(Response<UpstreamBody>, Failure, Arc<str>),
    /// No answer: connect error, reset, timeout.
    Error(ProxyError),
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

/// Sends a prepared request with retries and failover; the first usable
/// answer is returned.
pub async fn send(prepared: Prepared, ctx: &mut RequestContext) -> Result<Response<SluiceBody>, ProxyError> {
    let Prepared { plan, method, uri, mut headers, mut fill } = prepared;
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
    let watch = plan.body.upload_watch();
    let (replay, mut once) = match plan.body {
        ForwardBody::Full { bytes } => (Some(bytes.unwrap_or_default()), None),
        upload @ ForwardBody::Upload { .. } => (None, Some(upload)),
    };
    // An upload the client has not finished sending: whatever fails now may
    // be the client's slowness as much as the upstream's fault.
    let upload_unfinished = || watch.as_ref().is_some_and(|(watch, _)| !watch.is_finished());
    let policy = upstream.retry;
    let max_attempts = if replay.is_some() { policy.max_attempts } else { 1 };
    let mut tried: Vec<usize> = Vec::with_capacity(policy.max_key_retries as usize);
    let mut last: Option<Last> = None;
    let mut reuses = 0u32;
    let mut token_refreshed = false;
    let mut skip_backoff = false;
    let mut reason: Option<RetryReason> = None;

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
        if attempt > 0 && !plan.stream && remaining_total(&upstream, ctx.started) < min_attempt_wait(&upstream) {
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
                None => Box::pin(source.header(&upstream.client, upstream.timeouts.header)).await?,
            },
        };
        let body = match (&replay, once.take()) {
            (Some(bytes), _) => ForwardBody::full(Bytes::clone(bytes)),
            (None, Some(stream)) => stream,
            (None, None) => break,
        };
        let wait = header_wait(&upstream, plan.stream, ctx.started);
        let sent = Instant::now();
        let result = tokio::time::timeout(wait, upstream.send(&method, &target, &headers, auth, body)).await;
        let waited = sent.elapsed();
        ctx.upstream_wait += waited;
        let verdict = match result {
            // Still sending the client's upload when time ran out: the
            // client's slowness, not the upstream's; nothing is charged.
            Err(_) if upload_unfinished() => {
                return Err(ProxyError::BodyTimeout(wait.as_secs()));
            }
            Err(_) => {
                lease.key().fail(Failure::Timeout);
                let after_ms = wait.as_millis() as u64;
                last = Some(Last::Error(ProxyError::UpstreamTimeout { upstream: upstream.name.to_string(), after_ms }));
                // A request that timed out was sent: the upstream may be working on it.
                retry_if(plan.replay.allows(true), RetryReason::Timeout)
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
                let why = match (&failed.error, failed.stale) {
                    (ProxyError::UpstreamConnect { .. }, _) => RetryReason::Connect,
                    (_, true) => RetryReason::StaleConnection,
                    _ => RetryReason::Protocol,
                };
                tracing::debug!(request_id = ctx.request_id.to_str().unwrap_or("-"), upstream = %upstream.name, error = %failed.error, written = failed.written, stale = failed.stale, "attempt failed");
                let again = failed.error.is_retryable() && plan.replay.allows(failed.written);
                last = Some(Last::Error(failed.error));
                retry_if(again, why)
            }
            Ok(Ok(response)) => {
                let status = response.status().as_u16();
                match status {
                    429 => {
                        let asked = response
                            .headers()
                            .get(RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| retry_after::parse(v, SystemTime::now()));
                        let cooldown = asked.unwrap_or(upstream.cooldown).min(upstream.max_cooldown);
                        let key = lease.key();
                        key.cool_until(clock::after(cooldown));
                        tracing::info!(request_id = ctx.request_id.to_str().unwrap_or("-"), upstream = %upstream.name, key = %key.fingerprint, cooldown_ms = cooldown.as_millis() as u64, "key rate-limited; cooling down");
                        last = Some(Box::pin(keep(response, lease, Failure::RateLimited, &upstream)).await);
                        retry_if(plan.replay.allows(true), RetryReason::RateLimited)
                    }
                    401..=403 => match &upstream.auth {
                        Auth::Login(source) if status == 401 && !token_refreshed => {
                            token_refreshed = true;
                            skip_backoff = true;
                            Box::pin(source.refresh(&upstream.client, upstream.timeouts.header, token_generation))
                                .await?;
                            last = Some(Box::pin(keep(response, lease, Failure::Rejected, &upstream)).await);
                            retry_if(plan.replay.allows(true), RetryReason::TokenRefresh)
                        }
                        Auth::Login(_) => {
                            last = Some(Box::pin(keep(response, lease, Failure::Rejected, &upstream)).await);
                            Verdict::Stop
                        }
                        Auth::Keys => {
                            let key = Arc::clone(&upstream.keys.keys()[lease.index()]);
                            let kept = Box::pin(keep(response, lease, Failure::Rejected, &upstream)).await;
                            let bad_key =
                                matches!(&kept, Last::Answer(answer, ..) if blames_the_key(kept_bytes(answer.body())));
                            last = Some(kept);
                            if bad_key {
                                key.disable();
                                tracing::warn!(request_id = ctx.request_id.to_str().unwrap_or("-"), upstream = %upstream.name, key = %key.fingerprint, status, "the upstream says the key is bad; disabled until reset or reload");
                                retry_if(plan.replay.allows(true), RetryReason::KeyRejected)
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
                        last = Some(Box::pin(keep(response, lease, Failure::ServerError, &upstream)).await);
                        retry_if(plan.replay.allows(true), RetryReason::ServerError)
                    }
                    _ => Verdict::Answer(response, lease),
                }
            }
        };
        match verdict {
            Verdict::Answer(response, lease) => {
                lease.key().succeed();
                ctx.ttfb = Some(waited);
                ctx.model.as_deref().unwrap_or(&metrics.unrouted).ttfb[usize::from(plan.stream)].observe(waited);
                upstream.breaker.record_success();
                if let Some(probe) = probe {
                    probe.resolve();
                }
                let key = Some(Arc::clone(&lease.key().fingerprint));
                return Ok(respond::respond(response, key, Some(lease), &upstream, plan.stream, fill.take(), ctx));
            }
            Verdict::Retry(why) => reason = Some(why),
            Verdict::Stop => break,
        }
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

/// The bytes of an answer [`keep`] read whole.
fn kept_bytes(body: &UpstreamBody) -> &[u8] {
    match body {
        UpstreamBody::Buffered { bytes: Some(bytes) } => bytes,
        UpstreamBody::Buffered { bytes: None } | UpstreamBody::Hyper { .. } | UpstreamBody::H1 { .. } => b"",
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

/// The answer when no attempt succeeded.
fn give_up(
    upstream: &Upstream,
    last: Option<Last>,
    stream: bool,
    ctx: &RequestContext,
) -> Result<Response<SluiceBody>, ProxyError> {
    let now = now_ms();
    let name = upstream.name.to_string();
    let retry_after = upstream.keys.earliest_ready(now).map(|at| at.saturating_sub(now).div_ceil(1000).max(1));
    match &last {
        // The breaker counts failures of the upstream itself, not of our keys;
        // an upstream that answered (a 429, a refusal) is up.
        Some(Last::Error(_) | Last::Answer(_, Failure::ServerError, _)) => upstream.breaker.record_failure(now),
        Some(Last::Answer(..)) => upstream.breaker.record_success(),
        None => {}
    }
    let usable = upstream.keys.any_usable(now);
    match last {
        None => Err(ProxyError::NoAvailableKey { upstream: name, retry_after }),
        Some(Last::Error(error)) => Err(error),
        Some(Last::Answer(_, Failure::RateLimited, _)) if !usable => {
            Err(ProxyError::AllKeysRateLimited { upstream: name, retry_after })
        }
        Some(Last::Answer(_, Failure::Rejected, _)) if !usable && matches!(upstream.auth, Auth::Keys) => {
            Err(ProxyError::NoAvailableKey { upstream: name, retry_after })
        }
        // Budget spent with keys left, a 5xx, or a refusal about the request:
        // the upstream's own answer, untouched.
        Some(Last::Answer(response, failure, key)) => {
            if ctx.attempts > 1 || failure == Failure::ServerError {
                tracing::warn!(
                    request_id = ctx.request_id.to_str().unwrap_or("-"),
                    upstream = %upstream.name,
                    attempts = ctx.attempts,
                    status = response.status().as_u16(),
                    "request failed after retries; the upstream's last answer goes to the client"
                );
            }
            Ok(respond::respond(response, Some(key), None, upstream, stream, None, ctx))
        }
    }
}

/// What is left of a non-streaming request's `total_timeout`.
fn remaining_total(upstream: &Upstream, started: Instant) -> Duration {
    upstream.timeouts.total.saturating_sub(started.elapsed())
}

/// The least time to headers a retry must have left to be sent at all: an
/// attempt cut off at once would make the upstream generate (and bill) an
/// answer nobody waits for.
fn min_attempt_wait(upstream: &Upstream) -> Duration {
    MIN_ATTEMPT_WAIT.min(upstream.timeouts.header)
}

/// See [`min_attempt_wait`].
const MIN_ATTEMPT_WAIT: Duration = Duration::from_secs(1);

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

/// `x-should-retry: false`, added to an answer when sluice already retried:
/// the OpenAI SDKs honour it, so one SDK call is not multiplied again.
pub fn no_more_retries() -> (http::HeaderName, HeaderValue) {
    (http::HeaderName::from_static("x-should-retry"), HeaderValue::from_static("false"))
}

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
