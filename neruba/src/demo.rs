//! `neruba demo`: the embedded pipeline, a small realistic workload over HTTP, and a report.
//!
//! It shows what a new user should see first: events accepted, a repeat answered `duplicate`,
//! bad events rejected with their stable codes, exactly the accepted events in Kafka, the closed
//! windows priced into line items on the ledger topic, a late event turned into an adjustment,
//! a per-customer total a reader can check by hand against `catalog/sample.toml`, and prepaid
//! credit granted before the usage drawn down by it: balance entries, the credit left and the
//! amount due per customer, and each customer's statement for the period.

use crate::embedded::{self, EmbeddedKafka};
use crate::sample;
use anyhow::{Context, Result, bail};
use neruba_ingest_gateway as gateway;
use neruba_schemas::credit::BalanceEntry;
use neruba_schemas::ledger::LineItem;
use neruba_schemas::{codec, event, topics};
use rdkafka::Message;
use rdkafka::message::Headers;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::collections::BTreeMap;
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
    /// Every line item, in the order of [`Row`]'s fields.
    pub items: Vec<Row>,
    /// `(tenant/customer, total with its currency)`, one per customer and currency.
    pub totals: Vec<(String, String)>,
    /// Balance entries: `(tenant/customer, seq, kind, amount, balance after)`, amounts with
    /// their currency.
    pub entries: Vec<(String, u64, String, String, String)>,
    /// `(tenant/customer, credit left, amount due)` per customer and currency.
    pub balances: Vec<(String, String, String)>,
    /// Statements.
    pub statements: Vec<StatementRow>,
}

/// The prepaid credit the demo grants before any usage: `(tenant, customer, key, amount,
/// currency)`.
const GRANTS: [(&str, &str, &str, &str, &str); 2] = [
    ("acme", "customer-7", "demo-prepaid-7", "0.20", "USD"),
    ("globex", "customer-1", "demo-prepaid-1", "10", "EUR"),
];

/// One line item as the demo prints it; amounts carry their currency.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Row {
    pub who: String,
    pub meter: String,
    pub group: String,
    pub window_start: String,
    pub revision: u32,
    pub kind: String,
    pub window_quantity: String,
    pub period_quantity: String,
    pub amount: String,
    pub period_amount: String,
}

impl Row {
    fn of(item: &LineItem) -> Self {
        let group: Vec<String> = item.group.iter().map(|(k, v)| format!("{k}={v}")).collect();
        Self {
            who: format!("{}/{}", item.tenant, item.customer),
            meter: item.meter.clone(),
            group: group.join(","),
            window_start: item.window_start.clone(),
            revision: item.revision,
            kind: format!("{:?}", item.kind).to_lowercase(),
            window_quantity: item.window_quantity.to_string(),
            period_quantity: item.period_quantity.to_string(),
            amount: format!("{} {}", item.amount, item.currency),
            period_amount: format!("{} {}", item.period_amount, item.currency),
        }
    }
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
    let base = workload_base(now_ms);
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
         "time": at(40_000), "data": {"model": "large", "tokens": "lots", "status": "ok"}},
        {"specversion": "1.0", "id": "req-1008", "type": "llm.completion", "subject": "customer-7",
         "time": at(75_000), "data": {"model": "large", "tokens": 23800, "status": "ok"}}
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
    let storage = json!([
        {"specversion": "1.0", "id": "vol-77", "type": "storage.usage", "subject": "customer-1",
         "time": at(45_000), "data": {"region": "eu-west", "gb_hours": "12.75"}},
        {"specversion": "1.0", "id": "vol-78", "type": "storage.usage", "subject": "customer-2",
         "time": at(46_000), "data": {"region": "us-east", "gb_hours": 400}}
    ]);
    vec![
        Request {
            title: "acme: a batch of 7 (one repeat, two bad events)",
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
            title: "globex: a JSON array of 2",
            tenant: "globex",
            content_type: "application/json",
            body: storage.to_string(),
        },
    ]
}

/// Sent once the first line items are out: 1,000 GB-hours for a window that already closed.
fn late_event(base_ms: i64) -> Request {
    let event = json!({"specversion": "1.0", "id": "vol-79", "type": "storage.usage",
        "subject": "customer-1", "time": event::format_time_ms(base_ms + 170_000),
        "data": {"region": "eu-west", "gb_hours": "1000"}});
    Request {
        title: "globex: a late event for customer-1's closed window",
        tenant: "globex",
        content_type: "application/cloudevents+json",
        body: event.to_string(),
    }
}

/// The start of the 5-minute span the workload's times are built from.
fn workload_base(now_ms: i64) -> i64 {
    neruba_schemas::window::window_start(now_ms - 12 * 60_000, 5 * 60_000)
}

/// Runs the demo, printing as it goes.
pub async fn run() -> Result<Summary> {
    let kafka = EmbeddedKafka::start(&[
        (topics::EVENTS, 4),
        (topics::ROLLUPS, 4),
        (topics::DEAD_LETTER, 1),
        (topics::LEDGER, 4),
        (topics::BALANCE_ENTRIES, 4),
    ])
    .context("start embedded Kafka")?;
    let catalog = Arc::new(sample::catalog()?);
    let shutdown = CancellationToken::new();
    let state = tempfile::tempdir()?;
    let mut aggregation =
        neruba_aggregator::Config::new(kafka.bootstrap_servers(), state.path().join("aggregator"));
    // The demo's events are minutes old: a second of quiet closes their windows.
    aggregation.timing.grace_ms = 0;
    aggregation.idle_timeout = Duration::from_secs(1);
    let aggregator = neruba_aggregator::start(
        aggregation,
        catalog.clone(),
        &prometheus::Registry::new(),
        shutdown.clone(),
    )?;
    let rater = neruba_rater::start(
        neruba_rater::Config::new(kafka.bootstrap_servers(), state.path().join("rater")),
        catalog.clone(),
        &prometheus::Registry::new(),
        shutdown.clone(),
    )?;
    let mut balancing =
        neruba_balances::Config::new(kafka.bootstrap_servers(), state.path().join("balances"));
    balancing.window_floor_ms = catalog.longest_window_ms();
    let balances_stage =
        neruba_balances::start(balancing, &prometheus::Registry::new(), shutdown.clone())?;
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let api = neruba_api::start(
        neruba_api::Config::new(
            kafka.bootstrap_servers(),
            state.path().join("api"),
            listen,
            "demo",
        ),
        catalog.clone(),
        &prometheus::Registry::new(),
        shutdown.clone(),
    )
    .await
    .context("start the api")?;
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
        items: Vec::new(),
        totals: Vec::new(),
        entries: Vec::new(),
        balances: Vec::new(),
        statements: Vec::new(),
    };
    for (tenant, customer, key, amount, currency) in GRANTS {
        grant(&client, &base, tenant, customer, key, amount, currency).await?;
    }
    balance_rule(&client, &base).await?;
    println!();
    for request in workload(now_ms) {
        post(&client, &base, &request, &mut summary).await?;
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
    // The aggregator writes watermark ticks to idle partitions; they are not events.
    let messages: Vec<_> = messages
        .into_iter()
        .filter(|m| !neruba_aggregator::is_tick(m))
        .collect();
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

    // Seven windows hold these events; they close once the partitions have been quiet for a
    // second, and the rater prices each into one line item.
    let first = read_ledger(kafka.bootstrap_servers(), 7).await?;
    println!(
        "\nThe windows closed; {} line items are on the ledger topic `{}`.\n",
        first.len(),
        topics::LEDGER
    );
    post(
        &client,
        &base,
        &late_event(workload_base(now_ms)),
        &mut summary,
    )
    .await?;
    let items = read_ledger(kafka.bootstrap_servers(), 8).await?;
    print_items(&items);
    summary.items = items.iter().map(Row::of).collect();
    summary.items.sort();
    summary.totals = totals(&items)?;
    println!("\nPer customer (the sum of its line items):");
    for (who, total) in &summary.totals {
        println!("    {who:<18} {total:>10}");
    }
    // Per customer: 5 entries for acme/customer-7 (grant, consume, uncovered, and its rule's
    // low_balance and topup_requested), 1 for acme/customer-9, 4 for globex/customer-1 (grant,
    // consume, and the adjustment's consume and uncovered), 1 for globex/customer-2.
    let entries = read_entries(kafka.bootstrap_servers(), 11).await?;
    let money = |amount: Decimal, currency: &str| {
        let places = usize::try_from(catalog.precision(currency).unwrap_or(2)).unwrap_or(2);
        format!("{amount:.places$} {currency}")
    };
    print_entries(&entries, &money);
    summary.entries = entries
        .iter()
        .map(|e| {
            (
                format!("{}/{}", e.tenant, e.customer),
                e.seq,
                e.kind.as_str().to_owned(),
                money(e.amount, &e.currency),
                money(e.balance_after, &e.currency),
            )
        })
        .collect();
    summary.balances = balances(&entries, &money);
    println!("\nPer customer (credit left; amount due = what no credit covered):");
    for (who, left, due) in &summary.balances {
        println!("    {who:<18} credit left {left:>10}   amount due {due:>10}");
    }
    summary.statements = read_through_api(
        &client,
        &format!("http://{}", api.local_addr),
        kafka.bootstrap_servers(),
        &items,
        &summary.balances,
        &money,
    )
    .await?;
    shutdown.cancel();
    running.wait().await?;
    aggregator.wait().await?;
    rater.wait().await?;
    balances_stage_wait(balances_stage).await?;
    api.wait().await?;
    println!(
        "\n`neruba price --tenant globex --meter storage_gb_hours --quantity 1012.75` explains an \
         amount step by step;\n`neruba ledger tail --brokers <address>` prints a ledger as NDJSON; \
         `neruba credits show` a customer's grants and balance entries."
    );
    if summary.on_topic + 1 != summary.accepted {
        bail!(
            "{} events were accepted but {} are on the topic before the late one",
            summary.accepted,
            summary.on_topic
        );
    }
    println!(
        "\n{} accepted, {} duplicate, {} rejected ({}); {} line items.",
        summary.accepted,
        summary.duplicate,
        summary.rejected.len(),
        summary.rejected.join(", "),
        summary.items.len()
    );
    Ok(summary)
}

/// Posts one request and prints each event's outcome.
async fn post(
    client: &reqwest::Client,
    base: &str,
    request: &Request,
    summary: &mut Summary,
) -> Result<()> {
    let key = sample::ingest_key(request.tenant).context("dev key")?;
    let response = client
        .post(format!("{base}/v1/events"))
        .bearer_auth(key)
        .header("content-type", request.content_type)
        .body(request.body.clone())
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
    Ok(())
}

/// Sets acme/customer-7's USD rule: alert below 0.10 and ask for a top-up to 1.00.
async fn balance_rule(client: &reqwest::Client, base: &str) -> Result<()> {
    let credits_key = sample::dev_key("acme", "credits").context("dev credits key")?;
    let response = client
        .put(format!("{base}/v1/customers/customer-7/balance-rules/USD"))
        .bearer_auth(credits_key)
        .json(&json!({"low_balance_threshold": "0.10", "recharge_to": "1.00"}))
        .send()
        .await?;
    let status = response.status();
    println!(
        "PUT /v1/customers/customer-7/balance-rules/USD  below 0.10 USD alert, top up to 1.00 USD  -> HTTP {status}"
    );
    if !status.is_success() {
        bail!("rule refused: {}", response.text().await?);
    }
    Ok(())
}

/// Grants prepaid credit over HTTP with the tenant's dev `credits` key.
async fn grant(
    client: &reqwest::Client,
    base: &str,
    tenant: &str,
    customer: &str,
    key: &str,
    amount: &str,
    currency: &str,
) -> Result<()> {
    let credits_key = sample::dev_key(tenant, "credits").context("dev credits key")?;
    let response = client
        .post(format!("{base}/v1/customers/{customer}/grants"))
        .bearer_auth(credits_key)
        .json(&json!({"key": key, "amount": amount, "currency": currency}))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    println!(
        "POST /v1/customers/{customer}/grants  {amount} {currency} prepaid for {tenant}/{customer}  -> HTTP {status}  {}",
        body["id"].as_str().unwrap_or_default()
    );
    if !status.is_success() {
        bail!("grant refused: {body}");
    }
    Ok(())
}

async fn balances_stage_wait(running: neruba_balances::Running) -> Result<()> {
    Ok(running.wait().await?)
}

/// Reads the balance entries until `expected` distinct ones arrived, in per-customer order.
async fn read_entries(bootstrap: &str, expected: usize) -> Result<Vec<BalanceEntry>> {
    let bootstrap = bootstrap.to_owned();
    let messages = tokio::task::spawn_blocking(move || {
        embedded::read_topic(
            &bootstrap,
            topics::BALANCE_ENTRIES,
            expected,
            Duration::from_millis(300),
            Duration::from_secs(20),
        )
    })
    .await??;
    let mut entries: BTreeMap<String, BalanceEntry> = BTreeMap::new();
    for m in &messages {
        let entry: BalanceEntry = neruba_schemas::credit::decode(m.payload().unwrap_or_default())?;
        entries.insert(entry.id.clone(), entry);
    }
    let mut entries: Vec<BalanceEntry> = entries.into_values().collect();
    entries.sort_by(|a, b| (&a.tenant, &a.customer, a.seq).cmp(&(&b.tenant, &b.customer, b.seq)));
    if entries.len() < expected {
        bail!(
            "expected {expected} balance entries, found {}",
            entries.len()
        );
    }
    Ok(entries)
}

fn print_entries(entries: &[BalanceEntry], money: &dyn Fn(Decimal, &str) -> String) {
    println!(
        "\nOn the balance-entries topic `{}`: {} entries",
        topics::BALANCE_ENTRIES,
        entries.len()
    );
    for e in entries {
        let cause = e.cause.get(..11).unwrap_or(&e.cause);
        println!(
            "    {:<18} #{} {:<15} {:>11}  balance {:>10} -> {:>10}  ({cause})",
            format!("{}/{}", e.tenant, e.customer),
            e.seq,
            e.kind.as_str(),
            money(e.amount, &e.currency),
            money(e.balance_before, &e.currency),
            money(e.balance_after, &e.currency),
        );
    }
}

/// Per customer and currency: the credit left (the last entry's balance) and the amount due
/// (the sum of `uncovered`).
fn balances(
    entries: &[BalanceEntry],
    money: &dyn Fn(Decimal, &str) -> String,
) -> Vec<(String, String, String)> {
    let mut by: BTreeMap<(String, String), (Decimal, Decimal)> = BTreeMap::new();
    for e in entries {
        let slot = by
            .entry((format!("{}/{}", e.tenant, e.customer), e.currency.clone()))
            .or_default();
        slot.0 = e.balance_after;
        if e.kind == neruba_schemas::credit::EntryKind::Uncovered {
            slot.1 += e.amount;
        }
    }
    by.into_iter()
        .map(|((who, currency), (left, due))| (who, money(left, &currency), money(due, &currency)))
        .collect()
}

/// Reads the ledger until `expected` distinct items arrived (repeats of an id dropped; grants,
/// voids and rules, which share the topic, are not items).
async fn read_ledger(bootstrap: &str, expected: usize) -> Result<Vec<LineItem>> {
    let bootstrap = bootstrap.to_owned();
    // The grants and the balance rule share the topic.
    let records = expected + GRANTS.len() + 1;
    let messages = tokio::task::spawn_blocking(move || {
        embedded::read_topic(
            &bootstrap,
            topics::LEDGER,
            records,
            Duration::from_millis(300),
            Duration::from_secs(20),
        )
    })
    .await??;
    let mut items: Vec<LineItem> = Vec::new();
    for m in messages.iter().filter(|m| {
        !m.headers()
            .is_some_and(|h| h.iter().any(|h| h.key == topics::RECORD_HEADER))
    }) {
        let item = LineItem::decode(m.payload().unwrap_or_default())?;
        if !items.iter().any(|i| i.id == item.id) {
            items.push(item);
        }
    }
    if items.len() < expected {
        bail!(
            "expected {expected} line items on the ledger, found {}",
            items.len()
        );
    }
    Ok(items)
}

fn print_items(items: &[LineItem]) {
    println!(
        "\nOn the ledger topic `{}`: {} line items",
        topics::LEDGER,
        items.len()
    );
    let mut sorted: Vec<&LineItem> = items.iter().collect();
    sorted.sort_by(|a, b| {
        (
            &a.tenant,
            &a.customer,
            &a.meter,
            &a.group,
            &a.window_start,
            a.revision,
        )
            .cmp(&(
                &b.tenant,
                &b.customer,
                &b.meter,
                &b.group,
                &b.window_start,
                b.revision,
            ))
    });
    for item in sorted {
        let row = Row::of(item);
        let window = item.window_start.get(11..16).unwrap_or_default();
        println!(
            "    {} {:<18} {:<17} {:<15} {window} r{} {:<10} window {:>8}  period {:>8}  amount {:>10}  period total {:>10}",
            item.id.get(..11).unwrap_or_default(),
            row.who,
            row.meter,
            row.group,
            row.revision,
            row.kind,
            row.window_quantity,
            row.period_quantity,
            row.amount,
            row.period_amount,
        );
        if let Some(earlier) = &item.supersedes {
            println!(
                "        supersedes {}: a late event changed this window; the amount is the difference",
                earlier.get(..11).unwrap_or_default()
            );
        }
    }
}

/// Sum of item amounts per customer and currency.
fn totals(items: &[LineItem]) -> Result<Vec<(String, String)>> {
    let mut sums: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    for item in items {
        let sum = sums
            .entry((
                format!("{}/{}", item.tenant, item.customer),
                item.currency.clone(),
            ))
            .or_default();
        *sum = sum.checked_add(item.amount).context("total overflows")?;
    }
    Ok(sums
        .into_iter()
        .map(|((who, currency), sum)| (who, format!("{sum} {currency}")))
        .collect())
}

/// A statement as the demo reports it: `(tenant/customer, status, usage, credit applied,
/// amount due)`.
pub type StatementRow = (String, String, String, String, String);

/// Reads each customer's statement and balance through the api, at least as new as
/// everything on the ledger now (`min_position`: the api waits until it has applied it),
/// prints them, and checks the balance against the one the entries gave.
async fn read_through_api(
    client: &reqwest::Client,
    api: &str,
    bootstrap: &str,
    items: &[LineItem],
    ledger_balances: &[(String, String, String)],
    money: &dyn Fn(Decimal, &str) -> String,
) -> Result<Vec<StatementRow>> {
    let customers: std::collections::BTreeSet<(String, String, String)> = items
        .iter()
        .map(|i| {
            (
                i.tenant.clone(),
                i.customer.clone(),
                i.period_start.get(..7).unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let probe = neruba_kafka::clients::metadata_probe(bootstrap, &[])?;
    println!("\nRead back through the api (scope `read`):");
    let mut out = Vec::new();
    for (tenant, customer, period) in customers {
        let partition = topics::stable_partition(&format!("{tenant}/{customer}"), 4);
        let (_, high) = rdkafka::consumer::Consumer::fetch_watermarks(
            &probe,
            topics::LEDGER,
            partition,
            Duration::from_secs(5),
        )?;
        let at = format!("{}:{partition}:{}", topics::LEDGER, high - 1);
        let key = sample::dev_key(&tenant, "read").context("dev read key")?;
        let read = |path: String| {
            let url = format!("{api}/v1/customers/{customer}/{path}");
            let request = client
                .get(&url)
                .query(&[("min_position", at.as_str())])
                .bearer_auth(key);
            async move {
                let response = request.send().await?;
                let status = response.status();
                let body: Value = response.json().await?;
                if !status.is_success() {
                    bail!("GET {url} answered HTTP {status}: {body}");
                }
                Ok::<_, anyhow::Error>(body)
            }
        };
        let statements = read(format!("statements/{period}")).await?;
        let balances = read("balances".to_owned()).await?;
        let s = &statements["statements"][0];
        let amount = |field: &str| -> Result<String> {
            let value: Decimal = s[field]
                .as_str()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("statement {field}: {statements}"))?;
            Ok(money(value, s["currency"].as_str().unwrap_or_default()))
        };
        let who = format!("{tenant}/{customer}");
        let status = s["status"].as_str().unwrap_or_default().to_owned();
        let row = (
            who.clone(),
            status,
            amount("usage")?,
            amount("credit_applied")?,
            amount("amount_due")?,
        );
        let left = balances["balances"][0]["balance"]
            .as_str()
            .and_then(|v| v.parse::<Decimal>().ok())
            .map(|b| {
                money(
                    b,
                    balances["balances"][0]["currency"]
                        .as_str()
                        .unwrap_or_default(),
                )
            });
        println!(
            "    GET /v1/customers/{customer}/statements/{period}  {who:<18} {} {:<5} usage {}, credit applied {}, amount due {}",
            s["id"].as_str().unwrap_or_default(),
            row.1,
            row.2,
            row.3,
            row.4
        );
        for line in s["lines"].as_array().into_iter().flatten() {
            println!(
                "        {:<17} {:<22} quantity {:>8}  amount {:>11}",
                line["meter"].as_str().unwrap_or_default(),
                line["group"].to_string(),
                line["quantity"].as_str().unwrap_or_default(),
                line["amount"].as_str().unwrap_or_default(),
            );
        }
        // A customer never granted credit has no balance; its credit left is zero.
        if let Some(left) = &left {
            println!("    GET /v1/customers/{customer}/balances  {who:<18} credit left {left}");
            let printed = ledger_balances.iter().find(|(w, _, _)| *w == who);
            if printed.is_some_and(|(_, ledger_left, _)| ledger_left != left) {
                bail!("the api says {who} has {left} left; the entries said {printed:?}");
            }
        }
        out.push(row);
    }
    Ok(out)
}
