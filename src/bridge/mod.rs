//! The bridge: a pool of workers that turns Pub/Sub channels into streams.
//!
//! On one server a process runs at most two subscriptions, its
//! [`delivery::reader`]s (one per worker, up to two), whatever the number of
//! its workers; the [`delivery::intake`] merges them, and the strategy's
//! loop writes: [`delivery::fenced`] (the default: one writer per stream)
//! or [`delivery::race`] (every worker races for every message). On a
//! cluster each worker has a subscription of its own
//! ([`delivery::cluster`]) and races. Beside them, one task keeps the
//! workers' [`presence`] keys alive, one prints the monitoring line, one
//! follows `ctl scale`.
//!
//! Shutdown is by cancellation: the token stops the subscriptions; the
//! strategy's loop then finishes what was received and exits; then the
//! presence keys are deleted and [`Bridge::run`] returns.

pub mod config;
pub mod delivery;
pub mod route;
mod upkeep;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use redis::RedisError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::connect::{Conn, connection};
use crate::keys::Process;
pub use crate::keys::host_name;
use crate::monitor::{Counters, MonitorLine, Snapshot};
use crate::presence::Presence;
use crate::settings::ConfigError;
use config::BridgeConfig;
use delivery::members::is_mixed;
use workers::{Spawner, Workers};

/// Why a bridge stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Redis refused us in a way retrying cannot mend (credentials, permissions).
    #[error("Redis at {server} refused the bridge: {}", crate::connect::explain(.source))]
    Refused { server: String, source: RedisError },
    /// The pool runs another strategy (see [`delivery::members`]): this
    /// process writes nothing.
    #[error("{0}")]
    MixedStrategies(String),
    /// The server lacks what the settings need (sharded Pub/Sub before
    /// Redis 7.0).
    #[error("{0}")]
    Unsupported(String),
    /// A graceful stop took longer than SHUTDOWN_TIMEOUT.
    #[error(
        "SHUTDOWN_TIMEOUT ({}s) passed: stopped with {unsettled} received messages unsettled (other workers hold copies of them, unless they stopped too)",
        .timeout.as_secs_f64()
    )]
    ShutdownTimedOut { timeout: Duration, unsettled: u64 },
}

/// A configured bridge, ready to [`run`](Bridge::run).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use optimus::{Bridge, BridgeConfig};
/// use tokio_util::sync::CancellationToken;
///
/// let config = BridgeConfig::new("redis://127.0.0.1:6379").consumers(3);
/// let bridge = Bridge::new(config)?;
/// let shutdown = CancellationToken::new();
/// let totals = bridge.run(shutdown.clone()).await?; // until shutdown.cancel()
/// println!("written: {}", totals.written);
/// # Ok(()) }
/// ```
pub struct Bridge {
    config: BridgeConfig,
    counters: Arc<Counters>,
}

impl Bridge {
    /// Checks the configuration.
    pub fn new(config: BridgeConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            counters: Arc::default(),
        })
    }

    /// The live counters, for a service that embeds the bridge.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Runs the workers until `shutdown` is cancelled, then stops them
    /// gracefully and returns the final counters. While Redis is unreachable
    /// it waits and retries; it returns an error when Redis refuses the
    /// credentials or permissions, or when the graceful stop takes longer
    /// than SHUTDOWN_TIMEOUT (then whatever is still running is dropped).
    pub async fn run(self, shutdown: CancellationToken) -> Result<Snapshot, BridgeError> {
        let timeout = self.config.shutdown_timeout;
        let counters = self.counters.clone();
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(timeout).await;
        };
        tokio::select! {
            done = self.run_until_stopped(shutdown.clone()) => done,
            () = deadline => Err(BridgeError::ShutdownTimedOut {
                timeout,
                unsettled: counters.snapshot().unsettled(),
            }),
        }
    }

    async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<Snapshot, BridgeError> {
        let config = &self.config;
        let server = config.endpoint.to_string();
        let refused = |source: RedisError| match is_mixed(&source) {
            Some(line) => BridgeError::MixedStrategies(line),
            None => BridgeError::Refused {
                server: server.clone(),
                source,
            },
        };
        let Some(mut conn) = self.connect(&shutdown).await.map_err(refused)? else {
            return Ok(self.counters.snapshot());
        };
        let routes = config.effective_routes();
        let routes_shown = routes
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(",");
        tracing::info!(server = %server, routes = %routes_shown, workers = config.consumers, "bridge starting");
        crate::connect::warn_if_evicting(
            &mut conn,
            "the stream and the delivery protocol's keys (writer records, members, clock; with STRATEGY=race, ACK keys and locks)",
        )
        .await;
        if config.endpoint.is_sharded()
            && let Some(line) = crate::connect::lacks_sharded_pubsub(&mut conn, &server).await
        {
            return Err(BridgeError::Unsupported(line));
        }

        let process = Process::new();
        // How many workers to run: CONSUMERS_COUNT, or this process's share
        // of the total set with `optimus ctl scale`.
        let scale =
            crate::control::Scale::new(process.name(), process.describe(), config.consumers);
        let presence = Presence::new(
            &config.consumers_list,
            config.presence_ttl,
            process.describe(),
        )
        .on_cluster(config.endpoint.is_cluster());
        let registered = self
            .register(&mut conn, &scale, &presence, &process, &shutdown)
            .await;
        let Some((first, worker_ids)) = registered.map_err(refused)? else {
            return Ok(self.counters.snapshot());
        };
        self.counters.set_link(true);

        let mut tasks: JoinSet<Result<(), RedisError>> = JoinSet::new();
        let mut spawner = Spawner::new(config, routes, routes_shown, self.counters.clone());
        if spawner.has_engine() {
            spawner
                .start_engine(&process, &mut tasks, &shutdown)
                .await
                .map_err(refused)?;
        }
        // Stops presence, monitoring and scaling, after the workers are done.
        let stop_aux = CancellationToken::new();
        let (target_tx, target_rx) = tokio::sync::watch::channel(first);
        let scaler = tokio::spawn(
            scale
                .clone()
                .watch(conn.clone(), target_tx, stop_aux.clone()),
        );
        let mut workers = Workers::new(spawner, tasks, process, presence.clone(), conn.clone());
        let aux = tokio::spawn(upkeep::keep_present(
            presence.clone(),
            conn.clone(),
            workers.live(),
            stop_aux.clone(),
        ));
        let monitor = tokio::spawn(upkeep::monitor(
            presence.clone(),
            conn.clone(),
            self.counters.clone(),
            workers.watched(),
            config.monitoring_interval,
            config.print_monitor,
            stop_aux.clone(),
        ));
        let fatal = workers
            .run(
                target_rx,
                first,
                &self.counters,
                &shutdown,
                config.shutdown_timeout,
            )
            .await
            .map_err(refused)?;
        stop_aux.cancel();
        let _ = aux.await;
        let _ = monitor.await;
        let _ = scaler.await;
        // Also the keys registered at start for workers a shutdown kept from
        // starting.
        let mut ever = workers.ever();
        ever.extend(worker_ids);
        self.finish(&mut conn, &presence, ever).await;
        match fatal {
            Some(source) => Err(refused(source)),
            None => Ok(self.counters.snapshot()),
        }
    }

    /// Connects, the monitoring line going on while Redis cannot be reached
    /// yet. `None`: stopped first.
    async fn connect(&self, shutdown: &CancellationToken) -> Result<Option<Conn>, RedisError> {
        let config = &self.config;
        let connected = CancellationToken::new();
        let counters = self.counters.clone();
        let connecting = tokio::spawn(crate::monitor::while_connecting(
            config.monitoring_interval,
            config.print_monitor,
            move || {
                MonitorLine {
                    consumers: None,
                    counters: counters.snapshot(),
                    rate: 0.0,
                    link: counters.link(),
                }
                .to_string()
            },
            connected.clone(),
        ));
        let conn = connection(&config.endpoint, shutdown).await;
        connected.cancel();
        let _ = connecting.await;
        conn
    }

    /// Registers the process (`ctl scale`'s share, the presence keys of its
    /// first workers): how many workers to start, and their ids. A server
    /// that refuses writes for now (too few replicas, out of memory,
    /// loading) or a connection lost is waited out; a refusal of us is the
    /// error. `None`: stopped while registering, the registration taken back.
    async fn register(
        &self,
        conn: &mut Conn,
        scale: &crate::control::Scale,
        presence: &Presence,
        process: &Process,
        shutdown: &CancellationToken,
    ) -> Result<Option<(usize, Vec<String>)>, RedisError> {
        // How many presence keys an attempt may have left behind.
        let registering = std::sync::atomic::AtomicUsize::new(0);
        let registered = crate::connect::retry_until(
            shutdown,
            || {
                let mut conn = conn.clone();
                let registering = &registering;
                async move {
                    let first = scale.target(&mut conn).await?;
                    registering.fetch_max(first, std::sync::atomic::Ordering::Relaxed);
                    let ids: Vec<String> = (0..first).map(|i| process.worker_id(i)).collect();
                    presence.refresh(&mut conn, &ids).await?;
                    Ok((first, ids))
                }
            },
            |err, wait| {
                tracing::warn!(cause = %crate::connect::brief(err), retry_in_ms = wait.as_millis() as u64, "cannot register this process yet; retrying")
            },
        )
        .await?;
        if registered.is_none() {
            // Stopped while registering (the kill switch, a signal): an
            // attempt cut short may have registered the process, so `ctl
            // status` would show it for a while. Take it back.
            let ids: Vec<String> = (0..registering.into_inner())
                .map(|i| process.worker_id(i))
                .collect();
            let unregister = async {
                let _ = scale.leave(conn).await;
                let _ = presence.remove(conn, &ids).await;
            };
            let _ = tokio::time::timeout(UNREGISTER_WITHIN, unregister).await;
            tracing::info!("bridge stopped before it started");
        }
        Ok(registered)
    }

    /// Deletes the presence keys of every worker that ran, and prints the
    /// last monitoring line.
    async fn finish(&self, conn: &mut Conn, presence: &Presence, mut ever: Vec<String>) {
        ever.sort();
        ever.dedup();
        match tokio::time::timeout(UNREGISTER_WITHIN, presence.remove(conn, &ever)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(cause = %crate::connect::brief(&err), "could not delete the presence keys; they expire by themselves");
            }
            Err(_) => tracing::warn!(
                "Redis did not answer the deletion of the presence keys; they expire by themselves"
            ),
        }
        let totals = self.counters.snapshot();
        if self.config.print_monitor {
            let budget = upkeep::monitor_budget(self.config.monitoring_interval);
            let consumers = tokio::time::timeout(budget, presence.count(conn))
                .await
                .ok()
                .and_then(Result::ok);
            // No worker is wanted any more: Redis answering is the link.
            self.counters.set_link(consumers.is_some());
            crate::monitor::print_line(MonitorLine {
                consumers,
                counters: totals,
                rate: 0.0,
                link: self.counters.link(),
            });
        }
        tracing::info!(
            written = totals.written,
            received = totals.received,
            "bridge stopped"
        );
    }
}

/// How long taking a registration back (ctl's, the presence keys) may take
/// when a bridge stops (Redis may be what is slow): they lapse by themselves.
const UNREGISTER_WITHIN: Duration = Duration::from_secs(2);
