//! One route's forwarding pipeline: where a message is claimed, published, committed and acked.
//!
//! A route runs in *sessions*: each session owns one upstream consumer channel and one
//! downstream publisher channel, and an epoch that goes into the owner token of every claim it
//! makes. Any broker error ends the session; the route reconnects with backoff and the next
//! session, with the next epoch, takes over the claims the old one left behind at once.
//!
//! Inside a session two stages run concurrently, connected by a bounded channel of batches:
//!
//! * **intake** gathers up to `batch_size` deliveries that are ready, derives their keys,
//!   claims them in one store round trip, and publishes the ones to forward in delivery order
//!   (all publishes of a batch started together, their confirm futures kept). Duplicates of a
//!   key that is still in flight are *held*: parked unacked until the first copy's fate is
//!   known, then claimed again.
//! * **settle** takes batches in order, awaits their confirms, commits the confirmed keys in
//!   one round trip (retried until it succeeds: a confirmed message is never released), releases
//!   the failed ones, wakes deliveries held on those keys, then acks upstream, with
//!   `multiple = true` when no held delivery lies below the batch.
//!
//! Up to `publish_window` messages may be between claim and ack: store round trips, confirms
//! and acks of different batches overlap, and a quiet route never waits for a batch to fill.
//! Batches follow the load rather than a fixed size: a quiet route forwards each delivery at
//! once; under load, when batches are already waiting for their confirms, intake lets
//! deliveries pile up for a moment (until a batch settles, at most 2ms) so that one store round
//! trip, one publish burst and one ack carry many messages; and when the window is full it
//! waits for room, and the next batch takes everything that arrived meanwhile. The order of publishes is the order of
//! deliveries because only intake publishes, one batch after another.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Confirmation, Consumer, PublisherConfirm};
use metrics::{Counter, Gauge, Histogram};
use tokio::sync::{mpsc, Notify, Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, AmqpError, Endpoint};
use crate::backoff::Backoff;
use crate::config::{Mode, OnMissingKey, OnStoreError, Route, Tuning};
use crate::error_chain;
use crate::keys;
use crate::metrics::{self as m, HealthFlag};
use crate::store::{ClaimOutcome, CommitOutcome, Owner, Store, StoreError};
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

/// Runs the route until `shutdown`, reconnecting after any failure.
pub async fn run_route(ctx: RouteCtx, shutdown: CancellationToken) {
    let metrics = RouteMetrics::new(&ctx.name);
    let logs = RouteLogs::new(&ctx.store);
    let mut backoff = Backoff::new(ctx.tuning.backoff_min, ctx.tuning.backoff_max);
    let mut epoch = 0;
    while !shutdown.is_cancelled() {
        epoch += 1;
        let started = Instant::now();
        let result = session(&ctx, &metrics, &logs, epoch, &shutdown).await;
        ctx.upstream_up.set(false);
        ctx.downstream_up.set(false);
        match result {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(route = %ctx.name, epoch, error = %error_chain(&error), "session ended; reconnecting");
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
    tracing::info!(route = %ctx.name, "route stopped");
}

async fn session(
    ctx: &RouteCtx,
    metrics: &RouteMetrics,
    logs: &RouteLogs,
    epoch: u64,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let up_conn = ctx.upstream.connect().await?;
    let down_conn = ctx.downstream.connect().await?;
    let ch_in = ctx
        .upstream
        .consumer_channel(&up_conn, ctx.prefetch)
        .await?;
    let ch_out = ctx.downstream.publisher_channel(&down_conn).await?;
    // Both brokers are connected: say so even while the store keeps the route from consuming.
    ctx.upstream_up.set(true);
    ctx.downstream_up.set(true);

    // With on_error = block nothing is consumed until the store answers, so a store that is
    // absent at start leaves every message in its queue.
    if !wait_for_store(ctx, logs, shutdown).await {
        return Ok(());
    }

    let tag = format!("dedupd-{}-{}-{}", ctx.name, ctx.instance, epoch);
    let consumer = ctx
        .upstream
        .rpc(
            "consuming",
            ch_in.basic_consume(
                ctx.route.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
    tracing::info!(route = %ctx.name, epoch, queue = %ctx.route.queue, upstream = %ctx.upstream.redacted(), downstream = %ctx.downstream.redacted(), "consuming");

    let shared = Shared {
        ctx,
        metrics,
        logs,
        unpublished: Mutex::default(),
        owner: Owner::new(ctx.instance.clone(), epoch),
        holds: Holds::default(),
        unsettled: AtomicI64::new(0),
        window: Semaphore::new(ctx.tuning.publish_window),
        pending_batches: AtomicUsize::new(0),
        settled: Notify::new(),
    };
    // Every batch holds at least one message of the window, so the window bounds the channel.
    let (tx, rx) = mpsc::channel(ctx.tuning.publish_window);
    let intake = Intake {
        shared: &shared,
        ch_in: &ch_in,
        ch_out: &ch_out,
        tag: tag.as_str().into(),
        exchange: ctx.route.exchange.as_str().into(),
        routing_key: ctx.route.routing_key.as_deref().map(ShortString::from),
        user: ctx.downstream.username(),
        store_backoff: Backoff::new(ctx.tuning.backoff_min, ctx.tuning.backoff_max),
    };
    let keeper_stop = CancellationToken::new();
    let (intake_result, settle_result, ()) = tokio::join!(
        intake.run(consumer, tx, shutdown),
        async {
            let result = settle(&shared, &ch_in, rx, shutdown).await;
            keeper_stop.cancel();
            result
        },
        keep_leases(&shared, &keeper_stop),
    );

    // Whatever is still unacked (held deliveries, batches cut short) returns to the queue
    // when the channel closes; it is no longer ours to count.
    metrics
        .inflight
        .decrement(shared.unsettled.load(Ordering::Relaxed) as f64);
    let close = async {
        let _ = ch_in.close(200, "dedupd session end".into()).await;
        let _ = ch_out.close(200, "dedupd session end".into()).await;
        let _ = up_conn.close(200, "dedupd session end".into()).await;
        let _ = down_conn.close(200, "dedupd session end".into()).await;
    };
    if tokio::time::timeout(crate::amqp::RPC_TIMEOUT, close)
        .await
        .is_err()
    {
        tracing::debug!(route = %ctx.name, "closing broker connections timed out");
    }
    intake_result.and(settle_result)
}

/// Waits until the store answers and cannot evict keys; `false` if shutdown came first.
///
/// A store that does not answer holds the route with `on_error = "block"` and not with
/// `"forward"`. A store that answers but may evict keys (Redis `maxmemory-policy` other than
/// `noeviction`) holds it either way unless `store.allow_eviction` is set: an evicted key is a
/// forgotten key, and its next copy would be forwarded with no warning.
async fn wait_for_store(ctx: &RouteCtx, logs: &RouteLogs, shutdown: &CancellationToken) -> bool {
    let mut backoff = Backoff::new(ctx.tuning.backoff_min, ctx.tuning.backoff_max);
    let refusal = Throttle::new(LOG_EVERY);
    loop {
        match ctx.store.ping().await {
            Ok(()) => {
                logs.store.answered();
                match ctx.store.eviction_risk().await {
                    Ok(None) => {}
                    Ok(Some(policy)) if ctx.allow_eviction => {
                        tracing::warn!(store = %logs.store.label, %policy, "store may evict keys (store.allow_eviction = true): an evicted key's next copy is forwarded again");
                    }
                    Ok(Some(policy)) => {
                        ctx.store_up.set(false);
                        if refusal.allow().is_some() {
                            tracing::error!(store = %logs.store.label, %policy, "store may evict keys, and an evicted key's next copy would be forwarded again: not consuming; set maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction), or store.allow_eviction = true to run anyway");
                        }
                        if !backoff.wait(shutdown).await {
                            return false;
                        }
                        continue;
                    }
                    Err(error) => {
                        // Managed Redis services often rename or forbid CONFIG.
                        tracing::warn!(store = %logs.store.label, error = %error_chain(&error), "cannot read the store's maxmemory-policy; make sure it is noeviction");
                    }
                }
                ctx.store_up.set(true);
                return true;
            }
            Err(error) => {
                ctx.store_up.set(false);
                if ctx.on_store_error == OnStoreError::Forward {
                    logs.store
                        .failed(&error, "forwarding without dedup (on_error = forward)");
                    return true;
                }
                logs.store
                    .failed(&error, "not consuming until it answers (on_error = block)");
            }
        }
        if !backoff.wait(shutdown).await {
            return false;
        }
    }
}

/// How often a repeated warning may be written (each one says how many were held back).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Rate-limited log sites of one route: faults that repeat per message or per retry write one
/// line when they start and a reminder at most every [`LOG_EVERY`]; counters carry the numbers.
struct RouteLogs {
    store: StoreAlarm,
    nacked: Throttle,
    unroutable: Throttle,
    missing_key: Throttle,
    commit: Throttle,
}

impl RouteLogs {
    fn new(store: &Store) -> Self {
        Self {
            store: StoreAlarm {
                label: store.label(),
                down: std::sync::atomic::AtomicBool::new(false),
                reminder: Throttle::new(LOG_EVERY),
            },
            nacked: Throttle::new(LOG_EVERY),
            unroutable: Throttle::new(LOG_EVERY),
            missing_key: Throttle::new(LOG_EVERY),
            commit: Throttle::new(LOG_EVERY),
        }
    }
}

/// The store's log lines for one route: a warning when it stops answering (naming it), a
/// reminder at most every [`LOG_EVERY`] while it stays away, and one line when it is back,
/// rather than a line per retry.
struct StoreAlarm {
    label: String,
    down: std::sync::atomic::AtomicBool,
    reminder: Throttle,
}

impl StoreAlarm {
    fn failed(&self, error: &StoreError, consequence: &str) {
        let error = error_chain(error);
        if !self.down.swap(true, Ordering::Relaxed) {
            self.reminder.reset();
            self.reminder.allow();
            tracing::warn!(store = %self.label, %error, "store not answering: {consequence}");
        } else if let Some(suppressed) = self.reminder.allow() {
            tracing::warn!(store = %self.label, %error, failures = suppressed + 1, "store still not answering: {consequence}");
        }
    }

    fn answered(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(store = %self.label, "store answering again");
        }
    }
}

/// Metric handles of one route, resolved once.
struct RouteMetrics {
    consumed: Counter,
    forwarded: Counter,
    duplicates: Counter,
    takeovers: Counter,
    store_errors: Counter,
    rejected_missing_key: Counter,
    rejected_unroutable: Counter,
    user_id_stripped: Counter,
    publishes_nacked: Counter,
    forward_duration: Histogram,
    inflight: Gauge,
    route: String,
}

impl RouteMetrics {
    fn new(route: &str) -> Self {
        let r = route.to_owned();
        Self {
            consumed: metrics::counter!(m::CONSUMED, "route" => r.clone()),
            forwarded: metrics::counter!(m::FORWARDED, "route" => r.clone()),
            duplicates: metrics::counter!(m::DUPLICATES, "route" => r.clone()),
            takeovers: metrics::counter!(m::TAKEOVERS, "route" => r.clone()),
            store_errors: metrics::counter!(m::STORE_ERRORS, "route" => r.clone()),
            rejected_missing_key: metrics::counter!(m::REJECTED, "route" => r.clone(), "reason" => m::reason::MISSING_KEY),
            rejected_unroutable: metrics::counter!(m::REJECTED, "route" => r.clone(), "reason" => m::reason::UNROUTABLE),
            user_id_stripped: metrics::counter!(m::REJECTED, "route" => r.clone(), "reason" => m::reason::USER_ID_STRIPPED),
            publishes_nacked: metrics::counter!(m::PUBLISHES_NACKED, "route" => r.clone()),
            forward_duration: metrics::histogram!(m::FORWARD_DURATION, "route" => r.clone()),
            inflight: metrics::gauge!(m::INFLIGHT, "route" => r.clone()),
            route: r,
        }
    }

    fn rejected(&self, reason: &'static str) -> Counter {
        match reason {
            m::reason::UNROUTABLE => self.rejected_unroutable.clone(),
            m::reason::MISSING_KEY => self.rejected_missing_key.clone(),
            // Not cached: registered on first use, so a new reason is never miscounted.
            other => {
                metrics::counter!(m::REJECTED, "route" => self.route.clone(), "reason" => other)
            }
        }
    }
}

/// State both stages of one session see.
struct Shared<'a> {
    ctx: &'a RouteCtx,
    metrics: &'a RouteMetrics,
    logs: &'a RouteLogs,
    /// Keys released after a publish that certainly did not arrive (nacked or returned): their
    /// redelivered copies are not possible duplicates, so claiming them is no takeover.
    unpublished: Mutex<HashSet<String>>,
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

/// With this many batches awaiting confirms, intake lets deliveries accumulate a little.
const BUSY_BATCHES: usize = 2;
/// The longest it waits for that: bounds the latency it adds.
const BUSY_LINGER: Duration = Duration::from_millis(2);

/// A delivery on its way through the pipeline.
struct Incoming {
    delivery: Delivery,
    received: Instant,
    /// The store key; `None` forwards without dedup.
    key: Option<String>,
    /// How often it was found in flight elsewhere (spaces out the rechecks).
    rechecks: u32,
}

/// What intake decided for a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Publish it; a claimed key (with its local claim number) is committed on confirm and
    /// released on failure.
    Publish { claim: Option<u64> },
    /// A duplicate of a key already done: ack.
    Duplicate,
    /// Nack without requeue, so the queue's dead-letter exchange receives it.
    Reject(&'static str),
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

/// Deliveries held because their key is in flight, and the tags they occupy.
#[derive(Default)]
struct Holds {
    inner: Mutex<HoldsInner>,
    /// Wakes intake when a local first copy finished.
    wake: Notify,
}

#[derive(Default)]
struct HoldsInner {
    /// Keys in flight in this session, each with the deliveries waiting for its outcome.
    local: HashMap<String, Local>,
    /// Numbers the claims of this session, so a finished claim never clears a newer one.
    claims: u64,
    /// Deliveries waiting on another instance's claim, with when to check again.
    remote: Vec<(Instant, Incoming)>,
    /// Deliveries whose key's local first copy finished: claim them again.
    ready: Vec<Incoming>,
    /// Tags of every held delivery, until settle acks or nacks it.
    tags: BTreeSet<u64>,
}

impl Holds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HoldsInner> {
        // A panic while holding this lock is a bug elsewhere; the map itself stays usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ready and due deliveries, removed from the holds (their tags stay until settled).
    fn take_due(&self, now: Instant) -> Vec<Incoming> {
        let mut inner = self.lock();
        let mut out = std::mem::take(&mut inner.ready);
        let mut i = 0;
        while i < inner.remote.len() {
            if inner.remote[i].0 <= now {
                out.push(inner.remote.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        out
    }

    fn next_due(&self) -> Option<Instant> {
        self.lock().remote.iter().map(|(due, _)| *due).min()
    }
}

/// A key claimed in this session and not yet committed or released.
#[derive(Default)]
struct Local {
    claim: u64,
    waiting: Vec<Incoming>,
}

impl HoldsInner {
    /// Records a new local claim of `key` (keeping anyone already waiting on the key) and
    /// returns its number.
    fn claim(&mut self, key: String) -> u64 {
        self.claims += 1;
        self.local.entry(key).or_default().claim = self.claims;
        self.claims
    }

    /// The claim `claim` of `key` finished: wake whoever waits on it. `true` if anyone did.
    fn finish(&mut self, key: &str, claim: u64) -> bool {
        match self.local.get(key) {
            Some(local) if local.claim == claim => {}
            // A newer claim of the key is in flight; its waiters wait for that one.
            _ => return false,
        }
        let waiting = self
            .local
            .remove(key)
            .map(|l| l.waiting)
            .unwrap_or_default();
        let woke = !waiting.is_empty();
        self.ready.extend(waiting);
        woke
    }
}

/// Remote recheck delay: 50ms doubling to 1s, never past the other claim's lease.
fn recheck_delay(attempt: u32, lease_left: Duration) -> Duration {
    let backoff = Duration::from_millis(50) * 2u32.saturating_pow(attempt.min(5));
    backoff
        .min(Duration::from_secs(1))
        .min(lease_left + Duration::from_millis(5))
}

struct Intake<'a> {
    shared: &'a Shared<'a>,
    ch_in: &'a Channel,
    ch_out: &'a Channel,
    tag: ShortString,
    exchange: ShortString,
    routing_key: Option<ShortString>,
    /// The downstream user: RabbitMQ refuses any other `user_id`.
    user: String,
    store_backoff: Backoff,
}

impl<'a> Intake<'a> {
    async fn run(
        mut self,
        mut consumer: Consumer,
        tx: mpsc::Sender<Batch<'a>>,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        let batch_size = self.shared.ctx.tuning.batch_size;
        let window: &'a Semaphore = &self.shared.window;
        loop {
            // Room in the window first: while it is full, deliveries pile up in the consumer
            // and the next batch takes them all at once.
            let mut permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return self.cancel().await,
                permit = window.acquire() => permit.expect("the window is never closed"),
            };
            // Under load, batches waiting for confirms: give deliveries a moment to pile up
            // (until a batch settles, at most BUSY_LINGER), so one round trip, one publish burst
            // and one ack carry many messages. A quiet route never waits.
            if self.shared.pending_batches.load(Ordering::Relaxed) >= BUSY_BATCHES {
                let settled = self.shared.settled.notified();
                tokio::select! {
                    _ = settled => {}
                    _ = tokio::time::sleep(BUSY_LINGER) => {}
                }
            }
            let next_due = self.shared.holds.next_due();
            let batch = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return self.cancel().await,
                _ = self.shared.holds.wake.notified() => self.shared.holds.take_due(Instant::now()),
                _ = sleep_until(next_due), if next_due.is_some() => self.shared.holds.take_due(Instant::now()),
                first = consumer.next() => {
                    let limit = batch_size.min(1 + window.available_permits());
                    let mut batch = vec![self.receive(first)?];
                    while batch.len() < limit {
                        match consumer.next().now_or_never() {
                            Some(next) => batch.push(self.receive(next)?),
                            None => break,
                        }
                    }
                    batch
                }
            };
            if batch.is_empty() {
                continue;
            }
            // Held deliveries coming back may outnumber the room taken; wait for the rest.
            let extra = batch.len().min(self.shared.ctx.tuning.publish_window) - 1;
            if extra > 0 {
                let more = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return self.cancel().await,
                    more = window.acquire_many(u32::try_from(extra).unwrap_or(u32::MAX)) => more.expect("the window is never closed"),
                };
                permit.merge(more);
            }
            let Some(items) = self.process(batch, shutdown).await? else {
                return Ok(());
            };
            // A publish that could not even be written means the downstream channel is gone:
            // settle this batch (release, requeue) and reconnect.
            let broken = items.iter().find_map(|item| match &item.published {
                Some(Err(error)) => Some(error.clone()),
                _ => None,
            });
            self.shared.pending_batches.fetch_add(1, Ordering::Relaxed);
            if tx.send(Batch { items, permit }).await.is_err() {
                return Ok(());
            }
            if let Some(error) = broken {
                return Err(SessionError::Publish(error));
            }
        }
    }

    /// Stops consuming (shutdown); what is in flight is settled by the settle stage.
    async fn cancel(&self) -> Result<(), SessionError> {
        let cancel = self
            .ch_in
            .basic_cancel(self.tag.clone(), BasicCancelOptions::default());
        let _ = self
            .shared
            .ctx
            .upstream
            .rpc("cancelling the consumer", cancel)
            .await;
        Ok(())
    }

    fn receive(&self, next: Option<lapin::Result<Delivery>>) -> Result<Incoming, SessionError> {
        let delivery = match next {
            None => return Err(SessionError::Cancelled),
            Some(Err(error)) => return Err(SessionError::Consumer(error)),
            Some(Ok(delivery)) => delivery,
        };
        let shared = self.shared;
        shared.metrics.consumed.increment(1);
        shared.metrics.inflight.increment(1.0);
        shared.unsettled.fetch_add(1, Ordering::Relaxed);
        Ok(Incoming {
            key: None,
            rechecks: 0,
            received: Instant::now(),
            delivery,
        })
    }

    /// Keys, claims and publishes one batch. `None`: shutdown while waiting for the store.
    async fn process(
        &mut self,
        mut batch: Vec<Incoming>,
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Item>>, SessionError> {
        let ctx = self.shared.ctx;
        let route = &ctx.route;
        let mut fates: Vec<Option<Fate>> = Vec::with_capacity(batch.len());
        for incoming in &mut batch {
            // Held deliveries come back with their key already derived.
            if incoming.key.is_some() {
                fates.push(None);
                continue;
            }
            let d = &incoming.delivery;
            // Before anything recursive touches the headers (key derivation, publishing):
            // consumers' client libraries recurse on them too.
            if amqp::header_depth(&d.properties) > amqp::MAX_HEADER_DEPTH {
                if let Some(suppressed) = self.shared.logs.missing_key.allow() {
                    tracing::info!(route = %ctx.name, max_depth = amqp::MAX_HEADER_DEPTH, suppressed, "message headers nest deeper than dedupd forwards: rejecting it to the queue's dead-letter exchange");
                }
                fates.push(Some(Fate::Reject(m::reason::UNPARSABLE)));
                continue;
            }
            match keys::derive(&route.key, &d.properties, &d.data) {
                Ok(id) => {
                    incoming.key = Some(keys::store_key(&ctx.key_prefix, &ctx.name, &id));
                    fates.push(None);
                }
                Err(why) => match route.on_missing_key {
                    OnMissingKey::Reject => {
                        if let Some(suppressed) = self.shared.logs.missing_key.allow() {
                            tracing::info!(route = %ctx.name, key = %route.key, %why, suppressed, "message without a key: rejecting it to the queue's dead-letter exchange (on_missing_key = reject)");
                        }
                        fates.push(Some(Fate::Reject(m::reason::MISSING_KEY)));
                    }
                    OnMissingKey::Forward => {
                        fates.push(Some(Fate::Publish { claim: None }));
                    }
                    OnMissingKey::HashBody => {
                        let id = keys::body_hash(&d.data);
                        incoming.key = Some(keys::store_key(&ctx.key_prefix, &ctx.name, &id));
                        fates.push(None);
                    }
                },
            }
        }

        let claim_keys: Vec<String> = batch
            .iter()
            .zip(&fates)
            .filter(|(_, f)| f.is_none())
            .filter_map(|(i, _)| i.key.clone())
            .collect();
        // Keys in flight here when the claim goes out: an `Ours` answer for them means "still
        // in flight" even if the first copy finished while the claim was on the wire.
        let was_local: Vec<bool> = {
            let holds = self.shared.holds.lock();
            claim_keys
                .iter()
                .map(|k| holds.local.contains_key(k))
                .collect()
        };
        let outcomes = if claim_keys.is_empty() {
            Some(Vec::new())
        } else {
            match self.claim(&claim_keys, shutdown).await {
                Claimed::Outcomes(o) => Some(o),
                Claimed::FailOpen => None,
                Claimed::Shutdown => return Ok(None),
            }
        };

        let observe = route.mode == Mode::Observe;
        let mut outcomes = outcomes.map(|o| o.into_iter().zip(was_local));
        let mut items = Vec::with_capacity(batch.len());
        let now = Instant::now();
        for (incoming, fate) in batch.into_iter().zip(fates) {
            if let Some(fate) = fate {
                items.push((incoming, fate));
                continue;
            }
            let Some(outcomes) = outcomes.as_mut() else {
                // Store down with on_error = forward: counted per message, forwarded as is.
                ctx.store_up.set(false);
                items.push((incoming, Fate::Publish { claim: None }));
                continue;
            };
            let mut incoming = incoming;
            let (outcome, was_local) = outcomes
                .next()
                .expect("the store answers one outcome per key");
            let key = incoming.key.as_deref().unwrap_or_default();
            let mut holds = self.shared.holds.lock();
            // Ours with nobody here working on it is as good as a fresh claim: a claim attempt
            // that timed out but was applied, or a release that failed.
            let outcome = match outcome {
                ClaimOutcome::Ours if !was_local && !holds.local.contains_key(key) => {
                    ClaimOutcome::Claimed
                }
                other => other,
            };
            let fate = match outcome {
                ClaimOutcome::Claimed => {
                    // A redelivered message may have been published by an owner that died or
                    // lost its connection before the confirm: count it as a possible duplicate.
                    if incoming.delivery.redelivered && !self.was_unpublished(key) {
                        self.shared.metrics.takeovers.increment(1);
                    }
                    Fate::Publish {
                        claim: Some(holds.claim(key.to_owned())),
                    }
                }
                ClaimOutcome::TakenOver => {
                    self.shared.metrics.takeovers.increment(1);
                    Fate::Publish {
                        claim: Some(holds.claim(key.to_owned())),
                    }
                }
                ClaimOutcome::Done => {
                    self.shared.metrics.duplicates.increment(1);
                    if observe {
                        Fate::Publish { claim: None }
                    } else {
                        Fate::Duplicate
                    }
                }
                ClaimOutcome::Ours | ClaimOutcome::InFlightElsewhere { .. } if observe => {
                    self.shared.metrics.duplicates.increment(1);
                    Fate::Publish { claim: None }
                }
                ClaimOutcome::Ours => {
                    // The first copy is in flight in this session: wait for its outcome, or
                    // look again at once if it finished while this claim was on the wire.
                    holds.tags.insert(incoming.delivery.delivery_tag);
                    match holds.local.get_mut(key) {
                        Some(local) => local.waiting.push(incoming),
                        None => {
                            holds.ready.push(incoming);
                            self.shared.holds.wake.notify_one();
                        }
                    }
                    continue;
                }
                ClaimOutcome::InFlightElsewhere { lease_left } => {
                    holds.tags.insert(incoming.delivery.delivery_tag);
                    let due = now + recheck_delay(incoming.rechecks, lease_left);
                    incoming.rechecks += 1;
                    holds.remote.push((due, incoming));
                    continue;
                }
            };
            drop(holds);
            items.push((incoming, fate));
        }

        Ok(Some(self.publish(items).await))
    }

    /// Whether `key` was released here after a publish that certainly did not arrive (and
    /// forgets it: only the first redelivered copy is vouched for).
    fn was_unpublished(&self, key: &str) -> bool {
        let mut unpublished = self
            .shared
            .unpublished
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        unpublished.remove(key)
    }

    /// Claims with retries while the store is down (on_error = block).
    async fn claim(&mut self, keys: &[String], shutdown: &CancellationToken) -> Claimed {
        let ctx = self.shared.ctx;
        loop {
            match ctx.store.claim(keys, &self.shared.owner, ctx.lease).await {
                Ok(outcomes) => {
                    ctx.store_up.set(true);
                    self.shared.logs.store.answered();
                    self.store_backoff.reset();
                    return Claimed::Outcomes(outcomes);
                }
                Err(error) => {
                    self.shared.metrics.store_errors.increment(1);
                    ctx.store_up.set(false);
                    if ctx.on_store_error == OnStoreError::Forward {
                        self.shared
                            .logs
                            .store
                            .failed(&error, "forwarding without dedup (on_error = forward)");
                        return Claimed::FailOpen;
                    }
                    self.shared.logs.store.failed(
                        &error,
                        "holding the batch until it answers (on_error = block)",
                    );
                }
            }
            if !self.store_backoff.wait(shutdown).await {
                return Claimed::Shutdown;
            }
        }
    }

    /// Starts every publish of the batch at once, in order, and keeps the confirm futures.
    async fn publish(&self, items: Vec<(Incoming, Fate)>) -> Vec<Item> {
        let mut items: Vec<Item> = items
            .into_iter()
            .map(|(incoming, fate)| Item {
                incoming,
                fate,
                published: None,
            })
            .collect();
        let mut props = Vec::new();
        for item in &mut items {
            if matches!(item.fate, Fate::Publish { .. }) {
                let mut p = std::mem::take(&mut item.incoming.delivery.properties);
                if p.user_id()
                    .as_ref()
                    .is_some_and(|u| u.as_str() != self.user)
                {
                    tracing::debug!(route = %self.shared.ctx.name, "user_id differs from the downstream user: forwarding without it");
                    self.shared.metrics.user_id_stripped.increment(1);
                    p = amqp::without_user_id(p);
                }
                props.push(p);
            }
        }
        if props.is_empty() {
            return items;
        }
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let publishes = items
            .iter()
            .filter(|item| matches!(item.fate, Fate::Publish { .. }))
            .zip(props)
            .map(|(item, props)| {
                let d = &item.incoming.delivery;
                let routing_key = self
                    .routing_key
                    .clone()
                    .unwrap_or_else(|| d.routing_key.clone());
                self.ch_out.basic_publish(
                    self.exchange.clone(),
                    routing_key,
                    options,
                    &d.data,
                    props,
                )
            });
        let timeout = self.shared.ctx.tuning.confirm_timeout;
        let results: Vec<Result<PublisherConfirm, String>> =
            match tokio::time::timeout(timeout, join_all(publishes)).await {
                Ok(results) => results
                    .into_iter()
                    .map(|r| r.map_err(|e| e.to_string()))
                    .collect(),
                // lapin can wait forever for a socket that the broker closed cleanly.
                Err(_) => (0..items.len())
                    .map(|_| Err(format!("publish not written within {timeout:?}")))
                    .collect(),
            };
        let mut results = results.into_iter();
        for item in &mut items {
            if matches!(item.fate, Fate::Publish { .. }) {
                item.published = results.next();
            }
        }
        items
    }
}

enum Claimed {
    Outcomes(Vec<ClaimOutcome>),
    FailOpen,
    Shutdown,
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// How a delivery ends upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settlement {
    Ack,
    Requeue,
    Reject(&'static str),
}

/// The settle stage: confirms → commit/release → wake holds → acks.
async fn settle(
    shared: &Shared<'_>,
    ch_in: &Channel,
    mut rx: mpsc::Receiver<Batch<'_>>,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let ctx = shared.ctx;
    let mut result = Ok(());
    // A downstream that keeps nacking (a full queue with reject-publish) would otherwise see
    // every message again at once, in a loop: each batch with nacks waits before they are
    // requeued, doubling while nacks continue. Settle is sequential, so this slows the whole
    // route down to what the downstream takes.
    let mut nack_backoff = Backoff::new(ctx.tuning.backoff_min, ctx.tuning.backoff_max);
    while let Some(Batch { mut items, permit }) = rx.recv().await {
        let deadline = Instant::now() + ctx.tuning.confirm_timeout;
        let confirms = items.iter_mut().map(|item| {
            let published = item.published.take();
            async move {
                match published {
                    None => None,
                    Some(Err(error)) => Some(Err(error)),
                    Some(Ok(confirm)) => {
                        Some(match tokio::time::timeout_at(deadline, confirm).await {
                            Ok(Ok(confirmation)) => Ok(confirmation),
                            Ok(Err(error)) => Err(error.to_string()),
                            Err(_) => Err(format!(
                                "no confirm within {:?}",
                                ctx.tuning.confirm_timeout
                            )),
                        })
                    }
                }
            }
        });
        let confirms = join_all(confirms).await;

        let mut commit = Vec::new();
        let mut release = Vec::new();
        let mut settlements = Vec::with_capacity(items.len());
        let mut finished = Vec::new();
        let mut unpublished = Vec::new();
        let (mut nacked, mut unknown, mut first_error) = (0, 0, None);
        let mut returned = None;
        for (item, confirm) in items.iter().zip(confirms) {
            let claimed_key = match item.fate {
                Fate::Publish { claim: Some(claim) } => {
                    finished.push((item.incoming.key.as_deref().unwrap_or_default(), claim));
                    item.incoming.key.clone()
                }
                _ => None,
            };
            let settlement = match (item.fate, confirm) {
                (Fate::Duplicate, _) => Settlement::Ack,
                (Fate::Reject(reason), _) => Settlement::Reject(reason),
                (
                    Fate::Publish { .. },
                    Some(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)),
                ) => {
                    shared.metrics.forwarded.increment(1);
                    commit.extend(claimed_key);
                    Settlement::Ack
                }
                (Fate::Publish { .. }, Some(Ok(Confirmation::Ack(Some(message))))) => {
                    returned.get_or_insert_with(|| {
                        (
                            message.reply_text.to_string(),
                            message.routing_key.to_string(),
                        )
                    });
                    unpublished.extend(claimed_key.clone());
                    release.extend(claimed_key);
                    Settlement::Reject(m::reason::UNROUTABLE)
                }
                (Fate::Publish { .. }, Some(Ok(Confirmation::Nack(_)))) => {
                    nacked += 1;
                    unpublished.extend(claimed_key.clone());
                    release.extend(claimed_key);
                    Settlement::Requeue
                }
                (Fate::Publish { .. }, failed) => {
                    // The publish may have reached the queue: the requeued copy may be
                    // forwarded again (counted as a takeover when it is claimed again).
                    unknown += 1;
                    if let Some(Err(error)) = failed {
                        first_error.get_or_insert(error);
                    }
                    release.extend(claimed_key);
                    Settlement::Requeue
                }
            };
            settlements.push(settlement);
        }
        // At most one line per batch (a broken connection fails hundreds at once), and faults
        // that repeat batch after batch are rate-limited too; the counters keep the numbers.
        if let Some((reply, routing_key)) = returned {
            if let Some(suppressed) = shared.logs.unroutable.allow() {
                tracing::warn!(route = %ctx.name, exchange = %ctx.route.exchange, %routing_key, %reply, suppressed, "downstream returned a message (no queue bound for this exchange and routing key): rejecting it to the upstream dead-letter exchange");
            }
        }
        if nacked > 0 {
            shared.metrics.publishes_nacked.increment(nacked);
            if let Some(suppressed) = shared.logs.nacked.allow() {
                tracing::warn!(route = %ctx.name, messages = nacked, suppressed, "downstream nacked publishes (a full queue with x-overflow = reject-publish?): requeueing them upstream after a backoff");
            }
        }
        if unknown > 0 {
            let error = first_error.unwrap_or_else(|| "not published".to_owned());
            tracing::warn!(route = %ctx.name, messages = unknown, %error, "publish outcome unknown: requeueing upstream (they may arrive twice)");
        }

        if !commit.is_empty() {
            commit_until_done(shared, &commit).await;
        }
        if nacked > 0 {
            let delay = nack_backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        } else if !commit.is_empty() {
            nack_backoff.reset();
        }
        if !unpublished.is_empty() {
            let mut set = shared.unpublished.lock().unwrap_or_else(|e| e.into_inner());
            // Keys whose copies went to another consumer are never claimed here again; the
            // bound keeps them from piling up (forgetting one only over-counts takeovers).
            if set.len() > 4 * usize::from(ctx.prefetch) {
                set.clear();
            }
            set.extend(unpublished);
        }
        if !release.is_empty() {
            release_best_effort(shared, &release).await;
        }
        if !finished.is_empty() {
            let mut holds = shared.holds.lock();
            let mut woke = false;
            for (key, claim) in finished {
                woke |= holds.finish(key, claim);
            }
            drop(holds);
            if woke {
                shared.holds.wake.notify_one();
            }
        }

        if let Err(error) = ack(shared, ch_in, &items, &settlements).await {
            // Tags of a dead channel: the broker requeued those deliveries itself. Keep
            // draining so confirmed publishes still get committed.
            if result.is_ok() {
                result = Err(error);
            }
        }
        drop(permit);
        shared.pending_batches.fetch_sub(1, Ordering::Relaxed);
        shared.settled.notify_waiters();
    }
    result
}

/// Commits until the store answers: a confirmed message must never be released, or a later
/// copy would be forwarded again. Commit writes the key whatever it holds (see the store docs);
/// what it found says whether a second copy may have gone out.
async fn commit_until_done(shared: &Shared<'_>, keys: &[String]) {
    let ctx = shared.ctx;
    let mut backoff = Backoff::new(ctx.tuning.backoff_min, ctx.tuning.backoff_max);
    let mut retried = false;
    loop {
        match ctx
            .store
            .commit(keys, &shared.owner, ctx.route.window)
            .await
        {
            Ok(outcomes) => {
                ctx.store_up.set(true);
                shared.logs.store.answered();
                let (mut lapsed, mut contested) = (0u64, 0u64);
                for outcome in outcomes {
                    match commit_verdict(outcome, retried) {
                        CommitVerdict::Fine => {}
                        CommitVerdict::Lapsed => lapsed += 1,
                        CommitVerdict::PossibleDuplicate => contested += 1,
                    }
                }
                if contested > 0 {
                    shared.metrics.takeovers.increment(contested);
                }
                if lapsed + contested > 0 {
                    if let Some(suppressed) = shared.logs.commit.allow() {
                        tracing::warn!(route = %ctx.name, lapsed, contested, suppressed, "commit found claims that had lapsed (the store was unreachable longer than store.lease) and wrote them anyway; contested ones were claimed by another owner meanwhile, which may forward a second copy (counted in dedupd_takeovers_total)");
                    }
                }
                return;
            }
            Err(error) => {
                shared.metrics.store_errors.increment(1);
                ctx.store_up.set(false);
                shared.logs.store.failed(
                    &error,
                    "retrying the commit of confirmed messages (their claims are kept alive)",
                );
            }
        }
        retried = true;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// What a commit outcome means for the duplicate promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitVerdict {
    /// Committed over our own claim, or a done key our own earlier attempt may have written.
    Fine,
    /// Our claim had lapsed and nobody took it: written now, no second copy went out.
    Lapsed,
    /// Another owner had the key in flight or done: a second copy may have been forwarded.
    PossibleDuplicate,
}

/// A commit retried after an error may find the key done by its own earlier attempt (applied,
/// answer lost): that is no evidence of another owner.
fn commit_verdict(outcome: CommitOutcome, retried: bool) -> CommitVerdict {
    match outcome {
        CommitOutcome::Committed => CommitVerdict::Fine,
        CommitOutcome::DoneElsewhere if retried => CommitVerdict::Fine,
        CommitOutcome::Restored => CommitVerdict::Lapsed,
        CommitOutcome::DoneElsewhere | CommitOutcome::Overrode => CommitVerdict::PossibleDuplicate,
    }
}

/// Keeps the leases of this session's in-flight claims alive (every third of `store.lease`)
/// until `stop`: a confirm that takes long, or a commit retried while the store refuses writes,
/// must not let a live owner's claim lapse, or a later copy would be claimed and forwarded.
async fn keep_leases(shared: &Shared<'_>, stop: &CancellationToken) {
    let ctx = shared.ctx;
    let mut tick = tokio::time::interval((ctx.lease / 3).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let keys: Vec<String> = shared.holds.lock().local.keys().cloned().collect();
        if keys.is_empty() {
            continue;
        }
        let renewal = ctx.store.renew(&keys, &shared.owner, ctx.lease);
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = renewal => result,
        };
        match result {
            Ok(renewed) => {
                let lost = renewed.iter().filter(|ok| !**ok).count();
                if lost > 0 {
                    tracing::debug!(route = %ctx.name, keys = lost, "leases no longer ours when renewing (committed meanwhile, or lapsed)");
                }
            }
            Err(error) => {
                shared.metrics.store_errors.increment(1);
                shared
                    .logs
                    .store
                    .failed(&error, "cannot renew the leases of in-flight claims");
            }
        }
    }
}

/// Releases a few times; if the store stays away the lease frees the keys instead.
async fn release_best_effort(shared: &Shared<'_>, keys: &[String]) {
    let ctx = shared.ctx;
    let mut backoff = Backoff::new(ctx.tuning.backoff_min, ctx.tuning.backoff_max);
    for _ in 0..3 {
        match ctx.store.release(keys, &shared.owner).await {
            Ok(_) => return,
            Err(error) => {
                shared.metrics.store_errors.increment(1);
                shared.logs.store.failed(&error, "retrying a release");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    tracing::warn!(route = %ctx.name, keys = keys.len(), "giving up releasing; the claims free themselves after store.lease");
}

/// Nacks, then acks, the batch's deliveries upstream.
async fn ack(
    shared: &Shared<'_>,
    ch_in: &Channel,
    items: &[Item],
    settlements: &[Settlement],
) -> Result<(), SessionError> {
    let metrics = shared.metrics;
    let min_held = {
        let mut holds = shared.holds.lock();
        if !holds.tags.is_empty() {
            for item in items {
                holds.tags.remove(&item.incoming.delivery.delivery_tag);
            }
        }
        holds.tags.first().copied()
    };

    let mut nacks = Vec::new();
    let mut acks = Vec::new();
    for (item, settlement) in items.iter().zip(settlements) {
        let tag = item.incoming.delivery.delivery_tag;
        match settlement {
            Settlement::Ack => acks.push(tag),
            Settlement::Requeue => nacks.push((tag, true)),
            Settlement::Reject(reason) => {
                metrics.rejected(reason).increment(1);
                nacks.push((tag, false));
            }
        }
    }
    let nacks = nacks.into_iter().map(|(tag, requeue)| {
        ch_in.basic_nack(
            tag,
            BasicNackOptions {
                multiple: false,
                requeue,
            },
        )
    });
    let acks = async {
        let mut results = join_all(nacks).await;
        if let Some(&last) = acks.iter().max() {
            // `multiple` acks every unacked tag up to `last`: only safe when no held delivery
            // lies below it (earlier batches are settled already, later ones have larger tags).
            if min_held.is_none_or(|held| held > last) {
                results.push(
                    ch_in
                        .basic_ack(last, BasicAckOptions { multiple: true })
                        .await,
                );
            } else {
                let single = acks
                    .iter()
                    .map(|&tag| ch_in.basic_ack(tag, BasicAckOptions { multiple: false }));
                results.extend(join_all(single).await);
            }
        }
        results
    };
    let results = shared.ctx.upstream.rpc_all("acking upstream", acks).await;

    let settled = items.len() as i64;
    shared.unsettled.fetch_sub(settled, Ordering::Relaxed);
    metrics.inflight.decrement(settled as f64);
    for item in items {
        metrics
            .forward_duration
            .record(item.incoming.received.elapsed().as_secs_f64());
    }
    results.map_err(SessionError::from)
}
