//! The command line: clap lives here and only here. One file per command,
//! each going args -> config -> run -> what to print; [`run`] dispatches,
//! and every command ends in `Ok` or an [`Exit`], which `main` turns into the
//! exit code.

mod audit;
mod bench;
mod config_file;
mod connect;
mod consume;
mod controls;
mod ctl;
mod health;
mod logging;
mod manage;
mod publish;
mod signals;
mod top;
mod work;

use clap::{Parser, Subcommand};
use optimus::settings::{ConfigError, parse_log_level};

/// Bridge Redis Pub/Sub into a durable Redis Stream with a pool of cooperating workers.
///
/// Every setting can be given as an environment variable (shown in brackets)
/// or as the flag. Logs go to stderr; monitoring lines and summaries to stdout.
#[derive(Parser)]
#[command(name = "optimus", version, about, long_about)]
// A negative number is a value (rejected with the setting's own reason),
// not an unknown flag.
#[command(allow_negative_numbers = true)]
pub struct Cli {
    /// A TOML file of settings, keyed by the variables' names in lower case (`consumers_count = 3`); the environment and flags win over it (`optimus config` shows what each setting is and where it came from).
    #[arg(
        long,
        env = "OPTIMUS_CONFIG",
        value_name = "PATH",
        global = true,
        help_heading = "Connection and logging"
    )]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    connect: connect::ConnectArgs,
    /// Log level: TRACE, DEBUG, INFO, WARNING, ERROR or CRITICAL (RUST_LOG, when set, wins).
    #[arg(
        long,
        env = "LOGLEVEL",
        default_value = "INFO",
        global = true,
        help_heading = "Connection and logging"
    )]
    loglevel: String,
    /// Log format: text, or json (one object per line: timestamp, level, target, fields). NO_COLOR turns the text's colours off.
    #[arg(
        long,
        env = "LOG_FORMAT",
        default_value = "text",
        global = true,
        help_heading = "Connection and logging"
    )]
    log_format: String,
    /// Status lines on stdout (monitoring, progress, summaries): text (`kind key=value …`), or json (one object per line: `kind` and each value).
    #[arg(
        long,
        env = "MONITOR_FORMAT",
        default_value = "text",
        global = true,
        help_heading = "Connection and logging"
    )]
    monitor_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run N workers that subscribe to INPUT_CHANNEL (or every ROUTES source)
    /// and write every message to OUTPUT_STREAM (or its route's stream)
    /// exactly once, printing a monitoring line every MONITORING_INTERVAL.
    ///
    /// SIGINT, SIGTERM or SIGHUP stop reading, finish what was received, delete the presence
    /// keys and exit 0; a second signal exits at once.
    Consume(Box<consume::ConsumeArgs>),
    /// Publish timed batches of test messages ({"message_id": "<uuid>", "seq": n, "sent_ms": t}).
    Publish(publish::PublishArgs),
    /// Measure the bridge in one run (starts its own redis-server unless
    /// REDIS_URL is set, which it then FLUSHALLs): ceiling, throughput per
    /// worker count, commands, CPU and memory per message, latency; prints a
    /// table and writes JSON and an SVG chart. Exits 1 if any row lost or
    /// duplicated a message, or (fenced) wrote one out of publish order.
    Bench(bench::BenchArgs),
    /// Look at and manage streams: list, info, create, delete, trim.
    Streams {
        #[command(subcommand)]
        action: manage::StreamsAction,
    },
    /// Look at and manage the consumer groups of a stream and their consumers.
    Groups {
        #[command(subcommand)]
        action: manage::GroupsAction,
    },
    /// Read the output stream through a consumer group and run a handler for
    /// every entry: `optimus work -- <program> [args]` gets the payload on
    /// stdin; exit 0 acknowledges the entry, anything else leaves it pending
    /// to be retried. Idle entries are claimed from dead or hung consumers;
    /// after WORK_MAX_DELIVERIES an entry goes to the dead-letter stream.
    Work(work::WorkArgs),
    /// The control plane: `ctl stop` sets the kill switch (every consume and
    /// work process stops gracefully within a second or two), `ctl resume`
    /// clears it, `ctl scale N` sets the total number of bridge workers, `ctl
    /// strategy S` hands a running pool to another strategy, `ctl status`
    /// shows all that and the live processes.
    Ctl {
        #[command(subcommand)]
        action: ctl::CtlAction,
    },
    /// A live view in the terminal of every consume and work process (what
    /// `ctl status` reads, with each one's last monitoring figures) and of
    /// the streams' length and consumer groups, redrawn every second; `q`
    /// quits.
    Top(top::TopArgs),
    /// Check a stream, its consumer groups and the bridge's workers against
    /// ok / warn / alert thresholds: one line per check; exit 0 (ok), 1 (warn)
    /// or 2 (alert). Redis unreachable or the stream missing is an alert.
    Health(health::HealthArgs),
    /// Check a stream against one run of `optimus publish` (its `run=` name;
    /// by default the latest run in the stream): lost, duplicated and
    /// unexpected messages of that run. Entries of other runs are counted
    /// apart (`others`). Exits 0 when the run is exact, 1 otherwise (or when
    /// the stream does not exist).
    Audit(audit::AuditArgs),
    /// Print a shell's completion script on stdout (bash, zsh, fish, elvish,
    /// powershell): `optimus completions bash >
    /// /etc/bash_completion.d/optimus`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout: `optimus man > optimus.1`.
    Man,
    /// Print the settings `optimus consume` would run with, as TOML, each
    /// with where it came from (flag, environment, the --config file,
    /// default) and secrets masked; `--check` only checks them: exit 0, or
    /// 2 with one line naming the bad one.
    Config {
        /// Check the settings instead of printing them.
        #[arg(long)]
        check: bool,
    },
}

/// How a command that did not simply succeed ends: what `main` prints (one
/// line on stderr) and the exit code it returns.
#[derive(Debug)]
pub enum Exit {
    /// A setting that cannot be used: one line naming it, exit 2.
    Setting(ConfigError),
    /// A command line or request that cannot be carried out as given (a
    /// deletion without --yes, a strategy not let in): exit 2.
    Refused(String),
    /// A failure retrying cannot mend, or a result that is not good (lost
    /// messages, an audit that is not exact): exit 1, with a line when there
    /// is more to say than the output did.
    Failed(Option<String>),
    /// A check's level as its exit code (`optimus health`: 1 warn, 2 alert),
    /// its lines already printed.
    Level(u8),
}

impl From<ConfigError> for Exit {
    fn from(err: ConfigError) -> Self {
        Exit::Setting(err)
    }
}

impl Exit {
    /// A Redis error while talking to `server`, explained: exit 1.
    pub fn redis(server: &str, err: &redis::RedisError) -> Self {
        Exit::failed(format_args!(
            "Redis at {server}: {}",
            optimus::connect::explain(err)
        ))
    }

    /// A failure with one line to say.
    pub fn failed(line: impl std::fmt::Display) -> Self {
        Exit::Failed(Some(line.to_string()))
    }

    /// The exit code, and the line to print on stderr (without `optimus: `).
    pub fn code_and_line(self) -> (u8, Option<String>) {
        match self {
            Exit::Setting(err) => match config_file::origin(err.var) {
                Some(file) => (2, Some(format!("{err} (from {})", file.display()))),
                None => (2, Some(err.to_string())),
            },
            Exit::Refused(line) => (2, Some(line)),
            Exit::Failed(line) => (1, line),
            Exit::Level(code) => (code, None),
        }
    }
}

/// Whether the logs are JSON lines (LOG_FORMAT=json, set up): `main`
/// then logs its last error line as a JSON event rather than as text.
pub fn logs_are_json() -> bool {
    logging::json()
}

/// The parsed command line, or the exit for one that cannot be parsed:
/// `--help` and `--version` print and exit 0 here; a command given without
/// its subcommand shows its help; anything else is one line, exit 2.
pub fn parse() -> Result<Cli, Exit> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    config_file::load(&args)?;
    match Cli::try_parse_from(&args) {
        Ok(cli) => Ok(cli),
        Err(err)
            if !err.use_stderr()
                || err.kind()
                    == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            err.exit()
        }
        Err(err) => Err(Exit::Refused(usage_error(&err))),
    }
}

/// How the output looks: LOGLEVEL, LOG_FORMAT and MONITOR_FORMAT, checked.
struct Output {
    level: tracing::Level,
    logs: logging::LogFormat,
    status_lines: logging::LogFormat,
}

impl Cli {
    /// LOGLEVEL, LOG_FORMAT and MONITOR_FORMAT, as [`run`] reads them.
    fn output(&self) -> Result<Output, Exit> {
        use optimus::settings::parse_choice;
        Ok(Output {
            level: parse_log_level(&self.loglevel)?,
            logs: parse_choice("LOG_FORMAT", &self.log_format)?,
            status_lines: parse_choice("MONITOR_FORMAT", &self.monitor_format)?,
        })
    }
}

/// Runs the command: logging first, then the command on a tokio runtime.
pub fn run(cli: Cli) -> Result<(), Exit> {
    // What describes the command line itself needs neither logs nor Redis.
    match cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            signals::quiet_on_closed_pipe();
            clap_complete::generate(shell, &mut command, "optimus", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            signals::quiet_on_closed_pipe();
            return page
                .render(&mut std::io::stdout())
                .map_err(|err| Exit::failed(format_args!("cannot print the man page: {err}")));
        }
        Command::Config { check } => {
            signals::quiet_on_closed_pipe();
            return config_file::show(check);
        }
        _ => {}
    }
    let output = cli.output()?;
    logging::init(output.level, output.logs);
    optimus::monitor::set_json_lines(output.status_lines == logging::LogFormat::Json);
    if cli.command.is_one_shot() {
        signals::quiet_on_closed_pipe();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    let connect = cli.connect;
    runtime.block_on(async move {
        match cli.command {
            Command::Consume(args) => consume::run(&connect, &args).await,
            Command::Publish(args) => publish::run(&connect, &args).await,
            Command::Audit(args) => audit::run(&connect, &args).await,
            Command::Health(args) => health::run(&connect, &args).await,
            Command::Work(args) => work::run(&connect, &args).await,
            Command::Ctl { action } => ctl::run(&connect, action).await,
            Command::Top(args) => top::run(&connect, args).await,
            Command::Streams { action } => {
                manage::run(&connect, manage::Managed::Streams(action)).await
            }
            Command::Groups { action } => {
                manage::run(&connect, manage::Managed::Groups(action)).await
            }
            Command::Bench(args) => bench::run(&connect, args).await,
            Command::Completions { .. } | Command::Man | Command::Config { .. } => {
                unreachable!("answered before the runtime starts")
            }
        }
    })
}

impl Command {
    /// A one-shot command, whose output going to a pipe closed early (`|
    /// head`) ends it quietly, as Unix tools do. The long-running ones
    /// (consume, work, publish, bench) drop a line nobody reads and go on.
    fn is_one_shot(&self) -> bool {
        matches!(
            self,
            Command::Streams { .. }
                | Command::Groups { .. }
                | Command::Audit { .. }
                | Command::Ctl { .. }
                | Command::Health(_)
        )
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

/// A strategy's name on the command line (`ctl strategy`, `bench
/// --strategies`), with each choice explained in `--help`.
fn strategy_parser() -> impl clap::builder::TypedValueParser<Value = optimus::Strategy> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    use optimus::settings::Named;
    PossibleValuesParser::new([
        PossibleValue::new("fenced").help(
            "One writer per stream among the live processes, fenced by the stream's writer record; in publish order, no key per message",
        ),
        PossibleValue::new("race").help(
            "The design card's protocol: every worker races for every message's lock; the winner writes",
        ),
        PossibleValue::new("partitioned").hide(true),
    ])
    .map(|name| optimus::Strategy::from_name(&name).expect("one of the names offered"))
}
