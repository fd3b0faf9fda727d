//! Client limits every instance shares: one Lua script per admitted request
//! (one round trip) checks the key's day budget and its minute and hour
//! windows and counts the request, atomically on the Redis server, so N
//! instances admit exactly what one would.
//!
//! The windows are the in-process limiter's ([`crate::access::limits`]): 60
//! sub-buckets per window, the oldest counted whole, so no span of 60 s ever
//! holds more than `rpm`. Each window is one Redis hash (bucket index ->
//! count, with the running total of the buckets still counted and the oldest
//! of them, so a request reads two fields, not 61) that expires with the
//! window. Time is Redis's own clock (`TIME`),
//! so instances whose clocks disagree still share one window. The day budget
//! reads a per-day counter that finished answers add to ([`TokenTally`],
//! written in batches as they come).
//!
//! [`TokenTally`]: crate::access::limits::TokenTally

use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;

use crate::access::limits::{Exceeded, utc_day};
use crate::access::store::unix_now;
use crate::access::table::Client;
use crate::error::ProxyError;
use crate::tasks::Tasks;
use crate::telemetry::account::RateHeaders;

use super::{Cluster, Lane};

/// KEYS: minute hash, hour hash, today's tokens. ARGV: rpm, rph, budget (0:
/// none), the tokens this instance knows the key used today (a floor: what
/// the store counted before a budget was set or Redis was emptied), and, for
/// tests only, the time in ms to use instead of Redis's clock. Returns {verdict (0 admitted, 1 rpm, 2 rph, 3 tokens), minute
/// remaining, minute reset ms, hour remaining, hour reset ms, tokens used}.
pub const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(ARGV[5]) or (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local out = {0, 0, 0, 0, 0, 0}
local budget = tonumber(ARGV[3])
if budget > 0 then
  local used = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), tonumber(ARGV[4]))
  out[6] = used
  if used >= budget then out[1] = 3 return table.concat(out, ' ') end
end
local pending = {}
for w = 1, 2 do
  local limit = tonumber(ARGV[w])
  if limit > 0 then
    local span = (w == 1) and 60000 or 3600000
    local width = span / 60
    local index = math.floor(now / width)
    local first = index - 60
    -- 't' is the total of buckets f..index; a bucket leaving the window
    -- is taken off it once, so a request costs a few field reads, not 61.
    local state = redis.call('HMGET', KEYS[w], 'f', 't')
    local f, total = tonumber(state[1]), tonumber(state[2]) or 0
    local was = f
    if f == nil or f > index or index - f > 121 then
      if f ~= nil then redis.call('DEL', KEYS[w]) end
      f, total = first, 0
    end
    while f < first do
      local gone = redis.call('HGET', KEYS[w], f)
      if gone then
        total = total - tonumber(gone)
        redis.call('HDEL', KEYS[w], f)
      end
      f = f + 1
    end
    if f ~= was then
      redis.call('HSET', KEYS[w], 'f', f, 't', total)
      redis.call('PEXPIRE', KEYS[w], span + width)
    end
    local oldest = nil
    if total >= limit then
      for b = f, index do
        if redis.call('HEXISTS', KEYS[w], b) == 1 then oldest = b break end
      end
    end
    local slot = 2 * w
    if total >= limit then
      out[1] = w
      out[slot + 1] = ((oldest or index) + 61) * width - now
      return table.concat(out, ' ')
    end
    out[slot] = limit - total - 1
    out[slot + 1] = (index + 61) * width - now
    pending[#pending + 1] = {KEYS[w], index, span + width}
  end
end
for _, p in ipairs(pending) do
  redis.call('HINCRBY', p[1], p[2], 1)
  redis.call('HINCRBY', p[1], 't', 1)
  redis.call('PEXPIRE', p[1], p[3])
end
return table.concat(out, ' ')
";

static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ADMIT));

/// How long a day's token counter is kept: the day and the next, for
/// instances whose clocks straddle midnight.
const TOKENS_KEPT: Duration = Duration::from_secs(2 * 86_400);
/// How often a batch of tokens Redis did not take is sent again.
const TOKENS_EVERY: Duration = Duration::from_millis(200);

/// Redis key of a client's day tokens.
fn tokens_key(shared_id: &str, day: u64) -> String {
    format!("sluice:tok:{shared_id}:{day}")
}

/// The script's six numbers.
fn six(text: &str) -> Option<[i64; 6]> {
    // Lua prints whole numbers as such (past 10^14 in exponent form).
    let mut numbers =
        text.split(' ').map(|n| n.parse::<i64>().ok().or_else(|| n.parse::<f64>().ok().map(|f| f as i64)));
    let mut out = [0; 6];
    for slot in &mut out {
        *slot = numbers.next()??;
    }
    Some(out)
}

/// What the shared limits said.
#[derive(Debug)]
pub enum SharedVerdict {
    /// Admitted, with the `x-ratelimit-*` values.
    Admitted(RateHeaders),
    /// Refused, with the error and the values for its answer.
    Refused(ProxyError, RateHeaders),
    /// Redis could not say (down, late): `[redis] on_error` decides.
    Unavailable,
}

impl Cluster {
    /// Charges one request of `client` (which has limits) to the limits every
    /// instance shares.
    pub async fn admit(&self, client: &Client) -> SharedVerdict {
        let limits = client.limits;
        let unix = unix_now().max(0) as u64;
        let day = utc_day(unix);
        let windows = client.shared_windows.get_or_init(|| {
            let id = &client.shared_id;
            Box::new([format!("sluice:rl:{id}:m"), format!("sluice:rl:{id}:h")])
        });
        // The day's key only when there is a budget to read it for.
        let tokens = match limits.tokens_per_day {
            Some(_) => tokens_key(&client.shared_id, day),
            None => String::new(),
        };
        let args = [
            u64::from(limits.rpm.unwrap_or(0)),
            u64::from(limits.rph.unwrap_or(0)),
            limits.tokens_per_day.unwrap_or(0),
            client.counters.tokens.used(day),
        ];
        let answer: Option<String> = self
            .run(Lane::Shared, "limits", |mut conn| async move {
                let mut invocation = SCRIPT.prepare_invoke();
                invocation.key(&windows[0]).key(&windows[1]).key(if tokens.is_empty() { &windows[0] } else { &tokens });
                invocation.arg(&args[..]);
                invocation.invoke_async(&mut conn).await
            })
            .await;
        let Some([verdict, minute_left, minute_reset, hour_left, hour_reset, used]) = answer.as_deref().and_then(six)
        else {
            return SharedVerdict::Unavailable;
        };
        let ms = |v: i64| Duration::from_millis(v.max(1) as u64);
        let mut rate = RateHeaders::default();
        if let Some(budget) = limits.tokens_per_day {
            let until_midnight = Duration::from_secs((day + 1) * 86_400 - unix);
            rate.tokens = Some((budget, budget.saturating_sub(used.max(0) as u64), until_midnight));
        }
        let minute = limits.rpm.map(|rpm| (rpm, minute_left.max(0) as u32, ms(minute_reset)));
        let hour = limits.rph.map(|rph| (rph, hour_left.max(0) as u32, ms(hour_reset)));
        let refused = |exceeded, rate: RateHeaders, retry_after| {
            let (error, rate) = client.refusal(exceeded, retry_after, rate);
            SharedVerdict::Refused(error, rate)
        };
        match verdict {
            0 => {
                // The tighter window is the one a client should watch.
                rate.requests = match (minute, hour) {
                    (Some(m), Some(h)) => Some(if h.1 < m.1 { h } else { m }),
                    (m, h) => m.or(h),
                };
                SharedVerdict::Admitted(rate)
            }
            1 => {
                rate.requests = minute.map(|(limit, ..)| (limit, 0, ms(minute_reset)));
                refused(Exceeded::Rpm, rate, ms(minute_reset))
            }
            2 => {
                rate.requests = hour.map(|(limit, ..)| (limit, 0, ms(hour_reset)));
                refused(Exceeded::Rph, rate, ms(hour_reset))
            }
            _ => {
                let until_midnight = Duration::from_secs((day + 1) * 86_400 - unix);
                refused(Exceeded::Tokens, rate, until_midnight)
            }
        }
    }
}

/// KEYS: this instance's batch counter, then the day counters. ARGV: the
/// batch's number, how long the counters are kept (s), then each counter's
/// tokens. A batch is applied once, however often it is sent (a reply lost
/// to the timeout is sent again): numbers only grow, one key per instance.
const ADD_TOKENS: &str = r"
if tonumber(redis.call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', 3600)
for i = 2, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[i + 1])
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
return 1
";

static ADD_TOKENS_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ADD_TOKENS));

/// Writes the tokens finished answers used to the shared day counters as
/// they come (whatever gathered while the last batch was on its way goes in
/// the next: one script each); a batch Redis did not confirm is sent again
/// as it was, under the same marker, before any newer one.
pub(super) fn start_token_writer(cluster: &Arc<Cluster>, tasks: &Tasks) {
    let cluster = Arc::clone(cluster);
    let stop = tasks.clone();
    tasks.spawn(async move {
        let mut unsent: Option<(Vec<String>, Vec<u64>)> = None;
        let mut batches = 0u64;
        loop {
            // At once when tokens come; a batch Redis did not take is tried
            // again every TOKENS_EVERY.
            let retry = if unsent.is_some() { TOKENS_EVERY } else { Duration::from_secs(3600) };
            let stopping = tokio::select! {
                () = stop.stopped() => true,
                () = cluster.tokens.pushed() => false,
                () = tokio::time::sleep(retry) => false,
            };
            if unsent.is_none() {
                let tallies = cluster.tokens.drain();
                if !tallies.is_empty() {
                    batches += 1;
                    let mut keys = vec![format!("sluice:tokbatch:{}", cluster.instance)];
                    let mut args = vec![batches, TOKENS_KEPT.as_secs()];
                    for (id, day, tokens) in tallies {
                        keys.push(tokens_key(&id, day));
                        args.push(tokens);
                    }
                    unsent = Some((keys, args));
                }
            }
            if let Some((keys, args)) = &unsent {
                let written = cluster
                    .run(Lane::Shared, "token usage", |mut conn| async move {
                        let mut invocation = ADD_TOKENS_SCRIPT.prepare_invoke();
                        invocation.key(&keys[..]).arg(&args[..]);
                        invocation.invoke_async::<i64>(&mut conn).await
                    })
                    .await;
                if written.is_some() {
                    unsent = None;
                }
            }
            if stopping {
                return;
            }
        }
    });
}
