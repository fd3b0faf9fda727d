//! The plan stage: which upstream serves a request, the exact body sent, and
//! whether the request may be sent again after an attempt that may have
//! reached the upstream.
//!
//! | request | re-sent after a retryable failure |
//! |---|---|
//! | `POST` to chat/completions, completions, embeddings, responses, moderations, images/generations, audio/speech | yes (inference: the answer is generated afresh, nothing is created) |
//! | `GET`, `HEAD`, `OPTIONS`, `PUT`, `DELETE` | yes (idempotent by RFC 9110) |
//! | any other `POST` (`/v1/threads/*/runs`, `/v1/batches`, ...) | only when no byte of it reached the upstream |
//! | an upload streamed through (multipart, octet-stream) | never: it is not kept, so it is sent once |

use std::sync::Arc;

use bytes::Bytes;
use http::Method;

use crate::access::table::{Allowed, Client};
use crate::error::ProxyError;
use crate::proxy::{is_model_endpoint, sniff};
use crate::routes::Route;
use crate::state::Live;
use crate::telemetry::metrics::ModelMetrics;
use crate::upstream::Upstream;
use crate::upstream::body::ForwardBody;

/// Endpoints that generate an answer and create nothing: a request to one
/// may be sent again. A `model` in the body of any other POST
/// (`/v1/fine_tuning/jobs`, `/v1/assistants`, runs) routes it, but does not
/// make it safe to repeat.
pub const INFERENCE_PATHS: [&str; 7] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/audio/speech",
];

/// Endpoints whose streams take `stream_options`.
const STREAM_OPTIONS_PATHS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

/// When a request may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// After any retryable failure, even if the upstream may have received it.
    Safe,
    /// Only when no byte of it reached the upstream (connect failed, the
    /// request was handed back unsent, or the peer refused the stream).
    UnsentOnly,
}

impl Replay {
    /// Whether a failed attempt that `written` (or not) may be repeated.
    pub fn allows(self, written: bool) -> bool {
        match self {
            Self::Safe => true,
            Self::UnsentOnly => !written,
        }
    }

    /// The rule for a request by method, and whether it is an inference call.
    fn of(method: &Method, inference: bool) -> Self {
        let idempotent = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE);
        if inference || idempotent { Self::Safe } else { Self::UnsentOnly }
    }
}

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
    /// When the request may be sent again.
    pub replay: Replay,
    /// Whether its answer may be cached: a model endpoint whose route allows it.
    pub cacheable: bool,
}

/// Endpoints whose answers the response cache keeps.
pub const CACHE_PATHS: [&str; 3] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"];

/// Whether a key limited to some models may use `route` (canonical name)
/// when it asked for `requested` (403 `model_not_allowed` if not).
fn authorize(allowed: Option<&Allowed>, route: &str, requested: &str) -> Result<(), ProxyError> {
    match allowed {
        Some(allowed) if !allowed.permits(route, requested) => Err(ProxyError::ModelNotAllowed(requested.to_string())),
        _ => Ok(()),
    }
}

/// A request sluice does not route by model (no JSON body, or an upload):
/// it goes unchanged to the fallback upstream, the default model's. A key
/// limited to some models may send one only if the default model is one of
/// them, so such a key never reaches an upstream none of its models use.
pub fn plan_opaque(
    live: &Live,
    method: &Method,
    body: ForwardBody,
    allowed: Option<&Allowed>,
) -> Result<Plan, ProxyError> {
    if let Some(Allowed::Only(_)) = allowed {
        match live.routes.default_route() {
            Some((name, route)) => authorize(allowed, &route.name, name)?,
            // No default model: the request would go to the first upstream,
            // which no model grant covers.
            None => return Err(ProxyError::ModelNotAllowed("*".into())),
        }
    }
    let upstream = live.fallback_upstream().ok_or(ProxyError::NoModel)?;
    Ok(Plan {
        upstream: Arc::clone(upstream),
        body,
        body_rewritten: false,
        stream: false,
        model: None,
        replay: Replay::of(method, false),
        cacheable: false,
    })
}

/// The member that makes a streamed chat end with its token usage.
const INCLUDE_USAGE: &[u8] = br#""stream_options":{"include_usage":true}"#;

/// Routes a JSON body and rewrites it if the route asks for it. A key
/// limited to some models is held to them; a key with a token budget has
/// its streamed chats ask for their usage, so the budget sees every token.
pub fn plan_json(
    live: &Live,
    method: &Method,
    path: &str,
    bytes: Bytes,
    client: Option<&Client>,
) -> Result<Plan, ProxyError> {
    let allowed = client.map(|c| &c.allowed);
    let model_endpoint = is_model_endpoint(path);
    if bytes.is_empty() && !model_endpoint {
        return plan_opaque(live, method, ForwardBody::full(bytes), allowed);
    }
    if bytes.is_empty() {
        return Err(ProxyError::EmptyBody);
    }
    let routes = &live.routes;
    let sniffed = sniff::sniff(&bytes, &routes.param_names)?;
    let (route, new_model, insert_model): (&Route, Option<&str>, Option<String>) = match sniffed.model.as_deref() {
        Some(model) => {
            let route = routes.get(model).ok_or_else(|| ProxyError::UnknownModel(model.to_string()))?;
            authorize(allowed, &route.name, model)?;
            let rename = match (&route.target, &route.target_json) {
                (Some(target), Some(json)) if target.as_ref() != model => Some(json.as_ref()),
                _ => None,
            };
            (route, rename, None)
        }
        None if !model_endpoint => {
            let mut plan = plan_opaque(live, method, ForwardBody::full(bytes.clone()), allowed)?;
            plan.stream = sniffed.stream;
            return Ok(plan);
        }
        None => {
            let (name, route) = routes.default_route().ok_or(ProxyError::NoModel)?;
            authorize(allowed, &route.name, name)?;
            let json = match &route.target_json {
                Some(json) => json.to_string(),
                None => serde_json::Value::from(name).to_string(),
            };
            (route, None, Some(format!("\"model\":{json}")))
        }
    };
    let upstream = Arc::clone(&live.upstreams[route.upstream]);
    let model = Some(Arc::clone(&route.metrics));
    let replay = Replay::of(method, INFERENCE_PATHS.contains(&path));
    let cacheable = route.cache && *method == Method::POST && CACHE_PATHS.contains(&path);
    // A model's default parameters are generation parameters: they go into
    // model endpoints' bodies only, never into a job or an assistant.
    let defaults: &[(u32, Bytes)] = if model_endpoint { &route.defaults } else { &[] };
    let missing_defaults = defaults.iter().filter(|(bit, _)| sniffed.present & (1 << bit) == 0);
    let meter_stream = sniffed.stream
        && STREAM_OPTIONS_PATHS.contains(&path)
        && client.is_some_and(|c| c.limits.tokens_per_day.is_some());
    let add_usage = match (meter_stream, sniffed.stream_usage) {
        (false, _) | (true, Some(true)) => false,
        (true, None) => true,
        (true, Some(false)) => {
            return Err(ProxyError::BadField {
                field: "stream_options",
                reason: "this key has a token budget: stream with `include_usage: true`, or leave `stream_options` out"
                    .into(),
            });
        }
    };
    if new_model.is_none() && insert_model.is_none() && !add_usage && missing_defaults.clone().next().is_none() {
        let body = ForwardBody::full(bytes.clone());
        return Ok(Plan { upstream, body, body_rewritten: false, stream: sniffed.stream, model, replay, cacheable });
    }
    let mut inserts: Vec<&[u8]> = Vec::with_capacity(defaults.len() + 2);
    inserts.extend(insert_model.as_deref().map(str::as_bytes));
    if add_usage {
        inserts.push(INCLUDE_USAGE);
    }
    inserts.extend(missing_defaults.map(|(_, member)| member.as_ref()));
    let rewritten = sniff::splice(&bytes, &sniffed, new_model, &inserts);
    Ok(Plan {
        upstream,
        body: ForwardBody::full(rewritten),
        body_rewritten: true,
        stream: sniffed.stream,
        model,
        replay,
        cacheable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::MODEL_ENDPOINTS as MODEL_ENDPOINTS_FOR_TEST;

    #[test]
    fn the_replay_table() {
        for method in [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE] {
            assert_eq!(Replay::of(&method, false), Replay::Safe, "{method}");
        }
        assert_eq!(Replay::of(&Method::POST, true), Replay::Safe);
        for path in MODEL_ENDPOINTS_FOR_TEST {
            assert!(INFERENCE_PATHS.contains(&path), "{path}");
        }
        assert_eq!(Replay::of(&Method::POST, false), Replay::UnsentOnly);
        assert_eq!(Replay::of(&Method::PATCH, false), Replay::UnsentOnly);
        assert!(Replay::UnsentOnly.allows(false) && !Replay::UnsentOnly.allows(true));
        assert!(Replay::Safe.allows(true));
    }
}
