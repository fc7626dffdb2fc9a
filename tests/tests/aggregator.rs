//! The aggregator on the embedded broker: events written to the events topic, rollups read
//! back from the rollups topic, compared with aggregates computed independently here.

use anyhow::Result;
use neruba::embedded::EmbeddedKafka;
use neruba_aggregator as aggregator;
use neruba_schemas::rollup::{LatestEvent, Rollup};
use neruba_schemas::{Catalog, Event, event::parse_time_ms, topics};
use neruba_tests::{EventWriter, dead_letters, event, latest_rollups, rollups_on_topic};
use rust_decimal::Decimal;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::{CancellationToken, DropGuard};

const CATALOG: &str = r#"
[[tenants]]
id = "t1"

[[tenants.meters]]
key = "tokens"
event_type = "llm"
aggregation = "sum"
value = "$.tokens"
group_by = { model = "$.model" }
filters = { "$.status" = "ok" }
window = "1m"

[[tenants.meters]]
key = "calls"
event_type = "api"
aggregation = "count"
window = "1m"

[[tenants.meters]]
key = "latency_min"
event_type = "api"
aggregation = "min"
value = "$.ms"
window = "1m"

[[tenants.meters]]
key = "latency_max"
event_type = "api"
aggregation = "max"
value = "$.ms"
window = "1m"

[[tenants.meters]]
key = "latency_avg"
event_type = "api"
aggregation = "avg"
value = "$.ms"
window = "1m"

[[tenants.meters]]
key = "users"
event_type = "api"
aggregation = "unique_count"
value = "$.user"
window = "1m"

[[tenants.meters]]
key = "seats"
event_type = "seat"
aggregation = "latest"
value = "$.seats"
window = "1m"

[[tenants]]
id = "t2"

[[tenants.meters]]
key = "calls"
event_type = "api"
aggregation = "count"
window = "1m"
"#;

/// 2026-11-10 12:00:00 UTC: fixed, so no test depends on the day it runs.
fn t0() -> i64 {
    parse_time_ms("2026-11-10T12:00:00Z").unwrap_or_default()
}

fn d(text: &str) -> Decimal {
    neruba_schemas::decimal::parse_exact(text).unwrap_or_default()
}

struct Setup {
    kafka: EmbeddedKafka,
    writer: EventWriter,
    catalog: Arc<Catalog>,
    state: tempfile::TempDir,
}

fn setup(partitions: i32) -> Result<Setup> {
    // Logs are shown by the test runner only for failing tests.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("neruba_aggregator=info,neruba_stage=info,rdkafka=info")
        .with_test_writer()
        .try_init();
    let kafka = EmbeddedKafka::start(&[
        (topics::EVENTS, partitions),
        (topics::ROLLUPS, 2),
        (topics::DEAD_LETTER, 1),
    ])?;
    let writer = EventWriter::new(kafka.bootstrap_servers())?;
    Ok(Setup {
        writer,
        catalog: Arc::new(Catalog::from_toml_str(CATALOG, "aggregator test")?),
        state: tempfile::tempdir()?,
        kafka,
    })
}

/// Starts an aggregator; dropping the returned guard (also on a failed assertion) stops it, so
/// a failing test ends instead of waiting on the consumer thread.
fn start(
    s: &Setup,
    state_dir: &Path,
    tweak: impl FnOnce(&mut aggregator::Config),
) -> Result<(aggregator::Running, DropGuard)> {
    start_with_registry(s, state_dir, &prometheus::Registry::new(), tweak)
}

fn start_with_registry(
    s: &Setup,
    state_dir: &Path,
    registry: &prometheus::Registry,
    tweak: impl FnOnce(&mut aggregator::Config),
) -> Result<(aggregator::Running, DropGuard)> {
    let mut config = aggregator::Config::new(s.kafka.bootstrap_servers(), state_dir);
    config.timing.grace_ms = 1_000;
    config.idle_timeout = Duration::from_secs(3600);
    tweak(&mut config);
    let shutdown = CancellationToken::new();
    let running = aggregator::start(config, s.catalog.clone(), registry, shutdown.clone())?;
    Ok((running, shutdown.drop_guard()))
}

/// Partitions an instance owns, from its metrics.
fn assigned(registry: &prometheus::Registry) -> i64 {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == "neruba_assigned_partitions")
        .and_then(|f| f.get_metric().first().map(|m| m.get_gauge().get_value()))
        // An integer gauge: the conversion is exact.
        .map_or(-1, |v| v as i64)
}

/// The partitions each instance owns once they are `wanted`, or as they are after a minute
/// (the embedded broker holds a group's first join 3 s, and each later round up to 9 s).
async fn owned_within_a_minute(registries: &[&prometheus::Registry], wanted: &[i64]) -> Vec<i64> {
    let owned = || registries.iter().map(|r| assigned(r)).collect::<Vec<_>>();
    for _ in 0..600 {
        if owned() == wanted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    owned()
}

/// From a stage's metrics: Σ input messages over the batches it wrote, and the batches timed
/// in each phase (apply, deliver, write).
fn batches(registry: &prometheus::Registry) -> (u64, [u64; 3]) {
    let families = registry.gather();
    let family = |name: &str| families.iter().find(|f| f.name() == name);
    let messages = family("neruba_stage_batch_messages")
        .and_then(|f| f.get_metric().first())
        .map(|m| m.get_histogram());
    let timed = |phase: &str| {
        family("neruba_stage_batch_seconds")
            .and_then(|f| {
                f.get_metric().iter().find(|m| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == "phase" && l.value() == phase)
                })
            })
            .map_or(0, |m| m.get_histogram().get_sample_count())
    };
    (
        // Counts of whole messages: the conversion is exact.
        messages.map_or(0, |h| h.get_sample_sum() as u64),
        [timed("apply"), timed("deliver"), timed("write")],
    )
}

/// Waits until the state of `partition` says every one of its `total` messages was applied.
async fn wait_applied(s: &Setup, partition: i32, total: usize) -> Result<()> {
    let dir = aggregator::state::partition_dir(s.state.path(), topics::EVENTS, partition);
    let total = i64::try_from(total)?;
    for _ in 0..300 {
        if dir.exists() && aggregator::state::stored_offset(&dir)? == Some(total) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("partition {partition} did not apply {total} messages in 30 s")
}

/// `(meter, group, window offset from t0 in minutes, window qty, window events, period qty, period events, revision)`.
type Row = (String, String, i64, Decimal, u64, Decimal, u64, u32);

fn rows(rollups: &BTreeMap<String, Rollup>, customer: &str) -> Vec<Row> {
    let mut rows: Vec<Row> = rollups
        .values()
        .filter(|r| r.customer == customer)
        .map(|r| {
            let group = r
                .group
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            (
                r.meter.clone(),
                group,
                (r.window_start_ms - t0()) / 60_000,
                r.window_quantity,
                r.window_events,
                r.period_quantity,
                r.period_events,
                r.revision,
            )
        })
        .collect();
    rows.sort();
    rows
}

/// The latest rollups of `customer` for `meters`, once `expected` rollups were read.
async fn closed(
    s: &Setup,
    expected: usize,
    settle_ms: u64,
    customer: &str,
    meters: &[&str],
) -> Result<Vec<Row>> {
    let all = rollups_on_topic(
        s.kafka.bootstrap_servers(),
        expected,
        Duration::from_millis(settle_ms),
    )
    .await?;
    let latest = latest_rollups(all)?;
    Ok(rows(&latest, customer)
        .into_iter()
        .filter(|r| meters.contains(&r.0.as_str()))
        .collect())
}

/// Expected rollup: window and period-to-date as `(quantity, events)`.
fn row(
    meter: &str,
    group: &str,
    minute: i64,
    window: (&str, u64),
    period: (&str, u64),
    revision: u32,
) -> Row {
    (
        meter.into(),
        group.into(),
        minute,
        d(window.0),
        window.1,
        d(period.0),
        period.1,
        revision,
    )
}

fn api(id: &str, customer: &str, at_s: i64, ms: &str, user: &str) -> Event {
    event(
        "t1",
        id,
        "api",
        customer,
        t0() + at_s * 1000,
        json!({"ms": ms, "user": user}),
    )
}

#[tokio::test]
async fn every_aggregation_with_group_by_and_filters_matches_hand_computed_rollups() -> Result<()> {
    let s = setup(1)?;
    let registry = prometheus::Registry::new();
    let (running, shutdown) = start_with_registry(&s, s.state.path(), &registry, |_| {})?;
    let llm = llm_c1;
    let seat = |id: &str, at_s: i64, seats: &str| {
        event(
            "t1",
            id,
            "seat",
            "c1",
            t0() + at_s * 1000,
            json!({"seats": seats}),
        )
    };
    s.writer
        .send(
            0,
            &[
                llm("l1", 1, "10.5", "a", "ok"),
                llm("l2", 2, "4", "b", "ok"),
                llm("l3", 3, "100", "a", "error"),
                api("a1", "c1", 5, "12.5", "u1"),
                api("a2", "c1", 6, "3", "u2"),
                api("a3", "c1", 7, "7", "u1"),
                seat("s1", 10, "5"),
                seat("s2", 20, "3"),
                seat("s3", 15, "9"),
                llm("l4", 61, "0.25", "a", "ok"),
                api("a4", "c1", 65, "20", "u3"),
                // Closes both minutes for c1: watermark = t0 + 10 min - 1 s.
                api("closer", "other", 600, "1", "x"),
            ],
        )
        .await?;
    let got = latest_rollups(
        rollups_on_topic(s.kafka.bootstrap_servers(), 14, Duration::from_millis(800)).await?,
    )?;
    let mut expected = vec![
        row("calls", "", 0, ("3", 3), ("3", 3), 1),
        row("calls", "", 1, ("1", 1), ("4", 4), 1),
        row("latency_avg", "", 0, ("7.5", 3), ("7.5", 3), 1),
        row("latency_avg", "", 1, ("20", 1), ("10.625", 4), 1),
        row("latency_max", "", 0, ("12.5", 3), ("12.5", 3), 1),
        row("latency_max", "", 1, ("20", 1), ("20", 4), 1),
        row("latency_min", "", 0, ("3", 3), ("3", 3), 1),
        row("latency_min", "", 1, ("20", 1), ("3", 4), 1),
        row("seats", "", 0, ("3", 3), ("3", 3), 1),
        row("tokens", "model=a", 0, ("10.5", 1), ("10.5", 1), 1),
        row("tokens", "model=a", 1, ("0.25", 1), ("10.75", 2), 1),
        row("tokens", "model=b", 0, ("4", 1), ("4", 1), 1),
        row("users", "", 0, ("2", 3), ("2", 3), 1),
        row("users", "", 1, ("1", 1), ("3", 4), 1),
    ];
    expected.sort();
    assert_eq!(rows(&got, "c1"), expected);
    // The `latest` meter's rollup names the event its quantity is the value of (the latest
    // by time, not the last sent); no other meter's names one.
    let named: Vec<(&str, Option<&LatestEvent>)> = got
        .values()
        .filter(|r| r.customer == "c1")
        .filter(|r| r.meter == "seats" || r.latest_event.is_some())
        .map(|r| (r.meter.as_str(), r.latest_event.as_ref()))
        .collect();
    let s2 = LatestEvent {
        time_ms: t0() + 20_000,
        id: "s2".into(),
    };
    assert_eq!(named, vec![("seats", Some(&s2))]);
    // The closer's own windows are still open: nothing emitted for it.
    assert!(rows(&got, "other").is_empty());
    drop(shutdown);
    running.wait().await?;
    // Every message is in exactly one written batch; the rollups were delivered, so some
    // batch was timed delivering, and every batch that applied or delivered was written.
    let (messages, [applied, delivered, written]) = batches(&registry);
    assert_eq!(messages, 12);
    assert!(
        (1..=written).contains(&delivered) && (1..=written).contains(&applied),
        "applied {applied}, delivered {delivered}, written {written}"
    );
    Ok(())
}

#[tokio::test]
async fn idle_partition_closes_its_windows_by_processing_time() -> Result<()> {
    let s = setup(1)?;
    let (running, shutdown) = start(&s, s.state.path(), |c| {
        c.idle_timeout = Duration::from_millis(200);
        c.timing.grace_ms = 0;
    })?;
    // Event time far behind the wall clock: once idle, the partition's clock catches up and
    // the window closes without any later event.
    s.writer.send(0, &[api("a1", "c1", 59, "1", "u1")]).await?;
    let calls = closed(&s, 5, 300, "c1", &["calls"]).await?;
    assert_eq!(calls, vec![row("calls", "", 0, ("1", 1), ("1", 1), 1)]);
    drop(shutdown);
    running.wait().await?;
    Ok(())
}

#[tokio::test]
async fn repeat_after_restart_is_counted_once() -> Result<()> {
    let s = setup(1)?;
    let (running, shutdown) = start(&s, s.state.path(), |_| {})?;
    s.writer.send(0, &[api("a1", "c1", 1, "1", "u1")]).await?;
    wait_applied(&s, 0, 1).await?;
    drop(shutdown);
    running.wait().await?;

    let (running, shutdown) = start(&s, s.state.path(), |_| {})?;
    s.writer
        .send(
            0,
            &[
                api("a1", "c1", 1, "1", "u1"),
                api("a2", "c1", 2, "1", "u2"),
                api("closer", "other", 600, "1", "x"),
            ],
        )
        .await?;
    let calls = closed(&s, 5, 800, "c1", &["calls"]).await?;
    assert_eq!(calls, vec![row("calls", "", 0, ("2", 2), ("2", 2), 1)]);
    drop(shutdown);
    running.wait().await?;
    Ok(())
}

/// A storage failure (here a damaged record) stops the aggregator, and what its batch had
/// half applied is never written, not even when the consumer's close revokes the partition:
/// the stored offset stays where the last good batch left it, so the failing event is read
/// again at the next start instead of being skipped.
#[tokio::test]
async fn a_storage_failure_stops_the_stage_without_writing_its_half_applied_batch() -> Result<()> {
    let s = setup(1)?;
    let (running, shutdown) = start(&s, s.state.path(), |_| {})?;
    s.writer
        .send(
            0,
            &[
                api("a1", "c1", 1, "1", "u1"),
                api("closer", "other", 600, "1", "x"),
            ],
        )
        .await?;
    wait_applied(&s, 0, 2).await?;
    drop(shutdown);
    running.wait().await?;

    // Damage the record of c1's closed `calls` window, which a late event reads back.
    let dir = aggregator::state::partition_dir(s.state.path(), topics::EVENTS, 0);
    {
        let db = rocksdb::DB::open_default(&dir)?;
        let series = aggregator::keys::series("calls", "c1", "{}");
        let key = aggregator::keys::window("t1", &series, t0());
        anyhow::ensure!(
            db.get(&key)?.is_some(),
            "the window record is where expected"
        );
        db.put(&key, b"\xff\xff\xff")?;
    }

    let (running, _shutdown) = start(&s, s.state.path(), |_| {})?;
    s.writer.send(0, &[api("a2", "c1", 2, "1", "u2")]).await?;
    let outcome = tokio::time::timeout(Duration::from_secs(30), running.wait()).await?;
    let error = outcome.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        error.contains("corrupt partition 0 record"),
        "the stage stopped on applying the late event: {error}"
    );
    assert_eq!(aggregator::state::stored_offset(&dir)?, Some(2));
    Ok(())
}

#[tokio::test]
async fn late_event_reemits_window_as_revision_two_and_too_old_is_dead_lettered() -> Result<()> {
    let s = setup(1)?;
    let (running, shutdown) = start(&s, s.state.path(), |c| {
        c.timing.correction_horizon_ms = 3_600_000;
    })?;
    s.writer
        .send(
            0,
            &[
                api("a1", "c1", 1, "5", "u1"),
                api("a2", "c1", 2, "7", "u2"),
                api("closer", "c1", 600, "1", "u9"),
            ],
        )
        .await?;
    let first = closed(&s, 5, 500, "c1", &["calls", "latency_max"]).await?;
    assert_eq!(
        first,
        vec![
            row("calls", "", 0, ("2", 2), ("2", 2), 1),
            row("latency_max", "", 0, ("7", 2), ("7", 2), 1)
        ]
    );

    // Within the horizon: minute 0 gains an event and is re-emitted as revision 2.
    // Beyond it (received 2 h after its time, the horizon is 1 h): dead-lettered with its code.
    let mut ancient = api("ancient", "c1", -7200, "1", "u1");
    ancient.received_ms = ancient.time_ms + 7_200_000;
    s.writer
        .send(0, &[api("late", "c1", 30, "9", "u3"), ancient])
        .await?;
    let second = closed(&s, 10, 800, "c1", &["calls", "latency_max"]).await?;
    assert_eq!(
        second,
        vec![
            row("calls", "", 0, ("3", 3), ("3", 3), 2),
            row("latency_max", "", 0, ("9", 3), ("9", 3), 2)
        ]
    );
    let letters = dead_letters(s.kafka.bootstrap_servers(), 1).await?;
    let codes: Vec<&str> = letters.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(codes, ["timestamp_too_far_in_past"]);
    drop(shutdown);
    running.wait().await?;
    Ok(())
}

#[tokio::test]
async fn an_event_the_gateway_accepted_is_counted_whatever_the_clock_did_before_it() -> Result<()> {
    // Found by a hostile client: an event 290 s in the future moved the watermark, and an
    // event 35 days − 120 s old, accepted by the gateway at the same moment, was then
    // dead-lettered as too old. The rule is now the gateway's, on the receive time.
    let s = setup(1)?;
    let (running, shutdown) = start(&s, s.state.path(), |c| {
        c.timing.correction_horizon_ms = 3_600_000;
    })?;
    let received = t0() + 3_600_000;
    let mut future = api("future", "c1", 3600 + 290, "1", "u1");
    future.received_ms = received;
    let mut old = api("old", "c2", 120, "1", "u1");
    old.received_ms = received;
    s.writer.send(0, &[future, old]).await?;
    // The old event's window is behind the clock already: it closes (and is emitted) at once.
    let calls = closed(&s, 5, 500, "c2", &["calls"]).await?;
    assert_eq!(calls, vec![row("calls", "", 2, ("1", 1), ("1", 1), 1)]);
    let letters = dead_letters(s.kafka.bootstrap_servers(), 0).await?;
    assert_eq!(letters, Vec::<(String, Vec<u8>)>::new());
    drop(shutdown);
    running.wait().await?;
    Ok(())
}

#[tokio::test]
async fn one_tenants_clock_never_makes_another_tenants_events_late() -> Result<()> {
    // Two tenants on one partition. t1 sends an event ten minutes ahead of t2's traffic; t2's
    // windows must close on t2's own clock, once, not as late revisions of windows t1 closed.
    let s = setup(1)?;
    let (running, shutdown) = start(&s, s.state.path(), |_| {})?;
    let other = |id: &str, at_s: i64| event("t2", id, "api", "c1", t0() + at_s * 1000, json!({}));
    s.writer
        .send(
            0,
            &[
                api("ahead", "c1", 600, "1", "u1"),
                other("b1", 1),
                other("b2", 2),
                other("b-closer", 120),
            ],
        )
        .await?;
    let all = rollups_on_topic(s.kafka.bootstrap_servers(), 1, Duration::from_millis(800)).await?;
    let t2: Vec<(String, i64, Decimal, u32)> = all
        .iter()
        .filter(|r| r.tenant == "t2")
        .map(|r| {
            (
                r.meter.clone(),
                (r.window_start_ms - t0()) / 60_000,
                r.window_quantity,
                r.revision,
            )
        })
        .collect();
    // One rollup for minute 0, revision 1, both events in it: nothing was late.
    assert_eq!(t2, vec![("calls".to_owned(), 0, d("2"), 1)]);
    // t1's windows are all still open: t2's clock (at minute 2) closed none of them.
    assert!(all.iter().all(|r| r.tenant == "t2"));
    drop(shutdown);
    running.wait().await?;
    Ok(())
}

#[tokio::test]
async fn a_quiet_tenant_closes_its_windows_while_another_keeps_the_partition_busy() -> Result<()> {
    // Idle time is per tenant: t1 backfills an hour-old stretch without pause, so the
    // partition is never idle and its event time never reaches t2's window; t2 went quiet
    // after one event, and its window closes by processing time all the same.
    let s = setup(1)?;
    let registry = prometheus::Registry::new();
    let (running, shutdown) = start_with_registry(&s, s.state.path(), &registry, |c| {
        c.idle_timeout = Duration::from_millis(300);
        c.timing.grace_ms = 0;
    })?;
    // The group forms first (the embedded broker holds a first join 3 s), so the busy
    // stretch below is not spent before the aggregator reads anything.
    assert_eq!(owned_within_a_minute(&[&registry], &[1]).await, [1]);
    let quiet = event("t2", "q1", "api", "c1", t0() + 1_000, json!({}));
    s.writer.send(0, &[quiet]).await?;
    // Busy until told to stop or for 20 s (an event every 100 ms; the rollup read below gives
    // up at 30 s, so a window that closed only once the stream ended is told apart), all in
    // one hour-old minute, so t1's own event time closes none of its windows.
    let stop_busy = CancellationToken::new();
    let busy = tokio::spawn({
        let brokers = s.kafka.bootstrap_servers().to_owned();
        let stop = stop_busy.clone();
        async move {
            let writer = EventWriter::new(&brokers)?;
            for i in 0..200 {
                if stop.is_cancelled() {
                    break;
                }
                let at_s = -3600 + i % 60;
                writer
                    .send(0, &[api(&format!("b{i}"), "c1", at_s, "1", "u")])
                    .await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(())
        }
    });
    let all = rollups_on_topic(s.kafka.bootstrap_servers(), 1, Duration::from_millis(200)).await?;
    assert!(
        !busy.is_finished(),
        "t2's window closed only once the partition went quiet"
    );
    stop_busy.cancel();
    let t2: Vec<(String, i64, Decimal)> = all
        .iter()
        .filter(|r| r.tenant == "t2")
        .map(|r| {
            (
                r.meter.clone(),
                (r.window_start_ms - t0()) / 60_000,
                r.window_quantity,
            )
        })
        .collect();
    assert_eq!(t2, vec![("calls".to_owned(), 0, d("1"))]);
    busy.await??;
    drop(shutdown);
    running.wait().await?;
    Ok(())
}

/// An `llm` event of `t1`'s customer `c1`, `at_s` seconds after [`t0`] (the `tokens` meter
/// counts it when its status is `ok`).
fn llm_c1(id: &str, at_s: i64, tokens: &str, model: &str, status: &str) -> Event {
    event(
        "t1",
        id,
        "llm",
        "c1",
        t0() + at_s * 1000,
        json!({"tokens": tokens, "model": model, "status": status}),
    )
}

#[tokio::test]
async fn a_value_that_cannot_be_folded_is_dead_lettered_and_the_partition_goes_on() -> Result<()> {
    // Found by a hostile client: a sum past the exact decimal range stopped the aggregator,
    // and every restart replayed the same events into the same failure.
    let s = setup(1)?;
    let llm = |id: &str, at_s: i64, tokens: &str| llm_c1(id, at_s, tokens, "a", "ok");
    // Each value fits alone; the eighth would make the window's sum round (28 significant
    // digits at scale 10 no longer fit), so it is refused whole.
    let big = "999999999999999999.9999999999";
    let mut events = vec![
        llm("huge", 1, "79228162514264337593543950335"),
        llm("negative", 1, "-5"),
        llm("one", 1, "1"),
    ];
    for i in 0..8 {
        events.push(llm(&format!("big-{i}"), 2 + i, big));
    }
    let (running, shutdown) = start(&s, s.state.path(), |_| {})?;
    s.writer.send(0, &events).await?;
    wait_applied(&s, 0, events.len()).await?;
    let letters = dead_letters(s.kafka.bootstrap_servers(), 3).await?;
    let codes: Vec<&str> = letters.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        codes,
        ["invalid_value", "invalid_value", "value_out_of_range"]
    );
    let refused: neruba_schemas::Event = neruba_schemas::codec::decode(&mut letters[2].1.clone())?;
    assert_eq!(refused.id, "big-7");
    drop(shutdown);
    running.wait().await?;

    // A restart proceeds: later events are counted, and the window holds exactly the
    // events that fitted.
    let (running, shutdown) = start(&s, s.state.path(), |_| {})?;
    s.writer
        .send(
            0,
            &[
                llm("after", 660, "2"),
                api("closer", "other", 1200, "1", "x"),
            ],
        )
        .await?;
    let tokens = closed(&s, 2, 800, "c1", &["tokens"]).await?;
    assert_eq!(
        tokens,
        vec![
            row(
                "tokens",
                "model=a",
                0,
                ("7000000000000000000.9999999993", 8),
                ("7000000000000000000.9999999993", 8),
                1
            ),
            row(
                "tokens",
                "model=a",
                11,
                ("2", 1),
                ("7000000000000000002.9999999993", 9),
                1
            ),
        ]
    );
    drop(shutdown);
    running.wait().await?;
    Ok(())
}

#[tokio::test]
async fn a_client_opening_ever_new_windows_is_bounded_and_the_partition_goes_on() -> Result<()> {
    // Open windows are held in memory: a client sending a new group value (or customer) with
    // every event, or long ones, grew the aggregator without bound. Each tenant may hold
    // `--max-open-window-bytes` of them in a partition; an event opening more is
    // dead-lettered, and the windows free their bytes as they close.
    let s = setup(1)?;
    let llm = |id: &str, at_s: i64, model: &str| llm_c1(id, at_s, "1", model, "ok");
    let window = |model: &str, minute: i64| {
        let group = serde_json::to_string(&json!({ "model": model })).unwrap_or_default();
        let series = aggregator::keys::series("tokens", "c1", &group);
        aggregator::keys::window("t1", &series, t0() + minute * 60_000)
    };
    // Room for three windows of models m-0 .. m-9 (keys of one length).
    let cost = aggregator::state::open_cost(&window("m-0", 0));
    let long = "x".repeat(32 * 1024);
    let mut events = vec![
        llm("a0", 1, "m-0"),
        llm("a1", 1, "m-1"),
        llm("a2", 1, "m-2"),
    ];
    for i in 3..10 {
        events.push(llm(&format!("hostile-{i}"), 2, &format!("m-{i}")));
    }
    events.push(llm("long", 3, &long));
    // Open windows still take events, and another tenant opens its own.
    events.push(llm("a3", 4, "m-0"));
    events.push(event("t2", "b0", "api", "c9", t0() + 4_000, json!({})));
    // The next minutes' first events close minute 0 and open again.
    events.push(llm("a4", 62, "m-5"));
    events.push(llm("a5", 125, "m-6"));
    let registry = prometheus::Registry::new();
    let (running, shutdown) = start_with_registry(&s, s.state.path(), &registry, |c| {
        c.timing.max_open_window_bytes = 3 * cost;
    })?;
    s.writer.send(0, &events).await?;
    wait_applied(&s, 0, events.len()).await?;
    let letters = dead_letters(s.kafka.bootstrap_servers(), 8).await?;
    let refused: Vec<(String, String)> = letters
        .iter()
        .map(|(code, payload)| {
            let event: Event = neruba_schemas::codec::decode(&mut payload.clone())?;
            Ok((code.clone(), event.id))
        })
        .collect::<Result<_>>()?;
    let mut expected: Vec<(String, String)> = (3..10)
        .map(|i| ("too_many_open_windows".to_owned(), format!("hostile-{i}")))
        .collect();
    expected.push(("too_many_open_windows".to_owned(), "long".to_owned()));
    assert_eq!(refused, expected);
    // Minute 0 holds exactly the events that fitted; minute 1 (closed by the event at 125 s)
    // the one of m-5.
    let tokens = closed(&s, 4, 800, "c1", &["tokens"]).await?;
    assert_eq!(
        tokens,
        vec![
            row("tokens", "model=m-0", 0, ("2", 2), ("2", 2), 1),
            row("tokens", "model=m-1", 0, ("1", 1), ("1", 1), 1),
            row("tokens", "model=m-2", 0, ("1", 1), ("1", 1), 1),
            row("tokens", "model=m-5", 1, ("1", 1), ("1", 1), 1),
        ]
    );
    // Open now: t1's window of m-6 and t2's of c9 (the gauge is published at most once a
    // second, after a batch).
    let t2_cost = aggregator::state::open_cost(&aggregator::keys::window(
        "t2",
        &aggregator::keys::series("calls", "c9", "{}"),
        t0(),
    ));
    let expected = f64::from(u32::try_from(cost + t2_cost)?);
    let mut open_bytes = -1.0;
    for _ in 0..100 {
        open_bytes = registry
            .gather()
            .iter()
            .find(|f| f.name() == "neruba_open_window_bytes")
            .and_then(|f| f.get_metric().first().map(|m| m.get_gauge().get_value()))
            .unwrap_or(-1.0);
        if open_bytes == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(open_bytes, expected);
    drop(shutdown);
    running.wait().await?;
    Ok(())
}

#[tokio::test]
async fn malformed_message_and_unmetered_type_are_dead_lettered_not_dropped() -> Result<()> {
    let s = setup(1)?;
    let (running, shutdown) = start(&s, s.state.path(), |_| {})?;
    s.writer.send_raw(0, b"\x00not an event").await?;
    s.writer
        .send(
            0,
            &[event("t1", "x1", "unknown.type", "c1", t0(), json!({}))],
        )
        .await?;
    s.writer
        .send(0, &[event("nobody", "x2", "api", "c1", t0(), json!({}))])
        .await?;
    let letters = dead_letters(s.kafka.bootstrap_servers(), 3).await?;
    let codes: Vec<&str> = letters.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        codes,
        ["invalid_json", "no_matching_meter", "unknown_tenant"]
    );
    assert_eq!(letters[0].1, b"\x00not an event");
    drop(shutdown);
    running.wait().await?;
    Ok(())
}

/// A stream of `api` events over `minutes` minutes for `customers`, with repeats of earlier ids.
fn stream(customers: &[&str], per_customer: usize, minutes: i64) -> Vec<Event> {
    let mut events = Vec::new();
    for (c, customer) in customers.iter().enumerate() {
        for i in 0..per_customer {
            let at_ms = (i64::try_from(i).unwrap_or(0) * minutes * 60_000)
                / i64::try_from(per_customer).unwrap_or(1);
            let ms = format!("{}.{}", (i * 7 + c) % 100, i % 10);
            let mut e = api(
                &format!("{customer}-{i}"),
                customer,
                0,
                &ms,
                &format!("u{}", i % 13),
            );
            e.time_ms = t0() + at_ms;
            events.push(e.clone());
            if i % 10 == 3 {
                // A repeat of an earlier id, with the same content, a little later in the stream.
                events.push(e);
            }
        }
    }
    events
}

/// Ground truth for `calls` and `latency_max` per (customer, minute): window and period values.
fn truth(events: &[Event]) -> BTreeMap<(String, String, i64), (Decimal, Decimal)> {
    let mut distinct: BTreeMap<(String, String), &Event> = BTreeMap::new();
    for e in events {
        distinct
            .entry((e.subject.clone(), e.id.clone()))
            .or_insert(e);
    }
    let mut per_window: BTreeMap<(String, i64), (u64, Decimal)> = BTreeMap::new();
    for e in distinct.values() {
        let minute = (e.time_ms - t0()).div_euclid(60_000);
        let ms = e
            .data
            .get("ms")
            .and_then(|v| v.as_str())
            .map(d)
            .unwrap_or_default();
        let entry = per_window
            .entry((e.subject.clone(), minute))
            .or_insert((0, Decimal::MIN));
        entry.0 += 1;
        entry.1 = entry.1.max(ms);
    }
    let mut out = BTreeMap::new();
    let mut running: BTreeMap<String, (u64, Decimal)> = BTreeMap::new();
    for ((customer, minute), (count, max)) in per_window {
        let r = running.entry(customer.clone()).or_insert((0, Decimal::MIN));
        r.0 += count;
        r.1 = r.1.max(max);
        out.insert(
            (customer.clone(), "calls".to_owned(), minute),
            (Decimal::from(count), Decimal::from(r.0)),
        );
        out.insert((customer, "latency_max".to_owned(), minute), (max, r.1));
    }
    out
}

fn observed(
    rollups: &BTreeMap<String, Rollup>,
) -> BTreeMap<(String, String, i64), (Decimal, Decimal)> {
    rollups
        .values()
        .filter(|r| r.meter == "calls" || r.meter == "latency_max")
        .filter(|r| !r.customer.starts_with("closer"))
        .map(|r| {
            (
                (
                    r.customer.clone(),
                    r.meter.clone(),
                    (r.window_start_ms - t0()) / 60_000,
                ),
                (r.window_quantity, r.period_quantity),
            )
        })
        .collect()
}

/// The latest rollup of every `calls` and `latency_max` window on the rollups topic equals the
/// ground truth of `events` (each id once), window and period values alike.
async fn assert_rollups_match_truth(s: &Setup, events: &[Event]) -> Result<()> {
    let expected = truth(events);
    let all = rollups_on_topic(
        s.kafka.bootstrap_servers(),
        expected.len(),
        Duration::from_millis(500),
    )
    .await?;
    assert_eq!(observed(&latest_rollups(all)?), expected);
    Ok(())
}

/// Crashes the aggregator at `crash`, its batches of 25 handing their rollups every `hand_every`
/// events, then restarts it: the rollups must match the ground truth.
async fn crash_then_restart(crash: aggregator::CrashPoint, hand_every: usize) -> Result<()> {
    let s = setup(1)?;
    let events = stream(&["c1", "c2", "c3"], 400, 8);
    s.writer.send(0, &events).await?;
    s.writer
        .send(0, &[api("closer", "closer", 3600, "1", "x")])
        .await?;
    let total = i64::try_from(events.len() + 1)?;

    // 1. Small batches, each handing its rollups to the sending thread every `hand_every`
    //    events; the injected crash stops the process abruptly part-way.
    let (running, _shutdown) = start(&s, s.state.path(), |c| {
        c.stage.max_batch = 25;
        c.stage.hand_every = hand_every;
        c.stage.crash = Some(crash);
    })?;
    running.wait().await?;
    // 2. What survived the crash: an offset part-way through the stream.
    let dir = aggregator::state::partition_dir(s.state.path(), topics::EVENTS, 0);
    let stored = aggregator::state::stored_offset(&dir)?.unwrap_or(0);
    assert!(
        stored > 0 && stored < total,
        "crashed at offset {stored} of {total}"
    );
    // 3. Restart on the same state: it resumes from the offset stored with the state.
    let (running, shutdown) = start(&s, s.state.path(), |c| {
        c.stage.max_batch = 25;
        c.stage.hand_every = 5;
    })?;
    wait_applied(&s, 0, events.len() + 1).await?;
    assert_rollups_match_truth(&s, &events).await?;
    drop(shutdown);
    running.wait().await?;
    Ok(())
}

#[tokio::test]
async fn crash_mid_batch_then_restart_gives_exact_rollups() -> Result<()> {
    // Rollups handed every 5 events: the crash comes after some of the batch's were sent.
    crash_then_restart(aggregator::CrashPoint::AfterMessages(707), 5).await
}

#[tokio::test]
async fn crash_after_emitting_before_writing_reemits_identical_rollups() -> Result<()> {
    // The closer at the end closes every window in one batch; crash after emitting them.
    crash_then_restart(aggregator::CrashPoint::BeforeWrite(1321), 5).await
}

#[tokio::test]
async fn a_kill_that_cuts_a_batchs_rollups_short_writes_nothing_of_it() -> Result<()> {
    // Every rollup of a batch handed at its end (`hand_every` past the batch): the kill as the
    // closer's batch hands them leaves them unsent, so that batch must not be written, or its
    // rollups would never come.
    crash_then_restart(aggregator::CrashPoint::WhileSending(1321), 1_000).await
}

#[tokio::test]
async fn two_instances_with_a_rebalance_mid_stream_keep_totals_exact() -> Result<()> {
    let s = setup(2)?;
    let events_p0 = stream(&["c1", "c2"], 300, 6);
    let events_p1 = stream(&["c3", "c4"], 300, 6);
    let (half0, rest0) = events_p0.split_at(events_p0.len() / 2);
    let (half1, rest1) = events_p1.split_at(events_p1.len() / 2);

    // 1. One instance owns both partitions and applies the first half.
    let (registry_a, registry_b) = (prometheus::Registry::new(), prometheus::Registry::new());
    let (a, stop_a) = start_with_registry(&s, s.state.path(), &registry_a, |c| {
        c.stage.max_batch = 50;
        c.stage.hand_every = 5;
    })?;
    s.writer.send(0, half0).await?;
    s.writer.send(1, half1).await?;
    wait_applied(&s, 0, half0.len()).await?;
    wait_applied(&s, 1, half1.len()).await?;
    assert_eq!(assigned(&registry_a), 2);
    // 2. A second instance joins the group (same state volume): the rebalance hands it one
    //    partition with its state, mid-stream.
    let (b, stop_b) = start_with_registry(&s, s.state.path(), &registry_b, |c| {
        c.stage.max_batch = 50;
        c.stage.hand_every = 5;
    })?;
    //    The embedded broker's coordinator waits the session timeout less a second (9 s) for
    //    members to rejoin each round, and on a loaded machine one member may miss a round and
    //    get nothing until the next (seen in CI: two rounds took more than 20 s).
    assert_eq!(
        owned_within_a_minute(&[&registry_a, &registry_b], &[1, 1]).await,
        [1, 1]
    );
    // 3. The rest of the stream, then events that close every window.
    s.writer.send(0, rest0).await?;
    s.writer.send(1, rest1).await?;
    s.writer
        .send(0, &[api("closer-0", "closer-0", 3600, "1", "x")])
        .await?;
    s.writer
        .send(1, &[api("closer-1", "closer-1", 3600, "1", "x")])
        .await?;
    wait_applied(&s, 0, events_p0.len() + 1).await?;
    wait_applied(&s, 1, events_p1.len() + 1).await?;
    let mut all_events = events_p0.clone();
    all_events.extend(events_p1.iter().cloned());
    assert_rollups_match_truth(&s, &all_events).await?;
    drop(stop_a);
    drop(stop_b);
    a.wait().await?;
    b.wait().await?;
    // Each message was made durable once, by one instance: the partition that moved was
    // written by its first owner as it let go, and the messages that owner had fetched but
    // no longer owned were left to the next.
    let written = batches(&registry_a).0 + batches(&registry_b).0;
    assert_eq!(
        written,
        u64::try_from(events_p0.len() + events_p1.len() + 2)?
    );
    Ok(())
}

#[tokio::test]
async fn a_member_fenced_under_its_instance_id_stops_the_stage_with_the_error() -> Result<()> {
    // Was: librdkafka's fatal error (another member joined under the same `group.instance.id`
    // and the coordinator fenced this one) was logged as any consumer error, and the stage
    // went on polling a consumer that would read nothing more, answering ready.
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let s = setup(1)?;
    let registry = prometheus::Registry::new();
    let (running, _stop) = start_with_registry(&s, s.state.path(), &registry, |c| {
        c.stage.instance_id = Some("aggregator-0".into());
    })?;
    assert_eq!(owned_within_a_minute(&[&registry], &[1]).await, [1]);
    // The coordinator answers the member's next heartbeats: fenced.
    s.kafka.fail_requests(
        RDKafkaApiKey::Heartbeat,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID; 3],
    );
    let stopped = tokio::time::timeout(Duration::from_secs(30), running.wait())
        .await
        .map_err(|_| anyhow::anyhow!("the fenced stage still runs 30 s later"))?;
    assert!(
        matches!(
            stopped,
            Err(neruba_stage::Error::Kafka(
                KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::FencedInstanceId)
            ))
        ),
        "{stopped:?}"
    );
    Ok(())
}

#[tokio::test]
async fn two_workers_in_one_process_split_the_partitions_and_keep_totals_exact() -> Result<()> {
    let s = setup(4)?;
    let customers = [["c1", "c2"], ["c3", "c4"], ["c5", "c6"], ["c7", "c8"]];
    let mut all_events = Vec::new();
    for (partition, names) in (0..).zip(&customers) {
        let events = stream(names, 150, 6);
        s.writer.send(partition, &events).await?;
        let closer = format!("closer-{partition}");
        s.writer
            .send(partition, &[api(&closer, &closer, 3600, "1", "x")])
            .await?;
        all_events.push(events);
    }
    let registry = prometheus::Registry::new();
    let (running, shutdown) = start_with_registry(&s, s.state.path(), &registry, |c| {
        c.stage.max_batch = 40;
        c.stage.workers = 2;
        c.stage.assignment = Some(topics::Assignment::All);
    })?;
    for (partition, events) in (0..).zip(&all_events) {
        wait_applied(&s, partition, events.len() + 1).await?;
    }
    // Both workers' shares add up to the process's partitions.
    assert_eq!(assigned(&registry), 4);
    let all_events: Vec<Event> = all_events.into_iter().flatten().collect();
    assert_rollups_match_truth(&s, &all_events).await?;
    drop(shutdown);
    running.wait().await?;
    Ok(())
}
