//! The shared key store and its claim protocol (see DESIGN in the README):
//! absent -> claim(owner, lease) -> in-flight(owner) -> commit(owner, window) -> done,
//! with release(owner) and lease expiry returning a key to absent.
//!
//! All operations take a batch of keys and cost one round trip per batch.

mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use crate::config::StoreConfig;

/// Who holds a claim: a random per-process instance id plus the route's connection epoch.
/// Rendered as `{instance}:{epoch}`; the done marker (`"1"`) can never equal a token.
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
        Self { instance, epoch, token }
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
    /// The key was forwarded and committed; `window_left` until it is forgotten.
    Done,
    /// Another instance holds it in flight for up to `lease_left`.
    InFlightElsewhere {
        /// Time until that claim expires unless committed or released first.
        lease_left: Duration,
    },
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
    /// Forwarded; remembered for `window_left`.
    Done {
        /// Remaining window.
        window_left: Duration,
    },
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
}

impl Store {
    /// Builds the store. For Redis this does not wait for the server: operations fail (and
    /// are retried by the caller) until it answers.
    pub async fn open(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let _ = cfg;
        todo!()
    }

    /// Claims every key for `owner` (one round trip). Outcomes are in key order; a key that
    /// appears twice in `keys` sees its own earlier claim (`Ours`).
    pub async fn claim(&self, keys: &[String], owner: &Owner, lease: Duration) -> Result<Vec<ClaimOutcome>, StoreError> {
        let _ = (keys, owner, lease);
        todo!()
    }

    /// Marks each key done for `window` if it still carries `owner`'s token; `false` where it
    /// no longer does (taken over or expired), in which case nothing is written.
    pub async fn commit(&self, keys: &[String], owner: &Owner, window: Duration) -> Result<Vec<bool>, StoreError> {
        let _ = (keys, owner, window);
        todo!()
    }

    /// Deletes each key if it still carries `owner`'s token; `false` where it does not.
    pub async fn release(&self, keys: &[String], owner: &Owner) -> Result<Vec<bool>, StoreError> {
        let _ = (keys, owner);
        todo!()
    }

    /// What the store holds for `key`.
    pub async fn inspect(&self, key: &str) -> Result<KeyState, StoreError> {
        let _ = key;
        todo!()
    }

    /// Deletes `key` whatever it holds; `true` if it existed.
    pub async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        let _ = key;
        todo!()
    }

    /// One cheap round trip, for readiness and `check --connect`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        todo!()
    }
}
