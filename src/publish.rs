//! `optimus publish`: timed batches of test messages on the input channel,
//! and the [`Publisher`] a service can use to publish without losing what
//! reaches no bridge worker.
//!
//! Each test message is `{"message_id":"<uuid v4>","run":"<run>","seq":<n>,"sent_ms":<unix ms>}`
//! (the id under MESSAGE_ID_FIELD; padded with a `"pad"` field to
//! `--payload-size` bytes when asked); `run` names one run of the publisher,
//! for `optimus audit`.
//!
//! Each batch is one round trip: one script that asks `PUBSUB NUMSUB` of the
//! bridge's probe channel (see [`probe_channel`]) and PUBLISHes the batch.
//! Redis runs it as one step, so the count says exactly whether a bridge
//! worker was subscribed when those messages were published: other
//! subscribers (a monitor's `PSUBSCRIBE *`, a service of yours) do not
//! count. (A script, not MULTI: the README's ACL rule allows scripts, not
//! transactions.) A batch
//! published while none was would be lost by Pub/Sub, so the publisher
//! writes it straight to the output stream through the bridge's ACK protocol
//! (the *fast path*): exactly once, like the rest. A payload larger than
//! MAX_PAYLOAD_BYTES is not published at all (it could drop every
//! subscriber at the server's output-buffer limit): it goes to the
//! dead-letter stream, with the reason.
//!
//! A batch Redis did not confirm (connection lost, server restarting) is
//! sent again, with the same ids, until it is confirmed or `retry_for` has
//! passed; the ACK keys make the second sending harmless.
//!
//! On a cluster the probe is not used: a PUBLISH's count (its node's
//! subscribers) decides, as the README says.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bridge::delivery::{Delivery, Destination, Write, probe_channel};
use crate::bridge::host_name;
use crate::bridge::message::{Incoming, json_id};
use crate::config::{Pace, PublishConfig, PublishLimit};
use crate::connect::{Conn, is_fatal, reconnect_backoff};

/// What a publisher run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PublishSummary {
    /// Names this run's test messages (their `run` field).
    pub run: String,
    /// Messages the server confirmed (published, or dead-lettered).
    pub published: u64,
    /// Of those, how many were published while no bridge worker was
    /// subscribed.
    pub no_subscriber: u64,
    /// Of those, how many the fast path wrote straight to the stream.
    pub stored_directly: u64,
    /// Of `published`: payloads over MAX_PAYLOAD_BYTES, written to the
    /// dead-letter stream instead of the channel.
    pub dead_lettered: u64,
    /// Messages sent again because Redis had not confirmed their batch.
    pub resent: u64,
    /// Messages given up after `retry_for` without confirmation: perhaps lost.
    pub failed: u64,
    /// Messages neither the stream nor the dead-letter stream would take
    /// (logged with Redis's reason).
    pub refused: u64,
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
            "run={} published={} no_subscriber={} stored_directly={} dead_lettered={} refused={} resent={} failed={} elapsed={:.2}s rate={:.0}/s",
            self.run,
            self.published,
            self.no_subscriber,
            self.stored_directly,
            self.dead_lettered,
            self.refused,
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
    /// Messages published while no bridge worker was subscribed.
    pub no_subscriber: u64,
    /// Of those, how many were written to the stream by the fast path (the
    /// rest were there already, or the fast path is off).
    pub stored_directly: u64,
    /// Payloads too large to publish, written to the dead-letter stream.
    pub dead_lettered: u64,
    /// Messages neither the stream nor the dead-letter stream would take.
    pub refused: u64,
}

/// ARGV: the probe channel, PUBLISH or SPUBLISH, the channel, then the
/// payloads. Publishes them all and returns how many bridge subscriptions
/// there were (the probe's subscribers), in one step.
const PUBLISH_BATCH: &str = r#"
local bridge = redis.call('PUBSUB', 'NUMSUB', ARGV[1])[2]
for i = 4, #ARGV do
  redis.call(ARGV[2], ARGV[3], ARGV[i])
end
return bridge
"#;

/// Most payload bytes one PUBLISH script carries. Redis sends subscribers
/// nothing while a script runs, so a script's whole output lands in each
/// subscriber's buffer at once: this keeps it far below the Pub/Sub
/// output-buffer limit (32 MB hard, 8 MB soft by default).
const MAX_SCRIPT_BYTES: usize = 1 << 20;

/// Where the fast path writes a channel's messages: each stream a route
/// gives the channel.
#[derive(Clone)]
struct Target {
    writer: Delivery,
}

/// Publishes batches on a channel; what no bridge worker could receive is
/// written to the stream directly (the fast path), exactly once, and
/// oversized payloads go to the dead-letter stream. Clones share the
/// connection: batches sent from several clones at once are pipelined.
#[derive(Clone)]
pub struct Publisher {
    conn: Conn,
    channel: String,
    /// The bridge's probe channel for the route that reads `channel`
    /// (`None`: no route reads it).
    probe: Option<String>,
    /// SPUBLISH instead of PUBLISH.
    sharded: bool,
    cluster: bool,
    fast_path: bool,
    /// The streams the routes give `channel`, in route order; the first
    /// one's dead-letter stream takes the oversized payloads.
    targets: Vec<Target>,
    publish_batch: redis::Script,
    id_field: String,
    max_payload_bytes: usize,
}

/// A batch's messages in the form the fast path writes them: each with its
/// id fixed once, so that writing them again after an unconfirmed attempt
/// writes nothing twice.
struct Pending {
    messages: Vec<Incoming>,
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
            match ConnectionManager::new_with_config(endpoint.client()?, conn_config).await {
                Ok(conn) => Conn::Single(conn),
                Err(err) => return Err(endpoint.diagnose(err).await),
            }
        };
        // A server that wants a password says so here, in one line, before
        // any batch is sent.
        let mut conn = conn;
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        let consumer = format!("publisher-{}-{}", host_name(), std::process::id());
        let routes = config.routes_for_channel();
        let mut streams: Vec<String> = Vec::new();
        for route in &routes {
            let stream = route.stream_for(&config.channel);
            if !streams.contains(&stream) {
                streams.push(stream);
            }
        }
        let targets = streams
            .iter()
            .map(|stream| Target {
                writer: Delivery::new(
                    conn.clone(),
                    Destination {
                        dead_stream: config.dead_stream_of(stream),
                        id_field: config.id_field.clone(),
                        ..Destination::new(stream, &config.channel)
                    },
                    consumer.clone(),
                    Duration::from_secs(2),
                    config.ack_ttl,
                ),
            })
            .collect();
        Ok(Self {
            conn,
            probe: routes.first().map(|r| probe_channel(&r.source)),
            sharded: endpoint.is_sharded(),
            cluster: endpoint.is_cluster(),
            channel: config.channel.clone(),
            fast_path: config.fast_path,
            targets,
            publish_batch: redis::Script::new(PUBLISH_BATCH),
            id_field: config.id_field.clone(),
            max_payload_bytes: config.max_payload_bytes,
        })
    }

    /// Publishes `payloads`, then writes the ones no bridge worker could
    /// receive through the fast path, and the oversized ones to the
    /// dead-letter stream, retrying what Redis does not confirm for at most
    /// `retry_for`. The publishing is retried as a whole; once it is
    /// confirmed, only the writing is, so a message is never published
    /// twice because a write failed. Returns the outcome and how many
    /// messages were published again.
    pub async fn send(
        &mut self,
        payloads: &[Vec<u8>],
        retry_for: Duration,
        shutdown: &CancellationToken,
    ) -> Result<(BatchOutcome, u64), RedisError> {
        let mut retry = Retry::new(retry_for, shutdown, payloads.len());
        let (fit, oversized): (Vec<&Vec<u8>>, Vec<&Vec<u8>>) = payloads
            .iter()
            .partition(|p| p.len() <= self.max_payload_bytes);
        let mut outcome = BatchOutcome::default();
        let missed = loop {
            match self.publish(&fit).await {
                Ok(missed) => break missed,
                Err(err) => {
                    retry
                        .after(err, "batch not confirmed; sending it again")
                        .await?
                }
            }
        };
        let resent = retry.resent;
        outcome.no_subscriber = missed.len() as u64;
        let mut pending = Vec::new();
        if self.fast_path && !missed.is_empty() {
            pending.push((self.pending(&missed, false), false));
        }
        if !oversized.is_empty() {
            pending.push((self.pending(&oversized, true), true));
        }
        for (batch, dead) in pending {
            let targets = if dead { 1 } else { self.targets.len() };
            for target in 0..targets {
                let (written, refused) = loop {
                    match self.write(target, &batch).await {
                        Ok(done) => break done,
                        Err(err) => {
                            retry
                                .after(err, "fast-path write not confirmed; writing again")
                                .await?
                        }
                    }
                };
                outcome.refused += refused;
                match dead {
                    true => outcome.dead_lettered += written,
                    false if target == 0 => outcome.stored_directly += written,
                    false => {}
                }
            }
        }
        Ok((outcome, resent))
    }

    /// PUBLISHes the payloads, in scripts of at most [`MAX_SCRIPT_BYTES`];
    /// returns the ones no bridge worker could receive.
    async fn publish<'p>(
        &mut self,
        payloads: &[&'p Vec<u8>],
    ) -> Result<Vec<&'p Vec<u8>>, RedisError> {
        let command = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
        // One step with the probe's count (see the module's notes); on a
        // cluster, each PUBLISH's own count tells.
        if !self.cluster {
            let mut missed = Vec::new();
            let mut rest = payloads;
            while !rest.is_empty() {
                let mut bytes = 0;
                let n = rest
                    .iter()
                    .take_while(|p| {
                        bytes += p.len();
                        bytes <= MAX_SCRIPT_BYTES
                    })
                    .count()
                    .max(1);
                let (chunk, after) = rest.split_at(n);
                rest = after;
                let mut call = self.publish_batch.prepare_invoke();
                call.arg(self.probe.as_deref().unwrap_or(""))
                    .arg(command)
                    .arg(&self.channel);
                for payload in chunk {
                    call.arg(payload.as_slice());
                }
                let bridge: u64 = call.invoke_async(&mut self.conn).await?;
                if bridge == 0 {
                    missed.extend_from_slice(chunk);
                }
            }
            return Ok(missed);
        }
        let mut pipe = redis::pipe();
        for payload in payloads {
            pipe.cmd(command).arg(&self.channel).arg(payload.as_slice());
        }
        let receivers: Vec<u64> = pipe.query_async(&mut self.conn).await?;
        Ok(payloads
            .iter()
            .zip(receivers)
            .filter(|(_, r)| *r == 0)
            .map(|(p, _)| *p)
            .collect())
    }

    /// The messages the fast path writes (or, `oversized`, dead-letters),
    /// each with its id: MESSAGE_ID_FIELD, or one of its own for a payload
    /// without (nobody else saw it), fixed for every attempt.
    fn pending(&self, payloads: &[&Vec<u8>], oversized: bool) -> Pending {
        let max = self.max_payload_bytes;
        let now = Instant::now();
        let messages = payloads
            .iter()
            .map(|payload| {
                let id = json_id(payload, &self.id_field)
                    .unwrap_or_else(|| format!("p:{}", uuid::Uuid::new_v4()));
                Incoming {
                    rejected: oversized.then(|| {
                        format!(
                            "payload of {} bytes is larger than MAX_PAYLOAD_BYTES ({max}): not published",
                            payload.len()
                        )
                    }),
                    ..Incoming::new(id, payload.to_vec(), now)
                }
            })
            .collect();
        Pending { messages }
    }

    /// Writes the pending messages to target `target`'s stream (or its
    /// dead-letter stream), each exactly once by its id; one the stream
    /// refuses goes to the dead-letter stream with Redis's reason. Returns
    /// how many this call wrote, and how many neither stream took.
    async fn write(&mut self, target: usize, pending: &Pending) -> Result<(u64, u64), RedisError> {
        let Some(target) = self.targets.get_mut(target) else {
            return Ok((0, 0));
        };
        let (mut written, mut refused) = (0, 0);
        let mut messages: Vec<Incoming> = pending.messages.clone();
        while !messages.is_empty() {
            let refs: Vec<&Incoming> = messages.iter().collect();
            let results = target.writer.write_owned(&refs).await?;
            let mut again = Vec::new();
            for (msg, result) in messages.iter().zip(results) {
                match result {
                    Write::Written => written += 1,
                    Write::Refused(why) if msg.rejected.is_none() => again.push(Incoming {
                        rejected: Some(format!("the stream refused it: {why}")),
                        ..msg.clone()
                    }),
                    Write::Refused(why) => {
                        refused += 1;
                        tracing::error!(message_id = %msg.id, reason = %why, "neither the stream nor the dead-letter stream took the message");
                    }
                    Write::NotTried(why) => {
                        return Err(RedisError::from((
                            ErrorKind::Client,
                            "Redis did not take the write for now",
                            why,
                        )));
                    }
                    Write::Acked | Write::Reused | Write::LockLost => {}
                }
            }
            messages = again;
        }
        Ok((written, refused))
    }
}

/// The retries of one batch: backing off between attempts, for at most
/// `retry_for` in all (and not past a shutdown).
struct Retry<'a> {
    give_up: Instant,
    backoff: Box<dyn Iterator<Item = Duration> + Send>,
    shutdown: &'a CancellationToken,
    size: usize,
    /// Messages published again so far.
    resent: u64,
}

impl<'a> Retry<'a> {
    fn new(retry_for: Duration, shutdown: &'a CancellationToken, size: usize) -> Self {
        Self {
            give_up: Instant::now() + retry_for,
            backoff: Box::new(reconnect_backoff()),
            shutdown,
            size,
            resent: 0,
        }
    }

    /// After a failed attempt: `Err` when it is not to be retried (fatal,
    /// out of time, shutting down), else waits its turn.
    async fn after(&mut self, err: RedisError, what: &str) -> Result<(), RedisError> {
        let wait = self.backoff.next().unwrap_or(crate::connect::MAX_BACKOFF);
        if is_fatal(&err) || Instant::now() + wait > self.give_up || self.shutdown.is_cancelled() {
            return Err(err);
        }
        tracing::warn!(cause = %crate::connect::brief(&err), retry_in_ms = wait.as_millis() as u64, messages = self.size, "{what}");
        tokio::time::sleep(wait).await;
        self.resent += self.size as u64;
        Ok(())
    }
}

/// Test messages of one run of the publisher.
#[derive(Debug, Clone)]
pub struct TestMessages {
    /// The run's name, in every message (`None`: left out, as the benchmark
    /// does to keep its payloads at their stated size).
    pub run: Option<String>,
    /// MESSAGE_ID_FIELD, JSON-quoted.
    id_field: String,
    pub payload_size: usize,
}

impl TestMessages {
    /// A new run: a random name of 8 hex digits.
    pub fn new(id_field: &str, payload_size: usize) -> Self {
        Self {
            run: Some(format!("{:08x}", rand::random::<u32>())),
            id_field: serde_json::to_string(id_field).expect("a string"),
            payload_size,
        }
    }

    /// Messages without a run name.
    pub fn unnamed(payload_size: usize) -> Self {
        Self {
            run: None,
            ..Self::new("message_id", payload_size)
        }
    }

    /// The JSON of message number `seq`.
    pub fn message(&self, seq: u64) -> String {
        let sent_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        // A v4 UUID from the thread's RNG (seeded once from the OS): no system
        // call per message, unlike `Uuid::new_v4`.
        let id = uuid::Builder::from_random_bytes(rand::rng().random()).into_uuid();
        let mut json = format!(r#"{{{}:"{id}","#, self.id_field);
        if let Some(run) = &self.run {
            json.push_str(&format!(r#""run":"{run}","#));
        }
        json.push_str(&format!(r#""seq":{seq},"sent_ms":{sent_ms}"#));
        // `,"pad":""}` adds 10 bytes.
        if self.payload_size > json.len() + 10 {
            let pad = self.payload_size - json.len() - 10;
            json.push_str(r#","pad":""#);
            json.extend(std::iter::repeat_n('x', pad));
            json.push('"');
        }
        json.push('}');
        json
    }
}

/// The JSON of test message number `seq`, without a run name (the
/// benchmark's messages).
pub fn test_message(seq: u64, payload_size: usize) -> String {
    TestMessages::unnamed(payload_size).message(seq)
}

/// Publishes test messages until the limit is reached or `shutdown` is
/// cancelled. Returns an error when Redis cannot be reached at the start, or
/// refuses the credentials.
pub async fn run(
    config: &PublishConfig,
    shutdown: CancellationToken,
) -> Result<PublishSummary, PublishError> {
    let messages = TestMessages::new(&config.id_field, config.payload_size);
    run_messages(config, &messages, shutdown).await
}

/// [`run`] with these test messages.
pub async fn run_messages(
    config: &PublishConfig,
    messages: &TestMessages,
    shutdown: CancellationToken,
) -> Result<PublishSummary, PublishError> {
    let server = config.endpoint.to_string();
    let mut summary = PublishSummary {
        run: messages.run.clone().unwrap_or_default(),
        ..PublishSummary::default()
    };
    let publisher = match Publisher::connect(config).await {
        Ok(publisher) => publisher,
        Err(source) => {
            return Err(PublishError {
                server,
                source,
                summary,
            });
        }
    };

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
            .map(|s| messages.message(s).into_bytes())
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
        sending.spawn(async move { (n, sender.send(&payloads, retry_for, &stop).await) });
        summary.elapsed = start.elapsed();

        if let Some(every) = config.progress_interval
            && last_progress.0.elapsed() >= every
        {
            let dt = last_progress.0.elapsed().as_secs_f64();
            println!(
                "publish sent={} no_subscriber={} stored_directly={} dead_lettered={} failed={} rate={:.0}/s run={}",
                summary.published,
                summary.no_subscriber,
                summary.stored_directly,
                summary.dead_lettered,
                summary.failed,
                (summary.published - last_progress.1) as f64 / dt,
                summary.run,
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
    if failure.is_some() {
        // An error retrying cannot mend: the batches still on their way are
        // given up at once (and counted as failed), not waited for.
        summary.failed += sending.len() as u64 * config.batch_size as u64;
        sending.abort_all();
    }
    while let Some(joined) = sending.join_next().await {
        let Ok(sent) = joined else { continue };
        if let Err(err) = account(&mut summary, sent) {
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
            summary.dead_lettered += outcome.dead_lettered;
            summary.refused += outcome.refused;
            Ok(())
        }
        Err(source) if is_fatal(&source) || summary.published == 0 && summary.failed == 0 => {
            summary.failed += n;
            Err(source)
        }
        Err(source) => {
            summary.failed += n;
            tracing::error!(cause = %crate::connect::brief(&source), messages = n, "gave up a batch Redis did not confirm");
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
