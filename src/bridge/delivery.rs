//! The lock/ACK protocol: the one place that decides which worker writes a
//! message, and makes sure nobody writes it twice.
//!
//! Every worker receives every message. For a batch of them a worker:
//! 1. **claims** them in one round trip: for each message, if its ACK key
//!    exists it was written already (`Acked`); otherwise `SET <lock> <worker>
//!    NX PX <LOCK_TTL>` either wins the lock (`Won`) or finds it held by
//!    another worker (`Held`);
//! 2. **writes** the ones it won in one atomic script: for each, only if the
//!    lock is still this worker's *and* no ACK exists, `XADD` the entry and
//!    `SET <ack> PX <ACK_TTL>` together. A worker paused past its lock TTL
//!    therefore cannot write a message another worker has written since
//!    (`Acked`), nor one whose lock it lost (`LockLost`: claim it again).
//!
//! Messages `Held` by another worker stay in the claiming worker's pending
//! list and are claimed again once that lock could have expired: an ACK means
//! done; a free lock without an ACK means the holder died, and the claim
//! takes the message over.
//!
//! That is the `race` strategy. The default, `partitioned`, uses the same ACK
//! keys but no locks: each message has one *owner* among the live workers
//! (see [`super::partition`]), which writes it with [`Delivery::write_owned`]:
//! per message `SET <ack> NX PX <ACK_TTL>` and, only if that set it, `XADD`,
//! in one script. A non-owner that has to take a message over uses the same
//! call, so whoever comes second finds the ACK and writes nothing. The
//! membership, the clock and the watermarks that let non-owners drop their
//! copies without asking Redis are kept by [`Delivery::cycle`].
//!
//! All keys carry the output stream's name as hash tag
//! (`{messages:processed}:lock:<id>`), so on a cluster they live on the
//! stream's shard and both scripts run there.

use std::sync::Arc;
use std::time::Duration;

use crate::connect::Conn;
use redis::{RedisResult, Script};

use super::message::Incoming;
use crate::config::OutputFormat;
use crate::monitor::Counters;

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
    /// The stream refused the entry (Redis's reason): nothing was added or
    /// recorded. It belongs in the dead-letter stream.
    Refused(String),
    /// Not tried: Redis refused an earlier message of the batch for a
    /// reason that passes (out of memory, no replicas, read-only, loading);
    /// try again later.
    NotTried(String),
}

/// Where a message stands after [`Delivery::settle`].
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
    /// This worker's lock ran out before the write: claim it again now.
    LockLost,
    /// The stream refused it, for this reason: nothing was written.
    Refused(String),
    /// Not tried, for a reason that passes: try again after a while.
    NotTried(String),
}

impl From<Write> for Settled {
    /// A write without a claim (partitioned strategy, fast path).
    fn from(write: Write) -> Self {
        match write {
            Write::LockLost => Settled::LockLost,
            Write::Written => Settled::Written,
            Write::Acked => Settled::Acked,
            Write::Reused => Settled::Reused,
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
    /// Another worker holds it (race): keep the copy, look again later.
    Hold,
    /// Claim and write it again now (race: its lock ran out).
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
    reused: crate::monitor::Throttle,
    refused: crate::monitor::Throttle,
}

/// Counts a message's outcome in `counters` (logging what needs it) and
/// says what to do with it next. A message the stream refused goes to the
/// dead-letter stream with Redis's reason; one the dead-letter stream
/// refuses too is counted as `refused` and given up.
pub fn tally(
    outcome: Settled,
    msg: &Incoming,
    counters: &Counters,
    worker: &str,
    warnings: &mut Warnings,
) -> Next {
    match outcome {
        Settled::Written => {
            match &msg.rejected {
                None => Counters::add(&counters.written, 1),
                Some(reason) => {
                    tracing::warn!(worker = %worker, message_id = %msg.id, reason = %reason, "message dead-lettered");
                    Counters::add(&counters.dead_lettered, 1);
                }
            }
            Next::Written
        }
        Settled::Acked => {
            Counters::add(&counters.duplicates_skipped, 1);
            Next::Done
        }
        Settled::Reused => {
            Counters::add(&counters.duplicates_skipped, 1);
            Counters::add(&counters.reused_ids, 1);
            if let Some(held_back) = warnings.reused.ready() {
                tracing::warn!(worker = %worker, message_id = %msg.id, held_back, "a message with this id was already written with other bytes: skipped (a publisher is reusing ids; see reused_ids)");
            }
            Next::Done
        }
        Settled::Held => Next::Hold,
        Settled::LockLost => Next::Again,
        Settled::Refused(why) if msg.rejected.is_none() => {
            Next::DeadLetter(format!("the stream refused it: {why}"))
        }
        Settled::Refused(why) => {
            Counters::add(&counters.refused, 1);
            if let Some(held_back) = warnings.refused.ready() {
                tracing::error!(worker = %worker, message_id = %msg.id, reason = %msg.rejected.as_deref().unwrap_or(""), dead_letter_refusal = %why, held_back, "neither the stream nor the dead-letter stream took the message: given up (see refused)");
            }
            Next::Done
        }
        Settled::NotTried(why) => Next::Later(why),
    }
}

/// The prefix of [`probe_channel`]s.
const PROBE_PREFIX: &str = "optimus:bridge:";

/// The channel every bridge subscription to `channel` also subscribes to, in
/// the same SUBSCRIBE command: `PUBSUB NUMSUB` of it counts the bridge's
/// subscriptions to `channel` and nobody else's. Nothing is ever published
/// on it. (The publisher's fast path asks it.)
pub fn probe_channel(channel: &str) -> String {
    format!("{PROBE_PREFIX}{channel}")
}

/// Whether a channel is one of optimus's own (a worker's mark channel
/// `{<stream>}:mark:<worker>`, a [`probe_channel`]): never bridged, whatever
/// pattern matches it.
pub fn is_internal_channel(name: &[u8]) -> bool {
    const MARK: &[u8] = b"}:mark:";
    name.starts_with(PROBE_PREFIX.as_bytes())
        || (name.first() == Some(&b'{') && name.windows(MARK.len()).any(|w| w == MARK))
}

/// Names of the protocol's keys.
#[derive(Debug, Clone)]
pub struct Keys {
    lock_prefix: String,
    ack_prefix: String,
    /// Partitioned strategy: the live workers, a sorted set scored by the
    /// server time (ms) at which each one's membership lapses.
    pub members: String,
    /// Partitioned strategy: the counter that orders marks.
    pub clock: String,
    watermark_prefix: String,
    mark_prefix: String,
}

impl Keys {
    pub fn new(stream: &str) -> Self {
        Self {
            lock_prefix: format!("{{{stream}}}:lock:"),
            ack_prefix: format!("{{{stream}}}:ack:"),
            members: format!("{{{stream}}}:members"),
            clock: format!("{{{stream}}}:clock"),
            watermark_prefix: format!("{{{stream}}}:watermark:"),
            mark_prefix: format!("{{{stream}}}:mark:"),
        }
    }
    /// A worker's watermark (partitioned strategy).
    pub fn watermark(&self, worker: &str) -> String {
        format!("{}{worker}", self.watermark_prefix)
    }
    /// The channel a worker's marks are published on (partitioned strategy).
    pub fn mark_channel(&self, worker: &str) -> String {
        format!("{}{worker}", self.mark_prefix)
    }
    pub fn lock(&self, id: &str) -> String {
        format!("{}{id}", self.lock_prefix)
    }
    pub fn ack(&self, id: &str) -> String {
        format!("{}{id}", self.ack_prefix)
    }
}

/// Where messages are written, and how.
#[derive(Debug, Clone)]
pub struct Destination {
    /// OUTPUT_STREAM.
    pub stream: String,
    /// Where rejected messages go, with their reason.
    pub dead_stream: String,
    /// The channel the messages came from (recorded in dead letters).
    pub channel: String,
    pub format: OutputFormat,
    /// MESSAGE_ID_FIELD (left out of flat entries: it is `message_id`).
    pub id_field: String,
}

impl Destination {
    /// The defaults of the bridge: `messages:processed`, its `:dead` stream,
    /// envelope entries.
    pub fn new(stream: &str, channel: &str) -> Self {
        Self {
            stream: stream.to_string(),
            dead_stream: format!("{stream}:dead"),
            channel: channel.to_string(),
            format: OutputFormat::Envelope,
            id_field: "message_id".into(),
        }
    }
}

/// How an output stream is kept short: a length or an age, trimmed with
/// each write (approximately, by whole macro nodes, unless `exact`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trim {
    pub cap: Cap,
    pub exact: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// XADD MAXLEN: at most this many entries.
    MaxLen(u64),
    /// XADD MINID: no entry older than this (by its id's time).
    MaxAge(Duration),
}

impl Trim {
    /// The three script arguments: kind (0 none, 1 MAXLEN, 2 MINID by age),
    /// operator, limit (entries, or milliseconds of age).
    fn args(trim: Option<Trim>) -> (u8, &'static str, u64) {
        match trim {
            None => (0, "~", 0),
            Some(t) => {
                let op = if t.exact { "=" } else { "~" };
                match t.cap {
                    Cap::MaxLen(n) => (1, op, n),
                    Cap::MaxAge(age) => (2, op, age.as_millis() as u64),
                }
            }
        }
    }
}

/// One output stream as a route reaches it: where messages go, the channel
/// they came on, the stream's keys and cap. Each message carries its lane
/// (see [`super::route`]); a batch is written stream by stream.
#[derive(Debug, Clone)]
pub struct Lane {
    pub to: Destination,
    pub keys: Keys,
    pub trim: Option<Trim>,
}

impl Lane {
    pub fn new(to: Destination, trim: Option<Trim>) -> Self {
        Self {
            keys: Keys::new(&to.stream),
            to,
            trim,
        }
    }
}

/// The XADD of the write scripts, prepended to them. ARGV[first..first+2]:
/// trim kind, operator, limit (see [`Trim::args`]); only the output stream
/// (target 1) is trimmed.
macro_rules! xadd_lua {
    () => {
        r#"
local function xadd_for(first)
  local trim, op, limit = tonumber(ARGV[first]), ARGV[first + 1], tonumber(ARGV[first + 2])
  local minid
  if trim == 2 then
    local t = redis.call('TIME')
    minid = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - limit
    if minid < 0 then minid = 0 end
  end
  return function(target, from, to)
    if target == 1 and trim == 1 then
      redis.call('XADD', KEYS[1], 'MAXLEN', op, limit, '*', unpack(ARGV, from, to))
    elseif target == 1 and trim == 2 then
      redis.call('XADD', KEYS[1], 'MINID', op, minid, '*', unpack(ARGV, from, to))
    else
      redis.call('XADD', KEYS[target], '*', unpack(ARGV, from, to))
    end
  end
end
"#
    };
}

/// Lua shared by the write scripts: `try_xadd(xadd, target, from, to)` runs
/// the XADD and returns nil when it worked, or Redis's (or Lua's) reason
/// when the stream refused the entry, and whether that refusal passes (out
/// of memory, no replicas, a read-only replica, loading, a busy or
/// misconfigured server); `write_and_ack` sets the message's ACK only once
/// its XADD worked, and asks the script to stop at a passing refusal, so
/// that nothing after it is tried and nothing is recorded for what was not
/// written.
macro_rules! try_xadd_lua {
    () => {
        r#"
local passing = {OOM = true, NOREPLICAS = true, READONLY = true, MASTERDOWN = true,
  LOADING = true, BUSY = true, TRYAGAIN = true, CLUSTERDOWN = true, MISCONF = true}
local refused_us = {NOPERM = true, NOAUTH = true, WRONGPASS = true}
local function try_xadd(xadd, target, from, to)
  local ok, err = pcall(xadd, target, from, to)
  if ok then return nil end
  local reason = type(err) == 'table' and err.err or tostring(err)
  local code = string.match(reason, '^(%u+)') or ''
  -- Refused permissions end the script with that error: retrying, or
  -- dead-lettering, cannot mend them.
  if refused_us[code] then error(err) end
  return reason, passing[code] == true
end
-- Writes one message and, only if that worked, its ACK; appends its code
-- and detail to `out`. Returns true when the script must stop here.
local function write_and_ack(xadd, target, from, to, ack, hash, ttl, out)
  local reason, stop = try_xadd(xadd, target, from, to)
  if stop then
    out[#out + 1] = 4
    out[#out + 1] = reason
    return true
  elseif reason then
    out[#out + 1] = 3
    out[#out + 1] = reason
  else
    redis.call('SET', ack, hash, 'PX', ttl)
    out[#out + 1] = 1
    out[#out + 1] = false
  end
  return false
end
"#
    };
}

/// Lua shared by the scripts that find a message's ACK:
/// `acked_code(ack key, acked value, hash, ttl)` is 2 when the ACK is this
/// message's (or says nothing of its bytes), and, when it holds another
/// payload's hash (a publisher reused the id), 5 for the one call that
/// notices it first (a marker key beside the ACK, for ACK_TTL, says it was
/// noticed) and 2 for every other: the reuse is counted once, pool-wide.
macro_rules! acked_lua {
    () => {
        r#"
local function acked_code(ack, acked, hash, ttl)
  if string.len(acked) ~= 16 or acked == hash then return 2 end
  if redis.call('SET', ack .. ':reused:' .. hash, 1, 'NX', 'PX', ttl) then return 5 end
  return 2
end
"#
    };
}

/// KEYS: lock1, ack1, lock2, ack2, …  ARGV: worker id, lock TTL in ms, ACK
/// TTL in ms, then each message's payload hash.
/// Returns per message a code and a detail: 0 = held, 1 = won, 2 = acked,
/// 5 = acked with another payload, first noticed here (see [`acked_lua`]).
/// A lock this worker already holds (a claim whose write failed, retried)
/// counts as won.
const CLAIM: &str = concat!(
    acked_lua!(),
    r#"
local out = {}
local h = 4
for i = 1, #KEYS, 2 do
  local acked = redis.call('GET', KEYS[i + 1])
  if acked then
    out[#out + 1] = acked_code(KEYS[i + 1], acked, ARGV[h], ARGV[3])
    out[#out + 1] = false
  else
    local old = redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')
    if not old or old == ARGV[1] then
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
    out[#out + 1] = false
  end
  h = h + 1
end
return out
"#
);

/// KEYS: output stream, dead-letter stream, lock1, ack1, lock2, ack2, …
/// ARGV: worker id, ACK TTL in ms, trim kind, operator, limit (see [`xadd_lua`]),
/// then per message: the target (1 = output stream, 2 = dead-letter stream),
/// its payload hash, field count n, then n values (field, value, …).
/// Returns per message a code and a detail: 0 = lock not this worker's,
/// 1 = written, 2 = acked, 5 = acked with another payload (see
/// [`acked_lua`]), 3 = refused by the stream (detail: the reason); or, last,
/// 4 = stopped (detail: the passing reason) for the rest of the batch. The
/// ACK is set only after the XADD worked.
const WRITE: &str = concat!(
    xadd_lua!(),
    try_xadd_lua!(),
    acked_lua!(),
    r#"
local xadd = xadd_for(3)
local me = ARGV[1]
local a = 6
local out = {}
for i = 3, #KEYS, 2 do
  local target = tonumber(ARGV[a])
  local hash = ARGV[a + 1]
  local n = tonumber(ARGV[a + 2])
  local acked = redis.call('GET', KEYS[i + 1])
  if redis.call('GET', KEYS[i]) ~= me then
    out[#out + 1] = 0
    out[#out + 1] = false
  elseif acked then
    out[#out + 1] = acked_code(KEYS[i + 1], acked, hash, ARGV[2])
    out[#out + 1] = false
  elseif write_and_ack(xadd, target, a + 3, a + 2 + n, KEYS[i + 1], hash, ARGV[2], out) then
    return out
  end
  a = a + 3 + n
end
return out
"#
);

/// KEYS: output stream, dead-letter stream, ack1, ack2, …
/// ARGV: ACK TTL in ms, trim kind, operator, limit (see [`xadd_lua`]), then per
/// message: the target (1 = output stream, 2 = dead-letter stream), its
/// payload hash, field count n, then n values.
/// Returns per message a code and a detail as [`WRITE`] does (without 0).
/// The ACK is set only after the XADD worked.
const WRITE_OWNED: &str = concat!(
    xadd_lua!(),
    try_xadd_lua!(),
    acked_lua!(),
    r#"
local xadd = xadd_for(2)
local a = 5
local out = {}
for i = 3, #KEYS do
  local target = tonumber(ARGV[a])
  local hash = ARGV[a + 1]
  local n = tonumber(ARGV[a + 2])
  local acked = redis.call('GET', KEYS[i])
  if acked then
    out[#out + 1] = acked_code(KEYS[i], acked, hash, ARGV[1])
    out[#out + 1] = false
  elseif write_and_ack(xadd, target, a + 3, a + 2 + n, KEYS[i], hash, ARGV[1], out) then
    return out
  end
  a = a + 3 + n
end
return out
"#
);

/// One step of the partitioned strategy's bookkeeping, atomic.
/// KEYS: members, clock, this worker's watermark, then the watermarks asked for.
/// ARGV: worker id, membership TTL in ms (0 = leave), mark channel, this
/// worker's progress (beat and watermark), its TTL in ms.
/// Renews (or ends) this worker's membership, drops lapsed members, stores the
/// watermark, then takes the next clock value and publishes it as a mark on
/// the worker's own channel: on that subscription, everything before the mark
/// was published before this clock value, everything after it, after.
/// Returns {clock, members, watermarks asked for}.
const CYCLE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
local clock = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3], clock)
local marks = {}
if #KEYS > 3 then
  marks = redis.call('MGET', unpack(KEYS, 4))
end
return {clock, members, marks}
"#;

/// KEYS: clock. ARGV: mark channel. A mark alone (see CYCLE), for a
/// subscription about to stop: it closes the last stretch of messages.
const MARK: &str = r#"
local clock = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], clock)
return clock
"#;

/// Every script of the protocol, loaded together when the server lacks one.
const SCRIPTS: [&str; 5] = [CLAIM, WRITE, WRITE_OWNED, CYCLE, MARK];

/// What one [`Delivery::cycle`] returned.
#[derive(Debug, Clone)]
pub struct CycleReply {
    /// The clock value of the mark just published.
    pub clock: u64,
    /// The live members, in no particular order.
    pub members: Vec<String>,
    /// The watermarks asked for, in order (`None`: none stored).
    pub watermarks: Vec<Option<String>>,
}

/// One worker's side of the protocol. Clones share the connection.
#[derive(Clone)]
pub struct Delivery {
    conn: Conn,
    /// Where messages without a lane of their own go; its keys also hold
    /// the partitioned strategy's bookkeeping (members, clock, watermarks).
    lane: Arc<Lane>,
    worker_id: String,
    lock_ttl_ms: u64,
    ack_ttl_ms: u64,
    claim: Script,
    write: Script,
    write_owned: Script,
    cycle: Script,
}

/// The messages of a batch that go to one lane, and their places in it.
struct Group<'a> {
    lane: Arc<Lane>,
    messages: Vec<&'a Incoming>,
    places: Vec<usize>,
}

impl Delivery {
    pub fn new(
        conn: Conn,
        to: Destination,
        worker_id: String,
        lock_ttl: Duration,
        ack_ttl: Duration,
    ) -> Self {
        Self {
            conn,
            lane: Arc::new(Lane::new(to, None)),
            worker_id,
            lock_ttl_ms: lock_ttl.as_millis().max(1) as u64,
            ack_ttl_ms: ack_ttl.as_millis().max(1) as u64,
            claim: Script::new(CLAIM),
            write: Script::new(WRITE),
            write_owned: Script::new(WRITE_OWNED),
            cycle: Script::new(CYCLE),
        }
    }

    pub fn keys(&self) -> &Keys {
        &self.lane.keys
    }

    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// A batch split by lane, in the order the lanes first appear.
    fn groups<'a>(&self, messages: &[&'a Incoming]) -> Vec<Group<'a>> {
        let mut groups: Vec<Group<'a>> = Vec::new();
        for (place, m) in messages.iter().enumerate() {
            let lane = m.lane.as_ref().unwrap_or(&self.lane);
            let found = groups
                .iter_mut()
                .find(|g| Arc::ptr_eq(&g.lane, lane) || g.lane.to.stream == lane.to.stream);
            match found {
                Some(g) => {
                    g.messages.push(m);
                    g.places.push(place);
                }
                None => groups.push(Group {
                    lane: lane.clone(),
                    messages: vec![m],
                    places: vec![place],
                }),
            }
        }
        groups
    }

    /// Partitioned strategy: writes messages without locks, each only if its
    /// ACK does not exist yet (setting it in the same step). For an owner
    /// writing its own messages and for a worker taking messages over alike.
    /// Returns `Written` or `Acked` per message.
    pub async fn write_owned(&mut self, messages: &[&Incoming]) -> RedisResult<Vec<Write>> {
        let mut out = vec![Write::Acked; messages.len()];
        for group in self.groups(messages) {
            let lane = &group.lane;
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.write_owned.get_hash())
                .arg(2 + group.messages.len());
            cmd.arg(&lane.to.stream).arg(&lane.to.dead_stream);
            for m in &group.messages {
                cmd.arg(lane.keys.ack(&m.id));
            }
            let (kind, op, limit) = Trim::args(lane.trim);
            cmd.arg(self.ack_ttl_ms).arg(kind).arg(op).arg(limit);
            for m in &group.messages {
                push_entry(&mut cmd, m, &self.worker_id, &lane.to);
            }
            let written = self.run_write(&group.messages, cmd).await?;
            place(&mut out, &group.places, written);
        }
        Ok(out)
    }

    /// Partitioned strategy: renews this worker's membership (`membership`
    /// long; `None` leaves), stores its `progress` (beat and watermark, see
    /// [`super::partition::Progress`]), publishes a mark on its mark channel,
    /// and reads the progress of the workers `asked`.
    pub async fn cycle(
        &mut self,
        membership: Option<Duration>,
        progress: &str,
        watermark_ttl: Duration,
        asked: &[String],
    ) -> RedisResult<CycleReply> {
        let keys = &self.lane.keys;
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.cycle.get_hash()).arg(3 + asked.len());
        cmd.arg(&keys.members)
            .arg(&keys.clock)
            .arg(keys.watermark(&self.worker_id));
        for worker in asked {
            cmd.arg(keys.watermark(worker));
        }
        cmd.arg(&self.worker_id)
            .arg(membership.map_or(0, |d| d.as_millis().max(1) as u64))
            .arg(keys.mark_channel(&self.worker_id))
            .arg(progress)
            .arg(watermark_ttl.as_millis().max(1) as u64);
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let ((clock, members, watermarks),): ((u64, Vec<String>, Vec<Option<String>>),) =
            self.query(&pipe).await?;
        Ok(CycleReply {
            clock,
            members,
            watermarks,
        })
    }

    /// Step 1 alone, for a whole batch in one round trip per lane.
    pub async fn claim(&mut self, messages: &[&Incoming]) -> RedisResult<Vec<Claim>> {
        let mut out = vec![Claim::Held; messages.len()];
        for group in self.groups(messages) {
            let cmd = self.claim_cmd(&group.lane, &group.messages);
            let outcomes = self.run_one(&group.messages, cmd).await?;
            let claims = group
                .messages
                .iter()
                .zip(outcomes)
                .map(|(_, outcome)| claim_outcome(outcome))
                .collect();
            place(&mut out, &group.places, claims);
        }
        Ok(out)
    }

    /// Step 2 alone: writes the messages whose lock this worker holds, in one
    /// atomic script per lane.
    pub async fn write(&mut self, messages: &[&Incoming]) -> RedisResult<Vec<Write>> {
        let mut out = vec![Write::LockLost; messages.len()];
        for group in self.groups(messages) {
            let cmd = self.write_cmd(&group.lane, &group.messages);
            let written = self.run_write(&group.messages, cmd).await?;
            place(&mut out, &group.places, written);
        }
        Ok(out)
    }

    /// Runs one of the write scripts over a batch.
    async fn run_write(
        &mut self,
        messages: &[&Incoming],
        cmd: redis::Cmd,
    ) -> RedisResult<Vec<Write>> {
        let outcomes = self.run_one(messages, cmd).await?;
        Ok(write_outcomes(messages, outcomes))
    }

    /// Runs one script over a batch; an empty batch asks nothing of Redis.
    async fn run_one(
        &mut self,
        messages: &[&Incoming],
        cmd: redis::Cmd,
    ) -> RedisResult<Vec<Outcome>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let (outcomes,): (Vec<Outcome>,) = self.query(&pipe).await?;
        Ok(outcomes)
    }

    /// Both steps for a batch in ONE round trip per lane: the claim script
    /// and the write script go out together, and the write takes exactly the
    /// messages whose lock the claim just won (it checks lock ownership
    /// itself).
    ///
    /// Sending them together closes the window in which a worker killed
    /// between its claim and its write would leave locks that block the other
    /// workers until LOCK_TTL: the server receives both commands at once.
    pub async fn settle(&mut self, messages: &[&Incoming]) -> RedisResult<Vec<Settled>> {
        let mut out = vec![Settled::Held; messages.len()];
        for group in self.groups(messages) {
            let mut pipe = redis::pipe();
            pipe.add_command(self.claim_cmd(&group.lane, &group.messages))
                .add_command(self.write_cmd(&group.lane, &group.messages));
            let (claims, writes): (Vec<Outcome>, Vec<Outcome>) = self.query(&pipe).await?;
            let writes = write_outcomes(&group.messages, writes);
            let settled = group
                .messages
                .iter()
                .zip(claims)
                .zip(writes)
                .map(|((_, claim), write)| match (claim_outcome(claim), write) {
                    // The claim may have noticed the reuse, and the write then
                    // found it noticed: Reused wins.
                    (Claim::Reused, _) | (_, Write::Reused) => Settled::Reused,
                    (Claim::Acked, _) | (_, Write::Acked) => Settled::Acked,
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

    fn claim_cmd(&self, lane: &Lane, messages: &[&Incoming]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.claim.get_hash()).arg(messages.len() * 2);
        for m in messages {
            cmd.arg(lane.keys.lock(&m.id)).arg(lane.keys.ack(&m.id));
        }
        cmd.arg(&self.worker_id)
            .arg(self.lock_ttl_ms)
            .arg(self.ack_ttl_ms);
        for m in messages {
            cmd.arg(payload_hash(m));
        }
        cmd
    }

    fn write_cmd(&self, lane: &Lane, messages: &[&Incoming]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.write.get_hash()).arg(2 + messages.len() * 2);
        cmd.arg(&lane.to.stream).arg(&lane.to.dead_stream);
        for m in messages {
            cmd.arg(lane.keys.lock(&m.id)).arg(lane.keys.ack(&m.id));
        }
        let (kind, op, limit) = Trim::args(lane.trim);
        cmd.arg(&self.worker_id)
            .arg(self.ack_ttl_ms)
            .arg(kind)
            .arg(op)
            .arg(limit);
        for m in messages {
            push_entry(&mut cmd, m, &self.worker_id, &lane.to);
        }
        cmd
    }

    /// Runs a pipeline of EVALSHAs; when the server does not know the scripts
    /// (first use, or after a restart) it loads them and runs it again.
    async fn query<T: redis::FromRedisValue>(&mut self, pipe: &redis::Pipeline) -> RedisResult<T> {
        match pipe.query_async(&mut self.conn).await {
            Err(err) if is_noscript(&err) => {
                load_scripts(&mut self.conn).await?;
                pipe.query_async(&mut self.conn).await
            }
            result => result,
        }
    }
}

/// Puts a group's results back in their places in the batch.
fn place<T>(out: &mut [T], places: &[usize], results: Vec<T>) {
    for (place, result) in places.iter().zip(results) {
        out[*place] = result;
    }
}

/// Whether Redis did not know a script: the error of a single EVALSHA, or
/// of one in a pipeline (a cluster reports those one by one).
fn is_noscript(err: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
        || err.clone().into_server_errors().is_some_and(|errors| {
            errors
                .iter()
                .any(|(_, e)| e.kind() == Some(ServerErrorKind::NoScript))
        })
}

/// Loads every script of the protocol: one command each, which a cluster
/// connection sends to every node.
async fn load_scripts<C: redis::aio::ConnectionLike>(conn: &mut C) -> RedisResult<()> {
    for script in SCRIPTS {
        redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(script)
            .query_async::<redis::Value>(conn)
            .await?;
    }
    Ok(())
}

/// Publishes a mark on `channel` (see [`Keys::mark_channel`]) over any
/// connection, including a subscribed RESP3 one.
pub async fn publish_mark<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
    channel: &str,
) -> RedisResult<u64> {
    let script = Script::new(MARK);
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash())
        .arg(1)
        .arg(&keys.clock)
        .arg(channel);
    match cmd.query_async(conn).await {
        Err(err) if is_noscript(&err) => {
            load_scripts(conn).await?;
            cmd.query_async(conn).await
        }
        result => result,
    }
}

/// One message's outcome in a script's reply: a code and its detail (a
/// written payload's hash, or Redis's reason).
type Outcome = (u8, Option<String>);

/// The payload hash an ACK key holds: what was written under that id.
fn payload_hash(m: &Incoming) -> String {
    format!("{:016x}", m.hash)
}

fn claim_outcome((code, _): Outcome) -> Claim {
    match code {
        1 => Claim::Won,
        2 => Claim::Acked,
        5 => Claim::Reused,
        _ => Claim::Held,
    }
}

/// The write scripts' outcomes, one per message: a script that stopped for
/// a passing reason (code 4) leaves the rest not tried.
fn write_outcomes(messages: &[&Incoming], outcomes: Vec<Outcome>) -> Vec<Write> {
    let mut out = Vec::with_capacity(messages.len());
    let mut stopped: Option<String> = None;
    let mut outcomes = outcomes.into_iter();
    for _ in messages {
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

/// Appends a message's part of the write script's ARGV: the target (1 =
/// output stream; 2 = dead-letter stream), its payload hash (the ACK's
/// value), the field count, then the fields and values, borrowed from the
/// message (no copy of the payload here).
///
/// An output entry holds `message_id`, `payload` and `consumer_id` (plus, in
/// flat format, the payload's top-level JSON fields); a dead letter holds
/// `message_id`, `reason`, `channel`, `payload` and `consumer_id`, so that
/// nothing is lost.
fn push_entry(cmd: &mut redis::Cmd, m: &Incoming, worker_id: &str, to: &Destination) {
    match &m.rejected {
        None => {
            let flat = match to.format {
                OutputFormat::Flat => flat_fields(&m.payload, &to.id_field),
                OutputFormat::Envelope => Vec::new(),
            };
            cmd.arg(1).arg(payload_hash(m)).arg(6 + flat.len());
            cmd.arg("message_id").arg(&m.id);
            cmd.arg("payload").arg(m.payload.as_slice());
            cmd.arg("consumer_id").arg(worker_id);
            for value in flat {
                cmd.arg(value);
            }
        }
        Some(reason) => {
            cmd.arg(2).arg(payload_hash(m)).arg(10);
            cmd.arg("message_id").arg(&m.id);
            cmd.arg("reason").arg(reason);
            let channel = m.lane.as_ref().map_or(&to.channel, |lane| &lane.to.channel);
            cmd.arg("channel").arg(channel);
            cmd.arg("payload").arg(m.payload.as_slice());
            cmd.arg("consumer_id").arg(worker_id);
        }
    }
}

/// A JSON object payload's top-level fields (strings as they are, anything
/// else as JSON text), leaving out the envelope's own names. Nothing for a
/// payload that is not a JSON object.
fn flat_fields(payload: &[u8], id_field: &str) -> Vec<Vec<u8>> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(payload) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(map.len() * 2);
    for (key, value) in map {
        if key == id_field || matches!(key.as_str(), "message_id" | "payload" | "consumer_id") {
            continue;
        }
        let value = match value {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        out.push(key.into_bytes());
        out.push(value.into_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_stream_as_hash_tag() {
        let keys = Keys::new("messages:processed");
        assert_eq!(keys.lock("m1"), "{messages:processed}:lock:m1");
        assert_eq!(keys.ack("m1"), "{messages:processed}:ack:m1");
    }

    #[test]
    fn flat_format_copies_top_level_fields() {
        let fields = flat_fields(
            br#"{"message_id":"a","n":1,"s":"x","o":{"k":true}}"#,
            "message_id",
        );
        let text: Vec<String> = fields
            .into_iter()
            .map(|f| String::from_utf8(f).unwrap())
            .collect();
        assert_eq!(text, ["n", "1", "o", "{\"k\":true}", "s", "x"]);
        assert!(flat_fields(b"not json", "message_id").is_empty());
    }
}
