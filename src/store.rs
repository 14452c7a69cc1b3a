//! The shared key store and its claim protocol (see DESIGN in the README):
//! absent -> claim(owner, lease) -> in-flight(owner) -> commit(owner, window) -> done,
//! with release(owner) and lease expiry returning a key to absent.
//!
//! All operations take a batch of keys and cost one round trip per batch.
//!
//! # What a key holds
//!
//! - nothing: never seen, released, or expired. The next copy is forwarded.
//! - an owner token `{instance}:{epoch}` with a lease: in flight. The lease is what frees the
//!   key when its owner dies between claiming and committing.
//! - done, until its window ends (rounded up by at most `window / 8`).
//!
//! Four backends keep them, each in its own module:
//!
//! - `redis`: done keys as 15-byte digests in listpack hashes, about 30 bytes each, grouped in
//!   six tables per route so a batch is one script call per table on a cluster ([`layout`]);
//! - `postgres`: one row per key in a table per key prefix, each operation one statement per
//!   batch, times from the server's clock;
//! - `embedded`: done keys in a redb file under `store.path`, synced once per commit batch;
//!   claims in memory (one process per path);
//! - `memory`: digests and expiry ticks in per-route maps, forgotten on restart.
//!
//! # Why every step is a script
//!
//! Each step must read the key's state and decide what to write in one atomic step, or two
//! instances racing on the same key could both believe they own it:
//!
//! - **claim** (per key): absent → write our token (`Claimed`); done → `Done`; our exact
//!   token → refresh the lease (`Ours`: the caller claimed it earlier, e.g. an earlier copy in
//!   the same batch); a token of this same process with an *older* epoch → overwrite with ours
//!   (`TakenOver`: the connection that publish went out on is gone, so waiting out the lease
//!   would only delay the redelivered copy); anything else → `InFlightElsewhere` with the
//!   remaining lease, so the caller knows how long to hold the duplicate at most. A plain
//!   `SET NX` plus a `GET` could not do the takeover atomically, hence Lua.
//! - **commit**: the copy was confirmed downstream, so the key becomes done for the window
//!   whatever it holds now: our token (`Committed`), nothing because our claim lapsed
//!   (`Restored`: writing it is what keeps a later copy from being forwarded), or another
//!   owner's token (`Overrode`: that owner may be publishing a second copy). Only a key that is
//!   already done is left alone (`DoneElsewhere`). The caller learns which, so it can count
//!   the cases where a second copy may have gone out. A commit is never turned into a release.
//! - **release**: compare-and-delete: only our own claim is removed, never someone else's and
//!   never a done key.
//! - **renew**: compare-and-extend: while a claim is being worked on (a slow confirm, a commit
//!   retried while the store refuses writes), its owner keeps extending the lease, so a live
//!   owner's claim never lapses. `PEXPIRE` is allowed even when a full Redis refuses writes.
//!
//! The Redis backend loads the scripts once (EVALSHA) and reloads them when the server answers
//! NOSCRIPT (a restarted or flushed server); PostgreSQL decides in one statement that locks the
//! batch's rows in key order; the memory and embedded backends run the same decisions under a
//! lock. All four are exercised by one shared test suite (`tests/store.rs`).
//!
//! # How big it is
//!
//! [`Store::size`] answers how many keys each route remembers and how much memory the store
//! uses, for the `dedupd_store_keys{route}` and `dedupd_store_memory_bytes` gauges. It is
//! called by a background sampler every 15 s (`telemetry::sizing`), never on the hot path, and
//! costs a bounded amount whatever the store holds: on Redis, six `HGET`s per route (each
//! table counts its keys) and `INFO memory` (summed over a cluster's primaries); on PostgreSQL,
//! a count per route (over a `TABLESAMPLE` of large tables) and the table's size; embedded,
//! each route table's length and the files' disk blocks; in memory, the tables' counts and an
//! estimate of their allocation (see the `memory` module).

mod embedded;
pub mod layout;
mod memory;
mod postgres;
mod redis;
pub mod watched;

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{StoreConfig, StoreKind};

/// The PostgreSQL table that holds the keys of a `key_prefix` (unquoted), for operators and
/// for tests that clean up after themselves.
pub use postgres::table_name as postgres_table_name;

/// Who holds a claim: a random per-process instance id plus the route's connection epoch.
/// Rendered as `{instance}:{epoch}`: always with a `:`, so never equal to the done marker
/// (`"1"`) of the old Redis layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    instance: Arc<str>,
    epoch: u64,
    token: String,
}

impl Owner {
    /// The owner token of `instance` at `epoch`.
    pub fn new(instance: Arc<str>, epoch: u64) -> Self {
        let token = format!("{instance}:{epoch}");
        Self {
            instance,
            epoch,
            token,
        }
    }
    /// The string stored in the key while in flight.
    pub fn token(&self) -> &str {
        &self.token
    }
    /// `{instance}:`, the prefix shared by every epoch of this process.
    pub fn instance_prefix(&self) -> String {
        format!("{}:", self.instance)
    }
    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// A 64-bit digest of a copy's body, remembered with its key when it is committed: a later
/// copy with the same key and another digest is a *conflict* (a different message reusing the
/// key), not a duplicate. The first 8 bytes of the body's BLAKE3 hash; never zero, so compact
/// stores can spell "no digest" as 0. Two different bodies share one with a chance of 2⁻⁶⁴:
/// such a conflict goes unnoticed and the copy is taken for a duplicate, as it would be
/// without digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BodyDigest(NonZeroU64);

impl BodyDigest {
    /// The digest of `body`.
    pub fn of(body: &[u8]) -> Self {
        let hash = blake3::hash(body);
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        Self::from_u64(u64::from_be_bytes(first)).unwrap_or(Self(NonZeroU64::MIN))
    }

    /// A digest read back from a store; `None` for 0 (no digest).
    pub fn from_u64(value: u64) -> Option<Self> {
        NonZeroU64::new(value).map(Self)
    }

    /// The digest as a number (never 0).
    pub fn get(self) -> u64 {
        self.0.get()
    }

    /// The digest's 8 bytes, big-endian, as stores that keep bytes write it.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0.get().to_be_bytes()
    }
}

/// The body digest of the `i`-th key of a batch: `bodies` holds one per key, or is empty when
/// no copy of the batch has one.
pub(crate) fn body_at(bodies: &[Option<BodyDigest>], i: usize) -> Option<BodyDigest> {
    bodies.get(i).copied().flatten()
}

/// What a claim answers for a key it finds done, remembered with `stored`: a conflict only
/// when both digests are known and differ. A key committed without a digest (`key = "body"`,
/// or by a dedupd older than 0.5) cannot tell, and reads as a duplicate. Only a `Done` answer
/// restarts a sliding window: a conflicting copy is not a repeat of the remembered one.
pub(crate) fn done_or_conflict(
    stored: Option<BodyDigest>,
    copy: Option<BodyDigest>,
) -> ClaimOutcome {
    match (stored, copy) {
        (Some(stored), Some(copy)) if stored != copy => ClaimOutcome::Conflict,
        _ => ClaimOutcome::Done,
    }
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key was absent; it is now in flight with our token.
    Claimed,
    /// The key was in flight with this instance's token of an older epoch (the connection it
    /// was published on is gone); it now carries our token. The first publish may have
    /// reached the broker: a possible duplicate.
    TakenOver,
    /// The key already carries exactly our token (lease refreshed). The caller knows whether
    /// it is really in flight here or a leftover of a failed release.
    Ours,
    /// The key was forwarded and committed, with the same body digest as this copy's (or
    /// without one to compare): a duplicate. With a sliding window, its window restarts now.
    Done,
    /// The key was forwarded and committed with a body digest other than this copy's: a
    /// different message reusing the key. Its window is left as it is.
    Conflict,
    /// Another instance holds it in flight for up to `lease_left`. Also returned for a token
    /// of this instance with a *newer* epoch: a caller still on an old epoch must not steal
    /// from the current connection.
    InFlightElsewhere {
        /// Time until that claim expires unless committed or released first.
        lease_left: Duration,
    },
}

/// What a commit found (see the module docs). Every outcome leaves the key done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The key carried our token.
    Committed,
    /// The key was absent: our claim had lapsed (expired), and nobody else held it.
    Restored,
    /// The key carried another owner's token, which may be publishing a second copy.
    Overrode,
    /// The key was done already: another owner forwarded a copy too (or an earlier attempt of
    /// this very commit was applied although its answer was lost).
    DoneElsewhere,
}

impl CommitOutcome {
    fn from_code(code: i64) -> Option<CommitOutcome> {
        Some(match code {
            0 => CommitOutcome::Committed,
            1 => CommitOutcome::Restored,
            2 => CommitOutcome::DoneElsewhere,
            3 => CommitOutcome::Overrode,
            _ => return None,
        })
    }
}

/// What `inspect` reports for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// Not in the store: the next copy is forwarded.
    Absent,
    /// Claimed by `owner`, expiring in `lease_left` unless committed or released.
    InFlight {
        /// The owner token.
        owner: String,
        /// Remaining lease.
        lease_left: Duration,
    },
    /// Forwarded; remembered for `window_left` (`Duration::MAX` if the key has no expiry,
    /// which dedupd never writes).
    Done {
        /// Remaining window.
        window_left: Duration,
    },
}

/// What [`Store::size`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSize {
    /// Keys remembered per route, in the order of the routes asked about: exact for the memory
    /// store (in flight and done); on Redis and the embedded store, done keys counted by each
    /// table (exact, except that keys whose window ended since the sweeper's last pass still
    /// count); on PostgreSQL, rows counted (a `TABLESAMPLE` estimate on large tables).
    pub keys: Vec<u64>,
    /// Whether `keys` are exact counts rather than estimates.
    pub exact: bool,
    /// The store's size: Redis `used_memory` (all its data, not only dedupd's), the PostgreSQL
    /// table's `pg_total_relation_size`, the disk blocks of the embedded store's files, or the
    /// memory store's estimate of its map.
    pub memory_bytes: u64,
}

/// A store operation that did not complete. The batch's outcome is unknown.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer within `store.timeout`.
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// PostgreSQL answered with an error or the connection failed.
    #[error("postgres: {0}")]
    Postgres(String),
    /// The embedded store's files could not be read or written.
    #[error("embedded store: {0}")]
    Embedded(String),
    /// The store URL or TLS files are unusable.
    #[error("store config: {0}")]
    Config(String),
}

/// The configured store.
#[derive(Clone)]
pub enum Store {
    /// In-process, one instance only.
    Memory(memory::MemoryStore),
    /// Redis or Redis Cluster.
    Redis(redis::RedisStore),
    /// PostgreSQL.
    Postgres(postgres::PostgresStore),
    /// Files on local disk, one instance.
    Embedded(embedded::EmbeddedStore),
}

impl Store {
    /// Builds the store. For Redis this does not wait for the server: operations fail (and
    /// are retried by the caller) until it answers. Only an unusable URL or TLS file fails.
    /// Must be called inside a tokio runtime (the memory store spawns its sweeper).
    pub async fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        match cfg.kind {
            StoreKind::Memory => Ok(Store::Memory(memory::MemoryStore::new(&cfg.key_prefix))),
            StoreKind::Redis => Ok(Store::Redis(redis::RedisStore::open(cfg)?)),
            StoreKind::Postgres => Ok(Store::Postgres(postgres::PostgresStore::open(cfg).await?)),
            StoreKind::Embedded => Ok(Store::Embedded(embedded::EmbeddedStore::open(cfg).await?)),
        }
    }

    /// Claims every key for `owner` (one round trip). Outcomes are in key order; a key that
    /// appears twice in `keys` sees its own earlier claim (`Ours`).
    ///
    /// `bodies` holds each copy's body digest (or is empty): a done key remembered with
    /// another digest answers `Conflict`. With `slide = Some(window)` (a sliding window), a
    /// key that answers `Done` is remembered for `window` from now, never for less than it
    /// already was.
    pub async fn claim(
        &self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        owner: &Owner,
        lease: Duration,
        slide: Option<Duration>,
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        assert!(bodies.is_empty() || bodies.len() == keys.len());
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let result = match self {
            Store::Memory(m) => Ok(m.claim(keys, bodies, owner, lease, slide)),
            Store::Redis(r) => r.claim(keys, bodies, owner, lease, slide).await,
            Store::Postgres(p) => p.claim(keys, bodies, owner, lease, slide).await,
            Store::Embedded(e) => e.claim(keys, bodies, owner, lease, slide).await,
        };
        record("claim", started);
        result
    }

    /// Marks each key done for `window` (their copies were confirmed downstream), with its
    /// copy's body digest from `bodies` (one per key, or empty), and says what each held
    /// before; a key already done keeps its window and its digest.
    pub async fn commit(
        &self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        owner: &Owner,
        window: Duration,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        assert!(bodies.is_empty() || bodies.len() == keys.len());
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let result = match self {
            Store::Memory(m) => Ok(m.commit(keys, bodies, owner, window)),
            Store::Redis(r) => r.commit(keys, bodies, owner, window).await,
            Store::Postgres(p) => p.commit(keys, bodies, owner, window).await,
            Store::Embedded(e) => e.commit(keys, bodies, owner, window).await,
        };
        record("commit", started);
        result
    }

    /// Extends the lease of each key that still carries `owner`'s token; `false` where it does
    /// not. Works while a full Redis refuses writes (`PEXPIRE` is not refused).
    pub async fn renew(
        &self,
        keys: &[String],
        owner: &Owner,
        lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let result = match self {
            Store::Memory(m) => Ok(m.renew(keys, owner, lease)),
            Store::Redis(r) => r.renew(keys, owner, lease).await,
            Store::Postgres(p) => p.renew(keys, owner, lease).await,
            Store::Embedded(e) => e.renew(keys, owner, lease).await,
        };
        record("renew", started);
        result
    }

    /// Deletes each key if it still carries `owner`'s token; `false` where it does not.
    pub async fn release(&self, keys: &[String], owner: &Owner) -> Result<Vec<bool>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let result = match self {
            Store::Memory(m) => Ok(m.release(keys, owner)),
            Store::Redis(r) => r.release(keys, owner).await,
            Store::Postgres(p) => p.release(keys, owner).await,
            Store::Embedded(e) => e.release(keys, owner).await,
        };
        record("release", started);
        result
    }

    /// What the store holds for `key`.
    pub async fn inspect(&self, key: &str) -> Result<KeyState, StoreError> {
        let started = Instant::now();
        let result = match self {
            Store::Memory(m) => Ok(m.inspect(key)),
            Store::Redis(r) => r.inspect(key).await,
            Store::Postgres(p) => p.inspect(key).await,
            Store::Embedded(e) => e.inspect(key).await,
        };
        record("inspect", started);
        result
    }

    /// Deletes `key` whatever it holds; `true` if it existed.
    pub async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        let started = Instant::now();
        let result = match self {
            Store::Memory(m) => Ok(m.forget(key)),
            Store::Redis(r) => r.forget(key).await,
            Store::Postgres(p) => p.forget(key).await,
            Store::Embedded(e) => e.forget(key).await,
        };
        record("forget", started);
        result
    }

    /// The store's eviction policy when it can evict keys dedupd wrote (Redis
    /// `maxmemory-policy` other than `noeviction`, on any node); `Ok(None)` when it cannot.
    /// An evicted done key is a forgotten key: the next copy is forwarded again.
    pub async fn eviction_risk(&self) -> Result<Option<String>, StoreError> {
        match self {
            Store::Memory(_) | Store::Postgres(_) | Store::Embedded(_) => Ok(None),
            Store::Redis(r) => r.eviction_risk().await,
        }
    }

    /// Why remembered keys would cost far more than they should on this store, if they would:
    /// Redis keeps a hash compact (a listpack) only up to `hash-max-listpack-entries` fields of
    /// at most `hash-max-listpack-value` bytes. `Ok(None)` when the settings fit dedupd's layout.
    pub async fn layout_risk(&self) -> Result<Option<String>, StoreError> {
        match self {
            Store::Memory(_) | Store::Postgres(_) | Store::Embedded(_) => Ok(None),
            Store::Redis(r) => r.layout_risk().await,
        }
    }

    /// How many keys each of `routes` has under `prefix`, and the store's memory use (see the
    /// module docs for the cost and the error of the estimate). For the background sampler.
    pub async fn size(&self, prefix: &str, routes: &[String]) -> Result<StoreSize, StoreError> {
        let started = Instant::now();
        let result = match self {
            Store::Memory(m) => Ok(m.size(prefix, routes)),
            Store::Redis(r) => r.size(prefix, routes).await,
            Store::Postgres(p) => p.size(prefix, routes).await,
            Store::Embedded(e) => e.size(prefix, routes).await,
        };
        record("size", started);
        result
    }

    /// Starts the store's background upkeep for each `(route, window)` on `tracker`, until
    /// `shutdown`: on Redis, the upgrade check and the sweeper of each route's tables; the
    /// memory store sweeps by itself.
    pub fn start_upkeep(
        &self,
        routes: &[(String, Duration)],
        tracker: &tokio_util::task::TaskTracker,
        shutdown: &tokio_util::sync::CancellationToken,
    ) {
        match self {
            Store::Memory(_) => {}
            Store::Redis(r) => r.start_upkeep(routes, tracker, shutdown),
            Store::Postgres(p) => p.start_upkeep(routes, tracker, shutdown),
            Store::Embedded(e) => e.start_upkeep(routes, tracker, shutdown),
        }
    }

    /// Whether claims of `route` still read the key names of the old layout (0.1 and 0.2
    /// wrote `{prefix}:{route}:{id}` strings): until the upgrade check has answered, and then
    /// until the last such key expires. Always `false` for the memory store.
    pub fn reads_old_layout(&self, route: &str) -> bool {
        match self {
            Store::Memory(_) | Store::Postgres(_) | Store::Embedded(_) => false,
            Store::Redis(r) => r.legacy_possible(route),
        }
    }

    /// Operations sent to the store so far: Redis commands (a script call counts as one),
    /// PostgreSQL statements, embedded write transactions; 0 for the memory store.
    pub fn commands_sent(&self) -> u64 {
        match self {
            Store::Memory(_) => 0,
            Store::Redis(r) => r.commands_sent(),
            Store::Postgres(p) => p.commands_sent(),
            Store::Embedded(e) => e.commands_sent(),
        }
    }

    /// What the store is, for log lines: the kind and the URL without its password.
    pub fn label(&self) -> String {
        match self {
            Store::Memory(_) => "memory (in-process)".to_owned(),
            Store::Redis(r) => r.label(),
            Store::Postgres(p) => p.label(),
            Store::Embedded(e) => e.label(),
        }
    }

    /// One cheap round trip, for readiness and `check --connect`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(r) => r.ping().await,
            Store::Postgres(p) => p.ping().await,
            Store::Embedded(e) => e.ping().await,
        };
        record("ping", started);
        result
    }
}

/// Records one operation's latency, failures included: a slow failing store is exactly what
/// the histogram must show.
fn record(op: &'static str, started: Instant) {
    metrics::histogram!(crate::telemetry::STORE_DURATION, "op" => op)
        .record(started.elapsed().as_secs_f64());
}

/// Milliseconds for a PX argument. Redis refuses `PX 0`, and a zero lease or window would
/// be meaningless anyway, so the floor is 1 ms.
fn px_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// What a claim answers for a key that a live claim holds in flight with token `holder`, for
/// `lease_left` more: `Ours` again (the caller extends it), `TakenOver` from an older epoch of
/// this process (the caller puts our token in; only when `may_take_over`), or someone else's.
/// The memory and embedded stores apply it as it is; the Redis claim script and the PostgreSQL
/// claim statement spell the same rule in their languages.
pub(crate) fn in_flight_outcome(
    holder: &str,
    owner: &Owner,
    lease_left: Duration,
    may_take_over: bool,
) -> ClaimOutcome {
    if holder == owner.token() {
        ClaimOutcome::Ours
    } else if may_take_over && is_older_epoch_of(holder, owner) {
        ClaimOutcome::TakenOver
    } else {
        ClaimOutcome::InFlightElsewhere { lease_left }
    }
}

/// Whether `stored` is a token of `owner`'s process with an epoch older than `owner`'s.
/// Epochs are compared numerically; anything unparsable is treated as someone else's.
fn is_older_epoch_of(stored: &str, owner: &Owner) -> bool {
    stored
        .strip_prefix(owner.instance.as_ref())
        .and_then(|rest| rest.strip_prefix(':'))
        .filter(|epoch| !epoch.is_empty() && epoch.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|epoch| epoch.parse::<u64>().ok())
        .is_some_and(|epoch| epoch < owner.epoch())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(instance: &str, epoch: u64) -> Owner {
        Owner::new(instance.into(), epoch)
    }

    fn digest(n: u64) -> Option<BodyDigest> {
        NonZeroU64::new(n).map(BodyDigest)
    }

    #[test]
    fn only_two_known_different_digests_are_a_conflict() {
        assert_eq!(
            done_or_conflict(digest(1), digest(2)),
            ClaimOutcome::Conflict
        );
        assert_eq!(done_or_conflict(digest(1), digest(1)), ClaimOutcome::Done);
        // Committed by key = "body" or by dedupd 0.4: cannot tell, a duplicate.
        assert_eq!(done_or_conflict(None, digest(2)), ClaimOutcome::Done);
        assert_eq!(done_or_conflict(digest(1), None), ClaimOutcome::Done);
        assert_eq!(done_or_conflict(None, None), ClaimOutcome::Done);
    }

    #[test]
    fn body_at_reads_an_empty_batch_as_no_digests() {
        assert_eq!(body_at(&[], 3), None);
        assert_eq!(body_at(&[digest(7), None], 0), digest(7));
        assert_eq!(body_at(&[digest(7), None], 1), None);
    }

    #[test]
    fn only_an_older_epoch_of_this_instance_is_ours_to_take_over() {
        let us = owner("inst-a", 5);
        assert!(is_older_epoch_of("inst-a:4", &us));
        assert!(is_older_epoch_of("inst-a:0", &us));
        // Compared as numbers, not strings.
        assert!(is_older_epoch_of("inst-a:4", &owner("inst-a", 10)));
        assert!(!is_older_epoch_of("inst-a:5", &us));
        assert!(!is_older_epoch_of("inst-a:6", &us));
        // Another instance, one whose id starts like ours, or an unparsable epoch.
        assert!(!is_older_epoch_of("inst-b:1", &us));
        assert!(!is_older_epoch_of("inst-ab:1", &us));
        assert!(!is_older_epoch_of("inst-a:", &us));
        assert!(!is_older_epoch_of("inst-a:+1", &us));
        assert!(!is_older_epoch_of("inst-a:1x", &us));
        assert!(!is_older_epoch_of("inst-a:99999999999999999999999", &us));
        assert!(!is_older_epoch_of("1", &us));
    }

    #[test]
    fn a_live_claim_is_ours_taken_over_or_someone_elses() {
        let us = owner("inst-a", 5);
        let left = Duration::from_millis(700);
        assert_eq!(
            in_flight_outcome("inst-a:5", &us, left, true),
            ClaimOutcome::Ours
        );
        assert_eq!(
            in_flight_outcome("inst-a:5", &us, left, false),
            ClaimOutcome::Ours
        );
        assert_eq!(
            in_flight_outcome("inst-a:4", &us, left, true),
            ClaimOutcome::TakenOver
        );
        // A store may refuse a takeover (the embedded store, while a commit is under way).
        assert_eq!(
            in_flight_outcome("inst-a:4", &us, left, false),
            ClaimOutcome::InFlightElsewhere { lease_left: left }
        );
        assert_eq!(
            in_flight_outcome("inst-b:9", &us, left, true),
            ClaimOutcome::InFlightElsewhere { lease_left: left }
        );
    }
}
