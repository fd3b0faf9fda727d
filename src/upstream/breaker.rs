//! The circuit breaker of one upstream. It counts *requests* that exhausted their
//! attempts on upstream failures (connect, timeout, 5xx), not single attempts, so
//! an upstream that still answers most requests (with retries) never trips it.
//! Open: requests fail fast without touching the network. After the cooldown one
//! probe request goes through (half-open); its outcome closes or re-opens it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::clock::Latest;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;
/// `opened_at` value meaning "the cooldown is spent, probe now" (the clock never reads 0).
const PROBE_AT_ONCE: u64 = 0;

/// Breaker state, for `/health` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests fail fast.
    Open,
    /// One probe is in flight.
    HalfOpen,
}

impl BreakerState {
    /// Stable label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// One upstream's breaker.
#[derive(Debug)]
pub struct Breaker {
    failures_to_open: u32,
    cooldown_ms: u64,
    state: AtomicU8,
    consecutive: AtomicU32,
    opened_at: AtomicU64,
    /// When the upstream last answered any request successfully: then it
    /// is up, whatever became of a request sent before.
    pub answered: Latest,
}

/// What the breaker says about a new request.
#[derive(Debug)]
pub enum Admission {
    /// Go ahead.
    Allowed,
    /// Go ahead as the half-open probe; report the outcome through the guard.
    Probe(ProbeGuard),
    /// Fail fast; the breaker may let a probe through in this many ms.
    Rejected {
        /// Milliseconds until a probe may go.
        retry_after_ms: u64,
    },
}

/// Held by the probe request. Dropped without an outcome (the client left), it
/// re-opens the breaker with its cooldown already spent, so the next request probes.
#[derive(Debug)]
pub struct ProbeGuard {
    breaker: Arc<Breaker>,
    resolved: bool,
}

impl ProbeGuard {
    /// Marks the probe as reported (the caller recorded success or failure).
    pub fn resolve(mut self) {
        self.resolved = true;
    }
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if !self.resolved {
            // Back to open only from half-open: a request admitted before the
            // breaker opened may have closed it meanwhile, and stays believed.
            let b = &self.breaker;
            b.opened_at.store(PROBE_AT_ONCE, Relaxed);
            let _ = b.state.compare_exchange(HALF_OPEN, OPEN, Relaxed, Relaxed);
        }
    }
}

impl Breaker {
    /// A closed breaker.
    pub fn new(failures_to_open: u32, cooldown: Duration) -> Self {
        Self {
            failures_to_open: failures_to_open.max(1),
            cooldown_ms: cooldown.as_millis() as u64,
            state: AtomicU8::new(CLOSED),
            consecutive: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            answered: Latest::default(),
        }
    }

    /// Whether this breaker was built with these settings (a reload keeps it then).
    pub fn same_settings(&self, failures_to_open: u32, cooldown: Duration) -> bool {
        self.failures_to_open == failures_to_open.max(1) && self.cooldown_ms == cooldown.as_millis() as u64
    }

    /// The state now.
    pub fn state(&self) -> BreakerState {
        match self.state.load(Relaxed) {
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// Admits or rejects a request at clock time `now`.
    pub fn admit(self: &Arc<Self>, now: u64) -> Admission {
        match self.state.load(Relaxed) {
            CLOSED => Admission::Allowed,
            OPEN => {
                let ready_at = match self.opened_at.load(Relaxed) {
                    PROBE_AT_ONCE => 0,
                    opened_at => opened_at.saturating_add(self.cooldown_ms),
                };
                if now >= ready_at && self.state.compare_exchange(OPEN, HALF_OPEN, Relaxed, Relaxed).is_ok() {
                    Admission::Probe(ProbeGuard { breaker: Arc::clone(self), resolved: false })
                } else {
                    Admission::Rejected { retry_after_ms: ready_at.saturating_sub(now).max(1) }
                }
            }
            _ => Admission::Rejected { retry_after_ms: self.cooldown_ms.max(1) },
        }
    }

    /// A request got a real answer from the upstream: close.
    pub fn record_success(&self) {
        self.consecutive.store(0, Relaxed);
        self.state.store(CLOSED, Relaxed);
    }

    /// A request exhausted its attempts on upstream failures.
    pub fn record_failure(&self, now: u64) {
        let failures = self.consecutive.fetch_add(1, Relaxed) + 1;
        let state = self.state.load(Relaxed);
        if state == HALF_OPEN || failures >= self.failures_to_open {
            if state != OPEN {
                tracing::warn!(failures, "circuit breaker opened");
            }
            self.opened_at.store(now, Relaxed);
            self.state.store(OPEN, Relaxed);
        }
    }

    /// Closes the breaker by hand (admin reset).
    pub fn reset(&self) {
        self.record_success();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Arc<Breaker> {
        Arc::new(Breaker::new(3, Duration::from_millis(100)))
    }

    #[test]
    fn opens_after_consecutive_failed_requests_only() {
        let b = breaker();
        b.record_failure(1);
        b.record_failure(2);
        b.record_success();
        b.record_failure(3);
        b.record_failure(4);
        assert_eq!(b.state(), BreakerState::Closed, "a success in between resets the count");
        b.record_failure(5);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.admit(50), Admission::Rejected { retry_after_ms: 55 }));
    }

    #[test]
    fn one_probe_after_cooldown_then_close_or_reopen() {
        let b = breaker();
        (0..3).for_each(|_| b.record_failure(10));
        let Admission::Probe(probe) = b.admit(110) else { panic!("expected a probe") };
        assert!(matches!(b.admit(111), Admission::Rejected { .. }), "only one probe at a time");
        b.record_failure(120);
        probe.resolve();
        assert_eq!(b.state(), BreakerState::Open, "a failed probe re-opens");
        let Admission::Probe(probe) = b.admit(220) else { panic!("expected a probe") };
        b.record_success();
        probe.resolve();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(matches!(b.admit(221), Admission::Allowed));
    }

    #[test]
    fn abandoned_probe_lets_the_next_request_probe() {
        let b = breaker();
        (0..3).for_each(|_| b.record_failure(10));
        let Admission::Probe(probe) = b.admit(110) else { panic!("expected a probe") };
        drop(probe);
        assert!(matches!(b.admit(111), Admission::Probe(_)));
    }

    #[test]
    fn an_abandoned_probe_leaves_a_breaker_that_closed_meanwhile_closed() {
        let b = breaker();
        (0..3).for_each(|_| b.record_failure(10));
        let Admission::Probe(probe) = b.admit(110) else { panic!("expected a probe") };
        // A long request admitted before the breaker opened ends well.
        b.record_success();
        drop(probe);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(matches!(b.admit(112), Admission::Allowed));
    }
}
