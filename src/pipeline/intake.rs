//! Intake: receives deliveries, derives their keys, **claims them** in one store round trip
//! ([`Intake::claim_batch`]), decides each one's fate ([`fate::on_key`], [`fate::on_claim`]),
//! holds duplicates whose first copy is still in flight, and publishes the rest in delivery
//! order, keeping their confirm futures for settle.
//!
//! Batches follow the load: a quiet route forwards each delivery at once; under load, when
//! batches are already waiting for their confirms, intake lets deliveries pile up for a moment
//! (until a batch settles, at most [`BUSY_LINGER`]), so one store round trip, one publish burst
//! and one ack carry many messages; when the publish window is full it waits for room, and the
//! next batch takes everything that arrived meanwhile.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicPublishOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Consumer, PublisherConfirm};
use tokio::sync::{mpsc, Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fate::{self, ClaimDecision, ClaimFacts, Fate, KeyStep};
use super::holds::Book;
use super::{Batch, Incoming, Item, SessionError, Shared};
use crate::amqp;
use crate::backoff::Backoff;
use crate::config::{KeySpec, Mode, OnStoreError, WindowMode};
use crate::keys;
use crate::store::{BodyDigest, ClaimOutcome};

/// Headers added to a copy published to `duplicates_exchange`: the route that dropped it, and
/// why ([`AUDIT_DUPLICATE`] or [`AUDIT_CONFLICT`]).
pub const AUDIT_ROUTE_HEADER: &str = "x-dedupd-route";
/// See [`AUDIT_ROUTE_HEADER`].
pub const AUDIT_REASON_HEADER: &str = "x-dedupd-reason";
/// `x-dedupd-reason` of a duplicate: same key, same body (or a body not remembered).
pub const AUDIT_DUPLICATE: &str = "duplicate";
/// `x-dedupd-reason` of a conflict dropped with `on_conflict = "drop"`: same key, other body.
pub const AUDIT_CONFLICT: &str = "conflict";

/// With this many batches awaiting confirms, intake lets deliveries accumulate a little.
const BUSY_BATCHES: usize = 2;
/// The longest it waits for that: bounds the latency it adds.
const BUSY_LINGER: Duration = Duration::from_millis(2);

/// The intake stage of one session.
pub(super) struct Intake<'a> {
    pub shared: &'a Shared<'a>,
    pub ch_in: &'a Channel,
    pub ch_out: &'a Channel,
    /// The consumer tag, to cancel it on shutdown.
    pub tag: ShortString,
    pub exchange: ShortString,
    /// `routes.NAME.duplicates_exchange`.
    pub audit_exchange: ShortString,
    /// `routes.NAME.routing_key`; `None`: each message's own.
    pub routing_key: Option<ShortString>,
    /// The downstream user: RabbitMQ refuses any other `user_id`.
    pub user: String,
    pub store_backoff: Backoff,
}

/// What the store answered for a batch's claims.
enum Claimed {
    Outcomes(Vec<ClaimOutcome>),
    /// Store down with `on_error = "forward"`: forward unclaimed.
    FailOpen,
    Shutdown,
}

impl<'a> Intake<'a> {
    /// Takes batches until shutdown or a broker error, and hands them to settle in order.
    pub async fn run(
        mut self,
        mut consumer: Consumer,
        tx: mpsc::Sender<Batch<'a>>,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionError> {
        loop {
            let Some((batch, permit)) = self.next_batch(&mut consumer, shutdown).await? else {
                return self.cancel().await;
            };
            let Some(items) = self.process(batch, shutdown).await else {
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

    /// The next batch, with its room in the publish window: held deliveries that are due, or
    /// what the consumer has ready. `None` on shutdown.
    async fn next_batch(
        &mut self,
        consumer: &mut Consumer,
        shutdown: &CancellationToken,
    ) -> Result<Option<(Vec<Incoming>, SemaphorePermit<'a>)>, SessionError> {
        let window: &'a Semaphore = &self.shared.window;
        loop {
            // Room in the window first: while it is full, deliveries pile up in the consumer
            // and the next batch takes them all at once.
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(None),
                permit = window.acquire() => permit.expect("the window is never closed"),
            };
            self.linger_if_busy().await;
            let holds = &self.shared.holds;
            let next_due = holds.next_due();
            let batch = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(None),
                _ = holds.wake.notified() => holds.take_due(Instant::now()),
                _ = sleep_until(next_due), if next_due.is_some() => holds.take_due(Instant::now()),
                first = consumer.next() => self.ready_deliveries(first, consumer)?,
            };
            if batch.is_empty() {
                continue;
            }
            return Ok(self
                .more_room(permit, batch.len(), shutdown)
                .await
                .map(|permit| (batch, permit)));
        }
    }

    /// Under load (batches waiting for confirms), gives deliveries a moment to pile up.
    async fn linger_if_busy(&self) {
        if self.shared.pending_batches.load(Ordering::Relaxed) >= BUSY_BATCHES {
            let settled = self.shared.settled.notified();
            tokio::select! {
                _ = settled => {}
                _ = tokio::time::sleep(BUSY_LINGER) => {}
            }
        }
    }

    /// `first` and whatever else the consumer has ready, up to the batch size and the room.
    fn ready_deliveries(
        &self,
        first: Option<lapin::Result<Delivery>>,
        consumer: &mut Consumer,
    ) -> Result<Vec<Incoming>, SessionError> {
        let tuning = &self.shared.ctx.tuning;
        let limit = tuning
            .batch_size
            .min(1 + self.shared.window.available_permits());
        let mut batch = vec![self.receive(first)?];
        while batch.len() < limit {
            match consumer.next().now_or_never() {
                Some(next) => batch.push(self.receive(next)?),
                None => break,
            }
        }
        Ok(batch)
    }

    /// Held deliveries coming back may outnumber the room taken: waits for the rest.
    async fn more_room(
        &self,
        mut permit: SemaphorePermit<'a>,
        len: usize,
        shutdown: &CancellationToken,
    ) -> Option<SemaphorePermit<'a>> {
        let window: &'a Semaphore = &self.shared.window;
        let extra = len.min(self.shared.ctx.tuning.publish_window) - 1;
        if extra > 0 {
            let more = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                more = window.acquire_many(u32::try_from(extra).unwrap_or(u32::MAX)) => more.expect("the window is never closed"),
            };
            permit.merge(more);
        }
        Some(permit)
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
            body: None,
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
    ) -> Option<Vec<Item>> {
        let fates = self.derive_keys(&mut batch);
        let (keys, bodies): (Vec<String>, Vec<Option<BodyDigest>>) = batch
            .iter()
            .zip(&fates)
            .filter(|(_, f)| f.is_none())
            .filter_map(|(i, _)| Some((i.key.clone()?, i.body)))
            .unzip();
        // Keys in flight here when the claim goes out: an `Ours` answer for them means "still
        // in flight" even if the first copy finished while the claim was on the wire.
        let was_local: Vec<bool> = {
            let book = self.shared.holds.lock();
            keys.iter().map(|k| book.is_local(k)).collect()
        };
        let claimed = self.claim_batch(&keys, &bodies, shutdown).await;
        let outcomes = match claimed {
            Claimed::Outcomes(outcomes) => Some(outcomes.into_iter().zip(was_local)),
            Claimed::FailOpen => None,
            Claimed::Shutdown => return None,
        };
        let items = self.decide(batch, fates, outcomes);
        Some(self.publish(items).await)
    }

    /// Derives each delivery's store key; `Some(fate)` for those decided without a claim.
    /// Held deliveries come back with their key already derived.
    fn derive_keys(&self, batch: &mut [Incoming]) -> Vec<Option<Fate>> {
        let ctx = self.shared.ctx;
        let route = &ctx.route;
        let store_key = |id: &[u8]| keys::store_key(&ctx.key_prefix, &ctx.name, id);
        let mut fates = Vec::with_capacity(batch.len());
        for incoming in batch.iter_mut() {
            if incoming.key.is_some() {
                fates.push(None);
                continue;
            }
            let d = &incoming.delivery;
            let too_deep = amqp::header_depth(&d.properties) > amqp::MAX_HEADER_DEPTH;
            let derived = if too_deep {
                Err(keys::MissingKey::Absent)
            } else {
                keys::derive(&route.key, &d.properties, &d.data)
            };
            let fate = match fate::on_key(derived.is_ok(), route.on_missing_key, too_deep) {
                KeyStep::Claim => {
                    incoming.key = derived.ok().map(|id| store_key(&id));
                    // A key that is the body's hash cannot conflict: no second digest of it.
                    if route.key != KeySpec::Body {
                        incoming.body = Some(BodyDigest::of(&d.data));
                    }
                    None
                }
                KeyStep::ClaimBodyHash => {
                    incoming.key = Some(store_key(&keys::body_hash(&d.data)));
                    None
                }
                KeyStep::ForwardUnclaimed => Some(Fate::Publish { claim: None }),
                KeyStep::Reject(reason) => {
                    self.log_rejected(reason, derived.err());
                    Some(Fate::Reject(reason))
                }
            };
            fates.push(fate);
        }
        fates
    }

    fn log_rejected(&self, reason: &'static str, why: Option<keys::MissingKey>) {
        let Some(suppressed) = self.shared.logs.rejected.allow() else {
            return;
        };
        let key = &self.shared.ctx.route.key;
        match why {
            Some(why) if reason == crate::telemetry::reason::MISSING_KEY => {
                tracing::info!(%key, %why, suppressed, "message without a key: rejecting it to the queue's dead-letter exchange (on_missing_key = reject)");
            }
            _ => tracing::info!(
                reason,
                max_depth = amqp::MAX_HEADER_DEPTH,
                suppressed,
                "message headers nest deeper than dedupd forwards: rejecting it to the queue's dead-letter exchange"
            ),
        }
    }

    /// **Claims** the batch's keys in one store round trip, retrying while the store is down
    /// with `on_error = "block"`. With a sliding window, the claim also restarts the window of
    /// each duplicate's key.
    async fn claim_batch(
        &mut self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        shutdown: &CancellationToken,
    ) -> Claimed {
        if keys.is_empty() {
            return Claimed::Outcomes(Vec::new());
        }
        let ctx = self.shared.ctx;
        let slide = (ctx.route.window_mode == WindowMode::Sliding).then_some(ctx.route.window);
        loop {
            let owner = &self.shared.owner;
            match self
                .shared
                .store
                .claim(keys, bodies, owner, ctx.lease, slide)
                .await
            {
                Ok(outcomes) => {
                    self.store_backoff.reset();
                    return Claimed::Outcomes(outcomes);
                }
                Err(_) if ctx.on_store_error == OnStoreError::Forward => return Claimed::FailOpen,
                // Counted and reported by the watched store; wait and try again.
                Err(_) => {}
            }
            if !self.store_backoff.wait(shutdown).await {
                return Claimed::Shutdown;
            }
        }
    }

    /// Applies [`fate::on_claim`] to each claimed delivery: held ones go into the holds, the
    /// rest on to publish with their fate.
    fn decide(
        &self,
        batch: Vec<Incoming>,
        fates: Vec<Option<Fate>>,
        mut outcomes: Option<impl Iterator<Item = (ClaimOutcome, bool)>>,
    ) -> Vec<(Incoming, Fate)> {
        let mut items = Vec::with_capacity(batch.len());
        let now = Instant::now();
        for (incoming, fate) in batch.into_iter().zip(fates) {
            match (fate, outcomes.as_mut()) {
                (Some(fate), _) => items.push((incoming, fate)),
                // Store down with on_error = forward: forwarded as is (the failure is counted).
                (None, None) => items.push((incoming, Fate::Publish { claim: None })),
                (None, Some(outcomes)) => {
                    let (outcome, was_local) = outcomes
                        .next()
                        .expect("the store answers one outcome per key");
                    items.extend(self.on_claimed(incoming, outcome, was_local, now));
                }
            }
        }
        items
    }

    /// One delivery's claim answer: `Some` to publish (or ack) with its fate, `None` when it
    /// is now held.
    fn on_claimed(
        &self,
        incoming: Incoming,
        outcome: ClaimOutcome,
        was_local: bool,
        now: Instant,
    ) -> Option<(Incoming, Fate)> {
        let metrics = self.shared.metrics;
        let route = &self.shared.ctx.route;
        let key = incoming.key.clone().unwrap_or_default();
        let conflict = outcome == ClaimOutcome::Conflict;
        if conflict {
            metrics.conflicts.increment(1);
            self.log_conflict(&key);
        }
        let mut book = self.shared.holds.lock();
        let facts = ClaimFacts {
            outcome,
            observe: route.mode == Mode::Observe,
            on_conflict: route.on_conflict,
            redelivered_unvouched: incoming.delivery.redelivered && !book.take_certainly_lost(&key),
            first_copy_here: was_local || book.is_local(&key),
        };
        let fate = match fate::on_claim(facts) {
            ClaimDecision::Forward { takeover } => {
                if takeover {
                    metrics.takeovers.increment(1);
                }
                Fate::Publish {
                    claim: Some(book.claim(key)),
                }
            }
            ClaimDecision::ForwardObserved => {
                metrics.duplicates.increment(1);
                Fate::Publish { claim: None }
            }
            ClaimDecision::Drop => {
                metrics.duplicates.increment(1);
                match (route.duplicates_exchange.is_empty(), conflict) {
                    (true, _) => Fate::Duplicate,
                    (false, false) => Fate::Audit(AUDIT_DUPLICATE),
                    (false, true) => Fate::Audit(AUDIT_CONFLICT),
                }
            }
            ClaimDecision::ForwardConflict => Fate::Publish { claim: None },
            ClaimDecision::RejectConflict => Fate::Reject(crate::telemetry::reason::CONFLICT),
            ClaimDecision::HoldHere => {
                hold_here(&mut book, &key, incoming, &self.shared.holds.wake);
                return None;
            }
            ClaimDecision::HoldElsewhere { lease_left } => {
                book.hold_elsewhere(incoming, now, lease_left);
                return None;
            }
        };
        Some((incoming, fate))
    }

    /// Starts every publish of the batch at once, in order, and keeps the confirm futures:
    /// forwarded copies to the route's exchange, dropped ones to its `duplicates_exchange`.
    async fn publish(&self, items: Vec<(Incoming, Fate)>) -> Vec<Item> {
        let mut items: Vec<Item> = items
            .into_iter()
            .map(|(incoming, fate)| Item {
                incoming,
                fate,
                published: None,
            })
            .collect();
        if !items.iter().any(|item| item.fate.publishes()) {
            return items;
        }
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let publishes: Vec<_> = items
            .iter_mut()
            .filter(|item| item.fate.publishes())
            .map(|item| {
                let props = self.outgoing_properties(&mut item.incoming, item.fate);
                let d = &item.incoming.delivery;
                let (exchange, routing_key) = match item.fate {
                    // Audited copies keep their own routing key, so an operator can bind by it.
                    Fate::Audit(_) => (self.audit_exchange.clone(), d.routing_key.clone()),
                    _ => (
                        self.exchange.clone(),
                        self.routing_key
                            .clone()
                            .unwrap_or_else(|| d.routing_key.clone()),
                    ),
                };
                self.ch_out
                    .basic_publish(exchange, routing_key, options, &d.data, props)
            })
            .collect();
        let mut results = self.written(publishes).await.into_iter();
        for item in &mut items {
            if item.fate.publishes() {
                item.published = results.next();
            }
        }
        items
    }

    /// Waits until every publish is written (not confirmed), within `confirm_timeout`.
    async fn written(
        &self,
        publishes: Vec<impl std::future::Future<Output = lapin::Result<PublisherConfirm>>>,
    ) -> Vec<Result<PublisherConfirm, String>> {
        let timeout = self.shared.ctx.tuning.confirm_timeout;
        let count = publishes.len();
        match tokio::time::timeout(timeout, join_all(publishes)).await {
            Ok(results) => results
                .into_iter()
                .map(|r| r.map_err(|e| e.to_string()))
                .collect(),
            // lapin can wait forever for a socket that the broker closed cleanly.
            Err(_) => (0..count)
                .map(|_| Err(format!("publish not written within {timeout:?}")))
                .collect(),
        }
    }

    /// The delivery's properties for the copy, taken out of it (the delivery is not
    /// published twice): an audited copy gains `x-dedupd-route` and `x-dedupd-reason`, a
    /// forwarded one its key in `stamp_header` when that is set. RabbitMQ refuses a `user_id`
    /// other than the connection's user.
    fn outgoing_properties(&self, incoming: &mut Incoming, fate: Fate) -> BasicProperties {
        let mut props = std::mem::take(&mut incoming.delivery.properties);
        let route = &self.shared.ctx.route;
        match (fate, &incoming.key) {
            (Fate::Audit(reason), _) => {
                props = amqp::with_header(props, AUDIT_ROUTE_HEADER, &self.shared.ctx.name);
                props = amqp::with_header(props, AUDIT_REASON_HEADER, reason);
            }
            (Fate::Publish { .. }, Some(key)) if !route.stamp_header.is_empty() => {
                props = amqp::with_header(props, &route.stamp_header, self.stamp_of(key));
            }
            _ => {}
        }
        if props
            .user_id()
            .as_ref()
            .is_some_and(|u| u.as_str() != self.user)
        {
            tracing::debug!("user_id differs from the downstream user: forwarding without it");
            self.shared.metrics.user_id_stripped.increment(1);
            return amqp::without_user_id(props);
        }
        props
    }

    /// The key as the store holds it, without `{prefix}:{route}:`: the id itself, or `#` and
    /// the hex of its hash when the id is long or not UTF-8.
    fn stamp_of<'k>(&self, key: &'k str) -> &'k str {
        let ctx = self.shared.ctx;
        keys::stored_id(&ctx.key_prefix, &ctx.name, key)
    }

    /// One line per [`super::LOG_EVERY`] at most: a producer that reuses ids does it often.
    /// The key itself only at debug level: ids can carry customer data.
    fn log_conflict(&self, key: &str) {
        let route = &self.shared.ctx.route;
        if let Some(suppressed) = self.shared.logs.conflict.allow() {
            tracing::warn!(on_conflict = ?route.on_conflict, suppressed, "a message reused the key of a remembered message with a different body (a producer reusing ids?); counted in dedupd_conflicts_total");
        }
        tracing::debug!(key = self.stamp_of(key), "conflicting key");
    }
}

/// Holds a delivery on its key's first copy here, waking intake at once if that copy
/// finished while the claim was on the wire.
fn hold_here(book: &mut Book, key: &str, incoming: Incoming, wake: &tokio::sync::Notify) {
    if book.hold_here(key, incoming) {
        wake.notify_one();
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}
