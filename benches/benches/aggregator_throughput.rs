//! End-to-end aggregator throughput against the raw component it is built on.
//!
//! One run, one broker (the embedded mock cluster), one topic's worth of identical data:
//! 1. a raw rdkafka consumer drains the topic with a no-op handler;
//! 2. the same consumer drains it again, decoding each event, then again decoding each event
//!    and writing its id to RocksDB as the aggregator writes (WAL on, a write batch per stage
//!    batch, `NERUBA_BENCH_MAX_BATCH`, default 5,000, the aggregator's):
//!    the floor under any aggregator with a durable dedup set, as ratios to the raw consumer;
//! 3. the aggregator (RocksDB state, dedup, windows, rollups) drains the same topic in a
//!    fresh consumer group.
//!
//! The aggregator runs twice, with one worker thread and with two (`--aggregator-workers`).
//! Reports events/s of each, their ratios (SPEC target: aggregator ≥ 0.8 × the durable floor),
//! and the process's peak RSS. The consumers are timed from their first message; the aggregator
//! both from its start and after it was first seen to have handled events
//! (`neruba_benches::Progress`): the second leaves out, as theirs do, opening its stores,
//! creating its clients and its first fetch, and is the ratio compared with the target. With
//! two workers, "at work" starts at the first count either made public, so the other's start
//! up to then is still in it. `NERUBA_BENCH_EVENTS` sets the event count (default 100,000);
//! `NERUBA_BENCH_BROKER=tansu` runs against a tansu broker process instead of the embedded one.
//! `NERUBA_BENCH_IDS=random` scatters the event ids as the client library makes them (no
//! order, so a dedup lookup cannot skip a stored file by its key range); by default they
//! increase. `NERUBA_BENCH_KAFKA=key=value,...` gives the aggregator's clients librdkafka
//! settings, as its `--kafka-opt` would.

// Rates and ratios in the report are floating point; no quantity or amount is.
#![allow(clippy::float_arithmetic)]

use anyhow::Result;
use neruba::embedded::EmbeddedKafka;
use neruba_benches::aggregation::{CATALOG, workload};
use neruba_benches::{
    Progress, Timed, batch_phases, counter, join_in_order, peak_rss_kib, rate, written,
};
use neruba_schemas::{Catalog, Event, codec, topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The embedded broker keeps at most 5 MiB per partition (librdkafka's mock log limit), so the
/// data set is spread over enough partitions, compressed, to stay whole.
const PARTITIONS: i32 = 8;

async fn produce(bootstrap: &str, events: &[Event]) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    for chunk in events.chunks(20_000) {
        let mut pending = Vec::with_capacity(chunk.len());
        for e in chunk {
            let payload = codec::encode(e);
            let key = e.partition_key();
            pending.push(
                producer
                    .send_result(FutureRecord::to(topics::EVENTS).key(&key).payload(&payload))
                    .map_err(|(e, _)| anyhow::anyhow!("enqueue: {e}"))?,
            );
        }
        for delivery in join_in_order(pending).await {
            delivery?.map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
        }
    }
    Ok(())
}

/// What a drain does with each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handler {
    /// Nothing: the raw consumer (the first round's target was a ratio to it; the SPEC's is
    /// now to the durable floor, [`Handler::DecodeAndWriteId`]).
    NoOp,
    /// Decodes the event: what any aggregator must do first.
    Decode,
    /// Decodes it and writes its dedup key (tenant, customer, id, as the aggregator keys it) to
    /// RocksDB, one write batch per stage batch (`NERUBA_BENCH_MAX_BATCH`, default 5,000
    /// messages, the aggregator's) with the WAL on, as the aggregator writes: the least a
    /// durable dedup set costs.
    DecodeAndWriteId,
}

/// Drains the topic, handling each message as `handler` says; returns the elapsed time.
fn drain(bootstrap: &str, expected: usize, handler: Handler, max_batch: usize) -> Result<Duration> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("bench-raw-{handler:?}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50")
        .set("queued.max.messages.kbytes", "65536")
        // As the stages set it: a full queue must not stall the next fetch for librdkafka's
        // default 1 s (the no-op drain never fills it; the others would run dry).
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    // Explicit assignment: the group protocol's join time is not what this measures.
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(topics::EVENTS, partition, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let ids_dir = tempfile::tempdir()?;
    let ids = rocksdb::DB::open_default(ids_dir.path())?;
    let mut batch = rocksdb::WriteBatch::default();
    let mut decoder = codec::Decoder::default();
    let mut seen = 0usize;
    let mut bytes = 0usize;
    let mut started = None;
    let mut last_report = Instant::now();
    while seen < expected {
        if last_report.elapsed() > Duration::from_secs(5) {
            println!("  {handler:?} drain progress: {seen} of {expected}");
            last_report = Instant::now();
        }
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            started.get_or_insert_with(Instant::now);
            let payload = message.payload().unwrap_or_default();
            bytes += payload.len();
            seen += 1;
            if handler == Handler::NoOp {
                continue;
            }
            let event = decoder.decode(payload)?;
            if handler == Handler::DecodeAndWriteId {
                let key = neruba_aggregator::keys::dedup(&event.tenant, &event.subject, &event.id);
                batch.put(key, event.received_ms.max(event.time_ms).to_be_bytes());
                if batch.len() == max_batch || seen == expected {
                    ids.write(std::mem::take(&mut batch))?;
                }
            }
        }
    }
    std::hint::black_box(bytes);
    Ok(started.map(|s| s.elapsed()).unwrap_or_default())
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; this harness takes no other arguments.
    let n: usize = std::env::var("NERUBA_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    // The stage's batch bound, and the durable floor's write interval with it.
    let max_batch: usize = std::env::var("NERUBA_BENCH_MAX_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
        .max(1);
    let topics = [
        (topics::EVENTS, PARTITIONS),
        (topics::ROLLUPS, PARTITIONS),
        (topics::DEAD_LETTER, 1),
    ];
    // The embedded mock broker by default; a tansu process with NERUBA_BENCH_BROKER=tansu.
    let (_embedded, _tansu, bootstrap) =
        if std::env::var("NERUBA_BENCH_BROKER").as_deref() == Ok("tansu") {
            let tansu = neruba_benches::TansuProcess::start(&topics).await?;
            let bootstrap = tansu.bootstrap.clone();
            println!("broker: tansu process at {bootstrap}");
            (None, Some(tansu), bootstrap)
        } else {
            let kafka = EmbeddedKafka::start(&topics)?;
            let bootstrap = kafka.bootstrap_servers().to_owned();
            println!("broker: embedded mock cluster at {bootstrap}");
            (Some(kafka), None, bootstrap)
        };
    let events = workload(n);
    let started = Instant::now();
    produce(&bootstrap, &events).await?;
    println!("produced {n} events in {:.2?}", started.elapsed());

    let (mut raw_rate, mut floor_rate) = (0.0, 0.0);
    for handler in [Handler::NoOp, Handler::Decode, Handler::DecodeAndWriteId] {
        let bootstrap = bootstrap.clone();
        let elapsed =
            tokio::task::spawn_blocking(move || drain(&bootstrap, n, handler, max_batch)).await??;
        let drained = rate(n, elapsed);
        if handler == Handler::NoOp {
            raw_rate = drained;
            println!(
                "raw consumer (no-op handler): {n} events in {elapsed:.2?} = {drained:.0} events/s"
            );
        } else {
            if handler == Handler::DecodeAndWriteId {
                floor_rate = drained;
            }
            println!(
                "raw consumer, {handler:?}: {n} events in {elapsed:.2?} = {drained:.0} events/s, ratio {:.2}",
                drained / raw_rate
            );
        }
    }
    for workers in [1, 2] {
        let (aggregated, rollups) = aggregate(&bootstrap, n, workers, max_batch).await?;
        println!(
            "aggregator, {workers} worker(s):       {}, {rollups} rollups",
            aggregated.report("events")
        );
        // At work against the consumers' from their first message: like for like.
        println!(
            "ratio aggregator / durable floor (DecodeAndWriteId): {} (SPEC target >= 0.80)",
            aggregated.ratios(floor_rate)
        );
        println!(
            "ratio aggregator / raw consumer: {}",
            aggregated.ratios(raw_rate)
        );
    }
    println!(
        "peak RSS of the process:      {} MiB",
        peak_rss_kib() / 1024
    );
    Ok(())
}

/// librdkafka settings given to the aggregator's clients (`NERUBA_BENCH_KAFKA`, as
/// `key=value` pairs separated by commas), as its `--kafka-opt` would.
fn kafka_options() -> Vec<(String, String)> {
    std::env::var("NERUBA_BENCH_KAFKA")
        .unwrap_or_default()
        .split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("NERUBA_BENCH_KAFKA: `{pair}` is not key=value"));
            (key.trim().to_owned(), value.trim().to_owned())
        })
        .collect()
}

/// Runs the aggregator with `workers` threads on fresh state until it handled `n` events;
/// returns the events handled and how long it took (from its start, and after it was first seen
/// at work), and the rollups it emitted.
async fn aggregate(
    bootstrap: &str,
    n: usize,
    workers: usize,
    max_batch: usize,
) -> Result<(Timed, u64)> {
    let catalog = Arc::new(Catalog::from_toml_str(CATALOG, "bench")?);
    let state = tempfile::tempdir()?;
    let mut config = neruba_aggregator::Config::new(bootstrap, state.path());
    config.stage.group_id = format!("bench-aggregator-{workers}");
    // Explicit assignment, as for the raw consumer: group joins are not what this measures.
    config.stage.assignment = Some(topics::Assignment::All);
    config.stage.workers = workers;
    config.stage.max_batch = max_batch;
    config.idle_timeout = Duration::from_secs(3600);
    config.stage.kafka_options = kafka_options();
    let registry = prometheus::Registry::new();
    let shutdown = CancellationToken::new();
    // A run that fails stops the stage too, else the runtime waits on its workers for ever.
    let _stop_on_failure = shutdown.clone().drop_guard();
    // Timed until it wrote every event, its last batch's delivery and write included; from its
    // start, and from when it was first seen to have handled events (see `Progress`).
    let mut progress = Progress::start();
    let running = neruba_aggregator::start(config, catalog, &registry, shutdown.clone())?;
    let mut last_report = Instant::now();
    let handled = loop {
        let handled = counter(&registry, "neruba_aggregator_events_total")
            + counter(&registry, "neruba_dedup_hits_total")
            + counter(&registry, "neruba_dead_letters_total");
        progress.observe(handled);
        if handled >= u64::try_from(n)? && written(&registry) >= u64::try_from(n)? {
            break handled;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            println!("  aggregator progress: {handled} of {n}");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let aggregated = progress.end(handled);
    shutdown.cancel();
    running.wait().await?;
    println!(
        "  the aggregator's batches by phase: {}",
        batch_phases(&registry)
    );

    Ok((
        aggregated,
        counter(&registry, "neruba_rollups_emitted_total"),
    ))
}
