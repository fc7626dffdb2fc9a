//! `neruba dev`: the whole pipeline against an in-process Kafka broker, with the flags of
//! every component it runs.

use super::aggregator::AggregatorArgs;
use super::api::{ApiArgs, ApiTopics};
use super::balances::BalancesArgs;
use super::gateway::IngestArgs;
use super::rater::RaterArgs;
use super::{load_catalog, show, shutdown_on_signal};
use anyhow::{Context, Result, bail};
use clap::Args;
use neruba::embedded::EmbeddedKafka;
use neruba::sample;
use neruba_ingest_gateway as gateway;
use neruba_schemas::LiveCatalog;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Address the gateway listens on.
    #[arg(long, env = "NERUBA_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,
    /// Catalog file; the built-in sample catalog when absent.
    #[arg(long, env = "NERUBA_CATALOG")]
    pub(crate) catalog: Option<PathBuf>,
    /// Partitions of each topic on the embedded broker.
    #[arg(long, env = "NERUBA_PARTITIONS", default_value_t = 4)]
    pub(crate) partitions: i32,
    /// State directory (`aggregator/`, `rater/`, `balances/` and `api/` beneath it); a temporary one,
    /// removed at exit, when absent.
    #[arg(long, env = "NERUBA_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) ingest: IngestArgs,
    #[command(flatten)]
    pub(crate) aggregation: AggregatorArgs,
    #[command(flatten)]
    pub(crate) rating: RaterArgs,
    #[command(flatten)]
    pub(crate) balancing: BalancesArgs,
    #[command(flatten)]
    pub(crate) reads: ApiArgs,
}

impl DevArgs {
    /// Refuses combinations of the components' flags that cannot work together.
    pub(crate) fn check(&self) -> Result<()> {
        if self.partitions < 1 {
            bail!("--partitions must be at least 1");
        }
        // With the receive-time rule both apply, an event the gateway accepts is counted only if
        // the aggregator's horizon reaches at least as far back.
        if self.ingest.correction_horizon > self.aggregation.aggregator_correction_horizon {
            bail!(
                "--correction-horizon ({}) exceeds --aggregator-correction-horizon ({}): the gateway \
                 would accept events the aggregator dead-letters as too old",
                show(self.ingest.correction_horizon),
                show(self.aggregation.aggregator_correction_horizon)
            );
        }
        if self.balancing.finalize_after > self.aggregation.aggregator_correction_horizon {
            bail!(
                "--finalize-after ({}) exceeds --aggregator-correction-horizon ({}): statements \
                 must be final by the time no correction can come any more",
                show(self.balancing.finalize_after),
                show(self.aggregation.aggregator_correction_horizon)
            );
        }
        Ok(())
    }
}

/// Runs the pipeline on an embedded broker until `shutdown` (or SIGTERM) stops it.
pub(crate) async fn run(args: DevArgs, shutdown: &CancellationToken) -> Result<()> {
    args.check()?;
    let catalog = match &args.catalog {
        Some(path) => load_catalog(path)?,
        None => sample::catalog()?,
    };
    // The address first: with the port taken, exit now, before a broker and stages exist
    // that would have to be stopped.
    let listener = gateway::bind(args.listen).await?;
    let mut topics = vec![
        (args.ingest.events_topic.as_str(), args.partitions),
        (args.aggregation.rollups_topic.as_str(), args.partitions),
        (args.aggregation.dead_letter_topic.as_str(), args.partitions),
        (args.rating.ledger_topic.as_str(), args.partitions),
        (
            args.balancing.balance_entries_topic.as_str(),
            args.partitions,
        ),
    ];
    if let Some(raw) = &args.ingest.raw_topic {
        topics.push((raw.as_str(), args.partitions));
    }
    let kafka = EmbeddedKafka::start(&topics).context("start the embedded Kafka broker")?;
    // One live catalog for the three stages, so a reload reaches them together.
    let catalog = LiveCatalog::new(catalog);
    let temp_state;
    let state_dir = match &args.state_dir {
        Some(dir) => dir.clone(),
        None => {
            temp_state = tempfile::tempdir()?;
            temp_state.path().to_path_buf()
        }
    };
    let shutdown = shutdown_on_signal(shutdown);
    let gateway_metrics = prometheus::Registry::new();
    if let Some(path) = &args.catalog {
        neruba::ops::reload_catalog_on_sighup(
            path.clone(),
            catalog.clone(),
            &gateway_metrics,
            shutdown.clone(),
        )?;
    }
    let aggregator_metrics = prometheus::Registry::new();
    let aggregator_config = args.aggregation.config(
        kafka.bootstrap_servers(),
        &args.ingest.events_topic,
        &state_dir.join("aggregator"),
    )?;
    let aggregator = neruba_aggregator::start(
        aggregator_config,
        catalog.clone(),
        &aggregator_metrics,
        shutdown.clone(),
    )?;
    let rater_metrics = prometheus::Registry::new();
    let rater = neruba_rater::start(
        args.rating.config(
            kafka.bootstrap_servers(),
            &args.aggregation.rollups_topic,
            &args.aggregation.dead_letter_topic,
            &state_dir.join("rater"),
            args.aggregation.aggregator_correction_horizon,
        )?,
        catalog.clone(),
        &rater_metrics,
        shutdown.clone(),
    )?;
    let balances_metrics = prometheus::Registry::new();
    let mut balances_config = args.balancing.config(
        kafka.bootstrap_servers(),
        &args.rating.ledger_topic,
        &args.aggregation.dead_letter_topic,
        &state_dir.join("balances"),
        args.aggregation.aggregator_correction_horizon,
    )?;
    // The catalog as started: a reload that lengthens a window is covered once priced.
    balances_config.window_floor_ms = catalog.current().longest_window_ms();
    let balances = neruba_balances::start(balances_config, &balances_metrics, shutdown.clone())?;
    let api_metrics = prometheus::Registry::new();
    // The api waits on this process's aggregator for events positions.
    let mut reads_config = args.reads.config(
        kafka.bootstrap_servers(),
        ApiTopics {
            ledger: &args.rating.ledger_topic,
            rollups: &args.aggregation.rollups_topic,
            events: &args.ingest.events_topic,
        },
        &args.aggregation.group_id,
        &state_dir.join("api"),
    );
    if reads_config.console_gateway.is_none() {
        // The console's credit forms go to this process's own gateway.
        let mut gateway_addr = listener.local_addr()?;
        if gateway_addr.ip().is_unspecified() {
            gateway_addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        reads_config.console_gateway = Some(format!("http://{gateway_addr}"));
    }
    let reads = neruba_api::start(
        reads_config,
        catalog.clone(),
        &api_metrics,
        shutdown.clone(),
    )
    .await?;
    let mut config = args.ingest.config(
        args.listen,
        kafka.bootstrap_servers(),
        &args.aggregation.dead_letter_topic,
    )?;
    config.ledger_topic = args.rating.ledger_topic.clone();
    config.extra_metrics = vec![
        aggregator_metrics,
        rater_metrics,
        balances_metrics,
        api_metrics,
        reads.usage_registry(),
    ];
    let running =
        gateway::start_on(listener, config, catalog, gateway_metrics, shutdown.clone()).await?;
    println!("Neruba dev pipeline is running.");
    println!("  HTTP API:   http://{}", running.local_addr);
    println!(
        "  Reads API:  http://{}  (GET /v1/customers/..., scope read)",
        reads.local_addr
    );
    println!(
        "  Console:    http://{}/console  (a read key; a credits key to grant)",
        reads.local_addr
    );
    println!(
        "  Kafka:      {}  (bootstrap.servers)",
        kafka.bootstrap_servers()
    );
    println!(
        "  Topics:     {}, {}, {}, {}, {} ({} partitions each)",
        args.ingest.events_topic,
        args.aggregation.rollups_topic,
        args.rating.ledger_topic,
        args.balancing.balance_entries_topic,
        args.aggregation.dead_letter_topic,
        args.partitions
    );
    println!(
        "  Ledger:     neruba ledger tail --brokers {}",
        kafka.bootstrap_servers()
    );
    println!(
        "  Balances:   neruba credits show --brokers {} --tenant <t> --customer <c>",
        kafka.bootstrap_servers()
    );
    println!("  State:      {}", state_dir.display());
    if args.catalog.is_none() {
        println!("  Catalog:    {}", sample::CATALOG_ORIGIN);
        for (tenant, scope, key) in sample::DEV_KEYS {
            println!("  Dev key:    {key}  (tenant {tenant}, scope {scope})");
        }
    }
    println!("Press Ctrl-C to stop.");
    // One process, one fate: if the aggregator or the rater stops on an error, the whole
    // pipeline stops rather than accept events nobody aggregates or prices.
    let stop_all = shutdown.clone();
    let aggregated = tokio::spawn(async move {
        let result = aggregator.wait().await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "Aggregator failed; stopping the dev pipeline.");
        }
        stop_all.cancel();
        result
    });
    let stop_all = shutdown.clone();
    let rated = tokio::spawn(async move {
        let result = rater.wait().await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "Rater failed; stopping the dev pipeline.");
        }
        stop_all.cancel();
        result
    });
    let stop_all = shutdown.clone();
    let balanced = tokio::spawn(async move {
        let result = balances.wait().await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "Balances stage failed; stopping the dev pipeline.");
        }
        stop_all.cancel();
        result
    });
    running.wait().await?;
    reads.wait().await?;
    aggregated.await??;
    rated.await??;
    balanced.await??;
    drop(kafka);
    Ok(())
}
