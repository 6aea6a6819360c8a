//! Following the primary that Redis Sentinel names through a failover.
//!
//! A failover does not always announce itself to the clients of the old
//! primary: after `SENTINEL FAILOVER` (or a partition) the old primary
//! keeps taking writes, as a primary, until the sentinels turn it into a
//! replica, and what it takes meanwhile is lost when it resyncs. So each
//! process watches the sentinels ([`primary_watch`]: one task per set of
//! sentinels, asking them where the primary is every [`WATCH_EVERY`]), and
//! its connections move as soon as they name another server:
//!
//! - a command connection ([`Following`]) before its next command, and
//!   also when a command finds the server read-only (it was demoted) or the
//!   connection gone (the primary died): the sentinels are asked again;
//! - a subscription (the reader) ends its session and subscribes on the
//!   new primary (see `bridge::delivery::reader`).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::{RedisError, RedisFuture, RedisResult};
use tokio::sync::watch;

use super::endpoint::Endpoint;
use super::open::manager_config;

/// How often a process asks the sentinels where the primary is.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);

/// Where the sentinels say the primary is (`host:port`; `None` until they
/// first answered), kept fresh by one task per set of sentinels in the
/// process. `None` unless `endpoint` is a sentinel endpoint.
pub fn primary_watch(endpoint: &Endpoint) -> Option<watch::Receiver<Option<String>>> {
    static WATCHES: LazyLock<Mutex<HashMap<String, watch::Receiver<Option<String>>>>> =
        LazyLock::new(Mutex::default);
    if !endpoint.is_sentinel() {
        return None;
    }
    let key = endpoint.to_string();
    let mut watches = WATCHES.lock().unwrap();
    if let Some(watch) = watches.get(&key) {
        return Some(watch.clone());
    }
    // (The sentinels' clients are made once, for the task that asks them.)
    let (clients, master) = endpoint.sentinel_clients()?;
    let (tx, rx) = watch::channel(None);
    let clients: Vec<redis::Client> = clients.into_iter().filter_map(Result::ok).collect();
    tokio::spawn(watch_primary(clients, master, tx));
    watches.insert(key, rx.clone());
    Some(rx)
}

/// Asks the sentinels, one at a time (the next when one fails), where
/// `master` is, every [`WATCH_EVERY`], for as long as the process runs.
async fn watch_primary(
    sentinels: Vec<redis::Client>,
    master: String,
    tx: watch::Sender<Option<String>>,
) {
    if sentinels.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut which = 0;
    let mut conn: Option<MultiplexedConnection> = None;
    loop {
        tick.tick().await;
        if conn.is_none() {
            let connecting = sentinels[which].get_multiplexed_async_connection();
            conn = tokio::time::timeout(Duration::from_secs(1), connecting)
                .await
                .ok()
                .and_then(Result::ok);
        }
        let Some(c) = conn.as_mut() else {
            which = (which + 1) % sentinels.len();
            continue;
        };
        let mut ask = redis::cmd("SENTINEL");
        ask.arg("GET-MASTER-ADDR-BY-NAME").arg(&master);
        let asked = ask.query_async::<Option<(String, u16)>>(c);
        match tokio::time::timeout(Duration::from_secs(1), asked).await {
            Ok(Ok(Some((host, port)))) => {
                let address = format!("{host}:{port}");
                tx.send_if_modified(|known| {
                    let changed = known.as_deref() != Some(address.as_str());
                    if changed {
                        *known = Some(address.clone());
                    }
                    changed
                });
            }
            _ => {
                conn = None;
                which = (which + 1) % sentinels.len();
            }
        }
    }
}

/// Waits until the sentinels name a primary other than `current` (never,
/// without a watch).
pub async fn until_moved(watch: Option<&mut watch::Receiver<Option<String>>>, current: &str) {
    let Some(watch) = watch else {
        return std::future::pending().await;
    };
    loop {
        if watch
            .borrow_and_update()
            .as_deref()
            .is_some_and(|named| named != current)
        {
            return;
        }
        if watch.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// A command connection to the primary the sentinels name (see the
/// module's notes). A command that fails because the primary moved fails
/// (its caller retries, as for any lost connection); the next goes to the
/// new primary.
#[derive(Clone)]
pub struct Following {
    /// The sentinels' endpoint.
    endpoint: Arc<Endpoint>,
    /// The primary's connection, its `host:port`, and how many times it
    /// moved.
    current: Arc<Mutex<(u64, String, ConnectionManager)>>,
    /// One move at a time.
    moving: Arc<tokio::sync::Mutex<()>>,
    watch: Option<watch::Receiver<Option<String>>>,
}

impl Following {
    /// Connects to the primary the sentinels name now.
    pub async fn connect(endpoint: &Endpoint) -> RedisResult<Self> {
        let (address, conn) = Self::open(endpoint).await?;
        Ok(Self {
            endpoint: Arc::new(endpoint.clone()),
            current: Arc::new(Mutex::new((0, address, conn))),
            moving: Arc::default(),
            watch: primary_watch(endpoint),
        })
    }

    async fn open(endpoint: &Endpoint) -> RedisResult<(String, ConnectionManager)> {
        let primary = endpoint.resolve().await?;
        let address = primary.address().unwrap_or_default();
        let conn = ConnectionManager::new_with_config(primary.client()?, manager_config()).await;
        match conn {
            Ok(conn) => Ok((address, conn)),
            Err(err) => Err(primary.diagnose(err).await),
        }
    }

    fn current(&self) -> (u64, ConnectionManager) {
        let current = self.current.lock().unwrap();
        (current.0, current.2.clone())
    }

    /// Moves to the primary the sentinels name, if it is not the one of
    /// move `seen`'s connection (`why`: what made it ask).
    async fn relocate(&self, seen: u64, why: &str) {
        let _one = self.moving.lock().await;
        if self.current.lock().unwrap().0 != seen {
            return; // another command moved it already
        }
        let Ok(Ok((address, conn))) =
            tokio::time::timeout(Duration::from_secs(5), Self::open(&self.endpoint)).await
        else {
            return; // asked again at the next failure
        };
        let mut current = self.current.lock().unwrap();
        if current.1 == address {
            return; // the same server: its connection reconnects by itself
        }
        tracing::warn!(primary = %address, previous = %current.1, cause = %why, "the sentinels name another primary: commands go there now");
        *current = (seen + 1, address, conn);
    }

    /// Before a command: moves if the sentinels name another primary.
    async fn before(&mut self) -> (u64, ConnectionManager) {
        let address = self.current.lock().unwrap().1.clone();
        let named = self.watch.as_ref().and_then(|w| w.borrow().clone());
        if named.is_some_and(|named| named != address) {
            let (seen, _) = self.current();
            self.relocate(seen, "the sentinels switched the primary")
                .await;
        }
        self.current()
    }

    /// After a failed command: asks the sentinels when the failure may mean
    /// that the primary moved.
    async fn after(&self, seen: u64, err: &RedisError) {
        if moved_away(err) {
            self.relocate(seen, &super::brief(err).to_string()).await;
        }
    }
}

/// Whether `err` may mean that the primary moved: the server is a replica
/// now (READONLY), or the connection is gone.
fn moved_away(err: &RedisError) -> bool {
    err.code() == Some("READONLY")
        || err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
}

impl ConnectionLike for Following {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let (seen, mut conn) = self.before().await;
            let result = conn.req_packed_command(cmd).await;
            if let Err(err) = &result {
                self.after(seen, err).await;
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            let (seen, mut conn) = self.before().await;
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            if let Err(err) = &result {
                self.after(seen, err).await;
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.current().1.get_db()
    }
}
