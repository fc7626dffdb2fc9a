//! The api's wait on events positions (`min_position=<events topic>:<partition>:<offset>` on
//! `GET /v1/usage`) against the embedded broker, with the aggregators' group played by a test
//! client that commits offsets: every waiting read answers within its own wait however many
//! wait and whether the broker answers, readiness stays prompt meanwhile, positions already
//! folded are answered at once (even with no wait at all), and a partition the events topic
//! does not have is refused once the topic's metadata was asked again. And a replica just
//! started answers no read before it has read its topic to the end once; a usage read that
//! cannot combine exactly (`avg` past its window) is refused over HTTP with `422
//! not_combinable` before anything is read, and `latest` across groups, from an aggregator's
//! rollups, is the value of the latest event.

use anyhow::{Context, Result};
use neruba::embedded::EmbeddedKafka;
use neruba_schemas::credit::{self, Grant, GrantTerms};
use neruba_schemas::event::format_time_ms;
use neruba_schemas::topics;
use neruba_stage::server::ConnectionLimits;
use neruba_tests::{LEDGER_PARTITIONS, sample};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// An api (and its operations listener) on an embedded broker with the events (3
/// partitions), ledger and rollups topics.
struct Api {
    kafka: EmbeddedKafka,
    base: String,
    ops: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
    running: Option<neruba_api::Running>,
    _state: tempfile::TempDir,
}

/// What a read answered, and how long it took.
#[derive(Debug)]
struct Read {
    status: u16,
    code: Option<String>,
    retry_after: Option<String>,
    took: Duration,
}

impl Api {
    async fn start(read_wait: Duration) -> Result<Self> {
        Self::start_on(broker()?, read_wait, ConnectionLimits::default()).await
    }

    async fn start_on(
        kafka: EmbeddedKafka,
        read_wait: Duration,
        connections: ConnectionLimits,
    ) -> Result<Self> {
        Self::start_with(kafka, read_wait, connections, sample::catalog()?).await
    }

    async fn start_with(
        kafka: EmbeddedKafka,
        read_wait: Duration,
        connections: ConnectionLimits,
        catalog: neruba_schemas::Catalog,
    ) -> Result<Self> {
        let state = tempfile::tempdir()?;
        let mut config = neruba_api::Config::new(
            kafka.bootstrap_servers(),
            state.path(),
            "127.0.0.1:0".parse()?,
            "test",
        );
        config.read_wait = read_wait;
        config.connections = connections;
        let shutdown = CancellationToken::new();
        let running = neruba_api::start(
            config,
            Arc::new(catalog),
            &prometheus::Registry::new(),
            shutdown.clone(),
        )
        .await?;
        let ops = neruba::ops::serve(
            tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            vec![],
            running.readiness(),
            shutdown.clone(),
        )?;
        Ok(Self {
            base: format!("http://{}", running.local_addr),
            ops: format!("http://{ops}"),
            kafka,
            client: reqwest::Client::new(),
            shutdown,
            running: Some(running),
            _state: state,
        })
    }

    /// A usage read of a customer nobody wrote for, at `min_position`: `404
    /// customer_not_found` once the wait is over, `503 not_caught_up` if it is not.
    async fn usage_at(&self, min_position: &str) -> Result<Read> {
        let key = sample::dev_key("acme", "read").context("acme read key")?;
        let url = format!(
            "{}/v1/usage?customer=nobody&meter=llm_tokens&from=2026-01-01T00:00:00Z\
             &to=2026-01-01T01:00:00Z&window=none&min_position={min_position}",
            self.base
        );
        let started = Instant::now();
        let response = self.client.get(url).bearer_auth(key).send().await?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body: Value = response.json().await.context("a JSON answer")?;
        Ok(Read {
            status,
            code: body["error"]["code"].as_str().map(str::to_owned),
            retry_after,
            took: started.elapsed(),
        })
    }

    /// How long `/readyz` took to answer (whatever it said).
    async fn readyz_took(&self) -> Result<Duration> {
        let started = Instant::now();
        self.client
            .get(format!("{}/readyz", self.ops))
            .send()
            .await?
            .text()
            .await?;
        Ok(started.elapsed())
    }

    /// Commits `offsets` (events partition, next offset) under the aggregators' group, as an
    /// aggregator does once it has folded the events below them.
    async fn commit_as_the_aggregators(&self, offsets: &[(i32, i64)]) -> Result<()> {
        let bootstrap = self.kafka.bootstrap_servers().to_owned();
        let offsets = offsets.to_vec();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("group.id", neruba_api::DEFAULT_AGGREGATOR_GROUP_ID)
                .set("enable.auto.commit", "false")
                .create()?;
            let mut list = TopicPartitionList::new();
            for (partition, offset) in offsets {
                list.add_partition_offset(topics::EVENTS, partition, Offset::Offset(offset))?;
            }
            consumer.commit(&list, CommitMode::Sync)?;
            Ok(())
        })
        .await?
    }

    /// `count` reads at `min_position` at once, while `/readyz` is asked every 100 ms: every
    /// read's answer, and the slowest `/readyz`.
    async fn many_at(&self, count: usize, min_position: &str) -> Result<(Vec<Read>, Duration)> {
        let reads = futures::future::join_all((0..count).map(|_| self.usage_at(min_position)));
        let probes = async {
            let mut slowest = Duration::ZERO;
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                slowest = slowest.max(self.readyz_took().await?);
            }
            Ok::<_, anyhow::Error>(slowest)
        };
        let (reads, slowest) = tokio::join!(reads, probes);
        Ok((reads.into_iter().collect::<Result<_>>()?, slowest?))
    }

    async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.wait().await?;
        }
        Ok(())
    }
}

/// An embedded broker with the events (3 partitions), ledger and rollups topics.
fn broker() -> Result<EmbeddedKafka> {
    Ok(EmbeddedKafka::start(&[
        (topics::EVENTS, 3),
        (topics::LEDGER, LEDGER_PARTITIONS),
        (topics::ROLLUPS, 2),
    ])?)
}

/// The read was answered `503 not_caught_up` with `Retry-After: 1`.
fn assert_not_caught_up(read: &Read) {
    assert_eq!(
        (
            read.status,
            read.code.as_deref(),
            read.retry_after.as_deref()
        ),
        (503, Some("not_caught_up"), Some("1")),
        "{read:?}"
    );
}

/// Every read a `503 not_caught_up` with `Retry-After: 1`, after the whole wait and not much
/// later.
fn all_answered_at_their_wait(reads: &[Read], wait: Duration, margin: Duration) {
    for read in reads {
        assert_not_caught_up(read);
    }
    let fastest = reads.iter().map(|r| r.took).min().unwrap_or_default();
    let slowest = reads.iter().map(|r| r.took).max().unwrap_or_default();
    assert!(
        fastest >= wait && slowest < wait + margin,
        "answered between {fastest:?} and {slowest:?} with a wait of {wait:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_reads_waiting_on_an_events_position_answer_at_their_wait_even_with_the_broker_down()
-> Result<()> {
    const WAIT: Duration = Duration::from_secs(1);
    // Room for a loaded machine; reads answered one after another would take 64 × the wait.
    const MARGIN: Duration = Duration::from_secs(2);
    const UNREACHED: &str = "neruba.events:0:999999999";
    let api = Api::start(WAIT).await?;

    // 1. The broker goes down before any read waited on events (so before the api ever
    //    asked the aggregators' progress): 64 reads at once each answer 503 at their wait,
    //    and `/readyz` answers promptly meanwhile.
    api.kafka.set_broker_up(false)?;
    let (reads, readyz) = api.many_at(64, UNREACHED).await?;
    all_answered_at_their_wait(&reads, WAIT, MARGIN);
    // It answers from what the background probe last found, never waiting on the broker
    // (whose probe call may take 2 s).
    assert!(
        readyz < Duration::from_millis(1500),
        "/readyz took {readyz:?}"
    );

    // 2. Back up: the same, now with the broker answering that the position is not folded.
    api.kafka.set_broker_up(true)?;
    let (reads, readyz) = api.many_at(64, UNREACHED).await?;
    all_answered_at_their_wait(&reads, WAIT, MARGIN);
    // It answers from what the background probe last found, never waiting on the broker
    // (whose probe call may take 2 s).
    assert!(
        readyz < Duration::from_millis(1500),
        "/readyz took {readyz:?}"
    );
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_positions_already_folded_are_answered_at_once_even_with_no_wait() -> Result<()> {
    let api = Api::start(Duration::ZERO).await?;
    // 1. The aggregators have folded partition 0 below 5 and partition 1 below 2.
    api.commit_as_the_aggregators(&[(0, 5), (1, 2)]).await?;
    let folded = "neruba.events:0:4,neruba.events:1:1";

    // 2. With no wait, the first read may come before the api has heard (503, which wakes
    //    its poller); once it has, every read at those positions is answered at once.
    let started = Instant::now();
    loop {
        let read = api.usage_at(folded).await?;
        if read.status == 404 {
            break;
        }
        assert_eq!(
            (read.status, read.code.as_deref()),
            (503, Some("not_caught_up"))
        );
        assert!(started.elapsed() < Duration::from_secs(10), "{read:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..20 {
        let read = api.usage_at(folded).await?;
        assert_eq!(
            (read.status, read.code.as_deref()),
            (404, Some("customer_not_found")),
            "{read:?}"
        );
        assert!(read.took < Duration::from_secs(1), "{read:?}");
    }
    // Still so once the poller has stopped (no read waited for longer than its linger): what
    // it learned stays true.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let read = api.usage_at(folded).await?;
    assert_eq!(
        (read.status, read.code.as_deref()),
        (404, Some("customer_not_found"))
    );
    assert!(read.took < Duration::from_secs(1), "{read:?}");

    // 3. An offset not folded yet: 503 at once.
    let read = api.usage_at("neruba.events:0:5").await?;
    assert_not_caught_up(&read);
    assert!(read.took < Duration::from_secs(1), "{read:?}");
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_partition_the_topic_lacks_is_refused_once_its_metadata_was_asked_again()
-> Result<()> {
    let api = Api::start(Duration::from_secs(10)).await?;
    // The events topic has partitions 0–2. Each read names partition 3; each is refused only
    // by metadata fetched after it arrived (the first read's, then a refresh per read), well
    // within the wait.
    for min_position in [
        "neruba.events:3:0",
        "neruba.events:3:0",
        "neruba.events:0:0,neruba.events:3:7",
    ] {
        let read = api.usage_at(min_position).await?;
        assert_eq!(
            (read.status, read.code.as_deref()),
            (422, Some("unsupported_position")),
            "{min_position}: {read:?}"
        );
        assert!(
            read.took < Duration::from_secs(5),
            "{min_position}: {read:?}"
        );
    }
    api.stop().await
}

/// A grant of 25.00 USD to `customer` under the key `pack-1`.
fn grant_of(customer: &str) -> Grant {
    Grant {
        v: 1,
        id: credit::grant_id("acme", customer, "pack-1"),
        tenant: "acme".into(),
        customer: customer.into(),
        key: "pack-1".into(),
        terms: GrantTerms {
            amount: Decimal::new(2_500, 2),
            currency: "USD".into(),
            priority: 10,
            effective_at: None,
            expires_at: None,
            paid: None,
            metadata: BTreeMap::new(),
        },
        received_at: format_time_ms(0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_just_started_answers_a_customer_on_the_ledger_once_it_has_read_it() -> Result<()>
{
    // Was: a replica answered from its model before it had read the ledger once, so right
    // after a start a customer with a grant on the ledger was `404 customer_not_found` (or
    // `503` while its partition opened), with nothing to tell a support person the answer
    // was not true.
    const FILLERS: usize = 100_000;
    let kafka = broker()?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    // Before it, grants of other customers of its partition: a replica takes a while to
    // read them.
    let partition = topics::stable_partition("acme/c1", LEDGER_PARTITIONS);
    let others = (0..)
        .map(|i| format!("filler-{i}"))
        .filter(|c| topics::stable_partition(&format!("acme/{c}"), LEDGER_PARTITIONS) == partition)
        .take(FILLERS);
    let mut sent = Vec::with_capacity(FILLERS + 1);
    for customer in others.chain(std::iter::once("c1".to_owned())) {
        let grant = grant_of(&customer);
        let key = format!("acme/{customer}");
        let payload = credit::encode(&grant);
        let record = FutureRecord::to(topics::LEDGER)
            .key(&key)
            .payload(payload.as_slice())
            .partition(partition)
            .headers(OwnedHeaders::new().insert(Header {
                key: topics::RECORD_HEADER,
                value: Some("grant"),
            }));
        sent.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for delivery in sent {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    let api = Api::start_on(kafka, Duration::from_secs(30), ConnectionLimits::default()).await?;

    let read = sample::dev_key("acme", "read").context("acme read key")?;
    let started = Instant::now();
    let response = api
        .client
        .get(format!("{}/v1/customers/c1/balances", api.base))
        .bearer_auth(read)
        .send()
        .await?;
    let status = response.status().as_u16();
    let body: Value = response.json().await.context("a JSON answer")?;
    assert_eq!(status, 200, "{body} after {:?}", started.elapsed());
    assert_eq!(body["balances"][0]["currency"], "USD", "{body}");
    let balance = body["balances"][0]["balance"]
        .as_str()
        .context("balance as text")?;
    assert_eq!(
        Decimal::from_str(balance)?,
        Decimal::new(2_500, 2),
        "{body}"
    );
    api.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_finish_its_request_head_is_cut_off() -> Result<()> {
    // Was: the api served with axum's defaults, which bound neither a request head's time nor
    // a connection's idleness nor how many are open: a client sending a header byte now and
    // then held its connection (and a file descriptor) for good.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limits = ConnectionLimits {
        header_read_timeout: Duration::from_secs(1),
        ..ConnectionLimits::default()
    };
    let api = Api::start_on(broker()?, Duration::from_secs(1), limits).await?;
    let address = api.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await?;
    stream
        .write_all(b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n")
        .await?;
    let started = Instant::now();
    let mut buffer = [0_u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(8), stream.read(&mut buffer)).await;
    // Closed (end of stream, or reset) once the head was due, well before the test's wait.
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "{read:?} after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // A request that speaks is answered as before.
    let answer = api
        .client
        .get(format!("{}/v1/openapi.json", api.base))
        .send()
        .await?;
    assert_eq!(answer.status().as_u16(), 200);
    api.stop().await
}

/// The sample catalog with, for acme, a `latest` meter by GPU and an `avg` meter.
fn catalog_with_gauges() -> Result<neruba_schemas::Catalog> {
    let gauges = r#"# A GPU's temperature, the latest reading, by GPU.
[[tenants.meters]]
key = "gpu_celsius"
event_type = "gpu.reading"
aggregation = "latest"
value = "$.celsius"
group_by = { gpu = "$.gpu" }
window = "1m"

# Request latency, averaged.
[[tenants.meters]]
key = "latency_avg"
event_type = "api.request"
aggregation = "avg"
value = "$.ms"
window = "1m"

# The same, billed in Tokyo's time.
[[tenants.meters]]
key = "latency_avg_tokyo"
event_type = "api.request"
aggregation = "avg"
value = "$.ms"
window = "1m"
billing_period = { time_zone = "+09:00" }

"#;
    let anchor = "# API calls, counted.\n";
    anyhow::ensure!(
        sample::CATALOG_TOML.contains(anchor),
        "the sample catalog changed"
    );
    let text = sample::CATALOG_TOML.replacen(anchor, &format!("{gauges}{anchor}"), 1);
    Ok(neruba_schemas::Catalog::from_toml_str(&text, "test")?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_read_that_cannot_combine_exactly_is_refused_before_any_read() -> Result<()> {
    let api = Api::start_with(
        broker()?,
        Duration::from_secs(1),
        ConnectionLimits::default(),
        catalog_with_gauges()?,
    )
    .await?;
    let key = sample::dev_key("acme", "read").context("acme read key")?;
    let range = "from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z";
    // The customer is unknown: a query that can be answered gets as far as finding that out
    // (404); one that cannot combine exactly is refused first (422), whoever it is for.
    let in_range = [
        // The latest of two GPUs' readings combines exactly (their rollups say which
        // event is the latest).
        (
            "meter=gpu_celsius&window=none&group_by=",
            404,
            "customer_not_found",
        ),
        (
            "meter=gpu_celsius&window=hour&group_by=",
            404,
            "customer_not_found",
        ),
        ("meter=gpu_celsius&window=hour", 404, "customer_not_found"),
        (
            "meter=gpu_celsius&window=none&group_by=gpu",
            404,
            "customer_not_found",
        ),
        // An average of averages is not the average: only at the meter's own window.
        ("meter=latency_avg&window=hour", 422, "not_combinable"),
        ("meter=latency_avg&window=day", 422, "not_combinable"),
        ("meter=latency_avg", 404, "customer_not_found"),
        // The sum adds up in any bucket.
        (
            "meter=llm_tokens&window=day&group_by=",
            404,
            "customer_not_found",
        ),
    ]
    .map(|(query, status, code)| (format!("{range}&{query}"), status, code));
    // At the calendar's end. Was: the whole period of a meter billed east of UTC was looked
    // for past December 31, 9999 in its zone, a panic that reset the connection; and a `to`
    // past it in UTC (given with a western offset) was echoed as a bare number.
    let at_the_end = [
        (
            "meter=latency_avg_tokyo&window=none\
             &from=9999-12-31T20:00:00Z&to=9999-12-31T21:00:00Z",
            422,
            "not_combinable",
        ),
        (
            "meter=latency_avg_tokyo&from=9999-12-31T20:00:00Z&to=9999-12-31T21:00:00Z",
            404,
            "customer_not_found",
        ),
        (
            "meter=llm_tokens&from=9999-12-31T22:00:00Z&to=9999-12-31T23:00:00-05:00",
            400,
            "invalid_time",
        ),
    ]
    .map(|(query, status, code)| (query.to_owned(), status, code));
    for (query, status, code) in in_range.into_iter().chain(at_the_end) {
        let url = format!("{}/v1/usage?customer=nobody&{query}", api.base);
        let response = api.client.get(&url).bearer_auth(key).send().await?;
        let got = response.status().as_u16();
        let body: Value = response.json().await.context("a JSON answer")?;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{query}: {body}"
        );
    }
    api.stop().await
}

/// `latest` across groups, from events through an aggregator to an HTTP read: each row is
/// the value of the latest event by time, then id, whichever group it is in and whatever
/// order the events were sent in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_across_groups_is_the_value_of_the_latest_event_from_the_aggregators_rollups()
-> Result<()> {
    let kafka = EmbeddedKafka::start(&[
        (topics::EVENTS, 3),
        (topics::LEDGER, LEDGER_PARTITIONS),
        (topics::ROLLUPS, 2),
        (topics::DEAD_LETTER, 1),
    ])?;
    let catalog = Arc::new(catalog_with_gauges()?);
    let writer = neruba_tests::EventWriter::new(kafka.bootstrap_servers())?;
    let aggregator_state = tempfile::tempdir()?;
    let mut config =
        neruba_aggregator::Config::new(kafka.bootstrap_servers(), aggregator_state.path());
    config.timing.grace_ms = 1_000;
    config.idle_timeout = Duration::from_secs(3600);
    let stop_aggregator = CancellationToken::new();
    let aggregator = neruba_aggregator::start(
        config,
        catalog.clone(),
        &prometheus::Registry::new(),
        stop_aggregator.clone(),
    )?;
    let _stops = stop_aggregator.clone().drop_guard();
    let api = Api::start_with(
        kafka,
        Duration::from_secs(1),
        ConnectionLimits::default(),
        (*catalog).clone(),
    )
    .await?;

    let t0 = neruba_schemas::event::parse_time_ms("2026-11-10T12:00:00Z")?;
    let reading = |id: &str, at_s: i64, gpu: &str, celsius: &str| {
        neruba_tests::event(
            "acme",
            id,
            "gpu.reading",
            "gpu-host",
            t0 + at_s * 1000,
            serde_json::json!({"gpu": gpu, "celsius": celsius}),
        )
    };
    let closer = neruba_tests::event(
        "acme",
        "closer",
        "gpu.reading",
        "another-host",
        t0 + 600_000,
        serde_json::json!({"gpu": "z", "celsius": "1"}),
    );
    writer
        .send(
            0,
            &[
                // Minute 0: gpu b's reading is 30 s after gpu a's, sent first.
                reading("r2", 40, "b", "61"),
                reading("r1", 10, "a", "50"),
                // Minute 1: one time, and "r4" after "r3": gpu a's, the first group read,
                // and sent first.
                reading("r4", 90, "a", "55"),
                reading("r3", 90, "b", "57.5"),
                // Closes both minutes of gpu-host.
                closer,
            ],
        )
        .await?;

    let key = sample::dev_key("acme", "read").context("acme read key")?;
    let usage = |query: &str| {
        format!(
            "{}/v1/usage?customer=gpu-host&meter=gpu_celsius&from=2026-11-10T12:00:00Z\
             &to=2026-11-10T13:00:00Z&{query}",
            api.base
        )
    };
    let quantities = |body: &Value| -> Vec<(String, Decimal)> {
        body["data"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        (
                            r["group"]["gpu"].as_str().unwrap_or_default().to_owned(),
                            Decimal::from_str(r["quantity"].as_str().unwrap_or_default())
                                .unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let read = |query: String| {
        let (client, key) = (api.client.clone(), key.to_owned());
        async move {
            let response = client.get(query).bearer_auth(key).send().await?;
            let status = response.status().as_u16();
            let body: Value = response.json().await.context("a JSON answer")?;
            anyhow::Ok((status, body))
        }
    };
    // Every group's windows once the aggregator closed both minutes.
    let started = Instant::now();
    let by_gpu = loop {
        let (status, body) = read(usage("")).await?;
        if status == 200 && body["data"].as_array().is_some_and(|rows| rows.len() == 4) {
            break body;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the windows were never read: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let d = |text: &str| Decimal::from_str(text).unwrap_or_default();
    assert_eq!(
        quantities(&by_gpu),
        vec![
            ("a".into(), d("50")),
            ("b".into(), d("61")),
            ("a".into(), d("55")),
            ("b".into(), d("57.5"))
        ]
    );
    for (query, expected) in [
        ("group_by=", vec![d("61"), d("55")]),
        ("group_by=&window=hour", vec![d("55")]),
        ("group_by=&window=none", vec![d("55")]),
    ] {
        let (status, body) = read(usage(query)).await?;
        assert_eq!(status, 200, "{query}: {body}");
        let got: Vec<Decimal> = quantities(&body).into_iter().map(|(_, q)| q).collect();
        assert_eq!(got, expected, "{query}: {body}");
    }
    // The aggregator first: the api holds the broker.
    stop_aggregator.cancel();
    aggregator.wait().await?;
    api.stop().await
}
