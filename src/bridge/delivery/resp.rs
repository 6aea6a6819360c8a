//! Just enough RESP3 for a subscription: finds whole frames at the front of
//! a buffer and hands out the parts of a push (`message`, `pmessage`,
//! `subscribe`…) as offsets into the buffer, so that the reader can slice
//! them out of one shared allocation without copying a byte.
//!
//! Every other frame (a command's reply, a map, an array…) is only measured
//! and, for errors, its text kept: the reader needs to know where it ends,
//! whether it is an error, and, for a few replies, its integer.

use std::ops::Range;

/// A whole frame at the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A push (`>`): its parts, each a range of the buffer when it is a
    /// string, `None` when it is something else (the count of a
    /// `subscribe`).
    Push(Parts),
    /// An error reply (`-` or `!`): its text.
    Error(Range<usize>),
    /// An integer reply (`:`).
    Integer(i64),
    /// An aggregate's header alone (`*N`, `%N`, …), when asked for with
    /// [`Parse::Header`]: its elements follow as frames of their own.
    Header,
    /// Any other reply (`+OK`, a map, an array, a bulk string, null…).
    Other,
}

/// The parts of a push: at most four are kept (a `pmessage` has four).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parts {
    pub len: usize,
    pub items: [Option<Range<usize>>; 4],
}

impl Parts {
    pub fn get(&self, i: usize) -> Option<Range<usize>> {
        self.items.get(i).cloned().flatten()
    }
}

/// How to read an aggregate that is not a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// Whole, with its elements.
    Whole,
    /// Its header line only (see [`Frame::Header`]): for EXEC's reply to a
    /// transaction that subscribes, whose element count Redis gives without
    /// the subscriptions' pushes, which it sends among the elements.
    Header,
}

/// The buffer does not hold a frame that makes sense: the peer is not
/// speaking RESP (or something went very wrong).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not the Redis protocol at byte {at}: {what}")]
pub struct ProtocolError {
    pub at: usize,
    pub what: &'static str,
}

/// The frame at the front of `buf`, and its length; `None` when the buffer
/// does not hold all of it yet.
pub fn frame(buf: &[u8], how: Parse) -> Result<Option<(Frame, usize)>, ProtocolError> {
    let Some((kind, line, next)) = header(buf, 0)? else {
        return Ok(None);
    };
    let frame = match kind {
        b'>' => {
            let count = number(buf, line)?;
            let mut parts = Parts {
                len: count.max(0) as usize,
                ..Parts::default()
            };
            let mut at = next;
            for i in 0..parts.len {
                let Some((kind, line, after)) = header(buf, at)? else {
                    return Ok(None);
                };
                match kind {
                    b'$' => {
                        let Some(end) = bulk(buf, line, after)? else {
                            return Ok(None);
                        };
                        if i < 4 {
                            parts.items[i] = Some(after..end - 2);
                        }
                        at = end;
                    }
                    b'+' => {
                        if i < 4 {
                            parts.items[i] = Some(line);
                        }
                        at = after;
                    }
                    _ => match skip_from(buf, at)? {
                        Some(end) => at = end,
                        None => return Ok(None),
                    },
                }
            }
            return Ok(Some((Frame::Push(parts), at)));
        }
        b'-' | b'!' => {
            if kind == b'!' {
                let Some(end) = bulk(buf, line, next)? else {
                    return Ok(None);
                };
                return Ok(Some((Frame::Error(next..end - 2), end)));
            }
            return Ok(Some((Frame::Error(line), next)));
        }
        b':' => Frame::Integer(number(buf, line)?),
        b'*' | b'%' | b'~' | b'|' if how == Parse::Header => Frame::Header,
        _ => {
            return Ok(skip_from(buf, 0)?.map(|end| (Frame::Other, end)));
        }
    };
    Ok(Some((frame, next)))
}

/// The end of the frame starting at `at`; `None` when incomplete.
fn skip_from(buf: &[u8], at: usize) -> Result<Option<usize>, ProtocolError> {
    let Some((kind, line, next)) = header(buf, at)? else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Ok(Some(next)),
        b'$' | b'!' | b'=' => bulk(buf, line, next),
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let count = number(buf, line)?;
            let elements = match kind {
                b'%' | b'|' => count * 2,
                _ => count,
            };
            let mut at = next;
            for _ in 0..elements.max(0) {
                match skip_from(buf, at)? {
                    Some(end) => at = end,
                    None => return Ok(None),
                }
            }
            // An attribute (`|`) is followed by the frame it describes.
            if kind == b'|' {
                return skip_from(buf, at);
            }
            Ok(Some(at))
        }
        _ => Err(ProtocolError {
            at,
            what: "unknown frame type",
        }),
    }
}

/// The frame's type byte at `at`, the range of the rest of its first line,
/// and where the next line starts; `None` when the line is incomplete.
fn header(buf: &[u8], at: usize) -> Result<Option<(u8, Range<usize>, usize)>, ProtocolError> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some(newline) = memchr(b'\n', &buf[at..]) else {
        if buf.len() - at > 64 * 1024 && !matches!(kind, b'+' | b'-') {
            return Err(ProtocolError {
                at,
                what: "a header line without an end",
            });
        }
        return Ok(None);
    };
    let end = at + newline;
    if end == at || buf[end - 1] != b'\r' {
        return Err(ProtocolError {
            at,
            what: "a line not ended by CRLF",
        });
    }
    Ok(Some((kind, at + 1..end - 1, end + 1)))
}

/// The end of a bulk string whose length is on `line` and whose bytes start
/// at `start` (after them, CRLF); `None` when incomplete. A length of -1 is
/// a null.
fn bulk(buf: &[u8], line: Range<usize>, start: usize) -> Result<Option<usize>, ProtocolError> {
    let len = number(buf, line)?;
    if len < 0 {
        return Ok(Some(start));
    }
    let end = start + len as usize + 2;
    if buf.len() < end {
        return Ok(None);
    }
    if &buf[end - 2..end] != b"\r\n" {
        return Err(ProtocolError {
            at: end - 2,
            what: "a bulk string not ended by CRLF",
        });
    }
    Ok(Some(end))
}

/// The decimal number on a header line.
fn number(buf: &[u8], line: Range<usize>) -> Result<i64, ProtocolError> {
    let bad = ProtocolError {
        at: line.start,
        what: "a length that is not a number",
    };
    let text = &buf[line];
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 18 {
        return Err(bad);
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(bad);
        }
        n = n * 10 + (d - b'0') as i64;
    }
    Ok(if negative { -n } else { n })
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(buf: &[u8], range: Option<Range<usize>>) -> &[u8] {
        &buf[range.expect("a part")]
    }

    #[test]
    fn a_message_push_is_cut_into_its_parts() {
        let buf = b">3\r\n$7\r\nmessage\r\n$2\r\nin\r\n$5\r\nhello\r\n>3";
        let (frame, len) = frame(buf, Parse::Whole).unwrap().unwrap();
        let Frame::Push(parts) = frame else {
            panic!("{frame:?}")
        };
        assert_eq!(len, buf.len() - 2);
        assert_eq!(parts.len, 3);
        assert_eq!(text(buf, parts.get(0)), b"message");
        assert_eq!(text(buf, parts.get(1)), b"in");
        assert_eq!(text(buf, parts.get(2)), b"hello");
    }

    #[test]
    fn binary_payloads_with_crlf_inside_are_kept_whole() {
        let buf = b">4\r\n$8\r\npmessage\r\n$2\r\np*\r\n$2\r\npq\r\n$4\r\n\r\n\xff\x00\r\n";
        let (frame, len) = frame(buf, Parse::Whole).unwrap().unwrap();
        let Frame::Push(parts) = frame else {
            panic!("{frame:?}")
        };
        assert_eq!(len, buf.len());
        assert_eq!(text(buf, parts.get(3)), b"\r\n\xff\x00");
    }

    #[test]
    fn an_incomplete_frame_waits_for_more() {
        let whole = b">3\r\n$7\r\nmessage\r\n$2\r\nin\r\n$5\r\nhello\r\n";
        for cut in 0..whole.len() {
            assert_eq!(frame(&whole[..cut], Parse::Whole).unwrap(), None, "{cut}");
        }
    }

    #[test]
    fn replies_are_measured_and_errors_kept() {
        let hello = b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n+OK\r\n";
        let (frame_, len) = frame(hello, Parse::Whole).unwrap().unwrap();
        assert_eq!((frame_, len), (Frame::Other, hello.len() - 5));
        let err = b"-NOPERM no channel\r\n";
        let (f, _) = frame(err, Parse::Whole).unwrap().unwrap();
        assert_eq!(f, Frame::Error(1..err.len() - 2));
        assert_eq!(
            frame(b":42\r\n", Parse::Whole).unwrap(),
            Some((Frame::Integer(42), 5))
        );
        assert_eq!(
            frame(b"*3\r\n>3\r\n", Parse::Header).unwrap(),
            Some((Frame::Header, 4))
        );
        assert_eq!(
            frame(b"$-1\r\n", Parse::Whole).unwrap(),
            Some((Frame::Other, 5))
        );
        assert_eq!(
            frame(b"_\r\n", Parse::Whole).unwrap(),
            Some((Frame::Other, 3))
        );
    }

    #[test]
    fn what_is_not_resp_is_an_error() {
        assert!(frame(b"HTTP/1.1 400 Bad Request\r\n", Parse::Whole).is_err());
        assert!(frame(b"$abc\r\n", Parse::Whole).is_err());
        assert!(frame(b"$3\r\nabcXY", Parse::Whole).is_err());
    }
}
