//! `GET /metrics`: the Prometheus text exposition, rendered from the atomics
//! the request path keeps (nothing is computed per request).

use std::sync::atomic::Ordering::Relaxed;

use crate::clock::now_ms;
use crate::state::{Live, Shared};
use crate::telemetry::metrics::{self, header, line};
use crate::upstream::breaker::BreakerState;
use crate::upstream::keyring::KeyState;

/// `GET /metrics`: the Prometheus text exposition.
pub fn render_metrics(shared: &Shared, live: &Live) -> String {
    let mut out = String::with_capacity(8192);
    let metrics = &shared.telemetry.metrics;
    metrics.render(live.routes.metrics(), &mut out);
    let now = now_ms();
    header(&mut out, metrics::UPSTREAM_ATTEMPTS, "counter", "Upstream attempts by key and outcome.");
    for upstream in live.upstreams.iter() {
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
    for upstream in live.upstreams.iter() {
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
    header(&mut out, metrics::RETRY_BUDGET_REFUSED, "counter", "Retries the upstream's retry budget refused.");
    for upstream in live.upstreams.iter() {
        let refused = upstream.retry_budget.refused.load(Relaxed);
        line(&mut out, metrics::RETRY_BUDGET_REFUSED, &[("upstream", upstream.name.as_ref())], refused);
    }
    header(&mut out, metrics::UPSTREAM_CONNECTIONS, "gauge", "Pooled HTTP/2 upstream connections by state.");
    for upstream in live.upstreams.iter() {
        if let Some(pool) = &upstream.h2 {
            let counts = pool.counts();
            for (state, n) in [("active", counts.active), ("idle", counts.idle), ("connecting", counts.connecting)] {
                line(
                    &mut out,
                    metrics::UPSTREAM_CONNECTIONS,
                    &[("upstream", upstream.name.as_ref()), ("state", state)],
                    n,
                );
            }
        }
    }
    header(&mut out, metrics::UPSTREAM_QUEUED, "gauge", "Requests waiting now for an HTTP/2 stream slot.");
    for upstream in live.upstreams.iter() {
        if let Some(pool) = &upstream.h2 {
            let queued = pool.stats().queued.load(Relaxed);
            line(&mut out, metrics::UPSTREAM_QUEUED, &[("upstream", upstream.name.as_ref())], queued);
        }
    }
    header(&mut out, metrics::UPSTREAM_QUEUE_WAIT, "histogram", "Time requests waited for an HTTP/2 stream slot.");
    for upstream in live.upstreams.iter() {
        if let Some(pool) = &upstream.h2 {
            let labels = format!("upstream=\"{}\"", metrics::escape(&upstream.name));
            pool.stats().queue_wait.render_labelled(metrics::UPSTREAM_QUEUE_WAIT, &labels, &mut out);
        }
    }
    header(&mut out, metrics::BREAKER_STATE, "gauge", "Circuit breaker: 0 closed, 1 open, 2 half-open.");
    for upstream in live.upstreams.iter() {
        let value = match upstream.breaker.state() {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        line(&mut out, metrics::BREAKER_STATE, &[("upstream", upstream.name.as_ref())], value);
    }
    header(&mut out, metrics::CLIENT_REJECTIONS, "counter", "Requests refused by their client key or its limits.");
    for (reason, count) in metrics.rejections.counts() {
        line(&mut out, metrics::CLIENT_REJECTIONS, &[("reason", reason)], count);
    }
    if live.config.metrics_per_user {
        let mut users: Vec<_> = live.clients.users().collect();
        users.sort_by(|a, b| a.0.cmp(b.0));
        header(&mut out, metrics::USER_REQUESTS, "counter", "Requests of each user's keys.");
        for (user, counters) in &users {
            line(&mut out, metrics::USER_REQUESTS, &[("user", user)], counters.requests.load(Relaxed));
        }
        header(&mut out, metrics::USER_TOKENS, "counter", "Tokens of each user's keys.");
        for (user, counters) in &users {
            for (kind, n) in [("prompt", &counters.prompt_tokens), ("completion", &counters.completion_tokens)] {
                line(&mut out, metrics::USER_TOKENS, &[("user", user), ("kind", kind)], n.load(Relaxed));
            }
        }
    }
    let cache = &shared.cache;
    for (name, kind, help, value) in [
        (metrics::CACHE_HITS, "counter", "Answers served from the response cache.", cache.hits()),
        (metrics::CACHE_MISSES, "counter", "Cacheable requests sent upstream.", cache.counters.misses.load(Relaxed)),
        (
            metrics::CACHE_BYPASSES,
            "counter",
            "Cacheable requests whose client skipped the cache.",
            cache.counters.bypasses.load(Relaxed),
        ),
        (metrics::CACHE_STORES, "counter", "Answers stored in the cache.", cache.counters.stores.load(Relaxed)),
        (metrics::CACHE_EVICTIONS, "counter", "Entries evicted to stay under max_bytes.", cache.evictions()),
        (metrics::CACHE_BYTES, "gauge", "Bytes the response cache holds.", cache.bytes()),
        (metrics::CACHE_ENTRIES, "gauge", "Entries the response cache holds.", cache.entries()),
        (
            metrics::CACHE_SHORTCUT_HITS,
            "counter",
            "Cache hits found by the bytes the client sent, without planning the request.",
            cache.shortcut_hits(),
        ),
        (
            metrics::CACHE_SHORTCUTS,
            "gauge",
            "Shortcuts of hot requests the response cache holds.",
            cache.shortcuts().count(),
        ),
        (metrics::CACHE_HOT_ANSWERS, "gauge", "Copies of hot answers the event loops hold.", cache.hot().count()),
    ] {
        header(&mut out, name, kind, help);
        line(&mut out, name, &[], value);
    }
    if let Some(cluster) = &shared.cluster {
        header(&mut out, metrics::REDIS_ERRORS, "counter", "Redis operations that failed or ran past the timeout.");
        line(&mut out, metrics::REDIS_ERRORS, &[], cluster.errors.load(Relaxed));
        header(&mut out, metrics::REDIS_SUBSCRIPTIONS, "counter", "Subscriptions to the shared channel made.");
        line(&mut out, metrics::REDIS_SUBSCRIPTIONS, &[], cluster.subscriptions.load(Relaxed));
        header(&mut out, metrics::REDIS_UP, "gauge", "1 while the shared Redis answers.");
        line(&mut out, metrics::REDIS_UP, &[], u64::from(cluster.is_up()));
    }
    if let Some(store) = &shared.store {
        header(&mut out, metrics::STORE_UP, "gauge", "1 while the key store answers.");
        line(&mut out, metrics::STORE_UP, &[], u64::from(store.is_up()));
    }
    process_metrics(shared, &mut out);
    header(&mut out, metrics::RELOADS, "counter", "Config reloads by result.");
    line(&mut out, metrics::RELOADS, &[("result", "ok")], shared.reloads[0].load(Relaxed));
    line(&mut out, metrics::RELOADS, &[("result", "error")], shared.reloads[1].load(Relaxed));
    out
}

/// The standard `process_*` metrics, read from `/proc` at scrape time (Linux;
/// elsewhere only the start time).
fn process_metrics(shared: &Shared, out: &mut String) {
    header(out, "process_start_time_seconds", "gauge", "Start time of the process, seconds since the epoch.");
    line(out, "process_start_time_seconds", &[], shared.started_unix);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at `state`.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime (fields 14 and 15 of stat, 11 and 12 after the name), in
    // USER_HZ, which Linux fixes at 100 for every mainstream architecture.
    let cpu_seconds = (ticks(11) + ticks(12)) as f64 / 100.0;
    header(out, "process_cpu_seconds_total", "counter", "User and system CPU time spent, in seconds.");
    line(out, "process_cpu_seconds_total", &[], cpu_seconds);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    header(out, "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
    line(out, "process_resident_memory_bytes", &[], kib("VmRSS:") * 1024);
    header(out, "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
    line(out, "process_virtual_memory_bytes", &[], kib("VmSize:") * 1024);
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count());
    header(out, "process_open_fds", "gauge", "Open file descriptors.");
    line(out, "process_open_fds", &[], open_fds);
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let max_fds = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        .unwrap_or(0);
    header(out, "process_max_fds", "gauge", "The open file descriptor limit.");
    line(out, "process_max_fds", &[], max_fds);
}
