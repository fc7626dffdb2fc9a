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
    /// Topic the gateways write events to: a usage read may wait for a position on it.
    #[arg(long, env = "NERUBA_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub(crate) events_topic: String,
    /// The aggregators' consumer group (their `--group-id`): its committed events-topic
    /// offsets say which events a usage read with an events `min_position` waits for are folded.
    #[arg(
        long,
        env = "NERUBA_API_AGGREGATOR_GROUP_ID",
        default_value = neruba_api::DEFAULT_AGGREGATOR_GROUP_ID
    )]
    pub(crate) api_aggregator_group_id: String,
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
    /// Longest a read waits: for the read model to apply the records of its `min_position`,
    /// and, on a replica just started, to read its topics to where they ended at its start.
    /// At most an hour.
    #[arg(long, env = "NERUBA_API_READ_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) api_read_wait: Duration,
    /// Gateway the console's grant and void forms are forwarded to, `http://host:port`;
    /// without it the console (`/console`) only reads. `neruba dev` uses its own gateway.
    #[arg(long, env = "NERUBA_API_CONSOLE_GATEWAY_URL")]
    pub(crate) console_gateway_url: Option<String>,
    /// Most rows a usage page holds (one per bucket and group with usage), and its `limit`
    /// when none is asked for; the answer goes on in further pages (`next_cursor`), so one
    /// read's memory stays bounded.
    #[arg(long, env = "NERUBA_API_MAX_USAGE_ROWS", default_value_t = neruba_api::usage::MAX_USAGE_ROWS)]
    pub(crate) api_max_usage_rows: usize,
    /// Bytes of customers' books a worker of the ledger read model holds decoded before its
    /// batch ends (a tick due for more customers is applied in parts within it), as the
    /// balances stage's `--balances-books-held-bytes` (0: every record in a batch of its own).
    #[arg(long, env = "NERUBA_API_BOOKS_HELD_BYTES", default_value_t = neruba_balances::state::BOOKS_HELD_BYTES)]
    pub(crate) api_books_held_bytes: usize,
    /// Bytes of books a worker of the read model keeps in their stored form between batches
    /// (0: none).
    #[arg(long, env = "NERUBA_API_BOOKS_KEPT_BYTES", default_value_t = neruba_balances::state::BOOKS_KEPT_BYTES)]
    pub(crate) api_books_kept_bytes: usize,
}

/// The topics the api reads (ledger, rollups) or waits on (events).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ApiTopics<'a> {
    pub(crate) ledger: &'a str,
    pub(crate) rollups: &'a str,
    pub(crate) events: &'a str,
}

impl ApiArgs {
    /// The api's settings; `events_topic` and `aggregator_group_id` are where the aggregators
    /// read events and under which group they commit (`neruba dev`: its own aggregator's).
    pub(crate) fn config(
        &self,
        brokers: &str,
        topics: ApiTopics<'_>,
        aggregator_group_id: &str,
        state_dir: &std::path::Path,
    ) -> neruba_api::Config {
        let mut config =
            neruba_api::Config::new(brokers, state_dir, self.api_listen, &self.api_replica);
        config.stage.input_topic = topics.ledger.to_owned();
        config.rollups_topic = topics.rollups.to_owned();
        config.events_topic = topics.events.to_owned();
        config.aggregator_group_id = aggregator_group_id.to_owned();
        config.read_wait = self.api_read_wait;
        config.max_usage_rows = self.api_max_usage_rows;
        config.books_held_bytes = self.api_books_held_bytes;
        config.books_kept_bytes = self.api_books_kept_bytes;
        config.console_gateway.clone_from(&self.console_gateway_url);
        config
    }
}

impl ApiCommandArgs {
    /// The api's configuration from its flags.
    fn config(&self) -> neruba_api::Config {
        self.api.config(
            &self.brokers,
            ApiTopics {
                ledger: &self.ledger_topic,
                rollups: &self.rollups_topic,
                events: &self.events_topic,
            },
            &self.api_aggregator_group_id,
            &self.state_dir,
        )
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
    let mut config = args.config();
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

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn the_api_waits_on_the_aggregators_group_and_events_topic_by_default_or_as_told() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|cli| cli.command);
        let Ok(Command::Aggregator(aggregator)) = parse(&[
            "neruba",
            "aggregator",
            "--brokers",
            "k:9092",
            "--catalog",
            "c.toml",
            "--state-dir",
            "/tmp/s",
        ]) else {
            panic!("aggregator");
        };
        let base = [
            "neruba",
            "api",
            "--brokers",
            "k:9092",
            "--state-dir",
            "/tmp/s",
        ];
        let told = [
            "--events-topic",
            "acme.events",
            "--api-aggregator-group-id",
            "acme-aggregators",
        ];
        for (extra, topic, group) in [
            (
                &[][..],
                "neruba.events",
                aggregator.aggregation.group_id.as_str(),
            ),
            (&told[..], "acme.events", "acme-aggregators"),
        ] {
            let Ok(Command::Api(args)) = parse(&[&base[..], extra].concat()) else {
                panic!("api {extra:?}");
            };
            let config = args.config();
            assert_eq!(
                (
                    config.events_topic.as_str(),
                    config.aggregator_group_id.as_str()
                ),
                (topic, group)
            );
        }
    }
}
