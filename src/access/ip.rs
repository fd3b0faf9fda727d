//! Requests without a client key (auth off, or exempt paths), limited per
//! client address: a sliding window per address, in a bounded concurrent map
//! whose idle entries expire, so no number of addresses grows it without end.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::access::limits::{Verdict, Window};

/// The address a client is counted under: an IPv4 address (or an
/// IPv4-mapped IPv6 one) as it is, an IPv6 address by its /64, which one
/// host usually holds whole (so rotating addresses in it gains nothing).
pub fn counted_as(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(std::net::Ipv6Addr::from(octets))
            }
        },
        v4 => v4,
    }
}

/// Addresses tracked at most (about 1 KiB each).
const MAX_ADDRESSES: u64 = 100_000;

/// Per-address request windows.
pub struct IpLimiter {
    windows: moka::sync::Cache<IpAddr, Arc<Window>>,
}

impl std::fmt::Debug for IpLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpLimiter").field("addresses", &self.windows.entry_count()).finish()
    }
}

impl Default for IpLimiter {
    fn default() -> Self {
        // An address idle for two windows has nothing left to count.
        let windows =
            moka::sync::Cache::builder().max_capacity(MAX_ADDRESSES).time_to_idle(Duration::from_secs(120)).build();
        Self { windows }
    }
}

impl IpLimiter {
    /// Admits one request from `ip` under `rpm` at clock time `now_ms`, or
    /// says how long until one fits.
    pub fn take(&self, ip: IpAddr, rpm: u32, now_ms: u64) -> Result<(), Duration> {
        let window = self.windows.get_with(counted_as(ip), || Arc::new(Window::default()));
        match window.take(rpm, Duration::from_secs(60), now_ms) {
            Verdict::Admitted { .. } => Ok(()),
            Verdict::Refused { retry_after } => Err(retry_after),
        }
    }
}
