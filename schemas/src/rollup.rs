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
    #[serde(with = "crate::decimal::stored")]
    pub sum: Decimal,
    #[serde(default, with = "crate::decimal::stored::option")]
    pub min: Option<Decimal>,
    #[serde(default, with = "crate::decimal::stored::option")]
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
    #[serde(with = "crate::decimal::stored")]
    pub value: Decimal,
}

/// Folding failed: the sum would leave the range a `Decimal` holds exactly (or keep fewer
/// digits than its terms: see [`crate::decimal::exact_add`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

impl Aggregate {
    /// Folds in one event's value (`None` for `count`), its time and id.
    /// `new_distinct` says whether the value was not yet in this aggregate's distinct set.
    /// The sum is kept only for the aggregations that read it ([`Aggregation::sums`]), so a
    /// `max` meter never fails on a sum nobody bills.
    pub fn add(
        &mut self,
        aggregation: Aggregation,
        value: Option<Decimal>,
        time_ms: i64,
        id: &str,
        new_distinct: bool,
    ) -> Result<(), Overflow> {
        // The one step that can fail goes first: a refused value leaves the aggregate as it was.
        if let Some(value) = value
            && aggregation.sums()
        {
            self.sum = crate::decimal::exact_add(self.sum, value).ok_or(Overflow)?;
        }
        self.count += 1;
        if new_distinct {
            self.distinct += 1;
        }
        let Some(value) = value else { return Ok(()) };
        self.min = Some(self.min.map_or(value, |m| m.min(value)));
        self.max = Some(self.max.map_or(value, |m| m.max(value)));
        let newer = self
            .latest
            .as_ref()
            .is_none_or(|l| (time_ms, id) > (l.time_ms, l.id.as_str()));
        if newer {
            match &mut self.latest {
                // The id's buffer reused: in a stream most events are the newest so far.
                Some(latest) => {
                    latest.time_ms = time_ms;
                    latest.id.clear();
                    latest.id.push_str(id);
                    latest.value = value;
                }
                None => {
                    self.latest = Some(Latest {
                        time_ms,
                        id: id.to_owned(),
                        value,
                    });
                }
            }
        }
        Ok(())
    }

    /// Merges another aggregate of disjoint events into this one (distinct counts must have
    /// been reconciled by the caller, who owns the sets).
    pub fn merge(&mut self, aggregation: Aggregation, other: &Aggregate) -> Result<(), Overflow> {
        if aggregation.sums() {
            self.sum = crate::decimal::exact_add(self.sum, other.sum).ok_or(Overflow)?;
        }
        self.count += other.count;
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
    #[serde(with = "crate::decimal::stored")]
    pub window_quantity: Decimal,
    pub window_events: u64,
    /// Quantity over every closed window of the period up to and including this one (and any
    /// earlier window revised since).
    #[serde(with = "crate::decimal::stored")]
    pub period_quantity: Decimal,
    pub period_events: u64,
    /// 1 at first close; +1 each time a late event changes the window.
    pub revision: u32,
    /// For a `latest` meter, the time and id of the event whose value is the window's
    /// quantity: what orders two groups' windows, so `latest` combines exactly across groups.
    /// Absent for other aggregations, and in rollups of aggregators before December 5, 2026.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_event: Option<LatestEvent>,
}

/// What made a window's `latest` value latest: events are ordered by `(time, id)`, the id
/// byte by byte, as [`Aggregate::add`] orders them (the derived order is by the fields in
/// this order: keep them so, or a usage read across groups takes another event).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LatestEvent {
    pub time_ms: i64,
    pub id: String,
}

impl Rollup {
    /// The compaction key: one per (tenant, customer, meter, group, window), written as a JSON
    /// array such as `["acme","customer-7","llm_tokens",{"model":"b"},1795851720000]`.
    ///
    /// The topic is compacted on it, so two series must never share a key: JSON escapes every
    /// quote, backslash and control character inside a string, so no customer id or group
    /// value can end its field early (the earlier `a/b/c=d` form let `/`, `,` and `=` in
    /// values make two series one key, and compaction would have kept only one of them).
    pub fn key(&self) -> String {
        let fields = (
            &self.tenant,
            &self.customer,
            &self.meter,
            &self.group,
            self.window_start_ms,
        );
        // A tuple of strings, a map of strings and an integer always serializes.
        serde_json::to_string(&fields).unwrap_or_default()
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
        let sum = Aggregation::Sum;
        a.add(sum, Some(d("2.5")), 10, "a", true).expect("fits");
        a.add(sum, Some(d("7")), 5, "b", true).expect("fits");
        a.add(sum, Some(d("1.25")), 10, "c", false).expect("fits");
        assert_eq!(a.quantity(Aggregation::Sum), d("10.75"));
        assert_eq!(a.quantity(Aggregation::Count), d("3"));
        assert_eq!(a.quantity(Aggregation::Min), d("1.25"));
        assert_eq!(a.quantity(Aggregation::Max), d("7"));
        assert_eq!(a.quantity(Aggregation::Avg), d("3.583333333333"));
        assert_eq!(a.quantity(Aggregation::UniqueCount), d("2"));
        // Same time 10: the greater id wins, whatever the order of arrival.
        assert_eq!(a.quantity(Aggregation::Latest), d("1.25"));
    }

    #[test]
    fn a_sum_that_would_round_is_refused_and_leaves_the_aggregate_as_it_was() {
        let mut a = Aggregate::default();
        let big = d("79228162514264337593543950335");
        a.add(Aggregation::Sum, Some(big), 1, "a", false)
            .expect("fits");
        let before = a.clone();
        assert_eq!(
            a.add(Aggregation::Sum, Some(d("1")), 2, "b", false),
            Err(Overflow)
        );
        assert_eq!(a, before);
        // Digits a sum would drop are refused too (rust_decimal alone would round).
        let mut fine = Aggregate::default();
        fine.add(
            Aggregation::Sum,
            Some(d("7922816251426433759354395033.5")),
            1,
            "a",
            false,
        )
        .expect("fits");
        assert_eq!(
            fine.add(Aggregation::Sum, Some(d("0.1")), 2, "b", false),
            Err(Overflow)
        );
        // A `max` meter keeps no sum, so the same values fold.
        let mut max = Aggregate::default();
        max.add(Aggregation::Max, Some(big), 1, "a", false)
            .expect("fits");
        max.add(Aggregation::Max, Some(big), 2, "b", false)
            .expect("fits");
        assert_eq!(max.quantity(Aggregation::Max), big);
        assert_eq!(max.count, 2);
    }

    fn rollup(
        tenant: &str,
        customer: &str,
        meter: &str,
        group: BTreeMap<String, String>,
        window_start_ms: i64,
    ) -> Rollup {
        Rollup {
            v: 1,
            tenant: tenant.into(),
            meter: meter.into(),
            customer: customer.into(),
            group,
            aggregation: Aggregation::Sum,
            window_start_ms,
            window_end_ms: window_start_ms + 60_000,
            period_start_ms: 0,
            period_end_ms: 1,
            window_quantity: Decimal::ZERO,
            window_events: 0,
            period_quantity: Decimal::ZERO,
            period_events: 0,
            revision: 1,
            latest_event: None,
        }
    }

    #[test]
    fn a_rollup_names_its_latest_event_only_when_it_has_one_and_older_rollups_still_read() {
        let mut plain = rollup("acme", "c", "m", BTreeMap::new(), 60_000);
        // Without one, the bytes of every rollup written before it was carried.
        let before = r#"{"v":1,"tenant":"acme","meter":"m","customer":"c","group":{},"aggregation":"sum","window_start_ms":60000,"window_end_ms":120000,"period_start_ms":0,"period_end_ms":1,"window_quantity":"0","window_events":0,"period_quantity":"0","period_events":0,"revision":1}"#;
        assert_eq!(String::from_utf8(plain.encode()).expect("utf-8"), before);
        assert_eq!(Rollup::decode(before.as_bytes()).expect("decodes"), plain);
        plain.aggregation = Aggregation::Latest;
        plain.latest_event = Some(LatestEvent {
            time_ms: 61_500,
            id: "ev-\"7\"".into(),
        });
        let bytes = plain.encode();
        assert!(
            String::from_utf8_lossy(&bytes)
                .ends_with(r#""revision":1,"latest_event":{"time_ms":61500,"id":"ev-\"7\""}}"#),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(Rollup::decode(&bytes).expect("decodes"), plain);
        // Ordered as the aggregate orders events: by time, then id byte by byte.
        let event = |time_ms, id: &str| LatestEvent {
            time_ms,
            id: id.into(),
        };
        assert!(event(2, "A") > event(1, "z"));
        assert!(event(2, "b") > event(2, "B"));
    }

    #[test]
    fn series_that_collided_under_the_old_key_have_different_keys() {
        // Both were `acme/p0734-y1/llm_tokens/model=b/api_calls//1795851720000`.
        let one = rollup(
            "acme",
            "p0734-y1/llm_tokens/model=b",
            "api_calls",
            BTreeMap::new(),
            1_795_851_720_000,
        );
        let other = rollup(
            "acme",
            "p0734-y1",
            "llm_tokens",
            BTreeMap::from([("model".to_owned(), "b/api_calls/".to_owned())]),
            1_795_851_720_000,
        );
        assert_ne!(one.key(), other.key());
        assert_eq!(
            other.key(),
            r#"["acme","p0734-y1","llm_tokens",{"model":"b/api_calls/"},1795851720000]"#
        );
    }

    /// Fields drawn from the characters that separated the old key's parts, so collisions
    /// are likely if the encoding allowed any.
    fn field() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(vec!["", "/", ",", "=", "\0", "\"", "a", "\\"]),
            0..4,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #[test]
        fn distinct_series_have_distinct_rollup_keys(
            a in (field(), field(), field(), prop::collection::btree_map(field(), field(), 0..3), -2i64..2),
            b in (field(), field(), field(), prop::collection::btree_map(field(), field(), 0..3), -2i64..2),
        ) {
            let (ra, rb) = (
                rollup(&a.0, &a.1, &a.2, a.3.clone(), a.4),
                rollup(&b.0, &b.1, &b.2, b.3.clone(), b.4),
            );
            prop_assert_eq!(ra.key() == rb.key(), a == b);
        }
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
                    a.add(Aggregation::Sum, Some(*v), *t, id, false).expect("fits");
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
            merged.merge(Aggregation::Sum, &fold(right)).expect("fits");
            prop_assert_eq!(merged, fold(&forward));
        }
    }
}
