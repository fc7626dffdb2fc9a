//! The catalog: tenants, their hashed API keys, meters and price plans, from a TOML or YAML file.
//!
//! Invariants:
//! - API keys exist only as SHA-256 digests; a plaintext key is hashed on arrival and compared
//!   by digest, so the catalog file can be shared with operators without leaking credentials;
//! - a catalog that loads is internally consistent: every price plan names a meter of its own
//!   tenant, tiers ascend, currencies are known, amounts are exact decimals (never floats);
//! - every error names the file, and where it can the tenant and the field, so the person who
//!   edits the file can fix it from the message alone.
//!
//! This file holds the model and its lookups. Beside it:
//! - `parse.rs`: catalog text (TOML or YAML) to a validated [`Catalog`], and every rule a
//!   catalog must satisfy to load;
//! - `file.rs`: [`Catalog::load`], reading a catalog file: the only IO in this crate;
//! - `live.rs`: [`LiveCatalog`], the catalog a running component swaps on reload, and the rule
//!   for which successor it accepts: every meter known keeps its shape ([`MeterShape`],
//!   [`Catalog::keeps_shapes`]).

mod file;
mod live;
mod parse;

pub use live::{LiveCatalog, MeterShape, MeterShapes};

use crate::codec::binary::Encoded;
use crate::currency;
use crate::decimal::{deserialize_exact, deserialize_exact_opt};
use crate::event::Event;
use crate::json_path::JsonPath;
use crate::measure::Found;
use crate::reject::RejectCode;
use crate::reject::Rejection;
use ahash::AHashMap;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// A loaded, validated catalog.
#[derive(Debug, Clone)]
pub struct Catalog {
    units: BTreeMap<String, CustomUnit>,
    tenants: Vec<Tenant>,
    by_key_digest: AHashMap<[u8; 32], (usize, usize)>,
    /// The text it was read from, so a stage can keep the catalog it applied with its state
    /// ([`Catalog::encode_source`]).
    source: std::sync::Arc<Source>,
}

/// A catalog's format and text, and their SHA-256.
#[derive(Debug)]
struct Source {
    format: Format,
    text: String,
    digest: [u8; 32],
}

impl Source {
    fn new(format: Format, text: &str) -> Self {
        let mut hash = Sha256::new();
        hash.update([format.tag()]);
        hash.update(text.as_bytes());
        Self {
            format,
            text: text.to_owned(),
            digest: hash.finalize().into(),
        }
    }
}

/// The formats a catalog is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Toml,
    Yaml,
}

impl Format {
    /// The byte that names the format in an encoded source.
    fn tag(self) -> u8 {
        match self {
            Self::Toml => b't',
            Self::Yaml => b'y',
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            b't' => Some(Self::Toml),
            b'y' => Some(Self::Yaml),
            _ => None,
        }
    }
}

/// A unit of account that is not an ISO 4217 currency, e.g. prepaid `credits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomUnit {
    /// Decimal digits kept when rounding amounts in this unit.
    pub precision: u32,
}

/// One tenant: the isolation boundary for keys, meters, prices and data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// Stable identifier: lower-case letters, digits, `-` and `_`.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Ingest rate limit; absent means unlimited.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
    #[serde(default)]
    pub meters: Vec<Meter>,
    #[serde(default)]
    pub price_plans: Vec<PricePlan>,
}

/// Token-bucket limit on accepted-or-checked events per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub events_per_second: u32,
    /// Largest burst; defaults to one second's worth.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Send usage events.
    Ingest,
    /// Read line items and explanations.
    Read,
    /// Grant and void prepaid credit.
    Credits,
}

/// An API key, stored as the hex SHA-256 digest of the secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Label for operators (shown in logs instead of the key).
    pub name: String,
    /// Lower-case hex SHA-256 of the key; see [`hash_key`].
    pub sha256: String,
    pub scopes: BTreeSet<Scope>,
}

/// How a meter folds the values of matching events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    Sum,
    Count,
    Min,
    Max,
    Avg,
    UniqueCount,
    Latest,
}

impl Aggregation {
    /// Whether the quantity reads the sum of values (`sum`, `avg`).
    pub fn sums(self) -> bool {
        matches!(self, Aggregation::Sum | Aggregation::Avg)
    }
}

/// A meter: which events count and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meter {
    /// Identifier, unique within the tenant.
    pub key: String,
    /// The CloudEvents `type` this meter reads.
    pub event_type: String,
    pub aggregation: Aggregation,
    /// Where the value is in `data`; required for every aggregation but `count`.
    #[serde(default)]
    pub value: Option<JsonPath>,
    /// Named dimensions, each a path into `data`; the line items are split by them.
    #[serde(default)]
    pub group_by: BTreeMap<String, JsonPath>,
    /// Equality filters: every path must hold exactly this scalar.
    #[serde(default, deserialize_with = "parse::deserialize_filters")]
    pub filters: Vec<Filter>,
    /// Tumbling window size, e.g. `1m`, `5m`, `1h`, `1d`.
    #[serde(deserialize_with = "parse::deserialize_duration")]
    pub window: Duration,
    #[serde(default)]
    pub billing_period: BillingPeriod,
    /// Whether a negative value counts (a correction an event sends, such as a refund of
    /// usage). Off by default: a negative value is then refused at the door
    /// (`invalid_value`), rather than accepted and later unpriceable.
    #[serde(default)]
    pub allow_negative: bool,
}

/// One equality filter of a meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub path: JsonPath,
    /// The scalar's text: strings as written, numbers by their exact text, `true`/`false`.
    pub equals: String,
}

/// The billing period: a calendar month starting on `anchor_day` in `time_zone`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingPeriod {
    /// Day of the month the period starts on (1–28).
    #[serde(default = "default_anchor_day")]
    pub anchor_day: u8,
    /// `UTC` or a fixed offset such as `+02:00`.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
}

fn default_anchor_day() -> u8 {
    1
}

fn default_time_zone() -> String {
    "UTC".to_owned()
}

impl Default for BillingPeriod {
    fn default() -> Self {
        Self {
            anchor_day: default_anchor_day(),
            time_zone: default_time_zone(),
        }
    }
}

/// A versioned, effective-dated price for one meter, in one currency.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricePlan {
    /// Identifier shown on line items.
    pub id: String,
    /// The meter this plan prices.
    pub meter: String,
    /// Increases with each change of this plan.
    pub version: u32,
    /// First day (in the meter's billing time zone) this version is in force, `YYYY-MM-DD`.
    #[serde(deserialize_with = "parse::deserialize_date")]
    pub effective_from: time::Date,
    /// ISO 4217 code or a custom unit from `[units]`.
    pub currency: String,
    pub model: PriceModel,
    /// Free units per period, subtracted before the model prices the rest.
    #[serde(default, deserialize_with = "deserialize_exact")]
    pub included_units: Decimal,
    /// Smallest amount charged for a period with usage.
    #[serde(default, deserialize_with = "deserialize_exact_opt")]
    pub minimum: Option<Decimal>,
    /// Largest amount charged for a period.
    #[serde(default, deserialize_with = "deserialize_exact_opt")]
    pub maximum: Option<Decimal>,
}

/// How a period's quantity becomes an amount.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum PriceModel {
    /// Every unit at one price.
    Unit {
        #[serde(deserialize_with = "deserialize_exact")]
        unit_price: Decimal,
    },
    /// Each tier prices the units inside it.
    Graduated { tiers: Vec<Tier> },
    /// All units at the tier the total falls in.
    Volume { tiers: Vec<Tier> },
    /// Units sold in packages of `size`, partial packages rounded up or down.
    Package {
        #[serde(deserialize_with = "deserialize_exact")]
        size: Decimal,
        #[serde(deserialize_with = "deserialize_exact")]
        price: Decimal,
        #[serde(default)]
        rounding: PackageRounding,
    },
    /// A fee per billing period, whatever the usage.
    Flat {
        #[serde(deserialize_with = "deserialize_exact")]
        fee: Decimal,
    },
}

/// One tier; `up_to` is inclusive and absent on the last, unbounded tier.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    #[serde(default, deserialize_with = "deserialize_exact_opt")]
    pub up_to: Option<Decimal>,
    #[serde(default, deserialize_with = "deserialize_exact")]
    pub unit_price: Decimal,
    #[serde(default, deserialize_with = "deserialize_exact")]
    pub flat_fee: Decimal,
}

/// Whether a partial package is charged as a whole one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackageRounding {
    #[default]
    Up,
    Down,
}

/// Hex SHA-256 of an API key, the form the catalog stores.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Catalog {
    /// SHA-256 of the catalog's format and text: two catalogs with the same digest were read
    /// from the same text (a change of layout or comments alone changes it too).
    pub fn digest(&self) -> [u8; 32] {
        self.source.digest
    }

    /// The catalog's format (one byte) and text, read back by
    /// [`Catalog::from_encoded_source`]. API keys are in it only as their digests.
    pub fn encode_source(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(1 + self.source.text.len());
        bytes.push(self.source.format.tag());
        bytes.extend_from_slice(self.source.text.as_bytes());
        bytes
    }

    /// The tenant and key a plaintext API key belongs to.
    pub fn authenticate(&self, key: &str) -> Option<(&Tenant, &ApiKey)> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let (t, k) = *self.by_key_digest.get(&digest)?;
        let tenant = self.tenants.get(t)?;
        Some((tenant, tenant.api_keys.get(k)?))
    }

    /// A tenant by id.
    pub fn tenant(&self, id: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.id == id)
    }

    /// All tenants, in file order.
    pub fn tenants(&self) -> &[Tenant] {
        &self.tenants
    }

    /// The longest window of any meter, ms (0 with no meter).
    pub fn longest_window_ms(&self) -> i64 {
        self.tenants
            .iter()
            .flat_map(|t| &t.meters)
            .map(Meter::window_ms)
            .max()
            .unwrap_or(0)
    }

    /// Decimal digits amounts in `currency` are rounded to, if the unit is known.
    pub fn precision(&self, currency: &str) -> Option<u32> {
        currency::iso_minor_units(currency)
            .or_else(|| self.units.get(currency).map(|u| u.precision))
    }
}

impl Tenant {
    /// Meters that read events of this type.
    pub fn meters_for<'a, 'b>(
        &'a self,
        event_type: &'b str,
    ) -> impl Iterator<Item = &'a Meter> + use<'a, 'b> {
        self.meters
            .iter()
            .filter(move |m| m.event_type == event_type)
    }

    /// Checks that every meter that would count `event` can read the value it needs, so a bad
    /// value is refused at the door (`invalid_value`) rather than discovered downstream (with
    /// the doors' bound on decimal places, [`crate::measure::judge_at_door`]). An
    /// event no meter reads is fine here: the gateway accepts it and the aggregator keeps it on
    /// the dead-letter topic for replay.
    pub fn check_values(&self, event: &Event) -> Result<(), Rejection> {
        for meter in self.meters_for(&event.event_type) {
            if meter.passes(&event.data) {
                crate::measure::read_value_at_door(meter, &event.data)?;
            }
        }
        Ok(())
    }

    /// [`Tenant::check_values`] of the event a version 2 message stands for, of `event_type`,
    /// its `data` read where it lies in the message ([`Encoded`]): the same outcome, message
    /// included, with no value built.
    pub fn check_encoded(&self, event_type: &str, data: Encoded<'_>) -> Result<(), Rejection> {
        let lookup = |path: &JsonPath| {
            // Found and held whole: a value cut short is unreadable, not a wrong value.
            path.lookup_encoded(data)
                .and_then(|found| found.map(Encoded::whole).transpose())
                .map_err(|e| {
                    Rejection::new(
                        RejectCode::InvalidJson,
                        format!("the event's data cannot be read back: {e}"),
                    )
                })
        };
        for meter in self.meters_for(event_type) {
            if meter.passes_by(lookup)? {
                let value = match &meter.value {
                    Some(path) => Some((path, lookup(path)?)),
                    None => None,
                };
                crate::measure::judge_at_door(meter, value)?;
            }
        }
        Ok(())
    }
}

impl Meter {
    /// Window size in milliseconds (validated: whole seconds dividing a day).
    pub fn window_ms(&self) -> i64 {
        i64::try_from(self.window.as_millis()).unwrap_or(86_400_000)
    }

    /// The billing time zone's offset east of UTC in seconds (validated at load).
    pub fn offset_secs(&self) -> i32 {
        parse_fixed_offset(&self.billing_period.time_zone).unwrap_or(0)
    }

    /// Whether an event's `data` passes every filter of this meter.
    pub fn passes(&self, data: &serde_json::Map<String, serde_json::Value>) -> bool {
        let found = self.passes_by(|path| Ok::<_, std::convert::Infallible>(path.lookup_in(data)));
        found.unwrap_or_else(|never| match never {})
    }

    /// [`Meter::passes`] of the `data` in which `lookup` finds each filter's path, however it
    /// is held; `lookup`'s first error.
    pub fn passes_by<'d, F: Found<'d>, E>(
        &self,
        mut lookup: impl FnMut(&JsonPath) -> Result<Option<F>, E>,
    ) -> Result<bool, E> {
        for filter in &self.filters {
            if lookup(&filter.path)?
                .and_then(Found::scalar_text)
                .as_deref()
                != Some(&filter.equals)
            {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The text of a scalar JSON value, as filters and group keys compare it.
pub fn scalar_text(value: &serde_json::Value) -> Option<std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    match value {
        serde_json::Value::String(s) => Some(Cow::Borrowed(s)),
        serde_json::Value::Number(n) => Some(Cow::Borrowed(n.as_str())),
        serde_json::Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}
/// `UTC` or `±HH:MM` as seconds east of UTC.
pub fn parse_fixed_offset(text: &str) -> Option<i32> {
    if text == "UTC" || text == "Z" {
        return Some(0);
    }
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if h > 14 || m > 59 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reject::RejectCode;

    const VALID: &str = r#"
[units.credits]
precision = 4

[[tenants]]
id = "acme"

[[tenants.api_keys]]
name = "ingest"
sha256 = "HASH"
scopes = ["ingest"]

[[tenants.meters]]
key = "tokens"
event_type = "llm.completion"
aggregation = "sum"
value = "$.tokens"
group_by = { model = "$.model" }
filters = { "$.status" = "ok" }
window = "1m"

[[tenants.price_plans]]
id = "tokens-std"
meter = "tokens"
version = 1
effective_from = "2026-01-01"
currency = "USD"
included_units = "1000"
model = { type = "graduated", tiers = [ { up_to = "10000", unit_price = "0.002" }, { unit_price = "0.001" } ] }
"#;

    pub(super) fn valid_text() -> String {
        VALID.replace("HASH", &hash_key("secret-1"))
    }

    #[test]
    fn keys_authenticate_by_digest_only() {
        let catalog = Catalog::from_toml_str(&valid_text(), "test.toml").expect("catalog");
        let (tenant, key) = catalog.authenticate("secret-1").expect("known key");
        assert_eq!(tenant.id, "acme");
        assert!(key.scopes.contains(&Scope::Ingest));
        assert!(catalog.authenticate("secret-2").is_none());
        assert_eq!(catalog.precision("credits"), Some(4));
        assert_eq!(catalog.precision("JPY"), Some(0));
    }

    #[test]
    fn an_encoded_source_reads_back_as_the_same_catalog_and_digest() {
        let text = valid_text();
        let catalog = Catalog::from_toml_str(&text, "test.toml").expect("catalog");
        let encoded = catalog.encode_source();
        assert_eq!(encoded.first(), Some(&b't'));
        let back = Catalog::from_encoded_source(&encoded, "kept").expect("reads back");
        assert_eq!(back.digest(), catalog.digest());
        assert_eq!(back.encode_source(), encoded);
        assert_eq!(back.tenant("acme").map(|t| t.meters.len()), Some(1));
        // The same text as YAML is another source: the format is part of the digest.
        let yaml = "units: {credits: {precision: 4}}\ntenants: []\n";
        let from_yaml = Catalog::from_yaml_str(yaml, "test.yaml").expect("yaml");
        let back = Catalog::from_encoded_source(&from_yaml.encode_source(), "kept").expect("yaml");
        assert_eq!(back.digest(), from_yaml.digest());
        assert_ne!(back.digest(), catalog.digest());
        // A comment alone changes the digest: it is of the text.
        let commented = Catalog::from_toml_str(&format!("# edited\n{text}"), "t").expect("toml");
        assert_ne!(commented.digest(), catalog.digest());
        for bad in [&b""[..], b"xtenants = []", b"t\xff"] {
            assert!(
                matches!(
                    Catalog::from_encoded_source(bad, "kept"),
                    Err(crate::Error::CatalogSyntax { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn filters_and_values_decide_invalid_value() {
        let catalog = Catalog::from_toml_str(&valid_text(), "test.toml").expect("catalog");
        let tenant = catalog.tenant("acme").expect("tenant");
        let event = |data: serde_json::Value| Event {
            tenant: "acme".into(),
            id: "1".into(),
            event_type: "llm.completion".into(),
            subject: "c".into(),
            time_ms: 0,
            received_ms: 0,
            source: None,
            data: data.as_object().cloned().unwrap_or_default(),
        };
        let good = event(serde_json::json!({"status": "ok", "tokens": "12.5"}));
        assert!(tenant.check_values(&good).is_ok());
        let bad = event(serde_json::json!({"status": "ok", "tokens": "lots"}));
        assert_eq!(
            tenant.check_values(&bad).map_err(|r| r.code),
            Err(RejectCode::InvalidValue)
        );
        // Filtered out: the meter does not read it, so its value does not matter.
        let other = event(serde_json::json!({"status": "error", "tokens": "lots"}));
        assert!(tenant.check_values(&other).is_ok());
    }
}
