//! `optimus publish`: timed batches of test messages on the input channel,
//! and the [`Publisher`] a service can use to publish without losing what
//! reaches no bridge worker.
//!
//! Each test message is `{"message_id":"<uuid v4>","run":"<run>","seq":<n>,"sent_ms":<unix ms>}`
//! (the id under MESSAGE_ID_FIELD; padded with a `"pad"` field to
//! `--payload-size` bytes when asked); `run` names one run of the publisher,
//! for `optimus audit`.
//!
//! On one server each batch goes out as scripts (`publish.lua`) of at most
//! [`MAX_SCRIPT_BYTES`] each, which in one step ask `PUBSUB NUMSUB` of the
//! bridge's probe channel (see [`route_probe`]: other subscribers, a
//! monitor's `PSUBSCRIBE *`, do not count) and publish; when no bridge
//! worker was subscribed, the same step writes the messages to the stream
//! itself (the *fast path*), so nothing it sent is lost. Each script leaves
//! a marker for its part of the batch (for `--retry-for` and a minute more):
//! sending a part again after Redis did not confirm it (connection lost,
//! server restarting) writes nothing twice; it publishes the part again
//! only within the bridge's DEDUP_WINDOW (less a second), inside which the
//! bridge writes an id once (a server that stops right after a script never
//! sends its output to the subscribers); and a part that comes after its
//! deadline is refused rather than risk the marker being gone. Nothing is
//! stored per message.
//!
//! A payload larger than MAX_PAYLOAD_BYTES is not published at all (it could
//! drop every subscriber at the server's output-buffer limit): it goes to the
//! dead-letter stream, with the reason.
//!
//! On a cluster with sharded Pub/Sub a script on the channel's master
//! (`publish_sharded.lua`) SPUBLISHes the part and asks the bridge's probe,
//! which lives in the channel's slot, in the same step; with classic
//! Pub/Sub a PUBLISH's own count (its node's subscribers) decides. The fast
//! path writes with the race strategy's ACK keys.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngExt;
use redis::{ErrorKind, RedisError};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::bridge::delivery::ids::json_id;
use crate::bridge::delivery::race::{Racer, Write};
use crate::bridge::delivery::{Lane, Message, OutputFormat, Trim, route_probe, scripts};
use crate::bridge::route::{LanePlan, Router};
use crate::keys::host_name;
mod config;

use crate::connect::{Backoff, Conn, has_code, is_fatal};
pub use config::{Pace, PublishConfig, PublishLimit};

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

/// MIN_REPLICAS_ACKED: idle connections for parts that wait for replicas.
struct Waiting {
    endpoint: crate::connect::Endpoint,
    idle: std::sync::Mutex<Vec<Conn>>,
}

impl Waiting {
    /// An idle connection, or a new one.
    async fn take(&self) -> Result<Conn, RedisError> {
        let idle = self.idle.lock().expect("not poisoned").pop();
        match idle {
            Some(conn) => Ok(conn),
            None => crate::connect::managed(&self.endpoint).await,
        }
    }

    fn give_back(&self, conn: Conn) {
        self.idle.lock().expect("not poisoned").push(conn);
    }
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

/// Most payload bytes one PUBLISH script carries. Redis sends subscribers
/// nothing while a script runs, so a script's whole output lands in each
/// subscriber's buffer at once: this keeps it far below the Pub/Sub
/// output-buffer limit (32 MB hard, 8 MB soft by default).
pub const MAX_SCRIPT_BYTES: usize = 1 << 20;

/// How long a batch's marker outlives its `--retry-for`: the margin for the
/// publisher's estimate of the server's clock.
const MARKER_MARGIN: Duration = Duration::from_secs(60);

/// How long a part's WAIT for replicas may take (MIN_REPLICAS_ACKED).
const WAIT_FOR_REPLICAS: Duration = Duration::from_secs(1);

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
    targets: Vec<Arc<Lane>>,
    /// Writes with ACK keys: the dead letters, and the fast path on a
    /// cluster (or to a second stream).
    racer: Racer,
    consumer: String,
    id_field: String,
    max_payload_bytes: usize,
    /// How long after its first attempt a part Redis did not confirm is
    /// published again (see `publish.lua`): a second less than the
    /// bridge's DEDUP_WINDOW.
    republish_within: Duration,
    /// MIN_REPLICAS_ACKED (0: off).
    min_replicas: usize,
    /// How long the fast path's ACK keys live (renewed by the WAIT of
    /// MIN_REPLICAS_ACKED).
    ack_ttl: Duration,
    /// With MIN_REPLICAS_ACKED, the connections parts go out on, one per
    /// part on its way: WAIT blocks the connection it is sent on, and a
    /// part must not wait behind another's WAIT (see [`Waiting`]).
    waiting: Arc<Waiting>,
    /// The server's clock at connect, and the local instant then: batches'
    /// deadlines are in the server's time.
    server_clock: (u64, Instant),
    /// Taken for a whole batch where the fast path writes apart from the
    /// publishing (a cluster, or a second stream): a batch published after
    /// another one must not be written before that one's fast-path writes,
    /// or the stream would stand out of publish order (see [`Self::send`]).
    in_turn: Arc<tokio::sync::Mutex<()>>,
}

impl Publisher {
    /// Connects (failing at once when Redis cannot be reached: a publisher
    /// should hear about it rather than wait).
    pub async fn connect(config: &PublishConfig) -> Result<Self, RedisError> {
        let endpoint = &config.endpoint;
        let conn = crate::connect::managed(endpoint).await?;
        // A server that wants a password says so here, in one line, before
        // any batch is sent; its clock dates the batches.
        let mut conn = conn;
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let server_clock = (secs * 1000 + micros / 1000, Instant::now());
        // A cluster node reached by a plain URL takes no script whose keys
        // are in other slots: publish as on a cluster. (A user without INFO
        // is taken for a plain server's.)
        let cluster_node = !endpoint.is_cluster()
            && redis::cmd("INFO")
                .arg("cluster")
                .query_async::<String>(&mut conn)
                .await
                .is_ok_and(|info| info.contains("cluster_enabled:1"));
        let consumer = format!("publisher-{}-{}", host_name(), std::process::id());
        let routes = config.routes_for_channel();
        let db = endpoint.info().map_or(0, |info| info.redis_settings().db());
        // The lanes as the bridge makes them (dead-letter stream, trim).
        let router = Router::new(
            routes.clone(),
            LanePlan {
                dead_letter_stream: config.dead_letter_stream.clone(),
                cluster: endpoint.is_cluster(),
                format: OutputFormat::Envelope,
                id_field: config.id_field.clone(),
                db,
                handoff: None,
                sharded: false,
            },
        );
        let mut targets: Vec<Arc<Lane>> = Vec::new();
        for route in 0..routes.len() {
            let lane = router.lane(route, &config.channel);
            if targets.iter().all(|t| t.stream() != lane.stream()) {
                targets.push(lane);
            }
        }
        Ok(Self {
            racer: Racer::new(
                conn.clone(),
                consumer.clone(),
                Duration::from_secs(2),
                config.ack_ttl,
            ),
            conn,
            probe: routes
                .first()
                .map(|r| route_probe(endpoint.is_sharded(), db, &r.source, &r.target)),
            sharded: endpoint.is_sharded(),
            cluster: endpoint.is_cluster() || cluster_node,
            channel: config.channel.clone(),
            fast_path: config.fast_path,
            targets,
            consumer,
            id_field: config.id_field.clone(),
            max_payload_bytes: config.max_payload_bytes,
            republish_within: config.dedup_window.saturating_sub(Duration::from_secs(1)),
            min_replicas: config.min_replicas_acked,
            ack_ttl: config.ack_ttl,
            waiting: Arc::new(Waiting {
                endpoint: config.endpoint.clone(),
                idle: std::sync::Mutex::new(Vec::new()),
            }),
            server_clock,
            in_turn: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The server's time now, as the publisher reckons it (ms).
    fn server_now(&self) -> u64 {
        self.server_clock.0 + self.server_clock.1.elapsed().as_millis() as u64
    }

    /// Publishes `payloads`, writes the ones no bridge worker could receive
    /// through the fast path, and the oversized ones to the dead-letter
    /// stream, retrying what Redis does not confirm for at most `retry_for`:
    /// a part sent again publishes and writes nothing twice (see the
    /// module's notes). Returns the outcome and how many messages were sent
    /// again.
    pub async fn send(
        &mut self,
        payloads: &[Vec<u8>],
        retry_for: Duration,
        shutdown: &CancellationToken,
    ) -> Result<(BatchOutcome, u64), RedisError> {
        // (`retry_for` counts from here: the wait for this batch's turn is
        // part of it.)
        let mut retry = Retry::new(retry_for, shutdown, payloads.len());
        // Where the fast path's writes are not part of the publishing
        // script, batches go one after another: the next is published only
        // once this one's missed messages are in the stream (pipelined, a
        // later batch reaching a bridge just subscribed again could be
        // written before them).
        let in_turn = self.in_turn.clone();
        let _turn = match self.fast_path && (self.cluster || self.targets.len() > 1) {
            true => Some(in_turn.lock_owned().await),
            false => None,
        };
        let (fit, oversized): (Vec<&Vec<u8>>, Vec<&Vec<u8>>) = payloads
            .iter()
            .partition(|p| p.len() <= self.max_payload_bytes);
        let mut outcome = BatchOutcome::default();
        let deadline = self.server_now() + retry_for.as_millis() as u64;
        let mut missed: Vec<&Vec<u8>> = Vec::new();
        for part in parts(&fit) {
            let marker = format!("optimus:sent:{}", uuid::Uuid::new_v4());
            let ids = self.ids(part);
            let first_attempt = self.server_now();
            loop {
                let sent = match self.cluster {
                    false => {
                        let when = (deadline, first_attempt);
                        self.publish_part(part, &ids, &marker, when, retry_for)
                            .await
                    }
                    true => self.publish_counted(part).await,
                };
                match sent {
                    Ok(PartSent::Published {
                        bridge,
                        stored,
                        dead,
                        refused,
                    }) => {
                        if bridge == 0 {
                            outcome.no_subscriber += part.len() as u64;
                            missed.extend_from_slice(part);
                        }
                        outcome.stored_directly += stored;
                        outcome.dead_lettered += dead;
                        outcome.refused += refused;
                        break;
                    }
                    Ok(PartSent::Missed(these)) => {
                        outcome.no_subscriber += these.len() as u64;
                        missed.extend(these.into_iter().map(|i| part[i]));
                        break;
                    }
                    Ok(PartSent::TooLate) => {
                        return Err(RedisError::from((
                            ErrorKind::Client,
                            "batch not confirmed",
                            "its --retry-for passed: given up".to_string(),
                        )));
                    }
                    Ok(PartSent::Unconfirmed) => {
                        return Err(RedisError::from((
                            ErrorKind::Client,
                            "batch not confirmed",
                            "it ran once, and no bridge worker has subscribed since to take it again (within DEDUP_WINDOW less a second): perhaps lost".to_string(),
                        )));
                    }
                    Err(err) if has_code(&err, |code| code == "NOBRIDGE") => {
                        retry.until_bridge(err).await?
                    }
                    Err(err) => {
                        retry
                            .after(err, "batch not confirmed; sending it again")
                            .await?
                    }
                }
            }
        }
        let resent = retry.resent;
        // On a cluster the fast path writes with ACK keys; on one server the
        // script wrote to the first stream, and the others (several routes
        // read the channel) are written here.
        if self.fast_path && !missed.is_empty() {
            let first = if self.cluster { 0 } else { 1 };
            for target in first..self.targets.len() {
                let pending = self.pending(&missed, target, false);
                let (written, refused) = self
                    .write_confirmed(
                        &pending,
                        &mut retry,
                        "fast-path write not confirmed; writing again",
                    )
                    .await?;
                outcome.refused += refused;
                if target == 0 {
                    outcome.stored_directly += written;
                }
            }
        }
        if !oversized.is_empty() && !self.targets.is_empty() {
            let pending = self.pending(&oversized, 0, true);
            let (written, refused) = self
                .write_confirmed(
                    &pending,
                    &mut retry,
                    "dead-letter write not confirmed; writing again",
                )
                .await?;
            outcome.dead_lettered += written;
            outcome.refused += refused;
        }
        Ok((outcome, resent))
    }

    /// Each payload's id for the fast path: its MESSAGE_ID_FIELD, or one of
    /// its own for a payload without (nobody else saw it), fixed for every
    /// attempt.
    fn ids(&self, payloads: &[&Vec<u8>]) -> Vec<String> {
        payloads
            .iter()
            .map(|payload| {
                json_id(payload, &self.id_field)
                    .unwrap_or_else(|| format!("p:{}", uuid::Uuid::new_v4()))
            })
            .collect()
    }

    /// One part of a batch on one server, through `publish.lua`.
    async fn publish_part(
        &mut self,
        part: &[&Vec<u8>],
        ids: &[String],
        marker: &str,
        (deadline, first_attempt): (u64, u64),
        retry_for: Duration,
    ) -> Result<PartSent, RedisError> {
        let command = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
        let (stream, dead, trim) = match self.targets.first() {
            Some(lane) => (lane.stream(), lane.to.dead_stream.as_str(), lane.trim),
            None => ("", "", None),
        };
        let mut cmd = scripts::evalsha(scripts::PUBLISH, &[marker, stream, dead]);
        let (kind, op, limit) = Trim::args(trim);
        cmd.arg(self.probe.as_deref().unwrap_or(""))
            .arg(command)
            .arg(&self.channel)
            .arg((retry_for + MARKER_MARGIN).as_millis() as u64)
            .arg(deadline)
            .arg(u8::from(self.fast_path && !self.targets.is_empty()))
            .arg(&self.consumer)
            .arg(kind)
            .arg(op)
            .arg(limit)
            .arg(self.republish_within.as_millis() as u64);
        let mut packed = Vec::with_capacity(ids.iter().map(|id| id.len() + 4).sum());
        for id in ids {
            packed.extend_from_slice(id.len().to_string().as_bytes());
            packed.push(b':');
            packed.extend_from_slice(id.as_bytes());
        }
        // With MIN_REPLICAS_ACKED, the part's first attempt: sent again on
        // a new primary (no marker there), it is published again only
        // within DEDUP_WINDOW less a second of it. Otherwise the marker's
        // own first run dates it.
        let first = match self.min_replicas {
            0 => String::new(),
            _ => first_attempt.to_string(),
        };
        cmd.arg(packed).arg(first);
        for payload in part {
            cmd.arg(payload.as_slice());
        }
        let reply: Vec<i64> = match self.min_replicas {
            0 => scripts::run(&mut self.conn, cmd).await?,
            wanted => {
                // On the same connection, right after: how many replicas
                // hold what the script did (a failover loses what they do
                // not: sent again, on the new primary). A connection of the
                // part's own, so that a WAIT holds up no other part.
                let mut pipe = redis::pipe();
                pipe.add_command(cmd)
                    .cmd("WAIT")
                    .arg(wanted)
                    .arg(WAIT_FOR_REPLICAS.as_millis() as u64);
                let mut conn = self.waiting.take().await?;
                let answer = scripts::query::<(Vec<i64>, usize), _>(&mut conn, &pipe).await;
                self.waiting.give_back(conn);
                let (reply, replicas) = answer?;
                if replicas < wanted && reply.len() == 4 {
                    return Err(RedisError::from((
                        ErrorKind::Io,
                        "batch not held by enough replicas",
                        format!(
                            "{replicas} of the {wanted} MIN_REPLICAS_ACKED asks for hold it within {} s",
                            WAIT_FOR_REPLICAS.as_secs()
                        ),
                    )));
                }
                reply
            }
        };
        Ok(match reply.as_slice() {
            [bridge, stored, dead, refused] => PartSent::Published {
                bridge: *bridge as u64,
                stored: *stored as u64,
                dead: *dead as u64,
                refused: *refused as u64,
            },
            [-2] => PartSent::Unconfirmed,
            _ => PartSent::TooLate,
        })
    }

    /// One part of a batch on a cluster: pipelined PUBLISHes, each one's
    /// count telling whether it reached anyone.
    async fn publish_counted(&mut self, part: &[&Vec<u8>]) -> Result<PartSent, RedisError> {
        let receivers: Vec<u64> = match (self.sharded, &self.probe) {
            // Sharded: the bridge's own subscriptions counted, in the same
            // step (its probe shares the channel's slot).
            (true, Some(probe)) => {
                let mut cmd = scripts::evalsha(scripts::PUBLISH_SHARDED, &[&self.channel]);
                cmd.arg(probe);
                for payload in part {
                    cmd.arg(payload.as_slice());
                }
                scripts::run(&mut self.conn, cmd).await?
            }
            _ => {
                let command = if self.sharded { "SPUBLISH" } else { "PUBLISH" };
                let mut pipe = redis::pipe();
                for payload in part {
                    pipe.cmd(command).arg(&self.channel).arg(payload.as_slice());
                }
                pipe.query_async(&mut self.conn).await?
            }
        };
        Ok(PartSent::Missed(
            receivers
                .iter()
                .enumerate()
                .filter(|(_, r)| **r == 0)
                .map(|(i, _)| i)
                .collect(),
        ))
    }

    /// The messages the fast path writes to target `target` (or,
    /// `oversized`, dead-letters), each with its id.
    fn pending(&self, payloads: &[&Vec<u8>], target: usize, oversized: bool) -> Vec<Message> {
        let max = self.max_payload_bytes;
        let lane = self.targets[target].clone();
        payloads
            .iter()
            .zip(self.ids(payloads))
            .map(|(payload, id)| Message {
                rejected: oversized.then(|| {
                    format!(
                        "payload of {} bytes is larger than MAX_PAYLOAD_BYTES ({max}): not published",
                        payload.len()
                    )
                }),
                ..Message::with_id(id, payload.to_vec(), lane.clone())
            })
            .collect()
    }

    /// Writes messages with ACK keys, each exactly once by its id; one the
    /// stream refuses goes to the dead-letter stream with Redis's reason.
    /// Returns how many this call wrote, and how many neither stream took.
    /// [`Self::write`] again until Redis confirms it (and, with
    /// MIN_REPLICAS_ACKED, until replicas hold it), within `retry`'s
    /// deadline (`what` says what is retried). A message written by an
    /// attempt counts once, whatever the later ones find.
    async fn write_confirmed(
        &mut self,
        pending: &[Message],
        retry: &mut Retry<'_>,
        what: &str,
    ) -> Result<(u64, u64), RedisError> {
        let mut written: std::collections::HashSet<String> = Default::default();
        loop {
            match self.write(pending).await {
                Ok(done) => {
                    written.extend(done.written.iter().cloned());
                    match self.held_by_replicas(&done.held).await {
                        Ok(()) => return Ok((written.len() as u64, done.refused)),
                        Err(err) => retry.after(err, what).await?,
                    }
                }
                Err(err) => retry.after(err, what).await?,
            }
        }
    }

    /// With MIN_REPLICAS_ACKED, whether enough replicas hold `held` (the
    /// messages in a stream or its dead-letter stream, by their ACK keys):
    /// per stream, one request to the stream's server (on a cluster, its
    /// slot's master) that renews each message's ACK key (a write, which a
    /// replica copies after the entry) and then WAITs. An ACK key gone
    /// means a failover took the write back; too few replicas, that one
    /// may. Either is an error: the caller writes again (each message once
    /// by its ACK key, so nothing twice) and asks again, within its
    /// deadline.
    async fn held_by_replicas(&mut self, held: &[Message]) -> Result<(), RedisError> {
        let wanted = self.min_replicas;
        if wanted == 0 || held.is_empty() {
            return Ok(());
        }
        let mut streams: Vec<&str> = Vec::new();
        for msg in held {
            if !streams.contains(&msg.lane.stream()) {
                streams.push(msg.lane.stream());
            }
        }
        for stream in streams {
            let mut pipe = redis::pipe();
            let mine = held.iter().filter(|m| m.lane.stream() == stream);
            for msg in mine {
                pipe.cmd("PEXPIRE")
                    .arg(msg.lane.keys.ack(&msg.id))
                    .arg(self.ack_ttl.as_millis() as u64);
            }
            pipe.cmd("WAIT")
                .arg(wanted)
                .arg(WAIT_FOR_REPLICAS.as_millis() as u64);
            let mut replies: Vec<u64> = self.conn.query_at(stream, &pipe).await?;
            let replicas = replies.pop().unwrap_or(0) as usize;
            let gone = replies.iter().filter(|&&renewed| renewed == 0).count();
            if gone > 0 {
                return Err(RedisError::from((
                    ErrorKind::Io,
                    "fast-path write taken back",
                    format!("{gone} written to {stream} are gone (a failover)"),
                )));
            }
            if replicas < wanted {
                return Err(RedisError::from((
                    ErrorKind::Io,
                    "fast-path write not held by enough replicas",
                    format!(
                        "{replicas} of the {wanted} MIN_REPLICAS_ACKED asks for hold {stream} within {} s",
                        WAIT_FOR_REPLICAS.as_secs()
                    ),
                )));
            }
        }
        Ok(())
    }

    async fn write(&mut self, pending: &[Message]) -> Result<Written, RedisError> {
        let mut done = Written::default();
        let mut messages: Vec<Message> = pending.to_vec();
        while !messages.is_empty() {
            let refs: Vec<&Message> = messages.iter().collect();
            let results = self.racer.write_acked(&refs).await?;
            let mut again = Vec::new();
            for (msg, result) in messages.iter().zip(results) {
                match result {
                    Write::Written => {
                        done.written.push(msg.id.clone());
                        done.held.push(msg.clone());
                    }
                    Write::Acked => done.held.push(msg.clone()),
                    Write::Refused(why) if msg.rejected.is_none() => again.push(Message {
                        rejected: Some(format!("the stream refused it: {why}")),
                        ..msg.clone()
                    }),
                    Write::Refused(why) => {
                        done.refused += 1;
                        tracing::error!(message_id = %msg.id, reason = %why, "neither the stream nor the dead-letter stream took the message");
                    }
                    Write::NotTried(why) => {
                        return Err(RedisError::from((
                            ErrorKind::Client,
                            "Redis did not take the write for now",
                            why,
                        )));
                    }
                    Write::Reused | Write::LockLost | Write::TooOld => {}
                }
            }
            messages = again;
        }
        Ok(done)
    }
}

/// What one [`Publisher::write`] did.
#[derive(Default)]
struct Written {
    /// The ids this call wrote.
    written: Vec<String>,
    /// The messages in a stream now (written by this call or before), by
    /// their ACK keys.
    held: Vec<Message>,
    /// Messages neither stream took.
    refused: u64,
}

/// What sending one part of a batch did.
enum PartSent {
    /// One server: published; `bridge` subscriptions got it; what the fast
    /// path wrote, dead-lettered (the stream refused it) or could not write.
    Published {
        bridge: u64,
        stored: u64,
        dead: u64,
        refused: u64,
    },
    /// A cluster: published; these (their places in the part) reached nobody.
    Missed(Vec<usize>),
    /// Refused: it came after its deadline.
    TooLate,
    /// It ran once, and no bridge worker has been subscribed since to take
    /// it again: perhaps lost.
    Unconfirmed,
}

/// A batch cut in parts of at most [`MAX_SCRIPT_BYTES`] (at least one
/// payload each).
fn parts<'a, 'p>(payloads: &'a [&'p Vec<u8>]) -> Vec<&'a [&'p Vec<u8>]> {
    let mut parts = Vec::new();
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
        let (part, after) = rest.split_at(n);
        parts.push(part);
        rest = after;
    }
    parts
}

/// The retries of one batch: backing off between attempts, for at most
/// `retry_for` in all (and not past a shutdown).
struct Retry<'a> {
    give_up: Instant,
    backoff: Backoff,
    shutdown: &'a CancellationToken,
    size: usize,
    /// Messages published again so far.
    resent: u64,
    /// Whether it has said that it waits for a bridge worker.
    waited_for_bridge: bool,
}

/// How often a batch waiting for a bridge worker to subscribe again asks.
const BRIDGE_POLL: Duration = Duration::from_millis(100);

impl<'a> Retry<'a> {
    fn new(retry_for: Duration, shutdown: &'a CancellationToken, size: usize) -> Self {
        Self {
            give_up: Instant::now() + retry_for,
            backoff: Backoff::until(Instant::now() + retry_for),
            shutdown,
            size,
            resent: 0,
            waited_for_bridge: false,
        }
    }

    /// The batch ran once and is to be published again, but no bridge
    /// worker is subscribed (they are reconnecting, as the publisher was):
    /// tries again in [`BRIDGE_POLL`], without backing off further, while
    /// there is time; said once.
    async fn until_bridge(&mut self, err: RedisError) -> Result<(), RedisError> {
        if Instant::now() + BRIDGE_POLL > self.give_up || self.shutdown.is_cancelled() {
            return Err(err);
        }
        if !self.waited_for_bridge {
            self.waited_for_bridge = true;
            tracing::warn!(
                messages = self.size,
                "batch not confirmed and no bridge worker subscribed to take it again: waiting for one"
            );
        }
        tokio::time::sleep(BRIDGE_POLL).await;
        Ok(())
    }

    /// After a failed attempt: `Err` when it is not to be retried (fatal,
    /// out of time, shutting down), else waits its turn.
    async fn after(&mut self, err: RedisError, what: &str) -> Result<(), RedisError> {
        if self.shutdown.is_cancelled() {
            return Err(err);
        }
        let size = self.size;
        self.backoff
            .after(err, Some(self.shutdown), |err, wait| {
                tracing::warn!(cause = %crate::connect::brief(err), retry_in_ms = wait.as_millis() as u64, messages = size, "{what}");
            })
            .await?;
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
        if shutdown.is_cancelled() {
            break;
        }
        let n = match next_batch(config, start, seq) {
            NextBatch::Done => break,
            NextBatch::At(next) => {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(next.into()) => continue,
                }
            }
            NextBatch::Now(n) => n,
        };
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
            // What Redis has answered counts now, not when the window of
            // batches on their way is next full.
            while let Some(joined) = sending.try_join_next() {
                if let Err(err) = account(&mut summary, join(Some(joined))) {
                    failure = Some(err);
                    break;
                }
            }
            progress(&summary, last_progress, seq);
            last_progress = (Instant::now(), summary.published);
            if failure.is_some() {
                break;
            }
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

/// When the next batch goes, and its size.
enum NextBatch {
    /// The run is over (its count sent, or its time up).
    Done,
    /// Not before this (the pace's rate).
    At(Instant),
    /// Now, this many messages.
    Now(u64),
}

/// The next batch of a run that started at `start` and has sent `seq`
/// messages.
fn next_batch(config: &PublishConfig, start: Instant, seq: u64) -> NextBatch {
    let elapsed = start.elapsed();
    let remaining = match config.limit {
        PublishLimit::Count(n) => n - seq,
        PublishLimit::Duration(d) if elapsed >= d => 0,
        PublishLimit::Duration(_) => u64::MAX,
    };
    if remaining == 0 {
        return NextBatch::Done;
    }
    let n = remaining.min(config.batch_size as u64);
    match config.pace {
        Pace::Rate(rate) if rate.is_finite() => {
            let owed = ((elapsed.as_secs_f64() * rate) as u64 + 1).saturating_sub(seq);
            if owed == 0 {
                return NextBatch::At(start + Duration::from_secs_f64((seq + 1) as f64 / rate));
            }
            NextBatch::Now(n.min(owed))
        }
        _ => NextBatch::Now(n),
    }
}

/// The progress line (PROGRESS_INTERVAL), with the rate since `last`
/// (when, and how many were published then): `sent` is what Redis
/// confirmed, `in_flight` what is on its way (of the `made` so far).
fn progress(summary: &PublishSummary, last: (Instant, u64), made: u64) {
    let dt = last.0.elapsed().as_secs_f64();
    crate::monitor::print_line(format_args!(
        "publish sent={} in_flight={} no_subscriber={} stored_directly={} dead_lettered={} failed={} rate={:.0}/s run={}",
        summary.published,
        made.saturating_sub(summary.published + summary.failed),
        summary.no_subscriber,
        summary.stored_directly,
        summary.dead_lettered,
        summary.failed,
        (summary.published - last.1) as f64 / dt,
        summary.run,
    ));
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
