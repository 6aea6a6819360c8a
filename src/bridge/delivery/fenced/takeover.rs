//! The takeover decision: what a lane does with its stream's writer record
//! each cycle. [`decide`] is pure (no Redis, no clock of its own: the cycle
//! hands it the record, the members' beats and the time), so the state
//! machine is tested here without a server; `Fenced::act` runs the script
//! the step calls for ([`take_over`], or `release.lua`).
//!
//! A writer whose record still holds its epoch writes on, reads the record
//! back after a write that did not finish, and gives the stream back when
//! it is idle and deaf or quiet, or when its sequence has a hole after what
//! it wrote. A standby drops the copies the record's position passes, and
//! takes the record over when the stream has no writer, or its writer is
//! gone, silent, deaf or stuck, with these guards: a process without a
//! subscription takes nothing; a writer that lives on (deaf, stuck) is
//! replaced only by a process without a hole from the record's position on
//! (clean); a process with a hole takes over only from a writer presumed
//! dead, and only if it is the most complete live process (or after waiting
//! 2 x TAKEOVER_AFTER for that one).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::RedisError;

use super::super::{Lane, Position, scripts};
use super::QUIET_RELEASE;
use super::lane::{Fate, LaneState, Role, cover, pop};
use crate::connect::Conn;
use crate::monitor::Counters;

/// A live process of the pool, as its last beat says.
#[derive(Debug, Clone, Copy)]
pub(super) struct Member {
    /// Server time (ms) of its last beat.
    pub beat: u64,
    /// The last mark its readers delivered.
    pub seen: u64,
    /// The mark its sequence has been whole since (`u64::MAX`: it has no
    /// subscription now).
    pub since: u64,
    /// Its routes' fingerprint (0: not said).
    pub routes: u64,
    /// Since when it holds copies (0: it waits for a place among the
    /// holders, reading nothing; 1 when not said: it holds copies).
    pub held: u64,
}

impl Member {
    /// The members as the cycle script returns them: name, then
    /// `beat:seen:since:routes[:strategy:joined[:held]]`, for each.
    pub(super) fn parse_all(flat: &[String]) -> HashMap<&str, Member> {
        flat.chunks(2)
            .filter_map(|pair| {
                let mut parts = pair.get(1)?.split(':');
                let mut next = || parts.next().and_then(|v| v.parse().ok());
                let member = Member {
                    beat: next()?,
                    seen: next()?,
                    since: next().unwrap_or(0),
                    routes: next().unwrap_or(0),
                    held: parts.nth(2).and_then(|v| v.parse().ok()).unwrap_or(1),
                };
                Some((pair[0].as_str(), member))
            })
            .collect()
    }
}

/// The record of a stream, as the last cycle read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Record {
    pub epoch: Option<String>,
    pub owner: Option<String>,
    pub pos: Option<Position>,
    /// How far MIN_REPLICAS_ACKED replicas hold the stream (see
    /// `confirm.lua`).
    pub safe: Option<Position>,
    /// The position as the record holds it, when no mark of the pool can
    /// have made it (past the clock, or no position at all): see
    /// `Fenced::repair`.
    pub impossible: Option<String>,
}

/// What a cycle saw of the pool and of this process, for [`decide`].
#[derive(Debug, Clone, Copy)]
pub(super) struct View<'a> {
    /// This process's name among the members.
    pub member: &'a str,
    /// The members, as their last beats say.
    pub members: &'a HashMap<&'a str, Member>,
    /// Server time (ms) of the cycle.
    pub now_ms: u64,
    /// This process's clock at the cycle.
    pub now: Instant,
    /// TAKEOVER_AFTER.
    pub takeover_after: Duration,
    /// The last mark this process's readers delivered.
    pub seen: u64,
    /// The mark this process's sequence is whole since (`u64::MAX`: it has
    /// no subscription now).
    pub since: u64,
    /// Whether any of this process's readers is subscribed.
    pub listening: bool,
    /// How long this process has watched the pool without a break: its
    /// member entry there, its cycles answered, no member's beat gone back
    /// (Redis's data lost or restored from an older copy). A member's beat
    /// is only as fresh as the data it is read from: after a break every
    /// member looks silent for as long as nobody could beat, or since the
    /// restored copy was taken, though they live on. So silence counts only
    /// from the start of the watch, and a process counts itself the most
    /// complete only once the others have had TAKEOVER_AFTER to beat.
    pub watched: Duration,
    /// MIN_REPLICAS_ACKED is on: a standby drops its copies only as far as
    /// the replicas hold the stream (the record's `safe`).
    pub wait_replicas: bool,
}

impl View<'_> {
    fn since(&self, at: Instant) -> Duration {
        self.now.saturating_duration_since(at)
    }

    /// Milliseconds since `member`'s last beat (server time), but no more
    /// than this process has watched (see [`View::watched`]).
    fn silent_ms(&self, member: &Member) -> u64 {
        let watched = self.watched.as_millis() as u64;
        self.now_ms.saturating_sub(member.beat).min(watched)
    }

    /// The others have had TAKEOVER_AFTER to beat since the watch began.
    fn settled(&self) -> bool {
        self.watched >= self.takeover_after
    }
}

/// What [`decide`] asks of the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// Nothing to ask of Redis.
    Stay,
    /// Give the stream back (`release.lua` with this epoch).
    Release { epoch: String },
    /// Take the stream over from the record's epoch (`takeover.lua`):
    /// why, and whether without a hole from the record's position on.
    TakeOver { why: &'static str, clean: bool },
}

/// What `lane` does with its stream's `record`: its state brought up to
/// the record, and the step it asks of the loop.
pub(super) fn decide(
    lane: &mut LaneState,
    record: &Record,
    view: &View,
    counters: &Counters,
) -> Step {
    if let Role::Writer { epoch } = &lane.role {
        if record.epoch.as_deref() == Some(epoch.as_str()) {
            return as_writer(lane, record, view, counters);
        }
        let stream = lane.lane.stream();
        match &record.epoch {
            None => {
                tracing::warn!(stream = %stream, record = %lane.lane.keys.writer, "the stream's writer record is gone (deleted, or lost with Redis's data): keeping the copies as a standby until a writer takes the stream again")
            }
            Some(_) => {
                tracing::info!(stream = %stream, "another process writes this stream now (fenced): keeping the copies as a standby")
            }
        }
        lane.stand_by();
    }
    as_standby(lane, record, view, counters)
}

/// A writer whose record still holds its epoch.
fn as_writer(lane: &mut LaneState, record: &Record, view: &View, counters: &Counters) -> Step {
    let stream = lane.lane.clone();
    let stream = stream.stream();
    // MIN_REPLICAS_ACKED: a record behind what this writer wrote, nothing
    // on its way, went back (a failover took writes back): read as after a
    // failed write, even on a stream with nothing new to write.
    if lane.keep_unconfirmed && lane.in_flight.is_empty() && record.pos < lane.pos {
        lane.resync = true;
    }
    if lane.resync && lane.in_flight.is_empty() {
        // The record went back (a failover lost writes the replicas did
        // not hold): what was written after it is written again.
        lane.unwrite_after(record.pos);
        if let Some(pos) = record.pos {
            let covered = lane
                .queue
                .iter()
                .take_while(|q| q.m.position.is_some_and(|p| p <= pos))
                .count();
            pop(lane, covered, counters);
            lane.record_at(Some(pos), view.now);
        } else if lane.keep_unconfirmed {
            // (The takeover replicated, none of its writes: from nothing.)
            lane.record_at(None, view.now);
        }
        // The refused message is the first after the record's position
        // that the write carried: re-sent copies passed over (never in a
        // write) may come before it.
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
    // Its sequence has a hole after what it wrote (every reader was lost at
    // once, and one is back): messages in the hole may be in other
    // processes' hands, and writing on past it would let the record pass
    // them. Once it has written what it holds from before the hole, it
    // gives the stream back; the most complete process takes it.
    let hole = lane.hole(view.since).is_some_and(|h| {
        lane.in_flight.is_empty()
            && lane
                .queue
                .front()
                .is_none_or(|q| q.m.position.is_none_or(|p| p.mark >= h))
    });
    if hole {
        tracing::info!(stream = %stream, "this process missed messages after the last it wrote (all its subscriptions were lost): giving the stream back");
    }
    let quiet = view.since(lane.last_active) >= QUIET_RELEASE;
    match &lane.role {
        Role::Writer { epoch } if hole || idle && (!view.listening || quiet) => Step::Release {
            epoch: epoch.clone(),
        },
        _ => Step::Stay,
    }
}

/// A standby (or a writer fenced just now).
fn as_standby(lane: &mut LaneState, record: &Record, view: &View, counters: &Counters) -> Step {
    let takeover_ms = view.takeover_after.as_millis() as u64;
    if view.wait_replicas {
        // What the record passed is kept apart until the replicas hold it
        // (a failover could take it back), and written again if the record
        // went back before it.
        lane.unwrite_after(record.pos);
    }
    if let Some(pos) = record.pos {
        cover(lane, pos, counters);
    }
    if view.wait_replicas
        && let Some(safe) = record.safe.min(record.pos)
    {
        lane.confirmed_through(safe);
    }
    if record.pos != lane.pos {
        lane.record_at(record.pos, view.now);
    }
    // (A record naming this process is not a live writer: nobody writes
    // with it.)
    let owner = record
        .owner
        .as_deref()
        .and_then(|o| view.members.get(o).map(|m| (o, *m)));
    let live = owner
        .filter(|(name, m)| *name != view.member && view.silent_ms(m) <= takeover_ms)
        .map(|(_, m)| m);
    match live {
        Some(m) => {
            lane.writer_live_at = Some(view.now);
            lane.writer_seen = m.seen;
            lane.writer_since = m.since;
        }
        None => lane.writer_live_at = None,
    }
    let Some(why) = why_take_over(lane, record, owner, view) else {
        lane.wanted_since = None;
        return Step::Stay;
    };
    // A process without a subscription takes nothing over.
    if view.since == u64::MAX {
        lane.wanted_since = None;
        return Step::Stay;
    }
    // A writer that lives on (it beats) is replaced only by a process
    // without a hole from the record's position on: else the record would
    // pass messages that only the writer holds.
    let lives_on = matches!(why, WRITER_DEAF | WRITER_STUCK);
    // Without a hole from the record's position on, take it at once. Else
    // the most complete live process (whole since the earliest mark) takes
    // it; the others give it time to. (Handed to this strategy, everything
    // before H is the other's.)
    let covered = record
        .pos
        .map(|p| p.mark)
        .max((lane.floor > 0).then_some(lane.floor));
    let whole_since = view.since.max(lane.shed_through);
    let clean = covered.is_some_and(|c| whole_since <= c);
    let me = (whole_since, view.member);
    // A live process that said it had no subscription counts as less
    // complete only if it said so after this one's sequence began (a mark
    // is at least its server ms × 1024): any subscription it makes later
    // starts after that. One that said so before may be reconnecting now,
    // ahead of this one, and hold what this one's hole lacks (all of a
    // pool's subscriptions drop together when the server restarts).
    let best = view.settled()
        && view.members.iter().all(|(name, m)| {
            *name == me.1
                || m.held == 0
                || view.silent_ms(m) > takeover_ms
                || match m.since {
                    u64::MAX => m.beat > whole_since >> 10,
                    since => (since, *name) > me,
                }
        });
    // A writer silent for a moment may be only paused (a starved host, a
    // stop): it holds the messages after the record's position, and a
    // takeover that passes over them would lose them. Only a writer gone
    // from the members, or silent for longer, is passed over. (A record
    // naming this process is an older one come back: nobody writes with
    // it.)
    let dead_ms = presumed_dead_after(view.takeover_after).as_millis() as u64;
    let presumed_dead =
        owner.is_none_or(|(name, m)| name == view.member || view.silent_ms(&m) > dead_ms);
    let wanted_since = *lane.wanted_since.get_or_insert(view.now);
    let waited = view.since(wanted_since) >= view.takeover_after * 2;
    if !clean && (lives_on || !presumed_dead || !best && !waited) {
        return Step::Stay;
    }
    Step::TakeOver { why, clean }
}

const NO_WRITER: &str = "the stream has no writer";
const RECORD_NAMES_ME: &str = "the record names this process, which is not writing";
const WRITER_GONE: &str = "its writer is gone";
const WRITER_SILENT: &str = "its writer fell silent";
const WRITER_DEAF: &str = "its writer stopped receiving";
const WRITER_STUCK: &str = "its writer is stuck";

/// Why a standby holding copies would take the stream over, if it would.
fn why_take_over(
    lane: &LaneState,
    record: &Record,
    owner: Option<(&str, Member)>,
    view: &View,
) -> Option<&'static str> {
    let front = lane.queue.front()?;
    let takeover_ms = view.takeover_after.as_millis() as u64;
    let waiting = view.since(front.m.received_at);
    let stuck = stuck_after(view.takeover_after);
    match (&record.epoch, record.owner.as_deref(), owner) {
        (None, _, _) | (_, None, _) => Some(NO_WRITER),
        // An older record came back (a snapshot restored): it names this
        // process, which no longer writes with that epoch.
        (_, Some(o), _) if o == view.member => Some(RECORD_NAMES_ME),
        (_, Some(_), None) => Some(WRITER_GONE),
        (_, Some(_), Some((_, m))) if view.silent_ms(&m) > takeover_ms => Some(WRITER_SILENT),
        (_, Some(_), Some((_, m)))
            if waiting > view.takeover_after
                && view.seen.saturating_sub(m.seen) > takeover_ms * 1024 =>
        {
            Some(WRITER_DEAF)
        }
        _ if waiting > stuck && view.since(lane.moved_at) > stuck => Some(WRITER_STUCK),
        _ => None,
    }
}

/// This process took the stream over from `record` (see [`take_over`]):
/// it writes with `epoch` from `pos`.
pub(super) fn taken(
    lane: &mut LaneState,
    record: &Record,
    epoch: String,
    pos: Option<Position>,
    view: &View,
    counters: &Counters,
) {
    lane.stand_by();
    lane.role = Role::Writer { epoch };
    lane.taken_since = view.since;
    lane.wanted_since = None;
    if let Some(pos) = pos {
        cover(lane, pos, counters);
    }
    lane.pos = pos;
    lane.moved_at = view.now;
    // Copies held for another writer (not a free stream's).
    if record.owner.is_some() {
        for q in lane.queue.iter_mut() {
            q.taken_over = true;
        }
    }
}

/// How long a writer may leave the position unmoved, with copies waiting,
/// before it counts as stuck.
pub(super) fn stuck_after(takeover_after: Duration) -> Duration {
    (takeover_after * 20).max(Duration::from_secs(5))
}

/// How long a writer must have been silent before a process that lacks some
/// of the messages after the record's position takes its stream over (and
/// passes over what it lacks): long enough that a writer only paused (a
/// starved host) is not taken for dead.
pub(super) fn presumed_dead_after(takeover_after: Duration) -> Duration {
    (takeover_after * 8).max(Duration::from_secs(2))
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

#[cfg(test)]
mod tests {
    //! The decision without Redis: each case sets a lane, the members and
    //! the time, and checks the step and the lane's state.

    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use super::super::lane::Queued;
    use super::super::window::Window;
    use super::*;
    use crate::bridge::delivery::{Destination, Message};

    const TAKEOVER_AFTER: Duration = Duration::from_secs(1);
    /// Server time (ms) of the cycles.
    const NOW_MS: u64 = 1_000_000;

    fn at(mark: u64) -> Position {
        Position { mark, seq: 1 }
    }

    fn record(epoch: &str, owner: &str, pos: Option<u64>) -> Record {
        Record {
            epoch: Some(epoch.into()),
            owner: Some(owner.into()),
            pos: pos.map(at),
            safe: None,
            impossible: None,
        }
    }

    /// A lane, and the pool and this process as a cycle sees them.
    struct Case {
        lane: LaneState,
        counters: Counters,
        pool: Pool,
    }

    struct Pool {
        members: HashMap<&'static str, Member>,
        /// When the lane was made and its copies received.
        start: Instant,
        /// How long after `start` the cycle runs.
        after: Duration,
        since: u64,
        seen: u64,
        listening: bool,
        /// How long the process has watched the pool.
        watched: Duration,
        wait_replicas: bool,
    }

    impl Pool {
        fn view(&self) -> View<'_> {
            View {
                member: "me",
                members: &self.members,
                now_ms: NOW_MS,
                now: self.start + self.after,
                takeover_after: TAKEOVER_AFTER,
                seen: self.seen,
                since: self.since,
                listening: self.listening,
                watched: self.watched,
                wait_replicas: self.wait_replicas,
            }
        }
    }

    impl Case {
        /// A standby of stream `s` holding copies of these marks, whole
        /// since mark 0, alone in the pool and settled.
        fn holding(marks: &[u64]) -> Self {
            let lane = Arc::new(Lane::new(Destination::new("s", "c"), None));
            let mut state = LaneState::new(lane.clone(), Window::new(Duration::ZERO, None), 0);
            let start = Instant::now();
            for &mark in marks {
                let mut m = Message::with_id(format!("m{mark}"), "x", lane.clone());
                m.position = Some(at(mark));
                m.received_at = start;
                state.queue.push_back(Queued {
                    m,
                    fate: Fate::Write,
                    decided: false,
                    taken_over: false,
                });
            }
            let pool = Pool {
                members: HashMap::new(),
                start,
                after: Duration::ZERO,
                since: 0,
                seen: 0,
                listening: true,
                watched: Duration::from_secs(3600),
                wait_replicas: false,
            };
            Self {
                lane: state,
                counters: Counters::default(),
                pool,
            }
        }

        fn writer(mut self, epoch: &str, pos: Option<u64>) -> Self {
            self.lane.role = Role::Writer {
                epoch: epoch.into(),
            };
            self.lane.pos = pos.map(at);
            self
        }

        /// A member whose last beat was `silent_ms` ago.
        fn member(mut self, name: &'static str, silent_ms: u64, seen: u64, since: u64) -> Self {
            let member = Member {
                beat: NOW_MS - silent_ms,
                seen,
                since,
                routes: 0,
                held: 1,
            };
            self.pool.members.insert(name, member);
            self
        }

        fn decide(&mut self, record: &Record) -> Step {
            decide(&mut self.lane, record, &self.pool.view(), &self.counters)
        }

        fn marks(&self) -> Vec<u64> {
            let marks = self.lane.queue.iter().map(|q| q.m.position.unwrap().mark);
            marks.collect()
        }

        /// The marks of the copies kept until the replicas hold them.
        fn unconfirmed(&self) -> Vec<u64> {
            let marks = self.lane.unconfirmed.iter();
            marks.map(|q| q.m.position.unwrap().mark).collect()
        }

        fn count(counter: &std::sync::atomic::AtomicU64) -> u64 {
            counter.load(Ordering::Relaxed)
        }
    }

    fn take_over(why: &'static str, clean: bool) -> Step {
        Step::TakeOver { why, clean }
    }

    #[test]
    fn a_standby_leaves_a_live_writer_alone_and_drops_what_it_wrote() {
        let mut case = Case::holding(&[10, 20, 30]).member("w", 100, 30, 0);
        assert_eq!(case.decide(&record("e1", "w", Some(20))), Step::Stay);
        assert_eq!(case.marks(), [30], "copies the record passed are dropped");
        assert_eq!(Case::count(&case.counters.duplicates_skipped), 2);
        assert!(
            case.lane.writer_live_at.is_some(),
            "the writer was seen alive"
        );
        assert_eq!(case.lane.writer_seen, 30);
        assert_eq!(case.lane.pos, Some(at(20)));
    }

    #[test]
    fn a_stream_without_a_writer_is_taken_by_a_settled_process() {
        let mut case = Case::holding(&[10]);
        let free = Record::default();
        assert_eq!(case.decide(&free), take_over(NO_WRITER, false));
        case.pool.watched = Duration::ZERO;
        assert_eq!(
            case.decide(&free),
            Step::Stay,
            "not settled: the others may not have beaten yet"
        );
        case.pool.after = TAKEOVER_AFTER * 2;
        assert_eq!(
            case.decide(&free),
            take_over(NO_WRITER, false),
            "after 2 x TAKEOVER_AFTER anyway"
        );
    }

    #[test]
    fn a_clean_standby_takes_over_from_a_silent_writer_at_once() {
        let mut case = Case::holding(&[20]).member("w", 1_500, 20, 0);
        case.pool.since = 5;
        let step = case.decide(&record("e1", "w", Some(10)));
        assert_eq!(step, take_over(WRITER_SILENT, true));
    }

    #[test]
    fn silence_counts_only_from_the_start_of_the_watch() {
        // An older copy of the data restored (or Redis back after an
        // outage): the writer's beat in it is 5 s old, but it lives on and
        // beats again within a cycle. Until this process has watched for
        // TAKEOVER_AFTER, it is not silent, and a hole waits for it.
        let dead_ms = presumed_dead_after(TAKEOVER_AFTER).as_millis() as u64;
        let mut case = Case::holding(&[20]).member("w", dead_ms + 5_000, 20, 0);
        case.pool.since = 15;
        case.pool.watched = Duration::from_millis(40);
        let rec = record("e1", "w", Some(10));
        assert_eq!(case.decide(&rec), Step::Stay, "watched for 40 ms only");
        case.pool.since = 5;
        assert_eq!(
            case.decide(&rec),
            Step::Stay,
            "even without a hole: a live writer is not replaced"
        );
        case.pool.watched = Duration::from_millis(dead_ms + 1);
        assert_eq!(case.decide(&rec), take_over(WRITER_SILENT, true));
    }

    #[test]
    fn a_standby_with_a_hole_waits_until_the_writer_is_presumed_dead() {
        // Whole only since mark 15, after the record's 10: the writer may
        // hold messages between them that this process lacks.
        let mut case = Case::holding(&[20]).member("w", 1_500, 20, 0);
        case.pool.since = 15;
        let rec = record("e1", "w", Some(10));
        assert_eq!(case.decide(&rec), Step::Stay, "silent for 1.5 s only");
        let dead_ms = presumed_dead_after(TAKEOVER_AFTER).as_millis() as u64;
        case = case.member("w", dead_ms + 1, 20, 0);
        assert_eq!(case.decide(&rec), take_over(WRITER_SILENT, false));
    }

    #[test]
    fn among_processes_with_a_hole_the_most_complete_takes_over_first() {
        let rec = record("e1", "gone", Some(10));
        // "other" is whole since 12, this process since 15.
        let mut case = Case::holding(&[20]).member("other", 0, 20, 12);
        case.pool.since = 15;
        assert_eq!(case.decide(&rec), Step::Stay, "the other one first");
        case.pool.after = TAKEOVER_AFTER * 2;
        assert_eq!(
            case.decide(&rec),
            take_over(WRITER_GONE, false),
            "the other one did not within 2 x TAKEOVER_AFTER"
        );
        // A less complete other process waits for this one.
        let mut case = Case::holding(&[20]).member("other", 0, 20, 18);
        case.pool.since = 15;
        assert_eq!(case.decide(&rec), take_over(WRITER_GONE, false));
        // One that stopped beating or has no subscription counts for nothing.
        let mut case =
            Case::holding(&[20])
                .member("silent", 5_000, 20, 1)
                .member("deaf", 0, 20, u64::MAX);
        case.pool.since = 15;
        assert_eq!(case.decide(&rec), take_over(WRITER_GONE, false));
        // But one that said it had no subscription before this one's
        // sequence began may be subscribing again ahead of it (a server
        // restart drops every subscription): it is given the time to say.
        let mut case = Case::holding(&[20]).member("reconnecting", 100, 20, u64::MAX);
        case.pool.since = (NOW_MS - 50) << 10;
        assert_eq!(case.decide(&rec), Step::Stay, "the reconnecting one first");
        case.pool.after = TAKEOVER_AFTER * 2;
        assert_eq!(case.decide(&rec), take_over(WRITER_GONE, false));
        // A process that waits for a place among the holders (STANDBYS)
        // holds nothing: it is not waited for, whenever it last said so
        // (after a failover's leap its beats may read as early).
        let mut case = Case::holding(&[20]).member("reconnecting", 100, 20, u64::MAX);
        case.pool.members.get_mut("reconnecting").unwrap().held = 0;
        case.pool.since = (NOW_MS - 50) << 10;
        assert_eq!(case.decide(&rec), take_over(WRITER_GONE, false));
    }

    #[test]
    fn a_writer_that_lives_on_is_replaced_only_without_a_hole() {
        // It beats but stopped receiving: its last mark is far behind.
        let deaf = |since: u64| {
            let mut case = Case::holding(&[20]).member("w", 0, 1, 0);
            case.pool.seen = 5_000_000;
            case.pool.after = TAKEOVER_AFTER * 2;
            case.pool.since = since;
            case
        };
        let rec = record("e1", "w", Some(10));
        assert_eq!(deaf(5).decide(&rec), take_over(WRITER_DEAF, true));
        assert_eq!(deaf(15).decide(&rec), Step::Stay, "a hole: never");
        let mut later = deaf(15);
        later.pool.after = Duration::from_secs(3_600);
        assert_eq!(later.decide(&rec), Step::Stay, "not even much later");
        // Copies received just now: the writer is not late yet.
        let mut fresh = deaf(5);
        fresh.pool.after = Duration::ZERO;
        assert_eq!(fresh.decide(&rec), Step::Stay);
    }

    #[test]
    fn a_writer_that_moves_nothing_for_long_is_stuck() {
        let mut case = Case::holding(&[20]).member("w", 0, 20, 0);
        // The record has been at 10 since the lane began.
        case.lane.pos = Some(at(10));
        let stuck = stuck_after(TAKEOVER_AFTER);
        let rec = record("e1", "w", Some(10));
        case.pool.after = stuck - Duration::from_millis(1);
        assert_eq!(case.decide(&rec), Step::Stay);
        case.pool.after = stuck + Duration::from_millis(1);
        assert_eq!(case.decide(&rec), take_over(WRITER_STUCK, true));
        // A record that moves is not stuck, however long the copies wait.
        let mut moving = Case::holding(&[20]).member("w", 0, 20, 0);
        moving.pool.after = stuck * 2;
        assert_eq!(moving.decide(&record("e1", "w", Some(11))), Step::Stay);
    }

    #[test]
    fn a_process_without_a_subscription_takes_nothing_over() {
        let mut case = Case::holding(&[20]);
        case.pool.since = u64::MAX;
        assert_eq!(case.decide(&Record::default()), Step::Stay);
        assert_eq!(case.lane.wanted_since, None);
    }

    #[test]
    fn a_record_naming_this_process_is_no_live_writer() {
        // An older record came back (a snapshot restored), naming "me".
        let mut case = Case::holding(&[20]).member("me", 0, 20, 0);
        let step = case.decide(&record("old", "me", Some(10)));
        assert_eq!(step, take_over(RECORD_NAMES_ME, true));
        assert!(case.lane.writer_live_at.is_none());
    }

    #[test]
    fn a_fenced_writer_becomes_a_standby() {
        let mut case = Case::holding(&[20])
            .writer("e1", Some(10))
            .member("w", 0, 20, 0);
        case.lane.resync = true;
        case.lane.refused = Some((at(20), "too big".into()));
        assert_eq!(case.decide(&record("e2", "w", Some(10))), Step::Stay);
        assert!(!case.lane.is_writer());
        assert!(!case.lane.resync && case.lane.refused.is_none());
        assert_eq!(case.marks(), [20], "the copies are kept");
    }

    #[test]
    fn an_idle_writer_gives_the_stream_back_when_deaf_or_quiet() {
        let rec = record("e1", "me", Some(10));
        let release = Step::Release { epoch: "e1".into() };
        let mut case = Case::holding(&[]).writer("e1", Some(10));
        assert_eq!(case.decide(&rec), Step::Stay, "idle, listening, active");
        case.pool.listening = false;
        assert_eq!(case.decide(&rec), release, "its readers are gone");
        case.pool.listening = true;
        case.pool.after = QUIET_RELEASE;
        assert_eq!(case.decide(&rec), release, "quiet for QUIET_RELEASE");
        let mut busy = Case::holding(&[20]).writer("e1", Some(10));
        busy.pool.listening = false;
        assert_eq!(busy.decide(&rec), Step::Stay, "it still holds copies");
    }

    #[test]
    fn a_writer_with_a_hole_gives_the_stream_back_once_it_wrote_what_came_before() {
        let rec = record("e1", "me", Some(10));
        // Whole only since mark 20: messages between 10 and 20 may be
        // missing here.
        let mut case = Case::holding(&[15, 25]).writer("e1", Some(10));
        case.pool.since = 20;
        assert_eq!(case.decide(&rec), Step::Stay, "15 is still to write");
        case.lane.queue.pop_front();
        let release = Step::Release { epoch: "e1".into() };
        assert_eq!(case.decide(&rec), release);
        // Taken over whole since 20: no hole.
        case.lane.taken_since = 20;
        assert_eq!(case.decide(&rec), Step::Stay);
    }

    #[test]
    fn a_writer_reading_its_record_after_a_failed_write_counts_what_was_written() {
        let mut case = Case::holding(&[10, 20, 30]).writer("e1", Some(5));
        case.lane.resync = true;
        assert_eq!(case.decide(&record("e1", "me", Some(20))), Step::Stay);
        assert_eq!(case.marks(), [30]);
        assert_eq!(Case::count(&case.counters.written), 2);
        assert_eq!(case.lane.pos, Some(at(20)));
        assert!(!case.lane.resync, "it writes again");
    }

    #[test]
    fn a_refused_message_is_dead_lettered_then_given_up() {
        let rec = record("e1", "me", Some(10));
        let mut case = Case::holding(&[20, 30]).writer("e1", Some(10));
        case.lane.resync = true;
        case.lane.refused = Some((at(20), "too big".into()));
        case.decide(&rec);
        let front = &case.lane.queue[0];
        assert_eq!(
            front.m.rejected.as_deref(),
            Some("the stream refused it: too big")
        );
        assert_eq!(front.fate, Fate::Write, "to the dead-letter stream");
        // The dead-letter stream refuses it too.
        case.lane.resync = true;
        case.lane.refused = Some((at(20), "no room".into()));
        case.decide(&rec);
        assert_eq!(case.lane.queue[0].fate, Fate::GiveUp);
        assert_eq!(case.lane.queue[1].fate, Fate::Write, "the next is kept");
    }

    #[test]
    fn a_process_that_took_over_writes_from_the_record_it_found() {
        let mut case = Case::holding(&[10, 20, 30]).member("w", 9_000, 30, 0);
        case.pool.since = 7;
        let rec = record("e1", "w", Some(5));
        let view = case.pool.view();
        taken(
            &mut case.lane,
            &rec,
            "e2".into(),
            Some(at(10)),
            &view,
            &case.counters,
        );
        assert!(matches!(&case.lane.role, Role::Writer { epoch } if epoch == "e2"));
        assert_eq!(case.marks(), [20, 30], "what the record passes is dropped");
        assert_eq!(case.lane.pos, Some(at(10)));
        assert_eq!(case.lane.taken_since, 7);
        assert!(
            case.lane.queue.iter().all(|q| q.taken_over),
            "copies held for another writer are counted as taken over"
        );
    }

    #[test]
    fn with_min_replicas_acked_a_standby_keeps_what_the_replicas_may_not_hold() {
        let mut case = Case::holding(&[10, 20, 30, 40]).member("w", 100, 40, 0);
        case.pool.wait_replicas = true;
        case.lane.keep_unconfirmed = true;
        let mut rec = record("e1", "w", Some(30));
        rec.safe = Some(at(10));
        assert_eq!(case.decide(&rec), Step::Stay);
        assert_eq!(
            case.marks(),
            [40],
            "only what the record has not passed waits for a write"
        );
        assert_eq!(
            case.unconfirmed(),
            [20, 30],
            "written, kept until the replicas hold them: dropped only as far as `safe`"
        );
        // A failover: the new primary's record is back at 20.
        rec.pos = Some(at(20));
        rec.safe = None;
        case.decide(&rec);
        assert_eq!(
            case.marks(),
            [30, 40],
            "what the failover took back waits for a write again"
        );
        assert_eq!(case.unconfirmed(), [20]);
        // The replicas hold it all.
        rec.pos = Some(at(40));
        rec.safe = Some(at(40));
        case.decide(&rec);
        assert!(case.marks().is_empty() && case.unconfirmed().is_empty());
    }

    #[test]
    fn with_min_replicas_acked_written_copies_are_not_a_stuck_writer() {
        let mut case = Case::holding(&[10, 20]).member("w", 100, 30, 0);
        case.pool.wait_replicas = true;
        case.lane.keep_unconfirmed = true;
        for q in case.lane.queue.iter_mut() {
            q.m.received_at = Instant::now() - Duration::from_secs(3600);
        }
        case.lane.moved_at = Instant::now() - Duration::from_secs(3600);
        let rec = record("e1", "w", Some(20));
        assert_eq!(
            case.decide(&rec),
            Step::Stay,
            "copies the record passed wait only for the replicas, not for the writer"
        );
    }

    #[test]
    fn a_writer_whose_record_went_back_writes_the_unconfirmed_again() {
        let mut case = Case::holding(&[10, 20, 30]).writer("e1", Some(5));
        case.lane.keep_unconfirmed = true;
        // Written up to 30 on the old primary, confirmed nowhere.
        pop(&mut case.lane, 3, &case.counters);
        case.lane.pos = Some(at(30));
        assert!(case.lane.queue.is_empty());
        // The new primary's record holds 10: 20 and 30 are gone.
        case.lane.resync = true;
        assert_eq!(case.decide(&record("e1", "me", Some(10))), Step::Stay);
        assert_eq!(case.marks(), [20, 30], "written again");
        assert_eq!(
            case.unconfirmed(),
            [10],
            "still in the stream, not yet on the replicas"
        );
        assert_eq!(case.lane.pos, Some(at(10)));
    }

    #[test]
    fn a_quiet_writer_whose_record_went_back_writes_the_unconfirmed_again() {
        let mut case = Case::holding(&[10, 20, 30]).writer("e1", Some(5));
        case.lane.keep_unconfirmed = true;
        pop(&mut case.lane, 3, &case.counters);
        case.lane.pos = Some(at(30));
        // Nothing new to write, no write failed: only the record says so.
        assert_eq!(case.decide(&record("e1", "me", Some(10))), Step::Stay);
        assert_eq!(case.marks(), [20, 30], "written again");
        assert_eq!(case.lane.pos, Some(at(10)));
    }

    #[test]
    fn members_are_read_from_the_cycle_reply() {
        let flat: Vec<String> = ["a", "100:7:3:42", "b", "200:8", "bad", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let members = Member::parse_all(&flat);
        assert_eq!(members.len(), 2, "{members:?}");
        let a = members["a"];
        assert_eq!((a.beat, a.seen, a.since, a.routes), (100, 7, 3, 42));
        let b = members["b"];
        assert_eq!((b.beat, b.seen, b.since, b.routes), (200, 8, 0, 0));
    }
}
