//! Steering before the 429: OpenAI-style providers say on every answer how
//! many requests and tokens a key has left (`x-ratelimit-remaining-*`) and
//! when that resets (`x-ratelimit-reset-*`, as `1s`, `6m0s`, `250ms`). A key
//! at zero rests until its reset (at most [`MAX_REST`]), so the next request
//! goes to a key with headroom instead of drawing a 429.

use std::time::Duration;

use http::{HeaderMap, HeaderName};

/// The longest a key rests on the strength of these headers alone: they
/// may pass through a proxy or be wrong, and a 429 still cools a key for as
/// long as it says.
pub const MAX_REST: Duration = Duration::from_secs(60);

/// Static names: a lookup by `&str` would parse the name on every answer.
const PAIRS: [(HeaderName, HeaderName); 2] = [
    (HeaderName::from_static("x-ratelimit-remaining-requests"), HeaderName::from_static("x-ratelimit-reset-requests")),
    (HeaderName::from_static("x-ratelimit-remaining-tokens"), HeaderName::from_static("x-ratelimit-reset-tokens")),
];

/// How long the key that sent `headers` has nothing left, if it says so.
pub fn exhausted(headers: &HeaderMap) -> Option<Duration> {
    PAIRS
        .iter()
        .filter(|(remaining, _)| {
            headers.get(remaining).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim().parse::<f64>() == Ok(0.0))
        })
        .map(|(_, reset)| {
            // At zero with no reset given: a second, then ask again.
            headers.get(reset).and_then(|v| v.to_str().ok()).and_then(parse_duration).unwrap_or(Duration::from_secs(1))
        })
        .max()
}

/// Parses OpenAI's reset format: numbers with `h`, `m`, `s` or `ms`, e.g.
/// `6m0s`, `1.5s`, `250ms`, `1h2m`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else {
            match rest.chars().next()? {
                'h' => (3600.0, 1),
                'm' => (60.0, 1),
                's' => (1.0, 1),
                _ => return None,
            }
        };
        total += value * unit;
        rest = &rest[len..];
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn zero_left_means_wait_for_the_reset() {
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-remaining-requests", HeaderValue::from_static("3"));
        headers.insert("x-ratelimit-reset-requests", HeaderValue::from_static("2s"));
        assert_eq!(exhausted(&headers), None);
        headers.insert("x-ratelimit-remaining-requests", HeaderValue::from_static("0"));
        assert_eq!(exhausted(&headers), Some(Duration::from_secs(2)));
        headers.insert("x-ratelimit-remaining-tokens", HeaderValue::from_static("0"));
        headers.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("6m0s"));
        assert_eq!(exhausted(&headers), Some(Duration::from_secs(360)), "the later reset");
    }
}
