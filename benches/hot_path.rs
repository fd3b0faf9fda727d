//! Micro-benchmarks of the request path, and one in-process end-to-end request.
//! Run: `cargo bench`; CI compiles them with `cargo bench --no-run`.

// Bench setup that cannot start is a failed bench: `expect` says why.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sluice::access::limits::{KeyCounters, KeyLimits, MAX_WINDOW_LIMIT};
use sluice::access::table::ClientTable;
use sluice::config::keys::Secret;
use sluice::config::{Config, Strategy};
use sluice::mock::MockServer;
use sluice::proxy::headers;
use sluice::proxy::sniff::sniff;
use sluice::routes::Routes;
use sluice::server;
use sluice::state::Shared;
use sluice::telemetry::metrics::{Endpoint, Histogram, ModelMetrics};
use sluice::upstream::keyring::{KeyRing, UpstreamKey};

fn ring(n: usize) -> Arc<KeyRing> {
    let keys =
        (0..n).map(|i| Arc::new(UpstreamKey::new(Secret::new(format!("sk-bench-{i}"))).expect("valid key"))).collect();
    Arc::new(KeyRing::new(keys))
}

fn keyring(c: &mut Criterion) {
    let mut group = c.benchmark_group("keyring_pick");
    let ring3 = ring(3);
    group.bench_function("round_robin_1_thread", |b| {
        b.iter(|| black_box(ring3.pick(Strategy::RoundRobin, 1, |_| true)))
    });
    group.bench_function("least_in_flight_1_thread", |b| {
        b.iter(|| black_box(ring3.pick(Strategy::LeastInFlight, 1, |_| true)))
    });
    // Contended: two threads picking from the same ring (the machine has two cores).
    group.bench_function("round_robin_2_threads", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..2 {
                    let ring = Arc::clone(&ring3);
                    scope.spawn(move || {
                        for _ in 0..iters {
                            black_box(ring.pick(Strategy::RoundRobin, 1, |_| true));
                        }
                    });
                }
            });
            started.elapsed() / 2
        })
    });
    group.finish();
}

/// The client limiter: one request charged to a key's minute and hour
/// windows, alone and with two threads charging the same key (the worst
/// case: every request of both cores on one key).
fn limiter(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_limits");
    let limits = KeyLimits { rpm: Some(MAX_WINDOW_LIMIT), rph: Some(MAX_WINDOW_LIMIT), tokens_per_day: None };
    // 100 ms apart: windows roll over as they do live and every request is
    // admitted (the path a governed key takes on every request).
    let now = |i: u64| 10_000_000 + i * 100;
    group.bench_function("rpm_rph_1_thread", |b| {
        b.iter_custom(|iters| {
            let counters = KeyCounters::default();
            let started = Instant::now();
            for i in 0..iters {
                let _ = black_box(counters.admit(&limits, now(i), 0));
            }
            started.elapsed()
        })
    });
    group.bench_function("rpm_rph_2_threads_one_key", |b| {
        b.iter_custom(|iters| {
            let counters = KeyCounters::default();
            let started = Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..2 {
                    let counters = &counters;
                    scope.spawn(move || {
                        for i in 0..iters {
                            let _ = black_box(counters.admit(&limits, now(i), 0));
                        }
                    });
                }
            });
            started.elapsed() / 2
        })
    });
    let headers = {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer sk-sluice-Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56"));
        h
    };
    let text = "[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nkeys = [\"sk-sluice-Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56\"]\n[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:9\"\nkeys = [\"k\"]\n[[models]]\nname = \"*\"\nupstream = \"u\"\n";
    let config = Config::from_toml(text, Path::new("bench.toml"), &|_| None).expect("config");
    let routes = Routes::new(&config, None);
    let table = ClientTable::build(&config, &routes, None, None, None);
    group.bench_function("authenticate_sha256_lookup", |b| {
        b.iter(|| black_box(table.authenticate("/v1/chat/completions", black_box(&headers), None).is_ok()))
    });
    group.finish();
}

fn chat_body(size: usize) -> Vec<u8> {
    let filler = "x".repeat(size.saturating_sub(120));
    format!(r#"{{"messages":[{{"role":"user","content":"{filler}"}}],"model":"gpt-4o-mini","stream":true,"temperature":0.2}}"#).into_bytes()
}

fn request_sniff(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_sniff");
    let names: Vec<Box<str>> = vec!["max_tokens".into(), "temperature".into()];
    for size in [1 << 10, 64 << 10] {
        let body = chat_body(size);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| black_box(sniff(body, &names)))
        });
    }
    group.finish();
}

fn header_rewrite(c: &mut Criterion) {
    let mut template = HeaderMap::new();
    for (name, value) in [
        ("host", "gateway.local"),
        ("authorization", "Bearer sk-client-0123456789"),
        ("content-type", "application/json"),
        ("content-length", "1024"),
        ("accept", "*/*"),
        ("user-agent", "OpenAI/Python 1.54.0"),
        ("connection", "keep-alive"),
        ("x-stainless-lang", "python"),
    ] {
        template.insert(name, HeaderValue::from_static(value));
    }
    let id = HeaderValue::from_static("0b4c3f8e-3b1a-4c52-9d2e-7f1e2a3b4c5d");
    c.bench_function("header_rewrite_up_and_down", |b| {
        b.iter(|| {
            let mut up = template.clone();
            headers::to_upstream(&mut up, &id, false);
            let mut down = up;
            headers::to_client(&mut down, &id);
            black_box(down)
        })
    });
}

fn metrics_record(c: &mut Criterion) {
    let model = ModelMetrics::new("gpt-4o-mini", "openai");
    let histogram = Histogram::default();
    c.bench_function("metrics_record", |b| {
        b.iter(|| {
            model.count(Endpoint::ChatCompletions, black_box(200));
            histogram.observe(black_box(Duration::from_micros(850)));
        })
    });
}

fn end_to_end(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (gateway, _mock) = runtime.block_on(async {
        let mock = MockServer::start(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("mock");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nkeys = [\"sk-client\"]\n[[upstreams]]\nname = \"mock\"\nbase_url = \"{}\"\nkeys = [\"k1\", \"k2\", \"k3\"]\n[[models]]\nname = \"*\"\nupstream = \"mock\"\n",
            mock.base_url()
        );
        let config = Config::from_toml(&text, Path::new("bench.toml"), &|_| None).expect("config");
        let gateway = server::spawn(Shared::new(config).expect("state")).await.expect("gateway");
        (gateway, mock)
    });
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let url = format!("http://{}/v1/chat/completions", gateway.addr);
    let body = Bytes::from_static(br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}"#);
    c.bench_function("end_to_end_chat_through_sluice", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let request = Request::post(&url)
                    .header("authorization", "Bearer sk-client")
                    .header("content-type", "application/json")
                    .body(Full::new(body.clone()))
                    .expect("request");
                let response = client.request(request).await.expect("response");
                black_box(response.into_body().collect().await.expect("body").to_bytes())
            })
        })
    });
}

criterion_group!(benches, keyring, limiter, request_sniff, header_rewrite, metrics_record, end_to_end);
criterion_main!(benches);
