//! One worker's loop for the `partitioned` strategy (the rules are in
//! [`super::partition`]):
//!
//! - a message this worker owns is written in the next batch, with no lock;
//! - a copy another worker owns is kept in the *segment* (the stretch between
//!   two of this worker's marks) it arrived in, and dropped once that owner's
//!   watermark covers the segment;
//! - a copy not covered TAKEOVER_AFTER after its segment closed is taken
//!   over, unless its owner's watermark is still moving towards it (an owner
//!   that is behind, not gone); even then no later than PENDING_RETENTION −
//!   TAKEOVER_AFTER after it arrived;
//! - every [`CYCLE_EVERY`], one script renews the membership, stores this
//!   worker's watermark, publishes a mark and reads the owners' watermarks.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::RedisError;
use tokio::sync::mpsc;

use super::delivery::{Delivery, Next, Warnings, tally};
use super::message::{Incoming, Item};
use super::partition::{Progress, View, Watermark};
use crate::connect::{is_fatal, reconnect_backoff};
use crate::monitor::Counters;

/// Time between two cycles (membership, mark, watermarks) of a worker.
pub const CYCLE_EVERY: Duration = Duration::from_millis(50);

/// What the loop needs besides its queue.
pub struct PartitionedWorker {
    pub id: String,
    pub delivery: Delivery,
    pub counters: Arc<Counters>,
    pub batch_size: usize,
    /// How long a copy waits for a silent owner (TAKEOVER_AFTER).
    pub takeover_after: Duration,
    pub retention: Duration,
    /// How long a membership lasts without renewal (PRESENCE_TTL).
    pub membership_ttl: Duration,
    pub warnings: Warnings,
}

/// What a write left for later: messages Redis did not take for a reason
/// that passes (out of memory, no replicas, …), and that reason.
#[derive(Debug, Default)]
struct Leftover {
    messages: Vec<Incoming>,
    why: Option<String>,
}

/// A copy of a message another worker owns.
#[derive(Debug)]
struct Copy {
    /// Index of the owner in its segment's view (`None`: the view was empty).
    owner: Option<u32>,
    msg: Incoming,
}

/// The copies received between two marks.
#[derive(Debug)]
struct Segment {
    /// Clock values between which these messages were published; `None`
    /// where no mark bounds the segment (the start of a subscription, or its
    /// end when the connection was lost).
    lo: Option<u64>,
    hi: Option<u64>,
    /// The view the copies' owners were picked with.
    view: Arc<View>,
    closed_at: Instant,
    copies: Vec<Copy>,
}

impl Segment {
    fn open(lo: Option<u64>, view: Arc<View>) -> Self {
        Self {
            lo,
            hi: None,
            view,
            closed_at: Instant::now(),
            copies: Vec::new(),
        }
    }
}

/// An owner's progress as last read, and when its beat last moved.
#[derive(Debug, Clone, Copy)]
struct Known {
    progress: Progress,
    beat_at: Instant,
    /// This worker's cycles since the owner's beat last moved.
    still_for: u32,
}

impl Known {
    fn new(progress: Progress, now: Instant) -> Self {
        Self {
            progress,
            beat_at: now,
            still_for: 0,
        }
    }

    /// Whether the owner is silent: its beat has not moved for
    /// `takeover_after`, nor over [`STILL_CYCLES`] of this worker's cycles (so
    /// that a machine too busy to run cycles on time does not make every
    /// owner look dead).
    fn silent(&self, now: Instant, takeover_after: Duration) -> bool {
        self.still_for >= STILL_CYCLES && now.duration_since(self.beat_at) >= takeover_after
    }
}

/// See [`Known::silent`].
const STILL_CYCLES: u32 = 5;

/// What a held copy's owner means for it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Written by its owner: drop the copy.
    Covered,
    /// Keep waiting.
    Wait,
    /// Write it ourselves (if nobody has).
    TakeOver,
}

/// The loop's state.
struct State {
    /// The view messages arriving now are assigned with.
    view: Arc<View>,
    /// This worker's index in `view`.
    me: Option<usize>,
    /// The view the last cycle returned; it takes effect at the next mark.
    latest: Arc<View>,
    open: Segment,
    held: VecDeque<Segment>,
    /// Messages this worker owns, not yet written.
    owned: Vec<Incoming>,
    /// Since which mark this worker has been subscribed without a break, with
    /// the same view and no overflow.
    range_from: Option<u64>,
    /// What this worker's cycles store as its watermark.
    watermark: Option<Watermark>,
    /// This worker's cycles so far.
    beat: u64,
    known: HashMap<String, Known>,
    /// Whether this worker has left the membership (stopping).
    left: bool,
}

impl State {
    fn new() -> Self {
        let empty = Arc::new(View::new(Vec::new()));
        Self {
            view: empty.clone(),
            me: None,
            latest: empty.clone(),
            open: Segment::open(None, empty),
            held: VecDeque::new(),
            owned: Vec::new(),
            range_from: None,
            watermark: None,
            beat: 0,
            known: HashMap::new(),
            left: false,
        }
    }

    fn held_copies(&self) -> usize {
        self.held.iter().map(|s| s.copies.len()).sum::<usize>() + self.open.copies.len()
    }

    fn switch_view(&mut self, id: &str) {
        self.view = self.latest.clone();
        self.me = self.view.index_of(id);
        self.open.view = self.view.clone();
    }

    /// Closes the open segment (at a mark, or unbounded when `hi` is None)
    /// and opens the next one from `hi`.
    fn close_segment(&mut self, hi: Option<u64>) {
        let next = Segment::open(hi, self.view.clone());
        let mut segment = std::mem::replace(&mut self.open, next);
        segment.hi = hi;
        segment.closed_at = Instant::now();
        if !segment.copies.is_empty() {
            self.held.push_back(segment);
        }
    }
}

impl PartitionedWorker {
    /// Runs until the queue is closed (the subscription stopped) and every
    /// copy in hand is settled, or until TAKEOVER_AFTER + 1 s after the close,
    /// whichever is first; then leaves the membership. Returns an error only
    /// for a fatal Redis error.
    pub async fn run(mut self, mut queue: mpsc::Receiver<Item>) -> Result<(), RedisError> {
        let mut st = State::new();
        let mut tick = tokio::time::interval(CYCLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut items: Vec<Item> = Vec::new();
        let mut closed_at: Option<Instant> = None;
        let mut reported_pending = 0usize;

        loop {
            let limit = (self.batch_size * st.view.members.len().max(1)).min(20_000);
            if closed_at.is_none() {
                tokio::select! {
                    biased;
                    _ = tick.tick() => self.cycle(&mut st).await?,
                    n = queue.recv_many(&mut items, limit) => {
                        if n == 0 {
                            closed_at = Some(Instant::now());
                            // No mark will close the last segment now.
                            if !st.open.copies.is_empty() {
                                st.close_segment(None);
                            }
                        }
                    }
                }
            } else {
                tick.tick().await;
                self.cycle(&mut st).await?;
            }
            let deadline = closed_at.map(|at| at + self.takeover_after + Duration::from_secs(1));
            for item in items.drain(..) {
                self.handle(&mut st, item, deadline).await?;
            }
            self.flush_owned(&mut st, deadline).await?;

            let pending = st.held_copies() + st.owned.len();
            if pending != reported_pending {
                Counters::add(&self.counters.pending, pending as u64);
                Counters::sub(&self.counters.pending, reported_pending as u64);
                reported_pending = pending;
            }
            if let Some(deadline) = deadline {
                let late = Instant::now() >= deadline;
                if pending == 0 || late {
                    if late && pending > 0 {
                        // Their owners may be stopping too (a whole process
                        // shutting down): take them over rather than leave
                        // them to no one. The ACK check makes a second
                        // write of any of them a no-op.
                        let rest: Vec<Incoming> = st
                            .held
                            .drain(..)
                            .flat_map(|segment| segment.copies.into_iter().map(|c| c.msg))
                            .chain(st.owned.drain(..))
                            .collect();
                        let mut unsettled = 0;
                        for chunk in rest.chunks(self.batch_size) {
                            match self.write(chunk, true).await {
                                Ok(left) => unsettled += left.messages.len(),
                                Err(err) => {
                                    tracing::debug!(worker = %self.id, cause = %crate::connect::brief(&err), "last takeover failed");
                                    unsettled += chunk.len();
                                }
                            }
                        }
                        if unsettled > 0 {
                            tracing::warn!(worker = %self.id, unsettled, "stopping with copies Redis did not take; their owners are expected to write them");
                        }
                        Counters::sub(&self.counters.pending, reported_pending as u64);
                    }
                    st.left = true;
                    if let Err(err) = self.cycle(&mut st).await {
                        tracing::debug!(worker = %self.id, cause = %crate::connect::brief(&err), "could not leave the membership; it lapses by itself");
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Takes one item off the queue.
    async fn handle(
        &mut self,
        st: &mut State,
        item: Item,
        deadline: Option<Instant>,
    ) -> Result<(), RedisError> {
        match item {
            Item::Message(msg) => {
                let owner = st.view.owner(msg.hash);
                if owner.is_some() && owner == st.me {
                    st.owned.push(msg);
                    if st.owned.len() >= self.batch_size {
                        self.flush_owned(st, deadline).await?;
                    }
                } else {
                    st.open.copies.push(Copy {
                        owner: owner.map(|o| o as u32),
                        msg,
                    });
                }
            }
            Item::Mark { clock, overflowed } => {
                // Everything owned from before the mark is written first, so
                // that the watermark can reach the mark.
                self.flush_owned(st, deadline).await?;
                if overflowed || !st.owned.is_empty() {
                    // Messages were dropped here before this mark, or could
                    // not be written: what this worker vouches for starts again.
                    st.range_from = None;
                } else if let Some(from) = st.range_from {
                    st.watermark = Some(Watermark {
                        view: st.view.hash,
                        from,
                        to: clock,
                    });
                }
                st.close_segment(Some(clock));
                if st.latest.hash != st.view.hash {
                    st.switch_view(&self.id);
                    st.range_from = None;
                }
                st.range_from.get_or_insert(clock);
            }
            Item::Subscribed => {
                // What arrived before a lost connection has no closing mark,
                // and what comes now continues nothing: no range.
                st.close_segment(None);
                st.range_from = None;
                if st.latest.hash != st.view.hash {
                    st.switch_view(&self.id);
                }
            }
        }
        Ok(())
    }

    /// Writes the owned messages, in batches; on a Redis error it waits and
    /// tries again (dropping what is older than PENDING_RETENTION), until it
    /// succeeds or, when stopping, `deadline` passes.
    async fn flush_owned(
        &mut self,
        st: &mut State,
        deadline: Option<Instant>,
    ) -> Result<(), RedisError> {
        let mut backoff = reconnect_backoff();
        while !st.owned.is_empty() {
            let n = st.owned.len().min(self.batch_size);
            let failed = match self.write(&st.owned[..n], false).await {
                Ok(left) => {
                    st.owned.splice(..n, left.messages);
                    left.why
                }
                Err(err) if is_fatal(&err) => return Err(err),
                Err(err) => Some(crate::connect::brief(&err).to_string()),
            };
            match failed {
                None => backoff = reconnect_backoff(),
                Some(why) => {
                    Counters::add(&self.counters.redis_errors, 1);
                    let wait = backoff.next().unwrap_or(crate::connect::MAX_BACKOFF);
                    tracing::warn!(worker = %self.id, cause = %why, retry_in_ms = wait.as_millis() as u64, "Redis did not take the batch; keeping it and retrying");
                    tokio::time::sleep(wait).await;
                    let now = Instant::now();
                    let before = st.owned.len();
                    st.owned
                        .retain(|m| now.duration_since(m.received_at) <= self.retention);
                    let expired = before - st.owned.len();
                    if expired > 0 {
                        Counters::add(&self.counters.expired, expired as u64);
                        tracing::warn!(worker = %self.id, expired, "dropped messages that waited longer than PENDING_RETENTION");
                        st.range_from = None;
                        st.watermark = None;
                    }
                    if deadline.is_some_and(|d| now >= d) {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes messages (each only if nobody has) and counts the outcomes;
    /// what the stream refused is written to the dead-letter stream at once,
    /// with Redis's reason. Returns what Redis did not take for now.
    async fn write(
        &mut self,
        batch: &[Incoming],
        taking_over: bool,
    ) -> Result<Leftover, RedisError> {
        let mut left = Leftover::default();
        let mut dead = self.write_round(batch, taking_over, &mut left).await?;
        while !dead.is_empty() {
            dead = self.write_round(&dead, taking_over, &mut left).await?;
        }
        Ok(left)
    }

    /// One round of [`Self::write`]; returns the messages to write again as
    /// dead letters.
    async fn write_round(
        &mut self,
        batch: &[Incoming],
        taking_over: bool,
        left: &mut Leftover,
    ) -> Result<Vec<Incoming>, RedisError> {
        let refs: Vec<&Incoming> = batch.iter().collect();
        let started = Instant::now();
        let results = self.delivery.write_owned(&refs).await?;
        self.counters
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        let mut dead = Vec::new();
        for (msg, result) in batch.iter().zip(results) {
            match tally(
                result.into(),
                msg,
                &self.counters,
                &self.id,
                &mut self.warnings,
            ) {
                Next::Written if taking_over => Counters::add(&self.counters.taken_over, 1),
                Next::Written | Next::Done => {}
                Next::DeadLetter(reason) => dead.push(Incoming {
                    rejected: Some(reason),
                    ..msg.clone()
                }),
                // Without a lock nothing is held or lost; what is left is
                // not tried yet.
                Next::Hold | Next::Again => left.messages.push(msg.clone()),
                Next::Later(why) => {
                    left.messages.push(msg.clone());
                    left.why = Some(why);
                }
            }
        }
        Ok(dead)
    }

    /// One cycle: renew the membership (or leave), store the watermark,
    /// publish a mark, read the owners' watermarks; then drop the copies they
    /// cover and take over the ones overdue.
    async fn cycle(&mut self, st: &mut State) -> Result<(), RedisError> {
        // The owners of every copy held, and of what arrives now.
        let mut asked: Vec<String> = Vec::new();
        let mut views: Vec<&Arc<View>> = vec![&st.view, &st.latest];
        views.extend(st.held.iter().map(|s| &s.view));
        views.dedup_by(|a, b| a.hash == b.hash);
        for view in views {
            asked.extend(view.members.iter().cloned());
        }
        asked.sort_unstable();
        asked.dedup();
        let membership = (!st.left).then_some(self.membership_ttl);
        st.beat += 1;
        let progress = Progress {
            beat: st.beat,
            watermark: st.watermark,
        }
        .encode();
        let reply = match self
            .delivery
            .cycle(membership, &progress, self.retention * 2, &asked)
            .await
        {
            Ok(reply) => reply,
            Err(err) if is_fatal(&err) => return Err(err),
            Err(err) => {
                Counters::add(&self.counters.redis_errors, 1);
                tracing::debug!(worker = %self.id, cause = %crate::connect::brief(&err), "cycle failed; trying again next time");
                return Ok(());
            }
        };
        let now = Instant::now();
        for (id, text) in asked.into_iter().zip(&reply.watermarks) {
            let Some(progress) = text.as_deref().and_then(Progress::decode) else {
                continue;
            };
            match st.known.get_mut(&id) {
                Some(k) if k.progress.beat == progress.beat => {
                    k.progress = progress;
                    k.still_for += 1;
                }
                Some(k) => *k = Known::new(progress, now),
                None => {
                    st.known.insert(id, Known::new(progress, now));
                }
            }
        }
        let latest = View::new(reply.members);
        if latest.hash != st.latest.hash {
            st.latest = Arc::new(latest);
            // Before the first mark of a subscription nothing can be vouched
            // for anyway: the new view may as well apply at once.
            // (The copies so far keep the view they were assigned with.)
            if st.open.lo.is_none() {
                st.close_segment(None);
                st.switch_view(&self.id);
            }
        }
        let due = self.sort_held(st, now);
        let mut again: Vec<Incoming> = Vec::new();
        for (i, chunk) in due.chunks(self.batch_size).enumerate() {
            let why = match self.write(chunk, true).await {
                Ok(left) => {
                    again.extend(left.messages);
                    left.why
                }
                Err(err) if is_fatal(&err) => return Err(err),
                Err(err) => {
                    again.extend(chunk.iter().cloned());
                    Some(crate::connect::brief(&err).to_string())
                }
            };
            if let Some(why) = why {
                Counters::add(&self.counters.redis_errors, 1);
                tracing::warn!(worker = %self.id, cause = %why, "takeover failed; trying again next cycle");
                again.extend(due.iter().skip((i + 1) * self.batch_size).cloned());
                break;
            }
        }
        if !again.is_empty() {
            // Back into the held copies, due at once.
            let mut segment = Segment::open(None, Arc::new(View::new(Vec::new())));
            segment.closed_at = now - self.takeover_after;
            segment.copies = again
                .into_iter()
                .map(|msg| Copy { owner: None, msg })
                .collect();
            st.held.push_front(segment);
        }
        st.known
            .retain(|_, k| now.duration_since(k.beat_at) < self.retention * 2);
        Ok(())
    }

    /// Drops the held copies the owners' watermarks cover and returns the
    /// ones to take over.
    fn sort_held(&self, st: &mut State, now: Instant) -> Vec<Incoming> {
        let mut due = Vec::new();
        let mut covered = 0u64;
        let latest_wait = self.retention.saturating_sub(self.takeover_after);
        // Why copies are taken over: their owner's range does not reach them
        // (another view, a restart, no watermark), or it fell silent.
        let (mut out_of_range, mut silent) = (0u32, 0u32);
        for segment in st.held.iter_mut() {
            let overdue = now >= segment.closed_at + self.takeover_after;
            let verdicts: Vec<Verdict> = segment
                .view
                .members
                .iter()
                .map(|owner| {
                    let known = st.known.get(owner);
                    let watermark = known.and_then(|k| k.progress.watermark);
                    if watermark
                        .is_some_and(|w| w.covers(segment.view.hash, segment.lo, segment.hi))
                    {
                        return Verdict::Covered;
                    }
                    if !overdue {
                        return Verdict::Wait;
                    }
                    let heading =
                        watermark.is_some_and(|w| w.heads_for(segment.view.hash, segment.lo));
                    let alive = known.is_some_and(|k| !k.silent(now, self.takeover_after));
                    if heading && alive {
                        return Verdict::Wait;
                    }
                    if heading {
                        silent += 1;
                    } else {
                        out_of_range += 1;
                    }
                    Verdict::TakeOver
                })
                .collect();
            let copies = std::mem::take(&mut segment.copies);
            for copy in copies {
                let verdict = match copy.owner {
                    Some(i) => verdicts[i as usize],
                    None if overdue => Verdict::TakeOver,
                    None => Verdict::Wait,
                };
                match verdict {
                    Verdict::Covered => covered += 1,
                    Verdict::Wait if now.duration_since(copy.msg.received_at) < latest_wait => {
                        segment.copies.push(copy)
                    }
                    Verdict::Wait | Verdict::TakeOver => due.push(copy.msg),
                }
            }
        }
        st.held.retain(|s| !s.copies.is_empty());
        if !due.is_empty() {
            tracing::debug!(worker = %self.id, due = due.len(), out_of_range, silent, "taking over");
        }
        Counters::add(&self.counters.duplicates_skipped, covered);
        due
    }
}
