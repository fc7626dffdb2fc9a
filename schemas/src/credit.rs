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
use crate::ledger::digest;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
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
}

impl GrantRejectCode {
    /// Every code, for documentation and metrics.
    pub const ALL: [Self; 11] = [
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
    #[serde(with = "rust_decimal::serde::str")]
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
    pub priority: Option<i64>,
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
    #[serde(with = "rust_decimal::serde::str")]
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

/// A clock tick on the ledger topic (header `tick`), written by the balances stage into each
/// partition it owns: grants expire when it passes, in log order, so a replay expires them at
/// the same point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    pub v: u8,
    pub at_ms: i64,
}

/// A grant's deterministic id: `gr_` and 32 hex digits of SHA-256 over (tenant, customer,
/// key), length-prefixed.
pub fn grant_id(tenant: &str, customer: &str, key: &str) -> String {
    format!(
        "gr_{}",
        digest(&[
            b"neruba.grant.v1",
            tenant.as_bytes(),
            customer.as_bytes(),
            key.as_bytes()
        ])
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

/// A customer id as the path carries it: 1–256 bytes, no control characters.
pub fn check_customer(customer: &str) -> Result<(), GrantRejection> {
    if customer.is_empty() || customer.len() > 256 || customer.chars().any(char::is_control) {
        return Err(reject(
            GrantRejectCode::InvalidCustomer,
            "the customer id must be 1–256 bytes without control characters",
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
    let ms = crate::event::parse_time_ms(text).map_err(|_| {
        reject(
            GrantRejectCode::InvalidTime,
            format!("`{field}` must be an RFC 3339 time"),
        )
    })?;
    Ok(Some((ms, crate::event::format_time_ms(ms))))
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
        if amount.scale() > precision {
            return Err(reject(
                GrantRejectCode::InvalidAmount,
                format!("`amount` has more decimal places than {currency} has ({precision})"),
            ));
        }
        let priority = match self.priority {
            None => DEFAULT_PRIORITY,
            Some(p) => u16::try_from(p)
                .ok()
                .filter(|p| *p <= MAX_PRIORITY)
                .ok_or_else(|| {
                    reject(
                        GrantRejectCode::PriorityOutOfRange,
                        format!("`priority` must be 0–{MAX_PRIORITY} (lower burns first)"),
                    )
                })?,
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
                let amount = exact_amount(&paid.amount);
                let precision = catalog.precision(&paid.currency);
                match amount {
                    Some(amount) if precision.is_some_and(|p| amount.scale() <= p) => Some(Money {
                        amount,
                        currency: paid.currency,
                    }),
                    _ => {
                        return Err(reject(
                            GrantRejectCode::InvalidPaid,
                            "`paid` must be a positive amount in a known currency",
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
            v: 1,
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
    serde_json::to_vec(record).unwrap_or_default()
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
    /// What was left of a grant when it expired.
    Expire,
    /// What was left of a grant when it was voided.
    Void,
    /// Usage no grant covered: the amount due (negative: owed back). The balance is unchanged.
    Uncovered,
    /// A grant or void that changed nothing because it was refused (`code` says why).
    GrantRefused,
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
        }
    }

    /// Every kind, for metrics.
    pub const ALL: [Self; 7] = [
        Self::Grant,
        Self::Consume,
        Self::Restore,
        Self::Expire,
        Self::Void,
        Self::Uncovered,
        Self::GrantRefused,
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
    /// What caused it: a line item id, a grant id, or `tick/<ms>`.
    pub cause: String,
    /// The grant it touches, if any.
    pub grant: Option<String>,
    pub series: Option<Series>,
    /// Signed: what the entry adds to the balance (uncovered: to the amount due).
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub balance_before: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub balance_after: Decimal,
    /// For `grant_refused`: the stable code.
    pub code: Option<String>,
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
    format!(
        "be_{}",
        digest(&[
            b"neruba.balance_entry.v1",
            tenant.as_bytes(),
            customer.as_bytes(),
            cause.as_bytes(),
            &[u8::from(grant.is_some())],
            grant.unwrap_or_default().as_bytes(),
            kind.as_str().as_bytes(),
            &ordinal.to_be_bytes(),
        ])
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
    fn ids_are_injective_over_their_parts() {
        assert_ne!(grant_id("a", "b/c", "d"), grant_id("a", "b", "c/d"));
        assert_ne!(
            entry_id("a", "b", "c", None, EntryKind::Consume, 1),
            entry_id("a", "b", "c", Some(""), EntryKind::Consume, 1)
        );
    }
}
