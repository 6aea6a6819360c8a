//! A stream's lane in this process: the copies it holds (in publish
//! order), its part in the stream (writer or standby), where it knows the
//! record to be, and the writes it has on their way; with what a writer
//! does to it (make the next write, count what is done) and what a standby
//! does (drop what the record passes).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::RedisError;

use super::super::{Lane, Message, Position, outcome, target};
use super::window::Window;
use super::write::{WriteReply, write_cmd};
use crate::connect::Backoff;
use crate::monitor::{Counters, Throttle};

/// What becomes of a message in a lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    /// Write it (to its stream, or as a dead letter when it is rejected).
    Write,
    /// Pass over it: its id was written within DEDUP_WINDOW (`reused`: with
    /// other bytes).
    Skip { reused: bool },
    /// Pass over it: neither stream takes it.
    GiveUp,
}

#[derive(Debug)]
pub(super) struct Queued {
    pub(super) m: Message,
    pub(super) fate: Fate,
    /// Decided (dedup, give up) while it was in a write's span.
    pub(super) decided: bool,
    /// Held as a standby before this process took the stream over.
    pub(super) taken_over: bool,
}

/// A write on its way: how many queued messages (from the front, after the
/// writes before it) it covers, and the record's position after it.
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) id: u64,
    pub(super) span: usize,
}

/// This process's part in one stream.
#[derive(Debug)]
pub(super) enum Role {
    Standby,
    Writer { epoch: String },
}

pub(super) struct LaneState {
    pub(super) lane: Arc<Lane>,
    pub(super) queue: VecDeque<Queued>,
    pub(super) role: Role,
    /// Where this process knows the stream's record to be.
    pub(super) pos: Option<Position>,
    /// When that position last moved.
    pub(super) moved_at: Instant,
    pub(super) in_flight: VecDeque<InFlight>,
    /// Trips (pipelines of writes) on their way.
    pub(super) trips: usize,
    /// Answers of trips that ended before an earlier trip's.
    pub(super) early: Vec<Vec<(u64, Result<WriteReply, RedisError>)>>,
    /// A write did not finish as asked: write again only once the record
    /// has been read (the next cycle) and every write on its way answered.
    pub(super) resync: bool,
    /// The stream refused a message for good: (its position, the reason).
    pub(super) refused: Option<(Position, String)>,
    pub(super) retry_at: Option<Instant>,
    pub(super) backoff: Backoff,
    /// When a cycle last found the stream's writer (another process) alive,
    /// and the last mark its readers had delivered then.
    pub(super) writer_live_at: Option<Instant>,
    pub(super) writer_seen: u64,
    /// The mark that writer's sequence was whole since then.
    pub(super) writer_since: u64,
    /// The mark this process's sequence was whole since when it took the
    /// stream over (see the writer's hole in `decide`).
    pub(super) taken_since: u64,
    /// Since when this process has wanted to take the stream over (it waits
    /// a little for a process without a hole).
    pub(super) wanted_since: Option<Instant>,
    /// The lane lost copies (shed for memory) up to this mark: it cannot
    /// take over cleanly from before it.
    pub(super) shed_through: u64,
    pub(super) window: Window,
    /// The warning about reused ids, at most once a second per stream.
    pub(super) reused: Throttle,
    pub(super) last_active: Instant,
    /// The cycle that last read the record.
    pub(super) asked_in: u64,
    /// Since when the record has held an impossible position.
    pub(super) impossible_since: Option<Instant>,
    /// The handoff mark, when the pool was handed to this strategy: what
    /// came before it is the other strategy's, covered as if written.
    pub(super) floor: u64,
    /// MIN_REPLICAS_ACKED: copies the record has passed (written, by this
    /// process or another) that the replicas are not known to hold yet:
    /// kept apart from the queue (they wait for no write), dropped once the
    /// replicas hold them (the record's `safe`, or this writer's own wait),
    /// and put back in the queue when the record goes back before them (a
    /// failover took them back).
    pub(super) unconfirmed: VecDeque<Queued>,
    pub(super) keep_unconfirmed: bool,
    /// MIN_REPLICAS_ACKED: a wait for replicas is on its way; the last one
    /// found too few, ask again from then.
    pub(super) waiting: bool,
    pub(super) wait_again_at: Option<Instant>,
}

impl LaneState {
    pub(super) fn new(lane: Arc<Lane>, window: Window, cycle: u64) -> Self {
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
            backoff: Backoff::new(),
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
            unconfirmed: VecDeque::new(),
            keep_unconfirmed: false,
            waiting: false,
            wait_again_at: None,
        }
    }

    pub(super) fn is_writer(&self) -> bool {
        matches!(self.role, Role::Writer { .. })
    }

    /// Where this writer's sequence has a hole after what it wrote, if it
    /// has one: the mark its sequence is whole since, when that is past the
    /// last position written and the sequence it took the stream over with.
    /// It writes nothing from there on.
    pub(super) fn hole(&self, since: u64) -> Option<u64> {
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
    pub(super) fn record_at(&mut self, pos: Option<Position>, now: Instant) {
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
        self.moved_at = now;
    }

    /// Becomes (or stays) a standby: the writes on its way, a refusal and
    /// a resync are the past writer's.
    pub(super) fn stand_by(&mut self) {
        self.role = Role::Standby;
        self.resync = false;
        self.in_flight.clear();
        self.refused = None;
    }

    /// MIN_REPLICAS_ACKED: the record is at `pos`: the unconfirmed copies
    /// after it (a failover took their writes back) are copies to write
    /// again, in position order with the queue.
    pub(super) fn unwrite_after(&mut self, pos: Option<Position>) {
        let after = |q: &Queued| q.m.position.is_none_or(|p| pos.is_none_or(|k| p > k));
        if !self.unconfirmed.iter().any(after) {
            return;
        }
        let (back, kept): (Vec<Queued>, Vec<Queued>) =
            self.unconfirmed.drain(..).partition(|q| after(q));
        self.unconfirmed = kept.into();
        let mut queue: Vec<Queued> = back
            .into_iter()
            .map(|mut q| {
                q.fate = Fate::Write;
                q.decided = false;
                q
            })
            .chain(self.queue.drain(..))
            .collect();
        queue.sort_by_key(|q| q.m.position);
        self.queue = queue.into();
    }

    /// MIN_REPLICAS_ACKED: the replicas hold the stream up to `safe`: the
    /// unconfirmed copies up to there are dropped.
    pub(super) fn confirmed_through(&mut self, safe: Position) {
        self.unconfirmed
            .retain(|q| q.m.position.is_some_and(|p| p > safe));
    }

    /// Queued messages not yet in a write.
    pub(super) fn unsent(&self) -> usize {
        self.queue.len() - self.in_flight.iter().map(|w| w.span).sum::<usize>()
    }
}

/// The next write of a writer's lane: its command, and how many queued
/// messages it covers (from the first not yet in a write). Each message's
/// fate is decided once, in order: one whose id the lane saw within
/// DEDUP_WINDOW is passed over.
pub(super) fn write_command(
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

/// The next wait of a lane's backoff.
pub(super) fn back_off(lane: &mut LaneState) -> Duration {
    let wait = lane.backoff.next_wait();
    lane.retry_at = Some(Instant::now() + wait);
    wait
}

/// Takes the first `n` queued messages off a writer's lane, counting each
/// by its fate.
pub(super) fn pop(lane: &mut LaneState, n: usize, counters: &Counters) {
    let n = n.min(lane.queue.len());
    for q in lane.queue.drain(..n) {
        count(&q, counters, &mut lane.reused);
        // (Written, but perhaps not on the replicas yet.)
        if lane.keep_unconfirmed {
            lane.unconfirmed.push_back(q);
        }
    }
}

/// Counts a copy written (or passed over, or given up) by its fate.
fn count(q: &Queued, counters: &Counters, reused: &mut Throttle) {
    match q.fate {
        Fate::Write => {
            outcome::written(&q.m, counters);
            if q.taken_over {
                Counters::add(&counters.taken_over, 1);
            }
        }
        Fate::Skip { reused: again } => outcome::skipped(&q.m, again, counters, reused),
        // (Said when the dead-letter stream refused it too.)
        Fate::GiveUp => Counters::add(&counters.refused, 1),
    }
}

/// Drops a standby's copies the record's position passes (another process
/// wrote them), remembering their ids.
pub(super) fn cover(lane: &mut LaneState, pos: Position, counters: &Counters) {
    let mut covered = 0;
    while let Some(front) = lane.queue.front() {
        if front.m.position.is_none_or(|p| p > pos) {
            break;
        }
        let q = lane.queue.pop_front().expect("a front");
        lane.window.seen(&q.m);
        covered += 1;
        // (Written, but perhaps not on the replicas yet.)
        if lane.keep_unconfirmed {
            lane.unconfirmed.push_back(q);
        }
    }
    Counters::add(&counters.duplicates_skipped, covered);
}
