//! A worker's subscription on a Redis Cluster (the race strategy's, the one
//! a cluster runs): its own task and connection through the redis crate's
//! cluster client, reading the channels and handing each message (with its
//! id) to the worker through a bounded queue, so a slow write path never
//! stops the connection from being read.
//!
//! - **Memory**: what waits between the connection and the worker is
//!   charged to the process's budget (MEMORY_LIMIT), by its bytes. Every
//!   worker has its own subscription, so each holds its own copy of every
//!   message: one of them, the process's *keeper*, may fill the whole
//!   budget, the others together only a quarter of it (so the keeper always
//!   has three quarters). When a burst outruns the writes, the others drop
//!   their copies first (counted as `overflow`; the keeper still has them),
//!   and the keeper only once the budget is spent.
//! - **Silence**: after [`KEEPALIVE`] without traffic it PINGs; no answer
//!   within [`PING_TIMEOUT`] counts as a lost connection.
//! - **Subscriptions**: the cluster client subscribes on the node that
//!   serves each channel's slot (SUBSCRIBE, or SSUBSCRIBE with sharded
//!   Pub/Sub). When a subscription is lost (a node's connection dropped, or
//!   the server's SUNSUBSCRIBE after a slot move, which the client does not
//!   follow) the task subscribes again itself, with backoff, the client
//!   following MOVED to the new node. Each loss counts as a reconnect, and
//!   the time until the new subscription is confirmed as a gap.
//! - **Ids**: messages have no positions here; a payload without an id gets
//!   a derived one (see [`super::ids::DerivedIds`]).
//! - **A stopped process** (SIGSTOP, a frozen VM): what waited for it in the
//!   server's buffer comes out when it resumes, looking fresh, and could be
//!   older than its ACK. The [`PauseWatch`] notices the pause before such a
//!   message is handed on: the subscription drops the connection with
//!   everything it held (a gap: the other workers had them) and subscribes
//!   again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::{ProtocolVersion, PushInfo, PushKind, RedisError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::budget::{Budget, Charge, MESSAGE_OVERHEAD};
use super::ids::Identify;
use super::reader::Coverage;
use super::resubscribe::{Ended, Link, Subscriber, keep_subscribed};
use super::{Lane, Message, is_internal_channel};
use crate::bridge::route::Router;
use crate::connect::Endpoint;
use crate::monitor::Counters;

pub use super::reader::{KEEPALIVE, PING_TIMEOUT};
/// Cluster: the first wait before subscribing again after a lost subscription.
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(100);

/// A thread that beats every [`PauseWatch::BEAT`]: a beat that comes more
/// than [`PauseWatch::PAUSED_AFTER`] after the one before means the process
/// did not run meanwhile (it was stopped), and counts a pause.
pub struct PauseWatch {
    started: Instant,
    /// Ms after `started` of the last beat.
    last_beat: AtomicU64,
    pauses: AtomicU64,
}

impl PauseWatch {
    const BEAT: Duration = Duration::from_millis(100);
    const PAUSED_AFTER: Duration = Duration::from_secs(1);

    /// The process's watch (its thread starts with the first call).
    pub fn get() -> &'static PauseWatch {
        static WATCH: OnceLock<&'static PauseWatch> = OnceLock::new();
        WATCH.get_or_init(|| {
            let watch: &'static PauseWatch = Box::leak(Box::new(PauseWatch {
                started: Instant::now(),
                last_beat: AtomicU64::new(0),
                pauses: AtomicU64::new(0),
            }));
            std::thread::Builder::new()
                .name("optimus-pause-watch".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Self::BEAT);
                        let now = watch.now_ms();
                        if now.saturating_sub(watch.last_beat.load(Ordering::Acquire))
                            > Self::PAUSED_AFTER.as_millis() as u64
                        {
                            // Before the beat: whoever sees the beat sees the pause.
                            watch.pauses.fetch_add(1, Ordering::Release);
                        }
                        watch.last_beat.store(now, Ordering::Release);
                    }
                })
                .expect("a thread for the pause watch");
            watch
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The pauses counted so far; `None` while one may be under way
    /// unnoticed (the last beat is too old).
    pub fn pauses(&self) -> Option<u64> {
        let beat = self.last_beat.load(Ordering::Acquire);
        if self.now_ms().saturating_sub(beat) > Self::PAUSED_AFTER.as_millis() as u64 {
            return None;
        }
        Some(self.pauses.load(Ordering::Acquire))
    }
}

/// Everything the subscription task needs.
pub struct Subscription {
    pub endpoint: Endpoint,
    /// The channels and patterns to read, and where their messages go.
    pub router: Arc<Router>,
    /// The routes, as logs name them.
    pub channel: String,
    /// Pattern routes' lanes by channel (see [`LANE_CACHE`]).
    pub lanes: HashMap<Vec<u8>, Arc<Lane>>,
    pub worker_id: String,
    pub ids: Identify,
    pub counters: Arc<Counters>,
    pub coverage: Arc<Coverage>,
    /// Where received messages go; the worker reads the other end.
    pub queue: mpsc::Sender<Vec<Message>>,
    /// The process's memory for messages: what waits between the
    /// connection and this task is charged to it.
    pub budget: Arc<Budget>,
    /// Which of the process's subscriptions may fill the whole budget.
    pub keeper: Keeper,
    pub cancel: CancellationToken,
}

/// Pattern routes' lanes by channel, so that a busy channel's lane is made
/// once, not per message. Cleared when it grows past this: channels under a
/// pattern can be many and short-lived, and a quiet one must leave nothing
/// behind.
const LANE_CACHE: usize = 1_024;

/// What the client library's reader hands over.
pub(super) enum Pushed {
    /// A message by route `route`, on `channel`.
    Message {
        route: usize,
        channel: Vec<u8>,
        payload: Vec<u8>,
        /// When it came off the connection (its age counts from then).
        arrived: Instant,
        /// Its bytes in the process's budget, until it is written.
        charge: Charge,
    },
    /// The server ended the subscription to the input channel (its slot
    /// moved) or a node's connection dropped; the client subscribes again
    /// by itself.
    Lost,
    /// The subscription to the input channel is confirmed (again).
    Confirmed,
}

/// A cluster connection whose (S)SUBSCRIBE is `sharded`.
pub(super) struct SubConn {
    conn: redis::cluster_async::ClusterConnection,
    sharded: bool,
}

impl SubConn {
    /// One channel at a time: each on the node that serves its slot, where
    /// that node's PUBLISH counts it.
    async fn subscribe(
        &mut self,
        channels: Vec<&str>,
        patterns: Vec<&str>,
    ) -> Result<(), RedisError> {
        for channel in channels {
            match self.sharded {
                true => self.conn.ssubscribe(channel).await?,
                false => self.conn.subscribe(channel).await?,
            }
        }
        if patterns.is_empty() {
            return Ok(());
        }
        self.conn.psubscribe(patterns).await
    }

    async fn unsubscribe(
        &mut self,
        channels: Vec<&str>,
        patterns: Vec<&str>,
    ) -> Result<(), RedisError> {
        if !patterns.is_empty() {
            self.conn.punsubscribe(patterns).await?;
        }
        for channel in channels {
            match self.sharded {
                true => self.conn.sunsubscribe(channel).await?,
                false => self.conn.unsubscribe(channel).await?,
            }
        }
        Ok(())
    }
}

impl Subscriber for Subscription {
    type Session = (SubConn, mpsc::UnboundedReceiver<Pushed>);

    fn who(&self) -> String {
        format!("worker {} on {}", self.worker_id, self.channel)
    }

    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }

    async fn subscribe(&self) -> Result<Self::Session, RedisError> {
        self.subscribe_all().await
    }

    /// Reads until the connection ends; the cluster client subscribes again
    /// by itself after a slot moves (and this task does when it does not).
    async fn read(&mut self, session: Self::Session, link: &mut Link<'_>) -> Ended {
        let ended = self.read_session(session, link).await;
        // Ended, so not receiving: another subscription keeps what comes.
        self.keeper.release();
        ended
    }
}

impl Subscription {
    /// [`Subscriber::read`]: reads one session until it ends.
    async fn read_session(
        &mut self,
        session: (SubConn, mpsc::UnboundedReceiver<Pushed>),
        link: &mut Link<'_>,
    ) -> Ended {
        let (mut conn, mut pushed) = session;
        let mut last_heard = Instant::now();
        let watch = PauseWatch::get();
        let pauses = watch.pauses();
        // One timer, moved on only when it fires: no timer per message.
        let keepalive = tokio::time::sleep(KEEPALIVE);
        tokio::pin!(keepalive);
        // After a lost subscription, subscribing again ourselves (a
        // server's SUNSUBSCRIBE after a slot move is not followed by the
        // client), every `retry_wait`, doubling, until it takes.
        let mut retry_wait: Option<Duration> = None;
        let retry = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(retry);
        loop {
            let event = tokio::select! {
                _ = self.cancel.cancelled() => {
                    // Stopping: another subscription keeps what comes next.
                    self.keeper.release();
                    self.unsubscribe_and_drain(&mut conn, &mut pushed).await;
                    return Ended::Stopped;
                }
                event = pushed.recv() => event,
                _ = &mut retry, if retry_wait.is_some() => {
                    let subscribe = conn.subscribe(self.router.channels(), self.router.patterns());
                    match tokio::time::timeout(PING_TIMEOUT, subscribe).await {
                        // Its confirmation ends the gap (`Confirmed`).
                        Ok(Ok(())) => retry_wait = None,
                        failed => {
                            let wait = retry_wait.unwrap_or(RESUBSCRIBE_FIRST);
                            tracing::debug!(worker = %self.worker_id, ?failed, "subscribing again failed; retrying");
                            let next = (wait * 2).min(KEEPALIVE);
                            retry_wait = Some(next);
                            retry.as_mut().reset((Instant::now() + next).into());
                        }
                    }
                    continue;
                }
                _ = &mut keepalive => {
                    if last_heard.elapsed() < KEEPALIVE {
                        keepalive.as_mut().reset((last_heard + KEEPALIVE).into());
                        continue;
                    }
                    let ping = redis::cmd("PING");
                    match tokio::time::timeout(PING_TIMEOUT, ping.query_async::<()>(&mut conn.conn)).await {
                        Ok(Ok(())) => {
                            last_heard = Instant::now();
                            keepalive.as_mut().reset((last_heard + KEEPALIVE).into());
                            continue;
                        }
                        _ => None,
                    }
                }
            };
            let message = match event {
                Some(Pushed::Message {
                    route,
                    channel,
                    payload,
                    arrived,
                    charge,
                }) => self.receive(route, channel, payload, arrived, charge),
                Some(Pushed::Lost) => {
                    // Not receiving: another subscription keeps what comes
                    // meanwhile (this one claims again with its next message).
                    self.keeper.release();
                    link.lost(&"the cluster ended the subscription (its slot moved, or a node's connection dropped)");
                    if retry_wait.is_none() {
                        retry_wait = Some(RESUBSCRIBE_FIRST);
                        retry
                            .as_mut()
                            .reset((Instant::now() + RESUBSCRIBE_FIRST).into());
                    }
                    continue;
                }
                Some(Pushed::Confirmed) => {
                    link.up();
                    last_heard = Instant::now();
                    continue;
                }
                None => return Ended::Lost("the connection ended".into()),
            };
            last_heard = Instant::now();
            if pauses.is_none() || watch.pauses() != pauses {
                return Ended::Lost("this process was stopped for a while: what its subscription held may be older than its ACKs; dropped (the other workers had it)".into());
            }
            if self.queue.send(vec![message]).await.is_err() {
                return Ended::Stopped; // the worker is gone
            }
        }
    }
}

impl Subscription {
    /// Reads until cancelled. Returns an error only when reconnecting cannot
    /// help (credentials, permissions). Dropping the queue's sender on return
    /// tells the worker that nothing more is coming.
    pub async fn run(self) -> Result<(), RedisError> {
        let (coverage, counters) = (self.coverage.clone(), self.counters.clone());
        keep_subscribed(self, &coverage, &counters).await
    }

    /// The message with its lane and id (it was counted as it came off the
    /// connection).
    fn receive(
        &mut self,
        route: usize,
        channel: Vec<u8>,
        payload: Vec<u8>,
        arrived: Instant,
        charge: Charge,
    ) -> Message {
        let lane = match self.router.fixed(route) {
            Some(lane) => lane,
            None => {
                if self.lanes.len() >= LANE_CACHE {
                    self.lanes = HashMap::new();
                }
                let router = &self.router;
                self.lanes
                    .entry(channel.clone())
                    .or_insert_with_key(|channel| {
                        router.lane(route, &String::from_utf8_lossy(channel))
                    })
                    .clone()
            }
        };
        let mut m = Message::arrived(Bytes::from(payload), Bytes::from(channel), lane, arrived);
        // Charged until it is written (or dropped), not only while it waits here.
        m.charge = Some(Arc::new(charge));
        self.ids.identify(&mut m);
        m
    }

    /// Stops reading without losing what the server already sent: once
    /// UNSUBSCRIBE is confirmed, every message published before it has been
    /// read off the connection (replies come in order), and goes to the worker.
    async fn unsubscribe_and_drain(
        &mut self,
        conn: &mut SubConn,
        pushed: &mut mpsc::UnboundedReceiver<Pushed>,
    ) {
        let unsubscribe = conn.unsubscribe(self.router.channels(), self.router.patterns());
        match tokio::time::timeout(PING_TIMEOUT, unsubscribe).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(worker = %self.worker_id, cause = %crate::connect::brief(&err), "UNSUBSCRIBE failed; handing over what has arrived")
            }
            Err(_) => {
                tracing::warn!(worker = %self.worker_id, "UNSUBSCRIBE not confirmed in time; handing over what has arrived")
            }
        }
        while let Ok(event) = pushed.try_recv() {
            let Pushed::Message {
                route,
                channel,
                payload,
                arrived,
                charge,
            } = event
            else {
                continue;
            };
            let message = self.receive(route, channel, payload, arrived, charge);
            if self.queue.send(vec![message]).await.is_err() {
                return;
            }
        }
    }

    /// A RESP3 cluster connection subscribed to the channels, and the buffer
    /// its pushed messages go to (within this subscription's share of the
    /// budget; beyond it they are dropped and counted). Each attempt has a buffer of its own, so nothing from an
    /// attempt that failed half-way reaches the worker.
    async fn subscribe_all(
        &self,
    ) -> Result<(SubConn, mpsc::UnboundedReceiver<Pushed>), RedisError> {
        let (pushed, receiver) = mpsc::unbounded_channel();
        let counters = self.counters.clone();
        let budget = self.budget.clone();
        let keeper = self.keeper.clone();
        let worker = self.worker_id.clone();
        let started = Instant::now();
        // Milliseconds after `started` before which no overflow warning is
        // logged again: at most one a second.
        let next_warning = AtomicU64::new(0);
        // The subscription whose loss and return stand for all of them.
        let watched = self
            .router
            .channels()
            .first()
            .or(self.router.patterns().first())
            .map(|name| name.as_bytes().to_vec())
            .unwrap_or_default();
        let router = self.router.clone();
        let sources: Vec<Vec<u8>> = self
            .router
            .channels()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        let on_push = move |info: PushInfo| -> Result<(), ()> {
            let is_watched =
                matches!(info.data.first(), Some(redis::Value::BulkString(c)) if *c == watched);
            // Control pushes are handed over without a bound (the end of a
            // connection must not be lost); messages within the budget.
            let control = match info.kind {
                PushKind::SUnsubscribe | PushKind::Unsubscribe | PushKind::PUnsubscribe
                    if is_watched =>
                {
                    Some(Pushed::Lost)
                }
                PushKind::SSubscribe | PushKind::Subscribe | PushKind::PSubscribe if is_watched => {
                    Some(Pushed::Confirmed)
                }
                PushKind::Disconnection => Some(Pushed::Lost),
                _ => None,
            };
            if let Some(control) = control {
                let _ = pushed.send(control);
                return Ok(());
            }
            let mut data = info.data.into_iter().map(|v| match v {
                redis::Value::BulkString(bytes) => Some(bytes),
                _ => None,
            });
            let mut next = || data.next().flatten();
            let (route, channel, payload) = match info.kind {
                PushKind::PMessage => {
                    let (Some(pattern), Some(channel), Some(payload)) = (next(), next(), next())
                    else {
                        return Ok(());
                    };
                    let Some(route) = router.for_pattern(&pattern) else {
                        return Ok(());
                    };
                    (route, channel, payload)
                }
                PushKind::Message | PushKind::SMessage => {
                    let (Some(channel), Some(payload)) = (next(), next()) else {
                        return Ok(());
                    };
                    if !sources.contains(&channel) {
                        return Ok(());
                    }
                    let Some(route) = router.for_channel(&channel) else {
                        return Ok(());
                    };
                    (route, channel, payload)
                }
                _ => return Ok(()),
            };
            // Subscriptions live on several nodes here, so copies of one
            // PUBLISH through several routes can interleave with others':
            // only optimus's own channels are left out (see docs/cluster-and-tls.md).
            if is_internal_channel(&channel) {
                return Ok(());
            }
            // The keeper may fill the budget; the others stop at a quarter.
            let keeps = keeper.claim();
            let up_to = match keeps {
                true => budget.limit(),
                false => budget.limit() / 4,
            };
            let cost = payload.len() + channel.len() + MESSAGE_OVERHEAD;
            let Some(charge) = budget.try_charge(cost, up_to) else {
                overflowed(&counters, &next_warning, started, &worker, keeps);
                return Ok(());
            };
            // A receiver gone means this connection was given up: nothing
            // here received it.
            let _ = pushed.send(Pushed::Message {
                route,
                channel,
                payload,
                arrived: Instant::now(),
                charge,
            });
            Ok(())
        };
        let conn = self
            .endpoint
            .connect_cluster(
                self.endpoint
                    .cluster_builder()?
                    .use_protocol(ProtocolVersion::RESP3)
                    .push_sender(on_push),
            )
            .await?;
        let mut conn = SubConn {
            conn,
            sharded: self.endpoint.is_sharded(),
        };
        conn.subscribe(self.router.channels(), self.router.patterns())
            .await?;
        Ok((conn, receiver))
    }
}

/// A message this worker received and drops, its share of the budget spent:
/// counted as `overflow`, and said (at most once a second; a warning when
/// the keeper drops it, the process's last copy).
fn overflowed(
    counters: &Counters,
    next_warning: &AtomicU64,
    started: Instant,
    worker: &str,
    keeper: bool,
) {
    Counters::add(&counters.received, 1);
    Counters::add(&counters.overflow, 1);
    let now = started.elapsed().as_millis() as u64;
    let next = next_warning.load(Ordering::Relaxed);
    if now >= next
        && next_warning
            .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let overflow = counters.overflow.load(Ordering::Relaxed);
        match keeper {
            true => {
                tracing::warn!(worker = %worker, overflow, "memory budget spent (MEMORY_LIMIT): dropping new messages, the process's last copies (see overflow)")
            }
            false => {
                tracing::info!(worker = %worker, overflow, "a quarter of the memory budget spent (MEMORY_LIMIT): dropping this worker's copies of new messages; the process's keeper still holds them")
            }
        }
    }
}

/// Which one of a process's subscriptions is its keeper: the first to ask
/// while there is none. A subscription's seat is given up when it ends.
#[derive(Debug, Clone)]
pub struct Keeper {
    seat: Arc<Seat>,
}

#[derive(Debug)]
struct Seat {
    number: u64,
    held_by: Arc<AtomicU64>,
}

impl Drop for Seat {
    fn drop(&mut self) {
        let _ = self
            .held_by
            .compare_exchange(self.number, 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl Keeper {
    /// The process's seats: one [`Keeper::seat`] per subscription.
    pub fn seats() -> Arc<AtomicU64> {
        Arc::new(AtomicU64::new(0))
    }

    /// A new subscription's seat among `held_by`'s.
    pub fn seat(held_by: &Arc<AtomicU64>) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let number = NEXT.fetch_add(1, Ordering::Relaxed);
        Keeper {
            seat: Arc::new(Seat {
                number,
                held_by: held_by.clone(),
            }),
        }
    }

    /// Gives the keeper's seat up, if this subscription holds it: it is not
    /// receiving (stopping, or its subscription lost).
    fn release(&self) {
        let me = self.seat.number;
        let _ = self
            .seat
            .held_by
            .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether this subscription is the keeper, becoming it if there is none.
    fn claim(&self) -> bool {
        let (me, held_by) = (self.seat.number, &self.seat.held_by);
        match held_by.load(Ordering::Acquire) {
            held if held == me => true,
            0 => held_by
                .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
                .map_or_else(|held| held == me, |_| true),
            _ => false,
        }
    }
}
