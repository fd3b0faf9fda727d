//! The store's own thread: admin calls and CLI commands send it jobs; every
//! [`STORE_TICK`] it writes the usage counted in memory and looks for other
//! processes' changes, handing a fresh [`Snapshot`] on when there are some.
//! It records whether the database answers, for `/health` and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::usage::{UsageEvent, UsageQueue};
use super::{Snapshot, Store, StoreError, UsageRow, unix_now};
use crate::clock::unix_ms;

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
        self.busy_since.store(unix_ms().max(1), Relaxed);
        let out = call();
        self.busy_since.store(0, Relaxed);
        out
    }
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
        let stalled = busy_since != 0 && unix_ms().saturating_sub(busy_since) > STALLED_AFTER.as_millis() as u64;
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
        usage.put_back(UsageEvent {
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
