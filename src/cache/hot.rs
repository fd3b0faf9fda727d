//! Hot answers: each event loop's own copy of the answers its hottest
//! requests get, so that a repeated request is answered without touching
//! memory another core writes to.
//!
//! Two cores serving one hot entry from the shared store and the shortcut
//! index contend on every shared write a hit makes: the index shard's lock,
//! the shortcut's and the entry's reference counts, the count of each frame
//! handed out. perf put two thirds of those lookups' time in the atomic
//! instructions. A hot answer is a copy (what was sent, what the plan found,
//! the entry's bytes) in a small table of the loop's own, behind a lock only
//! that loop takes, except for a purge or `/stats`. Only event loops keep
//! tables: the runtime's workers would share one, and its lock would be the
//! contention this removes.
//!
//! A copy is made on a shortcut hit, never on a miss, when its slot is free;
//! a slot another request holds goes to the second request in a row asking
//! for it. It is served only while what it was copied from is what the store
//! holds: the store's changes are counted by bucket of keys
//! ([`ResponseCache::changes`]), and a copy checked at an older count of its
//! key's bucket asks the store once, by key, whether its entry is still the
//! one there (with a steady stream of misses being stored, about once per 64
//! stores a loop sees). It holds only under its
//! shortcut's routing table, for a key its model grant permits, while its
//! entry is fresh. The tables are bounded in bytes and take them out of
//! `[cache] max_bytes`.
//!
//! [`ResponseCache::changes`]: super::ResponseCache::changes

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::shortcut::{Kept, Sent, Shortcut};
use super::{CacheKey, ENTRY_OVERHEAD, Entry};
use crate::access::table::Allowed;
use crate::tasks::loops;
use crate::telemetry::metrics::ModelMetrics;

/// Slots in a loop's table (direct-mapped by the request's fast hash).
const SLOTS: usize = 16;

/// What a copy costs beyond what was sent, the route's names and the
/// entry's own weight: the slot, the allocations of what was sent and of the
/// names, and the original entry's `Arc` the weak handle keeps allocated.
const HOT_OVERHEAD: u64 = 512;

/// One hot answer.
#[derive(Debug)]
struct Hot {
    hash: u64,
    sent: Kept,
    /// The shortcut's facts, in allocations of this loop's own.
    shortcut: Shortcut,
    /// The store's entry this is a copy of: compared by address (the weak
    /// handle keeps the address from being reused), never upgraded.
    source: Weak<Entry>,
    /// The copy, in allocations of this loop's own.
    answer: Arc<Entry>,
    /// The store's change count when `source` was last seen in it.
    epoch: u64,
    weight: u64,
}

/// A slot: its hot answer, and the hash of the last request that found
/// the slot taken by another (its second hit takes the slot).
#[derive(Debug, Default)]
struct Slot {
    hot: Option<Hot>,
    candidate: u64,
}

/// One loop's table.
#[derive(Debug)]
struct Table {
    slots: Vec<Slot>,
    bytes: u64,
    /// Answers served from this table.
    hits: u64,
    /// Where room is made when a copy does not fit: the slot after the
    /// last one emptied so.
    hand: usize,
}

impl Table {
    fn new() -> Self {
        Self { slots: (0..SLOTS).map(|_| Slot::default()).collect(), bytes: 0, hits: 0, hand: 0 }
    }

    fn take(&mut self, slot: usize) -> Option<Hot> {
        let hot = self.slots[slot].hot.take()?;
        self.bytes -= hot.weight;
        Some(hot)
    }

    fn clear(&mut self) {
        for slot in 0..SLOTS {
            self.take(slot);
        }
    }
}

/// A table on a cache line of its own.
#[repr(align(128))]
#[derive(Debug)]
struct PerLoop(Mutex<Table>);

impl PerLoop {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding it leaves the table consistent: slots and
        // bytes change together.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every loop's table of hot answers (and one for the threads that are no
/// loop's).
#[derive(Debug)]
pub struct HotAnswers {
    tables: Box<[PerLoop]>,
    per_table: u64,
}

/// What a hot answer is checked against, besides the store.
pub struct Check<'a> {
    /// The routing table's generation.
    pub generation: u64,
    /// The key's model grant (`None`: every model).
    pub allowed: Option<&'a Allowed>,
    /// Now, on tokio's clock.
    pub now: Instant,
    /// The oldest answer the request accepts (`x-sluice-cache-ttl`).
    pub max_age: Option<Duration>,
}

/// A hot answer found for a request, and what its plan said of it.
pub struct Found {
    /// The copy of the entry.
    pub answer: Arc<Entry>,
    /// The routed model's counters.
    pub model: Option<Arc<ModelMetrics>>,
    /// `"stream": true` in the request.
    pub stream: bool,
    /// The `max_tokens` cap the request was lowered to, if it was.
    pub capped: Option<u64>,
}

/// The lightest copy there is: one of an empty answer to an empty request.
const LIGHTEST: u64 = HOT_OVERHEAD + ENTRY_OVERHEAD;

/// The bytes of `[cache] max_bytes` the tables of `event_loops` loops take:
/// 1/64 of it, at most 1 MiB, at most a quarter of a small cache; none
/// without loops, or when a loop's share could not hold a few small copies.
pub fn budget(max_bytes: u64, event_loops: usize) -> u64 {
    let budget = (max_bytes / 64).clamp(16 << 10, 1 << 20).min(max_bytes / 4);
    if event_loops == 0 || budget / (event_loops as u64) < 4 * LIGHTEST { 0 } else { budget }
}

impl HotAnswers {
    /// Tables for `event_loops` loops, sharing `budget` bytes (the
    /// workers' slot of [`loops::here`] is kept empty).
    pub fn new(event_loops: usize, budget: u64) -> Self {
        let tables: Box<[PerLoop]> = (0..=event_loops).map(|_| PerLoop(Mutex::new(Table::new()))).collect();
        let per_table = budget / event_loops.max(1) as u64;
        Self { tables, per_table }
    }

    /// The calling thread's table: an event loop's, and only when the
    /// tables hold anything.
    fn here(&self) -> Option<&PerLoop> {
        (self.per_table > 0 && loops::current() > 0).then(|| loops::here(&self.tables))
    }

    /// The hot answer to `sent` (whose fast hash is `hash`) on the calling
    /// thread's loop, if one holds by `check`; `changes` is the store's
    /// change count under a key now, and `current` says whether the store
    /// still holds the entry at an address under a key (asked only when the
    /// count moved since the copy was last checked). A copy that no longer
    /// holds (another routing table, a stale or replaced entry) is let go.
    pub fn find(
        &self,
        hash: u64,
        sent: &Sent<'_>,
        check: &Check<'_>,
        changes: impl FnOnce(&CacheKey) -> u64,
        current: impl FnOnce(&CacheKey, *const Entry) -> bool,
    ) -> Option<Found> {
        let mut table = self.here()?.lock();
        let slot = hash as usize % SLOTS;
        let hot = table.slots[slot].hot.as_mut().filter(|hot| hot.hash == hash && hot.sent.sent() == *sent)?;
        if !hot.shortcut.permits(check.allowed) || !hot.answer.fresh(check.now, check.max_age) {
            // Not for this key, or too old for this client: still the
            // store's entry for others.
            return None;
        }
        let epoch = changes(&hot.shortcut.key);
        let holds = hot.shortcut.generation == check.generation
            && hot.answer.fresh(check.now, None)
            && (hot.epoch >= epoch || current(&hot.shortcut.key, hot.source.as_ptr()));
        if !holds {
            table.take(slot);
            return None;
        }
        hot.epoch = hot.epoch.max(epoch);
        let shortcut = &hot.shortcut;
        let found = Found {
            answer: Arc::clone(&hot.answer),
            model: shortcut.model.clone(),
            stream: shortcut.stream,
            capped: shortcut.capped,
        };
        table.hits += 1;
        Some(found)
    }

    /// Copies `entry` for `sent` into the calling thread's table, when its
    /// slot is free or this is the second request in a row to want it
    /// there; `epoch` is the store's change count under the shortcut's key,
    /// read before `entry` was looked up. A copy heavier than half a table is not made.
    pub fn offer(&self, hash: u64, sent: Sent<'_>, shortcut: &Shortcut, entry: &Arc<Entry>, epoch: u64) {
        let Some(here) = self.here() else { return };
        let names = (shortcut.route.len() + shortcut.requested.len()) as u64;
        let weight = HOT_OVERHEAD + names + sent.len() + entry.weight();
        if weight > self.per_table / 2 {
            return;
        }
        let slot = hash as usize % SLOTS;
        {
            let mut table = here.lock();
            let taken = table.slots[slot].hot.as_ref().is_some_and(|hot| hot.hash != hash);
            if taken && std::mem::replace(&mut table.slots[slot].candidate, hash) != hash {
                return;
            }
        }
        // Copied outside the lock (only this loop takes it, but a purge waits).
        let hot = Hot {
            hash,
            sent: Kept::of(sent),
            shortcut: shortcut.clone(),
            source: Arc::downgrade(entry),
            answer: Arc::new(entry.copy()),
            epoch,
            weight,
        };
        let mut table = here.lock();
        table.take(slot);
        while table.bytes + weight > self.per_table {
            let victim = table.hand;
            table.hand = (victim + 1) % SLOTS;
            table.take(victim);
        }
        table.bytes += weight;
        table.slots[slot] = Slot { hot: Some(hot), candidate: 0 };
    }

    /// Lets every copy go (a purge, a reload).
    pub fn clear(&self) {
        for table in &self.tables {
            table.lock().clear();
        }
    }

    /// Answers served from the tables.
    pub fn hits(&self) -> u64 {
        self.tables.iter().map(|t| t.lock().hits).sum()
    }

    /// Copies held.
    pub fn count(&self) -> u64 {
        self.tables.iter().map(|t| t.lock().slots.iter().filter(|s| s.hot.is_some()).count() as u64).sum()
    }

    /// Bytes held, as the bound counts them.
    pub fn bytes(&self) -> u64 {
        self.tables.iter().map(|t| t.lock().bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use bytes::Bytes;

    use super::*;
    use crate::cache::{Fill, ResponseCache};

    /// An answer of `len` bytes stored under `[key; 32]`, as the store holds it.
    fn stored(cache: &Arc<ResponseCache>, key: u8, len: usize) -> Arc<Entry> {
        let fill = Fill::new(Arc::clone(cache), [key; 32], Duration::from_secs(60), 1 << 20, None, None);
        let mut recorder = fill.record(None, None, false);
        recorder.saw(&Bytes::from(vec![key; len]));
        recorder.finish(None);
        cache.lookup(&[key; 32], None, Instant::now()).unwrap()
    }

    fn shortcut(key: u8, route: &str) -> Shortcut {
        Shortcut {
            generation: 1,
            key: [key; 32],
            route: route.into(),
            requested: route.into(),
            model: None,
            stream: false,
            capped: None,
        }
    }

    fn sent(body: &[u8]) -> Sent<'_> {
        Sent { scope: "*", budget: false, path: "/v1/chat/completions", query: "", body }
    }

    fn check() -> Check<'static> {
        Check { generation: 1, allowed: None, now: Instant::now(), max_age: None }
    }

    /// The store's change count under any key: `epoch`.
    fn at(epoch: u64) -> impl FnOnce(&CacheKey) -> u64 {
        move |_| epoch
    }

    #[test]
    fn a_copy_is_served_on_its_own_loop_from_allocations_of_its_own() {
        let cache = ResponseCache::in_memory(64 << 20);
        let entry = stored(&cache, 1, 100);
        let hot = HotAnswers::new(2, 1 << 20);
        // Only loops keep tables.
        hot.offer(7, sent(b"{}"), &shortcut(1, "m"), &entry, cache.changes(&[1; 32]));
        assert_eq!(hot.count(), 0, "the workers keep none");
        let (body, epoch) = (sent(b"{}"), cache.changes(&[1; 32]));
        loops::as_loop(0, || hot.offer(7, body, &shortcut(1, "m"), &entry, epoch));
        let unasked = |_: &CacheKey, _: *const Entry| -> bool { unreachable!("the store did not change") };
        let found = loops::as_loop(0, || hot.find(7, &body, &check(), at(epoch), unasked)).expect("a copy");
        assert!(!Arc::ptr_eq(&found.answer, &entry));
        let (copy, original) = (found.answer.frame(0).unwrap(), entry.frame(0).unwrap());
        assert_eq!(copy, original);
        assert_ne!(copy.as_ptr(), original.as_ptr(), "its bytes are its own");
        assert_eq!((found.answer.stored_at, found.answer.ttl), (entry.stored_at, entry.ttl));
        assert!(loops::as_loop(1, || hot.find(7, &body, &check(), at(epoch), unasked)).is_none(), "another loop's");
        assert!(hot.find(7, &body, &check(), at(epoch), unasked).is_none(), "the workers' table");
        // What was sent must be equal, not just hash alike.
        assert!(loops::as_loop(0, || hot.find(7, &sent(b"{ }"), &check(), at(epoch), unasked)).is_none());
        assert_eq!((hot.hits(), hot.count()), (1, 1));
        hot.clear();
        assert_eq!((hot.count(), hot.bytes()), (0, 0));
    }

    #[test]
    fn a_copy_holds_while_the_store_holds_what_it_copied() {
        loops::as_loop(0, a_copy_holds_while_the_store_holds_what_it_copied_on_a_loop);
    }

    fn a_copy_holds_while_the_store_holds_what_it_copied_on_a_loop() {
        let cache = ResponseCache::in_memory(64 << 20);
        let entry = stored(&cache, 1, 100);
        let hot = HotAnswers::new(1, 1 << 20);
        let body = sent(b"{}");
        hot.offer(7, body, &shortcut(1, "m"), &entry, cache.changes(&[1; 32]));
        let asked = Cell::new(0);
        let find = || {
            let current = |key: &CacheKey, at: *const Entry| {
                asked.set(asked.get() + 1);
                cache.holds(key, at)
            };
            hot.find(7, &body, &check(), |key| cache.changes(key), current).is_some()
        };
        // Another key's entry stored, in another bucket of the count: not even asked.
        stored(&cache, 2, 100);
        assert!(find());
        assert_eq!(asked.get(), 0);
        // One in its bucket (the key's first byte, modulo 64): asked once.
        stored(&cache, 65, 100);
        assert!(find() && find());
        assert_eq!(asked.get(), 1, "asked once a change");
        // Its own entry replaced (a refresh): the copy is let go.
        let replaced = stored(&cache, 1, 100);
        assert!(!Arc::ptr_eq(&replaced, &entry));
        assert!(!find());
        assert_eq!((asked.get(), hot.count()), (2, 0));
        // A purge changes every bucket.
        let before = cache.changes(&[9; 32]);
        cache.purge(None);
        assert!(cache.changes(&[9; 32]) > before);
    }

    #[test]
    fn a_copy_holds_under_its_routing_table_for_keys_granted_its_model_while_fresh() {
        loops::as_loop(0, a_copy_holds_under_its_routing_table_on_a_loop);
    }

    fn a_copy_holds_under_its_routing_table_on_a_loop() {
        let cache = ResponseCache::in_memory(64 << 20);
        let entry = stored(&cache, 1, 100);
        let hot = HotAnswers::new(1, 1 << 20);
        let (body, epoch) = (sent(b"{}"), cache.changes(&[1; 32]));
        let offer = || hot.offer(7, body, &shortcut(1, "m"), &entry, epoch);
        let holds = |check: &Check<'_>| hot.find(7, &body, check, at(epoch), |_, _| true).is_some();
        offer();
        let other: Allowed = Allowed::Only(["n".into()].into_iter().collect());
        assert!(!holds(&Check { allowed: Some(&other), ..check() }), "not granted");
        assert!(holds(&check()), "still held for the keys that are");
        assert!(!holds(&Check { max_age: Some(Duration::ZERO), ..check() }), "older than the client takes");
        assert!(holds(&check()), "but still held for the others");
        assert!(!holds(&Check { now: Instant::now() + Duration::from_secs(60), ..check() }), "past its TTL");
        offer();
        assert!(!holds(&Check { generation: 2, ..check() }), "a reload's table plans afresh");
        assert_eq!(hot.count(), 0);
        // Tables only where loops are, and only when a loop's share holds a few copies.
        assert_eq!((budget(64 << 20, 0), budget(64 << 20, 2)), (0, 1 << 20));
        assert_eq!(budget(1 << 20, 64), 0, "16 KiB over 64 loops");
    }

    #[test]
    fn a_taken_slot_goes_to_a_second_request_in_a_row_and_the_tables_stay_in_their_bound() {
        loops::as_loop(0, a_taken_slot_goes_to_a_second_request_on_a_loop);
    }

    fn a_taken_slot_goes_to_a_second_request_on_a_loop() {
        let cache = ResponseCache::in_memory(64 << 20);
        let (a, b) = (stored(&cache, 1, 100), stored(&cache, 2, 100));
        let hot = HotAnswers::new(1, 64 << 10);
        let (one, two) = (sent(b"1"), sent(b"2"));
        let epoch = cache.changes(&[1; 32]);
        // 1 and 17 share a slot.
        hot.offer(1, one, &shortcut(1, "m"), &a, epoch);
        hot.offer(17, two, &shortcut(2, "m"), &b, epoch);
        assert!(hot.find(1, &one, &check(), at(epoch), |_, _| true).is_some(), "one offer does not take it");
        hot.offer(17, two, &shortcut(2, "m"), &b, epoch);
        assert!(hot.find(17, &two, &check(), at(epoch), |_, _| true).is_some(), "two in a row do");
        assert!(hot.find(1, &one, &check(), at(epoch), |_, _| true).is_none());
        // Heavy answers in every slot: the oldest make room; one heavier than
        // half the table is not copied.
        let heavy = stored(&cache, 3, 20 << 10);
        for hash in 0..SLOTS as u64 {
            hot.offer(hash, one, &shortcut(3, "m"), &heavy, epoch);
            assert!(hot.bytes() <= 64 << 10, "{} bytes", hot.bytes());
        }
        assert!(hot.count() >= 2);
        let too_heavy = stored(&cache, 4, 32 << 10);
        hot.clear();
        hot.offer(5, one, &shortcut(4, "m"), &too_heavy, epoch);
        assert_eq!(hot.count(), 0);
    }
}
