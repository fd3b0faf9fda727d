//! A raw HTTP/1.1 upstream on loopback that plays a script, one act per
//! request it reads whole (on whichever connection), and keeps what it read:
//! for what the mock cannot do (close under a request, answer garbage).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted upstream does with one request.
#[derive(Clone, Copy, Debug)]
pub enum Act {
    /// Write these bytes and keep the connection open for the next request.
    Answer(&'static [u8]),
    /// Close the connection without answering.
    Close,
}

/// A 200 with a small chat answer.
pub const OK_CHAT: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 28\r\n\r\n{\"object\":\"chat.completion\"}";

/// A running scripted upstream.
pub struct Scripted {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    accepted: Arc<AtomicUsize>,
}

impl Scripted {
    /// Plays `script` in order; past its end, every request is closed on.
    pub async fn start(script: Vec<Act>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(script);
        let (seen, count) = (Arc::clone(&requests), Arc::clone(&accepted));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, Arc::clone(&script), Arc::clone(&seen)));
            }
        });
        Self { addr, requests, accepted }
    }

    /// The request lines (`POST /v1/... HTTP/1.1`) read so far, in order.
    pub fn request_lines(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, script: Arc<Vec<Act>>, seen: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    while let Some(line) = read_request(&mut stream, &mut buf).await {
        let act = {
            let mut seen = seen.lock().unwrap();
            seen.push(line);
            script.get(seen.len() - 1).copied().unwrap_or(Act::Close)
        };
        match act {
            Act::Answer(bytes) => {
                if stream.write_all(bytes).await.is_err() {
                    return;
                }
            }
            Act::Close => return,
        }
    }
}

/// Reads one request (head and `content-length` body); its request line, or
/// `None` at end of stream.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap_or(0));
            if buf.len() >= end + 4 + length {
                let request: Vec<u8> = buf.drain(..end + 4 + length).collect();
                let line = String::from_utf8_lossy(&request).lines().next().unwrap_or_default().to_string();
                return Some(line);
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
