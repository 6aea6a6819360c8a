//! `optimus bench`: measures the bridge in one run, on one machine, against
//! one redis-server, and prints a table (also written as JSON, with an SVG
//! chart of throughput against workers).
//!
//! - **ceiling**: the same payloads written straight into a stream with
//!   pipelined XADD, no bridge;
//! - **publisher**: `optimus publish`'s pipelined PUBLISH against
//!   `redis-cli --pipe` for the same messages;
//! - **burst**, for each worker count: the messages sent as fast as
//!   `redis-cli --pipe` can, to a bridge at default settings (nothing sized
//!   for the burst): messages/s from the first PUBLISH to the last stream
//!   entry, and its ratio to the ceiling; Redis commands per bridged message
//!   (from INFO commandstats, PUBLISH and the benchmark's own commands left
//!   out); the bridge process's CPU time per message and peak RSS; Redis
//!   memory per message beyond the stream (the MEMORY USAGE of every other
//!   key once the burst is written); entries out of
//!   publish order; lost and duplicated messages (a row with lost,
//!   duplicated or out-of-order entries is a failure, not a result: for the
//!   race strategy, which does not keep order, order is reported only);
//! - **DEDUP_WINDOW's cost**: the fenced 2-worker burst again with
//!   DEDUP_WINDOW=0;
//! - **MIN_REPLICAS_ACKED's cost**: the fenced 2-worker burst on a server
//!   with a replica, without and with MIN_REPLICAS_ACKED=1;
//! - **latency** from publish to stream entry at a steady rate, once a first
//!   message has made the stream's writer;
//! - **memory**: the bridge's peak RSS with the most workers at a steady
//!   high rate.
//!
//! Every bridge measurement is made for each strategy (`fenced`, `race`)
//! asked for; the delivery core's targets are held against the fenced rows
//! ([`targets`]).
//!
//! The bridge runs as a separate `optimus consume` process (this binary), so
//! its CPU and memory are its own.
//!
//! `optimus bench --cluster` measures the bridge on a Redis Cluster of its
//! own instead ([`cluster`]): race and fenced rows per worker count, and how
//! the rate grows with the shards.
//!
//! It lives in the binary, not the library: it drives the `optimus` binary
//! itself, and starts its redis-server with the tests' harness
//! (`optimus-testkit`).

mod cluster;
mod measure;
mod report;

use clap::Args;

use super::Exit;
use super::connect::ConnectArgs;

/// `optimus bench` flags.
#[derive(Debug, Clone, Args)]
#[command(allow_negative_numbers = true)]
pub struct BenchArgs {
    /// Messages in each burst row (sent with redis-cli --pipe).
    #[arg(long, default_value = "300000")]
    pub messages: u64,
    /// Worker counts to measure, comma-separated.
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
    pub workers: Vec<usize>,
    /// Process counts of the scaling rows (a fenced pool, each process
    /// at the default settings, Redis's CPU measured), comma-separated;
    /// 0 skips them.
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
    pub processes: Vec<usize>,
    /// Strategies to measure, comma-separated.
    #[arg(long, default_value = "fenced,race", value_delimiter = ',', value_parser = super::strategy_parser())]
    pub strategies: Vec<optimus::Strategy>,
    /// Steady rate of the latency run, messages/s.
    #[arg(long, default_value = "10000")]
    pub latency_rate: u64,
    /// Seconds of the latency run.
    #[arg(long, default_value = "5")]
    pub latency_seconds: u64,
    /// Steady rate (messages/s) of the memory run, with the most workers
    /// of --workers, first strategy; 0 skips it.
    #[arg(long, default_value = "50000")]
    pub steady_rate: u64,
    /// Seconds of the memory run.
    #[arg(long, default_value = "10")]
    pub steady_seconds: u64,
    /// Measure on a Redis Cluster of the benchmark's own (3 masters on free
    /// loopback ports) instead: the burst rows per strategy and worker count
    /// (fenced with sharded Pub/Sub, race with classic), and one pool on
    /// one master against three pools on three masters. Takes --messages,
    /// --workers, --strategies, --shard-workers and --json; REDIS_URL is
    /// not used.
    #[arg(long)]
    pub cluster: bool,
    /// Workers of each pool in the shard rows of --cluster.
    #[arg(long, default_value = "2")]
    pub shard_workers: usize,
    /// Where the JSON results go.
    #[arg(long, default_value = "bench.json")]
    pub json: std::path::PathBuf,
    /// Where the chart goes.
    #[arg(long, default_value = "bench.svg")]
    pub svg: std::path::PathBuf,
}

/// Measures every row, prints the table and writes the JSON and the chart;
/// exit 1 when a row lost, duplicated or (fenced) reordered a message.
pub async fn run(connect: &ConnectArgs, args: BenchArgs) -> Result<(), Exit> {
    // The benchmark FLUSHALLs the server REDIS_URL names: never one a
    // service's config file names.
    if let Some(file) = crate::cli::config_file::origin("REDIS_URL") {
        return Err(Exit::Refused(format!(
            "optimus bench empties (FLUSHALL) the server REDIS_URL names, and this REDIS_URL comes from the config file {}: give it on the command line or in the environment to bench that server, or run without the file to bench a server of its own",
            file.display()
        )));
    }
    if args.cluster {
        return run_cluster(args).await;
    }
    let config = measure::BenchConfig {
        redis_url: connect.redis_url.clone(),
        messages: args.messages,
        workers: args.workers,
        processes: args.processes.into_iter().filter(|&n| n > 0).collect(),
        strategies: args.strategies,
        latency_rate: args.latency_rate,
        latency_duration: std::time::Duration::from_secs(args.latency_seconds),
        steady_rate: args.steady_rate,
        steady_duration: std::time::Duration::from_secs(args.steady_seconds),
        json_out: args.json,
        svg_out: args.svg,
        exe: std::env::current_exe().expect("the path of this program"),
    };
    for path in [&config.json_out, &config.svg_out] {
        measure::check_out_path(path).map_err(|err| Exit::Refused(format!("{err:#}")))?;
    }
    let report = measure::run(&config)
        .await
        .map_err(|err| Exit::failed(format_args!("bench failed: {err:#}")))?;
    println!("{}", report::table(&report));
    if report.failures() > 0 {
        return Err(Exit::failed(format_args!(
            "{} rows lost or duplicated messages",
            report.failures()
        )));
    }
    Ok(())
}

/// `optimus bench --cluster`.
async fn run_cluster(args: BenchArgs) -> Result<(), Exit> {
    let config = cluster::ClusterConfig {
        messages: args.messages,
        workers: args.workers,
        strategies: args.strategies,
        shard_workers: args.shard_workers,
        json_out: args.json,
        exe: std::env::current_exe().expect("the path of this program"),
    };
    measure::check_out_path(&config.json_out).map_err(|err| Exit::Refused(format!("{err:#}")))?;
    let report = cluster::run(&config)
        .await
        .map_err(|err| Exit::failed(format_args!("bench --cluster failed: {err:#}")))?;
    println!("{}", cluster::table(&report));
    if report.failures() > 0 {
        return Err(Exit::failed(format_args!(
            "{} rows lost or duplicated messages",
            report.failures()
        )));
    }
    Ok(())
}
