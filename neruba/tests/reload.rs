//! The catalog reloads without a restart: SIGHUP to a running pipeline applies a good catalog
//! to every stage (a new tenant's key is accepted and its events priced), and refuses a broken
//! or incompatible one while the catalog in force keeps working.

mod common;

use anyhow::{Context, Result, bail};
use common::{Proc, scrape, start_dev};
use neruba_schemas::ledger::LineItem;
use rdkafka::Message;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const NEW_KEY: &str = "nrb_test_initech_ingest_5d1e";

/// The sample catalog plus a tenant `initech` whose key is [`NEW_KEY`].
fn catalog_with_new_tenant() -> String {
    format!(
        "{}\n[[tenants]]\nid = \"initech\"\nname = \"Initech\"\n\n\
         [[tenants.api_keys]]\nname = \"ingest\"\nsha256 = \"{}\"\nscopes = [\"ingest\"]\n\n\
         [[tenants.meters]]\nkey = \"reports\"\nevent_type = \"report.generated\"\naggregation = \"count\"\nwindow = \"1m\"\n\n\
         [[tenants.price_plans]]\nid = \"reports\"\nmeter = \"reports\"\nversion = 1\neffective_from = \"2026-01-01\"\n\
         currency = \"USD\"\nmodel = {{ type = \"unit\", unit_price = \"0.25\" }}\n",
        neruba::sample::CATALOG_TOML,
        neruba_schemas::catalog::hash_key(NEW_KEY)
    )
}

async fn post(client: &reqwest::Client, base: &str, key: &str, events: &Value) -> Result<u16> {
    Ok(client
        .post(format!("{base}/v1/events"))
        .bearer_auth(key)
        .json(events)
        .send()
        .await?
        .status()
        .as_u16())
}

/// The value of `neruba_catalog_reloads_total{result}`.
async fn reloads(client: &reqwest::Client, base: &str, result: &str) -> Result<u64> {
    let text = scrape(client, base).await?;
    let prefix = format!("neruba_catalog_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .context("no reload counter")?
        .trim()
        .parse()
        .context("counter value")
}

/// Writes `text` as the catalog, sends SIGHUP, and waits until the `result` counter reaches
/// `count`.
async fn reload(
    pipeline: &Proc,
    path: &Path,
    text: &str,
    client: &reqwest::Client,
    base: &str,
    result: &str,
    count: u64,
) -> Result<()> {
    std::fs::write(path, text)?;
    pipeline.signal("HUP")?;
    let started = Instant::now();
    while reloads(client, base, result).await? < count {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("no {result} reload:\n{}", pipeline.log_tail(20));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_catalog_everywhere_and_refuses_a_bad_one() -> Result<()> {
    let work = tempfile::tempdir()?;
    let path = work.path().join("catalog.toml");
    std::fs::write(&path, neruba::sample::CATALOG_TOML)?;
    let catalog = path.display().to_string();
    let (mut pipeline, base, _) =
        start_dev(work.path(), &["--catalog", &catalog, "--partitions", "1"]).await?;
    let client = reqwest::Client::new();
    let acme = neruba::sample::ingest_key("acme").context("dev key")?;
    let time = neruba_schemas::event::format_time_ms(neruba_schemas::event::now_ms() - 120_000);
    let api_call = |id: &str| {
        json!([{"specversion": "1.0", "id": id, "type": "api.request", "subject": "c-1",
                "time": time, "data": {}}])
    };
    let reports = json!([
        {"specversion": "1.0", "id": "r-1", "type": "report.generated", "subject": "c-9", "time": time, "data": {}},
        {"specversion": "1.0", "id": "r-2", "type": "report.generated", "subject": "c-9", "time": time, "data": {}},
        {"specversion": "1.0", "id": "r-3", "type": "report.generated", "subject": "c-9", "time": time, "data": {}}
    ]);
    assert_eq!(post(&client, &base, NEW_KEY, &reports).await?, 401);

    // Broken TOML: refused, the catalog in force still answers.
    reload(
        &pipeline,
        &path,
        "[[tenants]\nid =",
        &client,
        &base,
        "refused",
        1,
    )
    .await?;
    assert_eq!(post(&client, &base, acme, &api_call("a-1")).await?, 200);
    // Valid, but a meter's window changes under its stored windows: refused.
    let incompatible =
        neruba::sample::CATALOG_TOML.replacen("window = \"1m\"", "window = \"5m\"", 1);
    reload(
        &pipeline,
        &path,
        &incompatible,
        &client,
        &base,
        "refused",
        2,
    )
    .await?;
    assert_eq!(post(&client, &base, NEW_KEY, &reports).await?, 401);
    assert_eq!(reloads(&client, &base, "applied").await?, 0);

    // A new tenant: its key is accepted, and the aggregator and the rater meter and price it.
    reload(
        &pipeline,
        &path,
        &catalog_with_new_tenant(),
        &client,
        &base,
        "applied",
        1,
    )
    .await?;
    assert_eq!(post(&client, &base, NEW_KEY, &reports).await?, 200);
    assert_eq!(post(&client, &base, acme, &api_call("a-2")).await?, 200);

    let bootstrap = common::dev_bootstrap(&pipeline)?;
    let started = Instant::now();
    let amount = loop {
        let bootstrap = bootstrap.clone();
        let messages = tokio::task::spawn_blocking(move || {
            neruba::embedded::read_topic(
                &bootstrap,
                "neruba.ledger",
                0,
                Duration::from_secs(1),
                Duration::from_secs(10),
            )
        })
        .await??;
        let mut initech = Decimal::ZERO;
        let mut found = false;
        for message in &messages {
            let item = LineItem::decode(message.payload().unwrap_or_default())?;
            if item.tenant == "initech" {
                initech += item.amount;
                found = true;
            }
        }
        if found || started.elapsed() > Duration::from_secs(60) {
            break found.then_some(initech);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    pipeline.kill()?;
    // Three reports at 0.25 USD.
    assert_eq!(amount, Some(Decimal::new(75, 2)));
    Ok(())
}
