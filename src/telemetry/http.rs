//! The HTTP endpoint on `metrics.listen`: `/metrics` (Prometheus text), `/healthz` (the process
//! runs), `/readyz` (every component connected) and `/`, the status page (see [`super::status`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use super::Health;

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `metrics.listen` could not be bound.
    #[error("cannot listen on {addr} (metrics.listen): {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The status page: constant HTML; no caching, so a new version of dedupd serves its own page.
async fn status_page() -> impl axum::response::IntoResponse {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(super::status::CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        super::status::page(),
    )
}

/// Binds `listen` (port 0 picks a free port; the caller reads it from the listener).
pub async fn bind(listen: &str) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen.to_owned(),
            source,
        })
}

/// Serves on an already-bound `listener` until `shutdown`. Returns the address it serves on.
pub fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ServeError> {
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: "the given listener".to_owned(),
        source,
    })?;
    // Histogram samples pile up in the recorder until upkeep folds them into buckets: without
    // it, memory would grow with every message when nobody scrapes.
    let upkeep_handle = handle.clone();
    let upkeep_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => break,
                _ = tick.tick() => upkeep_handle.run_upkeep(),
            }
        }
    });
    let app = Router::new()
        .route("/", get(status_page))
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move {
                    handle.run_upkeep();
                    handle.render()
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let health = health.clone();
                async move {
                    if health.ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        );
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(error) = server.await {
            tracing::error!(%error, "metrics endpoint failed");
        }
    });
    Ok((addr, task))
}
