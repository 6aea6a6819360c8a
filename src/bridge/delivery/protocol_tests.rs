//! The delivery protocol step by step against a real redis-server: the
//! fenced writes of the default strategy, the clock, and the race strategy's
//! locks and ACKs. Each step is driven by hand, so the races the protocol must
//! win are played out deterministically, without timing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use optimus_testkit as support;
use support::RedisServer;

use super::fenced::{self, Takeover, WriteReply};
use super::members::{Beat, Holding, Place};
use super::race::{Claim, Racer, Settled, Write};
use super::{Destination, Keys, Lane, Message, Position, scripts};
use crate::connect::Conn;
use crate::{Bridge, BridgeConfig, OutputFormat, PublishConfig};
use tokio_util::sync::CancellationToken;

const STREAM: &str = "s:out";

fn lane() -> Arc<Lane> {
    Arc::new(Lane::new(Destination::new(STREAM, "s:in"), None))
}

async fn conn(server: &RedisServer) -> Conn {
    let client = redis::Client::open(server.url()).unwrap();
    Conn::Single(client.get_connection_manager().await.unwrap())
}

fn message(id: &str) -> Message {
    Message::with_id(
        id,
        format!(r#"{{"message_id":"{id}"}}"#).into_bytes(),
        lane(),
    )
}

/// Message `id` at position `mark:seq`.
fn at(id: &str, mark: u64, seq: u32) -> Message {
    let mut m = message(id);
    m.position = Some(Position { mark, seq });
    m
}

fn ids(server: &RedisServer) -> Vec<String> {
    server
        .stream_entries(STREAM)
        .iter()
        .map(|e| String::from_utf8(e["message_id"].clone()).unwrap())
        .collect()
}

async fn take(conn: &mut Conn, seen: Option<&str>, member: &str) -> (String, Option<Position>) {
    match fenced::take_over(conn, &lane(), seen, member)
        .await
        .unwrap()
    {
        Takeover::Taken { epoch, pos } => (epoch, pos),
        lost => panic!("{member} could not take the stream over: {lost:?}"),
    }
}

// ---- The fenced strategy ----

#[tokio::test]
async fn a_writer_writes_in_order_and_moves_the_record_past_what_it_wrote() {
    let server = RedisServer::start();
    let mut a = conn(&server).await;
    let (epoch, pos) = take(&mut a, None, "a").await;
    assert_eq!(pos, None, "a new stream has no position");
    let (m1, m2, m3) = (at("1", 100, 1), at("2", 100, 2), at("3", 200, 1));
    assert_eq!(
        fenced::write(&mut a, "a", &epoch, None, &[&m1, &m2])
            .await
            .unwrap(),
        WriteReply::Done
    );
    assert_eq!(
        fenced::write(&mut a, "a", &epoch, m2.position, &[&m3])
            .await
            .unwrap(),
        WriteReply::Done
    );
    assert_eq!(ids(&server), ["1", "2", "3"]);
    let pos: String = server.command(&["HGET", &Keys::new(STREAM).writer, "pos"]);
    assert_eq!(pos, "200:1");
}

#[tokio::test]
async fn a_write_sent_again_finds_the_record_moved_and_writes_nothing() {
    // A write whose answer was lost (a dropped connection) is sent again.
    let server = RedisServer::start();
    let mut a = conn(&server).await;
    let (epoch, _) = take(&mut a, None, "a").await;
    let (m1, m2) = (at("1", 100, 1), at("2", 100, 2));
    let batch = [&m1, &m2];
    assert_eq!(
        fenced::write(&mut a, "a", &epoch, None, &batch)
            .await
            .unwrap(),
        WriteReply::Done
    );
    assert_eq!(
        fenced::write(&mut a, "a", &epoch, None, &batch)
            .await
            .unwrap(),
        WriteReply::Elsewhere
    );
    assert_eq!(ids(&server), ["1", "2"]);
}

#[tokio::test]
async fn a_fenced_writer_writes_nothing_however_long_it_was_paused() {
    let server = RedisServer::start();
    let (mut a, mut b) = (conn(&server).await, conn(&server).await);
    let (epoch_a, _) = take(&mut a, None, "a").await;
    let (m1, m2, m3) = (at("1", 100, 1), at("2", 100, 2), at("3", 100, 3));
    assert_eq!(
        fenced::write(&mut a, "a", &epoch_a, None, &[&m1])
            .await
            .unwrap(),
        WriteReply::Done
    );
    // a stops (SIGSTOP, a long GC); b takes over from the record and writes on.
    let (epoch_b, pos) = take(&mut b, Some(&epoch_a), "b").await;
    assert!(epoch_b > epoch_a, "epochs grow: {epoch_b} after {epoch_a}");
    assert_eq!(pos, m1.position);
    assert_eq!(
        fenced::write(&mut b, "b", &epoch_b, pos, &[&m2])
            .await
            .unwrap(),
        WriteReply::Done
    );
    // a wakes up and goes on with what it held: nothing is written.
    let reply = fenced::write(&mut a, "a", &epoch_a, m1.position, &[&m2, &m3])
        .await
        .unwrap();
    assert_eq!(
        reply,
        WriteReply::Fenced { pos: m2.position },
        "the old writer learns where the stream is"
    );
    // And it cannot take over again with the epoch it knew.
    assert!(matches!(
        fenced::take_over(&mut a, &lane(), Some(&epoch_a), "a").await.unwrap(),
        Takeover::Lost { owner: Some(owner), .. } if owner == "b"
    ));
    assert_eq!(ids(&server), ["1", "2"]);
    let consumers: Vec<Vec<u8>> = server
        .stream_entries(STREAM)
        .iter()
        .map(|e| e["consumer_id"].clone())
        .collect();
    assert_eq!(consumers, [b"a".to_vec(), b"b".to_vec()]);
}

/// MIN_REPLICAS_ACKED's confirm.lua: `ask` notes a position the record has
/// reached (and the replication history, once), `set` moves `safe` there;
/// neither for another epoch or a position past the record; `set` again at
/// the same place is done already.
#[tokio::test]
async fn confirm_moves_safe_only_for_the_writer_and_never_past_the_record() {
    let server = RedisServer::start();
    let mut a = conn(&server).await;
    let (epoch, _) = take(&mut a, None, "a").await;
    let m1 = at("1", 100, 1);
    let written = fenced::write(&mut a, "a", &epoch, None, &[&m1]).await;
    assert_eq!(written.unwrap(), WriteReply::Done);
    let keys = lane().keys.clone();
    let history = "{s:out}:clock:history";
    let confirm = |epoch: &str, pos: &str, step: &str| -> u8 {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(scripts::CONFIRM)
            .arg(2)
            .arg(&keys.writer)
            .arg(history)
            .arg(epoch)
            .arg("a")
            .arg(pos)
            .arg(step);
        cmd.query(&mut server.conn()).unwrap()
    };
    let safe = || -> Option<String> { server.command(&["HGET", &keys.writer, "safe"]) };
    assert_eq!(confirm(&epoch, "100:2", "ask"), 0, "past the record");
    assert_eq!(confirm("other", "100:1", "ask"), 0, "another epoch");
    let noted: Option<String> = server.command(&["GET", history]);
    assert_eq!(noted, None, "nothing noted for a refused ask");
    assert_eq!(confirm(&epoch, "100:1", "ask"), 1);
    let noted: Option<String> = server.command(&["GET", history]);
    assert!(
        noted.is_some_and(|n| n.ends_with(":0:0")),
        "the first ask notes the history"
    );
    assert_eq!(safe(), None, "ask moves nothing");
    assert_eq!(confirm(&epoch, "100:2", "set"), 0, "past the record");
    assert_eq!(confirm("other", "100:1", "set"), 0, "another epoch");
    assert_eq!(confirm(&epoch, "100:1", "set"), 1);
    assert_eq!(safe().as_deref(), Some("100:1"));
    assert_eq!(confirm(&epoch, "100:1", "set"), 1, "there already: done");
    assert_eq!(safe().as_deref(), Some("100:1"));
}

/// One cycle of `member`, whole since `since` (`u64::MAX`: no
/// subscription), with at most three holders: since when it holds copies
/// afterwards (0: it waits).
async fn place(
    conn: &mut Conn,
    pool: &super::Pool,
    member: &str,
    since: u64,
    (held, may): (u64, Place),
) -> u64 {
    let beat = Beat {
        pool,
        member,
        strategy: super::Strategy::Fenced,
        seen: 0,
        since,
        routes: 0,
        holding: Holding {
            limit: 3,
            held,
            may,
            live_for: Duration::from_secs(10),
        },
    };
    beat.cycle(conn, &[], false).await.unwrap().held
}

/// Sets `member`'s entry as if it had last beaten `ago_ms` before the
/// server's time, with strategy `strategy` and, if given, `held`.
async fn entry(
    conn: &mut Conn,
    pool: &super::Pool,
    member: &str,
    ago_ms: u64,
    strategy: &str,
    held: Option<u64>,
) {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    let now = secs * 1000 + micros / 1000;
    let mut value = format!("{}:0:100:0:{strategy}:{now}", now - ago_ms);
    if let Some(held) = held {
        value += &format!(":{held}");
    }
    let _: () = redis::cmd("HSET")
        .arg(&pool.members)
        .arg(member)
        .arg(value)
        .query_async(conn)
        .await
        .unwrap();
}

/// STANDBYS=2: at most three processes hold copies. A fourth waits until a
/// place is free (a holder left, or fell silent); when one too many hold
/// (a holder back from a silence), the least complete gives its place back
/// (whole since the latest mark; of equals the last to come), unless it
/// writes. Members of another strategy (a handoff) take no place.
#[tokio::test]
async fn at_most_the_limit_hold_copies_and_the_least_complete_gives_its_place_back() {
    use Place::{Claim, Keep, Release};
    const NONE: u64 = u64::MAX;
    let server = RedisServer::start();
    let mut conn = conn(&server).await;
    let pool = super::Pool::in_db(STREAM, 0);
    // A race process, the pool being handed to fenced: every race process
    // reads, and takes none of the fenced places.
    let _: () = redis::cmd("SET")
        .arg(&pool.handoff)
        .arg("fenced")
        .query_async(&mut conn)
        .await
        .unwrap();
    entry(&mut conn, &pool, "racer", 0, "race", None).await;
    let mut held = std::collections::HashMap::new();
    for member in ["a", "b", "c"] {
        let since = place(&mut conn, &pool, member, NONE, (0, Claim)).await;
        assert!(since > 0, "{member} takes one of the three places");
        held.insert(member, since);
    }
    let d = place(&mut conn, &pool, "d", NONE, (0, Claim)).await;
    assert_eq!(d, 0, "three hold: d waits");
    // Holders keep their places, cycle after cycle.
    for (member, since) in [("a", 10), ("b", 20), ("c", 30)] {
        let again = place(&mut conn, &pool, member, since, (held[member], Release)).await;
        assert_eq!(again, held[member], "{member}");
    }
    // a leaves: d takes its place at once.
    let leaving = Beat {
        pool: &pool,
        member: "a",
        strategy: super::Strategy::Fenced,
        seen: 0,
        since: 10,
        routes: 0,
        holding: Holding::everyone(),
    };
    leaving.cycle(&mut conn, &[], true).await.unwrap();
    let d = place(&mut conn, &pool, "d", NONE, (0, Claim)).await;
    assert!(d > 0, "a left: d holds copies now");
    let d = place(&mut conn, &pool, "d", 40, (d, Release)).await;
    assert!(d > 0, "d, whole since 40, keeps its place");
    // c falls silent (its last beat 20 s before the others'): e takes its
    // place.
    entry(&mut conn, &pool, "c", 20_000, "fenced", Some(held["c"])).await;
    let e = place(&mut conn, &pool, "e", NONE, (0, Claim)).await;
    assert!(e > 0, "c is silent: e holds copies now");
    let e = place(&mut conn, &pool, "e", 50, (e, Release)).await;
    assert!(e > 0, "e, whole since 50, keeps its place");
    // c comes back whole since 30 (it lost nothing): four hold. e, the
    // least complete, gives its place back; writing, it would keep it.
    let c = place(&mut conn, &pool, "c", 30, (held["c"], Release)).await;
    assert_eq!(c, held["c"], "c is more complete than e");
    assert_eq!(
        place(&mut conn, &pool, "e", 50, (e, Keep)).await,
        e,
        "a writer keeps its place"
    );
    assert_eq!(
        place(&mut conn, &pool, "e", 50, (e, Release)).await,
        0,
        "e gives its place back"
    );
    assert_eq!(
        place(&mut conn, &pool, "e", NONE, (0, Claim)).await,
        0,
        "and waits"
    );
    // b lost its subscriptions (a hole: whole since nothing now) while f
    // took a place (b was silent): b, the least complete though it held
    // first, gives its place back.
    entry(&mut conn, &pool, "b", 20_000, "fenced", Some(held["b"])).await;
    let f = place(&mut conn, &pool, "f", NONE, (0, Claim)).await;
    assert!(f > 0, "b is silent: f holds copies now");
    let f = place(&mut conn, &pool, "f", 60, (f, Release)).await;
    assert!(f > 0, "f keeps its place");
    let b = place(&mut conn, &pool, "b", NONE, (held["b"], Release)).await;
    assert_eq!(b, 0, "b, with a hole, gives its place back to c, d and f");
}

/// The start script's mark on `server`, and the value the clock last leapt
/// to there ("<mark>:<seal>:<leapt to>").
fn start_mark(server: &RedisServer, clock: &str) -> (u64, u64) {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(scripts::START)
        .arg(1)
        .arg(clock)
        .arg("{s:out}:marks");
    let text: String = cmd.query(&mut server.conn()).unwrap();
    let parts: Vec<&str> = text.split(':').collect();
    (parts[0].parse().unwrap(), parts[2].parse().unwrap())
}

/// With MIN_REPLICAS_ACKED the writer notes the replication history in
/// `<clock>:history` (confirm.lua's `ask`); a pool without it keeps its
/// clock as it was.
#[test]
fn the_clock_leaps_once_on_a_promoted_replica_only_when_asked() {
    use super::reader::PROMOTION_LEAP;
    let (noted, plain) = ("{s:out}:clock", "{t:out}:clock");
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let info: String = primary.command(&["INFO", "replication"]);
    let replid = info
        .lines()
        .find_map(|l| l.strip_prefix("master_replid:"))
        .unwrap()
        .trim();
    let _: () = primary.command(&["SET", "{s:out}:clock:history", &format!("{replid}:0:0")]);
    let (first, leapt) = start_mark(&primary, noted);
    assert_eq!(leapt, 0, "a new clock has not leapt");
    let (plain_first, _) = start_mark(&primary, plain);
    support::wait_for(
        "the replica to hold the clocks",
        Duration::from_secs(20),
        || {
            let held: Option<String> = replica.command(&["GET", plain]);
            (held == Some(plain_first.to_string())).then_some(())
        },
        || replica.log(),
    );
    let _: () = replica.command(&["REPLICAOF", "NO", "ONE"]);
    let (promoted, leapt) = start_mark(&replica, noted);
    assert!(
        promoted >= first + PROMOTION_LEAP,
        "the promoted replica's clock leaps past what the old primary may still mark: {promoted} < {first} + leap"
    );
    assert_eq!(leapt, promoted);
    std::thread::sleep(Duration::from_millis(20));
    let (next, still) = start_mark(&replica, noted);
    assert!(
        next >= promoted + (20 << 10) && next < promoted + PROMOTION_LEAP,
        "once, and the clock keeps pace with the server's time after it"
    );
    assert_eq!(still, leapt);
    // The old primary goes on without a leap (its history did not change),
    // and so does a clock whose history nobody noted.
    let (old, none) = start_mark(&primary, noted);
    assert!(old > first && old < first + PROMOTION_LEAP);
    assert_eq!(none, 0);
    let (plain_promoted, none) = start_mark(&replica, plain);
    assert!(plain_promoted < plain_first + PROMOTION_LEAP);
    assert_eq!(none, 0);
    let untouched: Option<String> = replica.command(&["GET", "{t:out}:clock:history"]);
    assert_eq!(untouched, None);
}

#[tokio::test]
async fn the_clock_and_the_epochs_never_go_back_when_redis_loses_its_data() {
    // A restart without persistence, or an older snapshot restored: the
    // clock key and the record are gone or older.
    let server = RedisServer::start();
    let mut a = conn(&server).await;
    let clock = "{s:out}:clock";
    let mark = || start_mark(&server, clock).0;
    let first = mark();
    let second = mark();
    assert!(second > first);
    let (epoch, _) = take(&mut a, None, "a").await;
    let m1 = at("1", first, 1);
    assert_eq!(
        fenced::write(&mut a, "a", &epoch, None, &[&m1])
            .await
            .unwrap(),
        WriteReply::Done
    );
    let _: () = server.command(&["FLUSHALL"]);
    let third = mark();
    assert!(
        third > second,
        "the clock went back after the data was lost: {third} <= {second}"
    );
    // b finds no record and takes the stream; a, unaware, writes on.
    let mut b = conn(&server).await;
    let (again, pos) = take(&mut b, None, "b").await;
    assert_eq!(pos, None);
    assert!(again.parse::<u64>().unwrap() >= epoch.parse::<u64>().unwrap());
    let m2 = at("2", third, 1);
    assert!(
        matches!(
            fenced::write(&mut a, "a", &epoch, None, &[&m2])
                .await
                .unwrap(),
            WriteReply::Fenced { .. }
        ),
        "a writer from before the loss must be fenced"
    );
    assert_eq!(
        fenced::write(&mut b, "b", &again, None, &[&m2])
            .await
            .unwrap(),
        WriteReply::Done
    );
    assert_eq!(ids(&server), ["2"]);
    // A clock set ahead (an older snapshot of a faster clock) still moves on.
    let _: () = server.command(&["SET", clock, &(third + 1_000_000).to_string()]);
    assert_eq!(mark(), third + 1_000_001);
}

/// A stream deleted after its writer wrote to it: the next write makes it
/// anew and says so.
#[tokio::test]
async fn a_write_into_a_deleted_stream_says_it_was_missing() {
    let server = RedisServer::start();
    let mut a = conn(&server).await;
    let (epoch, _) = take(&mut a, None, "a").await;
    let (m1, m2, m3) = (at("1", 100, 1), at("2", 100, 2), at("3", 100, 3));
    let mut write = async |prev: Option<&Message>, m: &Message| {
        fenced::write(&mut a, "a", &epoch, prev.and_then(|p| p.position), &[m])
            .await
            .unwrap()
    };
    assert_eq!(
        write(None, &m1).await,
        WriteReply::Done,
        "a new stream is no missing one"
    );
    let _: () = server.command(&["DEL", STREAM]);
    assert_eq!(write(Some(&m1), &m2).await, WriteReply::DoneAnew);
    assert_eq!(write(Some(&m2), &m3).await, WriteReply::Done);
    assert_eq!(server.xlen(STREAM), 2);
}

#[tokio::test]
async fn a_refusal_stops_the_write_and_the_record_keeps_what_was_written() {
    let server = RedisServer::start();
    let mut a = conn(&server).await;
    let (epoch, _) = take(&mut a, None, "a").await;
    let (m1, m3) = (at("1", 100, 1), at("3", 100, 3));
    assert_eq!(
        fenced::write(&mut a, "a", &epoch, None, &[&m1])
            .await
            .unwrap(),
        WriteReply::Done
    );
    // The key is no longer a stream: the stream refuses what comes next.
    let _: () = server.command(&["DEL", STREAM]);
    let _: () = server.command(&["SET", STREAM, "x"]);
    match fenced::write(&mut a, "a", &epoch, m1.position, &[&m3])
        .await
        .unwrap()
    {
        WriteReply::Refused { n: 0, reason } => assert!(reason.contains("WRONGTYPE"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let pos: String = server.command(&["HGET", &Keys::new(STREAM).writer, "pos"]);
    assert_eq!(pos, "100:1", "nothing is recorded that was not written");
    // As a dead letter it goes through, and the record passes it.
    let mut dead = at("3", 100, 3);
    dead.rejected = Some("the stream refused it".into());
    assert_eq!(
        fenced::write(&mut a, "a", &epoch, m1.position, &[&dead])
            .await
            .unwrap(),
        WriteReply::Done
    );
    let letters = server.stream_entries("s:out:dead");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["message_id"], b"3");
}

#[tokio::test]
async fn fenced_writes_survive_a_script_flush() {
    let server = RedisServer::start();
    let mut a = conn(&server).await;
    let (epoch, _) = take(&mut a, None, "a").await;
    let _: () = server.command(&["SCRIPT", "FLUSH"]);
    let m1 = at("1", 100, 1);
    assert_eq!(
        fenced::write(&mut a, "a", &epoch, None, &[&m1])
            .await
            .unwrap(),
        WriteReply::Done
    );
    assert_eq!(ids(&server), ["1"]);
}

// ---- The race strategy (STRATEGY=race) ----

fn racer(conn: Conn, id: &str) -> Racer {
    Racer::new(
        conn,
        id.to_string(),
        Duration::from_secs(30),
        Duration::from_secs(60),
    )
}

/// A server of the test's own and two racing workers, `a` and `b`, on it.
async fn two_racers() -> (RedisServer, Racer, Racer) {
    let server = RedisServer::start();
    let a = racer(conn(&server).await, "a");
    let b = racer(conn(&server).await, "b");
    (server, a, b)
}

/// The lock of `id` disappears, as it does when its TTL runs out.
fn expire_lock(server: &RedisServer, id: &str) {
    let _: () = server.command(&["DEL", &Keys::new(STREAM).lock(id)]);
}

/// A mark of the server's time now (as the pool's clock makes them).
fn mark_now(server: &RedisServer) -> u64 {
    let (secs, micros): (u64, u64) = server.command(&["TIME"]);
    (secs * 1000 + micros / 1000) * 1024
}

/// The write scripts hold to a strategy handoff whatever the process
/// believes (one that has not heard of it yet): handed to race at H, a
/// fenced writer writes what came before H and nothing from it on.
#[tokio::test]
async fn a_fenced_writer_writes_nothing_past_the_handoff_mark() {
    let server = RedisServer::start();
    let h = mark_now(&server);
    let _: () = server.command(&["SET", &Keys::new(STREAM).handoff, &format!("race:{h}")]);
    let mut a = conn(&server).await;
    let (epoch, _) = take(&mut a, None, "a").await;
    let (m1, m2) = (at("1", h - 1, 1), at("2", h, 1));
    assert_eq!(
        fenced::write(&mut a, "a", &epoch, None, &[&m1])
            .await
            .unwrap(),
        WriteReply::Done
    );
    assert_eq!(
        fenced::write(&mut a, "a", &epoch, m1.position, &[&m2])
            .await
            .unwrap(),
        WriteReply::Elsewhere,
        "race's from H on"
    );
    // Handed to fenced from H on: what came before is race's.
    let _: () = server.command(&["SET", &Keys::new(STREAM).handoff, &format!("fenced:{h}")]);
    let m0 = at("0", h - 1, 2);
    assert_eq!(
        fenced::write(&mut a, "a", &epoch, m1.position, &[&m0])
            .await
            .unwrap(),
        WriteReply::Elsewhere,
        "race's before H"
    );
    assert_eq!(
        fenced::write(&mut a, "a", &epoch, m1.position, &[&m2])
            .await
            .unwrap(),
        WriteReply::Done
    );
    assert_eq!(ids(&server), ["1", "2"]);
}

/// The same for race: handed to race, its workers hold their copies until
/// H is taken, then drop what came before it (the fenced strategy's) and
/// write what came after; handed back to fenced, they drop what is past
/// the new mark.
#[tokio::test]
async fn race_workers_hold_to_the_handoff_mark() {
    let (server, mut a, _b) = two_racers().await;
    let handoff = Keys::new(STREAM).handoff;
    let h = mark_now(&server);
    let (before, after) = (at("before", h - 1, 1), at("after", h, 1));
    let _: () = server.command(&["SET", &handoff, "race"]);
    assert_eq!(
        a.claim(&[&before, &after]).await.unwrap(),
        [Claim::Held, Claim::Held],
        "no mark yet: held"
    );
    let _: () = server.command(&["SET", &handoff, &format!("race:{h}")]);
    assert_eq!(
        a.claim(&[&before, &after]).await.unwrap(),
        [Claim::Acked, Claim::Won]
    );
    assert_eq!(a.write(&[&after]).await.unwrap(), [Write::Written]);
    let h2 = mark_now(&server) + 1024;
    let _: () = server.command(&["SET", &handoff, &format!("fenced:{h2}")]);
    let (last, late) = (at("last", h2 - 1, 1), at("late", h2, 1));
    assert_eq!(
        a.settle(&[&last, &late]).await.unwrap(),
        [Settled::Written, Settled::Acked]
    );
    // Handed back before fenced took its mark: fenced's before H (the
    // first handoff), race's from H on.
    let _: () = server.command(&["SET", &handoff, &format!("fenced::{h}")]);
    let (older, newer) = (at("older", h - 2, 1), at("newer", h2 + 1, 1));
    assert_eq!(
        a.settle(&[&older, &newer]).await.unwrap(),
        [Settled::Acked, Settled::Written]
    );
    assert_eq!(ids(&server), ["after", "last", "newer"]);
}

#[tokio::test]
async fn only_one_worker_wins_a_message() {
    let (server, mut a, mut b) = two_racers().await;
    let m = message("m1");

    assert_eq!(a.claim(&[&m]).await.unwrap(), [Claim::Won]);
    assert_eq!(b.claim(&[&m]).await.unwrap(), [Claim::Held]);
    assert_eq!(a.write(&[&m]).await.unwrap(), [Write::Written]);
    // Once written, everyone else sees the ACK and drops the copy.
    assert_eq!(b.claim(&[&m]).await.unwrap(), [Claim::Acked]);
    assert_eq!(server.xlen(STREAM), 1);
}

#[tokio::test]
async fn a_dead_holders_message_is_taken_over_once_its_lock_expires() {
    let (server, mut a, mut b) = two_racers().await;
    let m = message("m1");

    assert_eq!(a.claim(&[&m]).await.unwrap(), [Claim::Won]);
    assert_eq!(b.claim(&[&m]).await.unwrap(), [Claim::Held]);
    // a dies before writing; its lock runs out without an ACK.
    expire_lock(&server, "m1");
    assert_eq!(b.claim(&[&m]).await.unwrap(), [Claim::Won]);
    assert_eq!(b.write(&[&m]).await.unwrap(), [Write::Written]);
    let entries = server.stream_entries(STREAM);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["consumer_id"], b"b");
}

#[tokio::test]
async fn a_worker_paused_past_its_lock_cannot_write_twice() {
    let (server, mut a, mut b) = two_racers().await;
    let m = message("m1");

    assert_eq!(a.claim(&[&m]).await.unwrap(), [Claim::Won]);
    // a is paused; its lock expires; b takes over and writes.
    expire_lock(&server, "m1");
    assert_eq!(b.claim(&[&m]).await.unwrap(), [Claim::Won]);
    assert_eq!(b.write(&[&m]).await.unwrap(), [Write::Written]);
    // a wakes up and goes on with its write: refused, the lock is not its own.
    assert_eq!(a.write(&[&m]).await.unwrap(), [Write::LockLost]);
    // Claiming again, it finds the message written.
    assert_eq!(a.claim(&[&m]).await.unwrap(), [Claim::Acked]);
    assert_eq!(server.xlen(STREAM), 1);
}

#[tokio::test]
async fn a_racer_paused_past_the_ack_ttl_drops_its_copies_unwritten() {
    // The ACK of a message is gone once ACK_TTL passed: a copy published
    // longer ago than ACK_TTL - LOCK_TTL (by the server's clock, from its
    // position's mark) is never written, however it reached the worker.
    let (server, mut a, _) = two_racers().await;
    let now_ms = |server: &RedisServer| -> u64 {
        let t: Vec<u64> = server.command(&["TIME"]);
        t[0] * 1000 + t[1] / 1000
    };
    let old = at("old", (now_ms(&server) - 31_000) << 10, 1);
    let fresh = at("fresh", (now_ms(&server) - 1_000) << 10, 1);
    assert_eq!(
        a.settle(&[&old, &fresh]).await.unwrap(),
        [Settled::TooOld, Settled::Written]
    );
    assert_eq!(ids(&server), ["fresh"]);
}

#[tokio::test]
async fn a_write_after_losing_the_lock_is_refused_and_can_be_claimed_again() {
    let (server, mut a, mut b) = two_racers().await;
    let m = message("m1");

    assert_eq!(a.claim(&[&m]).await.unwrap(), [Claim::Won]);
    expire_lock(&server, "m1");
    assert_eq!(b.claim(&[&m]).await.unwrap(), [Claim::Won]);
    // b holds the lock but has not written yet: a may not write.
    assert_eq!(a.write(&[&m]).await.unwrap(), [Write::LockLost]);
    assert_eq!(server.xlen(STREAM), 0);
    assert_eq!(b.write(&[&m]).await.unwrap(), [Write::Written]);
    assert_eq!(server.xlen(STREAM), 1);
}

#[tokio::test]
async fn a_batch_mixes_outcomes_in_order() {
    let (server, mut a, mut b) = two_racers().await;
    let (m1, m2, m3) = (message("1"), message("2"), message("3"));

    assert_eq!(
        b.claim(&[&m2, &m3]).await.unwrap(),
        [Claim::Won, Claim::Won]
    );
    assert_eq!(b.write(&[&m3]).await.unwrap(), [Write::Written]);
    assert_eq!(
        a.claim(&[&m1, &m2, &m3]).await.unwrap(),
        [Claim::Won, Claim::Held, Claim::Acked]
    );
    // A claim retried after a failed write keeps the lock it already holds.
    assert_eq!(a.claim(&[&m1]).await.unwrap(), [Claim::Won]);
    assert_eq!(a.write(&[&m1]).await.unwrap(), [Write::Written]);
    assert_eq!(server.xlen(STREAM), 2);
}

#[tokio::test]
async fn flat_format_copies_json_fields_into_the_entry() {
    let server = RedisServer::start();
    let flat = Arc::new(Lane::new(
        Destination {
            format: OutputFormat::Flat,
            ..Destination::new(STREAM, "s:in")
        },
        None,
    ));
    let mut d = racer(conn(&server).await, "w");
    let m = Message::with_id(
        "f1",
        br#"{"message_id":"f1","user":"ann","n":3}"#.to_vec(),
        flat,
    );
    assert_eq!(d.claim(&[&m]).await.unwrap(), [Claim::Won]);
    assert_eq!(d.write(&[&m]).await.unwrap(), [Write::Written]);
    let entry = &server.stream_entries(STREAM)[0];
    assert_eq!(entry["user"], b"ann");
    assert_eq!(entry["n"], b"3");
    assert_eq!(entry["payload"], m.payload.as_ref());
}

#[tokio::test]
async fn settle_claims_and_writes_in_one_step() {
    let (server, mut a, mut b) = two_racers().await;
    let (m1, m2, m3) = (message("1"), message("2"), message("3"));
    assert_eq!(b.claim(&[&m2]).await.unwrap(), [Claim::Won]);
    assert_eq!(
        a.settle(&[&m1, &m2]).await.unwrap(),
        [Settled::Written, Settled::Held]
    );
    assert_eq!(
        b.settle(&[&m2, &m1, &m3]).await.unwrap(),
        [Settled::Written, Settled::Acked, Settled::Written]
    );
    assert_eq!(
        a.settle(&[&m2, &m3]).await.unwrap(),
        [Settled::Acked, Settled::Acked]
    );
    assert_eq!(server.xlen(STREAM), 3);
}

#[tokio::test]
async fn scripts_are_loaded_again_after_a_script_flush() {
    let server = RedisServer::start();
    let mut a = racer(conn(&server).await, "a");
    assert_eq!(
        a.settle(&[&message("1")]).await.unwrap(),
        [Settled::Written]
    );
    let _: () = server.command(&["SCRIPT", "FLUSH"]);
    assert_eq!(
        a.settle(&[&message("2")]).await.unwrap(),
        [Settled::Written]
    );
    assert_eq!(server.xlen(STREAM), 2);
}

#[tokio::test]
async fn a_rejected_message_goes_to_the_dead_letter_stream_once() {
    let (server, mut a, mut b) = two_racers().await;
    let mut m = message("big");
    m.rejected = Some("too big".into());
    assert_eq!(a.claim(&[&m]).await.unwrap(), [Claim::Won]);
    assert_eq!(a.write(&[&m]).await.unwrap(), [Write::Written]);
    assert_eq!(b.claim(&[&m]).await.unwrap(), [Claim::Acked]);
    assert_eq!(server.xlen(STREAM), 0);
    let dead = server.stream_entries("s:out:dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["reason"], b"too big");
    assert_eq!(dead[0]["channel"], b"s:in");
    assert_eq!(dead[0]["payload"], m.payload.as_ref());
}

/// A service embeds the bridge and the publisher through the library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_runs_a_bridge_until_cancelled() {
    let server = RedisServer::start();
    let bridge = Bridge::new(
        BridgeConfig::new(server.url())
            .consumers(2)
            .input_channel("lib:in")
            .output_stream("lib:out"),
    )
    .unwrap();
    let counters = bridge.counters();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(bridge.run(shutdown.clone()));

    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Wait until both workers are subscribed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let subscribers: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("lib:in")
            .query_async(&mut conn)
            .await
            .unwrap();
        if subscribers[0].1 == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "workers never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The publisher's stream is the bridge's: its fast path asks for a
    // bridge of that stream.
    let mut publishing = PublishConfig::new(server.url(), "lib:in", 2000);
    publishing.stream = "lib:out".into();
    let summary = crate::publish::run(&publishing, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(summary.published, 2000);
    assert_eq!(summary.no_subscriber, 0);

    let deadline = Instant::now() + Duration::from_secs(30);
    while counters.snapshot().written < 2000 || counters.snapshot().pending > 0 {
        assert!(
            Instant::now() < deadline,
            "bridge stalled at {:?}",
            counters.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let totals = running.await.unwrap().unwrap();
    assert_eq!(totals.written, 2000);
    // Each message counted once per process, however many readers got it.
    assert_eq!(totals.received, 2000);
    support::assert_exactly_once(&server.stream_entries("lib:out"), 0..2000);
}
