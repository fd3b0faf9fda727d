//! `[cache]`: the response cache's switch, lifetime, bounds and scope.

use std::time::Duration;

use serde::Deserialize;

use super::units::{ByteSize, HumanDuration};
use super::{ConfigError, Validator};

/// Default lifetime of a cached answer (the seed's).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Default bound of all cached answers together.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// Default largest answer kept.
pub const DEFAULT_MAX_ENTRY: u64 = 1 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    enabled: Option<bool>,
    ttl: Option<HumanDuration>,
    max_bytes: Option<ByteSize>,
    max_entry: Option<ByteSize>,
    scope: Option<CacheScope>,
    key_headers: Option<Vec<String>>,
}

/// Who shares cached answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// Every client: an answer one key paid for serves every other.
    #[default]
    Global,
    /// The keys of one user (a key without a user is its own user).
    User,
    /// One key.
    Key,
}

/// `[cache]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Off by default: sampled answers (temperature above 0) differ from call
    /// to call, and a cache hands back the first one.
    pub enabled: bool,
    /// How long an answer is served from the cache.
    pub ttl: Duration,
    /// All cached answers together, in bytes (fixed for the process: a reload
    /// keeps the cache and its bound).
    pub max_bytes: u64,
    /// The largest answer kept.
    pub max_entry: u64,
    /// Who shares cached answers.
    pub scope: CacheScope,
    /// Request headers, besides `openai-*` and `anthropic-*`, that may shape
    /// an upstream's answer and so are part of its key (lowercase names).
    pub key_headers: Vec<http::HeaderName>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl: DEFAULT_TTL,
            max_bytes: DEFAULT_MAX_BYTES,
            max_entry: DEFAULT_MAX_ENTRY,
            scope: CacheScope::Global,
            key_headers: Vec::new(),
        }
    }
}

impl Validator<'_> {
    pub(super) fn cache(&self, raw: RawCache) -> Result<CacheConfig, ConfigError> {
        let defaults = CacheConfig::default();
        let config = CacheConfig {
            enabled: raw.enabled.unwrap_or(false),
            ttl: raw.ttl.map_or(defaults.ttl, |d| d.0),
            max_bytes: raw.max_bytes.map_or(defaults.max_bytes, |b| b.0),
            max_entry: raw.max_entry.map_or(defaults.max_entry, |b| b.0),
            scope: raw.scope.unwrap_or_default(),
            key_headers: raw
                .key_headers
                .unwrap_or_default()
                .iter()
                .map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()))
                .collect::<Result<_, _>>()
                .map_err(|_| self.invalid("cache.key_headers", "must be header names"))?,
        };
        if config.ttl.is_zero() {
            return Err(self.invalid("cache.ttl", "must be above zero (use enabled = false to turn the cache off)"));
        }
        if config.max_entry == 0 || config.max_entry > config.max_bytes {
            return Err(self.invalid("cache.max_entry", "must be above zero and at most cache.max_bytes"));
        }
        // The cache weighs entries in 32 bits.
        if config.max_entry > u64::from(u32::MAX) {
            return Err(self.invalid("cache.max_entry", "must be under 4 GiB"));
        }
        Ok(config)
    }
}
