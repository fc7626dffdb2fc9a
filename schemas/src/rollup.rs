//! Aggregates and the rollup message the aggregator emits when a window closes.
//!
//! Invariants:
//! - folding events into an [`Aggregate`] is commutative and associative (sum, count, min, max,
//!   latest by `(time, id)`, exact distinct count kept outside as a set), so any arrival order
//!   of the same distinct events gives the same aggregate;
//! - quantities are exact decimals, serialized as strings.

use crate::catalog::Aggregation;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The running fold of one meter over some events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Events folded in.
    pub count: u64,
    /// Sum of values (for `sum` and `avg`).
    #[serde(with = "rust_decimal::serde::str")]
    pub sum: Decimal,
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub min: Option<Decimal>,
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub max: Option<Decimal>,
    /// The value of the event with the greatest `(time, id)`.
    #[serde(default)]
    pub latest: Option<Latest>,
    /// Distinct values seen (for `unique_count`); the set itself is stored beside.
    #[serde(default)]
    pub distinct: u64,
}

/// The latest value and what made it latest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latest {
    pub time_ms: i64,
    pub id: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub value: Decimal,
}

/// Folding failed: the sum left the range a `Decimal` holds exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

impl Aggregate {
    /// Folds in one event's value (`None` for `count`), its time and id.
    /// `new_distinct` says whether the value was not yet in this aggregate's distinct set.
    pub fn add(
        &mut self,
        value: Option<Decimal>,
        time_ms: i64,
        id: &str,
        new_distinct: bool,
    ) -> Result<(), Overflow> {
        self.count += 1;
        if new_distinct {
            self.distinct += 1;
        }
        let Some(value) = value else { return Ok(()) };
        self.sum = self.sum.checked_add(value).ok_or(Overflow)?;
        self.min = Some(self.min.map_or(value, |m| m.min(value)));
        self.max = Some(self.max.map_or(value, |m| m.max(value)));
        let newer = self
            .latest
            .as_ref()
            .is_none_or(|l| (time_ms, id) > (l.time_ms, l.id.as_str()));
        if newer {
            self.latest = Some(Latest {
                time_ms,
                id: id.to_owned(),
                value,
            });
        }
        Ok(())
    }

    /// Merges another aggregate of disjoint events into this one (distinct counts must have
    /// been reconciled by the caller, who owns the sets).
    pub fn merge(&mut self, other: &Aggregate) -> Result<(), Overflow> {
        self.count += other.count;
        self.sum = self.sum.checked_add(other.sum).ok_or(Overflow)?;
        self.min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if let Some(theirs) = &other.latest {
            let newer = self
                .latest
                .as_ref()
                .is_none_or(|l| (theirs.time_ms, theirs.id.as_str()) > (l.time_ms, l.id.as_str()));
            if newer {
                self.latest = Some(theirs.clone());
            }
        }
        Ok(())
    }

    /// The billable quantity under `aggregation`. `avg` is rounded half-up (banker's rounding
    /// would make the result depend on digit parity) to 12 decimal places.
    pub fn quantity(&self, aggregation: Aggregation) -> Decimal {
        match aggregation {
            Aggregation::Sum => self.sum,
            Aggregation::Count => Decimal::from(self.count),
            Aggregation::Min => self.min.unwrap_or_default(),
            Aggregation::Max => self.max.unwrap_or_default(),
            Aggregation::Avg => {
                if self.count == 0 {
                    Decimal::ZERO
                } else {
                    (self.sum / Decimal::from(self.count)).round_dp_with_strategy(
                        AVG_DECIMALS,
                        rust_decimal::RoundingStrategy::MidpointAwayFromZero,
                    )
                }
            }
            Aggregation::UniqueCount => Decimal::from(self.distinct),
            Aggregation::Latest => self.latest.as_ref().map(|l| l.value).unwrap_or_default(),
        }
    }
}

/// Decimal places an `avg` quantity keeps.
pub const AVG_DECIMALS: u32 = 12;

/// A closed window of one meter for one customer and group, with its period-to-date totals.
///
/// Kafka key: [`Rollup::key`] (the rollups topic is compacted on it); partition: by
/// `tenant/customer`, so one customer's rollups stay in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollup {
    pub v: u8,
    pub tenant: String,
    pub meter: String,
    pub customer: String,
    /// `group_by` name → the event's value as text (`""` when the event lacked it).
    pub group: BTreeMap<String, String>,
    pub aggregation: Aggregation,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    /// The window's quantity under the meter's aggregation.
    #[serde(with = "rust_decimal::serde::str")]
    pub window_quantity: Decimal,
    pub window_events: u64,
    /// Quantity over every closed window of the period up to and including this one (and any
    /// earlier window revised since).
    #[serde(with = "rust_decimal::serde::str")]
    pub period_quantity: Decimal,
    pub period_events: u64,
    /// 1 at first close; +1 each time a late event changes the window.
    pub revision: u32,
}

impl Rollup {
    /// The compaction key: one per (tenant, meter, customer, group, window).
    pub fn key(&self) -> String {
        let group: Vec<String> = self.group.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "{}/{}/{}/{}/{}",
            self.tenant,
            self.customer,
            self.meter,
            group.join(","),
            self.window_start_ms
        )
    }

    /// The partitioning key: `tenant/customer`.
    pub fn partition_key(&self) -> String {
        format!("{}/{}", self.tenant, self.customer)
    }

    /// JSON encoding for the rollups topic.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a rollups-topic message.
    pub fn decode(bytes: &[u8]) -> crate::Result<Self> {
        let rollup: Rollup =
            serde_json::from_slice(bytes).map_err(|e| crate::Error::Decode(e.to_string()))?;
        if rollup.v != 1 {
            return Err(crate::Error::Decode(format!(
                "rollup version {} is not supported",
                rollup.v
            )));
        }
        Ok(rollup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(text: &str) -> Decimal {
        crate::decimal::parse_exact(text).expect("decimal")
    }

    #[test]
    fn every_aggregation_reads_its_quantity() {
        let mut a = Aggregate::default();
        a.add(Some(d("2.5")), 10, "a", true).expect("fits");
        a.add(Some(d("7")), 5, "b", true).expect("fits");
        a.add(Some(d("1.25")), 10, "c", false).expect("fits");
        assert_eq!(a.quantity(Aggregation::Sum), d("10.75"));
        assert_eq!(a.quantity(Aggregation::Count), d("3"));
        assert_eq!(a.quantity(Aggregation::Min), d("1.25"));
        assert_eq!(a.quantity(Aggregation::Max), d("7"));
        assert_eq!(a.quantity(Aggregation::Avg), d("3.583333333333"));
        assert_eq!(a.quantity(Aggregation::UniqueCount), d("2"));
        // Same time 10: the greater id wins, whatever the order of arrival.
        assert_eq!(a.quantity(Aggregation::Latest), d("1.25"));
    }

    proptest! {
        #[test]
        fn order_of_events_does_not_change_the_aggregate(
            values in prop::collection::vec((0i64..1_000_000, 0u32..6, -3i64..3), 1..40),
            seed in any::<u64>(),
        ) {
            let events: Vec<(Decimal, i64, String)> = values
                .iter()
                .enumerate()
                .map(|(i, (v, scale, t))| (Decimal::new(*v, *scale), *t, format!("id-{i}")))
                .collect();
            let fold = |order: &[usize]| {
                let mut a = Aggregate::default();
                for &i in order {
                    let (v, t, id) = &events[i];
                    a.add(Some(*v), *t, id, false).expect("fits");
                }
                a
            };
            let forward: Vec<usize> = (0..events.len()).collect();
            let mut shuffled = forward.clone();
            // A deterministic shuffle from the seed.
            let mut state = seed | 1;
            for i in (1..shuffled.len()).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                let j = usize::try_from(state % (i as u64 + 1)).unwrap_or(0);
                shuffled.swap(i, j);
            }
            prop_assert_eq!(fold(&forward), fold(&shuffled));
            // Splitting into two merged halves gives the same as one fold.
            let (left, right) = forward.split_at(events.len() / 2);
            let mut merged = fold(left);
            merged.merge(&fold(right)).expect("fits");
            prop_assert_eq!(merged, fold(&forward));
        }
    }
}
