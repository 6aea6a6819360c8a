//! A worker's subscription: its own task, its own connection, reading the
//! channel and handing each message (with its id) to the worker through a
//! bounded queue, so a slow write path never stops the socket from being read
//! (Redis would cut a subscriber off at its pub/sub output-buffer limit).
//!
//! - **Queue full**: the newest message is dropped by this worker and counted
//!   as `overflow` (the other workers, each with its own queue, may still have
//!   it). Memory stays within QUEUE_CAPACITY messages per worker.
//! - **Silence**: after [`KEEPALIVE`] without traffic it PINGs on the
//!   subscription; no answer within [`PING_TIMEOUT`] counts as a lost
//!   connection (a half-open socket would otherwise go unnoticed).
//! - **Lost connection**: it reconnects with backoff and subscribes again,
//!   counting the reconnect and logging how long it was away.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use redis::{Client, RedisError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::message::{IdAssigner, Incoming};
use crate::connect::retry_until_connected;
use crate::monitor::Counters;

/// Silence on the subscription after which it is checked with a PING.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long that PING may take (longer than a `CLIENT PAUSE` of a few seconds).
pub const PING_TIMEOUT: Duration = Duration::from_secs(15);

/// Everything the subscription task needs.
pub struct Subscription {
    pub client: Client,
    pub channel: String,
    pub worker_id: String,
    pub ids: IdAssigner,
    pub counters: Arc<Counters>,
    pub coverage: Arc<Coverage>,
    /// Where received messages go; the worker reads the other end.
    pub queue: mpsc::Sender<Incoming>,
    pub cancel: CancellationToken,
}

impl Subscription {
    /// Reads until cancelled. Returns an error only when reconnecting cannot
    /// help (credentials, permissions). Dropping the queue's sender on return
    /// tells the worker that nothing more is coming.
    pub async fn run(mut self) -> Result<(), RedisError> {
        let mut lost_at: Option<Instant> = None;
        let mut overflow_reported = Instant::now();
        loop {
            let connected =
                retry_until_connected(&self.client, &self.cancel, || self.subscribe()).await?;
            let Some(pubsub) = connected else {
                return Ok(());
            };
            self.coverage.up(&self.counters);
            match lost_at.take() {
                Some(t) => {
                    Counters::add(&self.counters.reconnects, 1);
                    tracing::warn!(
                        worker = %self.worker_id,
                        channel = %self.channel,
                        gap_ms = t.elapsed().as_millis() as u64,
                        "resubscribed; messages published during the gap reached only the other workers"
                    );
                }
                None => {
                    tracing::debug!(worker = %self.worker_id, channel = %self.channel, "subscribed")
                }
            }
            let (mut sink, mut messages) = pubsub.split();
            let mut last_heard = Instant::now();
            // One timer, moved on only when it fires: no timer per message.
            let keepalive = tokio::time::sleep(KEEPALIVE);
            tokio::pin!(keepalive);
            loop {
                let msg = tokio::select! {
                    _ = self.cancel.cancelled() => {
                        self.unsubscribe_and_drain(&mut sink, &mut messages).await;
                        self.coverage.down(false);
                        return Ok(());
                    }
                    msg = messages.next() => msg,
                    _ = &mut keepalive => {
                        if last_heard.elapsed() < KEEPALIVE {
                            keepalive.as_mut().reset((last_heard + KEEPALIVE).into());
                            continue;
                        }
                        match tokio::time::timeout(PING_TIMEOUT, sink.ping::<()>()).await {
                            Ok(Ok(())) => {
                                last_heard = Instant::now();
                                keepalive.as_mut().reset((last_heard + KEEPALIVE).into());
                                continue;
                            }
                            _ => None,
                        }
                    }
                };
                let Some(msg) = msg else {
                    break;
                };
                last_heard = Instant::now();
                let incoming = self.receive(&msg);
                match self.queue.try_send(incoming) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        Counters::add(&self.counters.overflow, 1);
                        if overflow_reported.elapsed() >= Duration::from_secs(1) {
                            overflow_reported = Instant::now();
                            tracing::warn!(worker = %self.worker_id, capacity = self.queue.max_capacity(), "queue full: dropping new messages at this worker (see overflow)");
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.coverage.down(false);
                        return Ok(()); // the worker is gone
                    }
                }
            }
            tracing::warn!(worker = %self.worker_id, channel = %self.channel, "subscription lost, reconnecting");
            self.coverage.down(true);
            lost_at = Some(Instant::now());
        }
    }

    /// Counts a message and gives it its id.
    fn receive(&mut self, msg: &redis::Msg) -> Incoming {
        Counters::add(&self.counters.received, 1);
        self.ids
            .assign(msg.get_payload_bytes().to_vec(), Instant::now())
    }

    /// Stops reading without losing what the server already sent: once
    /// UNSUBSCRIBE is confirmed, every message published before it is in the
    /// connection's buffer (replies come in order), and goes to the worker.
    async fn unsubscribe_and_drain(
        &mut self,
        sink: &mut redis::aio::PubSubSink,
        messages: &mut redis::aio::PubSubStream,
    ) {
        match tokio::time::timeout(PING_TIMEOUT, sink.unsubscribe(&self.channel)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(worker = %self.worker_id, cause = %err, "UNSUBSCRIBE failed; handing over what has arrived")
            }
            Err(_) => {
                tracing::warn!(worker = %self.worker_id, "UNSUBSCRIBE not confirmed in time; handing over what has arrived")
            }
        }
        // `unconstrained`: tokio's cooperative budget would otherwise make a
        // ready channel look empty after a hundred-odd messages.
        while let Some(Some(msg)) = tokio::task::unconstrained(messages.next()).now_or_never() {
            let incoming = self.receive(&msg);
            if self.queue.send(incoming).await.is_err() {
                return;
            }
        }
    }

    async fn subscribe(&self) -> Result<redis::aio::PubSub, RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(&self.channel).await?;
        Ok(pubsub)
    }
}

/// Whether any worker of this process is subscribed. A stretch of time in
/// which none is, after one had been, is a *gap*: messages published then
/// reached no worker here. Gaps are counted, timed and logged.
#[derive(Debug, Default)]
pub struct Coverage {
    subscribed: AtomicUsize,
    /// When the last subscription of the process was lost, if none is up.
    uncovered_since: Mutex<Option<Instant>>,
}

impl Coverage {
    fn up(&self, counters: &Counters) {
        if self.subscribed.fetch_add(1, Ordering::SeqCst) == 0
            && let Some(since) = self.uncovered_since.lock().unwrap().take()
        {
            // Rounded up: a gap shorter than a millisecond is still a gap.
            let ms = since.elapsed().as_micros().div_ceil(1000) as u64;
            Counters::add(&counters.gaps, 1);
            Counters::add(&counters.gap_ms, ms);
            tracing::warn!(
                gap_ms = ms,
                "no worker of this process was subscribed for {ms} ms: messages published then reached no worker here"
            );
        }
    }

    /// `lost`: the subscription dropped (as opposed to a deliberate stop).
    fn down(&self, lost: bool) {
        if self.subscribed.fetch_sub(1, Ordering::SeqCst) == 1 && lost {
            *self.uncovered_since.lock().unwrap() = Some(Instant::now());
        }
    }
}
