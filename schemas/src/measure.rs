//! Metering one event: which meters count it, with what value, in which group.
//!
//! Invariant: an event is measured all-or-nothing. If any meter that should count it cannot
//! read its value, the whole event is refused (`invalid_value`), so a partly counted event never
//! exists. The gateway refuses such events at the door with this same judgement
//! ([`crate::catalog::Tenant::check_values`], through [`judge_at_door`]) and the aggregator
//! meters with it ([`judge`]); the doors add one bound, so whatever they accept the aggregator
//! counts.
//!
//! A value is refused (`invalid_value`) unless it is an exact decimal with at most 18 integer
//! digits ([`decimal::max_abs_value`]: what no single usage event needs more than, and what
//! keeps sums of many events far inside the exact range) and, unless the meter sets
//! `allow_negative`, at least zero; at the doors also unless it has at most 12 decimal places
//! ([`decimal::MAX_VALUE_PLACES`]), trailing zeros aside.

use crate::catalog::{Aggregation, Meter, Tenant, scalar_text};
use crate::codec::binary::Encoded;
use crate::json_path::JsonPath;
use crate::{Event, RejectCode, Rejection, decimal};
use rust_decimal::Decimal;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// What one meter takes from one event.
#[derive(Debug, Clone)]
pub struct Measure<'a> {
    pub meter: &'a Meter,
    /// The value to fold (`None` for `count` and `unique_count`).
    pub value: Option<Decimal>,
    /// The value whose distinct occurrences `unique_count` counts.
    pub distinct: Option<String>,
    /// `group_by` name (the meter's) → the event's value as text (`""` when absent).
    pub group: BTreeMap<&'a str, String>,
}

/// Every meter measurement of `event`, or why the event cannot be metered.
///
/// An empty list means meters read this type but their filters excluded the event: counted by
/// no meter, which is not an error.
pub fn measure<'a>(tenant: &'a Tenant, event: &Event) -> Result<Vec<Measure<'a>>, Rejection> {
    let mut any_meter = false;
    let mut measures = Vec::new();
    let data = &event.data;
    for meter in tenant.meters_for(&event.event_type) {
        any_meter = true;
        if !meter.passes(data) {
            continue;
        }
        let (value, distinct) = read_value(meter, data)?;
        // Inserted one by one: collecting a map sorts a vector built first, which costs more
        // than the one or two names a meter groups by (this runs for every event, in the
        // gateway and the aggregator).
        let mut group = BTreeMap::new();
        for (name, path) in &meter.group_by {
            let text = path
                .lookup_in(data)
                .and_then(scalar_text)
                .map(|t| t.into_owned())
                .unwrap_or_default();
            group.insert(name.as_str(), text);
        }
        measures.push(Measure {
            meter,
            value,
            distinct: distinct.map(Cow::into_owned),
            group,
        });
    }
    if !any_meter {
        return Err(Rejection::new(
            RejectCode::NoMatchingMeter,
            format!(
                "no meter of tenant `{}` reads type `{}`",
                tenant.id, event.event_type
            ),
        ));
    }
    Ok(measures)
}

/// What `meter` reads of an event's `data` (which passes its filters): its value (`sum`, `max`,
/// `min`, `latest`) or the scalar it counts once (`unique_count`), or why it cannot.
pub fn read_value<'d>(
    meter: &Meter,
    data: &'d serde_json::Map<String, serde_json::Value>,
) -> Result<(Option<Decimal>, Option<Cow<'d, str>>), Rejection> {
    judge(meter, found_in(meter, data))
}

/// [`read_value`] as the doors judge it ([`judge_at_door`]).
pub fn read_value_at_door<'d>(
    meter: &Meter,
    data: &'d serde_json::Map<String, serde_json::Value>,
) -> Result<(Option<Decimal>, Option<Cow<'d, str>>), Rejection> {
    judge_at_door(meter, found_in(meter, data))
}

/// What `meter`'s value path finds in `data` (`None` for a meter without one).
fn found_in<'m, 'd>(
    meter: &'m Meter,
    data: &'d serde_json::Map<String, serde_json::Value>,
) -> Option<(&'m JsonPath, Option<&'d serde_json::Value>)> {
    meter
        .value
        .as_ref()
        .map(|path| (path, path.lookup_in(data)))
}

/// [`judge`], and at the doors (the gateway's HTTP and raw-topic ingest) one bound more: a
/// value has at most [`decimal::MAX_VALUE_PLACES`] decimal places, trailing zeros aside.
///
/// Why: a window's and a period's sums keep 29 significant digits counted from their finest
/// place, so one value of 28 places (`"0.3333333333333333333333333333"`, as a language's
/// decimal division prints a third) left its window room for sums below 7.9, and the rest of
/// the window's events were refused `value_out_of_range`, or its windows' rollups did not fit
/// the period. With at most 12 places sums reach 7.9 × 10^16 whatever the values.
///
/// The aggregator judges with [`judge`] alone, so an event accepted before the bound (still
/// on the events topic) is metered as it was, and a replay stays what it was.
pub fn judge_at_door<'d, F: Found<'d>>(
    meter: &Meter,
    raw: Option<(&JsonPath, Option<F>)>,
) -> Result<(Option<Decimal>, Option<Cow<'d, str>>), Rejection> {
    let judged = judge(meter, raw)?;
    if let (Some(value), Some((path, found))) = (judged.0, raw)
        && value.normalize().scale() > decimal::MAX_VALUE_PLACES
    {
        return Err(unreadable(
            meter,
            path.as_str(),
            "a number of at most 12 decimal places (trailing zeros aside)",
            found,
        ));
    }
    Ok(judged)
}

/// A value a meter's path found in an event's `data`, however the event is held: built
/// ([`serde_json::Value`]) or in a version 2 message ([`Encoded`]).
pub trait Found<'d>: Copy {
    /// Its text as filters and `unique_count` compare it, if it is a scalar.
    fn scalar_text(self) -> Option<Cow<'d, str>>;
    /// Its exact decimal, if it is a number or a string holding one.
    fn decimal(self) -> Option<Decimal>;
    /// It as JSON, for a refusal's message.
    fn describe(self) -> String;
}

impl<'d> Found<'d> for &'d serde_json::Value {
    fn scalar_text(self) -> Option<Cow<'d, str>> {
        scalar_text(self)
    }
    fn decimal(self) -> Option<Decimal> {
        decimal::from_json(self)
    }
    fn describe(self) -> String {
        self.to_string()
    }
}

// A value no encoder wrote (malformed) is neither a scalar nor a decimal: the meter reading
// it refuses the event.
impl<'d> Found<'d> for Encoded<'d> {
    fn scalar_text(self) -> Option<Cow<'d, str>> {
        self.scalar_text().ok().flatten().map(Cow::Borrowed)
    }
    fn decimal(self) -> Option<Decimal> {
        self.text().ok().flatten().and_then(decimal::parse_exact)
    }
    fn describe(self) -> String {
        self.to_value()
            .map_or_else(|e| e.to_string(), |value| value.to_string())
    }
}

/// [`read_value`] of what `meter`'s value path found (`None` for a meter without one).
pub fn judge<'d, F: Found<'d>>(
    meter: &Meter,
    raw: Option<(&JsonPath, Option<F>)>,
) -> Result<(Option<Decimal>, Option<Cow<'d, str>>), Rejection> {
    Ok(match (meter.aggregation, raw) {
        (Aggregation::Count, _) | (_, None) => (None, None),
        (Aggregation::UniqueCount, Some((path, found))) => {
            let text = found
                .and_then(Found::scalar_text)
                .ok_or_else(|| unreadable(meter, path.as_str(), "a scalar", found))?;
            (None, Some(text))
        }
        (_, Some((path, found))) => {
            let value = found.and_then(Found::decimal).ok_or_else(|| {
                unreadable(meter, path.as_str(), "an exact decimal number", found)
            })?;
            if value.abs() >= decimal::max_abs_value() {
                return Err(unreadable(
                    meter,
                    path.as_str(),
                    "a number of at most 18 integer digits",
                    found,
                ));
            }
            if value.is_sign_negative() && !value.is_zero() && !meter.allow_negative {
                return Err(unreadable(
                    meter,
                    path.as_str(),
                    "a number of at least zero (the meter does not set `allow_negative`)",
                    found,
                ));
            }
            (Some(value), None)
        }
    })
}

fn unreadable<'d>(
    meter: &Meter,
    path: &str,
    what: &str,
    found: Option<impl Found<'d>>,
) -> Rejection {
    let is = found.map_or_else(|| "absent".to_owned(), |v| format!("`{}`", v.describe()));
    Rejection::new(
        RejectCode::InvalidValue,
        format!("meter `{}` reads {path} as {what}; it is {is}", meter.key),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Catalog;
    use serde_json::json;

    const CATALOG: &str = r#"
[[tenants]]
id = "acme"
[[tenants.meters]]
key = "tokens"
event_type = "llm"
aggregation = "sum"
value = "$.tokens"
window = "1m"
[[tenants.meters]]
key = "credits_back"
event_type = "refund"
aggregation = "sum"
value = "$.tokens"
window = "1m"
allow_negative = true
"#;

    /// An acme event of `event_type` with `tokens`.
    fn event(event_type: &str, tokens: serde_json::Value) -> Event {
        Event {
            tenant: "acme".into(),
            id: "e".into(),
            event_type: event_type.into(),
            subject: "c".into(),
            time_ms: 0,
            received_ms: 0,
            source: None,
            data: json!({ "tokens": tokens })
                .as_object()
                .cloned()
                .unwrap_or_default(),
        }
    }

    fn outcome(event_type: &str, tokens: serde_json::Value) -> Result<Option<Decimal>, RejectCode> {
        let catalog = Catalog::from_toml_str(CATALOG, "test").expect("catalog");
        let tenant = catalog.tenant("acme").expect("tenant");
        measure(tenant, &event(event_type, tokens))
            .map(|m| m.first().and_then(|m| m.value))
            .map_err(|r| r.code)
    }

    fn d(text: &str) -> Option<Decimal> {
        decimal::parse_exact(text)
    }

    #[test]
    fn values_past_the_bound_are_refused_at_any_notation() {
        // The value that stopped the aggregator: refused at the door now.
        assert_eq!(
            outcome("llm", json!("79228162514264337593543950335")),
            Err(RejectCode::InvalidValue)
        );
        assert_eq!(outcome("llm", json!("1e18")), Err(RejectCode::InvalidValue));
        assert_eq!(
            outcome("llm", json!("999999999999999999.9999999999")),
            Ok(d("999999999999999999.9999999999"))
        );
        assert_eq!(
            outcome("llm", json!("12345.555555555555555555555555555555e0")),
            Err(RejectCode::InvalidValue)
        );
    }

    /// What the doors answer for `tokens` on an `llm` event.
    fn at_door(tokens: serde_json::Value) -> Result<(), RejectCode> {
        let catalog = Catalog::from_toml_str(CATALOG, "test").expect("catalog");
        let tenant = catalog.tenant("acme").expect("tenant");
        tenant
            .check_values(&event("llm", tokens))
            .map_err(|r| r.code)
    }

    #[test]
    fn the_doors_refuse_a_value_finer_than_12_decimal_places_that_the_aggregator_still_meters() {
        // Was accepted: one such value left its window room for sums below 7.9, so the
        // window's other events were refused and its later windows did not fit the period.
        let third = "0.3333333333333333333333333333";
        assert_eq!(at_door(json!(third)), Err(RejectCode::InvalidValue));
        assert_eq!(at_door(json!("1e-13")), Err(RejectCode::InvalidValue));
        assert_eq!(
            at_door(json!(0.0000000000001)),
            Err(RejectCode::InvalidValue)
        );
        // 12 places, and trailing zeros past them, are fine.
        assert_eq!(at_door(json!("0.000000000001")), Ok(()));
        assert_eq!(at_door(json!("1.500000000000000000")), Ok(()));
        assert_eq!(at_door(json!("999999999999999999.000000000000")), Ok(()));
        // An event accepted before the bound is metered as it was.
        assert_eq!(outcome("llm", json!(third)), Ok(d(third)));
        // The door's message names the bound.
        let catalog = Catalog::from_toml_str(CATALOG, "test").expect("catalog");
        let tenant = catalog.tenant("acme").expect("tenant");
        let meter = tenant.meters_for("llm").next().expect("a meter");
        let data = json!({ "tokens": "1e-13" });
        let refused =
            read_value_at_door(meter, data.as_object().expect("an object")).expect_err("refused");
        assert!(
            refused.message.contains("at most 12 decimal places"),
            "{}",
            refused.message
        );
    }

    #[test]
    fn negative_values_count_only_where_the_meter_allows_them() {
        assert_eq!(outcome("llm", json!(-5)), Err(RejectCode::InvalidValue));
        assert_eq!(outcome("llm", json!("-0.5")), Err(RejectCode::InvalidValue));
        assert_eq!(outcome("llm", json!("-0")), Ok(d("0")));
        assert_eq!(outcome("refund", json!(-5)), Ok(d("-5")));
        assert_eq!(
            outcome("refund", json!("-1e18")),
            Err(RejectCode::InvalidValue)
        );
    }
}
