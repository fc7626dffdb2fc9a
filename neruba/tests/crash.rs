//! Nothing lost, nothing counted twice, on a real broker, with every component killed at random.
//!
//! A tansu broker process; the gateway, an aggregator, a rater and a balances stage as
//! separate `neruba` processes. A generated workload (two tenants, several customers and meters, ~10 % repeated
//! ids, events arriving minutes out of order so windows are revised, batches of 1 to 60) is
//! posted over HTTP while a killer SIGKILLs a random component every second or two and
//! restarts it. Clients retry a request until it is answered, as a real SDK does. At the end,
//! the ledger (deduplicated by id; a repeated id must carry identical content) must equal,
//! per tenant, customer, meter, group and billing period and to the cent, the price of the
//! aggregate of the distinct events the gateway answered `accepted`. Prepaid credit is granted
//! to some customers before and during the run (repeated by retries), and every customer's
//! balance entries (deduplicated by id; a repeat must be identical) must equal, entry for
//! entry, the fold the test computes itself from the ledger's records in partition order.
//! The posting takes 15 s at least, and no stage may have logged input records skipped (in
//! every test here: the producers write one record per batch, for tansu's sake: see
//! `common::Broker`).
//!
//! `NERUBA_CRASH_EVENTS` (default 4,000) sizes the run; a soak is `NERUBA_CRASH_EVENTS=40000`;
//! `NERUBA_CRASH_SEED` picks another workload.

mod common;

use anyhow::{Context, Result, bail};
use common::{Broker, Proc, free_port};
use neruba_balances::book::Book;
use neruba_rater::price::{plan_in_force, price};
use neruba_schemas::Catalog;
use neruba_schemas::credit::{self, BalanceEntry, Grant};
use neruba_schemas::ledger::LineItem;
use neruba_schemas::topics::RECORD_HEADER;
use rdkafka::Message;
use rdkafka::message::Headers;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

/// Per (tenant, customer), its balance entries in sequence order.
type Entries = BTreeMap<(String, String), Vec<BalanceEntry>>;

/// A grant the run makes: tenant, customer, key, amount, currency, priority.
type GrantSpec = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    u16,
);

/// (tenant, customer, meter, group as `k=v,...`, period start) → amount.
type Ledger = BTreeMap<(String, String, String, String, String), Decimal>;

/// A small deterministic generator (xorshift), so a failing run can be repeated by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One generated event with its tenant.
#[derive(Clone)]
struct Generated {
    tenant: &'static str,
    body: Value,
}

fn generate(rng: &mut Rng, i: usize, now_ms: i64, earlier: &[Generated]) -> Generated {
    if i > 20 && rng.below(10) == 0 {
        // A repeat of an earlier id, same content (a retry from another SDK path).
        return earlier[usize::try_from(rng.below(earlier.len() as u64)).unwrap_or(0)].clone();
    }
    // Times over the 30 to 5 minutes before the run, in random order: windows close while
    // older events still arrive, so revisions and adjustments happen throughout.
    let time = neruba_schemas::event::format_time_ms(
        now_ms - 5 * 60_000 - i64::try_from(rng.below(25 * 60_000)).unwrap_or(0),
    );
    let customer = format!("c-{}", rng.below(5));
    match rng.below(3) {
        0 => Generated {
            tenant: "acme",
            body: json!({"specversion": "1.0", "id": format!("t-{i}"), "type": "llm.completion",
                "subject": customer, "time": time,
                "data": {"model": if rng.below(2) == 0 { "large" } else { "small" },
                         "tokens": format!("{}.{}", rng.below(400_000), rng.below(10)),
                         "status": if rng.below(8) == 0 { "error" } else { "ok" }}}),
        },
        1 => Generated {
            tenant: "acme",
            body: json!({"specversion": "1.0", "id": format!("a-{i}"), "type": "api.request",
                "subject": customer, "time": time, "data": {}}),
        },
        _ => Generated {
            tenant: "globex",
            body: json!({"specversion": "1.0", "id": format!("s-{i}"), "type": "storage.usage",
                "subject": customer, "time": time,
                "data": {"region": if rng.below(2) == 0 { "eu-west" } else { "us-east" },
                         "gb_hours": format!("{}.{:02}", rng.below(700), rng.below(100))}}),
        },
    }
}

/// `n` generated events, repeats included.
fn generate_all(rng: &mut Rng, n: usize, now_ms: i64) -> Vec<Generated> {
    let mut generated: Vec<Generated> = Vec::with_capacity(n);
    for i in 0..n {
        let event = generate(rng, i, now_ms, &generated);
        generated.push(event);
    }
    generated
}

/// Distinct `(tenant, id)` the gateway answered `accepted`, with the event (the generator never
/// gives two customers one id, so this is also per customer, as dedup counts).
type Accepted = HashMap<(String, String), Generated>;

/// What the sample catalog's meters make of the accepted events, priced: the ground truth.
fn truth(accepted: &Accepted, catalog: &Catalog) -> Result<Ledger> {
    let mut quantities: BTreeMap<(String, String, String, String, String), Decimal> =
        BTreeMap::new();
    for event in accepted.values() {
        let data = &event.body["data"];
        let time_ms =
            neruba_schemas::event::parse_time_ms(event.body["time"].as_str().context("time")?)
                .map_err(|r| anyhow::anyhow!(r.message))?;
        let (period_start, _) =
            neruba_schemas::window::period_bounds(time_ms, 1, 0).context("period of the event")?;
        let period = neruba_schemas::event::format_time_ms(period_start);
        let customer = event.body["subject"]
            .as_str()
            .context("subject")?
            .to_owned();
        let decimal = |v: &Value| -> Result<Decimal> {
            neruba_schemas::decimal::parse_exact(v.as_str().context("value")?)
                .context("exact decimal")
        };
        let (meter, group, quantity) = match event.body["type"].as_str() {
            Some("llm.completion") if data["status"] == "ok" => (
                "llm_tokens",
                format!("model={}", data["model"].as_str().unwrap_or_default()),
                decimal(&data["tokens"])?,
            ),
            Some("api.request") => ("api_calls", String::new(), Decimal::ONE),
            Some("storage.usage") => (
                "storage_gb_hours",
                format!("region={}", data["region"].as_str().unwrap_or_default()),
                decimal(&data["gb_hours"])?,
            ),
            _ => continue,
        };
        *quantities
            .entry((
                event.tenant.to_owned(),
                customer,
                meter.to_owned(),
                group,
                period,
            ))
            .or_default() += quantity;
    }
    let mut priced = Ledger::new();
    for (key, quantity) in quantities {
        let tenant = catalog.tenant(&key.0).context("tenant")?;
        let day = time::Date::parse(
            key.4.get(..10).context("period")?,
            &time::macros::format_description!("[year]-[month]-[day]"),
        )?;
        let plan = plan_in_force(&tenant.price_plans, &key.2, day).context("plan")?;
        let precision = catalog.precision(&plan.currency).context("currency")?;
        priced.insert(key, price(plan, quantity, precision)?.amount);
    }
    Ok(priced)
}

/// The ledger topic read from the beginning until quiet, deduplicated by id, summed per period.
fn read_ledger(bootstrap: &str) -> Result<(Ledger, usize, usize)> {
    // Everything there is: read until nothing arrived for two seconds.
    let messages = neruba::embedded::read_topic(
        bootstrap,
        "neruba.ledger",
        0,
        Duration::from_secs(2),
        Duration::from_secs(120),
    )?;
    let mut items: HashMap<String, LineItem> = HashMap::new();
    // Grants share the topic (they carry a record header); they are not items.
    for message in messages.iter().filter(|m| record_header(m).is_none()) {
        let item = LineItem::decode(message.payload().unwrap_or_default())?;
        if let Some(earlier) = items.get(&item.id) {
            if *earlier != item {
                bail!("line item {} repeated with different content", item.id);
            }
        } else {
            items.insert(item.id.clone(), item);
        }
    }
    let mut ledger = Ledger::new();
    for item in items.values() {
        let group: Vec<String> = item.group.iter().map(|(k, v)| format!("{k}={v}")).collect();
        *ledger
            .entry((
                item.tenant.clone(),
                item.customer.clone(),
                item.meter.clone(),
                group.join(","),
                item.period_start.clone(),
            ))
            .or_default() += item.amount;
    }
    Ok((ledger, items.len(), messages.len()))
}

/// The `neruba-record` header of a ledger message (`None`: a line item).
fn record_header(message: &rdkafka::message::OwnedMessage) -> Option<Vec<u8>> {
    message.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == RECORD_HEADER)
            .map(|h| h.value.unwrap_or_default().to_vec())
    })
}

/// Per customer, the balance entries a fresh fold of the ledger's records gives, in the order
/// of each partition (line items deduplicated by id, as the stage does).
fn fold_ledger(bootstrap: &str) -> Result<Entries> {
    let mut messages = neruba::embedded::read_topic(
        bootstrap,
        "neruba.ledger",
        0,
        Duration::from_secs(2),
        Duration::from_secs(120),
    )?;
    messages.sort_by_key(|m| (m.partition(), m.offset()));
    let mut books: HashMap<(String, String), Book> = HashMap::new();
    let mut applied = std::collections::HashSet::new();
    let mut entries = Entries::new();
    // Each partition's clock: its latest tick (the stage starts it at the earliest time).
    let mut clocks: HashMap<i32, i64> = HashMap::new();
    let mut partition_of: HashMap<(String, String), i32> = HashMap::new();
    for message in &messages {
        let payload = message.payload().unwrap_or_default();
        let clock = clocks
            .get(&message.partition())
            .copied()
            .unwrap_or(i64::MIN);
        let (who, produced) = match record_header(message).as_deref() {
            // A tick (the stage writes one when a deadline passed: a period ended, say, as
            // when a run spans the end of a month) acts on every customer of its partition
            // whose book has a deadline by then, as the stage's deadline index does.
            Some(b"tick") => {
                let tick: credit::Tick = credit::decode(payload)?;
                if tick.at_ms <= clock {
                    continue;
                }
                clocks.insert(message.partition(), tick.at_ms);
                let finalize_after = tick
                    .finalize_after_ms
                    .unwrap_or(credit::DEFAULT_FINALIZE_AFTER_MS);
                for ((tenant, customer), book) in &mut books {
                    let here = partition_of.get(&(tenant.clone(), customer.clone()));
                    if here == Some(&message.partition())
                        && book.next_deadline().is_some_and(|at| at <= tick.at_ms)
                    {
                        let produced =
                            book.apply_tick(tenant, customer, tick.at_ms, 0, finalize_after);
                        entries
                            .entry((tenant.clone(), customer.clone()))
                            .or_default()
                            .extend(produced);
                    }
                }
                continue;
            }
            None => {
                let item = LineItem::decode(payload)?;
                let who = (item.tenant.clone(), item.customer.clone());
                if !applied.insert((who.clone(), item.id.clone())) {
                    continue;
                }
                let produced = books.entry(who.clone()).or_default().apply_item(&item);
                (who, produced)
            }
            Some(b"grant") => {
                let grant: Grant = credit::decode(payload)?;
                let who = (grant.tenant.clone(), grant.customer.clone());
                let produced = books
                    .entry(who.clone())
                    .or_default()
                    .apply_grant(&grant, clock, 0);
                (who, produced)
            }
            Some(other) => bail!(
                "unexpected ledger record {:?}",
                String::from_utf8_lossy(other)
            ),
        };
        partition_of.insert(who.clone(), message.partition());
        entries.entry(who).or_default().extend(produced);
    }
    Ok(entries)
}

/// Per customer, the balance entries on the topic, each id once (a repeat must be identical),
/// in sequence order.
fn read_entries(bootstrap: &str) -> Result<(Entries, usize)> {
    let messages = neruba::embedded::read_topic(
        bootstrap,
        "neruba.balance-entries",
        0,
        Duration::from_secs(2),
        Duration::from_secs(120),
    )?;
    let mut by_id: HashMap<String, BalanceEntry> = HashMap::new();
    for message in &messages {
        let entry: BalanceEntry = credit::decode(message.payload().unwrap_or_default())?;
        if let Some(earlier) = by_id.get(&entry.id) {
            if *earlier != entry {
                bail!("balance entry {} repeated with different content", entry.id);
            }
        } else {
            by_id.insert(entry.id.clone(), entry);
        }
    }
    let mut entries: BTreeMap<(String, String), Vec<BalanceEntry>> = BTreeMap::new();
    for entry in by_id.into_values() {
        entries
            .entry((entry.tenant.clone(), entry.customer.clone()))
            .or_default()
            .push(entry);
    }
    for list in entries.values_mut() {
        list.sort_by_key(|e| e.seq);
    }
    Ok((entries, messages.len()))
}

/// Grants `amount` of `currency` to `customer` of `tenant` with idempotency key `key`,
/// retrying until the gateway answers 202 (a retry of the same key is the same grant).
async fn grant_until_answered(
    client: &reqwest::Client,
    base: &str,
    (tenant, customer, key, amount, currency, priority): GrantSpec,
) -> Result<()> {
    let credits_key = neruba::sample::dev_key(tenant, "credits").context("credits key")?;
    let started = Instant::now();
    loop {
        let answered = client
            .post(format!("{base}/v1/customers/{customer}/grants"))
            .bearer_auth(credits_key)
            .timeout(Duration::from_secs(10))
            .json(
                &json!({"key": key, "amount": amount, "currency": currency, "priority": priority}),
            )
            .send()
            .await;
        if answered.is_ok_and(|r| r.status().as_u16() == 202) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("a grant went unanswered for two minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Pipeline {
    gateway: Proc,
    aggregator: Proc,
    rater: Proc,
    balances: Proc,
    base: String,
    /// The aggregator's and the rater's operations endpoints (`/readyz`, `/metrics`).
    aggregator_ops: String,
    rater_ops: String,
}

fn pipeline(bootstrap: &str, work: &Path) -> Result<Pipeline> {
    let binary = Path::new(env!("CARGO_BIN_EXE_neruba"));
    let catalog = work.join("catalog.toml");
    std::fs::write(&catalog, neruba::sample::CATALOG_TOML)?;
    let catalog = catalog.display().to_string();
    let port = free_port()?;
    // One record per record batch, from every producer whose topic a stage reads: tansu's
    // in-memory engine answers a fetch that starts inside a batch with the next batch,
    // skipping the rest of it (a resume at a stored offset inside a producer's batch lost
    // records, which the stages now report; Kafka returns the whole batch and the client drops
    // what lies before the offset). The soak checks Neruba, not that defect.
    let one_per_batch = ["--kafka-opt", "batch.num.messages=1"];
    let common = |extra: &[&str]| -> Vec<String> {
        let mut args = vec![
            "--brokers".to_owned(),
            bootstrap.to_owned(),
            "--catalog".to_owned(),
            catalog.clone(),
        ];
        args.extend(one_per_batch.iter().map(|s| (*s).to_owned()));
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let state = work.join("state");
    let (aggregator_ops, rater_ops, balances_ops) = (
        format!("127.0.0.1:{}", free_port()?),
        format!("127.0.0.1:{}", free_port()?),
        format!("127.0.0.1:{}", free_port()?),
    );
    let mut gateway_args = vec!["gateway".to_owned()];
    gateway_args.extend(common(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--delivery-timeout",
        "5s",
    ]));
    let mut aggregator_args = vec!["aggregator".to_owned()];
    aggregator_args.extend(common(&[
        "--state-dir",
        &state.join("aggregator").display().to_string(),
        "--ops-listen",
        &aggregator_ops,
        "--grace",
        "0s",
        "--idle-timeout",
        "1s",
        "--max-batch",
        "300",
        // Static assignment: a restarted instance takes its partitions back at once, without
        // the group protocol (tansu does not expire a killed member's session).
        "--assign",
        "all",
    ]));
    let mut rater_args = vec!["rater".to_owned()];
    rater_args.extend(common(&[
        "--state-dir",
        &state.join("rater").display().to_string(),
        "--ops-listen",
        &rater_ops,
        "--rater-assign",
        "all",
    ]));
    let balances_args: Vec<String> = [
        "balances",
        "--brokers",
        bootstrap,
        "--state-dir",
        &state.join("balances").display().to_string(),
        "--ops-listen",
        &balances_ops,
        "--balances-assign",
        "all",
        one_per_batch[0],
        one_per_batch[1],
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    Ok(Pipeline {
        gateway: Proc::new("gateway", binary, &gateway_args, work),
        aggregator: Proc::new("aggregator", binary, &aggregator_args, work),
        rater: Proc::new("rater", binary, &rater_args, work),
        balances: Proc::new("balances", binary, &balances_args, work),
        base: format!("http://127.0.0.1:{port}"),
        aggregator_ops: format!("http://{aggregator_ops}"),
        rater_ops: format!("http://{rater_ops}"),
    })
}

impl Pipeline {
    fn procs(&mut self) -> [&mut Proc; 4] {
        [
            &mut self.gateway,
            &mut self.aggregator,
            &mut self.rater,
            &mut self.balances,
        ]
    }

    /// What the stages logged of input records the broker skipped (the stage runtime's
    /// check: a message past the offset after the last one applied, or after the stored
    /// one). Any is data lost before a stage read it, whatever the totals say after. The
    /// rater reads the compacted rollups topic, which is not checked.
    fn skipped_records(&self) -> Option<String> {
        let lines: Vec<String> = [&self.aggregator, &self.balances]
            .iter()
            .flat_map(|process| process.log_lines_with(neruba_stage::SKIPPED_RECORDS_LOG))
            .collect();
        if lines.is_empty() {
            return None;
        }
        Some(format!(
            "{} times a stage's input skipped records (the broker delivered past the offset \
             asked for; tansu's in-memory engine does when a fetch starts inside a record \
             batch), the first ones:\n{}",
            lines.len(),
            lines[..lines.len().min(10)].join("\n")
        ))
    }

    /// The ledger settled equal to the ground truth, and no stage logged records skipped.
    fn settled(
        &self,
        got: &Ledger,
        expected: &Ledger,
        distinct: usize,
        messages: usize,
    ) -> Result<()> {
        assert_eq!(
            got,
            expected,
            "{distinct} items in {messages} messages; {}",
            self.skipped_report()
        );
        if let Some(skipped) = self.skipped_records() {
            bail!("{skipped}");
        }
        Ok(())
    }

    /// [`Self::skipped_records`] for a failure's message.
    fn skipped_report(&self) -> String {
        self.skipped_records()
            .unwrap_or_else(|| "no stage logged skipped input records".to_owned())
    }
}

/// A tansu broker with the pipeline's topics (`partitions` each), and the three components
/// started, once the gateway listens.
async fn start_all(work: &Path, partitions: i32) -> Result<(Broker, Pipeline)> {
    let broker = Broker::start(work)?;
    broker
        .create_topics(&[
            ("neruba.events", partitions),
            ("neruba.rollups", partitions),
            ("neruba.ledger", partitions),
            ("neruba.balance-entries", partitions),
            ("neruba.dead-letter", 1),
        ])
        .await?;
    let mut pipeline = pipeline(&broker.bootstrap, work)?;
    for process in pipeline.procs() {
        process.start()?;
    }
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if client
            .get(format!("{}/healthz", pipeline.base))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((broker, pipeline))
}

/// Posts a batch of one tenant's events until the gateway answers it, and records the ones it
/// answered `accepted`.
async fn post_until_answered(
    client: &reqwest::Client,
    base: &str,
    batch: &[Generated],
    accepted: &mut Accepted,
) -> Result<()> {
    let Some(tenant) = batch.first().map(|g| g.tenant) else {
        return Ok(());
    };
    let statuses = post_batch(client, base, tenant, batch).await?;
    for (event, status) in batch.iter().zip(&statuses) {
        if status == "accepted" {
            let id = event.body["id"].as_str().unwrap_or_default().to_owned();
            accepted.insert((tenant.to_owned(), id), event.clone());
        }
    }
    Ok(())
}

/// Each event's status, once the gateway answered (retrying while it is down or restarting).
async fn post_batch(
    client: &reqwest::Client,
    base: &str,
    tenant: &str,
    batch: &[Generated],
) -> Result<Vec<String>> {
    let started = Instant::now();
    loop {
        if let Ok((status, body)) =
            post_once(client, base, tenant, batch, Duration::from_secs(10)).await
            && (200..300).contains(&status)
        {
            return Ok(body["results"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| r["status"].as_str().unwrap_or("?").to_owned())
                .collect());
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("a batch went unanswered for two minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_equals_ground_truth_after_random_kills_of_every_component() -> Result<()> {
    let events: usize = std::env::var("NERUBA_CRASH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4_000);
    let seed: u64 = std::env::var("NERUBA_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0001);
    let work = tempfile::tempdir()?;
    let (broker, pipeline) = start_all(work.path(), 4).await?;
    let client = reqwest::Client::new();

    let mut rng = Rng(seed);
    let generated = generate_all(&mut rng, events, neruba_schemas::event::now_ms());
    let mut accepted = Accepted::new();
    // The killer runs beside the clients: a component dies at any moment, mid-request too.
    let base = pipeline.base.clone();
    let pipeline = std::sync::Arc::new(tokio::sync::Mutex::new(pipeline));
    let posting_done = tokio_util::sync::CancellationToken::new();
    let killer = {
        let pipeline = pipeline.clone();
        let done = posting_done.clone();
        let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        tokio::spawn(async move {
            let mut kills = 0u32;
            loop {
                let pause = Duration::from_millis(500 + rng.below(1500));
                tokio::select! {
                    () = done.cancelled() => return Ok::<u32, anyhow::Error>(kills),
                    () = tokio::time::sleep(pause) => {}
                }
                let victim = usize::try_from(rng.below(4)).unwrap_or(0);
                let mut pipeline = pipeline.lock().await;
                let process = &mut pipeline.procs()[victim];
                process.kill()?;
                tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
                process.start()?;
                kills += 1;
            }
        })
    };
    // Prepaid credit for some customers: granted up front, and a second grant mid-run (while
    // components die), each retried until answered.
    let grants: [GrantSpec; 3] = [
        ("acme", "c-0", "pack-1", "3.50", "USD", 10),
        ("acme", "c-1", "promo", "0.75", "USD", 1),
        ("globex", "c-2", "pack-1", "40", "EUR", 10),
    ];
    for grant in grants {
        grant_until_answered(&client, &base, grant).await?;
    }
    // The posting takes 15 s at least, so the killer (every 0.5–2 s) strikes throughout it:
    // with one record per producer batch nothing lingers, and 4,000 events went in 3 s.
    let posting = Instant::now();
    let least = Duration::from_secs(15);
    let mut cursor = 0;
    let mut granted_mid_run = false;
    while cursor < generated.len() {
        let due = least * u32::try_from(cursor)? / u32::try_from(generated.len())?;
        if let Some(early) = due.checked_sub(posting.elapsed()) {
            tokio::time::sleep(early).await;
        }
        if !granted_mid_run && cursor > generated.len() / 2 {
            grant_until_answered(&client, &base, ("acme", "c-0", "pack-2", "5", "USD", 5)).await?;
            granted_mid_run = true;
        }
        // Batches of one tenant, 1 to 60 events.
        let tenant = generated[cursor].tenant;
        let size = usize::try_from(1 + rng.below(60)).unwrap_or(1);
        let batch: Vec<Generated> = generated[cursor..]
            .iter()
            .take(size)
            .take_while(|g| g.tenant == tenant)
            .cloned()
            .collect();
        cursor += batch.len();
        post_until_answered(&client, &base, &batch, &mut accepted).await?;
    }
    posting_done.cancel();
    let kills = killer.await??;
    let mut pipeline = pipeline.lock().await;
    for process in pipeline.procs() {
        if !process.running() {
            bail!("exited on its own: {}", process.exit_report(40));
        }
    }

    let catalog = neruba::sample::catalog()?;
    let expected = truth(&accepted, &catalog)?;
    let (got, distinct, messages) = settle_ledger(&broker.bootstrap, &expected).await?;
    println!(
        "{} events posted, {} distinct accepted, {kills} kills survived ({} gateway, {} aggregator, {} rater, {} balances starts); \
         ledger: {messages} messages, {distinct} distinct items, {} periods",
        generated.len(),
        accepted.len(),
        pipeline.gateway.starts,
        pipeline.aggregator.starts,
        pipeline.rater.starts,
        pipeline.balances.starts,
        expected.len()
    );
    if got != expected {
        let mut differences = Vec::new();
        for (key, amount) in &expected {
            if got.get(key) != Some(amount) {
                differences.push(format!(
                    "{key:?}: expected {amount}, ledger {:?}",
                    got.get(key)
                ));
            }
        }
        for key in got.keys().filter(|k| !expected.contains_key(*k)) {
            differences.push(format!("{key:?}: not expected, ledger {:?}", got.get(key)));
        }
        for process in pipeline.procs() {
            process.kill()?;
        }
        let kept = work.keep();
        bail!(
            "{} differences (logs kept in {}); {}:\n{}",
            differences.len(),
            kept.display(),
            pipeline.skipped_report(),
            differences.join("\n"),
        );
    }
    assert!(
        kills >= 3,
        "the run was too short to kill anything much: {kills}"
    );

    // The balance entries: what a fresh fold of the ledger gives, entry for entry.
    let bootstrap = broker.bootstrap.clone();
    let folded = tokio::task::spawn_blocking(move || fold_ledger(&bootstrap)).await??;
    let want: usize = folded.values().map(Vec::len).sum();
    let started = Instant::now();
    let (entries, messages) = loop {
        let bootstrap = broker.bootstrap.clone();
        let read = tokio::task::spawn_blocking(move || read_entries(&bootstrap)).await??;
        if read.0 == folded || started.elapsed() > Duration::from_secs(120) {
            break read;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let consumed: Decimal = entries
        .values()
        .flatten()
        .filter(|e| e.kind == credit::EntryKind::Consume)
        .map(|e| -e.amount)
        .sum();
    println!(
        "balance entries: {messages} messages, {} distinct, {want} from the fold, {} customers, \
         {consumed} of credit consumed",
        entries.values().map(Vec::len).sum::<usize>(),
        folded.len()
    );
    if entries != folded {
        let kept = work.keep();
        let bootstrap = broker.bootstrap.clone();
        let (got, want) = (entries.clone(), folded.clone());
        // Best effort: a failure to read the topics again must not hide the difference.
        let detail =
            match tokio::task::spawn_blocking(move || divergence(&bootstrap, &got, &want)).await {
                Ok(Ok(detail)) => detail,
                Ok(Err(e)) => format!("(no detail: {e})"),
                Err(e) => format!("(no detail: {e})"),
            };
        for process in pipeline.procs() {
            process.kill()?;
        }
        bail!(
            "balance entries differ from the fold of the ledger (logs kept in {}); {}:\n{detail}",
            kept.display(),
            pipeline.skipped_report(),
        );
    }
    assert!(
        consumed > Decimal::ZERO,
        "no credit was consumed: the check saw no grant used"
    );
    // Equal totals do not excuse a record lost and made up for (a repeat, say).
    if let Some(skipped) = pipeline.skipped_records() {
        bail!("{skipped} (logs kept in {})", work.keep().display());
    }
    Ok(())
}

/// Where the stage's entries (`got`) first part from the fold's (`want`), customer by
/// customer: the entries around it, and where the line items they name are on the ledger and
/// their entries on the entries topic (partition and offset, every copy), in the order read.
fn divergence(bootstrap: &str, got: &Entries, want: &Entries) -> Result<String> {
    let read = |topic: &str| {
        neruba::embedded::read_topic(
            bootstrap,
            topic,
            0,
            Duration::from_secs(2),
            Duration::from_secs(120),
        )
    };
    let (mut ledger, mut topic) = (read("neruba.ledger")?, read("neruba.balance-entries")?);
    ledger.sort_by_key(|m| (m.partition(), m.offset()));
    topic.sort_by_key(|m| (m.partition(), m.offset()));
    let brief = |e: &BalanceEntry| format!("#{} {:?} {} {}", e.seq, e.kind, e.amount, e.cause);
    let mut out = String::new();
    let customers = got
        .keys()
        .chain(want.keys())
        .collect::<std::collections::BTreeSet<_>>();
    for who in customers {
        let (a, b) = (
            got.get(who).map_or(&[][..], Vec::as_slice),
            want.get(who).map_or(&[][..], Vec::as_slice),
        );
        if a == b {
            continue;
        }
        let at = (0..a.len().min(b.len()))
            .find(|i| a[*i] != b[*i])
            .unwrap_or(a.len().min(b.len()));
        out.push_str(&format!(
            "{who:?}: {} entries, the fold {}; first difference at {at}\n",
            a.len(),
            b.len()
        ));
        let around = at.saturating_sub(2)..(at + 3);
        let mut causes = std::collections::BTreeSet::new();
        for i in around {
            let (x, y) = (a.get(i), b.get(i));
            out.push_str(&format!(
                "  got  {}\n  want {}\n",
                x.map_or_else(String::new, brief),
                y.map_or_else(String::new, brief)
            ));
            causes.extend(x.iter().chain(y.iter()).map(|e| e.cause.clone()));
        }
        for message in &ledger {
            let payload = message.payload().unwrap_or_default();
            if record_header(message).is_none()
                && let Ok(item) = LineItem::decode(payload)
                && causes.contains(&item.id)
            {
                out.push_str(&format!(
                    "  ledger {}:{} {} (time {:?})\n",
                    message.partition(),
                    message.offset(),
                    item.id,
                    message.timestamp().to_millis()
                ));
            }
        }
        for message in &topic {
            if let Ok(entry) = credit::decode::<BalanceEntry>(message.payload().unwrap_or_default())
                && (entry.tenant.as_str(), entry.customer.as_str())
                    == (who.0.as_str(), who.1.as_str())
                && causes.contains(&entry.cause)
            {
                out.push_str(&format!(
                    "  entries {}:{} {}\n",
                    message.partition(),
                    message.offset(),
                    brief(&entry)
                ));
            }
        }
    }
    Ok(out)
}

/// Waits until the ledger equals `expected` (or two minutes passed); returns what it holds.
async fn settle_ledger(bootstrap: &str, expected: &Ledger) -> Result<(Ledger, usize, usize)> {
    let started = Instant::now();
    loop {
        let bootstrap = bootstrap.to_owned();
        let read = tokio::task::spawn_blocking(move || read_ledger(&bootstrap)).await??;
        if read.0 == *expected || started.elapsed() > Duration::from_secs(120) {
            return Ok(read);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_each_component_finish_its_work_and_exit_cleanly() -> Result<()> {
    let work = tempfile::tempdir()?;
    let (broker, mut pipeline) = start_all(work.path(), 2).await?;
    let client = reqwest::Client::new();
    let generated = generate_all(&mut Rng(42), 900, neruba_schemas::event::now_ms());
    let mut accepted = Accepted::new();
    let mut clean_exits = Vec::new();
    for (round, chunk) in generated.chunks(300).enumerate() {
        for batch in chunk.chunk_by(|a, b| a.tenant == b.tenant) {
            for part in batch.chunks(40) {
                post_until_answered(&client, &pipeline.base, part, &mut accepted).await?;
            }
        }
        // SIGTERM one component while the others (and its own backlog) are busy.
        let process = &mut pipeline.procs()[round % 3];
        let clean = process.terminate(Duration::from_secs(30))?;
        clean_exits.push((process.name.clone(), clean));
        process.start()?;
    }
    assert_eq!(
        clean_exits,
        [
            ("gateway".to_owned(), true),
            ("aggregator".to_owned(), true),
            ("rater".to_owned(), true)
        ]
    );
    let expected = truth(&accepted, &neruba::sample::catalog()?)?;
    let (got, distinct, messages) = settle_ledger(&broker.bootstrap, &expected).await?;
    pipeline.settled(&got, &expected, distinct, messages)
}

/// One attempt at posting `batch` as `tenant`: the HTTP status and the body.
async fn post_once(
    client: &reqwest::Client,
    base: &str,
    tenant: &str,
    batch: &[Generated],
    timeout: Duration,
) -> Result<(u16, Value)> {
    let key = neruba::sample::ingest_key(tenant).context("dev key")?;
    let bodies: Vec<Value> = batch.iter().map(|g| g.body.clone()).collect();
    let response = client
        .post(format!("{base}/v1/events"))
        .bearer_auth(key)
        .timeout(timeout)
        .json(&bodies)
        .send()
        .await?;
    Ok((response.status().as_u16(), response.json().await?))
}

/// Polls `{base}/readyz` until it answers `status`; how long that took.
async fn await_readiness(client: &reqwest::Client, base: &str, status: u16) -> Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(90) {
        if let Ok(response) = client.get(format!("{base}/readyz")).send().await
            && response.status().as_u16() == status
        {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{base}/readyz did not answer {status} within 90 s")
}

/// The broker process is stopped (SIGSTOP: it holds its data but answers nothing) mid-stream,
/// then continued. While it is stopped the gateway answers 503 and accepts nothing, and
/// `/readyz` is false; afterwards it recovers by itself, the client's retry is accepted, and
/// the ledger equals the price of what was accepted. (A broker restart cannot be shown on
/// tansu: its sqlite storage fails every request after a restart, and memory storage starts
/// empty.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_answers_503_and_the_ledger_recovers_exactly() -> Result<()> {
    let work = tempfile::tempdir()?;
    let (broker, mut pipeline) = start_all(work.path(), 2).await?;
    let client = reqwest::Client::new();
    let generated = generate_all(&mut Rng(7), 1_200, neruba_schemas::event::now_ms());
    let batches: Vec<&[Generated]> = generated
        .chunk_by(|a, b| a.tenant == b.tenant)
        .flat_map(|run| run.chunks(40))
        .collect();
    let (before, rest) = batches.split_at(batches.len() / 3);
    let mut accepted = Accepted::new();
    for batch in before {
        post_until_answered(&client, &pipeline.base, batch, &mut accepted).await?;
    }
    let components = [
        pipeline.base.clone(),
        pipeline.aggregator_ops.clone(),
        pipeline.rater_ops.clone(),
    ];
    for base in &components {
        await_readiness(&client, base, 200).await?;
    }

    broker.process.signal("STOP")?;
    let noticed = await_readiness(&client, &pipeline.base, 503).await?;
    // The aggregator and the rater notice too (their broker probe times out).
    for base in &components[1..] {
        await_readiness(&client, base, 503).await?;
    }
    let (during, after) = rest.split_at(1);
    let tenant = during[0].first().map(|g| g.tenant).context("empty batch")?;
    let (status, body) = post_once(
        &client,
        &pipeline.base,
        tenant,
        during[0],
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["accepted"], 0, "{body}");
    assert_eq!(body["error"]["code"], "broker_unavailable", "{body}");
    let statuses: Vec<&str> = body["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["status"].as_str())
        .collect();
    assert_eq!(statuses.len(), during[0].len(), "{body}");
    assert!(
        statuses.iter().all(|s| *s != "accepted"),
        "accepted while the broker was stopped: {body}"
    );
    // Long enough for every component's requests to time out and its connections to fail.
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.process.signal("CONT")?;
    let recovered = await_readiness(&client, &pipeline.base, 200).await?;
    for base in &components[1..] {
        await_readiness(&client, base, 200).await?;
    }

    // The client retries what was refused, then goes on.
    for batch in during.iter().chain(after) {
        if let Err(e) = post_until_answered(&client, &pipeline.base, batch, &mut accepted).await {
            bail!(
                "{e}\ngateway:\n{}\ntansu:\n{}",
                pipeline.gateway.log_tail(40),
                broker.process.log_tail(20)
            );
        }
    }
    for process in pipeline.procs() {
        if !process.running() {
            bail!(
                "exited during the outage or after it: {}",
                process.exit_report(40)
            );
        }
    }
    let expected = truth(&accepted, &neruba::sample::catalog()?)?;
    let (got, distinct, messages) = settle_ledger(&broker.bootstrap, &expected).await?;
    println!(
        "outage: not ready after {noticed:?}, ready again {recovered:?} after the broker continued; \
         {} distinct accepted, {distinct} items in {messages} messages",
        accepted.len()
    );
    pipeline.settled(&got, &expected, distinct, messages)
}
