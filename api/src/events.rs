//! Reading one's own events: how far the aggregators have folded the events topic, so that a
//! usage read with `min_position=<events topic>:<partition>:<offset>` (what `POST /v1/events`
//! answered in `positions`) is answered only once the usage model holds every rollup the
//! aggregators produced from the events up to that offset.
//!
//! Invariants:
//! - the aggregators' consumer group commits an events partition's offset only after the
//!   batch's outputs (rollups, dead letters) were acknowledged by the broker and its state
//!   written (the stage worker's order: outputs acknowledged → state written → group commit);
//!   so once the group's committed offset is past an event, every rollup that event caused is
//!   on the rollups topic;
//! - those rollups are then below each rollups partition's high watermark read after the
//!   commit was seen, so a usage model that has read every rollups partition up to those
//!   watermarks holds them;
//! - usage answers closed windows: an event whose window is still open appears once that
//!   window closes. Waiting for its position guarantees that the aggregator has the event and
//!   that any revision of a closed window it caused (a late event) is readable, not that an
//!   open window shows it;
//! - this replica never joins or commits for the aggregators' group
//!   ([`neruba_kafka::clients::group_offsets_reader`]);
//! - one client serves every request, made at the first events position; its calls block, so
//!   they run on a blocking thread, each within a short timeout and the read's own bound.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;

/// Longest one call to the broker may take (the read's own bound may cut it shorter).
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the broker could not say how far the aggregators are.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unanswered {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic `{0}` has no partitions")]
    NoPartitions(String),
    #[error("blocking task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What the aggregators have folded, as the broker tells it.
#[derive(Debug)]
pub(crate) struct EventsProgress {
    /// The events topic: positions on it are waited for here.
    topic: String,
    /// The aggregators' consumer group, whose committed offsets are read.
    group_id: String,
    /// The topic the aggregators write rollups to (the usage model's input).
    rollups_topic: String,
    brokers: String,
    kafka_options: Vec<(String, String)>,
    /// Made at the first events position, then shared; not made again once it exists.
    client: OnceCell<Arc<Client>>,
}

/// The client and the events topic's partition count, learned when it was made.
struct Client {
    consumer: BaseConsumer,
    partitions: i32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl EventsProgress {
    pub(crate) fn new(
        topic: &str,
        group_id: &str,
        rollups_topic: &str,
        brokers: &str,
        kafka_options: &[(String, String)],
    ) -> Self {
        Self {
            topic: topic.to_owned(),
            group_id: group_id.to_owned(),
            rollups_topic: rollups_topic.to_owned(),
            brokers: brokers.to_owned(),
            kafka_options: kafka_options.to_vec(),
            client: OnceCell::new(),
        }
    }

    /// The events topic.
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// The events topic's partition count.
    pub(crate) async fn partitions(&self, timeout: Duration) -> Result<i32, Unanswered> {
        Ok(self.client(timeout).await?.partitions)
    }

    async fn client(&self, timeout: Duration) -> Result<Arc<Client>, Unanswered> {
        let client = self
            .client
            .get_or_try_init(|| async {
                let (brokers, group_id, options, topic) = (
                    self.brokers.clone(),
                    self.group_id.clone(),
                    self.kafka_options.clone(),
                    self.topic.clone(),
                );
                tokio::task::spawn_blocking(move || -> Result<_, Unanswered> {
                    let consumer =
                        neruba_kafka::clients::group_offsets_reader(&brokers, &group_id, &options)?;
                    let metadata =
                        consumer.fetch_metadata(Some(&topic), timeout.min(CALL_TIMEOUT))?;
                    let partitions = metadata
                        .topics()
                        .first()
                        .filter(|t| t.error().is_none())
                        .map_or(0, |t| t.partitions().len());
                    let partitions = i32::try_from(partitions)
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or(Unanswered::NoPartitions(topic))?;
                    Ok(Arc::new(Client {
                        consumer,
                        partitions,
                    }))
                })
                .await?
            })
            .await?;
        Ok(client.clone())
    }

    /// The aggregators' committed offset (the next offset they will fold) of each of
    /// `partitions` that has one.
    pub(crate) async fn committed(
        &self,
        partitions: Vec<i32>,
        timeout: Duration,
    ) -> Result<BTreeMap<i32, i64>, Unanswered> {
        let client = self.client(timeout).await?;
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            let mut list = TopicPartitionList::new();
            for partition in partitions {
                list.add_partition(&topic, partition);
            }
            let committed = client
                .consumer
                .committed_offsets(list, timeout.min(CALL_TIMEOUT))?;
            Ok(committed
                .elements()
                .iter()
                .filter_map(|element| match element.offset() {
                    Offset::Offset(offset) => Some((element.partition(), offset)),
                    _ => None,
                })
                .collect())
        })
        .await?
    }

    /// The high watermark (the offset the next record will get) of every one of the rollups
    /// topic's `partitions`.
    pub(crate) async fn rollups_ends(
        &self,
        partitions: i32,
        timeout: Duration,
    ) -> Result<Vec<(i32, i64)>, Unanswered> {
        let client = self.client(timeout).await?;
        let topic = self.rollups_topic.clone();
        tokio::task::spawn_blocking(move || {
            (0..partitions)
                .map(|partition| {
                    let (_, high) = client.consumer.fetch_watermarks(
                        &topic,
                        partition,
                        timeout.min(CALL_TIMEOUT),
                    )?;
                    Ok((partition, high))
                })
                .collect()
        })
        .await?
    }
}
