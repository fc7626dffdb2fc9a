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
