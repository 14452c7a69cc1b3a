//! In-process store: the claim protocol over a concurrent map, for a single instance and tests.
//!
//! It makes the same decisions as the Redis scripts (see the parent module), with DashMap's
//! per-shard entry lock standing in for Redis' single-threaded script execution: each key's
//! read-decide-write happens under one entry guard. Expiry is lazy (an expired entry reads as
//! absent) plus a sweeper task that removes expired entries every few seconds, so keys that
//! are never touched again do not pile up. The sweeper holds only a `Weak` reference and ends
//! once the store is dropped.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;

use super::{
    is_older_epoch_of, route_index, route_lookup, ClaimOutcome, CommitOutcome, KeyState, Owner,
    StoreSize,
};

/// How often expired entries are swept. Lazy expiry keeps reads exact in between; this only
/// bounds how long dead entries hold memory.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Far enough to mean "never" without overflowing `Instant` arithmetic.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The in-process store. Cloning shares the map.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    map: DashMap<String, Entry>,
}

struct Entry {
    value: Value,
    expires_at: Instant,
}

enum Value {
    /// In flight, with the owner token.
    InFlight(String),
    /// Forwarded and committed.
    Done,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store. Inside a tokio runtime it also starts the sweeper; outside one, expiry
    /// is lazy only.
    pub fn new() -> Self {
        let inner = Arc::new(Inner {
            map: DashMap::new(),
        });
        spawn_sweeper(&inner, SWEEP_EVERY);
        Self { inner }
    }

    /// See `Store::claim`. Keys are handled in order, so a repeated key sees the earlier one.
    pub fn claim(&self, keys: &[String], owner: &Owner, lease: Duration) -> Vec<ClaimOutcome> {
        let now = Instant::now();
        let expires_at = deadline(now, lease);
        keys.iter()
            .map(|key| self.claim_one(key, owner, now, expires_at))
            .collect()
    }

    fn claim_one(
        &self,
        key: &str,
        owner: &Owner,
        now: Instant,
        expires_at: Instant,
    ) -> ClaimOutcome {
        let ours = || Entry {
            value: Value::InFlight(owner.token().to_owned()),
            expires_at,
        };
        match self.inner.map.entry(key.to_owned()) {
            MapEntry::Vacant(slot) => {
                slot.insert(ours());
                ClaimOutcome::Claimed
            }
            MapEntry::Occupied(mut slot) => {
                let entry = slot.get_mut();
                if entry.expires_at <= now {
                    *entry = ours();
                    return ClaimOutcome::Claimed;
                }
                match &entry.value {
                    Value::Done => ClaimOutcome::Done,
                    Value::InFlight(token) if token == owner.token() => {
                        entry.expires_at = expires_at;
                        ClaimOutcome::Ours
                    }
                    Value::InFlight(token) if is_older_epoch_of(token, owner) => {
                        *entry = ours();
                        ClaimOutcome::TakenOver
                    }
                    Value::InFlight(_) => ClaimOutcome::InFlightElsewhere {
                        lease_left: entry.expires_at - now,
                    },
                }
            }
        }
    }

    /// See `Store::commit`.
    pub fn commit(&self, keys: &[String], owner: &Owner, window: Duration) -> Vec<CommitOutcome> {
        let now = Instant::now();
        let done = || Entry {
            value: Value::Done,
            expires_at: deadline(now, window),
        };
        keys.iter()
            .map(|key| match self.inner.map.entry(key.clone()) {
                MapEntry::Vacant(slot) => {
                    slot.insert(done());
                    CommitOutcome::Restored
                }
                MapEntry::Occupied(mut slot) => {
                    let entry = slot.get_mut();
                    let outcome = if entry.expires_at <= now {
                        CommitOutcome::Restored
                    } else {
                        match &entry.value {
                            Value::Done => return CommitOutcome::DoneElsewhere,
                            Value::InFlight(token) if token == owner.token() => {
                                CommitOutcome::Committed
                            }
                            Value::InFlight(_) => CommitOutcome::Overrode,
                        }
                    };
                    *entry = done();
                    outcome
                }
            })
            .collect()
    }

    /// See `Store::renew`.
    pub fn renew(&self, keys: &[String], owner: &Owner, lease: Duration) -> Vec<bool> {
        let now = Instant::now();
        keys.iter()
            .map(|key| match self.inner.map.get_mut(key.as_str()) {
                Some(mut entry) if entry.expires_at > now && entry.is_owned_by(owner) => {
                    entry.expires_at = deadline(now, lease);
                    true
                }
                _ => false,
            })
            .collect()
    }

    /// See `Store::release`.
    pub fn release(&self, keys: &[String], owner: &Owner) -> Vec<bool> {
        let now = Instant::now();
        keys.iter()
            .map(|key| {
                self.inner
                    .map
                    .remove_if(key.as_str(), |_, e| {
                        e.expires_at > now && e.is_owned_by(owner)
                    })
                    .is_some()
            })
            .collect()
    }

    /// See `Store::inspect`.
    pub fn inspect(&self, key: &str) -> KeyState {
        let now = Instant::now();
        match self.inner.map.get(key) {
            Some(e) if e.expires_at > now => match &e.value {
                Value::Done => KeyState::Done {
                    window_left: e.expires_at - now,
                },
                Value::InFlight(token) => KeyState::InFlight {
                    owner: token.clone(),
                    lease_left: e.expires_at - now,
                },
            },
            _ => KeyState::Absent,
        }
    }

    /// See `Store::forget`. An expired entry counts as absent, as in Redis.
    pub fn forget(&self, key: &str) -> bool {
        let now = Instant::now();
        self.inner
            .map
            .remove(key)
            .is_some_and(|(_, e)| e.expires_at > now)
    }
}

impl MemoryStore {
    /// See `Store::size`: exact counts of unexpired keys per route, and an estimate of the
    /// memory the map holds, in one pass over the map (each shard's read lock held in turn, so a
    /// claim on that shard waits for that shard's part of the pass, as for the sweeper's).
    pub fn size(&self, prefix: &str, routes: &[String]) -> StoreSize {
        let lookup = route_lookup(routes);
        let mut keys = vec![0u64; routes.len()];
        let mut heap = 0u64;
        let now = Instant::now();
        for item in self.inner.map.iter() {
            let (key, entry) = item.pair();
            heap += heap_block(key.capacity());
            if let Value::InFlight(token) = &entry.value {
                heap += heap_block(token.capacity());
            }
            if entry.expires_at <= now {
                continue;
            }
            if let Some(i) = route_index(key.as_bytes(), prefix, &lookup) {
                keys[i] += 1;
            }
        }
        // hashbrown keeps at most 7/8 of its slots full and one control byte per slot; the
        // reported capacity is that 7/8.
        let slots = self.inner.map.capacity() as u64 * 8 / 7;
        let slot_bytes = (std::mem::size_of::<(String, Entry)>() + 1) as u64;
        StoreSize {
            keys,
            exact: true,
            memory_bytes: slots * slot_bytes + heap,
        }
    }
}

/// The bytes glibc's malloc takes for an allocation of `len` bytes (none for an empty
/// `String`): an 8-byte header, rounded up to 16, at least 32.
fn heap_block(len: usize) -> u64 {
    if len == 0 {
        return 0;
    }
    let len = len as u64;
    ((len + 8).div_ceil(16) * 16).max(32)
}

impl Entry {
    fn is_owned_by(&self, owner: &Owner) -> bool {
        matches!(&self.value, Value::InFlight(token) if token == owner.token())
    }
}

fn deadline(now: Instant, ttl: Duration) -> Instant {
    // Same 1 ms floor as the PX argument in Redis, so both stores agree on a zero duration.
    // The upper clamp keeps the addition far inside what `Instant` can represent.
    now + ttl.clamp(Duration::from_millis(1), FOREVER)
}

/// Starts the sweeper if there is a runtime to run it on.
fn spawn_sweeper(inner: &Arc<Inner>, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    Some(runtime.spawn(sweep(Arc::downgrade(inner), every)))
}

async fn sweep(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; there is nothing to sweep yet.
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.remove_expired(Instant::now());
    }
}

impl Inner {
    fn remove_expired(&self, now: Instant) {
        self.map.retain(|_, e| e.expires_at > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_removes_only_expired_entries() {
        let store = MemoryStore::new();
        let a = Owner::new(Arc::from("inst-a"), 1);
        let short: Vec<String> = (0..100).map(|i| format!("short-{i}")).collect();
        let long = vec!["long".to_owned()];
        store.claim(&short, &a, Duration::from_millis(10));
        store.claim(&long, &a, Duration::from_secs(60));
        store.commit(&short[..50], &a, Duration::from_millis(10));
        assert_eq!(store.inner.map.len(), 101);

        store
            .inner
            .remove_expired(Instant::now() + Duration::from_secs(1));
        assert_eq!(store.inner.map.len(), 1);
        assert!(matches!(store.inspect("long"), KeyState::InFlight { .. }));
    }

    #[tokio::test]
    async fn sweeper_sweeps_then_stops_when_the_store_is_dropped() {
        let inner = Arc::new(Inner {
            map: DashMap::new(),
        });
        let sweeper = spawn_sweeper(&inner, Duration::from_millis(10)).expect("in a runtime");
        let store = MemoryStore {
            inner: inner.clone(),
        };
        drop(inner);
        let a = Owner::new(Arc::from("inst-a"), 1);
        let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
        store.claim(&keys, &a, Duration::from_millis(1));

        let deadline = Instant::now() + Duration::from_secs(5);
        while !store.inner.map.is_empty() {
            assert!(Instant::now() < deadline, "expired entries never swept");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        drop(store);
        tokio::time::timeout(Duration::from_secs(5), sweeper)
            .await
            .expect("sweeper still running after the store was dropped")
            .expect("sweeper panicked");
    }
}
