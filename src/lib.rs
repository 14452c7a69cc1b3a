//! dedupd: a deduplicating proxy for RabbitMQ.
//!
//! [`run`] wires the pieces together: the key store ([`store`], where the claim protocol
//! lives), one forwarding pipeline per route ([`pipeline`]: where a message is claimed,
//! published, committed and acked), broker connections ([`amqp`]), and the metrics and health
//! endpoint ([`metrics`]). `main.rs` only parses the command line; tests call [`run`] directly.

pub mod amqp;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod keys;
pub mod metrics;
pub mod pipeline;
pub mod shutdown;
pub mod store;

pub mod throttle;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp::Endpoint;
use crate::config::Config;
use crate::metrics::{Component, Health};
use crate::pipeline::RouteCtx;
use crate::store::{Store, StoreError};

/// Why [`run`] could not start. Once started, nothing but shutdown makes it return.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The metrics endpoint could not bind.
    #[error(transparent)]
    Metrics(#[from] metrics::ServeError),
    /// The store settings are unusable (not: the store is down, which is waited out).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs every route until `shutdown` is cancelled, then lets in-flight messages finish for up
/// to `tuning.shutdown_grace`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let handle = metrics::install();
    let health = Health::new();
    let store_up = Arc::new(health.flag(Component::Store));
    // Routes get their flags before the endpoint starts, so /readyz never answers 200 early.
    let route_flags: Vec<_> = config
        .routes
        .keys()
        .map(|_| {
            (
                health.flag(Component::Upstream),
                health.flag(Component::Downstream),
            )
        })
        .collect();
    let http_stop = CancellationToken::new();
    let (addr, http) = metrics::serve(
        &config.metrics.listen,
        handle,
        health.clone(),
        http_stop.clone(),
    )
    .await?;
    let store = Store::open(&config.store).await?;

    let instance: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        %instance,
        metrics = %addr,
        routes = config.routes.len(),
        "dedupd starting"
    );

    let tracker = TaskTracker::new();
    for ((name, route), (upstream_up, downstream_up)) in config.routes.iter().zip(route_flags) {
        let ctx = RouteCtx {
            name: name.as_str().into(),
            route: route.clone(),
            store: store.clone(),
            key_prefix: config.store.key_prefix.clone(),
            lease: config.store.lease,
            on_store_error: config.store.on_error,
            tuning: config.tuning.clone(),
            prefetch: config.upstream.prefetch,
            upstream: Endpoint {
                url: config.upstream.url.clone(),
                tls: config.upstream.tls.clone(),
                name: format!("dedupd {name} upstream"),
            },
            downstream: Endpoint {
                url: config.downstream_url().to_owned(),
                tls: config.downstream_tls().cloned(),
                name: format!("dedupd {name} downstream"),
            },
            instance: instance.clone(),
            upstream_up,
            downstream_up,
            store_up: store_up.clone(),
            allow_eviction: config.store.allow_eviction,
        };
        tracker.spawn(pipeline::run_route(ctx, shutdown.clone()));
    }
    tracker.close();

    shutdown.cancelled().await;
    let grace = config.tuning.shutdown_grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            "shutdown grace period over: closing with messages in flight (they return to their queues)"
        );
    }
    http_stop.cancel();
    let _ = http.await;
    tracing::info!("dedupd stopped");
    Ok(())
}

/// Runs like [`run`]; on each item of `reloads` (SIGHUP in the binary) re-reads `path`. A valid
/// file replaces the running configuration: routes drain as on shutdown, then start again with
/// it. An invalid file is refused with a log line and the running configuration is kept.
pub async fn run_reloadable(
    path: &std::path::Path,
    mut config: Config,
    shutdown: CancellationToken,
    mut reloads: impl futures::Stream<Item = ()> + Unpin,
) -> Result<(), RunError> {
    use futures::StreamExt;
    loop {
        let generation = shutdown.child_token();
        let mut running = std::pin::pin!(run(config.clone(), generation.clone()));
        config = loop {
            tokio::select! {
                result = &mut running => return result,
                Some(()) = reloads.next() => match Config::load(path) {
                    Ok(new) => break new,
                    Err(error) => tracing::error!(
                        path = %path.display(),
                        // One log line per event: TOML errors quote the file over several.
                        error = %error_chain(&error).replace('\n', " "),
                        "reload refused: keeping the running configuration"
                    ),
                },
            }
        };
        tracing::info!(path = %path.display(), "configuration reloaded: restarting the routes with it");
        generation.cancel();
        running.await?;
    }
}

/// An error and all its sources, `: `-separated, for one log line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        // thiserror's `transparent` and `{0}` often repeat the source in the message.
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    out
}
