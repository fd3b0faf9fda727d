//! The upstream key ring: keys of one upstream with their health, chosen lock-free.
//!
//! The ring is immutable and lives in the snapshot; each key's health and
//! counters are atomics, shared with the next snapshot when a reload keeps the
//! key. A key is healthy, cooling until a deadline (429; a new 429 extends,
//! never shortens it; it comes back by itself), or disabled (401/402/403) until
//! a reset or a reload that drops it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering::Relaxed};

use http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::clock::now_ms;
use crate::config::Strategy;
use crate::config::keys::{Secret, fingerprint};

/// Why an attempt on a key failed, for counters and `last_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Failure {
    /// 429.
    RateLimited = 1,
    /// 401, 402 or 403.
    Rejected = 2,
    /// 5xx.
    ServerError = 3,
    /// Connect error or reset before headers.
    Connect = 4,
    /// No headers in time.
    Timeout = 5,
}

impl Failure {
    /// Stable label.
    pub fn label(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::Rejected => "rejected",
            Self::ServerError => "server_error",
            Self::Connect => "connect_error",
            Self::Timeout => "timeout",
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        [Self::RateLimited, Self::Rejected, Self::ServerError, Self::Connect, Self::Timeout]
            .into_iter()
            .find(|f| *f as u8 == code)
    }
}

/// Error codes by which providers say that the *key* is bad (revoked, wrong,
/// account closed), as opposed to the request: OpenAI (`invalid_api_key`,
/// `account_deactivated`), OpenAI-compatible vendors and Azure
/// (`invalid_authentication`, `invalid_api_key`, `401`), Anthropic
/// (`authentication_error`, as its error `type`).
pub const KEY_ERROR_CODES: [&str; 4] =
    ["invalid_api_key", "account_deactivated", "invalid_authentication", "authentication_error"];

/// The `error` object of a provider's answer, as far as key health reads it.
/// Fields are kept as any JSON value: a vendor's numeric `code` must not hide
/// the `message` beside it (read on error answers only).
#[derive(serde::Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: serde_json::Value,
    #[serde(default, rename = "type")]
    kind: serde_json::Value,
    #[serde(default)]
    message: serde_json::Value,
}

/// `answer`'s `error` object, if it is JSON with one.
fn error_detail(answer: &[u8]) -> Option<ErrorDetail> {
    #[derive(serde::Deserialize)]
    struct Answer {
        error: Option<ErrorDetail>,
    }
    serde_json::from_slice::<Answer>(answer).ok()?.error
}

/// Whether a 401/402/403 answer says the key itself is bad: its
/// `error.code` (or `error.type`) is one of [`KEY_ERROR_CODES`]. Anything else
/// (no JSON, another code) is taken as a refusal of the request, which must
/// not disable a key that every other client shares.
pub fn blames_the_key(answer: &[u8]) -> bool {
    let Some(detail) = error_detail(answer) else { return false };
    [&detail.code, &detail.kind].into_iter().filter_map(|v| v.as_str()).any(|code| KEY_ERROR_CODES.contains(&code))
}

/// Whether a 429 answer says the *request* is over the limit by itself, not
/// that the key has used its share: OpenAI (and vendors that copy its
/// wording) answer a request asking for more tokens than the account's
/// per-minute limit with 429, `type: "tokens"` and a message beginning
/// "Request too large". Waiting does not help it, and cooling the key for it
/// would let one client's oversized requests rest every key all clients share.
pub fn blames_the_request(answer: &[u8]) -> bool {
    const TOO_LARGE: &str = "request too large";
    let Some(detail) = error_detail(answer) else { return false };
    let message = detail.message.as_str().unwrap_or_default();
    message.get(..TOO_LARGE.len()).is_some_and(|head| head.eq_ignore_ascii_case(TOO_LARGE))
}

/// A key's health at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Usable.
    Healthy,
    /// Rate-limited until this clock time (ms, see [`crate::clock`]).
    Cooling {
        /// Clock time the key comes back.
        until_ms: u64,
    },
    /// Refused by the upstream; back only after a reset or reload.
    Disabled,
}

/// Per-key counters.
#[derive(Debug, Default)]
pub struct KeyCounters {
    /// Attempts made with this key.
    pub requests: AtomicU64,
    /// Attempts answered with a usable response.
    pub successes: AtomicU64,
    /// 429 answers.
    pub rate_limited: AtomicU64,
    /// 401/402/403 answers.
    pub rejected: AtomicU64,
    /// 5xx answers.
    pub server_errors: AtomicU64,
    /// Connect errors and resets.
    pub connect_errors: AtomicU64,
    /// Header timeouts.
    pub timeouts: AtomicU64,
    /// Responses on this key not yet finished.
    pub in_flight: AtomicU64,
}

/// One upstream key with its ready-made auth header, health and counters.
#[derive(Debug)]
pub struct UpstreamKey {
    secret: Secret<String>,
    /// `Bearer <key>`, marked sensitive so HPACK never indexes it.
    auth_header: HeaderValue,
    /// Safe name for logs and `/health`; shared with request-log lines.
    pub fingerprint: Arc<str>,
    /// How instances sharing Redis name this key to each other: the first
    /// 16 bytes of its SHA-256, in hex (one-way, unlike the key; unique,
    /// unlike the 32-bit fingerprint).
    pub shared_id: Arc<str>,
    /// Counters.
    pub counters: KeyCounters,
    disabled: AtomicBool,
    /// Clock ms until which the key cools; 0 = not cooling.
    cooling_until: AtomicU64,
    last_error: AtomicU8,
    /// A background check of the key is running.
    checking: AtomicBool,
    /// Clock ms of the last check's start; 0 = never checked.
    checked_at: AtomicU64,
}

impl UpstreamKey {
    /// Builds a key sent as `Bearer <key>`; `None` if it cannot be a header
    /// value (the config rejects those).
    pub fn new(secret: Secret<String>) -> Option<Self> {
        Self::with_template(secret, "Bearer {key}")
    }

    /// Builds a key sent as `template` with `{key}` replaced by it.
    pub fn with_template(secret: Secret<String>, template: &str) -> Option<Self> {
        let mut auth_header = HeaderValue::from_str(&template.replace("{key}", secret.expose())).ok()?;
        auth_header.set_sensitive(true);
        Some(Self {
            fingerprint: Arc::from(fingerprint(secret.expose())),
            shared_id: Arc::from(hex::encode(&Sha256::digest(secret.expose().as_bytes())[..16])),
            secret,
            auth_header,
            counters: KeyCounters::default(),
            disabled: AtomicBool::new(false),
            cooling_until: AtomicU64::new(0),
            last_error: AtomicU8::new(0),
            checking: AtomicBool::new(false),
            checked_at: AtomicU64::new(0),
        })
    }

    /// The value this key is sent as (a cheap clone of shared bytes).
    pub fn auth_header(&self) -> HeaderValue {
        self.auth_header.clone()
    }

    /// Whether this key is sent as `template` makes of it (a reload that
    /// changes the template gets new keys).
    pub fn sent_as(&self, template: &str) -> bool {
        self.auth_header.as_bytes() == template.replace("{key}", self.secret.expose()).as_bytes()
    }

    /// Whether this key holds `other` (used to carry state over reloads).
    pub fn same_secret(&self, other: &Secret<String>) -> bool {
        self.secret == *other
    }

    /// The key's state at clock time `now`.
    pub fn state(&self, now: u64) -> KeyState {
        if self.disabled.load(Relaxed) {
            return KeyState::Disabled;
        }
        match self.cooling_until.load(Relaxed) {
            until if until > now => KeyState::Cooling { until_ms: until },
            _ => KeyState::Healthy,
        }
    }

    /// Usable at clock time `now`.
    pub fn is_usable(&self, now: u64) -> bool {
        self.state(now) == KeyState::Healthy
    }

    /// Cools the key until `until_ms`; an earlier deadline never shortens a later one.
    pub fn cool_until(&self, until_ms: u64) {
        self.cooling_until.fetch_max(until_ms, Relaxed);
        self.fail(Failure::RateLimited);
    }

    /// Cools the key until `until_ms` without counting a failure: it said it
    /// has nothing left (steering before the 429), it did not fail.
    pub fn rest_until(&self, until_ms: u64) {
        self.cooling_until.fetch_max(until_ms, Relaxed);
    }

    /// Disables the key until a reset.
    pub fn disable(&self) {
        self.disabled.store(true, Relaxed);
        self.fail(Failure::Rejected);
    }

    /// Disables the key because another instance saw it refused (counted there).
    pub fn mark_disabled(&self) {
        self.disabled.store(true, Relaxed);
    }

    /// Counts a failure that leaves the key's health as it is (5xx, connect, timeout).
    pub fn fail(&self, failure: Failure) {
        let counter = match failure {
            Failure::RateLimited => &self.counters.rate_limited,
            Failure::Rejected => &self.counters.rejected,
            Failure::ServerError => &self.counters.server_errors,
            Failure::Connect => &self.counters.connect_errors,
            Failure::Timeout => &self.counters.timeouts,
        };
        counter.fetch_add(1, Relaxed);
        self.last_error.store(failure as u8, Relaxed);
    }

    /// Claims the right to check the key at clock time `now`: false while a
    /// check runs or if the last one began less than `gap` ago.
    pub fn begin_check(&self, now: u64, gap: std::time::Duration) -> bool {
        let last = self.checked_at.load(Relaxed);
        if last != 0 && now.saturating_sub(last) < gap.as_millis() as u64 {
            return false;
        }
        if self.checking.swap(true, Relaxed) {
            return false;
        }
        self.checked_at.store(now, Relaxed);
        true
    }

    /// Ends a check begun with [`Self::begin_check`].
    pub fn end_check(&self) {
        self.checking.store(false, Relaxed);
    }

    /// Counts a usable response.
    pub fn succeed(&self) {
        self.counters.successes.fetch_add(1, Relaxed);
    }

    /// The last failure seen on this key.
    pub fn last_error(&self) -> Option<Failure> {
        Failure::from_code(self.last_error.load(Relaxed))
    }

    /// Clears cooling and disabled; true if the key was not healthy.
    pub fn reset(&self) -> bool {
        let was_disabled = self.disabled.swap(false, Relaxed);
        let was_cooling = self.cooling_until.swap(0, Relaxed) > now_ms();
        was_disabled || was_cooling
    }
}

/// A key in use by one request: counts as in flight until dropped (when the
/// response body ends).
#[derive(Debug)]
pub struct KeyLease {
    key: Arc<UpstreamKey>,
    index: usize,
}

impl KeyLease {
    /// The leased key.
    pub fn key(&self) -> &UpstreamKey {
        &self.key
    }

    /// The leased key, to keep past the lease.
    pub fn shared(&self) -> &Arc<UpstreamKey> {
        &self.key
    }

    /// Its position in the ring.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        self.key.counters.in_flight.fetch_sub(1, Relaxed);
    }
}

/// The keys of one upstream and the rotation cursor.
#[derive(Debug)]
pub struct KeyRing {
    keys: Box<[Arc<UpstreamKey>]>,
    cursor: AtomicUsize,
}

impl KeyRing {
    /// A ring over these keys.
    pub fn new(keys: Vec<Arc<UpstreamKey>>) -> Self {
        Self { keys: keys.into_boxed_slice(), cursor: AtomicUsize::new(0) }
    }

    /// All keys, in config order.
    pub fn keys(&self) -> &[Arc<UpstreamKey>] {
        &self.keys
    }

    /// Picks a usable key that `allowed` admits, and leases it. Round-robin takes
    /// the next usable key after the cursor (an unusable key never stalls the
    /// rotation); least-in-flight takes the usable key with the fewest open
    /// requests, ties broken from the cursor so load still spreads.
    pub fn pick(&self, strategy: Strategy, now: u64, allowed: impl Fn(usize) -> bool) -> Option<KeyLease> {
        let n = self.keys.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Relaxed);
        let candidates =
            (0..n).map(|offset| (start + offset) % n).filter(|&i| allowed(i) && self.keys[i].is_usable(now));
        let index = match strategy {
            Strategy::RoundRobin => candidates.into_iter().next(),
            Strategy::LeastInFlight => candidates.min_by_key(|&i| self.keys[i].counters.in_flight.load(Relaxed)),
        }?;
        let key = Arc::clone(&self.keys[index]);
        key.counters.requests.fetch_add(1, Relaxed);
        key.counters.in_flight.fetch_add(1, Relaxed);
        Some(KeyLease { key, index })
    }

    /// Whether any key is usable now.
    pub fn any_usable(&self, now: u64) -> bool {
        self.keys.iter().any(|k| k.is_usable(now))
    }

    /// The earliest clock time a cooling key comes back, if any key is cooling
    /// (disabled keys never come back by themselves).
    pub fn earliest_ready(&self, now: u64) -> Option<u64> {
        self.keys
            .iter()
            .filter_map(|k| match k.state(now) {
                KeyState::Cooling { until_ms } => Some(until_ms),
                KeyState::Healthy | KeyState::Disabled => None,
            })
            .min()
    }

    /// Clears cooling and disabled on every key; returns how many were failed.
    pub fn reset(&self) -> usize {
        self.keys.iter().filter(|k| k.reset()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize) -> KeyRing {
        KeyRing::new((0..n).map(|i| Arc::new(UpstreamKey::new(Secret::new(format!("sk-{i}"))).unwrap())).collect())
    }

    fn pick(ring: &KeyRing, now: u64) -> Option<usize> {
        ring.pick(Strategy::RoundRobin, now, |_| true).map(|l| l.index())
    }

    #[test]
    fn round_robin_visits_every_key_evenly() {
        let ring = ring(3);
        let picks: Vec<usize> = (0..6).map(|_| pick(&ring, 1).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        for key in ring.keys() {
            assert_eq!(key.counters.requests.load(Relaxed), 2);
            assert_eq!(key.counters.in_flight.load(Relaxed), 0, "lease drop ends in-flight");
        }
    }

    #[test]
    fn unusable_keys_are_skipped_not_starving_rotation() {
        let ring = ring(3);
        ring.keys()[1].cool_until(1_000);
        let picks: Vec<usize> = (0..4).map(|_| pick(&ring, 10).unwrap()).collect();
        assert!(!picks.contains(&1));
        assert!(picks.contains(&0) && picks.contains(&2));
        // Cooling ends by itself.
        assert_eq!(ring.keys()[1].state(1_000), KeyState::Healthy);
        assert!((0..3).any(|_| pick(&ring, 1_001) == Some(1)));
    }

    #[test]
    fn cooldown_extends_never_shortens() {
        let ring = ring(1);
        let key = &ring.keys()[0];
        key.cool_until(5_000);
        key.cool_until(2_000);
        assert_eq!(key.state(10), KeyState::Cooling { until_ms: 5_000 });
        key.cool_until(9_000);
        assert_eq!(key.state(10), KeyState::Cooling { until_ms: 9_000 });
        assert_eq!(key.counters.rate_limited.load(Relaxed), 3);
        assert_eq!(key.last_error(), Some(Failure::RateLimited));
    }

    #[test]
    fn disabled_until_reset_and_earliest_ready() {
        let ring = ring(3);
        // `reset` reads the process clock: cooldowns are set relative to it.
        let now = now_ms();
        ring.keys()[0].disable();
        ring.keys()[1].cool_until(now + 70_000);
        ring.keys()[2].cool_until(now + 40_000);
        assert_eq!(pick(&ring, now), None);
        assert!(!ring.any_usable(now));
        assert_eq!(ring.earliest_ready(now), Some(now + 40_000));
        assert_eq!(ring.keys()[0].state(now + 10_000_000), KeyState::Disabled, "disabled never expires");
        assert_eq!(ring.reset(), 3);
        assert!(ring.keys().iter().all(|k| k.is_usable(now)));
    }

    #[test]
    fn allowed_filter_and_least_in_flight() {
        let ring = ring(3);
        assert_eq!(ring.pick(Strategy::RoundRobin, 1, |i| i == 2).map(|l| l.index()), Some(2));
        let busy0 = ring.pick(Strategy::RoundRobin, 1, |i| i == 0).unwrap();
        let busy1 = ring.pick(Strategy::RoundRobin, 1, |i| i == 1).unwrap();
        let idle = ring.pick(Strategy::LeastInFlight, 1, |_| true).unwrap();
        assert_eq!(idle.index(), 2);
        drop((busy0, busy1, idle));
    }

    #[test]
    fn one_key_check_at_a_time_and_not_too_often() {
        let key = UpstreamKey::new(Secret::new("sk".into())).unwrap();
        let gap = std::time::Duration::from_secs(10);
        assert!(key.begin_check(1_000, gap));
        assert!(!key.begin_check(50_000, gap), "one at a time");
        key.end_check();
        assert!(!key.begin_check(5_000, gap), "too soon after the last");
        assert!(key.begin_check(11_000, gap));
    }

    #[test]
    fn only_key_error_codes_blame_the_key() {
        let openai = br#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        assert!(blames_the_key(openai));
        assert!(blames_the_key(
            br#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#
        ));
        assert!(!blames_the_key(
            br#"{"error":{"message":"You are not allowed to use model x","code":"model_not_allowed"}}"#
        ));
        assert!(!blames_the_key(br#"{"error":{"message":"org mismatch","type":"invalid_request_error","code":null}}"#));
        assert!(!blames_the_key(b"Forbidden"));
        assert!(!blames_the_key(b""));
    }

    #[test]
    fn only_a_request_over_the_limit_by_itself_blames_the_request() {
        let too_large = br#"{"error":{"message":"Request too large for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Requested 50000. The input or output tokens must be reduced in order to run successfully.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
        assert!(blames_the_request(too_large));
        assert!(blames_the_request(br#"{"error":{"message":"request too large for model m"}}"#));
        assert!(blames_the_request(br#"{"error":{"code":429,"message":"Request too large for m"}}"#), "a numeric code");
        // The key's (or account's) share used up: cool the key.
        assert!(!blames_the_request(
            br#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-x on requests per min (RPM): Limit 3, Used 3, Requested 1.","type":"requests","code":"rate_limit_exceeded"}}"#
        ));
        assert!(!blames_the_request(
            br#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","code":"insufficient_quota"}}"#
        ));
        assert!(!blames_the_request(br#"{"error":{"message":"Request"}}"#));
        assert!(!blames_the_request(br#"{"error":{"type":"tokens"}}"#));
        assert!(!blames_the_request(b"Request too large"), "not JSON: not understood, so the usual cooldown");
        assert!(!blames_the_request(b""));
    }

    #[test]
    fn auth_header_is_sensitive_and_debug_hides_key() {
        let key = UpstreamKey::new(Secret::new("sk-secret-value".into())).unwrap();
        assert!(key.auth_header().is_sensitive());
        assert!(!format!("{key:?}").contains("sk-secret-value"));
    }
}
