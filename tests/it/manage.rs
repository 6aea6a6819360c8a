//! `optimus streams` and `optimus groups` against a real redis-server.

use crate::support;

use std::process::Output;
use std::time::Duration;

use support::{RedisServer, run_optimus};

/// Runs `optimus <args>` against `server`.
fn optimus(server: &RedisServer, args: &[&str]) -> Output {
    let url = server.url();
    run_optimus(
        args,
        &[("REDIS_URL", url.as_str())],
        Duration::from_secs(20),
    )
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Succeeds, and returns stdout.
fn ok(server: &RedisServer, args: &[&str]) -> String {
    let out = optimus(server, args);
    assert!(
        out.status.success(),
        "optimus {args:?}: {:?}\n{}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Fails with `code` and exactly one line on stderr, containing `says`.
fn fails(server: &RedisServer, args: &[&str], code: i32, says: &str) {
    let out = optimus(server, args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "optimus {args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "one line, got:\n{err}");
    assert!(err.contains(says), "optimus {args:?} says {says:?}: {err}");
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn streams_are_listed_described_trimmed_and_deleted() {
    let server = RedisServer::start();
    for i in 0..5 {
        server.command::<redis::Value>(&["XADD", "orders", &format!("{i}-1"), "n", &i.to_string()]);
    }
    server.command::<redis::Value>(&["SET", "not-a-stream", "x"]);
    ok(&server, &["streams", "create", "empty"]);

    let list = json(&ok(&server, &["streams", "list", "--json"]));
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["empty", "orders"], "only streams, sorted");
    assert_eq!(list[1]["length"], 5);
    assert_eq!(list[0]["length"], 0);

    let table = ok(&server, &["streams", "list"]);
    assert!(table.starts_with("stream"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("orders") && l.contains(" 5 ")),
        "{table}"
    );

    let info = json(&ok(&server, &["streams", "info", "orders", "--json"]));
    assert_eq!(info["length"], 5);
    assert_eq!(info["first_id"], "0-1");
    assert_eq!(info["last_id"], "4-1");
    let empty = json(&ok(&server, &["streams", "info", "empty", "--json"]));
    assert_eq!(empty["first_id"], serde_json::Value::Null);

    let trimmed = ok(&server, &["streams", "trim", "orders", "--maxlen", "2"]);
    assert!(trimmed.contains("trimmed 3 entries"), "{trimmed}");
    let trimmed = ok(&server, &["streams", "trim", "orders", "--minid", "4-0"]);
    assert!(trimmed.contains("trimmed 1 entries"), "{trimmed}");

    fails(
        &server,
        &["streams", "create", "orders"],
        1,
        "exists already",
    );
    fails(
        &server,
        &["streams", "delete", "orders"],
        2,
        "without --yes",
    );
    assert_eq!(server.xlen("orders"), 1, "nothing deleted without --yes");
    ok(&server, &["streams", "delete", "orders", "--yes"]);
    assert_eq!(server.keys("orders").len(), 0);

    fails(
        &server,
        &["streams", "info", "orders"],
        1,
        "no stream named orders",
    );
    fails(
        &server,
        &["streams", "info", "not-a-stream"],
        1,
        "is a string, not a stream",
    );
    fails(
        &server,
        &["streams", "delete", "gone", "--yes"],
        1,
        "no stream named gone",
    );
}

#[test]
fn groups_show_consumers_pending_and_lag() {
    let server = RedisServer::start();
    for i in 1..=4 {
        server.command::<redis::Value>(&["XADD", "s", &format!("{i}-0"), "n", &i.to_string()]);
    }
    ok(
        &server,
        &["groups", "create", "s", "workers", "--from", "0"],
    );
    // Consumer c1 reads three entries and acknowledges one.
    server.command::<redis::Value>(&[
        "XREADGROUP",
        "GROUP",
        "workers",
        "c1",
        "COUNT",
        "3",
        "STREAMS",
        "s",
        ">",
    ]);
    server.command::<redis::Value>(&["XACK", "s", "workers", "1-0"]);

    let detail = json(&ok(&server, &["groups", "info", "s", "workers", "--json"]));
    assert_eq!(detail["group"]["pending"], 2);
    assert_eq!(detail["group"]["lag"], 1, "one entry not delivered yet");
    assert_eq!(detail["group"]["last_delivered_id"], "3-0");
    assert_eq!(detail["consumers"][0]["name"], "c1");
    assert_eq!(detail["consumers"][0]["pending"], 2);

    let table = ok(&server, &["groups", "info", "s", "workers"]);
    assert!(
        table.contains("consumer") && table.contains("c1"),
        "{table}"
    );
    let list = ok(&server, &["groups", "list", "s"]);
    assert!(
        list.lines().nth(1).unwrap().starts_with("workers"),
        "{list}"
    );

    ok(&server, &["groups", "set-id", "s", "workers", "$"]);
    let detail = json(&ok(&server, &["groups", "info", "s", "workers", "--json"]));
    assert_eq!(detail["group"]["last_delivered_id"], "4-0");
    assert_eq!(detail["group"]["lag"], 0);

    fails(
        &server,
        &["groups", "create", "s", "workers"],
        1,
        "exists already",
    );
    fails(
        &server,
        &["groups", "create", "nope", "g"],
        1,
        "no stream named nope",
    );
    ok(&server, &["groups", "create", "fresh", "g", "--mkstream"]);
    fails(
        &server,
        &["groups", "info", "s", "other"],
        1,
        "has no group named other",
    );
    fails(
        &server,
        &["groups", "set-id", "s", "other", "0"],
        1,
        "has no group named other",
    );
    fails(
        &server,
        &["groups", "delete", "s", "workers"],
        2,
        "without --yes",
    );
    ok(&server, &["groups", "delete", "s", "workers", "--yes"]);
    assert!(ok(&server, &["groups", "list", "s"]).contains("no groups"));
}
