//! Exact decimal helpers.
//!
//! Invariants:
//! - text becomes a [`Decimal`] without passing through `f64`, and a value that a `Decimal`
//!   cannot hold exactly (too many digits, out of range) is an error, never a rounding —
//!   whatever its notation: `1.5`, `15e-1` and `0.015E2` are the same value, and a value with
//!   digits a `Decimal` cannot keep is refused in every notation;
//! - sums are exact or refused ([`exact_add`]): `rust_decimal` would otherwise round a sum
//!   whose digits no longer fit, silently.

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer};

/// Longest plain spelling an exponent may expand to. A `Decimal` holds at most 29 digits and a
/// scale of 28, so any exact value fits in fewer characters; longer expansions are refused
/// before any string is built (`1e999999999` costs nothing).
const MAX_EXPANDED_CHARS: i64 = 64;

/// Parses a decimal number written as JSON or as a plain string: `12`, `-0.5`, `1.25e3`.
///
/// Returns `None` when the text is not a number or cannot be held exactly. An exponent is
/// applied by moving the decimal point in the text, so `1.25e3` is read exactly as `1250`,
/// and a value whose digits do not fit is refused rather than rounded.
pub fn parse_exact(text: &str) -> Option<Decimal> {
    let text = text.trim();
    let plain = match text.find(['e', 'E']) {
        None => std::borrow::Cow::Borrowed(text),
        Some(at) => {
            let exponent: i64 = text.get(at + 1..)?.parse().ok()?;
            std::borrow::Cow::Owned(expand_exponent(text.get(..at)?, exponent)?)
        }
    };
    // The written scale is kept (`1.50` stays `1.50`) where the type can hold it; trailing
    // fractional zeros it cannot hold carry no value and are dropped, never a non-zero digit.
    Decimal::from_str_exact(&plain)
        .or_else(|_| Decimal::from_str_exact(without_trailing_zeros(&plain)))
        .ok()
}

/// `text` without the trailing zeros of its fractional part (and the point, if none remain).
fn without_trailing_zeros(text: &str) -> &str {
    if !text.contains('.') {
        return text;
    }
    text.trim_end_matches('0').trim_end_matches('.')
}

/// `mantissa × 10^exponent` written without an exponent, or `None` when the mantissa is not
/// a plain decimal (`[+-]digits[.digits]`) or the result would be longer than any exact
/// `Decimal`.
fn expand_exponent(mantissa: &str, exponent: i64) -> Option<String> {
    let (negative, unsigned) = match mantissa.as_bytes().first()? {
        b'-' => (true, mantissa.get(1..)?),
        b'+' => (false, mantissa.get(1..)?),
        _ => (false, mantissa),
    };
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.len() + frac.len() == 0 || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Some("0".to_owned());
    }
    // Where the decimal point falls within `digits`, counted from their start.
    let frac_len = i64::try_from(frac.len()).ok()?;
    let len = i64::try_from(digits.len()).ok()?;
    let point = len.checked_add(exponent)?.checked_sub(frac_len)?;
    let expanded_len = point.abs().max(len).checked_add(3)?;
    if expanded_len > MAX_EXPANDED_CHARS {
        return None;
    }
    let sign = if negative { "-" } else { "" };
    let zeros = |n: i64| "0".repeat(usize::try_from(n).unwrap_or(0));
    Some(if point <= 0 {
        format!("{sign}0.{}{digits}", zeros(-point))
    } else if point >= len {
        format!("{sign}{digits}{}", zeros(point - len))
    } else {
        let split = usize::try_from(point).ok()?;
        format!("{sign}{}.{}", digits.get(..split)?, digits.get(split..)?)
    })
}

/// The bound on one event's value: `|value| < 10^18`. Checked at the door and by the
/// aggregator alike ([`crate::measure`]).
pub fn max_abs_value() -> Decimal {
    Decimal::from(1_000_000_000_000_000_000_i64)
}

/// `a + b` if the sum keeps every digit of both. `rust_decimal` answers a sum whose digits
/// exceed its 96-bit mantissa by lowering the scale (rounding); that is refused here, as is
/// leaving the range.
///
/// The terms are normalized first (trailing zeros dropped: `5.000` is `5`, `0.0` is `0`), so
/// how a value was written never narrows the range of the sums it joins, and a zero term
/// (which `rust_decimal` answers with the other term at that term's own scale) is never
/// mistaken for a rounding. A normalized sum then keeps the scale of its finer term unless
/// digits were dropped.
pub fn exact_add(a: Decimal, b: Decimal) -> Option<Decimal> {
    let (a, b) = (a.normalize(), b.normalize());
    let sum = a.checked_add(b)?;
    // Rounding happens only to sums too large for the mantissa, never to zero.
    (sum.is_zero() || sum.scale() >= a.scale().max(b.scale())).then_some(sum)
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

    #[test]
    fn an_exponent_never_rounds_what_its_plain_spelling_refuses() {
        // Found by a hostile client: the exponent form was rounded, the plain one refused.
        assert_eq!(parse_exact("12345.555555555555555555555555555555"), None);
        assert_eq!(parse_exact("12345.555555555555555555555555555555e0"), None);
        assert_eq!(parse_exact("1234567890123456789012345678.99"), None);
        assert_eq!(parse_exact("1234567890123456789012345678.99e0"), None);
        assert_eq!(parse_exact("123456789012345678901234567899e-2"), None);
        assert_eq!(parse_exact("1e-29"), None);
        assert_eq!(parse_exact("1e999999999999"), None);
        assert_eq!(parse_exact("1.2.3e1"), None);
        assert_eq!(parse_exact("e5"), None);
        assert_eq!(parse_exact("1e"), None);
        assert_eq!(parse_exact("-0.00e7").map(|d| d.is_zero()), Some(true));
        // Zeros past the 28th place carry no value: exact, so accepted in every notation.
        let one_and_zeros = format!("1.{}", "0".repeat(31));
        assert_eq!(parse_exact(&one_and_zeros), Some(Decimal::ONE));
        assert_eq!(
            parse_exact("100000000000000000000000000000e-29"),
            Some(Decimal::ONE)
        );
        assert_eq!(parse_exact(&format!("1.{}1", "0".repeat(30))), None);
        assert_eq!(
            parse_exact("-1.50E+1").map(|d| d.to_string()),
            Some("-15.0".into())
        );
    }

    #[test]
    fn a_sum_that_would_lose_digits_is_refused() {
        let d = |s: &str| parse_exact(s).expect("decimal");
        // rust_decimal alone answers 7922816251426433759354395034 (rounded).
        assert_eq!(
            exact_add(d("7922816251426433759354395033.5"), d("0.1")),
            None
        );
        assert_eq!(exact_add(d("79228162514264337593543950335"), d("1")), None);
        assert_eq!(exact_add(d("1.5"), d("-1.25")), Some(d("0.25")));
        assert_eq!(exact_add(d("1.5"), d("-1.5")), Some(d("0.0")));
        // Found in review: a zero term, or trailing zeros, are no rounding. rust_decimal
        // answers 0.0 + 3 with 3 at scale 0, which a scale comparison took for one.
        assert_eq!(exact_add(d("0.0"), d("3")), Some(d("3")));
        assert_eq!(exact_add(d("5"), d("0.000")), Some(d("5")));
        let five = d("5.0000000000000000000000000000");
        assert_eq!(exact_add(five, five), Some(d("10")));
        // Written precision no longer narrows the range: 28 written decimals of zeros leave
        // the sum as much room as the integer.
        assert_eq!(
            exact_add(d("70000000000000000000000000000"), d("1.0000000000")),
            Some(d("70000000000000000000000000001"))
        );
    }

    proptest::proptest! {
        /// Every spelling of a value a `Decimal` holds reads back as that value, and every
        /// spelling of one with a digit too many is refused.
        #[test]
        fn every_notation_of_a_value_reads_the_same(
            mantissa in proptest::num::i64::ANY,
            scale in 0u32..=28,
            shift in -40i64..40,
            extra_digit in 1u8..=9,
        ) {
            let value = Decimal::new(mantissa, scale);
            let plain = value.to_string();
            proptest::prop_assert_eq!(parse_exact(&plain), Some(value));
            // Move the point `shift` places and compensate with the exponent.
            let negative = plain.starts_with('-');
            let unsigned = plain.trim_start_matches('-');
            let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
            let digits = format!("{int}{frac}");
            let frac_len = i64::try_from(frac.len()).unwrap_or(0);
            let sign = if negative { "-" } else { "" };
            let shifted = expand_exponent(&format!("{sign}{digits}"), -frac_len - shift);
            if let Some(shifted) = shifted {
                let spelled = format!("{shifted}e{shift}");
                proptest::prop_assert_eq!(parse_exact(&spelled), Some(value), "{}", spelled);
                let upper = format!("{shifted}E{shift:+}");
                proptest::prop_assert_eq!(parse_exact(&upper), Some(value), "{}", upper);
            }
            // One more significant digit than a Decimal keeps at scale 28: refused whatever
            // the notation.
            if scale == 28 && mantissa != 0 {
                let longer = format!("{plain}{extra_digit}");
                proptest::prop_assert_eq!(parse_exact(&longer), None);
                proptest::prop_assert_eq!(parse_exact(&format!("{longer}e0")), None);
                let moved = expand_exponent(&longer, 3).unwrap_or_default();
                proptest::prop_assert_eq!(parse_exact(&format!("{moved}e-3")), None);
            }
        }
    }
}
