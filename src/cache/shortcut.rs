//! Shortcuts of hot requests: from the exact bytes a client sent to the
//! entry their plan leads to, so that a repeated request is answered without
//! sniffing, routing and rewriting its body again, or hashing it with SHA-256.
//!
//! A shortcut is remembered when a request's planned key was found in the
//! cache (a hit), never on a miss: a fill of distinct requests makes none.
//! It is found by a fast hash of what was sent and taken only when every
//! part of it compares equal (a hash collision finds nothing). It holds only
//! under the routing table it was planned with ([`Routes::generation`]);
//! its key is only a way to the entry, so an entry evicted, expired or
//! purged leaves the shortcut leading nowhere and the request goes the
//! planned way. The index is bounded in bytes (what was sent included) and
//! takes them out of `[cache] max_bytes`.
//!
//! [`Routes::generation`]: crate::routes::Routes::generation

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use bytes::Bytes;
use quick_cache::Weighter;
use quick_cache::sync::Cache;

use super::{CacheKey, KeyHasher};
use crate::access::table::Allowed;
use crate::telemetry::metrics::ModelMetrics;

/// What a client sent, as far as its plan depends on it (besides the
/// routing table): the cache scope it is in, whether its key has a token
/// budget (a budget's streamed chats ask for their usage), the path and
/// query, the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sent<'a> {
    /// The cache scope's name.
    pub scope: &'a str,
    /// Whether the key has a token budget.
    pub budget: bool,
    /// The path.
    pub path: &'a str,
    /// The query.
    pub query: &'a str,
    /// The body.
    pub body: &'a [u8],
}

/// [`Sent`], kept by a shortcut (or a hot answer) to compare against.
#[derive(Debug)]
pub(super) struct Kept {
    scope: Box<str>,
    budget: bool,
    path: Box<str>,
    query: Box<str>,
    body: Bytes,
}

impl Kept {
    pub(super) fn of(sent: Sent<'_>) -> Self {
        Self {
            scope: sent.scope.into(),
            budget: sent.budget,
            path: sent.path.into(),
            query: sent.query.into(),
            // A copy: the request's bytes are a slice of its connection's read buffer.
            body: Bytes::copy_from_slice(sent.body),
        }
    }

    pub(super) fn sent(&self) -> Sent<'_> {
        Sent { scope: &self.scope, budget: self.budget, path: &self.path, query: &self.query, body: &self.body }
    }
}

impl Sent<'_> {
    /// Its bytes, as a shortcut keeps them.
    pub(super) fn len(&self) -> u64 {
        (self.scope.len() + self.path.len() + self.query.len() + self.body.len()) as u64
    }
}

/// Where a request's plan led, and what the request needs to be answered
/// from the cache without planning it again.
#[derive(Debug, Clone)]
pub struct Shortcut {
    /// The routing table it was planned under.
    pub generation: u64,
    /// The planned key: the entry it leads to.
    pub key: CacheKey,
    /// The route's canonical name: a key limited to some models is checked
    /// again on every use.
    pub route: Box<str>,
    /// The name the client asked by.
    pub requested: Box<str>,
    /// The routed model's counters.
    pub model: Option<Arc<ModelMetrics>>,
    /// `"stream": true` in the request.
    pub stream: bool,
    /// The `max_tokens` cap the request was lowered to, if it was.
    pub capped: Option<u64>,
}

/// A shortcut and what was sent to make it.
#[derive(Debug)]
struct Remembered {
    sent: Kept,
    shortcut: Arc<Shortcut>,
}

impl Shortcut {
    /// Whether a key allowed `allowed` may take it.
    pub fn permits(&self, allowed: Option<&Allowed>) -> bool {
        allowed.is_none_or(|allowed| allowed.permits(&self.route, &self.requested))
    }
}

impl Remembered {
    fn weight(&self) -> u64 {
        weight(&self.shortcut, &self.sent.sent())
    }
}

/// What a shortcut of `sent` weighs in the index's bound.
fn weight(shortcut: &Shortcut, sent: &Sent<'_>) -> u64 {
    SHORTCUT_OVERHEAD + (shortcut.route.len() + shortcut.requested.len()) as u64 + sent.len()
}

/// What a shortcut costs beyond its names and what was sent: the index's
/// slot, the shortcut and what was sent in their `Arc`s, eight allocations
/// as the allocator rounds them.
const SHORTCUT_OVERHEAD: u64 = 448;

/// The index's shards (each with its own lock and a share of the bound):
/// few, so each can hold a shortcut of a large request.
const SHARDS: usize = 4;

/// The index's share of `[cache] max_bytes`: 1/64 of it, at most 1 MiB
/// (about 1900 shortcuts of 100-byte requests), at least 16 KiB (at most
/// half of a smaller cache).
fn budget(max_bytes: u64) -> u64 {
    (max_bytes / 64).clamp(16 << 10, 1 << 20).min(max_bytes / 2)
}

#[derive(Debug, Clone, Copy)]
struct ByBytes;

impl Weighter<u64, Arc<Remembered>> for ByBytes {
    fn weight(&self, _hash: &u64, remembered: &Arc<Remembered>) -> u64 {
        remembered.weight()
    }
}

/// The shortcuts of hot requests, bounded in bytes.
pub struct Shortcuts {
    index: Cache<u64, Arc<Remembered>, ByBytes, KeyHasher>,
    /// Seeded per process: a client cannot aim two requests at one slot
    /// (which would cost it nothing but a shortcut, and others theirs).
    hasher: foldhash::fast::RandomState,
    /// Whether any was remembered since the last clear: a request looks
    /// only then (the index's own count takes every shard's lock).
    any: AtomicBool,
    max_bytes: u64,
}

impl Shortcuts {
    /// An index that takes its share of a cache of `max_bytes`.
    pub fn within(max_bytes: u64) -> Self {
        let max_bytes = budget(max_bytes);
        let items = usize::try_from(max_bytes / SHORTCUT_OVERHEAD).unwrap_or(1 << 12).max(16);
        let options = super::index_options(SHARDS, items, max_bytes);
        let index = Cache::with_options(options, ByBytes, KeyHasher::default(), Default::default());
        Self { index, hasher: foldhash::fast::RandomState::default(), any: AtomicBool::new(false), max_bytes }
    }

    /// Bytes it may hold, as its bound counts them.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The fast hash `sent` is found by.
    pub fn hash(&self, sent: &Sent<'_>) -> u64 {
        self.hasher.hash_one(sent)
    }

    /// The shortcut remembered for `sent` (whose [`Shortcuts::hash`] is
    /// `hash`) under routing table `generation`.
    pub fn get(&self, hash: u64, sent: &Sent<'_>, generation: u64) -> Option<Arc<Shortcut>> {
        let remembered = self.index.get(&hash)?;
        let holds = remembered.shortcut.generation == generation && remembered.sent.sent() == *sent;
        holds.then(|| Arc::clone(&remembered.shortcut))
    }

    /// Remembers where `sent` leads (replacing whatever had its hash).
    /// A shortcut heavier than half a shard's share is not kept (the shard
    /// would refuse it; this way, before the copy of what was sent).
    pub fn remember(&self, hash: u64, sent: Sent<'_>, shortcut: Shortcut) {
        if weight(&shortcut, &sent) > self.max_bytes / (2 * SHARDS as u64) {
            return;
        }
        let remembered = Remembered { sent: Kept::of(sent), shortcut: Arc::new(shortcut) };
        self.index.insert(hash, Arc::new(remembered));
        self.any.store(true, Relaxed);
    }

    /// Whether there may be any to find (none was remembered since the last clear otherwise).
    pub fn any(&self) -> bool {
        self.any.load(Relaxed)
    }

    /// Shortcuts held (every shard's lock taken: for stats, not requests).
    pub fn count(&self) -> u64 {
        self.index.len() as u64
    }

    /// Bytes held, as the bound counts them.
    pub fn bytes(&self) -> u64 {
        self.index.weight()
    }

    /// Forgets every shortcut (a purge: they would lead nowhere).
    pub fn clear(&self) {
        // Cleared first: a shortcut remembered meanwhile sets it again.
        self.any.store(false, Relaxed);
        self.index.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shortcut(generation: u64, name: &str) -> Shortcut {
        Shortcut {
            generation,
            key: [7; 32],
            route: name.into(),
            requested: name.into(),
            model: None,
            stream: false,
            capped: None,
        }
    }

    fn sent(body: &[u8]) -> Sent<'_> {
        Sent { scope: "*", budget: false, path: "/v1/chat/completions", query: "", body }
    }

    #[test]
    fn a_shortcut_holds_for_what_was_sent_under_its_own_routing_table_only() {
        let shortcuts = Shortcuts::within(64 << 20);
        let body = sent(b"{}");
        let hash = shortcuts.hash(&body);
        shortcuts.remember(hash, body, shortcut(3, "m"));
        assert_eq!(shortcuts.get(hash, &sent(b"{}"), 3).map(|s| s.key), Some([7; 32]));
        assert!(shortcuts.get(hash, &body, 4).is_none(), "a reload's table plans afresh");
        // What was sent must be equal, part by part, not just hash alike.
        for other in [
            Sent { body: b"{ }", ..body },
            Sent { scope: "key:1", ..body },
            Sent { budget: true, ..body },
            Sent { path: "/v1/completions", ..body },
            Sent { query: "a=1", ..body },
        ] {
            assert!(shortcuts.get(hash, &other, 3).is_none(), "{other:?}");
        }
        assert!(shortcuts.get(hash ^ 1, &body, 3).is_none());
    }

    #[test]
    fn the_index_stays_within_its_share_of_the_cache() {
        let max = 4 << 20;
        let shortcuts = Shortcuts::within(max);
        assert_eq!(shortcuts.max_bytes(), 64 << 10, "1/64 of the cache");
        assert_eq!(Shortcuts::within(1 << 40).max_bytes(), 1 << 20, "at most 1 MiB");
        for i in 0..10_000u32 {
            let body = format!("{{\"n\":{i}}}");
            let sent = sent(body.as_bytes());
            shortcuts.remember(shortcuts.hash(&sent), sent, shortcut(1, "a-model-name"));
            assert!(shortcuts.bytes() <= shortcuts.max_bytes());
        }
        assert!(shortcuts.count() > 100, "it holds many: {}", shortcuts.count());
        // One past half a shard's share is not kept (nor copied).
        let big = vec![b' '; 8 << 10];
        let sent = sent(&big);
        shortcuts.remember(shortcuts.hash(&sent), sent, shortcut(1, "m"));
        assert!(shortcuts.get(shortcuts.hash(&sent), &sent, 1).is_none());
        let fits = &big[..4 << 10];
        let sent = Sent { body: fits, ..sent };
        shortcuts.remember(shortcuts.hash(&sent), sent, shortcut(1, "m"));
        assert!(shortcuts.get(shortcuts.hash(&sent), &sent, 1).is_some(), "a 4 KiB request is kept");
        let only: Allowed = Allowed::Only(["m".into()].into_iter().collect());
        assert!(shortcut(1, "m").permits(Some(&only)) && shortcut(1, "m").permits(None));
        assert!(!shortcut(1, "n").permits(Some(&only)));
    }
}
