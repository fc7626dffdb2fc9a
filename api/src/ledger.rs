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

/// The read models' sender: they have no outputs to send.
pub(crate) struct SendsNothing;

impl neruba_stage::Sender<Nothing> for SendsNothing {
    fn send(&self, _sink: &Sink<'_>, output: &Nothing) -> Result<DeliveryFuture, KafkaError> {
        match *output {}
    }
}

impl AsDeadLetter for Nothing {
    fn dead_letter(&self) -> Option<&DeadLetter> {
        match *self {}
    }
}

/// One ledger partition of the read model: the balances fold, and the batch's line items
/// (with the mark of each item they supersede).
pub(crate) struct LedgerPartition {
    fold: PartitionState,
    items: Vec<(Vec<u8>, Vec<u8>)>,
    model: Arc<Model>,
    /// The ledger offset the stored `superseded` marks cover (as
    /// [`model::SUPERSEDED_INDEXED_KEY`] holds it).
    indexed: Option<i64>,
}

impl LedgerPartition {
    /// Folds a line item and, if the fold took it, keeps it for the batch's write with the
    /// mark of the item it supersedes.
    fn apply_line_item(&mut self, input: Input<'_>) -> Result<()> {
        // Decoded once, for the fold and the index.
        let decoded = credit::decode::<LineItem>(input.payload);
        if let Some(item) = self.fold.apply_line_item(input, decoded)? {
            if let Some(earlier) = &item.supersedes {
                let key = model::superseded_key(&item.tenant, &item.customer, earlier);
                self.items.push((key, item.id.as_bytes().to_vec()));
            }
            self.items
                .push((model::item_key(&item), input.payload.to_vec()));
        }
        Ok(())
    }
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
            // As on the entries topic: a statement too large to carry its lines there is kept
            // here without them too (the final statement below keeps them), so an entries
            // page stays as small as the topic's records and reads the same.
            let on_the_topic = neruba_balances::book::statements::on_the_topic(&entry);
            batch.put(
                model::entry_key(&entry),
                credit::encode(on_the_topic.as_ref()),
            );
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
                // Written once: a final statement never changes.
                let stored = model::stored_statement(&entry.tenant, &entry.customer, statement)
                    .map_err(|e| {
                        neruba_stage::Error::Bug(format!("final statement encoding: {e}"))
                    })?;
                for (key, value) in stored {
                    batch.put(key, value);
                }
            }
        }
        // The marks cover every record up to the offset this batch stores. Written only when
        // that moved: a batch with nothing in it writes nothing (an idle replica commits
        // every poll).
        let next = self.fold.next_offset();
        if next != self.indexed {
            batch.put(model::SUPERSEDED_INDEXED_KEY, model::indexed_through(next));
        }
        self.fold.take_counts();
        self.fold.commit_with(batch)?;
        self.indexed = next;
        if let Some(next) = next {
            self.model.advanced(self.fold.partition, next);
        }
        Ok(())
    }

    /// As the balances stage's: once the books the model's partitions hold pass its bound.
    fn batch_full(&self) -> bool {
        neruba_stage::Partition::batch_full(&self.fold)
    }

    /// As the balances stage's: after a tick that stopped partway at that bound.
    fn apply_again(&self) -> bool {
        neruba_stage::Partition::apply_again(&self.fold)
    }
}

/// The stage: what the runtime calls.
pub(crate) struct LedgerModel {
    pub(crate) model: Arc<Model>,
    /// The books its partitions hold, bounded together as a balances worker's are
    /// ([`crate::Config::books_held_bytes`]), and their gauge.
    pub(crate) books: neruba_balances::state::WorkerBooks,
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
        // A model some of whose items were applied without their `superseded` marks (kept from
        // before them, or by an older build since) gets them now.
        let indexed = store.next_offset();
        let marked = model::index_superseded(&db, indexed)?;
        if marked > 0 {
            tracing::info!(marked, "indexed the line items later ones supersede");
        }
        let fold = self.books.share(PartitionState::from_store(
            store,
            0,
            credit::DEFAULT_FINALIZE_AFTER_MS,
        )?);
        self.model.opened(fold.partition, db, fold.next_offset());
        Ok(LedgerPartition {
            fold,
            items: Vec::new(),
            model: self.model.clone(),
            indexed,
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
        state.apply_line_item(input)
    }

    fn take_outputs(&mut self, _state: &mut LedgerPartition) -> Vec<Nothing> {
        Vec::new()
    }

    type Sender = SendsNothing;

    fn sender(&self) -> SendsNothing {
        SendsNothing
    }

    fn worker_gauges(&self, _now_ms: i64) {
        self.books.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TestFold;
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

    /// A line item of 1 USD of customer `c` in November 2026, for `group`.
    fn usage_item(
        id: impl Into<String>,
        group: std::collections::BTreeMap<String, String>,
    ) -> LineItem {
        LineItem {
            v: 1,
            id: id.into(),
            kind: neruba_schemas::ledger::Kind::Usage,
            tenant: "t".into(),
            customer: "c".into(),
            meter: "m".into(),
            group,
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
        }
    }

    /// The read model's ledger stage over a fresh partition 0, and its model.
    fn partition(dir: &std::path::Path) -> (LedgerPartition, Arc<Model>) {
        let TestFold { fold, db, .. } = TestFold::open(dir);
        let model = Arc::new(Model::new("ledger", 1));
        model.opened(0, db, None);
        let part = LedgerPartition {
            fold,
            items: Vec::new(),
            model: model.clone(),
            indexed: None,
        };
        (part, model)
    }

    /// Items of customer `c` in November 2026 through the ledger stage, in two batches: windows
    /// 0–5 of a minute each (window 3's of meter `m2`), window 2 revised by a late event in
    /// the second batch, and a rerun of the period superseding its latest item (window 5).
    /// Returns the ids in key order and those superseded.
    fn superseding_items(part: &mut LedgerPartition) -> (Vec<String>, Vec<String>) {
        let minute = |n: i64| format_time_ms(1_793_577_600_000 + n * 60_000);
        let at = |id: &str, window: i64, supersedes: Option<&str>| {
            let mut item = usage_item(id, std::collections::BTreeMap::new());
            item.window_start = minute(window);
            item.window_end = minute(window + 1);
            item.supersedes = supersedes.map(str::to_owned);
            item
        };
        let items = [
            at("li_w0", 0, None),
            at("li_w1", 1, None),
            at("li_w2", 2, None),
            LineItem {
                meter: "m2".into(),
                ..at("li_w3", 3, None)
            },
            at("li_w2r", 2, Some("li_w2")),
            at("li_w4", 4, None),
            at("li_w5", 5, None),
            // A rerun's window is its period, so its key sorts first.
            LineItem {
                window_start: "2026-11-01T00:00:00.000Z".into(),
                window_end: "2026-12-01T00:00:00.000Z".into(),
                ..at("li_rerun", 0, Some("li_w5"))
            },
        ];
        for (offset, item) in (0..).zip(&items) {
            let payload = item.encode();
            let input = neruba_stage::Input {
                offset,
                key: None,
                payload: &payload,
            };
            part.apply_line_item(input).expect("apply");
            // The revision's mark in a later batch than the item it marks.
            if item.id == "li_w3" {
                neruba_stage::Partition::commit(part).expect("commit");
            }
        }
        neruba_stage::Partition::commit(part).expect("commit");
        let order = [
            "li_rerun", "li_w0", "li_w1", "li_w2", "li_w2r", "li_w3", "li_w4", "li_w5",
        ];
        let superseded = ["li_w2", "li_w5"];
        (
            order.map(str::to_owned).to_vec(),
            superseded.map(str::to_owned).to_vec(),
        )
    }

    /// Every page of the period (of `meter` alone, if given), `limit` at a time, following
    /// each page's `next`; and how many pages it took.
    fn walk_of(
        model: &Model,
        meter: Option<&str>,
        limit: usize,
    ) -> (Vec<crate::model::ItemRead>, usize) {
        let (mut all, mut pages) = (Vec::new(), 0);
        let mut after: Option<String> = None;
        loop {
            let page = model
                .line_items_page("t", "c", "2026-11", meter, after.as_deref(), limit)
                .expect("page");
            pages += 1;
            assert!(page.items.len() <= limit);
            all.extend(page.items);
            match page.next {
                Some(next) => after = Some(next),
                None => return (all, pages),
            }
        }
    }

    /// Every page of the period, `limit` at a time, following the cursor.
    fn walk(model: &Model, limit: usize) -> Vec<crate::model::ItemRead> {
        walk_of(model, None, limit).0
    }

    #[test]
    fn line_item_pages_seek_to_their_cursor_and_mark_items_superseded_anywhere_in_the_period() {
        // Was: each page (and each explanation) decoded every item of the period, then
        // skipped to its cursor: walking a long period was quadratic. Shown by a broken value
        // stored before the cursor, which a page after it no longer reads.
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut part, model) = partition(dir.path());
        let (order, superseded) = superseding_items(&mut part);
        for limit in [1, 2, 3, 8, 100] {
            let read = walk(&model, limit);
            let ids: Vec<&str> = read.iter().map(|r| r.item.id.as_str()).collect();
            assert_eq!(ids, order, "limit {limit}");
            let marked: Vec<&str> = read
                .iter()
                .filter(|r| r.superseded)
                .map(|r| r.item.id.as_str())
                .collect();
            assert_eq!(marked, superseded, "limit {limit}");
        }
        // Of one meter, a page at a time: the other meter's item is passed over.
        let want: Vec<&str> = order
            .iter()
            .map(String::as_str)
            .filter(|id| *id != "li_w3")
            .collect();
        let (of_m, _) = walk_of(&model, Some("m"), 2);
        let ids: Vec<&str> = of_m.iter().map(|r| r.item.id.as_str()).collect();
        assert_eq!(ids, want);
        // A page looks at a bounded number of items: past it, it ends short with where the
        // next goes on, and following each page still gives every item once, in order. Was:
        // a `meter` few items have made one page decode every item of the period after it.
        for (most, limit) in [(1, 1), (1, 2), (2, 2), (3, 100), (2, 100)] {
            crate::model::ITEMS_EXAMINED_IN_TESTS.with(|m| m.set(Some(most)));
            let (of_m, pages) = walk_of(&model, Some("m"), limit);
            let ids: Vec<&str> = of_m.iter().map(|r| r.item.id.as_str()).collect();
            assert_eq!(ids, want, "looking at {most}, pages of {limit}");
            // Eight items, `most` looked at a page (one more page says there is nothing more).
            assert!(
                pages >= order.len().div_ceil(most),
                "{most}, {limit}: {pages} pages"
            );
            assert_eq!(walk(&model, limit).len(), order.len());
        }
        crate::model::ITEMS_EXAMINED_IN_TESTS.with(|m| m.set(None));
        // The other meter's one item, the sixth of eight, looking at three a page: the first
        // page is empty and says where the next goes on, the second holds it.
        crate::model::ITEMS_EXAMINED_IN_TESTS.with(|m| m.set(Some(3)));
        let first = model
            .line_items_page("t", "c", "2026-11", Some("m2"), None, 10)
            .expect("page");
        let second = model
            .line_items_page("t", "c", "2026-11", Some("m2"), first.next.as_deref(), 10)
            .expect("page");
        crate::model::ITEMS_EXAMINED_IN_TESTS.with(|m| m.set(None));
        assert!(first.items.is_empty() && first.next.is_some(), "{first:?}");
        let ids: Vec<&str> = second.items.iter().map(|r| r.item.id.as_str()).collect();
        assert_eq!(ids, ["li_w3"]);
        assert!(second.next.is_some(), "{second:?}");
        // A place no item of the period can have is refused, not answered from elsewhere.
        let december = "2026-12-05T00:00:00.000Z\n2026-12-05T00:00:00.000Z\nli_x";
        for forged in [december, "2026-11-02\n2026-11-02\nli_x", "li_w0"] {
            let page = model.line_items_page("t", "c", "2026-11", None, Some(forged), 2);
            assert!(
                matches!(page, Err(crate::model::ReadError::InvalidCursor(_))),
                "{forged:?}: {page:?}"
            );
        }
        let explained = |id: &str| {
            model
                .line_item("t", "c", "2026-11", id)
                .expect("read")
                .map(|r| (r.item.id, r.superseded))
        };
        assert_eq!(explained("li_w5"), Some(("li_w5".to_owned(), true)));
        assert_eq!(explained("li_w4"), Some(("li_w4".to_owned(), false)));
        assert_eq!(explained("li_w9"), None);
        assert_eq!(
            model.line_item("t", "c", "2026-12", "li_w4").expect("read"),
            None
        );

        // Break the stored value of the period's first item (the rerun's): a page after the
        // next window's item and an item explained elsewhere in the period never read it.
        let db = model.db_of("t", "c").expect("db");
        let read = walk(&model, 100);
        let item = |id: &str| {
            read.iter()
                .find(|r| r.item.id == id)
                .map(|r| r.item.clone())
                .expect("an item")
        };
        db.put(crate::model::item_key(&item("li_rerun")), b"not JSON")
            .expect("put");
        let after = crate::model::item_place(&item("li_w0"));
        let page = model
            .line_items_page("t", "c", "2026-11", None, Some(&after), 2)
            .expect("a page after the broken item");
        let ids: Vec<&str> = page.items.iter().map(|r| r.item.id.as_str()).collect();
        assert_eq!(ids, ["li_w1", "li_w2"]);
        assert_eq!(explained("li_w5"), Some(("li_w5".to_owned(), true)));
    }

    #[test]
    fn pages_follow_the_order_items_are_stored_in_whatever_the_lengths_of_their_ids() {
        // Was: a page started past its cursor's place as text, where items are stored by
        // key, which sorts a shorter id first: after `li_9`, `li_10` was never read.
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut part, model) = partition(dir.path());
        for (offset, id) in (0..).zip(["li_9", "li_10", "li_100"]) {
            let payload = usage_item(id, std::collections::BTreeMap::new()).encode();
            let input = neruba_stage::Input {
                offset,
                key: None,
                payload: &payload,
            };
            part.apply_line_item(input).expect("apply");
        }
        neruba_stage::Partition::commit(&mut part).expect("commit");
        let ids: Vec<String> = walk(&model, 1).into_iter().map(|r| r.item.id).collect();
        assert_eq!(ids, ["li_9", "li_10", "li_100"]);
        let forged = model.line_items_page("t", "c", "2026-11", None, Some("li_9"), 1);
        assert!(
            matches!(forged, Err(crate::model::ReadError::InvalidCursor(_))),
            "{forged:?}"
        );
    }

    #[test]
    fn a_commit_with_nothing_applied_writes_nothing() {
        // Was (for one commit's time): the marks' offset was written with every commit, so an
        // idle replica wrote to every ledger partition's store at each poll.
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut part, model) = partition(dir.path());
        superseding_items(&mut part);
        let db = model.db_of("t", "c").expect("db");
        let written = db.latest_sequence_number();
        neruba_stage::Partition::commit(&mut part).expect("commit");
        neruba_stage::Partition::commit(&mut part).expect("commit");
        assert_eq!(db.latest_sequence_number(), written);
    }

    #[test]
    fn a_model_kept_from_before_the_superseded_marks_gets_them_when_it_opens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut part, model) = partition(dir.path());
        let (order, superseded) = superseding_items(&mut part);
        let db = model.db_of("t", "c").expect("db");
        let unmark = || {
            for id in &superseded {
                db.delete(crate::model::superseded_key("t", "c", id))
                    .expect("delete");
            }
        };
        let next = part.fold.next_offset();
        assert_eq!(next, Some(8));
        // Written by this build: the marks cover the store's records, nothing is read again.
        assert_eq!(crate::model::index_superseded(&db, next).expect("index"), 0);
        // As a model written before the marks: no `P` keys, no sign they were written.
        unmark();
        db.delete(crate::model::SUPERSEDED_INDEXED_KEY)
            .expect("delete");
        assert!(walk(&model, 100).iter().all(|r| !r.superseded));
        assert_eq!(crate::model::index_superseded(&db, next).expect("index"), 2);
        let read = walk(&model, 3);
        let ids: Vec<&str> = read.iter().map(|r| r.item.id.as_str()).collect();
        assert_eq!(ids, order);
        let marked: Vec<&str> = read
            .iter()
            .filter(|r| r.superseded)
            .map(|r| r.item.id.as_str())
            .collect();
        assert_eq!(marked, superseded);
        // Once indexed, an open reads nothing again.
        assert_eq!(crate::model::index_superseded(&db, next).expect("index"), 0);
        // An older build ran in between (rolled back, then forward): it applied a record past
        // the marks, so they are built again (was: never, once written).
        unmark();
        assert!(walk(&model, 100).iter().all(|r| !r.superseded));
        assert_eq!(
            crate::model::index_superseded(&db, Some(9)).expect("index"),
            2
        );
        let marked: Vec<String> = walk(&model, 100)
            .into_iter()
            .filter(|r| r.superseded)
            .map(|r| r.item.id)
            .collect();
        assert_eq!(marked, superseded);
        assert_eq!(
            crate::model::index_superseded(&db, Some(9)).expect("index"),
            0
        );
    }

    #[test]
    fn a_grant_refused_for_the_bound_reads_as_refused_until_it_is_applied() {
        // Was: a grant the balances stage refused after the gateway's 202 read as any unknown
        // grant, so support could not tell a refused purchase from a mistyped id.
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut part, model) = partition(dir.path());
        let mut offset = 0;
        let mut apply = |part: &mut LedgerPartition, payload: Vec<u8>, record: Record| {
            TestFold::apply_to(&mut part.fold, &mut offset, &payload, record);
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
        let item = usage_item("li_1", std::collections::BTreeMap::new());
        apply(&mut part, item.encode(), Record::LineItem);
        apply(&mut part, credit::encode(&extra), Record::Grant);
        neruba_stage::Partition::commit(&mut part).expect("commit");
        let crate::model::GrantStanding::Held(applied) = standing(&extra.id) else {
            panic!("not applied: {:?}", standing(&extra.id));
        };
        assert_eq!(applied.remaining, Decimal::from(5));
    }

    #[test]
    fn an_entry_too_large_for_the_topic_reads_as_on_the_topic_and_the_statement_keeps_its_lines() {
        // Was: the api kept a statement entry whole though the balances stage wrote it without
        // its lines (`statement_lines_omitted`), so the entries read answered what the topic
        // does not hold, as large as the statement, under a code saying the lines were left out.
        use neruba_balances::book::statements::{LINES_OMITTED, STATEMENT_ENTRY_MAX};
        use neruba_schemas::credit::{DEFAULT_FINALIZE_AFTER_MS, StatementStatus, Tick};
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut part, model) = partition(dir.path());
        let mut offset = 0;
        let mut apply = |part: &mut LedgerPartition, payload: Vec<u8>, record: Record| {
            TestFold::apply_to(&mut part.fold, &mut offset, &payload, record);
        };
        // 40 groups of 16 KiB values: a statement of more than 512 KiB of JSON.
        let groups = 40;
        let value = |n: usize| format!("{n:02}{}", "x".repeat(16 << 10));
        for n in 0..groups {
            let item = usage_item(format!("li_{n}"), [("project".to_owned(), value(n))].into());
            apply(&mut part, item.encode(), Record::LineItem);
        }
        // The period ends, then its statement is final.
        let period_end =
            neruba_schemas::event::parse_time_ms("2026-12-01T00:00:00Z").expect("time");
        for at_ms in [period_end + 1, period_end + DEFAULT_FINALIZE_AFTER_MS + 1] {
            let tick = Tick {
                v: 1,
                at_ms,
                finalize_after_ms: Some(DEFAULT_FINALIZE_AFTER_MS),
            };
            apply(&mut part, credit::encode(&tick), Record::Tick);
        }
        neruba_stage::Partition::commit(&mut part).expect("commit");

        let entries = model.entries("t", "c", 0, 1000).expect("entries");
        let statements: Vec<_> = entries
            .iter()
            .filter_map(|e| e.statement.as_ref().map(|s| (e.kind, e.code.as_deref(), s)))
            .collect();
        assert_eq!(
            statements.len(),
            2,
            "{:?}",
            entries.iter().map(|e| e.kind).collect::<Vec<_>>()
        );
        for (kind, code, statement) in &statements {
            assert_eq!(*code, Some(LINES_OMITTED), "{kind:?}");
            assert!(statement.lines.is_empty(), "{kind:?}");
            assert_eq!(statement.usage, Decimal::from(groups));
        }
        assert_eq!(
            (statements[0].0, statements[1].0),
            (EntryKind::StatementDraft, EntryKind::StatementFinal)
        );
        // Each entry as kept is within what the topic carries.
        for entry in &entries {
            assert!(credit::encode(entry).len() <= STATEMENT_ENTRY_MAX + 4096);
        }
        // The final statement keeps every line, in runs apart from it.
        let (read, _) = model
            .statements("t", "c", "2026-11", |read| {
                let [(statement, Some([lines, _]))] = read.statements.as_slice() else {
                    panic!("one statement, its lines kept apart");
                };
                assert_eq!(statement.status, StatementStatus::Final);
                assert!(statement.lines.is_empty());
                lines.read(None, usize::MAX).expect("lines")
            })
            .expect("read");
        let lines = read.expect("the customer");
        let lines: Vec<&str> = lines.iter().map(|l| l.group["project"].as_str()).collect();
        let want: Vec<String> = (0..groups).map(value).collect();
        assert_eq!(lines, want.iter().map(String::as_str).collect::<Vec<_>>());
    }
}
