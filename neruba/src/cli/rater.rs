//! `neruba rater` (a member of the rater consumer group) and `neruba rater rerun`. Its rating
//! flags ([`RaterArgs`]) are shared with `dev`.

use super::{load_catalog, millis, parse_day, parse_key_value, show};
use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use neruba_schemas::{LiveCatalog, topics};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct RaterCommandArgs {
    #[command(subcommand)]
    pub(crate) action: Option<RaterAction>,
    #[command(flatten)]
    pub(crate) run: RaterRunArgs,
}

#[derive(Debug, Args)]
pub(crate) struct RaterRunArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]` (required to run a rater).
    #[arg(long, env = "NERUBA_BROKERS")]
    pub(crate) brokers: Option<String>,
    /// Catalog file, `.toml`, `.yaml` or `.yml` (required to run a rater).
    #[arg(long, env = "NERUBA_CATALOG")]
    pub(crate) catalog: Option<PathBuf>,
    /// Address `/metrics`, `/healthz` and `/readyz` listen on.
    #[arg(long, env = "NERUBA_RATER_OPS_LISTEN", default_value = "0.0.0.0:9091")]
    pub(crate) ops_listen: SocketAddr,
    /// Directory holding one RocksDB database per assigned rollups partition (required to run
    /// a rater).
    #[arg(long, env = "NERUBA_RATER_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// Topic closed windows are read from.
    #[arg(long, env = "NERUBA_ROLLUPS_TOPIC", default_value = topics::ROLLUPS)]
    pub(crate) rollups_topic: String,
    /// Topic rollups that cannot be priced are produced to, with their refusal code.
    #[arg(long, env = "NERUBA_DEAD_LETTER_TOPIC", default_value = topics::DEAD_LETTER)]
    pub(crate) dead_letter_topic: String,
    /// The pipeline's correction horizon (the aggregators' `--aggregator-correction-horizon`):
    /// the rater's window retention must exceed it.
    #[arg(long, env = "NERUBA_RATER_CORRECTION_HORIZON", default_value = "35days", value_parser = humantime::parse_duration)]
    pub(crate) correction_horizon: Duration,
    #[command(flatten)]
    pub(crate) rating: RaterArgs,
    /// Extra librdkafka setting `key=value`; repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_key_value)]
    pub(crate) kafka_opts: Vec<(String, String)>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RaterAction {
    /// Re-price a tenant's billing periods under the plan versions now in force (restart the
    /// raters with the corrected catalog first); only differences become adjustments.
    Rerun(RerunArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RerunArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "NERUBA_BROKERS")]
    pub(crate) brokers: String,
    /// Tenant whose periods are re-priced.
    #[arg(long, env = "NERUBA_TENANT")]
    pub(crate) tenant: String,
    /// First day (UTC, `YYYY-MM-DD`): periods that end after its start are included.
    #[arg(long, env = "NERUBA_FROM")]
    pub(crate) from: String,
    /// Last day (UTC, `YYYY-MM-DD`, inclusive): periods that start before its end are included.
    #[arg(long, env = "NERUBA_TO")]
    pub(crate) to: String,
    /// Topic the raters read.
    #[arg(long, env = "NERUBA_ROLLUPS_TOPIC", default_value = topics::ROLLUPS)]
    pub(crate) rollups_topic: String,
    /// Extra librdkafka setting `key=value`; repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_key_value)]
    pub(crate) kafka_opts: Vec<(String, String)>,
}

/// Rater settings shared by `rater` and `dev`.
#[derive(Debug, Args)]
pub(crate) struct RaterArgs {
    /// Consumer group of the raters.
    #[arg(long, env = "NERUBA_RATER_GROUP_ID", default_value = "neruba-rater")]
    pub(crate) rater_group_id: String,
    /// Static group membership id of this rater (e.g. the pod name), so a restart gets its
    /// partitions back at once.
    #[arg(long, env = "NERUBA_RATER_INSTANCE_ID")]
    pub(crate) rater_instance_id: Option<String>,
    /// Take these rollups-topic partitions (`all`, or `0,1,4`) statically instead of through
    /// the rater group.
    #[arg(long, env = "NERUBA_RATER_ASSIGN")]
    pub(crate) rater_assign: Option<topics::Assignment>,
    /// Topic line items are produced to.
    #[arg(long, env = "NERUBA_LEDGER_TOPIC", default_value = topics::LEDGER)]
    pub(crate) ledger_topic: String,
    /// `/readyz` turns false when a rollups partition is behind and has not moved for this long.
    #[arg(long, env = "NERUBA_RATER_STUCK_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) rater_stuck_after: Duration,
    /// How long the rater remembers the revision it rated per window. Keep it above the
    /// aggregator's correction horizon, and the events topic's retention below it.
    #[arg(long, env = "NERUBA_RATER_WINDOW_RETENTION", default_value = "37days", value_parser = humantime::parse_duration)]
    pub(crate) rater_window_retention: Duration,
    /// How long the rater remembers what it billed per period (reruns reach back this far).
    #[arg(long, env = "NERUBA_RATER_PERIOD_RETENTION", default_value = "400days", value_parser = humantime::parse_duration)]
    pub(crate) rater_period_retention: Duration,
}

impl RaterArgs {
    /// The rater's config. `correction_horizon` is how late an event may still change a
    /// window: the rater must remember each window's revision at least that long, or a late
    /// revision of a forgotten window would be rated as new.
    pub(crate) fn config(
        &self,
        brokers: &str,
        rollups_topic: &str,
        dead_letter_topic: &str,
        state_dir: &Path,
        correction_horizon: Duration,
    ) -> Result<neruba_rater::Config> {
        if self.rater_window_retention <= correction_horizon {
            bail!(
                "--rater-window-retention ({}) must exceed the correction horizon ({}): a late \
                 revision of a window the rater forgot would be rated as new",
                show(self.rater_window_retention),
                show(correction_horizon)
            );
        }
        if self.rater_period_retention < self.rater_window_retention {
            bail!(
                "--rater-period-retention ({}) cannot be shorter than --rater-window-retention ({})",
                show(self.rater_period_retention),
                show(self.rater_window_retention)
            );
        }
        let mut config = neruba_rater::Config::new(brokers, state_dir);
        config.stage.group_id = self.rater_group_id.clone();
        config.stage.instance_id = self.rater_instance_id.clone();
        config.stage.assignment = self.rater_assign.clone();
        config.stage.input_topic = rollups_topic.to_owned();
        config.ledger_topic = self.ledger_topic.clone();
        config.stage.dead_letter_topic = dead_letter_topic.to_owned();
        config.stage.stuck_after = self.rater_stuck_after;
        config.retention = neruba_rater::state::Retention {
            window_ms: millis(self.rater_window_retention)?,
            period_ms: millis(self.rater_period_retention)?,
        };
        Ok(config)
    }
}

/// Runs a rater, or sends a rerun request.
pub(crate) async fn run(args: RaterCommandArgs, shutdown: CancellationToken) -> Result<()> {
    let args = match args {
        RaterCommandArgs {
            action: Some(RaterAction::Rerun(rerun)),
            ..
        } => return run_rerun(&rerun).await,
        RaterCommandArgs { run, action: None } => run,
    };
    // Required here rather than by clap, which would require them for `rerun` too.
    let (Some(brokers), Some(catalog), Some(state_dir)) =
        (&args.brokers, &args.catalog, &args.state_dir)
    else {
        bail!("`neruba rater` needs --brokers, --catalog and --state-dir");
    };
    let catalog_path = catalog.clone();
    let catalog = LiveCatalog::new(load_catalog(catalog)?);
    let mut config = args.rating.config(
        brokers,
        &args.rollups_topic,
        &args.dead_letter_topic,
        state_dir,
        args.correction_horizon,
    )?;
    config.stage.kafka_options = args.kafka_opts.clone();
    super::stage::run(
        "rater",
        &shutdown,
        args.ops_listen,
        Some((catalog_path, catalog.clone())),
        move |registry, shutdown| {
            let running = neruba_rater::start(config, catalog, registry, shutdown)?;
            Ok((running.health(), async move { Ok(running.wait().await?) }))
        },
    )
    .await?;
    Ok(())
}

async fn run_rerun(args: &RerunArgs) -> Result<()> {
    let day_ms = |date: time::Date| -> i64 { date.midnight().assume_utc().unix_timestamp() * 1000 };
    let from = parse_day(&args.from)?;
    let to = parse_day(&args.to)?;
    if to < from {
        bail!("--to {to} is before --from {from}");
    }
    let request = neruba_schemas::ledger::Rerun {
        v: 1,
        tenant: args.tenant.clone(),
        from_ms: day_ms(from),
        to_ms: day_ms(to) + 86_400_000,
        requested_ms: neruba_schemas::event::now_ms(),
    };
    let partitions = neruba_rater::request_rerun(
        &args.brokers,
        &args.rollups_topic,
        &args.kafka_opts,
        &request,
    )
    .await?;
    println!(
        "Rerun {} sent to {partitions} partitions of {}: tenant {}, periods overlapping {from} to {to} (UTC).",
        request.key(),
        args.rollups_topic,
        args.tenant
    );
    Ok(())
}
