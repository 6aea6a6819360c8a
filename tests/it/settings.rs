//! Bad settings, wrong credentials, an unreachable server: what the user sees.

use crate::support;

use std::time::Duration;

use support::{OptimusProcess, RedisServer, free_port, run_optimus};

/// The settings given, the variable the error must name, and its value.
type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);

/// Each bad setting exits 2 with exactly one line on stderr that names the
/// variable and the value, before any connection is tried.
#[test]
fn bad_settings_give_one_line_and_exit_code_2() {
    let cases: &[Case] = &[
        (&[("CONSUMERS_COUNT", "abc")], "CONSUMERS_COUNT", "abc"),
        (&[("CONSUMERS_COUNT", "0")], "CONSUMERS_COUNT", "0"),
        (&[("CONSUMERS_COUNT", "-3")], "CONSUMERS_COUNT", "-3"),
        (
            &[("PROCESSING_BATCH_SIZE", "0")],
            "PROCESSING_BATCH_SIZE",
            "0",
        ),
        (
            &[("MONITORING_INTERVAL", "-1")],
            "MONITORING_INTERVAL",
            "-1",
        ),
        (
            &[("MONITORING_INTERVAL", "soon")],
            "MONITORING_INTERVAL",
            "soon",
        ),
        (
            &[("ACK_TTL", "10"), ("PENDING_RETENTION", "30")],
            "ACK_TTL",
            "10",
        ),
        (
            &[("PENDING_RETENTION", "1"), ("LOCK_TTL", "5")],
            "PENDING_RETENTION",
            "1",
        ),
        (&[("TAKEOVER_AFTER", "0.01")], "TAKEOVER_AFTER", "0.01"),
        (&[("TAKEOVER_AFTER", "later")], "TAKEOVER_AFTER", "later"),
        (&[("STRATEGY", "fastest")], "STRATEGY", "fastest"),
        (&[("OUTPUT_FORMAT", "xml")], "OUTPUT_FORMAT", "xml"),
        (&[("METRICS_ADDR", "nowhere")], "METRICS_ADDR", "nowhere"),
        (&[("IDLE_TIMEOUT", "soon")], "IDLE_TIMEOUT", "soon"),
        (&[("LOGLEVEL", "LOUD")], "LOGLEVEL", "LOUD"),
        (&[("REDIS_PORT", "99999")], "REDIS_PORT", "99999"),
        (&[("REDIS_URL", "http://nope")], "REDIS_URL", "http://nope"),
        (&[("OUTPUT_STREAM", "a{b}")], "OUTPUT_STREAM", "a{b}"),
        (&[("REDIS_CLUSTER", "maybe")], "REDIS_CLUSTER", "maybe"),
        (&[("PUBSUB_MODE", "sharded")], "PUBSUB_MODE", "sharded"),
        (&[("PUBSUB_MODE", "loud")], "PUBSUB_MODE", "loud"),
        (&[("MEMORY_LIMIT", "lots")], "MEMORY_LIMIT", "lots"),
        (
            &[("MEMORY_LIMIT", "12 parsecs")],
            "MEMORY_LIMIT",
            "12 parsecs",
        ),
        (&[("DEDUP_WINDOW", "-1")], "DEDUP_WINDOW", "-1"),
        (&[("DEDUP_WINDOW", "a while")], "DEDUP_WINDOW", "a while"),
        (
            &[("MIN_REPLICAS_ACKED", "some")],
            "MIN_REPLICAS_ACKED",
            "some",
        ),
        (&[("MIN_REPLICAS_ACKED", "17")], "MIN_REPLICAS_ACKED", "17"),
        (&[("STANDBYS", "some")], "STANDBYS", "some"),
        (&[("STANDBYS", "65")], "STANDBYS", "65"),
        (&[("STANDBYS", "-1")], "STANDBYS", "-1"),
        (
            &[("MIN_REPLICAS_ACKED", "1"), ("STRATEGY", "race")],
            "MIN_REPLICAS_ACKED",
            "1",
        ),
        (
            &[
                ("MIN_REPLICAS_ACKED", "1"),
                ("REDIS_URL", "redis://127.0.0.1:1,redis://127.0.0.1:2"),
            ],
            "MIN_REPLICAS_ACKED",
            "1",
        ),
        (
            &[
                ("REDIS_URL", "redis://127.0.0.1:1,redis://127.0.0.1:2"),
                ("STRATEGY", "fenced"),
            ],
            "STRATEGY",
            "fenced",
        ),
        (
            &[
                ("REDIS_URL", "redis://127.0.0.1:1,redis://127.0.0.1:2"),
                ("DEAD_LETTER_STREAM", "elsewhere"),
            ],
            "DEAD_LETTER_STREAM",
            "elsewhere",
        ),
    ];
    for (env, var, value) in cases {
        let out = run_optimus(&["consume"], env, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{env:?}: status {:?}, stderr:\n{stderr}",
            out.status
        );
        assert_eq!(
            stderr.lines().count(),
            1,
            "{env:?}: one line, got:\n{stderr}"
        );
        assert!(
            stderr.contains(var) && stderr.contains(value),
            "{env:?}: the line names {var} and {value:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn old_log_level_names_are_accepted() {
    // A bad count still fails, but only after LOGLEVEL=WARNING was accepted.
    let out = run_optimus(
        &["consume"],
        &[("LOGLEVEL", "WARNING"), ("CONSUMERS_COUNT", "x")],
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CONSUMERS_COUNT"), "{stderr}");
}

#[test]
fn help_lists_every_variable_with_its_default() {
    let out = run_optimus(&["consume", "--help"], &[], Duration::from_secs(10));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for (var, default) in [
        ("REDIS_URL", ""),
        ("REDIS_HOST", "localhost"),
        ("REDIS_PORT", "6379"),
        ("REDIS_USERNAME", ""),
        ("REDIS_PASSWORD", ""),
        ("REDIS_PASSWORD_FILE", ""),
        ("REDIS_TLS_CA_FILE", ""),
        ("REDIS_TLS_CERT_FILE", ""),
        ("REDIS_TLS_KEY_FILE", ""),
        ("REDIS_CLUSTER", "0"),
        ("PUBSUB_MODE", "classic"),
        ("CONSUMERS_COUNT", "2"),
        ("PROCESSING_BATCH_SIZE", "100"),
        ("LOGLEVEL", "INFO"),
        ("INPUT_CHANNEL", "messages:published"),
        ("OUTPUT_STREAM", "messages:processed"),
        ("MONITORING_INTERVAL", "3"),
        ("CONSUMERS_LIST", "consumer:ids"),
        ("MESSAGE_ID_FIELD", "message_id"),
        ("LOCK_TTL", "2"),
        ("ACK_TTL", "60"),
        ("PENDING_RETENTION", "30"),
        ("PRESENCE_TTL", "5"),
        ("STRATEGY", ""), // fenced, or race on a cluster: said in its help
        ("TAKEOVER_AFTER", "0.25"),
        ("OUTPUT_FORMAT", "envelope"),
        ("SHUTDOWN_TIMEOUT", "30"),
        ("MAX_PAYLOAD_BYTES", "1048576"),
        ("MEMORY_LIMIT", "256MiB"),
        ("DEDUP_WINDOW", "5"),
    ] {
        let lines: Vec<&str> = help.lines().map(str::trim).collect();
        let at = lines
            .iter()
            .position(|l| *l == format!("[env: {var}=]") || *l == format!("[env: {var}]"))
            .unwrap_or_else(|| panic!("--help shows {var}:\n{help}"));
        if !default.is_empty() {
            assert_eq!(
                lines[at + 1],
                format!("[default: {default}]"),
                "default of {var}"
            );
        }
    }
}

#[test]
fn wrong_credentials_are_one_clear_error_and_exit_1() {
    let server = RedisServer::start_with(&["--requirepass", "right"]);
    for (url, names) in [
        (
            format!("redis://:wrong@127.0.0.1:{}", server.port),
            "REDIS_PASSWORD",
        ),
        (
            format!("redis://127.0.0.1:{}", server.port),
            "REDIS_PASSWORD",
        ),
    ] {
        for command in [&["streams", "list"][..], &["publish", "--count", "1"]] {
            let out = run_optimus(command, &[("REDIS_URL", &url)], Duration::from_secs(20));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{url} {command:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            assert!(
                stderr.contains(names),
                "{url} {command:?} names the setting to fix: {stderr}"
            );
        }
        let out = run_optimus(
            &["consume"],
            &[("REDIS_URL", &url), ("LOGLEVEL", "ERROR")],
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("optimus: "), "{stderr}");
        assert!(
            !stderr.contains("wrong@"),
            "the password is masked: {stderr}"
        );
        assert!(
            last.contains("WRONGPASS") || last.contains("NOAUTH") || last.contains("uthentication"),
            "{url}: says what is wrong: {stderr}"
        );
    }
}

/// With nothing listening, the consumer waits and says so; when a server
/// appears on that port, it starts by itself.
#[test]
fn unreachable_redis_is_retried_until_it_comes() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let mut consume = OptimusProcess::spawn(
        &["consume"],
        &[("REDIS_URL", &url), ("MONITORING_INTERVAL", "0.2")],
    );
    support::wait_for(
        "a 'Redis unreachable' warning",
        Duration::from_secs(20),
        || (consume.stderr().matches("Redis unreachable").count() >= 2).then_some(()),
        || consume.describe(),
    );
    assert!(
        consume.try_exit().is_none(),
        "still running\n{}",
        consume.describe()
    );

    let server = RedisServer::start_on(port);
    consume.wait_for_line("monitor ", Duration::from_secs(30), |f| {
        f.values.get("consumers").map(String::as_str) == Some("2")
    });
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("messages:published")
        .arg("after the wait")
        .query(&mut server.conn())
        .unwrap();
    assert_eq!(receivers, 2);
    support::wait_for(
        "the message in the stream",
        Duration::from_secs(20),
        || (server.xlen("messages:processed") == 1).then_some(()),
        || consume.describe(),
    );
}

#[test]
fn publish_without_a_server_fails_clearly() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let out = run_optimus(
        &["publish", "--count", "10"],
        &[("REDIS_URL", &url)],
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot publish to"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// With no worker running, every PUBLISH reaches nobody; the fast path
/// writes each message straight to the stream, exactly once.
#[test]
fn publish_with_no_consumer_stores_every_message_directly() {
    let server = RedisServer::start();
    let summary = support::publish(&server, &["--count", "2500", "--batch-size", "1000"]);
    assert_eq!(summary.num("published"), 2500, "{}", summary.line);
    assert_eq!(summary.num("no_subscriber"), 2500, "{}", summary.line);
    assert_eq!(summary.num("stored_directly"), 2500, "{}", summary.line);
    support::assert_exactly_once(&server.stream_entries("messages:processed"), 0..2500);
}

#[test]
fn publish_without_the_fast_path_only_counts_what_reached_nobody() {
    let server = RedisServer::start();
    let summary = support::publish(&server, &["--count", "300", "--no-fast-path"]);
    assert_eq!(summary.num("no_subscriber"), 300, "{}", summary.line);
    assert_eq!(summary.num("stored_directly"), 0, "{}", summary.line);
    assert_eq!(server.xlen("messages:processed"), 0);
}

/// Credentials that stop working while the bridge runs are not retried
/// forever: the reconnect is refused, and the process exits 1 with one clear
/// line.
#[test]
fn credentials_refused_on_reconnect_stop_the_process() {
    let server = RedisServer::start_with(&["--requirepass", "first"]);
    let url = format!("redis://:first@127.0.0.1:{}", server.port);
    let mut consume = OptimusProcess::spawn(
        &["consume"],
        &[("REDIS_URL", &url), ("MONITORING_INTERVAL", "0.2")],
    );
    consume.wait_consumers(2);
    let mut admin = server.conn();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("second")
        .query(&mut admin)
        .unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut admin)
        .unwrap();
    let status = consume.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", consume.describe());
    let stderr = consume.stderr();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("optimus: ") && !last.contains("first"),
        "one clear line, password masked: {last}"
    );
    assert!(
        last.contains("WRONGPASS") || last.contains("uthentication"),
        "{last}"
    );
}

/// Permissions taken away while the bridge writes (an ACL change): the
/// writes are refused (NOPERM), and the process ends with one line and exit
/// 1, without waiting for a graceful stop it cannot make; with either
/// strategy.
#[test]
fn permissions_taken_away_mid_run_stop_the_bridge_with_one_line() {
    for strategy in ["fenced", "race"] {
        let server = RedisServer::start();
        let _: () = server.command(&["ACL", "SETUSER", "bridge", "on", ">pw", "~*", "&*", "+@all"]);
        let url = format!("redis://bridge:pw@127.0.0.1:{}", server.port);
        let mut consume = OptimusProcess::spawn(
            &["consume"],
            &[
                ("REDIS_URL", &url),
                ("MONITORING_INTERVAL", "0.2"),
                ("STRATEGY", strategy),
            ],
        );
        consume.wait_consumers(2);
        let admin = server.url();
        let publisher = OptimusProcess::spawn(
            &[
                "publish",
                "--rate",
                "2000",
                "--count",
                "20000",
                "--no-fast-path",
            ],
            &[("REDIS_URL", admin.as_str())],
        );
        consume.wait_for_latest("monitor ", Duration::from_secs(20), |f| {
            f.num("written") > 0
        });
        let _: () = server.command(&["ACL", "SETUSER", "bridge", "-@scripting"]);
        let status = consume.wait_exit(Duration::from_secs(20));
        assert_eq!(status.code(), Some(1), "{strategy}: {}", consume.describe());
        let errors = consume.error_lines();
        assert_eq!(errors.len(), 1, "{strategy}: {}", consume.describe());
        assert!(errors[0].contains("NOPERM"), "{strategy}: {}", errors[0]);
        publisher.signal("KILL");
    }
}

/// When the server goes away for longer than --retry-for, the publisher gives
/// the unconfirmed batches up, says how many, and exits 1.
#[test]
fn publish_reports_what_it_could_not_send() {
    let server = RedisServer::start();
    let url = server.url();
    let mut publisher = OptimusProcess::spawn(
        &[
            "publish",
            "--rate",
            "1000",
            "--duration",
            "4",
            "--retry-for",
            "1",
            "--batch-size",
            "100",
        ],
        &[("REDIS_URL", &url)],
    );
    publisher.wait_for_line("publish sent=", Duration::from_secs(20), |f| {
        f.num("sent") > 0
    });
    drop(server);
    let status = publisher.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{}", publisher.describe());
    let summary = publisher.wait_for_line("publish done", Duration::from_secs(1), |_| true);
    assert!(summary.num("failed") > 0, "{}", summary.line);
    assert!(
        publisher.stderr().contains("never confirmed by Redis"),
        "{}",
        publisher.describe()
    );
}

/// `optimus audit` tells a complete stream from one with a loss or a duplicate.
#[test]
fn audit_counts_lost_and_duplicated_messages() {
    let server = RedisServer::start();
    support::publish(&server, &["--count", "100"]); // no consumer: the fast path writes all
    let url = server.url();
    let audit = || {
        let out = run_optimus(
            &["audit", "--published", "100"],
            &[("REDIS_URL", &url)],
            Duration::from_secs(20),
        );
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.code(), support::Fields::parse(stdout.trim()))
    };
    let (code, report) = audit();
    assert_eq!(code, Some(0), "{}", report.line);
    assert_eq!(
        (report.num("lost"), report.num("duplicates")),
        (0, 0),
        "{}",
        report.line
    );

    let mut conn = server.conn();
    let first = &server.stream_entries("messages:processed")[0];
    let _: String = redis::cmd("XADD")
        .arg("messages:processed")
        .arg("*")
        .arg("message_id")
        .arg(&first["message_id"])
        .arg("payload")
        .arg(&first["payload"])
        .query(&mut conn)
        .unwrap();
    let ids: Vec<String> = redis::cmd("XRANGE")
        .arg("messages:processed")
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(2)
        .query::<redis::streams::StreamRangeReply>(&mut conn)
        .unwrap()
        .ids
        .into_iter()
        .map(|e| e.id)
        .collect();
    let _: i64 = redis::cmd("XDEL")
        .arg("messages:processed")
        .arg(&ids[1])
        .query(&mut conn)
        .unwrap();
    let (code, report) = audit();
    assert_eq!(code, Some(1), "{}", report.line);
    assert_eq!(
        (report.num("lost"), report.num("duplicates")),
        (1, 1),
        "{}",
        report.line
    );
}

#[test]
fn bad_routes_and_caps_are_bad_settings() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("ROUTES", "orders")], "ROUTES"),
        (&[("ROUTES", "a=b;maxlen=zero")], "ROUTES"),
        (&[("ROUTES", "a={channel}:x")], "ROUTES"),
        (&[("STREAM_MAXLEN", "many")], "STREAM_MAXLEN"),
        (&[("STREAM_MAXLEN", "0")], "STREAM_MAXLEN"),
        (&[("STREAM_MAX_AGE", "-1")], "STREAM_MAX_AGE"),
        (
            &[("STREAM_MAXLEN", "10"), ("STREAM_MAX_AGE", "5")],
            "STREAM_MAX_AGE",
        ),
        (&[("STREAM_TRIM", "sloppy")], "STREAM_TRIM"),
        (
            &[
                ("REDIS_URL", "redis://127.0.0.1:1,redis://127.0.0.1:2"),
                ("PUBSUB_MODE", "sharded"),
                ("ROUTES", "events:*={channel}:out"),
            ],
            "ROUTES",
        ),
        // Fenced on a cluster: sharded Pub/Sub only, and one slot for the
        // pool's channels (a and b hash to different slots).
        (
            &[
                ("REDIS_URL", "redis://127.0.0.1:1,redis://127.0.0.1:2"),
                ("STRATEGY", "fenced"),
            ],
            "STRATEGY",
        ),
        (
            &[
                ("REDIS_URL", "redis://127.0.0.1:1,redis://127.0.0.1:2"),
                ("PUBSUB_MODE", "sharded"),
                ("ROUTES", "a=out:a,b=out:b"),
            ],
            "ROUTES",
        ),
    ];
    for (env, var) in cases {
        let out = run_optimus(&["consume"], env, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{env:?}: one line:\n{stderr}");
        assert!(stderr.contains(var), "{env:?}: names {var}: {stderr}");
    }
}

/// `optimus work` checks its own settings the same way: one line, exit 2,
/// before connecting (the cluster's seeds here lead nowhere).
#[test]
fn bad_work_settings_give_one_line_and_exit_code_2() {
    let cluster = "redis://127.0.0.1:1,redis://127.0.0.1:2";
    let cases: &[Case] = &[
        (&[("WORK_CONSUMERS", "0")], "WORK_CONSUMERS", "0"),
        (&[("WORK_CLAIM_IDLE", "soon")], "WORK_CLAIM_IDLE", "soon"),
        (
            &[
                ("REDIS_URL", cluster),
                ("WORK_DEAD_LETTER_STREAM", "elsewhere"),
            ],
            "WORK_DEAD_LETTER_STREAM",
            "elsewhere",
        ),
        (
            &[("WORK_DEAD_LETTER_STREAM", "messages:processed")],
            "WORK_DEAD_LETTER_STREAM",
            "messages:processed",
        ),
        (&[("WORK_GROUP", "")], "WORK_GROUP", "\"\""),
        (&[("OUTPUT_STREAM", " ")], "OUTPUT_STREAM", "\" \""),
    ];
    for (env, var, value) in cases {
        let out = run_optimus(&["work", "--", "true"], env, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{env:?}: one line:\n{stderr}");
        assert!(
            stderr.contains(var) && stderr.contains(value),
            "{env:?}: names {var} and {value}: {stderr}"
        );
    }
}

/// Arguments, settings, the name the error gives, the value, and words of
/// what would be accepted.
type ValueCase<'a> = (
    &'a [&'a str],
    &'a [(&'a str, &'a str)],
    &'a str,
    &'a str,
    &'a str,
);

/// Bad values are reported alike whatever the setting or command: exit 2,
/// one line naming the setting and the value, and saying what would be
/// accepted (a range, a form). Nothing is changed.
#[test]
fn bad_values_say_what_would_be_accepted() {
    let nowhere = format!("redis://127.0.0.1:{}", free_port());
    let cases: &[ValueCase] = &[
        (
            &["consume", "--consumers", "-1"],
            &[],
            "CONSUMERS_COUNT",
            "-1",
            "from 1 to 256",
        ),
        (
            &["consume"],
            &[("CONSUMERS_COUNT", "100000")],
            "CONSUMERS_COUNT",
            "100000",
            "from 1 to 256",
        ),
        (
            &["consume"],
            &[("REDIS_PORT", "70000")],
            "REDIS_PORT",
            "70000",
            "from 1 to 65535",
        ),
        (
            &["consume"],
            &[("MONITORING_INTERVAL", "0")],
            "MONITORING_INTERVAL",
            "0",
            "from 0.01",
        ),
        (
            &["consume"],
            &[("MONITORING_INTERVAL", "-1")],
            "MONITORING_INTERVAL",
            "-1",
            "from 0.01",
        ),
        (
            &["consume"],
            &[("PROCESSING_BATCH_SIZE", "-5")],
            "PROCESSING_BATCH_SIZE",
            "-5",
            "from 1",
        ),
        (
            &["consume"],
            &[("MAX_PAYLOAD_BYTES", "100000000")],
            "MAX_PAYLOAD_BYTES",
            "100000000",
            "16777216",
        ),
        (
            &["consume"],
            &[("SHUTDOWN_TIMEOUT", "soon")],
            "SHUTDOWN_TIMEOUT",
            "soon",
            "seconds",
        ),
        (
            &["consume"],
            &[("REDIS_URL", "redis://localhost:abc")],
            "REDIS_URL",
            "redis://localhost:abc",
            "port",
        ),
        (
            &["consume"],
            &[("REDIS_URL", "localhost:6379")],
            "REDIS_URL",
            "localhost:6379",
            "redis://",
        ),
        (
            &["consume"],
            &[("REDIS_URL", "redis://localhost/x")],
            "REDIS_URL",
            "redis://localhost/x",
            "database",
        ),
        (
            &["consume"],
            &[("REDIS_URL", "redis://")],
            "REDIS_URL",
            "redis://",
            "host",
        ),
        (
            &["publish", "--count", "-5"],
            &[],
            "--count",
            "-5",
            "from 1",
        ),
        (
            &["publish", "--count", "5"],
            &[("MAX_PAYLOAD_BYTES", "0")],
            "MAX_PAYLOAD_BYTES",
            "0",
            "from 1",
        ),
        (
            &["publish", "--count", "5"],
            &[
                ("MIN_REPLICAS_ACKED", "1"),
                ("REDIS_URL", "redis://127.0.0.1:1,redis://127.0.0.1:2"),
            ],
            "MIN_REPLICAS_ACKED",
            "1",
            "PUBSUB_MODE=sharded",
        ),
        (
            &["consume"],
            &[("LOG_FORMAT", "yaml")],
            "LOG_FORMAT",
            "yaml",
            "text, json",
        ),
        (
            &["consume"],
            &[("MONITOR_FORMAT", "xml")],
            "MONITOR_FORMAT",
            "xml",
            "text, json",
        ),
        (
            &["ctl", "scale", "100000"],
            &[("REDIS_URL", &nowhere)],
            "ctl scale",
            "100000",
            "from 0 to 1024",
        ),
        (
            &["ctl", "scale", "-1"],
            &[("REDIS_URL", &nowhere)],
            "ctl scale",
            "-1",
            "from 0 to 1024",
        ),
        (
            &["ctl", "scale", "0"],
            &[("REDIS_URL", &nowhere)],
            "ctl scale",
            "0",
            "--yes",
        ),
        (
            &["work", "--consumers", "-2", "--", "true"],
            &[],
            "WORK_CONSUMERS",
            "-2",
            "from 1 to 256",
        ),
        (
            &["work", "--", "/no/such/handler"],
            &[],
            "handler",
            "/no/such/handler",
            "no such program",
        ),
        (
            &["work", "--", "no-such-handler-anywhere"],
            &[],
            "handler",
            "no-such-handler-anywhere",
            "PATH",
        ),
        (
            &["work", "--", "true"],
            &[("WORK_CLAIM_IDLE", "10"), ("WORK_HANDLER_TIMEOUT", "10")],
            "WORK_HANDLER_TIMEOUT",
            "10",
            "shorter than WORK_CLAIM_IDLE",
        ),
        // A global flag before the subcommand is read the same way.
        (
            &["--redis-port", "-1", "consume"],
            &[],
            "REDIS_PORT",
            "-1",
            "from 1 to 65535",
        ),
        (
            &["audit", "--published", "-1"],
            &[("REDIS_URL", &nowhere)],
            "--published",
            "-1",
            "from 0 to",
        ),
        (
            &["audit", "--published", "many"],
            &[("REDIS_URL", &nowhere)],
            "--published",
            "many",
            "whole number",
        ),
        (
            &["streams", "trim", "s", "--maxlen", "-1"],
            &[("REDIS_URL", &nowhere)],
            "--maxlen",
            "-1",
            "whole number",
        ),
    ];
    for (args, env, name, value, says) in cases {
        let out = run_optimus(args, env, Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{args:?} {env:?}: one line:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("invalid {name}=\"{value}\"")) && stderr.contains(says),
            "{args:?} {env:?}: names {name}={value:?} and says {says:?}: {stderr}"
        );
        assert!(!stderr.contains("from 0 up"), "0 is not allowed: {stderr}");
    }
}

/// A command line that does not parse (an unknown flag or command, a
/// missing value, a value of the wrong kind for the benchmark's flags) is
/// one line saying why, exit code 2: not clap's usage block.
#[test]
fn command_lines_that_do_not_parse_give_one_line_and_exit_code_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["consume", "--bogus"], "'--bogus'"),
        (&["bogus"], "'bogus'"),
        (&["groups", "create", "s", "g", "--from"], "--from"),
        (&["bench", "--messages", "-5"], "'-5'"),
        (&["streams", "trim", "s"], "--maxlen"),
    ];
    for (args, says) in cases {
        let out = run_optimus(args, &[], Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line:\n{stderr}");
        assert!(
            stderr.starts_with("optimus: ") && stderr.contains(says),
            "{args:?}: says {says:?}: {stderr}"
        );
    }
    // Help is still help, on stdout.
    let out = run_optimus(&["consume", "--help"], &[], Duration::from_secs(10));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("CONSUMERS_COUNT"));
}

/// A TCP server that is not Redis: it answers anything with an HTTP error.
fn not_redis() -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 512];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    port
}

/// Errors retrying cannot mend end every command at once: exit 1, one short
/// line saying what is wrong, and no retry loop (nor an IDLE_TIMEOUT exit 0
/// for a process that never connected).
#[test]
fn errors_retrying_cannot_mend_end_the_command_at_once() {
    let server = RedisServer::start_with(&["--requirepass", "pw"]);
    let port = server.port;
    let http = not_redis();
    let cases: Vec<(Vec<&str>, String, &str)> = vec![
        // No password: every reply of the publisher's pipeline is NOAUTH.
        (
            vec!["publish", "--count", "5000"],
            format!("redis://127.0.0.1:{port}"),
            "NOAUTH",
        ),
        (
            vec!["consume"],
            format!("redis://:pw@127.0.0.1:{port}/99"),
            "database",
        ),
        (
            vec!["publish", "--count", "5"],
            format!("redis://:pw@127.0.0.1:{port}/99"),
            "database",
        ),
        (
            vec!["consume"],
            format!("redis://127.0.0.1:{http}"),
            "Redis protocol",
        ),
        (
            vec!["publish", "--count", "5"],
            format!("redis://127.0.0.1:{http}"),
            "Redis protocol",
        ),
        (
            vec!["work", "--", "true"],
            format!("redis://127.0.0.1:{http}"),
            "Redis protocol",
        ),
        (
            vec!["consume"],
            format!("rediss://127.0.0.1:{port}"),
            "plain Redis, not TLS",
        ),
        (
            vec!["publish", "--count", "5"],
            format!("rediss://127.0.0.1:{port}"),
            "plain Redis, not TLS",
        ),
        // The same errors for the other commands.
        (
            vec!["work", "--", "true"],
            format!("redis://127.0.0.1:{port}"),
            "NOAUTH",
        ),
        (
            vec!["work", "--", "true"],
            format!("redis://:pw@127.0.0.1:{port}/99"),
            "database",
        ),
        (
            vec!["work", "--", "true"],
            format!("rediss://127.0.0.1:{port}"),
            "plain Redis, not TLS",
        ),
        (
            vec!["ctl", "status"],
            format!("redis://127.0.0.1:{http}"),
            "Redis protocol",
        ),
        (
            vec!["ctl", "stop"],
            format!("redis://127.0.0.1:{port}"),
            "NOAUTH",
        ),
        (
            vec!["streams", "list"],
            format!("redis://127.0.0.1:{http}"),
            "Redis protocol",
        ),
        (
            vec!["groups", "list", "s"],
            format!("redis://:pw@127.0.0.1:{port}/99"),
            "database",
        ),
        (
            vec!["audit", "--published", "1"],
            format!("redis://127.0.0.1:{http}"),
            "Redis protocol",
        ),
    ];
    // `health` reports it as its one alert line (exit 2, on stdout).
    for url in [
        format!("redis://127.0.0.1:{http}"),
        format!("redis://127.0.0.1:{port}"),
    ] {
        let out = run_optimus(&["health"], &[("REDIS_URL", &url)], Duration::from_secs(20));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "health {url}: {stdout}");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "health {url}: one line:\n{stdout}");
        assert!(
            lines[0].starts_with("ALERT") && lines[0].len() < 400,
            "health {url}: {stdout}"
        );
    }
    for (args, url, says) in &cases {
        let env = [("REDIS_URL", url.as_str()), ("IDLE_TIMEOUT", "1")];
        let out = run_optimus(args, &env, Duration::from_secs(40));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} {url}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains(" INFO ")).collect();
        assert_eq!(lines.len(), 1, "{args:?} {url}: one line:\n{stderr}");
        assert!(
            lines[0].starts_with("optimus: ") && lines[0].contains(says),
            "{args:?} {url}: says {says:?}: {stderr}"
        );
        assert!(lines[0].len() < 400, "a short line: {}", lines[0]);
        assert!(
            !stderr.contains("retrying"),
            "{args:?}: not retried: {stderr}"
        );
    }
}

/// While Redis is unreachable the waits between attempts grow, but never
/// past the stated maximum of 5 s, jitter included.
#[test]
fn reconnect_backoff_stays_within_its_maximum() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let consume = OptimusProcess::spawn(&["consume"], &[("REDIS_URL", &url)]);
    let waits = || -> Vec<u64> {
        consume
            .stderr()
            .lines()
            .filter(|l| l.contains("Redis unreachable"))
            .filter_map(|l| {
                let (_, rest) = l.split_once("retry_in_ms=")?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .collect()
    };
    support::wait_for(
        "nine reconnection attempts",
        Duration::from_secs(40),
        || (waits().len() >= 9).then_some(()),
        || consume.describe(),
    );
    let waits = waits();
    assert!(waits.iter().all(|w| *w <= 5000), "{waits:?}");
    assert!(
        waits.iter().rev().take(3).all(|w| *w >= 1000),
        "it backs off: {waits:?}"
    );
}

/// Three publisher runs into one stream: the audit checks one run (the
/// latest, or the one named), counts the other entries apart, fails on an
/// unexpected entry of its run, and a missing stream is an error, not lost
/// messages.
#[test]
fn audit_checks_one_run_exactly() {
    let server = RedisServer::start();
    let url = server.url();
    let runs: Vec<String> = (0..3)
        .map(|_| {
            // No consumer: the fast path writes every message.
            let done = support::publish(&server, &["--count", "1000"]);
            done.values["run"].clone()
        })
        .collect();
    let audit = |args: &[&str]| {
        let mut all = vec!["audit", "--published", "1000"];
        all.extend_from_slice(args);
        let out = run_optimus(
            &all,
            &[("REDIS_URL", url.as_str())],
            Duration::from_secs(20),
        );
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (
            out.status.code(),
            support::Fields::parse(stdout.trim()),
            stderr,
        )
    };
    let (code, report, _) = audit(&[]);
    assert_eq!(code, Some(0), "{}", report.line);
    assert_eq!(
        report.values["run"], runs[2],
        "the latest run: {}",
        report.line
    );
    assert_eq!(
        (
            report.num("in_stream"),
            report.num("lost"),
            report.num("others")
        ),
        (1000, 0, 2000),
        "{}",
        report.line
    );
    let (code, report, _) = audit(&["--run", &runs[0]]);
    assert_eq!(code, Some(0), "{}", report.line);
    assert_eq!(report.values["run"], runs[0]);

    let stray = format!(r#"{{"message_id":"stray","run":"{}","seq":5000}}"#, runs[2]);
    let _: String = server.command(&[
        "XADD",
        "messages:processed",
        "*",
        "message_id",
        "stray",
        "payload",
        &stray,
    ]);
    let (code, report, _) = audit(&[]);
    assert_eq!(code, Some(1), "unexpected fails the audit: {}", report.line);
    assert_eq!(report.num("unexpected"), 1, "{}", report.line);

    // A run's oversized messages are in the dead-letter stream: dead, not lost.
    let big = support::publish(&server, &["--count", "3", "--payload-size", "2000000"]);
    let (code, report, _) = audit(&["--run", &big.values["run"]]);
    assert_eq!(code, Some(1), "3 of 1000: {}", report.line);
    assert_eq!(
        (report.num("dead"), report.num("lost")),
        (3, 997),
        "{}",
        report.line
    );

    // With a dead-letter stream of its own (DEAD_LETTER_STREAM), as the
    // bridge and the publisher were given.
    let elsewhere = support::publish_with(
        &[
            ("REDIS_URL", url.as_str()),
            ("DEAD_LETTER_STREAM", "elsewhere:dead"),
        ],
        &["--count", "2", "--payload-size", "2000000"],
    );
    let (code, report, _) = audit(&[
        "--run",
        &elsewhere.values["run"],
        "--dead-letter-stream",
        "elsewhere:dead",
    ]);
    assert_eq!(code, Some(1), "2 of 1000: {}", report.line);
    assert_eq!(
        (report.num("dead"), report.num("lost")),
        (2, 998),
        "{}",
        report.line
    );

    let (code, report, stderr) = audit(&["--stream", "nosuch"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(
        !report.line.contains("lost="),
        "not reported as lost: {}",
        report.line
    );
}

/// `optimus completions <shell>` prints a script that completes the
/// commands, and `optimus man` a man page; neither needs Redis.
#[test]
fn completions_and_the_man_page_describe_the_command_line() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run_optimus(&["completions", shell], &[], Duration::from_secs(10));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}: {out:?}");
        for word in ["consume", "publish", "work", "redis-url"] {
            assert!(script.contains(word), "{shell} completes {word}:\n{script}");
        }
    }
    let out = run_optimus(&["completions", "tcsh"], &[], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "an unknown shell: {out:?}");
    let out = run_optimus(&["man"], &[], Duration::from_secs(10));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(page.contains(".TH optimus"), "a man page: {page}");
    assert!(
        page.contains("consume") && page.contains("REDIS_URL"),
        "{page}"
    );
}

/// LOG_FORMAT=json: every log line on stderr is one JSON object with its
/// timestamp, level, target and fields; MONITOR_FORMAT=json: every status
/// line on stdout is one object with its kind and values.
#[test]
fn json_logs_and_json_status_lines_are_one_object_per_line() {
    let server = RedisServer::start();
    let mut consume = OptimusProcess::consume(
        &server,
        &[
            ("LOG_FORMAT", "json"),
            ("MONITOR_FORMAT", "json"),
            ("IDLE_TIMEOUT", "1"),
        ],
    );
    assert!(
        consume.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        consume.describe()
    );
    let (stdout, stderr) = (consume.stdout(), consume.stderr());
    assert!(!stderr.trim().is_empty(), "{}", consume.describe());
    for line in stderr.lines() {
        let log: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
        for field in ["timestamp", "level", "target"] {
            assert!(log[field].is_string(), "{field} in {line}");
        }
        assert!(log["fields"]["message"].is_string(), "a message in {line}");
    }
    assert!(
        stderr.contains(r#""message":"bridge starting""#),
        "{stderr}"
    );
    let monitors: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a status line that is not JSON ({e}): {line}"))
        })
        .collect();
    let monitor = monitors
        .iter()
        .find(|m| m["kind"] == "monitor")
        .unwrap_or_else(|| panic!("a monitoring line in {stdout}"));
    assert!(monitor["written"].is_u64(), "{monitor}");
    assert_eq!(monitor["redis"], "connected", "{monitor}");

    // The last line of a command that fails is JSON too, at level ERROR.
    let locked = RedisServer::start_with(&["--requirepass", "right"]);
    let url = locked.url();
    let out = run_optimus(
        &["streams", "list"],
        &[("REDIS_URL", url.as_str()), ("LOG_FORMAT", "json")],
        Duration::from_secs(20),
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("the error line is JSON ({e}): {stderr}"));
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("optimus: ") && m.contains("REDIS_PASSWORD")),
        "{last}"
    );
}

/// `optimus audit` of a stream optimus did not write: duplicates by an id
/// in the payload, order and gaps by a numeric field, lost and unexpected
/// against a count and against an id list, the dead-letter stream's
/// messages dead, not lost; a clean stream passes.
#[test]
fn audit_checks_any_stream_by_its_ids_and_sequence() {
    let server = RedisServer::start();
    let url = server.url();
    let add = |stream: &str, fields: &[&str]| {
        let mut words = vec!["XADD", stream, "*"];
        words.extend_from_slice(fields);
        let _: String = server.command(&words);
    };
    // Orders 1..=10 as a service wrote them: 4 missing, 7 twice, 9 before 8.
    for n in [1, 2, 3, 5, 6, 7, 7, 9, 8, 10] {
        add(
            "orders",
            &["data", &format!(r#"{{"order":"o-{n}","n":{n}}}"#)],
        );
    }
    // payload holds the JSON in the bridge's entries; this service used
    // "data", so the id and the number are entry fields here: written both
    // ways, as the audit reads either.
    let audit = |args: &[&str]| {
        let mut all = vec!["audit", "--json"];
        all.extend_from_slice(args);
        let out = run_optimus(
            &all,
            &[("REDIS_URL", url.as_str())],
            Duration::from_secs(20),
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), report)
    };
    // Without ids the entries cannot be told apart: none is a duplicate.
    let (code, report) = audit(&["--stream", "orders"]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["without_id"], 10, "{report}");

    for n in [1, 2, 3, 5, 6, 7, 7, 9, 8, 10] {
        let payload = format!(r#"{{"order":"o-{n}","n":{n}}}"#);
        add("orders2", &["payload", &payload]);
    }
    // The service's order ids are the messages' ids.
    let orders = |more: &[&str]| {
        let mut args = vec!["--stream", "orders2", "--id-field", "order"];
        args.extend_from_slice(more);
        audit(&args)
    };
    let (code, report) = orders(&["--seq-field", "n"]);
    assert_eq!(
        code,
        Some(1),
        "a duplicate, a gap and one out of order: {report}"
    );
    assert_eq!(
        (
            &report["entries"],
            &report["messages"],
            &report["duplicates"],
            &report["out_of_order"],
            &report["gaps"],
        ),
        (&10.into(), &9.into(), &1.into(), &1.into(), &1.into()),
        "{report}"
    );
    assert_eq!(
        report["gap_ranges"],
        serde_json::json!([[4, 4]]),
        "{report}"
    );
    assert_eq!(
        (&report["first_seq"], &report["last_seq"]),
        (&1.into(), &10.into())
    );

    // A field name that no entry has cannot pass.
    let (code, report) = orders(&["--seq-field", "nn"]);
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(
        (&report["without_seq"], &report["unchecked"]),
        (&10.into(), &true.into()),
        "{report}"
    );
    // The count's numbers from 0: 0 and 4 missing, 10 beyond them.
    let (_, report) = orders(&["--seq-field", "n", "--count", "10", "--seq-from", "0"]);
    assert_eq!(
        (&report["lost"], &report["unexpected"]),
        (&2.into(), &1.into()),
        "{report}"
    );

    // Against a count and an id list.
    let (_, report) = orders(&["--count", "10"]);
    assert_eq!(
        (&report["lost"], &report["unexpected"]),
        (&1.into(), &0.into()),
        "{report}"
    );
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("ids");
    let ids: String = (1..=11).map(|n| format!("o-{n}\n")).collect();
    std::fs::write(&list, ids).unwrap();
    let list = list.to_str().unwrap();
    add("orders2", &["payload", r#"{"order":"o-99","n":11}"#]);
    let (_, report) = orders(&["--ids", list]);
    assert_eq!(
        (&report["expected"], &report["lost"], &report["unexpected"]),
        (&11.into(), &2.into(), &1.into()),
        "o-4 and o-11 lost, o-99 unexpected: {report}"
    );

    // The missing order in the dead-letter stream: dead, not lost, no gap.
    add(
        "orders2:dead",
        &["message_id", "o-4", "payload", r#"{"order":"o-4","n":4}"#],
    );
    let (_, report) = orders(&["--seq-field", "n", "--count", "11"]);
    assert_eq!(
        (&report["dead"], &report["lost"], &report["gaps"]),
        (&1.into(), &0.into(), &0.into()),
        "{report}"
    );

    // Entry fields (the bridge's message_id) and a clean stream.
    for n in 0..50 {
        let id = format!("m{n}");
        add(
            "clean",
            &[
                "message_id",
                &id,
                "seq",
                &n.to_string(),
                "payload",
                "not json",
            ],
        );
    }
    let (code, report) = audit(&["--stream", "clean", "--seq-field", "seq", "--count", "50"]);
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(
        (&report["messages"], &report["lost"], &report["gaps"]),
        (&50.into(), &0.into(), &0.into())
    );

    // A stream of no optimus run, audited as one: the error says what to do.
    let out = run_optimus(
        &["audit", "--published", "10", "--stream", "clean"],
        &[("REDIS_URL", url.as_str())],
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--seq-field"), "{stderr}");
}
