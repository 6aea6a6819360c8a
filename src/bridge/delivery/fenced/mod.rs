//! The default strategy's loop, one per process: the intake's messages go
//! to their stream's lane; each stream has one writer in the pool (the
//! process its writer record names), which writes its lane in order with
//! `write.lua`; the other processes keep their copies as standbys until the
//! record's position passes them, and take the record over when the writer
//! falls silent, stops receiving or gets stuck.
//!
//! Every [`CYCLE_EVERY`] one script beats for the process (its member entry:
//! server time and the last mark it has seen), publishes a mark, and reads
//! the records of the streams it holds messages of.

//!
//! Its parts: [`lane`] (a stream's copies and this process's part in it),
//! [`takeover`] (the pure decision a lane takes on its record each cycle,
//! unit-tested), [`write`] (one fenced write's command and answer) and
//! [`window`] (the ids seen within DEDUP_WINDOW).

mod lane;
mod takeover;
mod window;
mod write;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::RedisError;
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::budget::Budget;
use super::intake::Intake;
use super::members::{Beat, Cycle, Handoff, Holding, Place, Rule, is_mixed};
use super::reader::ReaderBatch;
use super::{Lane, Message, Pool, Position, Strategy, scripts};
use crate::connect::{Conn, brief, is_fatal};
use crate::monitor::{Counters, Throttle};
use lane::{Fate, InFlight, LaneState, Queued, Role, back_off, cover, pop, write_command};
use takeover::{Member, Record, Step, View, presumed_dead_after};
pub use takeover::{Takeover, take_over};
use window::Window;
pub use write::WriteReply;
use write::decode_write;
#[cfg(test)]
pub use write::write;

/// Time between two cycles of a process.
pub const CYCLE_EVERY: Duration = Duration::from_millis(50);
/// Most writes (of up to PROCESSING_BATCH_SIZE messages each) of one stream
/// sent together, as one pipeline (a trip).
const WRITES_PER_TRIP: usize = 16;
/// Trips of one stream on their way at once: the next is made while Redis
/// runs the one before. Each is handed to the connection before the next
/// is made, so they reach Redis in their order (were one to overtake
/// another, its writes would find the record elsewhere and write nothing:
/// the lane reads the record and goes on).
const TRIPS: usize = 2;
/// A quiet writer gives its stream back after this long.
const QUIET_RELEASE: Duration = Duration::from_secs(30);
/// Cycles between two sweeps of every lane (see `Fenced::sweep`).
const SWEEP_EVERY: u64 = 10;
/// Most writer records one cycle reads: with more streams than this in
/// hand, the lanes take turns (those waiting on their record first).
const RECORDS_PER_CYCLE: usize = 1024;

/// What the loop needs besides its inputs.
#[derive(Debug, Clone)]
pub struct FencedConfig {
    /// This process's name among the members.
    pub member: String,
    /// A fingerprint of the routes (INPUT_CHANNEL, ROUTES): processes that
    /// route otherwise number messages otherwise, and must not share a pool.
    pub routes: u64,
    pub pool: Pool,
    /// Most messages per write.
    pub batch_size: usize,
    /// How long a standby waits for a silent, deaf or stuck writer
    /// (TAKEOVER_AFTER).
    pub takeover_after: Duration,
    /// A message id seen again within this long (by publish time) is a
    /// re-sent message, written once (DEDUP_WINDOW).
    pub dedup_window: Duration,
    /// MIN_REPLICAS_ACKED: replicas that must hold a write (WAIT) before
    /// the record says so (`safe`), which is how far standbys drop their
    /// copies; 0: off (standbys drop up to the record's position).
    pub min_replicas: usize,
    /// Where Redis is: a command connection that stops answering (its
    /// replies black-holed, the socket open) is replaced from it.
    pub endpoint: crate::connect::Endpoint,
    /// The most processes of the pool that hold copies (STANDBYS + 1; 0:
    /// every one): see [`Holding`].
    pub holders: usize,
}

/// Cycles in a row that time out before the command connection is taken
/// for dead and replaced (the connection manager reconnects when the
/// connection drops, not when its replies stop coming).
const TIMEOUTS_BEFORE_REPLACING: u32 = 2;

type WriteAnswers = (Box<str>, Vec<(u64, Result<WriteReply, RedisError>)>);

/// MIN_REPLICAS_ACKED: a wait for replicas answered: its stream, the
/// writer's epoch and the position asked about, and whether enough
/// replicas hold the record there.
type Waited = (Box<str>, String, Position, bool);

/// How long one WAIT for replicas may take (MIN_REPLICAS_ACKED).
const WAIT_FOR_REPLICAS_MS: u64 = 1000;

/// The default strategy's loop; see the module's notes.
pub struct Fenced {
    config: FencedConfig,
    conn: Conn,
    counters: Arc<Counters>,
    budget: Arc<Budget>,
    intake: Intake,
    lanes: FxHashMap<Box<str>, LaneState>,
    /// The lanes that may have writes to send (the others wait for an
    /// answer, a record, or messages, which put them back here).
    ready: rustc_hash::FxHashSet<Box<str>>,
    /// Cycles so far.
    cycles: u64,
    /// The pipelines of writes on their way, each answering with its
    /// stream and each write's id and answer.
    writes: JoinSet<WriteAnswers>,
    /// MIN_REPLICAS_ACKED: the connection that waits for replicas (WAIT
    /// blocks the connection it is sent on: not the one that writes and
    /// beats), and the waits on their way (one per lane at a time).
    waiter: Option<Conn>,
    waits: JoinSet<Waited>,
    next_write: u64,
    reported_pending: u64,
    warnings: Throttle,
    /// When the routes' mismatch was last said (every 30 s at most).
    routes_said: Option<Instant>,
    /// Since when this process has watched the pool without a break (see
    /// `takeover::View::watched`): reset by a cycle that failed, a member
    /// entry of its own that is new, and a member's beat gone back.
    watching_since: Option<Instant>,
    /// Each member's beat as the last cycle read it.
    beats: HashMap<String, u64>,
    /// Since when the budget has been spent with nothing to shed.
    shed_nothing_since: Option<Instant>,
    /// The pool's strategy handoff, as the last cycle read it.
    handoff: Option<Handoff>,
    /// The handoff changed and some lanes (with writes on their way) still
    /// hold copies that are the other strategy's.
    unpurged: bool,
    /// Cycles in a row that timed out.
    timeouts: u32,
    /// Since when (server ms) this process holds copies (0: it waits for a
    /// place among the holders), and where the readers learn whether to
    /// read.
    held: u64,
    hold: watch::Sender<bool>,
    /// The readers are done (stopping): it takes no place any more.
    reading: bool,
    /// The process is stopping: it gives its place back while it still
    /// reads, and says on `handed` once processes that waited hold copies
    /// in its stead (then its readers stop).
    shutdown: CancellationToken,
    handed: watch::Sender<bool>,
}

/// How the loop keeps this process's place among the holders: since when
/// it holds one (as its first cycle, joining the pool, said; 0: it
/// waits), where the readers learn whether to read, the stop asked for,
/// and where to say, stopping, that others hold copies in its stead.
pub struct Seat {
    pub held: u64,
    pub hold: watch::Sender<bool>,
    pub shutdown: CancellationToken,
    pub handed: watch::Sender<bool>,
}

impl Fenced {
    pub fn new(
        config: FencedConfig,
        conn: Conn,
        waiter: Option<Conn>,
        counters: Arc<Counters>,
        budget: Arc<Budget>,
        intake: Intake,
        seat: Seat,
    ) -> Self {
        Self {
            held: seat.held,
            hold: seat.hold,
            reading: true,
            shutdown: seat.shutdown,
            handed: seat.handed,
            config,
            conn,
            waiter,
            waits: JoinSet::new(),
            counters,
            budget,
            intake,
            lanes: FxHashMap::default(),
            ready: Default::default(),
            cycles: 0,
            writes: JoinSet::new(),
            next_write: 0,
            reported_pending: 0,
            warnings: Throttle::default(),
            routes_said: None,
            watching_since: None,
            beats: HashMap::new(),
            shed_nothing_since: None,
            handoff: None,
            unpurged: false,
            timeouts: 0,
        }
    }

    /// After a cycle's error: a command connection whose cycles keep timing
    /// out is replaced by a new one (writes on their way on the old one
    /// time out and are read again from the record).
    async fn after_cycle_error(&mut self, err: &RedisError) {
        if !err.is_timeout() {
            return;
        }
        self.timeouts += 1;
        if self.timeouts < TIMEOUTS_BEFORE_REPLACING {
            return;
        }
        match crate::connect::managed(&self.config.endpoint).await {
            Ok(conn) => {
                tracing::warn!(
                    timeouts = self.timeouts,
                    "the command connection stopped answering: replaced it with a new one"
                );
                self.conn = conn;
                self.timeouts = 0;
            }
            Err(err) => {
                tracing::debug!(cause = %brief(&err), "could not open a new command connection; trying again next cycle");
            }
        }
    }

    /// Whether this process gives its place among the holders up: it is
    /// stopping, or runs no worker (`ctl scale`). Its place is then free
    /// for a process that waits (while it stops, as it still reads).
    fn giving_up(&self) -> bool {
        self.config.holders > 0
            && (!self.reading
                || self.shutdown.is_cancelled()
                || self
                    .counters
                    .workers
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == 0)
    }

    /// This process's place among the holders, as the cycle tells it.
    fn place(&self) -> Holding {
        let writes = self.lanes.values().any(|l| l.is_writer());
        let (held, may) = match self.held {
            _ if self.giving_up() => (0, Place::Keep),
            0 => (0, Place::Claim),
            held if writes => (held, Place::Keep),
            held => (held, Place::Release),
        };
        Holding {
            limit: self.config.holders,
            held,
            may,
            live_for: self.config.takeover_after,
        }
    }

    /// Takes in the place a cycle gave this process: its readers read
    /// while it holds one (and, stopping, until others hold copies in its
    /// stead).
    fn set_held(&mut self, held: u64) {
        let changed = (held > 0) != (self.held > 0);
        let stopping = !self.reading || self.shutdown.is_cancelled();
        self.held = held;
        Counters::set(&self.counters.holding, u64::from(held > 0));
        if !changed || stopping || self.config.holders == 0 {
            return;
        }
        // Given back to more complete holders, the time until it holds a
        // place again is no hole: they hold those messages. (Left with no
        // worker by `ctl scale`, it is one, as before.)
        let scaled_out = self.giving_up();
        match held {
            0 if scaled_out => {
                tracing::info!(
                    "this process runs no worker: its place among the holders is free for another"
                )
            }
            0 => {
                tracing::info!(
                    holders = self.config.holders,
                    "giving this process's place among the holders back (as many more complete holders are there): it reads nothing now and waits to take a holder's place"
                )
            }
            _ => {
                tracing::info!(
                    holders = self.config.holders,
                    "this process holds copies now (a place among the holders was free): subscribing"
                )
            }
        }
        self.intake.rest(held == 0 && !scaled_out);
        self.hold.send_replace(held > 0);
    }

    /// Stopping: whether processes that waited hold copies in this one's
    /// stead (so that its readers may stop): every live member that holds
    /// a place or waits for one, up to the number of places, subscribed.
    /// (Members that stop too still read, with no place.)
    fn others_hold(&self, members: &HashMap<&str, Member>, now_ms: u64) -> bool {
        let live = self.config.takeover_after.as_millis() as u64;
        let (mut candidates, mut subscribed) = (0, 0);
        for (name, m) in members {
            if *name == self.config.member || now_ms.saturating_sub(m.beat) > live {
                continue;
            }
            let reading = m.since != u64::MAX;
            if m.held > 0 || !reading {
                candidates += 1;
            }
            if m.held > 0 && reading {
                subscribed += 1;
            }
        }
        subscribed >= candidates.min(self.config.holders)
    }

    /// What this process does with a message under the handoff.
    fn rule(&self, m: &Message) -> Rule {
        Handoff::rule(self.handoff, Strategy::Fenced, m.position.map(|p| p.mark))
    }

    /// The pool is being handed to this strategy and the handoff mark is
    /// not taken yet: it holds what it receives and writes nothing.
    fn holding(&self) -> bool {
        self.handoff
            .is_some_and(|h| h.target == Strategy::Fenced && h.at.is_none())
    }

    /// The first mark that is not this strategy's (handed from, H taken).
    fn handed_from(&self) -> Option<u64> {
        self.handoff
            .filter(|h| h.target != Strategy::Fenced)
            .and_then(|h| h.at)
    }

    /// Takes in the handoff a cycle read: the copies that are the other
    /// strategy's are dropped (those of lanes with writes on their way once
    /// answered), and a lane handed to this strategy counts everything
    /// before H as covered.
    fn take_handoff(&mut self, handoff: Option<Handoff>) {
        if handoff != self.handoff {
            match handoff {
                Some(Handoff {
                    target,
                    at: Some(at),
                    ..
                }) => {
                    tracing::info!(
                        target = target.name(),
                        mark = at,
                        "strategy handoff: messages from the handoff mark on are the target strategy's"
                    )
                }
                Some(Handoff {
                    target, at: None, ..
                }) => {
                    tracing::info!(
                        target = target.name(),
                        "strategy handoff asked for: waiting for a process of the target strategy to take the handoff mark"
                    )
                }
                None => {}
            }
            self.handoff = handoff;
            self.unpurged = handoff.is_some();
        }
        let floor = handoff
            .filter(|h| h.target == Strategy::Fenced)
            .and_then(|h| h.at)
            .unwrap_or(0);
        // (Copies that came since the change were sorted as they came.)
        let purge = std::mem::take(&mut self.unpurged);
        let mut dropped = 0;
        for lane in self.lanes.values_mut() {
            lane.floor = floor;
            if !purge {
                continue;
            }
            if !lane.in_flight.is_empty() {
                self.unpurged = true;
                continue;
            }
            let before = lane.queue.len();
            lane.queue.retain(|q| {
                Handoff::rule(handoff, Strategy::Fenced, q.m.position.map(|p| p.mark)) != Rule::No
            });
            dropped += (before - lane.queue.len()) as u64;
        }
        Counters::add(&self.counters.duplicates_skipped, dropped);
    }

    /// Runs until `batches` is closed (every reader stopped) and what this
    /// process holds is written or covered (or, for copies, until
    /// TAKEOVER_AFTER + 2 s after that), then leaves the members. Returns an
    /// error only when Redis refuses us in a way retrying cannot mend.
    pub async fn run(
        mut self,
        mut batches: mpsc::UnboundedReceiver<ReaderBatch>,
    ) -> Result<(), RedisError> {
        let mut tick = tokio::time::interval(CYCLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut readers_done: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                done = self.writes.join_next(), if !self.writes.is_empty() => {
                    let (stream, replies) = done.expect("a write was on its way").unwrap_or_else(|panic| {
                        std::panic::resume_unwind(panic.into_panic())
                    });
                    self.on_written(stream, replies)?;
                }
                done = self.waits.join_next(), if !self.waits.is_empty() => {
                    let waited = done.expect("a wait was on its way").unwrap_or_else(|panic| {
                        std::panic::resume_unwind(panic.into_panic())
                    });
                    self.on_waited(waited);
                }
                batch = batches.recv(), if readers_done.is_none() => match batch {
                    Some(batch) => self.on_batch(batch),
                    None => {
                        readers_done = Some(Instant::now());
                        self.reading = false;
                    }
                },
                _ = tick.tick() => self.cycle(false).await?,
            }
            if self.budget.pressed() {
                self.shed();
            } else {
                self.shed_nothing_since = None;
            }
            self.start_writes().await;
            self.start_waits();
            if let Some(since) = readers_done
                && self.finished(since).await?
            {
                break;
            }
        }
        if let Err(err) = self.cycle(true).await {
            tracing::debug!(cause = %brief(&err), "could not leave the members; the entry lapses by itself");
        }
        Counters::sub(&self.counters.pending, self.reported_pending);
        Ok(())
    }

    /// Takes a reader's batch into the lanes.
    fn on_batch(&mut self, batch: ReaderBatch) {
        let messages = self.intake.take(batch);
        self.intake.count_holes(&self.counters);
        Counters::add(&self.counters.received, messages.len() as u64);
        let window = self.config.dedup_window;
        let now = Instant::now();
        let mut last_woken: Option<Arc<Lane>> = None;
        for m in messages {
            if self.rule(&m) == Rule::No {
                Counters::add(&self.counters.duplicates_skipped, 1);
                continue;
            }
            let stream = m.lane.stream();
            let lane = match self.lanes.get_mut(stream) {
                Some(lane) => lane,
                None => self.lanes.entry(stream.into()).or_insert_with(|| {
                    let window = Window::new(window, Some(self.budget.clone()));
                    let mut lane = LaneState::new(m.lane.clone(), window, self.cycles);
                    lane.keep_unconfirmed = self.config.min_replicas > 0;
                    lane
                }),
            };
            lane.last_active = now;
            if lane.is_writer() && !last_woken.as_ref().is_some_and(|l| Arc::ptr_eq(l, &m.lane)) {
                self.ready.insert(stream.into());
                last_woken = Some(m.lane.clone());
            }
            if lane
                .pos
                .is_some_and(|pos| m.position.is_some_and(|p| p <= pos))
            {
                lane.window.seen(&m);
                Counters::add(&self.counters.duplicates_skipped, 1);
                // (With MIN_REPLICAS_ACKED the record's position may be
                // taken back by a failover: the copy is kept apart until
                // the replicas hold the stream that far.)
                if lane.keep_unconfirmed {
                    lane.unconfirmed.push_back(Queued {
                        m,
                        fate: Fate::Write,
                        decided: false,
                        taken_over: false,
                    });
                }
                continue;
            }
            lane.queue.push_back(Queued {
                m,
                fate: Fate::Write,
                decided: false,
                taken_over: false,
            });
        }
    }

    /// Starts the writes the writer lanes can send now: for each writer lane
    /// with fewer than [`TRIPS`] on their way, its next writes, as one
    /// pipeline, handed to the connection before the next one is made.
    async fn start_writes(&mut self) {
        if self.holding() {
            return;
        }
        let handed_from = self.handed_from();
        let now = Instant::now();
        let mut keys: Vec<Box<str>> = Vec::new();
        let lanes = &self.lanes;
        self.ready.retain(|k| {
            let Some(l) = lanes.get(k) else {
                return false;
            };
            // Put back by what changes that: an answer, a record, messages.
            if !l.is_writer() || l.resync || l.trips >= TRIPS || l.unsent() == 0 {
                return false;
            }
            if l.retry_at.is_none_or(|at| now >= at) {
                keys.push(k.clone());
            }
            true
        });
        for key in keys {
            let lane = self.lanes.get_mut(&key).expect("a lane");
            let mut pipe = redis::pipe();
            let mut ids = Vec::new();
            let stop_at = match (lane.hole(self.intake.continuous_since()), handed_from) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            while ids.len() < WRITES_PER_TRIP
                && let Some((cmd, span)) =
                    write_command(lane, self.config.batch_size, &self.config.member, stop_at)
            {
                let id = self.next_write;
                self.next_write += 1;
                lane.in_flight.push_back(InFlight { id, span });
                pipe.add_command(cmd);
                ids.push(id);
            }
            if ids.is_empty() {
                continue;
            }
            lane.trips += 1;
            let mut conn = self.conn.clone();
            let started = Instant::now();
            let mut trip =
                Box::pin(
                    async move { scripts::query::<Vec<redis::Value>, _>(&mut conn, &pipe).await },
                );
            // Polled once here: the pipeline is queued on the connection
            // now, ahead of the next trip's.
            let first =
                std::future::poll_fn(|cx| std::task::Poll::Ready(trip.as_mut().poll(cx))).await;
            let counters = self.counters.clone();
            let stream = key.clone();
            self.writes.spawn(async move {
                let answer = match first {
                    std::task::Poll::Ready(answer) => answer,
                    std::task::Poll::Pending => trip.await,
                };
                let replies: Vec<Result<WriteReply, RedisError>> = match answer {
                    Ok(values) => values.into_iter().map(decode_write).collect(),
                    Err(err) => ids.iter().map(|_| Err(err.clone())).collect(),
                };
                counters
                    .batch_seconds
                    .observe(started.elapsed().as_secs_f64());
                (stream, ids.into_iter().zip(replies).collect())
            });
        }
    }

    /// A pipeline of writes answered: each answer in the order the writes
    /// went.
    fn on_written(
        &mut self,
        stream: Box<str>,
        replies: Vec<(u64, Result<WriteReply, RedisError>)>,
    ) -> Result<(), RedisError> {
        let Some(lane) = self.lanes.get_mut(&stream) else {
            return Ok(());
        };
        lane.trips = lane.trips.saturating_sub(1);
        self.ready.insert(stream.clone());
        self.on_replies(&stream, replies)
    }

    /// MIN_REPLICAS_ACKED: for each writer lane with written copies the
    /// replicas are not known to hold (and no wait on its way), asks on the
    /// waiting connection whether enough replicas hold the record as far as
    /// it is now: `confirm.lua` notes the position in the record (a write),
    /// then WAIT counts the replicas that have it, and with it every entry
    /// written before it.
    fn start_waits(&mut self) {
        let Some(waiter) = &self.waiter else {
            return;
        };
        let now = Instant::now();
        let history = self.config.pool.clock_history();
        for (stream, lane) in self.lanes.iter_mut() {
            let (Role::Writer { epoch }, Some(pos)) = (&lane.role, lane.pos) else {
                continue;
            };
            if lane.waiting
                || lane.resync
                || lane.unconfirmed.is_empty()
                || lane.wait_again_at.is_some_and(|at| now < at)
            {
                continue;
            }
            lane.waiting = true;
            let record = lane.lane.keys.writer.as_str();
            // (On a cluster the clock's history note lives in the channel's
            // slot: noted on its own.)
            let sharded = self.config.pool.sharded;
            let keys: &[&str] = match sharded {
                true => &[record],
                false => &[record, history.as_str()],
            };
            let confirm = |keys: &[&str], step: &str| {
                let mut cmd = scripts::evalsha(scripts::CONFIRM, keys);
                cmd.arg(epoch)
                    .arg(&self.config.member)
                    .arg(pos.encode())
                    .arg(step);
                cmd
            };
            let (ask, set) = (confirm(keys, "ask"), confirm(keys, "set"));
            let note = sharded.then(|| confirm(&[history.as_str()], "note"));
            let mut conn = waiter.clone();
            let wanted = self.config.min_replicas;
            let (stream, epoch, record) = (stream.clone(), epoch.clone(), record.to_string());
            self.waits.spawn(async move {
                // The WAIT follows the ask (a write) in one request to the
                // record's server, so that it counts the replicas holding
                // the record as the ask found it, even when the request is
                // sent again on a new connection. (On a cluster the clock's
                // history note, in the channel's slot, goes first, apart.)
                let mut pipe = redis::pipe();
                pipe.add_command(ask)
                    .cmd("WAIT")
                    .arg(wanted)
                    .arg(WAIT_FOR_REPLICAS_MS);
                let asked = async {
                    if let Some(note) = note {
                        scripts::run::<u8, _>(&mut conn, note).await?;
                    }
                    scripts::query_at::<(u8, usize)>(&mut conn, &record, &pipe).await
                }
                .await;
                let held = match asked {
                    Ok((1, replicas)) if replicas >= wanted => {
                        scripts::run::<u8, _>(&mut conn, set).await
                    }
                    Ok(_) => Ok(0),
                    Err(err) => Err(err),
                };
                let held = held.unwrap_or_else(|err| {
                    tracing::debug!(cause = %brief(&err), "could not ask how far the replicas hold the writes; asking again");
                    0
                });
                (stream, epoch, pos, held == 1)
            });
        }
    }

    /// MIN_REPLICAS_ACKED: a wait answered. When the replicas hold the
    /// record at `pos` (and the record says so: its `safe`), the writer
    /// lets go of its copies up to there; otherwise it asks again a cycle
    /// later.
    fn on_waited(&mut self, (stream, epoch, pos, held): Waited) {
        let Some(lane) = self.lanes.get_mut(&stream) else {
            return;
        };
        lane.waiting = false;
        if !held {
            lane.wait_again_at = Some(Instant::now() + CYCLE_EVERY);
            return;
        }
        lane.wait_again_at = None;
        if !matches!(&lane.role, Role::Writer { epoch: e } if *e == epoch) || lane.resync {
            return;
        }
        lane.confirmed_through(pos);
    }

    /// The answers of a pipeline of writes, in the order the writes went.
    fn on_replies(
        &mut self,
        stream: &str,
        replies: Vec<(u64, Result<WriteReply, RedisError>)>,
    ) -> Result<(), RedisError> {
        let stream: Box<str> = stream.into();
        let Some(lane) = self.lanes.get_mut(&stream) else {
            return Ok(());
        };
        // The trips' tasks may end in any order: a trip whose writes come
        // after writes still unanswered waits for their answers.
        let Some(first) = replies.first().map(|(id, _)| *id) else {
            return Ok(());
        };
        if lane.in_flight.iter().any(|w| w.id < first) {
            lane.early.push(replies);
            return Ok(());
        }
        let mut next = Some(replies);
        while let Some(replies) = next.take() {
            for (id, reply) in replies {
                let lane = self.lanes.get(&stream).expect("a lane");
                // A takeover or a fencing cleared the writes on their way.
                if lane.in_flight.front().is_none_or(|w| w.id != id) {
                    continue;
                }
                self.answered(&stream, reply)?;
            }
            let lane = self.lanes.get_mut(&stream).expect("a lane");
            let front = lane.in_flight.front().map(|w| w.id);
            if let Some(i) = lane
                .early
                .iter()
                .position(|r| r.first().map(|(id, _)| *id) == front)
            {
                next = Some(lane.early.swap_remove(i));
            } else if lane.in_flight.is_empty() {
                lane.early.clear();
            }
        }
        Ok(())
    }

    /// The answer of the lane's first write on its way.
    fn answered(
        &mut self,
        stream: &str,
        reply: Result<WriteReply, RedisError>,
    ) -> Result<(), RedisError> {
        let lane = self.lanes.get_mut(stream).expect("a lane");
        let write = lane.in_flight.pop_front().expect("a write on its way");
        if lane.resync {
            // A write after one that did not finish: its answer changes
            // nothing (it was refused, the record being elsewhere).
            return Ok(());
        }
        match reply {
            Ok(done @ (WriteReply::Done | WriteReply::DoneAnew)) => {
                if done == WriteReply::DoneAnew {
                    tracing::warn!(stream = %stream, "the stream was missing (deleted, or lost with Redis's data) though this pool had written to it: what it held is gone; writing on into a new one");
                }
                let last = lane.queue.get(write.span - 1).and_then(|q| q.m.position);
                pop(lane, write.span, &self.counters);
                lane.pos = last.or(lane.pos);
                lane.moved_at = Instant::now();
                lane.backoff.reset();
                lane.retry_at = None;
            }
            Ok(WriteReply::Fenced { pos }) => {
                tracing::info!(stream = %stream, "another process writes this stream now (fenced): keeping the copies as a standby");
                lane.stand_by();
                // (With MIN_REPLICAS_ACKED a standby drops its copies only
                // as far as the replicas hold them: the next cycle reads
                // how far that is.)
                if let Some(pos) = pos.filter(|_| self.config.min_replicas == 0) {
                    cover(lane, pos, &self.counters);
                }
            }
            Ok(WriteReply::Elsewhere) => {
                tracing::debug!(stream = %stream, pos = ?lane.pos, "the record was not where the write started: reading it again");
                lane.resync = true;
            }
            Ok(WriteReply::Stopped { reason, .. }) => {
                Counters::add(&self.counters.redis_errors, 1);
                let wait = back_off(lane);
                if self.warnings.ready().is_some() {
                    tracing::warn!(stream = %stream, cause = %reason, retry_in_ms = wait.as_millis() as u64, "Redis did not take the batch for now; keeping it and retrying");
                }
                lane.resync = true;
            }
            Ok(WriteReply::Refused { n, reason }) => {
                let refused = lane
                    .queue
                    .iter()
                    .take(write.span)
                    .filter(|q| !matches!(q.fate, Fate::Skip { .. }))
                    .nth(n)
                    .and_then(|q| q.m.position);
                if let Some(position) = refused {
                    lane.refused = Some((position, reason));
                }
                lane.resync = true;
            }
            Err(err) if is_fatal(&err) => return Err(err),
            Err(err) => {
                Counters::add(&self.counters.redis_errors, 1);
                let wait = back_off(lane);
                if self.warnings.ready().is_some() {
                    tracing::warn!(stream = %stream, cause = %brief(&err), retry_in_ms = wait.as_millis() as u64, "write not confirmed; reading the record before writing again");
                }
                lane.resync = true;
            }
        }
        Ok(())
    }

    /// One cycle: beat, mark, read the records of the lanes that need it;
    /// then each lane acts on its record.
    async fn cycle(&mut self, leaving: bool) -> Result<(), RedisError> {
        self.cycles += 1;
        let mut asked: Vec<(bool, u64, &Box<str>)> = self
            .lanes
            .iter()
            .filter(|(_, l)| !l.queue.is_empty() || !l.unconfirmed.is_empty() || l.is_writer())
            .map(|(k, l)| (!(l.resync && l.in_flight.is_empty()), l.asked_in, k))
            .collect();
        // With more lanes than a cycle reads, writers waiting on their
        // record first, then the longest unasked.
        if asked.len() > RECORDS_PER_CYCLE {
            asked.select_nth_unstable(RECORDS_PER_CYCLE);
            asked.truncate(RECORDS_PER_CYCLE);
        }
        let asked: Vec<Box<str>> = asked.into_iter().map(|(_, _, k)| k.clone()).collect();
        for stream in &asked {
            if let Some(lane) = self.lanes.get_mut(stream) {
                lane.asked_in = self.cycles;
            }
        }
        let records: Vec<&str> = asked
            .iter()
            .map(|stream| self.lanes[stream].lane.keys.writer.as_str())
            .collect();
        let beat = Beat {
            pool: &self.config.pool,
            member: &self.config.member,
            strategy: Strategy::Fenced,
            seen: self.intake.seen(),
            since: self.intake.continuous_since(),
            routes: self.config.routes,
            holding: self.place(),
        };
        let reply = match beat.cycle(&mut self.conn, &records, leaving).await {
            Ok(reply) => reply,
            Err(err) if is_fatal(&err) || is_mixed(&err).is_some() => return Err(err),
            Err(err) => {
                Counters::add(&self.counters.redis_errors, 1);
                tracing::debug!(cause = %brief(&err), "cycle failed; trying again next time");
                self.watching_since = None;
                self.after_cycle_error(&err).await;
                return Ok(());
            }
        };
        self.timeouts = 0;
        self.report_pending();
        if leaving {
            return Ok(());
        }
        let Cycle {
            mark,
            now_ms: now,
            members,
            records,
            new,
            handoff,
            held,
        } = reply;
        self.take_handoff(handoff);
        self.set_held(held);
        let members = Member::parse_all(&members);
        if self.shutdown.is_cancelled() && self.others_hold(&members, now) {
            self.handed.send_replace(true);
        }
        // A new entry (first cycle, or the members were lost with Redis's
        // data) or a beat gone back (an older copy of the data restored,
        // or a replica behind its primary promoted): the others' beats are
        // not fresh yet. So is a cycle after a failed one: nobody could
        // beat meanwhile.
        let went_back = members
            .iter()
            .any(|(name, m)| self.beats.get(*name).is_some_and(|&b| m.beat < b));
        if new || went_back || self.watching_since.is_none() {
            self.watching_since = Some(Instant::now());
        }
        self.beats = members
            .iter()
            .map(|(name, m)| (name.to_string(), m.beat))
            .collect();
        self.warn_strangers(&members);
        let me = self.config.member.clone();
        let view = View {
            member: &me,
            members: &members,
            now_ms: now,
            now: Instant::now(),
            takeover_after: self.config.takeover_after,
            seen: self.intake.seen(),
            // (A process that gave its place back this cycle is about to stop
            // reading: it takes nothing over.)
            since: match self.held == 0 && self.config.holders > 0 {
                true => u64::MAX,
                false => self.intake.continuous_since(),
            },
            listening: self.intake.any_connected(),
            watched: self
                .watching_since
                .map_or(Duration::ZERO, |at| at.elapsed()),
            wait_replicas: self.config.min_replicas > 0,
        };
        for (stream, (epoch, owner, pos, safe)) in asked.iter().zip(records) {
            let decoded = pos.as_deref().and_then(Position::decode);
            // The cycle's mark is above every mark published before it: a
            // position past it was made of no mark of the pool.
            let impossible = pos.filter(|_| decoded.is_none_or(|p| p.mark > mark));
            let record = Record {
                safe: safe.as_deref().and_then(Position::decode),
                epoch,
                owner: owner.filter(|o| !o.is_empty()),
                pos: decoded.filter(|_| impossible.is_none()),
                impossible,
            };
            if record.impossible.is_some() {
                self.repair(stream, &record, now, &members).await?;
                continue;
            }
            if self.holding() {
                continue;
            }
            self.act(stream, &record, &view).await?;
            // It may write now (it took the stream over, or read its record).
            self.ready.insert(stream.clone());
        }
        if self.cycles.is_multiple_of(SWEEP_EVERY) {
            self.sweep(now);
        }
        Ok(())
    }

    /// Forgets what every lane no longer needs (ids past the window, queue
    /// room, lanes quiet for QUIET_RELEASE) and gives the room back.
    fn sweep(&mut self, now: u64) {
        for lane in self.lanes.values_mut() {
            // Nothing still to be decided was published before the front's
            // mark: ids older than a window before it can match nothing.
            let front = lane.queue.front();
            let horizon = front
                .and_then(|q| q.m.position)
                .map_or(now, |p| p.published_ms().min(now));
            let received = front.map_or_else(Instant::now, |q| q.m.received_at);
            lane.window.expire(horizon, received);
            let queue = &mut lane.queue;
            if queue.capacity() > 1024 && queue.len() < queue.capacity() / 4 {
                queue.shrink_to(queue.len() * 2);
            }
        }
        self.lanes.retain(|_, l| {
            !l.queue.is_empty()
                || !l.unconfirmed.is_empty()
                || l.is_writer()
                || l.trips > 0
                || l.last_active.elapsed() < QUIET_RELEASE
        });
        // Many streams once, few now: the maps give their room back.
        if self.lanes.capacity() > 4 * self.lanes.len().max(16) {
            self.lanes.shrink_to(self.lanes.len() * 2);
        }
        if self.ready.capacity() > 4 * self.ready.len().max(16) {
            self.ready.shrink_to(self.ready.len() * 2);
        }
    }

    /// A record holding an impossible position (see [`Record`]): nothing is
    /// covered by it. The writer puts back the position it last wrote; when
    /// the writer is gone or silent (or another never puts it right), a
    /// standby puts back the last position it saw the record hold, or (new
    /// to the stream) the one just before the first copy it holds. Said
    /// loudly: the record was written by something outside the pool.
    async fn repair(
        &mut self,
        stream: &str,
        record: &Record,
        now_ms: u64,
        members: &HashMap<&str, Member>,
    ) -> Result<(), RedisError> {
        let Some(found) = record.impossible.as_deref() else {
            return Ok(());
        };
        let dead_after = presumed_dead_after(self.config.takeover_after);
        let dead_ms = dead_after.as_millis() as u64;
        let member = self.config.member.as_str();
        let lane = self.lanes.get_mut(stream).expect("a lane");
        let since = *lane.impossible_since.get_or_insert_with(Instant::now);
        let writer = matches!(&lane.role, Role::Writer { epoch } if record.epoch.as_deref() == Some(epoch.as_str()));
        if writer && !lane.in_flight.is_empty() {
            return Ok(());
        }
        let owner_lives = record
            .owner
            .as_deref()
            .filter(|o| *o != member)
            .and_then(|o| members.get(o))
            .is_some_and(|m| now_ms.saturating_sub(m.beat) <= dead_ms);
        if !writer && owner_lives && since.elapsed() < dead_after {
            return Ok(());
        }
        // A standby that never saw the record possible knows least: it
        // leaves the repair to those that did, for a while, then puts the
        // position just before its first copy (a message's number is at
        // least 1).
        let put = match (lane.pos, lane.queue.front().and_then(|q| q.m.position)) {
            (Some(pos), _) => pos,
            (None, Some(first)) if since.elapsed() >= 2 * dead_after => Position {
                seq: first.seq.saturating_sub(1),
                ..first
            },
            _ => return Ok(()),
        };
        let mut cmd = scripts::evalsha(scripts::REPAIR, &[&lane.lane.keys.writer]);
        cmd.arg(found).arg(put.encode());
        match scripts::run::<u8, _>(&mut self.conn, cmd).await {
            Ok(1) => {
                tracing::error!(stream = %stream, record = %lane.lane.keys.writer, found = %found, put = %put.encode(), by = if writer { "its writer" } else { "a standby" }, "the stream's writer record held a position no mark of the pool made (written by something outside the pool): put right");
                lane.impossible_since = None;
                lane.pos = Some(put);
                lane.moved_at = Instant::now();
                lane.resync = writer;
            }
            Ok(_) => lane.impossible_since = None,
            Err(err) if is_fatal(&err) => return Err(err),
            Err(err) => {
                Counters::add(&self.counters.redis_errors, 1);
                tracing::debug!(cause = %brief(&err), "could not put the record right; trying again next cycle");
            }
        }
        Ok(())
    }

    /// What a lane does with its record: the decision (see
    /// [`takeover::decide`]), then the script the decision calls for.
    async fn act(
        &mut self,
        stream: &str,
        record: &Record,
        view: &View<'_>,
    ) -> Result<(), RedisError> {
        let lane = self.lanes.get_mut(stream).expect("a lane");
        let result = match takeover::decide(lane, record, view, &self.counters) {
            Step::Stay => return Ok(()),
            Step::Release { epoch } => {
                let mut cmd = scripts::evalsha(scripts::RELEASE, &[&lane.lane.keys.writer]);
                cmd.arg(epoch);
                scripts::run::<u64, _>(&mut self.conn, cmd).await.map(|_| {
                    tracing::debug!(stream = %stream, "gave the stream back");
                    lane.role = Role::Standby;
                })
            }
            Step::TakeOver { why, clean } => {
                let taken = take_over(
                    &mut self.conn,
                    &lane.lane,
                    record.epoch.as_deref(),
                    view.member,
                )
                .await;
                taken.map(|taken| {
                    let Takeover::Taken { epoch, pos } = taken else {
                        return;
                    };
                    if record.epoch.is_some() {
                        tracing::info!(stream = %stream, previous = %record.owner.as_deref().unwrap_or("-"), reason = why, clean, "took the stream over");
                    } else {
                        // A stream new to the pool (many, under a template route).
                        tracing::debug!(stream = %stream, "writing a new stream");
                    }
                    takeover::taken(lane, record, epoch, pos, view, &self.counters);
                })
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(err) if is_fatal(&err) => Err(err),
            Err(err) => {
                Counters::add(&self.counters.redis_errors, 1);
                tracing::debug!(stream = %stream, cause = %brief(&err), "giving the stream back or taking it over failed; trying again next cycle");
                Ok(())
            }
        }
    }

    /// Says (every 30 s at most) when processes with other routes share
    /// this pool.
    fn warn_strangers(&mut self, members: &HashMap<&str, Member>) {
        let strangers: Vec<&str> = members
            .iter()
            .filter(|(_, m)| m.routes != 0 && m.routes != self.config.routes)
            .map(|(name, _)| *name)
            .collect();
        if !strangers.is_empty()
            && self
                .routes_said
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(30))
        {
            self.routes_said = Some(Instant::now());
            tracing::error!(
                others = %strangers.join(","),
                "processes with other routes (INPUT_CHANNEL, ROUTES, OUTPUT_STREAM) share this pool: they number messages otherwise, so messages can be lost or written twice; run one set of routes at a time"
            );
        }
    }

    /// Whether a stopping process is done: its readers stopped, its
    /// writer lanes written out (and given back), its copies covered; or
    /// TAKEOVER_AFTER + 2 s passed for copies another process should write.
    async fn finished(&mut self, readers_done: Instant) -> Result<bool, RedisError> {
        let writing = self
            .lanes
            .values()
            .any(|l| l.is_writer() && (!l.queue.is_empty() || !l.in_flight.is_empty()));
        if writing || !self.writes.is_empty() {
            return Ok(false);
        }
        let held: usize = self.lanes.values().map(|l| l.queue.len()).sum();
        if held > 0 && readers_done.elapsed() < self.config.takeover_after + Duration::from_secs(2)
        {
            return Ok(false);
        }
        if self.lanes.values().any(|l| l.is_writer()) {
            // Given back at the next cycle.
            return Ok(false);
        }
        if held > 0 {
            tracing::warn!(
                unsettled = held,
                "stopping with copies still held; their writer is expected to write them"
            );
            Counters::add(&self.counters.expired, held as u64);
            for lane in self.lanes.values_mut() {
                lane.queue.clear();
            }
        }
        Ok(true)
    }

    /// The budget is spent: copies another process writes go first, oldest
    /// first, from the lanes whose writer a recent cycle found alive, and
    /// only copies that writer has received too (published before the last
    /// mark it had seen); the lane can then no longer take over cleanly from
    /// before them. Other copies are kept (this process may have to write
    /// them), and the readers stop reading until writes free memory.
    ///
    /// Should nothing be shed that way for a while (each process holds, as a
    /// standby, copies its writer has not read, and each writer waits for
    /// memory: two streams written by two processes can do that to each
    /// other), copies of a live writer's lanes are shed regardless, oldest
    /// first, and that is said.
    fn shed(&mut self) {
        // MIN_REPLICAS_ACKED: first, half of the copies written and not yet
        // known on the replicas (oldest first): they are in the stream, and
        // only a failover before the replicas hold them needs them.
        let mut unprotected = 0u64;
        for lane in self.lanes.values_mut() {
            let n = lane.unconfirmed.len().div_ceil(2);
            lane.unconfirmed.drain(..n);
            unprotected += n as u64;
        }
        if unprotected > 0 {
            Counters::add(&self.counters.overflow, unprotected);
            if self.warnings.ready().is_some() {
                tracing::warn!(
                    shed = unprotected,
                    "memory budget spent (MEMORY_LIMIT): dropped copies written but not yet held by MIN_REPLICAS_ACKED replicas (a failover before they hold them loses them; see overflow)"
                );
            }
            return;
        }
        let mut shed = 0u64;
        let fresh = self.config.takeover_after * 2 + CYCLE_EVERY * 4;
        let stuck = self
            .shed_nothing_since
            .is_some_and(|at| at.elapsed() >= presumed_dead_after(self.config.takeover_after));
        for lane in self
            .lanes
            .values_mut()
            .filter(|l| !l.is_writer() && l.writer_live_at.is_some_and(|at| at.elapsed() < fresh))
        {
            // What the writer holds: from the mark it is whole since, up to
            // the last mark it has seen.
            let held_by_writer = match lane.queue.front().and_then(|q| q.m.position) {
                Some(front) if front.mark >= lane.writer_since || stuck => lane
                    .queue
                    .iter()
                    .take_while(|q| {
                        stuck || q.m.position.is_some_and(|p| p.mark < lane.writer_seen)
                    })
                    .count(),
                _ => 0,
            };
            let n = held_by_writer.min(lane.queue.len().div_ceil(2));
            for q in lane.queue.drain(..n) {
                if let Some(p) = q.m.position {
                    lane.shed_through = lane.shed_through.max(p.mark + 1);
                }
                shed += 1;
            }
        }
        if shed == 0 {
            self.shed_nothing_since.get_or_insert_with(Instant::now);
            return;
        }
        self.shed_nothing_since = None;
        Counters::add(&self.counters.overflow, shed);
        if self.warnings.ready().is_some() {
            if stuck {
                tracing::warn!(
                    shed,
                    "memory budget spent (MEMORY_LIMIT) with nothing the writers had received to drop: dropped copies they had not received yet (lost if their writer misses them; see overflow)"
                );
            } else {
                tracing::warn!(
                    shed,
                    "memory budget spent (MEMORY_LIMIT): dropped copies another process writes (see overflow)"
                );
            }
        }
    }

    fn report_pending(&mut self) {
        let pending: u64 = self.lanes.values().map(|l| l.queue.len() as u64).sum();
        if pending != self.reported_pending {
            Counters::add(&self.counters.pending, pending);
            Counters::sub(&self.counters.pending, self.reported_pending);
            self.reported_pending = pending;
        }
    }
}
