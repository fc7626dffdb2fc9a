//! The README's first command runs `neruba demo`; this keeps what it shows true, to the cent.

use anyhow::Result;

#[tokio::test]
async fn demo_turns_events_into_line_items_that_add_up_by_hand() -> Result<()> {
    let summary = neruba::demo::run().await?;
    assert_eq!(summary.accepted, 8);
    assert_eq!(summary.duplicate, 2);
    assert_eq!(
        summary.rejected,
        ["missing_field", "invalid_value", "timestamp_in_future"]
    );
    assert_eq!(summary.on_topic, 7, "before the late event");
    // (who, meter, group, revision, kind, window quantity, period quantity, amount, period total),
    // sorted by who, meter, group, window, revision. Window times depend on the clock.
    let rows: Vec<[String; 9]> = summary
        .items
        .iter()
        .map(|r| {
            [
                r.who.clone(),
                r.meter.clone(),
                r.group.clone(),
                r.revision.to_string(),
                r.kind.clone(),
                r.window_quantity.clone(),
                r.period_quantity.clone(),
                r.amount.clone(),
                r.period_amount.clone(),
            ]
        })
        .collect();
    let expected = [
        // 10,000 tokens a month per model are free: 1,200 cost nothing...
        [
            "acme/customer-7",
            "llm_tokens",
            "model=large",
            "1",
            "usage",
            "1200",
            "1200",
            "0.00 USD",
            "0.00 USD",
        ],
        // ...25,000 leave 15,000 billable in tier 1: 15,000 × 0.00002 = 0.30.
        [
            "acme/customer-7",
            "llm_tokens",
            "model=large",
            "1",
            "usage",
            "23800",
            "25000",
            "0.30 USD",
            "0.30 USD",
        ],
        [
            "acme/customer-7",
            "llm_tokens",
            "model=small",
            "1",
            "usage",
            "850.5",
            "850.5",
            "0.00 USD",
            "0.00 USD",
        ],
        // One package of 1,000 calls is 0.50; the monthly minimum of 1.00 applies once.
        [
            "acme/customer-9",
            "api_calls",
            "",
            "1",
            "usage",
            "1",
            "1",
            "1.00 USD",
            "1.00 USD",
        ],
        [
            "acme/customer-9",
            "api_calls",
            "",
            "1",
            "usage",
            "1",
            "2",
            "0.00 USD",
            "1.00 USD",
        ],
        // Volume tier 1: 12.75 × 0.023 = 0.29325 → 0.29.
        [
            "globex/customer-1",
            "storage_gb_hours",
            "region=eu-west",
            "1",
            "usage",
            "12.75",
            "12.75",
            "0.29 EUR",
            "0.29 EUR",
        ],
        // The late 1,000 GB-hours move the whole period to tier 2:
        // 1,012.75 × 0.021 + 5.00 = 26.26775 → 26.27, of which 0.29 was billed.
        [
            "globex/customer-1",
            "storage_gb_hours",
            "region=eu-west",
            "2",
            "adjustment",
            "1012.75",
            "1012.75",
            "25.98 EUR",
            "26.27 EUR",
        ],
        // 400 × 0.023 = 9.20.
        [
            "globex/customer-2",
            "storage_gb_hours",
            "region=us-east",
            "1",
            "usage",
            "400",
            "400",
            "9.20 EUR",
            "9.20 EUR",
        ],
    ]
    .map(|row| row.map(str::to_owned));
    assert_eq!(rows, expected);
    assert_eq!(
        summary.totals,
        [
            ("acme/customer-7".to_owned(), "0.30 USD".to_owned()),
            ("acme/customer-9".to_owned(), "1.00 USD".to_owned()),
            ("globex/customer-1".to_owned(), "26.27 EUR".to_owned()),
            ("globex/customer-2".to_owned(), "9.20 EUR".to_owned()),
        ]
    );
    // Prepaid credit granted before the usage (0.20 USD to acme/customer-7, 10 EUR to
    // globex/customer-1), drawn down by it: by hand from the items above, 0.30 − 0.20 = 0.10 USD
    // due; 0.29 + 9.71 of the late event's 25.98 adjustment from the grant, 16.27 EUR due.
    let entry = |who: &str, seq: u64, kind: &str, amount: &str, after: &str| {
        (
            who.to_owned(),
            seq,
            kind.to_owned(),
            amount.to_owned(),
            after.to_owned(),
        )
    };
    assert_eq!(
        summary.entries,
        [
            entry("acme/customer-7", 1, "grant", "0.20 USD", "0.20 USD"),
            entry("acme/customer-7", 2, "consume", "-0.20 USD", "0.00 USD"),
            entry("acme/customer-7", 3, "uncovered", "0.10 USD", "0.00 USD"),
            // Its rule (alert below 0.10, top up to 1.00): the crossing, and one request for
            // 1.00 − 0.00.
            entry("acme/customer-7", 4, "low_balance", "0.00 USD", "0.00 USD"),
            entry(
                "acme/customer-7",
                5,
                "topup_requested",
                "1.00 USD",
                "0.00 USD"
            ),
            entry("acme/customer-9", 1, "uncovered", "1.00 USD", "0.00 USD"),
            entry("globex/customer-1", 1, "grant", "10.00 EUR", "10.00 EUR"),
            entry("globex/customer-1", 2, "consume", "-0.29 EUR", "9.71 EUR"),
            entry("globex/customer-1", 3, "consume", "-9.71 EUR", "0.00 EUR"),
            entry("globex/customer-1", 4, "uncovered", "16.27 EUR", "0.00 EUR"),
            entry("globex/customer-2", 1, "uncovered", "9.20 EUR", "0.00 EUR"),
        ]
    );
    let due = |who: &str, left: &str, due: &str| (who.to_owned(), left.to_owned(), due.to_owned());
    assert_eq!(
        summary.balances,
        [
            due("acme/customer-7", "0.00 USD", "0.10 USD"),
            due("acme/customer-9", "0.00 USD", "1.00 USD"),
            due("globex/customer-1", "0.00 EUR", "16.27 EUR"),
            due("globex/customer-2", "0.00 EUR", "9.20 EUR"),
        ]
    );
    // This period's statements (open: the period runs): usage = credit applied + amount due,
    // the late event's adjustment included in globex/customer-1's.
    let statement = |who: &str, usage: &str, credit: &str, due: &str| {
        (
            who.to_owned(),
            "open".to_owned(),
            usage.to_owned(),
            credit.to_owned(),
            due.to_owned(),
        )
    };
    assert_eq!(
        summary.statements,
        [
            statement("acme/customer-7", "0.30 USD", "0.20 USD", "0.10 USD"),
            statement("acme/customer-9", "1.00 USD", "0.00 USD", "1.00 USD"),
            statement("globex/customer-1", "26.27 EUR", "10.00 EUR", "16.27 EUR"),
            statement("globex/customer-2", "9.20 EUR", "0.00 EUR", "9.20 EUR"),
        ]
    );
    Ok(())
}
