//! Key health news: what this instance learned about an upstream key (a 429
//! cooldown, a key the upstream refused, an operator's reset), queued for
//! whoever shares it with other instances. Nothing listens (and nothing is
//! queued) unless `[redis]` is configured; pushing is a lock-free queue push
//! and a wake-up, never a wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use crossbeam_queue::SegQueue;
use tokio::sync::Notify;

/// One change of a key's health, named by the key's [`shared id`].
///
/// [`shared id`]: super::keyring::UpstreamKey::shared_id
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyEvent {
    /// Cooling (or resting before a 429) for this long from now (a
    /// duration, not a time of day: instances' clocks may disagree).
    Cooled {
        /// The key.
        id: Arc<str>,
        /// Milliseconds until the key comes back.
        for_ms: u64,
    },
    /// Refused by the upstream: out of service until a reset.
    Disabled {
        /// The key.
        id: Arc<str>,
    },
    /// The operator reset every failed key (these are the ones this instance has).
    Reset {
        /// Every key this instance knows.
        ids: Vec<Arc<str>>,
    },
}

/// Most events queued while the publisher has not taken them; past it new
/// ones are dropped (each instance still acts on what it sees itself).
const MAX_QUEUED: usize = 10_000;

/// The queue of [`KeyEvent`]s; one per process, shared by every upstream.
#[derive(Debug, Default)]
pub struct KeyNews {
    queue: SegQueue<KeyEvent>,
    wake: Notify,
    listening: AtomicBool,
}

impl KeyNews {
    /// From now on events are queued (the cluster's publisher drains them).
    pub fn listen(&self) {
        self.listening.store(true, Relaxed);
    }

    /// Queues an event, if anybody listens.
    pub fn push(&self, event: KeyEvent) {
        if self.listening.load(Relaxed) && self.queue.len() < MAX_QUEUED {
            self.queue.push(event);
            self.wake.notify_one();
        }
    }

    /// The oldest queued event.
    pub fn pop(&self) -> Option<KeyEvent> {
        self.queue.pop()
    }

    /// Resolves once an event was pushed (or [`Self::wake`] called) since the last wait.
    pub async fn pushed(&self) {
        self.wake.notified().await;
    }

    /// Wakes whoever waits in [`Self::pushed`], with no event.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_queued_until_somebody_listens() {
        let news = KeyNews::default();
        news.push(KeyEvent::Disabled { id: Arc::from("a") });
        assert_eq!(news.pop(), None);
        news.listen();
        news.push(KeyEvent::Disabled { id: Arc::from("b") });
        assert_eq!(news.pop(), Some(KeyEvent::Disabled { id: Arc::from("b") }));
    }
}
