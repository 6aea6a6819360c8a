//! `optimus audit`: checks a stream against one run of `optimus publish`.

use clap::Args;
use optimus::settings::parse_count;

use super::Exit;
use super::connect::ConnectArgs;

/// `optimus audit` flags.
#[derive(Debug, Clone, Args)]
#[command(allow_negative_numbers = true)]
pub struct AuditArgs {
    /// How many messages the publisher reported as published.
    #[arg(long)]
    pub published: String,
    /// The run to check (`run=` in the publisher's summary) [default: the latest].
    #[arg(long)]
    pub run: Option<String>,
    /// Stream to check.
    #[arg(long, env = "OUTPUT_STREAM", default_value = "messages:processed")]
    pub stream: String,
    /// The bridge's dead-letter stream, whose messages of the run count as
    /// dead, not lost [default: <stream>:dead].
    #[arg(long, env = "DEAD_LETTER_STREAM")]
    pub dead_letter_stream: Option<String>,
}

/// Prints the audit; exit 1 when the run is not exact.
pub async fn run(connect: &ConnectArgs, args: &AuditArgs) -> Result<(), Exit> {
    let published = parse_count(
        "--published",
        &args.published,
        0..=optimus::audit::MAX_PUBLISHED,
    )?;
    let endpoint = connect.endpoint()?;
    let stream = &args.stream;
    let report = optimus::audit::audit(
        &endpoint,
        stream,
        args.dead_letter_stream.as_deref(),
        published,
        args.run.as_deref(),
    )
    .await
    .map_err(|err| Exit::failed(format_args!("cannot audit {stream}: {err}")))?;
    println!("{report}");
    if report.ok() {
        Ok(())
    } else {
        Err(Exit::Failed(None))
    }
}
