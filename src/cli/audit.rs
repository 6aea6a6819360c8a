//! `optimus audit`: checks a stream against one run of `optimus publish`
//! (`--published N`), or any stream against its message ids, a numeric
//! sequence field, a count or a list of ids.

use clap::Args;
use optimus::settings::parse_count;

use super::Exit;
use super::connect::ConnectArgs;

/// `optimus audit` flags.
#[derive(Debug, Clone, Args)]
#[command(allow_negative_numbers = true)]
pub struct AuditArgs {
    /// How many messages a run of `optimus publish` reported as published:
    /// checks that run's test messages (`seq` 0..N, each once). Without it
    /// any stream is audited (the flags below).
    #[arg(long, conflicts_with_all = ["count", "ids", "seq_field", "id_field", "seq_from"])]
    pub published: Option<String>,
    /// The run to check (`run=` in the publisher's summary) [default: the
    /// latest]; with --published.
    #[arg(long, requires = "published")]
    pub run: Option<String>,
    /// Any stream: how many distinct messages it should hold (with the
    /// dead-letter stream's); fewer are lost, more unexpected.
    #[arg(long, conflicts_with = "ids")]
    pub count: Option<String>,
    /// Any stream: a file of the message ids it should hold, one per line;
    /// ids in neither stream are lost, entries not in the list unexpected.
    #[arg(long, value_name = "FILE")]
    pub ids: Option<std::path::PathBuf>,
    /// Any stream: the field carrying each message's id (an entry field,
    /// else a field of the JSON payload); two entries with one id are a
    /// duplicate.
    #[arg(long, value_name = "NAME", default_value = "message_id")]
    pub id_field: String,
    /// Any stream: a numeric field (entry field, else in the JSON payload)
    /// in publish order, such as `seq`: entries below an earlier one are
    /// out of order, numbers missing between the lowest and the highest
    /// are gaps.
    #[arg(long, value_name = "NAME")]
    pub seq_field: Option<String>,
    /// With --seq-field and --count: the first number expected [default:
    /// the lowest seen]; the count's numbers from it are expected, missing
    /// ones lost, others unexpected.
    #[arg(long, value_name = "N", requires_all = ["seq_field", "count"])]
    pub seq_from: Option<u64>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Stream to check.
    #[arg(long, env = "OUTPUT_STREAM", default_value = "messages:processed")]
    pub stream: String,
    /// The bridge's dead-letter stream, whose messages count as dead, not
    /// lost [default: <stream>:dead].
    #[arg(long, env = "DEAD_LETTER_STREAM")]
    pub dead_letter_stream: Option<String>,
}

/// Prints the audit; exit 1 when the stream is not exact.
pub async fn run(connect: &ConnectArgs, args: &AuditArgs) -> Result<(), Exit> {
    let endpoint = connect.endpoint()?;
    let stream = &args.stream;
    let dead = args.dead_letter_stream.as_deref();
    let failed = |err: optimus::audit::AuditError| {
        Exit::failed(format_args!("cannot audit {stream}: {err}"))
    };
    let ok = if let Some(published) = &args.published {
        let published = parse_count("--published", published, 0..=optimus::audit::MAX_PUBLISHED)?;
        let report = optimus::audit::audit(&endpoint, stream, dead, published, args.run.as_deref())
            .await
            .map_err(failed)?;
        show(&report, args.json);
        report.ok()
    } else {
        let expect = expectation(args)?;
        let report = optimus::audit::any::audit_stream(&endpoint, stream, dead, &expect)
            .await
            .map_err(failed)?;
        if report.entries > 0 && report.without_id == report.entries {
            eprintln!(
                "optimus: no entry of {stream} has a field {} (entry or JSON payload): duplicates are not checked; name the id's field with --id-field",
                expect.id_field
            );
        }
        if report.unchecked {
            eprintln!(
                "optimus: some entries lack the fields asked for (without_seq, without_id): they are not checked, and the audit fails"
            );
        }
        show(&report, args.json);
        report.ok()
    };
    if ok { Ok(()) } else { Err(Exit::Failed(None)) }
}

/// Prints a report as its line(s), or as one JSON object.
fn show(report: &(impl std::fmt::Display + serde::Serialize), json: bool) {
    match json {
        true => println!("{}", serde_json::to_string(report).expect("a report")),
        false => println!("{report}"),
    }
}

/// What any stream is held against, from the flags.
fn expectation(args: &AuditArgs) -> Result<optimus::audit::any::Expect, Exit> {
    let count = match &args.count {
        Some(count) => Some(parse_count("--count", count, 0..=u64::MAX)?),
        None => None,
    };
    let ids = match &args.ids {
        Some(path) => {
            let text = std::fs::read(path).map_err(|err| {
                Exit::Refused(format!("--ids: cannot read {}: {err}", path.display()))
            })?;
            Some(optimus::audit::any::read_ids(&text))
        }
        None => None,
    };
    if args.id_field.is_empty() {
        return Err(Exit::Refused("--id-field must not be empty".into()));
    }
    if args.seq_field.as_deref() == Some("") {
        return Err(Exit::Refused("--seq-field must not be empty".into()));
    }
    Ok(optimus::audit::any::Expect {
        id_field: args.id_field.clone(),
        seq_field: args.seq_field.clone(),
        seq_from: args.seq_from,
        count,
        ids,
    })
}
