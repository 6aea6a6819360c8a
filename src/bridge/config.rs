//! The bridge's typed settings: [`BridgeConfig`], built with its setters
//! (embedding) or from `optimus consume`'s variables (`src/cli/consume.rs`),
//! and checked as a whole by [`BridgeConfig::validate`].

use std::time::Duration;

use super::delivery::{OutputFormat, Strategy, Trim};
use super::route::Route;
use crate::connect::Endpoint;
use crate::keys::{default_dead_stream, require_slot_mate};
use crate::settings::{ConfigError, check_seconds, check_whole, limits, secs};

/// CONSUMERS_COUNT's default: workers in one bridge process.
pub const DEFAULT_CONSUMERS: &str = "2";
/// STANDBYS' default: processes besides the writer that hold copies.
pub const DEFAULT_STANDBYS: usize = 2;

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
    /// MIN_REPLICAS_ACKED (0: off).
    pub(crate) min_replicas_acked: usize,
    /// STANDBYS: how many processes besides the writer hold copies
    /// (`None`: every process).
    pub(crate) standbys: Option<usize>,
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
            min_replicas_acked: 0,
            standbys: Some(DEFAULT_STANDBYS),
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
        /// Replicas that must hold a write before standbys drop their
        /// copies of it (MIN_REPLICAS_ACKED; 0: off; fenced only).
        min_replicas_acked: usize;
        /// How many processes besides the writer hold copies (STANDBYS;
        /// `None`: every process; fenced only).
        standbys: Option<usize>;
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

    /// Every route (ROUTES), replacing INPUT_CHANNEL -> OUTPUT_STREAM.
    pub fn routes(mut self, routes: Vec<Route>) -> Self {
        self.routes = routes;
        self
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
    /// cluster with classic Pub/Sub also sets the `race` strategy, the one
    /// that works there (fenced needs sharded Pub/Sub on a cluster).
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        if endpoint.is_cluster() && !endpoint.is_sharded() {
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
        self.check_sizes()?;
        self.check_routes()?;
        self.check_names()?;
        self.check_times()
    }

    /// Counts and sizes within their limits.
    fn check_sizes(&self) -> Result<(), ConfigError> {
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
        if let Some(standbys) = self.standbys {
            check_whole("STANDBYS", standbys as u64, limits::STANDBYS)?;
        }
        check_whole(
            "MIN_REPLICAS_ACKED",
            self.min_replicas_acked as u64,
            limits::REPLICAS,
        )?;
        if self.min_replicas_acked > 0 && self.strategy != Strategy::Fenced {
            return Err(ConfigError::new(
                "MIN_REPLICAS_ACKED",
                self.min_replicas_acked,
                "is kept by the fenced strategy only (STRATEGY=fenced; on a cluster, PUBSUB_MODE=sharded)",
            ));
        }
        Ok(())
    }

    /// The streams and routes, and what the server's kind (one server, a
    /// cluster, sharded Pub/Sub) allows of them.
    fn check_routes(&self) -> Result<(), ConfigError> {
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
                self.check_fenced_on_cluster(routes_var)?;
            }
        } else if self.endpoint.is_sharded() {
            return Err(ConfigError::new(
                "PUBSUB_MODE",
                "sharded",
                "sharded Pub/Sub needs a cluster (REDIS_CLUSTER=1)",
            ));
        }
        Ok(())
    }

    /// The fenced core on a cluster reads every channel on the node of one
    /// slot, where its marks are (see `keys::Pool::sharded`).
    fn check_fenced_on_cluster(&self, routes_var: &'static str) -> Result<(), ConfigError> {
        use redis::cluster_routing::Slot;
        if !self.endpoint.is_sharded() {
            return Err(ConfigError::new(
                "STRATEGY",
                "fenced",
                "on a cluster it needs PUBSUB_MODE=sharded (one node orders the pool's marks among the messages); with classic Pub/Sub use race (the default there)",
            ));
        }
        let routes = self.effective_routes();
        if let Some(first) = routes.first()
            && let Some(apart) = routes
                .iter()
                .find(|r| Slot::for_key(&r.source) != Slot::for_key(&first.source))
        {
            return Err(ConfigError::new(
                routes_var,
                apart,
                format!(
                    "with STRATEGY=fenced on a cluster every channel must share one slot (one node orders them with the pool's marks): give them one hash tag, e.g. {{orders}}:in, or run one pool per channel; {} and {} do not",
                    first.source, apart.source
                ),
            ));
        }
        Ok(())
    }

    /// Names that must not be empty, and the stream's name usable in keys.
    fn check_names(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// Durations within their limits, and those that must fit each other.
    fn check_times(&self) -> Result<(), ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
