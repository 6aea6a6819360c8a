//! The partitioned strategy's rules: who owns a message, and when a
//! non-owner may drop its copy without asking Redis.
//!
//! **Ownership.** The live workers (the members sorted set, renewed by each
//! worker's [`cycle`](super::delivery::Delivery::cycle)) form a [`View`]: the
//! sorted list of their ids. A message's owner is chosen from the view by a
//! hash of its raw bytes, so every worker holding the same view picks the
//! same owner, and identical payloads share one.
//!
//! **Marks.** Every cycle takes the next value of a clock (INCR) and, in the
//! same script, publishes it on the worker's own mark channel, to which its
//! subscription listens beside the input channel. Redis runs one command at a
//! time and delivers a connection's messages in order, so on that
//! subscription every message before the mark with clock `c` was published
//! before `c` was taken, and every message after it, after. A worker's
//! messages thus fall into *segments* between two of its marks, each
//! published within a known clock interval `(lo, hi)`.
//!
//! **Watermarks.** An owner that has been subscribed without a break and held
//! the same view since its mark `from`, and has written every message it owns
//! up to its mark `to`, stores the [`Watermark`] `(view, from, to)`: "every
//! message published between clock `from` and `to` that this view gives me
//! is in the stream". A non-owner drops a copy whose segment `(lo, hi)` lies
//! within the owner's watermark for the view the copy was assigned with.
//!
//! **Heartbeat.** With its watermark each worker stores a beat, a number its
//! every cycle increases: an owner far behind in its queue (a burst) moves its
//! watermark seldom, but beats on; a dead or stopped one does not.
//!
//! **Fallback.** Anything else (a copy received before the first mark after
//! a (re)subscription, a view that changed, an owner whose range does not
//! reach back to the copy, an owner silent for TAKEOVER_AFTER: dead, stopped,
//! stuck) is *taken over*: written with
//! the same set-ACK-if-absent-then-XADD step the owner uses, so whichever
//! comes second writes nothing. Exactly once never rests on the watermarks;
//! they only spare the non-owners a round trip per message.

use std::sync::Arc;

/// The sorted ids of the live workers, as one worker saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// xxh3 of the ids: names the view in watermarks.
    pub hash: u64,
    pub members: Arc<[String]>,
}

impl View {
    pub fn new(mut members: Vec<String>) -> Self {
        members.sort_unstable();
        members.dedup();
        let hash = xxhash_rust::xxh3::xxh3_64(members.join("\n").as_bytes());
        Self {
            hash,
            members: members.into(),
        }
    }

    /// The index (in `members`) of the owner of a message whose bytes hash to
    /// `hash`; `None` for an empty view.
    pub fn owner(&self, hash: u64) -> Option<usize> {
        (!self.members.is_empty()).then(|| jump_hash(hash, self.members.len()))
    }

    pub fn index_of(&self, worker: &str) -> Option<usize> {
        self.members
            .binary_search_by(|m| m.as_str().cmp(worker))
            .ok()
    }
}

/// Jump consistent hash (Lamping and Veach): a bucket in `0..buckets`.
fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2862933555777941757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

/// "Every message published between clock `from` and `to` that view `view`
/// gives me is in the stream."
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    pub view: u64,
    pub from: u64,
    pub to: u64,
}

impl Watermark {
    /// Whether a copy assigned with `view`, from the segment published
    /// between `lo` and `hi`, is covered.
    pub fn covers(&self, view: u64, lo: Option<u64>, hi: Option<u64>) -> bool {
        match (lo, hi) {
            (Some(lo), Some(hi)) => self.view == view && self.from <= lo && hi <= self.to,
            _ => false,
        }
    }

    /// Whether this watermark, if it keeps moving, will cover the segment
    /// starting at `lo` under `view`.
    pub fn heads_for(&self, view: u64, lo: Option<u64>) -> bool {
        lo.is_some_and(|lo| self.view == view && self.from <= lo)
    }
}

/// What a worker stores each cycle: its beat, and its watermark once it has
/// one. As text: `<beat>` or `<beat>:<view hex>:<from>:<to>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub beat: u64,
    pub watermark: Option<Watermark>,
}

impl Progress {
    pub fn encode(&self) -> String {
        match self.watermark {
            None => self.beat.to_string(),
            Some(w) => format!("{}:{:x}:{}:{}", self.beat, w.view, w.from, w.to),
        }
    }

    pub fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let beat = parts.next()?.parse().ok()?;
        let Some(view) = parts.next() else {
            return Some(Self {
                beat,
                watermark: None,
            });
        };
        let view = u64::from_str_radix(view, 16).ok()?;
        let from = parts.next()?.parse().ok()?;
        let to = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some(Self {
            beat,
            watermark: Some(Watermark { view, from, to }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(ids: &[&str]) -> View {
        View::new(ids.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn the_same_members_make_the_same_view_in_any_order() {
        let a = view(&["w2", "w1", "w3"]);
        let b = view(&["w3", "w2", "w1"]);
        assert_eq!(a, b);
        assert_eq!(a.index_of("w2"), Some(1));
        assert_eq!(a.index_of("w9"), None);
        assert_ne!(a.hash, view(&["w1", "w2"]).hash);
    }

    #[test]
    fn owners_are_spread_evenly() {
        let v = view(&["a", "b", "c", "d", "e", "f", "g", "h"]);
        let mut counts = [0usize; 8];
        for i in 0..80_000u64 {
            let hash = xxhash_rust::xxh3::xxh3_64(format!("message {i}").as_bytes());
            counts[v.owner(hash).unwrap()] += 1;
        }
        for (i, n) in counts.iter().enumerate() {
            assert!(
                (9_000..11_000).contains(n),
                "member {i} owns {n} of 80000: {counts:?}"
            );
        }
        assert_eq!(view(&[]).owner(1), None);
    }

    #[test]
    fn a_watermark_covers_only_whole_segments_of_its_own_view() {
        let wm = Watermark {
            view: 7,
            from: 10,
            to: 20,
        };
        assert!(wm.covers(7, Some(10), Some(20)));
        assert!(wm.covers(7, Some(12), Some(13)));
        assert!(!wm.covers(8, Some(12), Some(13)), "another view");
        assert!(!wm.covers(7, Some(9), Some(13)), "starts before the range");
        assert!(!wm.covers(7, Some(19), Some(21)), "ends after it");
        assert!(!wm.covers(7, None, Some(13)), "unknown start");
        assert!(!wm.covers(7, Some(12), None), "unknown end");
        assert!(wm.heads_for(7, Some(19)));
        assert!(!wm.heads_for(7, Some(9)));
    }

    #[test]
    fn progress_round_trips_through_text() {
        for progress in [
            Progress {
                beat: 3,
                watermark: None,
            },
            Progress {
                beat: 4,
                watermark: Some(Watermark {
                    view: u64::MAX,
                    from: 1,
                    to: 99,
                }),
            },
        ] {
            assert_eq!(Progress::decode(&progress.encode()), Some(progress));
        }
        assert_eq!(Progress::decode("x"), None);
        assert_eq!(Progress::decode("1:zz:1:2"), None);
        assert_eq!(Progress::decode("1:1:2"), None);
        assert_eq!(Progress::decode("1:1:2:3:4"), None);
    }
}
