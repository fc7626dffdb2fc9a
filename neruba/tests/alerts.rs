//! The alerting rules in `k8s/alerts.yaml` are rules Prometheus loads (`promtool check rules`)
//! and fire when, and only when, their unit tests say (`promtool test rules` on
//! `tests/alerts.promtool.yaml`); every alert has a test in which it fires, a severity, a
//! summary and a description. That every metric they read is one the pipeline exports is
//! checked against a running pipeline in `tests/dashboard.rs`.
//!
//! promtool comes with Debian's `prometheus` package (`./scripts/prereqs.sh` installs it), or
//! is the binary `NERUBA_PROMTOOL` names.

mod common;

use anyhow::{Context, Result, bail, ensure};
use common::alert_rules;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT_TESTS: &str = include_str!("alerts.promtool.yaml");

fn promtool() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("NERUBA_PROMTOOL") {
        return Ok(PathBuf::from(path));
    }
    let path = PathBuf::from("/usr/bin/promtool");
    ensure!(
        path.exists(),
        "no promtool at /usr/bin/promtool (run ./scripts/prereqs.sh, or set NERUBA_PROMTOOL)"
    );
    Ok(path)
}

fn run(promtool: &Path, dir: &Path, args: &[&str]) -> Result<()> {
    let output = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("promtool {args:?}"))?;
    if !output.status.success() {
        bail!(
            "promtool {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

#[test]
fn every_alert_loads_says_what_it_means_and_fires_as_its_unit_tests_say() -> Result<()> {
    let spec: serde_yaml::Value = serde_yaml::from_str(&alert_rules()?)?;
    let unit_tests: serde_yaml::Value = serde_yaml::from_str(UNIT_TESTS)?;
    // The labels of every sample the unit tests expect.
    let expected: Vec<&str> = unit_tests["tests"]
        .as_sequence()
        .context("tests")?
        .iter()
        .filter_map(|test| test["promql_expr_test"].as_sequence())
        .flatten()
        .filter_map(|check| check["exp_samples"].as_sequence())
        .flatten()
        .filter_map(|sample| sample["labels"].as_str())
        .collect();
    let mut names = BTreeSet::new();
    for group in spec["groups"].as_sequence().context("groups")? {
        for rule in group["rules"].as_sequence().context("rules")? {
            let name = rule["alert"].as_str().context("an alert without a name")?;
            ensure!(names.insert(name.to_owned()), "{name} twice");
            ensure!(name.starts_with("Neruba"), "{name}: not named Neruba…");
            let severity = rule["labels"]["severity"].as_str();
            ensure!(
                matches!(severity, Some("warning" | "critical")),
                "{name}: severity {severity:?}"
            );
            for annotation in ["summary", "description"] {
                ensure!(
                    rule["annotations"][annotation]
                        .as_str()
                        .is_some_and(|text| !text.trim().is_empty()),
                    "{name}: no {annotation}"
                );
            }
            let alert = format!("alertname=\"{name}\"");
            ensure!(
                expected
                    .iter()
                    .any(|labels| labels.contains(&alert)
                        && labels.contains("alertstate=\"firing\"")),
                "{name} has no unit test in which it fires (tests/alerts.promtool.yaml)"
            );
        }
    }
    ensure!(names.len() >= 15, "alerts lost: {names:?}");

    let promtool = promtool()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("rules.yaml"), alert_rules()?)?;
    std::fs::write(dir.path().join("alerts.promtool.yaml"), UNIT_TESTS)?;
    run(&promtool, dir.path(), &["check", "rules", "rules.yaml"])?;
    run(
        &promtool,
        dir.path(),
        &["test", "rules", "alerts.promtool.yaml"],
    )?;
    Ok(())
}
