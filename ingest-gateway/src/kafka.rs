//! Producing validated events to the events topic.
//!
//! Invariants:
//! - an event is reported delivered only after the broker acknowledged it with `acks=all`
//!   (librdkafka's delivery report), never when it was merely queued;
//! - the idempotent producer keeps retries from writing an event twice within a session, and
//!   keeps one partition's messages in order;
//! - a request's events are all enqueued before its acknowledgements are awaited, together
//!   ([`neruba_kafka::Acks`]), so a request waits for its slowest acknowledgement, never for the
//!   sum of them, and wakes once;
//! - an event carries no Kafka headers: its key (`tenant/customer`, a tenant id never holding
//!   `/`) names the tenant and its first byte the encoding ([`codec::version_of`]), so headers
//!   would say nothing new; without them the gateway takes about a fifth less CPU per event
//!   (librdkafka allocates each header and frees it on another thread). The only headers on
//!   the topic are the aggregators' watermark ticks', which is how readers tell those apart.

use crate::admit::Outgoing;
use crate::metrics::Metrics;
use neruba_kafka::{AckedProducer, Acks, Landed};
use neruba_schemas::codec;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::BaseRecord;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Builds the gateway's producer (every setting it relies on is in
/// [`neruba_kafka::clients::gateway_producer`]). `extra` are operator pass-through settings
/// (SASL, TLS, tuning); they may not weaken durability: `acks` and `enable.idempotence` are
/// refused.
pub fn build_producer(
    brokers: &str,
    delivery_timeout: Duration,
    extra: &[(String, String)],
) -> Result<AckedProducer, KafkaError> {
    neruba_kafka::clients::gateway_producer(brokers, delivery_timeout, extra)
}

/// Why an event did not reach the broker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    /// The broker did not acknowledge (down, timed out, refused): retry later.
    #[error("broker did not acknowledge: {0}")]
    Unavailable(String),
}

impl From<KafkaError> for DeliveryError {
    fn from(e: KafkaError) -> Self {
        match e {
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                Self::Unavailable("local produce queue is full".into())
            }
            KafkaError::Canceled => Self::Unavailable("producer shut down".into()),
            e => Self::Unavailable(e.to_string()),
        }
    }
}

/// Sends events to the events topic and reports each one's delivery.
#[derive(Clone)]
pub struct EventSink {
    producer: neruba_kafka::Recoverable<AckedProducer>,
    topic: Arc<str>,
    encoding: codec::Encoding,
    metrics: Metrics,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("topic", &self.topic)
            .field("encoding", &self.encoding)
            .finish()
    }
}

/// Events in the producer's queue, their delivery reports to come ([`EventSink::delivered`]).
#[must_use = "the delivery reports say whether the events landed"]
pub struct Enqueued {
    acks: Acks,
    producer: AckedProducer,
    started: Instant,
}

impl std::fmt::Debug for Enqueued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enqueued").finish_non_exhaustive()
    }
}

impl EventSink {
    pub fn new(
        producer: neruba_kafka::Recoverable<AckedProducer>,
        topic: &str,
        encoding: codec::Encoding,
        metrics: Metrics,
    ) -> Self {
        Self {
            producer,
            topic: topic.into(),
            encoding,
            metrics,
        }
    }

    /// The topic events are sent to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The encoding events are sent in ([`crate::admit::event`] encodes them).
    pub fn encoding(&self) -> codec::Encoding {
        self.encoding
    }

    /// Enqueues every event, then drops its message: the producer holds its own copy from
    /// here on, and only the events' keys are read after it. A caller that parses and enqueues
    /// with no await between holds the messages only while its worker thread runs it, never
    /// while the broker is waited on ([`EventSink::delivered`]).
    pub fn enqueue<'e, 'a: 'e>(
        &self,
        events: impl ExactSizeIterator<Item = &'e mut Outgoing<'a>>,
    ) -> Enqueued {
        let started = Instant::now();
        let producer = self.producer.get();
        let mut sends = producer.sends(events.len());
        let mut key = String::new();
        for event in events {
            event.write_partition_key(&mut key);
            sends.send(
                BaseRecord::to(&self.topic)
                    .key(&key)
                    .payload(&event.payload)
                    .timestamp(event.time_ms),
            );
            event.payload = Vec::new();
        }
        let acks = sends.acks();
        self.metrics
            .produce_queue_depth
            .set(i64::from(producer.in_flight_count()));
        Enqueued {
            acks,
            producer,
            started,
        }
    }

    /// The delivery reports of what [`EventSink::enqueue`] queued, in its order: where each
    /// event landed or why it did not.
    pub async fn delivered(&self, enqueued: Enqueued) -> Vec<Result<Landed, DeliveryError>> {
        let Enqueued {
            acks,
            producer,
            started,
        } = enqueued;
        let deliveries = acks.await;
        self.metrics
            .produce_duration
            .observe(started.elapsed().as_secs_f64());
        if let Some(Err(error)) = deliveries.iter().find(|d| d.is_err())
            && let Err(e) = self.producer.recover(&producer, error)
        {
            tracing::error!(error = %e, "Could not replace the failed producer.");
        }
        deliveries
            .into_iter()
            .map(|delivery| delivery.map_err(DeliveryError::from))
            .collect()
    }

    /// Whether the broker answers a metadata request for the events topic within `timeout`.
    /// Blocking; call from a blocking thread.
    pub fn probe(&self, timeout: Duration) -> bool {
        neruba_kafka::topic_answers(self.producer.get().client(), &self.topic, timeout)
    }

    /// Waits for queued events to be delivered, up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.get().flush(timeout)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_gateway_refuses_a_durability_override_with_every_producers_message() {
        let refused = super::build_producer(
            "127.0.0.1:1",
            std::time::Duration::from_secs(1),
            &[("acks".to_owned(), "0".to_owned())],
        )
        .map(|_| ())
        .map_err(|e| e.to_string());
        assert!(
            refused.as_ref().is_err_and(|m| m
                .contains("kafka option `acks=0` is refused: Neruba's producers rely on acks=all")),
            "{refused:?}"
        );
    }
}
