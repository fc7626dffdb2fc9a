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

/// ~200-byte events: 200 customers, two models, times over one hour, 5 % repeated ids.
pub fn workload(n: usize) -> Vec<Event> {
    (0..n).map(|i| event(i, n)).collect()
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
