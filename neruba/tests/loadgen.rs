//! `neruba loadgen` as a process against `neruba dev` (a process too): what it reports must
//! add up exactly, repeats must be the generator's, and the ledger it tails must hold exactly
//! the usage of the distinct events it sent.

mod common;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// Runs `neruba loadgen --json` with `args`, returns its report.
async fn loadgen(args: Vec<String>) -> Result<Value> {
    let output = tokio::task::spawn_blocking(move || {
        Command::new(Path::new(env!("CARGO_BIN_EXE_neruba")))
            .arg("loadgen")
            .arg("--json")
            .args(&args)
            .env("NERUBA_LOG", "warn")
            .output()
    })
    .await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "loadgen failed: {stderr}");
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "not a JSON report: {}\n{stderr}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn u(report: &Value, path: &str) -> u64 {
    report
        .pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_seeded_run_reports_exact_outcomes_and_the_ledger_holds_its_distinct_usage() -> Result<()>
{
    let work = tempfile::tempdir()?;
    let (pipeline, base, _api) = common::start_dev(work.path(), &[]).await?;
    let brokers = common::dev_bootstrap(&pipeline)?;
    let key = neruba::sample::dev_key("acme", "ingest").context("dev key")?;
    let args = |extra: &[&str]| -> Vec<String> {
        [
            "--url",
            &base,
            "--key",
            key,
            "--events",
            "3000",
            "--seed",
            "7",
            "--duplicate-fraction",
            "0.1",
            "--customers",
            "20",
            "--batch-size",
            "100",
            "--connections",
            "4",
            "--late-fraction",
            "0.05",
            "--late-by",
            "3m",
        ]
        .iter()
        .chain(extra)
        .map(|s| (*s).to_owned())
        .collect()
    };

    // 1. 3,000 events, a tenth of them repeats, some late by up to 3 minutes; the ledger is
    //    tailed until the run's last window closed (dev closes at once: no grace, 1 s idle).
    let report = loadgen(args(&[
        "--brokers",
        &brokers,
        "--grace",
        "0s",
        "--idle-timeout",
        "1s",
        "--settle",
        "3s",
        "--settle-timeout",
        "150s",
    ]))
    .await?;
    let (accepted, duplicate) = (u(&report, "/accepted"), u(&report, "/duplicate"));
    assert_eq!(u(&report, "/sent"), 3000);
    assert_eq!(u(&report, "/generated/events"), 3000);
    assert_eq!(
        (u(&report, "/rejected"), u(&report, "/failed")),
        (0, 0),
        "{report}"
    );
    assert_eq!(accepted + duplicate, 3000);
    // The generator's repeats for seed 7 (each of an event answered before it was re-sent),
    // all answered `duplicate`; every new event accepted.
    assert_eq!(u(&report, "/generated/repeats"), 229, "{report}");
    assert_eq!(duplicate, 229);
    assert_eq!(accepted, u(&report, "/generated/distinct"));
    assert_eq!(u(&report, "/generated/late"), 134, "{report}");
    assert_eq!(u(&report, "/requests/answered_429"), 0);
    assert_eq!(u(&report, "/requests/answered_503"), 0);
    // Its own CPU while sending (the reading itself: `neruba::process`'s tests), at most every
    // core of the machine for the whole time, and per event that figure over the events sent.
    let cpu_ms = report["own_cpu"]["ms"].as_u64().context("no own_cpu")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    assert!(
        cpu_ms <= (u(&report, "/elapsed_ms") + 20) * cores,
        "{report}"
    );
    assert_eq!(
        u(&report, "/own_cpu/ns_per_event"),
        cpu_ms * 1_000_000 / 3000,
        "{report}"
    );

    // 2. The ledger caught up, and its llm_tokens quantity for the run's customers is exactly
    //    the new events' tokens: summed over windows (latest revision each) and over series
    //    (the period quantity of each series' latest window).
    let ledger = report.get("ledger").context("no ledger report")?;
    assert_eq!(ledger["caught_up"], true, "{report}");
    let tokens = u(&report, "/generated/tokens").to_string();
    assert_eq!(
        ledger["quantity"]["llm_tokens"]["windows"],
        tokens.as_str(),
        "{report}"
    );
    assert_eq!(
        ledger["quantity"]["llm_tokens"]["periods"],
        tokens.as_str(),
        "{report}"
    );
    assert!(
        u(&report, "/ledger/adjustments") > 0,
        "late events revise closed windows: {report}"
    );
    assert!(
        report["ledger"]["last_item_after_last_accept_ms"].is_u64(),
        "{report}"
    );

    // 3. The same seed again sends the same ids: every event is a duplicate now.
    let again = loadgen(args(&[])).await?;
    assert_eq!(
        (u(&again, "/accepted"), u(&again, "/duplicate")),
        (0, 3000),
        "{again}"
    );
    assert_eq!(
        u(&again, "/generated/tokens"),
        u(&report, "/generated/tokens")
    );
    Ok(())
}
