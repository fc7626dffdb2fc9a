//! Splitting a request body into events, by content type (the gateway's HTTP bodies and its
//! raw-topic messages). Pure parsing, no IO: untrusted bytes enter here, so it is fuzzed
//! (`fuzz/`).
//!
//! Invariants:
//! - the order of events is the order in the body, and every event gets exactly one outcome;
//! - a batch whose framing is broken (not a JSON array) is refused whole (400), because no event
//!   boundary can be trusted; in NDJSON each line is its own frame, so one bad line is one
//!   `invalid_json` rejection and the other lines still count;
//! - each event's size is measured on its own bytes, so the per-event limit means the same in
//!   every framing;
//! - an event over that limit is not read beyond its `id` ([`Envelope::oversized`]): it is
//!   refused `event_too_large` whatever it holds, and building its values could take many
//!   times its size in memory, before the rate limit, from a body that is itself within limits.

use crate::event::Envelope;
use crate::{RejectCode, Rejection};
use serde_json::value::RawValue;

/// How the events of a request are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// One event (`application/cloudevents+json`, or `application/json` holding an object).
    Single,
    /// A JSON array (`application/cloudevents-batch+json`, or `application/json` holding an array).
    Batch,
    /// One event per line (`application/x-ndjson`).
    Ndjson,
}

/// Framings by content type; `None` for a type the endpoint does not take (415).
pub fn framing_of(content_type: &str, body: &[u8]) -> Option<Framing> {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "application/cloudevents+json" => Some(Framing::Single),
        "application/cloudevents-batch+json" => Some(Framing::Batch),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
            Some(Framing::Ndjson)
        }
        "application/json" => {
            let first = body.iter().find(|b| !b.is_ascii_whitespace());
            Some(if first == Some(&b'[') {
                Framing::Batch
            } else {
                Framing::Single
            })
        }
        _ => None,
    }
}

/// One framed event: its envelope (read from the body's bytes, borrowing from them), or why it
/// is not JSON, and the size of its bytes.
#[derive(Debug)]
pub struct Framed<'a> {
    pub value: Result<Envelope<'a>, Rejection>,
    pub len: usize,
}

/// One event of a body as split: its bytes, read into a [`Framed`] only when it is admitted
/// ([`Frame::framed`]). An event read whole (one nested deeper than the one-pass read goes, or
/// with escapes it must read as a whole parse does) takes many times its bytes once built (an
/// array of small numbers, say): built one at a time, a request holds one such
/// event's values, not every event's of its body at once; and none is built before the body
/// passed the rate limit.
#[derive(Debug)]
pub struct Frame<'a>(Pending<'a>);

#[derive(Debug)]
enum Pending<'a> {
    /// Read already (a single event: whether it is JSON decides the whole request).
    Read(Framed<'a>),
    /// An element of a batch (UTF-8, checked while framing).
    Element { text: &'a str, oversized: bool },
    /// A line of NDJSON.
    Line { bytes: &'a [u8], oversized: bool },
}

impl<'a> Frame<'a> {
    /// The size of its bytes.
    pub fn len(&self) -> usize {
        match &self.0 {
            Pending::Read(framed) => framed.len,
            Pending::Element { text, .. } => text.len(),
            Pending::Line { bytes, .. } => bytes.len(),
        }
    }

    /// Whether it has no bytes (never, for a frame of a body).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The event read: its envelope, or why it is not JSON.
    pub fn framed(self) -> Framed<'a> {
        let len = self.len();
        let not_json = |what: &str, e: serde_json::Error| {
            Rejection::new(RejectCode::InvalidJson, format!("{what} is not JSON: {e}"))
        };
        match self.0 {
            Pending::Read(framed) => framed,
            Pending::Element { text, oversized } => Framed {
                len,
                value: if oversized {
                    Envelope::oversized(text.as_bytes())
                } else {
                    Envelope::parse_text(text)
                }
                .map_err(|e| not_json("event", e)),
            },
            Pending::Line { bytes, oversized } => Framed {
                len,
                value: envelope(bytes, oversized).map_err(|e| not_json("line", e)),
            },
        }
    }
}

impl<'a> From<Framed<'a>> for Frame<'a> {
    fn from(framed: Framed<'a>) -> Self {
        Self(Pending::Read(framed))
    }
}

/// Why a whole body was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The body is not the framing its content type promised (400).
    Unparseable(String),
    /// More events than one request may carry (413).
    TooManyEvents { limit: usize },
}

/// Splits `body` into events. At most `max_events` are allowed; an event over
/// `max_event_bytes` has only its `id` read.
pub fn split(
    framing: Framing,
    body: &[u8],
    max_events: usize,
    max_event_bytes: usize,
) -> Result<Vec<Frame<'_>>, FrameError> {
    match framing {
        Framing::Single => {
            let value = envelope(body, body.len() > max_event_bytes)
                .map_err(|e| FrameError::Unparseable(format!("body is not JSON: {e}")))?;
            Ok(vec![Frame::from(Framed {
                value: Ok(value),
                len: body.len(),
            })])
        }
        Framing::Batch => {
            let raws = array_of_at_most(body, max_events)?;
            Ok(raws
                .into_iter()
                .map(|raw| {
                    let text = raw.get();
                    Frame(Pending::Element {
                        text,
                        oversized: text.len() > max_event_bytes,
                    })
                })
                .collect())
        }
        Framing::Ndjson => {
            let mut lines: Vec<&[u8]> = Vec::new();
            for line in body
                .split(|b| *b == b'\n')
                .filter(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
            {
                if lines.len() == max_events {
                    return Err(FrameError::TooManyEvents { limit: max_events });
                }
                lines.push(line);
            }
            if lines.is_empty() {
                return Err(FrameError::Unparseable("body holds no events".into()));
            }
            Ok(lines
                .into_iter()
                .map(|bytes| {
                    Frame(Pending::Line {
                        bytes,
                        oversized: bytes.len() > max_event_bytes,
                    })
                })
                .collect())
        }
    }
}

/// The elements of the JSON array `body`, refused as soon as there are more than
/// `max_events`: what is held grows with the events let in, not with the body (a body of
/// `[0,0,…]` is millions of elements in a few megabytes), and nothing past the bound is read.
fn array_of_at_most(body: &[u8], max_events: usize) -> Result<Vec<&RawValue>, FrameError> {
    use serde::de::{DeserializeSeed, Error, SeqAccess, Visitor};

    /// Collects at most `max` elements; `over` says the array had more.
    struct AtMost<'o> {
        max: usize,
        over: &'o mut bool,
    }
    impl<'de> Visitor<'de> for AtMost<'_> {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut raws = Vec::new();
            while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                if raws.len() == self.max {
                    *self.over = true;
                    return Err(A::Error::custom("too many events"));
                }
                raws.push(raw);
            }
            Ok(raws)
        }
    }
    impl<'de> DeserializeSeed<'de> for AtMost<'_> {
        type Value = Vec<&'de RawValue>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_seq(self)
        }
    }

    let mut over = false;
    let mut reader = serde_json::Deserializer::from_slice(body);
    let raws = AtMost {
        max: max_events,
        over: &mut over,
    }
    .deserialize(&mut reader)
    .and_then(|raws| reader.end().map(|()| raws));
    match raws {
        Ok(raws) => Ok(raws),
        Err(_) if over => Err(FrameError::TooManyEvents { limit: max_events }),
        Err(e) => Err(FrameError::Unparseable(format!(
            "body is not a JSON array: {e}"
        ))),
    }
}

/// The envelope of one event's bytes: read for its `id` alone when `oversized`.
fn envelope(json: &[u8], oversized: bool) -> serde_json::Result<Envelope<'_>> {
    if oversized {
        Envelope::oversized(json)
    } else {
        Envelope::parse(json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every frame read, as the gateway admits them.
    fn read(frames: Vec<Frame<'_>>) -> Vec<Framed<'_>> {
        frames.into_iter().map(Frame::framed).collect()
    }

    #[test]
    fn content_types_choose_framing() {
        assert_eq!(
            framing_of("application/cloudevents+json", b"{}"),
            Some(Framing::Single)
        );
        assert_eq!(
            framing_of("application/json; charset=utf-8", b" [ ]"),
            Some(Framing::Batch)
        );
        assert_eq!(framing_of("application/json", b"{}"), Some(Framing::Single));
        assert_eq!(
            framing_of("Application/X-NDJSON", b""),
            Some(Framing::Ndjson)
        );
        assert_eq!(framing_of("text/plain", b"{}"), None);
    }

    #[test]
    fn ndjson_bad_line_is_one_rejection() {
        let body = b"{\"id\":\"a\"}\n\nnot json\n{\"id\":\"b\"}\n";
        let framed = read(split(Framing::Ndjson, body, 10, 1 << 16).expect("frames"));
        assert_eq!(framed.len(), 3);
        assert!(framed[0].value.is_ok());
        assert_eq!(
            framed[1].value.as_ref().err().map(|r| r.code),
            Some(RejectCode::InvalidJson)
        );
        assert!(framed[2].value.is_ok());
        assert_eq!(framed[0].len, 10);
    }

    #[test]
    fn batch_limits_and_broken_framing() {
        assert_eq!(
            split(Framing::Batch, b"[{},{},{}]", 2, 1 << 16).err(),
            Some(FrameError::TooManyEvents { limit: 2 })
        );
        assert!(matches!(
            split(Framing::Batch, b"[{},", 10, 1 << 16),
            Err(FrameError::Unparseable(_))
        ));
        let framed =
            read(split(Framing::Batch, br#"[{"id":"x"}, 5]"#, 10, 1 << 16).expect("frames"));
        assert_eq!(framed[0].len, 10);
        assert!(
            framed[1].value.is_ok(),
            "a non-object is framed; validation rejects it"
        );
    }

    #[test]
    fn nothing_past_the_event_bound_is_read_or_held() {
        // Was: every element of a batch (every line of NDJSON) was collected before they were
        // counted, so a 5 MiB body of `[0,0,…]` held 2.6 M of them (64 MiB) to answer 413, and
        // a body past the bound was parsed to its end: here its broken tail made it a 400.
        let zeros = format!("[{}0", "0,".repeat(100_000));
        assert_eq!(
            split(Framing::Batch, zeros.as_bytes(), 3, 1 << 16).err(),
            Some(FrameError::TooManyEvents { limit: 3 })
        );
        let lines = format!("{}not json", "{}\n".repeat(100_000));
        assert_eq!(
            split(Framing::Ndjson, lines.as_bytes(), 3, 1 << 16).err(),
            Some(FrameError::TooManyEvents { limit: 3 })
        );
        // At the bound, the whole body is read and framed as before.
        assert_eq!(
            split(Framing::Batch, b"[{},{},{}] ", 3, 1 << 16).map(|f| f.len()),
            Ok(3)
        );
        assert!(matches!(
            split(Framing::Batch, b"[{},{},{}] x", 3, 1 << 16),
            Err(FrameError::Unparseable(_))
        ));
        assert!(matches!(
            split(Framing::Batch, b"[{},{},{}", 3, 1 << 16),
            Err(FrameError::Unparseable(_))
        ));
        assert!(matches!(
            split(Framing::Batch, b"{}", 3, 1 << 16),
            Err(FrameError::Unparseable(_))
        ));
    }

    #[test]
    fn an_event_over_the_limit_is_read_for_its_id_alone_in_every_framing() {
        let big = format!(
            r#"{{"id":"big","type":"t","subject":"s","data":{{"x":"{}"}}}}"#,
            "y".repeat(100)
        );
        let small = r#"{"id":"small","type":"t","subject":"s"}"#;
        let limit = small.len();
        let batch = format!("[{small},{big}]");
        let ndjson = format!("{small}\n{big}\n");
        for (framing, body) in [
            (Framing::Batch, batch.as_bytes()),
            (Framing::Ndjson, ndjson.as_bytes()),
            (Framing::Single, big.as_bytes()),
        ] {
            let framed = read(split(framing, body, 10, limit).expect("frames"));
            let last = framed.last().expect("an event");
            assert_eq!(last.len, big.len());
            let envelope = last.value.as_ref().expect("JSON");
            assert_eq!(envelope.id().as_deref(), Some("big"), "{framing:?}");
            assert_eq!(
                *envelope,
                Envelope::oversized(big.as_bytes()).expect("JSON"),
                "{framing:?}"
            );
            // An event within the limit is read whole as before.
            if framing != Framing::Single {
                let first = framed[0].value.as_ref().expect("JSON");
                assert_eq!(*first, Envelope::parse(small.as_bytes()).expect("JSON"));
            }
        }
        // Still JSON or not: a broken oversized single body is refused whole.
        assert!(matches!(
            split(Framing::Single, &big.as_bytes()[..big.len() - 1], 1, limit),
            Err(FrameError::Unparseable(_))
        ));
    }
}
