//! `neruba events tail`: the events topic as NDJSON, whichever encoding wrote it.

use super::shutdown_on_signal;
use anyhow::Result;
use clap::{Args, Subcommand};
use neruba_schemas::topics;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Subcommand)]
pub(crate) enum EventsCommand {
    /// Print the events of the events topic as NDJSON (binary or JSON on the topic), with
    /// their partition and offset.
    Tail(TailArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// Topic events are read from.
    #[arg(long, env = "NERUBA_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub(crate) events_topic: String,
    #[command(flatten)]
    pub(crate) follow: super::ledger::FollowArgs,
}

/// Runs an events command.
pub(crate) async fn run(command: EventsCommand, shutdown: CancellationToken) -> Result<()> {
    let EventsCommand::Tail(args) = command;
    let shutdown = shutdown_on_signal(&shutdown);
    let counts = tokio::task::spawn_blocking(move || {
        let follow = &args.follow;
        neruba::events::tail(
            &follow.brokers,
            &follow.kafka_opts,
            &args.events_topic,
            follow.tenant.as_deref(),
            follow.exit_when_idle,
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
