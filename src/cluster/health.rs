//! Upstream key health shared by every instance. A 429 cooldown, a key the
//! upstream refused and an operator's reset are published on [`CHANNEL`] the
//! moment they happen (every instance subscribes), and kept in Redis under
//! an expiry so an instance that starts later, or reconnects after missing
//! messages, reads them back ([`resync`]).
//!
//! A cooldown is stored as the wall-clock time it ends, raised with a
//! compare-and-set in one script: no instance ever shortens a cooldown
//! another set, and a receiving instance only ever extends its own
//! (`fetch_max`). A disabled key is kept for [`DISABLED_KEPT`]; a reset
//! deletes both. Received news is applied to the keys directly and is never
//! published again.
//!
//! [`CHANNEL`]: super::CHANNEL

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::StreamExt;

use super::{CHANNEL, Cluster, PROBE_EVERY};
use crate::clock::now_ms;
use crate::tasks::Tasks;
use crate::upstream::Upstream;
use crate::upstream::keyring::UpstreamKey;
use crate::upstream::news::KeyEvent;

/// How long a disabled key stays disabled for instances that start later
/// (the instances that saw it keep it disabled until a reset or reload).
pub const DISABLED_KEPT: Duration = Duration::from_secs(86_400);
/// Most events kept for a Redis that did not take them; past it the oldest go.
const MAX_UNSENT: usize = 1_000;

/// What the subscriber acts on: the running instance's keys and cache.
pub trait Instance: Send + Sync {
    /// The upstreams of the current snapshot.
    fn upstreams(&self) -> Vec<Arc<Upstream>>;
    /// Another instance's operator reset every failed key.
    fn reset_keys(&self);
    /// Another instance purged the cache (of one model, or all).
    fn purge_cache(&self, model: Option<&str>);
}

/// KEYS: the key's cooldown. ARGV: until (unix ms), the message, the channel.
const COOL: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ms > current and until_ms > now then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', until_ms - now)
end
return redis.call('PUBLISH', ARGV[3], ARGV[2])
";

static COOL_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(COOL));

fn cool_key(id: &str) -> String {
    format!("sluice:cool:{id}")
}

fn off_key(id: &str) -> String {
    format!("sluice:off:{id}")
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Cluster {
    /// Publishes one event and records it in Redis; false if Redis did not take it.
    async fn publish(&self, event: &KeyEvent) -> bool {
        let me = &self.instance;
        match event {
            KeyEvent::Cooled { id, until_unix_ms } => {
                let (key, message) = (cool_key(id), format!("{me} cool {id} {until_unix_ms}"));
                let until = *until_unix_ms;
                self.run("key cooldown", |mut conn| async move {
                    let mut invocation = COOL_SCRIPT.prepare_invoke();
                    invocation.key(key).arg(until).arg(message).arg(CHANNEL);
                    invocation.invoke_async::<i64>(&mut conn).await
                })
                .await
                .is_some()
            }
            KeyEvent::Disabled { id } => {
                let mut pipe = redis::pipe();
                pipe.cmd("SET").arg(off_key(id)).arg(1).arg("EX").arg(DISABLED_KEPT.as_secs()).ignore();
                pipe.cmd("PUBLISH").arg(CHANNEL).arg(format!("{me} off {id}")).ignore();
                self.run("key disabled", |mut conn| async move { pipe.query_async::<()>(&mut conn).await })
                    .await
                    .is_some()
            }
            KeyEvent::Reset { ids } => {
                let mut pipe = redis::pipe();
                for id in ids {
                    pipe.cmd("DEL").arg(cool_key(id)).arg(off_key(id)).ignore();
                }
                pipe.cmd("PUBLISH").arg(CHANNEL).arg(format!("{me} reset")).ignore();
                self.run("key reset", |mut conn| async move { pipe.query_async::<()>(&mut conn).await }).await.is_some()
            }
        }
    }

    /// Tells every other instance to purge its copy of the cache.
    pub async fn publish_purge(&self, model: Option<&str>) {
        let message = format!("{} purge {}", self.instance, model.unwrap_or("*"));
        self.run("cache purge", |mut conn| async move {
            redis::cmd("PUBLISH").arg(CHANNEL).arg(message).query_async::<i64>(&mut conn).await
        })
        .await;
    }
}

/// Every key of the instance's upstreams, with its shared id.
fn every_key(instance: &dyn Instance) -> Vec<Arc<UpstreamKey>> {
    instance.upstreams().iter().flat_map(|u| u.keys.keys().iter().cloned()).collect()
}

/// Applies a cooldown that ends at `until_unix_ms` to the keys named `id`.
fn apply_cooldown(keys: &[Arc<UpstreamKey>], id: &str, until_unix_ms: u64) {
    let now = unix_ms();
    if until_unix_ms <= now {
        return;
    }
    let until = now_ms() + (until_unix_ms - now);
    for key in keys.iter().filter(|k| &*k.shared_id == id) {
        key.rest_until(until);
    }
}

/// Reads back the health other instances keep in Redis for this instance's
/// keys (after a (re)connect, when published messages may have been missed).
pub async fn resync(cluster: &Cluster, instance: &dyn Instance) {
    let keys = every_key(instance);
    if keys.is_empty() {
        return;
    }
    let names: Vec<String> = keys.iter().flat_map(|k| [cool_key(&k.shared_id), off_key(&k.shared_id)]).collect();
    let Some(values) = cluster
        .run("key health", |mut conn| async move {
            redis::cmd("MGET").arg(&names).query_async::<Vec<Option<u64>>>(&mut conn).await
        })
        .await
    else {
        return;
    };
    for (key, pair) in keys.iter().zip(values.chunks(2)) {
        if let Some(until) = pair.first().copied().flatten() {
            apply_cooldown(std::slice::from_ref(key), &key.shared_id, until);
        }
        if pair.get(1).copied().flatten().is_some() {
            key.mark_disabled();
        }
    }
}

/// Acts on one message another instance published.
fn receive(cluster: &Cluster, instance: &dyn Instance, message: &str) {
    let mut words = message.splitn(3, ' ');
    let (Some(from), Some(what)) = (words.next(), words.next()) else { return };
    if from == &*cluster.instance {
        return;
    }
    let rest = words.next().unwrap_or("");
    match what {
        "cool" => {
            let mut parts = rest.split(' ');
            if let (Some(id), Some(until)) = (parts.next(), parts.next().and_then(|u| u.parse().ok())) {
                apply_cooldown(&every_key(instance), id, until);
            }
        }
        "off" => {
            for key in every_key(instance).iter().filter(|k| &*k.shared_id == rest) {
                key.mark_disabled();
                tracing::info!(key = %key.fingerprint, "another instance saw this key refused; disabled here too");
            }
        }
        "reset" => {
            instance.reset_keys();
            tracing::info!("another instance reset the failed keys; reset here too");
        }
        "purge" => instance.purge_cache((rest != "*").then_some(rest)),
        other => tracing::debug!(what = other, "unknown message on the shared channel"),
    }
}

/// Starts the publisher of this instance's key news and the subscriber to
/// every other instance's.
pub(super) fn start(cluster: &Arc<Cluster>, tasks: &Tasks, instance: Arc<dyn Instance>) {
    let publisher = Arc::clone(cluster);
    let stop = tasks.clone();
    tasks.spawn(async move {
        let mut unsent: VecDeque<KeyEvent> = VecDeque::new();
        loop {
            while let Some(event) = publisher.news.pop() {
                if unsent.len() >= MAX_UNSENT {
                    unsent.pop_front();
                }
                unsent.push_back(event);
            }
            while let Some(event) = unsent.front() {
                if !publisher.publish(event).await {
                    break;
                }
                unsent.pop_front();
            }
            // Waits for news; with some unsent, tries again when Redis may be back.
            let retry = if unsent.is_empty() { Duration::MAX } else { PROBE_EVERY };
            tokio::select! {
                () = stop.stopped() => return,
                () = publisher.news.pushed() => {}
                () = tokio::time::sleep(retry.min(Duration::from_secs(3600))) => {}
            }
        }
    });
    let subscriber = Arc::clone(cluster);
    let stop = tasks.clone();
    tasks.spawn(async move {
        loop {
            if stop.is_stopping() {
                return;
            }
            if let Some(mut pubsub) = subscriber.subscriber().await
                && pubsub.subscribe(CHANNEL).await.is_ok()
            {
                resync(&subscriber, instance.as_ref()).await;
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        () = stop.stopped() => return,
                        message = messages.next() => match message {
                            Some(message) => match message.get_payload::<String>() {
                                Ok(text) => receive(&subscriber, instance.as_ref(), &text),
                                Err(error) => tracing::debug!(%error, "unreadable message on the shared channel"),
                            },
                            None => break,
                        },
                    }
                }
                tracing::debug!("the Redis subscription ended; subscribing again");
            }
            tokio::select! {
                () = stop.stopped() => return,
                () = tokio::time::sleep(PROBE_EVERY) => {}
            }
        }
    });
}
