//! Settings: environment variables (and the equivalent flags) in, one validated
//! [`BridgeConfig`] or [`PublishConfig`] out.
//!
//! Every setting is read by clap, which shows each variable and its default in
//! `--help`; clap hands over the raw text and this module turns it into typed
//! values, so that a bad value becomes one [`ConfigError`] naming the variable.
//! Nothing after this module reads the environment.

use std::fmt;
use std::time::Duration;

/// CONSUMERS_COUNT's default: workers in one bridge process.
pub const DEFAULT_CONSUMERS: &str = "2";

use clap::{Args, ValueEnum};

pub use crate::bridge::delivery::{Cap, Trim};
pub use crate::bridge::route::Route;
pub use crate::connect::{Endpoint, TlsFiles};

/// A setting that cannot be used: which variable, what it held, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {var}={value:?}: {reason}")]
pub struct ConfigError {
    /// The environment variable (the flag of the same meaning is listed in `--help`).
    pub var: &'static str,
    /// The value as given.
    pub value: String,
    /// What is wrong with it, and what would be accepted.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(
        var: &'static str,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            var,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Where Redis is and how to log in. Shared by every subcommand.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection and logging")]
pub struct ConnectArgs {
    /// Redis URL (`redis://[user:pass@]host:port/db`, `rediss://…` for TLS, or `unix:///path`); overrides REDIS_HOST and REDIS_PORT. Several, comma-separated: the seed nodes of a Redis Cluster.
    #[arg(
        long,
        env = "REDIS_URL",
        value_name = "URL",
        global = true,
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// Redis host, used when REDIS_URL is unset.
    #[arg(long, env = "REDIS_HOST", default_value = "localhost", global = true)]
    pub redis_host: String,
    /// Redis port, used when REDIS_URL is unset.
    #[arg(long, env = "REDIS_PORT", default_value = "6379", global = true)]
    pub redis_port: String,
    /// ACL user name (overrides one in REDIS_URL).
    #[arg(long, env = "REDIS_USERNAME", value_name = "USER", global = true)]
    pub redis_username: Option<String>,
    /// Password (overrides one in REDIS_URL). Never printed; prefer REDIS_PASSWORD_FILE.
    #[arg(
        long,
        env = "REDIS_PASSWORD",
        value_name = "PASSWORD",
        global = true,
        hide_env_values = true
    )]
    pub redis_password: Option<String>,
    /// File holding the password (one line; a trailing newline is ignored).
    #[arg(long, env = "REDIS_PASSWORD_FILE", value_name = "PATH", global = true)]
    pub redis_password_file: Option<String>,
    /// Redis Cluster mode (1/true/yes), with REDIS_URL (or host and port) as a seed node. Implied by several URLs in REDIS_URL.
    #[arg(
        long,
        env = "REDIS_CLUSTER",
        value_name = "BOOL",
        global = true,
        default_value = "0"
    )]
    pub redis_cluster: String,
    /// Pub/Sub flavour: `classic` (SUBSCRIBE/PUBLISH; a cluster broadcasts it to every node) or `sharded` (SSUBSCRIBE/SPUBLISH, Redis 7: only the channel's shard carries it).
    #[arg(
        long,
        env = "PUBSUB_MODE",
        value_name = "MODE",
        global = true,
        default_value = "classic"
    )]
    pub pubsub_mode: String,
    /// PEM file of the CA to trust for `rediss://` instead of the system's.
    #[arg(long, env = "REDIS_TLS_CA_FILE", value_name = "PATH", global = true)]
    pub redis_tls_ca_file: Option<String>,
    /// PEM client certificate for mutual TLS (with REDIS_TLS_KEY_FILE).
    #[arg(long, env = "REDIS_TLS_CERT_FILE", value_name = "PATH", global = true)]
    pub redis_tls_cert_file: Option<String>,
    /// PEM private key of the client certificate.
    #[arg(long, env = "REDIS_TLS_KEY_FILE", value_name = "PATH", global = true)]
    pub redis_tls_key_file: Option<String>,
}

/// Why `url` cannot name a Redis server, in words a user can act on; `None`
/// when it can.
fn url_problem(url: &str) -> Option<String> {
    const FORMS: &str = "redis://[user:pass@]host:port[/db], rediss://… (TLS) or unix:///path";
    let parsed = match url::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            return Some(format!("not a URL; expected {FORMS}"));
        }
        Err(url::ParseError::InvalidPort) => {
            return Some("the port must be a number from 1 to 65535".into());
        }
        Err(url::ParseError::EmptyHost) => {
            return Some(format!("no host in it; expected {FORMS}"));
        }
        Err(err) => return Some(format!("not a URL ({err}); expected {FORMS}")),
    };
    match parsed.scheme() {
        "redis" | "rediss" => {
            if parsed.host_str().is_none_or(str::is_empty) {
                return Some(format!("no host in it; expected {FORMS}"));
            }
            if parsed.port() == Some(0) {
                return Some("the port must be a number from 1 to 65535".into());
            }
            let db = parsed.path().trim_start_matches('/');
            if !db.is_empty() && db.parse::<u32>().is_err() {
                return Some(format!(
                    "the database after the host must be a number, like /0 (not {db:?})"
                ));
            }
        }
        "unix" | "redis+unix" => {
            if parsed.path().is_empty() {
                return Some("no socket path in it; expected unix:///path/to/redis.sock".into());
            }
        }
        other => {
            return Some(format!(
                "{other}:// is not a Redis scheme; expected {FORMS}"
            ));
        }
    }
    // Whatever else the client library refuses, in its words.
    redis::Client::open(url).err().map(|e| e.to_string())
}

/// An optional setting that is set and not blank.
fn given(raw: &Option<String>) -> Option<&str> {
    raw.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// The bytes of the file a setting names, or one line saying why not.
fn read_setting_file(var: &'static str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| ConfigError::new(var, path, format!("cannot read it: {e}")))
}

/// PEM bytes from the file a setting names, checked for at least one PEM block.
fn read_pem(var: &'static str, path: &str) -> Result<Vec<u8>, ConfigError> {
    let bytes = read_setting_file(var, path)?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ConfigError::new(var, path, "not a PEM file"));
    }
    Ok(bytes)
}

impl ConnectArgs {
    /// The URL to connect to, checked for form (not for reachability).
    pub fn url(&self) -> Result<String, ConfigError> {
        let tls_files = [&self.redis_tls_ca_file, &self.redis_tls_cert_file]
            .iter()
            .any(|f| given(f).is_some());
        let url = match &self.redis_url {
            Some(urls) => {
                for url in urls.split(',') {
                    if let Some(why) = url_problem(url.trim()) {
                        return Err(ConfigError::new("REDIS_URL", mask_password(urls), why));
                    }
                }
                return Ok(urls.trim().to_string());
            }
            None => {
                let port: u16 = parse_whole("REDIS_PORT", &self.redis_port, limits::PORT)?;
                let host = self.redis_host.trim();
                if host.is_empty() || host.contains(['/', '@', ' ']) {
                    return Err(ConfigError::new(
                        "REDIS_HOST",
                        host,
                        "must be a host name or address",
                    ));
                }
                let scheme = if tls_files { "rediss" } else { "redis" };
                format!("{scheme}://{host}:{port}")
            }
        };
        redis::Client::open(url.as_str())
            .map_err(|e| ConfigError::new("REDIS_HOST", &self.redis_host, e.to_string()))?;
        Ok(url)
    }

    /// The server with its credentials and certificates, every file read and
    /// checked: a missing or malformed one is a [`ConfigError`] naming it.
    pub fn endpoint(&self) -> Result<Endpoint, ConfigError> {
        let url = self.url()?;
        let seeds: Vec<&str> = url.split(',').map(str::trim).collect();
        let cluster = match self.redis_cluster.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" | "" => seeds.len() > 1,
            _ => {
                return Err(ConfigError::new(
                    "REDIS_CLUSTER",
                    &self.redis_cluster,
                    "expected 1 or 0 (true/false, yes/no)",
                ));
            }
        };
        let sharded =
            parse_choice::<PubSubMode>("PUBSUB_MODE", &self.pubsub_mode)? == PubSubMode::Sharded;
        if sharded && !cluster {
            return Err(ConfigError::new(
                "PUBSUB_MODE",
                &self.pubsub_mode,
                "sharded Pub/Sub needs a cluster (REDIS_CLUSTER=1)",
            ));
        }
        let mut endpoint = if cluster {
            if seeds.iter().any(|s| s.starts_with("unix:")) {
                return Err(ConfigError::new(
                    "REDIS_URL",
                    mask_password(&url),
                    "a cluster is reached over TCP, not a unix socket",
                ));
            }
            Endpoint::cluster(seeds.iter().copied())
        } else {
            Endpoint::new(url.clone())
        }
        .sharded_pubsub(sharded);
        if let Some(user) = given(&self.redis_username) {
            endpoint = endpoint.username(user);
        }
        match (
            given(&self.redis_password),
            given(&self.redis_password_file),
        ) {
            (Some(_), Some(path)) => {
                return Err(ConfigError::new(
                    "REDIS_PASSWORD_FILE",
                    path,
                    "REDIS_PASSWORD is set too: set one of them",
                ));
            }
            (Some(password), None) => endpoint = endpoint.password(password),
            (None, Some(path)) => {
                let bytes = read_setting_file("REDIS_PASSWORD_FILE", path)?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| ConfigError::new("REDIS_PASSWORD_FILE", path, "not UTF-8 text"))?;
                let password = text.trim_end_matches(['\n', '\r']);
                if password.is_empty() {
                    return Err(ConfigError::new("REDIS_PASSWORD_FILE", path, "is empty"));
                }
                endpoint = endpoint.password(password);
            }
            (None, None) => {}
        }
        let ca = given(&self.redis_tls_ca_file);
        let cert = given(&self.redis_tls_cert_file);
        let key = given(&self.redis_tls_key_file);
        if ca.is_none() && cert.is_none() && key.is_none() {
            return Ok(endpoint);
        }
        if !endpoint.is_tls() {
            let var = if ca.is_some() {
                "REDIS_TLS_CA_FILE"
            } else if cert.is_some() {
                "REDIS_TLS_CERT_FILE"
            } else {
                "REDIS_TLS_KEY_FILE"
            };
            let path = ca.or(cert).or(key).unwrap_or_default();
            return Err(ConfigError::new(
                var,
                path,
                format!(
                    "TLS files need a rediss:// server, but REDIS_URL is {}",
                    mask_password(&url)
                ),
            ));
        }
        let mut files = TlsFiles::default();
        if let Some(path) = ca {
            files.ca = Some(read_pem("REDIS_TLS_CA_FILE", path)?);
            endpoint
                .clone()
                .tls(files.clone())
                .check()
                .map_err(|e| ConfigError::new("REDIS_TLS_CA_FILE", path, e.to_string()))?;
        }
        match (cert, key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                files.client_cert_and_key = Some((
                    read_pem("REDIS_TLS_CERT_FILE", cert)?,
                    read_pem("REDIS_TLS_KEY_FILE", key)?,
                ));
                endpoint
                    .clone()
                    .tls(files.clone())
                    .check()
                    .map_err(|e| ConfigError::new("REDIS_TLS_CERT_FILE", cert, e.to_string()))?;
            }
            (Some(cert), None) => {
                return Err(ConfigError::new(
                    "REDIS_TLS_CERT_FILE",
                    cert,
                    "needs REDIS_TLS_KEY_FILE too",
                ));
            }
            (None, Some(key)) => {
                return Err(ConfigError::new(
                    "REDIS_TLS_KEY_FILE",
                    key,
                    "needs REDIS_TLS_CERT_FILE too",
                ));
            }
        }
        Ok(endpoint.tls(files))
    }
}

/// The log level, as LOGLEVEL gives it. The names of the system optimus
/// replaces (Python's logging levels) are accepted too.
pub fn parse_log_level(raw: &str) -> Result<tracing::Level, ConfigError> {
    use tracing::Level;
    match raw.trim().to_ascii_uppercase().as_str() {
        "TRACE" => Ok(Level::TRACE),
        "DEBUG" => Ok(Level::DEBUG),
        "INFO" | "NOTSET" => Ok(Level::INFO),
        "WARN" | "WARNING" => Ok(Level::WARN),
        "ERROR" | "CRITICAL" | "FATAL" => Ok(Level::ERROR),
        _ => Err(ConfigError::new(
            "LOGLEVEL",
            raw,
            "expected one of TRACE, DEBUG, INFO, WARNING, ERROR, CRITICAL",
        )),
    }
}

/// How a message is laid out in the output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// `message_id`, `payload` (the published bytes, untouched) and `consumer_id`.
    #[default]
    Envelope,
    /// Like envelope, plus every top-level string/number/bool field of a JSON
    /// object payload copied into the entry (as the replaced system did).
    Flat,
}

/// Which Pub/Sub commands carry the messages (PUBSUB_MODE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum PubSubMode {
    /// SUBSCRIBE and PUBLISH; on a cluster, every node relays every message.
    #[default]
    Classic,
    /// SSUBSCRIBE and SPUBLISH (Redis 7): only the shard that holds the
    /// channel's slot carries its messages.
    Sharded,
}

/// How the workers share the duty to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Strategy {
    /// One writer per stream among the live processes, fenced by the
    /// stream's writer record; the others keep copies as standbys and take
    /// over when it falls silent, stops receiving or gets stuck. Writes in
    /// publish order, keeps no key per message, and costs Redis the same
    /// whatever the number of workers. (`partitioned`, the name of the
    /// strategy it replaces, is taken for it.)
    #[default]
    #[value(alias = "partitioned")]
    Fenced,
    /// The design card's protocol: every worker races for every message's
    /// lock; the winner writes. Redis work per message grows with the workers.
    Race,
}

impl Strategy {
    /// The setting's value (`fenced`, `race`).
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Fenced => "fenced",
            Strategy::Race => "race",
        }
    }
}

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
    /// Seconds a presence key lives without a refresh (refreshed every third of it).
    #[arg(long, env = "PRESENCE_TTL", default_value = "5")]
    pub presence_ttl: String,
    /// How workers share the writing: `fenced` (one writer per stream, in
    /// publish order, no key per message; `partitioned` is taken for it) or
    /// `race` (every worker races for every message's lock). [default:
    /// fenced; on a cluster, race]
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
    /// 127.0.0.1:9100) [default: off].
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

/// IDLE_TIMEOUT, if set: seconds, at least 0.01.
pub fn parse_idle_timeout(raw: Option<&str>) -> Result<Option<Duration>, ConfigError> {
    match raw.map(str::trim).filter(|r| !r.is_empty()) {
        None => Ok(None),
        Some(raw) => parse_interval("IDLE_TIMEOUT", raw).map(Some),
    }
}

/// METRICS_ADDR, if set: a socket address.
pub fn parse_metrics_addr(raw: Option<&str>) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    match raw.map(str::trim).filter(|r| !r.is_empty()) {
        None => Ok(None),
        Some(raw) => raw.parse().map(Some).map_err(|_| {
            ConfigError::new(
                "METRICS_ADDR",
                raw,
                "expected host:port, e.g. 127.0.0.1:9100",
            )
        }),
    }
}

/// The dead-letter stream of `stream`: `<stream>:dead`, or on a cluster
/// one in the stream's slot (the write script touches both), see
/// [`slot_mate`].
pub fn default_dead_stream(stream: &str, cluster: bool) -> String {
    slot_mate(stream, ":dead", cluster)
}

/// `<key><suffix>`; on a cluster, a name in `key`'s slot: `{<key>}<suffix>`,
/// or, when `key` has a hash tag of its own (`{orders}:processed`), the
/// plain `<key><suffix>`, which keeps it.
pub fn slot_mate(key: &str, suffix: &str, cluster: bool) -> String {
    use redis::cluster_routing::Slot;
    let wrapped = format!("{{{key}}}{suffix}");
    if cluster && Slot::for_key(&wrapped) == Slot::for_key(key) {
        wrapped
    } else {
        format!("{key}{suffix}")
    }
}

/// On a cluster, `key` (the setting `var`) must share `stream`'s slot, since
/// one script touches both; the error suggests [`slot_mate`]`(stream, suffix)`.
pub(crate) fn require_slot_mate(
    var: &'static str,
    key: &str,
    stream: &str,
    suffix: &str,
) -> Result<(), ConfigError> {
    use redis::cluster_routing::Slot;
    if Slot::for_key(key) == Slot::for_key(stream) {
        return Ok(());
    }
    Err(ConfigError::new(
        var,
        key,
        format!(
            "on a cluster it must be in {stream}'s slot, e.g. {}",
            slot_mate(stream, suffix, true)
        ),
    ))
}

/// The validated settings of a bridge (`optimus consume`). Build one with
/// [`BridgeConfig::new`] and the setters, or from the command line.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    pub(crate) endpoint: Endpoint,
    pub(crate) consumers: usize,
    pub(crate) batch_size: usize,
    pub(crate) input_channel: String,
    pub(crate) output_stream: String,
    pub(crate) monitoring_interval: Duration,
    pub(crate) consumers_list: String,
    pub(crate) message_id_field: String,
    pub(crate) lock_ttl: Duration,
    pub(crate) takeover_after: Duration,
    pub(crate) pending_retention: Duration,
    pub(crate) ack_ttl: Duration,
    pub(crate) presence_ttl: Duration,
    pub(crate) output_format: OutputFormat,
    pub(crate) strategy: Strategy,
    /// MEMORY_LIMIT, in bytes.
    pub(crate) memory_limit: usize,
    /// DEDUP_WINDOW.
    pub(crate) dedup_window: Duration,
    pub(crate) max_payload_bytes: usize,
    /// `None`: `<OUTPUT_STREAM>:dead`.
    pub(crate) dead_letter_stream: Option<String>,
    /// ROUTES (empty: INPUT_CHANNEL=OUTPUT_STREAM).
    pub(crate) routes: Vec<Route>,
    /// STREAM_MAXLEN / STREAM_MAX_AGE.
    pub(crate) trim: Option<Trim>,
    /// How long a graceful stop may take before [`crate::Bridge::run`] gives
    /// up on what is left (SHUTDOWN_TIMEOUT).
    pub(crate) shutdown_timeout: Duration,
    /// Whether the periodic monitoring line is printed on stdout (the CLI does;
    /// an embedding service reads [`crate::Counters`] instead).
    pub(crate) print_monitor: bool,
}

/// Builder-style setters: `fn name(self, value) -> Self`; text settings take
/// anything that converts into a `String`.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty;)*) => {
        $( $(#[$doc])* pub fn $name(mut self, value: $ty) -> Self { self.$name = value; self } )*
    };
}

macro_rules! text_setters {
    ($($(#[$doc:meta])* $name:ident;)*) => {
        $( $(#[$doc])* pub fn $name(mut self, value: impl Into<String>) -> Self { self.$name = value.into(); self } )*
    };
}

impl BridgeConfig {
    /// The defaults of the system optimus replaces, against `redis_url`.
    pub fn new(redis_url: impl Into<String>) -> Self {
        Self {
            endpoint: Endpoint::new(redis_url),
            consumers: 2,
            batch_size: 100,
            input_channel: "messages:published".into(),
            output_stream: "messages:processed".into(),
            monitoring_interval: Duration::from_secs(3),
            consumers_list: "consumer:ids".into(),
            message_id_field: "message_id".into(),
            lock_ttl: Duration::from_secs(2),
            takeover_after: Duration::from_millis(250),
            pending_retention: Duration::from_secs(30),
            ack_ttl: Duration::from_secs(60),
            presence_ttl: Duration::from_secs(5),
            output_format: OutputFormat::Envelope,
            strategy: Strategy::Fenced,
            memory_limit: 256 << 20,
            dedup_window: Duration::from_secs(5),
            max_payload_bytes: 1 << 20,
            dead_letter_stream: None,
            print_monitor: false,
            routes: Vec::new(),
            trim: None,
            shutdown_timeout: Duration::from_secs(30),
        }
    }

    setters! {
        /// Workers in this process (CONSUMERS_COUNT).
        consumers: usize;
        /// Most messages per batch (PROCESSING_BATCH_SIZE).
        batch_size: usize;
        /// Time between monitoring lines (MONITORING_INTERVAL).
        monitoring_interval: Duration;
        /// Race: per-message lock lifetime, the takeover window (LOCK_TTL).
        lock_ttl: Duration;
        /// Fenced: how long a standby waits for a silent or deaf writer
        /// (TAKEOVER_AFTER).
        takeover_after: Duration;
        /// Race: how long a copy waits for another worker's ACK (PENDING_RETENTION).
        pending_retention: Duration;
        /// Race: ACK key lifetime (ACK_TTL).
        ack_ttl: Duration;
        /// Presence key lifetime (PRESENCE_TTL).
        presence_ttl: Duration;
        /// Stream entry layout (OUTPUT_FORMAT).
        output_format: OutputFormat;
        /// How workers share the writing (STRATEGY).
        strategy: Strategy;
        /// Memory for messages, in bytes (MEMORY_LIMIT).
        memory_limit: usize;
        /// Window for re-sent ids (DEDUP_WINDOW).
        dedup_window: Duration;
        /// Larger payloads are dead-lettered (MAX_PAYLOAD_BYTES).
        max_payload_bytes: usize;
        /// Print the monitoring line on stdout.
        print_monitor: bool;
        /// How long a graceful stop may take (SHUTDOWN_TIMEOUT).
        shutdown_timeout: Duration;
    }

    text_setters! {
        /// Channel to subscribe to (INPUT_CHANNEL).
        input_channel;
        /// Stream to write to (OUTPUT_STREAM).
        output_stream;
        /// Prefix of the presence keys (CONSUMERS_LIST).
        consumers_list;
        /// JSON field carrying the message id (MESSAGE_ID_FIELD).
        message_id_field;
    }

    /// The dead-letter stream (DEAD_LETTER_STREAM).
    pub fn dead_letter_stream(mut self, stream: impl Into<String>) -> Self {
        self.dead_letter_stream = Some(stream.into());
        self
    }

    /// Where rejected messages go: DEAD_LETTER_STREAM, or
    /// `<OUTPUT_STREAM>:dead` (`{<OUTPUT_STREAM>}:dead` on a cluster).
    pub fn dead_stream(&self) -> String {
        self.dead_letter_stream
            .clone()
            .unwrap_or_else(|| default_dead_stream(&self.output_stream, self.endpoint.is_cluster()))
    }

    /// The server, with credentials and certificates (see [`Endpoint`]). A
    /// cluster also sets the `race` strategy, the one that works there.
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        if endpoint.is_cluster() {
            self.strategy = Strategy::Race;
        }
        self.endpoint = endpoint;
        self
    }

    /// The server this bridge connects to.
    pub fn server(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Workers in this process.
    pub fn worker_count(&self) -> usize {
        self.consumers
    }

    /// The stream this bridge writes (with several routes: the one whose
    /// name tags the partitioned strategy's bookkeeping keys).
    pub fn stream(&self) -> &str {
        &self.output_stream
    }

    /// Adds a route (ROUTES): messages on `source` (a channel, or a pattern)
    /// go to `target` (a stream, or a template with `{channel}`). With any
    /// route, INPUT_CHANNEL and OUTPUT_STREAM are no longer a route.
    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// Caps every output stream (STREAM_MAXLEN, STREAM_MAX_AGE); a route's
    /// own cap wins.
    pub fn trim(mut self, trim: Option<Trim>) -> Self {
        self.trim = trim;
        self
    }

    /// The routes in effect: ROUTES, or INPUT_CHANNEL=OUTPUT_STREAM; each
    /// with its cap.
    pub fn effective_routes(&self) -> Vec<Route> {
        let routes = if self.routes.is_empty() {
            vec![Route::new(&self.input_channel, &self.output_stream)]
        } else {
            self.routes.clone()
        };
        routes
            .into_iter()
            .map(|r| Route {
                trim: r.trim.or(self.trim),
                ..r
            })
            .collect()
    }

    /// Checks every value and how they fit together. The error names the
    /// environment variable that carries the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.endpoint
            .check()
            .map_err(|e| ConfigError::new("REDIS_URL", &self.endpoint, e.to_string()))?;
        for (var, value, range) in [
            ("CONSUMERS_COUNT", self.consumers, limits::WORKERS),
            ("PROCESSING_BATCH_SIZE", self.batch_size, limits::BATCH),
            ("MEMORY_LIMIT", self.memory_limit, limits::MEMORY),
            (
                "MAX_PAYLOAD_BYTES",
                self.max_payload_bytes,
                limits::PAYLOAD_BYTES,
            ),
        ] {
            check_whole(var, value as u64, range)?;
        }
        if self.dead_stream() == self.output_stream {
            return Err(ConfigError::new(
                "DEAD_LETTER_STREAM",
                self.dead_stream(),
                "must differ from OUTPUT_STREAM",
            ));
        }
        for route in &self.routes {
            route.check("ROUTES")?;
        }
        let routes_var = if self.routes.is_empty() {
            "INPUT_CHANNEL"
        } else {
            "ROUTES"
        };
        for route in &self.effective_routes() {
            if route.pattern && self.endpoint.is_sharded() {
                return Err(ConfigError::new(
                    routes_var,
                    route,
                    "sharded Pub/Sub has no patterns (there is no SPSUBSCRIBE): use PUBSUB_MODE=classic",
                ));
            }
        }
        if self.endpoint.is_cluster()
            && let Some(dead) = &self.dead_letter_stream
            && self.routes.iter().any(|r| {
                r.is_template()
                    || redis::cluster_routing::Slot::for_key(&r.target)
                        != redis::cluster_routing::Slot::for_key(dead)
            })
        {
            return Err(ConfigError::new(
                "DEAD_LETTER_STREAM",
                dead,
                "on a cluster with several streams, leave it unset: each stream gets {<stream>}:dead in its own slot",
            ));
        }
        if self.endpoint.is_cluster() {
            require_slot_mate(
                "DEAD_LETTER_STREAM",
                &self.dead_stream(),
                &self.output_stream,
                ":dead",
            )?;
            if self.strategy == Strategy::Fenced {
                return Err(ConfigError::new(
                    "STRATEGY",
                    "fenced",
                    "needs one server's order of marks and messages; on a cluster use race (the default there)",
                ));
            }
        } else if self.endpoint.is_sharded() {
            return Err(ConfigError::new(
                "PUBSUB_MODE",
                "sharded",
                "sharded Pub/Sub needs a cluster (REDIS_CLUSTER=1)",
            ));
        }
        for (var, value) in [
            ("INPUT_CHANNEL", &self.input_channel),
            ("OUTPUT_STREAM", &self.output_stream),
            ("CONSUMERS_LIST", &self.consumers_list),
            ("MESSAGE_ID_FIELD", &self.message_id_field),
        ] {
            if value.is_empty() {
                return Err(ConfigError::new(var, value, "must not be empty"));
            }
        }
        // The lock and ACK keys use `{OUTPUT_STREAM}` as their hash tag, so the
        // stream name itself must not contain braces.
        if self.output_stream.contains(['{', '}']) {
            return Err(ConfigError::new(
                "OUTPUT_STREAM",
                &self.output_stream,
                "must not contain '{' or '}'",
            ));
        }
        for (var, value) in [
            ("MONITORING_INTERVAL", self.monitoring_interval),
            ("LOCK_TTL", self.lock_ttl),
            ("TAKEOVER_AFTER", self.takeover_after),
            ("PENDING_RETENTION", self.pending_retention),
            ("ACK_TTL", self.ack_ttl),
            ("PRESENCE_TTL", self.presence_ttl),
            ("SHUTDOWN_TIMEOUT", self.shutdown_timeout),
        ] {
            check_seconds(var, value, limits::SECONDS)?;
        }
        if self.takeover_after < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "TAKEOVER_AFTER",
                secs(self.takeover_after),
                "must be at least 0.1 seconds (two cycles of the pool)",
            ));
        }
        if self.pending_retention < self.lock_ttl {
            return Err(ConfigError::new(
                "PENDING_RETENTION",
                secs(self.pending_retention),
                format!(
                    "must be at least LOCK_TTL ({}), or a crashed worker's messages are dropped before they can be taken over",
                    secs(self.lock_ttl)
                ),
            ));
        }
        let needed = self.pending_retention + self.lock_ttl;
        if self.ack_ttl <= needed {
            return Err(ConfigError::new(
                "ACK_TTL",
                secs(self.ack_ttl),
                format!(
                    "must be longer than PENDING_RETENTION + LOCK_TTL ({}), or a copy still waiting could write a message twice",
                    secs(needed)
                ),
            ));
        }
        Ok(())
    }
}

/// One of a setting's named values (any case), or one line naming them.
fn parse_choice<T: ValueEnum>(var: &'static str, raw: &str) -> Result<T, ConfigError> {
    T::from_str(raw.trim(), true).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|v| v.get_name().to_string())
            .collect();
        ConfigError::new(var, raw, format!("expected one of {}", names.join(", ")))
    })
}

impl ConsumeArgs {
    /// Turns the raw settings into a validated [`BridgeConfig`].
    pub fn to_config(&self, connect: &ConnectArgs) -> Result<BridgeConfig, ConfigError> {
        let endpoint = connect.endpoint()?;
        let config = BridgeConfig {
            endpoint: endpoint.clone(),
            consumers: parse_whole("CONSUMERS_COUNT", &self.consumers_count, limits::WORKERS)?,
            batch_size: parse_whole(
                "PROCESSING_BATCH_SIZE",
                &self.processing_batch_size,
                limits::BATCH,
            )?,
            input_channel: self.input_channel.clone(),
            output_stream: self.output_stream.clone(),
            monitoring_interval: parse_interval("MONITORING_INTERVAL", &self.monitoring_interval)?,
            consumers_list: self.consumers_list.clone(),
            message_id_field: self.message_id_field.clone(),
            lock_ttl: parse_interval("LOCK_TTL", &self.lock_ttl)?,
            takeover_after: parse_interval("TAKEOVER_AFTER", &self.takeover_after)?,
            pending_retention: parse_interval("PENDING_RETENTION", &self.pending_retention)?,
            ack_ttl: parse_interval("ACK_TTL", &self.ack_ttl)?,
            presence_ttl: parse_interval("PRESENCE_TTL", &self.presence_ttl)?,
            output_format: parse_choice("OUTPUT_FORMAT", &self.output_format)?,
            strategy: match &self.strategy {
                Some(raw) => parse_choice("STRATEGY", raw)?,
                None if endpoint.is_cluster() => Strategy::Race,
                None => Strategy::Fenced,
            },
            memory_limit: parse_bytes("MEMORY_LIMIT", &self.memory_limit, limits::MEMORY)? as usize,
            dedup_window: parse_seconds("DEDUP_WINDOW", &self.dedup_window, 0.0..=3600.0)?,
            max_payload_bytes: parse_whole(
                "MAX_PAYLOAD_BYTES",
                &self.max_payload_bytes,
                limits::PAYLOAD_BYTES,
            )?,
            dead_letter_stream: self.dead_letter_stream.clone(),
            print_monitor: true,
            routes: Vec::new(),
            trim: None,
            shutdown_timeout: parse_interval("SHUTDOWN_TIMEOUT", &self.shutdown_timeout)?,
        };
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
            config.routes = crate::bridge::route::parse_routes(raw, exact)?;
        }
        config.validate()?;
        Ok(config)
    }
}

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

/// How long `optimus publish` goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishLimit {
    /// Until this much time has passed.
    Duration(Duration),
    /// Until exactly this many messages are sent.
    Count(u64),
}

/// When batches go out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// A random pause between `min` and `max` after each batch (the old publisher's way).
    Pauses { min: Duration, max: Duration },
    /// A steady number of messages per second.
    Rate(f64),
}

/// The validated settings of `optimus publish`.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    pub endpoint: Endpoint,
    pub channel: String,
    pub limit: PublishLimit,
    pub batch_size: usize,
    pub pace: Pace,
    pub payload_size: usize,
    pub progress_interval: Option<Duration>,
    /// The bridge's output stream (OUTPUT_STREAM): where the fast path
    /// writes a message published while no bridge worker was subscribed.
    pub stream: String,
    /// Whether it does (otherwise such a message is lost, and counted).
    pub fast_path: bool,
    /// DEAD_LETTER_STREAM (`None`: each stream's `<stream>:dead`): where
    /// payloads larger than `max_payload_bytes` go instead of the channel,
    /// and what a stream refuses.
    pub dead_letter_stream: Option<String>,
    /// The bridge's ROUTES (empty: `channel` to `stream`).
    pub routes: Vec<Route>,
    /// MESSAGE_ID_FIELD: the JSON field that carries a message's id.
    pub id_field: String,
    /// MAX_PAYLOAD_BYTES.
    pub max_payload_bytes: usize,
    /// Lifetime of the fast path's ACK keys.
    pub ack_ttl: Duration,
    /// How long a batch Redis did not confirm is retried before it is given up.
    pub retry_for: Duration,
    /// The bridge's DEDUP_WINDOW (see `--dedup-window`).
    pub dedup_window: Duration,
}

impl PublishConfig {
    /// `count` messages on `channel` as fast as possible, no progress lines;
    /// messages that reach no subscriber go straight to `messages:processed`.
    pub fn new(redis_url: impl Into<String>, channel: impl Into<String>, count: u64) -> Self {
        Self {
            endpoint: Endpoint::new(redis_url),
            channel: channel.into(),
            limit: PublishLimit::Count(count),
            batch_size: 1000,
            pace: Pace::Rate(f64::INFINITY),
            payload_size: 0,
            progress_interval: None,
            stream: "messages:processed".into(),
            fast_path: true,
            dead_letter_stream: None,
            routes: Vec::new(),
            id_field: "message_id".into(),
            max_payload_bytes: 1 << 20,
            ack_ttl: Duration::from_secs(60),
            retry_for: Duration::from_secs(30),
            dedup_window: Duration::from_secs(5),
        }
    }
}

impl PublishConfig {
    /// The routes that read `channel`: those of ROUTES whose channel is it or
    /// whose pattern matches it (in ROUTES order), or without ROUTES the one
    /// route `channel` to `stream`.
    pub fn routes_for_channel(&self) -> Vec<Route> {
        if self.routes.is_empty() {
            return vec![Route::new(&self.channel, &self.stream)];
        }
        self.routes
            .iter()
            .filter(|r| r.matches(&self.channel))
            .cloned()
            .collect()
    }

    /// The dead-letter stream of `stream`.
    pub fn dead_stream_of(&self, stream: &str) -> String {
        self.dead_letter_stream
            .clone()
            .unwrap_or_else(|| default_dead_stream(stream, self.endpoint.is_cluster()))
    }
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
        let routes = match given(&self.routes) {
            Some(raw) => crate::bridge::route::parse_routes(raw, false)?,
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
        })
    }
}

/// The range of each bounded setting: the CLI's parsing and
/// [`BridgeConfig::validate`] both check against these, so every bad value
/// gets the same one-line reason.
pub mod limits {
    use std::ops::RangeInclusive;

    /// Workers (subscriptions) in one process: CONSUMERS_COUNT, WORK_CONSUMERS.
    pub const WORKERS: RangeInclusive<u64> = 1..=256;
    /// The total set by `optimus ctl scale` (0 needs `--yes`).
    pub const TOTAL_WORKERS: RangeInclusive<u64> = 0..=1024;
    /// PROCESSING_BATCH_SIZE.
    pub const BATCH: RangeInclusive<u64> = 1..=10_000;
    /// MEMORY_LIMIT: from 8 MiB to 64 GiB.
    pub const MEMORY: RangeInclusive<u64> = 8 << 20..=64 << 30;
    /// MAX_PAYLOAD_BYTES: at most half the server's default Pub/Sub
    /// output-buffer hard limit (32 MB), past which one message drops every
    /// subscriber at once.
    pub const PAYLOAD_BYTES: RangeInclusive<u64> = 1..=16 << 20;
    /// TCP ports.
    pub const PORT: RangeInclusive<u64> = 1..=65_535;
    /// Seconds of intervals, TTLs and timeouts: from 10 ms to a day.
    pub const SECONDS: RangeInclusive<f64> = 0.01..=86_400.0;
}

/// A count given on the command line (`flag`), within `range`: as
/// [`parse_whole`], for the binary's own flags.
pub fn parse_count(
    flag: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    parse_whole(flag, raw, range)
}

/// A whole number within `range`; anything else is one line naming the range.
pub(crate) fn parse_whole<T: TryFrom<u64>>(
    var: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<T, ConfigError> {
    let bad = || {
        ConfigError::new(
            var,
            raw,
            format!(
                "expected a whole number from {} to {}",
                range.start(),
                range.end()
            ),
        )
    };
    let n: i128 = raw.trim().parse().map_err(|_| bad())?;
    let n = u64::try_from(n)
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(bad)?;
    T::try_from(n).map_err(|_| bad())
}

/// A size in bytes within `range`: a whole number, or one with a unit
/// (`KiB`, `MiB`, `GiB`, or `K`, `M`, `G`, `KB`, `MB`, `GB`, all powers of
/// 1024); anything else is one line naming the range.
pub(crate) fn parse_bytes(
    var: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    let bad = || {
        ConfigError::new(
            var,
            raw,
            format!(
                "expected a size from {} to {} (bytes, or with KiB, MiB, GiB), like 256MiB",
                show_bytes(*range.start()),
                show_bytes(*range.end())
            ),
        )
    };
    let text = raw.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    number
        .checked_mul(scale)
        .filter(|n| range.contains(n))
        .ok_or_else(bad)
}

/// A size as a person writes it: 8MiB, 64GiB, 1000 bytes.
fn show_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

/// A count already parsed (a library setting) checked against `range`, with
/// the same words as [`parse_whole`].
pub(crate) fn check_whole(
    var: &'static str,
    value: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<(), ConfigError> {
    parse_whole::<u64>(var, &value.to_string(), range).map(drop)
}

/// Seconds (fractions allowed) within `range`; anything else is one line
/// naming the range.
pub(crate) fn parse_seconds(
    var: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<f64>,
) -> Result<Duration, ConfigError> {
    let value: f64 = raw.trim().parse().unwrap_or(f64::NAN);
    if !range.contains(&value) {
        return Err(ConfigError::new(
            var,
            raw,
            format!(
                "expected seconds from {} to {}, like 3 or 0.5",
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(Duration::from_secs_f64(value))
}

/// A duration already set (a library setting) checked against `range`, with
/// the same words as [`parse_seconds`].
pub(crate) fn check_seconds(
    var: &'static str,
    value: Duration,
    range: std::ops::RangeInclusive<f64>,
) -> Result<(), ConfigError> {
    parse_seconds(var, &value.as_secs_f64().to_string(), range).map(drop)
}

/// Seconds from 0.01 to a day: the range of most intervals and TTLs.
pub(crate) fn parse_interval(var: &'static str, raw: &str) -> Result<Duration, ConfigError> {
    parse_seconds(var, raw, limits::SECONDS)
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

/// `url` with any password replaced by `***`, for logs and errors.
pub fn mask_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let masked = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => "***".to_string(),
    };
    format!("{}{}{}", &url[..scheme_end + 3], masked, &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_mates_share_the_slot_on_a_cluster() {
        use redis::cluster_routing::Slot;
        for key in ["messages:processed", "{orders}:processed", "a{b", "x{y}z"] {
            let mate = slot_mate(key, ":dead", true);
            assert_eq!(
                Slot::for_key(&mate),
                Slot::for_key(key),
                "{mate} is not in {key}'s slot"
            );
            assert!(mate.ends_with(":dead"), "{mate}");
        }
        assert_eq!(slot_mate("s", ":dead", true), "{s}:dead");
        assert_eq!(slot_mate("{o}:s", ":dead", true), "{o}:s:dead");
        assert_eq!(slot_mate("s", ":dead", false), "s:dead");
    }

    #[test]
    fn masks_passwords_in_urls() {
        assert_eq!(
            mask_password("redis://user:secret@host:1/0"),
            "redis://user:***@host:1/0"
        );
        assert_eq!(mask_password("redis://:secret@host"), "redis://:***@host");
        assert_eq!(mask_password("redis://host:6379"), "redis://host:6379");
        assert_eq!(mask_password("unix:///tmp/r.sock"), "unix:///tmp/r.sock");
    }

    #[test]
    fn old_log_level_names_are_accepted() {
        assert_eq!(parse_log_level("WARNING").unwrap(), tracing::Level::WARN);
        assert_eq!(parse_log_level("critical").unwrap(), tracing::Level::ERROR);
        assert_eq!(parse_log_level("DEBUG").unwrap(), tracing::Level::DEBUG);
        assert_eq!(parse_log_level("LOUD").unwrap_err().var, "LOGLEVEL");
    }

    #[test]
    fn ack_ttl_must_outlive_retention_and_lock() {
        let config = BridgeConfig::new("redis://localhost")
            .pending_retention(Duration::from_secs(30))
            .lock_ttl(Duration::from_secs(2))
            .ack_ttl(Duration::from_secs(31));
        assert_eq!(config.validate().unwrap_err().var, "ACK_TTL");
        let config = config.ack_ttl(Duration::from_secs(33));
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn a_long_takeover_needs_no_race_setting_raised() {
        let config = BridgeConfig::new("redis://localhost").takeover_after(Duration::from_secs(20));
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn defaults_are_valid() {
        BridgeConfig::new("redis://localhost").validate().unwrap();
    }
}
