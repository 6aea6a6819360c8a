//! METRICS_ADDR: `consume` and `work` serve Prometheus metrics that move
//! with the work done.

use crate::support;

use std::io::{Read, Write};
use std::time::Duration;

use support::{OptimusProcess, RedisServer, free_port, scrape};

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

    let mut other = std::net::TcpStream::connect(&addr).unwrap();
    other.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    other.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
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
    let addr = format!("127.0.0.1:{}", free_port());
    let url = server.url();
    let mut work = OptimusProcess::spawn(
        &["work", "--", "true"],
        &[
            ("REDIS_URL", url.as_str()),
            ("METRICS_ADDR", addr.as_str()),
            ("MONITORING_INTERVAL", "0.2"),
        ],
    );
    work.wait_for_line("work ", Duration::from_secs(20), |f| f.num("handled") == 3);
    let body = scrape(&addr);
    assert_eq!(sample(&body, "optimus_work_handled_total"), 3.0, "{body}");
    assert_eq!(sample(&body, "optimus_work_handle_seconds_count"), 3.0);
}
