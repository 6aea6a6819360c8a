//! `optimus audit` of any stream, whoever wrote it: duplicates by message
//! id, order and gaps by a numeric field, and what is missing against a
//! count or a list of ids.
//!
//! Each entry's message id is its field `id_field` (the bridge writes
//! `message_id`), or, when the entry has no such field, the same field of
//! its payload when that is a JSON object. Its sequence number, with a
//! `seq_field`, is found the same way (an integer, or a string of digits).
//! Two entries with one id are one message written twice; without ids, two
//! entries with one sequence number are. The dead-letter stream's messages
//! count as dead, not lost.

use std::collections::HashSet;
use std::fmt;

use redis::streams::StreamId;
use serde::Serialize;

use super::{AuditError, check_stream, scan};

/// What to hold the stream against.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// The field carrying each message's id.
    pub id_field: String,
    /// The numeric field giving the publish order, if any.
    pub seq_field: Option<String>,
    /// How many distinct messages should be there.
    pub count: Option<u64>,
    /// With a seq field and a count: the first number expected (by default
    /// the lowest seen); the count's numbers from it are expected, others
    /// unexpected.
    pub seq_from: Option<u64>,
    /// Exactly these message ids should be there.
    pub ids: Option<HashSet<Vec<u8>>>,
}

/// What the stream holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StreamAudit {
    pub stream: String,
    /// Entries read.
    pub entries: u64,
    /// Distinct messages among them.
    pub messages: u64,
    /// Entries that repeat a message already in the stream.
    pub duplicates: u64,
    /// Entries with neither an id nor (with a seq field) a sequence number:
    /// not checked for duplicates.
    pub without_id: u64,
    /// With a seq field: entries without one.
    pub without_seq: u64,
    /// With a seq field: entries whose number is below one of an entry
    /// before them.
    pub out_of_order: u64,
    /// With a seq field: the lowest and highest numbers seen.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// With a seq field: numbers between the lowest and the highest with no
    /// entry (in the stream or the dead-letter stream), and the first of
    /// their ranges.
    pub gaps: u64,
    pub gap_ranges: Vec<(u64, u64)>,
    /// With a count or an id list: how many messages were expected, how many
    /// of them are in neither stream, and how many in the stream were not
    /// expected (beyond the count, or not in the list).
    pub expected: Option<u64>,
    pub lost: u64,
    pub unexpected: u64,
    /// Messages in the dead-letter stream and not in the stream.
    pub dead: u64,
    /// Entries the audit was asked to check and could not: without the
    /// seq field when one was given, or without an id against an id list.
    pub unchecked: bool,
}

/// The most gap ranges a report lists.
const GAP_RANGES: usize = 10;

impl StreamAudit {
    /// Whether the stream holds what was expected, each message once, in
    /// order, without gaps.
    pub fn ok(&self) -> bool {
        self.duplicates + self.out_of_order + self.gaps + self.lost + self.unexpected == 0
            && !self.unchecked
    }
}

impl fmt::Display for StreamAudit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "audit stream={} entries={} messages={} duplicates={} without_id={}",
            self.stream, self.entries, self.messages, self.duplicates, self.without_id
        )?;
        if let (Some(first), Some(last)) = (self.first_seq, self.last_seq) {
            write!(
                f,
                " seq={first}..{last} out_of_order={} gaps={} without_seq={}",
                self.out_of_order, self.gaps, self.without_seq
            )?;
        } else if self.without_seq > 0 {
            write!(f, " without_seq={}", self.without_seq)?;
        }
        if let Some(expected) = self.expected {
            write!(
                f,
                " expected={expected} lost={} unexpected={}",
                self.lost, self.unexpected
            )?;
        }
        write!(f, " dead={}", self.dead)?;
        if self.unchecked {
            write!(f, " unchecked=yes")?;
        }
        if !self.gap_ranges.is_empty() {
            let ranges: Vec<String> = self
                .gap_ranges
                .iter()
                .map(|&(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            let listed: u64 = self.gap_ranges.iter().map(|&(a, b)| b - a + 1).sum();
            let more = if listed < self.gaps { ",…" } else { "" };
            write!(f, "\nmissing seq: {}{more}", ranges.join(","))?;
        }
        Ok(())
    }
}

/// A field of the entry, else of its JSON payload.
fn field(entry: &StreamId, name: &str, payload: &Option<serde_json::Value>) -> Option<Vec<u8>> {
    if let Some(value) = entry.get::<Vec<u8>>(name) {
        return Some(value);
    }
    match payload.as_ref()?.get(name)? {
        serde_json::Value::String(s) => Some(s.as_bytes().to_vec()),
        serde_json::Value::Null => None,
        other => Some(other.to_string().into_bytes()),
    }
}

fn parse_seq(raw: &[u8]) -> Option<u64> {
    std::str::from_utf8(raw).ok()?.trim().parse().ok()
}

/// A message's identity: its id, or without one its sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Id(Vec<u8>),
    Seq(u64),
}

/// One entry's id and sequence number.
fn read(entry: &StreamId, expect: &Expect) -> (Option<Vec<u8>>, Option<u64>) {
    // The payload is parsed only when a field is not the entry's own.
    let needs_payload = entry.get::<Vec<u8>>(&expect.id_field).is_none()
        || expect
            .seq_field
            .as_ref()
            .is_some_and(|s| entry.get::<Vec<u8>>(s).is_none());
    let payload = needs_payload
        .then(|| entry.get::<Vec<u8>>("payload"))
        .flatten()
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok())
        .filter(|v| v.is_object());
    let id = field(entry, &expect.id_field, &payload);
    let seq = expect
        .seq_field
        .as_ref()
        .and_then(|name| field(entry, name, &payload))
        .and_then(|raw| parse_seq(&raw));
    (id, seq)
}

/// Reads the whole stream (in pages) and its dead-letter stream, and holds
/// them against `expect`.
pub async fn audit_stream(
    endpoint: &crate::connect::Endpoint,
    stream: &str,
    dead_stream: Option<&str>,
    expect: &Expect,
) -> Result<StreamAudit, AuditError> {
    let mut conn = crate::connect::open(endpoint).await?;
    check_stream(&mut conn, stream).await?;
    let mut report = StreamAudit {
        stream: stream.to_string(),
        ..StreamAudit::default()
    };
    let mut seen: HashSet<Key> = HashSet::new();
    let mut seqs: Vec<u64> = Vec::new();
    let mut highest: Option<u64> = None;
    scan(&mut conn, stream, false, |entry| {
        report.entries += 1;
        let (id, seq) = read(entry, expect);
        if expect.seq_field.is_some() && seq.is_none() {
            report.without_seq += 1;
        }
        let key = match (id, seq) {
            (Some(id), _) => Key::Id(id),
            (None, Some(seq)) => Key::Seq(seq),
            (None, None) => {
                report.without_id += 1;
                return true;
            }
        };
        if !seen.insert(key.clone()) {
            report.duplicates += 1;
            return true;
        }
        if let Some(seq) = seq {
            if highest.is_some_and(|h| seq < h) {
                report.out_of_order += 1;
            }
            highest = highest.max(Some(seq));
            seqs.push(seq);
        }
        if let (Some(ids), Key::Id(id)) = (&expect.ids, &key)
            && !ids.contains(id)
        {
            report.unexpected += 1;
        }
        true
    })
    .await?;
    report.messages = seen.len() as u64;

    // The dead-letter stream's messages (not those also in the stream).
    let dead_stream = dead_stream
        .map(str::to_string)
        .unwrap_or_else(|| crate::keys::default_dead_stream(stream, endpoint.is_cluster()));
    let mut dead: HashSet<Key> = HashSet::new();
    scan(&mut conn, &dead_stream, false, |entry| {
        let (id, seq) = read(entry, expect);
        let key = match (id, seq) {
            (Some(id), _) => Key::Id(id),
            (None, Some(seq)) => Key::Seq(seq),
            (None, None) => return true,
        };
        let listed = match (&expect.ids, &key) {
            (Some(ids), Key::Id(id)) => ids.contains(id),
            (Some(_), Key::Seq(_)) => false,
            (None, _) => true,
        };
        if listed && !seen.contains(&key) && dead.insert(key) {
            seqs.extend(seq);
        }
        true
    })
    .await?;
    report.dead = dead.len() as u64;

    if expect.seq_field.is_some() {
        seqs.sort_unstable();
        seqs.dedup();
        report.first_seq = seqs.first().copied();
        report.last_seq = seqs.last().copied();
        for pair in seqs.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if b > a + 1 {
                report.gaps += b - a - 1;
                if report.gap_ranges.len() < GAP_RANGES {
                    report.gap_ranges.push((a + 1, b - 1));
                }
            }
        }
    }
    report.unchecked = (expect.seq_field.is_some() && report.without_seq > 0)
        || (expect.ids.is_some() && report.without_id > 0);
    if let (Some(count), Some(_), Some(lowest)) =
        (expect.count, &expect.seq_field, report.first_seq)
    {
        // The count's numbers from the first expected: missing ones lost,
        // numbers outside unexpected (entries without one counted apart).
        let from = expect.seq_from.unwrap_or(lowest);
        let end = from.saturating_add(count);
        let inside = seqs.iter().filter(|&&n| n >= from && n < end).count() as u64;
        report.expected = Some(count);
        report.lost = count - inside;
        report.unexpected = seqs.len() as u64 - inside;
        return Ok(report);
    }
    if let Some(ids) = &expect.ids {
        report.expected = Some(ids.len() as u64);
        report.lost = ids
            .iter()
            .filter(|id| {
                let key = Key::Id(id.to_vec());
                !seen.contains(&key) && !dead.contains(&key)
            })
            .count() as u64;
    } else if let Some(count) = expect.count {
        // Entries without an id cannot be told apart: each counts as one.
        let have = report.messages + report.without_id + report.dead;
        report.expected = Some(count);
        report.lost = count.saturating_sub(have);
        report.unexpected = have.saturating_sub(count);
    }
    Ok(report)
}

/// Message ids, one per line (blank lines, spaces around an id, a `\r` and
/// a leading byte-order mark ignored).
pub fn read_ids(text: &[u8]) -> HashSet<Vec<u8>> {
    let text = text.strip_prefix("\u{feff}".as_bytes()).unwrap_or(text);
    text.split(|&b| b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|line| !line.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_list_skips_blank_lines_spaces_and_marks() {
        let ids = read_ids("\u{feff}a\r\n\n b \n  \nc".as_bytes());
        let want: HashSet<Vec<u8>> = [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()].into();
        assert_eq!(ids, want);
    }

    #[test]
    fn sequence_numbers_are_integers_or_digits() {
        assert_eq!(parse_seq(b"42"), Some(42));
        assert_eq!(parse_seq(b" 7 "), Some(7));
        assert_eq!(parse_seq(b"-1"), None);
        assert_eq!(parse_seq(b"1.5"), None);
    }
}
