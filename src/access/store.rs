//! The client-key store: users, keys (stored as SHA-256 hashes) and usage per
//! key, model and hour, behind one small [`Store`] trait (SQLite here; the
//! same portable SQL serves PostgreSQL).
//!
//! No request ever queries it. A [`StoreHandle`] runs the store on a thread
//! of its own: admin calls and CLI commands send it jobs; every second it
//! writes the usage counted in memory, and when the data changed (this
//! process's writes at once; another process's, the CLI or another instance,
//! within a second) it hands a fresh [`Snapshot`] to whoever builds the
//! in-memory client table.

pub mod postgres;
pub mod schema;
pub mod sqlite;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use crossbeam_queue::SegQueue;
use serde::Serialize;

pub use crate::config::StoreUrl;

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

/// One finished request of a store key, counted in memory until written.
#[derive(Debug, Clone)]
pub struct UsageEvent {
    /// The key.
    pub key_id: i64,
    /// The model as routed (`-` when none).
    pub model: Arc<str>,
    /// Wall-clock second of the request's end.
    pub at: i64,
    /// Requests (1, or a sum put back after a failed write).
    pub requests: u64,
    /// Of which ended in an error.
    pub errors: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Tokens served from the cache.
    pub cached_tokens: u64,
}

/// Usage counted by requests, waiting to be written: a lock-free queue the
/// request path pushes to and the store thread drains.
#[derive(Debug, Default)]
pub struct UsageQueue(SegQueue<UsageEvent>, std::sync::atomic::AtomicU64);

/// Finished requests kept in memory for the store at most (about 100 bytes
/// each): minutes of heavy traffic while the database does not answer.
pub const MAX_QUEUED_EVENTS: usize = 1_000_000;

impl UsageQueue {
    /// Counts one finished request.
    pub fn push(&self, event: UsageEvent) {
        // A store thread stuck on a database that stopped answering drains
        // nothing: past the bound, requests are not counted (and said so)
        // rather than memory growing without end.
        if self.0.len() >= MAX_QUEUED_EVENTS {
            let dropped = self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if dropped.is_power_of_two() {
                tracing::error!(dropped = dropped + 1, "the key store takes no usage: requests not counted");
            }
            return;
        }
        self.0.push(event);
    }

    /// Takes every queued event, summed per (key, model, hour), and each key's last use.
    fn drain(&self) -> (Vec<UsageRow>, Vec<(i64, i64)>) {
        let mut rows: std::collections::HashMap<(i64, Arc<str>, i64), UsageRow> = std::collections::HashMap::new();
        let mut last: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
        while let Some(event) = self.0.pop() {
            let hour = event.at.div_euclid(3600);
            let row = rows.entry((event.key_id, Arc::clone(&event.model), hour)).or_insert_with(|| UsageRow {
                key_id: event.key_id,
                model: event.model.to_string(),
                hour,
                ..UsageRow::default()
            });
            row.requests += event.requests as i64;
            row.errors += event.errors as i64;
            row.prompt_tokens += event.prompt_tokens as i64;
            row.completion_tokens += event.completion_tokens as i64;
            row.cached_tokens += event.cached_tokens as i64;
            let used = last.entry(event.key_id).or_insert(event.at);
            *used = (*used).max(event.at);
        }
        // In key order: instances writing the same rows at once then lock
        // them in the same order, and never deadlock.
        let mut rows: Vec<UsageRow> = rows.into_values().collect();
        rows.sort_unstable_by(|a, b| (a.key_id, &a.model, a.hour).cmp(&(b.key_id, &b.model, b.hour)));
        let mut last: Vec<(i64, i64)> = last.into_iter().collect();
        last.sort_unstable();
        (rows, last)
    }
}

/// A job for the store's thread. It returns how to deliver its answer, so a
/// write's caller hears back only after the client table was rebuilt.
type Job = Box<dyn FnOnce(&mut dyn Store) -> Box<dyn FnOnce() + Send> + Send>;

enum Message {
    /// Run this, then (if it wrote) send a fresh snapshot.
    Run(Job, bool),
    /// Write what is queued and stop.
    Close(tokio::sync::oneshot::Sender<()>),
}

/// How often usage is written and other processes' changes looked for.
pub const STORE_TICK: Duration = Duration::from_secs(1);
/// Whether the database answers, as the store's thread saw it.
#[derive(Debug)]
struct StoreHealth {
    /// The last write or poll was answered.
    up: std::sync::atomic::AtomicBool,
    /// Unix ms when the call in progress began; 0 when none is.
    busy_since: std::sync::atomic::AtomicU64,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self { up: std::sync::atomic::AtomicBool::new(true), busy_since: std::sync::atomic::AtomicU64::new(0) }
    }
}

impl StoreHealth {
    /// Runs `call` marked as waiting on the database.
    fn busy<T>(&self, call: impl FnOnce() -> T) -> T {
        use std::sync::atomic::Ordering::Relaxed;
        self.busy_since.store(unix_millis().max(1), Relaxed);
        let out = call();
        self.busy_since.store(0, Relaxed);
        out
    }
}

fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A call waiting on the database this long makes the store count as down.
pub const STALLED_AFTER: Duration = Duration::from_secs(5);
/// Longest wait of an admin call or CLI command for the store's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often usage past its retention is deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The store, running on a thread of its own.
#[derive(Clone)]
pub struct StoreHandle {
    jobs: Sender<Message>,
    /// Whether the database answers.
    health: Arc<StoreHealth>,
    /// Usage the request path counts.
    pub usage: Arc<UsageQueue>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle").finish_non_exhaustive()
    }
}

/// Called (on the store's thread) with each new snapshot.
pub type OnChange = Box<dyn Fn(Snapshot) + Send>;

fn today_first_hour() -> i64 {
    unix_now().div_euclid(86_400) * 24
}

impl StoreHandle {
    /// Starts the store's thread over an opened store. `on_change` gets the
    /// first snapshot before this returns, then one after every change;
    /// usage older than `keep_usage` is deleted once an hour.
    pub fn start(mut store: Box<dyn Store>, on_change: OnChange, keep_usage: Duration) -> Result<Self, StoreError> {
        store.changed_elsewhere()?;
        on_change(store.snapshot(today_first_hour())?);
        let (jobs, receiver) = crossbeam_channel::unbounded();
        let usage = Arc::new(UsageQueue::default());
        let queue = Arc::clone(&usage);
        let health = Arc::new(StoreHealth::default());
        let shared = Arc::clone(&health);
        std::thread::Builder::new()
            .name("sluice-store".into())
            .spawn(move || run(store, receiver, queue, on_change, keep_usage, &shared))
            .map_err(|e| StoreError::Database(format!("cannot start the store thread: {e}")))?;
        Ok(Self { jobs, usage, health })
    }

    /// Whether the database answered the store's last write or poll, and
    /// no call has been waiting on it for [`STALLED_AFTER`] (a database that
    /// accepts but never answers leaves the thread waiting, not failing).
    pub fn is_up(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let busy_since = self.health.busy_since.load(Relaxed);
        let stalled = busy_since != 0 && unix_millis().saturating_sub(busy_since) > STALLED_AFTER.as_millis() as u64;
        self.health.up.load(Relaxed) && !stalled
    }

    /// Runs `read` on the store's thread and returns its result.
    pub async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call(read, false).await
    }

    /// Runs `write` on the store's thread; the client table is rebuilt from
    /// the changed data before this returns, so the change applies to the
    /// very next request.
    pub async fn write<T: Send + 'static>(
        &self,
        write: impl FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call(write, true).await
    }

    async fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut dyn Store) -> Result<T, StoreError> + Send + 'static,
        wrote: bool,
    ) -> Result<T, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |store| {
            // A caller that gave up (its answer was a 503 already) must not
            // see its change made later behind its back.
            if reply.is_closed() {
                return Box::new(|| {});
            }
            let result = job(store);
            Box::new(move || {
                let _ = reply.send(result);
            })
        });
        self.jobs.send(Message::Run(job, wrote)).map_err(|_| StoreError::Closed)?;
        match tokio::time::timeout(CALL_TIMEOUT, answer).await {
            Ok(answer) => answer.map_err(|_| StoreError::Closed)?,
            // The job stays queued (and runs when the database answers);
            // the admin call answers 503 now.
            Err(_) => Err(StoreError::Database(format!("no answer within {CALL_TIMEOUT:?}"))),
        }
    }

    /// Writes the usage still queued and stops the thread (shutdown).
    pub async fn close(&self) {
        let (done, finished) = tokio::sync::oneshot::channel();
        if self.jobs.send(Message::Close(done)).is_ok() {
            let _ = finished.await;
        }
    }
}

/// Writes the usage counted so far; false if the store refused it (it is
/// kept for the next try).
fn flush(store: &mut dyn Store, usage: &UsageQueue) -> bool {
    let (rows, last) = usage.drain();
    if rows.is_empty() {
        return true;
    }
    if let Err(error) = store.add_usage(&rows, &last) {
        // Kept in memory: put back, to be tried again next tick.
        tracing::warn!(%error, rows = rows.len(), "could not write usage; keeping it for the next try");
        requeue(usage, rows);
        return false;
    }
    true
}

/// Rows kept in memory while the store refuses writes; past this, the
/// oldest are dropped (and logged) rather than growing without end.
const MAX_UNWRITTEN_ROWS: usize = 100_000;

/// Puts aggregated rows back (one event per row, carrying its sums), at
/// most [`MAX_UNWRITTEN_ROWS`] of them: the events queued meanwhile have
/// their own bound, and are summed with these at the next try.
fn requeue(usage: &UsageQueue, rows: Vec<UsageRow>) {
    let room = MAX_UNWRITTEN_ROWS;
    if rows.len() > room {
        let lost: i64 = rows[room..].iter().map(|r| r.requests).sum();
        tracing::error!(rows = rows.len() - room, requests = lost, "the store refuses writes: usage dropped");
    }
    for row in rows.into_iter().take(room) {
        // Past the events' bound: these are counted already, not new.
        usage.0.push(UsageEvent {
            key_id: row.key_id,
            model: Arc::from(row.model.as_str()),
            at: row.hour * 3600,
            requests: row.requests as u64,
            errors: row.errors as u64,
            prompt_tokens: row.prompt_tokens as u64,
            completion_tokens: row.completion_tokens as u64,
            cached_tokens: row.cached_tokens as u64,
        });
    }
}

fn run(
    mut store: Box<dyn Store>,
    jobs: Receiver<Message>,
    usage: Arc<UsageQueue>,
    on_change: OnChange,
    keep_usage: Duration,
    health: &StoreHealth,
) {
    let up = &health.up;
    let set_up = |answered: bool| {
        if up.swap(answered, std::sync::atomic::Ordering::Relaxed) != answered {
            match answered {
                true => tracing::info!("the key store answers again"),
                false => tracing::warn!(
                    "the key store does not answer; requests go on with the client table in memory, usage is kept until it is back"
                ),
            }
        }
    };
    // The marker of other processes' changes is read before the snapshot:
    // a change landing after it is seen on the next poll, never lost.
    let refresh = |store: &mut dyn Store| -> bool {
        let _ = store.changed_elsewhere();
        match store.snapshot(today_first_hour()) {
            Ok(snapshot) => {
                on_change(snapshot);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "could not read the key store; the client table stays, retried in a second");
                false
            }
        }
    };
    let mut dirty = false;
    let mut tick = std::time::Instant::now() + STORE_TICK;
    let mut next_prune = std::time::Instant::now();
    loop {
        // A deadline checked after every job too: a steady stream of jobs
        // must not hold back the usage writes and the poll.
        if std::time::Instant::now() >= tick {
            tick = std::time::Instant::now() + STORE_TICK;
            let (wrote, changed) = health.busy(|| (flush(store.as_mut(), &usage), store.changed_elsewhere()));
            match changed {
                Ok(changed) => {
                    set_up(wrote);
                    if changed || dirty {
                        dirty = !refresh(store.as_mut());
                    }
                }
                Err(error) => {
                    set_up(false);
                    tracing::debug!(%error, "could not poll the key store");
                }
            }
            if std::time::Instant::now() >= next_prune {
                next_prune = std::time::Instant::now() + PRUNE_EVERY;
                let before = unix_now().div_euclid(3600) - (keep_usage.as_secs() / 3600) as i64;
                match store.prune_usage(before) {
                    Ok(0) => {}
                    Ok(rows) => tracing::info!(rows, "usage past its retention deleted"),
                    Err(error) => tracing::warn!(%error, "could not delete old usage"),
                }
            }
        }
        match jobs.recv_deadline(tick) {
            Ok(Message::Run(job, wrote)) => {
                // Usage counted so far is written first, so a read sees it.
                health.busy(|| flush(store.as_mut(), &usage));
                let run =
                    health.busy(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(store.as_mut()))));
                let deliver = match run {
                    Ok(deliver) => deliver,
                    Err(_) => {
                        // The job's answer is dropped (its caller hears "closed");
                        // the thread, and every later job, goes on.
                        tracing::error!("a key store job panicked");
                        continue;
                    }
                };
                if wrote {
                    dirty = !health.busy(|| refresh(store.as_mut()));
                }
                deliver();
            }
            Ok(Message::Close(done)) => {
                flush(store.as_mut(), &usage);
                let _ = done.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                flush(store.as_mut(), &usage);
                return;
            }
        }
    }
}
