//! The one retry loop. Nothing below it re-sends anything; it decides every
//! re-send from the failure's own classification and the request's
//! [`Replay`] rule, and counts each one by its cause.
//!
//! A request tries its model's targets in order (see
//! [`crate::routes::Route::order`]): on each, `attempts` spends that
//! upstream's budget (`max_attempts`, `max_key_retries`, its retry budget,
//! what is left of `total_timeout`); when it ends without a usable answer
//! for a reason in the model's `fallback_on`, and the request may be sent
//! again, the next target gets it. Each attempt picks a key (fresh keys
//! first, then tried ones after a jittered backoff), sends, and lets the
//! outcome decide:
//! - a usable answer goes to the client at once and is never retried;
//! - 429 cools the key (for `Retry-After`) and moves on, unless the answer
//!   says the request alone is over the account's limit ("Request too
//!   large"): that goes back to the client and cools nothing; a key whose
//!   answer says it has no requests or tokens left rests until its reset (at
//!   most [`crate::upstream::headroom::MAX_REST`]), counted as no failure;
//! - 401/402/403 move on only when the answer says the key itself is bad
//!   (the key is disabled); any other such answer is about the request and
//!   goes back to the client, counting against nothing, while the key is
//!   checked in the background (see [`Upstream::verify_key`]);
//! - 5xx, connect errors, resets and timeouts count against the key and are
//!   retried when the request may be sent again; but a non-streaming
//!   request's timeout while its target answered other requests is its own
//!   length (a long generation): a 504 that counts against no key and no
//!   breaker, and is not re-sent; and no timeout counts against the breaker
//!   while the upstream answered other requests (it is up);
//! - a failure of the client's own upload ends the request with the client's
//!   error (413, 400, 499) and touches no key and no breaker.
//!
//! A failed attempt's answer is read (small and fast) or dropped before the
//! loop waits, so its connection and key lease are free during the backoff.
//! Each breaker sees one outcome per request, and only upstream failures.

mod attempts;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use http::{HeaderValue, Method, Response, Uri};

use crate::clock::now_ms;
use crate::config::FallbackOn;
use crate::error::ProxyError;
use crate::proxy::body::SluiceBody;
use crate::proxy::plan::Replay;
use crate::proxy::{Prepared, headers, respond};
use crate::telemetry::RequestContext;
use crate::upstream::body::ForwardBody;
use crate::upstream::keyring::Failure;
use crate::upstream::{Auth, Upstream};
use attempts::{Failed, Last, Tried};

/// What every target of a request shares.
pub(super) struct Request<'a> {
    method: &'a Method,
    uri: &'a Uri,
    stream: bool,
    replay: Replay,
    retry_budget: f64,
}

/// Sends a prepared request with retries, failover between keys, and
/// fallback between the model's targets; the first usable answer is returned.
pub async fn send(prepared: Prepared, ctx: &mut RequestContext) -> Result<Response<SluiceBody>, ProxyError> {
    let Prepared { plan, method, uri, mut headers, mut fill } = prepared;
    // Fallbacks may get a body of another length: only a body sluice did not
    // touch, to one target, keeps the client's Content-Length.
    let rewritten = plan.body_rewritten || !plan.fallbacks.is_empty();
    headers::to_upstream(&mut headers, &ctx.request_id, rewritten);
    let req = Request {
        method: &method,
        uri: &uri,
        stream: plan.stream,
        replay: plan.replay,
        retry_budget: plan.retry_budget,
    };
    let fallback_on = plan.fallback_on;
    let mut rest = plan.fallbacks.into_iter();
    let (mut upstream, mut body, mut deployment) = (plan.upstream, plan.body, plan.deployment);
    ctx.upstream_model = plan.upstream_model;
    loop {
        ctx.upstream = Some(Arc::clone(&upstream.name));
        ctx.upstream_header = Some(upstream.name_header.clone());
        let mut target_headers = if rest.len() == 0 { std::mem::take(&mut headers) } else { headers.clone() };
        headers::strip_credential(&mut target_headers, &upstream.auth_name);
        upstream.add_extra_headers(&mut target_headers);
        // Boxed: inline, the attempts' state (kilobytes, mostly the send
        // future) would make every request's future that much larger to
        // move into its box; one allocation per target tried is cheaper.
        let tried =
            Box::pin(attempts::attempt(&upstream, body, deployment.as_deref(), &target_headers, &req, &mut fill, ctx))
                .await?;
        let failed = match tried {
            Tried::Answer(response) => return Ok(response),
            Tried::Failed(failed) => failed,
        };
        record(&upstream, &failed);
        let reason = fallback_reason(&upstream, &failed);
        let may_resend = req.replay.allows(failed.sent);
        if let (Some(why), true) = (reason, may_resend)
            && fallback_on.contains(why)
            && let Some(next) = rest.next()
            // A non-streaming request needs time left for the next target to
            // answer: one sent with none would be generated and billed unread.
            && (req.stream || remaining_total(&next.upstream, ctx.started) >= min_attempt_wait(&next.upstream))
        {
            ctx.telemetry().metrics.fallen_back(why);
            tracing::info!(
                request_id = ctx.request_id.to_str().unwrap_or("-"),
                from = %upstream.name,
                to = %next.upstream.name,
                reason = ?why,
                "falling back to the model's next target"
            );
            (upstream, body, deployment) = (next.upstream, ForwardBody::full(next.body), next.deployment);
            ctx.upstream_model = next.upstream_model;
            ctx.model = Some(next.model);
            continue;
        }
        return answer(&upstream, failed, req.stream, ctx);
    }
}

/// What a failed upstream means for the next target: `None` when it was
/// about the request (a refusal), which no other target would answer better.
fn fallback_reason(upstream: &Upstream, failed: &Failed) -> Option<FallbackOn> {
    if failed.breaker_open.is_some() {
        return Some(FallbackOn::BreakerOpen);
    }
    match &failed.last {
        None => Some(FallbackOn::NoKey),
        Some(Last::Error(ProxyError::UpstreamTimeout { .. }) | Last::Stalled(_)) => Some(FallbackOn::Timeout),
        Some(Last::Error(_)) => Some(FallbackOn::Connect),
        // A long request: another target would take as long, and this one
        // is likely still generating (and billing) it.
        Some(Last::Slow(_)) => None,
        Some(Last::Answer(_, Failure::ServerError, _)) => Some(FallbackOn::ServerError),
        Some(Last::Answer(_, Failure::RateLimited, _)) => Some(FallbackOn::RateLimited),
        // Every key refused as bad: the upstream has none left.
        Some(Last::Answer(_, Failure::Rejected, _)) if !upstream.keys.any_usable(now_ms()) => Some(FallbackOn::NoKey),
        Some(Last::Answer(..)) => None,
    }
}

/// Tells the upstream's breaker how its share ended: it counts failures of
/// the upstream itself, not of our keys; an upstream that answered (a 429, a
/// refusal) is up.
fn record(upstream: &Upstream, failed: &Failed) {
    match &failed.last {
        Some(Last::Error(_) | Last::Answer(_, Failure::ServerError, _)) => upstream.breaker.record_failure(now_ms()),
        // Neither up nor down: the upstream answered others meanwhile.
        Some(Last::Slow(_) | Last::Stalled(_)) => {}
        Some(Last::Answer(..)) => upstream.breaker.record_success(),
        None => {}
    }
}

/// The answer when no target gave a usable one: the last upstream's own
/// answer where it had one, else sluice's error.
fn answer(
    upstream: &Upstream,
    failed: Failed,
    stream: bool,
    ctx: &RequestContext,
) -> Result<Response<SluiceBody>, ProxyError> {
    let now = now_ms();
    let name = upstream.name.to_string();
    if let Some(retry_after) = failed.breaker_open {
        return Err(ProxyError::UpstreamUnavailable { upstream: name, retry_after: Some(retry_after) });
    }
    let retry_after = upstream.keys.earliest_ready(now).map(|at| at.saturating_sub(now).div_ceil(1000).max(1));
    let usable = upstream.keys.any_usable(now);
    match failed.last {
        None => Err(ProxyError::NoAvailableKey { upstream: name, retry_after }),
        Some(Last::Error(error) | Last::Slow(error) | Last::Stalled(error)) => Err(error),
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
