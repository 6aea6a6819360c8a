//! A service that runs the bridge inside itself, with its own settings, and
//! reports its counters every few seconds until Ctrl-C.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example embed
//! ```

use std::time::Duration;

use optimus::{Bridge, BridgeConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let bridge = Bridge::new(
        BridgeConfig::new(url)
            .input_channel("orders")
            .output_stream("orders:stream")
            .consumers(2),
    )?;
    let counters = bridge.counters();
    let shutdown = CancellationToken::new();

    // Ctrl-C stops the bridge gracefully.
    let on_ctrl_c = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_ctrl_c.cancel();
    });
    // The service reads the counters however it likes.
    let report = shutdown.clone();
    tokio::spawn(async move {
        while !report.is_cancelled() {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let c = counters.snapshot();
            eprintln!("orders bridged: {} (pending {})", c.written, c.pending);
        }
    });

    let totals = bridge.run(shutdown).await?;
    eprintln!("stopped after writing {} orders", totals.written);
    Ok(())
}
