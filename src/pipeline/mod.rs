//! One route's forwarding pipeline: where a message is claimed, published, committed and acked.
//!
//! A route runs in *sessions*: each session owns one upstream consumer channel and one
//! downstream publisher channel, and an epoch that goes into the owner token of every claim it
//! makes. Any broker error ends the session; the route reconnects with backoff and the next
//! session, with the next epoch, takes over the claims the old one left behind at once.
//!
//! Inside a session three tasks run together: **intake** ([`intake`]) and **settle**
//! ([`settle`]), connected by a bounded channel of batches, and the lease keeper
//! ([`settle::keep_leases`]). The decisions they take are pure functions in [`fate`]; held
//! duplicates and the session's book of claims are in [`holds`].
//!
//! # The life of a delivery
//!
//! | step | what happens | where |
//! |---|---|---|
//! | 1 | received, counted in flight | [`intake::Intake::run`] → `receive` |
//! | 2 | key derived (or rejected: no key, headers too deep) | `Intake::derive_keys`, [`fate::on_key`] |
//! | 3 | **claimed** with the whole batch, one store round trip | `Intake::claim_batch` |
//! | 4 | forwarded, dropped as a duplicate, or held | `Intake::on_claimed`, [`fate::on_claim`], [`holds`] |
//! | 5 | published in delivery order, confirm future kept | `Intake::publish` |
//! | 6 | confirm awaited; ack / requeue / reject decided | [`settle::settle`], [`fate::on_confirm`] |
//! | 7 | **committed** (confirmed) or released (failed), held copies woken | `commit_until_done`, `update_store` |
//! | 8 | acked upstream (`multiple` when nothing held lies below) | `settle::ack`, [`fate::ack_plan`] |
//!
//! Up to `publish_window` messages may be between steps 3 and 8: store round trips, confirms
//! and acks of different batches overlap. The order of publishes is the order of deliveries,
//! because only intake publishes, one batch after another. While a claim is between steps 3 and
//! 7, the lease keeper renews it, so a live owner's claim never lapses.

mod fate;
mod holds;
mod intake;
mod settle;

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::BasicConsumeOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer, PublisherConfirm};
use tokio::sync::{mpsc, Notify, Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::fate::Fate;
use self::holds::Holds;
use self::intake::Intake;
use crate::amqp::{AmqpError, Endpoint};
use crate::backoff::Backoff;
use crate::config::{OnStoreError, Route, Tuning};
use crate::error_chain;
use crate::store::watched::WatchedStore;
use crate::store::{BodyDigest, Owner, Store};
use crate::telemetry::{HealthFlag, RouteMetrics};
use crate::throttle::Throttle;

/// Everything a route needs, fixed for the life of the process.
pub struct RouteCtx {
    /// Route name (the `[routes.NAME]` table).
    pub name: Arc<str>,
    /// The route's settings.
    pub route: Route,
    /// The shared store.
    pub store: Store,
    /// `store.key_prefix`.
    pub key_prefix: String,
    /// `store.lease`.
    pub lease: Duration,
    /// `store.on_error`.
    pub on_store_error: OnStoreError,
    /// `[tuning]`.
    pub tuning: Tuning,
    /// `upstream.prefetch`.
    pub prefetch: u16,
    /// Where to consume.
    pub upstream: Endpoint,
    /// Where to publish.
    pub downstream: Endpoint,
    /// Random per process; with the session epoch it makes the owner token.
    pub instance: Arc<str>,
    /// This route's upstream connection state.
    pub upstream_up: HealthFlag,
    /// This route's downstream connection state.
    pub downstream_up: HealthFlag,
    /// The store's state, shared by all routes.
    pub store_up: Arc<HealthFlag>,
    /// `store.allow_eviction`: run even if the store may evict keys.
    pub allow_eviction: bool,
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("upstream consumer: {0}")]
    Consumer(lapin::Error),
    #[error("upstream consumer was cancelled by the broker (queue deleted?)")]
    Cancelled,
    #[error("downstream publish: {0}")]
    Publish(String),
}

/// Runs the route until `shutdown`, reconnecting after any failure. Every log line of the
/// route carries its name, and every line of a session its epoch (tracing spans).
pub async fn run_route(ctx: RouteCtx, shutdown: CancellationToken) {
    let span = tracing::info_span!("route", route = %ctx.name);
    route_sessions(ctx, shutdown).instrument(span).await;
}

async fn route_sessions(ctx: RouteCtx, shutdown: CancellationToken) {
    let metrics = RouteMetrics::new(&ctx.name);
    let store = WatchedStore::new(
        ctx.store.clone(),
        ctx.on_store_error,
        ctx.store_up.clone(),
        metrics.store_errors.clone(),
    );
    let logs = RouteLogs::default();
    let mut backoff = Backoff::new(ctx.tuning.backoff_min, ctx.tuning.backoff_max);
    let mut epoch = 0;
    while !shutdown.is_cancelled() {
        epoch += 1;
        let started = Instant::now();
        let parts = Parts {
            ctx: &ctx,
            metrics: &metrics,
            store: &store,
            logs: &logs,
        };
        let span = tracing::info_span!("session", epoch);
        let result = session(parts, epoch, &shutdown).instrument(span).await;
        ctx.upstream_up.set(false);
        ctx.downstream_up.set(false);
        match result {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(epoch, error = %error_chain(&error), "session ended; reconnecting");
            }
        }
        // A session that ran a while was healthy: start the backoff over.
        if started.elapsed() > ctx.tuning.backoff_max * 2 {
            backoff.reset();
        }
        if !backoff.wait(&shutdown).await {
            break;
        }
    }
    tracing::info!("route stopped");
}

/// What a route keeps across its sessions.
#[derive(Clone, Copy)]
struct Parts<'a> {
    ctx: &'a RouteCtx,
    metrics: &'a RouteMetrics,
    store: &'a WatchedStore,
    logs: &'a RouteLogs,
}

/// The broker side of one session.
struct Links {
    up: Connection,
    down: Connection,
    ch_in: Channel,
    ch_out: Channel,
}

async fn session(
    parts: Parts<'_>,
    epoch: u64,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let ctx = parts.ctx;
    let links = connect(ctx).await?;
    // With on_error = block nothing is consumed until the store answers, so a store that is
    // absent at start leaves every message in its queue.
    if !wait_for_store(ctx, parts.store, shutdown).await {
        return Ok(());
    }
    let tag = format!("dedupd-{}-{}-{}", ctx.name, ctx.instance, epoch);
    let consuming = ctx.upstream.rpc(
        "consuming",
        links.ch_in.basic_consume(
            ctx.route.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    );
    let consumer = consuming.await?;
    tracing::info!(queue = %ctx.route.queue, upstream = %ctx.upstream.redacted(), downstream = %ctx.downstream.redacted(), "consuming");
    let result = run_stages(parts, &links, consumer, epoch, tag, shutdown).await;
    close(links).await;
    result
}

/// Both connections and channels; the brokers read up from here on, even while the store
/// keeps the route from consuming.
async fn connect(ctx: &RouteCtx) -> Result<Links, SessionError> {
    let up = ctx.upstream.connect().await?;
    let down = ctx.downstream.connect().await?;
    let ch_in = ctx.upstream.consumer_channel(&up, ctx.prefetch).await?;
    let ch_out = ctx.downstream.publisher_channel(&down).await?;
    ctx.upstream_up.set(true);
    ctx.downstream_up.set(true);
    Ok(Links {
        up,
        down,
        ch_in,
        ch_out,
    })
}

/// Runs intake, settle and the lease keeper until intake stops and settle has drained.
async fn run_stages(
    parts: Parts<'_>,
    links: &Links,
    consumer: Consumer,
    epoch: u64,
    tag: String,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let ctx = parts.ctx;
    let shared = Shared::new(parts, Owner::new(ctx.instance.clone(), epoch));
    // Every batch holds at least one message of the window, so the window bounds the channel.
    let (tx, rx) = mpsc::channel(ctx.tuning.publish_window);
    let intake = Intake {
        shared: &shared,
        ch_in: &links.ch_in,
        ch_out: &links.ch_out,
        tag: tag.into(),
        exchange: ctx.route.exchange.as_str().into(),
        audit_exchange: ctx.route.duplicates_exchange.as_str().into(),
        routing_key: ctx.route.routing_key.as_deref().map(ShortString::from),
        user: ctx.downstream.username(),
        store_backoff: Backoff::new(ctx.tuning.backoff_min, ctx.tuning.backoff_max),
    };
    let keeper_stop = CancellationToken::new();
    let (intake_result, settle_result, ()) = tokio::join!(
        intake.run(consumer, tx, shutdown),
        async {
            let result = settle::settle(&shared, &links.ch_in, rx, shutdown).await;
            keeper_stop.cancel();
            result
        },
        settle::keep_leases(&shared, &keeper_stop),
    );
    // Whatever is still unacked (held deliveries, batches cut short) returns to the queue
    // when the channel closes; it is no longer ours to count.
    let unsettled = shared.unsettled.load(Ordering::Relaxed);
    parts.metrics.inflight.decrement(unsettled as f64);
    intake_result.and(settle_result)
}

async fn close(links: Links) {
    let close = async {
        let _ = links.ch_in.close(200, "dedupd session end".into()).await;
        let _ = links.ch_out.close(200, "dedupd session end".into()).await;
        let _ = links.up.close(200, "dedupd session end".into()).await;
        let _ = links.down.close(200, "dedupd session end".into()).await;
    };
    if tokio::time::timeout(crate::amqp::RPC_TIMEOUT, close)
        .await
        .is_err()
    {
        tracing::debug!("closing broker connections timed out");
    }
}

/// Waits until the store answers and cannot evict keys; `false` if shutdown came first.
///
/// A store that does not answer holds the route with `on_error = "block"` and not with
/// `"forward"`. A store that answers but may evict keys (Redis `maxmemory-policy` other than
/// `noeviction`) holds it either way unless `store.allow_eviction` is set: an evicted key is a
/// forgotten key, and its next copy would be forwarded with no warning.
async fn wait_for_store(
    ctx: &RouteCtx,
    store: &WatchedStore,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Backoff::new(ctx.tuning.backoff_min, ctx.tuning.backoff_max);
    let refusal = Throttle::new(LOG_EVERY);
    loop {
        match store.ping().await {
            Ok(()) => match refused_eviction(ctx, store).await {
                None => return true,
                Some(policy) => {
                    store.hold_down();
                    if refusal.allow().is_some() {
                        tracing::error!(store = %store.label(), %policy, "store may evict keys, and an evicted key's next copy would be forwarded again: not consuming; set maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction), or store.allow_eviction = true to run anyway");
                    }
                }
            },
            Err(_) if ctx.on_store_error == OnStoreError::Forward => return true,
            // Counted and reported by the watched store.
            Err(_) => {}
        }
        if !backoff.wait(shutdown).await {
            return false;
        }
    }
}

/// The store's eviction policy when it may evict keys and the operator did not allow it.
async fn refused_eviction(ctx: &RouteCtx, store: &WatchedStore) -> Option<String> {
    match store.inner().eviction_risk().await {
        Ok(None) => None,
        Ok(Some(policy)) if ctx.allow_eviction => {
            tracing::warn!(store = %store.label(), %policy, "store may evict keys (store.allow_eviction = true): an evicted key's next copy is forwarded again");
            None
        }
        Ok(Some(policy)) => Some(policy),
        Err(error) => {
            // Managed Redis services often rename or forbid CONFIG.
            tracing::warn!(store = %store.label(), error = %error_chain(&error), "cannot read the store's maxmemory-policy; make sure it is noeviction");
            None
        }
    }
}

/// How often a repeated warning may be written (each one says how many were held back).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Rate-limited log sites of one route: faults that repeat per message or per batch write one
/// line when they start and a reminder at most every [`LOG_EVERY`]; counters carry the numbers.
struct RouteLogs {
    nacked: Throttle,
    unroutable: Throttle,
    rejected: Throttle,
    commit: Throttle,
    conflict: Throttle,
}

impl Default for RouteLogs {
    fn default() -> Self {
        Self {
            nacked: Throttle::new(LOG_EVERY),
            unroutable: Throttle::new(LOG_EVERY),
            rejected: Throttle::new(LOG_EVERY),
            commit: Throttle::new(LOG_EVERY),
            conflict: Throttle::new(LOG_EVERY),
        }
    }
}

/// State the stages of one session share.
struct Shared<'a> {
    ctx: &'a RouteCtx,
    metrics: &'a RouteMetrics,
    store: &'a WatchedStore,
    logs: &'a RouteLogs,
    owner: Owner,
    holds: Holds,
    /// Deliveries received and not yet acked or nacked in this session.
    unsettled: AtomicI64,
    /// Room for messages between claim and upstream ack (`tuning.publish_window`).
    window: Semaphore,
    /// Batches sent to settle and not yet acked.
    pending_batches: AtomicUsize,
    /// Signalled each time settle finishes a batch.
    settled: Notify,
}

impl<'a> Shared<'a> {
    fn new(parts: Parts<'a>, owner: Owner) -> Self {
        Self {
            ctx: parts.ctx,
            metrics: parts.metrics,
            store: parts.store,
            logs: parts.logs,
            owner,
            holds: Holds::default(),
            unsettled: AtomicI64::new(0),
            window: Semaphore::new(parts.ctx.tuning.publish_window),
            pending_batches: AtomicUsize::new(0),
            settled: Notify::new(),
        }
    }

    /// `items` were acked or nacked upstream: out of flight, their latency recorded.
    fn settled_count(&self, items: &[Item]) {
        let settled = items.len() as i64;
        self.unsettled.fetch_sub(settled, Ordering::Relaxed);
        self.metrics.inflight.decrement(settled as f64);
        for item in items {
            let elapsed = item.incoming.received.elapsed().as_secs_f64();
            self.metrics.forward_duration.record(elapsed);
        }
    }
}

/// A delivery on its way through the pipeline.
struct Incoming {
    delivery: Delivery,
    received: Instant,
    /// The store key; `None` forwards without dedup.
    key: Option<String>,
    /// The body's digest, remembered with the key to tell conflicts from duplicates; `None`
    /// when the key is the body's hash already.
    body: Option<BodyDigest>,
    /// How often it was found in flight elsewhere (spaces out the rechecks).
    rechecks: u32,
}

/// One batch on its way from intake to settle, holding its room in the publish window.
struct Batch<'a> {
    items: Vec<Item>,
    permit: SemaphorePermit<'a>,
}

/// A delivery intake has finished with, and its publish (if any).
struct Item {
    incoming: Incoming,
    fate: Fate,
    published: Option<Result<PublisherConfirm, String>>,
}
