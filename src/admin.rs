//! The operator's endpoints: `/health`, `/metrics`, `/stats` (see the
//! submodules) and the admin API (`/admin/*`, `POST /v1/models/{name}/test`,
//! and the key store's users, keys and usage in [`tenants`], also under the
//! seed service's `/api/v1/admin/*`).
//! The admin API is served only when `[admin] token` is set, and only to
//! callers presenting that token. Its handlers are async and get the whole
//! request, body included.

pub mod health;
pub mod metrics;
pub mod probe;
pub mod stats;
pub mod tenants;

use http::header::AUTHORIZATION;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::access::auth::constant_time_eq;
use crate::error::{ProxyError, json_response};
use crate::proxy::body::SluiceBody;
use crate::proxy::read::read_whole;
use crate::state::{Live, Shared};

/// How long `POST /v1/models/{name}/test` waits for the model.
pub const MODEL_TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves `/admin/*` and `POST /v1/models/{name}/test`. Without a configured
/// token the admin API does not exist (404).
pub async fn handle(
    shared: &Shared,
    live: &Live,
    request: Request<Incoming>,
) -> Result<Response<SluiceBody>, ProxyError> {
    let path = request.uri().path();
    check_admin(live, path, request.headers())?;
    let method = request.method();
    match path {
        "/admin/reload" | "/admin/reload-keys" => {
            post_only(method)?;
            let summary = shared.reload().map_err(ProxyError::ReloadFailed)?;
            let body = serde_json::json!({ "status": "reloaded", "keys": summary.keys, "added": summary.added, "removed": summary.removed });
            Ok(json_response(StatusCode::OK, body.to_string().into()))
        }
        "/admin/cache/purge" => {
            post_only(method)?;
            let body = read_whole(request.into_body(), 64 * 1024).await?;
            let model = crate::access::manage::Fields::parse(&body)?.model_name()?;
            // By the model's canonical name, which the entries carry.
            let model = model.map(|m| live.routes.get(&m).map_or(m.clone(), |r| r.name.to_string()));
            let (purged, everywhere) = shared.cache.purge_everywhere(model.as_deref()).await;
            if !everywhere {
                // This instance's copy is gone; Redis and the others' are not.
                tracing::warn!(purged, "cache purged here only: Redis did not answer");
                return Err(ProxyError::RedisUnavailable("the cache was purged on this instance only"));
            }
            tracing::info!(purged, model = model.as_deref().unwrap_or("*"), "cache purged by the admin API");
            Ok(json_response(
                StatusCode::OK,
                serde_json::json!({ "purged": purged, "model": model }).to_string().into(),
            ))
        }
        "/admin/reset-failed-keys" => {
            post_only(method)?;
            let reset = shared.reset_failed_keys();
            tracing::info!(reset, "failed keys reset by the admin API");
            Ok(json_response(StatusCode::OK, serde_json::json!({ "status": "ok", "reset": reset }).to_string().into()))
        }
        _ if let Some((which, tail)) = tenants::collection(path) => {
            let tail = tail.to_string();
            tenants::handle(shared, request, which, &tail).await
        }
        _ => match path.strip_prefix("/v1/models/").and_then(|rest| rest.strip_suffix("/test")) {
            Some(model) => {
                post_only(method)?;
                let result = probe::probe(shared, model, MODEL_TEST_TIMEOUT).await;
                let body = serde_json::to_vec(&result).map_err(|e| ProxyError::Internal(e.to_string()))?;
                Ok(json_response(StatusCode::OK, body.into()))
            }
            None => Err(ProxyError::NotFound(path.to_string())),
        },
    }
}

/// Admits a caller holding the admin token; without a configured token the
/// path does not exist (404), with a wrong one it is 401.
pub fn check_admin(live: &Live, path: &str, headers: &HeaderMap) -> Result<(), ProxyError> {
    let Some(token) = &live.config.admin_token else {
        return Err(ProxyError::NotFound(path.to_string()));
    };
    if bearer_is(headers, token.expose()) { Ok(()) } else { Err(ProxyError::AdminUnauthorized) }
}

/// Whether the request's `Authorization: Bearer` is `token` (compared in
/// constant time).
pub fn bearer_is(headers: &HeaderMap, token: &str) -> bool {
    let presented = headers
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| v[7..].trim_ascii()));
    presented.is_some_and(|p| constant_time_eq(p, token.as_bytes()))
}

fn post_only(method: &Method) -> Result<(), ProxyError> {
    if method == Method::POST {
        Ok(())
    } else {
        Err(ProxyError::MethodNotAllowed { method: method.clone(), allow: "POST" })
    }
}
