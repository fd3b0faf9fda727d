//! The response cache's shared store on Redis: each entry one string key
//! (its [wire form](crate::cache::wire)) that Redis expires at the entry's
//! TTL, and per model a sorted set of its entries scored by when they
//! expire (trimmed on every store, so it holds only live entries), for
//! purges by model. Every instance keeps its own bounded copy in memory.
//! Cache traffic has a connection of its own ([`Lane::Cache`]): a large
//! answer never holds up a limit check, and a failed cache operation never
//! marks Redis down for the limits.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;

use super::{Cluster, Lane, PROBE_EVERY};
use crate::cache::{CacheKey, Entry, Pending, SharedStore};
use crate::clock::unix_ms;
use crate::tasks::Tasks;

/// How long an answer's news Redis did not take is offered again.
const NEWS_RETRY_FOR: Duration = Duration::from_secs(600);
/// Purges delete in batches of this many keys per round trip.
const PURGE_BATCH: usize = 500;
/// At most this many batches per purge (a purge is an operator's call; a
/// huge Redis is emptied over several).
const PURGE_ROUNDS: usize = 2_000;

/// KEYS: the entry, and its model's set (absent without a model). ARGV: the
/// entry's bytes, its TTL in ms, its name in the set.
const PUT: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if KEYS[2] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[2], math.floor(tonumber(last[2])) + 1)
end
return 1
";

static PUT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(PUT));

fn entry_key(hex: &str) -> String {
    format!("sluice:cache:e:{hex}")
}

fn model_key(model: &str) -> String {
    format!("sluice:cache:m:{model}")
}

/// The Redis behind every instance's cache.
pub struct RedisCache {
    cluster: Arc<Cluster>,
    tasks: Tasks,
}

impl RedisCache {
    /// A shared store on `cluster`'s Redis; writes run as `tasks`.
    pub fn new(cluster: Arc<Cluster>, tasks: Tasks) -> Self {
        Self { cluster, tasks }
    }
}

impl SharedStore for RedisCache {
    fn get(&self, key: CacheKey) -> Pending<'_, Option<Entry>> {
        Box::pin(async move {
            let name = entry_key(&hex::encode(key));
            let bytes = self
                .cluster
                .run(Lane::Cache, "cache get", |mut conn| async move {
                    redis::cmd("GET").arg(name).query_async::<Option<Vec<u8>>>(&mut conn).await
                })
                .await??;
            Entry::decode(Bytes::from(bytes), unix_ms())
        })
    }

    fn put(&self, key: CacheKey, entry: Arc<Entry>) {
        let cluster = Arc::clone(&self.cluster);
        let stop = self.tasks.clone();
        self.tasks.spawn(async move {
            let hex = hex::encode(key);
            let mut keys = vec![entry_key(&hex)];
            keys.extend(entry.model.as_deref().map(model_key));
            let (bytes, ttl_ms) = (entry.encode(unix_ms()), entry.ttl.as_millis().max(1) as u64);
            let news = format!("stored {hex}");
            let stored = cluster
                .run(Lane::Cache, "cache put", |mut conn| async move {
                    let mut invocation = PUT_SCRIPT.prepare_invoke();
                    invocation.key(&keys[..]).arg(bytes).arg(ttl_ms).arg(hex);
                    invocation.invoke_async::<i64>(&mut conn).await
                })
                .await;
            // The other instances drop their older copies in memory (the
            // channel lives on the main Redis, which the cache may not share).
            // News Redis did not take is sent again once it answers (while
            // the entry lives, at most NEWS_RETRY_FOR): untold, the others
            // would serve their older copies, and their count would not say so.
            if stored.is_none() {
                return;
            }
            let tries = entry.ttl.min(NEWS_RETRY_FOR).as_millis() / PROBE_EVERY.as_millis();
            for _ in 0..=tries {
                if cluster.publish_cache_news(news.clone()).await {
                    return;
                }
                tokio::select! {
                    () = stop.stopped() => return,
                    () = tokio::time::sleep(PROBE_EVERY) => {}
                }
            }
        });
    }

    fn purge(&self, model: Option<String>) -> Pending<'_, Option<u64>> {
        Box::pin(async move {
            let removed = match &model {
                Some(model) => purge_model(&self.cluster, model).await?,
                None => purge_all(&self.cluster).await?,
            };
            self.cluster.publish_purge(model.as_deref()).await.then_some(removed)
        })
    }
}

/// Deletes the entries a model's set names, and the set; `None` if Redis failed.
async fn purge_model(cluster: &Cluster, model: &str) -> Option<u64> {
    let set = model_key(model);
    let mut removed = 0;
    for _ in 0..PURGE_ROUNDS {
        let name = set.clone();
        let batch = cluster
            .run(Lane::Cache, "cache purge", |mut conn| async move {
                redis::cmd("ZRANGE").arg(name).arg(0).arg(PURGE_BATCH - 1).query_async::<Vec<String>>(&mut conn).await
            })
            .await?;
        if batch.is_empty() {
            break;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(batch.iter().map(|hex| entry_key(hex)).collect::<Vec<_>>());
        pipe.cmd("ZREM").arg(&set).arg(&batch).ignore();
        let (deleted,): (u64,) = cluster
            .run(Lane::Cache, "cache purge", |mut conn| async move { pipe.query_async(&mut conn).await })
            .await?;
        removed += deleted;
    }
    Some(removed)
}

/// Deletes every cache key, a batch found by `SCAN` at a time; `None` if Redis failed.
async fn purge_all(cluster: &Cluster) -> Option<u64> {
    let (mut cursor, mut removed) = (0u64, 0u64);
    for _ in 0..PURGE_ROUNDS {
        let (next, names) = cluster
            .run(Lane::Cache, "cache purge", |mut conn| async move {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("sluice:cache:*")
                    .arg("COUNT")
                    .arg(PURGE_BATCH)
                    .query_async::<(u64, Vec<String>)>(&mut conn)
                    .await
            })
            .await?;
        if !names.is_empty() {
            let entries = names.iter().filter(|n| n.starts_with("sluice:cache:e:")).count() as u64;
            cluster
                .run(Lane::Cache, "cache purge", |mut conn| async move {
                    redis::cmd("DEL").arg(names).query_async::<u64>(&mut conn).await
                })
                .await?;
            removed += entries;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Some(removed)
}
