//! `GET /health` (and `/`, `/v1/health`): status, version, uptime; with the
//! admin token (or `[admin] public_health_details`) also, per upstream, its
//! key summary (with fingerprints and cooldowns) and breaker state.
//! `degraded` when some upstream has no usable key or an open breaker, or
//! the shared Redis or the key store does not answer (named under
//! `"unreachable"`); 503 `draining` once shutdown began.

use std::sync::atomic::Ordering::Relaxed;

use http::{Response, StatusCode};

use crate::clock::now_ms;
use crate::error::json_response;
use crate::proxy::body::SluiceBody;
use crate::state::{Live, Shared};
use crate::upstream::breaker::BreakerState;
use crate::upstream::keyring::KeyState;

/// The health answer, with the upstreams' details or without.
pub fn health(shared: &Shared, live: &Live, details: bool) -> Response<SluiceBody> {
    let now = now_ms();
    let mut degraded = false;
    let upstreams: Vec<serde_json::Value> = live
        .upstreams
        .iter()
        .map(|upstream| {
            let (mut available, mut cooling, mut disabled) = (0, 0, 0);
            let keys: Vec<serde_json::Value> = upstream
                .keys
                .keys()
                .iter()
                .map(|key| {
                    let (state, cooling_for_ms) = match key.state(now) {
                        KeyState::Healthy => {
                            available += 1;
                            ("healthy", None)
                        }
                        KeyState::Cooling { until_ms } => {
                            cooling += 1;
                            ("cooling", Some(until_ms - now))
                        }
                        KeyState::Disabled => {
                            disabled += 1;
                            ("disabled", None)
                        }
                    };
                    let counters = &key.counters;
                    serde_json::json!({
                        "key": &*key.fingerprint,
                        "state": state,
                        "cooling_for_ms": cooling_for_ms,
                        "requests": counters.requests.load(Relaxed),
                        "successes": counters.successes.load(Relaxed),
                        "in_flight": counters.in_flight.load(Relaxed),
                        "last_error": key.last_error().map(|f| f.label()),
                    })
                })
                .collect();
            let breaker = upstream.breaker.state();
            degraded |= available == 0 || breaker != BreakerState::Closed;
            serde_json::json!({
                "name": upstream.name.as_ref(),
                "breaker": breaker.label(),
                "keys_total": keys.len(),
                "keys_available": available,
                "keys_cooling": cooling,
                "keys_disabled": disabled,
                "keys": keys,
            })
        })
        .collect();
    // Parts several instances share: named, as they are the operator's to fix.
    let mut unreachable = Vec::new();
    if shared.cluster.as_ref().is_some_and(|c| !c.is_up()) {
        unreachable.push("redis");
    }
    if shared.store.as_ref().is_some_and(|s| !s.is_up()) {
        unreachable.push("store");
    }
    degraded |= !unreachable.is_empty();
    let draining = shared.is_draining();
    let status = match (draining, degraded) {
        (true, _) => "draining",
        (false, true) => "degraded",
        (false, false) => "ok",
    };
    let mut body = serde_json::json!({
        "status": status,
        "version": crate::VERSION,
        "uptime_seconds": shared.started.elapsed().as_secs(),
    });
    if !unreachable.is_empty() {
        body["unreachable"] = serde_json::json!(unreachable);
    }
    if details {
        body["upstreams"] = serde_json::Value::Array(upstreams);
    }
    let code = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    json_response(code, body.to_string().into())
}
