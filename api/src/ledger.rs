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
use neruba_balances::book::TOO_MANY_GRANTS;
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
            // A grant refused for the customer's bound is kept for its read until applied.
            match (entry.kind, entry.grant.as_deref(), entry.code.as_deref()) {
                (EntryKind::GrantRefused, Some(grant), Some(TOO_MANY_GRANTS)) => batch.put(
                    model::refusal_key(&entry.tenant, &entry.customer, grant),
                    credit::encode(entry.as_ref()),
                ),
                (EntryKind::Grant, Some(grant), _) => {
                    batch.delete(model::refusal_key(&entry.tenant, &entry.customer, grant));
                }
                _ => {}
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use neruba_balances::book::MAX_CREDIT_GRANTS;
    use neruba_schemas::credit::{Grant, GrantTerms};
    use neruba_schemas::event::format_time_ms;
    use rust_decimal::Decimal;

    fn grant(key: &str, amount: i64) -> Grant {
        Grant {
            v: credit::GRANT_RECORD_V,
            id: credit::grant_id("t", "c", key),
            tenant: "t".into(),
            customer: "c".into(),
            key: key.into(),
            terms: GrantTerms {
                amount: Decimal::from(amount),
                currency: "USD".into(),
                priority: 10,
                effective_at: None,
                expires_at: None,
                paid: None,
                metadata: std::collections::BTreeMap::new(),
            },
            received_at: format_time_ms(0),
        }
    }

    #[test]
    fn a_grant_refused_for_the_bound_reads_as_refused_until_it_is_applied() {
        // Was: a grant the balances stage refused after the gateway's 202 read as any unknown
        // grant, so support could not tell a refused purchase from a mistyped id.
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = rocksdb::Cache::new_lru_cache(1 << 20);
        let store = Store::open(
            dir.path(),
            0,
            &neruba_balances::state::store_options(),
            &cache,
        )
        .expect("store");
        let db = store.shared_db();
        let fold =
            PartitionState::from_store(store, 0, credit::DEFAULT_FINALIZE_AFTER_MS).expect("fold");
        let model = Arc::new(Model::new("ledger", 1));
        model.opened(0, db, None);
        let mut part = LedgerPartition {
            fold,
            items: Vec::new(),
            model: model.clone(),
        };
        let mut offset = 0;
        let mut apply = |part: &mut LedgerPartition, payload: Vec<u8>, record: Record| {
            let input = Input {
                offset,
                key: None,
                payload: &payload,
            };
            offset += 1;
            part.fold.apply(input, record).expect("apply");
        };
        for n in 0..MAX_CREDIT_GRANTS {
            apply(
                &mut part,
                credit::encode(&grant(&format!("g{n:04}"), 1)),
                Record::Grant,
            );
        }
        let extra = grant("extra", 5);
        apply(&mut part, credit::encode(&extra), Record::Grant);
        neruba_stage::Partition::commit(&mut part).expect("commit");
        let standing = |id: &str| model.grant_standing("t", "c", id).expect("read");
        let crate::model::GrantStanding::Refused(refusal) = standing(&extra.id) else {
            panic!("not refused: {:?}", standing(&extra.id));
        };
        assert_eq!(
            (refusal.kind, refusal.code.as_deref(), refusal.seq),
            (
                EntryKind::GrantRefused,
                Some(TOO_MANY_GRANTS),
                u64::try_from(MAX_CREDIT_GRANTS + 1).expect("small")
            )
        );
        let first = grant("g0000", 1);
        assert!(matches!(
            standing(&first.id),
            crate::model::GrantStanding::Held(_)
        ));
        assert_eq!(
            standing(&credit::grant_id("t", "c", "never-sent")),
            crate::model::GrantStanding::Unknown
        );

        // A grant used up makes room; the same request again is applied, and reads as a grant.
        let item = LineItem {
            v: 1,
            id: "li_1".into(),
            kind: neruba_schemas::ledger::Kind::Usage,
            tenant: "t".into(),
            customer: "c".into(),
            meter: "m".into(),
            group: std::collections::BTreeMap::new(),
            period_start: "2026-11-01T00:00:00.000Z".into(),
            period_end: "2026-12-01T00:00:00.000Z".into(),
            window_start: "2026-11-02T00:00:00.000Z".into(),
            window_end: "2026-11-02T00:01:00.000Z".into(),
            window_quantity: Decimal::ONE,
            window_events: 1,
            period_quantity: Decimal::ONE,
            amount: Decimal::ONE,
            period_amount: Decimal::ONE,
            currency: "USD".into(),
            price_plan: "p".into(),
            price_version: 1,
            revision: 1,
            supersedes: None,
        };
        apply(&mut part, item.encode(), Record::LineItem);
        apply(&mut part, credit::encode(&extra), Record::Grant);
        neruba_stage::Partition::commit(&mut part).expect("commit");
        let crate::model::GrantStanding::Held(applied) = standing(&extra.id) else {
            panic!("not applied: {:?}", standing(&extra.id));
        };
        assert_eq!(applied.remaining, Decimal::from(5));
    }
}
