//! optimus: a durable bridge from Redis Pub/Sub to a Redis Stream.
//!
//! A pool of workers all subscribe to one channel. By default one process
//! at a time writes each stream, fenced by the stream's writer record in
//! Redis, in publish order, while the others keep copies and take over when
//! it falls silent (STRATEGY=race: every worker races per-message locks and
//! ACK keys instead). While at least one worker is subscribed and alive every
//! message lands in its stream exactly once. See `docs/protocol.md`.
//!
//! Embedding the bridge in a service:
//!
//! ```no_run
//! use optimus::{Bridge, BridgeConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let bridge = Bridge::new(
//!     BridgeConfig::new("redis://127.0.0.1:6379")
//!         .input_channel("orders")
//!         .output_stream("orders:stream")
//!         .consumers(2),
//! )?;
//! let counters = bridge.counters(); // live counters, e.g. for metrics
//! let shutdown = CancellationToken::new();
//! let run = tokio::spawn(bridge.run(shutdown.clone()));
//! // ... later:
//! shutdown.cancel();
//! let totals = run.await??;
//! assert_eq!(totals.written, counters.snapshot().written);
//! # Ok(()) }
//! ```

// The commands' library parts, each usable by an embedding service as the
// binary (`src/main.rs`, `src/cli/`) uses it: a downstream worker, health
// checks, stream and group management, the control plane, the audit, the
// metrics endpoint, the publisher.
pub mod audit;
pub mod control;
pub mod health;
pub mod manage;
pub mod metrics;
pub mod publish;
pub mod work;

// Support the binary needs (the settings' parsers, connection helpers, key
// names, the monitoring line): public for it, not part of the embedding API,
// whose types from them are re-exported below.
#[doc(hidden)]
pub mod connect;
#[doc(hidden)]
pub mod keys;
#[doc(hidden)]
pub mod monitor;
#[doc(hidden)]
pub mod settings;

mod presence;
mod scripts;

// The bridge and its delivery protocol: private, reached through the types
// below.
mod bridge;

pub use bridge::config::{BridgeConfig, DEFAULT_CONSUMERS, DEFAULT_STANDBYS};
pub use bridge::delivery::handoff::hand_over;
pub use bridge::delivery::{Cap, Trim};
pub use bridge::delivery::{OutputFormat, Pool, PubSubMode, Strategy};
pub use bridge::route::{Route, parse_routes};
pub use bridge::{Bridge, BridgeError, host_name};
pub use connect::{Conn, Endpoint, TlsFiles, mask_password};
pub use monitor::{Counters, Snapshot};
pub use publish::{Pace, PublishConfig, PublishError, PublishLimit, PublishSummary, Publisher};
pub use settings::ConfigError;
