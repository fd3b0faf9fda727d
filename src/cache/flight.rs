//! Single flight: while one request for a key is upstream, identical
//! requests wait for its answer instead of sending their own. The leader
//! holds a [`FlightGuard`]; completing it hands the stored entry to every
//! follower, and dropping it (an error, a non-200, an answer too large, a
//! client gone) tells them to go upstream themselves.
//!
//! The map of flights is touched only by cacheable misses, twice per leader
//! (join, finish): a sharded mutex, each held for one map operation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::{CacheKey, Entry};

/// Shards of the flight map.
const SHARDS: usize = 16;

/// How a flight ended, as its followers see it.
#[derive(Debug, Clone)]
enum State {
    Pending,
    Done(Arc<Entry>),
    Failed,
}

/// The flights in progress.
#[derive(Default)]
pub struct Flights {
    shards: [Mutex<HashMap<CacheKey, watch::Receiver<State>>>; SHARDS],
}

impl std::fmt::Debug for Flights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights").finish_non_exhaustive()
    }
}

/// What joining a flight made of the caller.
pub enum Joined {
    /// The first: it goes upstream and must complete or drop the guard.
    Leader(FlightGuard),
    /// Another request for the key is upstream: wait for it.
    Follower(Follower),
}

/// A leader's duty to report how its flight ended.
pub struct FlightGuard {
    flights: Arc<Flights>,
    key: CacheKey,
    sender: watch::Sender<State>,
    done: bool,
}

/// A request waiting for a leader.
pub struct Follower(watch::Receiver<State>);

impl Flights {
    fn shard(&self, key: &CacheKey) -> &Mutex<HashMap<CacheKey, watch::Receiver<State>>> {
        &self.shards[usize::from(key[0]) % SHARDS]
    }

    /// Joins the flight for `key`, leading it if there is none.
    pub fn join(self: &Arc<Self>, key: CacheKey) -> Joined {
        let Ok(mut flights) = self.shard(&key).lock() else {
            // A poisoned shard: no flight for anyone; everyone goes upstream.
            let (sender, _) = watch::channel(State::Pending);
            return Joined::Leader(FlightGuard { flights: Arc::clone(self), key, sender, done: true });
        };
        if let Some(receiver) = flights.get(&key) {
            return Joined::Follower(Follower(receiver.clone()));
        }
        let (sender, receiver) = watch::channel(State::Pending);
        flights.insert(key, receiver);
        Joined::Leader(FlightGuard { flights: Arc::clone(self), key, sender, done: false })
    }

    /// Flights in progress (for tests and `/stats`).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map_or(0, |m| m.len())).sum()
    }

    /// Whether none is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn end(&self, key: &CacheKey) {
        if let Ok(mut flights) = self.shard(key).lock() {
            flights.remove(key);
        }
    }
}

impl FlightGuard {
    /// The leader's answer was stored: followers take it.
    pub fn complete(mut self, entry: Arc<Entry>) {
        self.flights.end(&self.key);
        self.done = true;
        let _ = self.sender.send(State::Done(entry));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if !self.done {
            self.flights.end(&self.key);
            let _ = self.sender.send(State::Failed);
        }
    }
}

impl Follower {
    /// The leader's entry, or `None` when it failed or `wait` passed first.
    pub async fn wait(mut self, wait: Duration) -> Option<Arc<Entry>> {
        let outcome = tokio::time::timeout(wait, self.0.wait_for(|s| !matches!(s, State::Pending))).await;
        match outcome {
            Ok(Ok(state)) => match &*state {
                State::Done(entry) => Some(Arc::clone(entry)),
                State::Pending | State::Failed => None,
            },
            // The leader's guard vanished without a word, or time ran out.
            Ok(Err(_)) | Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Fill, ResponseCache};

    #[tokio::test]
    async fn followers_get_the_leaders_answer_or_go_on_their_own() {
        let cache = ResponseCache::in_memory(1 << 20);
        let Joined::Leader(guard) = cache.flights().join([7; 32]) else { panic!("first is the leader") };
        let Joined::Follower(follower) = cache.flights().join([7; 32]) else { panic!("second follows") };
        let waiting = tokio::spawn(follower.wait(Duration::from_secs(5)));
        let fill = Fill::new(Arc::clone(&cache), [7; 32], Duration::from_secs(60), 1 << 10, None, Some(guard));
        let mut recorder = fill.record(None, None, false);
        recorder.saw(&bytes::Bytes::from_static(b"{}"));
        recorder.finish(None);
        assert_eq!(waiting.await.unwrap().map(|e| e.len()), Some(2));
        assert!(cache.flights().is_empty());

        let Joined::Leader(guard) = cache.flights().join([8; 32]) else { panic!() };
        let Joined::Follower(follower) = cache.flights().join([8; 32]) else { panic!() };
        drop(guard);
        assert!(follower.wait(Duration::from_secs(5)).await.is_none(), "a failed leader sends followers on");
        assert!(matches!(cache.flights().join([8; 32]), Joined::Leader(_)), "and the next one leads");
    }
}
