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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use redis::aio::MultiplexedConnection;
use serde::Serialize;

use crate::config::{Pace, PublishConfig, Strategy};
use crate::publish::test_message;

const CHANNEL: &str = "bench:published";
const STREAM: &str = "bench:processed";

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Use this server instead of starting one (it is FLUSHALLed!).
    pub redis_url: Option<String>,
    /// Messages per throughput row.
    pub messages: u64,
    pub workers: Vec<usize>,
    /// Process counts of the scaling rows (fenced, each process at the
    /// default CONSUMERS_COUNT); empty: none.
    pub processes: Vec<usize>,
    pub strategies: Vec<Strategy>,
    /// Steady rate (messages/s) and duration of the latency run.
    pub latency_rate: u64,
    pub latency_duration: Duration,
    /// Steady rate (0: skip) and duration of the memory run.
    pub steady_rate: u64,
    pub steady_duration: Duration,
    pub json_out: PathBuf,
    pub svg_out: PathBuf,
    /// The `optimus` binary that runs `consume`.
    pub exe: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct BridgeRow {
    pub strategy: &'static str,
    pub workers: usize,
    pub messages: u64,
    pub seconds: f64,
    pub rate: f64,
    /// `rate` over the ceiling (pipelined XADD, no bridge).
    pub of_ceiling: f64,
    pub commands_per_message: f64,
    pub cpu_us_per_message: f64,
    pub peak_rss_mib: f64,
    /// Redis memory the protocol keeps per message beyond the stream entry.
    pub redis_bytes_per_message: f64,
    /// Entries that stand before one published earlier.
    pub out_of_order: u64,
    pub lost: u64,
    pub duplicates: u64,
}

impl BridgeRow {
    /// Lost or duplicated messages, or (for a strategy that keeps order)
    /// entries out of order.
    pub fn failed(&self) -> bool {
        self.lost + self.duplicates > 0 || (self.strategy != "race" && self.out_of_order > 0)
    }
}

/// A burst bridged by a pool of processes (fenced, default settings):
/// every process reads every message, so Redis's work grows with each.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessesRow {
    pub processes: usize,
    pub messages: u64,
    pub seconds: f64,
    pub rate: f64,
    pub of_ceiling: f64,
    /// Redis's CPU (INFO used_cpu_sys + used_cpu_user) over the row, per
    /// message.
    pub redis_cpu_us_per_message: f64,
    /// The processes' CPU together, per message.
    pub bridge_cpu_us_per_message: f64,
    pub out_of_order: u64,
    pub lost: u64,
    pub duplicates: u64,
}

impl ProcessesRow {
    /// Lost, duplicated or out-of-order messages.
    pub fn failed(&self) -> bool {
        self.lost + self.duplicates + self.out_of_order > 0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyRow {
    pub strategy: &'static str,
    pub workers: usize,
    pub rate: u64,
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub lost: u64,
    pub duplicates: u64,
}

/// The bridge at a steady rate: does it keep up, and in how much memory.
#[derive(Debug, Clone, Serialize)]
pub struct SteadyRow {
    pub strategy: &'static str,
    pub workers: usize,
    pub target_rate: u64,
    /// Messages bridged per second over the run (publish start to last entry).
    pub rate: f64,
    pub messages: u64,
    pub cpu_us_per_message: f64,
    pub peak_rss_mib: f64,
    pub lost: u64,
    pub duplicates: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: String,
    pub redis_version: String,
    pub payload_bytes: usize,
    pub ceiling_rate: f64,
    pub publisher_rate: f64,
    pub redis_cli_pipe_rate: f64,
    pub bridge: Vec<BridgeRow>,
    /// The fenced 2-worker burst with DEDUP_WINDOW=0: the default window's
    /// cost is the difference.
    pub dedup_off: Option<BridgeRow>,
    pub processes: Vec<ProcessesRow>,
    pub latency: Vec<LatencyRow>,
    pub steady: Vec<SteadyRow>,
    /// The delivery core's targets, against this run (fenced rows).
    pub targets: Vec<Target>,
}

/// One of the delivery core's targets, and what this run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

/// The targets the fenced rows of `report` can be held against (those whose
/// rows were measured): every burst row exact and in order, 2 workers at
/// 200,000/s, 8 workers at 0.8 of 2, CPU per message flat with workers
/// (the most at most 1.5 times the least), p99 at most 2 ms, at most 16
/// bytes per message in Redis beside the stream.
pub fn targets(report: &Report) -> Vec<Target> {
    let rows: Vec<&BridgeRow> = report
        .bridge
        .iter()
        .filter(|r| r.strategy == "fenced")
        .collect();
    let mut out = Vec::new();
    let mut add = |target: &str, measured: String, met: bool| {
        out.push(Target {
            target: target.to_string(),
            measured,
            met,
        })
    };
    if rows.is_empty() {
        return out;
    }
    let bad: u64 = rows
        .iter()
        .map(|r| r.lost + r.duplicates + r.out_of_order)
        .sum();
    add(
        "every burst: 0 lost, 0 twice, 0 out of order",
        format!("{bad} in {} rows", rows.len()),
        bad == 0,
    );
    let at = |n: usize| rows.iter().find(|r| r.workers == n);
    if let Some(two) = at(2) {
        add(
            "2 workers: at least 200,000 messages/s",
            format!("{:.0}/s ({:.2} of the ceiling)", two.rate, two.of_ceiling),
            two.rate >= 200_000.0,
        );
        if let Some(eight) = at(8) {
            let ratio = eight.rate / two.rate;
            add(
                "8 workers: at least 0.8 of 2 workers",
                format!("{:.0}/s = {ratio:.2}", eight.rate),
                ratio >= 0.8,
            );
        }
    }
    let cpu: Vec<f64> = rows.iter().map(|r| r.cpu_us_per_message).collect();
    let (least, most) = cpu
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), c| (lo.min(*c), hi.max(*c)));
    if rows.len() > 1 {
        add(
            "CPU per message flat with workers (most at most 1.5 x least)",
            format!("{least:.1} to {most:.1} µs"),
            most <= least * 1.5,
        );
    }
    if let Some(l) = report.latency.iter().find(|l| l.strategy == "fenced") {
        add(
            "p99 at a steady 10,000/s: at most 2 ms",
            format!("{:.1} ms (at {}/s)", l.p99_ms, l.rate),
            l.p99_ms <= 2.0,
        );
    }
    let bytes = rows
        .iter()
        .map(|r| r.redis_bytes_per_message)
        .fold(0.0f64, f64::max);
    add(
        "Redis memory beside the stream: at most 16 B per message",
        format!("{bytes:.1} B at most"),
        bytes <= 16.0,
    );
    out
}

impl Report {
    /// Rows with lost or duplicated messages: failures, not results.
    pub fn failures(&self) -> usize {
        self.bridge
            .iter()
            .chain(self.dedup_off.iter())
            .filter(|r| r.failed())
            .count()
            + self
                .latency
                .iter()
                .filter(|r| r.lost + r.duplicates > 0)
                .count()
            + self
                .steady
                .iter()
                .filter(|r| r.lost + r.duplicates > 0)
                .count()
            + self.processes.iter().filter(|r| r.failed()).count()
    }
}

/// A redis-server of the benchmark's own, stopped on drop.
struct LocalServer {
    child: Child,
    _dir: tempfile_dir::TempDir,
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal temp dir (the benchmark is not a test; no dev-dependency here).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> std::io::Result<Self> {
            let path = std::env::temp_dir().join(format!("optimus-bench-{}", std::process::id()));
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn start_server() -> Result<(LocalServer, String)> {
    let dir = tempfile_dir::TempDir::new()?;
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run redis-server (install Debian's redis-server package)")?;
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && child.try_wait()?.is_none() {
            if let Ok(mut conn) = connect(&url).await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return Ok((LocalServer { child, _dir: dir }, url));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    bail!("redis-server did not start")
}

async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

/// Runs every measurement and writes the JSON and the SVG.
pub async fn run(config: &BenchConfig) -> Result<Report> {
    let (_server, url) = match &config.redis_url {
        Some(url) => (None, url.clone()),
        None => {
            let (server, url) = start_server().await?;
            (Some(server), url)
        }
    };
    let mut conn = connect(&url).await.context("cannot connect to Redis")?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await?;
    let redis_version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    let payload_bytes = test_message(0, 0).len();
    // The burst, as RESP for redis-cli --pipe, made once for every row.
    let scratch = tempfile_dir::TempDir::new()?;
    let burst = scratch.path().join("burst.resp");
    std::fs::write(&burst, resp_publishes(config.messages))?;

    eprintln!(
        "bench: ceiling (pipelined XADD of {} messages)",
        config.messages
    );
    let ceiling_rate = ceiling(&mut conn, config.messages).await?;
    eprintln!("bench: publisher against redis-cli --pipe");
    let (publisher_rate, redis_cli_pipe_rate) =
        publisher_vs_pipe(&url, &mut conn, config.messages, &burst).await?;

    let mut bridge = Vec::new();
    let mut latency = Vec::new();
    for &strategy in &config.strategies {
        for &workers in &config.workers {
            eprintln!(
                "bench: {} bridge with {workers} workers, a burst of {}",
                strategy.name(),
                config.messages
            );
            let row = bridge_row(
                config,
                &url,
                &mut conn,
                (strategy, workers),
                Burst {
                    file: &burst,
                    ceiling_rate,
                },
                &[],
            );
            bridge.push(row.await?);
        }
        eprintln!(
            "bench: {} latency at {}/s for {:?}",
            strategy.name(),
            config.latency_rate,
            config.latency_duration
        );
        latency.push(latency_row(config, &url, &mut conn, strategy, 2).await?);
    }
    // What the default DEDUP_WINDOW costs: the 2-worker fenced burst again
    // without it.
    let mut dedup_off = None;
    if config.strategies.contains(&Strategy::Fenced) && config.workers.contains(&2) {
        eprintln!(
            "bench: fenced bridge with 2 workers and DEDUP_WINDOW=0, a burst of {}",
            config.messages
        );
        let row = bridge_row(
            config,
            &url,
            &mut conn,
            (Strategy::Fenced, 2),
            Burst {
                file: &burst,
                ceiling_rate,
            },
            &[("DEDUP_WINDOW", "0")],
        );
        dedup_off = Some(row.await?);
    }
    let mut processes = Vec::new();
    for &n in &config.processes {
        eprintln!(
            "bench: fenced pool of {n} processes, a burst of {}",
            config.messages
        );
        let row = processes_row(
            config,
            &url,
            &mut conn,
            n,
            Burst {
                file: &burst,
                ceiling_rate,
            },
        );
        processes.push(row.await?);
    }
    let mut steady = Vec::new();
    if let (Some(&strategy), Some(&workers)) =
        (config.strategies.first(), config.workers.iter().max())
        && config.steady_rate > 0
    {
        eprintln!(
            "bench: {} bridge with {workers} workers at {}/s for {:?}",
            strategy.name(),
            config.steady_rate,
            config.steady_duration
        );
        steady.push(steady_row(config, &url, &mut conn, strategy, workers).await?);
    }

    let mut report = Report {
        machine: machine(),
        redis_version,
        payload_bytes,
        ceiling_rate,
        publisher_rate,
        redis_cli_pipe_rate,
        bridge,
        dedup_off,
        processes,
        latency,
        steady,
        targets: Vec::new(),
    };
    report.targets = targets(&report);
    std::fs::write(&config.json_out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", config.json_out.display()))?;
    std::fs::write(&config.svg_out, svg(&report))
        .with_context(|| format!("cannot write {}", config.svg_out.display()))?;
    Ok(report)
}

async fn reset(conn: &mut MultiplexedConnection) -> Result<()> {
    redis::cmd("FLUSHALL").query_async::<()>(conn).await?;
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

fn payloads(from: u64, n: u64) -> Vec<Vec<u8>> {
    (from..from + n)
        .map(|s| test_message(s, 0).into_bytes())
        .collect()
}

/// What Redis can take: the payloads (made beforehand) XADDed in pipelines
/// of 1,000.
async fn ceiling(conn: &mut MultiplexedConnection, messages: u64) -> Result<f64> {
    reset(conn).await?;
    let pipes: Vec<redis::Pipeline> = payloads(0, messages)
        .chunks(1000)
        .map(|chunk| {
            let mut pipe = redis::pipe();
            for p in chunk {
                pipe.cmd("XADD")
                    .arg(STREAM)
                    .arg("*")
                    .arg("payload")
                    .arg(p)
                    .ignore();
            }
            pipe
        })
        .collect();
    let start = Instant::now();
    for pipe in &pipes {
        pipe.query_async::<()>(conn).await?;
    }
    Ok(messages as f64 / start.elapsed().as_secs_f64())
}

async fn publisher_vs_pipe(
    url: &str,
    conn: &mut MultiplexedConnection,
    messages: u64,
    burst: &Path,
) -> Result<(f64, f64)> {
    reset(conn).await?;
    let start = publish_burst(url, messages).await?;
    let ours = messages as f64 / start.elapsed().as_secs_f64();
    // The same number of messages through redis-cli --pipe.
    let start = Instant::now();
    pipe_burst(url, burst)?;
    Ok((ours, messages as f64 / start.elapsed().as_secs_f64()))
}

/// `n` test messages (sequence 0 to n-1) as PUBLISH commands in RESP.
fn resp_publishes(n: u64) -> Vec<u8> {
    let mut resp = Vec::new();
    for p in payloads(0, n) {
        resp.extend_from_slice(
            format!(
                "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{CHANNEL}\r\n${}\r\n",
                CHANNEL.len(),
                p.len()
            )
            .as_bytes(),
        );
        resp.extend_from_slice(&p);
        resp.extend_from_slice(b"\r\n");
    }
    resp
}

/// Sends a RESP file through `redis-cli --pipe`: as fast as Redis takes it.
fn pipe_burst(url: &str, file: &Path) -> Result<()> {
    let info = redis::Client::open(url)?.get_connection_info().clone();
    let (host, port) = match info.addr() {
        redis::ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
        _ => bail!("the burst needs a TCP server"),
    };
    let status = Command::new("redis-cli")
        .args(["-h", &host, "-p", &port.to_string(), "--pipe"])
        .stdin(std::fs::File::open(file)?)
        .stdout(Stdio::null())
        .status()
        .context("cannot run redis-cli (install Debian's redis-tools package)")?;
    if !status.success() {
        bail!("redis-cli --pipe failed: {status}");
    }
    Ok(())
}

/// Publishes `messages` test messages as fast as `optimus publish` can (the
/// same code, in batches of 1,000, fast path off); returns when it started.
async fn publish_burst(url: &str, messages: u64) -> Result<Instant> {
    let start = Instant::now();
    let summary = publish_at(url, messages, f64::INFINITY, 1000).await?;
    if summary.published != messages {
        bail!("the publisher sent {} of {messages}", summary.published);
    }
    Ok(start)
}

/// `optimus publish` (the same code) of `total` test messages at `rate`
/// messages/s (infinite: as fast as it goes), in batches of `batch`, fast
/// path off.
async fn publish_at(
    url: &str,
    total: u64,
    rate: f64,
    batch: usize,
) -> Result<crate::publish::PublishSummary> {
    let mut config = PublishConfig::new(url, CHANNEL, total);
    config.fast_path = false;
    config.pace = Pace::Rate(rate);
    config.batch_size = batch;
    let messages = crate::publish::TestMessages::unnamed(0);
    let shutdown = tokio_util::sync::CancellationToken::new();
    Ok(crate::publish::run_messages(&config, &messages, shutdown).await?)
}

/// `optimus consume` with `workers` workers, waiting until all are subscribed.
async fn spawn_bridge(
    config: &BenchConfig,
    url: &str,
    conn: &mut MultiplexedConnection,
    strategy: Strategy,
    workers: usize,
    settings: &[(&str, &str)],
) -> Result<Child> {
    let mut command = consume_command(config, url, strategy, settings);
    let child = command
        .env("CONSUMERS_COUNT", workers.to_string())
        .spawn()
        .context("cannot start optimus consume")?;
    // At most two subscriptions a process (one server), and, fenced, the
    // process a member of the pool.
    wait_subscribed(conn, strategy, workers.min(2), 1).await?;
    Ok(child)
}

/// `optimus consume` of `strategy` on the benchmark's channel and stream,
/// in a clean environment: the defaults, whatever the caller exported, and
/// `settings`.
fn consume_command(
    config: &BenchConfig,
    url: &str,
    strategy: Strategy,
    settings: &[(&str, &str)],
) -> Command {
    let mut command = Command::new(&config.exe);
    command
        .arg("consume")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("REDIS_URL", url)
        .env("STRATEGY", strategy.name())
        .env("INPUT_CHANNEL", CHANNEL)
        .env("OUTPUT_STREAM", STREAM)
        .env("MONITORING_INTERVAL", "3600")
        .env("LOGLEVEL", "ERROR")
        .envs(settings.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

/// Waits until the channel has `subscribed` subscriptions and (fenced) the
/// pool `members` members, and a few cycles more, so that every worker has
/// the same view of the members: the rows measure the bridge running, not
/// starting.
async fn wait_subscribed(
    conn: &mut MultiplexedConnection,
    strategy: Strategy,
    subscribed: usize,
    members: usize,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let subs: Vec<(String, usize)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(CHANNEL)
            .query_async(conn)
            .await?;
        let joined: usize = redis::cmd("HLEN")
            .arg(format!("{{{STREAM}}}:members"))
            .query_async(conn)
            .await?;
        let seen = subs.first().map_or(0, |s| s.1);
        if seen == subscribed && (strategy == Strategy::Race || joined == members) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "optimus consume did not subscribe within 30 s ({seen} of {subscribed} subscriptions, {joined} of {members} members)"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The benchmark's messages (an unnamed run, numbered from 0) in its
/// stream against the `published` count.
async fn audit_of(url: &str, published: u64) -> Result<crate::audit::AuditReport> {
    let endpoint = crate::connect::Endpoint::new(url);
    Ok(crate::audit::audit(&endpoint, STREAM, None, published, Some("")).await?)
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// The burst every throughput row sends (RESP for `redis-cli --pipe`), and
/// the ceiling its rate is held against.
#[derive(Clone, Copy)]
struct Burst<'a> {
    file: &'a Path,
    ceiling_rate: f64,
}

/// One burst row: the bridge of `strategy` with `workers` workers (and
/// `settings` besides the defaults) against the burst.
async fn bridge_row(
    config: &BenchConfig,
    url: &str,
    conn: &mut MultiplexedConnection,
    (strategy, workers): (Strategy, usize),
    burst: Burst<'_>,
    settings: &[(&str, &str)],
) -> Result<BridgeRow> {
    let ceiling_rate = burst.ceiling_rate;
    let burst = burst.file;
    reset(conn).await?;
    let child = spawn_bridge(config, url, conn, strategy, workers, settings).await?;
    let cpu_before = cpu_time(child.id());
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async::<()>(conn)
        .await?;

    let start = Instant::now();
    pipe_burst(url, burst)?;
    let done = wait_for_len(conn, config.messages, Duration::from_secs(10)).await?;
    let seconds = done.duration_since(start).as_secs_f64();
    let cpu = cpu_time(child.id()).saturating_sub(cpu_before);
    let rss = peak_rss(child.id());
    let commands = bridge_commands(conn).await?;
    // Let late copies settle before the audit and the memory, then stop the
    // bridge.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = memory_beside(conn, STREAM).await?;
    stop(child);
    let audit = audit_of(url, config.messages).await?;
    let rate = config.messages as f64 / seconds;
    Ok(BridgeRow {
        strategy: strategy.name(),
        workers,
        messages: config.messages,
        seconds,
        rate,
        of_ceiling: rate / ceiling_rate,
        commands_per_message: commands as f64 / config.messages as f64,
        cpu_us_per_message: cpu.as_micros() as f64 / config.messages as f64,
        peak_rss_mib: rss as f64 / (1024.0 * 1024.0),
        redis_bytes_per_message: kept as f64 / config.messages as f64,
        out_of_order: out_of_order(conn).await?,
        lost: audit.lost,
        duplicates: audit.duplicates,
    })
}

/// What every key but `stream` takes in Redis (MEMORY USAGE, all of each
/// key): the protocol's keys (writer records, members, clock; race's ACK
/// keys and locks) and the processes' presence and control keys.
async fn memory_beside(conn: &mut MultiplexedConnection, stream: &str) -> Result<u64> {
    let mut cursor = 0u64;
    let mut total = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await?;
        let mut pipe = redis::pipe();
        for key in keys.iter().filter(|k| k.as_str() != stream) {
            pipe.cmd("MEMORY")
                .arg("USAGE")
                .arg(key)
                .arg("SAMPLES")
                .arg(0);
        }
        let sizes: Vec<Option<u64>> = pipe.query_async(conn).await?;
        total += sizes.into_iter().flatten().sum::<u64>();
        if next == 0 {
            return Ok(total);
        }
        cursor = next;
    }
}

/// Entries of the stream whose test message was published before that of an
/// entry ahead of them (the burst publishes in sequence order, on one
/// connection).
async fn out_of_order(conn: &mut MultiplexedConnection) -> Result<u64> {
    let mut from = "-".to_string();
    let (mut highest, mut out) = (None::<u64>, 0);
    loop {
        let page: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(STREAM)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await?;
        let Some(last) = page.ids.last() else {
            return Ok(out);
        };
        from = format!("({}", last.id);
        for entry in &page.ids {
            let payload: Vec<u8> = entry.get("payload").unwrap_or_default();
            let Some(seq) = serde_json::from_slice::<serde_json::Value>(&payload)
                .ok()
                .and_then(|v| v["seq"].as_u64())
            else {
                continue;
            };
            if highest.is_some_and(|h| seq < h) {
                out += 1;
            } else {
                highest = Some(seq);
            }
        }
    }
}

/// Waits until the stream holds `n` entries; gives up when it stops growing
/// for `stall`. Returns when the last entry arrived.
async fn wait_for_len(
    conn: &mut MultiplexedConnection,
    n: u64,
    stall: Duration,
) -> Result<Instant> {
    let mut last = (0u64, Instant::now());
    loop {
        let len: u64 = redis::cmd("XLEN").arg(STREAM).query_async(conn).await?;
        if len >= n {
            return Ok(Instant::now());
        }
        if len != last.0 {
            last = (len, Instant::now());
        } else if last.1.elapsed() > stall {
            return Ok(last.1); // the audit reports what is missing
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Commands Redis ran since the last RESETSTAT, without PUBLISH and the
/// benchmark's own (XLEN polling, INFO, CONFIG, PUBSUB, XRANGE for the audit).
async fn bridge_commands(conn: &mut MultiplexedConnection) -> Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let mut calls: HashMap<String, u64> = HashMap::new();
    for line in info.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let n = rest
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        calls.insert(name.to_string(), n);
    }
    let own = [
        "publish",
        "xlen",
        "info",
        "config|resetstat",
        "config",
        "pubsub|numsub",
        "zcard",
        "pubsub",
        "ping",
        "client|setinfo",
        "hello",
        "select",
        "memory|usage",
        "hlen",
    ];
    Ok(calls
        .iter()
        .filter(|(name, _)| !own.contains(&name.as_str()))
        .map(|(_, n)| n)
        .sum())
}

async fn latency_row(
    config: &BenchConfig,
    url: &str,
    conn: &mut MultiplexedConnection,
    strategy: Strategy,
    workers: usize,
) -> Result<LatencyRow> {
    reset(conn).await?;
    let child = spawn_bridge(config, url, conn, strategy, workers, &[]).await?;
    let total = config.latency_rate * config.latency_duration.as_secs().max(1);
    // A first message makes the stream and its writer (a new stream waits
    // up to a cycle for one): the run measures the steady state.
    redis::cmd("PUBLISH")
        .arg(CHANNEL)
        .arg(r#"{"message_id":"warm-up"}"#)
        .query_async::<()>(conn)
        .await?;
    wait_for_len(conn, 1, Duration::from_secs(10)).await?;

    // A reader stamps each entry as it appears in the stream.
    let reader_url = url.to_string();
    let reader = tokio::spawn(async move {
        let mut conn = connect(&reader_url).await?;
        let mut last = "0-0".to_string();
        let mut latencies = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while (latencies.len() as u64) < total && Instant::now() < deadline {
            let reply: redis::streams::StreamReadReply = redis::cmd("XREAD")
                .arg("BLOCK")
                .arg(1000)
                .arg("COUNT")
                .arg(1000)
                .arg("STREAMS")
                .arg(STREAM)
                .arg(&last)
                .query_async(&mut conn)
                .await?;
            let now_us = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as f64;
            for key in reply.keys {
                for entry in key.ids {
                    last = entry.id.clone();
                    let payload: Vec<u8> = entry.get("payload").unwrap_or_default();
                    if let Some(sent_us) = serde_json::from_slice::<serde_json::Value>(&payload)
                        .ok()
                        .and_then(|v| v["sent_us"].as_f64())
                    {
                        latencies.push(((now_us - sent_us) / 1000.0).max(0.0));
                    }
                }
            }
        }
        anyhow::Ok(latencies)
    });
    publish_steady(url, total, config.latency_rate).await?;
    let mut latencies = reader.await??;
    stop(child);
    let audit = audit_of(url, total).await?;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)]
    };
    Ok(LatencyRow {
        strategy: strategy.name(),
        workers,
        rate: config.latency_rate,
        samples: latencies.len(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        lost: audit.lost,
        duplicates: audit.duplicates,
    })
}

/// A service's own publisher at a steady `rate`: every millisecond, the
/// messages due, pipelined on one connection, each stamped with the
/// microsecond it was sent (`sent_us`) and numbered from 0 (`seq`).
async fn publish_steady(url: &str, total: u64, rate: u64) -> Result<()> {
    let mut conn = connect(url).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut seq = 0;
    while seq < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
        if due <= seq {
            continue;
        }
        let mut pipe = redis::pipe();
        let sent_us = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros();
        for s in seq..due {
            let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
            pipe.cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(format!(
                    r#"{{"message_id":"{id}","seq":{s},"sent_us":{sent_us}}}"#
                ))
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        seq = due;
    }
    Ok(())
}

/// One scaling row: a fenced pool of `processes` processes, each at the
/// default settings, against the burst; Redis's CPU measured from INFO.
async fn processes_row(
    config: &BenchConfig,
    url: &str,
    conn: &mut MultiplexedConnection,
    processes: usize,
    burst: Burst<'_>,
) -> Result<ProcessesRow> {
    reset(conn).await?;
    let mut children = Vec::new();
    for _ in 0..processes {
        let child = consume_command(config, url, Strategy::Fenced, &[])
            .spawn()
            .context("cannot start optimus consume");
        match child {
            Ok(child) => children.push(child),
            Err(err) => {
                children.into_iter().for_each(stop);
                return Err(err);
            }
        }
    }
    let workers: usize = crate::config::DEFAULT_CONSUMERS.parse().unwrap_or(1);
    let workers = workers.min(2);
    if let Err(err) = wait_subscribed(conn, Strategy::Fenced, processes * workers, processes).await
    {
        children.into_iter().for_each(stop);
        return Err(err);
    }
    let cpu = |children: &[Child]| -> Duration { children.iter().map(|c| cpu_time(c.id())).sum() };
    let bridge_before = cpu(&children);
    let redis_before = redis_cpu(conn).await?;
    let start = Instant::now();
    let done = match pipe_burst(url, burst.file) {
        Ok(()) => wait_for_len(conn, config.messages, Duration::from_secs(10)).await,
        Err(err) => Err(err),
    };
    let redis_after = redis_cpu(conn).await;
    let bridge_used = cpu(&children).saturating_sub(bridge_before);
    tokio::time::sleep(Duration::from_secs(3)).await;
    children.into_iter().for_each(stop);
    let done = done?;
    let redis_used = (redis_after? - redis_before).max(0.0);
    let audit = audit_of(url, config.messages).await?;
    let seconds = done.duration_since(start).as_secs_f64();
    let rate = config.messages as f64 / seconds;
    Ok(ProcessesRow {
        processes,
        messages: config.messages,
        seconds,
        rate,
        of_ceiling: rate / burst.ceiling_rate,
        redis_cpu_us_per_message: redis_used * 1e6 / config.messages as f64,
        bridge_cpu_us_per_message: bridge_used.as_micros() as f64 / config.messages as f64,
        out_of_order: out_of_order(conn).await?,
        lost: audit.lost,
        duplicates: audit.duplicates,
    })
}

/// Redis's CPU so far, seconds (INFO's used_cpu_sys + used_cpu_user).
async fn redis_cpu(conn: &mut MultiplexedConnection) -> Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    Ok(info
        .lines()
        .filter_map(|l| {
            l.strip_prefix("used_cpu_sys:")
                .or_else(|| l.strip_prefix("used_cpu_user:"))
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum())
}

async fn steady_row(
    config: &BenchConfig,
    url: &str,
    conn: &mut MultiplexedConnection,
    strategy: Strategy,
    workers: usize,
) -> Result<SteadyRow> {
    reset(conn).await?;
    let child = spawn_bridge(config, url, conn, strategy, workers, &[]).await?;
    let cpu_before = cpu_time(child.id());
    let total = config.steady_rate * config.steady_duration.as_secs().max(1);
    let start = Instant::now();
    publish_at(url, total, config.steady_rate as f64, 500).await?;
    let done = wait_for_len(conn, total, Duration::from_secs(10)).await?;
    let cpu = cpu_time(child.id()).saturating_sub(cpu_before);
    let rss = peak_rss(child.id());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop(child);
    let audit = audit_of(url, total).await?;
    Ok(SteadyRow {
        strategy: strategy.name(),
        workers,
        target_rate: config.steady_rate,
        rate: total as f64 / done.duration_since(start).as_secs_f64(),
        messages: total,
        cpu_us_per_message: cpu.as_micros() as f64 / total as f64,
        peak_rss_mib: rss as f64 / (1024.0 * 1024.0),
        lost: audit.lost,
        duplicates: audit.duplicates,
    })
}

/// User plus system CPU time of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ")".
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after ")".
    Duration::from_millis((ticks(11) + ticks(12)) * 10) // 100 ticks per second on Linux
}

/// Peak resident set size of a process, in bytes (Linux: VmHWM in /proc).
pub fn peak_rss(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM:")
}

/// A process's resident memory now, in bytes (0 when unknown).
pub fn rss(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS:")
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} cores, {model}")
}

/// The results as a Markdown table.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "machine: {}; redis {}; payload {} bytes\n\n",
        report.machine, report.redis_version, report.payload_bytes
    );
    out += &format!(
        "ceiling (pipelined XADD): {:.0}/s; optimus publish: {:.0}/s = {:.2} of redis-cli --pipe ({:.0}/s)\n\n",
        report.ceiling_rate,
        report.publisher_rate,
        report.publisher_rate / report.redis_cli_pipe_rate,
        report.redis_cli_pipe_rate
    );
    out += "| strategy | workers | messages/s | of ceiling | commands/msg | CPU µs/msg | peak RSS MiB | Redis B/msg | out of order | lost | duplicates |\n";
    out += "|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in &report.bridge {
        out += &format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {} | {} | {} |{}\n",
            r.strategy,
            r.workers,
            r.rate,
            r.of_ceiling,
            r.commands_per_message,
            r.cpu_us_per_message,
            r.peak_rss_mib,
            r.redis_bytes_per_message,
            r.out_of_order,
            r.lost,
            r.duplicates,
            if r.failed() { " FAILED" } else { "" }
        );
    }
    if let (Some(off), Some(on)) = (
        &report.dedup_off,
        report
            .bridge
            .iter()
            .find(|r| r.strategy == "fenced" && r.workers == 2),
    ) {
        out += "\n| fenced, 2 workers | messages/s | CPU µs/msg | peak RSS MiB | lost | duplicates |\n|---|---|---|---|---|---|\n";
        for (name, r) in [("DEDUP_WINDOW=5 (default)", on), ("DEDUP_WINDOW=0", off)] {
            out += &format!(
                "| {name} | {:.0} | {:.1} | {:.1} | {} | {} |{}\n",
                r.rate,
                r.cpu_us_per_message,
                r.peak_rss_mib,
                r.lost,
                r.duplicates,
                if r.failed() { " FAILED" } else { "" }
            );
        }
    }
    if !report.processes.is_empty() {
        out += "\n| fenced pool | messages/s | of ceiling | Redis CPU µs/msg | bridges' CPU µs/msg | out of order | lost | duplicates |\n|---|---|---|---|---|---|---|---|\n";
        for r in &report.processes {
            out += &format!(
                "| {} processes | {:.0} | {:.2} | {:.1} | {:.1} | {} | {} | {} |{}\n",
                r.processes,
                r.rate,
                r.of_ceiling,
                r.redis_cpu_us_per_message,
                r.bridge_cpu_us_per_message,
                r.out_of_order,
                r.lost,
                r.duplicates,
                if r.failed() { " FAILED" } else { "" }
            );
        }
    }
    out += "\n| strategy | latency at | workers | samples | p50 ms | p99 ms | p99.9 ms | lost | duplicates |\n|---|---|---|---|---|---|---|---|---|\n";
    for l in &report.latency {
        out += &format!(
            "| {} | {}/s | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} |\n",
            l.strategy,
            l.rate,
            l.workers,
            l.samples,
            l.p50_ms,
            l.p99_ms,
            l.p999_ms,
            l.lost,
            l.duplicates
        );
    }
    if !report.steady.is_empty() {
        out += "\n| strategy | steady at | workers | achieved/s | CPU µs/msg | peak RSS MiB | lost | duplicates |\n|---|---|---|---|---|---|---|---|\n";
        for r in &report.steady {
            out += &format!(
                "| {} | {}/s | {} | {:.0} | {:.1} | {:.1} | {} | {} |\n",
                r.strategy,
                r.target_rate,
                r.workers,
                r.rate,
                r.cpu_us_per_message,
                r.peak_rss_mib,
                r.lost,
                r.duplicates
            );
        }
    }
    if !report.targets.is_empty() {
        out += "\n| target (fenced) | this run | |\n|---|---|---|\n";
        for t in &report.targets {
            out += &format!(
                "| {} | {} | {} |\n",
                t.target,
                t.measured,
                if t.met { "met" } else { "NOT MET" }
            );
        }
    }
    out
}

/// Throughput against workers, with the ceiling as a dashed line.
pub fn svg(report: &Report) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 400.0, 70.0, 50.0, 30.0, 20.0);
    let max = report
        .bridge
        .iter()
        .map(|r| r.rate)
        .fold(report.ceiling_rate, f64::max)
        * 1.1;
    let workers: Vec<usize> = report.bridge.iter().map(|r| r.workers).collect();
    let max_w = workers.iter().copied().max().unwrap_or(1).max(2) as f64;
    let x = |n: usize| left + (n as f64).log2() / max_w.log2() * (w - left - right);
    let y = |v: f64| h - bottom - v / max * (h - bottom - top);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="18" text-anchor="middle" font-size="14">optimus bridge throughput (messages/s)</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>
"#,
        w / 2.0,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}k</text>\n",
            left - 6.0,
            y(v) + 4.0,
            v / 1000.0
        );
    }
    for &n in &workers {
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{n}</text>\n",
            x(n),
            h - bottom + 18.0
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">workers</text>\n",
        (left + w - right) / 2.0,
        h - 10.0
    );
    s += &format!(
        "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"gray\" stroke-dasharray=\"6 4\"/>\n<text x=\"{1}\" y=\"{2}\" text-anchor=\"end\" fill=\"gray\">ceiling (pipelined XADD) {3:.0}/s</text>\n",
        y(report.ceiling_rate),
        w - right,
        y(report.ceiling_rate) - 6.0,
        report.ceiling_rate
    );
    let mut strategies: Vec<&str> = report.bridge.iter().map(|r| r.strategy).collect();
    strategies.dedup();
    for (i, strategy) in strategies.iter().enumerate() {
        let color = ["steelblue", "darkorange", "seagreen"][i % 3];
        let rows: Vec<&BridgeRow> = report
            .bridge
            .iter()
            .filter(|r| r.strategy == *strategy)
            .collect();
        let points: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.1},{:.1}", x(r.workers), y(r.rate)))
            .collect();
        s += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>\n",
            points.join(" ")
        );
        for r in rows {
            s += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.0}</text>\n",
                x(r.workers),
                y(r.rate),
                x(r.workers),
                // The first line's labels above its points, the others' below.
                if i == 0 {
                    y(r.rate) - 8.0
                } else {
                    y(r.rate) + 18.0
                },
                r.rate
            );
        }
        let ly = top + 40.0 + 16.0 * i as f64;
        s += &format!(
            "<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{2}\" y=\"{3}\">{strategy}</text>\n",
            w - right - 140.0,
            w - right - 120.0,
            w - right - 114.0,
            ly + 4.0
        );
    }
    s += "</svg>\n";
    s
}

/// Writes `path` only inside an existing directory (a typo in --out is an error).
pub fn check_out_path(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            bail!("{} is not a directory", dir.display())
        }
        _ => Ok(()),
    }
}
