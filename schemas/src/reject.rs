//! Stable codes for what the pipeline refuses: [`RejectCode`] for single events (gateway and
//! aggregator), [`RefusalCode`] for rollups the rater cannot price.
//!
//! The codes are part of the public API: HTTP answers carry event codes per event, the
//! dead-letter topic carries either kind in its `neruba-reject-code` header, and metrics label
//! counts with them, so a client or a dashboard can branch on them. Never rename one; add new
//! ones. Each enum's `as_str`, its serde form and its `Display` are the same string.

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
    /// Aggregator only: the event would open windows (new customers, meters or group values
    /// in windows not yet closed) past the bytes its tenant may hold open in a partition; it
    /// is dead-lettered whole and the partition goes on. The tenant's windows free their bytes
    /// as they close, so a later event opens them again.
    TooManyOpenWindows,
}

impl RejectCode {
    /// Every code, for metrics pre-registration and documentation.
    pub const ALL: [RejectCode; 13] = [
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
        RejectCode::TooManyOpenWindows,
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
            RejectCode::TooManyOpenWindows => "too_many_open_windows",
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the rater refused to price one rollup (the rollup goes to the dead-letter topic).
/// Serialized in `snake_case`, e.g. `"no_price_plan"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    /// The rollup does not decode, or its period start is outside the calendar's range.
    InvalidRollup,
    /// The rollup's tenant is not in the catalog (any more).
    UnknownTenant,
    /// The tenant has no meter with the rollup's key (any more).
    NoMatchingMeter,
    /// No plan of the meter is in force on the period's first day.
    NoPricePlan,
    /// The plan's currency has no known precision, or the period was billed in another currency.
    UnknownCurrency,
    /// The price or the amount to emit leaves the exact decimal range.
    UnpriceableQuantity,
}

impl RefusalCode {
    /// Every code, for metrics pre-registration and documentation.
    pub const ALL: [RefusalCode; 6] = [
        RefusalCode::InvalidRollup,
        RefusalCode::UnknownTenant,
        RefusalCode::NoMatchingMeter,
        RefusalCode::NoPricePlan,
        RefusalCode::UnknownCurrency,
        RefusalCode::UnpriceableQuantity,
    ];

    /// The stable wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::InvalidRollup => "invalid_rollup",
            RefusalCode::UnknownTenant => "unknown_tenant",
            RefusalCode::NoMatchingMeter => "no_matching_meter",
            RefusalCode::NoPricePlan => "no_price_plan",
            RefusalCode::UnknownCurrency => "unknown_currency",
            RefusalCode::UnpriceableQuantity => "unpriceable_quantity",
        }
    }
}

impl fmt::Display for RefusalCode {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_once_and_serializes_as_its_stable_string() {
        fn check<
            C: Serialize + for<'de> Deserialize<'de> + fmt::Display + Copy + Eq + fmt::Debug,
        >(
            all: &[C],
            as_str: fn(C) -> &'static str,
        ) {
            let strings: std::collections::BTreeSet<&str> =
                all.iter().map(|&c| as_str(c)).collect();
            assert_eq!(strings.len(), all.len(), "two codes share a string");
            for &code in all {
                let json = serde_json::to_string(&code).expect("serialize");
                assert_eq!(json, format!("\"{}\"", as_str(code)));
                assert_eq!(code.to_string(), as_str(code));
                let back: C = serde_json::from_str(&json).expect("deserialize");
                assert_eq!(back, code);
            }
        }
        check(&RejectCode::ALL, RejectCode::as_str);
        check(&RefusalCode::ALL, RefusalCode::as_str);
    }

    #[test]
    fn refusal_codes_keep_their_dead_letter_strings() {
        let strings: Vec<&str> = RefusalCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            strings,
            [
                "invalid_rollup",
                "unknown_tenant",
                "no_matching_meter",
                "no_price_plan",
                "unknown_currency",
                "unpriceable_quantity",
            ]
        );
    }
}
