//! `neruba aggregator`: a member of the aggregator consumer group. Its aggregation flags
//! ([`AggregatorArgs`]) are shared with `dev`.

use super::{load_catalog, millis, parse_key_value};
use anyhow::{Result, bail};
use clap::Args;
use neruba_schemas::{LiveCatalog, topics};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub(crate) struct AggregatorCommandArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "NERUBA_BROKERS")]
    pub(crate) brokers: String,
    /// Catalog file (`.toml`, `.yaml` or `.yml`).
    #[arg(long, env = "NERUBA_CATALOG")]
    pub(crate) catalog: PathBuf,
    /// Address `/metrics`, `/healthz` and `/readyz` listen on.
    #[arg(
        long,
        env = "NERUBA_AGGREGATOR_OPS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub(crate) ops_listen: SocketAddr,
    /// Directory holding one RocksDB database per assigned partition.
    #[arg(long, env = "NERUBA_AGGREGATOR_STATE_DIR")]
    pub(crate) state_dir: PathBuf,
    /// Topic validated events are read from (the gateways' `--events-topic`).
    #[arg(long, env = "NERUBA_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub(crate) events_topic: String,
    #[command(flatten)]
    pub(crate) aggregation: AggregatorArgs,
    /// Extra librdkafka setting `key=value`; repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_key_value)]
    pub(crate) kafka_opts: Vec<(String, String)>,
}

/// Aggregator settings shared by `aggregator` and `dev`.
#[derive(Debug, Args)]
pub(crate) struct AggregatorArgs {
    /// Consumer group of the aggregators.
    #[arg(
        long,
        env = "NERUBA_AGGREGATOR_GROUP_ID",
        default_value = "neruba-aggregator"
    )]
    pub(crate) group_id: String,
    /// Static group membership id (e.g. the pod name), so a restart gets its partitions back.
    #[arg(long, env = "NERUBA_AGGREGATOR_INSTANCE_ID")]
    pub(crate) instance_id: Option<String>,
    /// Take these events-topic partitions (`all`, or `0,1,4`) statically instead of through
    /// the consumer group: no rebalancing; every partition must be named by exactly one
    /// aggregator.
    #[arg(long, env = "NERUBA_AGGREGATOR_ASSIGN")]
    pub(crate) assign: Option<topics::Assignment>,
    /// Topic closed windows are produced to.
    #[arg(long, env = "NERUBA_ROLLUPS_TOPIC", default_value = topics::ROLLUPS)]
    pub(crate) rollups_topic: String,
    /// Topic events that cannot be metered are produced to, with their rejection code.
    #[arg(long, env = "NERUBA_DEAD_LETTER_TOPIC", default_value = topics::DEAD_LETTER)]
    pub(crate) dead_letter_topic: String,
    /// A tenant's watermark on a partition = its highest event time there minus this.
    #[arg(long, env = "NERUBA_AGGREGATOR_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) grace: Duration,
    /// A tenant without events on a partition for this long advances its watermark there by
    /// processing time.
    #[arg(long, env = "NERUBA_AGGREGATOR_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) idle_timeout: Duration,
    /// Events whose time is before their receive time minus this are dead-lettered (the
    /// gateways' `--correction-horizon` must not exceed it).
    #[arg(long = "aggregator-correction-horizon", env = "NERUBA_AGGREGATOR_CORRECTION_HORIZON", default_value = "35days", value_parser = humantime::parse_duration)]
    pub(crate) aggregator_correction_horizon: Duration,
    /// How long the aggregator remembers an event id.
    #[arg(long, env = "NERUBA_AGGREGATOR_DEDUP_HORIZON", default_value = "35days", value_parser = humantime::parse_duration)]
    pub(crate) dedup_horizon: Duration,
    /// Most bytes of open windows (kept in memory) one tenant may hold in a partition, each
    /// window counted as four times its key plus 1.5 KiB: an event that would open windows past
    /// it is dead-lettered `too_many_open_windows`. Bounds the memory a client sending ever
    /// new customers or group values can take; which events it refuses is decided by the
    /// partition's log, so a replay under the same bound refuses the same ones.
    #[arg(long, env = "NERUBA_AGGREGATOR_MAX_OPEN_WINDOW_BYTES", default_value_t = neruba_aggregator::state::MAX_OPEN_WINDOW_BYTES)]
    pub(crate) max_open_window_bytes: usize,
    /// Most messages applied before state is written.
    #[arg(long, env = "NERUBA_AGGREGATOR_MAX_BATCH", default_value_t = 5_000)]
    pub(crate) max_batch: usize,
    /// RocksDB block cache shared by all partitions, bytes.
    #[arg(long, env = "NERUBA_AGGREGATOR_BLOCK_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub(crate) block_cache_bytes: usize,
    /// Keep the stores' index and filter blocks in the block cache: memory stays bounded by
    /// it however many ids the dedup set holds (without, about 1.5 MiB per million ids within
    /// the dedup horizon), at the cost of slower dedup lookups: 0.56 × with a 64 MiB cache,
    /// 0.66 × with 256 MiB in `benches/dedup_memory.rs` while the blocks fit the cache; slower
    /// (reads from disk) once they do not. Size `--block-cache-bytes` with it.
    #[arg(long, env = "NERUBA_AGGREGATOR_INDEX_IN_CACHE")]
    pub(crate) index_in_cache: bool,
    /// Consumer threads, each owning a share of the partitions as separate instances would
    /// (with `--instance-id ID`, worker i joins as `ID-wi`). Up to the pod's cores.
    #[arg(long, env = "NERUBA_AGGREGATOR_WORKERS", default_value_t = 1)]
    pub(crate) aggregator_workers: usize,
    /// `/readyz` turns false when an events partition is behind and has not moved for this long.
    #[arg(long, env = "NERUBA_AGGREGATOR_STUCK_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) stuck_after: Duration,
    /// Open partitions whose state was built under a meter the catalog reshapes (its
    /// aggregation, window, billing period, event type, value, group_by or filters, or
    /// `allow_negative` turned off), taking the change as it is: the meter's current periods
    /// then count differently before and after it. Without it the aggregator refuses to start,
    /// as a reload doing so is refused.
    #[arg(long, env = "NERUBA_AGGREGATOR_ACCEPT_METER_CHANGES")]
    pub(crate) accept_meter_changes: bool,
}

impl AggregatorArgs {
    pub(crate) fn config(
        &self,
        brokers: &str,
        events_topic: &str,
        state_dir: &Path,
    ) -> Result<neruba_aggregator::Config> {
        if self.max_batch == 0 {
            bail!("--max-batch must be positive");
        }
        if self.dedup_horizon < self.aggregator_correction_horizon {
            bail!(
                "--dedup-horizon must be at least the correction horizon, or a late repeat would count twice"
            );
        }
        let mut config = neruba_aggregator::Config::new(brokers, state_dir);
        config.stage.group_id = self.group_id.clone();
        config.stage.instance_id = self.instance_id.clone();
        config.stage.assignment = self.assign.clone();
        config.stage.input_topic = events_topic.to_owned();
        config.rollups_topic = self.rollups_topic.clone();
        config.stage.dead_letter_topic = self.dead_letter_topic.clone();
        config.timing = neruba_aggregator::state::Timing {
            grace_ms: millis(self.grace)?,
            correction_horizon_ms: millis(self.aggregator_correction_horizon)?,
            dedup_horizon_ms: millis(self.dedup_horizon)?,
            max_open_window_bytes: self.max_open_window_bytes,
        };
        config.idle_timeout = self.idle_timeout;
        config.stage.max_batch = self.max_batch;
        config.stage.block_cache_bytes = self.block_cache_bytes;
        config.stage.index_in_cache = self.index_in_cache;
        config.stage.stuck_after = self.stuck_after;
        config.accept_meter_changes = self.accept_meter_changes;
        if self.aggregator_workers == 0 {
            bail!("--aggregator-workers must be at least 1");
        }
        config.stage.workers = self.aggregator_workers;
        Ok(config)
    }
}

/// Runs an aggregator until `shutdown` (or SIGTERM) stops it.
pub(crate) async fn run(args: AggregatorCommandArgs, shutdown: CancellationToken) -> Result<()> {
    let catalog = LiveCatalog::new(load_catalog(&args.catalog)?);
    let mut config = args
        .aggregation
        .config(&args.brokers, &args.events_topic, &args.state_dir)?;
    config.stage.kafka_options = args.kafka_opts.clone();
    super::stage::run(
        "aggregator",
        &shutdown,
        args.ops_listen,
        Some((args.catalog.clone(), catalog.clone())),
        move |registry, shutdown| {
            let running = neruba_aggregator::start(config, catalog, registry, shutdown)?;
            Ok((running.health(), async move { Ok(running.wait().await?) }))
        },
    )
    .await?;
    Ok(())
}
