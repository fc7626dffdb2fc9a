//! The `neruba` subcommands: one module each, its flags next to its `run`. Flags shared by
//! `dev` and a component (`IngestArgs`, `AggregatorArgs`, `RaterArgs`) live with the
//! component; every `config()` returns `Result` and refuses impossible combinations at start-up.
//!
//! # Environment names
//!
//! Every flag has an environment twin: `NERUBA_`, then the name of the one stage that reads it
//! if only one does, then the flag's name, in upper snake case. So one deployment can give all
//! its components the same environment (Kubernetes: `k8s/config.yaml`), and each name says
//! who reads it:
//!
//! - **A stage's own setting** carries the stage: `NERUBA_GATEWAY_…` (`--listen`,
//!   `--max-body-bytes`, `--raw-topic`, ...), `NERUBA_AGGREGATOR_…` (`--group-id`,
//!   `--instance-id`, `--grace`, ...), `NERUBA_RATER_…` (`--rater-group-id`, ...). A flag
//!   already named after its stage does not repeat it: `--rater-group-id` is
//!   `NERUBA_RATER_GROUP_ID`, `--aggregator-workers` `NERUBA_AGGREGATOR_WORKERS`.
//! - **What the components share** keeps the plain prefix: the Kafka cluster
//!   (`NERUBA_BROKERS`, `NERUBA_KAFKA_OPTS`), the catalog, the topics two commands meet on
//!   (`NERUBA_EVENTS_TOPIC`, `NERUBA_ROLLUPS_TOPIC`, `NERUBA_LEDGER_TOPIC`,
//!   `NERUBA_DEAD_LETTER_TOPIC`), `NERUBA_LOG`, `NERUBA_DRAIN_TIMEOUT`, and the inputs of the
//!   one-shot tools (`--tenant`, `--from`, `--quantity`, ...).
//! - **A flag that several stages have but each sets for itself** is each stage's own:
//!   `--ops-listen` and `--state-dir` (an aggregator and a rater on one host must not share
//!   them) are `NERUBA_AGGREGATOR_OPS_LISTEN` and `NERUBA_RATER_OPS_LISTEN`, and so on; the
//!   gateway's `--correction-horizon` (what it accepts) is `NERUBA_GATEWAY_CORRECTION_HORIZON`,
//!   the rater's (what it must remember past) `NERUBA_RATER_CORRECTION_HORIZON`.
//! - **`neruba dev`** runs the three stages with their flags, so it reads their names
//!   (`NERUBA_GATEWAY_LISTEN`, `NERUBA_AGGREGATOR_GRACE`, ...); its own flags (`--partitions`,
//!   the `--state-dir` that holds `aggregator/` and `rater/`) are plain.
//!
//! `flags_are_consistent_and_each_has_an_env_twin` (below) holds every flag to this rule.

/// Environment names no stage reads any more, with what replaced them. A deployment that
/// still sets one would silently fall back to a default (a static assignment becoming a group
/// membership, an ops port moving), so the command refuses to start instead.
const RETIRED_ENV: &[(&str, &str)] = &[
    ("NERUBA_LISTEN", "NERUBA_GATEWAY_LISTEN"),
    ("NERUBA_MAX_BODY_BYTES", "NERUBA_GATEWAY_MAX_BODY_BYTES"),
    (
        "NERUBA_HTTP_HEADER_TIMEOUT",
        "NERUBA_GATEWAY_HTTP_HEADER_TIMEOUT",
    ),
    (
        "NERUBA_HTTP_BODY_TIMEOUT",
        "NERUBA_GATEWAY_HTTP_BODY_TIMEOUT",
    ),
    (
        "NERUBA_HTTP_IDLE_TIMEOUT",
        "NERUBA_GATEWAY_HTTP_IDLE_TIMEOUT",
    ),
    ("NERUBA_MAX_CONNECTIONS", "NERUBA_GATEWAY_MAX_CONNECTIONS"),
    (
        "NERUBA_DEFAULT_RATE_LIMIT",
        "NERUBA_GATEWAY_DEFAULT_RATE_LIMIT",
    ),
    (
        "NERUBA_DEFAULT_RATE_BURST",
        "NERUBA_GATEWAY_DEFAULT_RATE_BURST",
    ),
    ("NERUBA_MAX_BATCH_EVENTS", "NERUBA_GATEWAY_MAX_BATCH_EVENTS"),
    ("NERUBA_MAX_EVENT_BYTES", "NERUBA_GATEWAY_MAX_EVENT_BYTES"),
    ("NERUBA_MAX_FUTURE", "NERUBA_GATEWAY_MAX_FUTURE"),
    ("NERUBA_DEDUP_CAPACITY", "NERUBA_GATEWAY_DEDUP_CAPACITY"),
    ("NERUBA_DEDUP_MAX_AGE", "NERUBA_GATEWAY_DEDUP_MAX_AGE"),
    ("NERUBA_DELIVERY_TIMEOUT", "NERUBA_GATEWAY_DELIVERY_TIMEOUT"),
    ("NERUBA_RAW_TOPIC", "NERUBA_GATEWAY_RAW_TOPIC"),
    ("NERUBA_RAW_GROUP_ID", "NERUBA_GATEWAY_RAW_GROUP_ID"),
    (
        "NERUBA_CORRECTION_HORIZON",
        "NERUBA_GATEWAY_CORRECTION_HORIZON and NERUBA_RATER_CORRECTION_HORIZON",
    ),
    (
        "NERUBA_OPS_LISTEN",
        "NERUBA_AGGREGATOR_OPS_LISTEN or NERUBA_RATER_OPS_LISTEN",
    ),
    ("NERUBA_GROUP_ID", "NERUBA_AGGREGATOR_GROUP_ID"),
    ("NERUBA_INSTANCE_ID", "NERUBA_AGGREGATOR_INSTANCE_ID"),
    ("NERUBA_ASSIGN", "NERUBA_AGGREGATOR_ASSIGN"),
    ("NERUBA_GRACE", "NERUBA_AGGREGATOR_GRACE"),
    ("NERUBA_IDLE_TIMEOUT", "NERUBA_AGGREGATOR_IDLE_TIMEOUT"),
    ("NERUBA_DEDUP_HORIZON", "NERUBA_AGGREGATOR_DEDUP_HORIZON"),
    ("NERUBA_MAX_BATCH", "NERUBA_AGGREGATOR_MAX_BATCH"),
    (
        "NERUBA_BLOCK_CACHE_BYTES",
        "NERUBA_AGGREGATOR_BLOCK_CACHE_BYTES",
    ),
    ("NERUBA_STUCK_AFTER", "NERUBA_AGGREGATOR_STUCK_AFTER"),
];

/// Refuses to start when `set` (is this variable set?) names a retired variable.
pub(crate) fn refuse_retired_env(set: impl Fn(&str) -> bool) -> anyhow::Result<()> {
    let found: Vec<String> = RETIRED_ENV
        .iter()
        .filter(|(old, _)| set(old))
        .map(|(old, new)| format!("{old} (now {new})"))
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "environment variables no longer read are set: {}; rename them (see README, \
         Configuration) or unset them",
        found.join(", ")
    )
}

mod aggregator;
mod api;
mod balances;
mod catalog;
mod credits;
mod dev;
mod events;
mod gateway;
mod ledger;
mod loadgen;
mod price;
mod rater;
mod stage;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use neruba_schemas::Catalog;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Usage metering and rating: events in, priced line items out.
#[derive(Debug, Parser)]
#[command(name = "neruba", version)]
pub(crate) struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `neruba_ingest_gateway=debug`.
    #[arg(long, env = "NERUBA_LOG", default_value = "info", global = true)]
    pub(crate) log: String,
    /// Longest a component may take to stop once SIGTERM (or a failure) began its shutdown;
    /// past it the process exits anyway. Keep it below Kubernetes'
    /// `terminationGracePeriodSeconds`, so the exit is ours and not a SIGKILL.
    #[arg(long, env = "NERUBA_DRAIN_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration, global = true)]
    pub(crate) drain_timeout: Duration,
    /// Threads running the component's own work (its async runtime's workers); the default is
    /// one a core. The Kafka client runs threads of its own besides, so on a machine of few
    /// cores one fewer than the cores can leave them room (see README, Performance).
    #[arg(long, env = "NERUBA_WORKER_THREADS", global = true)]
    pub(crate) worker_threads: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start-up: the size of the variants costs nothing"
)]
pub(crate) enum Command {
    /// Run the ingest gateway against a Kafka cluster.
    Gateway(gateway::GatewayArgs),
    /// Run an aggregator (a member of the aggregator consumer group) against a Kafka cluster.
    Aggregator(aggregator::AggregatorCommandArgs),
    /// Run a rater (a member of the rater consumer group) against a Kafka cluster.
    Rater(rater::RaterCommandArgs),
    /// Run a balances stage (line items applied to prepaid credit; a member of the balances
    /// consumer group) against a Kafka cluster.
    Balances(balances::BalancesCommandArgs),
    /// Run the billing reads (`/v1/customers/...`) from a local read model of the ledger
    /// topic; replicas are independent.
    Api(api::ApiCommandArgs),
    /// Run the pipeline against an in-process Kafka broker, until interrupted.
    Dev(dev::DevArgs),
    /// Run the embedded pipeline, send a sample workload, print what happened, and exit.
    Demo,
    /// Catalog tools.
    #[command(subcommand)]
    Catalog(catalog::CatalogCommand),
    /// Price a quantity under a meter's plan and explain every step of the amount.
    Price(price::PriceArgs),
    /// Ledger tools.
    #[command(subcommand)]
    Ledger(ledger::LedgerCommand),
    /// Events-topic tools.
    #[command(subcommand)]
    Events(events::EventsCommand),
    /// Prepaid credit: grant, void, and show a customer's grants and balance entries.
    #[command(subcommand)]
    Credits(credits::CreditsCommand),
    /// Send realistic events to a gateway and report throughput, latency, outcomes and (with
    /// `--brokers`) how long the ledger took to catch up.
    Loadgen(loadgen::LoadgenArgs),
}

/// Runs `command` until it is done or `shutdown` stops it.
pub(crate) async fn run(command: Command, shutdown: CancellationToken) -> Result<()> {
    match command {
        Command::Gateway(args) => gateway::run(args, shutdown).await,
        Command::Aggregator(args) => aggregator::run(args, shutdown).await,
        Command::Rater(args) => rater::run(args, shutdown).await,
        Command::Balances(args) => balances::run(args, shutdown).await,
        Command::Api(args) => api::run(args, shutdown).await,
        Command::Dev(args) => dev::run(args, &shutdown).await,
        Command::Demo => {
            neruba::demo::run().await?;
            Ok(())
        }
        Command::Catalog(command) => catalog::run(command),
        Command::Price(args) => price::run(&args),
        Command::Ledger(command) => ledger::run(command, shutdown).await,
        Command::Events(command) => events::run(command, shutdown).await,
        Command::Credits(command) => credits::run(command, shutdown).await,
        Command::Loadgen(args) => loadgen::run(args, shutdown).await,
    }
}

pub(crate) fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("`{text}` is not key=value")),
    }
}

pub(crate) fn load_catalog(path: &Path) -> Result<Catalog> {
    Ok(Catalog::load(path)?)
}

/// Cancels `token` on SIGTERM or Ctrl-C, and returns it. Only the long-running commands
/// listen: a one-shot command keeps the default action, which ends it at once.
pub(crate) fn shutdown_on_signal(token: &CancellationToken) -> CancellationToken {
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(e) => {
                        tracing::error!(error = %e, "Cannot listen for SIGTERM.");
                        let _ = ctrl_c.await;
                        cancel.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("Shutting down.");
        cancel.cancel();
    });
    token.clone()
}

pub(crate) fn parse_day(text: &str) -> Result<time::Date> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(text, &format).with_context(|| format!("`{text}` is not YYYY-MM-DD"))
}

/// A duration as a flag would be written: whole days as `35days` (humantime would say
/// `1month 4days 13h 26m 24s`, its months being 30.44 days), anything else as humantime does.
pub(crate) fn show(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs > 0 && secs.is_multiple_of(86_400) && duration.subsec_nanos() == 0 {
        format!("{}days", secs / 86_400)
    } else {
        humantime::format_duration(duration).to_string()
    }
}

/// A duration in whole milliseconds, for the components' configs.
pub(crate) fn millis(duration: Duration) -> Result<i64> {
    i64::try_from(duration.as_millis()).context("duration too long")
}

#[cfg(test)]
mod tests {
    use super::rater::{RaterAction, RaterCommandArgs, RaterRunArgs};
    use super::*;
    use clap::CommandFactory;

    /// The stages of a deployment, by subcommand.
    const STAGES: [&str; 5] = ["gateway", "aggregator", "rater", "balances", "api"];

    /// A flag and where it is: `command` is the subcommand path (`rater rerun`), `top` its first
    /// subcommand, `stage` the stage whose own flag it is (`None` under `dev`, a tool, or
    /// `rater rerun`).
    struct Flag {
        command: String,
        long: String,
        top: String,
        stage: Option<&'static str>,
        id: String,
        env: String,
    }

    /// The stage an environment name is prefixed with, if any.
    fn stage_of(env: &str) -> Option<&'static str> {
        STAGES
            .into_iter()
            .find(|stage| env.starts_with(&format!("NERUBA_{}_", stage.to_uppercase())))
    }

    #[test]
    fn a_retired_env_name_stops_the_start_and_no_flag_reads_one() {
        fn envs(command: &clap::Command, out: &mut Vec<String>) {
            for arg in command.get_arguments() {
                if let Some(env) = arg.get_env() {
                    out.push(env.to_string_lossy().into_owned());
                }
            }
            for sub in command.get_subcommands() {
                envs(sub, out);
            }
        }
        let mut names = Vec::new();
        envs(&Cli::command(), &mut names);
        for (old, _) in RETIRED_ENV {
            assert!(!names.iter().any(|n| n == old), "{old} is retired but read");
        }
        let refused = refuse_retired_env(|name| name == "NERUBA_ASSIGN").map_err(|e| e.to_string());
        assert_eq!(
            refused,
            Err(
                "environment variables no longer read are set: NERUBA_ASSIGN (now \
                 NERUBA_AGGREGATOR_ASSIGN); rename them (see README, Configuration) or unset them"
                    .to_owned()
            )
        );
        assert!(refuse_retired_env(|name| name == "NERUBA_BROKERS").is_ok());
    }

    #[test]
    fn flags_are_consistent_and_each_has_an_env_twin() {
        Cli::command().debug_assert();
        fn walk(command: &clap::Command, path: &mut Vec<String>, flags: &mut Vec<Flag>) {
            for arg in command.get_arguments() {
                let positional = arg.get_long().is_none();
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !positional && !builtin {
                    assert!(
                        arg.get_env().is_some(),
                        "--{} of `{}` has no env twin",
                        arg.get_id(),
                        command.get_name()
                    );
                    let stage = match path.as_slice() {
                        [only] => STAGES.into_iter().find(|s| s == only),
                        _ => None,
                    };
                    flags.push(Flag {
                        command: path.join(" "),
                        long: arg.get_long().unwrap_or_default().to_owned(),
                        top: path.first().cloned().unwrap_or_default(),
                        stage,
                        id: arg.get_id().to_string(),
                        env: arg
                            .get_env()
                            .map(|e| e.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                    });
                }
            }
            for sub in command.get_subcommands() {
                path.push(sub.get_name().to_owned());
                walk(sub, path, flags);
                path.pop();
            }
        }
        let mut flags = Vec::new();
        walk(&Cli::command(), &mut Vec::new(), &mut flags);

        for flag in &flags {
            let Flag {
                command,
                long,
                id,
                env,
                ..
            } = flag;
            // 1. The twin is the flag's name: NERUBA_[STAGE_]FLAG_NAME.
            let name = id.to_uppercase();
            let names_its_stage = stage_of(&format!("NERUBA_{name}")).is_some();
            let twin = *env == format!("NERUBA_{name}")
                || (!names_its_stage
                    && STAGES
                        .iter()
                        .any(|s| *env == format!("NERUBA_{}_{name}", s.to_uppercase())));
            assert!(
                twin,
                "--{long} of `{command}`: its env twin {env} is not NERUBA_[STAGE_]{name}"
            );
            // 2. A stage's prefix means that stage reads the variable, as its own flag.
            if let Some(named) = stage_of(env) {
                assert!(
                    flags
                        .iter()
                        .any(|f| f.stage == Some(named) && f.env == *env),
                    "{env} (--{long} of `{command}`) names the {named} stage, which does not read it"
                );
                if let Some(stage) = flag.stage {
                    assert_eq!(
                        named, stage,
                        "--{long} of `{command}` carries another stage's prefix: {env}"
                    );
                }
            }
            // 3. A stage's flag that no other command reads is that stage's alone, and says so.
            if let (Some(stage), None) = (flag.stage, stage_of(env)) {
                let shared = flags
                    .iter()
                    .any(|f| f.env == *env && f.top != flag.top && f.top != "dev");
                assert!(
                    shared,
                    "--{long} of `{stage}` is read by the {stage} alone: its env twin must be \
                     NERUBA_{}_{}, not {env}",
                    stage.to_uppercase(),
                    env.trim_start_matches("NERUBA_")
                );
            }
            // 4. One variable sets one flag: the same one in every command, once per command.
            for other in &flags {
                if other.env == *env {
                    assert_eq!(
                        other.id, *id,
                        "{env} is the twin of --{long} of `{command}` and of --{} of `{}`",
                        other.long, other.command
                    );
                }
            }
            let in_command = flags
                .iter()
                .filter(|f| f.command == *command && f.env == *env)
                .count();
            assert_eq!(in_command, 1, "{env} is read twice by `{command}`");
        }
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn impossible_combinations_are_refused_at_start_up_with_the_reason() {
        // Dev: a gateway horizon longer than the aggregator's would accept events the
        // aggregator then dead-letters.
        let Command::Dev(dev) = parse(&["neruba", "dev", "--correction-horizon", "40days"]).command
        else {
            panic!("dev");
        };
        let refused = dev.check().map_err(|e| e.to_string());
        assert_eq!(
            refused,
            Err(
                "--correction-horizon (40days) exceeds --aggregator-correction-horizon (35days): \
                 the gateway would accept events the aggregator dead-letters as too old"
                    .to_owned()
            )
        );
        let Command::Dev(dev) = parse(&["neruba", "dev"]).command else {
            panic!("dev");
        };
        assert!(dev.check().is_ok());

        // Rater: a window retention within the correction horizon forgets windows that a late
        // event can still revise.
        let short = parse(&[
            "neruba",
            "rater",
            "--brokers",
            "k:9092",
            "--catalog",
            "c.toml",
            "--state-dir",
            "/tmp/s",
            "--rater-window-retention",
            "30days",
        ]);
        let Command::Rater(RaterCommandArgs { run, .. }) = short.command else {
            panic!("rater");
        };
        let refused = run
            .rating
            .config(
                "k:9092",
                "r",
                "d",
                Path::new("/tmp/s"),
                run.correction_horizon,
            )
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert_eq!(
            refused,
            Err(
                "--rater-window-retention (30days) must exceed the correction horizon (35days): \
                 a late revision of a window the rater forgot would be rated as new"
                    .to_owned()
            )
        );
    }

    #[test]
    fn a_default_burst_below_a_full_batch_is_refused() {
        let Command::Dev(dev) = parse(&["neruba", "dev", "--default-rate-burst", "500"]).command
        else {
            panic!("dev");
        };
        let refused = dev
            .ingest
            .config("127.0.0.1:0".parse().expect("addr"), "k:9092", "d")
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert_eq!(
            refused,
            Err(
                "--default-rate-burst (500) is below --max-batch-events (10000): a full batch \
                 of a tenant without its own rate limit could never be admitted"
                    .to_owned()
            )
        );
    }

    #[test]
    fn the_aggregator_reads_the_events_topic_it_is_given() {
        let Command::Aggregator(args) = parse(&[
            "neruba",
            "aggregator",
            "--brokers",
            "k:9092",
            "--catalog",
            "c.toml",
            "--state-dir",
            "/tmp/s",
            "--events-topic",
            "acme.events",
        ])
        .command
        else {
            panic!("aggregator");
        };
        let config = args
            .aggregation
            .config(&args.brokers, &args.events_topic, &args.state_dir)
            .map(|c| c.stage.input_topic);
        assert_eq!(config.ok().as_deref(), Some("acme.events"));
    }

    #[test]
    fn worker_threads_are_a_positive_count_before_or_after_the_command() {
        let threads = |args: &[&str]| {
            Cli::try_parse_from(args)
                .map(|cli| cli.worker_threads.map(std::num::NonZeroUsize::get))
                .map_err(|e| e.kind())
        };
        assert_eq!(threads(&["neruba", "demo"]), Ok(None));
        assert_eq!(
            threads(&["neruba", "--worker-threads", "1", "demo"]),
            Ok(Some(1))
        );
        assert_eq!(
            threads(&["neruba", "demo", "--worker-threads", "3"]),
            Ok(Some(3))
        );
        assert_eq!(
            threads(&["neruba", "demo", "--worker-threads", "0"]),
            Err(clap::error::ErrorKind::ValueValidation)
        );
    }

    #[test]
    fn every_subcommand_with_defaults_parses_without_flags() {
        for args in [vec!["neruba", "dev"], vec!["neruba", "demo"]] {
            if let Err(e) = Cli::try_parse_from(&args) {
                panic!("{args:?}: {e}");
            }
        }
        let aggregator = Cli::try_parse_from([
            "neruba",
            "aggregator",
            "--brokers",
            "k:9092",
            "--catalog",
            "c.toml",
            "--state-dir",
            "/tmp/s",
        ]);
        assert!(aggregator.is_ok(), "{aggregator:?}");
        let rater = Cli::try_parse_from([
            "neruba",
            "rater",
            "--brokers",
            "k:9092",
            "--catalog",
            "c.toml",
            "--state-dir",
            "/tmp/s",
        ]);
        assert!(
            matches!(
                &rater,
                Ok(Cli {
                    command: Command::Rater(RaterCommandArgs {
                        action: None,
                        run: RaterRunArgs { brokers: Some(b), .. },
                    }),
                    ..
                }) if b == "k:9092"
            ),
            "{rater:?}"
        );
        let rerun = Cli::try_parse_from([
            "neruba",
            "rater",
            "rerun",
            "--brokers",
            "k:9092",
            "--tenant",
            "acme",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-30",
        ]);
        assert!(
            matches!(
                rerun,
                Ok(Cli {
                    command: Command::Rater(RaterCommandArgs {
                        action: Some(RaterAction::Rerun(_)),
                        ..
                    }),
                    ..
                })
            ),
            "{rerun:?}"
        );
        let tail = Cli::try_parse_from(["neruba", "ledger", "tail", "--brokers", "k:9092"]);
        assert!(tail.is_ok(), "{tail:?}");
    }
}
