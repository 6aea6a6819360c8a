//! The pool's members: every process of a pool on one server, whatever its
//! strategy, runs `cycle.lua` every [`super::fenced::CYCLE_EVERY`]: it
//! beats in the members hash (`{<stream>}:members`), publishes a mark and
//! reads the writer records it asks about.
//!
//! **One pool, one strategy.** The two strategies keep different books (a
//! writer record; ACK keys), so a fenced and a race process on one stream
//! would each write every message. The cycle lets no process in whose
//! strategy is not that of the live members, and puts out a member that
//! finds one of another strategy that joined before it: such a process
//! writes nothing, and the bridge stops with one line ([`mixed`]).
//!
//! **Changing the strategy: the handoff.** `optimus ctl strategy <s>` sets
//! the pool's handoff key (`{<stream>}:handoff`) to the target strategy.
//! While it is set both strategies are let in. The first process of the
//! target strategy whose sequence is whole takes the handoff mark H (its
//! cycle's mark): every message from H on is the target strategy's, every
//! one before it the other's ([`Handoff::rule`]). The write scripts hold to
//! it too (lib.lua's `handoff_rule`), so a process that has not heard of H
//! yet cannot write across it. Processes of the strategy handed from drop
//! what is past H and are stopped by the operator once they hold nothing;
//! once H is taken no process of that strategy is let in ([`handed_over`]).

use std::time::Duration;

use redis::{ErrorKind, RedisError};

use super::Strategy;
use super::{Pool, scripts};
use crate::connect::Conn;

/// A member silent for this long is removed from the members hash.
pub const MEMBER_STALE: Duration = Duration::from_secs(60);
/// A member that beat within this long keeps a process of another strategy
/// out (one killed without leaving stops doing so after this).
pub const LIVE_FOR_STRATEGY: Duration = Duration::from_secs(10);

/// What the error of a mixed pool says first (see [`mixed`]).
const MIXED: &str = "another strategy writes this stream";

/// A writer record as a cycle reads it: epoch, owner, position, and the
/// position MIN_REPLICAS_ACKED replicas hold (`safe`).
pub type RawRecord = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The pool's handoff key, as a cycle read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handoff {
    /// The strategy the pool is handed to.
    pub target: Strategy,
    /// The handoff mark H, once taken.
    pub at: Option<u64>,
    /// The mark of the handoff before this one (0: none): what came before
    /// it is the target strategy's too.
    pub floor: u64,
}

/// What a process may do with a message under a handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Write it (as its strategy does).
    Yes,
    /// It is the other strategy's: drop the copy.
    No,
    /// Hold it: it may be this strategy's once H is taken.
    Wait,
}

impl Handoff {
    /// The key's value ("<target>", "<target>:<H>", "<target>::<floor>",
    /// "<target>:<H>:<floor>"); `None` for none, or one no optimus wrote.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.split(':');
        let target = match parts.next()? {
            "fenced" => Strategy::Fenced,
            "race" => Strategy::Race,
            _ => return None,
        };
        let number = |part: Option<&str>| -> Option<Option<u64>> {
            match part {
                None | Some("") => Some(None),
                Some(n) => n.parse().ok().map(Some),
            }
        };
        let at = number(parts.next())?;
        let floor = number(parts.next())?.unwrap_or(0);
        if parts.next().is_some() {
            return None;
        }
        Some(Self { target, at, floor })
    }

    /// The key's value for this handoff.
    pub fn value(&self) -> String {
        let at = self.at.map(|at| at.to_string()).unwrap_or_default();
        match self.floor {
            0 if at.is_empty() => self.target.name().to_string(),
            0 => format!("{}:{at}", self.target.name()),
            floor => format!("{}:{at}:{floor}", self.target.name()),
        }
    }

    /// What a process of strategy `mine` does with a message whose position
    /// has mark `mark` (`None`: no position, a cluster's): as lib.lua's
    /// `handoff_rule`.
    pub fn rule(handoff: Option<Self>, mine: Strategy, mark: Option<u64>) -> Rule {
        let (Some(h), Some(mark)) = (handoff, mark) else {
            return Rule::Yes;
        };
        let ours = h.target == mine;
        let (theirs, wait) = match ours {
            true => (Rule::No, Rule::Wait),
            false => (Rule::Yes, Rule::Yes),
        };
        let mine_rule = if ours { Rule::Yes } else { Rule::No };
        if mark < h.floor {
            return mine_rule;
        }
        match h.at {
            None => wait,
            Some(at) if mark >= at => mine_rule,
            Some(_) => theirs,
        }
    }
}

/// What a cycle found.
#[derive(Debug)]
pub struct Cycle {
    /// The mark it published: above every mark published before.
    pub mark: u64,
    /// The server's time, ms.
    pub now_ms: u64,
    /// The members (name, value, …), this process's entry among them.
    pub members: Vec<String>,
    /// The records asked about, in the order asked.
    pub records: Vec<RawRecord>,
    /// This process's entry is new (first cycle, or Redis lost the hash).
    pub new: bool,
    /// The pool's handoff, if one was asked for.
    pub handoff: Option<Handoff>,
    /// Since when (server ms) this process holds copies: 0 while it
    /// waits for a place among the holders (see [`Holding`]).
    pub held: u64,
}

/// Which processes of a pool hold copies of the messages (subscribe to
/// the channels): every one of them, or at most `limit` (the writer and
/// STANDBYS standbys). The others wait: they beat among the members and
/// read nothing, and take a holder's place when one leaves, gives it up,
/// or falls silent for `live_for`. A process that holds gives its place
/// back when `limit` others come before it (more complete, or as complete
/// and holding since earlier: a holder that was paused came back, or Redis
/// lost the members and two took one place); a writer keeps its place
/// (see `cycle.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// The most processes that hold copies (0: every one).
    pub limit: usize,
    /// Since when (server ms) this process holds copies (0: it waits).
    pub held: u64,
    /// What it may do with its place this cycle.
    pub may: Place,
    /// How long a holder that beat counts as live.
    pub live_for: Duration,
}

/// What a process may do with its place among the holders this cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Take one, if one is free (it waits, and is not leaving).
    Claim,
    /// Give it back, if enough others come before it (it writes nothing).
    Release,
    /// Keep what it has: a writer; or, with 0 held, none (it is stopping,
    /// or runs no worker).
    Keep,
}

impl Holding {
    /// Every process holds copies (the race strategy; STANDBYS=all).
    pub fn everyone() -> Self {
        Self {
            limit: 0,
            held: 0,
            may: Place::Keep,
            live_for: Duration::ZERO,
        }
    }

    /// The cycle script's argument: "<held>:<may>".
    fn arg(&self) -> String {
        let may = match self.may {
            Place::Claim => 'c',
            Place::Release => 'r',
            Place::Keep => '-',
        };
        format!("{}:{may}", self.held)
    }
}

/// This process's beat.
#[derive(Debug, Clone, Copy)]
pub struct Beat<'a> {
    pub pool: &'a Pool,
    /// Its member name.
    pub member: &'a str,
    pub strategy: Strategy,
    /// The last mark its readers delivered, the mark its sequence is whole
    /// since, its routes' fingerprint.
    pub seen: u64,
    pub since: u64,
    pub routes: u64,
    /// Whether it holds copies, or waits for a place.
    pub holding: Holding,
}

impl Beat<'_> {
    /// Runs one cycle, asking for the records `records` (keys); `leaving`
    /// takes this process out of the members. A process kept out by another
    /// strategy's is told so with the error [`mixed`] makes.
    pub async fn cycle(
        &self,
        conn: &mut Conn,
        records: &[&str],
        leaving: bool,
    ) -> Result<Cycle, RedisError> {
        let mut keys: Vec<&str> = vec![&self.pool.clock, &self.pool.members, &self.pool.handoff];
        // On a cluster the records live in their streams' slots: read apart,
        // and before the mark, so that no position in them is past it.
        let apart = match self.pool.sharded {
            true => Some(read_records(conn, records).await?),
            false => {
                keys.extend_from_slice(records);
                None
            }
        };
        let mut cmd = scripts::evalsha(scripts::CYCLE, &keys);
        cmd.arg(self.member)
            .arg(format!("{}:{}:{}", self.seen, self.since, self.routes))
            .arg(&self.pool.marks)
            .arg(if leaving { 0 } else { 1 })
            .arg(MEMBER_STALE.as_millis() as u64)
            .arg(self.strategy.name())
            .arg(LIVE_FOR_STRATEGY.as_millis() as u64)
            .arg(if self.pool.sharded { 1 } else { 0 })
            .arg(self.holding.limit)
            .arg(self.holding.arg())
            .arg(self.holding.live_for.as_millis() as u64);
        type Reply = (
            u64,
            u64,
            Vec<String>,
            Vec<RawRecord>,
            u8,
            String,
            u8,
            String,
            u64,
        );
        let (mark, now_ms, members, records, new, others, clock_missing, handoff, held): Reply =
            scripts::run(conn, cmd).await?;
        let records = apart.unwrap_or(records);
        let handoff = Handoff::parse(&handoff);
        if others == "handoff" {
            return Err(handed_over(self.strategy, handoff));
        }
        if !others.is_empty() {
            return Err(mixed(self.strategy, &others));
        }
        // (Missing before this process ever saw a mark: a new pool.)
        if clock_missing == 1 && self.seen > 0 {
            tracing::warn!(clock = %self.pool.clock, "the pool's clock was missing (deleted, or lost with Redis's data): it goes on from the server's time, never back");
        }
        Ok(Cycle {
            mark,
            now_ms,
            members,
            records,
            new: new == 1,
            handoff,
            held,
        })
    }
}

/// The writer records `keys`, each read on its own (a cluster routes each
/// to its stream's slot).
async fn read_records(conn: &mut Conn, keys: &[&str]) -> Result<Vec<RawRecord>, RedisError> {
    let mut records = Vec::with_capacity(keys.len());
    for key in keys {
        let record: RawRecord = redis::cmd("HMGET")
            .arg(*key)
            .arg(&["epoch", "owner", "pos", "safe"])
            .query_async(conn)
            .await?;
        records.push(record);
    }
    Ok(records)
}

/// The error of a process kept out of a pool of another strategy: one line
/// naming both strategies and the other processes (`others`:
/// "<name>=<strategy>,…").
pub fn mixed(mine: Strategy, others: &str) -> RedisError {
    RedisError::from((
        ErrorKind::Client,
        MIXED,
        format!(
            "this process runs STRATEGY={} and the live processes {others} run another on the same stream (each would write every message); run one strategy per pool (see docs/protocol.md)",
            mine.name()
        ),
    ))
}

/// The error of a process of the strategy a pool was handed from, once the
/// handoff mark is taken: it could write nothing.
pub fn handed_over(mine: Strategy, handoff: Option<Handoff>) -> RedisError {
    let (target, at) = handoff.map_or(("?", 0), |h| (h.target.name(), h.at.unwrap_or(0)));
    RedisError::from((
        ErrorKind::Client,
        MIXED,
        format!(
            "this process runs STRATEGY={} and the pool was handed to STRATEGY={target} (from mark {at} on): run {target}, or hand the pool back with `optimus ctl strategy {}`",
            mine.name(),
            mine.name()
        ),
    ))
}

/// The line of a [`mixed`] error, if `err` is one.
pub fn is_mixed(err: &RedisError) -> Option<String> {
    (err.kind() == ErrorKind::Client && err.to_string().starts_with(MIXED)).then(|| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handoff_key_reads_back_as_written() {
        for value in ["race", "race:7", "fenced::5", "fenced:9:5"] {
            assert_eq!(Handoff::parse(value).unwrap().value(), value);
        }
        for bad in ["", "other", "race:x", "race:1:2:3", "race:-1"] {
            assert_eq!(Handoff::parse(bad), None, "{bad}");
        }
    }

    /// Handed from fenced to race at 5, then back to fenced at 9: fenced
    /// owns what came before 5 and from 9 on, race what lies between.
    #[test]
    fn each_mark_belongs_to_one_strategy() {
        use Rule::*;
        use Strategy::{Fenced, Race};
        let rule = |value: &str, mine, mark| Handoff::rule(Handoff::parse(value), mine, Some(mark));
        for (value, mark, fenced, race) in [
            ("race", 3, Yes, Wait),
            ("race:5", 4, Yes, No),
            ("race:5", 5, No, Yes),
            ("fenced::5", 4, Yes, No),
            ("fenced::5", 6, Wait, Yes),
            ("fenced:9:5", 4, Yes, No),
            ("fenced:9:5", 6, No, Yes),
            ("fenced:9:5", 9, Yes, No),
        ] {
            assert_eq!(
                rule(value, Fenced, mark),
                fenced,
                "{value} at {mark}, fenced"
            );
            assert_eq!(rule(value, Race, mark), race, "{value} at {mark}, race");
        }
        // No key, or no position (a cluster's): always written.
        assert_eq!(Handoff::rule(None, Fenced, Some(3)), Yes);
        assert_eq!(Handoff::rule(Handoff::parse("race:5"), Fenced, None), Yes);
    }
}
