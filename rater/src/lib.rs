//! The rater: turns closed windows (rollups) into priced line items on the ledger topic.
//!
//! Invariants:
//! - per assigned rollups partition, the amount already emitted for each billing period, the
//!   latest revision rated for each window and the next offset live in one RocksDB database and
//!   change in one atomic write ([`state`]); on assignment the consumer seeks to the offset
//!   stored there;
//! - a batch's line items are acknowledged by the broker before the batch is written, so a crash
//!   can repeat an item (identical id and content) but never lose one;
//! - rating ([`rate`]) is a pure function of the rollup, the catalog and the stored records, and
//!   pricing ([`price`]) a pure function of a plan and a quantity: replaying gives identical items.

pub mod consumer;
pub mod metrics;
pub mod price;
pub mod rate;
pub mod state;

use neruba_kafka::health::ConsumerHealth;
use neruba_schemas::LiveCatalog;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What stops the rater. Rollups it cannot price never do: they are dead-lettered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// RocksDB failed. Restarting replays from the stored offsets.
    #[error("state store: {0}")]
    Storage(#[from] rocksdb::Error),
    #[error("state store: corrupt {0}")]
    Corrupt(String),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rater task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Result with the rater's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Rater settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub brokers: String,
    pub group_id: String,
    /// Static group membership (`group.instance.id`), so a restarted rater takes its
    /// partitions back at once instead of waiting for the broker to expire its old session.
    pub instance_id: Option<String>,
    /// Static partition assignment instead of the consumer group's (see
    /// [`neruba_schemas::topics::Assignment`]).
    pub assignment: Option<neruba_schemas::topics::Assignment>,
    pub rollups_topic: String,
    pub ledger_topic: String,
    pub dead_letter_topic: String,
    /// One RocksDB directory per assigned rollups partition is created under this.
    pub state_dir: PathBuf,
    /// Most rollups rated before a batch is delivered and written.
    pub max_batch: usize,
    /// Shared RocksDB block cache, bytes.
    pub block_cache_bytes: usize,
    pub kafka_options: Vec<(String, String)>,
    /// `/readyz` turns false when a partition is behind and its position has not moved for
    /// this long.
    pub stuck_after: Duration,
    /// How long window and period records are kept (compaction drops older ones).
    pub retention: state::Retention,
    /// Fault injection for crash tests: once this many rollups were read, deliver the batch's
    /// items and stop without writing the state, as `kill -9` between the two would.
    pub crash_before_write: Option<u64>,
}

impl Config {
    /// Defaults for everything but where the brokers and the state are.
    pub fn new(brokers: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: "neruba-rater".to_owned(),
            instance_id: None,
            assignment: None,
            rollups_topic: neruba_schemas::topics::ROLLUPS.to_owned(),
            ledger_topic: neruba_schemas::topics::LEDGER.to_owned(),
            dead_letter_topic: neruba_schemas::topics::DEAD_LETTER.to_owned(),
            state_dir: state_dir.into(),
            max_batch: 2_000,
            block_cache_bytes: 32 * 1024 * 1024,
            kafka_options: Vec::new(),
            stuck_after: Duration::from_secs(60),
            retention: state::Retention::default(),
            crash_before_write: None,
        }
    }
}

/// A started rater.
#[derive(Debug)]
pub struct Running {
    task: JoinHandle<Result<()>>,
    kill: Arc<AtomicBool>,
    health: Arc<ConsumerHealth>,
}

impl Running {
    /// Lag and readiness, for `/readyz`.
    pub fn health(&self) -> Arc<ConsumerHealth> {
        self.health.clone()
    }

    /// Waits until the rater stopped.
    pub async fn wait(self) -> Result<()> {
        self.task.await?
    }

    /// Stops at once without writing the pending batch, as a crash would (for tests).
    pub async fn kill(self) -> Result<()> {
        self.kill.store(true, Ordering::SeqCst);
        match self.task.await? {
            Ok(()) | Err(Error::Kafka(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Starts consuming rollups; returns at once.
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
    let health = ConsumerHealth::new("rater", &config.rollups_topic, config.stuck_after, registry)?;
    health.spawn_broker_probe(&config.brokers, &config.kafka_options, shutdown.clone())?;
    let kill = Arc::new(AtomicBool::new(false));
    let worker = consumer::Worker::new(
        config,
        catalog.into(),
        metrics,
        health.clone(),
        shutdown,
        kill.clone(),
    )?;
    let task = tokio::task::spawn_blocking(move || worker.run());
    Ok(Running { task, kill, health })
}

/// Sends a rerun request for `tenant` over `[from_ms, to_ms)` to every partition of the
/// rollups topic, and waits for the broker's acknowledgements. Each rater re-prices the
/// periods it owns when it reads the request (see [`state::PartitionState::apply_rerun`]).
pub async fn request_rerun(
    brokers: &str,
    rollups_topic: &str,
    kafka_options: &[(String, String)],
    request: &neruba_schemas::ledger::Rerun,
) -> Result<i32> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
    let mut client = rdkafka::ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("client.id", "neruba-rerun")
        .set("acks", "all")
        .set("enable.idempotence", "true");
    neruba_kafka::apply_producer_options(&mut client, kafka_options)?;
    let producer: FutureProducer = client.create()?;
    let metadata = producer
        .client()
        .fetch_metadata(Some(rollups_topic), std::time::Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let key = request.key();
    let payload = request.encode();
    for partition in &partitions {
        let headers = OwnedHeaders::new().insert(Header {
            key: neruba_schemas::topics::RERUN_HEADER,
            value: Some(key.as_str()),
        });
        producer
            .send(
                FutureRecord::to(rollups_topic)
                    .key(key.as_bytes())
                    .payload(payload.as_slice())
                    .partition(*partition)
                    .headers(headers),
                std::time::Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| Error::Kafka(e))?;
    }
    Ok(i32::try_from(partitions.len()).unwrap_or(i32::MAX))
}
