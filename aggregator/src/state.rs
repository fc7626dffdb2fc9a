//! One partition's aggregation state in RocksDB.
//!
//! Invariants (what must hold after any crash, at any moment):
//! - the dedup set, the window and period aggregates and the next offset to consume are written
//!   in one `WriteBatch`, so on restart the partition resumes exactly after the last applied
//!   event: nothing lost, nothing counted twice;
//! - outputs (rollups, dead letters) of a batch are handed to the caller *before* the batch is
//!   written, and the caller writes only once the broker acknowledged them. A crash in between
//!   replays the batch, which re-emits identical rollups (processing is deterministic), never
//!   fewer;
//! - event time is kept per tenant: a window closes when its tenant's watermark (the tenant's
//!   highest event time in the partition − grace, or processing time after the tenant was idle)
//!   passes its end, in order of end time; one tenant's future-dated events, backfills or
//!   silence never move another tenant's windows, though they share the partition;
//! - an event is too old (`timestamp_too_far_in_past`) when its time is before its *receive*
//!   time minus the correction horizon: the rule the gateway applied, on a time the events
//!   topic carries, so what the gateway accepted is counted and a replay decides the same;
//! - an event is folded whole or not at all: if any of its meters' sums would leave the exact
//!   decimal range, it is dead-lettered (`value_out_of_range`) before anything changes, and
//!   the partition goes on; no input stops the stage;
//! - the period-to-date aggregate in a rollup covers the closed windows of the period, so it is
//!   a function of the events of those windows, not of how far later windows had got.
//!
//! Mechanism: reads go through an in-memory overlay of the batch's pending writes, so a batch
//! reads its own writes; the records of open windows stay in memory between batches (they are
//! what the next events touch), always equal to what is stored once a batch is written; open
//! windows are indexed under a metadata prefix so a restart finds them without scanning the
//! data; each tenant's clock is stored under a metadata prefix too, with the offsets.

use crate::keys;
use crate::{Error, Result};
use ahash::AHashMap as HashMap;
use neruba_schemas::catalog::Aggregation;
use neruba_schemas::measure::{Measure, measure};
use neruba_schemas::rollup::{Aggregate, Rollup};
use neruba_schemas::window::{period_bounds, window_start};
use neruba_schemas::{Catalog, Event, RejectCode, Rejection, codec, decimal};
use rocksdb::{BlockBasedOptions, Cache, DB, Options, WriteBatch, WriteOptions};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

/// Prefix of the open-window index (metadata: empty tenant).
const OPEN_PREFIX: &[u8] = b"\0\0\0\0O";
/// Prefix of the per-tenant clocks (metadata): tenant → highest event time, watermark.
const CLOCK_PREFIX: &[u8] = b"\0\0\0\0C";
const DAY_MS: i64 = 86_400_000;

/// Timing rules of the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Watermark = highest event time − grace.
    pub grace_ms: i64,
    /// Events whose time is before their receive time − this are dead-lettered
    /// (`timestamp_too_far_in_past`), as the gateway refuses them.
    pub correction_horizon_ms: i64,
    /// How long an event id is remembered.
    pub dedup_horizon_ms: i64,
}

/// What a batch produced, to be delivered before the batch is written.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Rollup(Rollup),
    /// A watermark advance for a tenant idle on a partition, to be written to that partition
    /// of the events topic (see [`PartitionState::idle_ticks`]).
    Tick {
        partition: i32,
        tenant: String,
        watermark: i64,
    },
    DeadLetter {
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        rejection: Rejection,
        offset: i64,
    },
}

/// Per-batch counts, published by the caller once per batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub applied: u64,
    pub duplicates: u64,
    pub late: u64,
    pub dead_letters: BTreeMap<&'static str, u64>,
    pub rollups: u64,
    /// End (event time, ms) of each window closed, for the close-delay histogram.
    pub closed_window_ends: Vec<i64>,
}

/// A window's stored record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRecord {
    pub tenant: String,
    pub meter: String,
    pub customer: String,
    pub group: BTreeMap<String, String>,
    pub aggregation: Aggregation,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    pub agg: Aggregate,
    /// 0 until first emitted.
    pub revision: u32,
    pub closed: bool,
    /// Distinct values whose first window in the period is this one (for `unique_count`).
    pub period_new: u64,
}

/// One write of a batch: the value to put, or `None` to delete the key.
type Write<'a> = (&'a [u8], Option<std::borrow::Cow<'a, [u8]>>);

/// A window record in memory, and whether the batch changed it.
struct CachedWindow {
    record: WindowRecord,
    dirty: bool,
}

/// One tenant's event clock within the partition.
#[derive(Debug)]
struct Clock {
    /// Highest event time of the tenant's events applied here.
    max_event_time: i64,
    /// Windows of the tenant ending at or before this are closed.
    watermark: i64,
    /// The tenant's windows not yet closed, by end time.
    open: BTreeSet<(i64, Vec<u8>)>,
    /// Changed by the batch: written at commit.
    dirty: bool,
    /// The batch applied an event of this tenant (idle time restarts at the batch's end).
    touched: bool,
    /// When the tenant's last event was applied (or the state opened): processing time,
    /// only for deciding when to send an idle tick, never for what a tick does.
    last_event_at: Instant,
    /// When the last idle tick was produced and not yet read back.
    tick_sent_at: Option<Instant>,
}

impl Clock {
    fn new((max_event_time, watermark): (i64, i64)) -> Self {
        Self {
            max_event_time,
            watermark,
            open: BTreeSet::new(),
            dirty: false,
            touched: false,
            last_event_at: Instant::now(),
            tick_sent_at: None,
        }
    }
}

/// Where one measure of an event is folded.
struct Target {
    series: Vec<u8>,
    window_key: Vec<u8>,
    start: i64,
    size: i64,
    period_start: i64,
    period_end: i64,
}

/// The state of one partition.
pub struct PartitionState {
    pub partition: i32,
    db: DB,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Window records touched by the batch (dirty, encoded once at commit) and the records of
    /// open windows (kept across batches; as many as the clocks' `open` hold).
    windows: HashMap<Vec<u8>, CachedWindow>,
    /// Period aggregates touched by the batch, likewise.
    periods: HashMap<Vec<u8>, Aggregate>,
    timing: Timing,
    next_offset: Option<i64>,
    /// Per tenant: event time and open windows.
    clocks: HashMap<String, Clock>,
    /// The clock a tenant starts with: the partition-wide clock of state written before
    /// clocks were per tenant (a one-time migration), else the far past. A tick without a
    /// tenant (written before clocks were per tenant) raises it too.
    initial_clock: (i64, i64),
    /// `initial_clock` changed: written at commit.
    initial_dirty: bool,
    outputs: Vec<Output>,
    counts: Counts,
    decoder: codec::Decoder,
}

impl std::fmt::Debug for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionState")
            .field("partition", &self.partition)
            .field("next_offset", &self.next_offset)
            .field("tenants", &self.clocks.len())
            .field("open_windows", &self.open_windows())
            .finish()
    }
}

/// RocksDB options for partition state: bounded caches, lz4, and a compaction filter that
/// drops dedup entries and window records past the horizons (expiry without a scan).
fn db_options(timing: Timing, cache: &Cache) -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_write_buffer_size(16 * 1024 * 1024);
    opts.set_max_write_buffer_number(2);
    // Most lookups are dedup checks of new ids: a whole-key bloom filter on the memtable
    // answers those misses without a skiplist search.
    opts.set_memtable_prefix_bloom_ratio(0.1);
    opts.set_memtable_whole_key_filtering(true);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&table);
    opts.set_compaction_filter("neruba-expiry", move |_level, key: &[u8], value: &[u8]| {
        if expired(key, value, neruba_schemas::event::now_ms(), timing) {
            rocksdb::compaction_filter::Decision::Remove
        } else {
            rocksdb::compaction_filter::Decision::Keep
        }
    });
    opts
}

/// Whether compaction may drop this entry at wall time `now_ms`: a dedup entry a day past the
/// dedup horizon, or a window record two days past the correction horizon (no event can reach
/// it any more: it would be dead-lettered as too old). Everything else is kept.
pub fn expired(key: &[u8], value: &[u8], now_ms: i64, timing: Timing) -> bool {
    match keys::kind_of(key) {
        Some(b'D') => keys::time_from(value)
            .is_some_and(|t| t < now_ms - timing.dedup_horizon_ms.saturating_add(DAY_MS)),
        Some(b'W') => key
            .len()
            .checked_sub(8)
            .and_then(|at| keys::time_from(&key[at..]))
            .is_some_and(|start| {
                start < now_ms - timing.correction_horizon_ms.saturating_add(2 * DAY_MS)
            }),
        _ => false,
    }
}

impl PartitionState {
    /// Opens (or creates) the state of `partition` under `dir`.
    pub fn open(dir: &Path, partition: i32, timing: Timing, cache: &Cache) -> Result<Self> {
        let db = DB::open(&db_options(timing, cache), dir)?;
        let read_i64 = |key: &[u8]| -> Result<Option<i64>> {
            Ok(db.get(key)?.and_then(|v| keys::time_from(&v)))
        };
        let next_offset = read_i64(keys::META_OFFSET)?;
        // State written before clocks were per tenant has one partition-wide clock: every
        // tenant starts from it (a one-time migration; fresh state starts in the far past).
        let initial_clock = (
            read_i64(keys::META_MAX_EVENT_TIME)?.unwrap_or(i64::MIN),
            read_i64(keys::META_WATERMARK)?.unwrap_or(i64::MIN),
        );
        let mut clocks: HashMap<String, Clock> = HashMap::new();
        for item in db.prefix_iterator(CLOCK_PREFIX) {
            let (key, value) = item?;
            if !key.starts_with(CLOCK_PREFIX) {
                break;
            }
            let tenant = String::from_utf8(key[CLOCK_PREFIX.len()..].to_vec())
                .map_err(|_| Error::Corrupt("tenant clock key".into()))?;
            let max = keys::time_from(&value);
            let watermark = value.get(8..).and_then(keys::time_from);
            let (Some(max), Some(watermark)) = (max, watermark) else {
                return Err(Error::Corrupt(format!("clock of tenant {tenant}")));
            };
            clocks.insert(tenant, Clock::new((max, watermark)));
        }
        for item in db.prefix_iterator(OPEN_PREFIX) {
            let (key, _) = item?;
            if !key.starts_with(OPEN_PREFIX) {
                break;
            }
            let rest = &key[OPEN_PREFIX.len()..];
            let window_key = rest.get(8..).unwrap_or_default();
            if let (Some(end), Some(tenant)) = (keys::time_from(rest), keys::tenant_of(window_key))
            {
                clocks
                    .entry(tenant.to_owned())
                    .or_insert_with(|| Clock::new(initial_clock))
                    .open
                    .insert((end, window_key.to_vec()));
            }
        }
        Ok(Self {
            partition,
            db,
            overlay: HashMap::new(),
            windows: HashMap::new(),
            periods: HashMap::new(),
            timing,
            next_offset,
            clocks,
            initial_clock,
            initial_dirty: false,
            outputs: Vec::new(),
            counts: Counts::default(),
            decoder: codec::Decoder::default(),
        })
    }

    /// The next offset to consume, if any event was ever applied.
    pub fn next_offset(&self) -> Option<i64> {
        self.next_offset
    }

    /// The most advanced tenant watermark of the partition (`i64::MIN` before any event): how
    /// far event time got here, for the watermark-lag gauge.
    pub fn watermark(&self) -> i64 {
        self.clocks
            .values()
            .map(|c| c.watermark)
            .max()
            .unwrap_or(i64::MIN)
    }

    /// The watermark of one tenant (`i64::MIN` before its first event).
    pub fn tenant_watermark(&self, tenant: &str) -> i64 {
        self.clocks
            .get(tenant)
            .map_or(self.initial_clock.1, |c| c.watermark)
    }

    /// Windows not yet closed.
    pub fn open_windows(&self) -> usize {
        self.clocks.values().map(|c| c.open.len()).sum()
    }

    /// The tenant's clock, started (from the initial clock) at its first event here.
    fn clock_mut(&mut self, tenant: &str) -> Result<&mut Clock> {
        if !self.clocks.contains_key(tenant) {
            self.clocks
                .insert(tenant.to_owned(), Clock::new(self.initial_clock));
        }
        self.clocks
            .get_mut(tenant)
            .ok_or_else(|| Error::Corrupt(format!("clock of tenant {tenant} vanished")))
    }

    /// Whether the batch has anything to write.
    pub fn is_dirty(&self) -> bool {
        !self.overlay.is_empty()
            || self.windows.values().any(|w| w.dirty)
            || !self.periods.is_empty()
            || !self.outputs.is_empty()
    }

    /// Outputs of the batch so far, in order; the caller delivers them before [`Self::commit`].
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// Counts of the batch so far.
    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.overlay.get(key) {
            Some(pending) => Ok(pending.clone()),
            None => Ok(self.db.get(key)?),
        }
    }

    fn get_record<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        match self.get(key)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(postcard::from_bytes(&bytes).map_err(|e| {
                Error::Corrupt(format!("partition {}: record: {e}", self.partition))
            })?)),
        }
    }

    /// Takes a window record out of the batch cache (or the store); put it back with
    /// [`Self::store_window`].
    fn load_window(&mut self, key: &[u8]) -> Result<Option<WindowRecord>> {
        match self.windows.remove(key) {
            Some(cached) => Ok(Some(cached.record)),
            None => self.get_record(key),
        }
    }

    fn store_window(&mut self, key: Vec<u8>, record: WindowRecord) {
        self.windows.insert(
            key,
            CachedWindow {
                record,
                dirty: true,
            },
        );
    }

    fn load_period(&mut self, key: &[u8]) -> Result<Aggregate> {
        match self.periods.remove(key) {
            Some(period) => Ok(period),
            None => Ok(self.get_record(key)?.unwrap_or_default()),
        }
    }

    fn store_period(&mut self, key: Vec<u8>, period: Aggregate) {
        self.periods.insert(key, period);
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.overlay.insert(key, Some(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.overlay.insert(key, None);
    }

    fn dead_letter(
        &mut self,
        key: Option<&[u8]>,
        payload: &[u8],
        rejection: Rejection,
        offset: i64,
    ) {
        *self
            .counts
            .dead_letters
            .entry(rejection.code.as_str())
            .or_default() += 1;
        self.outputs.push(Output::DeadLetter {
            key: key.map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            rejection,
            offset,
        });
    }

    /// Applies the message at `offset`. Bad events become dead letters; only storage problems
    /// are errors.
    pub fn apply(
        &mut self,
        offset: i64,
        key: Option<&[u8]>,
        payload: &[u8],
        catalog: &Catalog,
    ) -> Result<()> {
        self.next_offset = Some(offset + 1);
        let event = match self.decoder.decode(payload) {
            Ok(event) => event,
            Err(e) => {
                let rejection = Rejection::new(RejectCode::InvalidJson, e.to_string());
                self.dead_letter(key, payload, rejection, offset);
                return Ok(());
            }
        };
        let Some(tenant) = catalog.tenant(&event.tenant) else {
            let rejection = Rejection::new(
                RejectCode::UnknownTenant,
                format!("tenant `{}` is not in the catalog", event.tenant),
            );
            self.dead_letter(key, payload, rejection, offset);
            return Ok(());
        };
        // The gateway's rule, on the receive time the topic carries: what it accepted counts.
        if event.time_ms
            < event
                .received_ms
                .saturating_sub(self.timing.correction_horizon_ms)
        {
            let rejection = Rejection::new(
                RejectCode::TimestampTooFarInPast,
                "event time is before its receive time minus the correction horizon",
            );
            self.dead_letter(key, payload, rejection, offset);
            return Ok(());
        }
        let dedup_key = keys::dedup(&event.tenant, &event.id);
        if let Some(seen) = self.get(&dedup_key)? {
            let seen_at = keys::time_from(&seen).unwrap_or(i64::MIN);
            if event.received_ms.saturating_sub(seen_at) <= self.timing.dedup_horizon_ms {
                self.counts.duplicates += 1;
                return Ok(());
            }
        }
        let measures = match measure(tenant, &event) {
            Ok(measures) => measures,
            Err(rejection) => {
                self.dead_letter(key, payload, rejection, offset);
                return Ok(());
            }
        };
        // Every meter's fold is checked before any is made: an event counts whole or not at all.
        let mut targets = Vec::with_capacity(measures.len());
        for m in &measures {
            let target = self.target(&event, m)?;
            if !self.fits(&event.tenant, m, &target)? {
                let rejection = Rejection::new(
                    RejectCode::ValueOutOfRange,
                    format!(
                        "meter `{}`: adding this value to its window or period would leave the \
                         exact decimal range",
                        m.meter.key
                    ),
                );
                self.dead_letter(key, payload, rejection, offset);
                return Ok(());
            }
            targets.push(target);
        }
        self.put(dedup_key, keys::time_bytes(event.time_ms).to_vec());
        for (m, target) in measures.iter().zip(targets) {
            self.fold(&event, m, target)?;
        }
        self.counts.applied += 1;
        let clock = self.clock_mut(&event.tenant)?;
        clock.touched = true;
        if event.time_ms > clock.max_event_time {
            clock.max_event_time = event.time_ms;
            clock.dirty = true;
            let watermark = event.time_ms.saturating_sub(self.timing.grace_ms);
            self.advance_to(&event.tenant, watermark)?;
        }
        Ok(())
    }

    /// The window, series and period one measure of `event` folds into.
    fn target(&self, event: &Event, m: &Measure<'_>) -> Result<Target> {
        let meter = m.meter;
        let size = meter.window_ms();
        let start = window_start(event.time_ms, size);
        let (period_start, period_end) = period_bounds(
            event.time_ms,
            meter.billing_period.anchor_day,
            meter.offset_secs(),
        )
        .ok_or_else(|| Error::Corrupt(format!("event time {} has no period", event.time_ms)))?;
        // Canonical JSON of the group (a sorted map); most meters have none.
        let group_text = if m.group.is_empty() {
            std::borrow::Cow::Borrowed("{}")
        } else {
            std::borrow::Cow::Owned(serde_json::to_string(&m.group).unwrap_or_default())
        };
        let series = keys::series(&meter.key, &event.subject, &group_text);
        let window_key = keys::window(&event.tenant, &series, start);
        Ok(Target {
            series,
            window_key,
            start,
            size,
            period_start,
            period_end,
        })
    }

    /// Whether folding `m` into `target` keeps every sum exact: the window's, and the
    /// period's when the window is already closed (a late event goes into both).
    fn fits(&mut self, tenant: &str, m: &Measure<'_>, target: &Target) -> Result<bool> {
        let Some(value) = m.value.filter(|_| m.meter.aggregation.sums()) else {
            return Ok(true);
        };
        let watermark = self.tenant_watermark(tenant);
        let (window_sum, closed) = match self.peek_window(&target.window_key)? {
            Some(record) => (record.agg.sum, record.closed),
            None => (Decimal::ZERO, target.start + target.size <= watermark),
        };
        if decimal::exact_add(window_sum, value).is_none() {
            return Ok(false);
        }
        if closed {
            let period_key = keys::period(tenant, &target.series, target.period_start);
            let period = self.load_period(&period_key)?;
            let fits = decimal::exact_add(period.sum, value).is_some();
            self.store_period(period_key, period);
            return Ok(fits);
        }
        Ok(true)
    }

    /// The window record at `key`, read into the batch cache (unchanged) if it was not there.
    fn peek_window(&mut self, key: &[u8]) -> Result<Option<&WindowRecord>> {
        if !self.windows.contains_key(key) {
            let Some(record) = self.get_record::<WindowRecord>(key)? else {
                return Ok(None);
            };
            self.windows.insert(
                key.to_vec(),
                CachedWindow {
                    record,
                    dirty: false,
                },
            );
        }
        Ok(self.windows.get(key).map(|cached| &cached.record))
    }

    fn fold(&mut self, event: &Event, m: &Measure<'_>, target: Target) -> Result<()> {
        let meter = m.meter;
        let Target {
            series,
            window_key,
            start,
            size,
            period_start,
            period_end,
        } = target;
        let tenant = event.tenant.as_str();
        let watermark = self.tenant_watermark(tenant);
        let existing = self.load_window(&window_key)?;
        let is_new = existing.is_none();
        let mut record = existing.unwrap_or_else(|| WindowRecord {
            tenant: tenant.to_owned(),
            meter: meter.key.clone(),
            customer: event.subject.clone(),
            group: m.group.clone(),
            aggregation: meter.aggregation,
            window_start_ms: start,
            window_end_ms: start + size,
            period_start_ms: period_start,
            period_end_ms: period_end,
            agg: Aggregate::default(),
            revision: 0,
            // A window whose end the tenant's watermark already passed is closed, even if
            // empty so far.
            closed: start + size <= watermark,
            period_new: 0,
        });

        // Distinct values: per window, and "first window of the period" per value.
        let mut new_in_window = false;
        let mut new_in_closed_period = false;
        if let Some(value) = &m.distinct {
            let value_key = keys::window_value(tenant, &series, start, value);
            if self.get(&value_key)?.is_none() {
                new_in_window = true;
                self.put(value_key, Vec::new());
            }
            let first_key = keys::period_value(tenant, &series, period_start, value);
            let first = self.get(&first_key)?.and_then(|v| keys::time_from(&v));
            match first {
                None => {
                    self.put(first_key, keys::time_bytes(start).to_vec());
                    record.period_new += 1;
                    new_in_closed_period = record.closed;
                }
                Some(first) if first > start => {
                    self.put(first_key, keys::time_bytes(start).to_vec());
                    record.period_new += 1;
                    let later_key = keys::window(tenant, &series, first);
                    if let Some(mut later) = self.load_window(&later_key)? {
                        later.period_new = later.period_new.saturating_sub(1);
                        // Counted by the closed period now, through this window; the later
                        // window must not count it again when it closes.
                        new_in_closed_period = record.closed && !later.closed;
                        self.store_window(later_key, later);
                    }
                }
                Some(_) => {}
            }
        }
        let aggregation = record.aggregation;
        // `fits` checked the sums; a failure here would be a broken invariant.
        record
            .agg
            .add(
                aggregation,
                m.value,
                event.time_ms,
                &event.id,
                new_in_window,
            )
            .map_err(|_| overflow(&record))?;

        if record.closed {
            // A late event: the closed period absorbs it and the window is re-emitted.
            self.counts.late += 1;
            record.revision += 1;
            let period_key = keys::period(tenant, &series, period_start);
            let mut period = self.load_period(&period_key)?;
            period
                .add(
                    aggregation,
                    m.value,
                    event.time_ms,
                    &event.id,
                    new_in_closed_period,
                )
                .map_err(|_| overflow(&record))?;
            self.emit(&record, &period);
            self.store_period(period_key, period);
            self.store_window(window_key, record);
        } else {
            if is_new {
                self.put(open_key(record.window_end_ms, &window_key), Vec::new());
                self.clock_mut(tenant)?
                    .open
                    .insert((record.window_end_ms, window_key.clone()));
            }
            self.store_window(window_key, record);
        }
        Ok(())
    }

    /// For each tenant of the partition without events for `idle`, lets its event time run on
    /// with processing time: its watermark may become the later of (highest event time +
    /// idle time) and the wall clock, minus grace. That advance is not applied here: it is
    /// queued as an [`Output::Tick`], to be written to the partition itself and applied when
    /// read back ([`Self::apply_tick`]). The partition's state is thereby a function of its
    /// messages alone, and replaying it closes every window at the same point.
    ///
    /// Call once per batch. Nothing is queued for a tenant before its first event, while an
    /// earlier tick of it is still in flight (for up to `retry_after`), or when the advance
    /// would close none of its windows. Returns how many ticks were queued.
    pub fn idle_ticks(
        &mut self,
        idle: std::time::Duration,
        grace_ms: i64,
        wall_ms: i64,
        retry_after: std::time::Duration,
    ) -> usize {
        let now = Instant::now();
        let mut queued = 0;
        for (tenant, clock) in &mut self.clocks {
            if std::mem::take(&mut clock.touched) {
                clock.last_event_at = now;
                continue;
            }
            let idle_for = now.saturating_duration_since(clock.last_event_at);
            let in_flight = clock
                .tick_sent_at
                .is_some_and(|sent| now.saturating_duration_since(sent) < retry_after);
            if clock.max_event_time == i64::MIN || idle_for < idle || in_flight {
                continue;
            }
            let idle_ms = i64::try_from(idle_for.as_millis()).unwrap_or(i64::MAX);
            let event_clock = clock.max_event_time.saturating_add(idle_ms).max(wall_ms);
            let watermark = event_clock.saturating_sub(grace_ms);
            let closes_a_window = clock.open.first().is_some_and(|(end, _)| *end <= watermark);
            if watermark <= clock.watermark || !closes_a_window {
                continue;
            }
            clock.tick_sent_at = Some(now);
            self.outputs.push(Output::Tick {
                partition: self.partition,
                tenant: tenant.clone(),
                watermark,
            });
            queued += 1;
        }
        queued
    }

    /// Applies a watermark tick read at `offset` (see [`Self::idle_ticks`]): to its tenant, or
    /// to every tenant for a tick written before clocks were per tenant (no tenant named).
    pub fn apply_tick(&mut self, offset: i64, tenant: Option<&str>, watermark: i64) -> Result<()> {
        self.next_offset = Some(offset + 1);
        match tenant {
            Some(tenant) => {
                self.clock_mut(tenant)?.tick_sent_at = None;
                self.advance_to(tenant, watermark)
            }
            None => {
                // As the partition-wide watermark did: tenants not seen here yet start from
                // it too, and it is stored, so a replay after a restart applies it the same.
                if watermark > self.initial_clock.1 {
                    self.initial_clock.1 = watermark;
                    self.initial_dirty = true;
                }
                let mut tenants: Vec<String> = self.clocks.keys().cloned().collect();
                tenants.sort_unstable();
                for tenant in tenants {
                    self.advance_to(&tenant, watermark)?;
                }
                Ok(())
            }
        }
    }

    /// Raises `tenant`'s watermark to `watermark` (never lowers it) and closes every window of
    /// the tenant it passed, in order of end time.
    pub fn advance_to(&mut self, tenant: &str, watermark: i64) -> Result<()> {
        let clock = self.clock_mut(tenant)?;
        if watermark <= clock.watermark {
            return Ok(());
        }
        clock.watermark = watermark;
        clock.dirty = true;
        let mut closing = Vec::new();
        while clock.open.first().is_some_and(|(end, _)| *end <= watermark) {
            closing.extend(clock.open.pop_first());
        }
        for (end, window_key) in closing {
            self.close(end, window_key)?;
        }
        Ok(())
    }

    fn close(&mut self, end: i64, window_key: Vec<u8>) -> Result<()> {
        self.delete(open_key(end, &window_key));
        let Some(mut record) = self.load_window(&window_key)? else {
            return Ok(());
        };
        record.closed = true;
        record.revision += 1;
        self.counts.closed_window_ends.push(record.window_end_ms);
        let period_key = keys::period_of_window(&window_key, record.period_start_ms)
            .ok_or_else(|| Error::Corrupt("malformed window key".into()))?;
        let mut period = self.load_period(&period_key)?;
        let before = period.clone();
        match period.merge(record.aggregation, &record.agg) {
            Ok(()) => {
                period.distinct += record.period_new;
                self.emit(&record, &period);
                self.store_period(period_key, period);
            }
            Err(_) => {
                // Each event fitted its window, but the window does not fit its period: the
                // window's rollup is dead-lettered with the reason, the period stays as it
                // was, and the partition goes on.
                let rollup = rollup_of(&record, &before);
                let rejection = Rejection::new(
                    RejectCode::ValueOutOfRange,
                    format!(
                        "meter `{}`: the window's sum does not fit its period's exact decimal range",
                        record.meter
                    ),
                );
                let offset = self.next_offset.map_or(-1, |next| next - 1);
                let (key, payload) = (rollup.key(), rollup.encode());
                self.dead_letter(Some(key.as_bytes()), &payload, rejection, offset);
                self.store_period(period_key, before);
            }
        }
        self.store_window(window_key, record);
        Ok(())
    }

    fn emit(&mut self, record: &WindowRecord, period: &Aggregate) {
        self.counts.rollups += 1;
        self.outputs.push(Output::Rollup(rollup_of(record, period)));
    }

    /// Writes the batch: pending state, next offset and watermark, atomically.
    /// Call only after every output of the batch was acknowledged by the broker.
    pub fn commit(&mut self) -> Result<()> {
        // Records are stored in postcard (compact binary serde): encoding them was a large
        // share of the write cost as JSON.
        let mut writes: Vec<Write<'_>> =
            Vec::with_capacity(self.windows.len() + self.periods.len() + self.overlay.len());
        for (key, cached) in &self.windows {
            if cached.dirty {
                writes.push((key, Some(encode_record(&cached.record)?.into())));
            }
        }
        for (key, period) in &self.periods {
            writes.push((key, Some(encode_record(period)?.into())));
        }
        for (key, value) in &self.overlay {
            writes.push((key, value.as_deref().map(Into::into)));
        }
        // In key order: each memtable insert then starts from where the previous one ended.
        writes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut batch = WriteBatch::default();
        for (key, value) in writes {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            }
        }
        if let Some(next) = self.next_offset {
            batch.put(keys::META_OFFSET, keys::time_bytes(next));
        }
        if std::mem::take(&mut self.initial_dirty) {
            let (max_event_time, watermark) = self.initial_clock;
            batch.put(keys::META_MAX_EVENT_TIME, keys::time_bytes(max_event_time));
            batch.put(keys::META_WATERMARK, keys::time_bytes(watermark));
        }
        for (tenant, clock) in &mut self.clocks {
            if std::mem::take(&mut clock.dirty) {
                let mut key = CLOCK_PREFIX.to_vec();
                key.extend_from_slice(tenant.as_bytes());
                let mut value = keys::time_bytes(clock.max_event_time).to_vec();
                value.extend_from_slice(&keys::time_bytes(clock.watermark));
                batch.put(key, value);
            }
        }
        // The WAL is written (not fsynced): a killed process loses nothing, since the OS holds
        // the pages; only a power loss could, and then the batch is replayed from Kafka.
        self.db.write_opt(batch, &WriteOptions::default())?;
        self.periods.clear();
        self.overlay.clear();
        // Written: the cache now equals the store. Closed windows leave it (only a late event
        // reads one again).
        self.windows.retain(|_, cached| {
            cached.dirty = false;
            !cached.record.closed
        });
        Ok(())
    }

    /// Approximate on-disk size and pending compaction bytes, for metrics.
    pub fn disk_usage(&self) -> (u64, u64) {
        let prop = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        (
            prop("rocksdb.total-sst-files-size") + prop("rocksdb.size-all-mem-tables"),
            prop("rocksdb.estimate-pending-compaction-bytes"),
        )
    }
}

/// The next offset stored in the partition state at `dir`, read without taking the lock
/// (for operators and tests; the owner may be running).
pub fn stored_offset(dir: &Path) -> Result<Option<i64>> {
    let db = DB::open_for_read_only(&Options::default(), dir, false)?;
    Ok(db.get(keys::META_OFFSET)?.and_then(|v| keys::time_from(&v)))
}

/// The directory of one partition's state under the aggregator's state root.
pub fn partition_dir(state_root: &Path, topic: &str, partition: i32) -> std::path::PathBuf {
    state_root.join(format!("{topic}-{partition}"))
}

fn encode_record<T: Serialize>(record: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(record).map_err(|e| Error::Corrupt(format!("record encoding: {e}")))
}

fn open_key(end: i64, window_key: &[u8]) -> Vec<u8> {
    let mut key = OPEN_PREFIX.to_vec();
    key.extend_from_slice(&keys::time_bytes(end));
    key.extend_from_slice(window_key);
    key
}

/// The rollup of a window record with its period-to-date aggregate.
fn rollup_of(record: &WindowRecord, period: &Aggregate) -> Rollup {
    Rollup {
        v: 1,
        tenant: record.tenant.clone(),
        meter: record.meter.clone(),
        customer: record.customer.clone(),
        group: record.group.clone(),
        aggregation: record.aggregation,
        window_start_ms: record.window_start_ms,
        window_end_ms: record.window_end_ms,
        period_start_ms: record.period_start_ms,
        period_end_ms: record.period_end_ms,
        window_quantity: record.agg.quantity(record.aggregation),
        window_events: record.agg.count,
        period_quantity: period.quantity(record.aggregation),
        period_events: period.count,
        revision: record.revision,
    }
}

fn overflow(record: &WindowRecord) -> Error {
    Error::Overflow(format!(
        "tenant {} meter {} window {}: the sum exceeds the exact decimal range",
        record.tenant, record.meter, record.window_start_ms
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: Timing = Timing {
        grace_ms: 0,
        correction_horizon_ms: 35 * DAY_MS,
        dedup_horizon_ms: 35 * DAY_MS,
    };

    #[test]
    fn compaction_drops_only_entries_past_their_horizon() {
        let now = 100 * DAY_MS;
        let dedup = keys::dedup("acme", "e-1");
        let fresh = keys::time_bytes(now - 35 * DAY_MS);
        let stale = keys::time_bytes(now - 36 * DAY_MS - 1);
        assert!(!expired(&dedup, &fresh, now, TIMING));
        assert!(expired(&dedup, &stale, now, TIMING));

        let series = keys::series("calls", "c1", "{}");
        let recent_window = keys::window("acme", &series, now - 36 * DAY_MS);
        let old_window = keys::window("acme", &series, now - 37 * DAY_MS - 1);
        assert!(!expired(&recent_window, b"{}", now, TIMING));
        assert!(expired(&old_window, b"{}", now, TIMING));

        // Periods, distinct values and metadata are never dropped by age.
        let period = keys::period("acme", &series, 0);
        assert!(!expired(&period, b"{}", now, TIMING));
        assert!(!expired(
            keys::META_OFFSET,
            &keys::time_bytes(0),
            now,
            TIMING
        ));
    }

    /// State as the aggregator wrote it before clocks were per tenant: one partition-wide
    /// watermark and max event time, and one open window of `acme` ending at `end`.
    fn legacy_state(dir: &Path, watermark: i64, end: i64) -> Vec<u8> {
        let db = DB::open_default(dir).expect("open");
        let series = keys::series("calls", "c1", "{}");
        let window_key = keys::window("acme", &series, end - 60_000);
        let record = WindowRecord {
            tenant: "acme".into(),
            meter: "calls".into(),
            customer: "c1".into(),
            group: BTreeMap::new(),
            aggregation: Aggregation::Count,
            window_start_ms: end - 60_000,
            window_end_ms: end,
            period_start_ms: 0,
            period_end_ms: 100 * DAY_MS,
            agg: Aggregate {
                count: 2,
                ..Aggregate::default()
            },
            revision: 0,
            closed: false,
            period_new: 0,
        };
        let put = |key: &[u8], value: &[u8]| db.put(key, value).expect("put");
        put(keys::META_OFFSET, &keys::time_bytes(7));
        put(keys::META_WATERMARK, &keys::time_bytes(watermark));
        put(keys::META_MAX_EVENT_TIME, &keys::time_bytes(watermark));
        put(&window_key, &encode_record(&record).expect("encode"));
        put(&open_key(end, &window_key), b"");
        window_key
    }

    #[test]
    fn state_from_before_per_tenant_clocks_opens_with_its_partition_clock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let (watermark, end) = (10 * DAY_MS, 10 * DAY_MS + 60_000);
        legacy_state(dir.path(), watermark, end);

        let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("open");
        assert_eq!(state.next_offset(), Some(7));
        assert_eq!(state.open_windows(), 1);
        // The tenant with the open window, and one never seen, start from the legacy clock.
        assert_eq!(state.tenant_watermark("acme"), watermark);
        assert_eq!(state.tenant_watermark("globex"), watermark);

        // A tick without a tenant (also written before the change) advances every tenant,
        // those not seen yet included, and survives a restart.
        state.apply_tick(7, None, end).expect("tick");
        let outputs = state.take_outputs();
        let closed: Vec<(String, i64, Decimal, u32)> = outputs
            .iter()
            .filter_map(|o| match o {
                Output::Rollup(r) => Some((
                    r.tenant.clone(),
                    r.window_end_ms,
                    r.window_quantity,
                    r.revision,
                )),
                _ => None,
            })
            .collect();
        assert_eq!(closed, vec![("acme".to_owned(), end, Decimal::from(2), 1)]);
        state.commit().expect("commit");
        drop(state);
        let state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("reopen");
        assert_eq!(state.next_offset(), Some(8));
        assert_eq!(state.open_windows(), 0);
        assert_eq!(state.tenant_watermark("acme"), end);
        assert_eq!(state.tenant_watermark("globex"), end);
    }

    #[test]
    fn the_shortcut_for_an_empty_group_is_its_canonical_json() {
        // Window keys written before and after the shortcut must be the same keys.
        let empty = BTreeMap::<String, String>::new();
        assert_eq!(serde_json::to_string(&empty).ok().as_deref(), Some("{}"));
    }
}
