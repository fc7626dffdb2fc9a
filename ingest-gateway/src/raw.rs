//! Kafka-mode ingest: customers' producers write events to a raw topic; the gateway validates
//! and routes them exactly as it does HTTP requests.
//!
//! Invariants:
//! - each message is one CloudEvent, structured (the payload is the event) or in binary mode
//!   (Kafka protocol binding: attributes in `ce_id`, `ce_type`, ... headers, the payload is
//!   `data`; see [`crate::binary`]), authenticated by the API key in its `neruba-api-key`
//!   header (the same key, digest and `ingest` scope as HTTP); the tenant comes from the key
//!   and only from the key;
//! - a message ends either on the events topic or on the dead-letter topic with the same
//!   rejection codes as HTTP (plus `unauthenticated` and `forbidden`), its binary-mode
//!   attribute headers kept so it can be replayed; nothing is dropped, and no message stops
//!   the consumer: one whose header names are not UTF-8 is refused (`invalid_field`), and a
//!   dead letter keeps at most [`DEAD_LETTER_PAYLOAD_MAX`] bytes of a payload (the rest's
//!   length in `neruba-truncated-from`), so it can always be produced;
//! - raw offsets are committed only after every message of the batch was acknowledged where it
//!   went, so a crash re-sends rather than loses (the aggregator's dedup absorbs the repeat);
//! - its lag is exported like the other consumers' (`consumer="gateway-raw"`): for Kafka-mode
//!   producers this is the ingest lag.
//!
//! Who may send and which events are let in is decided in [`crate::admit`], which HTTP shares;
//! this module finds the key and the event in a message and routes what admission decided.

use crate::admit::{self, Outgoing, Sighting};
use crate::binary::{self, Binding};
use crate::http::AppState;
use crate::metrics::Tally;
use neruba_kafka::health::ConsumerHealth;
use neruba_schemas::event::{self, Limits};
use neruba_schemas::framing::{self as body, Framed, Framing};
use neruba_schemas::topics::{API_KEY_HEADER, TRUNCATED_FROM_HEADER};
use neruba_schemas::{Catalog, RejectCode, Rejection, codec};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers};
use rdkafka::producer::BaseRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where raw events come from and where refused ones go.
#[derive(Debug, Clone)]
pub struct RawConfig {
    pub topic: String,
    pub group_id: String,
    pub dead_letter_topic: String,
    /// Most messages handled per batch.
    pub max_batch: usize,
}

/// Feeds librdkafka's statistics (partition high watermarks) to the lag gauges.
struct RawContext {
    health: Arc<ConsumerHealth>,
}

impl ClientContext for RawContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.health.record_statistics(&statistics);
    }
}

impl ConsumerContext for RawContext {}

/// A message's headers in order, each name with its value (`None` for a null value).
type MessageHeaders<'m> = Vec<(&'m str, Option<&'m [u8]>)>;

/// Most payload bytes a dead letter keeps: a refused message can be as large as the broker
/// takes, past what a producer sends (1,000,000 bytes by default), and a dead letter that
/// cannot be produced would hold the partition at that message for good.
pub const DEAD_LETTER_PAYLOAD_MAX: usize = 256 * 1024;
/// Most bytes of a message's key, and of the binary-mode headers (names and values), a dead
/// letter keeps, for the same reason: more key is cut, more headers are left out.
pub const DEAD_LETTER_KEY_MAX: usize = 4 * 1024;
pub const DEAD_LETTER_HEADERS_MAX: usize = 64 * 1024;

/// A message's headers, or `None` when a header's name is not UTF-8: rdkafka's reader panics
/// on one (it unwraps the name as text), which ended the raw consumer's task, and a restart
/// met the same message again. Caught here, so the message is refused instead.
fn headers_of<'m>(message: &'m BorrowedMessage<'_>) -> Option<MessageHeaders<'m>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        message
            .headers()
            .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
            .unwrap_or_default()
    }))
    .ok()
}

/// One raw message, by its headers and payload, as the message to send in `encoding`, or why
/// not: the key in its `neruba-api-key` header, then the one event it carries (binary mode if
/// its headers say so), both judged by [`crate::admit`] as HTTP's are. Repeats are the
/// caller's.
pub(crate) fn admit_message<'a>(
    catalog: &'a Catalog,
    limits: &Limits,
    headers: &[(&str, Option<&[u8]>)],
    payload: &'a [u8],
    now_ms: i64,
    encoding: codec::Encoding,
) -> Result<Outgoing<'a>, admit::Refused<'a>> {
    let key = headers
        .iter()
        .find(|(name, _)| *name == API_KEY_HEADER)
        .and_then(|(_, value)| *value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim);
    let Some(key) = key else {
        return Err(Rejection::new(
            RejectCode::Unauthenticated,
            format!("the message has no `{API_KEY_HEADER}` header"),
        )
        .into());
    };
    let tenant = admit::authenticate(catalog, key)?;
    let framed = match binary_attributes(headers) {
        Some(attributes) => binary_event(&attributes, payload, limits.max_event_bytes)?,
        None => match body::split(Framing::Single, payload, 1, limits.max_event_bytes) {
            Ok(mut framed) if framed.len() == 1 => framed.remove(0).framed(),
            _ => {
                return Err(Rejection::new(
                    RejectCode::InvalidJson,
                    "the message is not one JSON object",
                )
                .into());
            }
        },
    };
    admit::event(tenant, framed, now_ms, limits, encoding)
}

/// The headers of a binary-mode message (`None` for a structured one).
fn binary_attributes<'m>(
    headers: &[(&'m str, Option<&'m [u8]>)],
) -> Option<Vec<(&'m str, &'m [u8])>> {
    let headers: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(name, value)| (*name, value.unwrap_or_default()))
        .collect();
    let content_type = content_type(&headers);
    Binding::Kafka
        .is_binary(headers.iter().map(|(name, _)| *name), content_type)
        .then_some(headers)
}

fn content_type<'h>(headers: &[(&str, &'h [u8])]) -> Option<&'h str> {
    headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        .and_then(|(_, value)| std::str::from_utf8(value).ok())
}

/// A binary-mode message as the structured event it stands for; its `data` must be JSON.
fn binary_event(
    headers: &[(&str, &[u8])],
    payload: &[u8],
    max_event_bytes: usize,
) -> Result<Framed<'static>, Rejection> {
    if !binary::is_json(content_type(headers)) {
        return Err(Rejection::new(
            RejectCode::InvalidJson,
            "in binary mode the payload is the event's data, which must be JSON",
        ));
    }
    binary::frame(
        Binding::Kafka,
        headers.iter().copied(),
        payload,
        max_event_bytes,
    )
    .map_err(|message| Rejection::new(RejectCode::InvalidJson, message))
}

/// Consumes the raw topic until `shutdown`; a broker failure restarts the consumer, which
/// resumes from the last committed batch.
pub async fn run(
    state: Arc<AppState>,
    config: RawConfig,
    brokers: String,
    kafka_options: Vec<(String, String)>,
    dead_letters: neruba_kafka::Recoverable<neruba_kafka::AckedProducer>,
    health: Arc<ConsumerHealth>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        if let Err(e) = consume(
            &state,
            &config,
            &brokers,
            &kafka_options,
            &dead_letters,
            &health,
            &shutdown,
        )
        .await
        {
            tracing::warn!(error = %e, topic = %config.topic, "Raw-topic ingest failed; restarting from the committed offsets.");
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

async fn consume(
    state: &AppState,
    config: &RawConfig,
    brokers: &str,
    kafka_options: &[(String, String)],
    dead_letters: &neruba_kafka::Recoverable<neruba_kafka::AckedProducer>,
    health: &Arc<ConsumerHealth>,
    shutdown: &CancellationToken,
) -> Result<(), rdkafka::error::KafkaError> {
    let consumer: StreamConsumer<RawContext> = neruba_kafka::clients::raw_consumer(
        brokers,
        &config.group_id,
        kafka_options,
        RawContext {
            health: health.clone(),
        },
    )?;
    consumer.subscribe(&[&config.topic])?;
    tracing::info!(topic = %config.topic, "Raw-topic ingest consuming.");
    // Per partition: the next offset to handle and the timestamp of the last message handled.
    let mut positions: HashMap<i32, (i64, Option<i64>)> = HashMap::new();
    let mut gauges = tokio::time::interval(Duration::from_secs(1));
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = gauges.tick() => {
                for (partition, (position, at)) in &positions {
                    health.observe(*partition, *position, *at);
                }
                continue;
            }
            message = consumer.recv() => message?,
        };
        let mut batch = vec![first];
        while batch.len() < config.max_batch {
            match tokio::time::timeout(Duration::from_millis(5), consumer.recv()).await {
                Ok(message) => batch.push(message?),
                Err(_) => break,
            }
        }
        let now = event::now_ms();
        // One catalog version for the whole batch.
        let catalog = state.catalog.current();
        let encoding = state.sink.encoding();
        let mut tally = Tally::default();
        let mut events = Vec::new();
        let mut refused = Vec::new();
        let mut next: HashMap<i32, i64> = HashMap::new();
        for message in &batch {
            next.insert(message.partition(), message.offset() + 1);
            let Some(headers) = headers_of(message) else {
                tally.reject(RejectCode::InvalidField);
                let why = "a header's name is not UTF-8";
                let rejection = Rejection::new(RejectCode::InvalidField, why);
                refused.push((message, rejection, Vec::new()));
                continue;
            };
            let payload = message.payload().unwrap_or_default();
            match admit_message(&catalog, &state.limits, &headers, payload, now, encoding) {
                Ok(event) => events.push(event),
                // A repeat of an event accepted before, refused now (its time past the
                // horizon, or a value rule tightened since): a duplicate, not a dead letter.
                Err(denied) if denied.repeat_in(&state.dedup).is_some() => tally.duplicate += 1,
                Err(denied) => {
                    tally.reject(denied.rejection.code);
                    refused.push((message, denied.rejection, headers));
                }
            }
        }
        // Repeats within the batch too, as an HTTP request drops repeats within itself.
        let sightings = admit::sightings(&state.dedup, events.iter().map(Outgoing::key));
        let before = events.len();
        let mut each = sightings.each().iter();
        events.retain(|_| each.next() == Some(&Sighting::First));
        tally.duplicate += u64::try_from(before - events.len()).unwrap_or(u64::MAX);
        let enqueued = state.sink.enqueue(events.iter_mut());
        let delivered = state.sink.delivered(enqueued).await;
        let dead_letter_producer = dead_letters.get();
        // Each with the headers read above (none when they could not be read).
        let mut dead = dead_letter_producer.sends(refused.len());
        for (message, rejection, attributes) in &refused {
            let mut headers = neruba_kafka::dead_letter_headers(
                rejection.code.as_str(),
                &rejection.message,
                &config.topic,
                message.offset(),
            );
            // A binary-mode event is its headers as much as its payload: keep them, so the
            // dead letter can be replayed as it was sent.
            let kept_headers: Vec<(&str, &[u8])> = binary_attributes(attributes)
                .unwrap_or_default()
                .into_iter()
                .filter(|(key, _)| {
                    key.starts_with("ce_") || key.eq_ignore_ascii_case("content-type")
                })
                .collect();
            let size: usize = kept_headers.iter().map(|(k, v)| k.len() + v.len()).sum();
            if size <= DEAD_LETTER_HEADERS_MAX {
                for (key, value) in kept_headers {
                    headers = headers.insert(Header {
                        key,
                        value: Some(value),
                    });
                }
            }
            let payload = message.payload().unwrap_or_default();
            let kept = payload.get(..DEAD_LETTER_PAYLOAD_MAX).unwrap_or(payload);
            if kept.len() < payload.len() {
                headers = headers.insert(Header {
                    key: TRUNCATED_FROM_HEADER,
                    value: Some(payload.len().to_string().as_bytes()),
                });
            }
            let mut record = BaseRecord::to(&config.dead_letter_topic)
                .payload(kept)
                .headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key.get(..DEAD_LETTER_KEY_MAX).unwrap_or(key));
            }
            dead.send(record);
        }
        let dead = dead.acks().await;
        // Nothing of the batch is committed unless every message landed somewhere.
        // The events delivered before the first that was not are remembered either way.
        let landed = delivered.iter().take_while(|result| result.is_ok()).count();
        sightings.remember_sent(&state.dedup, landed);
        if let (Some(event), Some(Err(e))) = (events.get(landed), delivered.get(landed)) {
            tracing::warn!(error = %e, id = %event.id, "Raw event not delivered.");
            return Err(rdkafka::error::KafkaError::Canceled);
        }
        tally.accepted += u64::try_from(landed).unwrap_or(u64::MAX);
        for result in dead {
            if let Err(e) = result {
                if let Err(rebuild) = dead_letters.recover(&dead_letter_producer, &e) {
                    tracing::error!(error = %rebuild, "Could not replace the dead-letter producer.");
                }
                return Err(e);
            }
        }
        tally.publish(&state.metrics);
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in next {
            offsets.add_partition_offset(&config.topic, partition, Offset::Offset(offset))?;
        }
        consumer.commit(&offsets, CommitMode::Sync)?;
        for message in &batch {
            positions.insert(
                message.partition(),
                (message.offset() + 1, message.timestamp().to_millis()),
            );
        }
    }
}
