//! `neruba loadgen`: realistic CloudEvents sent to a gateway as fast as it takes them (or at a
//! target rate), and what came of them: outcomes, events/s, request latency, and with
//! `--brokers` how long the ledger took to catch up.
//!
//! Invariants:
//! - **the same seed gives the same events**: ids, customers, data, which events are late
//!   (and by how much) and which are repeats follow from `--seed` and the flags alone
//!   ([`Generator`], a splitmix64 stream); only event times move with the clock. So a run is
//!   reproducible, and its report says how many repeats and which token total it sent;
//! - **a repeat re-sends an event the gateway has already answered**: it copies (same id,
//!   time and data) one of the [`RECENT`] events sent before the last
//!   [`Config::in_flight_depth`] events, which is everything that can still be queued or in
//!   flight (queue, open and sealed batch, `--connections` requests). So the gateway's
//!   recent-repeat filter answers it `duplicate`, as it would a client's retry; the first
//!   `in_flight_depth` events are never repeated (a batch retried for longer than the rest
//!   of the pipeline takes could still let a repeat through as `accepted`, which the
//!   aggregator then counts once);
//! - **a run's data is recognisable**: ids are `<run>-e<n>` and customers `<run>-c<n>`, where
//!   the run id is `loadgen-<seed>` unless `--run-id` says otherwise. Running the same seed
//!   again against the same deployment therefore sends only repeats (the aggregator's dedup
//!   keeps them all out): pass a new `--seed` or `--run-id` for fresh usage;
//! - **the ledger wait ends for a reason it reports**: windows close when the aggregator's
//!   watermark passes their end (at the latest, the later of the window's end and the last
//!   event plus `--idle-timeout`, plus `--grace`: README "Aggregation"), so the tail waits
//!   until then and then until no line item of the run arrived for `--settle`, or gives up
//!   at `--settle-timeout` after the last accept and says the ledger did not catch up.

use super::{parse_key_value, shutdown_on_signal};
use anyhow::{Context, Result, bail};
use clap::Args;
use neruba_client::{Client, Error as ClientError, Event, IngestAttempt, Outcome, Receipt};
use neruba_schemas::ledger::LineItem;
use neruba_schemas::topics;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The `model` values of the default data template.
const MODELS: [&str; 3] = ["small", "medium", "large"];

/// The largest `tokens` value of the default data template (values are 1 to this).
const MAX_TOKENS: u64 = 4000;

/// How many earlier events (before the in-flight span) a repeat is drawn from: recent enough
/// that the gateway's recent-repeat filter still holds them.
const RECENT: u64 = 10_000;

#[derive(Debug, Args)]
pub(crate) struct LoadgenArgs {
    /// Base URL of the gateway (or a load balancer in front of its replicas).
    #[arg(long, env = "NERUBA_URL", default_value = "http://127.0.0.1:8080")]
    pub(crate) url: String,
    /// API key with the `ingest` scope; it decides the tenant (one key, one tenant).
    #[arg(long, visible_alias = "key", env = "NERUBA_INGEST_KEY")]
    pub(crate) ingest_key: String,
    /// How many customers the events are spread over (uniformly).
    #[arg(long, env = "NERUBA_CUSTOMERS", default_value_t = 100)]
    pub(crate) customers: u64,
    /// The events' CloudEvents `type` (default `llm.completion`, or `api.request` with
    /// `--count-only`).
    #[arg(long, env = "NERUBA_METER_TYPE")]
    pub(crate) meter_type: Option<String>,
    /// Send events without data, for counting meters (the sample catalog's `api_calls`),
    /// instead of `{"model": small|medium|large, "tokens": 1–4000, "status": "ok"}`.
    #[arg(long, env = "NERUBA_COUNT_ONLY")]
    pub(crate) count_only: bool,
    /// Share of events (0 ≤ f < 1) that re-send an earlier event, id and all.
    #[arg(long, env = "NERUBA_DUPLICATE_FRACTION", default_value = "0")]
    pub(crate) duplicate_fraction: Decimal,
    /// Share of new events (0 ≤ f < 1) whose time is up to `--late-by` in the past.
    #[arg(long, env = "NERUBA_LATE_FRACTION", default_value = "0")]
    pub(crate) late_fraction: Decimal,
    /// How far in the past a late event may be (uniformly, to the millisecond).
    #[arg(long, env = "NERUBA_LATE_BY", default_value = "10m", value_parser = humantime::parse_duration)]
    pub(crate) late_by: Duration,
    /// Events per request, 1–10,000.
    #[arg(long, env = "NERUBA_BATCH_SIZE", default_value_t = 500)]
    pub(crate) batch_size: usize,
    /// Requests in flight at once (each on its own keep-alive connection).
    #[arg(long, env = "NERUBA_CONNECTIONS", default_value_t = 4)]
    pub(crate) connections: usize,
    /// Target events per second; 0 sends as fast as the gateway takes them.
    #[arg(long, env = "NERUBA_RATE", default_value_t = 0)]
    pub(crate) rate: u64,
    /// Send for this long (default 10s when `--events` is not given either).
    #[arg(long, env = "NERUBA_DURATION", value_parser = humantime::parse_duration, conflicts_with = "events")]
    pub(crate) duration: Option<Duration>,
    /// Send this many events (repeats included), then stop.
    #[arg(long, env = "NERUBA_EVENTS")]
    pub(crate) events: Option<u64>,
    /// Seed of the event generator: the same seed sends the same ids and data (default: from
    /// the clock, printed in the report).
    #[arg(long, env = "NERUBA_SEED")]
    pub(crate) seed: Option<u64>,
    /// Prefix of the run's event ids and customers (default `loadgen-<seed>`).
    #[arg(long, env = "NERUBA_RUN_ID")]
    pub(crate) run_id: Option<String>,
    /// Kafka bootstrap servers: also tail the ledger for this run's line items and report
    /// how long after the last accept the last one came.
    #[arg(long, env = "NERUBA_BROKERS")]
    pub(crate) brokers: Option<String>,
    /// Topic line items are read from.
    #[arg(long, env = "NERUBA_LEDGER_TOPIC", default_value = topics::LEDGER)]
    pub(crate) ledger_topic: String,
    /// Extra librdkafka setting `key=value` (SASL, TLS); repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_key_value)]
    pub(crate) kafka_opts: Vec<(String, String)>,
    /// The meter's window (the sample catalog's `1m`): the last window closes after its end.
    #[arg(long, env = "NERUBA_WINDOW", default_value = "1m", value_parser = humantime::parse_duration)]
    pub(crate) window: Duration,
    /// The aggregators' `--grace`: windows close this long after the watermark reaches them.
    #[arg(long, env = "NERUBA_AGGREGATOR_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) grace: Duration,
    /// The aggregators' `--idle-timeout`: after the last event, the watermark follows the
    /// clock only once this has passed.
    #[arg(long, env = "NERUBA_AGGREGATOR_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) idle_timeout: Duration,
    /// Once the windows should have closed, the ledger has caught up when it holds line items
    /// of the run and no more arrived for this long.
    #[arg(long, env = "NERUBA_SETTLE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) settle: Duration,
    /// Stop waiting for the ledger this long after the last accept, caught up or not.
    #[arg(long, env = "NERUBA_SETTLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub(crate) settle_timeout: Duration,
    /// Print the report as one JSON object on stdout (progress still goes to stderr).
    #[arg(long, env = "NERUBA_JSON")]
    pub(crate) json: bool,
}

/// A checked [`LoadgenArgs`].
#[derive(Debug, Clone)]
struct Config {
    generator: GeneratorConfig,
    batch_size: usize,
    connections: usize,
    rate: u64,
    /// `None`: `--events` decides.
    duration: Option<Duration>,
    events: Option<u64>,
}

impl Config {
    /// How many events can be taken by the client but not yet answered: its queue (one
    /// batch), the batch being filled, a sealed batch waiting, and one per connection.
    fn in_flight_depth(batch_size: usize, connections: usize) -> u64 {
        u64::try_from(batch_size.saturating_mul(connections.saturating_add(3))).unwrap_or(u64::MAX)
    }
}

impl LoadgenArgs {
    fn config(&self) -> Result<Config> {
        for (flag, fraction) in [
            ("--duplicate-fraction", self.duplicate_fraction),
            ("--late-fraction", self.late_fraction),
        ] {
            if fraction.is_sign_negative() || fraction >= Decimal::ONE {
                bail!("{flag} ({fraction}) must be at least 0 and below 1");
            }
        }
        if self.customers == 0 {
            bail!("--customers must be at least 1");
        }
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if !(1..=10_000).contains(&self.batch_size) {
            bail!(
                "--batch-size ({}) must be within 1–10000 (the gateway's default limit)",
                self.batch_size
            );
        }
        if self.window.is_zero() {
            bail!("--window must be longer than 0");
        }
        let late_by_ms = u64::try_from(self.late_by.as_millis()).context("--late-by too long")?;
        if !self.late_fraction.is_zero() && late_by_ms == 0 {
            bail!("--late-fraction needs a --late-by of at least 1ms");
        }
        let seed = self.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                % 1_000_000
        });
        let run_id = self
            .run_id
            .clone()
            .unwrap_or_else(|| format!("loadgen-{seed}"));
        if run_id.is_empty() || run_id.chars().any(char::is_control) {
            bail!("--run-id must be non-empty, without control characters");
        }
        let events = match (self.events, self.duration) {
            (None, None) => None,
            (events, _) => events,
        };
        let duration = match (self.events, self.duration) {
            (None, None) => Some(Duration::from_secs(10)),
            (_, duration) => duration,
        };
        let event_type = self.meter_type.clone().unwrap_or_else(|| {
            if self.count_only {
                "api.request".to_owned()
            } else {
                "llm.completion".to_owned()
            }
        });
        Ok(Config {
            generator: GeneratorConfig {
                run_id,
                seed,
                customers: self.customers,
                event_type,
                count_only: self.count_only,
                duplicate_threshold: threshold(self.duplicate_fraction),
                late_threshold: threshold(self.late_fraction),
                late_by_ms,
                depth: Config::in_flight_depth(self.batch_size, self.connections),
            },
            batch_size: self.batch_size,
            connections: self.connections,
            rate: self.rate,
            duration,
            events,
        })
    }
}

/// A probability (0 ≤ f < 1) as a threshold on 32 random bits, exactly (no float rounding).
fn threshold(fraction: Decimal) -> u64 {
    (fraction * Decimal::from(1u64 << 32))
        .trunc()
        .to_u64()
        .unwrap_or(0)
}

/// splitmix64 (Steele, Lea, Flood 2014): a tiny, well-studied generator, plenty for load data
/// and the same on every platform and version (a crate's generator may change between
/// releases; these ids must not).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound` ≥ 1; the modulo bias is below 2^-40 for our bounds).
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    /// True with probability `threshold / 2^32`.
    fn chance(&mut self, threshold: u64) -> bool {
        (self.next() >> 32) < threshold
    }
}

/// What the generator makes events from.
#[derive(Debug, Clone)]
struct GeneratorConfig {
    run_id: String,
    seed: u64,
    customers: u64,
    event_type: String,
    count_only: bool,
    duplicate_threshold: u64,
    late_threshold: u64,
    late_by_ms: u64,
    /// Events that may still be unanswered (see [`Config::in_flight_depth`]): never repeated.
    depth: u64,
}

/// One event to send: a new one, or a repeat of an earlier one (identical to it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Planned {
    /// The number of the new event (a repeat keeps its original's).
    seq: u64,
    customer: u64,
    /// Event time, Unix milliseconds.
    time_ms: i64,
    model: usize,
    tokens: u64,
    repeat: bool,
}

/// What the generator has made so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Generated {
    events: u64,
    distinct: u64,
    repeats: u64,
    late: u64,
    /// The new events' tokens (0 with `--count-only`).
    tokens: u64,
}

/// The event stream of a seed.
#[derive(Debug)]
struct Generator {
    config: GeneratorConfig,
    rng: SplitMix64,
    /// The last `depth + RECENT` new events, oldest first: a repeat copies one of the oldest
    /// `RECENT`.
    history: VecDeque<Planned>,
    generated: Generated,
}

impl Generator {
    fn new(config: GeneratorConfig) -> Self {
        Self {
            rng: SplitMix64(config.seed),
            config,
            history: VecDeque::new(),
            generated: Generated::default(),
        }
    }

    /// The next event; a new one gets its time from `now_ms` (minus its lateness).
    fn next(&mut self, now_ms: i64) -> Planned {
        self.generated.events += 1;
        let repeat = self.rng.chance(self.config.duplicate_threshold);
        let pool = u64::try_from(self.history.len())
            .unwrap_or(u64::MAX)
            .saturating_sub(self.config.depth);
        if repeat && pool > 0 {
            let pick = usize::try_from(self.rng.below(pool)).unwrap_or(0);
            if let Some(original) = self.history.get(pick) {
                self.generated.repeats += 1;
                return Planned {
                    repeat: true,
                    ..original.clone()
                };
            }
        }
        let seq = self.generated.distinct;
        let customer = self.rng.below(self.config.customers);
        let model = usize::try_from(self.rng.below(MODELS.len() as u64)).unwrap_or(0);
        let tokens = if self.config.count_only {
            0
        } else {
            1 + self.rng.below(MAX_TOKENS)
        };
        let late_ms = if self.rng.chance(self.config.late_threshold) {
            self.generated.late += 1;
            1 + self.rng.below(self.config.late_by_ms)
        } else {
            0
        };
        let planned = Planned {
            seq,
            customer,
            time_ms: now_ms.saturating_sub(i64::try_from(late_ms).unwrap_or(i64::MAX)),
            model,
            tokens,
            repeat: false,
        };
        self.generated.distinct += 1;
        self.generated.tokens += tokens;
        self.history.push_back(planned.clone());
        let keep = self.config.depth.saturating_add(RECENT);
        while u64::try_from(self.history.len()).unwrap_or(u64::MAX) > keep {
            self.history.pop_front();
        }
        planned
    }

    /// The planned event as a CloudEvent.
    fn event(&self, planned: &Planned) -> Event {
        let run = &self.config.run_id;
        let event = Event::new(
            self.config.event_type.as_str(),
            format!("{run}-c{}", planned.customer),
        )
        .with_id(format!("{run}-e{}", planned.seq))
        .with_time(neruba_client::format_time(
            UNIX_EPOCH + Duration::from_millis(u64::try_from(planned.time_ms).unwrap_or(0)),
        ));
        if self.config.count_only {
            return event;
        }
        event.with_data(json!({
            "model": MODELS.get(planned.model).copied().unwrap_or("small"),
            "tokens": planned.tokens,
            "status": "ok",
        }))
    }
}

/// Request latencies in a log-linear histogram: exact below 256 µs, then 128 buckets per
/// power of two (each bucket's width under 0.8 % of its values), so memory stays fixed
/// (7,424 counters) however long the run.
#[derive(Debug, Clone)]
struct Latencies {
    counts: Vec<u64>,
    total: u64,
    max_us: u64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            counts: vec![0; Self::bucket(u64::MAX) + 1],
            total: 0,
            max_us: 0,
        }
    }
}

impl Latencies {
    fn bucket(us: u64) -> usize {
        if us < 256 {
            return us as usize;
        }
        let exponent = 63 - us.leading_zeros() as usize; // 8..=63
        let mantissa = (us >> (exponent - 7)) as usize; // 128..=255
        256 + (exponent - 8) * 128 + (mantissa - 128)
    }

    /// The largest value that falls in `bucket`.
    fn bucket_high(bucket: usize) -> u64 {
        if bucket < 256 {
            return bucket as u64;
        }
        let exponent = (bucket - 256) / 128 + 8;
        let mantissa = ((bucket - 256) % 128 + 128) as u128;
        let high = ((mantissa + 1) << (exponent - 7)) - 1;
        u64::try_from(high).unwrap_or(u64::MAX)
    }

    fn record(&mut self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(count) = self.counts.get_mut(Self::bucket(us)) {
            *count += 1;
        }
        self.total += 1;
        self.max_us = self.max_us.max(us);
    }

    /// The nearest-rank `numerator / denominator` quantile in microseconds (the upper edge of
    /// its bucket, never above the largest value seen); `None` before any value.
    fn quantile_us(&self, numerator: u64, denominator: u64) -> Option<u64> {
        if self.total == 0 || denominator == 0 {
            return None;
        }
        // Smallest rank r with r / total ≥ numerator / denominator, at least 1.
        let rank = (u128::from(self.total) * u128::from(numerator))
            .div_ceil(u128::from(denominator))
            .max(1);
        let mut seen = 0u128;
        for (bucket, count) in self.counts.iter().enumerate() {
            seen += u128::from(*count);
            if seen >= rank {
                return Some(Self::bucket_high(bucket).min(self.max_us));
            }
        }
        Some(self.max_us)
    }
}

/// What the attempt observer counts.
#[derive(Debug, Default)]
struct Requests {
    latencies: Latencies,
    /// Answers by status (`0`: no answer, a transport failure).
    statuses: BTreeMap<u16, u64>,
}

/// The gateway's verdicts, from the receipts.
#[derive(Debug, Default)]
struct Verdicts {
    accepted: u64,
    duplicate: u64,
    rejected: BTreeMap<String, u64>,
    failed: BTreeMap<String, u64>,
    last_accept: Option<Instant>,
}

/// Awaits the receipts in the order sent. An earlier event's batch answered later holds the
/// line, but the last accept is still seen at (or just after) its true time: the batch that
/// holds the line was answered later still.
async fn collect(mut receipts: mpsc::Receiver<Receipt>, refused: Arc<AtomicBool>) -> Verdicts {
    let mut verdicts = Verdicts::default();
    while let Some(receipt) = receipts.recv().await {
        match receipt.await {
            Ok(Outcome::Accepted) => {
                verdicts.accepted += 1;
                verdicts.last_accept = Some(Instant::now());
            }
            Ok(Outcome::Duplicate) => verdicts.duplicate += 1,
            Ok(Outcome::Rejected { code, .. }) => *verdicts.rejected.entry(code).or_default() += 1,
            Err(error) => {
                if matches!(error, ClientError::Refused { .. }) {
                    refused.store(true, Ordering::Relaxed);
                }
                *verdicts.failed.entry(failure_kind(&error)).or_default() += 1;
            }
        }
    }
    verdicts
}

/// A bounded label for a failed event: the answer's status and code, or what stopped it.
fn failure_kind(error: &ClientError) -> String {
    match (error.status(), error.code()) {
        (Some(status), Some(code)) => format!("{status} {code}"),
        (Some(status), None) => status.to_string(),
        (None, _) => match error {
            ClientError::Unavailable { .. } => "transport".to_owned(),
            ClientError::Interrupted => "interrupted".to_owned(),
            ClientError::Closed => "closed".to_owned(),
            _ => "other".to_owned(),
        },
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Runs a load: sends, reports progress each second, waits for the ledger if asked, prints
/// the report.
pub(crate) async fn run(args: LoadgenArgs, shutdown: CancellationToken) -> Result<()> {
    let config = args.config()?;
    let shutdown = shutdown_on_signal(&shutdown);
    // The tail starts at the ledger's end *before* the first event goes out, so every line
    // item of this run is after its start.
    let tail = match &args.brokers {
        Some(brokers) => {
            let run_prefix = format!("{}-c", config.generator.run_id);
            Some(LedgerTail::start(
                brokers,
                &args.kafka_opts,
                &args.ledger_topic,
                run_prefix,
            )?)
        }
        None => None,
    };

    let requests = Arc::new(Mutex::new(Requests::default()));
    let observed = requests.clone();
    let client = Client::builder(&args.url, &args.ingest_key)
        .batch_size(config.batch_size)
        .max_in_flight(config.connections)
        .queue_capacity(config.batch_size)
        .on_ingest_attempt(move |attempt: &IngestAttempt| {
            if let Ok(mut requests) = observed.lock() {
                requests.latencies.record(attempt.elapsed);
                *requests
                    .statuses
                    .entry(attempt.status.unwrap_or(0))
                    .or_default() += 1;
            }
        })
        .build()?;
    let ingestor = client.ingestor();
    let refused = Arc::new(AtomicBool::new(false));
    let (receipts, pending) = mpsc::channel(config.batch_size.saturating_mul(4));
    let collector = tokio::spawn(collect(pending, refused.clone()));

    let mut generator = Generator::new(config.generator.clone());
    let started = Instant::now();
    // Everything this process does while sending: the progress line and, with `--brokers`, the
    // ledger tail too.
    let cpu_at_start = neruba::process::cpu("self");
    let sent = Arc::new(AtomicU64::new(0));
    let progress = {
        let (ingestor, sent, stop) = (ingestor.clone(), sent.clone(), CancellationToken::new());
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut before = 0;
            loop {
                tokio::select! {
                    () = stopped.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let totals = ingestor.totals();
                eprintln!(
                    "loadgen: {:>4}s sent {} accepted {} ({}/s) duplicate {} rejected {} failed {}",
                    started.elapsed().as_secs(),
                    sent.load(Ordering::Relaxed),
                    totals.accepted,
                    totals.accepted - before,
                    totals.duplicate,
                    totals.rejected,
                    totals.failed
                );
                before = totals.accepted;
            }
        });
        (stop, task)
    };

    let mut count = 0u64;
    let mut max_event_ms = i64::MIN;
    loop {
        if shutdown.is_cancelled() || refused.load(Ordering::Relaxed) {
            break;
        }
        if config.events.is_some_and(|events| count >= events)
            || config.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        if config.rate > 0 {
            let due = Duration::from_nanos(
                u64::try_from(u128::from(count) * 1_000_000_000 / u128::from(config.rate))
                    .unwrap_or(u64::MAX),
            );
            if due > started.elapsed() + Duration::from_millis(1) {
                tokio::time::sleep_until((started + due).into()).await;
            }
        }
        let planned = generator.next(now_ms());
        max_event_ms = max_event_ms.max(planned.time_ms);
        let receipt = ingestor.send(generator.event(&planned)).await?;
        if receipts.send(receipt).await.is_err() {
            bail!("the receipt collector stopped");
        }
        count += 1;
        sent.store(count, Ordering::Relaxed);
    }
    drop(receipts);
    // A failed batch is in the report (`failed`); close reports the first such error again.
    let closed = ingestor.close().await;
    let verdicts = collector.await?;
    let sending = started.elapsed();
    let own_cpu = neruba::process::cpu("self")
        .zip(cpu_at_start)
        .map(|(now, before)| now.saturating_sub(before));
    progress.0.cancel();
    progress.1.await?;

    let ledger = match tail {
        Some(tail) => Some(
            tail.wait(
                &WaitPlan {
                    last_accept: verdicts.last_accept,
                    max_event_ms,
                    window: args.window,
                    grace: args.grace,
                    idle_timeout: args.idle_timeout,
                    settle: args.settle,
                    settle_timeout: args.settle_timeout,
                },
                &shutdown,
            )
            .await?,
        ),
        None => None,
    };

    let requests = requests
        .lock()
        .map_err(|_| anyhow::anyhow!("the attempt observer panicked"))?;
    let report = report(
        &config,
        &args.url,
        generator.generated,
        count,
        &verdicts,
        sending,
        own_cpu,
        &requests,
        ledger.as_ref(),
    );
    if args.json {
        println!("{report}");
    } else {
        print!("{}", render(&report));
    }
    if refused.load(Ordering::Relaxed) {
        if let Err(error) = closed {
            bail!("the gateway refused the load: {error}");
        }
        bail!("the gateway refused the load");
    }
    Ok(())
}

/// When the ledger should have caught up.
#[derive(Debug)]
struct WaitPlan {
    last_accept: Option<Instant>,
    max_event_ms: i64,
    window: Duration,
    grace: Duration,
    idle_timeout: Duration,
    settle: Duration,
    settle_timeout: Duration,
}

impl WaitPlan {
    /// When, at the latest, the aggregator closes the window of the latest event: its
    /// tenant's watermark follows the clock once `idle_timeout` passed after the last event,
    /// and a window closes once the watermark (minus `grace`) passes its end.
    fn windows_closed(&self, last_accept: Instant) -> Instant {
        let window_ms = i64::try_from(self.window.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let window_end_ms = self
            .max_event_ms
            .div_euclid(window_ms)
            .saturating_add(1)
            .saturating_mul(window_ms);
        let until_end = u64::try_from(window_end_ms.saturating_sub(now_ms())).unwrap_or(0);
        let end = Instant::now() + Duration::from_millis(until_end);
        end.max(last_accept + self.idle_timeout) + self.grace
    }
}

/// (tenant, meter, customer, group as JSON, window start or period start).
type Key = (String, String, String, String, String);

/// What the ledger tail saw of the run.
#[derive(Debug, Default)]
struct LedgerSeen {
    /// Distinct line items of the run's customers.
    items: u64,
    adjustments: u64,
    /// The latest revision's window quantity per (tenant, meter, customer, group, window).
    windows: HashMap<Key, (u32, Decimal)>,
    /// Per (tenant, meter, customer, group, period): the period quantity of the latest
    /// window's latest revision.
    series: HashMap<Key, (String, u32, Decimal)>,
    last_item: Option<Instant>,
}

impl LedgerSeen {
    fn add(&mut self, item: &LineItem) {
        self.items += 1;
        if item.supersedes.is_some() {
            self.adjustments += 1;
        }
        if item.revision == 0 {
            // A rerun's whole-period adjustment: no window of its own.
            return;
        }
        let group = serde_json::to_string(&item.group).unwrap_or_default();
        let window = (
            item.tenant.clone(),
            item.meter.clone(),
            item.customer.clone(),
            group.clone(),
            item.window_start.clone(),
        );
        let entry = self
            .windows
            .entry(window)
            .or_insert((0, item.window_quantity));
        if item.revision >= entry.0 {
            *entry = (item.revision, item.window_quantity);
        }
        let series = (
            item.tenant.clone(),
            item.meter.clone(),
            item.customer.clone(),
            group,
            item.period_start.clone(),
        );
        let latest = self
            .series
            .entry(series)
            .or_insert((String::new(), 0, item.period_quantity));
        if (item.window_start.as_str(), item.revision) >= (latest.0.as_str(), latest.1) {
            *latest = (
                item.window_start.clone(),
                item.revision,
                item.period_quantity,
            );
        }
    }

    /// Per meter: the sum of the windows' latest quantities, and the sum of the series'
    /// latest period quantities.
    fn quantities(&self) -> BTreeMap<String, (Decimal, Decimal)> {
        let mut out: BTreeMap<String, (Decimal, Decimal)> = BTreeMap::new();
        for ((_, meter, ..), (_, quantity)) in &self.windows {
            out.entry(meter.clone()).or_default().0 += *quantity;
        }
        for ((_, meter, ..), (_, _, quantity)) in &self.series {
            out.entry(meter.clone()).or_default().1 += *quantity;
        }
        out
    }
}

/// A reader of the ledger from its end, in a blocking thread, keeping the run's line items.
struct LedgerTail {
    stop: Arc<AtomicBool>,
    items: Arc<AtomicU64>,
    thread: tokio::task::JoinHandle<Result<LedgerSeen>>,
}

impl std::fmt::Debug for LedgerTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerTail").finish_non_exhaustive()
    }
}

/// What the ledger wait found.
#[derive(Debug)]
struct LedgerReport {
    seen: LedgerSeen,
    caught_up: bool,
    /// From the last accept to the last line item.
    last_item_after_accept: Option<Duration>,
    waited: Duration,
}

impl LedgerTail {
    /// Assigns every ledger partition at its current end (the high watermark, read now, so
    /// nothing produced after this returns is missed) and starts reading.
    fn start(
        brokers: &str,
        kafka_opts: &[(String, String)],
        topic: &str,
        customer_prefix: String,
    ) -> Result<Self> {
        let timeout = Duration::from_secs(10);
        let consumer = neruba_kafka::clients::topic_reader(
            brokers,
            "neruba-loadgen",
            topic,
            kafka_opts,
            timeout,
        )
        .with_context(|| format!("read the ledger topic {topic} at {brokers}"))?;
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        let mut at_end = TopicPartitionList::new();
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            let (_, high) = consumer.fetch_watermarks(topic, partition.id(), timeout)?;
            at_end.add_partition_offset(topic, partition.id(), Offset::Offset(high))?;
        }
        consumer.assign(&at_end)?;
        let stop = Arc::new(AtomicBool::new(false));
        let items = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, items) = (stop.clone(), items.clone());
            tokio::task::spawn_blocking(move || read(&consumer, &customer_prefix, &stop, &items))
        };
        Ok(Self {
            stop,
            items,
            thread,
        })
    }

    /// Waits until the ledger caught up with the run (or the wait is over), then stops.
    async fn wait(self, plan: &WaitPlan, shutdown: &CancellationToken) -> Result<LedgerReport> {
        let started = Instant::now();
        let mut caught_up = false;
        if let Some(last_accept) = plan.last_accept {
            let closed = plan.windows_closed(last_accept);
            let give_up = last_accept + plan.settle_timeout;
            let mut last_count = self.items.load(Ordering::Relaxed);
            let mut last_change = Instant::now();
            let mut next_progress = Instant::now() + Duration::from_secs(1);
            while !shutdown.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = Instant::now();
                let count = self.items.load(Ordering::Relaxed);
                if count != last_count {
                    (last_count, last_change) = (count, now);
                }
                // None yet is not caught up: a rater still joining its group, or a slow
                // first fetch of the ledger, must not read as a run whose ledger is complete.
                if count > 0 && now >= closed + plan.settle && now >= last_change + plan.settle {
                    caught_up = true;
                    break;
                }
                if now >= give_up {
                    break;
                }
                if now >= next_progress {
                    next_progress = now + Duration::from_secs(1);
                    eprintln!(
                        "loadgen: waiting for the ledger: {count} line items; the last window \
                         closes in about {}s",
                        closed.saturating_duration_since(now).as_secs()
                    );
                }
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.thread.await??;
        let last_item_after_accept = match (plan.last_accept, seen.last_item) {
            (Some(accept), Some(item)) => Some(item.saturating_duration_since(accept)),
            _ => None,
        };
        Ok(LedgerReport {
            caught_up,
            last_item_after_accept,
            waited: started.elapsed(),
            seen,
        })
    }
}

/// The tail's loop: the run's line items, each id once.
fn read(
    consumer: &BaseConsumer,
    customer_prefix: &str,
    stop: &AtomicBool,
    items: &AtomicU64,
) -> Result<LedgerSeen> {
    let mut seen = LedgerSeen::default();
    let mut ids = HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        // Grants, voids, rules and ticks share the ledger; they carry a record header.
        if message
            .headers()
            .is_some_and(|h| h.iter().any(|h| h.key == topics::RECORD_HEADER))
        {
            continue;
        }
        let Ok(item) = LineItem::decode(message.payload().unwrap_or_default()) else {
            continue;
        };
        if !item.customer.starts_with(customer_prefix) || !ids.insert(item.id.clone()) {
            continue;
        }
        seen.add(&item);
        seen.last_item = Some(Instant::now());
        items.fetch_add(1, Ordering::Relaxed);
    }
    Ok(seen)
}

/// The report as one JSON object.
#[allow(clippy::too_many_arguments, reason = "one call, in `run`")]
fn report(
    config: &Config,
    url: &str,
    generated: Generated,
    sent: u64,
    verdicts: &Verdicts,
    elapsed: Duration,
    own_cpu: Option<Duration>,
    requests: &Requests,
    ledger: Option<&LedgerReport>,
) -> Value {
    let latencies = &requests.latencies;
    let status = |code: u16| requests.statuses.get(&code).copied().unwrap_or(0);
    let elapsed_us = u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    let per_second = u128::from(verdicts.accepted) * 1_000_000 / u128::from(elapsed_us);
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let ledger = ledger.map(|ledger| {
        let quantities: BTreeMap<String, Value> = ledger
            .seen
            .quantities()
            .into_iter()
            .map(|(meter, (windows, periods))| {
                (
                    meter,
                    json!({"windows": windows.to_string(), "periods": periods.to_string()}),
                )
            })
            .collect();
        json!({
            "line_items": ledger.seen.items,
            "adjustments": ledger.seen.adjustments,
            "series": ledger.seen.series.len(),
            "quantity": quantities,
            "caught_up": ledger.caught_up,
            "last_item_after_last_accept_ms": ledger.last_item_after_accept.map(ms),
            "waited_ms": ms(ledger.waited),
        })
    });
    json!({
        "run_id": config.generator.run_id,
        "seed": config.generator.seed,
        "url": url,
        "event_type": config.generator.event_type,
        "generated": {
            "events": generated.events,
            "distinct": generated.distinct,
            "repeats": generated.repeats,
            "late": generated.late,
            "tokens": generated.tokens,
        },
        "sent": sent,
        "accepted": verdicts.accepted,
        "duplicate": verdicts.duplicate,
        "rejected": verdicts.rejected.values().sum::<u64>(),
        "rejected_by_code": verdicts.rejected,
        "failed": verdicts.failed.values().sum::<u64>(),
        "failed_by_reason": verdicts.failed,
        "elapsed_ms": ms(elapsed),
        "accepted_per_s": u64::try_from(per_second).unwrap_or(u64::MAX),
        "own_cpu": own_cpu.map(|used| json!({
            "ms": ms(used),
            "ns_per_event": u64::try_from(used.as_nanos() / u128::from(sent.max(1))).unwrap_or(u64::MAX),
        })),
        "requests": {
            "attempts": latencies.total,
            "latency_us": {
                "p50": latencies.quantile_us(1, 2),
                "p99": latencies.quantile_us(99, 100),
                "p999": latencies.quantile_us(999, 1000),
                "max": (latencies.total > 0).then_some(latencies.max_us),
            },
            "answered_429": status(429),
            "answered_503": status(503),
            "transport_errors": status(0),
            "by_status": requests.statuses.iter().map(|(s, n)| (s.to_string(), *n)).collect::<BTreeMap<_, _>>(),
        },
        "ledger": ledger,
    })
}

/// The report for a person.
fn render(report: &Value) -> String {
    let n = |path: &str| match report.pointer(path) {
        Some(Value::String(text)) => text.clone(),
        Some(value) => value.to_string(),
        None => String::new(),
    };
    // Microseconds (or milliseconds) shown as milliseconds (or seconds), exactly.
    let thousandths = |path: &str| {
        let whole = report.pointer(path).and_then(Value::as_u64).unwrap_or(0);
        Decimal::new(i64::try_from(whole).unwrap_or(i64::MAX), 3).to_string()
    };
    let mut out = format!(
        "neruba loadgen: run {} (seed {}) against {}\n\
         sent        {} events ({} new, {} repeats, {} late) of type {}\n\
         accepted    {}\n\
         duplicate   {}\n\
         rejected    {} {}\n\
         failed      {} {}\n\
         throughput  {} accepted events/s over {} s\n\
         requests    {} (latency p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms); \
         answered 429: {}, 503: {}; transport errors: {}\n",
        n("/run_id"),
        n("/seed"),
        n("/url"),
        n("/sent"),
        n("/generated/distinct"),
        n("/generated/repeats"),
        n("/generated/late"),
        n("/event_type"),
        n("/accepted"),
        n("/duplicate"),
        n("/rejected"),
        n("/rejected_by_code"),
        n("/failed"),
        n("/failed_by_reason"),
        n("/accepted_per_s"),
        thousandths("/elapsed_ms"),
        n("/requests/attempts"),
        thousandths("/requests/latency_us/p50"),
        thousandths("/requests/latency_us/p99"),
        thousandths("/requests/latency_us/p999"),
        thousandths("/requests/latency_us/max"),
        n("/requests/answered_429"),
        n("/requests/answered_503"),
        n("/requests/transport_errors"),
    );
    if report.get("own_cpu").is_some_and(|c| !c.is_null()) {
        out.push_str(&format!(
            "own CPU     {} s while sending = {} µs per event sent (on a machine shared with the \
             gateway, CPU the gateway did not get)\n",
            thousandths("/own_cpu/ms"),
            thousandths("/own_cpu/ns_per_event"),
        ));
    }
    if report.get("ledger").is_some_and(|l| !l.is_null()) {
        out.push_str(&format!(
            "ledger      {} line items ({} adjustments, {} series); caught up: {}; last line \
             item {} after the last accept (waited {} s)\n\
             quantity    {} (new events' tokens: {})\n",
            n("/ledger/line_items"),
            n("/ledger/adjustments"),
            n("/ledger/series"),
            n("/ledger/caught_up"),
            if report
                .pointer("/ledger/last_item_after_last_accept_ms")
                .is_some_and(Value::is_u64)
            {
                format!(
                    "{} s",
                    thousandths("/ledger/last_item_after_last_accept_ms")
                )
            } else {
                "none".to_owned()
            },
            thousandths("/ledger/waited_ms"),
            n("/ledger/quantity"),
            n("/generated/tokens"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator(seed: u64, duplicate_fraction: &str, late_fraction: &str) -> Generator {
        let fraction = |text: &str| threshold(text.parse().unwrap_or_default());
        Generator::new(GeneratorConfig {
            run_id: format!("loadgen-{seed}"),
            seed,
            customers: 50,
            event_type: "llm.completion".to_owned(),
            count_only: false,
            duplicate_threshold: fraction(duplicate_fraction),
            late_threshold: fraction(late_fraction),
            late_by_ms: 600_000,
            depth: 100,
        })
    }

    #[test]
    fn the_same_seed_gives_the_same_events_and_another_seed_other_ones() {
        let run = |seed| {
            let mut g = generator(seed, "0.1", "0.05");
            let events: Vec<Planned> = (0..5_000).map(|_| g.next(1_795_000_000_000)).collect();
            (events, g.generated)
        };
        let (first, counted) = run(7);
        let (again, counted_again) = run(7);
        assert_eq!(first, again);
        assert_eq!(counted, counted_again);
        assert_ne!(run(8).0, first);

        // The counts are the events': repeats copy an earlier event whole, and only the new
        // events' tokens are summed.
        let repeats: Vec<&Planned> = first.iter().filter(|p| p.repeat).collect();
        assert_eq!(counted.events, 5_000);
        assert_eq!(counted.repeats, repeats.len() as u64);
        assert_eq!(counted.distinct + counted.repeats, 5_000);
        let new: Vec<&Planned> = first.iter().filter(|p| !p.repeat).collect();
        assert_eq!(counted.tokens, new.iter().map(|p| p.tokens).sum::<u64>());
        assert_eq!(
            counted.late,
            new.iter().filter(|p| p.time_ms < 1_795_000_000_000).count() as u64
        );
        for (n, planned) in first.iter().enumerate() {
            if planned.repeat {
                let original = new.iter().find(|p| p.seq == planned.seq);
                assert_eq!(
                    original.map(|o| Planned {
                        repeat: true,
                        ..(*o).clone()
                    }),
                    Some(planned.clone())
                );
            }
            // Never a repeat of an event that may still be unanswered (the last 100).
            let new_before = first[..n].iter().filter(|p| !p.repeat).count() as u64;
            if planned.repeat {
                assert!(planned.seq + 100 < new_before, "event {n}");
            }
        }
        // About the asked share, in the tolerance of 5,000 draws.
        assert!((400..=600).contains(&counted.repeats), "{counted:?}");
        assert!(first.iter().all(|p| (1..=4000).contains(&p.tokens)));
        assert!(
            first
                .iter()
                .all(|p| p.time_ms >= 1_795_000_000_000 - 600_000)
        );
    }

    #[test]
    fn events_carry_the_run_in_ids_and_customers() {
        let mut g = generator(7, "0", "0");
        let planned = g.next(0);
        let event = g.event(&planned);
        assert_eq!(event.id.as_deref(), Some("loadgen-7-e0"));
        assert_eq!(event.subject, format!("loadgen-7-c{}", planned.customer));
        assert_eq!(event.time.as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(event.data["status"], "ok");
    }

    #[test]
    fn percentiles_are_nearest_rank_and_exact_below_256_microseconds() {
        let mut latencies = Latencies::default();
        assert_eq!(latencies.quantile_us(1, 2), None);
        for us in 1..=200 {
            latencies.record(Duration::from_micros(us));
        }
        assert_eq!(latencies.quantile_us(1, 2), Some(100));
        assert_eq!(latencies.quantile_us(99, 100), Some(198));
        assert_eq!(latencies.quantile_us(999, 1000), Some(200));
        assert_eq!(latencies.quantile_us(0, 1), Some(1));

        // Above, a bucket is under 0.8 % wide, and the largest value caps the answer.
        let mut slow = Latencies::default();
        for ms in [10, 20, 30, 1_000] {
            slow.record(Duration::from_millis(ms));
        }
        let p50 = slow.quantile_us(1, 2).unwrap_or(0);
        assert!((20_000..=20_160).contains(&p50), "{p50}");
        assert_eq!(slow.quantile_us(999, 1000), Some(1_000_000));
        for us in [256, 257, 1_000, 65_535, 1 << 40, u64::MAX] {
            let bucket = Latencies::bucket(us);
            assert!(Latencies::bucket_high(bucket) >= us, "{us}");
            assert!(
                bucket == 0 || Latencies::bucket_high(bucket - 1) < us,
                "{us}"
            );
        }
    }

    #[test]
    fn impossible_settings_are_refused_with_the_reason() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let mut args = vec!["neruba", "loadgen", "--key", "k"];
            args.extend_from_slice(extra);
            match super::super::Cli::try_parse_from(args).map(|c| c.command) {
                Ok(super::super::Command::Loadgen(args)) => args.config().map(|_| ()),
                other => panic!("{other:?}"),
            }
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            parse(&["--duplicate-fraction", "1"]),
            Err("--duplicate-fraction (1) must be at least 0 and below 1".to_owned())
        );
        assert_eq!(
            parse(&["--customers", "0"]),
            Err("--customers must be at least 1".to_owned())
        );
        assert!(parse(&["--events", "10", "--seed", "3"]).is_ok());
    }
}
