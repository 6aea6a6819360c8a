//! Shutdown by cancellation: the first SIGINT, SIGTERM or SIGHUP cancels a
//! token every long-running command watches; the second exits at once.

use tokio_util::sync::CancellationToken;

/// A token cancelled by the first SIGINT, SIGTERM or SIGHUP (a closed
/// terminal); the second one exits at once.
pub fn shutdown_on_signal() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).expect("cannot listen for SIGTERM");
    let mut int = signal(SignalKind::interrupt()).expect("cannot listen for SIGINT");
    let mut hup = signal(SignalKind::hangup()).expect("cannot listen for SIGHUP");
    let cancel = token.clone();
    tokio::spawn(async move {
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
            if n == 0 {
                cancel.cancel();
                tracing::info!(
                    "signal received: finishing the work in hand (again to exit at once)"
                );
            } else {
                tracing::warn!("second signal: exiting now");
                // `optimus work`'s handlers go with it.
                optimus::work::kill_handlers();
                std::process::exit(130);
            }
        }
    });
    token
}

/// Restores SIGPIPE's default action, so that a one-shot command whose
/// output goes to a pipe closed early ends quietly instead of panicking on
/// the write. Called before any thread is started.
pub fn quiet_on_closed_pipe() {
    // SAFETY: restores the default action of one signal before any thread is
    // started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
