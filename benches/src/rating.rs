//! The rating workload shared by the pricing micro-benchmarks and the rater load generator.

use neruba_rater::rate::{PeriodRecord, Rated, WindowRecord, rate};
use neruba_schemas::Catalog;
use neruba_schemas::catalog::Aggregation;
use neruba_schemas::ledger::LineItem;
use neruba_schemas::rollup::Rollup;
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashMap};

/// One tenant, one token meter, a graduated plan with free units (the common LLM shape).
pub const CATALOG: &str = r#"
[[tenants]]
id = "acme"

[[tenants.meters]]
key = "tokens"
event_type = "llm.completion"
aggregation = "sum"
value = "$.tokens"
group_by = { model = "$.model" }
window = "1m"

[[tenants.price_plans]]
id = "tokens-standard"
meter = "tokens"
version = 1
effective_from = "2026-01-01"
currency = "USD"
included_units = "10000"
model = { type = "graduated", tiers = [
  { up_to = "1000000", unit_price = "0.00002" },
  { up_to = "10000000", unit_price = "0.000015", flat_fee = "1.00" },
  { unit_price = "0.00001" },
] }
"#;

/// The sample catalog above, parsed.
pub fn catalog() -> Catalog {
    Catalog::from_toml_str(CATALOG, "bench").unwrap_or_else(|e| panic!("bench catalog: {e}"))
}

/// `customers × windows` first closes (each window's quantity varies, so tiers are crossed
/// at different points), then one revision of every customer's first window: the shape of a
/// period's rollups with a late event per customer.
pub fn rollups(customers: usize, windows: usize) -> Vec<Rollup> {
    let period_start_ms = 1_793_491_200_000; // 2026-11-01T00:00:00Z
    let first_window_ms = 1_795_478_400_000; // 2026-11-24T00:00:00Z
    let mut out = Vec::with_capacity(customers * (windows + 1));
    let mut totals = vec![Decimal::ZERO; customers];
    let rollup = |customer: usize, window: usize, revision: u32, qty: Decimal, total: Decimal| {
        let start = first_window_ms + i64::try_from(window).unwrap_or(0) * 60_000;
        Rollup {
            v: 1,
            tenant: "acme".into(),
            meter: "tokens".into(),
            customer: format!("customer-{customer:05}"),
            group: BTreeMap::from([("model".to_owned(), "large".to_owned())]),
            aggregation: Aggregation::Sum,
            window_start_ms: start,
            window_end_ms: start + 60_000,
            period_start_ms,
            period_end_ms: 1_796_083_200_000,
            window_quantity: qty,
            window_events: 10,
            period_quantity: total,
            period_events: 10,
            revision,
            latest_event: None,
        }
    };
    for window in 0..windows {
        for (customer, total) in totals.iter_mut().enumerate() {
            let qty = Decimal::from((customer * 7919 + window * 104_729) % 400_000 + 1_000);
            *total += qty;
            out.push(rollup(customer, window, 1, qty, *total));
        }
    }
    for (customer, total) in totals.iter_mut().enumerate() {
        let late = Decimal::from(500 + customer % 1000);
        *total += late;
        let first = (customer * 7919) % 400_000 + 1_000;
        out.push(rollup(customer, 0, 2, Decimal::from(first) + late, *total));
    }
    out
}

/// Rates `rollups` in order with in-memory records: the items the rater must produce.
pub fn items(rollups: &[Rollup], catalog: &Catalog) -> Vec<LineItem> {
    let mut periods: HashMap<String, PeriodRecord> = HashMap::new();
    let mut windows: HashMap<(String, i64), WindowRecord> = HashMap::new();
    let mut out = Vec::with_capacity(rollups.len());
    for r in rollups {
        let window_key = (r.customer.clone(), r.window_start_ms);
        let rated = rate(
            r,
            catalog,
            periods.get(&r.customer),
            windows.get(&window_key),
        );
        if let Ok(Rated::Item { item, window }) = rated {
            periods.insert(
                r.customer.clone(),
                PeriodRecord {
                    last: (*item).clone(),
                },
            );
            windows.insert(window_key, window);
            out.push(*item);
        }
    }
    out
}
