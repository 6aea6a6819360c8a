//! End to end: the `optimus` binary against a real redis-server of the test's own.

use crate::support;

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
    // The process writes (its workers share its subscriptions): entries name
    // the process, whose name starts each of its workers' presence keys.
    for entry in &entries {
        let consumer = String::from_utf8_lossy(&entry["consumer_id"]);
        assert!(
            presence
                .iter()
                .all(|k| k.starts_with(&format!("consumer:ids:{consumer}-"))),
            "consumer_id {consumer} is the process of the workers {presence:?}"
        );
    }

    // The monitoring line carries every field, and its counts add up: the
    // process received each message once (however many of its subscriptions
    // got it) and wrote each once.
    let line = consume.wait_for_line("monitor ", Duration::from_secs(10), |f| {
        f.num("received") == 10_000 && f.num("written") == 10_000
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
            "redis",
            "refused",
            "reused_ids",
            "taken_over",
            "written"
        ],
        "fields of {:?}",
        line.line
    );
    assert_eq!(line.num("written"), 10_000);
    assert_eq!(line.num("consumers"), 3);
    assert_eq!(line.values["redis"], "connected");
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
        ids.iter().all(|id| id.starts_with("p:")),
        "ids made from the messages' positions: {ids:?}"
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

/// What bridging `n` messages with 4 workers (2 processes) of `strategy`
/// cost Redis: its `SET` calls, the protocol's keys left, and the bytes
/// (MEMORY USAGE) of every key but the stream.
fn sets_for(strategy: &str, n: u64) -> (u64, Vec<String>, u64) {
    let server = RedisServer::start();
    let env = [("STRATEGY", strategy)];
    let a = OptimusProcess::consume(&server, &env);
    let b = OptimusProcess::consume(&server, &env);
    a.wait_consumers(4);
    b.wait_consumers(4);
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut server.conn())
        .unwrap();
    let summary = publish(&server, n);
    let entries = settled_entries(&server, &[&a, &b], n as usize);
    assert_eq!(summary.num("published"), n);
    assert_exactly_once(&entries, 0..n);
    assert_eq!(calls(&server, "xadd"), n, "one XADD per message");
    let mut keys = server.keys("{messages:processed}:*");
    keys.sort();
    let mut conn = server.conn();
    let beside: u64 = server
        .keys("*")
        .iter()
        .filter(|k| k.as_str() != STREAM)
        .map(|k| {
            redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(k)
                .arg("SAMPLES")
                .arg(0)
                .query::<Option<u64>>(&mut conn)
                .unwrap()
                .unwrap_or(0)
        })
        .sum();
    (calls(&server, "set"), keys, beside)
}

/// The point of the fenced strategy: a message costs one XADD in its
/// writer's batch, the other processes drop their copies without a command
/// of their own, and nothing is kept per message (the keys left are the
/// pool's clock and members and the stream's writer record; every key but
/// the stream, presence and control keys too, takes at most 16 bytes a
/// message over 100,000). The race
/// strategy spends a lock per worker per message, and an ACK key each.
#[test]
fn no_key_and_no_command_per_message_but_its_xadd() {
    let n = 100_000;
    let (sets, keys, bytes) = sets_for("fenced", n);
    assert!(
        sets < n / 100,
        "fenced: {sets} SETs for {n} messages, expected only the clock's (one a cycle)"
    );
    assert_eq!(
        keys,
        [
            "{messages:processed}:clock",
            "{messages:processed}:members",
            "{messages:processed}:writer"
        ]
    );
    assert!(
        bytes <= 16 * n,
        "fenced: {bytes} bytes beside the stream for {n} messages, more than 16 a message"
    );
    let (sets, keys, bytes) = sets_for("race", n);
    assert!(
        bytes > 16 * n,
        "race: {bytes} bytes, an ACK key per message"
    );
    assert!(
        sets >= 2 * n,
        "race: {sets} SETs for {n} messages, expected a lock and an ACK each at least"
    );
    assert!(keys.len() as u64 >= n, "race: an ACK key per message");
}

/// Publishes raw payloads on the input channel; checks each reached `n`
/// subscribers.
fn publish_raw(server: &RedisServer, payloads: &[&str], n: i64) {
    let mut conn = server.conn();
    for payload in payloads {
        let receivers: i64 = redis::cmd("PUBLISH")
            .arg("messages:published")
            .arg(*payload)
            .query(&mut conn)
            .unwrap();
        assert_eq!(receivers, n, "{payload} reached every worker");
    }
}

/// Numeric ids are known by their exact text: pairs that a float or a
/// 64-bit integer would merge are distinct messages, with either strategy.
#[test]
fn numeric_ids_that_round_alike_are_distinct_messages() {
    for strategy in ["fenced", "race"] {
        let server = RedisServer::start();
        let consume =
            OptimusProcess::consume(&server, &[("CONSUMERS_COUNT", "2"), ("STRATEGY", strategy)]);
        consume.wait_consumers(2);
        let ids = [
            "18446744073709551616",
            "18446744073709551617",
            "12345678901234567890123",
            "12345678901234567890124",
            "-9223372036854775809",
            "-9223372036854775810",
            "0.1",
            "0.10000000000000001",
            "100",
            "1e2",
            "100.0",
            "0",
            "-0",
            "0.0",
        ];
        let payloads: Vec<String> = ids
            .iter()
            .map(|id| format!(r#"{{"message_id": {id}}}"#))
            .collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        publish_raw(&server, &refs, 2);
        let entries = settled_entries(&server, &[&consume], ids.len());
        let mut written: Vec<String> = entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e["message_id"]).to_string())
            .collect();
        written.sort();
        let mut expected = ids.to_vec();
        expected.sort();
        assert_eq!(written, expected, "{strategy}: every id as written, once");
        let line = consume.wait_settled(Duration::from_secs(10));
        assert_eq!(line.num("reused_ids"), 0, "{}", line.line);
    }
}

/// A publisher that reuses an id for other bytes: the second message is
/// skipped (one entry per id), and that is counted and said, unlike a plain
/// re-send of the same bytes.
#[test]
fn a_reused_id_with_other_bytes_is_counted_and_said() {
    for strategy in ["fenced", "race"] {
        let server = RedisServer::start();
        let consume =
            OptimusProcess::consume(&server, &[("CONSUMERS_COUNT", "2"), ("STRATEGY", strategy)]);
        consume.wait_consumers(2);
        let first = r#"{"message_id":"order-7","total":10}"#;
        publish_raw(
            &server,
            &[first, first, r#"{"message_id":"order-7","total":99}"#],
            2,
        );
        publish_raw(&server, &[r#"{"message_id":"after"}"#], 2);
        let entries = settled_entries(&server, &[&consume], 2);
        assert_eq!(entries.len(), 2, "{strategy}: {entries:?}");
        assert_eq!(entries[0]["payload"], first.as_bytes());
        let line = consume.wait_settled(Duration::from_secs(10));
        assert_eq!(
            line.num("reused_ids"),
            1,
            "{strategy}: only the other bytes count: {}",
            line.line
        );
        assert!(
            consume
                .stderr()
                .contains("already written with other bytes"),
            "{}",
            consume.describe()
        );
    }
}

/// The output stream's key replaced by a string mid-run: what the stream
/// refuses (WRONGTYPE) goes to the dead-letter stream with Redis's reason,
/// nothing is recorded as written, and the workers go on once the stream is
/// back. Both strategies.
#[test]
fn messages_the_stream_refuses_are_dead_lettered_with_the_reason() {
    for strategy in ["fenced", "race"] {
        let server = RedisServer::start();
        let consume =
            OptimusProcess::consume(&server, &[("CONSUMERS_COUNT", "2"), ("STRATEGY", strategy)]);
        consume.wait_consumers(2);
        publish_raw(&server, &[r#"{"message_id":"before"}"#], 2);
        settled_entries(&server, &[&consume], 1);
        let _: () = server.command(&["DEL", STREAM]);
        let _: () = server.command(&["SET", STREAM, "not a stream"]);
        let refused: Vec<String> = (0..20)
            .map(|i| format!(r#"{{"message_id":"refused-{i}"}}"#))
            .collect();
        publish_raw(
            &server,
            &refused.iter().map(String::as_str).collect::<Vec<_>>(),
            2,
        );
        support::wait_for(
            "20 dead letters",
            Duration::from_secs(20),
            || (server.xlen("messages:processed:dead") >= 20).then_some(()),
            || consume.describe(),
        );
        let line = consume.wait_settled(Duration::from_secs(20));
        let dead = server.stream_entries("messages:processed:dead");
        let mut payloads: Vec<&[u8]> = dead.iter().map(|e| e["payload"].as_slice()).collect();
        payloads.sort();
        let mut expected: Vec<&[u8]> = refused.iter().map(|p| p.as_bytes()).collect();
        expected.sort();
        assert_eq!(payloads, expected, "{strategy}: each once");
        for entry in &dead {
            let reason = String::from_utf8_lossy(&entry["reason"]);
            assert!(reason.contains("WRONGTYPE"), "{strategy}: {reason}");
        }
        let acks = server.keys("{messages:processed}:ack:*").len();
        if strategy == "race" {
            assert_eq!(
                acks, 21,
                "race: the ACKs of the dead letters (written there) and of `before`"
            );
        } else {
            assert_eq!(acks, 0, "{strategy}: no key per message");
        }
        assert_eq!(line.num("dead"), 20, "{strategy}: {}", line.line);
        assert_eq!(line.num("refused"), 0, "{strategy}: {}", line.line);

        // The stream comes back: the next message is written as usual.
        let _: () = server.command(&["DEL", STREAM]);
        publish_raw(&server, &[r#"{"message_id":"after"}"#], 2);
        let entries = settled_entries(&server, &[&consume], 1);
        assert_eq!(entries[0]["message_id"], b"after", "{strategy}");
        if strategy == "fenced" {
            // Deleted under a writer: said, once.
            assert_eq!(
                consume.stderr().matches("the stream was missing").count(),
                1,
                "{}",
                consume.describe()
            );
        }
    }
}

/// OUTPUT_FORMAT=flat and a JSON object with 4,000 top-level fields: the
/// entry cannot be built (Lua's unpack limit); the message goes to the
/// dead-letter stream with the reason and the next one is written: a poison
/// message never stalls a worker. Both strategies.
#[test]
fn a_poison_message_is_dead_lettered_and_never_stalls_a_worker() {
    for strategy in ["fenced", "race"] {
        let server = RedisServer::start();
        let consume = OptimusProcess::consume(
            &server,
            &[
                ("CONSUMERS_COUNT", "2"),
                ("STRATEGY", strategy),
                ("OUTPUT_FORMAT", "flat"),
            ],
        );
        consume.wait_consumers(2);
        let mut poison = serde_json::Map::new();
        poison.insert("message_id".into(), "poison".into());
        for i in 0..4000 {
            poison.insert(format!("f{i}"), i.into());
        }
        let poison = serde_json::Value::Object(poison).to_string();
        publish_raw(&server, &[&poison, r#"{"message_id":"next","a":1}"#], 2);
        let entries = settled_entries(&server, &[&consume], 1);
        assert_eq!(entries.len(), 1, "{strategy}");
        assert_eq!(entries[0]["message_id"], b"next", "{strategy}");
        assert_eq!(entries[0]["a"], b"1", "{strategy}: flat fields");
        let dead = server.stream_entries("messages:processed:dead");
        assert_eq!(dead.len(), 1, "{strategy}");
        assert_eq!(dead[0]["message_id"], b"poison");
        assert_eq!(dead[0]["payload"], poison.as_bytes());
        let reason = String::from_utf8_lossy(&dead[0]["reason"]);
        assert!(reason.contains("unpack"), "{strategy}: {reason}");
        let line = consume.wait_settled(Duration::from_secs(10));
        assert_eq!(
            line.num("errors"),
            0,
            "{strategy}: not retried: {}",
            line.line
        );
    }
}

/// A poison message right after a re-sent id (passed over, never part of
/// a write) is still dead-lettered, and what follows it is written: the
/// writer knows which message the stream refused.
#[test]
fn a_poison_message_after_a_re_sent_id_is_dead_lettered_too() {
    for strategy in ["fenced", "race"] {
        let server = RedisServer::start();
        let consume = OptimusProcess::consume(
            &server,
            &[("STRATEGY", strategy), ("OUTPUT_FORMAT", "flat")],
        );
        consume.wait_consumers(2);
        let first = r#"{"message_id":"a","n":1}"#;
        publish_raw(&server, &[first], 2);
        settled_entries(&server, &[&consume], 1);
        let mut poison = serde_json::Map::new();
        poison.insert("message_id".into(), "poison".into());
        for i in 0..4000 {
            poison.insert(format!("f{i}"), i.into());
        }
        let poison = serde_json::Value::Object(poison).to_string();
        // In one MULTI, so that they come in one read and one write.
        let mut conn = server.conn();
        let _: () = redis::pipe()
            .atomic()
            .publish("messages:published", first)
            .ignore()
            .publish("messages:published", &poison)
            .ignore()
            .publish("messages:published", r#"{"message_id":"next","n":2}"#)
            .ignore()
            .query(&mut conn)
            .unwrap();
        let entries = settled_entries(&server, &[&consume], 2);
        let ids: Vec<&[u8]> = entries.iter().map(|e| &e["message_id"][..]).collect();
        assert_eq!(ids, [&b"a"[..], b"next"], "{strategy}");
        let dead = server.stream_entries("messages:processed:dead");
        assert_eq!(dead.len(), 1, "{strategy}: {dead:?}");
        assert_eq!(dead[0]["message_id"], b"poison", "{strategy}");
        let line = consume.wait_settled(Duration::from_secs(10));
        // Fenced: one copy a process (its readers are merged), the re-sent
        // one skipped; race: each worker's copies of it (and of what the
        // other wrote).
        let skipped = line.num("duplicates_skipped");
        match strategy {
            "fenced" => assert_eq!(skipped, 1, "{}", line.line),
            _ => assert!(skipped >= 2, "{}", line.line),
        }
    }
}

/// While Redis is gone the monitoring line keeps coming, saying so, and the
/// metrics say so too; when it is back, both say connected.
#[test]
fn a_lost_redis_is_visible_in_the_monitoring_line_and_the_metrics() {
    let mut server = RedisServer::start();
    let addr = format!("127.0.0.1:{}", support::free_port());
    let consume = OptimusProcess::consume(&server, &[("METRICS_ADDR", &addr)]);
    consume.wait_consumers(2);
    let metric = |name: &str| support::metric(&addr, name);
    assert_eq!(metric("optimus_redis_up"), Some(1.0));
    assert_eq!(metric("optimus_build_info"), Some(1.0));

    server.stop();
    let count = |text: &str| text.matches("redis=reconnecting").count();
    support::wait_for(
        "three monitoring lines saying Redis is being reconnected",
        Duration::from_secs(20),
        || (count(&consume.stdout()) >= 3).then_some(()),
        || consume.describe(),
    );
    let down = consume.latest_line("monitor ").unwrap();
    assert_eq!(down.values["consumers"], "?", "{}", down.line);
    assert!(down.values.contains_key("down_s"), "{}", down.line);
    assert_eq!(metric("optimus_redis_up"), Some(0.0));
    assert!(
        metric("optimus_connect_failures_total").unwrap_or(0.0) > 0.0,
        "failed attempts are counted"
    );

    server.start_again();
    consume.wait_for_latest("monitor ", Duration::from_secs(30), |f| {
        f.values.get("redis").map(String::as_str) == Some("connected")
            && f.values.get("consumers").map(String::as_str) == Some("2")
    });
    assert_eq!(metric("optimus_redis_up"), Some(1.0));
}

/// A server that may evict keys is one warning line at start, naming
/// maxmemory-policy and what it needs instead; noeviction says nothing.
#[test]
fn an_evicting_server_is_one_warning_line() {
    for (policy, warned) in [
        ("allkeys-lru", true),
        ("volatile-ttl", true),
        ("noeviction", false),
    ] {
        let server = RedisServer::start_with(&["--maxmemory-policy", policy]);
        let consume = OptimusProcess::consume(&server, &[]);
        consume.wait_consumers(2);
        let lines: Vec<String> = consume
            .stderr()
            .lines()
            .filter(|l| l.contains("maxmemory-policy"))
            .map(str::to_string)
            .collect();
        if warned {
            assert_eq!(lines.len(), 1, "{policy}: {}", consume.describe());
            assert!(
                lines[0].contains(policy) && lines[0].contains("noeviction"),
                "{}",
                lines[0]
            );
        } else {
            assert!(lines.is_empty(), "{policy}: {lines:?}");
        }
    }
}

/// SIGTERM while the server hangs: the graceful stop cannot finish, so after
/// SHUTDOWN_TIMEOUT the process exits 1 with one line saying how many
/// messages it left unsettled, instead of waiting for ever.
#[test]
fn shutdown_has_a_deadline_when_redis_hangs() {
    let server = RedisServer::start();
    let mut consume = OptimusProcess::consume(&server, &[("SHUTDOWN_TIMEOUT", "2")]);
    consume.wait_consumers(2);
    publish(&server, 1000);
    settled_entries(&server, &[&consume], 1000);
    server.signal("STOP");
    consume.signal("TERM");
    let status = consume.wait_exit(Duration::from_secs(20));
    server.signal("CONT");
    assert_eq!(status.code(), Some(1), "{}", consume.describe());
    let stderr = consume.stderr();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("optimus: SHUTDOWN_TIMEOUT (2s)") && last.contains("unsettled"),
        "{last}"
    );
}

/// A foreign publisher's payload over the server's Pub/Sub output-buffer
/// limit drops every subscription at once: the bridge counts the gap,
/// resubscribes and goes on. (Its own publisher refuses such a payload: see
/// tests/publish.rs.) A server that delivers it all the same (Valkey 9.1
/// did, to one subscription) has it dead-lettered as over
/// MAX_PAYLOAD_BYTES: either way it is accounted for, never written to the
/// stream, and the bridge goes on.
#[test]
fn a_foreign_giant_message_is_a_counted_gap() {
    let server = RedisServer::start();
    let consume = OptimusProcess::consume(&server, &[]);
    consume.wait_consumers(2);
    let giant = vec![b'x'; 40 << 20];
    let _: i64 = redis::cmd("PUBLISH")
        .arg("messages:published")
        .arg(giant)
        .query(&mut server.conn())
        .unwrap();
    let line = consume.wait_for_latest("monitor ", Duration::from_secs(30), |f| {
        (f.num("gaps") >= 1 || f.num("dead") >= 1)
            && f.values["redis"] == "connected"
            && f.num("consumers") == 2
    });
    if line.num("dead") == 0 {
        assert!(line.num("reconnects") >= 2, "{}", line.line);
    }
    publish_raw(&server, &[r#"{"message_id":"after"}"#], 2);
    let entries = settled_entries(&server, &[&consume], 1);
    assert_eq!(
        entries.len(),
        1,
        "the giant is not in the stream: {entries:?}"
    );
}

/// Before it has ever reached Redis, a consumer prints its monitoring line
/// all the same, saying it is still connecting.
#[test]
fn the_monitoring_line_goes_on_before_redis_is_reached() {
    let url = format!("redis://127.0.0.1:{}", support::free_port());
    let consume = OptimusProcess::spawn(
        &["consume"],
        &[("REDIS_URL", &url), ("MONITORING_INTERVAL", "0.2")],
    );
    support::wait_for(
        "three monitoring lines saying it is connecting",
        Duration::from_secs(20),
        || (consume.stdout().matches("redis=connecting").count() >= 3).then_some(()),
        || consume.describe(),
    );
    let line = consume.latest_line("monitor ").unwrap();
    assert_eq!(line.values["consumers"], "?", "{}", line.line);
}

/// Redis out of memory (noeviction): writes are refused for a reason that
/// passes, so nothing is dead-lettered or lost; the batch is kept and
/// written once memory is back.
#[test]
fn writes_refused_for_now_are_kept_and_written_later() {
    for strategy in ["fenced", "race"] {
        let server = RedisServer::start();
        let consume = OptimusProcess::consume(&server, &[("STRATEGY", strategy)]);
        consume.wait_consumers(2);
        let _: () = server.command(&["CONFIG", "SET", "maxmemory", "1"]);
        let payloads: Vec<String> = (0..50)
            .map(|i| format!(r#"{{"message_id":"oom-{i}"}}"#))
            .collect();
        publish_raw(
            &server,
            &payloads.iter().map(String::as_str).collect::<Vec<_>>(),
            2,
        );
        consume.wait_for_latest("monitor ", Duration::from_secs(20), |f| {
            f.num("errors") >= 1
        });
        assert_eq!(server.xlen(STREAM), 0, "{strategy}: nothing written yet");
        let _: () = server.command(&["CONFIG", "SET", "maxmemory", "0"]);
        let entries = settled_entries(&server, &[&consume], 50);
        assert_eq!(entries.len(), 50, "{strategy}");
        let line = consume.wait_settled(Duration::from_secs(20));
        assert_eq!(line.num("dead"), 0, "{strategy}: {}", line.line);
        assert_eq!(line.num("refused"), 0, "{strategy}: {}", line.line);
        assert_eq!(server.xlen("messages:processed:dead"), 0, "{strategy}");
    }
}

/// A server that refuses writes when the bridge starts (too few replicas):
/// the process waits, says why, and bridges once writes are taken again.
/// Both strategies.
#[test]
fn a_server_refusing_writes_at_start_is_waited_out() {
    for strategy in ["fenced", "race"] {
        let server = RedisServer::start();
        let _: () = server.command(&["CONFIG", "SET", "min-replicas-to-write", "1"]);
        let mut consume = OptimusProcess::consume(&server, &[("STRATEGY", strategy)]);
        support::wait_for(
            "the process to say it is waiting",
            Duration::from_secs(20),
            || {
                consume
                    .stderr()
                    .contains("cannot register this process yet")
                    .then_some(())
            },
            || consume.describe(),
        );
        assert!(consume.try_exit().is_none(), "{}", consume.describe());
        let _: () = server.command(&["CONFIG", "SET", "min-replicas-to-write", "0"]);
        consume.wait_consumers(2);
        publish_raw(&server, &[r#"{"message_id":"after"}"#], 2);
        let entries = settled_entries(&server, &[&consume], 1);
        assert_eq!(entries.len(), 1, "{strategy}: {entries:?}");
    }
}

/// A closed stdout or stderr (the reader of a pipe went away: a log
/// collector that died) does not stop the bridge: its monitoring lines and
/// logs are dropped, the messages are still bridged, and SIGTERM still ends
/// it cleanly.
#[test]
fn a_closed_stdout_does_not_stop_the_bridge() {
    closed_output(true);
}

#[test]
fn a_closed_stderr_does_not_stop_the_bridge() {
    closed_output(false);
}

fn closed_output(stdout: bool) {
    let server = RedisServer::start();
    let url = server.url();
    let mut child = support::optimus(
        &["consume"],
        &[("REDIS_URL", url.as_str()), ("MONITORING_INTERVAL", "0.05")],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let _kept: Box<dyn std::any::Any> = if stdout {
        drop(out);
        Box::new(err)
    } else {
        drop(err);
        Box::new(out)
    };
    // (The other pipe is never read: the process must not fill it. The
    // monitoring lines on stdout are short and few; a kept stderr pipe
    // holds the few log lines.)
    support::wait_for(
        "the bridge's subscriptions",
        Duration::from_secs(20),
        || {
            let subs: Vec<(String, i64)> = server.command(&[
                "PUBSUB",
                "NUMSUB",
                "optimus:bridge:0:messages:published->messages:processed",
            ]);
            (subs[0].1 == 2).then_some(())
        },
        String::new,
    );
    std::thread::sleep(Duration::from_millis(300));
    let summary = publish(&server, 100);
    assert_eq!(summary.num("no_subscriber"), 0, "{}", summary.line);
    support::wait_for(
        "100 entries",
        Duration::from_secs(20),
        || (server.xlen(STREAM) >= 100).then_some(()),
        String::new,
    );
    assert!(child.try_wait().unwrap().is_none(), "still running");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = support::wait_for(
        "the bridge to exit",
        Duration::from_secs(20),
        || child.try_wait().unwrap(),
        String::new,
    );
    assert!(status.success(), "{status:?}");
}
