//! Logs on stderr, at LOGLEVEL (RUST_LOG, when set, wins); a write nobody
//! reads any more is dropped, so that logs can never stop the bridge.

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

pub fn init(level: tracing::Level) {
    use tracing_subscriber::EnvFilter;
    // The redis crate's own warnings (a cluster node it could not reach,
    // say) are left out: optimus reports each failure itself, once, with
    // what to do; RUST_LOG=redis=warn brings them back.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,redis=error,optimus={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
