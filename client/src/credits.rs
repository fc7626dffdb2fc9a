//! Credit writes: grants, voids and balance rules (`POST /v1/customers/{customer}/grants`,
//! `POST …/grants/{id}/void`, `PUT`/`DELETE …/balance-rules/{currency}`). They need a key
//! with the `credits` scope.
//!
//! Invariants:
//! - amounts are [`Decimal`]s and travel as decimal strings: never through `f64`;
//! - `Ok` means the gateway answered `202`, which it does only once the broker acknowledged
//!   the record (`acks=all`); the answer says where it landed ([`Position`]);
//! - every write may be retried (429, 503, transport failures) without doubling: a grant's
//!   id is a function of tenant, customer and `key`, so a retry names the same grant, and
//!   the balances stage applies a key once; a void or a rule applied twice is applied once.

use crate::Client;
use crate::error::{Error, Result};
use reqwest::Method;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A grant of prepaid credit to one customer.
///
/// ```
/// use neruba_client::GrantRequest;
/// use rust_decimal::Decimal;
///
/// let grant = GrantRequest::new("purchase-2026-11-24", Decimal::new(50, 0), "USD")
///     .with_priority(5)
///     .with_expires_at("2027-11-24T00:00:00Z")
///     .with_paid(Decimal::new(45, 0), "USD");
/// assert_eq!(grant.priority, Some(5));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantRequest {
    /// The idempotency key, unique per tenant and customer (1–200 bytes). The grant's id is
    /// derived from it, so sending the same request again names the same grant.
    pub key: String,
    /// How much credit: positive, below 10^18.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// An ISO 4217 code or a unit of the catalog (e.g. `credits`).
    pub currency: String,
    /// 0–1000, lower burns first; `None`: the gateway's default, 10.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
    /// RFC 3339; usage in windows starting at or after it may draw on the grant. `None`: any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective_at: Option<String>,
    /// RFC 3339, exclusive. `None`: never expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// What was paid for a purchased pack; `None` for promotional credit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paid: Option<Paid>,
    /// At most 32 entries, names and values at most 512 bytes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// What was paid for a grant (sent with a grant, and read back with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paid {
    /// The amount paid, positive.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// Its currency.
    pub currency: String,
}

impl GrantRequest {
    /// A grant of `amount` `currency` under the idempotency `key`; the other terms are the
    /// gateway's defaults until set.
    pub fn new(key: impl Into<String>, amount: Decimal, currency: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            amount,
            currency: currency.into(),
            priority: None,
            effective_at: None,
            expires_at: None,
            paid: None,
            metadata: BTreeMap::new(),
        }
    }

    /// Sets the burn-down priority (lower burns first).
    pub fn with_priority(mut self, priority: u16) -> Self {
        self.priority = Some(priority);
        self
    }

    /// Sets when the grant starts to apply (RFC 3339).
    pub fn with_effective_at(mut self, time: impl Into<String>) -> Self {
        self.effective_at = Some(time.into());
        self
    }

    /// Sets when the grant expires (RFC 3339, exclusive).
    pub fn with_expires_at(mut self, time: impl Into<String>) -> Self {
        self.expires_at = Some(time.into());
        self
    }

    /// Records what was paid for it.
    pub fn with_paid(mut self, amount: Decimal, currency: impl Into<String>) -> Self {
        self.paid = Some(Paid {
            amount,
            currency: currency.into(),
        });
        self
    }

    /// Adds one metadata entry.
    pub fn with_metadata(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(name.into(), value.into());
        self
    }
}

/// Where a record landed: a grant, void or rule on the ledger topic, or events on the events
/// topic ([`Ingestor::positions`](crate::Ingestor::positions)). A read at it
/// ([`Reader::at`](crate::Reader::at)) sees the record.
///
/// It prints, and parses from, the `min_position` form `<topic>:<partition>:<offset>`:
///
/// ```
/// use neruba_client::Position;
///
/// let position: Position = "neruba.ledger:2:41".parse()?;
/// assert_eq!(position, Position::new("neruba.ledger", 2, 41));
/// assert_eq!(position.to_string(), "neruba.ledger:2:41");
/// # Ok::<(), neruba_client::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[non_exhaustive]
pub struct Position {
    /// The topic: the ledger for credit writes, the events topic for events.
    pub topic: String,
    /// The partition (for a credit write, the customer's).
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
}

impl Position {
    /// The record at `offset` of `topic`'s `partition` (as a write answered it, kept
    /// somewhere).
    pub fn new(topic: impl Into<String>, partition: i32, offset: i64) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.topic, self.partition, self.offset)
    }
}

impl std::str::FromStr for Position {
    type Err = Error;

    /// `<topic>:<partition>:<offset>`; the topic may itself hold `:`.
    fn from_str(text: &str) -> Result<Self> {
        let bad =
            || Error::InvalidArgument(format!("`{text}` is not `<topic>:<partition>:<offset>`"));
        let mut parts = text.rsplitn(3, ':');
        let offset = parts.next().and_then(|o| o.parse().ok()).ok_or_else(bad)?;
        let partition = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let topic = parts.next().filter(|t| !t.is_empty()).ok_or_else(bad)?;
        Ok(Self::new(topic, partition, offset))
    }
}

/// The `202` answer to a grant.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct GrantAccepted {
    /// The grant's deterministic id, `gr_` and 32 hex digits (from tenant, customer, key).
    pub id: String,
    /// `accepted`.
    pub status: String,
    /// Where it landed.
    pub position: Position,
}

/// The `202` answer to a void.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct VoidAccepted {
    /// The grant voided.
    pub grant: String,
    /// `accepted`.
    pub status: String,
    /// Where the void landed.
    pub position: Position,
}

/// The `202` answer to setting or removing a balance rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct RuleAccepted {
    /// The customer.
    pub customer: String,
    /// The rule's currency.
    pub currency: String,
    /// `accepted`.
    pub status: String,
    /// Where the rule landed.
    pub position: Position,
}

/// `PUT …/balance-rules/{currency}`'s body.
#[derive(Debug, Serialize)]
struct RuleBody {
    #[serde(with = "rust_decimal::serde::str")]
    low_balance_threshold: Decimal,
    #[serde(
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    recharge_to: Option<Decimal>,
}

impl Client {
    /// Grants credit to `customer`. `Ok` once the broker has the grant; a refusal is
    /// [`Error::Refused`] with the gateway's stable code (`invalid_amount`,
    /// `unknown_currency`, …).
    ///
    /// Sending the same request again is safe and answers the same id. The same key with
    /// other terms is accepted here too, and refused by the balances stage (`key_conflict`), as
    /// is a new grant past the customer's 1,000 grants holding credit or 256 KiB of their keys
    /// and metadata (`too_many_grants`; the same request applies once one is used up or ended).
    pub async fn grant(&self, customer: &str, request: &GrantRequest) -> Result<GrantAccepted> {
        let body = to_json(request)?;
        self.transport
            .write(
                Method::POST,
                &["v1", "customers", customer, "grants"],
                Some(body),
                "grant answer",
            )
            .await
    }

    /// Voids what is left of `customer`'s grant `grant_id` (`gr_…`).
    pub async fn void(&self, customer: &str, grant_id: &str) -> Result<VoidAccepted> {
        self.transport
            .write(
                Method::POST,
                &["v1", "customers", customer, "grants", grant_id, "void"],
                None,
                "void answer",
            )
            .await
    }

    /// Sets `customer`'s low-balance rule in `currency`, replacing any earlier one: crossing
    /// below `threshold` is flagged, and with `recharge_to` a top-up up to it is requested.
    /// Neither may have more decimal places than the currency, trailing zeros aside (`10.000`
    /// USD is kept as `10.00`).
    pub async fn set_balance_rule(
        &self,
        customer: &str,
        currency: &str,
        threshold: Decimal,
        recharge_to: Option<Decimal>,
    ) -> Result<RuleAccepted> {
        let body = to_json(&RuleBody {
            low_balance_threshold: threshold,
            recharge_to,
        })?;
        self.transport
            .write(
                Method::PUT,
                &["v1", "customers", customer, "balance-rules", currency],
                Some(body),
                "balance rule answer",
            )
            .await
    }

    /// Removes `customer`'s balance rule in `currency`.
    pub async fn remove_balance_rule(
        &self,
        customer: &str,
        currency: &str,
    ) -> Result<RuleAccepted> {
        self.transport
            .write(
                Method::DELETE,
                &["v1", "customers", customer, "balance-rules", currency],
                None,
                "balance rule answer",
            )
            .await
    }
}

fn to_json(value: &impl Serialize) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::InvalidArgument(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_sent_as_decimal_strings_and_unset_terms_are_left_out() -> Result<()> {
        let grant = GrantRequest::new("k-1", Decimal::new(2550, 2), "USD");
        assert_eq!(
            String::from_utf8_lossy(&to_json(&grant)?),
            r#"{"key":"k-1","amount":"25.50","currency":"USD"}"#
        );
        let full = grant
            .with_priority(5)
            .with_effective_at("2026-11-01T00:00:00Z")
            .with_expires_at("2027-01-01T00:00:00Z")
            .with_paid(Decimal::new(20, 0), "USD")
            .with_metadata("order", "o-17");
        assert_eq!(
            String::from_utf8_lossy(&to_json(&full)?),
            r#"{"key":"k-1","amount":"25.50","currency":"USD","priority":5,"effective_at":"2026-11-01T00:00:00Z","expires_at":"2027-01-01T00:00:00Z","paid":{"amount":"20","currency":"USD"},"metadata":{"order":"o-17"}}"#
        );
        let rule = RuleBody {
            low_balance_threshold: Decimal::new(1000, 2),
            recharge_to: None,
        };
        assert_eq!(
            String::from_utf8_lossy(&to_json(&rule)?),
            r#"{"low_balance_threshold":"10.00"}"#
        );
        Ok(())
    }
}
