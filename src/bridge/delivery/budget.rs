//! The process's memory for messages, in bytes (MEMORY_LIMIT).
//!
//! A reader charges what it read (and the bookkeeping of each message) before
//! it reads more; the charge is given back when the last message of that
//! read is gone (written, dropped, shed). When the budget is spent the
//! readers stop reading: the messages wait in the server's output buffer for
//! the subscription (backpressure to the socket) instead of in this process.
//! Meanwhile the budget asks for room ([`Budget::pressed`]): copies that
//! another worker will write are shed first.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// What a message costs besides its bytes (its struct, id, position).
pub const MESSAGE_OVERHEAD: usize = 224;

#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    /// Wakes readers waiting for room.
    freed: Notify,
    /// A reader is waiting for room.
    pressed: AtomicBool,
    /// When [`Budget::say_spent`] last spoke.
    said: Mutex<Option<Instant>>,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            freed: Notify::new(),
            pressed: AtomicBool::new(false),
            said: Mutex::new(None),
        })
    }

    /// Charges `bytes`, waiting while the budget is spent (a charge larger
    /// than the whole budget waits until nothing else is charged). The
    /// returned charge gives them back when it is dropped.
    pub async fn charge(self: &Arc<Self>, bytes: usize) -> Arc<Charge> {
        loop {
            let freed = self.freed.notified();
            let used = self.used.load(Ordering::Acquire);
            if used == 0 || used + bytes <= self.limit {
                self.used.fetch_add(bytes, Ordering::AcqRel);
                self.pressed.store(false, Ordering::Release);
                return Arc::new(Charge {
                    budget: self.clone(),
                    bytes,
                });
            }
            if !self.pressed.swap(true, Ordering::AcqRel) {
                self.say_spent();
            }
            freed.await;
        }
    }

    /// Charges `bytes` now if the budget's use stays within `up_to` (at
    /// most its limit) with them, or nothing is charged; `None` otherwise.
    pub fn try_charge(self: &Arc<Self>, bytes: usize, up_to: usize) -> Option<Charge> {
        let up_to = up_to.min(self.limit);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used == 0 || used + bytes <= up_to).then_some(used + bytes)
            })
            .ok()?;
        Some(Charge {
            budget: self.clone(),
            bytes,
        })
    }

    /// Says, at most once every ten seconds, that reading waits.
    fn say_spent(&self) {
        let mut last = self.said.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(
                limit_mib = self.limit >> 20,
                "memory budget spent (MEMORY_LIMIT): subscriptions stop reading until writes catch up; messages wait in Redis's output buffers (a subscription whose buffer passes the server's client-output-buffer-limit is dropped: a gap)"
            );
        }
    }

    pub fn pressed(&self) -> bool {
        self.pressed.load(Ordering::Acquire)
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Counts `bytes` the process keeps besides the messages (the dedup
    /// windows' ids) without waiting: readers wait for that room too.
    pub fn hold(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Gives back what [`Budget::hold`] counted.
    pub fn release(&self, bytes: usize) {
        self.give_back(bytes);
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.freed.notify_waiters();
    }
}

/// Bytes charged to the budget; given back when dropped. Shared by the
/// messages of one read.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_spent_budget_waits_until_charges_are_given_back() {
        let budget = Budget::new(100);
        let a = budget.charge(60).await;
        assert_eq!(budget.used(), 60);
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.charge(60).await }
        });
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "no room yet");
        assert!(budget.pressed());
        drop(a);
        let b = waiting.await.unwrap();
        assert_eq!(budget.used(), 60);
        assert!(!budget.pressed());
        drop(b);
        assert_eq!(budget.used(), 0);
        // More than the whole budget still goes through when nothing else is charged.
        let big = budget.charge(500).await;
        assert_eq!(budget.used(), 500);
        drop(big);
    }
}
