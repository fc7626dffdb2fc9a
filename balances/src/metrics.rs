//! The balances stage's Prometheus series.

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// What the balances stage counts.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `neruba_balance_entries_total{kind}`.
    pub entries: IntCounterVec,
    /// `neruba_grants_refused_total{code}`: grants and voids that changed nothing.
    pub refused: IntCounterVec,
    /// `neruba_balances_dead_letters_total{code}`: ledger records it could not read.
    pub dead_letters: IntCounterVec,
    /// `neruba_balances_repeated_items_total`: line items seen before (changed nothing).
    pub repeated_items: IntCounter,
    /// `neruba_balances_clock_lag_seconds{partition}`: wall clock minus the partition's clock.
    pub clock_lag: IntGaugeVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            entries: IntCounterVec::new(
                Opts::new(
                    "neruba_balance_entries_total",
                    "Balance entries emitted, by kind.",
                ),
                &["kind"],
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "neruba_grants_refused_total",
                    "Grants and voids refused by the balances stage, by code.",
                ),
                &["code"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "neruba_balances_dead_letters_total",
                    "Ledger records the balances stage could not read, by code.",
                ),
                &["code"],
            )?,
            repeated_items: IntCounter::new(
                "neruba_balances_repeated_items_total",
                "Line items applied before, which changed nothing.",
            )?,
            clock_lag: IntGaugeVec::new(
                Opts::new(
                    "neruba_balances_clock_lag_seconds",
                    "Wall clock minus the ledger partition's clock (its latest tick), seconds.",
                ),
                &["partition"],
            )?,
        };
        registry.register(Box::new(m.entries.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.repeated_items.clone()))?;
        registry.register(Box::new(m.clock_lag.clone()))?;
        for kind in neruba_schemas::credit::EntryKind::ALL {
            m.entries.with_label_values(&[kind.as_str()]);
        }
        for code in [
            "key_conflict",
            "unknown_grant",
            crate::book::TOO_MANY_GRANTS,
        ] {
            m.refused.with_label_values(&[code]);
        }
        Ok(m)
    }
}
