//! The claims in flight of the embedded store: in memory only (the parent module says why),
//! with the decisions of the claim protocol as plain functions of what the disk holds, so they
//! are tested here without a disk.
//!
//! A key's digest is in the map while it is claimed, and while a commit writes it done: then
//! the entry carries that commit's id (a *marker*). The marker is what keeps a second copy
//! from being claimed between the moment the commit decided and the moment its write is
//! visible on disk; it is removed only after the write is visible (or turned back into the
//! owner's claim if the write failed, since the caller retries the commit).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::{in_flight_outcome, ClaimOutcome, CommitOutcome, Owner};

/// The identity of a key on disk and here: the first 16 bytes of the BLAKE3 hash of the
/// full store key (see the parent module for the collision odds).
pub type Digest = [u8; 16];

/// The digest of a store key.
pub use crate::store::layout::digest16 as digest;

/// Far enough to mean "never" without overflowing `Instant` arithmetic.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The deadline of a lease of `ttl` from `now`, with the same 1 ms floor as the other stores.
pub fn deadline(now: Instant, ttl: Duration) -> Instant {
    now + ttl.clamp(Duration::from_millis(1), FOREVER)
}

/// One key in flight.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The owner token.
    pub token: Box<str>,
    /// When the claim lapses (a marker does not lapse: its commit is running).
    pub expires_at: Instant,
    /// The route the key was written under, for the per-route counts.
    pub route: Arc<str>,
    /// The id of the commit writing this key done, if one is.
    pub committing: Option<u64>,
}

impl Claim {
    fn is_live(&self, now: Instant) -> bool {
        self.committing.is_some() || self.expires_at > now
    }

    /// What is left of the lease, never zero: a caller holding a duplicate waits at least a
    /// moment before it asks again.
    fn lease_left(&self, now: Instant) -> Duration {
        self.expires_at
            .saturating_duration_since(now)
            .max(Duration::from_millis(1))
    }
}

/// What a commit decided for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitStep {
    /// What the caller is told.
    pub outcome: CommitOutcome,
    /// Whether the key must be written done.
    pub write: bool,
}

/// Every claim in flight, by digest.
#[derive(Default)]
pub struct Claims {
    map: HashMap<Digest, Claim>,
    /// Each route's name once, shared by its claims.
    routes: HashMap<Box<str>, Arc<str>>,
    next_commit: u64,
}

impl Claims {
    fn route(&mut self, route: &str) -> Arc<str> {
        if let Some(shared) = self.routes.get(route) {
            return shared.clone();
        }
        let shared: Arc<str> = route.into();
        self.routes.insert(route.into(), shared.clone());
        shared
    }

    /// Claims `digest`, which the disk does not hold done, for `owner`: the in-flight half of
    /// the Redis claim script's decisions (the caller answers done keys from the disk, with
    /// their body digests, and never claims them).
    pub fn claim(
        &mut self,
        digest: Digest,
        route: &str,
        owner: &Owner,
        now: Instant,
        lease: Duration,
    ) -> ClaimOutcome {
        let expires_at = deadline(now, lease);
        match self.map.get_mut(&digest) {
            Some(claim) if claim.is_live(now) => {
                // Never a marker: that copy was confirmed, and taking it over would publish a
                // second one for certain.
                let may_take_over = claim.committing.is_none();
                let outcome =
                    in_flight_outcome(&claim.token, owner, claim.lease_left(now), may_take_over);
                match outcome {
                    ClaimOutcome::Ours => claim.expires_at = expires_at,
                    ClaimOutcome::TakenOver => {
                        claim.token = owner.token().into();
                        claim.expires_at = expires_at;
                    }
                    _ => {}
                }
                outcome
            }
            _ => {
                let route = self.route(route);
                self.map.insert(
                    digest,
                    Claim {
                        token: owner.token().into(),
                        expires_at,
                        route,
                        committing: None,
                    },
                );
                ClaimOutcome::Claimed
            }
        }
    }

    /// A new commit's id, for [`Claims::begin_commit`] and [`Claims::end_commit`].
    pub fn commit_id(&mut self) -> u64 {
        self.next_commit += 1;
        self.next_commit
    }

    /// Decides the commit of `digest` by `owner` and, if it is to be written, puts the marker
    /// of commit `id` in place. `done` says whether the disk holds it done (unexpired),
    /// `again` whether an earlier key of the same batch was this one.
    #[allow(clippy::too_many_arguments)]
    pub fn begin_commit(
        &mut self,
        id: u64,
        digest: Digest,
        route: &str,
        done: bool,
        again: bool,
        owner: &Owner,
        now: Instant,
        lease: Duration,
    ) -> CommitStep {
        if done || again {
            // A done key keeps its window; a repeated key was written by its first copy.
            return CommitStep {
                outcome: CommitOutcome::DoneElsewhere,
                write: false,
            };
        }
        let outcome = match self.map.get(&digest) {
            Some(claim) if claim.committing.is_some() => {
                // Another commit is writing it done right now: in Redis' order it ran first.
                // Writing it too keeps the key done even if that commit's write fails.
                return CommitStep {
                    outcome: CommitOutcome::DoneElsewhere,
                    write: true,
                };
            }
            Some(claim) if claim.is_live(now) => {
                if *claim.token == *owner.token() {
                    CommitOutcome::Committed
                } else {
                    CommitOutcome::Overrode
                }
            }
            _ => CommitOutcome::Restored,
        };
        let route = self.route(route);
        self.map.insert(
            digest,
            Claim {
                token: owner.token().into(),
                expires_at: deadline(now, lease),
                route,
                committing: Some(id),
            },
        );
        CommitStep {
            outcome,
            write: true,
        }
    }

    /// Ends commit `id` over `digests`: once its write is visible on disk (`written`), its
    /// markers go; if the write failed, they become the owner's claims again (the caller
    /// retries the commit, and renews them meanwhile).
    pub fn end_commit(
        &mut self,
        id: u64,
        digests: &[Digest],
        written: bool,
        now: Instant,
        lease: Duration,
    ) {
        for digest in digests {
            let Some(claim) = self.map.get_mut(digest) else {
                continue;
            };
            if claim.committing != Some(id) {
                continue;
            }
            if written {
                self.map.remove(digest);
            } else {
                claim.committing = None;
                claim.expires_at = deadline(now, lease);
            }
        }
    }

    /// Extends `owner`'s live claim (or marker) of `digest`; `false` if it has none.
    pub fn renew(&mut self, digest: &Digest, owner: &Owner, now: Instant, lease: Duration) -> bool {
        match self.map.get_mut(digest) {
            Some(claim) if claim.is_live(now) && *claim.token == *owner.token() => {
                claim.expires_at = deadline(now, lease);
                true
            }
            _ => false,
        }
    }

    /// Removes `owner`'s live claim of `digest`; `false` if it has none. A marker stays: a
    /// commit is never turned into a release.
    pub fn release(&mut self, digest: &Digest, owner: &Owner, now: Instant) -> bool {
        match self.map.get(digest) {
            Some(claim)
                if claim.committing.is_none()
                    && claim.expires_at > now
                    && *claim.token == *owner.token() =>
            {
                self.map.remove(digest);
                true
            }
            _ => false,
        }
    }

    /// The live claim of `digest`, if any: (owner token, lease left).
    pub fn get(&self, digest: &Digest, now: Instant) -> Option<(String, Duration)> {
        self.map
            .get(digest)
            .filter(|claim| claim.is_live(now))
            .map(|claim| (claim.token.to_string(), claim.lease_left(now)))
    }

    /// Removes whatever claim `digest` has; `true` if it was live.
    pub fn forget(&mut self, digest: &Digest, now: Instant) -> bool {
        self.map
            .remove(digest)
            .is_some_and(|claim| claim.is_live(now))
    }

    /// Live claims per route (markers not counted: their keys are about to be on disk).
    pub fn per_route(&self, now: Instant) -> HashMap<Arc<str>, u64> {
        let mut counts = HashMap::new();
        for claim in self.map.values() {
            if claim.committing.is_none() && claim.expires_at > now {
                *counts.entry(claim.route.clone()).or_default() += 1;
            }
        }
        counts
    }

    /// Drops lapsed claims (their owners died or gave up without a release).
    pub fn remove_expired(&mut self, now: Instant) -> usize {
        let before = self.map.len();
        self.map.retain(|_, claim| claim.is_live(now));
        before - self.map.len()
    }

    /// Claims held, lapsed or not.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    fn owner(instance: &str, epoch: u64) -> Owner {
        Owner::new(Arc::from(instance), epoch)
    }

    fn d(n: u8) -> Digest {
        [n; 16]
    }

    #[test]
    fn digest_is_the_first_16_bytes_of_blake3() {
        let full = blake3::hash(b"dd:r:1");
        assert_eq!(digest("dd:r:1")[..], full.as_bytes()[..16]);
        assert_ne!(digest("dd:r:1"), digest("dd:r:2"));
    }

    #[test]
    fn claim_follows_the_protocol() {
        let mut c = Claims::default();
        let (a, b) = (owner("inst-a", 9), owner("inst-b", 1));
        let now = Instant::now();
        assert_eq!(c.claim(d(1), "r", &a, now, LEASE), ClaimOutcome::Claimed);
        assert_eq!(c.claim(d(1), "r", &a, now, LEASE), ClaimOutcome::Ours);
        match c.claim(d(1), "r", &b, now + Duration::from_secs(10), LEASE) {
            ClaimOutcome::InFlightElsewhere { lease_left } => {
                assert_eq!(lease_left, Duration::from_secs(20))
            }
            other => panic!("{other:?}"),
        }
        // 9 -> 10: numbers, not text.
        let newer = owner("inst-a", 10);
        assert_eq!(
            c.claim(d(1), "r", &newer, now, LEASE),
            ClaimOutcome::TakenOver
        );
        assert!(matches!(
            c.claim(d(1), "r", &a, now, LEASE),
            ClaimOutcome::InFlightElsewhere { .. }
        ));
        // Lapsed: claimed afresh by anyone.
        let later = now + LEASE + Duration::from_millis(1);
        assert_eq!(c.claim(d(1), "r", &b, later, LEASE), ClaimOutcome::Claimed);
    }

    #[test]
    fn commit_outcomes_and_markers() {
        let mut c = Claims::default();
        let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
        let now = Instant::now();
        c.claim(d(1), "r", &a, now, LEASE);
        c.claim(d(2), "r", &b, now, LEASE);
        let id = c.commit_id();
        let step = |c: &mut Claims, n, done, again| {
            c.begin_commit(id, d(n), "r", done, again, &a, now, LEASE)
        };
        use CommitOutcome::*;
        assert_eq!(
            step(&mut c, 1, false, false),
            CommitStep {
                outcome: Committed,
                write: true
            }
        );
        assert_eq!(
            step(&mut c, 2, false, false),
            CommitStep {
                outcome: Overrode,
                write: true
            }
        );
        assert_eq!(
            step(&mut c, 3, false, false),
            CommitStep {
                outcome: Restored,
                write: true
            }
        );
        assert_eq!(
            step(&mut c, 4, true, false),
            CommitStep {
                outcome: DoneElsewhere,
                write: false
            }
        );
        assert_eq!(
            step(&mut c, 1, false, true),
            CommitStep {
                outcome: DoneElsewhere,
                write: false
            }
        );

        // While the write runs: no one else can claim, take over or release; the owner can
        // renew; another commit of the same key defers to this one but writes too.
        assert!(matches!(
            c.claim(d(1), "r", &b, now, LEASE),
            ClaimOutcome::InFlightElsewhere { .. }
        ));
        let newer = owner("inst-a", 2);
        assert!(matches!(
            c.claim(d(1), "r", &newer, now, LEASE),
            ClaimOutcome::InFlightElsewhere { .. }
        ));
        assert!(!c.release(&d(1), &a, now));
        assert!(!c.release(&d(2), &b, now), "b's claim was overridden");
        let late = now + 2 * LEASE;
        assert!(c.renew(&d(1), &a, late, LEASE), "a marker does not lapse");
        let other = c.commit_id();
        assert_eq!(
            c.begin_commit(other, d(1), "r", false, false, &b, now, LEASE),
            CommitStep {
                outcome: DoneElsewhere,
                write: true
            }
        );

        // Written: the markers of this commit go, the disk answers from now on.
        c.end_commit(id, &[d(1), d(2), d(3)], true, now, LEASE);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn a_failed_commit_gives_the_claims_back_to_their_committer() {
        let mut c = Claims::default();
        let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
        let now = Instant::now();
        c.claim(d(1), "r", &b, now, LEASE);
        let id = c.commit_id();
        c.begin_commit(id, d(1), "r", false, false, &a, now, LEASE);
        c.end_commit(id, &[d(1)], false, now, LEASE);
        assert_eq!(
            c.get(&d(1), now).map(|(t, _)| t),
            Some(a.token().to_owned())
        );
        assert!(c.release(&d(1), &a, now));
    }

    #[test]
    fn end_commit_leaves_what_another_commit_or_claim_put_there() {
        let mut c = Claims::default();
        let a = owner("inst-a", 1);
        let now = Instant::now();
        let first = c.commit_id();
        c.begin_commit(first, d(1), "r", false, false, &a, now, LEASE);
        c.forget(&d(1), now);
        c.claim(d(1), "r", &a, now, LEASE);
        c.end_commit(first, &[d(1)], true, now, LEASE);
        assert!(
            c.get(&d(1), now).is_some(),
            "a later claim is not the marker"
        );
    }

    #[test]
    fn renew_release_and_counts() {
        let mut c = Claims::default();
        let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
        let now = Instant::now();
        c.claim(d(1), "orders", &a, now, Duration::from_millis(300));
        c.claim(d(2), "orders", &b, now, LEASE);
        c.claim(d(3), "billing", &a, now, LEASE);
        assert!(!c.renew(&d(2), &a, now, LEASE));
        assert!(c.renew(&d(1), &a, now + Duration::from_millis(200), LEASE));
        assert!(c.get(&d(1), now + Duration::from_secs(5)).is_some());
        assert!(!c.release(&d(2), &a, now));
        let counts = c.per_route(now);
        assert_eq!(counts.get("orders"), Some(&2));
        assert_eq!(counts.get("billing"), Some(&1));
        assert!(c.release(&d(3), &a, now));
        assert!(!c.renew(&d(3), &a, now, LEASE));

        // Lapsed claims read as absent, count for nothing and are swept.
        let later = now + 2 * LEASE;
        assert_eq!(c.get(&d(2), later), None);
        assert!(c.per_route(later).is_empty());
        assert!(!c.forget(&d(2), later));
        c.claim(d(4), "orders", &a, now, Duration::from_millis(1));
        assert_eq!(c.remove_expired(later), 2);
        assert_eq!(c.len(), 0);
    }
}
