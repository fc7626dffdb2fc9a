//! An in-process Kafka broker for trying Neruba, demos and tests.
//!
//! It is librdkafka's own mock cluster (`rdkafka::mocking`): real Kafka protocol on a loopback
//! port, so every component talks to it exactly as it would to a production cluster.
//! The cluster lives as long as [`EmbeddedKafka`]; it is not `Send`, so keep it on the task
//! that created it.

use rdkafka::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::time::{Duration, Instant};

/// A running mock cluster and its bootstrap address.
pub struct EmbeddedKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
    bootstrap: String,
}

impl std::fmt::Debug for EmbeddedKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedKafka")
            .field("bootstrap", &self.bootstrap)
            .finish()
    }
}

impl EmbeddedKafka {
    /// Starts a one-broker cluster and creates `topics` as `(name, partitions)`.
    pub fn start(topics: &[(&str, i32)]) -> Result<Self, KafkaError> {
        let cluster = MockCluster::new(1)?;
        for (name, partitions) in topics {
            cluster.create_topic(name, *partitions, 1)?;
        }
        let bootstrap = cluster.bootstrap_servers();
        Ok(Self { cluster, bootstrap })
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Delays every answer of the broker by `delay` (a slow or distant cluster); zero undoes it.
    pub fn set_round_trip_time(&self, delay: Duration) -> Result<(), KafkaError> {
        self.cluster.broker_round_trip_time(1, delay)
    }

    /// Answers the next requests of kind `api` with `errors`, one each, in order (a broker
    /// refusing, or a group coordinator fencing a member).
    pub fn fail_requests(
        &self,
        api: rdkafka::types::RDKafkaApiKey,
        errors: &[rdkafka::types::RDKafkaRespErr],
    ) {
        self.cluster.request_errors(api, errors);
    }

    /// Makes the broker refuse connections (an outage), or accept them again.
    pub fn set_broker_up(&self, up: bool) -> Result<(), KafkaError> {
        if up {
            self.cluster.broker_up(1)
        } else {
            self.cluster.broker_down(1)
        }
    }
}

/// Reads every message of `topic` from the beginning, stopping once `expected` messages were
/// read and nothing more arrived for `settle`, or at `deadline`. Blocking.
///
/// Reading a little past `expected` is what lets a test see a message that should not exist.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    settle: Duration,
    deadline: Duration,
) -> Result<Vec<OwnedMessage>, KafkaError> {
    let consumer = neruba_kafka::clients::topic_reader(
        bootstrap,
        "neruba-reader",
        topic,
        &[],
        Duration::from_secs(5),
    )?;
    let started = Instant::now();
    let mut last_message = Instant::now();
    let mut messages = Vec::new();
    while started.elapsed() < deadline {
        match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                messages.push(m.detach());
                last_message = Instant::now();
            }
            Some(Err(e)) => return Err(e),
            None => {
                if messages.len() >= expected && last_message.elapsed() >= settle {
                    break;
                }
            }
        }
    }
    messages.sort_by_key(|m| (m.partition(), m.offset()));
    Ok(messages)
}
