//! `optimus consume`: its variables, turned into a [`BridgeConfig`], and the
//! run of the bridge.

use clap::Args;
use optimus::settings::{
    ConfigError, given, limits, parse_bytes, parse_choice, parse_interval, parse_seconds,
    parse_whole,
};
use optimus::{BridgeConfig, Cap, DEFAULT_CONSUMERS, Strategy, Trim};

use std::sync::atomic::Ordering;

use optimus::control::Activity;
use optimus::{Bridge, BridgeError};

use super::Exit;
use super::connect::ConnectArgs;
use super::controls::Controls;
use super::signals::shutdown_on_signal;

/// `optimus consume` settings, as text. [`ConsumeArgs::to_config`] checks them.
#[derive(Debug, Clone, Args)]
// A negative number is a value (rejected with the setting's own reason),
// not an unknown flag.
#[command(allow_negative_numbers = true)]
pub struct ConsumeArgs {
    /// Workers this process counts as (presence, `ctl scale`). On one server
    /// a process reads through at most two subscriptions whatever the count;
    /// on a cluster each worker has its own.
    #[arg(long = "consumers", env = "CONSUMERS_COUNT", default_value = DEFAULT_CONSUMERS)]
    pub consumers_count: String,
    /// Most messages a worker handles per batch; a batch never waits to fill.
    #[arg(
        long = "batch-size",
        env = "PROCESSING_BATCH_SIZE",
        default_value = "100"
    )]
    pub processing_batch_size: String,
    /// Pub/Sub channel to read.
    #[arg(long, env = "INPUT_CHANNEL", default_value = "messages:published")]
    pub input_channel: String,
    /// Stream to write.
    #[arg(long, env = "OUTPUT_STREAM", default_value = "messages:processed")]
    pub output_stream: String,
    /// Several channels or patterns, each to its stream, instead of
    /// INPUT_CHANNEL=OUTPUT_STREAM: `orders=orders:processed,events:*={channel}:processed;maxlen=100000`
    /// ({channel}: the channel a message came on; per route `maxlen=N` or `max_age=SECONDS`).
    #[arg(long, env = "ROUTES", value_name = "ROUTES")]
    pub routes: Option<String>,
    /// Cap every output stream at about this many entries (XADD MAXLEN ~) [default: no cap].
    #[arg(long, env = "STREAM_MAXLEN")]
    pub stream_maxlen: Option<String>,
    /// Trim entries older than this many seconds from every output stream (XADD MINID ~) [default: no cap].
    #[arg(long, env = "STREAM_MAX_AGE")]
    pub stream_max_age: Option<String>,
    /// How caps trim: `approximate` (whole macro nodes, cheap) or `exact`.
    #[arg(long, env = "STREAM_TRIM", default_value = "approximate")]
    pub stream_trim: String,
    /// Seconds between monitoring lines on stdout (fractions allowed).
    #[arg(long, env = "MONITORING_INTERVAL", default_value = "3")]
    pub monitoring_interval: String,
    /// Prefix of the per-worker presence keys (`<prefix>:<worker id>`), and the
    /// name of the sorted set that indexes them.
    #[arg(long, env = "CONSUMERS_LIST", default_value = "consumer:ids")]
    pub consumers_list: String,
    /// JSON field of a payload that carries the message's id.
    #[arg(long, env = "MESSAGE_ID_FIELD", default_value = "message_id")]
    pub message_id_field: String,
    /// Race strategy: seconds a per-message lock lasts: how long a crashed
    /// worker's messages wait before another worker takes them over.
    #[arg(long, env = "LOCK_TTL", default_value = "2")]
    pub lock_ttl: String,
    /// Fenced strategy: seconds a standby waits for a stream's writer that
    /// fell silent, stopped receiving (its subscription lags the others') or
    /// holds copies unwritten, before it takes the stream over (fencing the
    /// writer off). A message is safe while at least one process holding it
    /// outlives this window.
    #[arg(long, env = "TAKEOVER_AFTER", default_value = "0.25")]
    pub takeover_after: String,
    /// Race strategy: seconds a worker keeps its copy of a message another
    /// worker locked, waiting for its ACK, before dropping it as expired.
    #[arg(long, env = "PENDING_RETENTION", default_value = "30")]
    pub pending_retention: String,
    /// Race strategy: seconds an ACK key (the record that a message was
    /// written) lives; must be longer than PENDING_RETENTION + LOCK_TTL. A
    /// copy published longer ago than ACK_TTL − LOCK_TTL is never written.
    #[arg(long, env = "ACK_TTL", default_value = "60")]
    pub ack_ttl: String,
    /// Fenced strategy: seconds (by publish time) within which a message
    /// whose id was already written is taken for a re-sent one (a publisher
    /// retrying) and written once; 0 turns it off.
    #[arg(long, env = "DEDUP_WINDOW", default_value = "5")]
    pub dedup_window: String,
    /// Fenced strategy (on a cluster, with sharded Pub/Sub): replicas that must hold a write (WAIT) before the pool drops its copies of it (what a failover takes back is written again), so that a failover loses nothing; set it for `optimus publish` too; 0 turns it off.
    #[arg(long, env = "MIN_REPLICAS_ACKED", default_value = "0")]
    pub min_replicas_acked: String,
    /// Fenced strategy: how many processes besides each stream's writer
    /// hold copies of the messages (subscribe), to take the stream over if
    /// the writer dies; the pool's other processes wait, reading nothing,
    /// and take a holder's place when one leaves or falls silent. Every
    /// message published while one holder lives and is subscribed is
    /// written; `all` has every process hold copies (Redis's and the
    /// processes' CPU per message then grow with the processes).
    #[arg(long, env = "STANDBYS", default_value = "2")]
    pub standbys: String,
    /// Seconds a presence key lives without a refresh (refreshed every third of it).
    #[arg(long, env = "PRESENCE_TTL", default_value = "5")]
    pub presence_ttl: String,
    /// How workers share the writing: `fenced` (one writer per stream, in
    /// publish order, no key per message; `partitioned` is taken for it) or
    /// `race` (every worker races for every message's lock). On a cluster
    /// fenced needs PUBSUB_MODE=sharded. [default: fenced; on a cluster with
    /// classic Pub/Sub, race]
    #[arg(long, env = "STRATEGY")]
    pub strategy: Option<String>,
    /// Stream entry layout: `envelope` (message_id, payload, consumer_id) or
    /// `flat` (also the top-level fields of a JSON object payload).
    #[arg(long, env = "OUTPUT_FORMAT", default_value = "envelope")]
    pub output_format: String,
    /// Memory this process may use for messages (bytes, or with KiB, MiB,
    /// GiB): when it is spent the readers stop reading, so that messages wait
    /// in the server's output buffer; copies another process writes are
    /// dropped first (`overflow`).
    #[arg(long, env = "MEMORY_LIMIT", default_value = "256MiB")]
    pub memory_limit: String,
    /// No longer used: the memory bound is MEMORY_LIMIT (a value is ignored,
    /// with a warning).
    #[arg(long, env = "QUEUE_CAPACITY", hide = true)]
    pub queue_capacity: Option<String>,
    /// Payloads larger than this many bytes go to the dead-letter stream.
    #[arg(long, env = "MAX_PAYLOAD_BYTES", default_value = "1048576")]
    pub max_payload_bytes: String,
    /// Stream for messages the bridge will not write to OUTPUT_STREAM, with the
    /// reason [default: <OUTPUT_STREAM>:dead].
    #[arg(long, env = "DEAD_LETTER_STREAM")]
    pub dead_letter_stream: Option<String>,
    /// Serve Prometheus metrics on `http://<this address>/metrics` (e.g.
    /// 127.0.0.1:9100), and the probes `/healthz` (alive) and `/readyz`
    /// (Redis reached, subscriptions live; 503 with the reason otherwise)
    /// [default: off].
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Stop (gracefully, exit 0) after this many seconds without a message
    /// [default: never].
    #[arg(long, env = "IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Seconds a graceful stop (SIGTERM, SIGINT, SIGHUP, the kill switch) may take:
    /// past it the process exits 1, saying how many messages it left
    /// unsettled (other workers hold copies of them).
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30")]
    pub shutdown_timeout: String,
}

impl ConsumeArgs {
    /// Turns the raw settings into a validated [`BridgeConfig`].
    pub fn to_config(&self, connect: &ConnectArgs) -> Result<BridgeConfig, ConfigError> {
        let endpoint = connect.endpoint()?;
        let mut config = BridgeConfig::new("")
            .endpoint(endpoint.clone())
            .consumers(parse_whole(
                "CONSUMERS_COUNT",
                &self.consumers_count,
                limits::WORKERS,
            )?)
            .batch_size(parse_whole(
                "PROCESSING_BATCH_SIZE",
                &self.processing_batch_size,
                limits::BATCH,
            )?)
            .input_channel(self.input_channel.clone())
            .output_stream(self.output_stream.clone())
            .monitoring_interval(parse_interval(
                "MONITORING_INTERVAL",
                &self.monitoring_interval,
            )?)
            .consumers_list(self.consumers_list.clone())
            .message_id_field(self.message_id_field.clone())
            .lock_ttl(parse_interval("LOCK_TTL", &self.lock_ttl)?)
            .takeover_after(parse_interval("TAKEOVER_AFTER", &self.takeover_after)?)
            .pending_retention(parse_interval(
                "PENDING_RETENTION",
                &self.pending_retention,
            )?)
            .ack_ttl(parse_interval("ACK_TTL", &self.ack_ttl)?)
            .presence_ttl(parse_interval("PRESENCE_TTL", &self.presence_ttl)?)
            .output_format(parse_choice("OUTPUT_FORMAT", &self.output_format)?)
            .strategy(match &self.strategy {
                Some(raw) => parse_choice("STRATEGY", raw)?,
                None if endpoint.is_cluster() && !endpoint.is_sharded() => Strategy::Race,
                None => Strategy::Fenced,
            })
            .memory_limit(parse_bytes("MEMORY_LIMIT", &self.memory_limit, limits::MEMORY)? as usize)
            .dedup_window(parse_seconds(
                "DEDUP_WINDOW",
                &self.dedup_window,
                0.0..=3600.0,
            )?)
            .min_replicas_acked(parse_whole(
                "MIN_REPLICAS_ACKED",
                &self.min_replicas_acked,
                limits::REPLICAS,
            )?)
            .standbys(match self.standbys.trim() {
                "all" => None,
                n => Some(parse_whole("STANDBYS", n, limits::STANDBYS)?),
            })
            .max_payload_bytes(parse_whole(
                "MAX_PAYLOAD_BYTES",
                &self.max_payload_bytes,
                limits::PAYLOAD_BYTES,
            )?)
            .shutdown_timeout(parse_interval("SHUTDOWN_TIMEOUT", &self.shutdown_timeout)?)
            .print_monitor(true);
        if let Some(stream) = &self.dead_letter_stream {
            config = config.dead_letter_stream(stream);
        }
        let exact = match self.stream_trim.trim().to_ascii_lowercase().as_str() {
            "approximate" | "approx" | "~" => false,
            "exact" | "=" => true,
            _ => {
                return Err(ConfigError::new(
                    "STREAM_TRIM",
                    &self.stream_trim,
                    "expected approximate or exact",
                ));
            }
        };
        let maxlen = given(&self.stream_maxlen)
            .map(|raw| parse_whole::<u64>("STREAM_MAXLEN", raw, 1..=1_000_000_000_000))
            .transpose()?;
        let max_age = given(&self.stream_max_age)
            .map(|raw| parse_seconds("STREAM_MAX_AGE", raw, 0.01..=315_360_000.0))
            .transpose()?;
        let cap = match (maxlen, max_age) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "STREAM_MAX_AGE",
                    self.stream_max_age.clone().unwrap_or_default(),
                    "STREAM_MAXLEN is set too: a stream is capped by length or by age",
                ));
            }
            (Some(n), None) => Some(Cap::MaxLen(n)),
            (None, Some(age)) => Some(Cap::MaxAge(age)),
            (None, None) => None,
        };
        let mut config = config.trim(cap.map(|cap| Trim { cap, exact }));
        if let Some(raw) = given(&self.routes) {
            config = config.routes(optimus::parse_routes(raw, exact)?);
        }
        config.validate()?;
        Ok(config)
    }
}

/// Runs the bridge until a signal (or the kill switch, or IDLE_TIMEOUT)
/// stops it.
pub async fn run(connect: &ConnectArgs, args: &ConsumeArgs) -> Result<(), Exit> {
    let config = args.to_config(connect)?;
    if let Some(raw) = &args.queue_capacity {
        tracing::warn!(
            "QUEUE_CAPACITY={raw} is no longer used and is ignored: the memory bound is MEMORY_LIMIT (bytes)"
        );
    }
    let controls = Controls::parse(&args.metrics_addr, &args.idle_timeout)?;
    let endpoint = config.server().clone();
    let bridge = Bridge::new(config)?;
    let shutdown = shutdown_on_signal();
    let counters = bridge.counters();
    controls
        .start(
            &endpoint,
            move || Activity {
                count: counters.received.load(Ordering::Relaxed),
                redis_up: counters.redis_up(),
            },
            || optimus::metrics::bridge_registry(bridge.counters()),
            {
                let counters = bridge.counters();
                move || counters.link()
            },
            &shutdown,
        )
        .await?;
    match bridge.run(shutdown).await {
        Ok(_) => Ok(()),
        Err(BridgeError::Config(err)) => Err(Exit::Setting(err)),
        Err(err @ BridgeError::MixedStrategies(_)) => Err(Exit::Refused(err.to_string())),
        Err(err) => Err(Exit::failed(err)),
    }
}
