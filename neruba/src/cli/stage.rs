//! What `neruba aggregator`, `neruba rater` and `neruba balances` share: a consuming stage
//! with its operations endpoints and, for a stage that prices, catalog reload.

use super::shutdown_on_signal;
use anyhow::Result;
use neruba_kafka::health::ConsumerHealth;
use neruba_schemas::LiveCatalog;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Runs a consuming stage until it stops: `start` starts it with a metrics registry and the
/// shutdown token, and returns its health and what to await. Serves `/metrics`, `/healthz`
/// and `/readyz` on `ops_listen`; with `reload` (the catalog file and the live catalog the
/// stage was given), reloads the catalog on SIGHUP.
pub(crate) async fn run<Stopped>(
    name: &str,
    shutdown: &CancellationToken,
    ops_listen: SocketAddr,
    reload: Option<(PathBuf, LiveCatalog)>,
    start: impl FnOnce(
        &prometheus::Registry,
        CancellationToken,
    ) -> Result<(Arc<ConsumerHealth>, Stopped)>
    + Send
    + 'static,
) -> Result<()>
where
    Stopped: std::future::Future<Output = Result<()>> + Send + 'static,
{
    // The address first: a taken port is a start-up error, before any consumer joins a group.
    let listener = neruba::ops::bind(ops_listen).await?;
    let registry = prometheus::Registry::new();
    let shutdown = shutdown_on_signal(shutdown);
    if let Some((path, catalog)) = reload {
        neruba::ops::reload_catalog_on_sighup(path, catalog, &registry, shutdown.clone())?;
    }
    // On a blocking thread: a stage's start waits on broker metadata, and must not hold the
    // task that enforces the drain timeout.
    let (health, stopped) = {
        let (registry, shutdown) = (registry.clone(), shutdown.clone());
        tokio::task::spawn_blocking(move || start(&registry, shutdown)).await??
    };
    let ops = neruba::ops::serve(
        listener,
        vec![registry.clone()],
        move || health.check(),
        shutdown,
    )?;
    tracing::info!(%ops, stage = name, "Operations endpoints listening.");
    stopped.await
}
