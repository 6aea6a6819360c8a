//! The `optimus` command: parses settings, sets up logging and signals, and
//! calls the library. Exit codes: 0 done, 1 runtime failure, 2 bad setting.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use optimus::config::{ConnectArgs, ConsumeArgs, PublishArgs, parse_log_level};
use optimus::{Bridge, BridgeError, ConfigError};
use tokio_util::sync::CancellationToken;

/// Bridge Redis Pub/Sub into a durable Redis Stream with a pool of cooperating workers.
///
/// Every setting can be given as an environment variable (shown in brackets)
/// or as the flag. Logs go to stderr; monitoring lines and summaries to stdout.
#[derive(Parser)]
#[command(name = "optimus", version, about, long_about)]
// A negative number is a value (rejected with the setting's own reason),
// not an unknown flag.
#[command(allow_negative_numbers = true)]
struct Cli {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Log level: TRACE, DEBUG, INFO, WARNING, ERROR or CRITICAL (RUST_LOG, when set, wins).
    #[arg(
        long,
        env = "LOGLEVEL",
        default_value = "INFO",
        global = true,
        help_heading = "Connection and logging"
    )]
    loglevel: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run N workers that subscribe to INPUT_CHANNEL (or every ROUTES source)
    /// and write every message to OUTPUT_STREAM (or its route's stream)
    /// exactly once, printing a monitoring line every MONITORING_INTERVAL.
    ///
    /// SIGINT, SIGTERM or SIGHUP stop reading, finish what was received, delete the presence
    /// keys and exit 0; a second signal exits at once.
    Consume(Box<ConsumeArgs>),
    /// Publish timed batches of test messages ({"message_id": "<uuid>", "seq": n, "sent_ms": t}).
    Publish(PublishArgs),
    /// Measure the bridge in one run (starts its own redis-server unless
    /// REDIS_URL is set, which it then FLUSHALLs): ceiling, throughput per
    /// worker count, commands, CPU and memory per message, latency; prints a
    /// table and writes JSON and an SVG chart. Exits 1 if any row lost or
    /// duplicated a message, or (fenced) wrote one out of publish order.
    #[command(allow_negative_numbers = true)]
    Bench {
        /// Messages in each burst row (sent with redis-cli --pipe).
        #[arg(long, default_value = "300000")]
        messages: u64,
        /// Worker counts to measure, comma-separated.
        #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
        workers: Vec<usize>,
        /// Process counts of the scaling rows (a fenced pool, each process
        /// at the default settings, Redis's CPU measured), comma-separated;
        /// 0 skips them.
        #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
        processes: Vec<usize>,
        /// Strategies to measure, comma-separated.
        #[arg(long, default_value = "fenced,race", value_delimiter = ',', value_enum)]
        strategies: Vec<optimus::Strategy>,
        /// Steady rate of the latency run, messages/s.
        #[arg(long, default_value = "10000")]
        latency_rate: u64,
        /// Seconds of the latency run.
        #[arg(long, default_value = "5")]
        latency_seconds: u64,
        /// Steady rate (messages/s) of the memory run, with the most workers
        /// of --workers, first strategy; 0 skips it.
        #[arg(long, default_value = "50000")]
        steady_rate: u64,
        /// Seconds of the memory run.
        #[arg(long, default_value = "10")]
        steady_seconds: u64,
        /// Where the JSON results go.
        #[arg(long, default_value = "bench.json")]
        json: std::path::PathBuf,
        /// Where the chart goes.
        #[arg(long, default_value = "bench.svg")]
        svg: std::path::PathBuf,
    },
    /// Look at and manage streams: list, info, create, delete, trim.
    Streams {
        #[command(subcommand)]
        action: StreamsAction,
    },
    /// Look at and manage the consumer groups of a stream and their consumers.
    Groups {
        #[command(subcommand)]
        action: GroupsAction,
    },
    /// Read the output stream through a consumer group and run a handler for
    /// every entry: `optimus work -- <program> [args]` gets the payload on
    /// stdin; exit 0 acknowledges the entry, anything else leaves it pending
    /// to be retried. Idle entries are claimed from dead or hung consumers;
    /// after WORK_MAX_DELIVERIES an entry goes to the dead-letter stream.
    Work(optimus::work::WorkArgs),
    /// The control plane: `ctl stop` sets the kill switch (every consume and
    /// work process stops gracefully within a second or two), `ctl resume`
    /// clears it, `ctl scale N` sets the total number of bridge workers, `ctl
    /// strategy S` hands a running pool to another strategy, `ctl status`
    /// shows all that and the live processes.
    Ctl {
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Check a stream, its consumer groups and the bridge's workers against
    /// ok / warn / alert thresholds: one line per check; exit 0 (ok), 1 (warn)
    /// or 2 (alert). Redis unreachable or the stream missing is an alert.
    Health(optimus::health::HealthArgs),
    /// Check a stream against one run of `optimus publish` (its `run=` name;
    /// by default the latest run in the stream): lost, duplicated and
    /// unexpected messages of that run. Entries of other runs are counted
    /// apart (`others`). Exits 0 when the run is exact, 1 otherwise (or when
    /// the stream does not exist).
    #[command(allow_negative_numbers = true)]
    Audit {
        /// How many messages the publisher reported as published.
        #[arg(long)]
        published: String,
        /// The run to check (`run=` in the publisher's summary) [default: the latest].
        #[arg(long)]
        run: Option<String>,
        /// Stream to check.
        #[arg(long, env = "OUTPUT_STREAM", default_value = "messages:processed")]
        stream: String,
        /// The bridge's dead-letter stream, whose messages of the run count as
        /// dead, not lost [default: <stream>:dead].
        #[arg(long, env = "DEAD_LETTER_STREAM")]
        dead_letter_stream: Option<String>,
    },
}

#[derive(Subcommand)]
enum CtlAction {
    /// Set the kill switch: every consume and work process stops gracefully.
    Stop,
    /// Clear the kill switch: processes can run again (start them again).
    Resume,
    /// Set the total number of bridge workers, split across the live consume
    /// processes (the remainder spread); they start and stop workers within
    /// a second or two. `--off` goes back to each process's CONSUMERS_COUNT.
    ///
    /// 0 stops every bridge worker on every host, so it needs --yes.
    #[command(group(clap::ArgGroup::new("total").required(true).args(["workers", "off"])))]
    #[command(allow_negative_numbers = true)]
    Scale {
        workers: Option<String>,
        #[arg(long)]
        off: bool,
        /// Confirms a total of 0.
        #[arg(long)]
        yes: bool,
    },
    /// Change the strategy of a running pool without losing or duplicating
    /// a message: start processes of the new strategy after this, and stop
    /// the old ones once the new ones have taken the handoff mark (see the
    /// README's "Changing the strategy").
    Strategy {
        /// The strategy to hand the pool to.
        #[arg(value_enum)]
        strategy: optimus::Strategy,
        /// The pool's stream (its bookkeeping keys are named after it).
        #[arg(long, env = "OUTPUT_STREAM", default_value = "messages:processed")]
        stream: String,
    },
    /// The kill switch, the total set with `ctl scale`, and the live consume
    /// and work processes: host, pid, workers, and the rate of each (messages
    /// written or entries handled per second over its last monitoring
    /// interval).
    Status {
        /// The work processes' WORK_CONSUMERS_LIST.
        #[arg(long, env = "WORK_CONSUMERS_LIST", default_value = "work:ids")]
        work_consumers_list: String,
    },
}

#[derive(Subcommand)]
enum StreamsAction {
    /// Every stream in the database: length, groups, last id.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A stream's length, first and last entries, and its groups with their
    /// consumers, pending entries and lag.
    Info {
        stream: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create an empty stream (an error if it exists).
    Create { stream: String },
    /// Delete a stream with its entries and groups.
    Delete {
        stream: String,
        /// Really delete it.
        #[arg(long)]
        yes: bool,
    },
    /// Trim a stream, exactly: keep the newest N entries, or drop the ones
    /// below an id.
    #[command(group(clap::ArgGroup::new("how").required(true).args(["maxlen", "minid"])))]
    #[command(allow_negative_numbers = true)]
    Trim {
        stream: String,
        /// Keep the newest N entries.
        #[arg(long)]
        maxlen: Option<String>,
        /// Drop the entries whose id is lower.
        #[arg(long)]
        minid: Option<String>,
    },
}

#[derive(Subcommand)]
enum GroupsAction {
    /// The consumer groups of a stream: consumers, pending, lag.
    List {
        stream: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One group and its consumers, with their pending entries and idle times.
    Info {
        stream: String,
        group: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create a group.
    Create {
        stream: String,
        group: String,
        /// Where the group starts: `$` (new entries only), `0` (the whole
        /// stream) or an entry id.
        #[arg(long, default_value = "$")]
        from: String,
        /// Create the stream too if it is missing.
        #[arg(long)]
        mkstream: bool,
    },
    /// Delete a group (its pending entries are forgotten).
    Delete {
        stream: String,
        group: String,
        /// Really delete it.
        #[arg(long)]
        yes: bool,
    },
    /// Move a group's last delivered id (`$`: the end; `0`: the start).
    SetId {
        stream: String,
        group: String,
        id: String,
    },
}

/// A line on stderr that nobody may read any more (a log collector that
/// died): dropped, never a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Standard error for the logs: a write nobody reads (the pipe closed) is
/// dropped, so that logs can never stop the bridge.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(std::io::stderr().write(buf).unwrap_or(buf.len()))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version; a command given without its subcommand
        // shows its help.
        Err(err)
            if !err.use_stderr()
                || err.kind()
                    == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            err.exit()
        }
        Err(err) => {
            say!("optimus: {}", usage_error(&err));
            return ExitCode::from(2);
        }
    };
    let level = match parse_log_level(&cli.loglevel) {
        Ok(level) => level,
        Err(err) => return bad_setting(&err),
    };
    init_logging(level);
    // A one-shot command whose output goes to a pipe closed early (`| head`)
    // ends quietly, as Unix tools do, instead of panicking on the write.
    // The long-running ones (consume, work, publish, bench) drop a line
    // nobody reads and go on.
    if matches!(
        cli.command,
        Command::Streams { .. }
            | Command::Groups { .. }
            | Command::Audit { .. }
            | Command::Ctl { .. }
            | Command::Health(_)
    ) {
        // SAFETY: restores the default action of one signal before any
        // thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    runtime.block_on(async {
        match cli.command {
            Command::Consume(args) => consume(&cli.connect, &args).await,
            Command::Publish(args) => publish(&cli.connect, &args).await,
            Command::Audit {
                published,
                stream,
                dead_letter_stream,
                run,
            } => {
                let published = match optimus::config::parse_count(
                    "--published",
                    &published,
                    0..=optimus::audit::MAX_PUBLISHED,
                ) {
                    Ok(n) => n,
                    Err(err) => return bad_setting(&err),
                };
                audit(
                    &cli.connect,
                    &stream,
                    dead_letter_stream.as_deref(),
                    published,
                    run.as_deref(),
                )
                .await
            }
            Command::Health(args) => health(&cli.connect, &args).await,
            Command::Work(args) => work(&cli.connect, &args).await,
            Command::Ctl { action } => ctl(&cli.connect, action).await,
            Command::Streams { action } => manage(&cli.connect, Managed::Streams(action)).await,
            Command::Groups { action } => manage(&cli.connect, Managed::Groups(action)).await,
            Command::Bench {
                messages,
                workers,
                processes,
                strategies,
                latency_rate,
                latency_seconds,
                steady_rate,
                steady_seconds,
                json,
                svg,
            } => {
                let config = optimus::bench::BenchConfig {
                    redis_url: cli.connect.redis_url.clone(),
                    messages,
                    workers,
                    processes: processes.into_iter().filter(|&n| n > 0).collect(),
                    strategies,
                    latency_rate,
                    latency_duration: std::time::Duration::from_secs(latency_seconds),
                    steady_rate,
                    steady_duration: std::time::Duration::from_secs(steady_seconds),
                    json_out: json,
                    svg_out: svg,
                    exe: std::env::current_exe().expect("the path of this program"),
                };
                bench(&config).await
            }
        }
    })
}

async fn consume(connect: &ConnectArgs, args: &ConsumeArgs) -> ExitCode {
    let config = match args.to_config(connect) {
        Ok(config) => config,
        Err(err) => return bad_setting(&err),
    };
    if let Some(raw) = &args.queue_capacity {
        tracing::warn!(
            "QUEUE_CAPACITY={raw} is no longer used and is ignored: the memory bound is MEMORY_LIMIT (bytes)"
        );
    }
    let controls = match Controls::parse(&args.metrics_addr, &args.idle_timeout) {
        Ok(controls) => controls,
        Err(err) => return bad_setting(&err),
    };
    let endpoint = config.server().clone();
    let bridge = match Bridge::new(config) {
        Ok(bridge) => bridge,
        Err(err) => return bad_setting(&err),
    };
    let shutdown = shutdown_on_signal();
    let counters = bridge.counters();
    let started = controls
        .start(
            &endpoint,
            move || optimus::control::Activity {
                count: counters.received.load(std::sync::atomic::Ordering::Relaxed),
                redis_up: counters.redis_up(),
            },
            || optimus::metrics::bridge_registry(bridge.counters()),
            &shutdown,
        )
        .await;
    if let Err(code) = started {
        return code;
    }
    match bridge.run(shutdown).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(BridgeError::Config(err)) => bad_setting(&err),
        Err(err @ BridgeError::MixedStrategies(_)) => {
            say!("optimus: {err}");
            ExitCode::from(2)
        }
        Err(err) => {
            say!("optimus: {err}");
            ExitCode::from(1)
        }
    }
}

async fn publish(connect: &ConnectArgs, args: &PublishArgs) -> ExitCode {
    let config = match args.to_config(connect) {
        Ok(config) => config,
        Err(err) => return bad_setting(&err),
    };
    match optimus::publish::run(&config, shutdown_on_signal()).await {
        Ok(summary) => {
            optimus::monitor::print_line(format_args!("publish done {summary}"));
            if summary.failed > 0 {
                say!(
                    "optimus: {} messages were never confirmed by Redis and may be lost",
                    summary.failed
                );
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            optimus::monitor::print_line(format_args!("publish failed {}", err.summary));
            say!("optimus: {err}");
            ExitCode::from(1)
        }
    }
}

async fn audit(
    connect: &ConnectArgs,
    stream: &str,
    dead_stream: Option<&str>,
    published: u64,
    run: Option<&str>,
) -> ExitCode {
    let endpoint = match connect.endpoint() {
        Ok(endpoint) => endpoint,
        Err(err) => return bad_setting(&err),
    };
    match optimus::audit::audit(&endpoint, stream, dead_stream, published, run).await {
        Ok(report) => {
            println!("{report}");
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(err) => {
            say!("optimus: cannot audit {stream}: {err}");
            ExitCode::from(1)
        }
    }
}

async fn work(connect: &ConnectArgs, args: &optimus::work::WorkArgs) -> ExitCode {
    let config = match connect
        .endpoint()
        .and_then(|endpoint| args.to_config(endpoint))
    {
        Ok(config) => config,
        Err(err) => return bad_setting(&err),
    };
    let controls = match Controls::parse(&args.metrics_addr, &args.idle_timeout) {
        Ok(controls) => controls,
        Err(err) => return bad_setting(&err),
    };
    let server = config.endpoint.to_string();
    let counters = std::sync::Arc::new(optimus::work::WorkCounters::default());
    let shutdown = shutdown_on_signal();
    let watched = counters.clone();
    let started = controls
        .start(
            &config.endpoint,
            move || {
                use std::sync::atomic::Ordering::Relaxed;
                optimus::control::Activity {
                    count: watched.handled.load(Relaxed) + watched.failed.load(Relaxed),
                    redis_up: watched.link.is_up(),
                }
            },
            || optimus::metrics::work_registry(counters.clone(), config.consumers),
            &shutdown,
        )
        .await;
    if let Err(code) = started {
        return code;
    }
    match optimus::work::run(config, counters, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err @ optimus::work::WorkError::Refused(_)) => {
            say!("optimus: Redis at {server} refused the workers: {err}");
            ExitCode::from(1)
        }
        Err(err) => {
            say!("optimus: {err}");
            ExitCode::from(1)
        }
    }
}

async fn ctl(connect: &ConnectArgs, action: CtlAction) -> ExitCode {
    let endpoint = match connect.endpoint() {
        Ok(endpoint) => endpoint,
        Err(err) => return bad_setting(&err),
    };
    let server = endpoint.to_string();
    // `ctl scale`'s total, checked before anything is changed.
    let total = match &action {
        CtlAction::Scale { workers, yes, .. } => {
            match optimus::control::parse_total(workers.as_deref(), *yes) {
                Ok(total) => total,
                Err(err) => return bad_setting(&err),
            }
        }
        _ => None,
    };
    let result = async {
        let mut conn = optimus::connect::open(&endpoint).await?;
        match action {
            CtlAction::Status {
                work_consumers_list,
            } => Ok(optimus::control::status(&mut conn, &work_consumers_list, endpoint.is_cluster())
                .await?
                .to_string()),
            CtlAction::Stop => {
                let who = format!("{}:{}", optimus::bridge::host_name(), std::process::id());
                optimus::control::stop(&mut conn, &who).await?;
                Ok(format!(
                    "kill switch set ({}): every consume and work process stops within seconds",
                    optimus::control::STOP_KEY
                ))
            }
            CtlAction::Scale { .. } => {
                let workers = total;
                optimus::control::set_scale(&mut conn, workers).await?;
                if workers == Some(0) {
                    return Ok(
                        "total bridge workers set to 0: no consume process bridges anything now (ctl scale N or --off to resume)".to_string(),
                    );
                }
                Ok(match workers {
                    Some(n) => {
                        format!("total bridge workers set to {n}: the consume processes share them")
                    }
                    None => {
                        "total cleared: each consume process runs its CONSUMERS_COUNT".to_string()
                    }
                })
            }
            CtlAction::Strategy { strategy, stream } => {
                let db = endpoint
                    .info()
                    .map_or(0, |info| info.redis_settings().db());
                let pool = optimus::bridge::delivery::Pool::in_db(&stream, db);
                optimus::control::hand_over(&mut conn, &pool, strategy).await
            }
            CtlAction::Resume => Ok(if optimus::control::resume(&mut conn).await? {
                "kill switch cleared: processes may run again".to_string()
            } else {
                "kill switch was not set".to_string()
            }),
        }
    }
    .await;
    let result: Result<String, redis::RedisError> = result;
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            say!(
                "optimus: Redis at {server}: {}",
                optimus::connect::explain(&err)
            );
            ExitCode::from(1)
        }
    }
}

/// What `consume` and `work` share around their run: METRICS_ADDR and
/// IDLE_TIMEOUT.
struct Controls {
    metrics_addr: Option<std::net::SocketAddr>,
    idle_timeout: Option<std::time::Duration>,
}

impl Controls {
    fn parse(
        metrics_addr: &Option<String>,
        idle_timeout: &Option<String>,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            metrics_addr: optimus::config::parse_metrics_addr(metrics_addr.as_deref())?,
            idle_timeout: optimus::config::parse_idle_timeout(idle_timeout.as_deref())?,
        })
    }

    /// Watches the kill switch and, with IDLE_TIMEOUT, the `activity` count;
    /// with METRICS_ADDR, serves the `registry`. An address that cannot be
    /// listened on is a bad setting.
    async fn start(
        self,
        endpoint: &optimus::config::Endpoint,
        activity: impl Fn() -> optimus::control::Activity + Send + 'static,
        registry: impl FnOnce() -> prometheus_client::registry::Registry,
        shutdown: &CancellationToken,
    ) -> Result<(), ExitCode> {
        tokio::spawn(optimus::control::watch(
            endpoint.clone(),
            activity,
            self.idle_timeout,
            shutdown.clone(),
        ));
        let Some(addr) = self.metrics_addr else {
            return Ok(());
        };
        match optimus::metrics::serve(addr, registry(), shutdown.clone()).await {
            Ok(_) => {
                tracing::info!(%addr, "serving metrics on /metrics");
                Ok(())
            }
            Err(err) => {
                say!("optimus: invalid METRICS_ADDR=\"{addr}\": cannot listen there: {err}");
                Err(ExitCode::from(2))
            }
        }
    }
}

async fn health(connect: &ConnectArgs, args: &optimus::health::HealthArgs) -> ExitCode {
    use optimus::health::{Check, Level, Report};
    let (endpoint, config) = match connect
        .endpoint()
        .and_then(|endpoint| Ok((endpoint, args.to_config()?)))
    {
        Ok(both) => both,
        Err(err) => return bad_setting(&err),
    };
    let server = endpoint.to_string();
    let connected = optimus::connect::open(&endpoint).await;
    let report = match connected {
        Ok(mut conn) => optimus::health::check(&mut conn, &config).await,
        Err(err) => Report {
            checks: vec![Check {
                level: Level::Alert,
                name: "redis".into(),
                value: "-".into(),
                rule: format!("cannot reach {server}: {}", optimus::connect::explain(&err)),
            }],
        },
    };
    print!("{report}");
    ExitCode::from(report.level().exit_code())
}

enum Managed {
    Streams(StreamsAction),
    Groups(GroupsAction),
}

/// `optimus streams …` and `optimus groups …`: a table (or JSON) on stdout;
/// exit 1 for a missing stream or group or a Redis error, 2 for a deletion
/// without --yes.
async fn manage(connect: &ConnectArgs, what: Managed) -> ExitCode {
    use optimus::manage::{self, ManageError, Trim, render};
    let endpoint = match connect.endpoint() {
        Ok(endpoint) => endpoint,
        Err(err) => return bad_setting(&err),
    };
    // `streams trim`'s bound, checked before connecting.
    let trim = match &what {
        Managed::Streams(StreamsAction::Trim { maxlen, minid, .. }) => {
            Some(match (maxlen, minid) {
                (Some(n), _) => match optimus::config::parse_count("--maxlen", n, 0..=u64::MAX) {
                    Ok(n) => Trim::MaxLen(n),
                    Err(err) => return bad_setting(&err),
                },
                (None, Some(id)) => Trim::MinId(id.clone()),
                (None, None) => unreachable!("clap requires one"),
            })
        }
        _ => None,
    };
    let server = endpoint.to_string();
    let mut conn = match optimus::connect::open(&endpoint).await {
        Ok(conn) => conn,
        Err(err) => {
            say!(
                "optimus: cannot connect to Redis at {server}: {}",
                optimus::connect::explain(&err)
            );
            return ExitCode::from(1);
        }
    };
    let c = &mut conn;
    fn show<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce(&T) -> String) -> String {
        if json {
            serde_json::to_string_pretty(value).expect("plain data") + "\n"
        } else {
            text(value)
        }
    }
    let result: Result<String, ManageError> = match what {
        Managed::Streams(action) => match action {
            StreamsAction::List { json } => manage::list_streams(c)
                .await
                .map(|l| show(json, &l, |l| render::streams(l))),
            StreamsAction::Info { stream, json } => manage::stream_info(c, &stream)
                .await
                .map(|i| show(json, &i, render::stream)),
            StreamsAction::Create { stream } => manage::create_stream(c, &stream)
                .await
                .map(|()| format!("created stream {stream}\n")),
            StreamsAction::Delete { stream, yes } => manage::delete_stream(c, &stream, yes)
                .await
                .map(|()| format!("deleted stream {stream}\n")),
            StreamsAction::Trim { stream, .. } => {
                let trim = trim.expect("checked before connecting");
                manage::trim_stream(c, &stream, &trim)
                    .await
                    .map(|n| format!("trimmed {n} entries from {stream}\n"))
            }
        },
        Managed::Groups(action) => match action {
            GroupsAction::List { stream, json } => manage::list_groups(c, &stream)
                .await
                .map(|l| show(json, &l, |l| render::groups(l))),
            GroupsAction::Info {
                stream,
                group,
                json,
            } => manage::group_info(c, &stream, &group)
                .await
                .map(|d| show(json, &d, render::group)),
            GroupsAction::Create {
                stream,
                group,
                from,
                mkstream,
            } => manage::create_group(c, &stream, &group, &from, mkstream)
                .await
                .map(|()| format!("created group {group} of stream {stream} from {from}\n")),
            GroupsAction::Delete { stream, group, yes } => {
                manage::delete_group(c, &stream, &group, yes)
                    .await
                    .map(|()| format!("deleted group {group} of stream {stream}\n"))
            }
            GroupsAction::SetId { stream, group, id } => {
                manage::set_group_id(c, &stream, &group, &id)
                    .await
                    .map(|()| format!("group {group} of stream {stream} now at {id}\n"))
            }
        },
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(err @ ManageError::NotConfirmed(_)) => {
            say!("optimus: {err}");
            ExitCode::from(2)
        }
        Err(ManageError::Redis(err)) => {
            say!(
                "optimus: Redis at {server}: {}",
                optimus::connect::explain(&err)
            );
            ExitCode::from(1)
        }
        Err(err) => {
            say!("optimus: {err}");
            ExitCode::from(1)
        }
    }
}

async fn bench(config: &optimus::bench::BenchConfig) -> ExitCode {
    for path in [&config.json_out, &config.svg_out] {
        if let Err(err) = optimus::bench::check_out_path(path) {
            say!("optimus: {err:#}");
            return ExitCode::from(2);
        }
    }
    match optimus::bench::run(config).await {
        Ok(report) => {
            println!("{}", optimus::bench::table(&report));
            if report.failures() > 0 {
                say!(
                    "optimus: {} rows lost or duplicated messages",
                    report.failures()
                );
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            say!("optimus: bench failed: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// A command line clap cannot parse, as one line: clap's reason (and its
/// tip, when it has one), without the usage it prints after it.
fn usage_error(err: &clap::Error) -> String {
    let text = err.render().to_string();
    // The reason is the first paragraph ("…not provided:" lists what on the
    // lines after it).
    let reason = text
        .split("\n\n")
        .next()
        .unwrap_or("bad command line")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let reason = reason.trim_start_matches("error: ");
    let tip = text.lines().find_map(|l| l.trim().strip_prefix("tip: "));
    match tip {
        Some(tip) => format!("{reason} ({tip}); see optimus --help"),
        None => format!("{reason}; see optimus --help"),
    }
}

/// One line naming the variable, exit code 2.
fn bad_setting(err: &ConfigError) -> ExitCode {
    say!("optimus: {err}");
    ExitCode::from(2)
}

/// A token cancelled by the first SIGINT, SIGTERM or SIGHUP (a closed
/// terminal); the second one exits at once.
fn shutdown_on_signal() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).expect("cannot listen for SIGTERM");
    let mut int = signal(SignalKind::interrupt()).expect("cannot listen for SIGINT");
    let mut hup = signal(SignalKind::hangup()).expect("cannot listen for SIGHUP");
    let cancel = token.clone();
    tokio::spawn(async move {
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
            if n == 0 {
                cancel.cancel();
                tracing::info!(
                    "signal received: finishing the work in hand (again to exit at once)"
                );
            } else {
                tracing::warn!("second signal: exiting now");
                // `optimus work`'s handlers go with it.
                optimus::work::kill_handlers();
                std::process::exit(130);
            }
        }
    });
    token
}

fn init_logging(level: tracing::Level) {
    use tracing_subscriber::EnvFilter;
    // The redis crate's own warnings (a cluster node it could not reach,
    // say) are left out: optimus reports each failure itself, once, with
    // what to do; RUST_LOG=redis=warn brings them back.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,redis=error,optimus={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}
