//! Several channels and patterns, each routed to its stream, and capped
//! streams: ROUTES, STREAM_MAXLEN, STREAM_MAX_AGE, STREAM_TRIM.

use crate::support;

use std::time::Duration;

use support::{OptimusProcess, RedisServer, Tally, assert_exactly_once, publish_with};

/// Publishes `count` test messages on `channel` (no fast path: what reached
/// no worker is only counted); `routes`, the bridge's ROUTES, tell the
/// publisher which probe counts the bridge's workers.
fn publish_routed(server: &RedisServer, routes: &str, channel: &str, count: u64) {
    let url = server.url();
    let done = publish_with(
        &[
            ("REDIS_URL", url.as_str()),
            ("INPUT_CHANNEL", channel),
            ("ROUTES", routes),
        ],
        &["--count", &count.to_string(), "--no-fast-path"],
    );
    assert_eq!(
        done.num("no_subscriber"),
        0,
        "every message on {channel} reached the workers"
    );
}

fn wait_len(server: &RedisServer, stream: &str, n: usize, consume: &OptimusProcess) {
    support::wait_for(
        &format!("{n} entries in {stream}"),
        Duration::from_secs(30),
        || (server.xlen(stream) >= n).then_some(()),
        || consume.describe(),
    );
}

#[test]
fn each_channel_goes_to_its_own_stream_with_either_strategy() {
    const ROUTES: &str = "orders=orders:out, payments=payments:out";
    for strategy in ["fenced", "race"] {
        let server = RedisServer::start();
        let consume = OptimusProcess::consume(
            &server,
            &[
                ("ROUTES", ROUTES),
                ("CONSUMERS_COUNT", "3"),
                ("STRATEGY", strategy),
            ],
        );
        consume.wait_consumers(3);
        publish_routed(&server, ROUTES, "orders", 3000);
        publish_routed(&server, ROUTES, "payments", 1000);
        wait_len(&server, "orders:out", 3000, &consume);
        wait_len(&server, "payments:out", 1000, &consume);
        consume.wait_settled(Duration::from_secs(20));
        // Each stream holds exactly its channel's messages (the publisher
        // numbers each run from 0).
        assert_exactly_once(&server.stream_entries("orders:out"), 0..3000);
        assert_exactly_once(&server.stream_entries("payments:out"), 0..1000);
        assert_eq!(
            server.xlen("messages:processed"),
            0,
            "{strategy}: no default route any more"
        );
        // Each stream's keys carry its name: ACKs (race) or its writer
        // record (fenced, nothing per message).
        let (orders, payments) = match strategy {
            "race" => (3000, 1000),
            _ => (0, 0),
        };
        assert_eq!(
            server.keys("{orders:out}:ack:*").len(),
            orders,
            "{strategy}"
        );
        assert_eq!(
            server.keys("{payments:out}:ack:*").len(),
            payments,
            "{strategy}"
        );
        if strategy == "fenced" {
            assert_eq!(server.keys("{orders:out}:writer").len(), 1);
            assert_eq!(server.keys("{payments:out}:writer").len(), 1);
        }
    }
}

#[test]
fn a_pattern_with_a_template_makes_one_stream_per_channel() {
    let server = RedisServer::start();
    let consume = OptimusProcess::consume(
        &server,
        &[
            ("ROUTES", "events:*={channel}:processed"),
            ("CONSUMERS_COUNT", "2"),
            ("MAX_PAYLOAD_BYTES", "1000"),
        ],
    );
    consume.wait_consumers(2);
    publish_routed(&server, "events:*={channel}:processed", "events:eu", 1500);
    publish_routed(&server, "events:*={channel}:processed", "events:us", 700);
    // A message nobody routes reaches no worker.
    let receivers: i64 = server.command(&["PUBLISH", "other", "x"]);
    assert_eq!(receivers, 0);
    // A rejected message goes to its own stream's dead letters, naming the
    // channel it came on.
    let big = format!(r#"{{"message_id":"big","pad":"{}"}}"#, "x".repeat(2000));
    let receivers: i64 = server.command(&["PUBLISH", "events:eu", &big]);
    assert_eq!(receivers, 2);
    wait_len(&server, "events:eu:processed", 1500, &consume);
    wait_len(&server, "events:us:processed", 700, &consume);
    wait_len(&server, "events:eu:processed:dead", 1, &consume);
    consume.wait_settled(Duration::from_secs(20));
    assert_exactly_once(&server.stream_entries("events:eu:processed"), 0..1500);
    assert_exactly_once(&server.stream_entries("events:us:processed"), 0..700);
    let dead = server.stream_entries("events:eu:processed:dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["channel"], b"events:eu");
    assert!(String::from_utf8_lossy(&dead[0]["reason"]).contains("MAX_PAYLOAD_BYTES"));
}

#[test]
fn streams_are_capped_by_length_or_age() {
    let server = RedisServer::start();
    // Exact trimming: the length is the cap.
    const ROUTES: &str = "short=short:out;maxlen=100, young=young:out;max_age=1, free=free:out";
    let consume = OptimusProcess::consume(&server, &[("ROUTES", ROUTES), ("STREAM_TRIM", "exact")]);
    consume.wait_consumers(2);
    publish_routed(&server, ROUTES, "short", 1000);
    publish_routed(&server, ROUTES, "young", 500);
    publish_routed(&server, ROUTES, "free", 300);
    wait_len(&server, "free:out", 300, &consume);
    support::wait_for(
        "the capped streams to be written",
        Duration::from_secs(30),
        || (consume.latest_line("monitor ")?.num("written") >= 1800).then_some(()),
        || consume.describe(),
    );
    consume.wait_settled(Duration::from_secs(20));
    assert_eq!(server.xlen("short:out"), 100, "MAXLEN = 100");
    // The 100 kept are distinct messages of the run (the newest written;
    // with several writers not strictly the last 100 published).
    let kept = Tally::of(&server.stream_entries("short:out"), 0..1000);
    assert!(kept.duplicated.is_empty() && kept.unexpected == 0, "{kept}");
    assert_eq!(
        server.xlen("free:out"),
        300,
        "a route without a cap keeps all"
    );
    // An age cap trims as new entries come: after 1.5 s, ten more leave
    // only those ten.
    assert_eq!(server.xlen("young:out"), 500);
    std::thread::sleep(Duration::from_millis(1500));
    publish_routed(&server, ROUTES, "young", 10);
    support::wait_for(
        "the old entries of young:out trimmed",
        Duration::from_secs(30),
        || (server.xlen("young:out") == 10).then_some(()),
        || consume.describe(),
    );
}

#[test]
fn an_approximate_global_cap_keeps_about_the_length() {
    let server = RedisServer::start();
    let consume = OptimusProcess::consume(&server, &[("STREAM_MAXLEN", "500")]);
    consume.wait_consumers(2);
    publish_routed(
        &server,
        "messages:published=messages:processed",
        "messages:published",
        5000,
    );
    support::wait_for(
        "5000 messages written",
        Duration::from_secs(30),
        || (consume.latest_line("monitor ")?.num("written") >= 5000).then_some(()),
        || consume.describe(),
    );
    let len = server.xlen("messages:processed");
    // `~` trims whole macro nodes (100 entries by default): at least the
    // cap stays, and far less than everything.
    assert!((500..=1000).contains(&len), "approximately 500, got {len}");
}

/// Publishes raw `(channel, payload)` pairs, pipelined; returns how many
/// subscriptions each PUBLISH reached, summed.
fn publish_pairs(server: &RedisServer, pairs: &[(String, String)]) -> i64 {
    let mut conn = server.conn();
    let mut reached = 0;
    for chunk in pairs.chunks(10_000) {
        let mut pipe = redis::pipe();
        for (channel, payload) in chunk {
            pipe.cmd("PUBLISH").arg(channel).arg(payload);
        }
        let counts: Vec<i64> = pipe.query(&mut conn).unwrap();
        reached += counts.iter().sum::<i64>();
    }
    reached
}

/// A route of every channel (`*`) matches the workers' own channels too:
/// those are never bridged, only the messages published on real channels.
#[test]
fn optimus_s_own_channels_are_never_bridged() {
    for strategy in ["fenced", "race"] {
        let server = RedisServer::start();
        let consume =
            OptimusProcess::consume(&server, &[("ROUTES", "*=all:out"), ("STRATEGY", strategy)]);
        consume.wait_consumers(2);
        let pairs: Vec<(String, String)> = (0..10)
            .map(|i| (format!("c{i}"), format!(r#"{{"message_id":"m{i}"}}"#)))
            .collect();
        publish_pairs(&server, &pairs);
        wait_len(&server, "all:out", 10, &consume);
        // Marks flow every 50 ms meanwhile: a second is twenty of them.
        std::thread::sleep(Duration::from_secs(1));
        consume.wait_settled(Duration::from_secs(10));
        let entries = server.stream_entries("all:out");
        let channels: Vec<String> = entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e["message_id"]).to_string())
            .collect();
        assert_eq!(
            entries.len(),
            10,
            "{strategy}: only the ten messages: {channels:?}"
        );
    }
}

/// Patterns that overlap (and a channel one of them matches) all lead to
/// one stream: each message lands there once, an id-less one too; a
/// pattern to another stream still gets its copy there.
#[test]
fn overlapping_routes_bridge_a_message_once_per_stream() {
    let server = RedisServer::start();
    let consume = OptimusProcess::consume(
        &server,
        &[
            ("ROUTES", "ev:*=s,ev:a*=s,ev:ab=s,ev:?b=audit"),
            ("CONSUMERS_COUNT", "2"),
        ],
    );
    consume.wait_consumers(2);
    let pairs: Vec<(String, String)> = vec![
        ("ev:ab".into(), "no id".into()),
        ("ev:ab".into(), "no id".into()),
        ("ev:ab".into(), r#"{"message_id":"x1"}"#.into()),
        ("ev:ax".into(), "no id".into()),
        ("ev:zz".into(), r#"{"message_id":"x2"}"#.into()),
    ];
    // ev:ab reaches four subscriptions of each worker, ev:ax two, ev:zz one.
    assert_eq!(publish_pairs(&server, &pairs), 2 * (4 * 3 + 2 + 1));
    wait_len(&server, "s", 5, &consume);
    wait_len(&server, "audit", 3, &consume);
    consume.wait_settled(Duration::from_secs(10));
    let payloads = |stream: &str| -> Vec<String> {
        server
            .stream_entries(stream)
            .iter()
            .map(|e| String::from_utf8_lossy(&e["payload"]).to_string())
            .collect()
    };
    let mut s = payloads("s");
    s.sort();
    assert_eq!(
        s,
        [
            "no id",
            "no id",
            "no id",
            r#"{"message_id":"x1"}"#,
            r#"{"message_id":"x2"}"#
        ],
        "once each in s"
    );
    let mut audit = payloads("audit");
    audit.sort();
    assert_eq!(
        audit,
        ["no id", "no id", r#"{"message_id":"x1"}"#],
        "once each in audit"
    );
}

/// 100,000 distinct channels under one pattern: once they go quiet the
/// process gives the memory back, keeping nothing per channel.
#[test]
fn many_short_lived_channels_leave_no_memory_behind() {
    let server = RedisServer::start();
    let consume = OptimusProcess::consume(&server, &[("ROUTES", "ev:*=ev:out")]);
    consume.wait_consumers(2);
    let idle = support::rss(consume.pid());
    let pairs: Vec<(String, String)> = (0..100_000)
        .map(|i| (format!("ev:{i}"), format!(r#"{{"message_id":"m{i}"}}"#)))
        .collect();
    publish_pairs(&server, &pairs);
    wait_len(&server, "ev:out", 100_000, &consume);
    consume.wait_settled(Duration::from_secs(30));
    // Two more lines: the first quiet one gives the memory back.
    let lines = || consume.stdout().matches("monitor ").count();
    let now = lines();
    support::wait_for(
        "two quiet monitoring lines",
        Duration::from_secs(10),
        || (lines() >= now + 2).then_some(()),
        || consume.describe(),
    );
    let peak = support::peak_rss(consume.pid());
    let after = support::rss(consume.pid());
    assert!(
        after < idle + 24 * 1024 * 1024,
        "resident after the channels went quiet: {} MiB (idle {} MiB, peak {} MiB)",
        after >> 20,
        idle >> 20,
        peak >> 20
    );
}

/// A template route over many short-lived channels makes a stream per
/// channel: 20,000 of them at once are each written once, and the lanes
/// of the streams, quiet for QUIET_RELEASE (30 s), give their memory back.
#[test]
fn many_short_lived_streams_are_written_and_leave_no_memory_behind() {
    let server = RedisServer::start();
    let consume = OptimusProcess::consume(&server, &[("ROUTES", "ev:*={channel}:out")]);
    consume.wait_consumers(2);
    let idle = support::rss(consume.pid());
    let pairs: Vec<(String, String)> = (0..20_000)
        .map(|i| (format!("ev:{i}"), format!(r#"{{"message_id":"m{i}"}}"#)))
        .collect();
    assert_eq!(
        publish_pairs(&server, &pairs),
        2 * 20_000,
        "every message reached both readers"
    );
    support::wait_for(
        "20,000 messages written",
        Duration::from_secs(60),
        || {
            let line = consume.latest_line("monitor ")?;
            (line.num("written") == 20_000).then_some(())
        },
        || consume.describe(),
    );
    consume.wait_settled(Duration::from_secs(30));
    for i in [0, 9_999, 19_999] {
        assert_eq!(server.xlen(&format!("ev:{i}:out")), 1, "ev:{i}:out");
    }
    let peak = support::peak_rss(consume.pid());
    support::wait_for(
        "the memory of the quiet streams to be given back",
        Duration::from_secs(90),
        || (support::rss(consume.pid()) < idle + 24 * 1024 * 1024).then_some(()),
        || {
            format!(
                "resident {} MiB (idle {} MiB, peak {} MiB)\n{}",
                support::rss(consume.pid()) >> 20,
                idle >> 20,
                peak >> 20,
                consume.describe()
            )
        },
    );
}
