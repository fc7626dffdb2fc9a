//! The aggregator's benchmark workload, shared by the end-to-end and the state benchmarks.

use neruba_schemas::Event;

/// Two meters on one event type: a sum grouped by model and a count, 1-minute windows.
pub const CATALOG: &str = r#"
[[tenants]]
id = "acme"

[[tenants.meters]]
key = "tokens"
event_type = "llm.completion"
aggregation = "sum"
value = "$.tokens"
group_by = { model = "$.model" }
window = "1m"

[[tenants.meters]]
key = "calls"
event_type = "llm.completion"
aggregation = "count"
window = "1m"
"#;

/// ~200-byte events: 200 customers, two models, times over one hour, 5 % repeated ids
/// (scattered when [`random_ids`]).
pub fn workload(n: usize) -> Vec<Event> {
    (0..n).map(|i| stream_event(i, n)).collect()
}

/// Whether ids are unordered (`NERUBA_BENCH_IDS=random`): each id is then 32 hex digits of a
/// hash of it, as the client library makes ids (no order), so a lookup cannot skip a stored
/// file by its key range.
pub fn random_ids() -> bool {
    static RANDOM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *RANDOM.get_or_init(|| std::env::var("NERUBA_BENCH_IDS").is_ok_and(|ids| ids == "random"))
}

/// `id` as 32 hex digits of two 64-bit FNV-1a hashes of it: the same id (a repeat) gives the
/// same digits, and consecutive ids scatter.
pub fn scattered(id: &str) -> String {
    let fnv = |seed: u64| {
        id.bytes().fold(seed, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    format!(
        "{:016x}{:016x}",
        fnv(0xcbf2_9ce4_8422_2325),
        fnv(0x8422_2325_cbf2_9ce4)
    )
}

/// [`event`], its id scattered when [`random_ids`].
pub fn stream_event(i: usize, per_hour: usize) -> Event {
    let mut event = event(i, per_hour);
    if random_ids() {
        event.id = scattered(&event.id);
    }
    event
}

/// The `i`-th event of a stream of `per_hour` events per hour of event time (ids and times
/// keep increasing past one hour, so a stream can run as long as a benchmark needs).
pub fn event(i: usize, per_hour: usize) -> Event {
    let start = 1_790_000_000_000_i64;
    let id = if i % 20 == 7 { i - 1 } else { i };
    let data = serde_json::json!({
        "model": if i.is_multiple_of(3) { "large" } else { "small" },
        "tokens": format!("{}", 100 + (i * 37) % 4000),
        "status": "ok"
    });
    let i = i64::try_from(i).unwrap_or(i64::MAX);
    Event {
        tenant: "acme".into(),
        id: format!("evt-{id:012}"),
        event_type: "llm.completion".into(),
        subject: format!("customer-{:05}", i % 200),
        time_ms: start + i * 3_600_000 / i64::try_from(per_hour).unwrap_or(1).max(1),
        received_ms: start,
        source: Some("bench".into()),
        data: data.as_object().cloned().unwrap_or_default(),
    }
}
