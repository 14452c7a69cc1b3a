//! The embedded store (`store.kind = "embedded"`): one dedupd, its keys in a file on local
//! disk under `store.path`, so a restart or a SIGKILL forgets nothing, without Redis.
//!
//! This module owns the store's directory and file, the claims in flight, and the claim
//! protocol's decisions for this store (the same as the memory store's and the Redis
//! scripts', see the parent module): `claims` decides in memory, `disk` keeps done keys in
//! [redb](https://www.redb.org) tables, `upkeep` sweeps expired keys.
//!
//! # Why redb
//!
//! Two well-kept embedded Rust stores were measured on dedupd's pattern, in a scratch crate
//! outside the repository (redb 2.6.4, fjall 2.11.2 with lz4, blake3 1, rand 0.9; Rust 1.95,
//! `cargo build --release`; this 2-core machine shared with other builds, ext4 on a virtual
//! disk). `scratch-emb ENGINE PATTERN DIR KEYS` commits KEYS distinct keys in batches of 200,
//! half of each batch copies of keys committed earlier; a claim reads each key (16-byte
//! BLAKE3 digest) and claims the absent ones, a commit writes each claimed key done (digest →
//! u32 expiry) and syncs once (redb: a `Durability::Immediate` commit; fjall: a batch, then
//! `persist(SyncAll)`). PATTERN `disk-claims` writes the claims in an unsynced write per
//! batch (redb `Durability::None`, fjall's journal without persist), `mem-claims` keeps them
//! in memory (what this store does, see below). `V3=1` creates redb files in format 3;
//! `CRASH=1` leaves the store as a killed process would, and `scratch-emb ENGINE reopen DIR`
//! then times the open. Per key claimed and per key committed; disk use as blocks allocated
//! after the store was closed (the file or journal is sparse), over the distinct keys:
//!
//! | crate | claims | keys | claim µs/key | commit µs/key (per batch, p50) | bytes/key | reopen after kill |
//! |---|---|---|---|---|---|---|
//! | redb 2.6.4, file format 3 | disk | 100k | 2.1 | 25 (2.2 ms) | 54 | |
//! | redb 2.6.4, file format 3 | memory | 100k | 1.2 | 39 (3.6 ms) | 54 | |
//! | redb 2.6.4, file format 3 | memory | 1M | 1.7 | 31 (3.1 ms) | 33 | 53 ms |
//! | redb 2.6.4, file format 2 | memory | 1M | 2.0 | 68 (7.3 ms) | 33 | 57 ms |
//! | fjall 2.11.2 (lz4) | disk | 100k | 4.4 | 31 (3.0 ms) | 142 | |
//! | fjall 2.11.2 (lz4) | memory | 100k | 1.9 | 25 (3.3 ms) | 34 | |
//! | fjall 2.11.2 (lz4) | memory | 1M | 4.2 | 31 (3.1 ms) | 29 | 1.1 s |
//!
//! A commit costs its fsync on both (about 3 ms a batch here, noisy: other builds shared
//! the disk). redb answers claims two to three times faster at a million keys (one B-tree
//! lookup against an LSM's memtable and segments), reopens after a kill in 53 ms against
//! fjall's 1.1 s (1.4 s for a second, clean open), takes the cross-process lock itself
//! (`flock`, see below; fjall 2 takes none), is one file with no background threads (fjall's
//! flush and compaction workers would compete for the same two cores as the routes) and
//! depends on nothing but libc. fjall keeps 4 bytes less per key at a million keys, which
//! does not weigh against the rest. Expiry does not decide it either: fjall could drop whole
//! time-bucketed partitions, but a claim would then look a key up in each live bucket (nine
//! for buckets of `window / 8`), and a claim on fjall is already the slower one. So:
//! **redb**, with two choices the figures made:
//!
//! - **File format 3** (`create_with_file_format_v3`, which redb 2.6 writes only when asked):
//!   a commit on a format 2 file cost twice as much at a million keys (7.3 against 3.1 ms a
//!   batch; its bookkeeping of freed pages differs). redb 3 and later read format 3 files as
//!   they are, so a later upgrade of the crate (redb 3 needs Rust 1.89, redb 4 1.90; dedupd
//!   builds with 1.88, hence redb 2.6) keeps the file.
//! - **Claims in memory**, not on disk (below): they cost no write at all.
//!
//! # What is on disk, and what a key costs
//!
//! Only done keys: a table per route (`done:{route}`, see `disk`), keyed by the first 16
//! bytes of the BLAKE3 hash of the full store key (128 bits: among a billion remembered keys
//! the chance that two share a digest is about 10⁻²¹), valued by the expiry as a u32 count of
//! 125 ms ticks since 2026-01-01 (`layout::TICK_MS`, `layout::EPOCH_MS`, as on Redis: a
//! window ends rounded up by less than a tick, at most `window / 8` for the shortest window,
//! 1 s; ticks last until 2043) and the 8-byte body digest of the key's first copy (0: none,
//! see `store::BodyDigest`). A table per route gives exact per-route counts for free
//! (redb keeps each table's length). An entry is 28 bytes in a B-tree leaf; leaves filled in
//! random digest order are split half full and never packed, and branch pages and pages
//! freed by copy-on-write come on top. Measured with
//! `measure_embedded_store_bytes_per_remembered_key` (`tests/embedded.rs`, keys committed
//! with body digests through the store in batches of 200): the directory grows by **47.0
//! bytes per remembered key** between 20,000 and 120,000 keys (7.1 MB at 120,000 keys); 0.4,
//! without digests, took 38.0. Files of 0.4 (layout 1) are upgraded at open, see `disk`.
//!
//! A sliding window (`window_mode = "sliding"`) moves a duplicate's expiry in a write
//! transaction of its own after the claim's read, without a sync (`Durability::None`): the
//! next commit's sync makes it durable, and a crash before that only loses the slide.
//!
//! `memory_bytes` (the `dedupd_store_memory_bytes` gauge) is the disk the store's directory
//! takes: blocks allocated to its files, not their length (redb grows the file in whole
//! regions, sparse until written).
//!
//! Expiry uses the wall clock, persisted across restarts; one instance reads and writes the
//! file, so no skew between instances can matter. A clock set back keeps keys longer, a clock
//! set forward forgets them early.
//!
//! # Durability: one sync per batch, and why claims are not on disk
//!
//! A commit writes its batch in one redb write transaction with `Durability::Immediate`: it
//! is on disk (fsync) before `commit` returns, so before the upstream ack, and a SIGKILL at
//! any point loses no committed key. One sync per batch, not per message.
//!
//! Claims are never written. Only one process can use the path (the lock below), so after a
//! crash every claim the dead process held belongs to a process that is gone: its messages
//! were never acked upstream and come back redelivered. Forwarding them again is exactly the
//! takeover duplicate the delivery contract already covers (a publish in flight when the
//! process died; bounded by what was in flight, at most the prefetch per route), and keeping
//! the claims on disk could only make the redelivered copies wait out the lease first: every
//! such claim would have to be dropped at open anyway. So claims live in memory, where they
//! also cost no write and no sync: a batch of claims is one read transaction, renew and
//! release touch no disk at all, and `commands_sent` (write transactions, each one disk sync
//! but for the sweeper's) is about one per batch of commits.
//!
//! One step needs care: a commit's write becomes visible only when its transaction commits,
//! and a claim of the same key in between must not find it absent. So a commit first puts a
//! *marker* on each key in memory (under the claims' lock, as it decides each outcome), then
//! writes and syncs, then removes its markers; a claim that meets a marker reads "in flight"
//! and holds its copy. Claims read the disk under the same lock, in a read transaction begun
//! after the lock is taken, so once a marker is gone the done key is visible to them. A
//! commit whose write fails turns its markers back into its claims: the caller retries it.
//! `forget` is durable too.
//!
//! # One process per path
//!
//! redb takes an exclusive `flock` on the file when it opens it, and gives it back when the
//! store is dropped (or the process dies: the kernel releases it). A second process on the
//! same path is refused at `open` with an error naming the path, and `dedupd run` exits 1
//! with it (`tests/embedded.rs` starts two). So are `dedupd inspect`, `forget` and `check
//! --connect` while the daemon runs: stop it first. Within one process, opening the same path
//! again (a configuration reload whose old routes are still finishing) shares the open store
//! instead of failing on its own lock, so nothing is opened twice; if the last handle of the
//! old one is being dropped right then, the open waits up to 2 s for redb to give the lock
//! back.
//!
//! # Disk errors
//!
//! A read or write that fails (a full disk, an I/O error) fails the operation with
//! `StoreError::Embedded` naming what was being done; the caller counts it, marks the store
//! down and retries, as with Redis away. After an I/O error redb refuses everything until its
//! file is opened again (`PreviousIo`), so the next operation closes and reopens the file by
//! itself, once the operations still on it have ended: a disk that was full works again as
//! soon as it has room, without a restart (`full_disk_fails_commits_then_recovers` in
//! `tests/embedded.rs`, run on a 4 MiB tmpfs). Claims in memory are kept across the reopen.
//!
//! # Blocking work
//!
//! Every disk access runs on tokio's blocking pool (`spawn_blocking`): the daemon's runtime is
//! one thread. Each operation is bounded by `store.timeout` and then fails with
//! `StoreError::Timeout`; the blocking task it leaves behind still completes (or fails) on its
//! own, and the caller treats the outcome as unknown, as with Redis. `open` is not bounded:
//! after a crash redb repairs the file first, which takes time in proportion to its size
//! (53 ms for a million keys, measured above), and the daemon cannot start without it.

mod claims;
mod disk;
mod upkeep;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use self::claims::{digest, Claims, Digest};
use self::disk::{Disk, OpenError};
use super::layout::{self, route_of};
use super::{
    body_at, done_or_conflict, BodyDigest, ClaimOutcome, CommitOutcome, KeyState, Owner,
    StoreError, StoreSize,
};
use crate::config::StoreConfig;

/// The embedded store. Cloning shares the open file.
#[derive(Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    /// `store.key_prefix`, to read each key's route.
    prefix: Arc<str>,
    /// `store.timeout`.
    timeout: Duration,
    /// `store.lease`: what a failed commit's claims get back.
    lease: Duration,
    /// `store.path` as configured, for `label`.
    path: PathBuf,
}

/// What every handle on one path shares.
pub(crate) struct Shared {
    /// The open file; `None` only while it is being opened again after an I/O error (or if
    /// that failed: the next operation tries again).
    disk: RwLock<Option<Disk>>,
    claims: Mutex<Claims>,
    /// The directory, canonical.
    dir: PathBuf,
    /// The file in it.
    file: PathBuf,
    /// Write transactions committed.
    writes: AtomicU64,
}

impl Shared {
    /// The claims are consistent after every statement, so a panic elsewhere while they were
    /// locked leaves nothing to repair.
    fn lock_claims(&self) -> MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the open file, after opening it again if an I/O error left it unusable
    /// (redb then refuses everything until it is reopened: a disk that was full, once it
    /// has room again, must not need a restart of dedupd). Lock order: the claims' lock, when
    /// taken, before this one.
    fn with_disk<T>(
        &self,
        f: impl FnOnce(&Disk) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        {
            let slot = self.disk.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(disk) = slot.as_ref().filter(|d| !d.is_broken()) {
                return f(disk);
            }
        }
        self.reopen()?;
        let slot = self.disk.read().unwrap_or_else(PoisonError::into_inner);
        match slot.as_ref() {
            Some(disk) => f(disk),
            None => Err(StoreError::Embedded(format!(
                "{} is closed after an I/O error",
                self.file.display()
            ))),
        }
    }

    /// Closes the file (once every operation on it has ended) and opens it again, unless
    /// another thread just did.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.disk.write().unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_some_and(|d| !d.is_broken()) {
            return Ok(());
        }
        // Closing gives the file's lock back, so that it can be taken again.
        *slot = None;
        let disk = Disk::open(&self.file).map_err(|e| open_error(&self.dir, &self.file, e))?;
        tracing::warn!(
            path = %self.dir.display(),
            "embedded store: opened the file again after an I/O error"
        );
        *slot = Some(disk);
        Ok(())
    }

    fn count_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::STORE_COMMANDS).increment(1);
    }
}

/// How long an open waits for this process's own lock on a file it just closed.
const CLOSING: Duration = Duration::from_secs(2);

/// The stores open in this process, by canonical directory.
static OPEN: Mutex<Vec<(PathBuf, Weak<Shared>)>> = Mutex::new(Vec::new());

/// Milliseconds since the Unix epoch, by the wall clock.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The tick `now_ms` falls in: a key expiring at tick `e` is remembered while this is below `e`.
fn tick_at(now_ms: u64) -> u64 {
    now_ms.saturating_sub(layout::EPOCH_MS) / layout::TICK_MS
}

fn now_tick() -> u64 {
    tick_at(now_ms())
}

/// The expiry of a key done at `now_ms` for `window`, as stored (saturating in 2043).
fn expiry_at(now_ms: u64, window: Duration) -> u32 {
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
    let tick = layout::expiry_tick(now_ms, window_ms.min(u64::MAX - now_ms));
    u32::try_from(tick).unwrap_or(u32::MAX)
}

fn is_live(expiry: u32, now_tick: u64) -> bool {
    u64::from(expiry) > now_tick
}

impl EmbeddedStore {
    /// Opens the store under `cfg.path`: creates the directory if missing, takes the file's
    /// lock (refused, naming the path, while another process holds it), and repairs the file
    /// first if its last user died. No claim survives from before (see the module docs).
    pub async fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        let path = cfg.path.clone().ok_or_else(|| {
            StoreError::Config("kind = \"embedded\" needs store.path, a directory".into())
        })?;
        let dir = path.clone();
        let shared = tokio::task::spawn_blocking(move || open_shared(&dir))
            .await
            .map_err(|e| StoreError::Embedded(format!("opening {}: {e}", path.display())))??;
        Ok(Self {
            shared,
            prefix: cfg.key_prefix.as_str().into(),
            timeout: cfg.timeout,
            lease: cfg.lease,
            path,
        })
    }

    /// Runs `f` on the blocking pool, bounded by `store.timeout`.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared, &str) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let shared = self.shared.clone();
        let prefix = self.prefix.clone();
        let task = tokio::task::spawn_blocking(move || f(&shared, &prefix));
        match tokio::time::timeout(self.timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(StoreError::Embedded(format!("store task failed: {e}"))),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// See `Store::claim`. One read transaction for the batch; with a sliding window, one
    /// unsynced write more for the duplicates whose window restarts.
    pub async fn claim(
        &self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        owner: &Owner,
        lease: Duration,
        slide: Option<Duration>,
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        let (keys, bodies, owner) = (keys.to_vec(), bodies.to_vec(), owner.clone());
        self.blocking(move |shared, prefix| {
            let (now, now_ms) = (Instant::now(), now_ms());
            let tick = tick_at(now_ms);
            let slide_to = slide.map(|window| expiry_at(now_ms, window));
            let mut slides: Vec<(&str, Digest)> = Vec::new();
            let mut claims = shared.lock_claims();
            let outcomes = shared.with_disk(|disk| {
                // Begun under the lock: it sees every commit whose markers are gone.
                let mut reader = disk.reader()?;
                keys.iter()
                    .enumerate()
                    .map(|(i, key)| {
                        let route = route_of(prefix, key);
                        let digest = digest(key);
                        let live = reader
                            .entry(route, &digest)?
                            .filter(|&(expiry, _)| is_live(expiry, tick));
                        let Some((expiry, stored)) = live else {
                            return Ok(claims.claim(digest, route, &owner, now, lease));
                        };
                        let outcome =
                            done_or_conflict(BodyDigest::from_u64(stored), body_at(&bodies, i));
                        if outcome == ClaimOutcome::Done && slide_to.is_some_and(|to| to > expiry) {
                            slides.push((route, digest));
                        }
                        Ok(outcome)
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            })?;
            drop(claims);
            if let (Some(to), false) = (slide_to, slides.is_empty()) {
                shared.with_disk(|disk| disk.slide(&slides, to))?;
                shared.count_write();
            }
            Ok(outcomes)
        })
        .await
    }

    /// See `Store::commit`. One write transaction, synced before this returns.
    pub async fn commit(
        &self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        owner: &Owner,
        window: Duration,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let (keys, bodies, owner, lease) =
            (keys.to_vec(), bodies.to_vec(), owner.clone(), self.lease);
        self.blocking(move |shared, prefix| {
            let (now, now_ms) = (Instant::now(), now_ms());
            let tick = tick_at(now_ms);
            let routes: Vec<&str> = keys.iter().map(|k| route_of(prefix, k)).collect();
            let digests: Vec<Digest> = keys.iter().map(|k| digest(k)).collect();
            let mut outcomes = Vec::with_capacity(keys.len());
            let mut writes: Vec<(&str, Digest, u64)> = Vec::with_capacity(keys.len());
            let mut claims = shared.lock_claims();
            let id = claims.commit_id();
            shared
                .with_disk(|disk| {
                    let mut reader = disk.reader()?;
                    let mut seen = std::collections::HashSet::with_capacity(keys.len());
                    for (i, (route, digest)) in routes.iter().zip(&digests).enumerate() {
                        let done = reader
                            .expiry(route, digest)?
                            .is_some_and(|e| is_live(e, tick));
                        let again = !seen.insert(*digest);
                        let step = claims
                            .begin_commit(id, *digest, route, done, again, &owner, now, lease);
                        if step.write {
                            let body = body_at(&bodies, i).map_or(0, BodyDigest::get);
                            writes.push((route, *digest, body));
                        }
                        outcomes.push(step.outcome);
                    }
                    Ok(())
                })
                .inspect_err(|_| {
                    // Markers placed before a read failed: nothing was written, the keys are
                    // their committer's claims again.
                    let marked: Vec<Digest> = writes.iter().map(|(_, d, _)| *d).collect();
                    claims.end_commit(id, &marked, false, now, lease);
                })?;
            drop(claims);
            let written = if writes.is_empty() {
                Ok(())
            } else {
                let expiry = expiry_at(now_ms, window);
                let written = shared.with_disk(|disk| disk.write_done(&writes, expiry));
                if written.is_ok() {
                    shared.count_write();
                }
                written
            };
            let marked: Vec<Digest> = writes.iter().map(|(_, d, _)| *d).collect();
            shared
                .lock_claims()
                .end_commit(id, &marked, written.is_ok(), Instant::now(), lease);
            written.map(|()| outcomes)
        })
        .await
    }

    /// See `Store::renew`. In memory only (on the blocking pool all the same: the claims'
    /// lock may be held by a batch reading the disk).
    pub async fn renew(
        &self,
        keys: &[String],
        owner: &Owner,
        lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        let (keys, owner) = (keys.to_vec(), owner.clone());
        self.blocking(move |shared, _| {
            let now = Instant::now();
            let mut claims = shared.lock_claims();
            Ok(keys
                .iter()
                .map(|key| claims.renew(&digest(key), &owner, now, lease))
                .collect())
        })
        .await
    }

    /// See `Store::release`. In memory only, like `renew`: a done key is never touched.
    pub async fn release(&self, keys: &[String], owner: &Owner) -> Result<Vec<bool>, StoreError> {
        let (keys, owner) = (keys.to_vec(), owner.clone());
        self.blocking(move |shared, _| {
            let now = Instant::now();
            let mut claims = shared.lock_claims();
            Ok(keys
                .iter()
                .map(|key| claims.release(&digest(key), &owner, now))
                .collect())
        })
        .await
    }

    /// See `Store::inspect`. `window_left` counts whole ticks from the next tick boundary, as
    /// the memory store does: never more than the window committed, short of the truth by
    /// under a tick.
    pub async fn inspect(&self, key: &str) -> Result<KeyState, StoreError> {
        let key = key.to_owned();
        self.blocking(move |shared, prefix| {
            let (now, now_ms) = (Instant::now(), now_ms());
            let claims = shared.lock_claims();
            let digest = digest(&key);
            let route = route_of(prefix, &key);
            let expiry = shared.with_disk(|disk| disk.reader()?.expiry(route, &digest))?;
            if let Some(expiry) = expiry.filter(|&e| is_live(e, tick_at(now_ms))) {
                let next = now_ms
                    .saturating_sub(layout::EPOCH_MS)
                    .div_ceil(layout::TICK_MS);
                let left = u64::from(expiry).saturating_sub(next) * layout::TICK_MS;
                return Ok(KeyState::Done {
                    window_left: Duration::from_millis(left),
                });
            }
            Ok(match claims.get(&digest, now) {
                Some((owner, lease_left)) => KeyState::InFlight { owner, lease_left },
                None => KeyState::Absent,
            })
        })
        .await
    }

    /// See `Store::forget`. The deletion is durable before this returns.
    pub async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_owned();
        self.blocking(move |shared, prefix| {
            let (now, tick) = (Instant::now(), now_tick());
            let digest = digest(&key);
            let claimed = shared.lock_claims().forget(&digest, now);
            let route = route_of(prefix, &key);
            let removed = shared.with_disk(|disk| disk.remove(route, &digest))?;
            shared.count_write();
            Ok(claimed || removed.is_some_and(|e| is_live(e, tick)))
        })
        .await
    }

    /// See `Store::size`: per route, the done keys of its table (expired ones not yet swept
    /// included, hence not exact) and its live claims; and the disk the directory takes.
    /// Keys are counted by the route they were written under, so for a `prefix` other than the
    /// store's own every count is 0.
    pub async fn size(&self, prefix: &str, routes: &[String]) -> Result<StoreSize, StoreError> {
        let own = prefix == &*self.prefix;
        let routes = routes.to_vec();
        self.blocking(move |shared, _| {
            let (counts, memory_bytes) =
                shared.with_disk(|disk| Ok((disk.counts(&routes)?, disk.disk_bytes()?)))?;
            let claimed = shared.lock_claims().per_route(Instant::now());
            let keys = routes
                .iter()
                .zip(counts)
                .map(|(route, n)| {
                    let claimed = claimed.get(route.as_str()).copied().unwrap_or(0);
                    if own {
                        n + claimed
                    } else {
                        0
                    }
                })
                .collect();
            Ok(StoreSize {
                keys,
                exact: false,
                memory_bytes,
            })
        })
        .await
    }

    /// See `Store::ping`: a read transaction, so a file that cannot be read fails it.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.blocking(|shared, _| shared.with_disk(|disk| disk.reader().map(drop)))
            .await
    }

    /// Starts the sweeper on `tracker` until `shutdown` (see `upkeep`).
    pub fn start_upkeep(
        &self,
        routes: &[(String, Duration)],
        tracker: &tokio_util::task::TaskTracker,
        shutdown: &tokio_util::sync::CancellationToken,
    ) {
        let windows: Vec<Duration> = routes.iter().map(|(_, w)| *w).collect();
        tracker.spawn(upkeep::run(
            self.shared.clone(),
            upkeep::pass_every(&windows),
            shutdown.clone(),
        ));
    }

    /// Write transactions committed so far (each synced to disk, but for the sweeper's).
    pub fn commands_sent(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// `embedded {path}`.
    pub fn label(&self) -> String {
        format!("embedded {}", self.path.display())
    }
}

/// The open store of `dir`: the one this process already has, or a new one.
fn open_shared(dir: &Path) -> Result<Arc<Shared>, StoreError> {
    let shown = dir.display();
    if dir.exists() && !dir.is_dir() {
        return Err(StoreError::Embedded(format!(
            "store.path {shown} is not a directory: name a directory for the store's files"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        StoreError::Embedded(format!("cannot create the store directory {shown}: {e}"))
    })?;
    let canonical = dir
        .canonicalize()
        .map_err(|e| StoreError::Embedded(format!("cannot resolve {shown}: {e}")))?;
    let mut open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
    // An entry whose store is gone: this process had the file open a moment ago, and the
    // lock may not be given back yet (the last handle can be dropped on another thread,
    // where closing the file takes a sync).
    let mut ours_closing = false;
    if let Some(i) = open.iter().position(|(path, _)| *path == canonical) {
        if let Some(shared) = open[i].1.upgrade() {
            return Ok(shared);
        }
        open.swap_remove(i);
        ours_closing = true;
    }
    open.retain(|(_, weak)| weak.strong_count() > 0);
    let file = canonical.join(disk::FILE_NAME);
    let fresh = !file.exists();
    let started = Instant::now();
    let disk = loop {
        match Disk::open(&file) {
            Err(OpenError::Locked) if ours_closing && started.elapsed() < CLOSING => {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => break result,
        }
    };
    let disk = disk.map_err(|e| open_error(dir, &file, e))?;
    if fresh {
        // The new file's directory entry, so a crash cannot lose the file itself.
        std::fs::File::open(&canonical)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::Embedded(format!("cannot sync {shown}: {e}")))?;
    }
    let took_ms = started.elapsed().as_millis() as u64;
    let keys = disk.total_keys()?;
    let shared = Arc::new(Shared {
        disk: RwLock::new(Some(disk)),
        claims: Mutex::default(),
        dir: canonical.clone(),
        file,
        writes: AtomicU64::new(0),
    });
    tracing::info!(
        path = %canonical.display(),
        keys,
        took_ms,
        "embedded store open: remembers {keys} keys"
    );
    open.push((canonical, Arc::downgrade(&shared)));
    Ok(shared)
}

/// What a failed open of `file` in `dir` says.
fn open_error(dir: &Path, file: &Path, e: OpenError) -> StoreError {
    match e {
        OpenError::Locked => StoreError::Embedded(format!(
            "{} is in use by another process (lock held on {}): one dedupd at a time per \
             store.path; stop the other one (dedupd inspect, forget and check --connect need \
             the daemon stopped too)",
            dir.display(),
            file.display()
        )),
        OpenError::Other(why) => {
            StoreError::Embedded(format!("cannot open {}: {why}", file.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::layout::tick_to_ms;

    #[test]
    fn expiry_is_at_least_the_window_and_at_most_a_tick_more() {
        let now = layout::EPOCH_MS + 10_000_007;
        for window_ms in [1u64, 999, 1_000, 1_001, 60_000, 86_400_000] {
            let expiry = expiry_at(now, Duration::from_millis(window_ms));
            let forgotten = tick_to_ms(u64::from(expiry));
            assert!(forgotten >= now + window_ms, "{window_ms}");
            assert!(forgotten < now + window_ms + layout::TICK_MS, "{window_ms}");
            // Remembered until then, not after.
            assert!(is_live(expiry, tick_at(forgotten - 1)));
            assert!(!is_live(expiry, tick_at(forgotten)));
        }
    }

    /// An operation stuck past `store.timeout` (here: a batch holding the claims' lock, as a
    /// slow disk read would) fails with `Timeout` in time, and the store answers again after.
    #[tokio::test]
    #[allow(clippy::await_holding_lock)] // holding it across the call is the point
    async fn an_operation_past_the_timeout_fails_with_timeout() {
        let dir = std::env::temp_dir().join(format!(
            "dedupd-unit-emb-timeout-{:016x}",
            rand::random::<u64>()
        ));
        let timeout = Duration::from_millis(100);
        let cfg = StoreConfig {
            kind: crate::config::StoreKind::Embedded,
            path: Some(dir.clone()),
            key_prefix: "dd".to_owned(),
            timeout,
            ..StoreConfig::default()
        };
        let store = EmbeddedStore::open(&cfg).await.expect("open");
        let owner = Owner::new("inst-a".into(), 1);
        let keys = vec!["dd:r:1".to_owned()];
        let lease = Duration::from_secs(30);
        {
            let _stuck = store.shared.lock_claims();
            let started = Instant::now();
            let result = store.claim(&keys, &[], &owner, lease, None).await;
            assert!(
                matches!(result, Err(StoreError::Timeout(t)) if t == timeout),
                "{result:?}"
            );
            assert!(started.elapsed() < timeout + Duration::from_secs(1));
        }
        // The timed-out claim went through once the lock was free: its outcome was unknown
        // to the caller, and the key is ours.
        let again = store
            .claim(&keys, &[], &owner, lease, None)
            .await
            .expect("claim");
        assert!(
            matches!(again[..], [ClaimOutcome::Ours] | [ClaimOutcome::Claimed]),
            "{again:?}"
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// After an I/O error redb answers nothing until the file is opened again: the next
    /// operation reopens it, and nothing done or claimed is lost.
    #[tokio::test]
    async fn a_file_broken_by_an_io_error_is_opened_again() {
        let dir = std::env::temp_dir().join(format!(
            "dedupd-unit-emb-reopen-{:016x}",
            rand::random::<u64>()
        ));
        let cfg = StoreConfig {
            kind: crate::config::StoreKind::Embedded,
            path: Some(dir.clone()),
            key_prefix: "dd".to_owned(),
            ..StoreConfig::default()
        };
        let store = EmbeddedStore::open(&cfg).await.expect("open");
        let (a, b) = (
            Owner::new("inst-a".into(), 1),
            Owner::new("inst-b".into(), 1),
        );
        let lease = Duration::from_secs(30);
        let done = vec!["dd:r:done".to_owned()];
        let flying = vec!["dd:r:flying".to_owned()];
        store
            .claim(&done, &[], &a, lease, None)
            .await
            .expect("claim");
        store
            .commit(&done, &[], &a, Duration::from_secs(60))
            .await
            .expect("commit");
        store
            .claim(&flying, &[], &a, lease, None)
            .await
            .expect("claim");
        let broken = |store: &EmbeddedStore| {
            let slot = store
                .shared
                .disk
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            slot.as_ref().is_none_or(|d| d.is_broken())
        };
        {
            let slot = store
                .shared
                .disk
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            slot.as_ref().expect("open").break_for_test();
        }
        assert!(broken(&store));

        let both = vec![done[0].clone(), flying[0].clone()];
        let outcomes = store
            .claim(&both, &[], &b, lease, None)
            .await
            .expect("claim after reopen");
        assert!(!broken(&store), "opened again");
        assert!(
            matches!(
                outcomes[..],
                [ClaimOutcome::Done, ClaimOutcome::InFlightElsewhere { .. }]
            ),
            "{outcomes:?}"
        );
        assert_eq!(
            store
                .commit(&flying, &[], &a, Duration::from_secs(60))
                .await
                .expect("commit after reopen"),
            [CommitOutcome::Committed]
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn expiry_saturates_instead_of_wrapping() {
        let now = layout::EPOCH_MS;
        assert_eq!(
            expiry_at(now, Duration::from_secs(30 * 365 * 86_400)),
            u32::MAX
        );
        assert_eq!(expiry_at(u64::MAX - 1, Duration::MAX), u32::MAX);
    }
}
