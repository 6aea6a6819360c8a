//! Settings as text in, typed values out: the one [`ConfigError`] every bad
//! setting becomes (naming its variable), the range of every bounded
//! setting ([`limits`]), and the parsers that check against them. The
//! command line (`src/cli/`) and the typed configs beside each component
//! (`bridge/config.rs`, `publish/config.rs`, `work/config.rs`) both use them,
//! so a bad value gets the same one-line reason wherever it is given.

use std::fmt;
use std::time::Duration;

/// A setting that cannot be used: which variable, what it held, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {var}={value:?}: {reason}")]
pub struct ConfigError {
    /// The environment variable (the flag of the same meaning is listed in `--help`).
    pub var: &'static str,
    /// The value as given.
    pub value: String,
    /// What is wrong with it, and what would be accepted.
    pub reason: String,
}

impl ConfigError {
    pub fn new(var: &'static str, value: impl fmt::Display, reason: impl Into<String>) -> Self {
        Self {
            var,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// The log level, as LOGLEVEL gives it. The names of the system optimus
/// replaces (Python's logging levels) are accepted too.
pub fn parse_log_level(raw: &str) -> Result<tracing::Level, ConfigError> {
    use tracing::Level;
    match raw.trim().to_ascii_uppercase().as_str() {
        "TRACE" => Ok(Level::TRACE),
        "DEBUG" => Ok(Level::DEBUG),
        "INFO" | "NOTSET" => Ok(Level::INFO),
        "WARN" | "WARNING" => Ok(Level::WARN),
        "ERROR" | "CRITICAL" | "FATAL" => Ok(Level::ERROR),
        _ => Err(ConfigError::new(
            "LOGLEVEL",
            raw,
            "expected one of TRACE, DEBUG, INFO, WARNING, ERROR, CRITICAL",
        )),
    }
}

/// IDLE_TIMEOUT, if set: seconds, at least 0.01.
pub fn parse_idle_timeout(raw: Option<&str>) -> Result<Option<Duration>, ConfigError> {
    match raw.map(str::trim).filter(|r| !r.is_empty()) {
        None => Ok(None),
        Some(raw) => parse_interval("IDLE_TIMEOUT", raw).map(Some),
    }
}

/// METRICS_ADDR, if set: a socket address.
pub fn parse_metrics_addr(raw: Option<&str>) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    match raw.map(str::trim).filter(|r| !r.is_empty()) {
        None => Ok(None),
        Some(raw) => raw.parse().map(Some).map_err(|_| {
            ConfigError::new(
                "METRICS_ADDR",
                raw,
                "expected host:port, e.g. 127.0.0.1:9100",
            )
        }),
    }
}

/// One of a setting's named values (any case, aliases too), or one line
/// naming them.
pub fn parse_choice<T: Named>(var: &'static str, raw: &str) -> Result<T, ConfigError> {
    T::from_name(raw).ok_or_else(|| {
        let names: Vec<&str> = T::NAMES.iter().map(|&(name, _)| name).collect();
        ConfigError::new(var, raw, format!("expected one of {}", names.join(", ")))
    })
}

/// A setting with named values (STRATEGY, OUTPUT_FORMAT, PUBSUB_MODE).
pub trait Named: Sized + Copy + 'static {
    /// Each name with its value, as `--help` and errors list them.
    const NAMES: &'static [(&'static str, Self)];
    /// Old names still taken for a value, listed nowhere.
    const ALIASES: &'static [(&'static str, Self)] = &[];

    /// The value `name` (any case, surrounding blanks ignored) stands for.
    fn from_name(name: &str) -> Option<Self> {
        let name = name.trim();
        Self::NAMES
            .iter()
            .chain(Self::ALIASES)
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, v)| v)
    }
}

/// An optional setting that is set and not blank.
pub fn given(raw: &Option<String>) -> Option<&str> {
    raw.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// The range of each bounded setting: the CLI's parsing and
/// [`BridgeConfig::validate`] both check against these, so every bad value
/// gets the same one-line reason.
pub mod limits {
    use std::ops::RangeInclusive;

    /// Workers (subscriptions) in one process: CONSUMERS_COUNT, WORK_CONSUMERS.
    pub const WORKERS: RangeInclusive<u64> = 1..=256;
    /// The total set by `optimus ctl scale` (0 needs `--yes`).
    pub const TOTAL_WORKERS: RangeInclusive<u64> = 0..=1024;
    /// PROCESSING_BATCH_SIZE.
    pub const BATCH: RangeInclusive<u64> = 1..=10_000;
    /// MEMORY_LIMIT: from 8 MiB to 64 GiB.
    pub const MEMORY: RangeInclusive<u64> = 8 << 20..=64 << 30;
    /// MAX_PAYLOAD_BYTES: at most half the server's default Pub/Sub
    /// output-buffer hard limit (32 MB), past which one message drops every
    /// subscriber at once.
    pub const PAYLOAD_BYTES: RangeInclusive<u64> = 1..=16 << 20;
    /// MIN_REPLICAS_ACKED.
    pub const REPLICAS: RangeInclusive<u64> = 0..=16;
    /// STANDBYS (or `all`).
    pub const STANDBYS: RangeInclusive<u64> = 0..=64;
    /// TCP ports.
    pub const PORT: RangeInclusive<u64> = 1..=65_535;
    /// Seconds of intervals, TTLs and timeouts: from 10 ms to a day.
    pub const SECONDS: RangeInclusive<f64> = 0.01..=86_400.0;
}

/// A count given on the command line (`flag`), within `range`: as
/// [`parse_whole`], for the binary's own flags.
pub fn parse_count(
    flag: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    parse_whole(flag, raw, range)
}

/// A whole number within `range`; anything else is one line naming the range.
pub fn parse_whole<T: TryFrom<u64>>(
    var: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<T, ConfigError> {
    let bad = || {
        ConfigError::new(
            var,
            raw,
            format!(
                "expected a whole number from {} to {}",
                range.start(),
                range.end()
            ),
        )
    };
    let n: i128 = raw.trim().parse().map_err(|_| bad())?;
    let n = u64::try_from(n)
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(bad)?;
    T::try_from(n).map_err(|_| bad())
}

/// A size in bytes within `range`: a whole number, or one with a unit
/// (`KiB`, `MiB`, `GiB`, or `K`, `M`, `G`, `KB`, `MB`, `GB`, all powers of
/// 1024); anything else is one line naming the range.
pub fn parse_bytes(
    var: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    let bad = || {
        ConfigError::new(
            var,
            raw,
            format!(
                "expected a size from {} to {} (bytes, or with KiB, MiB, GiB), like 256MiB",
                show_bytes(*range.start()),
                show_bytes(*range.end())
            ),
        )
    };
    let text = raw.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    number
        .checked_mul(scale)
        .filter(|n| range.contains(n))
        .ok_or_else(bad)
}

/// A size as a person writes it: 8MiB, 64GiB, 1000 bytes.
fn show_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// A count already parsed (a library setting) checked against `range`, with
/// the same words as [`parse_whole`].
pub fn check_whole(
    var: &'static str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<(), ConfigError> {
    parse_whole::<u64>(var, &value.to_string(), range).map(drop)
}

/// Seconds (fractions allowed) within `range`; anything else is one line
/// naming the range.
pub fn parse_seconds(
    var: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<f64>,
) -> Result<Duration, ConfigError> {
    let value: f64 = raw.trim().parse().unwrap_or(f64::NAN);
    if !range.contains(&value) {
        return Err(ConfigError::new(
            var,
            raw,
            format!(
                "expected seconds from {} to {}, like 3 or 0.5",
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(Duration::from_secs_f64(value))
}

/// A duration already set (a library setting) checked against `range`, with
/// the same words as [`parse_seconds`].
pub fn check_seconds(
    var: &'static str,
    value: Duration,
    range: std::ops::RangeInclusive<f64>,
) -> Result<(), ConfigError> {
    parse_seconds(var, &value.as_secs_f64().to_string(), range).map(drop)
}

/// Seconds from 0.01 to a day: the range of most intervals and TTLs.
pub fn parse_interval(var: &'static str, raw: &str) -> Result<Duration, ConfigError> {
    parse_seconds(var, raw, limits::SECONDS)
}

pub fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_log_level_names_are_accepted() {
        assert_eq!(parse_log_level("WARNING").unwrap(), tracing::Level::WARN);
        assert_eq!(parse_log_level("critical").unwrap(), tracing::Level::ERROR);
        assert_eq!(parse_log_level("DEBUG").unwrap(), tracing::Level::DEBUG);
        assert_eq!(parse_log_level("LOUD").unwrap_err().var, "LOGLEVEL");
    }
}
