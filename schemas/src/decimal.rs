//! Exact decimal helpers.
//!
//! Invariant: text becomes a [`Decimal`] without passing through `f64`, and a value that a
//! `Decimal` cannot hold exactly (too many digits, out of range) is an error, never a rounding.

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer};

/// Parses a decimal number written as JSON or as a plain string: `12`, `-0.5`, `1.25e3`.
///
/// Returns `None` when the text is not a number or cannot be held exactly.
pub fn parse_exact(text: &str) -> Option<Decimal> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let value = if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).ok()?
    } else {
        Decimal::from_str_exact(text).ok()?
    };
    // `from_scientific` silently drops digits beyond the 28 the type holds; re-reading the
    // result and comparing digit counts would be fragile, so refuse exponents that push the
    // scale past the maximum instead.
    if text.contains(['e', 'E']) && value.scale() >= Decimal::MAX_SCALE {
        return None;
    }
    // The written scale is kept (`1.50` stays `1.50`): it is information a reader may want.
    Some(value)
}

/// Reads a decimal from a JSON value: a number (by its exact text) or a string.
pub fn from_json(value: &serde_json::Value) -> Option<Decimal> {
    match value {
        serde_json::Value::Number(n) => parse_exact(n.as_str()),
        serde_json::Value::String(s) => parse_exact(s),
        _ => None,
    }
}

/// Serde helper for configuration files: accepts a quoted decimal string or an integer, and
/// refuses a floating-point literal, which TOML and YAML would already have rounded.
pub fn deserialize_exact<'de, D>(deserializer: D) -> Result<Decimal, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Int(i64),
        Text(String),
        Float(serde::de::IgnoredAny),
    }
    match Repr::deserialize(deserializer)? {
        Repr::Int(i) => Ok(Decimal::from(i)),
        Repr::Text(s) => parse_exact(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("`{s}` is not an exact decimal"))),
        Repr::Float(_) => Err(serde::de::Error::custom(
            "write decimals as quoted strings (e.g. \"0.001\"); a bare float is binary floating point",
        )),
    }
}

/// [`deserialize_exact`] for optional fields.
pub fn deserialize_exact_opt<'de, D>(deserializer: D) -> Result<Option<Decimal>, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "deserialize_exact")] Decimal);
    Ok(Option::<Wrap>::deserialize(deserializer)?.map(|Wrap(d)| d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_fraction_keeps_every_digit() {
        let d = parse_exact("0.000000000123456789").expect("decimal");
        assert_eq!(d.to_string(), "0.000000000123456789");
    }

    #[test]
    fn scientific_notation_is_exact() {
        assert_eq!(
            parse_exact("1.25e3").map(|d| d.to_string()),
            Some("1250".into())
        );
        assert_eq!(
            parse_exact("5E-3").map(|d| d.to_string()),
            Some("0.005".into())
        );
    }

    #[test]
    fn too_many_digits_is_refused_not_rounded() {
        assert_eq!(parse_exact("0.12345678901234567890123456789"), None);
        assert_eq!(parse_exact("1e400"), None);
        assert_eq!(parse_exact("abc"), None);
        assert_eq!(parse_exact(""), None);
    }
}
