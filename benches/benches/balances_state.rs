//! The balances stage's state machine alone, no broker: where a worker's CPU goes per ledger
//! record, without the noise of a Kafka round trip or of a broker sharing the process.
//!
//! The workload of `balances_throughput` (`NERUBA_BENCH_CUSTOMERS`, default 10,000 customers:
//! two grants, 10 usage items and an adjustment each), in ledger order (every customer's
//! grants, then every customer's first window's item, and so on), applied to one partition's
//! state in batches of 5,000 records, as the stage does:
//! - `apply`: decode, the applied-item check, the book read, the fold, entry ids;
//! - `encode`: the entries as the stage sends them (JSON);
//! - `write`: the batch's atomic RocksDB write (books, applied-item marks, offsets).
//!
//! Raw components on the same payloads in the same run: decoding each record alone (what any
//! consumer of the ledger must do) and one RocksDB put per record id in a write batch per 5,000
//! (the least a durable dedup of line items costs), and that plus reading and rewriting a
//! per-customer value as large as the workload's stored book (the least any stage that keeps
//! per-customer state durably costs). Best of `NERUBA_BENCH_ROUNDS` (default 3) rounds, each on
//! fresh state.

// Rates in the report are floating point; no quantity or amount is.
#![allow(clippy::float_arithmetic)]

use anyhow::Result;
// The allocator the `neruba` binary runs with.
use neruba as _;
use neruba_balances::state::{Output, PartitionState, Record as Kind, store_options};
use neruba_benches::balances::{Floor, Record, first_book, workload};
use neruba_benches::{peak_rss_kib, rate};
use neruba_schemas::credit::{self, Grant};
use neruba_schemas::ledger::LineItem;
use neruba_stage::Partition as _;
use neruba_stage::{Input, Store};
use std::time::{Duration, Instant};

const BATCH: usize = 5_000;

#[derive(Default, Clone, Copy)]
struct Phases {
    apply: Duration,
    encode: Duration,
    write: Duration,
    entries: usize,
}

impl Phases {
    fn total(&self) -> Duration {
        self.apply + self.encode + self.write
    }
}

/// One round on fresh state: every record applied, batch by batch.
fn round(records: &[&Record]) -> Result<Phases> {
    let dir = tempfile::tempdir()?;
    let cache = rocksdb::Cache::new_lru_cache(64 << 20);
    let store = Store::open(dir.path(), 0, &store_options(), &cache)?;
    let mut state = PartitionState::from_store(store, 0, 3 * 86_400_000)?;
    let mut phases = Phases::default();
    let mut offset = 0_i64;
    for batch in records.chunks(BATCH) {
        let started = Instant::now();
        for record in batch {
            let input = Input {
                offset,
                key: Some(record.key.as_bytes()),
                payload: &record.payload,
            };
            state.apply(input, Kind::of(record.header.map(str::as_bytes)))?;
            offset += 1;
        }
        let applied = Instant::now();
        let mut bytes = 0_usize;
        for output in state.take_outputs() {
            if let Output::Entry(entry) = output {
                bytes += std::hint::black_box(credit::encode(entry.as_ref())).len();
                phases.entries += 1;
            }
        }
        std::hint::black_box(bytes);
        let encoded = Instant::now();
        state.commit()?;
        phases.apply += applied - started;
        phases.encode += encoded - applied;
        phases.write += encoded.elapsed();
    }
    Ok(phases)
}

/// Decoding each record alone.
fn decode_only(records: &[&Record]) -> Result<Duration> {
    let started = Instant::now();
    for record in records {
        if record.header.is_some() {
            std::hint::black_box(credit::decode::<Grant>(&record.payload)?);
        } else {
            std::hint::black_box(credit::decode::<LineItem>(&record.payload)?);
        }
    }
    Ok(started.elapsed())
}

/// Every record through `floor`, a write per `BATCH`.
fn through(records: &[&Record], mut floor: Floor) -> Result<Duration> {
    let started = Instant::now();
    for batch in records.chunks(BATCH) {
        for record in batch {
            floor.record(&record.payload, record.header.is_some())?;
        }
        floor.write()?;
    }
    Ok(started.elapsed())
}

fn per_record(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn main() -> Result<()> {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let customers = env("NERUBA_BENCH_CUSTOMERS", 10_000);
    let rounds = env("NERUBA_BENCH_ROUNDS", 3).max(1);
    let (ledger, _) = workload(customers);
    let records: Vec<&Record> = ledger.iter().collect();
    let n = records.len();
    let book = first_book(&ledger, customers)?;
    println!(
        "one customer's book after its records: {} bytes as stored ({} as JSON)",
        book.encode()?.len(),
        serde_json::to_vec(&book)?.len()
    );
    if std::env::var_os("NERUBA_BENCH_SHOW_BOOK").is_some() {
        println!("{}", serde_json::to_string_pretty(&book)?);
    }
    println!("{n} ledger records ({customers} customers), batches of {BATCH}, best of {rounds}");

    let mut best: Option<Phases> = None;
    let state_bytes = book.encode()?.len();
    let (mut decode, mut put, mut rewrite) = (Duration::MAX, Duration::MAX, Duration::MAX);
    for _ in 0..rounds {
        decode = decode.min(decode_only(&records)?);
        put = put.min(through(&records, Floor::ids()?)?);
        rewrite = rewrite.min(through(&records, Floor::state(state_bytes)?)?);
        let phases = round(&records)?;
        if best.is_none_or(|b| phases.total() < b.total()) {
            best = Some(phases);
        }
    }
    let Some(best) = best else {
        anyhow::bail!("no round ran");
    };
    let total = best.total();
    println!(
        "state machine: {n} records → {} entries in {total:.2?} = {:.0} records/s, {:.2} µs per record",
        best.entries,
        rate(n, total),
        per_record(total, n)
    );
    for (name, d) in [
        ("apply (decode, check, fold, ids)", best.apply),
        ("encode entries", best.encode),
        ("write the batch", best.write),
    ] {
        println!("  {name:<34} {:.2} µs per record", per_record(d, n));
    }
    println!(
        "raw: decode alone {:.0} records/s ({:.2} µs); decode + id put {:.0} records/s ({:.2} µs)",
        rate(n, decode),
        per_record(decode, n),
        rate(n, put),
        per_record(put, n)
    );
    println!(
        "raw: decode + read and rewrite a {state_bytes}-byte state per customer + id mark: {:.0} records/s ({:.2} µs)",
        rate(n, rewrite),
        per_record(rewrite, n)
    );
    println!(
        "ratio state machine / decode + id put: {:.2}; / decode + state rewrite: {:.2}",
        put.as_secs_f64() / total.as_secs_f64(),
        rewrite.as_secs_f64() / total.as_secs_f64()
    );
    println!("peak RSS of the process: {} MiB", peak_rss_kib() / 1024);
    Ok(())
}
