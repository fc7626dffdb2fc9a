//! Workloads shared by the benchmarks: realistic events of the size SDKs send (~200 bytes).

use neruba_schemas::event::format_time_ms;

/// A JSON array of `n` typical events (about 200 bytes each), timestamps near `now_ms`.
pub fn typical_batch(n: usize, now_ms: i64) -> String {
    let mut body = String::with_capacity(n * 220);
    body.push('[');
    for i in 0..n {
        if i > 0 {
            body.push(',');
        }
        let millis = now_ms - i64::try_from(i % 60_000).unwrap_or(0);
        body.push_str(&format!(
            r#"{{"specversion":"1.0","id":"evt-{i:012}","type":"llm.completion","subject":"customer-{c:05}","source":"sdk","time":"{t}","data":{{"model":"large","tokens":{tokens},"status":"ok"}}}}"#,
            c = i % 5000,
            t = format_time_ms(millis),
            tokens = 100 + i % 4000,
        ));
    }
    body.push(']');
    body
}

/// Sum of every sample of counter `name` in `registry` (integer counters: exact).
pub fn counter(registry: &prometheus::Registry, name: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter().map(|m| m.get_counter().get_value()))
        .map(|v| {
            if v.is_finite() && v > 0.0 {
                v as u64
            } else {
                0
            }
        })
        .sum()
}

/// The process's peak resident set size, KiB (Linux `VmHWM`).
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Items per second; floating point for the report only.
#[allow(clippy::float_arithmetic)]
pub fn rate(items: usize, elapsed: std::time::Duration) -> f64 {
    items as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Awaits futures in order (each is already in flight).
pub async fn join_in_order<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(futures.len());
    for f in futures {
        out.push(f.await);
    }
    out
}

pub mod rating;
