//! Harness for the end-to-end scenarios: an embedded broker, a gateway started in-process on
//! `127.0.0.1:0`, an HTTP client, and a reader for what really landed on the topics.

use anyhow::{Context, Result};
use neruba::embedded::{self, EmbeddedKafka};
use neruba_ingest_gateway as gateway;
use neruba_schemas::{Catalog, Event, codec, topics};
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use neruba::sample;

/// A gateway on an embedded broker.
#[derive(Debug)]
pub struct GatewayHarness {
    pub kafka: EmbeddedKafka,
    pub base: String,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    running: Option<gateway::Running>,
}

impl GatewayHarness {
    /// Sample catalog, default limits.
    pub async fn start() -> Result<Self> {
        Self::start_with(sample::catalog()?, |_| {}).await
    }

    /// A custom catalog and config changes.
    pub async fn start_with(
        catalog: Catalog,
        tweak: impl FnOnce(&mut gateway::Config),
    ) -> Result<Self> {
        let kafka =
            EmbeddedKafka::start(&[(topics::EVENTS, 3), (topics::LEDGER, LEDGER_PARTITIONS)])?;
        let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut config = gateway::Config::new(listen, kafka.bootstrap_servers());
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let running = gateway::start(
            config,
            Arc::new(catalog),
            prometheus::Registry::new(),
            shutdown.clone(),
        )
        .await?;
        Ok(Self {
            base: format!("http://{}", running.local_addr),
            kafka,
            client: reqwest::Client::new(),
            shutdown,
            running: Some(running),
        })
    }

    /// POSTs `body` to `/v1/events`; returns the status, the `Retry-After` header and the JSON.
    pub async fn post(
        &self,
        key: Option<&str>,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<Answer> {
        let mut request = self
            .client
            .post(format!("{}/v1/events", self.base))
            .header("content-type", content_type)
            .body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await?;
        let json = serde_json::from_str(&text).with_context(|| format!("response body: {text}"))?;
        Ok(Answer {
            status,
            retry_after,
            json,
        })
    }

    /// POSTs `body` to `path` (e.g. `/v1/customers/c/grants`), with `content_type` when
    /// given; returns the status, the `Retry-After` header and the JSON answer.
    pub async fn post_to(
        &self,
        path: &str,
        key: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Result<Answer> {
        let mut request = self.client.post(format!("{}{path}", self.base)).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await?;
        let json = serde_json::from_str(&text).with_context(|| format!("response body: {text}"))?;
        Ok(Answer {
            status,
            retry_after,
            json,
        })
    }

    /// Every message on the ledger topic (grants and voids, with their record header), once at
    /// least `expected` are there and no more arrived for half a second.
    pub async fn ledger_records(&self, expected: usize) -> Result<Vec<LedgerRecord>> {
        let bootstrap = self.kafka.bootstrap_servers().to_owned();
        let messages = tokio::task::spawn_blocking(move || {
            embedded::read_topic(
                &bootstrap,
                topics::LEDGER,
                expected,
                Duration::from_millis(500),
                Duration::from_secs(15),
            )
        })
        .await??;
        messages
            .into_iter()
            .map(LedgerRecord::from_message)
            .collect()
    }

    /// GETs a path and returns the status and body text.
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await?;
        Ok((response.status().as_u16(), response.text().await?))
    }

    /// Waits until `/readyz` answers 200, asking every 5 ms for up to 10 s; an error with its
    /// last answer if it never does.
    pub async fn wait_ready(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = self.get("/readyz").await?;
            if status == 200 {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the gateway never reported ready: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Every message on the events topic, decoded, once at least `expected` are there and no
    /// more arrived for half a second (so an extra message would be seen).
    pub async fn events_on_topic(&self, expected: usize) -> Result<Vec<Landed>> {
        let bootstrap = self.kafka.bootstrap_servers().to_owned();
        let messages = tokio::task::spawn_blocking(move || {
            embedded::read_topic(
                &bootstrap,
                topics::EVENTS,
                expected,
                Duration::from_millis(500),
                Duration::from_secs(15),
            )
        })
        .await??;
        messages.into_iter().map(Landed::from_message).collect()
    }

    /// Cancels and waits for a clean shutdown.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.wait().await?;
        }
        Ok(())
    }
}

/// An HTTP answer from the gateway.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub json: Value,
}

impl Answer {
    /// `(id, status, code)` per event, in order.
    pub fn outcomes(&self) -> Vec<(String, String, String)> {
        self.json["results"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                (text("id"), text("status"), text("code"))
            })
            .collect()
    }
}

/// A message read back from the events topic.
#[derive(Debug)]
pub struct Landed {
    pub key: String,
    /// How many Kafka headers the message has.
    pub headers: usize,
    pub event: Event,
}

impl Landed {
    fn from_message(m: OwnedMessage) -> Result<Self> {
        let key = String::from_utf8(m.key().unwrap_or_default().to_vec())?;
        let headers = m.headers().map_or(0, |h| h.count());
        let mut payload = m.payload().unwrap_or_default().to_vec();
        let event = codec::decode(&mut payload)?;
        Ok(Self {
            key,
            headers,
            event,
        })
    }
}

/// Partitions of the ledger topic the gateway harness creates.
pub const LEDGER_PARTITIONS: i32 = 4;

/// A message read back from the ledger topic.
#[derive(Debug)]
pub struct LedgerRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    /// The `neruba-record` header (`grant`, `void`), absent on a line item.
    pub record: Option<String>,
    pub payload: Vec<u8>,
}

impl LedgerRecord {
    fn from_message(m: OwnedMessage) -> Result<Self> {
        let record = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == topics::RECORD_HEADER)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        Ok(Self {
            partition: m.partition(),
            offset: m.offset(),
            key: String::from_utf8(m.key().unwrap_or_default().to_vec())?,
            record,
            payload: m.payload().unwrap_or_default().to_vec(),
        })
    }
}

pub use neruba_schemas::event::now_ms;

/// Writes encoded events straight to the events topic (as the gateway would), so aggregator
/// scenarios control event times, partitions and order exactly.
pub struct EventWriter {
    producer: rdkafka::producer::FutureProducer,
}

impl std::fmt::Debug for EventWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventWriter").finish_non_exhaustive()
    }
}

impl EventWriter {
    pub fn new(bootstrap: &str) -> Result<Self> {
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "2")
            .create()?;
        Ok(Self { producer })
    }

    /// Writes a watermark tick to `partition` as an aggregator writes one
    /// ([`neruba_aggregator::tick_message`]).
    pub async fn tick(&self, partition: i32, tenant: &str, watermark_ms: i64) -> Result<()> {
        let (headers, payload) = neruba_aggregator::tick_message(tenant, watermark_ms);
        let record = rdkafka::producer::FutureRecord::to(topics::EVENTS)
            .key(topics::WATERMARK_HEADER.as_bytes())
            .payload(payload.as_bytes())
            .partition(partition)
            .headers(headers);
        self.producer
            .send_result(record)
            .map_err(|(e, _)| anyhow::anyhow!("enqueue: {e}"))?
            .await?
            .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
        Ok(())
    }

    /// Sends events in order to `partition` and waits for every acknowledgement.
    pub async fn send(&self, partition: i32, events: &[Event]) -> Result<()> {
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            let payload = codec::encode(event);
            let key = event.partition_key();
            let record = rdkafka::producer::FutureRecord::to(topics::EVENTS)
                .key(&key)
                .payload(&payload)
                .partition(partition);
            pending.push(
                self.producer
                    .send_result(record)
                    .map_err(|(e, _)| anyhow::anyhow!("enqueue: {e}"))?,
            );
        }
        for delivery in futures::future::join_all(pending).await {
            delivery?.map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
        }
        Ok(())
    }

    /// Sends raw bytes (not an encoded event) to `partition`.
    pub async fn send_raw(&self, partition: i32, payload: &[u8]) -> Result<()> {
        let record = rdkafka::producer::FutureRecord::<(), [u8]>::to(topics::EVENTS)
            .payload(payload)
            .partition(partition);
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
        Ok(())
    }
}

/// An event as the gateway would have validated it.
pub fn event(
    tenant: &str,
    id: &str,
    event_type: &str,
    subject: &str,
    time_ms: i64,
    data: Value,
) -> Event {
    Event {
        tenant: tenant.to_owned(),
        id: id.to_owned(),
        event_type: event_type.to_owned(),
        subject: subject.to_owned(),
        time_ms,
        received_ms: time_ms,
        source: None,
        data: data.as_object().cloned().unwrap_or_default(),
    }
}

/// Every rollup on the rollups topic, once at least `expected` are there and nothing more
/// arrived for `settle`.
pub async fn rollups_on_topic(
    bootstrap: &str,
    expected: usize,
    settle: Duration,
) -> Result<Vec<neruba_schemas::rollup::Rollup>> {
    let bootstrap = bootstrap.to_owned();
    let messages = tokio::task::spawn_blocking(move || {
        embedded::read_topic(
            &bootstrap,
            topics::ROLLUPS,
            expected,
            settle,
            Duration::from_secs(30),
        )
    })
    .await??;
    messages
        .iter()
        .map(|m| {
            Ok(neruba_schemas::rollup::Rollup::decode(
                m.payload().unwrap_or_default(),
            )?)
        })
        .collect()
}

/// Dead letters on the dead-letter topic: `(rejection code header, payload)`.
pub async fn dead_letters(bootstrap: &str, expected: usize) -> Result<Vec<(String, Vec<u8>)>> {
    let bootstrap = bootstrap.to_owned();
    let messages = tokio::task::spawn_blocking(move || {
        embedded::read_topic(
            &bootstrap,
            topics::DEAD_LETTER,
            expected,
            Duration::from_millis(500),
            Duration::from_secs(20),
        )
    })
    .await??;
    Ok(messages
        .iter()
        .map(|m| {
            let code = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == neruba_schemas::topics::REJECT_CODE_HEADER)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
                .unwrap_or_default();
            (code, m.payload().unwrap_or_default().to_vec())
        })
        .collect())
}

/// Collapses re-deliveries: one rollup per (key, revision). A repeat must be identical, which
/// this checks; then only the highest revision per key is kept.
pub fn latest_rollups(
    rollups: Vec<neruba_schemas::rollup::Rollup>,
) -> Result<std::collections::BTreeMap<String, neruba_schemas::rollup::Rollup>> {
    let mut by_revision = std::collections::BTreeMap::new();
    for r in rollups {
        let id = (r.key(), r.revision);
        if let Some(previous) = by_revision.get(&id) {
            anyhow::ensure!(
                previous == &r,
                "rollup {id:?} re-emitted with different content"
            );
        }
        by_revision.insert(id, r);
    }
    let mut latest = std::collections::BTreeMap::new();
    for ((key, _), r) in by_revision {
        latest.insert(key, r);
    }
    Ok(latest)
}
