//! The usage event: a CloudEvents 1.0 envelope whose `data` carries the measured properties.
//!
//! Invariants:
//! - the tenant never comes from the body; callers pass the tenant their credentials proved;
//! - `time` is kept to the millisecond, as Unix milliseconds, so windowing is integer maths;
//! - numeric properties are kept as their exact text ([`serde_json`] with `arbitrary_precision`),
//!   never as `f64`;
//! - validation checks run in a fixed order, so the same bad event always gets the same code.

use crate::reject::{RejectCode, Rejection};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Longest accepted `id`, in characters.
pub const MAX_ID_CHARS: usize = 256;
/// Longest accepted `type`, `subject` or `source`, in characters.
pub const MAX_ATTRIBUTE_CHARS: usize = 1024;

/// A validated event, ready for the events topic.
#[derive(Debug, Clone, PartialEq)]
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
        format!("{}/{}", self.tenant, self.subject)
    }
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
    if encoded_len > limits.max_event_bytes {
        return Err(Rejection::new(
            RejectCode::EventTooLarge,
            format!(
                "event is {encoded_len} bytes; the limit is {}",
                limits.max_event_bytes
            ),
        ));
    }
    let Value::Object(mut object) = value else {
        return Err(Rejection::new(
            RejectCode::InvalidJson,
            "an event must be a JSON object",
        ));
    };

    if let Some(version) = object.get("specversion")
        && version.as_str() != Some("1.0")
    {
        return Err(Rejection::new(
            RejectCode::InvalidField,
            "`specversion` must be \"1.0\" when given",
        ));
    }
    let id = required_string(&mut object, "id", MAX_ID_CHARS)?;
    let event_type = required_string(&mut object, "type", MAX_ATTRIBUTE_CHARS)?;
    let subject = required_string(&mut object, "subject", MAX_ATTRIBUTE_CHARS)?;
    let source = match object.remove("source") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= MAX_ATTRIBUTE_CHARS => Some(s),
        Some(_) => {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                format!("`source` must be a string of at most {MAX_ATTRIBUTE_CHARS} characters"),
            ));
        }
    };
    let time_ms = match object.remove("time") {
        None | Some(Value::Null) => now_ms,
        Some(Value::String(text)) => parse_time_ms(&text)?,
        Some(_) => {
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
    let data = match object.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(Rejection::new(
                RejectCode::InvalidField,
                "`data` must be a JSON object of properties",
            ));
        }
    };

    Ok(Event {
        tenant: tenant.to_owned(),
        id,
        event_type,
        subject,
        time_ms,
        received_ms: now_ms,
        source,
        data,
    })
}

fn required_string(
    object: &mut Map<String, Value>,
    field: &str,
    max_chars: usize,
) -> Result<String, Rejection> {
    match object.remove(field) {
        None | Some(Value::Null) => Err(Rejection::new(
            RejectCode::MissingField,
            format!("`{field}` is required"),
        )),
        Some(Value::String(s)) => {
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
        Some(_) => Err(Rejection::new(
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
    let millis = parsed.unix_timestamp_nanos().div_euclid(1_000_000);
    i64::try_from(millis)
        .map_err(|_| Rejection::new(RejectCode::InvalidField, "`time` is out of range"))
}

/// The wall clock in Unix milliseconds: the one clock read every component uses (receive
/// times, idle watermarks, expiry).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Formats Unix milliseconds as RFC 3339 UTC with millisecond precision.
pub fn format_time_ms(ms: i64) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_790_000_000_000;

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

    #[test]
    fn milliseconds_round_trip_through_text() {
        assert_eq!(format_time_ms(NOW + 7), "2026-09-21T14:13:20.007Z");
        assert_eq!(
            parse_time_ms("2026-09-21T14:13:20.007Z").ok(),
            Some(NOW + 7)
        );
    }
}
