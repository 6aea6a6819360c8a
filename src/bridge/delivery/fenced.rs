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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::RedisError;
use rustc_hash::FxHashMap;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::budget::Budget;
use super::intake::Intake;
use super::members::{Beat, Cycle, Handoff, Rule, is_mixed};
use super::reader::ReaderBatch;
use super::{Lane, Message, Pool, Position, Trim, push_entry, scripts, target};
use super::{OutputFormat, Strategy};
use crate::connect::{Conn, brief, is_fatal, reconnect_backoff};
use crate::monitor::{Counters, Throttle};

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
    /// Where Redis is: a command connection that stops answering (its
    /// replies black-holed, the socket open) is replaced from it.
    pub endpoint: crate::connect::Endpoint,
}

/// Cycles in a row that time out before the command connection is taken
/// for dead and replaced (the connection manager reconnects when the
/// connection drops, not when its replies stop coming).
const TIMEOUTS_BEFORE_REPLACING: u32 = 2;

/// What becomes of a message in a lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Write it (to its stream, or as a dead letter when it is rejected).
    Write,
    /// Pass over it: its id was written within DEDUP_WINDOW (`reused`: with
    /// other bytes).
    Skip { reused: bool },
    /// Pass over it: neither stream takes it.
    GiveUp,
}

#[derive(Debug)]
struct Queued {
    m: Message,
    fate: Fate,
    /// Decided (dedup, give up) while it was in a write's span.
    decided: bool,
    /// Held as a standby before this process took the stream over.
    taken_over: bool,
}

/// A write on its way: how many queued messages (from the front, after the
/// writes before it) it covers, and the record's position after it.
#[derive(Debug)]
struct InFlight {
    id: u64,
    span: usize,
}

/// This process's part in one stream.
#[derive(Debug)]
enum Role {
    Standby,
    Writer { epoch: String },
}

/// A live process of the pool, as its last beat says.
#[derive(Debug, Clone, Copy)]
struct Member {
    /// Server time (ms) of its last beat.
    beat: u64,
    /// The last mark its readers delivered.
    seen: u64,
    /// The mark its sequence has been whole since (`u64::MAX`: it has no
    /// subscription now).
    since: u64,
    /// Its routes' fingerprint (0: not said).
    routes: u64,
}

/// The record of a stream, as the last cycle read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Record {
    epoch: Option<String>,
    owner: Option<String>,
    pos: Option<Position>,
    /// The position as the record holds it, when no mark of the pool can
    /// have made it (past the clock, or no position at all): see
    /// `Fenced::repair`.
    impossible: Option<String>,
}

struct LaneState {
    lane: Arc<Lane>,
    queue: VecDeque<Queued>,
    role: Role,
    /// Where this process knows the stream's record to be.
    pos: Option<Position>,
    /// When that position last moved.
    moved_at: Instant,
    in_flight: VecDeque<InFlight>,
    /// Trips (pipelines of writes) on their way.
    trips: usize,
    /// Answers of trips that ended before an earlier trip's.
    early: Vec<Vec<(u64, Result<WriteReply, RedisError>)>>,
    /// A write did not finish as asked: write again only once the record
    /// has been read (the next cycle) and every write on its way answered.
    resync: bool,
    /// The stream refused a message for good: (its position, the reason).
    refused: Option<(Position, String)>,
    retry_at: Option<Instant>,
    backoff: Option<Box<dyn Iterator<Item = Duration> + Send + Sync>>,
    /// When a cycle last found the stream's writer (another process) alive,
    /// and the last mark its readers had delivered then.
    writer_live_at: Option<Instant>,
    writer_seen: u64,
    /// The mark that writer's sequence was whole since then.
    writer_since: u64,
    /// The mark this process's sequence was whole since when it took the
    /// stream over (see the writer's hole in `decide`).
    taken_since: u64,
    /// Since when this process has wanted to take the stream over (it waits
    /// a little for a process without a hole).
    wanted_since: Option<Instant>,
    /// The lane lost copies (shed for memory) up to this mark: it cannot
    /// take over cleanly from before it.
    shed_through: u64,
    window: Window,
    /// The warning about reused ids, at most once a second per stream.
    reused: Throttle,
    last_active: Instant,
    /// The cycle that last read the record.
    asked_in: u64,
    /// Since when the record has held an impossible position.
    impossible_since: Option<Instant>,
    /// The handoff mark, when the pool was handed to this strategy: what
    /// came before it is the other strategy's, covered as if written.
    floor: u64,
}

impl LaneState {
    fn new(lane: Arc<Lane>, window: Window, cycle: u64) -> Self {
        Self {
            lane,
            queue: VecDeque::new(),
            role: Role::Standby,
            pos: None,
            moved_at: Instant::now(),
            in_flight: VecDeque::new(),
            trips: 0,
            early: Vec::new(),
            resync: false,
            refused: None,
            retry_at: None,
            backoff: None,
            wanted_since: None,
            writer_live_at: None,
            writer_seen: 0,
            writer_since: 0,
            taken_since: 0,
            shed_through: 0,
            window,
            reused: Throttle::default(),
            last_active: Instant::now(),
            // A new lane takes its turn after those waiting longer.
            asked_in: cycle,
            impossible_since: None,
            floor: 0,
        }
    }

    fn is_writer(&self) -> bool {
        matches!(self.role, Role::Writer { .. })
    }

    /// Where this writer's sequence has a hole after what it wrote, if it
    /// has one: the mark its sequence is whole since, when that is past the
    /// last position written and the sequence it took the stream over with.
    /// It writes nothing from there on.
    fn hole(&self, since: u64) -> Option<u64> {
        let covered = self
            .pos
            .map_or(0, |p| p.mark)
            .max(self.taken_since)
            .max(self.floor);
        (since != u64::MAX && since > covered).then_some(since)
    }

    /// The record's position is `pos` now. When it went back (Redis lost
    /// data), the ids seen after it are forgotten: their messages may be
    /// gone from the stream.
    fn record_at(&mut self, pos: Option<Position>) {
        if self.pos.is_some_and(|known| pos.is_none_or(|p| p < known)) {
            self.window.forget_after(pos);
            // Copies passed over as re-sends of what is gone are decided
            // again (nothing is on its way here).
            for q in self.queue.iter_mut() {
                if matches!(q.fate, Fate::Skip { .. }) {
                    q.fate = Fate::Write;
                    q.decided = false;
                }
            }
        }
        self.pos = pos;
        self.moved_at = Instant::now();
    }

    /// Queued messages not yet in a write.
    fn unsent(&self) -> usize {
        self.queue.len() - self.in_flight.iter().map(|w| w.span).sum::<usize>()
    }
}

/// The message ids a lane has seen within DEDUP_WINDOW (by publish time),
/// with the hash of their payloads: a message whose id is in it was sent
/// again (a publisher retrying), and is passed over.
#[derive(Debug)]
struct Window {
    length_ms: u64,
    /// Each id's hash, with the position it was first seen at and its
    /// payload's hash.
    ids: FxHashMap<u128, (Position, u64)>,
    /// The ids in the order they were seen, with that position.
    order: VecDeque<(Position, u128)>,
    /// Where the memory of the two is counted (MEMORY_LIMIT), and how much.
    budget: Option<Arc<Budget>>,
    charged: usize,
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.release(self.charged);
        }
    }
}

impl Window {
    fn new(length: Duration, budget: Option<Arc<Budget>>) -> Self {
        Self {
            length_ms: length.as_millis() as u64,
            ids: FxHashMap::default(),
            order: VecDeque::new(),
            budget,
            charged: 0,
        }
    }

    /// The memory the window takes: its tables' room (a hash table's slot
    /// and control byte; a deque's slot).
    fn bytes(&self) -> usize {
        self.ids.capacity() * (size_of::<(u128, (Position, u64))>() + 1)
            + self.order.capacity() * size_of::<(Position, u128)>()
    }

    /// Counts what the window takes now in the budget.
    fn charge(&mut self) {
        let Some(budget) = &self.budget else {
            return;
        };
        let now = self.bytes();
        if now > self.charged {
            budget.hold(now - self.charged);
        } else if now < self.charged {
            budget.release(self.charged - now);
        }
        self.charged = now;
    }

    fn key(m: &Message) -> Option<(u128, Position)> {
        // Ids made from positions never come twice.
        if !m.id_given || m.id.is_empty() {
            return None;
        }
        let position = m.position.unwrap_or(Position { mark: 0, seq: 0 });
        Some((xxhash_rust::xxh3::xxh3_128(m.id.as_bytes()), position))
    }

    /// Whether `m`'s id was seen within the window: `Some(reused)` (reused:
    /// with other bytes) if so. Remembers it either way.
    fn seen(&mut self, m: &Message) -> Option<bool> {
        if self.length_ms == 0 {
            return None;
        }
        let (key, position) = Self::key(m)?;
        self.expire(position.published_ms());
        // Remembered from its first sighting: an id that keeps coming back
        // is forgotten a window after it was first seen.
        if let Some(&(_, hash)) = self.ids.get(&key) {
            return Some(hash != m.hash);
        }
        self.ids.insert(key, (position, m.hash));
        self.order.push_back((position, key));
        self.charge();
        None
    }

    /// Forgets the ids seen longer than the window before `now_ms` (server
    /// time), and gives back the memory of a window that shrank.
    fn expire(&mut self, now_ms: u64) {
        while let Some(&(at, old)) = self.order.front() {
            if at.published_ms() + self.length_ms >= now_ms {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&old);
        }
        if self.ids.capacity() > 1024 && self.ids.len() < self.ids.capacity() / 4 {
            self.ids.shrink_to(self.ids.len() * 2);
            self.order.shrink_to(self.order.len() * 2);
        }
        self.charge();
    }

    /// Forgets the ids first seen after `pos` (all of them for `None`): the
    /// stream's record went back there (Redis lost data: a restart without
    /// persistence, an older snapshot), so those messages may be gone from
    /// the stream, and a copy sent again must be written.
    fn forget_after(&mut self, pos: Option<Position>) {
        let kept = |p: &Position| pos.is_some_and(|pos| *p <= pos);
        self.ids.retain(|_, (p, _)| kept(p));
        self.order.retain(|(p, _)| kept(p));
        self.charge();
    }
}

/// What the write script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteReply {
    /// Another process holds the record now.
    Fenced { pos: Option<Position> },
    /// The record is not where the write started.
    Elsewhere,
    /// All written.
    Done,
    /// All written, into a stream made anew: it was missing though the
    /// record held a position (deleted, or lost with Redis's data).
    DoneAnew,
    /// Part written, then a refusal that passes.
    Stopped { reason: String },
    /// The first `n` written, then the stream refused the next for good.
    Refused { n: usize, reason: String },
}

/// A pipeline's answers: its stream, and each write's id and answer.
type WriteAnswers = (Box<str>, Vec<(u64, Result<WriteReply, RedisError>)>);

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
    next_write: u64,
    reported_pending: u64,
    warnings: Throttle,
    /// When the routes' mismatch was last said (every 30 s at most).
    routes_said: Option<Instant>,
    /// Since when this process's member entry has been there: it counts
    /// itself the most complete process only once the others have had
    /// TAKEOVER_AFTER to beat too.
    member_since: Option<Instant>,
    /// Since when the budget has been spent with nothing to shed.
    shed_nothing_since: Option<Instant>,
    /// The pool's strategy handoff, as the last cycle read it.
    handoff: Option<Handoff>,
    /// The handoff changed and some lanes (with writes on their way) still
    /// hold copies that are the other strategy's.
    unpurged: bool,
    /// Cycles in a row that timed out.
    timeouts: u32,
}

impl Fenced {
    pub fn new(
        config: FencedConfig,
        conn: Conn,
        counters: Arc<Counters>,
        budget: Arc<Budget>,
        intake: Intake,
    ) -> Self {
        Self {
            config,
            conn,
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
            member_since: None,
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
                batch = batches.recv(), if readers_done.is_none() => match batch {
                    Some(batch) => self.on_batch(batch),
                    None => readers_done = Some(Instant::now()),
                },
                _ = tick.tick() => self.cycle(false).await?,
            }
            if self.budget.pressed() {
                self.shed();
            } else {
                self.shed_nothing_since = None;
            }
            self.start_writes().await;
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
                    LaneState::new(m.lane.clone(), window, self.cycles)
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
                lane.backoff = None;
                lane.retry_at = None;
            }
            Ok(WriteReply::Fenced { pos }) => {
                tracing::info!(stream = %stream, "another process writes this stream now (fenced): keeping the copies as a standby");
                lane.role = Role::Standby;
                lane.resync = false;
                lane.in_flight.clear();
                lane.refused = None;
                if let Some(pos) = pos {
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
            .filter(|(_, l)| !l.queue.is_empty() || l.is_writer())
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
        };
        let reply = match beat.cycle(&mut self.conn, &records, leaving).await {
            Ok(reply) => reply,
            Err(err) if is_fatal(&err) || is_mixed(&err).is_some() => return Err(err),
            Err(err) => {
                Counters::add(&self.counters.redis_errors, 1);
                tracing::debug!(cause = %brief(&err), "cycle failed; trying again next time");
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
        } = reply;
        self.take_handoff(handoff);
        // A new entry (first cycle, or the members were lost with Redis's
        // data): the others' entries may not be back yet.
        if new || self.member_since.is_none() {
            self.member_since = Some(Instant::now());
        }
        let members: HashMap<&str, Member> = members
            .chunks(2)
            .filter_map(|pair| {
                let mut parts = pair.get(1)?.split(':');
                let mut next = || parts.next().and_then(|v| v.parse().ok());
                let member = Member {
                    beat: next()?,
                    seen: next()?,
                    since: next().unwrap_or(0),
                    routes: next().unwrap_or(0),
                };
                Some((pair[0].as_str(), member))
            })
            .collect();
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
        for (stream, (epoch, owner, pos)) in asked.iter().zip(records) {
            let decoded = pos.as_deref().and_then(Position::decode);
            // The cycle's mark is above every mark published before it: a
            // position past it was made of no mark of the pool.
            let impossible = pos.filter(|_| decoded.is_none_or(|p| p.mark > mark));
            let record = Record {
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
            self.decide(stream, record, now, &members).await?;
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
            let horizon = lane
                .queue
                .front()
                .and_then(|q| q.m.position)
                .map_or(now, |p| p.published_ms().min(now));
            lane.window.expire(horizon);
            let queue = &mut lane.queue;
            if queue.capacity() > 1024 && queue.len() < queue.capacity() / 4 {
                queue.shrink_to(queue.len() * 2);
            }
        }
        self.lanes.retain(|_, l| {
            !l.queue.is_empty()
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

    /// What a lane does with its record.
    async fn decide(
        &mut self,
        stream: &str,
        record: Record,
        now_ms: u64,
        members: &HashMap<&str, Member>,
    ) -> Result<(), RedisError> {
        let takeover_ms = self.config.takeover_after.as_millis() as u64;
        let seen = self.intake.seen();
        let since = self.intake.continuous_since();
        let lane = self.lanes.get_mut(stream).expect("a lane");
        if let Role::Writer { epoch } = &lane.role {
            if record.epoch.as_deref() != Some(epoch.as_str()) {
                match &record.epoch {
                    None => {
                        tracing::warn!(stream = %stream, record = %lane.lane.keys.writer, "the stream's writer record is gone (deleted, or lost with Redis's data): keeping the copies as a standby until a writer takes the stream again")
                    }
                    Some(_) => {
                        tracing::info!(stream = %stream, "another process writes this stream now (fenced): keeping the copies as a standby")
                    }
                }
                lane.role = Role::Standby;
                lane.resync = false;
                lane.in_flight.clear();
                lane.refused = None;
            } else {
                if lane.resync && lane.in_flight.is_empty() {
                    if let Some(pos) = record.pos {
                        let covered = lane
                            .queue
                            .iter()
                            .take_while(|q| q.m.position.is_some_and(|p| p <= pos))
                            .count();
                        pop(lane, covered, &self.counters);
                        lane.record_at(Some(pos));
                    }
                    // The refused message is the first after the record's
                    // position that the write carried: re-sent copies passed
                    // over (never in a write) may come before it.
                    if let Some((position, reason)) = lane.refused.take()
                        && let Some(front) = lane
                            .queue
                            .iter_mut()
                            .find(|q| !matches!(q.fate, Fate::Skip { .. }))
                        && front.m.position == Some(position)
                    {
                        if front.m.rejected.is_none() {
                            front.m.rejected = Some(format!("the stream refused it: {reason}"));
                        } else {
                            front.fate = Fate::GiveUp;
                            tracing::error!(stream = %stream, message_id = %front.m.id, reason = %front.m.rejected.as_deref().unwrap_or(""), dead_letter_refusal = %reason, "neither the stream nor the dead-letter stream took the message: given up (see refused)");
                        }
                    }
                    lane.resync = false;
                }
                let idle = lane.queue.is_empty() && lane.in_flight.is_empty();
                let readers_gone = !self.intake.any_connected();
                // Its sequence has a hole after what it wrote (every reader
                // was lost at once, and one is back): messages in the hole
                // may be in other processes' hands, and writing on past it
                // would let the record pass them. Once it has written what
                // it holds from before the hole, it gives the stream back;
                // the most complete process takes it.
                let hole = lane.hole(since).is_some_and(|h| {
                    lane.in_flight.is_empty()
                        && lane
                            .queue
                            .front()
                            .is_none_or(|q| q.m.position.is_none_or(|p| p.mark >= h))
                });
                if hole {
                    tracing::info!(stream = %stream, "this process missed messages after the last it wrote (all its subscriptions were lost): giving the stream back");
                }
                if hole || idle && (readers_gone || lane.last_active.elapsed() >= QUIET_RELEASE) {
                    let Role::Writer { epoch } = &lane.role else {
                        unreachable!()
                    };
                    let mut cmd = scripts::evalsha(scripts::RELEASE, &[&lane.lane.keys.writer]);
                    cmd.arg(epoch);
                    let released: Result<u64, RedisError> = scripts::run(&mut self.conn, cmd).await;
                    match released {
                        Ok(_) => {
                            tracing::debug!(stream = %stream, "gave the stream back");
                            lane.role = Role::Standby;
                        }
                        Err(err) if is_fatal(&err) => return Err(err),
                        Err(_) => {}
                    }
                }
                return Ok(());
            }
        }
        // A standby.
        if let Some(pos) = record.pos {
            cover(lane, pos, &self.counters);
        }
        if record.pos != lane.pos {
            lane.record_at(record.pos);
        }
        // (A record naming this process is not a live writer: nobody writes
        // with it.)
        let live = record
            .owner
            .as_deref()
            .filter(|o| *o != self.config.member)
            .and_then(|o| members.get(o))
            .filter(|m| now_ms.saturating_sub(m.beat) <= takeover_ms);
        match live {
            Some(m) => {
                lane.writer_live_at = Some(Instant::now());
                lane.writer_seen = m.seen;
                lane.writer_since = m.since;
            }
            None => lane.writer_live_at = None,
        }
        let Some(front) = lane.queue.front() else {
            lane.wanted_since = None;
            return Ok(());
        };
        let waiting = front.m.received_at.elapsed();
        let owner = record
            .owner
            .as_deref()
            .and_then(|o| members.get(o).map(|m| (o, *m)));
        let why = match (&record.epoch, record.owner.as_deref(), owner) {
            (None, _, _) | (_, None, _) => Some("the stream has no writer"),
            // An older record came back (a snapshot restored): it names this
            // process, which no longer writes with that epoch.
            (_, Some(o), _) if o == self.config.member => {
                Some("the record names this process, which is not writing")
            }
            (_, Some(_), None) => Some("its writer is gone"),
            (_, Some(_), Some((_, m))) if now_ms.saturating_sub(m.beat) > takeover_ms => {
                Some("its writer fell silent")
            }
            (_, Some(_), Some((_, m)))
                if waiting > self.config.takeover_after
                    && seen.saturating_sub(m.seen) > takeover_ms * 1024 =>
            {
                Some("its writer stopped receiving")
            }
            _ if waiting > stuck_after(self.config.takeover_after)
                && lane.moved_at.elapsed() > stuck_after(self.config.takeover_after) =>
            {
                Some("its writer is stuck")
            }
            _ => None,
        };
        let Some(why) = why else {
            lane.wanted_since = None;
            return Ok(());
        };
        // A writer that lives on (it beats) is replaced only by a process
        // without a hole from the record's position on: else the record
        // would pass messages that only the writer holds.
        let lives_on = matches!(why, "its writer stopped receiving" | "its writer is stuck");
        // A process without a subscription takes nothing over.
        if since == u64::MAX {
            lane.wanted_since = None;
            return Ok(());
        }
        // Without a hole from the record's position on, take it at once.
        // Else the most complete live process (whole since the earliest
        // mark) takes it; the others give it time to.
        // (Handed to this strategy, everything before H is the other's.)
        let covered = record
            .pos
            .map(|p| p.mark)
            .max((lane.floor > 0).then_some(lane.floor));
        let clean = covered.is_some_and(|c| since.max(lane.shed_through) <= c);
        let me = (since.max(lane.shed_through), self.config.member.as_str());
        let settled = self
            .member_since
            .is_some_and(|at| at.elapsed() >= self.config.takeover_after);
        let best = settled
            && members.iter().all(|(name, m)| {
                *name == me.1
                    || now_ms.saturating_sub(m.beat) > takeover_ms
                    || m.since == u64::MAX
                    || (m.since, *name) > me
            });
        // A writer silent for a moment may be only paused (a starved host,
        // a stop): it holds the messages after the record's position, and a
        // takeover that passes over them would lose them. Only a writer gone
        // from the members, or silent for longer, is passed over.
        // (A record naming this process is an older one come back: nobody
        // writes with it.)
        let dead_ms = presumed_dead_after(self.config.takeover_after).as_millis() as u64;
        let presumed_dead = owner.is_none_or(|(name, m)| {
            name == self.config.member || now_ms.saturating_sub(m.beat) > dead_ms
        });
        let wanted_since = *lane.wanted_since.get_or_insert_with(Instant::now);
        if !clean
            && (lives_on
                || !presumed_dead
                || !best && wanted_since.elapsed() < self.config.takeover_after * 2)
        {
            return Ok(());
        }
        let taken = take_over(
            &mut self.conn,
            &lane.lane,
            record.epoch.as_deref(),
            &self.config.member,
        )
        .await;
        match taken {
            Ok(Takeover::Taken { epoch, pos }) => {
                if record.epoch.is_some() {
                    tracing::info!(stream = %stream, previous = %record.owner.as_deref().unwrap_or("-"), reason = why, clean, "took the stream over");
                } else {
                    // A stream new to the pool (many, under a template route).
                    tracing::debug!(stream = %stream, "writing a new stream");
                }
                lane.role = Role::Writer { epoch };
                lane.taken_since = since;
                lane.wanted_since = None;
                lane.resync = false;
                lane.in_flight.clear();
                lane.refused = None;
                if let Some(pos) = pos {
                    cover(lane, pos, &self.counters);
                }
                lane.pos = pos;
                lane.moved_at = Instant::now();
                // Copies held for another writer (not a free stream's).
                if record.owner.is_some() {
                    for q in lane.queue.iter_mut() {
                        q.taken_over = true;
                    }
                }
            }
            Ok(_) => {}
            Err(err) if is_fatal(&err) => return Err(err),
            Err(err) => {
                Counters::add(&self.counters.redis_errors, 1);
                tracing::debug!(cause = %brief(&err), "takeover failed; trying again next cycle");
            }
        }
        Ok(())
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

/// The next write of a writer's lane: its command, and how many queued
/// messages it covers (from the first not yet in a write). Each message's
/// fate is decided once, in order: one whose id the lane saw within
/// DEDUP_WINDOW is passed over.
fn write_command(
    lane: &mut LaneState,
    batch_size: usize,
    consumer: &str,
    stop_at: Option<u64>,
) -> Option<(redis::Cmd, usize)> {
    let Role::Writer { epoch } = &lane.role else {
        return None;
    };
    let start = lane.queue.len() - lane.unsent();
    // The record's position before this write: after the writes on their
    // way, or where it is.
    let prev = match start {
        0 => lane.pos,
        _ => lane.queue[start - 1].m.position,
    };
    let mut span = 0;
    let mut entries = 0;
    for q in lane.queue.iter_mut().skip(start) {
        if entries >= batch_size
            || stop_at.is_some_and(|h| q.m.position.is_some_and(|p| p.mark >= h))
        {
            break;
        }
        if !q.decided {
            q.decided = true;
            if q.fate == Fate::Write
                && q.m.rejected.is_none()
                && let Some(reused) = lane.window.seen(&q.m)
            {
                q.fate = Fate::Skip { reused };
            }
        }
        span += 1;
        if !matches!(q.fate, Fate::Skip { .. }) {
            entries += 1;
        }
    }
    if span == 0 {
        return None;
    }
    let last = lane.queue[start + span - 1].m.position;
    let items = lane
        .queue
        .iter()
        .skip(start)
        .take(span)
        .filter_map(|q| match q.fate {
            Fate::Skip { .. } => None,
            Fate::GiveUp => Some((&q.m, 0)),
            Fate::Write => Some((&q.m, target(&q.m))),
        });
    let cmd = write_cmd(&lane.lane, epoch, prev, last, items, consumer);
    Some((cmd, span))
}

/// How long a writer may leave the position unmoved, with copies waiting,
/// before it counts as stuck.
fn stuck_after(takeover_after: Duration) -> Duration {
    (takeover_after * 20).max(Duration::from_secs(5))
}

/// How long a writer must have been silent before a process that lacks some
/// of the messages after the record's position takes its stream over (and
/// passes over what it lacks): long enough that a writer only paused (a
/// starved host) is not taken for dead.
fn presumed_dead_after(takeover_after: Duration) -> Duration {
    (takeover_after * 8).max(Duration::from_secs(2))
}

/// The next wait of a lane's backoff.
fn back_off(lane: &mut LaneState) -> Duration {
    let wait = lane
        .backoff
        .get_or_insert_with(|| Box::new(reconnect_backoff()))
        .next()
        .unwrap_or(crate::connect::MAX_BACKOFF);
    lane.retry_at = Some(Instant::now() + wait);
    wait
}

/// Takes the first `n` queued messages off a writer's lane, counting each
/// by its fate.
fn pop(lane: &mut LaneState, n: usize, counters: &Counters) {
    for q in lane.queue.drain(..n.min(lane.queue.len())) {
        match q.fate {
            Fate::Write => {
                if q.m.rejected.is_some() {
                    tracing::warn!(stream = %lane.lane.stream(), message_id = %q.m.id, reason = %q.m.rejected.as_deref().unwrap_or(""), "message dead-lettered");
                    Counters::add(&counters.dead_lettered, 1);
                } else {
                    Counters::add(&counters.written, 1);
                }
                if q.taken_over {
                    Counters::add(&counters.taken_over, 1);
                }
            }
            Fate::Skip { reused } => {
                Counters::add(&counters.duplicates_skipped, 1);
                if reused {
                    Counters::add(&counters.reused_ids, 1);
                    if let Some(held_back) = lane.reused.ready() {
                        tracing::warn!(stream = %lane.lane.stream(), message_id = %q.m.id, held_back, "a message with this id was already written with other bytes: skipped (a publisher is reusing ids; see reused_ids)");
                    }
                }
            }
            Fate::GiveUp => Counters::add(&counters.refused, 1),
        }
    }
}

/// Drops a standby's copies the record's position passes (another process
/// wrote them), remembering their ids.
fn cover(lane: &mut LaneState, pos: Position, counters: &Counters) {
    let mut covered = 0;
    while let Some(front) = lane.queue.front() {
        if front.m.position.is_none_or(|p| p > pos) {
            break;
        }
        let q = lane.queue.pop_front().expect("a front");
        lane.window.seen(&q.m);
        covered += 1;
    }
    Counters::add(&counters.duplicates_skipped, covered);
}

fn decode_write(value: redis::Value) -> Result<WriteReply, RedisError> {
    let bad = || RedisError::from((redis::ErrorKind::UnexpectedReturnType, "write reply"));
    let redis::Value::Array(items) = value else {
        return Err(bad());
    };
    let code: u8 = redis::from_redis_value(items.first().cloned().ok_or_else(bad)?)?;
    let text = |i: usize| -> Option<String> {
        items
            .get(i)
            .cloned()
            .and_then(|v| redis::from_redis_value::<Option<String>>(v).ok().flatten())
    };
    let n = || -> usize {
        items
            .get(1)
            .cloned()
            .and_then(|v| redis::from_redis_value(v).ok())
            .unwrap_or(0)
    };
    Ok(match code {
        0 => WriteReply::Fenced {
            pos: text(2).as_deref().and_then(Position::decode),
        },
        1 => WriteReply::Elsewhere,
        2 => WriteReply::Done,
        5 => WriteReply::DoneAnew,
        3 => WriteReply::Stopped {
            reason: text(2).unwrap_or_default(),
        },
        _ => WriteReply::Refused {
            n: n(),
            reason: text(2).unwrap_or_default(),
        },
    })
}

/// What [`take_over`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Takeover {
    /// This process writes the stream now, with this epoch, from this
    /// position (`None`: the stream has no record of one).
    Taken {
        epoch: String,
        pos: Option<Position>,
    },
    /// The record no longer held the epoch seen: another process was
    /// quicker.
    Lost {
        epoch: Option<String>,
        owner: Option<String>,
        pos: Option<Position>,
    },
}

/// Becomes the writer of `lane`'s stream, fencing the writer before, if the
/// record still holds `seen_epoch` (`None`: there was no record).
pub async fn take_over(
    conn: &mut Conn,
    lane: &Lane,
    seen_epoch: Option<&str>,
    member: &str,
) -> Result<Takeover, RedisError> {
    let mut cmd = scripts::evalsha(scripts::TAKEOVER, &[&lane.keys.writer]);
    cmd.arg(seen_epoch.unwrap_or("")).arg(member);
    let value: redis::Value = scripts::run(conn, cmd).await?;
    let redis::Value::Array(items) = value else {
        return Err(RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "takeover reply",
        )));
    };
    let text = |i: usize| -> Option<String> {
        items
            .get(i)
            .cloned()
            .and_then(|v| redis::from_redis_value::<Option<String>>(v).ok().flatten())
    };
    let code: u8 = items
        .first()
        .cloned()
        .map(redis::from_redis_value)
        .transpose()?
        .unwrap_or(0);
    let position = |i: usize| text(i).as_deref().and_then(Position::decode);
    Ok(match (code, text(1)) {
        (1, Some(epoch)) => Takeover::Taken {
            epoch,
            pos: position(2),
        },
        _ => Takeover::Lost {
            epoch: text(1),
            owner: text(2).filter(|o| !o.is_empty()),
            pos: position(3),
        },
    })
}

/// `write.lua`'s command: as `member`, the writer of epoch `epoch`, from
/// the record's position `prev` to `last`, the `items` in order, each with
/// its target (0: passed over, recorded only; 1: the stream; 2: the
/// dead-letter stream). Entries name `member` as their consumer; an
/// envelope entry goes as its id and payload alone (the script adds the
/// field names).
pub fn write_cmd<'a>(
    lane: &Lane,
    epoch: &str,
    prev: Option<Position>,
    last: Option<Position>,
    items: impl IntoIterator<Item = (&'a Message, u8)>,
    member: &str,
) -> redis::Cmd {
    let encode = |p: Option<Position>| p.map(|p| p.encode()).unwrap_or_default();
    let mut cmd = scripts::evalsha(
        scripts::WRITE,
        &[
            &lane.keys.writer,
            lane.stream(),
            &lane.to.dead_stream,
            &lane.keys.handoff,
        ],
    );
    let (kind, op, limit) = Trim::args(lane.trim);
    cmd.arg(epoch)
        .arg(encode(prev))
        .arg(encode(last))
        .arg(member)
        .arg(kind)
        .arg(op)
        .arg(limit);
    for (m, to) in items {
        cmd.arg(encode(m.position));
        match to {
            0 => {
                cmd.arg(0);
            }
            1 if m.lane.to.format == OutputFormat::Envelope => {
                cmd.arg(1).arg(&m.id).arg(m.payload.as_ref());
            }
            1 => {
                cmd.arg(2);
                push_entry(&mut cmd, m, member);
            }
            _ => {
                cmd.arg(3);
                push_entry(&mut cmd, m, member);
            }
        }
    }
    cmd
}

/// One fenced write of `messages` (in their order, each to its target), as
/// `member`, the writer of epoch `epoch`, starting after the record's
/// position `prev`. (The loop writes through its lanes; the protocol tests
/// drive this one by hand.)
#[cfg(test)]
pub async fn write(
    conn: &mut Conn,
    member: &str,
    epoch: &str,
    prev: Option<Position>,
    messages: &[&Message],
) -> Result<WriteReply, RedisError> {
    let Some(first) = messages.first() else {
        return Ok(WriteReply::Done);
    };
    let last = messages.last().and_then(|m| m.position);
    let cmd = write_cmd(
        &first.lane,
        epoch,
        prev,
        last,
        messages.iter().map(|m| (*m, target(m))),
        member,
    );
    scripts::run::<redis::Value, _>(conn, cmd)
        .await
        .and_then(decode_write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::delivery::Destination;

    #[test]
    fn a_window_knows_ids_sent_again_and_forgets_old_ones() {
        let lane = Arc::new(Lane::new(Destination::new("s", "c"), None));
        let message = |id: &str, payload: &str, ms: u64| {
            let mut m = Message::with_id(id, payload.as_bytes().to_vec(), lane.clone());
            m.position = Some(Position {
                mark: ms << 10,
                seq: 1,
            });
            m
        };
        let mut window = Window::new(Duration::from_secs(5), None);
        assert_eq!(window.seen(&message("a", "x", 1000)), None);
        assert_eq!(
            window.seen(&message("a", "x", 2000)),
            Some(false),
            "the same bytes again"
        );
        assert_eq!(
            window.seen(&message("a", "y", 3000)),
            Some(true),
            "other bytes"
        );
        assert_eq!(window.seen(&message("b", "x", 3000)), None);
        // Long after: forgotten.
        assert_eq!(window.seen(&message("b", "x", 9000)), None);
        // Ids made from positions are never remembered.
        let mut p = message("p:1:1", "x", 9000);
        p.id_given = false;
        assert_eq!(window.seen(&p), None);
        assert_eq!(window.seen(&p), None);
    }

    #[test]
    fn a_window_forgets_what_came_after_a_record_that_went_back() {
        let lane = Arc::new(Lane::new(Destination::new("s", "c"), None));
        let message = |id: &str, ms: u64| {
            let mut m = Message::with_id(id, b"x".to_vec(), lane.clone());
            m.position = Some(Position {
                mark: ms << 10,
                seq: 1,
            });
            m
        };
        let mut window = Window::new(Duration::from_secs(5), None);
        for (id, ms) in [("a", 1000), ("b", 2000), ("c", 3000)] {
            assert_eq!(window.seen(&message(id, ms)), None);
        }
        // The record went back to b's position: c may be gone from the
        // stream, a and b are there.
        window.forget_after(message("b", 2000).position);
        assert_eq!(window.seen(&message("a", 3500)), Some(false));
        assert_eq!(window.seen(&message("b", 3500)), Some(false));
        assert_eq!(window.seen(&message("c", 3500)), None, "c again is new");
        // A record lost altogether: everything is new.
        window.forget_after(None);
        assert_eq!(window.seen(&message("a", 3600)), None);
    }
}
