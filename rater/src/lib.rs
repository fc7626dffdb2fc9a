//! The rater: turns closed windows (rollups) into priced line items on the ledger topic.
//!
//! Invariants:
//! - per assigned rollups partition, the amount already emitted for each billing period, the
//!   latest revision rated for each window and the next offset live in one RocksDB database and
//!   change in one atomic write ([`state`]); on assignment the consumer seeks to the offset
//!   stored there (the shared stage runtime, [`neruba_stage`], does the consuming);
//! - a batch's line items are acknowledged by the broker before the batch is written, so a crash
//!   can repeat an item (identical id and content) but never lose one;
//! - rating ([`rate`]) is a pure function of the rollup, the catalog and the stored records, and
//!   pricing ([`price`]) a pure function of a plan and a quantity: replaying gives identical items.

pub mod metrics;
pub mod price;
pub mod quote;
pub mod rate;
mod stage;
pub mod state;

use neruba_schemas::LiveCatalog;
pub use neruba_stage::{CrashPoint, Error, Result, Running};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Rater settings: the stage runtime's, and the rater's own.
#[derive(Debug, Clone)]
pub struct Config {
    /// Brokers, group, the rollups topic (input), state directory, batch size, workers.
    pub stage: neruba_stage::Config,
    pub ledger_topic: String,
    /// How long window and period records are kept (compaction drops older ones).
    pub retention: state::Retention,
}

impl Config {
    /// Defaults for everything but where the brokers and the state are.
    pub fn new(brokers: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        let input = neruba_schemas::topics::ROLLUPS;
        Self {
            stage: neruba_stage::Config::new(brokers, "neruba-rater", input, state_dir)
                .sized(2_000, 32 * 1024 * 1024),
            ledger_topic: neruba_schemas::topics::LEDGER.to_owned(),
            retention: state::Retention::default(),
        }
    }
}

/// Starts consuming rollups; returns at once. Blocking (it waits for broker metadata).
pub fn start(
    config: Config,
    catalog: impl Into<LiveCatalog>,
    registry: &prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<Running> {
    let metrics = metrics::Metrics::register(registry)?;
    let catalog = catalog.into();
    neruba_stage::start(config.stage.clone(), registry, shutdown, |_slice| {
        Ok(stage::Rater {
            catalog: catalog.clone(),
            metrics: metrics.clone(),
            retention: config.retention,
            ledger_topic: config.ledger_topic.clone(),
            produced_at: Vec::new(),
        })
    })
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
    use rdkafka::producer::{FutureRecord, Producer};
    let producer = neruba_kafka::clients::request_producer(brokers, "neruba-rerun", kafka_options)?;
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
