//! `optimus publish`'s fast path and limits: it decides from the bridge's
//! own subscriptions (not from any subscriber's), writes what no bridge
//! worker could receive exactly once, never publishes a payload the
//! subscribers could not take, and knows messages by MESSAGE_ID_FIELD.

use crate::support;

use std::time::Duration;

use support::{OptimusProcess, RedisServer, assert_exactly_once, publish_with};

const STREAM: &str = "messages:processed";

/// A subscriber that is not the bridge: a service's SUBSCRIBE and a
/// monitor's `PSUBSCRIBE *`, held open while it lives.
struct Foreign {
    _subscribed: redis::Connection,
    _monitor: redis::Connection,
}

fn foreign_subscribers(server: &RedisServer) -> Foreign {
    let mut subscribed = server.conn();
    redis::cmd("SUBSCRIBE")
        .arg("messages:published")
        .exec(&mut subscribed)
        .unwrap();
    let mut monitor = server.conn();
    redis::cmd("PSUBSCRIBE")
        .arg("*")
        .exec(&mut monitor)
        .unwrap();
    Foreign {
        _subscribed: subscribed,
        _monitor: monitor,
    }
}

fn publish(server: &RedisServer, env: &[(&str, &str)], args: &[&str]) -> support::Fields {
    let url = server.url();
    let mut all = vec![("REDIS_URL", url.as_str())];
    all.extend_from_slice(env);
    publish_with(&all, args)
}

/// Other subscribers on the channel do not make the publisher believe the
/// bridge got its messages: with no bridge running, every message is
/// written straight to the stream, once.
#[test]
fn foreign_subscribers_do_not_hide_a_missing_bridge() {
    let server = RedisServer::start();
    let _foreign = foreign_subscribers(&server);
    let receivers: i64 = server.command(&["PUBLISH", "messages:published", "probe"]);
    assert_eq!(receivers, 2, "two foreign subscriptions");
    let summary = publish(&server, &[], &["--count", "1000", "--batch-size", "100"]);
    assert_eq!(summary.num("no_subscriber"), 1000, "{}", summary.line);
    assert_eq!(summary.num("stored_directly"), 1000, "{}", summary.line);
    assert_exactly_once(&server.stream_entries(STREAM), 0..1000);
}

/// With the bridge running beside foreign subscribers, the bridge writes
/// everything and the fast path nothing.
#[test]
fn with_the_bridge_running_the_fast_path_stays_idle() {
    let server = RedisServer::start();
    let _foreign = foreign_subscribers(&server);
    let consume = OptimusProcess::consume(&server, &[]);
    consume.wait_consumers(2);
    let summary = publish(&server, &[], &["--count", "2000", "--batch-size", "100"]);
    assert_eq!(summary.num("no_subscriber"), 0, "{}", summary.line);
    assert_eq!(summary.num("stored_directly"), 0, "{}", summary.line);
    support::wait_for(
        "2000 entries",
        Duration::from_secs(20),
        || (server.xlen(STREAM) >= 2000).then_some(()),
        || consume.describe(),
    );
    consume.wait_settled(Duration::from_secs(10));
    assert_exactly_once(&server.stream_entries(STREAM), 0..2000);
}

/// A batch whose reply is lost after Redis ran it (the connection drops at
/// the worst moment): the publisher cannot know whether the subscribers got
/// it, so it publishes it again (within DEDUP_WINDOW), and the bridge
/// writes each id once. Both strategies.
#[test]
fn a_batch_published_again_after_a_lost_reply_is_written_once() {
    for strategy in ["fenced", "race"] {
        let server = RedisServer::start();
        let consume = OptimusProcess::consume(&server, &[("STRATEGY", strategy)]);
        consume.wait_consumers(2);
        let proxy = support::proxy::StallingProxy::start(server.port);
        proxy.lose_the_reply_to(b"EVALSHA");
        let url = proxy.url();
        let summary = publish_with(
            &[("REDIS_URL", url.as_str())],
            &["--count", "1000", "--batch-size", "100"],
        );
        assert!(proxy.reply_lost(), "{strategy}: no script went through");
        assert!(summary.num("resent") > 0, "{strategy}: {}", summary.line);
        assert_eq!(summary.num("published"), 1000, "{}", summary.line);
        support::wait_for(
            "1000 entries",
            Duration::from_secs(20),
            || (server.xlen(STREAM) >= 1000).then_some(()),
            || consume.describe(),
        );
        let line = consume.wait_settled(Duration::from_secs(10));
        assert_exactly_once(&server.stream_entries(STREAM), 0..1000);
        assert!(
            line.num("duplicates_skipped") > 0,
            "{strategy}: the lost batch was published twice, and its second copies skipped: {}",
            line.line
        );
    }
}

/// A batch that ran once, but whose only bridge subscription went away
/// with it (a worker that died with the batch in its output buffer, or a
/// server that stopped before sending it out) while the publisher lost the
/// reply: published again at once, it would reach nobody. The publisher
/// waits until a bridge worker is subscribed again, then publishes it, and
/// the bridge writes every message once.
#[test]
fn a_batch_sent_again_while_no_bridge_listens_waits_for_one() {
    let server = RedisServer::start();
    // A bridge that ran once has loaded the scripts (the batch's first
    // attempt runs, rather than asking for them).
    let mut earlier = OptimusProcess::consume(&server, &[]);
    earlier.wait_consumers(2);
    earlier.signal("TERM");
    assert!(earlier.wait_exit(Duration::from_secs(20)).success());
    let mut doomed = server.conn();
    redis::cmd("SUBSCRIBE")
        .arg("optimus:bridge:0:messages:published->messages:processed")
        .exec(&mut doomed)
        .unwrap();
    let proxy = support::proxy::StallingProxy::start(server.port);
    proxy.hang_the_reply_to(b"EVALSHA");
    let url = proxy.url();
    let window = [("DEDUP_WINDOW", "60")];
    let mut env = vec![("REDIS_URL", url.as_str())];
    env.extend_from_slice(&window);
    let mut publisher = OptimusProcess::spawn(
        &[
            "publish",
            "--pause-min",
            "0",
            "--pause-max",
            "0",
            "--count",
            "100",
            "--batch-size",
            "100",
        ],
        &env,
    );
    let mut admin = server.conn();
    // The script ran (the doomed subscription got the batch); its reply hangs.
    let script = support::wait_for(
        "the batch's script to run",
        Duration::from_secs(20),
        || {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("TYPE")
                .arg("normal")
                .query(&mut admin)
                .unwrap();
            list.lines()
                .find(|l| l.contains(" cmd=evalsha"))
                .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
                .map(|id| id.to_string())
        },
        || publisher.describe(),
    );
    drop(doomed);
    support::wait_for(
        "the doomed subscription to go",
        Duration::from_secs(10),
        || {
            let subs: Vec<(String, i64)> = server.command(&[
                "PUBSUB",
                "NUMSUB",
                "optimus:bridge:0:messages:published->messages:processed",
            ]);
            (subs[0].1 == 0).then_some(())
        },
        String::new,
    );
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&script)
        .query(&mut admin)
        .unwrap();
    support::wait_for(
        "the publisher to wait for a bridge",
        Duration::from_secs(20),
        || {
            publisher
                .stderr()
                .contains("no bridge worker subscribed to take it again")
                .then_some(())
        },
        || publisher.describe(),
    );
    assert_eq!(server.xlen(STREAM), 0, "nothing was written yet");
    let consume = OptimusProcess::consume(&server, &window);
    let status = publisher.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{}", publisher.describe());
    let summary = publisher.wait_for_line("publish done", Duration::from_secs(1), |_| true);
    assert_eq!(summary.num("published"), 100, "{}", summary.line);
    assert_eq!(summary.num("failed"), 0, "{}", summary.line);
    support::wait_for(
        "100 entries",
        Duration::from_secs(20),
        || (server.xlen(STREAM) >= 100).then_some(()),
        || consume.describe(),
    );
    consume.wait_settled(Duration::from_secs(10));
    assert_exactly_once(&server.stream_entries(STREAM), 0..100);
}

/// DEDUP_WINDOW: a foreign publisher that sends an id again within the
/// window gets one entry; once the window has passed, the same id is a new
/// message. Ids the bridge makes itself (payloads without one) are never
/// taken for re-sends.
#[test]
fn an_id_sent_again_within_the_window_is_written_once() {
    let server = RedisServer::start();
    let consume = OptimusProcess::consume(&server, &[("DEDUP_WINDOW", "1")]);
    consume.wait_consumers(2);
    let mut conn = server.conn();
    let mut send = |payload: &str| {
        let n: i64 = redis::cmd("PUBLISH")
            .arg("messages:published")
            .arg(payload)
            .query(&mut conn)
            .unwrap();
        assert_eq!(n, 2, "both workers subscribed");
    };
    let retried = r#"{"message_id":"retried","attempt":1}"#;
    for _ in 0..3 {
        send(retried);
        send("no id here");
    }
    let entries = |n: usize| {
        support::wait_for(
            &format!("{n} entries"),
            Duration::from_secs(20),
            || (server.xlen(STREAM) >= n).then_some(()),
            || consume.describe(),
        );
        consume.wait_settled(Duration::from_secs(10));
        server.stream_entries(STREAM)
    };
    let first = entries(4);
    let payloads: Vec<&[u8]> = first.iter().map(|e| &e["payload"][..]).collect();
    assert_eq!(
        payloads,
        [
            retried.as_bytes(),
            b"no id here",
            b"no id here",
            b"no id here"
        ],
        "one entry for the re-sent id, every id-less payload"
    );
    // The window is 1 s, by publish time: well past it, the id is new.
    std::thread::sleep(Duration::from_millis(2500));
    send(retried);
    let second = entries(5);
    assert_eq!(second.len(), 5, "{second:?}");
    assert_eq!(&second[4]["payload"][..], retried.as_bytes());
    let line = consume.wait_settled(Duration::from_secs(10));
    assert_eq!(line.num("duplicates_skipped"), 2, "{}", line.line);
    assert_eq!(line.num("reused_ids"), 0, "{}", line.line);
}

/// A payload over MAX_PAYLOAD_BYTES is never published (it could drop every
/// subscriber at the server's output-buffer limit): it goes to the
/// dead-letter stream with the reason, with or without a bridge, and the
/// bridge's subscriptions stay up.
#[test]
fn oversized_payloads_are_dead_lettered_not_published() {
    let server = RedisServer::start();
    let consume = OptimusProcess::consume(&server, &[]);
    consume.wait_consumers(2);
    for (size, count) in [("2000000", "2"), ("41943040", "1")] {
        let summary = publish(&server, &[], &["--count", count, "--payload-size", size]);
        assert_eq!(summary.num("dead_lettered"), count.parse::<u64>().unwrap());
        assert_eq!(summary.num("stored_directly"), 0, "{}", summary.line);
    }
    let dead = server.stream_entries("messages:processed:dead");
    assert_eq!(dead.len(), 3);
    for entry in &dead {
        let reason = String::from_utf8_lossy(&entry["reason"]);
        assert!(
            reason.contains("MAX_PAYLOAD_BYTES") && reason.contains("not published"),
            "{reason}"
        );
    }
    assert_eq!(server.xlen(STREAM), 0, "nothing oversized in the stream");
    let line = consume.wait_settled(Duration::from_secs(10));
    assert_eq!(line.num("received"), 0, "never published: {}", line.line);
    assert_eq!(
        line.num("reconnects"),
        0,
        "no subscriber dropped: {}",
        line.line
    );

    // A smaller MAX_PAYLOAD_BYTES is the publisher's too, with no bridge.
    drop(consume);
    let summary = publish(
        &server,
        &[("MAX_PAYLOAD_BYTES", "500")],
        &["--count", "3", "--payload-size", "600"],
    );
    assert_eq!(summary.num("dead_lettered"), 3, "{}", summary.line);
    assert_eq!(server.xlen(STREAM), 0);
}

/// MESSAGE_ID_FIELD names the id in the publisher's messages, and the fast
/// path and the bridge both know messages by it.
#[test]
fn message_id_field_is_the_publisher_s_too() {
    let server = RedisServer::start();
    let env = [("MESSAGE_ID_FIELD", "uid")];
    // No bridge: the fast path writes them.
    let summary = publish(&server, &env, &["--count", "50"]);
    assert_eq!(summary.num("stored_directly"), 50, "{}", summary.line);
    // With a bridge.
    let consume = OptimusProcess::consume(&server, &env);
    consume.wait_consumers(2);
    publish(&server, &env, &["--count", "50"]);
    support::wait_for(
        "100 entries",
        Duration::from_secs(20),
        || (server.xlen(STREAM) >= 100).then_some(()),
        || consume.describe(),
    );
    for entry in server.stream_entries(STREAM) {
        let payload: serde_json::Value = serde_json::from_slice(&entry["payload"]).unwrap();
        assert!(payload.get("message_id").is_none(), "{payload}");
        assert_eq!(
            payload["uid"].as_str().unwrap().as_bytes(),
            entry["message_id"].as_slice(),
            "the entry is known by uid"
        );
    }
}

/// Without the fast path, what reached no bridge worker is still counted
/// right: foreign subscribers do not count as the bridge.
#[test]
fn without_the_fast_path_foreign_subscribers_still_do_not_count() {
    let server = RedisServer::start();
    let _foreign = foreign_subscribers(&server);
    let summary = publish(&server, &[], &["--count", "300", "--no-fast-path"]);
    assert_eq!(summary.num("no_subscriber"), 300, "{}", summary.line);
    assert_eq!(summary.num("stored_directly"), 0, "{}", summary.line);
    assert_eq!(server.xlen(STREAM), 0);
}

/// With the bridge's ROUTES, the publisher on a channel a pattern route
/// reads asks that route's probe, and its fast path writes to the route's
/// stream: with no bridge every message lands there once; with the bridge,
/// the bridge writes them and the fast path nothing.
#[test]
fn the_fast_path_follows_the_routes() {
    let server = RedisServer::start();
    let routes = [("ROUTES", "ev:*={channel}:out"), ("INPUT_CHANNEL", "ev:eu")];
    let summary = publish(&server, &routes, &["--count", "200"]);
    assert_eq!(summary.num("stored_directly"), 200, "{}", summary.line);
    assert_exactly_once(&server.stream_entries("ev:eu:out"), 0..200);
    assert_eq!(server.xlen(STREAM), 0, "nothing in OUTPUT_STREAM");

    let _: () = server.command(&["DEL", "ev:eu:out"]);
    let consume = OptimusProcess::consume(&server, &[("ROUTES", "ev:*={channel}:out")]);
    consume.wait_consumers(2);
    let summary = publish(&server, &routes, &["--count", "300"]);
    assert_eq!(summary.num("no_subscriber"), 0, "{}", summary.line);
    support::wait_for(
        "300 entries",
        Duration::from_secs(20),
        || (server.xlen("ev:eu:out") >= 300).then_some(()),
        || consume.describe(),
    );
    consume.wait_settled(Duration::from_secs(10));
    assert_exactly_once(&server.stream_entries("ev:eu:out"), 0..300);
}

/// Payloads that together would overflow a subscriber's output buffer if
/// published in one step (1,000 of 40 KB: 40 MB) are published in steps
/// small enough: the bridge's subscriptions stay up and it gets them all.
#[test]
fn a_batch_of_large_payloads_does_not_drop_the_subscribers() {
    let server = RedisServer::start();
    let consume = OptimusProcess::consume(&server, &[]);
    consume.wait_consumers(2);
    let summary = publish(
        &server,
        &[],
        &[
            "--count",
            "1000",
            "--payload-size",
            "40000",
            "--batch-size",
            "1000",
        ],
    );
    assert_eq!(summary.num("no_subscriber"), 0, "{}", summary.line);
    support::wait_for(
        "1000 entries",
        Duration::from_secs(60),
        || (server.xlen(STREAM) >= 1000).then_some(()),
        || consume.describe(),
    );
    let line = consume.wait_settled(Duration::from_secs(20));
    assert_eq!(line.num("reconnects"), 0, "{}", line.line);
    assert_exactly_once(&server.stream_entries(STREAM), 0..1000);
}

/// The fast path asks whether a bridge for *its* stream and database is
/// subscribed: a pool bridging the same channel into another stream, or in
/// another database, is no bridge for it. With only pool `sx` running,
/// `publish --stream sy` writes every message to `sy` itself (and `sx`
/// still gets each once from its pool); a pool of `sy` in database 1 does
/// not count for database 0 either.
#[test]
fn the_fast_path_asks_for_a_bridge_of_its_own_stream_and_database() {
    let server = RedisServer::start();
    let sx = OptimusProcess::consume(&server, &[("OUTPUT_STREAM", "sx")]);
    let db1 = format!("{}/1", server.url());
    let sy_db1 = OptimusProcess::consume(
        &server,
        &[("OUTPUT_STREAM", "sy"), ("REDIS_URL", db1.as_str())],
    );
    sx.wait_consumers(2);
    sy_db1.wait_consumers(2);
    let summary = publish(
        &server,
        &[],
        &["--stream", "sy", "--count", "1000", "--batch-size", "100"],
    );
    assert_eq!(summary.num("no_subscriber"), 1000, "{}", summary.line);
    assert_eq!(summary.num("stored_directly"), 1000, "{}", summary.line);
    assert_exactly_once(&server.stream_entries("sy"), 0..1000);
    support::wait_for(
        "1000 entries in sx",
        Duration::from_secs(20),
        || (server.xlen("sx") >= 1000).then_some(()),
        || sx.describe(),
    );
    sx.wait_settled(Duration::from_secs(10));
    assert_exactly_once(&server.stream_entries("sx"), 0..1000);
    // And with the pool of sx asked for: the bridge writes, the fast path not.
    let summary = publish(
        &server,
        &[],
        &["--stream", "sx", "--count", "500", "--batch-size", "100"],
    );
    assert_eq!(summary.num("stored_directly"), 0, "{}", summary.line);
}

/// The progress line says what Redis confirmed (`sent`) and what is on its
/// way (`in_flight`): together never more than the run makes, `sent` never
/// going back, and the summary has them all.
#[test]
fn the_progress_line_counts_what_is_confirmed_and_what_is_on_its_way() {
    let server = RedisServer::start();
    let url = server.url();
    let out = support::run_optimus(
        &[
            "publish",
            "--count",
            "1500",
            "--rate",
            "1000",
            "--batch-size",
            "10",
            "--progress-interval",
            "0.2",
        ],
        &[("REDIS_URL", url.as_str())],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<support::Fields> = stdout
        .lines()
        .filter(|l| l.starts_with("publish sent="))
        .map(support::Fields::parse)
        .collect();
    assert!(lines.len() >= 3, "progress lines: {stdout}");
    let mut last = 0;
    for line in &lines {
        let (sent, in_flight) = (line.num("sent"), line.num("in_flight"));
        assert!(sent + in_flight <= 1500, "{}", line.line);
        assert!(sent >= last, "sent goes on: {stdout}");
        last = sent;
    }
    assert!(
        stdout.contains("publish done") && stdout.contains("published=1500"),
        "{stdout}"
    );
}
