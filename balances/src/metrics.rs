//! The balances stage's Prometheus series.

use crate::state::BooksHeld;
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// What the balances stage counts.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `neruba_balance_entries_total{kind}`.
    pub entries: IntCounterVec,
    /// `neruba_grants_refused_total{code}`: grants and voids refused, one per `grant_refused`
    /// entry (a refusal the book remembers, sent again, adds no entry and is not counted).
    pub refused: IntCounterVec,
    /// `neruba_balances_dead_letters_total{code}`: ledger records it could not read.
    pub dead_letters: IntCounterVec,
    /// `neruba_balances_repeated_items_total`: line items seen before (changed nothing).
    pub repeated_items: IntCounter,
    /// `neruba_balances_clock_lag_seconds{partition}`: wall clock minus the partition's clock.
    pub clock_lag: IntGaugeVec,
    /// `neruba_books_memory_bytes{consumer="balances", worker, kind}`.
    pub books: BooksMemory,
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
            books: BooksMemory::register("balances", registry)?,
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
        for code in crate::state::DeadLetterCode::ALL {
            m.dead_letters.with_label_values(&[code.as_str()]);
        }
        Ok(m)
    }
}

/// `neruba_books_memory_bytes{consumer, worker, kind}`: the customers' books a worker of a
/// stage folding the ledger (the balances stage, the api's read model) holds in memory, by
/// [`BooksHeld`]'s estimates: `decoded` the most a batch held since the last reading (against
/// the worker's bound, 256 MiB by default), `kept` in their stored form between batches
/// (64 MiB), `freeing` a written batch's not yet freed.
#[derive(Debug, Clone)]
pub struct BooksMemory {
    gauge: IntGaugeVec,
    consumer: &'static str,
}

impl BooksMemory {
    /// Registers the gauge in `registry`, for the stage named `consumer`.
    pub fn register(consumer: &'static str, registry: &Registry) -> prometheus::Result<Self> {
        let gauge = IntGaugeVec::new(
            Opts::new(
                "neruba_books_memory_bytes",
                "Customers' books a worker holds in memory, estimated: `decoded` (the most a \
                 batch held since the last reading; a batch ends at the worker's bound), `kept` \
                 (in their stored form between batches), `freeing` (written, not yet freed).",
            ),
            &["consumer", "worker", "kind"],
        )?;
        registry.register(Box::new(gauge.clone()))?;
        Ok(Self { gauge, consumer })
    }

    /// Sets worker `worker`'s readings from `held`.
    pub fn publish(&self, worker: usize, held: &BooksHeld) {
        let worker = worker.to_string();
        for (kind, bytes) in [
            ("decoded", held.take_peak()),
            ("kept", held.kept_bytes()),
            ("freeing", held.freeing_bytes()),
        ] {
            self.gauge
                .with_label_values(&[self.consumer, worker.as_str(), kind])
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }
}
