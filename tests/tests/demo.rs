//! The README's first command runs `neruba demo`; this keeps what it shows true.

use anyhow::Result;

#[tokio::test]
async fn demo_accepts_rejects_and_reports_duplicates_as_documented() -> Result<()> {
    let summary = neruba::demo::run().await?;
    assert_eq!(summary.accepted, 5);
    assert_eq!(summary.duplicate, 2);
    assert_eq!(
        summary.rejected,
        ["missing_field", "invalid_value", "timestamp_in_future"]
    );
    assert_eq!(summary.on_topic, 5);
    let row = |who: &str, meter: &str, group: &str, window: &str, period: &str| {
        (
            who.to_owned(),
            meter.to_owned(),
            group.to_owned(),
            window.to_owned(),
            period.to_owned(),
        )
    };
    assert_eq!(
        summary.rollups,
        [
            row(
                "acme/customer-7",
                "llm_tokens",
                "model=large",
                "1200",
                "1200"
            ),
            row(
                "acme/customer-7",
                "llm_tokens",
                "model=small",
                "850.5",
                "850.5"
            ),
            row("acme/customer-9", "api_calls", "", "1", "1"),
            row("acme/customer-9", "api_calls", "", "1", "2"),
            row(
                "globex/customer-1",
                "storage_gb_hours",
                "region=eu-west",
                "12.75",
                "12.75"
            ),
        ]
    );
    Ok(())
}
