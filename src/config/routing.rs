//! Routing over several upstreams: a model's `targets` (weighted within a
//! priority tier, tiers tried in order), which failures move a request to the
//! next target (`fallback_on`), the per-upstream retry budget, and a model's
//! cap on `max_tokens`.

use std::collections::HashSet;

use serde::Deserialize;

use super::{ConfigError, Validator};

/// Whether `name` may stand in an Azure deployment path: letters, digits,
/// `.`, `_`, `-`, not `.` or `..`, at most 256 bytes.
pub fn deployment_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Largest target weight: a tier's round-robin schedule is as long as the
/// sum of its weights (after dividing out their common factor).
pub const MAX_WEIGHT: u32 = 1000;

/// Default share of first attempts that retries may add, per upstream.
pub const DEFAULT_RETRY_BUDGET: f64 = 0.2;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    upstream: String,
    upstream_model: Option<String>,
    deployment: Option<String>,
    weight: Option<u32>,
    priority: Option<u32>,
}

/// A failure that moves a request on to the model's next target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FallbackOn {
    /// The target answered 5xx (after its own retries).
    #[serde(rename = "5xx")]
    ServerError,
    /// No headers in time.
    #[serde(rename = "timeout")]
    Timeout,
    /// Every key it has was rate-limited.
    #[serde(rename = "429")]
    RateLimited,
    /// It has no usable key (all cooling or disabled).
    #[serde(rename = "no_key")]
    NoKey,
    /// Its circuit breaker is open.
    #[serde(rename = "breaker_open")]
    BreakerOpen,
    /// It could not be reached, or broke the exchange.
    #[serde(rename = "connect")]
    Connect,
}

impl FallbackOn {
    /// Every reason, the default.
    pub const ALL: [Self; 6] =
        [Self::ServerError, Self::Timeout, Self::RateLimited, Self::NoKey, Self::BreakerOpen, Self::Connect];
}

/// A set of [`FallbackOn`] reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackSet(u8);

impl FallbackSet {
    /// Every reason.
    pub fn all() -> Self {
        Self::of(&FallbackOn::ALL)
    }

    /// These reasons.
    pub fn of(reasons: &[FallbackOn]) -> Self {
        Self(reasons.iter().fold(0, |bits, r| bits | 1 << *r as u8))
    }

    /// Whether `reason` is in the set.
    pub fn contains(self, reason: FallbackOn) -> bool {
        self.0 & (1 << reason as u8) != 0
    }
}

/// What a request asking for more than `max_tokens_cap` gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapMode {
    /// The value is lowered to the cap (the answer says so in a header).
    #[default]
    Clamp,
    /// 400 naming `max_tokens`.
    Refuse,
}

/// One place a model may be served from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// The upstream's name.
    pub upstream: String,
    /// The model name sent there (`None`: the client's).
    pub upstream_model: Option<String>,
    /// An Azure deployment (default: the upstream model name).
    pub deployment: Option<String>,
    /// Share within its tier.
    pub weight: u32,
    /// Tier: lower first; higher tiers are fallbacks.
    pub priority: u32,
}

/// `[routing]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    /// Model for requests without one.
    pub default_model: Option<String>,
    /// Failures that move a request to the next target (models may override).
    pub fallback_on: FallbackSet,
    /// Retries (not first attempts) per upstream are capped at this share of
    /// its first attempts over the last 10 s (plus a small floor); 0 turns
    /// the budget off.
    pub retry_budget: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    default_model: Option<String>,
    fallback_on: Option<Vec<FallbackOn>>,
    retry_budget: Option<f64>,
}

impl Validator<'_> {
    pub(super) fn routing(&self, raw: RawRouting) -> Result<RoutingConfig, ConfigError> {
        let retry_budget = raw.retry_budget.unwrap_or(DEFAULT_RETRY_BUDGET);
        if !(0.0..=10.0).contains(&retry_budget) {
            return Err(self.invalid("routing.retry_budget", "must be from 0 (off) to 10"));
        }
        Ok(RoutingConfig {
            default_model: raw.default_model,
            fallback_on: raw.fallback_on.map_or_else(FallbackSet::all, |r| FallbackSet::of(&r)),
            retry_budget,
        })
    }

    /// A model's targets: `targets`, or the single `upstream` (with
    /// `upstream_model`); exactly one of the two.
    pub(super) fn targets(
        &self,
        at: &dyn Fn(&str) -> String,
        upstream: Option<String>,
        upstream_model: Option<String>,
        raw: Option<Vec<RawTarget>>,
        upstreams: &HashSet<&str>,
    ) -> Result<Vec<TargetConfig>, ConfigError> {
        let targets = match (upstream, raw) {
            (Some(upstream), None) => {
                vec![TargetConfig { upstream, upstream_model, deployment: None, weight: 1, priority: 1 }]
            }
            (None, Some(raw)) if !raw.is_empty() => {
                if upstream_model.is_some() {
                    return Err(self.invalid(at("upstream_model"), "with `targets`, give it per target"));
                }
                raw.into_iter()
                    .map(|t| TargetConfig {
                        upstream: t.upstream,
                        upstream_model: t.upstream_model,
                        deployment: t.deployment,
                        weight: t.weight.unwrap_or(1),
                        priority: t.priority.unwrap_or(1),
                    })
                    .collect()
            }
            (Some(_), Some(_)) => return Err(self.invalid(at("targets"), "give `upstream` or `targets`, not both")),
            (None, _) => return Err(self.invalid(at("upstream"), "give `upstream` or a non-empty `targets`")),
        };
        for (j, target) in targets.iter().enumerate() {
            if !upstreams.contains(target.upstream.as_str()) {
                let field = if targets.len() == 1 { at("upstream") } else { at(&format!("targets[{j}].upstream")) };
                return Err(self.invalid(field, format!("no upstream is named `{}`", target.upstream)));
            }
            if let Some(deployment) = &target.deployment
                && !deployment_name_ok(deployment)
            {
                return Err(
                    self.invalid(at(&format!("targets[{j}].deployment")), "only letters, digits, `.`, `_` and `-`")
                );
            }
            if targets[..j].iter().any(|t| t.upstream == target.upstream) {
                return Err(self.invalid(
                    at(&format!("targets[{j}].upstream")),
                    format!("`{}` is already a target of this model", target.upstream),
                ));
            }
            if !(1..=MAX_WEIGHT).contains(&target.weight) {
                return Err(
                    self.invalid(at(&format!("targets[{j}].weight")), format!("must be from 1 to {MAX_WEIGHT}"))
                );
            }
        }
        Ok(targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_sets() {
        let all = FallbackSet::all();
        assert!(FallbackOn::ALL.iter().all(|r| all.contains(*r)));
        let some = FallbackSet::of(&[FallbackOn::Timeout]);
        assert!(some.contains(FallbackOn::Timeout) && !some.contains(FallbackOn::ServerError));
    }
}
