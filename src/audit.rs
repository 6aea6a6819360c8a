//! `optimus audit`: compares a stream with what `optimus publish` sent, to
//! tell lost and duplicated messages (used by the chaos demo).
//!
//! Every test message carries a unique `message_id` and a sequence number
//! `seq`; after a publisher run of N messages the stream should hold each
//! `seq` in `0..N` exactly once.

use std::collections::HashSet;
use std::fmt;

use redis::RedisError;
use redis::streams::StreamRangeReply;

/// What the stream holds, against what was published.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditReport {
    pub published: u64,
    pub in_stream: u64,
    /// Entries whose message id appeared before.
    pub duplicates: u64,
    /// Sequence numbers below `published` that are not in the stream.
    pub lost: u64,
    /// Entries that are not test messages of this run (no `seq`, or beyond it).
    pub unexpected: u64,
}

impl AuditReport {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicates == 0
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "audit published={} in_stream={} lost={} duplicates={} unexpected={}",
            self.published, self.in_stream, self.lost, self.duplicates, self.unexpected
        )
    }
}

/// Reads the whole stream (in pages) and checks it against `published`.
pub async fn audit(
    endpoint: &crate::connect::Endpoint,
    stream: &str,
    published: u64,
) -> Result<AuditReport, RedisError> {
    let mut conn = crate::connect::open(endpoint).await?;
    let mut report = AuditReport {
        published,
        ..AuditReport::default()
    };
    let mut ids = HashSet::new();
    let mut seen = vec![false; published as usize];
    let mut start = "-".to_string();
    loop {
        let page: StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await?;
        let Some(last) = page.ids.last() else { break };
        start = format!("({}", last.id);
        for entry in &page.ids {
            report.in_stream += 1;
            let id: Option<Vec<u8>> = entry.get("message_id");
            if !ids.insert(id.unwrap_or_default()) {
                report.duplicates += 1;
                continue;
            }
            let payload: Vec<u8> = entry.get("payload").unwrap_or_default();
            let seq = serde_json::from_slice::<serde_json::Value>(&payload)
                .ok()
                .and_then(|v| v["seq"].as_u64());
            match seq {
                Some(s) if s < published => seen[s as usize] = true,
                _ => report.unexpected += 1,
            }
        }
    }
    report.lost = seen.iter().filter(|s| !**s).count() as u64;
    Ok(report)
}
