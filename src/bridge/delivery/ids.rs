//! A message's id: the one its publisher gave it, or one made for it.
//!
//! A JSON object payload with the id field (MESSAGE_ID_FIELD, a string or a
//! number) is known by that id. Anything else (plain text, binary, JSON
//! without the field) is known by where it stands: on one server, its
//! position (`p:<mark>:<n>`, the same in every process: see
//! [`super::Position`]); on a cluster, where subscriptions have no
//! positions, an id every subscription derives alike from what it has seen
//! (`h:<xxh3-128 of the bytes>:<n>`, see [`DerivedIds`]).

use rustc_hash::FxHashMap;
use std::fmt;
use std::time::{Duration, Instant};

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{Message, Position};

/// Ids longer than this are refused (they become key names twice over).
pub const MAX_ID_BYTES: usize = 512;

/// The id carried in a JSON object payload's `field`, if there is one: a
/// non-empty string, or a number.
///
/// A number is known by its exact text as written in the payload, never by
/// a value it rounds to: `100`, `1e2` and `100.0` are three ids, as are
/// `18446744073709551616` and `18446744073709551617`, or `0` and `-0`. (The
/// string `"100"` and the number `100` are the same id.)
pub fn json_id(payload: &[u8], field: &str) -> Option<String> {
    // Cheap test first: most non-JSON payloads never reach the parser.
    let first = payload.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(payload);
    let raw = FindField(field).deserialize(&mut de).ok()??;
    de.end().ok()?;
    id_from_raw(raw.get())
}

/// An id from the raw JSON text of a field's value: a string's contents, or
/// a number's text as written; nothing for anything else.
fn id_from_raw(raw: &str) -> Option<String> {
    match raw.as_bytes().first()? {
        b'"' => serde_json::from_str::<String>(raw)
            .ok()
            .filter(|s| !s.is_empty()),
        b'-' | b'0'..=b'9' => Some(raw.to_string()),
        _ => None,
    }
}

/// Walks the top level of a JSON object and keeps the raw text of one
/// field's value.
struct FindField<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for FindField<'_> {
    type Value = Option<&'de RawValue>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FindField<'_> {
    type Value = Option<&'de RawValue>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if found.is_none() && key == self.0 {
                found = Some(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Numbers the id-less payloads a worker sees, so that every worker subscribed
/// to the channel names each of them alike.
///
/// Pub/Sub delivers a channel's messages to every subscriber in the same
/// order, so counting identical payloads gives the same `n` everywhere, with
/// these limits (stated in docs/protocol.md):
/// - A worker that subscribes between two identical id-less payloads counts
///   from a later start; its numbers are lower, name messages already written,
///   and it leaves them to the others. It never writes twice, but cannot take
///   over those messages if the others die.
/// - A count is forgotten once its payload has not been seen for `forget_after`
///   (longer than any ACK can live, so the restart at 1 cannot collide with an
///   ACK still present). Two workers could disagree only if the gap between two
///   identical payloads falls within their delivery jitter of that window.
/// - Two different payloads with the same 128-bit hash would share an id.
#[derive(Debug)]
pub struct DerivedIds {
    counts: FxHashMap<u128, (u64, Instant)>,
    forget_after: Duration,
    last_sweep: Instant,
}

impl DerivedIds {
    pub fn new(forget_after: Duration) -> Self {
        Self {
            counts: FxHashMap::default(),
            forget_after,
            last_sweep: Instant::now(),
        }
    }

    /// The derived id of an id-less payload received at `now`.
    pub fn next(&mut self, payload: &[u8], now: Instant) -> String {
        if now.duration_since(self.last_sweep) > self.forget_after / 4 {
            let forget_after = self.forget_after;
            self.counts
                .retain(|_, (_, seen)| now.duration_since(*seen) <= forget_after);
            self.last_sweep = now;
        }
        let hash = xxhash_rust::xxh3::xxh3_128(payload);
        let entry = self.counts.entry(hash).or_insert((0, now));
        if now.duration_since(entry.1) > self.forget_after {
            entry.0 = 0;
        }
        entry.0 += 1;
        entry.1 = now;
        format!("h:{hash:032x}:{}", entry.0)
    }

    /// How many payloads are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.counts.len()
    }
}

/// How a process finds its messages' ids, and which it will not write to
/// their stream.
#[derive(Debug)]
pub struct Identify {
    field: String,
    max_payload_bytes: usize,
    /// Cluster: derived ids for payloads without one.
    derived: Option<DerivedIds>,
}

impl Identify {
    /// On one server: payloads without an id are known by their position.
    pub fn by_position(field: impl Into<String>, max_payload_bytes: usize) -> Self {
        Self {
            field: field.into(),
            max_payload_bytes,
            derived: None,
        }
    }

    /// On a cluster: payloads without an id get a derived id, counted for
    /// `forget_after` (see [`DerivedIds`]).
    pub fn derived(
        field: impl Into<String>,
        max_payload_bytes: usize,
        forget_after: Duration,
    ) -> Self {
        Self {
            derived: Some(DerivedIds::new(forget_after)),
            ..Self::by_position(field, max_payload_bytes)
        }
    }

    /// Sets `m.id`, and `m.rejected` for a message that goes to the
    /// dead-letter stream (a payload larger than MAX_PAYLOAD_BYTES, an id
    /// longer than [`MAX_ID_BYTES`]).
    pub fn identify(&mut self, m: &mut Message) {
        let explicit = if m.payload.len() > self.max_payload_bytes {
            m.rejected = Some(format!(
                "payload of {} bytes is larger than MAX_PAYLOAD_BYTES ({})",
                m.payload.len(),
                self.max_payload_bytes
            ));
            None
        } else {
            match json_id(&m.payload, &self.field) {
                Some(id) if id.len() > MAX_ID_BYTES => {
                    m.rejected = Some(format!(
                        "{} of {} bytes is longer than {MAX_ID_BYTES}",
                        self.field,
                        id.len()
                    ));
                    None
                }
                id => id,
            }
        };
        m.id_given = explicit.is_some();
        m.id = match (explicit, m.position, self.derived.as_mut()) {
            (Some(id), _, _) => id,
            (None, Some(position), _) => position_id(position),
            (None, None, Some(derived)) => derived.next(&m.payload, m.received_at),
            (None, None, None) => format!("h:{:032x}", xxhash_rust::xxh3::xxh3_128(&m.payload)),
        };
    }
}

/// The id of a payload without one, on one server: its position.
pub fn position_id(position: Position) -> String {
    format!("p:{}:{}", position.mark, position.seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_id_field_in_json_objects() {
        let field = "message_id";
        assert_eq!(
            json_id(
                br#"{"message_id": "abc", "x": [1, {"message_id": "no"}]}"#,
                field
            ),
            Some("abc".into())
        );
        assert_eq!(
            json_id(br#" {"seq": 1, "message_id": 42}"#, field),
            Some("42".into())
        );
        assert_eq!(
            json_id(br#"{"message_id": "a\"b"}"#, field),
            Some("a\"b".into())
        );
    }

    #[test]
    fn numeric_ids_are_known_by_their_exact_text() {
        let id = |json: &str| json_id(json.as_bytes(), "message_id").unwrap();
        for (a, b) in [
            ("18446744073709551616", "18446744073709551617"),
            ("12345678901234567890123", "12345678901234567890124"),
            ("-9223372036854775809", "-9223372036854775810"),
            ("0.1", "0.10000000000000001"),
            ("100", "1e2"),
            ("100", "100.0"),
            ("1e2", "100.0"),
            ("0", "-0"),
            ("0", "0.0"),
            ("-0", "0.0"),
        ] {
            let (x, y) = (
                id(&format!(r#"{{"message_id": {a}}}"#)),
                id(&format!(r#"{{"message_id": {b}}}"#)),
            );
            assert_eq!(x, a);
            assert_eq!(y, b);
            assert_ne!(x, y, "{a} and {b} are two ids");
        }
        assert_eq!(id(r#"{"message_id": "100"}"#), id(r#"{"message_id": 100}"#));
        assert_eq!(id(r#"{"message_id": "a\u0062"}"#), "ab");
    }

    #[test]
    fn payloads_without_a_usable_id_have_none() {
        let field = "message_id";
        for payload in [
            &b"hello"[..],
            b"",
            b"{\"other\": 1}",
            b"{\"message_id\": \"\"}",
            b"{\"message_id\": null}",
            b"{\"message_id\": true}",
            b"{\"message_id\": [1]}",
            b"{\"message_id\": {\"a\": 1}}",
            b"{\"message_id\": \"x\"", // truncated
            b"{\"message_id\": \"x\"} trailing",
            b"[\"message_id\"]",
            b"\xff\xfe{",
        ] {
            assert_eq!(json_id(payload, field), None, "{payload:?}");
        }
    }

    #[test]
    fn identical_id_less_payloads_get_successive_ids() {
        let now = Instant::now();
        let mut a = DerivedIds::new(Duration::from_secs(60));
        let first = a.next(b"ping", now);
        let second = a.next(b"ping", now);
        assert_ne!(first, second);
        assert!(first.ends_with(":1") && second.ends_with(":2"));
        // Another worker that saw the same sequence agrees.
        let mut b = DerivedIds::new(Duration::from_secs(60));
        assert_eq!(b.next(b"ping", now), first);
        assert_eq!(b.next(b"ping", now), second);
        // A different payload starts its own count.
        assert!(a.next(b"pong", now).ends_with(":1"));
    }

    #[test]
    fn oversized_payloads_and_ids_are_rejected_with_a_reason() {
        let now = Instant::now();
        let lane = std::sync::Arc::new(super::super::Lane::new(
            super::super::Destination::new("s", "c"),
            None,
        ));
        let message = |payload: Vec<u8>| {
            let mut m = Message::new(payload.into(), "c".into(), lane.clone());
            m.received_at = now;
            m.position = Some(Position { mark: 9, seq: 2 });
            m
        };
        let mut ids = Identify::by_position("message_id", 64);
        let mut ok = message(br#"{"message_id":"ok"}"#.to_vec());
        ids.identify(&mut ok);
        assert_eq!((ok.id.as_str(), ok.rejected), ("ok", None));
        let mut big = message(vec![b'x'; 65]);
        ids.identify(&mut big);
        assert!(big.rejected.unwrap().contains("MAX_PAYLOAD_BYTES"));
        assert_eq!(big.id, "p:9:2", "known by its position");

        let mut ids = Identify::by_position("message_id", 1 << 20);
        let long = format!(r#"{{"message_id":"{}"}}"#, "i".repeat(MAX_ID_BYTES + 1));
        let mut m = message(long.into_bytes());
        ids.identify(&mut m);
        assert!(m.rejected.unwrap().contains("longer than"));
        assert!(m.id.len() < 64, "a short id replaces it");
    }

    #[test]
    fn counts_are_forgotten_after_the_window() {
        let start = Instant::now();
        let mut ids = DerivedIds::new(Duration::from_secs(10));
        assert!(ids.next(b"x", start).ends_with(":1"));
        assert!(
            ids.next(b"x", start + Duration::from_secs(5))
                .ends_with(":2")
        );
        assert!(
            ids.next(b"x", start + Duration::from_secs(16))
                .ends_with(":1")
        );
        // The sweep drops what has not been seen within the window.
        ids.next(b"y", start + Duration::from_secs(40));
        assert_eq!(ids.len(), 1);
    }
}
