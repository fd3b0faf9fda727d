//! Fault injection for the mock: set for all requests with `POST /_control`,
//! or per request with `x-mock-*` headers.

use std::collections::HashMap;

use http::HeaderMap;
use serde::{Deserialize, Serialize};

/// A fixed answer for every request made with one key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFault {
    /// Status to answer with (e.g. 429, 401, 500).
    pub status: u16,
    /// `Retry-After` header value, if any.
    #[serde(default)]
    pub retry_after: Option<String>,
    /// The OpenAI error `code` of the answer (e.g. `invalid_api_key`, which
    /// tells the gateway the key itself is bad); `mock_fault` when unset.
    #[serde(default)]
    pub code: Option<String>,
}

/// Errors at a rate, at random but reproducibly: whether request number `n`
/// fails is a pure function of `seed` and `n`, so runs repeat exactly, while
/// failures still bunch up as real ones do (two can follow each other).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateFault {
    /// Status to answer with.
    pub status: u16,
    /// Fraction of requests, 0.0 to 1.0.
    pub rate: f64,
    /// Seed of the pattern.
    #[serde(default)]
    pub seed: u64,
}

/// Faults and shapes applied to every request (`POST /_control` replaces them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Delay before answering, in milliseconds.
    pub latency_ms: u64,
    /// Per-key fixed answers.
    pub keys: HashMap<String, KeyFault>,
    /// Errors at a rate.
    pub error_rate: Option<RateFault>,
    /// SSE chunks per stream (default 5).
    pub chunks: Option<u32>,
    /// Gap between SSE chunks, in milliseconds.
    pub gap_ms: u64,
    /// Break streams (abort the connection) after this many chunks.
    pub drop_after: Option<u32>,
    /// Requests each key may make, as a provider's per-key quota: every
    /// answer says what is left (`x-ratelimit-remaining-requests`, with
    /// `x-ratelimit-reset-requests`), and a key past its quota gets 429.
    /// Counted from the start (or the last `POST /_reset`).
    pub quota: HashMap<String, u64>,
    /// `x-ratelimit-reset-requests` of quota answers (default `60s`).
    pub quota_reset: Option<String>,
    /// A request body larger than this (bytes, standing in for tokens) is
    /// refused as OpenAI refuses a request over the account's tokens-per-minute
    /// limit by itself: 429, `type: "tokens"`, "Request too large ...", on any key.
    pub max_request_bytes: Option<u64>,
}

/// The shape of one answer, after the request's own `x-mock-*` headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// Delay before answering.
    pub latency_ms: u64,
    /// Forced status (from `x-mock-status`).
    pub status: Option<u16>,
    /// SSE chunks.
    pub chunks: u32,
    /// Gap between chunks.
    pub gap_ms: u64,
    /// Break after this many chunks.
    pub drop_after: Option<u32>,
    /// Answer with the request itself as JSON (`x-mock-echo`).
    pub echo: bool,
}

/// Default number of SSE chunks.
pub const DEFAULT_CHUNKS: u32 = 5;

impl Faults {
    /// Applies the request's headers on top of the standing faults.
    pub fn shape(&self, headers: &HeaderMap) -> Shape {
        fn num<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
            headers.get(name)?.to_str().ok()?.trim().parse().ok()
        }
        Shape {
            latency_ms: num(headers, "x-mock-latency-ms").unwrap_or(self.latency_ms),
            status: num(headers, "x-mock-status"),
            chunks: num(headers, "x-mock-chunks").or(self.chunks).unwrap_or(DEFAULT_CHUNKS),
            gap_ms: num(headers, "x-mock-gap-ms").unwrap_or(self.gap_ms),
            drop_after: num(headers, "x-mock-drop-after").or(self.drop_after),
            echo: headers.contains_key("x-mock-echo"),
        }
    }

    /// Whether request number `n` (0-based) falls in the error rate.
    pub fn rate_hits(fault: &RateFault, n: u64) -> bool {
        // splitmix64 of (seed, n): a uniform draw in [0, 1).
        let mut z = fault.seed.wrapping_add(n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 / (1u64 << 53) as f64) < fault.rate.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_random_reproducible_and_bunches() {
        let fault = |rate, seed| RateFault { status: 500, rate, seed };
        let hits: Vec<bool> = (0..10_000).map(|n| Faults::rate_hits(&fault(0.3, 7), n)).collect();
        let share = hits.iter().filter(|h| **h).count() as f64 / 10_000.0;
        assert!((0.28..0.32).contains(&share), "{share}");
        assert!(hits.windows(2).any(|w| w[0] && w[1]), "two failures in a row happen");
        let again: Vec<bool> = (0..10_000).map(|n| Faults::rate_hits(&fault(0.3, 7), n)).collect();
        assert_eq!(hits, again, "the same seed gives the same pattern");
        let other: Vec<bool> = (0..10_000).map(|n| Faults::rate_hits(&fault(0.3, 8), n)).collect();
        assert_ne!(hits, other);
        assert!((0..100).all(|n| !Faults::rate_hits(&fault(0.0, 1), n)));
        assert!((0..100).all(|n| Faults::rate_hits(&fault(1.0, 1), n)));
    }

    #[test]
    fn headers_override_standing_faults() {
        let faults = Faults { latency_ms: 5, chunks: Some(3), ..Faults::default() };
        let mut headers = HeaderMap::new();
        headers.insert("x-mock-chunks", "7".parse().unwrap());
        headers.insert("x-mock-echo", "1".parse().unwrap());
        let shape = faults.shape(&headers);
        assert_eq!((shape.latency_ms, shape.chunks, shape.echo), (5, 7, true));
    }
}
