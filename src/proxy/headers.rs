//! Header rewriting on the way up and down: hop-by-hop headers are stripped both
//! ways (a static list plus the names listed in `Connection`), the client's
//! credential never leaves sluice, and `x-request-id` travels along.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::access::auth::{API_KEY, X_API_KEY};
use crate::ids::REQUEST_ID;

/// Hop-by-hop headers (RFC 9110 §7.6.1 plus the legacy ones proxies still see).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including every name listed in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Names listed in Connection are hop-by-hop too; collect them before removing it.
    // Rare in practice, so the Vec is only built when Connection lists something.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Prepares client request headers for the upstream: hop-by-hop and `Host`
/// removed (the client sets it from the upstream URI), client credentials
/// removed (each attempt adds the upstream's), request id set, and
/// `Content-Length` dropped when the body was rewritten (the new length comes
/// from the body itself).
pub fn to_upstream(headers: &mut HeaderMap, request_id: &HeaderValue, body_rewritten: bool) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(X_API_KEY);
    headers.remove(API_KEY);
    if body_rewritten {
        headers.remove(header::CONTENT_LENGTH);
    }
    headers.remove(header::AUTHORIZATION);
    headers.insert(REQUEST_ID, request_id.clone());
}

/// Prepares upstream response headers for the client.
pub fn to_client(headers: &mut HeaderMap, request_id: &HeaderValue) {
    strip_hop_by_hop(headers);
    headers.insert(REQUEST_ID, request_id.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_static_and_connection_listed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-custom-hop"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-custom-hop", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn client_credentials_never_go_upstream() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer sk-client"));
        h.insert(X_API_KEY, HeaderValue::from_static("sk-client"));
        h.insert(API_KEY, HeaderValue::from_static("sk-client"));
        h.insert(header::HOST, HeaderValue::from_static("gateway"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        let id = HeaderValue::from_static("req-1");
        to_upstream(&mut h, &id, true);
        assert!(!h.contains_key(header::AUTHORIZATION));
        assert!(!h.contains_key(X_API_KEY) && !h.contains_key(API_KEY) && !h.contains_key(header::HOST));
        assert!(!h.contains_key(header::CONTENT_LENGTH));
        assert_eq!(h[REQUEST_ID], "req-1");
    }
}
