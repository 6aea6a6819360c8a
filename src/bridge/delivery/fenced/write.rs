//! One fenced write: `write.lua`'s command for a run of a lane's copies,
//! and its answer.

use redis::RedisError;

#[cfg(test)]
use super::super::target;
use super::super::{Lane, Message, OutputFormat, Position, Trim, push_entry, scripts};
#[cfg(test)]
use crate::connect::Conn;

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

pub(super) fn decode_write(value: redis::Value) -> Result<WriteReply, RedisError> {
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
