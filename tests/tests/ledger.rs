//! From HTTP to the ledger: exact amounts, a duplicate on each path, a late event priced as an
//! adjustment, a replay into fresh state giving identical items, and a rater crash between
//! producing items and writing its state re-sending only identical items.

use anyhow::{Context, Result, bail};
use neruba::embedded::{self, EmbeddedKafka};
use neruba_ingest_gateway as gateway;
use neruba_schemas::catalog::Aggregation;
use neruba_schemas::ledger::{Kind, LineItem};
use neruba_schemas::rollup::Rollup;
use neruba_schemas::{codec, topics};
use neruba_tests::sample;
use rdkafka::Message;
use rust_decimal::Decimal;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn d(text: &str) -> Decimal {
    Decimal::from_str(text).expect("decimal literal")
}

/// An aggregator and a rater reading and writing their own topics, with their own groups and
/// state: `name` keeps two pipelines on one broker apart.
struct Stages {
    aggregator: neruba_aggregator::Running,
    rater: neruba_rater::Running,
    shutdown: CancellationToken,
    /// A failing assertion must not leave the stages running (the test would hang).
    _stop_on_drop: tokio_util::sync::DropGuard,
}

fn start_stages(
    kafka: &EmbeddedKafka,
    state: &Path,
    name: &str,
    idle_timeout: Duration,
) -> Result<Stages> {
    let catalog = Arc::new(sample::catalog()?);
    let shutdown = CancellationToken::new();
    let rollups = format!("rollups-{name}");
    let mut aggregation =
        neruba_aggregator::Config::new(kafka.bootstrap_servers(), state.join("aggregator"));
    aggregation.stage.group_id = format!("aggregator-{name}");
    aggregation.rollups_topic.clone_from(&rollups);
    // More than the disorder of the test's events (which arrive minutes out of order across
    // customers sharing a partition): their windows close by the idle tick, all at once.
    aggregation.timing.grace_ms = 5 * 60_000;
    aggregation.idle_timeout = idle_timeout;
    let aggregator = neruba_aggregator::start(
        aggregation,
        catalog.clone(),
        &prometheus::Registry::new(),
        shutdown.clone(),
    )?;
    let mut rating = neruba_rater::Config::new(kafka.bootstrap_servers(), state.join("rater"));
    rating.stage.group_id = format!("rater-{name}");
    rating.stage.input_topic = rollups;
    rating.ledger_topic = format!("ledger-{name}");
    let rater = neruba_rater::start(
        rating,
        catalog,
        &prometheus::Registry::new(),
        shutdown.clone(),
    )?;
    Ok(Stages {
        aggregator,
        rater,
        _stop_on_drop: shutdown.clone().drop_guard(),
        shutdown,
    })
}

impl Stages {
    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.aggregator.wait().await?;
        self.rater.wait().await?;
        Ok(())
    }
}

/// Distinct items of a ledger topic (by id), once at least `expected` arrived; fails if an id
/// repeats with different content.
async fn ledger(kafka: &EmbeddedKafka, topic: &str, expected: usize) -> Result<Vec<LineItem>> {
    let mut items: BTreeMap<String, LineItem> = BTreeMap::new();
    for item in raw_ledger(kafka, topic, expected).await? {
        if let Some(earlier) = items.get(&item.id) {
            if *earlier != item {
                bail!("id {} repeated with different content", item.id);
            }
        } else {
            items.insert(item.id.clone(), item);
        }
    }
    let mut items: Vec<LineItem> = items.into_values().collect();
    items.sort_by(|a, b| {
        (&a.customer, &a.meter, &a.window_start, a.revision).cmp(&(
            &b.customer,
            &b.meter,
            &b.window_start,
            b.revision,
        ))
    });
    Ok(items)
}

async fn post(
    client: &reqwest::Client,
    base: &str,
    tenant: &str,
    body: serde_json::Value,
) -> Result<Vec<String>> {
    let answer: serde_json::Value = client
        .post(format!("{base}/v1/events"))
        .bearer_auth(sample::ingest_key(tenant).context("dev key")?)
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    Ok(answer["results"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["status"].as_str().unwrap_or("?").to_owned())
        .collect())
}

/// `(customer, meter, revision, kind, window quantity, period quantity, amount, period amount)`.
type Row = (
    String,
    String,
    u32,
    Kind,
    Decimal,
    Decimal,
    Decimal,
    Decimal,
);

fn rows(items: &[LineItem]) -> Vec<Row> {
    items
        .iter()
        .map(|i| {
            (
                i.customer.clone(),
                i.meter.clone(),
                i.revision,
                i.kind,
                i.window_quantity,
                i.period_quantity,
                i.amount,
                i.period_amount,
            )
        })
        .collect()
}

#[tokio::test]
async fn http_to_ledger_is_exact_with_duplicates_and_a_late_adjustment_and_replays_identically()
-> Result<()> {
    let kafka = EmbeddedKafka::start(&[
        (topics::EVENTS, 2),
        (topics::DEAD_LETTER, 1),
        ("rollups-live", 2),
        ("ledger-live", 2),
        ("rollups-replay", 2),
        ("ledger-replay", 2),
    ])?;
    let state = tempfile::tempdir()?;
    let live = start_stages(
        &kafka,
        &state.path().join("live"),
        "live",
        Duration::from_millis(300),
    )?;
    let shutdown = CancellationToken::new();
    let _stop_gateway_on_drop = shutdown.clone().drop_guard();
    let listen: SocketAddr = ([127, 0, 0, 1], 0).into();
    let gateway = gateway::start(
        gateway::Config::new(listen, kafka.bootstrap_servers()),
        Arc::new(sample::catalog()?),
        prometheus::Registry::new(),
        shutdown.clone(),
    )
    .await?;
    let base = format!("http://{}", gateway.local_addr);
    let client = reqwest::Client::new();

    // Three one-minute windows, 20 to 17 minutes ago (all ended, all in one billing period
    // unless the month turns in between, which the period check below would reveal).
    let t0 = neruba_schemas::window::window_start(neruba_tests::now_ms() - 20 * 60_000, 60_000);
    let at = |minute: i64, second: i64| {
        neruba_schemas::event::format_time_ms(t0 + minute * 60_000 + second * 1000)
    };
    let tokens = |id: &str, minute: i64, n: &str| {
        json!({"specversion": "1.0", "id": id, "type": "llm.completion", "subject": "c-7",
               "time": at(minute, 5), "data": {"model": "large", "tokens": n, "status": "ok"}})
    };
    let statuses = post(
        &client,
        &base,
        "acme",
        json!([
            tokens("t-1", 0, "400000"),
            tokens("t-2", 0, "200000"),
            tokens("t-3", 1, "500000"),
            tokens("t-2", 0, "200000"),
            {"specversion": "1.0", "id": "a-1", "type": "api.request", "subject": "c-9", "time": at(0, 1)},
            {"specversion": "1.0", "id": "a-2", "type": "api.request", "subject": "c-9", "time": at(0, 2)},
            {"specversion": "1.0", "id": "a-3", "type": "api.request", "subject": "c-9", "time": at(2, 3)},
        ]),
    )
    .await?;
    assert_eq!(
        statuses,
        [
            "accepted",
            "accepted",
            "accepted",
            "duplicate",
            "accepted",
            "accepted",
            "accepted"
        ]
    );
    let storage = json!({"specversion": "1.0", "id": "s-1", "type": "storage.usage",
        "subject": "c-1", "time": at(0, 30), "data": {"region": "eu-west", "gb_hours": "999.5"}});
    assert_eq!(post(&client, &base, "globex", storage).await?, ["accepted"]);
    // The same event again on the Kafka path, past the gateway's cache: the aggregator's
    // dedup set drops it.
    let repeat = neruba_tests::event(
        "acme",
        "t-3",
        "llm.completion",
        "c-7",
        t0 + 65_000,
        json!({"model": "large", "tokens": "500000", "status": "ok"}),
    );
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("partitioner", "murmur2_random")
        .create()?;
    let key = repeat.partition_key();
    let payload = codec::encode(&repeat);
    producer
        .send(
            rdkafka::producer::FutureRecord::to(topics::EVENTS)
                .key(&key)
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("{e}"))?;

    // Five windows close: tokens minute 0 and 1, calls minute 0 and 2, storage.
    let first = ledger(&kafka, "ledger-live", 5).await?;
    assert_eq!(first.len(), 5, "{:#?}", rows(&first));
    // A late event for the first tokens window.
    assert_eq!(
        post(&client, &base, "acme", tokens("t-4", 0, "2000")).await?,
        ["accepted"]
    );
    let items = ledger(&kafka, "ledger-live", 6).await?;

    let row = |customer: &str, meter: &str, revision: u32, kind: Kind, amounts: [&str; 4]| -> Row {
        let [window, period, amount, total] = amounts;
        (
            customer.into(),
            meter.into(),
            revision,
            kind,
            d(window),
            d(period),
            d(amount),
            d(total),
        )
    };
    assert_eq!(
        rows(&items),
        [
            // 999.5 GB-hours: × 0.023 = 22.9885 → 22.99 EUR (volume tier 1).
            row(
                "c-1",
                "storage_gb_hours",
                1,
                Kind::Usage,
                ["999.5", "999.5", "22.99", "22.99"]
            ),
            // 600,000 tokens, 10,000 free: 590,000 × 0.00002 = 11.80.
            row(
                "c-7",
                "llm_tokens",
                1,
                Kind::Usage,
                ["600000", "600000", "11.80", "11.80"]
            ),
            // Late 2,000: period 1,102,000 → 1,000,000 × 0.00002 + 92,000 × 0.000015
            // = 20.00 + 1.38 = 21.38; 21.35 was billed, so +0.03.
            row(
                "c-7",
                "llm_tokens",
                2,
                Kind::Adjustment,
                ["602000", "1102000", "0.03", "21.38"]
            ),
            // 1,100,000: 20.00 + 90,000 × 0.000015 = 21.35, minus 11.80 = 9.55.
            row(
                "c-7",
                "llm_tokens",
                1,
                Kind::Usage,
                ["500000", "1100000", "9.55", "21.35"]
            ),
            // 2 calls: one package of 1,000 (0.50) raised to the 1.00 minimum...
            row(
                "c-9",
                "api_calls",
                1,
                Kind::Usage,
                ["2", "2", "1.00", "1.00"]
            ),
            // ...and a third call changes nothing.
            row(
                "c-9",
                "api_calls",
                1,
                Kind::Usage,
                ["1", "3", "0.00", "1.00"]
            ),
        ]
    );
    let first_tokens = &items[1];
    assert_eq!(
        items[2].supersedes.as_deref(),
        Some(first_tokens.id.as_str())
    );
    assert!(
        items
            .iter()
            .all(|i| i.period_start == first_tokens.period_start || i.tenant == "globex")
    );
    // Each period's items sum to its final total.
    let tokens_sum: Decimal = items
        .iter()
        .filter(|i| i.customer == "c-7")
        .map(|i| i.amount)
        .sum();
    assert_eq!(tokens_sum, d("21.38"));

    // `neruba ledger tail` prints each id once.
    let bootstrap = kafka.bootstrap_servers().to_owned();
    let (counts, printed) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut out = Vec::new();
        let counts = neruba::ledger::tail(
            &bootstrap,
            &[],
            "ledger-live",
            Some("acme"),
            Some(Duration::from_secs(3)),
            &CancellationToken::new(),
            &mut out,
        )?;
        Ok((counts, String::from_utf8(out)?))
    })
    .await??;
    assert_eq!((counts.printed, counts.conflicting), (5, 0));
    let tailed: Vec<LineItem> = printed
        .lines()
        .map(|l| LineItem::decode(l.as_bytes()))
        .collect::<Result<_, _>>()?;
    let mut tailed_ids: Vec<&str> = tailed.iter().map(|i| i.id.as_str()).collect();
    tailed_ids.sort_unstable();
    let mut acme_ids: Vec<&str> = items
        .iter()
        .filter(|i| i.tenant == "acme")
        .map(|i| i.id.as_str())
        .collect();
    acme_ids.sort_unstable();
    assert_eq!(tailed_ids, acme_ids);

    shutdown.cancel();
    gateway.wait().await?;
    live.stop().await?;

    // Replay the events topic into fresh state: the watermark ticks the live aggregator wrote
    // close the same windows at the same points, so the items are identical, ids included.
    let replay = start_stages(
        &kafka,
        &state.path().join("replay"),
        "replay",
        Duration::from_secs(3600),
    )?;
    let replayed = ledger(&kafka, "ledger-replay", 6).await?;
    replay.stop().await?;
    assert_eq!(replayed, items);
    Ok(())
}

fn rollup(customer: &str, minute: i64, revision: u32, window: &str, period: &str) -> Rollup {
    let period_start_ms = 1_793_491_200_000; // 2026-11-01T00:00:00Z
    let window_start_ms = 1_795_478_400_000 + minute * 60_000; // 2026-11-24T00:00Z + minute
    Rollup {
        v: 1,
        tenant: "globex".into(),
        meter: "storage_gb_hours".into(),
        customer: customer.into(),
        group: BTreeMap::from([("region".to_owned(), "eu-west".to_owned())]),
        aggregation: Aggregation::Sum,
        window_start_ms,
        window_end_ms: window_start_ms + 300_000,
        period_start_ms,
        period_end_ms: 1_796_083_200_000,
        window_quantity: d(window),
        window_events: 1,
        period_quantity: d(period),
        period_events: 1,
        revision,
        latest_event: None,
    }
}

/// Every message of a ledger topic, in order, repeats included, once at least `expected`
/// arrived and nothing more came for 0.7 s.
async fn raw_ledger(kafka: &EmbeddedKafka, topic: &str, expected: usize) -> Result<Vec<LineItem>> {
    let bootstrap = kafka.bootstrap_servers().to_owned();
    let topic = topic.to_owned();
    let messages = tokio::task::spawn_blocking(move || {
        embedded::read_topic(
            &bootstrap,
            &topic,
            expected,
            Duration::from_millis(700),
            Duration::from_secs(30),
        )
    })
    .await??;
    Ok(messages
        .iter()
        .map(|m| LineItem::decode(m.payload().unwrap_or_default()))
        .collect::<Result<_, _>>()?)
}

async fn send_rollups(bootstrap: &str, rollups: &[Rollup]) -> Result<()> {
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    for r in rollups {
        let key = r.key();
        let payload = r.encode();
        producer
            .send(
                rdkafka::producer::FutureRecord::to(topics::ROLLUPS)
                    .key(&key)
                    .payload(&payload)
                    .partition(0),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

/// The sample catalog with a price correction for November: version 2 of the storage plan,
/// in force from the period's first day, tier 1 at 0.025 (0.023 in version 1).
fn corrected_catalog() -> Result<neruba_schemas::Catalog> {
    let text = sample::CATALOG_TOML.replace(
        r#"[[tenants.price_plans]]
id = "storage-volume"
meter = "storage_gb_hours"
version = 1"#,
        r#"[[tenants.price_plans]]
id = "storage-volume"
meter = "storage_gb_hours"
version = 2
effective_from = "2026-11-01"
currency = "EUR"
model = { type = "volume", tiers = [
  { up_to = "1000", unit_price = "0.025" },
  { up_to = "50000", unit_price = "0.021", flat_fee = "5.00" },
  { unit_price = "0.019", flat_fee = "25.00" },
] }

[[tenants.price_plans]]
id = "storage-volume"
meter = "storage_gb_hours"
version = 1"#,
    );
    Ok(neruba_schemas::Catalog::from_toml_str(
        &text,
        "corrected.toml",
    )?)
}

#[tokio::test]
async fn rater_crash_after_producing_resends_identical_items_and_a_redelivered_rollup_adds_nothing()
-> Result<()> {
    let kafka = EmbeddedKafka::start(&[
        (topics::ROLLUPS, 1),
        (topics::LEDGER, 1),
        (topics::DEAD_LETTER, 1),
    ])?;
    let state = tempfile::tempdir()?;
    let catalog = Arc::new(sample::catalog()?);
    let corrected = Arc::new(corrected_catalog()?);
    let stop_all = CancellationToken::new();
    let _stop_on_drop = stop_all.clone().drop_guard();
    let start = |crash: Option<u64>,
                 catalog: &Arc<neruba_schemas::Catalog>,
                 registry: &prometheus::Registry| {
        let mut config = neruba_rater::Config::new(kafka.bootstrap_servers(), state.path());
        config.stage.crash = crash.map(neruba_rater::CrashPoint::BeforeWrite);
        let stop = stop_all.child_token();
        neruba_rater::start(config, catalog.clone(), registry, stop.clone()).map(|r| (r, stop))
    };
    // Volume pricing: 500 → 11.50; 1,200 → 1,200 × 0.021 + 5.00 = 30.20; a revision of the
    // first window to 600 more → 1,800 → 42.80.
    let stream = [
        rollup("c-1", 0, 1, "500", "500"),
        rollup("c-1", 5, 1, "700", "1200"),
        rollup("c-2", 0, 1, "10", "10"),
        rollup("c-1", 0, 2, "1100", "1800"),
    ];
    // 1. Three windows rated and written.
    send_rollups(kafka.bootstrap_servers(), &stream[..3]).await?;
    let (first, stop) = start(None, &catalog, &prometheus::Registry::new())?;
    assert_eq!(raw_ledger(&kafka, topics::LEDGER, 3).await?.len(), 3);
    stop.cancel();
    first.wait().await?;
    // 2. A revision: its adjustment goes out, then the rater dies before writing its state.
    send_rollups(kafka.bootstrap_servers(), &stream[3..]).await?;
    let (crashed, _) = start(Some(1), &catalog, &prometheus::Registry::new())?;
    crashed.wait().await?;
    // 3. The aggregator re-delivers an already rated revision (as after its own crash), and
    //    the rater restarts, with a price correction in its catalog: it rates the revision
    //    again under the catalog it sent it under and re-sends the identical item (until
    //    December 6, 2026 it priced it under the correction: another plan version, another
    //    id, both counted).
    send_rollups(kafka.bootstrap_servers(), &stream[1..2]).await?;
    let registry = prometheus::Registry::new();
    let (restarted, _) = start(None, &corrected, &registry)?;
    let raw = raw_ledger(&kafka, topics::LEDGER, 5).await?;
    assert_eq!(
        raw.len(),
        5,
        "3 items, 1 adjustment, the same adjustment again"
    );
    assert_eq!(
        raw[3], raw[4],
        "the re-sent item is identical, id and content"
    );
    let amounts: Vec<(String, Kind, Decimal, Decimal)> = raw[..4]
        .iter()
        .map(|i| (i.customer.clone(), i.kind, i.amount, i.period_amount))
        .collect();
    assert_eq!(
        amounts,
        [
            ("c-1".to_owned(), Kind::Usage, d("11.50"), d("11.50")),
            ("c-1".to_owned(), Kind::Usage, d("18.70"), d("30.20")),
            ("c-2".to_owned(), Kind::Usage, d("0.23"), d("0.23")),
            ("c-1".to_owned(), Kind::Adjustment, d("12.60"), d("42.80")),
        ]
    );
    assert_eq!(raw[3].supersedes.as_deref(), Some(raw[0].id.as_str()));
    assert_eq!(counter(&registry, "neruba_rater_repeated_rollups_total"), 1);
    // 4. What was not sent before the restart is priced under the correction: c-2's period
    //    at 1,000 is 25.00 (23.00 under version 1), 0.23 of it already billed.
    send_rollups(
        kafka.bootstrap_servers(),
        &[rollup("c-2", 5, 1, "990", "1000")],
    )
    .await?;
    let raw = raw_ledger(&kafka, topics::LEDGER, 6).await?;
    assert_eq!(
        raw.get(5).map(|i| (
            i.customer.as_str(),
            i.price_version,
            i.amount,
            i.period_amount
        )),
        Some(("c-2", 2, d("24.77"), d("25.00")))
    );
    restarted.kill().await?;
    Ok(())
}

fn counter(registry: &prometheus::Registry, name: &str) -> i64 {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == name)
        .and_then(|f| f.get_metric().first().map(|m| m.get_counter().get_value()))
        // Integer counters: the conversion is exact.
        .map_or(-1, |v| v as i64)
}

#[tokio::test]
async fn rerun_emits_only_the_differences_and_nothing_when_nothing_changed() -> Result<()> {
    let kafka = EmbeddedKafka::start(&[
        (topics::ROLLUPS, 1),
        (topics::LEDGER, 1),
        (topics::DEAD_LETTER, 1),
    ])?;
    let state = tempfile::tempdir()?;
    let stop_all = CancellationToken::new();
    let _stop_on_drop = stop_all.clone().drop_guard();
    let start = |catalog: neruba_schemas::Catalog, registry: &prometheus::Registry| {
        let config = neruba_rater::Config::new(kafka.bootstrap_servers(), state.path());
        let stop = stop_all.child_token();
        neruba_rater::start(config, Arc::new(catalog), registry, stop.clone()).map(|r| (r, stop))
    };
    let rerun = |requested_ms: i64| neruba_schemas::ledger::Rerun {
        v: 1,
        tenant: "globex".into(),
        from_ms: 1_793_491_200_000, // 2026-11-01
        to_ms: 1_796_083_200_000,   // 2026-12-01
        requested_ms,
    };
    let wait_reruns = |registry: prometheus::Registry, n: i64| async move {
        for _ in 0..300 {
            if counter(&registry, "neruba_rater_reruns_total") >= n {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the rater did not handle {n} rerun requests in 30 s")
    };
    // Volume tier 1 at 0.023: 500 → 11.50; tier 2: 1,200 × 0.021 + 5.00 = 30.20.
    send_rollups(
        kafka.bootstrap_servers(),
        &[
            rollup("c-1", 0, 1, "500", "500"),
            rollup("c-2", 0, 1, "1200", "1200"),
        ],
    )
    .await?;
    let registry = prometheus::Registry::new();
    let (first, stop) = start(sample::catalog()?, &registry)?;
    assert_eq!(raw_ledger(&kafka, topics::LEDGER, 2).await?.len(), 2);
    // Nothing changed: the rerun emits nothing.
    neruba_rater::request_rerun(kafka.bootstrap_servers(), topics::ROLLUPS, &[], &rerun(1)).await?;
    wait_reruns(registry.clone(), 1).await?;
    assert_eq!(raw_ledger(&kafka, topics::LEDGER, 2).await?.len(), 2);
    stop.cancel();
    first.wait().await?;

    let corrected = corrected_catalog()?;
    let registry = prometheus::Registry::new();
    let (second, stop) = start(corrected, &registry)?;
    neruba_rater::request_rerun(kafka.bootstrap_servers(), topics::ROLLUPS, &[], &rerun(2)).await?;
    wait_reruns(registry.clone(), 1).await?;
    let items = raw_ledger(&kafka, topics::LEDGER, 3).await?;
    assert_eq!(items.len(), 3, "only c-1's price changed: {items:#?}");
    let adjustment = &items[2];
    assert_eq!(
        (
            adjustment.customer.as_str(),
            adjustment.kind,
            adjustment.amount,
            adjustment.period_amount,
            adjustment.price_version,
            adjustment.revision,
        ),
        ("c-1", Kind::Adjustment, d("1.00"), d("12.50"), 2, 0)
    );
    assert_eq!(adjustment.supersedes.as_deref(), Some(items[0].id.as_str()));
    assert_eq!(
        (
            adjustment.window_start.as_str(),
            adjustment.window_end.as_str()
        ),
        ("2026-11-01T00:00:00.000Z", "2026-12-01T00:00:00.000Z"),
        "a rerun adjusts the whole period"
    );
    // The same rerun again: the amounts already match, nothing more.
    neruba_rater::request_rerun(kafka.bootstrap_servers(), topics::ROLLUPS, &[], &rerun(3)).await?;
    wait_reruns(registry.clone(), 2).await?;
    assert_eq!(raw_ledger(&kafka, topics::LEDGER, 3).await?.len(), 3);
    // A later window of c-1 is priced under version 2, against what was emitted (12.50):
    // 800 → 20.00.
    send_rollups(
        kafka.bootstrap_servers(),
        &[rollup("c-1", 5, 1, "300", "800")],
    )
    .await?;
    let items = raw_ledger(&kafka, topics::LEDGER, 4).await?;
    assert_eq!(
        (items[3].amount, items[3].period_amount),
        (d("7.50"), d("20.00"))
    );
    stop.cancel();
    second.wait().await?;
    Ok(())
}
