//! Token usage from the tail of an answer: the `usage` object of a JSON answer,
//! or of the last usage chunk of an SSE stream. Only the last frames of the body
//! are looked at, never the whole body.

use memchr::memmem;
use serde::Deserialize;

/// Chat and completions name the counts `prompt_tokens` and
/// `completion_tokens`; the Responses API `input_tokens` and `output_tokens`.
#[derive(Deserialize)]
struct Usage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: u64,
}

const NEEDLE: &[u8] = b"\"usage\"";

/// `(prompt_tokens, completion_tokens)` from the last `"usage":{...}` in `tail`.
pub fn find_usage(tail: &[u8]) -> Option<(u64, u64)> {
    let at = memmem::rfind(tail, NEEDLE)?;
    parse_after(&tail[at + NEEDLE.len()..])
}

/// The same as [`find_usage`] over two frames, `earlier` then `last`, without
/// joining them unless the match starts in `earlier`: the usual stream keeps
/// its usage (or none at all) in its last frame, and copying kilobytes of
/// frames only to search them was the most expensive step of a stream's end.
pub fn find_usage_in(earlier: &[u8], last: &[u8]) -> Option<(u64, u64)> {
    if let Some(at) = memmem::rfind(last, NEEDLE) {
        return parse_after(&last[at + NEEDLE.len()..]);
    }
    // The last match starts in `earlier`: either across the boundary or wholly
    // inside it. Only the bytes from the match on are joined.
    let seam_start = earlier.len().saturating_sub(NEEDLE.len() - 1);
    let mut seam = earlier[seam_start..].to_vec();
    seam.extend_from_slice(&last[..last.len().min(NEEDLE.len() - 1)]);
    let from = match memmem::rfind(&seam, NEEDLE) {
        Some(at) => seam_start + at,
        None => memmem::rfind(earlier, NEEDLE)?,
    };
    let mut joined = Vec::with_capacity(earlier.len() - from + last.len());
    joined.extend_from_slice(&earlier[from..]);
    joined.extend_from_slice(last);
    find_usage(&joined)
}

fn parse_after(rest: &[u8]) -> Option<(u64, u64)> {
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
    fn the_responses_api_names_its_counts_differently() {
        let completed = br#"event: response.completed
data: {"type":"response.completed","response":{"id":"resp_1","usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":0},"output_tokens":30,"total_tokens":42}}}

"#;
        assert_eq!(find_usage(completed), Some((12, 30)));
    }

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

    #[test]
    fn over_two_frames_wherever_the_split_falls() {
        let body: &[u8] = br#"data: {"usage":{"prompt_tokens":1,"completion_tokens":2}}

data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}

data: [DONE]

"#;
        // Every split point, including inside the needle and inside the object:
        // the answer is always the last usage object of the whole.
        for split in 0..=body.len() {
            let (earlier, last) = body.split_at(split);
            assert_eq!(find_usage_in(earlier, last), Some((5, 9)), "split at {split}");
        }
        assert_eq!(find_usage_in(b"", b""), None);
        assert_eq!(find_usage_in(b"data: {\"choices\":[]}\n\n", b"data: [DONE]\n\n"), None);
    }
}
