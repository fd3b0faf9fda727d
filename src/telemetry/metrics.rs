//! Prometheus metrics: recorded with atomics only (no lock, no allocation per
//! request), rendered as text format 0.0.4 when scraped. Names are constants and
//! every label comes from a closed set: routes, configured models and upstreams,
//! key fingerprints, status codes from a fixed list, outcome labels.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};

use crate::clock::Latest;
use crate::config::FallbackOn;
use std::time::Duration;

/// Requests by route, model, upstream and status.
pub const REQUESTS_TOTAL: &str = "sluice_requests_total";
/// Whole request duration, to the end of the response body.
pub const REQUEST_DURATION: &str = "sluice_request_duration_seconds";
/// Time to the upstream's response headers.
pub const UPSTREAM_TTFB: &str = "sluice_upstream_ttfb_seconds";
/// Time spent in sluice itself, upstream waits excluded.
pub const OVERHEAD: &str = "sluice_overhead_seconds";
/// Requests being served now.
pub const IN_FLIGHT: &str = "sluice_requests_in_flight";
/// SSE streams open now.
pub const STREAMS_OPEN: &str = "sluice_streams_open";
/// Upstream attempts by key and outcome.
pub const UPSTREAM_ATTEMPTS: &str = "sluice_upstream_attempts_total";
/// Attempts after the first of a request, by the failure that caused them.
pub const RETRIES: &str = "sluice_retries_total";
/// Retries that moved to another key.
pub const FAILOVERS: &str = "sluice_failovers_total";
/// Key health, one series per state.
pub const KEY_STATE: &str = "sluice_key_state";
/// Breaker state: 0 closed, 1 open, 2 half-open.
pub const BREAKER_STATE: &str = "sluice_breaker_state";
/// Tokens reported in upstream `usage`.
pub const TOKENS: &str = "sluice_tokens_total";
/// Config reloads by result.
pub const RELOADS: &str = "sluice_reloads_total";
/// Build information.
pub const BUILD_INFO: &str = "sluice_build_info";
/// Request-log lines dropped: the writer fell behind, or the disk refused them past the bound.
pub const LOG_DROPPED: &str = "sluice_request_log_dropped_total";
/// Counter: requests turned away by their client key or limits, by `reason`.
pub const CLIENT_REJECTIONS: &str = "sluice_client_rejections_total";
/// Counter: requests moved on to a model's next target, by `reason`.
pub const FALLBACKS: &str = "sluice_fallbacks_total";
/// Gauge: pooled HTTP/2 upstream connections, by `upstream` and `state`.
pub const UPSTREAM_CONNECTIONS: &str = "sluice_upstream_connections";
/// Histogram: time requests waited for an HTTP/2 stream slot, by `upstream`.
pub const UPSTREAM_QUEUE_WAIT: &str = "sluice_upstream_queue_wait_seconds";
/// Gauge: requests waiting now for an HTTP/2 stream slot, by `upstream`.
pub const UPSTREAM_QUEUED: &str = "sluice_upstream_queued";
/// Counter: retries the per-upstream retry budget refused, by `upstream`.
pub const RETRY_BUDGET_REFUSED: &str = "sluice_retry_budget_refused_total";
/// Counter: answers served from the response cache.
pub const CACHE_HITS: &str = "sluice_cache_hits_total";
/// Counter: cacheable requests that went upstream.
pub const CACHE_MISSES: &str = "sluice_cache_misses_total";
/// Counter: cacheable requests whose client skipped the cache.
pub const CACHE_BYPASSES: &str = "sluice_cache_bypasses_total";
/// Counter: answers stored in the cache.
pub const CACHE_STORES: &str = "sluice_cache_stores_total";
/// Counter: entries evicted to stay under `max_bytes`.
pub const CACHE_EVICTIONS: &str = "sluice_cache_evictions_total";
/// Gauge: bytes the cache holds.
pub const CACHE_BYTES: &str = "sluice_cache_bytes";
/// Gauge: entries the cache holds.
pub const CACHE_ENTRIES: &str = "sluice_cache_entries";
/// Counter: cache hits found by a shortcut, without planning the request (part of the hits).
pub const CACHE_SHORTCUT_HITS: &str = "sluice_cache_shortcut_hits_total";
/// Gauge: shortcuts of hot requests held.
pub const CACHE_SHORTCUTS: &str = "sluice_cache_shortcuts";
/// Gauge: copies of hot answers the event loops hold.
pub const CACHE_HOT_ANSWERS: &str = "sluice_cache_hot_answers";
/// Redis operations that failed or ran past `[redis] timeout`.
pub const REDIS_ERRORS: &str = "sluice_redis_errors_total";
/// Counter: subscriptions to the shared channel made (at start, then each time one is made again).
pub const REDIS_SUBSCRIPTIONS: &str = "sluice_redis_subscriptions_total";
/// 1 while the shared Redis answers.
pub const REDIS_UP: &str = "sluice_redis_up";
/// 1 while the key store answers.
pub const STORE_UP: &str = "sluice_store_up";
/// Counter: requests of a user's keys (`[metrics] per_user`).
pub const USER_REQUESTS: &str = "sluice_user_requests_total";
/// Counter: tokens of a user's keys by `kind` (`[metrics] per_user`).
pub const USER_TOKENS: &str = "sluice_user_tokens_total";

/// Connection counters of one listener (the gateway's, or the mock's).
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections accepted since start.
    pub accepted: AtomicUsize,
    /// Connections whose first packet was only part of the HTTP/2 preface.
    pub split_preface: AtomicUsize,
    /// Connections closed at accept because their address held
    /// `max_connections_per_ip`.
    pub refused_per_ip: AtomicUsize,
    /// Connections dealt to each event loop since start (set when the
    /// listener runs on `[server] event_loops`).
    pub per_loop: std::sync::OnceLock<Box<[AtomicUsize]>>,
}

/// Why the retry loop made another attempt: a closed set, the `reason`
/// label of [`RETRIES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// No connection could be made (nothing was sent).
    Connect,
    /// A pooled connection failed before any answer (closed while idle).
    StaleConnection,
    /// The exchange broke off before response headers.
    Protocol,
    /// No response headers within the header timeout.
    Timeout,
    /// A 5xx answer.
    ServerError,
    /// A 429 answer: the key cools down.
    RateLimited,
    /// A 401/402/403 whose body says the key itself is bad: the key is disabled.
    KeyRejected,
    /// A login upstream's token was refused and refreshed.
    TokenRefresh,
}

impl RetryReason {
    /// Every reason, in label order.
    pub const ALL: [Self; 8] = [
        Self::Connect,
        Self::StaleConnection,
        Self::Protocol,
        Self::Timeout,
        Self::ServerError,
        Self::RateLimited,
        Self::KeyRejected,
        Self::TokenRefresh,
    ];

    /// Stable label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect_error",
            Self::StaleConnection => "stale_connection",
            Self::Protocol => "protocol_error",
            Self::Timeout => "timeout",
            Self::ServerError => "server_error",
            Self::RateLimited => "rate_limited",
            Self::KeyRejected => "key_rejected",
            Self::TokenRefresh => "token_refresh",
        }
    }
}

/// The endpoint classes requests are counted under (the `route` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    ChatCompletions,
    /// `/v1/completions`.
    Completions,
    /// `/v1/embeddings`.
    Embeddings,
    /// `/v1/models`.
    Models,
    /// Any other `/v1/*` path.
    OtherV1,
    /// `/`, `/health`, `/v1/health`, `/metrics`, `/stats`.
    Meta,
    /// `/admin/*`.
    Admin,
    /// Anything else.
    Unknown,
}

const ENDPOINTS: [(Endpoint, &str); 8] = [
    (Endpoint::ChatCompletions, "chat_completions"),
    (Endpoint::Completions, "completions"),
    (Endpoint::Embeddings, "embeddings"),
    (Endpoint::Models, "models"),
    (Endpoint::OtherV1, "other_v1"),
    (Endpoint::Meta, "meta"),
    (Endpoint::Admin, "admin"),
    (Endpoint::Unknown, "unknown"),
];

impl Endpoint {
    /// The route of a request path.
    pub fn of(path: &str) -> Self {
        match path {
            "/v1/chat/completions" => Self::ChatCompletions,
            "/v1/completions" => Self::Completions,
            "/v1/embeddings" => Self::Embeddings,
            "/v1/models" => Self::Models,
            "/" | "/health" | "/v1/health" | "/metrics" | "/stats" => Self::Meta,
            _ if path.starts_with("/admin/") => Self::Admin,
            _ if path.starts_with("/v1/") => Self::OtherV1,
            _ => Self::Unknown,
        }
    }

    /// Stable label.
    pub fn label(self) -> &'static str {
        ENDPOINTS[self as usize].1
    }
}

/// Status codes with their own series; others fold into `other`.
const STATUSES: [u16; 18] = [200, 201, 204, 400, 401, 402, 403, 404, 405, 408, 413, 422, 429, 499, 500, 502, 503, 504];
const STATUS_SLOTS: usize = STATUSES.len() + 1;

fn status_slot(status: u16) -> usize {
    STATUSES.iter().position(|s| *s == status).unwrap_or(STATUSES.len())
}

fn status_label(slot: usize) -> String {
    STATUSES.get(slot).map_or_else(|| "other".to_string(), u16::to_string)
}

/// One thread slot's request counts, by route and status, on cache lines of its own.
#[repr(align(128))]
#[derive(Debug)]
struct RequestCounts([[AtomicU64; STATUS_SLOTS]; ENDPOINTS.len()]);

impl Default for RequestCounts {
    fn default() -> Self {
        Self(std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))))
    }
}

/// Request counts of one (model, upstream), or of requests without a model.
#[derive(Debug)]
pub struct ModelMetrics {
    /// Model as configured (`-` for requests without one); shared with request-log lines.
    pub model: Arc<str>,
    /// Upstream name (`-` when none).
    pub upstream: String,
    /// Finished requests by route and status, a copy per thread slot.
    requests: [RequestCounts; SLOTS],
    /// Prompt tokens reported by the upstream.
    pub prompt_tokens: AtomicU64,
    /// Completion tokens reported by the upstream.
    pub completion_tokens: AtomicU64,
    /// Whole request durations, by `stream` (index 0: no, 1: yes).
    pub duration: [Histogram; 2],
    /// Time to the upstream's headers, by `stream`.
    pub ttfb: [Histogram; 2],
    /// When this target last answered a request successfully: the retry
    /// loop reads it to tell a long request (the target answered others
    /// meanwhile) from a target in trouble.
    pub answered: Latest,
}

impl ModelMetrics {
    /// Zeroed counters for one (model, upstream).
    pub fn new(model: &str, upstream: &str) -> Self {
        Self {
            model: Arc::from(model),
            upstream: upstream.to_string(),
            requests: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            duration: Default::default(),
            ttfb: Default::default(),
            answered: Latest::default(),
        }
    }

    /// This model's series of a histogram family, one per `stream` value
    /// that has observations.
    fn render_histograms(&self, name: &str, pick: fn(&Self) -> &[Histogram; 2], out: &mut String) {
        for (stream, histogram) in ["false", "true"].iter().zip(pick(self)) {
            if histogram.count() > 0 {
                let labels = format!(
                    "model=\"{}\",upstream=\"{}\",stream=\"{stream}\"",
                    escape(&self.model),
                    escape(&self.upstream)
                );
                histogram.render_series(name, &labels, out);
            }
        }
    }

    /// Counts one finished request.
    pub fn count(&self, endpoint: Endpoint, status: u16) {
        slot_here(&self.requests).0[endpoint as usize][status_slot(status)].fetch_add(1, Relaxed);
    }

    /// Requests counted of a route and status slot, every thread's.
    fn requests_of(&self, route: usize, status: usize) -> u64 {
        self.requests.iter().map(|counts| counts.0[route][status].load(Relaxed)).sum()
    }

    /// Adds reported token usage.
    pub fn add_tokens(&self, prompt: u64, completion: u64) {
        self.prompt_tokens.fetch_add(prompt, Relaxed);
        self.completion_tokens.fetch_add(completion, Relaxed);
    }

    /// `(all, successful)` requests of a route; statuses below 400 are successes
    /// (the `other` slot counts as failed).
    pub fn totals(&self, endpoint: Endpoint) -> (u64, u64) {
        (0..STATUS_SLOTS).fold((0, 0), |(all, ok), slot| {
            let n = self.requests_of(endpoint as usize, slot);
            let success = STATUSES.get(slot).is_some_and(|s| *s < 400);
            (all + n, ok + if success { n } else { 0 })
        })
    }

    fn render(&self, out: &mut String) {
        let (model, upstream) = (escape(&self.model), escape(&self.upstream));
        for (route, label) in ENDPOINTS {
            for slot in 0..STATUS_SLOTS {
                let n = self.requests_of(route as usize, slot);
                if n > 0 {
                    let status = status_label(slot);
                    let _ = writeln!(
                        out,
                        "{REQUESTS_TOTAL}{{route=\"{label}\",model=\"{model}\",upstream=\"{upstream}\",status=\"{status}\"}} {n}"
                    );
                }
            }
        }
    }
}

/// Bucket upper bounds in seconds, shared by all histograms (100 µs .. 60 s).
/// Bucket bounds in seconds: from sluice's own sub-millisecond overhead up to
/// the longest default timeout (`total_timeout`, 600 s).
const BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0, 60.0, 120.0,
    300.0, 600.0,
];

/// A fixed-bucket histogram in atomics: a copy per thread slot (the
/// workers', and each of the first event loops its own, on cache lines of
/// their own), summed when read. A model's duration histogram was three
/// lines every core wrote to at every request.
#[derive(Debug, Default)]
pub struct Histogram([HistogramSlot; SLOTS]);

/// Thread slots of a [`Histogram`] and of a model's request counts: the
/// workers' (0) and loop `n`'s (`n + 1`), modulo this (more loops share).
const SLOTS: usize = 4;

/// The calling thread's slot of `slots`.
fn slot_here<T>(slots: &[T; SLOTS]) -> &T {
    &slots[crate::tasks::loops::current() % SLOTS]
}

#[repr(align(128))]
#[derive(Debug, Default)]
struct HistogramSlot {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        let here = slot_here(&self.0);
        let seconds = value.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            here.buckets[i].fetch_add(1, Relaxed);
        }
        here.count.fetch_add(1, Relaxed);
        here.sum_nanos.fetch_add(value.as_nanos() as u64, Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(name, "", out);
    }

    /// The series of one label set (`labels` as `a="x",b="y"`, values
    /// escaped), without the family header.
    pub fn render_labelled(&self, name: &str, labels: &str, out: &mut String) {
        self.render_series(name, labels, out);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|slot| slot.count.load(Relaxed)).sum()
    }

    /// The series of one label set (`labels` already escaped and joined,
    /// `a="x",b="y"`, or empty), without the family header.
    fn render_series(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.0.iter().map(|slot| slot.buckets[i].load(Relaxed)).sum::<u64>();
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
        }
        // Never below the last bucket, though observations land meanwhile.
        let count = self.count().max(cumulative);
        let sum_nanos: u64 = self.0.iter().map(|slot| slot.sum_nanos.load(Relaxed)).sum();
        let braces = |text: &str| if text.is_empty() { String::new() } else { format!("{{{text}}}") };
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), sum_nanos as f64 / 1e9);
        let _ = writeln!(out, "{name}_count{} {count}", braces(labels));
    }
}

/// Process-wide metrics (per-model counters live with the routes).
#[derive(Debug)]
pub struct Metrics {
    /// Requests that never reached a model route (errors, health, admin, pass-through).
    pub unrouted: ModelMetrics,
    /// sluice's own time per request.
    pub overhead: Histogram,
    /// Requests in flight.
    pub in_flight: SpreadGauge,
    /// SSE streams open.
    pub streams_open: AtomicI64,
    /// Attempts after the first, by [`RetryReason`] (indexed by its position).
    pub retries: [AtomicU64; RetryReason::ALL.len()],
    /// Retries on another key.
    pub failovers: AtomicU64,
    /// Request-log lines dropped.
    pub log_dropped: Arc<AtomicU64>,
    /// Requests turned away by their client key or its limits, by reason.
    pub rejections: Rejections,
    /// Requests moved on to a model's next target, by [`FallbackOn`] (its position).
    pub fallbacks: [AtomicU64; FallbackOn::ALL.len()],
}

/// A gauge every request moves: a counter a thread slot (each event loop
/// its own, each on a cache line of its own), summed when read. One shared
/// counter was a cache line two cores wrote to twice a request.
#[derive(Debug, Default)]
pub struct SpreadGauge([Slot; SPREAD]);

/// Slots of a [`SpreadGauge`]: loop `n` moves slot `(n + 1) % SPREAD`, the
/// runtime's workers slot 0.
const SPREAD: usize = 16;

#[repr(align(128))]
#[derive(Debug, Default)]
struct Slot(AtomicI64);

impl SpreadGauge {
    /// Moves the gauge by `n` (from any thread: the slots' sum is the gauge).
    pub fn add(&self, n: i64) {
        self.0[crate::tasks::loops::current() % SPREAD].0.fetch_add(n, Relaxed);
    }

    /// The gauge's value: the slots read one by one, so a value moved up in
    /// one slot and down in another meanwhile may show one move only.
    pub fn get(&self) -> i64 {
        self.0.iter().map(|slot| slot.0.load(Relaxed)).sum()
    }
}

/// `sluice_client_rejections_total{reason}`.
#[derive(Debug, Default)]
pub struct Rejections([AtomicU64; Rejections::REASONS.len()]);

impl Rejections {
    /// Every reason, in exposition order.
    pub const REASONS: [&'static str; 8] = ["invalid", "expired", "model", "path", "rpm", "rph", "quota", "per_ip"];

    /// Counts one rejection (an unknown reason is a bug and is not counted).
    pub fn count(&self, reason: &str) {
        if let Some(i) = Self::REASONS.iter().position(|r| *r == reason) {
            self.0[i].fetch_add(1, Relaxed);
        }
    }

    /// `(reason, count)` for every reason.
    pub fn counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Self::REASONS.iter().zip(&self.0).map(|(reason, n)| (*reason, n.load(Relaxed)))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            unrouted: ModelMetrics::new("-", "-"),
            overhead: Histogram::default(),
            in_flight: SpreadGauge::default(),
            streams_open: AtomicI64::new(0),
            retries: Default::default(),
            failovers: AtomicU64::new(0),
            log_dropped: Arc::default(),
            rejections: Rejections::default(),
            fallbacks: Default::default(),
        }
    }
}

impl Metrics {
    /// Counts a request moved to the next target for `why`.
    pub fn fallen_back(&self, why: FallbackOn) {
        if let Some(i) = FallbackOn::ALL.iter().position(|r| *r == why) {
            self.fallbacks[i].fetch_add(1, Relaxed);
        }
    }
}

/// The `reason` label of a fallback.
pub fn fallback_label(why: FallbackOn) -> &'static str {
    match why {
        FallbackOn::ServerError => "5xx",
        FallbackOn::Timeout => "timeout",
        FallbackOn::RateLimited => "429",
        FallbackOn::NoKey => "no_key",
        FallbackOn::BreakerOpen => "breaker_open",
        FallbackOn::Connect => "connect",
    }
}

/// Escapes a label value (backslash, quote, newline).
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// One gauge or counter line.
pub fn line(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, val)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{key}=\"{}\"", escape(val));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// A `# HELP` and `# TYPE` header.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

impl Metrics {
    /// Counts one retry caused by `reason`.
    pub fn retried(&self, reason: RetryReason) {
        self.retries[reason as usize].fetch_add(1, Relaxed);
    }

    /// Retries of every reason together.
    pub fn retries_total(&self) -> u64 {
        self.retries.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Renders the process-wide part, and the request counters of `models`.
    pub fn render<'a>(&self, models: impl Iterator<Item = &'a ModelMetrics> + Clone, out: &mut String) {
        header(out, REQUESTS_TOTAL, "counter", "Requests by route, model, upstream and status.");
        self.unrouted.render(out);
        for model in models.clone() {
            model.render(out);
        }
        for (name, help, pick) in [
            (
                REQUEST_DURATION,
                "Request duration to the end of the response body.",
                (|m: &ModelMetrics| &m.duration) as fn(&ModelMetrics) -> &[Histogram; 2],
            ),
            (UPSTREAM_TTFB, "Time to the upstream's response headers.", |m: &ModelMetrics| &m.ttfb),
        ] {
            header(out, name, "histogram", help);
            self.unrouted.render_histograms(name, pick, out);
            for model in models.clone() {
                model.render_histograms(name, pick, out);
            }
        }
        self.overhead.render(OVERHEAD, "Time spent in sluice itself, upstream waits excluded.", out);
        header(out, IN_FLIGHT, "gauge", "Requests being served, the scrape itself not counted.");
        line(out, IN_FLIGHT, &[], (self.in_flight.get() - 1).max(0));
        header(out, STREAMS_OPEN, "gauge", "SSE streams open.");
        line(out, STREAMS_OPEN, &[], self.streams_open.load(Relaxed));
        header(out, RETRIES, "counter", "Upstream attempts after the first of a request, by cause.");
        for (reason, counter) in RetryReason::ALL.iter().zip(&self.retries) {
            line(out, RETRIES, &[("reason", reason.label())], counter.load(Relaxed));
        }
        header(out, FAILOVERS, "counter", "Retries that moved to another key.");
        line(out, FAILOVERS, &[], self.failovers.load(Relaxed));
        header(out, FALLBACKS, "counter", "Requests moved on to a model's next target, by reason.");
        for (why, counter) in FallbackOn::ALL.iter().zip(&self.fallbacks) {
            line(out, FALLBACKS, &[("reason", fallback_label(*why))], counter.load(Relaxed));
        }
        header(out, TOKENS, "counter", "Tokens reported in upstream usage.");
        for model in models {
            line(out, TOKENS, &[("model", &model.model), ("kind", "prompt")], model.prompt_tokens.load(Relaxed));
            line(
                out,
                TOKENS,
                &[("model", &model.model), ("kind", "completion")],
                model.completion_tokens.load(Relaxed),
            );
        }
        header(
            out,
            LOG_DROPPED,
            "counter",
            "Request-log lines dropped: the writer fell behind, or the disk refused them past the bound.",
        );
        line(out, LOG_DROPPED, &[], self.log_dropped.load(Relaxed));
        header(out, BUILD_INFO, "gauge", "Build information.");
        line(out, BUILD_INFO, &[("version", crate::VERSION)], 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_gauge_sums_what_every_thread_moved() {
        let gauge = SpreadGauge::default();
        // A request counted in on one loop may be counted out on another thread.
        crate::tasks::loops::as_loop(0, || gauge.add(1));
        crate::tasks::loops::as_loop(20, || gauge.add(1));
        gauge.add(-1);
        assert_eq!(gauge.get(), 1);
        crate::tasks::loops::as_loop(0, || gauge.add(-1));
        assert_eq!(gauge.get(), 0);
        assert_ne!(
            std::ptr::from_ref(&gauge.0[1]).addr() / 128,
            std::ptr::from_ref(&gauge.0[2]).addr() / 128,
            "each slot on a line of its own"
        );
    }

    #[test]
    fn routes_and_statuses_are_closed_sets() {
        assert_eq!(Endpoint::of("/v1/chat/completions").label(), "chat_completions");
        assert_eq!(Endpoint::of("/v1/files/x").label(), "other_v1");
        assert_eq!(Endpoint::of("/admin/reload").label(), "admin");
        assert_eq!(Endpoint::of("/wp-login.php").label(), "unknown");
        assert_eq!(status_label(status_slot(429)), "429");
        assert_eq!(status_label(status_slot(418)), "other");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        let mut out = String::new();
        h.render("x", "help", &mut out);
        assert!(out.contains("x_bucket{le=\"0.0001\"} 1\n"));
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"));
        assert!(out.contains("x_bucket{le=\"60\"} 2\n"));
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count 3\n"));
    }

    #[test]
    fn histograms_and_request_counts_sum_every_threads_slot() {
        use crate::tasks::loops::as_loop;
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        as_loop(0, || h.observe(Duration::from_millis(3)));
        as_loop(1, || h.observe(Duration::from_secs(100)));
        as_loop(6, || h.observe(Duration::from_micros(50)));
        assert_eq!(h.count(), 4);
        let mut out = String::new();
        h.render("x", "help", &mut out);
        assert!(out.contains("x_bucket{le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n") && out.contains("x_sum 100.00605\n"), "{out}");
        let model = ModelMetrics::new("m", "u");
        let chat = Endpoint::of("/v1/chat/completions");
        model.count(chat, 200);
        as_loop(0, || model.count(chat, 200));
        as_loop(1, || model.count(chat, 500));
        assert_eq!(model.totals(chat), (3, 2));
        let mut out = String::new();
        model.render(&mut out);
        assert!(out.contains("status=\"200\"} 2\n") && out.contains("status=\"500\"} 1\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
