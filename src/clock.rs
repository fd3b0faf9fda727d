//! A process-wide monotonic clock in milliseconds, so deadlines fit in an
//! `AtomicU64` (key cooldowns, breaker open times).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Milliseconds since the first call in this process (never 0 after that first call,
/// so 0 can mean "no deadline").
pub fn now_ms() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    epoch.elapsed().as_millis() as u64 + 1
}

/// `now_ms() + d`, saturating.
pub fn after(d: Duration) -> u64 {
    now_ms().saturating_add(d.as_millis() as u64)
}
