//! Bad settings, wrong credentials, an unreachable server: what the user sees.

mod support;

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
        (
            &[
                ("REDIS_URL", "redis://127.0.0.1:1,redis://127.0.0.1:2"),
                ("STRATEGY", "partitioned"),
            ],
            "STRATEGY",
            "partitioned",
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
        ("STRATEGY", ""), // partitioned, or race on a cluster: said in its help
        ("TAKEOVER_AFTER", "0.25"),
        ("OUTPUT_FORMAT", "envelope"),
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
    for url in [
        format!("redis://:wrong@127.0.0.1:{}", server.port),
        format!("redis://127.0.0.1:{}", server.port),
    ] {
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
