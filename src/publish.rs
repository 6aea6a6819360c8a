//! `optimus publish`: timed batches of test messages on the input channel.
//!
//! Each message is `{"message_id":"<uuid v4>","seq":<n>,"sent_ms":<unix ms>}`
//! (padded with a `"pad"` field to `--payload-size` bytes when asked). Each
//! batch is one pipelined round trip; PUBLISH's reply says how many
//! subscribers got the message, and the ones that reached nobody are counted.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngExt;
use redis::RedisError;
use tokio_util::sync::CancellationToken;

use crate::config::{Pace, PublishConfig, PublishLimit, mask_password};

/// What a publisher run did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PublishSummary {
    /// Messages the server accepted.
    pub published: u64,
    /// Of those, how many reached no subscriber (PUBLISH returned 0).
    pub no_subscriber: u64,
    /// Time from the first batch to the last reply.
    pub elapsed: Duration,
}

impl PublishSummary {
    pub fn rate(&self) -> f64 {
        self.published as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for PublishSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "published={} no_subscriber={} elapsed={:.2}s rate={:.0}/s",
            self.published,
            self.no_subscriber,
            self.elapsed.as_secs_f64(),
            self.rate()
        )
    }
}

/// Publishing stopped on a Redis error; `summary` says what went out before.
#[derive(Debug, thiserror::Error)]
#[error("cannot publish to {server}: {source}")]
pub struct PublishError {
    pub server: String,
    pub source: RedisError,
    pub summary: PublishSummary,
}

/// Builds the JSON of message number `seq`.
pub fn test_message(seq: u64, payload_size: usize) -> String {
    let sent_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut json = format!(
        r#"{{"message_id":"{}","seq":{seq},"sent_ms":{sent_ms}"#,
        uuid::Uuid::new_v4()
    );
    // `,"pad":""}` adds 10 bytes.
    if payload_size > json.len() + 10 {
        let pad = payload_size - json.len() - 10;
        json.push_str(r#","pad":""#);
        json.extend(std::iter::repeat_n('x', pad));
        json.push('"');
    }
    json.push('}');
    json
}

/// Publishes until the limit is reached or `shutdown` is cancelled.
pub async fn run(
    config: &PublishConfig,
    shutdown: CancellationToken,
) -> Result<PublishSummary, PublishError> {
    let server = mask_password(&config.redis_url);
    let mut summary = PublishSummary::default();
    let fail = |source, summary| PublishError {
        server: server.clone(),
        source,
        summary,
    };
    let client = redis::Client::open(config.redis_url.as_str()).map_err(|e| fail(e, summary))?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| fail(e, summary))?;

    let start = Instant::now();
    let mut last_progress = (start, 0u64);
    let mut rng = rand::rng();
    loop {
        let elapsed = start.elapsed();
        let remaining = match config.limit {
            PublishLimit::Count(n) => n - summary.published,
            PublishLimit::Duration(d) if elapsed >= d => 0,
            PublishLimit::Duration(_) => u64::MAX,
        };
        if remaining == 0 || shutdown.is_cancelled() {
            break;
        }
        let mut n = remaining.min(config.batch_size as u64);
        if let Pace::Rate(rate) = config.pace
            && rate.is_finite()
        {
            let owed =
                ((elapsed.as_secs_f64() * rate) as u64 + 1).saturating_sub(summary.published);
            if owed == 0 {
                let next = start + Duration::from_secs_f64((summary.published + 1) as f64 / rate);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep_until(next.into()) => continue,
                }
            }
            n = n.min(owed);
        }

        let mut pipe = redis::pipe();
        for i in 0..n {
            pipe.publish(
                &config.channel,
                test_message(summary.published + i, config.payload_size),
            );
        }
        let receivers: Vec<u64> = pipe.query_async(&mut conn).await.map_err(|e| {
            fail(
                e,
                PublishSummary {
                    elapsed: start.elapsed(),
                    ..summary
                },
            )
        })?;
        summary.published += n;
        summary.no_subscriber += receivers.iter().filter(|r| **r == 0).count() as u64;
        summary.elapsed = start.elapsed();

        if let Some(every) = config.progress_interval
            && last_progress.0.elapsed() >= every
        {
            let dt = last_progress.0.elapsed().as_secs_f64();
            println!(
                "publish sent={} no_subscriber={} rate={:.0}/s",
                summary.published,
                summary.no_subscriber,
                (summary.published - last_progress.1) as f64 / dt
            );
            last_progress = (Instant::now(), summary.published);
        }

        if let Pace::Pauses { min, max } = config.pace {
            let pause = if max > min {
                rng.random_range(min..=max)
            } else {
                min
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
    summary.elapsed = start.elapsed();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_messages_carry_a_unique_id_and_sequence() {
        let a: serde_json::Value = serde_json::from_str(&test_message(7, 0)).unwrap();
        let b: serde_json::Value = serde_json::from_str(&test_message(8, 0)).unwrap();
        assert_eq!(a["seq"], 7);
        assert_ne!(a["message_id"], b["message_id"]);
        assert_eq!(a["message_id"].as_str().unwrap().len(), 36);
    }

    #[test]
    fn padding_reaches_the_asked_size() {
        assert_eq!(test_message(1, 300).len(), 300);
        assert!(test_message(1, 10).len() > 10); // never truncated
    }
}
