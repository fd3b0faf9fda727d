//! The client-key store: users, keys (stored as SHA-256 hashes) and usage per
//! key, model and hour, behind one small [`Store`] trait ([`sqlite`] for one
//! box, [`postgres`] for several instances, on the same portable SQL).
//!
//! No request ever queries it. A [`StoreHandle`] runs the store on a
//! [`thread`] of its own: admin calls and CLI commands send it jobs; every second it
//! writes the usage counted in memory, and when the data changed (this
//! process's writes at once; another process's, the CLI or another instance,
//! within a second) it hands a fresh [`Snapshot`] to whoever builds the
//! in-memory client table.

pub mod postgres;
pub mod schema;
pub mod sqlite;
pub mod thread;
pub mod usage;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use crate::config::StoreUrl;
pub use thread::{CALL_TIMEOUT, OnChange, STALLED_AFTER, STORE_TICK, StoreHandle};
pub use usage::{MAX_QUEUED_EVENTS, UsageEvent, UsageQueue};

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed (message without secrets).
    #[error("store: {0}")]
    Database(String),
    /// A unique name or key is already taken.
    #[error("{0} already exists")]
    Conflict(String),
    /// The store's thread is gone (shut down).
    #[error("the store is closed")]
    Closed,
}

/// A user: who keys belong to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// Store id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Contact, if given.
    pub email: Option<String>,
    /// A disabled user's keys are refused.
    pub disabled: bool,
    /// Unix seconds.
    pub created_at: i64,
}

/// A key as stored: never the key itself, only its hash and a prefix to name it by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRecord {
    /// Store id.
    pub id: i64,
    /// Owner, if any.
    pub user_id: Option<i64>,
    /// A name for people.
    pub name: String,
    /// The key's first characters (`sk-sluice-Ab12`), to recognise it by.
    pub prefix: String,
    /// SHA-256 of the key, hex.
    #[serde(skip)]
    pub hash: String,
    /// Allowed models (names or aliases); `["*"]` for all.
    pub models: Vec<String>,
    /// Requests per minute; `None`: the `[limits]` default, `Some(0)`: none.
    pub rpm: Option<i64>,
    /// Requests per hour; as `rpm`.
    pub rph: Option<i64>,
    /// Tokens per UTC day; `None` or `Some(0)`: none.
    pub tokens_per_day: Option<i64>,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<i64>,
    /// Refused while set.
    pub disabled: bool,
    /// When it was revoked (revoked keys are refused for good).
    pub revoked_at: Option<i64>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last request, written with the usage.
    pub last_used_at: Option<i64>,
    /// May call paths beyond the inference endpoints (files, batches,
    /// assistants...), which live in the upstream account every tenant shares.
    pub passthrough: bool,
}

/// Usage of one key, one model, one hour.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    /// The key.
    pub key_id: i64,
    /// The model as routed.
    pub model: String,
    /// Hours since the epoch (`unix_secs / 3600`).
    pub hour: i64,
    /// Requests answered.
    pub requests: i64,
    /// Requests that ended in an error (status 400 and above, or broken).
    pub errors: i64,
    /// Prompt tokens reported by the upstream.
    pub prompt_tokens: i64,
    /// Completion tokens reported by the upstream.
    pub completion_tokens: i64,
    /// Tokens of answers served from the cache (not billed upstream).
    pub cached_tokens: i64,
}

/// A user to create.
#[derive(Debug, Clone, Default)]
pub struct NewUser {
    /// Unique name.
    pub name: String,
    /// Contact.
    pub email: Option<String>,
}

/// Changes to a user; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    /// New name.
    pub name: Option<String>,
    /// New contact (`Some(None)` clears it).
    pub email: Option<Option<String>>,
    /// Enable or disable.
    pub disabled: Option<bool>,
}

/// A key to store (the caller made the key and hashed it).
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    /// Owner.
    pub user_id: Option<i64>,
    /// A name for people.
    pub name: String,
    /// The key's first characters.
    pub prefix: String,
    /// SHA-256 of the key, hex.
    pub hash: String,
    /// Allowed models; empty means all.
    pub models: Vec<String>,
    /// See [`KeyRecord`].
    pub rpm: Option<i64>,
    /// See [`KeyRecord`].
    pub rph: Option<i64>,
    /// See [`KeyRecord`].
    pub tokens_per_day: Option<i64>,
    /// See [`KeyRecord`].
    pub expires_at: Option<i64>,
    /// See [`KeyRecord`].
    pub passthrough: bool,
}

/// Changes to a key; `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    /// New name.
    pub name: Option<String>,
    /// New allowed models.
    pub models: Option<Vec<String>>,
    /// New limits.
    pub rpm: Option<Option<i64>>,
    /// New limits.
    pub rph: Option<Option<i64>>,
    /// New budget.
    pub tokens_per_day: Option<Option<i64>>,
    /// New expiry.
    pub expires_at: Option<Option<i64>>,
    /// Enable or disable.
    pub disabled: Option<bool>,
    /// Allow or deny paths beyond the inference endpoints.
    pub passthrough: Option<bool>,
}

impl UserPatch {
    /// `current` with this patch's changes.
    pub fn applied_to(&self, current: User) -> User {
        User {
            name: self.name.clone().unwrap_or(current.name),
            email: self.email.clone().unwrap_or(current.email),
            disabled: self.disabled.unwrap_or(current.disabled),
            ..current
        }
    }
}

impl KeyPatch {
    /// `current` with this patch's changes.
    pub fn applied_to(&self, current: KeyRecord) -> KeyRecord {
        KeyRecord {
            name: self.name.clone().unwrap_or(current.name),
            models: self.models.clone().unwrap_or(current.models),
            rpm: self.rpm.unwrap_or(current.rpm),
            rph: self.rph.unwrap_or(current.rph),
            tokens_per_day: self.tokens_per_day.unwrap_or(current.tokens_per_day),
            expires_at: self.expires_at.unwrap_or(current.expires_at),
            disabled: self.disabled.unwrap_or(current.disabled),
            passthrough: self.passthrough.unwrap_or(current.passthrough),
            ..current
        }
    }
}

/// What the in-memory client table is built from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every user.
    pub users: Vec<User>,
    /// Every key not revoked.
    pub keys: Vec<KeyRecord>,
    /// Tokens each key used today (UTC), so budgets survive a restart.
    pub tokens_today: Vec<(i64, u64)>,
}

/// The store's operations. Implementations are used from one thread at a
/// time (the store's), so they may hold a plain connection.
pub trait Store: Send {
    /// Brings the schema to the latest version; returns it.
    fn migrate(&mut self) -> Result<u32, StoreError>;
    /// The schema version the database is at.
    fn version(&mut self) -> Result<u32, StoreError>;
    /// Whether another connection changed the data since the last call.
    fn changed_elsewhere(&mut self) -> Result<bool, StoreError>;
    /// Users, live keys and today's tokens, for the client table.
    fn snapshot(&mut self, today_first_hour: i64) -> Result<Snapshot, StoreError>;
    /// Creates a user.
    fn create_user(&mut self, new: &NewUser, now: i64) -> Result<User, StoreError>;
    /// Every user.
    fn users(&mut self) -> Result<Vec<User>, StoreError>;
    /// One user.
    fn user(&mut self, id: i64) -> Result<Option<User>, StoreError>;
    /// Changes a user.
    fn update_user(&mut self, id: i64, patch: &UserPatch) -> Result<Option<User>, StoreError>;
    /// Deletes a user and revokes its keys; false if there was none.
    fn delete_user(&mut self, id: i64, now: i64) -> Result<bool, StoreError>;
    /// Stores a key.
    fn create_key(&mut self, new: &NewKey, now: i64) -> Result<KeyRecord, StoreError>;
    /// Keys (revoked ones too), of one user or all.
    fn keys(&mut self, user_id: Option<i64>) -> Result<Vec<KeyRecord>, StoreError>;
    /// One key.
    fn key(&mut self, id: i64) -> Result<Option<KeyRecord>, StoreError>;
    /// Changes a key.
    fn update_key(&mut self, id: i64, patch: &KeyPatch) -> Result<Option<KeyRecord>, StoreError>;
    /// Revokes a key for good; false if there was none.
    fn revoke_key(&mut self, id: i64, now: i64) -> Result<bool, StoreError>;
    /// Adds usage rows and sets keys' last use, in one transaction.
    fn add_usage(&mut self, rows: &[UsageRow], last_used: &[(i64, i64)]) -> Result<(), StoreError>;
    /// Deletes usage older than `before_hour`; returns the rows deleted.
    fn prune_usage(&mut self, before_hour: i64) -> Result<u64, StoreError>;
    /// Usage rows of one key or all, for hours `from..to`.
    fn usage(&mut self, key_id: Option<i64>, from_hour: i64, to_hour: i64) -> Result<Vec<UsageRow>, StoreError>;
}

/// Opens the store at `url` and brings its schema up to date.
pub fn open(url: &StoreUrl) -> Result<Box<dyn Store>, StoreError> {
    let mut store: Box<dyn Store> = match url {
        StoreUrl::Sqlite(path) => Box::new(sqlite::Sqlite::open(path)?),
        StoreUrl::Postgres(url) => Box::new(postgres::Postgres::open(url.expose())?),
    };
    store.migrate()?;
    Ok(store)
}

/// Wall-clock seconds since the epoch.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}
