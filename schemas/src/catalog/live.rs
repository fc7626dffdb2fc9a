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
    /// windows and period totals were built that way (add a meter with a new key instead).
    /// Tenants, keys, meters and price plans may be added, and removed.
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
}
