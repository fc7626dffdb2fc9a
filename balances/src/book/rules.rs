//! Balance rules: a low-balance threshold per customer and currency, and optionally an
//! automatic top-up request (SPEC "Threshold alerts and auto top-up").
//!
//! Rules:
//! - a rule is checked after every record of the customer (and when it is set): the balance
//!   going from at or above the threshold to below it is a crossing, and emits one
//!   `low_balance` entry; staying below emits nothing; rising to or above it re-arms the rule;
//! - with `recharge_to`, a crossing also emits a `topup_requested` entry for
//!   `recharge_to − available − pending` (SPEC), which is `recharge_to − balance`: at the
//!   partition's clock, the only "now" a fold of the log has, every active grant is either
//!   effective (available) or not yet (pending), since a tick expires each grant whose
//!   `expires_at` it passes and a grant read past its expiry expires at once; unless a request of the rule is still outstanding (at most one
//!   outstanding: a runaway of top-ups cannot happen); the entry's id is the request's id;
//! - a grant whose `key` is an outstanding request's id resolves it (whatever its amount: the
//!   payment side decides), and is applied like any grant, past the customer's bound of grants
//!   holding credit too (it has been paid for);
//! - removing a rule keeps its outstanding request (the payment may be under way): a rule set
//!   again in that currency finds it outstanding and asks for no other until it is resolved
//!   (rule records of version 2 on, [`neruba_schemas::credit::RULE_RECORD_V`]; a version 1
//!   removal drops it, as it did when it was written);
//! - the compared balance is the credit balance of the currency (grants not yet effective
//!   included: they are paid for).

use super::Entries;
use neruba_schemas::credit::{BalanceRule, EntryKind};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A rule and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleState {
    pub rule: BalanceRule,
    /// The balance is below the threshold (the crossing was reported).
    pub below: bool,
    /// The id of the top-up request not yet resolved by a grant.
    pub outstanding: Option<String>,
}

impl RuleState {
    pub fn new(rule: BalanceRule) -> Self {
        Self {
            rule,
            below: false,
            outstanding: None,
        }
    }
}

/// Checks every rule of the book, in currency order.
pub(super) fn check_all(e: &mut Entries<'_>) {
    let currencies: Vec<String> = e.book.rules.keys().cloned().collect();
    for currency in currencies {
        check(e, &currency);
    }
}

fn check(e: &mut Entries<'_>, currency: &str) {
    let balance = e.book.balance(currency);
    let Some(state) = e.book.rules.get_mut(currency) else {
        return;
    };
    if balance >= state.rule.low_balance_threshold {
        state.below = false;
        return;
    }
    if state.below {
        return;
    }
    state.below = true;
    let rule = state.rule.clone();
    let topup = match (rule.recharge_to, &state.outstanding) {
        (Some(to), None) => Some(to - balance),
        _ => None,
    };
    e.push(
        EntryKind::LowBalance,
        currency,
        None,
        None,
        Decimal::ZERO,
        None,
    );
    if let Some(last) = e.last() {
        last.rule = Some(rule.clone());
    }
    let Some(amount) = topup else { return };
    e.push(
        EntryKind::TopupRequested,
        currency,
        None,
        None,
        amount,
        None,
    );
    let request = e.last().map(|last| {
        last.rule = Some(rule);
        last.id.clone()
    });
    if let Some(state) = e.book.rules.get_mut(currency) {
        state.outstanding = request;
    }
}

/// Whether `key` is the id of a top-up request outstanding (of a rule, or of a rule since
/// removed): a grant with that key answers it.
pub(super) fn is_outstanding(book: &super::Book, key: &str) -> bool {
    book.rules
        .values()
        .any(|state| state.outstanding.as_deref() == Some(key))
        || book
            .unresolved_requests
            .values()
            .any(|request| request == key)
}

/// A grant keyed `key` arrived: the request of that id, if one is outstanding (of a rule, or
/// of a rule since removed), is resolved.
pub(super) fn resolve(book: &mut super::Book, key: &str) {
    for state in book.rules.values_mut() {
        if state.outstanding.as_deref() == Some(key) {
            state.outstanding = None;
        }
    }
    book.unresolved_requests.retain(|_, request| request != key);
}
