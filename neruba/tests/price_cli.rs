//! `neruba price` explains an amount the way finance reads it.

use std::process::Command;

fn neruba(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_neruba"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run neruba: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn price_explains_free_units_each_tier_and_rounding() {
    let (ok, stdout, stderr) = neruba(&[
        "price",
        "--tenant",
        "acme",
        "--meter",
        "llm_tokens",
        "--quantity",
        "1250000",
        "--date",
        "2026-11-24",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        "plan llm-tokens-standard v1 (USD), effective from 2026-01-01\n\
         quantity 1250000, included units 10000 -> billable 1240000\n  \
         tier 1 (0, 1000000]: 1000000 units x 0.00002 + flat fee 0 = 20.00000\n  \
         tier 2 (1000000, 10000000]: 240000 units x 0.000015 + flat fee 0 = 3.600000\n\
         model amount 23.600000\n\
         23.600000 rounded half-up to 2 decimals = 23.60 USD\n"
    );
}

#[test]
fn price_json_carries_exact_decimal_strings() {
    let (ok, stdout, stderr) = neruba(&[
        "price",
        "--tenant",
        "globex",
        "--meter",
        "storage_gb_hours",
        "--quantity",
        "1000.5",
        "--json",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_default();
    assert_eq!(v["price"]["unrounded"], "26.0105");
    assert_eq!(v["price"]["amount"], "26.01");
    assert_eq!(v["price"]["lines"][0]["tier"], 2);
}

#[test]
fn price_refuses_a_date_before_any_plan() {
    let (ok, _, stderr) = neruba(&[
        "price",
        "--tenant",
        "acme",
        "--meter",
        "api_calls",
        "--quantity",
        "5",
        "--date",
        "2025-06-01",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("no plan in force on 2025-06-01"),
        "{stderr}"
    );
}
