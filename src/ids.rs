//! Cheap random ids: a per-thread xorshift generator seeded from the OS-keyed
//! `RandomState`, so request ids cost no syscall and no lock.
//! Not for secrets: ids only need to be unique, not unguessable.

use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use http::{HeaderMap, HeaderName, HeaderValue};

/// Header carrying the request id, taken from the client or generated.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id for a request: the client's if it is a sane token (visible
/// ASCII, at most 128 bytes), a fresh UUID otherwise.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(REQUEST_ID) {
        let bytes = id.as_bytes();
        if !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic()) {
            // A copy, not a clone: the clone would share (and keep alive for the
            // whole response) the read buffer the request head was parsed in.
            return HeaderValue::from_bytes(bytes).unwrap_or_else(|_| id.clone());
        }
    }
    HeaderValue::from_bytes(&uuid_v4_bytes()).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// A copy of `value` in an allocation of its own (see the callers for why).
pub fn copy(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
    copy.set_sensitive(value.is_sensitive());
    copy
}

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(std::process::id().into());
    hasher.finish() | 1
}

/// A random 64-bit number from this thread's generator (xorshift64*).
pub fn next_u64() -> u64 {
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A random (version 4, variant 1) UUID in its 36-character text form.
pub fn uuid_v4() -> String {
    let bytes = uuid_v4_bytes();
    // Only ASCII hex digits and dashes were written.
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A random (version 4, variant 1) UUID as its 36 ASCII bytes, formatted by
/// hand: `format!` with five hex arguments cost about as much as the rest of
/// the request id handling together.
pub fn uuid_v4_bytes() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hi = (next_u64() & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let lo = (next_u64() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (word, nibbles) in [(hi, 0..16), (lo, 0..16)] {
        for i in nibbles {
            if matches!(at, 8 | 13 | 18 | 23) {
                at += 1;
            }
            out[at] = HEX[((word >> (60 - 4 * i)) & 0xf) as usize];
            at += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_kept_or_generated() {
        let mut h = HeaderMap::new();
        h.insert(REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(REQUEST_ID, HeaderValue::from_static("has space"));
        let generated = request_id(&h);
        assert_eq!(generated.len(), 36);
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
    }

    #[test]
    fn uuid_shape() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12]);
        assert!(parts[2].starts_with('4'));
        assert!(matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'));
        assert_ne!(uuid_v4(), uuid_v4());
    }

    #[test]
    fn uuid_digits_follow_the_generator_in_order() {
        // Same seed, same two numbers: the text is their hex digits, dashed 8-4-4-4-12.
        STATE.with(|state| state.set(0x1234_5678_9abc_def1));
        let id = uuid_v4();
        STATE.with(|state| state.set(0x1234_5678_9abc_def1));
        let hi = (next_u64() & 0xffff_ffff_ffff_0fff) | 0x4000;
        let lo = (next_u64() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        let expected = format!("{:016x}{:016x}", hi, lo);
        assert_eq!(id.replace('-', ""), expected);
    }
}
