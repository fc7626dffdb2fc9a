//! A quote: one tenant's plan found in the catalog, and a quantity priced under it with the
//! lines that explain the amount. What `neruba price` prints and what the api's
//! "explain this charge" answers, so both say what the rater would charge.
//!
//! Invariants:
//! - the plan is chosen either as the rater chooses it for a period (the version in force on
//!   a day, [`price::plan_in_force`]) or exactly as a line item names it (id and version), and
//!   the digits are the currency's, as the rater rounds to them;
//! - pure: the catalog in, the priced quantity out; no IO.

use crate::price::{self, Priced};
use neruba_schemas::Catalog;
use neruba_schemas::catalog::PricePlan;
use rust_decimal::Decimal;

/// Which version of a plan prices the quantity.
#[derive(Debug, Clone, Copy)]
pub enum PlanChoice<'a> {
    /// The version of `meter`'s plan in force on `date`, as the rater picks it for a period
    /// starting that day.
    InForce { meter: &'a str, date: time::Date },
    /// Exactly the plan a line item names.
    Named { id: &'a str, version: u32 },
}

/// Why a quantity could not be quoted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    #[error("no tenant `{0}` in the catalog")]
    UnknownTenant(String),
    /// No plan of the tenant fits the choice (none in force that day, or the version named
    /// is no longer in the catalog).
    #[error("{0}")]
    NoPlan(String),
    #[error("unknown currency `{0}`")]
    UnknownCurrency(String),
    #[error(transparent)]
    Price(#[from] price::Error),
}

/// A plan and a quantity priced under it.
#[derive(Debug, Clone)]
pub struct Quote<'c> {
    pub plan: &'c PricePlan,
    pub priced: Priced,
}

/// Prices `quantity` for `tenant` under the plan `choice` picks.
pub fn quote<'c>(
    catalog: &'c Catalog,
    tenant: &str,
    choice: PlanChoice<'_>,
    quantity: Decimal,
) -> Result<Quote<'c>, QuoteError> {
    let found = catalog
        .tenant(tenant)
        .ok_or_else(|| QuoteError::UnknownTenant(tenant.to_owned()))?;
    let plan = match choice {
        PlanChoice::InForce { meter, date } => {
            price::plan_in_force(&found.price_plans, meter, date).ok_or_else(|| {
                QuoteError::NoPlan(format!(
                    "meter `{meter}` of tenant `{tenant}` has no plan in force on {date}"
                ))
            })?
        }
        PlanChoice::Named { id, version } => found
            .price_plans
            .iter()
            .find(|p| p.id == id && p.version == version)
            .ok_or_else(|| {
                QuoteError::NoPlan(format!(
                    "plan `{id}` v{version} of tenant `{tenant}` is not in the catalog"
                ))
            })?,
    };
    let precision = catalog
        .precision(&plan.currency)
        .ok_or_else(|| QuoteError::UnknownCurrency(plan.currency.clone()))?;
    let priced = price::price(plan, quantity, precision)?;
    Ok(Quote { plan, priced })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOG: &str = r#"
[[tenants]]
id = "acme"

[[tenants.meters]]
key = "tokens"
event_type = "llm.tokens"
aggregation = "sum"
value = "$.tokens"
window = "1m"

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
"#;

    fn d(text: &str) -> Decimal {
        neruba_schemas::decimal::parse_exact(text).expect("decimal")
    }

    #[test]
    fn a_named_version_prices_as_it_did_whatever_is_in_force_now() {
        let catalog = Catalog::from_toml_str(CATALOG, "test.toml").expect("catalog");
        let december = time::macros::date!(2026 - 12 - 15);
        let now = quote(
            &catalog,
            "acme",
            PlanChoice::InForce {
                meter: "tokens",
                date: december,
            },
            d("12000"),
        )
        .expect("in force");
        assert_eq!((now.plan.version, now.priced.amount), (2, d("120.00")));
        // 1,000 free, 10,000 units in tier 1 at 0.001, 1,000 in tier 2 at 0.0005: 10.50.
        let named = quote(
            &catalog,
            "acme",
            PlanChoice::Named {
                id: "tokens-usd",
                version: 1,
            },
            d("12000"),
        )
        .expect("named");
        assert_eq!((named.plan.version, named.priced.amount), (1, d("10.50")));
        assert_eq!(named.priced.lines.len(), 2);
    }

    #[test]
    fn a_missing_tenant_plan_or_version_is_said_so() {
        let catalog = Catalog::from_toml_str(CATALOG, "test.toml").expect("catalog");
        let named = |tenant: &str, version: u32| {
            quote(
                &catalog,
                tenant,
                PlanChoice::Named {
                    id: "tokens-usd",
                    version,
                },
                Decimal::ONE,
            )
            .map(|q| q.priced.amount)
        };
        assert!(matches!(
            named("globex", 1),
            Err(QuoteError::UnknownTenant(_))
        ));
        assert!(matches!(named("acme", 3), Err(QuoteError::NoPlan(_))));
        let early = quote(
            &catalog,
            "acme",
            PlanChoice::InForce {
                meter: "tokens",
                date: time::macros::date!(2025 - 06 - 01),
            },
            Decimal::ONE,
        );
        assert!(
            matches!(&early, Err(QuoteError::NoPlan(m)) if m.contains("no plan in force on 2025-06-01"))
        );
    }
}
