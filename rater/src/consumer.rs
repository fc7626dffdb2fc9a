//! The rater's consumer loop: poll rollups, rate them against the partition's state, deliver
//! the line items, write the state. Runs on one blocking thread.
//!
//! Invariants:
//! - on assignment each partition resumes at the offset stored with its state in RocksDB;
//! - on revocation and on shutdown the pending batch is delivered and written first;
//! - nothing of a batch is written before its items were acknowledged (`acks=all`).

use crate::metrics::Metrics;
use crate::state::{Output, PartitionState, partition_dir};
use crate::{Config, Error, Result};
use neruba_kafka::health::ConsumerHealth;
use neruba_schemas::LiveCatalog;
use neruba_schemas::topics::{RERUN_HEADER, stable_partition};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use rocksdb::Cache;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Builds the consumer: the settings of every stateful stage, tuned for the rater.
fn build_consumer(config: &Config, context: Context) -> Result<BaseConsumer<Context>, KafkaError> {
    let member = neruba_kafka::rebalance::Member {
        brokers: &config.brokers,
        group_id: &config.group_id,
        client_id: "neruba-rater",
        instance_id: config.instance_id.as_deref(),
    };
    neruba_kafka::rebalance::consumer(
        member,
        &[("fetch.wait.max.ms", "20")],
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
    ledger_partitions: i32,
    metrics: Metrics,
    /// A failure inside a rebalance callback, surfaced by the loop.
    fatal: Option<Error>,
    health: Arc<ConsumerHealth>,
    /// Kafka timestamp of the last rollup read, per partition (for lag in seconds).
    last_timestamp_ms: HashMap<i32, i64>,
}

impl Shared {
    fn open_partition(&mut self, partition: i32) -> Result<&mut PartitionState> {
        if !self.partitions.contains_key(&partition) {
            let dir = partition_dir(
                &self.config.state_dir,
                &self.config.rollups_topic,
                partition,
            );
            let state = neruba_kafka::rebalance::open_when_released(
                || PartitionState::open(&dir, partition, &self.cache, self.config.retention),
                |e| matches!(e, Error::Storage(e) if e.to_string().contains("lock")),
            )?;
            tracing::info!(partition, next_offset = ?state.next_offset(), "Rater partition state opened.");
            self.partitions.insert(partition, state);
        }
        self.partitions
            .get_mut(&partition)
            .ok_or_else(|| Error::Corrupt("partition vanished".into()))
    }

    /// Delivers the batch's items and refusals, then writes each partition's state.
    /// `produced_at` are the rollups' Kafka timestamps, for the close-to-item histogram.
    /// With `crash`, stops after delivering, before writing (fault injection).
    fn finish_batch(
        &mut self,
        consumer: &BaseConsumer<Context>,
        produced_at: &[i64],
        crash: bool,
    ) -> Result<()> {
        let mut outputs = Vec::new();
        for state in self.partitions.values_mut() {
            outputs.extend(state.take_outputs());
            let counts = state.take_counts();
            self.metrics.rollups.inc_by(counts.rollups);
            self.metrics.repeats.inc_by(counts.repeats);
            self.metrics.reruns.inc_by(counts.reruns);
            for (kind, n) in counts.items {
                self.metrics.items.with_label_values(&[kind]).inc_by(n);
            }
            for (code, n) in counts.refused {
                self.metrics.refused.with_label_values(&[code]).inc_by(n);
            }
        }
        let delivered = !outputs.is_empty();
        if !outputs.is_empty() {
            let stop = self.stop.clone();
            neruba_kafka::deliver_until_acked(
                &self.producer,
                |producer| send(producer, &self.config, self.ledger_partitions, &outputs),
                &|| stop.is_cancelled(),
            )?;
        }
        if delivered {
            let now = neruba_schemas::event::now_ms();
            for at in produced_at {
                let millis = u32::try_from((now - at).max(0)).unwrap_or(u32::MAX);
                self.metrics
                    .close_to_item
                    .observe(Duration::from_millis(u64::from(millis)).as_secs_f64());
            }
        }
        if crash {
            return Ok(());
        }
        let mut committed = TopicPartitionList::new();
        for state in self.partitions.values_mut() {
            if !state.is_dirty() {
                continue;
            }
            if let Err(e) = state.commit() {
                self.health.store_failed(&e.to_string());
                return Err(e);
            }
            if let Some(next) = state.next_offset() {
                committed.add_partition_offset(
                    &self.config.rollups_topic,
                    state.partition,
                    Offset::Offset(next),
                )?;
            }
        }
        if committed.count() > 0
            && let Err(e) = consumer.commit(&committed, CommitMode::Async)
        {
            tracing::debug!(error = %e, "Group offset commit failed; lag graphs may lag.");
        }
        Ok(())
    }
}

/// Enqueues every output; the caller awaits the acknowledgements.
fn send(
    producer: &FutureProducer,
    config: &Config,
    ledger_partitions: i32,
    outputs: &[Output],
) -> Vec<Result<DeliveryFuture, KafkaError>> {
    let mut pending = Vec::with_capacity(outputs.len());
    for output in outputs {
        let sent = match output {
            Output::Item(item) => {
                let key = item.partition_key();
                let payload = item.encode();
                producer
                    .send_result(
                        FutureRecord::to(&config.ledger_topic)
                            .key(key.as_bytes())
                            .payload(payload.as_slice())
                            .partition(stable_partition(&key, ledger_partitions)),
                    )
                    .map_err(|(e, _)| e)
            }
            Output::Refused {
                key,
                payload,
                refusal,
                offset,
            } => {
                let headers = neruba_kafka::dead_letter_headers(
                    refusal.code,
                    &refusal.message,
                    &config.rollups_topic,
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

/// The consumer's context: partition state opened on assignment, written on revocation.
type Context = neruba_kafka::rebalance::Rebalance<Shared>;

impl neruba_kafka::rebalance::PartitionStates for Shared {
    type Error = Error;

    fn open(&mut self, partition: i32) -> Result<Option<i64>> {
        Ok(self.open_partition(partition)?.next_offset())
    }

    fn finish(&mut self, consumer: &BaseConsumer<Context>) -> Result<()> {
        self.finish_batch(consumer, &[], false)
    }

    fn release(&mut self, partition: i32) {
        self.partitions.remove(&partition);
        self.last_timestamp_ms.remove(&partition);
    }

    fn owned_changed(&mut self) {
        self.metrics
            .assigned_partitions
            .set(i64::try_from(self.partitions.len()).unwrap_or(0));
    }

    fn fail(&mut self, error: Error) {
        self.fatal = Some(error);
    }
}

/// The consumer loop and what it owns.
pub struct Worker {
    consumer: BaseConsumer<Context>,
    shared: Arc<Mutex<Shared>>,
    catalog: LiveCatalog,
    shutdown: CancellationToken,
    kill: Arc<AtomicBool>,
    max_batch: usize,
    crash_before_write: Option<u64>,
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
    ) -> Result<Self> {
        let producer = neruba_kafka::recoverable_output_producer(
            &config.brokers,
            "neruba-rater",
            2,
            &config.kafka_options,
        )?;
        let ledger_partitions =
            neruba_kafka::partition_count(&producer.get(), &config.ledger_topic)?;
        let shared = Arc::new(Mutex::new(Shared {
            partitions: HashMap::new(),
            cache: Cache::new_lru_cache(config.block_cache_bytes),
            producer,
            stop: shutdown.clone(),
            ledger_partitions,
            metrics,
            fatal: None,
            health: health.clone(),
            last_timestamp_ms: HashMap::new(),
            config: config.clone(),
        }));
        let context = Context::new(shared.clone(), &config.rollups_topic, kill.clone(), health);
        let consumer = build_consumer(&config, context)?;
        match &config.assignment {
            None => consumer.subscribe(&[&config.rollups_topic])?,
            Some(assignment) => {
                Context::assign_static(&consumer, |count| assignment.resolve(count))?;
            }
        }
        Ok(Self {
            consumer,
            shared,
            catalog,
            shutdown,
            kill,
            max_batch: config.max_batch,
            crash_before_write: config.crash_before_write,
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Shared>> {
        self.shared
            .lock()
            .map_err(|_| Error::Corrupt("rater state lock poisoned".into()))
    }

    /// Runs until shutdown (writing everything) or kill (writing nothing).
    pub fn run(self) -> Result<()> {
        let mut last_gauges = Instant::now();
        let mut produced_at = Vec::with_capacity(self.max_batch);
        let mut read: u64 = 0;
        loop {
            if self.kill.load(Ordering::SeqCst) {
                return Ok(());
            }
            if self.shutdown.is_cancelled() {
                self.lock()?.finish_batch(&self.consumer, &[], false)?;
                tracing::info!("Rater stopped; state written.");
                return Ok(());
            }
            produced_at.clear();
            // Kafka timestamp of the last message of each partition the batch read.
            let mut last_at: Vec<(i32, i64)> = Vec::new();
            // One catalog version for the whole batch.
            let catalog = self.catalog.current();
            while produced_at.len() < self.max_batch {
                let wait = if produced_at.is_empty() {
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
                let mut shared = self.lock()?;
                if let Some(state) = shared.partitions.get_mut(&message.partition()) {
                    let payload = message.payload().unwrap_or_default();
                    let rerun = message
                        .headers()
                        .is_some_and(|h| h.iter().any(|h| h.key == RERUN_HEADER));
                    if rerun {
                        state.apply_rerun(message.offset(), payload, &catalog)?;
                    } else {
                        state.apply(message.offset(), message.key(), payload, &catalog)?;
                    }
                }
                let at = message.timestamp().to_millis();
                if let Some(at) = at {
                    match last_at.iter_mut().find(|(p, _)| *p == message.partition()) {
                        Some(last) => last.1 = at,
                        None => last_at.push((message.partition(), at)),
                    }
                }
                produced_at.push(at.unwrap_or_default());
                read += 1;
            }
            if self.kill.load(Ordering::SeqCst) {
                return Ok(());
            }
            let mut shared = self.lock()?;
            if let Some(e) = shared.fatal.take() {
                return Err(e);
            }
            shared.last_timestamp_ms.extend(last_at);
            let crash = self.crash_before_write.is_some_and(|n| read >= n);
            shared.finish_batch(&self.consumer, &produced_at, crash)?;
            if crash {
                self.kill.store(true, Ordering::SeqCst);
                return Ok(());
            }
            if last_gauges.elapsed() >= Duration::from_secs(1) {
                for state in shared.partitions.values() {
                    shared.health.observe(
                        state.partition,
                        state.next_offset().unwrap_or(0),
                        shared.last_timestamp_ms.get(&state.partition).copied(),
                    );
                    let (size, pending) = state.disk_usage();
                    shared.health.observe_store(state.partition, size, pending);
                }
                last_gauges = Instant::now();
            }
        }
    }
}
