//! SCAFFOLD: to be replaced by the real postgres store. Every method is the interface the
//! `Store` enum dispatches to; see `memory.rs` and `redis/` for the contract.

use std::time::Duration;

use super::{ClaimOutcome, CommitOutcome, KeyState, Owner, StoreError, StoreSize};
use crate::config::StoreConfig;

#[derive(Clone)]
pub struct PostgresStore {}

fn todo<T>() -> Result<T, StoreError> {
    Err(StoreError::Config("postgres store: not built yet".into()))
}

impl PostgresStore {
    pub async fn open(_cfg: &StoreConfig) -> Result<Self, StoreError> {
        todo()
    }
    pub async fn claim(
        &self,
        _keys: &[String],
        _owner: &Owner,
        _lease: Duration,
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        todo()
    }
    pub async fn commit(
        &self,
        _keys: &[String],
        _owner: &Owner,
        _window: Duration,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        todo()
    }
    pub async fn renew(
        &self,
        _keys: &[String],
        _owner: &Owner,
        _lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        todo()
    }
    pub async fn release(&self, _keys: &[String], _owner: &Owner) -> Result<Vec<bool>, StoreError> {
        todo()
    }
    pub async fn inspect(&self, _key: &str) -> Result<KeyState, StoreError> {
        todo()
    }
    pub async fn forget(&self, _key: &str) -> Result<bool, StoreError> {
        todo()
    }
    pub async fn size(&self, _prefix: &str, _routes: &[String]) -> Result<StoreSize, StoreError> {
        todo()
    }
    pub async fn ping(&self) -> Result<(), StoreError> {
        todo()
    }
    pub fn start_upkeep(
        &self,
        _routes: &[(String, Duration)],
        _tracker: &tokio_util::task::TaskTracker,
        _shutdown: &tokio_util::sync::CancellationToken,
    ) {
    }
    pub fn commands_sent(&self) -> u64 {
        0
    }
    pub fn label(&self) -> String {
        "postgres".into()
    }
}
