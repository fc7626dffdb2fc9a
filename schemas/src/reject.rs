//! Stable rejection codes for single events.
//!
//! The codes are part of the public API: HTTP answers carry them per event and the dead-letter
//! topic carries them in a header, so a client can branch on them. Never rename one; add new ones.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why one event was refused. Serialized in `snake_case`, e.g. `"missing_field"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// The bytes of the event are not JSON, or not a JSON object.
    InvalidJson,
    /// A required CloudEvents attribute is absent.
    MissingField,
    /// An attribute has the wrong type or an impossible value (empty id, bad timestamp, ...).
    InvalidField,
    /// The encoded event is larger than the per-event limit.
    EventTooLarge,
    /// `time` is later than now plus the allowed clock skew.
    TimestampInFuture,
    /// `time` is earlier than now minus the correction horizon.
    TimestampTooFarInPast,
    /// A property a meter reads is not an exact decimal number.
    InvalidValue,
    /// Kafka path only: the event's tenant is not in the catalog (any more).
    UnknownTenant,
    /// Kafka path only: no meter of the tenant reads this event `type`; kept on the dead-letter
    /// topic so it can be replayed once a meter exists.
    NoMatchingMeter,
    /// Raw-topic path only: the message carries no known API key (header `neruba-api-key`).
    Unauthenticated,
    /// Raw-topic path only: the message's API key lacks the `ingest` scope.
    Forbidden,
    /// Aggregator only: the value is valid alone, but adding it to its window's or period's
    /// sum would leave the exact decimal range; the event is dead-lettered whole (no meter
    /// counts it) and the partition goes on.
    ValueOutOfRange,
}

impl RejectCode {
    /// Every code, for metrics pre-registration and documentation.
    pub const ALL: [RejectCode; 12] = [
        RejectCode::InvalidJson,
        RejectCode::MissingField,
        RejectCode::InvalidField,
        RejectCode::EventTooLarge,
        RejectCode::TimestampInFuture,
        RejectCode::TimestampTooFarInPast,
        RejectCode::InvalidValue,
        RejectCode::UnknownTenant,
        RejectCode::NoMatchingMeter,
        RejectCode::Unauthenticated,
        RejectCode::Forbidden,
        RejectCode::ValueOutOfRange,
    ];

    /// The stable wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::InvalidJson => "invalid_json",
            RejectCode::MissingField => "missing_field",
            RejectCode::InvalidField => "invalid_field",
            RejectCode::EventTooLarge => "event_too_large",
            RejectCode::TimestampInFuture => "timestamp_in_future",
            RejectCode::TimestampTooFarInPast => "timestamp_too_far_in_past",
            RejectCode::InvalidValue => "invalid_value",
            RejectCode::UnknownTenant => "unknown_tenant",
            RejectCode::NoMatchingMeter => "no_matching_meter",
            RejectCode::Unauthenticated => "unauthenticated",
            RejectCode::Forbidden => "forbidden",
            RejectCode::ValueOutOfRange => "value_out_of_range",
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused event: a stable code for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub code: RejectCode,
    pub message: String,
}

impl Rejection {
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Rejection {}
