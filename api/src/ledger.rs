//! The ledger stage of the read model, on the shared stage runtime: every ledger partition
//! (a static assignment: each replica reads them all), folded exactly as the balances stage
//! folds them ([`neruba_balances::state`]), plus the read model's own keys.
//!
//! Invariants:
//! - the fold is the balances stage's own code, so the books, statements and entries read
//!   here are the ones the balances stage derives from the same records (the fold is a
//!   function of the partition's records alone), without waiting for its output topic;
//! - this stage writes nothing to Kafka: no ticks (the balances stage writes those, and they
//!   reach here as records), no entries, no dead letters (the balances stage dead-letters the
//!   same records);
//! - each batch's entries, line items and final statements are written in the same atomic
//!   write as the fold and the offset; the model's position moves only after that write.

use crate::model::{self, Model};
use neruba_balances::state::{Output, PartitionState, Record};
use neruba_schemas::credit::{self, EntryKind};
use neruba_schemas::ledger::LineItem;
use neruba_schemas::topics::RECORD_HEADER;
use neruba_stage::{AsDeadLetter, DeadLetter, Input, Result, Sink, Store, StoreOptions};
use rdkafka::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::producer::DeliveryFuture;
use rocksdb::WriteBatch;
use std::sync::Arc;

/// The read model's stage: no outputs.
#[derive(Debug)]
pub(crate) enum Nothing {}

impl AsDeadLetter for Nothing {
    fn dead_letter(&self) -> Option<&DeadLetter> {
        match *self {}
    }
}

/// One ledger partition of the read model: the balances fold, and the batch's line items.
pub(crate) struct LedgerPartition {
    fold: PartitionState,
    items: Vec<(Vec<u8>, Vec<u8>)>,
    model: Arc<Model>,
}

impl neruba_stage::Partition for LedgerPartition {
    fn store(&self) -> &Store {
        neruba_stage::Partition::store(&self.fold)
    }

    fn commit(&mut self) -> Result<()> {
        let mut batch = WriteBatch::default();
        for (key, value) in self.items.drain(..) {
            batch.put(key, value);
        }
        for output in self.fold.take_outputs() {
            let Output::Entry(entry) = output else {
                continue;
            };
            batch.put(model::entry_key(&entry), credit::encode(entry.as_ref()));
            if entry.kind == EntryKind::StatementFinal
                && let Some(statement) = &entry.statement
            {
                batch.put(
                    model::statement_key(&entry.tenant, &entry.customer, statement),
                    credit::encode(statement.as_ref()),
                );
            }
        }
        self.fold.take_counts();
        self.fold.commit_with(batch)?;
        if let Some(next) = self.fold.next_offset() {
            self.model.advanced(self.fold.partition, next);
        }
        Ok(())
    }
}

/// The stage: what the runtime calls.
pub(crate) struct LedgerModel {
    pub(crate) model: Arc<Model>,
}

impl neruba_stage::Stage for LedgerModel {
    const NAME: &'static str = "api";
    const ASSIGNED_PARTITIONS_METRIC: &'static str = "neruba_api_assigned_partitions";
    const CONSUMER_TUNING: &'static [(&'static str, &'static str)] = &[("fetch.wait.max.ms", "20")];
    const LINGER_MS: u32 = 0;

    type Partition = LedgerPartition;
    type Output = Nothing;
    type Batch = ();

    fn store_options(&self) -> StoreOptions {
        neruba_balances::state::store_options()
    }

    fn output_topic(&self) -> &str {
        // Nothing is produced; the runtime wants a topic that exists.
        self.model.topic()
    }

    fn open(&mut self, store: Store) -> Result<LedgerPartition> {
        let db = store.shared_db();
        let fold = PartitionState::from_store(store, 0, credit::DEFAULT_FINALIZE_AFTER_MS)?;
        self.model.opened(fold.partition, db, fold.next_offset());
        Ok(LedgerPartition {
            fold,
            items: Vec::new(),
            model: self.model.clone(),
        })
    }

    fn begin_batch(&mut self) {}

    fn apply(
        &mut self,
        _batch: &(),
        state: &mut LedgerPartition,
        message: &BorrowedMessage<'_>,
    ) -> Result<()> {
        let header = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == RECORD_HEADER))
            .map(|h| h.value.unwrap_or_default());
        let record = Record::of(header);
        let input = Input::of(message);
        if record != Record::LineItem {
            return state.fold.apply(input, record);
        }
        // Decoded once, for the fold and the index; indexed only if the fold took it.
        let decoded = credit::decode::<LineItem>(input.payload);
        if let Some(item) = state.fold.apply_line_item(input, decoded)? {
            state
                .items
                .push((model::item_key(&item), input.payload.to_vec()));
        }
        Ok(())
    }

    fn take_outputs(&mut self, _state: &mut LedgerPartition) -> Vec<Nothing> {
        Vec::new()
    }

    fn send(&self, _sink: &Sink<'_>, output: &Nothing) -> Result<DeliveryFuture, KafkaError> {
        match *output {}
    }
}
