//! `optimus streams …` and `optimus groups …`: a table (or JSON) on stdout;
//! exit 1 for a missing stream or group or a Redis error, 2 for a deletion
//! without --yes.

use clap::Subcommand;
use optimus::Conn;
use optimus::manage::{self, ManageError, Trim, render};
use optimus::settings::parse_count;

use super::Exit;
use super::connect::ConnectArgs;

#[derive(Subcommand)]
pub enum StreamsAction {
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
pub enum GroupsAction {
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

pub enum Managed {
    Streams(StreamsAction),
    Groups(GroupsAction),
}

/// Carries out the action and prints its table, JSON or line.
pub async fn run(connect: &ConnectArgs, what: Managed) -> Result<(), Exit> {
    let endpoint = connect.endpoint()?;
    // `streams trim`'s bound, checked before connecting.
    let trim = match &what {
        Managed::Streams(StreamsAction::Trim { maxlen, minid, .. }) => {
            Some(match (maxlen, minid) {
                (Some(n), _) => Trim::MaxLen(parse_count("--maxlen", n, 0..=u64::MAX)?),
                (None, Some(id)) => Trim::MinId(id.clone()),
                (None, None) => unreachable!("clap requires one"),
            })
        }
        _ => None,
    };
    let server = endpoint.to_string();
    let mut conn = optimus::connect::open(&endpoint).await.map_err(|err| {
        Exit::failed(format_args!(
            "cannot connect to Redis at {server}: {}",
            optimus::connect::explain(&err)
        ))
    })?;
    let result = match what {
        Managed::Streams(action) => streams(&mut conn, action, trim).await,
        Managed::Groups(action) => groups(&mut conn, action).await,
    };
    match result {
        Ok(text) => {
            print!("{text}");
            Ok(())
        }
        Err(err @ ManageError::NotConfirmed(_)) => Err(Exit::Refused(err.to_string())),
        Err(ManageError::Redis(err)) => Err(Exit::redis(&server, &err)),
        Err(err) => Err(Exit::failed(err)),
    }
}

/// JSON, or the table `text` makes.
fn show<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce(&T) -> String) -> String {
    if json {
        serde_json::to_string_pretty(value).expect("plain data") + "\n"
    } else {
        text(value)
    }
}

async fn streams(
    c: &mut Conn,
    action: StreamsAction,
    trim: Option<Trim>,
) -> Result<String, ManageError> {
    match action {
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
    }
}

async fn groups(c: &mut Conn, action: GroupsAction) -> Result<String, ManageError> {
    match action {
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
        GroupsAction::SetId { stream, group, id } => manage::set_group_id(c, &stream, &group, &id)
            .await
            .map(|()| format!("group {group} of stream {stream} now at {id}\n")),
    }
}
