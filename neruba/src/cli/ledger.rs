//! `neruba ledger tail`: the line items of the ledger topic as NDJSON.

use super::shutdown_on_signal;
use anyhow::Result;
use clap::{Args, Subcommand};
use neruba_schemas::topics;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Subcommand)]
pub(crate) enum LedgerCommand {
    /// Print the line items of the ledger topic as NDJSON, each id once.
    Tail(TailArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// Topic line items are read from.
    #[arg(long, env = "NERUBA_LEDGER_TOPIC", default_value = topics::LEDGER)]
    pub(crate) ledger_topic: String,
    #[command(flatten)]
    pub(crate) follow: FollowArgs,
}

/// What every tail of a topic takes (`ledger tail`, `events tail`).
#[derive(Debug, Args)]
pub(crate) struct FollowArgs {
    /// Kafka bootstrap servers, e.g. the address `neruba dev` prints.
    #[arg(long, env = "NERUBA_BROKERS")]
    pub(crate) brokers: String,
    /// Only this tenant's records.
    #[arg(long, env = "NERUBA_TENANT")]
    pub(crate) tenant: Option<String>,
    /// Stop once everything already written was read and nothing more arrived for this long
    /// (default: follow until interrupted); fail, naming the partition, if one cannot be read
    /// that far within 30 s more.
    #[arg(long, env = "NERUBA_EXIT_WHEN_IDLE", value_parser = humantime::parse_duration)]
    pub(crate) exit_when_idle: Option<Duration>,
    /// Extra librdkafka setting `key=value` (SASL, TLS); repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = super::parse_key_value)]
    pub(crate) kafka_opts: Vec<(String, String)>,
}

/// Runs a ledger command.
pub(crate) async fn run(command: LedgerCommand, shutdown: CancellationToken) -> Result<()> {
    let LedgerCommand::Tail(args) = command;
    let shutdown = shutdown_on_signal(&shutdown);
    tokio::task::spawn_blocking(move || {
        let follow = &args.follow;
        neruba::ledger::tail(
            &follow.brokers,
            &follow.kafka_opts,
            &args.ledger_topic,
            follow.tenant.as_deref(),
            follow.exit_when_idle,
            &shutdown,
            &mut std::io::stdout().lock(),
        )
    })
    .await??;
    Ok(())
}
