//! `optimus publish`'s typed settings: [`PublishConfig`], built with
//! [`PublishConfig::new`] (embedding) or from its flags (`src/cli/publish.rs`).

use std::time::Duration;

use crate::bridge::route::Route;
use crate::connect::Endpoint;

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
    /// MIN_REPLICAS_ACKED: a part counts as sent only once this many
    /// replicas hold it (WAIT); otherwise it is sent again, as one Redis did
    /// not confirm (0: off).
    pub min_replicas_acked: usize,
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
            min_replicas_acked: 0,
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
}
