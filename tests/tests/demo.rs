//! The README's first command runs `neruba demo`; this keeps what it shows true.

use anyhow::Result;

fn row(
    who: &str,
    meter: &str,
    group: &str,
    window: &str,
    period: &str,
    price: &str,
) -> (String, String, String, String, String, String) {
    (
        who.into(),
        meter.into(),
        group.into(),
        window.into(),
        period.into(),
        price.into(),
    )
}

#[tokio::test]
async fn demo_accepts_rejects_rolls_up_and_prices_as_documented() -> Result<()> {
    let summary = neruba::demo::run().await?;
    assert_eq!(summary.accepted, 5);
    assert_eq!(summary.duplicate, 2);
    assert_eq!(
        summary.rejected,
        ["missing_field", "invalid_value", "timestamp_in_future"]
    );
    assert_eq!(summary.on_topic, 5);
    assert_eq!(
        summary.rollups,
        [
            // 10,000 tokens a month are free.
            row(
                "acme/customer-7",
                "llm_tokens",
                "model=large",
                "1200",
                "1200",
                "0.00 USD"
            ),
            row(
                "acme/customer-7",
                "llm_tokens",
                "model=small",
                "850.5",
                "850.5",
                "0.00 USD"
            ),
            // One package of 1,000 calls costs 0.50; the monthly minimum of 1.00 applies.
            row("acme/customer-9", "api_calls", "", "1", "1", "1.00 USD"),
            row("acme/customer-9", "api_calls", "", "1", "2", "1.00 USD"),
            // Volume tier 1: 12.75 × 0.023 = 0.29325, rounded half-up to 0.29.
            row(
                "globex/customer-1",
                "storage_gb_hours",
                "region=eu-west",
                "12.75",
                "12.75",
                "0.29 EUR"
            ),
        ]
    );
    Ok(())
}
