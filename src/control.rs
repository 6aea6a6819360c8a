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

use crate::keys::description_field;
pub use crate::keys::{PROCESS_PREFIX, PROCESSES_KEY, RATE_PREFIX, STOP_KEY, WORKERS_KEY};

/// How often a process looks at the kill switch (and its idle time), and
/// renews its registration for `ctl scale`.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Stores a process's rate (messages or entries per second over its last
/// monitoring interval) and the figures of its monitoring line `line` (its
/// `key=value` fields) for `ctl status` and `optimus top`; it lapses after
/// three intervals. Failures are ignored: the monitoring line reports Redis
/// trouble.
pub async fn report_rate<C: ConnectionLike>(
    conn: &mut C,
    process: &str,
    rate: f64,
    line: &str,
    interval: Duration,
) {
    let fields: Vec<&str> = line
        .split_whitespace()
        .filter(|f| f.contains('=') && !f.starts_with("rate=") && !f.starts_with("consumers="))
        .collect();
    let _: redis::RedisResult<()> = redis::cmd("SET")
        .arg(format!("{RATE_PREFIX}{process}"))
        .arg(format!("rate={rate:.0} {}", fields.join(" ")))
        .arg("PX")
        .arg((interval.as_millis() as u64).saturating_mul(3).max(1))
        .query_async(conn)
        .await;
}

/// The rate and the figures [`report_rate`] stored (also a bare rate, as
/// processes of an earlier version store it).
fn reported(value: &str) -> (Option<String>, std::collections::BTreeMap<String, String>) {
    if value.parse::<f64>().is_ok() {
        return (Some(value.to_string()), Default::default());
    }
    let mut figures: std::collections::BTreeMap<String, String> = value
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    (figures.remove("rate"), figures)
}

/// How long a process registration lasts without renewal.
const REGISTRATION_TTL: Duration = Duration::from_secs(3);

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
    let share = desired / n + usize::from(index < desired % n);
    // One process runs at most what CONSUMERS_COUNT may ask of it.
    share.min(*crate::settings::limits::WORKERS.end() as usize)
}

/// One process's side of `ctl scale`.
#[derive(Debug, Clone)]
pub struct Scale {
    me: String,
    /// `host=… pid=…`, for `ctl status`.
    describe: String,
    /// CONSUMERS_COUNT: the count while no total is set.
    default: usize,
    script: redis::Script,
}

impl Scale {
    pub fn new(me: String, describe: String, default: usize) -> Self {
        Self {
            me,
            describe,
            default,
            script: redis::Script::new(crate::scripts::SCALE),
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
        let workers = match desired {
            Some(total) => share(total, &processes, &self.me),
            None => self.default,
        };
        let info = format!("{PROCESS_PREFIX}{}", self.me);
        let cmd = if leave {
            redis::cmd("DEL").arg(info).clone()
        } else {
            redis::cmd("SET")
                .arg(info)
                .arg(format!("{} workers={workers}", self.describe))
                .arg("PX")
                .arg(ttl)
                .clone()
        };
        cmd.query_async::<()>(conn).await?;
        Ok(workers)
    }

    /// Registers this process and returns how many workers it should run.
    pub async fn target<C: ConnectionLike>(&self, conn: &mut C) -> redis::RedisResult<usize> {
        self.step(conn, false).await
    }

    /// Unregisters this process (also when it never registered).
    pub async fn leave<C: ConnectionLike>(&self, conn: &mut C) -> redis::RedisResult<()> {
        self.step(conn, true).await.map(drop)
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
                    tracing::debug!(cause = %crate::connect::brief(&err), "ctl scale: could not renew the registration")
                }
            }
        }
        let _ = self.leave(&mut conn).await;
    }
}

/// One live process, as `ctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProcessRow {
    /// `consume` or `work`.
    pub kind: &'static str,
    pub host: String,
    pub pid: String,
    pub workers: usize,
    /// Messages written (or entries handled) per second at its last
    /// monitoring line.
    pub rate: Option<String>,
    /// The other figures of that line (received, written, pending, gaps,
    /// reconnects, overflow; work: handled, failed, dead …).
    pub figures: std::collections::BTreeMap<String, String>,
}

/// What `optimus ctl status` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// The kill switch's value, when set.
    pub stop: Option<String>,
    /// The total set with `ctl scale`.
    pub total: Option<usize>,
    pub processes: Vec<ProcessRow>,
}

/// The kill switch, the total, and the live processes: every registered
/// `consume` process (also one running no worker), and the `work` processes
/// from the presence keys of `work_list`.
pub async fn status<C: ConnectionLike + Send>(
    conn: &mut C,
    work_list: &str,
    cluster: bool,
) -> redis::RedisResult<Status> {
    let stop: Option<String> = redis::cmd("GET").arg(STOP_KEY).query_async(conn).await?;
    let total: Option<usize> = redis::cmd("GET").arg(WORKERS_KEY).query_async(conn).await?;
    let mut described: Vec<(&'static str, String, usize)> = Vec::new();
    let consume: Vec<String> = redis::Script::new(crate::scripts::LIVE_LIST)
        .key(PROCESSES_KEY)
        .arg(PROCESS_PREFIX)
        .invoke_async(conn)
        .await?;
    // (name, info) pairs: the info says it all.
    for info in consume
        .into_iter()
        .skip(1)
        .step_by(2)
        .filter(|i| !i.is_empty())
    {
        let workers = description_field(&info, "workers")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        described.push(("consume", info, workers));
    }
    // Work processes: their workers grouped by presence value.
    let presence = crate::presence::Presence::new(work_list, Duration::from_secs(1), String::new())
        .on_cluster(cluster);
    let mut work: std::collections::BTreeMap<String, usize> = Default::default();
    for (_, value) in presence.list(conn).await? {
        *work.entry(value).or_default() += 1;
    }
    described.extend(work.into_iter().map(|(value, n)| ("work", value, n)));
    let mut processes = Vec::new();
    for (kind, info, workers) in described {
        let host = description_field(&info, "host").unwrap_or("?").to_string();
        let pid = description_field(&info, "pid").unwrap_or("?").to_string();
        let value: Option<String> = redis::cmd("GET")
            .arg(format!("{RATE_PREFIX}host={host} pid={pid}"))
            .query_async(conn)
            .await?;
        let (rate, figures) = value.as_deref().map(reported).unwrap_or_default();
        processes.push(ProcessRow {
            kind,
            host,
            pid,
            workers,
            rate,
            figures,
        });
    }
    Ok(Status {
        stop,
        total,
        processes,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "kill switch: {}",
            self.stop
                .as_ref()
                .map_or("off".to_string(), |v| format!("ON ({v})"))
        )?;
        writeln!(
            f,
            "total workers: {}",
            self.total.map_or(
                "not set (each process runs CONSUMERS_COUNT)".to_string(),
                |n| format!("{n} (ctl scale)")
            )
        )?;
        writeln!(f)?;
        if self.processes.is_empty() {
            return write!(f, "no live processes");
        }
        let rows: Vec<Vec<String>> = self
            .processes
            .iter()
            .map(|p| {
                vec![
                    p.kind.to_string(),
                    p.host.clone(),
                    p.pid.clone(),
                    p.workers.to_string(),
                    p.rate.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        let table =
            crate::manage::render::table(&["kind", "host", "pid", "workers", "rate/s"], &rows);
        write!(f, "{}", table.trim_end())
    }
}

/// `ctl scale`'s total (`None`: `--off`), checked: a whole number within
/// [`crate::settings::limits::TOTAL_WORKERS`]; 0, which stops every bridge
/// worker on every host, only with `yes`.
pub fn parse_total(
    raw: Option<&str>,
    yes: bool,
) -> Result<Option<usize>, crate::settings::ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let total: usize =
        crate::settings::parse_whole("ctl scale", raw, crate::settings::limits::TOTAL_WORKERS)?;
    if total == 0 && !yes {
        return Err(crate::settings::ConfigError::new(
            "ctl scale",
            raw,
            "0 stops every bridge worker on every host, so that nothing is bridged: add --yes to do it",
        ));
    }
    Ok(Some(total))
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

/// What the idle stop watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    /// A count that moves with the work done (messages received, entries
    /// handled).
    pub count: u64,
    /// Whether Redis is reachable: idle time counts only while it is, so a
    /// process that cannot reach Redis never stops as "idle".
    pub redis_up: bool,
}

/// Watches the kill switch and, with `idle_timeout`, the `activity` (see
/// [`Activity`]); cancels `shutdown` when either says stop. Ends when
/// `shutdown` is cancelled. Redis errors are retried quietly (the workers
/// report them).
pub async fn watch(
    endpoint: crate::connect::Endpoint,
    activity: impl Fn() -> Activity + Send + 'static,
    idle_timeout: Option<Duration>,
    shutdown: CancellationToken,
) -> Option<StopReason> {
    let mut conn = None;
    let mut last = (activity().count, Instant::now());
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
            if now.count != last.0 || !now.redis_up {
                last = (now.count, Instant::now());
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
        assert_eq!(
            share(1024, &["a".to_string()], "a"),
            256,
            "capped per process"
        );
    }
}
