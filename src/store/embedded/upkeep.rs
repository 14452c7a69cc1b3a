//! The embedded store's sweeper: removes done keys whose window has ended, and lapsed claims.
//!
//! Expired keys already read as absent everywhere; the sweeper only gives their disk space
//! back. It makes one pass over every table of done keys (also tables of routes no longer
//! configured) each [`pass_every`], in steps of `disk::SWEEP_CHUNK` keys, each step a short
//! blocking task of its own: a read of the chunk (readers never block writers in redb) and,
//! only if it found expired keys, a write transaction deleting them, which a commit waits
//! for at most. Deletions are made durable every [`SYNC_EVERY`] writes and at the end of a
//! pass, not at each step: one lost to a crash is simply done again by the next pass, and the
//! commits in between sync them anyway.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{now_tick, Shared};
use crate::error_chain;

/// Steps whose deletions are not synced, at most, before one that is. redb frees the pages of
/// deleted keys only at a durable commit, so this also bounds how much the file grows during
/// a pass of an idle store.
pub const SYNC_EVERY: u32 = 16;

/// Passes start at most this often, and at least this rarely.
const MIN_PASS: Duration = Duration::from_secs(1);
const MAX_PASS: Duration = Duration::from_secs(15 * 60);

/// How often a pass starts: an eighth of the shortest window, as on Redis (a key's disk space
/// is given back at most that long after its window ended), within [1 s, 15 min].
pub fn pass_every(windows: &[Duration]) -> Duration {
    windows
        .iter()
        .min()
        .map_or(MAX_PASS, |w| *w / 8)
        .clamp(MIN_PASS, MAX_PASS)
}

/// Sweeps until `shutdown`. A failed step is logged and the pass is tried again later.
pub async fn run(shared: Arc<Shared>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match pass(&shared, &shutdown).await {
            Ok(Some(removed)) => {
                if removed > 0 {
                    tracing::debug!(removed, path = %shared.dir.display(), "swept expired keys");
                }
                failing = false;
            }
            Ok(None) => return,
            Err(error) => {
                if !failing {
                    tracing::warn!(
                        path = %shared.dir.display(),
                        error = %error,
                        "embedded store: cannot sweep expired keys (they read as absent anyway; \
                         only their disk space is not given back); retrying at the next pass"
                    );
                }
                failing = true;
            }
        }
    }
}

/// One pass over every table; the keys removed, or `None` if `shutdown` came first.
async fn pass(shared: &Arc<Shared>, shutdown: &CancellationToken) -> Result<Option<u64>, String> {
    let claims_removed = {
        let mut claims = shared.lock_claims();
        claims.remove_expired(Instant::now())
    };
    let tables = blocking(shared, |s| s.with_disk(|disk| disk.done_tables())).await?;
    let mut removed = claims_removed as u64;
    let mut unsynced = 0u32;
    for table in tables {
        let mut after = None;
        loop {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            let durable = unsynced + 1 >= SYNC_EVERY;
            let name = table.clone();
            let step = blocking(shared, move |s| {
                let step =
                    s.with_disk(|disk| disk.sweep_step(&name, after, now_tick(), durable))?;
                if step.wrote {
                    s.count_write();
                }
                Ok(step)
            })
            .await?;
            removed += step.removed;
            metrics::counter!(crate::telemetry::STORE_SWEPT).increment(step.removed);
            if step.wrote {
                unsynced = if durable { 0 } else { unsynced + 1 };
            }
            match step.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    if unsynced > 0 {
        // An empty durable write: syncs the pass's deletions and frees their pages.
        blocking(shared, |s| {
            s.with_disk(|disk| disk.write_done(&[], 0))?;
            s.count_write();
            Ok(())
        })
        .await?;
    }
    Ok(Some(removed))
}

async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&Shared) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, String> {
    let shared = shared.clone();
    match tokio::task::spawn_blocking(move || f(&shared)).await {
        Ok(result) => result.map_err(|e| error_chain(&e)),
        Err(e) => Err(format!("sweep task failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_every_eighth_of_the_shortest_window_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(pass_every(&[s(3600), s(80)]), s(10));
        assert_eq!(pass_every(&[s(2)]), MIN_PASS);
        assert_eq!(pass_every(&[s(24 * 3600)]), MAX_PASS);
        assert_eq!(pass_every(&[]), MAX_PASS);
    }
}
