//! `optimus publish`: timed batches of test messages on the input channel,
//! and the [`Publisher`] a service can use to publish without losing what
//! reaches no subscriber.
//!
//! Each test message is `{"message_id":"<uuid v4>","seq":<n>,"sent_ms":<unix ms>}`
//! (padded with a `"pad"` field to `--payload-size` bytes when asked). Each
//! batch is one pipelined round trip. PUBLISH's reply says how many
//! subscribers got a message; one that reached nobody would be lost by
//! Pub/Sub, so the publisher writes it straight to the output stream through
//! the bridge's lock/ACK protocol (the *fast path*): exactly once, like the
//! rest. A batch Redis did not confirm (connection lost, server restarting)
//! is sent again, with the same ids, until it is confirmed or `retry_for`
//! has passed; the ACK keys make the second sending harmless.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngExt;
use redis::RedisError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bridge::delivery::{Delivery, Destination, Settled};
use crate::bridge::host_name;
use crate::bridge::message::{Incoming, json_id};
use crate::config::{Pace, PublishConfig, PublishLimit};
use crate::connect::{Conn, is_fatal, reconnect_backoff};

/// What a publisher run did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PublishSummary {
    /// Messages the server confirmed.
    pub published: u64,
    /// Of those, how many reached no subscriber (PUBLISH returned 0).
    pub no_subscriber: u64,
    /// Of those, how many the fast path wrote straight to the stream.
    pub stored_directly: u64,
    /// Messages sent again because Redis had not confirmed their batch.
    pub resent: u64,
    /// Messages given up after `retry_for` without confirmation: perhaps lost.
    pub failed: u64,
    /// Time from the first batch to the last reply.
    pub elapsed: Duration,
}

impl PublishSummary {
    pub fn rate(&self) -> f64 {
        self.published as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for PublishSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "published={} no_subscriber={} stored_directly={} resent={} failed={} elapsed={:.2}s rate={:.0}/s",
            self.published,
            self.no_subscriber,
            self.stored_directly,
            self.resent,
            self.failed,
            self.elapsed.as_secs_f64(),
            self.rate()
        )
    }
}

/// Publishing stopped; `summary` says what went out before.
#[derive(Debug, thiserror::Error)]
#[error("cannot publish to {server}: {}", crate::connect::explain(.source))]
pub struct PublishError {
    pub server: String,
    pub source: RedisError,
    pub summary: PublishSummary,
}

/// What one confirmed batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Messages that reached no subscriber.
    pub no_subscriber: u64,
    /// Of those, how many were written to the stream by the fast path (the
    /// rest were there already, or the fast path is off).
    pub stored_directly: u64,
}

/// Publishes batches on a channel; with a fast-path stream, what reaches no
/// subscriber is written there directly, exactly once. Clones share the
/// connection: batches sent from several clones at once are pipelined.
#[derive(Clone)]
pub struct Publisher {
    conn: Conn,
    channel: String,
    /// SPUBLISH instead of PUBLISH.
    sharded: bool,
    fast_path: Option<Delivery>,
}

impl Publisher {
    /// Connects (failing at once when Redis cannot be reached: a publisher
    /// should hear about it rather than wait).
    pub async fn connect(config: &PublishConfig) -> Result<Self, RedisError> {
        let endpoint = &config.endpoint;
        let conn = if endpoint.is_cluster() {
            Conn::Cluster(
                endpoint
                    .connect_cluster(endpoint.cluster_builder()?)
                    .await?,
            )
        } else {
            let conn_config = ConnectionManagerConfig::new()
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2))
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(10)));
            Conn::Single(ConnectionManager::new_with_config(endpoint.client()?, conn_config).await?)
        };
        let fast_path = config.fast_path_stream.as_ref().map(|stream| {
            Delivery::new(
                conn.clone(),
                Destination {
                    dead_stream: crate::config::default_dead_stream(stream, endpoint.is_cluster()),
                    ..Destination::new(stream, &config.channel)
                },
                format!("publisher-{}-{}", host_name(), std::process::id()),
                Duration::from_secs(2),
                config.ack_ttl,
            )
        });
        Ok(Self {
            conn,
            sharded: endpoint.is_sharded(),
            channel: config.channel.clone(),
            fast_path,
        })
    }

    /// Publishes `payloads` in one round trip, then writes the ones that
    /// reached nobody through the fast path. An error means the batch is not
    /// confirmed: send the same payloads again.
    ///
    /// The fast path knows a message by its `message_id` JSON field. A payload
    /// without one gets a fresh random id on each sending, so re-sending an
    /// unconfirmed batch is harmless only for payloads that carry an id.
    pub async fn publish_batch(
        &mut self,
        payloads: &[Vec<u8>],
    ) -> Result<BatchOutcome, RedisError> {
        let mut pipe = redis::pipe();
        let command = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
        for payload in payloads {
            pipe.cmd(command).arg(&self.channel).arg(payload);
        }
        let receivers: Vec<u64> = pipe.query_async(&mut self.conn).await?;
        let missed: Vec<&Vec<u8>> = payloads
            .iter()
            .zip(&receivers)
            .filter(|(_, r)| **r == 0)
            .map(|(p, _)| p)
            .collect();
        let mut outcome = BatchOutcome {
            no_subscriber: missed.len() as u64,
            stored_directly: 0,
        };
        if let Some(delivery) = self.fast_path.as_mut()
            && !missed.is_empty()
        {
            let now = Instant::now();
            let messages: Vec<Incoming> = missed
                .into_iter()
                .map(|payload| {
                    // A payload without an id gets one of its own: nobody else saw it.
                    let id = json_id(payload, "message_id")
                        .unwrap_or_else(|| format!("p:{}", uuid::Uuid::new_v4()));
                    Incoming::new(id, payload.clone(), now)
                })
                .collect();
            let refs: Vec<&Incoming> = messages.iter().collect();
            let settled = delivery.settle(&refs).await?;
            outcome.stored_directly =
                settled.iter().filter(|s| **s == Settled::Written).count() as u64;
        }
        Ok(outcome)
    }
}

/// Builds the JSON of message number `seq`.
pub fn test_message(seq: u64, payload_size: usize) -> String {
    let sent_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    // A v4 UUID from the thread's RNG (seeded once from the OS): no system
    // call per message, unlike `Uuid::new_v4`.
    let id = uuid::Builder::from_random_bytes(rand::rng().random()).into_uuid();
    let mut json = format!(r#"{{"message_id":"{id}","seq":{seq},"sent_ms":{sent_ms}"#);
    // `,"pad":""}` adds 10 bytes.
    if payload_size > json.len() + 10 {
        let pad = payload_size - json.len() - 10;
        json.push_str(r#","pad":""#);
        json.extend(std::iter::repeat_n('x', pad));
        json.push('"');
    }
    json.push('}');
    json
}

/// Publishes test messages until the limit is reached or `shutdown` is
/// cancelled. Returns an error when Redis cannot be reached at the start, or
/// refuses the credentials.
pub async fn run(
    config: &PublishConfig,
    shutdown: CancellationToken,
) -> Result<PublishSummary, PublishError> {
    let server = config.endpoint.to_string();
    let mut summary = PublishSummary::default();
    let publisher = Publisher::connect(config)
        .await
        .map_err(|source| PublishError {
            server: server.clone(),
            source,
            summary,
        })?;

    let start = Instant::now();
    let mut last_progress = (start, 0u64);
    let mut rng = rand::rng();
    let mut seq = 0u64;
    // Batches on their way: sent from clones of the publisher, pipelined on
    // its one connection, so the next batch is built while Redis works.
    let mut sending: JoinSet<Sent> = JoinSet::new();
    let mut failure = None;
    loop {
        let elapsed = start.elapsed();
        let remaining = match config.limit {
            PublishLimit::Count(n) => n - seq,
            PublishLimit::Duration(d) if elapsed >= d => 0,
            PublishLimit::Duration(_) => u64::MAX,
        };
        if remaining == 0 || shutdown.is_cancelled() {
            break;
        }
        let mut n = remaining.min(config.batch_size as u64);
        if let Pace::Rate(rate) = config.pace
            && rate.is_finite()
        {
            let owed = ((elapsed.as_secs_f64() * rate) as u64 + 1).saturating_sub(seq);
            if owed == 0 {
                let next = start + Duration::from_secs_f64((seq + 1) as f64 / rate);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(next.into()) => continue,
                }
            }
            n = n.min(owed);
        }

        let payloads: Vec<Vec<u8>> = (seq..seq + n)
            .map(|s| test_message(s, config.payload_size).into_bytes())
            .collect();
        seq += n;
        while sending.len() >= IN_FLIGHT {
            let joined = join(sending.join_next().await);
            if let Err(err) = account(&mut summary, joined) {
                failure = Some(err);
                break;
            }
        }
        if failure.is_some() {
            break;
        }
        let mut sender = publisher.clone();
        let retry_for = config.retry_for;
        let stop = shutdown.clone();
        sending.spawn(async move {
            (
                n,
                send_confirmed(&mut sender, &payloads, retry_for, &stop).await,
            )
        });
        summary.elapsed = start.elapsed();

        if let Some(every) = config.progress_interval
            && last_progress.0.elapsed() >= every
        {
            let dt = last_progress.0.elapsed().as_secs_f64();
            println!(
                "publish sent={} no_subscriber={} stored_directly={} failed={} rate={:.0}/s",
                summary.published,
                summary.no_subscriber,
                summary.stored_directly,
                summary.failed,
                (summary.published - last_progress.1) as f64 / dt
            );
            last_progress = (Instant::now(), summary.published);
        }

        if let Pace::Pauses { min, max } = config.pace {
            let pause = if max > min {
                rng.random_range(min..=max)
            } else {
                min
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
    while let Some(joined) = sending.join_next().await {
        if let Err(err) = account(&mut summary, join(Some(joined))) {
            failure.get_or_insert(err);
        }
    }
    summary.elapsed = start.elapsed();
    match failure {
        Some(source) => Err(PublishError {
            server,
            source,
            summary,
        }),
        None => Ok(summary),
    }
}

/// A batch's size, and what sending it gave: the outcome and the number of
/// messages re-sent, or the error that made the publisher give it up.
type Sent = (u64, Result<(BatchOutcome, u64), RedisError>);

/// Adds a finished batch to the summary; an error that ends the run (fatal,
/// or the very first batch) is returned.
fn account(summary: &mut PublishSummary, (n, result): Sent) -> Result<(), RedisError> {
    match result {
        Ok((outcome, resent)) => {
            summary.published += n;
            summary.resent += resent;
            summary.no_subscriber += outcome.no_subscriber;
            summary.stored_directly += outcome.stored_directly;
            Ok(())
        }
        Err(source) if is_fatal(&source) || summary.published == 0 && summary.failed == 0 => {
            summary.failed += n;
            Err(source)
        }
        Err(source) => {
            summary.failed += n;
            tracing::error!(cause = %source, messages = n, "gave up a batch Redis did not confirm");
            Ok(())
        }
    }
}

/// Batches a publisher keeps on their way at once.
pub const IN_FLIGHT: usize = 16;

/// A finished sending task's result (a panic in it is re-raised).
fn join<T>(joined: Option<Result<T, tokio::task::JoinError>>) -> T {
    match joined.expect("a batch was on its way") {
        Ok(value) => value,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}

/// Sends one batch until Redis confirms it, backing off between tries, for
/// at most `retry_for` (and not past a shutdown). Returns the outcome and how
/// many messages were sent again.
async fn send_confirmed(
    publisher: &mut Publisher,
    payloads: &[Vec<u8>],
    retry_for: Duration,
    shutdown: &CancellationToken,
) -> Result<(BatchOutcome, u64), RedisError> {
    let give_up = Instant::now() + retry_for;
    let mut backoff = reconnect_backoff();
    let mut resent = 0;
    loop {
        let err = match publisher.publish_batch(payloads).await {
            Ok(outcome) => return Ok((outcome, resent)),
            Err(err) => err,
        };
        let wait = backoff.next().unwrap_or(Duration::from_secs(5));
        if is_fatal(&err) || Instant::now() + wait > give_up || shutdown.is_cancelled() {
            return Err(err);
        }
        tracing::warn!(cause = %err, retry_in_ms = wait.as_millis() as u64, messages = payloads.len(), "batch not confirmed; sending it again");
        tokio::time::sleep(wait).await;
        resent += payloads.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_messages_carry_a_unique_id_and_sequence() {
        let a: serde_json::Value = serde_json::from_str(&test_message(7, 0)).unwrap();
        let b: serde_json::Value = serde_json::from_str(&test_message(8, 0)).unwrap();
        assert_eq!(a["seq"], 7);
        assert_ne!(a["message_id"], b["message_id"]);
        assert_eq!(a["message_id"].as_str().unwrap().len(), 36);
    }

    #[test]
    fn padding_reaches_the_asked_size() {
        assert_eq!(test_message(1, 300).len(), 300);
        assert!(test_message(1, 10).len() > 10); // never truncated
    }
}
