//! This process's workers: [`Workers`] starts and stops them as `ctl
//! scale`'s target says and supervises their tasks until shutdown;
//! [`Spawner`] starts what runs them (on one server the strategy's loop and
//! the readers, on a cluster a subscription and a racing loop per worker).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::RedisError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::config::BridgeConfig;
use super::delivery::budget::Budget;
use super::delivery::cluster::Subscription;
use super::delivery::fenced::{Fenced, FencedConfig, Seat};
use super::delivery::ids::Identify;
use super::delivery::intake::Intake;
use super::delivery::members::{Beat, Holding, Place, is_mixed};
use super::delivery::race::{RaceWorker, Racer};
use super::delivery::reader::{Coverage, Reader, ReaderBatch};
use super::delivery::{self, Message, Pool, Strategy};
use super::route;
use super::upkeep::Watched;
use crate::connect::{Conn, connection};
use crate::keys::Process;
use crate::monitor::Counters;
use crate::presence::Presence;

/// This process's workers: those running (newest last, each with its own
/// stop), every one that ran, and what starts them.
pub(super) struct Workers {
    spawner: Spawner,
    tasks: JoinSet<Result<(), RedisError>>,
    process: Process,
    presence: Presence,
    conn: Conn,
    running: Vec<(String, CancellationToken)>,
    ever: Vec<String>,
    next_index: usize,
    /// The ids of the workers running, for the presence keys and the monitor.
    live: Arc<Mutex<Vec<String>>>,
}

impl Workers {
    pub(super) fn new(
        spawner: Spawner,
        tasks: JoinSet<Result<(), RedisError>>,
        process: Process,
        presence: Presence,
        conn: Conn,
    ) -> Self {
        Self {
            spawner,
            tasks,
            process,
            presence,
            conn,
            running: Vec::new(),
            ever: Vec::new(),
            next_index: 0,
            live: Arc::default(),
        }
    }

    pub(super) fn live(&self) -> Arc<Mutex<Vec<String>>> {
        self.live.clone()
    }

    /// What the monitor watches: the workers that should be subscribed, and
    /// how many are.
    pub(super) fn watched(&self) -> Watched {
        Watched {
            workers: self.live.clone(),
            coverage: self.spawner.coverage.clone(),
            hold: self.spawner.hold.subscribe(),
        }
    }

    /// Every worker that ran.
    pub(super) fn ever(&self) -> Vec<String> {
        self.ever.clone()
    }

    /// Runs the workers, `first` at once and then as many as `target` says,
    /// until `shutdown` or a refusal by Redis stops the readers and every
    /// task has ended. Returns the refusal that stopped them, if one did
    /// (what was left then stopped as in a graceful stop, within
    /// `shutdown_timeout`, and was then ended); a refusal while starting a
    /// worker is the error.
    pub(super) async fn run(
        &mut self,
        mut target: watch::Receiver<usize>,
        first: usize,
        counters: &Counters,
        shutdown: &CancellationToken,
        shutdown_timeout: Duration,
    ) -> Result<Option<RedisError>, RedisError> {
        // Stops the subscriptions; the workers follow once their queues
        // drain. On a stop a process that holds copies among bounded
        // holders reads on until processes that waited hold them in its
        // stead (or HANDOVER_AT_MOST has passed).
        let stop_reading = CancellationToken::new();
        let handover = self.spawner.holders() > 0;
        let mut handed = self.spawner.handed.subscribe();
        let mut handover_until: Option<Instant> = None;
        let mut scaler_alive = true;
        let mut hold = self.spawner.hold.subscribe();
        let mut fatal = None;
        let mut fatal_deadline: Option<Instant> = None;
        loop {
            if !stop_reading.is_cancelled() {
                let wanted = *target.borrow_and_update();
                self.follow(wanted, first, &stop_reading, shutdown).await?;
                Counters::set(&counters.workers, self.running.len() as u64);
            } else {
                // Once the readers are done, the strategy's loop sees the end.
                self.spawner.batches = None;
            }
            if stop_reading.is_cancelled() && self.tasks.is_empty() {
                break;
            }
            tokio::select! {
                joined = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    let Some(joined) = joined else { continue };
                    let result =
                        joined.unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()));
                    if let Err(err) = result {
                        match is_mixed(&err) {
                            Some(line) => tracing::error!(cause = %line, "this process may not write this stream; stopping"),
                            None => tracing::error!(cause = %crate::connect::brief(&err), "Redis refused the bridge; stopping"),
                        }
                        fatal.get_or_insert(err);
                        fatal_deadline.get_or_insert_with(|| Instant::now() + shutdown_timeout);
                        stop_reading.cancel();
                    }
                }
                changed = target.changed(), if scaler_alive && !stop_reading.is_cancelled() => {
                    scaler_alive = changed.is_ok();
                }
                // A place among the holders taken or given back: the
                // readers start or stop.
                _ = hold.changed(), if !stop_reading.is_cancelled() => {}
                _ = stop_reading.cancelled(), if !stop_reading.is_cancelled() => {}
                _ = shutdown.cancelled(), if handover_until.is_none() && !stop_reading.is_cancelled() => {
                    match handover && *self.spawner.hold.borrow() {
                        true => handover_until = Some(Instant::now() + HANDOVER_AT_MOST),
                        false => stop_reading.cancel(),
                    }
                }
                _ = handed.changed(), if handover_until.is_some() && !stop_reading.is_cancelled() => {
                    if *handed.borrow_and_update() {
                        stop_reading.cancel();
                    }
                }
                _ = tokio::time::sleep_until(handover_until.unwrap_or_else(Instant::now).into()), if handover_until.is_some() && !stop_reading.is_cancelled() => {
                    tracing::debug!("no process took this one's place among the holders in time: stopping to read anyway");
                    stop_reading.cancel();
                }
                // Redis refused us: what is left stops as in a graceful
                // stop (the engine writes what it can), within
                // SHUTDOWN_TIMEOUT, then is ended.
                _ = tokio::time::sleep_until(fatal_deadline.unwrap_or_else(Instant::now).into()), if fatal_deadline.is_some() => {
                    self.tasks.abort_all();
                    while let Some(joined) = self.tasks.join_next().await {
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
        Ok(fatal)
    }

    /// Starts or stops workers (newest first) until `wanted` run.
    async fn follow(
        &mut self,
        wanted: usize,
        first: usize,
        stop_reading: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> Result<(), RedisError> {
        while self.running.len() < wanted {
            let id = self.process.worker_id(self.next_index);
            self.next_index += 1;
            let stop = stop_reading.child_token();
            let started = self
                .spawner
                .spawn(&id, stop.clone(), &mut self.tasks, shutdown);
            if !started.await? {
                break;
            }
            if self.next_index > first {
                tracing::info!(worker = %id, workers = self.running.len() + 1, "worker started (ctl scale)");
            }
            self.live.lock().unwrap().push(id.clone());
            self.ever.push(id.clone());
            self.running.push((id, stop));
        }
        while self.running.len() > wanted {
            let (id, stop) = self.running.pop().expect("more running than wanted");
            stop.cancel();
            self.spawner.stopped(&id);
            self.live.lock().unwrap().retain(|w| *w != id);
            let _ = self
                .presence
                .remove(&mut self.conn, std::slice::from_ref(&id))
                .await;
            tracing::info!(worker = %id, workers = self.running.len(), "worker stopping (ctl scale): it settles what it holds first");
            if self.running.is_empty() {
                // No worker of this process listens from now on: a gap,
                // counted when a worker subscribes again.
                self.spawner.coverage.pause();
                tracing::warn!(
                    "ctl scale leaves this process no worker: messages published now reach no worker here (counted as a gap)"
                );
            }
        }
        self.spawner
            .readers_for(self.running.len(), stop_reading, &mut self.tasks);
        Ok(())
    }
}

/// The readers the process runs on one server: at most this many,
/// whatever its number of workers.
const MAX_READERS: usize = 2;

/// How long a stopping holder reads on for processes that waited to take
/// its place (they subscribe within a cycle or two).
const HANDOVER_AT_MOST: Duration = Duration::from_secs(2);

/// The race workers of a single server, by worker id, each with its queue:
/// the dispatcher hands every one of them each message.
type Racers = Arc<Mutex<Vec<(String, mpsc::Sender<Vec<Message>>)>>>;

/// Starts what runs the workers: on one server, the strategy's loop once and
/// the readers (one per worker, at most [`MAX_READERS`]), and for the race
/// strategy a racing loop per worker; on a cluster, a subscription and a
/// racing loop per worker.
pub(super) struct Spawner {
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
    /// On a cluster: the connection the readers find the channel's master
    /// through.
    locator: Option<Conn>,
    /// The readers, by slot: each one's stop, and whether its task has
    /// ended (a slot is used again only then, so that a stopped reader
    /// still settling is never taken for its successor: both have the
    /// slot's number).
    readers: Vec<Option<(CancellationToken, Arc<AtomicBool>)>>,
    /// Race strategy on one server: each racing worker's queue.
    racers: Racers,
    /// Race strategy on a cluster: which worker's subscription is the
    /// process's keeper (see `delivery::cluster::Keeper`).
    keepers: Arc<std::sync::atomic::AtomicU64>,
    /// Whether this process holds copies (reads), or waits for a place
    /// among the pool's holders (see `members::Holding`).
    hold: watch::Sender<bool>,
    /// Stopping: processes that waited hold copies in this one's stead
    /// (its readers may stop).
    handed: watch::Sender<bool>,
}

impl Spawner {
    pub(super) fn new(
        config: &BridgeConfig,
        routes: Vec<route::Route>,
        routes_shown: String,
        counters: Arc<Counters>,
    ) -> Self {
        let cluster = config.endpoint.is_cluster();
        let db = config
            .endpoint
            .info()
            .map_or(0, |info| info.redis_settings().db());
        // The fenced core on a cluster (sharded Pub/Sub): the pool's keys in
        // the channels' slot (the config made sure they share one).
        let pool = match routes.iter().find(|r| !r.pattern) {
            Some(route) if cluster && config.strategy == Strategy::Fenced => {
                Pool::sharded(&config.output_stream, &route.source)
            }
            _ => Pool::in_db(&config.output_stream, db),
        };
        let router = Arc::new(route::Router::new(
            routes,
            route::LanePlan {
                dead_letter_stream: config.dead_letter_stream.clone(),
                cluster,
                format: config.output_format,
                id_field: config.message_id_field.clone(),
                db,
                handoff: (!cluster).then(|| pool.handoff.clone()),
                sharded: cluster && config.endpoint.is_sharded(),
            },
        ));
        // Every process holds copies until a fenced one joins its pool and
        // learns its place.
        Counters::set(&counters.holding, 1);
        Self {
            router,
            routes_shown,
            config: config.clone(),
            coverage: Arc::new(match cluster && config.strategy == Strategy::Race {
                true => Coverage::default(),
                false => Coverage::counted_by_intake(),
            }),
            budget: Budget::new(config.memory_limit),
            pool,
            batches: None,
            locator: None,
            readers: Vec::new(),
            racers: Arc::default(),
            keepers: delivery::cluster::Keeper::seats(),
            hold: watch::Sender::new(true),
            handed: watch::Sender::new(false),
            counters,
        }
    }

    /// Whether the workers are lanes of one loop fed by the process's
    /// readers ([`Spawner::start_engine`]): always on one server, and with
    /// the fenced strategy on a cluster; race on a cluster runs a
    /// subscription per worker instead.
    pub(super) fn has_engine(&self) -> bool {
        !self.config.endpoint.is_cluster() || self.config.strategy == Strategy::Fenced
    }

    /// The most processes of the pool that hold copies (0: every one): the
    /// writer and STANDBYS standbys; every race process holds copies.
    pub(super) fn holders(&self) -> usize {
        match (self.config.strategy, self.config.standbys) {
            (Strategy::Fenced, Some(standbys)) => standbys + 1,
            _ => 0,
        }
    }

    /// One server (or fenced on a cluster): the strategy's loop, fed by the
    /// readers' batches.
    pub(super) async fn start_engine(
        &mut self,
        process: &Process,
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
        if self.pool.sharded {
            self.locator = Some(conn.clone());
        }
        let holders = self.holders();
        let beat = Beat {
            pool: &self.pool,
            member: &member,
            strategy: config.strategy,
            seen: 0,
            since: u64::MAX,
            routes,
            holding: Holding {
                limit: holders,
                held: 0,
                may: Place::Claim,
                live_for: config.takeover_after,
            },
        };
        let joined = crate::connect::retry_until(
            shutdown,
            || {
                let mut conn = conn.clone();
                async move {
                    match beat.cycle(&mut conn, &[], false).await {
                        Err(err) if is_mixed(&err).is_some() => Ok(Err(err)),
                        other => other.map(|cycle| Ok(cycle.held)),
                    }
                }
            },
            |err, wait| {
                tracing::warn!(cause = %crate::connect::brief(err), retry_in_ms = wait.as_millis() as u64, "cannot join the pool yet; retrying")
            },
        )
        .await?;
        let held = match joined {
            None => return Ok(()),
            Some(Err(mixed)) => return Err(mixed),
            Some(Ok(held)) => held,
        };
        if held == 0 {
            tracing::info!(
                holders,
                "the pool's holders are all there (STANDBYS): this process waits to take a holder's place, and reads nothing until then"
            );
        }
        self.hold.send_replace(held > 0);
        Counters::set(&self.counters.holding, u64::from(held > 0));
        let intake = Intake::new(Identify::by_position(
            config.message_id_field.clone(),
            config.max_payload_bytes,
        ));
        match config.strategy {
            Strategy::Fenced => {
                // MIN_REPLICAS_ACKED: WAIT blocks its connection, so it has
                // one of its own.
                let waiter = match config.min_replicas_acked {
                    0 => None,
                    _ => {
                        let endpoint = &config.endpoint;
                        let opened = crate::connect::retry_until(
                            shutdown,
                            || crate::connect::managed(endpoint),
                            |err, wait| {
                                tracing::warn!(cause = %crate::connect::brief(err), retry_in_ms = wait.as_millis() as u64, "cannot open the connection that waits for replicas yet; retrying")
                            },
                        )
                        .await?;
                        match opened {
                            Some(conn) => Some(conn),
                            None => return Ok(()),
                        }
                    }
                };
                let fenced = Fenced::new(
                    FencedConfig {
                        member,
                        routes,
                        pool: self.pool.clone(),
                        batch_size: config.batch_size,
                        takeover_after: config.takeover_after,
                        dedup_window: config.dedup_window,
                        min_replicas: config.min_replicas_acked,
                        endpoint: config.endpoint.clone(),
                        holders,
                    },
                    conn,
                    waiter,
                    self.counters.clone(),
                    self.budget.clone(),
                    intake,
                    Seat {
                        held,
                        hold: self.hold.clone(),
                        shutdown: shutdown.clone(),
                        handed: self.handed.clone(),
                    },
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
        // (None while this process waits for a place among the holders.)
        let wanted = match *self.hold.borrow() {
            true => workers.min(MAX_READERS),
            false => 0,
        };
        self.readers.resize_with(MAX_READERS, || None);
        for slot in 0..MAX_READERS {
            let running = self.readers[slot]
                .as_ref()
                .is_some_and(|(t, _)| !t.is_cancelled());
            let free = self.readers[slot]
                .as_ref()
                .is_none_or(|(_, ended)| ended.load(Ordering::SeqCst));
            if slot < wanted && free {
                let stop = stop_reading.child_token();
                let ended = Arc::new(AtomicBool::new(false));
                let reader = Reader {
                    index: slot,
                    endpoint: self.config.endpoint.clone(),
                    router: self.router.clone(),
                    pool: self.pool.clone(),
                    budget: self.budget.clone(),
                    counters: self.counters.clone(),
                    coverage: self.coverage.clone(),
                    out: batches.clone(),
                    cancel: stop.clone(),
                    locator: self.locator.clone(),
                };
                let done = ended.clone();
                tasks.spawn(async move {
                    let result = reader.run().await;
                    done.store(true, Ordering::SeqCst);
                    result
                });
                self.readers[slot] = Some((stop, ended));
            } else if slot >= wanted
                && running
                && let Some((stop, _)) = &self.readers[slot]
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
        if config.strategy == Strategy::Fenced {
            return Ok(true);
        }
        let Some(worker_conn) = connection(&config.endpoint, shutdown).await? else {
            return Ok(false);
        };
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
                    budget: self.budget.clone(),
                    keeper: delivery::cluster::Keeper::seat(&self.keepers),
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

/// The race loop's cycle: its beat among the pool's members, and a mark
/// (the fenced loop's cycle does both for its own). A message's mark dates
/// it in the server's time, which the race's guard against long stops
/// needs.
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
            holding: Holding::everyone(),
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

/// The race strategy on one server: every racing worker gets every message
/// the intake hands on. Ends when the readers are done; the workers' queues
/// close with it.
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
