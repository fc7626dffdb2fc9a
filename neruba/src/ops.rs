//! The operations listener of components without an HTTP API of their own (the aggregator,
//! the rater): `/metrics`, `/healthz` (the process serves), `/readyz` (what `ready` says).

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;

/// Serves the endpoints on `listen` until `shutdown`; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
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
    let listener = tokio::net::TcpListener::bind(listen).await?;
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
