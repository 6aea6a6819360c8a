//! Redis Cluster: three masters made by the test, the bridge and the
//! publisher through the cluster client, classic Pub/Sub (the race
//! strategy) and sharded Pub/Sub (the fenced core, the default there), a
//! master killed mid-run with its replica promoted, a slot moved.

use crate::support;

use std::time::Duration;

use support::cluster::RedisCluster;
use support::{OptimusProcess, Tally, Witness, assert_exactly_once, publish_with, stream_entries};

fn xlen(cluster: &RedisCluster, stream: &str) -> usize {
    redis::cmd("XLEN")
        .arg(stream)
        .query(&mut cluster.conn())
        .unwrap_or_else(|e| panic!("XLEN {stream}: {e}\n{}", cluster.logs()))
}

/// Keys matching `pattern` on one node.
fn keys_on(cluster: &RedisCluster, port: u16, pattern: &str) -> usize {
    let node = cluster.nodes.iter().find(|n| n.port == port).unwrap();
    let keys: Vec<String> = node.query(&["KEYS", pattern]).expect("KEYS");
    keys.len()
}

#[test]
fn exactly_once_on_three_masters_with_classic_and_sharded_pubsub() {
    let cluster = RedisCluster::start(3, 0);
    let seeds = cluster.seeds();
    for mode in ["classic", "sharded"] {
        let stream = format!("out:{mode}");
        let channel = format!("in:{mode}");
        let env = [
            ("REDIS_URL", seeds.as_str()),
            ("PUBSUB_MODE", mode),
            ("INPUT_CHANNEL", channel.as_str()),
            ("OUTPUT_STREAM", stream.as_str()),
        ];
        let mut all = env.to_vec();
        all.extend([("CONSUMERS_COUNT", "3"), ("MONITORING_INTERVAL", "0.2")]);
        let mut consume = OptimusProcess::spawn(&["consume"], &all);
        consume.wait_consumers(3);
        let witness =
            (mode == "sharded").then(|| Witness::sharded(&channel, cluster.locator(&channel)));

        let summary = publish_with(&env, &["--count", "3000"]);
        assert_eq!(
            summary.num("no_subscriber"),
            0,
            "{mode}: every message reached the workers"
        );
        support::wait_for(
            &format!("{mode}: 3000 entries in {stream}"),
            Duration::from_secs(30),
            || (xlen(&cluster, &stream) >= 3000).then_some(()),
            || consume.describe(),
        );
        consume.wait_settled(Duration::from_secs(20));
        let entries = stream_entries(&mut cluster.conn(), &stream);
        assert_exactly_once(&entries, 0..3000);

        let home = cluster.master_of(&stream);
        let pattern = format!("{{{stream}}}:ack:*");
        if mode == "classic" {
            // Race: the ACK keys live on the stream's shard, and only there.
            for node in &cluster.nodes {
                let n = keys_on(&cluster, node.port, &pattern);
                if node.port == home {
                    assert_eq!(
                        n, 3000,
                        "{mode}: one ACK per message on the stream's master"
                    );
                } else {
                    assert_eq!(n, 0, "{mode}: no ACK keys on node {}", node.port);
                }
            }
        } else {
            // Fenced: no key per message, the stream in publish order, the
            // pool's keys on the channel's master.
            for node in &cluster.nodes {
                assert_eq!(
                    keys_on(&cluster, node.port, &pattern),
                    0,
                    "{mode}: no ACK keys"
                );
            }
            let delivered = witness.as_ref().map(Witness::order).unwrap_or_default();
            assert_eq!(
                support::out_of_order(&entries, &delivered),
                0,
                "{mode}: the stream is in publish order: {:?}",
                inversions(&entries)
            );
            let pool = format!("{{{channel}}}:optimus:{stream}:*");
            assert!(
                keys_on(&cluster, cluster.master_of(&channel), &pool) >= 2,
                "{mode}: the pool's clock and members beside the channel"
            );
        }
        // The operator's commands work on the cluster too.
        for command in [
            &["audit", "--published", "3000"][..],
            &["streams", "info", &stream],
            &["health"],
            &["ctl", "status"],
        ] {
            let out = support::run_optimus(command, &env, Duration::from_secs(20));
            assert!(
                out.status.success(),
                "{mode}: optimus {command:?} on the cluster:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The kill switch reaches the workers wherever its key lives.
        let out = support::run_optimus(&["ctl", "stop"], &env, Duration::from_secs(20));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            consume.wait_exit(Duration::from_secs(20)).success(),
            "{}",
            consume.describe()
        );
        let out = support::run_optimus(&["ctl", "resume"], &env, Duration::from_secs(20));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A stream name whose slot another master serves than the channel's.
fn stream_apart_from(cluster: &RedisCluster, channel: &str) -> String {
    let home = cluster.master_of(channel);
    (0..100)
        .map(|i| format!("out:{i}"))
        .find(|s| cluster.master_of(s) != home)
        .expect("a stream on another shard")
}

/// The master serving the channel is SIGKILLed while messages flow at
/// 1,000/s, published through another master (classic Pub/Sub relays them
/// cluster-wide, as a service's own publisher would). Its replica takes
/// over; the workers subscribe again there. What was published meanwhile
/// reached no worker: the bridge counts that gap and its length, and the
/// loss here must fit in it. Nothing is written twice, and what is published
/// after the failover all arrives.
#[test]
fn the_channel_s_master_killed_mid_run_loses_only_the_counted_gap() {
    let mut cluster = RedisCluster::start(3, 1);
    let channel = "messages:published";
    let stream = stream_apart_from(&cluster, channel);
    let channel_home = cluster.master_of(channel);
    let seeds = cluster.seeds();
    let mut all = vec![
        ("REDIS_URL", seeds.as_str()),
        ("OUTPUT_STREAM", stream.as_str()),
        ("CONSUMERS_COUNT", "3"),
        ("MONITORING_INTERVAL", "0.2"),
    ];
    let consume = OptimusProcess::spawn(&["consume"], &all);
    consume.wait_consumers(3);

    // A plain connection to a master that stays up.
    let bystander = cluster.master_of(&stream);
    let bystander_url = format!("redis://127.0.0.1:{bystander}");
    let mut publisher = OptimusProcess::spawn(
        &[
            "publish",
            "--rate",
            "1000",
            "--duration",
            "8",
            "--batch-size",
            "20",
            "--no-fast-path",
        ],
        &[("REDIS_URL", bystander_url.as_str())],
    );
    std::thread::sleep(Duration::from_secs(2));
    cluster.kill(channel_home);
    cluster.wait_healthy(6, Duration::from_secs(30));
    assert!(
        publisher.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        publisher.describe()
    );
    let published = published(&publisher);
    let (tally, monitor) = outcome(
        &cluster,
        &consume,
        &stream,
        published,
        published,
        Duration::from_secs(30),
    );
    let (gaps, gap_ms) = (monitor.num("gaps"), monitor.num("gap_ms"));
    eprintln!(
        "failover of the channel's master: published {published}, {tally}; bridge: reconnects={} gaps={gaps} gap_ms={gap_ms}",
        monitor.num("reconnects"),
    );
    assert!(
        tally.duplicated.is_empty() && tally.unexpected == 0,
        "{tally}"
    );
    assert!(
        gaps >= 1 && monitor.num("reconnects") >= 3,
        "the lost subscriptions are counted\n{}",
        consume.describe()
    );
    // At 1,000/s, the counted gap (plus a second of slack for batching)
    // bounds what can be missing.
    assert!(
        (tally.missing.len() as u64) <= gap_ms + 1000,
        "the loss fits in the counted gap of {gap_ms} ms: {tally}"
    );
    let late: Vec<u64> = tally
        .missing
        .iter()
        .copied()
        .filter(|s| s + 1000 >= published)
        .collect();
    assert!(
        late.is_empty(),
        "the bridge went on after the failover: {tally}\n{}",
        consume.describe()
    );
    all.clear();
}

/// The master serving the stream is SIGKILLed mid-run: writes fail until its
/// replica is promoted; the workers keep their copies and write them then.
/// Nothing is written twice and nothing the workers held is lost. (Redis
/// replicates asynchronously: a write confirmed by the old master an instant
/// before it died can be missing on the new one; that count is printed.)
#[test]
fn the_stream_s_master_killed_mid_run_delays_but_keeps_the_messages() {
    let mut cluster = RedisCluster::start(3, 1);
    let channel = "messages:published";
    let stream = stream_apart_from(&cluster, channel);
    let seeds = cluster.seeds();
    let env = [
        ("REDIS_URL", seeds.as_str()),
        ("OUTPUT_STREAM", stream.as_str()),
    ];
    let (consume, mut publisher) = flowing(&env, 8);
    cluster.kill(cluster.master_of(&stream));
    cluster.wait_healthy(6, Duration::from_secs(30));
    assert!(
        publisher.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        publisher.describe()
    );
    let published = published(&publisher);
    let (tally, monitor) = outcome(
        &cluster,
        &consume,
        &stream,
        published,
        50,
        Duration::from_secs(30),
    );
    eprintln!(
        "failover of the stream's master: published {published}, {tally}; bridge: errors={} reconnects={} gaps={}",
        monitor.num("errors"),
        monitor.num("reconnects"),
        monitor.num("gaps"),
    );
    assert!(
        tally.duplicated.is_empty() && tally.unexpected == 0,
        "{tally}"
    );
    // (Each subscription's cluster client also loses its connection to the
    // dead node; not knowing which node it was, it subscribes again and
    // counts a short gap: counted conservatively, never hidden.)
    assert!(
        !consume.stderr().contains("NoScript"),
        "the scripts are loaded on every node\n{}",
        consume.describe()
    );
    assert!(
        tally.missing.len() <= 50,
        "at most the writes replication had not carried over are missing: {tally}"
    );
}

/// Once `stream` holds all but `may_miss` of the `published` messages and
/// the workers have settled: what it holds against them, and the workers'
/// last monitoring line.
fn outcome(
    cluster: &RedisCluster,
    consume: &OptimusProcess,
    stream: &str,
    published: u64,
    may_miss: u64,
    settle_within: Duration,
) -> (Tally, support::Fields) {
    support::wait_for(
        &format!(
            "{stream} to hold at least {} messages",
            published - may_miss
        ),
        Duration::from_secs(30),
        || (xlen(cluster, stream) as u64 >= published - may_miss).then_some(()),
        || consume.describe(),
    );
    consume.wait_settled(settle_within);
    let tally = Tally::of(&stream_entries(&mut cluster.conn(), stream), 0..published);
    let monitor = consume.latest_line("monitor ").expect("a monitoring line");
    (tally, monitor)
}

/// Once the publisher has ended: its summary, and the stream's tally and
/// the bridge's latest monitoring line once every message it published
/// should be in the stream.
fn all_written(
    cluster: &RedisCluster,
    publisher: &mut OptimusProcess,
    consume: &OptimusProcess,
    stream: &str,
) -> (support::Fields, Tally, support::Fields) {
    assert!(
        publisher.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        publisher.describe()
    );
    let summary = summary(publisher);
    let published = summary.num("published");
    let (tally, monitor) = outcome(
        cluster,
        consume,
        stream,
        published,
        0,
        Duration::from_secs(30),
    );
    (summary, tally, monitor)
}

/// `optimus publish`'s summary line.
fn summary(publisher: &OptimusProcess) -> support::Fields {
    publisher
        .stdout()
        .lines()
        .find(|l| l.starts_with("publish done"))
        .map(support::Fields::parse)
        .unwrap_or_else(|| panic!("{}", publisher.describe()))
}

fn published(publisher: &OptimusProcess) -> u64 {
    summary(publisher).num("published")
}

/// Three workers with these settings, and a publisher at 1,000 messages/s
/// for `seconds`, two seconds into its run.
fn flowing(env: &[(&str, &str)], seconds: u32) -> (OptimusProcess, OptimusProcess) {
    let mut all = env.to_vec();
    all.extend([("CONSUMERS_COUNT", "3"), ("MONITORING_INTERVAL", "0.2")]);
    let consume = OptimusProcess::spawn(&["consume"], &all);
    consume.wait_consumers(3);
    let seconds = seconds.to_string();
    let publisher = OptimusProcess::spawn(
        &[
            "publish",
            "--rate",
            "1000",
            "--duration",
            &seconds,
            "--batch-size",
            "20",
        ],
        env,
    );
    std::thread::sleep(Duration::from_secs(2));
    (consume, publisher)
}

/// Several routes on a cluster: each stream is written on the master that
/// serves it (its ACK keys beside it), so the streams spread over the
/// shards; a pattern route works too (classic Pub/Sub reaches every node).
#[test]
fn routes_write_each_stream_on_its_own_shard() {
    let cluster = RedisCluster::start(3, 0);
    let orders = "orders:out";
    let payments = stream_apart_from(&cluster, orders);
    let routes = format!("orders={orders},payments={payments},events:*={{channel}}:out");
    let seeds = cluster.seeds();
    let consume = OptimusProcess::spawn(
        &["consume"],
        &[
            ("REDIS_URL", seeds.as_str()),
            ("ROUTES", routes.as_str()),
            ("CONSUMERS_COUNT", "3"),
            ("MONITORING_INTERVAL", "0.2"),
        ],
    );
    consume.wait_consumers(3);
    for (channel, count) in [("orders", 1000), ("payments", 600), ("events:eu", 400)] {
        let done = publish_with(
            &[("REDIS_URL", seeds.as_str()), ("INPUT_CHANNEL", channel)],
            &["--count", &count.to_string(), "--no-fast-path"],
        );
        // A node's PUBLISH counts only its own subscribers: the pattern's
        // subscription is on the pattern's node, reached over the bus.
        if !channel.starts_with("events:") {
            assert_eq!(
                done.num("no_subscriber"),
                0,
                "{channel}: the workers got it"
            );
        }
    }
    for (stream, count) in [
        (orders, 1000),
        (payments.as_str(), 600),
        ("events:eu:out", 400),
    ] {
        support::wait_for(
            &format!("{count} entries in {stream}"),
            Duration::from_secs(30),
            || (xlen(&cluster, stream) >= count).then_some(()),
            || consume.describe(),
        );
        consume.wait_settled(Duration::from_secs(20));
        assert_exactly_once(
            &stream_entries(&mut cluster.conn(), stream),
            0..count as u64,
        );
        let home = cluster.master_of(stream);
        assert_eq!(
            keys_on(&cluster, home, &format!("{{{stream}}}:ack:*")),
            count,
            "{stream}'s ACK keys are on its master"
        );
    }
    assert_ne!(cluster.master_of(orders), cluster.master_of(&payments));

    // `streams list` finds the streams on every master, not one node's.
    let out = support::run_optimus(
        &["streams", "list", "--json"],
        &[("REDIS_URL", seeds.as_str())],
        Duration::from_secs(20),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<serde_json::Value> = serde_json::from_str(&stdout).expect("JSON list");
    let listed: Vec<(&str, u64)> = listed
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        listed,
        [
            ("events:eu:out", 400),
            (orders, 1000),
            (payments.as_str(), 600)
        ],
        "streams list, sorted by name"
    );
}

/// `optimus work` on a cluster: two consumers handle and acknowledge the
/// entries; one that keeps failing goes to `{stream}:work-dead`, in the
/// stream's slot, so its move and acknowledgement are one script.
#[test]
fn work_handles_and_dead_letters_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let stream = "jobs:out";
    let mut conn = cluster.conn();
    for payload in ["a", "b", "bad", "c"] {
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("payload")
            .arg(payload)
            .query(&mut conn)
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("handled");
    let script = format!(
        r#"p=$(cat); if [ "$p" = bad ]; then exit 3; fi; echo "$p" >> {}"#,
        out.display()
    );
    let seeds = cluster.seeds();
    let mut worker = OptimusProcess::spawn(
        &["work", "--", "sh", "-c", &script],
        &[
            ("REDIS_URL", seeds.as_str()),
            ("OUTPUT_STREAM", stream),
            ("WORK_CONSUMERS", "2"),
            // One entry in hand at a time, and a claim only after a second:
            // an entry is handled again only when its worker failed it.
            ("WORK_BATCH_SIZE", "1"),
            ("WORK_CLAIM_IDLE", "1"),
            ("WORK_MAX_DELIVERIES", "2"),
            ("MONITORING_INTERVAL", "0.2"),
        ],
    );
    let line = worker.wait_for_line("work ", Duration::from_secs(30), |f| {
        f.num("handled") == 3 && f.num("dead") == 1
    });
    assert_eq!(line.num("errors"), 0, "{}", worker.describe());
    let mut handled: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    handled.sort();
    assert_eq!(handled, ["a", "b", "c"]);

    let dead_stream = "{jobs:out}:work-dead";
    assert_eq!(cluster.master_of(dead_stream), cluster.master_of(stream));
    let dead = stream_entries(&mut conn, dead_stream);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["payload"], b"bad");
    assert_eq!(dead[0]["stream"], stream.as_bytes());
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg("optimus-work")
        .query(&mut conn)
        .unwrap();
    let redis::Value::Array(summary) = pending else {
        panic!("{pending:?}")
    };
    assert_eq!(
        redis::from_redis_value::<u64>(summary[0].clone()).unwrap(),
        0,
        "everything handled or dead-lettered is acknowledged"
    );
    worker.signal("TERM");
    assert!(
        worker.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        worker.describe()
    );
}

/// With sharded Pub/Sub (the fenced core), the channel's slot moves to
/// another master, with the pool's clock and members in it (MIGRATE), while
/// messages flow: the old master ends the subscriptions (SUNSUBSCRIBE), the
/// readers subscribe again on the new one (each counted as a reconnect), and
/// what reached no worker meanwhile is written by the publisher's fast path:
/// every message lands exactly once.
#[test]
fn a_sharded_channel_s_slot_moving_is_followed_and_nothing_is_lost() {
    let cluster = RedisCluster::start(3, 0);
    let seeds = cluster.seeds();
    let channel = "messages:published";
    let stream = stream_apart_from(&cluster, channel);
    let env = [
        ("REDIS_URL", seeds.as_str()),
        ("PUBSUB_MODE", "sharded"),
        ("OUTPUT_STREAM", stream.as_str()),
    ];
    let (consume, mut publisher) = flowing(&env, 6);
    let from = cluster.master_of(channel);
    let to = cluster.master_of(&stream);
    cluster.move_slot(cluster.slot_of(channel), from, to);
    assert_eq!(cluster.master_of(channel), to, "the slot moved");
    assert!(
        publisher.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        publisher.describe()
    );
    let done = summary(&publisher);
    let published = done.num("published");
    let (tally, monitor) = outcome(
        &cluster,
        &consume,
        &stream,
        published,
        0,
        Duration::from_secs(20),
    );
    eprintln!(
        "slot move: published {published}, no_subscriber {}, {tally}; bridge: reconnects={} gaps={} gap_ms={}",
        done.num("no_subscriber"),
        monitor.num("reconnects"),
        monitor.num("gaps"),
        monitor.num("gap_ms"),
    );
    assert!(tally.is_exact(), "{tally}");
    assert!(
        monitor.num("reconnects") >= 1,
        "the readers' resubscriptions are counted\n{}",
        consume.describe()
    );
    // The workers came back: most messages reached them, not the fast path.
    assert!(
        done.num("no_subscriber") < published / 2,
        "the workers subscribed again on the new master: {}",
        done.line
    );
}

/// A cluster that speaks only mutual TLS to clients (and TLS on its bus):
/// the bridge, the publisher and `streams list` reach every node through
/// `rediss://` seeds with the certificates given once; a client without a
/// certificate is one error line and exit 1, not a retry loop.
#[test]
fn mutual_tls_to_a_cluster_delivers_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::certs::TestCa::new(dir.path(), "cluster");
    let cluster = RedisCluster::start_tls(3, &ca);
    let client = ca.client("bridge");
    let seeds = cluster.tls_seeds();
    let file = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (ca_file, cert, key) = (file(&ca.cert_file), file(&client.cert), file(&client.key));
    let stream = "tls:out";
    let env = [
        ("REDIS_URL", seeds.as_str()),
        ("REDIS_TLS_CA_FILE", ca_file.as_str()),
        ("REDIS_TLS_CERT_FILE", cert.as_str()),
        ("REDIS_TLS_KEY_FILE", key.as_str()),
        ("OUTPUT_STREAM", stream),
        ("PUBSUB_MODE", "sharded"),
    ];
    let mut all = env.to_vec();
    all.extend([("CONSUMERS_COUNT", "3"), ("MONITORING_INTERVAL", "0.2")]);
    let consume = OptimusProcess::spawn(&["consume"], &all);
    consume.wait_consumers(3);
    let done = publish_with(&env, &["--count", "2000", "--no-fast-path"]);
    assert_eq!(
        done.num("no_subscriber"),
        0,
        "every SPUBLISH reached the workers"
    );
    support::wait_for(
        "2000 entries",
        Duration::from_secs(30),
        || (xlen(&cluster, stream) >= 2000).then_some(()),
        || consume.describe(),
    );
    consume.wait_settled(Duration::from_secs(20));
    assert_exactly_once(&stream_entries(&mut cluster.conn(), stream), 0..2000);

    let out = support::run_optimus(&["streams", "list"], &env, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(stream) && stdout.contains("2000"),
        "streams list over TLS:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same seeds without a client certificate: refused by every node.
    let out = support::run_optimus(&["consume"], &env[..2], Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line:\n{stderr}");
    assert!(stderr.to_lowercase().contains("tls"), "{stderr}");
}

/// A worker stopped (SIGSTOP) for longer than ACK_TTL on a cluster, where
/// messages have no positions, then resumed: what waited for it in the
/// server's buffer and in its own queues is older than every ACK, and must
/// not be written again. (Short TTLs, so that the pause stays short; the
/// single-server case at default settings is in `tests/faults.rs`.)
#[test]
fn a_worker_stopped_past_the_ack_ttl_on_a_cluster_writes_nothing_twice() {
    let cluster = RedisCluster::start(3, 0);
    let seeds = cluster.seeds();
    let env = [
        ("REDIS_URL", seeds.as_str()),
        ("CONSUMERS_COUNT", "1"),
        ("MONITORING_INTERVAL", "0.2"),
        ("LOCK_TTL", "1"),
        ("PENDING_RETENTION", "2"),
        ("ACK_TTL", "4"),
    ];
    let stopped = OptimusProcess::spawn(&["consume"], &env);
    let other = OptimusProcess::spawn(&["consume"], &env);
    other.wait_consumers(2);
    let mut publisher = OptimusProcess::spawn(
        &[
            "publish",
            "--rate",
            "500",
            "--duration",
            "14",
            "--batch-size",
            "10",
        ],
        &env[..1],
    );
    std::thread::sleep(Duration::from_secs(3));
    stopped.signal("STOP");
    std::thread::sleep(Duration::from_secs(8));
    stopped.signal("CONT");
    assert!(
        publisher.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        publisher.describe()
    );
    let published = published(&publisher);
    support::wait_for(
        &format!("messages:processed to hold {published} messages"),
        Duration::from_secs(30),
        || (xlen(&cluster, "messages:processed") as u64 >= published).then_some(()),
        || other.describe(),
    );
    stopped.wait_settled(Duration::from_secs(30));
    other.wait_settled(Duration::from_secs(30));
    let tally = Tally::of(
        &stream_entries(&mut cluster.conn(), "messages:processed"),
        0..published,
    );
    assert!(
        tally.duplicated.is_empty() && tally.missing.is_empty() && tally.unexpected == 0,
        "{tally}\n{}",
        stopped.describe()
    );
    assert!(
        stopped
            .stderr()
            .contains("this process was stopped for a while"),
        "the pause was noticed: {}",
        stopped.describe()
    );
    assert!(
        !other.stderr().contains("this process was stopped"),
        "no pause where there was none: {}",
        other.describe()
    );
}

/// Redis commands the bridge made (all but the publisher's and the test's
/// own), summed over the masters since `reset_stats`.
fn bridge_commands(cluster: &RedisCluster) -> u64 {
    const OWN: [&str; 17] = [
        "spublish", "publish", "info", "config", "cluster", "hello", "client", "ping", "command",
        "xlen", "xrange", "readonly", "keys", "memory", "role", "type", "hlen",
    ];
    cluster
        .commands()
        .iter()
        .filter(|(name, _)| !OWN.contains(&name.split('|').next().unwrap_or_default()))
        .map(|(_, n)| n)
        .sum()
}

/// What every key but the streams takes on the masters (MEMORY USAGE).
fn protocol_bytes(cluster: &RedisCluster) -> u64 {
    let mut bytes = 0;
    for node in &cluster.nodes {
        let Ok(role) = node.query::<Vec<redis::Value>>(&["ROLE"]) else {
            continue;
        };
        if !matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master") {
            continue;
        }
        let keys: Vec<String> = node.query(&["KEYS", "*"]).unwrap_or_default();
        for key in keys {
            let kind: String = node.query(&["TYPE", &key]).unwrap_or_default();
            if kind != "stream" {
                bytes += node
                    .query::<Option<u64>>(&["MEMORY", "USAGE", &key])
                    .ok()
                    .flatten()
                    .unwrap_or(0);
            }
        }
    }
    bytes
}

/// The fenced core on a cluster (sharded Pub/Sub, its default there) with
/// 1, 2 and 6 workers in 1 to 3 processes, each pool writing a stream on
/// another master than its channel's: every message once, in publish
/// order; Redis commands per message flat with the workers (at most 1.5:
/// the batches' XADDs, a write script per batch, the cycles), and at most
/// 16 B per message of protocol memory (no key per message).
#[test]
fn fenced_on_a_cluster_writes_once_in_order_at_flat_cost() {
    const MESSAGES: u64 = 20_000;
    let cluster = RedisCluster::start(3, 1);
    let seeds = cluster.seeds();
    let channel = "messages:published";
    let home = cluster.master_of(channel);
    let mut costs = Vec::new();
    for (workers, processes) in [(1, 1), (2, 2), (6, 3)] {
        let stream = (0..100)
            .map(|i| format!("fenced:{workers}:{i}"))
            .find(|s| cluster.master_of(s) != home)
            .expect("a stream on another shard");
        let per_process = (workers / processes).to_string();
        let env = [
            ("REDIS_URL", seeds.as_str()),
            ("PUBSUB_MODE", "sharded"),
            ("OUTPUT_STREAM", stream.as_str()),
        ];
        let mut all = env.to_vec();
        all.extend([
            ("CONSUMERS_COUNT", per_process.as_str()),
            ("MONITORING_INTERVAL", "0.2"),
        ]);
        let pool: Vec<OptimusProcess> = (0..processes)
            .map(|_| OptimusProcess::spawn(&["consume"], &all))
            .collect();
        for process in &pool {
            process.wait_consumers(workers as u64);
        }
        let members = format!("{{{channel}}}:optimus:{stream}:members");
        support::wait_for(
            &format!("{processes} members in {members}"),
            Duration::from_secs(20),
            || {
                let n: usize = redis::cmd("HLEN")
                    .arg(&members)
                    .query(&mut cluster.conn())
                    .unwrap_or(0);
                (n == processes).then_some(())
            },
            || pool.iter().map(OptimusProcess::describe).collect(),
        );
        let witness = Witness::sharded(channel, cluster.locator(channel));
        cluster.reset_stats();
        let count = MESSAGES.to_string();
        let done = publish_with(&env, &["--count", &count, "--batch-size", "1000"]);
        eprintln!("{}", done.line);
        assert_eq!(done.num("no_subscriber"), 0, "{}", done.line);
        support::wait_for(
            &format!("{MESSAGES} entries in {stream}"),
            Duration::from_secs(60),
            || (xlen(&cluster, &stream) as u64 >= MESSAGES).then_some(()),
            || pool.iter().map(OptimusProcess::describe).collect(),
        );
        for process in &pool {
            process.wait_settled(Duration::from_secs(20));
        }
        let commands = bridge_commands(&cluster) as f64 / MESSAGES as f64;
        let bytes = protocol_bytes(&cluster) as f64 / MESSAGES as f64;
        let entries = stream_entries(&mut cluster.conn(), &stream);
        assert_exactly_once(&entries, 0..MESSAGES);
        assert_eq!(
            support::out_of_order(&entries, &witness.order()),
            0,
            "{workers} workers: the stream is in publish order: {:?}",
            inversions(&entries)
        );
        eprintln!(
            "fenced on a cluster, {workers} workers in {processes} processes: {commands:.2} commands/msg, {bytes:.2} B/msg"
        );
        assert!(
            commands <= 1.5,
            "{workers} workers: {commands:.2} Redis commands per message (at most 1.5)\n{:?}",
            cluster.commands()
        );
        assert!(
            bytes <= 16.0,
            "{workers} workers: {bytes:.1} B of protocol memory per message"
        );
        costs.push(commands);
        drop(pool);
    }
    assert!(
        costs[2] <= costs[0] * 1.25 + 0.05,
        "commands per message stay flat from 1 to 6 workers: {costs:?}"
    );
}

/// A fenced pool (one process, two workers) on a cluster with sharded
/// Pub/Sub, writing a stream on another master than the channel's; a
/// witness of the channel; and a publisher at 1,000 messages/s in parts of
/// 20 with `publish_args` besides, two seconds into its run.
struct Flow {
    stream: String,
    consume: OptimusProcess,
    witness: Witness,
    publisher: OptimusProcess,
}

impl Flow {
    fn start(cluster: &RedisCluster, channel: &str, publish_args: &[&str]) -> Self {
        Self::start_with(cluster, channel, publish_args, &[])
    }

    /// The same, with `both` in the environment of the bridge and the
    /// publisher.
    fn start_with(
        cluster: &RedisCluster,
        channel: &str,
        publish_args: &[&str],
        both: &[(&str, &str)],
    ) -> Self {
        let stream = stream_apart_from(cluster, channel);
        let seeds = cluster.seeds();
        let mut env = vec![
            ("REDIS_URL", seeds.as_str()),
            ("PUBSUB_MODE", "sharded"),
            ("OUTPUT_STREAM", stream.as_str()),
        ];
        env.extend_from_slice(both);
        let consume = Self::bridge(cluster, &stream, both);
        let witness = Witness::sharded(channel, cluster.locator(channel));
        let mut args = vec!["publish", "--rate", "1000", "--batch-size", "20"];
        args.extend_from_slice(publish_args);
        let publisher = OptimusProcess::spawn(&args, &env);
        std::thread::sleep(Duration::from_secs(2));
        Self {
            stream,
            consume,
            witness,
            publisher,
        }
    }

    /// The bridge: one fenced process with two workers and `more`
    /// settings, subscribed.
    fn bridge(cluster: &RedisCluster, stream: &str, more: &[(&str, &str)]) -> OptimusProcess {
        let seeds = cluster.seeds();
        let mut env = vec![
            ("REDIS_URL", seeds.as_str()),
            ("PUBSUB_MODE", "sharded"),
            ("OUTPUT_STREAM", stream),
            ("CONSUMERS_COUNT", "2"),
            ("MONITORING_INTERVAL", "0.2"),
        ];
        env.extend_from_slice(more);
        let consume = OptimusProcess::spawn(&["consume"], &env);
        consume.wait_consumers(2);
        consume
    }
}

/// The fenced core on a cluster, with messages flowing at 1,000/s: the
/// master of the channel's slot is SIGKILLed and its replica promoted, then
/// the master of the stream's slot. Nothing is written twice, the stream
/// stays in publish order, the readers' gap is counted and what is missing
/// fits in it (and in what asynchronous replication had not carried to the
/// promoted replica, at most 100 here), and what is published after the
/// failovers is all written.
#[test]
fn fenced_on_a_cluster_follows_its_masters_killed_mid_run() {
    let mut cluster = RedisCluster::start(3, 1);
    let channel = "messages:published";
    let flow = Flow::start(&cluster, channel, &["--duration", "12", "--no-fast-path"]);
    let (stream, consume, witness, mut publisher) =
        (flow.stream, flow.consume, flow.witness, flow.publisher);
    cluster.kill(cluster.master_of(channel));
    cluster.wait_healthy(6, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    cluster.kill(cluster.master_of(&stream));
    cluster.wait_healthy(6, Duration::from_secs(30));
    assert!(
        publisher.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        publisher.describe()
    );
    let published = published(&publisher);
    let (tally, monitor) = outcome(
        &cluster,
        &consume,
        &stream,
        published,
        published / 2,
        Duration::from_secs(30),
    );
    let (gaps, gap_ms) = (monitor.num("gaps"), monitor.num("gap_ms"));
    eprintln!(
        "fenced, both masters killed: published {published}, {tally}; bridge: reconnects={} gaps={gaps} gap_ms={gap_ms}",
        monitor.num("reconnects"),
    );
    assert!(
        tally.duplicated.is_empty() && tally.unexpected == 0,
        "{tally}"
    );
    let entries = stream_entries(&mut cluster.conn(), &stream);
    assert_eq!(
        support::out_of_order(&entries, &witness.order()),
        0,
        "the stream stays in publish order"
    );
    assert!(
        gaps >= 1,
        "the lost subscriptions are counted\n{}",
        consume.describe()
    );
    assert!(
        (tally.missing.len() as u64) <= gap_ms + 1000 + 100,
        "the loss fits in the counted gap of {gap_ms} ms: {tally}"
    );
    let late: Vec<u64> = tally
        .missing
        .iter()
        .copied()
        .filter(|s| s + 1000 >= published)
        .collect();
    assert!(
        late.is_empty(),
        "the bridge went on after the failovers: {tally}\n{}",
        consume.describe()
    );
}

/// MIN_REPLICAS_ACKED=1 on a cluster (three masters, a replica each), the
/// fenced core with sharded Pub/Sub, messages flowing at 1,000/s: the
/// master of the channel's slot is SIGKILLed, its replica promoted, and it
/// comes back as that one's replica (empty, then a copy); then the same for
/// the master of the stream's slot. A write counts only once a replica
/// holds it, so the failovers take nothing back for good: nothing lost,
/// nothing written twice, in publish order.
#[test]
fn with_min_replicas_acked_each_master_killed_on_a_cluster_loses_nothing() {
    let mut cluster = RedisCluster::start(3, 1);
    let channel = "messages:published";
    let acked = [("MIN_REPLICAS_ACKED", "1")];
    let flow = Flow::start_with(&cluster, channel, &["--duration", "16"], &acked);
    let (stream, consume, witness, mut publisher) =
        (flow.stream, flow.consume, flow.witness, flow.publisher);
    for key in [channel, stream.as_str()] {
        let master = cluster.master_of(key);
        cluster.kill(master);
        cluster.wait_healthy(6, Duration::from_secs(30));
        cluster.restart(master);
        std::thread::sleep(Duration::from_secs(1));
    }
    let (summary, tally, monitor) = all_written(&cluster, &mut publisher, &consume, &stream);
    eprintln!(
        "MIN_REPLICAS_ACKED=1, both masters killed and back as replicas: {tally}; publisher: {}; bridge: reconnects={} gaps={} gap_ms={}",
        summary.line,
        monitor.num("reconnects"),
        monitor.num("gaps"),
        monitor.num("gap_ms"),
    );
    assert!(tally.is_exact(), "{tally}\n{}", consume.describe());
    let waits = cluster.commands().get("wait").copied().unwrap_or(0);
    assert!(
        waits > 0,
        "the promoted masters were asked to WAIT for their replicas"
    );
    let entries = stream_entries(&mut cluster.conn(), &stream);
    assert_eq!(
        support::out_of_order(&entries, &witness.order()),
        0,
        "the stream stays in publish order: its seqs run {:?}\n{}",
        inversions(&entries),
        consume.describe()
    );
}

/// Sharded Pub/Sub on a cluster, another service subscribed to the channel
/// too (a witness), messages flowing at 1,000/s: the bridge stops (SIGTERM,
/// so it writes what it holds) and a new one starts two seconds later. Meanwhile what is published
/// reaches the witness but no worker: the publisher asks the bridge's own
/// probe (in the channel's slot), not the channel's subscriber count, so
/// its fast path writes those messages (counting the witness, it would
/// think them delivered and lose them). Nothing lost, nothing written
/// twice.
#[test]
fn another_subscriber_does_not_hide_a_missing_bridge_from_the_publisher() {
    let cluster = RedisCluster::start(3, 0);
    let channel = "messages:published";
    let flow = Flow::start(&cluster, channel, &["--duration", "8"]);
    let (stream, mut first, witness, mut publisher) =
        (flow.stream, flow.consume, flow.witness, flow.publisher);
    first.signal("TERM");
    assert!(
        first.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        first.describe()
    );
    std::thread::sleep(Duration::from_secs(2));
    let consume = Flow::bridge(&cluster, &stream, &[]);
    let (summary, tally, _) = all_written(&cluster, &mut publisher, &consume, &stream);
    eprintln!(
        "bridge stopped, a witness subscribed: {tally}; publisher: {}; the witness saw {}",
        summary.line,
        witness.order().len()
    );
    assert!(
        tally.is_exact(),
        "{tally}\n{}\n{}",
        first.describe(),
        consume.describe()
    );
    assert!(
        summary.num("stored_directly") > 0,
        "the fast path wrote what was published while no bridge was subscribed: {}",
        summary.line
    );
}

/// The stream's `seq`s as runs of consecutive ones (`first-last`), up to
/// 20 of them, when it goes back anywhere.
fn inversions(entries: &[std::collections::BTreeMap<String, Vec<u8>>]) -> Vec<String> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for seq in support::seqs(entries) {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => runs.push((seq, seq)),
        }
    }
    runs.iter()
        .take(20)
        .map(|(a, b)| format!("{a}-{b}"))
        .collect()
}

/// Race on a cluster (classic Pub/Sub, its default there): every worker
/// has its own subscription, so each holds a copy of every message. With
/// the writes stalled (CLIENT PAUSE WRITE on the stream's master) a burst
/// fills the memory budget: the other workers drop their copies at a
/// quarter of it, the process's keeper holds every message, and once writes resume
/// each is written once. (A bound of 2,048 messages per worker here,
/// as before, lost most of such a burst in every worker at once.)
#[test]
fn a_race_pool_on_a_cluster_keeps_a_burst_past_its_workers_share_of_memory() {
    let cluster = RedisCluster::start(3, 0);
    let seeds = cluster.seeds();
    let channel = "in:burst";
    let stream = (0..)
        .map(|n| format!("out:burst:{n}"))
        .find(|s| cluster.master_of(s) != cluster.master_of(channel))
        .unwrap();
    let env = [
        ("REDIS_URL", seeds.as_str()),
        ("INPUT_CHANNEL", channel),
        ("OUTPUT_STREAM", stream.as_str()),
    ];
    let mut all = env.to_vec();
    // 16,000 messages of about 350 bytes each in the budget (5.3 MiB): more
    // than the others' quarter of 8 MiB (the least MEMORY_LIMIT), less than
    // the keeper's three quarters.
    all.extend([
        ("CONSUMERS_COUNT", "4"),
        ("MEMORY_LIMIT", "8MiB"),
        ("MONITORING_INTERVAL", "0.2"),
    ]);
    let consume = OptimusProcess::spawn(&["consume"], &all);
    consume.wait_consumers(4);

    let writes = cluster.node(cluster.master_of(&stream));
    let _: String = writes
        .query(&["CLIENT", "PAUSE", "60000", "WRITE"])
        .expect("CLIENT PAUSE");
    let summary = publish_with(&env, &["--count", "16000", "--no-fast-path"]);
    assert_eq!(summary.num("published"), 16_000, "{}", summary.line);
    // The other workers' copies dropped: the budget was spent past half.
    consume.wait_for_latest("monitor ", Duration::from_secs(30), |line| {
        line.num("overflow") > 0
    });
    let _: String = writes
        .query(&["CLIENT", "UNPAUSE"])
        .expect("CLIENT UNPAUSE");
    support::wait_for(
        &format!("16000 entries in {stream}"),
        Duration::from_secs(60),
        || (xlen(&cluster, &stream) >= 16_000).then_some(()),
        || consume.describe(),
    );
    consume.wait_settled(Duration::from_secs(20));
    let entries = stream_entries(&mut cluster.conn(), &stream);
    assert_exactly_once(&entries, 0..16_000);
}

/// Sharded Pub/Sub where the server has it (Redis 7.0 and later): the bridge
/// runs. Where it does not (Redis 6.2, in `tests/servers.sh`'s matrix), it
/// says so in one line at start and exits 1, rather than retrying forever.
#[test]
fn sharded_pubsub_runs_where_the_server_has_it_and_says_so_where_not() {
    let cluster = RedisCluster::start(3, 0);
    let seeds = cluster.seeds();
    let info: String = cluster.nodes[0].query(&["INFO", "server"]).unwrap();
    let major: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .and_then(|v| v.split('.').next()?.trim().parse().ok())
        .expect("redis_version");
    let env = [
        ("REDIS_URL", seeds.as_str()),
        ("PUBSUB_MODE", "sharded"),
        ("MONITORING_INTERVAL", "0.2"),
    ];
    let mut consume = OptimusProcess::spawn(&["consume"], &env);
    if major >= 7 {
        consume.wait_consumers(2);
        return;
    }
    let status = consume.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", consume.describe());
    let lines = consume.error_lines();
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    assert!(
        lines[0].contains("PUBSUB_MODE=sharded needs Redis 7.0"),
        "{lines:?}"
    );
}
