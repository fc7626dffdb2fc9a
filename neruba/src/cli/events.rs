//! `neruba events tail`: the events topic as NDJSON, whichever encoding wrote it.

use super::shutdown_on_signal;
use anyhow::Result;
use clap::{Args, Subcommand};
use neruba_schemas::topics;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Subcommand)]
pub(crate) enum EventsCommand {
    /// Print the events of the events topic as NDJSON (binary or JSON on the topic), with
    /// their partition and offset.
    Tail(TailArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// Kafka bootstrap servers, e.g. the address `neruba dev` prints.
    #[arg(long, env = "NERUBA_BROKERS")]
    pub(crate) brokers: String,
    /// Topic events are read from.
    #[arg(long, env = "NERUBA_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub(crate) events_topic: String,
    /// Only events of this tenant.
    #[arg(long, env = "NERUBA_TENANT")]
    pub(crate) tenant: Option<String>,
    /// Stop once no message arrived for this long (default: follow until interrupted).
    #[arg(long, env = "NERUBA_EXIT_WHEN_IDLE", value_parser = humantime::parse_duration)]
    pub(crate) exit_when_idle: Option<Duration>,
    /// Extra librdkafka setting `key=value` (SASL, TLS); repeatable, comma-separated in env.
    #[arg(long = "kafka-opt", env = "NERUBA_KAFKA_OPTS", value_delimiter = ',', value_parser = super::parse_key_value)]
    pub(crate) kafka_opts: Vec<(String, String)>,
}

/// Runs an events command.
pub(crate) async fn run(command: EventsCommand, shutdown: CancellationToken) -> Result<()> {
    let EventsCommand::Tail(args) = command;
    let shutdown = shutdown_on_signal(&shutdown);
    let counts = tokio::task::spawn_blocking(move || {
        neruba::events::tail(
            &args.brokers,
            &args.kafka_opts,
            &args.events_topic,
            args.tenant.as_deref(),
            args.exit_when_idle,
            &shutdown,
            &mut std::io::stdout().lock(),
        )
    })
    .await??;
    eprintln!(
        "{} events printed, {} watermark ticks skipped, {} messages not events",
        counts.printed, counts.ticks, counts.undecodable
    );
    Ok(())
}
