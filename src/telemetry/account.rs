//! Who a request is charged to. The request context holds the authenticated
//! client as an [`Account`] (implemented by the client table in
//! [`crate::access`]), so the end-of-response hook can count its usage
//! without this layer knowing about keys, stores or limits.

use std::sync::Arc;
use std::time::Duration;

/// How a charged request ended.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    /// The model as routed.
    pub model: Option<&'a Arc<str>>,
    /// Status sent to the client.
    pub status: u16,
    /// Whether it ended in an error (status 400 and above, or a broken answer).
    pub failed: bool,
    /// `(prompt, completion)` tokens from the answer's `usage`.
    pub tokens: Option<(u64, u64)>,
    /// Whether the answer came from the cache (its tokens cost nothing upstream).
    pub cached: bool,
}

/// An authenticated client.
pub trait Account: Send + Sync {
    /// How the request log and metrics name it (a key id, never the key).
    fn label(&self) -> &Arc<str>;
    /// Its user, if it has one.
    fn user(&self) -> Option<&Arc<str>>;
    /// Counts one finished request (usage, token budget).
    fn finished(&self, end: &Finished<'_>);
}

/// The values of the `x-ratelimit-*` headers of an answer to a limited key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    /// Requests: limit, remaining, reset.
    pub requests: Option<(u32, u32, Duration)>,
    /// Tokens: limit, remaining, reset.
    pub tokens: Option<(u64, u64, Duration)>,
}
