//! Observability: application logs (tracing), metrics and the request log. A
//! request's facts are gathered along its path in its [`RequestContext`] and
//! recorded exactly once, when its response ends, by [`Telemetry::finish`].
//! `/metrics` and `/stats` render these in [`crate::admin`].

pub mod accesslog;
pub mod account;
pub mod context;
pub mod metrics;
pub mod usage;

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use accesslog::{AccessLog, Record};
pub use context::{CacheStatus, ConnInfo, ConnState, ConnWatch, InFlight, RequestContext};
use metrics::Metrics;

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

/// One concise application-log line for a finished request (`[log] access`).
fn access_line(ctx: &RequestContext, end: &End<'_>, model: &metrics::ModelMetrics, duration: std::time::Duration) {
    let client = ctx.client.as_ref().map_or("-", |c| &**c.label());
    tracing::info!(
        target: "sluice::access",
        request_id = ctx.request_id.to_str().unwrap_or("-"),
        method = %ctx.method,
        path = %crate::error::printable(&ctx.path),
        status = end.status,
        model = &*model.model,
        upstream = ctx.upstream.as_deref().unwrap_or("-"),
        upstream_model = ctx.upstream_model.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-"),
        client,
        attempts = ctx.attempts,
        ms = (duration.as_secs_f64() * 1e3 * 10.0).round() / 10.0,
        stream = ctx.stream,
        error = end.error.unwrap_or("-"),
        "request"
    );
}

/// Metrics and the request log, shared by every request.
pub struct Telemetry {
    /// The metrics.
    pub metrics: Metrics,
    /// The gateway listener's connection counters.
    pub connections: Arc<metrics::ConnStats>,
    /// Whether each finished request also gets one line in the application
    /// log (`[log] access`); follows reloads.
    pub access_lines: std::sync::atomic::AtomicBool,
    log: Option<AccessLog>,
}

impl Telemetry {
    /// Telemetry with the request log at `requests` (if set).
    pub fn new(log: Option<AccessLog>) -> Self {
        let mut metrics = Metrics::default();
        if let Some(log) = &log {
            // The log counts its own drops, the writer's among them.
            metrics.log_dropped = log.dropped();
        }
        Self { metrics, connections: Arc::default(), access_lines: std::sync::atomic::AtomicBool::new(false), log }
    }

    /// Records one finished request: counters, histograms, tokens, and a
    /// request-log line (dropped and counted by the log if the writer is behind). The
    /// in-flight gauge is the context's [`InFlight`] token.
    pub fn finish(&self, ctx: &RequestContext, end: End<'_>) {
        let metrics = &self.metrics;
        let model = ctx.model.as_deref().unwrap_or(&metrics.unrouted);
        model.count(ctx.endpoint, end.status);
        // A hit's tokens were paid for once, by the request that stored it.
        if let (Some((prompt, completion)), false) = (end.tokens, ctx.cache == Some(CacheStatus::Hit)) {
            model.add_tokens(prompt, completion);
        }
        let duration = ctx.started.elapsed();
        model.duration[usize::from(ctx.stream)].observe(duration);
        if self.access_lines.load(Relaxed) {
            access_line(ctx, &end, model, duration);
        }
        let Some(log) = &self.log else { return };
        // Borrowed: the line is formatted here, on this thread.
        let record = Record {
            arrived: ctx.arrived,
            request_id: &ctx.request_id,
            client: ctx.client.as_ref().map(|c| &**c.label()),
            user: ctx.client.as_ref().and_then(|c| c.user()).map(|user| &**user),
            method: &ctx.method,
            path: &ctx.path,
            model: ctx.model.as_ref().map(|m| &*m.model),
            upstream: ctx.upstream.as_deref(),
            upstream_model: ctx.upstream_model.as_ref(),
            key: end.key.map(|key| &**key),
            status: end.status,
            attempts: ctx.attempts,
            duration_ms: duration.as_secs_f64() * 1e3,
            upstream_ttfb_ms: ctx.ttfb.map(|t| t.as_secs_f64() * 1e3),
            bytes_in: ctx.bytes_in,
            bytes_out: end.bytes_out,
            prompt_tokens: end.tokens.map(|t| t.0),
            completion_tokens: end.tokens.map(|t| t.1),
            stream: ctx.stream,
            cache: ctx.cache.map(CacheStatus::label),
            error: end.error,
        };
        log.log(&record);
    }

    /// Reopens the request log by its path (after an outside rotation).
    pub fn reopen_log(&self) {
        if let Some(log) = &self.log {
            log.reopen();
        }
    }

    /// Waits until queued request-log lines are written.
    pub fn flush(&self) {
        if let Some(log) = &self.log {
            log.flush();
        }
    }
}
