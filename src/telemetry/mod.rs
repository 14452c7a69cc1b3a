//! Telemetry in one place: the metric names (the only place they are spelled), the handles a
//! route resolves once ([`RouteMetrics`]), the Prometheus recorder, readiness ([`health`]: what
//! `/readyz` and `dedupd_up` report), the HTTP endpoint ([`http`]: `/metrics`, `/healthz`,
//! `/readyz`, and the status page of [`status`] at `/`) and the store size sampler ([`sizing`]).

mod health;
mod http;
pub mod sizing;
pub mod status;

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use self::health::{Component, Health, HealthFlag};
pub use self::http::{bind, serve, ServeError};

/// Upstream deliveries received, per route.
pub const CONSUMED: &str = "dedupd_messages_consumed_total";
/// Messages published downstream and confirmed, per route.
pub const FORWARDED: &str = "dedupd_messages_forwarded_total";
/// Duplicates dropped (enforce) or seen (observe), per route.
pub const DUPLICATES: &str = "dedupd_duplicates_total";
/// Copies whose key was remembered with a different body (whatever `on_conflict` did), per
/// route.
pub const CONFLICTS: &str = "dedupd_conflicts_total";
/// Dropped copies published to the route's `duplicates_exchange` and confirmed there, per route.
pub const AUDITED: &str = "dedupd_duplicates_audited_total";
/// Messages nacked without requeue, per route and reason.
pub const REJECTED: &str = "dedupd_messages_rejected_total";
/// Claims taken over from a dead owner (possible duplicates), per route.
pub const TAKEOVERS: &str = "dedupd_takeovers_total";
/// Store operations that failed, per route.
pub const STORE_ERRORS: &str = "dedupd_store_errors_total";
/// Store round-trip latency, per operation.
pub const STORE_DURATION: &str = "dedupd_store_duration_seconds";
/// Delivery to upstream ack, per route.
pub const FORWARD_DURATION: &str = "dedupd_forward_duration_seconds";
/// Deliveries received and not yet settled, per route.
pub const INFLIGHT: &str = "dedupd_inflight_messages";
/// Publishes the downstream broker nacked (it did not take the message), per route.
pub const PUBLISHES_NACKED: &str = "dedupd_publishes_nacked_total";
/// 1 while a component is connected: upstream, downstream, store.
pub const UP: &str = "dedupd_up";
/// Always 1, labelled with the version.
pub const BUILD_INFO: &str = "dedupd_build_info";
/// Route tasks that ended without being asked to (a panic or an early return), per route.
pub const ROUTE_FAILURES: &str = "dedupd_route_failures_total";
/// Log lines that could not be written (stderr closed or full) and were dropped.
pub const LOG_WRITE_ERRORS: &str = "dedupd_log_write_errors_total";
/// Keys the store remembers, per route: sampled in the background.
pub const STORE_KEYS: &str = "dedupd_store_keys";
/// The store's own size in bytes: Redis `used_memory` (summed over a cluster's primaries), the
/// PostgreSQL table's `pg_total_relation_size`, the embedded store's disk blocks, or the memory
/// store's estimate of its map.
pub const STORE_MEMORY: &str = "dedupd_store_memory_bytes";
/// Store size samples that failed (the two gauges above then keep their last values).
pub const STORE_SAMPLE_ERRORS: &str = "dedupd_store_sample_errors_total";
/// Operations sent to the store, for sizing it and checking batching: Redis commands (a script
/// call is one), PostgreSQL statements, embedded write transactions.
pub const STORE_COMMANDS: &str = "dedupd_store_commands_total";
/// Remembered keys the store's sweeper deleted after their window ended.
pub const STORE_SWEPT: &str = "dedupd_store_swept_keys_total";

/// `reason` label values of [`REJECTED`].
pub mod reason {
    /// No key could be derived and `on_missing_key = "reject"`.
    pub const MISSING_KEY: &str = "missing_key";
    /// The downstream broker returned the message (no queue bound).
    pub const UNROUTABLE: &str = "unroutable";
    /// Same key as a remembered message, different body, and `on_conflict = "reject"`.
    pub const CONFLICT: &str = "conflict";
    /// Not a rejection: forwarded without a `user_id` the downstream user may not set.
    pub const USER_ID_STRIPPED: &str = "user_id_stripped";
    /// dedupd cannot handle the message safely: headers nested deeper than
    /// [`crate::amqp::MAX_HEADER_DEPTH`].
    pub const UNPARSABLE: &str = "unparsable";
}

/// Metric handles of one route, resolved once (the hot path never looks a name up).
pub struct RouteMetrics {
    pub consumed: Counter,
    pub forwarded: Counter,
    pub duplicates: Counter,
    pub conflicts: Counter,
    pub audited: Counter,
    pub takeovers: Counter,
    pub store_errors: Counter,
    pub rejected_missing_key: Counter,
    pub rejected_unroutable: Counter,
    pub user_id_stripped: Counter,
    pub publishes_nacked: Counter,
    pub forward_duration: Histogram,
    pub inflight: Gauge,
    route: String,
}

impl RouteMetrics {
    /// The handles of route `route`.
    pub fn new(route: &str) -> Self {
        let r = route.to_owned();
        Self {
            consumed: ::metrics::counter!(CONSUMED, "route" => r.clone()),
            forwarded: ::metrics::counter!(FORWARDED, "route" => r.clone()),
            duplicates: ::metrics::counter!(DUPLICATES, "route" => r.clone()),
            conflicts: ::metrics::counter!(CONFLICTS, "route" => r.clone()),
            audited: ::metrics::counter!(AUDITED, "route" => r.clone()),
            takeovers: ::metrics::counter!(TAKEOVERS, "route" => r.clone()),
            store_errors: ::metrics::counter!(STORE_ERRORS, "route" => r.clone()),
            rejected_missing_key: ::metrics::counter!(REJECTED, "route" => r.clone(), "reason" => reason::MISSING_KEY),
            rejected_unroutable: ::metrics::counter!(REJECTED, "route" => r.clone(), "reason" => reason::UNROUTABLE),
            user_id_stripped: ::metrics::counter!(REJECTED, "route" => r.clone(), "reason" => reason::USER_ID_STRIPPED),
            publishes_nacked: ::metrics::counter!(PUBLISHES_NACKED, "route" => r.clone()),
            forward_duration: ::metrics::histogram!(FORWARD_DURATION, "route" => r.clone()),
            inflight: ::metrics::gauge!(INFLIGHT, "route" => r.clone()),
            route: r,
        }
    }

    /// The rejection counter for `reason`.
    pub fn rejected(&self, why: &'static str) -> Counter {
        match why {
            reason::UNROUTABLE => self.rejected_unroutable.clone(),
            reason::MISSING_KEY => self.rejected_missing_key.clone(),
            // Not cached: registered on first use, so a new reason is never miscounted.
            other => {
                ::metrics::counter!(REJECTED, "route" => self.route.clone(), "reason" => other)
            }
        }
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder once per process (tests call `run` many times) and returns
/// the handle that renders the scrape payload.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0,
                    ],
                )
                .expect("static bucket list is not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be global (an embedding program's): then ours only
            // renders what is recorded through it, which is nothing; say so.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(CONSUMED, "Upstream deliveries received");
    describe_counter!(FORWARDED, "Messages published downstream and confirmed");
    describe_counter!(
        DUPLICATES,
        "Duplicates dropped (enforce) or seen (observe), conflicts dropped with on_conflict = drop included"
    );
    describe_counter!(
        CONFLICTS,
        "Copies whose key was remembered with a different body, whatever on_conflict did with them"
    );
    describe_counter!(
        AUDITED,
        "Dropped copies published to the route's duplicates_exchange and confirmed"
    );
    describe_counter!(REJECTED, "Messages nacked without requeue, by reason");
    describe_counter!(
        TAKEOVERS,
        "Claims taken over from a dead owner: possible duplicates"
    );
    describe_counter!(STORE_ERRORS, "Store operations that failed");
    describe_counter!(
        PUBLISHES_NACKED,
        "Publishes the downstream broker nacked; requeued upstream after a backoff"
    );
    describe_histogram!(STORE_DURATION, Unit::Seconds, "Store round-trip latency");
    describe_histogram!(FORWARD_DURATION, Unit::Seconds, "Delivery to upstream ack");
    describe_gauge!(INFLIGHT, "Deliveries received and not yet settled");
    describe_gauge!(UP, "1 while the component is connected");
    describe_gauge!(BUILD_INFO, "Build information");
    describe_gauge!(
        STORE_KEYS,
        "Keys the store remembers for the route, sampled every 15 s"
    );
    describe_gauge!(
        STORE_MEMORY,
        Unit::Bytes,
        "The store's size: Redis used_memory, PostgreSQL table size, embedded disk use, or the memory store's estimate"
    );
    describe_counter!(
        STORE_COMMANDS,
        "Operations sent to the store: Redis commands (a script call is one), PostgreSQL statements, embedded write transactions"
    );
    describe_counter!(
        STORE_SWEPT,
        "Remembered keys the store's sweeper deleted after their window ended"
    );
    describe_counter!(
        STORE_SAMPLE_ERRORS,
        "Store size samples that failed; the size gauges keep their last values"
    );
}
