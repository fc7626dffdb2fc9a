//! `neruba`: run a pipeline component against Kafka, or the whole pipeline embedded.

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use neruba::embedded::EmbeddedKafka;
use neruba::sample;
use neruba_ingest_gateway as gateway;
use neruba_kafka::health::ConsumerHealth;
use neruba_schemas::event::Limits;
use neruba_schemas::{Catalog, LiveCatalog, topics};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Usage metering and rating: events in, priced line items out.
#[derive(Debug, Parser)]
#[command(name = "neruba", version)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `neruba_ingest_gateway=debug`.
    #[arg(long, env = "NERUBA_LOG", default_value = "info", global = true)]
    log: String,
    /// Longest a component may take to stop once SIGTERM (or a failure) began its shutdown;
    /// past it the process exits anyway. Keep it below Kubernetes'
    /// `terminationGracePeriodSeconds`, so the exit is ours and not a SIGKILL.
    #[arg(long, env = "NERUBA_DRAIN_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration, global = true)]
    drain_timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start-up: the size of the variants costs nothing"
)]
enum Command {
    /// Run the ingest gateway against a Kafka cluster.
    Gateway(GatewayArgs),
    /// Run an aggregator (a member of the aggregator consumer group) against a Kafka cluster.
    Aggregator(AggregatorCommandArgs),
    /// Run a rater (a member of the rater consumer group) against a Kafka cluster.
    Rater(RaterCommandArgs),
    /// Run the pipeline against an in-process Kafka broker, until interrupted.
    Dev(DevArgs),
    /// Run the embedded pipeline, send a sample workload, print what happened, and exit.
    Demo,
    /// Catalog tools.
    #[command(subcommand)]
    Catalog(CatalogCommand),
    /// Price a quantity under a meter's plan and explain every step of the amount.
    Price(PriceArgs),
    /// Ledger tools.
    #[command(subcommand)]
    Ledger(LedgerCommand),
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Print the line items of the ledger topic as NDJSON, each id once.
    Tail(TailArgs),
}

#[derive(Debug, Args)]
struct TailArgs {
    /// Kafka bootstrap servers, e.g. the address `neruba dev` prints.
    #[arg(long, env = "NERUBA_BROKERS")]
    brokers: String,
    /// Topic line items are read from.
    #[arg(long, env = "NERUBA_LEDGER_TOPIC", default_value = topics::LEDGER)]
    ledger_topic: String,
    /// Only items of this tenant.
    #[arg(long, env = "NERUBA_TENANT")]
    tenant: Option<String>,
    /// Stop once no item arrived for this long (default: follow until interrupted).
    #[arg(long, env = "NERUBA_EXIT_WHEN_IDLE", value_parser = humantime::parse_duration)]
    exit_when_idle: Option<Duration>,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct RaterCommandArgs {
    #[command(subcommand)]
    action: Option<RaterAction>,
    #[command(flatten)]
    run: RaterRunArgs,
}

#[derive(Debug, Args)]
struct RaterRunArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]` (required to run a rater).
    #[arg(long, env = "NERUBA_BROKERS")]
    brokers: Option<String>,
    /// Catalog file, `.toml`, `.yaml` or `.yml` (required to run a rater).
    #[arg(long, env = "NERUBA_CATALOG")]
    catalog: Option<PathBuf>,
    /// Address `/metrics`, `/healthz` and `/readyz` listen on.
    #[arg(long, env = "NERUBA_OPS_LISTEN", default_value = "0.0.0.0:9091")]
    ops_listen: SocketAddr,
    /// Directory holding one RocksDB database per assigned rollups partition (required to run
    /// a rater).
    #[arg(long, env = "NERUBA_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Topic closed windows are read from.
    #[arg(long, env = "NERUBA_ROLLUPS_TOPIC", default_value = topics::ROLLUPS)]
    rollups_topic: String,
    /// Topic rollups that cannot be priced are produced to, with their refusal code.
    #[arg(long, env = "NERUBA_DEAD_LETTER_TOPIC", default_value = topics::DEAD_LETTER)]
    dead_letter_topic: String,
    #[command(flatten)]
    rating: RaterArgs,
    /// Extra librdkafka setting `key=value`; repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_key_value)]
    kafka_opts: Vec<(String, String)>,
}

#[derive(Debug, Subcommand)]
enum RaterAction {
    /// Re-price a tenant's billing periods under the plan versions now in force (restart the
    /// raters with the corrected catalog first); only differences become adjustments.
    Rerun(RerunArgs),
}

#[derive(Debug, Args)]
struct RerunArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "NERUBA_BROKERS")]
    brokers: String,
    /// Tenant whose periods are re-priced.
    #[arg(long, env = "NERUBA_TENANT")]
    tenant: String,
    /// First day (UTC, `YYYY-MM-DD`): periods that end after its start are included.
    #[arg(long, env = "NERUBA_FROM")]
    from: String,
    /// Last day (UTC, `YYYY-MM-DD`, inclusive): periods that start before its end are included.
    #[arg(long, env = "NERUBA_TO")]
    to: String,
    /// Topic the raters read.
    #[arg(long, env = "NERUBA_ROLLUPS_TOPIC", default_value = topics::ROLLUPS)]
    rollups_topic: String,
    /// Extra librdkafka setting `key=value`; repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_key_value)]
    kafka_opts: Vec<(String, String)>,
}

/// Rater settings shared by `rater` and `dev`.
#[derive(Debug, Args)]
struct RaterArgs {
    /// Consumer group of the raters.
    #[arg(long, env = "NERUBA_RATER_GROUP_ID", default_value = "neruba-rater")]
    rater_group_id: String,
    /// Static group membership id of this rater (e.g. the pod name), so a restart gets its
    /// partitions back at once.
    #[arg(long, env = "NERUBA_RATER_INSTANCE_ID")]
    rater_instance_id: Option<String>,
    /// Take these rollups-topic partitions (`all`, or `0,1,4`) statically instead of through
    /// the rater group.
    #[arg(long, env = "NERUBA_RATER_ASSIGN")]
    rater_assign: Option<topics::Assignment>,
    /// Topic line items are produced to.
    #[arg(long, env = "NERUBA_LEDGER_TOPIC", default_value = topics::LEDGER)]
    ledger_topic: String,
    /// `/readyz` turns false when a rollups partition is behind and has not moved for this long.
    #[arg(long, env = "NERUBA_RATER_STUCK_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    rater_stuck_after: Duration,
    /// How long the rater remembers the revision it rated per window. Keep it above the
    /// aggregator's correction horizon, and the events topic's retention below it.
    #[arg(long, env = "NERUBA_RATER_WINDOW_RETENTION", default_value = "37days", value_parser = humantime::parse_duration)]
    rater_window_retention: Duration,
    /// How long the rater remembers what it billed per period (reruns reach back this far).
    #[arg(long, env = "NERUBA_RATER_PERIOD_RETENTION", default_value = "400days", value_parser = humantime::parse_duration)]
    rater_period_retention: Duration,
}

impl RaterArgs {
    fn config(
        &self,
        brokers: &str,
        rollups_topic: &str,
        dead_letter_topic: &str,
        state_dir: &Path,
    ) -> neruba_rater::Config {
        let mut config = neruba_rater::Config::new(brokers, state_dir);
        config.group_id = self.rater_group_id.clone();
        config.instance_id = self.rater_instance_id.clone();
        config.assignment = self.rater_assign.clone();
        config.rollups_topic = rollups_topic.to_owned();
        config.ledger_topic = self.ledger_topic.clone();
        config.dead_letter_topic = dead_letter_topic.to_owned();
        config.stuck_after = self.rater_stuck_after;
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        config.retention = neruba_rater::state::Retention {
            window_ms: millis(self.rater_window_retention),
            period_ms: millis(self.rater_period_retention),
        };
        config
    }
}

#[derive(Debug, Args)]
struct PriceArgs {
    /// Catalog file; the built-in sample catalog when absent.
    #[arg(long, env = "NERUBA_CATALOG")]
    catalog: Option<PathBuf>,
    /// Tenant id.
    #[arg(long, env = "NERUBA_TENANT")]
    tenant: String,
    /// Meter key.
    #[arg(long, env = "NERUBA_METER")]
    meter: String,
    /// Period-to-date quantity, an exact decimal.
    #[arg(long, env = "NERUBA_QUANTITY")]
    quantity: String,
    /// Day whose plan version applies, `YYYY-MM-DD`; today (UTC) when absent.
    #[arg(long, env = "NERUBA_DATE")]
    date: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, env = "NERUBA_JSON")]
    json: bool,
}

#[derive(Debug, Args)]
struct GatewayArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "NERUBA_BROKERS")]
    brokers: String,
    /// Catalog file (`.toml`, `.yaml` or `.yml`).
    #[arg(long, env = "NERUBA_CATALOG")]
    catalog: PathBuf,
    /// Address the HTTP API, health and metrics listen on.
    #[arg(long, env = "NERUBA_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Topic raw-topic events that fail validation go to, with their rejection code.
    #[arg(long, env = "NERUBA_DEAD_LETTER_TOPIC", default_value = topics::DEAD_LETTER)]
    dead_letter_topic: String,
    #[command(flatten)]
    ingest: IngestArgs,
}

#[derive(Debug, Args)]
struct AggregatorCommandArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "NERUBA_BROKERS")]
    brokers: String,
    /// Catalog file (`.toml`, `.yaml` or `.yml`).
    #[arg(long, env = "NERUBA_CATALOG")]
    catalog: PathBuf,
    /// Address `/metrics`, `/healthz` and `/readyz` listen on.
    #[arg(long, env = "NERUBA_OPS_LISTEN", default_value = "0.0.0.0:9090")]
    ops_listen: SocketAddr,
    /// Directory holding one RocksDB database per assigned partition.
    #[arg(long, env = "NERUBA_STATE_DIR")]
    state_dir: PathBuf,
    #[command(flatten)]
    aggregation: AggregatorArgs,
    /// Extra librdkafka setting `key=value`; repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_key_value)]
    kafka_opts: Vec<(String, String)>,
}

/// Aggregator settings shared by `aggregator` and `dev`.
#[derive(Debug, Args)]
struct AggregatorArgs {
    /// Consumer group of the aggregators.
    #[arg(long, env = "NERUBA_GROUP_ID", default_value = "neruba-aggregator")]
    group_id: String,
    /// Static group membership id (e.g. the pod name), so a restart gets its partitions back.
    #[arg(long, env = "NERUBA_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Take these events-topic partitions (`all`, or `0,1,4`) statically instead of through
    /// the consumer group: no rebalancing; every partition must be named by exactly one
    /// aggregator.
    #[arg(long, env = "NERUBA_ASSIGN")]
    assign: Option<topics::Assignment>,
    /// Topic closed windows are produced to.
    #[arg(long, env = "NERUBA_ROLLUPS_TOPIC", default_value = topics::ROLLUPS)]
    rollups_topic: String,
    /// Topic events that cannot be metered are produced to, with their rejection code.
    #[arg(long, env = "NERUBA_DEAD_LETTER_TOPIC", default_value = topics::DEAD_LETTER)]
    dead_letter_topic: String,
    /// Watermark = highest event time seen on a partition minus this.
    #[arg(long, env = "NERUBA_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// A partition without messages for this long advances its watermark by processing time.
    #[arg(long, env = "NERUBA_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Events older than the watermark minus this are dead-lettered.
    #[arg(long = "aggregator-correction-horizon", env = "NERUBA_AGGREGATOR_CORRECTION_HORIZON", default_value = "35days", value_parser = humantime::parse_duration)]
    aggregator_correction_horizon: Duration,
    /// How long the aggregator remembers an event id.
    #[arg(long, env = "NERUBA_DEDUP_HORIZON", default_value = "35days", value_parser = humantime::parse_duration)]
    dedup_horizon: Duration,
    /// Most messages applied before state is written.
    #[arg(long, env = "NERUBA_MAX_BATCH", default_value_t = 5_000)]
    max_batch: usize,
    /// RocksDB block cache shared by all partitions, bytes.
    #[arg(long, env = "NERUBA_BLOCK_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    block_cache_bytes: usize,
    /// Consumer threads, each owning a share of the partitions as separate instances would
    /// (with `--instance-id ID`, worker i joins as `ID-wi`). Up to the pod's cores.
    #[arg(long, env = "NERUBA_AGGREGATOR_WORKERS", default_value_t = 1)]
    aggregator_workers: usize,
    /// `/readyz` turns false when an events partition is behind and has not moved for this long.
    #[arg(long, env = "NERUBA_STUCK_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    stuck_after: Duration,
}

impl AggregatorArgs {
    fn config(
        &self,
        brokers: &str,
        events_topic: &str,
        state_dir: &Path,
    ) -> Result<neruba_aggregator::Config> {
        let millis = |d: Duration| i64::try_from(d.as_millis()).context("duration too long");
        if self.max_batch == 0 {
            bail!("--max-batch must be positive");
        }
        if self.dedup_horizon < self.aggregator_correction_horizon {
            bail!(
                "--dedup-horizon must be at least the correction horizon, or a late repeat would count twice"
            );
        }
        let mut config = neruba_aggregator::Config::new(brokers, state_dir);
        config.group_id = self.group_id.clone();
        config.instance_id = self.instance_id.clone();
        config.assignment = self.assign.clone();
        config.events_topic = events_topic.to_owned();
        config.rollups_topic = self.rollups_topic.clone();
        config.dead_letter_topic = self.dead_letter_topic.clone();
        config.timing = neruba_aggregator::state::Timing {
            grace_ms: millis(self.grace)?,
            correction_horizon_ms: millis(self.aggregator_correction_horizon)?,
            dedup_horizon_ms: millis(self.dedup_horizon)?,
        };
        config.idle_timeout = self.idle_timeout;
        config.max_batch = self.max_batch;
        config.block_cache_bytes = self.block_cache_bytes;
        config.stuck_after = self.stuck_after;
        if self.aggregator_workers == 0 {
            bail!("--aggregator-workers must be at least 1");
        }
        config.workers = self.aggregator_workers;
        Ok(config)
    }
}

#[derive(Debug, Args)]
struct DevArgs {
    /// Address the gateway listens on.
    #[arg(long, env = "NERUBA_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Catalog file; the built-in sample catalog when absent.
    #[arg(long, env = "NERUBA_CATALOG")]
    catalog: Option<PathBuf>,
    /// Partitions of each topic on the embedded broker.
    #[arg(long, env = "NERUBA_PARTITIONS", default_value_t = 4)]
    partitions: i32,
    /// State directory (`aggregator/` and `rater/` beneath it); a temporary one, removed at
    /// exit, when absent.
    #[arg(long, env = "NERUBA_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    ingest: IngestArgs,
    #[command(flatten)]
    aggregation: AggregatorArgs,
    #[command(flatten)]
    rating: RaterArgs,
}

/// Gateway settings shared by `gateway` and `dev`.
#[derive(Debug, Args)]
struct IngestArgs {
    /// Topic validated events are produced to.
    #[arg(long, env = "NERUBA_EVENTS_TOPIC", default_value = topics::EVENTS)]
    events_topic: String,
    /// Largest request body, bytes, after `Content-Encoding` (gzip, zstd) is decoded.
    #[arg(long, env = "NERUBA_MAX_BODY_BYTES", default_value_t = 5 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Longest from the first byte of a request to the end of its headers; a slower client is
    /// disconnected.
    #[arg(long, env = "NERUBA_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    http_header_timeout: Duration,
    /// Longest a request body may take to arrive, whole; a slower one is answered 408
    /// `body_timeout`.
    #[arg(long, env = "NERUBA_HTTP_BODY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    http_body_timeout: Duration,
    /// Longest a keep-alive connection may wait for its next request before it is closed.
    #[arg(long, env = "NERUBA_HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    http_idle_timeout: Duration,
    /// Most HTTP connections open at once; further ones wait to be accepted.
    #[arg(long, env = "NERUBA_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Events per second of a tenant whose catalog entry sets no `rate_limit`.
    #[arg(long, env = "NERUBA_DEFAULT_RATE_LIMIT", default_value_t = gateway::DEFAULT_RATE_LIMIT.events_per_second)]
    default_rate_limit: u32,
    /// Burst (events) of a tenant whose catalog entry sets no `rate_limit`.
    #[arg(long, env = "NERUBA_DEFAULT_RATE_BURST", default_value_t = gateway::DEFAULT_RATE_BURST)]
    default_rate_burst: u32,
    /// Most events in one request.
    #[arg(long, env = "NERUBA_MAX_BATCH_EVENTS", default_value_t = 10_000)]
    max_batch_events: usize,
    /// Largest single event, bytes.
    #[arg(long, env = "NERUBA_MAX_EVENT_BYTES", default_value_t = 64 * 1024)]
    max_event_bytes: usize,
    /// How far in the future an event's `time` may be.
    #[arg(long, env = "NERUBA_MAX_FUTURE", default_value = "5m", value_parser = humantime::parse_duration)]
    max_future: Duration,
    /// How far in the past an event's `time` may be (the correction horizon).
    #[arg(long, env = "NERUBA_CORRECTION_HORIZON", default_value = "35days", value_parser = humantime::parse_duration)]
    correction_horizon: Duration,
    /// Most event ids the gateway's recent-repeat cache holds.
    #[arg(long, env = "NERUBA_DEDUP_CAPACITY", default_value_t = 1_000_000)]
    dedup_capacity: usize,
    /// Longest an id stays in the gateway's recent-repeat cache.
    #[arg(long, env = "NERUBA_DEDUP_MAX_AGE", default_value = "1h", value_parser = humantime::parse_duration)]
    dedup_max_age: Duration,
    /// How long the broker has to acknowledge events before the request is answered 503.
    #[arg(long, env = "NERUBA_DELIVERY_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    delivery_timeout: Duration,
    /// Also ingest from this Kafka topic: one CloudEvent per message, API key in the
    /// `neruba-api-key` header.
    #[arg(long, env = "NERUBA_RAW_TOPIC")]
    raw_topic: Option<String>,
    /// Consumer group of the gateways reading the raw topic.
    #[arg(
        long,
        env = "NERUBA_RAW_GROUP_ID",
        default_value = "neruba-gateway-raw"
    )]
    raw_group_id: String,
    /// Extra librdkafka setting `key=value` (SASL, TLS, tuning); repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_key_value)]
    kafka_opts: Vec<(String, String)>,
}

#[derive(Debug, Subcommand)]
enum CatalogCommand {
    /// Load a catalog file and report the first problem, or a summary.
    Check {
        /// Catalog file (`.toml`, `.yaml` or `.yml`).
        file: PathBuf,
    },
    /// Print the SHA-256 digest of an API key, as the catalog stores it.
    HashKey {
        /// The plaintext key.
        key: String,
    },
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("`{text}` is not key=value")),
    }
}

impl IngestArgs {
    fn config(
        &self,
        listen: SocketAddr,
        brokers: &str,
        dead_letter_topic: &str,
    ) -> Result<gateway::Config> {
        let millis = |d: Duration| i64::try_from(d.as_millis()).context("duration too long");
        if self.max_event_bytes > self.max_body_bytes {
            bail!(
                "--max-event-bytes ({}) cannot exceed --max-body-bytes ({})",
                self.max_event_bytes,
                self.max_body_bytes
            );
        }
        if self.max_batch_events == 0 || self.dedup_capacity == 0 {
            bail!("--max-batch-events and --dedup-capacity must be positive");
        }
        if self.max_connections == 0 || self.default_rate_limit == 0 {
            bail!("--max-connections and --default-rate-limit must be positive");
        }
        let zero = Duration::ZERO;
        if [
            self.http_header_timeout,
            self.http_body_timeout,
            self.http_idle_timeout,
        ]
        .contains(&zero)
        {
            bail!(
                "--http-header-timeout, --http-body-timeout and --http-idle-timeout must be positive"
            );
        }
        let mut config = gateway::Config::new(listen, brokers);
        config.events_topic = self.events_topic.clone();
        config.max_body_bytes = self.max_body_bytes;
        config.max_batch_events = self.max_batch_events;
        config.body_read_timeout = self.http_body_timeout;
        config.connections = gateway::server::ConnectionLimits {
            header_read_timeout: self.http_header_timeout,
            idle_timeout: self.http_idle_timeout,
            max_connections: self.max_connections,
        };
        config.default_rate_limit = neruba_schemas::catalog::RateLimit {
            events_per_second: self.default_rate_limit,
            burst: Some(self.default_rate_burst.max(1)),
        };
        config.limits = Limits {
            max_event_bytes: self.max_event_bytes,
            max_future_ms: millis(self.max_future)?,
            correction_horizon_ms: millis(self.correction_horizon)?,
        };
        config.dedup_capacity = self.dedup_capacity;
        config.dedup_max_age = self.dedup_max_age;
        config.delivery_timeout = self.delivery_timeout;
        config.kafka_options = self.kafka_opts.clone();
        config.raw = self
            .raw_topic
            .as_ref()
            .map(|topic| gateway::raw::RawConfig {
                topic: topic.clone(),
                group_id: self.raw_group_id.clone(),
                dead_letter_topic: dead_letter_topic.to_owned(),
                max_batch: 1_000,
            });
        Ok(config)
    }
}

fn load_catalog(path: &Path) -> Result<Catalog> {
    Ok(Catalog::load(path)?)
}

/// Cancels `token` on SIGTERM or Ctrl-C, and returns it. Only the long-running commands
/// listen: a one-shot command keeps the default action, which ends it at once.
fn shutdown_on_signal(token: &CancellationToken) -> CancellationToken {
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(e) => {
                        tracing::error!(error = %e, "Cannot listen for SIGTERM.");
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("Shutting down.");
        cancel.cancel();
    });
    token.clone()
}

/// How long past the drain timeout the process may take to exit when the orderly path (the
/// command returning, then the runtime's bounded shutdown) cannot run.
const HARD_EXIT_AFTER_DRAIN: Duration = Duration::from_secs(1);

/// Runs the command; bounds how long it may take to stop.
///
/// Once shutdown began (a signal, or a component that failed), the command has
/// `--drain-timeout` to finish; then the process exits whatever it is waiting for (a broker
/// that does not answer, a flush). Exiting there is safe by design: every stage writes its
/// offsets with its state, so an exit at any moment replays rather than loses, as a SIGKILL
/// would. The runtime is shut down with the same bound, because a blocking worker thread
/// would otherwise keep the process alive after `main` returned.
fn main() -> Result<()> {
    let cli = Cli::parse();
    // The demo talks to a person on stdout; its component logs stay quiet unless asked for.
    let filter = if matches!(cli.command, Command::Demo) && std::env::var_os("NERUBA_LOG").is_none()
    {
        "warn"
    } else {
        cli.log.as_str()
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter)?)
        .with_writer(std::io::stderr)
        .init();
    let (drain, command) = (cli.drain_timeout, cli.command);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let shutdown = CancellationToken::new();
    let watchdog = shutdown.clone();
    runtime.spawn(async move {
        watchdog.cancelled().await;
        // The last resort, on a thread of its own: a command blocked in a synchronous call (a
        // client library waiting for a broker that is not there) never lets the drain timeout
        // below fire.
        std::thread::spawn(move || {
            std::thread::sleep(drain + HARD_EXIT_AFTER_DRAIN);
            eprintln!(
                "Error: still running {} after shutdown began (--drain-timeout {}); exiting",
                humantime::format_duration(drain + HARD_EXIT_AFTER_DRAIN),
                humantime::format_duration(drain)
            );
            std::process::exit(1);
        });
    });
    let stopping = shutdown.clone();
    let finished = runtime.block_on(async {
        let overdue = async move {
            stopping.cancelled().await;
            tokio::time::sleep(drain).await;
        };
        tokio::select! {
            result = run(command, shutdown.clone()) => Some(result),
            () = overdue => None,
        }
    });
    // Whatever ended the command, stages still running stop on the token.
    shutdown.cancel();
    match finished {
        Some(result) => {
            // Stages the command did not wait for (it failed early) get to write their state.
            runtime.shutdown_timeout(drain);
            result
        }
        None => {
            runtime.shutdown_timeout(Duration::ZERO);
            Err(anyhow!(
                "did not stop within the drain timeout of {} after shutdown began; exiting without waiting further",
                humantime::format_duration(drain)
            ))
        }
    }
}

async fn run(command: Command, shutdown: CancellationToken) -> Result<()> {
    match command {
        Command::Gateway(args) => {
            let catalog = LiveCatalog::new(load_catalog(&args.catalog)?);
            let config = args
                .ingest
                .config(args.listen, &args.brokers, &args.dead_letter_topic)?;
            let registry = prometheus::Registry::new();
            let shutdown = shutdown_on_signal(&shutdown);
            neruba::ops::reload_catalog_on_sighup(
                args.catalog.clone(),
                catalog.clone(),
                &registry,
                shutdown.clone(),
            )?;
            gateway::run(config, catalog, registry, shutdown).await?;
        }
        Command::Aggregator(args) => {
            let catalog = LiveCatalog::new(load_catalog(&args.catalog)?);
            let mut config =
                args.aggregation
                    .config(&args.brokers, topics::EVENTS, &args.state_dir)?;
            config.kafka_options = args.kafka_opts.clone();
            run_stage(
                "aggregator",
                &shutdown,
                args.ops_listen,
                args.catalog.clone(),
                catalog,
                |catalog, registry, shutdown| {
                    let running = neruba_aggregator::start(config, catalog, registry, shutdown)?;
                    Ok((running.health(), async move { Ok(running.wait().await?) }))
                },
            )
            .await?;
        }
        Command::Rater(RaterCommandArgs {
            action: Some(RaterAction::Rerun(rerun)),
            ..
        }) => run_rerun(&rerun).await?,
        Command::Rater(RaterCommandArgs {
            run: args,
            action: None,
        }) => {
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
            );
            config.kafka_options = args.kafka_opts.clone();
            run_stage(
                "rater",
                &shutdown,
                args.ops_listen,
                catalog_path,
                catalog,
                |catalog, registry, shutdown| {
                    let running = neruba_rater::start(config, catalog, registry, shutdown)?;
                    Ok((running.health(), async move { Ok(running.wait().await?) }))
                },
            )
            .await?;
        }
        Command::Ledger(LedgerCommand::Tail(args)) => {
            let shutdown = shutdown_on_signal(&shutdown);
            tokio::task::spawn_blocking(move || {
                neruba::ledger::tail(
                    &args.brokers,
                    &args.ledger_topic,
                    args.tenant.as_deref(),
                    args.exit_when_idle,
                    &shutdown,
                    &mut std::io::stdout().lock(),
                )
            })
            .await??;
        }
        Command::Dev(args) => run_dev(args, &shutdown).await?,
        Command::Demo => {
            neruba::demo::run().await?;
        }
        Command::Catalog(CatalogCommand::Check { file }) => {
            let catalog = load_catalog(&file)?;
            for tenant in catalog.tenants() {
                println!(
                    "tenant {}: {} keys, {} meters, {} price plans",
                    tenant.id,
                    tenant.api_keys.len(),
                    tenant.meters.len(),
                    tenant.price_plans.len()
                );
            }
            println!("{}: ok", file.display());
        }
        Command::Price(args) => run_price(&args)?,
        Command::Catalog(CatalogCommand::HashKey { key }) => {
            println!("{}", neruba_schemas::catalog::hash_key(&key));
        }
    }
    Ok(())
}

/// Runs a consuming stage (the aggregator, the rater) until it stops: `start` starts it with
/// the live catalog, a metrics registry and the shutdown token, and returns its health and
/// what to await. Serves `/metrics`, `/healthz` and `/readyz` on `ops_listen`, and reloads the
/// catalog from `catalog_path` on SIGHUP.
async fn run_stage<Stopped>(
    name: &str,
    shutdown: &CancellationToken,
    ops_listen: SocketAddr,
    catalog_path: PathBuf,
    catalog: LiveCatalog,
    start: impl FnOnce(
        LiveCatalog,
        &prometheus::Registry,
        CancellationToken,
    ) -> Result<(Arc<ConsumerHealth>, Stopped)>
    + Send
    + 'static,
) -> Result<()>
where
    Stopped: std::future::Future<Output = Result<()>> + Send + 'static,
{
    // The address first: a taken port is a start-up error, before any consumer joins a group.
    let listener = neruba::ops::bind(ops_listen).await?;
    let registry = prometheus::Registry::new();
    let shutdown = shutdown_on_signal(shutdown);
    neruba::ops::reload_catalog_on_sighup(
        catalog_path,
        catalog.clone(),
        &registry,
        shutdown.clone(),
    )?;
    // On a blocking thread: a stage's start waits on broker metadata, and must not hold the
    // task that enforces the drain timeout.
    let (health, stopped) = {
        let (registry, shutdown) = (registry.clone(), shutdown.clone());
        tokio::task::spawn_blocking(move || start(catalog, &registry, shutdown)).await??
    };
    let ops = neruba::ops::serve(
        listener,
        vec![registry.clone()],
        move || health.check(),
        shutdown,
    )?;
    tracing::info!(%ops, stage = name, "Operations endpoints listening.");
    stopped.await
}

async fn run_dev(args: DevArgs, shutdown: &CancellationToken) -> Result<()> {
    if args.partitions < 1 {
        bail!("--partitions must be at least 1");
    }
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
        ),
        catalog.clone(),
        &rater_metrics,
        shutdown.clone(),
    )?;
    let mut config = args.ingest.config(
        args.listen,
        kafka.bootstrap_servers(),
        &args.aggregation.dead_letter_topic,
    )?;
    config.extra_metrics = vec![aggregator_metrics, rater_metrics];
    let running =
        gateway::start_on(listener, config, catalog, gateway_metrics, shutdown.clone()).await?;
    println!("Neruba dev pipeline is running.");
    println!("  HTTP API:   http://{}", running.local_addr);
    println!(
        "  Kafka:      {}  (bootstrap.servers)",
        kafka.bootstrap_servers()
    );
    println!(
        "  Topics:     {}, {}, {}, {} ({} partitions each)",
        args.ingest.events_topic,
        args.aggregation.rollups_topic,
        args.rating.ledger_topic,
        args.aggregation.dead_letter_topic,
        args.partitions
    );
    println!(
        "  Ledger:     neruba ledger tail --brokers {}",
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
    running.wait().await?;
    aggregated.await??;
    rated.await??;
    drop(kafka);
    Ok(())
}

fn parse_day(text: &str) -> Result<time::Date> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(text, &format).with_context(|| format!("`{text}` is not YYYY-MM-DD"))
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

fn run_price(args: &PriceArgs) -> Result<()> {
    let catalog = match &args.catalog {
        Some(path) => load_catalog(path)?,
        None => sample::catalog()?,
    };
    let tenant = catalog
        .tenant(&args.tenant)
        .with_context(|| format!("no tenant `{}` in the catalog", args.tenant))?;
    let quantity = neruba_schemas::decimal::parse_exact(&args.quantity)
        .with_context(|| format!("`{}` is not an exact decimal quantity", args.quantity))?;
    let date = match &args.date {
        Some(text) => parse_day(text)?,
        None => time::OffsetDateTime::now_utc().date(),
    };
    let plan = neruba_rater::price::plan_in_force(&tenant.price_plans, &args.meter, date)
        .with_context(|| {
            format!(
                "meter `{}` of tenant `{}` has no plan in force on {date}",
                args.meter, tenant.id
            )
        })?;
    let precision = catalog
        .precision(&plan.currency)
        .with_context(|| format!("unknown currency `{}`", plan.currency))?;
    let priced = neruba_rater::price::price(plan, quantity, precision)?;
    if args.json {
        let out = serde_json::json!({
            "tenant": tenant.id, "meter": args.meter, "plan": plan.id, "plan_version": plan.version,
            "currency": plan.currency, "effective_from": plan.effective_from.to_string(), "price": priced,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", priced.explain(plan));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_are_consistent_and_each_has_an_env_twin() {
        Cli::command().debug_assert();
        fn walk(command: &clap::Command) {
            for arg in command.get_arguments() {
                let positional = arg.get_long().is_none();
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !positional && !builtin {
                    assert!(
                        arg.get_env().is_some(),
                        "--{} of `{}` has no env twin",
                        arg.get_id(),
                        command.get_name()
                    );
                }
            }
            for sub in command.get_subcommands() {
                walk(sub);
            }
        }
        walk(&Cli::command());
    }

    #[test]
    fn every_subcommand_with_defaults_parses_without_flags() {
        for args in [vec!["neruba", "dev"], vec!["neruba", "demo"]] {
            if let Err(e) = Cli::try_parse_from(&args) {
                panic!("{args:?}: {e}");
            }
        }
        let aggregator = Cli::try_parse_from([
            "neruba",
            "aggregator",
            "--brokers",
            "k:9092",
            "--catalog",
            "c.toml",
            "--state-dir",
            "/tmp/s",
        ]);
        assert!(aggregator.is_ok(), "{aggregator:?}");
        let rater = Cli::try_parse_from([
            "neruba",
            "rater",
            "--brokers",
            "k:9092",
            "--catalog",
            "c.toml",
            "--state-dir",
            "/tmp/s",
        ]);
        assert!(
            matches!(
                &rater,
                Ok(Cli {
                    command: Command::Rater(RaterCommandArgs {
                        action: None,
                        run: RaterRunArgs { brokers: Some(b), .. },
                    }),
                    ..
                }) if b == "k:9092"
            ),
            "{rater:?}"
        );
        let rerun = Cli::try_parse_from([
            "neruba",
            "rater",
            "rerun",
            "--brokers",
            "k:9092",
            "--tenant",
            "acme",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-30",
        ]);
        assert!(
            matches!(
                rerun,
                Ok(Cli {
                    command: Command::Rater(RaterCommandArgs {
                        action: Some(RaterAction::Rerun(_)),
                        ..
                    }),
                    ..
                })
            ),
            "{rerun:?}"
        );
        let tail = Cli::try_parse_from(["neruba", "ledger", "tail", "--brokers", "k:9092"]);
        assert!(tail.is_ok(), "{tail:?}");
    }
}
