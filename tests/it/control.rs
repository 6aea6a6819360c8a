//! The control plane: the kill switch (`optimus ctl stop|resume`) and the
//! idle stop (IDLE_TIMEOUT).

use crate::support;

use std::time::Duration;

use support::{OptimusProcess, RedisServer, run_optimus};

fn ctl(server: &RedisServer, action: &str) -> String {
    let url = server.url();
    let out = run_optimus(
        &["ctl", action],
        &[("REDIS_URL", url.as_str())],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_kill_switch_stops_every_process_until_resumed() {
    let server = RedisServer::start();
    let url = server.url();
    let mut consumers = vec![
        OptimusProcess::consume(&server, &[]),
        OptimusProcess::consume(&server, &[]),
    ];
    for c in &consumers {
        c.wait_consumers(4);
    }
    let mut work = OptimusProcess::spawn(
        &["work", "--", "true"],
        &[("REDIS_URL", url.as_str()), ("MONITORING_INTERVAL", "0.2")],
    );
    work.wait_for_line("work ", Duration::from_secs(20), |_| true);

    let status = ctl(&server, "status");
    assert!(status.starts_with("kill switch: off"), "{status}");
    let rows: Vec<&str> = status
        .lines()
        .filter(|l| l.starts_with("consume ") || l.starts_with("work "))
        .collect();
    assert_eq!(
        rows.len(),
        3,
        "two consume processes and one work process:\n{status}"
    );
    assert!(
        rows.iter()
            .filter(|r| r.starts_with("consume"))
            .all(|r| r.split_whitespace().nth(3) == Some("2")),
        "{status}"
    );

    assert!(ctl(&server, "stop").contains("kill switch set"));
    for p in consumers.iter_mut().chain(std::iter::once(&mut work)) {
        let status = p.wait_exit(Duration::from_secs(15));
        assert!(status.success(), "a graceful stop: {}", p.describe());
        assert!(p.stderr().contains("kill switch set"), "{}", p.describe());
    }
    // A process started while the switch is set stops too.
    let mut late = OptimusProcess::consume(&server, &[]);
    assert!(late.wait_exit(Duration::from_secs(15)).success());

    let status = ctl(&server, "status");
    assert!(status.starts_with("kill switch: ON (by "), "{status}");
    assert!(status.contains("no live processes"), "{status}");

    assert!(ctl(&server, "resume").contains("cleared"));
    assert!(ctl(&server, "resume").contains("was not set"));
    let mut again = OptimusProcess::consume(&server, &[]);
    again.wait_consumers(2);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        again.try_exit().is_none(),
        "runs after resume: {}",
        again.describe()
    );
    again.signal("TERM");
    assert!(again.wait_exit(Duration::from_secs(10)).success());
}

/// A process told to stop while it registers (here its registration
/// reached Redis but the reply hangs) takes the registration back before it
/// exits, so `ctl status` never shows a process that is gone. (The kill
/// switch's own test met this as a race: a process started while the
/// switch was set stayed in `ctl status` after it exited.)
#[test]
fn a_process_stopped_while_registering_leaves_no_registration() {
    let server = RedisServer::start();
    // A first process loads the registration script into the server, so
    // that the second's registration is one EVALSHA naming the key.
    let mut first = OptimusProcess::consume(&server, &[]);
    first.wait_consumers(2);
    first.signal("TERM");
    assert!(first.wait_exit(Duration::from_secs(15)).success());
    let proxy = support::proxy::StallingProxy::start(server.port);
    proxy.hang_the_reply_to(b"{optimus:ctl}:processes");
    let url = proxy.url();
    let mut consume = OptimusProcess::spawn(
        &["consume"],
        &[("REDIS_URL", url.as_str()), ("MONITORING_INTERVAL", "0.2")],
    );
    let registered = || server.command::<i64>(&["ZCARD", "{optimus:ctl}:processes"]);
    support::wait_for(
        "the registration to reach Redis",
        Duration::from_secs(20),
        || (registered() == 1).then_some(()),
        || consume.describe(),
    );
    consume.signal("TERM");
    let status = consume.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "{}", consume.describe());
    assert_eq!(
        registered(),
        0,
        "the process is gone, and so is its registration:\n{}\n{}",
        ctl(&server, "status"),
        consume.describe()
    );
    assert!(
        ctl(&server, "status").contains("no live processes"),
        "{}",
        ctl(&server, "status")
    );
}

#[test]
fn idle_timeout_stops_a_consumer_with_nothing_to_do() {
    let server = RedisServer::start();
    let mut consume = OptimusProcess::consume(
        &server,
        &[("IDLE_TIMEOUT", "3"), ("MONITORING_INTERVAL", "0.2")],
    );
    consume.wait_consumers(2);
    let summary = support::publish(&server, &["--count", "100"]);
    assert_eq!(
        summary.num("no_subscriber"),
        0,
        "the bridge was there: {}",
        summary.line
    );
    let status = consume.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{}", consume.describe());
    assert!(
        consume.stderr().contains("IDLE_TIMEOUT"),
        "{}",
        consume.describe()
    );
    let last = consume.latest_line("monitor ").unwrap();
    assert_eq!(
        last.num("written"),
        100,
        "what came was written first: {}",
        last.line
    );
    assert_eq!(server.xlen("messages:processed"), 100);
}

/// The workers column of `ctl status` for the consume processes, sorted.
fn consume_workers(server: &RedisServer) -> Vec<u64> {
    let mut workers: Vec<u64> = ctl(server, "status")
        .lines()
        .filter(|l| l.starts_with("consume "))
        .filter_map(|l| l.split_whitespace().nth(3)?.parse().ok())
        .collect();
    workers.sort();
    workers
}

fn wait_for_workers(server: &RedisServer, expected: &[u64]) {
    support::wait_for(
        &format!("consume processes running {expected:?} workers"),
        Duration::from_secs(30),
        || (consume_workers(server) == expected).then_some(()),
        || ctl(server, "status"),
    );
}

/// Waits for the `published` messages in the stream and every process
/// settled, then checks each is there once.
fn all_written_once(server: &RedisServer, processes: &[OptimusProcess], published: u64) {
    support::wait_for(
        &format!("{published} entries"),
        Duration::from_secs(30),
        || (server.xlen("messages:processed") as u64 >= published).then_some(()),
        || processes.iter().map(|p| p.describe()).collect(),
    );
    for p in processes {
        p.wait_settled(Duration::from_secs(30));
    }
    let tally = support::Tally::of(&server.stream_entries("messages:processed"), 0..published);
    assert!(tally.is_exact(), "{tally}");
}

/// `ctl scale 7` over three processes gives 3 + 2 + 2; when one is killed the
/// two left share its part (4 + 3); messages published all along land
/// exactly once; `ctl stop` stops the rest.
#[test]
fn ctl_scale_splits_the_workers_and_survivors_take_over_a_share() {
    let server = RedisServer::start();
    let url = server.url();
    let mut processes: Vec<OptimusProcess> = (0..3)
        .map(|_| OptimusProcess::consume(&server, &[]))
        .collect();
    for p in &processes {
        p.wait_consumers(6);
    }
    let mut publisher = OptimusProcess::spawn(
        &[
            "publish",
            "--rate",
            "2000",
            "--count",
            "20000",
            "--batch-size",
            "100",
        ],
        &[("REDIS_URL", url.as_str())],
    );

    let out = run_optimus(
        &["ctl", "scale", "7"],
        &[("REDIS_URL", url.as_str())],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{out:?}");
    wait_for_workers(&server, &[2, 2, 3]);

    processes[0].signal("KILL");
    processes.remove(0);
    wait_for_workers(&server, &[3, 4]);

    let status = publisher.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{}", publisher.describe());
    let summary = publisher.wait_for_line("publish done", Duration::from_secs(1), |_| true);
    let published = summary.num("published");
    all_written_once(&server, &processes, published);

    ctl(&server, "stop");
    for p in processes.iter_mut() {
        assert!(
            p.wait_exit(Duration::from_secs(15)).success(),
            "{}",
            p.describe()
        );
    }
}

/// The input channel's subscriptions.
fn numsub(server: &RedisServer) -> u64 {
    let reply: (String, u64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("messages:published")
        .query(&mut server.conn())
        .unwrap();
    reply.1
}

/// STANDBYS=2 (the default): of four processes three hold copies. `ctl
/// scale 3` leaves one of them no worker: it gives its place up, so the
/// three that run a worker hold copies (one reader each), whichever of
/// them waited before, and what is published is written once.
#[test]
fn a_process_scaled_to_no_worker_gives_its_place_among_the_holders_up() {
    let server = RedisServer::start();
    let url = server.url();
    let processes: Vec<OptimusProcess> = (0..4)
        .map(|_| OptimusProcess::consume(&server, &[]))
        .collect();
    for p in &processes {
        p.wait_consumers(8);
    }
    support::wait_for(
        "three processes holding copies, two readers each",
        Duration::from_secs(30),
        || (numsub(&server) == 6).then_some(()),
        || ctl(&server, "status"),
    );
    let out = run_optimus(
        &["ctl", "scale", "3"],
        &[("REDIS_URL", url.as_str())],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{out:?}");
    wait_for_workers(&server, &[0, 1, 1, 1]);
    support::wait_for(
        "the three processes with a worker holding copies, one reader each",
        Duration::from_secs(30),
        || (numsub(&server) == 3).then_some(()),
        || {
            let mut all = vec![format!("{} subscriptions", numsub(&server))];
            all.extend(processes.iter().map(|p| p.describe()));
            all.join("\n")
        },
    );
    let summary = support::publish_with(&[("REDIS_URL", url.as_str())], &["--count", "2000"]);
    let published = summary.num("published");
    assert_eq!(summary.num("stored_directly"), 0, "{}", summary.line);
    all_written_once(&server, &processes, published);
}

/// `ctl scale 0` stops every worker, so it needs --yes (without, nothing
/// changes); the processes it leaves without workers still show in
/// `ctl status`, and the time without a worker counts as a gap.
#[test]
fn ctl_scale_0_needs_yes_shows_idle_processes_and_counts_the_gap() {
    let server = RedisServer::start();
    let url = server.url();
    let consume = OptimusProcess::consume(&server, &[]);
    consume.wait_consumers(2);
    let scale = |args: &[&str]| {
        let mut all = vec!["ctl", "scale"];
        all.extend_from_slice(args);
        run_optimus(
            &all,
            &[("REDIS_URL", url.as_str())],
            Duration::from_secs(10),
        )
    };

    let refused = scale(&["0"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--yes"), "{stderr}");
    let total: Option<String> = server.command(&["GET", "{optimus:ctl}:workers"]);
    assert_eq!(total, None, "nothing changed");

    assert!(scale(&["0", "--yes"]).status.success());
    wait_for_workers(&server, &[0]);
    assert!(
        ctl(&server, "status").contains("total workers: 0 (ctl scale)"),
        "{}",
        ctl(&server, "status")
    );
    support::wait_for(
        "the warning that this process has no worker",
        Duration::from_secs(10),
        || {
            consume
                .stderr()
                .contains("leaves this process no worker")
                .then_some(())
        },
        || consume.describe(),
    );

    assert!(scale(&["2"]).status.success());
    wait_for_workers(&server, &[2]);
    let line = consume.wait_for_latest("monitor ", Duration::from_secs(20), |f| {
        f.num("gaps") >= 1 && f.num("consumers") == 2
    });
    assert!(line.num("gap_ms") > 0, "{}", line.line);
}

/// `optimus top` in a terminal (a tmux pane): it shows the live consume
/// process with its last monitoring figures, the stream with its length and
/// consumer group, and `q` ends it with exit 0.
#[test]
fn top_shows_the_live_processes_and_streams_and_quits_on_q() {
    if std::process::Command::new("tmux")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("tmux is not installed: optimus top is not driven here");
        return;
    }
    let server = RedisServer::start();
    let url = server.url();
    let consume = OptimusProcess::consume(&server, &[("MONITORING_INTERVAL", "0.2")]);
    consume.wait_consumers(2);
    support::publish(&server, &["--count", "500"]);
    let _: String = server.command(&["XGROUP", "CREATE", "messages:processed", "billing", "0"]);

    /// The tmux server of this test, killed when the test ends.
    struct Tmux(String);
    impl Tmux {
        fn run(&self, args: &[&str]) -> std::process::Output {
            std::process::Command::new("tmux")
                .args(["-L", &self.0])
                .args(args)
                .output()
                .expect("tmux")
        }
        fn screen(&self) -> String {
            String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout)
                .into_owned()
        }
    }
    impl Drop for Tmux {
        fn drop(&mut self) {
            self.run(&["kill-server"]);
        }
    }
    let tmux = Tmux(format!("optimus-top-{}", std::process::id()));
    let command = format!(
        "env REDIS_URL={url} {} top; echo top-exited-$?; sleep 30",
        support::optimus_binary().display()
    );
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "40",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");
    let pid = consume.pid().to_string();
    support::wait_for(
        "optimus top to show the consume process with 500 written, and the stream's group",
        Duration::from_secs(20),
        || {
            let screen = tmux.screen();
            let process = screen
                .lines()
                .find(|l| l.contains("consume") && l.contains(&pid))?;
            (process.contains(" 500 ")
                && screen.contains("messages:processed")
                && screen.contains("billing"))
            .then_some(())
        },
        || format!("the screen:\n{}\n{}", tmux.screen(), consume.describe()),
    );
    tmux.run(&["send-keys", "-t", "top", "q"]);
    support::wait_for(
        "optimus top to end on q, with exit 0",
        Duration::from_secs(10),
        || tmux.screen().contains("top-exited-0").then_some(()),
        || format!("the screen:\n{}", tmux.screen()),
    );
}
