//! End-to-end throughput of the balances stage against the raw pair it is built on.
//!
//! One run, one broker (the embedded mock cluster), one ledger topic's worth of records:
//! `NERUBA_BENCH_CUSTOMERS` (default 2,000) customers, each with two grants (a small
//! promotional one that burns first and a purchased pack) and 10 usage items plus one
//! adjustment, so the stage consumes, restores and leaves some usage uncovered. Records are in
//! ledger order: every customer's first record, then every customer's second, and so on.
//! 1. the raw pair: an rdkafka consumer drains the ledger records (no-op handler), then an
//!    idempotent `acks=all` producer sends the balance entries the stage must produce
//!    (computed in memory beforehand by the same fold): the least any balances stage does;
//! 2. the balances stage (RocksDB state, the fold, entries acknowledged before the state write)
//!    drains the same records and produces those entries, with as many workers as
//!    `NERUBA_BENCH_WORKERS` says (default one), each owning its share of the 8 partitions (the
//!    raw pair and the floors use one draining thread);
//! 3. the *durable floor*, as the aggregator's bench measures one: the same drain decoding each
//!    record (a line item or a grant, JSON) and writing its id to RocksDB (WAL on, one write
//!    batch per stage batch), then the same produce: the least a balances stage that dedups line
//!    items durably and answers only once the broker has its entries can cost;
//! 4. the *state floor*: the same drain through the per-customer state floor (each record
//!    decoded, its customer's value, as large as a stored book, rewritten, and its id marked, a
//!    write per stage batch of records), then the same produce: the least any stage that keeps each
//!    customer's state durably can cost, whatever its fold.
//!
//! `NERUBA_BENCH_MAX_BATCH` sets the stage's batch bound, and the floors' write interval with it
//! (default the stage's, [`neruba_balances::DEFAULT_MAX_BATCH`]).
//!
//! Reports entries/s of each, their ratios (issue target: ≥ 0.5 × the raw pair; proposed, since
//! the state floor alone is far below half the raw pair: ≥ 0.5 × the state floor) and the
//! process's peak RSS. The raw pair and the floors are timed from their first message; the stage
//! both from its start and after its first entries were counted (`neruba_benches::Progress`):
//! the second leaves out, as theirs do, opening its stores, creating its clients and its first
//! fetch, and is the ratio compared with the target.

// Rates and ratios in the report are floating point; no quantity or amount is.
#![allow(clippy::float_arithmetic)]

use anyhow::{Context, Result};
use neruba::embedded::EmbeddedKafka;
use neruba_benches::balances::{Floor, Record, first_book, workload};
use neruba_benches::{Progress, batch_phases, counter, join_in_order, peak_rss_kib, rate, written};
use neruba_schemas::topics::{self, RECORD_HEADER, stable_partition};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 8;
const RAW_ENTRIES: &str = "bench.raw-entries";

fn producer(bootstrap: &str, idempotent: bool) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set(
            "enable.idempotence",
            if idempotent { "true" } else { "false" },
        )
        .set("linger.ms", "2")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

async fn send_all(producer: &FutureProducer, topic: &str, records: &[Record]) -> Result<()> {
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let mut message = FutureRecord::to(topic)
            .key(r.key.as_bytes())
            .payload(r.payload.as_slice())
            .partition(stable_partition(&r.key, PARTITIONS));
        if let Some(value) = r.header {
            message = message.headers(OwnedHeaders::new().insert(Header {
                key: RECORD_HEADER,
                value: Some(value),
            }));
        }
        pending.push(
            producer
                .send_result(message)
                .map_err(|(e, _)| anyhow::anyhow!("enqueue: {e}"))?,
        );
    }
    for delivery in join_in_order(pending).await {
        delivery?.map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    }
    Ok(())
}

/// What a drain does with each record.
#[derive(Debug, Clone, Copy)]
enum Drain {
    /// Nothing: the raw consumer.
    Raw,
    /// The durable floor ([`Floor::ids`]): decodes it and marks its id, a write per stage batch.
    Ids,
    /// The per-customer state floor ([`Floor::state`]) with values of this many bytes, a write
    /// per stage batch.
    State(usize),
}

/// Drains `expected` records of the ledger as `how` says; the elapsed time from the first
/// message.
/// The floors write once per `batch` records, as the stage writes once per batch.
fn drain(bootstrap: &str, expected: usize, how: Drain, batch: usize) -> Result<Duration> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bench-raw-ledger-{how:?}"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "20")
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(topics::LEDGER, partition, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut floor = match how {
        Drain::Raw => None,
        Drain::Ids => Some(Floor::ids()?),
        Drain::State(bytes) => Some(Floor::state(bytes)?),
    };
    let (mut seen, mut started) = (0usize, None);
    while seen < expected {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            started.get_or_insert_with(Instant::now);
            seen += 1;
            let Some(floor) = &mut floor else {
                continue;
            };
            use rdkafka::Message as _;
            use rdkafka::message::Headers as _;
            let payload = message.payload().unwrap_or_default();
            let is_grant = message
                .headers()
                .is_some_and(|h| h.iter().any(|h| h.key == RECORD_HEADER));
            floor.record(payload, is_grant)?;
            if seen % batch == 0 || seen == expected {
                floor.write()?;
            }
        }
    }
    started.map(|s| s.elapsed()).context("nothing drained")
}

#[tokio::main]
async fn main() -> Result<()> {
    let customers: usize = std::env::var("NERUBA_BENCH_CUSTOMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let workers: usize = std::env::var("NERUBA_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let max_batch: usize = std::env::var("NERUBA_BENCH_MAX_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(neruba_balances::DEFAULT_MAX_BATCH)
        .max(1);
    let kafka = EmbeddedKafka::start(&[
        (topics::LEDGER, PARTITIONS),
        (topics::BALANCE_ENTRIES, PARTITIONS),
        (RAW_ENTRIES, PARTITIONS),
        (topics::DEAD_LETTER, 1),
    ])?;
    let bootstrap = kafka.bootstrap_servers().to_owned();
    let (records, entries) = workload(customers);
    let (r, n) = (records.len(), entries.len());
    let setup = producer(&bootstrap, false)?;
    send_all(&setup, topics::LEDGER, &records).await?;
    println!(
        "produced {r} ledger records ({customers} customers); the fold makes {n} entries of them"
    );

    let state_bytes = first_book(&records, customers)?.encode()?.len();
    let drain_by = async |how: Drain| {
        let bootstrap = bootstrap.clone();
        tokio::task::spawn_blocking(move || drain(&bootstrap, r, how, max_batch)).await?
    };
    let drained = drain_by(Drain::Raw).await?;
    let drained_durably = drain_by(Drain::Ids).await?;
    let drained_with_state = drain_by(Drain::State(state_bytes)).await?;
    let raw_producer = producer(&bootstrap, true)?;
    send_all(&raw_producer, RAW_ENTRIES, &entries[..1]).await?;
    let started = Instant::now();
    send_all(&raw_producer, RAW_ENTRIES, &entries).await?;
    let produced = started.elapsed();
    let raw = drained + produced;
    let floor = drained_durably + produced;
    let state_floor = drained_with_state + produced;
    println!(
        "raw pair: drained {r} records in {drained:.2?}, produced {n} entries in {produced:.2?}"
    );

    let state = tempfile::tempdir()?;
    let mut config = neruba_balances::Config::new(&bootstrap, state.path());
    config.stage.group_id = "bench-balances".into();
    // Explicit assignment, as for the raw pair: group joins are not what this measures.
    config.stage.assignment = Some(topics::Assignment::All);
    config.stage.workers = workers;
    config.stage.max_batch = max_batch;
    let registry = prometheus::Registry::new();
    let shutdown = CancellationToken::new();
    // A run that fails stops the stage too, else the runtime waits on its workers for ever.
    let _stop_on_failure = shutdown.clone().drop_guard();
    // Timed until it wrote every record, so the last batch's delivery and write are in; from
    // its start, and from when its first entries were counted (the stage counts them as it
    // hands them to its sending thread, every `hand_every` records applied, so what it did
    // before is left out by its count, not only by its time).
    let mut progress = Progress::start();
    let running = neruba_balances::start(config, &registry, shutdown.clone())?;
    let mut last_report = Instant::now();
    let emitted = loop {
        let emitted = counter(&registry, "neruba_balance_entries_total");
        progress.observe(emitted);
        if emitted >= u64::try_from(n)? && written(&registry) >= u64::try_from(r)? {
            break emitted;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            println!("  balances progress: {emitted} of {n}");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let balanced = progress.end(emitted);
    shutdown.cancel();
    running.wait().await?;

    let (raw_rate, floor_rate, state_floor_rate) =
        (rate(n, raw), rate(n, floor), rate(n, state_floor));
    println!(
        "raw pair (drain + acks=all produce): {n} entries in {raw:.2?} = {raw_rate:.0} entries/s"
    );
    println!(
        "balances stage end to end:          {} ({workers} workers, batches of up to {max_batch})",
        balanced.report("entries")
    );
    println!(
        "durable floor (decode + id to RocksDB, a write per {max_batch}, then the produce): \
         {n} entries in {floor:.2?} = {floor_rate:.0} entries/s"
    );
    println!(
        "state floor (decode + a {state_bytes}-byte value per customer and the id to RocksDB, \
         a write per {max_batch}, then the produce): \
         {n} entries in {state_floor:.2?} = {state_floor_rate:.0} entries/s"
    );
    // At work against the others' from their first message: like for like.
    let ratios = |base: f64| balanced.ratios(base);
    println!(
        "ratio stage / raw pair:             {} (issue target >= 0.50)",
        ratios(raw_rate)
    );
    println!("ratio stage / durable floor:        {}", ratios(floor_rate));
    println!(
        "ratio stage / state floor:          {} (proposed target >= 0.50)",
        ratios(state_floor_rate)
    );
    println!(
        "the stage's batches by phase:       {}",
        batch_phases(&registry)
    );
    println!(
        "peak RSS of the process:            {} MiB",
        peak_rss_kib() / 1024
    );
    Ok(())
}
