//! `neruba demo`: the embedded pipeline, a small realistic workload over HTTP, and a report.
//!
//! It shows what a new user should see first: events accepted, a repeat answered `duplicate`,
//! bad events rejected with their stable codes, and exactly the accepted events in Kafka.

use crate::embedded::{self, EmbeddedKafka};
use crate::sample;
use anyhow::{Context, Result, bail};
use neruba_ingest_gateway as gateway;
use neruba_schemas::rollup::Rollup;
use neruba_schemas::{codec, event, topics};
use rdkafka::Message;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the demo saw, for its own test.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub accepted: usize,
    pub duplicate: usize,
    pub rejected: Vec<String>,
    pub on_topic: usize,
    /// `(tenant/customer, meter, group, window quantity, period-to-date quantity,
    /// price of the period to date with its currency)`, sorted.
    pub rollups: Vec<(String, String, String, String, String, String)>,
}

struct Request {
    title: &'static str,
    tenant: &'static str,
    content_type: &'static str,
    body: String,
}

/// The demo's events are 7 to 12 minutes old, so every window they fall in has ended and
/// closes as soon as the partitions go idle.
fn workload(now_ms: i64) -> Vec<Request> {
    let base = neruba_schemas::window::window_start(now_ms - 12 * 60_000, 5 * 60_000);
    let at = |offset_ms: i64| event::format_time_ms(base + 120_000 + offset_ms);
    let batch = json!([
        {"specversion": "1.0", "id": "req-1001", "type": "llm.completion", "subject": "customer-7",
         "source": "demo", "time": at(10_000), "data": {"model": "large", "tokens": 1200, "status": "ok"}},
        {"specversion": "1.0", "id": "req-1002", "type": "llm.completion", "subject": "customer-7",
         "time": at(20_000), "data": {"model": "small", "tokens": "850.5", "status": "ok"}},
        {"specversion": "1.0", "id": "req-1003", "type": "api.request", "subject": "customer-9",
         "time": at(30_000), "data": {"path": "/v1/search"}},
        {"specversion": "1.0", "id": "req-1001", "type": "llm.completion", "subject": "customer-7",
         "time": at(10_000), "data": {"model": "large", "tokens": 1200, "status": "ok"}},
        {"specversion": "1.0", "id": "req-1004", "type": "api.request",
         "time": at(35_000), "data": {}},
        {"specversion": "1.0", "id": "req-1005", "type": "llm.completion", "subject": "customer-9",
         "time": at(40_000), "data": {"model": "large", "tokens": "lots", "status": "ok"}}
    ]);
    let ndjson = [
        json!({"id": "req-1003", "type": "api.request", "subject": "customer-9", "time": at(30_000)}),
        json!({"id": "req-1006", "type": "api.request", "subject": "customer-9", "time": at(70_000)}),
        json!({"id": "req-1007", "type": "api.request", "subject": "customer-9", "time": event::format_time_ms(now_ms + 3_600_000)}),
    ]
    .iter()
    .map(Value::to_string)
    .collect::<Vec<_>>()
    .join("\n");
    let single = json!({"specversion": "1.0", "id": "vol-77", "type": "storage.usage",
        "subject": "customer-1", "time": at(45_000), "data": {"region": "eu-west", "gb_hours": "12.75"}});
    vec![
        Request {
            title: "acme: a batch of 6 (one repeat, two bad events)",
            tenant: "acme",
            content_type: "application/cloudevents-batch+json",
            body: batch.to_string(),
        },
        Request {
            title: "acme: NDJSON, 3 lines (a repeat of req-1003, one from the future)",
            tenant: "acme",
            content_type: "application/x-ndjson",
            body: ndjson,
        },
        Request {
            title: "globex: one structured CloudEvent",
            tenant: "globex",
            content_type: "application/cloudevents+json",
            body: single.to_string(),
        },
    ]
}

/// The price of a rollup's period-to-date quantity under the plan in force on its window's day.
fn price_to_date(catalog: &neruba_schemas::Catalog, rollup: &Rollup) -> Result<String> {
    let tenant = catalog
        .tenant(&rollup.tenant)
        .context("rollup tenant is in the catalog")?;
    let day = time::OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(rollup.window_start_ms) * 1_000_000,
    )?
    .date();
    let Some(plan) = neruba_rater::price::plan_in_force(&tenant.price_plans, &rollup.meter, day)
    else {
        return Ok("(no plan)".to_owned());
    };
    let precision = catalog
        .precision(&plan.currency)
        .context("plan currency is known")?;
    let priced = neruba_rater::price::price(plan, rollup.period_quantity, precision)?;
    Ok(format!("{} {}", priced.amount, plan.currency))
}

/// Runs the demo, printing as it goes.
pub async fn run() -> Result<Summary> {
    let kafka = EmbeddedKafka::start(&[
        (topics::EVENTS, 4),
        (topics::ROLLUPS, 4),
        (topics::DEAD_LETTER, 1),
    ])
    .context("start embedded Kafka")?;
    let catalog = Arc::new(sample::catalog()?);
    let shutdown = CancellationToken::new();
    let state = tempfile::tempdir()?;
    let mut aggregation = neruba_aggregator::Config::new(kafka.bootstrap_servers(), state.path());
    // The demo's events are minutes old: a second of quiet closes their windows.
    aggregation.timing.grace_ms = 0;
    aggregation.idle_timeout = Duration::from_secs(1);
    let aggregator = neruba_aggregator::start(
        aggregation,
        catalog.clone(),
        &prometheus::Registry::new(),
        shutdown.clone(),
    )?;
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let config = gateway::Config::new(listen, kafka.bootstrap_servers());
    let running = gateway::start(
        config,
        catalog.clone(),
        prometheus::Registry::new(),
        shutdown.clone(),
    )
    .await
    .context("start gateway")?;
    let base = format!("http://{}", running.local_addr);
    println!(
        "Embedded Kafka at {}; gateway at {base}\n",
        kafka.bootstrap_servers()
    );

    let now_ms = event::now_ms();
    let client = reqwest::Client::new();
    let mut summary = Summary {
        accepted: 0,
        duplicate: 0,
        rejected: Vec::new(),
        on_topic: 0,
        rollups: Vec::new(),
    };
    for request in workload(now_ms) {
        let key = sample::ingest_key(request.tenant).context("dev key")?;
        let response = client
            .post(format!("{base}/v1/events"))
            .bearer_auth(key)
            .header("content-type", request.content_type)
            .body(request.body)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        println!("POST /v1/events  {}  -> HTTP {status}", request.title);
        for result in body["results"].as_array().into_iter().flatten() {
            let id = result["id"].as_str().unwrap_or("-");
            let outcome = result["status"].as_str().unwrap_or("?");
            match outcome {
                "accepted" => summary.accepted += 1,
                "duplicate" => summary.duplicate += 1,
                "rejected" => summary
                    .rejected
                    .push(result["code"].as_str().unwrap_or("?").to_owned()),
                _ => {}
            }
            match result["code"].as_str() {
                Some(code) => println!(
                    "    {id:<10} {outcome:<9} {code}: {}",
                    result["message"].as_str().unwrap_or_default()
                ),
                None => println!("    {id:<10} {outcome}"),
            }
        }
        println!();
    }

    let expected = summary.accepted;
    let bootstrap = kafka.bootstrap_servers().to_owned();
    let messages = tokio::task::spawn_blocking(move || {
        embedded::read_topic(
            &bootstrap,
            topics::EVENTS,
            expected,
            Duration::from_millis(300),
            Duration::from_secs(10),
        )
    })
    .await??;
    println!(
        "On the events topic `{}`: {} messages",
        topics::EVENTS,
        messages.len()
    );
    for m in &messages {
        let mut payload = m.payload().unwrap_or_default().to_vec();
        let e = codec::decode(&mut payload)?;
        println!(
            "    partition {} offset {:<3} {:<18} {:<9} {:<15} {}",
            m.partition(),
            m.offset(),
            format!("{}/{}", e.tenant, e.subject),
            e.id,
            e.event_type,
            Value::Object(e.data)
        );
    }
    summary.on_topic = messages.len();

    // Five windows hold these events (two token models, two minutes of API calls, one storage
    // window); they close once the partitions have been quiet for a second.
    let bootstrap = kafka.bootstrap_servers().to_owned();
    let rollups = tokio::task::spawn_blocking(move || {
        embedded::read_topic(
            &bootstrap,
            topics::ROLLUPS,
            5,
            Duration::from_millis(500),
            Duration::from_secs(20),
        )
    })
    .await??;
    println!(
        "\nOn the rollups topic `{}`: {} closed windows",
        topics::ROLLUPS,
        rollups.len()
    );
    for m in &rollups {
        let r = Rollup::decode(m.payload().unwrap_or_default())?;
        let group: Vec<String> = r.group.iter().map(|(k, v)| format!("{k}={v}")).collect();
        summary.rollups.push((
            format!("{}/{}", r.tenant, r.customer),
            r.meter.clone(),
            group.join(","),
            r.window_quantity.to_string(),
            r.period_quantity.to_string(),
            price_to_date(&catalog, &r)?,
        ));
    }
    summary.rollups.sort();
    for (who, meter, group, window, period, price) in &summary.rollups {
        println!(
            "    {who:<18} {meter:<17} {group:<15} window {window:>7}   period to date {period:>7}   priced {price}"
        );
    }
    println!(
        "  (priced with the pricing engine; `neruba price --tenant acme --meter api_calls --quantity 2` \
         explains an amount step by step)"
    );
    shutdown.cancel();
    running.wait().await?;
    aggregator.wait().await?;
    if summary.on_topic != summary.accepted {
        bail!(
            "{} events were accepted but {} are on the topic",
            summary.accepted,
            summary.on_topic
        );
    }
    println!(
        "\n{} accepted, {} duplicate, {} rejected ({}); {} windows rolled up. Line items on a \
         ledger topic arrive with the rater stage.",
        summary.accepted,
        summary.duplicate,
        summary.rejected.len(),
        summary.rejected.join(", "),
        summary.rollups.len()
    );
    Ok(summary)
}
