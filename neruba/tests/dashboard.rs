//! The Grafana dashboard cannot drift from the code: a real Prometheus server scrapes a
//! running pipeline, and every query of every panel in `k8s/dashboards/neruba.json` must
//! return data: at least one sample that is a number (a quantile of histograms that observed
//! nothing is NaN, which Grafana draws as nothing). The traffic is events through the gateway and
//! reads from the api. The same Prometheus loads the alerting rules of `k8s/alerts.yaml`: each
//! must evaluate without error, and every metric of the pipeline's they read must have a series
//! (a rule reading a metric that is not exported, or not yet at 0, would never fire).
//!
//! Prometheus is Debian's `prometheus` package (`./scripts/prereqs.sh` installs it), or the
//! binary `NERUBA_PROMETHEUS` names. Everything listens on 127.0.0.1 ports chosen here.

mod common;

use anyhow::{Context, Result, bail};
use common::{Proc, alert_rules, free_port, start_dev};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const DASHBOARD: &str = include_str!("../../k8s/dashboards/neruba.json");

fn prometheus_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("NERUBA_PROMETHEUS") {
        return Ok(PathBuf::from(path));
    }
    let path = PathBuf::from("/usr/bin/prometheus");
    if !path.exists() {
        bail!(
            "no Prometheus at /usr/bin/prometheus (run ./scripts/prereqs.sh, or set NERUBA_PROMETHEUS)"
        );
    }
    Ok(path)
}

/// Every `(panel title, expr)` of the dashboard.
fn dashboard_queries() -> Result<Vec<(String, String)>> {
    let dashboard: Value = serde_json::from_str(DASHBOARD)?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        let title = panel["title"].as_str().context("panel title")?;
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title} must use the dashboard's datasource variable"
        );
        for target in panel["targets"].as_array().context("targets")? {
            let expr = target["expr"].as_str().context("expr")?;
            queries.push((title.to_owned(), expr.to_owned()));
        }
    }
    Ok(queries)
}

/// For each selector of a pipeline's metric an alert reads (its name and label matchers),
/// `(alert, a query with data while the selector has a series)`.
fn alert_metric_queries() -> Result<Vec<(String, String)>> {
    let spec: serde_yaml::Value = serde_yaml::from_str(&alert_rules()?)?;
    let mut queries = std::collections::BTreeSet::new();
    for group in spec["groups"].as_sequence().context("groups")? {
        for rule in group["rules"].as_sequence().context("rules")? {
            let alert = rule["alert"].as_str().context("alert")?;
            let expr = rule["expr"].as_str().context("expr")?;
            let mut rest = expr;
            while let Some(at) = rest.find("neruba_") {
                let tail = &rest[at..];
                let name_end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let end = if tail[name_end..].starts_with('{') {
                    tail.find('}').map_or(tail.len(), |close| close + 1)
                } else {
                    name_end
                };
                for selector in alternatives(&tail[..end]) {
                    queries.insert((format!("alert {alert}"), format!("count({selector})")));
                }
                rest = &tail[end..];
            }
        }
    }
    Ok(queries.into_iter().collect())
}

/// `selector` with a matcher of alternatives (`consumer=~"aggregator|rater"`) made one selector
/// per alternative, so each must have a series; other selectors as they are.
fn alternatives(selector: &str) -> Vec<String> {
    let Some(at) = selector.find("=~\"") else {
        return vec![selector.to_owned()];
    };
    let values = &selector[at + 3..];
    let Some(close) = values.find('"') else {
        return vec![selector.to_owned()];
    };
    let plain = |value: &str| {
        !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    let options: Vec<&str> = values[..close].split('|').collect();
    if options.len() < 2 || !options.iter().all(|option| plain(option)) {
        return vec![selector.to_owned()];
    }
    let (before, after) = (&selector[..at], &values[close + 1..]);
    options
        .into_iter()
        .map(|option| format!("{before}=\"{option}\"{after}"))
        .collect()
}

/// A batch of acme events around `time_ms`: valid ones, a repeat and an invalid one, so every
/// outcome has a series.
fn batch(round: u32, time_ms: i64) -> Value {
    let time = neruba_schemas::event::format_time_ms(time_ms);
    let mut events: Vec<Value> = (0..20)
        .map(|i| {
            json!({"specversion": "1.0", "id": format!("d-{round}-{i}"), "type": "llm.completion",
                "subject": format!("c-{}", i % 3), "time": time,
                "data": {"model": "large", "tokens": "1200", "status": "ok"}})
        })
        .collect();
    events.push(events[0].clone());
    events.push(
        json!({"specversion": "1.0", "id": format!("d-{round}-bad"), "type": "api.request",
        "subject": "c-0", "time": "yesterday", "data": {}}),
    );
    Value::Array(events)
}

/// Whether a query result holds a sample that is a number (not NaN).
fn has_data(result: &[Value]) -> bool {
    result.iter().any(|series| {
        series["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| !v.is_nan())
    })
}

async fn query(client: &reqwest::Client, prometheus: &str, expr: &str) -> Result<Vec<Value>> {
    let body: Value = client
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await?
        .json()
        .await?;
    if body["status"] != "success" {
        bail!("query `{expr}` failed: {body}");
    }
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn start_prometheus(work: &Path, target: &str) -> Result<(Proc, String)> {
    let port = free_port()?;
    let config = work.join("prometheus.yml");
    let rules = work.join("rules.yaml");
    std::fs::write(&rules, alert_rules()?)?;
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: ['{}']\n\
             scrape_configs:\n  - job_name: neruba\n    static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        ),
    )?;
    let args = vec![
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", work.join("tsdb").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
    ];
    let mut process = Proc::new("prometheus", &prometheus_binary()?, &args, work);
    process.start()?;
    Ok((process, format!("http://127.0.0.1:{port}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_alerting_rule_works_in_a_real_prometheus() -> Result<()> {
    let queries = dashboard_queries()?;
    assert!(
        queries.len() >= 14,
        "the dashboard lost panels: {queries:?}"
    );
    for metric in ["neruba_api_read_seconds", "consumer=\"api\""] {
        assert!(
            queries.iter().any(|(_, expr)| expr.contains(metric)),
            "the dashboard lost the api's {metric}: {queries:?}"
        );
    }
    let work = tempfile::tempdir()?;
    let state = work.path().join("state").display().to_string();
    // From a file, as every deployed component reads it: what reloads it is then running too.
    let catalog = work.path().join("catalog.toml");
    std::fs::write(&catalog, neruba::sample::CATALOG_TOML)?;
    let catalog = catalog.display().to_string();
    let (mut pipeline, base, api) =
        start_dev(work.path(), &["--state-dir", &state, "--catalog", &catalog]).await?;
    let listen = base.trim_start_matches("http://").to_owned();
    let client = reqwest::Client::new();
    let (mut prometheus, prometheus_url) = start_prometheus(work.path(), &listen)?;
    let key = neruba::sample::ingest_key("acme").context("dev key")?;
    let read_key = neruba::sample::dev_key("acme", "read").context("dev read key")?;

    // Prometheus scrapes the series at zero before any traffic: what happens only at the start
    // (the first windows closing) is then an increase that `rate` sees.
    let scraping = Instant::now();
    while query(&client, &prometheus_url, "up == 1")
        .await
        .map_or(true, |r| r.is_empty())
    {
        if scraping.elapsed() > Duration::from_secs(30) {
            bail!(
                "Prometheus did not scrape the pipeline:\n{}",
                prometheus.log_tail(10)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Traffic keeps flowing while Prometheus scrapes, so rates and quantiles have samples.
    let alert_metrics = alert_metric_queries()?;
    assert!(
        alert_metrics.len() >= 15,
        "the alerts read fewer metrics: {alert_metrics:?}"
    );
    let mut missing: Vec<(String, String)> =
        queries.iter().chain(&alert_metrics).cloned().collect();
    let mut round = 0;
    let started = Instant::now();
    while !missing.is_empty() && started.elapsed() < Duration::from_secs(90) {
        round += 1;
        // Two minutes in the past: the first round's windows close at the first idle tick; the
        // watermark then follows the wall clock, and later rounds revise closed windows.
        let time_ms = neruba_schemas::event::now_ms() - 120_000;
        let response = client
            .post(format!("{base}/v1/events"))
            .bearer_auth(key)
            .json(&batch(round, time_ms))
            .send()
            .await?;
        assert_eq!(response.status(), 200, "{}", response.text().await?);
        // A few reads, so the api's read latency has observations: 503 (with the api not
        // listening yet) only until its read model has caught up.
        for _ in 0..3 {
            let Ok(response) = client
                .get(format!("{api}/v1/customers"))
                .bearer_auth(read_key)
                .send()
                .await
            else {
                continue;
            };
            let status = response.status();
            assert!(
                status == 200 || status == 503,
                "GET {api}/v1/customers: {status} {}",
                response.text().await?
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut still = Vec::new();
        for (title, expr) in missing {
            let empty = query(&client, &prometheus_url, &expr)
                .await
                .map_or(true, |r| !has_data(&r));
            if empty {
                still.push((title, expr));
            }
        }
        missing = still;
    }
    let lines: Vec<String> = missing
        .iter()
        .map(|(title, expr)| format!("{title}: {expr}"))
        .collect();
    let rules: Value = client
        .get(format!("{prometheus_url}/api/v1/rules"))
        .send()
        .await?
        .json()
        .await?;
    let evaluated: Vec<(String, String)> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
        .map(|rule| {
            let error = rule["lastError"].as_str().unwrap_or_default();
            (
                rule["name"].as_str().unwrap_or_default().to_owned(),
                format!("{} {error}", rule["health"].as_str().unwrap_or_default()),
            )
        })
        .collect();
    let prometheus_log = prometheus.log_tail(10);
    prometheus.kill()?;
    pipeline.kill()?;
    assert!(
        missing.is_empty(),
        "dashboard and alert queries without data after {round} rounds:\n{}\nprometheus:\n{prometheus_log}",
        lines.join("\n")
    );
    let unhealthy: Vec<&(String, String)> = evaluated
        .iter()
        .filter(|(_, health)| health.trim() != "ok")
        .collect();
    assert!(
        evaluated.len() >= 15 && unhealthy.is_empty(),
        "alerting rules loaded and evaluated: {evaluated:?}\nprometheus:\n{prometheus_log}"
    );
    Ok(())
}
