//! Prepaid credit: grants and voids, journaled on the ledger topic beside the customer's line
//! items (one order for both), and the balance entries the balances stage derives from them.
//!
//! Invariants:
//! - a grant's id is a function of (tenant, customer, key) only, so a client's retry of the
//!   same grant names the same grant, and a replay derives the same ids;
//! - a grant's *terms* (amount, currency, priority, effective and expiry times, what was paid,
//!   metadata) are what a repeated key is compared on: the same terms change nothing,
//!   different terms are refused (`key_conflict`); when the gateway received it is not a term;
//! - a balance entry's id is a function of its cause (line item, grant, void or tick), the
//!   grant it touches, its kind and an ordinal: replaying the ledger partition gives the same
//!   entries, byte for byte;
//! - amounts are exact decimals written as strings; times are RFC 3339 UTC on the wire.

use crate::catalog::Catalog;
use crate::decimal;
use crate::ledger::digest_id;
use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// Lowest priority a grant may have (burns last).
pub const MAX_PRIORITY: u16 = 1000;
/// The priority of a grant that names none.
pub const DEFAULT_PRIORITY: u16 = 10;
/// Longest idempotency key, bytes.
pub const MAX_KEY_BYTES: usize = 200;
/// Most metadata entries on a grant, and the longest name or value, bytes.
pub const MAX_METADATA_ENTRIES: usize = 32;
pub const MAX_METADATA_BYTES: usize = 512;

/// Why a grant or void request is refused at the door. The code is stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantRejectCode {
    /// The body is not a JSON object of the grant's fields (or has unknown fields).
    InvalidBody,
    /// No idempotency `key`, an empty one, or one longer than [`MAX_KEY_BYTES`].
    MissingKey,
    /// `amount` is not a positive exact decimal within range.
    InvalidAmount,
    /// `currency` is neither an ISO 4217 code this build knows nor a unit of the catalog.
    UnknownCurrency,
    /// `priority` outside 0–[`MAX_PRIORITY`].
    PriorityOutOfRange,
    /// `effective_at` or `expires_at` is not an RFC 3339 time.
    InvalidTime,
    /// `expires_at` is not after `effective_at`.
    ExpiryBeforeEffective,
    /// `paid` is not a positive amount in a known currency.
    InvalidPaid,
    /// Too many metadata entries, or one too long.
    InvalidMetadata,
    /// The customer id is empty, too long or holds a control character.
    InvalidCustomer,
    /// A void names no grant of this customer (`gr_` and 32 hex digits).
    InvalidGrantId,
    /// A balance rule's `low_balance_threshold` is not a non-negative exact decimal in the
    /// currency's precision.
    InvalidThreshold,
    /// A balance rule's `recharge_to` is not above its threshold, or finer than the currency.
    InvalidRecharge,
}

impl GrantRejectCode {
    /// Every code, for documentation and metrics.
    pub const ALL: [Self; 13] = [
        Self::InvalidBody,
        Self::MissingKey,
        Self::InvalidAmount,
        Self::UnknownCurrency,
        Self::PriorityOutOfRange,
        Self::InvalidTime,
        Self::ExpiryBeforeEffective,
        Self::InvalidPaid,
        Self::InvalidMetadata,
        Self::InvalidCustomer,
        Self::InvalidGrantId,
        Self::InvalidThreshold,
        Self::InvalidRecharge,
    ];

    /// The stable wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidBody => "invalid_body",
            Self::MissingKey => "missing_key",
            Self::InvalidAmount => "invalid_amount",
            Self::UnknownCurrency => "unknown_currency",
            Self::PriorityOutOfRange => "priority_out_of_range",
            Self::InvalidTime => "invalid_time",
            Self::ExpiryBeforeEffective => "expiry_before_effective",
            Self::InvalidPaid => "invalid_paid",
            Self::InvalidMetadata => "invalid_metadata",
            Self::InvalidCustomer => "invalid_customer",
            Self::InvalidGrantId => "invalid_grant_id",
            Self::InvalidThreshold => "invalid_threshold",
            Self::InvalidRecharge => "invalid_recharge",
        }
    }
}

/// A refused grant or void request: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct GrantRejection {
    pub code: GrantRejectCode,
    pub message: String,
}

fn reject(code: GrantRejectCode, message: impl Into<String>) -> GrantRejection {
    GrantRejection {
        code,
        message: message.into(),
    }
}

/// An amount and its currency (what was paid for a purchased pack).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    #[serde(with = "crate::decimal::stored")]
    pub amount: Decimal,
    pub currency: String,
}

/// A grant as a client sends it (`POST /v1/customers/{customer}/grants`). Amounts may be
/// strings or JSON numbers; they are read exactly either way.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequest {
    pub key: Option<String>,
    pub amount: Option<serde_json::Value>,
    pub currency: Option<String>,
    /// An integer 0–1000 in any JSON notation (`1e3` is 1000); anything but a number or
    /// `null` fails the body's parse (`invalid_body`, before the rate limit), as a field of
    /// the wrong type does.
    #[serde(default, deserialize_with = "number_or_null")]
    pub priority: Option<serde_json::Value>,
    pub effective_at: Option<String>,
    pub expires_at: Option<String>,
    pub paid: Option<PaidRequest>,
    pub metadata: Option<BTreeMap<String, String>>,
}

/// What was paid, as a client sends it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaidRequest {
    pub amount: serde_json::Value,
    pub currency: String,
}

/// The terms of a grant: everything a repeated key is compared on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantTerms {
    #[serde(with = "crate::decimal::stored")]
    pub amount: Decimal,
    pub currency: String,
    pub priority: u16,
    /// Usage in windows starting at or after this time may draw on the grant; `None`: any.
    pub effective_at: Option<String>,
    /// Usage in windows starting at or after this time may not (exclusive); `None`: never
    /// expires.
    pub expires_at: Option<String>,
    pub paid: Option<Money>,
    pub metadata: BTreeMap<String, String>,
}

/// A grant on the ledger topic (header [`crate::topics::RECORD_HEADER`] = `grant`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub v: u8,
    pub id: String,
    pub tenant: String,
    pub customer: String,
    pub key: String,
    pub terms: GrantTerms,
    /// When the gateway received it (not a term: a retry may arrive later).
    pub received_at: String,
}

/// A void on the ledger topic (header `void`): what is left of the grant is voided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Void {
    pub v: u8,
    pub tenant: String,
    pub customer: String,
    pub grant: String,
    pub received_at: String,
}

/// The version the gateway and `neruba credits void` write voids in. Version 2: a void of a
/// grant the customer does not have, refused (`unknown_grant`) and sent again, adds no second
/// entry among the customer's newest refusals (`neruba_balances::book::REMEMBERED_REFUSALS`).
/// A version 1 void is refused with an entry each time, as it was then.
pub const VOID_RECORD_V: u8 = 2;

/// A clock tick on the ledger topic (header `tick`), written by the balances stage into each
/// partition it owns: grants expire when it passes, in log order, so a replay expires them at
/// the same point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    pub v: u8,
    pub at_ms: i64,
    /// How long a statement stays `draft` after its period ends before it is `final`, as the
    /// stage that wrote the tick was configured (absent: [`DEFAULT_FINALIZE_AFTER_MS`]). A
    /// statement turning draft records the delay of that tick, so a replay under another
    /// configuration finalises at the same points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalize_after_ms: Option<i64>,
}

/// The finalisation delay of a statement: 3 days.
pub const DEFAULT_FINALIZE_AFTER_MS: i64 = 3 * 86_400_000;

/// A customer's low-balance rule in one currency (SPEC "Threshold alerts and auto top-up").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceRule {
    /// Crossing below this emits one `low_balance` entry.
    #[serde(with = "crate::decimal::stored")]
    pub low_balance_threshold: Decimal,
    /// With it, the crossing also emits a `topup_requested` entry for `recharge_to − balance`,
    /// at most one outstanding at a time.
    #[serde(default, with = "crate::decimal::stored::option")]
    pub recharge_to: Option<Decimal>,
}

/// The version the gateway writes grants in ([`GRANT_BOUNDED_V`], [`GRANT_REFUSAL_KEPT_V`],
/// [`GRANT_RESTORE_EXPIRES_V`]).
pub const GRANT_RECORD_V: u8 = GRANT_REFUSAL_KEPT_V;

/// Grants of this version on are bounded: a new grant past the customer's bound of grants
/// holding credit is refused by the balances stage (`too_many_grants`). A version 1 grant,
/// written before the bound, is not: a replay of an old ledger applies what it applied then.
/// The bound's figures (`neruba_balances::book::MAX_CREDIT_GRANTS` and
/// `MAX_CREDIT_GRANT_BYTES`) are part of what a replay must reproduce: changing them needs a
/// new record version.
pub const GRANT_BOUNDED_V: u8 = 2;

/// Grants of this version on, refused and sent again (the same key and terms, `received_at`
/// aside) for the same reason, add no second `grant_refused` entry, among the customer's
/// newest refusals (`neruba_balances::book::REMEMBERED_REFUSALS`, a figure a replay must
/// reproduce too). Earlier versions are refused with an entry each time, as they were then.
pub const GRANT_REFUSAL_KEPT_V: u8 = 3;

/// Credit a correction gives back to a voided grant of this version on expires again at once
/// (an `expire` entry, SPEC "Corrections"), the grant staying voided. On a voided grant of an
/// earlier version it is voided again (a `void` entry), as it was then.
pub const GRANT_RESTORE_EXPIRES_V: u8 = 3;

/// The version the gateway writes balance-rule records in. Version 2: removing a rule keeps
/// its outstanding top-up request (until a grant resolves it), so a rule set again does not
/// ask twice. A version 1 record, written before, removes the request with the rule, as it did
/// then: a replay of an old ledger gives the entries it gave.
pub const RULE_RECORD_V: u8 = 2;

/// A balance rule on the ledger topic (header `rule`): sets the customer's rule in
/// `currency`, or with `rule: null` removes it ([`RULE_RECORD_V`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRecord {
    pub v: u8,
    pub tenant: String,
    pub customer: String,
    pub currency: String,
    pub rule: Option<BalanceRule>,
    pub received_at: String,
}

/// A balance rule as a client sends it (`PUT /v1/customers/{customer}/balance-rules/{currency}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleRequest {
    pub low_balance_threshold: Option<serde_json::Value>,
    pub recharge_to: Option<serde_json::Value>,
}

/// A JSON number (kept as written) or `null` (`None`); anything else is the body's error.
fn number_or_null<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(number @ serde_json::Value::Number(_)) => Ok(Some(number)),
        Some(_) => Err(serde::de::Error::custom("`priority` must be a JSON number")),
    }
}

/// An exact decimal ≥ 0 below 10^18 in `precision` decimal places at most.
fn exact_non_negative(value: &serde_json::Value, precision: u32) -> Option<Decimal> {
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    // `-0` is zero, as `0` and `-0e0` are: kept without its sign.
    decimal::parse_exact(&text)
        .map(|d| if d.is_zero() { d.abs() } else { d })
        .filter(|d| !d.is_sign_negative() && *d < decimal::max_abs_value())
        .and_then(|d| in_places(d, precision))
}

/// `amount` in at most `places` decimal places: as spelled when it fits, else in exactly
/// `places` when all it has beyond them is trailing zeros (`25.000` USD is `25.00`).
fn in_places(amount: Decimal, places: u32) -> Option<Decimal> {
    if amount.scale() <= places {
        return Some(amount);
    }
    if amount.normalize().scale() > places {
        return None;
    }
    // Exact, and within the mantissa: only trailing zeros are dropped.
    let mut exact = amount;
    exact.rescale(places);
    Some(exact)
}

impl RuleRequest {
    /// The rule record this request writes for `customer` of `tenant` in `currency`, or why
    /// it is refused.
    pub fn validate(
        self,
        catalog: &Catalog,
        tenant: &str,
        customer: &str,
        currency: &str,
        now_ms: i64,
    ) -> Result<RuleRecord, GrantRejection> {
        check_customer(customer)?;
        let Some(precision) = catalog.precision(currency) else {
            return Err(reject(
                GrantRejectCode::UnknownCurrency,
                format!(
                    "currency `{currency}` is neither a known ISO 4217 code nor a unit of the catalog"
                ),
            ));
        };
        let threshold = self
            .low_balance_threshold
            .as_ref()
            .and_then(|v| exact_non_negative(v, precision))
            .ok_or_else(|| {
                reject(
                    GrantRejectCode::InvalidThreshold,
                    format!(
                        "`low_balance_threshold` must be a decimal ≥ 0 below 10^18 with at most {precision} decimal places"
                    ),
                )
            })?;
        let recharge_to = match self.recharge_to {
            None | Some(serde_json::Value::Null) => None,
            Some(value) => Some(
                exact_non_negative(&value, precision)
                    .filter(|to| *to > threshold)
                    .ok_or_else(|| {
                        reject(
                            GrantRejectCode::InvalidRecharge,
                            format!(
                                "`recharge_to` must be above the threshold, below 10^18, with at most {precision} decimal places"
                            ),
                        )
                    })?,
            ),
        };
        Ok(RuleRecord {
            v: RULE_RECORD_V,
            tenant: tenant.to_owned(),
            customer: customer.to_owned(),
            currency: currency.to_owned(),
            rule: Some(BalanceRule {
                low_balance_threshold: threshold,
                recharge_to,
            }),
            received_at: crate::event::format_time_ms(now_ms),
        })
    }
}

/// Where a statement stands: `open` during its period, `draft` after it until the
/// finalisation delay has passed, then `final` (and never changes again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementStatus {
    Open,
    Draft,
    Final,
}

/// One meter and group on a statement: the period-to-date quantity of the latest line item
/// and the sum of the line items' amounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementLine {
    pub meter: String,
    pub group: BTreeMap<String, String>,
    /// The billing period the usage belongs to (for a prior-period adjustment, an earlier one).
    pub period_start: String,
    #[serde(with = "crate::decimal::stored")]
    pub quantity: Decimal,
    #[serde(with = "crate::decimal::stored")]
    pub amount: Decimal,
    /// Net credit this line's items drew (consumed − restored). `amount = credit_applied +
    /// amount_due`, line by line. (Absent from statements written before it existed: zero.)
    #[serde(default, with = "crate::decimal::stored")]
    pub credit_applied: Decimal,
    /// Σ uncovered of this line's items.
    #[serde(default, with = "crate::decimal::stored")]
    pub amount_due: Decimal,
}

/// A customer's statement for one billing period and currency.
///
/// `usage + prior_period = credit_applied + amount_due`: every line-item amount on it was
/// either drawn from credit or is due.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    /// [`statement_id`]: from tenant, customer, currency and period.
    pub id: String,
    pub currency: String,
    pub period_start: String,
    pub period_end: String,
    pub status: StatementStatus,
    /// This period's usage, per meter and group, by meter, group and period start.
    pub lines: Vec<StatementLine>,
    /// Line items of periods already final, carried here as prior-period adjustments.
    pub prior_period: Vec<StatementLine>,
    #[serde(with = "crate::decimal::stored")]
    pub usage: Decimal,
    #[serde(with = "crate::decimal::stored")]
    pub prior_period_amount: Decimal,
    /// Net credit drawn by the statement's items (consumed − restored).
    #[serde(with = "crate::decimal::stored")]
    pub credit_applied: Decimal,
    /// Σ uncovered of the statement's items: what to invoice (negative: owed back).
    #[serde(with = "crate::decimal::stored")]
    pub amount_due: Decimal,
}

/// A statement's deterministic id: `st_` and 32 hex digits over (tenant, customer, currency,
/// period start).
pub fn statement_id(tenant: &str, customer: &str, currency: &str, period_start: &str) -> String {
    digest_id(
        "st_",
        &[
            b"neruba.statement.v1",
            tenant.as_bytes(),
            customer.as_bytes(),
            currency.as_bytes(),
            period_start.as_bytes(),
        ],
    )
}

/// A grant's deterministic id: `gr_` and 32 hex digits of SHA-256 over (tenant, customer,
/// key), length-prefixed.
pub fn grant_id(tenant: &str, customer: &str, key: &str) -> String {
    digest_id(
        "gr_",
        &[
            b"neruba.grant.v1",
            tenant.as_bytes(),
            customer.as_bytes(),
            key.as_bytes(),
        ],
    )
}

/// Whether `text` is shaped like a grant id.
pub fn is_grant_id(text: &str) -> bool {
    text.strip_prefix("gr_").is_some_and(|hex| {
        hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

/// A customer id as the path carries it: what an event's `subject` may be (1–1024
/// characters, no control characters), so every customer billed may be granted credit.
pub fn check_customer(customer: &str) -> Result<(), GrantRejection> {
    let max = crate::event::MAX_ATTRIBUTE_CHARS;
    if customer.is_empty()
        || customer.chars().nth(max).is_some()
        || customer.chars().any(char::is_control)
    {
        return Err(reject(
            GrantRejectCode::InvalidCustomer,
            format!("the customer id must be 1–{max} characters without control characters"),
        ));
    }
    Ok(())
}

fn exact_amount(value: &serde_json::Value) -> Option<Decimal> {
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    decimal::parse_exact(&text)
        .filter(|d| d.is_sign_positive() && !d.is_zero() && *d < decimal::max_abs_value())
}

fn time(field: &str, text: Option<&str>) -> Result<Option<(i64, String)>, GrantRejection> {
    let Some(text) = text else { return Ok(None) };
    let refused = || {
        reject(
            GrantRejectCode::InvalidTime,
            format!("`{field}` must be an RFC 3339 time within the years 0000–9999 in UTC"),
        )
    };
    let ms = crate::event::parse_time_ms(text).map_err(|_| refused())?;
    // Stored as RFC 3339 UTC, which spells only the years 0000–9999: a time that its offset
    // moves outside them would be stored as text no reader parses.
    let stored = crate::event::format_time_ms(ms);
    if crate::event::parse_time_ms(&stored).ok() != Some(ms) {
        return Err(refused());
    }
    Ok(Some((ms, stored)))
}

impl GrantRequest {
    /// The grant this request makes for `customer` of `tenant`, received at `now_ms`, or why
    /// it is refused. Times are normalised to RFC 3339 UTC with milliseconds, so two spellings
    /// of one instant are the same terms.
    pub fn validate(
        self,
        catalog: &Catalog,
        tenant: &str,
        customer: &str,
        now_ms: i64,
    ) -> Result<Grant, GrantRejection> {
        check_customer(customer)?;
        let key = self.key.unwrap_or_default();
        if key.is_empty() || key.len() > MAX_KEY_BYTES || key.chars().any(char::is_control) {
            return Err(reject(
                GrantRejectCode::MissingKey,
                format!(
                    "`key` (the idempotency key) must be 1–{MAX_KEY_BYTES} bytes without control characters"
                ),
            ));
        }
        let amount = self.amount.as_ref().and_then(exact_amount).ok_or_else(|| {
            reject(
                GrantRejectCode::InvalidAmount,
                "`amount` must be a positive exact decimal below 10^18",
            )
        })?;
        let currency = self.currency.unwrap_or_default();
        let Some(precision) = catalog.precision(&currency) else {
            return Err(reject(
                GrantRejectCode::UnknownCurrency,
                format!(
                    "currency `{currency}` is neither a known ISO 4217 code nor a unit of the catalog"
                ),
            ));
        };
        // Finer than the currency's minor unit, a grant would draw fractions of a cent.
        let Some(amount) = in_places(amount, precision) else {
            return Err(reject(
                GrantRejectCode::InvalidAmount,
                format!("`amount` has more decimal places than {currency} has ({precision})"),
            ));
        };
        let priority = match &self.priority {
            None | Some(serde_json::Value::Null) => DEFAULT_PRIORITY,
            Some(serde_json::Value::Number(n)) => decimal::parse_exact(&n.to_string())
                .map(|p| p.normalize())
                .filter(|p| p.scale() == 0)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p <= MAX_PRIORITY)
                .ok_or_else(|| {
                    reject(
                        GrantRejectCode::PriorityOutOfRange,
                        format!(
                            "`priority` must be an integer 0–{MAX_PRIORITY} (lower burns first)"
                        ),
                    )
                })?,
            Some(_) => {
                return Err(reject(
                    GrantRejectCode::InvalidBody,
                    "`priority` must be a JSON number",
                ));
            }
        };
        let effective = time("effective_at", self.effective_at.as_deref())?;
        let expires = time("expires_at", self.expires_at.as_deref())?;
        if let (Some((from, _)), Some((to, _))) = (&effective, &expires)
            && to <= from
        {
            return Err(reject(
                GrantRejectCode::ExpiryBeforeEffective,
                "`expires_at` must be after `effective_at`",
            ));
        }
        let paid = match self.paid {
            None => None,
            Some(paid) => {
                let precision = catalog.precision(&paid.currency);
                let amount = exact_amount(&paid.amount)
                    .zip(precision)
                    .and_then(|(amount, places)| in_places(amount, places));
                match amount {
                    Some(amount) => Some(Money {
                        amount,
                        currency: paid.currency,
                    }),
                    _ => {
                        return Err(reject(
                            GrantRejectCode::InvalidPaid,
                            "`paid` must be a positive amount in a known currency, in at most its decimal places",
                        ));
                    }
                }
            }
        };
        let metadata = self.metadata.unwrap_or_default();
        if metadata.len() > MAX_METADATA_ENTRIES
            || metadata
                .iter()
                .any(|(k, v)| k.len() > MAX_METADATA_BYTES || v.len() > MAX_METADATA_BYTES)
        {
            return Err(reject(
                GrantRejectCode::InvalidMetadata,
                format!(
                    "`metadata`: at most {MAX_METADATA_ENTRIES} entries of at most {MAX_METADATA_BYTES} bytes each"
                ),
            ));
        }
        Ok(Grant {
            v: GRANT_RECORD_V,
            id: grant_id(tenant, customer, &key),
            tenant: tenant.to_owned(),
            customer: customer.to_owned(),
            key,
            terms: GrantTerms {
                amount,
                currency,
                priority,
                effective_at: effective.map(|(_, text)| text),
                expires_at: expires.map(|(_, text)| text),
                paid,
                metadata,
            },
            received_at: crate::event::format_time_ms(now_ms),
        })
    }
}

impl GrantTerms {
    /// `effective_at` in Unix ms (`i64::MIN` when absent: effective for any window).
    pub fn effective_ms(&self) -> i64 {
        self.effective_at
            .as_deref()
            .and_then(|t| crate::event::parse_time_ms(t).ok())
            .unwrap_or(i64::MIN)
    }

    /// `expires_at` in Unix ms (`None`: never expires).
    pub fn expires_ms(&self) -> Option<i64> {
        self.expires_at
            .as_deref()
            .and_then(|t| crate::event::parse_time_ms(t).ok())
    }
}

/// Encodes any ledger-topic record as JSON.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // A balance entry is about 360 bytes: one allocation, where serde's own buffer starts at
    // 128 and grows twice.
    let mut out = Vec::with_capacity(512);
    match serde_json::to_writer(&mut out, record) {
        Ok(()) => out,
        Err(_) => Vec::new(),
    }
}

/// Decodes a ledger-topic record.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> crate::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| crate::Error::Decode(e.to_string()))
}

/// What a balance entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// Credit granted: the balance rises by the amount.
    Grant,
    /// Usage drew on a grant.
    Consume,
    /// A correction gave usage back to the grant it drew on.
    Restore,
    /// What was left of a grant when it expired, or credit given back to a grant that had
    /// ended, which expires again at once (on a voided grant, of record version 3 on).
    Expire,
    /// What was left of a grant when it was voided.
    Void,
    /// Usage no grant covered: the amount due (negative: owed back). The balance is unchanged.
    Uncovered,
    /// A grant or void that changed nothing because it was refused (`code` says why).
    GrantRefused,
    /// The balance crossed below the rule's threshold (`rule`). Once per crossing.
    LowBalance,
    /// A top-up of `amount` is asked for; the entry's id is the request's id, and a grant
    /// with that id as its `key` resolves it. At most one outstanding per rule.
    TopupRequested,
    /// A statement's period ended (`statement`, `amount` = its amount due so far).
    StatementDraft,
    /// A statement is final (`statement`, `amount` = its amount due); it never changes again.
    StatementFinal,
}

impl EntryKind {
    /// The stable wire spelling (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grant => "grant",
            Self::Consume => "consume",
            Self::Restore => "restore",
            Self::Expire => "expire",
            Self::Void => "void",
            Self::Uncovered => "uncovered",
            Self::GrantRefused => "grant_refused",
            Self::LowBalance => "low_balance",
            Self::TopupRequested => "topup_requested",
            Self::StatementDraft => "statement_draft",
            Self::StatementFinal => "statement_final",
        }
    }

    /// Whether an entry of this kind moves the credit balance (its amount is added to it).
    pub fn moves_balance(self) -> bool {
        matches!(
            self,
            Self::Grant | Self::Consume | Self::Restore | Self::Expire | Self::Void
        )
    }

    /// Every kind, for metrics.
    pub const ALL: [Self; 11] = [
        Self::Grant,
        Self::Consume,
        Self::Restore,
        Self::Expire,
        Self::Void,
        Self::Uncovered,
        Self::GrantRefused,
        Self::LowBalance,
        Self::TopupRequested,
        Self::StatementDraft,
        Self::StatementFinal,
    ];
}

/// The usage series a consume, restore or uncovered entry belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Series {
    pub meter: String,
    pub group: BTreeMap<String, String>,
    pub period_start: String,
}

/// One balance entry on the balance-entries topic, keyed `tenant/customer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceEntry {
    pub v: u8,
    pub id: String,
    pub tenant: String,
    pub customer: String,
    /// Per customer, across currencies: 1, 2, 3, … with no gaps.
    pub seq: u64,
    pub kind: EntryKind,
    pub currency: String,
    /// What caused it: a line item id, a grant id, `void/<grant>`, `rule/<currency>` or
    /// `tick/<ms>`.
    pub cause: String,
    /// The grant it touches, if any.
    pub grant: Option<String>,
    pub series: Option<Series>,
    /// Signed: what the entry adds to the balance (uncovered: to the amount due).
    #[serde(with = "crate::decimal::stored")]
    pub amount: Decimal,
    #[serde(with = "crate::decimal::stored")]
    pub balance_before: Decimal,
    #[serde(with = "crate::decimal::stored")]
    pub balance_after: Decimal,
    /// For `grant_refused`: the stable code.
    pub code: Option<String>,
    /// For `low_balance` and `topup_requested`: the rule that fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<BalanceRule>,
    /// For `statement_draft` and `statement_final`: the statement as it then stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<Box<Statement>>,
}

impl BalanceEntry {
    /// The partitioning key: `tenant/customer`.
    pub fn partition_key(&self) -> String {
        format!("{}/{}", self.tenant, self.customer)
    }
}

/// A balance entry's deterministic id: `be_` and 32 hex digits over (tenant, customer, cause,
/// grant, kind, and the entry's per-customer sequence number as its ordinal: a repeated cause,
/// such as a refused grant sent twice, still gets a new id).
pub fn entry_id(
    tenant: &str,
    customer: &str,
    cause: &str,
    grant: Option<&str>,
    kind: EntryKind,
    ordinal: u64,
) -> String {
    digest_id(
        "be_",
        &[
            b"neruba.balance_entry.v1",
            tenant.as_bytes(),
            customer.as_bytes(),
            cause.as_bytes(),
            &[u8::from(grant.is_some())],
            grant.unwrap_or_default().as_bytes(),
            kind.as_str().as_bytes(),
            &ordinal.to_be_bytes(),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::from_toml_str(include_str!("../../catalog/sample.toml"), "sample")
            .expect("sample catalog")
    }

    fn request(body: serde_json::Value) -> Result<Grant, GrantRejectCode> {
        serde_json::from_value::<GrantRequest>(body)
            .map_err(|_| GrantRejectCode::InvalidBody)?
            .validate(&catalog(), "acme", "customer-7", 1_795_000_000_000)
            .map_err(|e| e.code)
    }

    /// Ids are what downstream readers deduplicate by: they never change between versions.
    /// The expected digits were computed apart (SHA-256 over the length-prefixed parts).
    #[test]
    fn deterministic_ids_are_stable() {
        assert_eq!(
            grant_id("acme", "customer-7", "pack"),
            "gr_144451eddacd1c5741ea54e85d24b21f"
        );
        assert_eq!(
            entry_id(
                "acme",
                "customer-7",
                "li_x",
                Some("gr_y"),
                EntryKind::Consume,
                3
            ),
            "be_b519ea778bd9f1c20ed9780e82eb0182"
        );
    }

    #[test]
    fn a_grant_request_is_validated_with_stable_codes() {
        use serde_json::json;
        let ok = request(json!({"key": "k1", "amount": "25.50", "currency": "USD"}));
        let grant = ok.expect("valid");
        assert_eq!(grant.terms.amount, Decimal::new(2550, 2));
        assert_eq!(grant.terms.priority, DEFAULT_PRIORITY);
        assert_eq!(grant.id, grant_id("acme", "customer-7", "k1"));
        assert!(is_grant_id(&grant.id));
        let cases = [
            (
                json!({"amount": "1", "currency": "USD"}),
                GrantRejectCode::MissingKey,
            ),
            (
                json!({"key": "", "amount": "1", "currency": "USD"}),
                GrantRejectCode::MissingKey,
            ),
            (
                json!({"key": "k", "amount": "0", "currency": "USD"}),
                GrantRejectCode::InvalidAmount,
            ),
            (
                json!({"key": "k", "amount": "-5", "currency": "USD"}),
                GrantRejectCode::InvalidAmount,
            ),
            (
                json!({"key": "k", "amount": "1e400", "currency": "USD"}),
                GrantRejectCode::InvalidAmount,
            ),
            (
                json!({"key": "k", "amount": "ten", "currency": "USD"}),
                GrantRejectCode::InvalidAmount,
            ),
            (
                json!({"key": "k", "amount": "0.001", "currency": "USD"}),
                GrantRejectCode::InvalidAmount,
            ),
            (
                json!({"key": "k", "amount": "1", "currency": "XYZ"}),
                GrantRejectCode::UnknownCurrency,
            ),
            (
                json!({"key": "k", "amount": "1", "currency": "USD", "priority": 1001}),
                GrantRejectCode::PriorityOutOfRange,
            ),
            (
                json!({"key": "k", "amount": "1", "currency": "USD", "priority": -1}),
                GrantRejectCode::PriorityOutOfRange,
            ),
            (
                json!({"key": "k", "amount": "1", "currency": "USD", "expires_at": "soon"}),
                GrantRejectCode::InvalidTime,
            ),
            (
                json!({"key": "k", "amount": "1", "currency": "USD", "effective_at": "2026-12-01T00:00:00Z", "expires_at": "2026-12-01T00:00:00Z"}),
                GrantRejectCode::ExpiryBeforeEffective,
            ),
            (
                json!({"key": "k", "amount": "1", "currency": "USD", "paid": {"amount": "0", "currency": "USD"}}),
                GrantRejectCode::InvalidPaid,
            ),
            (
                json!({"key": "k", "amount": "1", "currency": "USD", "colour": "red"}),
                GrantRejectCode::InvalidBody,
            ),
        ];
        for (body, code) in cases {
            assert_eq!(request(body.clone()).map(|_| ()), Err(code), "{body}");
        }
    }

    #[test]
    fn trailing_zeros_past_the_currency_places_are_not_finer_than_it() {
        // Was: `25.000` USD refused `invalid_amount` (three places, USD has two) while
        // `2.50e1`, the same amount, was accepted; `paid` and rules did the same.
        use serde_json::json;
        let amount =
            |a: serde_json::Value| request(json!({"key": "k", "amount": a, "currency": "USD"}));
        let grant = amount(json!("25.000")).expect("valid");
        assert_eq!(grant.terms.amount, Decimal::new(25, 0));
        assert_eq!(grant.terms.amount.to_string(), "25.00");
        let as_spelled = amount(json!("25.50")).map(|g| g.terms.amount.to_string());
        assert_eq!(as_spelled, Ok("25.50".to_owned()));
        let trimmed = amount(json!("25.5000")).map(|g| g.terms.amount.to_string());
        assert_eq!(trimmed, Ok("25.50".to_owned()));
        let wide =
            amount(json!("999999999999999999.9900000000")).map(|g| g.terms.amount.to_string());
        assert_eq!(wide, Ok("999999999999999999.99".to_owned()));
        assert_eq!(
            amount(json!("25.001")).map(|_| ()),
            Err(GrantRejectCode::InvalidAmount)
        );
        let paid = |a: &str| {
            request(json!({"key": "k", "amount": 5, "currency": "USD",
                "paid": {"amount": a, "currency": "JPY"}}))
            .map(|g| g.terms.paid.map(|p| p.amount.to_string()))
        };
        assert_eq!(paid("700.00"), Ok(Some("700".to_owned())));
        assert_eq!(paid("700.5"), Err(GrantRejectCode::InvalidPaid));
    }

    #[test]
    fn two_spellings_of_one_instant_are_the_same_terms() {
        use serde_json::json;
        let a = request(
            json!({"key": "k", "amount": 5, "currency": "USD", "expires_at": "2027-01-01T01:00:00+01:00"}),
        );
        let b = request(
            json!({"key": "k", "amount": "5.0", "currency": "USD", "expires_at": "2027-01-01T00:00:00Z"}),
        );
        assert_eq!(a.map(|g| g.terms.expires_at), b.map(|g| g.terms.expires_at));
    }

    #[test]
    fn a_priority_is_an_integer_of_0_to_1000_in_any_notation_else_out_of_range() {
        // Was: a priority beyond i64 (`99999999999999999999`) or in exponent notation (`1e3`)
        // failed the body's type and answered `400 invalid_body`, where the README promises
        // `422 priority_out_of_range` for a priority outside 0–1000.
        use serde_json::json;
        let priority = |p: serde_json::Value| {
            request(json!({"key": "k", "amount": 5, "currency": "USD", "priority": p}))
                .map(|g| g.terms.priority)
        };
        let number = |text: &str| serde_json::from_str::<serde_json::Value>(text).expect("JSON");
        assert_eq!(priority(number("1e3")), Ok(1000));
        assert_eq!(priority(number("7.0")), Ok(7));
        assert_eq!(priority(number("0")), Ok(0));
        assert_eq!(priority(json!(null)), Ok(DEFAULT_PRIORITY));
        for out in ["99999999999999999999", "1001", "-1", "1.5", "1e4", "-0.5"] {
            assert_eq!(
                priority(number(out)),
                Err(GrantRejectCode::PriorityOutOfRange),
                "{out}"
            );
        }
        assert_eq!(priority(json!("5")), Err(GrantRejectCode::InvalidBody));
    }

    #[test]
    fn every_customer_an_event_may_name_may_be_granted_credit() {
        // Was: an event's subject may be 1–1024 characters, the credit routes took 1–256
        // bytes, so a customer billed under a 300-character id could never get credit.
        let granted = |customer: &str| {
            serde_json::from_value::<GrantRequest>(
                serde_json::json!({"key": "k", "amount": 5, "currency": "USD"}),
            )
            .map_err(|_| GrantRejectCode::InvalidBody)?
            .validate(&catalog(), "acme", customer, 1_795_000_000_000)
            .map(|grant| grant.customer)
            .map_err(|e| e.code)
        };
        for customer in [
            "x".repeat(300),
            "é".repeat(crate::event::MAX_ATTRIBUTE_CHARS),
        ] {
            assert_eq!(granted(&customer), Ok(customer.clone()));
        }
        let too_long = "x".repeat(crate::event::MAX_ATTRIBUTE_CHARS + 1);
        assert_eq!(granted(&too_long), Err(GrantRejectCode::InvalidCustomer));
        assert_eq!(granted(""), Err(GrantRejectCode::InvalidCustomer));
        assert_eq!(granted("a\tb"), Err(GrantRejectCode::InvalidCustomer));
    }

    #[test]
    fn a_time_outside_the_years_0000_to_9999_in_utc_is_refused() {
        // Was: accepted and stored as text no reader parses (`-001-12-31T23:30:00.000Z`), so
        // an expiry read as none and an effective time as always.
        use serde_json::json;
        for (field, time) in [
            ("expires_at", "0000-01-01T00:30:00+01:00"),
            ("effective_at", "9999-12-31T23:00:00-05:00"),
        ] {
            let mut body = json!({"key": "k", "amount": 5, "currency": "USD"});
            body[field] = json!(time);
            assert_eq!(
                request(body).err(),
                Some(GrantRejectCode::InvalidTime),
                "{time}"
            );
        }
        let edge = request(json!({"key": "k", "amount": 5, "currency": "USD",
            "expires_at": "9999-12-31T23:00:00+01:00"}));
        assert_eq!(
            edge.map(|g| g.terms.expires_at),
            Ok(Some("9999-12-31T22:00:00.000Z".to_owned()))
        );
    }

    #[test]
    fn ids_are_injective_over_their_parts() {
        assert_ne!(grant_id("a", "b/c", "d"), grant_id("a", "b", "c/d"));
        assert_ne!(
            entry_id("a", "b", "c", None, EntryKind::Consume, 1),
            entry_id("a", "b", "c", Some(""), EntryKind::Consume, 1)
        );
    }

    #[test]
    fn a_rule_request_is_validated_with_stable_codes() {
        use serde_json::json;
        let rule = |customer: &str, currency: &str, body: serde_json::Value| {
            serde_json::from_value::<RuleRequest>(body)
                .map_err(|_| GrantRejectCode::InvalidBody)?
                .validate(&catalog(), "acme", customer, currency, 1_795_000_000_000)
                .map_err(|e| e.code)
        };
        let ok = rule(
            "customer-7",
            "USD",
            json!({"low_balance_threshold": "10.00", "recharge_to": 50.5}),
        );
        assert_eq!(
            ok,
            Ok(RuleRecord {
                v: RULE_RECORD_V,
                tenant: "acme".to_owned(),
                customer: "customer-7".to_owned(),
                currency: "USD".to_owned(),
                rule: Some(BalanceRule {
                    low_balance_threshold: Decimal::new(1000, 2),
                    recharge_to: Some(Decimal::new(505, 1)),
                }),
                received_at: crate::event::format_time_ms(1_795_000_000_000),
            })
        );
        let no_recharge = |body: serde_json::Value| {
            rule("c", "credits", body)
                .map(|r| r.rule.map(|r| (r.low_balance_threshold, r.recharge_to)))
        };
        assert_eq!(
            no_recharge(json!({"low_balance_threshold": 0})),
            Ok(Some((Decimal::ZERO, None)))
        );
        assert_eq!(
            no_recharge(json!({"low_balance_threshold": "0.0001", "recharge_to": null})),
            Ok(Some((Decimal::new(1, 4), None)))
        );
        // `-0` is zero, as `0` and `-0e0` are (was: refused `invalid_threshold`), and kept
        // without its sign.
        for zero in ["-0", "-0e0", "-0.00"] {
            let threshold = no_recharge(json!({ "low_balance_threshold": zero }))
                .map(|r| r.map(|(t, _)| (t, t.is_sign_negative())));
            assert_eq!(threshold, Ok(Some((Decimal::ZERO, false))), "{zero}");
        }
        // Trailing zeros past the currency's places are not finer than it (was: refused).
        let usd = rule("c", "USD", json!({"low_balance_threshold": "10.000"}));
        let usd = usd.map(|r| r.rule.map(|r| r.low_balance_threshold.to_string()));
        assert_eq!(usd, Ok(Some("10.00".to_owned())));
        let refused = |customer: &str, currency: &str, body: serde_json::Value| {
            rule(customer, currency, body).map(|_| ())
        };
        let threshold = |t: serde_json::Value| json!({"low_balance_threshold": t});
        let recharge =
            |r: serde_json::Value| json!({"low_balance_threshold": "10", "recharge_to": r});
        for body in [
            json!({}),
            threshold(json!("-1")),
            threshold(json!(-1)),
            threshold(json!("0.001")),
            threshold(json!("ten")),
            threshold(json!(true)),
            threshold(json!("1e18")),
        ] {
            let code = Err(GrantRejectCode::InvalidThreshold);
            assert_eq!(refused("c", "USD", body.clone()), code, "{body}");
        }
        let yen = refused("c", "JPY", threshold(json!("10.5")));
        assert_eq!(yen, Err(GrantRejectCode::InvalidThreshold));
        for body in [
            recharge(json!("10.00")),
            recharge(json!(5)),
            recharge(json!("50.001")),
            recharge(json!("fifty")),
        ] {
            let code = Err(GrantRejectCode::InvalidRecharge);
            assert_eq!(refused("c", "USD", body.clone()), code, "{body}");
        }
        let ten = threshold(json!("10"));
        assert_eq!(
            refused("c", "XYZ", ten.clone()),
            Err(GrantRejectCode::UnknownCurrency)
        );
        for customer in ["", "c\u{1}"] {
            let code = Err(GrantRejectCode::InvalidCustomer);
            assert_eq!(refused(customer, "USD", ten.clone()), code, "{customer:?}");
        }
        let unknown_field = json!({"low_balance_threshold": "10", "notify": "me"});
        assert_eq!(
            refused("c", "USD", unknown_field),
            Err(GrantRejectCode::InvalidBody)
        );
    }
}
