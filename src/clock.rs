//! A process-wide monotonic clock in milliseconds, so deadlines fit in an
//! `AtomicU64` (key cooldowns, breaker open times).
//!
//! It reads tokio's clock (`tokio::time::Instant`), so a test that pauses and
//! advances time moves cooldowns, backoffs and breakers with it; outside a
//! paused runtime it is the plain monotonic clock.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// The instant clock time 0 stands for. It lies up to an hour before the first
/// call, so a paused test runtime created shortly before that call (its clock
/// starts at the moment it was built) never reads a time before the epoch.
fn epoch() -> Instant {
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        [3600, 60, 1].into_iter().find_map(|secs| now.checked_sub(Duration::from_secs(secs))).unwrap_or(now)
    })
}

/// Milliseconds on the process clock (never 0, so 0 can mean "no deadline").
pub fn now_ms() -> u64 {
    let epoch = epoch();
    tokio::time::Instant::now().into_std().saturating_duration_since(epoch).as_millis() as u64 + 1
}

/// Wall-clock milliseconds since the Unix epoch: for what other processes
/// read (stored times, shared state), never for deadlines.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `now_ms() + d`, saturating.
pub fn after(d: Duration) -> u64 {
    now_ms().saturating_add(d.as_millis() as u64)
}

/// The latest of the clock times noted into it (0: none yet), shared across
/// threads: when something last happened (an upstream's or a target's last
/// successful answer). Noting is a load, and a store at most once a
/// millisecond; racing threads never move it back.
#[derive(Debug, Default)]
pub struct Latest(AtomicU64);

impl Latest {
    /// It happened at clock time `now`.
    pub fn note(&self, now: u64) {
        if self.0.load(Relaxed) < now {
            self.0.fetch_max(now, Relaxed);
        }
    }

    /// Whether it happened after clock time `since` (the same millisecond
    /// proves nothing).
    pub fn after(&self, since: u64) -> bool {
        self.0.load(Relaxed) > since
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_moves_only_forward() {
        let latest = Latest::default();
        assert!(!latest.after(0), "nothing noted yet");
        latest.note(10);
        assert!(latest.after(9));
        assert!(!latest.after(10), "the same millisecond proves nothing");
        latest.note(5);
        assert!(latest.after(9), "an older time never moves it back");
        // Two threads noting at once: the later time wins.
        std::thread::scope(|scope| {
            for now in [20, 30] {
                let latest = &latest;
                scope.spawn(move || latest.note(now));
            }
        });
        assert!(latest.after(29));
    }

    #[tokio::test(start_paused = true)]
    async fn follows_a_paused_tokio_clock() {
        let before = now_ms();
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(now_ms() - before, 90_000);
        assert!(after(Duration::from_millis(5)) >= now_ms() + 5);
    }
}
