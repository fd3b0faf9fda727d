//! SSE passes through frame by frame, byte for byte; a client that leaves
//! cancels the upstream; an upstream that breaks ends the client's stream
//! with one error event and an abnormal end.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::per_transport;
use crate::support::{CLIENT_KEY, Harness, Opts, Transport, eventually, raw_exchange};

const STREAM_BODY: &str = r#"{"model":"plain","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;

fn stream_request(url: String, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::post(url)
        .header("authorization", format!("Bearer {CLIENT_KEY}"))
        .header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(Bytes::from_static(STREAM_BODY.as_bytes()))).unwrap()
}

/// Reads a response body frame by frame: (frames, bytes, ended with an error).
async fn read_frames(body: hyper::body::Incoming) -> (Vec<Bytes>, Bytes, bool) {
    let mut body = body;
    let mut frames = Vec::new();
    let mut all = BytesMut::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("stream stalled") {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    all.extend_from_slice(&data);
                    frames.push(data);
                }
            }
            Some(Err(_)) => return (frames, all.freeze(), true),
            None => return (frames, all.freeze(), false),
        }
    }
}

async fn harness(t: Transport) -> Harness {
    Harness::start_with(Opts { transport: t, ..Opts::default() }).await
}

per_transport!(
    stream_bytes_identical_to_direct_and_events_never_held_back,
    client_leaving_cancels_the_upstream_stream,
    upstream_break_ends_with_error_event_and_abnormal_end_http1,
    upstream_break_resets_the_http2_stream,
);

async fn stream_bytes_identical_to_direct_and_events_never_held_back(t: Transport) {
    let h = harness(t).await;
    let headers = [("x-mock-chunks", "6"), ("x-mock-gap-ms", "15")];
    // Straight to a cleartext mock: the bytes any upstream sends for this.
    let plain = Harness::start().await;
    let direct =
        h.h1.request(stream_request(format!("{}/chat/completions", plain.mock.base_url()), &headers)).await.unwrap();
    let (_, direct_bytes, direct_err) = read_frames(direct.into_body()).await;
    assert!(!direct_err);
    // Through sluice, over both client protocols.
    for client in [&h.h1, &h.h2] {
        h.mock.state.reset();
        let response = client.request(stream_request(h.url("/v1/chat/completions"), &headers)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let (frames, bytes, errored) = read_frames(response.into_body()).await;
        assert!(!errored);
        assert_eq!(bytes, direct_bytes, "bytes through sluice differ from the upstream's");
        // 6 content events + finish + usage + [DONE], sent 15 ms apart: each
        // arrives on its own (sluice joins only bytes that arrived together).
        assert_eq!(frames.len(), 9, "frames were held back or split: {frames:?}");
        assert!(frames.iter().all(|f| f.starts_with(b"data: ") && f.ends_with(b"\n\n")));
        assert_eq!(h.stats().streams_finished, 1);
    }
}

async fn client_leaving_cancels_the_upstream_stream(t: Transport) {
    let h = harness(t).await;
    for client in [&h.h1, &h.h2] {
        h.mock.state.reset();
        let response = client
            .request(stream_request(
                h.url("/v1/chat/completions"),
                &[("x-mock-chunks", "200"), ("x-mock-gap-ms", "20")],
            ))
            .await
            .unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().unwrap().starts_with(b"data: "));
        drop(body);
        eventually("the mock sees the stream cancelled", || h.stats().streams_cancelled == 1).await;
        assert_eq!(h.stats().streams_finished, 0);
    }
}

async fn upstream_break_ends_with_error_event_and_abnormal_end_http1(t: Transport) {
    let h = harness(t).await;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CLIENT_KEY}\r\ncontent-type: application/json\r\nx-mock-drop-after: 2\r\nx-mock-gap-ms: 20\r\ncontent-length: {}\r\n\r\n{STREAM_BODY}",
        STREAM_BODY.len()
    );
    let wire = raw_exchange(h.gateway.addr, request.as_bytes()).await;
    let text = String::from_utf8_lossy(&wire);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("transfer-encoding: chunked"), "{text}");
    assert_eq!(text.matches("tok").count(), 2, "two content events first: {text}");
    assert_eq!(text.matches("upstream_stream_error").count(), 1, "one error event: {text}");
    assert!(!text.contains("[DONE]"));
    assert!(!wire.ends_with(b"0\r\n\r\n"), "a clean chunked end would pass for a complete answer: {text}");
    assert_eq!(h.stats().streams_dropped, 1);
}

async fn upstream_break_resets_the_http2_stream(t: Transport) {
    let h = harness(t).await;
    let response = h
        .h2
        .request(stream_request(h.url("/v1/chat/completions"), &[("x-mock-drop-after", "3"), ("x-mock-gap-ms", "20")]))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (frames, bytes, errored) = read_frames(response.into_body()).await;
    assert!(errored, "the h2 stream must end with a reset, not END_STREAM");
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(text.matches("tok").count(), 3);
    let last = String::from_utf8_lossy(frames.last().unwrap());
    assert!(last.starts_with("data: {\"error\":") && last.contains("\"type\":\"upstream_error\""), "{last}");
}
