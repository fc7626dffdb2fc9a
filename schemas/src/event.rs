//! The usage event: a CloudEvents 1.0 envelope whose `data` carries the measured properties.
//!
//! Invariants:
//! - the tenant never comes from the body; callers pass the tenant their credentials proved;
//! - `time` is kept to the millisecond, as Unix milliseconds, so windowing is integer maths;
//! - numeric properties are kept as their exact text ([`serde_json`] with `arbitrary_precision`),
//!   never as `f64`;
//! - validation checks run in a fixed order, so the same bad event always gets the same code.

use crate::reject::{RejectCode, Rejection};
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::marker::PhantomData;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Longest accepted `id`, in characters.
pub const MAX_ID_CHARS: usize = 256;
/// Longest accepted `type`, `subject` or `source`, in characters.
pub const MAX_ATTRIBUTE_CHARS: usize = 1024;

/// A validated event, ready for the events topic. (`Default` is an empty event, not a valid
/// one: a buffer for [`crate::codec::Decoder::decode_into`] to decode into.)
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    /// Tenant proved by the API key (or the raw-topic credentials), never read from the body.
    pub tenant: String,
    /// Idempotency key, unique per tenant.
    pub id: String,
    /// CloudEvents `type`, matched against meters.
    pub event_type: String,
    /// CloudEvents `subject`: the customer.
    pub subject: String,
    /// Event time in Unix milliseconds (receive time when the body had none).
    pub time_ms: i64,
    /// When the gateway received it, Unix milliseconds.
    pub received_ms: i64,
    /// CloudEvents `source`, when given.
    pub source: Option<String>,
    /// The measured properties, numbers kept as exact text.
    pub data: Map<String, Value>,
}

impl Event {
    /// The Kafka key: one customer's events share a partition, so they stay in order.
    ///
    /// Tenant ids cannot contain `/` (the catalog refuses them), so the split is unambiguous.
    pub fn partition_key(&self) -> String {
        let mut key = String::new();
        self.write_partition_key(&mut key);
        key
    }

    /// [`Event::partition_key`], written into `key` (cleared first), so a sender can reuse
    /// one buffer for a whole batch.
    pub fn write_partition_key(&self, key: &mut String) {
        write_partition_key(key, &self.tenant, &self.subject);
    }
}

/// The Kafka key of an event of `tenant`'s customer `subject` ([`Event::partition_key`]),
/// written into `key` (cleared first).
pub fn write_partition_key(key: &mut String, tenant: &str, subject: &str) {
    key.clear();
    key.reserve(tenant.len() + 1 + subject.len());
    key.push_str(tenant);
    key.push('/');
    key.push_str(subject);
}

/// Acceptance limits for one event; see the SPEC's "HTTP ingest" defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded event, bytes.
    pub max_event_bytes: usize,
    /// How far ahead of the receive clock `time` may be, milliseconds.
    pub max_future_ms: i64,
    /// How far behind the receive clock `time` may be (the correction horizon), milliseconds.
    pub correction_horizon_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 64 * 1024,
            max_future_ms: 5 * 60 * 1000,
            correction_horizon_ms: 35 * 24 * 60 * 60 * 1000,
        }
    }
}

/// One CloudEvents attribute of an event as received.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Attribute<'a> {
    #[default]
    Absent,
    Null,
    /// A string, borrowed from the body when it had no escapes.
    Text(Cow<'a, str>),
    /// A number, boolean, array or object: never a valid attribute.
    Other,
}

impl<'a> Attribute<'a> {
    fn from_value(value: Option<Value>) -> Self {
        match value {
            None => Self::Absent,
            Some(Value::Null) => Self::Null,
            Some(Value::String(text)) => Self::Text(Cow::Owned(text)),
            Some(_) => Self::Other,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Text(text) => Some(text),
            _ => None,
        }
    }
}

/// An event's `data` member as received.
#[derive(Debug, Clone, PartialEq, Default)]
enum Data<'a> {
    /// Absent or `null`.
    #[default]
    Absent,
    Object(Map<String, Value>),
    /// An object's JSON text, read by [`Envelope::parse`] as a whole parse reads it, not built.
    Text(&'a str),
    /// Anything but an object.
    Other,
}

impl<'a> Data<'a> {
    fn from_value(value: Option<Value>) -> Self {
        match value {
            None | Some(Value::Null) => Self::Absent,
            Some(Value::Object(map)) => Self::Object(map),
            Some(_) => Self::Other,
        }
    }

    /// `data` as the one-pass read captured it: an object is kept as its text.
    fn from_raw(raw: &'a RawValue) -> Self {
        let text = raw.get();
        match text.as_bytes().first() {
            Some(b'{') => Self::Text(text),
            _ if text == "null" => Self::Absent,
            _ => Self::Other,
        }
    }
}

/// One event's JSON as [`validate_envelope`] reads it: the CloudEvents attributes and `data`.
///
/// [`Envelope::parse`] reads them straight from the event's bytes, the attributes borrowed
/// where they have no escapes, other members skipped unread; it means exactly what parsing the
/// whole value and [`Envelope::from_value`] mean (of a member given twice, the last counts; a
/// value that is not an object is remembered as such; bytes a skip could read differently are
/// parsed whole), so both paths give every event the same outcome, code and message.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Envelope<'a> {
    /// Whether the JSON was an object (an event must be).
    object: bool,
    specversion: Attribute<'a>,
    id: Attribute<'a>,
    event_type: Attribute<'a>,
    subject: Attribute<'a>,
    source: Attribute<'a>,
    time: Attribute<'a>,
    data: Data<'a>,
}

impl<'a> Envelope<'a> {
    /// Reads an event's envelope from its JSON bytes; `Err` if they are not JSON (the error
    /// [`serde_json`] gives for the whole value).
    pub fn parse(json: &'a [u8]) -> serde_json::Result<Self> {
        // What is skipped here is not read as a whole parse reads it: serde_json checks
        // neither its UTF-8 nor its nesting depth, and a whole parse gives serde_json's private
        // keys meaning wherever they are. So bytes that could tell the two apart are parsed
        // whole (all rare in events): not UTF-8; more brackets and braces than nesting could
        // reach serde_json's depth limit with; a `\u` escape or the private key prefix (the
        // only two ways to write a private key).
        match std::str::from_utf8(json) {
            Ok(text) => Self::parse_text(text),
            Err(_) => serde_json::from_slice(json).map(Self::from_value),
        }
    }

    /// [`Envelope::parse`] of bytes known to be UTF-8 (a batch's events, which serde_json
    /// checked while framing them).
    pub fn parse_text(text: &'a str) -> serde_json::Result<Self> {
        let json = text.as_bytes();
        let whole = || serde_json::from_slice(json).map(Self::from_value);
        if json.iter().filter(|b| matches!(b, b'{' | b'[')).count() > MAX_ONE_PASS_NESTING
            || (memchr::memchr2(b'\\', b'$', json).is_some() && read_whole(json))
        {
            return whole();
        }
        // The common shape (an object whose attributes are strings or null) is read here;
        // anything else (a value of another type where a string belongs, an event that is not
        // an object, a syntax error) is parsed whole, so its outcome and any error's text are
        // serde_json's.
        serde_json::from_str::<Envelope<'a>>(text).or_else(|_| whole())
    }

    /// The envelope of an event over the size limit, which [`validate_envelope`] refuses
    /// whatever it holds: only whether it is an object and its `id` (to name the event in the
    /// answer) are kept; everything else is read as a whole parse reads it and dropped, so an
    /// oversized event costs no memory beyond its bytes however many values it packs (read
    /// whole, a 5 MiB array of small numbers takes some 90 MiB). `Err` if the bytes are not
    /// JSON, as a whole parse would say (one exception: serde_json's private map keys, which a
    /// whole parse reads as a number or raw value, are read as marking a value that is not an
    /// object, whatever follows them; such an event is refused as too large either way).
    pub fn oversized(json: &'a [u8]) -> serde_json::Result<Self> {
        // From a slice, serde_json checks the UTF-8 of the strings it reads (all of them here).
        serde_json::from_slice::<Oversized<'a>>(json).map(|oversized| oversized.0)
    }

    /// The envelope of an event already parsed whole.
    pub fn from_value(value: Value) -> Envelope<'static> {
        let Value::Object(mut object) = value else {
            return Envelope::default();
        };
        let mut take = |name: &str| Attribute::from_value(object.remove(name));
        Envelope {
            object: true,
            specversion: take("specversion"),
            id: take("id"),
            event_type: take("type"),
            subject: take("subject"),
            source: take("source"),
            time: take("time"),
            data: Data::from_value(object.remove("data")),
        }
    }

    /// The event's `id` when it is a string, valid or not (to name the event in an answer),
    /// borrowed from the body when it was.
    pub fn id(&self) -> Option<Cow<'a, str>> {
        match &self.id {
            Attribute::Text(text) => Some(text.clone()),
            _ => None,
        }
    }

    /// The event's `subject` when it is a string, valid or not, borrowed from the body when
    /// it was.
    pub fn subject(&self) -> Option<Cow<'a, str>> {
        match &self.subject {
            Attribute::Text(text) => Some(text.clone()),
            _ => None,
        }
    }
}

/// A visitor's methods for JSON's booleans and numbers (and, named after the value, strings
/// and `null`), each taking the value as `$value`: for visitors that read a value only to
/// check it.
macro_rules! accept_scalars {
    ($value:expr $(, $extra:ident)*) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        $(accept_scalars!(@$extra $value);)*
    };
    (@visit_str $value:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
    (@visit_unit $value:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// `Ok` if `json` is one JSON value, read as a whole parse reads it but with nothing built (see
/// [`Envelope::oversized`]).
pub fn check_json(json: &[u8]) -> serde_json::Result<()> {
    serde_json::from_slice::<Checked>(json).map(|_| ())
}

/// [`Envelope::oversized`]: an object's `id`, every other value [`Checked`] and dropped.
struct Oversized<'a>(Envelope<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Oversized<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OversizedVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for OversizedVisitor<'a> {
            type Value = Envelope<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut envelope = Envelope {
                    object: true,
                    ..Envelope::default()
                };
                while let Some(member) = map.next_key::<Member>()? {
                    match member {
                        // The last given counts, as in a whole parse.
                        Member::Id => envelope.id = map.next_value::<Lenient<'a>>()?.0,
                        // A top-level number (`arbitrary_precision` hands it over as a map
                        // with a private key): not an object.
                        Member::Private => {
                            envelope.object = false;
                            map.next_value::<Checked>()?;
                        }
                        _ => {
                            map.next_value::<Checked>()?;
                        }
                    }
                }
                Ok(envelope)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                CheckedVisitor.visit_seq(seq).map(|_| Envelope::default())
            }
            // Not an object.
            accept_scalars!(Envelope::default(), visit_str, visit_unit);
        }
        deserializer
            .deserialize_any(OversizedVisitor(PhantomData))
            .map(Oversized)
    }
}

/// An attribute read leniently: a string or `null` as [`Attribute`] reads them, any other
/// value [`Checked`] and taken as [`Attribute::Other`] (not an error, as the one-pass read
/// makes it, since an oversized event is never parsed whole).
struct Lenient<'a>(Attribute<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Lenient<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LenientVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for LenientVisitor<'a> {
            type Value = Attribute<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(Attribute::Text(Cow::Borrowed(text)))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Attribute::Text(Cow::Owned(text.to_owned())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Attribute::Null)
            }
            accept_scalars!(Attribute::Other);
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                CheckedVisitor.visit_seq(seq).map(|_| Attribute::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                CheckedVisitor.visit_map(map).map(|_| Attribute::Other)
            }
        }
        deserializer
            .deserialize_any(LenientVisitor(PhantomData))
            .map(Lenient)
    }
}

/// Any JSON value, read as a whole parse reads it (strings through their escapes, containers
/// within serde_json's depth limit) and dropped as it goes: nothing is built. serde's
/// `IgnoredAny` checks neither escapes nor depth.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    accept_scalars!(Checked, visit_str, visit_unit);
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_key::<Checked>()?.is_some() {
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}

/// serde_json's private map keys: numbers under `arbitrary_precision`, raw values.
const PRIVATE_KEY_PREFIX: &str = "$serde_json::private::";

/// Whether [`Envelope::parse_text`] must parse `json` whole, because a skip could read it
/// otherwise than a whole parse: a `\u` escape of a surrogate (a skip does not check that they
/// pair, a whole parse refuses one alone), or a way to write serde_json's private key prefix
/// (which a whole parse gives meaning): a `$`, as itself or escaped, with the prefix written
/// out or any `\u` escape (which could spell part of it). Other `\u` escapes, as some JSON
/// writers use for every character that is not ASCII, are read in one pass. Errs toward `true`
/// (an escaped backslash before a `u` counts as an escape).
fn read_whole(json: &[u8]) -> bool {
    let mut any_escape = false;
    let mut escaped_dollar = false;
    for at in memchr::memmem::find_iter(json, b"\\u") {
        any_escape = true;
        let hex = json.get(at + 2..at + 6).unwrap_or_default();
        if let [first, second, ..] = hex
            && first.eq_ignore_ascii_case(&b'd')
            && matches!(second.to_ascii_lowercase(), b'8'..=b'9' | b'a'..=b'f')
        {
            return true;
        }
        escaped_dollar |= hex.eq_ignore_ascii_case(b"0024");
    }
    (escaped_dollar || memchr::memchr(b'$', json).is_some())
        && (any_escape || memchr::memmem::find(json, PRIVATE_KEY_PREFIX.as_bytes()).is_some())
}

/// Bytes with more `{` and `[` than this are parsed whole: nesting within it stays well below
/// serde_json's depth limit (128), which the one-pass read does not apply to what it skips.
const MAX_ONE_PASS_NESTING: usize = 64;

/// The members validation reads.
enum Member {
    Specversion,
    Id,
    Type,
    Subject,
    Source,
    Time,
    Data,
    Private,
    Other,
}

impl<'de> Deserialize<'de> for Member {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = Member;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<Member, E> {
                Ok(match name {
                    "specversion" => Member::Specversion,
                    "id" => Member::Id,
                    "type" => Member::Type,
                    "subject" => Member::Subject,
                    "source" => Member::Source,
                    "time" => Member::Time,
                    "data" => Member::Data,
                    _ if name.starts_with(PRIVATE_KEY_PREFIX) => Member::Private,
                    _ => Member::Other,
                })
            }
        }
        deserializer.deserialize_str(Name)
    }
}

/// A string or `null`; any other type is an error, and the event is parsed whole.
impl<'de: 'a, 'a> Deserialize<'de> for Attribute<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AttributeVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for AttributeVisitor<'a> {
            type Value = Attribute<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or null")
            }
            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(Attribute::Text(Cow::Borrowed(text)))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Attribute::Text(Cow::Owned(text.to_owned())))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(Attribute::Text(Cow::Owned(text)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Attribute::Null)
            }
        }
        deserializer.deserialize_any(AttributeVisitor(PhantomData))
    }
}

/// An object; anything else is an error, and the event is parsed whole.
impl<'de: 'a, 'a> Deserialize<'de> for Envelope<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EnvelopeVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for EnvelopeVisitor<'a> {
            type Value = Envelope<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut envelope = Envelope {
                    object: true,
                    ..Envelope::default()
                };
                while let Some(member) = map.next_key::<Member>()? {
                    match member {
                        Member::Specversion => envelope.specversion = map.next_value()?,
                        Member::Id => envelope.id = map.next_value()?,
                        Member::Type => envelope.event_type = map.next_value()?,
                        Member::Subject => envelope.subject = map.next_value()?,
                        Member::Source => envelope.source = map.next_value()?,
                        Member::Time => envelope.time = map.next_value()?,
                        // Kept as its text: the gateway encodes it without building it
                        // ([`Valid`]).
                        Member::Data => envelope.data = Data::from_raw(map.next_value()?),
                        // Only a top-level number gets here (`arbitrary_precision` hands it
                        // over as a map with a private key; the bytes hold none).
                        Member::Private => return Err(de::Error::custom("not an object")),
                        Member::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(envelope)
            }
        }
        deserializer.deserialize_any(EnvelopeVisitor(PhantomData))
    }
}

/// Turns one decoded JSON value into an [`Event`] for `tenant`, or says why not.
///
/// `encoded_len` is the size of the event's own bytes as received (for the per-event limit);
/// `now_ms` is the receive time in Unix milliseconds.
pub fn validate(
    value: Value,
    encoded_len: usize,
    tenant: &str,
    now_ms: i64,
    limits: &Limits,
) -> Result<Event, Rejection> {
    validate_envelope(
        Envelope::from_value(value),
        encoded_len,
        tenant,
        now_ms,
        limits,
    )
}

/// [`validate`] of an event's [`Envelope`]: the checks in their fixed order.
pub fn validate_envelope(
    envelope: Envelope<'_>,
    encoded_len: usize,
    tenant: &str,
    now_ms: i64,
    limits: &Limits,
) -> Result<Event, Rejection> {
    validate_borrowed(envelope, encoded_len, tenant, now_ms, limits)?.into_event()
}

/// A validated event, its attributes borrowed from the bytes it was read from where they had
/// no escapes and its `data` as those bytes had it: what the gateway encodes for the events
/// topic ([`crate::codec::binary::encode_valid`]) without building the event's values. It
/// stands for exactly the [`Event`] [`Valid::into_event`] makes of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Valid<'a> {
    pub tenant: &'a str,
    pub id: Cow<'a, str>,
    pub event_type: Cow<'a, str>,
    pub subject: Cow<'a, str>,
    pub time_ms: i64,
    pub received_ms: i64,
    pub source: Option<Cow<'a, str>>,
    pub data: ValidData<'a>,
}

/// A valid event's `data`.
#[derive(Debug, Clone, PartialEq)]
pub enum ValidData<'a> {
    /// Built (an event parsed whole, or one without `data`: an empty map).
    Built(Map<String, Value>),
    /// The JSON text of an object, read as a whole parse reads it (so it parses), holding no
    /// serde_json private key (events with one are parsed whole).
    Text(&'a str),
}

impl Valid<'_> {
    /// The event, every value built.
    pub fn into_event(self) -> Result<Event, Rejection> {
        let data = match self.data {
            ValidData::Built(map) => map,
            // Already read as a whole parse reads it, so this parses; were it not to, the
            // event is refused as a whole parse would refuse it.
            ValidData::Text(text) => serde_json::from_str(text).map_err(|e| {
                Rejection::new(RejectCode::InvalidJson, format!("event is not JSON: {e}"))
            })?,
        };
        Ok(Event {
            tenant: self.tenant.to_owned(),
            id: self.id.into_owned(),
            event_type: self.event_type.into_owned(),
            subject: self.subject.into_owned(),
            time_ms: self.time_ms,
            received_ms: self.received_ms,
            source: self.source.map(Cow::into_owned),
            data,
        })
    }
}

/// [`validate_envelope`] without building anything: the same checks in the same order.
pub fn validate_borrowed<'a>(
    envelope: Envelope<'a>,
    encoded_len: usize,
    tenant: &'a str,
    now_ms: i64,
    limits: &Limits,
) -> Result<Valid<'a>, Rejection> {
    if encoded_len > limits.max_event_bytes {
        return Err(Rejection::new(
            RejectCode::EventTooLarge,
            format!(
                "event is {encoded_len} bytes; the limit is {}",
                limits.max_event_bytes
            ),
        ));
    }
    if !envelope.object {
        return Err(Rejection::new(
            RejectCode::InvalidJson,
            "an event must be a JSON object",
        ));
    }
    if envelope.specversion != Attribute::Absent && envelope.specversion.as_str() != Some("1.0") {
        return Err(Rejection::new(
            RejectCode::InvalidField,
            "`specversion` must be \"1.0\" when given",
        ));
    }
    let id = required_string(envelope.id, "id", MAX_ID_CHARS)?;
    let event_type = required_string(envelope.event_type, "type", MAX_ATTRIBUTE_CHARS)?;
    let subject = required_string(envelope.subject, "subject", MAX_ATTRIBUTE_CHARS)?;
    let source = match envelope.source {
        Attribute::Absent | Attribute::Null => None,
        Attribute::Text(s) if s.chars().count() <= MAX_ATTRIBUTE_CHARS => Some(s),
        _ => {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                format!("`source` must be a string of at most {MAX_ATTRIBUTE_CHARS} characters"),
            ));
        }
    };
    let time_ms = match envelope.time {
        Attribute::Absent | Attribute::Null => now_ms,
        Attribute::Text(text) => parse_time_ms(&text)?,
        Attribute::Other => {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                "`time` must be an RFC 3339 string with an offset",
            ));
        }
    };
    if time_ms > now_ms.saturating_add(limits.max_future_ms) {
        return Err(Rejection::new(
            RejectCode::TimestampInFuture,
            format!(
                "`time` is more than {} s after the receive time",
                limits.max_future_ms / 1000
            ),
        ));
    }
    if time_ms < now_ms.saturating_sub(limits.correction_horizon_ms) {
        return Err(Rejection::new(
            RejectCode::TimestampTooFarInPast,
            format!(
                "`time` is older than the correction horizon of {} days",
                limits.correction_horizon_ms / 86_400_000
            ),
        ));
    }
    let data = match envelope.data {
        Data::Absent => ValidData::Built(Map::new()),
        Data::Object(map) => ValidData::Built(map),
        Data::Text(text) => ValidData::Text(text),
        Data::Other => {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                "`data` must be a JSON object of properties",
            ));
        }
    };
    Ok(Valid {
        tenant,
        id,
        event_type,
        subject,
        time_ms,
        received_ms: now_ms,
        source,
        data,
    })
}

fn required_string<'a>(
    attribute: Attribute<'a>,
    field: &str,
    max_chars: usize,
) -> Result<Cow<'a, str>, Rejection> {
    match attribute {
        Attribute::Absent | Attribute::Null => Err(Rejection::new(
            RejectCode::MissingField,
            format!("`{field}` is required"),
        )),
        Attribute::Text(s) => {
            let chars = s.chars().count();
            if chars == 0 || chars > max_chars {
                Err(Rejection::new(
                    RejectCode::InvalidField,
                    format!("`{field}` must be 1 to {max_chars} characters"),
                ))
            } else if s.chars().any(char::is_control) {
                // Ids, types and subjects end up in keys, logs, CSV exports and invoices, where
                // a NUL or a newline splits or hides what follows it.
                Err(Rejection::new(
                    RejectCode::InvalidField,
                    format!("`{field}` must not contain control characters"),
                ))
            } else {
                Ok(s)
            }
        }
        Attribute::Other => Err(Rejection::new(
            RejectCode::InvalidField,
            format!("`{field}` must be a string"),
        )),
    }
}

/// Parses an RFC 3339 timestamp with offset into Unix milliseconds (sub-millisecond digits are
/// truncated toward the past, so an event never moves into a later window).
pub fn parse_time_ms(text: &str) -> Result<i64, Rejection> {
    let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
        Rejection::new(
            RejectCode::InvalidField,
            format!("`time` is not RFC 3339 with an offset: {e}"),
        )
    })?;
    // Whole seconds (toward the past) and the millisecond within the second, which is never
    // negative: the floor of the nanoseconds / 10^6, without 128-bit division.
    parsed
        .unix_timestamp()
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(parsed.millisecond())))
        .ok_or_else(|| Rejection::new(RejectCode::InvalidField, "`time` is out of range"))
}

/// The wall clock in Unix milliseconds: the one clock read every component uses (receive
/// times, idle watermarks, expiry).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Formats Unix milliseconds as RFC 3339 UTC with millisecond precision
/// (`2026-11-24T10:00:00.123Z`); a time outside the calendar's years ±9999 as its number.
///
/// Line items, grant and rule records and usage reads carry several times each, so the digits
/// are written directly: `format!` with its seven padded fields cost more than the calendar
/// arithmetic (rating a rollup into a line item took 40 % less time without it).
pub fn format_time_ms(ms: i64) -> String {
    // From whole seconds: through nanoseconds it divided 128-bit numbers (a usage read of a
    // month's minutes writes 172,800 times).
    let Ok(t) = OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)) else {
        return ms.to_string();
    };
    let milli = u16::try_from(ms.rem_euclid(1000)).unwrap_or_default();
    let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
    let (h, mi, s) = (t.hour(), t.minute(), t.second());
    let year = match u16::try_from(y) {
        Ok(year) if year <= 9999 => year,
        // Years before 0 keep their sign as before (`-001`).
        _ => return format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z"),
    };
    let mut out = String::with_capacity(24);
    push_digits(&mut out, year, 4);
    out.push('-');
    push_digits(&mut out, u16::from(mo), 2);
    out.push('-');
    push_digits(&mut out, u16::from(d), 2);
    out.push('T');
    push_digits(&mut out, u16::from(h), 2);
    out.push(':');
    push_digits(&mut out, u16::from(mi), 2);
    out.push(':');
    push_digits(&mut out, u16::from(s), 2);
    out.push('.');
    push_digits(&mut out, milli, 3);
    out.push('Z');
    out
}

/// The last `width` decimal digits of `value`, zero-padded.
fn push_digits(out: &mut String, value: u16, width: u32) {
    for place in (0..width).rev() {
        let digit = value / 10_u16.pow(place) % 10;
        out.push(char::from(b'0' + digit as u8));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const NOW: i64 = 1_790_000_000_000;

    /// The formatting before the digits were written directly.
    fn formatted_as_before(ms: i64) -> String {
        let nanos = i128::from(ms) * 1_000_000;
        match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(t) => {
                let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
                let (h, mi, s, milli) = (t.hour(), t.minute(), t.second(), t.millisecond());
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
            }
            Err(_) => ms.to_string(),
        }
    }

    proptest! {
        /// Every time within the calendar's years (and around it, and outside it) is written
        /// as it was, and reads back.
        #[test]
        fn times_are_formatted_as_before_and_read_back(
            ms in prop_oneof![
                -62_167_219_200_000_i64..253_402_300_800_000,
                -400_000_000_000_000_i64..-62_000_000_000_000,
                253_000_000_000_000_i64..400_000_000_000_000,
                any::<i64>(),
            ]
        ) {
            let text = format_time_ms(ms);
            prop_assert_eq!(&text, &formatted_as_before(ms));
            if (0..253_402_300_800_000).contains(&ms) {
                prop_assert_eq!(parse_time_ms(&text).ok(), Some(ms));
            }
        }
    }

    #[test]
    fn times_at_the_calendars_edges() {
        assert_eq!(format_time_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_time_ms(1_764_000_000_123),
            "2025-11-24T16:00:00.123Z"
        );
        assert_eq!(format_time_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_time_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            format_time_ms(-62_167_219_200_000),
            "0000-01-01T00:00:00.000Z"
        );
        assert_eq!(
            format_time_ms(253_402_300_799_999),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(
            format_time_ms(-62_167_219_200_001),
            "-001-12-31T23:59:59.999Z"
        );
        assert_eq!(format_time_ms(253_402_300_800_000), "253402300800000");
    }

    fn check(value: Value) -> Result<Event, Rejection> {
        validate(value, 100, "acme", NOW, &Limits::default())
    }

    fn code(value: Value) -> RejectCode {
        match check(value) {
            Ok(e) => panic!("expected a rejection, got {e:?}"),
            Err(r) => r.code,
        }
    }

    #[test]
    fn the_partition_key_is_tenant_slash_subject_however_it_is_written() {
        let event = |subject: &str| Event {
            tenant: "acme".into(),
            subject: subject.into(),
            ..Event::default()
        };
        assert_eq!(event("cust-9").partition_key(), "acme/cust-9");
        // Into a buffer that held a longer key: cleared first.
        let mut key = "beta/a-much-longer-customer".to_owned();
        event("c/1").write_partition_key(&mut key);
        assert_eq!(key, "acme/c/1");
        event("").write_partition_key(&mut key);
        assert_eq!(key, "acme/");
    }

    #[test]
    fn complete_event_is_accepted_with_tenant_from_caller() {
        let event = check(json!({
            "specversion": "1.0", "id": "e-1", "type": "api.request", "subject": "cust-9",
            "source": "sdk", "time": "2026-09-21T12:00:00.123456+02:00",
            "data": {"tokens": 12, "tenant": "someone-else"}
        }))
        .expect("valid");
        assert_eq!(event.tenant, "acme");
        assert_eq!(event.id, "e-1");
        assert_eq!(event.subject, "cust-9");
        // 12:00:00.123456+02:00 is 10:00:00.123Z, 4 h 13 min 20 s before NOW.
        assert_eq!(event.time_ms, NOW - 15_200_000 + 123);
        assert_eq!(event.data.get("tenant"), Some(&json!("someone-else")));
    }

    #[test]
    fn absent_time_is_receive_time() {
        let event = check(json!({"id": "a", "type": "t", "subject": "s"})).expect("valid");
        assert_eq!(event.time_ms, NOW);
        assert!(event.data.is_empty());
    }

    #[test]
    fn each_bad_attribute_gets_its_code() {
        assert_eq!(code(json!([1])), RejectCode::InvalidJson);
        assert_eq!(
            code(json!({"type": "t", "subject": "s"})),
            RejectCode::MissingField
        );
        assert_eq!(
            code(json!({"id": "", "type": "t", "subject": "s"})),
            RejectCode::InvalidField
        );
        assert_eq!(
            code(json!({"id": 5, "type": "t", "subject": "s"})),
            RejectCode::InvalidField
        );
        let long_id = "x".repeat(MAX_ID_CHARS + 1);
        assert_eq!(
            code(json!({"id": long_id, "type": "t", "subject": "s"})),
            RejectCode::InvalidField
        );
        assert_eq!(
            code(json!({"id": "a", "type": "t", "subject": "s", "specversion": "0.3"})),
            RejectCode::InvalidField
        );
        assert_eq!(
            code(json!({"id": "a", "type": "t", "subject": "s", "time": "yesterday"})),
            RejectCode::InvalidField
        );
        assert_eq!(
            code(json!({"id": "a", "type": "t", "subject": "s", "data": [1, 2]})),
            RejectCode::InvalidField
        );
    }

    #[test]
    fn control_characters_in_id_type_or_subject_are_invalid_field() {
        for bad in ["a\0b", "line\nbreak", "tab\there", "\u{7f}", "c1\u{85}"] {
            for field in ["id", "type", "subject"] {
                let mut event = json!({"id": "a", "type": "t", "subject": "s"});
                event[field] = json!(bad);
                assert_eq!(code(event), RejectCode::InvalidField, "{field} = {bad:?}");
            }
        }
        assert!(check(json!({"id": "ünïcode €", "type": "t", "subject": "s p a c e"})).is_ok());
    }

    #[test]
    fn time_limits_are_inclusive_at_the_edges() {
        let limits = Limits::default();
        let at =
            |ms: i64| json!({"id": "a", "type": "t", "subject": "s", "time": format_time_ms(ms)});
        assert!(check(at(NOW + limits.max_future_ms)).is_ok());
        assert_eq!(
            code(at(NOW + limits.max_future_ms + 1)),
            RejectCode::TimestampInFuture
        );
        assert!(check(at(NOW - limits.correction_horizon_ms)).is_ok());
        assert_eq!(
            code(at(NOW - limits.correction_horizon_ms - 1)),
            RejectCode::TimestampTooFarInPast
        );
    }

    #[test]
    fn oversized_event_is_refused_before_parsing_fields() {
        let limits = Limits::default();
        let r = validate(json!({}), limits.max_event_bytes + 1, "acme", NOW, &limits);
        assert_eq!(r.map_err(|r| r.code).err(), Some(RejectCode::EventTooLarge));
    }

    /// A JSON scalar, with the strings validation treats specially.
    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("5".to_owned()),
            Just("-0.25e3".to_owned()),
            Just("123456789012345678901234567890".to_owned()),
            Just("\"1.0\"".to_owned()),
            Just("\"\"".to_owned()),
            Just("\"e-1\"".to_owned()),
            Just("\"e\\u002d1\"".to_owned()),
            Just("\"caf\\u00e9 \\u00E9\"".to_owned()),
            Just("\"\\ud83d\\ude00\"".to_owned()),
            Just("\"\\uD800\"".to_owned()),
            Just("\"x\\udc00\"".to_owned()),
            Just("\"\\\\ud800\"".to_owned()),
            Just("\"a\\nb\"".to_owned()),
            Just("\"q\\\"uote\"".to_owned()),
            Just("\"$5.00\"".to_owned()),
            Just("\"\u{fc}n\u{ef}code \u{20ac}\"".to_owned()),
            Just("\"2026-09-21T12:00:00.123456+02:00\"".to_owned()),
            Just("\"2026-09-21T14:13:20.007Z\"".to_owned()),
            Just("\"yesterday\"".to_owned()),
            Just("\"$serde_json::private::Number\"".to_owned()),
            "[a-z0-9 ]{0,6}".prop_map(|s| format!("\"{s}\"")),
        ]
    }

    /// A JSON value: mostly scalars (so that attributes are often valid), sometimes arrays and
    /// objects, now and then nested past serde_json's depth limit.
    fn member_value() -> impl Strategy<Value = String> {
        let composite = scalar().prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec((member_name(), inner), 0..3).prop_map(|members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, v)| format!("{k}:{v}"))
                        .collect();
                    format!("{{{}}}", members.join(","))
                }),
            ]
        });
        prop_oneof![
            8 => scalar(),
            3 => composite,
            1 => (60..140usize).prop_map(|depth| format!("{}1{}", "[".repeat(depth), "]".repeat(depth))),
            1 => Just("{\"data\":{\"tokens\":7,\"model\":\"large\"}}".to_owned()),
        ]
    }

    /// A member name: the attributes (one of them escaped), others, and serde_json's private
    /// keys (one of them escaped).
    fn member_name() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => Just("\"specversion\""),
            3 => Just("\"id\""),
            3 => Just("\"type\""),
            3 => Just("\"subject\""),
            3 => Just("\"source\""),
            3 => Just("\"time\""),
            3 => Just("\"data\""),
            2 => Just("\"tokens\""),
            1 => Just("\"i\\u0064\""),
            1 => Just("\"$serde_json::private::Number\""),
            1 => Just("\"$serde_json::private::RawValue\""),
            1 => Just("\"\\u0024serde_json::private::Number\""),
        ]
        .prop_map(str::to_owned)
    }

    /// A member an event could validly have.
    fn valid_member() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\"specversion\":\"1.0\"".to_owned()),
            "[a-z0-9-]{1,8}".prop_map(|id| format!("\"id\":\"{id}\"")),
            Just("\"type\":\"llm.completion\"".to_owned()),
            "[a-z0-9 ]{1,8}".prop_map(|s| format!("\"subject\":\"{s}\"")),
            Just("\"source\":\"sdk\"".to_owned()),
            Just("\"source\":null".to_owned()),
            Just("\"time\":\"2026-09-21T12:00:00.123456+02:00\"".to_owned()),
            Just("\"time\":\"2026-09-21T14:13:20.007Z\"".to_owned()),
            Just("\"data\":{\"tokens\":12,\"model\":\"large\",\"tokens\":3.50}".to_owned()),
            Just("\"data\":null".to_owned()),
            member_value().prop_map(|v| format!("\"extension\":{v}")),
        ]
    }

    /// An event's bytes: mostly objects holding the required attributes, whose members repeat
    /// and vary in type; sometimes not an object, not JSON, or not UTF-8.
    fn event_bytes() -> impl Strategy<Value = Vec<u8>> {
        let any_member = || {
            prop_oneof![
                3 => valid_member(),
                2 => (member_name(), member_value()).prop_map(|(k, v)| format!("{k}:{v}")),
            ]
        };
        let object = (
            prop::option::weighted(0.8, Just(())),
            prop::sample::subsequence(vec![0, 1, 2], 0..=3),
            prop::collection::vec(any_member(), 0..6),
            prop::bool::ANY,
        )
            .prop_map(|(all, present, extra, spaced)| {
                let mut members: Vec<String> =
                    ["\"id\":\"e-1\"", "\"type\":\"t\"", "\"subject\":\"c\""]
                        .into_iter()
                        .enumerate()
                        .filter(|(i, _)| all.is_some() || present.contains(i))
                        .map(|(_, m)| m.to_owned())
                        .collect();
                members.extend(extra);
                let separator = if spaced { " ,\n " } else { "," };
                format!("{{{}}}", members.join(separator))
            });
        let text = prop_oneof![
            8 => object,
            2 => member_value(),
            1 => prop::collection::vec(any_member(), 0..6).prop_map(|m| format!("{{{}", m.join(","))),
        ];
        // Now and then a byte that is not UTF-8, somewhere.
        (text, prop::option::weighted(0.1, prop::num::usize::ANY)).prop_map(|(text, at)| {
            let mut bytes = text.into_bytes();
            if let Some(at) = at {
                let at = at % (bytes.len() + 1);
                bytes.insert(at, 0xff);
            }
            bytes
        })
    }

    fn outcome(
        parsed: serde_json::Result<Result<Event, Rejection>>,
    ) -> Result<Result<Event, (RejectCode, String)>, String> {
        parsed
            .map(|r| r.map_err(|r| (r.code, r.message)))
            .map_err(|e| e.to_string())
    }

    /// Both reads of `bytes`, judged.
    fn judged_both_ways(bytes: &[u8]) -> (OneOutcome, OneOutcome) {
        let limits = Limits::default();
        let whole = serde_json::from_slice::<Value>(bytes)
            .map(|v| validate(v, bytes.len(), "acme", NOW, &limits));
        let one_pass =
            Envelope::parse(bytes).map(|e| validate_envelope(e, bytes.len(), "acme", NOW, &limits));
        (outcome(one_pass), outcome(whole))
    }

    type OneOutcome = Result<Result<Event, (RejectCode, String)>, String>;

    /// A `data` object as clients could write it: keys from a small set (so they repeat, in any
    /// order), one with an escape, one not ASCII; numbers in every notation; strings with
    /// escapes; arrays and objects nested a few deep.
    fn data_object() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("\"tokens\""),
            Just("\"model\""),
            Just("\"status\""),
            Just("\"a\\nb\""),
            Just("\"\u{e9}t\u{e9}\""),
            Just("\"k\\u00e9y\""),
            Just("\"\""),
            Just("\"tokens \""),
        ];
        let scalar = prop_oneof![
            Just("null".to_owned()),
            Just("false".to_owned()),
            Just("true".to_owned()),
            Just("-0".to_owned()),
            Just("3.50".to_owned()),
            Just("1E+5".to_owned()),
            Just("-12.5e-3".to_owned()),
            Just("123456789012345678901234567890.000000001".to_owned()),
            // Integers at and past the edges of 64 bits, which serde_json hands over
            // differently.
            Just("-12".to_owned()),
            Just("-9223372036854775808".to_owned()),
            Just("-9223372036854775809".to_owned()),
            Just("18446744073709551615".to_owned()),
            Just("18446744073709551616".to_owned()),
            "[0-9]{1,5}".prop_map(|n| n.trim_start_matches('0').to_owned() + "0"),
            Just("\"q\\\"uote \\/ \\t\"".to_owned()),
            Just("\"\u{fc}n\u{ef}code \u{20ac}\"".to_owned()),
            Just("\"caf\\u00e9 \\u0000\\u001F\"".to_owned()),
            "[a-z ]{0,6}".prop_map(|s| format!("\"{s}\"")),
        ];
        let value = scalar.prop_recursive(3, 16, 4, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(", "))),
                prop::collection::vec((key.clone(), inner), 0..4).prop_map(|members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect();
                    format!("{{{}}}", members.join(", "))
                }),
            ]
        });
        let key = prop_oneof![Just("tokens"), Just("model"), Just("status"), Just("a\\nb")];
        prop::collection::vec((key, value), 0..6).prop_map(|members| {
            let members: Vec<String> = members
                .into_iter()
                .map(|(k, v)| format!("\"{k}\" :{v}"))
                .collect();
            format!("{{ {} }}", members.join(","))
        })
    }

    /// Meters whose paths reach into the members [`data_object`] writes: through objects and
    /// arrays, at scalars, at keys with escapes and not ASCII, filtered and not. Each is the
    /// only meter of its own tenant, so each judges every event (a tenant's first refusing
    /// meter would hide the others).
    fn meters_into_data() -> crate::Catalog {
        let tenant = |(n, (aggregation, value, filter)): (usize, (&str, &str, &str))| {
            let filter = if filter.is_empty() {
                String::new()
            } else {
                format!("filters = {{ {filter} }}\n")
            };
            format!(
                "[[tenants]]\nid = \"t{n}\"\n[[tenants.meters]]\nkey = \"m\"\nevent_type = \"t\"\naggregation = \"{aggregation}\"\nvalue = {value:?}\nallow_negative = {}\n{filter}window = \"1m\"\n",
                n % 2 == 0
            )
        };
        let tenants: String = [
            ("sum", "$.tokens", ""),
            ("max", "$.tokens", r#""$.status" = "ok""#),
            ("unique_count", "$.model", r#""$.tokens" = "3.50""#),
            ("unique_count", "$.status.model", ""),
            ("latest", "$.model[1]", r#""$.model[0]" = "true""#),
            ("min", "$.tokens.tokens[0]", r#""$.status.status" = "-0""#),
            ("sum", "$.k\u{e9}y", ""),
            (
                "unique_count",
                "$.\u{e9}t\u{e9}[2].model",
                r#""$.tokens " = "ok""#,
            ),
        ]
        .into_iter()
        .enumerate()
        .map(tenant)
        .collect();
        crate::Catalog::from_toml_str(&tenants, "t.toml").unwrap_or_else(|e| panic!("catalog: {e}"))
    }

    #[test]
    fn a_message_cut_short_is_refused_by_the_meter_check_as_unreadable() -> Result<(), String> {
        let catalog = crate::Catalog::from_toml_str(
            "[[tenants]]\nid = \"acme\"\n[[tenants.meters]]\nkey = \"m\"\nevent_type = \"t\"\naggregation = \"sum\"\nvalue = \"$.z\"\nwindow = \"1m\"\n",
            "t.toml",
        )
        .map_err(|e| e.to_string())?;
        let tenant = catalog.tenant("acme").ok_or("acme")?;
        // `z`, the metered member, is the last of `data`, which ends the message.
        let bytes = br#"{"specversion":"1.0","id":"e1","type":"t","source":"s","subject":"c","data":{"tokens":5,"z":12345}}"#;
        let envelope = Envelope::parse(bytes).map_err(|e| e.to_string())?;
        let valid = validate_borrowed(envelope, bytes.len(), "acme", NOW, &Limits::default())
            .map_err(|e| e.message)?;
        let mut message = crate::codec::binary::encode_valid(&valid).map_err(|e| e.to_string())?;
        assert_eq!(tenant.check_encoded("t", message.data()), Ok(()));
        message.bytes.pop();
        let refused = tenant.check_encoded("t", message.data());
        assert!(
            matches!(&refused, Err(r) if r.code == RejectCode::InvalidJson
                && r.message.starts_with("the event's data cannot be read back")),
            "{refused:?}"
        );
        Ok(())
    }

    /// What [`crate::codec::binary::encode_valid`] makes of `bytes`, against what the event
    /// parsed whole makes: its message, what each of [`meters_into_data`]'s paths finds in
    /// it, and the judgement of its values. `false` if the event is not valid (nothing
    /// compared).
    fn encoded_both_ways(bytes: &[u8], catalog: &crate::Catalog) -> Result<bool, TestCaseError> {
        let limits = Limits::default();
        let Ok(envelope) = Envelope::parse(bytes) else {
            return Ok(false);
        };
        let Ok(valid) = validate_borrowed(envelope, bytes.len(), "acme", NOW, &limits) else {
            return Ok(false);
        };
        let message = crate::codec::binary::encode_valid(&valid)
            .map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(bytes))))?;
        let whole = serde_json::from_slice(bytes)
            .map_err(|e| TestCaseError::fail(format!("valid in one pass, not whole: {e}")))?;
        let event = validate(whole, bytes.len(), "acme", NOW, &limits)
            .map_err(|r| TestCaseError::fail(r.message))?;
        let text = String::from_utf8_lossy(bytes);
        prop_assert_eq!(
            &message.bytes,
            &crate::codec::binary::encode(&event),
            "{}",
            text
        );
        for tenant in catalog.tenants() {
            for meter in &tenant.meters {
                for path in meter
                    .value
                    .iter()
                    .chain(meter.filters.iter().map(|f| &f.path))
                {
                    let found = path
                        .lookup_encoded(message.data())
                        .and_then(|found| found.map(|f| f.to_value()).transpose())
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(
                        found.as_ref(),
                        path.lookup_in(&event.data),
                        "{} in {}",
                        path,
                        text
                    );
                }
            }
            prop_assert_eq!(
                tenant.check_encoded(&event.event_type, message.data()),
                tenant.check_values(&event),
                "{}: {}",
                &tenant.id,
                text
            );
        }
        Ok(true)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        /// Reading the envelope in one pass judges every event as parsing it whole did: the
        /// same event, or the same code and message, or the same JSON error.
        #[test]
        fn the_envelope_read_in_one_pass_judges_as_the_whole_value(bytes in event_bytes()) {
            let (one_pass, whole) = judged_both_ways(&bytes);
            prop_assert_eq!(one_pass, whole, "{}", String::from_utf8_lossy(&bytes));
        }

        /// A valid event's message written from its JSON text is the one its whole parse
        /// makes, byte for byte; its meters' paths find in it what they find in that parse,
        /// and its values are judged alike, message included.
        #[test]
        fn an_event_encoded_from_its_text_is_the_whole_events_message(
            data in data_object(),
            other in event_bytes(),
        ) {
            let event = format!(
                r#"{{"id":"e-1","data":{data},"type":"t","subject":"c","time":"2026-09-21T14:13:20.007Z"}}"#
            );
            // Always a valid event: compared every time.
            let catalog = meters_into_data();
            prop_assert!(encoded_both_ways(event.as_bytes(), &catalog)?, "{}", event);
            encoded_both_ways(&other, &catalog)?;
        }

        /// An event over the size limit is read for its `id` only. It takes as JSON exactly
        /// what a whole parse takes (serde_json's private keys aside, see
        /// [`Envelope::oversized`]), and names the same id, object or not.
        #[test]
        fn an_oversized_read_judges_as_a_whole_read(bytes in event_bytes()) {
            // A private key, maybe with an escaped `$` (the generator escapes no other byte).
            let private = memchr::memmem::find(&bytes, b"serde_json::private::").is_some();
            let whole = serde_json::from_slice::<Value>(&bytes).map(Envelope::from_value);
            let oversized = Envelope::oversized(&bytes);
            prop_assert_eq!(check_json(&bytes).is_ok(), oversized.is_ok());
            match (whole, oversized) {
                (Ok(whole), Ok(oversized)) if !private => {
                    prop_assert_eq!(
                        (oversized.object, oversized.id().map(Cow::into_owned)),
                        (whole.object, whole.id().map(Cow::into_owned)),
                        "{}", String::from_utf8_lossy(&bytes)
                    );
                }
                (Err(_), Err(_)) | (Ok(_), Ok(_)) => {}
                (whole, oversized) => prop_assert!(
                    private,
                    "whole {:?}, oversized {:?}: {}",
                    whole.map(|_| ()),
                    oversized.map(|_| ()),
                    String::from_utf8_lossy(&bytes)
                ),
            }
        }
    }

    #[test]
    fn an_oversized_event_keeps_nothing_but_its_id() {
        let limits = Limits::default();
        let data = vec!["1"; 40_000].join(",");
        let text = format!(
            r#"{{"id":"big-1","type":"t","subject":"s","data":{{"x":[{data}]}},"id":"big-2"}}"#
        );
        let envelope = Envelope::oversized(text.as_bytes()).expect("JSON");
        assert_eq!(envelope.id().as_deref(), Some("big-2"));
        assert_eq!(envelope.data, Data::Absent);
        let refused = validate_envelope(envelope, text.len(), "acme", NOW, &limits);
        assert_eq!(
            refused.map_err(|r| r.code).err(),
            Some(RejectCode::EventTooLarge)
        );
        // Not JSON, not an object, an id of another type.
        assert!(Envelope::oversized(b"{\"id\":\"x\",").is_err());
        assert!(Envelope::oversized(b"\xff").is_err());
        assert!(Envelope::oversized(br#"{"id":"x","data":{"s":"\ud800"}}"#).is_err());
        let nested = format!(
            r#"{{"id":"x","data":{}1{}}}"#,
            "[".repeat(130),
            "]".repeat(130)
        );
        assert!(Envelope::oversized(nested.as_bytes()).is_err());
        assert!(check_json(nested.as_bytes()).is_err());
        assert_eq!(
            Envelope::oversized(b" [1, 2]").map(|e| e.object).ok(),
            Some(false)
        );
        assert_eq!(
            Envelope::oversized(br#"{"id":7}"#).map(|e| e.id).ok(),
            Some(Attribute::Other)
        );
        assert_eq!(
            Envelope::oversized(br#"{"id":null}"#).map(|e| e.id).ok(),
            Some(Attribute::Null)
        );
    }

    /// The property above is only worth what its inputs reach: valid events read in one pass
    /// (told by their borrowed id: a whole parse never borrows), with each optional attribute
    /// among them.
    #[test]
    fn the_generator_reaches_valid_events_read_in_one_pass() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = event_bytes();
        let mut valid = 0;
        let mut with = std::collections::BTreeMap::<&str, usize>::new();
        for _ in 0..2000 {
            let bytes = strategy.new_tree(&mut runner).expect("a sample").current();
            let one_pass = Envelope::parse(&bytes)
                .is_ok_and(|envelope| matches!(envelope.id(), Some(Cow::Borrowed(_))));
            if one_pass && matches!(judged_both_ways(&bytes).0, Ok(Ok(_))) {
                valid += 1;
                let value: Value = serde_json::from_slice(&bytes).expect("JSON");
                for attribute in ["specversion", "source", "time", "data"] {
                    if value.get(attribute).is_some_and(|v| !v.is_null()) {
                        *with.entry(attribute).or_default() += 1;
                    }
                }
            }
        }
        assert!(
            valid >= 200,
            "{valid} of 2000 samples are valid events read in one pass"
        );
        for attribute in ["specversion", "source", "time", "data"] {
            let n = with.get(attribute).copied().unwrap_or(0);
            assert!(n >= 20, "{n} valid one-pass events with {attribute}");
        }
    }

    /// The inputs the review found the one-pass read judging differently, and events with
    /// every attribute, valid and not, read both ways.
    #[test]
    fn chosen_events_are_judged_alike_both_ways() {
        let nested = format!("{}1{}", "[".repeat(130), "]".repeat(130));
        let cases: Vec<Vec<u8>> = vec![
            b"{\"id\":\"a\",\"type\":\"t\",\"subject\":\"s\",\"x\":\"\xff\"}".to_vec(),
            b"{\"id\":[\"\xff\"],\"type\":\"t\",\"subject\":\"s\"}".to_vec(),
            b"[\"\xff\"]".to_vec(),
            format!("{{\"id\":\"a\",\"type\":\"t\",\"subject\":\"s\",\"x\":{nested}}}").into_bytes(),
            format!("{{\"id\":{nested},\"type\":\"t\",\"subject\":\"s\"}}").into_bytes(),
            nested.into_bytes(),
            br#"{"id":"a","type":"t","subject":"s","x":{"$serde_json::private::Number":"x"}}"#.to_vec(),
            br#"{"specversion":null,"id":"a","type":"t","subject":"s"}"#.to_vec(),
            br#"{"specversion":"1.0","id":"a","type":"t","subject":"s","source":"sdk","time":"2026-09-21T14:13:20.007Z","data":{"tokens":12,"model":"m"}}"#.to_vec(),
            br#"{"id":"a","type":"t","subject":"s","source":5}"#.to_vec(),
            br#"{"id":"a","type":"t","subject":"s","time":null,"data":null,"source":null}"#.to_vec(),
            br#"{"id":"a","type":"t","subject":"s","data":"x"}"#.to_vec(),
            b"123456789012345678901234567890".to_vec(),
            b"\"text\"".to_vec(),
            b"{\"id\":\"a\"".to_vec(),
        ];
        for bytes in cases {
            let (one_pass, whole) = judged_both_ways(&bytes);
            assert_eq!(one_pass, whole, "{}", String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn the_one_pass_read_borrows_attributes_and_keeps_the_last_of_a_repeat() {
        let text = br#"{"id":"a","type":"t","subject":"s","id":"b","x":{"id":"c"},"data":{"n":1}}"#;
        let envelope = Envelope::parse(text).expect("JSON");
        assert!(matches!(envelope.id, Attribute::Text(Cow::Borrowed("b"))));
        let event = validate_envelope(envelope, text.len(), "acme", NOW, &Limits::default())
            .expect("valid");
        assert_eq!(event.id, "b");
        assert_eq!(event.data.get("n"), Some(&json!(1)));
        let escaped = Envelope::parse(br#"{"id":"\u0062"}"#).expect("JSON");
        assert!(matches!(escaped.id, Attribute::Text(Cow::Owned(ref id)) if id == "b"));
    }

    #[test]
    fn sub_milliseconds_are_truncated_toward_the_past_before_and_after_1970() {
        for (text, ms) in [
            ("1970-01-01T00:00:00.000999Z", 0),
            ("1969-12-31T23:59:59.999999Z", -1),
            ("1969-12-31T23:59:59.5Z", -500),
            ("1969-12-31T23:59:59.0005Z", -1000),
            ("0001-01-01T00:00:00.0001+00:00", -62_135_596_800_000),
            ("9999-12-31T23:59:59.999999999+01:00", 253_402_297_199_999),
            ("2026-09-21T16:13:20.007999+02:00", NOW + 7),
            // A leap second reads as the last instant of the second before it.
            ("2016-12-31T23:59:60.5Z", 1_483_228_799_999),
        ] {
            assert_eq!(parse_time_ms(text).ok(), Some(ms), "{text}");
        }
    }

    #[test]
    fn milliseconds_round_trip_through_text() {
        assert_eq!(format_time_ms(NOW + 7), "2026-09-21T14:13:20.007Z");
        assert_eq!(
            parse_time_ms("2026-09-21T14:13:20.007Z").ok(),
            Some(NOW + 7)
        );
    }
}
