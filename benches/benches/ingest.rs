//! Gateway hot paths without the network: decode + validate a batch, and the dedup cache.
//!
//! Each group measures a raw component in the same run (plain `serde_json` parsing of the same
//! bytes; a bare `DashMap`), so results read as ratios, not absolute numbers from one machine.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use neruba_benches::typical_batch;
use neruba_ingest_gateway::admit;
use neruba_ingest_gateway::dedup::{DedupCache, Key};
use neruba_schemas::event::{self, Limits};
use neruba_schemas::framing::{self as body, Framing};
use neruba_schemas::{Catalog, codec};
use std::hint::black_box;
use std::time::Duration;

const BATCH: usize = 1000;
/// A batch body's events, as the gateway frames them (its default limits).
fn frames(body: &[u8]) -> Vec<body::Framed<'_>> {
    body::split(Framing::Batch, body, 10_000, 64 * 1024)
        .expect("frames")
        .into_iter()
        .map(body::Frame::framed)
        .collect()
}

fn catalog() -> Catalog {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../catalog/sample.toml"
    ))
    .expect("sample catalog readable");
    Catalog::from_toml_str(&text, "sample.toml").expect("sample catalog valid")
}

fn decode_validate(c: &mut Criterion) {
    let now = event::now_ms();
    let body = typical_batch(BATCH, now);
    let catalog = catalog();
    let tenant = catalog.tenant("acme").expect("acme");
    let limits = Limits::default();
    let mut group = c.benchmark_group("ingest_decode_validate");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("raw_serde_json_parse", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_str(black_box(&body)).expect("json");
            black_box(v)
        })
    });
    group.bench_function("split_validate_check_values", |b| {
        b.iter(|| {
            let framed = frames(black_box(body.as_bytes()));
            let mut accepted = 0usize;
            for item in framed {
                let Ok(envelope) = item.value else { continue };
                if let Ok(e) = event::validate_envelope(envelope, item.len, "acme", now, &limits)
                    && tenant.check_values(&e).is_ok()
                {
                    accepted += 1;
                }
            }
            assert_eq!(accepted, BATCH);
        })
    });
    // The same, each event parsed whole into a `Value` first (how the gateway read a batch's
    // events until November 29, 2026: as text, which serde_json checked while framing them),
    // in the same run.
    group.bench_function("split_whole_value_validate_check_values", |b| {
        b.iter(|| {
            let raws: Vec<&serde_json::value::RawValue> =
                serde_json::from_slice(black_box(body.as_bytes())).expect("frames");
            let mut accepted = 0usize;
            for raw in raws {
                let Ok(value) = serde_json::from_str(raw.get()) else {
                    continue;
                };
                if let Ok(e) = event::validate(value, raw.get().len(), "acme", now, &limits)
                    && tenant.check_values(&e).is_ok()
                {
                    accepted += 1;
                }
            }
            assert_eq!(accepted, BATCH);
        })
    });
    // What the gateway does to each event (validate, encode in version 2, check the values its
    // meters read): since November 30, 2026 with `data` written from its JSON text; since
    // December 3 its values checked where they lie in the message, none built.
    group.bench_function("split_admit_encode_v2_from_text", |b| {
        b.iter(|| {
            let framed = frames(black_box(body.as_bytes()));
            let mut bytes = 0usize;
            for item in framed {
                if let Ok(out) = admit::event(tenant, item, now, &limits, codec::Encoding::Binary) {
                    bytes += out.payload.len();
                }
            }
            assert!(bytes > 0);
            black_box(bytes)
        })
    });
    // The events-topic encodings, version 2 (binary, what the gateway writes) and version 1
    // (JSON), written and read in the same run.
    for (name, encoding) in [
        ("v2_binary", codec::Encoding::Binary),
        ("v1_json", codec::Encoding::Json),
    ] {
        group.bench_function(format!("split_validate_encode_{name}"), |b| {
            b.iter(|| {
                let framed = frames(black_box(body.as_bytes()));
                let mut bytes = 0usize;
                for item in framed {
                    let Ok(envelope) = item.value else { continue };
                    if let Ok(e) =
                        event::validate_envelope(envelope, item.len, "acme", now, &limits)
                    {
                        bytes += encoding.encode(&e).len();
                    }
                }
                black_box(bytes)
            })
        });
        let encoded: Vec<Vec<u8>> = {
            let framed = frames(body.as_bytes());
            framed
                .into_iter()
                .filter_map(|f| f.value.ok())
                .filter_map(|v| event::validate_envelope(v, 200, "acme", now, &limits).ok())
                .map(|e| encoding.encode(&e))
                .collect()
        };
        let mut decoder = codec::Decoder::default();
        group.bench_function(format!("events_topic_decode_{name}"), |b| {
            b.iter(|| {
                for m in &encoded {
                    black_box(decoder.decode(m).expect("decode"));
                }
            })
        });
    }
    group.finish();
}

fn dedup(c: &mut Criterion) {
    let key = |tenant, id| Key {
        tenant,
        subject: "c1",
        id,
    };
    const KEYS: usize = 100_000;
    let ids: Vec<String> = (0..KEYS).map(|i| format!("evt-{i:012}")).collect();
    let mut group = c.benchmark_group("dedup_cache");
    group.throughput(Throughput::Elements(KEYS as u64));
    group.bench_function("raw_dashmap_insert", |b| {
        b.iter(|| {
            let map: dashmap::DashMap<String, (), ahash::RandomState> = Default::default();
            for id in &ids {
                map.insert(format!("acme\0c1\0{id}"), ());
            }
            black_box(map.len())
        })
    });
    group.bench_function("insert", |b| {
        b.iter(|| {
            let cache = DedupCache::new(1_000_000, Duration::from_secs(3600));
            for id in &ids {
                cache.insert(key("acme", id));
            }
            black_box(cache.len())
        })
    });
    let cache = DedupCache::new(1_000_000, Duration::from_secs(3600));
    for id in &ids {
        cache.insert(key("acme", id));
    }
    group.bench_function("lookup_hit", |b| {
        b.iter(|| {
            ids.iter()
                .filter(|id| cache.contains(key("acme", id)))
                .count()
        })
    });
    group.bench_function("lookup_miss", |b| {
        b.iter(|| {
            ids.iter()
                .filter(|id| cache.contains(key("beta", id)))
                .count()
        })
    });
    // As the gateway takes them: a request's keys together (the end-to-end benchmark's
    // requests are of 500 events), each hashed once and each shard locked once a request.
    group.bench_function("remember_requests_of_500", |b| {
        b.iter(|| {
            let cache = DedupCache::new(1_000_000, Duration::from_secs(3600));
            for request in ids.chunks(500) {
                cache.remember_all(request.iter().map(|id| (key("acme", id), None)));
            }
            black_box(cache.len())
        })
    });
    for (name, tenant) in [("hit", "acme"), ("miss", "beta")] {
        group.bench_function(format!("sightings_requests_of_500_{name}"), |b| {
            b.iter(|| {
                ids.chunks(500)
                    .map(|request| {
                        let keys = request.iter().map(|id| key(tenant, id));
                        admit::sightings(&cache, keys).firsts().count()
                    })
                    .sum::<usize>()
            })
        });
    }
    // A request's whole way through the cache, every key new: looked up, then its first
    // sightings remembered once the broker has them; from the sightings' own keys, or written
    // and hashed again (as the gateway did before December 4, later).
    let admit_and_remember = |again: bool| {
        let cache = DedupCache::new(1_000_000, Duration::from_secs(3600));
        for request in ids.chunks(500) {
            let keys = request.iter().map(|id| key("acme", id));
            let seen = admit::sightings(&cache, keys);
            if again {
                let firsts = seen.firsts().filter_map(|i| request.get(i));
                cache.remember_all(firsts.map(|id| (key("acme", id), None)));
            } else {
                seen.remember(&cache, seen.firsts().map(|i| (i, None)));
            }
        }
        cache.len()
    };
    group.bench_function("admit_and_remember_requests_of_500", |b| {
        b.iter(|| black_box(admit_and_remember(false)))
    });
    group.bench_function("admit_and_remember_requests_of_500_keys_again", |b| {
        b.iter(|| black_box(admit_and_remember(true)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = decode_validate, dedup
}
criterion_main!(benches);
