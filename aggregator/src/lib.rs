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
//!
//! Where things happen: [`state`] is the domain (the door: decode, too-old rule, dedup,
//! metering; windows folded and closed; per-tenant watermarks), `stage` plugs it into the
//! shared stage runtime ([`neruba_stage`]), which polls, delivers, writes and commits.

pub mod keys;
pub mod meters;
pub mod metrics;
mod stage;
pub mod state;

use neruba_schemas::LiveCatalog;
pub use neruba_stage::{CrashPoint, Error, Result, Running};
pub use stage::{is_tick, tick_message};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Aggregator settings: the stage runtime's, and the aggregator's own.
#[derive(Debug, Clone)]
pub struct Config {
    /// Brokers, group, the events topic (input), state directory, batch size, workers.
    pub stage: neruba_stage::Config,
    pub rollups_topic: String,
    pub timing: state::Timing,
    /// A tenant with no event for this long advances its watermark by processing time.
    pub idle_timeout: Duration,
    /// Open a partition whose state was built under meters the catalog reshapes, taking the
    /// change as it is ([`meters`]), instead of refusing to.
    pub accept_meter_changes: bool,
}

impl Config {
    /// Defaults from the SPEC for everything but where the brokers and the state are.
    pub fn new(brokers: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        let input = neruba_schemas::topics::EVENTS;
        Self {
            stage: neruba_stage::Config::new(brokers, "neruba-aggregator", input, state_dir)
                .sized(5_000, 64 * 1024 * 1024),
            rollups_topic: neruba_schemas::topics::ROLLUPS.to_owned(),
            timing: state::Timing {
                grace_ms: 10_000,
                correction_horizon_ms: 35 * 86_400_000,
                dedup_horizon_ms: 35 * 86_400_000,
                max_open_window_bytes: state::MAX_OPEN_WINDOW_BYTES,
            },
            idle_timeout: Duration::from_secs(30),
            accept_meter_changes: false,
        }
    }
}

/// Starts consuming; returns at once. Blocking (it waits for broker metadata).
pub fn start(
    config: Config,
    catalog: impl Into<LiveCatalog>,
    registry: &prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<Running> {
    let metrics = metrics::Metrics::register(registry)?;
    let catalog = catalog.into();
    neruba_stage::start(config.stage.clone(), registry, shutdown, |_slice| {
        Ok(stage::Aggregator::new(
            &config,
            catalog.clone(),
            metrics.clone(),
        ))
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
