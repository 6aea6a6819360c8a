//! Connecting to Redis, and the one function that decides whether a Redis
//! error is worth retrying.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ErrorKind, RedisError};
use tokio_util::sync::CancellationToken;

use crate::config::mask_password;

/// An error retrying cannot mend: the credentials or the permissions are
/// wrong. Everything else (refused connections, dropped connections, a
/// loading or paused server, timeouts, out-of-memory) is retried with backoff.
pub fn is_fatal(err: &RedisError) -> bool {
    err.kind() == ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
}

/// The backoff between reconnection attempts: exponential from 100 ms to 5 s,
/// with jitter so that many workers do not knock at once, never giving up.
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// How long one command may take before it counts as failed. Long enough
/// for a `CLIENT PAUSE` of a few seconds to pass without errors.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A command connection that reconnects by itself, waiting until Redis is
/// reachable. Returns `Ok(None)` when cancelled first, and an error only when
/// it is [`is_fatal`].
pub async fn connection_manager(
    client: &Client,
    cancel: &CancellationToken,
) -> Result<Option<ConnectionManager>, RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_max_delay(Duration::from_secs(5))
        .set_number_of_retries(1);
    retry_until_connected(client, cancel, || {
        ConnectionManager::new_with_config(client.clone(), config.clone())
    })
    .await
}

/// Calls `connect` until it succeeds, backing off and saying so on stderr
/// while Redis is unreachable.
pub async fn retry_until_connected<T, F, Fut>(
    client: &Client,
    cancel: &CancellationToken,
    mut connect: F,
) -> Result<Option<T>, RedisError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RedisError>>,
{
    let mut backoff = reconnect_backoff();
    loop {
        let err = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            result = connect() => match result {
                Ok(conn) => return Ok(Some(conn)),
                Err(err) => err,
            },
        };
        if is_fatal(&err) {
            return Err(err);
        }
        let wait = backoff.next().unwrap_or(Duration::from_secs(5));
        tracing::warn!(
            server = %mask_password(&client.get_connection_info().addr().to_string()),
            cause = %err,
            retry_in_ms = wait.as_millis() as u64,
            "Redis unreachable, retrying"
        );
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
