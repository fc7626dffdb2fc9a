//! Pricing a billing period's quantity under a price plan. Pure functions, no IO.
//!
//! Invariants:
//! - exact decimal arithmetic throughout; the only rounding is the last step, half-up
//!   (away from zero at the midpoint) to the currency's minor unit, on the period-to-date
//!   amount;
//! - the rater emits, at each window, `price(period-to-date) − already emitted`, so the line
//!   items of a period always sum to the price of the period total, whatever the split;
//! - every amount comes with the lines that explain it (tiers, packages, free units,
//!   minimum/maximum, rounding), in the order they were applied.
//!
//! Rules, in order:
//! 0. A negative period total (corrections outweighing usage, on a meter with
//!    `allow_negative`) is priced as a total of zero, with a line saying so: a period never
//!    pays money back through its price; later usage in the period is priced from there.
//! 1. `billable = max(0, quantity − included_units)`.
//! 2. The model prices `billable`:
//!    - `unit`: `billable × unit_price`;
//!    - `graduated`: tier *i* holds the units in `(up_to[i−1], up_to[i]]` (bounds inclusive
//!      above); each tier with units charges `units × unit_price + flat_fee`;
//!    - `volume`: the first tier with `billable ≤ up_to` prices every unit, plus its flat fee;
//!    - `package`: `ceil(billable / size)` (or `floor` with `rounding = "down"`) packages at
//!      `price` each;
//!    - `flat`: the fee, whatever the usage (even none).
//!
//!    With no billable units, `unit`, `graduated`, `volume` and `package` charge nothing (no
//!    tier flat fee either).
//! 3. `minimum` raises the amount of a period that has any usage (`quantity > 0`).
//! 4. `maximum` caps the amount.
//! 5. Round half-up to the currency's precision.

use neruba_schemas::catalog::{PackageRounding, PriceModel, PricePlan, Tier};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;

/// Why a quantity could not be priced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The amount left the exact decimal range.
    #[error("amount overflows the exact decimal range")]
    Overflow,
}

/// Result with the pricing [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A priced quantity and how it was reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Priced {
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    /// Free units subtracted before the model applied.
    #[serde(with = "rust_decimal::serde::str")]
    pub included_units: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub billable: Decimal,
    /// What the model charged, line by line.
    pub lines: Vec<Line>,
    /// Sum of the lines, exact.
    #[serde(with = "rust_decimal::serde::str")]
    pub model_amount: Decimal,
    /// Set when the minimum raised the amount.
    #[serde(with = "rust_decimal::serde::str_option")]
    pub minimum_applied: Option<Decimal>,
    /// Set when the maximum capped the amount.
    #[serde(with = "rust_decimal::serde::str_option")]
    pub maximum_applied: Option<Decimal>,
    /// Before rounding.
    #[serde(with = "rust_decimal::serde::str")]
    pub unrounded: Decimal,
    /// Digits kept.
    pub precision: u32,
    /// The amount charged: `unrounded` rounded half-up to `precision`.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
}

/// One explained step of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line {
    /// Units at one price (`unit` model).
    Units {
        #[serde(with = "rust_decimal::serde::str")]
        units: Decimal,
        #[serde(with = "rust_decimal::serde::str")]
        unit_price: Decimal,
        #[serde(with = "rust_decimal::serde::str")]
        subtotal: Decimal,
    },
    /// The units that fell in one tier (`graduated`), or all units at the tier the total fell
    /// in (`volume`).
    Tier {
        /// 1-based tier number, as a person counts them.
        tier: usize,
        /// Exclusive lower bound of the tier.
        #[serde(with = "rust_decimal::serde::str")]
        above: Decimal,
        /// Inclusive upper bound; absent for the last tier.
        #[serde(with = "rust_decimal::serde::str_option")]
        up_to: Option<Decimal>,
        #[serde(with = "rust_decimal::serde::str")]
        units: Decimal,
        #[serde(with = "rust_decimal::serde::str")]
        unit_price: Decimal,
        #[serde(with = "rust_decimal::serde::str")]
        flat_fee: Decimal,
        #[serde(with = "rust_decimal::serde::str")]
        subtotal: Decimal,
    },
    /// Packages sold (`package`).
    Packages {
        #[serde(with = "rust_decimal::serde::str")]
        units: Decimal,
        #[serde(with = "rust_decimal::serde::str")]
        size: Decimal,
        #[serde(with = "rust_decimal::serde::str")]
        packages: Decimal,
        #[serde(with = "rust_decimal::serde::str")]
        price: Decimal,
        #[serde(with = "rust_decimal::serde::str")]
        subtotal: Decimal,
    },
    /// A fee per period (`flat`).
    Flat {
        #[serde(with = "rust_decimal::serde::str")]
        fee: Decimal,
    },
    /// The period total was negative and is priced as zero (rule 0); charges nothing.
    NegativeTotal {
        #[serde(with = "rust_decimal::serde::str")]
        quantity: Decimal,
    },
}

impl Line {
    fn subtotal(&self) -> Decimal {
        match self {
            Line::Units { subtotal, .. }
            | Line::Tier { subtotal, .. }
            | Line::Packages { subtotal, .. } => *subtotal,
            Line::Flat { fee } => *fee,
            Line::NegativeTotal { .. } => Decimal::ZERO,
        }
    }
}

fn mul(a: Decimal, b: Decimal) -> Result<Decimal> {
    a.checked_mul(b).ok_or(Error::Overflow)
}

fn add(a: Decimal, b: Decimal) -> Result<Decimal> {
    a.checked_add(b).ok_or(Error::Overflow)
}

/// Prices a period-to-date `quantity` under `plan`, rounding to `precision` digits.
pub fn price(plan: &PricePlan, quantity: Decimal, precision: u32) -> Result<Priced> {
    let counted = quantity.max(Decimal::ZERO);
    let billable = (counted - plan.included_units).max(Decimal::ZERO);
    let mut lines = Vec::new();
    if quantity < Decimal::ZERO {
        lines.push(Line::NegativeTotal { quantity });
    }
    lines.extend(model_lines(&plan.model, billable)?);
    let mut model_amount = Decimal::ZERO;
    for line in &lines {
        model_amount = add(model_amount, line.subtotal())?;
    }
    let mut unrounded = model_amount;
    let mut minimum_applied = None;
    if let Some(minimum) = plan.minimum
        && quantity > Decimal::ZERO
        && unrounded < minimum
    {
        unrounded = minimum;
        minimum_applied = Some(minimum);
    }
    let mut maximum_applied = None;
    if let Some(maximum) = plan.maximum
        && unrounded > maximum
    {
        unrounded = maximum;
        maximum_applied = Some(maximum);
    }
    let mut amount =
        unrounded.round_dp_with_strategy(precision, RoundingStrategy::MidpointAwayFromZero);
    // Always written with the currency's digits: 0.00 USD, 5 JPY, 0.130 KWD.
    amount.rescale(precision);
    Ok(Priced {
        quantity,
        included_units: plan.included_units.min(counted),
        billable,
        lines,
        model_amount,
        minimum_applied,
        maximum_applied,
        unrounded,
        precision,
        amount,
    })
}

/// The version of `meter`'s plan in force on `date`: the latest `effective_from` not after it.
pub fn plan_in_force<'a>(
    plans: &'a [PricePlan],
    meter: &str,
    date: time::Date,
) -> Option<&'a PricePlan> {
    plans
        .iter()
        .filter(|p| p.meter == meter && p.effective_from <= date)
        .max_by_key(|p| (p.effective_from, p.version))
}

impl Priced {
    /// The explanation as text, one step per line, for finance and support.
    pub fn explain(&self, plan: &PricePlan) -> String {
        let mut out = format!(
            "plan {} v{} ({}), effective from {}\n",
            plan.id, plan.version, plan.currency, plan.effective_from
        );
        out.push_str(&format!(
            "quantity {}, included units {} -> billable {}\n",
            self.quantity, self.included_units, self.billable
        ));
        for line in &self.lines {
            let text = match line {
                Line::Units {
                    units,
                    unit_price,
                    subtotal,
                } => {
                    format!("  {units} units x {unit_price} = {subtotal}")
                }
                Line::Tier {
                    tier,
                    above,
                    up_to,
                    units,
                    unit_price,
                    flat_fee,
                    subtotal,
                } => {
                    let upper = up_to.map_or_else(|| "inf)".to_owned(), |u| format!("{u}]"));
                    format!(
                        "  tier {tier} ({above}, {upper}: {units} units x {unit_price} + flat fee {flat_fee} = {subtotal}"
                    )
                }
                Line::Packages {
                    units,
                    size,
                    packages,
                    price,
                    subtotal,
                } => {
                    format!(
                        "  {units} units in packages of {size}: {packages} packages x {price} = {subtotal}"
                    )
                }
                Line::Flat { fee } => format!("  flat fee per period = {fee}"),
                Line::NegativeTotal { quantity } => {
                    format!("  the period total {quantity} is negative: priced as a total of zero")
                }
            };
            out.push_str(&text);
            out.push('\n');
        }
        out.push_str(&format!("model amount {}\n", self.model_amount));
        if let Some(minimum) = self.minimum_applied {
            out.push_str(&format!("minimum {minimum} applied\n"));
        }
        if let Some(maximum) = self.maximum_applied {
            out.push_str(&format!("maximum {maximum} applied\n"));
        }
        out.push_str(&format!(
            "{} rounded half-up to {} decimals = {} {}\n",
            self.unrounded, self.precision, self.amount, plan.currency
        ));
        out
    }
}

fn model_lines(model: &PriceModel, billable: Decimal) -> Result<Vec<Line>> {
    let nothing = billable.is_zero();
    Ok(match model {
        PriceModel::Flat { fee } => vec![Line::Flat { fee: *fee }],
        _ if nothing => Vec::new(),
        PriceModel::Unit { unit_price } => vec![Line::Units {
            units: billable,
            unit_price: *unit_price,
            subtotal: mul(billable, *unit_price)?,
        }],
        PriceModel::Graduated { tiers } => graduated(tiers, billable)?,
        PriceModel::Volume { tiers } => volume(tiers, billable)?,
        PriceModel::Package {
            size,
            price,
            rounding,
        } => {
            let whole = whole_packages(billable, *size)?;
            let packages = match rounding {
                PackageRounding::Up if whole.1 => add(whole.0, Decimal::ONE)?,
                PackageRounding::Up | PackageRounding::Down => whole.0,
            };
            vec![Line::Packages {
                units: billable,
                size: *size,
                packages,
                price: *price,
                subtotal: mul(packages, *price)?,
            }]
        }
    })
}

/// How many whole packages of `size` `billable` holds, and whether any is left over, exactly.
///
/// `billable / size` is rounded to rust_decimal's 28 places, so a quotient just above or below
/// a whole number could read as that number (6.0000000000000000000000000001 / 3 gave 2, whose
/// `ceil` billed 2 packages for what needs 3; 5.9999999999999999999999999999 / 3 gave 2
/// under `floor`, for what holds 1). The quotient's floor is only a guess here, corrected by
/// the remainder, computed exactly or refused (`Overflow`, as a quotient too large is): a
/// product of a whole number and `size` that kept every place of `size`, and a difference
/// that kept every digit.
fn whole_packages(billable: Decimal, size: Decimal) -> Result<(Decimal, bool)> {
    // Trailing zeros dropped: a product past 96 bits drops them too, exactly, which the scale
    // check below would take for rounding.
    let size = size.normalize();
    let mut whole = billable.checked_div(size).ok_or(Error::Overflow)?.floor();
    // The rounded quotient keeps 29 significant digits, so it is within 1 of the exact one:
    // one step either way, then the check that ends the loop.
    for _ in 0..3 {
        let product = mul(whole, size)?;
        if product.scale() < size.scale() {
            // Past 96 bits the product was rounded.
            return Err(Error::Overflow);
        }
        let rest = neruba_schemas::decimal::exact_add(billable, -product).ok_or(Error::Overflow)?;
        if rest < Decimal::ZERO {
            whole = whole.checked_sub(Decimal::ONE).ok_or(Error::Overflow)?;
        } else if rest >= size {
            whole = add(whole, Decimal::ONE)?;
        } else {
            return Ok((whole, !rest.is_zero()));
        }
    }
    Err(Error::Overflow)
}

fn graduated(tiers: &[Tier], billable: Decimal) -> Result<Vec<Line>> {
    let mut lines = Vec::new();
    let mut above = Decimal::ZERO;
    for (i, tier) in tiers.iter().enumerate() {
        if billable <= above {
            break;
        }
        let top = tier.up_to.map_or(billable, |up_to| up_to.min(billable));
        let units = top - above;
        let subtotal = add(mul(units, tier.unit_price)?, tier.flat_fee)?;
        lines.push(Line::Tier {
            tier: i + 1,
            above,
            up_to: tier.up_to,
            units,
            unit_price: tier.unit_price,
            flat_fee: tier.flat_fee,
            subtotal,
        });
        match tier.up_to {
            Some(up_to) => above = up_to,
            None => break,
        }
    }
    Ok(lines)
}

fn volume(tiers: &[Tier], billable: Decimal) -> Result<Vec<Line>> {
    let mut above = Decimal::ZERO;
    for (i, tier) in tiers.iter().enumerate() {
        if tier.up_to.is_none_or(|up_to| billable <= up_to) {
            return Ok(vec![Line::Tier {
                tier: i + 1,
                above,
                up_to: tier.up_to,
                units: billable,
                unit_price: tier.unit_price,
                flat_fee: tier.flat_fee,
                subtotal: add(mul(billable, tier.unit_price)?, tier.flat_fee)?,
            }]);
        }
        above = tier.up_to.unwrap_or(above);
    }
    // The catalog guarantees an unbounded last tier; without one, nothing is charged.
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use neruba_schemas::Catalog;
    use proptest::prelude::*;

    fn d(text: &str) -> Decimal {
        neruba_schemas::decimal::parse_exact(text).unwrap_or_default()
    }

    /// A plan from a TOML `model = ...` line plus optional extra fields.
    fn plan(model: &str, extra: &str, currency: &str) -> PricePlan {
        let text = format!(
            r#"
[[tenants]]
id = "t"
[[tenants.meters]]
key = "m"
event_type = "e"
aggregation = "count"
window = "1m"
[[tenants.price_plans]]
id = "p"
meter = "m"
version = 1
effective_from = "2026-01-01"
currency = "{currency}"
model = {model}
{extra}
"#
        );
        let catalog = Catalog::from_toml_str(&text, "test").unwrap_or_else(|e| panic!("{e}"));
        catalog.tenants()[0].price_plans[0].clone()
    }

    fn amount(plan: &PricePlan, quantity: &str, precision: u32) -> Decimal {
        price(plan, d(quantity), precision)
            .map(|p| p.amount)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    const GRADUATED: &str = r#"{ type = "graduated", tiers = [ { up_to = "100", unit_price = "0.10" }, { up_to = "1000", unit_price = "0.05", flat_fee = "2" }, { unit_price = "0.01" } ] }"#;
    const VOLUME: &str = r#"{ type = "volume", tiers = [ { up_to = "100", unit_price = "0.10" }, { up_to = "1000", unit_price = "0.05", flat_fee = "2" }, { unit_price = "0.01" } ] }"#;

    #[test]
    fn a_negative_period_total_is_priced_as_zero_and_says_so() {
        // Before: refused (`unpriceable_quantity`), so the period was never billed.
        let p = plan(GRADUATED, "minimum = \"5\"", "USD");
        let priced = price(&p, d("-3.5"), 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(priced.amount, d("0.00"));
        assert_eq!(priced.billable, d("0"));
        assert_eq!(priced.included_units, d("0"));
        assert_eq!(priced.minimum_applied, None);
        assert_eq!(
            priced.lines,
            vec![Line::NegativeTotal {
                quantity: d("-3.5")
            }]
        );
        assert!(
            priced
                .explain(&p)
                .contains("the period total -3.5 is negative: priced as a total of zero")
        );
        // A flat fee is charged as for a period with no usage.
        let flat = plan(r#"{ type = "flat", fee = "9.99" }"#, "", "USD");
        assert_eq!(amount(&flat, "-1", 2), d("9.99"));
    }

    #[test]
    fn graduated_prices_each_tier_on_its_own_units_at_under_and_over_each_boundary() {
        let p = plan(GRADUATED, "", "USD");
        assert_eq!(amount(&p, "0", 2), d("0"));
        assert_eq!(amount(&p, "99", 2), d("9.90"));
        assert_eq!(amount(&p, "100", 2), d("10.00"));
        // 100 × 0.10 + 1 × 0.05 + 2 (tier 2 fee, first unit in it).
        assert_eq!(amount(&p, "101", 2), d("12.05"));
        // 100 × 0.10 + 899 × 0.05 + 2.
        assert_eq!(amount(&p, "999", 2), d("56.95"));
        assert_eq!(amount(&p, "1000", 2), d("57.00"));
        // Tier 3 has no flat fee: one more unit at 0.01.
        assert_eq!(amount(&p, "1001", 2), d("57.01"));
    }

    #[test]
    fn volume_prices_all_units_at_the_tier_the_total_falls_in() {
        let p = plan(VOLUME, "", "USD");
        assert_eq!(amount(&p, "0", 2), d("0"));
        assert_eq!(amount(&p, "99", 2), d("9.90"));
        assert_eq!(amount(&p, "100", 2), d("10.00"));
        assert_eq!(amount(&p, "101", 2), d("7.05"));
        // 999 × 0.05 + 2.
        assert_eq!(amount(&p, "999", 2), d("51.95"));
        assert_eq!(amount(&p, "1000", 2), d("52.00"));
        assert_eq!(amount(&p, "1001", 2), d("10.01"));
    }

    #[test]
    fn package_rounds_partial_packages_up_or_down() {
        let up = plan(
            r#"{ type = "package", size = "1000", price = "0.50" }"#,
            "",
            "USD",
        );
        assert_eq!(amount(&up, "0", 2), d("0"));
        assert_eq!(amount(&up, "1", 2), d("0.50"));
        assert_eq!(amount(&up, "1000", 2), d("0.50"));
        assert_eq!(amount(&up, "1001", 2), d("1.00"));
        let down = plan(
            r#"{ type = "package", size = "1000", price = "0.50", rounding = "down" }"#,
            "",
            "USD",
        );
        assert_eq!(amount(&down, "999", 2), d("0"));
        assert_eq!(amount(&down, "1999", 2), d("0.50"));
    }

    #[test]
    fn a_quantity_a_hair_past_or_short_of_whole_packages_counts_them_exactly() {
        // Was: the quotient, rounded to 28 places, read as a whole number: 2 packages up for
        // what needs 3, and 2 down for what holds 1.
        let up = plan(
            r#"{ type = "package", size = "3", price = "1" }"#,
            "",
            "USD",
        );
        assert_eq!(amount(&up, "6.0000000000000000000000000001", 2), d("3"));
        assert_eq!(amount(&up, "6", 2), d("2"));
        assert_eq!(amount(&up, "5.9999999999999999999999999999", 2), d("2"));
        let down = plan(
            r#"{ type = "package", size = "3", price = "1", rounding = "down" }"#,
            "",
            "USD",
        );
        assert_eq!(amount(&down, "5.9999999999999999999999999999", 2), d("1"));
        assert_eq!(amount(&down, "6", 2), d("2"));
        assert_eq!(amount(&down, "6.0000000000000000000000000001", 2), d("2"));
        // Sizes that are not whole numbers, and large counts.
        let fractional = plan(
            r#"{ type = "package", size = "0.3", price = "1" }"#,
            "",
            "USD",
        );
        assert_eq!(amount(&fractional, "0.9", 2), d("3"));
        assert_eq!(amount(&fractional, "0.9000000000001", 2), d("4"));
        assert_eq!(
            amount(&fractional, "300000000000000000.1", 2),
            d("1000000000000000001")
        );
    }

    #[test]
    fn flat_fee_is_charged_even_without_usage() {
        let p = plan(r#"{ type = "flat", fee = "49" }"#, "", "EUR");
        assert_eq!(amount(&p, "0", 2), d("49"));
        assert_eq!(amount(&p, "123456", 2), d("49"));
    }

    #[test]
    fn free_units_minimum_and_maximum() {
        let unit = r#"{ type = "unit", unit_price = "0.002" }"#;
        let free = plan(unit, "included_units = \"1000\"", "USD");
        assert_eq!(
            amount(&free, "500", 2),
            d("0"),
            "free units larger than usage"
        );
        assert_eq!(amount(&free, "1500", 2), d("1.00"));
        let bounded = plan(unit, "minimum = \"5\"\nmaximum = \"20\"", "USD");
        assert_eq!(amount(&bounded, "0", 2), d("0"), "no usage, no minimum");
        let raised = price(&bounded, d("10"), 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (raised.amount, raised.minimum_applied),
            (d("5"), Some(d("5")))
        );
        assert_eq!(amount(&bounded, "5000", 2), d("10"));
        let capped = price(&bounded, d("20000"), 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (capped.amount, capped.maximum_applied),
            (d("20"), Some(d("20")))
        );
    }

    #[test]
    fn rounding_is_half_up_to_zero_two_and_three_minor_units() {
        let p = plan(r#"{ type = "unit", unit_price = "0.0125" }"#, "", "USD");
        // 0.0125 × 100 = 1.25 → JPY (0 digits): 1; 0.0125 × 20 = 0.25.
        assert_eq!(amount(&p, "20", 0), d("0"));
        assert_eq!(amount(&p, "40", 0), d("1"), "0.5 rounds up");
        assert_eq!(amount(&p, "1", 2), d("0.01"), "0.0125 → 0.01");
        assert_eq!(
            amount(&p, "2", 2),
            d("0.03"),
            "0.025 → 0.03, not banker's 0.02"
        );
        assert_eq!(amount(&p, "1", 3), d("0.013"), "0.0125 → 0.013");
    }

    #[test]
    fn explanation_lists_every_tier_used() {
        let p = plan(GRADUATED, "included_units = \"50\"", "USD");
        let priced = price(&p, d("1250"), 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(priced.billable, d("1200"));
        let tiers: Vec<(Decimal, Decimal)> = priced
            .lines
            .iter()
            .filter_map(|l| match l {
                Line::Tier {
                    units, subtotal, ..
                } => Some((*units, *subtotal)),
                _ => None,
            })
            .collect();
        assert_eq!(
            tiers,
            vec![
                (d("100"), d("10.00")),
                (d("900"), d("47.00")),
                (d("200"), d("2.00"))
            ]
        );
        assert_eq!(priced.amount, d("59.00"));
    }

    fn models() -> Vec<PricePlan> {
        vec![
            plan(GRADUATED, "included_units = \"10\"\nminimum = \"3\"", "USD"),
            plan(VOLUME, "maximum = \"40\"", "EUR"),
            plan(
                r#"{ type = "package", size = "7", price = "0.35" }"#,
                "",
                "KWD",
            ),
            plan(r#"{ type = "unit", unit_price = "0.0003" }"#, "", "JPY"),
            plan(r#"{ type = "flat", fee = "12.5" }"#, "", "USD"),
        ]
    }

    proptest! {
        #[test]
        fn deltas_over_any_split_of_a_period_sum_to_the_price_of_the_total(
            parts in prop::collection::vec((0u32..50_000, 0u32..4), 1..30),
            which in 0usize..5,
        ) {
            let plan = &models()[which];
            let precision = match plan.currency.as_str() { "JPY" => 0, "KWD" => 3, _ => 2 };
            let mut period_to_date = Decimal::ZERO;
            let mut emitted = Decimal::ZERO;
            let mut sum_of_deltas = Decimal::ZERO;
            for (units, scale) in parts {
                period_to_date += Decimal::new(i64::from(units), scale);
                let now = price(plan, period_to_date, precision).map(|p| p.amount).unwrap_or_default();
                sum_of_deltas += now - emitted;
                emitted = now;
            }
            let total = price(plan, period_to_date, precision).map(|p| p.amount).unwrap_or_default();
            prop_assert_eq!(sum_of_deltas, total);
            // Every amount is already rounded to the currency.
            prop_assert_eq!(total, total.round_dp(precision));
            prop_assert_eq!(total.scale(), precision);
        }
    }
}
