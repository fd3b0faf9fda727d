//! Client authentication: the key is read from `Authorization: Bearer`,
//! `X-API-Key`, `api-key` or `?api_key=`, and compared in constant time.

use http::HeaderMap;
use http::header::AUTHORIZATION;

use http::HeaderName;

use crate::config::AuthConfig;
use crate::config::keys::Secret;
use crate::error::ProxyError;

/// Client credential header besides `Authorization` (Anthropic-style).
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Azure-style client credential header.
pub const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// Which configured client key a request presented (its index in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientId(pub usize);

/// The accepted client keys of a snapshot.
#[derive(Debug)]
pub struct ClientKeys {
    require: bool,
    keys: Vec<Secret<Box<[u8]>>>,
    /// How the request log names each key (`config:N`), made once.
    labels: Vec<std::sync::Arc<str>>,
    exempt: Vec<Box<str>>,
}

impl ClientKeys {
    /// Builds the key set from `[auth]`.
    pub fn new(config: &AuthConfig) -> Self {
        Self {
            require: config.require_api_key,
            keys: config.keys.iter().map(|k| Secret::new(k.expose().as_bytes().into())).collect(),
            labels: (0..config.keys.len()).map(|i| std::sync::Arc::from(format!("config:{i}"))).collect(),
            exempt: config.exempt.iter().map(|p| p.as_str().into()).collect(),
        }
    }

    /// The name the request log gives a key.
    pub fn label(&self, id: ClientId) -> Option<&std::sync::Arc<str>> {
        self.labels.get(id.0)
    }

    /// Whether `path` is served without a key.
    pub fn is_exempt(&self, path: &str) -> bool {
        !self.require || self.exempt.iter().any(|p| p.as_ref() == path)
    }

    /// Checks the request's key. `Ok(None)` means no key was needed and none matched.
    pub fn authenticate(
        &self,
        path: &str,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Option<ClientId>, ProxyError> {
        let presented = presented_key(headers, query);
        let found = presented.and_then(|key| self.find(key));
        match (found, presented) {
            (Some(id), _) => Ok(Some(id)),
            _ if self.is_exempt(path) => Ok(None),
            (None, None) => Err(ProxyError::MissingApiKey),
            (None, Some(_)) => Err(ProxyError::InvalidApiKey),
        }
    }

    /// Compares against every key without stopping early, so the time taken does
    /// not tell which key (or how much of one) matched.
    fn find(&self, presented: &[u8]) -> Option<ClientId> {
        let mut found = None;
        for (i, key) in self.keys.iter().enumerate() {
            if constant_time_eq(key.expose(), presented) && found.is_none() {
                found = Some(ClientId(i));
            }
        }
        found
    }
}

/// The client key from the first place that has one.
fn presented_key<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a [u8]> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let bytes = value.as_bytes();
        if bytes.len() > 7 && bytes[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(bytes[7..].trim_ascii());
        }
    }
    for name in [X_API_KEY, API_KEY] {
        if let Some(value) = headers.get(name) {
            return Some(value.as_bytes().trim_ascii());
        }
    }
    query?.split('&').find_map(|pair| pair.strip_prefix("api_key=")).map(str::as_bytes)
}

/// Equality whose running time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn keys(require: bool) -> ClientKeys {
        ClientKeys::new(&AuthConfig {
            require_api_key: require,
            keys: vec![Secret::new("sk-a".into()), Secret::new("sk-b".into())],
            exempt: vec!["/health".into()],
        })
    }

    fn with(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn every_place_a_key_can_be() {
        let k = keys(true);
        assert_eq!(k.authenticate("/v1/x", &with("authorization", "Bearer sk-b"), None).unwrap(), Some(ClientId(1)));
        assert_eq!(k.authenticate("/v1/x", &with("authorization", "bearer sk-a"), None).unwrap(), Some(ClientId(0)));
        assert_eq!(k.authenticate("/v1/x", &with("x-api-key", "sk-a"), None).unwrap(), Some(ClientId(0)));
        assert_eq!(k.authenticate("/v1/x", &with("api-key", "sk-b"), None).unwrap(), Some(ClientId(1)));
        assert_eq!(k.authenticate("/v1/x", &HeaderMap::new(), Some("x=1&api_key=sk-b")).unwrap(), Some(ClientId(1)));
    }

    #[test]
    fn missing_and_wrong_keys() {
        let k = keys(true);
        assert!(matches!(k.authenticate("/v1/x", &HeaderMap::new(), None), Err(ProxyError::MissingApiKey)));
        assert!(matches!(
            k.authenticate("/v1/x", &with("authorization", "Bearer sk-c"), None),
            Err(ProxyError::InvalidApiKey)
        ));
        assert!(matches!(
            k.authenticate("/v1/x", &with("authorization", "Basic abc"), None),
            Err(ProxyError::MissingApiKey)
        ));
        assert_eq!(k.authenticate("/health", &HeaderMap::new(), None).unwrap(), None);
    }

    #[test]
    fn open_gateway_needs_no_key() {
        assert_eq!(keys(false).authenticate("/v1/x", &HeaderMap::new(), None).unwrap(), None);
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
