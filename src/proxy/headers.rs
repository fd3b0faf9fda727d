//! Header rewriting on the way up and down: hop-by-hop headers are stripped both
//! ways (a static list plus the names listed in `Connection`), the client's
//! credential and what belongs to it never leave sluice, the client's address
//! is added to `X-Forwarded-For` and `Forwarded`, and `x-request-id` travels
//! along.

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

/// Whether `name` is one of [`HOP_BY_HOP`] or `Upgrade`: a string match
/// (lengths first), cheaper than hashing each name for a removal.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Removes hop-by-hop headers, including every name listed in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, no removals.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
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

/// Client headers that belong to the client's own credential, not to the
/// upstream key sluice sends: an organisation or project the upstream key is
/// not in would make the provider refuse the key. (`Cookie`, the client's
/// session, is dropped too.)
const OPENAI_CLIENT_ONLY: [HeaderName; 2] =
    [HeaderName::from_static("openai-organization"), HeaderName::from_static("openai-project")];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Prepares client request headers for the upstream: hop-by-hop and `Host`
/// removed (the client sets it from the upstream URI), client credentials
/// and what belongs to them removed (each attempt adds the upstream's),
/// answers asked for uncompressed, request id set, and `Content-Length`
/// dropped when the body was rewritten (the new length comes from the body
/// itself).
pub fn to_upstream(headers: &mut HeaderMap, request_id: &HeaderValue, body_rewritten: bool) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(X_API_KEY);
    headers.remove(API_KEY);
    headers.remove(header::COOKIE);
    // One pass over the names instead of two hashed lookups on every request:
    // these are rare.
    if headers.keys().any(|name| name.as_str().starts_with("openai-")) {
        for name in &OPENAI_CLIENT_ONLY {
            headers.remove(name);
        }
    }
    if body_rewritten {
        headers.remove(header::CONTENT_LENGTH);
    }
    headers.remove(header::AUTHORIZATION);
    // Answers uncompressed: sluice reads them (`usage` for token budgets,
    // error codes that decide a key's health, cache entries), and a client
    // asking for gzip or br would otherwise hide all three, a token budget
    // included. LLM answers are small; the client link is sluice's.
    headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    headers.insert(REQUEST_ID, never_indexed(request_id));
}

/// Whether a client header may change the upstream's answer, and so keys a
/// cached answer (see [`answer_shaping`]): the providers' own request
/// headers (`openai-beta`, `anthropic-version`, `anthropic-beta`, ...; not
/// `openai-organization` or `openai-project`, which sluice does not send on),
/// and the names listed in `[cache] key_headers`. Only those: a header a
/// proxy or SDK adds with a new value each request (trace ids, request ids,
/// retry counts) would make every key unique.
#[inline]
pub fn shapes_answer(name: &HeaderName, listed: &[HeaderName]) -> bool {
    // Asked of every header of every cacheable request, a hit's too: the
    // first byte settles most names.
    let text = name.as_str();
    let provider = match text.as_bytes().first() {
        Some(b'o') => text.starts_with("openai-") && !OPENAI_CLIENT_ONLY.contains(name),
        Some(b'a') => text.starts_with("anthropic-"),
        _ => false,
    };
    provider || (!listed.is_empty() && listed.contains(name))
}

/// The client headers that may shape the upstream's answer (see
/// [`shapes_answer`]), sorted by name then value (the order a client sends
/// them in says nothing): part of a cached answer's key.
pub fn answer_shaping<'a>(headers: &'a HeaderMap, listed: &[HeaderName]) -> Vec<(&'a HeaderName, &'a HeaderValue)> {
    let mut shaping: Vec<_> = headers.iter().filter(|(name, _)| shapes_answer(name, listed)).collect();
    shaping.sort_by(|a, b| (a.0.as_str(), a.1.as_bytes()).cmp(&(b.0.as_str(), b.1.as_bytes())));
    shaping
}

/// `value` marked sensitive: HTTP/2's HPACK then never puts it in the
/// connection's table. A value that differs per request (the request id) or
/// per client (its address) would otherwise push the headers every request
/// repeats out of the table, and each would be encoded whole again. No effect
/// on HTTP/1.1.
fn never_indexed(value: &HeaderValue) -> HeaderValue {
    let mut value = value.clone();
    value.set_sensitive(true);
    value
}

/// Removes a client header named like the header an upstream takes its key
/// in, when [`to_upstream`] did not already (`auth_header = "x-goog-api-key"`):
/// a client's value must never travel beside sluice's key.
pub fn strip_credential(headers: &mut HeaderMap, auth_name: &HeaderName) {
    if ![header::AUTHORIZATION, X_API_KEY, API_KEY].contains(auth_name) {
        headers.remove(auth_name);
    }
}

/// Adds the client's address to `X-Forwarded-For` and `Forwarded`. What a
/// trusted proxy (`peer_trusted`) sent is kept and extended; what anyone else
/// sent is replaced, so a client cannot make up a chain. `own` are the two
/// values naming the peer alone (the connection's, made once).
pub fn forwarded(headers: &mut HeaderMap, own: &[HeaderValue; 2], peer_trusted: bool) {
    for (name, value) in [(X_FORWARDED_FOR, &own[0]), (header::FORWARDED, &own[1])] {
        let chain = if peer_trusted { headers.get(&name).and_then(|v| v.to_str().ok()) } else { None };
        let value = match chain.filter(|c| !c.trim().is_empty()) {
            Some(chain) => HeaderValue::from_str(&format!("{chain}, {}", value.to_str().unwrap_or_default())).ok(),
            None => Some(value.clone()),
        };
        if let Some(value) = value {
            headers.insert(name, never_indexed(&value));
        }
    }
}

/// The `X-Forwarded-For` and `Forwarded` values naming `peer` alone.
pub fn forwarded_values(peer: std::net::IpAddr) -> [HeaderValue; 2] {
    let node = match peer {
        std::net::IpAddr::V4(v4) => format!("for={v4}"),
        std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    };
    // An address and `for=` with it are always valid header values.
    let value = |text: String| HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("unknown"));
    [value(peer.to_string()), value(node)]
}

/// The client's address: the peer's, or, behind trusted proxies, the last
/// address in `X-Forwarded-For` that is not one of them.
pub fn client_ip(
    headers: &HeaderMap,
    peer: std::net::IpAddr,
    trusted: &dyn Fn(std::net::IpAddr) -> bool,
) -> std::net::IpAddr {
    if !trusted(peer) {
        return peer;
    }
    let chain = headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    let hops: Vec<std::net::IpAddr> = chain.filter_map(|hop| hop.trim().parse().ok()).collect();
    hops.into_iter().rev().find(|ip| !trusted(*ip)).unwrap_or(peer)
}

/// Prepares upstream response headers for the client.
pub fn to_client(headers: &mut HeaderMap, request_id: &HeaderValue) {
    strip_hop_by_hop(headers);
    headers.insert(REQUEST_ID, crate::ids::copy(request_id));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_chains_are_extended_only_from_trusted_proxies() {
        let mut from_client = HeaderMap::new();
        from_client.insert(X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        from_client.insert("openai-organization", HeaderValue::from_static("org-mine"));
        from_client.insert("cookie", HeaderValue::from_static("s=1"));
        forwarded(&mut from_client, &forwarded_values("203.0.113.7".parse().unwrap()), false);
        assert_eq!(from_client[&X_FORWARDED_FOR], "203.0.113.7", "a client cannot make up a chain");
        assert_eq!(from_client[header::FORWARDED], "for=203.0.113.7");
        to_upstream(&mut from_client, &HeaderValue::from_static("r"), false);
        assert!(!from_client.contains_key("openai-organization") && !from_client.contains_key("cookie"));
        // Per-request and per-client values stay out of HPACK's table.
        for name in [REQUEST_ID, X_FORWARDED_FOR, header::FORWARDED] {
            assert!(from_client[&name].is_sensitive(), "{name}");
        }

        let mut via_proxy = HeaderMap::new();
        via_proxy.insert(X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.9"));
        forwarded(&mut via_proxy, &forwarded_values("10.0.0.2".parse().unwrap()), true);
        assert_eq!(via_proxy[&X_FORWARDED_FOR], "198.51.100.9, 10.0.0.2");
        let trusted = |ip: std::net::IpAddr| ip.to_string().starts_with("10.");
        assert_eq!(client_ip(&via_proxy, "10.0.0.3".parse().unwrap(), &trusted).to_string(), "198.51.100.9");
        assert_eq!(client_ip(&via_proxy, "192.0.2.1".parse().unwrap(), &trusted).to_string(), "192.0.2.1");
    }

    #[test]
    fn the_quick_check_knows_every_hop_by_hop_name() {
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            assert!(is_hop_by_hop(name), "{name}");
        }
        assert!(!is_hop_by_hop(&header::CONTENT_TYPE));
    }

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
