//! `[server]`: the listener. Where it listens, how long a drain may take, what
//! a client may send (body, headers), how many connections it holds and for
//! how long, and TLS termination.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::units::{ByteSize, HumanDuration};
use super::{ConfigError, Validator};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default grace period for draining on shutdown (seconds).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default cap on a request body (bytes): 8 MiB.
pub const DEFAULT_MAX_BODY: u64 = 8 << 20;
/// Default listen backlog (connections waiting to be accepted); capped by the
/// kernel's `net.core.somaxconn`.
pub const DEFAULT_BACKLOG: u32 = 4096;
/// Default cap on one request's headers (bytes): 64 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 64 << 10;
/// Default time a connection may sit with no request in flight (seconds):
/// 5 minutes. HTTP/1.1 keep-alive connections also end after 30 s without
/// a new request's headers.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time a client may leave an answer unread (seconds): past it the
/// connection is closed and the upstream request released.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a new connection gets for its TLS handshake, or to show
/// which protocol it speaks (seconds).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most event loops `[server] event_loops` may ask for (a thread each).
pub const MAX_EVENT_LOOPS: usize = 256;
/// File descriptors kept back from `max_connections` for upstream
/// connections, logs and the store, when it is derived from the fd limit.
const FDS_KEPT_BACK: u64 = 64;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    workers: Option<usize>,
    event_loops: Option<usize>,
    overhead_header: Option<bool>,
    listen: Option<String>,
    shutdown_grace: Option<HumanDuration>,
    max_body: Option<ByteSize>,
    backlog: Option<u32>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    max_header_bytes: Option<ByteSize>,
    idle_timeout: Option<HumanDuration>,
    send_timeout: Option<HumanDuration>,
    handshake_timeout: Option<HumanDuration>,
    tls: Option<RawTls>,
    trusted_proxies: Option<Vec<String>>,
    drain_delay: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// How long shutdown waits for in-flight requests and streams.
    pub shutdown_grace: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body: u64,
    /// Add `x-sluice-overhead-us` to proxied answers.
    pub overhead_header: bool,
    /// Runtime worker threads; 0 = one per core.
    pub workers: usize,
    /// Single-threaded event loops that serve client connections (each
    /// connection stays on one, handed out in turn); 0 = connections run on
    /// the runtime's workers.
    pub event_loops: usize,
    /// Listen backlog asked of the kernel (it caps it at `somaxconn`).
    pub backlog: u32,
    /// Client connections held at once; past it, new ones wait in the backlog.
    pub max_connections: usize,
    /// Client connections one IP address may hold at once; past it, its new
    /// connections are closed at once (so one client cannot take them all).
    pub max_connections_per_ip: usize,
    /// Largest request head (all headers) accepted, in bytes.
    pub max_header_bytes: u64,
    /// Longest time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Longest time an answer may wait for the client to read it.
    pub send_timeout: Duration,
    /// Longest TLS handshake, or wait for a new connection's first bytes.
    pub handshake_timeout: Duration,
    /// TLS termination, if configured.
    pub tls: Option<TlsConfig>,
    /// Proxies in front of sluice whose `X-Forwarded-For` / `Forwarded` are
    /// believed (for the client address) and extended rather than replaced.
    pub trusted_proxies: Vec<Cidr>,
    /// After a stop signal, how long `/health` answers `draining` while
    /// sluice still accepts and serves (so a load balancer notices first).
    pub drain_delay: Duration,
}

/// An address block, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR` or `ADDR/PREFIX`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = text.trim().split_once('/').map_or((text.trim(), None), |(a, p)| (a, Some(p)));
        let addr: std::net::IpAddr = addr.parse().map_err(|_| format!("`{text}` is not an address or ADDR/PREFIX"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => {
                p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("`{text}`: prefix 0 to {max}"))?
            }
            None => max,
        };
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` is in the block (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
                (u128::from(u32::from(a)), u128::from(u32::from(b)), 32)
            }
            (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

/// `[server.tls]`: certificate chain and key (PEM), and the CAs that sign
/// client certificates when clients must present one (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf.
    pub key: PathBuf,
    /// CAs for client certificates; set = every client must present one.
    pub client_ca: Option<PathBuf>,
}

/// The soft limit on open files, from `/proc/self/limits` (no libc call).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The default `max_connections`: half of what the fd limit leaves after the
/// descriptors kept back (each client connection may hold an upstream one).
pub fn default_max_connections() -> usize {
    let limit = open_files_limit().unwrap_or(1024);
    usize::try_from((limit.saturating_sub(FDS_KEPT_BACK) / 2).max(16)).unwrap_or(usize::MAX)
}

/// The default `max_connections_per_ip`: a quarter of `max_connections`, at
/// least 16 (so clients behind one NAT still fit, and no single one holds all).
pub fn default_max_connections_per_ip(max_connections: usize) -> usize {
    (max_connections / 4).max(16)
}

impl Validator<'_> {
    pub(super) fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        // SLUICE_LISTEN beats the file, so one config serves several ports.
        let (listen_text, field) = match (self.env)("SLUICE_LISTEN") {
            Some(env) => (env, "SLUICE_LISTEN (environment)"),
            None => (raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string()), "server.listen"),
        };
        let listen = listen_text
            .parse()
            .map_err(|e| self.invalid(field, format!("`{listen_text}` is not an address like 127.0.0.1:8080: {e}")))?;
        let max_body = raw.max_body.map_or(DEFAULT_MAX_BODY, |b| b.0);
        if max_body == 0 {
            return Err(self.invalid("server.max_body", "must be greater than zero"));
        }
        let max_header_bytes = raw.max_header_bytes.map_or(DEFAULT_MAX_HEADER_BYTES, |b| b.0);
        if !(8192..=(16 << 20)).contains(&max_header_bytes) {
            return Err(self.invalid("server.max_header_bytes", "must be between 8KiB and 16MiB"));
        }
        let max_connections = raw.max_connections.unwrap_or_else(default_max_connections);
        if max_connections == 0 {
            return Err(self.invalid("server.max_connections", "must be at least 1"));
        }
        let max_connections_per_ip =
            raw.max_connections_per_ip.unwrap_or_else(|| default_max_connections_per_ip(max_connections));
        if max_connections_per_ip == 0 {
            return Err(self.invalid("server.max_connections_per_ip", "must be at least 1"));
        }
        let backlog = raw.backlog.unwrap_or(DEFAULT_BACKLOG);
        if backlog == 0 {
            return Err(self.invalid("server.backlog", "must be at least 1"));
        }
        let event_loops = raw.event_loops.unwrap_or(0);
        if event_loops > MAX_EVENT_LOOPS {
            return Err(self.invalid("server.event_loops", format!("at most {MAX_EVENT_LOOPS}")));
        }
        let tls = raw.tls.map(|tls| self.tls(tls)).transpose()?;
        Ok(ServerConfig {
            workers: raw.workers.unwrap_or(0),
            event_loops,
            overhead_header: raw.overhead_header.unwrap_or(false),
            listen,
            shutdown_grace: raw.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0),
            max_body,
            backlog,
            max_connections,
            max_connections_per_ip,
            max_header_bytes,
            idle_timeout: raw.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
            send_timeout: raw.send_timeout.map_or(DEFAULT_SEND_TIMEOUT, |d| d.0),
            handshake_timeout: raw.handshake_timeout.map_or(DEFAULT_HANDSHAKE_TIMEOUT, |d| d.0),
            tls,
            drain_delay: raw.drain_delay.map_or(Duration::ZERO, |d| d.0),
            trusted_proxies: raw
                .trusted_proxies
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(i, text)| Cidr::parse(text).map_err(|e| self.invalid(format!("server.trusted_proxies[{i}]"), e)))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Checks the TLS files now, so `sluice check` names a bad or mismatched pair.
    fn tls(&self, raw: RawTls) -> Result<TlsConfig, ConfigError> {
        let path = |p: &Path| self.base_dir.join(p);
        let tls =
            TlsConfig { cert: path(&raw.cert), key: path(&raw.key), client_ca: raw.client_ca.as_deref().map(path) };
        super::tls::certified_key(&tls.cert, &tls.key).map_err(|e| self.invalid("server.tls", e))?;
        if let Some(ca) = &tls.client_ca {
            super::tls::read_certificates(ca).map_err(|e| self.invalid("server.tls.client_ca", e))?;
        }
        Ok(tls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fd_limit_is_read_and_halved() {
        let limit = open_files_limit().expect("/proc/self/limits names the open-files limit");
        assert!(limit > 0);
        assert_eq!(default_max_connections() as u64, (limit.saturating_sub(FDS_KEPT_BACK) / 2).max(16));
    }
}
