//! HTTP/1.1 response body framing (RFC 9112 §6.3, §7.1): a pure decoder over
//! the connection's read buffer. It never copies: each decoded piece is a
//! slice split off the buffer, and `n` chunks that arrive in one read decode
//! as `n` pieces without another read ([`super::H1Body`] then hands pieces
//! that arrived together on as one frame).

use bytes::{Buf, Bytes, BytesMut};

use super::H1Error;

/// Longest chunk-size line (size, extensions and CRLF) or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Most trailer bytes accepted after the last chunk (they are read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;

/// How the body of one response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `Content-Length`: this many bytes are still to come.
    Length(u64),
    /// `Transfer-Encoding: chunked`, at this point of the chunk grammar.
    Chunked(Chunk),
    /// Neither: the body ends when the upstream closes the connection.
    UntilClose,
    /// The body is complete.
    Done,
}

/// Where a chunked body is in its grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk with this many data bytes left.
    Data(u64),
    /// Expecting the CRLF that closes a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one (bytes seen so far).
    Trailers(usize),
}

/// What one step of decoding found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// Body bytes to hand on.
    Data(Bytes),
    /// The buffer holds no complete next piece: read more.
    NeedMore,
    /// The body is complete.
    End,
}

impl Framing {
    /// Decodes the next piece of body from the front of `buf`, consuming it.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            match *self {
                Framing::Done => return Ok(Decoded::End),
                Framing::Length(0) => {
                    *self = Framing::Done;
                    return Ok(Decoded::End);
                }
                Framing::Length(left) => {
                    let Some(data) = take(buf, left) else { return Ok(Decoded::NeedMore) };
                    let left = left - data.len() as u64;
                    *self = if left == 0 { Framing::Done } else { Framing::Length(left) };
                    return Ok(Decoded::Data(data));
                }
                Framing::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                Framing::Chunked(Chunk::Size) => {
                    let Some(line) = line(buf)? else { return Ok(Decoded::NeedMore) };
                    let size = chunk_size(&line)?;
                    *self = Framing::Chunked(if size == 0 { Chunk::Trailers(0) } else { Chunk::Data(size) });
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    let Some(data) = take(buf, left) else { return Ok(Decoded::NeedMore) };
                    let left = left - data.len() as u64;
                    *self = Framing::Chunked(if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) });
                    return Ok(Decoded::Data(data));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Protocol("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Trailers(seen)) => {
                    let Some(line) = line(buf)? else { return Ok(Decoded::NeedMore) };
                    // Only a blank line ends the trailers ("x\n" is a broken one).
                    if &line[..] == b"\r\n" || &line[..] == b"\n" {
                        *self = Framing::Done;
                        return Ok(Decoded::End);
                    }
                    let seen = seen + line.len();
                    if seen > MAX_TRAILERS {
                        return Err(H1Error::Protocol("chunked trailers too large"));
                    }
                    *self = Framing::Chunked(Chunk::Trailers(seen));
                }
            }
        }
    }

    /// Whether the body is complete (nothing more will be read for it).
    pub(crate) fn is_done(&self) -> bool {
        matches!(self, Framing::Done | Framing::Length(0))
    }

    /// Whether the body's end leaves the connection reusable.
    pub(crate) fn reusable(&self) -> bool {
        !matches!(self, Framing::UntilClose)
    }
}

/// Up to `left` bytes from the front of `buf`; `None` when `buf` is empty.
fn take(buf: &mut BytesMut, left: u64) -> Option<Bytes> {
    if buf.is_empty() {
        return None;
    }
    let n = usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()));
    Some(buf.split_to(n).freeze())
}

/// One line up to and including its LF, if the buffer holds all of it.
fn line(buf: &mut BytesMut) -> Result<Option<BytesMut>, H1Error> {
    match buf.iter().take(MAX_LINE).position(|&b| b == b'\n') {
        Some(end) => Ok(Some(buf.split_to(end + 1))),
        None if buf.len() >= MAX_LINE => Err(H1Error::Protocol("chunk-size or trailer line too long")),
        None => Ok(None),
    }
}

/// The size of a chunk-size line: hex digits, then optional whitespace and
/// `;extensions` (ignored), then CRLF.
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let mut size: u64 = 0;
    let mut digits = 0;
    for &b in line {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => break,
        };
        digits += 1;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(digit)))
            .ok_or(H1Error::Protocol("chunk size overflows"))?;
    }
    let rest = &line[digits..];
    let valid_rest = match rest.iter().position(|&b| b != b' ' && b != b'\t') {
        Some(i) => matches!(rest[i], b';' | b'\r' | b'\n'),
        None => false,
    };
    if digits == 0 || !valid_rest || !line.ends_with(b"\r\n") {
        return Err(H1Error::Protocol("malformed chunk-size line"));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` to a decoder `step` bytes at a time; returns the body and
    /// whatever is left in the buffer after the end.
    fn feed(mut framing: Framing, wire: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), H1Error> {
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match framing.decode(&mut buf)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::End => return Ok((body, buf.to_vec())),
                Decoded::NeedMore => {
                    assert!(fed < wire.len(), "decoder wants more than the wire has: {framing:?}");
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
    }

    const CHUNKED: &[u8] = b"5\r\nhello\r\n7;ext=1\r\n, world\r\nA \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";

    #[test]
    fn chunked_body_decodes_at_every_split() {
        for step in 1..=CHUNKED.len() {
            let (body, rest) = feed(Framing::Chunked(Chunk::Size), CHUNKED, step).unwrap();
            assert_eq!(body, b"hello, world0123456789", "step {step}");
            // Bytes after the message stay in the buffer (the caller refuses to reuse).
            assert!(b"NEXT".starts_with(&rest), "step {step}: {rest:?}");
        }
    }

    #[test]
    fn chunks_in_one_read_become_frames_without_copies() {
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"[..]);
        assert_eq!(framing.decode(&mut buf).unwrap(), Decoded::Data(Bytes::from_static(b"abc")));
        assert_eq!(framing.decode(&mut buf).unwrap(), Decoded::Data(Bytes::from_static(b"de")));
        assert_eq!(framing.decode(&mut buf).unwrap(), Decoded::End);
        assert!(framing.is_done() && buf.is_empty());
    }

    #[test]
    fn content_length_body_stops_at_its_length() {
        for step in 1..=12 {
            let (body, rest) = feed(Framing::Length(5), b"helloHTTP/1.1", step).unwrap();
            assert_eq!(body, b"hello");
            assert!(b"HTTP/1.1".starts_with(&rest));
        }
        let mut empty = Framing::Length(0);
        assert_eq!(empty.decode(&mut BytesMut::new()).unwrap(), Decoded::End);
    }

    #[test]
    fn bad_chunk_grammar_is_a_protocol_error() {
        for wire in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5x\r\nhello\r\n",
            b"\r\nhello",
            b"5\nhello\r\n",
            b"10000000000000000\r\n",
        ] {
            assert!(feed(Framing::Chunked(Chunk::Size), wire, 64).is_err(), "{:?}", String::from_utf8_lossy(wire));
        }
        let long = vec![b'1'; MAX_LINE + 1];
        assert!(matches!(
            Framing::Chunked(Chunk::Size).decode(&mut BytesMut::from(&long[..])),
            Err(H1Error::Protocol(_))
        ));
    }

    #[test]
    fn only_a_blank_line_ends_the_trailers() {
        // "x\n" is a (broken) trailer line, not the end: the body goes on until "\r\n".
        let (body, rest) = feed(Framing::Chunked(Chunk::Size), b"2\r\nhi\r\n0\r\nx\n\r\nNEXT", 64).unwrap();
        assert_eq!(body, b"hi");
        assert_eq!(rest, b"NEXT");
    }

    #[test]
    fn until_close_hands_on_everything_and_is_not_reusable() {
        let mut framing = Framing::UntilClose;
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert_eq!(framing.decode(&mut buf).unwrap(), Decoded::Data(Bytes::from_static(b"abc")));
        assert_eq!(framing.decode(&mut buf).unwrap(), Decoded::NeedMore);
        assert!(!framing.reusable() && !framing.is_done());
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// A chunked encoding of `pieces` (with extensions and trailers at times).
        fn chunked(pieces: &[Vec<u8>], extension: bool, trailer: bool) -> Vec<u8> {
            let mut wire = Vec::new();
            for piece in pieces.iter().filter(|p| !p.is_empty()) {
                wire.extend_from_slice(format!("{:x}", piece.len()).as_bytes());
                if extension {
                    wire.extend_from_slice(b";name=value");
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(piece);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n");
            if trailer {
                wire.extend_from_slice(b"x-t: 1\r\n");
            }
            wire.extend_from_slice(b"\r\n");
            wire
        }

        /// Feeds `wire` in the given cut sizes; the body, or the first error.
        fn feed_cuts(mut framing: Framing, wire: &[u8], cuts: &[usize]) -> Result<Vec<u8>, H1Error> {
            let mut buf = BytesMut::new();
            let (mut body, mut fed, mut cut) = (Vec::new(), 0, 0);
            loop {
                match framing.decode(&mut buf)? {
                    Decoded::Data(data) => body.extend_from_slice(&data),
                    Decoded::End => return Ok(body),
                    Decoded::NeedMore if fed == wire.len() => return Err(H1Error::Closed),
                    Decoded::NeedMore => {
                        let step = cuts.get(cut).copied().unwrap_or(7).max(1);
                        cut += 1;
                        let end = (fed + step).min(wire.len());
                        buf.extend_from_slice(&wire[fed..end]);
                        fed = end;
                    }
                }
            }
        }

        proptest! {
            #[test]
            fn chunked_bodies_decode_whole_however_they_are_cut(
                pieces in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8),
                cuts in prop::collection::vec(1usize..40, 0..64),
                extension in any::<bool>(),
                trailer in any::<bool>(),
            ) {
                let wire = chunked(&pieces, extension, trailer);
                let body = feed_cuts(Framing::Chunked(Chunk::Size), &wire, &cuts).unwrap();
                prop_assert_eq!(body, pieces.concat());
            }

            #[test]
            fn length_bodies_stop_at_their_length(body in prop::collection::vec(any::<u8>(), 0..256), extra in prop::collection::vec(any::<u8>(), 0..16), cuts in prop::collection::vec(1usize..40, 0..64)) {
                let mut wire = body.clone();
                wire.extend_from_slice(&extra);
                let decoded = feed_cuts(Framing::Length(body.len() as u64), &wire, &cuts).unwrap();
                prop_assert_eq!(decoded, body);
            }

            #[test]
            fn garbage_never_panics_and_never_yields_more_than_it_was_given(
                wire in prop::collection::vec(any::<u8>(), 0..512),
                cuts in prop::collection::vec(1usize..40, 0..64),
            ) {
                if let Ok(body) = feed_cuts(Framing::Chunked(Chunk::Size), &wire, &cuts) {
                    prop_assert!(body.len() <= wire.len());
                }
            }
        }
    }
}
