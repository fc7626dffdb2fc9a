//! The event a caller sends, and what it becomes on the wire.
//!
//! Invariants:
//! - an event leaves [`Event::into_wire`] with an `id` and a `time`, fixed once: every retry
//!   of its batch carries the same bytes, so the gateway's deduplication by id makes a retry
//!   that did land answer `duplicate`, never count twice;
//! - an event without an `id` gets 128 random bits in hex, so two events never share one by
//!   accident; an event without a `time` gets the moment it was handed to the client, not
//!   the moment a (possibly retried) batch reached the gateway, so buffering and retries do
//!   not move usage into a later window.

use crate::error::{Error, Result};
use serde::Serialize;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A usage event: a CloudEvents 1.0 event in structured JSON.
///
/// ```
/// use neruba_client::Event;
/// use serde_json::json;
///
/// let event = Event::new("llm.completion", "customer-7")
///     .with_id("req-1")
///     .with_data(json!({"model": "large", "tokens": 1200, "status": "ok"}));
/// assert_eq!(event.id.as_deref(), Some("req-1"));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    /// The idempotency key, unique per tenant (1–256 characters). `None`: the client makes
    /// one up (32 random hex digits) when the event is sent; the
    /// [`Receipt`](crate::Receipt) tells which.
    pub id: Option<String>,
    /// The CloudEvents `type`, matched to meters (e.g. `llm.completion`).
    pub event_type: String,
    /// The customer the usage belongs to.
    pub subject: String,
    /// When the usage happened, RFC 3339 with an offset (milliseconds are kept). `None`: the
    /// moment the event is handed to [`Ingestor::send`](crate::Ingestor::send).
    pub time: Option<String>,
    /// The CloudEvents `source`, if any.
    pub source: Option<String>,
    /// The event's properties, a JSON object (`Value::Null`: none). Numbers may be JSON
    /// numbers or decimal strings; the gateway reads either exactly.
    pub data: Value,
}

impl Event {
    /// An event of `event_type` for the customer `subject`, with no id, time or data yet.
    pub fn new(event_type: impl Into<String>, subject: impl Into<String>) -> Self {
        Self {
            event_type: event_type.into(),
            subject: subject.into(),
            ..Self::default()
        }
    }

    /// Sets the idempotency key.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets the time, RFC 3339 with an offset (`2026-11-24T10:00:00.123Z`).
    pub fn with_time(mut self, time: impl Into<String>) -> Self {
        self.time = Some(time.into());
        self
    }

    /// Sets the time from a [`SystemTime`] (to the millisecond).
    pub fn with_time_at(mut self, time: SystemTime) -> Self {
        self.time = Some(format_time(time));
        self
    }

    /// Sets the CloudEvents `source`.
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Sets the properties (a JSON object).
    pub fn with_data(mut self, data: Value) -> Self {
        self.data = data;
        self
    }

    /// The event as it will be sent: its id (given or made up) and its JSON, with the time
    /// filled in.
    pub(crate) fn into_wire(self) -> Result<Wire> {
        let id = self.id.unwrap_or_else(new_id);
        let time = self.time.unwrap_or_else(|| format_time(SystemTime::now()));
        let json = serde_json::to_string(&WireEvent {
            specversion: "1.0",
            id: &id,
            event_type: &self.event_type,
            subject: &self.subject,
            time: &time,
            source: self.source.as_deref(),
            data: &self.data,
        })
        .map_err(|e| Error::InvalidArgument(format!("event {id}: {e}")))?;
        Ok(Wire { id, json })
    }
}

/// An event ready to go: its id and its JSON bytes, the same for every attempt.
#[derive(Debug)]
pub(crate) struct Wire {
    pub(crate) id: String,
    pub(crate) json: String,
}

#[derive(Serialize)]
struct WireEvent<'a> {
    specversion: &'static str,
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    subject: &'a str,
    time: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    #[serde(skip_serializing_if = "Value::is_null")]
    data: &'a Value,
}

/// A fresh idempotency id: 128 random bits as 32 lower-case hex digits.
pub(crate) fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_ok() {
        return bytes.iter().map(|b| format!("{b:02x}")).collect();
    }
    // No OS randomness: the clock, the process and a counter still make a unique id here.
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:x}-{:x}-{count:x}", std::process::id())
}

/// `time` as RFC 3339 in UTC with milliseconds (`2026-11-24T10:00:00.123Z`), the precision
/// the gateway keeps.
pub fn format_time(time: SystemTime) -> String {
    let ms = match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    };
    format_time_ms(ms)
}

fn format_time_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute) = (in_day / 3_600_000, in_day / 60_000 % 60);
    let (second, milli) = (in_day / 1000 % 60, in_day % 1000);
    if !(0..=9999).contains(&year) {
        return format!(
            "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z"
        );
    }
    // The digits written directly: `format!` with seven padded fields was 7 % of
    // `neruba loadgen`'s CPU (perf, 200 k events). Every field is at least 0 here.
    let mut out = String::with_capacity(24);
    for (value, width, then) in [
        (year, 4, '-'),
        (month, 2, '-'),
        (day, 2, 'T'),
        (hour, 2, ':'),
        (minute, 2, ':'),
        (second, 2, '.'),
        (milli, 3, 'Z'),
    ] {
        for place in (0..width).rev() {
            let digit = value / 10_i64.pow(place) % 10;
            out.push(char::from(b'0' + digit as u8));
        }
        out.push(then);
    }
    out
}

/// The proleptic Gregorian date `days` after 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::Duration;

    #[test]
    fn times_are_written_as_format_would_write_them() {
        let formatted = |ms: i64| {
            let (days, in_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
            let (year, month, day) = civil_from_days(days);
            let (hour, minute) = (in_day / 3_600_000, in_day / 60_000 % 60);
            let (second, milli) = (in_day / 1000 % 60, in_day % 1000);
            format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z")
        };
        // Every 143 days or so (an odd number of milliseconds) from 400 days before year 0 to 400
        // days after year 9999: about 25,000 times, their hours and milliseconds all over the day.
        let mut ms = -62_167_219_200_000_i64 - 86_400_000 * 400;
        while ms < 253_402_300_800_000 + 86_400_000 * 400 {
            assert_eq!(format_time_ms(ms), formatted(ms), "{ms}");
            ms += 12_345_678_901;
        }
        assert_eq!(format_time_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn times_are_rfc3339_utc_to_the_millisecond() {
        let at = |ms: u64| format_time(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_764_000_000_123), "2025-11-24T16:00:00.123Z");
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn made_up_ids_are_32_hex_digits_and_distinct() {
        let ids: HashSet<String> = (0..10_000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(
            ids.iter()
                .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        );
    }

    #[test]
    fn the_wire_form_is_a_cloudevent_with_id_and_time_filled_in() -> Result<()> {
        let wire = Event::new("api.request", "c1")
            .with_source("svc")
            .into_wire()?;
        let value: Value = serde_json::from_str(&wire.json).map_err(|e| {
            Error::InvalidArgument(e.to_string()) // keeps the test free of unwrap
        })?;
        assert_eq!(value["specversion"], "1.0");
        assert_eq!(value["id"], wire.id.as_str());
        assert_eq!(value["type"], "api.request");
        assert_eq!(value["subject"], "c1");
        assert_eq!(value["source"], "svc");
        assert!(value["time"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert!(value.get("data").is_none());

        let given = Event::new("api.request", "c1")
            .with_id("e-1")
            .with_time("2026-11-24T10:00:00+01:00")
            .with_data(serde_json::json!({"tokens": "12.5"}))
            .into_wire()?;
        assert_eq!(given.id, "e-1");
        assert_eq!(
            given.json,
            r#"{"specversion":"1.0","id":"e-1","type":"api.request","subject":"c1","time":"2026-11-24T10:00:00+01:00","data":{"tokens":"12.5"}}"#
        );
        Ok(())
    }
}
