//! The plan stage: which upstream serves a request, the exact body sent, and
//! whether the request may be sent again after an attempt that may have
//! reached the upstream.
//!
//! | request | re-sent after a retryable failure |
//! |---|---|
//! | `POST` to chat/completions, completions, embeddings, responses, or any JSON body with a `model` | yes (inference: the answer is generated afresh) |
//! | `GET`, `HEAD`, `OPTIONS`, `PUT`, `DELETE` | yes (idempotent by RFC 9110) |
//! | any other `POST` (`/v1/threads/*/runs`, `/v1/batches`, ...) | only when no byte of it reached the upstream |
//! | an upload streamed through (multipart, octet-stream) | never: it is not kept, so it is sent once |

use std::sync::Arc;

use bytes::Bytes;
use http::Method;

use crate::error::ProxyError;
use crate::proxy::{is_model_endpoint, sniff};
use crate::routes::Route;
use crate::state::Live;
use crate::telemetry::metrics::ModelMetrics;
use crate::upstream::Upstream;
use crate::upstream::body::ForwardBody;

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
}

/// A request sluice does not route by model (no JSON body, or an upload):
/// it goes unchanged to the fallback upstream.
pub fn plan_opaque(live: &Live, method: &Method, body: ForwardBody) -> Result<Plan, ProxyError> {
    let upstream = live.fallback_upstream().ok_or(ProxyError::NoModel)?;
    Ok(Plan {
        upstream: Arc::clone(upstream),
        body,
        body_rewritten: false,
        stream: false,
        model: None,
        replay: Replay::of(method, false),
    })
}

/// Routes a JSON body and rewrites it if the route asks for it.
pub fn plan_json(live: &Live, method: &Method, path: &str, bytes: Bytes) -> Result<Plan, ProxyError> {
    let model_endpoint = is_model_endpoint(path);
    if bytes.is_empty() && !model_endpoint {
        return plan_opaque(live, method, ForwardBody::full(bytes));
    }
    if bytes.is_empty() {
        return Err(ProxyError::EmptyBody);
    }
    let routes = &live.routes;
    let sniffed = sniff::sniff(&bytes, &routes.param_names)?;
    let (route, new_model, insert_model): (&Route, Option<&str>, Option<String>) = match sniffed.model.as_deref() {
        Some(model) => {
            let route = routes.get(model).ok_or_else(|| ProxyError::UnknownModel(model.to_string()))?;
            let rename = match (&route.target, &route.target_json) {
                (Some(target), Some(json)) if target.as_ref() != model => Some(json.as_ref()),
                _ => None,
            };
            (route, rename, None)
        }
        None if !model_endpoint => {
            let mut plan = plan_opaque(live, method, ForwardBody::full(bytes.clone()))?;
            plan.stream = sniffed.stream;
            return Ok(plan);
        }
        None => {
            let (name, route) = routes.default_route().ok_or(ProxyError::NoModel)?;
            let json = match &route.target_json {
                Some(json) => json.to_string(),
                None => serde_json::Value::from(name).to_string(),
            };
            (route, None, Some(format!("\"model\":{json}")))
        }
    };
    let upstream = Arc::clone(&live.upstreams[route.upstream]);
    let model = Some(Arc::clone(&route.metrics));
    let replay = Replay::of(method, true);
    let missing_defaults = route.defaults.iter().filter(|(bit, _)| sniffed.present & (1 << bit) == 0);
    if new_model.is_none() && insert_model.is_none() && missing_defaults.clone().next().is_none() {
        let body = ForwardBody::full(bytes.clone());
        return Ok(Plan { upstream, body, body_rewritten: false, stream: sniffed.stream, model, replay });
    }
    let mut inserts: Vec<&[u8]> = Vec::with_capacity(route.defaults.len() + 1);
    inserts.extend(insert_model.as_deref().map(str::as_bytes));
    inserts.extend(missing_defaults.map(|(_, member)| member.as_ref()));
    let rewritten = sniff::splice(&bytes, &sniffed, new_model, &inserts);
    Ok(Plan {
        upstream,
        body: ForwardBody::full(rewritten),
        body_rewritten: true,
        stream: sniffed.stream,
        model,
        replay,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_table() {
        for method in [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE] {
            assert_eq!(Replay::of(&method, false), Replay::Safe, "{method}");
        }
        assert_eq!(Replay::of(&Method::POST, true), Replay::Safe);
        assert_eq!(Replay::of(&Method::POST, false), Replay::UnsentOnly);
        assert_eq!(Replay::of(&Method::PATCH, false), Replay::UnsentOnly);
        assert!(Replay::UnsentOnly.allows(false) && !Replay::UnsentOnly.allows(true));
        assert!(Replay::Safe.allows(true));
    }
}
