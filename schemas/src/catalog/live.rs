//! The catalog in force while a component runs, and which catalog may replace it.
//!
//! Invariants:
//! - a reader holds one catalog version for a whole request or batch
//!   ([`LiveCatalog::current`]), so no event is judged half by one version and half by another;
//! - a replacement is applied whole or not at all, and only if it is a compatible successor
//!   ([`Catalog::compatible_successor`]): stored windows and period totals were built under the
//!   meters in force, so a reload may not change how a surviving meter counts ([`MeterShape`]);
//!   nor may it bring back a meter key it removed, shaped otherwise (its stored windows and
//!   totals are still there). The aggregator keeps the shapes of the meters its state was built
//!   under and checks a restarted catalog against them by the same rule
//!   ([`Catalog::keeps_shapes`]).
//!
//! Reading the new file is the caller's (`neruba`'s `SIGHUP` handler calls [`Catalog::load`]
//! and then [`LiveCatalog::replace`]).

use super::{Aggregation, Catalog, Filter, Meter};
use crate::Result;
use crate::json_path::JsonPath;
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Meter shapes by (tenant, meter key).
pub type MeterShapes = BTreeMap<(String, String), MeterShape>;

/// The catalog a running component uses, replaceable while it runs (`SIGHUP` reloads it).
/// Readers take the current version with [`LiveCatalog::current`] and keep it for a request or
/// a batch, so each is handled under one consistent catalog.
#[derive(Debug, Clone)]
pub struct LiveCatalog {
    current: Arc<ArcSwap<Catalog>>,
    /// The shape of every meter key in force since the component started, as last in force
    /// (removed ones included), and those its stored state was built under
    /// ([`LiveCatalog::remember`]): a reload may not reshape any of them.
    known: Arc<Mutex<MeterShapes>>,
}

impl LiveCatalog {
    pub fn new(catalog: Catalog) -> Self {
        Self::from(Arc::new(catalog))
    }

    /// The catalog in force now.
    pub fn current(&self) -> Arc<Catalog> {
        self.current.load_full()
    }

    /// Replaces the catalog if `next` keeps the shape of every meter known (the current one's,
    /// those earlier reloads removed, and those remembered: [`Catalog::keeps_shapes`]);
    /// otherwise keeps the current one and says why.
    pub fn replace(&self, next: Catalog) -> Result<(), String> {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        next.keeps_shapes(&known)?;
        known.extend(next.meter_shapes());
        self.current.store(Arc::new(next));
        Ok(())
    }

    /// Adds the shapes of meters a stored state was built under, for meter keys not known
    /// yet: a later reload may bring such a meter in only as it was.
    pub fn remember(&self, shapes: &MeterShapes) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        for (key, shape) in shapes {
            known.entry(key.clone()).or_insert_with(|| shape.clone());
        }
    }
}

impl From<Catalog> for LiveCatalog {
    fn from(catalog: Catalog) -> Self {
        Self::new(catalog)
    }
}

impl From<Arc<Catalog>> for LiveCatalog {
    fn from(catalog: Arc<Catalog>) -> Self {
        let known = catalog.meter_shapes();
        Self {
            current: Arc::new(ArcSwap::new(catalog)),
            known: Arc::new(Mutex::new(known)),
        }
    }
}

/// How a meter counts: what its stored windows and period totals were built under. A meter
/// key that stays in a running pipeline keeps its shape ([`MeterShape::may_become`]).
///
/// The aggregator stores it with postcard, whose fields are positional: add fields, and
/// variants to its enums, only at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterShape {
    pub aggregation: Aggregation,
    pub window: Duration,
    pub anchor_day: u8,
    pub time_zone: String,
    pub event_type: String,
    pub value: Option<JsonPath>,
    pub group_by: BTreeMap<String, JsonPath>,
    pub filters: Vec<Filter>,
    pub allow_negative: bool,
}

impl Meter {
    /// What the meter's stored windows and totals are built under.
    pub fn shape(&self) -> MeterShape {
        MeterShape {
            aggregation: self.aggregation,
            window: self.window,
            anchor_day: self.billing_period.anchor_day,
            time_zone: self.billing_period.time_zone.clone(),
            event_type: self.event_type.clone(),
            value: self.value.clone(),
            group_by: self.group_by.clone(),
            filters: self.filters.clone(),
            allow_negative: self.allow_negative,
        }
    }
}

impl MeterShape {
    /// Whether a meter shaped like this (`name`, for the message) may be shaped like `next`
    /// from now on: not in how it is aggregated, its window or its billing period, since the
    /// stored windows and period totals were built that way, nor which events it counts
    /// (type, filters), what it reads of them (value path) or how it splits them (`group_by`),
    /// since a period would count differently before and after (add a meter with a new key
    /// instead). It may start allowing negative values, not stop (the aggregator refuses a
    /// negative value on a meter without `allow_negative`, so the events the gateway accepted
    /// with it would be dead-lettered when consumed, or replayed, under the new shape).
    pub fn may_become(&self, next: &MeterShape, name: &str) -> Result<(), String> {
        if next.aggregation != self.aggregation {
            return Err(format!(
                "meter `{name}` changes its aggregation from {:?} to {:?}",
                self.aggregation, next.aggregation
            ));
        }
        if next.window != self.window {
            return Err(format!(
                "meter `{name}` changes its window from {} to {}",
                humantime::format_duration(self.window),
                humantime::format_duration(next.window)
            ));
        }
        // The same offset written another way (`UTC`, `Z`, `+00:00`) bounds the same periods.
        let zone = |shape: &MeterShape| {
            super::parse_fixed_offset(&shape.time_zone).ok_or_else(|| shape.time_zone.clone())
        };
        if (next.anchor_day, zone(next)) != (self.anchor_day, zone(self)) {
            return Err(format!("meter `{name}` changes its billing period"));
        }
        // Which events it counts, what it reads of them and how it splits them: a period's
        // windows before the change and after it would count differently (a new `group_by`
        // starts every series again at zero, so tiers start over).
        if next.event_type != self.event_type {
            return Err(format!(
                "meter `{name}` changes the event type it reads from `{}` to `{}`",
                self.event_type, next.event_type
            ));
        }
        if next.value != self.value {
            return Err(format!("meter `{name}` changes its value path"));
        }
        if next.group_by != self.group_by {
            return Err(format!("meter `{name}` changes its group_by"));
        }
        if next.filters != self.filters {
            return Err(format!("meter `{name}` changes its filters"));
        }
        if self.allow_negative && !next.allow_negative {
            return Err(format!(
                "meter `{name}` stops allowing negative values (`allow_negative`)"
            ));
        }
        Ok(())
    }
}

impl Catalog {
    /// The shapes of every tenant's meters.
    pub fn meter_shapes(&self) -> MeterShapes {
        self.tenants
            .iter()
            .flat_map(|tenant| {
                tenant
                    .meters
                    .iter()
                    .map(|meter| ((tenant.id.clone(), meter.key.clone()), meter.shape()))
            })
            .collect()
    }

    /// Whether `next` may replace this catalog in a running pipeline: each meter of this one
    /// that stays keeps its shape ([`MeterShape::may_become`]). Tenants, keys, meters and
    /// price plans may be added, and removed.
    pub fn compatible_successor(&self, next: &Catalog) -> Result<(), String> {
        next.keeps_shapes(&self.meter_shapes())
    }

    /// Whether this catalog may follow meters shaped as `kept`: each of its meters with a key
    /// in `kept` has the shape it may become ([`MeterShape::may_become`]); meters of `kept` it
    /// lacks, and meters it adds, are free.
    pub fn keeps_shapes(&self, kept: &MeterShapes) -> Result<(), String> {
        for tenant in &self.tenants {
            for meter in &tenant.meters {
                let Some(before) = kept.get(&(tenant.id.clone(), meter.key.clone())) else {
                    continue;
                };
                before.may_become(&meter.shape(), &format!("{}/{}", tenant.id, meter.key))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::valid_text;
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_reload_may_add_and_reprice_but_not_reshape_a_meter() {
        let parse = |text: &str| Catalog::from_toml_str(text, "test.toml").expect("catalog");
        let current = parse(&valid_text());
        let live = LiveCatalog::new(parse(&valid_text()));
        let repriced = valid_text().replace(
            "effective_from = \"2026-01-01\"",
            "effective_from = \"2026-02-01\"",
        );
        assert_eq!(current.compatible_successor(&parse(&repriced)), Ok(()));
        let summed_as_max = valid_text().replace("aggregation = \"sum\"", "aggregation = \"max\"");
        assert_eq!(
            current.compatible_successor(&parse(&summed_as_max)),
            Err("meter `acme/tokens` changes its aggregation from Sum to Max".to_owned())
        );
        let wider = valid_text().replace("window = \"1m\"", "window = \"1h\"");
        assert_eq!(
            live.replace(parse(&wider)),
            Err("meter `acme/tokens` changes its window from 1m to 1h".to_owned())
        );
        assert_eq!(
            live.current().tenants()[0].meters[0].window,
            Duration::from_secs(60)
        );
        assert_eq!(live.replace(parse(&repriced)), Ok(()));
        assert_eq!(
            live.current().tenants()[0].price_plans[0]
                .effective_from
                .to_string(),
            "2026-02-01"
        );
    }

    /// The test catalog with its first meter's table edited by `edit`.
    fn with_first_meter(edit: &dyn Fn(&mut toml::Table)) -> String {
        let mut doc: toml::Table = valid_text().parse().expect("toml");
        let meter = doc
            .get_mut("tenants")
            .and_then(|t| t.as_array_mut())
            .and_then(|t| t.first_mut())
            .and_then(|t| t.get_mut("meters"))
            .and_then(|m| m.as_array_mut())
            .and_then(|m| m.first_mut())
            .and_then(|m| m.as_table_mut())
            .expect("the first meter");
        edit(meter);
        doc.to_string()
    }

    #[test]
    fn a_reload_may_not_change_which_events_a_meter_counts_what_it_reads_or_how_it_splits_them() {
        // Was: only aggregation, window and billing period were compared, so a new `group_by`
        // loaded mid-period and every series started again at zero (its tiers with it).
        let parse = |text: &str| Catalog::from_toml_str(text, "test.toml").expect("catalog");
        let current = parse(&valid_text());
        let meter = &current.tenants()[0].meters[0];
        assert!(
            !meter.group_by.is_empty() && !meter.filters.is_empty(),
            "the test catalog's meter has groups and filters: {meter:?}"
        );
        let reshaped = |field: &'static str, edit: &dyn Fn(&mut toml::Table)| {
            let next = parse(&with_first_meter(edit));
            (field, current.compatible_successor(&next))
        };
        let refused = [
            reshaped("type", &|m| {
                m.insert("event_type".into(), "other".into());
            }),
            reshaped("value", &|m| {
                m.insert("value".into(), "$.other".into());
            }),
            reshaped("group_by", &|m| {
                m.remove("group_by");
            }),
            reshaped("filters", &|m| {
                m.remove("filters");
            }),
        ];
        for (field, answer) in refused {
            assert!(
                answer
                    .as_ref()
                    .is_err_and(|e| e.starts_with("meter `acme/tokens` changes")),
                "{field}: {answer:?}"
            );
        }
        // Negative values allowed from now on: nothing accepted before is refused (what the
        // doors let through is counted once the aggregators have reloaded first). Not the
        // other way.
        let (_, negative) = reshaped("allow_negative", &|m| {
            m.insert("allow_negative".into(), true.into());
        });
        assert_eq!(negative, Ok(()));
        let allowing = parse(&with_first_meter(&|m| {
            m.insert("allow_negative".into(), true.into());
        }));
        assert_eq!(
            allowing.compatible_successor(&current),
            Err("meter `acme/tokens` stops allowing negative values (`allow_negative`)".to_owned())
        );
    }

    #[test]
    fn a_billing_period_written_another_way_is_the_same_period() {
        // Was: the time zones were compared as text, so `UTC` rewritten as `+00:00` was refused
        // as a change of billing period, and a restart under it refused to open.
        let parse = |text: &str| Catalog::from_toml_str(text, "test.toml").expect("catalog");
        let period = |anchor_day: i64, time_zone: &'static str| {
            parse(&with_first_meter(&|m| {
                let mut table = toml::Table::new();
                table.insert("anchor_day".into(), anchor_day.into());
                table.insert("time_zone".into(), time_zone.into());
                m.insert("billing_period".into(), table.into());
            }))
        };
        let utc = period(1, "UTC");
        for same in ["+00:00", "-00:00", "Z"] {
            assert_eq!(utc.compatible_successor(&period(1, same)), Ok(()), "{same}");
            assert_eq!(period(1, same).compatible_successor(&utc), Ok(()), "{same}");
        }
        for (anchor_day, time_zone) in [(1, "+01:00"), (1, "-00:30"), (2, "UTC")] {
            assert_eq!(
                utc.compatible_successor(&period(anchor_day, time_zone)),
                Err("meter `acme/tokens` changes its billing period".to_owned()),
                "{anchor_day} {time_zone}"
            );
        }
        // A kept shape, as an aggregator's state holds it, is compared the same way.
        let mut kept = utc.tenants()[0].meters[0].shape();
        kept.time_zone = "+00:00".to_owned();
        assert_eq!(
            kept.may_become(&utc.tenants()[0].meters[0].shape(), "m"),
            Ok(())
        );
    }

    #[test]
    fn a_meter_removed_by_one_reload_comes_back_only_as_it_was() {
        // Was: each reload was compared with the catalog before it alone, so a meter removed
        // and then added again grouped otherwise passed both, its stored totals still there.
        let parse = |text: &str| Catalog::from_toml_str(text, "test.toml").expect("catalog");
        let live = LiveCatalog::new(parse(&valid_text()));
        let without = parse(&valid_text().replace("= \"tokens\"", "= \"other\""));
        assert_eq!(live.replace(without), Ok(()));
        let regrouped = parse(&with_first_meter(&|m| {
            m.remove("group_by");
        }));
        assert_eq!(
            live.replace(regrouped),
            Err("meter `acme/tokens` changes its group_by".to_owned())
        );
        assert_eq!(live.current().tenants()[0].meters[0].key, "other");
        // As it was, it may come back.
        assert_eq!(live.replace(parse(&valid_text())), Ok(()));
        assert_eq!(live.current().tenants()[0].meters[0].key, "tokens");
    }

    #[test]
    fn kept_shapes_are_checked_as_a_reload_would_be() {
        let parse = |text: &str| Catalog::from_toml_str(text, "test.toml").expect("catalog");
        let kept = parse(&valid_text()).meter_shapes();
        assert_eq!(kept.len(), 1);
        assert_eq!(parse(&valid_text()).keeps_shapes(&kept), Ok(()));
        let wider = parse(&valid_text().replace("window = \"1m\"", "window = \"1h\""));
        assert_eq!(
            wider.keeps_shapes(&kept),
            Err("meter `acme/tokens` changes its window from 1m to 1h".to_owned())
        );
        // Remembered by a running component, a kept shape holds its reloads too.
        let without = parse(&valid_text().replace("= \"tokens\"", "= \"other\""));
        let live = LiveCatalog::new(without);
        live.remember(&kept);
        assert_eq!(
            live.replace(wider),
            Err("meter `acme/tokens` changes its window from 1m to 1h".to_owned())
        );
        // Shapes read back from their stored form compare equal.
        let stored = postcard::to_stdvec(&kept).expect("encode");
        let back: MeterShapes = postcard::from_bytes(&stored).expect("decode");
        assert_eq!(back, kept);
    }
}
