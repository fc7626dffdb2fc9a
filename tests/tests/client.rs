//! The Rust client (`neruba-client`) against the real gateway (and, for billing reads, the
//! real api) on the embedded broker, and against a stub HTTP server where the test must choose
//! the answers (503 with `Retry-After`, 429, `not_caught_up`, an answer held back). What the
//! gateway says is checked against what really landed on the topics, what the api reads back
//! against what was written; what the client does is checked against the requests the stub
//! saw.

use anyhow::{Context, Result, bail, ensure};
use neruba::embedded::EmbeddedKafka;
use neruba_client::{
    Aggregation, Client, EntryKind, Error, Event, GrantRequest, GrantStatus, LineItemKind, Outcome,
    Paid, Position, Reader, RetryPolicy, StatementStatus, UsageQuery, Window,
};
use neruba_schemas::credit::{self, Grant, RuleRecord, Void};
use neruba_schemas::event::format_time_ms;
use neruba_schemas::ledger;
use neruba_schemas::rollup::Rollup;
use neruba_schemas::topics::{self, stable_partition};
use neruba_tests::{GatewayHarness, LEDGER_PARTITIONS, sample};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn key(scope: &str) -> Result<&'static str> {
    sample::dev_key("acme", scope).context("no dev key")
}

/// `(accepted, duplicate, rejected, failed)`.
fn counts(totals: neruba_client::Totals) -> (u64, u64, u64, u64) {
    (
        totals.accepted,
        totals.duplicate,
        totals.rejected,
        totals.failed,
    )
}

#[tokio::test]
async fn events_sent_in_batches_smaller_than_the_total_land_once_each_and_are_counted_exactly()
-> Result<()> {
    const N: usize = 1000;
    let h = GatewayHarness::start().await?;
    let client = Client::builder(&h.base, key("ingest")?)
        .batch_size(64)
        .linger(Duration::from_millis(20))
        .build()?;
    let ingestor = client.ingestor();

    // 1. N events without ids: the client makes up one each.
    let mut receipts = Vec::with_capacity(N);
    for n in 0..N {
        let event = Event::new("api.request", format!("customer-{}", n % 7));
        receipts.push(ingestor.send(event).await?);
    }
    let ids: Vec<String> = receipts.iter().map(|r| r.id().to_owned()).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), N);
    let totals = ingestor.flush().await?;
    assert_eq!(counts(totals), (N as u64, 0, 0, 0));
    for receipt in receipts {
        assert_eq!(receipt.await?, Outcome::Accepted);
    }

    // 2. Three of them again (an id is a repeat for its own customer): duplicates, answered
    //    as such, counted as such.
    let mut repeats = Vec::new();
    for n in [0, 500, N - 1] {
        let event =
            Event::new("api.request", format!("customer-{}", n % 7)).with_id(ids[n].clone());
        repeats.push(ingestor.send(event).await?);
    }
    let totals = ingestor.close().await?;
    assert_eq!(counts(totals), (N as u64, 3, 0, 0));
    for receipt in repeats {
        assert_eq!(receipt.await?, Outcome::Duplicate);
    }

    // 3. The events topic holds exactly the N events, once each.
    let landed = h.events_on_topic(N).await?;
    assert_eq!(landed.len(), N);
    let landed_ids: BTreeSet<&str> = landed.iter().map(|l| l.event.id.as_str()).collect();
    let sent_ids: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(landed_ids, sent_ids);
    h.stop().await
}

#[tokio::test]
async fn an_ingestors_positions_are_where_its_events_landed_and_a_reader_waits_for_them_all()
-> Result<()> {
    let h = GatewayHarness::start().await?;
    let client = Client::builder(&h.base, key("ingest")?)
        .batch_size(8)
        .build()?;
    let ingestor = client.ingestor();
    assert_eq!(ingestor.positions(), []);

    // 1. 40 events for 10 customers in batches of 8, then 2 repeats: after the flush, the
    //    positions are the highest offset per events-topic partition, as read back from it.
    //    The repeats go once the first 40 are flushed: the gateway records an id once the
    //    broker acknowledged it, so a repeat sent while its original's batch was still in
    //    flight was taken as new (under load, `accepted` 41 times).
    let mut receipts = Vec::new();
    for n in 0..40 {
        let event = Event::new("api.request", format!("customer-{}", n % 10))
            .with_id(format!("positions-{n}"));
        receipts.push(ingestor.send(event).await?);
    }
    assert_eq!(counts(ingestor.flush().await?), (40, 0, 0, 0));
    for n in [3, 17] {
        let event = Event::new("api.request", format!("customer-{}", n % 10))
            .with_id(format!("positions-{n}"));
        receipts.push(ingestor.send(event).await?);
    }
    assert_eq!(counts(ingestor.flush().await?), (40, 2, 0, 0));
    let mut outcomes = Vec::new();
    for receipt in receipts {
        outcomes.push(receipt.await?);
    }
    assert_eq!(
        outcomes,
        [vec![Outcome::Accepted; 40], vec![Outcome::Duplicate; 2]].concat()
    );
    let bootstrap = h.kafka.bootstrap_servers().to_owned();
    let messages = tokio::task::spawn_blocking(move || {
        neruba::embedded::read_topic(
            &bootstrap,
            topics::EVENTS,
            40,
            Duration::from_millis(500),
            Duration::from_secs(15),
        )
    })
    .await??;
    assert_eq!(messages.len(), 40);
    let mut highest: BTreeMap<i32, i64> = BTreeMap::new();
    for message in &messages {
        let at = highest
            .entry(rdkafka::Message::partition(message))
            .or_insert(0);
        *at = (*at).max(rdkafka::Message::offset(message));
    }
    let expected: Vec<Position> = highest
        .into_iter()
        .map(|(partition, offset)| Position::new(topics::EVENTS, partition, offset))
        .collect();
    let positions = ingestor.positions();
    assert_eq!(positions, expected);
    ingestor.close().await?;

    // 2. A reader at all of them sends them as one `min_position`, joined by `,`.
    let stub = Stub::answering(json!({"customer": "c", "as_of": [], "grants": []})).await?;
    let reader = Client::new(&stub.base, "k")?.reader().at_all(&positions);
    assert_eq!(reader.positions(), positions);
    assert_eq!(reader.position().as_ref(), positions.first());
    reader.grants("c").await?;
    let joined: Vec<String> = positions
        .iter()
        .map(|p| format!("{}%3A{}%3A{}", p.topic, p.partition, p.offset))
        .collect();
    let seen = stub.seen();
    assert_eq!(
        seen.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(),
        [format!(
            "/v1/customers/c/grants?min_position={}",
            joined.join("%2C")
        )]
    );
    // None: no wait at all.
    let unbound = Client::new(&stub.base, "k")?.reader().at_all(&[]);
    assert_eq!((unbound.position(), unbound.positions()), (None, vec![]));
    h.stop().await
}

#[tokio::test]
async fn a_reader_keeps_the_highest_position_per_partition_and_refuses_more_than_the_api_takes()
-> Result<()> {
    let stub = Stub::answering(json!({"customer": "c", "as_of": [], "grants": []})).await?;
    let reader = Client::new(&stub.base, "k")?.reader();

    // 1. Positions of one topic and partition say the same as their highest: one is sent.
    let given = [
        Position::new(topics::EVENTS, 2, 5),
        Position::new(topics::EVENTS, 0, 7),
        Position::new(topics::EVENTS, 2, 9),
        Position::new(topics::LEDGER, 2, 1),
        Position::new(topics::EVENTS, 2, 3),
    ];
    let merged = reader.at_all(&given);
    assert_eq!(
        merged.positions(),
        [
            Position::new(topics::EVENTS, 2, 9),
            Position::new(topics::EVENTS, 0, 7),
            Position::new(topics::LEDGER, 2, 1),
        ]
    );
    merged.grants("c").await?;
    assert_eq!(
        stub.seen()
            .iter()
            .map(|s| s.path.as_str())
            .collect::<Vec<_>>(),
        [
            "/v1/customers/c/grants?min_position=neruba.events%3A2%3A9%2Cneruba.events%3A0%3A7%2C\
          neruba.ledger%3A2%3A1"
        ]
    );

    // 2. One per partition of a 1,024-partition topic is taken; one more is refused by every
    //    read before anything is sent.
    let all: Vec<Position> = (0..1025)
        .map(|partition| Position::new(topics::EVENTS, partition, 0))
        .collect();
    assert_eq!(neruba_client::MAX_POSITIONS, 1024);
    reader.at_all(&all[..1024]).grants("c").await?;
    assert_eq!(stub.seen().len(), 2);
    let refused = reader.at_all(&all).grants("c").await;
    assert!(
        matches!(&refused, Err(Error::InvalidArgument(m)) if m.contains("at most 1024 positions")),
        "{refused:?}"
    );
    assert_eq!(stub.seen().len(), 2);
    Ok(())
}

/// A grant as the api answers it, with `key` and `amount`.
fn grant_answer(key: &str, amount: &str) -> Value {
    json!({
        "id": format!("gr_{key}"), "key": key, "amount": amount, "currency": "USD",
        "priority": 1, "effective_at": null, "expires_at": null, "paid": null, "metadata": {},
        "received_at": "2026-11-01T00:00:00Z", "status": "active", "remaining": amount,
        "consumed": "0", "restored": "0", "expired": "0", "voided": "0"
    })
}

#[tokio::test]
async fn the_grants_read_reads_every_page_and_refuses_one_that_names_an_earlier_page() -> Result<()>
{
    // Was: the client read one answer, which had every grant; the api now pages them.
    let pages = Stub::start(|n, _| async move {
        let (grants, next) = match n {
            0 => (
                vec![grant_answer("a", "1.5"), grant_answer("b", "2")],
                json!("c1"),
            ),
            1 => (vec![grant_answer("c", "0.25")], json!("c2")),
            _ => (vec![grant_answer("d", "7")], Value::Null),
        };
        let as_of = json!([{"topic": "neruba.ledger", "partition": 1, "next_offset": 10 + n}]);
        Reply {
            status: 200,
            retry_after: None,
            body: json!({"customer": "c", "as_of": as_of, "grants": grants, "next_cursor": next})
                .to_string(),
        }
    })
    .await?;
    let grants = Client::new(&pages.base, "k")?.reader().grants("c").await?;
    let read: Vec<(&str, Decimal)> = grants
        .grants
        .iter()
        .map(|g| (g.key.as_str(), g.amount))
        .collect();
    assert_eq!(
        read,
        [
            ("a", Decimal::new(15, 1)),
            ("b", Decimal::new(2, 0)),
            ("c", Decimal::new(25, 2)),
            ("d", Decimal::new(7, 0)),
        ]
    );
    assert_eq!(grants.next_cursor, None);
    assert_eq!(grants.as_of[0].next_offset, 10);
    assert_eq!(
        pages
            .seen()
            .iter()
            .map(|s| s.path.as_str())
            .collect::<Vec<_>>(),
        [
            "/v1/customers/c/grants",
            // Later pages from a read model at least as new as the first page's (at 10).
            "/v1/customers/c/grants?cursor=c1&min_position=neruba.ledger%3A1%3A9",
            "/v1/customers/c/grants?cursor=c2&min_position=neruba.ledger%3A1%3A9",
        ]
    );

    // An answer naming a page already read would be read again for good: refused.
    let looping = Stub::start(|n, _| async move {
        Reply {
            status: 200,
            retry_after: None,
            body:
                json!({"customer": "c", "as_of": [], "grants": [grant_answer(&n.to_string(), "1")],
                         "next_cursor": "again"})
                .to_string(),
        }
    })
    .await?;
    let refused = Client::new(&looping.base, "k")?.reader().grants("c").await;
    assert!(
        matches!(&refused, Err(Error::Protocol { message, .. }) if message.contains("earlier page")),
        "{refused:?}"
    );
    assert_eq!(looping.seen().len(), 2);
    Ok(())
}

/// A line item as the api answers it, with `id` and `amount`.
fn line_item_answer(id: &str, amount: &str) -> Value {
    json!({
        "v": 1, "id": id, "kind": "usage", "tenant": "acme", "customer": "c", "meter": "m",
        "group": {}, "period_start": "2026-11-01T00:00:00Z", "period_end": "2026-12-01T00:00:00Z",
        "window_start": "2026-11-01T10:00:00Z", "window_end": "2026-11-01T10:01:00Z",
        "window_quantity": "1", "window_events": 1, "period_quantity": "1", "amount": amount,
        "period_amount": amount, "currency": "USD", "price_plan": "p", "price_version": 1,
        "revision": 1, "supersedes": null, "superseded": false
    })
}

/// A usage row as the api answers it, for the bucket starting at `minute`.
fn usage_row(minute: usize, quantity: &str) -> Value {
    json!({
        "window_start": format!("2026-11-01T10:{minute:02}:00Z"),
        "window_end": format!("2026-11-01T10:{:02}:00Z", minute + 1),
        "group": {}, "quantity": quantity, "events": 1
    })
}

/// What a stub saw: each request's path.
fn paths(stub: &Stub) -> Vec<String> {
    stub.seen().into_iter().map(|s| s.path).collect()
}

#[tokio::test]
async fn line_items_and_usage_read_later_pages_from_a_model_as_new_as_the_first_page() -> Result<()>
{
    // Was: every page read with the reader's own positions only, so another api replica,
    // further behind than the one that answered the first page, could answer a later one
    // without items the first page's model had (and read a page named before again).
    let items = Stub::start(|n, _| async move {
        let next = match n {
            0 => json!("c1"),
            1 => json!("c2"),
            _ => Value::Null,
        };
        let as_of = json!([{"topic": "neruba.ledger", "partition": 1, "next_offset": 10 + n}]);
        let item = line_item_answer(&format!("li_{n}"), &format!("0.0{n}"));
        Reply {
            status: 200,
            retry_after: None,
            body: json!({"customer": "c", "as_of": as_of, "period": "2026-11", "items": [item],
                         "next_cursor": next})
            .to_string(),
        }
    })
    .await?;
    let read = Client::new(&items.base, "k")?
        .reader()
        .line_items("c", "2026-11", None)
        .await?;
    let amounts: Vec<(&str, Decimal)> = read
        .items
        .iter()
        .map(|i| (i.id.as_str(), i.amount))
        .collect();
    assert_eq!(
        amounts,
        [
            ("li_0", Decimal::new(0, 2)),
            ("li_1", Decimal::new(1, 2)),
            ("li_2", Decimal::new(2, 2)),
        ]
    );
    assert_eq!((read.next_cursor, read.as_of[0].next_offset), (None, 10));
    assert_eq!(
        paths(&items),
        [
            "/v1/customers/c/line-items?period=2026-11&limit=1000",
            "/v1/customers/c/line-items?period=2026-11&limit=1000&cursor=c1\
             &min_position=neruba.ledger%3A1%3A9",
            "/v1/customers/c/line-items?period=2026-11&limit=1000&cursor=c2\
             &min_position=neruba.ledger%3A1%3A9",
        ]
    );

    let usage = Stub::start(|n, _| async move {
        let next = if n < 2 {
            json!(format!("u{n}"))
        } else {
            Value::Null
        };
        let as_of = json!([{"topic": "neruba.rollups", "partition": 3, "next_offset": 40 + n}]);
        Reply {
            status: 200,
            retry_after: None,
            body: json!({"customer": "c", "meter": "m", "aggregation": "sum", "window": "1m",
                         "from": "2026-11-01T10:00:00Z", "to": "2026-11-01T11:00:00Z",
                         "as_of": as_of, "data": [usage_row(n, &format!("{n}.5"))],
                         "next_cursor": next})
            .to_string(),
        }
    })
    .await?;
    let query = UsageQuery::new("c", "m", "2026-11-01T10:00:00Z", "2026-11-01T11:00:00Z");
    let read = Client::new(&usage.base, "k")?
        .reader()
        .usage(&query)
        .await?;
    let rows: Vec<(&str, Decimal)> = read
        .data
        .iter()
        .map(|r| (r.window_start.as_str(), r.quantity))
        .collect();
    assert_eq!(
        rows,
        [
            ("2026-11-01T10:00:00Z", Decimal::new(5, 1)),
            ("2026-11-01T10:01:00Z", Decimal::new(15, 1)),
            ("2026-11-01T10:02:00Z", Decimal::new(25, 1)),
        ]
    );
    assert_eq!((read.next_cursor, read.as_of[0].next_offset), (None, 40));
    let first = "/v1/usage?customer=c&meter=m&from=2026-11-01T10%3A00%3A00Z\
                 &to=2026-11-01T11%3A00%3A00Z&limit=100000";
    assert_eq!(
        paths(&usage),
        [
            first.to_owned(),
            format!("{first}&cursor=u0&min_position=neruba.rollups%3A3%3A39"),
            format!("{first}&cursor=u1&min_position=neruba.rollups%3A3%3A39"),
        ]
    );

    // A page naming one read before would be read again for good: refused, for both.
    let looping = Stub::start(|_, seen| async move {
        let body = if seen.path.contains("line-items") {
            json!({"customer": "c", "as_of": [], "period": "2026-11",
                   "items": [line_item_answer("li", "1")], "next_cursor": "again"})
        } else {
            json!({"customer": "c", "meter": "m", "aggregation": "sum", "window": "1m",
                   "from": "2026-11-01T10:00:00Z", "to": "2026-11-01T11:00:00Z", "as_of": [],
                   "data": [usage_row(0, "1")], "next_cursor": "again"})
        };
        Reply {
            status: 200,
            retry_after: None,
            body: body.to_string(),
        }
    })
    .await?;
    let reader = Client::new(&looping.base, "k")?.reader();
    let refused = [
        reader.line_items("c", "2026-11", None).await.err(),
        reader.usage(&query).await.err(),
    ];
    assert!(
        refused.iter().all(
            |r| matches!(r, Some(Error::Protocol { message, .. }) if message.contains("earlier page"))
        ),
        "{refused:?}"
    );
    assert_eq!(looping.seen().len(), 4);
    Ok(())
}

#[tokio::test]
async fn a_usage_page_as_large_as_the_api_answers_is_read_whole() -> Result<()> {
    // Was: an answer past 32 MiB was cut off and failed to decode, for good (a protocol
    // error, not retried); the api answers usage pages of up to 100,000 rows and 32 MiB of
    // group text besides, so a meter grouped by values of a few hundred bytes (a URL path)
    // made such pages. A page of 100,000 rows with a 400-byte group value each: 47 MB.
    const ROWS: usize = 100_000;
    let value = "/a/path".repeat(57);
    let data: Vec<Value> = (0..ROWS)
        .map(|n| {
            json!({
                "window_start": "2026-11-01T10:00:00Z", "window_end": "2026-11-01T10:01:00Z",
                "group": {"path": format!("{value}{n:07}")}, "quantity": "1.5", "events": 1
            })
        })
        .collect();
    let body = json!({"customer": "c", "meter": "m", "aggregation": "sum", "window": "1m",
                      "from": "2026-11-01T10:00:00Z", "to": "2026-11-01T11:00:00Z",
                      "as_of": [], "data": data, "next_cursor": null})
    .to_string();
    ensure!(body.len() > 40 << 20, "the page is {} bytes", body.len());
    let body = Arc::new(body);
    let stub = Stub::start(move |_, _| {
        let body = body.clone();
        async move {
            Reply {
                status: 200,
                retry_after: None,
                body: body.to_string(),
            }
        }
    })
    .await?;
    let query = UsageQuery::new("c", "m", "2026-11-01T10:00:00Z", "2026-11-01T11:00:00Z");
    let read = Client::new(&stub.base, "k")?.reader().usage(&query).await?;
    assert_eq!(read.data.len(), ROWS);
    let last = read.data.last().context("no rows")?;
    assert_eq!(
        (last.group.get("path"), last.quantity),
        (
            Some(&format!("{value}{:07}", ROWS - 1)),
            Decimal::new(15, 1)
        )
    );
    // The client asks for pages of the api's default bound, whatever the api's own.
    assert_eq!(
        paths(&stub),
        ["/v1/usage?customer=c&meter=m&from=2026-11-01T10%3A00%3A00Z\
          &to=2026-11-01T11%3A00%3A00Z&limit=100000"]
    );
    Ok(())
}

#[tokio::test]
async fn a_rejected_events_code_reaches_its_receipt_and_its_batch_mates_are_accepted() -> Result<()>
{
    let h = GatewayHarness::start().await?;
    let client = Client::new(&h.base, key("ingest")?)?;
    let ingestor = client.ingestor();
    let bad_value = ingestor
        .send(
            Event::new("llm.completion", "c1")
                .with_id("bad-tokens")
                .with_data(json!({"model": "m", "status": "ok", "tokens": "a dozen"})),
        )
        .await?;
    let bad_time = ingestor
        .send(
            Event::new("api.request", "c1")
                .with_id("bad-time")
                .with_time("24/11/2026"),
        )
        .await?;
    let good = ingestor
        .send(
            Event::new("llm.completion", "c1")
                .with_id("good")
                .with_data(json!({"model": "m", "status": "ok", "tokens": "12.5"})),
        )
        .await?;
    let totals = ingestor.close().await?;
    assert_eq!(counts(totals), (1, 0, 2, 0));

    let code = |outcome: Outcome| match outcome {
        Outcome::Rejected { code, .. } => code,
        other => format!("{other:?}"),
    };
    assert_eq!(code(bad_value.await?), "invalid_value");
    assert_eq!(code(bad_time.await?), "invalid_field");
    assert_eq!(good.await?, Outcome::Accepted);
    let landed = h.events_on_topic(1).await?;
    let landed: Vec<&str> = landed.iter().map(|l| l.event.id.as_str()).collect();
    assert_eq!(landed, ["good"]);
    h.stop().await
}

#[tokio::test]
async fn a_refused_key_fails_every_receipt_and_the_flush_with_the_gateways_code() -> Result<()> {
    let h = GatewayHarness::start().await?;
    for (api_key, status, code) in [
        ("nrb_not_a_key", 401, "unauthenticated"),
        (key("credits")?, 403, "forbidden"),
    ] {
        let ingestor = Client::new(&h.base, api_key)?.ingestor();
        let mut receipts = Vec::new();
        for n in 0..5 {
            let event = Event::new("api.request", "c1").with_id(format!("{code}-{n}"));
            receipts.push(ingestor.send(event).await?);
        }
        match ingestor.flush().await {
            Err(Error::Refused {
                status: s, code: c, ..
            }) => assert_eq!((s, c.as_str()), (status, code)),
            other => bail!("flush with {code}: {other:?}"),
        }
        for receipt in receipts {
            let error = receipt
                .await
                .err()
                .context("a refused event has no outcome")?;
            assert_eq!((error.status(), error.code()), (Some(status), Some(code)));
            assert!(!error.is_retryable());
        }
        assert_eq!(counts(ingestor.totals()), (0, 0, 0, 5));
        // The failure was reported by the flush; closing has nothing more to report.
        assert_eq!(counts(ingestor.close().await?), (0, 0, 0, 5));
    }
    assert!(h.events_on_topic(0).await?.is_empty());
    h.stop().await
}

#[tokio::test]
async fn with_a_tiny_queue_every_send_still_arrives() -> Result<()> {
    const N: usize = 300;
    let h = GatewayHarness::start().await?;
    let client = Client::builder(&h.base, key("ingest")?)
        .queue_capacity(1)
        .batch_size(7)
        .max_in_flight(1)
        .linger(Duration::from_millis(1))
        .build()?;
    let ingestor = client.ingestor();
    // Several producers share the ingestor, each waiting on the full queue in turn.
    let mut producers = Vec::new();
    for p in 0..3 {
        let ingestor = ingestor.clone();
        producers.push(tokio::spawn(async move {
            for n in 0..N / 3 {
                let event = Event::new("api.request", "c1").with_id(format!("p{p}-{n}"));
                let _receipt = ingestor.send(event).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for producer in producers {
        producer.await??;
    }
    let other = ingestor.clone();
    assert_eq!(counts(ingestor.close().await?), (N as u64, 0, 0, 0));
    // Closed through one handle, closed for all.
    let late = other.send(Event::new("api.request", "c1")).await;
    assert_eq!(late.err(), Some(Error::Closed));
    assert_eq!(counts(other.close().await?), (N as u64, 0, 0, 0));
    let landed = h.events_on_topic(N).await?;
    let ids: BTreeSet<&str> = landed.iter().map(|l| l.event.id.as_str()).collect();
    assert_eq!((landed.len(), ids.len()), (N, N));
    h.stop().await
}

#[tokio::test]
async fn a_full_pipeline_makes_send_wait_with_exactly_its_bound_taken() -> Result<()> {
    // 1. A stub that holds its first answer until released.
    let (release, released) = tokio::sync::watch::channel(false);
    let stub = Stub::start(move |_, seen| {
        let mut released = released.clone();
        async move {
            let _ = released.wait_for(|r| *r).await;
            all_accepted(&seen)
        }
    })
    .await?;
    let client = Client::builder(&stub.base, "k")
        .queue_capacity(1)
        .batch_size(3)
        .max_in_flight(1)
        .linger(Duration::from_secs(60))
        .build()?;
    let ingestor = client.ingestor();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let producer = {
        let (ingestor, sent) = (ingestor.clone(), sent.clone());
        tokio::spawn(async move {
            for n in 0..30 {
                let event = Event::new("api.request", "c1").with_id(format!("e-{n}"));
                let _receipt = ingestor.send(event).await?;
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Ok::<_, Error>(())
        })
    };

    // 2. While the first batch is held: one batch in flight (3), one sealed (3), one event in
    //    the queue (1). The eighth send waits.
    stub.wait_for_requests(1).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 7);
    assert_eq!(stub.seen().len(), 1);

    // 3. Released, everything goes, in batches of exactly 3.
    release.send(true)?;
    producer.await??;
    assert_eq!(counts(ingestor.close().await?), (30, 0, 0, 0));
    let seen = stub.seen();
    let sizes: Vec<usize> = seen.iter().map(|s| s.ids().len()).collect();
    assert_eq!(sizes, [3; 10]);
    let ids: BTreeSet<String> = seen.iter().flat_map(Seen::ids).collect();
    assert_eq!(ids.len(), 30);
    Ok(())
}

#[tokio::test]
async fn a_503_with_retry_after_is_retried_once_no_sooner_with_the_same_ids() -> Result<()> {
    let stub = Stub::start(|n, seen| async move {
        if n == 0 {
            Reply::error(503, "broker_unavailable", Some(1))
        } else {
            all_accepted(&seen)
        }
    })
    .await?;
    let ingestor = Client::new(&stub.base, "k")?.ingestor();
    let mut receipts = Vec::new();
    for n in 0..4 {
        let event = Event::new("api.request", "c1").with_id(format!("e-{n}"));
        receipts.push(ingestor.send(event).await?);
    }
    assert_eq!(counts(ingestor.close().await?), (4, 0, 0, 0));
    for receipt in receipts {
        assert_eq!(receipt.await?, Outcome::Accepted);
    }

    let seen = stub.seen();
    assert_eq!(seen.len(), 2, "one attempt and one retry");
    assert_eq!(seen[0].ids(), ["e-0", "e-1", "e-2", "e-3"]);
    assert_eq!(seen[1].ids(), seen[0].ids());
    // The same bytes: ids, and the times stamped when the events were queued.
    assert_eq!(seen[1].body, seen[0].body);
    let waited = seen[1].at - seen[0].at;
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    Ok(())
}

#[tokio::test]
async fn the_attempt_observer_sees_every_attempt_with_its_status_size_and_latency() -> Result<()> {
    // A 429, then a 503, then the answer, each held back 50 ms.
    let stub = Stub::start(|n, seen| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match n {
            0 => Reply::error(429, "rate_limited", None),
            1 => Reply::error(503, "broker_unavailable", None),
            _ => all_accepted(&seen),
        }
    })
    .await?;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let recorded = attempts.clone();
    let ingestor = Client::builder(&stub.base, "k")
        .retry_policy(RetryPolicy::default().with_initial_backoff(Duration::from_millis(10)))
        .on_ingest_attempt(move |attempt| {
            if let Ok(mut attempts) = recorded.lock() {
                attempts.push(attempt.clone());
            }
        })
        .build()?
        .ingestor();
    for n in 0..5 {
        let event = Event::new("api.request", "c1").with_id(format!("e-{n}"));
        // The receipt is not awaited: `close` counts every outcome.
        drop(ingestor.send(event).await?);
    }
    assert_eq!(counts(ingestor.close().await?), (5, 0, 0, 0));
    let attempts = attempts.lock().map(|a| a.clone()).unwrap_or_default();
    let seen: Vec<(Option<u16>, usize)> = attempts.iter().map(|a| (a.status, a.events)).collect();
    assert_eq!(seen, [(Some(429), 5), (Some(503), 5), (Some(200), 5)]);
    assert!(
        attempts
            .iter()
            .all(|a| a.elapsed >= Duration::from_millis(50)),
        "{attempts:?}"
    );
    Ok(())
}

#[tokio::test]
async fn after_a_partial_503_only_the_undelivered_events_are_sent_again() -> Result<()> {
    // The gateway's 503: the first event landed, the others were not delivered.
    let stub = Stub::start(|n, seen| async move {
        if n > 0 {
            return all_accepted(&seen);
        }
        let results: Vec<Value> = seen
            .ids()
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let status = if i == 0 { "accepted" } else { "not_delivered" };
                json!({"id": id, "status": status})
            })
            .collect();
        let body = json!({"accepted": 1, "duplicate": 0, "rejected": 0, "results": results,
            "error": {"code": "broker_unavailable", "message": "retry"}});
        Reply {
            status: 503,
            retry_after: Some(1),
            body: body.to_string(),
        }
    })
    .await?;
    let ingestor = Client::new(&stub.base, "k")?.ingestor();
    let mut receipts = Vec::new();
    for n in 0..3 {
        let event = Event::new("api.request", "c1").with_id(format!("e-{n}"));
        receipts.push(ingestor.send(event).await?);
    }
    assert_eq!(counts(ingestor.close().await?), (3, 0, 0, 0));
    for receipt in receipts {
        assert_eq!(receipt.await?, Outcome::Accepted);
    }
    let seen = stub.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].ids(), ["e-0", "e-1", "e-2"]);
    assert_eq!(seen[1].ids(), ["e-1", "e-2"]);
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(1));
    Ok(())
}

#[tokio::test]
async fn a_request_unavailable_through_every_attempt_fails_with_the_last_answer() -> Result<()> {
    let stub =
        Stub::start(|_, _| async { Reply::error(503, "broker_unavailable", Some(0)) }).await?;
    // A base URL with a path: the routes go under it.
    let client = Client::builder(format!("{}/prefix/", stub.base), "k")
        .retry_policy(
            RetryPolicy::default()
                .with_max_attempts(3)
                .with_initial_backoff(Duration::from_millis(10)),
        )
        .build()?;
    let ingestor = client.ingestor();
    let receipt = ingestor
        .send(Event::new("api.request", "c1").with_id("e-0"))
        .await?;
    let expected = Error::Unavailable {
        attempts: 3,
        status: Some(503),
        code: Some("broker_unavailable".to_owned()),
        message: "stub says broker_unavailable".to_owned(),
    };
    assert_eq!(ingestor.flush().await.err(), Some(expected.clone()));
    assert_eq!(receipt.await.err(), Some(expected));
    assert!(ingestor.close().await.is_ok());
    let seen = stub.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.path == "/prefix/v1/events"));
    Ok(())
}

#[tokio::test]
async fn a_rate_limited_grant_is_retried_after_retry_after_with_the_same_body() -> Result<()> {
    let id = credit::grant_id("acme", "c/1", "k-1");
    let answer = json!({"id": id, "status": "accepted",
        "position": {"topic": "neruba.ledger", "partition": 2, "offset": 41}});
    let stub = Stub::start(move |n, _| {
        let answer = answer.to_string();
        async move {
            if n == 0 {
                Reply::error(429, "rate_limited", Some(1))
            } else {
                Reply {
                    status: 202,
                    retry_after: None,
                    body: answer,
                }
            }
        }
    })
    .await?;
    let client = Client::new(&stub.base, "k")?;
    let accepted = client
        .grant(
            "c/1",
            &GrantRequest::new("k-1", Decimal::new(1005, 1), "credits"),
        )
        .await?;
    assert_eq!(
        (accepted.id.as_str(), accepted.status.as_str()),
        (id.as_str(), "accepted")
    );
    assert_eq!(
        (accepted.position.partition, accepted.position.offset),
        (2, 41)
    );

    let seen = stub.seen();
    assert_eq!(seen.len(), 2);
    // The customer is one path segment, its `/` percent-encoded.
    assert!(seen.iter().all(|s| s.path == "/v1/customers/c%2F1/grants"));
    assert_eq!(
        String::from_utf8_lossy(&seen[0].body),
        r#"{"key":"k-1","amount":"100.5","currency":"credits"}"#
    );
    assert_eq!(seen[1].body, seen[0].body);
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(1));
    Ok(())
}

#[tokio::test]
async fn grants_voids_and_rules_through_the_client_land_on_the_ledger_with_their_ids() -> Result<()>
{
    let h = GatewayHarness::start().await?;
    let client = Client::new(&h.base, key("credits")?)?;
    let customer = "team a/b";
    let partition = stable_partition("acme/team a/b", LEDGER_PARTITIONS);
    let id = credit::grant_id("acme", customer, "purchase-1");

    // 1. A grant, and the same grant again: the same id, written twice (the balances stage
    //    applies a key once).
    let grant = GrantRequest::new("purchase-1", Decimal::new(2550, 2), "USD")
        .with_priority(5)
        .with_expires_at("2027-01-01T00:00:00Z")
        .with_paid(Decimal::new(20, 0), "USD")
        .with_metadata("order", "o-17");
    let first = client.grant(customer, &grant).await?;
    let again = client.grant(customer, &grant).await?;
    for (answer, offset) in [(&first, 0), (&again, 1)] {
        assert_eq!(
            (answer.id.as_str(), answer.status.as_str()),
            (id.as_str(), "accepted")
        );
        let p = &answer.position;
        assert_eq!(
            (p.topic.as_str(), p.partition, p.offset),
            (topics::LEDGER, partition, offset)
        );
    }

    // 2. A void, a rule, its removal.
    let voided = client.void(customer, &id).await?;
    assert_eq!(
        (voided.grant.as_str(), voided.position.offset),
        (id.as_str(), 2)
    );
    let rule = client
        .set_balance_rule(
            customer,
            "USD",
            Decimal::new(1000, 2),
            Some(Decimal::new(5000, 2)),
        )
        .await?;
    assert_eq!(
        (
            rule.customer.as_str(),
            rule.currency.as_str(),
            rule.position.offset
        ),
        (customer, "USD", 3)
    );
    let removed = client.remove_balance_rule(customer, "USD").await?;
    assert_eq!(removed.position.offset, 4);

    // 3. Refusals carry the gateway's code and write nothing.
    let refusals = [
        client
            .grant(
                customer,
                &GrantRequest::new("bad", Decimal::new(-1, 0), "USD"),
            )
            .await
            .err(),
        client
            .grant(customer, &GrantRequest::new("bad", Decimal::ONE, "XYZ"))
            .await
            .err(),
        client.void(customer, "gr_nope").await.err(),
        client
            .set_balance_rule(customer, "USD", Decimal::new(1, 3), None)
            .await
            .err(),
        Client::new(&h.base, key("ingest")?)?
            .grant(customer, &grant)
            .await
            .err(),
    ];
    let codes: Vec<_> = refusals
        .iter()
        .map(|e| e.as_ref().map(|e| (e.status(), e.code())))
        .collect();
    assert_eq!(
        codes,
        [
            Some((Some(422), Some("invalid_amount"))),
            Some((Some(422), Some("unknown_currency"))),
            Some((Some(422), Some("invalid_grant_id"))),
            Some((Some(422), Some("invalid_threshold"))),
            Some((Some(403), Some("forbidden"))),
        ]
    );
    // A customer no URL path can carry is refused before sending.
    assert!(matches!(
        client.void("..", &id).await,
        Err(Error::InvalidArgument(_))
    ));

    // 4. The ledger holds exactly the five accepted records, in the customer's partition.
    let records = h.ledger_records(5).await?;
    let shape: Vec<_> = records
        .iter()
        .map(|r| (r.record.as_deref(), r.key.as_str(), r.partition, r.offset))
        .collect();
    let at = |kind, offset| (Some(kind), "acme/team a/b", partition, offset);
    assert_eq!(
        shape,
        [
            at("grant", 0),
            at("grant", 1),
            at("void", 2),
            at("rule", 3),
            at("rule", 4)
        ]
    );
    let written: Grant = credit::decode(&records[0].payload)?;
    assert_eq!(
        (
            written.id.as_str(),
            written.key.as_str(),
            written.customer.as_str()
        ),
        (id.as_str(), "purchase-1", customer)
    );
    assert_eq!(
        (written.terms.amount, written.terms.priority),
        (Decimal::new(2550, 2), 5)
    );
    assert_eq!(
        written.terms.paid.as_ref().map(|p| p.amount),
        Some(Decimal::new(20, 0))
    );
    let void: Void = credit::decode(&records[2].payload)?;
    assert_eq!(void.grant, id);
    let set: RuleRecord = credit::decode(&records[3].payload)?;
    let set = set.rule.context("a set rule")?;
    assert_eq!(
        (set.low_balance_threshold, set.recharge_to),
        (Decimal::new(1000, 2), Some(Decimal::new(5000, 2)))
    );
    let removal: RuleRecord = credit::decode(&records[4].payload)?;
    assert_eq!(removal.rule, None);
    h.stop().await
}

// --- Billing reads: the api (`neruba_api`) beside the gateway on one embedded broker. ---

/// Partitions of the rollups topic the read pipeline creates.
const ROLLUP_PARTITIONS: i32 = 2;

fn d(text: &str) -> Decimal {
    text.parse()
        .unwrap_or_else(|_| panic!("not a decimal: {text}"))
}

fn ms(time: &str) -> Result<i64> {
    neruba_schemas::event::parse_time_ms(time).map_err(|e| anyhow::anyhow!("{time}: {e:?}"))
}

/// The refusal's status and code, or what came instead.
fn refusal<T: std::fmt::Debug>(result: neruba_client::Result<T>) -> (Option<u16>, String) {
    match result {
        Err(Error::Refused { status, code, .. }) => (Some(status), code),
        other => (None, format!("{other:?}")),
    }
}

/// A gateway and an api on one embedded broker with the events, ledger and rollups topics.
struct Pipeline {
    kafka: EmbeddedKafka,
    gateway: String,
    api: String,
    shutdown: CancellationToken,
    running: Option<(neruba_ingest_gateway::Running, neruba_api::Running)>,
    _state: tempfile::TempDir,
}

impl Pipeline {
    async fn start() -> Result<Self> {
        let kafka = EmbeddedKafka::start(&[
            (topics::EVENTS, 3),
            (topics::LEDGER, LEDGER_PARTITIONS),
            (topics::ROLLUPS, ROLLUP_PARTITIONS),
            (topics::DEAD_LETTER, 1),
        ])?;
        let catalog = Arc::new(sample::catalog()?);
        let shutdown = CancellationToken::new();
        let gateway = neruba_ingest_gateway::start(
            neruba_ingest_gateway::Config::new(
                ([127, 0, 0, 1], 0).into(),
                kafka.bootstrap_servers(),
            ),
            catalog.clone(),
            prometheus::Registry::new(),
            shutdown.clone(),
        )
        .await?;
        let state = tempfile::tempdir()?;
        let mut config = neruba_api::Config::new(
            kafka.bootstrap_servers(),
            state.path(),
            "127.0.0.1:0".parse()?,
            "test",
        );
        // A row per usage page: every usage read below goes through every page.
        config.max_usage_rows = 1;
        let api = neruba_api::start(
            config,
            catalog,
            &prometheus::Registry::new(),
            shutdown.clone(),
        )
        .await?;
        Ok(Self {
            gateway: format!("http://{}", gateway.local_addr),
            api: format!("http://{}", api.local_addr),
            kafka,
            shutdown,
            running: Some((gateway, api)),
            _state: state,
        })
    }

    /// A client of the gateway with acme's `credits` key.
    fn writer(&self) -> Result<Client> {
        Ok(Client::new(&self.gateway, key("credits")?)?)
    }

    /// The reads of the api with `tenant`'s `read` key.
    fn reader(&self, tenant: &str) -> Result<Reader> {
        let key = sample::dev_key(tenant, "read").context("no read key")?;
        Ok(Client::new(&self.api, key)?.reader())
    }

    async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some((gateway, api)) = self.running.take() {
            gateway.wait().await?;
            api.wait().await?;
        }
        Ok(())
    }
}

/// Writes `payload` to `topic` keyed `acme/<customer>` in that key's stable partition, as the
/// rater (ledger) and the aggregator (rollups) do; returns where it landed.
async fn produce(
    producer: &FutureProducer,
    topic: &str,
    partitions: i32,
    customer: &str,
    key: &str,
    payload: &[u8],
) -> Result<Position> {
    let partition = stable_partition(&format!("acme/{customer}"), partitions);
    let record = FutureRecord::to(topic)
        .key(key)
        .payload(payload)
        .partition(partition);
    let delivered = producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)?;
    Ok(Position::new(topic, delivered.partition, delivered.offset))
}

#[allow(clippy::too_many_arguments)]
fn line_item(
    customer: &str,
    id: &str,
    model: &str,
    window: &str,
    revision: u32,
    supersedes: Option<&str>,
    quantities: (&str, &str),
    amounts: (&str, &str),
) -> Result<ledger::LineItem> {
    let window_ms = ms(window)?;
    Ok(ledger::LineItem {
        v: 1,
        id: id.into(),
        kind: if supersedes.is_some() {
            ledger::Kind::Adjustment
        } else {
            ledger::Kind::Usage
        },
        tenant: "acme".into(),
        customer: customer.into(),
        meter: "llm_tokens".into(),
        group: BTreeMap::from([("model".to_owned(), model.to_owned())]),
        period_start: format_time_ms(ms("2026-11-01T00:00:00Z")?),
        period_end: format_time_ms(ms("2026-12-01T00:00:00Z")?),
        window_start: format_time_ms(window_ms),
        window_end: format_time_ms(window_ms + 60_000),
        window_quantity: d(quantities.0),
        window_events: 1,
        period_quantity: d(quantities.1),
        amount: d(amounts.0),
        period_amount: d(amounts.1),
        currency: "USD".into(),
        price_plan: "llm-tokens-standard".into(),
        price_version: 1,
        revision,
        supersedes: supersedes.map(str::to_owned),
    })
}

fn rollup(
    customer: &str,
    model: &str,
    window: &str,
    revision: u32,
    quantity: &str,
    events: u64,
) -> Result<Rollup> {
    let window_ms = ms(window)?;
    Ok(Rollup {
        v: 1,
        tenant: "acme".into(),
        meter: "llm_tokens".into(),
        customer: customer.into(),
        group: BTreeMap::from([("model".to_owned(), model.to_owned())]),
        aggregation: neruba_schemas::catalog::Aggregation::Sum,
        window_start_ms: window_ms,
        window_end_ms: window_ms + 60_000,
        period_start_ms: ms("2026-11-01T00:00:00Z")?,
        period_end_ms: ms("2026-12-01T00:00:00Z")?,
        window_quantity: d(quantity),
        window_events: events,
        period_quantity: d(quantity),
        period_events: events,
        revision,
        latest_event: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_voids_and_rules_written_through_the_gateway_are_read_back_at_their_positions()
-> Result<()> {
    let p = Pipeline::start().await?;
    let writer = p.writer()?;
    let reader = p.reader("acme")?;
    let customer = "team a/b";

    // 1. A grant, read at the position its write answered: there at once, exactly as written.
    let terms = GrantRequest::new("purchase-1", d("25.50"), "USD")
        .with_priority(5)
        .with_expires_at("2099-01-01T00:00:00Z")
        .with_paid(d("20.00"), "USD")
        .with_metadata("order", "o-17");
    let written = writer.grant(customer, &terms).await?;
    let grants = reader.at(&written.position).grants(customer).await?;
    assert_eq!(grants.customer, customer);
    assert_eq!(grants.as_of.len(), 1);
    assert!(
        grants.as_of[0].includes(&written.position),
        "{:?} does not include {}",
        grants.as_of,
        written.position
    );
    let [grant] = grants.grants.as_slice() else {
        bail!("one grant: {grants:?}");
    };
    assert_eq!(
        (
            grant.id.as_str(),
            grant.key.as_str(),
            grant.currency.as_str()
        ),
        (written.id.as_str(), "purchase-1", "USD")
    );
    // Exact, scale kept: the decimal string the api wrote, not a float's rendering.
    assert_eq!(grant.amount.to_string(), "25.50");
    assert_eq!(grant.remaining.to_string(), "25.50");
    let zero = Decimal::ZERO;
    assert_eq!(
        (grant.consumed, grant.restored, grant.expired, grant.voided),
        (zero, zero, zero, zero)
    );
    assert_eq!((grant.priority, &grant.status), (5, &GrantStatus::Active));
    assert_eq!(
        grant.expires_at.as_deref(),
        Some(format_time_ms(ms("2099-01-01T00:00:00Z")?).as_str())
    );
    assert_eq!(grant.effective_at, None);
    assert_eq!(
        grant.paid,
        Some(Paid {
            amount: d("20.00"),
            currency: "USD".into()
        })
    );
    assert_eq!(
        grant.metadata.get("order").map(String::as_str),
        Some("o-17")
    );
    let one = reader
        .at(&written.position)
        .grant(customer, &written.id)
        .await?;
    assert_eq!((one.customer.as_str(), &one.grant), (customer, grant));

    // 2. A second grant and a balance rule; the balance read at the rule's position.
    let promo = writer
        .grant(customer, &GrantRequest::new("promo", d("0.01"), "USD"))
        .await?;
    let rule = writer
        .set_balance_rule(customer, "USD", d("10.00"), Some(d("50.00")))
        .await?;
    let balances = reader.at(&rule.position).balances(customer).await?;
    let [usd] = balances.balances.as_slice() else {
        bail!("one currency: {balances:?}");
    };
    assert_eq!(
        (
            usd.currency.as_str(),
            usd.balance,
            usd.available,
            usd.active_grants
        ),
        ("USD", d("25.51"), d("25.51"), 2)
    );
    let view = usd.rule.as_ref().context("the rule")?;
    assert_eq!(
        (
            view.low_balance_threshold,
            view.recharge_to,
            view.below_threshold,
            view.outstanding_request.as_deref()
        ),
        (d("10.00"), Some(d("50.00")), false, None)
    );

    // 3. The balance entries, one page at a time and all at once.
    let first = reader.balance_entries(customer, 0, Some(1)).await?;
    assert_eq!(first.next_after, Some(1));
    let second = reader.balance_entries(customer, 1, Some(1)).await?;
    let all = reader.all_balance_entries(customer, 0).await?;
    assert_eq!(
        [first.entries.as_slice(), second.entries.as_slice()].concat(),
        all
    );
    let shape: Vec<_> = all
        .iter()
        .map(|e| {
            (
                e.seq,
                e.kind.clone(),
                e.grant.as_deref(),
                e.amount,
                e.balance_before,
                e.balance_after,
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            (
                1,
                EntryKind::Grant,
                Some(written.id.as_str()),
                d("25.50"),
                zero,
                d("25.50")
            ),
            (
                2,
                EntryKind::Grant,
                Some(promo.id.as_str()),
                d("0.01"),
                d("25.50"),
                d("25.51")
            ),
        ]
    );
    assert_eq!(reader.all_balance_entries(customer, 1).await?, all[1..]);

    // 4. A void, read at its position: what was left is voided, in burn-down order.
    let voided = writer.void(customer, &written.id).await?;
    let grants = reader.at(&voided.position).grants(customer).await?;
    let states: Vec<_> = grants
        .grants
        .iter()
        .map(|g| (g.id.as_str(), g.status.clone(), g.remaining, g.voided))
        .collect();
    assert_eq!(
        states,
        [
            (written.id.as_str(), GrantStatus::Voided, zero, d("25.50")),
            (promo.id.as_str(), GrantStatus::Active, d("0.01"), zero),
        ]
    );
    let balance = reader.balances(customer).await?;
    assert_eq!(balance.balances[0].balance, d("0.01"));

    // 5. The customer is listed.
    let page = reader.at(&voided.position).customers(None, None).await?;
    assert!(page.customers.iter().any(|c| c.id == customer), "{page:?}");
    assert_eq!(page.as_of.len(), LEDGER_PARTITIONS as usize);
    assert_eq!(reader.all_customers().await?, [customer]);

    // 6. Refusals, typed, with the api's stable codes.
    let nobody = reader.balances("nobody").await;
    assert!(matches!(
        &nobody,
        Err(Error::Refused { status: 404, code, .. }) if code == "customer_not_found"
    ));
    assert!(!nobody.as_ref().err().is_some_and(Error::is_retryable));
    let codes = [
        refusal(reader.grants("nobody").await),
        refusal(
            reader
                .grant(customer, &credit::grant_id("acme", customer, "none"))
                .await,
        ),
        // Another tenant's key: the customer does not exist for it.
        refusal(p.reader("globex")?.grants(customer).await),
        refusal(reader.statements(customer, "2026-13").await),
        refusal(reader.balance_entries(customer, 0, Some(0)).await),
        refusal(
            reader
                .at(&Position::new(topics::EVENTS, 0, 0))
                .grants(customer)
                .await,
        ),
        refusal(
            Client::new(&p.api, key("credits")?)?
                .reader()
                .grants(customer)
                .await,
        ),
    ];
    let expected = [
        (404, "customer_not_found"),
        (404, "grant_not_found"),
        (404, "customer_not_found"),
        (400, "invalid_period"),
        (400, "invalid_limit"),
        (422, "unsupported_position"),
        (403, "forbidden"),
    ]
    .map(|(status, code)| (Some(status), code.to_owned()));
    assert_eq!(codes, expected);
    assert!(matches!(
        reader.grants("..").await,
        Err(Error::InvalidArgument(_))
    ));
    p.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_line_items_and_usage_are_read_with_exact_decimals() -> Result<()> {
    let p = Pipeline::start().await?;
    let reader = p.reader("acme")?;
    let customer = "usage c/1";
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", p.kafka.bootstrap_servers())
        .create()?;

    // 1. 0.10 USD of credit, then three line items of November 2026 after it on the
    //    customer's ledger partition: 0.07345 (large), 0.05001 (small), and a revision of the
    //    large window adding 0.00002. The credit covers 0.10; 0.02348 is due.
    let grant = p
        .writer()?
        .grant(customer, &GrantRequest::new("pack", d("0.10"), "USD"))
        .await?;
    let items = [
        line_item(
            customer,
            "li_1",
            "large",
            "2026-11-01T10:00:00Z",
            1,
            None,
            ("3672.5", "3672.5"),
            ("0.07345", "0.07345"),
        )?,
        line_item(
            customer,
            "li_2",
            "small",
            "2026-11-01T10:01:00Z",
            1,
            None,
            ("2500.5", "6173"),
            ("0.05001", "0.12346"),
        )?,
        line_item(
            customer,
            "li_3",
            "large",
            "2026-11-01T10:00:00Z",
            2,
            Some("li_1"),
            ("3673.5", "6174"),
            ("0.00002", "0.12348"),
        )?,
    ];
    let mut last = None;
    for item in &items {
        let key = format!("acme/{customer}");
        let at = produce(
            &producer,
            topics::LEDGER,
            LEDGER_PARTITIONS,
            customer,
            &key,
            &credit::encode(item),
        )
        .await?;
        ensure!(
            at.partition == grant.position.partition,
            "not the grant's partition"
        );
        ensure!(at.offset > grant.position.offset, "the grant comes first");
        last = Some(at);
    }
    let last = last.context("an item")?;

    // 2. The statement, read at the last item's position.
    let statements = reader.at(&last).statements(customer, "2026-11").await?;
    assert_eq!(
        (statements.customer.as_str(), statements.period.as_str()),
        (customer, "2026-11")
    );
    assert!(statements.as_of[0].includes(&last));
    let [statement] = statements.statements.as_slice() else {
        bail!("one statement: {statements:?}");
    };
    assert_eq!(
        (statement.currency.as_str(), &statement.status),
        ("USD", &StatementStatus::Open)
    );
    assert_eq!(
        (
            statement.usage,
            statement.prior_period_amount,
            statement.credit_applied,
            statement.amount_due
        ),
        (d("0.12348"), Decimal::ZERO, d("0.10"), d("0.02348"))
    );
    assert_eq!(statement.usage.to_string(), "0.12348");
    let mut lines: Vec<_> = statement
        .lines
        .iter()
        .map(|l| (l.group["model"].as_str(), l.amount, l.quantity))
        .collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            ("large", d("0.07347"), d("6174")),
            ("small", d("0.05001"), d("6173"))
        ]
    );
    assert!(
        reader
            .statements(customer, "2026-10")
            .await?
            .statements
            .is_empty()
    );

    // 3. The line items, the revised one marked superseded.
    let listed = reader
        .at(&last)
        .line_items(customer, "2026-11", None)
        .await?;
    let shape: Vec<_> = listed
        .items
        .iter()
        .map(|i| {
            (
                i.id.as_str(),
                i.kind.clone(),
                i.amount,
                i.superseded,
                i.supersedes.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("li_1", LineItemKind::Usage, d("0.07345"), true, None),
            (
                "li_3",
                LineItemKind::Adjustment,
                d("0.00002"),
                false,
                Some("li_1")
            ),
            ("li_2", LineItemKind::Usage, d("0.05001"), false, None),
        ]
    );
    let total: Decimal = listed.items.iter().map(|i| i.amount).sum();
    assert_eq!(total, statement.usage);
    assert_eq!(listed.items[1].period_amount, d("0.12348"));
    assert!(
        reader
            .line_items(customer, "2026-11", Some("api_calls"))
            .await?
            .items
            .is_empty()
    );

    // 4. The entries agree: the grant, what it covered, and what is due.
    let entries = reader.all_balance_entries(customer, 0).await?;
    let sum = |kind: EntryKind| -> Decimal {
        entries
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.amount)
            .sum()
    };
    assert_eq!(
        (
            sum(EntryKind::Grant),
            sum(EntryKind::Consume),
            sum(EntryKind::Uncovered)
        ),
        (d("0.10"), d("-0.10"), d("0.02348"))
    );
    let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        reader.balances(customer).await?.balances[0].balance,
        Decimal::ZERO
    );

    // 5. Rollups of closed windows: 10:00 large (revised from 1200.5 to 1300.5), 10:01 small,
    //    10:02 large; the usage read at the last one's position sums them exactly.
    let rollups = [
        rollup(customer, "large", "2026-11-01T10:00:00Z", 1, "1200.5", 2)?,
        rollup(customer, "small", "2026-11-01T10:01:00Z", 1, "23800.25", 3)?,
        rollup(customer, "large", "2026-11-01T10:02:00Z", 1, "0.125", 1)?,
        rollup(customer, "large", "2026-11-01T10:00:00Z", 2, "1300.5", 3)?,
    ];
    let mut last = None;
    for r in &rollups {
        last = Some(
            produce(
                &producer,
                topics::ROLLUPS,
                ROLLUP_PARTITIONS,
                customer,
                &r.key(),
                &r.encode(),
            )
            .await?,
        );
    }
    let last = last.context("a rollup")?;
    let (from, to) = ("2026-11-01T10:00:00Z", "2026-11-01T11:00:00Z");
    let query = UsageQuery::new(customer, "llm_tokens", from, to);
    let total = reader
        .at(&last)
        .usage(
            &query
                .clone()
                .with_window(Window::Total)
                .with_group_by(Vec::<String>::new()),
        )
        .await?;
    assert_eq!(
        (
            total.aggregation.clone(),
            total.window.as_str(),
            total.meter.as_str()
        ),
        (Aggregation::Sum, "none", "llm_tokens")
    );
    assert!(total.as_of[0].includes(&last));
    let rows = |usage: &neruba_client::Usage| -> Vec<(String, Option<String>, Decimal, u64)> {
        usage
            .data
            .iter()
            .map(|r| {
                (
                    r.window_start.clone(),
                    r.group.get("model").cloned(),
                    r.quantity,
                    r.events,
                )
            })
            .collect()
    };
    let at = |time: &str| -> Result<String> { Ok(format_time_ms(ms(time)?)) };
    assert_eq!(rows(&total), [(at(from)?, None, d("25100.875"), 7)]);
    assert_eq!(total.data[0].quantity.to_string(), "25100.875");
    assert_eq!(total.data[0].window_end, at(to)?);

    // Per model and hour; the large windows only, in the meter's own windows.
    let hourly = reader
        .usage(
            &query
                .clone()
                .with_window(Window::Hour)
                .with_group_by(["model"]),
        )
        .await?;
    assert_eq!(
        rows(&hourly),
        [
            (at(from)?, Some("large".into()), d("1300.625"), 4),
            (at(from)?, Some("small".into()), d("23800.25"), 3),
        ]
    );
    let large = reader
        .usage(&query.clone().with_filter("model", "large"))
        .await?;
    assert_eq!(large.window, "1m");
    assert_eq!(
        rows(&large),
        [
            (
                at("2026-11-01T10:00:00Z")?,
                Some("large".into()),
                d("1300.5"),
                3
            ),
            (
                at("2026-11-01T10:02:00Z")?,
                Some("large".into()),
                d("0.125"),
                1
            ),
        ]
    );

    // The pages as the api answers them: a row each, the next named by its cursor, in JSON
    // and in CSV; a cursor or limit the api cannot take is refused.
    let http = reqwest::Client::new();
    let usage_url = format!(
        "{}/v1/usage?customer=usage%20c%2F1&meter=llm_tokens&from={from}&to={to}&window=hour&group_by=model",
        p.api
    );
    let read_key = sample::dev_key("acme", "read").context("no read key")?;
    let first: serde_json::Value = http
        .get(&usage_url)
        .bearer_auth(read_key)
        .send()
        .await?
        .json()
        .await?;
    let cursor = first["next_cursor"]
        .as_str()
        .context("a next page")?
        .to_owned();
    assert_eq!(first["data"].as_array().map(Vec::len), Some(1), "{first}");
    let second: serde_json::Value = http
        .get(format!("{usage_url}&cursor={cursor}"))
        .bearer_auth(read_key)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(second["next_cursor"], serde_json::Value::Null, "{second}");
    assert_eq!(
        [
            &first["data"][0]["group"]["model"],
            &second["data"][0]["group"]["model"]
        ],
        [&serde_json::json!("large"), &serde_json::json!("small")]
    );
    let csv = http
        .get(&usage_url)
        .bearer_auth(read_key)
        .header("accept", "text/csv")
        .send()
        .await?;
    assert_eq!(
        csv.headers()
            .get("neruba-next-cursor")
            .and_then(|v| v.to_str().ok()),
        Some(cursor.as_str())
    );
    // An empty cursor is the first page, in this read as in the others (was: 400 here).
    let empty: serde_json::Value = http
        .get(format!("{usage_url}&cursor="))
        .bearer_auth(read_key)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        (&empty["data"], &empty["next_cursor"]),
        (&first["data"], &first["next_cursor"]),
        "{empty}"
    );
    for (asked, code) in [
        ("&cursor=zz", "invalid_cursor"),
        ("&cursor=3132", "invalid_cursor"),
        ("&limit=0", "invalid_limit"),
    ] {
        let answer = http
            .get(format!("{usage_url}{asked}"))
            .bearer_auth(read_key)
            .send()
            .await?;
        let status = answer.status().as_u16();
        let body: serde_json::Value = answer.json().await?;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &serde_json::json!(code)),
            "{asked}"
        );
    }

    // A limit past the api's bound is lowered to it.
    let lowered: serde_json::Value = http
        .get(format!("{usage_url}&limit=50"))
        .bearer_auth(read_key)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        lowered["data"].as_array().map(Vec::len),
        Some(1),
        "{lowered}"
    );

    // Refusals: no usage at all, an unknown meter, a group the meter has not.
    let codes = [
        refusal(
            reader
                .usage(&UsageQuery::new("nobody", "llm_tokens", from, to))
                .await,
        ),
        refusal(
            reader
                .usage(&UsageQuery::new(customer, "nope", from, to))
                .await,
        ),
        refusal(reader.usage(&query.clone().with_group_by(["region"])).await),
    ];
    assert_eq!(
        codes,
        [
            (404, "customer_not_found"),
            (422, "unknown_meter"),
            (422, "unknown_group")
        ]
        .map(|(s, c)| (Some(s), c.to_owned()))
    );
    p.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_statements_of_many_lines_are_read_a_page_at_a_time_and_whole_by_the_client()
-> Result<()> {
    // Their lines are kept in runs (of 128); a page reads those it needs from its cursor's
    // place on. The api's default page is 1,000 lines, at most 10,000. Every fifth item is
    // in EUR: two statements, EUR's first, a page running from one into the other.
    const LINES: usize = 2_345;
    const EUR_LINES: usize = 469;
    let p = Pipeline::start().await?;
    let customer = "long-1";
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", p.kafka.bootstrap_servers())
        .set("linger.ms", "5")
        .create()?;
    let partition = stable_partition(&format!("acme/{customer}"), LEDGER_PARTITIONS);
    // One cent (USD) or euro cent in each of LINES groups of November 2026, then ticks at the period's end and
    // after the finalisation delay: the statement draft, then final.
    let mut records = Vec::new();
    for n in 0..LINES {
        let mut item = line_item(
            customer,
            &format!("li_{n:05}"),
            "large",
            "2026-11-02T10:00:00Z",
            1,
            None,
            ("1", "1"),
            ("0.01", "0.01"),
        )?;
        item.group = BTreeMap::from([("project".to_owned(), format!("p-{n}"))]);
        if n % 5 == 0 {
            item.currency = "EUR".into();
        }
        records.push((credit::encode(&item), None));
    }
    for at in ["2026-12-01T00:00:00Z", "2026-12-04T00:00:00Z"] {
        let tick = credit::Tick {
            v: 1,
            at_ms: ms(at)?,
            finalize_after_ms: None,
        };
        records.push((credit::encode(&tick), Some("tick")));
    }
    let record_key = format!("acme/{customer}");
    let sends = records.iter().map(|(payload, header)| {
        let mut record = FutureRecord::to(topics::LEDGER)
            .key(&record_key)
            .payload(payload)
            .partition(partition);
        if let Some(value) = header {
            let header = rdkafka::message::Header {
                key: topics::RECORD_HEADER,
                value: Some(*value),
            };
            record = record.headers(rdkafka::message::OwnedHeaders::new().insert(header));
        }
        producer.send(record, Duration::from_secs(30))
    });
    let mut last = None;
    for delivered in futures::future::join_all(sends).await {
        let delivered = delivered.map_err(|(e, _)| e)?;
        last = Some(Position::new(
            topics::LEDGER,
            delivered.partition,
            delivered.offset,
        ));
    }
    let last = last.context("a record")?;
    // Each statement's projects in line order.
    let projects_of = |eur: bool| -> Vec<String> {
        let mut projects: Vec<String> = (0..LINES)
            .filter(|n| (n % 5 == 0) == eur)
            .map(|n| format!("p-{n}"))
            .collect();
        projects.sort();
        projects
    };
    let (eur, usd) = (projects_of(true), projects_of(false));
    assert_eq!((eur.len(), usd.len()), (EUR_LINES, LINES - EUR_LINES));

    // Through the client, which reads every page: every line once, in line order.
    let reader = p.reader("acme")?.at(&last);
    let whole = reader.statements(customer, "2026-11").await?;
    let projects = |lines: &[neruba_client::StatementLine]| -> Vec<String> {
        lines.iter().map(|l| l.group["project"].clone()).collect()
    };
    let read: Vec<_> = whole
        .statements
        .iter()
        .map(|s| {
            let sum: Decimal = s.lines.iter().map(|l| l.amount).sum();
            (
                s.currency.as_str(),
                &s.status,
                s.usage,
                sum,
                projects(&s.lines),
            )
        })
        .collect();
    let final_ = StatementStatus::Final;
    assert_eq!(
        read,
        [
            ("EUR", &final_, d("4.69"), d("4.69"), eur.clone()),
            ("USD", &final_, d("18.76"), d("18.76"), usd.clone()),
        ]
    );

    // Over HTTP as a person's tool reads it: pages of the default 1,000, each with the whole
    // statement's totals, then the rest; and all of it in one page when asked.
    let http = reqwest::Client::new();
    let url = format!(
        "{}/v1/customers/{customer}/statements/2026-11?min_position={}:{}:{}",
        p.api, last.topic, last.partition, last.offset
    );
    let get = |url: String| async {
        let answer = http.get(url).bearer_auth(key("read")?).send().await?;
        anyhow::Ok(answer.error_for_status()?.json::<Value>().await?)
    };
    let (mut read, mut sizes, mut cursor) = (Vec::new(), Vec::new(), String::new());
    loop {
        let page = get(format!("{url}{cursor}")).await?;
        // Both statements on every page, with their totals.
        let mut size = 0;
        for (statement, (currency, usage)) in page["statements"]
            .as_array()
            .context("statements")?
            .iter()
            .zip([("EUR", "4.69"), ("USD", "18.76")])
        {
            assert_eq!(
                (
                    &statement["currency"],
                    &statement["status"],
                    &statement["usage"]
                ),
                (&json!(currency), &json!("final"), &json!(usage)),
                "{page}"
            );
            let lines = statement["lines"].as_array().context("lines")?;
            size += lines.len();
            read.extend(
                lines
                    .iter()
                    .map(|l| format!("{currency} {}", l["group"]["project"])),
            );
        }
        assert_eq!(page["statements"].as_array().map(Vec::len), Some(2));
        sizes.push(size);
        match page["next_cursor"].as_str() {
            Some(next) if sizes.len() < 5 => cursor = format!("&cursor={next}"),
            next => {
                ensure!(next.is_none(), "pages never end");
                break;
            }
        }
    }
    assert_eq!(sizes, [1_000, 1_000, 345]);
    let want: Vec<String> = (eur.iter().map(|p| format!("EUR \"{p}\"")))
        .chain(usd.iter().map(|p| format!("USD \"{p}\"")))
        .collect();
    assert_eq!(read, want);
    let one = get(format!("{url}&limit=10000")).await?;
    assert_eq!(one["next_cursor"], Value::Null);
    let counts: Vec<_> = one["statements"]
        .as_array()
        .context("statements")?
        .iter()
        .map(|s| s["lines"].as_array().map(Vec::len))
        .collect();
    assert_eq!(counts, [Some(EUR_LINES), Some(LINES - EUR_LINES)]);
    p.stop().await
}

#[tokio::test]
async fn a_read_the_api_has_not_caught_up_with_is_retried_after_retry_after_at_its_position()
-> Result<()> {
    let answer = json!({"customer": "c/1",
        "as_of": [{"topic": "neruba.ledger", "partition": 2, "next_offset": 42}],
        "grants": [{"id": "gr_0123456789abcdef0123456789abcdef", "key": "k", "amount": "100.5",
            "currency": "credits", "priority": 10, "effective_at": null, "expires_at": null,
            "paid": null, "metadata": {}, "received_at": "2026-11-24T00:00:00.000Z",
            "status": "active", "remaining": "100.5", "consumed": "0", "restored": "0",
            "expired": "0", "voided": "0"}]});
    let stub = Stub::start(move |n, _| {
        let answer = answer.to_string();
        async move {
            if n == 0 {
                Reply::error(503, "not_caught_up", Some(1))
            } else {
                Reply {
                    status: 200,
                    retry_after: None,
                    body: answer,
                }
            }
        }
    })
    .await?;
    let position: Position = "neruba.ledger:2:41".parse()?;
    let reader = Client::new(&stub.base, "k")?.reader().at(&position);
    assert_eq!(reader.position(), Some(position.clone()));
    let grants = reader.grants("c/1").await?;
    assert!(grants.as_of[0].includes(&position));
    assert_eq!(grants.grants[0].amount, Decimal::new(1005, 1));
    let seen = stub.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|s| s.path == "/v1/customers/c%2F1/grants?min_position=neruba.ledger%3A2%3A41"),
        "{seen:?}"
    );
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(1));

    // Never caught up: unavailable, with the last answer's code, after every attempt.
    let stub = Stub::start(|_, _| async { Reply::error(503, "not_caught_up", Some(0)) }).await?;
    let client = Client::builder(&stub.base, "k")
        .retry_policy(
            RetryPolicy::default()
                .with_max_attempts(3)
                .with_initial_backoff(Duration::from_millis(10)),
        )
        .build()?;
    let error = client.reader().at(&position).balances("c").await.err();
    assert_eq!(
        error,
        Some(Error::Unavailable {
            attempts: 3,
            status: Some(503),
            code: Some("not_caught_up".to_owned()),
            message: "stub says not_caught_up".to_owned(),
        })
    );
    assert_eq!(stub.seen().len(), 3);
    Ok(())
}

#[tokio::test]
async fn read_parameters_are_encoded_and_an_answer_of_another_shape_is_a_protocol_error()
-> Result<()> {
    let stub = Stub::start(|_, _| async {
        Reply {
            status: 200,
            retry_after: None,
            body: r#"{"not":"an answer"}"#.to_owned(),
        }
    })
    .await?;
    let reader = Client::new(&format!("{}/api/", stub.base), "k")?.reader();
    let query = UsageQuery::new(
        "c 1&x",
        "llm_tokens",
        "2026-11-01T10:00:00Z",
        "2026-11-01T11:00:00+01:00",
    )
    .with_window(Window::Day)
    .with_group_by(Vec::<String>::new())
    .with_filter("model", "a/b=c");
    let results = [
        reader.usage(&query).await.err(),
        reader.statements("c/1", "2026-11").await.err(),
        reader.line_items("c", "2026-11", Some("m&x")).await.err(),
        reader.balance_entries("c", 7, Some(50)).await.err(),
        reader.customers(Some(10), Some("6331")).await.err(),
    ];
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Some(Error::Protocol { status: 200, .. }))),
        "{results:?}"
    );
    let paths: Vec<String> = stub.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/usage?customer=c+1%26x&meter=llm_tokens&from=2026-11-01T10%3A00%3A00Z\
             &to=2026-11-01T11%3A00%3A00%2B01%3A00&window=day&group_by=&filter%5Bmodel%5D=a%2Fb%3Dc\
             &limit=100000",
            "/api/v1/customers/c%2F1/statements/2026-11?limit=10000",
            "/api/v1/customers/c/line-items?period=2026-11&limit=1000&meter=m%26x",
            "/api/v1/customers/c/balance-entries?after=7&limit=50",
            "/api/v1/customers?limit=10&cursor=6331",
        ]
    );
    Ok(())
}

// --- A stub HTTP/1.1 server: answers as the test says, remembers what it was sent. ---

/// One request the stub received.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    path: String,
    body: Vec<u8>,
}

impl Seen {
    /// The `id`s of an ingest request's events, in order.
    fn ids(&self) -> Vec<String> {
        serde_json::from_slice::<Vec<Value>>(&self.body)
            .unwrap_or_default()
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// The stub's answer to one request.
struct Reply {
    status: u16,
    retry_after: Option<u64>,
    body: String,
}

impl Reply {
    /// The gateway's error body with `code`.
    fn error(status: u16, code: &str, retry_after: Option<u64>) -> Self {
        let body = json!({"error": {"code": code, "message": format!("stub says {code}")}});
        Self {
            status,
            retry_after,
            body: body.to_string(),
        }
    }
}

/// The gateway's 200 answer accepting every event of `seen`.
fn all_accepted(seen: &Seen) -> Reply {
    let ids = seen.ids();
    let results: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "status": "accepted"}))
        .collect();
    let body = json!({"accepted": ids.len(), "duplicate": 0, "rejected": 0, "results": results});
    Reply {
        status: 200,
        retry_after: None,
        body: body.to_string(),
    }
}

struct Stub {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Stub {
    /// Answers every request 200 with `answer`.
    async fn answering(answer: Value) -> Result<Self> {
        let body = answer.to_string();
        Self::start(move |_, _| {
            let body = body.clone();
            async move {
                Reply {
                    status: 200,
                    retry_after: None,
                    body,
                }
            }
        })
        .await
    }

    /// Listens on `127.0.0.1:0`; `respond(n, request)` answers the `n`th request (from 0).
    async fn start<F, Fut>(respond: F) -> Result<Self>
    where
        F: Fn(usize, Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let respond = Arc::new(respond);
        let server = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    let (seen, respond) = (seen.clone(), respond.clone());
                    tokio::spawn(async move {
                        let _ = serve(socket, &seen, &*respond).await;
                    });
                }
            })
        };
        Ok(Self { base, seen, server })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    async fn wait_for_requests(&self, count: usize) -> Result<()> {
        let started = Instant::now();
        while self.seen().len() < count {
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "no request {count}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

/// Serves the requests of one keep-alive connection.
async fn serve<F, Fut>(
    socket: tokio::net::TcpStream,
    seen: &Mutex<Vec<Seen>>,
    respond: &F,
) -> Result<()>
where
    F: Fn(usize, Seen) -> Fut,
    Fut: Future<Output = Reply>,
{
    let mut socket = BufReader::new(socket);
    loop {
        let mut line = String::new();
        if socket.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let at = Instant::now();
        let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
        let mut length = 0;
        loop {
            let mut header = String::new();
            socket.read_line(&mut header).await?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        socket.read_exact(&mut body).await?;
        let request = Seen { at, path, body };
        let n = {
            let mut seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            seen.push(request.clone());
            seen.len() - 1
        };
        let reply = respond(n, request).await;
        let retry_after = reply
            .retry_after
            .map(|s| format!("retry-after: {s}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "HTTP/1.1 {} Stub\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry_after}\r\n",
            reply.status,
            reply.body.len()
        );
        socket.get_mut().write_all(head.as_bytes()).await?;
        socket.get_mut().write_all(reply.body.as_bytes()).await?;
    }
}
