//! The lock/ACK protocol step by step, and the library entry point, against a
//! real redis-server. Each step is driven by hand, so the races the protocol
//! must win are played out deterministically, without timing.

mod support;

use std::time::{Duration, Instant};

use optimus::bridge::delivery::{Claim, Delivery, Destination, Keys, Settled, Write};
use optimus::bridge::message::Incoming;
use optimus::{Bridge, BridgeConfig, OutputFormat, PublishConfig};
use support::RedisServer;
use tokio_util::sync::CancellationToken;

const STREAM: &str = "s:out";

async fn worker(server: &RedisServer, id: &str, lock_ttl: Duration) -> Delivery {
    let client = redis::Client::open(server.url()).unwrap();
    let conn = client.get_connection_manager().await.unwrap();
    Delivery::new(
        optimus::connect::Conn::Single(conn),
        Destination::new(STREAM, "s:in"),
        id.to_string(),
        lock_ttl,
        Duration::from_secs(60),
    )
}

/// A server of the test's own and two workers, `a` and `b`, on it.
async fn two_workers() -> (RedisServer, Delivery, Delivery) {
    let server = RedisServer::start();
    let a = worker(&server, "a", Duration::from_secs(30)).await;
    let b = worker(&server, "b", Duration::from_secs(30)).await;
    (server, a, b)
}

fn message(id: &str) -> Incoming {
    Incoming::new(
        id,
        format!(r#"{{"message_id":"{id}"}}"#).into_bytes(),
        Instant::now(),
    )
}

/// The lock of `id` disappears, as it does when its TTL runs out.
fn expire_lock(server: &RedisServer, id: &str) {
    let _: () = redis::cmd("DEL")
        .arg(Keys::new(STREAM).lock(id))
        .query(&mut server.conn())
        .unwrap();
}

#[tokio::test]
async fn only_one_worker_wins_a_message() {
    let (server, mut a, mut b) = two_workers().await;
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
    let (server, mut a, mut b) = two_workers().await;
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
    let (server, mut a, mut b) = two_workers().await;
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
async fn a_write_after_losing_the_lock_is_refused_and_can_be_claimed_again() {
    let (server, mut a, mut b) = two_workers().await;
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
    let (server, mut a, mut b) = two_workers().await;
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
    let client = redis::Client::open(server.url()).unwrap();
    let mut d = Delivery::new(
        optimus::connect::Conn::Single(client.get_connection_manager().await.unwrap()),
        Destination {
            format: OutputFormat::Flat,
            ..Destination::new(STREAM, "s:in")
        },
        "w".into(),
        Duration::from_secs(5),
        Duration::from_secs(60),
    );
    let m = Incoming::new(
        "f1",
        br#"{"message_id":"f1","user":"ann","n":3}"#.to_vec(),
        Instant::now(),
    );
    assert_eq!(d.claim(&[&m]).await.unwrap(), [Claim::Won]);
    assert_eq!(d.write(&[&m]).await.unwrap(), [Write::Written]);
    let entry = &server.stream_entries(STREAM)[0];
    assert_eq!(entry["user"], b"ann");
    assert_eq!(entry["n"], b"3");
    assert_eq!(entry["payload"], m.payload);
}

#[tokio::test]
async fn settle_claims_and_writes_in_one_step() {
    let (server, mut a, mut b) = two_workers().await;
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
    let mut a = worker(&server, "a", Duration::from_secs(30)).await;
    assert_eq!(
        a.settle(&[&message("1")]).await.unwrap(),
        [Settled::Written]
    );
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut server.conn())
        .unwrap();
    assert_eq!(
        a.settle(&[&message("2")]).await.unwrap(),
        [Settled::Written]
    );
    assert_eq!(server.xlen(STREAM), 2);
}

#[tokio::test]
async fn a_rejected_message_goes_to_the_dead_letter_stream_once() {
    let (server, mut a, mut b) = two_workers().await;
    let m = Incoming {
        rejected: Some("too big".into()),
        ..message("big")
    };
    assert_eq!(a.claim(&[&m]).await.unwrap(), [Claim::Won]);
    assert_eq!(a.write(&[&m]).await.unwrap(), [Write::Written]);
    assert_eq!(b.claim(&[&m]).await.unwrap(), [Claim::Acked]);
    assert_eq!(server.xlen(STREAM), 0);
    let dead = server.stream_entries("s:out:dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["reason"], b"too big");
    assert_eq!(dead[0]["channel"], b"s:in");
    assert_eq!(dead[0]["payload"], m.payload);
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

    let summary = optimus::publish::run(
        &PublishConfig::new(server.url(), "lib:in", 2000),
        CancellationToken::new(),
    )
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
    assert_eq!(totals.received, 4000);
    support::assert_exactly_once(&server.stream_entries("lib:out"), 0..2000);
}
