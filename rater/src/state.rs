//! One rollups partition's rating state in RocksDB.
//!
//! Invariants (after any crash, at any moment):
//! - the period records (amount emitted so far), the window records (latest revision rated)
//!   and the next offset to consume change in one `WriteBatch`;
//! - a batch's line items are handed to the caller before the batch is written and the caller
//!   writes only once the broker acknowledged them, so a crash re-emits identical items (same
//!   ids, same content: rating is deterministic), never fewer;
//! - a message is priced again under the catalog it was first priced under, whatever catalog
//!   the rater runs with now: each catalog the partition priced under is kept with the offset
//!   it was first used at, written before anything priced under it is handed for delivery,
//!   and so is the last offset handed ([`PartitionState::catalog_for`]). A reload, or a
//!   restart with a changed file, between a batch's delivery and its write cannot make the
//!   replay send the same window again with another amount or under another plan version.
//!
//! Key layout (components length-prefixed, so the encoding is injective; the tenant first, so
//! a tenant's records are one contiguous range):
//!
//! | key | value |
//! |---|---|
//! | `\0\0\0\0Moffset` | next offset (the stage runtime's, see [`neruba_stage::store`]) |
//! | `\0\0\0\0R` | where a rerun request stopped: its offset and the last period key it looked at ([`RERUN_CURSOR_KEY`]; an empty tenant, which no rollup has) |
//! | `\0\0\0\0C` | the catalogs the partition priced under, each with the offset it was first used at ([`CATALOGS_KEY`]) |
//! | `\0\0\0\0H` | the last offset whose outputs were handed for delivery, 8 bytes big-endian ([`HANDED_KEY`]) |
//! | tenant, `P`, customer, meter, group, period start | [`PeriodRecord`] (postcard) |
//! | tenant, `W`, customer, meter, group, period start, window start | [`WindowRecord`] (postcard) |

use crate::rate::{PeriodRecord, Rated, Refusal, WindowRecord, rate, reprice};
use crate::{Error, Result};
use ahash::AHashMap as HashMap;
use neruba_schemas::Catalog;
use neruba_schemas::ledger::{LineItem, Rerun};
use neruba_schemas::rollup::Rollup;
use neruba_stage::{DeadLetter, Input, Store, StoreOptions};
use rocksdb::{Cache, WriteBatch};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Most periods one part of a rerun request looks at: past it, the part so far is delivered
/// and written and the request is applied again from where it stopped
/// ([`neruba_stage::Partition::apply_again`]), so a tenant's rerun holds at most this many
/// re-priced items and keys in memory, however many series it has.
pub const RERUN_PART_PERIODS: usize = 10_000;

/// Where a rerun request that stopped partway stopped, written with each part
/// ([`PartitionState::apply_rerun`]).
pub const RERUN_CURSOR_KEY: &[u8] = b"\0\0\0\0R";

/// The catalogs the partition priced under, each with the offset it was first used at
/// ([`PartitionState::catalog_for`]).
pub const CATALOGS_KEY: &[u8] = b"\0\0\0\0C";

/// The last offset whose outputs were handed for delivery
/// ([`PartitionState::before_handing`]).
pub const HANDED_KEY: &[u8] = b"\0\0\0\0H";

/// A catalog kept in the state.
#[derive(Debug, Clone)]
enum Kept {
    Loaded(Arc<Catalog>),
    /// Its stored source no longer loads (a rule a newer build added): the rollups it priced
    /// are priced under the catalog in force. Kept as stored.
    Unloadable(Vec<u8>),
}

/// The stored form of the catalogs kept: each one's first offset and its source
/// ([`Catalog::encode_source`]).
#[derive(Debug, Serialize, Deserialize)]
struct KeptCatalogs {
    v: u8,
    catalogs: Vec<(i64, Vec<u8>)>,
}

/// What a batch produced, to be delivered before the batch is written.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Item(Box<LineItem>),
    /// A rollup that could not be priced, for the dead-letter topic.
    Refused(DeadLetter),
}

impl neruba_stage::AsDeadLetter for Output {
    fn dead_letter(&self) -> Option<&DeadLetter> {
        match self {
            Self::Refused(letter) => Some(letter),
            Self::Item(_) => None,
        }
    }
}

/// Per-batch counts, published by the caller.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub rollups: u64,
    pub items: BTreeMap<&'static str, u64>,
    pub repeats: u64,
    pub reruns: u64,
    pub refused: BTreeMap<&'static str, u64>,
    /// Items rated for windows that started longer ago than the window retention, by the wall
    /// clock: their window records may go at the next compaction, and a re-delivery of the
    /// same revision after that would be rated again.
    pub past_retention: u64,
}

/// The rating state of one rollups partition.
pub struct PartitionState {
    pub partition: i32,
    store: Store,
    /// The batch's pending writes, read before the database.
    overlay: HashMap<Vec<u8>, Vec<u8>>,
    outputs: Vec<Output>,
    counts: Counts,
    /// How long records are kept, for [`Counts::past_retention`].
    retention: Retention,
    /// Periods a part of a rerun looks at ([`RERUN_PART_PERIODS`]; smaller in tests).
    rerun_part_periods: usize,
    /// The message just applied stopped partway ([`neruba_stage::Partition::apply_again`]).
    again: bool,
    /// The catalogs the partition priced under, in order of the offset each was first used
    /// at: the last is in force, the earlier ones price a replay of the offsets before it.
    catalogs: Vec<(i64, Kept)>,
    /// The last offset whose outputs were handed for delivery, as written ([`HANDED_KEY`]).
    handed: Option<i64>,
    /// The last offset applied (or partly applied: a rerun request's part).
    applied: Option<i64>,
    /// Whether the partition logged that it prices a replay under a catalog it kept.
    replay_logged: bool,
}

impl std::fmt::Debug for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionState")
            .field("partition", &self.partition)
            .field("next_offset", &self.store.next_offset())
            .finish_non_exhaustive()
    }
}

pub use neruba_stage::partition_dir;

use neruba_stage::keys::push_part as push;

/// The period key of a rollup; the window key extends it with the window start.
fn period_key(rollup: &Rollup) -> Vec<u8> {
    let mut key = Vec::with_capacity(96);
    push(&mut key, rollup.tenant.as_bytes());
    key.push(b'P');
    push(&mut key, rollup.customer.as_bytes());
    push(&mut key, rollup.meter.as_bytes());
    key.extend_from_slice(
        &u32::try_from(rollup.group.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    for (name, value) in &rollup.group {
        push(&mut key, name.as_bytes());
        push(&mut key, value.as_bytes());
    }
    key.extend_from_slice(&rollup.period_start_ms.to_be_bytes());
    key
}

fn window_key(period_key: &[u8], tenant_len: usize, window_start_ms: i64) -> Vec<u8> {
    let mut key = period_key.to_vec();
    if let Some(kind) = key.get_mut(4 + tenant_len) {
        *kind = b'W';
    }
    key.extend_from_slice(&window_start_ms.to_be_bytes());
    key
}

/// How long the rater keeps what it rated, by wall-clock age of the window or period start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// A window record (latest revision rated) is kept this long: past the aggregator's
    /// correction horizon no new revision can come (default 37 days = 35 + 2).
    pub window_ms: i64,
    /// A period record (what was billed for the period) is kept this long, for reruns and
    /// late revisions (default 400 days).
    pub period_ms: i64,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY_MS: i64 = 86_400_000;
        Self {
            window_ms: 37 * DAY_MS,
            period_ms: 400 * DAY_MS,
        }
    }
}

/// Whether compaction may drop the record under `key` at wall time `now_ms`: a window record
/// whose window started more than `retention.window_ms` ago, or a period record whose period
/// started more than `retention.period_ms` ago. The stored offset is always kept.
fn expired(key: &[u8], now_ms: i64, retention: Retention) -> bool {
    let Some(tenant_len) = key
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .and_then(|n| usize::try_from(n).ok())
    else {
        return false;
    };
    let Some(start) = key
        .len()
        .checked_sub(8)
        .and_then(|at| key.get(at..))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(i64::from_be_bytes)
    else {
        return false;
    };
    match key.get(4 + tenant_len) {
        Some(b'W') => start < now_ms.saturating_sub(retention.window_ms),
        Some(b'P') => start < now_ms.saturating_sub(retention.period_ms),
        _ => false,
    }
}

/// How partition stores are tuned: small memtables (rollups are few), and compaction dropping
/// window and period records past retention (expiry without a scan).
pub fn store_options(retention: Retention) -> StoreOptions {
    StoreOptions {
        write_buffer_bytes: 8 * 1024 * 1024,
        max_write_buffers: None,
        memtable_bloom: false,
        index_in_cache: false,
        expiry: Some(std::sync::Arc::new(
            move |key: &[u8], _value: &[u8], now_ms: i64| expired(key, now_ms, retention),
        )),
        expiry_clock: neruba_stage::ExpiryClock::Wall,
    }
}

impl PartitionState {
    /// Opens (or creates) the partition's database.
    pub fn open(dir: &Path, partition: i32, cache: &Cache, retention: Retention) -> Result<Self> {
        Self::from_store(
            Store::open(dir, partition, &store_options(retention), cache)?,
            retention,
        )
    }

    /// The state kept in `store` (opened with [`store_options`] of `retention`).
    pub fn from_store(store: Store, retention: Retention) -> Result<Self> {
        let partition = store.partition();
        let handed = match store.get(HANDED_KEY)? {
            None => None,
            Some(bytes) => Some(
                <[u8; 8]>::try_from(&*bytes)
                    .map(i64::from_be_bytes)
                    .map_err(|_| Error::corrupt("rater handed offset", "not 8 bytes"))?,
            ),
        };
        let mut catalogs = Vec::new();
        if let Some(bytes) = store.get(CATALOGS_KEY)? {
            let kept: KeptCatalogs = postcard::from_bytes(&bytes)
                .map_err(|e| Error::corrupt("rater kept catalogs", e))?;
            for (from, source) in kept.catalogs {
                match Catalog::from_encoded_source(&source, "the catalog kept in the state") {
                    Ok(catalog) => catalogs.push((from, Kept::Loaded(Arc::new(catalog)))),
                    Err(e) => {
                        tracing::warn!(partition, from, error = %e, "A catalog kept in the state no longer loads; a replay of the rollups it priced is priced under the catalog in force.");
                        catalogs.push((from, Kept::Unloadable(source)));
                    }
                }
            }
        }
        Ok(Self {
            partition,
            store,
            overlay: HashMap::default(),
            outputs: Vec::new(),
            counts: Counts::default(),
            retention,
            rerun_part_periods: RERUN_PART_PERIODS,
            again: false,
            catalogs,
            handed,
            applied: None,
            replay_logged: false,
        })
    }

    /// The catalog to price the message at `offset` under, `live` being the one in force.
    ///
    /// Each catalog the partition priced under is kept with the offset it was first used at.
    /// A message at or before the last offset handed for delivery is priced again under the
    /// catalog it was priced under the first time: a batch delivered but not written before a
    /// crash is replayed as it was sent, whatever catalog the rater runs with now (a reload,
    /// or a restart with a changed file, would otherwise re-send a window's item with another
    /// amount under the same id, or under a new plan version's id beside the first). A message
    /// past it takes `live`, which is written as kept from that offset on, before anything
    /// priced under it is handed. So a reload takes effect at the next message not yet sent,
    /// and a restart at the first message past what was sent before it.
    pub fn catalog_for(&mut self, live: &Arc<Catalog>, offset: i64) -> Result<Arc<Catalog>> {
        if self.store.next_offset().is_some_and(|next| offset < next) {
            // A message before the next offset: the log went back (the topic recreated, or
            // records lost), and what was handed before belongs to another log.
            tracing::warn!(
                partition = self.partition,
                offset,
                next = self.store.next_offset(),
                "The rollups topic went back; the catalogs kept for the old log are dropped."
            );
            self.catalogs.clear();
            let handed = offset.saturating_sub(1);
            self.store.put_now(HANDED_KEY, &handed.to_be_bytes())?;
            self.handed = Some(handed);
        }
        // The one kept for `offset`: the last first used at or before it (or the first, for
        // an offset before any).
        let at = self
            .catalogs
            .iter()
            .rposition(|(from, _)| *from <= offset)
            .unwrap_or(0);
        let replay = self.handed.is_some_and(|handed| offset <= handed);
        match self.catalogs.get_mut(at) {
            Some((_, Kept::Loaded(kept))) if Arc::ptr_eq(kept, live) => return Ok(live.clone()),
            Some((_, Kept::Loaded(kept))) if kept.digest() == live.digest() => {
                // Read back from the store: share the live one.
                *kept = live.clone();
                return Ok(live.clone());
            }
            Some((_, Kept::Unloadable(_))) if replay => return Ok(live.clone()),
            _ => {}
        }
        if let Some((_, Kept::Loaded(kept))) = self.catalogs.get(at)
            && replay
        {
            if !self.replay_logged {
                self.replay_logged = true;
                tracing::info!(
                    partition = self.partition,
                    offset,
                    handed = self.handed,
                    "Messages sent before the rater stopped are priced again under the catalog they were priced under; the catalog in force applies after them."
                );
            }
            return Ok(kept.clone());
        }
        // Nothing at or past `offset` was handed, so no catalog kept from there on priced
        // anything delivered.
        self.catalogs.retain(|(from, _)| *from < offset);
        self.catalogs.push((offset, Kept::Loaded(live.clone())));
        self.store.put_now(CATALOGS_KEY, &self.encode_catalogs()?)?;
        tracing::info!(
            partition = self.partition,
            offset,
            catalog = %hex_prefix(&live.digest()),
            "Partition prices under the catalog in force from this offset on."
        );
        Ok(live.clone())
    }

    fn encode_catalogs(&self) -> Result<Vec<u8>> {
        let kept = KeptCatalogs {
            v: 1,
            catalogs: self
                .catalogs
                .iter()
                .map(|(from, kept)| match kept {
                    Kept::Loaded(catalog) => (*from, catalog.encode_source()),
                    Kept::Unloadable(source) => (*from, source.clone()),
                })
                .collect(),
        };
        postcard::to_stdvec(&kept).map_err(|e| Error::Bug(format!("kept catalogs encoding: {e}")))
    }

    /// Writes the last offset applied as handed, if outputs are about to be handed for
    /// delivery, before they can reach the broker (see [`Self::catalog_for`]); or if a rerun
    /// request's part is about to be written, so the request finishes under the catalog its
    /// first parts were compared under, whether they emitted anything or not.
    pub fn before_handing(&mut self) -> Result<()> {
        if (self.outputs.is_empty() && !self.again) || self.applied <= self.handed {
            return Ok(());
        }
        if let Some(applied) = self.applied {
            self.store.put_now(HANDED_KEY, &applied.to_be_bytes())?;
            self.handed = Some(applied);
        }
        Ok(())
    }

    /// The next offset to consume, if any message was ever applied.
    pub fn next_offset(&self) -> Option<i64> {
        self.store.next_offset()
    }

    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        let bytes = match self.overlay.get(key) {
            Some(bytes) => Some(bytes.clone()),
            None => self.store.db().get(key)?,
        };
        bytes
            .map(|b| postcard::from_bytes(&b).map_err(|e| Error::corrupt("rater record", e)))
            .transpose()
    }

    fn put<T: Serialize>(&mut self, key: Vec<u8>, record: &T) -> Result<()> {
        let bytes =
            postcard::to_stdvec(record).map_err(|e| Error::Bug(format!("record encoding: {e}")))?;
        self.overlay.insert(key, bytes);
        Ok(())
    }

    /// Rates one rollups-topic message at `offset`.
    pub fn apply(&mut self, input: Input<'_>, catalog: &Catalog) -> Result<()> {
        self.again = false;
        self.applied = Some(input.offset);
        self.store.consumed(input.offset);
        self.counts.rollups += 1;
        let refused = |refusal: Refusal| {
            Output::Refused(DeadLetter::refusing(
                input,
                refusal.code.as_str(),
                refusal.message,
            ))
        };
        let rollup = match Rollup::decode(input.payload) {
            Ok(rollup) => rollup,
            Err(e) => {
                self.refuse(refused(Refusal {
                    code: neruba_schemas::RefusalCode::InvalidRollup,
                    message: e.to_string(),
                }));
                return Ok(());
            }
        };
        let period_key = period_key(&rollup);
        let window_key = window_key(&period_key, rollup.tenant.len(), rollup.window_start_ms);
        let period: Option<PeriodRecord> = self.get(&period_key)?;
        let window: Option<WindowRecord> = self.get(&window_key)?;
        match rate(&rollup, catalog, period.as_ref(), window.as_ref()) {
            Ok(Rated::Repeat) => self.counts.repeats += 1,
            Ok(Rated::Item { item, window }) => {
                self.put(
                    period_key,
                    &PeriodRecord {
                        last: (*item).clone(),
                    },
                )?;
                // A count for operators only: what is rated never depends on the clock.
                let now_ms = neruba_schemas::event::now_ms();
                if expired(&window_key, now_ms, self.retention) {
                    self.counts.past_retention += 1;
                }
                self.put(window_key, &window)?;
                *self.counts.items.entry(kind_label(item.kind)).or_default() += 1;
                self.outputs.push(Output::Item(item));
            }
            Err(refusal) => self.refuse(refused(refusal)),
        }
        Ok(())
    }

    /// Handles a rerun request read at `offset`: every period of the tenant that overlaps the
    /// requested range is re-priced under the plan now in force, and an adjustment is emitted
    /// where the amount changed.
    ///
    /// In parts of at most [`RERUN_PART_PERIODS`] periods, in key order: a part that leaves
    /// periods over stops with [`neruba_stage::Partition::apply_again`], for the runtime to
    /// deliver and write it and apply the request again, which goes on after the last period
    /// looked at, kept in the same write as the part ([`RERUN_CURSOR_KEY`]): a rater stopped
    /// between parts goes on after the last part written, so no period is re-priced twice
    /// (under a catalog changed by the restart, a second time would emit a second
    /// adjustment). The request is consumed once its last part is done. (Until December 6,
    /// 2026 the whole tenant was re-priced in one batch: a tenant of some hundreds of
    /// thousands of series held them all in memory, past the rater's limit, and a rater
    /// killed there read the same request again at each start.)
    pub fn apply_rerun(&mut self, offset: i64, payload: &[u8], catalog: &Catalog) -> Result<()> {
        self.again = false;
        let request = match Rerun::decode(payload) {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(partition = self.partition, offset, error = %e, "Unreadable rerun request skipped.");
                self.store.consumed(offset);
                self.counts.reruns += 1;
                return Ok(());
            }
        };
        if !self.overlay.is_empty() {
            // The batch's writes so far are written first, so each part reads the store alone.
            // Nothing of the request is sent with them: it is not applied yet.
            self.again = true;
            return Ok(());
        }
        self.applied = Some(offset);
        let mut prefix = Vec::with_capacity(request.tenant.len() + 5);
        push(&mut prefix, request.tenant.as_bytes());
        prefix.push(b'P');
        // Where this request stopped, if it did (a cursor of another request is stale: it
        // ended, or its last part was being applied when the rater stopped).
        let after = self
            .get::<(i64, Vec<u8>)>(RERUN_CURSOR_KEY)?
            .filter(|(at, _)| *at == offset)
            .map(|(_, key)| key);
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut more = false;
        let from = after.as_deref().unwrap_or(&prefix);
        for entry in self.store.db().iterator(rocksdb::IteratorMode::From(
            from,
            rocksdb::Direction::Forward,
        )) {
            let (key, _) = entry?;
            if !key.starts_with(&prefix) {
                break;
            }
            if after.as_deref() == Some(&*key) {
                continue;
            }
            if keys.len() == self.rerun_part_periods.max(1) {
                more = true;
                break;
            }
            keys.push(key.to_vec());
        }
        let rerun_key = request.key();
        for key in &keys {
            let Some(record) = self.get::<PeriodRecord>(key)? else {
                continue;
            };
            let start = neruba_schemas::event::parse_time_ms(&record.last.period_start);
            let end = neruba_schemas::event::parse_time_ms(&record.last.period_end);
            let overlaps =
                matches!((start, end), (Ok(s), Ok(e)) if s < request.to_ms && e > request.from_ms);
            if !overlaps {
                continue;
            }
            match reprice(&record.last, catalog, &rerun_key) {
                Ok(None) => {}
                Ok(Some(item)) => {
                    self.put(key.clone(), &PeriodRecord { last: item.clone() })?;
                    *self.counts.items.entry(kind_label(item.kind)).or_default() += 1;
                    self.outputs.push(Output::Item(Box::new(item)));
                }
                Err(refusal) => {
                    *self
                        .counts
                        .refused
                        .entry(refusal.code.as_str())
                        .or_default() += 1;
                    tracing::warn!(partition = self.partition, code = refusal.code.as_str(), message = %refusal.message, customer = %record.last.customer, "Period not re-priced.");
                }
            }
        }
        match keys.pop() {
            Some(last) if more => {
                self.put(RERUN_CURSOR_KEY.to_vec(), &(offset, last))?;
                self.again = true;
            }
            _ => {
                self.store.consumed(offset);
                self.counts.reruns += 1;
            }
        }
        Ok(())
    }

    fn refuse(&mut self, output: Output) {
        if let Output::Refused(letter) = &output {
            *self.counts.refused.entry(letter.code).or_default() += 1;
            tracing::warn!(partition = self.partition, code = letter.code, message = %letter.message, "Rollup refused; sent to the dead-letter topic.");
        }
        self.outputs.push(output);
    }
}

impl neruba_stage::Partition for PartitionState {
    fn store(&self) -> &Store {
        &self.store
    }

    /// After a rerun request's part that left periods over (see `apply_rerun`), or a request
    /// that waits for the batch's writes before its first part.
    fn apply_again(&self) -> bool {
        self.again
    }

    /// Writes the batch: records and the next offset, atomically; with them, the catalogs
    /// kept less those no replay from the next offset can need.
    fn commit(&mut self) -> Result<()> {
        let mut batch = WriteBatch::default();
        for (key, value) in self.overlay.drain() {
            batch.put(key, value);
        }
        if let Some(next) = self.store.next_offset() {
            let in_force = self.catalogs.iter().rposition(|(from, _)| *from <= next);
            if let Some(first_needed) = in_force.filter(|at| *at > 0) {
                self.catalogs.drain(..first_needed);
                batch.put(CATALOGS_KEY, self.encode_catalogs()?);
            }
        }
        self.store.write(batch)
    }
}

/// The first bytes of a digest in hex, for logs.
fn hex_prefix(digest: &[u8; 32]) -> String {
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The bounded label of an item kind.
pub fn kind_label(kind: neruba_schemas::ledger::Kind) -> &'static str {
    match kind {
        neruba_schemas::ledger::Kind::Usage => "usage",
        neruba_schemas::ledger::Kind::Adjustment => "adjustment",
        neruba_schemas::ledger::Kind::Flat => "flat",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neruba_stage::Partition as _;

    #[test]
    fn compaction_drops_windows_and_periods_past_retention_and_keeps_the_offset() {
        const DAY: i64 = 86_400_000;
        let now = 1_000 * DAY;
        let rollup = |period_start: i64, window_start: i64| Rollup {
            v: 1,
            tenant: "acme".into(),
            meter: "m".into(),
            customer: "c".into(),
            group: BTreeMap::new(),
            aggregation: neruba_schemas::catalog::Aggregation::Sum,
            window_start_ms: window_start,
            window_end_ms: window_start + 60_000,
            period_start_ms: period_start,
            period_end_ms: period_start + 30 * DAY,
            window_quantity: rust_decimal::Decimal::ONE,
            window_events: 1,
            period_quantity: rust_decimal::Decimal::ONE,
            period_events: 1,
            revision: 1,
            latest_event: None,
        };
        let retention = Retention::default();
        let window = |start: i64| {
            let r = rollup(start - start % (30 * DAY), start);
            window_key(&period_key(&r), r.tenant.len(), start)
        };
        let period = |start: i64| period_key(&rollup(start, start));
        assert!(!expired(&window(now - 37 * DAY), now, retention));
        assert!(expired(&window(now - 37 * DAY - 1), now, retention));
        assert!(!expired(&period(now - 37 * DAY - 1), now, retention));
        assert!(!expired(&period(now - 400 * DAY), now, retention));
        assert!(expired(&period(now - 400 * DAY - 1), now, retention));
        assert!(!expired(neruba_stage::store::OFFSET_KEY, now, retention));
        assert!(!expired(b"", now, retention));

        // On a real database: a compaction removes what is past retention, nothing else.
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = Cache::new_lru_cache(1 << 20);
        let wall = neruba_schemas::event::now_ms();
        let mut state = PartitionState::open(dir.path(), 0, &cache, retention).expect("open state");
        let (old, recent) = (window(wall - 40 * DAY), window(wall - DAY));
        let (old_period, recent_period) = (period(wall - 401 * DAY), period(wall - 40 * DAY));
        for key in [&old, &recent, &old_period, &recent_period] {
            state.put(key.clone(), &1u32).expect("put");
        }
        state.commit().expect("commit");
        let kept = |key: &[u8]| state.store.db().get(key).expect("get").is_some();
        assert_eq!(
            [
                kept(&old),
                kept(&recent),
                kept(&old_period),
                kept(&recent_period)
            ],
            [true; 4]
        );
        state.store.db().compact_range(None::<&[u8]>, None::<&[u8]>);
        assert_eq!(
            [
                kept(&old),
                kept(&recent),
                kept(&old_period),
                kept(&recent_period)
            ],
            [false, true, false, true]
        );
    }

    const RERUN_CATALOG: &str = r#"
[[tenants]]
id = "acme"

[[tenants.meters]]
key = "m"
event_type = "e"
aggregation = "sum"
value = "$.v"
window = "1m"

[[tenants.price_plans]]
id = "p"
meter = "m"
version = 1
effective_from = "2026-01-01"
currency = "USD"
model = { type = "unit", unit_price = "0.01" }
"#;

    /// The rerun catalog with a version 2 of the plan in force from November 2026 on.
    const RERUN_CORRECTION: &str = r#"
[[tenants.price_plans]]
id = "p"
meter = "m"
version = 2
effective_from = "2026-11-01"
currency = "USD"
model = { type = "unit", unit_price = "0.03" }
"#;

    /// The encoded rollup of `customer`'s window at `minute` of November 2026 (revision 1),
    /// for meter `m` of `acme`.
    fn november_window(customer: &str, minute: i64, quantity: usize, period: usize) -> Vec<u8> {
        let period_start_ms = 1_793_491_200_000; // 2026-11-01T00:00:00Z
        let window_start_ms = period_start_ms + minute * 60_000;
        Rollup {
            v: 1,
            tenant: "acme".into(),
            meter: "m".into(),
            customer: customer.into(),
            group: BTreeMap::new(),
            aggregation: neruba_schemas::catalog::Aggregation::Sum,
            window_start_ms,
            window_end_ms: window_start_ms + 60_000,
            period_start_ms,
            period_end_ms: 1_796_083_200_000,
            window_quantity: rust_decimal::Decimal::from(quantity),
            window_events: 1,
            period_quantity: rust_decimal::Decimal::from(period),
            period_events: 1,
            revision: 1,
            latest_event: None,
        }
        .encode()
    }

    #[test]
    fn items_rated_for_windows_past_the_window_retention_are_counted() {
        let catalog = Catalog::from_toml_str(RERUN_CATALOG, "test").expect("catalog");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        // A retention ending five minutes into November: the window at minute 0 started before
        // it, the one at minute 10 after.
        let november_ms: i64 = 1_793_491_200_000;
        let retention = Retention {
            window_ms: neruba_schemas::event::now_ms() - (november_ms + 5 * 60_000),
            ..Retention::default()
        };
        let mut state = PartitionState::open(dir.path(), 0, &cache, retention).expect("open");
        for (offset, minute, period) in [(0, 10, 1), (1, 0, 2), (2, 0, 2)] {
            let payload = november_window("c1", minute, 1, period);
            let input = Input {
                offset,
                key: None,
                payload: &payload,
            };
            state.apply(input, &catalog).expect("apply");
        }
        let counts = state.take_counts();
        // The third is the second again: a repeat, no item, not counted.
        assert_eq!(
            (
                counts.past_retention,
                counts.repeats,
                state.take_outputs().len()
            ),
            (1, 1, 2)
        );
    }

    /// A state that rated one November window of each of `customers` customers under version
    /// 1, written.
    fn rated(dir: &Path, customers: usize) -> PartitionState {
        let catalog = Catalog::from_toml_str(RERUN_CATALOG, "test").expect("catalog");
        let cache = Cache::new_lru_cache(1 << 20);
        let mut state =
            PartitionState::open(dir, 0, &cache, Retention::default()).expect("open state");
        for n in 0..customers {
            let payload = november_window(&format!("c{n}"), 0, n + 1, n + 1);
            let input = Input {
                offset: i64::try_from(n).expect("offset"),
                key: None,
                payload: &payload,
            };
            state.apply(input, &catalog).expect("apply");
        }
        assert_eq!(state.take_outputs().len(), customers);
        state.commit().expect("commit");
        state
    }

    /// Applies the rerun request at `offset` as the runtime does, part after part (each
    /// part's outputs taken and the part written), at most `parts` parts; returns the items'
    /// (id, amount) and the parts applied.
    fn rerun(
        state: &mut PartitionState,
        offset: i64,
        parts: usize,
    ) -> (Vec<(String, rust_decimal::Decimal)>, usize) {
        let catalog = Catalog::from_toml_str(&format!("{RERUN_CATALOG}{RERUN_CORRECTION}"), "test")
            .expect("catalog");
        let request = Rerun {
            v: 1,
            tenant: "acme".into(),
            from_ms: 1_793_491_200_000,
            to_ms: 1_796_083_200_000,
            requested_ms: 1_796_000_000_000,
        };
        let payload = request.encode();
        let mut items = Vec::new();
        for part in 1..=parts {
            state
                .apply_rerun(offset, &payload, &catalog)
                .expect("rerun");
            for output in state.take_outputs() {
                if let Output::Item(item) = output {
                    items.push((item.id.clone(), item.amount));
                }
            }
            state.commit().expect("commit");
            if !state.apply_again() {
                return (items, part);
            }
        }
        (items, parts)
    }

    #[test]
    fn a_rerun_goes_in_parts_of_bounded_periods_with_the_items_of_one_go() {
        // Was: one batch re-priced every period of the tenant, all held in memory at once.
        let customers = 25;
        let whole_dir = tempfile::tempdir().expect("temp dir");
        let mut whole = rated(whole_dir.path(), customers);
        let (expected, parts) = rerun(&mut whole, 25, usize::MAX);
        assert_eq!(parts, 1);
        // Each customer's November at 0.03 instead of 0.01: (n + 1) × 0.02 more.
        let mut amounts: Vec<rust_decimal::Decimal> = expected.iter().map(|(_, a)| *a).collect();
        amounts.sort();
        let want: Vec<rust_decimal::Decimal> = (1..=customers)
            .map(|n| rust_decimal::Decimal::from(n) * rust_decimal::Decimal::new(2, 2))
            .collect();
        assert_eq!(amounts, want);
        assert_eq!(whole.next_offset(), Some(26));

        // In parts of 7: 4 parts, the same items in the same order; the request consumed
        // only after the last.
        let parted_dir = tempfile::tempdir().expect("temp dir");
        let mut parted = rated(parted_dir.path(), customers);
        parted.rerun_part_periods = 7;
        let (first, one) = rerun(&mut parted, 25, 1);
        assert_eq!((first.len(), one, parted.next_offset()), (7, 1, Some(25)));
        let (rest, parts) = rerun(&mut parted, 25, usize::MAX);
        assert_eq!(parts, 3);
        assert_eq!([first, rest].concat(), expected);
        assert_eq!(parted.next_offset(), Some(26));
        assert_eq!(parted.take_counts().reruns, 1);

        // Stopped after two parts, the request goes on at the next start after the last part
        // written: two parts more, the rest of the items, none twice.
        let killed_dir = tempfile::tempdir().expect("temp dir");
        let mut killed = rated(killed_dir.path(), customers);
        killed.rerun_part_periods = 7;
        let (before, _) = rerun(&mut killed, 25, 2);
        assert_eq!(killed.next_offset(), Some(25));
        drop(killed);
        let cache = Cache::new_lru_cache(1 << 20);
        let mut restarted =
            PartitionState::open(killed_dir.path(), 0, &cache, Retention::default())
                .expect("reopen");
        restarted.rerun_part_periods = 7;
        let (after, parts) = rerun(&mut restarted, 25, usize::MAX);
        assert_eq!(parts, 2);
        assert_eq!([before, after].concat(), expected);

        // Periods that fill the last part exactly: no empty part after it.
        let exact_dir = tempfile::tempdir().expect("temp dir");
        let mut exact = rated(exact_dir.path(), 21);
        exact.rerun_part_periods = 7;
        let (items, parts) = rerun(&mut exact, 21, usize::MAX);
        assert_eq!((items.len(), parts, exact.next_offset()), (21, 3, Some(22)));

        // A request read after other messages in its batch waits for their writes: one part
        // that does nothing, then the request.
        let pending_dir = tempfile::tempdir().expect("temp dir");
        let mut pending = rated(pending_dir.path(), customers);
        pending.put(b"pending".to_vec(), &1u32).expect("put");
        let (items, parts) = rerun(&mut pending, 25, usize::MAX);
        assert_eq!((items, parts), (expected, 2));
    }

    /// Prices the message at `offset` as the rater does with `live` in force, and returns
    /// what it hands for delivery.
    fn price(
        state: &mut PartitionState,
        live: &Arc<Catalog>,
        offset: i64,
        payload: &[u8],
    ) -> Vec<Output> {
        let catalog = state.catalog_for(live, offset).expect("catalog");
        let input = Input {
            offset,
            key: None,
            payload,
        };
        state.apply(input, &catalog).expect("apply");
        state.before_handing().expect("handed");
        state.take_outputs()
    }

    /// The plan version an output was priced under.
    fn version(outputs: &[Output]) -> Vec<u32> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Item(item) => Some(item.price_version),
                Output::Refused(_) => None,
            })
            .collect()
    }

    /// A partition's directory and the rerun catalog's two versions (version 2 in force from
    /// November 2026).
    struct Versions {
        dir: tempfile::TempDir,
        cache: Cache,
        v1: Arc<Catalog>,
        v2: Arc<Catalog>,
    }

    impl Versions {
        fn new() -> Self {
            let corrected = format!("{RERUN_CATALOG}{RERUN_CORRECTION}");
            Self {
                dir: tempfile::tempdir().expect("dir"),
                cache: Cache::new_lru_cache(1 << 20),
                v1: Arc::new(Catalog::from_toml_str(RERUN_CATALOG, "v1").expect("v1")),
                v2: Arc::new(Catalog::from_toml_str(&corrected, "v2").expect("v2")),
            }
        }

        fn open(&self) -> Result<PartitionState> {
            PartitionState::open(self.dir.path(), 0, &self.cache, Retention::default())
        }

        /// The partition with one window priced under version 1, and written.
        fn rated_once(&self) -> PartitionState {
            let mut state = self.open().expect("open");
            let items = price(&mut state, &self.v1, 0, &november_window("c", 0, 10, 10));
            assert_eq!(version(&items), [1]);
            state.commit().expect("commit");
            state
        }
    }

    #[test]
    fn a_batch_sent_but_not_written_is_priced_again_under_the_catalog_it_was_sent_under() {
        // Was: a restart with a changed catalog (here the rerun recipe's version 2 of the
        // plan, in force from the period's first day) priced the replay under the new one: the
        // window sent under version 1 was sent again under version 2, another id, and both
        // counted.
        let versions = Versions::new();
        let (v1, v2) = (versions.v1.clone(), versions.v2.clone());
        let open = || versions.open();
        let mut state = versions.rated_once();
        // A batch sent, then the rater stops before writing it.
        let sent = price(&mut state, &v1, 1, &november_window("c", 1, 5, 15));
        assert_eq!(version(&sent), [1]);
        drop(state);

        // Started again with the corrected catalog: the replay sends the same item.
        let mut state = open().expect("reopen");
        assert_eq!(
            price(&mut state, &v2, 1, &november_window("c", 1, 5, 15)),
            sent
        );
        // The next message was never sent: the catalog in force prices it, in the same
        // batch. Version 2 prices the period's 22 at 0.03 = 0.66 against the 0.15 sent.
        let next = price(&mut state, &v2, 2, &november_window("c", 2, 7, 22));
        assert_eq!(version(&next), [2]);
        let Some(Output::Item(item)) = next.first() else {
            panic!("an item: {next:?}");
        };
        assert_eq!(
            (item.amount, item.period_amount),
            (
                rust_decimal::Decimal::new(51, 2),
                rust_decimal::Decimal::new(66, 2)
            )
        );
        state.commit().expect("commit");
        drop(state);

        // Once written, only the catalog in force is kept: a restart with version 1's file
        // prices the next message under it, nothing being sent past what was written.
        let mut state = open().expect("reopen");
        assert_eq!(state.catalogs.len(), 1);
        assert_eq!(
            version(&price(&mut state, &v1, 3, &november_window("c", 3, 1, 23))),
            [1]
        );
    }

    #[test]
    fn a_reload_is_kept_from_its_first_message_before_anything_priced_under_it_is_sent() {
        let versions = Versions::new();
        let (v1, v2) = (versions.v1.clone(), versions.v2.clone());
        let open = || versions.open();
        let mut state = versions.rated_once();
        // Reloaded while running: the next batch is priced under version 2 and sent, and the
        // rater stops before writing it.
        let sent = price(&mut state, &v2, 1, &november_window("c", 1, 5, 15));
        assert_eq!(version(&sent), [2]);
        drop(state);

        // Started again from a file put back to version 1: the replay is sent as it was.
        let mut state = open().expect("reopen");
        assert_eq!(
            price(&mut state, &v1, 1, &november_window("c", 1, 5, 15)),
            sent
        );
        assert_eq!(
            version(&price(&mut state, &v1, 2, &november_window("c", 2, 7, 22))),
            [1]
        );
        // A message applied but not handed when the rater stopped is no reason to keep a
        // catalog: nothing priced under it was sent.
        let catalog = state.catalog_for(&v2, 3).expect("catalog");
        assert_eq!(catalog.digest(), v2.digest());
        state
            .apply(
                Input {
                    offset: 3,
                    key: None,
                    payload: &november_window("c", 3, 1, 23),
                },
                &catalog,
            )
            .expect("apply");
        drop(state);
        let mut state = open().expect("reopen");
        assert_eq!(
            version(&price(&mut state, &v1, 2, &november_window("c", 2, 7, 22))),
            [1]
        );
        assert_eq!(
            version(&price(&mut state, &v1, 3, &november_window("c", 3, 1, 23))),
            [1]
        );
        state.commit().expect("commit");
        assert_eq!(state.catalogs.len(), 1, "only the catalog in force is kept");
    }

    #[test]
    fn a_log_gone_back_or_a_kept_catalog_that_no_longer_loads_takes_the_live_catalog() {
        let versions = Versions::new();
        let (v1, v2) = (versions.v1.clone(), versions.v2.clone());
        let open = || versions.open();
        let mut state = open().expect("open");
        for offset in 0..3 {
            let minute = offset;
            let sent = price(&mut state, &v1, offset, &november_window("c", minute, 1, 1));
            assert_eq!(version(&sent), [1]);
        }
        // Sent, not written; then the topic is recreated and starts again at 0 while this
        // partition holds offset 3 as its next: the new log's rollups take the catalog
        // in force (was, in review: the kept one, until the offsets passed the old log's).
        state.commit().expect("commit");
        let _ = price(&mut state, &v1, 3, &november_window("c", 3, 1, 1));
        drop(state);
        let mut state = open().expect("reopen");
        assert_eq!(
            version(&price(&mut state, &v2, 0, &november_window("d", 0, 1, 1))),
            [2]
        );
        assert_eq!(state.handed, Some(0));
        drop(state);

        // A kept catalog that no longer loads between two that do (as a newer build's rule
        // would make it): its rollups take the catalog in force, not the one before it.
        let state = open().expect("reopen");
        let kept = KeptCatalogs {
            v: 1,
            catalogs: vec![
                (0, v1.encode_source()),
                (10, b"tnot a catalog".to_vec()),
                (20, v1.encode_source()),
            ],
        };
        let bytes = postcard::to_stdvec(&kept).expect("encode");
        state.store.put_now(CATALOGS_KEY, &bytes).expect("put");
        state
            .store
            .put_now(HANDED_KEY, &25_i64.to_be_bytes())
            .expect("put");
        drop(state);
        let mut state = open().expect("reopen");
        let at = |state: &mut PartitionState, offset| {
            state.catalog_for(&v2, offset).expect("catalog").digest()
        };
        assert_eq!(at(&mut state, 12), v2.digest());
        assert_eq!(at(&mut state, 22), v1.digest());
        assert_eq!(at(&mut state, 5), v1.digest());
    }

    #[test]
    fn window_keys_extend_their_period_key_and_stay_injective() {
        let mut r = Rollup {
            v: 1,
            tenant: "acme".into(),
            meter: "m".into(),
            customer: "c".into(),
            group: BTreeMap::from([("region".to_owned(), "eu".to_owned())]),
            aggregation: neruba_schemas::catalog::Aggregation::Sum,
            window_start_ms: 60_000,
            window_end_ms: 120_000,
            period_start_ms: 0,
            period_end_ms: 1_000_000,
            window_quantity: rust_decimal::Decimal::ONE,
            window_events: 1,
            period_quantity: rust_decimal::Decimal::ONE,
            period_events: 1,
            revision: 1,
            latest_event: None,
        };
        let p = period_key(&r);
        let w = window_key(&p, r.tenant.len(), r.window_start_ms);
        assert_eq!(w.get(..4 + 4), p.get(..4 + 4), "same tenant prefix");
        assert_eq!(w.get(8), Some(&b'W'));
        assert_eq!(p.get(8), Some(&b'P'));
        r.customer = "cm".into();
        r.meter = String::new();
        assert_ne!(period_key(&r), p);
    }
}
