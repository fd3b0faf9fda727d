//! The model routing table: client-visible model names and aliases to their
//! targets (an upstream and the name sent there, weighted within priority
//! tiers), the default parameters to fill in, and the fallback rules.

use std::collections::HashMap;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::Bytes;

use crate::config::{CapMode, Config, FallbackSet};
use crate::telemetry::metrics::ModelMetrics;

/// One place a model is served.
#[derive(Debug)]
pub struct Target {
    /// Index into the snapshot's upstreams.
    pub upstream: usize,
    /// The model name sent upstream, as an encoded JSON string; `None` passes the
    /// client's name through (the wildcard route).
    pub target_json: Option<Box<str>>,
    /// The plain name sent upstream, to compare against what the client sent.
    pub target: Option<Box<str>>,
    /// The same as a header value, for `x-sluice-model`.
    pub target_header: Option<http::HeaderValue>,
    /// The Azure deployment (the upstream model name unless configured).
    pub deployment: Option<Arc<str>>,
    /// Share within its tier.
    pub weight: u32,
    /// Its tier (lower first).
    pub priority: u32,
    /// Request and token counters, kept across reloads while (model, upstream) stays.
    pub metrics: Arc<ModelMetrics>,
}

/// Where one client-visible model goes.
#[derive(Debug)]
pub struct Route {
    /// Canonical client-visible name (`*` for the wildcard).
    pub name: Box<str>,
    /// Its targets, by tier (lowest priority number first), config order within.
    pub targets: Vec<Target>,
    /// Default parameters: (bit in the snapshot's parameter list, encoded `"name":value`).
    pub defaults: Vec<(u32, Bytes)>,
    /// Whether its answers may be cached (`[[models]] cache`).
    pub cache: bool,
    /// Failures that move a request on to the next target.
    pub fallback_on: FallbackSet,
    /// A cap on `max_tokens`.
    pub max_tokens_cap: Option<(u64, CapMode)>,
    /// Its targets' priority tiers, in order.
    pub tiers: Vec<Tier>,
}

impl Route {
    /// The target `/v1/models` names as the owner, and the only one of a
    /// single-target model.
    pub fn primary(&self) -> &Target {
        &self.targets[0]
    }

    /// The order one request tries the targets in: tier by tier; within a
    /// tier, the next turn of its weighted round-robin first, then the
    /// tier's others in config order after it. Over any run of requests each
    /// target of a tier leads in proportion to its weight, exactly.
    pub fn order(&self) -> Vec<usize> {
        let mut order = Vec::with_capacity(self.targets.len());
        for tier in &self.tiers {
            let (start, len) = (tier.start, tier.len);
            let lead = tier.next();
            order.extend((0..len).map(|k| start + (lead + k) % len));
        }
        order
    }
}

/// One priority tier of a route's targets and its round-robin.
#[derive(Debug)]
pub struct Tier {
    /// Its first target's index.
    start: usize,
    /// How many targets it has.
    len: usize,
    /// Which target leads each turn (offsets in the tier), smoothly
    /// interleaved: weights 3:1 give `0 0 1 0`, not `0 0 0 1`.
    schedule: Box<[u16]>,
    /// Turns taken.
    turn: AtomicU64,
}

impl Tier {
    fn new(start: usize, weights: &[u32]) -> Self {
        Self { start, len: weights.len(), schedule: smooth_schedule(weights), turn: AtomicU64::new(0) }
    }

    /// The offset in the tier of the target that leads the next request.
    fn next(&self) -> usize {
        if self.schedule.len() <= 1 {
            return 0;
        }
        let turn = self.turn.fetch_add(1, Relaxed);
        usize::from(self.schedule[(turn % self.schedule.len() as u64) as usize])
    }
}

/// nginx's smooth weighted round-robin, unrolled into one cycle: each turn
/// every target gains its weight, the richest leads and pays the total.
fn smooth_schedule(weights: &[u32]) -> Box<[u16]> {
    let common = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / common)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (c, w) in current.iter_mut().zip(&weights) {
                *c += w;
            }
            let lead = (0..current.len()).max_by_key(|&i| (current[i], std::cmp::Reverse(i))).unwrap_or(0);
            current[lead] -= total;
            lead as u16
        })
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// All routes of a snapshot.
#[derive(Debug)]
pub struct Routes {
    routes: Vec<Route>,
    by_name: HashMap<Box<str>, usize>,
    wildcard: Option<usize>,
    /// The default model name and its route.
    default: Option<(Box<str>, usize)>,
    /// Every parameter name that some route has a default for; a request's sniff
    /// marks which are present by their position here.
    pub param_names: Vec<Box<str>>,
    /// The ready `GET /v1/models` answer.
    pub models_json: Bytes,
    /// What it lists: each name and alias with its route's canonical name
    /// and upstream, in config order.
    listing: Vec<Listed>,
    /// Which table this is, unique in the process: a plan made under one
    /// table (and the snapshot's config and upstreams, built with it) holds
    /// for the same body only while the same table serves.
    pub generation: u64,
}

/// The last [`Routes::generation`] handed out.
static GENERATIONS: AtomicU64 = AtomicU64::new(0);

/// One entry of `GET /v1/models`.
#[derive(Debug)]
struct Listed {
    id: Box<str>,
    route: Box<str>,
    owned_by: Box<str>,
}

impl Routes {
    /// Builds the table from a validated config (which guarantees unique names,
    /// known upstreams and at most 64 parameter names), taking over the counters
    /// of routes `previous` had.
    pub fn new(config: &Config, previous: Option<&Routes>) -> Self {
        let upstream_index = |name: &str| config.upstreams.iter().position(|u| u.name == name).unwrap_or(0);
        let mut param_names: Vec<Box<str>> = Vec::new();
        let mut routes = Vec::with_capacity(config.models.len());
        let mut by_name = HashMap::new();
        let mut wildcard = None;
        for model in &config.models {
            let index = routes.len();
            let defaults = model
                .defaults
                .iter()
                .map(|(name, value)| {
                    let bit = match param_names.iter().position(|n| n.as_ref() == name) {
                        Some(bit) => bit,
                        None => {
                            param_names.push(name.as_str().into());
                            param_names.len() - 1
                        }
                    };
                    let member = format!("{}:{}", serde_json::Value::from(name.as_str()), value);
                    (bit as u32, Bytes::from(member))
                })
                .collect();
            if model.name == "*" {
                wildcard = Some(index);
            } else {
                by_name.insert(model.name.as_str().into(), index);
                for alias in &model.aliases {
                    by_name.insert(alias.as_str().into(), index);
                }
            }
            let mut targets: Vec<Target> = model
                .targets
                .iter()
                .map(|t| {
                    let target: Option<Box<str>> =
                        (model.name != "*").then(|| t.upstream_model.as_deref().unwrap_or(&model.name).into());
                    let metrics = previous
                        .and_then(|p| p.shared_metrics().find(|m| *m.model == *model.name && m.upstream == t.upstream))
                        .map_or_else(|| Arc::new(ModelMetrics::new(&model.name, &t.upstream)), Arc::clone);
                    Target {
                        upstream: upstream_index(&t.upstream),
                        target_json: target.as_deref().map(|t| serde_json::Value::from(t).to_string().into()),
                        deployment: t.deployment.as_deref().or(target.as_deref()).map(Arc::from),
                        target_header: target.as_deref().and_then(|t| http::HeaderValue::from_str(t).ok()),
                        target,
                        weight: t.weight,
                        priority: t.priority,
                        metrics,
                    }
                })
                .collect();
            // Tiers in order; a stable sort keeps config order within a tier.
            targets.sort_by_key(|t| t.priority);
            let mut tiers = Vec::new();
            let mut start = 0;
            while start < targets.len() {
                let priority = targets[start].priority;
                let weights: Vec<u32> =
                    targets[start..].iter().take_while(|t| t.priority == priority).map(|t| t.weight).collect();
                let len = weights.len();
                tiers.push(Tier::new(start, &weights));
                start += len;
            }
            routes.push(Route {
                name: model.name.as_str().into(),
                targets,
                defaults,
                cache: model.cache,
                fallback_on: model.fallback_on,
                max_tokens_cap: model.max_tokens_cap,
                tiers,
            });
        }
        let listing: Vec<Listed> = config
            .models
            .iter()
            .filter(|m| m.name != "*")
            .flat_map(|m| {
                std::iter::once(&m.name).chain(&m.aliases).map(move |id| Listed {
                    id: id.as_str().into(),
                    route: m.name.as_str().into(),
                    owned_by: m.upstream.as_str().into(),
                })
            })
            .collect();
        let models_json = models_json(listing.iter());
        let generation = GENERATIONS.fetch_add(1, Relaxed) + 1;
        let mut table =
            Self { models_json, listing, routes, by_name, wildcard, default: None, param_names, generation };
        table.default = config.default_model.as_deref().and_then(|name| table.lookup(name).map(|i| (name.into(), i)));
        table
    }

    /// The route index for a client-visible model name (or the wildcard).
    fn lookup(&self, model: &str) -> Option<usize> {
        self.by_name.get(model).copied().or(self.wildcard)
    }

    /// The route for a model name.
    pub fn get(&self, model: &str) -> Option<&Route> {
        self.lookup(model).map(|i| &self.routes[i])
    }

    /// The counters of every route's every target.
    pub fn metrics(&self) -> impl Iterator<Item = &ModelMetrics> + Clone {
        self.shared_metrics().map(AsRef::as_ref)
    }

    fn shared_metrics(&self) -> impl Iterator<Item = &Arc<ModelMetrics>> + Clone {
        self.routes.iter().flat_map(|r| r.targets.iter().map(|t| &t.metrics))
    }

    /// `GET /v1/models` listing only the routes `permit` (given a canonical
    /// route name) lets through: what a key limited to some models sees.
    pub fn models_json_for(&self, permit: impl Fn(&str) -> bool) -> Bytes {
        models_json(self.listing.iter().filter(|m| permit(&m.route)))
    }

    /// `GET /v1/models/{id}`: one listed name or alias, if `permit` (given
    /// its canonical route name) lets it through.
    pub fn model_json(&self, id: &str, permit: impl Fn(&str) -> bool) -> Option<Bytes> {
        let m = self.listing.iter().find(|m| &*m.id == id && permit(&m.route))?;
        let value = serde_json::json!({ "id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by });
        Some(Bytes::from(value.to_string()))
    }

    /// The default model's name and route.
    pub fn default_route(&self) -> Option<(&str, &Route)> {
        self.default.as_ref().map(|(name, i)| (name.as_ref(), &self.routes[*i]))
    }
}

/// `GET /v1/models` in OpenAI list form: each routed name and alias (the
/// wildcard is not a model and is not listed).
fn models_json<'a>(listing: impl Iterator<Item = &'a Listed>) -> Bytes {
    let data: Vec<serde_json::Value> = listing
        .map(|m| serde_json::json!({ "id": m.id, "object": "model", "created": 0, "owned_by": m.owned_by }))
        .collect();
    Bytes::from(serde_json::json!({ "object": "list", "data": data }).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(weights: &[(u32, u32)]) -> Route {
        let targets: Vec<Target> = weights
            .iter()
            .enumerate()
            .map(|(i, (weight, priority))| Target {
                upstream: i,
                target_json: None,
                target: None,
                target_header: None,
                deployment: None,
                weight: *weight,
                priority: *priority,
                metrics: Arc::new(ModelMetrics::new("m", "u")),
            })
            .collect();
        let first_tier: Vec<u32> = weights.iter().filter(|(_, p)| *p == 1).map(|(w, _)| *w).collect();
        let tiers = vec![Tier::new(0, &first_tier), Tier::new(first_tier.len(), &[1])];
        Route {
            name: "m".into(),
            targets,
            defaults: Vec::new(),
            cache: false,
            fallback_on: FallbackSet::all(),
            max_tokens_cap: None,
            tiers,
        }
    }

    #[test]
    fn tiers_in_order_weights_within_exactly() {
        let route = route(&[(3, 1), (1, 1), (1, 2)]);
        let mut first = [0u32; 3];
        for _ in 0..4000 {
            let order = route.order();
            assert_eq!(order.len(), 3);
            assert_eq!(order[2], 2, "the fallback tier comes last");
            assert_ne!(order[0], order[1], "each target once");
            first[order[0]] += 1;
        }
        assert_eq!(first, [3000, 1000, 0], "3:1 within the tier");
    }

    #[test]
    fn schedules_interleave_and_reduce() {
        assert_eq!(&*smooth_schedule(&[3, 1]), &[0, 0, 1, 0]);
        assert_eq!(&*smooth_schedule(&[300, 100]), &[0, 0, 1, 0], "common factor divided out");
        assert_eq!(&*smooth_schedule(&[1, 1, 1]), &[0, 1, 2]);
        let long = smooth_schedule(&[5, 2, 3]);
        assert_eq!(long.len(), 10);
        assert_eq!([0, 1, 2].map(|t| long.iter().filter(|&&x| x == t).count()), [5, 2, 3]);
        assert!(long.windows(2).all(|w| w[0] != w[1] || w[0] == 0), "only the heaviest repeats");
    }
}
