//! End to end: the `optimus` binary against a real redis-server of the test's own.

mod support;

use std::time::Duration;

use support::{OptimusProcess, RedisServer, assert_exactly_once};

const STREAM: &str = "messages:processed";

/// `optimus publish --count n` as fast as it goes; returns its summary line.
fn publish(server: &RedisServer, count: u64) -> support::Fields {
    support::publish(server, &["--count", &count.to_string()])
}

/// Waits until the stream holds `n` entries and every copy in the given
/// processes is settled (pending=0), then returns the entries.
fn settled_entries(
    server: &RedisServer,
    processes: &[&OptimusProcess],
    n: usize,
) -> Vec<std::collections::BTreeMap<String, Vec<u8>>> {
    support::wait_for(
        &format!("{n} entries in {STREAM}"),
        Duration::from_secs(30),
        || (server.xlen(STREAM) >= n).then_some(()),
        || processes.iter().map(|p| p.describe()).collect(),
    );
    for p in processes.iter() {
        p.wait_settled(Duration::from_secs(20));
    }
    server.stream_entries(STREAM)
}

#[test]
fn three_workers_write_ten_thousand_messages_exactly_once() {
    let server = RedisServer::start();
    let mut consume = OptimusProcess::consume(&server, &[("CONSUMERS_COUNT", "3")]);
    consume.wait_consumers(3);
    let presence = server.keys("consumer:ids:*");
    assert_eq!(presence.len(), 3, "presence keys: {presence:?}");

    let summary = publish(&server, 10_000);
    assert_eq!(summary.num("published"), 10_000);
    assert_eq!(
        summary.num("no_subscriber"),
        0,
        "every PUBLISH reached the workers"
    );

    let entries = settled_entries(&server, &[&consume], 10_000);
    assert_exactly_once(&entries, 0..10_000);
    for entry in &entries {
        let consumer = String::from_utf8_lossy(&entry["consumer_id"]);
        assert!(
            presence.iter().any(|k| k.ends_with(&*consumer)),
            "consumer_id {consumer} is one of the workers {presence:?}"
        );
    }

    // The monitoring line carries every field, and its counts add up: each of
    // the 3 workers received each message once; each was written once, and the
    // other two copies were skipped.
    let line = consume.wait_for_line("monitor ", Duration::from_secs(10), |f| {
        f.num("received") == 30_000 && f.num("duplicates_skipped") == 20_000
    });
    let keys: Vec<&str> = line.values.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "consumers",
            "dead",
            "duplicates_skipped",
            "errors",
            "expired",
            "gap_ms",
            "gaps",
            "overflow",
            "pending",
            "rate",
            "received",
            "reconnects",
            "taken_over",
            "written"
        ],
        "fields of {:?}",
        line.line
    );
    assert_eq!(line.num("written"), 10_000);
    assert_eq!(line.num("consumers"), 3);
    assert!(line.line.starts_with("monitor consumers=3 "));
    assert!(
        !consume.stderr().contains("monitor consumers="),
        "monitoring goes to stdout, not stderr"
    );
}

#[test]
fn two_processes_side_by_side_write_exactly_once() {
    let server = RedisServer::start();
    let mut a = OptimusProcess::consume(&server, &[("CONSUMERS_COUNT", "2")]);
    let mut b = OptimusProcess::consume(&server, &[("CONSUMERS_COUNT", "2")]);
    a.wait_consumers(4);
    b.wait_consumers(4);

    publish(&server, 10_000);
    let entries = settled_entries(&server, &[&a, &b], 10_000);
    assert_exactly_once(&entries, 0..10_000);

    let written_a = a
        .wait_for_line("monitor ", Duration::from_secs(5), |_| true)
        .num("written");
    let written_b = b
        .wait_for_line("monitor ", Duration::from_secs(5), |_| true)
        .num("written");
    assert_eq!(
        written_a + written_b,
        10_000,
        "the processes' writes add up to the stream"
    );
}

#[test]
fn messages_without_an_id_are_bridged_byte_for_byte() {
    let server = RedisServer::start();
    let consume = OptimusProcess::consume(&server, &[("CONSUMERS_COUNT", "2")]);
    consume.wait_consumers(2);

    // Plain text through the real redis-cli, twice the same, then JSON without
    // the id field, then bytes that are not UTF-8.
    for payload in ["hello", "hello", r#"{"kind":"no id"}"#] {
        let status = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &server.port.to_string(),
                "PUBLISH",
                "messages:published",
                payload,
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success());
    }
    let binary: Vec<u8> = vec![0xff, 0x00, 0xfe, b'\n', 0x80];
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("messages:published")
        .arg(&binary)
        .query(&mut server.conn())
        .unwrap();
    assert_eq!(receivers, 2);

    let entries = settled_entries(&server, &[&consume], 4);
    assert_eq!(
        entries.len(),
        4,
        "no more than the four messages: {entries:?}"
    );
    let payloads: Vec<&[u8]> = entries.iter().map(|e| e["payload"].as_slice()).collect();
    assert_eq!(
        payloads,
        [&b"hello"[..], b"hello", br#"{"kind":"no id"}"#, &binary],
        "payloads in publish order, unchanged"
    );
    let ids: Vec<String> = entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e["message_id"]).to_string())
        .collect();
    assert_ne!(
        ids[0], ids[1],
        "two identical id-less payloads are two messages"
    );
    assert!(
        ids.iter().all(|id| id.starts_with("h:")),
        "derived ids: {ids:?}"
    );
}

#[test]
fn sigterm_finishes_what_was_received_and_removes_presence() {
    let server = RedisServer::start();
    let mut consume = OptimusProcess::consume(&server, &[("CONSUMERS_COUNT", "3")]);
    consume.wait_consumers(3);

    // A steady stream of messages, and SIGTERM while it flows.
    let url = server.url();
    let mut publisher = OptimusProcess::spawn(
        &["publish", "--rate", "5000", "--duration", "4"],
        &[("REDIS_URL", url.as_str())],
    );
    support::wait_for(
        "some messages in the stream",
        Duration::from_secs(20),
        || (server.xlen(STREAM) > 2000).then_some(()),
        || consume.describe(),
    );
    consume.signal("TERM");
    let status = consume.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", consume.describe());
    assert!(
        server.keys("consumer:ids:*").is_empty(),
        "presence keys left: {:?}",
        server.keys("consumer:ids*")
    );
    let last = consume.wait_for_line("monitor ", Duration::from_secs(1), |_| true);
    assert_eq!(
        last.num("pending"),
        0,
        "nothing left unsettled: {}",
        last.line
    );
    assert_eq!(last.num("consumers"), 0, "{}", last.line);

    // What the workers received before they stopped, they wrote; what was
    // published after, reached no subscriber and the publisher's fast path
    // wrote it. Together: every message, once.
    assert!(
        publisher.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        publisher.describe()
    );
    let summary = publisher.wait_for_line("publish done", Duration::from_secs(1), |_| true);
    let published = summary.num("published");
    let entries = server.stream_entries(STREAM);
    assert_exactly_once(&entries, 0..published);
    assert!(summary.num("stored_directly") > 0, "{}", summary.line);
    assert_eq!(
        last.num("written") + summary.num("stored_directly"),
        published,
        "workers wrote {}, the publisher {}",
        last.line,
        summary.line
    );
}

#[test]
fn a_killed_process_drops_out_of_the_consumer_count() {
    let server = RedisServer::start();
    let survivor =
        OptimusProcess::consume(&server, &[("CONSUMERS_COUNT", "1"), ("PRESENCE_TTL", "1")]);
    let doomed =
        OptimusProcess::consume(&server, &[("CONSUMERS_COUNT", "2"), ("PRESENCE_TTL", "1")]);
    survivor.wait_consumers(3);
    doomed.signal("KILL");
    // Within one PRESENCE_TTL its two workers are gone from the count and keys.
    survivor.wait_consumers(1);
    assert_eq!(server.keys("consumer:ids:*").len(), 1);
}

/// Shutdown waits for copies another worker holds (up to LOCK_TTL); a second
/// signal does not wait.
#[test]
fn a_second_signal_exits_at_once() {
    let server = RedisServer::start();
    let mut consume = OptimusProcess::consume(
        &server,
        &[
            ("CONSUMERS_COUNT", "1"),
            // The race strategy makes a copy easy to hold: a foreign lock.
            ("STRATEGY", "race"),
            ("LOCK_TTL", "60"),
            ("PENDING_RETENTION", "60"),
            ("ACK_TTL", "200"),
        ],
    );
    consume.wait_consumers(1);
    // A worker elsewhere holds the lock of message m1 and never writes it.
    let _: () = redis::cmd("SET")
        .arg("{messages:processed}:lock:m1")
        .arg("ghost")
        .arg("EX")
        .arg(300)
        .query(&mut server.conn())
        .unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg("messages:published")
        .arg(r#"{"message_id":"m1"}"#)
        .query(&mut server.conn())
        .unwrap();
    consume.wait_for_line("monitor ", Duration::from_secs(10), |f| {
        f.num("pending") == 1
    });

    consume.signal("TERM");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        consume.try_exit().is_none(),
        "the first signal waits for the held copy\n{}",
        consume.describe()
    );
    consume.signal("TERM");
    let status = consume.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "{}", consume.describe());
}

/// A payload over MAX_PAYLOAD_BYTES goes to the dead-letter stream, once,
/// with the reason and the channel; the workers go on.
#[test]
fn an_oversized_message_is_dead_lettered_once_and_the_workers_go_on() {
    let server = RedisServer::start();
    let consume = OptimusProcess::consume(
        &server,
        &[("CONSUMERS_COUNT", "3"), ("MAX_PAYLOAD_BYTES", "100")],
    );
    consume.wait_consumers(3);
    let big = format!(r#"{{"message_id":"big-1","pad":"{}"}}"#, "x".repeat(200));
    for payload in [big.as_str(), r#"{"message_id":"small-1"}"#] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("messages:published")
            .arg(payload)
            .query(&mut server.conn())
            .unwrap();
    }
    let entries = settled_entries(&server, &[&consume], 1);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["message_id"], b"small-1");

    let dead = server.stream_entries("messages:processed:dead");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = String::from_utf8_lossy(&dead[0]["reason"]);
    assert!(reason.contains("MAX_PAYLOAD_BYTES"), "{reason}");
    assert_eq!(dead[0]["channel"], b"messages:published");
    assert_eq!(dead[0]["payload"], big.as_bytes());
    let line = consume.wait_settled(Duration::from_secs(10));
    assert_eq!(line.num("dead"), 1, "{}", line.line);
    assert!(
        consume.stderr().contains("dead-lettered"),
        "{}",
        consume.describe()
    );
}

/// Calls of one command since the last `CONFIG RESETSTAT` (from INFO
/// commandstats; commands run inside scripts count too).
fn calls(server: &RedisServer, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut server.conn())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map(|n| n.parse().unwrap())
        .unwrap_or(0)
}

/// Redis `SET` calls for bridging `n` messages with 4 workers (2 processes)
/// of `strategy`.
fn sets_for(strategy: &str, n: u64) -> u64 {
    let server = RedisServer::start();
    let env = [("STRATEGY", strategy)];
    let a = OptimusProcess::consume(&server, &env);
    let b = OptimusProcess::consume(&server, &env);
    a.wait_consumers(4);
    b.wait_consumers(4);
    // A few cycles, so that every worker has the same view of the members.
    std::thread::sleep(Duration::from_millis(500));
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut server.conn())
        .unwrap();
    let summary = publish(&server, n);
    let entries = settled_entries(&server, &[&a, &b], n as usize);
    assert_eq!(summary.num("published"), n);
    assert_exactly_once(&entries, 0..n);
    assert_eq!(calls(&server, "xadd"), n, "one XADD per message");
    calls(&server, "set")
}

/// The point of the partitioned strategy: a message costs its owner one SET
/// (the ACK) and one XADD, and the other workers drop their copies without a
/// command of their own (a takeover, rare here, would add a SET). The race
/// strategy spends a lock per worker per message on top of the ACK.
#[test]
fn non_owners_drop_their_copies_without_asking_redis() {
    let n = 20_000;
    let partitioned = sets_for("partitioned", n);
    assert!(
        partitioned < n + n / 10,
        "partitioned: {partitioned} SETs for {n} messages, expected about one each"
    );
    let race = sets_for("race", n);
    assert!(
        race >= 2 * n,
        "race: {race} SETs for {n} messages, expected a lock and an ACK each at least"
    );
}
