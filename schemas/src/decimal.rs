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
    // Only `[+-]digits[.digits][e[+-]digits]` (a point may open or close the digits):
    // `rust_decimal` alone would also read `1_000` as 1000.
    if !text.split(['e', 'E']).next().is_some_and(is_plain) {
        return None;
    }
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

/// Whether `text` is `[+-]` digits with at most one point among them, and at least one digit.
fn is_plain(text: &str) -> bool {
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    unsigned.bytes().any(|b| b.is_ascii_digit())
        && unsigned.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && unsigned.bytes().filter(|b| *b == b'.').count() <= 1
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
    // `unsigned_abs`: the point may lie i64::MIN places away, whose `abs` wraps.
    let expanded_len = point
        .unsigned_abs()
        .max(len.unsigned_abs())
        .checked_add(3)?;
    if expanded_len > MAX_EXPANDED_CHARS.unsigned_abs() {
        return None;
    }
    let sign = if negative { "-" } else { "" };
    let zeros = |n: i64| "0".repeat(usize::try_from(n).unwrap_or(0));
    Some(if point <= 0 {
        format!("{sign}0.{}{digits}", zeros(point.checked_neg()?))
    } else if point >= len {
        format!("{sign}{digits}{}", zeros(point - len))
    } else {
        let split = usize::try_from(point).ok()?;
        format!("{sign}{}.{}", digits.get(..split)?, digits.get(split..)?)
    })
}

/// Most decimal places an event's value may have at the doors, trailing zeros aside
/// ([`crate::measure::judge_at_door`]).
pub const MAX_VALUE_PLACES: u32 = 12;

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

/// Serde for decimals in records and in stored state (`#[serde(with = "decimal::stored")]`).
///
/// - Human-readable formats (JSON on the topics and the API) get the text `"12.50"`, exactly
///   as `rust_decimal::serde::str` writes and reads it.
/// - Binary formats (postcard: the stages' RocksDB state) get a compact form instead of the
///   text: one byte `0x80 | sign << 5 | scale`, then the mantissa's magnitude as an LEB128
///   varint (at most 14 bytes). `20.00` takes 3 bytes, and writing it formats nothing.
///   It is framed as postcard frames a string (a length, then the bytes), and no decimal's
///   text begins with a byte ≥ `0x80`, so state written as text before still reads.
/// - The value reads back as it was written, scale included (`2.50`); a zero reads back
///   unsigned, as its text did.
/// - Binaries older than this form read only the text: state written by this version cannot
///   be read by them (README, "Upgrading and rolling back").
pub mod stored {
    use rust_decimal::Decimal;
    use serde::de::Visitor;
    use serde::{Deserializer, Serializer};
    use std::str::FromStr;

    const COMPACT: u8 = 0x80;
    const NEGATIVE: u8 = 0x20;
    const SCALE: u8 = 0x1F;
    /// The compact form's longest: the tag and a 96-bit mantissa in 7-bit groups.
    const MAX_LEN: usize = 1 + 14;

    pub fn serialize<S: Serializer>(value: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            return rust_decimal::serde::str::serialize(value, serializer);
        }
        let (bytes, len) = compact(value);
        serializer.serialize_bytes(bytes.get(..len).unwrap_or_default())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
        if deserializer.is_human_readable() {
            return rust_decimal::serde::str::deserialize(deserializer);
        }
        deserializer.deserialize_bytes(StoredVisitor)
    }

    /// The compact form of `value` and its length.
    pub fn compact(value: &Decimal) -> ([u8; MAX_LEN], usize) {
        let mut out = [0_u8; MAX_LEN];
        // A `Decimal`'s scale is at most 28, within the tag's five bits.
        let scale = u8::try_from(value.scale()).unwrap_or(SCALE) & SCALE;
        let sign = if value.is_sign_negative() {
            NEGATIVE
        } else {
            0
        };
        out[0] = COMPACT | sign | scale;
        let mut magnitude = value.mantissa().unsigned_abs();
        let mut len = 1;
        loop {
            let low = (magnitude & 0x7F) as u8;
            magnitude >>= 7;
            let more = magnitude != 0;
            if let Some(byte) = out.get_mut(len) {
                *byte = low | if more { 0x80 } else { 0 };
            }
            len += 1;
            if !more {
                return (out, len.min(MAX_LEN));
            }
        }
    }

    /// A decimal from its compact form, or from its text as written before.
    pub fn from_stored(bytes: &[u8]) -> Result<Decimal, String> {
        match bytes.split_first() {
            None => Err("an empty decimal".into()),
            Some((&tag, rest)) if tag & COMPACT != 0 => {
                let scale = u32::from(tag & SCALE);
                if tag & !(COMPACT | NEGATIVE | SCALE) != 0 || scale > 28 {
                    return Err(format!("a decimal tag {tag:#04x}"));
                }
                let mut magnitude = 0_u128;
                for (i, byte) in rest.iter().enumerate() {
                    let last = i + 1 == rest.len();
                    if (byte & 0x80 == 0) != last || i >= MAX_LEN - 1 {
                        return Err("a decimal's digits are cut short or run on".into());
                    }
                    magnitude |= u128::from(byte & 0x7F) << (7 * i);
                }
                if rest.is_empty() || magnitude >> 96 != 0 {
                    return Err("a decimal's mantissa is missing or over 96 bits".into());
                }
                // The three 32-bit words of the 96-bit mantissa.
                let word = |shift: u32| ((magnitude >> shift) & 0xFFFF_FFFF) as u32;
                Ok(Decimal::from_parts(
                    word(0),
                    word(32),
                    word(64),
                    tag & NEGATIVE != 0,
                    scale,
                ))
            }
            Some(_) => {
                let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
                Decimal::from_str(text)
                    .or_else(|_| Decimal::from_scientific(text))
                    .map_err(|e| format!("`{text}`: {e}"))
            }
        }
    }

    struct StoredVisitor;

    impl Visitor<'_> for StoredVisitor {
        type Value = Decimal;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a stored decimal")
        }

        fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Decimal, E> {
            from_stored(bytes).map_err(E::custom)
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Decimal, E> {
            from_stored(text.as_bytes()).map_err(E::custom)
        }
    }

    /// [`stored`](self) for optional decimals.
    pub mod option {
        use rust_decimal::Decimal;
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        #[derive(Serialize, Deserialize)]
        struct Stored(#[serde(with = "super")] Decimal);

        pub fn serialize<S: Serializer>(
            value: &Option<Decimal>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            if serializer.is_human_readable() {
                return rust_decimal::serde::str_option::serialize(value, serializer);
            }
            value.map(Stored).serialize(serializer)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Decimal>, D::Error> {
            if deserializer.is_human_readable() {
                return rust_decimal::serde::str_option::deserialize(deserializer);
            }
            Ok(Option::<Stored>::deserialize(deserializer)?.map(|Stored(d)| d))
        }
    }

    /// [`stored`](self) for maps of decimals.
    pub mod map {
        use rust_decimal::Decimal;
        use serde::{Deserialize, Deserializer, Serialize, Serializer};
        use std::collections::BTreeMap;

        #[derive(Serialize, Deserialize)]
        struct Stored(#[serde(with = "super")] Decimal);

        pub fn serialize<S: Serializer>(
            map: &BTreeMap<String, Decimal>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            serializer.collect_map(map.iter().map(|(k, v)| (k, Stored(*v))))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<BTreeMap<String, Decimal>, D::Error> {
            Ok(BTreeMap::<String, Stored>::deserialize(deserializer)?
                .into_iter()
                .map(|(k, Stored(v))| (k, v))
                .collect())
        }
    }
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
    fn only_digits_a_point_and_a_sign_spell_a_decimal_and_every_exponent_is_checked() {
        // Found in review: `rust_decimal` skips underscores, so `1_000` read as 1000 (a grant
        // of 1000 USD, an event value of 12 for `1_2`); and an exponent of i64::MIN wrapped
        // the point's distance to the digits in a release build, so `0.1e-9223372036854775808`
        // read as 0.1 (a debug build panicked).
        for text in [
            "1_000", "1_", "_1", "1_2", "1._5", "-_1", "+-1", "1-", "1 2", "0x10", "1.5_e2",
            "1_0e2",
        ] {
            assert_eq!(parse_exact(text), None, "{text}");
        }
        for text in [
            "0.1e-9223372036854775808",
            "1e-9223372036854775808",
            "1E-9223372036854775808",
            "10e-9223372036854775808",
            "1e9223372036854775807",
            "0.1e9223372036854775807",
        ] {
            assert_eq!(parse_exact(text), None, "{text}");
        }
        // What stays accepted: a sign, a point on either side, surrounding whitespace.
        let d = |s: &str| s.parse::<Decimal>().expect("decimal");
        assert_eq!(parse_exact("+1.5"), Some(d("1.5")));
        assert_eq!(parse_exact("-0.5e1"), Some(d("-5")));
        assert_eq!(parse_exact(" 12 "), Some(d("12")));
        assert_eq!(parse_exact("1."), Some(d("1")));
        assert_eq!(parse_exact(".5"), Some(d("0.5")));
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
        // A zero term, or trailing zeros, are no rounding. rust_decimal
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

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Held {
        #[serde(with = "stored")]
        amount: Decimal,
        #[serde(with = "stored::option")]
        cap: Option<Decimal>,
    }

    /// As state was written before the compact form: decimals as text.
    #[derive(serde::Serialize)]
    struct HeldAsText {
        #[serde(with = "rust_decimal::serde::str")]
        amount: Decimal,
        #[serde(with = "rust_decimal::serde::str_option")]
        cap: Option<Decimal>,
    }

    fn d(text: &str) -> Decimal {
        parse_exact(text).unwrap_or_else(|| panic!("`{text}` is a decimal"))
    }

    fn stored_bytes(value: Decimal) -> Vec<u8> {
        let (bytes, len) = stored::compact(&value);
        bytes.get(..len).unwrap_or_default().to_vec()
    }

    #[test]
    fn the_stored_form_is_fixed_and_json_stays_text() {
        assert_eq!(stored_bytes(d("20.00")), [0x82, 0xD0, 0x0F]);
        assert_eq!(stored_bytes(d("-0.5")), [0xA1, 0x05]);
        assert_eq!(stored_bytes(d("0")), [0x80, 0x00]);
        let held = Held {
            amount: d("2.50"),
            cap: None,
        };
        assert_eq!(
            serde_json::to_string(&held).expect("json"),
            r#"{"amount":"2.50","cap":null}"#
        );
        let bytes = postcard::to_allocvec(&held).expect("postcard");
        assert_eq!(bytes, [0x03, 0x82, 0xFA, 0x01, 0x00]);
        assert_eq!(postcard::from_bytes::<Held>(&bytes).expect("read"), held);
    }

    #[test]
    fn state_written_as_text_still_reads() {
        for (amount, cap) in [
            ("12.50", Some("-3")),
            ("0", None),
            ("-0.000001", Some("1e3")),
        ] {
            let old = HeldAsText {
                amount: d(amount),
                cap: cap.map(|c| Decimal::from_scientific(c).unwrap_or_else(|_| d(c))),
            };
            let bytes = postcard::to_allocvec(&old).expect("postcard");
            let read: Held = postcard::from_bytes(&bytes).expect("read");
            assert_eq!(read.amount.to_string(), old.amount.to_string());
            assert_eq!(
                read.cap.map(|c| c.to_string()),
                old.cap.map(|c| c.to_string())
            );
        }
    }

    #[test]
    fn a_damaged_stored_decimal_is_an_error() {
        let refused: [&[u8]; 8] = [
            &[],
            &[0x80],
            // A tag bit that means nothing, and a scale over 28.
            &[0xC0, 0x01],
            &[0x9D, 0x01],
            // A varint that never ends, one that ends early, one past 96 bits.
            &[0x80, 0x81],
            &[0x80, 0x01, 0x01],
            &[
                0x80, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                0x7F,
            ],
            b"12x",
        ];
        for bytes in refused {
            assert!(stored::from_stored(bytes).is_err(), "{bytes:?}");
        }
        // The largest mantissa, 2^96 - 1, reads.
        assert_eq!(
            stored::from_stored(&stored_bytes(Decimal::MAX)).expect("max"),
            Decimal::MAX
        );
    }

    proptest::proptest! {
        /// Every decimal reads back from its stored form as it was: value, scale and sign.
        #[test]
        fn every_decimal_reads_back_from_its_stored_form(
            lo in proptest::num::u32::ANY,
            mid in proptest::num::u32::ANY,
            hi in proptest::num::u32::ANY,
            negative in proptest::bool::ANY,
            scale in 0u32..=28,
            cap in proptest::option::of(proptest::num::i64::ANY),
        ) {
            let amount = Decimal::from_parts(lo, mid, hi, negative, scale);
            let held = Held { amount, cap: cap.map(|c| Decimal::new(c, scale)) };
            let bytes = postcard::to_allocvec(&held).expect("postcard");
            let read: Held = postcard::from_bytes(&bytes).expect("read");
            proptest::prop_assert_eq!(read.amount.serialize(), amount.serialize());
            proptest::prop_assert_eq!(read.cap.map(|c| c.serialize()), held.cap.map(|c| c.serialize()));
            let json: Held = serde_json::from_str(&serde_json::to_string(&held).expect("json")).expect("json");
            proptest::prop_assert_eq!(json.amount.serialize(), amount.serialize());
        }
    }
}
