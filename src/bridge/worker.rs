//! One worker's loop for the `race` strategy: take what has arrived (up to a batch), run it through
//! the lock/ACK protocol, keep the copies other workers hold, look at them
//! again when their lock could have expired, and drop them when they are
//! written or too old.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::RedisError;
use tokio::sync::mpsc;

use super::delivery::{Delivery, Next, Warnings, tally};
use super::message::{Incoming, Item};
use crate::connect::{is_fatal, reconnect_backoff};
use crate::monitor::Counters;

/// A copy of a message another worker has locked.
#[derive(Debug)]
struct PendingCopy {
    msg: Incoming,
    /// When its lock could have expired: the time to claim it again.
    due: Instant,
}

/// The copies a worker holds for others, in the order they fall due.
///
/// Every copy is due one LOCK_TTL after it was (re)queued, and copies are
/// queued in time order, so a FIFO is also sorted by due time.
#[derive(Debug, Default)]
struct PendingBatch {
    copies: VecDeque<PendingCopy>,
}

impl PendingBatch {
    fn push(&mut self, msg: Incoming, due: Instant) {
        self.copies.push_back(PendingCopy { msg, due });
    }

    fn next_due(&self) -> Option<Instant> {
        self.copies.front().map(|c| c.due)
    }

    /// Takes up to `limit` copies that are due at `now`.
    fn take_due(&mut self, now: Instant, limit: usize, into: &mut Vec<Incoming>) {
        while into.len() < limit {
            match self.copies.front() {
                Some(c) if c.due <= now => into.push(self.copies.pop_front().unwrap().msg),
                _ => break,
            }
        }
    }

    fn len(&self) -> usize {
        self.copies.len()
    }
}

/// What the loop needs besides its queue.
pub struct Worker {
    pub id: String,
    pub delivery: Delivery,
    pub counters: Arc<Counters>,
    pub batch_size: usize,
    pub lock_ttl: Duration,
    pub retention: Duration,
    pub warnings: Warnings,
}

impl Worker {
    /// Runs until the queue is closed (the subscription stopped) and every
    /// copy in hand is settled, or until `LOCK_TTL` + 1 s after the close,
    /// whichever is first. Returns an error only for a fatal Redis error.
    pub async fn run(mut self, mut queue: mpsc::Receiver<Item>) -> Result<(), RedisError> {
        let mut pending = PendingBatch::default();
        let mut reported_pending = 0usize;
        // Messages whose claim or write must be tried again at once.
        let mut retry: Vec<Incoming> = Vec::new();
        let mut batch: Vec<Incoming> = Vec::with_capacity(self.batch_size);
        let mut items: Vec<Item> = Vec::with_capacity(self.batch_size);
        let mut closed_at: Option<Instant> = None;
        let mut backoff = reconnect_backoff();

        loop {
            // 1. Gather: what has arrived (never waiting to fill a batch), the
            //    copies that fell due, and what must be retried.
            batch.append(&mut retry);
            if closed_at.is_none() && batch.is_empty() {
                let wake = pending.next_due();
                tokio::select! {
                        n = queue.recv_many(&mut items, self.batch_size) => {
                        if n == 0 {
                            closed_at = Some(Instant::now());
                        }
                        batch.extend(items.drain(..).filter_map(Item::into_message));
                    }
                    _ = sleep_until(wake), if wake.is_some() => {}
                }
            } else if closed_at.is_none() {
                while batch.len() < self.batch_size {
                    match queue.try_recv() {
                        Ok(item) => batch.extend(item.into_message()),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            closed_at = Some(Instant::now());
                            break;
                        }
                    }
                }
            }
            let now = Instant::now();
            let first_due = batch.len();
            pending.take_due(now, first_due + self.batch_size, &mut batch);
            let expired = expire(&mut batch, first_due, now, self.retention);
            if expired > 0 {
                Counters::add(&self.counters.expired, expired);
                tracing::warn!(worker = %self.id, expired, "dropped copies that waited longer than PENDING_RETENTION");
            }

            // 2. Settle the batch.
            if !batch.is_empty() {
                match self.settle(&mut batch, &mut pending, &mut retry).await {
                    Ok(None) => backoff = reconnect_backoff(),
                    Ok(Some(why)) => {
                        Counters::add(&self.counters.redis_errors, 1);
                        let wait = backoff.next().unwrap_or(crate::connect::MAX_BACKOFF);
                        tracing::warn!(worker = %self.id, cause = %why, retry_in_ms = wait.as_millis() as u64, "Redis did not take the batch for now; keeping it and retrying");
                        tokio::time::sleep(wait).await;
                    }
                    Err(err) if is_fatal(&err) => return Err(err),
                    Err(err) => {
                        Counters::add(&self.counters.redis_errors, 1);
                        let wait = backoff.next().unwrap_or(crate::connect::MAX_BACKOFF);
                        tracing::warn!(worker = %self.id, cause = %crate::connect::brief(&err), retry_in_ms = wait.as_millis() as u64, "Redis command failed; keeping the batch and retrying");
                        retry.append(&mut batch);
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            let held = pending.len() + retry.len();
            if held != reported_pending {
                Counters::add(&self.counters.pending, held as u64);
                Counters::sub(&self.counters.pending, reported_pending as u64);
                reported_pending = held;
            }

            // 3. After the subscription closed: wait for the copies in hand,
            //    but not past the time their locks could have expired.
            if let Some(closed) = closed_at {
                let deadline = closed + self.lock_ttl + Duration::from_secs(1);
                if held == 0 {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    tracing::warn!(worker = %self.id, unsettled = held, "stopping with copies still unsettled; their lock holders are expected to write them");
                    Counters::sub(&self.counters.pending, reported_pending as u64);
                    return Ok(());
                }
                if retry.is_empty()
                    && let Some(due) = pending.next_due()
                {
                    sleep_until(Some(due.min(deadline))).await;
                }
            }
        }
    }

    /// Claims the batch, writes what was won, keeps what others hold; what
    /// the stream refused goes back to be dead-lettered, what Redis did not
    /// take for now goes back to be retried. Returns the passing reason when
    /// there was one (the loop then backs off).
    async fn settle(
        &mut self,
        batch: &mut Vec<Incoming>,
        pending: &mut PendingBatch,
        retry: &mut Vec<Incoming>,
    ) -> Result<Option<String>, RedisError> {
        let refs: Vec<&Incoming> = batch.iter().collect();
        let started = Instant::now();
        let settled = self.delivery.settle(&refs).await?;
        self.counters
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());

        let due = Instant::now() + self.lock_ttl;
        let mut later = None;
        for (mut msg, state) in batch.drain(..).zip(settled) {
            match tally(state, &msg, &self.counters, &self.id, &mut self.warnings) {
                Next::Written | Next::Done => {}
                Next::Hold => pending.push(msg, due),
                Next::Again => retry.push(msg),
                Next::DeadLetter(reason) => {
                    msg.rejected = Some(reason);
                    retry.push(msg);
                }
                Next::Later(why) => {
                    later = Some(why);
                    retry.push(msg);
                }
            }
        }
        Ok(later)
    }
}

/// Drops the copies (from index `from` on) received longer than `retention`
/// ago; returns how many.
fn expire(batch: &mut Vec<Incoming>, from: usize, now: Instant, retention: Duration) -> u64 {
    let before = batch.len();
    let mut i = from;
    while i < batch.len() {
        if now.duration_since(batch[i].received_at) > retention {
            batch.swap_remove(i);
        } else {
            i += 1;
        }
    }
    (before - batch.len()) as u64
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, received_at: Instant) -> Incoming {
        Incoming::new(id, Vec::new(), received_at)
    }

    #[test]
    fn takes_only_due_copies_in_order() {
        let t0 = Instant::now();
        let mut pending = PendingBatch::default();
        pending.push(msg("a", t0), t0 + Duration::from_secs(1));
        pending.push(msg("b", t0), t0 + Duration::from_secs(2));
        let mut out = Vec::new();
        pending.take_due(t0 + Duration::from_millis(1500), 10, &mut out);
        assert_eq!(out.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(pending.next_due(), Some(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn expires_only_old_copies_past_the_index() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(40);
        let mut batch = vec![msg("new-but-old", t0), msg("old", t0), msg("fresh", now)];
        let dropped = expire(&mut batch, 1, now, Duration::from_secs(30));
        assert_eq!(dropped, 1);
        let ids: Vec<_> = batch.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["new-but-old", "fresh"]);
    }
}
