//! Currencies and their minor units.
//!
//! Invariant: an amount is rounded only to the precision its unit declares: an ISO 4217
//! currency's minor unit (JPY 0, USD 2, KWD 3) or a custom unit's declared precision.

/// ISO 4217 codes this build knows, with their minor units. Codes not listed here can be
/// declared in the catalog's `[units]` table like any custom unit.
const ISO_4217: &[(&str, u32)] = &[
    ("AED", 2),
    ("ARS", 2),
    ("AUD", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLF", 4),
    ("CLP", 0),
    ("CNY", 2),
    ("COP", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EGP", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("IQD", 3),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KES", 2),
    ("KRW", 0),
    ("KWD", 3),
    ("LYD", 3),
    ("MXN", 2),
    ("MYR", 2),
    ("NGN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PHP", 2),
    ("PLN", 2),
    ("PYG", 0),
    ("RON", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TND", 3),
    ("TRY", 2),
    ("TWD", 2),
    ("UAH", 2),
    ("UGX", 0),
    ("USD", 2),
    ("UYW", 4),
    ("VND", 0),
    ("XAF", 0),
    ("XOF", 0),
    ("ZAR", 2),
];

/// Minor-unit digits of an ISO 4217 currency this build knows.
pub fn iso_minor_units(code: &str) -> Option<u32> {
    ISO_4217
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, digits)| *digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_units_cover_zero_two_and_three_digits() {
        assert_eq!(iso_minor_units("JPY"), Some(0));
        assert_eq!(iso_minor_units("USD"), Some(2));
        assert_eq!(iso_minor_units("KWD"), Some(3));
        assert_eq!(iso_minor_units("XYZ"), None);
    }
}
