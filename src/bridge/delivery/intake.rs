//! Merges a process's readers (at most two subscriptions) into each stream's
//! sequence: every message once, in its position's order, and none handed
//! on past a hole.
//!
//! A reader is *continuous* when it has been subscribed since a point that
//! the process's sequence already covers: the first reader of the process,
//! or one whose connection started at a mark that a continuous reader has
//! delivered since (that reader delivered everything before that mark, the
//! new one everything after). A continuous reader's messages are handed on
//! at once, each unless its stream already had it (its position is not
//! above the last one handed on); another reader's wait until it becomes
//! continuous. When no continuous reader is left (every subscription was
//! lost at once), nobody holds what was published meanwhile: that is a gap
//! (counted by the readers' coverage), and the readers' new connections
//! start the sequence again ([`Intake::continuous_since`]).

use rustc_hash::FxHashMap;

use super::ids::Identify;
use super::reader::{Event, Item, PROMOTION_LEAP, ReaderBatch};
use super::{Message, Position};
use crate::monitor::Counters;

/// One reader, as the intake sees it.
#[derive(Debug, Default)]
struct Source {
    /// Its connection is up.
    connected: bool,
    /// See the module's notes.
    continuous: bool,
    /// The mark its connection started at.
    start: u64,
    /// The value the clock last leapt to on its server (see
    /// [`super::reader::PROMOTION_LEAP`]).
    leapt_to: u64,
    /// The last mark it delivered.
    latest: u64,
    /// Its items while it is not continuous yet.
    held: Vec<Item>,
}

/// See the module's notes.
#[derive(Debug)]
pub struct Intake {
    identify: Identify,
    sources: Vec<Source>,
    /// The highest mark a continuous reader delivered.
    frontier: Option<u64>,
    /// The mark the process's sequence has been whole since.
    since: u64,
    /// Per stream, the last position handed on (forgotten once every
    /// continuous reader is past it).
    last: FxHashMap<Box<str>, Position>,
    /// Marks since `last` was last swept.
    marks_since_sweep: u32,
    /// Every continuous reader had delivered this mark when `last` was
    /// last swept: a message below it was handed on already (a reader that
    /// became continuous late brings it again), and `last` no longer says so.
    swept_below: u64,
    /// The frontier when no reader was left (the sequence waits for the
    /// next subscription to start it again: a hole).
    lost_at: Option<u64>,
    /// Holes found and not yet taken: their length in ms (server time).
    holes: Vec<u64>,
    /// The process stops reading on purpose, its copies being held by
    /// others (it gave its place among the holders back): the time until
    /// it reads again is no hole.
    resting: bool,
}

impl Intake {
    pub fn new(identify: Identify) -> Self {
        Self {
            identify,
            sources: Vec::new(),
            frontier: None,
            since: 0,
            last: FxHashMap::default(),
            marks_since_sweep: 0,
            swept_below: 0,
            lost_at: None,
            holes: Vec::new(),
            resting: false,
        }
    }

    /// The process stops reading on purpose (`true`: it gave its place
    /// among the pool's holders back, and other processes hold what is
    /// published meanwhile) or reads again (`false`): the time between is
    /// not counted as a hole.
    pub fn rest(&mut self, resting: bool) {
        if self.resting && !resting {
            self.lost_at = None;
        }
        self.resting = resting;
    }

    /// The holes in the sequence since the last call, each as the ms
    /// (server time, from the marks around it) in which messages published
    /// reached no subscription of this process. A hole is found when every
    /// reader was lost before another was in place: however long the loss
    /// took to notice (a reader waiting for memory reads no socket), the
    /// marks date it.
    pub fn take_holes(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.holes)
    }

    /// Counts and logs the holes found since the last call (`gaps`,
    /// `gap_ms`).
    pub fn count_holes(&mut self, counters: &Counters) {
        for ms in self.take_holes() {
            Counters::add(&counters.gaps, 1);
            Counters::add(&counters.gap_ms, ms);
            tracing::warn!(
                gap_ms = ms,
                "no worker of this process was subscribed for {ms} ms: messages published then reached no worker here"
            );
        }
    }

    /// A hole from mark `from` to mark `to`, on a server whose clock last
    /// leapt to `leapt_to`: a leap between them (a failover) is no time.
    fn hole(&mut self, from: u64, to: u64, leapt_to: u64) {
        let to = match from < leapt_to && leapt_to <= to {
            true => to.saturating_sub(PROMOTION_LEAP).max(from),
            false => to,
        };
        // Rounded up: a hole shorter than a millisecond is still a hole.
        self.holes
            .push((to >> 10).saturating_sub(from >> 10).max(1));
    }

    /// The mark this process's sequence has been whole since (no hole after
    /// it): a stream may be taken over cleanly from a position at or after it.
    /// `u64::MAX` while no reader is continuous (every subscription was
    /// lost: the sequence waits for the next one to start again).
    pub fn continuous_since(&self) -> u64 {
        match self.frontier {
            Some(_) => self.since,
            None => u64::MAX,
        }
    }

    /// The last mark a continuous reader delivered (0: none yet): how far
    /// this process has seen the pool's sequence.
    pub fn seen(&self) -> u64 {
        self.frontier.unwrap_or(0)
    }

    /// Whether a reader is connected.
    pub fn any_connected(&self) -> bool {
        self.sources.iter().any(|s| s.connected)
    }

    /// Takes a reader's batch; returns the messages to hand on, in order,
    /// each with its id.
    pub fn take(&mut self, batch: ReaderBatch) -> Vec<Message> {
        let r = batch.reader;
        if self.sources.len() <= r {
            self.sources.resize_with(r + 1, Source::default);
        }
        let mut out = Vec::new();
        if let Some(Event::Subscribed { start, leapt_to }) = batch.event {
            let source = &mut self.sources[r];
            *source = Source {
                connected: true,
                start,
                leapt_to,
                latest: start,
                ..Source::default()
            };
            match self.frontier {
                // The process's first subscription starts the sequence (or
                // starts it again, after a hole).
                None => {
                    if let Some(from) = self.lost_at.take() {
                        self.hole(from, start, leapt_to);
                    }
                    self.frontier = Some(start);
                    self.since = start;
                    self.sources[r].continuous = true;
                }
                Some(frontier) => self.sources[r].continuous = start <= frontier,
            }
        }
        if self.sources[r].continuous {
            for item in batch.items {
                self.pass(r, item, &mut out);
            }
        } else {
            self.sources[r].held.extend(batch.items);
        }
        match batch.event {
            Some(Event::Lost) | Some(Event::Stopped) => {
                let was_continuous = self.sources[r].continuous;
                self.sources[r] = Source::default();
                if was_continuous && !self.sources.iter().any(|s| s.continuous) {
                    self.restart(&mut out);
                }
            }
            _ => {}
        }
        out
    }

    /// Hands on one item of continuous reader `r`.
    fn pass(&mut self, r: usize, item: Item, out: &mut Vec<Message>) {
        match item {
            Item::Mark(mark) => {
                self.sources[r].latest = mark;
                if self.frontier.is_none_or(|f| mark > f) {
                    self.frontier = Some(mark);
                    self.confirm(out);
                }
                self.marks_since_sweep += 1;
                if self.marks_since_sweep >= 64 {
                    self.sweep();
                }
            }
            Item::Message(mut m) => {
                let Some(position) = m.position else { return };
                if position.mark < self.swept_below {
                    return;
                }
                let stream = m.lane.stream();
                match self.last.get_mut(stream) {
                    Some(last) if *last >= position => return,
                    Some(last) => *last = position,
                    None => {
                        self.last.insert(stream.into(), position);
                    }
                }
                self.identify.identify(&mut m);
                out.push(m);
            }
        }
    }

    /// Readers whose start the frontier has reached become continuous; what
    /// they held is handed on.
    fn confirm(&mut self, out: &mut Vec<Message>) {
        let frontier = self.frontier.unwrap_or(0);
        for r in 0..self.sources.len() {
            let source = &mut self.sources[r];
            if source.connected && !source.continuous && source.start <= frontier {
                source.continuous = true;
                let held = std::mem::take(&mut source.held);
                for item in held {
                    self.pass(r, item, out);
                }
            }
        }
    }

    /// No continuous reader is left: the connected readers start the
    /// sequence again at the earliest of their starts.
    fn restart(&mut self, out: &mut Vec<Message>) {
        let start = self
            .sources
            .iter()
            .filter(|s| s.connected)
            .map(|s| (s.start, s.leapt_to))
            .min();
        match start {
            Some((start, leapt_to)) => {
                if let Some(from) = self.frontier {
                    self.hole(from, start, leapt_to);
                }
                self.frontier = Some(start);
                self.since = start;
                tracing::debug!(
                    since = start,
                    "no subscription was continuous: the sequence starts again"
                );
                self.confirm(out);
            }
            // The next subscription starts it.
            None => {
                let lost_at = self.frontier.take();
                self.lost_at = lost_at.filter(|_| !self.resting);
            }
        }
    }

    /// Forgets the streams' last positions that every continuous reader is
    /// past (their next message is above them anyway).
    fn sweep(&mut self) {
        self.marks_since_sweep = 0;
        let Some(floor) = self
            .sources
            .iter()
            .filter(|s| s.continuous)
            .map(|s| s.latest)
            .min()
        else {
            return;
        };
        self.last.retain(|_, p| p.mark >= floor);
        self.swept_below = self.swept_below.max(floor);
        if self.last.capacity() > 4 * self.last.len().max(64) {
            self.last.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::bridge::delivery::{Destination, Lane};

    fn lane() -> Arc<Lane> {
        Arc::new(Lane::new(Destination::new("s", "c"), None))
    }

    fn message(lane: &Arc<Lane>, mark: u64, seq: u32) -> Item {
        let mut m = Message::new(
            format!("m{mark}.{seq}").into_bytes().into(),
            "c".into(),
            lane.clone(),
        );
        m.position = Some(Position { mark, seq });
        Item::Message(m)
    }

    fn batch(reader: usize, items: Vec<Item>, event: Option<Event>) -> ReaderBatch {
        ReaderBatch {
            reader,
            items,
            event,
        }
    }

    fn ids(out: &[Message]) -> Vec<String> {
        out.iter().map(|m| m.id.clone()).collect()
    }

    #[test]
    fn two_readers_hand_on_each_message_once_in_order() {
        let lane = lane();
        let mut intake = Intake::new(Identify::by_position("message_id", 1 << 20));
        let sub = |start| Some(Event::Subscribed { start, leapt_to: 0 });
        let a = intake.take(batch(
            0,
            vec![Item::Mark(10), message(&lane, 10, 1)],
            sub(10),
        ));
        assert_eq!(ids(&a), ["p:10:1"]);
        // Reader 1 starts later, at its own mark 11: held until reader 0
        // delivers that mark.
        let b = intake.take(batch(
            1,
            vec![Item::Mark(11), message(&lane, 11, 1)],
            sub(11),
        ));
        assert!(b.is_empty(), "held");
        let a = intake.take(batch(0, vec![message(&lane, 10, 2), Item::Mark(11)], None));
        assert_eq!(
            ids(&a),
            ["p:10:2", "p:11:1"],
            "then reader 1's copy is handed on"
        );
        let a = intake.take(batch(
            0,
            vec![message(&lane, 11, 1), message(&lane, 11, 2)],
            None,
        ));
        assert_eq!(ids(&a), ["p:11:2"], "11:1 came already");
        // Reader 0 is lost; reader 1 goes on alone, with no hole.
        assert!(intake.take(batch(0, vec![], Some(Event::Lost))).is_empty());
        let b = intake.take(batch(
            1,
            vec![message(&lane, 11, 2), message(&lane, 11, 3)],
            None,
        ));
        assert_eq!(ids(&b), ["p:11:3"]);
        assert_eq!(intake.continuous_since(), 10);
    }

    #[test]
    fn when_every_reader_was_lost_the_sequence_starts_again() {
        let lane = lane();
        let mut intake = Intake::new(Identify::by_position("message_id", 1 << 20));
        intake.take(batch(
            0,
            vec![Item::Mark(10), message(&lane, 10, 1)],
            Some(Event::Subscribed {
                start: 10,
                leapt_to: 0,
            }),
        ));
        intake.take(batch(0, vec![], Some(Event::Lost)));
        let again = intake.take(batch(
            0,
            vec![Item::Mark(20), message(&lane, 20, 1)],
            Some(Event::Subscribed {
                start: 20,
                leapt_to: 0,
            }),
        ));
        assert_eq!(ids(&again), ["p:20:1"]);
        assert_eq!(intake.continuous_since(), 20);
    }

    #[test]
    fn a_hole_is_dated_by_the_marks_however_late_it_is_noticed() {
        let lane = lane();
        let mut intake = Intake::new(Identify::by_position("message_id", 1 << 20));
        let sub = |start| Some(Event::Subscribed { start, leapt_to: 0 });
        let ms = |ms: u64| ms << 10;
        intake.take(batch(0, vec![Item::Mark(ms(1000))], sub(ms(1000))));
        intake.take(batch(0, vec![Item::Mark(ms(1050))], None));
        // Reader 1 (re)subscribes at 1300 while reader 0 still looks
        // continuous: its loss (at 1050, noticed late) leaves a hole.
        intake.take(batch(1, vec![Item::Mark(ms(1300))], sub(ms(1300))));
        assert!(intake.take_holes().is_empty(), "not noticed yet");
        intake.take(batch(0, vec![], Some(Event::Lost)));
        assert_eq!(intake.take_holes(), [250]);
        assert_eq!(intake.continuous_since(), ms(1300));
        // Both lost, then one back: a hole from the last mark to the start.
        intake.take(batch(
            1,
            vec![Item::Mark(ms(1400)), message(&lane, ms(1400), 1)],
            None,
        ));
        intake.take(batch(1, vec![], Some(Event::Lost)));
        intake.take(batch(0, vec![Item::Mark(ms(1500))], sub(ms(1500))));
        assert_eq!(intake.take_holes(), [100]);
        // A second reader joining in time makes no hole.
        intake.take(batch(1, vec![Item::Mark(ms(1520))], sub(ms(1520))));
        intake.take(batch(0, vec![Item::Mark(ms(1520))], None));
        intake.take(batch(0, vec![], Some(Event::Lost)));
        assert!(intake.take_holes().is_empty());
    }

    #[test]
    fn a_hole_across_a_failover_does_not_count_the_clock_s_leap() {
        let mut intake = Intake::new(Identify::by_position("message_id", 1 << 20));
        let ms = |ms: u64| ms << 10;
        let sub = |start, leapt_to| Some(Event::Subscribed { start, leapt_to });
        intake.take(batch(0, vec![Item::Mark(ms(1000))], sub(ms(1000), 0)));
        intake.take(batch(0, vec![Item::Mark(ms(1050))], None));
        intake.take(batch(0, vec![], Some(Event::Lost)));
        // On the promoted replica the clock leapt 5 s ahead at 1060 (+5000):
        // the reader is back 30 ms after the last mark it had.
        let leapt = ms(1060) + PROMOTION_LEAP;
        let start = ms(1080) + PROMOTION_LEAP;
        intake.take(batch(0, vec![Item::Mark(start)], sub(start, leapt)));
        assert_eq!(intake.take_holes(), [30]);
        // A later reconnect on that server: no leap between.
        intake.take(batch(0, vec![], Some(Event::Lost)));
        let again = start + ms(200);
        intake.take(batch(0, vec![Item::Mark(again)], sub(again, leapt)));
        assert_eq!(intake.take_holes(), [200]);
    }

    /// A process that gave its place among the holders back stops reading
    /// on purpose: when it holds a place again, the time between is no
    /// hole (others held those messages). A loss is still one.
    #[test]
    fn resting_between_two_places_is_no_hole() {
        let mut intake = Intake::new(Identify::by_position("message_id", 1 << 20));
        let ms = |ms: u64| ms << 10;
        let sub = |start| Some(Event::Subscribed { start, leapt_to: 0 });
        intake.take(batch(0, vec![Item::Mark(ms(1000))], sub(ms(1000))));
        intake.rest(true);
        intake.take(batch(0, vec![], Some(Event::Stopped)));
        assert_eq!(intake.continuous_since(), u64::MAX);
        intake.rest(false);
        intake.take(batch(0, vec![Item::Mark(ms(3000))], sub(ms(3000))));
        assert!(intake.take_holes().is_empty(), "rested, not lost");
        assert_eq!(intake.continuous_since(), ms(3000));
        intake.take(batch(0, vec![], Some(Event::Lost)));
        intake.take(batch(0, vec![Item::Mark(ms(3100))], sub(ms(3100))));
        assert_eq!(intake.take_holes(), [100], "a loss while holding is a hole");
    }
}
