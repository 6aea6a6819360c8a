//! `optimus health`: its thresholds, turned into a [`HealthConfig`], and the
//! check.

use clap::Args;
use optimus::health::{HealthConfig, Limit, Thresholds};
use optimus::settings::{ConfigError, parse_whole};

use super::Exit;
use super::connect::ConnectArgs;

/// Prints one line per check; the exit code is the worst level (0 ok, 1
/// warn, 2 alert). Redis unreachable is an alert.
pub async fn run(connect: &ConnectArgs, args: &HealthArgs) -> Result<(), Exit> {
    use optimus::health::{Check, Level, Report};
    let endpoint = connect.endpoint()?;
    let config = args.to_config()?;
    let server = endpoint.to_string();
    let report = match optimus::connect::open(&endpoint).await {
        Ok(mut conn) => optimus::health::check(&mut conn, &config).await,
        Err(err) => Report {
            checks: vec![Check {
                level: Level::Alert,
                name: "redis".into(),
                value: "-".into(),
                rule: format!("cannot reach {server}: {}", optimus::connect::explain(&err)),
            }],
        },
    };
    match args.json {
        true => println!(
            "{}",
            serde_json::to_string(&report.with_level()).expect("plain data")
        ),
        false => print!("{report}"),
    }
    match report.level().exit_code() {
        0 => Ok(()),
        code => Err(Exit::Level(code)),
    }
}

/// `optimus health` settings, as text; [`HealthArgs::to_config`] checks them.
/// Thresholds named `…_WARN` / `…_ALERT`: consumers trip *below* them, the
/// others *above*.
#[derive(Debug, Clone, Args)]
// A negative number is a value (rejected with the setting's own reason),
// not an unknown flag.
#[command(allow_negative_numbers = true)]
pub struct HealthArgs {
    /// One JSON object (`level` and each check's `level`, `name`, `value`, `rule`) instead of the lines.
    #[arg(long)]
    pub json: bool,
    /// Stream to check.
    #[arg(long, env = "OUTPUT_STREAM", default_value = "messages:processed")]
    pub stream: String,
    /// Check only this consumer group (default: every group of the stream).
    #[arg(long, env = "HEALTH_GROUP")]
    pub group: Option<String>,
    /// The bridge's CONSUMERS_LIST, whose presence keys count its live workers.
    #[arg(long, env = "CONSUMERS_LIST", default_value = "consumer:ids")]
    pub consumers_list: String,
    /// Warn when fewer live bridge workers than this.
    #[arg(long, env = "HEALTH_BRIDGE_CONSUMERS_WARN", default_value = "2")]
    pub bridge_consumers_warn: String,
    /// Alert when fewer live bridge workers than this.
    #[arg(long, env = "HEALTH_BRIDGE_CONSUMERS_ALERT", default_value = "1")]
    pub bridge_consumers_alert: String,
    /// Warn when a group has fewer consumers than this.
    #[arg(long, env = "HEALTH_GROUP_CONSUMERS_WARN", default_value = "1")]
    pub group_consumers_warn: String,
    /// Seconds a group's consumer may go without reading and still count as active (consumers stay registered after they stop).
    #[arg(long, env = "HEALTH_CONSUMER_IDLE", default_value = "60")]
    pub consumer_idle: String,
    /// Alert when a group has fewer consumers than this.
    #[arg(long, env = "HEALTH_GROUP_CONSUMERS_ALERT", default_value = "1")]
    pub group_consumers_alert: String,
    /// Warn when more entries than this are not yet delivered to a group.
    #[arg(long, env = "HEALTH_LAG_WARN", default_value = "1000")]
    pub lag_warn: String,
    /// Alert when more entries than this are not yet delivered to a group.
    #[arg(long, env = "HEALTH_LAG_ALERT", default_value = "10000")]
    pub lag_alert: String,
    /// Warn when more entries than this are delivered and not acknowledged.
    #[arg(long, env = "HEALTH_PENDING_WARN", default_value = "1000")]
    pub pending_warn: String,
    /// Alert when more entries than this are delivered and not acknowledged.
    #[arg(long, env = "HEALTH_PENDING_ALERT", default_value = "10000")]
    pub pending_alert: String,
    /// Warn when a group's oldest pending entry is older than this (seconds).
    #[arg(long, env = "HEALTH_PENDING_AGE_WARN", default_value = "60")]
    pub pending_age_warn: String,
    /// Alert when a group's oldest pending entry is older than this (seconds).
    #[arg(long, env = "HEALTH_PENDING_AGE_ALERT", default_value = "300")]
    pub pending_age_alert: String,
}

impl HealthArgs {
    pub fn to_config(&self) -> Result<HealthConfig, ConfigError> {
        const THRESHOLD: std::ops::RangeInclusive<u64> = 0..=1_000_000_000_000;
        let limit = |warn: (&'static str, &str), alert: (&'static str, &str), below| {
            let limit = Limit {
                warn: parse_whole(warn.0, warn.1, THRESHOLD)?,
                alert: parse_whole(alert.0, alert.1, THRESHOLD)?,
                below,
            };
            limit.validate(warn.0)?;
            Ok::<_, ConfigError>(limit)
        };
        Ok(HealthConfig {
            stream: self.stream.clone(),
            consumers_list: self.consumers_list.clone(),
            group: self.group.clone(),
            thresholds: Thresholds {
                bridge_consumers: limit(
                    ("HEALTH_BRIDGE_CONSUMERS_WARN", &self.bridge_consumers_warn),
                    (
                        "HEALTH_BRIDGE_CONSUMERS_ALERT",
                        &self.bridge_consumers_alert,
                    ),
                    true,
                )?,
                group_consumers: limit(
                    ("HEALTH_GROUP_CONSUMERS_WARN", &self.group_consumers_warn),
                    ("HEALTH_GROUP_CONSUMERS_ALERT", &self.group_consumers_alert),
                    true,
                )?,
                lag: limit(
                    ("HEALTH_LAG_WARN", &self.lag_warn),
                    ("HEALTH_LAG_ALERT", &self.lag_alert),
                    false,
                )?,
                pending: limit(
                    ("HEALTH_PENDING_WARN", &self.pending_warn),
                    ("HEALTH_PENDING_ALERT", &self.pending_alert),
                    false,
                )?,
                pending_age_secs: limit(
                    ("HEALTH_PENDING_AGE_WARN", &self.pending_age_warn),
                    ("HEALTH_PENDING_AGE_ALERT", &self.pending_age_alert),
                    false,
                )?,
                consumer_idle_secs: parse_whole(
                    "HEALTH_CONSUMER_IDLE",
                    &self.consumer_idle,
                    1..=86_400,
                )?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_are_the_documented_thresholds() {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: HealthArgs,
        }
        let config = Cli::parse_from(["health"]).args.to_config().unwrap();
        assert_eq!(config.thresholds, Thresholds::default());
    }
}
