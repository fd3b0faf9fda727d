//! `[redis]`: the Redis several instances share (limits, key health, cache).

use std::time::Duration;

use serde::Deserialize;

use super::keys::Secret;
use super::units::HumanDuration;
use super::{ConfigError, Validator};

/// Default longest wait for one Redis operation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRedis {
    url: Option<String>,
    timeout: Option<HumanDuration>,
    on_error: Option<OnRedisError>,
    ca_file: Option<std::path::PathBuf>,
    cache_url: Option<String>,
}

/// What client limits do while Redis cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisError {
    /// Each instance limits with its own in-process counters (a client may
    /// get up to its limit from every instance until Redis is back).
    #[default]
    Local,
    /// Refuse requests of limited keys with 503 until Redis is back.
    Deny,
}

/// `[redis]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]` or `rediss://` (TLS,
    /// rustls with ring). Never printed: it may hold a password.
    pub url: Secret<String>,
    /// Longest wait for one operation; past it the request goes on as if
    /// Redis were down.
    pub timeout: Duration,
    /// What limits do while Redis is down.
    pub on_error: OnRedisError,
    /// For `rediss://`: the CAs (PEM) that sign Redis's certificate, instead
    /// of the system's; relative to the config file.
    pub ca_file: Option<std::path::PathBuf>,
    /// Another Redis for cached answers, so that what tenants' answers fill
    /// never evicts (or, under `noeviction`, blocks) the limits' keys.
    pub cache_url: Option<Secret<String>>,
}

impl Validator<'_> {
    pub(super) fn redis(&self, raw: RawRedis) -> Result<Option<RedisConfig>, ConfigError> {
        let Some(url) = raw.url else {
            if raw.timeout.is_some() || raw.on_error.is_some() || raw.ca_file.is_some() || raw.cache_url.is_some() {
                return Err(self.invalid("redis.url", "is required when [redis] sets anything"));
            }
            return Ok(None);
        };
        let url = url.trim().to_string();
        self.redis_url("redis.url", &url)?;
        let cache_url = raw.cache_url.map(|u| u.trim().to_string());
        if let Some(cache_url) = &cache_url {
            self.redis_url("redis.cache_url", cache_url)?;
        }
        let timeout = raw.timeout.map_or(DEFAULT_TIMEOUT, |d| d.0);
        if timeout.is_zero() || timeout > Duration::from_secs(10) {
            return Err(self.invalid("redis.timeout", "must be above zero and at most 10s"));
        }
        let ca_file = raw.ca_file.map(|path| self.base_dir.join(path));
        if ca_file.is_some() && !url.starts_with("rediss://") {
            return Err(self.invalid("redis.ca_file", "is for rediss:// (TLS) only"));
        }
        if let Some(path) = &ca_file
            && !path.is_file()
        {
            return Err(self.invalid("redis.ca_file", format!("{} is not a readable file", path.display())));
        }
        Ok(Some(RedisConfig {
            url: Secret::new(url),
            timeout,
            on_error: raw.on_error.unwrap_or_default(),
            ca_file,
            cache_url: cache_url.map(Secret::new),
        }))
    }

    /// Checks a Redis URL as the driver reads it (so `check` refuses what
    /// `serve` would); the reason never echoes the URL, which may hold a password.
    fn redis_url(&self, field: &str, url: &str) -> Result<(), ConfigError> {
        use redis::IntoConnectionInfo;
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(self.invalid(field, "must start with redis:// or rediss://"));
        }
        url.into_connection_info().map_err(|e| self.invalid(field, format!("not a Redis URL ({e})")))?;
        Ok(())
    }
}
