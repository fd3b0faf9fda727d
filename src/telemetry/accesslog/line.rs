//! One request-log line: a [`Record`] as a JSON object, written by hand.
//! serde's derived writer escaped every field name and went through its
//! generic machinery per field: ~5k instructions a line, on the writer
//! thread, at every request. This writes the names as constants and copies
//! values that need no escaping in one piece. The test holds it to the
//! serde-written line it replaced.

use serde_json::ser::{CompactFormatter, Formatter as _};

use super::Record;

/// Appends `record`'s JSON object (without a newline) to `out`; `ts` is an
/// RFC 3339 timestamp (nothing in it to escape).
pub(super) fn write(out: &mut Vec<u8>, r: &Record<'_>, ts: &[u8]) {
    out.extend_from_slice(b"{\"ts\":\"");
    out.extend_from_slice(ts);
    out.push(b'"');
    out.extend_from_slice(b",\"request_id\":");
    bytes(out, r.request_id.as_bytes());
    out.extend_from_slice(b",\"client\":");
    optional(out, r.client);
    if let Some(user) = r.user {
        out.extend_from_slice(b",\"user\":");
        string(out, user);
    }
    out.extend_from_slice(b",\"method\":");
    string(out, r.method.as_str());
    out.extend_from_slice(b",\"path\":");
    string(out, r.path);
    out.extend_from_slice(b",\"model\":");
    optional(out, r.model);
    out.extend_from_slice(b",\"upstream\":");
    optional(out, r.upstream);
    if let Some(model) = r.upstream_model {
        out.extend_from_slice(b",\"upstream_model\":");
        bytes(out, model.as_bytes());
    }
    out.extend_from_slice(b",\"key\":");
    optional(out, r.key);
    out.extend_from_slice(b",\"status\":");
    number(out, u64::from(r.status));
    out.extend_from_slice(b",\"attempts\":");
    number(out, u64::from(r.attempts));
    out.extend_from_slice(b",\"duration_ms\":");
    float(out, Some(r.duration_ms));
    out.extend_from_slice(b",\"upstream_ttfb_ms\":");
    float(out, r.upstream_ttfb_ms);
    out.extend_from_slice(b",\"bytes_in\":");
    number(out, r.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    number(out, r.bytes_out);
    out.extend_from_slice(b",\"prompt_tokens\":");
    optional_number(out, r.prompt_tokens);
    out.extend_from_slice(b",\"completion_tokens\":");
    optional_number(out, r.completion_tokens);
    out.extend_from_slice(if r.stream { b",\"stream\":true" } else { b",\"stream\":false" });
    if let Some(cache) = r.cache {
        out.extend_from_slice(b",\"cache\":");
        string(out, cache);
    }
    out.extend_from_slice(b",\"error\":");
    optional(out, r.error);
    out.push(b'}');
}

fn optional(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(value) => string(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

/// Header bytes as text: UTF-8 as it is, anything else decoded lossily (a
/// header value may hold any byte but DEL and the control characters other
/// than tab).
fn bytes(out: &mut Vec<u8>, value: &[u8]) {
    match std::str::from_utf8(value) {
        Ok(text) => string(out, text),
        Err(_) => string(out, &String::from_utf8_lossy(value)),
    }
}

/// A JSON string, escaped as serde_json escapes: `"`, `\\` and the control
/// characters below 0x20. Runs without an escape are copied in one piece.
fn string(out: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    while let Some(at) = first_escaped(&bytes[start..]) {
        let i = start + at;
        out.extend_from_slice(&bytes[start..i]);
        escape(out, bytes[i]);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Where the first byte a JSON string cannot hold as it is sits, if any:
/// eight bytes a step while there is none (the usual value has none), then
/// byte by byte from the eight that hold one.
fn first_escaped(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // A byte below `n` (n <= 0x80) sets its high bit here; none sets one falsely.
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    let mut clean = 0;
    for chunk in bytes.chunks_exact(8) {
        let word = u64::from_ne_bytes(chunk.try_into().unwrap_or_default());
        if below(word, 0x20) | below(word ^ (ONES * u64::from(b'"')), 1) | below(word ^ (ONES * u64::from(b'\\')), 1)
            != 0
        {
            break;
        }
        clean += 8;
    }
    bytes[clean..].iter().position(|&b| ESCAPED[usize::from(b)]).map(|at| clean + at)
}

/// The bytes a JSON string cannot hold as they are.
static ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

fn escape(out: &mut Vec<u8>, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match byte {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        _ => {
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xf)]])
        }
    }
}

fn number(out: &mut Vec<u8>, value: u64) {
    // Writing to a Vec cannot fail.
    let _ = CompactFormatter.write_u64(out, value);
}

fn optional_number(out: &mut Vec<u8>, value: Option<u64>) {
    match value {
        Some(value) => number(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

/// Shortest round-trip decimal, as serde_json writes an `f64`; `null` when
/// absent or not finite.
fn float(out: &mut Vec<u8>, value: Option<f64>) {
    match value.filter(|v| v.is_finite()) {
        Some(value) => {
            let _ = CompactFormatter.write_f64(out, value);
        }
        None => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::SystemTime;

    use http::{HeaderValue, Method};
    use serde::Serialize;

    use super::*;

    /// The line as serde wrote it before: the reference the hand-written one must match.
    #[derive(Serialize)]
    struct Line<'a> {
        ts: &'a str,
        request_id: Cow<'a, str>,
        client: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        method: &'a str,
        path: &'a str,
        model: Option<&'a str>,
        upstream: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        upstream_model: Option<Cow<'a, str>>,
        key: Option<&'a str>,
        status: u16,
        attempts: u32,
        duration_ms: f64,
        upstream_ttfb_ms: Option<f64>,
        bytes_in: u64,
        bytes_out: u64,
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        stream: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache: Option<&'static str>,
        error: Option<&'static str>,
    }

    impl<'a> Line<'a> {
        fn of(r: &'a Record<'a>, ts: &'a str) -> Self {
            Line {
                ts,
                request_id: String::from_utf8_lossy(r.request_id.as_bytes()),
                client: r.client,
                user: r.user,
                method: r.method.as_str(),
                path: r.path,
                model: r.model,
                upstream: r.upstream,
                // ASCII (the usual model name) is borrowed; anything else decoded.
                upstream_model: r
                    .upstream_model
                    .map(|v| v.to_str().map_or_else(|_| String::from_utf8_lossy(v.as_bytes()), Cow::Borrowed)),
                key: r.key,
                status: r.status,
                attempts: r.attempts,
                duration_ms: r.duration_ms,
                upstream_ttfb_ms: r.upstream_ttfb_ms,
                bytes_in: r.bytes_in,
                bytes_out: r.bytes_out,
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
                stream: r.stream,
                cache: r.cache,
                error: r.error,
            }
        }
    }

    static POST: Method = Method::POST;
    static REQUEST_ID: HeaderValue = HeaderValue::from_static("req-1");
    static UPSTREAM_MODEL: HeaderValue = HeaderValue::from_static("gpt-4o-2024");

    fn record() -> Record<'static> {
        Record {
            arrived: SystemTime::now(),
            request_id: &REQUEST_ID,
            client: Some("key:7"),
            user: Some("alice"),
            method: &POST,
            path: "/v1/chat/completions",
            model: Some("gpt-4o"),
            upstream: Some("openai"),
            upstream_model: Some(&UPSTREAM_MODEL),
            key: Some("sk-u…00000000"),
            status: 200,
            attempts: 1,
            duration_ms: 1.234567,
            upstream_ttfb_ms: Some(0.5),
            bytes_in: 10,
            bytes_out: 20_000_000_000,
            prompt_tokens: Some(3),
            completion_tokens: None,
            stream: true,
            cache: Some("hit"),
            error: None,
        }
    }

    fn by_hand(r: &Record<'_>) -> String {
        let mut out = Vec::new();
        write(&mut out, r, b"2026-12-02T10:00:00.123Z");
        String::from_utf8(out).unwrap()
    }

    fn by_serde(r: &Record<'_>) -> String {
        serde_json::to_string(&Line::of(r, "2026-12-02T10:00:00.123Z")).unwrap()
    }

    #[test]
    fn lines_match_the_serde_written_ones() {
        let full = record();
        let purge = Method::from_bytes(b"PURGE").unwrap();
        let mut bare = record();
        (bare.client, bare.user, bare.model, bare.upstream, bare.upstream_model, bare.key) =
            (None, None, None, None, None, None);
        (bare.upstream_ttfb_ms, bare.prompt_tokens, bare.cache, bare.error) = (None, None, None, Some("timeout"));
        (bare.stream, bare.duration_ms, bare.method) = (false, 0.0, &purge);
        // Every control character, quotes, backslashes, non-ASCII, a DEL.
        let controls: String = (0u8..0x20).map(char::from).collect();
        let path = format!("/v1/\"quoted\"\\back{controls}\u{7f}é中🦀/end");
        // Header values: not UTF-8 (decoded lossily), and a tab.
        let request_id = HeaderValue::from_bytes(b"id-\xff\xfe-x").unwrap();
        let upstream_model = HeaderValue::from_bytes(b"m\tx\x80").unwrap();
        let mut odd = record();
        (odd.path, odd.model, odd.client) = (&path, Some("\u{0}"), Some(""));
        (odd.request_id, odd.upstream_model) = (&request_id, Some(&upstream_model));
        (odd.duration_ms, odd.upstream_ttfb_ms) = (f64::NAN, Some(f64::INFINITY));
        (odd.attempts, odd.status, odd.bytes_in) = (u32::MAX, 499, u64::MAX);
        let mut tiny = record();
        (tiny.duration_ms, tiny.upstream_ttfb_ms) = (1e-7, Some(123456789.125));
        for r in [&full, &bare, &odd, &tiny] {
            let line = by_hand(r);
            assert_eq!(line, by_serde(r));
            serde_json::from_str::<serde_json::Value>(&line).unwrap();
        }
    }

    #[test]
    fn a_byte_to_escape_is_found_wherever_it_sits_in_its_eight() {
        for special in (0u8..0x20).chain([b'"', b'\\']) {
            for at in 0..21 {
                let mut text = "abcdefghijé-klmnopqrs".as_bytes().to_vec();
                text.truncate(21);
                text[at] = special;
                let text = String::from_utf8_lossy(&text).into_owned();
                let mut out = Vec::new();
                string(&mut out, &text);
                assert_eq!(out, serde_json::to_vec(&text).unwrap(), "{special:#x} at {at}");
            }
        }
        for clean in ["", "a", "exactly8", "sixteen-bytes-ok", "é中🦀 and \u{7f}"] {
            let mut out = Vec::new();
            string(&mut out, clean);
            assert_eq!(out, serde_json::to_vec(clean).unwrap());
        }
    }
}
