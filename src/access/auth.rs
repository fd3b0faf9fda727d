//! Client keys as requests present them: read from `Authorization: Bearer`,
//! `X-API-Key`, `api-key` or `?api_key=`; and new keys as the store makes
//! them (`sk-sluice-` and 32 base62 characters from the OS's CSPRNG).

use http::HeaderMap;
use http::header::AUTHORIZATION;

use http::HeaderName;

/// Client credential header besides `Authorization` (Anthropic-style).
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Azure-style client credential header.
pub const API_KEY: HeaderName = HeaderName::from_static("api-key");
/// What every key sluice makes starts with.
pub const KEY_PREFIX: &str = "sk-sluice-";
/// Random characters after the prefix.
const KEY_RANDOM_CHARS: usize = 32;
/// Characters of a key kept to name it by (`sk-sluice-Ab12`).
pub const SHOWN_CHARS: usize = KEY_PREFIX.len() + 4;

/// The client key from the first place that has one.
pub fn presented_key<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a [u8]> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let bytes = value.as_bytes();
        if bytes.len() > 7 && bytes[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(bytes[7..].trim_ascii());
        }
    }
    for name in [X_API_KEY, API_KEY] {
        if let Some(value) = headers.get(name) {
            return Some(value.as_bytes().trim_ascii());
        }
    }
    query?.split('&').find_map(|pair| pair.strip_prefix("api_key=")).map(str::as_bytes)
}

/// Equality whose running time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A new client key: `sk-sluice-` and 32 base62 characters (190 bits) from
/// the OS's CSPRNG, each drawn without modulo bias.
pub fn generate_key() -> Result<String, String> {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut key = String::with_capacity(KEY_PREFIX.len() + KEY_RANDOM_CHARS);
    key.push_str(KEY_PREFIX);
    let mut pool = [0u8; 64];
    while key.len() < KEY_PREFIX.len() + KEY_RANDOM_CHARS {
        getrandom::fill(&mut pool).map_err(|e| format!("the OS random source failed: {e}"))?;
        // 248 = 4 * 62: bytes past it would favour the first characters.
        for byte in pool.iter().filter(|b| **b < 248) {
            if key.len() == KEY_PREFIX.len() + KEY_RANDOM_CHARS {
                break;
            }
            key.push(ALPHABET[usize::from(byte % 62)] as char);
        }
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn every_place_a_key_can_be() {
        assert_eq!(presented_key(&with("authorization", "Bearer sk-b"), None), Some(&b"sk-b"[..]));
        assert_eq!(presented_key(&with("authorization", "bearer  sk-a "), None), Some(&b"sk-a"[..]));
        assert_eq!(presented_key(&with("x-api-key", "sk-a"), None), Some(&b"sk-a"[..]));
        assert_eq!(presented_key(&with("api-key", "sk-b"), None), Some(&b"sk-b"[..]));
        assert_eq!(presented_key(&HeaderMap::new(), Some("x=1&api_key=sk-b")), Some(&b"sk-b"[..]));
        assert_eq!(presented_key(&with("authorization", "Basic abc"), None), None);
        assert_eq!(presented_key(&HeaderMap::new(), None), None);
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn generated_keys_have_the_shape_and_differ() {
        let (a, b) = (generate_key().unwrap(), generate_key().unwrap());
        assert_ne!(a, b);
        for key in [a, b] {
            assert!(key.starts_with(KEY_PREFIX) && key.len() == KEY_PREFIX.len() + 32, "{key}");
            assert!(key[KEY_PREFIX.len()..].bytes().all(|c| c.is_ascii_alphanumeric()));
        }
    }
}
