//! The design card's strategy (STRATEGY=race): every worker races for every
//! message.
//!
//! For a batch of messages a worker:
//! 1. **claims** them (`claim.lua`): for each, if its ACK key exists it was
//!    written already; otherwise `SET <lock> <worker> NX PX <LOCK_TTL>`
//!    either wins the lock or finds it held by another worker;
//! 2. **writes** the ones it won (`race_write.lua`), in the same round trip:
//!    for each, only if the lock is still this worker's *and* no ACK exists,
//!    `XADD` the entry and then, once that worked, set the ACK (for ACK_TTL).
//!
//! Copies another worker holds are claimed again once that lock could have
//! expired: an ACK means done, a free lock without an ACK means the holder
//! died, and the claim takes the message over.
//!
//! **A long stop writes nothing twice.** An ACK lives ACK_TTL from its write,
//! which is after the message was published; a copy published more than
//! ACK_TTL − LOCK_TTL ago (by the server's clock, from its position's mark)
//! could find its ACK gone, so both scripts drop it instead (`expired`),
//! however long a pause kept it. (On a cluster messages have no position,
//! and this guard is off.)

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{RedisError, RedisResult};
use tokio::sync::mpsc;

use super::outcome;
use super::{Lane, Message, Trim, push_entry, scripts, target};
use crate::connect::{Backoff, Conn, brief, is_fatal};
use crate::monitor::{Counters, Throttle};

/// What a claim found for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Another worker holds the lock: keep the copy and look again later.
    Held,
    /// This worker holds the lock now and should write the message.
    Won,
    /// The message is in the stream already: drop the copy.
    Acked,
    /// A message with this id is in the stream already, with other bytes: a
    /// publisher reused the id. Drop the copy (and say so).
    Reused,
    /// Published too long ago to be written safely (see the module's notes).
    TooOld,
}

/// What the write step did for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// The lock is not this worker's (another's, or expired): nothing written.
    LockLost,
    /// Added to the stream, with its ACK key.
    Written,
    /// Another worker wrote it first: nothing was added.
    Acked,
    /// Another message with this id was written (other bytes): nothing added.
    Reused,
    /// Published too long ago to be written safely: nothing added.
    TooOld,
    /// The stream refused the entry (Redis's reason): nothing was added or
    /// recorded. It belongs in the dead-letter stream.
    Refused(String),
    /// Not tried: Redis refused an earlier message of the batch for a
    /// reason that passes (out of memory, no replicas, read-only, loading);
    /// try again later.
    NotTried(String),
}

/// Where a message stands after [`Racer::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Another worker holds its lock: keep the copy, claim it again later.
    Held,
    /// This worker wrote it (to the output or the dead-letter stream).
    Written,
    /// It was in the stream already: drop the copy.
    Acked,
    /// Another message with its id is in the stream (other bytes): drop it.
    Reused,
    /// Published too long ago to be written safely: drop it.
    TooOld,
    /// This worker's lock ran out before the write: claim it again now.
    LockLost,
    /// The stream refused it, for this reason: nothing was written.
    Refused(String),
    /// Not tried, for a reason that passes: try again after a while.
    NotTried(String),
}

impl From<Write> for Settled {
    /// A write without a claim (the fast path on a cluster).
    fn from(write: Write) -> Self {
        match write {
            Write::LockLost => Settled::LockLost,
            Write::Written => Settled::Written,
            Write::Acked => Settled::Acked,
            Write::Reused => Settled::Reused,
            Write::TooOld => Settled::TooOld,
            Write::Refused(why) => Settled::Refused(why),
            Write::NotTried(why) => Settled::NotTried(why),
        }
    }
}

/// What a worker does with a message once its outcome is counted
/// ([`tally`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// This worker wrote it (to the output stream, or as a dead letter).
    Written,
    /// Settled otherwise: in the stream already, or given up (counted).
    Done,
    /// Another worker holds it: keep the copy, look again later.
    Hold,
    /// Claim and write it again now (its lock ran out).
    Again,
    /// Write it again, now to the dead-letter stream, with this reason as
    /// its `rejected`.
    DeadLetter(String),
    /// Not tried, for a reason that passes: keep it, try again after a backoff.
    Later(String),
}

/// Warnings a worker gives at most once a second each, with how many were
/// held back meanwhile.
#[derive(Debug, Default)]
pub struct Warnings {
    reused: Throttle,
    refused: Throttle,
}

/// Counts a message's outcome in `counters` (logging what needs it) and
/// says what to do with it next. A message the stream refused goes to the
/// dead-letter stream with Redis's reason; one the dead-letter stream
/// refuses too is counted as `refused` and given up.
pub fn tally(
    outcome: Settled,
    msg: &Message,
    counters: &Counters,
    warnings: &mut Warnings,
) -> Next {
    match outcome {
        Settled::Written => {
            outcome::written(msg, counters);
            Next::Written
        }
        Settled::Acked | Settled::Reused => {
            let reused = matches!(outcome, Settled::Reused);
            outcome::skipped(msg, reused, counters, &mut warnings.reused);
            Next::Done
        }
        Settled::TooOld => {
            Counters::add(&counters.expired, 1);
            Next::Done
        }
        Settled::Held => Next::Hold,
        Settled::LockLost => Next::Again,
        Settled::Refused(why) if msg.rejected.is_none() => {
            Next::DeadLetter(format!("the stream refused it: {why}"))
        }
        Settled::Refused(why) => {
            outcome::given_up(msg, &why, counters, &mut warnings.refused);
            Next::Done
        }
        Settled::NotTried(why) => Next::Later(why),
    }
}

/// One worker's side of the race protocol (and of writes with ACK keys).
/// Clones share the connection.
#[derive(Clone)]
pub struct Racer {
    conn: Conn,
    worker_id: String,
    lock_ttl_ms: u64,
    ack_ttl_ms: u64,
    /// The server's time (ms) at a moment of this process: dates the
    /// messages that have no position (a cluster's) by when they were
    /// received.
    clock: Option<(Instant, u64)>,
}

/// How often a [`Racer`] reads the server's time again.
const CLOCK_EVERY: Duration = Duration::from_secs(60);

/// The messages of a batch that go to one lane, and their places in it.
struct Group<'a> {
    lane: Arc<Lane>,
    messages: Vec<&'a Message>,
    places: Vec<usize>,
}

impl Racer {
    pub fn new(conn: Conn, worker_id: String, lock_ttl: Duration, ack_ttl: Duration) -> Self {
        Self {
            conn,
            worker_id,
            lock_ttl_ms: lock_ttl.as_millis().max(1) as u64,
            ack_ttl_ms: ack_ttl.as_millis().max(1) as u64,
            clock: None,
        }
    }

    /// Reads the server's time when it has not for [`CLOCK_EVERY`] (a
    /// failure leaves the messages without a position undated).
    async fn sync_clock(&mut self) {
        if self.clock.is_some_and(|(at, _)| at.elapsed() < CLOCK_EVERY) {
            return;
        }
        let time: RedisResult<(u64, u64)> = redis::cmd("TIME").query_async(&mut self.conn).await;
        if let Ok((secs, micros)) = time {
            // Taken after the reply: the estimate errs towards older.
            self.clock = Some((Instant::now(), secs * 1000 + micros / 1000));
        }
    }

    /// When a message was published, in server ms, for the scripts' age
    /// guard (0: unknown). From its position: no later than published. A
    /// cluster's messages have none: the server's time when this process
    /// received it, later than published by the delivery's lag. What waited
    /// in the server's buffer while this process was stopped would come
    /// late by the whole pause: the subscription drops it (see
    /// [`super::cluster::PauseWatch`]).
    fn published(&self, m: &Message) -> u64 {
        if let Some(p) = m.position {
            return p.published_ms();
        }
        match self.clock {
            Some((at, ms)) if m.received_at >= at => ms + (m.received_at - at).as_millis() as u64,
            Some((at, ms)) => ms.saturating_sub((at - m.received_at).as_millis() as u64),
            None => 0,
        }
    }

    /// How old (ms since published) a message may be and still be written.
    fn max_age_ms(&self) -> u64 {
        self.ack_ttl_ms.saturating_sub(self.lock_ttl_ms)
    }

    /// A batch split by stream, in the order the streams first appear.
    fn groups<'a>(messages: &[&'a Message]) -> Vec<Group<'a>> {
        let mut groups: Vec<Group<'a>> = Vec::new();
        for (place, m) in messages.iter().enumerate() {
            let found = groups
                .iter_mut()
                .find(|g| Arc::ptr_eq(&g.lane, &m.lane) || g.lane.to.stream == m.lane.to.stream);
            match found {
                Some(g) => {
                    g.messages.push(m);
                    g.places.push(place);
                }
                None => groups.push(Group {
                    lane: m.lane.clone(),
                    messages: vec![m],
                    places: vec![place],
                }),
            }
        }
        groups
    }

    /// Step 1 alone, for a whole batch in one round trip per stream.
    #[cfg(test)]
    pub async fn claim(&mut self, messages: &[&Message]) -> RedisResult<Vec<Claim>> {
        self.sync_clock().await;
        let mut out = vec![Claim::Held; messages.len()];
        for group in Self::groups(messages) {
            let cmd = self.claim_cmd(&group.lane, &group.messages);
            let outcomes = self.run_one(&group.messages, cmd).await?;
            let claims = outcomes.into_iter().map(claim_outcome).collect();
            place(&mut out, &group.places, claims);
        }
        Ok(out)
    }

    /// Step 2 alone: writes the messages whose lock this worker holds, in one
    /// atomic script per stream.
    #[cfg(test)]
    pub async fn write(&mut self, messages: &[&Message]) -> RedisResult<Vec<Write>> {
        self.sync_clock().await;
        self.write_groups(messages, Write::LockLost, |racer, group| {
            racer.write_cmd(&group.lane, &group.messages)
        })
        .await
    }

    /// Both steps for a batch in ONE round trip per stream: the claim script
    /// and the write script go out together, and the write takes exactly the
    /// messages whose lock the claim just won (it checks lock ownership
    /// itself). A worker killed between its claim and its write thus leaves
    /// no lock behind: the server received both at once.
    pub async fn settle(&mut self, messages: &[&Message]) -> RedisResult<Vec<Settled>> {
        self.sync_clock().await;
        let mut out = vec![Settled::Held; messages.len()];
        for group in Self::groups(messages) {
            let mut pipe = redis::pipe();
            pipe.add_command(self.claim_cmd(&group.lane, &group.messages))
                .add_command(self.write_cmd(&group.lane, &group.messages));
            let (claims, writes): (Vec<Outcome>, Vec<Outcome>) =
                scripts::query(&mut self.conn, &pipe).await?;
            let writes = write_outcomes(group.messages.len(), writes);
            let settled = claims
                .into_iter()
                .zip(writes)
                .map(|(claim, write)| match (claim_outcome(claim), write) {
                    // The claim may have noticed the reuse, and the write then
                    // found it noticed: Reused wins.
                    (Claim::Reused, _) | (_, Write::Reused) => Settled::Reused,
                    (Claim::Acked, _) | (_, Write::Acked) => Settled::Acked,
                    (Claim::TooOld, _) | (_, Write::TooOld) => Settled::TooOld,
                    (Claim::Held, _) => Settled::Held,
                    (Claim::Won, Write::Written) => Settled::Written,
                    (Claim::Won, Write::LockLost) => Settled::LockLost,
                    (Claim::Won, Write::Refused(why)) => Settled::Refused(why),
                    (Claim::Won, Write::NotTried(why)) => Settled::NotTried(why),
                })
                .collect();
            place(&mut out, &group.places, settled);
        }
        Ok(out)
    }

    /// Writes messages without locks, each only if its ACK does not exist
    /// yet (setting it once written): the publisher's fast path on a
    /// cluster. Returns per message `Written`, `Acked`, `Reused`,
    /// `Refused` or `NotTried`.
    pub async fn write_acked(&mut self, messages: &[&Message]) -> RedisResult<Vec<Write>> {
        self.write_groups(messages, Write::Acked, |racer, group| {
            let lane = &group.lane;
            let mut keys = vec![lane.to.stream.clone(), lane.to.dead_stream.clone()];
            keys.extend(group.messages.iter().map(|m| lane.keys.ack(&m.id)));
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let mut cmd = scripts::evalsha(scripts::WRITE_ACKED, &keys);
            let (kind, op, limit) = Trim::args(lane.trim);
            cmd.arg(racer.ack_ttl_ms).arg(kind).arg(op).arg(limit);
            for m in &group.messages {
                cmd.arg(target(m)).arg(m.payload_hash());
                push_entry(&mut cmd, m, &racer.worker_id);
            }
            cmd
        })
        .await
    }

    /// Runs a write script (`cmd` makes it) per stream of `messages`: each
    /// message's [`Write`], in their order (`unset` for none).
    async fn write_groups(
        &mut self,
        messages: &[&Message],
        unset: Write,
        cmd: impl Fn(&Self, &Group<'_>) -> redis::Cmd,
    ) -> RedisResult<Vec<Write>> {
        let mut out = vec![unset; messages.len()];
        for group in Self::groups(messages) {
            let cmd = cmd(self, &group);
            let outcomes = self.run_one(&group.messages, cmd).await?;
            place(
                &mut out,
                &group.places,
                write_outcomes(group.messages.len(), outcomes),
            );
        }
        Ok(out)
    }

    /// Runs one script over a batch; an empty batch asks nothing of Redis.
    async fn run_one(
        &mut self,
        messages: &[&Message],
        cmd: redis::Cmd,
    ) -> RedisResult<Vec<Outcome>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        scripts::run(&mut self.conn, cmd).await
    }

    fn claim_cmd(&self, lane: &Lane, messages: &[&Message]) -> redis::Cmd {
        let mut keys = Vec::with_capacity(1 + messages.len() * 2);
        keys.push(lane.keys.handoff.clone());
        for m in messages {
            keys.push(lane.keys.lock(&m.id));
            keys.push(lane.keys.ack(&m.id));
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut cmd = scripts::evalsha(scripts::CLAIM, &keys);
        cmd.arg(&self.worker_id)
            .arg(self.lock_ttl_ms)
            .arg(self.ack_ttl_ms)
            .arg(self.max_age_ms());
        for m in messages {
            cmd.arg(m.payload_hash())
                .arg(self.published(m))
                .arg(mark(m));
        }
        cmd
    }

    fn write_cmd(&self, lane: &Lane, messages: &[&Message]) -> redis::Cmd {
        let mut keys = vec![
            lane.to.stream.clone(),
            lane.to.dead_stream.clone(),
            lane.keys.handoff.clone(),
        ];
        for m in messages {
            keys.push(lane.keys.lock(&m.id));
            keys.push(lane.keys.ack(&m.id));
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut cmd = scripts::evalsha(scripts::RACE_WRITE, &keys);
        let (kind, op, limit) = Trim::args(lane.trim);
        cmd.arg(&self.worker_id)
            .arg(self.ack_ttl_ms)
            .arg(kind)
            .arg(op)
            .arg(limit)
            .arg(self.max_age_ms());
        for m in messages {
            cmd.arg(target(m))
                .arg(m.payload_hash())
                .arg(self.published(m))
                .arg(mark(m));
            push_entry(&mut cmd, m, &self.worker_id);
        }
        cmd
    }
}

/// The mark of a message's position, for the scripts' handoff rule (0:
/// none, a cluster's).
fn mark(m: &Message) -> u64 {
    m.position.map_or(0, |p| p.mark)
}

/// One message's outcome in a script's reply: a code and its detail.
type Outcome = (u8, Option<String>);

fn claim_outcome((code, _): Outcome) -> Claim {
    match code {
        1 => Claim::Won,
        2 => Claim::Acked,
        5 => Claim::Reused,
        6 => Claim::TooOld,
        _ => Claim::Held,
    }
}

/// The write scripts' outcomes, one per message: a script that stopped for
/// a passing reason (code 4) leaves the rest not tried.
fn write_outcomes(messages: usize, outcomes: Vec<Outcome>) -> Vec<Write> {
    let mut out = Vec::with_capacity(messages);
    let mut stopped: Option<String> = None;
    let mut outcomes = outcomes.into_iter();
    for _ in 0..messages {
        if let Some(why) = &stopped {
            out.push(Write::NotTried(why.clone()));
            continue;
        }
        let (code, detail) = outcomes
            .next()
            .unwrap_or((4, Some("no reply for this message".into())));
        out.push(match code {
            0 => Write::LockLost,
            1 => Write::Written,
            2 => Write::Acked,
            5 => Write::Reused,
            6 => Write::TooOld,
            3 => Write::Refused(detail.unwrap_or_default()),
            _ => {
                let why = detail.unwrap_or_default();
                stopped = Some(why.clone());
                Write::NotTried(why)
            }
        });
    }
    out
}

/// Puts a group's results back in their places in the batch.
fn place<T>(out: &mut [T], places: &[usize], results: Vec<T>) {
    for (place, result) in places.iter().zip(results) {
        out[*place] = result;
    }
}

/// A copy of a message another worker has locked.
#[derive(Debug)]
struct PendingCopy {
    msg: Message,
    /// When its lock could have expired: the time to claim it again.
    due: Instant,
}

/// The copies a worker holds for others, in the order they fall due.
///
/// Every copy is due one LOCK_TTL after it was (re)queued, and copies are
/// queued in time order, so a FIFO is also sorted by due time.
#[derive(Debug, Default)]
struct PendingBatch {
    copies: VecDeque<PendingCopy>,
}

impl PendingBatch {
    fn push(&mut self, msg: Message, due: Instant) {
        self.copies.push_back(PendingCopy { msg, due });
    }

    fn next_due(&self) -> Option<Instant> {
        self.copies.front().map(|c| c.due)
    }

    /// Takes up to `limit` copies that are due at `now`.
    fn take_due(&mut self, now: Instant, limit: usize, into: &mut Vec<Message>) {
        while into.len() < limit {
            match self.copies.front() {
                Some(c) if c.due <= now => into.push(self.copies.pop_front().unwrap().msg),
                _ => break,
            }
        }
    }

    fn len(&self) -> usize {
        self.copies.len()
    }
}

/// One racing worker: what its loop needs besides its queue.
pub struct RaceWorker {
    pub id: String,
    pub racer: Racer,
    pub counters: Arc<Counters>,
    pub batch_size: usize,
    pub lock_ttl: Duration,
    pub retention: Duration,
    pub warnings: Warnings,
}

impl RaceWorker {
    /// Takes batches of messages (every message the process receives) until
    /// the queue is closed and every copy in hand is settled, or until
    /// LOCK_TTL + 1 s after the close, whichever is first. Returns an error
    /// only for a fatal Redis error.
    pub async fn run(mut self, mut queue: mpsc::Receiver<Vec<Message>>) -> Result<(), RedisError> {
        let mut pending = PendingBatch::default();
        let mut reported_pending = 0usize;
        // Messages whose claim or write must be tried again at once.
        let mut retry: Vec<Message> = Vec::new();
        let mut inbox: VecDeque<Message> = VecDeque::new();
        let mut batch: Vec<Message> = Vec::with_capacity(self.batch_size);
        let mut closed_at: Option<Instant> = None;
        let mut backoff = Backoff::new();

        loop {
            // 1. Gather: what has arrived (never waiting to fill a batch), the
            //    copies that fell due, and what must be retried.
            batch.append(&mut retry);
            if closed_at.is_none() && batch.is_empty() && inbox.is_empty() {
                let wake = pending.next_due();
                tokio::select! {
                    got = queue.recv() => match got {
                        Some(messages) => self.receive(messages, &mut inbox),
                        None => closed_at = Some(Instant::now()),
                    },
                    _ = sleep_until(wake), if wake.is_some() => {}
                }
            }
            while closed_at.is_none() {
                match queue.try_recv() {
                    Ok(messages) => self.receive(messages, &mut inbox),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed_at = Some(Instant::now());
                    }
                }
            }
            while batch.len() < self.batch_size {
                match inbox.pop_front() {
                    Some(m) => batch.push(m),
                    None => break,
                }
            }
            let now = Instant::now();
            let first_due = batch.len();
            pending.take_due(now, first_due + self.batch_size, &mut batch);
            let expired = expire(&mut batch, first_due, now, self.retention);
            if expired > 0 {
                Counters::add(&self.counters.expired, expired);
                tracing::warn!(worker = %self.id, expired, "dropped copies that waited longer than PENDING_RETENTION");
            }

            // 2. Settle the batch.
            if !batch.is_empty() {
                match self.settle(&mut batch, &mut pending, &mut retry).await {
                    Ok(None) => backoff.reset(),
                    Ok(Some(why)) => {
                        Counters::add(&self.counters.redis_errors, 1);
                        let id = &self.id;
                        backoff.pause(None, |wait| {
                            tracing::warn!(worker = %id, cause = %why, retry_in_ms = wait.as_millis() as u64, "Redis did not take the batch for now; keeping it and retrying");
                        }).await;
                    }
                    Err(err) => {
                        if !is_fatal(&err) {
                            Counters::add(&self.counters.redis_errors, 1);
                            retry.append(&mut batch);
                        }
                        let id = &self.id;
                        backoff.after(err, None, |err, wait| {
                            tracing::warn!(worker = %id, cause = %brief(err), retry_in_ms = wait.as_millis() as u64, "Redis command failed; keeping the batch and retrying");
                        }).await?;
                    }
                }
            }
            let held = pending.len() + retry.len() + inbox.len();
            if held != reported_pending {
                Counters::add(&self.counters.pending, held as u64);
                Counters::sub(&self.counters.pending, reported_pending as u64);
                reported_pending = held;
            }

            // 3. After the queue closed: wait for the copies in hand, but not
            //    past the time their locks could have expired.
            if let Some(closed) = closed_at {
                let deadline = closed + self.lock_ttl + Duration::from_secs(1);
                if held == 0 {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    tracing::warn!(worker = %self.id, unsettled = held, "stopping with copies still unsettled; their lock holders are expected to write them");
                    Counters::add(&self.counters.expired, held as u64);
                    Counters::sub(&self.counters.pending, reported_pending as u64);
                    return Ok(());
                }
                if retry.is_empty()
                    && inbox.is_empty()
                    && let Some(due) = pending.next_due()
                {
                    sleep_until(Some(due.min(deadline))).await;
                }
            }
        }
    }

    /// Takes a batch of messages in: each is this worker's copy.
    fn receive(&self, messages: Vec<Message>, inbox: &mut VecDeque<Message>) {
        Counters::add(&self.counters.received, messages.len() as u64);
        inbox.extend(messages);
    }

    /// Claims the batch, writes what was won, keeps what others hold; what
    /// the stream refused goes back to be dead-lettered, what Redis did not
    /// take for now goes back to be retried. Returns the passing reason when
    /// there was one (the loop then backs off).
    async fn settle(
        &mut self,
        batch: &mut Vec<Message>,
        pending: &mut PendingBatch,
        retry: &mut Vec<Message>,
    ) -> Result<Option<String>, RedisError> {
        let refs: Vec<&Message> = batch.iter().collect();
        let started = Instant::now();
        let settled = self.racer.settle(&refs).await?;
        self.counters
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());

        let due = Instant::now() + self.lock_ttl;
        let mut later = None;
        for (mut msg, state) in batch.drain(..).zip(settled) {
            match tally(state, &msg, &self.counters, &mut self.warnings) {
                Next::Written | Next::Done => {}
                Next::Hold => pending.push(msg, due),
                Next::Again => retry.push(msg),
                Next::DeadLetter(reason) => {
                    msg.rejected = Some(reason);
                    retry.push(msg);
                }
                Next::Later(why) => {
                    later = Some(why);
                    retry.push(msg);
                }
            }
        }
        Ok(later)
    }
}

/// Drops the copies (from index `from` on) received longer than `retention`
/// ago; returns how many.
fn expire(batch: &mut Vec<Message>, from: usize, now: Instant, retention: Duration) -> u64 {
    let before = batch.len();
    let mut i = from;
    while i < batch.len() {
        if now.duration_since(batch[i].received_at) > retention {
            batch.swap_remove(i);
        } else {
            i += 1;
        }
    }
    (before - batch.len()) as u64
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::delivery::Destination;

    fn msg(id: &str, received_at: Instant) -> Message {
        let lane = Arc::new(Lane::new(Destination::new("s", "c"), None));
        let mut m = Message::with_id(id, Vec::new(), lane);
        m.received_at = received_at;
        m
    }

    #[test]
    fn takes_only_due_copies_in_order() {
        let t0 = Instant::now();
        let mut pending = PendingBatch::default();
        pending.push(msg("a", t0), t0 + Duration::from_secs(1));
        pending.push(msg("b", t0), t0 + Duration::from_secs(2));
        let mut out = Vec::new();
        pending.take_due(t0 + Duration::from_millis(1500), 10, &mut out);
        assert_eq!(out.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(pending.next_due(), Some(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn expires_only_old_copies_past_the_index() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(40);
        let mut batch = vec![msg("new-but-old", t0), msg("old", t0), msg("fresh", now)];
        let dropped = expire(&mut batch, 1, now, Duration::from_secs(30));
        assert_eq!(dropped, 1);
        let ids: Vec<_> = batch.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["new-but-old", "fresh"]);
    }
}
