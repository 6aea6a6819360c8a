//! The `optimus` command: parse the command line, run it, and turn how it
//! ended into the exit code. Everything else is in `cli/` (the commands) and
//! the library.

mod cli;

use std::io::Write as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::parse().and_then(cli::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(exit) => {
            // Exit codes: 0 done, 1 a failure retrying cannot mend (or a
            // result that is not good), 2 a bad setting or command line;
            // `health` returns its level (1 warn, 2 alert).
            let (code, line) = exit.code_and_line();
            if let Some(line) = line {
                if cli::logs_are_json() {
                    // With LOG_FORMAT=json every stderr line is JSON: the
                    // last one too, at level ERROR.
                    tracing::error!("optimus: {line}");
                } else {
                    // A stderr nobody reads any more (a log collector that
                    // died) loses the line, never panics.
                    let _ = writeln!(std::io::stderr(), "optimus: {line}");
                }
            }
            ExitCode::from(code)
        }
    }
}
