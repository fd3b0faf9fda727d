//! Shortcuts of hot requests: from the exact bytes a client sent to the
//! entry their plan leads to, so that a repeated request is answered without
//! sniffing, routing and rewriting its body again.
//!
//! A shortcut is remembered when a request's planned key was found in the
//! cache (a hit), never on a miss: a fill of distinct requests makes none.
//! It holds only under the routing table it was planned with
//! ([`Routes::generation`]); its key is only a way to the entry, so an
//! entry evicted, expired or purged leaves the shortcut leading nowhere and
//! the request goes the planned way. The index is bounded in bytes and takes
//! them out of `[cache] max_bytes`.
//!
//! [`Routes::generation`]: crate::routes::Routes::generation

use std::sync::Arc;

use quick_cache::Weighter;
use quick_cache::sync::Cache;

use super::CacheKey;
use crate::access::table::{Allowed, PrefixHasher};
use crate::telemetry::metrics::ModelMetrics;

/// The SHA-256 of what a client sent, with what decides its plan.
pub type RawKey = [u8; 32];

/// Where a request's plan led, and what the request needs to be answered
/// from the cache without planning it again.
#[derive(Debug)]
pub struct Shortcut {
    /// The routing table it was planned under.
    pub generation: u64,
    /// The planned key: the entry it leads to.
    pub key: CacheKey,
    /// The route's canonical name and the name the client asked by: a key
    /// limited to some models is checked again on every use.
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

impl Shortcut {
    /// Whether a key allowed `allowed` may take it.
    pub fn permits(&self, allowed: Option<&Allowed>) -> bool {
        allowed.is_none_or(|allowed| allowed.permits(&self.route, &self.requested))
    }

    fn weight(&self) -> u64 {
        SHORTCUT_OVERHEAD + self.route.len() as u64 + self.requested.len() as u64
    }
}

/// What a shortcut costs beyond its two names: the index's slot and raw
/// key, the shortcut in its `Arc`, the two names' allocations as the
/// allocator rounds them.
const SHORTCUT_OVERHEAD: u64 = 320;

/// The index's share of `[cache] max_bytes`: 1/64 of it, at most 1 MiB
/// (about 3000 shortcuts), at least 16 KiB.
fn budget(max_bytes: u64) -> u64 {
    (max_bytes / 64).clamp(16 << 10, 1 << 20).min(max_bytes / 2)
}

#[derive(Debug, Clone, Copy)]
struct ByBytes;

impl Weighter<RawKey, Arc<Shortcut>> for ByBytes {
    fn weight(&self, _key: &RawKey, shortcut: &Arc<Shortcut>) -> u64 {
        shortcut.weight()
    }
}

type Hasher = std::hash::BuildHasherDefault<PrefixHasher>;

/// The shortcuts of hot requests, bounded in bytes.
pub struct Shortcuts {
    index: Cache<RawKey, Arc<Shortcut>, ByBytes, Hasher>,
    max_bytes: u64,
}

impl Shortcuts {
    /// An index that takes its share of a cache of `max_bytes`.
    pub fn within(max_bytes: u64) -> Self {
        let max_bytes = budget(max_bytes);
        let items = usize::try_from(max_bytes / SHORTCUT_OVERHEAD).unwrap_or(1 << 12).max(16);
        Self { index: Cache::with(items, max_bytes, ByBytes, Hasher::default(), Default::default()), max_bytes }
    }

    /// Bytes it may hold, as its bound counts them.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The shortcut remembered for `raw` under routing table `generation`.
    pub fn get(&self, raw: &RawKey, generation: u64) -> Option<Arc<Shortcut>> {
        self.index.get(raw).filter(|shortcut| shortcut.generation == generation)
    }

    /// Remembers a shortcut (replacing one of an older table).
    pub fn remember(&self, raw: RawKey, shortcut: Shortcut) {
        self.index.insert(raw, Arc::new(shortcut));
    }

    /// Shortcuts held.
    pub fn len(&self) -> u64 {
        self.index.len() as u64
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes held, as the bound counts them.
    pub fn bytes(&self) -> u64 {
        self.index.weight()
    }

    /// Forgets every shortcut (a purge: they would lead nowhere).
    pub fn clear(&self) {
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

    #[test]
    fn a_shortcut_holds_under_its_own_routing_table_only() {
        let shortcuts = Shortcuts::within(64 << 20);
        shortcuts.remember([1; 32], shortcut(3, "m"));
        assert_eq!(shortcuts.get(&[1; 32], 3).map(|s| s.key), Some([7; 32]));
        assert!(shortcuts.get(&[1; 32], 4).is_none(), "a reload's table plans afresh");
        assert!(shortcuts.get(&[2; 32], 3).is_none());
    }

    #[test]
    fn the_index_stays_within_its_share_of_the_cache() {
        let max = 4 << 20;
        let shortcuts = Shortcuts::within(max);
        assert_eq!(shortcuts.max_bytes(), 64 << 10, "1/64 of the cache");
        assert_eq!(Shortcuts::within(1 << 40).max_bytes(), 1 << 20, "at most 1 MiB");
        for i in 0..10_000u32 {
            let mut raw = [0u8; 32];
            raw[..4].copy_from_slice(&i.to_le_bytes());
            raw[4..8].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
            shortcuts.remember(raw, shortcut(1, "a-model-name"));
            assert!(shortcuts.bytes() <= shortcuts.max_bytes());
        }
        assert!(shortcuts.len() > 100, "it holds many: {}", shortcuts.len());
        let allowed = Allowed::All;
        assert!(shortcut(1, "m").permits(Some(&allowed)) && shortcut(1, "m").permits(None));
    }
}
