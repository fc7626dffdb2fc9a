//! The aggregator: a Kafka consumer group that folds events into windowed rollups.
//!
//! Invariants:
//! - per assigned partition, the dedup set, the aggregates and the next offset live in one
//!   RocksDB database and change in one atomic write (see [`state`]); on assignment the consumer
//!   seeks to the offset stored there, not to the group's committed offset (which is committed
//!   too, for lag monitoring only);
//! - a batch's rollups and dead letters are acknowledged by the broker before the batch is
//!   written, so a crash can repeat an emission but never lose one;
//! - state is per partition, so a partition can move to another instance with its directory
//!   (or be rebuilt by replaying the events topic, which yields the same rollups).

pub mod consumer;
pub mod keys;
pub mod metrics;
pub mod state;

use neruba_kafka::health::ConsumerHealth;
use neruba_schemas::LiveCatalog;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What stops the aggregator. Bad events never do: they are dead-lettered (see [`state`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker failed in a way retries inside librdkafka did not cover.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// RocksDB failed: the disk is full or broken. Restarting replays from the stored offsets.
    #[error("state store: {0}")]
    Storage(#[from] rocksdb::Error),
    /// A stored record could not be read back.
    #[error("state store: corrupt {0}")]
    Corrupt(String),
    /// A sum left the exact decimal range; an operator must look at the meter.
    #[error("overflow: {0}")]
    Overflow(String),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("aggregator task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Result with the aggregator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Aggregator settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub brokers: String,
    pub group_id: String,
    /// Static group membership (`group.instance.id`), so a restarted pod gets its partitions back.
    pub instance_id: Option<String>,
    /// Static partition assignment instead of the consumer group's (see
    /// [`neruba_schemas::topics::Assignment`]).
    pub assignment: Option<neruba_schemas::topics::Assignment>,
    pub events_topic: String,
    pub rollups_topic: String,
    pub dead_letter_topic: String,
    /// One RocksDB directory per assigned partition is created under this.
    pub state_dir: PathBuf,
    pub timing: state::Timing,
    /// A partition with no message for this long advances its watermark by processing time.
    pub idle_timeout: Duration,
    /// Most messages applied before a batch is written.
    pub max_batch: usize,
    /// Shared RocksDB block cache, bytes.
    pub block_cache_bytes: usize,
    pub kafka_options: Vec<(String, String)>,
    /// `/readyz` turns false when a partition is behind and its position has not moved for
    /// this long.
    pub stuck_after: Duration,
    /// Consumer threads in this process, each owning its own partitions (as separate
    /// instances would): use the cores of a pod.
    pub workers: usize,
    /// Fault injection for crash tests: stop abruptly, as `kill -9` would, at this point.
    pub crash: Option<CrashPoint>,
}

/// Where an injected crash stops the aggregator (tests only; never set in production).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Right after applying this many messages, mid-batch: nothing of the batch is delivered
    /// or written.
    AfterMessages(u64),
    /// After the batch that reaches this many messages delivered its rollups, before its state
    /// is written: the restart must re-emit identical rollups, not different ones.
    BeforeWrite(u64),
}

impl Config {
    /// Defaults from the SPEC for everything but where the brokers and the state are.
    pub fn new(brokers: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: "neruba-aggregator".to_owned(),
            instance_id: None,
            assignment: None,
            events_topic: neruba_schemas::topics::EVENTS.to_owned(),
            rollups_topic: neruba_schemas::topics::ROLLUPS.to_owned(),
            dead_letter_topic: neruba_schemas::topics::DEAD_LETTER.to_owned(),
            state_dir: state_dir.into(),
            timing: state::Timing {
                grace_ms: 10_000,
                correction_horizon_ms: 35 * 86_400_000,
                dedup_horizon_ms: 35 * 86_400_000,
            },
            idle_timeout: Duration::from_secs(30),
            max_batch: 5_000,
            block_cache_bytes: 64 * 1024 * 1024,
            kafka_options: Vec::new(),
            stuck_after: Duration::from_secs(60),
            workers: 1,
            crash: None,
        }
    }
}

/// A started aggregator.
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

/// Starts consuming; returns at once.
pub fn start(
    config: Config,
    catalog: impl Into<LiveCatalog>,
    registry: &prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<Running> {
    std::fs::create_dir_all(&config.state_dir).map_err(|source| Error::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let metrics = metrics::Metrics::register(registry)?;
    let health = ConsumerHealth::new(
        "aggregator",
        &config.events_topic,
        config.stuck_after,
        registry,
    )?;
    health.spawn_broker_probe(&config.brokers, &config.kafka_options, shutdown.clone())?;
    let kill = Arc::new(AtomicBool::new(false));
    let catalog = catalog.into();
    let count = config.workers.max(1);
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let mut worker_config = config.clone();
        if count > 1 {
            worker_config.instance_id = config
                .instance_id
                .as_ref()
                .map(|id| format!("{id}-w{index}"));
            worker_config.block_cache_bytes = config.block_cache_bytes / count;
        }
        let worker = consumer::Worker::new(
            worker_config,
            catalog.clone(),
            metrics.clone(),
            health.clone(),
            shutdown.clone(),
            kill.clone(),
            consumer::WorkerSlice { index, count },
        )?;
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

/// Starts and waits.
pub async fn run(
    config: Config,
    catalog: impl Into<LiveCatalog>,
    registry: &prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<()> {
    start(config, catalog, registry, shutdown)?.wait().await
}
