//! Customers' own Kafka producers: events written to the raw topic (API key in a header) are
//! validated and routed like HTTP ones, bad ones dead-lettered with the same codes, and an id
//! sent over HTTP and again over Kafka counts once. Real broker (tansu), components as
//! processes, a producer on the bundled librdkafka.

mod common;

use anyhow::{Context, Result};
use common::{Broker, Proc, free_port, scrape};
use neruba_schemas::ledger::LineItem;
use neruba_schemas::topics::{API_KEY_HEADER, REJECT_CODE_HEADER};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use rust_decimal::Decimal;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// Every message of `topic` once at least `expected` arrived and it was quiet for a second.
fn read_all(bootstrap: &str, topic: &str, expected: usize) -> Result<Vec<OwnedMessage>> {
    Ok(neruba::embedded::read_topic(
        bootstrap,
        topic,
        expected,
        Duration::from_secs(1),
        Duration::from_secs(60),
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_topic_events_are_validated_routed_and_deduplicated_with_http() -> Result<()> {
    let work = tempfile::tempdir()?;
    let broker = Broker::start(work.path())?;
    broker
        .create_topics(&[
            ("neruba.raw", 2),
            ("neruba.events", 2),
            ("neruba.rollups", 2),
            ("neruba.ledger", 2),
            ("neruba.dead-letter", 1),
        ])
        .await?;
    let binary = Path::new(env!("CARGO_BIN_EXE_neruba"));
    let catalog = work.path().join("catalog.toml");
    std::fs::write(&catalog, neruba::sample::CATALOG_TOML)?;
    let (catalog, state) = (catalog.display().to_string(), work.path().join("state"));
    let port = free_port()?;
    let args = |extra: &[&str]| -> Vec<String> { extra.iter().map(|s| (*s).to_owned()).collect() };
    let b = broker.bootstrap.as_str();
    let listen = format!("127.0.0.1:{port}");
    let mut gateway = Proc::new(
        "gateway",
        binary,
        &args(&[
            "gateway",
            "--brokers",
            b,
            "--catalog",
            &catalog,
            "--listen",
            &listen,
            "--raw-topic",
            "neruba.raw",
        ]),
        work.path(),
    );
    let aggregator_state = state.join("aggregator").display().to_string();
    let mut aggregator = Proc::new(
        "aggregator",
        binary,
        &args(&[
            "aggregator",
            "--brokers",
            b,
            "--catalog",
            &catalog,
            "--state-dir",
            &aggregator_state,
            "--ops-listen",
            "127.0.0.1:0",
            "--grace",
            "0s",
            "--idle-timeout",
            "1s",
            "--assign",
            "all",
        ]),
        work.path(),
    );
    let rater_state = state.join("rater").display().to_string();
    let mut rater = Proc::new(
        "rater",
        binary,
        &args(&[
            "rater",
            "--brokers",
            b,
            "--catalog",
            &catalog,
            "--state-dir",
            &rater_state,
            "--ops-listen",
            "127.0.0.1:0",
            "--rater-assign",
            "all",
        ]),
        work.path(),
    );
    for process in [&mut gateway, &mut aggregator, &mut rater] {
        process.start()?;
    }
    let client = reqwest::Client::new();
    let base = format!("http://{listen}");
    for _ in 0..100 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let time = neruba_schemas::event::format_time_ms(neruba_schemas::event::now_ms() - 10 * 60_000);
    let call = |id: &str| {
        json!({"specversion": "1.0", "id": id, "type": "api.request", "subject": "c-1", "time": time})
            .to_string()
    };
    // h-1 over HTTP first.
    let answer: serde_json::Value = client
        .post(format!("{base}/v1/events"))
        .bearer_auth(neruba::sample::ingest_key("acme").context("key")?)
        .header("content-type", "application/cloudevents+json")
        .body(call("h-1"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(answer["accepted"], 1);
    // h-2, an LLM call, over HTTP too: sent again on the raw topic with a value its meter
    // refuses (as after a catalog reload that tightened it), it is a repeat, not a dead
    // letter. Was: dead-lettered `invalid_value`, though the event had been counted.
    let tokens = |id: &str, tokens: &str| {
        json!({"specversion": "1.0", "id": id, "type": "llm.completion", "subject": "c-1",
            "time": time, "data": {"model": "large", "tokens": tokens, "status": "ok"}})
        .to_string()
    };
    let answer: serde_json::Value = client
        .post(format!("{base}/v1/events"))
        .bearer_auth(neruba::sample::ingest_key("acme").context("key")?)
        .header("content-type", "application/cloudevents+json")
        .body(tokens("h-2", "5"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(answer["accepted"], 1);

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", b)
        .set("acks", "all")
        .set("message.max.bytes", "2000000")
        .create()?;
    let ingest = neruba::sample::ingest_key("acme").context("key")?;
    let read_only = "nrb_dev_acme_read_2b81d4";
    let tokens_lots = json!({"specversion": "1.0", "id": "r-bad", "type": "llm.completion",
        "subject": "c-1", "time": time, "data": {"model": "large", "tokens": "lots", "status": "ok"}})
        .to_string();
    // An event larger than a producer sends by default: was, its dead letter (the whole
    // payload again) could not be produced, so the consumer never committed past it.
    let big = json!({"specversion": "1.0", "id": "r-big", "type": "api.request",
        "subject": "c-1", "time": time, "data": {"pad": "x".repeat(1_100_000)}})
    .to_string();
    let big_len = big.len();
    let messages: Vec<(Option<&str>, Vec<u8>)> = vec![
        (Some(ingest), big.into_bytes()),
        (Some(ingest), call("h-1").into_bytes()), // the HTTP event again
        (Some(ingest), tokens("h-2", "lots").into_bytes()), // the other, its value refused now
        (Some(ingest), call("r-1").into_bytes()),
        (Some(ingest), call("r-2").into_bytes()),
        (Some(ingest), b"\x00\x9f not json".to_vec()),
        (None, call("r-3").into_bytes()),
        (Some(read_only), call("r-4").into_bytes()),
        (Some(ingest), tokens_lots.into_bytes()),
    ];
    for (key, payload) in &messages {
        let mut headers = OwnedHeaders::new();
        if let Some(key) = key {
            headers = headers.insert(Header {
                key: API_KEY_HEADER,
                value: Some(*key),
            });
        }
        producer
            .send(
                FutureRecord::<(), [u8]>::to("neruba.raw")
                    .payload(payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
    }

    // A message with a header name that is not UTF-8, from a client that can write one: was,
    // rdkafka's header reader panicked on it and the raw consumer's task ended, for good (a
    // restart met the same message). Refused as `invalid_field` now.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka-bad-header");
    let output = tokio::task::spawn_blocking({
        let (b, event) = (b.to_owned(), call("r-5"));
        move || {
            std::process::Command::new(script)
                .args([b.as_str(), "neruba.raw", ingest, event.as_str()])
                .output()
        }
    })
    .await??;
    anyhow::ensure!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dead = tokio::task::spawn_blocking({
        let b = b.to_owned();
        move || read_all(&b, "neruba.dead-letter", 6)
    })
    .await??;
    // The large one's first 256 KiB, and its length.
    let kept: Vec<(usize, Option<String>)> = dead
        .iter()
        .filter(|m| m.payload().is_some_and(|p| p.len() > 100_000))
        .map(|m| {
            let from = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "neruba-truncated-from")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            (m.payload().map_or(0, <[u8]>::len), from)
        })
        .collect();
    assert_eq!(kept, vec![(256 * 1024, Some(big_len.to_string()))]);
    let mut codes: Vec<String> = dead
        .iter()
        .filter_map(|m| {
            m.headers()?
                .iter()
                .find(|h| h.key == REJECT_CODE_HEADER)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
        .collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            "event_too_large",
            "forbidden",
            "invalid_field",
            "invalid_json",
            "invalid_value",
            "unauthenticated"
        ]
    );

    // h-1, r-1 and r-2 are three calls, h-1 counted once: the period's quantity reaches 3 (and
    // stays there), billed 1.00 (one package of 1,000 at 0.50, raised to the 1.00 minimum).
    // (h-2's tokens are another meter's items.)
    let started = Instant::now();
    let (quantity, total) = loop {
        let ledger = tokio::task::spawn_blocking({
            let b = b.to_owned();
            move || read_all(&b, "neruba.ledger", 1)
        })
        .await??;
        let mut items: Vec<LineItem> = ledger
            .iter()
            .map(|m| LineItem::decode(m.payload().unwrap_or_default()))
            .collect::<Result<_, _>>()?;
        items.retain(|item| item.meter == "api_calls");
        let quantity = items
            .iter()
            .map(|i| i.period_quantity)
            .max()
            .unwrap_or_default();
        let mut distinct: Vec<&LineItem> = items.iter().collect();
        distinct.sort_by(|a, b| a.id.cmp(&b.id));
        distinct.dedup_by(|a, b| a.id == b.id);
        let total: Decimal = distinct.iter().map(|i| i.amount).sum();
        if quantity >= Decimal::from(3) || started.elapsed() > Duration::from_secs(60) {
            break (quantity, total);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!((quantity, total), (Decimal::from(3), Decimal::new(100, 2)));

    // The raw consumer's lag (the ingest lag of Kafka-mode producers) is exported per partition
    // it read, and is 0 once everything was handled.
    let started = Instant::now();
    let lags = loop {
        let text = scrape(&client, &base).await?;
        let lags: Vec<(String, String)> = text
            .lines()
            .filter(|l| l.starts_with("neruba_consumer_lag_"))
            .filter(|l| l.contains("consumer=\"gateway-raw\""))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(series, value)| (series.to_owned(), value.to_owned()))
            .collect();
        let caught_up = !lags.is_empty() && lags.iter().all(|(_, v)| v == "0");
        if caught_up || started.elapsed() > Duration::from_secs(15) {
            break lags;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!lags.is_empty(), "no raw-topic lag series");
    assert!(lags.iter().all(|(_, v)| v == "0"), "{lags:?}");
    let messages_series = lags
        .iter()
        .filter(|(s, _)| s.starts_with("neruba_consumer_lag_messages"))
        .count();
    let seconds_series = lags.len() - messages_series;
    assert_eq!(messages_series, seconds_series, "{lags:?}");
    gateway.terminate(Duration::from_secs(30))?;
    Ok(())
}
