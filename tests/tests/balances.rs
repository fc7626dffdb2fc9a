//! The balances stage on an embedded broker: line items, grants, voids and its own ticks in,
//! exact balance entries out; a crash changes nothing; a replay into fresh state gives the
//! same entries byte for byte.

use anyhow::{Context, Result};
use neruba::embedded::{self, EmbeddedKafka};
use neruba_balances::CrashPoint;
use neruba_schemas::credit::{
    self, BalanceEntry, BalanceRule, EntryKind, Grant, GrantTerms, RuleRecord, StatementStatus,
    Void,
};
use neruba_schemas::event::format_time_ms;
use neruba_schemas::ledger::{Kind, LineItem};
use neruba_schemas::topics::{RECORD_HEADER, stable_partition};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 3;

/// An entry as the test compares it: customer, kind, grant, amount, balance after, code.
type View<'a> = (
    &'a str,
    EntryKind,
    Option<&'a str>,
    Decimal,
    Decimal,
    Option<&'a str>,
);
const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

fn d(text: &str) -> Decimal {
    Decimal::from_str(text).expect("decimal literal")
}

fn grant(customer: &str, key: &str, amount: &str, priority: u16, expires: Option<i64>) -> Grant {
    Grant {
        v: 1,
        id: credit::grant_id("acme", customer, key),
        tenant: "acme".into(),
        customer: customer.into(),
        key: key.into(),
        terms: GrantTerms {
            amount: d(amount),
            currency: "USD".into(),
            priority,
            effective_at: None,
            expires_at: expires.map(format_time_ms),
            paid: None,
            metadata: BTreeMap::new(),
        },
        received_at: format_time_ms(0),
    }
}

/// A line item of the 30-day billing period starting at `period`.
fn item_in(customer: &str, id: &str, period: i64, window_ms: i64, amount: &str) -> LineItem {
    LineItem {
        v: 1,
        id: id.into(),
        kind: if amount.starts_with('-') {
            Kind::Adjustment
        } else {
            Kind::Usage
        },
        tenant: "acme".into(),
        customer: customer.into(),
        meter: "api_calls".into(),
        group: BTreeMap::new(),
        period_start: format_time_ms(period),
        period_end: format_time_ms(period + 30 * 24 * HOUR),
        window_start: format_time_ms(window_ms),
        window_end: format_time_ms(window_ms + 60_000),
        window_quantity: Decimal::ONE,
        window_events: 1,
        period_quantity: Decimal::ONE,
        amount: d(amount),
        period_amount: d(amount),
        currency: "USD".into(),
        price_plan: "api-calls".into(),
        price_version: 1,
        revision: 1,
        supersedes: None,
    }
}

enum Record {
    Item(LineItem),
    Grant(Grant),
    Void(Void),
    Rule(RuleRecord),
}

/// An embedded broker with `topics` (each of [`PARTITIONS`]) and the dead-letter topic, and a
/// producer to write ledger records with.
fn broker(topics: &[&str]) -> Result<(EmbeddedKafka, FutureProducer)> {
    let mut all: Vec<(&str, i32)> = topics.iter().map(|t| (*t, PARTITIONS)).collect();
    all.push((neruba_schemas::topics::DEAD_LETTER, 1));
    let kafka = EmbeddedKafka::start(&all)?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .create()?;
    Ok((kafka, producer))
}

async fn write(producer: &FutureProducer, topic: &str, record: &Record) -> Result<()> {
    let (customer, payload, header) = match record {
        Record::Item(i) => (&i.customer, credit::encode(i), None),
        Record::Grant(g) => (&g.customer, credit::encode(g), Some("grant")),
        Record::Void(v) => (&v.customer, credit::encode(v), Some("void")),
        Record::Rule(r) => (&r.customer, credit::encode(r), Some("rule")),
    };
    let key = format!("acme/{customer}");
    let mut message = FutureRecord::to(topic)
        .key(key.as_bytes())
        .payload(payload.as_slice())
        .partition(stable_partition(&key, PARTITIONS));
    if let Some(value) = header {
        message = message.headers(OwnedHeaders::new().insert(Header {
            key: RECORD_HEADER,
            value: Some(value),
        }));
    }
    producer
        .send(message, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// A clock tick at `at_ms` into partition `partition` of `topic`, as the stage writes one.
async fn write_tick(
    producer: &FutureProducer,
    topic: &str,
    partition: i32,
    at_ms: i64,
) -> Result<()> {
    let payload = credit::encode(&credit::Tick {
        v: 1,
        at_ms,
        finalize_after_ms: None,
    });
    let message = FutureRecord::to(topic)
        .key("neruba-tick".as_bytes())
        .payload(payload.as_slice())
        .partition(partition)
        .headers(OwnedHeaders::new().insert(Header {
            key: RECORD_HEADER,
            value: Some("tick"),
        }));
    producer
        .send(message, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

fn start(
    kafka: &EmbeddedKafka,
    state: &Path,
    group: &str,
    entries: &str,
) -> Result<(neruba_balances::Running, CancellationToken)> {
    start_on(kafka, "ledger", state, group, entries)
}

fn start_on(
    kafka: &EmbeddedKafka,
    ledger: &str,
    state: &Path,
    group: &str,
    entries: &str,
) -> Result<(neruba_balances::Running, CancellationToken)> {
    start_with(kafka, ledger, state, group, entries, None)
}

fn start_with(
    kafka: &EmbeddedKafka,
    ledger: &str,
    state: &Path,
    group: &str,
    entries: &str,
    crash: Option<neruba_balances::CrashPoint>,
) -> Result<(neruba_balances::Running, CancellationToken)> {
    let mut config = neruba_balances::Config::new(kafka.bootstrap_servers(), state);
    config.stage.group_id = group.into();
    config.stage.input_topic = ledger.into();
    config.finalize_after_ms = 10 * DAY;
    // Grants expire as the clock passes `expires_at`: the ledgers here are written whole.
    config.expiry_grace_ms = 0;
    config.stage.max_batch = 3;
    // Each record's entries handed to the sending thread as it is applied, so a crash
    // mid-batch comes after some were sent.
    config.stage.hand_every = 1;
    config.stage.crash = crash;
    config.entries_topic = entries.into();
    let shutdown = CancellationToken::new();
    let running = neruba_balances::start(config, &prometheus::Registry::new(), shutdown.clone())?;
    Ok((running, shutdown))
}

/// The entries on `topic`, each id once (a crash may repeat an entry, never change it), in
/// per-customer sequence order.
async fn entries(kafka: &EmbeddedKafka, topic: &str, expected: usize) -> Result<Vec<BalanceEntry>> {
    let bootstrap = kafka.bootstrap_servers().to_owned();
    let topic = topic.to_owned();
    let messages = tokio::task::spawn_blocking(move || {
        embedded::read_topic(
            &bootstrap,
            &topic,
            expected,
            Duration::from_millis(800),
            Duration::from_secs(60),
        )
    })
    .await??;
    let mut by_id: BTreeMap<String, BalanceEntry> = BTreeMap::new();
    for message in messages {
        let entry: BalanceEntry = credit::decode(message.payload().unwrap_or_default())?;
        if let Some(seen) = by_id.get(&entry.id) {
            assert_eq!(seen, &entry, "an entry repeated with other content");
        }
        by_id.insert(entry.id.clone(), entry);
    }
    let mut all: Vec<BalanceEntry> = by_id.into_values().collect();
    all.sort_by(|a, b| (&a.customer, a.seq).cmp(&(&b.customer, b.seq)));
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_draws_credit_down_exactly_and_a_replay_gives_the_same_entries() -> Result<()> {
    let (kafka, producer) = broker(&["ledger", "entries", "entries-replay"])?;
    let now = neruba_schemas::event::now_ms();
    let window = now - 2 * HOUR;
    // c1: a promotional grant (priority 1) and a purchased one; usage of 12.50 draws 5 from
    // the first, 7.50 from the second; a correction of −3 gives 3 back to the last drawn; the
    // repeated item changes nothing; a conflicting key is refused; a void ends the rest.
    // c2: a grant that expired an hour ago expires (the stage writes the tick), its usage is
    // uncovered.
    let promo = grant("c1", "promo", "5", 1, None);
    let pack = grant("c1", "pack-1", "20", 10, None);
    let expired = grant("c2", "old", "8", 10, Some(now - HOUR));
    let conflicting = Grant {
        v: credit::GRANT_RECORD_V,
        ..grant("c1", "pack-1", "25", 10, None)
    };
    let records = vec![
        Record::Grant(promo.clone()),
        Record::Grant(pack.clone()),
        Record::Item(item_in("c1", "li_a", now - DAY, window, "12.50")),
        Record::Item(item_in("c1", "li_a", now - DAY, window, "12.50")),
        Record::Item(item_in("c1", "li_b", now - DAY, window + 60_000, "-3")),
        // Other terms under a key: refused once, though sent twice (the second a retry the
        // gateway received later).
        Record::Grant(conflicting.clone()),
        Record::Grant(Grant {
            received_at: format_time_ms(now),
            ..conflicting
        }),
        Record::Void(Void {
            v: credit::VOID_RECORD_V,
            tenant: "acme".into(),
            customer: "c1".into(),
            grant: pack.id.clone(),
            received_at: format_time_ms(now),
        }),
        Record::Grant(expired.clone()),
        Record::Item(item_in("c2", "li_c", now - DAY, now - 30 * 60_000, "2.25")),
    ];
    for record in &records {
        write(&producer, "ledger", record).await?;
    }
    let state = tempfile::tempdir()?;
    let (running, shutdown) = start(&kafka, state.path(), "balances", "entries")?;
    let got = entries(&kafka, "entries", 10)
        .await
        .context("read entries")?;
    shutdown.cancel();
    running.wait().await?;

    let view: Vec<View<'_>> = got
        .iter()
        .map(|e| {
            (
                e.customer.as_str(),
                e.kind,
                e.grant.as_deref(),
                e.amount,
                e.balance_after,
                e.code.as_deref(),
            )
        })
        .collect();
    let (p, k, x) = (promo.id.as_str(), pack.id.as_str(), expired.id.as_str());
    assert_eq!(
        view,
        vec![
            ("c1", EntryKind::Grant, Some(p), d("5"), d("5"), None),
            ("c1", EntryKind::Grant, Some(k), d("20"), d("25"), None),
            ("c1", EntryKind::Consume, Some(p), d("-5"), d("20"), None),
            (
                "c1",
                EntryKind::Consume,
                Some(k),
                d("-7.50"),
                d("12.50"),
                None
            ),
            ("c1", EntryKind::Restore, Some(k), d("3"), d("15.50"), None),
            (
                "c1",
                EntryKind::GrantRefused,
                Some(k),
                d("0"),
                d("15.50"),
                Some("key_conflict")
            ),
            ("c1", EntryKind::Void, Some(k), d("-15.50"), d("0.00"), None),
            ("c2", EntryKind::Grant, Some(x), d("8"), d("8"), None),
            ("c2", EntryKind::Uncovered, None, d("2.25"), d("8"), None),
            ("c2", EntryKind::Expire, Some(x), d("-8"), d("0"), None),
        ]
    );

    // A replay of the same ledger (its ticks included) into fresh state, crashing twice on the
    // way (mid-batch after 5 of its 10 or more records, the 4th's entries handed to the
    // sending thread before, then after delivering a batch but
    // before writing it): the same entries, byte for byte. Each start is a group of its own (the
    // offsets are in the state), so none waits on a crashed member's session to expire.
    let fresh = tempfile::tempdir()?;
    let crashes = [CrashPoint::AfterMessages(5), CrashPoint::BeforeWrite(3)];
    for (attempt, crash) in crashes.into_iter().enumerate() {
        let (running, _shutdown) = start_with(
            &kafka,
            "ledger",
            fresh.path(),
            &format!("replay-{attempt}"),
            "entries-replay",
            Some(crash),
        )?;
        tokio::time::timeout(Duration::from_secs(60), running.wait())
            .await
            .map_err(|_| anyhow::anyhow!("the replay never reached {crash:?}"))??;
    }
    let (running, shutdown) = start(&kafka, fresh.path(), "replay-2", "entries-replay")?;
    let replayed = entries(&kafka, "entries-replay", got.len()).await?;
    shutdown.cancel();
    running.wait().await?;
    let bytes = |all: &[BalanceEntry]| {
        all.iter()
            .map(|e| String::from_utf8(credit::encode(e)))
            .collect::<Result<Vec<_>, _>>()
    };
    assert_eq!(bytes(&replayed)?, bytes(&got)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_more_entries_than_the_producer_queue_holds_is_delivered_whole() -> Result<()> {
    // Was: each output that did not fit the producer's queue failed the batch's delivery, which
    // was sent again whole, failing the same way: the stage stalled, writing the same entries
    // again every few seconds. A batch's entries are not bounded by its records (an item draws
    // on every grant it needs), so no queue size rules this out.
    let (kafka, producer) = broker(&["ledger", "entries"])?;
    let now = neruba_schemas::event::now_ms();
    // 40 grants of 0.25 and one item of 10 drawing on every one of them: 80 entries from 41
    // records, which the stage applies as one batch.
    let grants = 40;
    for n in 0..grants {
        let record = Record::Grant(grant("c1", &format!("bit-{n:02}"), "0.25", 10, None));
        write(&producer, "ledger", &record).await?;
    }
    let item = item_in("c1", "li_all", now - DAY, now - 2 * HOUR, "10");
    write(&producer, "ledger", &Record::Item(item)).await?;
    let state = tempfile::tempdir()?;
    let mut config = neruba_balances::Config::new(kafka.bootstrap_servers(), state.path());
    config.stage.group_id = "small-queue".into();
    config.stage.input_topic = "ledger".into();
    config.entries_topic = "entries".into();
    config.stage.kafka_options = vec![("queue.buffering.max.messages".into(), "8".into())];
    let shutdown = CancellationToken::new();
    let running = neruba_balances::start(config, &prometheus::Registry::new(), shutdown.clone())?;
    let got = entries(&kafka, "entries", 2 * grants).await;
    shutdown.cancel();
    running.wait().await?;
    let got = got.context("read entries")?;
    let consumed: Decimal = got
        .iter()
        .filter(|e| e.kind == EntryKind::Consume)
        .map(|e| e.amount)
        .sum();
    assert_eq!(got.len(), 2 * grants);
    assert_eq!(consumed, d("-10.00"));
    assert_eq!(got.last().map(|e| e.balance_after), Some(d("0.00")));
    Ok(())
}

/// The stage's batches so far in `registry`: how many, and the ledger records they held (the
/// histogram's sum, a count of messages: a whole number, exact as a float at this size).
#[allow(clippy::float_arithmetic)]
fn batches(registry: &prometheus::Registry) -> (u64, f64) {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "neruba_stage_batch_messages")
        .flat_map(|f| f.get_metric().iter())
        .fold((0, 0.0), |(count, sum), m| {
            let h = m.get_histogram();
            (count + h.get_sample_count(), sum + h.get_sample_sum())
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_ends_once_its_books_pass_the_bound_and_the_entries_are_the_same() -> Result<()> {
    // Was: a batch held every book it touched until its write, up to 50,000 records of as
    // many customers, whatever they weighed; and a tick took every customer due by it into
    // one batch, however many.
    let (kafka, producer) = broker(&["ledger-m", "entries-m-one", "entries-m-all"])?;
    let now = neruba_schemas::event::now_ms();
    let customers = 10;
    let mut records = 0_u32;
    for n in 0..customers {
        let customer = format!("m{n}");
        write(
            &producer,
            "ledger-m",
            &Record::Grant(grant(&customer, "pack", "10", 1, None)),
        )
        .await?;
        for (i, amount) in ["1.25", "2"].into_iter().enumerate() {
            let item = item_in(
                &customer,
                &format!("li_{n}_{i}"),
                now - DAY,
                now - HOUR,
                amount,
            );
            write(&producer, "ledger-m", &Record::Item(item)).await?;
        }
        records += 3;
    }
    // A tick 40 days on in each partition: every customer's statement turns draft and final
    // (the stage writes none of its own: the period ends in 29 days).
    let mut due = [0_u32; PARTITIONS as usize];
    for n in 0..customers {
        let partition = stable_partition(&format!("acme/m{n}"), PARTITIONS);
        due[usize::try_from(partition)?] += 1;
    }
    for partition in 0..PARTITIONS {
        write_tick(&producer, "ledger-m", partition, now + 40 * DAY).await?;
    }
    let mut runs = Vec::new();
    for (entries_topic, held_bytes) in [("entries-m-one", 1), ("entries-m-all", usize::MAX)] {
        let state = tempfile::tempdir()?;
        let mut config = neruba_balances::Config::new(kafka.bootstrap_servers(), state.path());
        config.stage.group_id = format!("group-{entries_topic}");
        config.stage.input_topic = "ledger-m".into();
        config.entries_topic = entries_topic.into();
        config.books_held_bytes = held_bytes;
        let registry = prometheus::Registry::new();
        let shutdown = CancellationToken::new();
        let running = neruba_balances::start(config, &registry, shutdown.clone())?;
        let got = entries(&kafka, entries_topic, 5 * customers).await;
        shutdown.cancel();
        running.wait().await?;
        runs.push((got.context("read entries")?, batches(&registry)));
    }
    let [
        (one, (one_batches, one_records)),
        (all, (all_batches, all_records)),
    ] = <[_; 2]>::try_from(runs).map_err(|_| anyhow::anyhow!("two runs"))?;
    // A bound of one byte: every batch one ledger record, or one customer of a tick (a
    // partition's tick takes as many writes as it has customers due, one at least, and
    // counts as one record, at its last).
    let ticks = u32::try_from(PARTITIONS)?;
    let tick_parts: u32 = due.iter().map(|d| (*d).max(1)).sum();
    assert_eq!(one_records, f64::from(records + ticks));
    assert_eq!(u32::try_from(one_batches)?, records + tick_parts);
    // Unbounded, the records written before the stage started come in fewer batches.
    assert!(
        (all_batches as f64) < all_records,
        "{all_batches} batches of {all_records} records"
    );
    // The same entries, ids and sequence numbers included, however the batches fell.
    assert_eq!(one.len(), 5 * customers);
    assert_eq!(one, all);
    for n in 0..customers {
        let kinds: Vec<EntryKind> = all
            .iter()
            .filter(|e| e.customer == format!("m{n}"))
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                EntryKind::Grant,
                EntryKind::Consume,
                EntryKind::Consume,
                EntryKind::StatementDraft,
                EntryKind::StatementFinal
            ]
        );
    }
    let balances: Vec<Decimal> = all
        .iter()
        .filter(|e| e.seq == 3)
        .map(|e| e.balance_after)
        .collect();
    assert_eq!(balances, vec![d("6.75"); customers]);
    Ok(())
}

/// Customer, kind, amount, balance after: how the statements-and-rules test compares entries.
fn brief(entries: &[BalanceEntry]) -> Vec<(EntryKind, Decimal, Decimal)> {
    entries
        .iter()
        .map(|e| (e.kind, e.amount, e.balance_after))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_finalise_once_and_a_low_balance_asks_for_one_top_up() -> Result<()> {
    let (kafka, producer) = broker(&["ledger-s", "entries-s", "entries-s-replay"])?;
    let now = neruba_schemas::event::now_ms();
    // Three 30-day periods: one that ended 40 days ago (final by now, with a 10-day delay),
    // one that ended 5 days ago (draft), the current one (open).
    let (p1, p2, p3) = (now - 70 * DAY, now - 35 * DAY, now - DAY);
    let pack = grant("c3", "pack", "10", 10, None);
    let rule = RuleRecord {
        v: 1,
        tenant: "acme".into(),
        customer: "c3".into(),
        currency: "USD".into(),
        rule: Some(BalanceRule {
            low_balance_threshold: d("5"),
            recharge_to: Some(d("20")),
        }),
        received_at: format_time_ms(now),
    };
    let first = [
        Record::Grant(pack.clone()),
        Record::Rule(rule),
        Record::Item(item_in("c3", "li_p1", p1, p1 + HOUR, "4")),
        Record::Item(item_in("c3", "li_p2", p2, p2 + HOUR, "3")),
    ];
    for record in &first {
        write(&producer, "ledger-s", record).await?;
    }
    let state = tempfile::tempdir()?;
    let (running, shutdown) = start_on(&kafka, "ledger-s", state.path(), "s", "entries-s")?;
    // 10 → 6 → 3: the crossing below 5 alerts once and asks for 20 − 3; the stage's tick turns
    // the first period's statement draft and (its delay long past) final, the second draft.
    let got = entries(&kafka, "entries-s", 8).await?;
    assert_eq!(
        brief(&got),
        vec![
            (EntryKind::Grant, d("10"), d("10")),
            (EntryKind::Consume, d("-4"), d("6")),
            (EntryKind::Consume, d("-3"), d("3")),
            (EntryKind::LowBalance, d("0"), d("3")),
            (EntryKind::TopupRequested, d("17"), d("3")),
            (EntryKind::StatementDraft, d("0"), d("3")),
            (EntryKind::StatementFinal, d("0"), d("3")),
            (EntryKind::StatementDraft, d("0"), d("3")),
        ]
    );
    let statement = |i: usize| got[i].statement.as_deref().expect("a statement");
    assert_eq!(statement(5).id, statement(6).id);
    assert_eq!(
        statement(6).id,
        credit::statement_id("acme", "c3", "USD", &format_time_ms(p1))
    );
    assert_eq!(
        (
            statement(6).status,
            statement(6).usage,
            statement(6).credit_applied
        ),
        (StatementStatus::Final, d("4"), d("4"))
    );
    assert_eq!(statement(7).status, StatementStatus::Draft);
    // The payment side answers the request: a grant keyed by its id (burning after the pack).
    let request = got[4].id.clone();
    let mut topup = grant("c3", &request, "17", 20, None);
    topup.id = credit::grant_id("acme", "c3", &request);
    let second = [
        Record::Grant(topup),
        // A correction for the final period: carried to the next statement not yet final.
        Record::Item(item_in("c3", "li_p1_fix", p1, p1 + 2 * HOUR, "-1")),
        Record::Item(item_in("c3", "li_p3", p3, p3 + HOUR, "2")),
    ];
    for record in &second {
        write(&producer, "ledger-s", record).await?;
    }
    let got = entries(&kafka, "entries-s", 11).await?;
    shutdown.cancel();
    running.wait().await?;
    assert_eq!(
        brief(got.get(8..).unwrap_or_default()),
        vec![
            (EntryKind::Grant, d("17"), d("20")),
            (EntryKind::Restore, d("1"), d("21")),
            (EntryKind::Consume, d("-2"), d("19")),
        ]
    );
    // The books as the stage left them: the second period's draft holds the carried
    // correction as a prior-period line; the current period is open.
    let mut statements = Vec::new();
    for partition in 0..PARTITIONS {
        let books = neruba_balances::state::read_books(state.path(), "ledger-s", partition)?;
        for (_, customer, book) in books.unwrap_or_default() {
            for s in book.statements.into_values() {
                statements.push((customer.clone(), s.statement));
            }
        }
    }
    let view: Vec<_> = statements
        .iter()
        .map(|(c, s)| {
            (
                c.as_str(),
                s.status,
                s.usage,
                s.prior_period_amount,
                s.credit_applied,
                s.amount_due,
                s.prior_period
                    .iter()
                    .map(|l| l.period_start.clone())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    assert_eq!(
        view,
        vec![
            (
                "c3",
                StatementStatus::Draft,
                d("3"),
                d("-1"),
                d("2"),
                d("0"),
                vec![format_time_ms(p1)]
            ),
            (
                "c3",
                StatementStatus::Open,
                d("2"),
                d("0"),
                d("2"),
                d("0"),
                vec![]
            ),
        ]
    );
    // A replay into fresh state (ticks read from the ledger): the same entries, byte for byte.
    let fresh = tempfile::tempdir()?;
    let (running, shutdown) = start_on(
        &kafka,
        "ledger-s",
        fresh.path(),
        "s-replay",
        "entries-s-replay",
    )?;
    let replayed = entries(&kafka, "entries-s-replay", got.len()).await?;
    shutdown.cancel();
    running.wait().await?;
    let bytes = |all: &[BalanceEntry]| all.iter().map(credit::encode).collect::<Vec<_>>();
    assert_eq!(bytes(&replayed), bytes(&got));
    Ok(())
}

/// The stage runtime's count of input offsets skipped, per partition of `registry`'s stage.
fn skipped_offsets(registry: &prometheus::Registry) -> BTreeMap<String, u64> {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "neruba_stage_skipped_offsets_total")
        .flat_map(|f| f.get_metric().iter())
        .map(|m| {
            let partition = m
                .get_label()
                .iter()
                .find(|l| l.name() == "partition")
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            (partition, m.get_counter().get_value() as u64)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_records_deleted_before_the_stage_read_them_are_counted() -> Result<()> {
    // Was: a stage resumed at its stored offset and took whatever came first as the next
    // record. When retention has deleted records the stage had not read (the consumer then
    // starts at the oldest one left), or the broker skips some (the crash soak's broker,
    // tansu's in-memory engine, answers a fetch that starts inside a record batch with the
    // next batch), they were lost without a word. The embedded broker keeps at most 5 MiB of a
    // partition: records written while the stage is stopped push out the ones it has not read.
    let (kafka, producer) = broker(&["ledger-gap", "entries-gap"])?;
    let now = neruba_schemas::event::now_ms();
    let customer = "g1";
    let partition = stable_partition(&format!("acme/{customer}"), PARTITIONS);
    let item =
        |id: &str, amount: &str| Record::Item(item_in(customer, id, now - DAY, now - HOUR, amount));
    let state = tempfile::tempdir()?;
    let run = |registry: &prometheus::Registry| {
        let mut config = neruba_balances::Config::new(kafka.bootstrap_servers(), state.path());
        config.stage.group_id = "balances-gap".into();
        config.stage.input_topic = "ledger-gap".into();
        config.entries_topic = "entries-gap".into();
        let shutdown = CancellationToken::new();
        neruba_balances::start(config, registry, shutdown.clone()).map(|r| (r, shutdown))
    };
    let brief_of = |entries: &[BalanceEntry]| -> Vec<(EntryKind, Decimal, Decimal)> {
        entries
            .iter()
            .map(|e| (e.kind, e.amount, e.balance_after))
            .collect()
    };
    let counts = |skipped: u64| -> BTreeMap<String, u64> {
        (0..PARTITIONS)
            .map(|p| (p.to_string(), if p == partition { skipped } else { 0 }))
            .collect()
    };

    // Offsets 0 to 2, read and written by the first run: nothing skipped.
    let grant = grant(customer, "pack", "10", 1, None);
    write(&producer, "ledger-gap", &Record::Grant(grant)).await?;
    write(&producer, "ledger-gap", &item("li_1", "1.25")).await?;
    write(&producer, "ledger-gap", &item("li_2", "0.25")).await?;
    let first = prometheus::Registry::new();
    let (running, shutdown) = run(&first)?;
    let got = entries(&kafka, "entries-gap", 3).await;
    shutdown.cancel();
    running.wait().await?;
    assert_eq!(
        brief_of(&got.context("read entries")?),
        [
            (EntryKind::Grant, d("10"), d("10")),
            (EntryKind::Consume, d("-1.25"), d("8.75")),
            (EntryKind::Consume, d("-0.25"), d("8.50")),
        ]
    );
    assert_eq!(skipped_offsets(&first), counts(0));

    // While it is stopped, 6 MiB in records of 600 KiB (each its own batch; not ledger
    // records: the stage sets them aside as dead letters), then an item.
    let key = format!("acme/{customer}");
    let blob = vec![b'x'; 600 * 1024];
    for _ in 0..10 {
        let record = FutureRecord::to("ledger-gap")
            .key(key.as_bytes())
            .payload(blob.as_slice())
            .partition(partition);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    write(&producer, "ledger-gap", &item("li_3", "2")).await?;
    let bootstrap = kafka.bootstrap_servers().to_owned();
    let (oldest, end) = tokio::task::spawn_blocking(move || -> Result<(i64, i64)> {
        let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        Ok(rdkafka::consumer::Consumer::fetch_watermarks(
            &consumer,
            "ledger-gap",
            partition,
            Duration::from_secs(10),
        )?)
    })
    .await??;
    assert_eq!(end, 14);
    assert!(
        oldest > 3,
        "the broker deleted nothing: its oldest offset is {oldest}"
    );

    let second = prometheus::Registry::new();
    let (running, shutdown) = run(&second)?;
    let got = entries(&kafka, "entries-gap", 4).await;
    shutdown.cancel();
    running.wait().await?;
    assert_eq!(
        brief_of(&got.context("read entries")?)[3..],
        [(EntryKind::Consume, d("-2"), d("6.50"))]
    );
    // Stored at 3, the oldest left is later: every offset between was deleted unread.
    assert_eq!(skipped_offsets(&second), counts(u64::try_from(oldest - 3)?));

    // Resumed where it stopped, with nothing deleted since: nothing skipped.
    write(&producer, "ledger-gap", &item("li_4", "0.5")).await?;
    let third = prometheus::Registry::new();
    let (running, shutdown) = run(&third)?;
    let got = entries(&kafka, "entries-gap", 5).await;
    shutdown.cancel();
    running.wait().await?;
    assert_eq!(
        brief_of(&got.context("read entries")?)[4..],
        [(EntryKind::Consume, d("-0.5"), d("6.00"))]
    );
    assert_eq!(skipped_offsets(&third), counts(0));
    Ok(())
}
