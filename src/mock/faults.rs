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
}

/// Errors at a fixed rate, spread evenly (deterministic: every `1/rate`-th request).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateFault {
    /// Status to answer with.
    pub status: u16,
    /// Fraction of requests, 0.0 to 1.0.
    pub rate: f64,
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
}

/// The shape of one answer, after the request's own `x-mock-*` headers.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
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
    pub fn plan(&self, headers: &HeaderMap) -> Plan {
        fn num<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
            headers.get(name)?.to_str().ok()?.trim().parse().ok()
        }
        Plan {
            latency_ms: num(headers, "x-mock-latency-ms").unwrap_or(self.latency_ms),
            status: num(headers, "x-mock-status"),
            chunks: num(headers, "x-mock-chunks").or(self.chunks).unwrap_or(DEFAULT_CHUNKS),
            gap_ms: num(headers, "x-mock-gap-ms").unwrap_or(self.gap_ms),
            drop_after: num(headers, "x-mock-drop-after").or(self.drop_after),
            echo: headers.contains_key("x-mock-echo"),
        }
    }

    /// Whether request number `n` (0-based) falls in the error rate.
    pub fn rate_hits(rate: f64, n: u64) -> bool {
        let rate = rate.clamp(0.0, 1.0);
        ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_exact_over_a_window() {
        let hits = (0..100).filter(|n| Faults::rate_hits(0.3, *n)).count();
        assert_eq!(hits, 30);
        assert_eq!((0..10).filter(|n| Faults::rate_hits(0.0, *n)).count(), 0);
        assert_eq!((0..10).filter(|n| Faults::rate_hits(1.0, *n)).count(), 10);
    }

    #[test]
    fn headers_override_standing_faults() {
        let faults = Faults { latency_ms: 5, chunks: Some(3), ..Faults::default() };
        let mut headers = HeaderMap::new();
        headers.insert("x-mock-chunks", "7".parse().unwrap());
        headers.insert("x-mock-echo", "1".parse().unwrap());
        let plan = faults.plan(&headers);
        assert_eq!((plan.latency_ms, plan.chunks, plan.echo), (5, 7, true));
    }
}
