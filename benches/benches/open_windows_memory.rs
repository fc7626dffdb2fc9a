//! What an open window costs the aggregator in memory, against what the bound on open windows
//! counts for it ([`neruba_aggregator::state::open_cost`], `--max-open-window-bytes`).
//!
//! Events of ever new customers (as a client opening windows without end sends them), all in
//! one minute, applied to one partition's state in batches of 5,000 with the state written
//! after each, as the stage does: every event opens two windows (a sum grouped by model and a
//! count). The process's resident set is read as the open windows grow; the cost of a window
//! is the growth between two readings over the windows opened between them (RocksDB's
//! memtables, bounded, fill before the first reading). `NERUBA_BENCH_GROUP_BYTES` (default 5)
//! sets the length of the model name, the group value (a long one: what a hostile client
//! sends).

// Rates and ratios in the report are floating point; no quantity is.
#![allow(clippy::float_arithmetic)]

use anyhow::Result;
// The allocator the `neruba` binary runs with.
use neruba as _;
use neruba_aggregator::state::{MAX_OPEN_WINDOW_BYTES, PartitionState, Timing};
use neruba_benches::aggregation::CATALOG;
use neruba_benches::rss_kib;
use neruba_schemas::{Catalog, Event, codec};
use neruba_stage::{Input, Partition as _};

const BATCH: usize = 5_000;
const DAY_MS: i64 = 86_400_000;

fn main() -> Result<()> {
    let group_bytes: usize = std::env::var("NERUBA_BENCH_GROUP_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let catalog = Catalog::from_toml_str(CATALOG, "bench")?;
    let dir = tempfile::tempdir()?;
    let cache = rocksdb::Cache::new_lru_cache(64 << 20);
    let timing = Timing {
        grace_ms: 10_000,
        correction_horizon_ms: 35 * DAY_MS,
        dedup_horizon_ms: 35 * DAY_MS,
        max_open_window_bytes: usize::MAX,
    };
    let mut state = PartitionState::open(dir.path(), 0, timing, &cache)?;
    let now = neruba_schemas::event::now_ms();
    let model = "m".repeat(group_bytes.max(1));
    let data = serde_json::json!({ "tokens": "5", "model": model });
    let mut event = Event {
        tenant: "acme".into(),
        event_type: "llm.completion".into(),
        time_ms: now,
        received_ms: now,
        data: data.as_object().cloned().unwrap_or_default(),
        ..Event::default()
    };
    println!(
        "events of new customers, two windows each, group value of {} bytes; default bound {} MiB",
        model.len(),
        MAX_OPEN_WINDOW_BYTES >> 20
    );
    let mut offset = 0_i64;
    let mut readings = Vec::new();
    for round in 0..=8 {
        for _ in 0..(if round == 0 { 20 } else { 10 }) {
            for _ in 0..BATCH {
                event.id = format!("e-{offset:012}");
                event.subject = format!("customer-{offset:08}");
                let payload = codec::encode(&event);
                let input = Input {
                    offset,
                    key: None,
                    payload: &payload,
                };
                state.apply(input, &catalog)?;
                offset += 1;
            }
            state.take_outputs();
            state.commit()?;
        }
        let (windows, counted, rss) = (
            state.open_windows(),
            state.open_window_bytes(),
            rss_kib() * 1024,
        );
        println!(
            "{windows:>9} open windows: counted {:>5} MiB, resident {:>5} MiB",
            counted >> 20,
            rss >> 20
        );
        readings.push((windows, counted, rss));
    }
    if let (Some(first), Some(last)) = (readings.first(), readings.last()) {
        let windows = (last.0 - first.0) as f64;
        let resident = last.2.saturating_sub(first.2) as f64 / windows;
        let counted = (last.1 - first.1) as f64 / windows;
        println!(
            "per window opened after the first reading: resident {resident:.0} bytes, counted {counted:.0} bytes = {:.2} x resident",
            counted / resident
        );
    }
    Ok(())
}
