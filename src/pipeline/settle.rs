//! Settle: takes intake's batches in order, awaits their confirms, decides each delivery's end
//! ([`fate::on_confirm`]), **commits** the confirmed keys in one round trip (retried until it
//! succeeds: a confirmed message is never released), releases the failed ones, wakes the
//! deliveries held on those keys, then acks upstream ([`fate::ack_plan`]). Also the lease keeper,
//! which renews this session's claims while they are worked on.

use std::time::Duration;

use futures::future::join_all;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Channel, Confirmation, PublisherConfirm};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fate::{self, AckPlan, CommitVerdict, Confirmed, Settle, Settlement, StoreStep};
use super::{Batch, Item, SessionError, Shared};
use crate::backoff::Backoff;
use crate::store::BodyDigest;

/// One batch's decisions, gathered for the store and the acks.
#[derive(Default)]
struct Outcome {
    settlements: Vec<Settlement>,
    commit: Vec<String>,
    /// The body digest of each key in `commit`.
    commit_bodies: Vec<Option<BodyDigest>>,
    /// Audit copies the audit exchange confirmed.
    audited: u64,
    release: Vec<String>,
    /// Keys whose copies certainly did not arrive (their redelivery is no takeover).
    certainly_lost: Vec<String>,
    /// `(key, local claim)` of every claim that ends with this batch.
    finished: Vec<(String, u64)>,
    nacked: u64,
    unknown: u64,
    first_error: Option<String>,
    /// Reply text and routing key of the first returned message, and whether it was an
    /// audit copy (published to the `duplicates_exchange`).
    returned: Option<(String, String, bool)>,
}

/// Settles batches until intake hangs up. A broker error while acking ends the session after
/// the remaining batches are settled (their confirmed publishes must still be committed).
pub(super) async fn settle(
    shared: &Shared<'_>,
    ch_in: &Channel,
    mut rx: mpsc::Receiver<Batch<'_>>,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let tuning = &shared.ctx.tuning;
    let mut result = Ok(());
    // A downstream that keeps nacking (a full queue with reject-publish) would otherwise see
    // every message again at once, in a loop: each batch with nacks waits before they are
    // requeued, doubling while nacks continue. Settle is sequential, so this slows the whole
    // route down to what the downstream takes.
    let mut nack_backoff = Backoff::new(tuning.backoff_min, tuning.backoff_max);
    while let Some(Batch { mut items, permit }) = rx.recv().await {
        let confirms = await_confirms(&mut items, tuning.confirm_timeout).await;
        let outcome = decide(shared, &items, confirms);
        log_outcome(shared, &outcome);
        if !outcome.commit.is_empty() {
            commit_until_done(shared, &outcome.commit, &outcome.commit_bodies).await;
        }
        if outcome.nacked > 0 {
            let delay = nack_backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        } else if !outcome.commit.is_empty() {
            nack_backoff.reset();
        }
        update_store(
            shared,
            outcome.release,
            outcome.certainly_lost,
            outcome.finished,
        )
        .await;
        if let Err(error) = ack(shared, ch_in, &items, &outcome.settlements).await {
            // Tags of a dead channel: the broker requeued those deliveries itself. Keep
            // draining so confirmed publishes still get committed.
            result = result.and(Err(error));
        }
        drop(permit);
        shared
            .pending_batches
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        shared.settled.notify_waiters();
    }
    result
}

/// Every confirm of the batch, within one `confirm_timeout` from now.
async fn await_confirms(items: &mut [Item], timeout: Duration) -> Vec<(Confirmed, Option<String>)> {
    let deadline = Instant::now() + timeout;
    let confirms = items.iter_mut().map(|item| {
        let published = item.published.take();
        async move { confirmed(published, deadline, timeout).await }
    });
    join_all(confirms).await
}

/// What the broker said about one publish, with the error when it said nothing.
async fn confirmed(
    published: Option<Result<PublisherConfirm, String>>,
    deadline: Instant,
    timeout: Duration,
) -> (Confirmed, Option<String>) {
    let confirm = match published {
        None => return (Confirmed::NotPublished, None),
        Some(Err(error)) => return (Confirmed::Unknown, Some(error)),
        Some(Ok(confirm)) => confirm,
    };
    match tokio::time::timeout_at(deadline, confirm).await {
        Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => (Confirmed::Acked, None),
        Ok(Ok(Confirmation::Ack(Some(message)))) => {
            let returned = format!("{}\u{0}{}", message.reply_text, message.routing_key);
            (Confirmed::Returned, Some(returned))
        }
        Ok(Ok(Confirmation::Nack(_))) => (Confirmed::Nacked, None),
        Ok(Err(error)) => (Confirmed::Unknown, Some(error.to_string())),
        Err(_) => (
            Confirmed::Unknown,
            Some(format!("no confirm within {timeout:?}")),
        ),
    }
}

/// Applies [`fate::on_confirm`] to every delivery of the batch.
fn decide(
    shared: &Shared<'_>,
    items: &[Item],
    confirms: Vec<(Confirmed, Option<String>)>,
) -> Outcome {
    let mut out = Outcome::default();
    for (item, (confirmed, detail)) in items.iter().zip(confirms) {
        let Settle {
            settlement,
            store,
            forwarded,
            certainly_lost,
        } = fate::on_confirm(item.fate, confirmed);
        if let (fate::Fate::Publish { claim: Some(claim) }, Some(key)) =
            (item.fate, &item.incoming.key)
        {
            out.finished.push((key.clone(), claim));
            match store {
                StoreStep::Commit => {
                    out.commit.push(key.clone());
                    out.commit_bodies.push(item.incoming.body);
                }
                StoreStep::Release => out.release.push(key.clone()),
                StoreStep::Nothing => {}
            }
            if certainly_lost {
                out.certainly_lost.push(key.clone());
            }
        }
        if forwarded {
            shared.metrics.forwarded.increment(1);
        }
        if item.fate.audits() && confirmed == Confirmed::Acked {
            out.audited += 1;
        }
        match confirmed {
            Confirmed::Nacked => out.nacked += 1,
            Confirmed::Returned => {
                out.returned = out.returned.take().or_else(|| {
                    let detail = detail.unwrap_or_default();
                    let (reply, routing_key) = detail.split_once('\u{0}').unwrap_or((&detail, ""));
                    Some((reply.to_owned(), routing_key.to_owned(), item.fate.audits()))
                });
            }
            Confirmed::Unknown if item.fate.publishes() => {
                out.unknown += 1;
                out.first_error = out.first_error.take().or(detail);
            }
            _ => {}
        }
        out.settlements.push(settlement);
    }
    out
}

/// At most one line per batch (a broken connection fails hundreds at once), and faults that
/// repeat batch after batch are rate-limited too; the counters keep the numbers.
fn log_outcome(shared: &Shared<'_>, outcome: &Outcome) {
    let route = &shared.ctx.route;
    if let Some((reply, routing_key, audit)) = &outcome.returned {
        let exchange = if *audit {
            &route.duplicates_exchange
        } else {
            &route.exchange
        };
        if let Some(suppressed) = shared.logs.unroutable.allow() {
            tracing::warn!(%exchange, %routing_key, %reply, suppressed, "downstream returned a message (no queue bound for this exchange and routing key): rejecting it to the upstream dead-letter exchange");
        }
    }
    if outcome.nacked > 0 {
        shared.metrics.publishes_nacked.increment(outcome.nacked);
        if let Some(suppressed) = shared.logs.nacked.allow() {
            tracing::warn!(messages = outcome.nacked, suppressed, "downstream nacked publishes (a full queue with x-overflow = reject-publish?): requeueing them upstream after a backoff");
        }
    }
    shared.metrics.audited.increment(outcome.audited);
    if outcome.unknown > 0 {
        let error = outcome.first_error.as_deref().unwrap_or("not published");
        tracing::warn!(messages = outcome.unknown, %error, "publish outcome unknown: requeueing upstream (they may arrive twice)");
    }
}

/// Releases the failed claims, notes the keys that certainly did not arrive, and wakes the
/// deliveries held on every claim that ended.
async fn update_store(
    shared: &Shared<'_>,
    release: Vec<String>,
    certainly_lost: Vec<String>,
    finished: Vec<(String, u64)>,
) {
    if !release.is_empty() {
        release_best_effort(shared, &release).await;
    }
    if certainly_lost.is_empty() && finished.is_empty() {
        return;
    }
    let mut book = shared.holds.lock();
    book.certainly_lost(certainly_lost, 4 * usize::from(shared.ctx.prefetch));
    let mut woke = false;
    for (key, claim) in finished {
        woke |= book.finish(&key, claim);
    }
    drop(book);
    if woke {
        shared.holds.wake.notify_one();
    }
}

/// Commits until the store answers: a confirmed message must never be released, or a later
/// copy would be forwarded again. Commit writes the key whatever it holds (see the store docs);
/// what it found says whether a second copy may have gone out.
async fn commit_until_done(shared: &Shared<'_>, keys: &[String], bodies: &[Option<BodyDigest>]) {
    let ctx = shared.ctx;
    let mut backoff = Backoff::new(ctx.tuning.backoff_min, ctx.tuning.backoff_max);
    let mut retried = false;
    loop {
        if let Ok(outcomes) = shared
            .store
            .commit(keys, bodies, &shared.owner, ctx.route.window)
            .await
        {
            let (mut lapsed, mut contested) = (0u64, 0u64);
            for outcome in outcomes {
                match fate::commit_verdict(outcome, retried) {
                    CommitVerdict::Fine => {}
                    CommitVerdict::Lapsed => lapsed += 1,
                    CommitVerdict::PossibleDuplicate => contested += 1,
                }
            }
            shared.metrics.takeovers.increment(contested);
            if lapsed + contested > 0 {
                if let Some(suppressed) = shared.logs.commit.allow() {
                    tracing::warn!(lapsed, contested, suppressed, "commit found claims that had lapsed (the store was unreachable longer than store.lease) and wrote them anyway; contested ones were claimed by another owner meanwhile, which may forward a second copy (counted in dedupd_takeovers_total)");
                }
            }
            return;
        }
        retried = true;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Releases a few times; if the store stays away the lease frees the keys instead.
async fn release_best_effort(shared: &Shared<'_>, keys: &[String]) {
    let ctx = shared.ctx;
    let mut backoff = Backoff::new(ctx.tuning.backoff_min, ctx.tuning.backoff_max);
    for _ in 0..3 {
        if shared.store.release(keys, &shared.owner).await.is_ok() {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    tracing::warn!(
        keys = keys.len(),
        "giving up releasing; the claims free themselves after store.lease"
    );
}

/// Nacks, then acks, the batch's deliveries upstream.
async fn ack(
    shared: &Shared<'_>,
    ch_in: &Channel,
    items: &[Item],
    settlements: &[Settlement],
) -> Result<(), SessionError> {
    let metrics = shared.metrics;
    let tags = || items.iter().map(|item| item.incoming.delivery.delivery_tag);
    let lowest_held = shared.holds.lock().settled(tags());
    let mut nacks = Vec::new();
    let mut acks = Vec::new();
    for (tag, settlement) in tags().zip(settlements) {
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
        let options = BasicNackOptions {
            multiple: false,
            requeue,
        };
        ch_in.basic_nack(tag, options)
    });
    let plan = fate::ack_plan(&acks, lowest_held);
    let all = async {
        let mut results = join_all(nacks).await;
        match plan {
            AckPlan::Nothing => {}
            AckPlan::UpTo(last) => results.push(
                ch_in
                    .basic_ack(last, BasicAckOptions { multiple: true })
                    .await,
            ),
            AckPlan::Each(tags) => {
                let single = tags
                    .iter()
                    .map(|&tag| ch_in.basic_ack(tag, BasicAckOptions { multiple: false }));
                results.extend(join_all(single).await);
            }
        }
        results
    };
    let results = shared.ctx.upstream.rpc_all("acking upstream", all).await;
    shared.settled_count(items);
    results.map_err(SessionError::from)
}

/// Keeps the leases of this session's in-flight claims alive (every third of `store.lease`)
/// until `stop`: a confirm that takes long, or a commit retried while the store refuses writes,
/// must not let a live owner's claim lapse, or a later copy would be claimed and forwarded.
pub(super) async fn keep_leases(shared: &Shared<'_>, stop: &CancellationToken) {
    let lease = shared.ctx.lease;
    let mut tick = tokio::time::interval((lease / 3).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let keys = shared.holds.lock().local_keys();
        if keys.is_empty() {
            continue;
        }
        // Failures are counted and reported by the watched store; the next tick retries.
        let renewal = shared.store.renew(&keys, &shared.owner, lease);
        let renewed = tokio::select! {
            _ = stop.cancelled() => return,
            result = renewal => result.unwrap_or_default(),
        };
        let lost = renewed.iter().filter(|ok| !**ok).count();
        if lost > 0 {
            tracing::debug!(
                keys = lost,
                "leases no longer ours when renewing (committed meanwhile, or lapsed)"
            );
        }
    }
}
