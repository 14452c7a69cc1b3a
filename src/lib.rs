//! dedupd: a deduplicating proxy for RabbitMQ.
//!
//! [`run`] wires the pieces together and runs every route until shutdown; `main.rs` only parses
//! the command line, sets up logging and calls it, and tests call it (or [`run_on`], with a
//! listener they bound to port 0) in-process.
//!
//! # Layout
//!
//! - [`config`]: the file: `schema` (types and defaults), `interpolate` (`${VAR}`), `validate`
//!   (the rules and their messages), `secret` (URLs and values that cannot be printed by
//!   accident, and the scrubbing of passwords from log lines).
//! - [`pipeline`]: one route's forwarding: [`pipeline`]'s `intake` (receive, key, **claim**,
//!   publish), `settle` (confirms, **commit**/release, ack, lease renewal), `holds` (held
//!   duplicates), `fate` (the decision rules, pure and unit-tested).
//! - [`store`]: the claim protocol behind one interface: Redis and Redis Cluster (the Lua
//!   scripts), the in-process memory store, and `store::watched` (a route's view that counts
//!   and reports store failures once).
//! - [`keys`]: a message's dedup key (message_id, header, body hash, JSON pointer) and its
//!   store key.
//! - [`amqp`]: broker connections (TLS, deadlines, `frame_max`), channel settings, header depth.
//! - [`telemetry`]: metric names, per-route metric handles, readiness (`health`), the HTTP
//!   endpoint (`http`), the status page at `/` (`status`), the store size sampler (`sizing`).
//! - [`throttle`]: rate limits for log lines a fault repeats.
//! - [`backoff`]: capped exponential backoff.
//! - [`shutdown`]: SIGTERM/SIGINT to a cancellation token, SIGHUP to reloads.
//! - [`cli`]: the commands besides `run` (`check`, `inspect`, `forget`, `declare`).
//! - [`demo`]: `dedupd demo`, a throwaway route with the proxy in-process, for a first look.

pub mod amqp;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod demo;
pub mod keys;
pub mod pipeline;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod throttle;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp::Endpoint;
use crate::config::Config;
use crate::pipeline::RouteCtx;
use crate::store::{Store, StoreError};
use crate::telemetry::{Component, Health};

/// Why [`run`] could not start. Once started, nothing but shutdown makes it return.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The metrics endpoint could not bind.
    #[error(transparent)]
    Metrics(#[from] telemetry::ServeError),
    /// The store settings are unusable (not: the store is down, which is waited out).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs every route until `shutdown` is cancelled, then lets in-flight messages finish for up
/// to `tuning.shutdown_grace`. A route that ends on its own (a bug: routes retry every failure)
/// is logged and leaves `/readyz` failing, while the other routes go on.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let listener = telemetry::bind(&config.metrics.listen).await?;
    run_on(config, listener, shutdown).await
}

/// [`run`] with the metrics endpoint on an already-bound `listener` (`metrics.listen` is not
/// used): tests bind port 0 and know the address before the proxy starts.
pub async fn run_on(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let handle = telemetry::install();
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
    // On an early error the endpoint's tasks must stop too: callers (tests, reloads) go on
    // running in this process, and a leaked listener would hold the port.
    let stop_http_on_error = http_stop.clone().drop_guard();
    let (addr, http) = telemetry::serve(listener, handle, health.clone(), http_stop.clone())?;
    let store = Store::open(&config.store).await?;
    stop_http_on_error.disarm();

    let instance: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        %instance,
        metrics = %addr,
        routes = config.routes.len(),
        "dedupd starting"
    );

    // The store size gauges are sampled beside the routes, never on their path.
    let sampler = tokio::spawn(telemetry::sizing::run(
        store.clone(),
        config.store.key_prefix.clone(),
        config.routes.keys().cloned().collect(),
        telemetry::sizing::SAMPLE_EVERY,
        shutdown.clone(),
    ));

    // The store's own upkeep (Redis: upgrade check and sweeper), also beside the routes.
    let upkeep = TaskTracker::new();
    let windows: Vec<(String, std::time::Duration)> = config
        .routes
        .iter()
        .map(|(name, route)| (name.clone(), route.window))
        .collect();
    store.start_upkeep(&windows, &upkeep, &shutdown);
    upkeep.close();

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
                url: config.downstream_url().clone(),
                tls: config.downstream_tls().cloned(),
                name: format!("dedupd {name} downstream"),
            },
            instance: instance.clone(),
            upstream_up,
            downstream_up,
            store_up: store_up.clone(),
            allow_eviction: config.store.allow_eviction,
        };
        let name = ctx.name.clone();
        tracker.spawn(supervise_route(
            name,
            pipeline::run_route(ctx, shutdown.clone()),
            shutdown.clone(),
            health.clone(),
        ));
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
    // It ends as soon as `shutdown` is cancelled, even mid-sample.
    let _ = sampler.await;
    upkeep.wait().await;
    tracing::info!("dedupd stopped");
    Ok(())
}

/// Runs one route's task to its end. A route only returns once `shutdown` is cancelled: any
/// other end (an early return, a panic) is a bug that stops its messages, so it is logged as an
/// ERROR with the route and the panic message, counted, and holds `/readyz` (through the
/// upstream component: the route consumes no more) down until the process restarts or reloads.
pub async fn supervise_route(
    route: Arc<str>,
    task: impl Future<Output = ()>,
    shutdown: CancellationToken,
    health: Arc<Health>,
) {
    // Unwind safety: after a panic nothing of the task is used again, only the payload.
    let outcome = AssertUnwindSafe(task).catch_unwind().await;
    let why = match outcome {
        Ok(()) if shutdown.is_cancelled() => return,
        Ok(()) => "returned before shutdown".to_owned(),
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_owned());
            format!("panicked: {message}")
        }
    };
    tracing::error!(%route, reason = %why, "route task ended: this route forwards nothing until dedupd restarts or reloads; not ready");
    ::metrics::counter!(telemetry::ROUTE_FAILURES, "route" => route.to_string()).increment(1);
    health.hold_down(Component::Upstream);
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
