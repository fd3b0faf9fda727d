//! `GET /stats`: totals, success rate, uptime, per upstream and per key
//! counters, as JSON.

use std::sync::atomic::Ordering::Relaxed;

use crate::cache::ResponseCache;
use crate::state::{Live, Shared};
use crate::telemetry::metrics;

/// `GET /stats`: totals, success rate, uptime, per upstream and per key counters.
pub fn render_stats(shared: &Shared, live: &Live) -> serde_json::Value {
    let metrics = &shared.telemetry.metrics;
    let (mut total, mut successes) = (0u64, 0u64);
    let routes = [
        metrics::Endpoint::ChatCompletions,
        metrics::Endpoint::Completions,
        metrics::Endpoint::Embeddings,
        metrics::Endpoint::Models,
        metrics::Endpoint::OtherV1,
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
            let sum = |f: fn(&crate::upstream::keyring::KeyCounters) -> u64| {
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
        "in_flight": metrics.in_flight.get().max(0),
        "streams_open": metrics.streams_open.load(Relaxed),
        "retries": metrics.retries_total(),
        "failovers": metrics.failovers.load(Relaxed),
        "cache": cache_stats(&shared.cache, live.config.cache.enabled),
        "connections": connection_stats(&shared.telemetry.connections),
        "upstreams": upstreams,
    })
}

/// Client connections: open now, accepted, refused for their address, and
/// (on event loops) how many each loop was dealt.
fn connection_stats(c: &crate::telemetry::metrics::ConnStats) -> serde_json::Value {
    serde_json::json!({
        "open": c.open.load(Relaxed),
        "accepted": c.accepted.load(Relaxed),
        "refused_per_ip": c.refused_per_ip.load(Relaxed),
        "per_loop": c.per_loop.get().map(|counts| counts.iter().map(|n| n.load(Relaxed)).collect::<Vec<_>>()),
    })
}

/// The response cache's counters and size.
fn cache_stats(cache: &ResponseCache, enabled: bool) -> serde_json::Value {
    let c = &cache.counters;
    serde_json::json!({
        "enabled": enabled,
        "hits": cache.hits(),
        "misses": c.misses.load(Relaxed),
        "bypasses": c.bypasses.load(Relaxed),
        "stores": c.stores.load(Relaxed),
        "evictions": cache.evictions(),
        "entries": cache.entries(),
        "bytes": cache.bytes(),
        "shortcuts": cache.shortcuts().count(),
        "shortcut_hits": cache.shortcut_hits(),
        "hot_answers": cache.hot().count(),
        "hot_hits": cache.hot().hits(),
    })
}
