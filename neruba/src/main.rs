//! `neruba`: run a pipeline component against Kafka, or the whole pipeline embedded.
//!
//! Each subcommand is a module of [`cli`], its flags next to its `run`; this file sets up
//! logging and the runtime, and bounds how long a stop may take.

mod cli;

use anyhow::{Result, anyhow};
use clap::Parser;
use cli::{Cli, Command};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long past the drain timeout the process may take to exit when the orderly path (the
/// command returning, then the runtime's bounded shutdown) cannot run.
const HARD_EXIT_AFTER_DRAIN: Duration = Duration::from_secs(1);

/// Runs the command; bounds how long it may take to stop.
///
/// Once shutdown began (a signal, or a component that failed), the command has
/// `--drain-timeout` to finish; then the process exits whatever it is waiting for (a broker
/// that does not answer, a flush). Exiting there is safe by design: every stage writes its
/// offsets with its state, so an exit at any moment replays rather than loses, as a SIGKILL
/// would. The runtime is shut down with the same bound, because a blocking worker thread
/// would otherwise keep the process alive after `main` returned.
fn main() -> Result<()> {
    cli::refuse_retired_env(|name| std::env::var_os(name).is_some())?;
    let cli = Cli::parse();
    // The demo talks to a person on stdout; its component logs stay quiet unless asked for.
    let filter = if matches!(cli.command, Command::Demo) && std::env::var_os("NERUBA_LOG").is_none()
    {
        "warn"
    } else {
        cli.log.as_str()
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(filter)?)
        .with_writer(std::io::stderr)
        // Colour for a person at a terminal who did not opt out; none for a file or a log
        // collector.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let (drain, command) = (cli.drain_timeout, cli.command);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = cli.worker_threads {
        runtime.worker_threads(workers.get());
    }
    let runtime = runtime.enable_all().build()?;
    let shutdown = CancellationToken::new();
    let watchdog = shutdown.clone();
    runtime.spawn(async move {
        watchdog.cancelled().await;
        // The last resort, on a thread of its own: a command blocked in a synchronous call (a
        // client library waiting for a broker that is not there) never lets the drain timeout
        // below fire.
        std::thread::spawn(move || {
            std::thread::sleep(drain + HARD_EXIT_AFTER_DRAIN);
            eprintln!(
                "Error: still running {} after shutdown began (--drain-timeout {}); exiting",
                humantime::format_duration(drain + HARD_EXIT_AFTER_DRAIN),
                humantime::format_duration(drain)
            );
            std::process::exit(1);
        });
    });
    let stopping = shutdown.clone();
    let finished = runtime.block_on(async {
        let overdue = async move {
            stopping.cancelled().await;
            tokio::time::sleep(drain).await;
        };
        tokio::select! {
            result = cli::run(command, shutdown.clone()) => Some(result),
            () = overdue => None,
        }
    });
    // Whatever ended the command, stages still running stop on the token.
    shutdown.cancel();
    match finished {
        Some(result) => {
            // Stages the command did not wait for (it failed early) get to write their state.
            runtime.shutdown_timeout(drain);
            result
        }
        None => {
            runtime.shutdown_timeout(Duration::ZERO);
            Err(anyhow!(
                "did not stop within the drain timeout of {} after shutdown began; exiting without waiting further",
                humantime::format_duration(drain)
            ))
        }
    }
}
