//! The response cache's shared store on Redis: each entry one string key
//! (its [wire form](crate::cache::wire)) that Redis expires at the entry's
//! TTL, and one set per model naming its entries, for purges by model.
//! Redis's `maxmemory` (with an eviction policy such as `allkeys-lru`)
//! bounds the bytes; every instance keeps its own bounded copy in memory.

use std::sync::Arc;

use bytes::Bytes;

use super::Cluster;
use crate::cache::{CacheKey, Entry, Pending, SharedStore};
use crate::tasks::Tasks;

/// Purge-all deletes in batches of this many keys per round trip.
const PURGE_BATCH: usize = 500;
/// At most this many batches per purge (a purge is an operator's call; a
/// huge Redis is emptied over several).
const PURGE_ROUNDS: usize = 2_000;

fn entry_key(key: &CacheKey) -> String {
    format!("sluice:cache:e:{}", hex::encode(key))
}

fn model_key(model: &str) -> String {
    format!("sluice:cache:m:{model}")
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
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
            let name = entry_key(&key);
            let bytes = self
                .cluster
                .run("cache get", |mut conn| async move {
                    redis::cmd("GET").arg(name).query_async::<Option<Vec<u8>>>(&mut conn).await
                })
                .await??;
            Entry::decode(Bytes::from(bytes), unix_ms())
        })
    }

    fn put(&self, key: CacheKey, entry: Arc<Entry>) {
        let cluster = Arc::clone(&self.cluster);
        self.tasks.spawn(async move {
            let ttl_ms = entry.ttl.as_millis().max(1) as u64;
            let mut pipe = redis::pipe();
            pipe.cmd("SET").arg(entry_key(&key)).arg(entry.encode(unix_ms())).arg("PX").arg(ttl_ms).ignore();
            if let Some(model) = &entry.model {
                // The set lives as long as its newest entry.
                pipe.cmd("SADD").arg(model_key(model)).arg(hex::encode(key)).ignore();
                pipe.cmd("PEXPIRE").arg(model_key(model)).arg(ttl_ms).arg("GT").ignore();
                pipe.cmd("PEXPIRE").arg(model_key(model)).arg(ttl_ms).arg("NX").ignore();
            }
            cluster.run("cache put", |mut conn| async move { pipe.query_async::<()>(&mut conn).await }).await;
        });
    }

    fn purge(&self, model: Option<String>) -> Pending<'_, u64> {
        Box::pin(async move {
            let removed = match &model {
                Some(model) => purge_model(&self.cluster, model).await,
                None => purge_all(&self.cluster).await,
            };
            self.cluster.publish_purge(model.as_deref()).await;
            removed
        })
    }
}

/// Deletes the entries a model's set names, and the set.
async fn purge_model(cluster: &Cluster, model: &str) -> u64 {
    let set = model_key(model);
    let members = {
        let set = set.clone();
        cluster
            .run("cache purge", |mut conn| async move {
                redis::cmd("SMEMBERS").arg(set).query_async::<Vec<String>>(&mut conn).await
            })
            .await
            .unwrap_or_default()
    };
    let mut removed = 0;
    for batch in members.chunks(PURGE_BATCH) {
        let names: Vec<String> = batch.iter().map(|hex| format!("sluice:cache:e:{hex}")).collect();
        removed += cluster
            .run(
                "cache purge",
                |mut conn| async move { redis::cmd("DEL").arg(names).query_async::<u64>(&mut conn).await },
            )
            .await
            .unwrap_or(0);
    }
    let _ = cluster
        .run("cache purge", |mut conn| async move { redis::cmd("DEL").arg(set).query_async::<u64>(&mut conn).await })
        .await;
    removed
}

/// Deletes every cache key, a batch found by `SCAN` at a time.
async fn purge_all(cluster: &Cluster) -> u64 {
    let (mut cursor, mut removed) = (0u64, 0u64);
    for _ in 0..PURGE_ROUNDS {
        let Some((next, names)) = cluster
            .run("cache purge", |mut conn| async move {
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg("sluice:cache:*")
                    .arg("COUNT")
                    .arg(PURGE_BATCH)
                    .query_async::<(u64, Vec<String>)>(&mut conn)
                    .await
            })
            .await
        else {
            break;
        };
        if !names.is_empty() {
            let entries = names.iter().filter(|n| n.starts_with("sluice:cache:e:")).count() as u64;
            let deleted = cluster
                .run("cache purge", |mut conn| async move {
                    redis::cmd("DEL").arg(names).query_async::<u64>(&mut conn).await
                })
                .await;
            removed += deleted.map_or(0, |_| entries);
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    removed
}
