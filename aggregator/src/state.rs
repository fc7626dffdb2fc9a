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
//! what the next events touch), always equal to what is stored once a batch is written, and are
//! loaded when the state opens, so the store is never read for a window that ends after its
//! tenant's watermark (it would be open, hence in memory, if it existed); period aggregates
//! stay in memory between batches too, up to a bound, likewise equal to the store once
//! written (a series' period is read at each of its windows' closes); open windows are
//! indexed under a metadata prefix so a restart finds them without scanning the
//! data; each tenant's clock is stored under a metadata prefix too, with the offsets.
//!
//! Where things happen: this file is the store and the door ([`PartitionState::apply`]:
//! decode, too-old rule, dedup, metering, then the fold); `window` folds measures into
//! windows and periods and closes windows into rollups; `watermark` keeps each tenant's
//! event time, sends idle ticks and advances the watermark that closes windows.

mod watermark;
mod window;

use crate::keys;
use crate::{Error, Result};
use ahash::AHashMap as HashMap;
use neruba_schemas::catalog::Aggregation;
use neruba_schemas::measure::measure;
use neruba_schemas::rollup::{Aggregate, Rollup};
use neruba_schemas::{Catalog, Event, RejectCode, Rejection, codec};
use neruba_stage::{DeadLetter, Input, Store, StoreOptions};
use rocksdb::{Cache, WriteBatch};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use watermark::Clock;

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
    /// Most bytes of open windows one tenant may hold in a partition, each counted as
    /// [`open_cost`]: an event that would open windows past it is dead-lettered
    /// (`too_many_open_windows`). Open windows are kept in memory, so without a bound a client
    /// sending ever new customers or group values could grow the stage until it stopped.
    pub max_open_window_bytes: usize,
}

/// The default of [`Timing::max_open_window_bytes`]: 256 MiB, about 150,000 open windows
/// with keys of 60 bytes.
pub const MAX_OPEN_WINDOW_BYTES: usize = 256 << 20;

/// What an open window is counted as against [`Timing::max_open_window_bytes`], from its key
/// alone (so a reopened state counts its open windows as they were counted when opened):
/// the key four times (in the window cache and the open index, and as the record's strings
/// and group map) and 1.5 KiB for the record's other fields, the strings' and maps' headers
/// and the tables' slots. `benches/open_windows_memory.rs` measured 1,298 resident bytes per
/// window with keys of 61 bytes, 3,089 with group values of 1 KiB in half of them: this counts
/// 1.37 and 1.24 × that.
pub fn open_cost(window_key: &[u8]) -> usize {
    window_key.len().saturating_mul(4).saturating_add(1536)
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
    DeadLetter(DeadLetter),
}

impl neruba_stage::AsDeadLetter for Output {
    fn dead_letter(&self) -> Option<&DeadLetter> {
        match self {
            Self::DeadLetter(letter) => Some(letter),
            Self::Rollup(_) | Self::Tick { .. } => None,
        }
    }
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

/// Most bytes of period aggregates kept in memory between batches, per partition, each
/// counted as [`CachedPeriod::bytes`]. A batch that leaves more drops them all (their table
/// too) once written, and the next reads them from the store. Within a batch, the periods it
/// touches are held until its write, as they always were.
const PERIOD_BYTES_KEPT: usize = 4 << 20;

/// Most outputs a vector of them is sized for before it fills (see
/// [`PartitionState::take_outputs`]).
const OUTPUTS_RESERVED: usize = 8192;

/// A period aggregate in memory, and whether the batch changed it (so it must be written).
struct CachedPeriod {
    period: Aggregate,
    dirty: bool,
}

impl CachedPeriod {
    /// What an entry holds, counted generously: its key, its latest event's id, and 256 bytes
    /// for the aggregate, the key's and id's headers and the table's slot.
    fn bytes(key: &[u8], cached: &Self) -> usize {
        let id = cached.period.latest.as_ref().map_or(0, |l| l.id.len());
        key.len() + id + 256
    }
}

/// A window record in memory, and whether the batch changed it.
struct CachedWindow {
    record: WindowRecord,
    dirty: bool,
}

/// How many messages the stage reads ahead ([`PartitionState::read_ahead`]): enough that
/// RocksDB's batched lookup pays off, few enough that the events decoded ahead stay small.
pub const READ_AHEAD: usize = 250;

/// An event decoded ahead of its turn ([`PartitionState::read_ahead`]).
struct Ahead {
    offset: i64,
    event: Event,
    /// [`keys::dedup`] of the event.
    dedup_key: Vec<u8>,
    /// What the store held under `dedup_key` when it was read ahead: the first copy's
    /// anchor time, `None` if no copy was stored.
    stored: Option<i64>,
}

/// The state of one partition.
pub struct PartitionState {
    pub partition: i32,
    store: Store,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Window records touched by the batch (dirty, encoded once at commit; closed ones leave
    /// at commit) and the record of every open window (loaded at open, kept across batches).
    windows: HashMap<Vec<u8>, CachedWindow>,
    /// Period aggregates: those the batch touched (changed ones encoded once at commit), and
    /// those of earlier batches up to [`PERIOD_BYTES_KEPT`] (each series' period is read again
    /// when its next window closes).
    periods: HashMap<Vec<u8>, CachedPeriod>,
    timing: Timing,
    /// Per tenant: event time and open windows.
    clocks: HashMap<String, Clock>,
    /// The clock a tenant starts with: the partition-wide clock of state written before
    /// clocks were per tenant (a one-time migration), else the far past. A tick without a
    /// tenant (written before clocks were per tenant) raises it too.
    initial_clock: (i64, i64),
    /// `initial_clock` changed: written at commit.
    initial_dirty: bool,
    /// [`keys::META_LEGACY_DEDUP_UNTIL`]: a repeat received up to then is also looked up
    /// under its legacy key.
    legacy_dedup_until: i64,
    /// `legacy_dedup_until` is not stored yet: written at commit.
    legacy_dedup_dirty: bool,
    outputs: Vec<Output>,
    counts: Counts,
    decoder: codec::Decoder,
    /// The event being applied, its allocations reused by the next.
    event: Event,
    /// The next events, decoded ahead with what the store holds under their dedup keys
    /// ([`Self::read_ahead`]), in offset order; until the next write.
    ahead: VecDeque<Ahead>,
    /// Events applied from `ahead`, their allocations reused by the next read ahead.
    spare: Vec<Event>,
    /// [`PERIOD_BYTES_KEPT`], lowered by tests.
    period_bytes_kept: usize,
    /// The billing period found last (see [`window::LastPeriod`]).
    last_period: Option<window::LastPeriod>,
    /// The latest receive time of an event applied: how far the input has come, for expiry.
    received_max: i64,
    /// A day past the wall clock at the last write: an event received later than that (a
    /// gateway's clock far ahead) does not move `received_max`, which never goes back.
    received_cap: i64,
    /// The catalog whose meter shapes were last kept ([`crate::meters`]).
    pub(crate) meters_kept_for: Option<std::sync::Arc<neruba_schemas::Catalog>>,
}

impl std::fmt::Debug for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionState")
            .field("partition", &self.partition)
            .field("next_offset", &self.store.next_offset())
            .field("tenants", &self.clocks.len())
            .field("open_windows", &self.open_windows())
            .finish()
    }
}

/// How partition stores are tuned: memtables sized for the event rate, a whole-key bloom
/// filter on the memtable (most lookups are dedup checks of new ids, and it answers those
/// misses without a skiplist search), and compaction dropping dedup entries and window
/// records past the horizons (expiry without a scan).
pub fn store_options(timing: Timing) -> StoreOptions {
    StoreOptions {
        write_buffer_bytes: 16 * 1024 * 1024,
        max_write_buffers: Some(2),
        memtable_bloom: true,
        index_in_cache: false,
        expiry: Some(std::sync::Arc::new(
            move |key: &[u8], value: &[u8], now_ms: i64| expired(key, value, now_ms, timing),
        )),
        // The receive times the partition has come to, not the wall clock: an aggregator days
        // behind would otherwise drop the dedup entries and windows of the events it has yet
        // to read (until December 6, 2026: a repeat 35 days after its first copy counted
        // again, and a window 35 days old started again at revision 1, after 1 and 2 days
        // behind).
        expiry_clock: neruba_stage::ExpiryClock::Progress,
    }
}

/// Whether compaction may drop this entry at `now_ms`, the earlier of the wall clock and the
/// latest receive time the partition applied (an event read later may have been received up
/// to about a day before that, as the gateways' clocks and batching spread them): a dedup entry
/// a day past the dedup horizon, or a window record two days past the correction horizon (no
/// event can reach it any more: it would be dead-lettered as too old). Everything else is
/// kept.
pub fn expired(key: &[u8], value: &[u8], now_ms: i64, timing: Timing) -> bool {
    match keys::kind_of(key) {
        Some(b'D' | b'E') => keys::time_from(value).is_some_and(|t| {
            t < now_ms.saturating_sub(timing.dedup_horizon_ms.saturating_add(DAY_MS))
        }),
        Some(b'W') => key
            .len()
            .checked_sub(8)
            .and_then(|at| keys::time_from(&key[at..]))
            .is_some_and(|start| {
                start
                    < now_ms.saturating_sub(timing.correction_horizon_ms.saturating_add(2 * DAY_MS))
            }),
        _ => false,
    }
}

impl PartitionState {
    /// Opens (or creates) the state of `partition` under `dir`.
    pub fn open(dir: &Path, partition: i32, timing: Timing, cache: &Cache) -> Result<Self> {
        Self::from_store(
            Store::open(dir, partition, &store_options(timing), cache)?,
            timing,
        )
    }

    /// The state kept in `store` (opened with [`store_options`]).
    pub fn from_store(store: Store, timing: Timing) -> Result<Self> {
        let db = store.db();
        let read_i64 = |key: &[u8]| -> Result<Option<i64>> {
            Ok(db.get(key)?.and_then(|v| keys::time_from(&v)))
        };
        // State written before clocks were per tenant has one partition-wide clock: every
        // tenant starts from it (a one-time migration; fresh state starts in the far past).
        let initial_clock = (
            read_i64(keys::META_MAX_EVENT_TIME)?.unwrap_or(i64::MIN),
            read_i64(keys::META_WATERMARK)?.unwrap_or(i64::MIN),
        );
        // State that applied events before ids were kept per customer holds legacy dedup
        // entries, each at most the horizon old by now (a one-time decision, kept).
        let (legacy_dedup_until, legacy_dedup_dirty) =
            match read_i64(keys::META_LEGACY_DEDUP_UNTIL)? {
                Some(until) => (until, false),
                None if store.next_offset().is_some() => (
                    neruba_schemas::event::now_ms()
                        .saturating_add(timing.dedup_horizon_ms)
                        .saturating_add(DAY_MS),
                    true,
                ),
                None => (i64::MIN, true),
            };
        let mut clocks: HashMap<String, Clock> = HashMap::new();
        for item in db.prefix_iterator(CLOCK_PREFIX) {
            let (key, value) = item?;
            if !key.starts_with(CLOCK_PREFIX) {
                break;
            }
            let tenant = String::from_utf8(key[CLOCK_PREFIX.len()..].to_vec())
                .map_err(|e| Error::corrupt("tenant clock key", e))?;
            let max = keys::time_from(&value);
            let watermark = value.get(8..).and_then(keys::time_from);
            let (Some(max), Some(watermark)) = (max, watermark) else {
                return Err(Error::corrupt(
                    format!("clock of tenant {tenant}"),
                    "not 16 bytes",
                ));
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
                    .open_window(end, window_key);
            }
        }
        // Every open window's record is kept in memory (see `load_window`).
        let mut windows = HashMap::new();
        for (_, key) in clocks.values().flat_map(|clock| &clock.open) {
            if let Some(bytes) = store.get(key)? {
                let record = postcard::from_bytes(&bytes).map_err(|e| {
                    Error::corrupt(
                        format!("partition {} open window record", store.partition()),
                        e,
                    )
                })?;
                let cached = CachedWindow {
                    record,
                    dirty: false,
                };
                windows.insert(key.clone(), cached);
            }
        }
        Ok(Self {
            partition: store.partition(),
            store,
            overlay: HashMap::new(),
            windows,
            periods: HashMap::new(),
            timing,
            clocks,
            initial_clock,
            initial_dirty: false,
            legacy_dedup_until,
            legacy_dedup_dirty,
            outputs: Vec::new(),
            counts: Counts::default(),
            decoder: codec::Decoder::default(),
            event: Event::default(),
            ahead: VecDeque::new(),
            spare: Vec::new(),
            period_bytes_kept: PERIOD_BYTES_KEPT,
            last_period: None,
            received_max: i64::MIN,
            received_cap: neruba_schemas::event::now_ms().saturating_add(DAY_MS),
            meters_kept_for: None,
        })
    }

    /// The next offset to consume, if any event was ever applied.
    pub fn next_offset(&self) -> Option<i64> {
        self.store.next_offset()
    }

    /// Windows not yet closed.
    pub fn open_windows(&self) -> usize {
        self.clocks.values().map(|c| c.open.len()).sum()
    }

    /// What the open windows count against [`Timing::max_open_window_bytes`], all tenants.
    pub fn open_window_bytes(&self) -> usize {
        self.clocks.values().map(|c| c.open_bytes).sum()
    }

    /// Why `event` may not be folded into `targets`, if the windows it would open would take
    /// its tenant past [`Timing::max_open_window_bytes`]. A window opens when it ends after
    /// the tenant's watermark and is not open yet (every open window is in the cache; an
    /// open-index entry whose record was never written, which only older state can hold, is
    /// not, and counts as opening: stricter, and still decided by the store alone).
    fn opens_too_many(&self, event: &Event, targets: &[window::Target]) -> Option<Rejection> {
        let limit = self.timing.max_open_window_bytes;
        let clock = self.clocks.get(&event.tenant);
        let held = clock.map_or(0, |c| c.open_bytes);
        // Most events fit even if every target were new: nothing is looked up for them.
        let at_most: usize = targets.iter().map(|t| open_cost(&t.window_key)).sum();
        if held.saturating_add(at_most) <= limit {
            return None;
        }
        let watermark = self.tenant_watermark(&event.tenant);
        let opening: usize = targets
            .iter()
            .filter(|t| t.start.saturating_add(t.size) > watermark)
            .filter(|t| !self.windows.contains_key(&t.window_key))
            .map(|t| open_cost(&t.window_key))
            .sum();
        if held.saturating_add(opening) <= limit {
            return None;
        }
        let Some(clock) = clock else {
            return Some(self.too_many(event, held, opening));
        };
        // Folded, the event would raise the watermark (when it is the tenant's latest) and
        // close the windows it passes, whose bytes are then free: a tenant at its bound opens
        // the next windows as time moves on.
        let after = if event.time_ms > clock.max_event_time {
            watermark.max(event.time_ms.saturating_sub(self.timing.grace_ms))
        } else {
            watermark
        };
        let held = clock.open_bytes.saturating_sub(clock.closing_bytes(after));
        (held.saturating_add(opening) > limit).then(|| self.too_many(event, held, opening))
    }

    /// The refusal of an event whose new windows (`opening` bytes) do not fit beside the
    /// `held` bytes of its tenant's open windows.
    fn too_many(&self, event: &Event, held: usize, opening: usize) -> Rejection {
        Rejection::new(
            RejectCode::TooManyOpenWindows,
            format!(
                "tenant `{}` holds {held} bytes of open windows in partition {}: the {opening} \
                 bytes of the windows this event would open pass the aggregator's \
                 --max-open-window-bytes ({}); they are free again as the windows close",
                event.tenant, self.partition, self.timing.max_open_window_bytes
            ),
        )
    }

    /// Whether the batch has anything to write.
    pub fn is_dirty(&self) -> bool {
        !self.overlay.is_empty()
            || self.windows.values().any(|w| w.dirty)
            || self.periods.values().any(|p| p.dirty)
            || !self.outputs.is_empty()
    }

    /// Outputs since the last call, in order; the caller delivers them before [`neruba_stage::Partition::commit`].
    pub fn take_outputs(&mut self) -> Vec<Output> {
        // The next vector's sized like this one's (up to a bound, so that a catch-up closing
        // many windows at once leaves no large reservation behind), so it is not grown (and
        // copied) as it fills.
        let capacity = self.outputs.len().min(OUTPUTS_RESERVED);
        std::mem::replace(&mut self.outputs, Vec::with_capacity(capacity))
    }

    /// Counts of the batch so far.
    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// What `f` makes of the value under `key`: the batch's pending write, else the stored one.
    fn read<R>(&self, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
        match self.overlay.get(key) {
            Some(pending) => Ok(pending.as_deref().map(f)),
            None => Ok(self.store.get(key)?.as_deref().map(f)),
        }
    }

    fn get_record<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        self.read(key, |bytes| postcard::from_bytes::<T>(bytes))?
            .transpose()
            .map_err(|e| Error::corrupt(format!("partition {} record", self.partition), e))
    }

    /// Takes a window record out of the batch cache (or the store); put it back with
    /// [`Self::store_window`]. `may_be_stored` is whether the window ends at or before its
    /// tenant's watermark: one ending after it would be open, and every open window's record
    /// is in the cache (loaded at open, kept across batches), so a miss then means none
    /// exists and the store is not read.
    fn load_window(&mut self, key: &[u8], may_be_stored: bool) -> Result<Option<WindowRecord>> {
        match self.windows.remove(key) {
            Some(cached) => Ok(Some(cached.record)),
            None if may_be_stored => self.get_record(key),
            None => Ok(None),
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

    /// Takes a period aggregate out of the cache (or the store; a new one is empty); put it
    /// back with [`Self::store_period`].
    fn load_period(&mut self, key: &[u8]) -> Result<Aggregate> {
        match self.periods.remove(key) {
            Some(cached) => Ok(cached.period),
            None => Ok(self.get_record(key)?.unwrap_or_default()),
        }
    }

    fn store_period(&mut self, key: Vec<u8>, period: Aggregate) {
        self.periods.insert(
            key,
            CachedPeriod {
                period,
                dirty: true,
            },
        );
    }

    /// The sum of the period aggregate at `key`, read into the cache (unchanged) if it was
    /// not there.
    fn peek_period_sum(&mut self, key: Vec<u8>) -> Result<rust_decimal::Decimal> {
        if let Some(cached) = self.periods.get(&key) {
            return Ok(cached.period.sum);
        }
        let period: Aggregate = self.get_record(&key)?.unwrap_or_default();
        let sum = period.sum;
        let cached = CachedPeriod {
            period,
            dirty: false,
        };
        self.periods.insert(key, cached);
        Ok(sum)
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.overlay.insert(key, Some(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.overlay.insert(key, None);
    }

    /// Dead-letters `input` with the rejection's code and message.
    fn refuse(&mut self, input: Input<'_>, rejection: Rejection) {
        let code = rejection.code.as_str();
        *self.counts.dead_letters.entry(code).or_default() += 1;
        let letter = DeadLetter::refusing(input, code, rejection.message);
        self.outputs.push(Output::DeadLetter(letter));
    }

    /// Applies the message at `offset`. Bad events become dead letters; only storage problems
    /// are errors, after which this state must be dropped unwritten (the stage runtime does:
    /// the worker stops and writes nothing more), since the batch may be half applied.
    pub fn apply(&mut self, input: Input<'_>, catalog: &Catalog) -> Result<()> {
        self.store.consumed(input.offset);
        while self.ahead.front().is_some_and(|a| a.offset < input.offset) {
            self.drop_ahead();
        }
        if self.ahead.front().is_some_and(|a| a.offset == input.offset)
            && let Some(ahead) = self.ahead.pop_front()
        {
            let known = (ahead.dedup_key, ahead.stored);
            let applied = self.apply_event(input, &ahead.event, catalog, Some(known));
            self.spare.push(ahead.event);
            return applied;
        }
        // Decoded into the last event's allocations, lent out while it is applied.
        let mut event = std::mem::take(&mut self.event);
        let applied = match self.decoder.decode_into(input.payload, &mut event) {
            Ok(()) => self.apply_event(input, &event, catalog, None),
            Err(e) => {
                let rejection = Rejection::new(RejectCode::InvalidJson, e.to_string());
                self.refuse(input, rejection);
                Ok(())
            }
        };
        self.event = event;
        applied
    }

    /// Decodes the events among `inputs` (the partition's next messages, in offset order,
    /// watermark ticks left out) and reads what the store holds under their dedup keys, all
    /// in one batched lookup, so that [`Self::apply`] finds both ready. What it reads holds
    /// until the next write ([`neruba_stage::Partition::commit`] drops what is left), which is
    /// what makes it the same as reading at apply time: within a batch the store does not
    /// change, and the batch's own writes are looked up first. A message that does not decode
    /// is left to `apply`, which refuses it.
    pub fn read_ahead(&mut self, inputs: &[Input<'_>]) -> Result<()> {
        while !self.ahead.is_empty() {
            self.drop_ahead();
        }
        for input in inputs {
            let mut event = self.spare.pop().unwrap_or_default();
            if self.decoder.decode_into(input.payload, &mut event).is_err() {
                self.spare.push(event);
                continue;
            }
            let dedup_key = keys::dedup(&event.tenant, &event.subject, &event.id);
            self.ahead.push_back(Ahead {
                offset: input.offset,
                event,
                dedup_key,
                stored: None,
            });
        }
        let mut order: Vec<usize> = (0..self.ahead.len()).collect();
        order.sort_unstable_by(|&a, &b| self.ahead[a].dedup_key.cmp(&self.ahead[b].dedup_key));
        let found = self
            .store
            .multi_get_sorted(order.iter().map(|&i| self.ahead[i].dedup_key.as_slice()))?;
        let stored: Vec<(usize, i64)> = order
            .iter()
            .zip(found)
            .filter_map(|(&i, value)| Some((i, seen_time(&value?))))
            .collect();
        for (i, time) in stored {
            self.ahead[i].stored = Some(time);
        }
        Ok(())
    }

    /// Drops the first event read ahead, keeping its allocations.
    fn drop_ahead(&mut self) {
        if let Some(ahead) = self.ahead.pop_front() {
            self.spare.push(ahead.event);
        }
    }

    /// Applies a decoded event: the too-old rule, dedup, metering, then the fold. `known` is
    /// its dedup key and what the store held under it, when read ahead.
    fn apply_event(
        &mut self,
        input: Input<'_>,
        event: &Event,
        catalog: &Catalog,
        known: Option<(Vec<u8>, Option<i64>)>,
    ) -> Result<()> {
        if event.received_ms <= self.received_cap {
            self.received_max = self.received_max.max(event.received_ms);
        }
        let Some(tenant) = catalog.tenant(&event.tenant) else {
            let rejection = Rejection::new(
                RejectCode::UnknownTenant,
                format!("tenant `{}` is not in the catalog", event.tenant),
            );
            self.refuse(input, rejection);
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
            self.refuse(input, rejection);
            return Ok(());
        }
        let (dedup_key, read_ahead) = match known {
            Some((key, stored)) => (key, Some(stored)),
            None => (keys::dedup(&event.tenant, &event.subject, &event.id), None),
        };
        // The batch's own writes first, as `read` looks; then the store, as read ahead.
        let mut first_seen = match (self.overlay.get(&dedup_key), read_ahead) {
            (Some(pending), _) => pending.as_deref().map(seen_time),
            (None, Some(stored)) => stored,
            (None, None) => self.read(&dedup_key, seen_time)?,
        };
        if first_seen.is_none() && event.received_ms <= self.legacy_dedup_until {
            first_seen = self.read(&keys::legacy_dedup(&event.tenant, &event.id), seen_time)?;
        }
        if first_seen.is_some_and(|seen_at| {
            event.received_ms.saturating_sub(seen_at) <= self.timing.dedup_horizon_ms
        }) {
            self.counts.duplicates += 1;
            return Ok(());
        }
        let measures = match measure(tenant, event) {
            Ok(measures) => measures,
            Err(rejection) => {
                self.refuse(input, rejection);
                return Ok(());
            }
        };
        // Every meter's fold is checked before any is made: an event counts whole or not at all.
        let mut targets = Vec::with_capacity(measures.len());
        for m in &measures {
            let Some(target) = self.target(event, m)? else {
                // Only a record no gateway wrote (the gateway takes times within the
                // correction horizon of now): dead-lettered, where it stopped the partition.
                let rejection = Rejection::new(
                    RejectCode::InvalidField,
                    format!(
                        "meter `{}`: the event's time has no billing period in the calendar \
                         (years 0000 to 9999 in the meter's billing time zone)",
                        m.meter.key
                    ),
                );
                self.refuse(input, rejection);
                return Ok(());
            };
            if !self.fits(&event.tenant, m, &target)? {
                let rejection = Rejection::new(
                    RejectCode::ValueOutOfRange,
                    format!(
                        "meter `{}`: adding this value to its window or period would leave the \
                         exact decimal range",
                        m.meter.key
                    ),
                );
                self.refuse(input, rejection);
                return Ok(());
            }
            targets.push(target);
        }
        if let Some(rejection) = self.opens_too_many(event, &targets) {
            self.refuse(input, rejection);
            return Ok(());
        }
        // The horizon runs from the first copy's arrival: a repeat carrying another time (one
        // sent without `time` is stamped on arrival) is still the same event. From its event
        // time when that is later (future-dated within the clock-skew allowance): a copy is
        // accepted until its time is a correction horizon old, and must still be found then.
        let anchor = event.received_ms.max(event.time_ms);
        self.put(dedup_key, keys::time_bytes(anchor).to_vec());
        for (m, target) in measures.iter().zip(targets) {
            self.fold(event, m, target)?;
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
}

impl neruba_stage::Partition for PartitionState {
    fn store(&self) -> &Store {
        &self.store
    }

    /// Writes the batch: pending state, next offset and watermark, atomically.
    /// Call only after every output of the batch was acknowledged by the broker.
    fn commit(&mut self) -> Result<()> {
        // Records are stored in postcard (compact binary serde): encoding them was a large
        // share of the write cost as JSON.
        let mut writes: Vec<Write<'_>> =
            Vec::with_capacity(self.windows.len() + self.periods.len() + self.overlay.len());
        for (key, cached) in &self.windows {
            if cached.dirty {
                writes.push((key, Some(encode_record(&cached.record)?.into())));
            }
        }
        for (key, cached) in &self.periods {
            if cached.dirty {
                writes.push((key, Some(encode_record(&cached.period)?.into())));
            }
        }
        for (key, value) in &self.overlay {
            writes.push((key, value.as_deref().map(Into::into)));
        }
        // In key order: each memtable insert then starts from where the previous one ended.
        writes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        // Sized up front (RocksDB's record of a put: a tag, two lengths, key and value), so it
        // is not copied as it grows.
        let bytes = writes
            .iter()
            .map(|(key, value)| 12 + key.len() + value.as_ref().map_or(0, |v| v.len()))
            .sum();
        let mut batch = WriteBatch::with_capacity_bytes(bytes);
        for (key, value) in writes {
            match value {
                Some(value) => batch.put(key, value),
                None => batch.delete(key),
            }
        }
        if std::mem::take(&mut self.legacy_dedup_dirty) {
            batch.put(
                keys::META_LEGACY_DEDUP_UNTIL,
                keys::time_bytes(self.legacy_dedup_until),
            );
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
        self.store.write(batch)?;
        self.store.advance_expiry_clock(self.received_max);
        self.received_cap = neruba_schemas::event::now_ms().saturating_add(DAY_MS);
        // Written: the caches now equal the store.
        let mut kept = 0;
        for (key, cached) in &mut self.periods {
            cached.dirty = false;
            kept += CachedPeriod::bytes(key, cached);
        }
        if kept > self.period_bytes_kept {
            self.periods = HashMap::default();
        }
        self.overlay.clear();
        // What was read ahead is stale once written.
        while !self.ahead.is_empty() {
            self.drop_ahead();
        }
        // Closed windows leave their cache (only a late event reads one again).
        self.windows.retain(|_, cached| {
            cached.dirty = false;
            !cached.record.closed
        });
        Ok(())
    }
}

pub use neruba_stage::{partition_dir, stored_offset};

/// The anchor time a dedup entry holds (the far past if unreadable: still a copy seen).
fn seen_time(value: &[u8]) -> i64 {
    keys::time_from(value).unwrap_or(i64::MIN)
}

fn encode_record<T: Serialize>(record: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(record).map_err(|e| Error::Bug(format!("record encoding: {e}")))
}

fn open_key(end: i64, window_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(OPEN_PREFIX.len() + 8 + window_key.len());
    key.extend_from_slice(OPEN_PREFIX);
    key.extend_from_slice(&keys::time_bytes(end));
    key.extend_from_slice(window_key);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use neruba_schemas::window::period_bounds;
    use neruba_stage::Partition as _;
    use rust_decimal::Decimal;

    /// One tenant, one summing meter of `llm` events' tokens, 1-minute windows.
    const TOKENS: &str = r#"
[[tenants]]
id = "acme"
[[tenants.meters]]
key = "tokens"
event_type = "llm"
aggregation = "sum"
value = "$.tokens"
window = "1m"
"#;

    const TIMING: Timing = Timing {
        grace_ms: 0,
        correction_horizon_ms: 35 * DAY_MS,
        dedup_horizon_ms: 35 * DAY_MS,
        max_open_window_bytes: MAX_OPEN_WINDOW_BYTES,
    };

    #[test]
    fn compaction_drops_only_entries_past_their_horizon() {
        let now = 100 * DAY_MS;
        let fresh = keys::time_bytes(now - 35 * DAY_MS);
        let stale = keys::time_bytes(now - 36 * DAY_MS - 1);
        for dedup in [
            keys::dedup("acme", "c1", "e-1"),
            keys::legacy_dedup("acme", "e-1"),
        ] {
            assert!(!expired(&dedup, &fresh, now, TIMING));
            assert!(expired(&dedup, &stale, now, TIMING));
        }

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
        let db = rocksdb::DB::open_default(dir).expect("open");
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

    /// An event of tenant `acme` with `tokens` at `time_ms`.
    /// Applies `payload` as the message at `*offset`, and moves the offset on.
    fn feed(state: &mut PartitionState, catalog: &Catalog, offset: &mut i64, payload: &[u8]) {
        let input = Input {
            offset: *offset,
            key: None,
            payload,
        };
        *offset += 1;
        state.apply(input, catalog).expect("apply");
    }

    fn tokens(id: &str, time_ms: i64, tokens: &str) -> Vec<u8> {
        tokens_of("c1", id, time_ms, tokens)
    }

    fn tokens_of(customer: &str, id: &str, time_ms: i64, tokens: &str) -> Vec<u8> {
        tokens_received(customer, id, time_ms, time_ms, tokens)
    }

    fn tokens_received(
        customer: &str,
        id: &str,
        time_ms: i64,
        received_ms: i64,
        tokens: &str,
    ) -> Vec<u8> {
        let data = serde_json::json!({ "tokens": tokens });
        codec::encode(&neruba_schemas::Event {
            tenant: "acme".into(),
            id: id.into(),
            event_type: "llm".into(),
            subject: customer.into(),
            time_ms,
            received_ms,
            source: None,
            data: data.as_object().cloned().unwrap_or_default(),
        })
    }

    /// The rollups the batch so far emitted: (window start, quantity, events, revision).
    fn emitted(state: &mut PartitionState) -> Vec<(i64, Decimal, u64, u32)> {
        state
            .take_outputs()
            .iter()
            .filter_map(|o| match o {
                Output::Rollup(r) => Some((
                    r.window_start_ms,
                    r.window_quantity,
                    r.window_events,
                    r.revision,
                )),
                _ => None,
            })
            .collect()
    }

    /// The batch's dead letters so far, (source offset, code), and its rollups, (customer,
    /// window start).
    type Refusals = (Vec<(i64, String)>, Vec<(String, i64)>);

    /// Takes the batch's outputs so far, as [`Refusals`].
    fn refusals(state: &mut PartitionState) -> Refusals {
        let mut letters = Vec::new();
        let mut rollups = Vec::new();
        for output in state.take_outputs() {
            match output {
                Output::DeadLetter(letter) => {
                    letters.push((letter.offset, letter.code.to_owned()));
                }
                Output::Rollup(r) => rollups.push((r.customer.clone(), r.window_start_ms)),
                Output::Tick { .. } => {}
            }
        }
        (letters, rollups)
    }

    #[test]
    fn an_event_whose_time_has_no_period_in_the_calendar_is_dead_lettered_and_the_partition_goes_on()
     {
        // Was: `Error::Bug`, fatal, so the stage stopped and read the same record again at each
        // restart. Only a record written to the events topic by something other than the
        // gateway can carry such a time (December 9999: its period ends in year 10000).
        let catalog = Catalog::from_toml_str(TOKENS, "test").expect("catalog");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("open");
        let mut offset = 0;
        let december_9999 = 253_402_300_800_000 - 17 * DAY_MS;
        let now = 100 * DAY_MS;
        feed(
            &mut state,
            &catalog,
            &mut offset,
            &tokens("far", december_9999, "5"),
        );
        feed(&mut state, &catalog, &mut offset, &tokens("e1", now, "7"));
        assert_eq!(
            refusals(&mut state),
            (vec![(0, "invalid_field".to_owned())], vec![])
        );
        let counts = state.take_counts();
        assert_eq!(counts.applied, 1);
        assert_eq!(counts.dead_letters.get("invalid_field"), Some(&1));
        state.commit().expect("commit");
    }

    #[test]
    fn a_tenant_opens_windows_up_to_its_bound_and_again_as_time_closes_them() {
        let catalog = Catalog::from_toml_str(
            &format!("{TOKENS}{}", TOKENS.replace("\"acme\"", "\"beta\"")),
            "test",
        )
        .expect("catalog");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let now = 100 * DAY_MS;
        let window = |tenant: &str, customer: &str, start: i64| {
            keys::window(tenant, &keys::series("tokens", customer, "{}"), start)
        };
        // Room for two windows of acme's customers c1..c9 (keys of one length).
        let cost = open_cost(&window("acme", "c1", now));
        let timing = Timing {
            max_open_window_bytes: 2 * cost,
            ..TIMING
        };
        let mut offset = 0;
        let mut state = PartitionState::open(dir.path(), 0, timing, &cache).expect("open");
        let mut feed_at = |state: &mut PartitionState, customer: &str, id: &str, at: i64| {
            feed(
                state,
                &catalog,
                &mut offset,
                &tokens_of(customer, id, at, "5"),
            );
        };
        feed_at(&mut state, "c1", "e0", now);
        feed_at(&mut state, "c2", "e1", now + 1);
        // A third customer would open a third window: refused, and nothing of it counts.
        feed_at(&mut state, "c3", "e2", now + 2);
        // Windows already open still take events.
        feed_at(&mut state, "c1", "e3", now + 3);
        assert_eq!(state.open_windows(), 2);
        assert_eq!(state.open_window_bytes(), 2 * cost);
        assert_eq!(
            refusals(&mut state),
            (vec![(2, "too_many_open_windows".to_owned())], vec![])
        );
        let counts = state.take_counts();
        assert_eq!(counts.applied, 3);
        assert_eq!(counts.dead_letters.get("too_many_open_windows"), Some(&1));
        state.commit().expect("commit");
        drop(state);

        // Reopened, the open windows count the same, so the same event is refused again.
        let mut state = PartitionState::open(dir.path(), 0, timing, &cache).expect("reopen");
        assert_eq!(state.open_window_bytes(), 2 * cost);
        feed_at(&mut state, "c3", "e4", now + 4);
        assert_eq!(
            refusals(&mut state),
            (vec![(4, "too_many_open_windows".to_owned())], vec![])
        );
        // The first event of the next minute closes both windows as it is folded (grace 0),
        // so it fits; so does a second customer's, but not a third's.
        feed_at(&mut state, "c3", "e5", now + 60_000);
        feed_at(&mut state, "c4", "e6", now + 60_001);
        feed_at(&mut state, "c5", "e7", now + 60_002);
        assert_eq!(
            refusals(&mut state),
            (
                vec![(7, "too_many_open_windows".to_owned())],
                vec![("c1".to_owned(), now), ("c2".to_owned(), now)]
            )
        );
        assert_eq!(state.open_window_bytes(), 2 * cost);
        // A refused event was not remembered: sent again, now that its minute has closed, it
        // counts (as a late event, which opens no window).
        state.take_counts();
        feed_at(&mut state, "c3", "e2", now + 2);
        assert_eq!(refusals(&mut state), (vec![], vec![("c3".to_owned(), now)]));
        let counts = state.take_counts();
        assert_eq!((counts.applied, counts.duplicates, counts.late), (1, 0, 1));
        // Another tenant's windows are bounded apart: beta opens its own two.
        for (id, customer) in [("b0", "c1"), ("b1", "c2")] {
            let event = neruba_schemas::Event {
                tenant: "beta".into(),
                id: id.into(),
                event_type: "llm".into(),
                subject: customer.into(),
                time_ms: now + 60_000,
                received_ms: now + 60_000,
                source: None,
                data: serde_json::json!({ "tokens": "1" })
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            };
            feed(&mut state, &catalog, &mut offset, &codec::encode(&event));
        }
        assert_eq!(refusals(&mut state), (vec![], vec![]));
        assert_eq!(open_cost(&window("beta", "c1", now)), cost);
        assert_eq!(state.open_window_bytes(), 4 * cost);
    }

    #[test]
    fn the_dedup_horizon_runs_from_when_the_first_copy_was_received() {
        // A first copy 34 days old when it arrived, and its repeat two days later carrying
        // another time (sent without one, the gateway stamps the receive time): the repeat
        // is well within the horizon of the first copy's arrival, so it counts nothing.
        let catalog = Catalog::from_toml_str(TOKENS, "test").expect("catalog");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let received = 100 * DAY_MS;
        let mut offset = 0;
        let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("open");
        let first = tokens_received("c1", "e1", received - 34 * DAY_MS, received, "5");
        feed(&mut state, &catalog, &mut offset, &first);
        state.commit().expect("commit");
        let counts = state.take_counts();
        assert_eq!((counts.applied, counts.duplicates), (1, 0));

        let later = received + 2 * DAY_MS;
        let repeat = tokens_received("c1", "e1", later, later, "5");
        feed(&mut state, &catalog, &mut offset, &repeat);
        let counts = state.take_counts();
        assert_eq!((counts.applied, counts.duplicates), (0, 1));

        // Past the horizon of the first arrival, the id counts again.
        let past = received + 35 * DAY_MS + 1;
        feed(
            &mut state,
            &catalog,
            &mut offset,
            &tokens_received("c1", "e1", past, past, "5"),
        );
        let counts = state.take_counts();
        assert_eq!((counts.applied, counts.duplicates), (1, 0));

        // A first copy dated 4 minutes ahead of its arrival, sent again just past the horizon
        // of that arrival but with its time still within the correction horizon: found.
        let ahead = received + 4 * 60_000;
        let first = tokens_received("c1", "e2", ahead, received, "5");
        feed(&mut state, &catalog, &mut offset, &first);
        let again = received + 35 * DAY_MS + 2 * 60_000;
        let repeat = tokens_received("c1", "e2", ahead, again, "5");
        feed(&mut state, &catalog, &mut offset, &repeat);
        let counts = state.take_counts();
        assert_eq!((counts.applied, counts.duplicates), (1, 1));
    }

    #[test]
    fn an_aggregator_days_behind_keeps_the_repeats_and_windows_its_input_still_needs() {
        // Was: compaction expired by the wall clock, so an aggregator 3 days behind dropped
        // the dedup entry and the window of events its input still held a repeat and a late
        // event of: the repeat counted again, and the late event started its window again at
        // revision 1 (which the rater may take for a repeat).
        let catalog = Catalog::from_toml_str(TOKENS, "test").expect("catalog");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let now = neruba_schemas::event::now_ms();
        let first = (now - 37 * DAY_MS - 3_600_000) / 60_000 * 60_000;
        let dedup = keys::dedup("acme", "c1", "e1");
        let window = keys::window("acme", &keys::series("tokens", "c1", "{}"), first);
        let compacted = |state: &PartitionState| {
            state.store.db().flush().expect("flush");
            state.store.db().compact_range::<&[u8], &[u8]>(None, None);
            let held = |key: &[u8]| state.store.db().get(key).expect("get").is_some();
            (held(&dedup), held(&window))
        };
        let mut offset = 0;
        let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("open");
        feed(&mut state, &catalog, &mut offset, &tokens("e1", first, "5"));
        feed(
            &mut state,
            &catalog,
            &mut offset,
            &tokens("e2", first + 120_000, "1"),
        );
        assert_eq!(emitted(&mut state), [(first, Decimal::from(5), 1, 1)]);
        state.commit().expect("commit");
        assert_eq!(compacted(&state), (true, true));
        drop(state);

        // Restarted; 34 days of input later (3 days behind the wall clock), compacted again
        // at that point: the repeat and the late event still find what they need.
        let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("reopen");
        assert_eq!(
            compacted(&state),
            (true, true),
            "nothing expires before a write"
        );
        let later = first + 34 * DAY_MS;
        let other = tokens_received("c2", "e3", later, later, "1");
        feed(&mut state, &catalog, &mut offset, &other);
        state.commit().expect("commit");
        let _ = emitted(&mut state);
        let _ = state.take_counts();
        assert_eq!(compacted(&state), (true, true));
        feed(
            &mut state,
            &catalog,
            &mut offset,
            &tokens_received("c1", "e1", first, later, "5"),
        );
        feed(
            &mut state,
            &catalog,
            &mut offset,
            &tokens_received("c1", "e5", first, later, "7"),
        );
        let counts = state.take_counts();
        assert_eq!((counts.applied, counts.duplicates), (1, 1));
        assert_eq!(emitted(&mut state), [(first, Decimal::from(12), 2, 2)]);
        state.commit().expect("commit");

        // A gateway's clock far ahead does not move the input's clock (which the wall clock
        // would then bound: both would go).
        let ahead = tokens_received("c3", "e7", later, now + 10 * DAY_MS, "1");
        feed(&mut state, &catalog, &mut offset, &ahead);
        state.commit().expect("commit");
        let _ = emitted(&mut state);
        assert_eq!(compacted(&state), (true, true));

        // Past both horizons by the input (and the wall clock), both go.
        let past = first + 37 * DAY_MS + 60_000;
        let gone = tokens_received("c2", "e6", past, past, "1");
        feed(&mut state, &catalog, &mut offset, &gone);
        state.commit().expect("commit");
        assert_eq!(compacted(&state), (false, false));
    }

    #[test]
    fn an_id_counts_once_per_customer_whichever_partition_they_share() {
        // Two customers in one partition: the same id counts for each (as it would with a
        // partition each), and a repeat for either counts nothing.
        let catalog = Catalog::from_toml_str(TOKENS, "test").expect("catalog");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let now = 100 * DAY_MS;
        let mut offset = 0;
        let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("open");
        for customer in ["c1", "c2", "c1", "c2"] {
            feed(
                &mut state,
                &catalog,
                &mut offset,
                &tokens_of(customer, "e1", now, "1"),
            );
        }
        let counts = state.take_counts();
        assert_eq!((counts.applied, counts.duplicates), (2, 2));
    }

    #[test]
    fn state_from_before_per_customer_ids_still_finds_its_repeats() {
        // State written before ids were kept per customer: an offset and a legacy entry of
        // `e1` (its first copy's event time). A repeat within the horizon counts nothing,
        // the same id of another customer is found under the legacy key too (as it was
        // then), and a new id is kept per customer.
        let catalog = Catalog::from_toml_str(TOKENS, "test").expect("catalog");
        let dir = tempfile::tempdir().expect("tempdir");
        let now = neruba_schemas::event::now_ms();
        {
            let db = rocksdb::DB::open_default(dir.path()).expect("open");
            db.put(keys::META_OFFSET, keys::time_bytes(6)).expect("put");
            db.put(
                keys::legacy_dedup("acme", "e1"),
                keys::time_bytes(now - DAY_MS),
            )
            .expect("put");
        }
        let cache = Cache::new_lru_cache(1 << 20);
        let mut offset = 6;
        let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("open");
        for (customer, id) in [("c1", "e1"), ("c2", "e1"), ("c1", "e2"), ("c2", "e2")] {
            feed(
                &mut state,
                &catalog,
                &mut offset,
                &tokens_of(customer, id, now, "1"),
            );
        }
        let counts = state.take_counts();
        assert_eq!((counts.applied, counts.duplicates), (2, 2));
        // The decision is kept: reopened, the legacy entry is still read.
        state.commit().expect("commit");
        drop(state);
        let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("reopen");
        assert!(state.legacy_dedup_until >= now + 35 * DAY_MS);
        feed(
            &mut state,
            &catalog,
            &mut offset,
            &tokens_of("c3", "e1", now, "1"),
        );
        assert_eq!(state.take_counts().duplicates, 1);

        // Fresh state has no legacy entries and never looks for one.
        let fresh = tempfile::tempdir().expect("tempdir");
        let state = PartitionState::open(fresh.path(), 0, TIMING, &cache).expect("open");
        assert_eq!(state.legacy_dedup_until, i64::MIN);
    }

    #[test]
    fn a_window_open_across_a_restart_keeps_what_it_counted_before() {
        // Open windows are not read from the store while they are open (their records stay
        // in memory): a reopened state must bring them back, or the next event of the
        // window would start it again from nothing.
        let catalog = Catalog::from_toml_str(TOKENS, "test").expect("catalog");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let start = 10 * DAY_MS;
        let mut offset = 0;
        let mut apply = |state: &mut PartitionState, payload: &[u8]| {
            feed(state, &catalog, &mut offset, payload);
        };
        let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("open");
        apply(&mut state, &tokens("e1", start + 1_000, "1.5"));
        apply(&mut state, &tokens("e2", start + 2_000, "2"));
        state.commit().expect("commit");
        drop(state);

        let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("reopen");
        assert_eq!(state.open_windows(), 1);
        apply(&mut state, &tokens("e3", start + 3_000, "0.25"));
        // The next minute's event closes the first window.
        apply(&mut state, &tokens("e4", start + 60_000, "7"));
        assert_eq!(
            emitted(&mut state),
            vec![(start, Decimal::new(375, 2), 3, 1)]
        );
        state.commit().expect("commit");

        // A late event for that window, closed, written and gone from memory: read back from
        // the store and re-emitted as revision 2 with everything it had.
        apply(&mut state, &tokens("e5", start + 4_000, "1"));
        assert_eq!(
            emitted(&mut state),
            vec![(start, Decimal::new(475, 2), 4, 2)]
        );
    }

    #[test]
    fn periods_kept_between_batches_or_read_back_give_the_same_rollups() {
        // Five minutes of three customers, a batch a minute, and a late event for minute 1:
        // with no period kept across batches (each read back from the store) and with every
        // one kept, the same rollups, period-to-date included.
        let catalog = Catalog::from_toml_str(TOKENS, "test").expect("catalog");
        let start = 10 * DAY_MS;
        let run = |kept: usize| {
            let dir = tempfile::tempdir().expect("tempdir");
            let cache = Cache::new_lru_cache(1 << 20);
            let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("open");
            state.period_bytes_kept = kept;
            let mut outputs = Vec::new();
            let mut offset = 0;
            for minute in 0..5_i64 {
                let mut events = vec![];
                for customer in ["c1", "c2", "c3"] {
                    let id = format!("{customer}-{minute}");
                    let at = start + minute * 60_000 + 1_000;
                    events.push(tokens_of(customer, &id, at, &format!("{}", minute + 1)));
                }
                if minute == 3 {
                    events.push(tokens_of("c2", "late", start + 61_000, "0.5"));
                }
                for payload in &events {
                    feed(&mut state, &catalog, &mut offset, payload);
                }
                outputs.extend(state.take_outputs());
                state.commit().expect("commit");
            }
            (outputs, state.periods.len())
        };
        let (read_back, none_kept) = run(0);
        let (kept_back, kept) = run(PERIOD_BYTES_KEPT);
        assert_eq!(read_back, kept_back);
        // Each customer's one period, kept after the last batch; none with no room for it.
        assert_eq!((none_kept, kept), (0, 3));
        let to_date = |customer: &str, window: i64, revision: u32| {
            read_back.iter().find_map(|output| match output {
                Output::Rollup(r)
                    if r.customer == customer
                        && r.window_start_ms == start + window * 60_000
                        && r.revision == revision =>
                {
                    Some(r.period_quantity)
                }
                _ => None,
            })
        };
        // Minutes 0..=3 closed: 1 + 2 + 3 + 4. For c2, the late 0.5 in minute 1 comes when
        // minutes 0..=2 are closed (its revision 2: 1 + 2.5 + 3), and minute 3's close in
        // the next batch includes it.
        assert_eq!(to_date("c1", 3, 1), Some(Decimal::new(10, 0)));
        assert_eq!(to_date("c2", 1, 2), Some(Decimal::new(65, 1)));
        assert_eq!(to_date("c2", 3, 1), Some(Decimal::new(105, 1)));
    }

    #[test]
    fn a_grouped_series_key_is_that_of_its_canonical_group_text() {
        // The key is written in place; state stored when it was built from the group's JSON
        // text must be found under the same keys.
        // The tokens meter, grouped.
        let toml = format!("{TOKENS}group_by = {{ model = \"$.model\", region = \"$.region\" }}\n");
        let catalog = Catalog::from_toml_str(&toml, "test").expect("catalog");
        let tenant = catalog.tenant("acme").expect("tenant");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("open");
        for model in ["gpt", "quote \" back\\slash", "ünï\u{7}"] {
            let data = serde_json::json!({ "tokens": "1", "model": model, "region": "eu" });
            let event = Event {
                tenant: "acme".into(),
                id: "e1".into(),
                event_type: "llm".into(),
                subject: "c1".into(),
                data: data.as_object().cloned().unwrap_or_default(),
                ..Event::default()
            };
            let measures = measure(tenant, &event).expect("measures");
            let target = state
                .target(&event, &measures[0])
                .expect("target")
                .expect("a period");
            let text = serde_json::to_string(&measures[0].group).expect("group text");
            assert_eq!(target.series(), keys::series("tokens", "c1", &text));
            assert_eq!(
                target.window_key,
                keys::window("acme", &keys::series("tokens", "c1", &text), 0)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn the_last_period_kept_gives_the_period_of_every_time(
            steps in proptest::collection::vec(
                (-40 * DAY_MS..40 * DAY_MS, 0..4usize, 0..4usize, 0..4usize),
                1..60,
            ),
        ) {
            // Times walk back and forth across period ends, anchors and offsets change, and
            // the times at a period's very start and end are asked too.
            const ANCHORS: [u8; 4] = [1, 2, 15, 28];
            const OFFSETS: [i32; 4] = [0, 3_600, -18_000, 50_400];
            let dir = tempfile::tempdir().expect("tempdir");
            let cache = Cache::new_lru_cache(1 << 20);
            let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("open");
            let mut time = 1_790_000_000_000_i64;
            for (jump, anchor, offset, edge) in steps {
                time += jump;
                let (anchor, offset) = (ANCHORS[anchor], OFFSETS[offset]);
                let (start, end) = period_bounds(time, anchor, offset).expect("a period");
                let asked = [time, start, end - 1, end][edge];
                let expected = period_bounds(asked, anchor, offset).expect("a period");
                proptest::prop_assert_eq!(
                    state.period_of(asked, anchor, offset).expect("a period"),
                    expected
                );
            }
        }
    }

    /// A key and value as stored.
    type StoredEntry = (Box<[u8]>, Box<[u8]>);

    /// Applies `payloads` at offsets 0.., writing after each of `batches` messages (the rest
    /// in a last batch), and with `ahead` reading ahead that many messages whenever the last
    /// read ahead is used up (cycling through it; a read may run past a write, and every
    /// `skip`-th message is left out of it, as the stage leaves out ticks). The batches'
    /// outputs, in order, and every stored entry after the last write.
    fn run_read_ahead(
        payloads: &[Vec<u8>],
        batches: &[usize],
        ahead: &[usize],
        skip: usize,
    ) -> (Vec<Output>, Vec<StoredEntry>) {
        let catalog = Catalog::from_toml_str(TOKENS, "test").expect("catalog");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let mut state = PartitionState::open(dir.path(), 0, TIMING, &cache).expect("open");
        let mut outputs = Vec::new();
        let mut write_at = batches.iter().scan(0, |at, n| {
            *at += n;
            Some(*at)
        });
        let mut next_write = write_at.next();
        let mut sizes = ahead.iter().cycle();
        let mut read_until = 0;
        for (offset, payload) in (0_i64..).zip(payloads) {
            let at = usize::try_from(offset).expect("small");
            if at >= read_until
                && let Some(&size) = sizes.next()
            {
                read_until = (at + size).min(payloads.len());
                let inputs: Vec<Input<'_>> = (at..read_until)
                    .filter(|i| skip == 0 || i % skip != skip - 1)
                    .map(|i| Input {
                        offset: i64::try_from(i).expect("small"),
                        key: None,
                        payload: &payloads[i],
                    })
                    .collect();
                state.read_ahead(&inputs).expect("read ahead");
            }
            let input = Input {
                offset,
                key: None,
                payload,
            };
            state.apply(input, &catalog).expect("apply");
            if next_write == Some(at + 1) {
                outputs.extend(state.take_outputs());
                state.commit().expect("commit");
                next_write = write_at.next();
            }
        }
        outputs.extend(state.take_outputs());
        state.commit().expect("commit");
        let stored = state
            .store
            .db()
            .iterator(rocksdb::IteratorMode::Start)
            .collect::<std::result::Result<Vec<_>, _>>()
            .expect("read the store");
        (outputs, stored)
    }

    proptest::proptest! {
        #[test]
        fn reading_ahead_changes_nothing_applied_or_stored(
            events in proptest::collection::vec(
                (0..12usize, 0..3usize, 0..8i64, 1..5u32, 0..8u8),
                1..120,
            ),
            batches in proptest::collection::vec(1..40usize, 1..8),
            ahead in proptest::collection::vec(2..50usize, 1..4),
            skip in 0..6usize,
        ) {
            // Ids from a small pool, so copies repeat within a read ahead, across reads and
            // across writes; some received past the correction horizon, some not events.
            let start = 10 * DAY_MS;
            let payloads: Vec<Vec<u8>> = events
                .iter()
                .map(|&(id, customer, minute, tokens, kind)| {
                    let time = start + minute * 60_000 + 1_000;
                    match kind {
                        0 => b"not an event".to_vec(),
                        1 => tokens_received(
                            &format!("c{customer}"),
                            &format!("e-{id}"),
                            time,
                            time + 40 * DAY_MS,
                            &tokens.to_string(),
                        ),
                        _ => tokens_of(
                            &format!("c{customer}"),
                            &format!("e-{id}"),
                            time,
                            &tokens.to_string(),
                        ),
                    }
                })
                .collect();
            let expected = run_read_ahead(&payloads, &batches, &[], 0);
            let read = run_read_ahead(&payloads, &batches, &ahead, skip);
            proptest::prop_assert_eq!(&read.0, &expected.0);
            proptest::prop_assert_eq!(&read.1, &expected.1);
        }
    }

    #[test]
    fn the_shortcut_for_an_empty_group_is_its_canonical_json() {
        // Window keys written before and after the shortcut must be the same keys.
        let empty = BTreeMap::<String, String>::new();
        assert_eq!(serde_json::to_string(&empty).ok().as_deref(), Some("{}"));
    }
}
