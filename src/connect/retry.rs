//! Which Redis errors retrying cannot mend ([`is_fatal`]), how they are told
//! to a user ([`explain`], [`brief`]), and the one back-off loop every
//! reconnecting part of optimus uses ([`retry_until`]).

use std::fmt;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use redis::aio::ConnectionLike;
use redis::{ErrorKind, RedisError};
use tokio_util::sync::CancellationToken;

/// An error retrying cannot mend: the credentials or the permissions are
/// wrong (also inside a pipeline's replies), TLS failed (a certificate not
/// trusted or not accepted, a server that does not speak TLS), the peer does
/// not speak the Redis protocol, the database does not exist, or the client
/// settings cannot work. Everything else (refused connections, dropped
/// connections, a loading or paused server, timeouts, out-of-memory) is
/// retried with backoff.
pub fn is_fatal(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::AuthenticationFailed
            | ErrorKind::Parse
            | ErrorKind::InvalidClientConfig
            | ErrorKind::RESP3NotSupported
    ) || has_code(err, |code| {
        matches!(code, "NOAUTH" | "WRONGPASS" | "NOPERM")
    }) || err.detail().is_some_and(|d| {
        // A server that wants a password refuses long commands from a
        // client that gave none, with this protocol error.
        d.contains("DB index is out of range") || d.contains("Protocol error: unauthenticated")
    }) || tls_failure(err).is_some()
}

/// Whether the server's error (or one of a pipeline's) has a code `is`
/// takes.
pub fn has_code(err: &RedisError, is: impl Fn(&str) -> bool) -> bool {
    err.code().is_some_and(&is)
        || err
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| is(e.code())))
}

/// Longest error text a log line or an error line carries.
const MAX_ERROR_TEXT: usize = 240;

/// `err` as a user should read it, on one short line: a TLS failure says so,
/// and what to check; a peer that is not Redis, or a missing database, says
/// so; a pipeline's failures are shown by their first one.
pub fn explain(err: &RedisError) -> String {
    let text = match tls_failure(err) {
        Some(tls) => explain_tls(tls),
        None if err.kind() == ErrorKind::Parse => format!(
            "the server's reply is not the Redis protocol: is this a Redis port? ({err})"
        ),
        None if err.detail().is_some_and(|d| d.contains("DB index is out of range")) => {
            "no such database on that server (the number after the host in REDIS_URL is beyond its `databases` setting)".to_string()
        }
        None if err.kind() == ErrorKind::AuthenticationFailed => {
            "authentication failed: the server refused the user or password (check REDIS_USERNAME and REDIS_PASSWORD, or REDIS_PASSWORD_FILE, or those in REDIS_URL)".to_string()
        }
        None if err.kind() == ErrorKind::InvalidClientConfig && err.detail().is_some() => {
            err.detail().unwrap_or_default().to_string()
        }
        None => match err.clone().into_server_errors() {
            Some(errors) if !errors.is_empty() => {
                let (_, first) = &errors[0];
                let more = match errors.len() - 1 {
                    0 => String::new(),
                    n => format!(" (and {n} more replies of the pipeline)"),
                };
                let hint = match first.code() {
                    "NOAUTH" => " (set REDIS_PASSWORD or REDIS_PASSWORD_FILE, or give it in REDIS_URL: redis://[user]:password@host)",
                    "WRONGPASS" => " (check REDIS_USERNAME and REDIS_PASSWORD, or those in REDIS_URL)",
                    _ => "",
                };
                format!("{} {}{hint}{more}", first.code(), first.details().unwrap_or(""))
            }
            _ => err.to_string(),
        },
    };
    short(&text)
}

/// `text` on one line, at most [`MAX_ERROR_TEXT`] characters.
fn short(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(MAX_ERROR_TEXT) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// A Redis error for a log field: [`explain`]ed, so one short line.
pub fn brief(err: &RedisError) -> impl fmt::Display + '_ {
    struct Brief<'a>(&'a RedisError);
    impl fmt::Display for Brief<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&explain(self.0))
        }
    }
    Brief(err)
}

fn explain_tls(tls: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, Error as Tls};
    let hint = match tls {
        Tls::InvalidCertificate(_) | Tls::NoCertificatesPresented => {
            "the server's certificate is not vouched for by REDIS_TLS_CA_FILE (or the system's CAs), or does not name this host"
        }
        Tls::AlertReceived(
            Alert::UnknownCA
            | Alert::BadCertificate
            | Alert::CertificateRequired
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::AccessDenied,
        ) => "the server did not accept the client certificate (REDIS_TLS_CERT_FILE)",
        Tls::InvalidMessage(_) => "is the server speaking TLS on that port?",
        _ => "check the TLS settings",
    };
    format!("TLS handshake failed: {tls} ({hint})")
}

/// The TLS error behind `err`, if that is what it is. (redis keeps the I/O
/// error in an `Arc`, and `io::Error` hides what it wraps from `source()`,
/// so both are unwrapped by hand.)
pub fn tls_failure(err: &RedisError) -> Option<&rustls::Error> {
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(mut e) = next {
        if let Some(shared) = e.downcast_ref::<Shared>() {
            e = shared.as_ref();
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        next = wrapped.or_else(|| e.source());
    }
    None
}

/// Warns, in one line, when the server may evict keys under memory
/// pressure (`maxmemory-policy` `allkeys-*` or `volatile-*`): it could drop
/// the stream, or the keys the delivery protocol relies on, and so lose or
/// duplicate messages. optimus needs `noeviction`. Says nothing when the
/// server will not tell (an ACL user without CONFIG or INFO).
pub async fn warn_if_evicting<C: ConnectionLike + Send>(conn: &mut C, what: &str) {
    let policy = match redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async::<Vec<String>>(conn)
        .await
    {
        Ok(pair) => pair.get(1).cloned(),
        Err(_) => redis::cmd("INFO")
            .arg("memory")
            .query_async::<String>(conn)
            .await
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("maxmemory_policy:"))
                    .map(|p| p.trim().to_string())
            }),
    };
    if let Some(policy) = policy
        && (policy.starts_with("allkeys-") || policy.starts_with("volatile-"))
    {
        tracing::warn!(
            "maxmemory-policy is {policy}: under memory pressure Redis may evict {what}, losing or duplicating messages; optimus needs maxmemory-policy noeviction"
        );
    }
}

/// The server's version (major, minor) as INFO reports it, if it will tell
/// (`redis_version`: Valkey reports the Redis version it is compatible with).
pub async fn server_version<C: ConnectionLike + Send>(conn: &mut C) -> Option<(u32, u32)> {
    // A cluster connection answers with each node's INFO: the first tells.
    let info: redis::Value = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .ok()?;
    fn text(value: &redis::Value) -> Option<String> {
        match value {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::VerbatimString { text, .. } => Some(text.clone()),
            redis::Value::SimpleString(s) => Some(s.clone()),
            redis::Value::Map(pairs) => pairs.iter().find_map(|(_, v)| text(v)),
            redis::Value::Array(items) => items.iter().find_map(text),
            _ => None,
        }
    }
    let info = text(&info)?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))?;
    let mut parts = version.trim().split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// Sharded Pub/Sub (PUBSUB_MODE=sharded) on a server older than Redis 7.0,
/// which has no SSUBSCRIBE or SPUBLISH: the line to exit with. `None` when
/// the server has it, or will not say.
pub async fn lacks_sharded_pubsub<C: ConnectionLike + Send>(
    conn: &mut C,
    server: &str,
) -> Option<String> {
    let (major, minor) = server_version(conn).await?;
    (major < 7).then(|| {
        format!(
            "PUBSUB_MODE=sharded needs Redis 7.0 or later (SSUBSCRIBE, SPUBLISH); {server} runs Redis {major}.{minor}: use PUBSUB_MODE=classic"
        )
    })
}

/// The longest wait between two reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The back-off of one thing tried again and again: waits growing
/// exponentially from 50 ms, each a base delay (doubling, up to half of
/// [`MAX_BACKOFF`]) plus a random jitter of up to that base again, so that
/// many workers do not knock at once; never above [`MAX_BACKOFF`], never
/// giving up unless given a deadline. Every retry in optimus backs off
/// through it; [`retry_until`] is its loop.
pub struct Backoff {
    waits: Box<dyn Iterator<Item = Duration> + Send + Sync>,
    /// Past this, a failure is not tried again.
    deadline: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Backoff {
    pub fn new() -> Self {
        Self {
            waits: Self::waits(),
            deadline: None,
        }
    }

    /// A back-off that gives up on a failure whose wait would end past
    /// `deadline`.
    pub fn until(deadline: Instant) -> Self {
        Self {
            deadline: Some(deadline),
            ..Self::new()
        }
    }

    fn waits() -> Box<dyn Iterator<Item = Duration> + Send + Sync> {
        let waits = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(MAX_BACKOFF / 2)
            .with_jitter()
            .without_max_times()
            .build();
        Box::new(waits.map(|wait| wait.min(MAX_BACKOFF)))
    }

    /// It worked: the next failure waits the shortest again.
    pub fn reset(&mut self) {
        self.waits = Self::waits();
    }

    /// The wait before the next attempt.
    pub fn next_wait(&mut self) -> Duration {
        self.waits.next().unwrap_or(MAX_BACKOFF)
    }

    /// Waits the next wait (cut short by `cancel`), after `on_wait` is told
    /// how long it is.
    pub async fn pause(
        &mut self,
        cancel: Option<&CancellationToken>,
        on_wait: impl FnOnce(Duration),
    ) {
        let wait = self.next_wait();
        on_wait(wait);
        sleep(wait, cancel).await;
    }

    /// After a failed attempt: the error back when retrying cannot mend it
    /// (see [`is_fatal`]), when it is cancelled, or when the next wait
    /// would end past the deadline; else `on_retry` is told the error and
    /// the wait, and the wait is waited out (cut short by `cancel`).
    pub async fn after(
        &mut self,
        err: RedisError,
        cancel: Option<&CancellationToken>,
        on_retry: impl FnOnce(&RedisError, Duration),
    ) -> Result<(), RedisError> {
        let cancelled = cancel.is_some_and(|c| c.is_cancelled());
        if is_fatal(&err) || cancelled {
            return Err(err);
        }
        let wait = self.next_wait();
        if self.deadline.is_some_and(|at| Instant::now() + wait > at) {
            return Err(err);
        }
        on_retry(&err, wait);
        sleep(wait, cancel).await;
        Ok(())
    }
}

/// Sleeps `wait`, or until `cancel`.
async fn sleep(wait: Duration, cancel: Option<&CancellationToken>) {
    match cancel {
        Some(cancel) => {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        None => tokio::time::sleep(wait).await,
    }
}

/// Connection attempts that failed, process-wide (every kind of connection:
/// commands, subscriptions, one-shot commands); exported as a metric.
pub static CONNECT_FAILURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts a failed attempt to reach Redis (`optimus_connect_failures_total`).
pub fn count_connect_failure() {
    CONNECT_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Calls `connect` until it succeeds, backing off and saying so on stderr
/// while Redis is unreachable.
pub async fn retry_until_connected<T, F, Fut>(
    server: &str,
    cancel: &CancellationToken,
    mut connect: F,
) -> Result<Option<T>, RedisError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RedisError>>,
{
    let counted = || {
        let attempt = connect();
        async {
            let result = attempt.await;
            if result.is_err() {
                count_connect_failure();
            }
            result
        }
    };
    retry_until(cancel, counted, |err, wait| {
        tracing::warn!(
            server = %server,
            cause = %brief(err),
            retry_in_ms = wait.as_millis() as u64,
            "Redis unreachable, retrying"
        )
    })
    .await
}

/// Calls `step` until it succeeds: an error retrying cannot mend (see
/// [`is_fatal`]) is returned, any other is passed to `on_retry` with the
/// wait before the next attempt (see [`Backoff`]). `None` when cancelled
/// first.
pub async fn retry_until<T, F, Fut>(
    cancel: &CancellationToken,
    mut step: F,
    on_retry: impl Fn(&RedisError, Duration),
) -> Result<Option<T>, RedisError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RedisError>>,
{
    let mut backoff = Backoff::new();
    loop {
        let err = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            result = step() => match result {
                Ok(done) => return Ok(Some(done)),
                Err(err) => err,
            },
        };
        match backoff.after(err, Some(cancel), &on_retry).await {
            Err(_) if cancel.is_cancelled() => return Ok(None),
            Err(err) => return Err(err),
            Ok(()) => {}
        }
    }
}
