//! `neruba api`: the billing reads, from a local read model of the ledger topic. Its flags
//! ([`ApiArgs`]) are shared with `dev`.

use super::{load_catalog, parse_key_value, shutdown_on_signal};
use anyhow::Result;
use clap::Args;
use neruba::sample;
use neruba_schemas::{LiveCatalog, topics};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub(crate) struct ApiCommandArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "NERUBA_BROKERS")]
    pub(crate) brokers: String,
    /// Catalog file (API keys with the `read` scope); the built-in sample catalog when absent.
    #[arg(long, env = "NERUBA_CATALOG")]
    pub(crate) catalog: Option<PathBuf>,
    /// Address `/metrics`, `/healthz` and `/readyz` listen on.
    #[arg(long, env = "NERUBA_API_OPS_LISTEN", default_value = "0.0.0.0:9094")]
    pub(crate) ops_listen: SocketAddr,
    /// Directory of the read model (one RocksDB database per ledger partition).
    #[arg(long, env = "NERUBA_API_STATE_DIR")]
    pub(crate) state_dir: PathBuf,
    /// Topic line items, grants, voids, rules and ticks are read from.
    #[arg(long, env = "NERUBA_LEDGER_TOPIC", default_value = topics::LEDGER)]
    pub(crate) ledger_topic: String,
    /// Topic closed windows (usage) are read from.
    #[arg(long, env = "NERUBA_ROLLUPS_TOPIC", default_value = topics::ROLLUPS)]
    pub(crate) rollups_topic: String,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// Extra librdkafka setting `key=value`; repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_key_value)]
    pub(crate) kafka_opts: Vec<(String, String)>,
}

/// Api settings shared by `api` and `dev`.
#[derive(Debug, Args)]
pub(crate) struct ApiArgs {
    /// Address the billing reads are served on.
    #[arg(long, env = "NERUBA_API_LISTEN", default_value = "127.0.0.1:8081")]
    pub(crate) api_listen: SocketAddr,
    /// This replica's name (e.g. the pod name): the consumer group id its positions are kept
    /// under, `neruba-api-<name>`. Replicas share nothing.
    #[arg(long, env = "NERUBA_API_REPLICA", default_value = "0")]
    pub(crate) api_replica: String,
    /// Longest a read with `min_position` waits for the read model to apply that record.
    #[arg(long, env = "NERUBA_API_READ_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) api_read_wait: Duration,
    /// Gateway the console's grant and void forms are forwarded to, `http://host:port`;
    /// without it the console (`/console`) only reads. `neruba dev` uses its own gateway.
    #[arg(long, env = "NERUBA_API_CONSOLE_GATEWAY_URL")]
    pub(crate) console_gateway_url: Option<String>,
}

impl ApiArgs {
    pub(crate) fn config(
        &self,
        brokers: &str,
        ledger_topic: &str,
        rollups_topic: &str,
        state_dir: &std::path::Path,
    ) -> neruba_api::Config {
        let mut config =
            neruba_api::Config::new(brokers, state_dir, self.api_listen, &self.api_replica);
        config.stage.input_topic = ledger_topic.to_owned();
        config.rollups_topic = rollups_topic.to_owned();
        config.read_wait = self.api_read_wait;
        config.console_gateway.clone_from(&self.console_gateway_url);
        config
    }
}

/// Runs the api until `shutdown` (or SIGTERM) stops it.
pub(crate) async fn run(args: ApiCommandArgs, shutdown: CancellationToken) -> Result<()> {
    let catalog = match &args.catalog {
        Some(path) => load_catalog(path)?,
        None => sample::catalog()?,
    };
    let listener = neruba::ops::bind(args.ops_listen).await?;
    let shutdown = shutdown_on_signal(&shutdown);
    let registry = prometheus::Registry::new();
    let mut config = args.api.config(
        &args.brokers,
        &args.ledger_topic,
        &args.rollups_topic,
        &args.state_dir,
    );
    config.stage.kafka_options = args.kafka_opts.clone();
    let catalog = LiveCatalog::new(catalog);
    if let Some(path) = &args.catalog {
        neruba::ops::reload_catalog_on_sighup(
            path.clone(),
            catalog.clone(),
            &registry,
            shutdown.clone(),
        )?;
    }
    let running = neruba_api::start(config, catalog, &registry, shutdown.clone()).await?;
    let ops = neruba::ops::serve(
        listener,
        vec![registry, running.usage_registry()],
        running.readiness(),
        shutdown,
    )?;
    tracing::info!(%ops, reads = %running.local_addr, "Api listening.");
    Ok(running.wait().await?)
}
