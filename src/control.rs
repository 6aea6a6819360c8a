//! The control plane: a kill switch every `consume` and `work` process
//! watches, the desired total worker count (`optimus ctl scale`), and the
//! idle stop (IDLE_TIMEOUT).
//!
//! The kill switch is the key [`STOP_KEY`]: while it exists, every process
//! stops gracefully within [`WATCH_EVERY`] (and one started meanwhile stops at
//! once). `optimus ctl stop` sets it (its value says who and when), `optimus
//! ctl resume` deletes it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionLike;
use tokio_util::sync::CancellationToken;

/// The kill switch's key.
pub const STOP_KEY: &str = "{optimus:ctl}:stop";

/// How often a process looks at the kill switch (and its idle time), and
/// renews its registration for `ctl scale`.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The desired total number of bridge workers, all processes together.
pub const WORKERS_KEY: &str = "{optimus:ctl}:workers";

/// The live `consume` processes: a sorted set scored by the server time (ms)
/// at which each registration lapses.
pub const PROCESSES_KEY: &str = "{optimus:ctl}:processes";

/// Where a process reports its rate for `ctl status`: this prefix and its
/// presence value (`host=… pid=…`).
pub const RATE_PREFIX: &str = "{optimus:ctl}:rate:";

/// Stores a process's rate (messages or entries per second over its last
/// monitoring interval) for `ctl status`; it lapses after three intervals.
/// Failures are ignored: the monitoring line reports Redis trouble.
pub async fn report_rate<C: ConnectionLike>(
    conn: &mut C,
    process: &str,
    rate: f64,
    interval: Duration,
) {
    let _: redis::RedisResult<()> = redis::cmd("SET")
        .arg(format!("{RATE_PREFIX}{process}"))
        .arg(format!("{rate:.0}"))
        .arg("PX")
        .arg((interval.as_millis() as u64).saturating_mul(3).max(1))
        .query_async(conn)
        .await;
}

/// How long a process registration lasts without renewal.
const REGISTRATION_TTL: Duration = Duration::from_secs(3);

/// KEYS: processes, desired count. ARGV: this process, registration TTL ms
/// (0: leave). Returns {desired or false, live processes}.
const SCALE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return {redis.call('GET', KEYS[2]), redis.call('ZRANGE', KEYS[1], 0, -1)}
"#;

/// This process's share of `desired` workers split across `processes` (its
/// own name among them): an equal part each, the remainder one more for the
/// first processes in name order. 7 over 3 processes: 3, 2, 2.
pub fn share(desired: usize, processes: &[String], me: &str) -> usize {
    let mut sorted: Vec<&String> = processes.iter().collect();
    sorted.sort();
    sorted.dedup();
    let Some(index) = sorted.iter().position(|p| p.as_str() == me) else {
        return 0;
    };
    let n = sorted.len();
    desired / n + usize::from(index < desired % n)
}

/// One process's side of `ctl scale`.
#[derive(Debug, Clone)]
pub struct Scale {
    me: String,
    /// CONSUMERS_COUNT: the count while no total is set.
    default: usize,
    script: redis::Script,
}

impl Scale {
    pub fn new(me: String, default: usize) -> Self {
        Self {
            me,
            default,
            script: redis::Script::new(SCALE),
        }
    }

    /// Registers (or, with `leave`, unregisters) this process and returns how
    /// many workers it should run now.
    async fn step<C: ConnectionLike>(
        &self,
        conn: &mut C,
        leave: bool,
    ) -> redis::RedisResult<usize> {
        let ttl = if leave {
            0
        } else {
            REGISTRATION_TTL.as_millis() as u64
        };
        let (desired, processes): (Option<usize>, Vec<String>) = self
            .script
            .key(PROCESSES_KEY)
            .key(WORKERS_KEY)
            .arg(&self.me)
            .arg(ttl)
            .invoke_async(conn)
            .await?;
        Ok(match desired {
            Some(total) => share(total, &processes, &self.me),
            None => self.default,
        })
    }

    /// Registers this process and returns how many workers it should run.
    pub async fn target<C: ConnectionLike>(&self, conn: &mut C) -> redis::RedisResult<usize> {
        self.step(conn, false).await
    }

    /// Renews the registration every [`WATCH_EVERY`] and sends the target
    /// whenever it changes; unregisters when `cancel`led.
    pub async fn watch<C: ConnectionLike + Send>(
        self,
        mut conn: C,
        target: tokio::sync::watch::Sender<usize>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            match self.step(&mut conn, false).await {
                Ok(n) => {
                    target.send_if_modified(|current| {
                        let changed = *current != n;
                        *current = n;
                        changed
                    });
                }
                Err(err) => {
                    tracing::debug!(cause = %err, "ctl scale: could not renew the registration")
                }
            }
        }
        let _ = self.step(&mut conn, true).await;
    }
}

/// Sets the desired total worker count (`None`: back to each process's
/// CONSUMERS_COUNT).
pub async fn set_scale<C: ConnectionLike>(
    conn: &mut C,
    total: Option<usize>,
) -> redis::RedisResult<()> {
    match total {
        Some(n) => {
            redis::cmd("SET")
                .arg(WORKERS_KEY)
                .arg(n)
                .query_async(conn)
                .await
        }
        None => redis::cmd("DEL").arg(WORKERS_KEY).query_async(conn).await,
    }
}

/// Sets the kill switch; `who` is recorded in it.
pub async fn stop<C: ConnectionLike>(conn: &mut C, who: &str) -> redis::RedisResult<()> {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    redis::cmd("SET")
        .arg(STOP_KEY)
        .arg(format!("by {who} at {since}"))
        .query_async(conn)
        .await
}

/// Clears the kill switch; returns whether it was set.
pub async fn resume<C: ConnectionLike>(conn: &mut C) -> redis::RedisResult<bool> {
    let deleted: u64 = redis::cmd("DEL").arg(STOP_KEY).query_async(conn).await?;
    Ok(deleted > 0)
}

/// Why a process was told to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    KillSwitch(String),
    Idle(Duration),
}

/// Watches the kill switch and, with `idle_timeout`, the `activity` count
/// (messages received or handled); cancels `shutdown` when either says stop.
/// Ends when `shutdown` is cancelled. Redis errors are retried quietly (the
/// workers report them).
pub async fn watch(
    endpoint: crate::connect::Endpoint,
    activity: impl Fn() -> u64 + Send + 'static,
    idle_timeout: Option<Duration>,
    shutdown: CancellationToken,
) -> Option<StopReason> {
    let mut conn = None;
    let mut last = (activity(), Instant::now());
    let mut tick = tokio::time::interval(WATCH_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tick.tick() => {}
        }
        if conn.is_none() {
            conn = crate::connect::open(&endpoint).await.ok();
        }
        if let Some(c) = conn.as_mut() {
            match redis::cmd("GET")
                .arg(STOP_KEY)
                .query_async::<Option<String>>(c)
                .await
            {
                Ok(Some(value)) => {
                    tracing::warn!(key = STOP_KEY, set = %value, "kill switch set: stopping gracefully (optimus ctl resume clears it)");
                    shutdown.cancel();
                    return Some(StopReason::KillSwitch(value));
                }
                Ok(None) => {}
                Err(_) => conn = None,
            }
        }
        if let Some(timeout) = idle_timeout {
            let now = activity();
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() >= timeout {
                tracing::info!(
                    idle_s = timeout.as_secs_f64(),
                    "no message for IDLE_TIMEOUT: stopping gracefully"
                );
                shutdown.cancel();
                return Some(StopReason::Idle(timeout));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn a_total_is_split_with_the_remainder_spread() {
        let p: Vec<String> = ["c", "a", "b"].iter().map(|s| s.to_string()).collect();
        let shares: Vec<usize> = ["a", "b", "c"].iter().map(|me| share(7, &p, me)).collect();
        assert_eq!(shares, [3, 2, 2]);
        assert_eq!(share(2, &p, "c"), 0);
        assert_eq!(share(7, &p, "not registered"), 0);
        assert_eq!(share(7, &p[..2], "a"), 4, "a and c: 4 + 3");
        assert_eq!(share(7, &p[..2], "c"), 3);
    }
}
