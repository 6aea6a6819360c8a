//! `optimus health` against a real redis-server: one line per check, exit
//! code 0 / 1 / 2 for the worst of ok / warn / alert.

use crate::support;

use std::process::Output;
use std::time::Duration;

use support::{OptimusProcess, RedisServer, run_optimus};

fn health(server: &RedisServer, args: &[&str], env: &[(&str, &str)]) -> Output {
    let url = server.url();
    let mut all = vec!["health"];
    all.extend_from_slice(args);
    let mut env = env.to_vec();
    env.push(("REDIS_URL", url.as_str()));
    run_optimus(&all, &env, Duration::from_secs(20))
}

/// The line of the check named `check`: (level, value).
fn line<'a>(out: &'a str, check: &str) -> (&'a str, &'a str) {
    let l = out
        .lines()
        .find(|l| l.contains(&format!(" {check} ")))
        .unwrap_or_else(|| panic!("no {check:?} line in:\n{out}"));
    let level = l.split_whitespace().next().unwrap();
    let value = l[l.find(check).unwrap() + check.len()..]
        .split_whitespace()
        .next()
        .unwrap();
    (level, value)
}

#[test]
fn a_missing_bridge_and_stream_are_alerts() {
    let server = RedisServer::start();
    let out = health(&server, &[], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert_eq!(line(&text, "bridge consumers"), ("ALERT", "0"));
    assert!(
        text.contains("no stream named messages:processed"),
        "{text}"
    );
}

#[test]
fn checks_follow_the_thresholds() {
    let server = RedisServer::start();
    let consume = OptimusProcess::consume(&server, &[("CONSUMERS_COUNT", "2")]);
    consume.wait_consumers(2);
    support::publish(&server, &["--count", "50"]);
    consume.wait_settled(Duration::from_secs(20));
    server.command::<redis::Value>(&["XGROUP", "CREATE", "messages:processed", "downstream", "0"]);
    server.command::<redis::Value>(&[
        "XREADGROUP",
        "GROUP",
        "downstream",
        "w1",
        "COUNT",
        "10",
        "STREAMS",
        "messages:processed",
        ">",
    ]);

    let out = health(&server, &[], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(text.lines().count(), 5, "one line per check:\n{text}");
    assert_eq!(line(&text, "bridge consumers"), ("OK", "2"));
    assert_eq!(line(&text, "group downstream consumers"), ("OK", "1"));
    assert_eq!(line(&text, "group downstream lag"), ("OK", "40"));
    assert_eq!(line(&text, "group downstream pending"), ("OK", "10"));

    // Thresholds from flags or variables.
    let out = health(&server, &["--lag-warn", "10"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(line(&text, "group downstream lag"), ("WARN", "40"));
    let out = health(
        &server,
        &[],
        &[("HEALTH_PENDING_WARN", "1"), ("HEALTH_PENDING_ALERT", "5")],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert_eq!(line(&text, "group downstream pending"), ("ALERT", "10"));
    let out = health(&server, &[], &[("HEALTH_BRIDGE_CONSUMERS_WARN", "3")]);
    assert_eq!(out.status.code(), Some(1));

    // A bad threshold is a bad setting: one line naming it, exit 2.
    let out = health(&server, &[], &[("HEALTH_LAG_WARN", "lots")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("HEALTH_LAG_WARN"), "{err}");
}

/// A pending entry counts by how long it has waited since its delivery,
/// not by its id: an entry added long ago (1 s after the epoch) and
/// delivered just now is no alert (a group working through a backlog), the
/// same entry left pending past the threshold is; a consumer that stopped
/// reading stays registered but no longer counts.
#[test]
fn pending_entries_and_consumers_count_by_their_idle_time() {
    let server = RedisServer::start();
    server.command::<redis::Value>(&["XADD", "jobs", "1000-0", "n", "1"]);
    server.command::<redis::Value>(&["XGROUP", "CREATE", "jobs", "g", "0"]);
    server.command::<redis::Value>(&["XREADGROUP", "GROUP", "g", "c", "STREAMS", "jobs", ">"]);
    let check = || {
        let out = health(
            &server,
            &[
                "--stream",
                "jobs",
                "--group",
                "g",
                "--bridge-consumers-warn",
                "0",
                "--bridge-consumers-alert",
                "0",
                "--pending-age-warn",
                "1",
                "--pending-age-alert",
                "1",
                "--consumer-idle",
                "1",
            ],
            &[],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = check();
    assert_eq!(
        line(&text, "group g oldest pending (s)"),
        ("OK", "0"),
        "{text}"
    );
    assert_eq!(line(&text, "group g consumers"), ("OK", "1"), "{text}");
    // Both only grow idle from here.
    std::thread::sleep(Duration::from_millis(2100));
    let text = check();
    let (level, age) = line(&text, "group g oldest pending (s)");
    assert_eq!(level, "ALERT", "{text}");
    assert!(age.parse::<u64>().unwrap() >= 2, "{text}");
    assert_eq!(
        line(&text, "group g consumers"),
        ("ALERT", "0"),
        "registered, but silent past HEALTH_CONSUMER_IDLE: {text}"
    );
}

/// `--json`: one object with the worst level and every check, the same
/// exit code; `ctl status --json` likewise.
#[test]
fn health_and_status_speak_json_when_asked() {
    let server = RedisServer::start();
    let out = health(&server, &["--json"], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(report["level"], "alert", "{report}");
    let bridge = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "bridge consumers")
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(bridge["level"], "alert", "{report}");
    assert_eq!(bridge["value"], "0", "{report}");

    let consume = OptimusProcess::consume(&server, &[]);
    consume.wait_consumers(2);
    let url = server.url();
    let out = run_optimus(
        &["ctl", "status", "--json"],
        &[("REDIS_URL", url.as_str())],
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    let processes = status["processes"].as_array().unwrap();
    assert_eq!(processes.len(), 1, "{status}");
    assert_eq!(processes[0]["kind"], "consume", "{status}");
    assert_eq!(processes[0]["workers"], 2, "{status}");
    assert_eq!(status["stop"], serde_json::Value::Null, "{status}");
}
