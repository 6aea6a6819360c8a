//! The bridge: a pool of workers that turns Pub/Sub channels into streams.
//!
//! On one server a process runs at most two subscriptions, its
//! [`delivery::reader`]s (one per worker, up to two), whatever the number of
//! its workers; the [`delivery::intake`] merges them, and the strategy's
//! loop writes: [`delivery::fenced`] (the default: one writer per stream)
//! or [`delivery::race`] (every worker races for every message). On a
//! cluster each worker has a subscription of its own
//! ([`delivery::cluster`]) and races. Beside them, one task keeps the
//! workers' [`presence`] keys alive, one prints the monitoring line, one
//! follows `ctl scale`.
//!
//! Shutdown is by cancellation: the token stops the subscriptions; the
//! strategy's loop then finishes what was received and exits; then the
//! presence keys are deleted and [`Bridge::run`] returns.

pub mod config;
pub mod delivery;
pub mod route;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::RedisError;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::connect::{Conn, connection};
use crate::monitor::{Counters, MonitorLine, Snapshot};
use crate::presence::Presence;
use crate::settings::ConfigError;
use config::BridgeConfig;
use delivery::Strategy;
use delivery::budget::Budget;
use delivery::cluster::Subscription;
use delivery::fenced::{Fenced, FencedConfig};
use delivery::ids::Identify;
use delivery::intake::Intake;
use delivery::members::{Beat, is_mixed};
use delivery::race::{RaceWorker, Racer};
use delivery::reader::{Coverage, Reader, ReaderBatch};
use delivery::{Message, Pool};

/// Why a bridge stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Redis refused us in a way retrying cannot mend (credentials, permissions).
    #[error("Redis at {server} refused the bridge: {}", crate::connect::explain(.source))]
    Refused { server: String, source: RedisError },
    /// The pool runs another strategy (see [`delivery::members`]): this
    /// process writes nothing.
    #[error("{0}")]
    MixedStrategies(String),
    /// A graceful stop took longer than SHUTDOWN_TIMEOUT.
    #[error(
        "SHUTDOWN_TIMEOUT ({}s) passed: stopped with {unsettled} received messages unsettled (other workers hold copies of them, unless they stopped too)",
        .timeout.as_secs_f64()
    )]
    ShutdownTimedOut { timeout: Duration, unsettled: u64 },
}

/// A configured bridge, ready to [`run`](Bridge::run).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use optimus::{Bridge, BridgeConfig};
/// use tokio_util::sync::CancellationToken;
///
/// let config = BridgeConfig::new("redis://127.0.0.1:6379").consumers(3);
/// let bridge = Bridge::new(config)?;
/// let shutdown = CancellationToken::new();
/// let totals = bridge.run(shutdown.clone()).await?; // until shutdown.cancel()
/// println!("written: {}", totals.written);
/// # Ok(()) }
/// ```
pub struct Bridge {
    config: BridgeConfig,
    counters: Arc<Counters>,
}

impl Bridge {
    /// Checks the configuration.
    pub fn new(config: BridgeConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            counters: Arc::default(),
        })
    }

    /// The live counters, for a service that embeds the bridge.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Runs the workers until `shutdown` is cancelled, then stops them
    /// gracefully and returns the final counters. While Redis is unreachable
    /// it waits and retries; it returns an error when Redis refuses the
    /// credentials or permissions, or when the graceful stop takes longer
    /// than SHUTDOWN_TIMEOUT (then whatever is still running is dropped).
    pub async fn run(self, shutdown: CancellationToken) -> Result<Snapshot, BridgeError> {
        let timeout = self.config.shutdown_timeout;
        let counters = self.counters.clone();
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(timeout).await;
        };
        tokio::select! {
            done = self.run_until_stopped(shutdown.clone()) => done,
            () = deadline => Err(BridgeError::ShutdownTimedOut {
                timeout,
                unsettled: counters.snapshot().unsettled(),
            }),
        }
    }

    async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<Snapshot, BridgeError> {
        let config = &self.config;
        let server = config.endpoint.to_string();
        let refused = |source: RedisError| match is_mixed(&source) {
            Some(line) => BridgeError::MixedStrategies(line),
            None => BridgeError::Refused {
                server: server.clone(),
                source,
            },
        };
        // The monitoring line goes on while Redis cannot be reached yet.
        let connected = CancellationToken::new();
        let counters = self.counters.clone();
        let connecting = tokio::spawn(crate::monitor::while_connecting(
            config.monitoring_interval,
            config.print_monitor,
            move || {
                MonitorLine {
                    consumers: None,
                    counters: counters.snapshot(),
                    rate: 0.0,
                    link: counters.link(),
                }
                .to_string()
            },
            connected.clone(),
        ));
        let conn = connection(&config.endpoint, &shutdown).await;
        connected.cancel();
        let _ = connecting.await;
        let Some(mut conn) = conn.map_err(refused)? else {
            return Ok(self.counters.snapshot());
        };
        let routes = config.effective_routes();
        let routes_shown = routes
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(",");
        tracing::info!(server = %server, routes = %routes_shown, workers = config.consumers, "bridge starting");
        crate::connect::warn_if_evicting(
            &mut conn,
            "the stream and the delivery protocol's keys (writer records, members, clock; with STRATEGY=race, ACK keys and locks)",
        )
        .await;

        let process = ProcessIdentity::new();
        // How many workers to run: CONSUMERS_COUNT, or this process's share
        // of the total set with `optimus ctl scale`.
        let scale =
            crate::control::Scale::new(process.name(), process.describe(), config.consumers);
        let presence = Presence::new(
            &config.consumers_list,
            config.presence_ttl,
            process.describe(),
        )
        .on_cluster(config.endpoint.is_cluster());
        // Registering writes: a server that refuses writes for now (too few
        // replicas, out of memory, loading) or a connection lost is waited
        // out; a refusal of us ends the bridge.
        // How many presence keys an attempt may have left behind.
        let registering = std::sync::atomic::AtomicUsize::new(0);
        let registered = crate::connect::retry_until(
            &shutdown,
            || {
                let mut conn = conn.clone();
                let (scale, presence, process) = (&scale, &presence, &process);
                let registering = &registering;
                async move {
                    let first = scale.target(&mut conn).await?;
                    registering.fetch_max(first, std::sync::atomic::Ordering::Relaxed);
                    let ids: Vec<String> = (0..first).map(|i| process.worker_id(i)).collect();
                    presence.refresh(&mut conn, &ids).await?;
                    Ok((first, ids))
                }
            },
            |err, wait| {
                tracing::warn!(cause = %crate::connect::brief(err), retry_in_ms = wait.as_millis() as u64, "cannot register this process yet; retrying")
            },
        )
        .await;
        let (first, worker_ids) = match registered {
            Ok(Some(done)) => done,
            Ok(None) => {
                // Stopped while registering (the kill switch, a signal): an
                // attempt cut short may have registered the process, so
                // `ctl status` would show it for a while. Take it back.
                let ids: Vec<String> = (0..registering.into_inner())
                    .map(|i| process.worker_id(i))
                    .collect();
                let unregister = async {
                    let _ = scale.leave(&mut conn).await;
                    let _ = presence.remove(&mut conn, &ids).await;
                };
                let _ = tokio::time::timeout(UNREGISTER_WITHIN, unregister).await;
                tracing::info!("bridge stopped before it started");
                return Ok(self.counters.snapshot());
            }
            Err(err) => return Err(refused(err)),
        };
        self.counters.set_link(true);

        // Stops the subscriptions; the workers follow once their queues drain.
        let stop_reading = shutdown.child_token();
        // Stops presence, monitoring and scaling, after the workers are done.
        let stop_aux = CancellationToken::new();
        let mut tasks: JoinSet<Result<(), RedisError>> = JoinSet::new();
        let db = config
            .endpoint
            .info()
            .map_or(0, |info| info.redis_settings().db());
        let pool = Pool::in_db(&config.output_stream, db);
        let router = Arc::new(route::Router::new(
            routes,
            route::LanePlan {
                dead_letter_stream: config.dead_letter_stream.clone(),
                cluster: config.endpoint.is_cluster(),
                format: config.output_format,
                id_field: config.message_id_field.clone(),
                db,
                handoff: (!config.endpoint.is_cluster()).then(|| pool.handoff.clone()),
            },
        ));
        let budget = Budget::new(config.memory_limit);
        let mut spawner = Spawner {
            router,
            routes_shown,
            config: config.clone(),
            counters: self.counters.clone(),
            coverage: Arc::new(match config.endpoint.is_cluster() {
                true => Coverage::default(),
                false => Coverage::counted_by_intake(),
            }),
            budget: budget.clone(),
            pool,
            batches: None,
            readers: Vec::new(),
            racers: Arc::default(),
        };
        if !config.endpoint.is_cluster() {
            spawner
                .start_engine(&process, &mut tasks, &shutdown)
                .await
                .map_err(refused)?;
        }

        let (target_tx, mut target_rx) = tokio::sync::watch::channel(first);
        let scaler = tokio::spawn(
            scale
                .clone()
                .watch(conn.clone(), target_tx, stop_aux.clone()),
        );

        let live = Arc::new(Mutex::new(Vec::new()));
        let aux = tokio::spawn(keep_present(
            presence.clone(),
            conn.clone(),
            live.clone(),
            stop_aux.clone(),
        ));
        let monitor = tokio::spawn(monitor(
            presence.clone(),
            conn.clone(),
            self.counters.clone(),
            Watched {
                workers: live.clone(),
                coverage: spawner.coverage.clone(),
            },
            config.monitoring_interval,
            config.print_monitor,
            stop_aux.clone(),
        ));

        // The workers running, newest last, each with its own stop.
        let mut running: Vec<(String, CancellationToken)> = Vec::new();
        let mut ever: Vec<String> = Vec::new();
        let mut next_index = 0;
        let mut scaler_alive = true;
        let mut fatal = None;
        let mut fatal_deadline: Option<Instant> = None;
        loop {
            if !stop_reading.is_cancelled() {
                let target = *target_rx.borrow_and_update();
                while running.len() < target {
                    let id = process.worker_id(next_index);
                    next_index += 1;
                    let stop = stop_reading.child_token();
                    if !spawner
                        .spawn(&id, stop.clone(), &mut tasks, &shutdown)
                        .await
                        .map_err(refused)?
                    {
                        break;
                    }
                    if next_index > first {
                        tracing::info!(worker = %id, workers = running.len() + 1, "worker started (ctl scale)");
                    }
                    live.lock().unwrap().push(id.clone());
                    ever.push(id.clone());
                    running.push((id, stop));
                }
                while running.len() > target {
                    let (id, stop) = running.pop().expect("more running than the target");
                    stop.cancel();
                    spawner.stopped(&id);
                    live.lock().unwrap().retain(|w| *w != id);
                    let _ = presence.remove(&mut conn, std::slice::from_ref(&id)).await;
                    tracing::info!(worker = %id, workers = running.len(), "worker stopping (ctl scale): it settles what it holds first");
                    if running.is_empty() {
                        // No worker of this process listens from now on: a
                        // gap, counted when a worker subscribes again.
                        spawner.coverage.pause();
                        tracing::warn!(
                            "ctl scale leaves this process no worker: messages published now reach no worker here (counted as a gap)"
                        );
                    }
                }
                spawner.readers_for(running.len(), &stop_reading, &mut tasks);
                Counters::set(&self.counters.workers, running.len() as u64);
            } else {
                // Once the readers are done, the strategy's loop sees the end.
                spawner.batches = None;
            }
            if stop_reading.is_cancelled() && tasks.is_empty() {
                break;
            }
            tokio::select! {
                joined = tasks.join_next(), if !tasks.is_empty() => {
                    let Some(joined) = joined else { continue };
                    let result =
                        joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()));
                    if let Err(err) = result {
                        match is_mixed(&err) {
                            Some(line) => tracing::error!(cause = %line, "this process may not write this stream; stopping"),
                            None => tracing::error!(cause = %crate::connect::brief(&err), "Redis refused the bridge; stopping"),
                        }
                        fatal.get_or_insert(err);
                        fatal_deadline
                            .get_or_insert_with(|| Instant::now() + config.shutdown_timeout);
                        stop_reading.cancel();
                    }
                }
                changed = target_rx.changed(), if scaler_alive && !stop_reading.is_cancelled() => {
                    scaler_alive = changed.is_ok();
                }
                _ = stop_reading.cancelled(), if !stop_reading.is_cancelled() => {}
                // Redis refused us: what is left stops as in a graceful
                // stop (the engine writes what it can), within
                // SHUTDOWN_TIMEOUT, then is ended.
                _ = tokio::time::sleep_until(fatal_deadline.unwrap_or_else(Instant::now).into()), if fatal_deadline.is_some() => {
                    tasks.abort_all();
                    while let Some(joined) = tasks.join_next().await {
                        if let Err(err) = joined
                            && err.is_panic()
                        {
                            std::panic::resume_unwind(err.into_panic());
                        }
                    }
                    break;
                }
            }
        }
        stop_aux.cancel();
        let _ = aux.await;
        let _ = monitor.await;
        let _ = scaler.await;
        // Also the keys registered at start for workers a shutdown kept from
        // starting.
        ever.extend(worker_ids);
        ever.sort();
        ever.dedup();
        match tokio::time::timeout(UNREGISTER_WITHIN, presence.remove(&mut conn, &ever)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(cause = %crate::connect::brief(&err), "could not delete the presence keys; they expire by themselves");
            }
            Err(_) => tracing::warn!(
                "Redis did not answer the deletion of the presence keys; they expire by themselves"
            ),
        }
        let totals = self.counters.snapshot();
        if config.print_monitor {
            let budget = monitor_budget(config.monitoring_interval);
            let consumers = tokio::time::timeout(budget, presence.count(&mut conn))
                .await
                .ok()
                .and_then(Result::ok);
            // No worker is wanted any more: Redis answering is the link.
            self.counters.set_link(consumers.is_some());
            crate::monitor::print_line(MonitorLine {
                consumers,
                counters: totals,
                rate: 0.0,
                link: self.counters.link(),
            });
        }
        tracing::info!(
            written = totals.written,
            received = totals.received,
            "bridge stopped"
        );
        match fatal {
            Some(source) => Err(refused(source)),
            None => Ok(totals),
        }
    }
}

/// How often a quiet process gives free memory back to the system.
const RELEASE_EVERY: Duration = Duration::from_secs(10);

/// How long taking a registration back (ctl's, the presence keys) may take
/// when a bridge stops (Redis may be what is slow): they lapse by themselves.
const UNREGISTER_WITHIN: Duration = Duration::from_secs(2);

/// The readers the process runs on one server: at most this many,
/// whatever its number of workers.
const MAX_READERS: usize = 2;

/// The race workers of a single server, by worker id, each with its queue:
/// the dispatcher hands every one of them each message.
type Racers = Arc<Mutex<Vec<(String, mpsc::Sender<Vec<Message>>)>>>;

/// Starts what runs the workers: on one server, the strategy's loop once and
/// the readers (one per worker, at most [`MAX_READERS`]), and for the race
/// strategy a racing loop per worker; on a cluster, a subscription and a
/// racing loop per worker.
struct Spawner {
    router: Arc<route::Router>,
    /// The routes, as logs name them.
    routes_shown: String,
    config: BridgeConfig,
    counters: Arc<Counters>,
    coverage: Arc<Coverage>,
    budget: Arc<Budget>,
    pool: Pool,
    /// Where readers hand their batches (one server; `None` once stopping).
    batches: Option<mpsc::UnboundedSender<ReaderBatch>>,
    /// The readers running, by slot.
    readers: Vec<Option<CancellationToken>>,
    /// Race strategy on one server: each racing worker's queue.
    racers: Racers,
}

impl Spawner {
    /// One server: the strategy's loop, fed by the readers' batches.
    async fn start_engine(
        &mut self,
        process: &ProcessIdentity,
        tasks: &mut JoinSet<Result<(), RedisError>>,
        shutdown: &CancellationToken,
    ) -> Result<(), RedisError> {
        let config = &self.config;
        // Bounded by the memory budget (see `Reader::out`).
        let (tx, rx) = mpsc::unbounded_channel();
        self.batches = Some(tx);
        let routes = xxhash_rust::xxh3::xxh3_64(self.routes_shown.as_bytes());
        let member = process.name();
        // Joins the pool before anything is read: a process whose strategy
        // is not the live members' stops here, having written nothing.
        // (A server loading, read-only for now, or away is waited out.)
        let Some(conn) = connection(&config.endpoint, shutdown).await? else {
            return Ok(());
        };
        let beat = Beat {
            pool: &self.pool,
            member: &member,
            strategy: config.strategy,
            seen: 0,
            since: u64::MAX,
            routes,
        };
        let joined = crate::connect::retry_until(
            shutdown,
            || {
                let mut conn = conn.clone();
                async move {
                    match beat.cycle(&mut conn, &[], false).await {
                        Err(err) if is_mixed(&err).is_some() => Ok(Err(err)),
                        other => other.map(|_| Ok(())),
                    }
                }
            },
            |err, wait| {
                tracing::warn!(cause = %crate::connect::brief(err), retry_in_ms = wait.as_millis() as u64, "cannot join the pool yet; retrying")
            },
        )
        .await?;
        match joined {
            None => return Ok(()),
            Some(Err(mixed)) => return Err(mixed),
            Some(Ok(())) => {}
        }
        let intake = Intake::new(Identify::by_position(
            config.message_id_field.clone(),
            config.max_payload_bytes,
        ));
        match config.strategy {
            Strategy::Fenced => {
                let fenced = Fenced::new(
                    FencedConfig {
                        member,
                        routes,
                        pool: self.pool.clone(),
                        batch_size: config.batch_size,
                        takeover_after: config.takeover_after,
                        dedup_window: config.dedup_window,
                        endpoint: config.endpoint.clone(),
                    },
                    conn,
                    self.counters.clone(),
                    self.budget.clone(),
                    intake,
                );
                tasks.spawn(fenced.run(rx));
            }
            Strategy::Race => {
                tasks.spawn(dispatch(
                    intake,
                    self.counters.clone(),
                    rx,
                    self.racers.clone(),
                    Marks {
                        conn,
                        pool: self.pool.clone(),
                        member,
                        routes,
                    },
                ));
            }
        }
        Ok(())
    }

    /// Runs as many readers as `workers` asks for (one server).
    fn readers_for(
        &mut self,
        workers: usize,
        stop_reading: &CancellationToken,
        tasks: &mut JoinSet<Result<(), RedisError>>,
    ) {
        let Some(batches) = self.batches.clone() else {
            return;
        };
        let wanted = workers.min(MAX_READERS);
        self.readers.resize_with(MAX_READERS, || None);
        for slot in 0..MAX_READERS {
            let running = self.readers[slot]
                .as_ref()
                .is_some_and(|t| !t.is_cancelled());
            if slot < wanted && !running {
                let stop = stop_reading.child_token();
                tasks.spawn(
                    Reader {
                        index: slot,
                        endpoint: self.config.endpoint.clone(),
                        router: self.router.clone(),
                        pool: self.pool.clone(),
                        budget: self.budget.clone(),
                        counters: self.counters.clone(),
                        coverage: self.coverage.clone(),
                        out: batches.clone(),
                        cancel: stop.clone(),
                    }
                    .run(),
                );
                self.readers[slot] = Some(stop);
            } else if slot >= wanted
                && running
                && let Some(stop) = self.readers[slot].take()
            {
                stop.cancel();
            }
        }
    }

    /// Starts worker `id`, which stops with `stop`: on a cluster its
    /// subscription and racing loop; on one server with the race strategy
    /// its racing loop. Returns false when `shutdown` came first.
    async fn spawn(
        &self,
        id: &str,
        stop: CancellationToken,
        tasks: &mut JoinSet<Result<(), RedisError>>,
        shutdown: &CancellationToken,
    ) -> Result<bool, RedisError> {
        let config = &self.config;
        let cluster = config.endpoint.is_cluster();
        if config.strategy == Strategy::Fenced && !cluster {
            return Ok(true);
        }
        let Some(worker_conn) = connection(&config.endpoint, shutdown).await? else {
            return Ok(false);
        };
        let per_worker = config.memory_limit / config.consumers.max(1);
        let (queue_tx, queue_rx) = mpsc::channel(if cluster { 1024 } else { 64 });
        if cluster {
            // An id-less payload's count must outlive any ACK it could
            // collide with.
            let forget_ids_after = config.ack_ttl + config.pending_retention + config.lock_ttl;
            tasks.spawn(
                Subscription {
                    endpoint: config.endpoint.clone(),
                    router: self.router.clone(),
                    channel: self.routes_shown.clone(),
                    lanes: Default::default(),
                    worker_id: id.to_string(),
                    ids: Identify::derived(
                        config.message_id_field.clone(),
                        config.max_payload_bytes,
                        forget_ids_after,
                    ),
                    counters: self.counters.clone(),
                    coverage: self.coverage.clone(),
                    queue: queue_tx,
                    // A message in the queue costs about 1 KiB at most.
                    read_buffer: (per_worker >> 10).max(1024),
                    cancel: stop,
                }
                .run(),
            );
        } else {
            self.racers.lock().unwrap().push((id.to_string(), queue_tx));
        }
        tasks.spawn(
            RaceWorker {
                id: id.to_string(),
                racer: Racer::new(worker_conn, id.to_string(), config.lock_ttl, config.ack_ttl),
                counters: self.counters.clone(),
                batch_size: config.batch_size,
                lock_ttl: config.lock_ttl,
                retention: config.pending_retention,
                warnings: Default::default(),
            }
            .run(queue_rx),
        );
        Ok(true)
    }

    /// Worker `id` is stopping: on one server, its racing loop gets nothing
    /// more (it settles what it holds).
    fn stopped(&self, id: &str) {
        self.racers
            .lock()
            .unwrap()
            .retain(|(worker, _)| worker != id);
    }
}

/// The race strategy on one server: every racing worker gets every message
/// the intake hands on. Ends when the readers are done; the workers' queues
/// close with it.
/// What publishes the race strategy's marks (the fenced loop's cycle does
/// for its own): a message's mark dates it in the server's time, which the
/// race's guard against long stops needs.
/// The race loop's cycle: its beat among the pool's members, and a mark.
struct Marks {
    conn: Conn,
    pool: Pool,
    member: String,
    routes: u64,
}

impl Marks {
    async fn cycle(&mut self, intake: &Intake, leaving: bool) -> Result<(), RedisError> {
        let beat = Beat {
            pool: &self.pool,
            member: &self.member,
            strategy: Strategy::Race,
            seen: intake.seen(),
            since: intake.continuous_since(),
            routes: self.routes,
        };
        match beat.cycle(&mut self.conn, &[], leaving).await {
            Ok(_) => Ok(()),
            Err(err) if crate::connect::is_fatal(&err) || is_mixed(&err).is_some() => Err(err),
            Err(err) => {
                tracing::debug!(cause = %crate::connect::brief(&err), "no mark this time");
                Ok(())
            }
        }
    }
}

async fn dispatch(
    mut intake: Intake,
    counters: Arc<Counters>,
    mut batches: mpsc::UnboundedReceiver<ReaderBatch>,
    racers: Racers,
    mut marks: Marks,
) -> Result<(), RedisError> {
    let mut tick = tokio::time::interval(delivery::fenced::CYCLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let batch = tokio::select! {
            batch = batches.recv() => match batch {
                Some(batch) => batch,
                None => break,
            },
            _ = tick.tick() => {
                marks.cycle(&intake, false).await?;
                continue;
            }
        };
        let messages = intake.take(batch);
        intake.count_holes(&counters);
        if messages.is_empty() {
            continue;
        }
        let queues: Vec<mpsc::Sender<Vec<Message>>> = racers
            .lock()
            .unwrap()
            .iter()
            .map(|(_, q)| q.clone())
            .collect();
        for queue in queues {
            // A worker that stopped meanwhile takes nothing more.
            let _ = queue.send(messages.clone()).await;
        }
    }
    racers.lock().unwrap().clear();
    let _ = marks.cycle(&intake, true).await;
    Ok(())
}

/// Refreshes the presence keys until cancelled.
async fn keep_present(
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
struct Watched {
    workers: Arc<Mutex<Vec<String>>>,
    coverage: Arc<Coverage>,
}

/// How long the monitor waits for Redis at each line: the line is printed on
/// time whether Redis answers or not.
fn monitor_budget(interval: Duration) -> Duration {
    (interval / 2).clamp(Duration::from_millis(50), Duration::from_secs(2))
}

/// Prints the monitoring line every `interval` until cancelled, and keeps
/// the link state ([`Counters::set_link`]): Redis is reachable when it
/// answers the monitor in time and, while workers should be running, at
/// least one of them is subscribed.
async fn monitor(
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
        let wanted = !watched.workers.lock().unwrap().is_empty();
        counters.set_link(answered && (!wanted || watched.coverage.subscribed() > 0));
        let now = Instant::now();
        let snapshot = counters.snapshot();
        let elapsed = now.duration_since(last.0).as_secs_f64();
        let rate = (snapshot.written - last.1) as f64 / elapsed.max(1e-9);
        last = (now, snapshot.written);
        if consumers.is_some() {
            let report = crate::control::report_rate(&mut conn, presence.value(), rate, interval);
            let _ = tokio::time::timeout(budget, report).await;
        }
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
        if print {
            crate::monitor::print_line(line);
        }
        tracing::debug!(%line, "monitor");
    }
}

/// This machine's name, for worker ids and presence values.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Who this process is, for worker ids and presence values.
struct ProcessIdentity {
    host: String,
    pid: u32,
    /// Tells apart two processes with the same host name and pid (containers).
    nonce: u16,
}

impl ProcessIdentity {
    fn new() -> Self {
        Self {
            host: host_name(),
            pid: std::process::id(),
            nonce: rand::random(),
        }
    }

    fn worker_id(&self, index: usize) -> String {
        format!("{}-{}-{:04x}-{index}", self.host, self.pid, self.nonce)
    }

    fn describe(&self) -> String {
        format!("host={} pid={}", self.host, self.pid)
    }

    /// This process, among the processes registered for `ctl scale`.
    fn name(&self) -> String {
        format!("{}-{}-{:04x}", self.host, self.pid, self.nonce)
    }
}
