//! Logs on stderr, at LOGLEVEL (RUST_LOG, when set, wins), as text or
//! (LOG_FORMAT=json) one JSON object per line; a write nobody reads any more
//! is dropped, so that logs can never stop the bridge.

use std::io::IsTerminal;

/// Standard error for the logs: a write nobody reads (the pipe closed) is
/// dropped, so that logs can never stop the bridge.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(std::io::stderr().write(buf).unwrap_or(buf.len()))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// LOG_FORMAT: how a log line looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `<time> <LEVEL> <message> key=value…`, coloured on a terminal
    /// (unless NO_COLOR is set).
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target` and
    /// `fields` (`message` and the event's own), for log collectors.
    Json,
}

impl optimus::settings::Named for LogFormat {
    const NAMES: &'static [(&'static str, Self)] = &[("text", Self::Text), ("json", Self::Json)];
}

/// Whether the logs are JSON (LOG_FORMAT=json, once [`init`] ran).
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`init`] set up JSON logs: the last error line then goes out as
/// a JSON event too.
pub fn json() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn init(level: tracing::Level, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // The redis crate's own warnings (a cluster node it could not reach,
    // say) are left out: optimus reports each failure itself, once, with
    // what to do; RUST_LOG=redis=warn brings them back.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,redis=error,optimus={level}")));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::stderr().is_terminal() && !no_color())
            .with_target(false)
            .init(),
        LogFormat::Json => {
            logs.json().with_ansi(false).init();
            JSON.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// NO_COLOR set to anything but the empty string (<https://no-color.org>).
fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}
