//! The config file: a raw serde schema (`deny_unknown_fields`, so a typo is an
//! error) turned by [`Config::from_toml`] into a validated [`Config`].
//! Every error names the file, the field and the reason.

pub mod access;
pub mod cache;
pub mod cluster;
pub mod keys;
pub mod routing;
pub mod server;
pub mod tls;
pub mod units;
pub mod upstream;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use access::{AuthConfig, ClientConfig as ClientKeyConfig, LimitsConfig, StoreConfig, StoreUrl};
use access::{RawAuth, RawClientKey, RawLimits, RawStore};
use cache::RawCache;
pub use cache::{CacheConfig, CacheScope};
use cluster::RawRedis;
pub use cluster::{OnRedisError, RedisConfig};
use keys::{Secret, env_lookup, expand_env};
pub use routing::{CapMode, FallbackOn, FallbackSet, RoutingConfig, TargetConfig, deployment_name_ok};
use routing::{RawRouting, RawTarget};
use server::RawServer;
pub use server::{DEFAULT_LISTEN, ServerConfig, TlsConfig};
use units::{ByteSize, HumanDuration};
use upstream::RawUpstream;
pub use upstream::{LoginConfig, RetryPolicy, Strategy, Timeouts, UpstreamAuth, UpstreamConfig};

/// Default upstream TCP connect timeout (seconds).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an idle pooled upstream connection is kept (seconds).
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Default number of idle connections kept per upstream host.
pub const DEFAULT_POOL_MAX_IDLE_PER_HOST: usize = 256;
/// Default size at which the request log rotates (bytes): 100 MiB.
pub const DEFAULT_REQUEST_LOG_MAX_SIZE: u64 = 100 << 20;
/// Default number of rotated request-log files kept.
pub const DEFAULT_REQUEST_LOG_KEEP: usize = 5;
/// Most distinct parameter names all `[[models]].defaults` may name together.
pub const MAX_DEFAULT_PARAMS: usize = 64;

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {reason}")]
    Read {
        /// The config file.
        file: String,
        /// The OS error.
        reason: String,
    },
    /// The TOML is malformed or names an unknown field (toml's message names both).
    #[error("{file}: {reason}")]
    Parse {
        /// The config file.
        file: String,
        /// The parser's message, with line and field.
        reason: String,
    },
    /// A field has a value that cannot work.
    #[error("{file}: field `{field}`: {reason}")]
    Invalid {
        /// The config file.
        file: String,
        /// Dotted path of the field, e.g. `models[1].upstream`.
        field: String,
        /// Why the value is refused.
        reason: String,
    },
    /// Several problems at once (every unset variable, every section that
    /// fails on its own), so one run of `sluice check` names them all.
    #[error("{} problems:\n  {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    /// One error as it is, several as [`ConfigError::Several`].
    fn of(mut problems: Vec<ConfigError>) -> Self {
        if problems.len() == 1 { problems.remove(0) } else { Self::Several(problems) }
    }
}

/// Keeps a section's value, or notes its error and goes on to the next.
fn keep<T>(problems: &mut Vec<ConfigError>, result: Result<T, ConfigError>) -> Option<T> {
    result.map_err(|e| problems.push(e)).ok()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    client: RawClient,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    clients: Vec<RawClientKey>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    redis: RawRedis,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    routing: RawRouting,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    h1_client: Option<H1Client>,
    connect_timeout: Option<HumanDuration>,
    pool_idle_timeout: Option<HumanDuration>,
    pool_max_idle_per_host: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    token: Option<String>,
    public_health_details: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
    requests: Option<PathBuf>,
    requests_max_size: Option<ByteSize>,
    requests_keep: Option<usize>,
    access: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: Option<bool>,
    token: Option<String>,
    per_user: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    upstream: Option<String>,
    upstream_model: Option<String>,
    targets: Option<Vec<RawTarget>>,
    fallback_on: Option<Vec<FallbackOn>>,
    max_tokens_cap: Option<u64>,
    max_tokens_over: Option<CapMode>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    defaults: toml::Table,
    cache: Option<bool>,
}

/// How sluice speaks HTTP/2 to an upstream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Http2Mode {
    /// HTTP/2 when TLS ALPN agrees, HTTP/1.1 otherwise (always HTTP/1.1 over `http://`).
    #[default]
    Auto,
    /// HTTP/2 cleartext with prior knowledge (h2c); `http://` upstreams only.
    PriorKnowledge,
    /// HTTP/1.1 only.
    Never,
}

/// Which client carries HTTP/1.1 to cleartext upstreams.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum H1Client {
    /// sluice's own client, run on the request's task (the fast path).
    #[default]
    Sluice,
    /// hyper-util's pooled client, as for TLS upstreams.
    Hyper,
}

/// Application log format.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from (for reloads and messages); `None` when built in code.
    pub source: Option<PathBuf>,
    /// Listener settings.
    pub server: ServerConfig,
    /// Upstream connection pool settings (fixed for the process lifetime).
    pub client: ClientConfig,
    /// Client authentication.
    pub auth: AuthConfig,
    /// Config keys with a name and a policy.
    pub clients: Vec<ClientKeyConfig>,
    /// Client limits.
    pub limits: LimitsConfig,
    /// The key store, if any.
    pub store: Option<StoreConfig>,
    /// The response cache.
    pub cache: CacheConfig,
    /// The Redis several instances share, if any.
    pub redis: Option<RedisConfig>,
    /// Application logging.
    pub log: LogConfig,
    /// Bearer token for `/admin/*`; `None` means the admin API is not served.
    pub admin_token: Option<Secret<String>>,
    /// Whether `/health` shows upstreams and keys to anyone (otherwise only
    /// with the admin token; the public answer is status, version, uptime).
    pub public_health_details: bool,
    /// A bearer token that may read `/metrics` (a scraper's), besides the
    /// operator's client keys.
    pub metrics_token: Option<Secret<String>>,
    /// Whether `GET /metrics` is served.
    pub metrics_enabled: bool,
    /// Whether `/metrics` shows usage per user (off by default: one series per user).
    pub metrics_per_user: bool,
    /// Upstreams, in file order.
    pub upstreams: Vec<UpstreamConfig>,
    /// Model routes, in file order.
    pub models: Vec<ModelConfig>,
    /// Model used when a request names none.
    pub default_model: Option<String>,
    /// Fallbacks between targets and the retry budget.
    pub routing: RoutingConfig,
}

/// `[client]`: the pooled upstream client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The client for HTTP/1.1 over `http://`.
    pub h1_client: H1Client,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host.
    pub pool_max_idle_per_host: usize,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `sluice=debug`; `RUST_LOG` wins when set.
    pub level: String,
    /// Text or JSON lines.
    pub format: LogFormat,
    /// The request log file (JSON lines), if any; relative to the config file's folder.
    pub requests: Option<PathBuf>,
    /// Size at which the request log rotates.
    pub requests_max_size: u64,
    /// Rotated request-log files kept.
    pub requests_keep: usize,
    /// One concise line per finished request in the application log.
    pub access: bool,
}

/// One `[[models]]` entry.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Client-visible name, or `*` for every unlisted model.
    pub name: String,
    /// Name of the upstream of its first target.
    pub upstream: String,
    /// Name sent to its first target when it differs from `name`.
    pub upstream_model: Option<String>,
    /// Where it is served: weighted within a priority tier, tiers in order.
    pub targets: Vec<TargetConfig>,
    /// Failures that move a request to the next target.
    pub fallback_on: FallbackSet,
    /// A cap on `max_tokens` and what a request over it gets.
    pub max_tokens_cap: Option<(u64, CapMode)>,
    /// Other client-visible names.
    pub aliases: Vec<String>,
    /// Parameters filled in when a request lacks them.
    pub defaults: serde_json::Map<String, serde_json::Value>,
    /// Whether its answers may be cached (when `[cache]` is on).
    pub cache: bool,
}

impl Config {
    /// Reads and validates a config file. Relative `keys_file` paths are resolved
    /// against the config file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { file: path.display().to_string(), reason: e.to_string() })?;
        let mut config = Self::from_toml(&text, path, &env_lookup)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates TOML text. `path` names the file in errors and anchors
    /// relative paths; `env` resolves `${VAR}` and `SLUICE_*` overrides.
    pub fn from_toml(text: &str, path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let parse_error =
            |e: toml::de::Error| ConfigError::Parse { file: file.clone(), reason: parse_reason(text, &e) };
        // Shape and types first, from the text (errors carry line and column),
        // then `${VAR}` in every string, every unset one reported at once.
        toml::from_str::<RawConfig>(text).map_err(parse_error)?;
        let mut table = toml::Value::Table(toml::from_str::<toml::Table>(text).map_err(parse_error)?);
        let mut unset = Vec::new();
        expand_strings(&mut table, &mut String::new(), env, &mut unset);
        if !unset.is_empty() {
            let invalid = |(field, reason)| ConfigError::Invalid { file: file.clone(), field, reason };
            return Err(ConfigError::of(unset.into_iter().map(invalid).collect()));
        }
        let raw = RawConfig::deserialize(table)
            .map_err(|e| ConfigError::Parse { file: file.clone(), reason: e.to_string() })?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        Validator { file, base_dir, env }.validate(raw)
    }
}

/// Replaces `${VAR}` in every string of `value` (keys, URLs, names, paths
/// alike), noting each failure with the field's dotted path.
fn expand_strings(
    value: &mut toml::Value,
    path: &mut String,
    env: &dyn Fn(&str) -> Option<String>,
    failed: &mut Vec<(String, String)>,
) {
    match value {
        toml::Value::String(text) if text.contains("${") => match expand_env(text, env) {
            Ok(expanded) => *text = expanded,
            Err(reason) => failed.push((path.clone(), reason)),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_strings(item, path, env, failed);
                path.truncate(len);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                expand_strings(item, path, env, failed);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// Where and why the TOML is malformed: line, column and the parser's reason,
/// never the offending text (it may hold a key).
fn parse_reason(text: &str, error: &toml::de::Error) -> String {
    let reason = error.message().trim_end();
    let Some(span) = error.span() else { return reason.to_string() };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {reason}")
}

struct Validator<'a> {
    file: String,
    base_dir: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Validator<'_> {
    fn invalid(&self, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { file: self.file.clone(), field: field.into(), reason: reason.into() }
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        // Sections that stand alone are all checked, their problems collected;
        // what depends on them (auth on clients and store, models on
        // upstreams) is checked once they are sound.
        let mut problems = Vec::new();
        let server = keep(&mut problems, self.server(raw.server));
        let clients = keep(&mut problems, self.clients(raw.clients));
        let limits = keep(&mut problems, self.limits(raw.limits));
        let store = keep(&mut problems, self.store(raw.store));
        let cache = keep(&mut problems, self.cache(raw.cache));
        let redis = keep(&mut problems, self.redis(raw.redis));
        let public_health_details = raw.admin.public_health_details.unwrap_or(false);
        let admin_token = keep(&mut problems, self.admin(raw.admin));
        let metrics_token = keep(
            &mut problems,
            match raw.metrics.token.as_deref().map(str::trim) {
                Some(token) if token.len() < 8 => Err(self.invalid("metrics.token", "must be at least 8 characters")),
                Some(token) => Ok(Some(Secret::new(token.to_string()))),
                None => Ok(None),
            },
        );
        let level = keep(&mut problems, self.log_level(raw.log.level.clone()));
        let default_connect = raw.client.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0);
        let upstreams: Vec<Option<UpstreamConfig>> = raw
            .upstreams
            .into_iter()
            .enumerate()
            .map(|(i, u)| keep(&mut problems, self.upstream(i, u, default_connect)))
            .collect();
        let (
            Some(server),
            Some(clients),
            Some(limits),
            Some(store),
            Some(cache),
            Some(redis),
            Some(admin_token),
            Some(metrics_token),
            Some(level),
        ) = (server, clients, limits, store, cache, redis, admin_token, metrics_token, level)
        else {
            return Err(ConfigError::of(problems));
        };
        if !problems.is_empty() {
            return Err(ConfigError::of(problems));
        }
        let upstreams: Vec<UpstreamConfig> = upstreams.into_iter().flatten().collect();
        let auth = self.auth(raw.auth, &clients, store.is_some())?;
        if upstreams.is_empty() {
            return Err(self.invalid("upstreams", "at least one [[upstreams]] entry is required"));
        }
        let mut names = HashSet::new();
        for (i, upstream) in upstreams.iter().enumerate() {
            if !names.insert(upstream.name.as_str()) {
                return Err(self.invalid(format!("upstreams[{i}].name"), format!("`{}` is used twice", upstream.name)));
            }
        }
        let routing = self.routing(raw.routing)?;
        let models = self.models(raw.models, &names, routing.fallback_on)?;
        for (i, model) in models.iter().enumerate() {
            for (j, target) in model.targets.iter().enumerate() {
                let azure = upstreams.iter().any(|u| u.name == target.upstream && u.azure.is_some());
                if target.deployment.is_some() && !azure {
                    return Err(self.invalid(
                        format!("models[{i}].targets[{j}].deployment"),
                        format!("`{}` is not kind = \"azure\": it takes no deployment", target.upstream),
                    ));
                }
            }
        }
        let default_model = routing.default_model.clone();
        if let Some(default) = &default_model {
            let routed = models.iter().any(|m| m.name == *default || m.name == "*" || m.aliases.contains(default));
            if !routed {
                return Err(
                    self.invalid("routing.default_model", format!("`{default}` is not a configured model or alias"))
                );
            }
        }
        let client = raw.client;
        Ok(Config {
            source: None,
            server,
            client: ClientConfig {
                h1_client: client.h1_client.unwrap_or_default(),
                connect_timeout: client.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
                pool_idle_timeout: client.pool_idle_timeout.map_or(DEFAULT_POOL_IDLE_TIMEOUT, |d| d.0),
                pool_max_idle_per_host: client.pool_max_idle_per_host.unwrap_or(DEFAULT_POOL_MAX_IDLE_PER_HOST),
            },
            auth,
            clients,
            limits,
            store,
            cache,
            redis,
            admin_token,
            public_health_details,
            metrics_token,
            metrics_enabled: raw.metrics.enabled.unwrap_or(true),
            metrics_per_user: raw.metrics.per_user.unwrap_or(false),
            log: LogConfig {
                level,
                format: raw.log.format.unwrap_or_default(),
                requests: raw.log.requests.map(|p| self.base_dir.join(p)),
                requests_max_size: raw.log.requests_max_size.map_or(DEFAULT_REQUEST_LOG_MAX_SIZE, |b| b.0),
                requests_keep: raw.log.requests_keep.unwrap_or(DEFAULT_REQUEST_LOG_KEEP),
                access: raw.log.access.unwrap_or(false),
            },
            upstreams,
            models,
            default_model,
            routing,
        })
    }

    fn admin(&self, raw: RawAdmin) -> Result<Option<Secret<String>>, ConfigError> {
        let Some(token) = raw.token else { return Ok(None) };
        // `${VAR}` was expanded with every other string.
        if token.trim().len() < 8 {
            return Err(self.invalid("admin.token", "must be at least 8 characters"));
        }
        Ok(Some(Secret::new(token.trim().to_string())))
    }

    /// A tracing filter (`info`, `warn,sluice=debug`): one that does not parse
    /// would silence every log line.
    fn log_level(&self, level: Option<String>) -> Result<String, ConfigError> {
        let level = level.unwrap_or_else(|| "info".to_string());
        match tracing_subscriber::EnvFilter::try_new(&level) {
            Ok(_) => Ok(level),
            Err(e) => Err(self.invalid(
                "log.level",
                format!("`{level}` is not a log filter (error, warn, info, debug, trace, or target=level): {e}"),
            )),
        }
    }

    fn models(
        &self,
        raw: Vec<RawModel>,
        upstreams: &HashSet<&str>,
        fallback_on: FallbackSet,
    ) -> Result<Vec<ModelConfig>, ConfigError> {
        let mut seen_names = HashSet::new();
        let mut default_params = HashSet::new();
        let mut models = Vec::with_capacity(raw.len());
        for (i, model) in raw.into_iter().enumerate() {
            let at = |f: &str| format!("models[{i}].{f}");
            if model.name.trim().is_empty() {
                return Err(self.invalid(at("name"), "must not be empty"));
            }
            let targets =
                self.targets(&at, model.upstream.clone(), model.upstream_model.clone(), model.targets, upstreams)?;
            for name in std::iter::once(&model.name).chain(&model.aliases) {
                if !seen_names.insert(name.clone()) {
                    return Err(self.invalid(at("name"), format!("`{name}` is routed twice (as a name or an alias)")));
                }
            }
            if model.name == "*" && (!model.aliases.is_empty() || targets.iter().any(|t| t.upstream_model.is_some())) {
                return Err(self.invalid(
                    at("name"),
                    "the wildcard `*` passes names through: it takes no aliases or upstream_model",
                ));
            }
            let defaults =
                serde_json::to_value(&model.defaults).map_err(|e| self.invalid(at("defaults"), e.to_string()))?;
            let serde_json::Value::Object(defaults) = defaults else {
                return Err(self.invalid(at("defaults"), "must be a table"));
            };
            if defaults.contains_key("model") || defaults.contains_key("stream") {
                return Err(self.invalid(at("defaults"), "`model` and `stream` cannot have defaults"));
            }
            default_params.extend(defaults.keys().cloned());
            if default_params.len() > MAX_DEFAULT_PARAMS {
                return Err(self.invalid(
                    at("defaults"),
                    format!("all models together may name at most {MAX_DEFAULT_PARAMS} default parameters"),
                ));
            }
            if model.max_tokens_cap == Some(0) {
                return Err(self.invalid(at("max_tokens_cap"), "must be at least 1"));
            }
            if let Some(cap) = model.max_tokens_cap
                && let Some((name, _)) = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
                    .iter()
                    .filter_map(|name| Some((*name, defaults.get(*name)?)))
                    .find(|(_, value)| value.as_u64().is_none_or(|v| v > cap))
            {
                return Err(self.invalid(
                    at(&format!("defaults.{name}")),
                    format!("must be a number up to max_tokens_cap ({cap})"),
                ));
            }
            if model.max_tokens_over.is_some() && model.max_tokens_cap.is_none() {
                return Err(
                    self.invalid(at("max_tokens_over"), "says what happens over `max_tokens_cap`: set that too")
                );
            }
            models.push(ModelConfig {
                name: model.name,
                upstream: targets[0].upstream.clone(),
                upstream_model: targets[0].upstream_model.clone(),
                fallback_on: model.fallback_on.map_or(fallback_on, |r| FallbackSet::of(&r)),
                max_tokens_cap: model.max_tokens_cap.map(|cap| (cap, model.max_tokens_over.unwrap_or_default())),
                targets,
                aliases: model.aliases,
                defaults,
                cache: model.cache.unwrap_or(true),
            });
        }
        Ok(models)
    }
}

#[cfg(test)]
mod tests;
