//! Client rate limits: requests per minute and per hour, tokens per day.
//!
//! **Guarantee**: in any window of 60 s at most `rpm` requests of a key are
//! admitted, in any hour at most `rph`; a burst up to the limit is fine, and
//! no burst goes past it at a window boundary. A fixed window would admit 2x
//! at its edges; GCRA with a burst of `L` admits up to `2L - 1` in some
//! window. So this is a sliding window of [`BUCKETS`] sub-buckets, exact
//! under concurrency: one atomic word holds the current bucket (its index,
//! its count, and the frozen total of the buckets before it in the window),
//! one compare-and-swap admits a request, and a ring of frozen counts (each
//! tagged with its bucket index) lets whichever request first sees a new
//! bucket compute the total before it. It counts the oldest sub-bucket whole,
//! so it may refuse up to 1/60 of a window early; it never admits too many.
//!
//! Token budgets (`tokens_per_day`) count the tokens of answers already
//! finished in the current UTC day; a request is refused once the day's
//! budget is spent (a request in flight may end past it).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::AcqRel, Ordering::Acquire, Ordering::Relaxed};
use std::time::Duration;

/// Sub-buckets per window.
pub const BUCKETS: u64 = 60;
pub use crate::config::access::MAX_WINDOW_LIMIT;
const _: () = assert!((MAX_WINDOW_LIMIT as u64) < (1 << 20), "a window's count fits its 20 bits");

/// Bits of a count: limits up to about a million per window.
const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// Bits of the bucket index kept in the current word; it wraps (after 194
/// days of one-second buckets) and is compared with wrapping arithmetic.
const INDEX_BITS: u32 = 64 - 2 * COUNT_BITS;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;

/// A sliding window of `BUCKETS` sub-buckets.
#[derive(Debug)]
pub struct Window {
    /// Bucket index (low 24 bits) | count in it (20) | total of the 60 before it (20).
    current: AtomicU64,
    /// Frozen counts: whole bucket index (44 bits) | count (20), at slot `index % BUCKETS`.
    ring: [AtomicU64; BUCKETS as usize],
}

impl Default for Window {
    fn default() -> Self {
        Self { current: AtomicU64::new(0), ring: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

/// What a window says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted: this many more fit now.
    Admitted {
        /// Requests still admissible now.
        remaining: u32,
        /// Until the window is back to its full capacity: every request
        /// counted now has left it (OpenAI's meaning of "reset").
        reset: Duration,
    },
    /// Refused: the window is full for this long at least.
    Refused {
        /// Until a request fits again.
        retry_after: Duration,
    },
}

fn pack(index: u64, count: u64, before: u64) -> u64 {
    ((index & INDEX_MASK) << (2 * COUNT_BITS)) | ((count & COUNT_MASK) << COUNT_BITS) | (before & COUNT_MASK)
}

/// `(index bits, count, before)`.
fn unpack(word: u64) -> (u64, u64, u64) {
    (word >> (2 * COUNT_BITS), (word >> COUNT_BITS) & COUNT_MASK, word & COUNT_MASK)
}

/// How far bucket `now` (whole) is ahead of the truncated index `stored`:
/// 0 for the same bucket; `None` when `stored` is a little ahead of `now`
/// (at most a window: a request whose clock read lagged another's). Anything
/// else is `now` being ahead, however long the key was idle. After more than
/// 2^24 idle buckets the distance wraps and the old bucket is frozen at a
/// wrong (recent) index: counted for one window longer than it should be,
/// which refuses early but never admits too many.
fn ahead(now: u64, stored: u64) -> Option<u64> {
    let diff = (now & INDEX_MASK).wrapping_sub(stored) & INDEX_MASK;
    let lag = stored.wrapping_sub(now & INDEX_MASK) & INDEX_MASK;
    if diff != 0 && lag <= BUCKETS { None } else { Some(diff) }
}

impl Window {
    /// Admits one request at clock time `now_ms` if the window of `span`
    /// holds fewer than `limit`; counts it when admitted.
    pub fn take(&self, limit: u32, span: Duration, now_ms: u64) -> Verdict {
        let width = (span.as_millis() as u64 / BUCKETS).max(1);
        let now_index = now_ms / width;
        let limit = u64::from(limit.min(MAX_WINDOW_LIMIT));
        loop {
            let word = self.current.load(Acquire);
            let (stored, count, before) = unpack(word);
            let (index, count, before) = match ahead(now_index, stored) {
                _ if word == 0 => (now_index, 0, self.total_before(now_index)),
                Some(0) => (now_index, count, before),
                Some(by) => {
                    if count > 0 {
                        self.freeze(now_index - by, count);
                    }
                    (now_index, 0, self.total_before(now_index))
                }
                // Joins the newer bucket another request already opened.
                None => (now_index + (stored.wrapping_sub(now_index) & INDEX_MASK), count, before),
            };
            if before + count >= limit {
                return Verdict::Refused { retry_after: self.until_one_leaves(index, width, now_ms) };
            }
            let next = pack(index, count + 1, before);
            if self.current.compare_exchange(word, next, AcqRel, Acquire).is_ok() {
                let remaining = (limit - before - count - 1) as u32;
                // O(1): the newest bucket leaves last. (Only a refusal
                // scans the ring, for when the oldest leaves.)
                let reset = Duration::from_millis(((index + BUCKETS + 1) * width).saturating_sub(now_ms).max(1));
                return Verdict::Admitted { remaining, reset };
            }
        }
    }

    /// Requests counted in the window now (for headers and tests).
    pub fn used(&self, span: Duration, now_ms: u64) -> u64 {
        let width = (span.as_millis() as u64 / BUCKETS).max(1);
        let now_index = now_ms / width;
        let (stored, count, before) = unpack(self.current.load(Acquire));
        match ahead(now_index, stored) {
            Some(0) | None => before + count,
            // Not rolled over yet: what the next request would see. The
            // stored bucket may be frozen already (by a refused request).
            Some(by) => {
                let stored = now_index - by;
                let first = now_index.saturating_sub(BUCKETS);
                let others: u64 = self
                    .ring
                    .iter()
                    .map(|slot| slot.load(Acquire))
                    .filter(|entry| {
                        entry >> COUNT_BITS != stored && (first..now_index).contains(&(entry >> COUNT_BITS))
                    })
                    .map(|entry| entry & COUNT_MASK)
                    .sum();
                others + if by <= BUCKETS { count } else { 0 }
            }
        }
    }

    /// Gives back a request admitted at `now_ms` (its other window refused it).
    pub fn give_back(&self, span: Duration, now_ms: u64) {
        let width = (span.as_millis() as u64 / BUCKETS).max(1);
        let now_index = now_ms / width;
        let _ = self.current.fetch_update(AcqRel, Acquire, |word| {
            let (stored, count, before) = unpack(word);
            // Only from the bucket it went into; a later bucket keeps it
            // (counted a little too long: conservative).
            (ahead(now_index, stored) == Some(0) && count > 0).then(|| pack(now_index, count - 1, before))
        });
    }

    fn freeze(&self, index: u64, count: u64) {
        let slot = &self.ring[(index % BUCKETS) as usize];
        slot.fetch_max((index << COUNT_BITS) | count, AcqRel);
    }

    /// Frozen counts of the buckets `index - BUCKETS .. index - 1`.
    fn total_before(&self, index: u64) -> u64 {
        let first = index.saturating_sub(BUCKETS);
        self.ring
            .iter()
            .map(|slot| slot.load(Acquire))
            .filter(|entry| (first..index).contains(&(entry >> COUNT_BITS)))
            .map(|entry| entry & COUNT_MASK)
            .sum()
    }

    /// Until the oldest non-empty bucket in the window of `index` leaves it.
    fn until_one_leaves(&self, index: u64, width: u64, now_ms: u64) -> Duration {
        let first = index.saturating_sub(BUCKETS);
        let oldest = self
            .ring
            .iter()
            .map(|slot| slot.load(Relaxed))
            .filter(|entry| entry & COUNT_MASK > 0 && (first..index).contains(&(entry >> COUNT_BITS)))
            .map(|entry| entry >> COUNT_BITS)
            .min()
            .unwrap_or(index);
        // Bucket `oldest` is counted until the window's first bucket passes it.
        let leaves_at = (oldest + BUCKETS + 1) * width;
        Duration::from_millis(leaves_at.saturating_sub(now_ms).max(1))
    }
}

/// Tokens used in the current UTC day: day number (24 bits) | tokens (40).
#[derive(Debug, Default)]
pub struct DayBudget(AtomicU64);

const TOKENS_MASK: u64 = (1 << 40) - 1;

/// The UTC day of a wall-clock time in seconds since the epoch.
pub fn utc_day(unix_secs: u64) -> u64 {
    unix_secs / 86_400
}

impl DayBudget {
    /// Tokens used on day `day` so far.
    pub fn used(&self, day: u64) -> u64 {
        let word = self.0.load(Acquire);
        if word >> 40 == day & 0xff_ffff { word & TOKENS_MASK } else { 0 }
    }

    /// Adds `tokens` to day `day` (a new day starts from zero).
    pub fn add(&self, day: u64, tokens: u64) {
        let day = day & 0xff_ffff;
        let _ = self.0.fetch_update(AcqRel, Acquire, |word| {
            let used = if word >> 40 == day { word & TOKENS_MASK } else { 0 };
            Some((day << 40) | (used + tokens).min(TOKENS_MASK))
        });
    }
}

/// Tokens of finished answers waiting to be added to the day budgets other
/// instances share (`[redis]`): a lock-free queue the request path pushes to
/// (waking the cluster's writer, which writes at once whatever it finds, so
/// the other instances see an answer's tokens a round trip after it ended).
#[derive(Debug, Default)]
pub struct TokenTally(crossbeam_queue::SegQueue<(std::sync::Arc<str>, u64, u64)>, tokio::sync::Notify);

/// Most tallies kept while Redis does not take them; past it the newest are
/// dropped from the shared count (this instance's own count, which the
/// shared budget never goes below, still has them).
const MAX_TALLIES: usize = 100_000;

impl TokenTally {
    /// Counts `tokens` used by the key named `shared_id` on UTC day `day`.
    pub fn push(&self, shared_id: &std::sync::Arc<str>, day: u64, tokens: u64) {
        if self.0.len() < MAX_TALLIES {
            self.0.push((std::sync::Arc::clone(shared_id), day, tokens));
            self.1.notify_one();
        }
    }

    /// Resolves once tokens were pushed since the last wait.
    pub async fn pushed(&self) {
        self.1.notified().await;
    }

    /// Takes everything queued, summed per key and day.
    pub fn drain(&self) -> Vec<(std::sync::Arc<str>, u64, u64)> {
        let mut sums: std::collections::HashMap<(std::sync::Arc<str>, u64), u64> = std::collections::HashMap::new();
        while let Some((id, day, tokens)) = self.0.pop() {
            *sums.entry((id, day)).or_default() += tokens;
        }
        sums.into_iter().map(|((id, day), tokens)| (id, day, tokens)).collect()
    }
}

/// The counters of one client key, kept across rebuilds of the client table
/// (so a reload or an admin change never resets a limit's count).
#[derive(Debug, Default)]
pub struct KeyCounters {
    minute: OnceLock<Box<Window>>,
    hour: OnceLock<Box<Window>>,
    /// Tokens of finished answers, today.
    pub tokens: DayBudget,
}

/// A key's limits; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Requests per hour.
    pub rph: Option<u32>,
    /// Tokens (prompt + completion) per UTC day.
    pub tokens_per_day: Option<u64>,
}

impl KeyLimits {
    /// Whether any limit applies.
    pub fn any(&self) -> bool {
        self.rpm.is_some() || self.rph.is_some() || self.tokens_per_day.is_some()
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// Requests per minute.
    Rpm,
    /// Requests per hour.
    Rph,
    /// The day's token budget.
    Tokens,
}

impl Exceeded {
    /// Stable label (metrics, messages).
    pub fn label(self) -> &'static str {
        match self {
            Self::Rpm => "rpm",
            Self::Rph => "rph",
            Self::Tokens => "quota",
        }
    }
}

/// The `x-ratelimit-*` values of a request: requests of the tighter window,
/// tokens until the UTC day ends.
pub use crate::telemetry::account::RateHeaders as RateState;

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

impl KeyCounters {
    /// Admits one request under `limits` at clock `now_ms` and wall-clock
    /// `unix_secs`, or says which limit refuses it and for how long.
    pub fn admit(
        &self,
        limits: &KeyLimits,
        now_ms: u64,
        unix_secs: u64,
    ) -> Result<RateState, (Exceeded, Duration, RateState)> {
        let mut state = RateState::default();
        if let Some(budget) = limits.tokens_per_day {
            let day = utc_day(unix_secs);
            let used = self.tokens.used(day);
            let until_midnight = Duration::from_secs((day + 1) * 86_400 - unix_secs);
            state.tokens = Some((budget, budget.saturating_sub(used), until_midnight));
            if used >= budget {
                return Err((Exceeded::Tokens, until_midnight, state));
            }
        }
        let mut admitted_minute = false;
        if let Some(rpm) = limits.rpm {
            match self.minute.get_or_init(Box::default).take(rpm, MINUTE, now_ms) {
                Verdict::Admitted { remaining, reset } => {
                    admitted_minute = true;
                    state.requests = Some((rpm, remaining, reset));
                }
                Verdict::Refused { retry_after } => {
                    state.requests = Some((rpm, 0, retry_after));
                    return Err((Exceeded::Rpm, retry_after, state));
                }
            }
        }
        if let Some(rph) = limits.rph {
            match self.hour.get_or_init(Box::default).take(rph, HOUR, now_ms) {
                Verdict::Admitted { remaining, reset } => {
                    // Report the tighter of the two windows.
                    if state.requests.is_none_or(|(_, left, _)| remaining < left) {
                        state.requests = Some((rph, remaining, reset));
                    }
                }
                Verdict::Refused { retry_after } => {
                    if admitted_minute && let Some(minute) = self.minute.get() {
                        minute.give_back(MINUTE, now_ms);
                    }
                    state.requests = Some((rph, 0, retry_after));
                    return Err((Exceeded::Rph, retry_after, state));
                }
            }
        }
        Ok(state)
    }
}

/// OpenAI's duration format for `x-ratelimit-reset-*`: `1s`, `6m0s`, `1h2m3s`,
/// `250ms` below a second.
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms.div_ceil(1000);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN: Duration = Duration::from_secs(60);

    fn admitted(verdict: Verdict) -> bool {
        matches!(verdict, Verdict::Admitted { .. })
    }

    #[test]
    fn a_burst_up_to_the_limit_then_refusals_with_retry_after() {
        let w = Window::default();
        let t = 1_000_000;
        let verdicts: Vec<Verdict> = (0..15).map(|_| w.take(5, SPAN, t)).collect();
        assert_eq!(verdicts.iter().filter(|v| admitted(**v)).count(), 5);
        assert_eq!(verdicts[4], Verdict::Admitted { remaining: 0, reset: Duration::from_millis(61_000) });
        let Verdict::Refused { retry_after } = verdicts[5] else { panic!() };
        // The burst's bucket leaves the (conservative) window one bucket after a minute.
        assert!(retry_after > SPAN && retry_after <= SPAN + Duration::from_secs(1), "{retry_after:?}");
        assert!(!admitted(w.take(5, SPAN, t + 60_000)), "still inside 60 s plus a bucket");
        assert!(admitted(w.take(5, SPAN, t + 61_000)));
    }

    #[test]
    fn no_window_of_the_span_ever_holds_more_than_the_limit() {
        // A steady client at twice the rate, then silence, then bursts at the
        // boundaries: every 60 s window (checked at ms resolution over the
        // admitted times) holds at most the limit.
        let w = Window::default();
        let limit = 10u32;
        let mut times = Vec::new();
        let mut t = 5_000_000u64;
        let mut clock = crate::ids::next_u64();
        for step in 0..4000u64 {
            clock ^= clock << 13;
            clock ^= clock >> 7;
            clock ^= clock << 17;
            t += match step % 400 {
                0..=99 => 3_000, // 20/min: twice the limit
                100..=199 => clock % 2_000,
                200 => 59_900,    // silence up to just before the boundary
                _ => clock % 700, // a dense burst across it
            };
            if admitted(w.take(limit, SPAN, t)) {
                times.push(t);
            }
        }
        for (i, start) in times.iter().enumerate() {
            let inside = times[i..].iter().take_while(|t| **t < start + 60_000).count();
            assert!(inside <= limit as usize, "{inside} admitted within 60 s of {start}");
        }
        assert!(times.len() > 200, "the limiter admitted too little: {}", times.len());
    }

    #[test]
    fn the_index_wraps_without_losing_the_window() {
        // Buckets of 1 ms put the 24-bit wrap a few hours in.
        let span = Duration::from_millis(60);
        let w = Window::default();
        let wrap = 1u64 << INDEX_BITS;
        for t in [wrap - 3, wrap - 2] {
            assert!(admitted(w.take(3, span, t)));
        }
        assert!(admitted(w.take(3, span, wrap + 1)), "the third, across the wrap");
        assert!(!admitted(w.take(3, span, wrap + 2)), "three within 60 buckets, wrap or not");
        assert_eq!(w.used(span, wrap + 2), 3);
        assert!(admitted(w.take(3, span, wrap + 70)), "all have left the window");
        // A request whose clock read lagged joins the newer bucket.
        assert!(admitted(w.take(3, span, wrap + 69)));
        assert_eq!(w.used(span, wrap + 70), 2);
    }

    #[test]
    fn a_key_idle_for_months_is_admitted_again() {
        let w = Window::default();
        let t = 50_000_000;
        assert!(admitted(w.take(2, SPAN, t)));
        assert!(admitted(w.take(2, SPAN, t)));
        // 100 days: more than half the 24-bit index range of one-second buckets.
        let later = t + 100 * 86_400 * 1000;
        assert!(admitted(w.take(2, SPAN, later)));
        assert!(admitted(w.take(2, SPAN, later)));
        assert!(!admitted(w.take(2, SPAN, later)));
    }

    #[test]
    fn limits_past_16_bits_count_exactly() {
        let w = Window::default();
        let admitted = (0..200_005).filter(|_| admitted(w.take(200_000, SPAN, 3_000_000))).count();
        assert_eq!(admitted, 200_000);
    }

    #[test]
    fn concurrent_takes_admit_exactly_the_limit() {
        let w = std::sync::Arc::new(Window::default());
        let t = 9_000_000;
        let admitted: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let w = std::sync::Arc::clone(&w);
                    scope.spawn(move || (0..500).filter(|_| admitted(w.take(100, SPAN, t))).count())
                })
                .collect();
            workers.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 100);
        assert_eq!(w.used(SPAN, t), 100);
    }

    #[test]
    fn a_refusal_by_the_hour_gives_the_minute_back() {
        let counters = KeyCounters::default();
        let limits = KeyLimits { rpm: Some(10), rph: Some(3), tokens_per_day: None };
        let t = 7_000_000;
        for _ in 0..3 {
            assert!(counters.admit(&limits, t, 1_700_000_000).is_ok());
        }
        let Err((which, _, state)) = counters.admit(&limits, t, 1_700_000_000) else { panic!() };
        assert_eq!((which, state.requests.map(|r| (r.0, r.1))), (Exceeded::Rph, Some((3, 0))));
        assert_eq!(counters.minute.get().unwrap().used(MINUTE, t), 3, "the refused request is not counted");
    }

    #[test]
    fn the_day_budget_counts_tokens_and_starts_over_at_midnight() {
        let counters = KeyCounters::default();
        let limits = KeyLimits { tokens_per_day: Some(100), ..KeyLimits::default() };
        let noon = 19_000 * 86_400 + 43_200;
        assert_eq!(counters.admit(&limits, 1, noon).unwrap().tokens, Some((100, 100, Duration::from_secs(43_200))));
        counters.tokens.add(utc_day(noon), 100);
        let Err((which, retry, _)) = counters.admit(&limits, 1, noon) else { panic!() };
        assert_eq!((which, retry), (Exceeded::Tokens, Duration::from_secs(43_200)));
        assert!(counters.admit(&limits, 1, noon + 43_200).is_ok(), "a new day");
    }

    #[test]
    fn reset_durations_in_openai_form() {
        assert_eq!(openai_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(openai_duration(Duration::from_secs(1)), "1s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_millis(59_001)), "1m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
    }
}
