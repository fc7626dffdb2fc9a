//! The ingest gateway: authenticates, validates, drops recent repeats and produces to Kafka;
//! also the door for prepaid credit grants and voids ([`credits`]).
//!
//! Invariants:
//! - stateless: any replica can die and be replaced; the only state is a best-effort cache;
//! - `accepted` means the broker acknowledged with `acks=all` (see [`kafka`]);
//! - valid events of a request are never lost because other events of it were invalid.
//!
//! [`start`] binds and serves; tests call it on `127.0.0.1:0` and read the bound address.
//! [`bind`] then [`start_on`] let a caller claim the address before it starts anything else,
//! so a taken port fails at once.

pub mod admit;
pub mod binary;
pub mod budget;
pub mod credits;
pub mod dedup;
pub mod encoding;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod ratelimit;
pub mod raw;
/// The HTTP connection server, shared with the api (`neruba_stage::server`).
pub use neruba_stage::server;

use neruba_schemas::LiveCatalog;
use neruba_schemas::catalog::RateLimit;
use neruba_schemas::event::Limits;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Errors that stop the gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("http server: {0}")]
    Serve(#[source] std::io::Error),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("gateway task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Result with the gateway's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Rate limit of tenants the catalog gives none: 50,000 events/s, bursts of 100,000 (two
/// seconds' worth, so a client sending 10,000-event batches is not refused for bunching them).
pub const DEFAULT_RATE_LIMIT: RateLimit = RateLimit {
    events_per_second: 50_000,
    burst: Some(DEFAULT_RATE_BURST),
};

/// Bytes of request bodies held at once by default: 128 MiB, 25 bodies of the largest size
/// or some 800 batches of 500 typical events. With the producer's queue (at most 256 MiB) and
/// the values of the requests being parsed (one per worker thread; measured up to some 150 MiB
/// for a 5 MiB body of small numbers in arrays) a replica stays within the 1 GiB the
/// Kubernetes manifest gives it.
pub const DEFAULT_MAX_BODY_BYTES_IN_FLIGHT: usize = 128 * 1024 * 1024;

/// The burst of [`DEFAULT_RATE_LIMIT`].
pub const DEFAULT_RATE_BURST: u32 = 100_000;

/// Everything the gateway needs besides the catalog.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to serve HTTP on.
    pub listen: SocketAddr,
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Topic validated events go to.
    pub events_topic: String,
    /// How events are written to it (version 2, binary, unless a rolling upgrade still runs
    /// aggregators that read only version 1).
    pub events_encoding: neruba_schemas::codec::Encoding,
    /// Topic credit grants and voids go to: the ledger topic the raters write line items to,
    /// so a customer's items and grants share one partition and one order.
    pub ledger_topic: String,
    /// Per-event limits (size, clock skew, correction horizon).
    pub limits: Limits,
    /// Largest request body, bytes, after `Content-Encoding` is decoded.
    pub max_body_bytes: usize,
    /// Bytes of request bodies the gateway holds at once, across requests (see [`budget`]).
    pub max_body_bytes_in_flight: usize,
    /// Longest a request body may take to arrive, whole (408 `body_timeout` after it).
    pub body_read_timeout: Duration,
    /// Header, idle and connection-count limits of the HTTP listener.
    pub connections: server::ConnectionLimits,
    /// Rate limit of tenants whose catalog entry sets none: without it one tenant (or a leaked
    /// key) could take the gateway and the events topic from every other tenant.
    pub default_rate_limit: RateLimit,
    /// Most events in one request.
    pub max_batch_events: usize,
    /// Most event ids the recent-repeat cache holds.
    pub dedup_capacity: usize,
    /// Longest an id stays in the recent-repeat cache.
    pub dedup_max_age: Duration,
    /// How long the broker has to acknowledge an event before the request gets a 503.
    pub delivery_timeout: Duration,
    /// Extra librdkafka settings (`key=value`) for SASL, TLS or tuning.
    pub kafka_options: Vec<(String, String)>,
    /// Registries of other components in this process, also exposed on `/metrics`.
    pub extra_metrics: Vec<prometheus::Registry>,
    /// Also ingest from a raw Kafka topic (see [`raw`]).
    pub raw: Option<raw::RawConfig>,
}

impl Config {
    /// Defaults from the SPEC for everything but where to listen and which brokers to use.
    pub fn new(listen: SocketAddr, brokers: impl Into<String>) -> Self {
        Self {
            listen,
            brokers: brokers.into(),
            events_topic: neruba_schemas::topics::EVENTS.to_owned(),
            events_encoding: neruba_schemas::codec::Encoding::default(),
            ledger_topic: neruba_schemas::topics::LEDGER.to_owned(),
            limits: Limits::default(),
            max_body_bytes: 5 * 1024 * 1024,
            max_body_bytes_in_flight: DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
            body_read_timeout: Duration::from_secs(30),
            connections: server::ConnectionLimits::default(),
            default_rate_limit: DEFAULT_RATE_LIMIT,
            max_batch_events: 10_000,
            dedup_capacity: 1_000_000,
            dedup_max_age: Duration::from_secs(3600),
            delivery_timeout: Duration::from_secs(15),
            kafka_options: Vec::new(),
            extra_metrics: Vec::new(),
            raw: None,
        }
    }
}

/// A started gateway.
#[derive(Debug)]
pub struct Running {
    /// The address actually bound (useful with port 0).
    pub local_addr: SocketAddr,
    task: JoinHandle<Result<()>>,
}

impl Running {
    /// Waits until the gateway has shut down and flushed.
    pub async fn wait(self) -> Result<()> {
        self.task.await?
    }
}

/// Claims `addr` for the gateway, with the error [`start_on`] would give.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// Binds, starts serving, and returns once the listener is up.
pub async fn start(
    config: Config,
    catalog: impl Into<LiveCatalog>,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<Running> {
    let listener = bind(config.listen).await?;
    start_on(listener, config, catalog, registry, shutdown).await
}

/// Starts serving on a listener already bound (see [`bind`]); `config.listen` is not used.
pub async fn start_on(
    listener: tokio::net::TcpListener,
    config: Config,
    catalog: impl Into<LiveCatalog>,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<Running> {
    let metrics = metrics::Metrics::register(&registry)?;
    let producer = recoverable_producer(&config)?;
    if let Some(raw) = &config.raw {
        // The raw-topic consumer's settings checked now, before anything is started, so a
        // refused option stops the start as a producer's does (the consumer itself is made,
        // and made again after a failure, by its task, which would retry a refused one every
        // second and ingest nothing).
        neruba_kafka::clients::raw_consumer_config(
            &config.brokers,
            &raw.group_id,
            &config.kafka_options,
        )?;
    }
    // One producer for events and credit records: one set of broker connections, and the
    // flush at shutdown covers both.
    let ledger = credits::LedgerWriter::new(producer.clone(), &config.ledger_topic);
    let sink = kafka::EventSink::new(
        producer,
        &config.events_topic,
        config.events_encoding,
        metrics.clone(),
    );
    let state = Arc::new(http::AppState {
        catalog: catalog.into(),
        dedup: dedup::DedupCache::new(config.dedup_capacity, config.dedup_max_age),
        sink,
        ledger,
        limits: config.limits,
        max_body_bytes: config.max_body_bytes,
        body_budget: budget::BodyBudget::new(
            config.max_body_bytes_in_flight,
            metrics.body_bytes_in_flight.clone(),
        ),
        max_batch_events: config.max_batch_events,
        body_read_timeout: config.body_read_timeout,
        rate_limiter: ratelimit::RateLimiter::default(),
        default_rate_limit: config.default_rate_limit,
        metrics,
        registries: std::iter::once(registry.clone())
            .chain(config.extra_metrics.iter().cloned())
            .collect(),
        broker_ready: Default::default(),
    });
    let local_addr = listener.local_addr().map_err(Error::Serve)?;
    tracing::info!(%local_addr, topic = %config.events_topic, "Gateway listening.");

    let probe = tokio::spawn(probe_broker(state.clone(), shutdown.clone()));
    let raw_ingest = match config.raw.clone() {
        None => None,
        Some(raw) => {
            let dead_letters = recoverable_producer(&config)?;
            // Lag only: a stuck raw consumer does not make the HTTP path unready.
            let health = neruba_kafka::health::ConsumerHealth::new(
                "gateway-raw",
                &raw.topic,
                Duration::from_secs(60),
                &registry,
            )?;
            Some(tokio::spawn(raw::run(
                state.clone(),
                raw,
                config.brokers.clone(),
                config.kafka_options.clone(),
                dead_letters,
                health,
                shutdown.clone(),
            )))
        }
    };
    let app = http::router(state.clone());
    let connections = config.connections;
    let server_metrics = server::ServerMetrics {
        open_connections: state.metrics.http_connections.clone(),
        handler_panics: state.metrics.http_handler_panics.clone(),
    };
    let task = tokio::spawn(async move {
        server::serve(listener, app, connections, server_metrics, shutdown.clone()).await;
        shutdown.cancel();
        let _ = probe.await;
        if let Some(raw_ingest) = raw_ingest {
            // Finishes its batch (delivered and committed) before it returns.
            let _ = raw_ingest.await;
        }
        // In-flight requests have been answered; anything still queued is flushed before exit.
        let sink = state.sink.clone();
        let flushed =
            tokio::task::spawn_blocking(move || sink.flush(Duration::from_secs(30))).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "Producer flush at shutdown did not complete.");
        }
        tracing::info!("Gateway stopped.");
        Ok(())
    });
    Ok(Running { local_addr, task })
}

/// Starts the gateway and waits for it to stop.
pub async fn run(
    config: Config,
    catalog: impl Into<LiveCatalog>,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<()> {
    start(config, catalog, registry, shutdown)
        .await?
        .wait()
        .await
}

/// The gateway's producer, replaced if librdkafka declares it fatally failed.
fn recoverable_producer(
    config: &Config,
) -> Result<neruba_kafka::Recoverable<neruba_kafka::AckedProducer>> {
    let (brokers, timeout, options) = (
        config.brokers.clone(),
        config.delivery_timeout,
        config.kafka_options.clone(),
    );
    Ok(neruba_kafka::Recoverable::new(move || {
        kafka::build_producer(&brokers, timeout, &options)
    })?)
}

/// Keeps `/readyz` true only while the broker answers metadata requests for the events topic.
///
/// Before it turns ready the broker must answer twice in a row: at start, librdkafka asks for
/// the idempotent producer's id after a metadata answer, but the first answer finds no
/// connected broker to ask and leaves it to a 500 ms timer (see `neruba_kafka::partition_count`);
/// the second question connects to a broker the cluster named first. Was: ready after one
/// answer, and a request sent then was held for the timer (about 495 ms, in 3 of 30 runs). A
/// producer rebuilt after a fatal error is not probed twice and may wait the timer once.
/// A request that finds the broker down while a probe runs (it stores `false`) wins: the
/// next round probes twice again.
async fn probe_broker(state: Arc<http::AppState>, shutdown: CancellationToken) {
    loop {
        let was = state.broker_ready.load(Ordering::Relaxed);
        let sink = state.sink.clone();
        let up = tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(2);
            sink.probe(timeout) && (was || sink.probe(timeout))
        })
        .await
        .unwrap_or(false);
        let up =
            match state
                .broker_ready
                .compare_exchange(was, up, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => up,
                Err(now) => now,
            };
        state.metrics.broker_reachable.set(i64::from(up));
        if was != up {
            tracing::info!(reachable = up, "Broker reachability changed.");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_raw_consumer_option_that_would_skip_unread_usage_stops_the_start()
    -> std::result::Result<(), Box<dyn std::error::Error>> {
        // Was: the gateway started and reported ready while its raw-topic task, refused the
        // consumer, logged a failure every second and ingested nothing.
        let catalog = neruba_schemas::Catalog::from_toml_str(
            include_str!("../../catalog/sample.toml"),
            "sample.toml",
        )?;
        let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut config = Config::new(listen, "127.0.0.1:1");
        config.raw = Some(raw::RawConfig {
            topic: "raw".into(),
            group_id: "neruba-gateway-raw".into(),
            dead_letter_topic: "dead".into(),
            max_batch: 10,
        });
        config.kafka_options = vec![("auto.offset.reset".into(), "latest".into())];
        let refused = start_on(
            bind(listen).await?,
            config,
            catalog,
            prometheus::Registry::new(),
            CancellationToken::new(),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
        assert!(
            refused.as_ref().is_err_and(|m| m.contains(
                "kafka option `auto.offset.reset=latest` is refused: the raw-topic consumer's group"
            )),
            "{refused:?}"
        );
        Ok(())
    }
}
