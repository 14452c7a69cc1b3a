//! In-process store: the claim protocol in compact tables, for a single instance and tests.
//!
//! It makes the same decisions as the Redis scripts (see the parent module), with a per-shard
//! mutex standing in for Redis' single-threaded script execution: a key's read-decide-write
//! happens under the one lock of its shard.
//!
//! # What a key costs, and why the layout is what it is
//!
//! A memory store that remembers a day of traffic holds millions of done keys, so what one
//! costs is what decides how far a single instance goes. A done key is kept as
//!
//! - a [`Digest`]: the first 16 bytes of the BLAKE3 hash of the full key string. 128 bits: among
//!   a billion remembered keys the chance that two share a digest (one key is then wrongly taken
//!   for a duplicate) is about 10⁻²¹, never a practical risk. A `[u8; 16]` (alignment 1), not a
//!   `u128`, so the slot is not padded to 32 bytes;
//! - its expiry as a `u32` count of [`TICK`]s (125 ms) since the store was created, rounded up:
//!   a key is remembered for at least its window and less than one tick longer, which for the
//!   shortest window the configuration allows (1 s) is at most window + window/8. Ticks run out
//!   after 2³² × 125 ms, about 17 years of uptime; past that every new key would read as
//!   expired at once.
//!
//! Since 0.5 a done key also keeps the 8-byte body digest of its first copy (`Done`, bytes so
//! the slot stays 4-byte aligned): a 28-byte slot, measured below at 74 to 77 bytes of RSS per
//! key between 20,000 and 120,000 keys (66.8 by `memory_bytes`, just past a doubling), where
//! the figures that follow are those of 0.4's 20-byte slot.
//!
//! That is a 20-byte slot plus hashbrown's one control byte, in `std` `HashMap`s (hashbrown
//! inside) that hash by copying 8 digest bytes (the digest is already uniformly random). A
//! table is at most 7/8 full and doubles when it fills, so a done key costs 24 to 48 bytes of
//! table. Measured with `measure_memory_store_bytes_per_remembered_key` (`tests/sizing.rs`,
//! release build, ten runs): **51 to 59 bytes per key** of RSS growth between 20,000 and
//! 120,000 keys (48.4 by `memory_bytes`: 120,000 keys is just past a doubling, the costliest
//! point), and 45 to 1,000,000 keys (44.3), where the `DashMap<String, _>` of full key strings
//! and `Instant`s this replaces took 213 (201 to 1,000,000). A `DashMap` with the same hasher
//! measured the same (it is hashbrown too: 49.6 against 50.2 bytes per key for the bare table,
//! 44.4 both to 1,000,000 keys) and no faster, but a key's step would then need the entry
//! locks of two maps in a fixed order; one mutex per shard covers both of the shard's maps.
//!
//! Claims in flight keep their owner token and an exact `Instant` deadline in a second map of
//! the same shard, keyed by the same digest: they are few (bounded by what is in flight) and
//! short-lived, so their 48-byte slots and token allocations do not matter. One mutex covers
//! both maps of a shard, so a claim's "done? else in flight? else ours" is one atomic step, as
//! in the Redis script. A digest is in at most one of the two maps with a live entry: a claim
//! is only written when the key is not done, and a commit removes the claim it replaces.
//!
//! Each route has its own table, because the digest loses the key's text: the route is read
//! from the key (`{prefix}:{route}:{id}`, route names never contain `:`) when the key is
//! written, which keeps [`MemoryStore::size`]'s per-route counts exact. Keys that do not have
//! that shape (tests, `inspect` of a hand-typed key) go to a table counted for no route. Each
//! table has [`SHARDS`] shards, picked by a digest byte the in-shard hash does not use.
//!
//! Expiry is lazy (an expired entry reads as absent, so reads are exact) plus a sweeper task
//! that removes expired entries every few seconds, so keys never touched again do not pile up.
//! The sweeper holds only a `Weak` reference and ends once the store is dropped.
//!
//! # `memory_bytes`
//!
//! The estimate [`MemoryStore::size`] reports is what the tables allocate: per map, buckets ×
//! (slot + 1 control byte) + 16 trailing control bytes, plus each claim's token allocation and
//! the shard array. The bucket count is tracked as the maps grow: `HashMap::capacity()` shrinks
//! as removals leave tombstones, while the allocation never does.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::mem::size_of;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use super::{
    body_at, done_or_conflict, in_flight_outcome, BodyDigest, ClaimOutcome, CommitOutcome,
    KeyState, Owner, StoreSize,
};

/// How often expired entries are swept. Lazy expiry keeps reads exact in between; this only
/// bounds how long dead entries hold memory.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The unit of a done key's expiry. An eighth of the shortest window (1 s), so rounding up to a
/// whole tick keeps a key at most window/8 longer than asked, and a `u32` of them lasts 17 years.
const TICK: Duration = Duration::from_millis(125);
const TICK_NANOS: u128 = TICK.as_nanos();

/// Shards per route table: a key's operations lock one shard, so this bounds how many callers
/// can work on one route at once. More shards would only add empty maps on a small machine.
const SHARDS: usize = 16;
const _: () = assert!(SHARDS.is_power_of_two() && SHARDS <= 256);

/// Far enough to mean "never" without overflowing `Instant` arithmetic.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// hashbrown's trailing control bytes (one SSE2 group) after the per-bucket ones.
const GROUP_WIDTH: u64 = 16;

/// The identity of a key in the tables: the first 16 bytes of its BLAKE3 hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Digest([u8; 16]);

const _: () = assert!(size_of::<(Digest, Done)>() == 28);

/// A done key: the tick it expires at, and its first copy's body digest (all zero: none).
/// Bytes, not a `u64`, so the slot is not padded to 8-byte alignment.
#[derive(Debug, Clone, Copy)]
struct Done {
    expiry: u32,
    body: [u8; 8],
}

impl Done {
    fn new(expiry: u32, body: Option<BodyDigest>) -> Self {
        Self {
            expiry,
            body: body.map_or([0; 8], BodyDigest::to_bytes),
        }
    }

    fn body(&self) -> Option<BodyDigest> {
        BodyDigest::from_u64(u64::from_be_bytes(self.body))
    }
}

impl Digest {
    fn of(key: &str) -> Self {
        Digest(super::layout::digest16(key))
    }

    /// The shard, from the last byte: the in-shard hash is bytes 0..8, and reusing those bits
    /// would leave every shard's keys sharing their low hash bits (and so their buckets).
    fn shard(&self) -> usize {
        usize::from(self.0[15]) & (SHARDS - 1)
    }
}

impl Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let [a, b, c, d, e, f, g, h, ..] = self.0;
        state.write_u64(u64::from_le_bytes([a, b, c, d, e, f, g, h]));
    }
}

/// Hashes a [`Digest`] by taking its 8 bytes as they are: they are uniformly random already,
/// and hashbrown takes the bucket from the low bits and the control byte from the top 7.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    // Only reached if something other than a `Digest` were hashed with it; FNV-1a keeps that
    // correct, merely slower.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type DigestMap<V> = HashMap<Digest, V, BuildHasherDefault<DigestHasher>>;

/// The in-process store. Cloning shares the tables.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Tick 0: done keys' expiries count ticks from here.
    base: Instant,
    /// The `store.key_prefix` the keys are written under, to read each key's route.
    prefix: Box<str>,
    /// One table per route, created at the route's first claim or commit.
    routes: RwLock<HashMap<Box<str>, Arc<Table>>>,
    /// Keys that are not `{prefix}:{route}:{id}`: counted for no route.
    other: Arc<Table>,
}

struct Table {
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Default)]
struct Shard {
    /// Done keys, the tick they expire at and their body digests.
    done: Slots<Done>,
    /// Claims in flight.
    claims: Slots<Claim>,
}

struct Claim {
    token: Box<str>,
    expires_at: Instant,
}

/// A map that remembers how many buckets it has allocated, for `memory_bytes`.
struct Slots<V> {
    map: DigestMap<V>,
    buckets: usize,
}

impl<V> Default for Slots<V> {
    fn default() -> Self {
        Self {
            map: DigestMap::default(),
            buckets: 0,
        }
    }
}

impl<V> Slots<V> {
    fn insert(&mut self, digest: Digest, value: V) {
        self.map.insert(digest, value);
        // Right after a grow (or an in-place rehash) `capacity()` is the full 7/8 of the
        // buckets; at other times tombstones can make it less, never more. Tables never shrink.
        self.buckets = self.buckets.max(buckets_for(self.map.capacity()));
    }

    /// The bytes the map's allocation takes.
    fn bytes(&self) -> u64 {
        if self.buckets == 0 {
            return 0;
        }
        self.buckets as u64 * (size_of::<(Digest, V)>() as u64 + 1) + GROUP_WIDTH
    }
}

/// The buckets behind a hashbrown table of `capacity`: 4 or 8 below 8, else capacity × 8/7 (the
/// table is never more than 7/8 full), a power of two.
fn buckets_for(capacity: usize) -> usize {
    match capacity {
        0 => 0,
        1..=7 => (capacity + 1).next_power_of_two(),
        _ => (capacity.saturating_mul(8) / 7).next_power_of_two(),
    }
}

impl Table {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn lock(&self, digest: &Digest) -> MutexGuard<'_, Shard> {
        lock(&self.shards[digest.shard()])
    }
}

/// A shard's maps are consistent after every statement, so a panic elsewhere while one was
/// held leaves nothing to repair.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A point in time as the tables see it.
#[derive(Clone, Copy)]
struct Now {
    at: Instant,
    /// Nanoseconds since `Inner::base`.
    nanos: u128,
}

impl Now {
    /// The tick `at` falls in: a done key expiring at tick `e` is live while `tick() < e`,
    /// that is until `e × TICK`.
    fn tick(&self) -> u64 {
        u64::try_from(self.nanos / TICK_NANOS).unwrap_or(u64::MAX)
    }

    /// The tick a key done now for `window` expires at: the first tick boundary at or after
    /// now + window, so it is remembered at least `window` and less than `window + TICK`.
    fn expiry(&self, window: Duration) -> u32 {
        let window = window.clamp(Duration::from_millis(1), FOREVER).as_nanos();
        u32::try_from((self.nanos + window).div_ceil(TICK_NANOS)).unwrap_or(u32::MAX)
    }

    fn is_live(&self, expiry: u32) -> bool {
        u64::from(expiry) > self.tick()
    }

    /// What is left of a done key's window, counted from the next tick boundary: never more
    /// than the window asked for (for whole-tick windows), short of the truth by under a tick.
    fn window_left(&self, expiry: u32) -> Duration {
        let next = u64::try_from(self.nanos.div_ceil(TICK_NANOS)).unwrap_or(u64::MAX);
        let ticks = u64::from(expiry).saturating_sub(next);
        Duration::from_nanos(ticks.saturating_mul(TICK.as_nanos() as u64))
    }
}

impl MemoryStore {
    /// An empty store for keys written under `key_prefix` (`store.key_prefix`). Inside a tokio
    /// runtime it also starts the sweeper; outside one, expiry is lazy only.
    pub fn new(key_prefix: &str) -> Self {
        let inner = Arc::new(Inner {
            base: Instant::now(),
            prefix: key_prefix.into(),
            routes: RwLock::default(),
            other: Arc::new(Table::new()),
        });
        spawn_sweeper(&inner, SWEEP_EVERY);
        Self { inner }
    }

    /// See `Store::claim`. Keys are handled in order, so a repeated key sees the earlier one.
    pub fn claim(
        &self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        owner: &Owner,
        lease: Duration,
        slide: Option<Duration>,
    ) -> Vec<ClaimOutcome> {
        let now = self.inner.now(Instant::now());
        let step = ClaimStep {
            owner,
            now,
            expires_at: deadline(now.at, lease),
            slide_to: slide.map(|window| now.expiry(window)),
        };
        keys.iter()
            .enumerate()
            .map(|(i, key)| {
                let digest = Digest::of(key);
                let table = self.inner.table(key);
                let mut shard = table.lock(&digest);
                shard.claim(digest, body_at(bodies, i), &step)
            })
            .collect()
    }

    /// See `Store::commit`.
    pub fn commit(
        &self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        owner: &Owner,
        window: Duration,
    ) -> Vec<CommitOutcome> {
        let now = self.inner.now(Instant::now());
        let expiry = now.expiry(window);
        keys.iter()
            .enumerate()
            .map(|(i, key)| {
                let digest = Digest::of(key);
                let table = self.inner.table(key);
                let mut shard = table.lock(&digest);
                shard.commit(digest, owner, now, Done::new(expiry, body_at(bodies, i)))
            })
            .collect()
    }

    /// See `Store::renew`.
    pub fn renew(&self, keys: &[String], owner: &Owner, lease: Duration) -> Vec<bool> {
        let now = Instant::now();
        keys.iter()
            .map(|key| {
                self.inner
                    .with_claim(key, |claims, digest| match claims.map.get_mut(&digest) {
                        Some(claim) if claim.expires_at > now && claim.is_owned_by(owner) => {
                            claim.expires_at = deadline(now, lease);
                            true
                        }
                        _ => false,
                    })
            })
            .collect()
    }

    /// See `Store::release`.
    pub fn release(&self, keys: &[String], owner: &Owner) -> Vec<bool> {
        let now = Instant::now();
        keys.iter()
            .map(|key| {
                self.inner
                    .with_claim(key, |claims, digest| match claims.map.get(&digest) {
                        Some(claim) if claim.expires_at > now && claim.is_owned_by(owner) => {
                            claims.map.remove(&digest);
                            true
                        }
                        _ => false,
                    })
            })
            .collect()
    }

    /// See `Store::inspect`. A done key's `window_left` counts whole ticks from the next tick
    /// boundary, so it is up to a tick short of when the key is forgotten, and never more than
    /// the window it was committed with (for windows of whole ticks, as every configured one
    /// of whole seconds is).
    pub fn inspect(&self, key: &str) -> KeyState {
        let now = self.inner.now(Instant::now());
        let Some(table) = self.inner.existing_table(key) else {
            return KeyState::Absent;
        };
        let digest = Digest::of(key);
        let shard = table.lock(&digest);
        if let Some(&Done { expiry, .. }) = shard.done.map.get(&digest) {
            if now.is_live(expiry) {
                return KeyState::Done {
                    window_left: now.window_left(expiry),
                };
            }
        }
        match shard.claims.map.get(&digest) {
            Some(claim) if claim.expires_at > now.at => KeyState::InFlight {
                owner: claim.token.to_string(),
                lease_left: claim.expires_at - now.at,
            },
            _ => KeyState::Absent,
        }
    }

    /// See `Store::forget`. An expired entry counts as absent, as in Redis.
    pub fn forget(&self, key: &str) -> bool {
        let now = self.inner.now(Instant::now());
        let Some(table) = self.inner.existing_table(key) else {
            return false;
        };
        let digest = Digest::of(key);
        let mut shard = table.lock(&digest);
        let done = shard
            .done
            .map
            .remove(&digest)
            .is_some_and(|done| now.is_live(done.expiry));
        let claimed = shard
            .claims
            .map
            .remove(&digest)
            .is_some_and(|claim| claim.expires_at > now.at);
        done || claimed
    }

    /// See `Store::size`: exact counts of each route's unexpired keys, in flight and done, and
    /// the tables' allocations (see the module docs), in one pass with each shard's lock held in
    /// turn, like the sweeper's. Keys are counted by the route they were written under, so for
    /// a `prefix` other than the store's own every count is 0.
    pub fn size(&self, prefix: &str, routes: &[String]) -> StoreSize {
        let now = self.inner.now(Instant::now());
        let tables = self.inner.tables();
        let mut memory_bytes = 0;
        let mut live = HashMap::with_capacity(tables.len());
        for (route, table) in &tables {
            let (keys, bytes) = table.measure(now);
            memory_bytes += bytes;
            if let Some(route) = route {
                live.insert(&**route, keys);
            }
        }
        let own = prefix == &*self.inner.prefix;
        let keys = routes
            .iter()
            .map(|route| match live.get(route.as_str()) {
                Some(&n) if own => n,
                _ => 0,
            })
            .collect();
        StoreSize {
            keys,
            exact: true,
            memory_bytes,
        }
    }
}

impl Inner {
    fn now(&self, at: Instant) -> Now {
        Now {
            at,
            nanos: at.saturating_duration_since(self.base).as_nanos(),
        }
    }

    /// The route of `key` (as the Redis layout reads it); `None` for a key of no route.
    fn route_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        Some(super::layout::route_of(&self.prefix, key)).filter(|route| !route.is_empty())
    }

    /// The table `key` is written to; a route's table is created at its first key.
    fn table(&self, key: &str) -> Arc<Table> {
        if let Some(table) = self.existing_table(key) {
            return table;
        }
        let Some(route) = self.route_of(key) else {
            return self.other.clone();
        };
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        routes
            .entry(route.into())
            .or_insert_with(|| Arc::new(Table::new()))
            .clone()
    }

    /// The table `key` would be in; `None` for a route that has none yet, which holds nothing.
    fn existing_table(&self, key: &str) -> Option<Arc<Table>> {
        let Some(route) = self.route_of(key) else {
            return Some(self.other.clone());
        };
        let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        routes.get(route).cloned()
    }

    /// Runs `f` on the claims of `key`'s shard under its lock; `false` if there is no table.
    fn with_claim(&self, key: &str, f: impl FnOnce(&mut Slots<Claim>, Digest) -> bool) -> bool {
        let Some(table) = self.existing_table(key) else {
            return false;
        };
        let digest = Digest::of(key);
        let mut shard = table.lock(&digest);
        f(&mut shard.claims, digest)
    }

    /// Every table with its route (`None` for the table of other keys), taken out of the
    /// route map so that a long pass does not hold up a new route's first key.
    fn tables(&self) -> Vec<(Option<Box<str>>, Arc<Table>)> {
        let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        routes
            .iter()
            .map(|(route, table)| (Some(route.clone()), table.clone()))
            .chain([(None, self.other.clone())])
            .collect()
    }

    fn remove_expired(&self, at: Instant) {
        let now = self.now(at);
        for (_, table) in self.tables() {
            for shard in table.shards.iter() {
                let mut shard = lock(shard);
                shard.done.map.retain(|_, done| now.is_live(done.expiry));
                shard
                    .claims
                    .map
                    .retain(|_, claim| claim.expires_at > now.at);
            }
        }
    }
}

impl Table {
    /// Unexpired keys, and the bytes the table allocates.
    fn measure(&self, now: Now) -> (u64, u64) {
        let mut keys = 0;
        let mut bytes = size_of::<Self>() as u64 + (SHARDS * size_of::<Mutex<Shard>>()) as u64;
        for shard in self.shards.iter() {
            let shard = lock(shard);
            keys += shard
                .done
                .map
                .values()
                .filter(|done| now.is_live(done.expiry))
                .count() as u64;
            bytes += shard.done.bytes() + shard.claims.bytes();
            for claim in shard.claims.map.values() {
                bytes += heap_block(claim.token.len());
                if claim.expires_at > now.at {
                    keys += 1;
                }
            }
        }
        (keys, bytes)
    }
}

/// What every key of one claim call shares.
struct ClaimStep<'a> {
    owner: &'a Owner,
    now: Now,
    /// The lease's end for a new claim.
    expires_at: Instant,
    /// Sliding window: the expiry a duplicate's key is moved to.
    slide_to: Option<u32>,
}

impl Shard {
    /// Done first, then in flight: the decisions of the Redis claim script.
    fn claim(
        &mut self,
        digest: Digest,
        body: Option<BodyDigest>,
        step: &ClaimStep,
    ) -> ClaimOutcome {
        let ClaimStep {
            owner,
            now,
            expires_at,
            slide_to,
        } = *step;
        if let Some(done) = self.done.map.get_mut(&digest) {
            if now.is_live(done.expiry) {
                let outcome = done_or_conflict(done.body(), body);
                if let (ClaimOutcome::Done, Some(slide_to)) = (&outcome, slide_to) {
                    done.expiry = done.expiry.max(slide_to);
                }
                return outcome;
            }
            // Expired: absent, and the claim below takes its place.
            self.done.map.remove(&digest);
        }
        let ours = || Claim {
            token: owner.token().into(),
            expires_at,
        };
        let Some(claim) = self.claims.map.get_mut(&digest) else {
            self.claims.insert(digest, ours());
            return ClaimOutcome::Claimed;
        };
        if claim.expires_at <= now.at {
            *claim = ours();
            return ClaimOutcome::Claimed;
        }
        let outcome = in_flight_outcome(&claim.token, owner, claim.expires_at - now.at, true);
        match outcome {
            ClaimOutcome::Ours => claim.expires_at = expires_at,
            ClaimOutcome::TakenOver => *claim = ours(),
            _ => {}
        }
        outcome
    }

    /// Leaves the key done whatever it holds, except that a done key keeps its window.
    fn commit(&mut self, digest: Digest, owner: &Owner, now: Now, done: Done) -> CommitOutcome {
        if self
            .done
            .map
            .get(&digest)
            .is_some_and(|done| now.is_live(done.expiry))
        {
            return CommitOutcome::DoneElsewhere;
        }
        let outcome = match self.claims.map.remove(&digest) {
            Some(claim) if claim.expires_at > now.at => {
                if claim.is_owned_by(owner) {
                    CommitOutcome::Committed
                } else {
                    CommitOutcome::Overrode
                }
            }
            _ => CommitOutcome::Restored,
        };
        self.done.insert(digest, done);
        outcome
    }
}

impl Claim {
    fn is_owned_by(&self, owner: &Owner) -> bool {
        *self.token == *owner.token()
    }
}

/// The bytes glibc's malloc takes for an allocation of `len` bytes (none for an empty one):
/// an 8-byte header, rounded up to 16, at least 32.
fn heap_block(len: usize) -> u64 {
    if len == 0 {
        return 0;
    }
    let len = len as u64;
    ((len + 8).div_ceil(16) * 16).max(32)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(instance: &str, epoch: u64) -> Owner {
        Owner::new(Arc::from(instance), epoch)
    }

    fn strings(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| (*k).to_owned()).collect()
    }

    impl Inner {
        /// Entries held, expired or not, in every table.
        fn entries(&self) -> usize {
            self.tables()
                .iter()
                .flat_map(|(_, table)| table.shards.iter())
                .map(|shard| {
                    let shard = lock(shard);
                    shard.done.map.len() + shard.claims.map.len()
                })
                .sum()
        }

        fn route_tables(&self) -> Vec<String> {
            let mut routes: Vec<String> = self
                .tables()
                .into_iter()
                .filter_map(|(route, _)| route.map(String::from))
                .collect();
            routes.sort();
            routes
        }
    }

    #[test]
    fn a_done_key_is_a_28_byte_slot() {
        assert_eq!(size_of::<(Digest, Done)>(), 28);
        assert_eq!(std::mem::align_of::<(Digest, Done)>(), 4);
        let done = Done::new(7, BodyDigest::from_u64(u64::MAX - 1));
        assert_eq!(done.body(), BodyDigest::from_u64(u64::MAX - 1));
        assert_eq!(Done::new(7, None).body(), None);
        assert_eq!(Digest::of("dd:r:1"), Digest::of("dd:r:1"));
        assert!(Digest::of("dd:r:1") != Digest::of("dd:r:2"));
    }

    #[test]
    fn tick_rounding_remembers_at_least_the_window_and_at_most_an_eighth_more() {
        let store = MemoryStore::new("dd");
        let base = store.inner.base;
        let windows = [
            Duration::from_secs(1),
            Duration::from_millis(1001),
            Duration::from_millis(1999),
            Duration::from_secs(60),
            Duration::from_secs(3600) + Duration::from_millis(7),
            Duration::from_secs(365 * 24 * 3600),
        ];
        let offsets = [0, 1, 62, 124, 125, 126, 999, 86_400_123].map(Duration::from_millis);
        let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
        let digest = Digest::of("dd:r:k");
        for offset in offsets {
            for window in windows {
                let committed = store.inner.now(base + offset);
                let expiry = committed.expiry(window);
                let remembered = Duration::from_nanos(u64::from(expiry) * 125_000_000) - offset;
                assert!(
                    remembered >= window && remembered <= window + window / 8,
                    "window {window:?} at {offset:?}: remembered {remembered:?}"
                );

                // The same through the claim protocol, at the two edges.
                let mut shard = Shard::default();
                let lease = base + offset + Duration::from_secs(30);
                assert_eq!(
                    shard.commit(digest, &a, committed, Done::new(expiry, None)),
                    CommitOutcome::Restored
                );
                let just_before = store
                    .inner
                    .now(base + offset + window - Duration::from_nanos(1));
                let step = |now| ClaimStep {
                    owner: &b,
                    now,
                    expires_at: lease,
                    slide_to: None,
                };
                assert_eq!(
                    shard.claim(digest, None, &step(just_before)),
                    ClaimOutcome::Done
                );
                let left = just_before.window_left(expiry);
                assert!(left <= TICK, "{left:?} left just before the window ends");
                let past = store.inner.now(base + offset + window + window / 8);
                assert_eq!(
                    shard.claim(digest, None, &step(past)),
                    ClaimOutcome::Claimed
                );
            }
        }
    }

    #[test]
    fn window_left_never_exceeds_a_whole_tick_window() {
        let store = MemoryStore::new("dd");
        let window = Duration::from_secs(60);
        for offset_ms in [0, 1, 60, 124, 125, 126, 250, 1_000_001] {
            let now = store
                .inner
                .now(store.inner.base + Duration::from_millis(offset_ms));
            let left = now.window_left(now.expiry(window));
            assert!(
                left <= window && left > window - TICK,
                "{left:?} at {offset_ms} ms"
            );
        }
    }

    #[test]
    fn ticks_saturate_instead_of_wrapping() {
        let store = MemoryStore::new("dd");
        let late = Now {
            at: store.inner.base,
            nanos: u128::from(u32::MAX) * TICK_NANOS + 1,
        };
        assert_eq!(late.expiry(Duration::from_secs(1)), u32::MAX);
        assert!(!late.is_live(u32::MAX));
        assert_eq!(late.window_left(u32::MAX), Duration::ZERO);
    }

    #[test]
    fn each_route_has_its_own_table_and_other_keys_count_for_none() {
        // A prefix may contain ':'; route names never do.
        let store = MemoryStore::new("dd:x");
        let a = owner("inst-a", 1);
        let keys = strings(&[
            "dd:x:orders:1",
            "dd:x:orders:2:with:colons",
            "dd:x:payments:1",
            "dd:x:orders",   // no id: not a store key
            "dd:y:orders:1", // another prefix
            "dd:xorders:1",  // the prefix without its ':'
            "dd:x:orders:1", // repeated
        ]);
        use ClaimOutcome::{Claimed, Ours};
        assert_eq!(
            store.claim(&keys, &[], &a, Duration::from_secs(30), None),
            [Claimed, Claimed, Claimed, Claimed, Claimed, Claimed, Ours]
        );
        store.commit(&keys[..1], &[], &a, Duration::from_secs(60));
        assert_eq!(store.inner.route_tables(), ["orders", "payments"]);
        let routes = strings(&["orders", "payments", "idle", "orders"]);
        assert_eq!(store.size("dd:x", &routes).keys, [2, 1, 0, 2]);
        assert_eq!(store.size("dd", &routes).keys, [0, 0, 0, 0]);
        let other = store.inner.other.measure(store.inner.now(Instant::now())).0;
        assert_eq!(other, 3);

        // Reading a key of a route never written creates nothing.
        assert_eq!(store.inspect("dd:x:idle:1"), KeyState::Absent);
        assert!(!store.forget("dd:x:idle:1"));
        assert_eq!(store.release(&strings(&["dd:x:idle:1"]), &a), [false]);
        assert_eq!(store.inner.route_tables(), ["orders", "payments"]);

        // Every key is found again by its own digest.
        assert!(matches!(
            store.inspect("dd:x:orders:1"),
            KeyState::Done { .. }
        ));
        for key in &keys[1..6] {
            assert!(
                matches!(store.inspect(key), KeyState::InFlight { .. }),
                "{key}"
            );
        }
    }

    #[test]
    fn size_counts_in_flight_and_done_until_they_expire() {
        let store = MemoryStore::new("dd");
        let a = owner("inst-a", 1);
        let keys: Vec<String> = (0..300).map(|i| format!("dd:r:{i}")).collect();
        store.claim(&keys, &[], &a, Duration::from_secs(30), None);
        store.commit(&keys[..100], &[], &a, Duration::from_secs(60));
        store.commit(&keys[100..200], &[], &a, Duration::from_millis(1));
        let routes = strings(&["r"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.size("dd", &routes).keys != [200] {
            assert!(Instant::now() < deadline, "1 ms windows never expired");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn memory_bytes_follow_the_allocation_not_capacity() {
        for n in [0usize, 1, 3, 4, 7, 8, 100, 1000, 5000] {
            let mut map = DigestMap::<u32>::default();
            for i in 0..n {
                map.insert(Digest::of(&i.to_string()), 0);
            }
            let buckets = buckets_for(map.capacity());
            let full = if buckets < 8 {
                buckets.saturating_sub(1)
            } else {
                buckets / 8 * 7
            };
            assert_eq!(map.capacity(), full, "{n} keys: {buckets} buckets");
        }

        let mut slots = Slots::<u32>::default();
        for i in 0..896u32 {
            slots.insert(Digest::of(&i.to_string()), i);
        }
        assert_eq!(slots.buckets, 1024);
        let full = slots.bytes();
        assert_eq!(full, 1024 * 21 + 16);
        // Removals free nothing (and may leave tombstones that lower `capacity()`).
        slots.map.retain(|_, v| *v % 4 == 0);
        slots.insert(Digest::of("one more"), 0);
        assert_eq!(slots.bytes(), full);

        // A store's estimate: the 28-byte slots, at most 7/8 full, plus the claims.
        let store = MemoryStore::new("dd");
        let a = owner("inst-a", 1);
        let keys: Vec<String> = (0..50_000).map(|i| format!("dd:r:{i}")).collect();
        for batch in keys.chunks(500) {
            store.claim(batch, &[], &a, Duration::from_secs(30), None);
            store.commit(batch, &[], &a, Duration::from_secs(60));
        }
        let bytes = store.size("dd", &strings(&["r"])).memory_bytes;
        let per_key = bytes as f64 / 50_000.0;
        assert!((24.0..60.0).contains(&per_key), "{per_key} bytes per key");
    }

    #[test]
    fn shards_spread_keys_and_leave_the_hash_bits_free() {
        let digests: Vec<Digest> = (0..16_000).map(|i| Digest::of(&format!("k{i}"))).collect();
        let mut per_shard = [0usize; SHARDS];
        for d in &digests {
            per_shard[d.shard()] += 1;
        }
        assert!(
            per_shard.iter().all(|&n| (800..1200).contains(&n)),
            "{per_shard:?}"
        );
        // Within one shard the low hash bits (hashbrown's bucket) still take every value.
        let mut low = std::collections::HashSet::new();
        for d in digests.iter().filter(|d| d.shard() == 0) {
            let mut h = DigestHasher::default();
            d.hash(&mut h);
            low.insert(h.finish() & 0xff);
        }
        assert!(low.len() > 200, "{} of 256 low-byte values", low.len());
    }

    #[test]
    fn racing_claims_on_one_key_are_claimed_once() {
        let store = MemoryStore::new("dd");
        let keys: Vec<String> = (0..2000).map(|i| format!("dd:r:{i}")).collect();
        let claimed: Vec<Vec<ClaimOutcome>> = std::thread::scope(|s| {
            let racers: Vec<_> = (0..4)
                .map(|i| {
                    let (store, keys) = (&store, &keys);
                    s.spawn(move || {
                        store.claim(
                            keys,
                            &[],
                            &owner(&format!("inst-{i}"), 1),
                            Duration::from_secs(30),
                            None,
                        )
                    })
                })
                .collect();
            racers
                .into_iter()
                .map(|r| r.join().expect("racer panicked"))
                .collect()
        });
        for k in 0..keys.len() {
            let winners = claimed
                .iter()
                .filter(|outcomes| outcomes[k] == ClaimOutcome::Claimed)
                .count();
            assert_eq!(winners, 1, "key {k}");
        }
    }

    #[test]
    fn sweep_removes_only_expired_entries() {
        let store = MemoryStore::new("dd");
        let a = owner("inst-a", 1);
        let short: Vec<String> = (0..100).map(|i| format!("dd:r:short-{i}")).collect();
        let long = strings(&["dd:r:long", "dd:r:long-done", "other-long"]);
        store.claim(&short, &[], &a, Duration::from_millis(10), None);
        store.claim(&long, &[], &a, Duration::from_secs(60), None);
        store.commit(&short[..50], &[], &a, Duration::from_millis(10));
        store.commit(&long[1..2], &[], &a, Duration::from_secs(60));
        assert_eq!(store.inner.entries(), 103);

        store
            .inner
            .remove_expired(Instant::now() + Duration::from_secs(1));
        assert_eq!(store.inner.entries(), 3);
        assert!(matches!(
            store.inspect("dd:r:long"),
            KeyState::InFlight { .. }
        ));
        assert!(matches!(
            store.inspect("dd:r:long-done"),
            KeyState::Done { .. }
        ));
        assert!(matches!(
            store.inspect("other-long"),
            KeyState::InFlight { .. }
        ));
    }

    #[tokio::test]
    async fn sweeper_sweeps_then_stops_when_the_store_is_dropped() {
        let inner = Arc::new(Inner {
            base: Instant::now(),
            prefix: "dd".into(),
            routes: RwLock::default(),
            other: Arc::new(Table::new()),
        });
        let sweeper = spawn_sweeper(&inner, Duration::from_millis(10)).expect("in a runtime");
        let store = MemoryStore {
            inner: inner.clone(),
        };
        drop(inner);
        let a = owner("inst-a", 1);
        let keys: Vec<String> = (0..10).map(|i| format!("dd:r:k{i}")).collect();
        store.claim(&keys, &[], &a, Duration::from_millis(1), None);
        store.commit(&keys[..5], &[], &a, Duration::from_millis(1));

        let deadline = Instant::now() + Duration::from_secs(5);
        while store.inner.entries() > 0 {
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
