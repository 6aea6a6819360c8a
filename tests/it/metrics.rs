//! METRICS_ADDR: `consume` and `work` serve Prometheus metrics that move
//! with the work done.

use crate::support;

use std::time::Duration;

use support::{OptimusProcess, RedisServer, free_port, http_get, scrape};

/// The value of a sample `name` in a scraped body.
fn sample(body: &str, name: &str) -> f64 {
    support::sample(body, name).unwrap_or_else(|| panic!("no {name} in:\n{body}"))
}

#[test]
fn consume_serves_counters_that_move() {
    let server = RedisServer::start();
    let addr = format!("127.0.0.1:{}", free_port());
    let consume = OptimusProcess::consume(
        &server,
        &[("CONSUMERS_COUNT", "2"), ("METRICS_ADDR", addr.as_str())],
    );
    consume.wait_consumers(2);
    support::publish(&server, &["--count", "100"]);
    consume.wait_settled(Duration::from_secs(20));
    let body = scrape(&addr);
    assert_eq!(sample(&body, "optimus_written_total"), 100.0, "{body}");
    // Each message counted once per process, however many of its
    // subscriptions got it.
    assert_eq!(sample(&body, "optimus_received_total"), 100.0);
    assert_eq!(sample(&body, "optimus_workers"), 2.0);
    assert_eq!(sample(&body, "optimus_live_workers"), 2.0);
    assert_eq!(
        sample(&body, "optimus_holding_copies"),
        1.0,
        "alone, it holds copies"
    );
    assert_eq!(sample(&body, "optimus_pending"), 0.0);
    assert!(sample(&body, "optimus_batch_seconds_count") > 0.0, "{body}");

    support::publish(&server, &["--count", "50"]);
    consume.wait_settled(Duration::from_secs(20));
    let body = scrape(&addr);
    assert_eq!(sample(&body, "optimus_written_total"), 150.0, "{body}");

    // The process's own figures, as Prometheus's client libraries name them.
    assert!(
        sample(&body, "process_resident_memory_bytes") > 1e6,
        "{body}"
    );
    assert!(sample(&body, "process_open_fds") > 3.0, "{body}");
    assert!(sample(&body, "process_cpu_seconds_total") >= 0.0, "{body}");
    assert_eq!(sample(&body, "optimus_build_info"), 1.0, "{body}");

    assert_eq!(http_get(&addr, "/").0, 404);
}

/// `/healthz` answers while the process runs; `/readyz` is 200 while Redis
/// is reached and 503, with the reason, while it is not, and 200 again
/// once it is back.
#[test]
fn the_probes_follow_redis() {
    let mut server = RedisServer::start();
    let addr = format!("127.0.0.1:{}", free_port());
    let consume = OptimusProcess::consume(&server, &[("METRICS_ADDR", addr.as_str())]);
    consume.wait_consumers(2);
    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(&addr, "/readyz"), (200, "ready\n".to_string()));
    server.stop();
    let (status, reason) = support::wait_for(
        "/readyz to say Redis is gone",
        Duration::from_secs(20),
        || Some(http_get(&addr, "/readyz")).filter(|(status, _)| *status == 503),
        || consume.describe(),
    );
    assert_eq!(status, 503);
    assert!(
        reason.starts_with("not ready: Redis unreachable"),
        "{reason}"
    );
    assert_eq!(reason.lines().count(), 1, "{reason}");
    assert_eq!(http_get(&addr, "/healthz").0, 200, "alive all the same");
    server.start_again();
    support::wait_for(
        "/readyz to be 200 again",
        Duration::from_secs(30),
        || (http_get(&addr, "/readyz").0 == 200).then_some(()),
        || consume.describe(),
    );
}

/// `optimus work -- true` on `server`, serving METRICS_ADDR: the process
/// and the address.
fn work_with_metrics(server: &RedisServer) -> (OptimusProcess, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let url = server.url();
    let work = OptimusProcess::spawn(
        &["work", "--", "true"],
        &[
            ("REDIS_URL", url.as_str()),
            ("METRICS_ADDR", addr.as_str()),
            ("MONITORING_INTERVAL", "0.2"),
        ],
    );
    (work, addr)
}

/// `optimus work` serves the same probes.
#[test]
fn work_serves_the_probes() {
    let server = RedisServer::start();
    let (mut work, addr) = work_with_metrics(&server);
    work.wait_for_line("work ", Duration::from_secs(20), |f| {
        f.values.get("redis").is_some_and(|v| v == "connected")
    });
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    assert_eq!(http_get(&addr, "/readyz"), (200, "ready\n".to_string()));
}

#[test]
fn work_serves_its_counters() {
    let server = RedisServer::start();
    for i in 0..3 {
        let _: String = redis::cmd("XADD")
            .arg("messages:processed")
            .arg("*")
            .arg("payload")
            .arg(i)
            .query(&mut server.conn())
            .unwrap();
    }
    let (mut work, addr) = work_with_metrics(&server);
    work.wait_for_line("work ", Duration::from_secs(20), |f| f.num("handled") == 3);
    let body = scrape(&addr);
    assert_eq!(sample(&body, "optimus_work_handled_total"), 3.0, "{body}");
    assert_eq!(sample(&body, "optimus_work_handle_seconds_count"), 3.0);
}
