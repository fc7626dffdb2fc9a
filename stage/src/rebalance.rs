//! The consumer-group side of a stage: what happens when the group moves partitions.
//!
//! Invariants:
//! - an assigned partition resumes at the offset stored with its state, not at the group's
//!   committed offset;
//! - a revoked partition's pending batch is delivered and written before it is let go (unless
//!   the stage is being killed, as a crash would, or its worker failed or ended, which writes
//!   nothing more), so the next owner resumes exactly there, or from the last write;
//! - a failure inside the callback is handed to the stage ([`PartitionStates::fail`]) for its
//!   loop to raise: librdkafka's callback cannot return one.

use crate::ConsumerHealth;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A stage's per-partition state, as the rebalance callback sees it.
pub(crate) trait PartitionStates: Send + Sized + 'static {
    type Error: From<KafkaError> + std::fmt::Display;

    /// Opens the state of `partition`; the next offset to consume, `None` when nothing was
    /// ever applied.
    fn open(&mut self, partition: i32) -> Result<Option<i64>, Self::Error>;

    /// Delivers the pending batch's outputs and writes its state (nothing once the worker
    /// failed or ended, nor when a kill cut its outputs short).
    fn finish(&mut self, consumer: &BaseConsumer<Rebalance<Self>>) -> Result<(), Self::Error>;

    /// Drops the state of a revoked partition (written by [`Self::finish`], unless its worker
    /// failed or ended: the next owner then resumes from the last write).
    fn release(&mut self, partition: i32);

    /// Called after the owned partitions changed (for metrics).
    fn owned_changed(&mut self) {}

    /// Keeps a failure for the consumer loop to raise.
    fn fail(&mut self, error: Self::Error);
}

/// The consumer context of such a stage: opens state on assignment, writes it on revocation,
/// and feeds librdkafka's statistics to the lag gauges.
pub(crate) struct Rebalance<S> {
    states: Arc<Mutex<S>>,
    topic: String,
    kill: Arc<AtomicBool>,
    health: Arc<ConsumerHealth>,
}

impl<S> Rebalance<S> {
    /// `kill` set means the stage is dying as a crash would: revoked batches are not written.
    pub(crate) fn new(
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
    pub(crate) fn assign_static(
        consumer: &BaseConsumer<Self>,
        choose: impl FnOnce(i32) -> Vec<i32>,
    ) -> Result<(), S::Error> {
        let context = consumer.context();
        // A topic the broker reports an error for is an error here, not zero partitions: a
        // stage assigned none would idle and still answer ready.
        let count = neruba_kafka::topic_partitions(
            consumer.client(),
            &context.topic,
            Duration::from_secs(30),
        )?;
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
