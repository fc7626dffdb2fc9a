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
    Ok(())
}
