//! The catalog: tenants, their hashed API keys, meters and price plans, from a TOML or YAML file.
//!
//! Invariants:
//! - API keys exist only as SHA-256 digests; a plaintext key is hashed on arrival and compared
//!   by digest, so the catalog file can be shared with operators without leaking credentials;
//! - a catalog that loads is internally consistent: every price plan names a meter of its own
//!   tenant, tiers ascend, currencies are known, amounts are exact decimals (never floats);
//! - every error names the file, and where it can the tenant and the field, so the person who
//!   edits the file can fix it from the message alone.

use crate::currency;
use crate::decimal::{deserialize_exact, deserialize_exact_opt};
use crate::event::Event;
use crate::json_path::JsonPath;
use crate::reject::{RejectCode, Rejection};
use crate::{Error, Result};
use ahash::AHashMap;
use arc_swap::ArcSwap;
use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A loaded, validated catalog.
#[derive(Debug, Clone)]
pub struct Catalog {
    units: BTreeMap<String, CustomUnit>,
    tenants: Vec<Tenant>,
    by_key_digest: AHashMap<[u8; 32], (usize, usize)>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    units: BTreeMap<String, CustomUnit>,
    tenants: Vec<Tenant>,
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
    #[serde(default, deserialize_with = "deserialize_filters")]
    pub filters: Vec<Filter>,
    /// Tumbling window size, e.g. `1m`, `5m`, `1h`, `1d`.
    #[serde(deserialize_with = "deserialize_duration")]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    #[serde(deserialize_with = "deserialize_date")]
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
    /// Loads a catalog file; the format follows the extension (`.toml`, `.yaml`, `.yml`).
    pub fn load(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::CatalogIo {
            path: origin.clone(),
            source,
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Self::from_yaml_str(&text, &origin),
            Some("toml") => Self::from_toml_str(&text, &origin),
            _ => Err(Error::CatalogSyntax {
                path: origin,
                message: "unknown format; name the file *.toml, *.yaml or *.yml".into(),
            }),
        }
    }

    /// Parses TOML; `origin` names the source in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        let de = toml::Deserializer::parse(text).map_err(|e| Error::CatalogSyntax {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let file: CatalogFile =
            serde_path_to_error::deserialize(de).map_err(|e| Error::CatalogSyntax {
                path: origin.to_owned(),
                message: format!("{}: {}", e.path(), e.inner().message()),
            })?;
        Self::build(file, origin)
    }

    /// Parses YAML; `origin` names the source in errors.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Self> {
        let de = serde_yaml::Deserializer::from_str(text);
        let file: CatalogFile =
            serde_path_to_error::deserialize(de).map_err(|e| Error::CatalogSyntax {
                path: origin.to_owned(),
                message: format!("{}: {}", e.path(), e.inner()),
            })?;
        Self::build(file, origin)
    }

    fn build(file: CatalogFile, origin: &str) -> Result<Self> {
        let invalid = |message: String| Error::CatalogInvalid {
            path: origin.to_owned(),
            message,
        };
        for (code, unit) in &file.units {
            if unit.precision > 12 {
                return Err(invalid(format!(
                    "units.{code}: precision {} is more than 12 digits",
                    unit.precision
                )));
            }
        }
        let mut by_key_digest = AHashMap::new();
        let mut tenant_ids = BTreeSet::new();
        for (t_index, tenant) in file.tenants.iter().enumerate() {
            let t = &tenant.id;
            if !valid_identifier(t) {
                return Err(invalid(format!(
                    "tenant `{t}`: field `id` must be 1-64 of a-z, 0-9, `-`, `_`"
                )));
            }
            if !tenant_ids.insert(t.clone()) {
                return Err(invalid(format!("tenant `{t}`: declared twice")));
            }
            if let Some(limit) = tenant.rate_limit
                && limit.events_per_second == 0
            {
                return Err(invalid(format!(
                    "tenant `{t}`: field `rate_limit.events_per_second` must be positive"
                )));
            }
            for (k_index, key) in tenant.api_keys.iter().enumerate() {
                let digest = parse_digest(&key.sha256).ok_or_else(|| {
                    invalid(format!(
                        "tenant `{t}`: api key `{}`: field `sha256` must be 64 lower-case hex digits",
                        key.name
                    ))
                })?;
                if by_key_digest.insert(digest, (t_index, k_index)).is_some() {
                    return Err(invalid(format!(
                        "tenant `{t}`: api key `{}`: the same key is declared twice",
                        key.name
                    )));
                }
            }
            let mut meter_keys = BTreeSet::new();
            for meter in &tenant.meters {
                validate_meter(meter)
                    .map_err(|m| invalid(format!("tenant `{t}`: meter `{}`: {m}", meter.key)))?;
                if !meter_keys.insert(meter.key.as_str()) {
                    return Err(invalid(format!(
                        "tenant `{t}`: meter `{}`: declared twice",
                        meter.key
                    )));
                }
            }
            let mut versions = BTreeSet::new();
            for plan in &tenant.price_plans {
                let here = format!("tenant `{t}`: price plan `{}` v{}", plan.id, plan.version);
                if !meter_keys.contains(plan.meter.as_str()) {
                    return Err(invalid(format!(
                        "{here}: field `meter`: no meter `{}` in this tenant",
                        plan.meter
                    )));
                }
                if !versions.insert((plan.meter.as_str(), plan.effective_from)) {
                    return Err(invalid(format!(
                        "{here}: meter `{}` already has a plan effective from {}",
                        plan.meter, plan.effective_from
                    )));
                }
                if currency::iso_minor_units(&plan.currency).is_none()
                    && !file.units.contains_key(&plan.currency)
                {
                    return Err(invalid(format!(
                        "{here}: field `currency`: `{}` is neither a known ISO 4217 code nor declared in [units]",
                        plan.currency
                    )));
                }
                validate_plan(plan).map_err(|m| invalid(format!("{here}: {m}")))?;
            }
        }
        Ok(Self {
            units: file.units,
            tenants: file.tenants,
            by_key_digest,
        })
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
    /// value is refused at the door (`invalid_value`) rather than discovered downstream. An
    /// event no meter reads is fine here: the gateway accepts it and the aggregator keeps it on
    /// the dead-letter topic for replay.
    pub fn check_values(&self, event: &Event) -> Result<(), Rejection> {
        match crate::measure::measure(self, event) {
            Ok(_) => Ok(()),
            Err(r) if r.code == RejectCode::NoMatchingMeter => Ok(()),
            Err(r) => Err(r),
        }
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
        self.filters.iter().all(|f| {
            f.path
                .lookup_in(data)
                .and_then(scalar_text)
                .is_some_and(|text| text == f.equals)
        })
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

fn valid_identifier(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || text.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

const DAY_MS: u128 = 86_400_000;

fn validate_meter(meter: &Meter) -> std::result::Result<(), String> {
    if !valid_identifier(&meter.key) {
        return Err("field `key` must be 1-64 of a-z, 0-9, `-`, `_`".into());
    }
    if meter.event_type.is_empty() {
        return Err("field `event_type` must not be empty".into());
    }
    match (meter.aggregation, &meter.value) {
        (Aggregation::Count, Some(_)) => {
            return Err("field `value` is not used by a `count` meter; remove it".into());
        }
        (Aggregation::Count, None) => {}
        (_, None) => return Err("field `value` is required for this aggregation".into()),
        (_, Some(_)) => {}
    }
    let window_ms = meter.window.as_millis();
    if window_ms == 0 || !window_ms.is_multiple_of(1000) || !DAY_MS.is_multiple_of(window_ms) {
        return Err(format!(
            "field `window`: {} does not divide a day into whole seconds",
            humantime::format_duration(meter.window)
        ));
    }
    let period = &meter.billing_period;
    if !(1..=28).contains(&period.anchor_day) {
        return Err("field `billing_period.anchor_day` must be 1 to 28".into());
    }
    let Some(offset) = parse_fixed_offset(&period.time_zone) else {
        return Err(format!(
            "field `billing_period.time_zone`: `{}` is not `UTC` or an offset like `+02:00`",
            period.time_zone
        ));
    };
    // Period edges (local midnight) must be window edges, so no window spans two periods.
    if (i128::from(offset) * 1000).rem_euclid(i128::try_from(window_ms).unwrap_or(1)) != 0 {
        return Err(format!(
            "field `window`: {} windows would straddle the billing period edges of `{}`; \
             use a window that divides the offset",
            humantime::format_duration(meter.window),
            period.time_zone
        ));
    }
    Ok(())
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

fn validate_plan(plan: &PricePlan) -> std::result::Result<(), String> {
    let non_negative = |name: &str, d: Decimal| {
        if d.is_sign_negative() && !d.is_zero() {
            Err(format!("field `{name}` must not be negative"))
        } else {
            Ok(())
        }
    };
    non_negative("included_units", plan.included_units)?;
    if let Some(min) = plan.minimum {
        non_negative("minimum", min)?;
    }
    if let Some(max) = plan.maximum {
        non_negative("maximum", max)?;
    }
    if let (Some(min), Some(max)) = (plan.minimum, plan.maximum)
        && min > max
    {
        return Err(format!("`minimum` {min} is greater than `maximum` {max}"));
    }
    match &plan.model {
        PriceModel::Unit { unit_price } => non_negative("model.unit_price", *unit_price),
        PriceModel::Flat { fee } => non_negative("model.fee", *fee),
        PriceModel::Package { size, price, .. } => {
            if *size <= Decimal::ZERO {
                return Err("field `model.size` must be positive".into());
            }
            non_negative("model.price", *price)
        }
        PriceModel::Graduated { tiers } | PriceModel::Volume { tiers } => {
            if tiers.is_empty() {
                return Err("field `model.tiers` must list at least one tier".into());
            }
            let mut previous: Option<Decimal> = None;
            for (i, tier) in tiers.iter().enumerate() {
                let last = i + 1 == tiers.len();
                non_negative(&format!("model.tiers[{i}].unit_price"), tier.unit_price)?;
                non_negative(&format!("model.tiers[{i}].flat_fee"), tier.flat_fee)?;
                match (tier.up_to, last) {
                    (None, true) => {}
                    (None, false) => {
                        return Err(format!(
                            "model.tiers[{i}]: only the last tier may omit `up_to`"
                        ));
                    }
                    (Some(_), true) => {
                        return Err(format!(
                            "model.tiers[{i}]: the last tier must omit `up_to` so every quantity has a price"
                        ));
                    }
                    (Some(up_to), false) => {
                        if up_to <= previous.unwrap_or(Decimal::ZERO) {
                            return Err(format!(
                                "model.tiers[{i}].up_to {up_to} must be greater than the tier before (and than 0)"
                            ));
                        }
                        previous = Some(up_to);
                    }
                }
            }
            Ok(())
        }
    }
}

fn deserialize_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a duration like 5m: {e}")))
}

fn deserialize_date<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<time::Date, D::Error> {
    let text = String::deserialize(d)?;
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(&text, &format)
        .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a YYYY-MM-DD date: {e}")))
}

fn deserialize_filters<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<Filter>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Bool(bool),
        Int(i64),
        Text(String),
    }
    let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
    raw.into_iter()
        .map(|(path, value)| {
            let path = JsonPath::parse(&path).map_err(serde::de::Error::custom)?;
            let equals = match value {
                Scalar::Bool(b) => b.to_string(),
                Scalar::Int(i) => i.to_string(),
                Scalar::Text(s) => s,
            };
            Ok(Filter { path, equals })
        })
        .collect()
}

/// The catalog a running component uses, replaceable while it runs (`SIGHUP` reloads it).
/// Readers take the current version with [`LiveCatalog::current`] and keep it for a request or
/// a batch, so each is handled under one consistent catalog.
#[derive(Debug, Clone)]
pub struct LiveCatalog(Arc<ArcSwap<Catalog>>);

impl LiveCatalog {
    pub fn new(catalog: Catalog) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(catalog)))
    }

    /// The catalog in force now.
    pub fn current(&self) -> Arc<Catalog> {
        self.0.load_full()
    }

    /// Replaces the catalog if `next` is compatible with the current one (see
    /// [`Catalog::compatible_successor`]); otherwise keeps the current one and says why.
    pub fn replace(&self, next: Catalog) -> Result<(), String> {
        self.current().compatible_successor(&next)?;
        self.0.store(Arc::new(next));
        Ok(())
    }
}

impl From<Catalog> for LiveCatalog {
    fn from(catalog: Catalog) -> Self {
        Self::new(catalog)
    }
}

impl From<Arc<Catalog>> for LiveCatalog {
    fn from(catalog: Arc<Catalog>) -> Self {
        Self(Arc::new(ArcSwap::new(catalog)))
    }
}

impl Catalog {
    /// Whether `next` may replace this catalog in a running pipeline: a meter that stays may
    /// not change how it is aggregated, its window or its billing period, since the stored
    /// windows and period totals were built that way (add a meter with a new key instead).
    /// Tenants, keys, meters and price plans may be added, and removed.
    pub fn compatible_successor(&self, next: &Catalog) -> Result<(), String> {
        for tenant in &self.tenants {
            let Some(successor) = next.tenant(&tenant.id) else {
                continue;
            };
            for meter in &tenant.meters {
                let Some(after) = successor.meters.iter().find(|m| m.key == meter.key) else {
                    continue;
                };
                let name = format!("{}/{}", tenant.id, meter.key);
                if after.aggregation != meter.aggregation {
                    return Err(format!(
                        "meter `{name}` changes its aggregation from {:?} to {:?}",
                        meter.aggregation, after.aggregation
                    ));
                }
                if after.window != meter.window {
                    return Err(format!(
                        "meter `{name}` changes its window from {} to {}",
                        humantime::format_duration(meter.window),
                        humantime::format_duration(after.window)
                    ));
                }
                if after.billing_period != meter.billing_period {
                    return Err(format!("meter `{name}` changes its billing period"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn valid_text() -> String {
        VALID.replace("HASH", &hash_key("secret-1"))
    }

    fn error_of(text: &str) -> String {
        match Catalog::from_toml_str(text, "test.toml") {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
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
    fn errors_name_file_tenant_and_field() {
        let text = valid_text().replace("\"USD\"", "\"ZZZ\"");
        let e = error_of(&text);
        assert!(
            e.starts_with("catalog test.toml: tenant `acme`: price plan `tokens-std` v1"),
            "{e}"
        );
        assert!(e.contains("field `currency`"), "{e}");

        let e = error_of(&valid_text().replace("meter = \"tokens\"", "meter = \"nope\""));
        assert!(
            e.contains("tenant `acme`") && e.contains("no meter `nope`"),
            "{e}"
        );

        let e = error_of(&valid_text().replace("window = \"1m\"", "window = \"7m\""));
        assert!(e.contains("meter `tokens`: field `window`"), "{e}");

        let e =
            error_of(&valid_text().replace("aggregation = \"sum\"", "aggregation = \"median\""));
        assert!(e.contains("tenants[0].meters[0].aggregation"), "{e}");
    }

    #[test]
    fn float_prices_are_refused() {
        let e = error_of(&valid_text().replace("unit_price = \"0.001\"", "unit_price = 0.001"));
        assert!(e.contains("quoted strings"), "{e}");
    }

    #[test]
    fn tiers_must_ascend_and_end_unbounded() {
        let e = error_of(&valid_text().replace(
            "{ unit_price = \"0.001\" }",
            "{ up_to = \"20000\", unit_price = \"0.001\" }",
        ));
        assert!(e.contains("last tier must omit `up_to`"), "{e}");
        let e = error_of(&valid_text().replace("up_to = \"10000\"", "up_to = \"0\""));
        assert!(e.contains("must be greater"), "{e}");
    }

    #[test]
    fn yaml_catalog_loads_the_same_model() {
        let yaml = format!(
            r#"
tenants:
  - id: beta
    api_keys:
      - {{ name: k, sha256: "{}", scopes: [ingest] }}
    meters:
      - {{ key: calls, event_type: api.call, aggregation: count, window: 5m }}
    price_plans:
      - id: calls
        meter: calls
        version: 2
        effective_from: "2026-02-01"
        currency: JPY
        model: {{ type: package, size: "100", price: "50", rounding: down }}
"#,
            hash_key("k")
        );
        let catalog = Catalog::from_yaml_str(&yaml, "c.yaml").expect("catalog");
        let tenant = catalog.tenant("beta").expect("tenant");
        assert_eq!(
            tenant.price_plans[0].model,
            PriceModel::Package {
                size: Decimal::from(100),
                price: Decimal::from(50),
                rounding: PackageRounding::Down
            }
        );
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

    #[test]
    fn a_reload_may_add_and_reprice_but_not_reshape_a_meter() {
        let parse = |text: &str| Catalog::from_toml_str(text, "test.toml").expect("catalog");
        let current = parse(&valid_text());
        let live = LiveCatalog::new(parse(&valid_text()));
        let repriced = valid_text().replace(
            "effective_from = \"2026-01-01\"",
            "effective_from = \"2026-02-01\"",
        );
        assert_eq!(current.compatible_successor(&parse(&repriced)), Ok(()));
        let summed_as_max = valid_text().replace("aggregation = \"sum\"", "aggregation = \"max\"");
        assert_eq!(
            current.compatible_successor(&parse(&summed_as_max)),
            Err("meter `acme/tokens` changes its aggregation from Sum to Max".to_owned())
        );
        let wider = valid_text().replace("window = \"1m\"", "window = \"1h\"");
        assert_eq!(
            live.replace(parse(&wider)),
            Err("meter `acme/tokens` changes its window from 1m to 1h".to_owned())
        );
        assert_eq!(
            live.current().tenants()[0].meters[0].window,
            Duration::from_secs(60)
        );
        assert_eq!(live.replace(parse(&repriced)), Ok(()));
        assert_eq!(
            live.current().tenants()[0].price_plans[0]
                .effective_from
                .to_string(),
            "2026-02-01"
        );
    }
}
