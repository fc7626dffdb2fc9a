//! Billing reads against `neruba api` (its own base URL; a key with the `read` scope): customers,
//! balances, grants, balance entries, statements, line items and usage.
//!
//! Invariants:
//! - every answer is typed as the api writes it, field for field; amounts and quantities are
//!   [`Decimal`]s read from their decimal strings, never through `f64`; a status or kind this
//!   version does not know is kept as `Other(text)`, not an error;
//! - every answer says which read-model position it was read at (`as_of`); a [`Reader`] made
//!   with [`Reader::at`] (or [`Reader::at_all`]) sends `min_position`, so the api answers only
//!   once it has caught up with those writes (read-your-writes), waiting a bounded time and
//!   otherwise answering `503 not_caught_up`, which is retried like any `503`, never sooner
//!   than its `Retry-After`;
//! - customers, grant ids and periods are single path segments (percent-encoded), and query
//!   values are form-encoded, so no argument can change which read is made.

use crate::credits::{Paid, Position};
use crate::error::{Error, Result};
use crate::http::Transport;
use rust_decimal::Decimal;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Most items the api puts on one page (`limit`).
pub const MAX_PAGE: usize = 1000;

/// Most lines the api puts on one page of statements (`limit`).
const MAX_STATEMENT_PAGE: usize = 10_000;

/// Most rows the client asks for on one usage page (`limit`): the api's default bound, asked
/// for whatever the api's `--api-max-usage-rows`, so that no usage page can pass
/// [`crate::http::MAX_ANSWER_BYTES`].
const USAGE_PAGE_ROWS: usize = 100_000;

/// Most positions one read may wait for (the api's limit on `min_position`): one per
/// partition of topics of up to 1,024 partitions in all. A [`Reader::at_all`] of more is
/// refused by every read with [`Error::InvalidArgument`], before anything is sent: splitting
/// them over several reads would not be the same wait, as each read may reach another api
/// replica.
pub const MAX_POSITIONS: usize = 1024;

/// A string-valued enum of the api, with a fallback keeping values a newer api may send.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
        #[serde(from = "String")]
        #[non_exhaustive]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A value this version of the client does not know (from a newer api), as sent.
            Other(String),
        }

        impl $name {
            /// The wire spelling.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)*
                    Self::Other(text) => text,
                }
            }
        }

        impl From<String> for $name {
            fn from(text: String) -> Self {
                match text.as_str() {
                    $($text => Self::$variant,)*
                    _ => Self::Other(text),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// Where a grant stands.
    pub enum GrantStatus {
        /// Usage may draw on what is left of it (within its effective and expiry times).
        Active = "active",
        /// It expired; what was left is in `expired`.
        Expired = "expired",
        /// It was voided; what was left is in `voided` (credit given back to it after expires
        /// again at once, in `expired`, for a grant of record version 3 on).
        Voided = "voided",
    }
}

wire_enum! {
    /// What a balance entry records.
    pub enum EntryKind {
        /// Credit granted: the balance rises by the amount.
        Grant = "grant",
        /// Usage drew on a grant.
        Consume = "consume",
        /// A correction gave usage back to the grant it drew on.
        Restore = "restore",
        /// What was left of a grant when it expired, or credit given back to a grant that had
        /// ended, which expires again at once (on a voided grant, of record version 3 on).
        Expire = "expire",
        /// What was left of a grant when it was voided.
        Void = "void",
        /// Usage no grant covered: the amount due (negative: owed back).
        Uncovered = "uncovered",
        /// A grant or void that changed nothing because it was refused (`code` says why).
        GrantRefused = "grant_refused",
        /// The balance crossed below the rule's threshold (`rule`).
        LowBalance = "low_balance",
        /// A top-up of `amount` is asked for; a grant keyed with the entry's id resolves it.
        TopupRequested = "topup_requested",
        /// A statement's period ended (`statement`).
        StatementDraft = "statement_draft",
        /// A statement is final (`statement`); it never changes again.
        StatementFinal = "statement_final",
    }
}

wire_enum! {
    /// Where a statement stands: `open` during its period (the upcoming invoice), `draft`
    /// after it until the finalisation delay has passed, then `final`.
    pub enum StatementStatus {
        /// The period is running.
        Open = "open",
        /// The period ended; late usage may still change it.
        Draft = "draft",
        /// It never changes again.
        Final = "final",
    }
}

wire_enum! {
    /// What a line item records.
    pub enum LineItemKind {
        /// A window closed for the first time.
        Usage = "usage",
        /// A window was revised (late events, a rerun); supersedes an earlier item.
        Adjustment = "adjustment",
        /// A flat plan's period fee.
        Flat = "flat",
    }
}

wire_enum! {
    /// How a meter folds its events' values.
    pub enum Aggregation {
        /// The sum of values.
        Sum = "sum",
        /// The number of events.
        Count = "count",
        /// The least value.
        Min = "min",
        /// The greatest value.
        Max = "max",
        /// The mean value.
        Avg = "avg",
        /// The number of distinct values.
        UniqueCount = "unique_count",
        /// The latest event's value.
        Latest = "latest",
    }
}

/// A read-model position an answer was read at: the api had applied every record of
/// `partition` before `next_offset`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub struct ReadPosition {
    /// The topic the read model follows (the ledger, or the rollups for usage).
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The next offset the read model will apply.
    pub next_offset: i64,
}

impl ReadPosition {
    /// Whether the record at `position` had been applied when this was read.
    pub fn includes(&self, position: &Position) -> bool {
        self.topic == position.topic
            && self.partition == position.partition
            && self.next_offset > position.offset
    }

    /// The last record applied (`None`: none yet), to read another replica at least as new
    /// with [`Reader::at`].
    pub fn last_applied(&self) -> Option<Position> {
        (self.next_offset > 0)
            .then(|| Position::new(self.topic.clone(), self.partition, self.next_offset - 1))
    }
}

/// `GET /v1/customers`: one page of the tenant's customers (those with any ledger record).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct CustomersPage {
    /// Every ledger partition's position.
    pub as_of: Vec<ReadPosition>,
    /// The customers of this page.
    pub customers: Vec<CustomerRef>,
    /// The `cursor` of the next page; `None` on the last one.
    pub next_cursor: Option<String>,
}

/// A customer on a [`CustomersPage`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct CustomerRef {
    /// The customer's id.
    pub id: String,
}

/// `GET /v1/customers/{c}/balances`: one balance per currency.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Balances {
    /// The customer.
    pub customer: String,
    /// The position of the customer's ledger partition.
    pub as_of: Vec<ReadPosition>,
    /// Per currency (with a balance, a rule or a top-up request a removed rule left), by
    /// currency.
    pub balances: Vec<CurrencyBalance>,
}

/// A customer's balance in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct CurrencyBalance {
    /// The currency (ISO 4217 or a catalog unit).
    pub currency: String,
    /// Σ grant − consume + restore − expire − void: what is left of every active grant.
    #[serde(with = "rust_decimal::serde::str")]
    pub balance: Decimal,
    /// The part usage in a window starting now could draw on (effective, not expired).
    #[serde(with = "rust_decimal::serde::str")]
    pub available: Decimal,
    /// Grants holding credit: active, with some left (used-up grants are not counted).
    pub active_grants: u64,
    /// The low-balance rule, if one is set.
    pub rule: Option<BalanceRuleView>,
    /// The top-up request in this currency not yet answered by a grant keyed with its id:
    /// the rule's, or one a rule since removed left (absent from api versions before it).
    #[serde(default)]
    pub outstanding_request: Option<String>,
}

/// A balance rule and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct BalanceRuleView {
    /// Crossing below it is flagged.
    #[serde(with = "rust_decimal::serde::str")]
    pub low_balance_threshold: Decimal,
    /// What a top-up recharges to, if any.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub recharge_to: Option<Decimal>,
    /// The balance is below the threshold now.
    pub below_threshold: bool,
    /// The `topup_requested` entry's id not yet answered by a grant keyed with it.
    pub outstanding_request: Option<String>,
}

/// A balance rule as it fired (on `low_balance` and `topup_requested` entries).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct BalanceRule {
    /// Crossing below it is flagged.
    #[serde(with = "rust_decimal::serde::str")]
    pub low_balance_threshold: Decimal,
    /// What a top-up recharges to, if any.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub recharge_to: Option<Decimal>,
}

/// `GET /v1/customers/{c}/grants`: the customer's grants in burn-down order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Grants {
    /// The customer.
    pub customer: String,
    /// The position of the customer's ledger partition.
    pub as_of: Vec<ReadPosition>,
    /// In the order usage draws on them.
    pub grants: Vec<Grant>,
    /// The `cursor` of the next page (`None`: the last; [`Reader::grants`] reads every page).
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// `GET /v1/customers/{c}/grants/{id}`: one grant.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct OneGrant {
    /// The customer.
    pub customer: String,
    /// The position of the customer's ledger partition.
    pub as_of: Vec<ReadPosition>,
    /// The grant.
    pub grant: Grant,
}

/// A grant: its terms and what usage made of it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Grant {
    /// `gr_` and 32 hex digits, from tenant, customer and key.
    pub id: String,
    /// The idempotency key it was granted under.
    pub key: String,
    /// How much was granted.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// Its currency.
    pub currency: String,
    /// Lower burns first.
    pub priority: u16,
    /// RFC 3339; `None`: effective from the start.
    pub effective_at: Option<String>,
    /// RFC 3339, exclusive; `None`: never expires.
    pub expires_at: Option<String>,
    /// What was paid for it; `None` for promotional credit.
    pub paid: Option<Paid>,
    /// Its metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// When the gateway received it (RFC 3339).
    pub received_at: String,
    /// Where it stands.
    pub status: GrantStatus,
    /// amount − consumed + restored − expired − voided.
    #[serde(with = "rust_decimal::serde::str")]
    pub remaining: Decimal,
    /// Drawn by usage.
    #[serde(with = "rust_decimal::serde::str")]
    pub consumed: Decimal,
    /// Given back by corrections.
    #[serde(with = "rust_decimal::serde::str")]
    pub restored: Decimal,
    /// Left when it expired, and credit given back after it had ended.
    #[serde(with = "rust_decimal::serde::str")]
    pub expired: Decimal,
    /// Left when it was voided.
    #[serde(with = "rust_decimal::serde::str")]
    pub voided: Decimal,
}

/// `GET /v1/customers/{c}/balance-entries`: one page of entries, by sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct BalanceEntries {
    /// The customer.
    pub customer: String,
    /// The position of the customer's ledger partition.
    pub as_of: Vec<ReadPosition>,
    /// By sequence number.
    pub entries: Vec<BalanceEntry>,
    /// The `after` of the next page; `None`: this page ends the entries read so far.
    pub next_after: Option<u64>,
}

/// One balance entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct BalanceEntry {
    /// The record version.
    pub v: u8,
    /// `be_` and 32 hex digits: from its cause, grant, kind and sequence number.
    pub id: String,
    /// The tenant.
    pub tenant: String,
    /// The customer.
    pub customer: String,
    /// Per customer, across currencies: 1, 2, 3, … with no gaps.
    pub seq: u64,
    /// What it records.
    pub kind: EntryKind,
    /// Its currency.
    pub currency: String,
    /// A line item id, a grant id, `void/<grant>`, `rule/<currency>` or `tick/<ms>`.
    pub cause: String,
    /// The grant it touches.
    pub grant: Option<String>,
    /// The usage series of a consume, restore or uncovered entry.
    pub series: Option<Series>,
    /// Signed: what it adds to the balance (uncovered: to the amount due).
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// The balance before it.
    #[serde(with = "rust_decimal::serde::str")]
    pub balance_before: Decimal,
    /// The balance after it.
    #[serde(with = "rust_decimal::serde::str")]
    pub balance_after: Decimal,
    /// For `grant_refused`: why (`key_conflict`, `unknown_grant`, `too_many_grants`).
    pub code: Option<String>,
    /// On `low_balance` and `topup_requested`: the rule that fired.
    #[serde(default)]
    pub rule: Option<BalanceRule>,
    /// On `statement_draft` and `statement_final`: the statement as it then stood.
    #[serde(default)]
    pub statement: Option<Box<Statement>>,
}

/// The usage series a balance entry belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Series {
    /// The meter.
    pub meter: String,
    /// The group.
    pub group: BTreeMap<String, String>,
    /// The billing period's start.
    pub period_start: String,
}

/// `GET /v1/customers/{c}/statements/{YYYY-MM}`: the statements of the billing period
/// starting that month, one per currency.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Statements {
    /// The customer.
    pub customer: String,
    /// The position of the customer's ledger partition.
    pub as_of: Vec<ReadPosition>,
    /// `YYYY-MM`.
    pub period: String,
    /// By currency.
    pub statements: Vec<Statement>,
    /// Corrections of periods already final that no later statement holds yet, per currency;
    /// they join the customer's next statement.
    #[serde(default)]
    pub pending_prior_period: Vec<PendingPriorPeriod>,
    /// The cursor of the next page of lines (`None`: the last). [`Reader::statements`] reads
    /// every page, so what it returns has none.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

impl Statements {
    /// The statements and pending corrections a page has (each page has them all).
    fn parts(&self) -> Vec<(&str, &str)> {
        self.statements
            .iter()
            .map(|s| ("statement", s.id.as_str()))
            .chain(
                self.pending_prior_period
                    .iter()
                    .map(|p| ("pending", p.currency.as_str())),
            )
            .collect()
    }

    /// Adds a later page's lines to the statements and corrections they belong to; `false`
    /// (nothing added) if the page has other statements or corrections than these: they
    /// changed between the pages (a statement opened, taking the pending corrections), and
    /// the read must start again.
    fn extend(&mut self, page: Self) -> bool {
        if page.parts() != self.parts() {
            return false;
        }
        for (mine, statement) in self.statements.iter_mut().zip(page.statements) {
            mine.lines.extend(statement.lines);
            mine.prior_period.extend(statement.prior_period);
        }
        for (mine, pending) in self
            .pending_prior_period
            .iter_mut()
            .zip(page.pending_prior_period)
        {
            mine.lines.extend(pending.lines);
        }
        true
    }
}

/// Prior-period corrections waiting for the customer's next statement in their currency.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct PendingPriorPeriod {
    /// The currency.
    pub currency: String,
    /// Per meter, group and (final) period.
    pub lines: Vec<StatementLine>,
    /// Σ of the lines.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// Net credit they drew (consumed − restored).
    #[serde(with = "rust_decimal::serde::str")]
    pub credit_applied: Decimal,
    /// What they add to the amount due (negative: owed back).
    #[serde(with = "rust_decimal::serde::str")]
    pub amount_due: Decimal,
}

/// A statement for one billing period and currency:
/// `usage + prior_period_amount = credit_applied + amount_due`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Statement {
    /// `st_` and 32 hex digits.
    pub id: String,
    /// The currency.
    pub currency: String,
    /// The period's start (RFC 3339).
    pub period_start: String,
    /// The period's end (RFC 3339, exclusive).
    pub period_end: String,
    /// Where it stands.
    pub status: StatementStatus,
    /// This period's usage per meter and group.
    pub lines: Vec<StatementLine>,
    /// Line items of periods already final, carried here.
    pub prior_period: Vec<StatementLine>,
    /// Σ of this period's lines.
    #[serde(with = "rust_decimal::serde::str")]
    pub usage: Decimal,
    /// Σ of the prior-period lines.
    #[serde(with = "rust_decimal::serde::str")]
    pub prior_period_amount: Decimal,
    /// Net credit drawn (consumed − restored).
    #[serde(with = "rust_decimal::serde::str")]
    pub credit_applied: Decimal,
    /// What to invoice (negative: owed back).
    #[serde(with = "rust_decimal::serde::str")]
    pub amount_due: Decimal,
}

/// One meter and group on a statement.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct StatementLine {
    /// The meter.
    pub meter: String,
    /// The group.
    pub group: BTreeMap<String, String>,
    /// The billing period the usage belongs to.
    pub period_start: String,
    /// The period-to-date quantity of the latest line item.
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    /// Σ of the line items' amounts.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// Net credit the line items drew; `amount = credit_applied + amount_due`.
    #[serde(with = "rust_decimal::serde::str")]
    pub credit_applied: Decimal,
    /// What is due of the line items (Σ uncovered).
    #[serde(with = "rust_decimal::serde::str")]
    pub amount_due: Decimal,
}

/// `GET /v1/customers/{c}/line-items`: a period's line items.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct LineItems {
    /// The customer.
    pub customer: String,
    /// The position of the customer's ledger partition.
    pub as_of: Vec<ReadPosition>,
    /// `YYYY-MM`.
    pub period: String,
    /// In period, window and id order.
    pub items: Vec<LineItem>,
    /// The `cursor` of the next page (`None`: the last page; [`Reader::line_items`] reads
    /// every page, so it is always `None` there).
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// A priced line item, as the rater wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct LineItem {
    /// The record version.
    pub v: u8,
    /// `li_` and 32 hex digits.
    pub id: String,
    /// What it records.
    pub kind: LineItemKind,
    /// The tenant.
    pub tenant: String,
    /// The customer.
    pub customer: String,
    /// The meter.
    pub meter: String,
    /// The group.
    pub group: BTreeMap<String, String>,
    /// The billing period's start (RFC 3339).
    pub period_start: String,
    /// The billing period's end (RFC 3339, exclusive).
    pub period_end: String,
    /// The window's start (RFC 3339).
    pub window_start: String,
    /// The window's end (RFC 3339, exclusive).
    pub window_end: String,
    /// The window's quantity.
    #[serde(with = "rust_decimal::serde::str")]
    pub window_quantity: Decimal,
    /// The window's events.
    pub window_events: u64,
    /// The period's quantity once this window is counted.
    #[serde(with = "rust_decimal::serde::str")]
    pub period_quantity: Decimal,
    /// The delta this item adds to the period's total.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// The price of `period_quantity`.
    #[serde(with = "rust_decimal::serde::str")]
    pub period_amount: Decimal,
    /// The currency.
    pub currency: String,
    /// The price plan.
    pub price_plan: String,
    /// Its version.
    pub price_version: u32,
    /// The window's revision this item prices (1 at first close).
    pub revision: u32,
    /// The item this one replaces for the same window.
    pub supersedes: Option<String>,
    /// A later item of the period (on this page or another) names this one in `supersedes`.
    pub superseded: bool,
}

/// How a usage query buckets the meter's windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Window {
    /// Hours.
    Hour,
    /// Days, in the meter's billing time zone.
    Day,
    /// Calendar months, in the meter's billing time zone.
    Month,
    /// One total over the whole range (`window=none`).
    Total,
}

impl Window {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Month => "month",
            Self::Total => "none",
        }
    }
}

/// A usage query (`GET /v1/usage`).
///
/// ```
/// use neruba_client::{UsageQuery, Window};
///
/// let query = UsageQuery::new("customer-7", "llm_tokens", "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")
///     .with_window(Window::Day)
///     .with_group_by(["model"])
///     .with_filter("model", "large");
/// assert_eq!(query.window, Some(Window::Day));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// The customer.
    pub customer: String,
    /// The meter's key.
    pub meter: String,
    /// RFC 3339, inclusive.
    pub from: String,
    /// RFC 3339, exclusive; after `from`, at most 400 days later.
    pub to: String,
    /// `None`: the meter's own windows.
    pub window: Option<Window>,
    /// The groups kept (an empty list: none, one row per bucket); `None`: every one of the
    /// meter's.
    pub group_by: Option<Vec<String>>,
    /// Only rollups whose group has these values.
    pub filters: BTreeMap<String, String>,
}

impl UsageQuery {
    /// `meter`'s usage by `customer` in `[from, to)`, in the meter's own windows, every group
    /// kept.
    pub fn new(
        customer: impl Into<String>,
        meter: impl Into<String>,
        from: impl Into<String>,
        to: impl Into<String>,
    ) -> Self {
        Self {
            customer: customer.into(),
            meter: meter.into(),
            from: from.into(),
            to: to.into(),
            window: None,
            group_by: None,
            filters: BTreeMap::new(),
        }
    }

    /// Buckets by `window` instead of the meter's own windows.
    pub fn with_window(mut self, window: Window) -> Self {
        self.window = Some(window);
        self
    }

    /// Keeps only these groups (none: one row per bucket).
    pub fn with_group_by<I, S>(mut self, groups: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.group_by = Some(groups.into_iter().map(Into::into).collect());
        self
    }

    /// Counts only rollups whose `group` is `value`.
    pub fn with_filter(mut self, group: impl Into<String>, value: impl Into<String>) -> Self {
        self.filters.insert(group.into(), value.into());
        self
    }

    /// The query string's pairs.
    fn pairs(&self) -> Result<Vec<(String, String)>> {
        let mut pairs = vec![
            ("customer".to_owned(), self.customer.clone()),
            ("meter".to_owned(), self.meter.clone()),
            ("from".to_owned(), self.from.clone()),
            ("to".to_owned(), self.to.clone()),
        ];
        if let Some(window) = self.window {
            pairs.push(("window".to_owned(), window.as_str().to_owned()));
        }
        if let Some(groups) = &self.group_by {
            if let Some(bad) = groups.iter().find(|g| g.is_empty() || g.contains(',')) {
                return Err(Error::InvalidArgument(format!(
                    "group `{bad}` cannot be sent in `group_by` (empty, or holds `,`)"
                )));
            }
            pairs.push(("group_by".to_owned(), groups.join(",")));
        }
        for (group, value) in &self.filters {
            if group.is_empty() {
                return Err(Error::InvalidArgument(
                    "a filter needs a group name".to_owned(),
                ));
            }
            pairs.push((format!("filter[{group}]"), value.clone()));
        }
        Ok(pairs)
    }
}

/// `GET /v1/usage`: quantities per bucket (and group).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Usage {
    /// The customer.
    pub customer: String,
    /// The meter.
    pub meter: String,
    /// The meter's aggregation.
    pub aggregation: Aggregation,
    /// `hour`, `day`, `month`, `none`, or the meter's own window (`1m`, …).
    pub window: String,
    /// The range's start.
    pub from: String,
    /// The range's end.
    pub to: String,
    /// The position of the customer's rollups partition.
    pub as_of: Vec<ReadPosition>,
    /// One per bucket and group, by bucket start, then group.
    pub data: Vec<UsageRow>,
    /// The `cursor` of the next page (`None`: the last page; [`Reader::usage`] reads every
    /// page, so it is always `None` there).
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// One bucket (and group) of a usage answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct UsageRow {
    /// The bucket's start.
    pub window_start: String,
    /// The bucket's end (exclusive).
    pub window_end: String,
    /// The groups kept.
    pub group: BTreeMap<String, String>,
    /// The quantity under the meter's aggregation.
    #[serde(with = "rust_decimal::serde::str")]
    pub quantity: Decimal,
    /// Events counted.
    pub events: u64,
}

/// The billing reads of one api (from [`Client::reader`](crate::Client::reader)), optionally
/// at a position ([`Reader::at`]). Cheap to clone.
///
/// A refused read is [`Error::Refused`] with the api's stable code: `404 customer_not_found`
/// (also for another tenant's customer), `404 grant_not_found`, `400 invalid_period`, `422
/// unknown_meter`, ….
#[derive(Debug, Clone)]
pub struct Reader {
    transport: Arc<Transport>,
    /// `<topic>:<partition>:<offset>[,…]`, sent as `min_position`.
    min_position: Option<String>,
    /// How many positions `min_position` lists (more than [`MAX_POSITIONS`] is refused).
    count: usize,
}

impl Reader {
    pub(crate) fn new(transport: Arc<Transport>) -> Self {
        Self {
            transport,
            min_position: None,
            count: 0,
        }
    }

    /// This reader, answering only once the api has applied the record at `position` (what a
    /// grant, void or balance rule answered; a usage read may also wait for a rollups
    /// position): read-your-writes. The api waits a bounded time for it, then answers
    /// `503 not_caught_up`, which is retried per the [`RetryPolicy`](crate::RetryPolicy).
    ///
    /// For several writes, [`at_all`](Self::at_all).
    pub fn at(&self, position: &Position) -> Self {
        self.at_all([position])
    }

    /// This reader, answering only once the api has caught up with every one of `positions`
    /// (none: no wait). Positions of one topic and partition are kept as the highest of them,
    /// which says the same (a position caught up is caught up with every earlier one), in the
    /// order they first came. At most [`MAX_POSITIONS`] remain, or every read of this reader
    /// is refused with [`Error::InvalidArgument`] before anything is sent. Events' positions
    /// ([`Ingestor::positions`]) can be waited for by [`usage`](Self::usage) only: the api
    /// waits until the aggregators have folded those events and it holds every rollup they
    /// produced, so a late event's revision of a closed window is in the answer; an event of a
    /// window still open is not, until its window closes.
    ///
    /// [`Ingestor::positions`]: crate::Ingestor::positions
    pub fn at_all<'p>(&self, positions: impl IntoIterator<Item = &'p Position>) -> Self {
        let mut kept: Vec<(&str, i32, i64)> = Vec::new();
        let mut index: HashMap<(&str, i32), usize> = HashMap::new();
        for position in positions {
            let key = (position.topic.as_str(), position.partition);
            match index.get(&key) {
                Some(&at) => {
                    if let Some(kept) = kept.get_mut(at) {
                        kept.2 = kept.2.max(position.offset);
                    }
                }
                None => {
                    index.insert(key, kept.len());
                    kept.push((key.0, key.1, position.offset));
                }
            }
        }
        let joined: Vec<String> = kept
            .iter()
            .map(|(topic, partition, offset)| format!("{topic}:{partition}:{offset}"))
            .collect();
        Self {
            transport: self.transport.clone(),
            min_position: (!joined.is_empty()).then(|| joined.join(",")),
            count: joined.len(),
        }
    }

    /// The position reads wait for, if any (the first, if several).
    pub fn position(&self) -> Option<Position> {
        self.positions().into_iter().next()
    }

    /// Every position reads wait for.
    pub fn positions(&self) -> Vec<Position> {
        self.min_position
            .as_deref()
            .into_iter()
            .flat_map(|list| list.split(','))
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// This reader, waiting instead until the api has applied what a page was read at
    /// (`as_of`): the later pages of one read then come from a read model at least as new as
    /// that page's, though another replica of the api answer them. A customer's read has the
    /// position of its ledger partition, at least as new as any this reader waited for there.
    /// Its positions replace the reader's (the first page was answered once those were caught
    /// up, at a position at least as new); a page that names none keeps the reader's.
    fn after_page(&self, as_of: &[ReadPosition]) -> Self {
        let applied: Vec<Position> = as_of
            .iter()
            .filter_map(ReadPosition::last_applied)
            .collect();
        if applied.is_empty() {
            return self.clone();
        }
        self.at_all(&applied)
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        segments: &[&str],
        mut query: Vec<(String, String)>,
        what: &str,
    ) -> Result<T> {
        if self.count > MAX_POSITIONS {
            return Err(Error::InvalidArgument(format!(
                "a read may wait for at most {MAX_POSITIONS} positions (one per topic and \
                 partition); this reader has {}",
                self.count
            )));
        }
        if let Some(position) = &self.min_position {
            query.push(("min_position".to_owned(), position.clone()));
        }
        self.transport.read(segments, &query, what).await
    }

    /// One page of the tenant's customers: up to `limit` (1–1000; `None`: the api's 100)
    /// after `cursor` (a page's `next_cursor`; `None`: the first page).
    pub async fn customers(
        &self,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> Result<CustomersPage> {
        let mut query = Vec::new();
        if let Some(limit) = limit {
            query.push(("limit".to_owned(), limit.to_string()));
        }
        if let Some(cursor) = cursor {
            query.push(("cursor".to_owned(), cursor.to_owned()));
        }
        self.get(&["v1", "customers"], query, "customers").await
    }

    /// Every customer's id, page after page.
    pub async fn all_customers(&self) -> Result<Vec<String>> {
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.customers(Some(MAX_PAGE), cursor.as_deref()).await?;
            all.extend(page.customers.into_iter().map(|c| c.id));
            match page.next_cursor {
                Some(next) if Some(&next) != cursor.as_ref() => cursor = Some(next),
                _ => return Ok(all),
            }
        }
    }

    /// `customer`'s balance in every currency it has grants or a rule in.
    pub async fn balances(&self, customer: &str) -> Result<Balances> {
        self.get(
            &["v1", "customers", customer, "balances"],
            Vec::new(),
            "balances",
        )
        .await
    }

    /// `customer`'s grants, in burn-down order.
    ///
    /// Every page (a page holds up to 1,000, the most a customer may have holding credit),
    /// each read at its own position, the later ones from a read model at least as
    /// new as the first's: `as_of` is the first page's, and a grant made between two pages is
    /// in the answer if its place in the order is after the last grant of the page read
    /// before it was made.
    pub async fn grants(&self, customer: &str) -> Result<Grants> {
        self.every_page(&["v1", "customers", customer, "grants"], Vec::new())
            .await
    }

    /// `customer`'s grant `id` (`gr_…`); `404 grant_not_found` if it has none such, `404
    /// grant_refused` if the balances stage refused it for the customer's bound of grants
    /// holding credit and has not applied it since.
    pub async fn grant(&self, customer: &str, id: &str) -> Result<OneGrant> {
        self.get(
            &["v1", "customers", customer, "grants", id],
            Vec::new(),
            "grant",
        )
        .await
    }

    /// One page of `customer`'s balance entries: up to `limit` (1–1000; `None`: the api's
    /// 100) with a sequence number above `after` (0: from the first).
    pub async fn balance_entries(
        &self,
        customer: &str,
        after: u64,
        limit: Option<usize>,
    ) -> Result<BalanceEntries> {
        let mut query = vec![("after".to_owned(), after.to_string())];
        if let Some(limit) = limit {
            query.push(("limit".to_owned(), limit.to_string()));
        }
        self.get(
            &["v1", "customers", customer, "balance-entries"],
            query,
            "balance entries",
        )
        .await
    }

    /// Every balance entry of `customer` with a sequence number above `after` (0: all), page
    /// after page, in sequence order. Entries are only ever appended, so a later call with
    /// the last `seq` seen picks up where this one ended.
    pub async fn all_balance_entries(
        &self,
        customer: &str,
        after: u64,
    ) -> Result<Vec<BalanceEntry>> {
        let mut all = Vec::new();
        let mut after = after;
        loop {
            let page = self
                .balance_entries(customer, after, Some(MAX_PAGE))
                .await?;
            all.extend(page.entries);
            match page.next_after {
                Some(next) if next > after => after = next,
                _ => return Ok(all),
            }
        }
    }

    /// `customer`'s statements of the billing period starting in `period` (`YYYY-MM`), one
    /// per currency, with every line: every page, read 10,000 lines (the most the api answers)
    /// at a time, its `as_of` and totals the first page's. If the statements change between two
    /// pages (a statement opened), it reads them again from the first, at most three times.
    pub async fn statements(&self, customer: &str, period: &str) -> Result<Statements> {
        let path = ["v1", "customers", customer, "statements", period];
        let mut first = self.clone();
        'read: for _ in 0..3 {
            let limit = || ("limit".to_owned(), MAX_STATEMENT_PAGE.to_string());
            let mut all: Statements = first.get(&path, vec![limit()], "statements").await?;
            let later = self.after_page(&all.as_of);
            let mut seen = std::collections::BTreeSet::new();
            while let Some(at) = all.next_cursor.take() {
                first_visit(&mut seen, &at, "statements")?;
                let mut page: Statements = later
                    .get(
                        &path,
                        vec![limit(), ("cursor".to_owned(), at)],
                        "statements",
                    )
                    .await?;
                let next = page.next_cursor.take();
                // Read again from a read model at least as new as the page that differed.
                let newer = self.after_page(&page.as_of);
                if !all.extend(page) {
                    first = newer;
                    continue 'read;
                }
                all.next_cursor = next;
            }
            return Ok(all);
        }
        Err(Error::Protocol {
            status: 200,
            message: "the statements changed between their pages three times in a row".into(),
        })
    }

    /// `customer`'s line items of the billing period starting in `period` (`YYYY-MM`),
    /// optionally of one meter: every page, read 1,000 items at a time, the later ones from a
    /// read model at least as new as the first's (`as_of` is the first page's).
    pub async fn line_items(
        &self,
        customer: &str,
        period: &str,
        meter: Option<&str>,
    ) -> Result<LineItems> {
        let mut query = vec![
            ("period".to_owned(), period.to_owned()),
            ("limit".to_owned(), MAX_PAGE.to_string()),
        ];
        if let Some(meter) = meter {
            query.push(("meter".to_owned(), meter.to_owned()));
        }
        self.every_page(&["v1", "customers", customer, "line-items"], query)
            .await
    }

    /// Usage as `query` asks, from the closed windows' rollups: every page (of at most 100,000
    /// rows, asked for as `limit`), the later ones from a read model at least
    /// as new as the first's (`as_of` is the first page's). A customer with no usage at all is
    /// `404 customer_not_found`; a combination the meter's aggregation cannot answer exactly
    /// (`avg` or `unique_count` past their window; `latest` across groups where windows
    /// rolled up before rollups named their latest events differ) is `422 not_combinable`.
    pub async fn usage(&self, query: &UsageQuery) -> Result<Usage> {
        let mut pairs = query.pairs()?;
        pairs.push(("limit".to_owned(), USAGE_PAGE_ROWS.to_string()));
        self.every_page(&["v1", "usage"], pairs).await
    }

    /// Every page of the read at `path` with `query`: the first, then each `next_cursor` in
    /// turn (one named before is refused), the later ones from a read model at least as new as
    /// the first's; `as_of` is the first page's.
    async fn every_page<T: Paged>(&self, path: &[&str], query: Vec<(String, String)>) -> Result<T> {
        let mut all: T = self.get(path, query.clone(), T::WHAT).await?;
        let later = self.after_page(all.as_of());
        let mut seen = std::collections::BTreeSet::new();
        while let Some(at) = all.next_cursor().take() {
            first_visit(&mut seen, &at, T::WHAT)?;
            let mut query = query.clone();
            query.push(("cursor".to_owned(), at));
            let mut page: T = later.get(path, query, T::WHAT).await?;
            let next = page.next_cursor().take();
            all.append(page);
            *all.next_cursor() = next;
        }
        Ok(all)
    }
}

/// An answer read in pages whose later pages add their rows to the first's.
trait Paged: serde::de::DeserializeOwned {
    /// What the read is called in errors.
    const WHAT: &'static str;
    fn as_of(&self) -> &[ReadPosition];
    fn next_cursor(&mut self) -> &mut Option<String>;
    fn append(&mut self, page: Self);
}

/// [`Paged`] for an answer whose rows are `$rows`, called `$what` in errors.
macro_rules! paged {
    ($answer:ty, $what:literal, $rows:ident) => {
        impl Paged for $answer {
            const WHAT: &'static str = $what;
            fn as_of(&self) -> &[ReadPosition] {
                &self.as_of
            }
            fn next_cursor(&mut self) -> &mut Option<String> {
                &mut self.next_cursor
            }
            fn append(&mut self, page: Self) {
                self.$rows.extend(page.$rows);
            }
        }
    };
}

paged!(Grants, "grants", grants);
paged!(LineItems, "line items", items);
paged!(Usage, "usage", data);

/// Refuses a cursor a read was given before: a page naming an earlier page as the next would
/// be read again for good.
fn first_visit(
    seen: &mut std::collections::BTreeSet<String>,
    cursor: &str,
    what: &str,
) -> Result<()> {
    if seen.insert(cursor.to_owned()) {
        return Ok(());
    }
    Err(Error::Protocol {
        status: 200,
        message: format!("a {what} page named an earlier page as the next"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        text.parse().unwrap_or_default()
    }

    #[test]
    fn a_grant_answer_reads_exact_decimals_and_statuses_it_does_not_know() -> Result<()> {
        let body = r#"{"customer":"c/1","as_of":[{"topic":"neruba.ledger","partition":2,"next_offset":42}],
            "grant":{"id":"gr_0123456789abcdef0123456789abcdef","key":"k","amount":"0.1000000000000000000000000001",
            "currency":"USD","priority":5,"effective_at":null,"expires_at":"2027-01-01T00:00:00Z",
            "paid":{"amount":"45","currency":"USD"},"metadata":{"order":"o-1"},
            "received_at":"2026-11-24T00:00:00Z","status":"frozen","remaining":"0.1000000000000000000000000001",
            "consumed":"0","restored":"0","expired":"0","voided":"0","new_field":1}}"#;
        let answer: OneGrant =
            serde_json::from_str(body).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let grant = &answer.grant;
        assert_eq!(grant.amount, d("0.1000000000000000000000000001"));
        assert_eq!(grant.status, GrantStatus::Other("frozen".to_owned()));
        assert_eq!(grant.status.to_string(), "frozen");
        assert_eq!(grant.paid.as_ref().map(|p| p.amount), Some(d("45")));
        let position = Position::new("neruba.ledger", 2, 41);
        assert!(answer.as_of[0].includes(&position));
        assert!(!answer.as_of[0].includes(&Position::new("neruba.ledger", 2, 42)));
        assert_eq!(answer.as_of[0].last_applied(), Some(position));
        Ok(())
    }

    #[test]
    fn a_statements_page_adds_its_lines_to_the_statements_of_the_first_or_nothing() -> Result<()> {
        let page = |lines: &str, prior: &str, pending: &str| -> Result<Statements> {
            let body = format!(
                r#"{{"customer":"c","as_of":[],"period":"2026-11","next_cursor":"00",
                "statements":[{{"id":"st_0","currency":"USD","period_start":"2026-11-01T00:00:00Z",
                "period_end":"2026-12-01T00:00:00Z","status":"open","lines":[{lines}],"prior_period":[{prior}],
                "usage":"3","prior_period_amount":"1","credit_applied":"0","amount_due":"4"}}],
                "pending_prior_period":[{pending}]}}"#
            );
            serde_json::from_str(&body).map_err(|e| Error::InvalidArgument(e.to_string()))
        };
        let line = |meter: &str| {
            format!(
                r#"{{"meter":"{meter}","group":{{}},"period_start":"2026-11-01T00:00:00Z","quantity":"1","amount":"1","credit_applied":"0","amount_due":"1"}}"#
            )
        };
        let pending = |lines: &str| {
            format!(
                r#"{{"currency":"EUR","lines":[{lines}],"amount":"2","credit_applied":"0","amount_due":"2"}}"#
            )
        };
        let mut all = page(&[line("a"), line("b")].join(","), "", &pending(""))?;
        assert!(all.extend(page(&line("c"), &line("p"), &pending(&line("x")))?));
        assert!(all.extend(page("", "", &pending(&line("y")))?));
        let meters = |lines: &[StatementLine]| -> Vec<String> {
            lines.iter().map(|l| l.meter.clone()).collect()
        };
        let [statement] = all.statements.as_slice() else {
            panic!("one statement: {all:?}");
        };
        assert_eq!(meters(&statement.lines), ["a", "b", "c"]);
        assert_eq!(meters(&statement.prior_period), ["p"]);
        assert_eq!(statement.amount_due, d("4"));
        let [waiting] = all.pending_prior_period.as_slice() else {
            panic!("one pending: {all:?}");
        };
        assert_eq!(meters(&waiting.lines), ["x", "y"]);
        // A page whose statements or corrections are not the first's is not the same
        // answer: nothing of it is added.
        let mut other = page(&line("d"), "", &pending(""))?;
        other.statements[0].id = "st_1".into();
        assert!(!all.extend(other));
        assert!(!all.extend(page(&line("d"), "", "")?));
        assert_eq!(meters(&all.statements[0].lines), ["a", "b", "c"]);
        Ok(())
    }

    #[test]
    fn entries_and_statements_read_as_the_api_writes_them() -> Result<()> {
        let statement = r#"{"id":"st_0","currency":"USD","period_start":"2026-11-01T00:00:00Z",
            "period_end":"2026-12-01T00:00:00Z","status":"draft",
            "lines":[{"meter":"m","group":{},"period_start":"2026-11-01T00:00:00Z","quantity":"3","amount":"1.50","credit_applied":"1.00","amount_due":"0.50"}],
            "prior_period":[],"usage":"1.50","prior_period_amount":"0","credit_applied":"1","amount_due":"0.50"}"#;
        let body = format!(
            r#"{{"customer":"c","as_of":[],"next_after":null,"entries":[
            {{"v":1,"id":"be_1","tenant":"acme","customer":"c","seq":1,"kind":"low_balance","currency":"USD",
              "cause":"rule/USD","grant":null,"series":null,"amount":"0","balance_before":"5",
              "balance_after":"5","code":null,"rule":{{"low_balance_threshold":"10.00","recharge_to":null}}}},
            {{"v":1,"id":"be_2","tenant":"acme","customer":"c","seq":2,"kind":"statement_draft","currency":"USD",
              "cause":"tick/1","grant":null,"series":{{"meter":"m","group":{{"model":"a"}},"period_start":"p"}},
              "amount":"-0.50","balance_before":"5","balance_after":"5","code":null,"statement":{statement}}}]}}"#
        );
        let page: BalanceEntries =
            serde_json::from_str(&body).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        assert_eq!(page.next_after, None);
        let [rule, draft] = page.entries.as_slice() else {
            return Err(Error::InvalidArgument("two entries".into()));
        };
        assert_eq!(rule.kind, EntryKind::LowBalance);
        assert_eq!(
            rule.rule
                .as_ref()
                .map(|r| (r.low_balance_threshold, r.recharge_to)),
            Some((d("10.00"), None))
        );
        assert_eq!(
            (draft.kind.as_str(), draft.amount),
            ("statement_draft", d("-0.50"))
        );
        let statement = draft
            .statement
            .as_deref()
            .ok_or_else(|| Error::InvalidArgument("a statement".into()))?;
        assert_eq!(statement.status, StatementStatus::Draft);
        assert_eq!(
            statement.usage + statement.prior_period_amount,
            statement.credit_applied + statement.amount_due
        );
        let lines: Vec<(Decimal, Decimal, Decimal)> = statement
            .lines
            .iter()
            .map(|l| (l.amount, l.credit_applied, l.amount_due))
            .collect();
        assert_eq!(lines, vec![(d("1.50"), d("1.00"), d("0.50"))]);
        Ok(())
    }

    #[test]
    fn a_usage_query_sends_only_what_is_set_and_refuses_what_it_cannot_send() -> Result<()> {
        let query = UsageQuery::new("c 1", "m", "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z");
        let names = |q: &UsageQuery| -> Result<Vec<String>> {
            Ok(q.pairs()?.into_iter().map(|(name, _)| name).collect())
        };
        assert_eq!(names(&query)?, ["customer", "meter", "from", "to"]);
        let full = query
            .clone()
            .with_window(Window::Total)
            .with_group_by(["model", "region"])
            .with_filter("model", "a&b=c");
        let pairs = full.pairs()?;
        assert_eq!(
            &pairs[4..],
            [
                ("window".to_owned(), "none".to_owned()),
                ("group_by".to_owned(), "model,region".to_owned()),
                ("filter[model]".to_owned(), "a&b=c".to_owned()),
            ]
        );
        // No groups kept: one row per bucket.
        let merged = query.clone().with_group_by(Vec::<String>::new()).pairs()?;
        assert_eq!(merged.last().map(|(_, v)| v.as_str()), Some(""));
        assert!(matches!(
            query.clone().with_group_by(["a,b"]).pairs(),
            Err(Error::InvalidArgument(_))
        ));
        Ok(())
    }

    #[test]
    fn a_position_round_trips_through_its_min_position_form() -> Result<()> {
        let position: Position = "topic:with:colons:3:17".parse()?;
        assert_eq!(position, Position::new("topic:with:colons", 3, 17));
        assert_eq!(position.to_string(), "topic:with:colons:3:17");
        for bad in ["", "t:1", ":1:2", "t:x:2", "t:1:y"] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
        Ok(())
    }
}
