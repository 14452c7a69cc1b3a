//! The pipeline's decision rules, as pure functions over plain facts, so that every row of each
//! table is unit-tested without a broker or a store. The async stages gather the facts, call
//! these, and carry out what they say.
//!
//! | rule | facts | decides |
//! |---|---|---|
//! | [`on_key`] | key derived?, `on_missing_key`, headers too deep? | claim, forward unclaimed, or reject |
//! | [`on_claim`] | store's answer, mode, `on_conflict`, redelivered, first copy here? | forward (possible duplicate?), drop, forward or reject a conflict, hold here, hold for another owner |
//! | [`on_confirm`] | intake's fate, broker's confirm | ack / requeue / reject upstream, commit / release in the store |
//! | [`commit_verdict`] | what a commit found, retried? | fine, lapsed, possible duplicate |
//! | [`ack_plan`] | acked tags, lowest held tag | one `multiple` ack, or single acks |

use std::time::Duration;

use crate::config::{OnConflict, OnMissingKey};
use crate::store::{ClaimOutcome, CommitOutcome};
use crate::telemetry::reason;

/// What intake decided for a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fate {
    /// Publish it; a claimed key (with its local claim number) is committed on confirm and
    /// released on failure.
    Publish { claim: Option<u64> },
    /// A duplicate of a key already done: ack.
    Duplicate,
    /// A dropped copy (its reason: `"duplicate"` or `"conflict"`) published to the route's
    /// `duplicates_exchange`: ack once confirmed, requeue if not.
    Audit(&'static str),
    /// Nack without requeue, so the queue's dead-letter exchange receives it.
    Reject(&'static str),
}

impl Fate {
    /// Whether a copy is published: forwarded, or audited.
    pub(super) fn publishes(self) -> bool {
        matches!(self, Fate::Publish { .. } | Fate::Audit(_))
    }

    /// Whether a copy is published to the `duplicates_exchange`.
    pub(super) fn audits(self) -> bool {
        matches!(self, Fate::Audit(_))
    }
}

/// What to do with a delivery before any store round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyStep {
    /// Claim the key derived from the message.
    Claim,
    /// No key, `on_missing_key = "hash_body"`: claim the body's hash.
    ClaimBodyHash,
    /// No key, `on_missing_key = "forward"`: publish without dedup.
    ForwardUnclaimed,
    /// Nack without requeue, with this reason.
    Reject(&'static str),
}

/// A delivery whose headers nest too deeply is refused before anything recursive touches them;
/// otherwise a missing key follows the route's `on_missing_key`.
pub(super) fn on_key(derived: bool, on_missing: OnMissingKey, too_deep: bool) -> KeyStep {
    match (too_deep, derived, on_missing) {
        (true, _, _) => KeyStep::Reject(reason::UNPARSABLE),
        (false, true, _) => KeyStep::Claim,
        (false, false, OnMissingKey::Reject) => KeyStep::Reject(reason::MISSING_KEY),
        (false, false, OnMissingKey::Forward) => KeyStep::ForwardUnclaimed,
        (false, false, OnMissingKey::HashBody) => KeyStep::ClaimBodyHash,
    }
}

/// What intake knows when the store answers a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ClaimFacts {
    pub outcome: ClaimOutcome,
    /// `mode = "observe"`: forward everything, count duplicates.
    pub observe: bool,
    /// `on_conflict`: what a copy that finds its key remembered with another body becomes.
    pub on_conflict: OnConflict,
    /// Redelivered by the broker, and not one that this session requeued itself after a
    /// publish that certainly did not arrive (nacked, returned).
    pub redelivered_unvouched: bool,
    /// The key's first copy is in flight in this session (now, or when the claim went out).
    pub first_copy_here: bool,
}

/// What intake does with a claimed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClaimDecision {
    /// Publish under a new local claim; `takeover`: its first publish may have arrived already
    /// (count it as a possible duplicate).
    Forward { takeover: bool },
    /// Observe mode: publish unclaimed and count a duplicate.
    ForwardObserved,
    /// A duplicate of a done key (or a conflict, `on_conflict = "drop"`): count it and ack.
    Drop,
    /// A conflict with `on_conflict = "forward"`: another message, published without a claim
    /// (the key stays remembered for its first copy).
    ForwardConflict,
    /// A conflict with `on_conflict = "reject"`: nack without requeue.
    RejectConflict,
    /// The first copy is in flight here: hold until it settles.
    HoldHere,
    /// Another owner has it in flight: hold, and look again within `lease_left`.
    HoldElsewhere { lease_left: Duration },
}

/// `Ours` with no first copy here is a leftover (a claim that timed out but was applied, a
/// failed release): as good as a fresh claim. A conflict under `on_conflict = "drop"` is a
/// duplicate; observe mode forwards every conflict too.
pub(super) fn on_claim(facts: ClaimFacts) -> ClaimDecision {
    let outcome = match (facts.outcome, facts.on_conflict) {
        (ClaimOutcome::Ours, _) if !facts.first_copy_here => ClaimOutcome::Claimed,
        (ClaimOutcome::Conflict, OnConflict::Drop) => ClaimOutcome::Done,
        (other, _) => other,
    };
    match outcome {
        ClaimOutcome::Claimed => ClaimDecision::Forward {
            takeover: facts.redelivered_unvouched,
        },
        ClaimOutcome::TakenOver => ClaimDecision::Forward { takeover: true },
        ClaimOutcome::Done if facts.observe => ClaimDecision::ForwardObserved,
        ClaimOutcome::Done => ClaimDecision::Drop,
        ClaimOutcome::Conflict if facts.observe => ClaimDecision::ForwardConflict,
        ClaimOutcome::Conflict => match facts.on_conflict {
            OnConflict::Reject => ClaimDecision::RejectConflict,
            OnConflict::Forward | OnConflict::Drop => ClaimDecision::ForwardConflict,
        },
        ClaimOutcome::Ours | ClaimOutcome::InFlightElsewhere { .. } if facts.observe => {
            ClaimDecision::ForwardObserved
        }
        ClaimOutcome::Ours => ClaimDecision::HoldHere,
        ClaimOutcome::InFlightElsewhere { lease_left } => {
            ClaimDecision::HoldElsewhere { lease_left }
        }
    }
}

/// What the downstream broker said about one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Confirmed {
    /// Nothing was published (duplicates, rejects).
    NotPublished,
    /// Acked: the broker took it.
    Acked,
    /// Returned (mandatory, no queue bound): certainly not delivered.
    Returned,
    /// Nacked: the broker did not take it.
    Nacked,
    /// No confirm (timeout, closed channel, write failed): outcome unknown.
    Unknown,
}

/// How a delivery ends upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settlement {
    Ack,
    Requeue,
    Reject(&'static str),
}

/// What the store learns about a delivery's claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StoreStep {
    /// Nothing (no claim).
    Nothing,
    /// Its copy arrived: remember the key for the window.
    Commit,
    /// Its copy did not (or may not have) arrived: free the key for the next copy.
    Release,
}

/// [`on_confirm`]'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Settle {
    pub settlement: Settlement,
    pub store: StoreStep,
    /// The broker confirms the copy arrived (count it forwarded).
    pub forwarded: bool,
    /// The copy certainly did not arrive (returned or nacked): its redelivery is no takeover.
    pub certainly_lost: bool,
}

/// A confirmed publish is committed, never released; anything short of a confirm releases the
/// claim (a return rejects the message to the dead-letter exchange, the rest requeue it).
pub(super) fn on_confirm(fate: Fate, confirmed: Confirmed) -> Settle {
    let claimed = matches!(fate, Fate::Publish { claim: Some(_) });
    let store = |step| if claimed { step } else { StoreStep::Nothing };
    let settle = |settlement, step, forwarded, certainly_lost| Settle {
        settlement,
        store: store(step),
        forwarded,
        certainly_lost,
    };
    match (fate, confirmed) {
        (Fate::Duplicate, _) => settle(Settlement::Ack, StoreStep::Nothing, false, false),
        (Fate::Reject(why), _) => settle(Settlement::Reject(why), StoreStep::Nothing, false, false),
        // An audit copy is published like any copy, so it fails like one: requeued to be
        // audited again, or rejected when nothing is bound to the audit exchange.
        (Fate::Audit(_), Confirmed::Acked) => {
            settle(Settlement::Ack, StoreStep::Nothing, false, false)
        }
        (Fate::Audit(_), Confirmed::Returned) => settle(
            Settlement::Reject(reason::UNROUTABLE),
            StoreStep::Nothing,
            false,
            false,
        ),
        (Fate::Audit(_), Confirmed::Nacked | Confirmed::Unknown | Confirmed::NotPublished) => {
            settle(Settlement::Requeue, StoreStep::Nothing, false, false)
        }
        (Fate::Publish { .. }, Confirmed::Acked) => {
            settle(Settlement::Ack, StoreStep::Commit, true, false)
        }
        (Fate::Publish { .. }, Confirmed::Returned) => settle(
            Settlement::Reject(reason::UNROUTABLE),
            StoreStep::Release,
            false,
            true,
        ),
        (Fate::Publish { .. }, Confirmed::Nacked) => {
            settle(Settlement::Requeue, StoreStep::Release, false, true)
        }
        (Fate::Publish { .. }, Confirmed::Unknown | Confirmed::NotPublished) => {
            settle(Settlement::Requeue, StoreStep::Release, false, false)
        }
    }
}

/// What a commit outcome means for the duplicate promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CommitVerdict {
    /// Committed over our own claim, or a done key our own earlier attempt may have written.
    Fine,
    /// Our claim had lapsed and nobody took it: written now, no second copy went out.
    Lapsed,
    /// Another owner had the key in flight or done: a second copy may have been forwarded.
    PossibleDuplicate,
}

/// A commit retried after an error may find the key done by its own earlier attempt (applied,
/// answer lost): that is no evidence of another owner.
pub(super) fn commit_verdict(outcome: CommitOutcome, retried: bool) -> CommitVerdict {
    match outcome {
        CommitOutcome::Committed => CommitVerdict::Fine,
        CommitOutcome::DoneElsewhere if retried => CommitVerdict::Fine,
        CommitOutcome::Restored => CommitVerdict::Lapsed,
        CommitOutcome::DoneElsewhere | CommitOutcome::Overrode => CommitVerdict::PossibleDuplicate,
    }
}

/// How to ack a batch's deliveries upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AckPlan {
    /// Nothing to ack.
    Nothing,
    /// One `multiple = true` ack up to this tag.
    UpTo(u64),
    /// One ack per tag.
    Each(Vec<u64>),
}

/// `multiple` acks every unacked tag up to the highest: only safe when no held delivery lies
/// below it (earlier batches are settled already, later ones have larger tags).
pub(super) fn ack_plan(acks: &[u64], lowest_held: Option<u64>) -> AckPlan {
    match acks.iter().max() {
        None => AckPlan::Nothing,
        Some(&last) if lowest_held.is_none_or(|held| held > last) => AckPlan::UpTo(last),
        Some(_) => AckPlan::Each(acks.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_key_every_row() {
        use OnMissingKey::*;
        for policy in [Reject, Forward, HashBody] {
            assert_eq!(
                on_key(true, policy, true),
                KeyStep::Reject(reason::UNPARSABLE)
            );
            assert_eq!(
                on_key(false, policy, true),
                KeyStep::Reject(reason::UNPARSABLE)
            );
            assert_eq!(on_key(true, policy, false), KeyStep::Claim);
        }
        assert_eq!(
            on_key(false, Reject, false),
            KeyStep::Reject(reason::MISSING_KEY)
        );
        assert_eq!(on_key(false, Forward, false), KeyStep::ForwardUnclaimed);
        assert_eq!(on_key(false, HashBody, false), KeyStep::ClaimBodyHash);
    }

    fn facts(outcome: ClaimOutcome) -> ClaimFacts {
        ClaimFacts {
            outcome,
            observe: false,
            on_conflict: OnConflict::Drop,
            redelivered_unvouched: false,
            first_copy_here: false,
        }
    }

    #[test]
    fn on_claim_conflict_every_row() {
        use ClaimDecision::*;
        // (on_conflict, observe) -> decision; redelivery and local claims do not matter.
        let rows = [
            (OnConflict::Drop, false, Drop),
            (OnConflict::Drop, true, ForwardObserved),
            (OnConflict::Forward, false, ForwardConflict),
            (OnConflict::Forward, true, ForwardConflict),
            (OnConflict::Reject, false, RejectConflict),
            (OnConflict::Reject, true, ForwardConflict),
        ];
        for (on_conflict, observe, expected) in rows {
            for (redelivered, here) in [(false, false), (true, true)] {
                let f = ClaimFacts {
                    on_conflict,
                    observe,
                    redelivered_unvouched: redelivered,
                    first_copy_here: here,
                    ..facts(ClaimOutcome::Conflict)
                };
                assert_eq!(on_claim(f), expected, "{on_conflict:?} observe={observe}");
            }
        }
        // on_conflict changes nothing for a duplicate.
        for on_conflict in [OnConflict::Forward, OnConflict::Reject] {
            let f = ClaimFacts {
                on_conflict,
                ..facts(ClaimOutcome::Done)
            };
            assert_eq!(on_claim(f), Drop);
        }
    }

    const LEASE: Duration = Duration::from_secs(3);

    #[test]
    fn on_claim_enforce_every_row() {
        use ClaimDecision::*;
        let elsewhere = ClaimOutcome::InFlightElsewhere { lease_left: LEASE };
        // (outcome, redelivered_unvouched, first copy here) -> decision
        let rows = [
            (
                ClaimOutcome::Claimed,
                false,
                false,
                Forward { takeover: false },
            ),
            (
                ClaimOutcome::Claimed,
                true,
                false,
                Forward { takeover: true },
            ),
            (
                ClaimOutcome::TakenOver,
                false,
                false,
                Forward { takeover: true },
            ),
            (
                ClaimOutcome::TakenOver,
                true,
                false,
                Forward { takeover: true },
            ),
            (ClaimOutcome::Done, false, false, Drop),
            (ClaimOutcome::Done, true, true, Drop),
            (ClaimOutcome::Ours, false, true, HoldHere),
            (ClaimOutcome::Ours, true, true, HoldHere),
            // A leftover of our own with nobody here working on it: a fresh claim.
            (
                ClaimOutcome::Ours,
                false,
                false,
                Forward { takeover: false },
            ),
            (ClaimOutcome::Ours, true, false, Forward { takeover: true }),
            (
                elsewhere.clone(),
                false,
                false,
                HoldElsewhere { lease_left: LEASE },
            ),
            (
                elsewhere.clone(),
                true,
                true,
                HoldElsewhere { lease_left: LEASE },
            ),
        ];
        for (outcome, redelivered, here, expected) in rows {
            let f = ClaimFacts {
                redelivered_unvouched: redelivered,
                first_copy_here: here,
                ..facts(outcome.clone())
            };
            assert_eq!(on_claim(f), expected, "{outcome:?} {redelivered} {here}");
        }
    }

    #[test]
    fn on_claim_observe_forwards_every_duplicate() {
        use ClaimDecision::*;
        let observe = |outcome, here| {
            on_claim(ClaimFacts {
                observe: true,
                first_copy_here: here,
                ..facts(outcome)
            })
        };
        assert_eq!(observe(ClaimOutcome::Done, false), ForwardObserved);
        assert_eq!(observe(ClaimOutcome::Ours, true), ForwardObserved);
        assert_eq!(
            observe(ClaimOutcome::InFlightElsewhere { lease_left: LEASE }, false),
            ForwardObserved
        );
        // First copies are still claimed, so observe mode counts what enforce would drop.
        assert_eq!(
            observe(ClaimOutcome::Claimed, false),
            Forward { takeover: false }
        );
        assert_eq!(
            observe(ClaimOutcome::Ours, false),
            Forward { takeover: false }
        );
        assert_eq!(
            observe(ClaimOutcome::TakenOver, false),
            Forward { takeover: true }
        );
    }

    #[test]
    fn on_confirm_every_row() {
        use Confirmed::*;
        use Settlement::*;
        use StoreStep::*;
        let claimed = Fate::Publish { claim: Some(7) };
        let unclaimed = Fate::Publish { claim: None };
        let row = |settlement, store, forwarded, certainly_lost| Settle {
            settlement,
            store,
            forwarded,
            certainly_lost,
        };
        let rows = [
            (claimed, Acked, row(Ack, Commit, true, false)),
            (
                claimed,
                Returned,
                row(Reject(reason::UNROUTABLE), Release, false, true),
            ),
            (claimed, Nacked, row(Requeue, Release, false, true)),
            (claimed, Unknown, row(Requeue, Release, false, false)),
            (claimed, NotPublished, row(Requeue, Release, false, false)),
            (unclaimed, Acked, row(Ack, Nothing, true, false)),
            (
                unclaimed,
                Returned,
                row(Reject(reason::UNROUTABLE), Nothing, false, true),
            ),
            (unclaimed, Nacked, row(Requeue, Nothing, false, true)),
            (unclaimed, Unknown, row(Requeue, Nothing, false, false)),
        ];
        for (fate, confirmed, expected) in rows {
            assert_eq!(
                on_confirm(fate, confirmed),
                expected,
                "{fate:?} {confirmed:?}"
            );
        }
        for confirmed in [NotPublished, Acked, Returned, Nacked, Unknown] {
            assert_eq!(
                on_confirm(Fate::Duplicate, confirmed),
                row(Ack, Nothing, false, false)
            );
            assert_eq!(
                on_confirm(Fate::Reject(reason::MISSING_KEY), confirmed),
                row(Reject(reason::MISSING_KEY), Nothing, false, false)
            );
        }
        // An audit copy is acked only once the audit exchange confirmed it.
        let audit = Fate::Audit("duplicate");
        let rows = [
            (Acked, row(Ack, Nothing, false, false)),
            (
                Returned,
                row(Reject(reason::UNROUTABLE), Nothing, false, false),
            ),
            (Nacked, row(Requeue, Nothing, false, false)),
            (Unknown, row(Requeue, Nothing, false, false)),
            (NotPublished, row(Requeue, Nothing, false, false)),
        ];
        for (confirmed, expected) in rows {
            assert_eq!(on_confirm(audit, confirmed), expected, "{confirmed:?}");
        }
    }

    #[test]
    fn commit_verdict_every_row() {
        use CommitOutcome::*;
        use CommitVerdict::*;
        let rows = [
            (Committed, false, Fine),
            (Committed, true, Fine),
            (Restored, false, Lapsed),
            (Restored, true, Lapsed),
            (Overrode, false, PossibleDuplicate),
            (Overrode, true, PossibleDuplicate),
            (DoneElsewhere, false, PossibleDuplicate),
            (DoneElsewhere, true, Fine),
        ];
        for (outcome, retried, expected) in rows {
            assert_eq!(
                commit_verdict(outcome, retried),
                expected,
                "{outcome:?} {retried}"
            );
        }
    }

    #[test]
    fn ack_plan_every_row() {
        assert_eq!(ack_plan(&[], None), AckPlan::Nothing);
        assert_eq!(ack_plan(&[], Some(3)), AckPlan::Nothing);
        assert_eq!(ack_plan(&[4, 6, 5], None), AckPlan::UpTo(6));
        assert_eq!(ack_plan(&[4, 6, 5], Some(7)), AckPlan::UpTo(6));
        // A held delivery below the last ack: `multiple` would ack it too.
        assert_eq!(ack_plan(&[4, 6, 5], Some(2)), AckPlan::Each(vec![4, 6, 5]));
        assert_eq!(ack_plan(&[4, 6], Some(5)), AckPlan::Each(vec![4, 6]));
        assert_eq!(ack_plan(&[4, 6], Some(6)), AckPlan::Each(vec![4, 6]));
    }
}
