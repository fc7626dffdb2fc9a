//! The catalog in force while a component runs, and which catalog may replace it.
//!
//! Invariants:
//! - a reader holds one catalog version for a whole request or batch
//!   ([`LiveCatalog::current`]), so no event is judged half by one version and half by another;
//! - a replacement is applied whole or not at all, and only if it is a compatible successor
//!   ([`Catalog::compatible_successor`]): stored windows and period totals were built under the
//!   meters in force, so a reload may not change how a surviving meter counts.
//!
//! Reading the new file is the caller's (`neruba`'s `SIGHUP` handler calls [`Catalog::load`]
//! and then [`LiveCatalog::replace`]).

use super::Catalog;
use crate::Result;
use arc_swap::ArcSwap;
use std::sync::Arc;

/// The catalog a running component uses, replaceable while it runs (`SIGHUP` reloads it).
/// Readers take the current version with [`LiveCatalog::current`] and keep it for a request or
/// a batch, so each is handled under one consistent catalog.
#[derive(Debug, Clone)]
pub struct LiveCatalog(Arc<ArcSwap<Catalog>>);

impl LiveCatalog {
    pub fn new(catalog: Catalog) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(catalog)))
    }

    /// The catalog in force now.
    pub fn current(&self) -> Arc<Catalog> {
        self.0.load_full()
    }

    /// Replaces the catalog if `next` is compatible with the current one (see
    /// [`Catalog::compatible_successor`]); otherwise keeps the current one and says why.
    pub fn replace(&self, next: Catalog) -> Result<(), String> {
        self.current().compatible_successor(&next)?;
        self.0.store(Arc::new(next));
        Ok(())
    }
}

impl From<Catalog> for LiveCatalog {
    fn from(catalog: Catalog) -> Self {
        Self::new(catalog)
    }
}

impl From<Arc<Catalog>> for LiveCatalog {
    fn from(catalog: Arc<Catalog>) -> Self {
        Self(Arc::new(ArcSwap::new(catalog)))
    }
}

impl Catalog {
    /// Whether `next` may replace this catalog in a running pipeline: a meter that stays may
    /// not change how it is aggregated, its window or its billing period, since the stored
    /// windows and period totals were built that way, nor which events it counts (type,
    /// filters), what it reads of them (value path) or how it splits them (`group_by`), since
    /// a period would count differently before and after (add a meter with a new key
    /// instead). Tenants, keys, meters and price plans may be added, and removed; a meter may
    /// start allowing negative values, not stop (the aggregator refuses a negative value on a
    /// meter without `allow_negative`, so the events the gateway accepted with it would be
    /// dead-lettered when consumed, or replayed, under the new catalog).
    pub fn compatible_successor(&self, next: &Catalog) -> Result<(), String> {
        for tenant in &self.tenants {
            let Some(successor) = next.tenant(&tenant.id) else {
                continue;
            };
            for meter in &tenant.meters {
                let Some(after) = successor.meters.iter().find(|m| m.key == meter.key) else {
                    continue;
                };
                let name = format!("{}/{}", tenant.id, meter.key);
                if after.aggregation != meter.aggregation {
                    return Err(format!(
                        "meter `{name}` changes its aggregation from {:?} to {:?}",
                        meter.aggregation, after.aggregation
                    ));
                }
                if after.window != meter.window {
                    return Err(format!(
                        "meter `{name}` changes its window from {} to {}",
                        humantime::format_duration(meter.window),
                        humantime::format_duration(after.window)
                    ));
                }
                if after.billing_period != meter.billing_period {
                    return Err(format!("meter `{name}` changes its billing period"));
                }
                // Which events it counts, what it reads of them and how it splits them: a
                // period's windows before the reload and after it would count differently
                // (a new `group_by` starts every series again at zero, so tiers start over).
                if after.event_type != meter.event_type {
                    return Err(format!(
                        "meter `{name}` changes the event type it reads from `{}` to `{}`",
                        meter.event_type, after.event_type
                    ));
                }
                if after.value != meter.value {
                    return Err(format!("meter `{name}` changes its value path"));
                }
                if after.group_by != meter.group_by {
                    return Err(format!("meter `{name}` changes its group_by"));
                }
                if after.filters != meter.filters {
                    return Err(format!("meter `{name}` changes its filters"));
                }
                if meter.allow_negative && !after.allow_negative {
                    return Err(format!(
                        "meter `{name}` stops allowing negative values (`allow_negative`)"
                    ));
                }
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
}
