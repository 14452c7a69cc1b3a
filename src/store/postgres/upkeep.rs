//! The sweeper: deletes rows whose lease or window has ended, so keys never touched again do
//! not stay in the table. Until it passes, such rows already read as absent everywhere; the
//! sweeper only gives their space back.
//!
//! Expired rows are found without an index on `expires_at` (which would cost about 20 bytes
//! per key, see `schema`): a pass walks the table's heap pages in chunks of [`CHUNK_PAGES`],
//! one `DELETE` each, by TID range, so a statement reads 2 MB at most whatever the table
//! holds. A pass starts every eighth of the shortest window (5 s to 10 min), so a row is
//! deleted at most that long after it expired. Each instance sweeps on its own; the passes of
//! several instances only find less to delete. The freed space is reused by new rows once
//! (auto)vacuum has marked it free.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::PostgresStore;
use crate::backoff::Backoff;
use crate::store::StoreError;

/// Heap pages one sweep statement visits (8 KB each: about 17,000 rows).
pub const CHUNK_PAGES: i64 = 256;

/// How often a pass starts for a shortest window of `window`.
pub fn pass_every(window: Duration) -> Duration {
    (window / 8).clamp(Duration::from_secs(5), Duration::from_secs(600))
}

/// Sweeps every `every` until `shutdown`.
pub(super) async fn run(store: PostgresStore, every: Duration, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(500), every);
    let mut delay = every;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        match pass(&store, &shutdown).await {
            Ok(deleted) => {
                backoff.reset();
                delay = every;
                if deleted > 0 {
                    tracing::debug!(store = %store.label(), deleted, "swept expired keys");
                    metrics::counter!(crate::telemetry::STORE_SWEPT).increment(deleted);
                }
            }
            Err(e) => {
                // The operations of the routes report the store's failures; this only retries.
                tracing::debug!(store = %store.label(), error = %e, "sweep failed, retrying");
                delay = backoff.next_delay();
            }
        }
    }
}

/// One pass over the table's pages as they are now; rows deleted.
pub(super) async fn pass(
    store: &PostgresStore,
    shutdown: &CancellationToken,
) -> Result<u64, StoreError> {
    let sql = &store.inner.sql;
    let quoted = super::quote_ident(&store.inner.table);
    let mut session = store.session_with(super::Setup::ReadOnly).await?;
    if session.missing {
        return Ok(0);
    }
    let rows = session.query(sql.measure, &[&quoted]).await?;
    drop(session);
    let pages: Option<i64> = match rows.first() {
        Some(row) => row.try_get(1).map_err(super::failure)?,
        None => None,
    };
    let mut deleted = 0;
    let mut start = 0;
    while start < pages.unwrap_or(0) {
        if shutdown.is_cancelled() {
            break;
        }
        let end = start + CHUNK_PAGES;
        deleted += store
            .session()
            .await?
            .execute(&sql.sweep, &[&start, &end])
            .await?;
        start = end;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_follow_the_window_within_bounds() {
        assert_eq!(pass_every(Duration::from_secs(1)), Duration::from_secs(5));
        assert_eq!(pass_every(Duration::from_secs(80)), Duration::from_secs(10));
        assert_eq!(
            pass_every(Duration::from_secs(86_400)),
            Duration::from_secs(600)
        );
    }
}
