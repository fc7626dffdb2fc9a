//! The whole pipeline on a real broker process, against the raw round trip through that broker.
//!
//! A tansu broker process; `neruba gateway`, `aggregator`, `rater` and `balances` as processes;
//! `neruba loadgen` (a process too) sending CloudEvents over HTTP in batches of 500 on
//! keep-alive connections. Everything shares the machine, as on a small deployment. One run:
//!
//! 1. **raw produce**: an rdkafka producer with the gateway's settings (idempotent, `acks=all`,
//!    lz4, 5 ms linger) sends `N` events, encoded as the gateway encodes them, keyed as it keys
//!    them, and awaits every acknowledgement;
//!    The same events again from the JSON bodies loadgen sends, each parsed, validated and
//!    encoded first (the *gateway floor*: what any gateway must do before the produce);
//! 2. **raw round trip**: the same producer sends another `N` to a second topic while a plain
//!    consumer drains it: first send to last message consumed; and its CPU per event (this
//!    process's, producer and consumer, and the broker's);
//! 3. **gateway**: the gateway alone (no stage running) takes `N` events from loadgen; accepted
//!    events/s as a ratio to (1) (SPEC target ≥ 0.75) and to the gateway floor;
//! 4. **end to end at full speed**: all stages running, loadgen sends `N` events as fast as the
//!    gateway takes them; the time from the first request until the aggregator has folded every
//!    one of them and committed its position (the stages commit their group offsets after each
//!    durable batch); events/s as a ratio to (2) (SPEC target ≥ 0.5). Loadgen takes a share
//!    of the same cores that the raw round trip's producer does not (it generates, serializes
//!    and sends the events over HTTP), so (3) and (4) also give each process's CPU per event,
//!    loadgen's own (its report's `own_cpu`), and the ratio by CPU: the raw round trip's CPU
//!    per event over the pipeline's processes' together (gateway, stages, broker; the broker's
//!    includes this bench's ledger tail and offset polls). That ratio leaves out loadgen's
//!    share of the cores, though not the contention for them;
//! 5. **steady**: loadgen at 80 % of (4)'s rate for `NERUBA_E2E_STEADY` (default 10 minutes):
//!    window close → line item latency (the line item's broker timestamp − its window's end −
//!    the aggregator's grace, i.e. from the earliest moment the window may close; first
//!    revisions of windows that end after the first minute), and each process's RSS every
//!    5 s (SPEC: flat within ±10 %, compared after the first minute; each minute's reading is
//!    printed too, so warm-up can be told from growth, with each stage's memory by kind:
//!    RocksDB's memtables and block cache and the consumer's prefetch, which grow to their
//!    bounds), each stage's consumer lag at its worst in each minute, and, for each minute,
//!    where each stage's batches spent the time (its `neruba_stage_batch_*` histograms:
//!    apply, deliver, write) and each process's CPU, so a wait can be placed in a stage, a
//!    phase, or the broker.
//!
//! At the end the ledger must hold, to the token, the usage of the distinct events each
//! loadgen run had accepted, or the benchmark fails.
//!
//! `cargo bench -p neruba --bench end_to_end`; `NERUBA_E2E_EVENTS` (default 1,000,000),
//! `NERUBA_E2E_STEADY` (default `10m`), `NERUBA_E2E_STEADY_RATE` (default 80 % of (4)), `NERUBA_E2E_PARTITIONS` (default 4),
//! `NERUBA_E2E_CONNECTIONS` (default 8), `NERUBA_E2E_CUSTOMERS` (default 1,000).
//!
//! `NERUBA_E2E_UNTIL=gateway`: stop after (3). `NERUBA_E2E_BIN=<path>`: run that `neruba`
//! binary's processes (loadgen included) instead of this build's, to compare two builds A B A B
//! (the raw baselines and the floor are this build's code either way).
//! `NERUBA_E2E_WORKERS=<n>`: the gateway and the stages run with `--worker-threads <n>`
//! (loadgen, the floor and the raw baselines keep their threads; in (3) the gateway runs
//! alone, so there it is the gateway's only). A `NERUBA_E2E_BIN` built before the flag
//! (December 4) refuses it.
//! `NERUBA_E2E_GATEWAY_KAFKA_OPTS=<key=value,...>`: librdkafka settings for the gateway's
//! producer alone (its `--kafka-opt`), e.g. `linger.ms=25`; the raw producer keeps its 5 ms.
//! `NERUBA_E2E_AGGREGATOR_KAFKA_OPTS`, `NERUBA_E2E_RATER_KAFKA_OPTS` and
//! `NERUBA_E2E_BALANCES_KAFKA_OPTS` do the same for each stage's clients, e.g.
//! `fetch.wait.max.ms=100`; the raw consumers keep theirs.
//! `NERUBA_E2E_PROFILE=<file>`: record the gateway of (3) with `perf record --call-graph dwarf`
//! (the build keeps no frame pointers, so `-g` gave broken stacks) into `<file>` and stop after
//! (3) (perf slows what it samples, so that run's gateway figures are not the gateway's; read
//! the profile with `perf report -i <file>`).

// Rates, ratios and percentiles in the report are floating point; no quantity or amount is.
#![allow(clippy::float_arithmetic)]

#[path = "../tests/common/mod.rs"]
mod common;

use anyhow::{Context, Result, bail, ensure};
use common::{Broker, Proc, free_port};
use neruba::process::cpu;
use neruba_schemas::ledger::{Kind, LineItem};
use neruba_schemas::{Event, codec, topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::producer::BaseRecord;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const RAW_PRODUCE_TOPIC: &str = "bench.raw-produce";
const RAW_ROUND_TRIP_TOPIC: &str = "bench.raw-round-trip";
const GATEWAY_TOPIC: &str = "bench.gateway-events";
const FLOOR_TOPIC: &str = "bench.gateway-floor";
/// The aggregator's grace in this run (its default).
const GRACE: Duration = Duration::from_secs(10);
/// The aggregator's idle timeout: the last windows close this long after the last event.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const WINDOW: Duration = Duration::from_secs(60);
const TOKENS_METER: &str = "llm_tokens";
/// The stages the pipeline runs, in the order of its ops endpoints.
const STAGES: [&str; 3] = ["aggregator", "rater", "balances"];

struct Settings {
    events: u64,
    steady: Duration,
    partitions: i32,
    connections: u64,
    customers: u64,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let number = |name: &str, default: u64| -> Result<u64> {
            std::env::var(name)
                .ok()
                .map_or(Ok(default), |v| v.parse().with_context(|| name.to_owned()))
        };
        let steady = std::env::var("NERUBA_E2E_STEADY")
            .ok()
            .map_or(Ok(Duration::from_secs(600)), |v| {
                humantime::parse_duration(&v).context("NERUBA_E2E_STEADY")
            })?;
        Ok(Self {
            events: number("NERUBA_E2E_EVENTS", 1_000_000)?,
            steady,
            partitions: i32::try_from(number("NERUBA_E2E_PARTITIONS", 4)?)?,
            connections: number("NERUBA_E2E_CONNECTIONS", 8)?,
            customers: number("NERUBA_E2E_CUSTOMERS", 1000)?,
        })
    }
}

/// The `neruba` the processes run: `NERUBA_E2E_BIN`, else this build's.
fn binary() -> PathBuf {
    std::env::var_os("NERUBA_E2E_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_neruba")),
        PathBuf::from,
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn rate(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The events loadgen sends (same type, customers, ids and data shape), as the gateway hands
/// them to its producer.
fn raw_events(run: &str, n: u64, customers: u64) -> Vec<Event> {
    let now = now_ms();
    let models = ["small", "medium", "large"];
    (0..n)
        .map(|i| {
            let mut data = serde_json::Map::new();
            let model = models
                .get(usize::try_from(i % 3).unwrap_or(0))
                .copied()
                .unwrap_or("small");
            data.insert("model".into(), json!(model));
            data.insert("tokens".into(), json!(1 + (i * 7919) % 4000));
            data.insert("status".into(), json!("ok"));
            Event {
                tenant: "acme".into(),
                id: format!("{run}-e{i}"),
                event_type: "llm.completion".into(),
                subject: format!("{run}-c{}", (i * 2_654_435_761) % customers.max(1)),
                time_ms: now,
                received_ms: now,
                source: Some("loadgen".into()),
                data,
            }
        })
        .collect()
}

/// Sends `events` to `topic` with the gateway's producer settings; returns when every one is
/// acknowledged.
async fn produce(bootstrap: &str, topic: &str, events: &[Event]) -> Result<()> {
    let producer =
        neruba_kafka::clients::gateway_producer(bootstrap, Duration::from_secs(60), &[])?;
    for chunk in events.chunks(20_000) {
        let mut sends = producer.sends(chunk.len());
        for event in chunk {
            let payload = codec::encode(event);
            let key = event.partition_key();
            sends.send(BaseRecord::to(topic).key(&key).payload(&payload));
        }
        all_landed(sends.acks().await)?;
    }
    Ok(())
}

/// `events` as loadgen sends them: CloudEvents JSON arrays of 500.
fn bodies(events: &[Event]) -> Result<Vec<Vec<u8>>> {
    events
        .chunks(500)
        .map(|chunk| {
            let array: Vec<Value> = chunk
                .iter()
                .map(|e| {
                    json!({
                        "specversion": "1.0",
                        "id": e.id,
                        "type": e.event_type,
                        "subject": e.subject,
                        "source": "loadgen",
                        "time": neruba_schemas::event::format_time_ms(e.time_ms),
                        "data": e.data,
                    })
                })
                .collect();
            Ok(serde_json::to_vec(&array)?)
        })
        .collect()
}

/// The floor under any gateway: what it must do to each event of those bodies whatever its
/// design (parse the framing, validate the event and its meter values, encode it for the
/// events topic), then the raw producer's work; no HTTP, no repeat filter, one thread.
async fn produce_from_bodies(
    bootstrap: &str,
    topic: &str,
    bodies: &[Vec<u8>],
    catalog: &neruba_schemas::Catalog,
) -> Result<u64> {
    use neruba_schemas::framing::{self, Framing};
    let tenant = catalog.tenant("acme").context("acme")?;
    let limits = neruba_schemas::event::Limits::default();
    let producer =
        neruba_kafka::clients::gateway_producer(bootstrap, Duration::from_secs(60), &[])?;
    let mut sent = 0u64;
    for group in bodies.chunks(40) {
        let mut sends = producer.sends(group.len() * 500);
        for body in group {
            let now = now_ms();
            for framed in framing::split(Framing::Batch, body, 10_000, limits.max_event_bytes)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?
            {
                let event = neruba_ingest_gateway::admit::event(
                    tenant,
                    framed.framed(),
                    now,
                    &limits,
                    codec::Encoding::Binary,
                )
                .map_err(|e| anyhow::anyhow!("{}", e.rejection.message))?;
                let mut key = String::new();
                event.write_partition_key(&mut key);
                sends.send(BaseRecord::to(topic).key(&key).payload(&event.payload));
                sent += 1;
            }
        }
        all_landed(sends.acks().await)?;
    }
    Ok(sent)
}

/// Whether every record of a batch landed; the first that did not, with why.
fn all_landed(outcomes: Vec<Result<neruba_kafka::Landed, KafkaError>>) -> Result<()> {
    for (index, outcome) in outcomes.into_iter().enumerate() {
        outcome.map_err(|e| anyhow::anyhow!("record {index} of the batch: {e}"))?;
    }
    Ok(())
}

/// A consumer of all of `topic`'s partitions from `offset`, outside any group.
fn reader(bootstrap: &str, topic: &str, partitions: i32, offset: Offset) -> Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(topic, partition, offset)?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// Drains `expected` messages of `topic`; returns when the last arrived.
fn drain(bootstrap: &str, topic: &str, partitions: i32, expected: u64) -> Result<Instant> {
    let consumer = reader(bootstrap, topic, partitions, Offset::Beginning)?;
    let mut seen = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < expected {
        ensure!(Instant::now() < deadline, "drained {seen} of {expected}");
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            message?;
            seen += 1;
        }
    }
    Ok(Instant::now())
}

/// The sum of `group`'s committed offsets on `topic` and the topic's end offsets.
/// A consumer group's committed position on a topic, asked of the broker. One client for the
/// whole run: it is polled every 50 ms while the pipeline is measured. (The topic's end offsets
/// are not asked: tansu's can trail the records it has already served.)
struct Progress {
    consumer: BaseConsumer,
    partitions: TopicPartitionList,
}

impl Progress {
    fn new(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(topic, partition);
        }
        Ok(Self {
            consumer,
            partitions: list,
        })
    }

    /// The sum of the group's committed offsets.
    fn committed(&self) -> Result<i64> {
        let committed = self
            .consumer
            .committed_offsets(self.partitions.clone(), Duration::from_secs(5))?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|element| match element.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => None,
            })
            .sum())
    }
}

/// Runs `neruba loadgen --json` with `args`; returns its report.
fn loadgen(args: &[String]) -> Result<Value> {
    let output = Command::new(binary())
        .arg("loadgen")
        .arg("--json")
        .args(args)
        .env("NERUBA_LOG", "warn")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "loadgen failed: {stderr}");
    serde_json::from_slice(&output.stdout).with_context(|| format!("loadgen report: {stderr}"))
}

/// Loadgen's own CPU per event it sent (its report's `own_cpu`, which a build from before it
/// does not give).
fn loadgen_cpu(report: &Value) -> String {
    match report
        .pointer("/own_cpu/ns_per_event")
        .and_then(Value::as_u64)
    {
        Some(ns) => format!("{:.2} µs", ns as f64 / 1000.0),
        None => "not reported".to_owned(),
    }
}

fn u(report: &Value, path: &str) -> u64 {
    report.pointer(path).and_then(Value::as_u64).unwrap_or(0)
}

/// The resident set of a process, KiB (`VmRSS`, or `VmHWM` for the peak).
fn rss_kib(pid: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time the whole machine has been busy (every process, loadgen's too): user, nice,
/// system, irq and softirq in `/proc/stat` (not idle, I/O wait, or time stolen by the host;
/// guest time is inside user and nice).
fn machine_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    let busy: u64 = fields
        .iter()
        .take(7)
        .enumerate()
        .filter(|(index, _)| *index != 3 && *index != 4)
        .map(|(_, ticks)| ticks)
        .sum();
    Some(Duration::from_millis(busy * 10))
}

/// CPU time a process has used since `before` (zero when either reading failed).
fn cpu_since(pid: &str, before: Option<Duration>) -> Duration {
    cpu(pid)
        .zip(before)
        .map(|(after, before)| after.saturating_sub(before))
        .unwrap_or_default()
}

/// Microseconds of CPU per event.
fn per_event_us(used: Duration, events: u64) -> f64 {
    used.as_secs_f64() * 1e6 / events.max(1) as f64
}

/// What the ledger holds, read from its beginning for the whole run.
#[derive(Default)]
struct LedgerTail {
    /// (customer, meter, group, window start) → (revision, window quantity): the latest
    /// revision of each window.
    windows: HashMap<(String, String, String, String), (u32, Decimal)>,
    /// (window end, window close → line item), milliseconds, for first revisions of the
    /// steady run's windows that end after `latency_from_ms`.
    latencies_ms: Vec<(i64, i64)>,
    items: u64,
}

impl LedgerTail {
    /// Σ window quantity of `meter` over the customers starting with `prefix`.
    fn quantity(&self, prefix: &str, meter: &str) -> Decimal {
        self.windows
            .iter()
            .filter(|((customer, m, _, _), _)| customer.starts_with(prefix) && m == meter)
            .map(|(_, (_, quantity))| *quantity)
            .sum()
    }
}

/// Reads the ledger until `stop`, into `tail`.
fn tail_ledger(
    consumer: &BaseConsumer,
    tail: &Mutex<LedgerTail>,
    stop: &AtomicBool,
    steady_prefix: &str,
    latency_from_ms: &Mutex<Option<i64>>,
) -> Result<()> {
    let grace_ms = i64::try_from(GRACE.as_millis())?;
    while !stop.load(Ordering::Relaxed) {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        if message
            .headers()
            .is_some_and(|h| h.iter().any(|h| h.key == topics::RECORD_HEADER))
        {
            continue;
        }
        let Ok(item) = LineItem::decode(message.payload().unwrap_or_default()) else {
            continue;
        };
        let written_ms = message.timestamp().to_millis();
        let window_end_ms = neruba_schemas::event::parse_time_ms(&item.window_end).ok();
        let mut tail = tail.lock().map_err(|_| anyhow::anyhow!("tail poisoned"))?;
        tail.items += 1;
        let from = *latency_from_ms
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        if item.revision == 1
            && item.kind == Kind::Usage
            && item.customer.starts_with(steady_prefix)
            && let (Some(written), Some(end), Some(from)) = (written_ms, window_end_ms, from)
            && end >= from
        {
            tail.latencies_ms.push((end, written - end - grace_ms));
        }
        let group = item
            .group
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let key = (item.customer, item.meter, group, item.window_start);
        let entry = tail.windows.entry(key).or_insert((0, Decimal::ZERO));
        if item.revision >= entry.0 {
            *entry = (item.revision, item.window_quantity);
        }
    }
    Ok(())
}

fn percentile(sorted: &[i64], numerator: usize, denominator: usize) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (sorted.len() * numerator).div_ceil(denominator).max(1);
    sorted.get(rank - 1).copied()
}

struct Pipeline {
    gateway: Proc,
    stages: Vec<Proc>,
    base: String,
    ops: Vec<String>,
}

fn pipeline(bootstrap: &str, work: &Path, catalog: &Path, gateway_topic: &str) -> Result<Pipeline> {
    let catalog = catalog.display().to_string();
    let port = free_port()?;
    let state = work.join("state");
    // `NERUBA_E2E_WORKERS`: each pipeline process's `--worker-threads`.
    let workers = std::env::var("NERUBA_E2E_WORKERS").ok();
    // `NERUBA_E2E_<PROCESS>_KAFKA_OPTS`: librdkafka settings for that process alone.
    let args = |list: &[&str]| -> Vec<String> {
        let workers = workers.as_deref().map(|n| ["--worker-threads", n]);
        let mut args: Vec<String> = (list.iter().chain(workers.iter().flatten()))
            .map(|s| (*s).to_owned())
            .collect();
        let process = list.first().copied().unwrap_or_default();
        if let Ok(options) =
            std::env::var(format!("NERUBA_E2E_{}_KAFKA_OPTS", process.to_uppercase()))
            && !options.is_empty()
        {
            args.extend(["--kafka-opt".to_owned(), options]);
        }
        args
    };
    let gateway_args = args(&[
        "gateway",
        "--brokers",
        bootstrap,
        "--catalog",
        &catalog,
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--events-topic",
        gateway_topic,
    ]);
    let gateway = Proc::new("gateway", &binary(), &gateway_args, work);
    let ops: Vec<String> = (0..STAGES.len())
        .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_>>()?;
    let grace = format!("{}s", GRACE.as_secs());
    let idle = format!("{}s", IDLE_TIMEOUT.as_secs());
    let aggregator_state = state.join("aggregator").display().to_string();
    let rater_state = state.join("rater").display().to_string();
    let balances_state = state.join("balances").display().to_string();
    let stages = vec![
        Proc::new(
            "aggregator",
            &binary(),
            &args(&[
                "aggregator",
                "--brokers",
                bootstrap,
                "--catalog",
                &catalog,
                "--state-dir",
                &aggregator_state,
                "--ops-listen",
                &ops[0],
                "--grace",
                &grace,
                "--idle-timeout",
                &idle,
                "--assign",
                "all",
            ]),
            work,
        ),
        Proc::new(
            "rater",
            &binary(),
            &args(&[
                "rater",
                "--brokers",
                bootstrap,
                "--catalog",
                &catalog,
                "--state-dir",
                &rater_state,
                "--ops-listen",
                &ops[1],
                "--rater-assign",
                "all",
            ]),
            work,
        ),
        Proc::new(
            "balances",
            &binary(),
            &args(&[
                "balances",
                "--brokers",
                bootstrap,
                "--state-dir",
                &balances_state,
                "--ops-listen",
                &ops[2],
                "--balances-assign",
                "all",
            ]),
            work,
        ),
    ];
    Ok(Pipeline {
        gateway,
        stages,
        base: format!("http://127.0.0.1:{port}"),
        ops: ops.iter().map(|o| format!("http://{o}")).collect(),
    })
}

/// The memory gauges on a stage's metrics `page` (`neruba_rocksdb_memory_bytes` summed over
/// partitions by kind, the block cache's, and the consumer's prefetch queue), as (kind,
/// bytes).
fn rocksdb_memory(page: &str) -> Vec<(String, u64)> {
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for line in page.lines() {
        let prefix = if line.starts_with("neruba_rocksdb_memory_bytes{") {
            ""
        } else if line.starts_with("neruba_rocksdb_block_cache_bytes{") {
            "cache "
        } else if line.starts_with("neruba_consumer_fetch_queue_bytes{") {
            "fetched ahead"
        } else {
            continue;
        };
        let kind = label(line, "kind").unwrap_or_default();
        *kinds.entry(format!("{prefix}{kind}")).or_default() += sample(line).unwrap_or(0);
    }
    kinds.into_iter().collect()
}

/// A stage's consumer lag from its metrics `page`: messages behind, summed over its
/// partitions, and the oldest partition's lag in seconds; `None` if unreadable or if the
/// stage reports no lag yet (no partition assigned), so a missing reading never shows as 0.
fn consumer_lag(page: &str) -> Option<(i64, i64)> {
    let (mut messages, mut seconds, mut read) = (0_i64, 0_i64, false);
    for line in page.lines() {
        if line.starts_with("neruba_consumer_lag_messages{") {
            messages += sample::<i64>(line)?;
            read = true;
        } else if line.starts_with("neruba_consumer_lag_seconds{") {
            seconds = seconds.max(sample(line)?);
        }
    }
    read.then_some((messages, seconds))
}

/// A stage's metrics page from its ops endpoint (Prometheus text); `None` if unreadable.
async fn metrics(client: &reqwest::Client, ops: &str) -> Option<String> {
    let answer = client.get(format!("{ops}/metrics")).send().await.ok()?;
    answer.text().await.ok()
}

/// Each stage's metrics page, read once per reading for everything taken from it.
async fn pages(client: &reqwest::Client, ops: &[String]) -> Vec<Option<String>> {
    let mut pages = Vec::with_capacity(ops.len());
    for ops in ops {
        pages.push(metrics(client, ops).await);
    }
    pages
}

/// The value of one sample line of a metrics page.
fn sample<T: std::str::FromStr>(line: &str) -> Option<T> {
    line.rsplit(' ').next()?.parse().ok()
}

/// A stage's batch histograms at one reading (`neruba_stage_batch_*`): each phase's, and
/// Σ messages of its batches.
#[derive(Debug, Clone, Default)]
struct Batches {
    phases: BTreeMap<String, Phase>,
    messages: f64,
}

/// One phase's histogram: Σ seconds, batches, and batches at or under each bucket bound.
#[derive(Debug, Clone, Default)]
struct Phase {
    seconds: f64,
    batches: u64,
    buckets: Vec<(f64, u64)>,
}

/// The value of label `name` in a sample line (a whole label name: `le` is not `scale`'s).
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let labels = line.split_once('{')?.1.split_once('}')?.0;
    labels
        .split(',')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix("=\""))?
        .strip_suffix('"')
}

/// A stage's batch histograms from its metrics `page`; `None` if unreadable.
fn batches(page: &str) -> Option<Batches> {
    let mut read = Batches::default();
    for line in page.lines() {
        if line.starts_with("neruba_stage_batch_messages_sum{") {
            read.messages = sample(line)?;
            continue;
        }
        let (Some(rest), Some(phase)) = (
            line.strip_prefix("neruba_stage_batch_seconds_"),
            label(line, "phase"),
        ) else {
            continue;
        };
        let phase = read.phases.entry(phase.to_owned()).or_default();
        if rest.starts_with("sum{") {
            phase.seconds = sample(line)?;
        } else if rest.starts_with("count{") {
            phase.batches = sample(line)?;
        } else if rest.starts_with("bucket{") {
            let bound = match label(line, "le")? {
                "+Inf" => f64::INFINITY,
                bound => bound.parse().ok()?,
            };
            phase.buckets.push((bound, sample(line)?));
        }
    }
    Some(read)
}

/// What the steady run keeps at the end of each minute: each stage's batch histograms (from
/// its metrics page in `pages`) and the CPU used so far by each process of `pids`, then by
/// the whole machine, with when since `started` the CPU was read.
fn mark(
    pages: &[Option<String>],
    pids: &[(String, String)],
    started: Instant,
) -> (Duration, Vec<Option<Batches>>, Vec<Option<Duration>>) {
    let read = pages
        .iter()
        .map(|page| page.as_deref().and_then(batches))
        .collect();
    let used = pids
        .iter()
        .map(|(_, pid)| cpu(pid))
        .chain(std::iter::once(machine_cpu()))
        .collect();
    (started.elapsed(), read, used)
}

/// One stage between two readings `wall` apart: each phase's share of the wall time and the
/// bucket bound its slowest batch was under, the batches and their mean size.
fn batches_row(before: &Batches, after: &Batches, wall: Duration) -> String {
    let mut row = Vec::new();
    let mut batches = 0;
    let none = Phase::default();
    for phase in ["apply", "deliver", "write"] {
        let Some(after) = after.phases.get(phase) else {
            row.push(format!("{phase} -"));
            continue;
        };
        let before = before.phases.get(phase).unwrap_or(&none);
        let count = after.batches.saturating_sub(before.batches);
        if phase == "write" {
            batches = count;
        }
        let earlier = |bound: f64| {
            before
                .buckets
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0, |(_, n)| *n)
        };
        let slowest = after
            .buckets
            .iter()
            .find(|(bound, n)| count > 0 && n.saturating_sub(earlier(*bound)) == count)
            .map_or_else(
                || "-".to_owned(),
                |(bound, _)| match bound.is_finite() {
                    true => format!("≤ {bound} s"),
                    false => "over the last bound".to_owned(),
                },
            );
        row.push(format!(
            "{phase} {:>3.0} % ({slowest})",
            (after.seconds - before.seconds) * 100.0 / wall.as_secs_f64().max(1e-9)
        ));
    }
    let messages = (after.messages - before.messages) / batches.max(1) as f64;
    format!("{}; {batches} batches of {messages:.0}", row.join(", "))
}

async fn wait_for(url: &str, patience: Duration) -> Result<()> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(answer) = client.get(url).send().await
            && answer.status().is_success()
        {
            return Ok(());
        }
        if started.elapsed() > patience {
            bail!("{url} did not answer 200 within {patience:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn loadgen_args(
    settings: &Settings,
    base: &str,
    run: &str,
    amount: &[&str],
    duplicates: &str,
) -> Vec<String> {
    let key = neruba::sample::dev_key("acme", "ingest").unwrap_or_default();
    let mut args: Vec<String> = vec![
        "--url".into(),
        base.into(),
        "--key".into(),
        key.into(),
        "--run-id".into(),
        run.into(),
        "--seed".into(),
        "11".into(),
        "--customers".into(),
        settings.customers.to_string(),
        "--batch-size".into(),
        "500".into(),
        "--connections".into(),
        settings.connections.to_string(),
        "--duplicate-fraction".into(),
        duplicates.into(),
    ];
    args.extend(amount.iter().map(|s| (*s).to_owned()));
    args
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let settings = Settings::from_env()?;
    let until_gateway = match std::env::var("NERUBA_E2E_UNTIL") {
        Ok(until) if until == "gateway" => true,
        Ok(until) => bail!("NERUBA_E2E_UNTIL={until}: the only phase to stop after is `gateway`"),
        Err(_) => false,
    };
    let n = settings.events;
    let partitions = settings.partitions;
    let work = tempfile::tempdir()?;
    let work = work.path();
    let broker = Broker::start(work)?;
    let bootstrap = broker.bootstrap.clone();
    broker
        .create_topics(&[
            (topics::EVENTS, partitions),
            (topics::ROLLUPS, partitions),
            (topics::LEDGER, partitions),
            (topics::BALANCE_ENTRIES, partitions),
            (topics::DEAD_LETTER, 1),
            (RAW_PRODUCE_TOPIC, partitions),
            (RAW_ROUND_TRIP_TOPIC, partitions),
            (GATEWAY_TOPIC, partitions),
            (FLOOR_TOPIC, partitions),
        ])
        .await?;
    // The sample catalog, without acme's rate limit (the benchmark measures the maximum).
    let limited = "rate_limit = { events_per_second = 100000, burst = 200000 }";
    ensure!(neruba::sample::CATALOG_TOML.contains(limited));
    let catalog_path: PathBuf = work.join("catalog.toml");
    std::fs::write(
        &catalog_path,
        neruba::sample::CATALOG_TOML.replace(
            limited,
            "rate_limit = { events_per_second = 100000000, burst = 100000000 }",
        ),
    )?;
    println!(
        "end to end on tansu: {n} events per phase, {partitions} partitions, {} customers, {} connections × 500-event batches",
        settings.customers, settings.connections
    );

    // 1. Raw produce.
    let events = raw_events("raw", n, settings.customers);
    let broker_pid = broker
        .process
        .pid()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let cpu_before = (cpu("self"), cpu(&broker_pid));
    let started = Instant::now();
    produce(&bootstrap, RAW_PRODUCE_TOPIC, &events).await?;
    let raw_produce = started.elapsed();
    let raw_cpu = cpu_since("self", cpu_before.0);
    let raw_broker_cpu = cpu_since(&broker_pid, cpu_before.1);
    println!(
        "raw producer (gateway settings, acks=all): {:>9.0} events/s ({:.2} s); CPU per event: producer {:.2} µs, broker {:.2} µs",
        rate(n, raw_produce),
        raw_produce.as_secs_f64(),
        per_event_us(raw_cpu, n),
        per_event_us(raw_broker_cpu, n),
    );

    // 1b. The gateway's floor: the same events from their JSON bodies.
    let catalog = neruba_schemas::Catalog::from_toml_str(
        &std::fs::read_to_string(&catalog_path)?,
        "catalog.toml",
    )?;
    let floor_events = raw_events("floor", n, settings.customers);
    let floor_bodies = bodies(&floor_events)?;
    drop(floor_events);
    let cpu_before = cpu("self");
    let started = Instant::now();
    let floor_sent = produce_from_bodies(&bootstrap, FLOOR_TOPIC, &floor_bodies, &catalog).await?;
    let floor = started.elapsed();
    drop(floor_bodies);
    ensure!(floor_sent == n, "the floor sent {floor_sent} of {n}");
    let floor_cpu = cpu_since("self", cpu_before);
    println!(
        "gateway floor (parse + validate + encode each event of the 500-event bodies, then the raw producer; one thread, no HTTP): {:>9.0} events/s ({:.2} s); CPU per event {:.2} µs",
        rate(n, floor),
        floor.as_secs_f64(),
        per_event_us(floor_cpu, n),
    );

    // 2. Raw round trip.
    let drained = {
        let bootstrap = bootstrap.clone();
        std::thread::spawn(move || drain(&bootstrap, RAW_ROUND_TRIP_TOPIC, partitions, n))
    };
    let cpu_before = (cpu("self"), cpu(&broker_pid));
    let started = Instant::now();
    produce(&bootstrap, RAW_ROUND_TRIP_TOPIC, &events).await?;
    drop(events);
    let last = drained
        .join()
        .map_err(|_| anyhow::anyhow!("drain panicked"))??;
    let raw_round_trip = last.duration_since(started);
    let round_trip_cpu = (
        cpu_since("self", cpu_before.0),
        cpu_since(&broker_pid, cpu_before.1),
    );
    let round_trip_us = per_event_us(round_trip_cpu.0 + round_trip_cpu.1, n);
    println!(
        "raw round trip (produce while a consumer drains): {:>9.0} events/s ({:.2} s); CPU per event {round_trip_us:.2} µs (producer and consumer {:.2}, broker {:.2})",
        rate(n, raw_round_trip),
        raw_round_trip.as_secs_f64(),
        per_event_us(round_trip_cpu.0, n),
        per_event_us(round_trip_cpu.1, n),
    );

    // 3. The gateway alone, writing to a topic of its own.
    let mut alone = pipeline(&bootstrap, work, &catalog_path, GATEWAY_TOPIC)?;
    alone.gateway.start()?;
    wait_for(&format!("{}/readyz", alone.base), Duration::from_secs(60)).await?;
    let n_text = n.to_string();
    let gateway_pid = alone
        .gateway
        .pid()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let profile = std::env::var_os("NERUBA_E2E_PROFILE").map(PathBuf::from);
    let mut perf = match &profile {
        Some(file) => Some(
            Command::new("perf")
                .args([
                    "record",
                    "--call-graph",
                    "dwarf",
                    "-F",
                    "499",
                    "-p",
                    &gateway_pid,
                    "-o",
                ])
                .arg(file)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("NERUBA_E2E_PROFILE needs `perf` on the PATH")?,
        ),
        None => None,
    };
    let cpu_before = (cpu(&gateway_pid), cpu(&broker_pid));
    let report = loadgen(&loadgen_args(
        &settings,
        &alone.base,
        "gw",
        &["--events", &n_text],
        "0",
    ));
    if let Some(perf) = &mut perf {
        // perf writes its file on SIGINT.
        Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status()?;
        perf.wait()?;
    }
    let report = report?;
    let gateway_rate = u(&report, "/accepted_per_s");
    ensure!(
        u(&report, "/accepted") == n,
        "the gateway accepted {} of {n}: {report}",
        u(&report, "/accepted")
    );
    let gateway_peak = rss_kib(&gateway_pid, "VmHWM:").unwrap_or(0);
    let gateway_cpu = cpu_since(&gateway_pid, cpu_before.0);
    let gateway_broker_cpu = cpu_since(&broker_pid, cpu_before.1);
    alone.gateway.terminate(Duration::from_secs(30))?;
    println!(
        "gateway alone over HTTP: {gateway_rate:>9} events/s = {:.2} × raw producer (target ≥ 0.75) = {:.2} × the gateway floor; CPU per event: gateway {:.2} µs = {:.2} × the raw producer's ({:.2} × by CPU: the floor's over the gateway's), broker {:.2} µs, loadgen {} (on the same cores); request p50 {} µs, p99 {} µs; peak RSS {:.0} MiB",
        gateway_rate as f64 / rate(n, raw_produce),
        gateway_rate as f64 / rate(n, floor),
        per_event_us(gateway_cpu, n),
        per_event_us(gateway_cpu, n) / per_event_us(raw_cpu, n).max(1e-9),
        per_event_us(floor_cpu, n) / per_event_us(gateway_cpu, n).max(1e-9),
        per_event_us(gateway_broker_cpu, n),
        loadgen_cpu(&report),
        u(&report, "/requests/latency_us/p50"),
        u(&report, "/requests/latency_us/p99"),
        mib(gateway_peak),
    );
    if let Some(file) = profile {
        println!(
            "profile of the gateway (under perf) written to {}; later phases skipped",
            file.display()
        );
        return Ok(());
    }
    if until_gateway {
        println!("NERUBA_E2E_UNTIL=gateway: later phases skipped");
        return Ok(());
    }

    // 4. The whole pipeline at full speed.
    let mut pipeline = pipeline(&bootstrap, work, &catalog_path, topics::EVENTS)?;
    pipeline.gateway.start()?;
    for stage in &mut pipeline.stages {
        stage.start()?;
    }
    wait_for(
        &format!("{}/readyz", pipeline.base),
        Duration::from_secs(60),
    )
    .await?;
    for ops in &pipeline.ops {
        wait_for(&format!("{ops}/readyz"), Duration::from_secs(60)).await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let tail = Arc::new(Mutex::new(LedgerTail::default()));
    let latency_from = Arc::new(Mutex::new(None::<i64>));
    let tailer = {
        let (bootstrap, stop, tail, latency_from) = (
            bootstrap.clone(),
            stop.clone(),
            tail.clone(),
            latency_from.clone(),
        );
        std::thread::spawn(move || -> Result<()> {
            let consumer = reader(&bootstrap, topics::LEDGER, partitions, Offset::Beginning)?;
            tail_ledger(&consumer, &tail, &stop, "steady-", &latency_from)
        })
    };
    let mut pids: Vec<(String, String)> = vec![("tansu".into(), broker_pid.clone())];
    pids.push((
        "gateway".into(),
        pipeline
            .gateway
            .pid()
            .map(|p| p.to_string())
            .unwrap_or_default(),
    ));
    for stage in &pipeline.stages {
        pids.push((
            stage.name.clone(),
            stage.pid().map(|p| p.to_string()).unwrap_or_default(),
        ));
    }
    let cpu_before: Vec<Option<Duration>> = pids.iter().map(|(_, pid)| cpu(pid)).collect();
    let started = Instant::now();
    let report = {
        let args = loadgen_args(
            &settings,
            &pipeline.base,
            "e2e",
            &["--events", &n_text],
            "0",
        );
        tokio::task::spawn_blocking(move || loadgen(&args)).await??
    };
    let accepted = u(&report, "/accepted");
    let e2e_tokens = u(&report, "/generated/tokens");
    ensure!(accepted == n, "accepted {accepted} of {n}: {report}");
    let sent = started.elapsed();
    let aggregated = Progress::new(&bootstrap, "neruba-aggregator", topics::EVENTS, partitions)?;
    let mut said = Instant::now();
    let caught_up = loop {
        let done = aggregated.committed()?;
        if said.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "  … {:.0} s: the aggregator committed {done} of {n} events",
                started.elapsed().as_secs_f64()
            );
            said = Instant::now();
        }
        // The events topic holds this run's events only.
        if done >= i64::try_from(n)? {
            break started.elapsed();
        }
        ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "the aggregator did not catch up: {done} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let e2e_rate = rate(accepted, caught_up);
    println!(
        "end to end at full speed: HTTP accepted {} events/s ({:.2} s); aggregated and committed after {:.2} s = {e2e_rate:>9.0} events/s = {:.2} × raw round trip (target ≥ 0.5)",
        u(&report, "/accepted_per_s"),
        sent.as_secs_f64(),
        caught_up.as_secs_f64(),
        e2e_rate / rate(n, raw_round_trip),
    );
    let used: Vec<(String, f64)> = pids
        .iter()
        .zip(&cpu_before)
        .map(|((name, pid), before)| (name.clone(), per_event_us(cpu_since(pid, *before), n)))
        .collect();
    let pipeline_us: f64 = used.iter().map(|(_, us)| us).sum();
    let used: Vec<String> = used
        .iter()
        .map(|(name, us)| format!("{name} {us:.2}"))
        .collect();
    println!(
        "  CPU µs per event: {}; the pipeline's processes together {pipeline_us:.2} = {:.2} × the raw round trip by CPU ({round_trip_us:.2} µs; the broker's share includes this bench's ledger tail and offset polls); loadgen {} on the same cores",
        used.join(", "),
        round_trip_us / pipeline_us.max(1e-9),
        loadgen_cpu(&report),
    );

    // 5. Steady at 80 % of that rate (or `NERUBA_E2E_STEADY_RATE`).
    let steady_rate = match std::env::var("NERUBA_E2E_STEADY_RATE") {
        Ok(text) => text.parse().context("NERUBA_E2E_STEADY_RATE")?,
        Err(_) => (e2e_rate * 0.8) as u64,
    };
    let warm_up = Duration::from_secs(60).min(settings.steady / 4);
    *latency_from
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))? =
        Some(now_ms() + i64::try_from(warm_up.as_millis())?);
    let steady = {
        let duration = format!("{}s", settings.steady.as_secs());
        let rate_text = steady_rate.to_string();
        let args = loadgen_args(
            &settings,
            &pipeline.base,
            "steady",
            &["--rate", &rate_text, "--duration", &duration],
            "0.02",
        );
        tokio::task::spawn_blocking(move || loadgen(&args))
    };
    let mut samples: Vec<(Duration, Vec<Option<u64>>)> = Vec::new();
    // Each stage's memory by kind, once a minute: what its RSS is made of.
    type Kinds = Vec<(String, u64)>;
    let mut memory: Vec<(u64, Vec<Kinds>)> = Vec::new();
    // Each stage's consumer lag at its worst in each minute (by the minute a reading fell
    // in): which stage windows wait in, when they wait.
    let mut lag: BTreeMap<u64, Vec<Option<(i64, i64)>>> = BTreeMap::new();
    // At the start and at the end of each minute: each stage's batch histograms and each
    // process's CPU, so a minute's time can be split by stage and phase.
    type Mark = (u64, Duration, Vec<Option<Batches>>, Vec<Option<Duration>>);
    let mut marks: Vec<Mark> = Vec::new();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let steady_started = Instant::now();
    let steady_start_ms = now_ms();
    while !steady.is_finished() {
        let at = steady_started.elapsed();
        samples.push((
            at,
            pids.iter().map(|(_, pid)| rss_kib(pid, "VmRSS:")).collect(),
        ));
        let pages = pages(&client, &pipeline.ops).await;
        // The last reading before each minute's end (readings are 5 s apart), as for RSS.
        let minute = (at + Duration::from_secs(5)).as_secs() / 60;
        if minute > memory.last().map_or(0, |(m, _)| *m) {
            let kinds = pages
                .iter()
                .map(|page| rocksdb_memory(page.as_deref().unwrap_or_default()))
                .collect();
            memory.push((minute, kinds));
        }
        if marks.last().is_none_or(|(m, ..)| minute > *m) {
            let (at, read, used) = mark(&pages, &pids, steady_started);
            marks.push((minute, at, read, used));
        }
        let worst = lag
            .entry(at.as_secs() / 60 + 1)
            .or_insert_with(|| vec![None; pipeline.ops.len()]);
        for (slot, page) in worst.iter_mut().zip(&pages) {
            if let Some((messages, seconds)) = page.as_deref().and_then(consumer_lag) {
                let (m, s) = slot.unwrap_or_default();
                *slot = Some((m.max(messages), s.max(seconds)));
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // The tail of a run that is not whole minutes, as its own last row.
    let at = steady_started.elapsed();
    if marks
        .last()
        .is_some_and(|(_, last, ..)| at > *last + Duration::from_secs(10))
    {
        let pages = pages(&client, &pipeline.ops).await;
        let (at, read, used) = mark(&pages, &pids, steady_started);
        marks.push((at.as_secs().div_ceil(60), at, read, used));
    }
    let report = steady.await??;
    let steady_accepted = u(&report, "/accepted");
    let steady_tokens = u(&report, "/generated/tokens");
    println!(
        "steady: target {steady_rate} events/s for {:.0} s: accepted {} events/s ({} accepted, {} duplicates answered, {} failed); request p50 {} µs, p99 {} µs, p999 {} µs",
        settings.steady.as_secs_f64(),
        u(&report, "/accepted_per_s"),
        steady_accepted,
        u(&report, "/duplicate"),
        u(&report, "/failed"),
        u(&report, "/requests/latency_us/p50"),
        u(&report, "/requests/latency_us/p99"),
        u(&report, "/requests/latency_us/p999"),
    );

    // Whether the pipeline kept up: how far behind the aggregator was when loadgen stopped,
    // then how long it took to fold everything.
    let total = i64::try_from(n + steady_accepted)?;
    let behind = total - aggregated.committed()?;
    let waited = Instant::now();
    loop {
        let done = aggregated.committed()?;
        if done >= total {
            break;
        }
        ensure!(
            waited.elapsed() < Duration::from_secs(1800),
            "the aggregator did not catch up: {done} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "kept up: when loadgen stopped the aggregator was {behind} events behind ({:.1} s at that rate); it caught up {:.1} s later",
        behind as f64 / steady_rate.max(1) as f64,
        waited.elapsed().as_secs_f64(),
    );

    // The ledger holds every accepted event's usage, to the token.
    let expected_e2e = Decimal::from(e2e_tokens);
    let expected_steady = Decimal::from(steady_tokens);
    let patience = WINDOW + GRACE + IDLE_TIMEOUT + Duration::from_secs(60);
    let waited = Instant::now();
    let (have_e2e, have_steady) = loop {
        let (e2e, steady) = {
            let tail = tail.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            (
                tail.quantity("e2e-", TOKENS_METER),
                tail.quantity("steady-", TOKENS_METER),
            )
        };
        if (e2e == expected_e2e && steady == expected_steady) || waited.elapsed() > patience {
            break (e2e, steady);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop.store(true, Ordering::Relaxed);
    tailer
        .join()
        .map_err(|_| anyhow::anyhow!("tail panicked"))??;
    let tail = tail.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut latencies: Vec<i64> = tail.latencies_ms.iter().map(|(_, ms)| *ms).collect();
    latencies.sort_unstable();
    println!(
        "window close → line item ({} first-revision items of windows ending after the first {:.0} s): p50 {:?} ms, p99 {:?} ms, max {:?} ms (target p99 ≤ 1000 ms)",
        latencies.len(),
        warm_up.as_secs_f64(),
        percentile(&latencies, 1, 2),
        percentile(&latencies, 99, 100),
        latencies.last(),
    );
    // By the minute of the steady run its windows ended in: where a slow tail came from (a
    // stall; the last windows, closed once the load stopped).
    let mut by_minute: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for (end, ms) in &tail.latencies_ms {
        let minute = (end - steady_start_ms).div_euclid(60_000) + 1;
        by_minute.entry(minute).or_default().push(*ms);
    }
    println!("  by the minute of the steady run the windows ended in: items, p50, p99, max (ms)");
    for (minute, latencies) in &mut by_minute {
        latencies.sort_unstable();
        println!(
            "    {minute:>3}: {:>6} {:>7} {:>7} {:>7}",
            latencies.len(),
            percentile(latencies, 1, 2).unwrap_or_default(),
            percentile(latencies, 99, 100).unwrap_or_default(),
            latencies.last().copied().unwrap_or_default(),
        );
    }
    println!(
        "RSS over the steady run (MiB), after the first minute: first, min, max, last, (max − min) / first"
    );
    for (index, (name, pid)) in pids.iter().enumerate() {
        let series: Vec<u64> = samples
            .iter()
            .filter(|(at, _)| *at >= warm_up)
            .filter_map(|(_, values)| values.get(index).copied().flatten())
            .collect();
        let (Some(first), Some(last)) = (series.first(), series.last()) else {
            continue;
        };
        let min = series.iter().min().copied().unwrap_or(0);
        let max = series.iter().max().copied().unwrap_or(0);
        let peak = rss_kib(pid, "VmHWM:").unwrap_or(0);
        println!(
            "  {name:<10} {:>7.1} {:>7.1} {:>7.1} {:>7.1}  {:>+6.1} %   (peak {:.1})",
            mib(*first),
            mib(min),
            mib(max),
            mib(*last),
            (max - min) as f64 * 100.0 / (*first).max(1) as f64,
            mib(peak),
        );
    }
    // The shape over the whole run, a column per minute: whether a rise is warm-up (stores
    // filling to their bounds) or growth. Each column is the last reading at or before its
    // minute ("-" when there is none).
    let minutes = settings.steady.as_secs() / 60;
    if minutes > 0 {
        println!("RSS at the end of each minute of the steady run (MiB), minutes 1 to {minutes}");
    }
    for (index, (name, _)) in pids.iter().enumerate().filter(|_| minutes > 0) {
        let row: Vec<String> = (1..=minutes)
            .map(|minute| {
                samples
                    .iter()
                    .rfind(|(at, _)| at.as_secs() <= minute * 60)
                    .and_then(|(_, values)| values.get(index).copied().flatten())
                    .map_or_else(|| format!("{:>5}", "-"), |kib| format!("{:>5.0}", mib(kib)))
            })
            .collect();
        println!("  {name:<10} {}", row.join(" "));
    }
    if minutes > 0 {
        println!(
            "consumer lag at its worst in each minute of the steady run, minutes 1 to {minutes} (messages behind, summed over partitions / the oldest partition's whole seconds; readings 5 s apart of gauges published at most once a second)"
        );
    }
    for (index, name) in STAGES.iter().enumerate() {
        let row: Vec<String> = (1..=minutes)
            .map(|minute| {
                match lag
                    .get(&minute)
                    .and_then(|s| s.get(index).copied().flatten())
                {
                    Some((messages, seconds)) => format!("{messages}/{seconds}"),
                    None => "-".to_owned(),
                }
            })
            .collect();
        if !row.is_empty() {
            println!("  {name:<10} {}", row.join(" "));
        }
    }
    if marks.len() > 1 {
        println!(
            "where each stage's batches spent each minute: share of the wall time in each phase (the bucket bound its slowest batch was under), batches, mean input messages per batch"
        );
    }
    for (index, name) in STAGES.iter().enumerate() {
        for pair in marks.windows(2) {
            let [(_, from, before, _), (minute, to, after, _)] = pair else {
                continue;
            };
            let row = match (before.get(index), after.get(index)) {
                (Some(Some(before)), Some(Some(after))) => {
                    batches_row(before, after, to.saturating_sub(*from))
                }
                _ => "-".to_owned(),
            };
            // Past the run's whole minutes: its tail, the load mostly stopped.
            let minute = match *minute > settings.steady.as_secs() / 60 {
                true => "tail".to_owned(),
                false => minute.to_string(),
            };
            println!("  {name:<10} {minute:>4}: {row}");
        }
    }
    if marks.len() > 1 {
        println!(
            "CPU in each minute of the steady run (% of one core; `machine` is every process, loadgen's too, of {} cores)",
            std::thread::available_parallelism().map_or(0, usize::from)
        );
    }
    let names = pids.iter().map(|(name, _)| name.as_str());
    let names = names.chain(std::iter::once("machine"));
    for (index, name) in names.enumerate().filter(|_| marks.len() > 1) {
        let row: Vec<String> = marks
            .windows(2)
            .map(|pair| {
                let [(_, from, _, before), (_, to, _, after)] = pair else {
                    return "-".to_owned();
                };
                match (
                    before.get(index).copied().flatten(),
                    after.get(index).copied().flatten(),
                ) {
                    (Some(before), Some(after)) => format!(
                        "{:>4.0}",
                        after.saturating_sub(before).as_secs_f64() * 100.0
                            / to.saturating_sub(*from).as_secs_f64().max(1e-9)
                    ),
                    _ => format!("{:>4}", "-"),
                }
            })
            .collect();
        println!("  {name:<10} {}", row.join(" "));
    }
    for (stage, name) in STAGES.iter().enumerate() {
        println!(
            "{name} memory by kind at the end of each minute (MiB; RocksDB's, all partitions summed, and the consumer's prefetch)"
        );
        for (minute, stages) in &memory {
            let kinds: Vec<String> = stages
                .get(stage)
                .into_iter()
                .flatten()
                .map(|(kind, bytes)| format!("{kind} {:.1}", mib(bytes / 1024)))
                .collect();
            println!("  minute {minute:>3}: {}", kinds.join(", "));
        }
    }
    println!(
        "ledger: {} line items; usage of the full-speed run {have_e2e} tokens (accepted: {expected_e2e}), of the steady run {have_steady} (accepted: {expected_steady})",
        tail.items
    );
    ensure!(
        have_e2e == expected_e2e && have_steady == expected_steady,
        "the ledger does not hold exactly the accepted usage"
    );
    ensure!(
        steady_accepted > 0 && u(&report, "/failed") == 0,
        "the steady run lost requests: {report}"
    );
    for process in std::iter::once(&mut pipeline.gateway).chain(pipeline.stages.iter_mut()) {
        process.terminate(Duration::from_secs(60))?;
    }
    Ok(())
}
