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

/// Input messages a stage in `registry` has written (its state and offsets made durable, after
/// the broker acknowledged the batch's outputs), from its `neruba_stage_batch_messages`
/// histogram: a stage is done with a message once this counts it.
#[allow(clippy::float_arithmetic)]
pub fn written(registry: &prometheus::Registry) -> u64 {
    let sum: f64 = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "neruba_stage_batch_messages")
        .flat_map(|f| f.get_metric().iter())
        .map(|m| m.get_histogram().get_sample_sum())
        .sum();
    if sum.is_finite() && sum > 0.0 {
        sum as u64
    } else {
        0
    }
}

/// Where a stage's batches spent their time, from its `neruba_stage_batch_*` histograms in
/// `registry`: each phase's total seconds and batches, the bucket bounds of its median, 90th
/// percentile and slowest batch (a few slow batches, such as a first delivery waiting for the
/// producer's id, show there), and the mean input messages per batch.
#[allow(clippy::float_arithmetic)]
pub fn batch_phases(registry: &prometheus::Registry) -> String {
    let families = registry.gather();
    let histograms = |name: &str| {
        families
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .collect::<Vec<_>>()
    };
    let mut phases = Vec::new();
    for metric in histograms("neruba_stage_batch_seconds") {
        let phase = metric
            .get_label()
            .iter()
            .find(|l| l.name() == "phase")
            .map_or("?", |l| l.value());
        let h = metric.get_histogram();
        phases.push(format!(
            "{phase} {:.2} s ({} batches, p50 ≤ {} ms, p90 ≤ {} ms, slowest ≤ {} ms)",
            h.get_sample_sum(),
            h.get_sample_count(),
            bucket_bound_ms(h, 0.5),
            bucket_bound_ms(h, 0.9),
            bucket_bound_ms(h, 1.0)
        ));
    }
    let (messages, batches) = histograms("neruba_stage_batch_messages")
        .iter()
        .map(|m| m.get_histogram())
        .fold((0.0, 0), |(sum, count), h| {
            (sum + h.get_sample_sum(), count + h.get_sample_count())
        });
    format!(
        "{}; {:.0} input messages per written batch",
        phases.join(", "),
        messages / batches.max(1) as f64
    )
}

/// The upper bound, in milliseconds, of the histogram bucket that holds its `quantile`: the
/// batches' times are only known to their buckets. `inf` past the last bound, `–` when there
/// were none.
#[allow(clippy::float_arithmetic)]
fn bucket_bound_ms(h: &prometheus::proto::Histogram, quantile: f64) -> String {
    if h.get_sample_count() == 0 {
        return "–".to_owned();
    }
    let wanted = h.get_sample_count() as f64 * quantile;
    h.get_bucket()
        .iter()
        .find(|b| b.cumulative_count() as f64 >= wanted)
        .map_or_else(
            || "inf".to_owned(),
            |b| format!("{}", b.upper_bound() * 1000.0),
        )
}

/// The process's peak resident set size, KiB (Linux `VmHWM`).
pub fn peak_rss_kib() -> u64 {
    status_kib("VmHWM:")
}

/// Starts the process's peak resident set size (`VmHWM`) again from its size now (Linux
/// `/proc/self/clear_refs`), so that a later [`peak_rss_kib`] measures one phase.
pub fn reset_peak_rss() -> std::io::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
}

/// The process's resident set size now, KiB (Linux `VmRSS`).
pub fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// A KiB figure of `/proc/self/status` (0 where there is none).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
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

/// A stage's progress as a bench watches it, polling a count of what it has done. Raw clients
/// and floors are timed from their first message; a stage timed from its start also pays for
/// opening its stores, creating its clients and its first fetch, which those leave out. So a
/// stage is reported both ways: from its start, and over what it did after it was first seen
/// at work (the count then, and when), which is the like-for-like rate.
#[derive(Debug)]
pub struct Progress {
    begun: std::time::Instant,
    first: Option<(std::time::Instant, u64)>,
}

/// What [`Progress`] saw by the stage's end.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    /// What the stage did in all.
    pub done: u64,
    /// From the stage's start to its end.
    pub from_start: std::time::Duration,
    /// Done after it was first seen at work, and the time that took; `None` if it was first
    /// seen at work already done (then there is no rate at work to give).
    pub after_first: Option<(u64, std::time::Duration)>,
}

impl Progress {
    /// Starts the clock: just before the stage is started.
    pub fn start() -> Self {
        Self {
            begun: std::time::Instant::now(),
            first: None,
        }
    }

    /// What the stage has done by now: the first count above zero marks it at work. With
    /// several workers that is the first count any of them made public, so the others' start
    /// up to then is still in the time at work.
    pub fn observe(&mut self, done: u64) {
        if done > 0 && self.first.is_none() {
            self.first = Some((std::time::Instant::now(), done));
        }
    }

    /// The stage's end, having done `done` in all.
    pub fn end(self, done: u64) -> Timed {
        let from_start = self.begun.elapsed();
        let after_first = self.first.and_then(|(at, then)| {
            let later = done.checked_sub(then).filter(|n| *n > 0)?;
            Some((later, at.elapsed()))
        });
        Timed {
            done,
            from_start,
            after_first,
        }
    }
}

impl Timed {
    /// Items per second from the start.
    pub fn rate_from_start(&self) -> f64 {
        rate(
            usize::try_from(self.done).unwrap_or(usize::MAX),
            self.from_start,
        )
    }

    /// Items per second after it was first seen at work; `None` if it was first seen with all
    /// of it done.
    pub fn rate_at_work(&self) -> Option<f64> {
        self.after_first
            .map(|(later, took)| rate(usize::try_from(later).unwrap_or(usize::MAX), took))
    }

    /// Both rates, as a bench's report line says them, in `unit`s.
    pub fn report(&self, unit: &str) -> String {
        let whole = format!(
            "{} {unit} in {:.2?} from its start to its last write = {:.0} {unit}/s",
            self.done,
            self.from_start,
            self.rate_from_start()
        );
        match (self.after_first, self.rate_at_work()) {
            (Some((later, took)), Some(at_work)) => format!(
                "{whole}; {later} {unit} in {took:.2?} after it was first seen at work, {:.2?} in = {at_work:.0} {unit}/s",
                self.before_work(),
            ),
            _ => format!("{whole}; first seen at work with all of it done: no rate at work"),
        }
    }

    /// `self`'s rates against a baseline's `base`, as the reports say them.
    #[allow(clippy::float_arithmetic)]
    pub fn ratios(&self, base: f64) -> String {
        let at_work = self
            .rate_at_work()
            .map_or_else(|| "n/a".to_owned(), |r| format!("{:.2}", r / base));
        format!(
            "{at_work} at work ({:.2} from its start)",
            self.rate_from_start() / base
        )
    }

    /// The time before it was first seen at work: its start, and what it did until then.
    pub fn before_work(&self) -> std::time::Duration {
        self.after_first
            .map_or(std::time::Duration::ZERO, |(_, took)| {
                self.from_start.saturating_sub(took)
            })
    }
}

/// Awaits futures in order (each is already in flight).
pub async fn join_in_order<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(futures.len());
    for f in futures {
        out.push(f.await);
    }
    out
}

pub mod aggregation;
pub mod balances;
pub mod rating;

/// A tansu broker process for the load generators (`NERUBA_BENCH_BROKER=tansu`): the SPEC's
/// "broker on the same machine", where the embedded mock broker is an in-process stand-in.
/// Killed on drop.
#[derive(Debug)]
pub struct TansuProcess {
    child: std::process::Child,
    pub bootstrap: String,
}

impl TansuProcess {
    /// Starts `NERUBA_TANSU` (default `$HOME/.cache/neruba-tools/bin/tansu`) on a free port
    /// with in-memory storage and creates `topics` as `(name, partitions)`.
    pub async fn start(topics: &[(&str, i32)]) -> anyhow::Result<Self> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let binary = std::env::var_os("NERUBA_TANSU")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|h| std::path::PathBuf::from(h).join(".cache/neruba-tools/bin/tansu"))
            })
            .ok_or_else(|| anyhow::anyhow!("set NERUBA_TANSU"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let broker = Self {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
        };
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &broker.bootstrap)
                .create()?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        let started = std::time::Instant::now();
        loop {
            match admin.create_topics(&new, &AdminOptions::new()).await {
                Ok(results) if results.iter().all(Result::is_ok) => return Ok(broker),
                _ if started.elapsed() > std::time::Duration::from_secs(20) => {
                    anyhow::bail!("tansu did not create the topics")
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
    }
}

impl Drop for TansuProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number in the environment variable `name`, or `default` (unset or not a number).
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
