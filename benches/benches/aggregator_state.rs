//! The aggregator's state machine alone, per batch of 5,000 events, no broker: where a
//! worker's CPU goes, without the noise of a Kafka round trip.
//!
//! - `state/apply_commit`: decode, dedup check, fold into windows and periods, close windows
//!   (rollups taken, not sent), then the atomic RocksDB write of the batch;
//! - `state/apply_commit_v1_json` and `raw/decode_v1_json`: the same on events in version 1
//!   of the events-topic encoding (JSON), which the gateway wrote before version 2;
//! - raw components in the same run, on the same payloads: `raw/decode` (decoding each
//!   event into one reused event, as the aggregator does: what any consumer must do),
//!   `raw/put_ids` (one RocksDB put per event id in one
//!   write batch) and `raw/decode_get_put_ids` (decoding each event, looking its id up and
//!   putting it: the dedup floor, the least any aggregator with a durable dedup set pays),
//!   and `raw/decode_multiget_put_ids` (the same with a batch's lookups made together, as
//!   the aggregator reads ahead: the floor for an aggregator that batches its lookups).
//!
//! `NERUBA_BENCH_READ_AHEAD=n` sets how many events the state machine reads ahead (1: none;
//! by default as many as the stage does).
//!
//! The stream runs on across iterations (ids and event times keep increasing), so the state
//! grows and windows close as in a long run. `NERUBA_BENCH_IDS=random` gives each event id
//! as 32 hex digits of a hash of it instead (as the client library makes ids: no order), so
//! a lookup cannot skip a stored file by its key range.

// The allocator the `neruba` binary runs with.
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use neruba as _;
use neruba_aggregator::state::{PartitionState, Timing};
use neruba_benches::aggregation::{self, CATALOG};
use neruba_schemas::{Catalog, codec};
use neruba_stage::Partition as _;
use std::hint::black_box;

const BATCH: usize = 5_000;
const PER_HOUR: usize = 300_000;
const DAY_MS: i64 = 86_400_000;

/// How many events the state machine reads ahead (`NERUBA_BENCH_READ_AHEAD`; 1: none),
/// by default as many as the stage does.
fn read_ahead() -> usize {
    static AHEAD: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *AHEAD.get_or_init(|| {
        std::env::var("NERUBA_BENCH_READ_AHEAD")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(neruba_aggregator::state::READ_AHEAD)
            .max(1)
    })
}

/// The event `i` of the stream, its id scattered when ids are random.
fn stream_event(i: usize) -> neruba_schemas::Event {
    aggregation::stream_event(i, PER_HOUR)
}

/// The next `BATCH` events of the stream, from event `*next` on, in `encoding`.
fn next_batch(next: &mut usize, encoding: codec::Encoding) -> Vec<Vec<u8>> {
    let batch = (*next..*next + BATCH)
        .map(|i| encoding.encode(&stream_event(i)))
        .collect();
    *next += BATCH;
    batch
}

/// A store of its own in a new temporary directory, tuned as the aggregator's is (its own
/// 64 MiB block cache): where a floor keeps its ids.
fn floor_store(timing: Timing) -> (tempfile::TempDir, neruba_stage::Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = rocksdb::Cache::new_lru_cache(64 << 20);
    let store = neruba_stage::Store::open(
        dir.path(),
        0,
        &neruba_aggregator::state::store_options(timing),
        &cache,
    )
    .expect("open floor store");
    (dir, store)
}

fn bench(c: &mut Criterion) {
    let catalog = Catalog::from_toml_str(CATALOG, "bench").expect("bench catalog");
    let timing = Timing {
        grace_ms: 10_000,
        correction_horizon_ms: 35 * DAY_MS,
        dedup_horizon_ms: 35 * DAY_MS,
        max_open_window_bytes: neruba_aggregator::state::MAX_OPEN_WINDOW_BYTES,
    };
    let mut group = c.benchmark_group("aggregator");
    group.throughput(Throughput::Elements(BATCH as u64));

    // Events as the gateway writes them (version 2, binary), and in version 1 (JSON): the
    // same stream, each into a state of its own.
    for (suffix, encoding) in [
        ("", codec::Encoding::Binary),
        ("_v1_json", codec::Encoding::Json),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = rocksdb::Cache::new_lru_cache(64 << 20);
        let mut state = PartitionState::open(dir.path(), 0, timing, &cache).expect("open state");
        let mut next = 0usize;
        let mut offset = 0i64;
        group.bench_function(format!("state/apply_commit{suffix}"), |b| {
            b.iter_batched(
                || next_batch(&mut next, encoding),
                |payloads| {
                    for payloads in payloads.chunks(read_ahead()) {
                        if read_ahead() > 1 {
                            let first = offset;
                            let inputs: Vec<neruba_stage::Input<'_>> = payloads
                                .iter()
                                .zip(first..)
                                .map(|(payload, offset)| neruba_stage::Input {
                                    offset,
                                    key: None,
                                    payload,
                                })
                                .collect();
                            state.read_ahead(&inputs).expect("read ahead");
                        }
                        for payload in payloads {
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
                    }
                    black_box(state.take_outputs());
                    black_box(state.take_counts());
                    state.commit().expect("commit");
                },
                BatchSize::PerIteration,
            );
        });

        let mut next = 0usize;
        let mut decoder = codec::Decoder::default();
        // Into one reused event, as the aggregator decodes.
        let mut event = neruba_schemas::Event::default();
        group.bench_function(format!("raw/decode{suffix}"), |b| {
            b.iter_batched(
                || next_batch(&mut next, encoding),
                |payloads| {
                    for payload in &payloads {
                        decoder.decode_into(payload, &mut event).expect("decode");
                        black_box(&event);
                    }
                },
                BatchSize::PerIteration,
            );
        });
    }

    let raw_dir = tempfile::tempdir().expect("temp dir");
    let db = rocksdb::DB::open_default(raw_dir.path()).expect("open raw db");
    let mut next = 0usize;
    group.bench_function("raw/put_ids", |b| {
        b.iter_batched(
            || {
                let ids: Vec<String> = (next..next + BATCH).map(|i| stream_event(i).id).collect();
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

    // The dedup floor: decode each event, look its id up in RocksDB (a miss, as for every new
    // event) and put it, in one write batch per 5,000, into a store tuned as the aggregator's
    // is. The least any aggregator that keeps the durable dedup set pays per event.
    let (_floor_dir, floor) = floor_store(timing);
    let mut next = 0usize;
    let mut decoder = codec::Decoder::default();
    let mut event = neruba_schemas::Event::default();
    group.bench_function("raw/decode_get_put_ids", |b| {
        b.iter_batched(
            || next_batch(&mut next, codec::Encoding::Binary),
            |payloads| {
                let mut batch = rocksdb::WriteBatch::default();
                for payload in &payloads {
                    decoder.decode_into(payload, &mut event).expect("decode");
                    let key =
                        neruba_aggregator::keys::dedup(&event.tenant, &event.subject, &event.id);
                    if floor.db().get(&key).expect("get").is_none() {
                        batch.put(&key, event.received_ms.max(event.time_ms).to_be_bytes());
                    }
                }
                floor.db().write(batch).expect("write");
            },
            BatchSize::PerIteration,
        );
    });

    // The dedup floor with the batch's lookups made together (RocksDB's batched lookup, keys
    // sorted), as the aggregator reads ahead: the least an aggregator that batches its
    // lookups pays per event.
    let (_multi_dir, multi) = floor_store(timing);
    let mut next = 0usize;
    let mut decoder = codec::Decoder::default();
    let mut event = neruba_schemas::Event::default();
    group.bench_function("raw/decode_multiget_put_ids", |b| {
        b.iter_batched(
            || next_batch(&mut next, codec::Encoding::Binary),
            |payloads| {
                let mut keys = Vec::with_capacity(payloads.len());
                let mut anchors = Vec::with_capacity(payloads.len());
                for payload in &payloads {
                    decoder.decode_into(payload, &mut event).expect("decode");
                    keys.push(neruba_aggregator::keys::dedup(
                        &event.tenant,
                        &event.subject,
                        &event.id,
                    ));
                    anchors.push(event.received_ms.max(event.time_ms));
                }
                let mut order: Vec<usize> = (0..keys.len()).collect();
                order.sort_unstable_by(|&a, &b| keys[a].cmp(&keys[b]));
                let found = multi
                    .multi_get_sorted(order.iter().map(|&i| keys[i].as_slice()))
                    .expect("batched lookup");
                let mut batch = rocksdb::WriteBatch::default();
                for (&i, found) in order.iter().zip(found) {
                    if found.is_none() {
                        batch.put(&keys[i], anchors[i].to_be_bytes());
                    }
                }
                multi.db().write(batch).expect("write");
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
