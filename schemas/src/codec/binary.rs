//! The events-topic encoding, version 2: compact binary.
//!
//! Layout (every integer a LEB128 varint; `text` is a varint byte length, then UTF-8):
//!
//! ```text
//! 0x02                                  version (a version 1 message starts with `{`)
//! tenant text, id text, type text, subject text
//! time, received                        Unix ms, zigzag varints
//! source                                0x00 absent | 0x01 text
//! data                                  a value that is an object
//!
//! value := 0x00 null | 0x01 false | 0x02 true
//!        | 0x03 text                    a JSON string
//!        | 0x04 text                    a JSON number, as its exact decimal text
//!        | 0x05 count, value*           an array
//!        | 0x06 count, (text, value)*   an object, its keys in the order the event's map
//!                                       holds them (sorted)
//! ```
//!
//! Invariants:
//! - a message decodes to the same [`Event`] as its version 1 form: numbers come back as their
//!   exact decimal text, as version 1 carries them, so no consumer can read a quantity through
//!   `f64`; the number tag only lets a reader print the event as the client sent it;
//! - nothing in a message can stop its reader: lengths and counts are checked against the bytes
//!   left, an array reserves room for at most [`RESERVE`] items ahead of reading them (so nested
//!   arrays claiming the whole message each cannot reserve it many times over), nesting is at
//!   most [`MAX_DEPTH`] deep, and bytes left over after the event are refused;
//! - the layout is fixed: a new field needs a new version byte (the golden bytes in the tests
//!   hold it).

use crate::event::{Event, Valid, ValidData};
use crate::{Error, Result};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::ops::Range;

/// The version byte every version 2 message starts with.
pub const VERSION: u8 = 2;
/// Deepest nesting of arrays and objects read (as deep as `serde_json` parses by default, so
/// every event the gateway accepted fits).
pub const MAX_DEPTH: usize = 128;
/// Most items an array reserves room for before they are read (it grows past that as they are).
pub const RESERVE: usize = 64;

const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const TEXT: u8 = 3;
const NUMBER: u8 = 4;
const ARRAY: u8 = 5;
const OBJECT: u8 = 6;

/// Encodes `event` in version 2.
pub fn encode(event: &Event) -> Vec<u8> {
    let mut out = head(&Head {
        tenant: &event.tenant,
        id: &event.id,
        event_type: &event.event_type,
        subject: &event.subject,
        time_ms: event.time_ms,
        received_ms: event.received_ms,
        source: event.source.as_deref(),
    });
    put_object(&mut out, &event.data);
    out
}

/// Encodes a [`Valid`] event in version 2: the bytes [`encode`] writes for the event it stands
/// for ([`Valid::into_event`]), with its `data` written straight from its JSON text when it
/// has it, no value built. The message's `data` can then be read where it lies
/// ([`Message::data`]), as a meter's paths read the built event's.
pub fn encode_valid(valid: &Valid<'_>) -> serde_json::Result<Message> {
    let mut bytes = head(&Head {
        tenant: valid.tenant,
        id: &valid.id,
        event_type: &valid.event_type,
        subject: &valid.subject,
        time_ms: valid.time_ms,
        received_ms: valid.received_ms,
        source: valid.source.as_deref(),
    });
    let data_at = bytes.len();
    match &valid.data {
        ValidData::Built(map) => put_object(&mut bytes, map),
        ValidData::Text(text) => {
            let mut json = serde_json::Deserializer::from_str(text);
            Deserializer::deserialize_map(&mut json, ObjectVisitor(&mut bytes))?;
            json.end()?;
        }
    }
    Ok(Message { bytes, data_at })
}

/// A version 2 message [`encode_valid`] wrote, and where its `data` starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub bytes: Vec<u8>,
    data_at: usize,
}

impl Message {
    /// The message's `data`, an object, read where it lies.
    pub fn data(&self) -> Encoded<'_> {
        Encoded {
            bytes: self.bytes.get(self.data_at..).unwrap_or_default(),
        }
    }
}

/// A value of a version 2 message, read where it lies, its parts found by walking its bytes
/// rather than building them: what a meter's path finds in an event's `data`
/// ([`crate::json_path::JsonPath::lookup_encoded`]). It reads as the [`Value`] a whole parse
/// of the event's JSON makes: a number is its exact text, an object's members are each key's
/// last value.
#[derive(Debug, Clone, Copy)]
pub struct Encoded<'a> {
    /// From the value's tag on (bytes after the value may follow).
    bytes: &'a [u8],
}

impl<'a> Encoded<'a> {
    fn reader(self) -> Reader<'a> {
        Reader {
            bytes: self.bytes,
            at: 0,
            numbers: Numbers::AsJson,
        }
    }

    /// The member `key` of an object (`None` if absent, or if this is no object).
    pub fn member(self, key: &str) -> Result<Option<Encoded<'a>>> {
        let mut reader = self.reader();
        if reader.byte()? != OBJECT {
            return Ok(None);
        }
        let count = reader.len()?;
        for _ in 0..count {
            if reader.text()? == key {
                return Ok(Some(reader.rest()));
            }
            reader.skip(1)?;
        }
        Ok(None)
    }

    /// The item `index` of an array (`None` if there is none, or if this is no array).
    pub fn item(self, index: usize) -> Result<Option<Encoded<'a>>> {
        let mut reader = self.reader();
        if reader.byte()? != ARRAY {
            return Ok(None);
        }
        if index >= reader.len()? {
            return Ok(None);
        }
        for _ in 0..index {
            reader.skip(1)?;
        }
        Ok(Some(reader.rest()))
    }

    /// A string's or a number's text, or a boolean's (`None` for anything else).
    pub fn scalar_text(self) -> Result<Option<&'a str>> {
        let mut reader = self.reader();
        Ok(match reader.byte()? {
            TEXT | NUMBER => Some(reader.text()?),
            FALSE => Some("false"),
            TRUE => Some("true"),
            _ => None,
        })
    }

    /// A string's or a number's text (`None` for anything else): what a quantity is read from.
    pub fn text(self) -> Result<Option<&'a str>> {
        let mut reader = self.reader();
        Ok(match reader.byte()? {
            TEXT | NUMBER => Some(reader.text()?),
            _ => None,
        })
    }

    /// This value, once its bytes are found to hold it whole, or why they do not: what to
    /// check before reading it through [`crate::measure::Found`], which cannot say why it
    /// read nothing. Builds nothing.
    pub fn whole(self) -> Result<Encoded<'a>> {
        self.reader().skip(0)?;
        Ok(self)
    }

    /// The value built, its numbers JSON numbers (to show it in a message).
    pub fn to_value(self) -> Result<Value> {
        self.reader().value(0)
    }
}

/// What comes before `data`.
struct Head<'a> {
    tenant: &'a str,
    id: &'a str,
    event_type: &'a str,
    subject: &'a str,
    time_ms: i64,
    received_ms: i64,
    source: Option<&'a str>,
}

/// A message's bytes up to its `data`, with room for a typical `data` after them.
fn head(head: &Head<'_>) -> Vec<u8> {
    /// The version, four lengths, two times, the source marker and a typical `data`.
    const TYPICAL_REST: usize = 96;
    let texts = [head.tenant, head.id, head.event_type, head.subject];
    let len: usize = texts.iter().map(|t| t.len()).sum::<usize>()
        + head.source.map_or(0, str::len)
        + TYPICAL_REST;
    let mut out = Vec::with_capacity(len);
    out.push(VERSION);
    for text in texts {
        put_text(&mut out, text);
    }
    put_varint(&mut out, zigzag(head.time_ms));
    put_varint(&mut out, zigzag(head.received_ms));
    match head.source {
        None => out.push(0),
        Some(source) => {
            out.push(1);
            put_text(&mut out, source);
        }
    }
    out
}

/// serde_json's name for a number it hands over as text (`arbitrary_precision`): a map of one
/// member under this key, whose value is the number's text.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// Writes one JSON value as a version 2 value, as [`put_value`] writes the [`Value`] a whole
/// parse makes of it.
struct ValueSeed<'o>(&'o mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(ValueVisitor(self.0))
    }
}

struct ValueVisitor<'o>(&'o mut Vec<u8>);

impl<'de> Visitor<'de> for ValueVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.push(NULL);
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, value: bool) -> Result<(), E> {
        self.0.push(if value { TRUE } else { FALSE });
        Ok(())
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<(), E> {
        self.0.push(TEXT);
        put_text(self.0, text);
        Ok(())
    }
    // With `arbitrary_precision` serde_json hands an integer that fits 64 bits (but `-0`)
    // over as one, and every other number as a map of its text (below). A `Value` holds such
    // an integer as its decimal digits, which are its JSON text (JSON integers have one
    // spelling: no `+`, no leading zeros).
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<(), E> {
        self.0.push(NUMBER);
        put_text(self.0, itoa::Buffer::new().format(n));
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<(), E> {
        self.0.push(NUMBER);
        put_text(self.0, itoa::Buffer::new().format(n));
        Ok(())
    }
    // Never called with `arbitrary_precision`: refused rather than written through `f64`.
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom("a binary floating-point number"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // The count comes first, so the items are written aside, then after it.
        let mut items = Vec::new();
        let mut count = 0usize;
        while seq.next_element_seed(ValueSeed(&mut items))?.is_some() {
            count += 1;
        }
        self.0.push(ARRAY);
        put_len(self.0, count);
        self.0.extend_from_slice(&items);
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        ObjectVisitor(self.0).visit_map(map)
    }
}

/// Writes an object as [`put_object`] writes the map a whole parse makes of it: keys sorted,
/// of a key given twice the last value. A number (a map of one [`NUMBER_TOKEN`] member) is
/// written as one.
struct ObjectVisitor<'o>(&'o mut Vec<u8>);

impl<'de> Visitor<'de> for ObjectVisitor<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        /// Members of a typical event's `data`, and the bytes of their values.
        const TYPICAL_MEMBERS: usize = 8;
        const TYPICAL_VALUE_BYTES: usize = 16;
        let out = self.0;
        let Some(KeyText(first)) = map.next_key()? else {
            out.extend_from_slice(&[OBJECT, 0]);
            return Ok(());
        };
        if first == NUMBER_TOKEN {
            let KeyText(number) = map.next_value()?;
            out.push(NUMBER);
            put_text(out, &number);
            return Ok(());
        }
        // Each member's value is written aside, then the members in key order.
        let mut values = Vec::with_capacity(TYPICAL_MEMBERS * TYPICAL_VALUE_BYTES);
        let mut members: Vec<(Cow<'de, str>, Range<usize>)> = Vec::with_capacity(TYPICAL_MEMBERS);
        let mut next = Some(first);
        while let Some(key) = next {
            let start = values.len();
            map.next_value_seed(ValueSeed(&mut values))?;
            members.push((key, start..values.len()));
            next = map.next_key()?.map(|KeyText(key)| key);
        }
        // Stable: of equal keys, the last given stays last.
        members.sort_by(|a, b| a.0.cmp(&b.0));
        let distinct = members
            .iter()
            .enumerate()
            .filter(|(i, (key, _))| members.get(i + 1).is_none_or(|next| next.0 != *key))
            .map(|(_, member)| member);
        out.push(OBJECT);
        put_len(out, distinct.clone().count());
        for (key, range) in distinct {
            put_text(out, key);
            out.extend_from_slice(values.get(range.clone()).unwrap_or_default());
        }
        Ok(())
    }
}

/// A string, borrowed from the JSON text when it had no escapes.
struct KeyText<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for KeyText<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = KeyText<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(KeyText(Cow::Borrowed(text)))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(KeyText(Cow::Owned(text.to_owned())))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(KeyText(Cow::Owned(text)))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        // The low seven bits, with the continuation bit: the cast keeps exactly those.
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    put_varint(out, u64::try_from(len).unwrap_or(u64::MAX));
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    put_len(out, text.len());
    out.extend_from_slice(text.as_bytes());
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

fn put_object(out: &mut Vec<u8>, map: &Map<String, Value>) {
    out.push(OBJECT);
    put_len(out, map.len());
    for (key, value) in map {
        put_text(out, key);
        put_value(out, value);
    }
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.push(NULL),
        Value::Bool(false) => out.push(FALSE),
        Value::Bool(true) => out.push(TRUE),
        Value::String(text) => {
            out.push(TEXT);
            put_text(out, text);
        }
        Value::Number(n) => {
            out.push(NUMBER);
            put_text(out, n.as_str());
        }
        Value::Array(items) => {
            out.push(ARRAY);
            put_len(out, items.len());
            for item in items {
                put_value(out, item);
            }
        }
        Value::Object(map) => put_object(out, map),
    }
}

/// Decodes a version 2 message (its first byte is [`VERSION`]).
pub fn decode(bytes: &[u8]) -> Result<Event> {
    decode_as(bytes, Numbers::AsText)
}

/// Decodes a version 2 message with its numbers as JSON numbers again, as the client sent
/// them: for people reading the topic (`neruba events tail`), never for metering.
pub fn decode_readable(bytes: &[u8]) -> Result<Event> {
    decode_as(bytes, Numbers::AsJson)
}

/// How numbers of `data` are decoded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Numbers {
    /// As their exact text (what consumers meter, as version 1 carries them).
    AsText,
    /// As JSON numbers (for printing).
    AsJson,
}

fn decode_as(bytes: &[u8], numbers: Numbers) -> Result<Event> {
    let mut event = Event::default();
    decode_into_as(bytes, &mut event, numbers)?;
    Ok(event)
}

/// Decodes a version 2 message into `event`, reusing its strings and, when the message's data
/// has the same keys as `event`'s (one event type after another), its data map and string
/// values: a consumer decoding millions of events of a few shapes allocates almost nothing.
/// The result equals [`decode`]'s whatever `event` held before. On an error `event` holds no
/// meaningful value.
pub fn decode_into(bytes: &[u8], event: &mut Event) -> Result<()> {
    decode_into_as(bytes, event, Numbers::AsText)
}

fn decode_into_as(bytes: &[u8], event: &mut Event, numbers: Numbers) -> Result<()> {
    let mut reader = Reader {
        bytes,
        at: 0,
        numbers,
    };
    let version = reader.byte()?;
    if version != VERSION {
        return Err(Error::Decode(format!(
            "encoding version {version} is not supported here (expected {VERSION})"
        )));
    }
    for field in [
        &mut event.tenant,
        &mut event.id,
        &mut event.event_type,
        &mut event.subject,
    ] {
        set_text(field, reader.text()?);
    }
    event.time_ms = unzigzag(reader.varint()?);
    event.received_ms = unzigzag(reader.varint()?);
    match reader.byte()? {
        0 => event.source = None,
        1 => {
            let text = reader.text()?;
            match &mut event.source {
                Some(source) => set_text(source, text),
                None => event.source = Some(text.to_owned()),
            }
        }
        other => return Err(malformed(format!("source marker {other}"))),
    }
    if reader.bytes.get(reader.at) == Some(&OBJECT) {
        reader.at += 1;
        reader.object_into(&mut event.data)?;
    } else {
        // Read whatever it is, for the same refusal a malformed value gets.
        reader.value(0)?;
        return Err(Error::Decode("`data` is not an object".into()));
    }
    if reader.at != bytes.len() {
        return Err(malformed(format!(
            "{} bytes after the event",
            bytes.len() - reader.at
        )));
    }
    Ok(())
}

fn set_text(field: &mut String, text: &str) {
    field.clear();
    field.push_str(text);
}

fn malformed(what: impl std::fmt::Display) -> Error {
    Error::Decode(format!("malformed version 2 event: {what}"))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    numbers: Numbers,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn byte(&mut self) -> Result<u8> {
        let byte = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| malformed("ends early"))?;
        self.at += 1;
        Ok(byte)
    }

    fn varint(&mut self) -> Result<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(malformed("a number over 64 bits"));
            }
            n |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(malformed("a number over 64 bits"))
    }

    /// A length or count, at most the bytes left (each item takes at least one byte).
    fn len(&mut self) -> Result<usize> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.left())
            .ok_or_else(|| malformed(format!("a length of {n} with {} bytes left", self.left())))
    }

    fn text(&mut self) -> Result<&'a str> {
        let len = self.len()?;
        let bytes = &self.bytes[self.at..self.at + len];
        self.at += len;
        std::str::from_utf8(bytes).map_err(|_| malformed("text that is not UTF-8"))
    }

    fn value(&mut self, depth: usize) -> Result<Value> {
        match self.byte()? {
            NULL => Ok(Value::Null),
            FALSE => Ok(Value::Bool(false)),
            TRUE => Ok(Value::Bool(true)),
            TEXT => Ok(Value::String(self.text()?.to_owned())),
            NUMBER => {
                let text = self.text()?;
                match self.numbers {
                    Numbers::AsText => Ok(Value::String(text.to_owned())),
                    // Text a gateway would not have written is shown as the string it is.
                    Numbers::AsJson => Ok(serde_json::from_str(text)
                        .map_or_else(|_| Value::String(text.to_owned()), Value::Number)),
                }
            }
            ARRAY => {
                let depth = Self::deeper(depth)?;
                let count = self.len()?;
                let mut items = Vec::with_capacity(count.min(RESERVE));
                for _ in 0..count {
                    items.push(self.value(depth)?);
                }
                Ok(Value::Array(items))
            }
            OBJECT => Ok(Value::Object(self.object(Self::deeper(depth)?)?)),
            tag => Err(malformed(format!("value tag {tag}"))),
        }
    }

    /// An object's count and entries (its tag already read), nested `depth` deep.
    fn object(&mut self, depth: usize) -> Result<Map<String, Value>> {
        let count = self.len()?;
        let mut map = Map::new();
        for _ in 0..count {
            let key = self.text()?.to_owned();
            let value = self.value(depth)?;
            map.insert(key, value);
        }
        Ok(map)
    }

    /// Reads the top-level object (its tag already read) into `map`. When the object's keys
    /// are exactly `map`'s, in order (the encoder writes them sorted), each value is
    /// overwritten in place, a string reusing its buffer; otherwise the object is read again
    /// from its start into an emptied map. So the result is what [`Self::value`] would read,
    /// and no message costs more than reading it twice.
    fn object_into(&mut self, map: &mut Map<String, Value>) -> Result<()> {
        let depth = Self::deeper(0)?;
        let start = self.at;
        let count = self.len()?;
        if count == map.len() && self.overwrite(map, count, depth)? {
            return Ok(());
        }
        self.at = start;
        *map = self.object(depth)?;
        Ok(())
    }

    /// Overwrites `map`'s `count` values in place, if the next `count` keys are its keys in
    /// order; `false` (the reader then somewhere inside the object) if they are not.
    fn overwrite(
        &mut self,
        map: &mut Map<String, Value>,
        count: usize,
        depth: usize,
    ) -> Result<bool> {
        for slot in map.iter_mut() {
            let key = self.text()?;
            if key != slot.0 {
                return Ok(false);
            }
            let value = slot.1;
            match (self.byte()?, &mut *value) {
                (TEXT, Value::String(text)) => set_text(text, self.text()?),
                (NUMBER, Value::String(text)) if self.numbers == Numbers::AsText => {
                    set_text(text, self.text()?);
                }
                _ => {
                    self.at -= 1;
                    *value = self.value(depth)?;
                }
            }
        }
        debug_assert_eq!(map.len(), count);
        Ok(true)
    }

    /// The value at the reader's place, and whatever follows it.
    fn rest(&self) -> Encoded<'a> {
        Encoded {
            bytes: self.bytes.get(self.at..).unwrap_or_default(),
        }
    }

    /// Steps over one value, nested `depth` deep, building nothing.
    fn skip(&mut self, depth: usize) -> Result<()> {
        match self.byte()? {
            NULL | FALSE | TRUE => {}
            TEXT | NUMBER => {
                let len = self.len()?;
                self.at += len;
            }
            ARRAY => {
                let depth = Self::deeper(depth)?;
                for _ in 0..self.len()? {
                    self.skip(depth)?;
                }
            }
            OBJECT => {
                let depth = Self::deeper(depth)?;
                for _ in 0..self.len()? {
                    let len = self.len()?;
                    self.at += len;
                    self.skip(depth)?;
                }
            }
            tag => return Err(malformed(format!("value tag {tag}"))),
        }
        Ok(())
    }

    fn deeper(depth: usize) -> Result<usize> {
        if depth >= MAX_DEPTH {
            return Err(malformed(format!("nested deeper than {MAX_DEPTH}")));
        }
        Ok(depth + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Event {
        let data =
            serde_json::from_str::<Value>(r#"{"tokens": 12.5, "model": "m", "ok": [true, null]}"#)
                .ok()
                .and_then(|v| v.as_object().cloned())
                .unwrap_or_default();
        Event {
            tenant: "acme".into(),
            id: "e1".into(),
            event_type: "t".into(),
            subject: "c1".into(),
            time_ms: 1_000,
            received_ms: -1,
            source: None,
            data,
        }
    }

    /// Everything of [`small`] before its `data`: an event without data ends with an empty
    /// object (two bytes).
    fn header() -> Vec<u8> {
        let mut event = small();
        event.data = Map::new();
        let mut bytes = encode(&event);
        bytes.truncate(bytes.len() - 2);
        bytes
    }

    #[test]
    fn the_layout_of_version_2_is_fixed() {
        let mut expected = vec![2u8];
        for text in ["acme", "e1", "t", "c1"] {
            expected.push(u8::try_from(text.len()).unwrap_or(0));
            expected.extend_from_slice(text.as_bytes());
        }
        // 1000 zigzagged = 2000 = 0xd0 0x0f; -1 zigzagged = 1; no source.
        expected.extend_from_slice(&[0xd0, 0x0f, 0x01, 0x00]);
        // The object, its keys sorted.
        expected.extend_from_slice(&[OBJECT, 3]);
        expected.extend_from_slice(b"\x05model\x03\x01m");
        expected.extend_from_slice(&[2, b'o', b'k', ARRAY, 2, TRUE, NULL]);
        expected.extend_from_slice(b"\x06tokens\x04\x0412.5");
        assert_eq!(encode(&small()), expected);
    }

    #[test]
    fn hostile_messages_are_refused_without_allocating_or_recursing_far() {
        let refused = |bytes: &[u8]| decode(bytes).err().map(|e| e.to_string());
        // A length far beyond the message.
        let huge = [2u8, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(refused(&huge).is_some_and(|e| e.contains("length")));
        // A varint longer than 64 bits.
        let mut long = vec![2u8, 0];
        long.extend_from_slice(&[0xff; 11]);
        assert!(refused(&long).is_some());
        // Nesting deeper than MAX_DEPTH: 0x05 0x01 (an array of one) repeated.
        let header = header();
        let mut deep = header.clone();
        deep.extend_from_slice(&[OBJECT, 1, 1, b'x']);
        for _ in 0..MAX_DEPTH + 1 {
            deep.extend_from_slice(&[ARRAY, 1]);
        }
        deep.push(NULL);
        assert!(refused(&deep).is_some_and(|e| e.contains("nested deeper")));
        // Bytes after the event, an unknown tag, a non-object data.
        let mut trailing = encode(&small());
        trailing.push(0);
        assert!(refused(&trailing).is_some_and(|e| e.contains("after the event")));
        let mut tag = header.clone();
        tag.extend_from_slice(&[OBJECT, 1, 1, b'x', 9]);
        assert!(refused(&tag).is_some_and(|e| e.contains("tag 9")));
        let mut not_object = header.clone();
        not_object.push(NULL);
        assert!(refused(&not_object).is_some_and(|e| e.contains("not an object")));
        assert!(refused(&[1u8]).is_some_and(|e| e.contains("version 1")));
        // Arrays nested MAX_DEPTH deep, each claiming every byte left as its count: refused
        // as ending early, each level having reserved at most RESERVE items.
        let mut greedy = header.clone();
        greedy.extend_from_slice(&[OBJECT, 1, 1, b'x']);
        for _ in 0..MAX_DEPTH - 1 {
            greedy.extend_from_slice(&[ARRAY, 0xff, 0xff, 0x3c]);
        }
        greedy.resize(greedy.len() + 1_000_000, NULL);
        assert!(refused(&greedy).is_some_and(|e| e.contains("ends early")));
    }

    /// Events of a few shapes, drawn one after another: the data's keys the same as the
    /// last event's, a subset, a superset or others; values text, numbers (written with the
    /// number tag), nested or null.
    fn shaped_event() -> impl proptest::strategy::Strategy<Value = Event> {
        use proptest::prelude::*;
        let number = |text: String| serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);
        let value = prop_oneof![
            "[a-z0-9.]{0,6}".prop_map(Value::String),
            (0u32..1000).prop_map(move |n| number(format!("{n}.5"))),
            (0u32..1000).prop_map(|n| Value::String(format!("{n}.5"))),
            Just(Value::Null),
            Just(Value::Bool(true)),
            "[a-z]{0,3}".prop_map(|s| serde_json::json!({ "inner": s, "list": [1, s] })),
        ];
        let keys = prop::sample::subsequence(vec!["model", "ok", "region", "tokens"], 0..=4);
        (
            keys,
            prop::collection::vec(value, 4),
            prop::option::of("[a-z]{1,4}"),
            "[a-z]{1,8}",
        )
            .prop_map(|(keys, values, source, id)| {
                let mut event = small();
                event.id = id;
                event.source = source;
                event.data = keys
                    .into_iter()
                    .zip(values)
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                event
            })
    }

    proptest::proptest! {
        /// Decoding into a reused event gives what a fresh decode gives, whatever it held
        /// (a message cut short between them included), for metering and for reading.
        #[test]
        fn decoding_into_a_reused_event_equals_a_fresh_decode(
            events in proptest::collection::vec(
                (shaped_event(), proptest::option::of(proptest::prelude::any::<proptest::sample::Index>())),
                1..12,
            )
        ) {
            let mut reused = Event::default();
            let mut reused_readable = Event::default();
            for (event, cut) in events {
                let mut bytes = encode(&event);
                if let Some(cut) = cut {
                    // Cut anywhere: refused both ways, alike, leaving the reused events half
                    // written.
                    bytes.truncate(cut.index(bytes.len()));
                    let refused = |e: Error| e.to_string();
                    let fresh = decode(&bytes).err().map(refused);
                    proptest::prop_assert!(fresh.is_some());
                    proptest::prop_assert_eq!(decode_into(&bytes, &mut reused).err().map(refused), fresh);
                    let readable = decode_readable(&bytes).err().map(refused);
                    let into = decode_into_as(&bytes, &mut reused_readable, Numbers::AsJson);
                    proptest::prop_assert_eq!(into.err().map(refused), readable);
                    continue;
                }
                proptest::prop_assert!(decode_into(&bytes, &mut reused).is_ok());
                let fresh = decode(&bytes).ok();
                proptest::prop_assert_eq!(Some(&reused), fresh.as_ref());
                let readable = decode_readable(&bytes).ok();
                proptest::prop_assert!(
                    decode_into_as(&bytes, &mut reused_readable, Numbers::AsJson).is_ok()
                );
                proptest::prop_assert_eq!(Some(&reused_readable), readable.as_ref());
            }
        }
    }

    #[test]
    fn a_message_with_repeated_or_unsorted_keys_decodes_the_same_into_a_reused_event() {
        // The encoder writes each key once, sorted; another writer's message may not.
        let mut previous = small();
        previous.data = [("a", "1"), ("b", "2")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v.into())))
            .collect();
        let header = header();
        for entries in [b"aa", b"ba", b"ac"] {
            let mut bytes = header.clone();
            bytes.extend_from_slice(&[OBJECT, 2]);
            for (n, key) in entries.iter().enumerate() {
                let digit = b'5' + u8::try_from(n).unwrap_or(0);
                bytes.extend_from_slice(&[1, *key, TEXT, 1, digit]);
            }
            let mut reused = previous.clone();
            assert!(decode_into(&bytes, &mut reused).is_ok());
            assert_eq!(Some(reused), decode(&bytes).ok());
        }
    }
}
