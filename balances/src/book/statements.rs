//! Statements: per customer, billing period and currency, what the period's line items
//! amounted to, the credit they drew and the amount due (SPEC "Statements").
//!
//! Rules:
//! - a statement opens with the first line item of its period and currency; each item adds
//!   its amount to its meter and group's line (quantity: the item's period-to-date quantity),
//!   and its entries' consumed − restored to `credit_applied`, its uncovered to `amount_due`;
//! - a tick at or past the period's end turns it `draft`, and records when it will be final:
//!   the period's end plus the tick's finalisation delay; a tick at or past that turns it
//!   `final`. Each transition is one entry carrying the statement; a final statement leaves
//!   the book and never changes again;
//! - an item of a period whose statement is final goes to the earliest later statement of
//!   its currency not yet final, as a prior-period adjustment; if there is none yet, it waits
//!   in the book and joins the next statement that opens;
//! - every statement keeps `usage + prior_period_amount = credit_applied + amount_due`;
//! - a statement's lines (and prior-period lines, and lines carried) are in the order of their
//!   meter, group and period start, whatever order their items came in, so the partition
//!   store can keep lines apart from the book and put one back where it was
//!   ([`Book::take_statement_lines`], [`Book::put_line`]).

use super::{Book, Entries};
use neruba_schemas::credit::{
    self, BalanceEntry, EntryKind, Statement, StatementLine, StatementStatus,
};
use neruba_schemas::event::parse_time_ms;
use neruba_schemas::ledger::LineItem;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

/// A statement not yet final, with its times as numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementState {
    pub statement: Statement,
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    /// Set when it turned draft.
    pub final_at_ms: Option<i64>,
}

impl StatementState {
    /// When a tick next changes it: the period's end while open, the finalisation once draft.
    pub fn deadline(&self) -> i64 {
        self.final_at_ms.unwrap_or(self.period_end_ms)
    }
}

/// Prior-period adjustments waiting for a statement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    pub lines: Vec<StatementLine>,
    #[serde(with = "neruba_schemas::decimal::stored")]
    pub amount: Decimal,
    #[serde(with = "neruba_schemas::decimal::stored")]
    pub credit_applied: Decimal,
    #[serde(with = "neruba_schemas::decimal::stored")]
    pub amount_due: Decimal,
}

/// The book's key of a statement: currency and period start, unambiguously (a JSON array;
/// period starts are RFC 3339 UTC of one form, so the keys sort by currency, then period).
pub fn key(currency: &str, period_start: &str) -> String {
    serde_json::to_string(&(currency, period_start)).unwrap_or_default()
}

/// Where a line is: a statement's own lines or its prior-period lines (by statement key,
/// [`key`]), or the lines carried in a currency until a statement opens.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LineList {
    Lines(String),
    Prior(String),
    Carried(String),
}

impl LineList {
    /// The list's kind as a byte and its statement key or currency: its part of a stored key.
    pub fn parts(&self) -> (u8, &str) {
        match self {
            Self::Lines(key) => (b'l', key),
            Self::Prior(key) => (b'p', key),
            Self::Carried(currency) => (b'c', currency),
        }
    }

    /// The list of [`LineList::parts`].
    pub fn from_parts(kind: u8, name: String) -> Option<Self> {
        match kind {
            b'l' => Some(Self::Lines(name)),
            b'p' => Some(Self::Prior(name)),
            b'c' => Some(Self::Carried(name)),
            _ => None,
        }
    }
}

/// Where a line item goes on its customer's statements ([`Book::route_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To the line of its meter and group on `list`.
    To(LineList),
    /// It opens its period's statement, which takes the lines carried in its currency.
    Opens,
}

/// The order of lines in a list: by meter, group and period start.
pub fn line_order(
    line: &StatementLine,
    meter: &str,
    group: &GroupKey,
    period_start: &str,
) -> Ordering {
    (line.meter.as_str(), &line.group, line.period_start.as_str()).cmp(&(
        meter,
        group,
        period_start,
    ))
}

type GroupKey = std::collections::BTreeMap<String, String>;

/// Puts `line` into `lines` at its place in [`line_order`] (replacing one of the same meter,
/// group and period start).
pub(super) fn insert_line(lines: &mut Vec<StatementLine>, line: StatementLine) {
    match lines.binary_search_by(|l| line_order(l, &line.meter, &line.group, &line.period_start)) {
        Ok(at) => {
            if let Some(slot) = lines.get_mut(at) {
                *slot = line;
            }
        }
        Err(at) => lines.insert(at, line),
    }
}

/// Adds `item` to `lines`: its amount, the credit it drew and what is due of it to the line of
/// its meter, group and period, the quantity replaced by the item's period-to-date one.
fn add_line(lines: &mut Vec<StatementLine>, item: &LineItem, credit: Decimal, due: Decimal) {
    let at =
        lines.binary_search_by(|l| line_order(l, &item.meter, &item.group, &item.period_start));
    match at {
        Ok(at) => {
            if let Some(line) = lines.get_mut(at) {
                line.quantity = item.period_quantity;
                line.amount += item.amount;
                line.credit_applied += credit;
                line.amount_due += due;
            }
        }
        Err(at) => lines.insert(
            at,
            StatementLine {
                meter: item.meter.clone(),
                group: item.group.clone(),
                period_start: item.period_start.clone(),
                quantity: item.period_quantity,
                amount: item.amount,
                credit_applied: credit,
                amount_due: due,
            },
        ),
    }
}

/// Puts `lines` in [`line_order`].
fn sort(lines: &mut [StatementLine]) {
    lines.sort_by(|a, b| line_order(a, &b.meter, &b.group, &b.period_start));
}

/// Puts every list of lines in `book` in [`line_order`]: books stored before kept them in the
/// order their items came in.
pub(super) fn sort_lines(book: &mut Book) {
    for state in book.statements.values_mut() {
        sort(&mut state.statement.lines);
        sort(&mut state.statement.prior_period);
    }
    for carried in book.carried.values_mut() {
        sort(&mut carried.lines);
    }
}

/// `value`, with the sign of a zero dropped (its scale kept).
fn unsigned_zero(value: Decimal) -> Decimal {
    if value.is_zero() { value.abs() } else { value }
}

impl Book {
    /// Where `item` goes on the customer's statements: its period's statement while that is
    /// not final, else the earliest later one of its currency not final (a prior-period
    /// adjustment), else the lines carried in its currency; `None` for an item whose period
    /// cannot be read (it goes on no statement).
    pub fn route_of(&self, item: &LineItem) -> Option<Route> {
        let end_ms = parse_time_ms(&item.period_end).ok()?;
        parse_time_ms(&item.period_start).ok()?;
        let own = key(&item.currency, &item.period_start);
        if self.statements.contains_key(&own) {
            return Some(Route::To(LineList::Lines(own)));
        }
        let is_final = self
            .final_through
            .get(&item.currency)
            .is_some_and(|through| end_ms <= *through);
        if !is_final {
            return Some(Route::Opens);
        }
        let later = self
            .statements
            .iter()
            .filter(|(_, s)| s.statement.currency == item.currency && s.period_start_ms >= end_ms)
            .min_by_key(|(_, s)| s.period_start_ms);
        Some(Route::To(match later {
            Some((later, _)) => LineList::Prior(later.clone()),
            None => LineList::Carried(item.currency.clone()),
        }))
    }

    /// The lines of `list`, if the book has it.
    fn lines_mut(&mut self, list: &LineList) -> Option<&mut Vec<StatementLine>> {
        match list {
            LineList::Lines(k) => self.statements.get_mut(k).map(|s| &mut s.statement.lines),
            LineList::Prior(k) => self
                .statements
                .get_mut(k)
                .map(|s| &mut s.statement.prior_period),
            LineList::Carried(currency) => self.carried.get_mut(currency).map(|c| &mut c.lines),
        }
    }

    /// Whether `list` holds the line of `item`'s meter, group and period (`false` too if the
    /// book has no such list).
    pub fn holds_line_of(&self, list: &LineList, item: &LineItem) -> bool {
        let lines = match list {
            LineList::Lines(k) => self.statements.get(k).map(|s| &s.statement.lines),
            LineList::Prior(k) => self.statements.get(k).map(|s| &s.statement.prior_period),
            LineList::Carried(currency) => self.carried.get(currency).map(|c| &c.lines),
        };
        lines.is_some_and(|lines| {
            lines
                .binary_search_by(|l| line_order(l, &item.meter, &item.group, &item.period_start))
                .is_ok()
        })
    }

    /// Puts a line kept apart back on `list`, at its place; `false` if the book has no such
    /// list (its statement went final: the line is of no use any more).
    pub fn put_line(&mut self, list: &LineList, line: StatementLine) -> bool {
        match self.lines_mut(list) {
            Some(lines) => {
                insert_line(lines, line);
                true
            }
            None => false,
        }
    }

    /// Puts lines kept apart back on `list` (sorting it once); `false` if the book has no such
    /// list.
    pub fn put_lines(&mut self, list: &LineList, mut lines: Vec<StatementLine>) -> bool {
        if lines.is_empty() {
            return true;
        }
        match self.lines_mut(list) {
            Some(held) => {
                held.append(&mut lines);
                sort(held);
                true
            }
            None => false,
        }
    }

    /// Takes every line out of each list holding more than `keep`, and returns them with their
    /// list. The fold touches a line only for an item of its meter and group (and reads a
    /// statement's lines whole only when it turns draft or final), so the partition store can
    /// keep these apart and put one back before ([`Book::route_of`],
    /// [`Book::statement_keys_due`]): a customer sending a new group value with every event
    /// does not make each of its items dearer, nor its book larger, than the last.
    pub fn take_statement_lines(&mut self, keep: usize) -> Vec<(LineList, StatementLine)> {
        let mut out = Vec::new();
        // Called for every record: a list's name is built only when its lines are taken.
        let mut take = |list: &dyn Fn() -> LineList, lines: &mut Vec<StatementLine>| {
            if lines.len() > keep {
                out.extend(lines.drain(..).map(|line| (list(), line)));
            }
        };
        for (k, state) in &mut self.statements {
            take(&|| LineList::Lines(k.clone()), &mut state.statement.lines);
            take(
                &|| LineList::Prior(k.clone()),
                &mut state.statement.prior_period,
            );
        }
        for (currency, carried) in &mut self.carried {
            take(&|| LineList::Carried(currency.clone()), &mut carried.lines);
        }
        out
    }

    /// The keys of the statements a tick at `at_ms` turns draft or final.
    pub fn statement_keys_due(&self, at_ms: i64) -> Vec<String> {
        self.statements
            .iter()
            .filter(|(_, s)| s.deadline() <= at_ms)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Puts a line item, and what its entries did, on its statement, by its `route`
    /// ([`Book::route_of`]).
    pub(super) fn note_on_statement(
        &mut self,
        item: &LineItem,
        entries: &[BalanceEntry],
        route: Option<Route>,
    ) {
        // Zero is written `0`, never `-0` (the negation of no credit): `-0` reads back as `0`,
        // so a statement would print differently after a restart than in one run.
        let credit: Decimal = unsigned_zero(
            -entries
                .iter()
                .filter(|e| matches!(e.kind, EntryKind::Consume | EntryKind::Restore))
                .map(|e| e.amount)
                .sum::<Decimal>(),
        );
        let due: Decimal = unsigned_zero(
            entries
                .iter()
                .filter(|e| e.kind == EntryKind::Uncovered)
                .map(|e| e.amount)
                .sum(),
        );
        let Some(route) = route else {
            return;
        };
        let list = match route {
            Route::To(list) => list,
            Route::Opens => {
                self.open_statement(item, credit, due);
                return;
            }
        };
        match &list {
            LineList::Lines(k) | LineList::Prior(k) => {
                let Some(state) = self.statements.get_mut(k) else {
                    return;
                };
                let s = &mut state.statement;
                if matches!(list, LineList::Lines(_)) {
                    add_line(&mut s.lines, item, credit, due);
                    s.usage += item.amount;
                } else {
                    add_line(&mut s.prior_period, item, credit, due);
                    s.prior_period_amount += item.amount;
                }
                s.credit_applied += credit;
                s.amount_due += due;
            }
            LineList::Carried(currency) => {
                let carried = self.carried.entry(currency.clone()).or_default();
                add_line(&mut carried.lines, item, credit, due);
                carried.amount += item.amount;
                carried.credit_applied += credit;
                carried.amount_due += due;
            }
        }
    }

    /// Opens `item`'s period's statement with it, taking the lines carried in its currency.
    fn open_statement(&mut self, item: &LineItem, credit: Decimal, due: Decimal) {
        let (Ok(start_ms), Ok(end_ms)) = (
            parse_time_ms(&item.period_start),
            parse_time_ms(&item.period_end),
        ) else {
            return;
        };
        let own = key(&item.currency, &item.period_start);
        let carried = self.carried.remove(&item.currency).unwrap_or_default();
        let mut lines = Vec::new();
        add_line(&mut lines, item, credit, due);
        let statement = Statement {
            id: credit::statement_id(
                &item.tenant,
                &item.customer,
                &item.currency,
                &item.period_start,
            ),
            currency: item.currency.clone(),
            period_start: item.period_start.clone(),
            period_end: item.period_end.clone(),
            status: StatementStatus::Open,
            lines,
            prior_period: carried.lines,
            usage: item.amount,
            prior_period_amount: carried.amount,
            credit_applied: credit + carried.credit_applied,
            amount_due: due + carried.amount_due,
        };
        self.statements.insert(
            own,
            Box::new(StatementState {
                statement,
                period_start_ms: start_ms,
                period_end_ms: end_ms,
                final_at_ms: None,
            }),
        );
    }
}

/// Turns the statements a tick at `at_ms` reaches draft, then final, in key order.
pub(super) fn advance(e: &mut Entries<'_>, at_ms: i64, finalize_after_ms: i64) {
    let keys = e.book.statement_keys_due(at_ms);
    for k in keys {
        let Some(state) = e.book.statements.get_mut(&k) else {
            continue;
        };
        if state.final_at_ms.is_none() && state.period_end_ms <= at_ms {
            state.final_at_ms = Some(state.period_end_ms.saturating_add(finalize_after_ms));
            state.statement.status = StatementStatus::Draft;
            let statement = state.statement.clone();
            transition(e, EntryKind::StatementDraft, statement);
        }
        let Some(state) = e.book.statements.get_mut(&k) else {
            continue;
        };
        if state.final_at_ms.is_some_and(|at| at <= at_ms) {
            let Some(mut state) = e.book.statements.remove(&k) else {
                continue;
            };
            state.statement.status = StatementStatus::Final;
            let through = e
                .book
                .final_through
                .entry(state.statement.currency.clone())
                .or_insert(i64::MIN);
            *through = (*through).max(state.period_end_ms);
            transition(e, EntryKind::StatementFinal, state.statement);
        }
    }
}

/// Most bytes of a statement's JSON its entry carries whole on the topic. A statement of more
/// (a customer with thousands of groups, or long group values) made an entry larger than a
/// producer sends (1,000,000 bytes by default): never acknowledged, it held every partition of
/// the stage's worker for good, and a replay met it again. Such a statement's entry has `code`
/// [`LINES_OMITTED`] and goes on the topic with the totals and without the lines
/// ([`on_the_topic`]); the fold keeps it whole, and so does the api's read model for its
/// statements read (its entries read answers the entry as on the topic).
pub const STATEMENT_ENTRY_MAX: usize = 512 * 1024;
/// The `code` of a statement entry whose statement's lines are left out on the topic.
pub const LINES_OMITTED: &str = "statement_lines_omitted";

fn transition(e: &mut Entries<'_>, kind: EntryKind, statement: Statement) {
    let currency = statement.currency.clone();
    let whole = serde_json::to_vec(&statement).is_ok_and(|json| json.len() <= STATEMENT_ENTRY_MAX);
    let code = (!whole).then_some(LINES_OMITTED);
    e.push(kind, &currency, None, None, statement.amount_due, code);
    if let Some(last) = e.last() {
        last.statement = Some(Box::new(statement));
    }
}

/// `entry` as the stage writes it to the topic: a statement entry coded [`LINES_OMITTED`]
/// without its statement's lines, any other as it is.
pub fn on_the_topic(entry: &BalanceEntry) -> std::borrow::Cow<'_, BalanceEntry> {
    match &entry.statement {
        Some(statement) if entry.code.as_deref() == Some(LINES_OMITTED) => {
            let mut entry = entry.clone();
            entry.statement = Some(Box::new(Statement {
                lines: Vec::new(),
                prior_period: Vec::new(),
                ..statement.as_ref().clone()
            }));
            std::borrow::Cow::Owned(entry)
        }
        _ => std::borrow::Cow::Borrowed(entry),
    }
}
