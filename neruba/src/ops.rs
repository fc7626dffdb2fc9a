//! The operations listener of components without an HTTP API of their own (the aggregator,
//! the rater): `/metrics`, `/healthz` (the process serves), `/readyz` (what `ready` says).

use anyhow::Context;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;

/// Claims the operations address; the error names it, so a taken port is plain at start-up.
pub async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen} (operations endpoints)"))
}

/// Serves the endpoints on `listener` until `shutdown`; returns the bound address.
pub fn serve(
    listener: tokio::net::TcpListener,
    registries: Vec<prometheus::Registry>,
    ready: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let ready = std::sync::Arc::new(ready);
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let answer = match ready() {
                    Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                    Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                };
                async move { answer }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let families = neruba_ingest_gateway::metrics::gather(&registries);
                async move {
                    match prometheus::TextEncoder::new().encode_to_string(&families) {
                        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text)
                            .into_response(),
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                    }
                }
            }),
        );
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "Operations listener stopped.");
        }
    });
    Ok(local)
}

/// Reloads the catalog from `path` on every SIGHUP until `shutdown`. A file that does not load,
/// or that reshapes a meter the component knows (see [`neruba_schemas::LiveCatalog::replace`]),
/// is refused and the current catalog kept.
/// Counts `neruba_catalog_reloads_total{result="applied"|"refused"}` in `registry`.
pub fn reload_catalog_on_sighup(
    path: std::path::PathBuf,
    catalog: neruba_schemas::LiveCatalog,
    registry: &prometheus::Registry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let reloads = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "neruba_catalog_reloads_total",
            "Catalog reloads (SIGHUP), by result.",
        ),
        &["result"],
    )?;
    registry.register(Box::new(reloads.clone()))?;
    for result in ["applied", "refused"] {
        reloads.with_label_values(&[result]);
    }
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                received = hangups.recv() => if received.is_none() { return },
            }
            let loaded = neruba_schemas::Catalog::load(&path)
                .map_err(|e| e.to_string())
                .and_then(|next| catalog.replace(next));
            match loaded {
                Ok(()) => {
                    reloads.with_label_values(&["applied"]).inc();
                    tracing::info!(path = %path.display(), "Catalog reloaded.");
                }
                Err(reason) => {
                    reloads.with_label_values(&["refused"]).inc();
                    tracing::error!(path = %path.display(), %reason, "Catalog reload refused; the current catalog stays in force.");
                }
            }
        }
    });
    Ok(())
}
