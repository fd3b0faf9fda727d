//! The mock's hit counters: what tests assert on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;

/// A counter per name (key, path), added on first sight. Reads take the read lock
/// only; the mock is a test and load-test baseline, not the gateway's hot path.
#[derive(Debug, Default)]
pub struct Counters(RwLock<HashMap<String, Arc<AtomicU64>>>);

impl Counters {
    /// Adds one to `name`; returns its new count.
    pub fn hit(&self, name: &str) -> u64 {
        if let Ok(map) = self.0.read()
            && let Some(counter) = map.get(name)
        {
            return counter.fetch_add(1, Ordering::Relaxed) + 1;
        }
        match self.0.write() {
            Ok(mut map) => map.entry(name.to_string()).or_default().fetch_add(1, Ordering::Relaxed) + 1,
            Err(_) => 0,
        }
    }

    fn snapshot(&self) -> HashMap<String, u64> {
        self.0
            .read()
            .map(|map| map.iter().map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed))).collect())
            .unwrap_or_default()
    }

    fn clear(&self) {
        if let Ok(mut map) = self.0.write() {
            map.clear();
        }
    }
}

/// All of the mock's counters.
#[derive(Debug, Default)]
pub struct MockStats {
    /// Requests received (every path but `/_*`).
    pub requests: AtomicU64,
    /// Requests that arrived over HTTP/2.
    pub http2_requests: AtomicU64,
    /// Requests being answered now (until their headers are sent).
    pub in_flight: AtomicU64,
    /// The most requests ever in flight at once.
    pub peak_in_flight: AtomicU64,
    /// Hits per upstream key (the bearer token), `-` when none.
    pub by_key: Counters,
    /// Hits per path.
    pub by_path: Counters,
    /// Answers per status code.
    pub by_status: Counters,
    /// SSE streams started.
    pub streams_started: AtomicU64,
    /// SSE streams that sent `[DONE]`.
    pub streams_finished: AtomicU64,
    /// SSE streams whose receiver went away before the end.
    pub streams_cancelled: AtomicU64,
    /// SSE streams the mock broke on purpose (`drop_after`).
    pub streams_dropped: AtomicU64,
}

/// A point-in-time copy of [`MockStats`], as `GET /_stats` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct StatsSnapshot {
    /// Requests received.
    pub requests: u64,
    /// Requests over HTTP/2.
    pub http2_requests: u64,
    /// Connections accepted.
    pub connections: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// The most requests in flight at once (headers not yet sent).
    pub peak_in_flight: u64,
    /// Hits per key.
    pub by_key: HashMap<String, u64>,
    /// Hits per path.
    pub by_path: HashMap<String, u64>,
    /// Answers per status code.
    pub by_status: HashMap<String, u64>,
    /// SSE streams started.
    pub streams_started: u64,
    /// SSE streams completed.
    pub streams_finished: u64,
    /// SSE streams cancelled by the receiver.
    pub streams_cancelled: u64,
    /// SSE streams broken on purpose.
    pub streams_dropped: u64,
}

impl StatsSnapshot {
    /// Hits for one key (0 if never seen).
    pub fn key(&self, key: &str) -> u64 {
        self.by_key.get(key).copied().unwrap_or(0)
    }

    /// Hits on one path (0 if never seen).
    pub fn path(&self, path: &str) -> u64 {
        self.by_path.get(path).copied().unwrap_or(0)
    }

    /// Answers with one status (0 if never sent).
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status.to_string()).copied().unwrap_or(0)
    }
}

impl MockStats {
    /// Copies every counter.
    pub fn snapshot(&self, connections: u64, connections_open: u64) -> StatsSnapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: load(&self.requests),
            http2_requests: load(&self.http2_requests),
            connections,
            connections_open,
            peak_in_flight: load(&self.peak_in_flight),
            by_key: self.by_key.snapshot(),
            by_path: self.by_path.snapshot(),
            by_status: self.by_status.snapshot(),
            streams_started: load(&self.streams_started),
            streams_finished: load(&self.streams_finished),
            streams_cancelled: load(&self.streams_cancelled),
            streams_dropped: load(&self.streams_dropped),
        }
    }

    /// Zeroes every counter.
    pub fn reset(&self) {
        for counter in [
            &self.requests,
            &self.http2_requests,
            &self.peak_in_flight,
            &self.streams_started,
            &self.streams_finished,
            &self.streams_cancelled,
            &self.streams_dropped,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        self.by_key.clear();
        self.by_path.clear();
        self.by_status.clear();
    }
}
