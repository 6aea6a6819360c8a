//! `optimus bench --cluster`: the bridge on a Redis Cluster of the
//! benchmark's own (3 masters on loopback, no replicas), in one run.
//!
//! - **one stream**, for each strategy and worker count: a burst of
//!   `--messages` sent with `redis-cli --pipe` to the master of the
//!   channel's slot (SPUBLISH for the fenced core, which needs sharded
//!   Pub/Sub on a cluster; PUBLISH for race, whose default there is classic
//!   Pub/Sub), to one `optimus consume` at default settings: messages/s from
//!   the first publish to the last entry, Redis commands per message summed
//!   over the masters (the publishing and the benchmark's own reads left
//!   out), Redis memory per message beside the stream on every master, and
//!   the audit (lost, duplicated, out of order);
//! - **shards** (fenced): the same number of messages through three pools
//!   whose channels and streams live on three different masters, a third
//!   each, against one pool on one master at the same workers: how the rate
//!   grows with the shards. On a machine whose cores the nodes, the bridges
//!   and redis-cli share, expect a ratio nearer 1 than 3.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use redis::aio::MultiplexedConnection;
use serde::Serialize;

use optimus::Strategy;
use optimus::publish::test_message;
use optimus_testkit::cluster::RedisCluster;

use super::measure::{
    connect, machine, memory_beside, out_of_order, pipe_burst, redis_version, resp_burst, stop,
    wait_for_len, without_own,
};
use super::report::{Target, markdown, targets_table};

/// What `optimus bench --cluster` measures.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub messages: u64,
    pub workers: Vec<usize>,
    pub strategies: Vec<Strategy>,
    /// Workers of each pool in the shard rows.
    pub shard_workers: usize,
    pub json_out: PathBuf,
    /// The `optimus` binary that runs `consume`.
    pub exe: PathBuf,
}

/// One stream, one pool: a burst through the bridge on the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterRow {
    pub strategy: &'static str,
    /// `sharded` or `classic`.
    pub pubsub_mode: &'static str,
    pub workers: usize,
    pub messages: u64,
    pub seconds: f64,
    pub rate: f64,
    pub commands_per_message: f64,
    pub redis_bytes_per_message: f64,
    pub out_of_order: u64,
    pub lost: u64,
    pub duplicates: u64,
}

impl ClusterRow {
    fn failed(&self) -> bool {
        self.lost + self.duplicates > 0 || (self.strategy != "race" && self.out_of_order > 0)
    }
}

/// The same messages through one pool on one master, and through three
/// pools on three masters (fenced, sharded Pub/Sub).
#[derive(Debug, Clone, Serialize)]
pub struct ShardRows {
    pub workers_per_pool: usize,
    pub messages: u64,
    pub one_shard_rate: f64,
    pub three_shards_rate: f64,
    /// `three_shards_rate` over `one_shard_rate`.
    pub ratio: f64,
    pub out_of_order: u64,
    pub lost: u64,
    pub duplicates: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub machine: String,
    pub redis_version: String,
    pub masters: usize,
    pub payload_bytes: usize,
    pub rows: Vec<ClusterRow>,
    pub shards: Option<ShardRows>,
    pub targets: Vec<Target>,
}

impl ClusterReport {
    /// Rows that lost, duplicated or (fenced) reordered a message.
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| r.failed()).count()
            + self
                .shards
                .iter()
                .filter(|s| s.lost + s.duplicates + s.out_of_order > 0)
                .count()
    }
}

/// A channel and a stream on one master.
#[derive(Debug, Clone)]
struct Lane {
    channel: String,
    stream: String,
    /// The master serving the channel's slot, and the stream's.
    channel_port: u16,
    stream_port: u16,
}

const MASTERS: usize = 3;

/// Starts the cluster, measures every row and writes the JSON.
pub async fn run(config: &ClusterConfig) -> Result<ClusterReport> {
    let cluster = std::panic::catch_unwind(|| RedisCluster::start(MASTERS, 0))
        .map_err(|_| anyhow::anyhow!("the benchmark's Redis Cluster did not start"))?;
    let lanes = lanes(&cluster);
    let mut any = connect(&format!("redis://127.0.0.1:{}", lanes[0].channel_port)).await?;
    let redis_version = redis_version(&mut any).await?;
    let scratch = optimus_testkit::tempdir()?;

    let mut rows = Vec::new();
    for &strategy in &config.strategies {
        for &workers in &config.workers {
            eprintln!(
                "bench --cluster: {} bridge with {workers} workers, a burst of {}",
                strategy.name(),
                config.messages
            );
            let run = Pools {
                cluster: &cluster,
                config,
                scratch: scratch.path(),
                strategy,
                workers,
            };
            let one = run.measure(&lanes[..1], config.messages).await?;
            rows.push(ClusterRow {
                strategy: strategy.name(),
                pubsub_mode: mode(strategy),
                workers,
                messages: config.messages,
                seconds: one.seconds,
                rate: one.rate(),
                commands_per_message: one.commands as f64 / config.messages as f64,
                redis_bytes_per_message: one.kept_bytes as f64 / config.messages as f64,
                out_of_order: one.out_of_order,
                lost: one.lost,
                duplicates: one.duplicates,
            });
        }
    }
    let mut shards = None;
    if config.strategies.contains(&Strategy::Fenced) {
        let workers = config.shard_workers;
        let run = Pools {
            cluster: &cluster,
            config,
            scratch: scratch.path(),
            strategy: Strategy::Fenced,
            workers,
        };
        let per_lane = config.messages / MASTERS as u64;
        let total = per_lane * MASTERS as u64;
        eprintln!(
            "bench --cluster: shards: {total} messages through one pool of {workers} workers on one master"
        );
        let one = run.measure(&lanes[..1], total).await?;
        eprintln!(
            "bench --cluster: shards: {total} messages through three pools of {workers} workers, one on each master"
        );
        let three = run.measure(&lanes, per_lane).await?;
        shards = Some(ShardRows {
            workers_per_pool: workers,
            messages: total,
            one_shard_rate: one.rate(),
            three_shards_rate: three.rate(),
            ratio: three.rate() / one.rate(),
            out_of_order: one.out_of_order + three.out_of_order,
            lost: one.lost + three.lost,
            duplicates: one.duplicates + three.duplicates,
        });
    }
    let mut report = ClusterReport {
        machine: machine(),
        redis_version,
        masters: MASTERS,
        payload_bytes: test_message(0, 0).len(),
        rows,
        shards,
        targets: Vec::new(),
    };
    report.targets = targets(&report);
    std::fs::write(&config.json_out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", config.json_out.display()))?;
    Ok(report)
}

/// The Pub/Sub flavour each strategy runs with on a cluster: the fenced core
/// needs sharded Pub/Sub there; race keeps its default, classic.
fn mode(strategy: Strategy) -> &'static str {
    match strategy {
        Strategy::Fenced => "sharded",
        Strategy::Race => "classic",
    }
}

/// A channel and a stream on each master (the channel and the stream of a
/// lane on the same one, so that a lane is one shard's work).
fn lanes(cluster: &RedisCluster) -> Vec<Lane> {
    let first_on = |prefix: &str, port: u16| {
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .find(|name| cluster.master_of(name) == port)
            .expect("a name on every master")
    };
    let mut ports: Vec<u16> = Vec::new();
    for n in 0.. {
        let port = cluster.master_of(&format!("bench:in:{n}"));
        if !ports.contains(&port) {
            ports.push(port);
        }
        if ports.len() == MASTERS {
            break;
        }
    }
    ports
        .into_iter()
        .map(|port| Lane {
            channel: first_on("bench:in:", port),
            stream: first_on("bench:out:", port),
            channel_port: port,
            stream_port: port,
        })
        .collect()
}

/// What one measurement saw, over every lane it ran.
struct Measured {
    messages: u64,
    seconds: f64,
    commands: u64,
    kept_bytes: u64,
    out_of_order: u64,
    lost: u64,
    duplicates: u64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }
}

/// Pools of one strategy and size on the benchmark's cluster.
struct Pools<'a> {
    cluster: &'a RedisCluster,
    config: &'a ClusterConfig,
    scratch: &'a std::path::Path,
    strategy: Strategy,
    workers: usize,
}

impl Pools<'_> {
    /// A pool (one `optimus consume`) per lane, then `per_lane` messages
    /// sent to each lane's channel at once: the time from the first publish
    /// to the last lane's last entry, and the audit of every lane.
    async fn measure(&self, lanes: &[Lane], per_lane: u64) -> Result<Measured> {
        for node in &self.cluster.nodes {
            let _: redis::RedisResult<String> = node.query(&["FLUSHALL"]);
        }
        let mut bursts = Vec::new();
        for (i, lane) in lanes.iter().enumerate() {
            let command = match self.strategy {
                Strategy::Fenced => "SPUBLISH",
                Strategy::Race => "PUBLISH",
            };
            let file = self.scratch.join(format!("burst-{i}.resp"));
            std::fs::write(&file, resp_burst(command, &lane.channel, per_lane))?;
            bursts.push((format!("redis://127.0.0.1:{}", lane.channel_port), file));
        }
        let mut children = Vec::new();
        for lane in lanes {
            children.push(self.spawn(lane)?);
        }
        let result = self.run(lanes, per_lane, &bursts, &mut children).await;
        for child in children {
            stop(child);
        }
        let mut measured = result?;
        for lane in lanes {
            let audit = optimus::audit::audit(
                &optimus::Endpoint::cluster(self.cluster.seeds().split(',')),
                &lane.stream,
                None,
                per_lane,
                Some(""),
            )
            .await?;
            measured.lost += audit.lost;
            measured.duplicates += audit.duplicates;
        }
        Ok(measured)
    }

    async fn run(
        &self,
        lanes: &[Lane],
        per_lane: u64,
        bursts: &[(String, PathBuf)],
        children: &mut [Child],
    ) -> Result<Measured> {
        let mut conns = Vec::new();
        for (lane, child) in lanes.iter().zip(children) {
            let stream_master = format!("redis://127.0.0.1:{}", lane.stream_port);
            conns.push(connect(&stream_master).await?);
            self.wait_subscribed(lane, child).await?;
        }
        self.cluster.reset_stats();
        let start = Instant::now();
        std::thread::scope(|scope| {
            let sends: Vec<_> = bursts
                .iter()
                .map(|(url, file)| scope.spawn(move || pipe_burst(url, file)))
                .collect();
            sends
                .into_iter()
                .try_for_each(|s| s.join().expect("the burst's thread"))
        })?;
        let mut done = start;
        for (lane, conn) in lanes.iter().zip(&mut conns) {
            let stall = Duration::from_secs(10);
            done = done.max(wait_for_len(conn, &lane.stream, per_lane, stall).await?);
        }
        let seconds = done.duration_since(start).as_secs_f64();
        let commands = without_own(&self.cluster.commands());
        // Let late copies settle before the memory and the order.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (mut kept_bytes, mut out) = (0, 0);
        for node in &self.cluster.nodes {
            let mut conn = connect(&format!("redis://127.0.0.1:{}", node.port)).await?;
            let streams: Vec<&str> = lanes.iter().map(|l| l.stream.as_str()).collect();
            kept_bytes += memory_beside(&mut conn, &streams).await?;
        }
        for (lane, conn) in lanes.iter().zip(&mut conns) {
            out += out_of_order(conn, &lane.stream).await?;
        }
        Ok(Measured {
            messages: per_lane * lanes.len() as u64,
            seconds,
            commands,
            kept_bytes,
            out_of_order: out,
            lost: 0,
            duplicates: 0,
        })
    }

    /// `optimus consume` of the lane at default settings besides the
    /// strategy and the Pub/Sub flavour, in a clean environment.
    fn spawn(&self, lane: &Lane) -> Result<Child> {
        Command::new(&self.config.exe)
            .arg("consume")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("REDIS_URL", self.cluster.seeds())
            .env("STRATEGY", self.strategy.name())
            .env("PUBSUB_MODE", mode(self.strategy))
            .env("INPUT_CHANNEL", &lane.channel)
            .env("OUTPUT_STREAM", &lane.stream)
            .env("CONSUMERS_COUNT", self.workers.to_string())
            .env("MONITORING_INTERVAL", "3600")
            .env("LOGLEVEL", "ERROR")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start optimus consume")
    }

    /// Waits until the lane's channel has subscribers (fenced: the pool its
    /// member too) and their number has held for half a second: the rows
    /// measure the bridge running, not starting.
    async fn wait_subscribed(&self, lane: &Lane, child: &mut Child) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = (0usize, Instant::now());
        // One connection to each node for the whole wait.
        let mut nodes = Vec::new();
        for node in &self.cluster.nodes {
            let url = format!("redis://127.0.0.1:{}", node.port);
            nodes.push((node.port, connect(&url).await?));
        }
        let members = optimus::keys::Pool::sharded(&lane.stream, &lane.channel).members;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("optimus consume of {} ended: {status}", lane.channel);
            }
            let seen = self.subscribers(&mut nodes, &lane.channel).await?;
            let joined: usize = match self.strategy {
                Strategy::Race => 1,
                Strategy::Fenced => {
                    let (_, conn) = nodes
                        .iter_mut()
                        .find(|(port, _)| *port == lane.channel_port)
                        .expect("the channel's master is a node");
                    redis::cmd("HLEN").arg(&members).query_async(conn).await?
                }
            };
            if seen != last.0 {
                last = (seen, Instant::now());
            } else if seen > 0 && joined > 0 && last.1.elapsed() > Duration::from_millis(500) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "optimus consume did not subscribe to {} within 30 s ({seen} subscriptions, {joined} members)",
                    lane.channel
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Subscriptions to `channel` on every node of `nodes` (classic Pub/Sub
    /// counts them on the node each subscriber chose).
    async fn subscribers(
        &self,
        nodes: &mut [(u16, MultiplexedConnection)],
        channel: &str,
    ) -> Result<usize> {
        let sub = match self.strategy {
            Strategy::Fenced => "SHARDNUMSUB",
            Strategy::Race => "NUMSUB",
        };
        let mut total = 0;
        for (_, conn) in nodes {
            let counts: Vec<(String, usize)> = redis::cmd("PUBSUB")
                .arg(sub)
                .arg(channel)
                .query_async(conn)
                .await?;
            total += counts.first().map_or(0, |c| c.1);
        }
        Ok(total)
    }
}

/// The cluster targets of the high-availability issue, against this run:
/// fenced commands per message at most 1.5 at every worker count, at most
/// 16 bytes per message beside the stream, three shards at 2.2 times one.
fn targets(report: &ClusterReport) -> Vec<Target> {
    let fenced: Vec<&ClusterRow> = report
        .rows
        .iter()
        .filter(|r| r.strategy == "fenced")
        .collect();
    let mut out = Vec::new();
    if let Some(most) = fenced
        .iter()
        .max_by(|a, b| a.commands_per_message.total_cmp(&b.commands_per_message))
    {
        out.push(Target {
            target: "commands per message at most 1.5 at every worker count".into(),
            measured: format!(
                "at most {:.2} ({} workers)",
                most.commands_per_message, most.workers
            ),
            met: most.commands_per_message <= 1.5,
        });
    }
    if let Some(most) = fenced.iter().max_by(|a, b| {
        a.redis_bytes_per_message
            .total_cmp(&b.redis_bytes_per_message)
    }) {
        out.push(Target {
            target: "Redis memory beside the stream at most 16 B per message".into(),
            measured: format!(
                "at most {:.1} B ({} workers)",
                most.redis_bytes_per_message, most.workers
            ),
            met: most.redis_bytes_per_message <= 16.0,
        });
    }
    if let Some(shards) = &report.shards {
        out.push(Target {
            target: "three shards at least 2.2x one shard's rate".into(),
            measured: format!(
                "{:.2}x ({:.0} against {:.0} msg/s, {} cores)",
                shards.ratio,
                shards.three_shards_rate,
                shards.one_shard_rate,
                std::thread::available_parallelism().map_or(0, |n| n.get())
            ),
            met: shards.ratio >= 2.2,
        });
    }
    out
}

/// The results as Markdown tables.
pub fn table(report: &ClusterReport) -> String {
    let mut out = format!(
        "machine: {}; Redis Cluster of {} masters, redis {}; payload {} bytes\n\n",
        report.machine, report.masters, report.redis_version, report.payload_bytes
    );
    let failed = |failed: bool| if failed { " FAILED" } else { "" };
    out += &markdown(
        &[
            "strategy",
            "Pub/Sub",
            "workers",
            "messages/s",
            "commands/msg",
            "Redis B/msg",
            "out of order",
            "lost",
            "duplicates",
        ],
        report.rows.iter().map(|r| {
            vec![
                r.strategy.to_string(),
                r.pubsub_mode.to_string(),
                r.workers.to_string(),
                format!("{:.0}", r.rate),
                format!("{:.2}", r.commands_per_message),
                format!("{:.1}", r.redis_bytes_per_message),
                r.out_of_order.to_string(),
                r.lost.to_string(),
                format!("{}{}", r.duplicates, failed(r.failed())),
            ]
        }),
    );
    if let Some(s) = &report.shards {
        out += "\n";
        out += &markdown(
            &[
                "fenced, workers per pool",
                "messages",
                "1 shard msg/s",
                "3 shards msg/s",
                "ratio",
                "out of order",
                "lost",
                "duplicates",
            ],
            std::iter::once(vec![
                s.workers_per_pool.to_string(),
                s.messages.to_string(),
                format!("{:.0}", s.one_shard_rate),
                format!("{:.0}", s.three_shards_rate),
                format!("{:.2}", s.ratio),
                s.out_of_order.to_string(),
                s.lost.to_string(),
                s.duplicates.to_string(),
            ]),
        );
    }
    out += &targets_table("target (fenced, cluster)", &report.targets);
    out
}
