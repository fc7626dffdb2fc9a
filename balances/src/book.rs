//! One customer's credit book: the grants, the balance per currency, and what each usage
//! series drew from where. A pure fold: each record of the customer's ledger (line item,
//! grant, void, tick) changes the book and yields balance entries, and nothing else does.
//!
//! Rules (SPEC "Money state"):
//! - a positive line-item amount consumes the eligible grants in burn-down order ([`burn_order`]):
//!   priority ascending, then expiry ascending (never-expiring last), then effective time,
//!   then grant id; eligible means same currency, active, and `effective_at ≤ window start <
//!   expires_at`. Whatever no grant covers is `uncovered` (the amount due);
//! - a negative amount unwinds its series' allocations (same meter, group, billing period and
//!   currency) in reverse: `uncovered` first, then the grants drawn on, last drawn first.
//!   Credit given back to a grant that has since expired or been voided expires again at
//!   once (on a voided grant of record version 1 or 2 it is voided again). What is left
//!   after all allocations is a negative `uncovered` (owed back);
//! - a grant repeated with the same terms changes nothing; with other terms it is refused
//!   (`key_conflict`), and so is a new one past the customer's bound of grants holding credit
//!   ([`MAX_CREDIT_GRANTS`], [`MAX_CREDIT_GRANT_BYTES`]: `too_many_grants`) unless it answers
//!   an outstanding top-up request; a refused grant sent again, refused for the same reason,
//!   adds no entry ([`Book::refused`]); a void voids what is left, and one of a grant the
//!   customer does not have is refused (`unknown_grant`; sent again, no entry); a tick expires
//!   every grant whose `expires_at` + grace it passed;
//! - the balance moves only by `grant`, `consume`, `restore`, `expire` and `void` entries, and
//!   each entry's `balance_before` is the previous one's `balance_after` in its currency;
//! - after every record, each of the customer's balance rules is checked ([`rules`]): one
//!   `low_balance` per crossing below the threshold, at most one `topup_requested` outstanding;
//! - every line item lands on one statement ([`statements`]): its period's while that is not
//!   final, else the next one as a prior-period adjustment; ticks turn statements `draft` and
//!   then `final`, one entry each.

use neruba_schemas::credit::{self, BalanceEntry, EntryKind, Grant, RuleRecord, Series, Void};
use neruba_schemas::ledger::LineItem;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use statements::Route;
use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};

/// What became of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Active,
    Expired,
    Voided,
}

/// A grant and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantState {
    pub grant: Grant,
    pub status: Status,
    #[serde(with = "neruba_schemas::decimal::stored")]
    pub remaining: Decimal,
    #[serde(with = "neruba_schemas::decimal::stored")]
    pub consumed: Decimal,
    #[serde(with = "neruba_schemas::decimal::stored")]
    pub restored: Decimal,
    #[serde(with = "neruba_schemas::decimal::stored")]
    pub expired: Decimal,
    #[serde(with = "neruba_schemas::decimal::stored")]
    pub voided: Decimal,
}

impl GrantState {
    /// Holds no credit, and gets some only if a correction gives it back: ended (expired or
    /// voided), or active and drawn down to nothing. Nothing draws on a spent grant, so the
    /// partition store may keep it apart from its book ([`Book::take_spent_grants`]).
    pub fn is_spent(&self) -> bool {
        self.status != Status::Active || self.remaining.is_zero()
    }

    /// A spent grant read back from where it was kept apart, the partition's clock standing at
    /// `clock_ms`: drawn down to nothing and past its expiry, it is expired, as the tick that
    /// passed its expiry made it in its book (without an entry: it held nothing). A
    /// correction giving it credit back then expires that credit again at once, and a void
    /// changes nothing, exactly as in a book that kept it. (The partition applies ticks and
    /// grants with no grace of its own: a tick is stamped that much earlier.)
    pub fn settle(&mut self, clock_ms: i64) {
        if self.status == Status::Active
            && self.remaining.is_zero()
            && self
                .grant
                .terms
                .expires_ms()
                .is_some_and(|end| end <= clock_ms)
        {
            self.status = Status::Expired;
        }
    }
}

/// Where part of a line item's amount went: a grant, or `None` for uncovered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub grant: Option<String>,
    #[serde(with = "neruba_schemas::decimal::stored")]
    pub amount: Decimal,
}

/// One customer's book.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Book {
    /// The last entry's sequence number (per customer, across currencies).
    pub seq: u64,
    /// Each boxed: a map's node holds room for 11 values, so a customer's two grants took
    /// the room of 11 grant states (4 KiB) unboxed.
    pub grants: BTreeMap<String, Box<GrantState>>,
    /// Credit balance per currency.
    #[serde(with = "neruba_schemas::decimal::stored::map")]
    pub balances: BTreeMap<String, Decimal>,
    /// Allocations per series, in the order they were made; adjacent ones from the same
    /// source are merged (unwinding takes from the newest, so merging keeps the order). The
    /// partition store keeps only the newest series here and the older ones apart
    /// ([`Book::take_oldest_series`]), putting one back before an item of it is applied.
    pub series: BTreeMap<String, Vec<Allocation>>,
    /// Balance rules per currency.
    #[serde(default)]
    pub rules: BTreeMap<String, rules::RuleState>,
    /// Per currency, the top-up request of a rule since removed, until a grant resolves it: a
    /// rule set again in the currency finds it outstanding, and does not ask twice.
    #[serde(default)]
    pub unresolved_requests: BTreeMap<String, String>,
    /// Statements not yet final, by currency and period ([`statements::key`]).
    #[serde(default)]
    /// Boxed, as grants are.
    pub statements: BTreeMap<String, Box<statements::StatementState>>,
    /// Per currency, the end of the latest final statement's period: items of periods ending
    /// at or before it are carried to a later statement.
    #[serde(default)]
    pub final_through: BTreeMap<String, i64>,
    /// Per currency, prior-period adjustments waiting for a later statement to open.
    #[serde(default)]
    pub carried: BTreeMap<String, statements::Carried>,
    /// The newest refusals of grants of record version 3 on and of voids of version 2 on
    /// ([`Refusal`]), oldest first, at most [`REMEMBERED_REFUSALS`]: the same grant refused
    /// for the same reason again, or a void of the same unknown grant, adds no entry. Stored
    /// after the rest of the book ([`Book::encode`]), so a book that remembers none is stored
    /// as before.
    #[serde(skip)]
    pub refused: VecDeque<Refusal>,
}

/// A refusal as its book remembers it: the first 16 bytes of the SHA-256 of, postcard-encoded
/// (each part length-prefixed, so unambiguous, and the code first, so the two forms never
/// meet): for a grant, the code, the key and the terms, the amounts without trailing zeros
/// (terms equal as compared, `6` and `6.0`, give one digest); for a void of an unknown grant,
/// `unknown_grant` and the grant id. What a replay must reproduce, so these encodings are
/// fixed: changing one needs a new record version ([`credit::GRANT_REFUSAL_KEPT_V`],
/// [`credit::VOID_RECORD_V`]).
pub type Refusal = [u8; 16];

/// Refusals a book remembers: past them, the oldest is forgotten, and its grant sent again is
/// refused again with an entry. Bounded, as the book is written after every record.
pub const REMEMBERED_REFUSALS: usize = 64;

/// `grant` refused with `code`, as its book remembers it; `None` if it cannot be encoded (it
/// is then refused with an entry each time, as before).
fn refusal_of(grant: &Grant, code: &str) -> Option<Refusal> {
    let mut terms = grant.terms.clone();
    terms.amount = terms.amount.normalize();
    if let Some(paid) = &mut terms.paid {
        paid.amount = paid.amount.normalize();
    }
    digest(&(code, &grant.key, &terms))
}

/// A void of the unknown grant `grant`, as its book remembers it once refused.
fn void_refusal_of(grant: &str) -> Option<Refusal> {
    digest(&(UNKNOWN_GRANT, grant))
}

/// The first 16 bytes of the SHA-256 of `value` in postcard.
fn digest(value: &impl Serialize) -> Option<Refusal> {
    let bytes = postcard::to_allocvec(value).ok()?;
    Sha256::digest(bytes)[..16].try_into().ok()
}

/// The code of a void of a grant the customer does not have.
const UNKNOWN_GRANT: &str = "unknown_grant";

/// Grants holding credit ([`GrantState::is_spent`] not) a customer may have, all currencies
/// together; a new one past it is refused (`too_many_grants`) until one is spent. The book
/// holds every such grant (spent ones are kept apart), each line item looks through them and
/// the book is written after every record: without a bound, a client granting without end
/// would make each of the customer's items dearer until the stage stalled. Grants of record
/// version [`credit::GRANT_BOUNDED_V`] on are bounded; a grant answering an outstanding top-up
/// request never is (the customer has paid for it).
pub const MAX_CREDIT_GRANTS: usize = 1_000;

/// Bytes of keys and metadata ([`held_bytes`]) the grants holding credit may have together,
/// bounded for the same reason (one grant's metadata may hold 32 KiB).
pub const MAX_CREDIT_GRANT_BYTES: usize = 256 << 10;

/// The code of a grant refused for the customer's bound ([`MAX_CREDIT_GRANTS`],
/// [`MAX_CREDIT_GRANT_BYTES`]).
pub const TOO_MANY_GRANTS: &str = "too_many_grants";

/// What a grant counts against [`MAX_CREDIT_GRANT_BYTES`]: its key and metadata.
pub fn held_bytes(grant: &Grant) -> usize {
    grant.key.len()
        + grant
            .terms
            .metadata
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum::<usize>()
}

/// A book's stored form's first byte: [`postcard`] (compact binary serde) follows. Books
/// written before were JSON, whose first byte is `{`; both read back ([`Book::decode`]).
const STORED_POSTCARD: u8 = 0xB1;

/// In a book's stored form, after the book: the tag of the refusals it remembers
/// ([`Book::refused`], postcard). Any other tag there is refused as corrupt, so a later
/// addition is told apart from them.
const STORED_REFUSALS: u8 = 0x01;

/// Bytes reserved for a book's stored form: a typical book fits without growing the buffer.
const ENCODE_CAPACITY: usize = 1024;

impl Book {
    /// Whether the book remembers `refusal`; if not, it does from now on (forgetting the
    /// oldest past [`REMEMBERED_REFUSALS`]).
    fn refused_before(&mut self, refusal: Refusal) -> bool {
        if self.refused.contains(&refusal) {
            return true;
        }
        if self.refused.len() >= REMEMBERED_REFUSALS {
            self.refused.pop_front();
        }
        self.refused.push_back(refusal);
        false
    }

    /// The stored form: a tag byte and the book in postcard, then, if it remembers refusals,
    /// a tag byte and those in postcard (a book remembering none is stored as before
    /// they were; a release before reads the book and passes over what follows). Written for
    /// every book a batch changed, so it is kept small and cheap (JSON was half of the stage's
    /// CPU per line item).
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        // Through `io::Write` into a buffer sized for a typical book: each field's bytes are
        // copied at once (postcard's `Extend` flavor copied them a byte at a time into a buffer
        // grown from one byte, and encoding books was a fifth of the state machine's time).
        let mut out = Vec::with_capacity(ENCODE_CAPACITY);
        out.push(STORED_POSTCARD);
        let mut out = postcard::to_io(self, out)?;
        if self.refused.is_empty() {
            return Ok(out);
        }
        out.push(STORED_REFUSALS);
        postcard::to_io(&self.refused, out)
    }

    /// A book from its stored form ([`Book::encode`], or JSON as written before).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut book: Self = match bytes.split_first() {
            Some((&STORED_POSTCARD, body)) => {
                let (mut book, rest) =
                    postcard::take_from_bytes::<Self>(body).map_err(|e| e.to_string())?;
                match rest.split_first() {
                    None => {}
                    Some((&STORED_REFUSALS, refused)) => {
                        let (refused, rest) =
                            postcard::take_from_bytes(refused).map_err(|e| e.to_string())?;
                        if !rest.is_empty() {
                            return Err(format!("{} bytes after the book's refusals", rest.len()));
                        }
                        book.refused = refused;
                    }
                    Some((tag, _)) => return Err(format!("an unknown part after the book: {tag}")),
                }
                book
            }
            _ => serde_json::from_slice(bytes).map_err(|e| e.to_string())?,
        };
        // Books stored before kept statement lines in the order their items came in.
        statements::sort_lines(&mut book);
        Ok(book)
    }
}

/// A grant's place in burn-down order: priority, expiry (none last), effective time, id;
/// its terms fix it for good.
pub type BurnPlace<'a> = (u16, i64, i64, &'a str);

/// The place of `grant` in burn-down order.
pub fn burn_place(grant: &Grant) -> BurnPlace<'_> {
    (
        grant.terms.priority,
        grant.terms.expires_ms().unwrap_or(i64::MAX),
        grant.terms.effective_ms(),
        &grant.id,
    )
}

/// The burn-down order's sort key of a grant: [`burn_place`], owned.
pub fn burn_order(grant: &Grant) -> (u16, i64, i64, String) {
    let (priority, expires, effective, id) = burn_place(grant);
    (priority, expires, effective, id.to_owned())
}

/// A place of [`burn_order`], borrowed as a [`BurnPlace`].
pub fn borrowed_place(place: &(u16, i64, i64, String)) -> BurnPlace<'_> {
    let (priority, expires, effective, id) = place;
    (*priority, *expires, *effective, id)
}

/// A series' key: currency, meter, group and billing period, unambiguously (a JSON array):
/// the key [`Book::series_key_of`] gives the series' items.
#[cfg(test)]
fn series_key(currency: &str, series: &Series) -> String {
    serde_json::to_string(&(currency, &series.meter, &series.group, &series.period_start))
        .unwrap_or_default()
}

/// The billing period start in a series key, to tell old series from new.
fn series_period(key: &str) -> String {
    serde_json::from_str::<(String, String, serde_json::Value, String)>(key)
        .map(|(_, _, _, period)| period)
        .unwrap_or_default()
}

/// Builds the entries of one cause, numbering them.
struct Entries<'a> {
    book: &'a mut Book,
    tenant: &'a str,
    customer: &'a str,
    cause: Cow<'a, str>,
    out: Vec<BalanceEntry>,
}

impl Entries<'_> {
    /// The entry pushed last.
    fn last(&mut self) -> Option<&mut BalanceEntry> {
        self.out.last_mut()
    }

    /// Appends an entry; `amount` moves the balance if the kind does
    /// ([`EntryKind::moves_balance`]).
    fn push(
        &mut self,
        kind: EntryKind,
        currency: &str,
        grant: Option<&str>,
        series: Option<&Series>,
        amount: Decimal,
        code: Option<&str>,
    ) {
        let before = self.book.balance(currency);
        // A refused grant or void neither moves the balance nor opens one in its currency.
        let after = if kind.moves_balance() {
            let after = before + amount;
            match self.book.balances.get_mut(currency) {
                Some(balance) => *balance = after,
                None => {
                    self.book.balances.insert(currency.to_owned(), after);
                }
            }
            after
        } else {
            before
        };
        self.book.seq += 1;
        let ordinal = self.book.seq;
        self.out.push(BalanceEntry {
            v: 1,
            id: credit::entry_id(
                self.tenant,
                self.customer,
                &self.cause,
                grant,
                kind,
                ordinal,
            ),
            tenant: self.tenant.to_owned(),
            customer: self.customer.to_owned(),
            seq: self.book.seq,
            kind,
            currency: currency.to_owned(),
            cause: self.cause.as_ref().to_owned(),
            grant: grant.map(str::to_owned),
            series: series.cloned(),
            amount,
            balance_before: before,
            balance_after: after,
            code: code.map(str::to_owned),
            rule: None,
            statement: None,
        });
    }
}

fn allocate(stack: &mut Vec<Allocation>, grant: Option<&str>, amount: Decimal) {
    match stack.last_mut() {
        Some(last) if last.grant.as_deref() == grant => last.amount += amount,
        _ => stack.push(Allocation {
            grant: grant.map(str::to_owned),
            amount,
        }),
    }
}

impl Book {
    fn entries<'a>(
        &'a mut self,
        tenant: &'a str,
        customer: &'a str,
        cause: impl Into<Cow<'a, str>>,
    ) -> Entries<'a> {
        Entries {
            book: self,
            tenant,
            customer,
            cause: cause.into(),
            out: Vec::new(),
        }
    }

    /// The key of the series `item` belongs to ([`Book::series`]).
    pub fn series_key_of(item: &LineItem) -> String {
        serde_json::to_string(&(&item.currency, &item.meter, &item.group, &item.period_start))
            .unwrap_or_default()
    }

    /// If the book holds more than `keep` series, takes the ones of the oldest billing periods
    /// out of it until `keep` are left, and returns them. The fold never needs a series it
    /// does not hold an item of, so its store can keep these apart and put one back
    /// ([`Book::series`]) before an item of it is applied: a customer's book then stays the
    /// same size however long its history grows.
    pub fn take_oldest_series(&mut self, keep: usize) -> Vec<(String, Vec<Allocation>)> {
        if self.series.len() <= keep {
            return Vec::new();
        }
        let mut by_age: Vec<(String, String)> = self
            .series
            .keys()
            .map(|key| (series_period(key), key.clone()))
            .collect();
        by_age.sort();
        let excess = self.series.len() - keep;
        by_age
            .into_iter()
            .take(excess)
            .filter_map(|(_, key)| self.series.remove(&key).map(|stack| (key, stack)))
            .collect()
    }

    /// Takes out of the book the spent grants ([`GrantState::is_spent`]: ended, or drawn down
    /// to nothing) beyond the newest `keep`, so a customer who buys credit every month, or
    /// tops up every hour, does not write every pack ever bought after each line item. A
    /// spent grant changes again only by a record naming it (a repeated grant or a void of
    /// it), by a correction restoring credit to it (the partition store puts it back first,
    /// [`crate::state`]), or, if drawn down before its expiry, by a tick passing that expiry,
    /// which changes no balance and is settled when it is read back
    /// ([`GrantState::settle`]). Oldest first: by expiry, then effective time, then id.
    pub fn take_spent_grants(&mut self, keep: usize) -> Vec<(String, GrantState)> {
        let spent = self.grants.values().filter(|g| g.is_spent()).count();
        if spent <= keep {
            return Vec::new();
        }
        let mut by_age: Vec<(i64, i64, &str)> = self
            .grants
            .values()
            .filter(|g| g.is_spent())
            .map(|g| {
                (
                    g.grant.terms.expires_ms().unwrap_or(i64::MAX),
                    g.grant.terms.effective_ms(),
                    g.grant.id.as_str(),
                )
            })
            .collect();
        by_age.sort_unstable();
        let oldest: Vec<String> = by_age
            .into_iter()
            .take(spent - keep)
            .map(|(_, _, id)| id.to_owned())
            .collect();
        oldest
            .into_iter()
            .filter_map(|id| self.grants.remove(&id).map(|state| (id, *state)))
            .collect()
    }

    /// Whether the grants holding credit, with `grant` besides, would pass the customer's
    /// bound ([`MAX_CREDIT_GRANTS`], [`MAX_CREDIT_GRANT_BYTES`]).
    fn holds_too_many_with(&self, grant: &Grant) -> bool {
        let (count, bytes) = self
            .grants
            .values()
            .filter(|g| !g.is_spent())
            .fold((1, held_bytes(grant)), |(count, bytes), g| {
                (count + 1, bytes + held_bytes(&g.grant))
            });
        count > MAX_CREDIT_GRANTS || bytes > MAX_CREDIT_GRANT_BYTES
    }

    /// The grants a negative line item of series `key` may give credit back to.
    pub fn grants_drawn_by(&self, key: &str) -> impl Iterator<Item = &str> {
        self.series
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|a| a.grant.as_deref())
    }

    /// The credit balance in `currency`.
    pub fn balance(&self, currency: &str) -> Decimal {
        self.balances.get(currency).copied().unwrap_or_default()
    }

    /// Applies a line item (the caller has checked it was not applied before).
    pub fn apply_item(&mut self, item: &LineItem) -> Vec<BalanceEntry> {
        let route = self.route_of(item);
        self.apply_item_of(item, Self::series_key_of(item), route)
    }

    /// [`Book::apply_item`] with the item's series key ([`Book::series_key_of`]) and its
    /// route ([`Book::route_of`], which applying the item does not change until it is put on
    /// its statement), which the caller has found already.
    pub(crate) fn apply_item_of(
        &mut self,
        item: &LineItem,
        key: String,
        route: Option<Route>,
    ) -> Vec<BalanceEntry> {
        let series = Series {
            meter: item.meter.clone(),
            group: item.group.clone(),
            period_start: item.period_start.clone(),
        };
        let window_start =
            neruba_schemas::event::parse_time_ms(&item.window_start).unwrap_or(i64::MIN);
        let currency = item.currency.as_str();
        let mut stack = self.series.remove(&key).unwrap_or_default();
        let mut e = self.entries(&item.tenant, &item.customer, item.id.as_str());
        if item.amount.is_sign_positive() {
            let mut left = item.amount;
            let mut eligible: Vec<(u16, i64, i64, String)> = e
                .book
                .grants
                .values()
                .filter(|g| {
                    g.status == Status::Active
                        && g.remaining > Decimal::ZERO
                        && g.grant.terms.currency == currency
                        && g.grant.terms.effective_ms() <= window_start
                        && g.grant
                            .terms
                            .expires_ms()
                            .is_none_or(|end| window_start < end)
                })
                .map(|g| burn_order(&g.grant))
                .collect();
            eligible.sort();
            for (_, _, _, id) in eligible {
                if left.is_zero() {
                    break;
                }
                let Some(state) = e.book.grants.get_mut(&id) else {
                    continue;
                };
                let take = left.min(state.remaining);
                state.remaining -= take;
                state.consumed += take;
                left -= take;
                allocate(&mut stack, Some(&id), take);
                e.push(
                    EntryKind::Consume,
                    currency,
                    Some(&id),
                    Some(&series),
                    -take,
                    None,
                );
            }
            if !left.is_zero() {
                allocate(&mut stack, None, left);
                e.push(
                    EntryKind::Uncovered,
                    currency,
                    None,
                    Some(&series),
                    left,
                    None,
                );
            }
        } else {
            let mut left = -item.amount;
            // Uncovered first, newest first; then the grants, last drawn first.
            for uncovered_pass in [true, false] {
                let mut index = stack.len();
                while index > 0 && !left.is_zero() {
                    index -= 1;
                    let Some(allocation) = stack.get_mut(index) else {
                        break;
                    };
                    if allocation.grant.is_none() != uncovered_pass
                        || allocation.amount <= Decimal::ZERO
                    {
                        continue;
                    }
                    let give = left.min(allocation.amount);
                    allocation.amount -= give;
                    left -= give;
                    let grant = allocation.grant.clone();
                    match grant {
                        None => e.push(
                            EntryKind::Uncovered,
                            currency,
                            None,
                            Some(&series),
                            -give,
                            None,
                        ),
                        Some(id) => restore(&mut e, &id, currency, &series, give),
                    }
                }
            }
            stack.retain(|a| !a.amount.is_zero());
            if !left.is_zero() {
                allocate(&mut stack, None, -left);
                e.push(
                    EntryKind::Uncovered,
                    currency,
                    None,
                    Some(&series),
                    -left,
                    None,
                );
            }
        }
        let mut out = std::mem::take(&mut e.out);
        if !stack.is_empty() {
            self.series.insert(key, stack);
        }
        self.note_on_statement(item, &out, route);
        let mut e = self.entries(&item.tenant, &item.customer, item.id.as_str());
        rules::check_all(&mut e);
        out.append(&mut e.out);
        out
    }

    /// Sets or removes the customer's balance rule in a currency, and checks it at once (a
    /// balance already below a new threshold is a crossing).
    pub fn apply_rule(&mut self, record: &RuleRecord) -> Vec<BalanceEntry> {
        let cause = format!("rule/{}", record.currency);
        let mut e = self.entries(&record.tenant, &record.customer, cause);
        match &record.rule {
            None => {
                let removed = e.book.rules.remove(&record.currency);
                // A version 1 removal dropped the request with the rule; replaying one must
                // give what it gave when it was written.
                let keeps_request = record.v >= credit::RULE_RECORD_V;
                if let Some(request) = removed
                    .and_then(|state| state.outstanding)
                    .filter(|_| keeps_request)
                {
                    e.book
                        .unresolved_requests
                        .insert(record.currency.clone(), request);
                }
            }
            Some(rule) => {
                let book = &mut *e.book;
                book.rules
                    .entry(record.currency.clone())
                    .and_modify(|state| state.rule = rule.clone())
                    .or_insert_with(|| rules::RuleState {
                        outstanding: book.unresolved_requests.remove(&record.currency),
                        ..rules::RuleState::new(rule.clone())
                    });
                rules::check_all(&mut e);
            }
        }
        e.out
    }

    /// Applies a grant read when the partition's clock stood at `clock_ms` (after `grace_ms`
    /// past its expiry, a grant arriving late expires at once).
    pub fn apply_grant(
        &mut self,
        grant: &Grant,
        clock_ms: i64,
        grace_ms: i64,
    ) -> Vec<BalanceEntry> {
        let currency = grant.terms.currency.clone();
        let remembers = grant.v >= credit::GRANT_REFUSAL_KEPT_V;
        let mut e = self.entries(&grant.tenant, &grant.customer, grant.id.as_str());
        let refused = |mut e: Entries<'_>, code: &str| {
            let refusal = remembers.then(|| refusal_of(grant, code)).flatten();
            if refusal.is_some_and(|refusal| e.book.refused_before(refusal)) {
                return e.out;
            }
            e.push(
                EntryKind::GrantRefused,
                &currency,
                Some(&grant.id),
                None,
                Decimal::ZERO,
                Some(code),
            );
            e.out
        };
        if let Some(existing) = e.book.grants.get(&grant.id) {
            if existing.grant.terms != grant.terms || existing.grant.key != grant.key {
                return refused(e, "key_conflict");
            }
            return e.out;
        }
        if grant.v >= credit::GRANT_BOUNDED_V
            && !rules::is_outstanding(e.book, &grant.key)
            && e.book.holds_too_many_with(grant)
        {
            // Not kept: the same request applies once a grant of the customer is spent.
            return refused(e, TOO_MANY_GRANTS);
        }
        // Applied, it is no longer refused, nor is a void of it: neither takes a place among
        // the refusals remembered.
        if remembers && !e.book.refused.is_empty() {
            let applied = [
                refusal_of(grant, TOO_MANY_GRANTS),
                void_refusal_of(&grant.id),
            ];
            e.book.refused.retain(|r| !applied.contains(&Some(*r)));
        }
        rules::resolve(e.book, &grant.key);
        let amount = grant.terms.amount;
        e.book.grants.insert(
            grant.id.clone(),
            Box::new(GrantState {
                grant: grant.clone(),
                status: Status::Active,
                remaining: amount,
                consumed: Decimal::ZERO,
                restored: Decimal::ZERO,
                expired: Decimal::ZERO,
                voided: Decimal::ZERO,
            }),
        );
        e.push(
            EntryKind::Grant,
            &currency,
            Some(&grant.id),
            None,
            amount,
            None,
        );
        if grant
            .terms
            .expires_ms()
            .is_some_and(|end| end.saturating_add(grace_ms) <= clock_ms)
        {
            end_grant(&mut e, &grant.id, Status::Expired);
        }
        rules::check_all(&mut e);
        e.out
    }

    /// Voids what is left of a grant; a void of an unknown grant is refused
    /// (`unknown_grant`; sent again, of record version [`credit::VOID_RECORD_V`] on, it adds
    /// no second entry while the book remembers the refusal), of an ended one changes nothing.
    pub fn apply_void(&mut self, void: &Void) -> Vec<BalanceEntry> {
        let grant = void.grant.as_str();
        let remembers = void.v >= credit::VOID_RECORD_V;
        let mut e = self.entries(&void.tenant, &void.customer, format!("void/{grant}"));
        match e.book.grants.get(grant).map(|g| g.status) {
            None if remembers
                && void_refusal_of(grant).is_some_and(|refusal| e.book.refused_before(refusal)) => {
            }
            None => e.push(
                EntryKind::GrantRefused,
                "",
                Some(grant),
                None,
                Decimal::ZERO,
                Some(UNKNOWN_GRANT),
            ),
            Some(Status::Active) => end_grant(&mut e, grant, Status::Voided),
            Some(Status::Expired | Status::Voided) => {}
        }
        rules::check_all(&mut e);
        e.out
    }

    /// Expires every active grant whose expiry plus `grace_ms` is at or before `at_ms`, in
    /// grant-id order; then turns statements whose period ended `draft` (final
    /// `finalize_after_ms` later) and drafts whose delay has passed `final`.
    pub fn apply_tick(
        &mut self,
        tenant: &str,
        customer: &str,
        at_ms: i64,
        grace_ms: i64,
        finalize_after_ms: i64,
    ) -> Vec<BalanceEntry> {
        let due: Vec<String> = self
            .grants
            .values()
            .filter(|g| {
                g.status == Status::Active
                    && g.grant
                        .terms
                        .expires_ms()
                        .is_some_and(|end| end.saturating_add(grace_ms) <= at_ms)
            })
            .map(|g| g.grant.id.clone())
            .collect();
        let mut e = self.entries(tenant, customer, format!("tick/{at_ms}"));
        for id in due {
            end_grant(&mut e, &id, Status::Expired);
        }
        statements::advance(&mut e, at_ms, finalize_after_ms);
        rules::check_all(&mut e);
        e.out
    }

    /// The earliest time a tick would change this book: an active grant's expiry, an open
    /// statement's period end, a draft's finalisation.
    pub fn next_deadline(&self) -> Option<i64> {
        let expiry = self
            .grants
            .values()
            .filter(|g| g.status == Status::Active)
            .filter_map(|g| g.grant.terms.expires_ms())
            .min();
        let statement = self.statements.values().map(|s| s.deadline()).min();
        expiry.into_iter().chain(statement).min()
    }
}

/// Ends a grant: what is left becomes an `expire` or `void` entry.
fn end_grant(e: &mut Entries<'_>, id: &str, status: Status) {
    let kind = match status {
        Status::Voided => EntryKind::Void,
        Status::Expired | Status::Active => EntryKind::Expire,
    };
    end_rest(e, id, status, kind);
}

/// Ends what is left of grant `id`, which is then `status`, with an entry of `kind` (`void`
/// or `expire`, and the grant's `voided` or `expired` grows by as much).
fn end_rest(e: &mut Entries<'_>, id: &str, status: Status, kind: EntryKind) {
    let Some(state) = e.book.grants.get_mut(id) else {
        return;
    };
    let left = state.remaining;
    state.status = status;
    state.remaining = Decimal::ZERO;
    if kind == EntryKind::Void {
        state.voided += left;
    } else {
        state.expired += left;
    }
    let currency = state.grant.terms.currency.clone();
    // A grant drawn down to nothing ends without an entry: it changes no balance.
    if !left.is_zero() {
        e.push(kind, &currency, Some(id), None, -left, None);
    }
}

/// Gives `amount` back to grant `id`; if the grant has ended, the amount expires again at once
/// (SPEC), the grant staying as it ended. On a voided grant of record version 1 or 2 it is
/// voided again, as it was then ([`credit::GRANT_RESTORE_EXPIRES_V`]).
fn restore(e: &mut Entries<'_>, id: &str, currency: &str, series: &Series, amount: Decimal) {
    let Some(state) = e.book.grants.get_mut(id) else {
        // The partition store puts a grant taken out of the book back before a correction
        // that may give credit to it, so this cannot happen; were it to, the amount is owed
        // back rather than lost, and the series still adds up.
        e.push(
            EntryKind::Uncovered,
            currency,
            None,
            Some(series),
            -amount,
            None,
        );
        return;
    };
    state.remaining += amount;
    state.restored += amount;
    let (status, v) = (state.status, state.grant.v);
    e.push(
        EntryKind::Restore,
        currency,
        Some(id),
        Some(series),
        amount,
        None,
    );
    if status != Status::Active {
        let kind = if status == Status::Voided && v < credit::GRANT_RESTORE_EXPIRES_V {
            EntryKind::Void
        } else {
            EntryKind::Expire
        };
        end_rest(e, id, status, kind);
    }
}

pub mod rules;
pub mod statements;
#[cfg(test)]
mod tests;
