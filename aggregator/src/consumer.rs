//! The consumer loop: poll a batch, apply it to the partitions' state, deliver the outputs,
//! write the state. Runs on one blocking thread.
//!
//! Invariants:
//! - on assignment each partition resumes at the offset stored with its state in RocksDB;
//! - on revocation (and on shutdown) the pending batch is delivered and written before the
//!   partition is let go, so the next owner resumes exactly there;
//! - nothing of a batch is written before its outputs were acknowledged (`acks=all`).

use crate::metrics::Metrics;
use crate::state::{Output, PartitionState};
use crate::{Config, Error, Result};
use neruba_kafka::health::ConsumerHealth;
use neruba_schemas::LiveCatalog;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use rocksdb::Cache;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use neruba_schemas::topics::{WATERMARK_HEADER, WATERMARK_TENANT_HEADER};
use rdkafka::message::Headers;

/// Builds the consumer: the settings of every stateful stage, tuned for the aggregator.
fn build_consumer(config: &Config, context: Context) -> Result<BaseConsumer<Context>, KafkaError> {
    let member = neruba_kafka::rebalance::Member {
        brokers: &config.brokers,
        group_id: &config.group_id,
        client_id: "neruba-aggregator",
        instance_id: config.instance_id.as_deref(),
    };
    neruba_kafka::rebalance::consumer(
        member,
        &[
            ("max.poll.interval.ms", "300000"),
            ("fetch.wait.max.ms", "50"),
            ("queued.max.messages.kbytes", "65536"),
        ],
        &config.kafka_options,
        context,
    )
}

struct Shared {
    partitions: HashMap<i32, PartitionState>,
    config: Config,
    cache: Cache,
    producer: neruba_kafka::Recoverable,
    /// Shutdown: a batch whose outputs are not acknowledged is then given up, unwritten.
    stop: CancellationToken,
    rollup_partitions: i32,
    catalog: LiveCatalog,
    metrics: Metrics,
    /// A failure inside a rebalance callback, surfaced by the loop.
    fatal: Option<Error>,
    health: Arc<ConsumerHealth>,
    /// Kafka timestamp of the last message applied, per partition (for lag in seconds).
    last_timestamp_ms: HashMap<i32, i64>,
    /// This worker's share of `neruba_assigned_partitions` (workers of a process add up).
    published_assigned: i64,
}

impl Shared {
    fn open_partition(&mut self, partition: i32) -> Result<&mut PartitionState> {
        if !self.partitions.contains_key(&partition) {
            let dir = crate::state::partition_dir(
                &self.config.state_dir,
                &self.config.events_topic,
                partition,
            );
            let state = neruba_kafka::rebalance::open_when_released(
                || PartitionState::open(&dir, partition, self.config.timing, &self.cache),
                |e| matches!(e, Error::Storage(e) if e.to_string().contains("lock")),
            )?;
            tracing::info!(partition, next_offset = ?state.next_offset(), open_windows = state.open_windows(), "Partition state opened.");
            self.partitions.insert(partition, state);
        }
        self.partitions
            .get_mut(&partition)
            .ok_or_else(|| Error::Corrupt("partition vanished".into()))
    }

    /// Delivers every pending output, then writes each dirty partition's batch.
    /// Returns `false` when an injected crash stopped it between the two.
    fn finish_batch(&mut self, consumer: &BaseConsumer<Context>) -> Result<bool> {
        self.finish_batch_crashing(consumer, false)
    }

    fn finish_batch_crashing(
        &mut self,
        consumer: &BaseConsumer<Context>,
        crash_before_write: bool,
    ) -> Result<bool> {
        let mut outputs = Vec::new();
        for state in self.partitions.values_mut() {
            outputs.extend(state.take_outputs());
            let counts = state.take_counts();
            self.metrics.events.inc_by(counts.applied);
            self.metrics
                .dedup_hits
                .with_label_values(&["aggregator"])
                .inc_by(counts.duplicates);
            self.metrics.late_events.inc_by(counts.late);
            self.metrics.rollups.inc_by(counts.rollups);
            let now = neruba_schemas::event::now_ms();
            for end in counts.closed_window_ends {
                let late = u64::try_from((now - end).max(0)).unwrap_or(0);
                self.metrics
                    .close_delay
                    .observe(Duration::from_millis(late).as_secs_f64());
            }
            for (code, n) in counts.dead_letters {
                self.metrics
                    .dead_letters
                    .with_label_values(&[code])
                    .inc_by(n);
            }
        }
        if !outputs.is_empty() {
            let stop = self.stop.clone();
            neruba_kafka::deliver_until_acked(
                &self.producer,
                |producer| send(producer, &self.config, self.rollup_partitions, &outputs),
                &|| stop.is_cancelled(),
            )?;
        }
        if crash_before_write {
            return Ok(false);
        }
        let mut committed = TopicPartitionList::new();
        for state in self.partitions.values_mut() {
            if !state.is_dirty() && state.next_offset().is_none() {
                continue;
            }
            if let Err(e) = state.commit() {
                self.health.store_failed(&e.to_string());
                return Err(e);
            }
            if let Some(next) = state.next_offset() {
                committed.add_partition_offset(
                    &self.config.events_topic,
                    state.partition,
                    Offset::Offset(next),
                )?;
            }
        }
        if committed.count() > 0 {
            // For lag monitoring only; correctness rests on the offsets in RocksDB.
            if let Err(e) = consumer.commit(&committed, CommitMode::Async) {
                tracing::debug!(error = %e, "Group offset commit failed; lag graphs may lag.");
            }
        }
        Ok(true)
    }

    /// Adds this worker's change in owned partitions to the process-wide gauge.
    fn publish_assigned(&mut self) {
        let owned = i64::try_from(self.partitions.len()).unwrap_or(0);
        self.metrics
            .assigned_partitions
            .add(owned - self.published_assigned);
        self.published_assigned = owned;
    }

    fn publish_gauges(&self) {
        let now = neruba_schemas::event::now_ms();
        for state in self.partitions.values() {
            let p = state.partition.to_string();
            let labels = [p.as_str()];
            self.health.observe(
                state.partition,
                state.next_offset().unwrap_or(0),
                self.last_timestamp_ms.get(&state.partition).copied(),
            );
            if state.watermark() > i64::MIN {
                self.metrics
                    .watermark_lag
                    .with_label_values(&labels)
                    .set((now - state.watermark()) / 1000);
            }
            self.metrics
                .open_windows
                .with_label_values(&labels)
                .set(i64::try_from(state.open_windows()).unwrap_or(i64::MAX));
            let (size, pending) = state.disk_usage();
            self.health.observe_store(state.partition, size, pending);
        }
    }
}

/// Enqueues every output; the caller awaits the acknowledgements.
fn send(
    producer: &FutureProducer,
    config: &Config,
    rollup_partitions: i32,
    outputs: &[Output],
) -> Vec<Result<DeliveryFuture, KafkaError>> {
    let mut pending = Vec::with_capacity(outputs.len());
    for output in outputs {
        let sent = match output {
            Output::Rollup(rollup) => {
                let key = rollup.key();
                let payload = rollup.encode();
                let partition = neruba_schemas::topics::stable_partition(
                    &rollup.partition_key(),
                    rollup_partitions,
                );
                producer
                    .send_result(
                        FutureRecord::to(&config.rollups_topic)
                            .key(key.as_bytes())
                            .payload(payload.as_slice())
                            .partition(partition),
                    )
                    .map_err(|(e, _)| e)
            }
            Output::Tick {
                partition,
                tenant,
                watermark,
            } => {
                let text = watermark.to_string();
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: WATERMARK_HEADER,
                        value: Some(text.as_str()),
                    })
                    .insert(Header {
                        key: WATERMARK_TENANT_HEADER,
                        value: Some(tenant.as_str()),
                    });
                let payload =
                    serde_json::json!({"watermark_ms": watermark, "tenant": tenant}).to_string();
                producer
                    .send_result(
                        FutureRecord::to(&config.events_topic)
                            .key(WATERMARK_HEADER.as_bytes())
                            .payload(payload.as_bytes())
                            .partition(*partition)
                            .headers(headers),
                    )
                    .map_err(|(e, _)| e)
            }
            Output::DeadLetter {
                key,
                payload,
                rejection,
                offset,
            } => {
                let headers = neruba_kafka::dead_letter_headers(
                    rejection.code.as_str(),
                    &rejection.message,
                    &config.events_topic,
                    *offset,
                );
                let mut record = FutureRecord::to(&config.dead_letter_topic)
                    .payload(payload.as_slice())
                    .headers(headers);
                if let Some(key) = key {
                    record = record.key(key.as_slice());
                }
                producer.send_result(record).map_err(|(e, _)| e)
            }
        };
        pending.push(sent);
    }
    pending
}

/// How long an idle tick may take to come back before another is sent.
const TICK_RETRY: Duration = Duration::from_secs(5);

/// The tenant and watermark a tick message carries, if it is one. A tick whose value does not
/// parse is read as the far past, which moves nothing; one without a tenant (written before
/// clocks were per tenant) applies to every tenant of the partition.
fn watermark_tick<'a>(
    message: &'a rdkafka::message::BorrowedMessage<'_>,
) -> Option<(Option<&'a str>, i64)> {
    let headers = message.headers()?;
    let value = |key: &str| {
        headers
            .iter()
            .find(|h| h.key == key)
            .map(|h| std::str::from_utf8(h.value.unwrap_or_default()).unwrap_or_default())
    };
    let watermark = value(WATERMARK_HEADER)?.parse().unwrap_or(i64::MIN);
    Some((value(WATERMARK_TENANT_HEADER), watermark))
}

/// The consumer's context: partition state opened on assignment, written on revocation.
type Context = neruba_kafka::rebalance::Rebalance<Shared>;

impl neruba_kafka::rebalance::PartitionStates for Shared {
    type Error = Error;

    fn open(&mut self, partition: i32) -> Result<Option<i64>> {
        Ok(self.open_partition(partition)?.next_offset())
    }

    fn finish(&mut self, consumer: &BaseConsumer<Context>) -> Result<()> {
        self.finish_batch(consumer).map(|_| ())
    }

    fn release(&mut self, partition: i32) {
        self.partitions.remove(&partition);
        self.last_timestamp_ms.remove(&partition);
    }

    fn owned_changed(&mut self) {
        self.publish_assigned();
    }

    fn fail(&mut self, error: Error) {
        self.fatal = Some(error);
    }
}

/// Which of a process's workers this is: with static assignment, worker `index` of `count`
/// takes the `index`-th of `count` contiguous ranges of the assignment, as the group's range
/// assignor would.
#[derive(Debug, Clone, Copy)]
pub struct WorkerSlice {
    pub index: usize,
    pub count: usize,
}

impl WorkerSlice {
    fn of(self, partitions: Vec<i32>) -> Vec<i32> {
        let count = self.count.max(1);
        let (base, extra) = (partitions.len() / count, partitions.len() % count);
        let start = self.index * base + self.index.min(extra);
        let len = base + usize::from(self.index < extra);
        partitions.into_iter().skip(start).take(len).collect()
    }
}

/// The consumer loop and what it owns.
pub struct Worker {
    consumer: BaseConsumer<Context>,
    shared: Arc<Mutex<Shared>>,
    shutdown: CancellationToken,
    kill: Arc<AtomicBool>,
    idle_timeout: Duration,
    grace_ms: i64,
    max_batch: usize,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

impl Worker {
    pub fn new(
        config: Config,
        catalog: LiveCatalog,
        metrics: Metrics,
        health: Arc<ConsumerHealth>,
        shutdown: CancellationToken,
        kill: Arc<AtomicBool>,
        slice: WorkerSlice,
    ) -> Result<Self> {
        let producer = neruba_kafka::recoverable_output_producer(
            &config.brokers,
            "neruba-aggregator",
            // No linger: a batch's outputs are sent together and then awaited, so waiting for
            // more only delays the acknowledgements the batch's write waits for.
            0,
            &config.kafka_options,
        )?;
        let rollup_partitions =
            neruba_kafka::partition_count(&producer.get(), &config.rollups_topic)?;
        let shared = Arc::new(Mutex::new(Shared {
            partitions: HashMap::new(),
            cache: Cache::new_lru_cache(config.block_cache_bytes),
            producer,
            stop: shutdown.clone(),
            rollup_partitions,
            catalog,
            metrics,
            fatal: None,
            health: health.clone(),
            last_timestamp_ms: HashMap::new(),
            published_assigned: 0,
            config: config.clone(),
        }));
        let context = Context::new(shared.clone(), &config.events_topic, kill.clone(), health);
        let consumer = build_consumer(&config, context)?;
        match &config.assignment {
            None => consumer.subscribe(&[&config.events_topic])?,
            Some(assignment) => {
                Context::assign_static(&consumer, |count| slice.of(assignment.resolve(count)))?;
            }
        }
        Ok(Self {
            consumer,
            shared,
            shutdown,
            kill,
            idle_timeout: config.idle_timeout,
            grace_ms: config.timing.grace_ms,
            max_batch: config.max_batch,
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Shared>> {
        self.shared
            .lock()
            .map_err(|_| Error::Corrupt("aggregator state lock poisoned".into()))
    }

    /// Runs until shutdown (writing everything) or kill (writing nothing).
    pub fn run(self) -> Result<()> {
        let mut last_gauges = Instant::now();
        let crash = self.lock()?.config.crash;
        let mut applied_total: u64 = 0;
        loop {
            if self.kill.load(Ordering::SeqCst) {
                return Ok(());
            }
            if self.shutdown.is_cancelled() {
                let mut shared = self.lock()?;
                shared.finish_batch(&self.consumer)?;
                tracing::info!("Aggregator stopped; state written.");
                return Ok(());
            }
            let mut applied = 0;
            // Partitions the batch read, with the Kafka timestamp of the last message of each.
            let mut touched: Vec<(i32, Option<i64>)> = Vec::new();
            // One catalog version for the whole batch.
            let catalog = self.lock()?.catalog.current();
            while applied < self.max_batch {
                let wait = if applied == 0 {
                    Duration::from_millis(100)
                } else {
                    Duration::ZERO
                };
                let message = match self.consumer.poll(wait) {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "Consumer error.");
                        break;
                    }
                    Some(Ok(message)) => message,
                };
                if self.kill.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let at = message.timestamp().to_millis();
                match touched.iter_mut().find(|(p, _)| *p == message.partition()) {
                    Some(last) => last.1 = at.or(last.1),
                    None => touched.push((message.partition(), at)),
                }
                let mut shared = self.lock()?;
                if let Some(state) = shared.partitions.get_mut(&message.partition()) {
                    match watermark_tick(&message) {
                        Some((tenant, watermark)) => {
                            state.apply_tick(message.offset(), tenant, watermark)?;
                        }
                        None => state.apply(
                            message.offset(),
                            message.key(),
                            message.payload().unwrap_or_default(),
                            &catalog,
                        )?,
                    }
                }
                applied += 1;
                applied_total += 1;
                if crash == Some(crate::CrashPoint::AfterMessages(applied_total)) {
                    self.kill.store(true, Ordering::SeqCst);
                    return Ok(());
                }
            }
            let mut shared = self.lock()?;
            if let Some(e) = shared.fatal.take() {
                return Err(e);
            }
            for (partition, at) in touched {
                if let Some(at) = at {
                    shared.last_timestamp_ms.insert(partition, at);
                }
            }
            let now = neruba_schemas::event::now_ms();
            for state in shared.partitions.values_mut() {
                // Queued as ticks on the partition itself, applied when read back.
                state.idle_ticks(
                    self.idle_timeout,
                    self.grace_ms,
                    now,
                    self.idle_timeout.max(TICK_RETRY),
                );
            }
            if self.kill.load(Ordering::SeqCst) {
                return Ok(());
            }
            let crash_now =
                matches!(crash, Some(crate::CrashPoint::BeforeWrite(n)) if applied_total >= n);
            if !shared.finish_batch_crashing(&self.consumer, crash_now)? {
                self.kill.store(true, Ordering::SeqCst);
                return Ok(());
            }
            if last_gauges.elapsed() >= Duration::from_secs(1) {
                shared.publish_gauges();
                last_gauges = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WorkerSlice;

    #[test]
    fn workers_split_a_static_assignment_into_contiguous_ranges_covering_it_once() {
        let slices = |count: usize, partitions: Vec<i32>| -> Vec<Vec<i32>> {
            (0..count)
                .map(|index| WorkerSlice { index, count }.of(partitions.clone()))
                .collect()
        };
        assert_eq!(
            slices(2, (0..8).collect()),
            [vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
        );
        assert_eq!(
            slices(3, (0..8).collect()),
            [vec![0, 1, 2], vec![3, 4, 5], vec![6, 7]]
        );
        assert_eq!(slices(3, vec![5]), [vec![5], vec![], vec![]]);
        assert_eq!(slices(1, vec![2, 9]), [vec![2, 9]]);
    }
}
