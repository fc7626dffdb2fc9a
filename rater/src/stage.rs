//! The rater on the stage runtime: what one rollups-topic message does (a rollup is rated, a
//! rerun request re-prices its tenant's periods), how line items are written, and the metrics
//! of a batch. Polling, delivery before write, dead letters and offsets are the runtime's
//! ([`neruba_stage`]).

use crate::Result;
use crate::metrics::Metrics;
use crate::state::{Output, PartitionState, Retention};
use neruba_schemas::topics::RERUN_HEADER;
use neruba_schemas::{Catalog, LiveCatalog};
use neruba_stage::{Input, Sink, Store, StoreOptions};
use rdkafka::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::producer::DeliveryFuture;
use std::sync::Arc;
use std::time::Duration;

/// The rater's domain logic, one per worker.
pub(crate) struct Rater {
    pub(crate) catalog: LiveCatalog,
    pub(crate) metrics: Metrics,
    pub(crate) retention: Retention,
    pub(crate) ledger_topic: String,
    /// Kafka timestamps of the batch's rollups, for the close-to-item histogram.
    pub(crate) produced_at: Vec<i64>,
}

impl neruba_stage::Stage for Rater {
    const NAME: &'static str = "rater";
    const ASSIGNED_PARTITIONS_METRIC: &'static str = "neruba_rater_assigned_partitions";
    const CONSUMER_TUNING: &'static [(&'static str, &'static str)] = &[("fetch.wait.max.ms", "20")];
    const LINGER_MS: u32 = 2;
    /// Rollups are compacted on their keys: a revision replaces the one before.
    const INPUT_COMPACTED: bool = true;

    type Partition = PartitionState;
    type Output = Output;
    type Batch = Arc<Catalog>;

    fn store_options(&self) -> StoreOptions {
        crate::state::store_options(self.retention)
    }

    fn output_topic(&self) -> &str {
        &self.ledger_topic
    }

    fn open(&mut self, store: Store) -> Result<PartitionState> {
        PartitionState::from_store(store, self.retention)
    }

    fn begin_batch(&mut self) -> Arc<Catalog> {
        self.produced_at.clear();
        self.catalog.current()
    }

    fn apply(
        &mut self,
        live: &Arc<Catalog>,
        state: &mut PartitionState,
        message: &BorrowedMessage<'_>,
    ) -> Result<()> {
        // The catalog this message was priced under if it was sent before, else the live one.
        let catalog = &state.catalog_for(live, message.offset())?;
        let payload = message.payload().unwrap_or_default();
        let rerun = message
            .headers()
            .is_some_and(|h| h.iter().any(|h| h.key == RERUN_HEADER));
        // A rerun request closes no window (and is applied once per part).
        if !rerun {
            self.produced_at
                .push(message.timestamp().to_millis().unwrap_or_default());
        }
        if rerun {
            state.apply_rerun(message.offset(), payload, catalog)
        } else {
            state.apply(Input::of(message), catalog)
        }
    }

    fn before_handing(&mut self, state: &mut PartitionState) -> Result<()> {
        state.before_handing()
    }

    fn take_outputs(&mut self, state: &mut PartitionState) -> Vec<Output> {
        let counts = state.take_counts();
        self.metrics.rollups.inc_by(counts.rollups);
        self.metrics.repeats.inc_by(counts.repeats);
        self.metrics.reruns.inc_by(counts.reruns);
        self.metrics.past_retention.inc_by(counts.past_retention);
        for (kind, n) in counts.items {
            self.metrics.items.with_label_values(&[kind]).inc_by(n);
        }
        for (code, n) in counts.refused {
            self.metrics.refused.with_label_values(&[code]).inc_by(n);
        }
        state.take_outputs()
    }

    type Sender = ItemSender;

    fn sender(&self) -> ItemSender {
        ItemSender
    }

    fn delivered(&mut self) {
        let now = neruba_schemas::event::now_ms();
        for at in self.produced_at.drain(..) {
            let millis = u64::try_from((now - at).max(0)).unwrap_or(0);
            self.metrics
                .close_to_item
                .observe(Duration::from_millis(millis).as_secs_f64());
        }
    }
}

/// Enqueues line items on the ledger topic.
pub(crate) struct ItemSender;

impl neruba_stage::Sender<Output> for ItemSender {
    fn send(&self, sink: &Sink<'_>, output: &Output) -> Result<DeliveryFuture, KafkaError> {
        match output {
            Output::Item(item) => {
                let key = item.partition_key();
                sink.keyed(key.as_bytes(), &item.encode(), &key)
            }
            // The runtime writes dead letters.
            Output::Refused(_) => Err(KafkaError::Canceled),
        }
    }
}
