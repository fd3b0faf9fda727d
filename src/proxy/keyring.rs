//! The upstream key ring: keys of one upstream, chosen lock-free.
//!
//! The ring itself is immutable and lives in the snapshot; the per-key counters
//! are atomics, so a pick is one `fetch_add` and no lock is ever taken.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use http::HeaderValue;

use crate::config::keys::{Secret, fingerprint};

/// One upstream key with its ready-made auth header and its counters.
#[derive(Debug)]
pub struct UpstreamKey {
    /// The key; only the auth header is derived from it.
    secret: Secret<String>,
    /// `Bearer <key>`, marked sensitive so hyper's h2 HPACK never indexes it.
    auth_header: HeaderValue,
    /// Safe name for logs and `/health`.
    pub fingerprint: String,
    /// Requests sent with this key.
    pub requests: AtomicU64,
    /// Requests on this key whose response has not ended yet.
    pub in_flight: AtomicU64,
}

impl UpstreamKey {
    /// Builds a key; `None` if it cannot be a header value (the config rejects those).
    pub fn new(secret: Secret<String>) -> Option<Self> {
        let mut auth_header = HeaderValue::from_str(&format!("Bearer {}", secret.expose())).ok()?;
        auth_header.set_sensitive(true);
        Some(Self {
            fingerprint: fingerprint(secret.expose()),
            secret,
            auth_header,
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        })
    }

    /// The `Authorization` value for this key (a cheap clone of shared bytes).
    pub fn auth_header(&self) -> HeaderValue {
        self.auth_header.clone()
    }

    /// Whether this key holds the same secret as `other` (used to carry state over reloads).
    pub fn same_secret(&self, other: &Secret<String>) -> bool {
        self.secret == *other
    }
}

/// A held key: counts as in flight until dropped (when the response body ends).
#[derive(Debug)]
pub struct KeyLease {
    key: Arc<UpstreamKey>,
}

impl KeyLease {
    /// The leased key.
    pub fn key(&self) -> &UpstreamKey {
        &self.key
    }
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        self.key.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The keys of one upstream and the round-robin cursor.
#[derive(Debug)]
pub struct KeyRing {
    keys: Box<[Arc<UpstreamKey>]>,
    cursor: AtomicUsize,
}

impl KeyRing {
    /// A ring over these keys; must not be empty (the config guarantees it).
    pub fn new(keys: Vec<Arc<UpstreamKey>>) -> Self {
        Self {
            keys: keys.into_boxed_slice(),
            cursor: AtomicUsize::new(0),
        }
    }

    /// All keys, in config order.
    pub fn keys(&self) -> &[Arc<UpstreamKey>] {
        &self.keys
    }

    /// Picks the next key round-robin and leases it; `None` only for an empty ring.
    pub fn pick(&self) -> Option<KeyLease> {
        if self.keys.is_empty() {
            return None;
        }
        let i = self.cursor.fetch_add(1, Ordering::Relaxed) % self.keys.len();
        let key = Arc::clone(&self.keys[i]);
        key.requests.fetch_add(1, Ordering::Relaxed);
        key.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(KeyLease { key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize) -> KeyRing {
        KeyRing::new(
            (0..n)
                .map(|i| Arc::new(UpstreamKey::new(Secret::new(format!("sk-{i}"))).unwrap()))
                .collect(),
        )
    }

    #[test]
    fn round_robin_visits_every_key_evenly() {
        let ring = ring(3);
        let picks: Vec<String> = (0..6)
            .map(|_| ring.pick().unwrap().key().fingerprint.clone())
            .collect();
        assert_eq!(picks[0..3], picks[3..6]);
        for key in ring.keys() {
            assert_eq!(key.requests.load(Ordering::Relaxed), 2);
            assert_eq!(
                key.in_flight.load(Ordering::Relaxed),
                0,
                "lease drop ends in-flight"
            );
        }
    }

    #[test]
    fn lease_counts_in_flight() {
        let ring = ring(1);
        let lease = ring.pick().unwrap();
        assert_eq!(ring.keys()[0].in_flight.load(Ordering::Relaxed), 1);
        drop(lease);
        assert_eq!(ring.keys()[0].in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn auth_header_is_sensitive_and_debug_hides_key() {
        let key = UpstreamKey::new(Secret::new("sk-secret-value".into())).unwrap();
        assert!(key.auth_header().is_sensitive());
        assert!(!format!("{key:?}").contains("sk-secret-value"));
    }

    #[test]
    fn empty_ring_picks_nothing() {
        assert!(ring(0).pick().is_none());
    }
}
