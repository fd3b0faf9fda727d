//! sluice's HTTP/2 upstream pool against a mock that allows 10 concurrent
//! streams a connection (as providers set some limit): it opens connections
//! as streams need them, queues past `max_connections`, closes idle ones
//! but one, and rides out a GOAWAY. Over h2c and TLS + h2.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use sluice::config::Config;
use sluice::mock::MockServer;
use sluice::server::{self, Running};
use sluice::state::Shared;
use tokio::net::TcpListener;

use crate::support::{
    CLIENT_KEY, Opts, Transport, config_text, eventually_async, h1_client, pki, sample, scrape_at, send,
};

const STREAM_LIMIT: u32 = 10;

async fn limited_mock(t: Transport, addr: SocketAddr) -> MockServer {
    let listener = TcpListener::bind(addr).await.unwrap();
    let tls =
        (t == Transport::TlsH2).then(|| tokio_rustls::TlsAcceptor::from(pki::server_config(&[b"h2", b"http/1.1"])));
    MockServer::serve_limited(listener, tls, STREAM_LIMIT)
}

async fn gateway(t: Transport, mock: &MockServer, upstream_extra: &'static str) -> Running {
    gateway_waiting(t, mock, upstream_extra, "20s").await
}

/// A gateway whose upstream waits `header_timeout` for an answer's head.
async fn gateway_waiting(
    t: Transport,
    mock: &MockServer,
    upstream_extra: &'static str,
    header_timeout: &str,
) -> Running {
    let opts = Opts { transport: t, upstream_extra, ..Opts::default() };
    let text = config_text(&mock.base_url(), &opts)
        .replace("[client]\n", "[client]\npool_idle_timeout = \"1s\"\n")
        .replace("header_timeout = \"2s\"", &format!("header_timeout = \"{header_timeout}\""));
    let config = Config::from_toml(&text, Path::new("test.toml"), &|_| None).unwrap();
    server::spawn(Shared::new(config).unwrap()).await.unwrap()
}

/// `n` concurrent chats that each wait `latency_ms` at the mock; their statuses.
async fn burst(gateway: &Running, n: usize, latency_ms: u64) -> Vec<u16> {
    let latency = latency_ms.to_string();
    burst_with(gateway, n, &[("x-mock-latency-ms", &latency)]).await
}

/// `n` concurrent streamed chats with `headers` for the mock; their statuses.
async fn burst_with(gateway: &Running, n: usize, headers: &[(&str, &str)]) -> Vec<u16> {
    let addr = gateway.addr;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let mut request = Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("authorization", format!("Bearer {CLIENT_KEY}"))
                .header("content-type", "application/json");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            let request = request
                .body(Full::new(Bytes::from_static(br#"{"model":"plain","stream":true,"messages":[]}"#)))
                .unwrap();
            tokio::spawn(async move { send(&h1_client(), request).await.status.as_u16() })
        })
        .collect();
    let mut statuses = Vec::with_capacity(n);
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    statuses
}

async fn connections(gateway: &Running, state: &str) -> f64 {
    sample(&scrape_at(gateway.addr).await, "sluice_upstream_connections", &[("upstream", "mock"), ("state", state)])
}

/// Requests waiting for a stream slot now, as `/metrics` says.
async fn queued(gateway: &Running) -> f64 {
    sample(&scrape_at(gateway.addr).await, "sluice_upstream_queued", &[("upstream", "mock")])
}

async fn streams_open_a_connection_each_ten_and_idle_ones_close(t: Transport) {
    let mock = limited_mock(t, SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let gateway = gateway(t, &mock, "").await;
    assert_eq!(burst(&gateway, 50, 1500).await, [200; 50]);
    let stats = mock.state.stats();
    assert_eq!(stats.peak_in_flight, 50, "all 50 were open at the mock at once");
    assert_eq!(stats.http2_requests, 50);
    assert!((5..=6).contains(&stats.connections), "10 streams a connection: 5 connections, got {}", stats.connections);
    // Idle past pool_idle_timeout (1 s), every connection but one warm one closes.
    eventually_async("extra connections close when idle", || async { mock.state.stats().connections_open == 1 }).await;
    assert_eq!((connections(&gateway, "idle").await, connections(&gateway, "active").await), (1.0, 0.0));
    assert_eq!(burst(&gateway, 5, 0).await, [200; 5], "the warm one serves");
    assert_eq!(mock.state.stats().connections, stats.connections, "no new connection for 5 streams");
}

async fn past_max_connections_streams_wait_in_line(t: Transport) {
    let mock = limited_mock(t, SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let gateway = gateway(t, &mock, "max_connections = 2").await;
    assert_eq!(burst(&gateway, 50, 1000).await, [200; 50], "none fails before header_timeout");
    let stats = mock.state.stats();
    assert_eq!(stats.peak_in_flight, 20, "two connections of ten streams");
    assert_eq!(stats.connections, 2);
    let scrape = scrape_at(gateway.addr).await;
    let waited = sample(&scrape, "sluice_upstream_queue_wait_seconds_count", &[("upstream", "mock")]);
    assert!(waited >= 30.0, "at least 30 waited in line: {waited}");
}

async fn a_goaway_under_load_costs_no_request(t: Transport) {
    let mut first = limited_mock(t, SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let addr = first.addr;
    let gateway = Arc::new(gateway(t, &first, "").await);
    let load = {
        let gateway = Arc::clone(&gateway);
        tokio::spawn(async move { burst(&gateway, 20, 400).await })
    };
    eventually_async("20 requests in flight at the mock", || async { first.state.stats().requests == 20 }).await;
    // The mock says GOAWAY on every connection and stops listening; its
    // streams in flight finish. A new mock takes the address.
    first.stop();
    let mut second = None;
    for _ in 0..200 {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                let tls = (t == Transport::TlsH2)
                    .then(|| tokio_rustls::TlsAcceptor::from(pki::server_config(&[b"h2", b"http/1.1"])));
                second = Some(MockServer::serve_limited(listener, tls, STREAM_LIMIT));
                break;
            }
            Err(_) => tokio::task::yield_now().await,
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let second = second.expect("the address comes free");
    assert_eq!(load.await.unwrap(), [200; 20], "streams under the GOAWAY finish");
    assert_eq!(burst(&gateway, 20, 0).await, [200; 20], "new streams go to a new connection");
    assert_eq!(second.state.stats().requests, 20);
    assert_eq!(first.state.stats().requests, 20);
}

async fn a_request_timed_out_in_line_was_never_sent_and_the_line_moves_on(t: Transport) {
    let mock = limited_mock(t, SocketAddr::from(([127, 0, 0, 1], 0))).await;
    let extra = "max_connections = 1\nbreaker_failures = 1000";
    let gateway = Arc::new(gateway_waiting(t, &mock, extra, "2s").await);
    // Ten streams of 20 chunks 250 ms apart hold the one connection's ten
    // slots for 5 s (their heads came at once: no header_timeout for them).
    let holding = {
        let gateway = Arc::clone(&gateway);
        tokio::spawn(
            async move { burst_with(&gateway, 10, &[("x-mock-chunks", "20"), ("x-mock-gap-ms", "250")]).await },
        )
    };
    eventually_async("ten streams open", || async { mock.state.stats().requests == 10 }).await;
    let waiting = {
        let gateway = Arc::clone(&gateway);
        tokio::spawn(async move { burst(&gateway, 20, 0).await })
    };
    eventually_async("twenty in line", || async { queued(&gateway).await == 20.0 }).await;
    assert_eq!(waiting.await.unwrap(), [504; 20], "no slot came free within header_timeout");
    assert_eq!(queued(&gateway).await, 0.0, "those that gave up left the line");
    assert_eq!(mock.state.stats().requests, 10, "the 20 that waited in line never reached the mock");
    assert_eq!(connections(&gateway, "connecting").await, 0.0);
    let scrape = scrape_at(gateway.addr).await;
    let charged = sample(&scrape, "sluice_upstream_attempts_total", &[("upstream", "mock"), ("outcome", "timeout")]);
    assert_eq!(charged, 0.0, "a wait in sluice's own line is no upstream timeout: no key is charged");
    assert_eq!(holding.await.unwrap(), [200; 10]);
    assert_eq!(burst(&gateway, 5, 0).await, [200; 5], "the line is not stuck");
    assert_eq!(mock.state.stats().requests, 15);
}

async fn a_connection_given_up_while_opening_frees_its_place(t: Transport) {
    // A peer that accepts and never speaks: the first PING is never answered.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (seen, ended) = (Arc::clone(&accepted), Arc::clone(&closed));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let ended = Arc::clone(&ended);
            // Reads (and ignores) what comes, never answers; notes the close.
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut socket, &mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    let scheme = if t == Transport::TlsH2 { "https" } else { "http" };
    let opts = Opts { transport: t, upstream_extra: "max_connections = 1\nbreaker_failures = 1000", ..Opts::default() };
    let text = config_text(&format!("{scheme}://{addr}/v1"), &opts)
        .replace("header_timeout = \"2s\"", "header_timeout = \"1s\"\nconnect_timeout = \"30s\"");
    let config = Config::from_toml(&text, Path::new("test.toml"), &|_| None).unwrap();
    let gateway = server::spawn(Shared::new(config).unwrap()).await.unwrap();
    assert_eq!(burst(&gateway, 1, 0).await, [504]);
    assert_eq!(burst(&gateway, 1, 0).await, [504]);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2, "the second request could open a connection");
    // Each half-opened connection closes when its opener gives up, not at the
    // next keep-alive check.
    crate::support::eventually("both sockets closed", || closed.load(std::sync::atomic::Ordering::SeqCst) == 2).await;
}

crate::per_transport_h2!(
    streams_open_a_connection_each_ten_and_idle_ones_close,
    past_max_connections_streams_wait_in_line,
    a_goaway_under_load_costs_no_request,
    a_request_timed_out_in_line_was_never_sent_and_the_line_moves_on,
    a_connection_given_up_while_opening_frees_its_place
);

/// A peer that answers one request, then falls silent with the connection
/// open (it stops reading, so PINGs go unanswered): the pool's keep-alive
/// finds it dead and drops it before a request does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stops_answering_pings_is_dropped() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (silent_tx, silent_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::handshake(socket).await.unwrap();
        let (_request, mut respond) = conn.accept().await.unwrap().unwrap();
        let head = http::Response::builder().status(200).header("content-type", "application/json").body(()).unwrap();
        let mut body = respond.send_response(head, false).unwrap();
        body.send_data(Bytes::from_static(br#"{"id":"x","object":"chat.completion","choices":[]}"#), true).unwrap();
        // Polled until the client has its answer, then never again.
        tokio::select! {
            _ = conn.accept() => {}
            _ = silent_rx => {}
        }
        std::future::pending::<()>().await;
        drop(conn);
    });
    let opts = Opts {
        transport: Transport::H2c,
        upstream_extra: "keepalive_interval = \"200ms\"\nkeepalive_timeout = \"300ms\"",
        ..Opts::default()
    };
    let config =
        Config::from_toml(&config_text(&format!("http://{addr}/v1"), &opts), Path::new("test.toml"), &|_| None)
            .unwrap();
    let gateway = server::spawn(Shared::new(config).unwrap()).await.unwrap();
    let request = Request::post(format!("http://{}/v1/chat/completions", gateway.addr))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain","messages":[]}"#)))
        .unwrap();
    assert_eq!(send(&h1_client(), request).await.status, http::StatusCode::OK);
    assert_eq!(connections(&gateway, "idle").await, 1.0, "kept warm");
    let _ = silent_tx.send(());
    eventually_async("the silent connection is dropped", || async {
        connections(&gateway, "idle").await + connections(&gateway, "active").await == 0.0
    })
    .await;
}

/// A stream the peer refuses unprocessed (`REFUSED_STREAM`) is sent again
/// at once, even a request that may not be repeated once processed (an
/// assistant's creation): the peer guarantees it never saw it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_sent_again_even_when_not_repeatable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&streams);
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::handshake(socket).await.unwrap();
        while let Some(Ok((_request, mut respond))) = conn.accept().await {
            if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                continue;
            }
            let head =
                http::Response::builder().status(200).header("content-type", "application/json").body(()).unwrap();
            let mut body = respond.send_response(head, false).unwrap();
            body.send_data(Bytes::from_static(br#"{"id":"asst_1","object":"assistant"}"#), true).unwrap();
        }
    });
    let opts = Opts { transport: Transport::H2c, ..Opts::default() };
    let config =
        Config::from_toml(&config_text(&format!("http://{addr}/v1"), &opts), Path::new("test.toml"), &|_| None)
            .unwrap();
    let gateway = server::spawn(Shared::new(config).unwrap()).await.unwrap();
    let request = Request::post(format!("http://{}/v1/assistants", gateway.addr))
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"model":"plain","name":"helper"}"#)))
        .unwrap();
    let reply = send(&h1_client(), request).await;
    assert_eq!(reply.status, http::StatusCode::OK, "{:?}", reply.body);
    assert_eq!(streams.load(std::sync::atomic::Ordering::SeqCst), 2, "refused once, then answered");
    let scrape = scrape_at(gateway.addr).await;
    assert_eq!(sample(&scrape, "sluice_retries_total", &[("reason", "stale_connection")]), 1.0, "counted");
}
