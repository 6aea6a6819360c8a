//! A worker's subscription: its own task, its own connection, reading the
//! channel and handing each message (with its id) to the worker through a
//! bounded queue, so the write path never slows the reading of the socket.
//!
//! When the connection drops, it reconnects with backoff and subscribes
//! again, counting the reconnect and logging how long it was away: messages
//! published in that gap reached only the other workers.

use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use redis::{Client, RedisError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::message::{IdAssigner, Incoming};
use crate::connect::retry_until_connected;
use crate::monitor::Counters;

/// Everything the subscription task needs.
pub struct Subscription {
    pub client: Client,
    pub channel: String,
    pub worker_id: String,
    pub ids: IdAssigner,
    pub counters: Arc<Counters>,
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
        loop {
            let connected =
                retry_until_connected(&self.client, &self.cancel, || self.subscribe()).await?;
            let Some(mut pubsub) = connected else {
                return Ok(());
            };
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
            let mut messages = pubsub.on_message();
            loop {
                let msg = tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(()),
                    msg = messages.next() => msg,
                };
                let Some(msg) = msg else {
                    break;
                };
                Counters::add(&self.counters.received, 1);
                let incoming = self
                    .ids
                    .assign(msg.get_payload_bytes().to_vec(), Instant::now());
                if self.queue.send(incoming).await.is_err() {
                    return Ok(()); // the worker is gone
                }
            }
            tracing::warn!(worker = %self.worker_id, channel = %self.channel, "subscription lost, reconnecting");
            lost_at = Some(Instant::now());
        }
    }

    async fn subscribe(&self) -> Result<redis::aio::PubSub, RedisError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(&self.channel).await?;
        Ok(pubsub)
    }
}
