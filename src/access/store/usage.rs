//! Usage counted by requests in memory until the store's thread writes it:
//! a lock-free queue, bounded, summed per key, model and hour when drained.

use std::sync::Arc;

use crossbeam_queue::SegQueue;

use super::UsageRow;

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
    pub(super) fn drain(&self) -> (Vec<UsageRow>, Vec<(i64, i64)>) {
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

    /// Puts back what was counted already (a write the store refused),
    /// past the bound of new events: it is not new.
    pub(super) fn put_back(&self, event: UsageEvent) {
        self.0.push(event);
    }
}
