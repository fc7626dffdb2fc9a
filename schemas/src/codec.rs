//! The events-topic encodings.
//!
//! - **Version 2** (what [`encode`] writes): compact binary, laid out in [`binary`]. Its first
//!   byte is `0x02`.
//! - **Version 1**: a JSON object with `"v": 1` ([`encode_json`]), readable with any Kafka tool.
//!   Its first byte is `{`. The gateway writes it with `--events-encoding json`, for a rolling
//!   upgrade in which aggregators that read only version 1 still run.
//!
//! Invariants:
//! - every message carries its version; a consumer reads both and refuses versions it does not
//!   know; both forms of an event decode to the same [`Event`];
//! - numbers are never binary floating point on the topic: every numeric property travels as
//!   its exact decimal text (`"0.000000000123456789"`) and decodes as text, and version 1's
//!   decoder refuses a JSON number, so no consumer can route a quantity through `f64`.
//!
//! Why version 2: decoding version 1 took a fifth of the aggregator's time per event
//! (`simd-json` into owned fields), and encoding it a clone of every event's data in the
//! gateway; version 2 is read and written in one pass with no parser (`benches/`: `ingest`
//! and `aggregator_state` measure both).

pub mod binary;

use crate::event::Event;
use crate::{Error, Result};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// Version written by [`encode`].
pub const VERSION: u8 = binary::VERSION;
/// Version written by [`encode_json`].
pub const JSON_VERSION: u8 = 1;

/// Which encoding a writer of the events topic uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encoding {
    /// Version 2.
    #[default]
    Binary,
    /// Version 1.
    Json,
}

impl Encoding {
    /// `event` in this encoding.
    pub fn encode(self, event: &Event) -> Vec<u8> {
        match self {
            Self::Binary => encode(event),
            Self::Json => encode_json(event),
        }
    }

    /// The version a message in this encoding starts with ([`version_of`]).
    pub fn version(self) -> u8 {
        match self {
            Self::Binary => VERSION,
            Self::Json => JSON_VERSION,
        }
    }
}

impl std::str::FromStr for Encoding {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "binary" => Ok(Self::Binary),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "`{other}` is not an events encoding (`binary` or `json`)"
            )),
        }
    }
}

#[derive(Serialize)]
struct WireRef<'a> {
    v: u8,
    tenant: &'a str,
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    time: i64,
    received: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    data: Value,
}

#[derive(Deserialize)]
struct WireOwned {
    v: u8,
    tenant: String,
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    subject: String,
    time: i64,
    received: i64,
    #[serde(default)]
    source: Option<String>,
    data: NumberFree,
}

/// Encodes an event for the events topic (version 2).
pub fn encode(event: &Event) -> Vec<u8> {
    binary::encode(event)
}

/// Encodes an event in version 1.
pub fn encode_json(event: &Event) -> Vec<u8> {
    let wire = WireRef {
        v: JSON_VERSION,
        tenant: &event.tenant,
        id: &event.id,
        event_type: &event.event_type,
        subject: &event.subject,
        time: event.time_ms,
        received: event.received_ms,
        source: event.source.as_deref(),
        data: Value::Object(numbers_as_text(&event.data)),
    };
    // Serializing a tree of strings, maps and integers cannot fail.
    serde_json::to_vec(&wire).unwrap_or_default()
}

/// The version a message is in, by its first byte: version 2 starts with its version byte,
/// anything else is read as version 1 (JSON, which starts with `{`).
pub fn version_of(bytes: &[u8]) -> u8 {
    match bytes.first() {
        Some(&binary::VERSION) => binary::VERSION,
        _ => JSON_VERSION,
    }
}

/// Decodes an events-topic message of either version. `bytes` is used as scratch space by the
/// SIMD parser.
pub fn decode(bytes: &mut [u8]) -> Result<Event> {
    if version_of(bytes) == binary::VERSION {
        return binary::decode(bytes);
    }
    let wire = simd_json::serde::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))?;
    from_wire(wire)
}

/// Decodes a message for people to read: a version 2 message's numbers come back as JSON
/// numbers, as the client sent them (version 1 carries them as text). Never for metering.
pub fn decode_readable(bytes: &[u8]) -> Result<Event> {
    if version_of(bytes) == binary::VERSION {
        return binary::decode_readable(bytes);
    }
    Decoder::default().decode(bytes)
}

/// Decodes events-topic messages one after another, reusing the parser's buffers: a consumer
/// decodes millions, and a fresh set of buffers per message was a visible share of its time.
#[derive(Default)]
pub struct Decoder {
    scratch: Vec<u8>,
    buffers: simd_json::Buffers,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder").finish_non_exhaustive()
    }
}

impl Decoder {
    /// Decodes one message, as [`decode`] does; `payload` is left untouched.
    pub fn decode(&mut self, payload: &[u8]) -> Result<Event> {
        if version_of(payload) == binary::VERSION {
            return binary::decode(payload);
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(payload);
        let wire = simd_json::serde::from_slice_with_buffers(&mut self.scratch, &mut self.buffers)
            .map_err(|e| Error::Decode(e.to_string()))?;
        from_wire(wire)
    }

    /// Decodes one message into `event`, as [`Self::decode`] does, reusing `event`'s
    /// allocations where the message is in version 2 (see [`binary::decode_into`]). On an
    /// error `event` holds no meaningful value.
    pub fn decode_into(&mut self, payload: &[u8], event: &mut Event) -> Result<()> {
        if version_of(payload) == binary::VERSION {
            return binary::decode_into(payload, event);
        }
        *event = self.decode(payload)?;
        Ok(())
    }
}

fn from_wire(wire: WireOwned) -> Result<Event> {
    if wire.v != JSON_VERSION {
        return Err(Error::Decode(format!(
            "encoding version {} is not supported in JSON (expected {JSON_VERSION})",
            wire.v
        )));
    }
    let Value::Object(data) = wire.data.0 else {
        return Err(Error::Decode("`data` is not an object".into()));
    };
    Ok(Event {
        tenant: wire.tenant,
        id: wire.id,
        event_type: wire.event_type,
        subject: wire.subject,
        time_ms: wire.time,
        received_ms: wire.received,
        source: wire.source,
        data,
    })
}

fn numbers_as_text(map: &Map<String, Value>) -> Map<String, Value> {
    map.iter()
        .map(|(k, v)| (k.clone(), number_as_text(v)))
        .collect()
}

fn number_as_text(value: &Value) -> Value {
    match value {
        Value::Number(n) => Value::String(n.as_str().to_owned()),
        Value::Array(items) => Value::Array(items.iter().map(number_as_text).collect()),
        Value::Object(map) => Value::Object(numbers_as_text(map)),
        other => other.clone(),
    }
}

/// A JSON value that refuses numbers while deserializing (see the module invariants).
struct NumberFree(Value);

impl<'de> Deserialize<'de> for NumberFree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(NumberFreeVisitor).map(NumberFree)
    }
}

struct NumberFreeVisitor;

impl NumberFreeVisitor {
    fn refuse<E: de::Error>() -> E {
        E::custom("a JSON number on the events topic; quantities must be decimal strings")
    }
}

impl<'de> Visitor<'de> for NumberFreeVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value without numbers")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> std::result::Result<Value, E> {
        Err(Self::refuse())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> std::result::Result<Value, E> {
        Err(Self::refuse())
    }
    #[allow(clippy::float_arithmetic)]
    fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<Value, E> {
        Err(Self::refuse())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(NumberFree(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> std::result::Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some((key, NumberFree(value))) = access.next_entry::<String, NumberFree>()? {
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Event {
        let data: Value = serde_json::from_str(
            r#"{"tokens": 0.000000000123456789, "big": 123456789012345678901234567, "model": "m1", "nested": {"n": [1.5, true, null]}}"#,
        )
        .expect("json");
        Event {
            tenant: "acme".into(),
            id: "evt-1".into(),
            event_type: "llm.completion".into(),
            subject: "cust-1".into(),
            time_ms: 1_790_000_000_123,
            received_ms: 1_790_000_000_200,
            source: Some("sdk".into()),
            data: data.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn round_trip_keeps_every_digit_as_text() {
        let event = sample();
        let mut bytes = encode(&event);
        let decoded = decode(&mut bytes).expect("decode");
        assert_eq!(
            decoded.data.get("tokens"),
            Some(&json!("0.000000000123456789"))
        );
        assert_eq!(
            decoded.data.get("big"),
            Some(&json!("123456789012345678901234567"))
        );
        assert_eq!(
            decoded.data.get("nested"),
            Some(&json!({"n": ["1.5", true, null]}))
        );
        assert_eq!(decoded.time_ms, event.time_ms);
        assert_eq!(decoded.id, event.id);
        assert_eq!(decoded.source, event.source);
    }

    #[test]
    fn json_numbers_and_unknown_versions_are_refused() {
        let mut with_number = br#"{"v":1,"tenant":"a","id":"1","type":"t","subject":"s","time":1,"received":1,"data":{"x":1.5}}"#.to_vec();
        assert!(decode(&mut with_number).is_err());
        let mut v2 = br#"{"v":2,"tenant":"a","id":"1","type":"t","subject":"s","time":1,"received":1,"data":{}}"#.to_vec();
        let e = decode(&mut v2)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("version 2"), "{e}");
        let mut garbage = b"\x00\x01not json".to_vec();
        assert!(decode(&mut garbage).is_err());
    }

    #[test]
    fn a_reused_decoder_reads_each_message_alone_even_after_a_bad_one() {
        let first = sample();
        let mut second = sample();
        second.id = "evt-2".into();
        second.data = serde_json::Map::new();
        let once = |event: &Event| decode(&mut encode(event)).ok();
        let mut decoder = Decoder::default();
        assert_eq!(decoder.decode(&encode(&first)).ok(), once(&first));
        assert!(decoder.decode(b"{\"v\":1,\"tenant\":").is_err());
        let decoded = decoder.decode(&encode(&second)).ok();
        assert_eq!(decoded.as_ref().map(|e| e.id.as_str()), Some("evt-2"));
        assert_eq!(decoded, once(&second));
        assert_eq!(decoder.decode(&encode(&first)).ok(), once(&first));
    }

    #[test]
    fn both_versions_of_an_event_decode_to_the_same_event() {
        let event = sample();
        let from_json = decode(&mut encode_json(&event)).expect("version 1");
        let from_binary = decode(&mut encode(&event)).expect("version 2");
        assert_eq!(from_binary, from_json);
        // One decoder reads both, in any order.
        let mut decoder = Decoder::default();
        for bytes in [encode(&event), encode_json(&event), encode(&event)] {
            assert_eq!(decoder.decode(&bytes).ok().as_ref(), Some(&from_json));
        }
        assert_eq!(encode_json(&event).first(), Some(&b'{'));
        assert_eq!(encode(&event).first(), Some(&VERSION));
        assert_eq!(
            (
                version_of(&encode(&event)),
                version_of(&encode_json(&event))
            ),
            (2, 1)
        );
    }

    #[test]
    fn a_readable_decode_gives_the_numbers_back_as_numbers() {
        let event = sample();
        let readable = decode_readable(&encode(&event)).expect("readable");
        assert_eq!(readable.data, event.data);
        assert_eq!(
            serde_json::to_string(&readable.data.get("tokens")).ok(),
            Some("0.000000000123456789".to_owned())
        );
        // Version 1 carries numbers as text: they stay text.
        let from_json = decode_readable(&encode_json(&event)).expect("readable v1");
        assert_eq!(
            from_json.data.get("tokens"),
            Some(&json!("0.000000000123456789"))
        );
    }

    #[test]
    fn encodings_are_named_binary_and_json() {
        assert_eq!("binary".parse(), Ok(Encoding::Binary));
        assert_eq!("json".parse(), Ok(Encoding::Json));
        assert!("avro".parse::<Encoding>().is_err());
        assert_eq!(Encoding::default(), Encoding::Binary);
        assert_eq!(Encoding::Json.version(), JSON_VERSION);
        assert_eq!(version_of(&Encoding::Json.encode(&sample())), JSON_VERSION);
        assert_eq!(version_of(&Encoding::Binary.encode(&sample())), VERSION);
        assert_eq!(Encoding::Binary.encode(&sample()), encode(&sample()));
    }

    mod property {
        use super::super::*;
        use proptest::prelude::*;

        fn number() -> impl Strategy<Value = Value> {
            (any::<i64>(), 0u32..20, any::<bool>()).prop_map(|(n, scale, exponent)| {
                let text = if exponent {
                    format!("{n}e-{scale}")
                } else {
                    rust_decimal::Decimal::new(n, scale.min(18)).to_string()
                };
                serde_json::from_str(&text).unwrap_or(Value::Null)
            })
        }

        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                "\\PC{0,12}".prop_map(Value::String),
                number(),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    proptest::collection::vec(("\\PC{0,8}", inner), 0..6)
                        .prop_map(|kv| Value::Object(kv.into_iter().collect())),
                ]
            })
        }

        fn event() -> impl Strategy<Value = Event> {
            (
                ("[a-z0-9_-]{1,12}", "\\PC{1,40}", "\\PC{1,20}", "\\PC{1,20}"),
                (any::<i64>(), any::<i64>()),
                proptest::option::of("\\PC{0,20}"),
                proptest::collection::vec(("\\PC{0,10}", value()), 0..8),
            )
                .prop_map(
                    |((tenant, id, event_type, subject), (time_ms, received_ms), source, data)| {
                        Event {
                            tenant,
                            id,
                            event_type,
                            subject,
                            time_ms,
                            received_ms,
                            source,
                            data: data.into_iter().collect(),
                        }
                    },
                )
        }

        proptest! {
            #[test]
            fn version_2_decodes_to_what_version_1_decodes_to(event in event()) {
                let from_json = decode(&mut encode_json(&event)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let from_binary = decode(&mut encode(&event)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&from_binary, &from_json);
                let readable = decode_readable(&encode(&event)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(readable, event);
            }

            #[test]
            fn no_prefix_or_corruption_of_a_message_stops_its_reader(
                event in event(),
                cut in any::<proptest::sample::Index>(),
                flip in any::<(proptest::sample::Index, u8)>(),
            ) {
                let bytes = encode(&event);
                // Every strict prefix is refused (never a panic, never a shorter event).
                let cut = cut.index(bytes.len());
                prop_assert!(binary::decode(&bytes[..cut]).is_err());
                // A changed byte decodes to something or is refused, never panics.
                let mut changed = bytes.clone();
                let at = flip.0.index(changed.len());
                changed[at] ^= flip.1.max(1);
                let _ = binary::decode(&changed);
                let _ = binary::decode_readable(&changed);
            }
        }
    }
}
