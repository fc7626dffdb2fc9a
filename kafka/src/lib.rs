//! Kafka plumbing the pipeline stages share, so the aggregator, the rater and the gateway's
//! raw-topic ingest produce their outputs and dead letters the same way.
//!
//! Invariants:
//! - an output producer is idempotent with `acks=all`, and no pass-through option can turn
//!   either off: a stage writes its state only after [`await_all`] saw every acknowledgement;
//! - a dead letter carries its stable code, message, source topic and offset in the same
//!   headers whatever stage refused it.

use futures::future::join_all;
use neruba_schemas::topics::{
    REJECT_CODE_HEADER, REJECT_MESSAGE_HEADER, SOURCE_OFFSET_HEADER, SOURCE_TOPIC_HEADER,
};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer};
use std::time::Duration;

/// The producer a stage writes its outputs (rollups, line items, dead letters) with.
pub fn output_producer(
    brokers: &str,
    client_id: &str,
    linger_ms: u32,
    kafka_options: &[(String, String)],
) -> Result<FutureProducer, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("client.id", client_id)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", linger_ms.to_string())
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "60000");
    for (key, value) in kafka_options {
        if !matches!(key.as_str(), "acks" | "enable.idempotence") {
            client.set(key, value);
        }
    }
    client.create()
}

/// Partitions of `topic` (at least 1), from the broker's metadata. Blocking.
pub fn partition_count(producer: &FutureProducer, topic: &str) -> Result<i32, KafkaError> {
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .first()
        .map(|t| i32::try_from(t.partitions().len()).unwrap_or(1))
        .unwrap_or(1)
        .max(1))
}

/// The headers of a dead letter read from `source_topic` at `offset`.
pub fn dead_letter_headers(
    code: &str,
    message: &str,
    source_topic: &str,
    offset: i64,
) -> OwnedHeaders {
    let offset = offset.to_string();
    OwnedHeaders::new()
        .insert(Header {
            key: REJECT_CODE_HEADER,
            value: Some(code),
        })
        .insert(Header {
            key: REJECT_MESSAGE_HEADER,
            value: Some(message),
        })
        .insert(Header {
            key: SOURCE_TOPIC_HEADER,
            value: Some(source_topic),
        })
        .insert(Header {
            key: SOURCE_OFFSET_HEADER,
            value: Some(offset.as_str()),
        })
}

/// Awaits every enqueued send; the first failure (to enqueue or to be acknowledged) wins.
pub async fn await_all(pending: Vec<Result<DeliveryFuture, KafkaError>>) -> Result<(), KafkaError> {
    let results = join_all(pending.into_iter().map(|enqueued| async move {
        match enqueued {
            Err(e) => Err(e),
            Ok(delivery) => match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                Err(_) => Err(KafkaError::Canceled),
            },
        }
    }))
    .await;
    results.into_iter().collect()
}
