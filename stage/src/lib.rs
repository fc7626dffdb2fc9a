//! The runtime every stateful stage (the aggregator, the rater, the balances stage, the api's
//! read models) runs on, so that a stage is
//! only its domain logic: what one message does to one partition's state ([`Stage`]).
//!
//! The runtime owns the rest:
//! - the consumer (`worker`): static or group assignment, each partition resumed at the
//!   offset stored with its state, batches of up to `max_batch` messages, one stage-chosen
//!   context per batch (the catalog version), shutdown and kill;
//! - the order of a batch's effects: outputs enqueued in order, by a thread of the worker's
//!   own ([`Sender`], `outbox`), every [`Config::hand_every`] messages while the worker
//!   applies the next ones (a batch's last outputs, and its idle work's, at its end);
//!   at the batch's end, delivered until the broker acknowledged every one (`acks=all`), then
//!   the state written with the next offset in one atomic write ([`Store::write`]), then the
//!   group offset committed for lag graphs only. A crash before the write (mid-batch too, once
//!   some outputs were sent) replays the batch, which re-emits the same outputs, never fewer;
//! - partition stores ([`store`]): directory, RocksDB tuning, owner lock, offset encoding,
//!   compaction expiry, disk usage;
//! - dead letters: a stage hands a [`DeadLetter`] and the runtime writes it with the same
//!   headers for every stage;
//! - lag, store size and readiness ([`ConsumerHealth`]), the assigned-partitions gauge and the
//!   time of each batch's phases (`metrics`), input offsets skipped (`gaps`), and crash points
//!   for tests ([`CrashPoint`]).

pub mod error;
mod gaps;
pub mod keys;
mod metrics;
mod outbox;
mod rebalance;
pub mod server;
pub mod store;
mod worker;

pub use error::{Error, Result};
pub use gaps::SKIPPED_RECORDS_LOG;
pub use neruba_kafka::health::ConsumerHealth;
pub use store::{ExpiryClock, Store, StoreOptions, partition_dir, stored_offset};
pub use worker::WorkerSlice;

use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use rocksdb::Cache;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A stage's domain logic. The runtime calls it from one worker thread at a time.
pub trait Stage: Send + 'static {
    /// Names the stage's Kafka clients (`neruba-{NAME}`), its health series and its logs.
    const NAME: &'static str;
    /// The gauge of partitions this process owns.
    const ASSIGNED_PARTITIONS_METRIC: &'static str;
    /// librdkafka settings the stage's consumer adds to the runtime's.
    const CONSUMER_TUNING: &'static [(&'static str, &'static str)] = &[];
    /// How long the output producer waits to fill a batch. 0 suits a stage that awaits every
    /// batch's acknowledgements at its end before writing it: its last outputs are not held.
    const LINGER_MS: u32 = 0;
    /// How many messages the runtime polls before applying any of them, so that
    /// [`Stage::read_ahead`] sees them together (reads they will need are cheaper made as
    /// one: RocksDB's batched lookups). 1, the default: each is applied as it is polled.
    /// A worker reads at most this many across its partitions (and no more than its batch
    /// has room for); it stops early when a poll finds nothing or fails. The batch ends as it
    /// does without reading ahead: when a poll after the messages applied finds nothing, after
    /// a failed poll once what was read is applied, or after the message that fills it
    /// ([`Partition::batch_full`]); what was read ahead past that end is applied first in the
    /// next batch.
    const READ_AHEAD: usize = 1;
    /// Whether the stage's input topic is compacted (a record is removed once a later one has
    /// its key): gaps between its offsets are then normal, and the runtime does not count
    /// them as records skipped (`neruba_stage_skipped_offsets_total` has no series for it).
    const INPUT_COMPACTED: bool = false;

    /// One input partition's state; it owns the partition's [`Store`].
    type Partition: Partition;
    /// What a stage emits.
    type Output: AsDeadLetter + Send + 'static;
    /// What one batch reads once (e.g. the catalog version it is applied under).
    type Batch;

    /// How the stage's partition stores are tuned.
    fn store_options(&self) -> StoreOptions;

    /// The topic the stage's outputs go to (dead letters aside); the runtime reads its
    /// partition count once, for [`Sink::keyed`].
    fn output_topic(&self) -> &str;

    /// The state of a partition from its freshly opened store.
    fn open(&mut self, store: Store) -> Result<Self::Partition>;

    /// What the next batch is applied under.
    fn begin_batch(&mut self) -> Self::Batch;

    /// Applies one message of the partition. Bad input becomes a dead letter; only failures
    /// of what the stage runs on are errors. Must record the offset ([`Store::consumed`]),
    /// unless the message stopped partway ([`Partition::apply_again`]).
    fn apply(
        &mut self,
        batch: &Self::Batch,
        partition: &mut Self::Partition,
        message: &BorrowedMessage<'_>,
    ) -> Result<()>;

    /// Shows the stage the next messages of the partition, in order, before any of them is
    /// applied ([`Stage::READ_AHEAD`]): it may read what applying them will need. Whatever
    /// it keeps must not change what applying them does, and is stale once the partition's
    /// store is written ([`Partition::commit`]).
    fn read_ahead(
        &mut self,
        _batch: &Self::Batch,
        _partition: &mut Self::Partition,
        _messages: &[&BorrowedMessage<'_>],
    ) -> Result<()> {
        Ok(())
    }

    /// Called for every owned partition after each poll, before delivery (idle work such as
    /// watermark ticks).
    fn after_poll(&mut self, _partition: &mut Self::Partition, _now_ms: i64) {}

    /// Called just before the partition's outputs are taken ([`Stage::take_outputs`]) and
    /// handed to the sending thread: what the stage writes here ([`Store::put_now`]) is
    /// durable before any of them can reach the broker. By default nothing.
    fn before_handing(&mut self, _partition: &mut Self::Partition) -> Result<()> {
        Ok(())
    }

    /// The partition's outputs since the last call, in order, to be delivered before
    /// [`Partition::commit`]; the stage publishes their counts here. Called every
    /// [`Config::hand_every`] messages applied, and at the batch's end.
    fn take_outputs(&mut self, partition: &mut Self::Partition) -> Vec<Self::Output>;

    /// What enqueues the stage's outputs, on the worker's sending thread.
    type Sender: Sender<Self::Output>;

    /// The stage's [`Stage::Sender`], made once per worker.
    fn sender(&self) -> Self::Sender;

    /// Called once every output of a batch was acknowledged.
    fn delivered(&mut self) {}

    /// Publishes per-partition gauges, about once a second.
    fn gauges(&self, _partition: &Self::Partition, _now_ms: i64) {}

    /// Publishes the worker's own gauges (what its partitions share), about once a second.
    fn worker_gauges(&self, _now_ms: i64) {}
}

/// Enqueues a stage's outputs. It runs on a thread of the worker's own, which takes a
/// batch's outputs as they are made (every [`Config::hand_every`] messages applied) while the
/// worker applies the next ones, and on the worker's thread when a batch is sent again.
pub trait Sender<O>: Send + Sync + 'static {
    /// Enqueues one output that is not a dead letter (the runtime writes those).
    fn send(&self, sink: &Sink<'_>, output: &O) -> Result<DeliveryFuture, KafkaError>;
}

/// How many messages a worker applies between handing the outputs made so far to its sending
/// thread (and at a batch's end), by default ([`Config::hand_every`]).
pub const HAND_EVERY: usize = 512;

/// What the runtime needs of a partition's state.
pub trait Partition: Send + 'static {
    /// The partition's store.
    fn store(&self) -> &Store;

    /// Writes what the batch changed, with the next offset, in one [`Store::write`].
    fn commit(&mut self) -> Result<()>;

    /// Whether the batch holds as much of this partition's state in memory as it should
    /// before its write: the runtime then ends the batch after the message just applied,
    /// whatever its count. By default never (`max_batch` bounds it).
    fn batch_full(&self) -> bool {
        false
    }

    /// Whether the message just applied stopped partway, its part so far to be written first
    /// (a clock tick due for more customers than a batch may hold): the runtime then ends the
    /// batch there, delivering and writing it with the partition's next offset still that
    /// message's, and applies the same message again under the same batch context, in a new
    /// batch, until this is false. Nothing else is applied in between, so the outcome is the
    /// same however the message was split, and a crash in between applies it again from where
    /// its last part was written. By default never.
    fn apply_again(&self) -> bool {
        false
    }
}

/// One message of the input topic, as a stage's domain logic sees it.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

impl<'a> Input<'a> {
    /// The offset, key and payload of a consumed message (an absent payload reads as empty).
    pub fn of(message: &'a BorrowedMessage<'_>) -> Self {
        use rdkafka::Message;
        Self {
            offset: message.offset(),
            key: message.key(),
            payload: message.payload().unwrap_or_default(),
        }
    }
}

/// Where a stage's outputs go: the worker's producer, and the output topic with its partition
/// count.
#[derive(Clone, Copy)]
pub struct Sink<'a> {
    producer: &'a FutureProducer,
    topic: &'a str,
    partitions: i32,
}

impl std::fmt::Debug for Sink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl Sink<'_> {
    /// Enqueues `payload` under `key` on the output topic, in the partition `partition_key`
    /// maps to ([`neruba_schemas::topics::stable_partition`]): the same whatever client wrote
    /// it, so one series or customer stays in one partition's order.
    pub fn keyed(
        &self,
        key: &[u8],
        payload: &[u8],
        partition_key: &str,
    ) -> Result<DeliveryFuture, KafkaError> {
        let partition = neruba_schemas::topics::stable_partition(partition_key, self.partitions);
        self.producer
            .send_result(
                rdkafka::producer::FutureRecord::to(self.topic)
                    .key(key)
                    .payload(payload)
                    .partition(partition),
            )
            .map_err(|(e, _)| e)
    }

    /// The producer, for a record that goes elsewhere (a tick back to the input topic).
    pub fn producer(&self) -> &FutureProducer {
        self.producer
    }
}

/// An output that is a refused input, for the dead-letter topic.
pub trait AsDeadLetter {
    /// The dead letter, if this output is one.
    fn dead_letter(&self) -> Option<&DeadLetter>;
}

/// A message a stage refused: written to the dead-letter topic with its stable code, message,
/// and the topic and offset it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub code: &'static str,
    pub message: String,
    pub offset: i64,
}

impl DeadLetter {
    /// `input` refused with the stable `code` and a `message` for people.
    pub fn refusing(input: Input<'_>, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            key: input.key.map(<[u8]>::to_vec),
            payload: input.payload.to_vec(),
            code,
            message: message.into(),
            offset: input.offset,
        }
    }
}

/// Where an injected crash stops a stage (tests only; never set in production).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Right after applying this many messages, mid-batch: nothing of the batch is written
    /// (outputs already handed to the sending thread may reach the broker, as they may when a
    /// process crashes mid-batch).
    AfterMessages(u64),
    /// After the batch that reaches this many messages delivered its outputs, before its
    /// state is written: the restart must re-emit identical outputs, not different ones.
    BeforeWrite(u64),
    /// As the batch that reaches this many messages hands its last outputs to the sending
    /// thread, which then enqueues none of them: the batch must not be written.
    WhileSending(u64),
}

/// What every stateful stage is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    pub brokers: String,
    pub group_id: String,
    /// Static group membership (`group.instance.id`), so a restarted pod takes its partitions
    /// back at once instead of waiting for the broker to expire its old session.
    pub instance_id: Option<String>,
    /// Static partition assignment instead of the consumer group's (see
    /// [`neruba_schemas::topics::Assignment`]).
    pub assignment: Option<neruba_schemas::topics::Assignment>,
    /// The topic the stage consumes.
    pub input_topic: String,
    pub dead_letter_topic: String,
    /// One RocksDB directory per assigned input partition is created under this.
    pub state_dir: PathBuf,
    /// Most messages applied before a batch is delivered and written.
    pub max_batch: usize,
    /// Messages applied between handing their outputs to the sending thread ([`HAND_EVERY`];
    /// tests lower it, so that their small batches hand outputs before a crash).
    pub hand_every: usize,
    /// RocksDB block cache of the process, bytes (workers share it out).
    pub block_cache_bytes: usize,
    /// Index and filter blocks of the partition stores in that cache, so the process's memory
    /// stays bounded however many keys its stores hold ([`StoreOptions::index_in_cache`]).
    pub index_in_cache: bool,
    /// librdkafka pass-through settings (SASL, TLS, tuning).
    pub kafka_options: Vec<(String, String)>,
    /// `/readyz` turns false when a partition is behind and its position has not moved for
    /// this long.
    pub stuck_after: Duration,
    /// Consumer threads in this process, each owning its own partitions (as separate
    /// instances would): use the cores of a pod.
    pub workers: usize,
    /// Fault injection for crash tests.
    pub crash: Option<CrashPoint>,
}

impl Config {
    /// A stage's batch size and block cache (bytes), instead of the defaults.
    pub fn sized(mut self, max_batch: usize, block_cache_bytes: usize) -> Self {
        self.max_batch = max_batch;
        self.block_cache_bytes = block_cache_bytes;
        self
    }

    /// Defaults for everything but where the brokers, the input and the state are.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        input_topic: impl Into<String>,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            instance_id: None,
            assignment: None,
            input_topic: input_topic.into(),
            dead_letter_topic: neruba_schemas::topics::DEAD_LETTER.to_owned(),
            state_dir: state_dir.into(),
            max_batch: 5_000,
            hand_every: HAND_EVERY,
            block_cache_bytes: 64 * 1024 * 1024,
            index_in_cache: false,
            kafka_options: Vec::new(),
            stuck_after: Duration::from_secs(60),
            workers: 1,
            crash: None,
        }
    }
}

/// A started stage.
#[derive(Debug)]
pub struct Running {
    tasks: Vec<JoinHandle<Result<()>>>,
    kill: Arc<AtomicBool>,
    health: Arc<ConsumerHealth>,
}

impl Running {
    /// Lag and readiness, for `/readyz`.
    pub fn health(&self) -> Arc<ConsumerHealth> {
        self.health.clone()
    }

    /// Waits until every worker stopped; the first error, if any.
    pub async fn wait(self) -> Result<()> {
        let mut result = Ok(());
        for task in self.tasks {
            let stopped = task.await?;
            if result.is_ok() {
                result = stopped;
            }
        }
        result
    }

    /// Stops at once without writing the pending batch, as a crash would (for tests): the
    /// next start must replay from the stored offsets.
    pub async fn kill(self) -> Result<()> {
        self.kill.store(true, Ordering::SeqCst);
        for task in self.tasks {
            match task.await? {
                Ok(()) | Err(Error::Kafka(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Starts `config.workers` workers, each with the stage `make` builds for its slice of the
/// partitions; returns at once. Blocking (it waits for broker metadata).
pub fn start<S: Stage>(
    config: Config,
    registry: &prometheus::Registry,
    shutdown: CancellationToken,
    mut make: impl FnMut(WorkerSlice) -> Result<S>,
) -> Result<Running> {
    std::fs::create_dir_all(&config.state_dir).map_err(|source| Error::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let health = ConsumerHealth::new(S::NAME, &config.input_topic, config.stuck_after, registry)?;
    health.spawn_broker_probe(&config.brokers, &config.kafka_options, shutdown.clone())?;
    let assigned = metrics::assigned_partitions(S::ASSIGNED_PARTITIONS_METRIC, registry)?;
    let times = metrics::BatchTimes::register(S::NAME, registry)?;
    let skipped = gaps::SkippedOffsets::register(S::NAME, registry)?;
    let kill = Arc::new(AtomicBool::new(false));
    let count = config.workers.max(1);
    // One cache for the process: workers whose partitions are busier use more of it.
    let cache = Cache::new_lru_cache(config.block_cache_bytes);
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let slice = WorkerSlice { index, count };
        let mut worker_config = config.clone();
        if count > 1 {
            worker_config.instance_id = config
                .instance_id
                .as_ref()
                .map(|id| format!("{id}-w{index}"));
        }
        let worker = make(slice).and_then(|stage| {
            worker::Worker::new(
                stage,
                worker::Parts {
                    config: worker_config,
                    slice,
                    cache: cache.clone(),
                    health: health.clone(),
                    assigned: assigned.clone(),
                    times: times.clone(),
                    gaps: gaps::InputGaps::new(skipped.clone(), !S::INPUT_COMPACTED),
                    shutdown: shutdown.clone(),
                    kill: kill.clone(),
                },
            )
        });
        let worker = match worker {
            Ok(worker) => worker,
            Err(e) => {
                // The workers already started stop as a crash would: nothing half-started
                // keeps consuming or holding partitions after `start` failed.
                kill.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        // One process, one fate: a worker that fails stops the others (they write their
        // state), and `wait` reports the failure.
        let stop = shutdown.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            let result = worker.run();
            if result.is_err() {
                stop.cancel();
            }
            result
        }));
    }
    Ok(Running {
        tasks,
        kill,
        health,
    })
}
