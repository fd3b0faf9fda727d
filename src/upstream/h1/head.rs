//! The request head sluice writes and the response head it reads, for the
//! HTTP/1.1 upstream client.

use std::io::Write as _;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};

use super::H1Error;
use super::framing::{Chunk, Framing};

/// Most response headers accepted (hyper's client default; LLM APIs send ~20).
const MAX_HEADERS: usize = 100;
/// Largest response head accepted.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// Writes `METHOD path HTTP/1.1`, `Host` (`host[:port]`, never user-info), the
/// headers, the credential and the body length. `headers` were already cleaned by
/// [`crate::proxy::headers::to_upstream`]; framing headers are sluice's own.
pub(crate) fn encode_request(
    out: &mut Vec<u8>,
    method: &Method,
    path_and_query: &str,
    host: &str,
    headers: &HeaderMap,
    (auth_name, auth): (&HeaderName, &HeaderValue),
    body_len: usize,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // The client's Host was removed on the way in; one left here was set by the
    // operator (`headers` of the upstream) and wins over the URL's.
    if !headers.contains_key(header::HOST) {
        line(out, b"host", host.as_bytes());
    }
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    line(out, auth_name.as_str().as_bytes(), auth.as_bytes());
    if body_len > 0 || !matches!(*method, Method::GET | Method::HEAD) {
        // Writing into a Vec cannot fail.
        let _ = write!(out, "content-length: {body_len}\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head and how its body is framed.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    /// Status, version and headers (the body is attached by the caller).
    pub(crate) response: Response<()>,
    /// How the body ends.
    pub(crate) framing: Framing,
    /// Whether the connection may carry another request afterwards.
    pub(crate) keep_alive: bool,
}

/// Parses a response head from the front of `buf`, consuming it; `Ok(None)`
/// when more bytes are needed. Informational (1xx) heads are skipped.
pub(crate) fn parse_response(buf: &mut BytesMut, method: &Method) -> Result<Option<ResponseHead>, H1Error> {
    loop {
        // Offsets into the head, so the values can share its bytes afterwards.
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let (len, code, minor, count) = {
            // Left uninitialised: httparse writes only the headers it finds.
            let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let parsing =
                httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut parsed, buf, &mut headers);
            let len = match parsing {
                // The cap holds for a head that arrived whole in one read too.
                Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
                    return Err(H1Error::Protocol("response head too large"));
                }
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                    return Err(H1Error::Protocol("response head too large"));
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => return Err(H1Error::Protocol("too many response headers")),
                Err(_) => return Err(H1Error::Protocol("malformed response head")),
            };
            let base = buf.as_ptr() as usize;
            let count = parsed.headers.len();
            for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
                // Offsets fit in u32: the head is at most MAX_HEAD bytes.
                let name = (h.name.as_ptr() as usize - base) as u32;
                let value = (h.value.as_ptr() as usize - base) as u32;
                *span = (name, name + h.name.len() as u32, value, value + h.value.len() as u32);
            }
            (len, parsed.code.unwrap_or(0), parsed.version.unwrap_or(1), count)
        };
        let head: Bytes = buf.split_to(len).freeze();
        let status = StatusCode::from_u16(code).map_err(|_| H1Error::Protocol("invalid status code"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(H1Error::Protocol("upstream switched protocols"));
            }
            continue;
        }
        let mut headers = HeaderMap::with_capacity(count);
        for &(ns, ne, vs, ve) in &spans[..count] {
            let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
            let name = HeaderName::from_bytes(&head[ns..ne]).map_err(|_| H1Error::Protocol("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
                .map_err(|_| H1Error::Protocol("invalid header value"))?;
            headers.append(name, value);
        }
        let version = if minor == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
        if version == Version::HTTP_10 && headers.contains_key(header::TRANSFER_ENCODING) {
            // HTTP/1.0 has no transfer codings; such a head is a smuggling risk (RFC 9112 §6.1).
            return Err(H1Error::Protocol("transfer-encoding in an HTTP/1.0 response"));
        }
        let (framing, delimited) = framing(&headers, status, method)?;
        if headers.contains_key(header::TRANSFER_ENCODING) {
            // Transfer-Encoding overrides Content-Length, and a proxy must not
            // pass the stale length on (RFC 9112 §6.3): the client would trust it.
            headers.remove(header::CONTENT_LENGTH);
        }
        let keep_alive = delimited && version == Version::HTTP_11 && !has_token(&headers, header::CONNECTION, "close");
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        return Ok(Some(ResponseHead { response, framing, keep_alive }));
    }
}

/// The body framing of a response (RFC 9112 §6.3) and whether it is
/// self-delimited (otherwise the connection cannot be reused).
fn framing(headers: &HeaderMap, status: StatusCode, method: &Method) -> Result<(Framing, bool), H1Error> {
    if *method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Done, true));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Chunked must be the final coding; anything else runs until close.
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|c| !c.is_empty());
        return Ok(match last {
            Some(coding) if coding.eq_ignore_ascii_case("chunked") => (Framing::Chunked(Chunk::Size), true),
            _ => (Framing::UntilClose, false),
        });
    }
    let mut length: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.to_str().map_err(|_| H1Error::Protocol("invalid content-length"))?.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(H1Error::Protocol("invalid content-length"));
            }
            let n: u64 = part.parse().map_err(|_| H1Error::Protocol("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(H1Error::Protocol("conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), true),
        None => (Framing::UntilClose, false),
    })
}

/// Whether a comma-separated header lists `token` (case-insensitively).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(wire: &[u8], method: &Method) -> Result<Option<ResponseHead>, H1Error> {
        parse_response(&mut BytesMut::from(wire), method)
    }

    #[test]
    fn request_head_has_host_credential_and_length() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let mut out = Vec::new();
        let auth = HeaderValue::from_static("Bearer sk-up");
        encode_request(
            &mut out,
            &Method::POST,
            "/v1/chat?x=1",
            "127.0.0.1:9",
            &headers,
            (&http::header::AUTHORIZATION, &auth),
            12,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\ncontent-type: application/json\r\n\
             authorization: Bearer sk-up\r\ncontent-length: 12\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_request(
            &mut out,
            &Method::GET,
            "/v1/models",
            "h",
            &HeaderMap::new(),
            (&http::header::AUTHORIZATION, &auth),
            0,
        );
        assert!(!String::from_utf8(out).unwrap().contains("content-length"));
        // A Host still in the headers was set by the operator: it is the only one sent.
        headers.insert(header::HOST, HeaderValue::from_static("api.vendor.example"));
        let mut out = Vec::new();
        encode_request(
            &mut out,
            &Method::POST,
            "/v1/chat",
            "127.0.0.1:9",
            &headers,
            (&http::header::AUTHORIZATION, &auth),
            2,
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("host: ").count(), 1, "{text}");
        assert!(text.contains("host: api.vendor.example\r\n"), "{text}");
    }

    #[test]
    fn as_many_headers_as_hyper_accepts() {
        let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..MAX_HEADERS - 1 {
            wire.extend_from_slice(format!("x-h{i}: {i}\r\n").as_bytes());
        }
        wire.extend_from_slice(b"content-length: 0\r\n\r\n");
        let head = parse_response(&mut BytesMut::from(&wire[..]), &Method::GET).unwrap().unwrap();
        assert_eq!(head.response.headers().len(), 100);
    }

    #[test]
    fn transfer_encoding_drops_a_stale_content_length() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"[..],
        );
        let head = parse_response(&mut buf, &Method::POST).unwrap().unwrap();
        assert!(matches!(head.framing, Framing::Chunked(_)));
        assert!(!head.response.headers().contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn response_head_with_length_shares_its_bytes() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nx-a: 2\r\n\r\nhi"[..]);
        let head = parse_response(&mut buf, &Method::POST).unwrap().unwrap();
        assert_eq!(head.response.status(), 200);
        assert_eq!(head.framing, Framing::Length(2));
        assert!(head.keep_alive);
        assert_eq!(head.response.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(&buf[..], b"hi");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let cases: [(&[u8], Method, Framing, bool); 7] = [
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Method::POST,
                Framing::Chunked(Chunk::Size),
                true,
            ),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", Method::POST, Framing::UntilClose, false),
            (b"HTTP/1.1 200 OK\r\n\r\n", Method::POST, Framing::UntilClose, false),
            (b"HTTP/1.1 204 No Content\r\n\r\n", Method::POST, Framing::Done, true),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::HEAD, Framing::Done, true),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
                Method::GET,
                Framing::Length(5),
                false,
            ),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n", Method::GET, Framing::Length(5), false),
        ];
        for (wire, method, framing, keep_alive) in cases {
            let head = parse(wire, &method).unwrap().unwrap();
            assert_eq!((head.framing, head.keep_alive), (framing, keep_alive), "{}", String::from_utf8_lossy(wire));
        }
    }

    #[test]
    fn informational_heads_are_skipped_and_partial_heads_wait() {
        let head =
            parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", &Method::POST)
                .unwrap()
                .unwrap();
        assert_eq!(head.response.status(), 201);
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Le", &Method::POST).unwrap().is_none());
    }

    #[test]
    fn malformed_heads_are_protocol_errors() {
        for wire in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(parse(wire, &Method::POST).is_err(), "{}", String::from_utf8_lossy(wire));
        }
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(parse(&many, &Method::POST), Err(H1Error::Protocol("too many response headers"))));
        let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
        huge.resize(MAX_HEAD + 10, b'a');
        assert!(parse(&huge, &Method::POST).is_err());
        // Complete in one read, and still over the cap.
        let mut whole = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
        whole.resize(MAX_HEAD + 10, b'a');
        whole.extend_from_slice(b"\r\ncontent-length: 0\r\n\r\n");
        assert!(matches!(parse(&whole, &Method::POST), Err(H1Error::Protocol("response head too large"))));
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn a_valid_head_parses_the_same_however_it_arrives(
                status in 200u16..600,
                names in prop::collection::vec("[a-z][a-z0-9-]{0,12}", 0..12),
                values in prop::collection::vec("[!-~]{0,24}", 12),
                split in 0usize..400,
            ) {
                // An interim 100 first, at times: it is skipped for the final head.
                let interim = if split % 3 == 0 { "HTTP/1.1 100 Continue\r\n\r\n" } else { "" };
                let mut wire = format!("{interim}HTTP/1.1 {status} X\r\n");
                for (name, value) in names.iter().zip(&values) {
                    if name != "transfer-encoding" && name != "content-length" {
                        wire.push_str(&format!("{name}: {value}\r\n"));
                    }
                }
                wire.push_str("content-length: 0\r\n\r\n");
                let mut buf = BytesMut::from(&wire.as_bytes()[..split.min(wire.len())]);
                let first = parse_response(&mut buf, &Method::POST).unwrap();
                let head = match first {
                    Some(head) => head,
                    None => {
                        buf.extend_from_slice(&wire.as_bytes()[split.min(wire.len())..]);
                        parse_response(&mut buf, &Method::POST).unwrap().expect("a whole head parses")
                    }
                };
                prop_assert_eq!(head.response.status().as_u16(), status);
                prop_assert!(buf.is_empty());
            }

            #[test]
            fn garbage_heads_are_refused_or_incomplete_never_a_panic(wire in prop::collection::vec(any::<u8>(), 0..1024)) {
                let mut buf = BytesMut::from(&wire[..]);
                let _ = parse_response(&mut buf, &Method::GET);
            }
        }
    }
}
