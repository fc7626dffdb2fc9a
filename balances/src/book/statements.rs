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
//! - every statement keeps `usage + prior_period_amount = credit_applied + amount_due`.

use super::{Book, Entries};
use neruba_schemas::credit::{
    self, BalanceEntry, EntryKind, Statement, StatementLine, StatementStatus,
};
use neruba_schemas::event::parse_time_ms;
use neruba_schemas::ledger::LineItem;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

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

/// Adds `item` to `lines`: its amount, the credit it drew and what is due of it to the line of
/// its meter, group and period, the quantity replaced by the item's period-to-date one.
fn add_line(lines: &mut Vec<StatementLine>, item: &LineItem, credit: Decimal, due: Decimal) {
    let line = lines.iter_mut().find(|l| {
        l.meter == item.meter && l.group == item.group && l.period_start == item.period_start
    });
    match line {
        Some(line) => {
            line.quantity = item.period_quantity;
            line.amount += item.amount;
            line.credit_applied += credit;
            line.amount_due += due;
        }
        None => lines.push(StatementLine {
            meter: item.meter.clone(),
            group: item.group.clone(),
            period_start: item.period_start.clone(),
            quantity: item.period_quantity,
            amount: item.amount,
            credit_applied: credit,
            amount_due: due,
        }),
    }
}

/// `value`, with the sign of a zero dropped (its scale kept).
fn unsigned_zero(value: Decimal) -> Decimal {
    if value.is_zero() { value.abs() } else { value }
}

impl Book {
    /// Puts a line item, and what its entries did, on its statement.
    pub(super) fn note_on_statement(&mut self, item: &LineItem, entries: &[BalanceEntry]) {
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
        let (Ok(start_ms), Ok(end_ms)) = (
            parse_time_ms(&item.period_start),
            parse_time_ms(&item.period_end),
        ) else {
            return;
        };
        let own = key(&item.currency, &item.period_start);
        if let Some(state) = self.statements.get_mut(&own) {
            let s = &mut state.statement;
            add_line(&mut s.lines, item, credit, due);
            s.usage += item.amount;
            s.credit_applied += credit;
            s.amount_due += due;
            return;
        }
        let is_final = self
            .final_through
            .get(&item.currency)
            .is_some_and(|through| end_ms <= *through);
        if is_final {
            let later = self
                .statements
                .values_mut()
                .filter(|s| s.statement.currency == item.currency && s.period_start_ms >= end_ms)
                .min_by_key(|s| s.period_start_ms);
            match later {
                Some(state) => {
                    let s = &mut state.statement;
                    add_line(&mut s.prior_period, item, credit, due);
                    s.prior_period_amount += item.amount;
                    s.credit_applied += credit;
                    s.amount_due += due;
                }
                None => {
                    let carried = self.carried.entry(item.currency.clone()).or_default();
                    add_line(&mut carried.lines, item, credit, due);
                    carried.amount += item.amount;
                    carried.credit_applied += credit;
                    carried.amount_due += due;
                }
            }
            return;
        }
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
            StatementState {
                statement,
                period_start_ms: start_ms,
                period_end_ms: end_ms,
                final_at_ms: None,
            },
        );
    }
}

/// Turns the statements a tick at `at_ms` reaches draft, then final, in key order.
pub(super) fn advance(e: &mut Entries<'_>, at_ms: i64, finalize_after_ms: i64) {
    let keys: Vec<String> = e
        .book
        .statements
        .iter()
        .filter(|(_, s)| s.deadline() <= at_ms)
        .map(|(k, _)| k.clone())
        .collect();
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
/// ([`on_the_topic`]); the fold (and so the api's read model) keeps it whole.
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
