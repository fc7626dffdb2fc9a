//! The balances stage's state machine alone, no broker: where a worker's CPU goes per ledger
//! record, without the noise of a Kafka round trip or of a broker sharing the process.
//!
//! The workload of `balances_throughput` (`NERUBA_BENCH_CUSTOMERS`, default 10,000 customers:
//! two grants, 10 usage items and an adjustment each), in ledger order (every customer's
//! grants, then every customer's first window's item, and so on), applied to one partition's
//! state in batches (`NERUBA_BENCH_MAX_BATCH` records, default 5,000; the stage's bound is
//! 50,000), as the stage does:
//! - `apply`: decode, the applied-item check, the book read, the fold, entry ids;
//! - `encode`: the entries as the stage sends them (JSON);
//! - `write`: the batch's atomic RocksDB write (books, applied-item marks, offsets).
//!
//! Raw components on the same payloads in the same run: decoding each record alone (what any
//! consumer of the ledger must do) and one RocksDB put per record id in a write batch per batch
//! (the least a durable dedup of line items costs), and that plus reading and rewriting a
//! per-customer value as large as the workload's stored book (the least any stage that keeps
//! per-customer state durably costs). Best of `NERUBA_BENCH_ROUNDS` (default 3) rounds, each on
//! fresh state.
//!
//! Then what one customer's grants can cost: a customer holding 2 and one at the bound of
//! grants holding credit (`MAX_CREDIT_GRANTS`), `NERUBA_BENCH_BOUND_ITEMS` (default 2,000) items
//! each written alone, and one holding as many bytes of keys and metadata as the bound lets
//! it; the stored book of a customer after `NERUBA_BENCH_TOPUPS` (default 1,000) top-ups each
//! used up, against a book that keeps every grant, and a read of it as a balance read takes it
//! and with every grant put back (as the grants list read it before it read a page at a time;
//! `api_reads` measures its pages); and a customer with a new group value in
//! every item, for each count of groups in `NERUBA_BENCH_GROUPS` (default `1000,10000`).
//!
//! Last, the period's end: after the workload, one tick turns every customer's statement draft
//! and final, applied within the books' default bound (in parts, as the stage does) and with
//! no bound (every customer's book at once, as the stage did before December 1), each on
//! fresh state: its time, its parts, the books held at most, and how far the process's RSS
//! rose over its RSS before the tick.

// Rates in the report are floating point; no quantity or amount is.
#![allow(clippy::float_arithmetic)]

use anyhow::Result;
// The allocator the `neruba` binary runs with.
use neruba as _;
use neruba_balances::state::{
    BOOKS_HELD_BYTES, BOOKS_KEPT_BYTES, BooksHeld, Output, PartitionState, Parts, Record as Kind,
    store_options,
};
use neruba_benches::balances::{Floor, Record, first_book, workload};
use neruba_benches::{env_usize, peak_rss_kib, rate, reset_peak_rss, rss_kib};
use neruba_schemas::credit::{self, Grant};
use neruba_schemas::ledger::LineItem;
use neruba_stage::Partition as _;
use neruba_stage::{Input, Store};
use std::time::{Duration, Instant};

/// Records per batch: `NERUBA_BENCH_MAX_BATCH`, default 5,000 (the stage's batches reach its
/// bound, 50,000, only when that much is queued; its end-to-end bench saw about 26,000).
fn batch_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| env_usize("NERUBA_BENCH_MAX_BATCH", 5_000).max(1))
}

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

/// Applies `batch` to `state`, its records at `offset` on (which it advances), as the stage
/// does.
fn apply_batch(state: &mut PartitionState, batch: &[&Record], offset: &mut i64) -> Result<()> {
    for record in batch {
        let input = Input {
            offset: *offset,
            key: Some(record.key.as_bytes()),
            payload: &record.payload,
        };
        state.apply(input, Kind::of(record.header.map(str::as_bytes)))?;
        *offset += 1;
    }
    Ok(())
}

/// One round on fresh state: every record applied, batch by batch.
fn round(records: &[&Record]) -> Result<Phases> {
    let dir = tempfile::tempdir()?;
    let cache = rocksdb::Cache::new_lru_cache(64 << 20);
    let store = Store::open(dir.path(), 0, &store_options(), &cache)?;
    let mut state = PartitionState::from_store(store, 0, 3 * 86_400_000)?;
    let mut phases = Phases::default();
    let mut offset = 0_i64;
    for batch in records.chunks(batch_size()) {
        let started = Instant::now();
        apply_batch(&mut state, batch, &mut offset)?;
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

/// What a tick at a period's end cost ([`period_end_tick`]).
struct TickRun {
    took: Duration,
    parts: usize,
    entries: usize,
    /// The most bytes of books held decoded during the tick, by the stage's estimate.
    held: usize,
    /// How far the process's RSS rose during the tick over its RSS before it, KiB.
    rss_rise_kib: u64,
}

/// `records` applied to fresh state in batches of [`batch_size`] with the books bounded by
/// `held_bound`, then a tick at `at_ms`, applied again and written after each part until done
/// (as the stage's runtime does).
fn period_end_tick(records: &[&Record], held_bound: usize, at_ms: i64) -> Result<TickRun> {
    let dir = tempfile::tempdir()?;
    let cache = rocksdb::Cache::new_lru_cache(64 << 20);
    let store = Store::open(dir.path(), 0, &store_options(), &cache)?;
    let held = BooksHeld::default();
    let mut state = PartitionState::from_store(store, 0, 3 * 86_400_000)?.with_books_held(
        held.clone(),
        held_bound,
        BOOKS_KEPT_BYTES,
    );
    let mut offset = 0_i64;
    for batch in records.chunks(batch_size()) {
        apply_batch(&mut state, batch, &mut offset)?;
        drop(state.take_outputs());
        state.commit()?;
    }
    let tick = credit::encode(&credit::Tick {
        v: 1,
        at_ms,
        finalize_after_ms: None,
    });
    let started = Instant::now();
    while held.freeing_bytes() > 0 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let before = rss_kib();
    // Where the peak cannot be reset, the rise reads as the process's peak so far.
    if let Err(e) = reset_peak_rss() {
        eprintln!("cannot reset the peak RSS ({e}): the RSS rise below is an upper bound");
    }
    held.take_peak();
    let started = Instant::now();
    let (mut parts, mut entries) = (0, 0);
    loop {
        let input = Input {
            offset,
            key: None,
            payload: &tick,
        };
        state.apply(input, Kind::Tick)?;
        parts += 1;
        let again = state.apply_again();
        entries += state
            .take_outputs()
            .iter()
            .filter(|o| matches!(o, Output::Entry(_)))
            .count();
        state.commit()?;
        if !again {
            break;
        }
    }
    Ok(TickRun {
        took: started.elapsed(),
        parts,
        entries,
        held: held.take_peak(),
        rss_rise_kib: peak_rss_kib().saturating_sub(before),
    })
}

/// A grant of `customer` in the form the gateway writes (record version 3, bounded), with a
/// key and metadata of a typical size.
fn grant_of(customer: &str, key: &str, amount: &str) -> Result<Grant> {
    grant_with(customer, key, amount, 10, false)
}

/// [`grant_of`] with `priority`, and with `heavy`, the most metadata a grant may carry (32
/// entries of 512-byte names and values: 32 KiB).
fn grant_with(
    customer: &str,
    key: &str,
    amount: &str,
    priority: u16,
    heavy: bool,
) -> Result<Grant> {
    let metadata = if heavy {
        (0..credit::MAX_METADATA_ENTRIES)
            .map(|i| {
                (
                    format!("{i:0>width$}", width = credit::MAX_METADATA_BYTES),
                    "v".repeat(credit::MAX_METADATA_BYTES),
                )
            })
            .collect()
    } else {
        [("order".to_owned(), format!("order-{key}"))].into()
    };
    Ok(Grant {
        v: credit::GRANT_RECORD_V,
        id: credit::grant_id("acme", customer, key),
        tenant: "acme".into(),
        customer: customer.into(),
        key: key.into(),
        terms: credit::GrantTerms {
            amount: amount.parse()?,
            currency: "USD".into(),
            priority,
            effective_at: None,
            expires_at: None,
            paid: None,
            metadata,
        },
        received_at: neruba_schemas::event::format_time_ms(0),
    })
}

/// A usage item of 0.01 USD for `customer`, in the workload's form.
fn cent_item(template: &LineItem, customer: &str, n: usize) -> LineItem {
    LineItem {
        id: format!("li_bound_{n}"),
        customer: customer.into(),
        amount: rust_decimal::Decimal::new(1, 2),
        ..template.clone()
    }
}

/// What one customer holds ([`customer_holding`]).
#[derive(Clone, Copy)]
enum Holding {
    /// This many grants with credit, each with a 10-byte key and a 21-byte metadata entry.
    Grants(usize),
    /// As much as the bound lets one customer's book hold: grants of 32 KiB of metadata up to
    /// the bound's bytes, and the 8 spent grants the book keeps, as heavy.
    Heaviest,
}

/// One customer holding `holding`, then `items` line items of it, each applied and written as
/// a batch of its own (its book written after every item, as when each batch holds one item
/// of the customer): the time per item to apply it and to write the batch, and the stored
/// book's size.
fn customer_holding(
    template: &LineItem,
    holding: Holding,
    items: usize,
) -> Result<(Phases, usize)> {
    let dir = tempfile::tempdir()?;
    let cache = rocksdb::Cache::new_lru_cache(64 << 20);
    let store = Store::open(dir.path(), 0, &store_options(), &cache)?;
    let mut state = PartitionState::from_store(store, 0, 3 * 86_400_000)?;
    let customer = "customer-at-bound";
    let mut offset = 0_i64;
    let mut apply = |state: &mut PartitionState, payload: &[u8], kind: Kind| -> Result<()> {
        let input = Input {
            offset,
            key: None,
            payload,
        };
        offset += 1;
        state.apply(input, kind)?;
        Ok(())
    };
    let mut grants = Vec::new();
    match holding {
        Holding::Grants(n) => {
            for g in 0..n {
                grants.push(grant_of(customer, &format!("pack-{g:05}"), "1000")?);
            }
        }
        Holding::Heaviest => {
            // Each spent by an item before the next (spent grants do not count against the
            // bound, and the book keeps the last 8).
            for g in 0..neruba_balances::state::BOOK_SPENT_GRANTS {
                let used = grant_with(customer, &format!("used-{g:02}"), "0.01", 1, true)?;
                apply(&mut state, &credit::encode(&used), Kind::Grant)?;
                let payload = cent_item(template, customer, items + g).encode();
                apply(&mut state, &payload, Kind::LineItem)?;
            }
            let per =
                neruba_balances::book::held_bytes(&grant_with(customer, "pack-00", "1", 1, true)?);
            for g in 0..neruba_balances::book::MAX_CREDIT_GRANT_BYTES / per {
                grants.push(grant_with(
                    customer,
                    &format!("pack-{g:02}"),
                    "1000",
                    10,
                    true,
                )?);
            }
        }
    }
    for grant in &grants {
        apply(&mut state, &credit::encode(grant), Kind::Grant)?;
    }
    state.take_outputs();
    state.commit()?;
    let mut phases = Phases::default();
    for n in 0..items {
        let payload = cent_item(template, customer, n).encode();
        let started = Instant::now();
        apply(&mut state, &payload, Kind::LineItem)?;
        let applied = Instant::now();
        phases.entries += state.take_outputs().len();
        state.commit()?;
        phases.apply += applied - started;
        phases.write += applied.elapsed();
    }
    let book = neruba_balances::state::read_book(state.store().db(), "acme", customer)?
        .map(|b| b.encode())
        .transpose()?
        .map_or(0, |b| b.len());
    Ok((phases, book))
}

/// What [`topped_up`] measured.
struct ToppedUp {
    /// The stored book's size.
    stored: usize,
    /// The size of a book keeping every grant.
    whole: usize,
    /// One read of the book alone (what a balance read takes), and one with every spent
    /// grant put back (what the grants list takes), each the median of [`READS`].
    book_alone: Duration,
    every_grant: Duration,
}

/// How many times each read of [`topped_up`] is timed.
const READS: usize = 101;

/// The median time of `READS` calls of `read`.
fn median_of(mut read: impl FnMut() -> Result<()>) -> Result<Duration> {
    let mut times = Vec::with_capacity(READS);
    for _ in 0..READS {
        let started = Instant::now();
        read()?;
        times.push(started.elapsed());
    }
    times.sort_unstable();
    Ok(times[READS / 2])
}

/// One customer topping up `topups` times, each top-up used up by the next item: the size of
/// its stored book, and of a book that kept every grant (as the store did before spent grants
/// were kept apart); and how long its book takes to read, alone and with every grant.
fn topped_up(template: &LineItem, topups: usize) -> Result<ToppedUp> {
    let dir = tempfile::tempdir()?;
    let cache = rocksdb::Cache::new_lru_cache(64 << 20);
    let store = Store::open(dir.path(), 0, &store_options(), &cache)?;
    let mut state = PartitionState::from_store(store, 0, 3 * 86_400_000)?;
    let customer = "customer-topping-up";
    let mut whole = neruba_balances::book::Book::default();
    for n in 0..topups {
        let grant = grant_of(customer, &format!("topup-{n:05}"), "0.01")?;
        let item = cent_item(template, customer, n);
        whole.apply_grant(&grant, i64::MIN, 0);
        whole.apply_item(&item);
        for (offset, payload, kind) in [
            (2 * n, credit::encode(&grant), Kind::Grant),
            (2 * n + 1, item.encode(), Kind::LineItem),
        ] {
            let input = Input {
                offset: i64::try_from(offset)?,
                key: None,
                payload: &payload,
            };
            state.apply(input, kind)?;
        }
        state.take_outputs();
        state.commit()?;
    }
    let db = state.store().db();
    let stored = db
        .get(neruba_balances::state::customer_key(b'B', "acme", customer))?
        .map_or(0, |b| b.len());
    let read = |parts| {
        median_of(|| {
            let book =
                neruba_balances::state::read_book_in(&db.snapshot(), "acme", customer, parts)?;
            anyhow::ensure!(book.is_some(), "no book");
            Ok(())
        })
    };
    Ok(ToppedUp {
        stored,
        whole: whole.encode()?.len(),
        book_alone: read(Parts::BOOK)?,
        every_grant: read(Parts::GRANTS)?,
    })
}

/// What [`many_groups`] measured.
struct ManyGroups {
    /// The last batch of items.
    last: Phases,
    /// The stored book's size at the end.
    book: usize,
    /// A read of the whole book (its statement's lines put back).
    read: Duration,
    /// The tick turning the statement draft, applied and written.
    tick: Duration,
}

/// One customer's `items` line items in one billing period, each of a group of its own (a
/// client sending a new group value with every event; values of different lengths), in
/// batches of `batch` items; then a read of the book and the tick turning the statement draft.
fn many_groups(template: &LineItem, items: usize, batch: usize) -> Result<ManyGroups> {
    let dir = tempfile::tempdir()?;
    let cache = rocksdb::Cache::new_lru_cache(64 << 20);
    let store = Store::open(dir.path(), 0, &store_options(), &cache)?;
    let mut state = PartitionState::from_store(store, 0, 3 * 86_400_000)?;
    let customer = "customer-of-many-groups";
    let mut last = Phases::default();
    for (b, chunk) in (0..items)
        .collect::<Vec<_>>()
        .chunks(batch.max(1))
        .enumerate()
    {
        let started = Instant::now();
        for &n in chunk {
            let mut item = cent_item(template, customer, n);
            item.group = [("project".to_owned(), format!("p-{n}"))].into();
            let input = Input {
                offset: i64::try_from(n)?,
                key: None,
                payload: &item.encode(),
            };
            state.apply(input, Kind::LineItem)?;
        }
        let applied = Instant::now();
        state.take_outputs();
        state.commit()?;
        if (b + 1) * batch >= items {
            last = Phases {
                apply: applied - started,
                encode: Duration::ZERO,
                write: applied.elapsed(),
                entries: chunk.len(),
            };
        }
    }
    let book = state
        .store()
        .db()
        .get(neruba_balances::state::customer_key(b'B', "acme", customer))?
        .map_or(0, |b| b.len());
    let started = Instant::now();
    let lines =
        neruba_balances::state::read_book(state.store().db(), "acme", customer)?.map_or(0, |b| {
            b.statements
                .values()
                .map(|s| s.statement.lines.len())
                .sum::<usize>()
        });
    let read = started.elapsed();
    anyhow::ensure!(lines == items, "read {lines} lines of {items}");
    let tick = credit::Tick {
        v: 1,
        at_ms: neruba_schemas::event::parse_time_ms(&template.period_end)?,
        finalize_after_ms: None,
    };
    let payload = credit::encode(&tick);
    let started = Instant::now();
    let input = Input {
        offset: i64::try_from(items)?,
        key: None,
        payload: &payload,
    };
    state.apply(input, Kind::Tick)?;
    let drafts = state.take_outputs().len();
    state.commit()?;
    let tick = started.elapsed();
    anyhow::ensure!(drafts == 1, "{drafts} outputs of the tick");
    Ok(ManyGroups {
        last,
        book,
        read,
        tick,
    })
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

/// Every record through `floor`, a write per [`batch_size`] records.
fn through(records: &[&Record], mut floor: Floor) -> Result<Duration> {
    let started = Instant::now();
    for batch in records.chunks(batch_size()) {
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
    let customers = env_usize("NERUBA_BENCH_CUSTOMERS", 10_000);
    let rounds = env_usize("NERUBA_BENCH_ROUNDS", 3).max(1);
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
    println!(
        "{n} ledger records ({customers} customers), batches of {}, best of {rounds}",
        batch_size()
    );

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

    // What one customer's grants can cost: the bound of grants holding credit, and top-ups
    // used up one after another (kept apart from the book once spent).
    let template = records
        .iter()
        .find(|r| r.header.is_none())
        .map(|r| credit::decode::<LineItem>(&r.payload))
        .transpose()?
        .ok_or_else(|| anyhow::anyhow!("no line item in the workload"))?;
    let items = env_usize("NERUBA_BENCH_BOUND_ITEMS", 2_000);
    for (holding, name) in [
        (Holding::Grants(2), "2 grants with credit".to_owned()),
        (
            Holding::Grants(neruba_balances::book::MAX_CREDIT_GRANTS),
            format!(
                "{} grants with credit",
                neruba_balances::book::MAX_CREDIT_GRANTS
            ),
        ),
        (
            Holding::Heaviest,
            "grants of 32 KiB of metadata up to the bound's bytes, and 8 as heavy spent ones"
                .to_owned(),
        ),
    ] {
        let (phases, book) = customer_holding(&template, holding, items)?;
        println!(
            "a customer holding {name}, {items} items each written alone: apply {:.2} µs, write {:.2} µs per item; stored book {book} bytes",
            per_record(phases.apply, items),
            per_record(phases.write, items),
        );
    }
    let topups = env_usize("NERUBA_BENCH_TOPUPS", 1_000);
    let t = topped_up(&template, topups)?;
    println!(
        "a customer after {topups} top-ups each used up: stored book {} bytes; a book keeping every grant {} bytes; a read of the book alone (a balance read) {:.2?}, with every grant put back (as the grants list read it before its pages) {:.2?}",
        t.stored, t.whole, t.book_alone, t.every_grant
    );
    for groups in std::env::var("NERUBA_BENCH_GROUPS")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|g| g.trim().parse::<usize>().ok())
    {
        let m = many_groups(&template, groups, 100)?;
        println!(
            "a customer with {groups} groups in one period, batches of 100 items: the last batch apply {:.2} µs, write {:.2} µs per item; stored book {} bytes; a read of the whole book {:.2?}; the tick turning its statement draft {:.2?}",
            per_record(m.last.apply, m.last.entries),
            per_record(m.last.write, m.last.entries),
            m.book,
            m.read,
            m.tick,
        );
    }
    println!(
        "peak RSS of the process before the period's end: {} MiB",
        peak_rss_kib() / 1024
    );
    // A period's end: a tick 34 days on is past the workload's period (30 days from a
    // multiple of 30 days before now) and its 3 days as draft.
    let at_ms = neruba_schemas::event::now_ms() + 34 * 86_400_000;
    for (bound, name) in [
        (
            BOOKS_HELD_BYTES,
            format!("within {} MiB", BOOKS_HELD_BYTES >> 20),
        ),
        (usize::MAX, "unbounded (as before December 1)".to_owned()),
    ] {
        let t = period_end_tick(&records, bound, at_ms)?;
        println!(
            "the period's end, {customers} customers' statements turned draft and final by one tick {name}: {:.2?} in {} parts, {} entries; books held at most {} MiB; the process's RSS rose {} MiB over its RSS before the tick",
            t.took,
            t.parts,
            t.entries,
            t.held >> 20,
            t.rss_rise_kib / 1024
        );
    }
    Ok(())
}
