//! `optimus ctl strategy`'s half of the strategy handoff: setting the
//! pool's handoff key (the processes' half is in [`super::members`] and the
//! scripts' `handoff_rule`).

use redis::aio::ConnectionLike;

use super::members::{Handoff, LIVE_FOR_STRATEGY};
use super::{Pool, Strategy};

/// `optimus ctl strategy`: hands the pool whose keys `pool` names to the
/// strategy `target` (see [`super::members`]). Returns
/// what was done, in a line for the operator, or an error when a handoff
/// under way forbids it.
///
/// - No live member: nothing to hand over; a handoff key left from an
///   earlier change is cleared, so that processes of `target` may start.
/// - Every live member runs `target` already: a handoff to the other
///   strategy that no process took is called off; else nothing is done.
/// - Live members of the other strategy: the handoff key is set to
///   `target` (carrying the mark of a finished handoff before it), unless a
///   handoff is under way: to `target` (said), or from `target` with
///   processes of both strategies still live (refused).
pub async fn hand_over<C: ConnectionLike>(
    conn: &mut C,
    pool: &Pool,
    target: Strategy,
) -> redis::RedisResult<String> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    let now = secs * 1000 + micros / 1000;
    let members: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(&pool.members)
        .query_async(conn)
        .await?;
    // A member's value: "<beat ms>:<seen>:<since>:<routes>:<strategy>:<joined>".
    let live: Vec<(String, String)> = members
        .into_iter()
        .filter_map(|(name, value)| {
            let mut parts = value.split(':');
            let beat: u64 = parts.next()?.parse().ok()?;
            let strategy = parts.nth(3).unwrap_or("fenced").to_string();
            (now.saturating_sub(beat) <= LIVE_FOR_STRATEGY.as_millis() as u64)
                .then_some((name, strategy))
        })
        .collect();
    let current: Option<String> = redis::cmd("GET")
        .arg(&pool.handoff)
        .query_async(conn)
        .await?;
    let current = current.as_deref().and_then(Handoff::parse);
    let name = target.name();
    let others: Vec<String> = live
        .iter()
        .filter(|(_, s)| s != name)
        .map(|(n, s)| format!("{n}={s}"))
        .collect();
    let set = |value: Option<Handoff>| match value {
        Some(h) => redis::cmd("SET").arg(&pool.handoff).arg(h.value()).clone(),
        None => redis::cmd("DEL").arg(&pool.handoff).clone(),
    };
    let refused = |text: String| {
        redis::RedisError::from((redis::ErrorKind::Client, "handoff under way", text))
    };
    if live.is_empty() {
        if current.is_some() {
            set(None).query_async::<()>(conn).await?;
            return Ok(format!(
                "no live process in the pool: the handoff key {} was cleared; start STRATEGY={name} processes",
                pool.handoff
            ));
        }
        return Ok(format!(
            "no live process in the pool: start STRATEGY={name} processes"
        ));
    }
    if others.is_empty() {
        if let Some(h) = current
            && h.target != target
            && h.at.is_none()
        {
            // Back to what it was: handed to `target` at the floor, if ever.
            let back = (h.floor > 0).then_some(Handoff {
                target,
                at: Some(h.floor),
                floor: 0,
            });
            set(back).query_async::<()>(conn).await?;
            return Ok(format!(
                "the handoff to STRATEGY={} was called off (no process of it took the mark): the pool runs STRATEGY={name}",
                h.target.name()
            ));
        }
        return Ok(format!("the pool runs STRATEGY={name} already"));
    }
    let floor = match current {
        Some(h) if h.target == target => {
            return Ok(match h.at {
                Some(at) => format!(
                    "the pool is handed to STRATEGY={name} from mark {at} on: stop the processes {} once they hold nothing",
                    others.join(",")
                ),
                None => format!(
                    "a handoff to STRATEGY={name} is asked for already: start STRATEGY={name} processes"
                ),
            });
        }
        Some(h) => match h.at {
            None => {
                return Err(refused(format!(
                    "a handoff to STRATEGY={} is asked for and its processes {} run: stop them first (ctl strategy {name} then calls it off)",
                    h.target.name(),
                    others.join(",")
                )));
            }
            Some(_) if others.len() < live.len() => {
                return Err(refused(format!(
                    "the handoff to STRATEGY={} is still under way (processes of both strategies run): stop the STRATEGY={name} processes first, then hand the pool back",
                    h.target.name()
                )));
            }
            Some(at) => at,
        },
        None => 0,
    };
    set(Some(Handoff {
        target,
        at: None,
        floor,
    }))
    .query_async::<()>(conn)
    .await?;
    Ok(format!(
        "handoff to STRATEGY={name} asked for ({}): start STRATEGY={name} processes; the first to subscribe takes the handoff mark, from which on they write; then stop {} (they write what came before it)",
        pool.handoff,
        others.join(",")
    ))
}
