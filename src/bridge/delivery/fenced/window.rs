//! The message ids a lane has seen within DEDUP_WINDOW: how a writer knows
//! a message sent again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::super::budget::Budget;
use super::super::{Message, Position};

/// The message ids a lane has seen within DEDUP_WINDOW (by publish time),
/// with the hash of their payloads: a message whose id is in it was sent
/// again (a publisher retrying), and is passed over.
#[derive(Debug)]
pub(super) struct Window {
    length_ms: u64,
    /// How long an id is kept by this process's clock (the window's length;
    /// see [`Window::expire`]).
    held_for: Duration,
    /// Each id's hash, with the position it was first seen at and its
    /// payload's hash.
    ids: FxHashMap<u128, (Position, u64)>,
    /// The ids in the order they were seen, with that position and when the
    /// copy arrived (this process's clock).
    order: VecDeque<(Position, Instant, u128)>,
    /// Where the memory of the two is counted (MEMORY_LIMIT), and how much.
    budget: Option<Arc<Budget>>,
    charged: usize,
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.release(self.charged);
        }
    }
}

impl Window {
    pub(super) fn new(length: Duration, budget: Option<Arc<Budget>>) -> Self {
        Self {
            length_ms: length.as_millis() as u64,
            held_for: length,
            ids: FxHashMap::default(),
            order: VecDeque::new(),
            budget,
            charged: 0,
        }
    }

    /// The memory the window takes: its tables' room (a hash table's slot
    /// and control byte; a deque's slot).
    fn bytes(&self) -> usize {
        self.ids.capacity() * (size_of::<(u128, (Position, u64))>() + 1)
            + self.order.capacity() * size_of::<(Position, Instant, u128)>()
    }

    /// Counts what the window takes now in the budget.
    fn charge(&mut self) {
        let Some(budget) = &self.budget else {
            return;
        };
        let now = self.bytes();
        if now > self.charged {
            budget.hold(now - self.charged);
        } else if now < self.charged {
            budget.release(self.charged - now);
        }
        self.charged = now;
    }

    fn key(m: &Message) -> Option<(u128, Position)> {
        // Ids made from positions never come twice.
        if !m.id_given || m.id.is_empty() {
            return None;
        }
        let position = m.position.unwrap_or(Position { mark: 0, seq: 0 });
        Some((xxhash_rust::xxh3::xxh3_128(m.id.as_bytes()), position))
    }

    /// Whether `m`'s id was seen within the window: `Some(reused)` (reused:
    /// with other bytes) if so. Remembers it either way.
    pub(super) fn seen(&mut self, m: &Message) -> Option<bool> {
        if self.length_ms == 0 {
            return None;
        }
        let (key, position) = Self::key(m)?;
        self.expire(position.published_ms(), m.received_at);
        // Remembered from its first sighting: an id that keeps coming back
        // is forgotten a window after it was first seen.
        if let Some(&(_, hash)) = self.ids.get(&key) {
            return Some(hash != m.hash);
        }
        self.ids.insert(key, (position, m.hash));
        // (Dated by when the copy arrived, not when it was decided: a
        // writer behind on its queue keeps no id longer.)
        self.order.push_back((position, m.received_at, key));
        self.charge();
        None
    }

    /// Forgets the ids seen longer than the window before `now_ms` (server
    /// time) and before `received` (this process's clock: when the copy to
    /// decide arrived), and gives back the memory of a window that shrank.
    /// An id is kept for the window's length by both clocks: after a
    /// failover the promoted server's clock leaps ahead (see `next_mark`),
    /// and the copies sent again there would otherwise find the ids they
    /// repeat expired by the leap.
    pub(super) fn expire(&mut self, now_ms: u64, received: Instant) {
        while let Some(&(at, seen_at, old)) = self.order.front() {
            if at.published_ms() + self.length_ms >= now_ms
                || received.saturating_duration_since(seen_at) <= self.held_for
            {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&old);
        }
        if self.ids.capacity() > 1024 && self.ids.len() < self.ids.capacity() / 4 {
            self.ids.shrink_to(self.ids.len() * 2);
            self.order.shrink_to(self.order.len() * 2);
        }
        self.charge();
    }

    /// Forgets the ids first seen after `pos` (all of them for `None`): the
    /// stream's record went back there (Redis lost data: a restart without
    /// persistence, an older snapshot), so those messages may be gone from
    /// the stream, and a copy sent again must be written.
    pub(super) fn forget_after(&mut self, pos: Option<Position>) {
        let kept = |p: &Position| pos.is_some_and(|pos| *p <= pos);
        self.ids.retain(|_, (p, _)| kept(p));
        self.order.retain(|(p, _, _)| kept(p));
        self.charge();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::delivery::{Destination, Lane};

    #[test]
    fn a_window_knows_ids_sent_again_and_forgets_old_ones() {
        let lane = Arc::new(Lane::new(Destination::new("s", "c"), None));
        let message = |id: &str, payload: &str, ms: u64| {
            let mut m = Message::with_id(id, payload.as_bytes().to_vec(), lane.clone());
            m.position = Some(Position {
                mark: ms << 10,
                seq: 1,
            });
            m
        };
        let mut window = Window::new(Duration::from_secs(5), None);
        assert_eq!(window.seen(&message("a", "x", 1000)), None);
        assert_eq!(
            window.seen(&message("a", "x", 2000)),
            Some(false),
            "the same bytes again"
        );
        assert_eq!(
            window.seen(&message("a", "y", 3000)),
            Some(true),
            "other bytes"
        );
        assert_eq!(window.seen(&message("b", "x", 3000)), None);
        // Published a window later, but seen again at once: a promoted
        // server's clock leapt ahead (a failover), and the publisher sent
        // b again there.
        assert_eq!(window.seen(&message("b", "x", 9000)), Some(false));
        // Long after by both clocks: forgotten.
        let mut later = message("b", "x", 15000);
        later.received_at += Duration::from_secs(6);
        assert_eq!(window.seen(&later), None);
        // Ids made from positions are never remembered.
        let mut p = message("p:1:1", "x", 9000);
        p.id_given = false;
        assert_eq!(window.seen(&p), None);
        assert_eq!(window.seen(&p), None);
    }

    #[test]
    fn a_window_forgets_what_came_after_a_record_that_went_back() {
        let lane = Arc::new(Lane::new(Destination::new("s", "c"), None));
        let message = |id: &str, ms: u64| {
            let mut m = Message::with_id(id, b"x".to_vec(), lane.clone());
            m.position = Some(Position {
                mark: ms << 10,
                seq: 1,
            });
            m
        };
        let mut window = Window::new(Duration::from_secs(5), None);
        for (id, ms) in [("a", 1000), ("b", 2000), ("c", 3000)] {
            assert_eq!(window.seen(&message(id, ms)), None);
        }
        // The record went back to b's position: c may be gone from the
        // stream, a and b are there.
        window.forget_after(message("b", 2000).position);
        assert_eq!(window.seen(&message("a", 3500)), Some(false));
        assert_eq!(window.seen(&message("b", 3500)), Some(false));
        assert_eq!(window.seen(&message("c", 3500)), None, "c again is new");
        // A record lost altogether: everything is new.
        window.forget_after(None);
        assert_eq!(window.seen(&message("a", 3600)), None);
    }
}
