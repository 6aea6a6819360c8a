//! `optimus streams` and `optimus groups`: look at and manage the streams the
//! bridge writes and their consumer groups.
//!
//! Every function checks what it is asked about first, so a missing stream or
//! group is a [`ManageError::Missing`] with a readable message, not a Redis
//! error; deleting needs an explicit yes.

use redis::aio::ConnectionLike;
use redis::streams::{StreamInfoConsumersReply, StreamInfoGroupsReply, StreamInfoStreamReply};
use serde::Serialize;

/// Why a management command did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// The stream or group does not exist (or the key is not a stream).
    #[error("{0}")]
    Missing(String),
    /// The thing to create exists already.
    #[error("{0}")]
    Exists(String),
    /// A deletion without `--yes`.
    #[error("refusing to delete {0} without --yes")]
    NotConfirmed(String),
    #[error("{}", crate::connect::explain(.0))]
    Redis(#[from] redis::RedisError),
}

type Result<T> = std::result::Result<T, ManageError>;

/// One stream, in a list.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StreamSummary {
    pub name: String,
    pub length: usize,
    pub groups: usize,
    pub last_id: String,
}

/// One stream, whole.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StreamInfo {
    pub name: String,
    pub length: usize,
    /// `None` for an empty stream.
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub last_generated_id: String,
    pub groups: Vec<GroupInfo>,
}

/// One consumer group of a stream.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    pub consumers: usize,
    /// Delivered to a consumer, not acknowledged yet.
    pub pending: usize,
    pub last_delivered_id: String,
    /// Entries not delivered to the group yet (`None` when Redis cannot tell,
    /// e.g. after deletions in the middle of the stream).
    pub lag: Option<usize>,
}

/// One consumer of a group.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: usize,
    /// Milliseconds since its last read.
    pub idle_ms: usize,
}

/// A group and its consumers.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupDetail {
    pub stream: String,
    pub group: GroupInfo,
    pub consumers: Vec<ConsumerInfo>,
}

/// How to trim a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trim {
    /// Keep the newest N entries.
    MaxLen(u64),
    /// Drop the entries with a lower id.
    MinId(String),
}

/// Every stream in the database (SCAN by type; on a cluster, on every
/// master), sorted by name.
pub async fn list_streams(conn: &mut crate::connect::Conn) -> Result<Vec<StreamSummary>> {
    let mut names = conn.keys_of_type("stream").await?;
    // SCAN may return a key twice.
    names.sort();
    names.dedup();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        // Deleted since the SCAN: leave it out.
        let Ok(info) = xinfo_stream(conn, &name).await else {
            continue;
        };
        out.push(StreamSummary {
            name,
            length: info.length,
            groups: info.groups,
            last_id: info.last_generated_id,
        });
    }
    Ok(out)
}

/// A stream's length, first and last entries, and its groups.
pub async fn stream_info<C: ConnectionLike>(conn: &mut C, stream: &str) -> Result<StreamInfo> {
    ensure_stream(conn, stream).await?;
    let info = xinfo_stream(conn, stream).await?;
    let groups = groups(conn, stream).await?;
    let id = |s: String| (!s.is_empty()).then_some(s);
    Ok(StreamInfo {
        name: stream.to_string(),
        length: info.length,
        first_id: id(info.first_entry.id),
        last_id: id(info.last_entry.id),
        last_generated_id: info.last_generated_id,
        groups,
    })
}

/// Creates an empty stream.
pub async fn create_stream<C: ConnectionLike>(conn: &mut C, stream: &str) -> Result<()> {
    if key_type(conn, stream).await? != "none" {
        return Err(ManageError::Exists(format!("{stream} exists already")));
    }
    // A group created with MKSTREAM and destroyed leaves the empty stream.
    let group = "optimus-create";
    redis::pipe()
        .atomic()
        .cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("$")
        .arg("MKSTREAM")
        .ignore()
        .cmd("XGROUP")
        .arg("DESTROY")
        .arg(stream)
        .arg(group)
        .ignore()
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Deletes a stream, entries and groups; `yes` must be given.
pub async fn delete_stream<C: ConnectionLike>(conn: &mut C, stream: &str, yes: bool) -> Result<()> {
    ensure_stream(conn, stream).await?;
    if !yes {
        return Err(ManageError::NotConfirmed(format!("stream {stream}")));
    }
    redis::cmd("DEL")
        .arg(stream)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Trims a stream exactly; returns how many entries were removed.
pub async fn trim_stream<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    trim: &Trim,
) -> Result<u64> {
    ensure_stream(conn, stream).await?;
    let mut cmd = redis::cmd("XTRIM");
    cmd.arg(stream);
    match trim {
        Trim::MaxLen(n) => cmd.arg("MAXLEN").arg(n),
        Trim::MinId(id) => cmd.arg("MINID").arg(id),
    };
    Ok(cmd.query_async(conn).await?)
}

/// The groups of a stream.
pub async fn list_groups<C: ConnectionLike>(conn: &mut C, stream: &str) -> Result<Vec<GroupInfo>> {
    ensure_stream(conn, stream).await?;
    groups(conn, stream).await
}

/// A group's consumers (XINFO CONSUMERS), with their pending counts and
/// idle times.
pub async fn consumers<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
) -> redis::RedisResult<Vec<ConsumerInfo>> {
    let reply: StreamInfoConsumersReply = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await?;
    Ok(reply
        .consumers
        .into_iter()
        .map(|c| ConsumerInfo {
            name: c.name,
            pending: c.pending,
            idle_ms: c.idle,
        })
        .collect())
}

/// A group and its consumers, with their pending counts and idle times.
pub async fn group_info<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
) -> Result<GroupDetail> {
    let info = find_group(conn, stream, group).await?;
    Ok(GroupDetail {
        stream: stream.to_string(),
        group: info,
        consumers: consumers(conn, stream, group).await?,
    })
}

/// Creates a group reading from `from` (an id, `$` for new entries only, `0`
/// for the whole stream); with `mkstream`, creates a missing stream too.
pub async fn create_group<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    from: &str,
    mkstream: bool,
) -> Result<()> {
    if !mkstream {
        ensure_stream(conn, stream).await?;
    }
    let mut cmd = redis::cmd("XGROUP");
    cmd.arg("CREATE").arg(stream).arg(group).arg(from);
    if mkstream {
        cmd.arg("MKSTREAM");
    }
    match cmd.query_async::<()>(conn).await {
        Err(err) if err.code() == Some("BUSYGROUP") => Err(ManageError::Exists(format!(
            "group {group} of stream {stream} exists already"
        ))),
        other => Ok(other?),
    }
}

/// Deletes a group (its pending entries are forgotten); `yes` must be given.
pub async fn delete_group<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    yes: bool,
) -> Result<()> {
    find_group(conn, stream, group).await?;
    if !yes {
        return Err(ManageError::NotConfirmed(format!(
            "group {group} of stream {stream}"
        )));
    }
    redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(stream)
        .arg(group)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Moves a group's last delivered id (`$`: the end; `0`: the start).
pub async fn set_group_id<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    id: &str,
) -> Result<()> {
    find_group(conn, stream, group).await?;
    redis::cmd("XGROUP")
        .arg("SETID")
        .arg(stream)
        .arg(group)
        .arg(id)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

async fn key_type<C: ConnectionLike>(conn: &mut C, key: &str) -> Result<String> {
    Ok(redis::cmd("TYPE").arg(key).query_async(conn).await?)
}

async fn ensure_stream<C: ConnectionLike>(conn: &mut C, stream: &str) -> Result<()> {
    match key_type(conn, stream).await?.as_str() {
        "stream" => Ok(()),
        "none" => Err(ManageError::Missing(format!("no stream named {stream}"))),
        other => Err(ManageError::Missing(format!(
            "{stream} is a {other}, not a stream"
        ))),
    }
}

async fn xinfo_stream<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
) -> Result<StreamInfoStreamReply> {
    Ok(redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query_async(conn)
        .await?)
}

async fn groups<C: ConnectionLike>(conn: &mut C, stream: &str) -> Result<Vec<GroupInfo>> {
    let reply: StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await?;
    Ok(reply
        .groups
        .into_iter()
        .map(|g| GroupInfo {
            name: g.name,
            consumers: g.consumers,
            pending: g.pending,
            last_delivered_id: g.last_delivered_id,
            lag: g.lag,
        })
        .collect())
}

async fn find_group<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
) -> Result<GroupInfo> {
    ensure_stream(conn, stream).await?;
    groups(conn, stream)
        .await?
        .into_iter()
        .find(|g| g.name == group)
        .ok_or_else(|| ManageError::Missing(format!("stream {stream} has no group named {group}")))
}

/// Text tables, columns aligned, numbers right-aligned.
pub mod render {
    use super::*;

    /// Rows under a header, every column as wide as its widest cell.
    pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for row in rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let numeric: Vec<bool> = (0..header.len())
            .map(|i| {
                !rows.is_empty()
                    && rows.iter().all(|r| {
                        r.get(i)
                            .is_some_and(|c| c == "-" || c.parse::<f64>().is_ok())
                    })
            })
            .collect();
        let line = |cells: Vec<&str>| -> String {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    out.push_str("  ");
                }
                let pad = widths[i].saturating_sub(cell.chars().count());
                if numeric[i] {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                } else {
                    out.push_str(cell);
                    if i + 1 < cells.len() {
                        out.push_str(&" ".repeat(pad));
                    }
                }
            }
            out.trim_end().to_string() + "\n"
        };
        let mut out = line(header.to_vec());
        for row in rows {
            out += &line(row.iter().map(String::as_str).collect());
        }
        out
    }

    fn lag(lag: Option<usize>) -> String {
        lag.map_or("-".into(), |l| l.to_string())
    }

    pub fn streams(list: &[StreamSummary]) -> String {
        if list.is_empty() {
            return "no streams\n".into();
        }
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.length.to_string(),
                    s.groups.to_string(),
                    s.last_id.clone(),
                ]
            })
            .collect();
        table(&["stream", "length", "groups", "last id"], &rows)
    }

    pub fn groups(list: &[GroupInfo]) -> String {
        if list.is_empty() {
            return "no groups\n".into();
        }
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|g| {
                vec![
                    g.name.clone(),
                    g.consumers.to_string(),
                    g.pending.to_string(),
                    lag(g.lag),
                    g.last_delivered_id.clone(),
                ]
            })
            .collect();
        table(
            &["group", "consumers", "pending", "lag", "last delivered"],
            &rows,
        )
    }

    pub fn stream(info: &StreamInfo) -> String {
        let none = || "-".to_string();
        let mut out = table(
            &["stream", "length", "first id", "last id"],
            &[vec![
                info.name.clone(),
                info.length.to_string(),
                info.first_id.clone().unwrap_or_else(none),
                info.last_id.clone().unwrap_or_else(none),
            ]],
        );
        out.push('\n');
        out += &groups(&info.groups);
        out
    }

    pub fn group(detail: &GroupDetail) -> String {
        let mut out = groups(std::slice::from_ref(&detail.group));
        out.push('\n');
        if detail.consumers.is_empty() {
            out += "no consumers\n";
            return out;
        }
        let rows: Vec<Vec<String>> = detail
            .consumers
            .iter()
            .map(|c| vec![c.name.clone(), c.pending.to_string(), c.idle_ms.to_string()])
            .collect();
        out += &table(&["consumer", "pending", "idle ms"], &rows);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::render::table;

    #[test]
    fn tables_align_text_left_and_numbers_right() {
        let out = table(
            &["name", "n"],
            &[
                vec!["a".into(), "100".into()],
                vec!["longer".into(), "2".into()],
            ],
        );
        assert_eq!(out, "name      n\na       100\nlonger    2\n");
    }
}
