//! The store size sampler: a background task that asks the store how big it is
//! ([`Store::size`]) every [`SAMPLE_EVERY`] and sets `dedupd_store_keys{route}` and
//! `dedupd_store_memory_bytes`.
//!
//! It runs beside the routes, never on their path: a sample costs the store a bounded amount
//! (see `store`'s module docs: O(1) commands on Redis, one pass over the map in memory), and a
//! slow or failing store only delays the next sample. A failed sample is counted
//! (`dedupd_store_sample_errors_total`) and leaves the gauges at their last values; the first
//! failure after a success is logged at INFO (an operator wondering why the gauge is stale finds
//! the reason), the repeats at DEBUG, since the routes already report a store that is away.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{STORE_KEYS, STORE_MEMORY, STORE_SAMPLE_ERRORS};
use crate::error_chain;
use crate::store::Store;

/// How often the store is sampled. Key counts move slowly (a window is hours), and a scrape
/// interval is typically 15-60 s.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(15);

/// Samples the store at once, then every `every`, until `shutdown`.
pub async fn run(
    store: Store,
    prefix: String,
    routes: Vec<String>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    // A slow store must not cause a burst of catch-up samples once it answers.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sampled = tokio::select! {
            _ = shutdown.cancelled() => return,
            sampled = sample(&store, &prefix, &routes) => sampled,
        };
        match sampled {
            Ok(()) => {
                if failing {
                    tracing::debug!("store size sampling works again");
                }
                failing = false;
            }
            Err(error) if !failing => {
                failing = true;
                tracing::info!(
                    store = %store.label(),
                    error = %error_chain(&error),
                    "cannot sample the store's size: dedupd_store_keys and \
                     dedupd_store_memory_bytes keep their last values; retrying every {}s",
                    every.as_secs()
                );
            }
            Err(error) => {
                tracing::debug!(error = %error_chain(&error), "store size sample failed again");
            }
        }
    }
}

/// Takes one sample and sets the gauges; on failure counts it and leaves them alone.
pub async fn sample(
    store: &Store,
    prefix: &str,
    routes: &[String],
) -> Result<(), crate::store::StoreError> {
    match store.size(prefix, routes).await {
        Ok(size) => {
            for (route, keys) in routes.iter().zip(&size.keys) {
                metrics::gauge!(STORE_KEYS, "route" => route.clone()).set(*keys as f64);
            }
            metrics::gauge!(STORE_MEMORY).set(size.memory_bytes as f64);
            Ok(())
        }
        Err(error) => {
            metrics::counter!(STORE_SAMPLE_ERRORS).increment(1);
            Err(error)
        }
    }
}
