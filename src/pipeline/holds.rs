//! Held duplicates and the session's book of keys in flight.
//!
//! A duplicate whose key is in flight is *held*: not acked, not requeued (that would spin, and
//! burn a quorum queue's delivery limit), until the first copy's fate is known. Held here (the
//! first copy is in this session): it waits on that key and is woken when settle finishes the
//! claim. Held for another owner: it is looked at again after a backoff bounded by that owner's
//! lease. Either way it comes back to intake, which claims it again: done → dropped, absent →
//! forwarded.
//!
//! The book also keeps the tags of every held delivery (so settle never acks past one with
//! `multiple = true`) and the keys whose publish certainly did not arrive (so their redelivered
//! copies are not counted as possible duplicates).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Incoming;

/// Deliveries held because their key is in flight, and the session's book of claims.
#[derive(Default)]
pub(super) struct Holds {
    inner: Mutex<Book>,
    /// Wakes intake when a first copy here finished.
    pub wake: Notify,
}

/// What [`Holds`] guards.
#[derive(Default)]
pub(super) struct Book {
    /// Keys claimed in this session and not yet committed or released, each with the
    /// deliveries waiting for its outcome.
    local: HashMap<String, Local>,
    /// Numbers the claims of this session, so a finished claim never clears a newer one.
    claims: u64,
    /// Deliveries waiting on another owner's claim, with when to look again.
    remote: Vec<(Instant, Incoming)>,
    /// Deliveries whose key's first copy here finished: claim them again.
    ready: Vec<Incoming>,
    /// Tags of every held delivery, until settle acks or nacks it.
    tags: BTreeSet<u64>,
    /// Keys released after a publish that certainly did not arrive (nacked or returned).
    certainly_lost: HashSet<String>,
}

/// A key claimed in this session and not yet committed or released.
#[derive(Default)]
struct Local {
    claim: u64,
    waiting: Vec<Incoming>,
}

impl Holds {
    pub fn lock(&self) -> MutexGuard<'_, Book> {
        // A panic while holding this lock is a bug elsewhere; the book itself stays usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ready and due deliveries, removed from the holds (their tags stay until settled).
    pub fn take_due(&self, now: Instant) -> Vec<Incoming> {
        let mut book = self.lock();
        let mut out = std::mem::take(&mut book.ready);
        let mut i = 0;
        while i < book.remote.len() {
            if book.remote[i].0 <= now {
                out.push(book.remote.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        out
    }

    /// When the next delivery held for another owner is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.lock().remote.iter().map(|(due, _)| *due).min()
    }
}

impl Book {
    /// Whether `key`'s first copy is in flight in this session.
    pub fn is_local(&self, key: &str) -> bool {
        self.local.contains_key(key)
    }

    /// Every key in flight in this session (whose leases need renewing).
    pub fn local_keys(&self) -> Vec<String> {
        self.local.keys().cloned().collect()
    }

    /// Records a new local claim of `key` (keeping anyone already waiting on the key) and
    /// returns its number.
    pub fn claim(&mut self, key: String) -> u64 {
        self.claims += 1;
        self.local.entry(key).or_default().claim = self.claims;
        self.claims
    }

    /// The claim `claim` of `key` finished: whoever waits on it is ready. `true` if anyone is.
    pub fn finish(&mut self, key: &str, claim: u64) -> bool {
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

    /// Holds `incoming` on its key's first copy here. `true` when that copy finished while the
    /// claim was on the wire: it is ready at once, and intake must be woken.
    pub fn hold_here(&mut self, key: &str, incoming: Incoming) -> bool {
        self.tags.insert(incoming.delivery.delivery_tag);
        match self.local.get_mut(key) {
            Some(local) => {
                local.waiting.push(incoming);
                false
            }
            None => {
                self.ready.push(incoming);
                true
            }
        }
    }

    /// Holds `incoming` for another owner's claim, due again after [`recheck_delay`].
    pub fn hold_elsewhere(&mut self, mut incoming: Incoming, now: Instant, lease_left: Duration) {
        self.tags.insert(incoming.delivery.delivery_tag);
        let due = now + recheck_delay(incoming.rechecks, lease_left);
        incoming.rechecks += 1;
        self.remote.push((due, incoming));
    }

    /// The batch's tags are settled (acked or nacked): no longer held. Returns the lowest tag
    /// still held.
    pub fn settled(&mut self, tags: impl Iterator<Item = u64>) -> Option<u64> {
        if !self.tags.is_empty() {
            for tag in tags {
                self.tags.remove(&tag);
            }
        }
        self.tags.first().copied()
    }

    /// Remembers keys whose publish certainly did not arrive. Bounded: keys whose copies went
    /// to another consumer are never claimed here again (forgetting one only over-counts
    /// takeovers).
    pub fn certainly_lost(&mut self, keys: Vec<String>, bound: usize) {
        if self.certainly_lost.len() + keys.len() > bound {
            self.certainly_lost.clear();
        }
        self.certainly_lost.extend(keys);
    }

    /// Whether `key`'s last publish here certainly did not arrive (and forgets it: only the
    /// first redelivered copy is vouched for).
    pub fn take_certainly_lost(&mut self, key: &str) -> bool {
        self.certainly_lost.remove(key)
    }
}

/// When to look again at a delivery held for another owner: 50ms doubling to 1s, never past
/// that owner's lease (its claim is gone by then, or renewed and worth another look).
pub(super) fn recheck_delay(attempt: u32, lease_left: Duration) -> Duration {
    let backoff = Duration::from_millis(50) * 2u32.saturating_pow(attempt.min(5));
    backoff
        .min(Duration::from_secs(1))
        .min(lease_left + Duration::from_millis(5))
}

#[cfg(test)]
mod tests {
    use lapin::message::Delivery;

    use super::*;

    fn incoming(tag: u64) -> Incoming {
        Incoming {
            body: None,
            delivery: Delivery::mock(tag, "".into(), "q".into(), false, Vec::new()),
            received: Instant::now(),
            key: Some("k".into()),
            rechecks: 0,
        }
    }

    fn tags(list: &[Incoming]) -> Vec<u64> {
        let mut tags: Vec<u64> = list.iter().map(|i| i.delivery.delivery_tag).collect();
        tags.sort_unstable();
        tags
    }

    #[test]
    fn held_here_wakes_when_its_claim_finishes() {
        let holds = Holds::default();
        let mut book = holds.lock();
        let claim = book.claim("k".into());
        assert!(book.is_local("k"));
        assert!(!book.hold_here("k", incoming(2)));
        assert!(!book.hold_here("k", incoming(3)));
        assert!(book.finish("k", claim), "waiters woken");
        assert!(!book.is_local("k"));
        drop(book);
        assert_eq!(tags(&holds.take_due(Instant::now())), [2, 3]);
        assert!(holds.take_due(Instant::now()).is_empty());
    }

    #[test]
    fn an_older_claim_finishing_leaves_the_newer_ones_waiters() {
        let holds = Holds::default();
        let mut book = holds.lock();
        let old = book.claim("k".into());
        book.hold_here("k", incoming(2));
        let new = book.claim("k".into());
        assert!(!book.finish("k", old));
        assert!(book.is_local("k"));
        assert!(book.finish("k", new));
        drop(book);
        assert_eq!(tags(&holds.take_due(Instant::now())), [2]);
    }

    #[test]
    fn held_here_after_the_first_copy_finished_is_ready_at_once() {
        let holds = Holds::default();
        assert!(holds.lock().hold_here("k", incoming(5)), "wake intake");
        assert_eq!(tags(&holds.take_due(Instant::now())), [5]);
    }

    #[test]
    fn held_elsewhere_comes_back_when_due_with_growing_delays() {
        let holds = Holds::default();
        let now = Instant::now();
        holds
            .lock()
            .hold_elsewhere(incoming(1), now, Duration::from_secs(30));
        assert_eq!(holds.next_due(), Some(now + Duration::from_millis(50)));
        assert!(holds.take_due(now).is_empty());
        let back = holds.take_due(now + Duration::from_millis(50));
        assert_eq!(tags(&back), [1]);
        assert_eq!(back[0].rechecks, 1, "the next look waits longer");
        assert_eq!(holds.next_due(), None);
    }

    #[test]
    fn settled_tags_leave_the_held_set() {
        let holds = Holds::default();
        let mut book = holds.lock();
        book.claim("k".into());
        book.hold_here("k", incoming(4));
        book.hold_elsewhere(incoming(9), Instant::now(), Duration::from_secs(1));
        assert_eq!(book.settled([1, 2, 3].into_iter()), Some(4));
        assert_eq!(book.settled([4].into_iter()), Some(9));
        assert_eq!(book.settled([9].into_iter()), None);
    }

    #[test]
    fn certainly_lost_keys_are_vouched_for_once_and_bounded() {
        let holds = Holds::default();
        let mut book = holds.lock();
        book.certainly_lost(vec!["a".into(), "b".into()], 3);
        assert!(book.take_certainly_lost("a"));
        assert!(!book.take_certainly_lost("a"), "only the first redelivery");
        book.certainly_lost(vec!["c".into(), "d".into(), "e".into()], 3);
        assert!(!book.take_certainly_lost("b"), "cleared past the bound");
        assert!(book.take_certainly_lost("e"));
    }

    #[test]
    fn recheck_delay_every_row() {
        let long = Duration::from_secs(30);
        let ms = |n| Duration::from_millis(n);
        let rows = [
            (0, long, ms(50)),
            (1, long, ms(100)),
            (2, long, ms(200)),
            (3, long, ms(400)),
            (4, long, ms(800)),
            (5, long, ms(1000)),
            (40, long, ms(1000)),
            (3, ms(20), ms(25)),
            (0, Duration::ZERO, ms(5)),
        ];
        for (attempt, lease_left, expected) in rows {
            assert_eq!(recheck_delay(attempt, lease_left), expected, "{attempt}");
        }
    }
}
