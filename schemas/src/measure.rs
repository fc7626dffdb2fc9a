//! Metering one event: which meters count it, with what value, in which group.
//!
//! Invariant: an event is measured all-or-nothing. If any meter that should count it cannot
//! read its value, the whole event is refused (`invalid_value`), so a partly counted event never
//! exists. The gateway refuses such events at the door with this same function
//! ([`crate::catalog::Tenant::check_values`]) and the aggregator meters with it.

use crate::catalog::{Aggregation, Meter, Tenant, scalar_text};
use crate::{Event, RejectCode, Rejection, decimal};
use rust_decimal::Decimal;
use std::collections::BTreeMap;

/// What one meter takes from one event.
#[derive(Debug, Clone)]
pub struct Measure<'a> {
    pub meter: &'a Meter,
    /// The value to fold (`None` for `count` and `unique_count`).
    pub value: Option<Decimal>,
    /// The value whose distinct occurrences `unique_count` counts.
    pub distinct: Option<String>,
    /// `group_by` name → the event's value as text (`""` when absent).
    pub group: BTreeMap<String, String>,
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
        let raw = meter
            .value
            .as_ref()
            .map(|path| (path, path.lookup_in(data)));
        let (value, distinct) = match (meter.aggregation, raw) {
            (Aggregation::Count, _) | (_, None) => (None, None),
            (Aggregation::UniqueCount, Some((path, found))) => {
                let text = found
                    .and_then(scalar_text)
                    .ok_or_else(|| unreadable(meter, path.as_str(), "a scalar", found))?;
                (None, Some(text.into_owned()))
            }
            (_, Some((path, found))) => {
                let value = found.and_then(decimal::from_json).ok_or_else(|| {
                    unreadable(meter, path.as_str(), "an exact decimal number", found)
                })?;
                (Some(value), None)
            }
        };
        let group = meter
            .group_by
            .iter()
            .map(|(name, path)| {
                let text = path
                    .lookup_in(data)
                    .and_then(scalar_text)
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                (name.clone(), text)
            })
            .collect();
        measures.push(Measure {
            meter,
            value,
            distinct,
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

fn unreadable(
    meter: &Meter,
    path: &str,
    what: &str,
    found: Option<&serde_json::Value>,
) -> Rejection {
    let is = found.map_or_else(|| "absent".to_owned(), |v| format!("`{v}`"));
    Rejection::new(
        RejectCode::InvalidValue,
        format!("meter `{}` reads {path} as {what}; it is {is}", meter.key),
    )
}
