//! Catalog text to a validated [`Catalog`]: the TOML and YAML formats, and every rule a catalog
//! must satisfy to load. Pure: the text comes from the caller ([`Catalog::load`] reads files).
//!
//! Invariants:
//! - nothing that fails a rule here is ever returned as a [`Catalog`], so the rest of the
//!   pipeline reads a catalog without re-checking it;
//! - amounts are read only from quoted strings (see [`crate::decimal`]), never through a float;
//! - a syntax error is [`Error::CatalogSyntax`] and carries the path into the document
//!   (`tenants[0].meters[0].aggregation`); a broken rule is [`Error::CatalogInvalid`] and names
//!   the tenant, the meter or plan, and the field.

use super::{
    Aggregation, Catalog, CustomUnit, Filter, Format, Meter, PriceModel, PricePlan, Source, Tenant,
    parse_fixed_offset,
};
use crate::currency;
use crate::json_path::JsonPath;
use crate::{Error, Result};
use ahash::AHashMap;
use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    units: BTreeMap<String, CustomUnit>,
    tenants: Vec<Tenant>,
}

impl Catalog {
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
        Self::build(file, origin, Source::new(Format::Toml, text))
    }

    /// Parses YAML; `origin` names the source in errors.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Self> {
        let de = serde_yaml::Deserializer::from_str(text);
        let file: CatalogFile =
            serde_path_to_error::deserialize(de).map_err(|e| Error::CatalogSyntax {
                path: origin.to_owned(),
                message: format!("{}: {}", e.path(), e.inner()),
            })?;
        Self::build(file, origin, Source::new(Format::Yaml, text))
    }

    /// Reads back a catalog kept by [`Catalog::encode_source`] (its format and text); `origin`
    /// names it in errors. It loads only if its text still satisfies every rule.
    pub fn from_encoded_source(bytes: &[u8], origin: &str) -> Result<Self> {
        let syntax = |message: String| Error::CatalogSyntax {
            path: origin.to_owned(),
            message,
        };
        let (format, text) = bytes
            .split_first()
            .ok_or_else(|| syntax("empty catalog source".into()))?;
        let text = std::str::from_utf8(text)
            .map_err(|e| syntax(format!("catalog source is not UTF-8: {e}")))?;
        match Format::from_tag(*format) {
            Some(Format::Toml) => Self::from_toml_str(text, origin),
            Some(Format::Yaml) => Self::from_yaml_str(text, origin),
            None => Err(syntax(format!("unknown catalog source format {format}"))),
        }
    }

    fn build(file: CatalogFile, origin: &str, source: Source) -> Result<Self> {
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
            source: std::sync::Arc::new(source),
        })
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

pub(super) fn deserialize_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a duration like 5m: {e}")))
}

pub(super) fn deserialize_date<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<time::Date, D::Error> {
    let text = String::deserialize(d)?;
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(&text, &format)
        .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a YYYY-MM-DD date: {e}")))
}

pub(super) fn deserialize_filters<'de, D: Deserializer<'de>>(
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

#[cfg(test)]
mod tests {
    use super::super::tests::valid_text;
    use super::super::{PackageRounding, PriceModel, hash_key};
    use super::*;

    fn error_of(text: &str) -> String {
        match Catalog::from_toml_str(text, "test.toml") {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
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
}
