//! How the end of a message is counted and said, the same for every
//! strategy: written (to its stream, or as a dead letter), passed over as a
//! duplicate (or a reused id), given up.

use super::Message;
use crate::monitor::{Counters, Throttle};

/// `m` is in its stream, or (rejected) in the dead-letter stream with its
/// reason, which is said.
pub fn written(m: &Message, counters: &Counters) {
    match &m.rejected {
        None => Counters::add(&counters.written, 1),
        Some(reason) => {
            tracing::warn!(stream = %m.lane.stream(), message_id = %m.id, reason = %reason, "message dead-lettered");
            Counters::add(&counters.dead_lettered, 1);
        }
    }
}

/// `m` was passed over: its id was written already (by another copy, or an
/// earlier send). `reused`: with other bytes, a publisher reusing ids, said
/// at most as often as `warning` allows.
pub fn skipped(m: &Message, reused: bool, counters: &Counters, warning: &mut Throttle) {
    Counters::add(&counters.duplicates_skipped, 1);
    if reused {
        Counters::add(&counters.reused_ids, 1);
        if let Some(held_back) = warning.ready() {
            tracing::warn!(stream = %m.lane.stream(), message_id = %m.id, held_back, "a message with this id was already written with other bytes: skipped (a publisher is reusing ids; see reused_ids)");
        }
    }
}

/// Neither the stream nor the dead-letter stream took `m`: given up, said
/// with both refusals at most as often as `warning` allows.
pub fn given_up(
    m: &Message,
    dead_letter_refusal: &str,
    counters: &Counters,
    warning: &mut Throttle,
) {
    Counters::add(&counters.refused, 1);
    if let Some(held_back) = warning.ready() {
        tracing::error!(stream = %m.lane.stream(), message_id = %m.id, reason = %m.rejected.as_deref().unwrap_or(""), dead_letter_refusal = %dead_letter_refusal, held_back, "neither the stream nor the dead-letter stream took the message: given up (see refused)");
    }
}
