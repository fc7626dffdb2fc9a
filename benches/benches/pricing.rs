//! Pricing and rating without IO, per line item.
//!
//! - `price/*`: the pricing engine alone on one period-to-date quantity, per model;
//! - `rate/*`: a whole line item from a rollup (plan lookup, price, delta, id, times), and, as
//!   the raw component in the same run, encoding that item to JSON (what any producer of the
//!   item must do anyway).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use neruba_benches::rating;
use neruba_rater::price::price;
use neruba_rater::rate::{PeriodRecord, rate};
use neruba_schemas::Catalog;
use rust_decimal::Decimal;
use std::hint::black_box;

const MODELS: &str = r#"
[[tenants]]
id = "t"

[[tenants.meters]]
key = "g"
event_type = "e"
aggregation = "count"
window = "1m"

[[tenants.meters]]
key = "v"
event_type = "e"
aggregation = "count"
window = "1m"

[[tenants.meters]]
key = "p"
event_type = "e"
aggregation = "count"
window = "1m"

[[tenants.price_plans]]
id = "graduated"
meter = "g"
version = 1
effective_from = "2026-01-01"
currency = "USD"
included_units = "10000"
model = { type = "graduated", tiers = [
  { up_to = "1000000", unit_price = "0.00002" },
  { up_to = "10000000", unit_price = "0.000015", flat_fee = "1.00" },
  { unit_price = "0.00001" },
] }

[[tenants.price_plans]]
id = "volume"
meter = "v"
version = 2
effective_from = "2026-01-01"
currency = "EUR"
model = { type = "volume", tiers = [
  { up_to = "1000", unit_price = "0.023" },
  { up_to = "50000", unit_price = "0.021", flat_fee = "5.00" },
  { unit_price = "0.019", flat_fee = "25.00" },
] }

[[tenants.price_plans]]
id = "package"
meter = "p"
version = 3
effective_from = "2026-01-01"
currency = "USD"
minimum = "1.00"
model = { type = "package", size = "1000", price = "0.50", rounding = "up" }
"#;

fn pricing(c: &mut Criterion) {
    let catalog = Catalog::from_toml_str(MODELS, "bench").expect("catalog");
    let tenant = catalog.tenant("t").expect("tenant");
    let mut group = c.benchmark_group("price");
    group.throughput(Throughput::Elements(1));
    let quantity = Decimal::new(123_456_789, 1); // 12,345,678.9: every graduated tier used
    for plan in &tenant.price_plans {
        group.bench_function(plan.id.as_str(), |b| {
            b.iter(|| price(black_box(plan), black_box(quantity), 2).expect("priced"))
        });
    }
    group.finish();
}

fn rating(c: &mut Criterion) {
    let catalog = rating::catalog();
    let rollups = rating::rollups(1, 2);
    let second = &rollups[1];
    let items = rating::items(&rollups, &catalog);
    let earlier = PeriodRecord {
        last: items[0].clone(),
    };
    let mut group = c.benchmark_group("rate");
    group.throughput(Throughput::Elements(1));
    group.bench_function("raw_encode_line_item", |b| {
        b.iter(|| black_box(&items[1]).encode())
    });
    group.bench_function("rollup_to_line_item", |b| {
        b.iter(|| rate(black_box(second), &catalog, Some(&earlier), None).expect("rated"))
    });
    group.bench_function("rollup_to_encoded_line_item", |b| {
        b.iter(
            || match rate(black_box(second), &catalog, Some(&earlier), None) {
                Ok(neruba_rater::rate::Rated::Item { item, .. }) => item.encode(),
                _ => Vec::new(),
            },
        )
    });
    group.finish();
}

criterion_group!(benches, pricing, rating);
criterion_main!(benches);
