//! What runs beside the workers: the presence keys kept alive, and the
//! monitoring line (with the link state and memory given back while quiet).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::delivery::reader::Coverage;
use crate::connect::Conn;
use crate::monitor::{Counters, MonitorLine};
use crate::presence::Presence;

/// How often a quiet process gives free memory back to the system.
const RELEASE_EVERY: Duration = Duration::from_secs(10);

/// Refreshes the presence keys until cancelled.
pub(super) async fn keep_present(
    presence: Presence,
    mut conn: Conn,
    workers: Arc<Mutex<Vec<String>>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(presence.refresh_every());
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let workers = workers.lock().unwrap().clone();
        if let Err(err) = presence.refresh(&mut conn, &workers).await {
            tracing::warn!(cause = %crate::connect::brief(&err), "could not refresh presence keys");
        }
    }
}

/// What the monitor looks at besides the counters: the workers that should
/// be subscribed, and how many are.
pub(super) struct Watched {
    pub workers: Arc<Mutex<Vec<String>>>,
    pub coverage: Arc<Coverage>,
    /// Whether this process holds copies (a process that waits for a place
    /// among the holders reads nothing, by design).
    pub hold: tokio::sync::watch::Receiver<bool>,
}

/// How long the monitor waits for Redis at each line: the line is printed on
/// time whether Redis answers or not.
pub(super) fn monitor_budget(interval: Duration) -> Duration {
    (interval / 2).clamp(Duration::from_millis(50), Duration::from_secs(2))
}

/// Prints the monitoring line every `interval` until cancelled, and keeps
/// the link state ([`Counters::set_link`]): Redis is reachable when it
/// answers the monitor in time and, while workers should be running, at
/// least one of them is subscribed.
pub(super) async fn monitor(
    presence: Presence,
    mut conn: Conn,
    counters: Arc<Counters>,
    watched: Watched,
    interval: Duration,
    print: bool,
    cancel: CancellationToken,
) {
    let mut last = (Instant::now(), counters.snapshot().written);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let budget = monitor_budget(interval);
    // Memory is given back while quiet: at the first line with nothing
    // received since the one before and nothing in hand, and then every
    // RELEASE_EVERY while it stays so (what goes later, such as the lanes of
    // channels gone quiet, is given back too).
    let mut quiet: (u64, Option<Instant>) = (counters.snapshot().received, None);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A refusal (writes refused for now, say) is an answer: Redis is
        // reachable.
        let (consumers, answered) = match tokio::time::timeout(budget, presence.count(&mut conn))
            .await
        {
            Ok(Ok(n)) => {
                Counters::set(&counters.live_workers, n);
                (Some(n), true)
            }
            Ok(Err(err)) => {
                tracing::debug!(cause = %crate::connect::brief(&err), "could not count consumers");
                let unreachable =
                    err.is_io_error() || err.is_connection_dropped() || err.is_timeout();
                (None, !unreachable)
            }
            Err(_) => (None, false),
        };
        let wanted = !watched.workers.lock().unwrap().is_empty() && *watched.hold.borrow();
        counters.set_link(answered && (!wanted || watched.coverage.subscribed() > 0));
        let now = Instant::now();
        let snapshot = counters.snapshot();
        let elapsed = now.duration_since(last.0).as_secs_f64();
        let rate = (snapshot.written - last.1) as f64 / elapsed.max(1e-9);
        last = (now, snapshot.written);
        if snapshot.received != quiet.0 {
            quiet = (snapshot.received, None);
        } else if snapshot.unsettled() == 0
            && quiet.1.is_none_or(|at| at.elapsed() >= RELEASE_EVERY)
        {
            quiet.1 = Some(Instant::now());
            crate::monitor::release_free_memory();
        }
        let line = MonitorLine {
            consumers,
            counters: snapshot,
            rate,
            link: counters.link(),
        };
        if consumers.is_some() {
            let shown = line.to_string();
            let report =
                crate::control::report_rate(&mut conn, presence.value(), rate, &shown, interval);
            let _ = tokio::time::timeout(budget, report).await;
        }
        if print {
            crate::monitor::print_line(line);
        }
        tracing::debug!(%line, "monitor");
    }
}
