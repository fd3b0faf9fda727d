//! Who may call: `[auth]` (where client keys are looked for, which paths need
//! none), `[[clients]]` (config keys with a name and a policy), `[limits]`
//! (defaults for store keys, per-IP limits) and `[store]` (the key store).

use std::path::PathBuf;

use serde::Deserialize;

use super::keys::Secret;
use super::{ConfigError, Validator};

/// Paths that never need a client key, unless the config says otherwise.
pub const DEFAULT_EXEMPT: [&str; 3] = ["/", "/health", "/v1/health"];
/// Default requests per minute of a store key without its own (the seed's).
pub const DEFAULT_RPM: u32 = 60;
/// Default requests per hour of a store key without its own (the seed's).
pub const DEFAULT_RPH: u32 = 1000;
/// Largest requests-per-window limit (the limiter counts in 20 bits).
pub const MAX_WINDOW_LIMIT: u32 = 1_000_000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    require_api_key: Option<bool>,
    #[serde(default)]
    keys: Vec<String>,
    exempt: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClientKey {
    name: String,
    key: String,
    models: Option<Vec<String>>,
    rpm: Option<u32>,
    rph: Option<u32>,
    tokens_per_day: Option<u64>,
    passthrough: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    enabled: Option<bool>,
    rpm: Option<u32>,
    rph: Option<u32>,
    config_keys: Option<bool>,
    per_ip_rpm: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    url: Option<String>,
    keep_usage: Option<super::units::HumanDuration>,
}

/// `[auth]`.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Whether non-exempt paths need a client key.
    pub require_api_key: bool,
    /// Accepted client keys without a policy of their own.
    pub keys: Vec<Secret<String>>,
    /// Paths served without a key.
    pub exempt: Vec<String>,
}

/// One `[[clients]]` entry: a config key with a name and a policy.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How logs and metrics name it.
    pub name: String,
    /// The key.
    pub key: Secret<String>,
    /// Allowed models (names or aliases); empty: all.
    pub models: Vec<String>,
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Requests per hour.
    pub rph: Option<u32>,
    /// Tokens per UTC day.
    pub tokens_per_day: Option<u64>,
    /// May call paths beyond the inference endpoints (default false).
    pub passthrough: bool,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Whether any client limit applies.
    pub enabled: bool,
    /// Requests per minute of store keys without their own.
    pub rpm: u32,
    /// Requests per hour of store keys without their own.
    pub rph: u32,
    /// Whether `[auth] keys` get `rpm`/`rph` too (otherwise they are unlimited).
    pub config_keys: bool,
    /// Requests per minute per client address for requests without a key.
    pub per_ip_rpm: Option<u32>,
}

/// `[store]`: where store keys, users and usage live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The store's location.
    pub url: StoreUrl,
    /// How long usage rows are kept (deleted hourly past it).
    pub keep_usage: std::time::Duration,
}

/// Default retention of usage rows: 400 days, a year and its month to compare.
pub const DEFAULT_KEEP_USAGE: std::time::Duration = std::time::Duration::from_secs(400 * 86_400);

/// Where the store lives.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://PATH`: a SQLite file (a relative path is anchored at the
    /// config file's folder).
    Sqlite(PathBuf),
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?OPTIONS]` (or
    /// `postgresql://`): a PostgreSQL database several instances share. The
    /// text is kept whole for the driver; it may hold a password, so it is
    /// never printed (see [`std::fmt::Display`]).
    Postgres(Secret<String>),
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl StoreUrl {
    /// Parses `sqlite://PATH` (anchoring a relative path at `base`) or a
    /// `postgres://` / `postgresql://` URL.
    pub fn parse(text: &str, base: &std::path::Path) -> Result<Self, String> {
        match text.split_once("://") {
            Some(("sqlite", path)) if !path.is_empty() => Ok(Self::Sqlite(base.join(path))),
            Some(("postgres" | "postgresql", rest)) if !rest.is_empty() => {
                // The driver's reason names the part, never the URL's text.
                text.parse::<postgres::Config>().map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
                Ok(Self::Postgres(Secret::new(text.to_string())))
            }
            // Not echoed: a database URL may hold a password.
            _ => Err("not a store URL (sqlite://PATH or postgres://USER@HOST/DB)".to_string()),
        }
    }
}

/// A PostgreSQL URL fit to print: user, hosts, ports and database as the
/// driver reads them, never the password (which may hold `/`, `?` or `@`
/// that a textual cut would get wrong) nor the options.
fn postgres_display(url: &str) -> String {
    let Ok(config) = url.parse::<postgres::Config>() else { return "postgres://(unreadable URL)".to_string() };
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    format!("postgres://{user}{}/{}", hosts.join(","), config.get_dbname().unwrap_or(""))
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Self::Postgres(url) => f.write_str(&postgres_display(url.expose())),
        }
    }
}

impl Validator<'_> {
    pub(super) fn auth(&self, raw: RawAuth, clients: &[ClientConfig], store: bool) -> Result<AuthConfig, ConfigError> {
        let keys = self.expand_keys("auth.keys", raw.keys)?;
        let require_api_key = raw.require_api_key.unwrap_or(true);
        if require_api_key && keys.is_empty() && clients.is_empty() && !store {
            return Err(self.invalid(
                "auth.keys",
                "require_api_key is true but no client keys are configured (add keys, [[clients]] or a [store], \
                 or set require_api_key = false)",
            ));
        }
        let exempt = raw.exempt.unwrap_or_else(|| DEFAULT_EXEMPT.iter().map(|s| s.to_string()).collect());
        if let Some((i, bad)) = exempt.iter().enumerate().find(|(_, p)| !p.starts_with('/')) {
            return Err(self.invalid(format!("auth.exempt[{i}]"), format!("`{bad}` must start with `/`")));
        }
        Ok(AuthConfig { require_api_key, keys: keys.into_iter().map(Secret::new).collect(), exempt })
    }

    pub(super) fn expand_keys(&self, field: &str, raw: Vec<String>) -> Result<Vec<String>, ConfigError> {
        raw.into_iter()
            .enumerate()
            .map(|(i, key)| {
                let key = key.trim().to_string();
                if key.is_empty() {
                    return Err(self.invalid(format!("{field}[{i}]"), "key is empty"));
                }
                Ok(key)
            })
            .collect()
    }

    pub(super) fn clients(&self, raw: Vec<RawClientKey>) -> Result<Vec<ClientConfig>, ConfigError> {
        let mut names = std::collections::HashSet::new();
        raw.into_iter()
            .enumerate()
            .map(|(i, client)| {
                let at = |f: &str| format!("clients[{i}].{f}");
                if client.name.trim().is_empty() || !names.insert(client.name.clone()) {
                    return Err(self.invalid(at("name"), "must be given and unique"));
                }
                let key = client.key;
                if key.trim().is_empty() {
                    return Err(self.invalid(at("key"), "key is empty"));
                }
                for (field, limit) in [("rpm", client.rpm), ("rph", client.rph)] {
                    if limit.is_some_and(|l| l > MAX_WINDOW_LIMIT) {
                        return Err(self.invalid(at(field), "must be at most 1000000"));
                    }
                }
                Ok(ClientConfig {
                    name: client.name,
                    key: Secret::new(key.trim().to_string()),
                    models: client.models.unwrap_or_default().into_iter().filter(|m| m != "*").collect(),
                    rpm: client.rpm.filter(|l| *l > 0),
                    rph: client.rph.filter(|l| *l > 0),
                    tokens_per_day: client.tokens_per_day.filter(|l| *l > 0),
                    passthrough: client.passthrough.unwrap_or(false),
                })
            })
            .collect()
    }

    pub(super) fn limits(&self, raw: RawLimits) -> Result<LimitsConfig, ConfigError> {
        let rpm = raw.rpm.unwrap_or(DEFAULT_RPM);
        let rph = raw.rph.unwrap_or(DEFAULT_RPH);
        for (field, limit) in [("limits.rpm", rpm), ("limits.rph", rph)] {
            if limit > MAX_WINDOW_LIMIT {
                return Err(self.invalid(field, "must be at most 1000000 (0 for no limit)"));
            }
        }
        Ok(LimitsConfig {
            enabled: raw.enabled.unwrap_or(true),
            rpm,
            rph,
            config_keys: raw.config_keys.unwrap_or(false),
            per_ip_rpm: raw.per_ip_rpm.filter(|l| *l > 0),
        })
    }

    pub(super) fn store(&self, raw: RawStore) -> Result<Option<StoreConfig>, ConfigError> {
        let Some(url) = raw.url else { return Ok(None) };
        let url = StoreUrl::parse(&url, self.base_dir).map_err(|e| self.invalid("store.url", e))?;
        let keep_usage = raw.keep_usage.map_or(DEFAULT_KEEP_USAGE, |d| d.0);
        if keep_usage < std::time::Duration::from_secs(3600) {
            return Err(self.invalid("store.keep_usage", "must be at least 1h"));
        }
        Ok(Some(StoreConfig { url, keep_usage }))
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn a_postgres_url_prints_without_its_password() {
        let parse = |text: &str| StoreUrl::parse(text, std::path::Path::new("/")).expect("a valid URL");
        let url = parse("postgres://sluice:hunter2@db:5432/gw?password=hunter2");
        assert_eq!(url.to_string(), "postgres://sluice@db:5432/gw");
        assert_eq!(format!("{url:?}"), "postgres://sluice@db:5432/gw");
        // The driver takes everything up to the first `@` as credentials.
        for tricky in ["postgres://u:ab/cd@db/gw", "postgres://u:a?b@db/gw", "postgresql://u:p#q@db/gw"] {
            let shown = parse(tricky).to_string();
            assert!(
                !shown.contains("ab/cd") && !shown.contains("a?b") && !shown.contains("p#q"),
                "{tricky} -> {shown}"
            );
        }
        assert!(StoreUrl::parse("mysql://x", std::path::Path::new("/")).is_err());
    }
}
