//! The line item: what the rater writes to the ledger topic.
//!
//! Invariants:
//! - the `id` is a function of (tenant, customer, meter, group, period, window, revision, price
//!   plan and version) only — never of wall-clock time or of processing order — so replaying the
//!   same events yields the same ids, and a ledger consumer dedupes by `id`;
//! - `amount` is the delta against what was already emitted for the period, so the amounts of a
//!   period's items sum to its `period_amount` as of the latest item;
//! - quantities and amounts are exact decimals, written as strings; times are RFC 3339 UTC.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// What a line item records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A window closed for the first time.
    Usage,
    /// A window was revised by late events (or re-priced by a rerun); supersedes an earlier item.
    Adjustment,
    /// A window of a meter priced by a `flat` plan: the period fee falls on the first.
    Flat,
}

/// One priced line item on the ledger topic.
///
/// Kafka key: [`LineItem::partition_key`] (`tenant/customer`), so one customer's items stay in
/// order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineItem {
    pub v: u8,
    pub id: String,
    pub kind: Kind,
    pub tenant: String,
    pub customer: String,
    pub meter: String,
    pub group: BTreeMap<String, String>,
    pub period_start: String,
    pub period_end: String,
    pub window_start: String,
    pub window_end: String,
    #[serde(with = "crate::decimal::stored")]
    pub window_quantity: Decimal,
    pub window_events: u64,
    #[serde(with = "crate::decimal::stored")]
    pub period_quantity: Decimal,
    /// The delta this item adds to the period's total.
    #[serde(with = "crate::decimal::stored")]
    pub amount: Decimal,
    /// The price of `period_quantity`: the period's total once this item is counted.
    #[serde(with = "crate::decimal::stored")]
    pub period_amount: Decimal,
    pub currency: String,
    pub price_plan: String,
    pub price_version: u32,
    /// The window's revision this item prices (1 at first close).
    pub revision: u32,
    /// The item this one replaces for the same window, if any.
    pub supersedes: Option<String>,
}

/// What a line item id is derived from.
#[derive(Debug, Clone, Copy)]
pub struct IdParts<'a> {
    pub tenant: &'a str,
    pub customer: &'a str,
    pub meter: &'a str,
    pub group: &'a BTreeMap<String, String>,
    pub period_start_ms: i64,
    pub window_start_ms: i64,
    pub revision: u32,
    pub price_plan: &'a str,
    pub price_version: u32,
    /// The rerun request an adjustment answers ([`Rerun::key`]); `None` for window items.
    pub rerun: Option<&'a str>,
}

/// `prefix` and 32 hex digits of SHA-256 over `parts`, each length-prefixed (8 bytes
/// big-endian), so the encoding is injective whatever bytes a part holds: every deterministic
/// id (line items, grants, statements, balance entries). One allocation: the stages derive an
/// id for every entry they write.
pub fn digest_id(prefix: &str, parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
        hasher.update(part);
    }
    let hash = hasher.finalize();
    let mut digits = [0_u8; 32];
    // 16 bytes always fit 32 digits, and hex digits are ASCII.
    let text = match hex::encode_to_slice(hash.get(..16).unwrap_or_default(), &mut digits) {
        Ok(()) => std::str::from_utf8(&digits).unwrap_or_default(),
        Err(_) => "",
    };
    let mut id = String::with_capacity(prefix.len() + text.len());
    id.push_str(prefix);
    id.push_str(text);
    id
}

/// The deterministic id: `li_` and the [`digest_id`] of its parts.
pub fn line_item_id(parts: &IdParts<'_>) -> String {
    let group_len = u64::try_from(parts.group.len())
        .unwrap_or(u64::MAX)
        .to_be_bytes();
    let (period, window) = (
        parts.period_start_ms.to_be_bytes(),
        parts.window_start_ms.to_be_bytes(),
    );
    let (revision, version) = (
        parts.revision.to_be_bytes(),
        parts.price_version.to_be_bytes(),
    );
    let mut fields: Vec<&[u8]> = vec![
        b"neruba.line_item.v1",
        parts.tenant.as_bytes(),
        parts.customer.as_bytes(),
        parts.meter.as_bytes(),
        &group_len,
    ];
    for (name, value) in parts.group {
        fields.push(name.as_bytes());
        fields.push(value.as_bytes());
    }
    fields.extend([
        &period[..],
        &window[..],
        &revision[..],
        parts.price_plan.as_bytes(),
        &version[..],
    ]);
    if let Some(rerun) = parts.rerun {
        fields.push(b"rerun");
        fields.push(rerun.as_bytes());
    }
    digest_id("li_", &fields)
}

/// A request to re-price a tenant's billing periods under the plan versions now in force
/// (`neruba rater rerun`). It travels on the rollups topic, one copy per partition, with the
/// header [`crate::topics::RERUN_HEADER`], so each rater handles it in order with its rollups
/// and a replay handles it at the same point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rerun {
    pub v: u8,
    pub tenant: String,
    /// Periods that overlap `[from_ms, to_ms)` are re-priced.
    pub from_ms: i64,
    pub to_ms: i64,
    /// When it was requested (Unix ms): makes each request's key, and so its items' ids,
    /// distinct from an earlier request's.
    pub requested_ms: i64,
}

impl Rerun {
    /// The message key, unique per request (the rollups topic is compacted on keys).
    pub fn key(&self) -> String {
        format!(
            "neruba-rerun/{}/{}/{}/{}",
            self.tenant, self.from_ms, self.to_ms, self.requested_ms
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> crate::Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| crate::Error::Decode(e.to_string()))
    }
}

impl LineItem {
    /// The partitioning key: `tenant/customer`.
    pub fn partition_key(&self) -> String {
        format!("{}/{}", self.tenant, self.customer)
    }

    /// JSON encoding for the ledger topic.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a ledger-topic message.
    pub fn decode(bytes: &[u8]) -> crate::Result<Self> {
        let item: LineItem =
            serde_json::from_slice(bytes).map_err(|e| crate::Error::Decode(e.to_string()))?;
        if item.v != 1 {
            return Err(crate::Error::Decode(format!(
                "line item version {} is not supported",
                item.v
            )));
        }
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids already on ledgers must never change: the scheme as first written (one hasher fed
    /// length-prefixed fields), against [`line_item_id`].
    #[test]
    fn line_item_ids_keep_their_original_scheme() {
        let group = BTreeMap::from([("model".to_owned(), "large".to_owned())]);
        let rerun = Some("neruba-rerun/acme/0/1/2");
        for rerun in [None, rerun] {
            let parts = IdParts {
                tenant: "acme",
                customer: "c/7",
                meter: "llm_tokens",
                group: &group,
                period_start_ms: 1_793_491_200_000,
                window_start_ms: 1_793_491_260_000,
                revision: 2,
                price_plan: "llm-tokens-standard",
                price_version: 3,
                rerun,
            };
            let mut hasher = Sha256::new();
            let mut field = |bytes: &[u8]| {
                hasher.update((bytes.len() as u64).to_be_bytes());
                hasher.update(bytes);
            };
            field(b"neruba.line_item.v1");
            field(b"acme");
            field(b"c/7");
            field(b"llm_tokens");
            field(&1u64.to_be_bytes());
            field(b"model");
            field(b"large");
            field(&1_793_491_200_000i64.to_be_bytes());
            field(&1_793_491_260_000i64.to_be_bytes());
            field(&2u32.to_be_bytes());
            field(b"llm-tokens-standard");
            field(&3u32.to_be_bytes());
            if let Some(rerun) = rerun {
                field(b"rerun");
                field(rerun.as_bytes());
            }
            let digest = hasher.finalize();
            let expected = format!("li_{}", hex::encode(&digest[..16]));
            assert_eq!(line_item_id(&parts), expected);
        }
    }

    fn parts<'a>(group: &'a BTreeMap<String, String>) -> IdParts<'a> {
        IdParts {
            tenant: "acme",
            customer: "c1",
            meter: "tokens",
            group,
            period_start_ms: 0,
            window_start_ms: 60_000,
            revision: 1,
            price_plan: "tokens-usd",
            price_version: 1,
            rerun: None,
        }
    }

    #[test]
    fn ids_depend_on_every_part_and_nothing_else() {
        let group = BTreeMap::from([("model".to_owned(), "small".to_owned())]);
        let base = line_item_id(&parts(&group));
        assert_eq!(base, line_item_id(&parts(&group)));
        assert_eq!(base.len(), 3 + 32);
        let other_group = BTreeMap::from([("model".to_owned(), "large".to_owned())]);
        let variants = [
            line_item_id(&IdParts {
                revision: 2,
                ..parts(&group)
            }),
            line_item_id(&IdParts {
                price_version: 2,
                ..parts(&group)
            }),
            line_item_id(&IdParts {
                window_start_ms: 120_000,
                ..parts(&group)
            }),
            line_item_id(&parts(&other_group)),
            line_item_id(&IdParts {
                rerun: Some("neruba-rerun/acme/1"),
                ..parts(&group)
            }),
            // Moving a character between customer and meter must not collide.
            line_item_id(&IdParts {
                customer: "c1t",
                meter: "okens",
                ..parts(&group)
            }),
        ];
        for variant in variants {
            assert_ne!(variant, base);
        }
    }

    #[test]
    fn encoding_round_trips_with_decimal_strings() {
        let item = LineItem {
            v: 1,
            id: "li_x".into(),
            kind: Kind::Adjustment,
            tenant: "acme".into(),
            customer: "c1".into(),
            meter: "tokens".into(),
            group: BTreeMap::new(),
            period_start: "2026-11-01T00:00:00.000Z".into(),
            period_end: "2026-12-01T00:00:00.000Z".into(),
            window_start: "2026-11-24T10:00:00.000Z".into(),
            window_end: "2026-11-24T10:01:00.000Z".into(),
            window_quantity: Decimal::new(1_000_000_000_000_000_001, 18),
            window_events: 3,
            period_quantity: Decimal::new(25, 1),
            amount: Decimal::new(-5, 2),
            period_amount: Decimal::new(120, 2),
            currency: "USD".into(),
            price_plan: "tokens-usd".into(),
            price_version: 1,
            revision: 2,
            supersedes: Some("li_y".into()),
        };
        let bytes = item.encode();
        let text = String::from_utf8(bytes.clone()).expect("utf-8");
        assert!(text.contains(r#""window_quantity":"1.000000000000000001""#));
        assert!(text.contains(r#""amount":"-0.05""#));
        assert!(text.contains(r#""kind":"adjustment""#));
        assert_eq!(LineItem::decode(&bytes).expect("decodes"), item);
    }
}
