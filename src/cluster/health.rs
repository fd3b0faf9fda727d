//! Upstream key health shared by every instance. A 429 cooldown, a key the
//! upstream refused and an operator's reset are published on [`CHANNEL`] the
//! moment they happen (every instance subscribes), and cooldowns and
//! disabled keys are kept in Redis under an expiry, so an instance that
//! starts later, or comes back after missing messages, reads them back
//! ([`resync`]); resets are numbered in Redis, so one missed meanwhile is
//! made on reading back too. Cache news (a purge, a newer answer stored)
//! cannot be read back: it is numbered in Redis instead, and a subscription
//! that finds another number than the last one the instance heard (or
//! cannot read it) drops the instance's copy of the cache in memory (what
//! Redis holds is found there at the next lookup).
//!
//! A cooldown travels as a duration, not a time of day (instances' clocks
//! may disagree): the Redis key expires when it ends, raised by one script
//! only if the new one ends later, so no instance ever shortens a cooldown
//! another set, and a receiving instance only ever extends its own
//! (`fetch_max`), never past its upstream's `max_cooldown`. A disabled key
//! is kept for [`DISABLED_KEPT`]; a reset deletes both. Received news is
//! applied to the keys directly and is never published again.
//!
//! [`CHANNEL`]: super::CHANNEL

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::StreamExt;

use super::{CHANNEL, Cluster, Lane, PROBE_EVERY};
use crate::clock::now_ms;
use crate::tasks::Tasks;
use crate::upstream::Upstream;
use crate::upstream::keyring::UpstreamKey;
use crate::upstream::news::KeyEvent;

/// How long a disabled key stays disabled for instances that start later
/// (the instances that saw it keep it disabled until a reset or reload).
pub const DISABLED_KEPT: Duration = Duration::from_secs(86_400);
/// Most events kept for a Redis that did not take them; past it cooldowns
/// go first (a later one will come), then the oldest.
const MAX_UNSENT: usize = 1_000;
/// How often the subscription is checked with a PING (a connection a NAT
/// or a failover left half-open would otherwise wait forever, silent).
const SUBSCRIPTION_CHECK: Duration = Duration::from_secs(2);
/// Longest wait for subscribing or for the check's answer.
const SUBSCRIPTION_WAIT: Duration = Duration::from_secs(1);

/// What the subscriber acts on: the running instance's keys and cache.
pub trait Instance: Send + Sync {
    /// The upstreams of the current snapshot.
    fn upstreams(&self) -> Vec<Arc<Upstream>>;
    /// Another instance's operator reset every failed key.
    fn reset_keys(&self);
    /// Another instance purged the cache (of one model, or all).
    fn purge_cache(&self, model: Option<&str>);
    /// Another instance stored a newer answer under this cache key (hex).
    fn forget_cached(&self, key: &str);
    /// Cache news went unheard while this instance was not subscribed: its
    /// copy of the cache in memory goes (Redis keeps what it holds).
    fn forget_cached_copies(&self);
}

/// KEYS: the key's cooldown, the reset counter. ARGV: its length (ms), the
/// message, the channel, the reset it was seen after. News older than the
/// last reset (made while Redis was away) is dropped: the reset came later.
const COOL: &str = r"
if tonumber(redis.call('GET', KEYS[2]) or '0') > tonumber(ARGV[4]) then return 0 end
local current = redis.call('PTTL', KEYS[1])
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
end
return redis.call('PUBLISH', ARGV[3], ARGV[2])
";

/// KEYS: the key's disable mark, the reset counter. ARGV: how long it is
/// kept (s), the message, the channel, the reset it was seen after.
const OFF: &str = r"
if tonumber(redis.call('GET', KEYS[2]) or '0') > tonumber(ARGV[4]) then return 0 end
redis.call('SET', KEYS[1], 1, 'EX', ARGV[1])
return redis.call('PUBLISH', ARGV[3], ARGV[2])
";

static COOL_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(COOL));
static OFF_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(OFF));

fn cool_key(id: &str) -> String {
    format!("sluice:cool:{id}")
}

fn off_key(id: &str) -> String {
    format!("sluice:off:{id}")
}

/// The number of the last reset any instance made.
const RESETS: &str = "sluice:resets";
/// The number of the last cache news published (see [`publish_cache_news`]);
/// outside `sluice:cache:*`, which a purge deletes whole.
///
/// [`publish_cache_news`]: Cluster::publish_cache_news
const CACHE_NEWS: &str = "sluice:news:cache";

/// KEYS: the cache news counter. ARGV: the channel, the sender, the news,
/// where a missing counter starts. Numbers the news and publishes it as
/// `SENDER#NUMBER NEWS` (an instance that does not read numbers sees
/// another sender). A counter Redis lost (a restart without its data, an
/// eviction) starts again at a random number, not at 1: counting up from 1
/// again, it could meet the very number an instance last heard.
const NEWS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[4]) end
local n = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. '#' .. n .. ' ' .. ARGV[3])
return n
";

/// Where a missing news counter starts: below 10^12, so Lua (whose numbers
/// are doubles, written with 14 digits) writes every number it reaches whole.
fn news_start() -> u64 {
    1_000_000_000 + crate::ids::next_u64() % 900_000_000_000
}

static NEWS_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(NEWS));

impl Cluster {
    /// Publishes one event, seen after reset number `epoch`, and records it
    /// in Redis; false if Redis did not take it.
    async fn publish(&self, event: &KeyEvent, epoch: u64) -> bool {
        let me = &self.instance;
        let (script, key, length, message) = match event {
            KeyEvent::Cooled { id, for_ms } => {
                (&*COOL_SCRIPT, cool_key(id), (*for_ms).max(1), format!("{me} cool {id} {for_ms} {epoch}"))
            }
            KeyEvent::Disabled { id } => {
                (&*OFF_SCRIPT, off_key(id), DISABLED_KEPT.as_secs(), format!("{me} off {id} {epoch}"))
            }
            KeyEvent::Reset { ids } => {
                let mut pipe = redis::pipe().atomic().clone();
                for id in ids {
                    pipe.cmd("DEL").arg(cool_key(id)).arg(off_key(id)).ignore();
                }
                pipe.cmd("INCR").arg(RESETS);
                let Some((number,)) =
                    self.run(Lane::Shared, "key reset", |mut conn| async move {
                        pipe.query_async::<(u64,)>(&mut conn).await
                    })
                    .await
                else {
                    return false;
                };
                self.resets_seen.fetch_max(number, Relaxed);
                let message = format!("{me} reset {number}");
                return self
                    .run(Lane::Shared, "key reset", |mut conn| async move {
                        redis::cmd("PUBLISH").arg(CHANNEL).arg(message).query_async::<i64>(&mut conn).await
                    })
                    .await
                    .is_some();
            }
        };
        self.run(Lane::Shared, "key health", |mut conn| async move {
            let mut invocation = script.prepare_invoke();
            invocation.key(key).key(RESETS).arg(length).arg(message).arg(CHANNEL).arg(epoch);
            invocation.invoke_async::<i64>(&mut conn).await
        })
        .await
        .is_some()
    }

    /// Tells every other instance to purge its copy of the cache; false if
    /// Redis did not take it.
    pub async fn publish_purge(&self, model: Option<&str>) -> bool {
        self.publish_cache_news(format!("purge {}", model.unwrap_or("*"))).await
    }

    /// Publishes cache news (`purge MODEL`, `stored KEY`) under the next
    /// number; false if Redis did not take it.
    pub async fn publish_cache_news(&self, news: String) -> bool {
        let sender = self.instance.to_string();
        self.run(Lane::Shared, "cache news", |mut conn| async move {
            let mut invocation = NEWS_SCRIPT.prepare_invoke();
            invocation.key(CACHE_NEWS).arg(CHANNEL).arg(sender).arg(news).arg(news_start());
            invocation.invoke_async::<u64>(&mut conn).await
        })
        .await
        .is_some()
    }
}

/// Cools the keys named `id` for `for_ms` from now, each at most its
/// upstream's `max_cooldown`.
fn apply_cooldown(upstreams: &[Arc<Upstream>], id: &str, for_ms: u64) {
    for upstream in upstreams {
        let cap = upstream.max_cooldown.as_millis() as u64;
        for key in upstream.keys.keys().iter().filter(|k| &*k.shared_id == id) {
            key.rest_until(now_ms().saturating_add(for_ms.min(cap)));
        }
    }
}

/// Reads back the health other instances keep in Redis for this instance's
/// keys (after a (re)connect, when published messages may have been missed).
pub async fn resync(cluster: &Cluster, instance: &dyn Instance) {
    let upstreams = instance.upstreams();
    let keys: Vec<&Arc<UpstreamKey>> = upstreams.iter().flat_map(|u| u.keys.keys()).collect();
    if keys.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(RESETS);
    for key in &keys {
        pipe.cmd("PTTL").arg(cool_key(&key.shared_id));
        pipe.cmd("EXISTS").arg(off_key(&key.shared_id));
    }
    let Some((resets, values)) = cluster
        .run(Lane::Shared, "key health", |mut conn| async move {
            let mut values: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
            let resets: Option<u64> = if values.is_empty() { None } else { redis::from_redis_value(values.remove(0))? };
            Ok((resets.unwrap_or(0), redis::from_redis_value::<Vec<i64>>(redis::Value::Array(values))?))
        })
        .await
    else {
        return;
    };
    // A reset made while this instance was not listening is made here, then
    // whatever Redis kept from after it is applied. (At the first reading
    // back the number is only learnt: the keys are new.)
    let first = !cluster.synced.swap(true, Relaxed);
    if resets > cluster.resets_seen.fetch_max(resets, Relaxed) && !first {
        instance.reset_keys();
        tracing::info!(resets, "the failed keys were reset elsewhere meanwhile; reset here too");
    }
    for (key, pair) in keys.iter().zip(values.chunks(2)) {
        if let Some(&left) = pair.first()
            && left > 0
        {
            apply_cooldown(&upstreams, &key.shared_id, left as u64);
        }
        if pair.get(1).is_some_and(|&off| off > 0) {
            key.mark_disabled();
        }
    }
}

/// Whether news seen after reset number `epoch` came before a reset this
/// instance already made or heard of.
fn stale(cluster: &Cluster, epoch: Option<&str>) -> bool {
    epoch.and_then(|e| e.parse::<u64>().ok()).is_some_and(|e| e < cluster.resets_seen.load(Relaxed))
}

/// Acts on one message another instance published.
fn receive(cluster: &Cluster, instance: &dyn Instance, message: &str) {
    let mut words = message.splitn(3, ' ');
    let (Some(from), Some(what)) = (words.next(), words.next()) else { return };
    // Cache news carries its number (this instance's own too: the number
    // says how far the news was heard, in the order Redis published it).
    let from = match from.split_once('#') {
        Some((sender, number)) => {
            if let Ok(number) = number.parse::<u64>() {
                cluster.cache_news_heard.fetch_max(number, Relaxed);
            }
            sender
        }
        None => from,
    };
    if from == &*cluster.instance {
        return;
    }
    let rest = words.next().unwrap_or("");
    match what {
        "cool" => {
            let mut parts = rest.split(' ');
            let (id, for_ms, epoch) = (parts.next(), parts.next().and_then(|u| u.parse().ok()), parts.next());
            if let (Some(id), Some(for_ms)) = (id, for_ms)
                && !stale(cluster, epoch)
            {
                apply_cooldown(&instance.upstreams(), id, for_ms);
            }
        }
        "off" => {
            let mut parts = rest.split(' ');
            let (id, epoch) = (parts.next().unwrap_or(""), parts.next());
            if stale(cluster, epoch) {
                return;
            }
            for key in instance.upstreams().iter().flat_map(|u| u.keys.keys()).filter(|k| &*k.shared_id == id) {
                key.mark_disabled();
                tracing::info!(key = %key.fingerprint, "another instance saw this key refused; disabled here too");
            }
        }
        "reset" => {
            let number = rest.parse().unwrap_or(0);
            if number == 0 || number > cluster.resets_seen.fetch_max(number, Relaxed) {
                instance.reset_keys();
                tracing::info!("another instance reset the failed keys; reset here too");
            }
        }
        "purge" => instance.purge_cache((rest != "*").then_some(rest)),
        "stored" => instance.forget_cached(rest),
        other => tracing::debug!(what = other, "unknown message on the shared channel"),
    }
}

/// Keeps an event for a Redis that did not take it yet.
fn keep_unsent(unsent: &mut VecDeque<(KeyEvent, u64)>, event: (KeyEvent, u64)) {
    if unsent.len() >= MAX_UNSENT {
        match unsent.iter().position(|(e, _)| matches!(e, KeyEvent::Cooled { .. })) {
            Some(cooldown) => drop(unsent.remove(cooldown)),
            None => drop(unsent.pop_front()),
        }
    }
    unsent.push_back(event);
}

/// Starts the publisher of this instance's key news (which also reads back
/// the shared state when due) and the subscriber to every other instance's.
pub(super) fn start(cluster: &Arc<Cluster>, tasks: &Tasks, instance: Arc<dyn Instance>) {
    let publisher = Arc::clone(cluster);
    let stop = tasks.clone();
    let local = Arc::clone(&instance);
    tasks.spawn(async move {
        // Each event with the number of the last reset known when it happened.
        let mut unsent: VecDeque<(KeyEvent, u64)> = VecDeque::new();
        loop {
            while let Some(event) = publisher.news.pop() {
                keep_unsent(&mut unsent, (event, publisher.resets_seen.load(Relaxed)));
            }
            while let Some((event, epoch)) = unsent.front() {
                if !publisher.publish(event, *epoch).await {
                    break;
                }
                // News another instance had queued meanwhile may have undone
                // this reset here before it went out: made again now.
                if matches!(event, KeyEvent::Reset { .. }) {
                    local.reset_keys();
                }
                unsent.pop_front();
            }
            // Only once this instance's own news is out: a reset made while
            // Redis was down must clear the state before it is read back.
            if unsent.is_empty() && publisher.resync_due.swap(false, Relaxed) {
                resync(&publisher, local.as_ref()).await;
            }
            // Waits for news; with some unsent, tries again when Redis may be back.
            let retry = if unsent.is_empty() { Duration::from_secs(3600) } else { PROBE_EVERY };
            tokio::select! {
                () = stop.stopped() => return,
                () = publisher.news.pushed() => {}
                () = tokio::time::sleep(retry) => {}
            }
        }
    });
    let subscriber = Arc::clone(cluster);
    let stop = tasks.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = stop.stopped() => return,
                () = subscribe(&subscriber, instance.as_ref()) => {}
            }
            tokio::select! {
                () = stop.stopped() => return,
                () = tokio::time::sleep(PROBE_EVERY) => {}
            }
        }
    });
}

/// Whether cache news may have gone out that this instance did not hear:
/// the number in Redis is not the last one heard (past it: news missed;
/// another: a Redis that lost the count), or Redis cannot say. Called once
/// subscribed, before any message of the new subscription is read; asked
/// even while Redis is marked down (a slow Redis is no reason to drop).
async fn missed_cache_news(cluster: &Cluster) -> bool {
    let published = cluster
        .attempt(Lane::Shared, "cache news", |mut conn| async move {
            redis::cmd("GET").arg(CACHE_NEWS).query_async::<Option<u64>>(&mut conn).await
        })
        .await;
    match published {
        Some(number) => {
            let number = number.unwrap_or(0);
            cluster.cache_news_heard.swap(number, Relaxed) != number
        }
        None => true,
    }
}

/// Subscribes and acts on messages until the subscription fails its check,
/// ends, or Redis came back after an outage (when it is made again).
async fn subscribe(cluster: &Cluster, instance: &dyn Instance) {
    let Some(mut pubsub) = cluster.subscriber().await else { return };
    if !matches!(tokio::time::timeout(SUBSCRIPTION_WAIT, pubsub.subscribe(CHANNEL)).await, Ok(Ok(()))) {
        return;
    }
    // Messages published before this subscription: key health is read back
    // from Redis; cache news cannot be, so if any went unheard, the copies
    // it may have been about go.
    cluster.resync_due.store(true, Relaxed);
    cluster.news.wake();
    if missed_cache_news(cluster).await {
        instance.forget_cached_copies();
    }
    cluster.subscriptions.fetch_add(1, Relaxed);
    let (mut sink, mut messages) = pubsub.split();
    // (Subscribed, Redis answers PING with an array, not `PONG`: any answer will do.)
    let mut check = tokio::time::interval(SUBSCRIPTION_CHECK);
    check.tick().await;
    loop {
        tokio::select! {
            () = cluster.resubscribe.notified() => return,
            _ = check.tick() => {
                if !matches!(tokio::time::timeout(SUBSCRIPTION_WAIT, sink.ping::<redis::Value>()).await, Ok(Ok(_))) {
                    tracing::debug!("the Redis subscription does not answer; subscribing again");
                    return;
                }
            }
            message = messages.next() => match message {
                Some(message) => match message.get_payload::<String>() {
                    Ok(text) => receive(cluster, instance, &text),
                    Err(error) => tracing::debug!(%error, "unreadable message on the shared channel"),
                },
                None => return,
            },
        }
    }
}
