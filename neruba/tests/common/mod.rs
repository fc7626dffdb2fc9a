//! A real Kafka-protocol broker (tansu) and the pipeline's components as separate OS processes,
//! for the end-to-end fault tests. Everything listens on 127.0.0.1 ports chosen here, and is
//! stopped when its handle drops.

#![allow(dead_code)]

use anyhow::{Context, Result, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released for the child to take).
pub(crate) fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Where the tansu binary is: `NERUBA_TANSU`, else the cache `scripts/prereqs.sh` fills.
pub(crate) fn tansu_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("NERUBA_TANSU") {
        return Ok(PathBuf::from(path));
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let path = PathBuf::from(home).join(".cache/neruba-tools/bin/tansu");
    if !path.exists() {
        bail!(
            "no tansu broker at {} (run ./scripts/prereqs.sh, or set NERUBA_TANSU)",
            path.display()
        );
    }
    Ok(path)
}

/// A child process that is killed when dropped.
pub(crate) struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// How it last exited on its own, once [`Proc::running`] saw it.
    exited: Option<std::process::ExitStatus>,
    pub starts: u32,
}

impl Proc {
    pub(crate) fn new(name: &str, program: &Path, args: &[String], log_dir: &Path) -> Self {
        Self {
            name: name.to_owned(),
            program: program.to_path_buf(),
            args: args.to_vec(),
            log: log_dir.join(format!("{name}.log")),
            child: None,
            exited: None,
            starts: 0,
        }
    }

    pub(crate) fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("NERUBA_LOG", "info")
            // An error a component exits with is printed without the backtrace of `main`,
            // where it was returned (which filled the log's tail and hid the error); panics
            // keep theirs.
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.name))?;
        self.child = Some(child);
        self.exited = None;
        self.starts += 1;
        Ok(())
    }

    /// SIGKILL: no chance to clean up.
    pub(crate) fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `patience` for a clean exit; returns its success.
    pub(crate) fn terminate(&mut self, patience: Duration) -> Result<bool> {
        if self.child.is_none() {
            return Ok(true);
        }
        self.signal("TERM")?;
        let Some(mut child) = self.child.take() else {
            return Ok(true);
        };
        let started = Instant::now();
        while started.elapsed() < patience {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.kill()?;
        child.wait()?;
        bail!("{} did not exit within {patience:?} of SIGTERM", self.name)
    }

    /// Sends `signal` (a `kill` name such as `STOP` or `CONT`) to the running process.
    pub(crate) fn signal(&self, signal: &str) -> Result<()> {
        let Some(child) = &self.child else {
            bail!("{} is not running", self.name);
        };
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {} failed", self.name);
        }
        Ok(())
    }

    /// Whether it is still running (a component that exits on its own is a finding:
    /// [`Proc::exit_report`] says how).
    pub(crate) fn running(&mut self) -> bool {
        let Some(child) = &mut self.child else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                self.exited = Some(status);
                false
            }
            Err(_) => false,
        }
    }

    /// For a component that exited on its own: its exit status (a code, or the signal that
    /// ended it) and the last `lines` of its log.
    pub(crate) fn exit_report(&self, lines: usize) -> String {
        let status = self
            .exited
            .map_or_else(|| "exit status not seen".to_owned(), |s| s.to_string());
        format!(
            "{} {status}; its log ends:\n{}",
            self.name,
            self.log_tail(lines)
        )
    }

    /// Its process id while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The lines of its log (every start's) that contain `needle`.
    pub(crate) fn log_lines_with(&self, needle: &str) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|line| line.contains(needle))
            .map(|line| format!("{}: {line}", self.name))
            .collect()
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A tansu broker process with in-memory storage.
///
/// Known broker defect: tansu 0.6.0's `memory://` engine answers a fetch from an offset inside
/// a stored record batch with the batch after it (a librdkafka consumer fetching from offset 5
/// of a batch holding 0–9 gets 10 onwards; its `sqlite://` engine returns 5, as Kafka does). A
/// stage resuming mid-batch after a kill then skips the rest of that batch (the aggregator and
/// the balances stage report it: `neruba_stage_skipped_offsets_total` and an error logged; the
/// rater, reading the compacted rollups topic, is not checked). So the crash soak's
/// producers write one record per batch (`batch.num.messages=1`); with their default batching
/// and `NERUBA_BALANCES_MAX_BATCH=1` it failed on the balance entries.
pub(crate) struct Broker {
    pub bootstrap: String,
    pub process: Proc,
}

impl Broker {
    /// Starts tansu on a free loopback port. It cannot be given port 0 (it advertises the
    /// address it is given), so the port is picked here, and another process may take it
    /// before tansu binds it: tansu then exits at once, and is started again on another port,
    /// three times at most. Each start names its own cluster id, and the broker is ready once
    /// the port answers with that id, so another test's broker on the port is never taken for
    /// this one.
    pub(crate) fn start(log_dir: &Path) -> Result<Self> {
        let mut exits = Vec::new();
        for attempt in 1..=3 {
            let port = free_port()?;
            let url = format!("tcp://127.0.0.1:{port}");
            let cluster = format!("neruba-test-{}-{port}-{attempt}", std::process::id());
            let args = vec![
                "broker".to_owned(),
                "--cluster-id".to_owned(),
                cluster.clone(),
                "--listener-url".to_owned(),
                url.clone(),
                "--advertised-listener-url".to_owned(),
                url,
                "--storage-engine".to_owned(),
                "memory://tansu/".to_owned(),
            ];
            let mut process = Proc::new("tansu", &tansu_binary()?, &args, log_dir);
            process.start()?;
            let mut broker = Self {
                bootstrap: format!("127.0.0.1:{port}"),
                process,
            };
            if broker.wait_ready(&cluster, Duration::from_secs(20))? {
                return Ok(broker);
            }
            exits.push(broker.process.exit_report(5));
        }
        bail!("tansu exited three times:\n{}", exits.join("\n"))
    }

    /// Waits until the broker answers with cluster id `cluster`: `true`, or `false` at once if
    /// the process exited (its port was taken).
    fn wait_ready(&mut self, cluster: &str, patience: Duration) -> Result<bool> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()?;
        let started = Instant::now();
        loop {
            if !self.process.running() {
                return Ok(false);
            }
            if consumer
                .client()
                .fetch_cluster_id(Duration::from_secs(1))
                .as_deref()
                == Some(cluster)
            {
                return Ok(true);
            }
            if started.elapsed() > patience {
                bail!(
                    "tansu did not answer within {patience:?}: {}",
                    self.process.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Creates `(name, partitions)` topics.
    pub(crate) async fn create_topics(&self, topics: &[(&str, i32)]) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        for result in admin.create_topics(&new, &AdminOptions::new()).await? {
            if let Err((topic, code)) = result {
                bail!("create topic {topic}: {code:?}");
            }
        }
        Ok(())
    }
}

/// `neruba dev` (the whole pipeline on its embedded broker) as a process on loopback ports it
/// binds itself (port 0, read back from its banner: a port picked here and released could be
/// taken by another test before the child bound it), closing windows quickly (no grace, 1 s idle
/// timeout), with `extra` flags; returned once its HTTP listener answers, with the gateway's base
/// URL and the api's. Its state is under
/// `work` unless `extra` names a `--state-dir`: a killed process cannot remove a temporary
/// directory of its own, and each left behind about 300 MB.
pub(crate) async fn start_dev(work: &Path, extra: &[&str]) -> Result<(Proc, String, String)> {
    let mut args: Vec<String> = [
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--grace",
        "0s",
        "--idle-timeout",
        "1s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    if !extra
        .iter()
        .any(|a| *a == "--state-dir" || a.starts_with("--state-dir="))
    {
        args.push("--state-dir".to_owned());
        args.push(work.join("dev-state").display().to_string());
    }
    let mut pipeline = Proc::new(
        "pipeline",
        Path::new(env!("CARGO_BIN_EXE_neruba")),
        &args,
        work,
    );
    pipeline.start()?;
    let base = dev_banner(&pipeline, "HTTP API:")?;
    let api = dev_banner(&pipeline, "Reads API:")?;
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(format!("{base}/readyz")).send().await.is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the pipeline did not start:\n{}", pipeline.log_tail(30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((pipeline, base, api))
}

/// The text of `{base}/metrics`.
pub(crate) async fn scrape(client: &reqwest::Client, base: &str) -> Result<String> {
    Ok(client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?)
}

/// The Kafka bootstrap address a `neruba dev` process printed in its banner
/// (`  Kafka:      127.0.0.1:39145  (bootstrap.servers)`).
pub(crate) fn dev_bootstrap(pipeline: &Proc) -> Result<String> {
    dev_banner(pipeline, "Kafka:")
}

/// The first word after `label` on a line of a `neruba dev` process's last banner (its log
/// keeps those of earlier starts); the banner may follow the HTTP listener's readiness by a
/// moment, so this waits up to 30 s for it.
fn dev_banner(pipeline: &Proc, label: &str) -> Result<String> {
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(&pipeline.log)?;
        let found = log
            .lines()
            .rev()
            .find_map(|line| line.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned);
        if let Some(word) = found {
            return Ok(word);
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("no {label} in the banner:\n{}", pipeline.log_tail(30));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The alerting rules of `k8s/alerts.yaml` (a PrometheusRule's `spec`) as a Prometheus rules
/// file.
pub(crate) fn alert_rules() -> Result<String> {
    let rule: serde_yaml::Value = serde_yaml::from_str(include_str!("../../../k8s/alerts.yaml"))?;
    if rule["kind"] != "PrometheusRule" {
        bail!("k8s/alerts.yaml is not a PrometheusRule");
    }
    Ok(serde_yaml::to_string(&rule["spec"])?)
}
