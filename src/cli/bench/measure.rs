//! The measurements of `optimus bench`: each row's run against one
//! redis-server, the bridge as separate `optimus consume` processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use redis::aio::MultiplexedConnection;

use optimus::publish::test_message;
use optimus::{Pace, PublishConfig, Strategy};
use optimus_testkit::{RedisServer, cpu_time, peak_rss};

use super::report::{BridgeRow, LatencyRow, ProcessesRow, Report, SteadyRow, svg, targets};

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

pub(super) async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

/// Starts a replica of the benchmark's own server and waits (at most 20 s)
/// until it follows it.
fn start_replica(server: &RedisServer) -> Result<RedisServer> {
    std::panic::catch_unwind(|| RedisServer::start_replica_of(server))
        .map_err(|_| anyhow::anyhow!("a replica of the benchmark's server did not follow it"))
}

/// How many replicas follow the server at `url`.
async fn replicas(url: &str) -> Result<usize> {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut connect(url).await?)
        .await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("connected_slaves:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0))
}

/// Runs every measurement and writes the JSON and the SVG.
pub async fn run(config: &BenchConfig) -> Result<Report> {
    let (_server, url) = match &config.redis_url {
        Some(url) => (None, url.clone()),
        None => {
            let server = RedisServer::try_start().map_err(anyhow::Error::msg)?;
            let url = server.url();
            (Some(server), url)
        }
    };
    let mut conn = connect(&url).await.context("cannot connect to Redis")?;
    let redis_version = redis_version(&mut conn).await?;
    let payload_bytes = test_message(0, 0).len();
    // The burst, as RESP for redis-cli --pipe, made once for every row.
    let scratch = optimus_testkit::tempdir()?;
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

    let burst = Burst {
        file: &burst,
        ceiling_rate,
    };
    let (bridge, latency) = strategy_rows(config, &url, &mut conn, burst).await?;
    // What the default DEDUP_WINDOW costs: the 2-worker fenced burst again
    // without it. What MIN_REPLICAS_ACKED costs: that burst on a server with
    // a replica, without and with it (a replica of the benchmark's own
    // server, or those REDIS_URL's server has).
    let (mut dedup_off, mut replica_rows, mut replica_latency) = (None, None, None);
    if config.strategies.contains(&Strategy::Fenced) && config.workers.contains(&2) {
        let mut row = async |what: &str, settings: &[(&str, &str)]| {
            eprintln!(
                "bench: fenced bridge with 2 workers {what}, a burst of {}",
                config.messages
            );
            let pair = (Strategy::Fenced, 2);
            bridge_row(config, &url, &mut conn, pair, burst, settings).await
        };
        dedup_off = Some(row("and DEDUP_WINDOW=0", &[("DEDUP_WINDOW", "0")]).await?);
        let replica = match &_server {
            Some(server) => Some(start_replica(server)?),
            None => None,
        };
        if replicas(&url).await? > 0 {
            let off = row("on a server with a replica", &[]).await?;
            let on = row(
                "on a server with a replica and MIN_REPLICAS_ACKED=1",
                &[("MIN_REPLICAS_ACKED", "1")],
            )
            .await?;
            replica_rows = Some([off, on]);
            let mut latency = async |what: &str, settings: &[(&str, &str)]| {
                eprintln!(
                    "bench: fenced latency with 2 workers {what}, at {}/s for {:?}",
                    config.latency_rate, config.latency_duration
                );
                latency_row(config, &url, &mut conn, Strategy::Fenced, 2, settings).await
            };
            let off = latency("on a server with a replica", &[]).await?;
            let on = latency(
                "on a server with a replica and MIN_REPLICAS_ACKED=1",
                &[("MIN_REPLICAS_ACKED", "1")],
            )
            .await?;
            replica_latency = Some([off, on]);
        }
        drop(replica);
    }
    let mut processes = Vec::new();
    for &n in &config.processes {
        eprintln!(
            "bench: fenced pool of {n} processes, a burst of {}",
            config.messages
        );
        let row = processes_row(config, &url, &mut conn, n, burst, &[]);
        processes.push(row.await?);
    }
    // What the bound on holders saves: the largest pool with every process
    // holding copies.
    if let Some(&n) = config.processes.iter().max()
        && n > optimus::DEFAULT_STANDBYS + 1
    {
        eprintln!(
            "bench: fenced pool of {n} processes with STANDBYS=all, a burst of {}",
            config.messages
        );
        let all = [("STANDBYS", "all")];
        let row = processes_row(config, &url, &mut conn, n, burst, &all);
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
        replica_rows,
        replica_latency,
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

pub(super) async fn redis_version(conn: &mut MultiplexedConnection) -> Result<String> {
    let info: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?");
    Ok(version.trim().to_string())
}

/// Each strategy's burst rows (one per number of workers) and latency row.
async fn strategy_rows(
    config: &BenchConfig,
    url: &str,
    conn: &mut MultiplexedConnection,
    burst: Burst<'_>,
) -> Result<(Vec<BridgeRow>, Vec<LatencyRow>)> {
    let mut bridge = Vec::new();
    let mut latency = Vec::new();
    for &strategy in &config.strategies {
        for &workers in &config.workers {
            eprintln!(
                "bench: {} bridge with {workers} workers, a burst of {}",
                strategy.name(),
                config.messages
            );
            let row = bridge_row(config, url, conn, (strategy, workers), burst, &[]);
            bridge.push(row.await?);
        }
        eprintln!(
            "bench: {} latency at {}/s for {:?}",
            strategy.name(),
            config.latency_rate,
            config.latency_duration
        );
        latency.push(latency_row(config, url, conn, strategy, 2, &[]).await?);
    }
    Ok((bridge, latency))
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
    resp_burst("PUBLISH", CHANNEL, n)
}

/// `n` test messages (sequence 0 to n-1) as `command` (PUBLISH or
/// SPUBLISH) to `channel`, in RESP.
pub(super) fn resp_burst(command: &str, channel: &str, n: u64) -> Vec<u8> {
    let mut resp = Vec::new();
    for p in payloads(0, n) {
        resp.extend_from_slice(
            format!(
                "*3\r\n${}\r\n{command}\r\n${}\r\n{channel}\r\n${}\r\n",
                command.len(),
                channel.len(),
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
pub(super) fn pipe_burst(url: &str, file: &Path) -> Result<()> {
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
) -> Result<optimus::publish::PublishSummary> {
    let mut config = PublishConfig::new(url, CHANNEL, total);
    config.fast_path = false;
    config.pace = Pace::Rate(rate);
    config.batch_size = batch;
    let messages = optimus::publish::TestMessages::unnamed(0);
    let shutdown = tokio_util::sync::CancellationToken::new();
    Ok(optimus::publish::run_messages(&config, &messages, shutdown).await?)
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
            .arg(optimus::keys::Pool::new(STREAM).members)
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
async fn audit_of(url: &str, published: u64) -> Result<optimus::audit::AuditReport> {
    let endpoint = optimus::Endpoint::new(url);
    Ok(optimus::audit::audit(&endpoint, STREAM, None, published, Some("")).await?)
}

pub(super) fn stop(mut child: Child) {
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
    let done = wait_for_len(conn, STREAM, config.messages, Duration::from_secs(10)).await?;
    let seconds = done.duration_since(start).as_secs_f64();
    let cpu = cpu_time(child.id()).saturating_sub(cpu_before);
    let rss = peak_rss(child.id());
    let commands = bridge_commands(conn).await?;
    // Let late copies settle before the audit and the memory, then stop the
    // bridge.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = memory_beside(conn, &[STREAM]).await?;
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
        out_of_order: out_of_order(conn, STREAM).await?,
        lost: audit.lost,
        duplicates: audit.duplicates,
    })
}

/// What every key but `streams` takes in Redis (MEMORY USAGE, all of each
/// key): the protocol's keys (writer records, members, clock; race's ACK
/// keys and locks) and the processes' presence and control keys.
pub(super) async fn memory_beside(
    conn: &mut MultiplexedConnection,
    streams: &[&str],
) -> Result<u64> {
    let mut cursor = 0u64;
    let mut total = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await?;
        let others: Vec<&String> = keys
            .iter()
            .filter(|k| !streams.contains(&k.as_str()))
            .collect();
        if !others.is_empty() {
            let mut pipe = redis::pipe();
            for key in others {
                pipe.cmd("MEMORY")
                    .arg("USAGE")
                    .arg(key)
                    .arg("SAMPLES")
                    .arg(0);
            }
            let sizes: Vec<Option<u64>> = pipe.query_async(conn).await?;
            total += sizes.into_iter().flatten().sum::<u64>();
        }
        if next == 0 {
            return Ok(total);
        }
        cursor = next;
    }
}

/// Entries of the stream whose test message was published before that of an
/// entry ahead of them (the burst publishes in sequence order, on one
/// connection).
pub(super) async fn out_of_order(conn: &mut MultiplexedConnection, stream: &str) -> Result<u64> {
    let mut from = "-".to_string();
    let (mut highest, mut out) = (None::<u64>, 0);
    loop {
        let page: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
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
pub(super) async fn wait_for_len(
    conn: &mut MultiplexedConnection,
    stream: &str,
    n: u64,
    stall: Duration,
) -> Result<Instant> {
    let mut last = (0u64, Instant::now());
    loop {
        let len: u64 = redis::cmd("XLEN").arg(stream).query_async(conn).await?;
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
    Ok(without_own(&calls))
}

/// The calls of `calls` (command name to count, as INFO commandstats names
/// them) the bridge made: all but the publishing and the benchmark's own
/// reads.
pub(super) fn without_own(calls: &HashMap<String, u64>) -> u64 {
    const OWN: [&str; 20] = [
        "publish",
        "spublish",
        "xlen",
        "info",
        "config|resetstat",
        "config",
        "pubsub|numsub",
        "pubsub|shardnumsub",
        "zcard",
        "pubsub",
        "ping",
        "client|setinfo",
        "hello",
        "select",
        "memory|usage",
        "hlen",
        "role",
        "cluster|keyslot",
        "cluster|nodes",
        "cluster|info",
    ];
    calls
        .iter()
        .filter(|(name, _)| !OWN.contains(&name.as_str()))
        .map(|(_, n)| n)
        .sum()
}

async fn latency_row(
    config: &BenchConfig,
    url: &str,
    conn: &mut MultiplexedConnection,
    strategy: Strategy,
    workers: usize,
    settings: &[(&str, &str)],
) -> Result<LatencyRow> {
    reset(conn).await?;
    let child = spawn_bridge(config, url, conn, strategy, workers, settings).await?;
    let total = config.latency_rate * config.latency_duration.as_secs().max(1);
    // A first message makes the stream and its writer (a new stream waits
    // up to a cycle for one): the run measures the steady state.
    redis::cmd("PUBLISH")
        .arg(CHANNEL)
        .arg(r#"{"message_id":"warm-up"}"#)
        .query_async::<()>(conn)
        .await?;
    wait_for_len(conn, STREAM, 1, Duration::from_secs(10)).await?;

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
    settings: &[(&str, &str)],
) -> Result<ProcessesRow> {
    reset(conn).await?;
    let mut children = Vec::new();
    for _ in 0..processes {
        let child = consume_command(config, url, Strategy::Fenced, settings)
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
    let workers: usize = optimus::DEFAULT_CONSUMERS.parse().unwrap_or(1);
    let workers = workers.min(2);
    // The writer and STANDBYS standbys hold copies; the others wait.
    let holders = match settings.iter().any(|&(k, v)| k == "STANDBYS" && v == "all") {
        true => processes,
        false => processes.min(optimus::DEFAULT_STANDBYS + 1),
    };
    if let Err(err) = wait_subscribed(conn, Strategy::Fenced, holders * workers, processes).await {
        children.into_iter().for_each(stop);
        return Err(err);
    }
    let cpu = |children: &[Child]| -> Duration { children.iter().map(|c| cpu_time(c.id())).sum() };
    let bridge_before = cpu(&children);
    let redis_before = redis_cpu(conn).await?;
    let start = Instant::now();
    let done = match pipe_burst(url, burst.file) {
        Ok(()) => wait_for_len(conn, STREAM, config.messages, Duration::from_secs(10)).await,
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
        setting: settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        messages: config.messages,
        seconds,
        rate,
        of_ceiling: rate / burst.ceiling_rate,
        redis_cpu_us_per_message: redis_used * 1e6 / config.messages as f64,
        bridge_cpu_us_per_message: bridge_used.as_micros() as f64 / config.messages as f64,
        out_of_order: out_of_order(conn, STREAM).await?,
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
    let done = wait_for_len(conn, STREAM, total, Duration::from_secs(10)).await?;
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

pub(super) fn machine() -> String {
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

/// Writes `path` only inside an existing directory (a typo in --out is an error).
pub fn check_out_path(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            bail!("{} is not a directory", dir.display())
        }
        _ => Ok(()),
    }
}
