//! Reads the few fields sluice needs from a JSON request body in one pass,
//! borrowing from the body, and splices in the changes a route asks for.
//!
//! Only `model` and `stream` are read; every other member is skipped (validated,
//! never built). The sniff also notes which of the configured default parameters
//! are present, so filling defaults needs no second parse.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::ProxyError;

/// What the sniff found in a request body.
#[derive(Debug, Default, PartialEq)]
pub struct Sniffed<'a> {
    /// The `model` string (borrowed unless it held escapes), `None` if absent or null.
    pub model: Option<Cow<'a, str>>,
    /// Byte range of the `model` value (with its quotes) in the body.
    pub model_span: Option<Range<usize>>,
    /// `stream: true`.
    pub stream: bool,
    /// Bit `i` is set when default parameter `i` of the snapshot is present.
    pub present: u64,
    /// `stream_options.include_usage`: `None` without a `stream_options`
    /// member, else whether it asks for the usage event.
    pub stream_usage: Option<bool>,
    /// Every `max_tokens`, `max_completion_tokens` and `max_output_tokens`
    /// member: which (its index in [`TOKEN_LIMIT_NAMES`]), its value when a
    /// plain non-negative integer (`None` for `null`, a float, a string...),
    /// and the byte range of the value in the body.
    pub token_limits: Vec<TokenLimit>,
    /// Number of top-level members.
    pub members: usize,
}

/// The members that bound an answer's length.
pub const TOKEN_LIMIT_NAMES: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];

/// One answer-length member of a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLimit {
    /// Its index in [`TOKEN_LIMIT_NAMES`].
    pub name: usize,
    /// Its value, when a plain non-negative integer.
    pub value: Option<u64>,
    /// The byte range of the value in the body.
    pub span: Range<usize>,
}

/// Sniffs `body`, which must be a JSON object. `param_names` are the default
/// parameter names of the snapshot, at most 64 (the config enforces it).
pub fn sniff<'a>(body: &'a [u8], param_names: &[Box<str>]) -> Result<Sniffed<'a>, ProxyError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let seed = SniffSeed { body, param_names };
    let sniffed = seed.deserialize(&mut de).map_err(classify)?;
    de.end().map_err(classify)?;
    Ok(sniffed)
}

/// Marker messages so these errors map to their own answers.
const MODEL_NOT_STRING: &str = "model must be a string";
const DUPLICATE_MODEL: &str = "duplicate member model";
const DUPLICATE_STREAM: &str = "duplicate member stream";

fn classify(error: serde_json::Error) -> ProxyError {
    let message = error.to_string();
    match message {
        _ if !error.is_data() => ProxyError::BadJson(message),
        _ if message.starts_with(MODEL_NOT_STRING) => ProxyError::ModelNotString,
        // Routing by one `model` while the upstream may read the other.
        _ if message.starts_with(DUPLICATE_MODEL) => ProxyError::DuplicateMember("model"),
        _ if message.starts_with(DUPLICATE_STREAM) => ProxyError::DuplicateMember("stream"),
        _ => ProxyError::BadJson(message),
    }
}

struct SniffSeed<'s> {
    body: &'s [u8],
    param_names: &'s [Box<str>],
}

impl<'de> DeserializeSeed<'de> for SniffSeed<'_> {
    type Value = Sniffed<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for SniffSeed<'_> {
    type Value = Sniffed<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Sniffed::default();
        let (mut seen_model, mut seen_stream) = (false, false);
        while let Some(KeyName(key)) = map.next_key()? {
            out.members += 1;
            match key.as_ref() {
                "model" if std::mem::replace(&mut seen_model, true) => return Err(de::Error::custom(DUPLICATE_MODEL)),
                "stream" if std::mem::replace(&mut seen_stream, true) => {
                    return Err(de::Error::custom(DUPLICATE_STREAM));
                }
                "model" => {
                    let raw: Option<&'de RawValue> = map.next_value()?;
                    match raw {
                        None => {
                            out.model = None;
                            out.model_span = None;
                        }
                        Some(raw) => {
                            let text = raw.get();
                            if !text.starts_with('"') {
                                return Err(de::Error::custom(MODEL_NOT_STRING));
                            }
                            // The raw value borrows from the body: its offset is a plain
                            // address difference, no unsafe needed.
                            let start = text.as_ptr() as usize - self.body.as_ptr() as usize;
                            out.model_span = Some(start..start + text.len());
                            out.model = Some(match serde_json::from_str::<&str>(text) {
                                Ok(plain) => Cow::Borrowed(plain),
                                Err(_) => Cow::Owned(serde_json::from_str::<String>(text).map_err(de::Error::custom)?),
                            });
                        }
                    }
                }
                "stream" => out.stream = map.next_value::<Option<bool>>()?.unwrap_or(false),
                other => {
                    if let Some(i) = self.param_names.iter().position(|n| n.as_ref() == other) {
                        out.present |= 1 << i;
                    }
                    if other == "stream_options" {
                        // Rare: read only what metering needs.
                        let options: Option<StreamOptions> = map.next_value()?;
                        out.stream_usage = Some(options.is_some_and(|o| o.include_usage == Some(true)));
                    } else if let Some(name) = TOKEN_LIMIT_NAMES.iter().position(|n| *n == other) {
                        let raw: &'de RawValue = map.next_value()?;
                        let start = raw.get().as_ptr() as usize - self.body.as_ptr() as usize;
                        let value = raw.get().parse::<u64>().ok();
                        out.token_limits.push(TokenLimit { name, value, span: start..start + raw.get().len() });
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The part of `stream_options` metering reads.
#[derive(serde::Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// A member name, borrowed unless it holds escapes.
struct KeyName<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for KeyName<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = KeyName<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(KeyName(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(KeyName(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Writes a new body: `inserts` (each a complete `"name":value` member) go right
/// after the opening brace, and each of `replace` (byte ranges of values in
/// the body, in any order, not overlapping) gets its new text. Everything
/// else is copied byte for byte.
pub fn splice(body: &[u8], sniffed: &Sniffed<'_>, replace: &[(Range<usize>, &[u8])], inserts: &[&[u8]]) -> Bytes {
    let extra: usize =
        inserts.iter().map(|m| m.len() + 1).sum::<usize>() + replace.iter().map(|(_, v)| v.len()).sum::<usize>();
    let mut out = BytesMut::with_capacity(body.len() + extra);
    // A sniffed body is an object, so its first non-blank byte is `{`.
    let open = body.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(0);
    out.put_slice(&body[..=open]);
    for (i, member) in inserts.iter().enumerate() {
        out.put_slice(member);
        if i + 1 < inserts.len() || sniffed.members > 0 {
            out.put_u8(b',');
        }
    }
    let mut order: Vec<&(Range<usize>, &[u8])> = replace.iter().collect();
    order.sort_by_key(|(span, _)| span.start);
    let mut at = open + 1;
    for (span, value) in order {
        out.put_slice(&body[at..span.start]);
        out.put_slice(value);
        at = span.end;
    }
    out.put_slice(&body[at..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<Box<str>> {
        vec!["max_tokens".into(), "temperature".into()]
    }

    #[test]
    fn reads_model_stream_and_present_params() {
        let body = br#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o","stream":true,"temperature":0.2}"#;
        let s = sniff(body, &names()).unwrap();
        assert_eq!(s.model.as_deref(), Some("gpt-4o"));
        assert!(matches!(s.model, Some(Cow::Borrowed(_))));
        assert!(s.stream);
        assert_eq!(s.present, 0b10);
        assert_eq!(s.members, 4);
        assert_eq!(&body[s.model_span.clone().unwrap()], br#""gpt-4o""#);
    }

    #[test]
    fn stream_options_are_read_for_metering() {
        let usage = |body: &[u8]| sniff(body, &[]).unwrap().stream_usage;
        assert_eq!(usage(br#"{"stream":true}"#), None);
        assert_eq!(usage(br#"{"stream_options":{"include_usage":true}}"#), Some(true));
        assert_eq!(usage(br#"{"stream_options":{"include_usage":false,"x":1}}"#), Some(false));
        assert_eq!(usage(br#"{"stream_options":null}"#), Some(false));
        assert!(sniff(br#"{"stream_options":{"include_usage":"yes"}}"#, &[]).is_err());
    }

    #[test]
    fn escaped_model_is_decoded() {
        let s = sniff(br#"{"model":"gpt\u002d4o"}"#, &[]).unwrap();
        assert_eq!(s.model.as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn null_or_missing_model_is_none() {
        assert_eq!(sniff(br#"{"model":null}"#, &[]).unwrap().model, None);
        assert_eq!(sniff(br#"{}"#, &[]).unwrap().model, None);
    }

    #[test]
    fn bad_bodies() {
        assert!(matches!(sniff(br#"{"model":5}"#, &[]), Err(ProxyError::ModelNotString)));
        assert!(matches!(sniff(br#"{"model":["a"]}"#, &[]), Err(ProxyError::ModelNotString)));
        assert!(matches!(sniff(br#"[1,2]"#, &[]), Err(ProxyError::BadJson(_))));
        assert!(matches!(sniff(br#"{"model":"a""#, &[]), Err(ProxyError::BadJson(_))));
        assert!(matches!(sniff(br#"{"model":"a"} trailing"#, &[]), Err(ProxyError::BadJson(_))));
        assert!(matches!(sniff(br#"{"stream":"yes"}"#, &[]), Err(ProxyError::BadJson(_))));
        assert!(matches!(sniff(b"", &[]), Err(ProxyError::BadJson(_))));
    }

    #[test]
    fn a_member_sluice_routes_by_may_appear_once() {
        assert!(matches!(sniff(br#"{"model":"a","x":1,"model":"b"}"#, &[]), Err(ProxyError::DuplicateMember("model"))));
        assert!(matches!(sniff(br#"{"stream":false,"stream":true}"#, &[]), Err(ProxyError::DuplicateMember("stream"))));
        assert!(matches!(sniff(br#"{"model":null,"model":"b"}"#, &[]), Err(ProxyError::DuplicateMember("model"))));
        assert!(sniff(br#"{"model":"a","messages":[{"model":"inner"}]}"#, &[]).is_ok(), "only top-level members count");
    }

    #[test]
    fn splice_renames_and_inserts() {
        let body = br#" {"model":"mini","messages":[]}"#;
        let s = sniff(body, &names()).unwrap();
        let rename = [(s.model_span.clone().unwrap(), &br#""gpt-4o-mini""#[..])];
        let out = splice(body, &s, &rename, &[br#""max_tokens":1024"#]);
        assert_eq!(&out[..], br#" {"max_tokens":1024,"model":"gpt-4o-mini","messages":[]}"#);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["max_tokens"], 1024);
    }

    #[test]
    fn token_limits_are_found_and_replaced() {
        let body = br#"{"max_tokens":9000,"model":"m","max_completion_tokens":"x","max_output_tokens":10}"#;
        let s = sniff(body, &[]).unwrap();
        let values: Vec<(usize, Option<u64>)> = s.token_limits.iter().map(|l| (l.name, l.value)).collect();
        assert_eq!(values, [(0, Some(9000)), (1, None), (2, Some(10))], "a value that is no plain integer is None");
        let replace = [(s.token_limits[0].span.clone(), &b"4096"[..]), (s.model_span.clone().unwrap(), &br#""n""#[..])];
        let out = splice(body, &s, &replace, &[]);
        assert_eq!(&out[..], br#"{"max_tokens":4096,"model":"n","max_completion_tokens":"x","max_output_tokens":10}"#);
    }

    #[test]
    fn splice_into_empty_object() {
        let body = b"{}";
        let s = sniff(body, &[]).unwrap();
        let out = splice(body, &s, &[], &[br#""model":"m""#, br#""t":1"#]);
        assert_eq!(&out[..], br#"{"model":"m","t":1}"#);
    }

    mod properties {
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        use super::super::{sniff, splice};

        /// Any JSON value, a few levels deep.
        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                "[ -~\u{00e9}\u{4e2d}\n\"\\\\]{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// A request-like JSON object: maybe a `model` string, maybe `stream`,
        /// and any other members.
        fn request() -> impl Strategy<Value = Map<String, Value>> {
            (
                prop::option::of("[ -~\u{00e9}]{0,16}"),
                prop::option::of(any::<bool>()),
                prop::collection::btree_map("[a-z_]{1,10}", value(), 0..6),
            )
                .prop_map(|(model, stream, rest)| {
                    let mut map: Map<String, Value> =
                        rest.into_iter().filter(|(k, _)| k != "model" && k != "stream").collect();
                    if let Some(model) = model {
                        map.insert("model".into(), Value::from(model));
                    }
                    if let Some(stream) = stream {
                        map.insert("stream".into(), Value::from(stream));
                    }
                    map
                })
        }

        proptest! {
            #[test]
            fn the_sniff_finds_what_a_full_parse_finds(map in request(), pretty in any::<bool>()) {
                let body = if pretty { serde_json::to_vec_pretty(&map) } else { serde_json::to_vec(&map) }.unwrap();
                let sniffed = sniff(&body, &[]).unwrap();
                prop_assert_eq!(sniffed.model.as_deref(), map.get("model").and_then(Value::as_str));
                prop_assert_eq!(sniffed.stream, map.get("stream").and_then(Value::as_bool).unwrap_or(false));
                prop_assert_eq!(sniffed.members, map.len());
            }

            #[test]
            fn a_splice_changes_only_what_it_was_asked_to(map in request(), rename in "[a-z0-9-]{1,12}", insert in any::<bool>()) {
                let body = serde_json::to_vec(&map).unwrap();
                let sniffed = sniff(&body, &[]).unwrap();
                let new_model = Value::from(rename.as_str()).to_string();
                let inserted = br#""sluice_default":42"#;
                let inserts: &[&[u8]] = if insert { &[inserted] } else { &[] };
                let replace: Vec<(std::ops::Range<usize>, &[u8])> =
                    sniffed.model_span.clone().map(|span| (span, new_model.as_bytes())).into_iter().collect();
                let out = splice(&body, &sniffed, &replace, inserts);
                let mut expected = map.clone();
                if expected.contains_key("model") {
                    expected.insert("model".into(), Value::from(rename.as_str()));
                }
                if insert {
                    expected.insert("sluice_default".into(), Value::from(42));
                }
                let parsed: Map<String, Value> = serde_json::from_slice(&out).expect("the splice is valid JSON");
                prop_assert_eq!(parsed, expected);
            }

            #[test]
            fn any_bytes_are_sniffed_or_refused_never_a_panic(body in prop::collection::vec(any::<u8>(), 0..256)) {
                let _ = sniff(&body, &[]);
            }
        }
    }
}
