//! The delivery protocol: how the workers agree, through Redis, on which one
//! writes each message, so that while at least one worker is alive and
//! subscribed every message lands in its stream exactly once, in the order
//! Redis delivered it.
//!
//! # The invariant
//!
//! **A stream's entries are written only by the script in `write.lua`, run by
//! the process whose epoch the stream's writer record holds, and only when
//! the record's position is the one the batch starts after; that same script
//! moves the position past exactly what it wrote.** So:
//!
//! - *nothing twice*: a message's position is written into the record in the
//!   step that writes the message; whoever writes next starts after it. A
//!   writer that was fenced (another process took the record over: a new
//!   epoch) writes nothing, however long it was paused. No TTL is involved.
//! - *nothing lost*: a process writes a stream only from a sequence it holds
//!   without a hole (see [`intake`]); a standby keeps its copies until the
//!   record's position passes them, and takes the record over when the
//!   writer falls silent or stops receiving.
//! - *in order*: one writer per stream writes its messages in their
//!   positions' order, and a new writer continues right after the old one's
//!   last position.
//!
//! # With STRATEGY=race
//!
//! **An entry is written only by the script that holds its message's lock
//! and finds no ACK, in the step that sets the ACK** (`race_write.lua`), so
//! a message is written once while its ACK lives; a copy published longer
//! ago than ACK_TTL − LOCK_TTL (by its position's mark, or on a cluster by
//! when it was received) is dropped unwritten, so no copy outlives its ACK.
//! It keeps no order, and an ACK key per message.
//!
//! # Positions
//!
//! Every subscription of the pool also listens to one marks channel, on which
//! each process publishes, every 50 ms, the next value of a clock (see
//! `lib.lua`'s `next_mark`: it never goes back, even when Redis loses the
//! clock). Redis delivers a channel's messages and the marks to every
//! subscriber in the same order, so a message's [`Position`] (the last mark
//! before it, and its number since that mark among its stream's messages) is
//! the same in every process. A reader starts each connection exactly at a
//! mark of its own: it subscribes and publishes that mark in one MULTI.
//!
//! # The parts
//!
//! - [`reader`]: a subscription's own RESP3 connection (one server), which
//!   slices messages out of what it reads and gives them positions;
//!   [`resp`] its frames; [`budget`] the process's memory for messages;
//!   [`resubscribe`] the one loop that keeps a reader (or a cluster
//!   subscription) subscribed and counts its outages.
//! - [`intake`]: merges a process's readers (at most two) into each stream's
//!   sequence, without a duplicate or a hole, and finds each message's id.
//! - [`members`]: every process's cycle (its beat, a mark, the records it
//!   asks about), and one strategy per pool.
//! - [`fenced`]: the default strategy's loop: the writer records, the
//!   writes, the standbys and the takeovers.
//! - [`race`]: the design card's strategy (STRATEGY=race): every worker races
//!   per-message locks, ACK keys make writes single.
//! - [`cluster`]: subscriptions on a Redis Cluster (race only).
//! - [`scripts`]: the Lua scripts, `scripts/*.lua`, included at build time.

pub mod budget;
mod choice;
pub mod cluster;
pub mod fenced;
pub mod handoff;
pub mod ids;
pub mod intake;
pub mod members;
mod outcome;
pub mod race;
pub mod reader;
pub mod resp;
mod resubscribe;
pub mod scripts;

// The protocol held against a real redis-server: each script and each
// strategy's rule on its own (lib tests, since they reach the parts).
#[cfg(test)]
mod protocol_tests;

pub use crate::keys::{Keys, Pool, is_internal_channel, route_probe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use budget::Charge;
pub use choice::{OutputFormat, PubSubMode, Strategy};

/// Where a message stands in its stream's sequence, the same in every
/// process of the pool: the last mark before it, and its number among its
/// stream's messages since that mark (from 1; a mark itself is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub mark: u64,
    pub seq: u32,
}

impl Position {
    /// The position as the writer record keeps it: `<mark>:<seq>`.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.mark, self.seq)
    }

    pub fn decode(text: &str) -> Option<Self> {
        let (mark, seq) = text.split_once(':')?;
        Some(Self {
            mark: mark.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The server time (ms) the message was published no earlier than.
    pub fn published_ms(&self) -> u64 {
        self.mark >> 10
    }
}

/// A message as a process holds it.
#[derive(Debug, Clone)]
pub struct Message {
    /// The published bytes, untouched (a slice of what the reader read).
    pub payload: Bytes,
    /// The channel it came on.
    pub channel: Bytes,
    /// Its stream, and how entries are written there.
    pub lane: Arc<Lane>,
    /// Where it stands in its stream's sequence (`None` on a cluster).
    pub position: Option<Position>,
    /// Its id: MESSAGE_ID_FIELD's (see [`ids`]), or one made from its
    /// position for a payload without.
    pub id: String,
    /// The id is the payload's own (MESSAGE_ID_FIELD), not one made for it.
    pub id_given: bool,
    /// Why it goes to the dead-letter stream instead of its stream.
    pub rejected: Option<String>,
    /// xxh3-64 of the payload.
    pub hash: u64,
    /// When this process received it.
    pub received_at: Instant,
    /// Its share of the process's memory budget.
    pub charge: Option<Arc<Charge>>,
}

impl Message {
    /// A message for `lane`, not yet positioned nor identified.
    pub fn new(payload: Bytes, channel: Bytes, lane: Arc<Lane>) -> Self {
        Self::arrived(payload, channel, lane, Instant::now())
    }

    /// A message for `lane` that arrived at `at` (a reader dates what one
    /// read brings once).
    pub fn arrived(payload: Bytes, channel: Bytes, lane: Arc<Lane>, at: Instant) -> Self {
        Self {
            hash: xxhash_rust::xxh3::xxh3_64(&payload),
            payload,
            channel,
            lane,
            position: None,
            id: String::new(),
            id_given: false,
            rejected: None,
            received_at: at,
            charge: None,
        }
    }

    /// A message with its id, for the library's own use (tests, the
    /// publisher's fast path).
    pub fn with_id(id: impl Into<String>, payload: impl Into<Bytes>, lane: Arc<Lane>) -> Self {
        let channel = Bytes::from(lane.to.channel.clone());
        Self {
            id: id.into(),
            id_given: true,
            ..Self::new(payload.into(), channel, lane)
        }
    }

    /// The payload's hash as an ACK key holds it (race strategy).
    pub fn payload_hash(&self) -> String {
        format!("{:016x}", self.hash)
    }
}

/// Where messages are written, and how.
#[derive(Debug, Clone)]
pub struct Destination {
    /// The stream.
    pub stream: String,
    /// Where rejected messages go, with their reason.
    pub dead_stream: String,
    /// The route's channel or pattern (what dead letters name when a
    /// message carries no channel of its own).
    pub channel: String,
    pub format: OutputFormat,
    /// MESSAGE_ID_FIELD (left out of flat entries: it is `message_id`).
    pub id_field: String,
}

impl Destination {
    /// The defaults of the bridge: `<stream>:dead`, envelope entries (the
    /// tests' lanes; the bridge and the publisher make theirs with a
    /// `route::Router`).
    #[cfg(test)]
    pub fn new(stream: &str, channel: &str) -> Self {
        Self {
            stream: stream.to_string(),
            dead_stream: crate::keys::default_dead_stream(stream, false),
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
    /// The three script arguments of `xadd_for`: kind (0 none, 1 MAXLEN, 2
    /// MINID by age), operator, limit (entries, or milliseconds of age).
    pub fn args(trim: Option<Trim>) -> (u8, &'static str, u64) {
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

/// One output stream as a route reaches it: where messages go, the stream's
/// keys and cap. Each message carries its lane (see [`super::route`]).
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

    pub fn stream(&self) -> &str {
        &self.to.stream
    }
}

/// Appends a message's entry to a write script's ARGV: the field count,
/// then the fields and values, borrowed from the message (no copy of the
/// payload here).
///
/// An output entry holds `message_id`, `payload` and `consumer_id` (plus, in
/// flat format, the payload's top-level JSON fields); a dead letter holds
/// `message_id`, `reason`, `channel`, `payload` and `consumer_id`, so that
/// nothing is lost.
pub fn push_entry(cmd: &mut redis::Cmd, m: &Message, consumer: &str) {
    let to = &m.lane.to;
    match &m.rejected {
        None => {
            let flat = match to.format {
                OutputFormat::Flat => flat_fields(&m.payload, &to.id_field),
                OutputFormat::Envelope => Vec::new(),
            };
            cmd.arg(6 + flat.len());
            cmd.arg("message_id").arg(&m.id);
            cmd.arg("payload").arg(m.payload.as_ref());
            cmd.arg("consumer_id").arg(consumer);
            for value in flat {
                cmd.arg(value);
            }
        }
        Some(reason) => {
            cmd.arg(10);
            cmd.arg("message_id").arg(&m.id);
            cmd.arg("reason").arg(reason);
            cmd.arg("channel").arg(m.channel.as_ref());
            cmd.arg("payload").arg(m.payload.as_ref());
            cmd.arg("consumer_id").arg(consumer);
        }
    }
}

/// A message's target in the write scripts: 1 its stream, 2 its dead-letter
/// stream.
pub fn target(m: &Message) -> u8 {
    if m.rejected.is_some() { 2 } else { 1 }
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
        assert_eq!(keys.writer, "{messages:processed}:writer");
    }

    #[test]
    fn positions_order_by_mark_then_number_and_round_trip() {
        let a = Position { mark: 5, seq: 9 };
        let b = Position { mark: 6, seq: 1 };
        assert!(a < b);
        assert_eq!(Position::decode(&a.encode()), Some(a));
        assert_eq!(Position::decode("x:1"), None);
        assert_eq!(
            Position {
                mark: 1024 * 7,
                seq: 0
            }
            .published_ms(),
            7
        );
    }

    #[test]
    fn internal_channels_are_known() {
        for name in [
            "optimus:bridge:0:messages:published->messages:processed",
            "{messages:processed}:marks",
            "{messages:processed}:mark:w-1",
            "{messages:processed}:marks:db3",
        ] {
            assert!(is_internal_channel(name.as_bytes()), "{name}");
        }
        for name in ["messages:published", "marks", "{x}y"] {
            assert!(!is_internal_channel(name.as_bytes()), "{name}");
        }
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
