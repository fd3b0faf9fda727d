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

use std::ops::Range;

use http::HeaderValue;

use crate::access::table::{Allowed, Client};
use crate::config::{CapMode, FallbackSet};
use crate::error::ProxyError;
use crate::proxy::sniff::{Sniffed, TOKEN_LIMIT_NAMES};
use crate::proxy::{is_model_endpoint, sniff};
use crate::routes::{Route, Routes, Target};
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
    /// The upstream that serves it first.
    pub upstream: Arc<Upstream>,
    /// The body to send there (replayable when `Full`).
    pub body: ForwardBody,
    /// Whether sluice rewrote the body.
    pub body_rewritten: bool,
    /// The model name sent there, for `x-sluice-model` (`None`: unrouted).
    pub upstream_model: Option<HeaderValue>,
    /// Its Azure deployment, if any.
    pub deployment: Option<Arc<str>>,
    /// `"stream": true` in the request.
    pub stream: bool,
    /// The routed model's counters (`None` for pass-through requests).
    pub model: Option<Arc<ModelMetrics>>,
    /// When the request may be sent again.
    pub replay: Replay,
    /// Whether its answer may be cached: a model endpoint whose route allows it.
    pub cacheable: bool,
    /// The model's other targets, in the order this request tries them.
    pub fallbacks: Vec<Fallback>,
    /// Failures that move it on to the next of them.
    pub fallback_on: FallbackSet,
    /// The share of first attempts retries may add (`[routing] retry_budget`).
    pub retry_budget: f64,
    /// The `max_tokens` cap the request was lowered to, if it was.
    pub capped: Option<u64>,
}

/// A target to fall back to: its upstream and the body it gets.
pub struct Fallback {
    /// The upstream.
    pub upstream: Arc<Upstream>,
    /// The body for it (the model renamed for it).
    pub body: Bytes,
    /// The model name sent there.
    pub upstream_model: Option<HeaderValue>,
    /// Its Azure deployment, if any.
    pub deployment: Option<Arc<str>>,
    /// Its counters.
    pub model: Arc<ModelMetrics>,
}

/// Endpoints where `max_tokens_cap` applies: the limit members each reads
/// (indexes in [`TOKEN_LIMIT_NAMES`]) and the one a cap is inserted as when
/// the request names none.
const CAP_PATHS: [(&str, &[usize], usize); 3] =
    [("/v1/chat/completions", &[0, 1], 0), ("/v1/completions", &[0], 0), ("/v1/responses", &[2], 2)];

/// Azure endpoints that live under a deployment
/// (`/openai/deployments/{name}/...`); any other path goes to `/openai/...`.
const AZURE_DEPLOYMENT_PATHS: [&str; 4] =
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/images/generations"];

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
        upstream_model: None,
        deployment: None,
        stream: false,
        model: None,
        replay: Replay::of(method, false),
        cacheable: false,
        fallbacks: Vec::new(),
        fallback_on: live.config.routing.fallback_on,
        retry_budget: live.config.routing.retry_budget,
        capped: None,
    })
}

/// The route a routed body names: the one its `model` names, or without
/// one, the default model's. Also the name it was asked by (what a key's
/// model grant is checked against) and whether `model` must be inserted.
pub fn named_route<'a>(routes: &'a Routes, model: Option<&'a str>) -> Result<(&'a Route, &'a str, bool), ProxyError> {
    match model {
        Some(model) => {
            let route = routes.get(model).ok_or_else(|| ProxyError::UnknownModel(model.to_string()))?;
            Ok((route, model, false))
        }
        None => {
            let (name, route) = routes.default_route().ok_or(ProxyError::NoModel)?;
            Ok((route, name, true))
        }
    }
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
    if sniffed.model.is_none() && !model_endpoint {
        let mut plan = plan_opaque(live, method, ForwardBody::full(bytes.clone()), allowed)?;
        plan.stream = sniffed.stream;
        return Ok(plan);
    }
    let (route, requested, insert_model) = named_route(routes, sniffed.model.as_deref())?;
    authorize(allowed, &route.name, requested)?;
    let replay = Replay::of(method, INFERENCE_PATHS.contains(&path));
    let cacheable = route.cache && *method == Method::POST && CACHE_PATHS.contains(&path);
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
    let edits = Edits::of(route, &sniffed, path, model_endpoint, add_usage)?;
    let body_for = |target: &Target| edits.body(&bytes, &sniffed, target, requested, insert_model);
    // Made per request only on the wildcard route, which sends the name asked.
    let upstream_model = |target: &Target| match &target.target_header {
        Some(header) => Some(header.clone()),
        None => HeaderValue::from_str(requested).ok(),
    };
    // One target (most models): no draw, no allocation. Only inference is
    // spread and fallen back: a job, an assistant or a file lives in one
    // account, the primary's.
    let (first, fallbacks) = if route.targets.len() == 1 || !INFERENCE_PATHS.contains(&path) {
        (route.primary(), Vec::new())
    } else {
        let order = route.order();
        let fallbacks = order[1..].iter().map(|&i| &route.targets[i]).collect();
        (&route.targets[order[0]], fallbacks)
    };
    let (body, body_rewritten) = body_for(first);
    // An Azure target's model endpoints go to its deployment: the configured
    // one, else (the wildcard route) the name asked for, which must be a
    // plain name: it becomes part of the path.
    let on_deployment = AZURE_DEPLOYMENT_PATHS.contains(&path);
    let deployment = |target: &Target| -> Result<Option<Arc<str>>, ProxyError> {
        if !on_deployment || live.upstreams[target.upstream].azure.is_none() {
            return Ok(None);
        }
        match &target.deployment {
            Some(deployment) => Ok(Some(Arc::clone(deployment))),
            None if crate::config::deployment_name_ok(requested) => Ok(Some(Arc::from(requested))),
            None => Err(ProxyError::BadField {
                field: "model",
                reason: "an Azure deployment name has only letters, digits, `.`, `_` and `-`".into(),
            }),
        }
    };
    let fallbacks = fallbacks
        .into_iter()
        .map(|target: &Target| {
            let (body, _) = body_for(target);
            Ok(Fallback {
                upstream: Arc::clone(&live.upstreams[target.upstream]),
                body,
                upstream_model: upstream_model(target),
                deployment: deployment(target)?,
                model: Arc::clone(&target.metrics),
            })
        })
        .collect::<Result<_, ProxyError>>()?;
    Ok(Plan {
        upstream: Arc::clone(&live.upstreams[first.upstream]),
        body: ForwardBody::full(body),
        body_rewritten,
        upstream_model: upstream_model(first),
        deployment: deployment(first)?,
        stream: sniffed.stream,
        model: Some(Arc::clone(&first.metrics)),
        replay,
        cacheable,
        fallbacks,
        fallback_on: route.fallback_on,
        retry_budget: live.config.routing.retry_budget,
        capped: edits.capped,
    })
}

/// What a routed body gets whatever its target: defaults, the usage request
/// of a metered stream, the `max_tokens` cap.
struct Edits<'r> {
    inserts: Vec<&'r [u8]>,
    /// `max_tokens` values lowered to the cap.
    replace: Vec<(Range<usize>, &'r [u8])>,
    capped: Option<u64>,
    cap_text: Option<String>,
    /// `"max_tokens":CAP`, when the request named no limit.
    cap_insert: Option<String>,
}

impl<'r> Edits<'r> {
    fn of(
        route: &'r Route,
        sniffed: &Sniffed<'_>,
        path: &str,
        model_endpoint: bool,
        add_usage: bool,
    ) -> Result<Self, ProxyError> {
        // A model's default parameters are generation parameters: they go into
        // model endpoints' bodies only, never into a job or an assistant.
        let defaults: &[(u32, Bytes)] = if model_endpoint { &route.defaults } else { &[] };
        let mut edits =
            Self { inserts: Vec::new(), replace: Vec::new(), capped: None, cap_text: None, cap_insert: None };
        if add_usage {
            edits.inserts.push(INCLUDE_USAGE);
        }
        edits.inserts.extend(defaults.iter().filter(|(bit, _)| sniffed.present & (1 << bit) == 0).map(|(_, m)| &m[..]));
        if let (Some((cap, mode)), Some((_, reads, insert))) =
            (route.max_tokens_cap, CAP_PATHS.iter().find(|(p, ..)| *p == path))
        {
            // A value that is not a plain integer (`null`, a float, a string)
            // counts as over the cap: it must not get past it.
            let limits = sniffed.token_limits.iter().filter(|l| reads.contains(&l.name));
            let over: Vec<_> = limits.clone().filter(|l| l.value.is_none_or(|v| v > cap)).collect();
            if let (Some(first), CapMode::Refuse) = (over.first(), mode) {
                return Err(ProxyError::BadField {
                    field: TOKEN_LIMIT_NAMES[first.name],
                    reason: format!("this model takes at most {cap} tokens an answer"),
                });
            }
            edits.cap_text = Some(cap.to_string());
            edits.capped = (!over.is_empty()).then_some(cap);
            edits.replace = over.iter().map(|l| (l.span.clone(), &b""[..])).collect();
            if limits.count() == 0 {
                // No limit asked: the cap is the limit, unless a default for
                // that member goes in (the config keeps defaults within the cap).
                let member = format!("\"{}\":", TOKEN_LIMIT_NAMES[*insert]);
                if !edits.inserts.iter().any(|m| m.starts_with(member.as_bytes())) {
                    edits.cap_insert = Some(format!("{member}{cap}"));
                }
            }
        }
        Ok(edits)
    }

    /// The body for `target`: renamed for it, with the edits.
    fn body(
        &self,
        bytes: &Bytes,
        sniffed: &Sniffed<'_>,
        target: &Target,
        requested: &str,
        insert_model: bool,
    ) -> (Bytes, bool) {
        let rename = match (&target.target, &target.target_json, &sniffed.model_span) {
            (Some(name), Some(json), Some(span)) if name.as_ref() != requested => Some((span.clone(), json.as_bytes())),
            _ => None,
        };
        let model_member = insert_model.then(|| match &target.target_json {
            Some(json) => format!("\"model\":{json}"),
            None => format!("\"model\":{}", serde_json::Value::from(requested)),
        });
        let nothing = self.inserts.is_empty() && self.replace.is_empty() && self.cap_insert.is_none();
        if rename.is_none() && model_member.is_none() && nothing {
            return (bytes.clone(), false);
        }
        let cap = self.cap_text.as_deref().unwrap_or_default().as_bytes();
        let mut replace: Vec<(Range<usize>, &[u8])> =
            self.replace.iter().map(|(span, _)| (span.clone(), cap)).collect();
        replace.extend(rename);
        let mut inserts: Vec<&[u8]> = Vec::with_capacity(self.inserts.len() + 2);
        inserts.extend(model_member.as_deref().map(str::as_bytes));
        inserts.extend(self.inserts.iter().copied());
        inserts.extend(self.cap_insert.as_deref().map(str::as_bytes));
        (sniff::splice(bytes, sniffed, &replace, &inserts), true)
    }
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
