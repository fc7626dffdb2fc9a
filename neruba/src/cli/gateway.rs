//! `neruba gateway`: the ingest gateway against a Kafka cluster. Its ingest flags
//! ([`IngestArgs`]) are shared with `dev`.

use super::{load_catalog, millis, parse_key_value, shutdown_on_signal};
use anyhow::{Result, bail};
use clap::Args;
use neruba_ingest_gateway as gateway;
use neruba_schemas::event::Limits;
use neruba_schemas::{LiveCatalog, topics};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub(crate) struct GatewayArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "NERUBA_BROKERS")]
    pub(crate) brokers: String,
    /// Catalog file (`.toml`, `.yaml` or `.yml`).
    #[arg(long, env = "NERUBA_CATALOG")]
    pub(crate) catalog: PathBuf,
    /// Address the HTTP API, health and metrics listen on.
    #[arg(long, env = "NERUBA_GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub(crate) listen: SocketAddr,
    /// Topic raw-topic events that fail validation go to, with their rejection code.
    #[arg(long, env = "NERUBA_DEAD_LETTER_TOPIC", default_value = topics::DEAD_LETTER)]
    pub(crate) dead_letter_topic: String,
    /// Topic credit grants and voids are written to: the raters' ledger topic, so a
    /// customer's grants and line items share one partition and one order.
    #[arg(long, env = "NERUBA_LEDGER_TOPIC", default_value = topics::LEDGER)]
    pub(crate) ledger_topic: String,
    #[command(flatten)]
    pub(crate) ingest: IngestArgs,
}

/// Gateway settings shared by `gateway` and `dev`.
#[derive(Debug, Args)]
pub(crate) struct IngestArgs {
    /// Topic validated events are produced to.
    #[arg(long, env = "NERUBA_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub(crate) events_topic: String,
    /// How events are written to the events topic: `binary` (version 2) or `json` (version 1,
    /// for a rolling upgrade while aggregators that read only version 1 still run; aggregators
    /// read both).
    #[arg(long, env = "NERUBA_GATEWAY_EVENTS_ENCODING", default_value = "binary")]
    pub(crate) events_encoding: neruba_schemas::codec::Encoding,
    /// Largest request body, bytes, after `Content-Encoding` (gzip, zstd) is decoded.
    #[arg(long, env = "NERUBA_GATEWAY_MAX_BODY_BYTES", default_value_t = 5 * 1024 * 1024)]
    pub(crate) max_body_bytes: usize,
    /// Bytes of request bodies held at once, across all requests, at most half of it by one
    /// tenant: a request whose body does not fit waits (its bytes left unread, so TCP slows its
    /// sender) and past `--http-body-timeout` is answered 503 `overloaded`. A compressed body
    /// counts its length plus `--max-body-bytes` for its decoded copy (zstd: and 8 MiB for its
    /// window).
    #[arg(long, env = "NERUBA_GATEWAY_MAX_BODY_BYTES_IN_FLIGHT", default_value_t = gateway::DEFAULT_MAX_BODY_BYTES_IN_FLIGHT)]
    pub(crate) max_body_bytes_in_flight: usize,
    /// Longest from the first byte of a request to the end of its headers; a slower client is
    /// disconnected.
    #[arg(long, env = "NERUBA_GATEWAY_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) http_header_timeout: Duration,
    /// Longest a request body may take to arrive, whole; a slower one is answered 408
    /// `body_timeout`.
    #[arg(long, env = "NERUBA_GATEWAY_HTTP_BODY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) http_body_timeout: Duration,
    /// Longest a keep-alive connection may wait for its next request before it is closed.
    #[arg(long, env = "NERUBA_GATEWAY_HTTP_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub(crate) http_idle_timeout: Duration,
    /// Most HTTP connections open at once; further ones wait to be accepted.
    #[arg(long, env = "NERUBA_GATEWAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub(crate) max_connections: usize,
    /// Events per second of a tenant whose catalog entry sets no `rate_limit`.
    #[arg(long, env = "NERUBA_GATEWAY_DEFAULT_RATE_LIMIT", default_value_t = gateway::DEFAULT_RATE_LIMIT.events_per_second)]
    pub(crate) default_rate_limit: u32,
    /// Burst (events) of a tenant whose catalog entry sets no `rate_limit`.
    #[arg(long, env = "NERUBA_GATEWAY_DEFAULT_RATE_BURST", default_value_t = gateway::DEFAULT_RATE_BURST)]
    pub(crate) default_rate_burst: u32,
    /// Most events in one request.
    #[arg(
        long,
        env = "NERUBA_GATEWAY_MAX_BATCH_EVENTS",
        default_value_t = 10_000
    )]
    pub(crate) max_batch_events: usize,
    /// Largest single event, bytes.
    #[arg(long, env = "NERUBA_GATEWAY_MAX_EVENT_BYTES", default_value_t = 64 * 1024)]
    pub(crate) max_event_bytes: usize,
    /// How far in the future an event's `time` may be.
    #[arg(long, env = "NERUBA_GATEWAY_MAX_FUTURE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub(crate) max_future: Duration,
    /// How far in the past an event's `time` may be (the correction horizon).
    #[arg(long, env = "NERUBA_GATEWAY_CORRECTION_HORIZON", default_value = "35days", value_parser = humantime::parse_duration)]
    pub(crate) correction_horizon: Duration,
    /// Most event ids the gateway's recent-repeat cache holds.
    #[arg(
        long,
        env = "NERUBA_GATEWAY_DEDUP_CAPACITY",
        default_value_t = 1_000_000
    )]
    pub(crate) dedup_capacity: usize,
    /// Longest an id stays in the gateway's recent-repeat cache.
    #[arg(long, env = "NERUBA_GATEWAY_DEDUP_MAX_AGE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub(crate) dedup_max_age: Duration,
    /// How long the broker has to acknowledge events before the request is answered 503.
    #[arg(long, env = "NERUBA_GATEWAY_DELIVERY_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub(crate) delivery_timeout: Duration,
    /// Also ingest from this Kafka topic: one CloudEvent per message, API key in the
    /// `neruba-api-key` header.
    #[arg(long, env = "NERUBA_GATEWAY_RAW_TOPIC")]
    pub(crate) raw_topic: Option<String>,
    /// Consumer group of the gateways reading the raw topic.
    #[arg(
        long,
        env = "NERUBA_GATEWAY_RAW_GROUP_ID",
        default_value = "neruba-gateway-raw"
    )]
    pub(crate) raw_group_id: String,
    /// Extra librdkafka setting `key=value` (SASL, TLS, tuning); repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = parse_key_value)]
    pub(crate) kafka_opts: Vec<(String, String)>,
}

impl IngestArgs {
    pub(crate) fn config(
        &self,
        listen: SocketAddr,
        brokers: &str,
        dead_letter_topic: &str,
    ) -> Result<gateway::Config> {
        if self.max_event_bytes > self.max_body_bytes {
            bail!(
                "--max-event-bytes ({}) cannot exceed --max-body-bytes ({})",
                self.max_event_bytes,
                self.max_body_bytes
            );
        }
        if self.max_body_bytes_in_flight < self.max_body_bytes {
            bail!(
                "--max-body-bytes-in-flight ({}) is below --max-body-bytes ({}): the largest \
                 body would take more than the whole budget",
                self.max_body_bytes_in_flight,
                self.max_body_bytes
            );
        }
        if self.max_batch_events == 0 || self.dedup_capacity == 0 {
            bail!("--max-batch-events and --dedup-capacity must be positive");
        }
        if self.max_connections == 0 || self.default_rate_limit == 0 {
            bail!("--max-connections and --default-rate-limit must be positive");
        }
        if usize::try_from(self.default_rate_burst).unwrap_or(usize::MAX) < self.max_batch_events {
            bail!(
                "--default-rate-burst ({}) is below --max-batch-events ({}): a full batch of a \
                 tenant without its own rate limit could never be admitted",
                self.default_rate_burst,
                self.max_batch_events
            );
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
        config.events_encoding = self.events_encoding;
        config.max_body_bytes = self.max_body_bytes;
        config.max_body_bytes_in_flight = self.max_body_bytes_in_flight;
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

/// Runs a gateway until `shutdown` (or SIGTERM) stops it.
pub(crate) async fn run(args: GatewayArgs, shutdown: CancellationToken) -> Result<()> {
    let catalog = LiveCatalog::new(load_catalog(&args.catalog)?);
    let mut config = args
        .ingest
        .config(args.listen, &args.brokers, &args.dead_letter_topic)?;
    config.ledger_topic = args.ledger_topic.clone();
    let registry = prometheus::Registry::new();
    let shutdown = shutdown_on_signal(&shutdown);
    neruba::ops::reload_catalog_on_sighup(
        args.catalog.clone(),
        catalog.clone(),
        &registry,
        shutdown.clone(),
    )?;
    gateway::run(config, catalog, registry, shutdown).await?;
    Ok(())
}
