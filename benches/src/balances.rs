//! The balances workload shared by the stage's throughput and state-machine benchmarks:
//! `customers` customers, each with two grants (a small promotional one that burns first and
//! a purchased pack) and 10 usage items plus one adjustment, so the fold consumes, restores
//! and leaves some usage uncovered.

use neruba_balances::book::Book;
use neruba_schemas::credit::{self, Grant, GrantTerms};
use neruba_schemas::event::format_time_ms;
use neruba_schemas::ledger::{Kind, LineItem};
use rust_decimal::Decimal;
use std::collections::{BTreeMap, BTreeSet, HashMap};

const HOUR: i64 = 3_600_000;

/// The customer key (`tenant \0 customer`) and the record key (that, `\0`, the record's id) of
/// a ledger record, decoding it as a grant (`is_grant`) or a line item: what the benchmarks'
/// floors store per record.
fn record_keys(payload: &[u8], is_grant: bool) -> neruba_schemas::Result<(Vec<u8>, Vec<u8>)> {
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

/// A floor a balances stage is measured against: what any stage that dedups line items
/// durably ([`Floor::ids`]), or that also keeps each customer's state durably
/// ([`Floor::state`]), pays per ledger record, whatever its fold. Each record is decoded and its
/// id marked; with state, its customer's value (as large as a stored book, kept in memory
/// between batches as the stage keeps its books, read from RocksDB the first time) is changed
/// too. Each [`Floor::write`] writes the batch's marks and every value it touched in one atomic
/// RocksDB write (WAL on).
pub struct Floor {
    db: rocksdb::DB,
    /// The size of a customer's value; `None`: ids only.
    state_bytes: Option<usize>,
    values: HashMap<Vec<u8>, Vec<u8>>,
    batch: rocksdb::WriteBatch,
    touched: BTreeSet<Vec<u8>>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Floor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Floor")
            .field("state_bytes", &self.state_bytes)
            .field("customers", &self.values.len())
            .finish_non_exhaustive()
    }
}

impl Floor {
    /// The durable floor: each record's id marked, no per-customer state.
    pub fn ids() -> anyhow::Result<Self> {
        Self::open(None)
    }

    /// The per-customer state floor, with values `state_bytes` long.
    pub fn state(state_bytes: usize) -> anyhow::Result<Self> {
        Self::open(Some(state_bytes))
    }

    fn open(state_bytes: Option<usize>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        Ok(Self {
            db: rocksdb::DB::open_default(dir.path())?,
            state_bytes,
            values: HashMap::new(),
            batch: rocksdb::WriteBatch::default(),
            touched: BTreeSet::new(),
            _dir: dir,
        })
    }

    /// Decodes a record (a grant if `is_grant`, else a line item), marks its id and, with
    /// state, changes its customer's value.
    pub fn record(&mut self, payload: &[u8], is_grant: bool) -> anyhow::Result<()> {
        let (key, mark) = record_keys(payload, is_grant)?;
        self.batch.put(mark, []);
        let Some(state_bytes) = self.state_bytes else {
            return Ok(());
        };
        if !self.values.contains_key(&key) {
            let stored = self.db.get(&key)?.unwrap_or_else(|| vec![0; state_bytes]);
            self.values.insert(key.clone(), stored);
        }
        if let Some(first) = self.values.get_mut(&key).and_then(|v| v.first_mut()) {
            *first = first.wrapping_add(1);
        }
        self.touched.insert(key);
        Ok(())
    }

    /// Writes the batch: the record marks and the touched values, atomically.
    pub fn write(&mut self) -> anyhow::Result<()> {
        let mut batch = std::mem::take(&mut self.batch);
        for key in std::mem::take(&mut self.touched) {
            if let Some(value) = self.values.get(&key) {
                batch.put(&key, value);
            }
        }
        self.db.write(batch)?;
        Ok(())
    }
}

/// The first customer's book after all its records, from [`workload`]'s records for
/// `customers` customers: how large a stored book is.
pub fn first_book(records: &[Record], customers: usize) -> neruba_schemas::Result<Book> {
    let mut book = Book::default();
    for record in records.iter().step_by(customers.max(1)) {
        if record.header.is_some() {
            book.apply_grant(&credit::decode::<Grant>(&record.payload)?, i64::MIN, 0);
        } else {
            book.apply_item(&credit::decode::<LineItem>(&record.payload)?);
        }
    }
    Ok(book)
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
