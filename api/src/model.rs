//! The read model: one RocksDB database per ledger partition, written by the ledger stage
//! (`ledger.rs`) and read by the HTTP handlers (`http.rs`).
//!
//! Invariants:
//! - a partition's database holds the balances fold of that partition (the same
//!   [`neruba_balances::state`] the balances stage keeps: books, applied items, clock) plus
//!   the read model's own keys, written in the same atomic write as the offset, so a read sees
//!   every record before the partition's `next_offset` and nothing after it;
//! - a customer lives in one ledger partition ([`stable_partition`] of `tenant/customer`), so
//!   every read about one customer is answered from one database at one position (`as_of`);
//! - keys are the tenant's first: a read builds its keys from the tenant its API key proves,
//!   so no parameter or cursor can reach another tenant's records.
//!
//! Read-model keys (beside [`neruba_balances::state`]'s; components length-prefixed, but for
//! a line's place, whose parts are escaped so that keys sort as places do):
//!
//! | key | value |
//! |---|---|
//! | tenant, `E`, customer, sequence (8 bytes BE) | a balance entry (JSON) |
//! | tenant, `L`, customer, period start, window start, line-item id | the line item (JSON) |
//! | tenant, `S`, customer, period start, currency | a final statement: without its lines (a tag byte, then postcard), or whole, as releases before stored it (postcard behind another tag byte, or JSON) |
//! | tenant, `F`, customer, period start, currency, `l` or `p`, a line's place | a run of lines of a final statement (postcard), of its `lines` or its `prior_period`, from that line on in [`line_order`]; the place ([`push_line_place`]) sorts in that order |
//! | tenant, `R`, customer, grant id | the `grant_refused` entry (JSON) of a grant refused for |
//! | | the customer's bound of grants holding credit, until that grant is applied |
//! | tenant, `P`, customer, line-item id | the id of a later item that supersedes it |
//! | the empty tenant, `M`, `superseded_indexed` | the ledger offset up to which the `P` keys |
//! | | cover every stored item (8 bytes BE; empty: no record yet) |

use neruba_balances::book::Book;
use neruba_balances::book::statements::{LineList, line_order};
pub(crate) use neruba_balances::state::Place;
use neruba_balances::state::push_line_place;
use neruba_schemas::credit::{BalanceEntry, Statement, StatementLine};
use neruba_schemas::ledger::LineItem;
use neruba_schemas::topics::stable_partition;
use neruba_stage::keys::push_part as push;
use rocksdb::{DB, Direction, IteratorMode};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

/// One ledger partition of the read model.
#[derive(Debug)]
pub struct PartitionView {
    db: Arc<DB>,
    /// The next ledger offset to apply: everything before it is in the database.
    next_offset: AtomicI64,
}

/// A read model position: the ledger partition and the next offset it will apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// Why a read could not be answered from the model.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The partition is not open yet (the model is starting).
    #[error("ledger partition {0} is not loaded yet")]
    NotLoaded(i32),
    #[error("read model storage: {0}")]
    Storage(String),
    /// A usage cursor whose row is not in the answer it claims to resume.
    #[error("{0}")]
    InvalidCursor(String),
    /// A row's quantities sum past what an exact decimal holds (its range, or its 28 to 29
    /// significant digits): refused, never rounded.
    #[error("{0}")]
    QuantityOutOfRange(String),
    /// A row that cannot be combined exactly from what is stored (a `latest` meter's
    /// windows of one start in two groups, stored without their latest events).
    #[error("{0}")]
    NotCombinable(String),
}

impl From<rocksdb::Error> for ReadError {
    fn from(e: rocksdb::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

impl From<neruba_stage::Error> for ReadError {
    fn from(e: neruba_stage::Error) -> Self {
        Self::Storage(e.to_string())
    }
}

/// The read model the ledger stage fills and the HTTP handlers read.
#[derive(Debug)]
pub struct Model {
    topic: String,
    partitions: i32,
    views: RwLock<BTreeMap<i32, Arc<PartitionView>>>,
    /// Each partition's (oldest, next) offset on the broker when the api started (`None`: a
    /// model never caught up, as in tests of its reads alone).
    ends: Option<Vec<(i64, i64)>>,
    caught_up_once: AtomicBool,
}

/// The key of a customer's record of `kind` followed by more parts.
fn key(kind: u8, tenant: &str, customer: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = neruba_balances::state::customer_key(kind, tenant, customer);
    for part in parts {
        push(&mut key, part);
    }
    key
}

/// The key of a balance entry.
pub(crate) fn entry_key(entry: &BalanceEntry) -> Vec<u8> {
    let mut key = neruba_balances::state::customer_key(b'E', &entry.tenant, &entry.customer);
    key.extend_from_slice(&entry.seq.to_be_bytes());
    key
}

/// Where a grant stands ([`Model::grant_standing`]).
#[derive(Debug, Clone, PartialEq)]
pub enum GrantStanding {
    /// Its customer's book holds it (whatever became of it).
    Held(Box<neruba_balances::book::GrantState>),
    /// The balances stage refused it for the customer's bound of grants holding credit
    /// (`too_many_grants`: its `grant_refused` entry), and has not applied it since.
    Refused(Box<BalanceEntry>),
    /// Neither.
    Unknown,
}

/// The key of a grant refused for the customer's bound of grants holding credit.
pub(crate) fn refusal_key(tenant: &str, customer: &str, grant: &str) -> Vec<u8> {
    let mut key = neruba_balances::state::customer_key(b'R', tenant, customer);
    push(&mut key, grant.as_bytes());
    key
}

/// An RFC 3339 time in the one 24-byte form keys use (as given when it does not parse).
pub(crate) fn key_time(text: &str) -> String {
    neruba_schemas::event::parse_time_ms(text)
        .map(neruba_schemas::event::format_time_ms)
        .unwrap_or_else(|_| text.to_owned())
}

/// The key of a line item (times in one form, so keys sort by time and a period's items can
/// be sought).
pub(crate) fn item_key(item: &LineItem) -> Vec<u8> {
    key(
        b'L',
        &item.tenant,
        &item.customer,
        &[
            key_time(&item.period_start).as_bytes(),
            key_time(&item.window_start).as_bytes(),
            item.id.as_bytes(),
        ],
    )
}

/// The key saying which item supersedes the line item `id` (written with the later item).
pub(crate) fn superseded_key(tenant: &str, customer: &str, id: &str) -> Vec<u8> {
    key(b'P', tenant, customer, &[id.as_bytes()])
}

/// The ledger offset up to which the `P` keys cover every line item the database holds
/// ([`indexed_through`]): written with each batch that moves it, so a build that did not
/// write them (a model kept from before them, or an api rolled back and forward again) leaves
/// it behind the store's offset, and the keys are built again when the partition opens
/// ([`index_superseded`]). (The empty tenant and kind `M` are the stage runtime's own keys,
/// which no tenant reaches.)
pub(crate) const SUPERSEDED_INDEXED_KEY: &[u8] = b"\0\0\0\0Msuperseded_indexed";

/// The value of [`SUPERSEDED_INDEXED_KEY`] for a store at `next_offset` (empty: no record).
pub(crate) fn indexed_through(next_offset: Option<i64>) -> Vec<u8> {
    next_offset
        .map(|n| n.to_be_bytes().to_vec())
        .unwrap_or_default()
}

/// Writes the `P` key of every stored line item another supersedes, unless they cover the
/// store's records already (up to `next_offset`, the store's); returns how many it wrote. The
/// keys are a function of the stored items alone, so a run cut short is simply run again at
/// the next open. Reads the whole database once; the count is of the items another
/// supersedes, each marked again whether or not its mark was there. (A stored item that does
/// not decode cannot be read either way, so it is passed over.)
pub(crate) fn index_superseded(db: &DB, next_offset: Option<i64>) -> Result<u64, rocksdb::Error> {
    let through = indexed_through(next_offset);
    if db
        .get_pinned(SUPERSEDED_INDEXED_KEY)?
        .is_some_and(|stored| *stored == *through)
    {
        return Ok(0);
    }
    let mut batch = rocksdb::WriteBatch::default();
    let mut written = 0;
    for entry in db.iterator(IteratorMode::Start) {
        let (key, value) = entry?;
        let is_item = neruba_stage::keys::read_part(&key)
            .is_some_and(|(tenant, rest)| !tenant.is_empty() && rest.first() == Some(&b'L'));
        if !is_item {
            continue;
        }
        let Ok(item) = serde_json::from_slice::<LineItem>(&value) else {
            continue;
        };
        if let Some(earlier) = &item.supersedes {
            batch.put(
                superseded_key(&item.tenant, &item.customer, earlier),
                item.id.as_bytes(),
            );
            written += 1;
        }
        if batch.len() >= 10_000 {
            db.write(std::mem::take(&mut batch))?;
        }
    }
    batch.put(SUPERSEDED_INDEXED_KEY, through);
    db.write(batch)?;
    Ok(written)
}

/// One line item as a read lists and answers it: with whether a later item of the period
/// (on this page or another) names it in `supersedes`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemRead {
    #[serde(flatten)]
    pub item: LineItem,
    pub superseded: bool,
}

/// A line item's place in a period's list, its key's order (period start, window start, id):
/// a page's cursor names its last item's.
pub fn item_place(item: &LineItem) -> String {
    format!(
        "{}\n{}\n{}",
        key_time(&item.period_start),
        key_time(&item.window_start),
        item.id
    )
}

/// Most line items one page of the line-items read looks at: a `meter` few of the period's
/// items have made a page decode every item of the period after its cursor (a customer with
/// many groups bills hundreds of thousands a month), on a thread that serves other reads too.
pub const ITEMS_EXAMINED: usize = 10_000;

#[cfg(test)]
thread_local! {
    /// [`ITEMS_EXAMINED`] for the tests of this thread, if set.
    pub(crate) static ITEMS_EXAMINED_IN_TESTS: std::cell::Cell<Option<usize>> =
        const { std::cell::Cell::new(None) };
}

fn items_examined() -> usize {
    #[cfg(test)]
    if let Some(most) = ITEMS_EXAMINED_IN_TESTS.with(std::cell::Cell::get) {
        return most;
    }
    ITEMS_EXAMINED
}

/// A page of line items, and where the next one starts ([`item_place`]) when the read may go
/// on: after a full page, or after the last item the page looked at when it looked at as
/// many as it may ([`ITEMS_EXAMINED`]; then it may hold fewer than its limit, even none).
#[derive(Debug)]
pub struct ItemsPage {
    pub items: Vec<ItemRead>,
    pub next: Option<String>,
}

/// The key of a final statement.
pub(crate) fn statement_key(tenant: &str, customer: &str, statement: &Statement) -> Vec<u8> {
    of_statement(b'S', tenant, customer, statement)
}

/// A key of `kind` of a customer's `statement`: its period start and currency.
fn of_statement(kind: u8, tenant: &str, customer: &str, statement: &Statement) -> Vec<u8> {
    key(
        kind,
        tenant,
        customer,
        &[
            statement.period_start.as_bytes(),
            statement.currency.as_bytes(),
        ],
    )
}

/// The first byte of a final statement stored whole in [`postcard`] (compact binary serde).
/// Releases from the morning of December 2, 2026 stored final statements so, and releases
/// before them in JSON, whose first byte is `{`. Both still read ([`decode_statement`]).
/// postcard's layout is the fields' order: a field added to `Statement` or `StatementLine`
/// (even one with a default), or a status variant moved, needs a new tag byte and a decoder
/// for this layout (`the_stored_forms_of_a_final_statement_are_fixed` pins its bytes).
const STATEMENT_POSTCARD: u8 = 0xB1;

/// The first byte of a final statement stored without its lines: postcard follows, of the
/// statement with both lists empty; its lines are kept in runs ([`final_lines_key`]), so a
/// page of a statement of 10,000 lines reads the runs that hold its lines, not all of them.
const STATEMENT_APART: u8 = 0xB2;

/// Lines a run of a final statement's lines kept apart holds (the last of a list fewer): a
/// whole statement is read a run at a time, about as fast as one value; a page reads its own
/// lines and at most two runs more (the start of the run that holds its cursor's place, and
/// the run after its last line, to tell whether more follow).
const FINAL_LINES_RUN: usize = 128;

/// The key prefix of a final statement's `lines` (`prior`: its `prior_period`) kept apart, in
/// runs of [`FINAL_LINES_RUN`] in line order, each under this prefix and its first line's
/// place ([`push_line_place`]).
pub(crate) fn final_lines_key(
    tenant: &str,
    customer: &str,
    statement: &Statement,
    prior: bool,
) -> Vec<u8> {
    let mut key = of_statement(b'F', tenant, customer, statement);
    push(&mut key, if prior { b"p" } else { b"l" });
    key
}

/// A key and its value, to write.
pub(crate) type KeyValue = (Vec<u8>, Vec<u8>);

/// A final statement as the ledger stage stores it: its key and value without its lines, then
/// each run of its lines' key and value.
pub(crate) fn stored_statement(
    tenant: &str,
    customer: &str,
    statement: &Statement,
) -> Result<Vec<KeyValue>, postcard::Error> {
    stored_in_runs(tenant, customer, statement, FINAL_LINES_RUN)
}

/// [`stored_statement`] with runs of up to `run` lines (tests store runs of a few).
pub(crate) fn stored_in_runs(
    tenant: &str,
    customer: &str,
    statement: &Statement,
    run: usize,
) -> Result<Vec<KeyValue>, postcard::Error> {
    let mut stored = Vec::new();
    let header = Statement {
        lines: Vec::new(),
        prior_period: Vec::new(),
        ..statement.clone()
    };
    stored.push((
        statement_key(tenant, customer, statement),
        postcard::to_io(&header, vec![STATEMENT_APART])?,
    ));
    for (prior, lines) in [(false, &statement.lines), (true, &statement.prior_period)] {
        let prefix = final_lines_key(tenant, customer, statement, prior);
        // In line order, as the book keeps them (sorted here so the keys never disagree).
        let mut lines: Vec<&StatementLine> = lines.iter().collect();
        lines.sort_by(|a, b| line_order(a, &b.meter, &b.group, &b.period_start));
        for run in lines.chunks(run.max(1)) {
            let Some(first) = run.first() else { continue };
            let mut key = prefix.clone();
            push_line_place(&mut key, Place::of(first));
            stored.push((key, postcard::to_stdvec(run)?));
        }
    }
    Ok(stored)
}

/// A final statement from its stored form, and whether its lines are kept apart
/// ([`stored_statement`]; whole, as stored before, with [`STATEMENT_POSTCARD`] or in JSON).
fn decode_statement(bytes: &[u8]) -> Result<(Statement, bool), ReadError> {
    let postcard = |body| {
        postcard::from_bytes(body).map_err(|e| ReadError::Storage(format!("statement: {e}")))
    };
    match bytes.split_first() {
        Some((&STATEMENT_APART, body)) => Ok((postcard(body)?, true)),
        Some((&STATEMENT_POSTCARD, body)) => Ok((postcard(body)?, false)),
        Some((b'{', _)) => Ok((decode("statement", bytes)?, false)),
        other => Err(ReadError::Storage(format!(
            "statement: an unknown stored form (first byte {:?})",
            other.map(|(first, _)| first)
        ))),
    }
}

/// The lines of one list of a statement kept apart from what holds the statement, read as of
/// the snapshot of the read that found it: a final statement's in runs ([`final_lines_key`]),
/// an open or draft one's a line a key beside those its book holds
/// ([`neruba_balances::state::line_list_key`]). Either way a page seeks to its cursor's place
/// and reads its own lines, not the list's.
pub(crate) struct StoredLines<'a> {
    snapshot: &'a rocksdb::Snapshot<'a>,
    prefix: Vec<u8>,
    form: Form,
}

enum Form {
    /// Runs of [`FINAL_LINES_RUN`], each under its first line's place.
    Runs,
    /// A line under its place, and the list's lines the book holds (in line order; a line the
    /// balances fold put back into the book is no longer under its key).
    Apart { held: Vec<StatementLine> },
}

impl<'a> StoredLines<'a> {
    /// A final statement's lines under `prefix` ([`final_lines_key`]) as of `snapshot`.
    pub(crate) fn runs(snapshot: &'a rocksdb::Snapshot<'a>, prefix: Vec<u8>) -> Self {
        Self {
            snapshot,
            prefix,
            form: Form::Runs,
        }
    }

    /// A list of a statement in a book: `held`, the lines the book holds, and those kept apart
    /// under `prefix` ([`neruba_balances::state::line_list_key`]) as of `snapshot`.
    pub(crate) fn apart(
        snapshot: &'a rocksdb::Snapshot<'a>,
        prefix: Vec<u8>,
        held: Vec<StatementLine>,
    ) -> Self {
        Self {
            snapshot,
            prefix,
            form: Form::Apart { held },
        }
    }

    /// Up to `count` lines in [`line_order`], those after `after` (all, without it).
    pub(crate) fn read(
        &self,
        after: Option<Place<'_>>,
        count: usize,
    ) -> Result<Vec<StatementLine>, ReadError> {
        let iter = self
            .snapshot
            .raw_iterator_opt(neruba_stage::keys::reading_under(&self.prefix));
        match &self.form {
            Form::Runs => self.read_runs(iter, after, count),
            Form::Apart { held } => self.read_apart(iter, held, after, count),
        }
    }

    fn read_runs(
        &self,
        mut iter: rocksdb::DBRawIterator<'_>,
        after: Option<Place<'_>>,
        count: usize,
    ) -> Result<Vec<StatementLine>, ReadError> {
        // From the run that holds the place: the last to begin at or before it.
        if let Some(after) = after {
            let mut at = self.prefix.clone();
            push_line_place(&mut at, after);
            iter.seek_for_prev(&at);
        }
        if !iter.key().is_some_and(|key| key.starts_with(&self.prefix)) {
            iter.seek(&self.prefix);
        }
        // Room for a page's lines at once (a page holds at most 10,000), not grown run by run.
        let mut lines = Vec::with_capacity(count.min(1 << 14));
        // Only the first run read can hold lines at or before the place.
        let mut place = after;
        while lines.len() < count
            && let Some(value) = iter.value()
        {
            let run: Vec<StatementLine> = postcard::from_bytes(value)
                .map_err(|e| ReadError::Storage(format!("a final statement's lines: {e}")))?;
            let left = count - lines.len();
            let later = |line: &StatementLine| place.is_none_or(|place| place.precedes(line));
            lines.extend(run.into_iter().filter(later).take(left));
            place = None;
            iter.next();
        }
        iter.status()?;
        Ok(lines)
    }

    fn read_apart(
        &self,
        mut iter: rocksdb::DBRawIterator<'_>,
        held: &[StatementLine],
        after: Option<Place<'_>>,
        count: usize,
    ) -> Result<Vec<StatementLine>, ReadError> {
        let mut at = self.prefix.clone();
        if let Some(after) = after {
            push_line_place(&mut at, after);
        }
        iter.seek(&at);
        if after.is_some() && iter.key() == Some(at.as_slice()) {
            iter.next();
        }
        // The page's lines kept apart (at most `count`: the book's can only take places).
        let mut stored = Vec::with_capacity(count.min(1 << 14));
        while stored.len() < count
            && let Some(value) = iter.value()
        {
            let line: StatementLine = postcard::from_bytes(value)
                .map_err(|e| ReadError::Storage(format!("a statement line kept apart: {e}")))?;
            stored.push(line);
            iter.next();
        }
        iter.status()?;
        let later = |line: &&StatementLine| after.is_none_or(|place| place.precedes(line));
        let held = held.iter().filter(later).cloned();
        let lines = neruba_balances::state::merge_in_order(held, stored, count, |a, b| {
            line_order(a, &b.meter, &b.group, &b.period_start)
        });
        Ok(lines)
    }
}

/// A customer's statements of one period with what the book they were read with carries, as
/// handed to a read's answer ([`Model::statements`]).
pub(crate) struct StatementsRead<'a> {
    /// By currency, then period; each with its `lines` and `prior_period` as kept apart, to
    /// read from a place on, the statement holding none (`None`: a final statement stored
    /// whole by a release before, which holds them).
    pub(crate) statements: Vec<(Statement, Option<[StoredLines<'a>; 2]>)>,
    /// The book's corrections of final periods waiting for a later statement, by currency.
    pub(crate) carried: BTreeMap<String, neruba_balances::book::statements::Carried>,
}

/// The month a billing period is labelled by (`YYYY-MM`): the month it starts in, in its own
/// time zone, from its bounds as stored (UTC).
///
/// A period starts at local midnight of day 1–28, in a zone less than 15 h from UTC, so the UTC
/// instant 15 h after its start falls on the local start date or the day after: in the same
/// month, unless the start is February 28 of a common year, whose next day is in March. That
/// period alone lasts exactly 28 days (from the 28th of February to the 28th of March; every
/// other month is longer), which tells it apart. (14 h, as this was, called a February period
/// anchored on the 28th at −10:00 or further west March, and every period at more than +14:00
/// the month before.)
pub fn period_label(period_start: &str, period_end: &str) -> String {
    const HOUR: i64 = 3_600_000;
    use neruba_schemas::event::{format_time_ms, parse_time_ms};
    let Ok(start) = parse_time_ms(period_start) else {
        return period_start.get(..7).unwrap_or_default().to_owned();
    };
    let label = format_time_ms(start.saturating_add(15 * HOUR));
    let (Some(year), Some(month)) = (label.get(..4), label.get(5..7)) else {
        return String::new();
    };
    let february = parse_time_ms(period_end).is_ok_and(|end| end - start == 28 * 24 * HOUR);
    if february && month == "03" {
        format!("{year}-02")
    } else {
        format!("{year}-{month}")
    }
}

/// Where a customer's line items (`prefix`) of the period labelled `month` start. A period
/// labelled `month` starts, in UTC, on the previous month's last day at the earliest (a zone
/// east of UTC). Every period start is 24 bytes of RFC 3339, so the seek key is its length
/// prefix and that date.
fn period_seek(prefix: &[u8], month: &str) -> Vec<u8> {
    let mut start = prefix.to_vec();
    if let Some(earliest) = earliest_start(month) {
        start.extend_from_slice(&24u32.to_be_bytes());
        start.extend_from_slice(earliest.as_bytes());
    }
    start
}

/// The period start, window start and id a line-items cursor ([`item_place`]) names, if it
/// names a place a line item of the period labelled `month` can have: both times in the keys'
/// form, the period starting when one labelled `month` can.
pub fn item_cursor<'a>(after: &'a str, month: &str) -> Option<[&'a str; 3]> {
    let mut parts = after.splitn(3, '\n');
    let parts = [parts.next()?, parts.next()?, parts.next()?];
    let [period_start, window_start, _] = parts;
    let in_key_form = |time: &str| key_time(time) == time && time.len() == 24;
    let (earliest, latest) = (earliest_start(month)?, start_bound(month)?);
    (in_key_form(period_start)
        && in_key_form(window_start)
        && period_start >= earliest.as_str()
        && period_start < latest.as_str())
    .then_some(parts)
}

/// A UTC date (`YYYY-MM-DD`) no period labelled `month` starts on or after: the 2nd of the
/// month after (one starts at most 15 h after local midnight of its day 1–28, or, for
/// February's 28th, on March 1).
fn start_bound(month: &str) -> Option<String> {
    let first = neruba_schemas::event::parse_time_ms(&format!("{month}-01T00:00:00Z")).ok()?;
    // Day 1 plus 32 days is in the month after, whatever the month.
    let next = neruba_schemas::event::format_time_ms(first + 32 * 86_400_000);
    Some(format!("{}-02", next.get(..7)?))
}

/// The earliest UTC date (`YYYY-MM-DD`) a period labelled `month` can start on: the last day
/// of the month before.
fn earliest_start(month: &str) -> Option<String> {
    let first = neruba_schemas::event::parse_time_ms(&format!("{month}-01T00:00:00Z")).ok()?;
    let text = neruba_schemas::event::format_time_ms(first - 86_400_000);
    text.get(..10).map(str::to_owned)
}

fn decode<T: for<'de> serde::Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, ReadError> {
    serde_json::from_slice(bytes).map_err(|e| ReadError::Storage(format!("{what}: {e}")))
}

impl Model {
    /// An empty model of a ledger topic with `partitions` partitions.
    pub fn new(topic: &str, partitions: i32) -> Self {
        Self {
            topic: topic.to_owned(),
            partitions,
            views: RwLock::new(BTreeMap::new()),
            ends: None,
            caught_up_once: AtomicBool::new(false),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The topic's partition count.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// The ledger partition of a customer.
    pub fn partition_of(&self, tenant: &str, customer: &str) -> i32 {
        stable_partition(&format!("{tenant}/{customer}"), self.partitions)
    }

    /// The ledger stage opened `partition` (its database, and where it stands).
    pub(crate) fn opened(&self, partition: i32, db: Arc<DB>, next_offset: Option<i64>) {
        let view = Arc::new(PartitionView {
            db,
            next_offset: AtomicI64::new(next_offset.unwrap_or(0)),
        });
        let mut views = match self.views.write() {
            Ok(views) => views,
            Err(poisoned) => poisoned.into_inner(),
        };
        views.insert(partition, view);
    }

    /// The ledger stage wrote `partition` up to `next_offset`.
    pub(crate) fn advanced(&self, partition: i32, next_offset: i64) {
        if let Some(view) = self.view(partition) {
            view.next_offset.fetch_max(next_offset, Ordering::SeqCst);
        }
    }

    fn view(&self, partition: i32) -> Option<Arc<PartitionView>> {
        let views = match self.views.read() {
            Ok(views) => views,
            Err(poisoned) => poisoned.into_inner(),
        };
        views.get(&partition).cloned()
    }

    fn loaded(&self, partition: i32) -> Result<Arc<PartitionView>, ReadError> {
        self.view(partition).ok_or(ReadError::NotLoaded(partition))
    }

    /// The database of the partition holding a customer.
    pub(crate) fn db_of(&self, tenant: &str, customer: &str) -> Result<Arc<DB>, ReadError> {
        Ok(self.loaded(self.partition_of(tenant, customer))?.db.clone())
    }

    /// Where `partition` stands (`None`: not loaded).
    pub fn position(&self, partition: i32) -> Option<Position> {
        self.view(partition)
            .map(|view| self.position_of(partition, &view))
    }

    fn position_of(&self, partition: i32, view: &PartitionView) -> Position {
        Position {
            topic: self.topic.clone(),
            partition,
            next_offset: view.next_offset.load(Ordering::SeqCst),
        }
    }

    /// Every loaded partition's position.
    pub fn positions(&self) -> Vec<Position> {
        (0..self.partitions)
            .filter_map(|p| self.position(p))
            .collect()
    }

    /// Whether the model has read every partition up to where it ended when the api started
    /// (the ends it was given at the start; latched: once true, it stays so). Before that, a customer whose
    /// records it has not read yet would be answered as one that does not exist. (Ends fixed
    /// at the start, not the broker's latest: on a busy topic no moment may come when every
    /// partition is at its latest end.)
    pub fn caught_up_once(&self) -> bool {
        if self.caught_up_once.load(Ordering::SeqCst) {
            return true;
        }
        let Some(ends) = &self.ends else {
            return false;
        };
        let caught_up = (0..self.partitions)
            .zip(ends)
            .all(|(partition, &(oldest, end))| {
                oldest >= end
                    || self
                        .position(partition)
                        .is_some_and(|p| p.next_offset >= end)
            });
        if caught_up {
            self.caught_up_once.store(true, Ordering::SeqCst);
        }
        caught_up
    }

    /// A model of a topic whose partitions' oldest and next offsets on the broker, as the api
    /// starts, are `ends` (one per partition): what [`Self::caught_up_once`] waits for.
    pub(crate) fn reading_to(topic: &str, ends: Vec<(i64, i64)>) -> Self {
        let partitions = i32::try_from(ends.len()).unwrap_or(i32::MAX);
        Self {
            ends: Some(ends),
            ..Self::new(topic, partitions)
        }
    }

    /// A customer's book, from the partition that holds it, and the position it is as of.
    pub fn book(
        &self,
        tenant: &str,
        customer: &str,
        parts: neruba_balances::state::Parts,
    ) -> Result<(Option<Book>, Position), ReadError> {
        let partition = self.partition_of(tenant, customer);
        let view = self.loaded(partition)?;
        // The position first: the book read after it is at least as new.
        let position = self.position_of(partition, &view);
        // With what kept apart the read needs (balance reads and a grant's read: the book
        // alone; statements and the grants list read what they need a page at a time).
        let book =
            neruba_balances::state::read_book_in(&view.db.snapshot(), tenant, customer, parts)?;
        Ok((book, position))
    }

    /// Up to `count` of a customer's grants in burn-down order after `after`, read from one
    /// snapshot ([`neruba_balances::state::grants_after`]); `None` when the customer has no
    /// record.
    pub fn grants(
        &self,
        tenant: &str,
        customer: &str,
        after: Option<neruba_balances::book::BurnPlace<'_>>,
        count: usize,
    ) -> Result<(Option<Vec<neruba_balances::book::GrantState>>, Position), ReadError> {
        let partition = self.partition_of(tenant, customer);
        let view = self.loaded(partition)?;
        // The position first: the read after it is at least as new.
        let position = self.position_of(partition, &view);
        let grants = neruba_balances::state::grants_after(
            &view.db.snapshot(),
            tenant,
            customer,
            after,
            count,
        )?;
        Ok((grants, position))
    }

    /// Where grant `id` of a customer stands, its book and the refusals read from one
    /// snapshot (so a grant applied meanwhile is found in one or the other).
    pub fn grant_standing(
        &self,
        tenant: &str,
        customer: &str,
        id: &str,
    ) -> Result<GrantStanding, ReadError> {
        let view = self.loaded(self.partition_of(tenant, customer))?;
        let snapshot = view.db.snapshot();
        if let Some(grant) = neruba_balances::state::read_grant_in(&snapshot, tenant, customer, id)?
        {
            return Ok(GrantStanding::Held(Box::new(grant)));
        }
        Ok(match snapshot.get(refusal_key(tenant, customer, id))? {
            Some(value) => GrantStanding::Refused(Box::new(decode("grant refusal", &value)?)),
            None => GrantStanding::Unknown,
        })
    }

    /// Up to `limit` balance entries of a customer with a sequence number above `after`.
    pub fn entries(
        &self,
        tenant: &str,
        customer: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<BalanceEntry>, ReadError> {
        let view = self.loaded(self.partition_of(tenant, customer))?;
        let prefix = neruba_balances::state::customer_key(b'E', tenant, customer);
        let mut start = prefix.clone();
        start.extend_from_slice(&after.saturating_add(1).to_be_bytes());
        let mut out = Vec::new();
        for item in view
            .db
            .iterator(IteratorMode::From(&start, Direction::Forward))
        {
            let (key, value) = item?;
            if !key.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(decode("balance entry", &value)?);
        }
        Ok(out)
    }

    /// A page of a customer's line items of the billing period labelled `month` (of `meter`
    /// alone, if given): at most `limit`, in key order (period start, window start, id), those
    /// after the item at `after` ([`item_place`]), each with whether a later item supersedes
    /// it. Read from one snapshot, from the cursor on: a page reads what it answers and what
    /// `meter` leaves out, never the period before its cursor, and looks at most at
    /// [`ITEMS_EXAMINED`] items: past that it ends short, even empty, with where the next
    /// page goes on ([`ItemsPage::next`]).
    pub fn line_items_page(
        &self,
        tenant: &str,
        customer: &str,
        month: &str,
        meter: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ItemsPage, ReadError> {
        let view = self.loaded(self.partition_of(tenant, customer))?;
        let snapshot = view.db.snapshot();
        let prefix = neruba_balances::state::customer_key(b'L', tenant, customer);
        let mut start = period_seek(&prefix, month);
        // The cursor's item's key: the page starts past it, in the order keys sort. (Was:
        // past its place as text, which sorts ids of unequal lengths otherwise, so a page could
        // skip items; every id the rater writes has one length.)
        let after = match after {
            None => None,
            Some(after) => {
                let parts = item_cursor(after, month).ok_or_else(|| {
                    ReadError::InvalidCursor(format!(
                        "the cursor names no place of a line item of {month}"
                    ))
                })?;
                let at = key(b'L', tenant, customer, &parts.map(str::as_bytes));
                start = start.max(at.clone());
                Some(at)
            }
        };
        let latest = start_bound(month);
        let mut page = Vec::new();
        // The place of the last item looked at, once the page may look at no more.
        let mut stopped_at = None;
        let (mut examined, most) = (0_usize, items_examined());
        for entry in snapshot.iterator(IteratorMode::From(&start, Direction::Forward)) {
            if page.len() >= limit {
                break;
            }
            let (key, value) = entry?;
            if !key.starts_with(&prefix) {
                break;
            }
            if after.as_deref().is_some_and(|after| *key <= *after) {
                continue;
            }
            let item: LineItem = decode("line item", &value)?;
            // Labels do not rise with the start everywhere (a February period anchored on the
            // 28th far west of UTC starts after a March one far east), so the read ends only
            // where no period labelled `month` can start: the 2nd of the month after.
            if latest
                .as_deref()
                .is_some_and(|bound| item.period_start.as_str() >= bound)
            {
                break;
            }
            examined += 1;
            let wanted = period_label(&item.period_start, &item.period_end) == month
                && meter.is_none_or(|m| item.meter == m);
            if examined >= most && page.len() + usize::from(wanted) < limit {
                // Its place is within the period's bounds, so a cursor of it is taken.
                stopped_at = Some(item_place(&item));
            }
            if wanted {
                page.push(item);
            }
            if stopped_at.is_some() {
                break;
            }
        }
        let marks = snapshot.multi_get(
            page.iter()
                .map(|item| superseded_key(tenant, customer, &item.id)),
        );
        let items = page
            .into_iter()
            .zip(marks)
            .map(|(item, mark)| {
                Ok(ItemRead {
                    superseded: mark?.is_some(),
                    item,
                })
            })
            .collect::<Result<Vec<_>, ReadError>>()?;
        let next = match items.last() {
            Some(last) if items.len() >= limit => Some(item_place(&last.item)),
            _ => stopped_at,
        };
        Ok(ItemsPage { items, next })
    }

    /// The line item `id` of a customer's billing period labelled `month`, with whether a
    /// later item supersedes it; `None` when the period has no such item. Decodes that item
    /// alone: the others are passed by their keys.
    pub fn line_item(
        &self,
        tenant: &str,
        customer: &str,
        month: &str,
        id: &str,
    ) -> Result<Option<ItemRead>, ReadError> {
        let view = self.loaded(self.partition_of(tenant, customer))?;
        let snapshot = view.db.snapshot();
        let prefix = neruba_balances::state::customer_key(b'L', tenant, customer);
        let start = period_seek(&prefix, month);
        let latest = start_bound(month);
        for entry in snapshot.iterator(IteratorMode::From(&start, Direction::Forward)) {
            let (key, value) = entry?;
            let Some(parts) = key.strip_prefix(prefix.as_slice()) else {
                break;
            };
            let Some((period_start, rest)) = neruba_stage::keys::read_part(parts) else {
                continue;
            };
            if latest
                .as_deref()
                .is_some_and(|bound| period_start >= bound.as_bytes())
            {
                break;
            }
            let id_part = neruba_stage::keys::read_part(rest)
                .and_then(|(_, rest)| neruba_stage::keys::read_part(rest))
                .map(|(id_part, _)| id_part);
            if id_part != Some(id.as_bytes()) {
                continue;
            }
            let item: LineItem = decode("line item", &value)?;
            if period_label(&item.period_start, &item.period_end) != month {
                continue;
            }
            let superseded = snapshot
                .get(superseded_key(tenant, customer, id))?
                .is_some();
            return Ok(Some(ItemRead { item, superseded }));
        }
        Ok(None)
    }

    /// A customer's statements of the billing period labelled `month`, one per currency:
    /// open and draft ones from the book, final ones as finalised, read from one snapshot
    /// (a statement finalised between two reads would otherwise appear twice), with the book
    /// they were read with, handed to `answer`, which reads the lines that it needs from the
    /// same snapshot; `None` when the customer has no record.
    pub(crate) fn statements<R>(
        &self,
        tenant: &str,
        customer: &str,
        month: &str,
        answer: impl FnOnce(StatementsRead<'_>) -> R,
    ) -> Result<(Option<R>, Position), ReadError> {
        let partition = self.partition_of(tenant, customer);
        let view = self.loaded(partition)?;
        let position = self.position_of(partition, &view);
        let snapshot = view.db.snapshot();
        // With the lines kept apart from the book of the corrections carried alone: a page of
        // an open statement reads its own lines ([`StoredLines::apart`]), not every line of
        // the statement nor of the customer's other statements.
        let carried = |book: &Book| {
            book.carried
                .keys()
                .cloned()
                .map(LineList::Carried)
                .collect()
        };
        let Some(book) =
            neruba_balances::state::read_book_with_lines_of(&snapshot, tenant, customer, carried)?
        else {
            return Ok((None, position));
        };
        let prefix = neruba_balances::state::customer_key(b'S', tenant, customer);
        let (earliest, latest) = (earliest_start(month), start_bound(month));
        let mut out: Vec<(Statement, Option<[StoredLines<'_>; 2]>)> = Vec::new();
        // In place: a month's value is copied and decoded only if the key says it may be the
        // month's (a final statement stored whole, as releases before stored them, is
        // megabytes at 10,000 lines).
        let mut iter = snapshot.raw_iterator_opt(neruba_stage::keys::reading_under(&prefix));
        iter.seek(&prefix);
        while let Some(key) = iter.key() {
            let Some(rest) = key.strip_prefix(prefix.as_slice()) else {
                break;
            };
            // Final statements of every period the customer was billed in are kept: the
            // period start in the key tells those that cannot be labelled `month` without
            // decoding them, so a read decodes one month's, not the customer's history.
            let start = neruba_stage::keys::read_part(rest)
                .and_then(|(start, _)| std::str::from_utf8(start).ok())
                .and_then(|start| neruba_schemas::event::parse_time_ms(start).ok())
                .map(neruba_schemas::event::format_time_ms);
            let ruled_out = matches!(
                (&start, &earliest, &latest),
                (Some(start), Some(earliest), Some(latest))
                    if start.as_str() < earliest.as_str() || start.as_str() >= latest.as_str()
            );
            if !ruled_out {
                let (statement, apart) = decode_statement(iter.value().unwrap_or_default())?;
                if period_label(&statement.period_start, &statement.period_end) == month {
                    let runs = apart.then(|| {
                        [false, true].map(|prior| {
                            let key = final_lines_key(tenant, customer, &statement, prior);
                            StoredLines::runs(&snapshot, key)
                        })
                    });
                    out.push((statement, runs));
                }
            }
            iter.next();
        }
        iter.status()?;
        // Taken out of the book, not copied, each list's lines with them (an open statement
        // can hold 10,000 lines, nearly all kept apart).
        for (key, state) in book.statements {
            let mut statement = state.statement;
            if period_label(&statement.period_start, &statement.period_end) != month {
                continue;
            }
            let lists = [
                (
                    LineList::Lines(key.clone()),
                    std::mem::take(&mut statement.lines),
                ),
                (
                    LineList::Prior(key),
                    std::mem::take(&mut statement.prior_period),
                ),
            ];
            let lines = lists.map(|(list, held)| {
                let prefix = neruba_balances::state::line_list_key(tenant, customer, &list);
                StoredLines::apart(&snapshot, prefix, held)
            });
            out.push((statement, Some(lines)));
        }
        // By currency, then period (two periods of one currency can share a label when a
        // meter's anchor or time zone changed): the order a statements page walks them in.
        out.sort_by_cached_key(|(s, _)| (s.currency.clone(), key_time(&s.period_start)));
        let statements = out;
        let read = StatementsRead {
            statements,
            carried: book.carried,
        };
        Ok((Some(answer(read)), position))
    }

    /// Up to `limit` customers of `tenant` after `after` (in [`neruba_balances::state::customer_order`]),
    /// across partitions.
    pub fn customers(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ReadError> {
        let mut all = Vec::new();
        for partition in 0..self.partitions {
            let view = self.loaded(partition)?;
            all.extend(neruba_balances::state::customers(
                &view.db, tenant, after, limit,
            )?);
        }
        all.sort_by(|a, b| {
            neruba_balances::state::customer_order(a)
                .cmp(&neruba_balances::state::customer_order(b))
        });
        all.truncate(limit);
        Ok(all)
    }
}

/// For tests: a fresh ledger fold of partition 0 stored in `dir`, as the api opens one, with
/// its database (for a [`Model`]) and the next offset to apply a record at.
#[cfg(test)]
pub(crate) struct TestFold {
    pub(crate) fold: neruba_balances::state::PartitionState,
    pub(crate) db: Arc<rocksdb::DB>,
    offset: i64,
}

#[cfg(test)]
impl TestFold {
    pub(crate) fn open(dir: &std::path::Path) -> Self {
        let cache = rocksdb::Cache::new_lru_cache(1 << 20);
        let store =
            neruba_stage::Store::open(dir, 0, &neruba_balances::state::store_options(), &cache)
                .expect("store");
        let db = store.shared_db();
        let fold = neruba_balances::state::PartitionState::from_store(
            store,
            0,
            neruba_schemas::credit::DEFAULT_FINALIZE_AFTER_MS,
        )
        .expect("fold");
        Self {
            fold,
            db,
            offset: 0,
        }
    }

    /// Applies `payload` as the next record of the partition.
    pub(crate) fn apply(&mut self, payload: &[u8], record: neruba_balances::state::Record) {
        Self::apply_to(&mut self.fold, &mut self.offset, payload, record);
    }

    /// [`Self::apply`] to `fold` (taken out of the test fold), at `offset`, then the next.
    pub(crate) fn apply_to(
        fold: &mut neruba_balances::state::PartitionState,
        offset: &mut i64,
        payload: &[u8],
        record: neruba_balances::state::Record,
    ) {
        let input = neruba_stage::Input {
            offset: *offset,
            key: None,
            payload,
        };
        *offset += 1;
        fold.apply(input, record).expect("apply");
    }

    /// Commits what was applied (its outputs dropped), as the stage does after a batch.
    pub(crate) fn commit(&mut self) {
        self.fold.take_outputs();
        self.fold
            .commit_with(rocksdb::WriteBatch::default())
            .expect("commit");
    }

    /// Commits what was applied and opens a model of it.
    pub(crate) fn commit_into_model(mut self) -> Model {
        self.commit();
        let model = Model::new("ledger", 1);
        model.opened(0, self.db, self.fold.next_offset());
        model
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neruba_schemas::ledger::Kind;

    fn item(id: &str, period_start: &str) -> LineItem {
        LineItem {
            v: 1,
            id: id.into(),
            kind: Kind::Usage,
            tenant: "t".into(),
            customer: "c".into(),
            meter: "m".into(),
            group: BTreeMap::new(),
            period_start: period_start.into(),
            period_end: period_start.into(),
            window_start: period_start.into(),
            window_end: period_start.into(),
            window_quantity: rust_decimal::Decimal::ONE,
            window_events: 1,
            period_quantity: rust_decimal::Decimal::ONE,
            amount: rust_decimal::Decimal::ONE,
            period_amount: rust_decimal::Decimal::ONE,
            currency: "USD".into(),
            price_plan: "p".into(),
            price_version: 1,
            revision: 1,
            supersedes: None,
        }
    }

    #[test]
    fn a_period_is_labelled_by_its_local_month_and_read_by_it() {
        // November in +01:00 starts on October 31 in UTC; in −05:00, on November 1 at 05:00.
        let label = |start: &str, end: &str| period_label(start, end);
        assert_eq!(
            label("2026-10-31T23:00:00.000Z", "2026-11-30T23:00:00.000Z"),
            "2026-11"
        );
        assert_eq!(
            label("2026-11-01T05:00:00.000Z", "2026-12-01T05:00:00.000Z"),
            "2026-11"
        );
        assert_eq!(
            label("2026-11-28T00:00:00Z", "2026-12-28T00:00:00Z"),
            "2026-11"
        );
        assert_eq!(
            label("2026-12-31T10:00:00.000Z", "2027-01-31T10:00:00.000Z"),
            "2027-01"
        );
        // Was: anchored on the 28th at −10:00 (Hawaii), a common year's February period was
        // labelled March (its start 14 h on is March 1), so `2027-02` read no statement and
        // `2027-03` read two. Its March period stays March.
        assert_eq!(
            label("2027-02-28T10:00:00.000Z", "2027-03-28T10:00:00.000Z"),
            "2027-02"
        );
        assert_eq!(
            label("2027-02-28T14:59:00.000Z", "2027-03-28T14:59:00.000Z"),
            "2027-02"
        );
        assert_eq!(
            label("2027-03-28T10:00:00.000Z", "2027-04-28T10:00:00.000Z"),
            "2027-03"
        );
        // A leap year's February period anchored on the 28th lasts 29 days, and the day
        // after its start is still February; a March period starting on February 28 in UTC
        // (March 1 at +14:00) lasts 31.
        assert_eq!(
            label("2028-02-28T14:00:00.000Z", "2028-03-28T14:00:00.000Z"),
            "2028-02"
        );
        assert_eq!(
            label("2027-02-28T10:00:00.000Z", "2027-03-31T10:00:00.000Z"),
            "2027-03"
        );
        // Was: at more than +14:00, every period the month before.
        assert_eq!(
            label("2026-11-30T09:30:00.000Z", "2026-12-31T09:30:00.000Z"),
            "2026-12"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(DB::open_default(dir.path()).expect("db"));
        for (id, start, end) in [
            ("li_oct", "2026-09-30T23:00:00.000Z", ""),
            ("li_nov_a", "2026-10-31T23:00:00.000Z", ""),
            ("li_nov_b", "2026-10-31T23:00:00Z", ""),
            ("li_dec", "2026-11-30T23:00:00.000Z", ""),
            // March at +14:00, then February anchored on the 28th at −12:00: a later start,
            // an earlier label (a read of February stopped at the first, and missed it).
            (
                "li_mar_east",
                "2027-02-28T10:00:00.000Z",
                "2027-03-31T10:00:00.000Z",
            ),
            (
                "li_feb_west",
                "2027-02-28T12:00:00.000Z",
                "2027-03-28T12:00:00.000Z",
            ),
        ] {
            let mut item = item(id, start);
            if !end.is_empty() {
                item.period_end = end.into();
            }
            db.put(item_key(&item), serde_json::to_vec(&item).expect("json"))
                .expect("put");
        }
        let model = Model::new("ledger", 1);
        model.opened(0, db, Some(4));
        let ids = |month: &str| -> Vec<String> {
            model
                .line_items_page("t", "c", month, None, None, usize::MAX)
                .expect("read")
                .items
                .into_iter()
                .map(|r| r.item.id)
                .collect()
        };
        assert_eq!(ids("2026-11"), vec!["li_nov_a", "li_nov_b"]);
        assert_eq!(ids("2026-10"), vec!["li_oct"]);
        assert_eq!(ids("2026-12"), vec!["li_dec"]);
        assert!(ids("2026-08").is_empty());
        assert_eq!(ids("2027-02"), vec!["li_feb_west"]);
        assert_eq!(ids("2027-03"), vec!["li_mar_east"]);
    }

    /// A final statement stored whole in postcard, as releases of earlier on December 2, 2026
    /// stored them.
    fn stored_whole(statement: &Statement) -> Vec<u8> {
        postcard::to_io(statement, vec![STATEMENT_POSTCARD]).expect("encode")
    }

    /// [`stored_whole`]'s bytes of the statement in
    /// `the_stored_forms_of_a_final_statement_are_fixed`.
    const GOLDEN_STATEMENT_HEX: &str = concat!(
        "b10473745f310355534418323032362d31312d30315430303a30303a30302e3030305a1832303236",
        "2d31322d30315430303a30303a30302e3030305a020106746f6b656e7301056d6f64656c05736d61",
        "6c6c18323032362d31312d30315430303a30303a30302e3030305a0380dc0b0382e1010282320382",
        "af010108726571756573747301056d6f64656c05736d616c6c18323032362d31312d30315430303a",
        "30303a30302e3030305a0380dc0b02a26402823203a296010382e10102a264028264028219",
    );

    /// [`stored_statement`]'s values of that statement: without its lines, then the run of its
    /// one line.
    const GOLDEN_APART_HEX: [&str; 2] = [
        concat!(
            "b20473745f310355534418323032362d31312d30315430303a30303a30302e3030305a1832303236",
            "2d31322d30315430303a30303a30302e3030305a0200000382e10102a264028264028219",
        ),
        concat!(
            "0106746f6b656e7301056d6f64656c05736d616c6c18323032362d31312d30315430303a30303a3030",
            "2e3030305a0380dc0b0382e1010282320382af01",
        ),
    ];

    /// [`stored_statement`]'s keys of that statement's two runs, and the prior-period run.
    const GOLDEN_RUNS_HEX: [&str; 3] = [
        concat!(
            "000000017446000000016300000018323032362d31312d30315430303a30303a30302e3030305a00",
            "000003555344000000016c746f6b656e730000016d6f64656c0000736d616c6c000000323032362d",
            "31312d30315430303a30303a30302e3030305a",
        ),
        concat!(
            "000000017446000000016300000018323032362d31312d30315430303a30303a30302e3030305a00",
            "000003555344000000017072657175657374730000016d6f64656c0000736d616c6c000000323032",
            "362d31312d30315430303a30303a30302e3030305a",
        ),
        concat!(
            "0108726571756573747301056d6f64656c05736d616c6c18323032362d31312d30315430303a3030",
            "3a30302e3030305a0380dc0b02a26402823203a29601",
        ),
    ];

    #[test]
    fn the_stored_forms_of_a_final_statement_are_fixed() {
        // postcard writes fields by position, without names or defaults: a field added to a
        // statement or a line changes these bytes, and final statements stored before could
        // no longer be read. Such a change needs a new tag byte and a decoder for this layout.
        use neruba_schemas::credit::StatementStatus;
        let d = |text: &str| text.parse::<rust_decimal::Decimal>().expect("decimal");
        let line = |meter: &str, amount: &str| StatementLine {
            meter: meter.into(),
            group: BTreeMap::from([("model".to_owned(), "small".to_owned())]),
            period_start: "2026-11-01T00:00:00.000Z".into(),
            quantity: d("1500"),
            amount: d(amount),
            credit_applied: d("0.50"),
            amount_due: d(amount) - d("0.50"),
        };
        let statement = Statement {
            id: "st_1".into(),
            currency: "USD".into(),
            period_start: "2026-11-01T00:00:00.000Z".into(),
            period_end: "2026-12-01T00:00:00.000Z".into(),
            status: StatementStatus::Final,
            lines: vec![line("tokens", "2.25")],
            prior_period: vec![line("requests", "-1.00")],
            usage: d("2.25"),
            prior_period_amount: d("-1.00"),
            credit_applied: d("1.00"),
            amount_due: d("0.25"),
        };
        let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
        // As the ledger stage stores it: the statement without its lines, then each line
        // under its list's key.
        let stored = stored_statement("t", "c", &statement).expect("encode");
        let [
            (key, header),
            (lines_key, line_value),
            (prior_key, prior_value),
        ] = stored.as_slice()
        else {
            panic!("the statement and its two lines: {stored:?}");
        };
        assert_eq!(key, &statement_key("t", "c", &statement));
        assert_eq!([hex(header), hex(line_value)], GOLDEN_APART_HEX);
        // The runs' keys too: reads seek by them, so keys written otherwise would sort apart
        // from those stored before, and a seek could skip lines.
        assert_eq!(
            [hex(lines_key), hex(prior_key), hex(prior_value)],
            GOLDEN_RUNS_HEX
        );
        let without = Statement {
            lines: Vec::new(),
            prior_period: Vec::new(),
            ..statement.clone()
        };
        assert_eq!(decode_statement(header).expect("decode"), (without, true));
        // As stored before: whole in postcard, whole in JSON; and a form no writer leaves.
        let whole = stored_whole(&statement);
        assert_eq!(hex(&whole), GOLDEN_STATEMENT_HEX);
        assert_eq!(
            decode_statement(&whole).expect("decode"),
            (statement.clone(), false)
        );
        let json = neruba_schemas::credit::encode(&statement);
        assert_eq!(
            decode_statement(&json).expect("decode JSON"),
            (statement, false)
        );
        assert!(matches!(
            decode_statement(b"[1]"),
            Err(ReadError::Storage(message)) if message.contains("unknown stored form")
        ));
    }

    #[test]
    fn a_statement_read_decodes_the_final_statements_of_its_month_alone() {
        use neruba_balances::state::Record;
        use neruba_schemas::credit::{Statement, StatementStatus};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ledger = TestFold::open(dir.path());
        let mut first = item("li_1", "2026-11-01T00:00:00.000Z");
        first.period_end = "2026-12-01T00:00:00.000Z".into();
        ledger.apply(&first.encode(), Record::LineItem);
        let statement = |currency: &str, start: &str, end: &str| Statement {
            id: format!("st_{currency}_{start}"),
            currency: currency.into(),
            period_start: start.into(),
            period_end: end.into(),
            status: StatementStatus::Final,
            lines: vec![StatementLine {
                meter: "tokens".into(),
                group: BTreeMap::new(),
                period_start: start.into(),
                quantity: rust_decimal::Decimal::ONE,
                amount: rust_decimal::Decimal::ONE,
                credit_applied: rust_decimal::Decimal::ZERO,
                amount_due: rust_decimal::Decimal::ONE,
            }],
            prior_period: Vec::new(),
            usage: rust_decimal::Decimal::ONE,
            prior_period_amount: rust_decimal::Decimal::ZERO,
            credit_applied: rust_decimal::Decimal::ZERO,
            amount_due: rust_decimal::Decimal::ONE,
        };
        let finals = [
            statement(
                "USD",
                "2026-09-01T00:00:00.000Z",
                "2026-10-01T00:00:00.000Z",
            ),
            statement(
                "EUR",
                "2026-10-01T00:00:00.000Z",
                "2026-11-01T00:00:00.000Z",
            ),
            statement(
                "USD",
                "2026-10-01T00:00:00.000Z",
                "2026-11-01T00:00:00.000Z",
            ),
            // October at +01:00 starts on September 30 in UTC, and a start written with an
            // offset is compared by its time (as text, this one's date is before that).
            statement(
                "GBP",
                "2026-09-30T23:00:00.000Z",
                "2026-10-31T23:00:00.000Z",
            ),
            statement(
                "CHF",
                "2026-09-29T23:00:00-11:00",
                "2026-10-30T23:00:00-11:00",
            ),
            // A February anchored on the 28th far west of UTC, after a March far east.
            statement(
                "USD",
                "2027-02-28T10:00:00.000Z",
                "2027-03-31T10:00:00.000Z",
            ),
            statement(
                "EUR",
                "2027-02-28T12:00:00.000Z",
                "2027-03-28T12:00:00.000Z",
            ),
        ];
        // Stored as the ledger stage stores them, and the others whole, in postcard or JSON,
        // as final statements were stored before: all read back.
        for (n, s) in finals.iter().enumerate() {
            let stored = match n % 3 {
                0 => stored_statement("t", "c", s).expect("encode"),
                1 => vec![(statement_key("t", "c", s), stored_whole(s))],
                _ => vec![(
                    statement_key("t", "c", s),
                    neruba_schemas::credit::encode(s),
                )],
            };
            for (key, value) in stored {
                ledger.db.put(key, value).expect("put");
            }
        }
        // A month the key rules out is never decoded: a stored value that is not a statement
        // under one (as no writer leaves) fails only the read of its own month.
        let mut broken = statement(
            "USD",
            "2026-08-01T00:00:00.000Z",
            "2026-09-01T00:00:00.000Z",
        );
        broken.currency = "JPY".into();
        ledger
            .db
            .put(statement_key("t", "c", &broken), b"not a statement")
            .expect("put");
        let model = ledger.commit_into_model();
        let read = |month: &str| -> Result<Vec<String>, ReadError> {
            // Each statement's currency, status, and where its lines are, with their count.
            let (read, _) = model.statements("t", "c", month, |read| {
                read.statements
                    .iter()
                    .map(|(s, apart)| match apart {
                        Some([lines, prior]) => {
                            let count = |list: &StoredLines<'_>| {
                                list.read(None, usize::MAX).expect("lines").len()
                            };
                            assert!(s.lines.is_empty());
                            format!(
                                "{} {:?} apart {}+{}",
                                s.currency,
                                s.status,
                                count(lines),
                                count(prior)
                            )
                        }
                        None => format!("{} {:?} held {}", s.currency, s.status, s.lines.len()),
                    })
                    .collect()
            })?;
            Ok(read.expect("the customer"))
        };
        assert_eq!(read("2026-09").expect("read"), vec!["USD Final apart 1+0"]);
        assert_eq!(
            read("2026-10").expect("read"),
            vec![
                "CHF Final held 1",
                "EUR Final held 1",
                "GBP Final apart 1+0",
                "USD Final held 1"
            ]
        );
        assert_eq!(read("2026-11").expect("read"), vec!["USD Open apart 1+0"]);
        assert_eq!(read("2027-02").expect("read"), vec!["EUR Final apart 1+0"]);
        assert_eq!(read("2027-03").expect("read"), vec!["USD Final held 1"]);
        assert!(matches!(read("2026-08"), Err(ReadError::Storage(_))));
    }

    #[test]
    fn a_statement_read_reads_the_lines_kept_apart_of_its_own_months_statements_alone() {
        // Was: every list's lines kept apart were read, so the statement of a month read the
        // lines of every other open or draft statement of the customer too.
        use neruba_balances::state::{BOOK_LINES, Record};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ledger = TestFold::open(dir.path());
        let months = [
            ("2026-10-01T00:00:00.000Z", "2026-11-01T00:00:00.000Z"),
            ("2026-11-01T00:00:00.000Z", "2026-12-01T00:00:00.000Z"),
        ];
        // More lines than a book keeps in each month's statement, both open.
        let groups = BOOK_LINES + 3;
        for (m, (start, end)) in months.iter().enumerate() {
            for n in 0..groups {
                let mut item = item(&format!("li_{m}_{n}"), start);
                item.period_end = (*end).into();
                item.group = [("project".to_owned(), format!("p{n}"))].into();
                ledger.apply(&item.encode(), Record::LineItem);
            }
        }
        // A value no writer leaves among October's lines kept apart: read, it fails the read.
        let mut october = neruba_balances::state::customer_key(b'T', "t", "c");
        push(&mut october, b"l");
        push(
            &mut october,
            neruba_balances::book::statements::key("USD", months[0].0).as_bytes(),
        );
        push(&mut october, b"zz");
        ledger.db.put(october, b"not a line").expect("put");
        let model = ledger.commit_into_model();
        let read = |month: &str| {
            model
                .statements("t", "c", month, |read| {
                    read.statements
                        .iter()
                        .map(|(s, lines)| Ok((s.period_start.clone(), whole(s, lines)?.len())))
                        .collect::<Result<Vec<_>, ReadError>>()
                })
                .and_then(|(read, _)| read.expect("the customer"))
        };
        assert_eq!(
            read("2026-11").expect("November's read"),
            vec![(months[1].0.to_owned(), groups)]
        );
        assert!(matches!(read("2026-10"), Err(ReadError::Storage(_))));
    }

    /// A statement's `lines` as a read hands them over: held, or read whole from where they
    /// are kept.
    fn whole(
        statement: &Statement,
        lines: &Option<[StoredLines<'_>; 2]>,
    ) -> Result<Vec<StatementLine>, ReadError> {
        match lines {
            Some([lines, _]) => lines.read(None, usize::MAX),
            None => Ok(statement.lines.clone()),
        }
    }

    #[test]
    fn a_page_of_an_open_statement_reads_on_from_its_place_across_the_book_and_what_is_kept_apart()
    {
        // An open statement's list kept apart, then some of its lines put back into the book
        // (a later item of their group) and lines the book alone holds (new groups): a read
        // from any place is the list's lines after it, in line order, each once.
        use neruba_balances::state::{BOOK_LINES, Record};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ledger = TestFold::open(dir.path());
        let project = |n: usize| format!("p{}", n * 37);
        let apply = |ledger: &mut TestFold, id: String, n: usize| {
            let mut item = item(&id, "2026-11-01T00:00:00.000Z");
            item.period_end = "2026-12-01T00:00:00.000Z".into();
            item.group = [("project".to_owned(), project(n))].into();
            ledger.apply(&item.encode(), Record::LineItem);
        };
        let kept = BOOK_LINES + 20;
        for n in 0..kept {
            apply(&mut ledger, format!("li_{n}"), n);
        }
        ledger.commit();
        // Every third line again (back in the book), and five new groups.
        for n in (0..kept).step_by(3).chain(kept..kept + 5) {
            apply(&mut ledger, format!("li_again_{n}"), n);
        }
        let model = ledger.commit_into_model();
        let mut want: Vec<String> = (0..kept + 5).map(project).collect();
        want.sort();
        let (read, _) = model
            .statements("t", "c", "2026-11", |read| {
                let [(statement, Some([lines, prior]))] = read.statements.as_slice() else {
                    panic!("one open statement, its lines where they are kept");
                };
                assert!(statement.lines.is_empty());
                assert_eq!(prior.read(None, usize::MAX).expect("prior").len(), 0);
                let groups = |read: Vec<StatementLine>| -> Vec<String> {
                    read.iter().map(|l| l.group["project"].clone()).collect()
                };
                let all = lines.read(None, usize::MAX).expect("whole");
                assert_eq!(groups(all.clone()), want);
                // Amounts as applied: two items on every line taken back, one on the others.
                let twice = (0..kept).step_by(3).map(project).collect::<Vec<_>>();
                for line in &all {
                    let items = if twice.contains(&line.group["project"]) {
                        2
                    } else {
                        1
                    };
                    assert_eq!(line.amount, rust_decimal::Decimal::from(items), "{line:?}");
                }
                // From every place, pages of 1, 7 and all that is left.
                for (at, line) in all.iter().enumerate() {
                    for count in [1, 7, usize::MAX] {
                        let page = lines.read(Some(Place::of(line)), count).expect("page");
                        let rest = &want[at + 1..];
                        assert_eq!(groups(page), rest[..count.min(rest.len())], "{at} {count}");
                    }
                }
                all.len()
            })
            .expect("read");
        assert_eq!(read, Some(kept + 5));
    }

    #[test]
    fn a_statement_read_has_every_line_though_the_book_keeps_most_apart() {
        // Was: the statements read decoded the book alone, so once a customer's statement had
        // more lines than its book keeps, the read showed a statement without most of them.
        use neruba_balances::state::{BOOK_LINES, Record};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ledger = TestFold::open(dir.path());
        // Group values of different lengths: stored keys and the lines' order differ.
        let groups = 2 * BOOK_LINES + 3;
        for n in 0..groups {
            let mut item = item(&format!("li_{n}"), "2026-11-01T00:00:00.000Z");
            item.period_end = "2026-12-01T00:00:00.000Z".into();
            item.group = [("project".to_owned(), format!("p{}", n * 37))].into();
            ledger.apply(&item.encode(), Record::LineItem);
        }
        let model = ledger.commit_into_model();
        let (read, _) = model
            .statements("t", "c", "2026-11", |read| {
                let statements = read.statements.iter();
                statements
                    .map(|(s, lines)| Ok((s.clone(), whole(s, lines)?)))
                    .collect::<Result<Vec<_>, ReadError>>()
            })
            .expect("read");
        let statements = read.expect("the customer").expect("lines");
        let [(statement, lines)] = statements.as_slice() else {
            panic!("one statement: {statements:?}");
        };
        let mut want: Vec<String> = (0..groups).map(|n| format!("p{}", n * 37)).collect();
        want.sort();
        let lines: Vec<&str> = lines.iter().map(|l| l.group["project"].as_str()).collect();
        assert_eq!(lines, want);
        assert_eq!(statement.usage, rust_decimal::Decimal::from(groups));
        // A balance read does not read them.
        let (book, _) = model
            .book("t", "c", neruba_balances::state::Parts::BOOK)
            .expect("read");
        let book = book.expect("the customer");
        assert!(
            book.statements
                .values()
                .all(|s| s.statement.lines.len() <= BOOK_LINES)
        );
    }
}
