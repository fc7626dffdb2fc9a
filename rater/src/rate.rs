//! Rating one rollup: the pure step between a closed window and its line item. No IO.
//!
//! Invariants:
//! - the period's plan is the version in force on the period's first day (in the meter's
//!   billing time zone), so one period is priced by one plan and its items sum to that plan's
//!   price of the period total;
//! - `amount = price(period-to-date quantity) − amount already emitted for the period`, so the
//!   items of a period telescope to the price of its latest total, whatever the split into
//!   windows, the lateness or a change of plan version;
//! - a rollup whose revision was already rated for its window is a re-delivery: it yields no
//!   item (the first one stands, with its id);
//! - the result depends only on the rollup, the catalog and the two stored records, never on
//!   the clock, so replaying rollups into fresh state yields identical items.

use crate::price::{self, plan_in_force};
use neruba_schemas::event::format_time_ms;
use neruba_schemas::ledger::{IdParts, Kind, LineItem, line_item_id};
use neruba_schemas::rollup::Rollup;
use neruba_schemas::{Catalog, RefusalCode};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// What the rater remembers of a billing period (per tenant, customer, meter and group): the
/// latest item it emitted for it. Its `period_amount` is the sum of the period's items so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodRecord {
    pub last: LineItem,
}

/// What the rater remembers of a window: the latest revision rated and its item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRecord {
    pub revision: u32,
    pub item_id: String,
}

/// A rollup the rater cannot price: a stable code for programs (the dead-letter header value
/// and the metric label are `code.as_str()`) and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The outcome of rating one rollup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rated {
    /// A new line item, with the records to store beside it.
    Item {
        item: Box<LineItem>,
        window: WindowRecord,
    },
    /// This revision of the window was rated before; nothing to emit.
    Repeat,
}

/// Rates `rollup` given what was stored for its period and window.
pub fn rate(
    rollup: &Rollup,
    catalog: &Catalog,
    period: Option<&PeriodRecord>,
    window: Option<&WindowRecord>,
) -> Result<Rated, Refusal> {
    if let Some(window) = window
        && window.revision >= rollup.revision
    {
        return Ok(Rated::Repeat);
    }
    let (plan, precision) = plan_for(
        catalog,
        &rollup.tenant,
        &rollup.meter,
        rollup.period_start_ms,
    )?;
    let priced = price::price(plan, rollup.period_quantity, precision)
        .map_err(|e| Refusal::new(RefusalCode::UnpriceableQuantity, e.to_string()))?;
    let emitted = emitted_so_far(period.map(|p| &p.last), plan)?;
    let mut amount = priced
        .amount
        .checked_sub(emitted)
        .ok_or_else(|| Refusal::new(RefusalCode::UnpriceableQuantity, "amount overflows"))?;
    amount.rescale(precision);
    let id = line_item_id(&IdParts {
        tenant: &rollup.tenant,
        customer: &rollup.customer,
        meter: &rollup.meter,
        group: &rollup.group,
        period_start_ms: rollup.period_start_ms,
        window_start_ms: rollup.window_start_ms,
        revision: rollup.revision,
        price_plan: &plan.id,
        price_version: plan.version,
        rerun: None,
    });
    let kind = if rollup.revision > 1 {
        Kind::Adjustment
    } else if matches!(plan.model, neruba_schemas::catalog::PriceModel::Flat { .. }) {
        Kind::Flat
    } else {
        Kind::Usage
    };
    let item = LineItem {
        v: 1,
        id: id.clone(),
        kind,
        tenant: rollup.tenant.clone(),
        customer: rollup.customer.clone(),
        meter: rollup.meter.clone(),
        group: rollup.group.clone(),
        period_start: format_time_ms(rollup.period_start_ms),
        period_end: format_time_ms(rollup.period_end_ms),
        window_start: format_time_ms(rollup.window_start_ms),
        window_end: format_time_ms(rollup.window_end_ms),
        window_quantity: rollup.window_quantity,
        window_events: rollup.window_events,
        period_quantity: rollup.period_quantity,
        amount,
        period_amount: priced.amount,
        currency: plan.currency.clone(),
        price_plan: plan.id.clone(),
        price_version: plan.version,
        revision: rollup.revision,
        supersedes: window.map(|w| w.item_id.clone()),
    };
    Ok(Rated::Item {
        item: Box::new(item),
        window: WindowRecord {
            revision: rollup.revision,
            item_id: id,
        },
    })
}

/// The plan in force on the first day of the period starting at `period_start_ms` (in the
/// meter's billing time zone), and the digits of its currency.
fn plan_for<'c>(
    catalog: &'c Catalog,
    tenant_id: &str,
    meter_key: &str,
    period_start_ms: i64,
) -> Result<(&'c neruba_schemas::catalog::PricePlan, u32), Refusal> {
    let tenant = catalog.tenant(tenant_id).ok_or_else(|| {
        Refusal::new(
            RefusalCode::UnknownTenant,
            format!("tenant `{tenant_id}` is not in the catalog"),
        )
    })?;
    let meter = tenant
        .meters
        .iter()
        .find(|m| m.key == meter_key)
        .ok_or_else(|| {
            Refusal::new(
                RefusalCode::NoMatchingMeter,
                format!("tenant `{tenant_id}` has no meter `{meter_key}`"),
            )
        })?;
    let period_date = local_date(period_start_ms, meter.offset_secs()).ok_or_else(|| {
        Refusal::new(
            RefusalCode::InvalidRollup,
            "period start is out of the calendar's range",
        )
    })?;
    let plan = plan_in_force(&tenant.price_plans, meter_key, period_date).ok_or_else(|| {
        Refusal::new(
            RefusalCode::NoPricePlan,
            format!(
                "tenant `{tenant_id}` has no plan for meter `{meter_key}` in force on {period_date}"
            ),
        )
    })?;
    let precision = catalog.precision(&plan.currency).ok_or_else(|| {
        Refusal::new(
            RefusalCode::UnknownCurrency,
            format!("currency `{}` has no known precision", plan.currency),
        )
    })?;
    Ok((plan, precision))
}

/// Re-prices a period's latest total under the plan now in force (a rerun). Returns the
/// adjustment for the difference, or `None` when the amount is unchanged, so a rerun that
/// changes nothing (or runs twice) emits nothing.
///
/// The adjustment covers the whole period: its window is the period, its revision 0, and it
/// supersedes the period's latest item. Its id includes the request's key.
pub fn reprice(
    last: &LineItem,
    catalog: &Catalog,
    rerun_key: &str,
) -> Result<Option<LineItem>, Refusal> {
    let period_start_ms = neruba_schemas::event::parse_time_ms(&last.period_start)
        .map_err(|r| Refusal::new(RefusalCode::InvalidRollup, r.message))?;
    let (plan, precision) = plan_for(catalog, &last.tenant, &last.meter, period_start_ms)?;
    let emitted = emitted_so_far(Some(last), plan)?;
    let priced = price::price(plan, last.period_quantity, precision)
        .map_err(|e| Refusal::new(RefusalCode::UnpriceableQuantity, e.to_string()))?;
    if priced.amount == emitted {
        return Ok(None);
    }
    let mut amount = priced
        .amount
        .checked_sub(emitted)
        .ok_or_else(|| Refusal::new(RefusalCode::UnpriceableQuantity, "amount overflows"))?;
    amount.rescale(precision);
    let id = line_item_id(&IdParts {
        tenant: &last.tenant,
        customer: &last.customer,
        meter: &last.meter,
        group: &last.group,
        period_start_ms,
        window_start_ms: period_start_ms,
        revision: 0,
        price_plan: &plan.id,
        price_version: plan.version,
        rerun: Some(rerun_key),
    });
    Ok(Some(LineItem {
        v: 1,
        id,
        kind: Kind::Adjustment,
        window_start: last.period_start.clone(),
        window_end: last.period_end.clone(),
        window_quantity: last.period_quantity,
        window_events: 0,
        amount,
        period_amount: priced.amount,
        currency: plan.currency.clone(),
        price_plan: plan.id.clone(),
        price_version: plan.version,
        revision: 0,
        supersedes: Some(last.id.clone()),
        ..last.clone()
    }))
}

/// The amount already emitted for the period, which must have been billed in the plan's currency.
fn emitted_so_far(
    last: Option<&LineItem>,
    plan: &neruba_schemas::catalog::PricePlan,
) -> Result<Decimal, Refusal> {
    match last {
        Some(last) if last.currency != plan.currency => Err(Refusal::new(
            RefusalCode::UnknownCurrency,
            format!(
                "the period was billed in {} but plan `{}` v{} is in {}",
                last.currency, plan.id, plan.version, plan.currency
            ),
        )),
        Some(last) => Ok(last.period_amount),
        None => Ok(Decimal::ZERO),
    }
}

/// The calendar date of `ms` at `offset_secs` east of UTC.
fn local_date(ms: i64, offset_secs: i32) -> Option<time::Date> {
    let local = ms.checked_add(i64::from(offset_secs) * 1000)?;
    let t = time::OffsetDateTime::from_unix_timestamp(local.div_euclid(1000)).ok()?;
    Some(t.date())
}

#[cfg(test)]
mod tests {
    use super::*;
    use neruba_schemas::catalog::Aggregation;
    use std::collections::BTreeMap;

    const CATALOG: &str = r#"
[[tenants]]
id = "acme"

[[tenants.meters]]
key = "tokens"
event_type = "llm.tokens"
aggregation = "sum"
value = "$.tokens"
window = "1m"

[[tenants.meters]]
key = "seats"
event_type = "seat.active"
aggregation = "max"
value = "$.seats"
window = "1h"

[[tenants.price_plans]]
id = "tokens-usd"
meter = "tokens"
version = 1
effective_from = "2026-01-01"
currency = "USD"
included_units = "1000"
model = { type = "graduated", tiers = [
  { up_to = "10000", unit_price = "0.001" },
  { unit_price = "0.0005" },
] }

[[tenants.price_plans]]
id = "tokens-usd"
meter = "tokens"
version = 2
effective_from = "2026-12-01"
currency = "USD"
model = { type = "unit", unit_price = "0.01" }

[[tenants.price_plans]]
id = "seats-flat"
meter = "seats"
version = 1
effective_from = "2026-01-01"
currency = "EUR"
model = { type = "flat", fee = "49.00" }
"#;

    fn catalog() -> Catalog {
        Catalog::from_toml_str(CATALOG, "test.toml").expect("catalog")
    }

    fn d(text: &str) -> Decimal {
        neruba_schemas::decimal::parse_exact(text).expect("decimal")
    }

    /// November 2026 (UTC), window starting at `minute` past midnight on the 24th.
    fn rollup(meter: &str, minute: i64, revision: u32, window: &str, period: &str) -> Rollup {
        let period_start_ms = 1_793_491_200_000; // 2026-11-01T00:00:00Z
        let window_start_ms = 1_795_478_400_000 + minute * 60_000; // 2026-11-24T00:00Z + minute
        Rollup {
            v: 1,
            tenant: "acme".into(),
            meter: meter.into(),
            customer: "c1".into(),
            group: BTreeMap::new(),
            aggregation: Aggregation::Sum,
            window_start_ms,
            window_end_ms: window_start_ms + 60_000,
            period_start_ms,
            period_end_ms: 1_796_083_200_000, // 2026-12-01T00:00:00Z
            window_quantity: d(window),
            window_events: 1,
            period_quantity: d(period),
            period_events: 1,
            revision,
            latest_event: None,
        }
    }

    fn item(rated: Rated) -> (LineItem, PeriodRecord, WindowRecord) {
        match rated {
            Rated::Item { item, window } => {
                let period = PeriodRecord {
                    last: (*item).clone(),
                };
                (*item, period, window)
            }
            Rated::Repeat => panic!("expected an item"),
        }
    }

    #[test]
    fn windows_emit_deltas_and_a_revision_supersedes_its_window() {
        let catalog = catalog();
        // 1,500 tokens: 500 billable at 0.001 = 0.50.
        let (first, period, w1) = item(
            rate(
                &rollup("tokens", 0, 1, "1500", "1500"),
                &catalog,
                None,
                None,
            )
            .expect("rates"),
        );
        assert_eq!(first.kind, Kind::Usage);
        assert_eq!(first.amount, d("0.50"));
        assert_eq!(first.period_amount, d("0.50"));
        assert_eq!(first.price_version, 1, "the plan in force on 2026-11-01");
        assert_eq!(first.window_start, "2026-11-24T00:00:00.000Z");
        assert_eq!(first.period_start, "2026-11-01T00:00:00.000Z");
        assert_eq!(first.supersedes, None);
        // Second window: 12,000 total, 11,000 billable → 10,000 × 0.001 in tier 1 (10.00)
        // + 1,000 × 0.0005 in tier 2 (0.50) = 10.50, of which 0.50 was emitted.
        let (second, period, _) = item(
            rate(
                &rollup("tokens", 1, 1, "10500", "12000"),
                &catalog,
                Some(&period),
                None,
            )
            .expect("rates"),
        );
        assert_eq!(second.amount, d("10.00"));
        assert_eq!(second.period_amount, d("10.50"));
        // A late event adds 2 tokens to the first window: 1,002 in tier 2 → 10.501 → 10.50;
        // the adjustment's delta is 0.00.
        let (late, _, _) = item(
            rate(
                &rollup("tokens", 0, 2, "1502", "12002"),
                &catalog,
                Some(&period),
                Some(&w1),
            )
            .expect("rates"),
        );
        assert_eq!(late.kind, Kind::Adjustment);
        assert_eq!(late.amount.to_string(), "0.00");
        assert_eq!(late.supersedes.as_deref(), Some(first.id.as_str()));
        assert_ne!(late.id, first.id);
        // The same revision again is a re-delivery.
        assert_eq!(
            rate(
                &rollup("tokens", 0, 1, "1500", "1500"),
                &catalog,
                Some(&period),
                Some(&w1)
            ),
            Ok(Rated::Repeat)
        );
    }

    #[test]
    fn flat_plans_charge_the_fee_on_the_first_window_of_the_period() {
        let catalog = catalog();
        let (first, period, _) =
            item(rate(&rollup("seats", 0, 1, "3", "3"), &catalog, None, None).expect("rates"));
        assert_eq!(first.kind, Kind::Flat);
        assert_eq!((first.amount, first.currency.as_str()), (d("49.00"), "EUR"));
        let (next, _, _) = item(
            rate(
                &rollup("seats", 60, 1, "5", "5"),
                &catalog,
                Some(&period),
                None,
            )
            .expect("rates"),
        );
        assert_eq!(next.amount.to_string(), "0.00");
        assert_eq!(next.period_amount, d("49.00"));
    }

    const MODELS: &str = r#"
[[tenants]]
id = "t"

[[tenants.meters]]
key = "graduated"
event_type = "e"
aggregation = "sum"
value = "$.v"
window = "1m"

[[tenants.meters]]
key = "volume"
event_type = "e"
aggregation = "sum"
value = "$.v"
window = "1m"

[[tenants.meters]]
key = "package"
event_type = "e"
aggregation = "sum"
value = "$.v"
window = "1m"

[[tenants.meters]]
key = "unit"
event_type = "e"
aggregation = "sum"
value = "$.v"
window = "1m"

[[tenants.meters]]
key = "flat"
event_type = "e"
aggregation = "sum"
value = "$.v"
window = "1m"

[[tenants.price_plans]]
id = "g"
meter = "graduated"
version = 1
effective_from = "2026-01-01"
currency = "USD"
included_units = "50"
model = { type = "graduated", tiers = [
  { up_to = "100", unit_price = "0.1" },
  { up_to = "1000", unit_price = "0.05", flat_fee = "2" },
  { unit_price = "0.0133" },
] }

[[tenants.price_plans]]
id = "v"
meter = "volume"
version = 1
effective_from = "2026-01-01"
currency = "KWD"
model = { type = "volume", tiers = [
  { up_to = "100", unit_price = "0.1234" },
  { unit_price = "0.0567", flat_fee = "3" },
] }

[[tenants.price_plans]]
id = "p"
meter = "package"
version = 1
effective_from = "2026-01-01"
currency = "JPY"
minimum = "100"
model = { type = "package", size = "250", price = "30" }

[[tenants.price_plans]]
id = "u"
meter = "unit"
version = 1
effective_from = "2026-01-01"
currency = "USD"
maximum = "40"
model = { type = "unit", unit_price = "0.0125" }

[[tenants.price_plans]]
id = "f"
meter = "flat"
version = 1
effective_from = "2026-01-01"
currency = "EUR"
model = { type = "flat", fee = "9.99" }
"#;

    proptest::proptest! {
        /// Invariant 1 at the rater: whatever the split of a period into windows, and whatever
        /// late revisions follow, the items sum to the price of the final period total.
        #[test]
        fn items_of_a_period_sum_to_the_price_of_its_total_for_every_model(
            windows in proptest::collection::vec(0u32..5_000_000, 1..12),
            late in proptest::collection::vec((0usize..12, 1u32..200_000), 0..4),
        ) {
            let catalog = Catalog::from_toml_str(MODELS, "models.toml").expect("catalog");
            for meter in ["graduated", "volume", "package", "unit", "flat"] {
                let mut period: Option<PeriodRecord> = None;
                let mut seen: std::collections::HashMap<i64, WindowRecord> = Default::default();
                let mut window_qty: Vec<Decimal> = Vec::new();
                let mut total = Decimal::ZERO;
                let mut sum = Decimal::ZERO;
                let mut steps: Vec<(usize, Decimal)> = windows
                    .iter()
                    .enumerate()
                    .map(|(i, q)| (i, Decimal::new(i64::from(*q), 3)))
                    .collect();
                steps.extend(
                    late.iter()
                        .map(|(i, q)| (*i % windows.len(), Decimal::new(i64::from(*q), 2))),
                );
                for (i, qty) in steps {
                    if window_qty.len() <= i {
                        window_qty.resize(i + 1, Decimal::ZERO);
                    }
                    window_qty[i] += qty;
                    total += qty;
                    let minute = i64::try_from(i).expect("small");
                    let mut r = rollup(meter, minute, 1, "0", "0");
                    r.tenant = "t".into();
                    r.window_quantity = window_qty[i];
                    r.period_quantity = total;
                    let start = r.window_start_ms;
                    r.revision = seen.get(&start).map_or(1, |w| w.revision + 1);
                    let rated = rate(&r, &catalog, period.as_ref(), seen.get(&start))
                        .expect("rates");
                    let (item, p, w) = item(rated);
                    sum += item.amount;
                    period = Some(p);
                    seen.insert(start, w);
                }
                let tenant = catalog.tenant("t").expect("tenant");
                let plan = tenant.price_plans.iter().find(|p| p.meter == meter).expect("plan");
                let precision = catalog.precision(&plan.currency).expect("currency");
                let expected = price::price(plan, total, precision).expect("priced").amount;
                proptest::prop_assert_eq!(sum, expected, "meter {}", meter);
            }
        }
    }

    #[test]
    fn refusals_carry_stable_codes() {
        let catalog = catalog();
        let mut unknown = rollup("tokens", 0, 1, "1", "1");
        unknown.tenant = "nobody".into();
        let code = |r: &Rollup| {
            rate(r, &catalog, None, None)
                .map(|_| ())
                .map_err(|e| e.code.as_str())
        };
        assert_eq!(code(&unknown), Err("unknown_tenant"));
        assert_eq!(
            code(&rollup("gone", 0, 1, "1", "1")),
            Err("no_matching_meter")
        );
        // A negative period total is priced as zero (it was refused, and so never billed).
        let negative = rate(&rollup("tokens", 0, 1, "-1", "-1"), &catalog, None, None)
            .map(|rated| item(rated).0.amount);
        assert_eq!(negative, Ok(d("0.00")));
        let mut early = rollup("tokens", 0, 1, "1", "1");
        early.period_start_ms = 1_735_689_600_000 - 86_400_000; // 2024-12-31: before any plan
        assert_eq!(code(&early), Err("no_price_plan"));
    }
}
