//! The events-topic encoding, version 1.
//!
//! Invariants:
//! - every message carries its version (`"v": 1`); a consumer refuses versions it does not know;
//! - numbers never appear as JSON numbers on the topic: every numeric property is written as its
//!   exact decimal text (`"0.000000000123456789"`), and the decoder refuses a JSON number, so no
//!   consumer can route a quantity through `f64` by accident.
//!
//! Why JSON rather than a compact binary: the aggregator's cost per event is dominated by the
//! RocksDB write, not by decoding ~200 bytes (see `benches/`: decoding runs at several hundred
//! thousand events per second per core with `simd-json`), and JSON keeps the topic readable
//! with any Kafka tool. The version field leaves room for a binary v2 if a benchmark ever says so.

use crate::event::Event;
use crate::{Error, Result};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// Version written by [`encode`].
pub const VERSION: u8 = 1;

/// Content type set as a Kafka header on every events-topic message.
pub const CONTENT_TYPE: &str = "application/vnd.neruba.event.v1+json";

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

/// Encodes an event for the events topic.
pub fn encode(event: &Event) -> Vec<u8> {
    let wire = WireRef {
        v: VERSION,
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

/// Decodes an events-topic message. `bytes` is used as scratch space by the SIMD parser.
pub fn decode(bytes: &mut [u8]) -> Result<Event> {
    let wire = simd_json::serde::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))?;
    from_wire(wire)
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
        self.scratch.clear();
        self.scratch.extend_from_slice(payload);
        let wire = simd_json::serde::from_slice_with_buffers(&mut self.scratch, &mut self.buffers)
            .map_err(|e| Error::Decode(e.to_string()))?;
        from_wire(wire)
    }
}

fn from_wire(wire: WireOwned) -> Result<Event> {
    if wire.v != VERSION {
        return Err(Error::Decode(format!(
            "encoding version {} is not supported (expected {VERSION})",
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
}
