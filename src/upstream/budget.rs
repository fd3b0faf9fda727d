//! The retry budget of one upstream: retries (attempts after a request's
//! first) may add at most a share of the first attempts of the last 10 s,
//! plus a small floor, so an outage does not multiply the upstream's load by
//! `max_attempts`. Ten one-second slots of atomic counters; counts are
//! approximate under races (a budget, not a limit).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Seconds of history.
const SLOTS: u64 = 10;
/// Retries allowed in any 10 s whatever the traffic (a lone client's retry
/// must not find the budget empty).
pub const MIN_RETRIES: u64 = 10;

/// Counts of first attempts and retries per second.
#[derive(Debug, Default)]
pub struct RetryBudget {
    /// Per slot: second (32 bits) | first attempts (16) | retries (16).
    slots: [AtomicU64; SLOTS as usize],
    /// Retries refused for want of budget.
    pub refused: AtomicU64,
}

fn unpack(word: u64) -> (u64, u64, u64) {
    (word >> 32, (word >> 16) & 0xffff, word & 0xffff)
}

impl RetryBudget {
    fn add(&self, now_ms: u64, firsts: u64, retries: u64) {
        let second = (now_ms / 1000) & 0xffff_ffff;
        let slot = &self.slots[(second % SLOTS) as usize];
        let _ = slot.fetch_update(Relaxed, Relaxed, |word| {
            let (at, f, r) = unpack(word);
            let (f, r) = if at == second { (f, r) } else { (0, 0) };
            Some((second << 32) | ((f + firsts).min(0xffff) << 16) | (r + retries).min(0xffff))
        });
    }

    fn window(&self, now_ms: u64) -> (u64, u64) {
        let second = (now_ms / 1000) & 0xffff_ffff;
        self.slots
            .iter()
            .map(|slot| unpack(slot.load(Relaxed)))
            .filter(|(at, ..)| second.wrapping_sub(*at) < SLOTS)
            .fold((0, 0), |(f, r), (_, firsts, retries)| (f + firsts, r + retries))
    }

    /// Counts a request's first attempt.
    pub fn first_attempt(&self, now_ms: u64) {
        self.add(now_ms, 1, 0);
    }

    /// Whether one more retry fits in `ratio` of the recent first attempts
    /// (plus the floor); counts it when it does. A `ratio` of 0 means no budget.
    pub fn try_retry(&self, ratio: f64, now_ms: u64) -> bool {
        if ratio <= 0.0 {
            return true;
        }
        let (firsts, retries) = self.window(now_ms);
        let allowed = MIN_RETRIES + (ratio * firsts as f64) as u64;
        if retries >= allowed {
            self.refused.fetch_add(1, Relaxed);
            return false;
        }
        self.add(now_ms, 0, 1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_follow_first_attempts() {
        let budget = RetryBudget::default();
        let t = 5_000_000;
        for _ in 0..100 {
            budget.first_attempt(t);
        }
        let allowed = (0..1000).filter(|_| budget.try_retry(0.2, t)).count();
        assert_eq!(allowed as u64, MIN_RETRIES + 20);
        assert_eq!(budget.refused.load(Relaxed), 1000 - allowed as u64);
        // Ten seconds on, the old attempts no longer count.
        assert_eq!((0..100).filter(|_| budget.try_retry(0.2, t + 10_000)).count() as u64, MIN_RETRIES);
        assert!(budget.try_retry(0.0, t), "a ratio of 0 is no budget at all");
    }
}
