//! `neruba api`, the read side: a local read model of the ledger topic and the billing reads
//! over HTTP (SPEC "Billing reads").
//!
//! Invariants:
//! - every replica reads every ledger partition (a static assignment, its own position per
//!   partition in its own RocksDB, no shared consumer group): replicas are independent, and
//!   each answers for any customer;
//! - the read model is the balances fold of the ledger (`ledger.rs`), so a statement, a
//!   balance or a grant read here is what the balances stage derives from the same records;
//! - the position a read is answered at is in the answer (`as_of`), and a read can wait for
//!   positions a write answered (`http.rs`): a credit write's on the ledger, and, for usage, an
//!   events write's on the events topic, which is caught up once the aggregators have folded
//!   those events and this model holds every rollup they produced from them (`events.rs`);
//! - usage answers closed windows only: an event in a window still open appears once that
//!   window closes, so waiting for an event's position shows the event if its window had
//!   closed (a late event's revision), not while its window is open;
//! - the support console (`/console`, `console.rs`) shows only what those reads answer.

mod console;
mod events;
mod http;
mod ledger;
mod metrics;
pub mod model;
mod statement_pages;
pub mod usage;

use neruba_schemas::LiveCatalog;
use rdkafka::consumer::Consumer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use http::{DEFAULT_LIMIT, MAX_GRANTS_PAGE, MAX_LIMIT, MAX_POSITIONS};

/// The aggregators' consumer group unless told otherwise: `neruba aggregator`'s default
/// `--group-id`.
pub const DEFAULT_AGGREGATOR_GROUP_ID: &str = "neruba-aggregator";
pub use neruba_stage::{Error, Result};

/// The api's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Brokers, the ledger topic (input), the state directory; the assignment is always
    /// every partition, and the group id only names this replica's position (no group work).
    pub stage: neruba_stage::Config,
    /// The rollups topic, read the same way into the usage model.
    pub rollups_topic: String,
    /// The events topic: a usage read may wait for a position on it (what `POST /v1/events`
    /// answered), which is caught up once the aggregators have folded it.
    pub events_topic: String,
    /// The aggregators' consumer group, whose committed events-topic offsets say what they
    /// have folded (read only: this replica never joins it).
    pub aggregator_group_id: String,
    pub listen: SocketAddr,
    /// Longest a read waits for its `min_position`; positions already caught up are answered
    /// at once, even with zero.
    pub read_wait: Duration,
    /// The gateway the console's credit writes are forwarded to (`http://host:port`); `None`:
    /// the console at `/console` only reads.
    pub console_gateway: Option<String>,
    /// How many connections may be open, and how long each may take to speak: the gateway's
    /// server (a request head within 10 s of its first byte, 60 s idle, 10,000 open).
    pub connections: neruba_stage::server::ConnectionLimits,
    /// Most rows a usage page holds, and its `limit` when none is asked for
    /// ([`usage::MAX_USAGE_ROWS`]).
    pub max_usage_rows: usize,
    /// Bytes of customers' books a worker of the ledger read model holds decoded before its
    /// batch ends, and keeps in their stored form between batches, as the balances stage's
    /// ([`neruba_balances::state::BOOKS_HELD_BYTES`], [`neruba_balances::state::BOOKS_KEPT_BYTES`]).
    pub books_held_bytes: usize,
    pub books_kept_bytes: usize,
}

impl Config {
    /// Defaults for everything but where the brokers and the state are; `replica` names this
    /// replica (its group id, under which nothing is shared).
    pub fn new(
        brokers: impl Into<String>,
        state_dir: impl Into<PathBuf>,
        listen: SocketAddr,
        replica: &str,
    ) -> Self {
        let mut stage = neruba_stage::Config::new(
            brokers,
            format!("neruba-api-{replica}"),
            neruba_schemas::topics::LEDGER,
            state_dir,
        )
        .sized(5_000, 64 * 1024 * 1024);
        stage.assignment = Some(neruba_schemas::topics::Assignment::All);
        Self {
            stage,
            rollups_topic: neruba_schemas::topics::ROLLUPS.to_owned(),
            events_topic: neruba_schemas::topics::EVENTS.to_owned(),
            aggregator_group_id: DEFAULT_AGGREGATOR_GROUP_ID.to_owned(),
            listen,
            read_wait: Duration::from_secs(5),
            console_gateway: None,
            connections: neruba_stage::server::ConnectionLimits::default(),
            max_usage_rows: usage::MAX_USAGE_ROWS,
            books_held_bytes: neruba_balances::state::BOOKS_HELD_BYTES,
            books_kept_bytes: neruba_balances::state::BOOKS_KEPT_BYTES,
        }
    }
}

/// A started api.
pub struct Running {
    /// The address the reads are served on (useful with port 0).
    pub local_addr: SocketAddr,
    pub model: Arc<model::Model>,
    pub rollups: Arc<model::Model>,
    stage: neruba_stage::Running,
    usage: neruba_stage::Running,
    usage_registry: prometheus::Registry,
    server: JoinHandle<std::io::Result<()>>,
    /// The events poller (`events.rs`): stops at shutdown, after its round in flight.
    events_poller: JoinHandle<()>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// What `/readyz` answers: ready once the read model's stage is healthy and has read
    /// everything the broker had at least once (before that, its answers would be old).
    pub fn readiness(
        &self,
    ) -> impl Fn() -> std::result::Result<(), String> + Send + Sync + 'static {
        let stages = [
            (self.stage.health(), self.model.clone()),
            (self.usage.health(), self.rollups.clone()),
        ];
        move || {
            for (health, model) in &stages {
                health.check()?;
                if !model.caught_up_once() {
                    return Err(format!(
                        "the read model has not caught up with `{}` yet",
                        model.topic()
                    ));
                }
            }
            Ok(())
        }
    }

    /// The registry of the usage stage's own gauges (its consumer lag), beside the one
    /// [`start`] was given: serve both.
    pub fn usage_registry(&self) -> prometheus::Registry {
        self.usage_registry.clone()
    }

    /// The stage's health (lag gauges, stuck detection).
    pub fn health(&self) -> Arc<neruba_kafka::health::ConsumerHealth> {
        self.stage.health()
    }

    /// Waits until the server and the stage have stopped (after the shutdown token fired).
    pub async fn wait(self) -> Result<()> {
        let served = self.server.await;
        let stopped = self.stage.wait().await;
        let usage_stopped = self.usage.wait().await;
        if let Err(e) = self.events_poller.await {
            tracing::error!(error = %e, "The events poller failed.");
        }
        match served {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "The api server failed."),
            Err(e) => tracing::error!(error = %e, "The api server task failed."),
        }
        stopped.and(usage_stopped)
    }
}

/// The input topic's partitions, each as its oldest and next offset, from the broker (an
/// error for a topic it reports an error for, or none, or a partition whose ends cannot be
/// read within 10 s; logged with the topic's name). Blocking.
fn ends_of(config: &neruba_stage::Config) -> Result<Vec<(i64, i64)>> {
    let probe = neruba_kafka::clients::metadata_probe(&config.brokers, &config.kafka_options)?;
    let topic = &config.input_topic;
    let partitions = neruba_kafka::topic_partitions(probe.client(), topic, Duration::from_secs(10))
        .map_err(|e| {
            tracing::error!(topic, error = %e, "Cannot read the topic's partitions.");
            e
        })?;
    (0..partitions)
        .map(|partition| {
            probe
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .map_err(|e| {
                    tracing::error!(topic, partition, error = %e, "Cannot read the partition's end.");
                    e.into()
                })
        })
        .collect()
}

/// The longest `read_wait` the api starts with: far past any client's patience already.
pub const MAX_READ_WAIT: Duration = Duration::from_secs(3600);

/// Starts the read model and the HTTP server; returns once both are up. The stage's start
/// blocks on broker metadata, so it runs on a blocking thread.
pub async fn start(
    config: Config,
    catalog: impl Into<LiveCatalog>,
    registry: &prometheus::Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    // Each read's deadline is its arrival plus this: a wait past what a clock can add (a
    // thousand years, say) made every read panic.
    anyhow::ensure!(
        config.read_wait <= MAX_READ_WAIT,
        "--api-read-wait is {:?}; it may be at most {:?}",
        config.read_wait,
        MAX_READ_WAIT
    );
    let catalog = catalog.into();
    let console = console::ConsoleState::new(catalog.clone(), config.console_gateway.as_deref())?;
    let metrics = metrics::Metrics::register(registry)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let local_addr = listener.local_addr()?;
    let stage_config = config.stage.clone();
    let (books_held_bytes, books_kept_bytes) = (config.books_held_bytes, config.books_kept_bytes);
    let mut usage_config = config.stage.clone();
    usage_config.input_topic.clone_from(&config.rollups_topic);
    let usage_registry = prometheus::Registry::new();
    let (model, stage, rollups, usage) = {
        let (registry, usage_registry) = (registry.clone(), usage_registry.clone());
        let shutdown = shutdown.clone();
        tokio::task::spawn_blocking(move || -> Result<_> {
            let model = Arc::new(model::Model::reading_to(
                &stage_config.input_topic,
                ends_of(&stage_config)?,
            ));
            let rollups = Arc::new(model::Model::reading_to(
                &usage_config.input_topic,
                ends_of(&usage_config)?,
            ));
            let books = neruba_balances::metrics::BooksMemory::register("api", &registry)?;
            let stage = neruba_stage::start(stage_config, &registry, shutdown.clone(), |slice| {
                Ok(ledger::LedgerModel {
                    model: model.clone(),
                    books: neruba_balances::state::WorkerBooks::new(
                        books.clone(),
                        slice.index,
                        books_held_bytes,
                        books_kept_bytes,
                    ),
                })
            })?;
            let usage = neruba_stage::start(usage_config, &usage_registry, shutdown, |_| {
                Ok(usage::UsageModel {
                    model: rollups.clone(),
                })
            })?;
            Ok((model, stage, rollups, usage))
        })
        .await??
    };
    let (events, events_poller) = events::EventsProgress::start(
        events::Settings {
            topic: config.events_topic.clone(),
            group_id: config.aggregator_group_id.clone(),
            rollups_topic: config.rollups_topic.clone(),
            rollup_partitions: rollups.partitions(),
            brokers: config.stage.brokers.clone(),
            kafka_options: config.stage.kafka_options.clone(),
        },
        shutdown.clone(),
    );
    let server_metrics = neruba_stage::server::ServerMetrics {
        open_connections: metrics.connections.clone(),
        handler_panics: metrics.handler_panics.clone(),
    };
    let state = http::AppState {
        catalog,
        model: model.clone(),
        rollups: rollups.clone(),
        events,
        read_wait: config.read_wait,
        max_usage_rows: config.max_usage_rows,
        metrics,
    };
    // The documented reads, and the console (`console.rs`) that reads through them.
    let app = http::router(state).merge(console::router(console));
    // The gateway's server, so a client that holds a connection without speaking (slow
    // headers, an idle keep-alive) is cut off and connections are capped: with `axum::serve`
    // nothing bounded either, and every socket held costs a file descriptor the read model's
    // RocksDB needs too.
    let limits = config.connections;
    let server = tokio::spawn(async move {
        neruba_stage::server::serve(listener, app, limits, server_metrics, shutdown).await;
        Ok(())
    });
    tracing::info!(%local_addr, "Billing reads listening.");
    Ok(Running {
        local_addr,
        model,
        rollups,
        stage,
        usage,
        usage_registry,
        server,
        events_poller,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_read_wait_past_an_hour_is_refused_at_start() {
        // Was: accepted, then every read panicked adding it to its arrival (a thousand years).
        let state = tempfile::tempdir().expect("tempdir");
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let mut config = Config::new("127.0.0.1:1", state.path(), listen, "0");
        config.read_wait = Duration::from_secs(1000 * 365 * 86_400);
        let catalog =
            neruba_schemas::Catalog::from_toml_str("tenants = []", "empty.toml").expect("catalog");
        let started = start(
            config,
            catalog,
            &prometheus::Registry::new(),
            CancellationToken::new(),
        )
        .await;
        let error = started.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("--api-read-wait"), "{error}");
    }
}
