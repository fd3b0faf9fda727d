//! Token usage from the tail of an answer: the `usage` object of a JSON answer,
//! or of the last usage chunk of an SSE stream. Only the last frames of the body
//! are looked at, never the whole body.

use serde::Deserialize;

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

/// `(prompt_tokens, completion_tokens)` from the last `"usage":{...}` in `tail`.
pub fn find_usage(tail: &[u8]) -> Option<(u64, u64)> {
    const NEEDLE: &[u8] = b"\"usage\"";
    let at = tail.windows(NEEDLE.len()).rposition(|w| w == NEEDLE)?;
    let rest = &tail[at + NEEDLE.len()..];
    let open = rest.iter().position(|b| !b.is_ascii_whitespace() && *b != b':')?;
    if rest[open] != b'{' {
        return None;
    }
    let mut values = serde_json::Deserializer::from_slice(&rest[open..]).into_iter::<Usage>();
    let usage = values.next()?.ok()?;
    Some((usage.prompt_tokens, usage.completion_tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_answer() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":21,"completion_tokens":7,"total_tokens":28}}"#;
        assert_eq!(find_usage(body), Some((21, 7)));
    }

    #[test]
    fn sse_usage_chunk_then_done() {
        let tail =
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n";
        assert_eq!(find_usage(tail), Some((5, 9)));
    }

    #[test]
    fn absent_null_or_cut() {
        assert_eq!(find_usage(b"data: [DONE]\n\n"), None);
        assert_eq!(find_usage(br#"{"usage":null}"#), None);
        assert_eq!(find_usage(br#"{"usage":{"prompt_tokens":5,"compl"#), None);
    }
}
