//! The client table: every accepted client key (from `[auth] keys`,
//! `[[clients]]` and the store) by the SHA-256 of the key, with its policy
//! (allowed models, limits, expiry) and its counters. Built whole from the
//! config and a store [`Snapshot`], swapped in whole on every change; the
//! request path reads it without a lock and never touches the store. Counters
//! are carried from the table before, so a change never resets a limit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::access::auth::presented_key;
use crate::access::limits::{Exceeded, KeyCounters, KeyLimits, TokenTally, utc_day};
use crate::access::store::{Snapshot, UsageEvent, UsageQueue, unix_now};
use crate::config::Config;
use crate::error::ProxyError;
use crate::routes::Routes;
use crate::telemetry::account::{Account, Finished, RateHeaders};

/// The SHA-256 of a client key: how the table (and the store) know it.
pub type KeyHash = [u8; 32];

/// Hashes a presented key.
pub fn key_hash(key: &[u8]) -> KeyHash {
    Sha256::digest(key).into()
}

/// Which models a key may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// Every routed model.
    All,
    /// Only these (canonical route names; names not routed are kept as
    /// asked, to match what the `*` route passes through).
    Only(HashSet<Box<str>>),
}

impl Allowed {
    /// Whether a request for `requested`, routed to `route` (its canonical
    /// name, `*` for the pass-through route), may go.
    pub fn permits(&self, route: &str, requested: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(names) => names.contains(route) || (route == "*" && names.contains(requested)),
        }
    }

    /// Resolves names and aliases to canonical route names; none, or `*`
    /// among them, is every model.
    fn resolve(models: &[String], routes: &Routes) -> Self {
        if models.is_empty() || models.iter().any(|m| m == "*") {
            return Self::All;
        }
        Self::Only(
            models
                .iter()
                .map(|name| match routes.get(name) {
                    Some(route) if &*route.name != "*" => route.name.clone(),
                    _ => name.as_str().into(),
                })
                .collect(),
        )
    }
}

/// Requests and tokens of one user, for `/metrics` when `[metrics] per_user`.
#[derive(Debug, Default)]
pub struct UserCounters {
    /// Requests finished.
    pub requests: AtomicU64,
    /// Prompt tokens.
    pub prompt_tokens: AtomicU64,
    /// Completion tokens.
    pub completion_tokens: AtomicU64,
}

/// One accepted client key.
pub struct Client {
    /// How logs name it: `config:N`, `client:NAME` or `key:ID`.
    label: Arc<str>,
    user: Option<Arc<str>>,
    user_counters: Option<Arc<UserCounters>>,
    /// The store's id of the key (its usage is written there).
    store_key: Option<i64>,
    /// Models it may use.
    pub allowed: Allowed,
    /// Unix seconds after which it is refused.
    expires_at: Option<i64>,
    /// Its limits.
    pub limits: KeyLimits,
    /// Its counters, carried across tables.
    pub counters: Arc<KeyCounters>,
    usage: Option<Arc<UsageQueue>>,
    /// May call paths beyond the inference endpoints (files, batches,
    /// assistants, stored responses): those live in the upstream account
    /// every client shares. Config keys may; tenants' keys only when granted.
    pub passthrough: bool,
    /// The operator's own key (`[auth] keys`): may read `/metrics` and
    /// `/stats`, and sees the upstream's own rate-limit headers.
    pub operator: bool,
    /// How instances sharing Redis name this key's counters: the first 16
    /// bytes of its hash, in hex (the same on every instance, whatever the
    /// order of the config).
    pub shared_id: Arc<str>,
    /// Who shares cached answers with it under `[cache] scope = "user"`: its
    /// user by store id (a name may be reused by another tenant later).
    pub user_scope: Option<Arc<str>>,
    /// The names of its minute and hour windows in Redis, made on first use.
    pub shared_windows: std::sync::OnceLock<Box<[String; 2]>>,
    /// Where its tokens go for the day budget instances share (a tenant's
    /// key, when `[redis]` is configured: counted with or without a budget,
    /// so one set later in the day starts from what the key already used).
    shared_tokens: Option<Arc<TokenTally>>,
}

/// A client's [`Client::shared_id`].
fn shared_id(hash: &KeyHash) -> Arc<str> {
    Arc::from(hex::encode(&hash[..16]))
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("label", &self.label).field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl Client {
    /// Charges one request to the key's limits. Admitted: the
    /// `x-ratelimit-*` values (`None` for a key without limits). Refused:
    /// the error naming the limit, and the values for its answer.
    pub fn admit(&self) -> Result<Option<RateHeaders>, (ProxyError, RateHeaders)> {
        if !self.limits.any() {
            return Ok(None);
        }
        let now_ms = crate::clock::now_ms();
        // The wall clock only for the day's budget: a day is a UTC day.
        let unix = if self.limits.tokens_per_day.is_some() { unix_now().max(0) as u64 } else { 0 };
        match self.counters.admit(&self.limits, now_ms, unix) {
            Ok(rate) => Ok(Some(rate)),
            Err((exceeded, retry_after, rate)) => Err(self.refusal(exceeded, retry_after, rate)),
        }
    }

    /// The error for a request refused by `exceeded` (here or by the limits
    /// instances share), with the `x-ratelimit-*` values for its answer.
    pub fn refusal(&self, exceeded: Exceeded, retry_after: Duration, rate: RateHeaders) -> (ProxyError, RateHeaders) {
        // Whole seconds, rounded up: a client waiting that long gets in.
        let retry_after = retry_after.as_millis().div_ceil(1000).max(1) as u64;
        let error = match exceeded {
            Exceeded::Rpm | Exceeded::Rph => ProxyError::ClientRateLimited {
                scope: "API key",
                per: if exceeded == Exceeded::Rpm { "minute" } else { "hour" },
                limit: rate.requests.map_or(0, |(limit, ..)| limit),
                retry_after,
            },
            Exceeded::Tokens => {
                ProxyError::QuotaExceeded { budget: self.limits.tokens_per_day.unwrap_or(0), retry_after }
            }
        };
        (error, rate)
    }
}

impl Account for Client {
    fn label(&self) -> &Arc<str> {
        &self.label
    }

    fn user(&self) -> Option<&Arc<str>> {
        self.user.as_ref()
    }

    fn finished(&self, end: &Finished<'_>) {
        let (prompt, completion) = end.tokens.unwrap_or((0, 0));
        // The wall clock, read once and only when something is recorded (a
        // request's tokens and its usage row fall on the same day).
        let mut now = None;
        let mut now = || *now.get_or_insert_with(unix_now);
        // Counted with or without a budget: one set later in the day starts
        // from what the key already used.
        if !end.cached && prompt + completion > 0 {
            let day = utc_day(now().max(0) as u64);
            self.counters.tokens.add(day, prompt + completion);
            if let Some(tally) = &self.shared_tokens {
                tally.push(&self.shared_id, day, prompt + completion);
            }
        }
        if let Some(user) = &self.user_counters {
            user.requests.fetch_add(1, Relaxed);
            user.prompt_tokens.fetch_add(prompt, Relaxed);
            user.completion_tokens.fetch_add(completion, Relaxed);
        }
        if let (Some(key_id), Some(usage)) = (self.store_key, &self.usage) {
            let model = end.model.cloned().unwrap_or_else(|| Arc::from("-"));
            let (cached, prompt, completion) =
                if end.cached { (prompt + completion, 0, 0) } else { (0, prompt, completion) };
            usage.push(UsageEvent {
                key_id,
                model,
                at: now(),
                requests: 1,
                errors: u64::from(end.failed),
                prompt_tokens: prompt,
                completion_tokens: completion,
                cached_tokens: cached,
            });
        }
    }
}

/// Hashes a [`KeyHash`] for the table by taking its first 8 bytes: it is a
/// SHA-256 output already, uniform and not choosable by a client, so hashing
/// it again would only cost time.
#[derive(Debug, Default, Clone, Copy)]
pub struct PrefixHasher(u64);

impl std::hash::Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` writes its length (always 32: a constant) and then its
        // bytes; the first 8 of those are as random as the whole.
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }
}

type ByHash = HashMap<KeyHash, Arc<Client>, std::hash::BuildHasherDefault<PrefixHasher>>;

/// The accepted client keys of a snapshot.
#[derive(Debug)]
pub struct ClientTable {
    require: bool,
    exempt: Vec<Box<str>>,
    by_hash: ByHash,
    /// Users with their counters (for `/metrics`).
    users: HashMap<Arc<str>, Arc<UserCounters>>,
}

impl ClientTable {
    /// Builds the table from the config's keys and clients and, with a
    /// store, its snapshot; counters come from `previous` where a key stays.
    pub fn build(
        config: &Config,
        routes: &Routes,
        store: Option<(&Snapshot, &Arc<UsageQueue>)>,
        previous: Option<&ClientTable>,
        shared_tokens: Option<&Arc<TokenTally>>,
    ) -> Self {
        // By key, not by label: a label like `config:N` follows list order.
        let carried: HashMap<&KeyHash, &Arc<KeyCounters>> =
            previous.map(|p| p.by_hash.iter().map(|(hash, c)| (hash, &c.counters)).collect()).unwrap_or_default();
        let counters_for = |hash: &KeyHash| carried.get(hash).map_or_else(Arc::default, |c| Arc::clone(c));
        let limits = &config.limits;
        let default_window = |own: Option<i64>, default: u32| match own {
            Some(0) => None,
            Some(limit) => u32::try_from(limit).ok().map(|l| l.min(crate::access::limits::MAX_WINDOW_LIMIT)),
            None => (default > 0).then_some(default),
        };
        let mut by_hash = ByHash::default();
        let mut users: HashMap<Arc<str>, Arc<UserCounters>> = HashMap::new();
        for (i, key) in config.auth.keys.iter().enumerate() {
            let label: Arc<str> = Arc::from(format!("config:{i}"));
            let hash = key_hash(key.expose().as_bytes());
            let key_limits = if limits.enabled && limits.config_keys {
                KeyLimits {
                    rpm: default_window(None, limits.rpm),
                    rph: default_window(None, limits.rph),
                    tokens_per_day: None,
                }
            } else {
                KeyLimits::default()
            };
            let client = Client {
                counters: counters_for(&hash),
                label,
                user: None,
                user_counters: None,
                store_key: None,
                allowed: Allowed::All,
                expires_at: None,
                limits: key_limits,
                usage: None,
                passthrough: true,
                operator: true,
                shared_id: shared_id(&hash),
                user_scope: None,
                shared_windows: std::sync::OnceLock::new(),
                shared_tokens: None,
            };
            by_hash.insert(hash, Arc::new(client));
        }
        for client in &config.clients {
            let label: Arc<str> = Arc::from(format!("client:{}", client.name));
            let key_limits = if limits.enabled {
                KeyLimits { rpm: client.rpm, rph: client.rph, tokens_per_day: client.tokens_per_day }
            } else {
                KeyLimits::default()
            };
            let hash = key_hash(client.key.expose().as_bytes());
            let entry = Client {
                counters: counters_for(&hash),
                label,
                user: None,
                user_counters: None,
                store_key: None,
                allowed: Allowed::resolve(&client.models, routes),
                expires_at: None,
                limits: key_limits,
                usage: None,
                passthrough: client.passthrough,
                operator: false,
                shared_id: shared_id(&hash),
                user_scope: None,
                shared_windows: std::sync::OnceLock::new(),
                shared_tokens: shared_tokens.cloned(),
            };
            by_hash.insert(hash, Arc::new(entry));
        }
        if let Some((snapshot, usage)) = store {
            let previous_users = previous.map(|p| &p.users);
            let user_names: HashMap<i64, (Arc<str>, bool)> =
                snapshot.users.iter().map(|u| (u.id, (Arc::from(u.name.as_str()), u.disabled))).collect();
            let today: HashMap<i64, u64> = snapshot.tokens_today.iter().copied().collect();
            for key in &snapshot.keys {
                let user = key.user_id.and_then(|id| user_names.get(&id));
                if key.disabled || user.is_some_and(|(_, disabled)| *disabled) {
                    continue;
                }
                let Some(hash) = hex::decode(&key.hash).ok().and_then(|h| KeyHash::try_from(h).ok()) else { continue };
                let label: Arc<str> = Arc::from(format!("key:{}", key.id));
                let counters = match carried.get(&hash) {
                    Some(carried) => Arc::clone(carried),
                    None => {
                        let fresh = Arc::new(KeyCounters::default());
                        let day = utc_day(unix_now().max(0) as u64);
                        fresh.tokens.add(day, today.get(&key.id).copied().unwrap_or(0));
                        fresh
                    }
                };
                let user_name = user.map(|(name, _)| Arc::clone(name));
                let user_counters = user_name.as_ref().map(|name| {
                    let existing = previous_users.and_then(|u| u.get(name)).cloned();
                    Arc::clone(users.entry(Arc::clone(name)).or_insert_with(|| existing.unwrap_or_default()))
                });
                let key_limits = if limits.enabled {
                    KeyLimits {
                        rpm: default_window(key.rpm, limits.rpm),
                        rph: default_window(key.rph, limits.rph),
                        tokens_per_day: key.tokens_per_day.filter(|t| *t > 0).map(|t| t as u64),
                    }
                } else {
                    KeyLimits::default()
                };
                let client = Client {
                    label,
                    user: user_name,
                    user_counters,
                    store_key: Some(key.id),
                    allowed: Allowed::resolve(&key.models, routes),
                    expires_at: key.expires_at,
                    limits: key_limits,
                    counters,
                    usage: Some(Arc::clone(usage)),
                    passthrough: key.passthrough,
                    operator: false,
                    shared_id: shared_id(&hash),
                    user_scope: key.user_id.map(|id| Arc::from(format!("user:{id}"))),
                    shared_windows: std::sync::OnceLock::new(),
                    shared_tokens: shared_tokens.cloned(),
                };
                by_hash.insert(hash, Arc::new(client));
            }
        }
        Self {
            require: config.auth.require_api_key,
            exempt: config.auth.exempt.iter().map(|p| p.as_str().into()).collect(),
            by_hash,
            users,
        }
    }

    /// Whether `path` is served without a key.
    pub fn is_exempt(&self, path: &str) -> bool {
        !self.require || self.exempt.iter().any(|p| p.as_ref() == path)
    }

    /// The client of the request's key, `None` on a path needing none and
    /// no key presented; refused when the key is unknown, revoked, disabled
    /// (401 `invalid_api_key`) or expired (401 `key_expired`).
    pub fn authenticate(
        &self,
        path: &str,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Option<Arc<Client>>, ProxyError> {
        let Some(presented) = presented_key(headers, query) else {
            return if self.is_exempt(path) { Ok(None) } else { Err(ProxyError::MissingApiKey) };
        };
        // On a path that needs no key, a key that does not count (unknown,
        // expired) is as good as none.
        match self.by_hash.get(&key_hash(presented)) {
            Some(client) if client.expires_at.is_some_and(|at| unix_now() >= at) => {
                if self.is_exempt(path) {
                    Ok(None)
                } else {
                    Err(ProxyError::KeyExpired)
                }
            }
            Some(client) => Ok(Some(Arc::clone(client))),
            None if self.is_exempt(path) => Ok(None),
            None => Err(ProxyError::InvalidApiKey),
        }
    }

    /// Users and their counters.
    pub fn users(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<UserCounters>)> {
        self.users.iter()
    }

    /// Keys in the table.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether no key is accepted.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}
