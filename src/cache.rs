//! The response cache: answers of model endpoints kept by the SHA-256 of what
//! was sent upstream, bounded in bytes, served until their TTL (read on
//! tokio's clock, so tests can move it), with concurrent identical misses
//! collapsed into one upstream call ([`flight`]).
//!
//! Storage sits behind [`CacheStore`] ([`memory`]: in this process). Instances
//! that share Redis put a [`SharedStore`] behind it: a miss in memory asks
//! the shared store (one round trip) and keeps what it finds; an answer
//! stored here is stored there too (in the background). A [`Recorder`] rides on the response
//! body of a miss, keeps the frames as they pass (up to `max_entry`) and
//! stores them only when the answer ended complete with 200. Hot requests
//! find their entry by the bytes the client sent ([`shortcut`]).

pub mod flight;
pub mod hot;
pub mod memory;
pub mod shortcut;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use flight::{FlightGuard, Flights};
use hot::HotAnswers;
use shortcut::Shortcuts;

/// The SHA-256 of everything that makes two requests the same.
pub type CacheKey = [u8; 32];

/// One cached answer: its bytes in one buffer, where each upstream frame
/// ended (a stream is replayed frame by frame), and what the client needs to
/// read it.
#[derive(Debug)]
pub struct Entry {
    body: Bytes,
    /// End offset of each frame in `body`.
    frame_ends: Box<[u32]>,
    /// The answer's `Content-Type`.
    pub content_type: Option<HeaderValue>,
    /// The answer's `Content-Encoding`, if the upstream compressed it.
    pub content_encoding: Option<HeaderValue>,
    /// A server-sent event stream.
    pub sse: bool,
    /// The model as routed (for purges by model).
    pub model: Option<Arc<str>>,
    /// `(prompt, completion)` tokens of the answer, counted as cached on a hit.
    pub tokens: Option<(u64, u64)>,
    /// When it was stored, on tokio's clock.
    pub stored_at: Instant,
    /// How long it is served.
    pub ttl: Duration,
}

/// What an entry costs beyond its body and frame table: the entry in its
/// `Arc` (256 bytes as the allocator rounds it), its header copies, the
/// store's slot and key, the allocator rounding the body up to its size
/// class, and the holes evictions leave in the allocator's pages. Measured
/// (2026-12-02, loadtest's fill: 50k streamed answers of ~3.6 KiB into
/// 64 MiB, 35k of them evicted on the way): the process grew by 830-1100
/// bytes an entry held above body and frame table, by process and run.
pub(crate) const ENTRY_OVERHEAD: u64 = 1024;

impl Entry {
    /// Bytes it holds, as the bound counts them.
    pub fn weight(&self) -> u64 {
        self.body.len() as u64 + 4 * self.frame_ends.len() as u64 + ENTRY_OVERHEAD
    }

    /// The body's length.
    pub fn len(&self) -> usize {
        self.body.len()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// Frame `i` of the stored answer, if there is one.
    pub fn frame(&self, i: usize) -> Option<Bytes> {
        let end = *self.frame_ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.frame_ends[i - 1] as usize };
        Some(self.body.slice(start..end))
    }

    /// A copy in allocations of its own: its reference counts and its
    /// bytes' are touched by whoever holds the copy, not the original's.
    pub fn copy(&self) -> Self {
        let own = |value: &HeaderValue| {
            let mut copy = HeaderValue::from_maybe_shared(Bytes::copy_from_slice(value.as_bytes()))
                .unwrap_or_else(|_| value.clone());
            copy.set_sensitive(value.is_sensitive());
            copy
        };
        Self {
            body: Bytes::copy_from_slice(&self.body),
            frame_ends: self.frame_ends.clone(),
            content_type: self.content_type.as_ref().map(own),
            content_encoding: self.content_encoding.as_ref().map(own),
            sse: self.sse,
            model: self.model.as_deref().map(Arc::from),
            tokens: self.tokens,
            stored_at: self.stored_at,
            ttl: self.ttl,
        }
    }

    /// Whether it is still served at `now`, for a client that accepts answers
    /// up to `max_age` old.
    pub fn fresh(&self, now: Instant, max_age: Option<Duration>) -> bool {
        let age = now.saturating_duration_since(self.stored_at);
        age < self.ttl && max_age.is_none_or(|max| age < max)
    }
}

/// Where entries live. Every call is synchronous and cheap (memory here; a
/// networked store would answer from a local copy or be awaited by the
/// caller before it gets here).
pub trait CacheStore: Send + Sync {
    /// The entry under `key`, expired or not.
    fn get(&self, key: &CacheKey) -> Option<Arc<Entry>>;
    /// Stores `entry` under `key`, evicting others to stay under the bound.
    fn insert(&self, key: CacheKey, entry: Arc<Entry>);
    /// Removes the entry under `key`.
    fn remove(&self, key: &CacheKey);
    /// Removes the entry under `key` only if it is `entry`, not one stored
    /// in its place since it was read; whether it did.
    fn remove_if_same(&self, key: &CacheKey, entry: &Arc<Entry>) -> bool;
    /// Removes every entry (of `model`, if given); returns how many.
    fn purge(&self, model: Option<&str>) -> u64;
    /// Bytes held, as the bound counts them.
    fn bytes(&self) -> u64;
    /// Entries held.
    fn entries(&self) -> u64;
    /// Entries evicted to stay under the bound, so far.
    fn evictions(&self) -> u64;
}

/// Hashes the in-process indexes' keys, which are hashes already (a
/// SHA-256, a seeded fast hash): their first eight bytes.
type KeyHasher = std::hash::BuildHasherDefault<crate::access::table::PrefixHasher>;

/// quick_cache's options for an index bounded to `max_bytes` in `shards`
/// shards (a power of two), sized for about `items` of them.
fn index_options(shards: usize, items: usize, max_bytes: u64) -> quick_cache::Options {
    quick_cache::OptionsBuilder::new()
        .shards(shards)
        .estimated_items_capacity(items)
        .weight_capacity(max_bytes)
        .build()
        .unwrap_or_else(|_| unreachable!("every option is set"))
}

/// A boxed future, as the shared store's calls return them.
pub type Pending<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where entries several instances share live (Redis), behind the store in
/// memory. Calls never fail: a store that cannot answer answers "none".
pub trait SharedStore: Send + Sync {
    /// The fresh entry under `key`, if the shared store has one.
    fn get(&self, key: CacheKey) -> Pending<'_, Option<Entry>>;
    /// Stores `entry` under `key` until its TTL ends (in the background).
    fn put(&self, key: CacheKey, entry: Arc<Entry>);
    /// Removes every entry (of `model`) and tells the other instances to
    /// drop their copies in memory; returns how many it removed, `None` if
    /// it could not (then the other instances may still hold theirs).
    fn purge(&self, model: Option<String>) -> Pending<'_, Option<u64>>;
}

/// Counters of `sluice_cache_*_total`.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Answers served from the cache (single-flight followers included),
    /// but for the loops' hot answers ([`ResponseCache::hits`] counts all).
    pub hits: AtomicU64,
    /// Cacheable requests that went upstream.
    pub misses: AtomicU64,
    /// Answers stored.
    pub stores: AtomicU64,
    /// Cacheable requests the client asked to skip the cache for.
    pub bypasses: AtomicU64,
    /// Hits found by a shortcut, without planning the request (part of
    /// `hits`; [`ResponseCache::shortcut_hits`] counts the hot answers too).
    pub shortcut_hits: AtomicU64,
}

/// The response cache of the process (it outlives reloads).
pub struct ResponseCache {
    store: Box<dyn CacheStore>,
    shared: Option<Box<dyn SharedStore>>,
    flights: Arc<Flights>,
    shortcuts: Shortcuts,
    hot: HotAnswers,
    /// Changes of the store so far, by bucket of keys (see
    /// [`ResponseCache::changes`]).
    changes: [AtomicU64; CHANGE_BUCKETS],
    /// Its counters.
    pub counters: CacheCounters,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache").field("bytes", &self.store.bytes()).finish_non_exhaustive()
    }
}

impl ResponseCache {
    /// A cache of `max_bytes` in all, answers of up to `max_entry` bytes,
    /// served on `event_loops` loops, in front of `shared` when instances
    /// share one: the shortcuts of hot requests and the loops' hot answers
    /// take their shares of the bound, entries in memory the rest.
    pub fn within(
        max_bytes: u64,
        max_entry: u64,
        event_loops: usize,
        shared: Option<Box<dyn SharedStore>>,
    ) -> Arc<Self> {
        let shortcuts = Shortcuts::within(max_bytes);
        let hot_bytes = hot::budget(max_bytes, event_loops);
        let store = memory::MemoryStore::new(max_bytes - shortcuts.max_bytes() - hot_bytes, max_entry);
        Arc::new(Self {
            store: Box::new(store),
            shared,
            flights: Arc::default(),
            shortcuts,
            hot: HotAnswers::new(event_loops, hot_bytes),
            changes: std::array::from_fn(|_| AtomicU64::new(0)),
            counters: CacheCounters::default(),
        })
    }

    /// A cache in this process's memory, bounded to `max_bytes` (for tests).
    #[cfg(test)]
    pub(crate) fn in_memory(max_bytes: u64) -> Arc<Self> {
        Self::within(max_bytes, 1 << 10, 0, None)
    }

    /// The shortcuts of hot requests.
    pub fn shortcuts(&self) -> &Shortcuts {
        &self.shortcuts
    }

    /// The event loops' copies of hot answers.
    pub fn hot(&self) -> &HotAnswers {
        &self.hot
    }

    /// How many times the store changed under keys of `key`'s bucket (an
    /// entry stored or removed there, or any purge): a hot answer checked
    /// at this count is still the store's. Evictions do not count: what
    /// the bound let go was fresh and right, and its copy stays so (its own
    /// TTL, its own share of the bound); a change in its bucket has it
    /// checked, and let go, later.
    pub fn changes(&self, key: &CacheKey) -> u64 {
        self.changes[bucket(key)].load(Acquire)
    }

    /// Whether the store holds the entry at `entry` under `key` (a hot
    /// answer's source, by address).
    pub fn holds(&self, key: &CacheKey, entry: *const Entry) -> bool {
        self.store.get(key).is_some_and(|held| std::ptr::eq(Arc::as_ptr(&held), entry))
    }

    /// Counts a change of the store under `key` (after making it).
    fn changed(&self, key: &CacheKey) {
        self.changes[bucket(key)].fetch_add(1, Release);
    }

    /// Counts a change under every key (a purge).
    fn changed_all(&self) {
        for bucket in &self.changes {
            bucket.fetch_add(1, Release);
        }
    }

    /// Forgets every shortcut and hot answer (a purge, or a reload's new
    /// routing table: they would lead nowhere and only hold their share).
    pub fn forget_shortcuts(&self) {
        self.shortcuts.clear();
        self.hot.clear();
    }

    /// Answers served from the cache.
    pub fn hits(&self) -> u64 {
        self.counters.hits.load(Relaxed) + self.hot.hits()
    }

    /// Hits found by the bytes the client sent, without planning the
    /// request (part of [`ResponseCache::hits`]).
    pub fn shortcut_hits(&self) -> u64 {
        self.counters.shortcut_hits.load(Relaxed) + self.hot.hits()
    }

    /// Whether a store several instances share stands behind this one.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// A fresh entry from the shared store (after a miss in memory), kept in
    /// memory for the next request here.
    pub async fn lookup_shared(&self, key: &CacheKey, max_age: Option<Duration>) -> Option<Arc<Entry>> {
        let entry = Arc::new(self.shared.as_ref()?.get(*key).await?);
        self.store.insert(*key, Arc::clone(&entry));
        self.changed(key);
        entry.fresh(Instant::now(), max_age).then_some(entry)
    }

    /// A fresh entry under `key` at `now` (an expired one is removed on the way).
    pub fn lookup(&self, key: &CacheKey, max_age: Option<Duration>, now: Instant) -> Option<Arc<Entry>> {
        let entry = self.store.get(key)?;
        if entry.fresh(now, max_age) {
            return Some(entry);
        }
        // Only this entry: a fresh answer another request stored under the
        // key since it was read must stay.
        if !entry.fresh(now, None) && self.store.remove_if_same(key, &entry) {
            self.changed(key);
        }
        None
    }

    /// Drops this process's copy of the entry under `key` (another instance
    /// stored a newer one in the shared store).
    pub fn forget(&self, key: &CacheKey) {
        self.store.remove(key);
        self.changed(key);
    }

    /// The single flights of identical misses.
    pub fn flights(&self) -> &Arc<Flights> {
        &self.flights
    }

    /// Removes every entry (of `model`) held in this process; returns how many.
    pub fn purge(&self, model: Option<&str>) -> u64 {
        let removed = self.store.purge(model);
        self.changed_all();
        self.forget_shortcuts();
        removed
    }

    /// Removes every entry (of `model`) from the shared store, then here,
    /// then (told through the shared store) from the other instances'
    /// memory; returns how many went (the shared store's count when there is
    /// one) and whether the shared part was done.
    pub async fn purge_everywhere(&self, model: Option<&str>) -> (u64, bool) {
        // The shared store first: a miss here meanwhile must not bring back
        // an entry the shared store still held.
        let shared = match &self.shared {
            Some(shared) => Some(shared.purge(model.map(str::to_string)).await),
            None => None,
        };
        let here = self.purge(model);
        match shared {
            Some(Some(removed)) => (removed, true),
            Some(None) => (here, false),
            None => (here, true),
        }
    }

    /// Bytes held, entries, shortcuts and hot answers, as the bound counts them.
    pub fn bytes(&self) -> u64 {
        self.store.bytes() + self.shortcuts.bytes() + self.hot.bytes()
    }

    /// Entries held.
    pub fn entries(&self) -> u64 {
        self.store.entries()
    }

    /// Entries evicted by the byte bound so far.
    pub fn evictions(&self) -> u64 {
        self.store.evictions()
    }

    fn store(&self, key: CacheKey, entry: Arc<Entry>, share: bool) {
        if let Some(shared) = self.shared.as_ref().filter(|_| share) {
            shared.put(key, Arc::clone(&entry));
        }
        self.store.insert(key, entry);
        self.changed(&key);
        self.counters.stores.fetch_add(1, Relaxed);
    }
}

/// Buckets of the store's change count: a store under one key has the hot
/// answers of 1/64 of the others checked, not all of them.
const CHANGE_BUCKETS: usize = 64;

/// `key`'s bucket of the change count (keys are SHA-256 digests: any byte
/// spreads them).
fn bucket(key: &CacheKey) -> usize {
    usize::from(key[0]) % CHANGE_BUCKETS
}

/// Builds a [`CacheKey`] from the parts that make two requests the same, each
/// length-prefixed so no two different lists of parts hash alike.
#[derive(Default)]
pub struct KeyBuilder(Sha256);

impl KeyBuilder {
    /// Adds one part.
    pub fn part(mut self, bytes: &[u8]) -> Self {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    /// The key.
    pub fn finish(self) -> CacheKey {
        self.0.finalize().into()
    }
}

/// What a miss needs to store its answer: where, for how long, and the
/// single flight it leads (if it leads one).
pub struct Fill {
    cache: Arc<ResponseCache>,
    key: CacheKey,
    ttl: Duration,
    max_entry: u64,
    model: Option<Arc<str>>,
    guard: Option<FlightGuard>,
    /// Stored in the shared store too (see [`Fill::local_only`]).
    share: bool,
}

impl Fill {
    /// A fill of `key` into `cache`.
    pub fn new(
        cache: Arc<ResponseCache>,
        key: CacheKey,
        ttl: Duration,
        max_entry: u64,
        model: Option<Arc<str>>,
        guard: Option<FlightGuard>,
    ) -> Self {
        Self { cache, key, ttl, max_entry, model, guard, share: true }
    }

    /// Keeps the answer in this process only: one stored under a client's
    /// shorter TTL, which in the shared store would replace what every
    /// instance serves (an instance cannot see there what it replaces).
    #[must_use]
    pub fn local_only(mut self) -> Self {
        self.share = false;
        self
    }

    /// Starts recording an answer with these headers.
    pub fn record(
        self,
        content_type: Option<HeaderValue>,
        content_encoding: Option<HeaderValue>,
        sse: bool,
    ) -> Recorder {
        Recorder { fill: self, frames: Vec::new(), len: 0, content_type, content_encoding, sse, over: false }
    }
}

/// The frames of an answer on its way to the client, kept to be stored.
/// Dropped without [`Recorder::finish`] (an error, a cut stream, a client
/// gone), it stores nothing and its flight's followers go upstream.
pub struct Recorder {
    fill: Fill,
    /// The frames as they passed (shared with the client's copy, not copied).
    frames: Vec<Bytes>,
    len: u64,
    content_type: Option<HeaderValue>,
    content_encoding: Option<HeaderValue>,
    sse: bool,
    over: bool,
}

impl Recorder {
    /// Keeps one frame (until the answer grows past `max_entry`).
    pub fn saw(&mut self, data: &Bytes) {
        if self.over || data.is_empty() {
            return;
        }
        self.len += data.len() as u64;
        if self.len > self.fill.max_entry || self.frames.len() >= u32::MAX as usize {
            // Too large to keep: stop holding frames now, store nothing later.
            self.over = true;
            self.frames = Vec::new();
            drop(self.fill.guard.take());
            return;
        }
        self.frames.push(data.clone());
    }

    /// The answer ended complete with 200: stores it (one compact copy: the
    /// frames may be slices of larger read buffers) and hands it to the
    /// flight's followers.
    pub fn finish(mut self, tokens: Option<(u64, u64)>) {
        if self.over {
            return;
        }
        // A client's shorter TTL shortens its own answer's life, never what
        // the others are served: over a fresh entry, the answer lives at
        // least as long as that one had left.
        let now = Instant::now();
        let ttl = match self.fill.cache.store.get(&self.fill.key) {
            Some(held) if held.fresh(now, None) => {
                self.fill.ttl.max((held.stored_at + held.ttl).saturating_duration_since(now))
            }
            _ => self.fill.ttl,
        };

        let mut body = BytesMut::with_capacity(self.len as usize);
        let mut frame_ends = Vec::with_capacity(self.frames.len());
        for frame in self.frames.drain(..) {
            body.extend_from_slice(&frame);
            frame_ends.push(body.len() as u32);
        }
        let entry = Arc::new(Entry {
            body: body.freeze(),
            frame_ends: frame_ends.into_boxed_slice(),
            content_type: self.content_type.take(),
            content_encoding: self.content_encoding.take(),
            sse: self.sse,
            model: self.fill.model.take(),
            tokens,
            stored_at: now,
            ttl,
        });
        // An entry of no TTL is never served: not kept (the requests
        // waiting for this answer still get it).
        if !ttl.is_zero() {
            self.fill.cache.store(self.fill.key, Arc::clone(&entry), self.fill.share);
        }
        if let Some(guard) = self.fill.guard.take() {
            guard.complete(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(parts: &[&[u8]], ttl: Duration) -> Arc<Entry> {
        let cache = ResponseCache::in_memory(1 << 20);
        let fill = Fill::new(Arc::clone(&cache), [1; 32], ttl, 1 << 10, None, None);
        let mut recorder = fill.record(None, None, true);
        for part in parts {
            recorder.saw(&Bytes::copy_from_slice(part));
        }
        recorder.finish(Some((1, 2)));
        cache.lookup(&[1; 32], None, Instant::now()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn frames_come_back_as_they_went_and_expire_on_the_clock() {
        let stored = entry(&[b"data: a\n\n", b"data: b\n\n", b"data: [DONE]\n\n"], Duration::from_secs(10));
        let frames: Vec<Bytes> = (0..).map_while(|i| stored.frame(i)).collect();
        assert_eq!(frames, [&b"data: a\n\n"[..], b"data: b\n\n", b"data: [DONE]\n\n"]);
        assert!(stored.fresh(Instant::now(), None));
        assert!(!stored.fresh(Instant::now(), Some(Duration::ZERO)), "a client's max age shortens it");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!stored.fresh(Instant::now(), None));
    }

    /// Stores `pending` right after the next read: another request's answer
    /// arriving between a lookup's read and what the lookup does next.
    struct StoredMeanwhile {
        held: memory::MemoryStore,
        pending: std::sync::Mutex<Option<(CacheKey, Arc<Entry>)>>,
    }

    impl CacheStore for StoredMeanwhile {
        fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
            let found = self.held.get(key);
            if let Some((key, entry)) = self.pending.lock().unwrap().take() {
                self.held.insert(key, entry);
            }
            found
        }
        fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
            self.held.insert(key, entry);
        }
        fn remove(&self, key: &CacheKey) {
            self.held.remove(key);
        }
        fn remove_if_same(&self, key: &CacheKey, entry: &Arc<Entry>) -> bool {
            self.held.remove_if_same(key, entry)
        }
        fn purge(&self, model: Option<&str>) -> u64 {
            self.held.purge(model)
        }
        fn bytes(&self) -> u64 {
            self.held.bytes()
        }
        fn entries(&self) -> u64 {
            self.held.entries()
        }
        fn evictions(&self) -> u64 {
            self.held.evictions()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_entry_goes_but_not_one_stored_in_its_place_meanwhile() {
        let key = [1; 32];
        let old = entry(&[b"old"], Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(2)).await;
        let new = entry(&[b"new"], Duration::from_secs(60));
        let held = memory::MemoryStore::new(1 << 20, 1 << 10);
        held.insert(key, old);
        let racing = StoredMeanwhile { held, pending: std::sync::Mutex::new(Some((key, Arc::clone(&new)))) };
        let mut cache = ResponseCache::in_memory(1 << 20);
        Arc::get_mut(&mut cache).unwrap().store = Box::new(racing);
        let before = cache.changes(&key);
        assert!(cache.lookup(&key, None, Instant::now()).is_none(), "the expired entry is not served");
        let found = cache.lookup(&key, None, Instant::now()).expect("the answer stored meanwhile stays");
        assert!(Arc::ptr_eq(&found, &new));
        assert_eq!(cache.changes(&key), before, "nothing was removed");
        // Expired with nothing in its place, it goes when found.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(cache.lookup(&key, None, Instant::now()).is_none());
        assert_eq!(cache.entries(), 0);
        assert_ne!(cache.changes(&key), before);
    }

    /// A shared store that counts what is put in it.
    #[derive(Default)]
    struct CountingShared(Arc<std::sync::atomic::AtomicU64>);

    impl SharedStore for CountingShared {
        fn get(&self, _key: CacheKey) -> Pending<'_, Option<Entry>> {
            Box::pin(async { None })
        }
        fn put(&self, _key: CacheKey, _entry: Arc<Entry>) {
            self.0.fetch_add(1, Relaxed);
        }
        fn purge(&self, _model: Option<String>) -> Pending<'_, Option<u64>> {
            Box::pin(async { Some(0) })
        }
    }

    #[tokio::test]
    async fn an_answer_kept_local_only_never_reaches_the_shared_store() {
        let puts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let cache = ResponseCache::within(1 << 20, 1 << 10, 0, Some(Box::new(CountingShared(Arc::clone(&puts)))));
        for (key, local) in [([3; 32], true), ([4; 32], false)] {
            let fill = Fill::new(Arc::clone(&cache), key, Duration::from_secs(5), 1 << 10, None, None);
            let fill = if local { fill.local_only() } else { fill };
            let mut recorder = fill.record(None, None, false);
            recorder.saw(&Bytes::from_static(b"answer"));
            recorder.finish(None);
            assert!(cache.lookup(&key, None, Instant::now()).is_some(), "kept here either way");
        }
        assert_eq!(puts.load(Relaxed), 1, "only the shared answer went to the shared store");
    }

    #[test]
    fn an_answer_past_max_entry_is_not_stored() {
        let cache = ResponseCache::in_memory(1 << 20);
        let fill = Fill::new(Arc::clone(&cache), [2; 32], Duration::from_secs(5), 8, None, None);
        let mut recorder = fill.record(None, None, false);
        recorder.saw(&Bytes::from_static(b"12345"));
        recorder.saw(&Bytes::from_static(b"6789"));
        recorder.finish(None);
        assert!(cache.lookup(&[2; 32], None, Instant::now()).is_none());
        assert_eq!(cache.counters.stores.load(Relaxed), 0);
    }

    #[test]
    fn key_parts_are_length_prefixed() {
        let a = KeyBuilder::default().part(b"ab").part(b"c").finish();
        let b = KeyBuilder::default().part(b"a").part(b"bc").finish();
        assert_ne!(a, b);
        assert_eq!(a, KeyBuilder::default().part(b"ab").part(b"c").finish());
    }
}
