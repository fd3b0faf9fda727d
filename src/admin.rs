//! `/health` and the admin API (`/admin/*`). The admin API is served only when
//! `[admin] token` is set, and only to callers presenting that token.

use http::header::AUTHORIZATION;
use http::{HeaderMap, Method, StatusCode};

use crate::access::auth::constant_time_eq;
use crate::body::SluiceBody;
use crate::clock::now_ms;
use crate::error::{ProxyError, json_response};
use crate::proxy::keyring::KeyState;
use crate::state::{Live, Shared};

/// `GET /health`: status, version, uptime, and per upstream its key summary
/// (with fingerprints and cooldowns) and breaker state. `degraded` when some
/// upstream has no usable key or an open breaker; 503 `draining` during shutdown.
pub fn health(shared: &Shared, live: &Live) -> http::Response<SluiceBody> {
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
                    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
                    serde_json::json!({
                        "key": &*key.fingerprint,
                        "state": state,
                        "cooling_for_ms": cooling_for_ms,
                        "requests": load(&counters.requests),
                        "successes": load(&counters.successes),
                        "in_flight": load(&counters.in_flight),
                        "last_error": key.last_error().map(|f| f.label()),
                    })
                })
                .collect();
            let breaker = upstream.breaker.state();
            degraded |= available == 0 || breaker != crate::proxy::breaker::BreakerState::Closed;
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
    let draining = shared.is_draining();
    let status = match (draining, degraded) {
        (true, _) => "draining",
        (false, true) => "degraded",
        (false, false) => "ok",
    };
    let body = serde_json::json!({
        "status": status,
        "version": crate::VERSION,
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "upstreams": upstreams,
    });
    let code = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    json_response(code, body.to_string().into())
}

/// Serves `/admin/*`. Without a configured token the admin API does not exist (404).
pub fn handle(
    shared: &Shared,
    live: &Live,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<http::Response<SluiceBody>, ProxyError> {
    check_admin(live, path, headers)?;
    match path {
        "/admin/reload" | "/admin/reload-keys" => {
            post_only(method)?;
            let summary = shared.reload().map_err(ProxyError::ReloadFailed)?;
            let body = serde_json::json!({ "status": "reloaded", "keys": summary.keys, "added": summary.added, "removed": summary.removed });
            Ok(json_response(StatusCode::OK, body.to_string().into()))
        }
        "/admin/reset-failed-keys" => {
            post_only(method)?;
            let reset = shared.reset_failed_keys();
            tracing::info!(reset, "failed keys reset by the admin API");
            Ok(json_response(StatusCode::OK, serde_json::json!({ "status": "ok", "reset": reset }).to_string().into()))
        }
        _ => Err(ProxyError::NotFound(path.to_string())),
    }
}

/// Admits a caller holding the admin token; without a configured token the
/// path does not exist (404), with a wrong one it is 401.
pub fn check_admin(live: &Live, path: &str, headers: &HeaderMap) -> Result<(), ProxyError> {
    let Some(token) = &live.config.admin_token else {
        return Err(ProxyError::NotFound(path.to_string()));
    };
    let presented = headers
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| v[7..].trim_ascii()));
    if presented.is_some_and(|p| constant_time_eq(p, token.expose().as_bytes())) {
        Ok(())
    } else {
        Err(ProxyError::AdminUnauthorized)
    }
}

/// How long `POST /v1/models/{name}/test` waits for the model.
pub const MODEL_TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `POST /v1/models/{name}/test` (admin token): a one-token chat through the real path.
pub async fn test_model(
    shared: &Shared,
    live: &Live,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<http::Response<SluiceBody>, ProxyError> {
    check_admin(live, path, headers)?;
    post_only(method)?;
    let model = path.strip_prefix("/v1/models/").and_then(|rest| rest.strip_suffix("/test")).unwrap_or_default();
    let result = crate::probe::probe(shared, model, MODEL_TEST_TIMEOUT).await;
    let body = serde_json::to_vec(&result).map_err(|e| ProxyError::Internal(e.to_string()))?;
    Ok(json_response(StatusCode::OK, body.into()))
}

fn post_only(method: &Method) -> Result<(), ProxyError> {
    if method == Method::POST { Ok(()) } else { Err(ProxyError::MethodNotAllowed(method.clone())) }
}
