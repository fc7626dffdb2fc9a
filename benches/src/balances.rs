//! The balances workload shared by the stage's throughput and state-machine benchmarks:
//! `customers` customers, each with two grants (a small promotional one that burns first and
//! a purchased pack) and 10 usage items plus one adjustment, so the fold consumes, restores
//! and leaves some usage uncovered.

use neruba_balances::book::Book;
use neruba_schemas::credit::{self, Grant, GrantTerms};
use neruba_schemas::event::format_time_ms;
use neruba_schemas::ledger::{Kind, LineItem};
use rust_decimal::Decimal;
use std::collections::BTreeMap;

const HOUR: i64 = 3_600_000;

/// The customer key (`tenant \0 customer`) and the record key (that, `\0`, the record's id) of
/// a ledger record, decoding it as a grant (`is_grant`) or a line item: what the benchmarks'
/// floors store per record.
pub fn record_keys(payload: &[u8], is_grant: bool) -> neruba_schemas::Result<(Vec<u8>, Vec<u8>)> {
    let (tenant, customer, id) = if is_grant {
        let grant: Grant = credit::decode(payload)?;
        (grant.tenant, grant.customer, grant.id)
    } else {
        let item: LineItem = credit::decode(payload)?;
        (item.tenant, item.customer, item.id)
    };
    let mut customer_key = tenant.into_bytes();
    customer_key.push(0);
    customer_key.extend_from_slice(customer.as_bytes());
    let mut record_key = customer_key.clone();
    record_key.push(0);
    record_key.extend_from_slice(id.as_bytes());
    Ok((customer_key, record_key))
}

/// A ledger record: key, payload, and its `neruba-record` header (none for a line item).
#[derive(Debug, Clone)]
pub struct Record {
    pub key: String,
    pub payload: Vec<u8>,
    pub header: Option<&'static str>,
}

/// Records per customer: two grants, 10 usage items and an adjustment.
pub const RECORDS_PER_CUSTOMER: usize = 13;

/// The workload in the order a ledger sees it (every customer's first record, then every
/// customer's second, and so on: windows close for all customers at once, so consecutive
/// line items are different customers'), and the entries the fold makes of it.
///
/// (An order customer by customer would let one stored book absorb a customer's 13 records
/// in a batch, and flatter the stage.)
pub fn workload(customers: usize) -> (Vec<Record>, Vec<Record>) {
    let now = neruba_schemas::event::now_ms();
    let period = now - now % (30 * 24 * HOUR);
    let (mut by_customer, mut entries) = (Vec::new(), Vec::new());
    for c in 0..customers {
        let mut records = Vec::with_capacity(RECORDS_PER_CUSTOMER);
        let customer = format!("customer-{c}");
        let key = format!("acme/{customer}");
        let mut book = Book::default();
        let push = |book_entries: Vec<credit::BalanceEntry>, entries: &mut Vec<Record>| {
            for e in book_entries {
                entries.push(Record {
                    key: key.clone(),
                    payload: credit::encode(&e),
                    header: None,
                });
            }
        };
        for (k, amount, priority) in [("promo", "2.50", 1_u16), ("pack", "20", 10)] {
            let grant = Grant {
                v: 1,
                id: credit::grant_id("acme", &customer, k),
                tenant: "acme".into(),
                customer: customer.clone(),
                key: k.into(),
                terms: GrantTerms {
                    amount: amount.parse().unwrap_or_default(),
                    currency: "USD".into(),
                    priority,
                    effective_at: None,
                    expires_at: None,
                    paid: None,
                    metadata: BTreeMap::new(),
                },
                received_at: format_time_ms(now),
            };
            push(book.apply_grant(&grant, i64::MIN, 0), &mut entries);
            records.push(Record {
                key: key.clone(),
                payload: credit::encode(&grant),
                header: Some("grant"),
            });
        }
        for w in 0..11_i64 {
            let adjustment = w == 10;
            let amount = if adjustment {
                Decimal::new(-150, 2)
            } else {
                Decimal::new(275, 2)
            };
            let window = period + w * 60_000;
            let item = LineItem {
                v: 1,
                id: format!("li_{c}_{w}"),
                kind: if adjustment {
                    Kind::Adjustment
                } else {
                    Kind::Usage
                },
                tenant: "acme".into(),
                customer: customer.clone(),
                meter: "api_calls".into(),
                group: BTreeMap::new(),
                period_start: format_time_ms(period),
                period_end: format_time_ms(period + 30 * 24 * HOUR),
                window_start: format_time_ms(window),
                window_end: format_time_ms(window + 60_000),
                window_quantity: Decimal::ONE,
                window_events: 1,
                period_quantity: Decimal::from(w + 1),
                amount,
                period_amount: amount,
                currency: "USD".into(),
                price_plan: "api-calls".into(),
                price_version: 1,
                revision: 1,
                supersedes: None,
            };
            push(book.apply_item(&item), &mut entries);
            records.push(Record {
                key: key.clone(),
                payload: item.encode(),
                header: None,
            });
        }
        by_customer.push(records);
    }
    let records = (0..RECORDS_PER_CUSTOMER)
        .flat_map(|k| {
            by_customer
                .iter()
                .filter_map(move |records: &Vec<Record>| records.get(k).cloned())
        })
        .collect();
    (records, entries)
}
