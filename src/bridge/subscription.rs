//! A worker's subscription: its own task, its own connection, reading the
//! channel and handing each message (with its id) to the worker through a
//! bounded queue, so a slow write path never stops the socket from being read
//! (Redis would cut a subscriber off at its pub/sub output-buffer limit).
//!
//! The connection speaks RESP3, and the client library hands every pushed
//! message to a callback of ours as it reads it off the socket: the callback
//! puts it in a bounded buffer, or, when that is full, drops it and counts it.
//! Nothing else buffers messages, so memory stays bounded.
//!
//! - **Buffers full**: the newest message is dropped by this worker and
//!   counted as `overflow` (the other workers, each with its own buffers, may
//!   still have it). A worker holds at most QUEUE_CAPACITY messages here
//!   (half read, half waiting for the worker).
//! - **Silence**: after [`KEEPALIVE`] without traffic it PINGs the server;
//!   no answer within [`PING_TIMEOUT`] counts as a lost connection (a
//!   half-open socket would otherwise go unnoticed).
//! - **Lost connection**: it reconnects with backoff and subscribes again,
//!   counting the reconnect and logging how long it was away.
//! - **Marks** (partitioned strategy): it also listens to the worker's own
//!   mark channel, and hands each mark to the worker in its place among the
//!   messages (see [`super::partition`]); each (re)subscription is announced
//!   with [`Item::Subscribed`]. Before it unsubscribes it publishes one last
//!   mark, which closes the last stretch of messages.
//! - **Cluster**: the cluster client subscribes on the node that serves each
//!   channel's slot (SUBSCRIBE, or SSUBSCRIBE with sharded Pub/Sub). When a
//!   subscription is lost (a node's connection dropped, or the server's
//!   SUNSUBSCRIBE after a slot move, which the client does not follow) the
//!   task subscribes again itself, with backoff, the client following MOVED
//!   to the new node. Each loss counts as a reconnect, and the time until the
//!   new subscription is confirmed as a gap.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::{AsyncConnectionConfig, Client, ProtocolVersion, PushInfo, PushKind, RedisError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::delivery::Lane;
use super::delivery::{Keys, is_internal_channel, publish_mark};
use super::message::{IdAssigner, Incoming, Item};
use super::route::Router;
use crate::connect::{Conn, Endpoint, retry_until_connected};
use crate::monitor::Counters;

/// Silence on the subscription after which it is checked with a PING.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// Cluster: the first wait before subscribing again after a lost subscription.
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(100);
/// How long that PING may take (longer than a `CLIENT PAUSE` of a few seconds).
pub const PING_TIMEOUT: Duration = Duration::from_secs(15);

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
    pub ids: IdAssigner,
    pub counters: Arc<Counters>,
    pub coverage: Arc<Coverage>,
    /// Where received messages go; the worker reads the other end.
    pub queue: mpsc::Sender<Item>,
    /// The worker's mark channel, if it uses marks (partitioned strategy).
    pub marks: Option<Marks>,
    /// How many messages may wait between the socket and this task.
    pub read_buffer: usize,
    pub cancel: CancellationToken,
}

/// A worker's mark channel.
#[derive(Debug, Clone)]
pub struct Marks {
    pub keys: Keys,
    pub channel: String,
}

/// Pattern routes' lanes by channel, so that a busy channel's lane is made
/// once, not per message. Cleared when it grows past this: channels under a
/// pattern can be many and short-lived, and a quiet one must leave nothing
/// behind.
const LANE_CACHE: usize = 1_024;

/// What the client library's reader hands over.
enum Pushed {
    /// A message by route `route`; `channel` is given for pattern routes.
    Message {
        route: usize,
        channel: Option<Vec<u8>>,
        payload: Vec<u8>,
    },
    Mark {
        clock: u64,
        overflowed: bool,
    },
    Disconnected,
    /// Cluster: the server ended the subscription to the input channel (its
    /// slot moved) or a node's connection dropped; the client subscribes
    /// again by itself.
    Lost,
    /// Cluster: the subscription to the input channel is confirmed (again).
    Confirmed,
}

/// The subscribed connection: a RESP3 connection to one server
/// ([`Conn::Plain`]), or to a cluster, whose (S)SUBSCRIBE is `sharded`.
struct SubConn {
    conn: Conn,
    sharded: bool,
}

impl SubConn {
    async fn subscribe(
        &mut self,
        channels: Vec<&str>,
        patterns: Vec<&str>,
    ) -> Result<(), RedisError> {
        match &mut self.conn {
            // One channel at a time: each on the node that serves its slot,
            // where that node's PUBLISH counts it.
            Conn::Cluster(c) if self.sharded => {
                for channel in channels {
                    c.ssubscribe(channel).await?;
                }
            }
            Conn::Cluster(c) => {
                for channel in channels {
                    c.subscribe(channel).await?;
                }
            }
            Conn::Plain(c) => c.subscribe(channels).await?,
            Conn::Single(_) => unreachable!("subscriptions use a plain connection"),
        }
        if patterns.is_empty() {
            return Ok(());
        }
        match &mut self.conn {
            Conn::Cluster(c) => c.psubscribe(patterns).await,
            Conn::Plain(c) => c.psubscribe(patterns).await,
            Conn::Single(_) => unreachable!("subscriptions use a plain connection"),
        }
    }

    async fn unsubscribe(
        &mut self,
        channels: Vec<&str>,
        patterns: Vec<&str>,
    ) -> Result<(), RedisError> {
        if !patterns.is_empty() {
            match &mut self.conn {
                Conn::Cluster(c) => c.punsubscribe(patterns).await?,
                Conn::Plain(c) => c.punsubscribe(patterns).await?,
                Conn::Single(_) => unreachable!("subscriptions use a plain connection"),
            }
        }
        match &mut self.conn {
            Conn::Cluster(c) if self.sharded => {
                for channel in channels {
                    c.sunsubscribe(channel).await?;
                }
                Ok(())
            }
            Conn::Cluster(c) => {
                for channel in channels {
                    c.unsubscribe(channel).await?;
                }
                Ok(())
            }
            Conn::Plain(c) => c.unsubscribe(channels).await,
            Conn::Single(_) => unreachable!("subscriptions use a plain connection"),
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }
}

impl Subscription {
    /// Reads until cancelled. Returns an error only when reconnecting cannot
    /// help (credentials, permissions). Dropping the queue's sender on return
    /// tells the worker that nothing more is coming.
    pub async fn run(mut self) -> Result<(), RedisError> {
        let client = if self.endpoint.is_cluster() {
            None
        } else {
            let info = self.endpoint.client()?.get_connection_info().clone();
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            Some(Client::open(info.set_redis_settings(settings))?)
        };
        let shown = self.endpoint.to_string();
        let mut lost_at: Option<Instant> = None;
        loop {
            let connected =
                retry_until_connected(&shown, &self.cancel, || self.subscribe(client.as_ref()))
                    .await?;
            let Some((mut conn, mut pushed)) = connected else {
                return Ok(());
            };
            self.coverage.up(&self.counters);
            if self.queue.send(Item::Subscribed).await.is_err() {
                self.coverage.down(false);
                return Ok(());
            }
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
            let mut last_heard = Instant::now();
            // One timer, moved on only when it fires: no timer per message.
            let keepalive = tokio::time::sleep(KEEPALIVE);
            tokio::pin!(keepalive);
            // Cluster: after a lost subscription, subscribing again ourselves
            // (a server's SUNSUBSCRIBE after a slot move is not followed by
            // the client), every `retry_wait`, doubling, until it takes.
            let mut retry_wait: Option<Duration> = None;
            let retry = tokio::time::sleep(Duration::ZERO);
            tokio::pin!(retry);
            loop {
                let event = tokio::select! {
                    _ = self.cancel.cancelled() => {
                        self.unsubscribe_and_drain(&mut conn, &mut pushed).await;
                        self.coverage.down(false);
                        return Ok(());
                    }
                    event = pushed.recv() => event,
                    _ = &mut retry, if retry_wait.is_some() => {
                        let subscribe = conn.subscribe(self.channels(), self.router.patterns());
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
                let item = match event {
                    Some(Pushed::Message {
                        route,
                        channel,
                        payload,
                    }) => Item::Message(self.receive(route, channel, payload)),
                    Some(Pushed::Mark { clock, overflowed }) => Item::Mark { clock, overflowed },
                    Some(Pushed::Lost) | Some(Pushed::Disconnected) if conn.is_cluster() => {
                        if lost_at.is_none() {
                            tracing::warn!(worker = %self.worker_id, channel = %self.channel, "cluster subscription lost; subscribing again");
                            self.coverage.down(true);
                            lost_at = Some(Instant::now());
                        }
                        if retry_wait.is_none() {
                            retry_wait = Some(RESUBSCRIBE_FIRST);
                            retry
                                .as_mut()
                                .reset((Instant::now() + RESUBSCRIBE_FIRST).into());
                        }
                        continue;
                    }
                    // Our own UNSUBSCRIBE's echo: nothing to do.
                    Some(Pushed::Lost) => continue,
                    Some(Pushed::Confirmed) => {
                        if let Some(t) = lost_at.take() {
                            self.coverage.up(&self.counters);
                            Counters::add(&self.counters.reconnects, 1);
                            tracing::warn!(
                                worker = %self.worker_id,
                                channel = %self.channel,
                                gap_ms = t.elapsed().as_millis() as u64,
                                "resubscribed on the cluster; messages published during the gap reached only the other workers"
                            );
                        }
                        last_heard = Instant::now();
                        continue;
                    }
                    Some(Pushed::Disconnected) | None => break,
                };
                last_heard = Instant::now();
                if self.queue.send(item).await.is_err() {
                    self.coverage.down(false);
                    return Ok(()); // the worker is gone
                }
            }
            tracing::warn!(worker = %self.worker_id, channel = %self.channel, "subscription lost, reconnecting");
            if lost_at.is_none() {
                self.coverage.down(true);
                lost_at = Some(Instant::now());
            }
        }
    }

    /// Gives a message its id (it was counted as it came off the socket)
    /// and its route's lane.
    fn receive(&mut self, route: usize, channel: Option<Vec<u8>>, payload: Vec<u8>) -> Incoming {
        let mut m = self.ids.assign(payload, Instant::now());
        let lane = match channel {
            None => self
                .router
                .fixed(route)
                .expect("a channel's route has its lane"),
            Some(channel) => {
                if self.lanes.len() >= LANE_CACHE {
                    self.lanes = HashMap::new();
                }
                let router = &self.router;
                self.lanes
                    .entry(channel)
                    .or_insert_with_key(|channel| {
                        router.lane(route, &String::from_utf8_lossy(channel))
                    })
                    .clone()
            }
        };
        m.lane = Some(lane);
        m
    }

    /// The channels subscribed to: the routes' channels, the mark channel
    /// and (on one server) the routes' probe channels, all in one SUBSCRIBE
    /// (so the probes count exactly the subscriptions that get messages).
    fn channels(&self) -> Vec<&str> {
        let mut channels = self.router.channels();
        if let Some(marks) = &self.marks {
            channels.push(&marks.channel);
        }
        if !self.endpoint.is_cluster() {
            channels.extend(self.router.probes());
        }
        channels
    }

    /// Stops reading without losing what the server already sent: once
    /// UNSUBSCRIBE is confirmed, every message published before it has been
    /// read off the connection (replies come in order), and goes to the worker.
    /// A last mark, published first, tells the worker where those messages end.
    async fn unsubscribe_and_drain(
        &mut self,
        conn: &mut SubConn,
        pushed: &mut mpsc::Receiver<Pushed>,
    ) {
        if let Some(marks) = &self.marks
            && let Err(err) = publish_mark(&mut conn.conn, &marks.keys, &marks.channel).await
        {
            tracing::debug!(worker = %self.worker_id, cause = %crate::connect::brief(&err), "no last mark");
        }
        let unsubscribe = conn.unsubscribe(self.channels(), self.router.patterns());
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
            let item = match event {
                Pushed::Message {
                    route,
                    channel,
                    payload,
                } => Item::Message(self.receive(route, channel, payload)),
                Pushed::Mark { clock, overflowed } => Item::Mark { clock, overflowed },
                Pushed::Disconnected | Pushed::Lost | Pushed::Confirmed => continue,
            };
            if self.queue.send(item).await.is_err() {
                return;
            }
        }
    }

    /// A RESP3 connection subscribed to the channel, and the buffer its
    /// pushed messages go to (when it is full they are dropped and counted).
    /// Each attempt has a buffer of its own, so nothing from an attempt that
    /// failed half-way (a message, its end of connection) reaches the worker.
    async fn subscribe(
        &self,
        client: Option<&Client>,
    ) -> Result<(SubConn, mpsc::Receiver<Pushed>), RedisError> {
        let (pushed, receiver) = mpsc::channel(self.read_buffer.max(1));
        let counters = self.counters.clone();
        let worker = self.worker_id.clone();
        let started = Instant::now();
        // Milliseconds after `started` before which no overflow warning is
        // logged again: at most one a second.
        let next_warning = AtomicU64::new(0);
        // Whether a message was dropped since the last mark handed over.
        let overflowed = AtomicBool::new(false);
        let mark_channel = self.marks.as_ref().map(|m| m.channel.clone().into_bytes());
        // The subscription whose loss and return stand for all of them.
        let watched = self
            .router
            .channels()
            .first()
            .or(self.router.patterns().first())
            .map(|name| name.as_bytes().to_vec())
            .unwrap_or_default();
        let router = self.router.clone();
        // One server: one PUBLISH reaches this connection once per matching
        // subscription; see [`Publication`].
        let overlapping = self.router.may_overlap() && client.is_some();
        let publication = Mutex::new(Publication::default());
        let skip_router = router.clone();
        // Not bridged: optimus's own channels, and a message's second copy
        // bound for a stream (see [`Publication`]).
        let skip = move |route: usize, channel: &[u8]| {
            is_internal_channel(channel)
                || overlapping
                    && !publication
                        .lock()
                        .unwrap()
                        .first_for_stream(&skip_router, route, channel)
        };
        let on_push = move |info: PushInfo| -> Result<(), ()> {
            let is_watched =
                matches!(info.data.first(), Some(redis::Value::BulkString(c)) if *c == watched);
            // Control pushes are handed over without a bound (the end of a
            // connection must not be lost); messages through `hand_over`.
            let control = match info.kind {
                PushKind::SUnsubscribe | PushKind::Unsubscribe | PushKind::PUnsubscribe
                    if is_watched =>
                {
                    Some(Pushed::Lost)
                }
                PushKind::SSubscribe | PushKind::Subscribe | PushKind::PSubscribe if is_watched => {
                    Some(Pushed::Confirmed)
                }
                PushKind::Disconnection => Some(Pushed::Disconnected),
                _ => None,
            };
            if let Some(control) = control {
                let pushed = pushed.clone();
                tokio::spawn(async move { pushed.send(control).await });
                return Ok(());
            }
            let mut data = info.data.into_iter().map(|v| match v {
                redis::Value::BulkString(bytes) => Some(bytes),
                _ => None,
            });
            let mut next = || data.next().flatten();
            let message = match info.kind {
                PushKind::PMessage => {
                    let (Some(pattern), Some(channel), Some(payload)) = (next(), next(), next())
                    else {
                        return Ok(());
                    };
                    let Some(route) = router.for_pattern(&pattern) else {
                        return Ok(());
                    };
                    if skip(route, &channel) {
                        return Ok(());
                    }
                    Pushed::Message {
                        route,
                        channel: Some(channel),
                        payload,
                    }
                }
                PushKind::Message | PushKind::SMessage => {
                    let (Some(channel), Some(payload)) = (next(), next()) else {
                        return Ok(());
                    };
                    if mark_channel.as_ref() == Some(&channel) {
                        let Some(clock) = std::str::from_utf8(&payload)
                            .ok()
                            .and_then(|c| c.parse().ok())
                        else {
                            return Ok(());
                        };
                        let mark = Pushed::Mark {
                            clock,
                            overflowed: overflowed.swap(false, Ordering::Relaxed),
                        };
                        if pushed.try_send(mark).is_err() {
                            // The mark is lost: the next one reports the drop.
                            overflowed.store(true, Ordering::Relaxed);
                        }
                        return Ok(());
                    }
                    let Some(route) = router.for_channel(&channel) else {
                        return Ok(());
                    };
                    if skip(route, &channel) {
                        return Ok(());
                    }
                    Pushed::Message {
                        route,
                        channel: None,
                        payload,
                    }
                }
                _ => return Ok(()),
            };
            hand_over(
                &pushed,
                message,
                &counters,
                &overflowed,
                &next_warning,
                started,
                &worker,
            );
            Ok(())
        };
        let mut conn = match client {
            Some(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_push_sender(on_push)
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(PING_TIMEOUT));
                let conn = match client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                {
                    Ok(conn) => conn,
                    Err(err) => return Err(self.endpoint.diagnose(err).await),
                };
                SubConn {
                    conn: Conn::Plain(conn),
                    sharded: false,
                }
            }
            None => SubConn {
                conn: Conn::Cluster(
                    self.endpoint
                        .connect_cluster(
                            self.endpoint
                                .cluster_builder()?
                                .use_protocol(ProtocolVersion::RESP3)
                                .push_sender(on_push),
                        )
                        .await?,
                ),
                sharded: self.endpoint.is_sharded(),
            },
        };
        conn.subscribe(self.channels(), self.router.patterns())
            .await?;
        // A first mark at once: what arrives before it can only be taken over
        // (nothing bounds it), so that stretch is kept as short as can be.
        if let Some(marks) = &self.marks {
            publish_mark(&mut conn.conn, &marks.keys, &marks.channel).await?;
        }
        Ok((conn, receiver))
    }
}

/// The pushes the last PUBLISH made on a subscribed connection so far.
///
/// Redis delivers one PUBLISH to a connection once per subscription that
/// matches it (its channel, then each matching pattern), one push right
/// after the other: nothing else comes between them. So a push on the same
/// channel as the one before, through a subscription (route) not yet seen
/// for it, is the same message again; a push through a subscription already
/// seen is the next message. A message is bridged once per stream,
/// whatever number of routes lead it there.
#[derive(Debug, Default)]
struct Publication {
    channel: Vec<u8>,
    routes: Vec<usize>,
}

impl Publication {
    /// Whether the push on `channel` by `route` is the first copy of its
    /// message bound for its route's stream.
    fn first_for_stream(&mut self, router: &Router, route: usize, channel: &[u8]) -> bool {
        if self.channel != channel || self.routes.contains(&route) {
            self.channel.clear();
            self.channel.extend_from_slice(channel);
            self.routes.clear();
            self.routes.push(route);
            return true;
        }
        let stream = router.stream_of(route, channel);
        let first = self
            .routes
            .iter()
            .all(|r| router.stream_of(*r, channel) != stream);
        self.routes.push(route);
        first
    }
}

/// Puts a message in the subscription's buffer, or, when the buffer is
/// full, drops it, counts it as `overflow` and says so (at most once a
/// second); either way it was received.
fn hand_over(
    pushed: &mpsc::Sender<Pushed>,
    message: Pushed,
    counters: &Counters,
    overflowed: &AtomicBool,
    next_warning: &AtomicU64,
    started: Instant,
    worker: &str,
) {
    match pushed.try_send(message) {
        Ok(()) => Counters::add(&counters.received, 1),
        // This connection was given up: nothing here received it.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            Counters::add(&counters.received, 1);
            overflowed.store(true, Ordering::Relaxed);
            Counters::add(&counters.overflow, 1);
            let now = started.elapsed().as_millis() as u64;
            let next = next_warning.load(Ordering::Relaxed);
            if now >= next
                && next_warning
                    .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(worker = %worker, overflow = counters.overflow.load(Ordering::Relaxed), "queue full: dropping new messages (see overflow)");
            }
        }
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

    /// The process runs no worker on purpose (`ctl scale`): from now until a
    /// worker subscribes again is a gap too.
    pub fn pause(&self) {
        self.uncovered_since
            .lock()
            .unwrap()
            .get_or_insert_with(Instant::now);
    }

    /// How many subscriptions of this process are up.
    pub fn subscribed(&self) -> usize {
        self.subscribed.load(Ordering::SeqCst)
    }
}
