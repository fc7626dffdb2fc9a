//! What the aggregator's dedup set costs in memory as it grows, and what bounding it costs in
//! speed: the dedup floor (an id's lookup, a miss, and its put, a write batch per 5,000) on a
//! partition store tuned as the aggregator's, with the stores' index and filter blocks beside
//! the block cache (the default) and in it (`--index-in-cache`), in the same run.
//!
//! Per million ids it reports the lookup-and-put rate of the last chunk, the process's RSS,
//! and RocksDB's own figures: table readers (index and filter blocks held beside the cache),
//! memtables and the block cache. `NERUBA_BENCH_IDS` ids (default 20 M) per setting; the
//! block cache `NERUBA_BENCH_CACHE_MIB` (default 64, the aggregator's default).

// Rates in the report are floating point; no quantity or amount is.
#![allow(clippy::float_arithmetic)]

use anyhow::Result;
// The allocator the `neruba` binary runs with.
use neruba as _;
use neruba_aggregator::keys;
use neruba_aggregator::state::{Timing, store_options};
use neruba_benches::rss_kib;
use neruba_stage::Store;
use std::time::Instant;

const BATCH: u64 = 5_000;
const CHUNK: u64 = 2_000_000;

/// Event ids as a client makes them: random, 33 characters.
struct Ids(u64);

impl Ids {
    fn next_id(&mut self) -> String {
        let x = &mut self.0;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        format!("{:016x}-{:016x}", *x, x.rotate_left(17))
    }
}

/// One setting: `ids` lookups and puts; the figures after each chunk and the overall rate.
fn run(index_in_cache: bool, ids: u64, cache_mib: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let cache = rocksdb::Cache::new_lru_cache(cache_mib << 20);
    let timing = Timing {
        grace_ms: 10_000,
        correction_horizon_ms: 35 * 86_400_000,
        dedup_horizon_ms: 35 * 86_400_000,
        max_open_window_bytes: neruba_aggregator::state::MAX_OPEN_WINDOW_BYTES,
    };
    let mut options = store_options(timing);
    options.index_in_cache = index_in_cache;
    let mut store = Store::open(dir.path(), 0, &options, &cache)?;
    let mut source = Ids(0x9E37_79B9_7F4A_7C15);
    // Seen now, as the aggregator stores it: compaction keeps it for the dedup horizon.
    let seen_at = keys::time_bytes(neruba_schemas::event::now_ms());
    let (started, mut chunk, mut repeats) = (Instant::now(), Instant::now(), 0_u64);
    println!(
        "index and filters {}:",
        if index_in_cache {
            "in the block cache"
        } else {
            "beside the block cache (default)"
        }
    );
    for done in (BATCH..=ids).step_by(usize::try_from(BATCH)?) {
        let mut batch = rocksdb::WriteBatch::default();
        for _ in 0..BATCH {
            let key = keys::dedup("acme", "customer-1", &source.next_id());
            if store.db().get_pinned(&key)?.is_some() {
                repeats += 1;
            }
            batch.put(&key, seen_at);
        }
        store.write(batch)?;
        if done % CHUNK == 0 {
            let db = store.db();
            let mib = |name: &str| db.property_int_value(name).ok().flatten().unwrap_or(0) >> 20;
            println!(
                "  {:>5.1} M ids {:>6.0} k/s  RSS {:>4} MiB  table readers {:>4} MiB  memtables {:>3} MiB  block cache {:>3} MiB  files {:>4} MiB",
                done as f64 / 1e6,
                CHUNK as f64 / chunk.elapsed().as_secs_f64() / 1e3,
                rss_kib() / 1024,
                mib("rocksdb.estimate-table-readers-mem"),
                mib("rocksdb.cur-size-all-mem-tables"),
                mib("rocksdb.block-cache-usage"),
                mib("rocksdb.total-sst-files-size"),
            );
            chunk = Instant::now();
        }
    }
    anyhow::ensure!(repeats == 0, "{repeats} ids repeated");
    Ok(ids as f64 / started.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let ids = env("NERUBA_BENCH_IDS", 20_000_000);
    let cache_mib = usize::try_from(env("NERUBA_BENCH_CACHE_MIB", 64))?;
    let beside = run(false, ids, cache_mib)?;
    let inside = run(true, ids, cache_mib)?;
    println!(
        "{ids} ids, block cache {cache_mib} MiB: {:.0} k/s with index and filters beside the cache, {:.0} k/s in it ({:.2} ×)",
        beside / 1e3,
        inside / 1e3,
        inside / beside
    );
    Ok(())
}
