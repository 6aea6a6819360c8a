//! `optimus publish`: its flags, turned into a [`PublishConfig`], and the run
//! of the publisher.

use clap::Args;
use optimus::settings::{ConfigError, given, limits, parse_interval, parse_seconds, parse_whole};
use optimus::{Pace, PublishConfig, PublishLimit};

use super::Exit;
use super::connect::ConnectArgs;
use super::signals::shutdown_on_signal;

/// `optimus publish` settings.
#[derive(Debug, Clone, Args)]
// A negative number is a value (rejected with the setting's own reason),
// not an unknown flag.
#[command(allow_negative_numbers = true)]
pub struct PublishArgs {
    /// Seconds to publish for (ignored with --count).
    #[arg(long, default_value = "60")]
    pub duration: String,
    /// Send exactly this many messages, then stop.
    #[arg(long)]
    pub count: Option<String>,
    /// Messages per batch; each batch is one pipelined round trip.
    #[arg(long, default_value = "1000")]
    pub batch_size: String,
    /// Send at this steady rate (messages/s) instead of batches with pauses.
    #[arg(long)]
    pub rate: Option<String>,
    /// Shortest pause between batches, seconds (without --rate).
    #[arg(long, default_value = "0.1")]
    pub pause_min: String,
    /// Longest pause between batches, seconds (without --rate); a random pause in between is taken.
    #[arg(long, default_value = "0.5")]
    pub pause_max: String,
    /// Channel to publish to.
    #[arg(long, env = "INPUT_CHANNEL", default_value = "messages:published")]
    pub channel: String,
    /// Pad each message to about this many bytes (0: no padding).
    #[arg(long, default_value = "0")]
    pub payload_size: String,
    /// Seconds between progress lines on stdout.
    #[arg(long, default_value = "1")]
    pub progress_interval: String,
    /// Stream where messages that reach no subscriber are written directly
    /// (the fast path), with the bridge's ACK protocol.
    #[arg(long, env = "OUTPUT_STREAM", default_value = "messages:processed")]
    pub stream: String,
    /// Do not write messages that reach no subscriber to the stream.
    #[arg(long)]
    pub no_fast_path: bool,
    /// Seconds the fast path's ACK keys live (as the bridge's ACK_TTL).
    #[arg(long, env = "ACK_TTL", default_value = "60")]
    pub ack_ttl: String,
    /// Seconds to keep retrying a batch Redis did not confirm before giving it up.
    #[arg(long, default_value = "30")]
    pub retry_for: String,
    /// The bridge's DEDUP_WINDOW, seconds: a batch Redis did not confirm is
    /// published again only within it (less a second) of its first attempt,
    /// where the bridge writes each id once.
    #[arg(long, env = "DEDUP_WINDOW", default_value = "5")]
    pub dedup_window: String,
    /// A batch counts as sent only once this many replicas hold it (WAIT,
    /// up to 1 s); otherwise it is sent again (after a failover, on the new
    /// primary), so that a failover loses nothing it sent; on a cluster,
    /// what the fast path writes counts once replicas hold it; 0 turns it
    /// off.
    #[arg(long, env = "MIN_REPLICAS_ACKED", default_value = "0")]
    pub min_replicas_acked: String,
    /// JSON field of each test message that carries its id (the bridge's
    /// MESSAGE_ID_FIELD); the fast path knows messages by it.
    #[arg(long, env = "MESSAGE_ID_FIELD", default_value = "message_id")]
    pub message_id_field: String,
    /// Payloads larger than this are not published (one that large could
    /// drop every subscriber at its output-buffer limit) but written to the
    /// dead-letter stream, with the reason.
    #[arg(long, env = "MAX_PAYLOAD_BYTES", default_value = "1048576")]
    pub max_payload_bytes: String,
    /// Where those go [default: <stream>:dead].
    #[arg(long, env = "DEAD_LETTER_STREAM")]
    pub dead_letter_stream: Option<String>,
    /// The bridge's ROUTES, when it has them: the fast path writes a message
    /// to the stream(s) its channel is routed to, and asks the probe of
    /// the route that reads it.
    #[arg(long, env = "ROUTES", value_name = "ROUTES")]
    pub routes: Option<String>,
}

impl PublishArgs {
    /// Turns the raw flags into a validated [`PublishConfig`].
    pub fn to_config(&self, connect: &ConnectArgs) -> Result<PublishConfig, ConfigError> {
        let limit = match &self.count {
            Some(count) => {
                PublishLimit::Count(parse_whole("--count", count, 1..=1_000_000_000_000)?)
            }
            None => PublishLimit::Duration(parse_seconds(
                "--duration",
                &self.duration,
                0.01..=31_536_000.0,
            )?),
        };
        let batch_size: usize = parse_whole("--batch-size", &self.batch_size, 1..=100_000)?;
        let pace = match &self.rate {
            Some(rate) => {
                let r: f64 = rate.trim().parse().map_err(|_| {
                    ConfigError::new("--rate", rate, "expected messages per second")
                })?;
                if !(r > 0.0 && r.is_finite()) {
                    return Err(ConfigError::new("--rate", rate, "must be above 0"));
                }
                Pace::Rate(r)
            }
            None => {
                let min = parse_seconds("--pause-min", &self.pause_min, 0.0..=3600.0)?;
                let max = parse_seconds("--pause-max", &self.pause_max, 0.0..=3600.0)?;
                if max < min {
                    return Err(ConfigError::new(
                        "--pause-max",
                        &self.pause_max,
                        "must not be below --pause-min",
                    ));
                }
                Pace::Pauses { min, max }
            }
        };
        if self.channel.is_empty() {
            return Err(ConfigError::new("INPUT_CHANNEL", "", "must not be empty"));
        }
        if self.message_id_field.is_empty() {
            return Err(ConfigError::new(
                "MESSAGE_ID_FIELD",
                "",
                "must not be empty",
            ));
        }
        let endpoint = connect.endpoint()?;
        let min_replicas_acked = parse_whole(
            "MIN_REPLICAS_ACKED",
            &self.min_replicas_acked,
            limits::REPLICAS,
        )?;
        if min_replicas_acked > 0 && endpoint.is_cluster() && !endpoint.is_sharded() {
            return Err(ConfigError::new(
                "MIN_REPLICAS_ACKED",
                min_replicas_acked,
                "is kept by the fenced strategy only: on a cluster, with PUBSUB_MODE=sharded",
            ));
        }
        let routes = match given(&self.routes) {
            Some(raw) => optimus::parse_routes(raw, false)?,
            None => Vec::new(),
        };
        Ok(PublishConfig {
            endpoint,
            channel: self.channel.clone(),
            limit,
            batch_size,
            pace,
            payload_size: parse_whole("--payload-size", &self.payload_size, 0..=64 << 20)?,
            progress_interval: Some(parse_interval(
                "--progress-interval",
                &self.progress_interval,
            )?),
            stream: self.stream.clone(),
            fast_path: !self.no_fast_path,
            dead_letter_stream: given(&self.dead_letter_stream).map(str::to_string),
            routes,
            id_field: self.message_id_field.clone(),
            max_payload_bytes: parse_whole(
                "MAX_PAYLOAD_BYTES",
                &self.max_payload_bytes,
                limits::PAYLOAD_BYTES,
            )?,
            ack_ttl: parse_interval("ACK_TTL", &self.ack_ttl)?,
            retry_for: parse_seconds("--retry-for", &self.retry_for, 0.0..=86_400.0)?,
            dedup_window: parse_seconds("DEDUP_WINDOW", &self.dedup_window, 0.0..=3600.0)?,
            min_replicas_acked,
        })
    }
}

/// Publishes until the duration or the count is reached (or a signal), then
/// prints the summary: exit 1 when a message may be lost.
pub async fn run(connect: &ConnectArgs, args: &PublishArgs) -> Result<(), Exit> {
    let config = args.to_config(connect)?;
    match optimus::publish::run(&config, shutdown_on_signal()).await {
        Ok(summary) => {
            optimus::monitor::print_line(format_args!("publish done {summary}"));
            if summary.failed > 0 {
                return Err(Exit::failed(format_args!(
                    "{} messages were never confirmed by Redis and may be lost",
                    summary.failed
                )));
            }
            Ok(())
        }
        Err(err) => {
            optimus::monitor::print_line(format_args!("publish failed {}", err.summary));
            Err(Exit::failed(err))
        }
    }
}
