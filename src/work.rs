//! `optimus work`: downstream workers that read the output stream through a
//! consumer group, at their own pace, and run a handler for every entry.
//!
//! - **Read**: XREADGROUP in batches (new entries, `>`).
//! - **Handle**: a command that gets the entry's `payload` on stdin (exit 0 =
//!   success), or, in the library, a Rust closure.
//! - **Acknowledge**: XACK on success only. A failed entry stays pending and
//!   is delivered again once it has been idle for WORK_CLAIM_IDLE.
//! - **Claim**: entries idle longer than WORK_CLAIM_IDLE (their consumer died,
//!   hung, or failed them) are claimed with XCLAIM; each claim is logged as a
//!   warning with the entry id, the previous owner and the delivery count, and
//!   counted.
//! - **Dead letters**: an entry delivered WORK_MAX_DELIVERIES times without
//!   success goes to the dead-letter stream, with its reason, and is
//!   acknowledged there and then (one atomic step).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::streams::{StreamClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use redis::{RedisError, Value};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::connect::{Backoff, Conn, connection, is_fatal};
use crate::presence::Presence;

/// What handles an entry: `Ok` acknowledges it, `Err` leaves it pending.
#[derive(Clone)]
pub enum Handler {
    /// A program and its arguments; the payload goes to its stdin, the entry
    /// id to OPTIMUS_ENTRY_ID, the delivery count to OPTIMUS_DELIVERIES.
    Command(Vec<String>),
    /// A closure (library use).
    Closure(Arc<HandlerFn>),
}

/// A handler closure: `Ok` acknowledges the entry, `Err(why)` leaves it pending.
pub type HandlerFn = dyn Fn(&Entry) -> Result<(), String> + Send + Sync;

/// One stream entry, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    /// The `payload` field, or (for entries without one) all fields as a
    /// JSON object.
    pub payload: Vec<u8>,
    pub fields: HashMap<String, Vec<u8>>,
    /// How many times the entry has been delivered, this time included.
    pub deliveries: u64,
}

/// The validated settings of `optimus work`.
#[derive(Clone)]
pub struct WorkConfig {
    pub endpoint: crate::connect::Endpoint,
    pub stream: String,
    pub group: String,
    pub consumers: usize,
    pub batch_size: usize,
    pub claim_idle: Duration,
    pub max_deliveries: u64,
    pub dead_stream: String,
    pub consumers_list: String,
    pub presence_ttl: Duration,
    pub monitoring_interval: Duration,
    pub print_monitor: bool,
    pub handler: Handler,
    /// A handler command still running after this is killed, and the entry
    /// counted as failed (WORK_HANDLER_TIMEOUT).
    pub handler_timeout: Duration,
    /// How long a graceful stop may take (SHUTDOWN_TIMEOUT).
    pub shutdown_timeout: Duration,
}

/// Why the workers stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    /// Redis refused us in a way retrying cannot mend.
    #[error("{}", crate::connect::explain(.0))]
    Refused(#[from] RedisError),
    /// A graceful stop took longer than SHUTDOWN_TIMEOUT; the handlers still
    /// running were killed and their entries stay pending.
    #[error(
        "SHUTDOWN_TIMEOUT ({}s) passed with {in_hand} handler(s) still running: they were killed, and their entries stay pending for another worker",
        .timeout.as_secs_f64()
    )]
    ShutdownTimedOut { timeout: Duration, in_hand: usize },
    /// The consumer group went away while Redis kept its data: somebody
    /// deleted it. (Had Redis lost its data, the group is made again.)
    #[error(
        "consumer group {group} of stream {stream} was deleted while the workers ran: stopping (optimus groups create {stream} {group} makes it again)"
    )]
    GroupDeleted { stream: String, group: String },
}

/// The counters of a pool of downstream workers.
#[derive(Debug)]
pub struct WorkCounters {
    pub handled: AtomicU64,
    pub failed: AtomicU64,
    pub claimed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub redis_errors: AtomicU64,
    /// Whether Redis answers the workers (and the monitor) now.
    pub link: crate::monitor::LinkState,
    /// Seconds each handler run took.
    pub handle_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for WorkCounters {
    fn default() -> Self {
        Self {
            handled: AtomicU64::default(),
            failed: AtomicU64::default(),
            claimed: AtomicU64::default(),
            dead_lettered: AtomicU64::default(),
            redis_errors: AtomicU64::default(),
            link: crate::monitor::LinkState::default(),
            // 1 ms to about 30 s.
            handle_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
        }
    }
}

impl WorkCounters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// `work consumers= handled= failed= claimed= dead= errors= redis=…`
    /// (`redis=connected`, or `redis=reconnecting down_s=…`, or
    /// `redis=connecting down_s=…` before the first connection).
    pub fn line(&self, consumers: Option<u64>) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "work consumers={} handled={} failed={} claimed={} dead={} errors={} {}",
            consumers.map_or("?".into(), |n| n.to_string()),
            get(&self.handled),
            get(&self.failed),
            get(&self.claimed),
            get(&self.dead_lettered),
            get(&self.redis_errors),
            self.link.state()
        )
    }
}

/// Runs the workers until `shutdown`, then lets each finish the entry in hand
/// (for at most SHUTDOWN_TIMEOUT). Creates the group (from the start of the
/// stream) if it does not exist.
pub async fn run(
    config: WorkConfig,
    counters: Arc<WorkCounters>,
    shutdown: CancellationToken,
) -> Result<(), WorkError> {
    let timeout = config.shutdown_timeout;
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(timeout).await;
    };
    tokio::select! {
        done = run_until_stopped(config, counters, shutdown.clone()) => done,
        () = deadline => {
            let in_hand = kill_handlers();
            Err(WorkError::ShutdownTimedOut { timeout, in_hand })
        }
    }
}

async fn run_until_stopped(
    config: WorkConfig,
    counters: Arc<WorkCounters>,
    shutdown: CancellationToken,
) -> Result<(), WorkError> {
    // The monitoring line goes on while Redis cannot be reached yet.
    let connected = CancellationToken::new();
    let line = counters.clone();
    let connecting = tokio::spawn(crate::monitor::while_connecting(
        config.monitoring_interval,
        config.print_monitor,
        move || line.line(None),
        connected.clone(),
    ));
    let conn = connection(&config.endpoint, &shutdown).await;
    connected.cancel();
    let _ = connecting.await;
    let Some(mut conn) = conn? else {
        return Ok(());
    };
    let process = crate::keys::Process::new();
    let ids: Vec<String> = (0..config.consumers)
        .map(|i| process.worker_id(i))
        .collect();
    let presence = Presence::new(
        &config.consumers_list,
        config.presence_ttl,
        process.describe(),
    )
    .on_cluster(config.endpoint.is_cluster());
    // The group (and the stream) and the presence keys: a server that
    // refuses writes for now (loading, out of memory, too few replicas) or a
    // connection lost is waited out; a refusal of us ends the workers.
    let started = crate::connect::retry_until(
        &shutdown,
        || {
            let mut conn = conn.clone();
            let (config, presence, ids) = (&config, &presence, &ids);
            async move {
                make_group(&mut conn, config, &ids[0], false).await?;
                presence.refresh(&mut conn, ids).await
            }
        },
        |err, wait| {
            tracing::warn!(cause = %crate::connect::brief(err), retry_in_ms = wait.as_millis() as u64, "cannot start the workers yet; retrying")
        },
    )
    .await?;
    if started.is_none() {
        // Stopped first: whatever was registered goes.
        let _ =
            tokio::time::timeout(Duration::from_secs(2), presence.remove(&mut conn, &ids)).await;
        return Ok(());
    }
    counters.link.set(true);
    tracing::info!(stream = %config.stream, group = %config.group, workers = config.consumers, "work starting");
    crate::connect::warn_if_evicting(&mut conn, "the stream and its consumer group").await;

    // Each worker, and the monitor, on a connection of its own: a blocking
    // XREADGROUP holds up every later command on its connection.
    let mut tasks = tokio::task::JoinSet::new();
    for id in &ids {
        let Some(own) = connection(&config.endpoint, &shutdown).await? else {
            break;
        };
        let worker = Worker {
            config: config.clone(),
            consumer: id.clone(),
            conn: own,
            counters: counters.clone(),
        };
        tasks.spawn(worker.run(shutdown.clone()));
    }
    let monitor_conn = connection(&config.endpoint, &shutdown)
        .await?
        .unwrap_or_else(|| conn.clone());
    let stop_aux = CancellationToken::new();
    let aux = tokio::spawn(housekeeping(
        presence.clone(),
        monitor_conn,
        ids.clone(),
        counters.clone(),
        config.monitoring_interval,
        config.print_monitor,
        stop_aux.clone(),
    ));
    let mut fatal = None;
    while let Some(joined) = tasks.join_next().await {
        if let Err(err) = joined.expect("a work task panicked") {
            fatal.get_or_insert(err);
            shutdown.cancel();
        }
    }
    stop_aux.cancel();
    let _ = aux.await;
    let _ = presence.remove(&mut conn, &ids).await;
    if config.print_monitor {
        crate::monitor::print_line(counters.line(presence.count(&mut conn).await.ok()));
    }
    match fatal {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

async fn housekeeping(
    presence: Presence,
    mut conn: Conn,
    ids: Vec<String>,
    counters: Arc<WorkCounters>,
    interval: Duration,
    print: bool,
    cancel: CancellationToken,
) {
    let mut refresh = tokio::time::interval(presence.refresh_every());
    let mut monitor = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut last = (counters.handled.load(Ordering::Relaxed), Instant::now());
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = refresh.tick() => {
                let refresh = presence.refresh(&mut conn, &ids);
                if let Ok(Err(err)) = tokio::time::timeout(Duration::from_secs(2), refresh).await {
                    tracing::warn!(cause = %crate::connect::brief(&err), "could not refresh presence keys");
                }
            }
            _ = monitor.tick() => {
                // The line goes out on time whether Redis answers or not.
                let budget = (interval / 2).clamp(Duration::from_millis(50), Duration::from_secs(2));
                let handled = counters.handled.load(Ordering::Relaxed);
                let rate = (handled - last.0) as f64 / last.1.elapsed().as_secs_f64().max(1e-9);
                last = (handled, Instant::now());
                let consumers = tokio::time::timeout(budget, presence.count(&mut conn))
                    .await
                    .ok()
                    .and_then(Result::ok);
                // Redis answering the monitor in time is the link (a hung
                // server answers no worker either).
                counters.link.set(consumers.is_some());
                let line = counters.line(consumers);
                if consumers.is_some() {
                    let report = crate::control::report_rate(&mut conn, presence.value(), rate, &line, interval);
                    let _ = tokio::time::timeout(budget, report).await;
                }
                if print {
                    crate::monitor::print_line(&line);
                }
            }
        }
    }
}

struct Worker {
    config: WorkConfig,
    consumer: String,
    conn: Conn,
    counters: Arc<WorkCounters>,
}

impl Worker {
    async fn run(mut self, shutdown: CancellationToken) -> Result<(), WorkError> {
        let mut backoff = Backoff::new();
        let mut last_claim = Instant::now() - self.config.claim_idle;
        while !shutdown.is_cancelled() {
            let step = async {
                if last_claim.elapsed() >= self.config.claim_idle / 2 {
                    last_claim = Instant::now();
                    self.claim_idle(&shutdown).await?;
                }
                self.read_new(&shutdown).await
            };
            let result = step.await;
            self.counters.link.set(result.is_ok());
            match result {
                Ok(()) => backoff.reset(),
                Err(err) if is_fatal(&err) => return Err(err.into()),
                Err(err) if err.code() == Some("NOGROUP") => {
                    match make_group(&mut self.conn, &self.config, &self.consumer, true).await {
                        Ok(true) => {
                            tracing::warn!(stream = %self.config.stream, group = %self.config.group, "the consumer group was gone with the stream (Redis lost its data): made it again");
                        }
                        Ok(false) => {
                            return Err(WorkError::GroupDeleted {
                                stream: self.config.stream.clone(),
                                group: self.config.group.clone(),
                            });
                        }
                        Err(err) if is_fatal(&err) => return Err(err.into()),
                        Err(_) => {}
                    }
                }
                Err(err) => {
                    WorkCounters::add(&self.counters.redis_errors, 1);
                    if err.is_connection_refusal() || err.is_connection_dropped() {
                        crate::connect::count_connect_failure();
                    }
                    let consumer = &self.consumer;
                    let retried = backoff.after(err, Some(&shutdown), |err, wait| {
                        tracing::warn!(consumer = %consumer, cause = %crate::connect::brief(err), retry_in_ms = wait.as_millis() as u64, "Redis command failed; retrying");
                    });
                    if let Err(err) = retried.await
                        && !shutdown.is_cancelled()
                    {
                        return Err(err.into());
                    }
                }
            }
        }
        Ok(())
    }

    /// New entries for this consumer, handled one by one.
    async fn read_new(&mut self, shutdown: &CancellationToken) -> Result<(), RedisError> {
        let block_ms = (self.config.claim_idle.as_millis() as u64 / 2).clamp(10, 1000);
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.config.batch_size)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.config.stream)
            .arg(">");
        let reply: Option<StreamReadReply> = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            reply = read.query_async(&mut self.conn) => reply?,
        };
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                // Once stopping, only the entry in hand is finished: the rest
                // stay pending, for another worker to claim.
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                // A fresh delivery: this is its first.
                self.handle(entry, 1).await?;
            }
        }
        Ok(())
    }

    /// Entries idle longer than WORK_CLAIM_IDLE: dead-lettered when they have
    /// had their deliveries, claimed and handled otherwise.
    async fn claim_idle(&mut self, shutdown: &CancellationToken) -> Result<(), RedisError> {
        let idle_ms = self.config.claim_idle.as_millis() as u64;
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg("IDLE")
            .arg(idle_ms)
            .arg("-")
            .arg("+")
            .arg(self.config.batch_size)
            .query_async(&mut self.conn)
            .await?;
        for p in pending.ids {
            if shutdown.is_cancelled() {
                break;
            }
            let deliveries = p.times_delivered as u64;
            if deliveries >= self.config.max_deliveries {
                self.dead_letter(&p.id, &p.consumer, deliveries).await?;
                continue;
            }
            let claimed: StreamClaimReply = redis::cmd("XCLAIM")
                .arg(&self.config.stream)
                .arg(&self.config.group)
                .arg(&self.consumer)
                .arg(idle_ms)
                .arg(&p.id)
                .query_async(&mut self.conn)
                .await?;
            // Empty when another worker claimed it first (or it was deleted).
            for entry in claimed.ids {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                WorkCounters::add(&self.counters.claimed, 1);
                tracing::warn!(
                    consumer = %self.consumer,
                    entry = %entry.id,
                    previous_owner = %p.consumer,
                    deliveries = deliveries + 1,
                    idle_ms = p.last_delivered_ms,
                    "claimed an idle entry"
                );
                self.handle(entry, deliveries + 1).await?;
            }
        }
        Ok(())
    }

    /// Moves an entry to the dead-letter stream and acknowledges it, in one
    /// step, unless another worker did so first.
    async fn dead_letter(
        &mut self,
        id: &str,
        owner: &str,
        deliveries: u64,
    ) -> Result<(), RedisError> {
        // Claim it first, so that exactly one worker moves it.
        let claimed: StreamClaimReply = redis::cmd("XCLAIM")
            .arg(&self.config.stream)
            .arg(&self.config.group)
            .arg(&self.consumer)
            .arg(self.config.claim_idle.as_millis() as u64)
            .arg(id)
            .query_async(&mut self.conn)
            .await?;
        let Some(entry) = claimed.ids.into_iter().next() else {
            return Ok(());
        };
        let reason = format!(
            "not handled after {deliveries} deliveries (WORK_MAX_DELIVERIES={})",
            self.config.max_deliveries
        );
        let payload = payload_of(&entry);
        // One script, so one step (on a cluster both streams share a slot).
        redis::cmd("EVAL")
            .arg(crate::scripts::DEAD_LETTER)
            .arg(2)
            .arg(&self.config.dead_stream)
            .arg(&self.config.stream)
            .arg(&entry.id)
            .arg(&self.config.group)
            .arg(&reason)
            .arg(payload)
            .query_async::<()>(&mut self.conn)
            .await?;
        WorkCounters::add(&self.counters.dead_lettered, 1);
        tracing::warn!(consumer = %self.consumer, entry = %entry.id, previous_owner = %owner, deliveries, dead_stream = %self.config.dead_stream, "entry dead-lettered");
        Ok(())
    }

    /// Runs the handler; acknowledges on success.
    async fn handle(&mut self, entry: StreamId, deliveries: u64) -> Result<(), RedisError> {
        let payload = payload_of(&entry);
        let fields = entry
            .map
            .iter()
            .filter_map(|(k, v)| bytes(v).map(|b| (k.clone(), b)))
            .collect();
        let entry = Entry {
            id: entry.id,
            payload,
            fields,
            deliveries,
        };
        let started = Instant::now();
        let outcome = match &self.config.handler {
            Handler::Closure(f) => f(&entry),
            Handler::Command(argv) => run_command(argv, &entry, self.config.handler_timeout).await,
        };
        self.counters
            .handle_seconds
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                redis::cmd("XACK")
                    .arg(&self.config.stream)
                    .arg(&self.config.group)
                    .arg(&entry.id)
                    .query_async::<()>(&mut self.conn)
                    .await?;
                WorkCounters::add(&self.counters.handled, 1);
            }
            Err(why) => {
                WorkCounters::add(&self.counters.failed, 1);
                tracing::warn!(consumer = %self.consumer, entry = %entry.id, deliveries, cause = %why, "handler failed; the entry stays pending and will be retried");
            }
        }
        Ok(())
    }
}

/// Makes `config`'s group (see `scripts/make_group.lua`); `again` when it was found
/// missing. Whether the group is there now.
async fn make_group(
    conn: &mut Conn,
    config: &WorkConfig,
    consumer: &str,
    again: bool,
) -> Result<bool, RedisError> {
    let made: i64 = redis::cmd("EVAL")
        .arg(crate::scripts::MAKE_GROUP)
        .arg(2)
        .arg(&config.stream)
        .arg(crate::keys::group_marker(
            &config.stream,
            &config.group,
            config.endpoint.is_cluster(),
        ))
        .arg(&config.group)
        .arg(consumer)
        .arg(if again { "again" } else { "start" })
        .query_async(conn)
        .await?;
    Ok(made == 1)
}

fn bytes(value: &Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

/// The `payload` field, or all fields as a JSON object.
fn payload_of(entry: &StreamId) -> Vec<u8> {
    if let Some(payload) = entry.map.get("payload").and_then(bytes) {
        return payload;
    }
    let object: serde_json::Map<String, serde_json::Value> = entry
        .map
        .iter()
        .filter_map(|(k, v)| {
            bytes(v).map(|b| {
                (
                    k.clone(),
                    serde_json::Value::String(String::from_utf8_lossy(&b).into_owned()),
                )
            })
        })
        .collect();
    serde_json::Value::Object(object).to_string().into_bytes()
}

/// The process groups of the handler commands running now, so that a forced
/// exit (a second signal, SHUTDOWN_TIMEOUT) can kill them, and whatever they
/// started, instead of leaving them orphaned.
static RUNNING: std::sync::Mutex<std::collections::BTreeSet<i32>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Kills every handler command still running (SIGKILL to its process
/// group); returns how many there were.
pub fn kill_handlers() -> usize {
    let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    for group in running.iter() {
        kill_group(*group);
    }
    running.len()
}

fn kill_group(group: i32) {
    // SAFETY: kill(2) with a negative pid signals a process group; it
    // touches no memory of ours.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
}

/// A handler's process group while it runs: listed in [`RUNNING`], and
/// killed if it is dropped before the handler ended (a timeout, an aborted
/// task).
struct RunningHandler {
    group: i32,
    ended: bool,
}

impl RunningHandler {
    fn register(group: i32) -> Self {
        RUNNING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(group);
        Self {
            group,
            ended: false,
        }
    }
}

impl Drop for RunningHandler {
    fn drop(&mut self) {
        if !self.ended {
            kill_group(self.group);
        }
        RUNNING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.group);
    }
}

/// Runs the handler command with the payload on stdin, in a process group
/// of its own; its stdout goes to optimus's stderr (optimus's stdout carries
/// only monitoring lines). Past `timeout` it is killed, with everything it
/// started, and the entry counts as failed. Should optimus itself die
/// (SIGKILL, a crash), the kernel kills the handler process too (Linux's
/// parent-death signal); processes the handler started are its own to end.
async fn run_command(argv: &[String], entry: &Entry, timeout: Duration) -> Result<(), String> {
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env("OPTIMUS_ENTRY_ID", &entry.id)
        .env("OPTIMUS_DELIVERIES", entry.deliveries.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::io::stderr())
        .process_group(0)
        .kill_on_drop(true);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure calls only prctl and
    // getppid, both async-signal-safe, and allocates nothing. (The death
    // signal follows the spawning thread: handlers are spawned from the
    // runtime's worker threads, which live as long as the process.)
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // optimus died before the signal was set: nobody would send it.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    let mut running = child.id().map(|pid| RunningHandler::register(pid as i32));
    let stdin = child.stdin.take();
    let finished = tokio::time::timeout(timeout, async {
        if let Some(mut stdin) = stdin {
            // A handler that does not read its input is its own business.
            let _ = stdin.write_all(&entry.payload).await;
        }
        child.wait().await
    })
    .await;
    let status = match finished {
        Ok(status) => {
            if let Some(running) = running.as_mut() {
                running.ended = true;
            }
            status.map_err(|e| e.to_string())?
        }
        // Dropping `running` kills the group.
        Err(_) => {
            return Err(format!(
                "{} did not finish within WORK_HANDLER_TIMEOUT ({}s): killed",
                argv[0],
                timeout.as_secs_f64()
            ));
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} exited with {status}", argv[0]))
    }
}
