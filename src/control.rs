//! The control plane: a kill switch every `consume` and `work` process
//! watches, and the idle stop (IDLE_TIMEOUT).
//!
//! The kill switch is the key [`STOP_KEY`]: while it exists, every process
//! stops gracefully within [`WATCH_EVERY`] (and one started meanwhile stops at
//! once). `optimus ctl stop` sets it (its value says who and when), `optimus
//! ctl resume` deletes it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionLike;
use tokio_util::sync::CancellationToken;

/// The kill switch's key.
pub const STOP_KEY: &str = "optimus:ctl:stop";

/// How often a process looks at the kill switch (and its idle time).
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

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
    client: redis::Client,
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
            conn = client.get_multiplexed_async_connection().await.ok();
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
