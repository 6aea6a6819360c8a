//! A subscription of this process (one server): a connection of its own that
//! speaks RESP3 itself, reads the channels in chunks, and slices each message
//! out of the chunk it came in (no copy), giving it its [`Position`].
//!
//! - **Start at a mark.** Each connection subscribes and publishes a mark in
//!   one MULTI: nothing can be published between the two, so the first thing
//!   it receives after subscribing is its own mark, and every message after
//!   it has a position every other subscription agrees on.
//! - **On a cluster** (sharded Pub/Sub) the connection goes to the master of
//!   the channel's slot, where the pool's clock and marks channel live too
//!   (see [`Pool::sharded`]). Redis refuses SSUBSCRIBE inside MULTI, so the
//!   SSUBSCRIBE and the mark's script are sent together instead: Redis runs
//!   the commands of one read back to back, so nothing comes between them
//!   in practice; a message that does (published after the subscription,
//!   before the mark) is dropped here, as if published before it, and
//!   counted and logged. The server's SUNSUBSCRIBE (the slot moved) ends
//!   the connection; the next one goes where the slot is then.
//! - **Batches.** What one read brings is one [`ReaderBatch`], charged to
//!   the process's [`Budget`] before the next read: when the budget is spent
//!   the reader stops reading and the messages wait in the server's output
//!   buffer (backpressure to the socket).
//! - **Silence**: after [`KEEPALIVE`] without a byte it PINGs; nothing for
//!   [`PING_TIMEOUT`] counts as a lost connection (marks come every 50 ms,
//!   so silence means trouble).
//! - **Lost connection**: it says so ([`Event::Lost`]), reconnects with
//!   backoff and starts again at a new mark; errors retrying cannot mend
//!   (credentials, permissions) end it.
//! - **Stopping**: UNSUBSCRIBE, and everything that arrived before its
//!   confirmation is handed over, then [`Event::Stopped`].
//! - **What is not bridged**: optimus's own channels (marks, probes), and a
//!   message's second copy bound for a stream when several routes match it
//!   (see [`Publication`]).

use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redis::RedisError;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::budget::{Budget, Charge, MESSAGE_OVERHEAD};
use super::resp::{self, Frame, Parse, Parts};
use super::resubscribe::{Ended, Link, Subscriber, keep_subscribed};
use super::{Lane, Message, Pool, Position, is_internal_channel, scripts};
use crate::bridge::route::Router;
use crate::connect::{Endpoint, Transport, primary_watch, until_moved};
use crate::monitor::{Counters, Throttle};

/// Silence on the subscription after which it is checked with a PING.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long that PING (counted from when it went out) and the handshake
/// may take: longer than a `CLIENT PAUSE` of a few seconds.
pub const PING_TIMEOUT: Duration = Duration::from_secs(15);
/// How much is read from the socket at a time, at most.
const READ_CHUNK: usize = 64 * 1024;

/// What a reader hands over, in order: one read's items.
#[derive(Debug)]
pub struct ReaderBatch {
    /// Which reader of the process.
    pub reader: usize,
    pub items: Vec<Item>,
    /// What happened to the connection, after the items.
    pub event: Option<Event>,
}

#[derive(Debug)]
pub enum Item {
    /// A mark: everything after it was published after this clock value.
    Mark(u64),
    Message(Message),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A new connection, starting at this mark (its first item); the value
    /// the pool's clock last leapt to on that server (0: never; see
    /// [`PROMOTION_LEAP`]).
    Subscribed { start: u64, leapt_to: u64 },
    /// The connection was lost: what follows is a new one.
    Lost,
    /// The reader stopped, having handed over everything it received.
    Stopped,
}

/// Everything a reader needs.
pub struct Reader {
    pub index: usize,
    pub endpoint: Endpoint,
    pub router: Arc<Router>,
    pub pool: Pool,
    pub budget: Arc<Budget>,
    pub counters: Arc<Counters>,
    pub coverage: Arc<Coverage>,
    /// Where its batches go: bounded by the memory budget (what a batch
    /// holds is charged before it is sent), not by a count, so that a loop
    /// busy with a slow reply never stops the readers while the budget has
    /// room.
    pub out: mpsc::UnboundedSender<ReaderBatch>,
    pub cancel: CancellationToken,
    /// On a cluster (sharded Pub/Sub): the command connection through which
    /// the master of the channel's slot is found.
    pub locator: Option<crate::connect::Conn>,
}

/// One connection of a reader.
pub(super) struct Session {
    read: ReadHalf<Box<dyn Transport>>,
    write: WriteHalf<Box<dyn Transport>>,
    /// What was read and not yet cut into frames.
    buf: BytesMut,
    /// The last mark, and each stream's count of messages since.
    mark: u64,
    /// The value the clock last leapt to on this server (see [`Start`]).
    leapt_to: u64,
    /// What this server's marks are sealed with (see [`Start`]).
    seal: Box<str>,
    /// The line about a bad mark, at most once a second.
    bad_marks_said: Throttle,
    /// When the last good mark came.
    last_good_mark: Instant,
    /// Only marks sealed otherwise came for [`RESEAL_AFTER`]: the
    /// connection is given up and made again (with the new seal).
    sealed_otherwise: bool,
    seqs: FxHashMap<Box<str>, u32>,
    publication: Publication,
    last_heard: Instant,
    /// When the PING on its way went out.
    pinged: Option<Instant>,
    /// Reading waited for memory (MEMORY_LIMIT) on this connection.
    waited_for_memory: bool,
    /// The server's count of clients dropped for their output buffers
    /// when this connection began (`None`: it does not say).
    buffer_limit_drops: Option<u64>,
    /// Items cut when the reader was asked to stop, not yet handed over
    /// (with the bytes they came in).
    unsent: Option<(Vec<Item>, usize)>,
    /// The server took the subscription away (a sharded channel's slot
    /// moved): the session ends once what came before it is handed over.
    ended: Option<String>,
    /// The server's `host:port`, and (through sentinels) where they say the
    /// primary is: the session ends when they name another.
    address: String,
    primary: Option<tokio::sync::watch::Receiver<Option<String>>>,
}

/// Why a connection's reading ended.
enum Reading {
    Cancelled,
    Lost(String),
    /// Nobody takes the batches any more.
    Closed,
}

impl Subscriber for Reader {
    type Session = (Session, FxHashMap<Bytes, Arc<Lane>>);

    fn who(&self) -> String {
        format!("reader {}", self.index)
    }

    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }

    async fn subscribe(&self) -> Result<Self::Session, RedisError> {
        let mut session = self.connect().await?;
        session.buffer_limit_drops = self.buffer_limit_drops().await;
        Ok((session, FxHashMap::default()))
    }

    async fn read(&mut self, session: Self::Session, _: &mut Link<'_>) -> Ended {
        let (mut session, mut lanes) = session;
        let start = session.mark;
        let leapt_to = session.leapt_to;
        if !self
            .send(
                vec![Item::Mark(start)],
                Some(Event::Subscribed { start, leapt_to }),
            )
            .await
        {
            return Ended::Stopped;
        }
        match self.read_session(&mut session, &mut lanes).await {
            Reading::Cancelled => {
                self.drain(&mut session, &mut lanes).await;
                Ended::Stopped
            }
            Reading::Closed => Ended::Stopped,
            Reading::Lost(why) => {
                let dropped = self.buffer_limit_drops().await;
                let why = match (session.buffer_limit_drops, dropped) {
                    (Some(before), Some(now)) if now > before => format!(
                        "{why}: the server dropped the subscription for its client-output-buffer-limit (pubsub; {now} such disconnections so far, reading waited for memory: {}): what was in its buffer is lost (a gap, counted once a subscription is back)",
                        session.waited_for_memory
                    ),
                    _ if session.waited_for_memory => format!(
                        "{why}: lost while reading waited for memory (MEMORY_LIMIT): the server's client-output-buffer-limit for pubsub was probably passed"
                    ),
                    _ => why,
                };
                match self.send(Vec::new(), Some(Event::Lost)).await {
                    true => Ended::Lost(why),
                    false => Ended::Stopped,
                }
            }
        }
    }

    async fn stopped(&mut self) {
        let _ = self.send(Vec::new(), Some(Event::Stopped)).await;
    }
}

/// Reads a subscription's handshake (see `Reader::connect`): `replies`
/// replies before EXEC's, then EXEC's (`exec`), or, on a cluster, the
/// SSUBSCRIBE's pushes and the mark script's reply. Also returns how many
/// messages came before that reply (none can, inside EXEC) on a channel but
/// `marks`.
async fn read_handshake(
    mut read: ReadHalf<Box<dyn Transport>>,
    mut replies: usize,
    exec: bool,
    marks: &str,
) -> Result<(ReadHalf<Box<dyn Transport>>, BytesMut, Start, u64), RedisError> {
    // The replies before EXEC's come first (an error among them is kept:
    // the first one says why, a refused password before the rest); then
    // EXEC's: its header, the subscriptions' pushes, the mark's push and
    // the mark's value.
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut first_error: Option<RedisError> = None;
    let mut in_exec = !exec;
    let mut early = 0;
    loop {
        let how = if replies == 0 && !in_exec {
            Parse::Header
        } else {
            Parse::Whole
        };
        let (frame, len) = match resp::frame(&buf, how) {
            Err(err) => return Err(first_error.unwrap_or(protocol_error(err))),
            Ok(Some(found)) => found,
            Ok(None) => {
                if read.read_buf(&mut buf).await? == 0 {
                    return Err(first_error.unwrap_or_else(|| {
                        RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the server closed the connection",
                        ))
                    }));
                }
                continue;
            }
        };
        let bytes = buf.split_to(len).freeze();
        match frame {
            Frame::Push(parts)
                if matches!(
                    part(&bytes, &parts, 0).as_deref(),
                    Some(b"message" | b"smessage")
                ) && part(&bytes, &parts, 1).is_some_and(|c| c != marks.as_bytes()) =>
            {
                early += 1;
            }
            Frame::Push(_) => {}
            Frame::Error(_) if replies > 0 => {
                replies -= 1;
                first_error.get_or_insert(server_error(&bytes));
            }
            Frame::Error(_) => return Err(first_error.unwrap_or(server_error(&bytes))),
            _ if replies > 0 => replies -= 1,
            Frame::Header => in_exec = true,
            Frame::Other if in_exec && bytes.first() == Some(&b'$') => {
                if let Some(err) = first_error {
                    return Err(err);
                }
                return match redis::parse_redis_value(&bytes) {
                    Ok(redis::Value::BulkString(text)) => Start::parse(&text)
                        .map(|start| (read, buf, start, early))
                        .ok_or_else(|| protocol_error(NOT_A_START)),
                    _ => Err(protocol_error(NOT_A_START)),
                };
            }
            _ => {}
        }
    }
}

/// Pattern routes' lanes by channel, so that a busy channel's lane is made
/// once, not per message. Cleared when it grows past this: channels under a
/// pattern can be many and short-lived, and a quiet one must leave nothing
/// behind.
const LANE_CACHE: usize = 1_024;

impl Reader {
    /// Reads until cancelled; returns an error only when reconnecting cannot
    /// help (credentials, permissions).
    pub async fn run(self) -> Result<(), RedisError> {
        let (coverage, counters) = (self.coverage.clone(), self.counters.clone());
        keep_subscribed(self, &coverage, &counters).await
    }

    /// Hands a batch over; false when nobody takes it any more.
    async fn send(&self, items: Vec<Item>, event: Option<Event>) -> bool {
        let batch = ReaderBatch {
            reader: self.index,
            items,
            event,
        };
        self.out.send(batch).is_ok()
    }

    /// The channels subscribed to: the routes' channels, the marks channel
    /// and the routes' probe channels, all in one SUBSCRIBE (so the probes
    /// count exactly the subscriptions that get messages).
    fn channels(&self) -> Vec<&str> {
        let mut channels = self.router.channels();
        channels.push(&self.pool.marks);
        // (On a cluster the probes live in other slots: nobody asks them.)
        if !self.pool.sharded {
            channels.extend(self.router.probes());
        }
        // Redis subscribes (and confirms an UNSUBSCRIBE of) each once.
        channels.sort_unstable();
        channels.dedup();
        channels
    }

    /// A new connection: HELLO 3 (with the credentials), SELECT, then the
    /// subscription and a mark in one MULTI. Returns it once the mark is in.
    async fn connect(&self) -> Result<Session, RedisError> {
        // Through sentinels: the primary they name now, watched for a move;
        // on a cluster, the master of the channel's slot.
        let target = match &self.locator {
            Some(locator) => {
                let channel = self.router.channels().first().copied().unwrap_or_default();
                self.endpoint
                    .slot_owner(&mut locator.clone(), channel)
                    .await?
            }
            None => self.endpoint.resolve().await?,
        };
        let info = target.info()?;
        let settings = info.redis_settings();
        let stream = target.open_stream().await?;
        let (read, write) = tokio::io::split(stream);
        let mut out = Vec::new();
        let mut hello: Vec<&[u8]> = vec![b"HELLO", b"3"];
        if let Some(password) = settings.password() {
            hello.extend([
                b"AUTH".as_slice(),
                settings.username().unwrap_or("default").as_bytes(),
                password.as_bytes(),
            ]);
        }
        // Named for the process, so CLIENT LIST tells whose subscription it is.
        let name = format!("optimus-reader-{}", std::process::id());
        hello.extend([b"SETNAME".as_slice(), name.as_bytes()]);
        encode(&mut out, &hello);
        let mut replies = 1;
        if self.pool.sharded {
            // The script's body goes ahead (SCRIPT LOAD), so that SSUBSCRIBE
            // and the mark's EVALSHA are a few hundred bytes: one read for
            // the server, run back to back. (With the body in the EVAL,
            // over 6 KB, the server could run SSUBSCRIBE and serve others
            // before the rest arrived: messages in between are dropped
            // here.)
            encode(&mut out, &[b"SCRIPT", b"LOAD", scripts::START.as_bytes()]);
            replies += 1;
            let mut subscribe: Vec<&[u8]> = vec![b"SSUBSCRIBE"];
            subscribe.extend(self.channels().into_iter().map(str::as_bytes));
            encode(&mut out, &subscribe);
            encode(
                &mut out,
                &self.start_script(b"EVALSHA", scripts::sha(scripts::START)),
            );
            return self
                .handshake(write, read, out, replies, false, target)
                .await;
        }
        let db = settings.db().to_string();
        if db != "0" {
            encode(&mut out, &[b"SELECT", db.as_bytes()]);
            replies += 1;
        }
        encode(&mut out, &[b"MULTI"]);
        let mut subscribe: Vec<&[u8]> = vec![b"SUBSCRIBE"];
        subscribe.extend(self.channels().into_iter().map(str::as_bytes));
        encode(&mut out, &subscribe);
        let mut queued = 2;
        let patterns = self.router.patterns();
        if !patterns.is_empty() {
            let mut psubscribe: Vec<&[u8]> = vec![b"PSUBSCRIBE"];
            psubscribe.extend(patterns.iter().map(|p| p.as_bytes()));
            encode(&mut out, &psubscribe);
            queued += 1;
        }
        encode(&mut out, &self.start_script(b"EVAL", scripts::START));
        encode(&mut out, &[b"EXEC"]);
        replies += 1 + queued;
        self.handshake(write, read, out, replies, true, target)
            .await
    }

    /// The script that publishes a connection's first mark, run with
    /// `command` (`EVAL` with the body, or `EVALSHA` with its SHA).
    fn start_script<'a>(&'a self, command: &'a [u8], script: &'a str) -> [&'a [u8]; 6] {
        [
            command,
            script.as_bytes(),
            b"1",
            self.pool.clock.as_bytes(),
            self.pool.marks.as_bytes(),
            if self.pool.sharded { b"1" } else { b"0" },
        ]
    }

    /// Sends the handshake `out` and reads its answer (see
    /// [`read_handshake`]): the session, starting at its mark.
    async fn handshake(
        &self,
        mut write: WriteHalf<Box<dyn Transport>>,
        read: ReadHalf<Box<dyn Transport>>,
        out: Vec<u8>,
        replies: usize,
        exec: bool,
        target: Endpoint,
    ) -> Result<Session, RedisError> {
        let handshake = async {
            write.write_all(&out).await?;
            read_handshake(read, replies, exec, &self.pool.marks).await
        };
        let (read, buf, start, early) = match tokio::time::timeout(PING_TIMEOUT, handshake).await {
            Ok(done) => done?,
            Err(_) => {
                return Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the subscription's handshake timed out",
                )));
            }
        };
        if early > 0 {
            tracing::warn!(
                reader = self.index,
                messages = early,
                "messages came between the subscription and its first mark: dropped here (as if published before it; the pool's other subscriptions hold them, if any)"
            );
        }
        Ok(Session {
            read,
            write,
            buf,
            mark: start.mark,
            leapt_to: start.leapt_to,
            seal: start.seal,
            bad_marks_said: Throttle::default(),
            last_good_mark: Instant::now(),
            sealed_otherwise: false,
            seqs: FxHashMap::default(),
            publication: Publication::default(),
            last_heard: Instant::now(),
            pinged: None,
            waited_for_memory: false,
            buffer_limit_drops: None,
            unsent: None,
            ended: None,
            address: target.address().unwrap_or_default(),
            primary: primary_watch(&self.endpoint),
        })
    }

    /// Reads until the connection is lost or the reader is cancelled.
    async fn read_session(
        &self,
        s: &mut Session,
        lanes: &mut FxHashMap<Bytes, Arc<Lane>>,
    ) -> Reading {
        let keepalive = tokio::time::sleep(KEEPALIVE);
        tokio::pin!(keepalive);
        loop {
            let (items, bytes) = match self.cut(s, lanes, None) {
                Ok(cut) => cut,
                Err(why) => return Reading::Lost(why),
            };
            if !items.is_empty() {
                // Items cut are never dropped: a stop while they wait for
                // memory leaves them to `drain`, which hands them over first.
                let (charge, waited) = tokio::select! {
                    _ = self.cancel.cancelled() => {
                        s.unsent = Some((items, bytes));
                        return Reading::Cancelled;
                    }
                    charged = self.charge(&items, bytes) => charged,
                };
                s.waited_for_memory |= waited;
                if !self.send(attach(items, charge), None).await {
                    return Reading::Closed;
                }
            }
            if let Some(why) = s.ended.take() {
                return Reading::Lost(why);
            }
            if s.buf.capacity() - s.buf.len() < READ_CHUNK / 4 {
                s.buf.reserve(READ_CHUNK);
            }
            // Reading comes first: after this process was paused (SIGSTOP,
            // a starved host) or waited for memory, what the server sent
            // meanwhile is in the socket, and the silence was ours. Only a
            // PING sent and left unanswered for PING_TIMEOUT ends it.
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Reading::Cancelled,
                _ = until_moved(s.primary.as_mut(), &s.address) => {
                    return Reading::Lost("the sentinels named another primary".into());
                }
                read = s.read.read_buf(&mut s.buf) => match read {
                    Ok(0) => return Reading::Lost("the server closed the connection".into()),
                    Ok(_) => {
                        s.last_heard = Instant::now();
                        s.pinged = None;
                    }
                    Err(err) => return Reading::Lost(err.to_string()),
                },
                _ = &mut keepalive => {
                    match s.pinged {
                        Some(at) if at.elapsed() >= PING_TIMEOUT => {
                            return Reading::Lost(format!(
                                "no answer to a PING for {} s",
                                at.elapsed().as_secs()
                            ));
                        }
                        Some(_) => {}
                        None if s.last_heard.elapsed() >= KEEPALIVE => {
                            let mut ping = Vec::new();
                            encode(&mut ping, &[b"PING"]);
                            if let Err(err) = s.write.write_all(&ping).await {
                                return Reading::Lost(err.to_string());
                            }
                            s.pinged = Some(Instant::now());
                        }
                        None => {}
                    }
                    let next = match s.pinged {
                        Some(at) => at + PING_TIMEOUT,
                        None => s.last_heard + KEEPALIVE,
                    };
                    keepalive.as_mut().reset(next.into());
                }
            }
        }
    }

    /// Charges a batch's messages to the budget, waiting for room (none for
    /// marks alone). Returns the charge, and whether it had to wait.
    async fn charge(&self, items: &[Item], bytes: usize) -> (Option<Arc<Charge>>, bool) {
        let messages = items
            .iter()
            .filter(|i| matches!(i, Item::Message(_)))
            .count();
        if messages == 0 {
            return (None, false);
        }
        let need = bytes + messages * MESSAGE_OVERHEAD;
        let waited = self.budget.used() + need > self.budget.limit();
        (Some(self.budget.charge(need).await), waited)
    }

    /// Charges a batch to the budget (waiting for room), then hands it over.
    /// Returns whether it was taken.
    async fn charge_and_send(&self, items: Vec<Item>, bytes: usize) -> bool {
        let (charge, _) = self.charge(&items, bytes).await;
        self.send(attach(items, charge), None).await
    }

    /// Cuts the whole frames at the front of the buffer into items; with
    /// `unsubscribed`, counts the unsubscribe confirmations there too.
    /// Returns the items and the bytes they came in.
    fn cut(
        &self,
        s: &mut Session,
        lanes: &mut FxHashMap<Bytes, Arc<Lane>>,
        mut unsubscribed: Option<&mut usize>,
    ) -> Result<(Vec<Item>, usize), String> {
        let mut items = Vec::new();
        let mut bytes = 0;
        let now = Instant::now();
        loop {
            let (frame, len) = match resp::frame(&s.buf, Parse::Whole) {
                Ok(Some(found)) => found,
                Ok(None) => return Ok((items, bytes)),
                Err(err) => return Err(err.to_string()),
            };
            let raw = s.buf.split_to(len).freeze();
            bytes += len;
            match frame {
                Frame::Push(parts) => {
                    let kind = part(&raw, &parts, 0);
                    let unsubscribe = matches!(
                        kind.as_deref(),
                        Some(b"unsubscribe" | b"punsubscribe" | b"sunsubscribe")
                    );
                    match unsubscribed.as_deref_mut() {
                        Some(count) if unsubscribe => *count += 1,
                        // Not asked for: the server took the subscription
                        // away (a sharded channel's slot moved). What came
                        // before it in the buffer is handed over first (it
                        // was delivered, so the publisher counted a
                        // receiver); what comes after is not ours.
                        None if unsubscribe => {
                            s.ended = Some(format!(
                                "the server ended the subscription ({}): the channel's slot moved; subscribing again where it is now",
                                String::from_utf8_lossy(kind.as_deref().unwrap_or_default())
                            ));
                            return Ok((items, bytes));
                        }
                        _ => {}
                    }
                    if let Some(item) = self.on_push(s, lanes, &raw, &parts, now) {
                        items.push(item);
                    }
                    if s.sealed_otherwise {
                        return Err("only marks sealed otherwise come: the server changed (its run_id); subscribing again".into());
                    }
                }
                Frame::Error(text) => {
                    return Err(String::from_utf8_lossy(&raw[text]).into_owned());
                }
                // A PING's reply, or an UNSUBSCRIBE's.
                _ => {}
            }
        }
    }

    /// The item a push makes, if any.
    fn on_push(
        &self,
        s: &mut Session,
        lanes: &mut FxHashMap<Bytes, Arc<Lane>>,
        raw: &Bytes,
        parts: &Parts,
        now: Instant,
    ) -> Option<Item> {
        let kind = part(raw, parts, 0)?;
        let (route, channel, payload) = match kind.as_ref() {
            b"message" | b"smessage" => {
                let channel = part(raw, parts, 1)?;
                let payload = part(raw, parts, 2)?;
                if channel.as_ref() == self.pool.marks.as_bytes() {
                    let Some(mark) = unseal(&payload, &s.seal).filter(|m| *m >= s.mark) else {
                        self.bad_mark(&mut s.bad_marks_said, &payload, s.mark);
                        // Only marks sealed otherwise for a while: the
                        // server is another now (a failover behind a proxy
                        // that kept the connection), and so is its seal.
                        if looks_sealed(&payload) && s.last_good_mark.elapsed() >= RESEAL_AFTER {
                            s.sealed_otherwise = true;
                        }
                        return None;
                    };
                    s.last_good_mark = now;
                    // The start mark's own push (after EXEC's reply on
                    // Redis 7.2 and later): nothing new.
                    if mark == s.mark {
                        return None;
                    }
                    s.mark = mark;
                    let counted = s.seqs.len();
                    s.seqs.clear();
                    // Many streams once, few now: give the room back.
                    if s.seqs.capacity() > 4 * counted.max(64) {
                        s.seqs.shrink_to(counted);
                    }
                    return Some(Item::Mark(mark));
                }
                (self.router.for_channel(&channel)?, channel, payload)
            }
            b"pmessage" => {
                let pattern = part(raw, parts, 1)?;
                let channel = part(raw, parts, 2)?;
                let payload = part(raw, parts, 3)?;
                (self.router.for_pattern(&pattern)?, channel, payload)
            }
            _ => return None,
        };
        if is_internal_channel(&channel)
            || self.router.may_overlap()
                && !s
                    .publication
                    .first_for_stream(&self.router, route, &channel)
        {
            return None;
        }
        let lane = match self.router.fixed(route) {
            Some(lane) => lane,
            None => {
                if lanes.len() >= LANE_CACHE {
                    *lanes = FxHashMap::default();
                }
                lanes
                    .entry(channel.clone())
                    .or_insert_with(|| self.router.lane(route, &String::from_utf8_lossy(&channel)))
                    .clone()
            }
        };
        let seq = match s.seqs.get_mut(lane.stream()) {
            Some(seq) => seq,
            None => s.seqs.entry(lane.stream().into()).or_insert(0),
        };
        *seq += 1;
        let mut m = Message::arrived(payload, channel, lane, now);
        m.position = Some(Position {
            mark: s.mark,
            seq: *seq,
        });
        Some(Item::Message(m))
    }

    /// How many clients the server has dropped for passing their
    /// client-output-buffer-limit (INFO stats), asked on a connection of
    /// its own; `None` when it does not say (a user without INFO, a server
    /// away) within 2 s.
    async fn buffer_limit_drops(&self) -> Option<u64> {
        let asked = async {
            let mut conn = crate::connect::open(&self.endpoint).await.ok()?;
            let info: String = redis::cmd("INFO")
                .arg("stats")
                .query_async(&mut conn)
                .await
                .ok()?;
            info.lines()
                .find_map(|l| l.strip_prefix("client_output_buffer_limit_disconnections:"))
                .and_then(|v| v.trim().parse().ok())
        };
        tokio::time::timeout(Duration::from_secs(2), asked)
            .await
            .ok()
            .flatten()
    }

    /// A message on the marks channel that is no mark of this pool: not
    /// sealed by this server's scripts (a client or a forwarding tool
    /// published it), or not after the last mark (a mark sent again). It
    /// is no mark: every reader of the pool passes over it alike, so the
    /// positions stay the same everywhere. Counted, and said in one line.
    fn bad_mark(&self, said: &mut Throttle, payload: &[u8], last: u64) {
        Counters::add(&self.counters.bad_marks, 1);
        if let Some(held_back) = said.ready() {
            let shown: String = String::from_utf8_lossy(&payload[..payload.len().min(64)]).into();
            tracing::warn!(
                channel = %self.pool.marks,
                payload = %shown,
                last_mark = last,
                more = held_back,
                "ignored a message on the marks channel that is not a mark of this pool (not sealed by this server's scripts, or not after the last mark): only the pool's scripts may publish there (see the ACL rule in docs/cluster-and-tls.md)"
            );
        }
    }

    /// Stops reading without losing what the server already sent: once the
    /// unsubscriptions are confirmed, every message published before them
    /// has been read off the connection (replies come in order), and is
    /// handed over.
    async fn drain(&self, s: &mut Session, lanes: &mut FxHashMap<Bytes, Arc<Lane>>) {
        let channels = self.channels().len();
        let patterns = self.router.patterns().len();
        let mut out = Vec::new();
        encode(
            &mut out,
            &[if self.pool.sharded {
                b"SUNSUBSCRIBE".as_slice()
            } else {
                b"UNSUBSCRIBE"
            }],
        );
        if patterns > 0 {
            encode(&mut out, &[b"PUNSUBSCRIBE"]);
        }
        let expected = channels + patterns;
        let mut confirmed = 0;
        let drained = async {
            if let Some((items, bytes)) = s.unsent.take()
                && !self.charge_and_send(items, bytes).await
            {
                return Ok(());
            }
            s.write.write_all(&out).await.map_err(|e| e.to_string())?;
            loop {
                let (items, bytes) = self.cut(s, lanes, Some(&mut confirmed))?;
                if !items.is_empty() && !self.charge_and_send(items, bytes).await {
                    return Ok(());
                }
                if confirmed >= expected {
                    return Ok(());
                }
                if s.read
                    .read_buf(&mut s.buf)
                    .await
                    .map_err(|e| e.to_string())?
                    == 0
                {
                    return Err("the server closed the connection".to_string());
                }
            }
        };
        match tokio::time::timeout(PING_TIMEOUT, drained).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                tracing::warn!(reader = self.index, cause = %why, "UNSUBSCRIBE failed; handed over what had arrived")
            }
            Err(_) => {
                tracing::warn!(
                    reader = self.index,
                    "UNSUBSCRIBE not confirmed in time; handed over what had arrived"
                )
            }
        }
    }
}

/// The items, their messages carrying `charge`.
fn attach(mut items: Vec<Item>, charge: Option<Arc<Charge>>) -> Vec<Item> {
    if let Some(charge) = charge {
        for item in items.iter_mut() {
            if let Item::Message(m) = item {
                m.charge = Some(charge.clone());
            }
        }
    }
    items
}

/// The handshake's reply was not what `start.lua` returns.
const NOT_A_START: resp::ProtocolError = resp::ProtocolError {
    at: 0,
    what: "expected the start mark",
};

/// What a reader's connection starts with (`start.lua`'s reply,
/// `"<mark>:<seal>:<leapt to>"`): its first mark, the seal (the server's
/// run_id) every mark on it must carry, and the value the clock last leapt
/// to on that server.
#[derive(Debug)]
struct Start {
    mark: u64,
    seal: Box<str>,
    leapt_to: u64,
}

impl Start {
    fn parse(text: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(text).ok()?;
        let (mark, rest) = text.split_once(':')?;
        let (seal, leapt_to) = rest.split_once(':').unwrap_or((rest, "0"));
        Some(Self {
            mark: mark.parse().ok()?,
            seal: seal.into(),
            leapt_to: leapt_to.parse().ok()?,
        })
    }
}

/// How far the pool's clock leaps on a replica promoted in a failover
/// (`lib.lua`'s PROMOTION_LEAP: 5 s, in marks).
pub const PROMOTION_LEAP: u64 = 5000 * 1024;

/// How long only marks sealed otherwise may come before the connection is
/// made again (marks come every 50 ms).
const RESEAL_AFTER: Duration = Duration::from_secs(2);

/// Whether a payload has a sealed mark's form, `<digits>:<16 hex digits>`.
fn looks_sealed(payload: &[u8]) -> bool {
    let Some(at) = payload.iter().position(|b| *b == b':') else {
        return false;
    };
    let (value, tag) = (&payload[..at], &payload[at + 1..]);
    !value.is_empty()
        && value.iter().all(u8::is_ascii_digit)
        && tag.len() == 16
        && tag.iter().all(u8::is_ascii_hexdigit)
}

/// The tag a mark of `value` carries on a server whose seal is `seal` (see
/// `lib.lua`'s `sealed`): the first 16 hex digits of SHA1("<seal>:<value>").
pub fn mark_tag(seal: &str, value: u64) -> String {
    let digest = sha1_smol::Sha1::from(format!("{seal}:{value}"))
        .digest()
        .to_string();
    digest[..16].to_string()
}

/// The value of a mark published as `"<value>:<tag>"`, if its tag is the
/// one `seal` gives: else it did not come from this server's clock.
pub fn unseal(payload: &[u8], seal: &str) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let (value, tag) = text.split_once(':')?;
    let value: u64 = value.parse().ok()?;
    // Its own text, digits only: "007" is not a mark of 7.
    (value.to_string() == text[..text.len() - tag.len() - 1] && mark_tag(seal, value) == tag)
        .then_some(value)
}

/// Part `i` of a push, sliced out of its frame.
fn part(raw: &Bytes, parts: &Parts, i: usize) -> Option<Bytes> {
    parts.get(i).map(|range| raw.slice(range))
}

/// Appends a command in RESP (an array of bulk strings).
fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// A server's error reply as the client library's error (so that
/// [`crate::connect::is_fatal`] knows it).
fn server_error(frame: &[u8]) -> RedisError {
    match redis::parse_redis_value(frame) {
        Ok(redis::Value::ServerError(err)) => err.into(),
        Ok(other) => RedisError::from((
            redis::ErrorKind::Client,
            "unexpected reply",
            format!("{other:?}"),
        )),
        Err(err) => err,
    }
}

fn protocol_error(err: resp::ProtocolError) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Parse,
        "not the Redis protocol",
        err.to_string(),
    ))
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
pub struct Publication {
    channel: Vec<u8>,
    routes: Vec<usize>,
}

impl Publication {
    /// Whether the push on `channel` by `route` is the first copy of its
    /// message bound for its route's stream.
    pub fn first_for_stream(&mut self, router: &Router, route: usize, channel: &[u8]) -> bool {
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

/// Whether any subscription of this process is up. A stretch of time in
/// which none is, after one had been, is a *gap*: messages published then
/// reached no worker here. Gaps are counted, timed and logged, here (race
/// strategy) or by the intake, from the marks (fenced: see
/// [`super::intake::Intake::take_holes`]).
#[derive(Debug, Default)]
pub struct Coverage {
    /// The intake counts the gaps (fenced strategy).
    intake_counts: bool,
    subscribed: AtomicUsize,
    /// When the last subscription of the process was lost, if none is up.
    uncovered_since: Mutex<Option<Instant>>,
}

impl Coverage {
    /// A coverage whose gaps the intake counts (fenced strategy).
    pub fn counted_by_intake() -> Self {
        Self {
            intake_counts: true,
            ..Self::default()
        }
    }

    pub fn up(&self, counters: &Counters) {
        if self.subscribed.fetch_add(1, Ordering::SeqCst) == 0
            && let Some(since) = self.uncovered_since.lock().unwrap().take()
            && !self.intake_counts
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
    pub fn down(&self, lost: bool) {
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
