//! Prometheus metrics and probes: with METRICS_ADDR set, `consume` and
//! `work` serve `GET /metrics` in the Prometheus text format
//! (prometheus-client encodes it; the counters are read at each scrape),
//! `/healthz` and `/readyz`, over axum.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::monitor::Counters;
use crate::work::WorkCounters;

/// Encodes counters and gauges read at scrape time.
fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: &AtomicU64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value.load(Ordering::Relaxed));
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// What every process exports: its build, whether it reaches Redis, and
/// its failed connection attempts.
fn process_metrics(e: &mut DescriptorEncoder, redis_up: bool) -> Result<(), std::fmt::Error> {
    let build = ConstGauge::new(1i64);
    let mut family = e.encode_descriptor(
        "optimus_build_info",
        "The optimus build: its version as a label, the value 1",
        None,
        build.metric_type(),
    )?;
    build.encode(family.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?)?;
    gauge(
        e,
        "optimus_redis_up",
        "1 when this process reaches Redis (commands answer and a worker is subscribed), 0 while it is reconnecting",
        i64::from(redis_up),
    )?;
    counter(
        e,
        "optimus_connect_failures",
        "Connection attempts to Redis that failed",
        &crate::connect::CONNECT_FAILURES,
    )?;
    // The process's own figures, under the names Prometheus's client
    // libraries give them.
    let pid = std::process::id();
    gauge(
        e,
        "process_resident_memory_bytes",
        "Resident memory size in bytes",
        optimus_testkit::rss(pid) as i64,
    )?;
    let cpu = ConstCounter::new(optimus_testkit::cpu_time(pid).as_secs_f64());
    cpu.encode(e.encode_descriptor(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds",
        None,
        cpu.metric_type(),
    )?)?;
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count());
    gauge(
        e,
        "process_open_fds",
        "Number of open file descriptors",
        fds as i64,
    )
}

/// The bridge's counters (`optimus consume`).
#[derive(Debug)]
struct BridgeCollector {
    counters: Arc<Counters>,
}

impl Collector for BridgeCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.counters;
        process_metrics(&mut e, c.redis_up())?;
        counter(
            &mut e,
            "optimus_received",
            "Messages received from the channel, every worker counting its copy",
            &c.received,
        )?;
        counter(
            &mut e,
            "optimus_written",
            "Messages this process wrote to the stream",
            &c.written,
        )?;
        counter(
            &mut e,
            "optimus_skipped",
            "Copies dropped because another worker wrote the message",
            &c.duplicates_skipped,
        )?;
        counter(
            &mut e,
            "optimus_taken_over",
            "Messages written for an owner that had not written them in time",
            &c.taken_over,
        )?;
        counter(
            &mut e,
            "optimus_expired",
            "Copies dropped after PENDING_RETENTION",
            &c.expired,
        )?;
        counter(
            &mut e,
            "optimus_dead_lettered",
            "Messages written to the dead-letter stream",
            &c.dead_lettered,
        )?;
        counter(
            &mut e,
            "optimus_overflow",
            "Messages dropped because a worker's queue was full",
            &c.overflow,
        )?;
        counter(
            &mut e,
            "optimus_reconnects",
            "Subscriptions re-established after a lost connection",
            &c.reconnects,
        )?;
        counter(
            &mut e,
            "optimus_gaps",
            "Times no worker of this process was subscribed",
            &c.gaps,
        )?;
        counter(
            &mut e,
            "optimus_redis_errors",
            "Redis commands that failed and were retried",
            &c.redis_errors,
        )?;
        counter(
            &mut e,
            "optimus_reused_ids",
            "Messages skipped because their id was already written with other bytes (a publisher reusing ids)",
            &c.reused_ids,
        )?;
        counter(
            &mut e,
            "optimus_refused",
            "Messages neither the stream nor the dead-letter stream would take",
            &c.refused,
        )?;
        counter(
            &mut e,
            "optimus_bad_marks",
            "Messages on the pool's marks channel that were no mark of the pool (not sealed by the server's scripts, or sent again): ignored",
            &c.bad_marks,
        )?;
        gauge(
            &mut e,
            "optimus_pending",
            "Copies held and owned messages not yet written",
            c.pending.load(Ordering::Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "optimus_workers",
            "Workers in this process",
            c.workers.load(Ordering::Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "optimus_holding_copies",
            "1 while this process holds copies of the messages (it reads), 0 while it waits for a place among the pool's holders (STANDBYS)",
            c.holding.load(Ordering::Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "optimus_live_workers",
            "Live workers on every host, at the last monitoring line",
            c.live_workers.load(Ordering::Relaxed) as i64,
        )?;
        Ok(())
    }
}

/// The downstream workers' counters (`optimus work`).
#[derive(Debug)]
struct WorkCollector {
    counters: Arc<WorkCounters>,
    workers: usize,
}

impl Collector for WorkCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.counters;
        process_metrics(&mut e, c.link.is_up())?;
        counter(
            &mut e,
            "optimus_work_handled",
            "Entries handled and acknowledged",
            &c.handled,
        )?;
        counter(
            &mut e,
            "optimus_work_failed",
            "Handler runs that failed (the entry stays pending)",
            &c.failed,
        )?;
        counter(
            &mut e,
            "optimus_work_claimed",
            "Idle entries claimed from other consumers",
            &c.claimed,
        )?;
        counter(
            &mut e,
            "optimus_work_dead_lettered",
            "Entries moved to the dead-letter stream",
            &c.dead_lettered,
        )?;
        counter(
            &mut e,
            "optimus_work_redis_errors",
            "Redis commands that failed and were retried",
            &c.redis_errors,
        )?;
        gauge(
            &mut e,
            "optimus_work_workers",
            "Workers in this process",
            self.workers as i64,
        )?;
        Ok(())
    }
}

/// The registry for a bridge process.
pub fn bridge_registry(counters: Arc<Counters>) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "optimus_batch_seconds",
        "Time of one write batch (its round trip to Redis)",
        counters.batch_seconds.clone(),
    );
    registry.register_collector(Box::new(BridgeCollector { counters }));
    registry
}

/// The registry for a `work` process.
pub fn work_registry(counters: Arc<WorkCounters>, workers: usize) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "optimus_work_handle_seconds",
        "Time of one handler run",
        counters.handle_seconds.clone(),
    );
    registry.register_collector(Box::new(WorkCollector { counters, workers }));
    registry
}

/// Whether a process is ready for work, for `/readyz`: `Err` says why not
/// in one line.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Binds `addr` (so that a taken port is an error at start-up) and serves:
/// - `GET /metrics`: the registry's metrics and the process's own (build,
///   Redis link, RSS, CPU, open file descriptors), in the Prometheus text
///   format;
/// - `GET /healthz`: 200 while the process's event loop answers (a liveness
///   probe);
/// - `GET /readyz`: 200 while `ready` says so, else 503 with its one-line
///   reason (a readiness probe); 503 once `cancel` is (the process is
///   stopping).
///
/// It serves until the process exits: the final counters stay readable and
/// `/healthz` keeps answering while a graceful stop drains.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    ready: Readiness,
    cancel: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let listener = TcpListener::bind(addr).await?;
    let registry = Arc::new(registry);
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => (
                            StatusCode::OK,
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        ),
                        Err(_) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                            "cannot encode the metrics\n".to_string(),
                        ),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let (ready, stopping) = (ready.clone(), cancel.clone());
                async move {
                    if stopping.is_cancelled() {
                        return (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: stopping\n".to_string(),
                        );
                    }
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    }
                }
            }),
        );
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app).await;
        if let Err(err) = served {
            tracing::warn!(cause = %err, "the metrics and probes endpoint stopped");
        }
    }))
}
