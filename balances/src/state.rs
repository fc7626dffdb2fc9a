//! One ledger partition's balances state in RocksDB: every customer's [`Book`], the line items
//! already applied, the partition's clock and an index of upcoming deadlines (grant expiries,
//! statement transitions: [`Book::next_deadline`]).
//!
//! Invariants (after any crash, at any moment):
//! - the books, the applied-item marks, the clock, the deadline index and the next offset change
//!   in one `WriteBatch` ([`neruba_stage::Store::write`]);
//! - a batch's entries are handed to the runtime before the batch is written, and it writes
//!   only once the broker acknowledged them: a crash re-emits identical entries (same ids and
//!   sequence numbers: the fold is deterministic), never fewer;
//! - what the partition's records say is all that changes a book: ticks are records of the
//!   partition, so a replay expires grants at the same points.
//!
//! Key layout (components length-prefixed, but for a line's place, whose parts are escaped so
//! that keys sort as places do, and a grant's place, of fixed widths but its id last; the
//! tenant first):
//!
//! | key | value |
//! |---|---|
//! | `\0\0\0\0Moffset` | next offset (the runtime's) |
//! | `\0\0\0\0Mclock` | the partition's clock: the latest tick, ms (8 bytes) |
//! | `\0\0\0\0Mwindow` | the longest window of a `usage` line item applied, ms (8 bytes) |
//! | `\0\0\0\0X`, deadline ms, tenant, customer | empty: the customer's next deadline |
//! | tenant, `B`, customer | [`Book`] ([`Book::encode`]: a tag byte and postcard, then the refusals it remembers) |
//! | tenant, `I`, customer, line-item id | empty: the item was applied |
//! | tenant, `A`, customer, series key | the allocations of a series the book no longer holds
//! | | ([`Book::take_oldest_series`]; postcard) |
//! | tenant, `G`, customer, grant id | a spent grant (ended, or drawn down to nothing) the |
//! | | book no longer holds ([`Book::take_spent_grants`]; postcard) |
//! | tenant, `H`, customer, the grant's place in burn-down order | the same spent grant as |
//! | | under `G` (a grants page reads them from its cursor on): |
//! | | its priority (2 bytes BE), expiry and effective time (8 bytes each, as [`time_bytes`]) |
//! | | and id |
//! | tenant, `T`, customer, list kind (`l` lines, `p` prior-period lines, `c` carried), | a statement line the book |
//! | | statement key or currency, then the line's place ([`push_line_place`]), so that |
//! | | a list's keys sort in [`line_order`]; the value: the line ([`Book::take_statement_lines`]; postcard) |
//! | `\0\0\0\0Mkept_apart_in_order` | empty: the `T` keys are in this form and every `G` |
//! | | has its `H` (releases before wrote the place's parts length-prefixed, the group as |
//! | | JSON, and no `H`: rewritten at open, [`PartitionState::from_store`]) |
//!
//! Kinds `E`, `L`, `S`, `F`, `R` and `P` are the api read model's, which keeps this state too
//! (see `neruba-api`): entries, line items, final statements and their lines, grants refused
//! for the bound and which items a later one supersedes.

use crate::book::statements::{LineList, Route, line_order};
use crate::book::{
    Allocation, Book, BurnPlace, GrantState, borrowed_place, burn_order, burn_place,
};
use crate::{Error, Result};
use ahash::{AHashMap as HashMap, AHashSet as HashSet};
use neruba_schemas::credit::{self, BalanceEntry, Grant, RuleRecord, StatementLine, Tick, Void};
use neruba_schemas::ledger::LineItem;
use neruba_stage::{DeadLetter, Input, Store, StoreOptions};
use rocksdb::{Cache, WriteBatch};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const CLOCK_KEY: &[u8] = b"\0\0\0\0Mclock";
/// The longest window of a first-priced line item the partition has applied (ms, 8 bytes BE).
const WINDOW_KEY: &[u8] = b"\0\0\0\0Mwindow";
/// The longest window [`WINDOW_KEY`] holds: a catalog's meter windows divide a day.
const MAX_WINDOW_MS: i64 = 86_400_000;
const EXPIRY_PREFIX: &[u8] = b"\0\0\0\0X";
/// Present once the statement lines kept apart are keyed in line order ([`line_key`]) and
/// the spent grants kept apart are kept in burn-down order too ([`spent_grant_place_key`]).
const KEPT_APART_IN_ORDER_KEY: &[u8] = b"\0\0\0\0Mkept_apart_in_order";

/// What a ledger-topic message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// No record header: a line item from the rater.
    LineItem,
    Grant,
    Void,
    Tick,
    Rule,
    /// A record header this version does not know: dead-lettered.
    Unknown,
}

impl Record {
    /// The record a `neruba-record` header value names (`None`: no header).
    pub fn of(header: Option<&[u8]>) -> Self {
        match header {
            None => Self::LineItem,
            Some(b"grant") => Self::Grant,
            Some(b"void") => Self::Void,
            Some(b"tick") => Self::Tick,
            Some(b"rule") => Self::Rule,
            Some(_) => Self::Unknown,
        }
    }
}

/// What a batch produced, to be delivered before the batch is written.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Entry(Box<BalanceEntry>),
    /// A clock tick to write into ledger partition `partition` (see [`PartitionState::tick_due`]).
    Tick {
        partition: i32,
        at_ms: i64,
        finalize_after_ms: i64,
    },
    DeadLetter(DeadLetter),
}

impl neruba_stage::AsDeadLetter for Output {
    fn dead_letter(&self) -> Option<&DeadLetter> {
        match self {
            Self::DeadLetter(letter) => Some(letter),
            Self::Entry(_) | Self::Tick { .. } => None,
        }
    }
}

/// Why the stage dead-letters a ledger record it cannot read: the `neruba-reject-code` header
/// and the metric's `code` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeadLetterCode {
    InvalidGrant,
    InvalidVoid,
    InvalidTick,
    InvalidRule,
    InvalidLineItem,
    UnknownRecord,
}

impl DeadLetterCode {
    /// Every code: the metric's series start at 0 with them, so an alert on their increase
    /// sees the first one.
    pub const ALL: [Self; 6] = [
        Self::InvalidGrant,
        Self::InvalidVoid,
        Self::InvalidTick,
        Self::InvalidRule,
        Self::InvalidLineItem,
        Self::UnknownRecord,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidGrant => "invalid_grant",
            Self::InvalidVoid => "invalid_void",
            Self::InvalidTick => "invalid_tick",
            Self::InvalidRule => "invalid_rule",
            Self::InvalidLineItem => "invalid_line_item",
            Self::UnknownRecord => "unknown_record",
        }
    }
}

/// Per-batch counts, published by the stage.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub entries: BTreeMap<&'static str, u64>,
    pub refused: BTreeMap<String, u64>,
    pub repeated_items: u64,
    pub dead_letters: BTreeMap<&'static str, u64>,
}

/// A customer's book key ([`customer_key`] of kind `B`): what the batch's maps are keyed by,
/// so a record looks its customer up without building owned names.
type CustomerKey = Vec<u8>;

use neruba_stage::keys::{
    prefix_end, push_ordered, push_part as push, read_part, time_bytes, time_from,
};

/// The key of one customer's record of `kind`: tenant, kind, customer (parts length-prefixed).
pub fn customer_key(kind: u8, tenant: &str, customer: &str) -> Vec<u8> {
    customer_key_and(kind, tenant, customer, None)
}

/// [`customer_key`], then `part` if any (length-prefixed), in one allocation.
fn customer_key_and(kind: u8, tenant: &str, customer: &str, part: Option<&[u8]>) -> Vec<u8> {
    let room = tenant.len() + customer.len() + 9 + part.map_or(0, |p| 4 + p.len());
    let mut key = Vec::with_capacity(room);
    push(&mut key, tenant.as_bytes());
    key.push(kind);
    push(&mut key, customer.as_bytes());
    if let Some(part) = part {
        push(&mut key, part);
    }
    key
}

fn item_key(tenant: &str, customer: &str, id: &str) -> Vec<u8> {
    customer_key_and(b'I', tenant, customer, Some(id.as_bytes()))
}

fn spilled_key(tenant: &str, customer: &str, series: &str) -> Vec<u8> {
    customer_key_and(b'A', tenant, customer, Some(series.as_bytes()))
}

fn spilled_grant_key(tenant: &str, customer: &str, grant: &str) -> Vec<u8> {
    customer_key_and(b'G', tenant, customer, Some(grant.as_bytes()))
}

/// The key of a spent grant kept apart in burn-down order (beside its key by id, which
/// records name it by): the customer's, then its place, so that keys sort as places do (the
/// priority and times as numbers, then the id's bytes, as strings compare).
pub(crate) fn spent_grant_place_key(tenant: &str, customer: &str, place: BurnPlace<'_>) -> Vec<u8> {
    let (priority, expires, effective, id) = place;
    let mut key = customer_key(b'H', tenant, customer);
    key.extend_from_slice(&priority.to_be_bytes());
    key.extend_from_slice(&time_bytes(expires));
    key.extend_from_slice(&time_bytes(effective));
    key.extend_from_slice(id.as_bytes());
    key
}

/// The key prefix of the lines of `list` kept apart (in [`line_order`] under it).
pub fn line_list_key(tenant: &str, customer: &str, list: &LineList) -> Vec<u8> {
    let (kind, name) = list.parts();
    let mut key = customer_key(b'T', tenant, customer);
    push(&mut key, &[kind]);
    push(&mut key, name.as_bytes());
    key
}

/// The key of the statement line at `place` on `list` kept apart: the list's, then the place,
/// so that a list's keys sort in [`line_order`] and a read can seek to a place.
fn line_key(tenant: &str, customer: &str, list: &LineList, place: Place<'_>) -> Vec<u8> {
    let mut key = line_list_key(tenant, customer, list);
    push_line_place(&mut key, place);
    key
}

/// Appends a line's place in its list so that keys sort in [`line_order`]: its meter, each
/// member of its group (name, value; a byte `1` before each and `0` after the last, so a group
/// sorts before those it begins), then its period start as it is (the key's last part). Keys
/// so written are stored (here and by the api's final statements).
pub fn push_line_place(key: &mut Vec<u8>, place: Place<'_>) {
    let Place {
        meter,
        group,
        period_start,
    } = place;
    push_ordered(key, meter.as_bytes());
    for (name, value) in group {
        key.push(1);
        push_ordered(key, name.as_bytes());
        push_ordered(key, value.as_bytes());
    }
    key.push(0);
    key.extend_from_slice(period_start.as_bytes());
}

/// A line's place in its list: what [`line_order`] compares.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    pub meter: &'a str,
    pub group: &'a BTreeMap<String, String>,
    pub period_start: &'a str,
}

impl<'a> Place<'a> {
    pub fn of(line: &'a StatementLine) -> Self {
        Self {
            meter: &line.meter,
            group: &line.group,
            period_start: &line.period_start,
        }
    }

    /// Whether `line` comes after this place in its list.
    pub fn precedes(&self, line: &StatementLine) -> bool {
        line_order(line, self.meter, self.group, self.period_start) == std::cmp::Ordering::Greater
    }
}

/// The list of a statement line kept apart, from the rest of its key after the customer.
fn line_list_of(rest: &[u8]) -> Option<LineList> {
    let (kind, rest) = read_part(rest)?;
    let (name, _) = read_part(rest)?;
    let [kind] = kind else { return None };
    LineList::from_parts(*kind, String::from_utf8(name.to_vec()).ok()?)
}

/// Keys the statement lines kept apart in line order ([`line_key`]), and keeps the spent
/// grants kept apart in burn-down order too ([`spent_grant_place_key`]), in a store written by
/// a release before: it wrote a line's meter, group (as JSON) and period start length-prefixed,
/// so a list's keys sorted by their lengths first, and kept spent grants by id alone. Once per
/// store, marked by [`KEPT_APART_IN_ORDER_KEY`] in the last write. Returns how many values it
/// wrote under a new key (none in a store begun by this release). Each tenant's keys of other kinds are
/// stepped over by a seek, not read; a list at a time is held, and written with others once
/// [`MOVED_PER_WRITE`] are pending, so a store of many long lists is rewritten in bounded
/// memory. Stopped between two writes, it starts again at the next open: a value already
/// written is written again under the same key. A line that cannot be read is left where it
/// is, and a spent grant that cannot be read is listed last (both logged): the read of its
/// list reports it, as before.
fn order_kept_apart(db: &rocksdb::DB) -> Result<usize> {
    if db.get_pinned(KEPT_APART_IN_ORDER_KEY)?.is_some() {
        return Ok(0);
    }
    let mut moving = MovingLines::default();
    let mut iter = db.raw_iterator();
    iter.seek_to_first();
    while let Some(key) = iter.key() {
        let Some((tenant, rest)) = read_part(key) else {
            iter.next();
            continue;
        };
        let tenant_part = key.get(..key.len() - rest.len()).unwrap_or_default();
        match rest.first() {
            Some(b'G') if !tenant.is_empty() => {
                let value = iter.value().unwrap_or_default();
                let names =
                    read_part(rest.get(1..).unwrap_or_default()).and_then(|(customer, id)| {
                        let (id, _) = read_part(id)?;
                        Some((
                            std::str::from_utf8(tenant).ok()?,
                            std::str::from_utf8(customer).ok()?,
                            std::str::from_utf8(id).ok()?,
                        ))
                    });
                if let Some((tenant, customer, id)) = names {
                    let place = match postcard::from_bytes::<GrantState>(value) {
                        Ok(state) => {
                            spent_grant_place_key(tenant, customer, burn_place(&state.grant))
                        }
                        // Last in the order, so the grants list reports it when it reaches it,
                        // as its read of every grant did.
                        Err(e) => {
                            tracing::warn!(tenant, customer, id, error = %e, "a spent grant kept apart cannot be read: listed last");
                            spent_grant_place_key(
                                tenant,
                                customer,
                                (u16::MAX, i64::MAX, i64::MAX, id),
                            )
                        }
                    };
                    moving.put(db, place, value)?;
                } else {
                    tracing::warn!(key = %String::from_utf8_lossy(key), "a malformed key of a spent grant: left as it is");
                }
                iter.next();
            }
            Some(b'T') if !tenant.is_empty() => {
                let value = iter.value().unwrap_or_default();
                let place =
                    read_part(rest.get(1..).unwrap_or_default()).and_then(|(customer, rest)| {
                        let list = line_list_of(rest)?;
                        let tenant = std::str::from_utf8(tenant).ok()?;
                        let customer = std::str::from_utf8(customer).ok()?;
                        let line: StatementLine = postcard::from_bytes(value).ok()?;
                        Some((
                            line_list_key(tenant, customer, &list),
                            line_key(tenant, customer, &list, Place::of(&line)),
                        ))
                    });
                match place {
                    Some((list, ordered)) => {
                        if moving.list != list {
                            moving.end_list(db)?;
                            moving.list = list;
                        }
                        moving.lines.push((key.to_vec(), ordered, value.to_vec()));
                    }
                    None => {
                        tracing::warn!(
                            key = %String::from_utf8_lossy(key),
                            "a statement line kept apart cannot be read: left as it is"
                        );
                        moving.unread.push(key.to_vec());
                    }
                }
                iter.next();
            }
            // Every other kind but the last read: on to the next of these two.
            Some(&kind) if kind < b'T' && !tenant.is_empty() => {
                let mut next = tenant_part.to_vec();
                next.push(if kind < b'G' { b'G' } else { b'T' });
                iter.seek(&next);
            }
            _ => match prefix_end(tenant_part) {
                Some(next_tenant) => iter.seek(&next_tenant),
                None => break,
            },
        }
    }
    iter.status()?;
    moving.end_list(db)?;
    moving.batch.put(KEPT_APART_IN_ORDER_KEY, []);
    db.write(moving.batch)?;
    Ok(moving.moved)
}

/// Keys [`order_kept_apart`] writes or deletes pending in one write, at least (a list is
/// written whole; tests write after 8).
const MOVED_PER_WRITE: usize = if cfg!(test) { 8 } else { 10_000 };

/// [`order_kept_apart`]'s list being read and its pending write.
#[derive(Default)]
struct MovingLines {
    /// The list's key prefix ([`line_list_key`]) and its lines (key as stored, this release's
    /// key, value).
    list: Vec<u8>,
    lines: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
    /// The keys of lines that could not be read (left as they are).
    unread: Vec<Vec<u8>>,
    batch: WriteBatch,
    moved: usize,
}

impl MovingLines {
    /// A value to put, written with others once enough are pending.
    fn put(&mut self, db: &rocksdb::DB, key: Vec<u8>, value: &[u8]) -> Result<()> {
        self.batch.put(key, value);
        self.moved += 1;
        if self.batch.len() >= MOVED_PER_WRITE {
            db.write(std::mem::take(&mut self.batch))?;
        }
        Ok(())
    }

    /// Adds the list read to the pending write, and writes it once it is large enough. Its
    /// keys as stored are deleted before its lines are put (a key unchanged is kept): a list
    /// of [`RANGE_DELETION_FROM`] lines or more, with every line read, by one range deletion,
    /// so its first reads after the move do not step over a deleted key for each line.
    fn end_list(&mut self, db: &rocksdb::DB) -> Result<()> {
        let lines = std::mem::take(&mut self.lines);
        let end = prefix_end(&self.list);
        let all_read = !self.unread.iter().any(|key| key.starts_with(&self.list));
        match end {
            Some(end) if lines.len() >= RANGE_DELETION_FROM && all_read => {
                self.batch.delete_range(&self.list, &end);
            }
            _ => {
                for (stored, _, _) in &lines {
                    self.batch.delete(stored);
                }
            }
        }
        self.moved += lines
            .iter()
            .filter(|(stored, key, _)| stored != key)
            .count();
        for (_, key, value) in lines {
            self.batch.put(key, value);
        }
        if self.batch.len() >= MOVED_PER_WRITE {
            db.write(std::mem::take(&mut self.batch))?;
        }
        Ok(())
    }
}

fn expiry_key(at: i64, tenant: &str, customer: &str) -> Vec<u8> {
    let mut key = EXPIRY_PREFIX.to_vec();
    key.extend_from_slice(&time_bytes(at));
    push(&mut key, tenant.as_bytes());
    push(&mut key, customer.as_bytes());
    key
}

/// How partition stores are tuned: most reads are applied-item checks of new items, so a
/// whole-key bloom filter on the memtable answers those misses without a search.
pub fn store_options() -> StoreOptions {
    StoreOptions {
        memtable_bloom: true,
        index_in_cache: false,
        ..StoreOptions::default()
    }
}

/// Bytes of books (as [`held_estimate`] counts them) a worker's partitions hold before its
/// batch ends, whatever its count of records: a batch holds the book of every customer it
/// touched until its write, and a batch of 50,000 records of as many customers held 50,000
/// books (some hundreds of MiB; more with customers of many grants).
pub const BOOKS_HELD_BYTES: usize = 256 << 20;

/// Bytes of books in their stored form a worker's partitions keep in memory between batches
/// (each as written, so what the store holds), to decode instead of reading the store; past
/// it, a partition drops some of its own after its write (until the worker's are back to half),
/// and those are read from the store again.
/// A book stored takes a fifth of what it takes decoded (see [`held_estimate`]), so a customer
/// of two grants, a series and a statement takes 660 bytes here, 750 with its key and entry:
/// about 90,000 of them.
pub const BOOKS_KEPT_BYTES: usize = 64 << 20;

/// What a book costs in memory, from its stored size: 5 bytes for each stored one, and 1 KiB.
/// Measured (books decoded in memory, RSS over 100,000 copies or more): a customer's book of
/// two grants, a series and a statement 4.2 KiB for 660 bytes stored; of 2, 10, 100 and 1,000
/// grants 2.2, 6.7, 64 and 628 KiB for 0.3, 1.6, 15.5 and 155 KB stored. Each is at or above
/// what was measured.
pub fn held_estimate(stored: usize) -> usize {
    stored.saturating_mul(5).saturating_add(1024)
}

/// Decoded books a write is done with, counted in `held` as being freed until they are gone
/// (whoever drops them).
struct Retired {
    books: HashMap<CustomerKey, Book>,
    held: BooksHeld,
    bytes: usize,
}

impl Drop for Retired {
    fn drop(&mut self) {
        drop(std::mem::take(&mut self.books));
        self.held.freed(self.bytes);
    }
}

/// Drops `books` (`bytes` of them, by the count) on a thread of its own if that thread is
/// idle, else here: freeing a batch's books one allocation at a time was a third of the write
/// of a batch of 43,000 customers' (`balances_throughput`, 100,000 customers), and the stage's
/// thread goes on to its next batch meanwhile. At most one batch's books (the process's) wait
/// there; they are counted apart (`BooksHeld::freeing_bytes`), not against the next batch.
fn drop_aside(books: HashMap<CustomerKey, Book>, held: BooksHeld, bytes: usize) {
    static DROPPER: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<Retired>>> =
        std::sync::OnceLock::new();
    held.freeing(bytes);
    let retired = Retired { books, held, bytes };
    let dropper = DROPPER.get_or_init(|| {
        // A rendezvous: a send succeeds only while the thread waits for one.
        let (sender, retired) = std::sync::mpsc::sync_channel::<Retired>(0);
        std::thread::Builder::new()
            .name("neruba-books-drop".into())
            .spawn(move || retired.into_iter().for_each(drop))
            .ok()
            .map(|_| sender)
    });
    if let Some(sender) = dropper {
        // Given back when the thread is busy (or gone): dropped here, at the end.
        let _ = sender.try_send(retired);
    }
}

/// What a book kept in its stored form costs: its bytes, its key's, and 64 for the table's
/// entry and the allocations' headers.
fn kept_cost(key: &[u8], bytes: &[u8]) -> usize {
    key.len() + bytes.len() + 64
}

/// What a record may add to its book in memory before the write measures the book again:
/// twice its own size (a grant's metadata is kept as a map of its names and values).
fn growth_estimate(record: usize) -> usize {
    record.saturating_mul(2)
}

/// What a statement line decoded in memory is counted at: 1 KiB for its fields and the node
/// its group's map allocates (room for 11 names and values), and its text.
fn line_estimate(line: &StatementLine) -> usize {
    let text: usize = line.group.iter().map(|(k, v)| k.len() + v.len()).sum();
    1024 + line.meter.len() + line.period_start.len() + text
}

/// The bytes of books a worker's partitions hold, shared by them: decoded by the batch
/// ([`held_estimate`]), and kept in their stored form between batches.
#[derive(Debug, Clone, Default)]
pub struct BooksHeld {
    decoded: Arc<AtomicUsize>,
    /// The most `decoded` reached since [`BooksHeld::take_peak`] last read it.
    peak: Arc<AtomicUsize>,
    stored: Arc<AtomicUsize>,
    freeing: Arc<AtomicUsize>,
}

impl BooksHeld {
    /// Bytes of books the batch holds decoded, estimated.
    pub fn bytes(&self) -> usize {
        self.decoded.load(Ordering::Relaxed)
    }

    /// The most bytes of books held decoded since the last call (a gauge read between
    /// batches, when the decoded books are gone, would read 0), starting again from what is
    /// held now.
    pub fn take_peak(&self) -> usize {
        self.peak.swap(self.bytes(), Ordering::Relaxed)
    }

    /// Bytes of books kept in their stored form.
    pub fn kept_bytes(&self) -> usize {
        self.stored.load(Ordering::Relaxed)
    }

    /// Bytes of decoded books a write was done with that are not freed yet.
    pub fn freeing_bytes(&self) -> usize {
        self.freeing.load(Ordering::Relaxed)
    }

    /// `bytes` of the decoded count are being freed.
    fn freeing(&self, bytes: usize) {
        self.sub(bytes);
        self.freeing.fetch_add(bytes, Ordering::Relaxed);
    }

    fn freed(&self, bytes: usize) {
        self.freeing.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn add(&self, bytes: usize) {
        let now = self
            .decoded
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, bytes: usize) {
        self.decoded.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn keep(&self, bytes: usize) {
        self.stored.fetch_add(bytes, Ordering::Relaxed);
    }

    fn unkeep(&self, bytes: usize) {
        self.stored.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// A worker's books: the count its partitions share, the bounds they are held to, and the
/// gauge they are published on (one per worker, for the balances stage and the api's read
/// model alike).
#[derive(Debug, Clone)]
pub struct WorkerBooks {
    held: BooksHeld,
    held_bound: usize,
    kept_bound: usize,
    gauge: crate::metrics::BooksMemory,
    worker: usize,
}

impl WorkerBooks {
    /// Worker `worker`'s, bounded by `held_bound` and `kept_bound` bytes
    /// ([`BOOKS_HELD_BYTES`], [`BOOKS_KEPT_BYTES`]), published on `gauge`.
    pub fn new(
        gauge: crate::metrics::BooksMemory,
        worker: usize,
        held_bound: usize,
        kept_bound: usize,
    ) -> Self {
        Self {
            held: BooksHeld::default(),
            held_bound,
            kept_bound,
            gauge,
            worker,
        }
    }

    /// `state`, counting its books with the worker's other partitions, within the bounds.
    pub fn share(&self, state: PartitionState) -> PartitionState {
        state.with_books_held(self.held.clone(), self.held_bound, self.kept_bound)
    }

    /// Sets the worker's gauge readings.
    pub fn publish(&self) {
        self.gauge.publish(self.worker, &self.held);
    }
}

/// Series a stored book holds at most; older ones are kept under their own keys, so writing a
/// customer's book after each line item costs the same in its first month and its fifth year.
pub const BOOK_SERIES: usize = 24;

/// Spent grants (ended, or drawn down to nothing) a stored book holds at most; older ones are
/// kept under their own keys, so a customer's book stays the same size however many packs it
/// bought over the years or top-ups it used up.
pub const BOOK_SPENT_GRANTS: usize = 8;

/// Lines a list of a stored book's statements holds at most: one that grows past it is kept
/// apart, line by line, so a customer with a new group value in every item writes a book of
/// the same size after each.
pub const BOOK_LINES: usize = 64;

/// Values stored under one prefix from which [`Apart::take_all`] deletes them by one range
/// deletion rather than one by one. A statement list is kept apart only once it holds more
/// than [`BOOK_LINES`], and then whole, so nearly every list handed back whole with any line
/// stored takes a range deletion; a list put back mostly line by line since takes point
/// deletions for the few left. (Every range deletion in a memtable is weighed by the reads of
/// it until it is flushed; only customers with lists that long leave one, once a transition.)
const RANGE_DELETION_FROM: usize = BOOK_LINES;

/// Values a batch took out of books to keep under their own keys (`Some`: written at commit)
/// or put back into one (`None`: deleted at commit, or, under a prefix in `taken`, by its
/// range deletion); read before the store.
struct Apart<T> {
    /// In key order, so that the values under a prefix are found without looking at all.
    pending: BTreeMap<Vec<u8>, Option<T>>,
    /// Prefixes under which every stored value was put back ([`Apart::take_all`]), at least
    /// [`RANGE_DELETION_FROM`] of them, each with its range's end: deleted at commit by one
    /// range deletion, before the batch's own values
    /// are written. (Deleted one by one, each left a tombstone that every later read of the
    /// prefix stepped over until a compaction dropped it: a statement of 10,000 lines made
    /// each later read of its customer's statements step over 10,000.) Prefixes never nest:
    /// their parts are length-prefixed.
    taken: BTreeMap<Vec<u8>, Vec<u8>>,
    /// [`RANGE_DELETION_FROM`], but in tests.
    range_from: usize,
}

impl<T> Default for Apart<T> {
    fn default() -> Self {
        Self {
            pending: BTreeMap::new(),
            taken: BTreeMap::new(),
            range_from: RANGE_DELETION_FROM,
        }
    }
}

impl<T: serde::Serialize + serde::de::DeserializeOwned> Apart<T> {
    fn keep(&mut self, key: Vec<u8>, value: T) {
        self.pending.insert(key, Some(value));
    }

    /// Deletes at commit what is kept under `key` (this batch, or stored), without reading it.
    fn forget(&mut self, key: Vec<u8>) {
        self.pending.insert(key, None);
    }

    /// Whether what is stored under `key` was put back whole with its prefix this batch.
    fn under_taken(&self, key: &[u8]) -> bool {
        self.taken
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .is_some_and(|(prefix, _)| key.starts_with(prefix))
    }

    /// The value kept apart under `key`, if any, handed back to its book (`what` names it in
    /// an error).
    fn take_back(
        &mut self,
        db: &rocksdb::DB,
        key: Vec<u8>,
        what: impl FnOnce() -> String,
    ) -> Result<Option<T>> {
        if self.under_taken(&key) {
            // Its stored value was handed back with the prefix and is deleted with it; only
            // a value kept since is left to hand back.
            return Ok(self.pending.remove(&key).flatten());
        }
        if let Some(slot) = self.pending.get_mut(&key) {
            return Ok(slot.take());
        }
        let Some(bytes) = db.get(&key)? else {
            return Ok(None);
        };
        let value = postcard::from_bytes(&bytes).map_err(|e| Error::corrupt(what(), e))?;
        self.pending.insert(key, None);
        Ok(Some(value))
    }

    /// Every value kept apart under `prefix`, handed back to its book.
    fn take_all(
        &mut self,
        db: &rocksdb::DB,
        prefix: &[u8],
        what: impl Fn() -> String,
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        // Handed back already this batch, or kept this batch (handed back now).
        let mut known = Vec::new();
        for (key, slot) in self.pending.range_mut(prefix.to_vec()..) {
            if !key.starts_with(prefix) {
                break;
            }
            out.extend(slot.take());
            known.push(key.clone());
        }
        if self.under_taken(prefix) {
            // Every stored value under it was handed back already this batch, and is deleted
            // with it.
            for key in known {
                self.pending.remove(&key);
            }
            return Ok(out);
        }
        let end = neruba_stage::keys::prefix_end(prefix);
        let mut stored = Vec::new();
        let mut iter = db.raw_iterator_opt(neruba_stage::keys::reading_under(prefix));
        iter.seek(prefix);
        while let (Some(key), Some(bytes)) = (iter.key(), iter.value()) {
            if !key.starts_with(prefix) {
                break;
            }
            // Handed back this batch already: kept or put back since, or under a list taken
            // whole (prefixes never nest, but a coarser one would find them here).
            if !self.pending.contains_key(key) && !self.under_taken(key) {
                out.push(postcard::from_bytes(bytes).map_err(|e| Error::corrupt(what(), e))?);
                stored.push(key.to_vec());
            }
            iter.next();
        }
        iter.status()?;
        match end {
            Some(end) if stored.len() >= self.range_from => {
                // The range deletion covers what this batch handed back under it too.
                for key in known {
                    self.pending.remove(&key);
                }
                self.taken.insert(prefix.to_vec(), end);
            }
            _ => {
                for key in stored {
                    self.pending.insert(key, None);
                }
            }
        }
        Ok(out)
    }

    /// The batch's changes into `batch`: the prefixes put back whole, then each value.
    fn write(&mut self, batch: &mut WriteBatch) -> Result<()> {
        for (prefix, end) in std::mem::take(&mut self.taken) {
            batch.delete_range(prefix, end);
        }
        for (key, value) in std::mem::take(&mut self.pending) {
            match value {
                Some(value) => batch.put(
                    key,
                    postcard::to_allocvec(&value)
                        .map_err(|e| Error::Bug(format!("kept-apart encoding: {e}")))?,
                ),
                None => batch.delete(key),
            }
        }
        Ok(())
    }
}

/// The balances state of one ledger partition.
pub struct PartitionState {
    pub partition: i32,
    store: Store,
    /// Books read or changed by the batch; the changed ones are written at commit, then every
    /// one is dropped (`stored` keeps them between batches).
    books: HashMap<CustomerKey, Book>,
    /// Books as written by earlier batches (so as stored), decoded when a record needs one
    /// again instead of read from the store, up to [`BOOKS_KEPT_BYTES`] a worker.
    stored: HashMap<CustomerKey, Box<[u8]>>,
    /// The bytes of `stored` ([`kept_cost`]).
    stored_bytes: usize,
    /// What the books of `books` cost, each by [`held_estimate`] of its size when read.
    counted: usize,
    /// What the batch's records may have added to their books ([`growth_estimate`]), the
    /// statement lines put back into them, and the statements their entries carry
    /// ([`line_estimate`]), until the write.
    grown: usize,
    /// What the worker's partitions hold together.
    held: BooksHeld,
    /// [`BOOKS_HELD_BYTES`] and [`BOOKS_KEPT_BYTES`] (tests lower them).
    held_bound: usize,
    kept_bound: usize,
    dirty: HashSet<CustomerKey>,
    /// Applied-item marks written by the batch (read before the store).
    new_items: HashSet<Vec<u8>>,
    /// Old series, spent grants and statement lines kept apart from their books.
    spilled: Apart<Vec<Allocation>>,
    spilled_grants: Apart<GrantState>,
    /// The same spent grants, by their place in burn-down order (a grants page reads them
    /// from its cursor on).
    spent_grants_in_order: Apart<GrantState>,
    spilled_lines: Apart<StatementLine>,
    clock_ms: i64,
    clock_dirty: bool,
    /// The tick stopped partway (its offset) and the last customer it has done
    /// ([`PartitionState::apply_tick`]).
    tick_cursor: Option<(i64, (i64, String, String))>,
    /// The record just applied stopped partway ([`neruba_stage::Partition::apply_again`]).
    again: bool,
    /// The longest window of a first-priced (`usage`) line item applied so far, at most
    /// [`MAX_WINDOW_MS`]: a tick is stamped that much earlier, so the items of a window that
    /// began before a grant's expiry arrive before the grant expires (each ends up to this
    /// long after its start).
    longest_window_ms: i64,
    longest_window_dirty: bool,
    /// Each customer's next deadline, as stored in the index, and the index itself.
    expiry_of: HashMap<CustomerKey, i64>,
    expiries: BTreeSet<(i64, String, String)>,
    /// Customers whose index entry the batch changed, with the entry as stored before.
    index_stored: HashMap<CustomerKey, (String, String, Option<i64>)>,
    /// Expiry grace: a tick is written for `now − grace − longest window`, so a grant expires
    /// once the wall clock passes `expires_at` + this + the longest window. Applying records never reads it: what a tick says is
    /// the partition's clock, and a replay under another grace expires at the same points.
    grace_ms: i64,
    /// How long statements stay draft, written into the ticks (a replay reads the ticks').
    finalize_after_ms: i64,
    /// When the last tick was queued (wall ms), so one is in flight at a time.
    tick_sent_ms: Option<i64>,
    /// Series, spent grants and statement lines a stored book keeps ([`BOOK_SERIES`],
    /// [`BOOK_SPENT_GRANTS`], [`BOOK_LINES`]; tests keep none, so that every one is kept apart
    /// and must come back).
    book_series: usize,
    book_spent_grants: usize,
    book_lines: usize,
    outputs: Vec<Output>,
    counts: Counts,
}

impl Drop for PartitionState {
    /// A partition given up no longer holds its books.
    fn drop(&mut self) {
        self.held.sub(self.counted + self.grown);
        self.held.unkeep(self.stored_bytes);
    }
}

impl std::fmt::Debug for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionState")
            .field("partition", &self.partition)
            .field("next_offset", &self.store.next_offset())
            .field("clock_ms", &self.clock_ms)
            .finish_non_exhaustive()
    }
}

impl PartitionState {
    /// Opens (or creates) the partition's state under `dir`.
    pub fn open(dir: &Path, partition: i32, cache: &Cache, grace_ms: i64) -> Result<Self> {
        Self::from_store(
            Store::open(dir, partition, &store_options(), cache)?,
            grace_ms,
            credit::DEFAULT_FINALIZE_AFTER_MS,
        )
    }

    /// The state kept in `store`; ticks it writes carry `grace_ms` and `finalize_after_ms`.
    /// A store written by a release before this one has its statement lines kept apart keyed
    /// again first, once (marked by a key of its own).
    pub fn from_store(store: Store, grace_ms: i64, finalize_after_ms: i64) -> Result<Self> {
        let db = store.db();
        let rewritten = order_kept_apart(db)?;
        if rewritten > 0 {
            tracing::info!(
                partition = store.partition(),
                rewritten,
                "kept the statement lines and spent grants kept apart in order"
            );
        }
        let clock_ms = stored_clock(&db.get(CLOCK_KEY)?);
        let longest_window_ms = db.get(WINDOW_KEY)?.and_then(|v| time_from(&v)).unwrap_or(0);
        let mut expiry_of = HashMap::default();
        let mut expiries = BTreeSet::new();
        for item in db.prefix_iterator(EXPIRY_PREFIX) {
            let (key, _) = item?;
            if !key.starts_with(EXPIRY_PREFIX) {
                break;
            }
            let rest = &key[EXPIRY_PREFIX.len()..];
            let parsed = time_from(rest).and_then(|at| {
                let (tenant, rest) = read_part(rest.get(8..)?)?;
                let (customer, _) = read_part(rest)?;
                Some((
                    at,
                    String::from_utf8(tenant.to_vec()).ok()?,
                    String::from_utf8(customer.to_vec()).ok()?,
                ))
            });
            let Some((at, tenant, customer)) = parsed else {
                return Err(Error::corrupt("deadline index key", "malformed"));
            };
            expiry_of.insert(customer_key(b'B', &tenant, &customer), at);
            expiries.insert((at, tenant, customer));
        }
        Ok(Self {
            partition: store.partition(),
            store,
            books: HashMap::default(),
            stored: HashMap::default(),
            stored_bytes: 0,
            counted: 0,
            grown: 0,
            held: BooksHeld::default(),
            held_bound: BOOKS_HELD_BYTES,
            kept_bound: BOOKS_KEPT_BYTES,
            dirty: HashSet::default(),
            new_items: HashSet::default(),
            spilled: Apart::default(),
            spilled_grants: Apart::default(),
            spent_grants_in_order: Apart::default(),
            spilled_lines: Apart::default(),
            clock_ms,
            clock_dirty: false,
            tick_cursor: None,
            again: false,
            longest_window_ms,
            longest_window_dirty: false,
            expiry_of,
            expiries,
            index_stored: HashMap::default(),
            grace_ms,
            finalize_after_ms,
            tick_sent_ms: None,
            book_series: BOOK_SERIES,
            book_spent_grants: BOOK_SPENT_GRANTS,
            book_lines: BOOK_LINES,
            outputs: Vec::new(),
            counts: Counts::default(),
        })
    }

    /// Keeps at most `series` series, `spent_grants` spent grants and `lines` lines a list in
    /// a stored book, the rest apart (tests: whatever is kept apart must come back unchanged).
    #[cfg(test)]
    #[must_use]
    pub(crate) fn keeping(mut self, series: usize, spent_grants: usize, lines: usize) -> Self {
        self.book_series = series;
        self.book_spent_grants = spent_grants;
        self.book_lines = lines;
        self
    }

    /// Deletes the statement lines kept apart under one list by a range deletion from `lines`
    /// of them on, rather than from [`RANGE_DELETION_FROM`].
    #[cfg(test)]
    pub(crate) fn deleting_ranges_from(mut self, lines: usize) -> Self {
        self.spilled_lines.range_from = lines;
        self
    }

    /// Waits at least `floor_ms` (at most a day) past a deadline beside the grace
    /// before a tick, as if the partition had priced a window that long: the catalog's
    /// longest meter window, so the first such window on the partition is covered too.
    #[must_use]
    pub fn with_window_floor(mut self, floor_ms: i64) -> Self {
        self.longest_window_ms = self.longest_window_ms.max(floor_ms.clamp(0, MAX_WINDOW_MS));
        self
    }

    /// The next offset to consume, if any record was ever applied.
    pub fn next_offset(&self) -> Option<i64> {
        self.store.next_offset()
    }

    /// The partition's clock (the latest tick), ms.
    pub fn clock_ms(&self) -> i64 {
        self.clock_ms
    }

    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// This state counting its books in `held` (shared by a worker's partitions), with
    /// `held_bound` and `kept_bound` in place of [`BOOKS_HELD_BYTES`] and
    /// [`BOOKS_KEPT_BYTES`].
    pub fn with_books_held(
        mut self,
        held: BooksHeld,
        held_bound: usize,
        kept_bound: usize,
    ) -> Self {
        let own = self.counted + self.grown;
        self.held.sub(own);
        self.held.unkeep(self.stored_bytes);
        held.add(own);
        held.keep(self.stored_bytes);
        self.held = held;
        self.held_bound = held_bound;
        self.kept_bound = kept_bound;
        self
    }

    /// Counts a book just decoded, at `bytes`.
    fn count_book(&mut self, bytes: usize) {
        self.counted = self.counted.saturating_add(bytes);
        self.held.add(bytes);
    }

    /// Counts what a record of `len` bytes may add to its book.
    fn count_growth(&mut self, len: usize) {
        self.count_grown(growth_estimate(len));
    }

    /// Counts `bytes` more held until the write.
    fn count_grown(&mut self, bytes: usize) {
        // Most records carry nothing to count: no shared counter is touched for them.
        if bytes == 0 {
            return;
        }
        self.grown = self.grown.saturating_add(bytes);
        self.held.add(bytes);
    }

    /// Keeps `bytes`, the stored form of the book at `key` as just written.
    fn keep_stored(&mut self, key: CustomerKey, bytes: Vec<u8>) {
        let added = kept_cost(&key, &bytes);
        // Encoded into a buffer sized for a typical book: kept at its length.
        let bytes = bytes.into_boxed_slice();
        let dropped = match self.stored.get_key_value(&key) {
            Some((key, kept)) => kept_cost(key, kept),
            None => 0,
        };
        self.stored.insert(key, bytes);
        self.stored_bytes = self
            .stored_bytes
            .saturating_sub(dropped)
            .saturating_add(added);
        self.held.unkeep(dropped);
        self.held.keep(added);
    }

    /// Drops every book decoded (each written), and what they were counted at; and, if the
    /// books the worker keeps in their stored form pass its bound, this partition's until they
    /// are back to half of it (or none of its own are left): whichever the table lists first,
    /// so a customer's is as likely kept as another's, however they are ordered.
    fn drop_books(&mut self) {
        let books = std::mem::take(&mut self.books);
        let bytes = std::mem::take(&mut self.counted) + std::mem::take(&mut self.grown);
        drop_aside(books, self.held.clone(), bytes);
        if self.held.kept_bytes() > self.kept_bound {
            let target = self.kept_bound / 2;
            let (held, mut own) = (&self.held, self.stored_bytes);
            self.stored.retain(|key, bytes| {
                if held.kept_bytes() <= target {
                    return true;
                }
                let cost = kept_cost(key, bytes);
                held.unkeep(cost);
                own = own.saturating_sub(cost);
                false
            });
            self.stored_bytes = own;
        }
    }

    /// A customer's book as of the batch so far.
    fn book(&mut self, tenant: &str, customer: &str) -> Result<&mut Book> {
        self.book_at(&customer_key(b'B', tenant, customer), tenant, customer)
    }

    /// [`PartitionState::book`] by its key, built once per record.
    fn book_at(&mut self, key: &[u8], tenant: &str, customer: &str) -> Result<&mut Book> {
        if !self.books.contains_key(key) {
            let decode = |bytes: &[u8]| {
                Book::decode(bytes)
                    .map_err(|e| Error::corrupt(format!("book of {tenant}/{customer}"), e))
            };
            let (book, stored) = match self.stored.get(key) {
                Some(bytes) => (decode(bytes)?, bytes.len()),
                None => match self.store.get(key)? {
                    None => (Book::default(), 0),
                    Some(bytes) => (decode(&bytes)?, bytes.len()),
                },
            };
            self.books.insert(key.to_vec(), book);
            self.count_book(held_estimate(stored));
        }
        self.books
            .get_mut(key)
            .ok_or_else(|| Error::Bug("book vanished".into()))
    }

    /// Records a customer's entries, and keeps the deadline index equal to its book at once: a
    /// tick later in the same batch must see a grant or statement opened before it, whatever
    /// the batch boundaries (they differ between a run and its replay).
    fn emit(&mut self, tenant: &str, customer: &str, entries: Vec<BalanceEntry>) {
        self.emit_at(
            customer_key(b'B', tenant, customer),
            tenant,
            customer,
            entries,
        );
    }

    /// [`PartitionState::emit`] by the customer's book key.
    fn emit_at(
        &mut self,
        key: CustomerKey,
        tenant: &str,
        customer: &str,
        entries: Vec<BalanceEntry>,
    ) {
        if let Some(book) = self.books.get_mut(&key) {
            for (id, state) in book.take_spent_grants(self.book_spent_grants) {
                let in_order = spent_grant_place_key(tenant, customer, burn_place(&state.grant));
                self.spent_grants_in_order.keep(in_order, state.clone());
                self.spilled_grants
                    .keep(spilled_grant_key(tenant, customer, &id), state);
            }
            for (list, line) in book.take_statement_lines(self.book_lines) {
                let key = line_key(tenant, customer, &list, Place::of(&line));
                self.spilled_lines.keep(key, line);
            }
        }
        let next = self.books.get(&key).and_then(Book::next_deadline);
        let old = self.expiry_of.get(&key).copied();
        if old != next {
            self.index_stored
                .entry(key.clone())
                .or_insert_with(|| (tenant.to_owned(), customer.to_owned(), old));
            if let Some(at) = old {
                self.expiries
                    .remove(&(at, tenant.to_owned(), customer.to_owned()));
                self.expiry_of.remove(&key);
            }
            if let Some(at) = next {
                self.expiries
                    .insert((at, tenant.to_owned(), customer.to_owned()));
                self.expiry_of.insert(key.clone(), at);
            }
        }
        self.dirty.insert(key);
        // A statement's entry carries its lines (a tick turning thousands of customers'
        // statements holds them all until delivered).
        let carried: usize = entries
            .iter()
            .filter_map(|e| e.statement.as_deref())
            .flat_map(|s| s.lines.iter().chain(&s.prior_period))
            .map(line_estimate)
            .sum();
        self.count_grown(carried);
        self.outputs.reserve(entries.len());
        for entry in entries {
            *self.counts.entries.entry(entry.kind.as_str()).or_default() += 1;
            if let Some(code) = &entry.code {
                *self.counts.refused.entry(code.clone()).or_default() += 1;
            }
            self.outputs.push(Output::Entry(Box::new(entry)));
        }
    }

    fn refuse(&mut self, input: Input<'_>, code: DeadLetterCode, message: String) {
        let code = code.as_str();
        *self.counts.dead_letters.entry(code).or_default() += 1;
        self.outputs.push(Output::DeadLetter(DeadLetter::refusing(
            input, code, message,
        )));
    }

    /// Applies one ledger-topic record. Records it cannot read are dead-lettered; only
    /// storage problems are errors.
    pub fn apply(&mut self, input: Input<'_>, record: Record) -> Result<()> {
        self.again = false;
        self.count_growth(input.payload.len());
        if record == Record::LineItem {
            let decoded = credit::decode::<LineItem>(input.payload);
            return self.apply_line_item(input, decoded).map(|_| ());
        }
        // A tick is consumed once done (it may stop partway).
        if record != Record::Tick {
            self.store.consumed(input.offset);
        }
        match record {
            // Handled above.
            Record::LineItem => Ok(()),
            Record::Grant => match credit::decode::<Grant>(input.payload) {
                Ok(grant)
                    if grant.id == credit::grant_id(&grant.tenant, &grant.customer, &grant.key) =>
                {
                    let (clock, grace) = (self.clock_ms, 0);
                    // A repeat of a spent grant is compared with it, not taken as new.
                    self.unspill_grant(&grant.tenant, &grant.customer, &grant.id)?;
                    let entries = self
                        .book(&grant.tenant, &grant.customer)?
                        .apply_grant(&grant, clock, grace);
                    self.emit(&grant.tenant, &grant.customer, entries);
                    Ok(())
                }
                Ok(_) => {
                    self.refuse(
                        input,
                        DeadLetterCode::InvalidGrant,
                        "the grant's id is not its key's".into(),
                    );
                    Ok(())
                }
                Err(e) => {
                    self.refuse(input, DeadLetterCode::InvalidGrant, e.to_string());
                    Ok(())
                }
            },
            Record::Void => match credit::decode::<Void>(input.payload) {
                Ok(void) => {
                    self.unspill_grant(&void.tenant, &void.customer, &void.grant)?;
                    let entries = self.book(&void.tenant, &void.customer)?.apply_void(&void);
                    self.emit(&void.tenant, &void.customer, entries);
                    Ok(())
                }
                Err(e) => {
                    self.refuse(input, DeadLetterCode::InvalidVoid, e.to_string());
                    Ok(())
                }
            },
            Record::Tick => {
                let done = match credit::decode::<Tick>(input.payload) {
                    Ok(tick) if tick.finalize_after_ms.is_some_and(|d| d < 0) => {
                        self.refuse(
                            input,
                            DeadLetterCode::InvalidTick,
                            "a negative finalisation delay".into(),
                        );
                        true
                    }
                    Ok(tick) => self.apply_tick(
                        input.offset,
                        tick.at_ms,
                        tick.finalize_after_ms
                            .unwrap_or(credit::DEFAULT_FINALIZE_AFTER_MS),
                    )?,
                    Err(e) => {
                        self.refuse(input, DeadLetterCode::InvalidTick, e.to_string());
                        true
                    }
                };
                if done {
                    self.store.consumed(input.offset);
                }
                Ok(())
            }
            Record::Rule => match credit::decode::<RuleRecord>(input.payload) {
                Ok(record)
                    if record.tenant.is_empty()
                        || record.customer.is_empty()
                        || record.currency.is_empty()
                        || record.rule.as_ref().is_some_and(|r| {
                            r.low_balance_threshold.is_sign_negative()
                                || r.recharge_to
                                    .is_some_and(|to| to <= r.low_balance_threshold)
                        }) =>
                {
                    self.refuse(
                        input,
                        DeadLetterCode::InvalidRule,
                        "no tenant, customer or currency, a negative threshold, or a recharge \
                         target not above it"
                            .into(),
                    );
                    Ok(())
                }
                Ok(record) => {
                    let entries = self
                        .book(&record.tenant, &record.customer)?
                        .apply_rule(&record);
                    self.emit(&record.tenant, &record.customer, entries);
                    Ok(())
                }
                Err(e) => {
                    self.refuse(input, DeadLetterCode::InvalidRule, e.to_string());
                    Ok(())
                }
            },
            Record::Unknown => {
                self.refuse(
                    input,
                    DeadLetterCode::UnknownRecord,
                    "unknown `neruba-record` header".into(),
                );
                Ok(())
            }
        }
    }

    /// Applies a line-item record already decoded (a reader that needs the item too decodes
    /// it once). Returns the item if the fold took it (applied now or before), `None` if it
    /// was dead-lettered.
    pub fn apply_line_item(
        &mut self,
        input: Input<'_>,
        decoded: neruba_schemas::Result<LineItem>,
    ) -> Result<Option<LineItem>> {
        self.again = false;
        self.store.consumed(input.offset);
        match decoded {
            Ok(item)
                if item.amount.abs() >= neruba_schemas::decimal::max_abs_value()
                    || item.currency.is_empty()
                    || item.tenant.is_empty()
                    || item.customer.is_empty() =>
            {
                self.refuse(
                    input,
                    DeadLetterCode::InvalidLineItem,
                    "an amount outside ±10^18, or no currency, tenant or customer".into(),
                );
                Ok(None)
            }
            Ok(item) => {
                self.apply_item(&item)?;
                Ok(Some(item))
            }
            Err(e) => {
                self.refuse(input, DeadLetterCode::InvalidLineItem, e.to_string());
                Ok(None)
            }
        }
    }

    fn apply_item(&mut self, item: &LineItem) -> Result<()> {
        let key = item_key(&item.tenant, &item.customer, &item.id);
        if self.new_items.contains(&key) || self.store.get(&key)?.is_some() {
            self.counts.repeated_items += 1;
            return Ok(());
        }
        self.new_items.insert(key);
        self.note_window(item);
        let book_key = customer_key(b'B', &item.tenant, &item.customer);
        let series = Book::series_key_of(item);
        self.unspill(&book_key, item, &series)?;
        if item.amount.is_sign_negative() {
            // A correction gives credit back to the grants its series drew on.
            let book = self.book_at(&book_key, &item.tenant, &item.customer)?;
            let missing: Vec<String> = book
                .grants_drawn_by(&series)
                .filter(|id| !book.grants.contains_key(*id))
                .map(str::to_owned)
                .collect();
            for id in missing {
                self.unspill_grant(&item.tenant, &item.customer, &id)?;
            }
        }
        let route = self.unspill_line(&book_key, item)?;
        let keep = self.book_series;
        let book = self.book_at(&book_key, &item.tenant, &item.customer)?;
        let entries = book.apply_item_of(item, series, route);
        let spilled = book.take_oldest_series(keep);
        for (series, stack) in spilled {
            self.spilled
                .keep(spilled_key(&item.tenant, &item.customer, &series), stack);
        }
        self.emit_at(book_key, &item.tenant, &item.customer, entries);
        Ok(())
    }

    /// Keeps the longest window of a first-priced item (a meter's own window; an adjustment
    /// or a period fee may span more), at most [`MAX_WINDOW_MS`].
    fn note_window(&mut self, item: &LineItem) {
        if item.kind != neruba_schemas::ledger::Kind::Usage {
            return;
        }
        let (Ok(start), Ok(end)) = (
            neruba_schemas::event::parse_time_ms(&item.window_start),
            neruba_schemas::event::parse_time_ms(&item.window_end),
        ) else {
            return;
        };
        let window = end.saturating_sub(start).clamp(0, MAX_WINDOW_MS);
        if window > self.longest_window_ms {
            self.longest_window_ms = window;
            self.longest_window_dirty = true;
        }
    }

    /// Puts `series` (the series key of `item`) back into its customer's book (at `book_key`)
    /// if it was taken out.
    fn unspill(&mut self, book_key: &[u8], item: &LineItem, series: &str) -> Result<()> {
        if self
            .book_at(book_key, &item.tenant, &item.customer)?
            .series
            .contains_key(series)
        {
            return Ok(());
        }
        let key = spilled_key(&item.tenant, &item.customer, series);
        let stack = self.spilled.take_back(self.store.db(), key, || {
            format!("series of {}/{}", item.tenant, item.customer)
        })?;
        if let Some(stack) = stack {
            self.book_at(book_key, &item.tenant, &item.customer)?
                .series
                .insert(series.to_owned(), stack);
        }
        Ok(())
    }

    /// Puts back, before `item` is applied, the statement line it adds to if that was taken
    /// out of its customer's book (at `book_key`), or, if it opens a statement, the lines
    /// carried in its currency that the statement takes.
    ///
    /// Returns the item's route ([`Book::route_of`]), which putting lines back does not change:
    /// the route reads only which statements the book has (their currencies and periods) and
    /// `final_through`, never their lines nor the lines carried. Nor does the fold of the item
    /// change them before its route is used ([`Book::apply_item_of`]).
    fn unspill_line(&mut self, book_key: &[u8], item: &LineItem) -> Result<Option<Route>> {
        let (tenant, customer) = (&item.tenant, &item.customer);
        let book = self.book_at(book_key, tenant, customer)?;
        let what = || format!("statement line of {tenant}/{customer}");
        let route = book.route_of(item);
        match &route {
            Some(Route::To(list)) if !book.holds_line_of(list, item) => {
                let place = Place {
                    meter: &item.meter,
                    group: &item.group,
                    period_start: &item.period_start,
                };
                let key = line_key(tenant, customer, list, place);
                if let Some(line) = self.spilled_lines.take_back(self.store.db(), key, what)? {
                    self.book_at(book_key, tenant, customer)?
                        .put_line(list, line);
                }
            }
            Some(Route::Opens) if book.carried.contains_key(&item.currency) => {
                let list = LineList::Carried(item.currency.clone());
                self.unspill_lines(book_key, tenant, customer, &list)?;
            }
            Some(Route::To(_) | Route::Opens) | None => {}
        }
        Ok(route)
    }

    /// Puts every line of `list` taken out of the customer's book (at `book_key`) back.
    fn unspill_lines(
        &mut self,
        book_key: &[u8],
        tenant: &str,
        customer: &str,
        list: &LineList,
    ) -> Result<()> {
        let prefix = line_list_key(tenant, customer, list);
        let lines = self.spilled_lines.take_all(self.store.db(), &prefix, || {
            format!("statement line of {tenant}/{customer}")
        })?;
        self.count_grown(lines.iter().map(line_estimate).sum());
        self.book_at(book_key, tenant, customer)?
            .put_lines(list, lines);
        Ok(())
    }

    /// Puts grant `id` back into its customer's book if it was taken out.
    fn unspill_grant(&mut self, tenant: &str, customer: &str, id: &str) -> Result<()> {
        if self.book(tenant, customer)?.grants.contains_key(id) {
            return Ok(());
        }
        let key = spilled_grant_key(tenant, customer, id);
        let state = self.spilled_grants.take_back(self.store.db(), key, || {
            format!("grant {id} of {tenant}/{customer}")
        })?;
        if let Some(mut state) = state {
            let in_order = spent_grant_place_key(tenant, customer, burn_place(&state.grant));
            self.spent_grants_in_order.forget(in_order);
            state.settle(self.clock_ms);
            self.book(tenant, customer)?
                .grants
                .insert(id.to_owned(), Box::new(state));
        }
        Ok(())
    }

    /// Moves the clock to `at_ms` (never back), expires what it passed and moves statements on.
    /// Applies a tick at `at_ms` to every customer with a deadline by then, in the deadline
    /// index's order. Returns whether it is done: once the worker's books reach their bound it
    /// stops after a customer (one at least) with [`neruba_stage::Partition::apply_again`],
    /// for the runtime to write that part and apply the tick again, which goes on after the
    /// last customer done. The customers done are past the tick in the index (a book's next
    /// deadline is after any tick applied to it), so after a restart the tick goes on from
    /// the index's first due customer: the same customers in the same order, whatever the
    /// parts. The clock moves, and is written, once the last one is done.
    fn apply_tick(&mut self, offset: i64, at_ms: i64, finalize_after_ms: i64) -> Result<bool> {
        // Where this tick stopped, if it did (a cursor of another record is stale).
        if self
            .tick_cursor
            .as_ref()
            .is_some_and(|(at, _)| *at != offset)
        {
            self.tick_cursor = None;
        }
        if at_ms <= self.clock_ms {
            return Ok(true);
        }
        let mut done = 0_usize;
        loop {
            let after = match &self.tick_cursor {
                Some((_, cursor)) => Bound::Excluded(cursor),
                None => Bound::Unbounded,
            };
            let Some(next) = self
                .expiries
                .range((after, Bound::Unbounded))
                .next()
                .filter(|(at, _, _)| *at <= at_ms)
                .cloned()
            else {
                break;
            };
            if done > 0 && self.held.bytes() >= self.held_bound {
                self.again = true;
                return Ok(false);
            }
            let (_, tenant, customer) = &next;
            // The statements the tick turns draft or final carry their lines whole.
            let book_key = customer_key(b'B', tenant, customer);
            let statements = self
                .book_at(&book_key, tenant, customer)?
                .statement_keys_due(at_ms);
            for statement in statements {
                for list in [
                    LineList::Lines(statement.clone()),
                    LineList::Prior(statement),
                ] {
                    self.unspill_lines(&book_key, tenant, customer, &list)?;
                }
            }
            let grace = 0;
            let entries = self.book(tenant, customer)?.apply_tick(
                tenant,
                customer,
                at_ms,
                grace,
                finalize_after_ms,
            );
            self.emit(tenant, customer, entries);
            self.tick_cursor = Some((offset, next));
            done += 1;
        }
        self.tick_cursor = None;
        self.clock_ms = at_ms;
        self.clock_dirty = true;
        Ok(true)
    }

    /// Whether a tick should be written now (wall clock `now_ms`): a deadline plus grace plus
    /// the longest window has passed and no tick was queued within `retry_ms`. Queues it as
    /// an output, stamped `now − grace − longest window` and the finalisation delay: what the
    /// partition then reads.
    pub fn tick_due(&mut self, now_ms: i64, retry_ms: i64) -> bool {
        let at_ms = now_ms
            .saturating_sub(self.grace_ms)
            .saturating_sub(self.longest_window_ms);
        let due = self
            .expiries
            .first()
            .is_some_and(|(at, _, _)| *at <= at_ms && at_ms > self.clock_ms);
        let in_flight = self
            .tick_sent_ms
            .is_some_and(|sent| now_ms.saturating_sub(sent) < retry_ms);
        if !due || in_flight {
            return false;
        }
        self.tick_sent_ms = Some(now_ms);
        self.outputs.push(Output::Tick {
            partition: self.partition,
            at_ms,
            finalize_after_ms: self.finalize_after_ms,
        });
        true
    }
}

/// What a read of a book puts back of what the store keeps apart from it (old series never:
/// no read shows them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    /// The spent grants.
    pub grants: bool,
    /// The lines of its statements and of what is carried to the next.
    pub lines: bool,
}

impl Parts {
    /// Everything a read shows.
    pub const ALL: Self = Self {
        grants: true,
        lines: true,
    };
    /// Every spent grant, no statement line (a read of every grant at once, as tests and
    /// benchmarks make it; the grants list reads a page, [`grants_after`]).
    pub const GRANTS: Self = Self {
        grants: true,
        lines: false,
    };
    /// The book alone: its balances, rules, the grants holding credit (none of those is ever
    /// kept apart) and the newest spent ones (balance reads, and reads that only ask whether
    /// the customer is known).
    pub const BOOK: Self = Self {
        grants: false,
        lines: false,
    };
}

/// A customer's book as stored in `db` (`None`: no record of the customer was applied), with
/// everything kept apart that a read shows.
pub fn read_book(db: &rocksdb::DB, tenant: &str, customer: &str) -> Result<Option<Book>> {
    // One snapshot: the book and what is kept apart as of the same batch, while the stage
    // writes on.
    read_book_in(&db.snapshot(), tenant, customer, Parts::ALL)
}

/// A customer's book as of `snapshot`, with the `parts` kept apart that the reader needs.
pub fn read_book_in(
    snapshot: &rocksdb::Snapshot<'_>,
    tenant: &str,
    customer: &str,
    parts: Parts,
) -> Result<Option<Book>> {
    let Some(bytes) = snapshot.get(customer_key(b'B', tenant, customer))? else {
        return Ok(None);
    };
    let mut book = Book::decode(&bytes)
        .map_err(|e| Error::corrupt(format!("book of {tenant}/{customer}"), e))?;
    // Every value under the customer's keys of `kind`.
    let under = |kind: u8, each: &mut ApartValue<'_>| {
        let prefix = customer_key(kind, tenant, customer);
        each_under(snapshot, (&prefix, prefix.len()), (tenant, customer), each)
    };
    if parts.grants {
        let clock_ms = stored_clock(&snapshot.get(CLOCK_KEY)?);
        under(b'G', &mut |rest, value| {
            let (id, state) = spilled_grant(rest, value, clock_ms)?;
            book.grants.insert(id, Box::new(state));
            Ok(())
        })?;
    }
    if parts.lines {
        let mut lines = SpilledLines::default();
        under(b'T', &mut |rest, value| lines.add(rest, value))?;
        lines.put_into(&mut book);
    }
    Ok(Some(book))
}

/// A customer's book as of `snapshot` with, of what is kept apart from it, the lines of the
/// lists `lists` names from the book alone (`None`: no record of the customer was applied).
/// A read of statements takes the lines carried this way, and reads a statement's own lines a
/// page at a time from their keys ([`line_list_key`]), not the lines of every statement the
/// book holds.
pub fn read_book_with_lines_of(
    snapshot: &rocksdb::Snapshot<'_>,
    tenant: &str,
    customer: &str,
    lists: impl FnOnce(&Book) -> Vec<LineList>,
) -> Result<Option<Book>> {
    let Some(mut book) = read_book_in(snapshot, tenant, customer, Parts::BOOK)? else {
        return Ok(None);
    };
    let mut lines = SpilledLines::default();
    // A line's value is read with the rest of its key after the customer, its list's in it.
    let after_customer = customer_key(b'T', tenant, customer).len();
    for list in lists(&book) {
        let prefix = line_list_key(tenant, customer, &list);
        each_under(
            snapshot,
            (&prefix, after_customer),
            (tenant, customer),
            &mut |rest, value| lines.add(rest, value),
        )?;
    }
    lines.put_into(&mut book);
    Ok(Some(book))
}

/// Every value under `prefix` as of `snapshot`, handed to `each` with the rest of its key
/// after its first `skip` bytes (at most the prefix's); a value `each` refuses is a corrupt
/// record of the customer.
fn each_under(
    snapshot: &rocksdb::Snapshot<'_>,
    (prefix, skip): (&[u8], usize),
    (tenant, customer): (&str, &str),
    each: &mut ApartValue<'_>,
) -> Result<()> {
    let from = rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward);
    for item in snapshot.iterator_opt(from, neruba_stage::keys::reading_under(prefix)) {
        let (key, value) = item?;
        if !key.starts_with(prefix) {
            break;
        }
        let rest = key.get(skip..).unwrap_or_default();
        each(rest, &value).map_err(|e| Error::corrupt(format!("{tenant}/{customer}"), e))?;
    }
    Ok(())
}

/// Up to `count` of a customer's grants as of `snapshot`, in burn-down order, those after
/// `after` (from the first without it): the book's and the spent ones kept apart (settled as
/// a read of the book settles them), read from `after` on, not all of them (`None`: no
/// record of the customer was applied).
pub fn grants_after(
    snapshot: &rocksdb::Snapshot<'_>,
    tenant: &str,
    customer: &str,
    after: Option<BurnPlace<'_>>,
    count: usize,
) -> Result<Option<Vec<GrantState>>> {
    let Some(mut book) = read_book_in(snapshot, tenant, customer, Parts::BOOK)? else {
        return Ok(None);
    };
    // Each with its place, worked out once (its times are parsed from their text).
    let placed = |state: GrantState| (burn_order(&state.grant), state);
    let mut held: Vec<_> = std::mem::take(&mut book.grants)
        .into_values()
        .map(|state| placed(*state))
        .filter(|(place, _)| after.is_none_or(|after| borrowed_place(place) > after))
        .collect();
    held.sort_by(|a, b| a.0.cmp(&b.0));
    // At most `count` kept apart: the book's can only take places.
    let prefix = customer_key(b'H', tenant, customer);
    let mut iter = snapshot.raw_iterator_opt(neruba_stage::keys::reading_under(&prefix));
    let from = after.map(|after| spent_grant_place_key(tenant, customer, after));
    iter.seek(from.as_deref().unwrap_or(&prefix));
    if from.is_some() && iter.key() == from.as_deref() {
        iter.next();
    }
    let clock_ms = stored_clock(&snapshot.get(CLOCK_KEY)?);
    let mut apart = Vec::new();
    while apart.len() < count
        && let Some(value) = iter.value()
    {
        let state = settled_grant(value, clock_ms)
            .map_err(|e| Error::corrupt(format!("a spent grant of {tenant}/{customer}"), e))?;
        apart.push(placed(state));
        iter.next();
    }
    iter.status()?;
    let grants = merge_in_order(held, apart, count, |a, b| a.0.cmp(&b.0));
    Ok(Some(grants.into_iter().map(|(_, state)| state).collect()))
}

/// Up to `count` of `held` and `kept`, each in `order`, merged in it. A place in both
/// (never, in one snapshot: the fold moves a value between its book and its keys) is the
/// book's `held` one, as the value stands. The page reads of what is kept apart (grants,
/// statement lines) take it so.
pub fn merge_in_order<T>(
    held: impl IntoIterator<Item = T>,
    kept: impl IntoIterator<Item = T>,
    count: usize,
    order: impl Fn(&T, &T) -> std::cmp::Ordering,
) -> Vec<T> {
    let (mut held, mut kept) = (held.into_iter().peekable(), kept.into_iter().peekable());
    let mut merged = Vec::new();
    while merged.len() < count {
        let next = match (held.peek(), kept.peek()) {
            (Some(book), Some(apart)) => match order(book, apart) {
                std::cmp::Ordering::Less => held.next(),
                std::cmp::Ordering::Greater => kept.next(),
                std::cmp::Ordering::Equal => {
                    kept.next();
                    held.next()
                }
            },
            (Some(_), None) => held.next(),
            (None, Some(_)) => kept.next(),
            (None, None) => break,
        };
        merged.extend(next);
    }
    merged
}

/// Grant `id` of a customer as of `snapshot`, from its book or kept apart (settled as a read
/// of every grant would show it); `None` if the customer has no such grant. One grant costs
/// a read or two, however many the customer has spent.
pub fn read_grant_in(
    snapshot: &rocksdb::Snapshot<'_>,
    tenant: &str,
    customer: &str,
    id: &str,
) -> Result<Option<GrantState>> {
    let Some(mut book) = read_book_in(snapshot, tenant, customer, Parts::BOOK)? else {
        return Ok(None);
    };
    if let Some(grant) = book.grants.remove(id) {
        return Ok(Some(*grant));
    }
    let Some(value) = snapshot.get(spilled_grant_key(tenant, customer, id))? else {
        return Ok(None);
    };
    let clock_ms = stored_clock(&snapshot.get(CLOCK_KEY)?);
    settled_grant(&value, clock_ms)
        .map(Some)
        .map_err(|e| Error::corrupt(format!("grant {id} of {tenant}/{customer}"), e))
}

/// What a read does with each value kept apart under a customer's keys of one kind: the rest
/// of its key after the customer, and the value.
type ApartValue<'a> = dyn FnMut(&[u8], &[u8]) -> std::result::Result<(), String> + 'a;

/// Statement lines kept apart, gathered by list to be put back into their book at once (they
/// come in key order, not in the lists' order: put back one at a time, each would shift the
/// rest).
#[derive(Default)]
struct SpilledLines {
    lists: BTreeMap<LineList, Vec<StatementLine>>,
}

impl SpilledLines {
    /// A line kept apart: the rest of its key after the customer, and its value.
    fn add(&mut self, rest: &[u8], value: &[u8]) -> std::result::Result<(), String> {
        let list = line_list_of(rest).ok_or("a malformed statement line key")?;
        let line: StatementLine = postcard::from_bytes(value).map_err(|e| e.to_string())?;
        self.lists.entry(list).or_default().push(line);
        Ok(())
    }

    fn put_into(self, book: &mut Book) {
        for (list, lines) in self.lists {
            book.put_lines(&list, lines);
        }
    }
}

/// The partition's clock as stored under [`CLOCK_KEY`] (`i64::MIN` before the first tick).
fn stored_clock(value: &Option<Vec<u8>>) -> i64 {
    value.as_deref().and_then(time_from).unwrap_or(i64::MIN)
}

/// A grant kept apart from its book: the rest of its key after the customer, and its value,
/// settled at the partition's clock `clock_ms` ([`GrantState::settle`]).
fn spilled_grant(
    rest: &[u8],
    value: &[u8],
    clock_ms: i64,
) -> std::result::Result<(String, GrantState), String> {
    let (id, _) = read_part(rest).ok_or("a malformed key")?;
    let id = String::from_utf8(id.to_vec()).map_err(|e| e.to_string())?;
    Ok((id, settled_grant(value, clock_ms)?))
}

/// A spent grant's stored value, settled as of the partition's clock ([`GrantState::settle`]).
fn settled_grant(value: &[u8], clock_ms: i64) -> std::result::Result<GrantState, String> {
    let mut state: GrantState = postcard::from_bytes(value).map_err(|e| e.to_string())?;
    state.settle(clock_ms);
    Ok(state)
}

/// Up to `limit` customers of `tenant` with a book in `db`, after `after`, in key order: shorter
/// ids first, then bytewise ([`customer_order`]).
pub fn customers(
    db: &rocksdb::DB,
    tenant: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>> {
    let mut prefix = Vec::new();
    push(&mut prefix, tenant.as_bytes());
    prefix.push(b'B');
    let start = match after {
        // The smallest key after `after`'s: its key with a zero byte appended.
        Some(after) => {
            let mut key = customer_key(b'B', tenant, after);
            key.push(0);
            key
        }
        None => prefix.clone(),
    };
    let mut out = Vec::new();
    let iter = db.iterator(rocksdb::IteratorMode::From(
        &start,
        rocksdb::Direction::Forward,
    ));
    for item in iter {
        let (key, _) = item?;
        let Some(rest) = key.strip_prefix(prefix.as_slice()) else {
            break;
        };
        let Some((customer, tail)) = read_part(rest) else {
            continue;
        };
        if !tail.is_empty() {
            continue;
        }
        out.push(String::from_utf8_lossy(customer).into_owned());
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// The order [`customers`] lists customer ids in (their keys' order), to merge partitions.
pub fn customer_order(id: &str) -> (usize, &[u8]) {
    (id.len(), id.as_bytes())
}

/// Every customer's book in the state of ledger partition `partition` under the stage's state
/// root, as `(tenant, customer, book)` in key order; `None` if the partition has no state. The
/// partition's owner lock is taken, so no stage may be running on it (for tools and the demo,
/// after the stage stopped).
pub fn read_books(
    root: &Path,
    topic: &str,
    partition: i32,
) -> Result<Option<Vec<(String, String, Book)>>> {
    let dir = neruba_stage::partition_dir(root, topic, partition);
    if !dir.exists() {
        return Ok(None);
    }
    let cache = Cache::new_lru_cache(8 << 20);
    let store = Store::open(&dir, partition, &store_options(), &cache)?;
    let clock_ms = stored_clock(&store.db().get(CLOCK_KEY)?);
    // In key order, with where each customer's book is.
    let mut books: Vec<(String, String, Book)> = Vec::new();
    let mut at: HashMap<(String, String), usize> = HashMap::default();
    // Each book's statement lines kept apart, put back once all are read.
    let mut lines: BTreeMap<usize, SpilledLines> = BTreeMap::new();
    for item in store.db().iterator(rocksdb::IteratorMode::Start) {
        let (key, value) = item?;
        let parsed = read_part(&key).and_then(|(tenant, rest)| {
            let (kind, rest) = rest.split_first()?;
            let (customer, rest) = read_part(rest)?;
            matches!(kind, b'B' | b'G' | b'T').then_some((tenant, *kind, customer, rest))
        });
        let Some((tenant, kind, customer, rest)) = parsed else {
            continue;
        };
        let (tenant, customer) = (
            String::from_utf8_lossy(tenant).into_owned(),
            String::from_utf8_lossy(customer).into_owned(),
        );
        match kind {
            b'B' if rest.is_empty() => {
                let book = Book::decode(&value)
                    .map_err(|e| Error::corrupt(format!("book of {tenant}/{customer}"), e))?;
                at.insert((tenant.clone(), customer.clone()), books.len());
                books.push((tenant, customer, book));
            }
            b'G' => {
                let (id, state) = spilled_grant(rest, &value, clock_ms)
                    .map_err(|e| Error::corrupt(format!("grant of {tenant}/{customer}"), e))?;
                // A tenant's books come before its grants in key order.
                let book = at.get(&(tenant, customer)).and_then(|i| books.get_mut(*i));
                if let Some((_, _, book)) = book {
                    book.grants.insert(id, Box::new(state));
                }
            }
            b'T' => {
                if let Some(i) = at.get(&(tenant.clone(), customer.clone())) {
                    lines
                        .entry(*i)
                        .or_default()
                        .add(rest, &value)
                        .map_err(|e| {
                            Error::corrupt(format!("statement line of {tenant}/{customer}"), e)
                        })?;
                }
            }
            _ => {}
        }
    }
    for (i, lines) in lines {
        if let Some((_, _, book)) = books.get_mut(i) {
            lines.put_into(book);
        }
    }
    Ok(Some(books))
}

impl neruba_stage::Partition for PartitionState {
    fn store(&self) -> &Store {
        &self.store
    }

    /// Writes the batch: changed books, applied-item marks, clock, deadline index and the next
    /// offset, atomically.
    fn commit(&mut self) -> Result<()> {
        self.commit_with(WriteBatch::default())
    }

    /// Once the worker's partitions hold as many bytes of decoded books as a batch may
    /// ([`BOOKS_HELD_BYTES`]).
    fn batch_full(&self) -> bool {
        self.held.bytes() >= self.held_bound
    }

    /// After a tick that stopped partway at that bound (see `apply_tick`).
    fn apply_again(&self) -> bool {
        self.again
    }
}

impl PartitionState {
    /// Writes the batch, as [`neruba_stage::Partition::commit`] does, with `batch`'s writes in
    /// the same atomic write (a read model's own keys).
    pub fn commit_with(&mut self, mut batch: WriteBatch) -> Result<()> {
        // Drained, so the set keeps its room for the next batch.
        for key in self.new_items.drain() {
            batch.put(key, []);
        }
        self.spilled.write(&mut batch)?;
        self.spilled_grants.write(&mut batch)?;
        self.spent_grants_in_order.write(&mut batch)?;
        self.spilled_lines.write(&mut batch)?;
        let mut dirty: Vec<CustomerKey> = self.dirty.drain().collect();
        dirty.sort();
        let mut written = Vec::with_capacity(dirty.len());
        for key in dirty {
            let Some(book) = self.books.get(&key) else {
                continue;
            };
            let bytes = book
                .encode()
                .map_err(|e| Error::Bug(format!("book encoding: {e}")))?;
            batch.put(&key, &bytes);
            written.push((key, bytes));
        }
        for (key, (tenant, customer, stored)) in std::mem::take(&mut self.index_stored) {
            let now = self.expiry_of.get(&key).copied();
            if stored != now {
                if let Some(at) = stored {
                    batch.delete(expiry_key(at, &tenant, &customer));
                }
                if let Some(at) = now {
                    batch.put(expiry_key(at, &tenant, &customer), []);
                }
            }
        }
        if std::mem::take(&mut self.clock_dirty) {
            batch.put(CLOCK_KEY, time_bytes(self.clock_ms));
        }
        if std::mem::take(&mut self.longest_window_dirty) {
            batch.put(WINDOW_KEY, time_bytes(self.longest_window_ms));
        }
        self.store.write(batch)?;
        // Written: the records' growth is in the books' stored forms now, which are kept (a
        // customer's next records usually follow soon), within a bound; the decoded books go.
        for (key, bytes) in written {
            self.keep_stored(key, bytes);
        }
        self.drop_books();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neruba_stage::Partition as _;

    #[test]
    fn keys_are_injective_and_the_expiry_index_reads_back() {
        assert_ne!(item_key("a", "b", "c/d"), item_key("a", "b/c", "d"));
        assert_ne!(customer_key(b'B', "ab", "c"), customer_key(b'B', "a", "bc"));
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        {
            let mut state = PartitionState::open(dir.path(), 0, &cache, 0).expect("open");
            state
                .books
                .insert(customer_key(b'B', "acme", "c/1"), Book::default());
            state.expiry_of.insert(customer_key(b'B', "acme", "c/1"), 5);
            state.emit("acme", "c/1", Vec::new());
            // A stored index entry for a book with no expiry any more is removed at commit.
            let mut batch = WriteBatch::default();
            batch.put(expiry_key(5, "acme", "c/1"), []);
            batch.put(expiry_key(9, "globex", "x"), []);
            state.store.write(batch).expect("seed");
            state.commit().expect("commit");
        }
        let state = PartitionState::open(dir.path(), 0, &cache, 0).expect("reopen");
        assert_eq!(
            state.expiries.iter().cloned().collect::<Vec<_>>(),
            vec![(9, "globex".to_owned(), "x".to_owned())]
        );
    }

    fn line_item(id: &str, period: usize, amount: rust_decimal::Decimal) -> LineItem {
        const DAY: i64 = 86_400_000;
        let start = 1_700_000_000_000 + i64::try_from(period).expect("small") * 30 * DAY;
        let at = neruba_schemas::event::format_time_ms;
        LineItem {
            v: 1,
            id: id.into(),
            kind: neruba_schemas::ledger::Kind::Usage,
            tenant: "acme".into(),
            customer: "c1".into(),
            meter: "m".into(),
            group: BTreeMap::new(),
            period_start: at(start),
            period_end: at(start + 30 * DAY),
            window_start: at(start + DAY),
            window_end: at(start + DAY + 60_000),
            window_quantity: rust_decimal::Decimal::ONE,
            window_events: 1,
            period_quantity: rust_decimal::Decimal::ONE,
            amount,
            period_amount: amount,
            currency: "USD".into(),
            price_plan: "p".into(),
            price_version: 1,
            revision: 1,
            supersedes: None,
        }
    }

    /// A grant of `amount` USD to `customer` of tenant `acme`, keyed `key`, never expiring.
    fn usd_grant(customer: &str, key: &str, amount: &str, priority: u16) -> Grant {
        Grant {
            v: 1,
            id: credit::grant_id("acme", customer, key),
            tenant: "acme".into(),
            customer: customer.into(),
            key: key.into(),
            terms: credit::GrantTerms {
                amount: amount.parse().expect("decimal"),
                currency: "USD".into(),
                priority,
                effective_at: None,
                expires_at: None,
                paid: None,
                metadata: BTreeMap::new(),
            },
            received_at: neruba_schemas::event::format_time_ms(0),
        }
    }

    /// A record of customer `c1` of tenant `acme`, as the state tests write them.
    #[derive(Clone)]
    enum Op {
        Grant(Grant),
        Item(LineItem),
        /// A tick at this time.
        Tick(i64),
        /// A void of this grant id.
        Void(String),
    }

    impl Op {
        /// A void of `grant`, as the gateway writes it.
        fn void(grant: &str) -> Void {
            Void {
                v: credit::VOID_RECORD_V,
                tenant: "acme".into(),
                customer: "c1".into(),
                grant: grant.to_owned(),
                received_at: neruba_schemas::event::format_time_ms(0),
            }
        }

        /// The record on the ledger topic.
        fn record(&self) -> (Vec<u8>, Record) {
            match self {
                Self::Grant(g) => (credit::encode(g), Record::Grant),
                Self::Item(i) => (i.encode(), Record::LineItem),
                Self::Tick(at_ms) => (
                    credit::encode(&Tick {
                        v: 1,
                        at_ms: *at_ms,
                        finalize_after_ms: None,
                    }),
                    Record::Tick,
                ),
                Self::Void(grant) => (credit::encode(&Self::void(grant)), Record::Void),
            }
        }
    }

    /// `ops` folded into one book that keeps everything, as a partition would (grants read at
    /// its clock, the latest tick): the book and its entries.
    fn fold_in_one_book(ops: &[Op]) -> (Book, Vec<credit::BalanceEntry>) {
        let mut book = Book::default();
        let mut entries = Vec::new();
        let mut clock = i64::MIN;
        for op in ops {
            entries.extend(match op {
                Op::Grant(g) => book.apply_grant(g, clock, 0),
                Op::Item(i) => book.apply_item(i),
                Op::Tick(at_ms) => {
                    clock = *at_ms;
                    book.apply_tick("acme", "c1", *at_ms, 0, credit::DEFAULT_FINALIZE_AFTER_MS)
                }
                Op::Void(id) => book.apply_void(&Op::void(id)),
            });
        }
        (book, entries)
    }

    /// The book of `customer` (tenant `acme`) as stored, without what is kept apart from it.
    fn stored_book(state: &PartitionState, customer: &str) -> Book {
        let bytes = state
            .store
            .db()
            .get(customer_key(b'B', "acme", customer))
            .expect("get")
            .expect("book");
        Book::decode(&bytes).expect("decode")
    }

    /// Applies `records` to a fresh partition state, writing every `commit_every` records and
    /// starting again from the store alone after record `reopen_at`; the entries, the state
    /// and its directory.
    fn fold_through_store(
        records: &[(Vec<u8>, Record)],
        commit_every: usize,
        reopen_at: usize,
    ) -> (Vec<credit::BalanceEntry>, PartitionState, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let mut state = PartitionState::open(dir.path(), 0, &cache, 0).expect("open");
        let mut outputs = Vec::new();
        for (n, (bytes, record)) in records.iter().enumerate() {
            let input = Input {
                offset: i64::try_from(n).expect("small"),
                key: None,
                payload: bytes,
            };
            state.apply(input, *record).expect("apply");
            if n % commit_every == commit_every - 1 {
                outputs.extend(state.take_outputs());
                state.commit().expect("commit");
            }
            if n == reopen_at {
                outputs.extend(state.take_outputs());
                state.commit().expect("commit");
                drop(state);
                state = PartitionState::open(dir.path(), 0, &cache, 0).expect("reopen");
            }
        }
        outputs.extend(state.take_outputs());
        state.commit().expect("commit");
        let entries = outputs
            .into_iter()
            .filter_map(|o| match o {
                Output::Entry(e) => Some(*e),
                _ => None,
            })
            .collect();
        (entries, state, dir)
    }

    /// That no decoded book counts against the next batch once written, and waits (5 s at
    /// most) until they are freed, which may happen on the thread that drops them.
    fn freed(held: &BooksHeld) {
        assert_eq!(held.bytes(), 0, "decoded books counted after their write");
        let started = std::time::Instant::now();
        while held.freeing_bytes() > 0 && started.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(
            held.freeing_bytes(),
            0,
            "books not freed 5 s after their write"
        );
    }

    /// Applies `records` (offsets from 0) to the partition state in `dir`, writing after each
    /// record and after each part of one that stops partway; with `stop_after_parts`, stops
    /// (as a crash would, nothing more written) once that many parts of a record were written.
    /// The entries delivered, and for each record the parts it took.
    fn apply_in_parts(
        dir: &Path,
        held_bound: usize,
        records: &[(Vec<u8>, Record)],
        stop_after_parts: Option<usize>,
    ) -> (Vec<credit::BalanceEntry>, Vec<usize>) {
        let cache = Cache::new_lru_cache(1 << 20);
        let mut state = PartitionState::open(dir, 0, &cache, 0)
            .expect("open")
            .with_books_held(BooksHeld::default(), held_bound, usize::MAX);
        let from = state.next_offset().unwrap_or(0);
        let (mut entries, mut parts) = (Vec::new(), Vec::new());
        for (offset, (bytes, record)) in (0_i64..)
            .zip(records)
            .skip(usize::try_from(from).expect("offset"))
        {
            let input = Input {
                offset,
                key: None,
                payload: bytes,
            };
            let mut part = 0;
            loop {
                state.apply(input, *record).expect("apply");
                part += 1;
                let again = neruba_stage::Partition::apply_again(&state);
                entries.extend(state.take_outputs().into_iter().filter_map(|o| match o {
                    Output::Entry(e) => Some(*e),
                    _ => None,
                }));
                state.commit().expect("commit");
                if again {
                    // Written with the offset still at the record, and the clock where it was.
                    assert_eq!(state.store.next_offset(), Some(offset));
                    let clock = stored_clock(&state.store.db().get(CLOCK_KEY).expect("clock"));
                    assert_eq!(clock, i64::MIN);
                }
                if stop_after_parts == Some(part) && again {
                    return (entries, parts);
                }
                if !again {
                    break;
                }
            }
            parts.push(part);
        }
        (entries, parts)
    }

    #[test]
    fn a_tick_due_for_more_books_than_a_batch_holds_is_applied_in_parts_with_the_same_entries() {
        // Was: a tick applied to every customer due by it at once, decoding each one's book
        // (and the statement lines kept apart from it) in a single batch, however many: at a
        // period's end, every customer of the partition, past any bound on a batch's memory.
        let mut records: Vec<(Vec<u8>, Record)> = (0..5)
            .map(|n| {
                let mut grant = usd_grant(&format!("c{n}"), "pack", &format!("{}", n + 1), 1);
                grant.terms.expires_at = Some(neruba_schemas::event::format_time_ms(1_000 + n));
                (credit::encode(&grant), Record::Grant)
            })
            .collect();
        records.push(Op::Tick(10_000).record());
        records.push((
            credit::encode(&usd_grant("c2", "later", "7", 1)),
            Record::Grant,
        ));
        let whole_dir = tempfile::tempdir().expect("tempdir");
        let (whole, whole_parts) = apply_in_parts(whole_dir.path(), usize::MAX, &records, None);
        assert_eq!(whole_parts, [1; 7]);
        let expired: Vec<(String, rust_decimal::Decimal)> = whole
            .iter()
            .filter(|e| e.kind == credit::EntryKind::Expire)
            .map(|e| (e.customer.clone(), e.amount))
            .collect();
        let want: Vec<(String, rust_decimal::Decimal)> = (1..=5)
            .map(|n| (format!("c{}", n - 1), -rust_decimal::Decimal::from(n)))
            .collect();
        assert_eq!(expired, want);
        // Bounded to one byte: a part per customer due, the same entries in the same order.
        let parts_dir = tempfile::tempdir().expect("tempdir");
        let (in_parts, parts) = apply_in_parts(parts_dir.path(), 1, &records, None);
        assert_eq!(parts, [1, 1, 1, 1, 1, 5, 1]);
        assert_eq!(in_parts, whole);
        // Stopped after two parts and started again from the store: the tick goes on with the
        // third customer, and every entry is delivered once, the same.
        let crash_dir = tempfile::tempdir().expect("tempdir");
        let (before, _) = apply_in_parts(crash_dir.path(), 1, &records, Some(2));
        assert_eq!(before.len(), 5 + 2);
        let (after, after_parts) = apply_in_parts(crash_dir.path(), 1, &records, None);
        assert_eq!(after_parts, [3, 1]);
        assert_eq!([before, after].concat(), whole);
        for dir in [parts_dir.path(), crash_dir.path()] {
            let cache = Cache::new_lru_cache(1 << 20);
            let state = PartitionState::open(dir, 0, &cache, 0).expect("open");
            let whole_state = PartitionState::open(whole_dir.path(), 0, &cache, 0).expect("open");
            assert_eq!(state.clock_ms, 10_000);
            assert_eq!(state.next_offset(), Some(7));
            for n in 0..5 {
                let customer = format!("c{n}");
                assert_eq!(
                    stored_book(&state, &customer),
                    stored_book(&whole_state, &customer)
                );
            }
        }
        // A tick done earlier in the batch of one that stops partway is written with its own
        // time: the clock stored is the last tick done.
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let mut state = PartitionState::open(dir.path(), 0, &cache, 0)
            .expect("open")
            .with_books_held(BooksHeld::default(), 1, usize::MAX);
        let mut batch: Vec<(Vec<u8>, Record)> = records[..5].to_vec();
        batch.push(Op::Tick(500).record());
        batch.push(Op::Tick(10_000).record());
        for (offset, (bytes, record)) in (0_i64..).zip(&batch) {
            let input = Input {
                offset,
                key: None,
                payload: bytes,
            };
            state.apply(input, *record).expect("apply");
        }
        assert!(neruba_stage::Partition::apply_again(&state));
        state.commit().expect("commit");
        let clock = stored_clock(&state.store.db().get(CLOCK_KEY).expect("clock"));
        assert_eq!((clock, state.store.next_offset()), (500, Some(6)));
    }

    #[test]
    fn a_worker_s_partitions_count_the_books_they_hold_and_a_batch_is_full_at_its_bound() {
        // Was: a batch held the book of every customer it touched, up to 50,000 records of as
        // many customers, and 50,000 books stayed cached per partition after it, whatever
        // their size (a book of two grants takes 4 KiB in memory; one of 1,000 grants 600 KiB).
        let dirs = [tempfile::tempdir(), tempfile::tempdir()].map(|d| d.expect("tempdir"));
        let cache = Cache::new_lru_cache(1 << 20);
        let held = BooksHeld::default();
        let open = |partition: i32, held_bound: usize, kept_bound: usize| {
            let dir = dirs
                .get(usize::try_from(partition).expect("partition"))
                .expect("dir");
            PartitionState::open(dir.path(), partition, &cache, 0)
                .expect("open")
                .with_books_held(held.clone(), held_bound, kept_bound)
        };
        let grants: Vec<Vec<u8>> = (0..6)
            .map(|n| credit::encode(&usd_grant(&format!("c{n}"), "pack", "10", 1)))
            .collect();
        // What each grant of a customer with no stored book is counted at until the write.
        let costs: Vec<usize> = grants
            .iter()
            .map(|g| held_estimate(0) + growth_estimate(g.len()))
            .collect();
        let bound = costs[..3].iter().sum::<usize>();
        let mut first = open(0, bound, usize::MAX);
        let mut full_after = Vec::new();
        for (offset, grant) in (0_i64..).zip(&grants[..4]) {
            let input = Input {
                offset,
                key: None,
                payload: grant,
            };
            first.apply(input, Record::Grant).expect("apply");
            full_after.push(neruba_stage::Partition::batch_full(&first));
        }
        // Full from the third customer's book on: the count reaches the bound exactly there.
        assert_eq!(full_after, [false, false, true, true]);
        assert_eq!(held.bytes(), costs[..4].iter().sum::<usize>());
        // Written: the decoded books and the records' growth dropped, each book kept in the
        // form it was written in.
        neruba_stage::Partition::commit(&mut first).expect("commit");
        freed(&held);
        let stored: Vec<(Vec<u8>, Vec<u8>)> = (0..4)
            .map(|n| {
                let key = customer_key(b'B', "acme", &format!("c{n}"));
                let bytes = first.store.db().get(&key).expect("read").expect("book");
                (key, bytes)
            })
            .collect();
        let kept: usize = stored.iter().map(|(k, b)| kept_cost(k, b)).sum();
        assert_eq!((held.bytes(), held.kept_bytes()), (0, kept));
        assert_eq!((first.books.len(), first.stored.len()), (0, 4));
        // The gauge reads the most the batch held, though its books are gone by then, and
        // what is kept; the next reading starts again from what is held.
        let registry = prometheus::Registry::new();
        let gauge = crate::metrics::BooksMemory::register("balances", &registry).expect("gauge");
        let reading = |registry: &prometheus::Registry| -> Vec<(String, i64)> {
            registry
                .gather()
                .iter()
                .flat_map(|family| family.get_metric().iter())
                .map(|m| {
                    let labels: Vec<&str> = m.get_label().iter().map(|l| l.value()).collect();
                    (labels.join(" "), m.get_gauge().get_value() as i64)
                })
                .collect()
        };
        gauge.publish(3, &held);
        let peak = i64::try_from(costs[..4].iter().sum::<usize>()).expect("bytes");
        let kept_i64 = i64::try_from(kept).expect("bytes");
        assert_eq!(
            reading(&registry),
            [
                ("balances decoded 3".to_owned(), peak),
                ("balances freeing 3".to_owned(), 0),
                ("balances kept 3".to_owned(), kept_i64),
            ]
        );
        gauge.publish(3, &held);
        assert_eq!(reading(&registry)[0], ("balances decoded 3".to_owned(), 0));
        // A book needed again is decoded from what was kept, not read (the store's copy is
        // gone here), and counted at its size.
        first.store.db().delete(&stored[0].0).expect("delete");
        let book = first.book("acme", "c0").expect("book");
        assert_eq!(book.balance("USD"), rust_decimal::Decimal::TEN);
        assert_eq!(held.bytes(), held_estimate(stored[0].1.len()));
        neruba_stage::Partition::commit(&mut first).expect("commit");
        freed(&held);
        assert_eq!((held.bytes(), held.kept_bytes()), (0, kept));
        // A second partition of the worker counts into the same totals; past the bound of
        // what they keep, it drops what it kept at its write; a dropped partition gives back
        // what it kept.
        let mut second = open(1, usize::MAX, kept);
        for (offset, grant) in (0_i64..).zip(&grants[4..]) {
            let input = Input {
                offset,
                key: None,
                payload: grant,
            };
            second.apply(input, Record::Grant).expect("apply");
        }
        assert_eq!(held.bytes(), costs[4] + costs[5]);
        neruba_stage::Partition::commit(&mut second).expect("commit");
        freed(&held);
        assert_eq!((held.bytes(), held.kept_bytes()), (0, kept));
        assert_eq!((second.books.len(), second.stored.len()), (0, 0));
        drop(first);
        assert_eq!((held.bytes(), held.kept_bytes()), (0, 0));
        // Past its bound alone, a partition drops only as many as bring it back to half.
        let alone = BooksHeld::default();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut third = PartitionState::open(dir.path(), 2, &cache, 0)
            .expect("open")
            .with_books_held(alone.clone(), usize::MAX, kept);
        for (offset, grant) in (0_i64..).zip(&grants) {
            let input = Input {
                offset,
                key: None,
                payload: grant,
            };
            third.apply(input, Record::Grant).expect("apply");
        }
        neruba_stage::Partition::commit(&mut third).expect("commit");
        let left: usize = third.stored.iter().map(|(k, b)| kept_cost(k, b)).sum();
        assert_eq!(alone.kept_bytes(), left);
        assert!(
            left <= kept / 2 && !third.stored.is_empty(),
            "{left} of {kept}, {} books",
            third.stored.len()
        );
        // What was dropped is read from the store again, with the same balance.
        let book = second.book("acme", "c4").expect("book");
        assert_eq!(book.balance("USD"), rust_decimal::Decimal::TEN);
    }

    #[test]
    fn a_book_changed_again_later_in_its_batch_is_stored_as_the_batch_leaves_it() {
        // Every book a batch changed is written as the batch leaves it, whether its customer's
        // records interleave with others' (c1, c2) or follow one another (c3).
        let d = |text: &str| text.parse::<rust_decimal::Decimal>().expect("decimal");
        let grant = |customer: &str, amount: &str| usd_grant(customer, "pack", amount, 1);
        let item = |customer: &str, id: &str, amount: &str| LineItem {
            customer: customer.into(),
            ..line_item(id, 0, d(amount))
        };
        let grants = [grant("c1", "10"), grant("c2", "5"), grant("c3", "7")];
        let items = [
            item("c1", "li_1", "4"),
            item("c2", "li_2", "1"),
            item("c3", "li_3", "1"),
            item("c3", "li_4", "2"),
            item("c1", "li_5", "2.5"),
            item("c1", "li_6", "1"),
            item("c2", "li_7", "0.5"),
        ];
        let mut records: Vec<(Vec<u8>, Record)> = grants
            .iter()
            .map(|g| (credit::encode(g), Record::Grant))
            .collect();
        records.extend(items.iter().map(|i| (i.encode(), Record::LineItem)));
        // One batch, committed after the last record, then read back from the store alone.
        let (_, state, _dir) = fold_through_store(&records, 100, records.len() - 1);
        let mut books: BTreeMap<&str, Book> = BTreeMap::new();
        for g in &grants {
            books
                .entry(g.customer.as_str())
                .or_default()
                .apply_grant(g, i64::MIN, 0);
        }
        for i in &items {
            books.entry(i.customer.as_str()).or_default().apply_item(i);
        }
        let stored: BTreeMap<&str, Book> = books
            .keys()
            .map(|customer| {
                let book = read_book(state.store.db(), "acme", customer)
                    .expect("read")
                    .expect("book");
                (*customer, book)
            })
            .collect();
        assert_eq!(stored, books);
        let balances: Vec<_> = stored.values().map(|book| book.balance("USD")).collect();
        assert_eq!(balances, [d("2.5"), d("3.5"), d("4")]);
    }

    #[test]
    fn old_series_live_apart_from_the_book_and_come_back_for_a_correction() {
        // Was: every series a customer ever had stayed in its book, so the book written after
        // each line item grew with the customer's whole history.
        let d = |text: &str| text.parse::<rust_decimal::Decimal>().expect("decimal");
        let grant = |key: &str, amount: &str, priority: u16| usd_grant("c1", key, amount, priority);
        let periods = BOOK_SERIES + 6;
        let mut items: Vec<LineItem> = (0..periods)
            .map(|p| line_item(&format!("li_{p}"), p, d("10")))
            .collect();
        // Corrections of the oldest period (long out of the book) and of the newest.
        items.push(line_item("li_fix_old", 0, d("-4")));
        items.push(line_item("li_fix_new", periods - 1, d("-25")));
        let grants = [grant("promo", "15", 1), grant("pack", "1000", 10)];

        let mut records: Vec<(Vec<u8>, Record)> = grants
            .iter()
            .map(|g| (credit::encode(g), Record::Grant))
            .collect();
        records.extend(items.iter().map(|i| (i.encode(), Record::LineItem)));
        let (entries, state, _dir) = fold_through_store(&records, 5, records.len() / 2);

        // The same records folded into one book that keeps every series.
        let mut book = Book::default();
        let mut expected = Vec::new();
        for g in &grants {
            expected.extend(book.apply_grant(g, i64::MIN, 0));
        }
        for item in &items {
            expected.extend(book.apply_item(item));
        }
        assert_eq!(entries, expected);
        // The oldest period's correction gave its credit back to the grant that period drew on.
        let old_fix: Vec<(credit::EntryKind, String)> = entries
            .iter()
            .filter(|e| e.cause == "li_fix_old")
            .map(|e| (e.kind, e.amount.to_string()))
            .collect();
        assert_eq!(old_fix, vec![(credit::EntryKind::Restore, "4".to_owned())]);
        let stored = read_book(state.store.db(), "acme", "c1")
            .expect("read")
            .expect("book");
        assert_eq!(stored.series.len(), BOOK_SERIES);
        assert_eq!(book.series.len(), periods);
        assert_eq!(stored.balances, book.balances);
        assert_eq!(stored.grants, book.grants);
    }

    #[test]
    fn ended_grants_live_apart_from_the_book_and_come_back_when_named() {
        // Was: every grant a customer ever had stayed in its book, so a customer buying a pack
        // every month wrote every pack it ever bought after each line item.
        const DAY: i64 = 86_400_000;
        let d = |text: &str| text.parse::<rust_decimal::Decimal>().expect("decimal");
        let at = neruba_schemas::event::format_time_ms;
        let start = |p: usize| 1_700_000_000_000 + i64::try_from(p).expect("small") * 30 * DAY;
        // A monthly pack, usable in its month only.
        let pack = |p: usize, amount: &str| {
            let key = format!("pack-{p}");
            Grant {
                v: 1,
                id: credit::grant_id("acme", "c1", &key),
                tenant: "acme".into(),
                customer: "c1".into(),
                key,
                terms: credit::GrantTerms {
                    amount: d(amount),
                    currency: "USD".into(),
                    priority: 1,
                    effective_at: Some(at(start(p))),
                    expires_at: Some(at(start(p + 1))),
                    paid: None,
                    metadata: BTreeMap::new(),
                },
                received_at: at(start(p)),
            }
        };
        // More months than a book keeps series of: the first month's correction finds both
        // its series and its pack kept apart.
        let months = BOOK_SERIES + 2;
        let mut ops = Vec::new();
        // A second month's pack under other terms, as version 3: refused once, though sent
        // again after the restart and after its pack was kept apart.
        let conflicting = Grant {
            v: credit::GRANT_RECORD_V,
            ..pack(1, "12")
        };
        for p in 0..months {
            ops.push(Op::Grant(pack(p, "10")));
            ops.push(Op::Item(line_item(&format!("li_{p}"), p, d("8"))));
            ops.push(Op::Tick(start(p + 1)));
            if p == 1 {
                ops.push(Op::Grant(conflicting.clone()));
            }
        }
        // A correction of the first month gives credit back to its pack, long expired and
        // out of the book: it expires again at once.
        ops.push(Op::Item(line_item("li_fix_0", 0, d("-3"))));
        // A void of an expired pack, a repeat of one, and another pack under an old key.
        ops.push(Op::Void(credit::grant_id("acme", "c1", "pack-1")));
        ops.push(Op::Grant(pack(2, "10")));
        ops.push(Op::Grant(pack(3, "11")));
        ops.push(Op::Grant(conflicting));

        let records: Vec<(Vec<u8>, Record)> = ops.iter().map(Op::record).collect();
        let (entries, state, _dir) = fold_through_store(&records, 4, records.len() * 2 / 3);

        // The same records folded into one book that keeps every grant.
        let (book, expected) = fold_in_one_book(&ops);
        assert_eq!(entries, expected);
        let fix: Vec<(credit::EntryKind, String)> = entries
            .iter()
            .filter(|e| e.cause == "li_fix_0")
            .map(|e| (e.kind, e.amount.to_string()))
            .collect();
        assert_eq!(
            fix,
            vec![
                (credit::EntryKind::Restore, "3".to_owned()),
                (credit::EntryKind::Expire, "-3".to_owned()),
            ]
        );
        let refused: Vec<Option<String>> = entries
            .iter()
            .filter(|e| e.kind == credit::EntryKind::GrantRefused)
            .map(|e| e.code.clone())
            .collect();
        assert_eq!(refused, vec![Some("key_conflict".to_owned()); 2]);
        // The stored book holds the newest ended grants only; a read gets them all back.
        let stored = stored_book(&state, "c1");
        assert_eq!(stored.grants.len(), BOOK_SPENT_GRANTS);
        assert_eq!(book.grants.len(), months);
        let read = read_book(state.store.db(), "acme", "c1")
            .expect("read")
            .expect("book");
        assert_eq!(read.grants, book.grants);
        assert_eq!(read.balances, book.balances);
    }

    #[test]
    fn grants_drawn_down_to_nothing_live_apart_from_the_book_and_come_back_settled() {
        // Was: a grant drawn down to nothing stayed active in its book for good (or until its
        // expiry), so a customer topping up every hour wrote every top-up it ever used up
        // after each line item, and its book grew without end.
        const DAY: i64 = 86_400_000;
        let d = |text: &str| text.parse::<rust_decimal::Decimal>().expect("decimal");
        let at = neruba_schemas::event::format_time_ms;
        let start = |p: usize| 1_700_000_000_000 + i64::try_from(p).expect("small") * 30 * DAY;
        let topup = |n: usize| usd_grant("c1", &format!("topup-{n}"), "1", 1);
        // Drawn down at once, expiring much later: kept apart while still active.
        let yearly = Grant {
            id: credit::grant_id("acme", "c1", "yearly"),
            key: "yearly".into(),
            terms: credit::GrantTerms {
                expires_at: Some(at(start(60))),
                ..usd_grant("c1", "yearly", "5", 1).terms
            },
            ..usd_grant("c1", "yearly", "5", 1)
        };
        let void = |key: &str| Op::Void(credit::grant_id("acme", "c1", key));
        let mut ops = vec![Op::Grant(yearly), Op::Item(line_item("li_y", 0, d("5")))];
        let topups = 3 * BOOK_SPENT_GRANTS;
        for n in 1..=topups {
            ops.push(Op::Grant(topup(n)));
            ops.push(Op::Item(line_item(&format!("li_{n}"), n, d("1"))));
        }
        ops.extend([
            // The yearly grant's expiry passes while it is kept apart: it ends without an
            // entry, and credit a correction gives back to it expires again at once.
            Op::Tick(start(61)),
            Op::Item(line_item("li_fix_y", 0, d("-2"))),
            // A void of a used-up top-up changes no balance; credit given back to it after
            // is voided at once.
            void("topup-3"),
            Op::Item(line_item("li_fix_3", 3, d("-1"))),
            // Credit given back to a used-up top-up that has not ended is drawn on again.
            Op::Item(line_item("li_fix_5", 5, d("-1"))),
            Op::Item(line_item("li_more", topups + 1, d("1.5"))),
        ]);
        let records: Vec<(Vec<u8>, Record)> = ops.iter().map(Op::record).collect();
        let (entries, state, _dir) = fold_through_store(&records, 7, records.len() / 2);

        // The same records folded into one book that keeps every grant.
        let (book, expected) = fold_in_one_book(&ops);
        assert_eq!(entries, expected);
        let of = |cause: &str| -> Vec<(credit::EntryKind, String)> {
            entries
                .iter()
                .filter(|e| e.cause == cause)
                .map(|e| (e.kind, e.amount.to_string()))
                .collect()
        };
        use credit::EntryKind::{Consume, Expire, Restore, Uncovered, Void as Voided};
        assert_eq!(
            of("li_fix_y"),
            [(Restore, "2".to_owned()), (Expire, "-2".to_owned())]
        );
        assert!(
            of(&format!(
                "void/{}",
                credit::grant_id("acme", "c1", "topup-3")
            ))
            .is_empty()
        );
        assert_eq!(
            of("li_fix_3"),
            [(Restore, "1".to_owned()), (Voided, "-1".to_owned())]
        );
        assert_eq!(of("li_fix_5"), [(Restore, "1".to_owned())]);
        assert_eq!(
            of("li_more"),
            [(Consume, "-1".to_owned()), (Uncovered, "0.5".to_owned())]
        );
        // The stored book holds the newest spent grants only; a read gets them all back, as
        // the book that kept them has them (the yearly grant expired, topup-3 voided).
        let stored = stored_book(&state, "c1");
        assert_eq!(stored.grants.len(), BOOK_SPENT_GRANTS);
        assert_eq!(book.grants.len(), topups + 1);
        let read = read_book(state.store.db(), "acme", "c1")
            .expect("read")
            .expect("book");
        assert_eq!(read.grants, book.grants);
        assert_eq!(read.balances, book.balances);
        let status = |key: &str| read.grants[&credit::grant_id("acme", "c1", key)].status;
        assert_eq!(
            [status("yearly"), status("topup-3"), status("topup-4")],
            [
                crate::book::Status::Expired,
                crate::book::Status::Voided,
                crate::book::Status::Active
            ]
        );
    }

    #[test]
    fn values_handed_back_whole_are_deleted_by_one_range_and_what_is_kept_since_survives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = rocksdb::DB::open_default(dir.path()).expect("open");
        let key = |prefix: u8, n: u32| {
            let mut key = vec![prefix];
            key.extend_from_slice(&n.to_be_bytes());
            key
        };
        let write = |apart: &mut Apart<u32>| {
            let mut batch = WriteBatch::default();
            apart.write(&mut batch).expect("write");
            db.write(batch).expect("db write");
        };
        let stored = |prefix: u8| -> Vec<(Vec<u8>, u32)> {
            db.prefix_iterator([prefix])
                .map(|item| item.expect("read"))
                .take_while(|(k, _)| k.first() == Some(&prefix))
                .map(|(k, v)| (k.to_vec(), postcard::from_bytes(&v).expect("value")))
                .collect()
        };
        let point_deletions = || {
            db.property_int_value("rocksdb.num-deletes-active-mem-table")
                .expect("property")
                .expect("known")
        };
        let mut apart: Apart<u32> = Apart::default();
        let many = u32::try_from(RANGE_DELETION_FROM).expect("small");
        for n in 0..many {
            apart.keep(key(1, n), n);
        }
        // Under another prefix, fewer than a range's worth.
        apart.keep(key(2, 0), 20);
        apart.keep(key(2, 1), 21);
        write(&mut apart);

        let mut all = apart.take_all(&db, &[1], String::new).expect("take all");
        all.sort_unstable();
        assert_eq!(all, (0..many).collect::<Vec<_>>());
        // Taken with the prefix: not read again from the store.
        assert_eq!(
            apart.take_back(&db, key(1, 5), String::new).expect("back"),
            None
        );
        // Kept again, then handed back, then kept again: the last one survives the range.
        apart.keep(key(1, 5), 500);
        assert_eq!(
            apart.take_back(&db, key(1, 5), String::new).expect("back"),
            Some(500)
        );
        apart.keep(key(1, 7), 700);
        assert_eq!(
            apart.take_all(&db, &[1], String::new).expect("again"),
            vec![700]
        );
        apart.keep(key(1, 8), 800);
        let (back, rest) = (
            apart.take_back(&db, key(2, 0), String::new).expect("back"),
            apart.take_all(&db, &[2], String::new).expect("take all"),
        );
        assert_eq!((back, rest), (Some(20), vec![21]));
        let before = point_deletions();
        write(&mut apart);
        assert_eq!(stored(1), vec![(key(1, 8), 800)]);
        assert_eq!(stored(2), vec![]);
        // One range deletion for the first prefix; the second's two values one by one.
        assert_eq!(point_deletions() - before, 2);
    }

    proptest::proptest! {
        /// Lines of drawn places (meters and group members that begin one another, hold
        /// `0x00` or the highest code point, groups of several members): their keys sort as
        /// `line_order` sorts the lines, so the lines of a list kept apart (and the api's runs
        /// of a final statement's) are read in line order and a cursor's place is found by a
        /// seek.
        #[test]
        fn line_keys_sort_in_line_order(
            places in proptest::collection::vec(
                (
                    0_usize..6,
                    proptest::collection::btree_map(0_usize..6, 0_usize..6, 0..3),
                    0_usize..2,
                ),
                1..12,
            ),
        ) {
            let texts = ["", "a", "a\0", "ab", "é", "\u{10FFFF}"];
            let starts = ["2026-10-01T00:00:00.000Z", "2026-11-01T00:00:00.000Z"];
            let lines: Vec<StatementLine> = places
                .iter()
                .map(|(meter, group, start)| StatementLine {
                    meter: texts[*meter].to_owned(),
                    group: group
                        .iter()
                        .map(|(k, v)| (texts[*k].to_owned(), texts[*v].to_owned()))
                        .collect(),
                    period_start: starts[*start].to_owned(),
                    quantity: rust_decimal::Decimal::ONE,
                    amount: rust_decimal::Decimal::ONE,
                    credit_applied: rust_decimal::Decimal::ZERO,
                    amount_due: rust_decimal::Decimal::ONE,
                })
                .collect();
            let key = |line: &StatementLine| {
                let mut key = vec![7];
                push_line_place(&mut key, Place::of(line));
                key
            };
            for a in &lines {
                for b in &lines {
                    let by_order = line_order(
                        a,
                        &b.meter,
                        &b.group,
                        &b.period_start,
                    );
                    proptest::prop_assert_eq!(key(a).cmp(&key(b)), by_order, "{:?} {:?}", a, b);
                }
            }
        }
    }

    #[test]
    fn a_spent_grant_given_credit_back_leaves_both_of_its_keys() {
        // A grant used up is kept apart by id and in burn-down order; a correction giving it
        // credit back puts it back into its book, and neither key may stay behind (a grants
        // page would read a stale copy of it from the second).
        let d = |text: &str| text.parse::<rust_decimal::Decimal>().expect("decimal");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let mut state = PartitionState::open(dir.path(), 0, &cache, 0)
            .expect("open")
            .keeping(BOOK_SERIES, 0, BOOK_LINES);
        let ops = [
            Op::Grant(usd_grant("c1", "pack", "1", 1)),
            Op::Item(line_item("li_1", 0, d("1"))),
            Op::Item(line_item("li_fix", 0, d("-1"))),
        ];
        let keys = |state: &PartitionState, kind: u8| -> usize {
            let prefix = customer_key(kind, "acme", "c1");
            state
                .store
                .db()
                .prefix_iterator(&prefix)
                .map(|entry| entry.expect("entry"))
                .take_while(|(key, _)| key.starts_with(&prefix))
                .count()
        };
        let mut kept = Vec::new();
        for (offset, op) in (0_i64..).zip(&ops) {
            let (payload, record) = op.record();
            let input = Input {
                offset,
                key: None,
                payload: &payload,
            };
            state.apply(input, record).expect("apply");
            state.take_outputs();
            state.commit().expect("commit");
            kept.push((keys(&state, b'G'), keys(&state, b'H')));
        }
        // Held, used up (kept apart twice), given credit back (held again).
        assert_eq!(kept, [(0, 0), (1, 1), (0, 0)]);
        let grants = grants_after(&state.store.db().snapshot(), "acme", "c1", None, 10)
            .expect("read")
            .expect("the customer");
        let remaining: Vec<String> = grants.iter().map(|g| g.remaining.to_string()).collect();
        assert_eq!(remaining, ["1"]);
    }

    #[test]
    fn what_a_release_before_kept_apart_is_kept_in_order_once_at_open() {
        // Releases before wrote a line's meter, group (JSON) and period start length-prefixed,
        // so a list's keys sorted by length first and a read could not seek to a place; and
        // kept spent grants by id alone, so a grants page read every one.
        let d = |text: &str| text.parse::<rust_decimal::Decimal>().expect("decimal");
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        // Three tenants' customers with lines kept apart (every line: the state keeps none in
        // a book), in groups of different lengths; `acme`'s and `zeta`'s lists long enough
        // for a range deletion.
        let groups = |tenant: &str| -> Vec<usize> {
            if tenant != "a" {
                (0..RANGE_DELETION_FROM + 6).map(|n| n * 37).collect()
            } else {
                vec![5, 40, 300, 2, 1000]
            }
        };
        let tenants = ["a", "acme", "zeta"];
        let item = |tenant: &str, id: String, n: usize| LineItem {
            tenant: tenant.into(),
            group: [("project".to_owned(), format!("p{n}"))].into(),
            ..line_item(&id, 0, d("1.5"))
        };
        let apply_record = |state: &mut PartitionState, offset: &mut i64, op: Op| {
            let (payload, record) = op.record();
            let input = Input {
                offset: *offset,
                key: None,
                payload: &payload,
            };
            state.apply(input, record).expect("apply");
            *offset += 1;
        };
        let mut offset = 0;
        let (mut state, books) = {
            let mut state = PartitionState::open(dir.path(), 0, &cache, 0)
                .expect("open")
                .keeping(BOOK_SERIES, 0, 0);
            // `acme`'s first items use up three grants, kept apart once spent.
            for n in 0..3 {
                let grant = usd_grant("c1", &format!("pack-{n}"), "1", 1);
                apply_record(&mut state, &mut offset, Op::Grant(grant));
            }
            for tenant in tenants {
                for n in groups(tenant) {
                    let item = item(tenant, format!("li_{n}"), n);
                    apply_record(&mut state, &mut offset, Op::Item(item));
                }
            }
            state.take_outputs();
            state.commit().expect("commit");
            let books: Vec<Option<Book>> = tenants
                .iter()
                .map(|t| read_book(state.store.db(), t, "c1").expect("read"))
                .collect();
            (state, books)
        };
        // Every line kept apart and where it is.
        let lines_apart = |db: &rocksdb::DB| -> Vec<(Vec<u8>, Vec<u8>)> {
            let mut out = Vec::new();
            for entry in db.iterator(rocksdb::IteratorMode::Start) {
                let (key, value) = entry.expect("entry");
                let is_line = read_part(&key)
                    .is_some_and(|(t, rest)| !t.is_empty() && rest.first() == Some(&b'T'));
                if is_line {
                    out.push((key.to_vec(), value.to_vec()));
                }
            }
            out
        };
        let projects = |lines: &[(Vec<u8>, Vec<u8>)], tenant: &[u8]| -> Vec<String> {
            lines
                .iter()
                .filter(|(key, _)| read_part(key).is_some_and(|(t, _)| t == tenant))
                .map(|(_, value)| {
                    let line: StatementLine = postcard::from_bytes(value).expect("a line");
                    line.group["project"].clone()
                })
                .collect()
        };
        let ordered = lines_apart(state.store.db());
        // The spent grants in burn-down order, as kept apart by this release.
        let spent_in_order = |db: &rocksdb::DB| -> Vec<(Vec<u8>, Vec<u8>)> {
            let prefix = customer_key(b'H', "acme", "c1");
            db.prefix_iterator(&prefix)
                .map(|entry| entry.expect("entry"))
                .take_while(|(key, _)| key.starts_with(&prefix))
                .map(|(key, value)| (key.to_vec(), value.to_vec()))
                .collect()
        };
        let spent = spent_in_order(state.store.db());
        assert_eq!(spent.len(), 3);
        assert_eq!(ordered.len(), 2 * (RANGE_DELETION_FROM + 6) + 5);
        // As a release before left them: the same lines under its keys, and no mark; but for
        // tenant `a`'s, the first in key order, as if a rewrite had stopped after writing them.
        // Beside them, a line no release could read, and the api's keys of other kinds.
        let mut batch = WriteBatch::default();
        for (key, value) in &ordered {
            let (tenant, rest) = read_part(key).expect("tenant");
            if tenant == b"a" {
                continue;
            }
            let (customer, rest) = read_part(rest.get(1..).expect("kind")).expect("customer");
            let list = line_list_of(rest).expect("list");
            let (tenant, customer) = (
                std::str::from_utf8(tenant).expect("utf-8"),
                std::str::from_utf8(customer).expect("utf-8"),
            );
            let line: StatementLine = postcard::from_bytes(value).expect("a line");
            let mut before = line_list_key(tenant, customer, &list);
            push(&mut before, line.meter.as_bytes());
            let group = serde_json::to_string(&line.group).expect("json");
            push(&mut before, group.as_bytes());
            push(&mut before, line.period_start.as_bytes());
            assert_ne!(&before, key);
            batch.delete(key);
            batch.put(before, value);
        }
        let list = LineList::Lines(crate::book::statements::key(
            "USD",
            &line_item("x", 0, d("1")).period_start,
        ));
        let mut unreadable = line_list_key("zeta", "c1", &list);
        push(&mut unreadable, b"zz");
        batch.put(&unreadable, b"not a line");
        // A spent grant no release could read, of `zeta`'s customer.
        let mut broken_grant = customer_key(b'G', "zeta", "c1");
        push(&mut broken_grant, b"gr_broken");
        batch.put(&broken_grant, b"not a grant");
        let others = [
            customer_key(b'F', "acme", "c1"),
            customer_key(b'P', "zeta", "c1"),
        ];
        for key in &others {
            batch.put(key, b"the api's");
        }
        for (key, _) in &spent {
            batch.delete(key);
        }
        batch.delete(KEPT_APART_IN_ORDER_KEY);
        state.store.write(batch).expect("downgrade");
        assert_eq!(spent_in_order(state.store.db()), []);
        let groups_by_length = |tenant: &str| {
            let mut want: Vec<String> = groups(tenant).iter().map(|n| format!("p{n}")).collect();
            want.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
            want
        };
        let stored = lines_apart(state.store.db());
        assert_eq!(projects(&stored, b"acme"), groups_by_length("acme"));
        drop(state);

        let mut state = PartitionState::open(dir.path(), 0, &cache, 0).expect("reopen");
        let db = state.store.db();
        // The same lines under this release's keys, which sort in line order, the line that
        // cannot be read left where it was, the other kinds untouched, and the mark.
        let mut want = ordered.clone();
        want.push((unreadable.clone(), b"not a line".to_vec()));
        want.sort();
        assert_eq!(lines_apart(db), want);
        let mut in_order = groups_by_length("acme");
        in_order.sort();
        assert_eq!(projects(&want, b"acme"), in_order);
        for key in &others {
            assert_eq!(
                db.get(key).expect("get").as_deref(),
                Some(&b"the api's"[..])
            );
        }
        assert!(db.get(KEPT_APART_IN_ORDER_KEY).expect("get").is_some());
        assert_eq!(spent_in_order(db), spent);
        let grants = |after| {
            grants_after(&db.snapshot(), "acme", "c1", after, usize::MAX)
                .expect("read")
                .expect("the customer")
        };
        let mut every: Vec<GrantState> = books[1]
            .as_ref()
            .expect("acme's book")
            .grants
            .values()
            .map(|g| (**g).clone())
            .collect();
        every.sort_by_key(|g| burn_order(&g.grant));
        assert_eq!(grants(None), every);
        assert_eq!(
            grants(every.first().map(|g| burn_place(&g.grant))),
            every[1..]
        );
        // The grant that cannot be read is listed last, so its customer's list reports it.
        let last = spent_grant_place_key("zeta", "c1", (u16::MAX, i64::MAX, i64::MAX, "gr_broken"));
        assert_eq!(
            db.get(&last).expect("get").as_deref(),
            Some(&b"not a grant"[..])
        );
        assert!(matches!(
            grants_after(&db.snapshot(), "zeta", "c1", None, usize::MAX),
            Err(Error::Corrupt { .. })
        ));
        for (tenant, book) in tenants.iter().zip(&books).take(2) {
            assert_eq!(&read_book(db, tenant, "c1").expect("read"), book);
        }
        // Once: a store so marked is not read again.
        assert_eq!(order_kept_apart(db).expect("again"), 0);
        // An item of a line kept apart finds it, and adds to it: under a release before's
        // key it would not, and the statement would list the group twice.
        let again = item("acme", "li_again".into(), 37);
        apply_record(&mut state, &mut offset, Op::Item(again));
        state.take_outputs();
        state.commit().expect("commit");
        let book = read_book(state.store.db(), "acme", "c1")
            .expect("read")
            .expect("the book");
        let statement = &book.statements.values().next().expect("open").statement;
        let p37: Vec<String> = statement
            .lines
            .iter()
            .filter(|l| l.group["project"] == "p37")
            .map(|l| l.amount.to_string())
            .collect();
        assert_eq!(p37, ["3.0"]);
        assert_eq!(statement.lines.len(), RANGE_DELETION_FROM + 6);
    }

    #[test]
    fn statement_lines_live_apart_from_the_book_and_come_back_for_the_statement() {
        // Was: every line of an open statement stayed in its book, and each item looked
        // through them all, so a customer sending a new group value with every event made
        // each of its items dearer than the last (quadratic) and its book ever larger.
        const DAY: i64 = 86_400_000;
        let d = |text: &str| text.parse::<rust_decimal::Decimal>().expect("decimal");
        let groups = 3 * BOOK_LINES + 5;
        // In descending group order: the statement lists them ascending.
        let item = |n: usize, amount: &str| LineItem {
            group: [("project".to_owned(), format!("p-{n:04}"))].into(),
            ..line_item(&format!("li_{n}_{amount}"), 0, d(amount))
        };
        let mut ops = vec![Op::Grant(usd_grant("c1", "pack", "100", 1))];
        ops.extend((0..groups).rev().map(|n| Op::Item(item(n, "1"))));
        // A second item of an early group, long out of the book, and the period's end.
        let period_end = 1_700_000_000_000 + 30 * DAY;
        ops.extend([Op::Item(item(3, "0.5")), Op::Tick(period_end)]);
        let records: Vec<(Vec<u8>, Record)> = ops.iter().map(Op::record).collect();
        let (entries, state, _dir) = fold_through_store(&records, 50, groups / 2);

        let (mut book, expected) = fold_in_one_book(&ops);
        assert_eq!(entries, expected);
        let draft = entries
            .iter()
            .find(|e| e.kind == credit::EntryKind::StatementDraft)
            .and_then(|e| e.statement.as_deref())
            .expect("a draft statement");
        let lines: Vec<(String, String)> = draft
            .lines
            .iter()
            .map(|l| (l.group["project"].clone(), l.amount.to_string()))
            .collect();
        let mut want: Vec<(String, String)> = (0..groups)
            .map(|n| (format!("p-{n:04}"), "1".to_owned()))
            .collect();
        want[3].1 = "1.5".to_owned();
        assert_eq!(lines, want);
        assert_eq!(
            draft.usage,
            d("1") * rust_decimal::Decimal::from(groups) + d("0.5")
        );
        // The stored book holds none of the draft's lines; a read gets them all back.
        let stored = stored_book(&state, "c1");
        let statement = stored.statements.values().next().expect("the draft");
        assert!(statement.statement.lines.is_empty());
        let read = read_book(state.store.db(), "acme", "c1")
            .expect("read")
            .expect("book");
        assert_eq!(read.statements, book.statements);

        // Final: the statement carries every line again, and none is left kept apart.
        let at = period_end + credit::DEFAULT_FINALIZE_AFTER_MS;
        let mut state = state;
        let (payload, record) = Op::Tick(at).record();
        let input = Input {
            offset: i64::try_from(records.len()).expect("small"),
            key: None,
            payload: &payload,
        };
        state.apply(input, record).expect("apply");
        let held = state.held.bytes();
        let outputs = state.take_outputs();
        // Counted until the write: the book decoded, the tick, and every line twice, put back
        // into the book and carried by the final statement's entry.
        let book_len = state
            .stored
            .get(&customer_key(b'B', "acme", "c1"))
            .map(|b| b.len())
            .expect("the book kept as written");
        let carried: usize = outputs
            .iter()
            .filter_map(|o| match o {
                Output::Entry(e) => e.statement.as_deref(),
                _ => None,
            })
            .flat_map(|s| s.lines.iter().chain(&s.prior_period))
            .map(line_estimate)
            .sum();
        assert_eq!(
            held,
            held_estimate(book_len) + growth_estimate(payload.len()) + 2 * carried
        );
        state.commit().expect("commit");
        let finals: Vec<credit::BalanceEntry> = outputs
            .into_iter()
            .filter_map(|o| match o {
                Output::Entry(e) => Some(*e),
                _ => None,
            })
            .collect();
        let want_final = book.apply_tick("acme", "c1", at, 0, credit::DEFAULT_FINALIZE_AFTER_MS);
        assert_eq!(finals, want_final);
        assert_eq!(
            finals
                .first()
                .and_then(|e| e.statement.as_deref())
                .map(|s| s.lines.len()),
            Some(groups)
        );
        // None is left kept apart, and a read of the customer's lines steps over no deleted
        // one (was: each was deleted alone, and its tombstone stepped over by every read
        // until a compaction dropped it).
        use rocksdb::perf::{PerfContext, PerfMetric, PerfStatsLevel, set_perf_stats};
        set_perf_stats(PerfStatsLevel::EnableCount);
        let mut perf = PerfContext::default();
        perf.reset();
        let prefix = customer_key(b'T', "acme", "c1");
        let left = state
            .store
            .db()
            .prefix_iterator(&prefix)
            .filter_map(std::result::Result::ok)
            .take_while(|(key, _)| key.starts_with(&prefix))
            .count();
        let read = read_book(state.store.db(), "acme", "c1").expect("read");
        let stepped_over = perf.metric(PerfMetric::InternalDeleteSkippedCount);
        set_perf_stats(PerfStatsLevel::Disable);
        assert_eq!(left, 0);
        assert!(read.is_some_and(|book| book.statements.is_empty()));
        assert_eq!(stepped_over, 0);
    }

    #[test]
    fn a_tick_expires_a_grant_applied_earlier_in_the_same_batch() {
        // Was: the expiry index changed only at commit, so whether this tick expired the
        // grant depended on where a batch ended (a run and its replay disagreed).
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let mut state = PartitionState::open(dir.path(), 0, &cache, 0).expect("open");
        let grant = Grant {
            v: 1,
            id: credit::grant_id("acme", "c1", "k"),
            tenant: "acme".into(),
            customer: "c1".into(),
            key: "k".into(),
            terms: credit::GrantTerms {
                amount: rust_decimal::Decimal::from(7),
                currency: "USD".into(),
                priority: 10,
                effective_at: None,
                expires_at: Some(neruba_schemas::event::format_time_ms(1_000)),
                paid: None,
                metadata: BTreeMap::new(),
            },
            received_at: neruba_schemas::event::format_time_ms(0),
        };
        let grant_bytes = credit::encode(&grant);
        let tick_bytes = credit::encode(&Tick {
            v: 1,
            at_ms: 1_000,
            finalize_after_ms: None,
        });
        let input = |offset, payload| Input {
            offset,
            key: None,
            payload,
        };
        state
            .apply(input(0, &grant_bytes), Record::Grant)
            .expect("grant");
        state
            .apply(input(1, &tick_bytes), Record::Tick)
            .expect("tick");
        let kinds: Vec<(credit::EntryKind, String)> = state
            .take_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::Entry(e) => Some((e.kind, e.amount.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                (credit::EntryKind::Grant, "7".to_owned()),
                (credit::EntryKind::Expire, "-7".to_owned())
            ]
        );
    }

    #[test]
    fn a_tick_carries_the_grace_and_an_impossible_item_is_dead_lettered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let mut state = PartitionState::open(dir.path(), 0, &cache, 60_000).expect("open");
        state
            .expiry_of
            .insert(customer_key(b'B', "acme", "c1"), 1_000);
        state.expiries.insert((1_000, "acme".into(), "c1".into()));
        // Within the grace: no tick; past it: a tick stamped now − grace, which is all a
        // replay reads (whatever grace it runs with).
        assert!(!state.tick_due(30_000, 5_000));
        assert!(state.tick_due(61_000, 5_000));
        assert_eq!(
            state.take_outputs(),
            vec![Output::Tick {
                partition: 0,
                at_ms: 1_000,
                finalize_after_ms: credit::DEFAULT_FINALIZE_AFTER_MS,
            }]
        );
        let mut item = serde_json::json!({
            "v": 1, "id": "li_x", "kind": "usage", "tenant": "acme", "customer": "c1",
            "meter": "m", "group": {}, "period_start": "2026-11-01T00:00:00Z",
            "period_end": "2026-12-01T00:00:00Z", "window_start": "2026-11-02T00:00:00Z",
            "window_end": "2026-11-02T00:01:00Z", "window_quantity": "1", "window_events": 1,
            "period_quantity": "1", "amount": "1000000000000000000", "period_amount": "1",
            "currency": "USD", "price_plan": "p", "price_version": 1, "revision": 1,
            "supersedes": null
        });
        let bytes = serde_json::to_vec(&item).expect("json");
        let input = Input {
            offset: 0,
            key: None,
            payload: &bytes,
        };
        state.apply(input, Record::LineItem).expect("apply");
        let codes: Vec<&str> = state
            .take_outputs()
            .iter()
            .filter_map(|o| match o {
                Output::DeadLetter(letter) => Some(letter.code),
                _ => None,
            })
            .collect();
        assert_eq!(codes, vec!["invalid_line_item"]);
        item["amount"] = serde_json::json!("12.50");
        let bytes = serde_json::to_vec(&item).expect("json");
        let input = Input {
            offset: 1,
            key: None,
            payload: &bytes,
        };
        state.apply(input, Record::LineItem).expect("apply");
        let kinds: Vec<(credit::EntryKind, String)> = state
            .take_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::Entry(e) => Some((e.kind, e.amount.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(
            kinds,
            vec![(credit::EntryKind::Uncovered, "12.50".to_owned())]
        );
    }

    #[test]
    fn a_grant_outlasts_the_longest_window_so_a_window_begun_before_its_expiry_draws_on_it() {
        // Was: a tick was stamped `now − grace` alone, so with hourly windows a grant expired
        // 5 minutes past `expires_at`, before the line item of the hour it expired in arrived
        // (when that hour ended): that usage went uncovered, though its window began before
        // `expires_at` and the grant was eligible for it.
        const MINUTE: i64 = 60_000;
        const HOUR: i64 = 60 * MINUTE;
        const DAY: i64 = 24 * HOUR;
        const GRACE: i64 = 5 * MINUTE;
        let at = neruba_schemas::event::format_time_ms;
        let t0: i64 = 1_800_000_000_000 / DAY * DAY;
        let expires = t0 + 90 * MINUTE;
        let hourly = |id: &str, start: i64, amount: &str| {
            let mut item = line_item(id, 0, amount.parse().expect("decimal"));
            item.period_start = at(t0);
            item.period_end = at(t0 + 30 * DAY);
            item.window_start = at(start);
            item.window_end = at(start + HOUR);
            item
        };
        let mut grant = usd_grant("c1", "pack", "10", 10);
        grant.terms.expires_at = Some(at(expires));
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let mut state = PartitionState::open(dir.path(), 0, &cache, GRACE).expect("open");
        let mut entries = Vec::new();
        let mut apply = |state: &mut PartitionState, offset: i64, bytes: &[u8], record| {
            let input = Input {
                offset,
                key: None,
                payload: bytes,
            };
            state.apply(input, record).expect("apply");
            for output in state.take_outputs() {
                if let Output::Entry(e) = output {
                    entries.push((e.kind, e.amount.to_string()));
                }
            }
            state.commit().expect("commit");
        };
        apply(&mut state, 0, &credit::encode(&grant), Record::Grant);
        apply(
            &mut state,
            1,
            &hourly("h1", t0, "2").encode(),
            Record::LineItem,
        );

        // Past `expires_at` + grace, the hour the grant expires in has not ended: no tick yet.
        assert!(!state.tick_due(expires + GRACE + MINUTE, 5_000));
        // Its item arrives and draws on the grant.
        apply(
            &mut state,
            2,
            &hourly("h2", t0 + HOUR, "3").encode(),
            Record::LineItem,
        );
        // Reopened from its store, the partition still waits the hour.
        drop(state);
        let mut state = PartitionState::open(dir.path(), 0, &cache, GRACE).expect("reopen");
        assert!(!state.tick_due(expires + GRACE + HOUR - 1, 5_000));
        // An hour past that: a tick stamped `expires_at`, and the rest expires.
        assert!(state.tick_due(expires + GRACE + HOUR, 5_000));
        let ticks: Vec<Output> = state.take_outputs();
        assert_eq!(
            ticks,
            vec![Output::Tick {
                partition: 0,
                at_ms: expires,
                finalize_after_ms: credit::DEFAULT_FINALIZE_AFTER_MS,
            }]
        );
        let tick = credit::encode(&Tick {
            v: 1,
            at_ms: expires,
            finalize_after_ms: None,
        });
        apply(&mut state, 3, &tick, Record::Tick);
        let amounts: Vec<(credit::EntryKind, &str)> =
            entries.iter().map(|(k, a)| (*k, a.as_str())).collect();
        assert_eq!(
            amounts,
            vec![
                (credit::EntryKind::Grant, "10"),
                (credit::EntryKind::Consume, "-2"),
                (credit::EntryKind::Consume, "-3"),
                (credit::EntryKind::Expire, "-5"),
            ]
        );
    }

    #[test]
    fn a_window_floor_covers_a_long_window_before_the_partition_priced_one() {
        const HOUR: i64 = 3_600_000;
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new_lru_cache(1 << 20);
        let mut state = PartitionState::open(dir.path(), 0, &cache, 60_000)
            .expect("open")
            .with_window_floor(HOUR);
        state
            .expiry_of
            .insert(customer_key(b'B', "acme", "c1"), 1_000);
        state.expiries.insert((1_000, "acme".into(), "c1".into()));
        assert!(!state.tick_due(1_000 + 60_000 + HOUR - 1, 5_000));
        assert!(state.tick_due(1_000 + 60_000 + HOUR, 5_000));
        assert_eq!(
            state.take_outputs(),
            vec![Output::Tick {
                partition: 0,
                at_ms: 1_000,
                finalize_after_ms: credit::DEFAULT_FINALIZE_AFTER_MS,
            }]
        );
        // No floor past a day: a meter's windows divide one.
        let state = state.with_window_floor(i64::MAX);
        assert_eq!(state.longest_window_ms, MAX_WINDOW_MS);
    }
}
