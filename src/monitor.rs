//! The bridge's counters and the monitoring line they feed.
//!
//! Workers add to shared atomic counters; every MONITORING_INTERVAL the
//! monitor prints one line on stdout:
//!
//! ```text
//! monitor consumers=3 received=30000 written=10000 duplicates_skipped=20000 taken_over=0 pending=0 expired=0 dead=0 overflow=0 rate=3333/s reconnects=0 gaps=0 gap_ms=0 errors=0 reused_ids=0 refused=0 redis=connected
//! ```
//!
//! The line is printed every interval whatever Redis does: while it cannot
//! be reached the line says so (`redis=reconnecting down_s=12.3`), and
//! `consumers` is `?`.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters of one bridge process, summed over its workers.
#[derive(Debug)]
pub struct Counters {
    /// Messages received from the channel (every worker receives every message).
    pub received: AtomicU64,
    /// Messages this process added to the stream.
    pub written: AtomicU64,
    /// Copies dropped because another worker had written the message.
    pub duplicates_skipped: AtomicU64,
    /// Of `written`: messages written for an owner that had not written them
    /// in time (partitioned strategy).
    pub taken_over: AtomicU64,
    /// Copies held, waiting for another worker's ACK (a gauge).
    pub pending: AtomicU64,
    /// Copies dropped after PENDING_RETENTION without an ACK or a lock to take.
    pub expired: AtomicU64,
    /// Messages written to the dead-letter stream instead (too large, bad id).
    pub dead_lettered: AtomicU64,
    /// Messages a worker dropped because its queue was full (QUEUE_CAPACITY).
    pub overflow: AtomicU64,
    /// Subscriptions re-established after a lost connection.
    pub reconnects: AtomicU64,
    /// Times no worker of this process was subscribed, after one had been.
    pub gaps: AtomicU64,
    /// Total length of those gaps, in milliseconds.
    pub gap_ms: AtomicU64,
    /// Redis commands that failed and were retried.
    pub redis_errors: AtomicU64,
    /// Live workers on every host, as last counted by the monitor (a gauge).
    pub live_workers: AtomicU64,
    /// Workers running in this process now (a gauge).
    pub workers: AtomicU64,
    /// 1 while this process holds copies (it reads), 0 while it waits for
    /// a place among the pool's holders (STANDBYS; a gauge).
    pub holding: AtomicU64,
    /// Messages skipped because their id was already written with other
    /// bytes: a publisher reusing ids.
    pub reused_ids: AtomicU64,
    /// Messages that neither the stream nor the dead-letter stream would
    /// take (each logged with Redis's reasons).
    pub refused: AtomicU64,
    /// Messages on the marks channel that were no mark of the pool (not
    /// sealed by the server's scripts, or not after the last mark): ignored.
    pub bad_marks: AtomicU64,
    /// Whether this process reaches Redis now (see [`Counters::set_link`]).
    link: LinkState,
    /// Seconds each write batch took (its round trip to Redis).
    pub batch_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            received: AtomicU64::default(),
            written: AtomicU64::default(),
            duplicates_skipped: AtomicU64::default(),
            taken_over: AtomicU64::default(),
            pending: AtomicU64::default(),
            expired: AtomicU64::default(),
            dead_lettered: AtomicU64::default(),
            overflow: AtomicU64::default(),
            reconnects: AtomicU64::default(),
            gaps: AtomicU64::default(),
            gap_ms: AtomicU64::default(),
            redis_errors: AtomicU64::default(),
            live_workers: AtomicU64::default(),
            workers: AtomicU64::default(),
            holding: AtomicU64::default(),
            reused_ids: AtomicU64::default(),
            refused: AtomicU64::default(),
            bad_marks: AtomicU64::default(),
            link: LinkState::default(),
            // 0.1 ms to about 3 s.
            batch_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 15),
            ),
        }
    }
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, n: u64) {
        gauge.store(n, Ordering::Relaxed);
    }

    /// Records whether Redis is reachable now: commands answer and, when
    /// workers should be running, at least one subscription is up.
    pub fn set_link(&self, up: bool) {
        self.link.set(up);
    }

    /// Whether Redis was reachable at the last look.
    pub fn redis_up(&self) -> bool {
        self.link.is_up()
    }

    /// The state of the link to Redis, for the monitoring line.
    pub fn link(&self) -> Link {
        self.link.state()
    }

    /// The values now.
    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            received: get(&self.received),
            written: get(&self.written),
            duplicates_skipped: get(&self.duplicates_skipped),
            taken_over: get(&self.taken_over),
            pending: get(&self.pending),
            expired: get(&self.expired),
            dead_lettered: get(&self.dead_lettered),
            overflow: get(&self.overflow),
            reconnects: get(&self.reconnects),
            gaps: get(&self.gaps),
            gap_ms: get(&self.gap_ms),
            redis_errors: get(&self.redis_errors),
            reused_ids: get(&self.reused_ids),
            refused: get(&self.refused),
            bad_marks: get(&self.bad_marks),
        }
    }
}

/// Until `cancel`, prints `line()` every `interval` (when `print`): the
/// monitoring line of a process still connecting to Redis, which must not
/// fall silent meanwhile.
pub async fn while_connecting(
    interval: Duration,
    print: bool,
    line: impl Fn() -> String,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if print {
            print_line(line());
        }
    }
}

/// Gives the memory freed after a burst back to the system. glibc's
/// allocator keeps freed memory for reuse, so without this a process that
/// once buffered a burst (or many short-lived channels) would stay at its
/// peak size after going quiet.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own
    // heaps to the kernel; it touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// MONITOR_FORMAT=json: status lines go out as JSON objects.
static JSON_LINES: AtomicBool = AtomicBool::new(false);

/// MONITOR_FORMAT: `json` prints every status line (monitoring, progress,
/// summaries) as one JSON object instead of `key=value` text.
pub fn set_json_lines(json: bool) {
    JSON_LINES.store(json, Ordering::Relaxed);
}

/// Prints a monitoring line on stdout (as JSON with
/// [`set_json_lines`]). A stdout nobody reads any more (a closed pipe) is
/// no reason to stop bridging: the line is dropped.
pub fn print_line(line: impl fmt::Display) {
    use std::io::Write;
    let line = line.to_string();
    let line = match JSON_LINES.load(Ordering::Relaxed) {
        true => as_json(&line).to_string(),
        false => line,
    };
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// A status line as one JSON object: the words before the first `key=value`
/// are its `kind` (`monitor`, `publish done`), and each `key=value` a
/// member, a number where the value is one (a rate's `/s` dropped), `null`
/// for `?`, else a string.
pub fn as_json(line: &str) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    let mut kind: Vec<&str> = Vec::new();
    for word in line.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            if object.is_empty() {
                kind.push(word);
            }
            continue;
        };
        let number = value.strip_suffix("/s").unwrap_or(value);
        let value = if value == "?" {
            serde_json::Value::Null
        } else if let Ok(n) = number.parse::<u64>() {
            n.into()
        } else if let Some(n) = number
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
        {
            serde_json::Value::Number(n)
        } else {
            value.into()
        };
        object.insert(key.to_string(), value);
    }
    let mut out = serde_json::Map::new();
    out.insert("kind".into(), kind.join(" ").into());
    out.extend(object);
    serde_json::Value::Object(out)
}

/// Lets a repeated warning through at most once a second.
#[derive(Debug, Default)]
pub struct Throttle {
    next: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    /// `Some(how many were held back since the last one)` when a warning may
    /// go out now; `None` (and counted) when not.
    pub fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.next.is_some_and(|next| now < next) {
            self.held_back += 1;
            return None;
        }
        self.next = Some(now + Duration::from_secs(1));
        Some(std::mem::take(&mut self.held_back))
    }
}

/// Whether a process reaches Redis, since when it has not, and whether it
/// ever did: what the monitoring lines and `optimus_redis_up` say.
#[derive(Debug)]
pub struct LinkState {
    up: AtomicBool,
    /// Since when it has not (or has not yet).
    down_since: Mutex<Option<Instant>>,
    ever_up: AtomicBool,
}

impl Default for LinkState {
    fn default() -> Self {
        Self {
            up: AtomicBool::new(false),
            down_since: Mutex::new(Some(Instant::now())),
            ever_up: AtomicBool::new(false),
        }
    }
}

impl LinkState {
    /// Records whether Redis answered the last look.
    pub fn set(&self, up: bool) {
        let mut since = self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        if up {
            *since = None;
            self.ever_up.store(true, Ordering::Relaxed);
        } else if since.is_none() {
            *since = Some(Instant::now());
        }
        self.up.store(up, Ordering::Relaxed);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Connected, reconnecting since when, or connecting since when.
    pub fn state(&self) -> Link {
        let since = *self.down_since.lock().unwrap_or_else(|e| e.into_inner());
        match since {
            None => Link::Connected,
            Some(at) if self.ever_up.load(Ordering::Relaxed) => Link::Reconnecting(at.elapsed()),
            Some(at) => Link::Connecting(at.elapsed()),
        }
    }
}

/// Whether a process reaches Redis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Link {
    Connected,
    /// Not yet, for this long since the start.
    Connecting(Duration),
    /// Not any more, for this long.
    Reconnecting(Duration),
}

impl Link {
    /// For a readiness probe: `Err` with the reason while Redis is not
    /// reached.
    pub fn ready(&self) -> Result<(), String> {
        match self {
            Link::Connected => Ok(()),
            Link::Connecting(d) => Err(format!(
                "not ready: connecting to Redis for {:.1} s",
                d.as_secs_f64()
            )),
            Link::Reconnecting(d) => Err(format!(
                "not ready: Redis unreachable (or no worker subscribed) for {:.1} s",
                d.as_secs_f64()
            )),
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Connected => f.write_str("redis=connected"),
            Link::Connecting(d) => write!(f, "redis=connecting down_s={:.1}", d.as_secs_f64()),
            Link::Reconnecting(d) => {
                write!(f, "redis=reconnecting down_s={:.1}", d.as_secs_f64())
            }
        }
    }
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub received: u64,
    pub written: u64,
    pub duplicates_skipped: u64,
    pub taken_over: u64,
    pub pending: u64,
    pub expired: u64,
    pub dead_lettered: u64,
    pub overflow: u64,
    pub reconnects: u64,
    pub gaps: u64,
    pub gap_ms: u64,
    pub redis_errors: u64,
    pub reused_ids: u64,
    pub refused: u64,
    pub bad_marks: u64,
}

impl Snapshot {
    /// Messages received and not yet settled (written, skipped,
    /// dead-lettered, expired, dropped on overflow or refused).
    pub fn unsettled(&self) -> u64 {
        self.received.saturating_sub(
            self.written
                + self.duplicates_skipped
                + self.dead_lettered
                + self.expired
                + self.overflow
                + self.refused,
        )
    }
}

/// One monitoring line.
#[derive(Debug, Clone, Copy)]
pub struct MonitorLine {
    /// Live workers, all processes and hosts (from presence keys); `None`
    /// when Redis could not be asked.
    pub consumers: Option<u64>,
    pub counters: Snapshot,
    /// Messages written per second over the last interval.
    pub rate: f64,
    pub link: Link,
}

impl fmt::Display for MonitorLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counters;
        write!(f, "monitor consumers=")?;
        match self.consumers {
            Some(n) => write!(f, "{n}")?,
            None => write!(f, "?")?,
        }
        write!(
            f,
            " received={} written={} duplicates_skipped={} taken_over={} pending={} expired={} dead={} overflow={} rate={:.0}/s reconnects={} gaps={} gap_ms={} errors={} reused_ids={} refused={} {}",
            c.received,
            c.written,
            c.duplicates_skipped,
            c.taken_over,
            c.pending,
            c.expired,
            c.dead_lettered,
            c.overflow,
            self.rate,
            c.reconnects,
            c.gaps,
            c.gap_ms,
            c.redis_errors,
            c.reused_ids,
            c.refused,
            self.link
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_line_has_the_text_line_s_kind_and_values() {
        let json =
            as_json("monitor consumers=? received=30 rate=3333/s down_s=1.5 redis=reconnecting");
        assert_eq!(
            json,
            serde_json::json!({
                "kind": "monitor",
                "consumers": null,
                "received": 30,
                "rate": 3333,
                "down_s": 1.5,
                "redis": "reconnecting",
            })
        );
        assert_eq!(
            as_json("publish done run=ab12 published=7")["kind"],
            "publish done"
        );
        assert_eq!(as_json("publish done run=ab12 published=7")["run"], "ab12");
    }

    #[test]
    fn line_is_stable_and_greppable() {
        let line = MonitorLine {
            consumers: Some(3),
            counters: Snapshot {
                received: 30000,
                written: 10000,
                duplicates_skipped: 20000,
                ..Snapshot::default()
            },
            rate: 3333.3,
            link: Link::Connected,
        };
        assert_eq!(
            line.to_string(),
            "monitor consumers=3 received=30000 written=10000 duplicates_skipped=20000 taken_over=0 pending=0 expired=0 dead=0 overflow=0 rate=3333/s reconnects=0 gaps=0 gap_ms=0 errors=0 reused_ids=0 refused=0 redis=connected"
        );
        let down = MonitorLine {
            consumers: None,
            link: Link::Reconnecting(Duration::from_millis(12_340)),
            ..line
        };
        assert!(
            down.to_string().ends_with("redis=reconnecting down_s=12.3"),
            "{down}"
        );
    }
}
