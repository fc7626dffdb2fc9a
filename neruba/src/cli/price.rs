//! `neruba price`: price a quantity under a meter's plan and explain every step.

use super::{load_catalog, parse_day};
use anyhow::{Context, Result};
use clap::Args;
use neruba::sample;
use neruba_rater::quote::{PlanChoice, Quote, quote};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub(crate) struct PriceArgs {
    /// Catalog file; the built-in sample catalog when absent.
    #[arg(long, env = "NERUBA_CATALOG")]
    pub(crate) catalog: Option<PathBuf>,
    /// Tenant id.
    #[arg(long, env = "NERUBA_TENANT")]
    pub(crate) tenant: String,
    /// Meter key.
    #[arg(long, env = "NERUBA_METER")]
    pub(crate) meter: String,
    /// Period-to-date quantity, an exact decimal.
    #[arg(long, env = "NERUBA_QUANTITY")]
    pub(crate) quantity: String,
    /// Day whose plan version applies, `YYYY-MM-DD`; today (UTC) when absent.
    #[arg(long, env = "NERUBA_DATE")]
    pub(crate) date: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, env = "NERUBA_JSON")]
    pub(crate) json: bool,
}

/// Prices the quantity and prints the explanation.
pub(crate) fn run(args: &PriceArgs) -> Result<()> {
    let catalog = match &args.catalog {
        Some(path) => load_catalog(path)?,
        None => sample::catalog()?,
    };
    let quantity = neruba_schemas::decimal::parse_exact(&args.quantity)
        .with_context(|| format!("`{}` is not an exact decimal quantity", args.quantity))?;
    let date = match &args.date {
        Some(text) => parse_day(text)?,
        None => time::OffsetDateTime::now_utc().date(),
    };
    let choice = PlanChoice::InForce {
        meter: &args.meter,
        date,
    };
    let Quote { plan, priced } = quote(&catalog, &args.tenant, choice, quantity)?;
    if args.json {
        let out = serde_json::json!({
            "tenant": args.tenant, "meter": args.meter, "plan": plan.id, "plan_version": plan.version,
            "currency": plan.currency, "effective_from": plan.effective_from.to_string(), "price": priced,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", priced.explain(plan));
    }
    Ok(())
}
