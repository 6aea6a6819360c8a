//! `optimus health`: checks a stream, its consumer groups and the bridge's
//! workers against ok / warn / alert thresholds, one line per check, and
//! exits 0 / 1 / 2 for the worst result, as monitoring systems that run a
//! command expect.

use std::fmt;
use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::manage::{self, render};
use crate::presence::Presence;
use crate::settings::ConfigError;

/// The result of one check (ordered: the worst wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Alert,
}

impl Level {
    /// 0, 1 or 2.
    pub fn exit_code(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Alert => "ALERT",
        })
    }
}

/// A warn and an alert threshold. For counts that must stay high (workers)
/// a value *below* a threshold trips it; for the others, a value *above*.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub warn: u64,
    pub alert: u64,
    pub below: bool,
}

impl Limit {
    pub fn level(&self, value: u64) -> Level {
        let trips = |t: u64| if self.below { value < t } else { value > t };
        if trips(self.alert) {
            Level::Alert
        } else if trips(self.warn) {
            Level::Warn
        } else {
            Level::Ok
        }
    }

    fn describe(&self, unit: &str) -> String {
        let op = if self.below { "<" } else { ">" };
        format!(
            "warn {op} {}{unit}, alert {op} {}{unit}",
            self.warn, self.alert
        )
    }

    /// Checks that the alert threshold is the stricter one.
    pub fn validate(&self, warn_var: &'static str) -> Result<(), ConfigError> {
        let ordered = if self.below {
            self.alert <= self.warn
        } else {
            self.alert >= self.warn
        };
        if ordered {
            return Ok(());
        }
        Err(ConfigError::new(
            warn_var,
            self.warn.to_string(),
            format!(
                "must be {} the alert threshold ({})",
                if self.below { "at least" } else { "at most" },
                self.alert
            ),
        ))
    }
}

/// Every threshold of `optimus health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Live bridge workers (presence keys), all hosts.
    pub bridge_consumers: Limit,
    /// Active consumers in each group (read within `consumer_idle_secs`).
    pub group_consumers: Limit,
    /// How long a group's consumer may go without reading and still count
    /// as active, in seconds (HEALTH_CONSUMER_IDLE).
    pub consumer_idle_secs: u64,
    /// Entries not delivered to a group yet.
    pub lag: Limit,
    /// Entries delivered to a group's consumers and not acknowledged.
    pub pending: Limit,
    /// How long a group's longest-waiting pending entry has waited since it
    /// was last delivered, in seconds.
    pub pending_age_secs: Limit,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            bridge_consumers: Limit {
                warn: 2,
                alert: 1,
                below: true,
            },
            group_consumers: Limit {
                warn: 1,
                alert: 1,
                below: true,
            },
            consumer_idle_secs: 60,
            lag: Limit {
                warn: 1_000,
                alert: 10_000,
                below: false,
            },
            pending: Limit {
                warn: 1_000,
                alert: 10_000,
                below: false,
            },
            pending_age_secs: Limit {
                warn: 60,
                alert: 300,
                below: false,
            },
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub level: Level,
    pub name: String,
    /// The measured value, as shown (`-` when it could not be measured).
    pub value: String,
    /// The thresholds, or why the check failed.
    pub rule: String,
}

/// All checks, and the worst level.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

/// A report with its worst level, as `optimus health --json` prints it.
#[derive(serde::Serialize)]
pub struct LeveledReport<'a> {
    pub level: Level,
    pub checks: &'a [Check],
}

impl Report {
    /// The report with its worst level beside the checks.
    pub fn with_level(&self) -> LeveledReport<'_> {
        LeveledReport {
            level: self.level(),
            checks: &self.checks,
        }
    }

    pub fn level(&self) -> Level {
        self.checks
            .iter()
            .map(|c| c.level)
            .max()
            .unwrap_or(Level::Ok)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<Vec<String>> = self
            .checks
            .iter()
            .map(|c| {
                vec![
                    c.level.to_string(),
                    c.name.clone(),
                    c.value.clone(),
                    c.rule.clone(),
                ]
            })
            .collect();
        let table = render::table(&["level", "check", "value", "rule"], &rows);
        // One line per check: no header.
        for line in table.lines().skip(1) {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// What to check.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub stream: String,
    /// CONSUMERS_LIST of the bridge whose workers are counted.
    pub consumers_list: String,
    /// Only this group (`None`: every group of the stream).
    pub group: Option<String>,
    pub thresholds: Thresholds,
}

/// Runs every check. Redis being unreachable or the stream missing are
/// alerts, not errors.
pub async fn check(conn: &mut (impl ConnectionLike + Send), config: &HealthConfig) -> Report {
    let t = &config.thresholds;
    let mut checks = Vec::new();
    let measured = |name: String, value: u64, limit: &Limit, unit: &str| Check {
        level: limit.level(value),
        name,
        value: value.to_string(),
        rule: limit.describe(unit),
    };
    let failed = |name: String, why: String| Check {
        level: Level::Alert,
        name,
        value: "-".into(),
        rule: why,
    };

    let presence = Presence::new(
        &config.consumers_list,
        Duration::from_secs(1),
        String::new(),
    );
    match presence.count(conn).await {
        Ok(n) => checks.push(measured(
            "bridge consumers".into(),
            n,
            &t.bridge_consumers,
            "",
        )),
        Err(err) => {
            checks.push(failed(
                "bridge consumers".into(),
                format!("Redis: {}", crate::connect::explain(&err)),
            ));
            return Report { checks };
        }
    }

    let info = match manage::stream_info(conn, &config.stream).await {
        Ok(info) => info,
        Err(err) => {
            checks.push(failed(format!("stream {}", config.stream), err.to_string()));
            return Report { checks };
        }
    };
    let groups: Vec<_> = info
        .groups
        .iter()
        .filter(|g| config.group.as_ref().is_none_or(|name| *name == g.name))
        .collect();
    if let Some(name) = &config.group
        && groups.is_empty()
    {
        checks.push(failed(
            format!("group {name}"),
            format!("stream {} has no group named {name}", config.stream),
        ));
    }
    for g in groups {
        let name = |what: &str| format!("group {} {what}", g.name);
        // Consumers stay registered after they stop: only those that read
        // within HEALTH_CONSUMER_IDLE count.
        match active_consumers(conn, &config.stream, &g.name, t.consumer_idle_secs).await {
            Ok(active) => checks.push(Check {
                rule: format!(
                    "{} (of {} registered, read within {} s)",
                    t.group_consumers.describe(""),
                    g.consumers,
                    t.consumer_idle_secs
                ),
                ..measured(name("consumers"), active, &t.group_consumers, "")
            }),
            Err(err) => checks.push(failed(
                name("consumers"),
                format!("Redis: {}", crate::connect::explain(&err)),
            )),
        }
        match g.lag {
            Some(lag) => checks.push(measured(name("lag"), lag as u64, &t.lag, "")),
            None => checks.push(Check {
                level: Level::Warn,
                name: name("lag"),
                value: "-".into(),
                rule: "Redis cannot tell (entries deleted in the middle of the stream)".into(),
            }),
        }
        checks.push(measured(name("pending"), g.pending as u64, &t.pending, ""));
        let age = match longest_pending_idle_ms(conn, &config.stream, &g.name).await {
            Ok(idle) => idle / 1000,
            Err(err) => {
                checks.push(failed(
                    name("oldest pending"),
                    format!("Redis: {}", crate::connect::explain(&err)),
                ));
                continue;
            }
        };
        checks.push(measured(
            name("oldest pending (s)"),
            age,
            &t.pending_age_secs,
            " s",
        ));
    }
    Report { checks }
}

/// How many pending entries [`longest_pending_idle_ms`] looks at: the
/// first of the group's pending list (by id, the earliest delivered as a
/// rule).
const PENDING_LOOKED_AT: usize = 1000;

/// How long the longest-waiting of a group's pending entries has waited
/// since its last delivery (ms; 0 with none pending), from XPENDING's idle
/// times: an entry delivered a moment ago is not stuck, however old its id
/// (a group working through a backlog reads old entries).
async fn longest_pending_idle_ms(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
) -> redis::RedisResult<u64> {
    let reply: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(PENDING_LOOKED_AT)
        .query_async(conn)
        .await?;
    Ok(reply
        .ids
        .iter()
        .map(|entry| entry.last_delivered_ms as u64)
        .max()
        .unwrap_or(0))
}

/// A group's consumers that read within `idle_secs`.
async fn active_consumers(
    conn: &mut (impl ConnectionLike + Send),
    stream: &str,
    group: &str,
    idle_secs: u64,
) -> redis::RedisResult<u64> {
    let consumers = manage::consumers(conn, stream, group).await?;
    Ok(consumers
        .iter()
        .filter(|c| (c.idle_ms as u64) < idle_secs * 1000)
        .count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_trip_below_or_above() {
        let workers = Limit {
            warn: 2,
            alert: 1,
            below: true,
        };
        assert_eq!(workers.level(3), Level::Ok);
        assert_eq!(workers.level(2), Level::Ok);
        assert_eq!(workers.level(1), Level::Warn);
        assert_eq!(workers.level(0), Level::Alert);
        let lag = Limit {
            warn: 10,
            alert: 100,
            below: false,
        };
        assert_eq!(lag.level(10), Level::Ok);
        assert_eq!(lag.level(11), Level::Warn);
        assert_eq!(lag.level(101), Level::Alert);
        assert!(lag.validate("X").is_ok());
        let backwards = Limit {
            warn: 100,
            alert: 10,
            below: false,
        };
        assert!(backwards.validate("HEALTH_LAG_WARN").is_err());
    }
}
