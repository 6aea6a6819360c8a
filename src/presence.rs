//! Presence: each worker keeps a key `<CONSUMERS_LIST>:<worker id>` alive with
//! a short TTL, so anyone can see which workers are up, on every host.
//!
//! Beside the keys, a sorted set named `<CONSUMERS_LIST>` itself maps each worker id
//! to the server time its key expires; counting live workers is then one
//! cheap script instead of a SCAN over the whole keyspace. Both use the
//! server's clock, so hosts whose clocks differ still agree.
//!
//! On a Redis Cluster the keys are `{<CONSUMERS_LIST>}:<worker id>`: the hash
//! tag puts them in the sorted set's slot, so one script can touch them all.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{RedisResult, Script};

use crate::scripts;

#[derive(Clone)]
pub struct Presence {
    prefix: String,
    /// The prefix of the per-worker keys: `prefix`, or `{prefix}` on a cluster.
    key_prefix: String,
    ttl: Duration,
    /// What each key holds: where the worker runs.
    value: String,
    refresh: Script,
    count: Script,
}

impl Presence {
    pub fn new(prefix: &str, ttl: Duration, value: String) -> Self {
        Self {
            prefix: prefix.to_string(),
            key_prefix: prefix.to_string(),
            ttl,
            value,
            refresh: Script::new(scripts::PRESENCE_REFRESH),
            count: Script::new(scripts::LIVE_COUNT),
        }
    }

    /// How often the keys are refreshed: three times per TTL.
    /// What each presence key holds: `host=… pid=…`.
    pub fn value(&self) -> &str {
        &self.value
    }

    pub fn refresh_every(&self) -> Duration {
        self.ttl / 3
    }

    fn index(&self) -> String {
        self.prefix.clone()
    }

    /// On a cluster: keys in the index's slot (see the module's notes).
    pub fn on_cluster(mut self, cluster: bool) -> Self {
        self.key_prefix = if cluster {
            format!("{{{}}}", self.prefix)
        } else {
            self.prefix.clone()
        };
        self
    }

    fn key(&self, worker: &str) -> String {
        format!("{}:{worker}", self.key_prefix)
    }

    /// Registers (or keeps alive) these workers.
    pub async fn refresh(
        &self,
        conn: &mut (impl ConnectionLike + Send),
        workers: &[String],
    ) -> RedisResult<()> {
        if workers.is_empty() {
            return Ok(());
        }
        let mut call = self.refresh.prepare_invoke();
        call.key(self.index());
        call.arg(self.ttl.as_millis().max(1) as u64)
            .arg(&self.value);
        for w in workers {
            call.key(self.key(w)).arg(w);
        }
        call.invoke_async::<i64>(conn).await?;
        Ok(())
    }

    /// Live workers, all processes and hosts together.
    /// The live workers and their presence values (`host=… pid=…`).
    pub async fn list(
        &self,
        conn: &mut (impl ConnectionLike + Send),
    ) -> RedisResult<Vec<(String, String)>> {
        let flat: Vec<String> = Script::new(scripts::LIVE_LIST)
            .key(self.index())
            .arg(format!("{}:", self.key_prefix))
            .invoke_async(conn)
            .await?;
        Ok(flat
            .chunks_exact(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect())
    }

    pub async fn count(&self, conn: &mut (impl ConnectionLike + Send)) -> RedisResult<u64> {
        self.count.key(self.index()).invoke_async(conn).await
    }

    /// Removes these workers' keys (at shutdown).
    pub async fn remove(
        &self,
        conn: &mut (impl ConnectionLike + Send),
        workers: &[String],
    ) -> RedisResult<()> {
        if workers.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = workers.iter().map(|w| self.key(w)).collect();
        redis::pipe()
            .del(keys)
            .ignore()
            .zrem(self.index(), workers)
            .ignore()
            .query_async::<()>(conn)
            .await
    }
}
