//! The billing reads under load: how fast a fresh api replica catches up with the ledger and
//! rollups topics (against a raw consumer of the same records, in the same run), then the
//! latency of statement, balance and usage reads, and the process's peak RSS.
//!
//! One run, one broker (the embedded mock cluster):
//! 1. `NERUBA_BENCH_CUSTOMERS` (default 100,000) customers of tenant acme, each with a grant
//!    and a line item on the ledger and one rollup on the rollups topic;
//! 2. a raw consumer drains both topics (no-op handler): the least any replica does;
//! 3. the api starts with empty state and catches up; catch-up records/s vs the raw drain;
//! 4. one more customer gets a month of 1-minute windows on 3 series (129,600 rollups), in
//!    chunks the mock broker keeps (it retains about 100,000 messages and 5 MiB per
//!    partition, and one customer's rollups share one partition);
//! 5. one more customer billed for `NERUBA_BENCH_HISTORY_MONTHS` (default 24) months before
//!    this one, `NERUBA_BENCH_HISTORY_LINES` (default 500) groups a month, each month's
//!    statement final (ticks written into its partition, as the balances stage writes them);
//! 6. reads over HTTP on one keep-alive connection: statements and balances of random
//!    customers (SPEC target p99 ≤ 10 ms), the statement of one month of the customer with a
//!    history, whole in one page (the same target), and the usage customer's month at its
//!    1-minute windows, by hour and by day (target ≤ 50 ms), `NERUBA_BENCH_USAGE_READS`
//!    (default 50) times each;
//!    that statement walked 20 times a page of 1,000 lines at a time (the same target a
//!    page); and the history customer's line items of that month, walked page by page (no
//!    target: the whole walk's time says whether a page costs what it answers or the whole
//!    period);
//! 7. with `NERUBA_BENCH_OPEN_LINES` set, the history customer's statement of this month
//!    with that many lines, open (past 64 its lines kept apart from the book by the balances
//!    fold, a line a key, rather than in a final statement's runs), read whole and walked as
//!    the final one is;
//! 8. with `NERUBA_BENCH_TOPUPS` set, one more customer with that many top-ups of a cent,
//!    each used up by the next item, its grants walked 20 times in pages of 1,000;
//! 9. with `NERUBA_BENCH_WIDE_GROUPS` set, one more customer with that many groups in every
//!    1-minute window of `NERUBA_BENCH_WIDE_HOURS` hours (see [`wide`]).

// Latencies and rates in the report are floating point; no quantity or amount is.
#![allow(clippy::float_arithmetic)]

use anyhow::{Context, Result, bail};
use neruba::embedded::EmbeddedKafka;
use neruba_benches::{env_usize, peak_rss_kib, rate};
use neruba_schemas::credit::{self, Grant, GrantTerms, Tick};
use neruba_schemas::event::format_time_ms;
use neruba_schemas::ledger::{Kind, LineItem};
use neruba_schemas::rollup::Rollup;
use neruba_schemas::topics::{self, RECORD_HEADER, stable_partition};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 32;
const MINUTE: i64 = 60_000;

struct Record {
    topic: &'static str,
    key: String,
    payload: Vec<u8>,
    header: Option<&'static str>,
}

fn producer(bootstrap: &str) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "2000000")
        .create()?)
}

async fn send_all(producer: &FutureProducer, records: &[Record]) -> Result<()> {
    let mut pending = Vec::with_capacity(records.len());
    for r in records {
        let mut message = FutureRecord::to(r.topic)
            .key(r.key.as_bytes())
            .payload(r.payload.as_slice())
            .partition(stable_partition(&r.key, PARTITIONS));
        if let Some(value) = r.header {
            message = message.headers(OwnedHeaders::new().insert(Header {
                key: RECORD_HEADER,
                value: Some(value),
            }));
        }
        pending.push(
            producer
                .send_result(message)
                .map_err(|(e, _)| anyhow::anyhow!("enqueue: {e}"))?,
        );
    }
    for delivery in neruba_benches::join_in_order(pending).await {
        delivery?.map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    }
    Ok(())
}

fn rollup(customer: &str, group: &str, window: i64, period: (i64, i64)) -> Rollup {
    let (meter, group) = match group {
        "api" => ("api_calls", BTreeMap::new()),
        model => (
            "llm_tokens",
            BTreeMap::from([("model".to_owned(), model.to_owned())]),
        ),
    };
    Rollup {
        v: 1,
        tenant: "acme".into(),
        meter: meter.into(),
        customer: customer.into(),
        group,
        aggregation: if meter == "api_calls" {
            neruba_schemas::catalog::Aggregation::Count
        } else {
            neruba_schemas::catalog::Aggregation::Sum
        },
        window_start_ms: window,
        window_end_ms: window + MINUTE,
        period_start_ms: period.0,
        period_end_ms: period.1,
        window_quantity: Decimal::from(7),
        window_events: 1,
        period_quantity: Decimal::from(7),
        period_events: 1,
        revision: 1,
        latest_event: None,
    }
}

/// The workload: per customer a grant and a line item on the ledger, a rollup on the rollups
/// topic.
fn workload(customers: usize, period: (i64, i64)) -> Vec<Record> {
    let mut records = Vec::with_capacity(customers * 3);
    for c in 0..customers {
        let customer = format!("customer-{c}");
        let key = format!("acme/{customer}");
        records.push(grant_record(&customer, "pack", Decimal::from(20), period));
        let item = usage_item(
            &customer,
            format!("li_{c}"),
            ("model", "large".into()),
            period,
            Decimal::new(275, 2),
        );
        records.push(Record {
            topic: topics::LEDGER,
            key: key.clone(),
            payload: item.encode(),
            header: None,
        });
        records.push(Record {
            topic: topics::ROLLUPS,
            key,
            payload: rollup(&customer, "large", period.0, period).encode(),
            header: None,
        });
    }
    records
}

/// A grant to `customer` of `amount` USD keyed `key`, received at `period`'s start, as the
/// gateway writes it on the ledger.
fn grant_record(customer: &str, key: &str, amount: Decimal, period: (i64, i64)) -> Record {
    let grant = Grant {
        v: 1,
        id: credit::grant_id("acme", customer, key),
        tenant: "acme".into(),
        customer: customer.into(),
        key: key.into(),
        terms: GrantTerms {
            amount,
            currency: "USD".into(),
            priority: 10,
            effective_at: None,
            expires_at: None,
            paid: None,
            metadata: BTreeMap::new(),
        },
        received_at: format_time_ms(period.0),
    };
    Record {
        topic: topics::LEDGER,
        key: format!("acme/{customer}"),
        payload: credit::encode(&grant),
        header: Some("grant"),
    }
}

/// A usage item of `customer` for the first minute of `period`, 7 tokens in one group.
fn usage_item(
    customer: &str,
    id: String,
    (key, value): (&str, String),
    period: (i64, i64),
    amount: Decimal,
) -> LineItem {
    LineItem {
        v: 1,
        id,
        kind: Kind::Usage,
        tenant: "acme".into(),
        customer: customer.into(),
        meter: "llm_tokens".into(),
        group: BTreeMap::from([(key.to_owned(), value)]),
        period_start: format_time_ms(period.0),
        period_end: format_time_ms(period.1),
        window_start: format_time_ms(period.0),
        window_end: format_time_ms(period.0 + MINUTE),
        window_quantity: Decimal::from(7),
        window_events: 1,
        period_quantity: Decimal::from(7),
        amount,
        period_amount: amount,
        currency: "USD".into(),
        price_plan: "llm-tokens-standard".into(),
        price_version: 1,
        revision: 1,
        supersedes: None,
    }
}

/// `lines` line items of one cent, one per group (`project-<n>`), of `customer` in `period`,
/// their ids `li_h<month>_<n>` (of one length, as the rater's are).
fn cents(customer: &str, month: &str, period: (i64, i64), lines: usize) -> Vec<Record> {
    (0..lines)
        .map(|g| Record {
            topic: topics::LEDGER,
            key: format!("acme/{customer}"),
            payload: usage_item(
                customer,
                format!("li_h{month}_{g:08}"),
                ("project", format!("project-{g}")),
                period,
                Decimal::new(1, 2),
            )
            .encode(),
            header: None,
        })
        .collect()
}

/// High watermarks of both topics, per (topic, partition).
fn highs(consumer: &BaseConsumer) -> Result<Vec<(&'static str, i32, i64)>> {
    let mut out = Vec::new();
    for topic in [topics::LEDGER, topics::ROLLUPS] {
        for p in 0..PARTITIONS {
            let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5))?;
            out.push((topic, p, high));
        }
    }
    Ok(out)
}

/// Drains `expected` records of both topics with a no-op handler; the time from the first.
fn drain(bootstrap: &str, expected: usize) -> Result<Duration> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-raw-reads")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "20")
        .create()?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for topic in [topics::LEDGER, topics::ROLLUPS] {
        for p in 0..PARTITIONS {
            assignment.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
        }
    }
    consumer.assign(&assignment)?;
    let (mut seen, mut started) = (0usize, None);
    while seen < expected {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            message?;
            started.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    started.map(|s| s.elapsed()).context("nothing drained")
}

/// Waits until the api's models reached every high watermark.
async fn caught_up(api: &neruba_api::Running, want: &[(&'static str, i32, i64)]) -> Result<()> {
    let started = Instant::now();
    loop {
        let done = want.iter().all(|(topic, p, high)| {
            let model = if *topic == topics::LEDGER {
                &api.model
            } else {
                &api.rollups
            };
            model.position(*p).is_some_and(|at| at.next_offset >= *high)
        });
        if done {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the api did not catch up in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// p50, p99 and max of `samples`, in ms.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    (at(0.5), at(0.99), at(1.0))
}

async fn timed_get(client: &reqwest::Client, url: &str, key: &str) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let response = client.get(url).bearer_auth(key).send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    let elapsed = started.elapsed();
    if !status.is_success() {
        bail!("{url}: {status} {}", String::from_utf8_lossy(&body));
    }
    Ok((elapsed, body.len()))
}

/// `reads` reads of `url`: their times, and the size of the last answer.
async fn timed_gets(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    reads: usize,
) -> Result<(Vec<Duration>, usize)> {
    let mut samples = Vec::with_capacity(reads);
    let mut bytes = 0;
    for _ in 0..reads {
        let (elapsed, size) = timed_get(client, url, key).await?;
        samples.push(elapsed);
        bytes = size;
    }
    Ok((samples, bytes))
}

/// A read's JSON answer, refused unless it succeeded.
async fn get_json(client: &reqwest::Client, url: &str, key: &str) -> Result<serde_json::Value> {
    Ok(client
        .get(url)
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// The statement at `url` (one, `status`, of `lines` lines) read 200 times whole in one page
/// (the most a page holds), then walked 20 times a page of 1,000 lines (the default) at a
/// time, as a client walks it (and the console reads its first page).
async fn statement_reads(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    status: &str,
    lines: usize,
    label: &str,
) -> Result<()> {
    let whole = format!("{url}?limit=10000");
    let answer = get_json(client, &whole, key).await?;
    let lines_of = |answer: &serde_json::Value| {
        answer["statements"][0]["lines"]
            .as_array()
            .map_or(0, Vec::len)
    };
    if answer["statements"][0]["status"] != status || lines_of(&answer) != lines {
        bail!("{url}: not one {status} statement of {lines} lines: {answer}");
    }
    let mut samples = Vec::new();
    for _ in 0..200 {
        samples.push(timed_get(client, &whole, key).await?.0);
    }
    report(&format!("{label}, whole"), samples, "target p99 <= 10 ms");
    let (mut samples, mut walks) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let paged = format!("{url}?limit=1000");
        let (pages, walked) = walk(client, &paged, key, lines, lines_of).await?;
        samples.extend(pages);
        walks.push(walked);
    }
    report(
        &format!("{label}, each page of 1,000 lines in turn"),
        samples,
        "target p99 <= 10 ms",
    );
    report(
        &format!("  the whole walk of {lines} lines"),
        walks,
        "no target",
    );
    Ok(())
}

/// Every page of `url` in turn, through the cursors it answers, as a client walks them: each
/// page's time and the whole walk's. A walk that does not move on, or does not read exactly
/// `total` of what `count` counts in a page, fails.
async fn walk(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    total: usize,
    count: impl Fn(&serde_json::Value) -> usize,
) -> Result<(Vec<Duration>, Duration)> {
    let (mut samples, mut read, mut cursor) = (Vec::new(), 0, None::<String>);
    let walk = Instant::now();
    loop {
        let mut page = url.to_owned();
        if let Some(cursor) = &cursor {
            page.push_str(&format!("&cursor={cursor}"));
        }
        let started = Instant::now();
        let answer = get_json(client, &page, key).await?;
        samples.push(started.elapsed());
        read += count(&answer);
        match answer["next_cursor"].as_str() {
            Some(next) if read > total || cursor.as_deref() == Some(next) => {
                bail!("{url}: the walk does not end ({read} read)")
            }
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    if read != total {
        bail!("{url}: {read} read over the pages, not {total}");
    }
    Ok((samples, walk.elapsed()))
}

/// One line of latencies: p50, p99 and the slowest of `samples`.
fn report(name: &str, samples: Vec<Duration>, target: &str) {
    let count = samples.len();
    let (p50, p99, max) = percentiles(samples);
    println!(
        "{name:<44} {count:>5} reads  p50 {p50:>7.2} ms  p99 {p99:>7.2} ms  max {max:>7.2} ms  ({target})"
    );
}

/// A customer with many groups (`NERUBA_BENCH_WIDE_GROUPS`, default 0: not run) active in
/// every 1-minute window of `NERUBA_BENCH_WIDE_HOURS` hours (default 6), read by hour over
/// them, and the first page of 10,000 rows at its 1-minute windows, `NERUBA_BENCH_WIDE_READS`
/// times each (default 10): reads whose windows of an hour are more than a read holds at once.
async fn wide(
    setup: &FutureProducer,
    api: &neruba_api::Running,
    probe: &BaseConsumer,
    client: &reqwest::Client,
    base: &str,
    key: &str,
    period: (i64, i64),
) -> Result<()> {
    let groups = env_usize("NERUBA_BENCH_WIDE_GROUPS", 0);
    if groups == 0 {
        return Ok(());
    }
    let hours = i64::try_from(env_usize("NERUBA_BENCH_WIDE_HOURS", 6))?;
    let customer = "customer-wide";
    let mut chunk = Vec::new();
    let mut sent = 0usize;
    let loading = Instant::now();
    for w in 0..hours * 60 {
        for g in 0..groups {
            chunk.push(Record {
                topic: topics::ROLLUPS,
                key: format!("acme/{customer}"),
                payload: rollup(customer, &format!("m{g}"), period.0 + w * MINUTE, period).encode(),
                header: None,
            });
        }
        if chunk.len() >= 30_000 || w + 1 == hours * 60 {
            send_all(setup, &chunk).await?;
            sent += chunk.len();
            chunk.clear();
            caught_up(api, &highs(probe)?).await?;
        }
    }
    let loaded = loading.elapsed();
    println!(
        "{customer}: {sent} rollups ({groups} groups x {} one-minute windows) in {loaded:.2?}",
        hours * 60
    );
    let (from, to) = (
        format_time_ms(period.0),
        format_time_ms(period.0 + hours * 60 * MINUTE),
    );
    let reads = env_usize("NERUBA_BENCH_WIDE_READS", 10);
    for (name, window) in [
        ("by hour", "&window=hour"),
        ("first 10,000 rows at 1-minute windows", "&limit=10000"),
    ] {
        let url = format!(
            "{base}/v1/usage?customer={customer}&meter=llm_tokens&from={from}&to={to}&group_by=model{window}"
        );
        let (samples, bytes) = timed_gets(client, &url, key, reads).await?;
        report(
            &format!("{customer}, {hours} hours {name} ({} KiB)", bytes / 1024),
            samples,
            "no target",
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let customers = env_usize("NERUBA_BENCH_CUSTOMERS", 100_000);
    let kafka = EmbeddedKafka::start(&[
        (topics::LEDGER, PARTITIONS),
        (topics::ROLLUPS, PARTITIONS),
        (topics::DEAD_LETTER, 1),
    ])?;
    let bootstrap = kafka.bootstrap_servers().to_owned();
    let now = neruba_schemas::event::now_ms();
    let period = neruba_schemas::window::period_bounds(now, 1, 0).context("period")?;
    let records = workload(customers, period);
    let n = records.len();
    let setup = producer(&bootstrap)?;
    send_all(&setup, &records).await?;
    drop(records);
    println!(
        "produced {n} records ({customers} customers: a grant and a line item on the ledger, a rollup)"
    );

    let drained = {
        let bootstrap = bootstrap.clone();
        tokio::task::spawn_blocking(move || drain(&bootstrap, n)).await??
    };
    let probe = neruba_kafka::clients::metadata_probe(&bootstrap, &[])?;
    let want = highs(&probe)?;

    let state = tempfile::tempdir()?;
    let shutdown = CancellationToken::new();
    // A run that fails stops the stage too, else the runtime waits on its workers for ever.
    let _stop_on_failure = shutdown.clone().drop_guard();
    let registry = prometheus::Registry::new();
    let api = neruba_api::start(
        neruba_api::Config::new(
            &bootstrap,
            state.path(),
            ([127, 0, 0, 1], 0).into(),
            "bench",
        ),
        neruba::sample::catalog()?,
        &registry,
        shutdown.clone(),
    )
    .await?;
    let started = Instant::now();
    caught_up(&api, &want).await?;
    let caught = started.elapsed();
    let (raw_rate, api_rate) = (rate(n, drained), rate(n, caught));
    println!(
        "raw consumer of both topics:   {n} records in {drained:.2?} = {raw_rate:.0} records/s"
    );
    println!(
        "api catch-up from empty state: {n} records in {caught:.2?} = {api_rate:.0} records/s ({:.2} x the raw consumer; includes the api's start)",
        api_rate / raw_rate
    );

    // One customer's month of 1-minute windows on three series, in chunks the broker keeps.
    let heavy = "customer-heavy";
    let windows = (period.1 - period.0) / MINUTE;
    let mut chunk = Vec::new();
    let mut sent = 0usize;
    let loading = Instant::now();
    for w in 0..windows {
        for group in ["large", "small", "api"] {
            chunk.push(Record {
                topic: topics::ROLLUPS,
                key: format!("acme/{heavy}"),
                payload: rollup(heavy, group, period.0 + w * MINUTE, period).encode(),
                header: None,
            });
        }
        if chunk.len() >= 30_000 || w + 1 == windows {
            send_all(&setup, &chunk).await?;
            sent += chunk.len();
            chunk.clear();
            caught_up(&api, &highs(&probe)?).await?;
        }
    }
    let loaded = loading.elapsed();
    println!(
        "{heavy}: {sent} rollups ({windows} one-minute windows x 3 series) in the read model in {loaded:.2?} = {:.0} rollups/s (sent in chunks of 30,000, each awaited)",
        rate(sent, loaded)
    );

    // One customer billed for months before this one, each month's items followed by ticks at
    // its period's end and the default finalisation delay on (its statement draft, then
    // final), a month at a time.
    let history = "customer-history";
    let (months, lines) = (
        env_usize("NERUBA_BENCH_HISTORY_MONTHS", 24),
        env_usize("NERUBA_BENCH_HISTORY_LINES", 500),
    );
    let mut periods = Vec::with_capacity(months);
    let mut before = period.0;
    for _ in 0..months {
        let earlier = neruba_schemas::window::period_bounds(before - 1, 1, 0).context("period")?;
        periods.push(earlier);
        before = earlier.0;
    }
    periods.reverse();
    for (m, month_period) in periods.iter().enumerate() {
        let mut chunk = cents(history, &format!("{m:03}"), *month_period, lines);
        for at_ms in [
            month_period.1,
            month_period.1 + credit::DEFAULT_FINALIZE_AFTER_MS,
        ] {
            chunk.push(Record {
                topic: topics::LEDGER,
                key: format!("acme/{history}"),
                payload: credit::encode(&Tick {
                    v: 1,
                    at_ms,
                    finalize_after_ms: None,
                }),
                header: Some("tick"),
            });
        }
        send_all(&setup, &chunk).await?;
        caught_up(&api, &highs(&probe)?).await?;
    }
    println!(
        "{history}: {months} months of {lines} line items each, every month's statement final"
    );
    // With `NERUBA_BENCH_OPEN_LINES`, this month's items too: its statement open, its lines
    // in the book.
    let open_lines = env_usize("NERUBA_BENCH_OPEN_LINES", 0);
    if open_lines > 0 {
        let chunk = cents(history, "opn", period, open_lines);
        send_all(&setup, &chunk).await?;
        caught_up(&api, &highs(&probe)?).await?;
        println!("{history}: this month's statement open with {open_lines} lines");
    }
    // With `NERUBA_BENCH_TOPUPS`, one more customer who bought that many top-ups of a cent,
    // each used up by the next item: its grants list, read a page at a time.
    let topups = env_usize("NERUBA_BENCH_TOPUPS", 0);
    let topped_up = "customer-topups";
    if topups > 0 {
        let mut chunk = Vec::with_capacity(2 * topups);
        for (n, item) in cents(topped_up, "top", period, topups)
            .into_iter()
            .enumerate()
        {
            let key = format!("topup-{n:06}");
            chunk.push(grant_record(topped_up, &key, Decimal::new(1, 2), period));
            chunk.push(item);
        }
        send_all(&setup, &chunk).await?;
        caught_up(&api, &highs(&probe)?).await?;
        println!("{topped_up}: {topups} top-ups of a cent, each used up by the next item");
    }

    let client = reqwest::Client::new();
    let base = format!("http://{}", api.local_addr);
    let key = neruba::sample::dev_key("acme", "read").context("read key")?;
    let month = format_time_ms(period.0)
        .get(..7)
        .context("month")?
        .to_owned();
    let reads = env_usize("NERUBA_BENCH_READS", 2_000);
    let (mut statements, mut balances) = (Vec::new(), Vec::new());
    for i in 0..reads {
        // A spread of customers (a fixed stride through them, no RNG needed).
        let c = (i * 7919) % customers;
        let url = format!("{base}/v1/customers/customer-{c}/statements/{month}");
        statements.push(timed_get(&client, &url, key).await?.0);
        let url = format!("{base}/v1/customers/customer-{c}/balances");
        balances.push(timed_get(&client, &url, key).await?.0);
    }
    report(
        "statement (GET …/statements/{month})",
        statements,
        "target p99 <= 10 ms",
    );
    report("balance (GET …/balances)", balances, "target p99 <= 10 ms");
    if let Some(middle) = periods.get(months / 2) {
        let month = format_time_ms(middle.0)
            .get(..7)
            .context("month")?
            .to_owned();
        let url = format!("{base}/v1/customers/{history}/statements/{month}");
        let label = format!("statement of one month of {months} final");
        statement_reads(&client, &url, key, "final", lines, &label).await?;
        // The same month's line items, every page in turn as a client walks them.
        let url = format!("{base}/v1/customers/{history}/line-items?period={month}&limit=100");
        let items_of = |answer: &serde_json::Value| answer["items"].as_array().map_or(0, Vec::len);
        let (samples, walked) = walk(&client, &url, key, lines, items_of).await?;
        report(
            "line items, one month, each page of 100 in turn",
            samples,
            "no target",
        );
        println!(
            "  all {lines} items in {:.1} ms",
            walked.as_secs_f64() * 1e3
        );
    }
    if open_lines > 0 {
        let url = format!("{base}/v1/customers/{history}/statements/{month}");
        let label = "statement of this month, open";
        statement_reads(&client, &url, key, "open", open_lines, label).await?;
    }
    if topups > 0 {
        let url = format!("{base}/v1/customers/{topped_up}/grants?limit=1000");
        let grants_of =
            |answer: &serde_json::Value| answer["grants"].as_array().map_or(0, Vec::len);
        let (mut pages, mut walks) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            let (samples, walked) = walk(&client, &url, key, topups, grants_of).await?;
            pages.extend(samples);
            walks.push(walked);
        }
        report(
            &format!("grants of {topups} used-up top-ups, each page of 1,000 in turn"),
            pages,
            "no target",
        );
        report("  the whole walk", walks, "no target");
    }
    let (from, to) = (format_time_ms(period.0), format_time_ms(period.1));
    let usage_reads = env_usize("NERUBA_BENCH_USAGE_READS", 50);
    for (name, window) in [
        ("usage, one month at 1-minute windows", ""),
        ("usage, one month by hour", "&window=hour"),
        ("usage, one month by day", "&window=day"),
    ] {
        let url = format!(
            "{base}/v1/usage?customer={heavy}&meter=llm_tokens&from={from}&to={to}&group_by=model{window}"
        );
        let (samples, bytes) = timed_gets(&client, &url, key, usage_reads).await?;
        report(
            &format!("{name} ({} KiB)", bytes / 1024),
            samples,
            "target <= 50 ms",
        );
    }
    wide(&setup, &api, &probe, &client, &base, key, period).await?;
    println!(
        "peak RSS of the process:       {} MiB",
        peak_rss_kib() / 1024
    );
    shutdown.cancel();
    api.wait().await?;
    Ok(())
}
