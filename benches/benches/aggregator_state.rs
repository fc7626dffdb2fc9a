//! The aggregator's state machine alone, per batch of 5,000 events, no broker: where a
//! worker's CPU goes, without the noise of a Kafka round trip.
//!
//! - `state/apply_commit`: decode, dedup check, fold into windows and periods, close windows
//!   (rollups taken, not sent), then the atomic RocksDB write of the batch;
//! - raw components in the same run, on the same payloads: `raw/decode` (decoding each
//!   event, what any consumer must do) and `raw/put_ids` (one RocksDB put per event id in one
//!   write batch, the least a durable dedup set costs).
//!
//! The stream runs on across iterations (ids and event times keep increasing), so the state
//! grows and windows close as in a long run.

// The allocator the `neruba` binary runs with.
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use neruba as _;
use neruba_aggregator::state::{PartitionState, Timing};
use neruba_benches::aggregation::{CATALOG, event};
use neruba_schemas::{Catalog, codec};
use neruba_stage::Partition as _;
use std::hint::black_box;

const BATCH: usize = 5_000;
const PER_HOUR: usize = 300_000;
const DAY_MS: i64 = 86_400_000;

/// The next `BATCH` encoded events of the stream, from event `*next` on.
fn next_batch(next: &mut usize) -> Vec<Vec<u8>> {
    let batch = (*next..*next + BATCH)
        .map(|i| codec::encode(&event(i, PER_HOUR)))
        .collect();
    *next += BATCH;
    batch
}

fn bench(c: &mut Criterion) {
    let catalog = Catalog::from_toml_str(CATALOG, "bench").expect("bench catalog");
    let timing = Timing {
        grace_ms: 10_000,
        correction_horizon_ms: 35 * DAY_MS,
        dedup_horizon_ms: 35 * DAY_MS,
    };
    let mut group = c.benchmark_group("aggregator");
    group.throughput(Throughput::Elements(BATCH as u64));

    let dir = tempfile::tempdir().expect("temp dir");
    let cache = rocksdb::Cache::new_lru_cache(64 << 20);
    let mut state = PartitionState::open(dir.path(), 0, timing, &cache).expect("open state");
    let mut next = 0usize;
    let mut offset = 0i64;
    group.bench_function("state/apply_commit", |b| {
        b.iter_batched(
            || next_batch(&mut next),
            |payloads| {
                for payload in &payloads {
                    state
                        .apply(
                            neruba_stage::Input {
                                offset,
                                key: None,
                                payload,
                            },
                            &catalog,
                        )
                        .expect("apply");
                    offset += 1;
                }
                black_box(state.take_outputs());
                black_box(state.take_counts());
                state.commit().expect("commit");
            },
            BatchSize::PerIteration,
        );
    });

    let mut next = 0usize;
    group.bench_function("raw/decode", |b| {
        b.iter_batched(
            || next_batch(&mut next),
            |mut payloads| {
                for payload in &mut payloads {
                    black_box(codec::decode(payload).expect("decode"));
                }
            },
            BatchSize::PerIteration,
        );
    });

    let raw_dir = tempfile::tempdir().expect("temp dir");
    let db = rocksdb::DB::open_default(raw_dir.path()).expect("open raw db");
    let mut next = 0usize;
    group.bench_function("raw/put_ids", |b| {
        b.iter_batched(
            || {
                let ids: Vec<String> = (next..next + BATCH)
                    .map(|i| event(i, PER_HOUR).id)
                    .collect();
                next += BATCH;
                ids
            },
            |ids| {
                let mut batch = rocksdb::WriteBatch::default();
                for id in &ids {
                    batch.put(id.as_bytes(), 0i64.to_be_bytes());
                }
                db.write(batch).expect("write");
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}
criterion_main!(benches);
