//! optimus: a durable bridge from Redis Pub/Sub to a Redis Stream.
//!
//! A pool of workers all subscribe to one channel; per-message locks and ACK
//! keys in Redis decide which worker writes each message to the stream, so
//! that while at least one worker is subscribed and alive every message lands
//! in the stream exactly once. See the README for the protocol.
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

pub mod audit;
pub mod bench;
pub mod bridge;
pub mod config;
pub mod connect;
pub mod control;
pub mod health;
pub mod manage;
pub mod metrics;
pub mod monitor;
pub mod publish;
pub mod work;

pub use bridge::{Bridge, BridgeError};
pub use config::{BridgeConfig, ConfigError, OutputFormat, PublishConfig, Strategy};
pub use monitor::{Counters, Snapshot};
pub use publish::{PublishError, PublishSummary, Publisher};
