//! `optimus work` against a real redis-server: handled entries are
//! acknowledged, failed ones retried and finally dead-lettered, and a killed
//! worker's entries are claimed and handled by another.

use crate::support;

use std::time::Duration;

use support::{OptimusProcess, RedisServer};

const STREAM: &str = "messages:processed";
const GROUP: &str = "optimus-work";

fn add(server: &RedisServer, payload: &str) {
    let _: String = server.command(&["XADD", STREAM, "*", "payload", payload]);
}

/// `optimus work` with `env`, handler `sh -c <script>`.
fn work(server: &RedisServer, env: &[(&str, &str)], script: &str) -> OptimusProcess {
    let url = server.url();
    let mut env = env.to_vec();
    env.push(("REDIS_URL", url.as_str()));
    env.push(("MONITORING_INTERVAL", "0.2"));
    OptimusProcess::spawn(&["work", "--", "sh", "-c", script], &env)
}

/// Waits until the latest work line counts `n` entries handled.
fn wait_handled(worker: &OptimusProcess, n: u64) {
    worker.wait_for_latest("work ", Duration::from_secs(20), |f| f.num("handled") == n);
}

/// Pending entries of the group (delivered, not acknowledged); 0 before the
/// worker has created the group.
fn pending(server: &RedisServer) -> u64 {
    let summary: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg(STREAM)
        .arg(GROUP)
        .query(&mut server.conn());
    match summary {
        Ok(redis::Value::Array(items)) => redis::from_redis_value(items[0].clone()).unwrap(),
        Err(err) if err.code() == Some("NOGROUP") => 0,
        other => panic!("{other:?}"),
    }
}

fn lines(path: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect();
    out.sort();
    out
}

#[test]
fn handled_entries_are_acknowledged_failed_ones_end_as_dead_letters() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("handled");
    for p in ["a", "b", "bad", "c"] {
        add(&server, p);
    }
    // Succeeds for every payload but "bad", which it records as a failure.
    let script = format!(
        r#"p=$(cat); if [ "$p" = bad ]; then echo "$OPTIMUS_DELIVERIES" >> {0}.tries; exit 3; fi; echo "$p" >> {0}"#,
        out.display()
    );
    let mut worker = work(
        &server,
        &[("WORK_CLAIM_IDLE", "0.2"), ("WORK_MAX_DELIVERIES", "3")],
        &script,
    );
    let line = worker.wait_for_line("work ", Duration::from_secs(20), |f| {
        f.num("handled") == 3 && f.num("dead") == 1
    });
    assert_eq!(
        line.num("failed"),
        3,
        "bad failed on each of its 3 deliveries: {}",
        line.line
    );
    assert_eq!(
        line.num("claimed"),
        2,
        "delivered again twice: {}",
        line.line
    );
    assert_eq!(lines(&out), ["a", "b", "c"]);
    assert_eq!(
        lines(&dir.path().join("handled.tries")),
        ["1", "2", "3"],
        "the handler sees the delivery count"
    );

    let dead: Vec<(String, Vec<(String, String)>)> = {
        let reply: redis::streams::StreamRangeReply =
            server.command(&["XRANGE", "messages:processed:work-dead", "-", "+"]);
        reply
            .ids
            .into_iter()
            .map(|e| {
                let mut fields: Vec<(String, String)> = e
                    .map
                    .iter()
                    .map(|(k, v)| (k.clone(), redis::from_redis_value(v.clone()).unwrap()))
                    .collect();
                fields.sort();
                (e.id, fields)
            })
            .collect()
    };
    assert_eq!(dead.len(), 1, "{dead:?}");
    let fields: std::collections::HashMap<_, _> = dead[0].1.iter().cloned().collect();
    assert_eq!(fields["payload"], "bad");
    assert!(fields["reason"].contains("3 deliveries"), "{fields:?}");
    assert_eq!(
        pending(&server),
        0,
        "everything handled or dead-lettered is acknowledged"
    );

    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn a_killed_worker_s_entries_are_claimed_and_handled_by_another() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("handled");
    for p in ["x", "y", "z"] {
        add(&server, p);
    }
    // The first worker takes the three entries and hangs on the first.
    let hung = work(
        &server,
        &[("WORK_CLAIM_IDLE", "0.5"), ("WORK_BATCH_SIZE", "10")],
        "sleep 5",
    );
    support::wait_for(
        "three entries pending at the hung worker",
        Duration::from_secs(20),
        || (pending(&server) == 3).then_some(()),
        || hung.describe(),
    );
    hung.signal("KILL");

    let script = format!(r#"cat >> {0}; echo >> {0}"#, out.display());
    let mut rescuer = work(&server, &[("WORK_CLAIM_IDLE", "0.5")], &script);
    let line = rescuer.wait_for_line("work ", Duration::from_secs(20), |f| f.num("handled") == 3);
    assert_eq!(line.num("claimed"), 3, "{}", line.line);
    assert_eq!(lines(&out), ["x", "y", "z"]);
    assert_eq!(pending(&server), 0);
    let log = rescuer.stderr();
    assert!(
        log.contains("claimed an idle entry") && log.contains("previous_owner="),
        "each claim is logged with the previous owner:\n{log}"
    );
    rescuer.signal("TERM");
    assert!(rescuer.wait_exit(Duration::from_secs(10)).success());
}

/// Whether a process is alive (signal 0 reaches it).
fn alive(pid: &str) -> bool {
    std::process::Command::new("kill")
        .args(["-0", pid.trim()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// On SIGTERM a worker finishes the entry in hand only: the others it
/// fetched stay pending (for another worker), not handled on the way out.
#[test]
fn sigterm_finishes_only_the_entry_in_hand() {
    // SIGHUP (the terminal went away) is a graceful stop too.
    for signal in ["TERM", "HUP"] {
        let server = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("handled");
        for p in ["e1", "e2", "e3", "e4", "e5"] {
            add(&server, p);
        }
        let script = format!("cat >> {0}; echo >> {0}; sleep 1", out.display());
        let mut worker = work(&server, &[("WORK_BATCH_SIZE", "10")], &script);
        support::wait_for(
            "the first entry in hand",
            Duration::from_secs(20),
            || (!lines(&out).is_empty()).then_some(()),
            || worker.describe(),
        );
        worker.signal(signal);
        let status = worker.wait_exit(Duration::from_secs(20));
        assert!(status.success(), "{signal}: {}", worker.describe());
        assert_eq!(lines(&out), ["e1"], "{signal}: {}", worker.describe());
        assert_eq!(
            pending(&server),
            4,
            "{signal}: the rest wait for another worker"
        );
    }
}

/// A handler past WORK_HANDLER_TIMEOUT is killed, with what it started,
/// and the entry counts as failed; the worker goes on with the next.
#[test]
fn a_handler_past_its_timeout_is_killed_and_counted_as_failed() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    add(&server, "slow");
    add(&server, "quick");
    let script = format!(
        r#"read p; if [ "$p" = slow ]; then sleep 60 & echo $! >> {0}; wait; fi"#,
        pids.display()
    );
    let mut worker = work(
        &server,
        &[("WORK_HANDLER_TIMEOUT", "1"), ("WORK_CLAIM_IDLE", "30")],
        &script,
    );
    let line = worker.wait_for_line("work ", Duration::from_secs(20), |f| {
        f.num("failed") == 1 && f.num("handled") == 1
    });
    assert_eq!(line.num("dead"), 0, "{}", line.line);
    let sleeper = std::fs::read_to_string(&pids).unwrap();
    support::wait_for(
        "the handler's child killed",
        Duration::from_secs(5),
        || (!alive(&sleeper)).then_some(()),
        || worker.describe(),
    );
    assert!(
        worker.stderr().contains("WORK_HANDLER_TIMEOUT"),
        "{}",
        worker.describe()
    );
}

/// `optimus work` with `env` on one entry, whose handler (a shell, and the
/// `sleep` it starts) never ends; returns once both run, with the file
/// their pids are in.
fn never_ending_handler(
    server: &RedisServer,
    env: &[(&str, &str)],
    dir: &std::path::Path,
) -> (OptimusProcess, std::path::PathBuf) {
    let pids = dir.join("pids");
    add(server, "forever");
    let script = format!(
        "echo $$ >> {0}; sleep 60 & echo $! >> {0}; wait",
        pids.display()
    );
    let worker = work(server, env, &script);
    support::wait_for(
        "the handler running",
        Duration::from_secs(20),
        || (lines(&pids).len() == 2).then_some(()),
        || worker.describe(),
    );
    (worker, pids)
}

/// Waits until every process whose pid is in `pids` is gone.
fn assert_all_gone(pids: &std::path::Path, worker: &OptimusProcess) {
    for pid in lines(pids) {
        support::wait_for(
            &format!("handler process {pid} gone"),
            Duration::from_secs(5),
            || (!alive(&pid)).then_some(()),
            || worker.describe(),
        );
    }
}

/// `optimus work` SIGKILLed (nothing of its own runs after): the handler
/// process it was running goes with it (the kernel's parent-death signal)
/// instead of running on, orphaned.
#[test]
fn a_killed_work_takes_its_handler_with_it() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    add(&server, "forever");
    let script = format!("echo $$ >> {}; exec sleep 60", pids.display());
    let mut worker = work(&server, &[], &script);
    support::wait_for(
        "the handler running",
        Duration::from_secs(20),
        || (lines(&pids).len() == 1).then_some(()),
        || worker.describe(),
    );
    let handler = lines(&pids)[0].clone();
    assert!(alive(&handler), "the handler runs: {}", worker.describe());
    worker.signal("KILL");
    worker.wait_exit(Duration::from_secs(10));
    assert_all_gone(&pids, &worker);
}

/// A second signal ends `optimus work` at once, and its handler (with what
/// it started) goes with it instead of being left orphaned.
#[test]
fn a_forced_exit_kills_the_handlers() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut worker, pids) = never_ending_handler(&server, &[], dir.path());
    worker.signal("TERM");
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "{}", worker.describe());
    assert_all_gone(&pids, &worker);
}

/// What a handler prints goes to optimus's stderr, not among the
/// monitoring lines on its stdout.
#[test]
fn a_handler_s_output_stays_off_optimus_s_stdout() {
    let server = RedisServer::start();
    add(&server, "x");
    let mut worker = work(&server, &[], "cat >/dev/null; echo HANDLER-SAYS-HELLO");
    worker.wait_for_line("work ", Duration::from_secs(20), |f| f.num("handled") == 1);
    assert!(
        !worker.stdout().contains("HANDLER-SAYS-HELLO"),
        "{}",
        worker.describe()
    );
    assert!(
        worker.stderr().contains("HANDLER-SAYS-HELLO"),
        "{}",
        worker.describe()
    );
}

/// SIGTERM while a handler runs past SHUTDOWN_TIMEOUT: the process exits 1
/// with one line saying so, and the handler is killed, not orphaned.
#[test]
fn shutdown_timeout_kills_the_handler_in_hand() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut worker, pids) =
        never_ending_handler(&server, &[("SHUTDOWN_TIMEOUT", "1")], dir.path());
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", worker.describe());
    let stderr = worker.stderr();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("optimus: SHUTDOWN_TIMEOUT (1s)"), "{last}");
    assert_all_gone(&pids, &worker);
    assert_eq!(pending(&server), 1, "the entry stays pending");
}

/// While Redis is away the work line keeps coming and says since when
/// (`redis=reconnecting down_s=…`; `redis=connecting` before the first
/// connection), the metrics say so, failed attempts are counted; when Redis
/// is back the line says connected and the workers go on.
#[test]
fn a_lost_redis_is_visible_in_the_work_line_and_the_metrics() {
    let port = support::free_port();
    let addr = format!("127.0.0.1:{}", support::free_port());
    let url = format!("redis://127.0.0.1:{port}");
    let worker = OptimusProcess::spawn(
        &["work", "--", "true"],
        &[
            ("REDIS_URL", url.as_str()),
            ("MONITORING_INTERVAL", "0.2"),
            ("METRICS_ADDR", addr.as_str()),
        ],
    );
    let line = worker.wait_for_latest("work ", Duration::from_secs(20), |_| true);
    assert_eq!(line.values["redis"], "connecting", "{}", line.line);
    assert!(line.values.contains_key("down_s"), "{}", line.line);

    let mut server = RedisServer::start_on(port);
    worker.wait_for_latest("work ", Duration::from_secs(20), |f| {
        f.values["redis"] == "connected" && f.values["consumers"] == "1"
    });
    let metric = |name: &str| support::metric(&addr, name);
    assert_eq!(metric("optimus_redis_up"), Some(1.0));
    let failures = metric("optimus_connect_failures_total").unwrap_or(0.0);

    server.stop();
    let down = worker.wait_for_latest("work ", Duration::from_secs(20), |f| {
        f.values["redis"] == "reconnecting"
    });
    assert_eq!(down.values["consumers"], "?", "{}", down.line);
    assert!(down.values.contains_key("down_s"), "{}", down.line);
    assert_eq!(metric("optimus_redis_up"), Some(0.0));
    support::wait_for(
        "failed attempts to be counted",
        Duration::from_secs(20),
        || (metric("optimus_connect_failures_total").unwrap_or(0.0) > failures).then_some(()),
        || worker.describe(),
    );

    server.start_again();
    worker.wait_for_latest("work ", Duration::from_secs(30), |f| {
        f.values["redis"] == "connected"
    });
    add(&server, "after");
    wait_handled(&worker, 1);
}

/// A server that refuses writes when `optimus work` starts (too few
/// replicas) is waited out, with a warning, not taken for a refusal of the
/// workers: they start once it takes writes.
#[test]
fn a_server_refusing_writes_at_start_is_waited_out_by_work() {
    let server = RedisServer::start();
    let _: () = server.command(&["CONFIG", "SET", "min-replicas-to-write", "1"]);
    let mut worker = work(&server, &[], "cat >/dev/null");
    support::wait_for(
        "the workers to say they are waiting",
        Duration::from_secs(20),
        || {
            worker
                .stderr()
                .contains("cannot start the workers yet")
                .then_some(())
        },
        || worker.describe(),
    );
    assert!(worker.try_exit().is_none(), "{}", worker.describe());
    let _: () = server.command(&["CONFIG", "SET", "min-replicas-to-write", "0"]);
    add(&server, "one");
    wait_handled(&worker, 1);
}

/// A consumer group deleted while the workers run (Redis kept its data) is
/// an error retrying cannot mend: one line, exit 1. (A group lost with
/// Redis's data is made again: see the test above.)
#[test]
fn a_group_deleted_under_the_workers_stops_them_with_one_line() {
    let server = RedisServer::start();
    let mut worker = work(&server, &[], "cat >/dev/null");
    add(&server, "one");
    wait_handled(&worker, 1);
    let _: i64 = server.command(&["XGROUP", "DESTROY", STREAM, GROUP]);
    let status = worker.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", worker.describe());
    let errors = worker.error_lines();
    assert_eq!(errors.len(), 1, "{}", worker.describe());
    assert!(errors[0].contains("was deleted"), "{}", errors[0]);
}
