//! An [`Entry`] as bytes, for a cache several instances share: a fixed
//! header, the three header values and the model (length-prefixed), the
//! frame table, then the body. The time it was stored travels as wall-clock
//! milliseconds (each instance has its own monotonic clock).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::HeaderValue;
use tokio::time::Instant;

use super::Entry;

/// Format tag: a changed layout gets a new one, and old entries read as misses.
const MAGIC: &[u8; 4] = b"SLC1";

impl Entry {
    /// The entry as bytes; `stored_unix_ms` is when it was stored (wall clock).
    pub fn encode(&self, stored_unix_ms: u64) -> Vec<u8> {
        let texts = [
            self.content_type.as_ref().map(HeaderValue::as_bytes),
            self.content_encoding.as_ref().map(HeaderValue::as_bytes),
            self.model.as_deref().map(str::as_bytes),
        ];
        let mut out = BytesMut::with_capacity(64 + self.body.len() + 4 * self.frame_ends.len());
        out.put_slice(MAGIC);
        out.put_u8(u8::from(self.sse) | (u8::from(self.tokens.is_some()) << 1));
        out.put_u64(stored_unix_ms);
        out.put_u64(self.ttl.as_millis() as u64);
        let (prompt, completion) = self.tokens.unwrap_or((0, 0));
        out.put_u64(prompt);
        out.put_u64(completion);
        for text in texts {
            match text {
                Some(bytes) => {
                    out.put_u16(bytes.len().min(u16::MAX as usize - 1) as u16 + 1);
                    out.put_slice(&bytes[..bytes.len().min(u16::MAX as usize - 1)]);
                }
                None => out.put_u16(0),
            }
        }
        out.put_u32(self.frame_ends.len() as u32);
        for end in &self.frame_ends {
            out.put_u32(*end);
        }
        out.put_slice(&self.body);
        out.to_vec()
    }

    /// Reads an entry back; `None` when the bytes are not a whole, sound
    /// entry, or it is no longer fresh at wall-clock `now_unix_ms`.
    pub fn decode(bytes: Bytes, now_unix_ms: u64) -> Option<Self> {
        let mut input = bytes;
        if input.len() < MAGIC.len() + 1 + 32 || &input[..4] != MAGIC {
            return None;
        }
        input.advance(4);
        let flags = input.get_u8();
        let stored_unix_ms = input.get_u64();
        let ttl = Duration::from_millis(input.get_u64());
        let tokens = (input.get_u64(), input.get_u64());
        let mut texts: [Option<Bytes>; 3] = [None, None, None];
        for text in &mut texts {
            let len = usize::from(take_u16(&mut input)?);
            if len > 0 {
                *text = Some(take(&mut input, len - 1)?);
            }
        }
        let frames = take_u32(&mut input)? as usize;
        let table = take(&mut input, frames.checked_mul(4)?)?;
        let frame_ends: Box<[u32]> =
            table.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();
        // The frames must tile the body exactly, in order.
        let mut previous = 0u32;
        for end in &frame_ends {
            if *end < previous {
                return None;
            }
            previous = *end;
        }
        if previous as usize != input.len() {
            return None;
        }
        let age = Duration::from_millis(now_unix_ms.saturating_sub(stored_unix_ms));
        if age >= ttl {
            return None;
        }
        let now = Instant::now();
        let [content_type, content_encoding, model] = texts;
        let header = |bytes: Option<Bytes>| bytes.and_then(|b| HeaderValue::from_maybe_shared(b).ok());
        Some(Self {
            body: input,
            frame_ends,
            content_type: header(content_type),
            content_encoding: header(content_encoding),
            sse: flags & 1 != 0,
            model: model.and_then(|m| std::str::from_utf8(&m).ok().map(Arc::from)),
            tokens: (flags & 2 != 0).then_some(tokens),
            stored_at: now.checked_sub(age).unwrap_or(now),
            ttl,
        })
    }
}

fn take(input: &mut Bytes, len: usize) -> Option<Bytes> {
    (input.len() >= len).then(|| input.split_to(len))
}

fn take_u16(input: &mut Bytes) -> Option<u16> {
    (input.len() >= 2).then(|| input.get_u16())
}

fn take_u32(input: &mut Bytes) -> Option<u32> {
    (input.len() >= 4).then(|| input.get_u32())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        Entry {
            body: Bytes::from_static(b"data: a\n\ndata: [DONE]\n\n"),
            frame_ends: vec![9, 23].into_boxed_slice(),
            content_type: Some(HeaderValue::from_static("text/event-stream")),
            content_encoding: None,
            sse: true,
            model: Some(Arc::from("gpt-4o")),
            tokens: Some((3, 4)),
            stored_at: Instant::now(),
            ttl: Duration::from_secs(60),
        }
    }

    #[test]
    fn an_entry_comes_back_as_it_went() {
        let bytes = Bytes::from(sample().encode(1_000_000));
        let back = Entry::decode(bytes, 1_010_000).unwrap();
        let frames: Vec<Bytes> = (0..).map_while(|i| back.frame(i)).collect();
        assert_eq!(frames, [&b"data: a\n\n"[..], b"data: [DONE]\n\n"]);
        assert_eq!(back.content_type, Some(HeaderValue::from_static("text/event-stream")));
        assert_eq!((back.sse, back.tokens, back.model.as_deref()), (true, Some((3, 4)), Some("gpt-4o")));
        assert_eq!(back.ttl, Duration::from_secs(60));
        assert!(Instant::now().saturating_duration_since(back.stored_at) >= Duration::from_secs(10));
    }

    #[test]
    fn stale_cut_or_foreign_bytes_are_misses() {
        let bytes = Bytes::from(sample().encode(1_000_000));
        assert!(Entry::decode(bytes.clone(), 1_060_000).is_none(), "past its TTL");
        for cut in [0, 4, 20, 40, bytes.len() - 1] {
            assert!(Entry::decode(bytes.slice(..cut), 1_000_000).is_none(), "cut at {cut}");
        }
        assert!(Entry::decode(Bytes::from_static(b"XXXXanything at all, long enough to read"), 0).is_none());
    }
}
