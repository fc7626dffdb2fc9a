//! CloudEvents binary content mode: attributes as `ce-*` HTTP headers (or `ce_*` Kafka headers)
//! and `data` as the body. The same event must get the same validation, dedup and answer as in
//! structured mode, checked against what really landed on the topics; and a client no one here
//! wrote (the official CloudEvents Python SDK) must be understood in every mode it sends.

use anyhow::{Context, Result, bail};
use neruba::embedded::{self, EmbeddedKafka};
use neruba_ingest_gateway as gateway;
use neruba_schemas::event::format_time_ms;
use neruba_schemas::topics::{self, API_KEY_HEADER, REJECT_CODE_HEADER};
use neruba_schemas::{Event, codec};
use neruba_tests::{GatewayHarness, now_ms, sample};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn acme() -> &'static str {
    sample::ingest_key("acme").unwrap_or_default()
}

/// POSTs one binary-mode event: `headers` as given, `body` as the data.
async fn post_binary(
    h: &GatewayHarness,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, Value)> {
    let mut request = h
        .client
        .post(format!("{}/v1/events", h.base))
        .bearer_auth(acme())
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    let json = serde_json::from_str(&text).with_context(|| format!("response: {text}"))?;
    Ok((status, json))
}

fn outcome(json: &Value) -> (String, String, String) {
    let r = &json["results"][0];
    let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
    (text("id"), text("status"), text("code"))
}

/// What the SDK script reports per request: its name, the HTTP status, the per-event outcomes.
type Answer = (String, u64, Vec<(String, String, String)>);

fn triple(id: &str, status: &str, code: &str) -> (String, String, String) {
    (id.to_owned(), status.to_owned(), code.to_owned())
}

#[tokio::test]
async fn binary_mode_gets_the_same_validation_dedup_and_answers_as_structured() -> Result<()> {
    let h = GatewayHarness::start().await?;
    let time = format_time_ms(now_ms() - 60_000);
    let attributes = |id: &'static str| {
        vec![
            ("ce-specversion", "1.0"),
            ("ce-id", id),
            ("ce-type", "llm.completion"),
            ("ce-subject", "cust%2F42%20%E2%82%AC"),
            ("ce-source", "sdk"),
            ("ce-time", time.as_str()),
            ("content-type", "application/json"),
        ]
    };
    let data = r#"{"model": "large", "tokens": 1200, "status": "ok"}"#;

    // 1. Accepted, then a repeat answered `duplicate` with a 2xx.
    let (status, json) = post_binary(&h, &attributes("bin-1"), data).await?;
    assert_eq!(
        (status, outcome(&json)),
        (200, triple("bin-1", "accepted", ""))
    );
    let (status, json) = post_binary(&h, &attributes("bin-1"), data).await?;
    assert_eq!(
        (status, outcome(&json)),
        (200, triple("bin-1", "duplicate", ""))
    );

    // 2. The same rejections as a structured single event: 422 with the code.
    let mut no_subject = attributes("bin-2");
    no_subject.retain(|(name, _)| *name != "ce-subject");
    let (status, json) = post_binary(&h, &no_subject, data).await?;
    assert_eq!(
        (status, outcome(&json)),
        (422, triple("bin-2", "rejected", "missing_field"))
    );
    let (status, json) = post_binary(&h, &attributes("bin%00nul"), data).await?;
    assert_eq!(status, 422, "{json}");
    assert_eq!(outcome(&json).2, "invalid_field");
    let (status, json) = post_binary(
        &h,
        &attributes("bin-3"),
        r#"{"model": "large", "tokens": "a dozen", "status": "ok"}"#,
    )
    .await?;
    assert_eq!(
        (status, outcome(&json)),
        (422, triple("bin-3", "rejected", "invalid_value"))
    );

    // 3. Whole-request errors: data that is not JSON, or not declared as JSON.
    let (status, json) = post_binary(&h, &attributes("bin-4"), "{not json").await?;
    assert_eq!(
        (status, json["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    let mut text = attributes("bin-5");
    text.retain(|(name, _)| *name != "content-type");
    text.push(("content-type", "text/plain"));
    let (status, json) = post_binary(&h, &text, "hello").await?;
    assert_eq!(
        (status, json["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );

    // 4. What landed: the event as structured mode would have produced it.
    let landed = h.events_on_topic(1).await?;
    assert_eq!(landed.len(), 1);
    let event = &landed[0].event;
    assert_eq!(
        (
            event.id.as_str(),
            event.event_type.as_str(),
            event.subject.as_str(),
            event.source.as_deref()
        ),
        ("bin-1", "llm.completion", "cust/42 €", Some("sdk"))
    );
    assert_eq!(event.time_ms, now_ms_of(&time)?);
    assert_eq!(event.data.get("tokens"), Some(&json!("1200")));
    h.stop().await
}

fn now_ms_of(text: &str) -> Result<i64> {
    neruba_schemas::event::parse_time_ms(text).map_err(|r| anyhow::anyhow!(r.message))
}

#[tokio::test]
async fn official_python_sdk_is_understood_in_structured_binary_and_batched_modes() -> Result<()> {
    let h = GatewayHarness::start().await?;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cloudevents-sdk");
    let base = h.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(script)
            .args([base.as_str(), acme()])
            .output()
    })
    .await??;
    if !output.status.success() {
        bail!(
            "{script} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report: Value = serde_json::from_slice(&output.stdout)
        .with_context(|| String::from_utf8_lossy(&output.stdout).to_string())?;
    let results = report["results"].as_array().context("results")?;
    let answers: Vec<Answer> = results
        .iter()
        .map(|r| {
            let outcomes = r["body"]["results"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| {
                    let text = |k: &str| o[k].as_str().unwrap_or_default().to_owned();
                    (text("id"), text("status"), text("code"))
                })
                .collect();
            (
                r["name"].as_str().unwrap_or_default().to_owned(),
                r["status"].as_u64().unwrap_or_default(),
                outcomes,
            )
        })
        .collect();
    let expected = vec![
        ("structured", 200, vec![triple("sdk-s-1", "accepted", "")]),
        ("binary", 200, vec![triple("sdk-b-1", "accepted", "")]),
        (
            "binary-repeat",
            200,
            vec![triple("sdk-b-1", "duplicate", "")],
        ),
        (
            "binary-no-content-type",
            200,
            vec![triple("sdk-b-2", "accepted", "")],
        ),
        (
            "binary-invalid-value",
            422,
            vec![triple("sdk-b-3", "rejected", "invalid_value")],
        ),
        (
            "binary-missing-subject",
            422,
            vec![triple("sdk-b-4", "rejected", "missing_field")],
        ),
        (
            "batch",
            200,
            vec![
                triple("sdk-batch-1", "accepted", ""),
                triple("sdk-batch-2", "accepted", ""),
            ],
        ),
    ];
    let expected: Vec<Answer> = expected
        .into_iter()
        .map(|(name, status, outcomes)| (name.to_owned(), status, outcomes))
        .collect();
    assert_eq!(answers, expected, "SDK {}", report["sdk"]);

    let landed = h.events_on_topic(5).await?;
    let mut seen: Vec<(String, String)> = landed
        .iter()
        .map(|l| (l.event.id.clone(), l.event.subject.clone()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("sdk-b-1", "cust-sdk"),
            ("sdk-b-2", "cüst €"),
            ("sdk-batch-1", "cust-sdk"),
            ("sdk-batch-2", "cust-sdk"),
            ("sdk-s-1", "cust-sdk"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    h.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_topic_binary_mode_messages_are_validated_like_structured_ones() -> Result<()> {
    const RAW: &str = "neruba.raw";
    let kafka = EmbeddedKafka::start(&[(topics::EVENTS, 1), (RAW, 1), (topics::DEAD_LETTER, 1)])?;
    let mut config = gateway::Config::new(([127, 0, 0, 1], 0).into(), kafka.bootstrap_servers());
    config.raw = Some(gateway::raw::RawConfig {
        topic: RAW.to_owned(),
        group_id: "raw-test".to_owned(),
        dead_letter_topic: topics::DEAD_LETTER.to_owned(),
        max_batch: 100,
    });
    let shutdown = CancellationToken::new();
    let running = gateway::start(
        config,
        Arc::new(sample::catalog()?),
        prometheus::Registry::new(),
        shutdown.clone(),
    )
    .await?;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .create()?;
    let time = format_time_ms(now_ms() - 1_000);
    let binary = |id: &str, subject: Option<&str>| {
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: API_KEY_HEADER,
                value: Some(acme()),
            })
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            })
            .insert(Header {
                key: "ce_id",
                value: Some(id),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("api.request"),
            })
            .insert(Header {
                key: "ce_time",
                value: Some(time.as_str()),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
        if let Some(subject) = subject {
            headers = headers.insert(Header {
                key: "ce_subject",
                value: Some(subject),
            });
        }
        headers
    };
    let structured = json!({"specversion": "1.0", "id": "raw-s-1", "type": "api.request",
        "subject": "cust-1", "time": time})
    .to_string();
    let messages = [
        (
            binary("raw-b-1", Some("cust-1")),
            r#"{"path": "/x"}"#.to_owned(),
        ),
        (binary("raw-b-2", None), r#"{"path": "/y"}"#.to_owned()),
        (
            binary("raw-b-1", Some("cust-1")),
            r#"{"path": "/x"}"#.to_owned(),
        ),
        (
            OwnedHeaders::new().insert(Header {
                key: API_KEY_HEADER,
                value: Some(acme()),
            }),
            structured,
        ),
    ];
    for (headers, payload) in messages {
        producer
            .send(
                FutureRecord::<(), _>::to(RAW)
                    .payload(payload.as_str())
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }

    let bootstrap = kafka.bootstrap_servers().to_owned();
    let (events, dead) = tokio::task::spawn_blocking(move || -> Result<_> {
        let settle = Duration::from_secs(1);
        let events = embedded::read_topic(
            &bootstrap,
            topics::EVENTS,
            2,
            settle,
            Duration::from_secs(30),
        )?;
        let dead = embedded::read_topic(
            &bootstrap,
            topics::DEAD_LETTER,
            1,
            settle,
            Duration::from_secs(30),
        )?;
        Ok((events, dead))
    })
    .await??;
    let mut ids: Vec<String> = events
        .iter()
        .map(|m| {
            let mut payload = m.payload().unwrap_or_default().to_vec();
            let event: Event = codec::decode(&mut payload)?;
            Ok(event.id)
        })
        .collect::<Result<_>>()?;
    ids.sort();
    assert_eq!(ids, ["raw-b-1", "raw-s-1"], "the repeat counts once");
    assert_eq!(dead.len(), 1);
    let header = |name: &str| {
        dead[0].headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).to_string())
        })
    };
    assert_eq!(header(REJECT_CODE_HEADER).as_deref(), Some("missing_field"));
    assert_eq!(
        header("ce_id").as_deref(),
        Some("raw-b-2"),
        "kept for replay"
    );

    shutdown.cancel();
    running.wait().await?;
    Ok(())
}
