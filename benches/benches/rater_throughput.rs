//! End-to-end rater throughput against a raw producer of the same line items.
//!
//! One run, one broker (the embedded mock cluster):
//! 1. a raw rdkafka producer, configured as the rater's (acks=all, idempotent, lz4), sends the
//!    line items the rater must produce (computed in memory beforehand) and awaits every ack;
//! 2. the rater consumes the rollups (RocksDB state, rating, items acknowledged before the
//!    state write) and produces those items.
//!
//! Reports items/s of each, their ratio and the process's peak RSS. The raw producer is warmed
//! up and timed from its first send; the rater both from its start and after its first items
//! were counted (`neruba_benches::Progress`), which leaves out, as the raw producer's timing
//! does, opening its stores, creating its clients and its first fetch.
//! `NERUBA_BENCH_CUSTOMERS` (default 2,000) × 10 windows + one revision per customer.

// Rates and ratios in the report are floating point; no quantity or amount is.
#![allow(clippy::float_arithmetic)]

use anyhow::Result;
use neruba::embedded::EmbeddedKafka;
use neruba_benches::{
    Progress, batch_phases, counter, join_in_order, peak_rss_kib, rate, rating, written,
};
use neruba_schemas::topics::{self, stable_partition};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Enough partitions that the mock broker's 5 MiB per partition holds every message.
const PARTITIONS: i32 = 8;
const RAW_LEDGER: &str = "bench.raw-ledger";

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

/// Sends `(topic, key, payload)` records, all in flight at once, and awaits every ack.
async fn send_all(producer: &FutureProducer, records: &[(&str, String, Vec<u8>)]) -> Result<()> {
    let mut pending = Vec::with_capacity(records.len());
    for (topic, key, payload) in records {
        pending.push(
            producer
                .send_result(
                    FutureRecord::to(topic)
                        .key(key)
                        .payload(payload)
                        .partition(stable_partition(key, PARTITIONS)),
                )
                .map_err(|(e, _)| anyhow::anyhow!("enqueue: {e}"))?,
        );
    }
    for delivery in join_in_order(pending).await {
        delivery?.map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let customers: usize = std::env::var("NERUBA_BENCH_CUSTOMERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let kafka = EmbeddedKafka::start(&[
        (topics::ROLLUPS, PARTITIONS),
        (topics::LEDGER, PARTITIONS),
        (RAW_LEDGER, PARTITIONS),
        (topics::DEAD_LETTER, 1),
    ])?;
    let bootstrap = kafka.bootstrap_servers().to_owned();
    let catalog = rating::catalog();
    let rollups = rating::rollups(customers, 10);
    let items = rating::items(&rollups, &catalog);
    let n = items.len();
    anyhow::ensure!(n == rollups.len(), "every rollup prices to one item");

    let setup = producer(&bootstrap, false)?;
    let records: Vec<(&str, String, Vec<u8>)> = rollups
        .iter()
        .map(|r| (topics::ROLLUPS, r.partition_key(), r.encode()))
        .collect();
    let started = Instant::now();
    send_all(&setup, &records).await?;
    println!("produced {n} rollups in {:.2?}", started.elapsed());

    let raw_records: Vec<(&str, String, Vec<u8>)> = items
        .iter()
        .map(|i| (RAW_LEDGER, i.partition_key(), i.encode()))
        .collect();
    let raw_producer = producer(&bootstrap, true)?;
    // Warm up (metadata, producer id) as the rater's producer is by its first batch.
    send_all(&raw_producer, &raw_records[..1]).await?;
    let started = Instant::now();
    send_all(&raw_producer, &raw_records).await?;
    let raw = started.elapsed();
    println!("raw producer sent the {n} items in {raw:.2?}");

    let state = tempfile::tempdir()?;
    let mut config = neruba_rater::Config::new(&bootstrap, state.path());
    config.stage.group_id = "bench-rater".into();
    let registry = prometheus::Registry::new();
    let shutdown = CancellationToken::new();
    // A run that fails stops the stage too, else the runtime waits on its workers for ever.
    let _stop_on_failure = shutdown.clone().drop_guard();
    // Timed from its start, and from when its first items were counted (see `Progress`): the
    // raw producer was warmed up and timed from its first send.
    let mut progress = Progress::start();
    let running = neruba_rater::start(config, Arc::new(catalog), &registry, shutdown.clone())?;
    let mut last_report = Instant::now();
    let emitted = loop {
        let emitted = counter(&registry, "neruba_line_items_emitted_total");
        progress.observe(emitted);
        // Every item emitted, and its last batch delivered and written.
        if emitted >= u64::try_from(n)? && written(&registry) >= u64::try_from(n)? {
            break emitted;
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            println!("  rater progress: {emitted} of {n}");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let rated = progress.end(emitted);
    shutdown.cancel();
    running.wait().await?;

    let raw_rate = rate(n, raw);
    println!("raw producer (acks=all):  {n} items in {raw:.2?} = {raw_rate:.0} items/s");
    println!("rater end to end:         {}", rated.report("items"));
    println!("ratio rater / raw:        {}", rated.ratios(raw_rate));
    println!(
        "refused rollups:          {}",
        counter(&registry, "neruba_rater_refused_rollups_total")
    );
    println!("batches by phase:         {}", batch_phases(&registry));
    println!("peak RSS of the process:  {} MiB", peak_rss_kib() / 1024);
    Ok(())
}
