//! The consumer-group side of a stage that keeps its state per partition (the aggregator and
//! the rater): what happens when the group moves partitions.
//!
//! Invariants:
//! - an assigned partition resumes at the offset stored with its state, not at the group's
//!   committed offset;
//! - a revoked partition's pending batch is delivered and written before it is let go (unless
//!   the stage is being killed, as a crash would), so the next owner resumes exactly there;
//! - a failure inside the callback is handed to the stage ([`PartitionStates::fail`]) for its
//!   loop to raise: librdkafka's callback cannot return one.

use crate::health::ConsumerHealth;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Who a stateful stage's consumer is.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    pub brokers: &'a str,
    pub group_id: &'a str,
    pub client_id: &'a str,
    /// Static membership (`group.instance.id`).
    pub instance_id: Option<&'a str>,
}

/// Creates the consumer of a stage that keeps its state per partition. Every librdkafka
/// setting such a stage relies on is here; `tuning` adds the stage's own, and the operator's
/// pass-through `kafka_options` come last.
pub fn consumer<S: PartitionStates>(
    member: Member<'_>,
    tuning: &[(&str, &str)],
    kafka_options: &[(String, String)],
    context: Rebalance<S>,
) -> Result<BaseConsumer<Rebalance<S>>, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", member.brokers)
        .set("group.id", member.group_id)
        .set("client.id", member.client_id)
        // Offsets live in RocksDB with the state; the group's offsets are only for lag graphs.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Eager rebalancing: a revoked partition's batch is written before anyone else reads it.
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // When the local queue is full (the stage is the slower side, as it is under load),
        // librdkafka postpones the next fetch by this much: at its default of 1 s the queue
        // then runs dry and the stage waits (it halved the aggregator's throughput).
        .set("fetch.queue.backoff.ms", "10")
        // Statistics feed the lag gauges and the stuck check (partition high watermarks).
        .set("statistics.interval.ms", "1000");
    if let Some(instance) = member.instance_id {
        // Static membership: a restarted pod that is back within the session timeout gets its
        // partitions again without a rebalance, so the timeout covers a pod restart.
        client
            .set("group.instance.id", instance)
            .set("session.timeout.ms", "45000");
    }
    for (key, value) in tuning {
        client.set(*key, *value);
    }
    for (key, value) in kafka_options {
        client.set(key, value);
    }
    client.create_with_context(context)
}

/// Opens a partition's state with `open`, retrying for up to 5 s while `locked` says the
/// previous owner (another instance on the same volume) still holds its database: waiting
/// briefly beats replaying the partition from scratch.
pub fn open_when_released<T, E>(
    mut open: impl FnMut() -> Result<T, E>,
    locked: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let mut attempt = 0;
    loop {
        match open() {
            Err(e) if attempt < 50 && locked(&e) => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            opened => return opened,
        }
    }
}

/// A stage's per-partition state, as the rebalance callback sees it.
pub trait PartitionStates: Send + Sized + 'static {
    type Error: From<KafkaError> + std::fmt::Display;

    /// Opens the state of `partition`; the next offset to consume, `None` when nothing was
    /// ever applied.
    fn open(&mut self, partition: i32) -> Result<Option<i64>, Self::Error>;

    /// Delivers the pending batch's outputs and writes its state.
    fn finish(&mut self, consumer: &BaseConsumer<Rebalance<Self>>) -> Result<(), Self::Error>;

    /// Drops the state of a revoked partition (already written).
    fn release(&mut self, partition: i32);

    /// Called after the owned partitions changed (for metrics).
    fn owned_changed(&mut self) {}

    /// Keeps a failure for the consumer loop to raise.
    fn fail(&mut self, error: Self::Error);
}

/// The consumer context of such a stage: opens state on assignment, writes it on revocation,
/// and feeds librdkafka's statistics to the lag gauges.
pub struct Rebalance<S> {
    states: Arc<Mutex<S>>,
    topic: String,
    kill: Arc<AtomicBool>,
    health: Arc<ConsumerHealth>,
}

impl<S> Rebalance<S> {
    /// `kill` set means the stage is dying as a crash would: revoked batches are not written.
    pub fn new(
        states: Arc<Mutex<S>>,
        topic: impl Into<String>,
        kill: Arc<AtomicBool>,
        health: Arc<ConsumerHealth>,
    ) -> Self {
        Self {
            states,
            topic: topic.into(),
            kill,
            health,
        }
    }
}

impl<S: PartitionStates> Rebalance<S> {
    /// Static assignment, without group coordination: opens the state of the partitions
    /// `choose` picks out of the topic's partition count, and assigns each at its stored
    /// offset.
    pub fn assign_static(
        consumer: &BaseConsumer<Self>,
        choose: impl FnOnce(i32) -> Vec<i32>,
    ) -> Result<(), S::Error> {
        let context = consumer.context();
        let metadata = consumer.fetch_metadata(Some(&context.topic), Duration::from_secs(10))?;
        let count = metadata
            .topics()
            .first()
            .map_or(0, |t| i32::try_from(t.partitions().len()).unwrap_or(0));
        let mut tpl = TopicPartitionList::new();
        // Nothing else runs yet, so nothing can have poisoned the lock.
        let mut states = context
            .states
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for partition in choose(count) {
            let resume = states.open(partition)?;
            let resume = resume.map_or(Offset::Beginning, Offset::Offset);
            tpl.add_partition_offset(&context.topic, partition, resume)?;
        }
        states.owned_changed();
        drop(states);
        consumer.assign(&tpl)?;
        Ok(())
    }
}

impl<S> std::fmt::Debug for Rebalance<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebalance")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl<S: PartitionStates> ClientContext for Rebalance<S> {
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.health.record_statistics(&statistics);
    }
}

impl<S: PartitionStates> ConsumerContext for Rebalance<S> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let Ok(mut states) = self.states.lock() else {
            return;
        };
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<i32> = tpl
                    .elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                for partition in partitions {
                    let resume = match states.open(partition) {
                        Ok(next) => next.map_or(Offset::Beginning, Offset::Offset),
                        Err(e) => {
                            tracing::error!(partition, error = %e, "Cannot open partition state.");
                            states.fail(e);
                            Offset::Beginning
                        }
                    };
                    if let Err(e) = tpl.set_partition_offset(&self.topic, partition, resume) {
                        states.fail(e.into());
                    }
                }
                tracing::info!(assigned = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(), "Partitions assigned.");
                states.owned_changed();
                if let Err(e) = consumer.assign(tpl) {
                    states.fail(e.into());
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if !self.kill.load(Ordering::SeqCst)
                    && let Err(e) = states.finish(consumer)
                {
                    tracing::error!(error = %e, "Could not write state of revoked partitions.");
                    states.fail(e);
                }
                let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                for partition in &revoked {
                    states.release(*partition);
                    self.health.forget(*partition);
                }
                tracing::info!(?revoked, "Partitions revoked.");
                states.owned_changed();
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "Unassign failed.");
                }
            }
            other => tracing::error!(error = ?other, "Rebalance error."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::open_when_released;

    #[test]
    fn opening_waits_out_a_held_lock_but_not_other_errors() {
        let mut calls = 0;
        let opened = open_when_released(
            || {
                calls += 1;
                if calls < 3 {
                    Err("lock held")
                } else {
                    Ok(calls)
                }
            },
            |e| *e == "lock held",
        );
        assert_eq!(opened, Ok(3));

        let mut calls = 0;
        let failed: Result<(), &str> = open_when_released(
            || {
                calls += 1;
                Err("corrupt")
            },
            |e| *e == "lock held",
        );
        assert_eq!((failed, calls), (Err("corrupt"), 1));
    }
}
