//! The store as a route uses it: every operation's failure is counted
//! (`dedupd_store_errors_total{route}`), marks the store down for `/readyz` and
//! `dedupd_up{component="store"}`, and is reported once, here, rather than at each call site.
//! Success marks it up again.
//!
//! Reporting: one warning when the store stops answering (naming it, URL without password, and
//! saying what the route does meanwhile), a reminder at most every [`REMIND_EVERY`] while it
//! stays away (with how many failures there were), and one line when it answers again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;

use super::{BodyDigest, ClaimOutcome, CommitOutcome, Owner, Store, StoreError};
use crate::config::OnStoreError;
use crate::error_chain;
use crate::telemetry::HealthFlag;
use crate::throttle::Throttle;

/// How often a store that stays away is mentioned again.
pub const REMIND_EVERY: Duration = Duration::from_secs(10);

/// One route's view of the shared store.
pub struct WatchedStore {
    store: Store,
    label: String,
    on_error: OnStoreError,
    up: Arc<HealthFlag>,
    errors: Counter,
    down: AtomicBool,
    reminder: Throttle,
}

/// Which operation failed, for the log line: what the route does while the store is away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Ping,
    Claim,
    Commit,
    Release,
    Renew,
}

impl WatchedStore {
    /// `up` is the store's health flag, `errors` the route's error counter.
    pub fn new(store: Store, on_error: OnStoreError, up: Arc<HealthFlag>, errors: Counter) -> Self {
        Self {
            label: store.label(),
            store,
            on_error,
            up,
            errors,
            down: AtomicBool::new(false),
            reminder: Throttle::new(REMIND_EVERY),
        }
    }

    /// The store itself (for what needs no watching: the eviction check).
    pub fn inner(&self) -> &Store {
        &self.store
    }

    /// The store's name for log lines (URL without password).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// See [`Store::ping`].
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.watch(Op::Ping, self.store.ping().await)
    }

    /// See [`Store::claim`].
    pub async fn claim(
        &self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        owner: &Owner,
        lease: Duration,
        slide: Option<Duration>,
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        let claimed = self.store.claim(keys, bodies, owner, lease, slide).await;
        self.watch(Op::Claim, claimed)
    }

    /// See [`Store::commit`].
    pub async fn commit(
        &self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        owner: &Owner,
        window: Duration,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let committed = self.store.commit(keys, bodies, owner, window).await;
        self.watch(Op::Commit, committed)
    }

    /// See [`Store::release`].
    pub async fn release(&self, keys: &[String], owner: &Owner) -> Result<Vec<bool>, StoreError> {
        self.watch(Op::Release, self.store.release(keys, owner).await)
    }

    /// See [`Store::renew`].
    pub async fn renew(
        &self,
        keys: &[String],
        owner: &Owner,
        lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        self.watch(Op::Renew, self.store.renew(keys, owner, lease).await)
    }

    /// Marks the store down (e.g. it answers, but may evict keys) without counting an error.
    pub fn hold_down(&self) {
        self.up.set(false);
    }

    fn watch<T>(&self, op: Op, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match &result {
            Ok(_) => {
                self.up.set(true);
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!(store = %self.label, "store answering again");
                }
            }
            Err(error) => {
                self.errors.increment(1);
                self.up.set(false);
                self.report(op, error);
            }
        }
        result
    }

    fn report(&self, op: Op, error: &StoreError) {
        let error = error_chain(error);
        let meanwhile = meanwhile(op, self.on_error);
        if !self.down.swap(true, Ordering::Relaxed) {
            self.reminder.reset();
            self.reminder.allow();
            tracing::warn!(store = %self.label, ?op, %error, "store not answering: {meanwhile}");
        } else if let Some(suppressed) = self.reminder.allow() {
            tracing::warn!(store = %self.label, ?op, %error, failures = suppressed + 1, "store still not answering: {meanwhile}");
        }
    }
}

/// What a route does while the store is away, by the operation that failed.
fn meanwhile(op: Op, on_error: OnStoreError) -> &'static str {
    match (op, on_error) {
        (Op::Ping | Op::Claim, OnStoreError::Block) => {
            "forwarding and acking nothing until it answers (on_error = block)"
        }
        (Op::Ping | Op::Claim, OnStoreError::Forward) => {
            "forwarding without dedup (on_error = forward)"
        }
        (Op::Commit, _) => {
            "retrying the commit of confirmed messages (their claims are kept alive)"
        }
        (Op::Release, _) => "retrying a release (the lease frees the key otherwise)",
        (Op::Renew, _) => "cannot renew the leases of in-flight claims; retrying",
    }
}
