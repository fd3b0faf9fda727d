//! Observability: application logs (tracing), metrics, the request log, and
//! `/metrics` and `/stats`. A request's facts are gathered along its path in its
//! [`RequestContext`](crate::proxy::RequestContext) and recorded exactly once,
//! when its response ends, by [`Telemetry::finish`].

pub mod accesslog;
pub mod metrics;
pub mod usage;

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tracing_subscriber::EnvFilter;

use crate::clock::now_ms;
use crate::config::LogFormat;
use crate::proxy::RequestContext;
use crate::proxy::breaker::BreakerState;
use crate::proxy::keyring::KeyState;
use crate::state::{Live, Shared};
use accesslog::{AccessLog, Record};
use metrics::{Metrics, header, line};

/// Installs the global subscriber. A second call (tests, `demo`) is a no-op.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// How a response ended, for [`Telemetry::finish`].
#[derive(Debug, Default)]
pub struct End<'a> {
    /// Status sent to the client.
    pub status: u16,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Fingerprint of the key that answered.
    pub key: Option<&'a Arc<str>>,
    /// `(prompt, completion)` tokens from the upstream's usage.
    pub tokens: Option<(u64, u64)>,
    /// Error kind, when the request failed.
    pub error: Option<&'static str>,
}

/// Metrics and the request log, shared by every request.
pub struct Telemetry {
    /// The metrics.
    pub metrics: Metrics,
    log: Option<AccessLog>,
}

impl Telemetry {
    /// Telemetry with the request log at `requests` (if set).
    pub fn new(log: Option<AccessLog>) -> Self {
        Self { metrics: Metrics::default(), log }
    }

    /// Records one finished request: counters, histograms, tokens, and a
    /// request-log line (dropped and counted if the writer is behind). The
    /// in-flight gauge is the context's [`InFlight`](crate::proxy::InFlight) token.
    pub fn finish(&self, ctx: &RequestContext, end: End<'_>) {
        let metrics = &self.metrics;
        let model = ctx.model.as_deref().unwrap_or(&metrics.unrouted);
        model.count(ctx.route, end.status);
        if let Some((prompt, completion)) = end.tokens {
            model.add_tokens(prompt, completion);
        }
        let duration = ctx.started.elapsed();
        metrics.duration.observe(duration);
        let Some(log) = &self.log else { return };
        // Shared handles only: the writer thread formats the line.
        let record = Record {
            arrived: ctx.arrived,
            request_id: ctx.request_id.clone(),
            client: ctx.client,
            method: ctx.method.clone(),
            path: Arc::clone(&ctx.path),
            model: ctx.model.as_ref().map(|m| Arc::clone(&m.model)),
            upstream: ctx.upstream.clone(),
            key: end.key.cloned(),
            status: end.status,
            attempts: ctx.attempts,
            duration_ms: duration.as_secs_f64() * 1e3,
            upstream_ttfb_ms: ctx.ttfb.map(|t| t.as_secs_f64() * 1e3),
            bytes_in: ctx.bytes_in,
            bytes_out: end.bytes_out,
            prompt_tokens: end.tokens.map(|t| t.0),
            completion_tokens: end.tokens.map(|t| t.1),
            stream: ctx.stream,
            error: end.error,
        };
        if !log.log(record) {
            metrics.log_dropped.fetch_add(1, Relaxed);
        }
    }

    /// Waits until queued request-log lines are written.
    pub fn flush(&self) {
        if let Some(log) = &self.log {
            log.flush();
        }
    }
}

/// `GET /metrics`: the Prometheus text exposition.
pub fn render_metrics(shared: &Shared, live: &Live) -> String {
    let mut out = String::with_capacity(8192);
    let metrics = &shared.telemetry.metrics;
    metrics.render(live.routes.metrics(), &mut out);
    let now = now_ms();
    header(&mut out, metrics::UPSTREAM_ATTEMPTS, "counter", "Upstream attempts by key and outcome.");
    for upstream in &live.upstreams {
        for key in upstream.keys.keys() {
            let c = &key.counters;
            for (outcome, counter) in [
                ("success", &c.successes),
                ("rate_limited", &c.rate_limited),
                ("rejected", &c.rejected),
                ("server_error", &c.server_errors),
                ("connect_error", &c.connect_errors),
                ("timeout", &c.timeouts),
            ] {
                let labels = [("upstream", upstream.name.as_ref()), ("key", &*key.fingerprint), ("outcome", outcome)];
                line(&mut out, metrics::UPSTREAM_ATTEMPTS, &labels, counter.load(Relaxed));
            }
        }
    }
    header(&mut out, metrics::KEY_STATE, "gauge", "Key health: 1 for the state the key is in.");
    for upstream in &live.upstreams {
        for key in upstream.keys.keys() {
            let current = match key.state(now) {
                KeyState::Healthy => "healthy",
                KeyState::Cooling { .. } => "cooling",
                KeyState::Disabled => "disabled",
            };
            for state in ["healthy", "cooling", "disabled"] {
                let labels = [("upstream", upstream.name.as_ref()), ("key", &*key.fingerprint), ("state", state)];
                line(&mut out, metrics::KEY_STATE, &labels, u8::from(state == current));
            }
        }
    }
    header(&mut out, metrics::BREAKER_STATE, "gauge", "Circuit breaker: 0 closed, 1 open, 2 half-open.");
    for upstream in &live.upstreams {
        let value = match upstream.breaker.state() {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        line(&mut out, metrics::BREAKER_STATE, &[("upstream", upstream.name.as_ref())], value);
    }
    header(&mut out, metrics::RELOADS, "counter", "Config reloads by result.");
    line(&mut out, metrics::RELOADS, &[("result", "ok")], shared.reloads[0].load(Relaxed));
    line(&mut out, metrics::RELOADS, &[("result", "error")], shared.reloads[1].load(Relaxed));
    out
}

/// `GET /stats`: totals, success rate, uptime, per upstream and per key counters.
pub fn render_stats(shared: &Shared, live: &Live) -> serde_json::Value {
    let metrics = &shared.telemetry.metrics;
    let (mut total, mut successes) = (0u64, 0u64);
    let routes = [
        metrics::Route::ChatCompletions,
        metrics::Route::Completions,
        metrics::Route::Embeddings,
        metrics::Route::Models,
        metrics::Route::OtherV1,
    ];
    for model in std::iter::once(&metrics.unrouted).chain(live.routes.metrics()) {
        for route in routes {
            let (all, ok) = model.totals(route);
            total += all;
            successes += ok;
        }
    }
    let upstreams: Vec<serde_json::Value> = live
        .upstreams
        .iter()
        .map(|u| {
            let keys: Vec<serde_json::Value> = u
                .keys
                .keys()
                .iter()
                .map(|k| {
                    let c = &k.counters;
                    serde_json::json!({
                        "key": &*k.fingerprint,
                        "requests": c.requests.load(Relaxed),
                        "successes": c.successes.load(Relaxed),
                        "rate_limited": c.rate_limited.load(Relaxed),
                        "rejected": c.rejected.load(Relaxed),
                        "server_errors": c.server_errors.load(Relaxed),
                        "connect_errors": c.connect_errors.load(Relaxed),
                        "timeouts": c.timeouts.load(Relaxed),
                        "in_flight": c.in_flight.load(Relaxed),
                    })
                })
                .collect();
            let sum = |f: fn(&crate::proxy::keyring::KeyCounters) -> u64| {
                u.keys.keys().iter().map(|k| f(&k.counters)).sum::<u64>()
            };
            serde_json::json!({
                "name": u.name.as_ref(),
                "attempts": sum(|c| c.requests.load(Relaxed)),
                "successes": sum(|c| c.successes.load(Relaxed)),
                "breaker": u.breaker.state().label(),
                // sluice's own HTTP/1.1 pool (null for TLS and h2c upstreams).
                "connections": u.h1.as_ref().map(|pool| serde_json::json!({
                    "opened": pool.opened(),
                    "idle": pool.idle(),
                })),
                "keys": keys,
            })
        })
        .collect();
    let failures = total - successes;
    serde_json::json!({
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "requests": total,
        "successes": successes,
        "failures": failures,
        "success_rate": if total == 0 { 1.0 } else { successes as f64 / total as f64 },
        "in_flight": metrics.in_flight.load(Relaxed),
        "streams_open": metrics.streams_open.load(Relaxed),
        "retries": metrics.retries.load(Relaxed),
        "failovers": metrics.failovers.load(Relaxed),
        "upstreams": upstreams,
    })
}
