//! The model routing table: client-visible model names and aliases to an
//! upstream, the name sent upstream, and the default parameters to fill in.

use std::collections::HashMap;

use std::sync::Arc;

use bytes::Bytes;

use crate::config::Config;
use crate::telemetry::metrics::ModelMetrics;

/// Where one client-visible model goes.
#[derive(Debug)]
pub struct Route {
    /// Canonical client-visible name (`*` for the wildcard).
    pub name: Box<str>,
    /// Index into the snapshot's upstreams.
    pub upstream: usize,
    /// The model name sent upstream, as an encoded JSON string; `None` passes the
    /// client's name through (the wildcard route).
    pub target_json: Option<Box<str>>,
    /// The plain name sent upstream, to compare against what the client sent.
    pub target: Option<Box<str>>,
    /// Default parameters: (bit in the snapshot's parameter list, encoded `"name":value`).
    pub defaults: Vec<(u32, Bytes)>,
    /// Request and token counters, kept across reloads while (model, upstream) stays.
    pub metrics: Arc<ModelMetrics>,
    /// Whether its answers may be cached (`[[models]] cache`).
    pub cache: bool,
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
}

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
            let target: Option<Box<str>> =
                (model.name != "*").then(|| model.upstream_model.as_deref().unwrap_or(&model.name).into());
            if model.name == "*" {
                wildcard = Some(index);
            } else {
                by_name.insert(model.name.as_str().into(), index);
                for alias in &model.aliases {
                    by_name.insert(alias.as_str().into(), index);
                }
            }
            let metrics = previous
                .and_then(|p| {
                    p.routes.iter().find(|r| *r.metrics.model == *model.name && r.metrics.upstream == model.upstream)
                })
                .map_or_else(|| Arc::new(ModelMetrics::new(&model.name, &model.upstream)), |r| Arc::clone(&r.metrics));
            routes.push(Route {
                metrics,
                name: model.name.as_str().into(),
                upstream: upstream_index(&model.upstream),
                target_json: target.as_deref().map(|t| serde_json::Value::from(t).to_string().into()),
                target,
                defaults,
                cache: model.cache,
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
        let mut table = Self { models_json, listing, routes, by_name, wildcard, default: None, param_names };
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

    /// The counters of every route.
    pub fn metrics(&self) -> impl Iterator<Item = &ModelMetrics> + Clone {
        self.routes.iter().map(|r| r.metrics.as_ref())
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
