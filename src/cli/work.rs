//! `optimus work`: its variables, turned into a [`WorkConfig`], and the run
//! of the consumer-group workers.

use std::time::Duration;

use clap::Args;
use optimus::settings::{ConfigError, limits, parse_interval, parse_whole};
use optimus::work::{Handler, WorkConfig};
use optimus::{Endpoint, keys};

use super::Exit;
use super::connect::ConnectArgs;
use super::controls::Controls;
use super::signals::shutdown_on_signal;

/// Runs the workers until a signal (or the kill switch, or IDLE_TIMEOUT)
/// stops them.
pub async fn run(connect: &ConnectArgs, args: &WorkArgs) -> Result<(), Exit> {
    use std::sync::atomic::Ordering::Relaxed;
    let config = args.to_config(connect.endpoint()?)?;
    let controls = Controls::parse(&args.metrics_addr, &args.idle_timeout)?;
    let server = config.endpoint.to_string();
    let counters = std::sync::Arc::new(optimus::work::WorkCounters::default());
    let shutdown = shutdown_on_signal();
    let watched = counters.clone();
    controls
        .start(
            &config.endpoint,
            move || optimus::control::Activity {
                count: watched.handled.load(Relaxed) + watched.failed.load(Relaxed),
                redis_up: watched.link.is_up(),
            },
            || optimus::metrics::work_registry(counters.clone(), config.consumers),
            {
                let counters = counters.clone();
                move || counters.link.state()
            },
            &shutdown,
        )
        .await?;
    match optimus::work::run(config, counters, shutdown).await {
        Ok(()) => Ok(()),
        Err(err @ optimus::work::WorkError::Refused(_)) => Err(Exit::failed(format_args!(
            "Redis at {server} refused the workers: {err}"
        ))),
        Err(err) => Err(Exit::failed(err)),
    }
}

/// `optimus work` settings, as text; [`WorkArgs::to_config`] checks them.
#[derive(Debug, Clone, Args)]
// A negative number is a value (rejected with the setting's own reason),
// not an unknown flag.
#[command(allow_negative_numbers = true)]
pub struct WorkArgs {
    /// Stream to read.
    #[arg(long, env = "OUTPUT_STREAM", default_value = "messages:processed")]
    pub stream: String,
    /// Consumer group (created from the start of the stream if missing).
    #[arg(long, env = "WORK_GROUP", default_value = "optimus-work")]
    pub group: String,
    /// Workers (group consumers) in this process.
    #[arg(long = "consumers", env = "WORK_CONSUMERS", default_value = "1")]
    pub consumers: String,
    /// Entries a worker reads at a time.
    #[arg(long = "batch-size", env = "WORK_BATCH_SIZE", default_value = "10")]
    pub batch_size: String,
    /// Seconds an entry may stay pending (its consumer dead, hung, or its
    /// handler failed) before another worker claims it.
    #[arg(long, env = "WORK_CLAIM_IDLE", default_value = "30")]
    pub claim_idle: String,
    /// Deliveries after which an entry goes to the dead-letter stream.
    #[arg(long, env = "WORK_MAX_DELIVERIES", default_value = "5")]
    pub max_deliveries: String,
    /// Where entries that were never handled go [default: <stream>:work-dead;
    /// on a cluster {<stream>}:work-dead, in the stream's slot].
    #[arg(long, env = "WORK_DEAD_LETTER_STREAM")]
    pub dead_letter_stream: Option<String>,
    /// Prefix of the workers' presence keys, and name of their sorted set.
    #[arg(long, env = "WORK_CONSUMERS_LIST", default_value = "work:ids")]
    pub consumers_list: String,
    /// Seconds between monitoring lines on stdout.
    #[arg(long, env = "MONITORING_INTERVAL", default_value = "3")]
    pub monitoring_interval: String,
    /// Serve Prometheus metrics on `http://<this address>/metrics`, and the probes `/healthz` (alive) and `/readyz` (Redis reached; 503 with the reason otherwise) [default: off].
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Stop (gracefully, exit 0) after this many seconds without an entry
    /// [default: never].
    #[arg(long, env = "IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Seconds a handler may run: past it, it is killed (with everything it
    /// started) and the entry counts as failed. Must be shorter than
    /// WORK_CLAIM_IDLE, or a slow handler's entry would be claimed and
    /// handled twice [default: half of WORK_CLAIM_IDLE].
    #[arg(long, env = "WORK_HANDLER_TIMEOUT")]
    pub handler_timeout: Option<String>,
    /// Seconds a graceful stop may take: past it the running handlers are
    /// killed and the process exits 1.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "30")]
    pub shutdown_timeout: String,
    /// The handler: a program and its arguments, after `--`. It gets the
    /// entry's payload on stdin; exit 0 acknowledges the entry.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

impl WorkArgs {
    pub fn to_config(&self, endpoint: Endpoint) -> Result<WorkConfig, ConfigError> {
        let program = &self.command[0];
        if !runnable(program) {
            return Err(ConfigError::new(
                "handler",
                program,
                "no such program: not an executable file, nor a name on PATH",
            ));
        }
        let claim_idle = parse_interval("WORK_CLAIM_IDLE", &self.claim_idle)?;
        let handler_timeout = match self.handler_timeout.as_deref().map(str::trim) {
            None | Some("") => claim_idle / 2,
            Some(raw) => {
                let timeout = parse_interval("WORK_HANDLER_TIMEOUT", raw)?;
                if timeout >= claim_idle {
                    return Err(ConfigError::new(
                        "WORK_HANDLER_TIMEOUT",
                        raw,
                        format!(
                            "must be shorter than WORK_CLAIM_IDLE ({}s), or a slow handler's entry is claimed and handled twice",
                            claim_idle.as_secs_f64()
                        ),
                    ));
                }
                timeout
            }
        };
        for (var, value) in [("OUTPUT_STREAM", &self.stream), ("WORK_GROUP", &self.group)] {
            if value.trim().is_empty() {
                return Err(ConfigError::new(var, value, "must not be empty"));
            }
        }
        let cluster = endpoint.is_cluster();
        let dead_stream = self
            .dead_letter_stream
            .clone()
            .unwrap_or_else(|| keys::slot_mate(&self.stream, ":work-dead", cluster));
        if dead_stream.trim().is_empty() || dead_stream == self.stream {
            return Err(ConfigError::new(
                "WORK_DEAD_LETTER_STREAM",
                &dead_stream,
                "must be a stream other than OUTPUT_STREAM (dead letters would be read again)",
            ));
        }
        if cluster {
            keys::require_slot_mate(
                "WORK_DEAD_LETTER_STREAM",
                &dead_stream,
                &self.stream,
                ":work-dead",
            )?;
        }
        Ok(WorkConfig {
            endpoint,
            stream: self.stream.clone(),
            group: self.group.clone(),
            consumers: parse_whole("WORK_CONSUMERS", &self.consumers, limits::WORKERS)?,
            batch_size: parse_whole("WORK_BATCH_SIZE", &self.batch_size, 1..=1000)?,
            claim_idle,
            max_deliveries: parse_whole("WORK_MAX_DELIVERIES", &self.max_deliveries, 1..=1000)?,
            dead_stream,
            consumers_list: self.consumers_list.clone(),
            presence_ttl: Duration::from_secs(5),
            monitoring_interval: parse_interval("MONITORING_INTERVAL", &self.monitoring_interval)?,
            print_monitor: true,
            handler: Handler::Command(self.command.clone()),
            handler_timeout,
            shutdown_timeout: parse_interval("SHUTDOWN_TIMEOUT", &self.shutdown_timeout)?,
        })
    }
}

/// Whether `program` can be run: a path to an executable file, or a name
/// found on PATH.
fn runnable(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &std::path::Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return executable(std::path::Path::new(program));
    }
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| executable(&dir.join(program)))
    })
}
