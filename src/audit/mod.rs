//! `optimus audit`: compares a stream with one run of `optimus publish`, to
//! tell lost and duplicated messages (used by the demos and the chaos demo).
//!
//! Every test message carries its run's name (`run`), a unique id and a
//! sequence number `seq`; after a run of N messages the stream should hold
//! each `seq` in `0..N` of that run exactly once. Entries of other runs, and
//! entries that are not test messages, are counted apart (`others`) and do
//! not fail the audit: several runs, and other writers, can share a stream.
//!
//! [`any`] audits any stream instead, whoever wrote it: duplicates by
//! message id, order and gaps by a numeric field, what is missing against a
//! count or a list of ids.

pub mod any;

use std::collections::HashSet;
use std::fmt;

use redis::RedisError;
use redis::streams::StreamRangeReply;

/// What the stream holds of one run, against what was published.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditReport {
    /// The run audited.
    pub run: String,
    pub published: u64,
    /// Entries of this run.
    pub in_stream: u64,
    /// Entries of this run whose message id, or sequence number, appeared
    /// before.
    pub duplicates: u64,
    /// Sequence numbers below `published` with no entry.
    pub lost: u64,
    /// Entries of this run that cannot be one of its messages (no `seq`, or
    /// one beyond `published`).
    pub unexpected: u64,
    /// Entries of other runs, or not test messages at all.
    pub others: u64,
    /// Messages of this run in the dead-letter stream instead (a payload
    /// over MAX_PAYLOAD_BYTES, one the stream refused): not lost.
    pub dead: u64,
}

impl AuditReport {
    /// Whether the stream holds the run exactly: nothing lost, nothing
    /// twice, nothing unexpected.
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.unexpected == 0
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "audit run={} published={} in_stream={} dead={} lost={} duplicates={} unexpected={} others={}",
            self.run,
            self.published,
            self.in_stream,
            self.dead,
            self.lost,
            self.duplicates,
            self.unexpected,
            self.others
        )
    }
}

/// Why there is no report.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{}", crate::connect::explain(.0))]
    Redis(#[from] RedisError),
    #[error("stream {0} does not exist")]
    NoStream(String),
    #[error("{0} is not a stream (it is a {1})")]
    NotAStream(String, String),
    #[error(
        "stream {0} holds no message of a run of optimus publish: to audit any stream, give --count N, --ids FILE or --seq-field NAME instead of --published"
    )]
    NoRun(String),
    #[error("--published {0} is more than an audit can check ({MAX_PUBLISHED})")]
    TooMany(u64),
}

/// The most messages one audit checks (a bit each).
pub const MAX_PUBLISHED: u64 = 1_000_000_000;

/// Which sequence numbers of `0..n` have been seen: a bit each.
struct Seen {
    bits: Vec<u64>,
}

impl Seen {
    fn new(n: u64) -> Self {
        Self {
            bits: vec![0; n.div_ceil(64) as usize],
        }
    }

    /// Marks `seq`; returns whether it was marked already.
    fn mark(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        let before = self.bits[word] & bit != 0;
        self.bits[word] |= bit;
        before
    }

    fn count(&self) -> u64 {
        self.bits.iter().map(|w| w.count_ones() as u64).sum()
    }
}

/// A test message's run and sequence number, from its payload: a JSON
/// object with a `run` or a `seq` (messages without a run, as the benchmark
/// sends, are the run named "").
fn run_and_seq(payload: &[u8]) -> Option<(String, Option<u64>)> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let seq = value.get("seq").and_then(|s| s.as_u64());
    let run = match value.get("run") {
        Some(run) => run.as_str()?.to_string(),
        None if seq.is_some() => String::new(),
        None => return None,
    };
    Some((run, seq))
}

/// That `stream` exists and is a stream.
async fn check_stream<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
) -> Result<(), AuditError> {
    let kind: String = redis::cmd("TYPE").arg(stream).query_async(conn).await?;
    match kind.as_str() {
        "stream" => Ok(()),
        "none" => Err(AuditError::NoStream(stream.to_string())),
        other => Err(AuditError::NotAStream(
            stream.to_string(),
            other.to_string(),
        )),
    }
}

/// The stream's entries in pages of `count`, oldest first (`reverse`:
/// newest first), handed to `each` until it returns false.
async fn scan<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    reverse: bool,
    mut each: impl FnMut(&redis::streams::StreamId) -> bool,
) -> Result<(), RedisError> {
    let (command, mut from, to) = if reverse {
        ("XREVRANGE", "+".to_string(), "-")
    } else {
        ("XRANGE", "-".to_string(), "+")
    };
    loop {
        let page: StreamRangeReply = redis::cmd(command)
            .arg(stream)
            .arg(&from)
            .arg(to)
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await?;
        let Some(last) = page.ids.last() else {
            return Ok(());
        };
        from = format!("({}", last.id);
        for entry in &page.ids {
            if !each(entry) {
                return Ok(());
            }
        }
    }
}

/// Reads the whole stream (in pages) and checks the run `run` (by default
/// the latest run in the stream) against `published`; the run's messages in
/// the dead-letter stream (`dead_stream`, by default the stream's) count as
/// `dead`, not lost.
pub async fn audit(
    endpoint: &crate::connect::Endpoint,
    stream: &str,
    dead_stream: Option<&str>,
    published: u64,
    run: Option<&str>,
) -> Result<AuditReport, AuditError> {
    if published > MAX_PUBLISHED {
        return Err(AuditError::TooMany(published));
    }
    let mut conn = crate::connect::open(endpoint).await?;
    check_stream(&mut conn, stream).await?;
    let run = match run {
        Some(run) => run.to_string(),
        None => {
            let mut latest = None;
            scan(&mut conn, stream, true, |entry| {
                let payload: Vec<u8> = entry.get("payload").unwrap_or_default();
                latest = run_and_seq(&payload).map(|(run, _)| run);
                latest.is_none()
            })
            .await?;
            latest.ok_or_else(|| AuditError::NoRun(stream.to_string()))?
        }
    };
    let mut report = AuditReport {
        run: run.clone(),
        published,
        ..AuditReport::default()
    };
    let mut ids = HashSet::new();
    let mut seen = Seen::new(published);
    scan(&mut conn, stream, false, |entry| {
        let payload: Vec<u8> = entry.get("payload").unwrap_or_default();
        let seq = match run_and_seq(&payload) {
            Some((r, seq)) if r == run => seq,
            _ => {
                report.others += 1;
                return true;
            }
        };
        report.in_stream += 1;
        let id: Option<Vec<u8>> = entry.get("message_id");
        if !ids.insert(id.unwrap_or_default()) {
            report.duplicates += 1;
            return true;
        }
        match seq {
            Some(s) if s < published => {
                if seen.mark(s) {
                    report.duplicates += 1;
                }
            }
            _ => report.unexpected += 1,
        }
        true
    })
    .await?;
    let dead_stream = dead_stream
        .map(str::to_string)
        .unwrap_or_else(|| crate::keys::default_dead_stream(stream, endpoint.is_cluster()));
    scan(&mut conn, &dead_stream, false, |entry| {
        let payload: Vec<u8> = entry.get("payload").unwrap_or_default();
        if let Some((r, Some(s))) = run_and_seq(&payload)
            && r == run
            && s < published
            && !seen.mark(s)
        {
            report.dead += 1;
        }
        true
    })
    .await?;
    report.lost = published - seen.count();
    Ok(report)
}
