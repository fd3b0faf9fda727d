//! One upstream's HTTP/2 pools: one for each event loop and one for the
//! runtime's workers. A connection's task runs on the loop that opened it,
//! so a request on another loop would wake that loop to send its frames and
//! be woken from there for every answer; each loop uses its own connections
//! instead. The counters are shared, so `/metrics` shows one pool, and so
//! is what TLS told of the peer (a peer that picks HTTP/1.1 is learnt once).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::{ConnCounts, Pool, PoolStats, Settings};
use crate::tasks::loops;

/// The pools of one upstream authority, by event loop.
pub struct Pools {
    /// Index 0 serves the runtime's workers; `n + 1` loop `n`.
    shards: Box<[Arc<Pool>]>,
}

impl Pools {
    /// Empty pools for the runtime's workers and `event_loops` loops, each
    /// opening up to `settings.max_connections` connections.
    pub fn new(settings: &Settings, event_loops: usize) -> Self {
        let stats = Arc::new(PoolStats::default());
        let not_h2 = Arc::new(AtomicBool::new(false));
        Self {
            shards: (0..=event_loops)
                .map(|_| Pool::new(settings.clone(), Arc::clone(&stats), Arc::clone(&not_h2)))
                .collect(),
        }
    }

    /// The pool of the calling thread's event loop.
    pub fn here(&self) -> &Arc<Pool> {
        loops::here(&self.shards)
    }

    /// Connections by state, over every loop's pool.
    pub fn counts(&self) -> ConnCounts {
        self.shards.iter().map(|pool| pool.counts()).fold(ConnCounts::default(), |sum, c| ConnCounts {
            active: sum.active + c.active,
            idle: sum.idle + c.idle,
            connecting: sum.connecting + c.connecting,
        })
    }

    /// The counters every loop's pool adds to.
    pub fn stats(&self) -> &PoolStats {
        &self.shards[0].stats
    }
}
