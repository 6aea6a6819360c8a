//! `optimus bench` runs end to end on a small scale (the real figures come
//! from a full run, in the README), at default settings: every row is
//! measured, nothing is lost, duplicated or (fenced) out of order, the
//! fenced strategy keeps nothing per message in Redis, and the JSON and the
//! chart are written.

use crate::support;

use std::time::Duration;

use support::run_optimus;

/// `optimus bench` with `args`, its results written to `json`: its table
/// (stdout) and the results, once it has succeeded.
fn bench(args: &[&str], json: &std::path::Path, timeout: Duration) -> (String, serde_json::Value) {
    let mut all = vec!["bench", "--json", json.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = run_optimus(&all, &[], timeout);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    (stdout, report)
}

#[test]
fn a_small_benchmark_measures_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let svg = dir.path().join("bench.svg");
    let (stdout, report) = bench(
        &[
            "--messages",
            "3000",
            "--workers",
            "1,2",
            "--processes",
            "2,4",
            "--latency-rate",
            "1000",
            "--latency-seconds",
            "1",
            "--steady-rate",
            "2000",
            "--steady-seconds",
            "1",
            "--svg",
            svg.to_str().unwrap(),
        ],
        &json,
        Duration::from_secs(120),
    );
    assert!(stdout.contains("| fenced | 2 |"), "{stdout}");
    assert!(stdout.contains("| race | 2 |"), "{stdout}");

    let rows = report["bridge"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "two strategies, two worker counts");
    for row in rows {
        assert_eq!(row["lost"], 0, "{row}");
        assert_eq!(row["duplicates"], 0, "{row}");
        assert!(row["rate"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["of_ceiling"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["commands_per_message"].as_f64().unwrap() > 1.0, "{row}");
        if row["strategy"] == "fenced" {
            assert_eq!(row["out_of_order"], 0, "{row}");
            assert!(
                row["redis_bytes_per_message"].as_f64().unwrap() <= 16.0,
                "nothing kept per message: {row}"
            );
        } else {
            assert!(
                row["redis_bytes_per_message"].as_f64().unwrap() > 16.0,
                "race keeps an ACK key per message: {row}"
            );
        }
    }
    assert!(report["ceiling_rate"].as_f64().unwrap() > 0.0);
    // The default DEDUP_WINDOW's cost: the 2-worker burst without it.
    let off = &report["dedup_off"];
    assert_eq!(off["workers"], 2, "{off}");
    assert_eq!(off["lost"], 0, "{off}");
    assert!(stdout.contains("| DEDUP_WINDOW=0 |"), "{stdout}");
    // MIN_REPLICAS_ACKED's cost: the 2-worker burst on a server with a
    // replica, without and with it.
    let with_replica = report["replica_rows"].as_array().unwrap();
    assert_eq!(with_replica.len(), 2, "{with_replica:?}");
    for row in with_replica {
        assert_eq!(row["workers"], 2, "{row}");
        assert_eq!(row["lost"], 0, "{row}");
        assert_eq!(row["duplicates"], 0, "{row}");
    }
    assert!(stdout.contains("| MIN_REPLICAS_ACKED=1 |"), "{stdout}");
    // And its cost in latency: the same pool at a steady rate, both ways.
    let latency = report["replica_latency"].as_array().unwrap();
    assert_eq!(latency.len(), 2, "{latency:?}");
    for row in latency {
        assert_eq!(row["samples"], 1000, "every message stamped: {row}");
        assert_eq!(row["lost"], 0, "{row}");
        assert_eq!(row["duplicates"], 0, "{row}");
    }
    assert!(
        stdout.contains("| fenced, 1 replica, MIN_REPLICAS_ACKED=1 |"),
        "{stdout}"
    );
    // The delivery core's targets, held against this run.
    let targets = report["targets"].as_array().unwrap();
    assert!(
        targets
            .iter()
            .any(|t| t["target"].as_str().unwrap().starts_with("every burst") && t["met"] == true),
        "{targets:?}"
    );
    assert!(stdout.contains("| target (fenced) |"), "{stdout}");
    // The scaling rows: a pool of processes, Redis's CPU per message (4
    // processes: the writer and 2 standbys hold copies, one waits).
    // Then 4 with every process holding copies (STANDBYS=all).
    let pools = report["processes"].as_array().unwrap();
    assert_eq!(pools.len(), 3, "{pools:?}");
    for (row, (n, setting)) in pools.iter().zip([(2, ""), (4, ""), (4, "STANDBYS=all")]) {
        assert_eq!(row["processes"], n, "{row}");
        assert_eq!(row["setting"], setting, "{row}");
        assert_eq!(row["lost"], 0, "{row}");
        assert_eq!(row["duplicates"], 0, "{row}");
        assert_eq!(row["out_of_order"], 0, "{row}");
        assert!(
            row["redis_cpu_us_per_message"].as_f64().unwrap() > 0.0,
            "{row}"
        );
    }
    assert!(stdout.contains("| 2 processes |"), "{stdout}");
    assert!(stdout.contains("| 4 processes, STANDBYS=all |"), "{stdout}");
    for latency in report["latency"].as_array().unwrap() {
        assert_eq!(latency["samples"], 1000, "{latency}");
        assert_eq!(latency["lost"], 0, "{latency}");
    }
    let steady = &report["steady"][0];
    assert_eq!(steady["strategy"], "fenced", "{steady}");
    assert_eq!(steady["workers"], 2, "{steady}");
    assert_eq!(steady["messages"], 2000, "{steady}");
    assert_eq!(steady["lost"], 0, "{steady}");
    assert!(steady["peak_rss_mib"].as_f64().unwrap() > 0.0, "{steady}");
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.starts_with("<svg") && chart.contains("polyline"),
        "{chart}"
    );
}

/// `optimus bench --cluster` on a small scale: its own 3-master cluster,
/// both strategies' rows, the shard rows, nothing lost or duplicated, the
/// fenced rows in order at about one command and nothing kept per message.
#[test]
fn a_small_cluster_benchmark_measures_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("cluster.json");
    let (stdout, report) = bench(
        &["--cluster", "--messages", "3000", "--workers", "1,2"],
        &json,
        Duration::from_secs(180),
    );
    assert!(stdout.contains("| fenced | sharded | 2 |"), "{stdout}");
    assert!(stdout.contains("| race | classic | 2 |"), "{stdout}");
    assert_eq!(report["masters"], 3, "{report}");
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "two strategies, two worker counts");
    for row in rows {
        assert_eq!(row["lost"], 0, "{row}");
        assert_eq!(row["duplicates"], 0, "{row}");
        assert!(row["rate"].as_f64().unwrap() > 0.0, "{row}");
        let commands = row["commands_per_message"].as_f64().unwrap();
        if row["strategy"] == "fenced" {
            assert_eq!(row["out_of_order"], 0, "{row}");
            assert!((1.0..=1.5).contains(&commands), "{row}");
            assert!(
                row["redis_bytes_per_message"].as_f64().unwrap() <= 16.0,
                "{row}"
            );
        } else {
            assert!(commands > 2.0, "race locks and acks each message: {row}");
        }
    }
    let shards = &report["shards"];
    assert_eq!(shards["messages"], 3000, "{shards}");
    assert_eq!(shards["lost"], 0, "{shards}");
    assert_eq!(shards["duplicates"], 0, "{shards}");
    assert_eq!(shards["out_of_order"], 0, "{shards}");
    assert!(shards["ratio"].as_f64().unwrap() > 0.0, "{shards}");
}
