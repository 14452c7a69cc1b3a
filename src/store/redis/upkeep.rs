//! Background upkeep of the Redis layout, one task per route: the **upgrade check** (do keys
//! of the 0.1 layout still exist, and until when), then the **sweeper** (deletes remembered
//! keys whose window has ended, in bounded chunks).
//!
//! # Upgrade check
//!
//! dedupd 0.1 and 0.2 stored each key as a string `{prefix}:{route}:{id}`. Such keys must be
//! honored until they expire, or the upgrade forwards a burst of duplicates; but reading a
//! second name per key forever would cost a command per message on a cluster. So, per route:
//! the marker `{prefix}:{{route}}:legacy-until` says until when such keys may exist. Without a
//! marker (the first start after an upgrade, or a new route), the check `SCAN`s the keyspace
//! (every primary of a cluster) for the route's 0.1 names in pages of 1,000, reads their TTLs,
//! and writes the marker: now plus the longest TTL found, or now when none were found. Claims
//! read the 0.1 name until then, and never after. Until the check has answered, they read it
//! too. The scan costs one pass over the keyspace, once per route, in the background.
//!
//! A dedupd of the old layout still running beside this one (a rolling upgrade) keeps writing
//! old names the check may not see, and does not read the new layout at all: stop every old
//! instance before starting new ones to rule out duplicates during the switch.
//!
//! # Sweeper
//!
//! Each table's shards are visited in chunks of [`SWEEP_CHUNK`] by `SWEEP_LUA`, which keeps the
//! table's cursor and pass start in its meta hash, so several instances share one pass instead
//! of each doing its own, and starts a new pass at most once per `window / 8`: a key's field
//! is deleted at most `window / 8` after its window ended. Until then it reads as absent anyway.

use std::time::Duration;

use ::redis::{RedisError, RedisResult, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{array, calls, now_ms, parse_int, unexpected, Conn, Legacy, RedisStore};
use crate::backoff::Backoff;
use crate::store::layout;

/// Shards one sweep call visits: about 40-80 fields each, so a call keeps Redis busy for well
/// under a millisecond.
pub const SWEEP_CHUNK: u64 = 64;

/// Keys per `SCAN` page of the upgrade check.
const SCAN_COUNT: u64 = 1000;

/// Runs the upgrade check and then the sweeper of `route` until `shutdown`.
pub(super) async fn run(
    store: RedisStore,
    route: String,
    window: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let until = loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = check_legacy(&store, &route) => r,
        };
        match attempt {
            Ok(until) => break until,
            Err(e) => {
                tracing::debug!(route, error = %e, "redis: upgrade check failed, retrying");
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    store.set_legacy(&route, Legacy::Until(until));
    if until > now_ms() {
        tracing::info!(
            route,
            for_secs = (until - now_ms()) / 1000,
            "keys of the old store layout found: honoring them until they expire"
        );
    }
    sweep(&store, &route, window, &shutdown).await;
}

/// Warns once if the server's listpack limits make remembered keys costly (see
/// `Store::layout_risk`). Retries until Redis answers; a server that refuses CONFIG is left
/// alone (`check --connect` says so).
pub(super) async fn warn_layout_risk(store: RedisStore, shutdown: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        match store.layout_risk().await {
            Ok(None) => return,
            Ok(Some(risk)) => {
                tracing::warn!(store = %store.label(), "{risk}");
                return;
            }
            Err(crate::store::StoreError::Redis(e))
                if e.kind()
                    == ::redis::ErrorKind::Server(::redis::ServerErrorKind::ResponseError) =>
            {
                return
            }
            Err(_) => {}
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Until when 0.1-layout keys of `route` may exist (Unix ms): the marker, or a scan.
async fn check_legacy(store: &RedisStore, route: &str) -> Result<u64, crate::store::StoreError> {
    let prefix = store.inner.prefix.clone();
    let marker = layout::legacy_marker(&prefix, route);
    let recorded: Option<String> = store
        .bounded(|mut conn| {
            let marker = marker.clone();
            async move {
                store.sent(1);
                ::redis::cmd("GET").arg(marker).query_async(&mut conn).await
            }
        })
        .await?;
    if let Some(until) = recorded.and_then(|v| v.parse::<u64>().ok()) {
        return Ok(until);
    }
    let pattern = layout::legacy_pattern(&prefix, route);
    let nodes = store
        .bounded(|mut conn| async move { nodes(&mut conn).await })
        .await?;
    let started = now_ms();
    let mut longest: i64 = 0;
    let mut found: u64 = 0;
    for node in nodes {
        let mut cursor = 0u64;
        loop {
            let (next, keys) = store
                .bounded(|mut conn| {
                    let (pattern, node) = (&pattern, node.clone());
                    async move { scan_page(store, &mut conn, node, cursor, pattern).await }
                })
                .await?;
            found += keys.len() as u64;
            if !keys.is_empty() {
                let ttls = store
                    .bounded(|mut conn| {
                        let keys = &keys;
                        async move { ttls(store, &mut conn, keys).await }
                    })
                    .await?;
                longest = longest.max(ttls.into_iter().max().unwrap_or(0));
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    // A key without TTL (-1) never expires by itself; 0.1 never wrote one, so it is not ours.
    let until = started + u64::try_from(longest).unwrap_or(0);
    store
        .bounded(|mut conn| {
            let marker = marker.clone();
            async move {
                store.sent(1);
                ::redis::cmd("SET")
                    .arg(marker)
                    .arg(until)
                    .query_async::<()>(&mut conn)
                    .await
            }
        })
        .await?;
    tracing::debug!(route, found, until, "redis: upgrade check done");
    Ok(until)
}

/// Where to scan: `None` for a single server, each primary's address on a cluster.
async fn nodes(conn: &mut Conn) -> RedisResult<Vec<Option<(String, u16)>>> {
    let Conn::Cluster(c) = conn else {
        return Ok(vec![None]);
    };
    let slots: Value = ::redis::cmd("CLUSTER").arg("SLOTS").query_async(c).await?;
    let mut primaries = Vec::new();
    for range in array(slots)? {
        // [start, end, [host, port, id, ...], replicas...]
        let range = array(range)?;
        let primary = range
            .get(2)
            .cloned()
            .ok_or_else(|| unexpected("CLUSTER SLOTS: a range without primary".into()))?;
        let primary = array(primary)?;
        let host = match primary.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            other => return Err(unexpected(format!("CLUSTER SLOTS host {other:?}"))),
        };
        let port = primary
            .get(1)
            .map(parse_int)
            .transpose()?
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| unexpected("CLUSTER SLOTS: no port".into()))?;
        if !primaries.contains(&Some((host.clone(), port))) {
            primaries.push(Some((host, port)));
        }
    }
    Ok(primaries)
}

/// One `SCAN` page on `node`: the next cursor and the keys found.
async fn scan_page(
    store: &RedisStore,
    conn: &mut Conn,
    node: Option<(String, u16)>,
    cursor: u64,
    pattern: &str,
) -> RedisResult<(u64, Vec<String>)> {
    let mut cmd = ::redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(SCAN_COUNT)
        .arg("TYPE")
        .arg("string");
    store.sent(1);
    match (conn, node) {
        (Conn::Cluster(c), Some((host, port))) => {
            use ::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            let reply = c.route_command(cmd, routing).await?;
            ::redis::from_redis_value(reply).map_err(RedisError::from)
        }
        (conn, _) => cmd.query_async(conn).await,
    }
}

/// PTTL of each of `keys` (pipelined on a single server, concurrent on a cluster).
async fn ttls(store: &RedisStore, conn: &mut Conn, keys: &[String]) -> RedisResult<Vec<i64>> {
    store.sent(keys.len() as u64);
    match conn {
        Conn::Single(c) => {
            let mut pipe = ::redis::Pipeline::new();
            for key in keys {
                pipe.pttl(key);
            }
            pipe.query_async(c).await
        }
        Conn::Cluster(c) => futures::future::join_all(keys.iter().map(|key| {
            let mut c = c.clone();
            async move {
                ::redis::cmd("PTTL")
                    .arg(key)
                    .query_async::<i64>(&mut c)
                    .await
            }
        }))
        .await
        .into_iter()
        .collect(),
    }
}

/// Sweeps the route's tables until `shutdown`: each table's next chunk when it is due.
async fn sweep(store: &RedisStore, route: &str, window: Duration, shutdown: &CancellationToken) {
    let tables = store.tables_with_prefix(&store.inner.prefix.clone(), route);
    let min_pass = (window / 8).max(Duration::from_millis(100));
    let mut due = [Instant::now(); layout::GROUPS];
    loop {
        let (group, when) = due
            .iter()
            .copied()
            .enumerate()
            .min_by_key(|&(_, when)| when)
            .unwrap_or((0, Instant::now()));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(when) => {}
        }
        let meta = tables.meta(group);
        let result = store
            .bounded(|mut conn| {
                let meta = &meta;
                async move { sweep_chunk(store, &mut conn, meta, min_pass).await }
            })
            .await;
        due[group] = Instant::now()
            + match result {
                Ok(next) => next,
                Err(e) => {
                    tracing::debug!(route, error = %e, "redis: sweep failed, retrying");
                    Duration::from_secs(5)
                }
            };
    }
}

/// Sweeps the next chunk of the table `meta`; returns how long to wait before the next call:
/// the rest of `min_pass` after a pass, or a pace that finishes a pass in half of `min_pass`.
async fn sweep_chunk(
    store: &RedisStore,
    conn: &mut Conn,
    meta: &str,
    min_pass: Duration,
) -> RedisResult<Duration> {
    let script = &store.inner.scripts.sweep;
    let chunk = SWEEP_CHUNK.to_string();
    let pass = min_pass.as_millis().to_string();
    let cmd = calls::evalsha(script, &[meta], &[chunk.as_bytes(), pass.as_bytes()]);
    let reply = array(calls::eval(conn, script, &cmd, &|n| store.sent(n)).await?)?;
    let [_, deleted, wait, shards] = reply.as_slice() else {
        return Err(unexpected(format!("sweep returned {reply:?}")));
    };
    let deleted = parse_int(deleted)?;
    if deleted > 0 {
        metrics::counter!(crate::telemetry::STORE_SWEPT).increment(deleted as u64);
    }
    let wait = u64::try_from(parse_int(wait)?).unwrap_or(0);
    if wait > 0 {
        return Ok(Duration::from_millis(wait));
    }
    let chunks = u64::try_from(parse_int(shards)?)
        .unwrap_or(1)
        .div_ceil(SWEEP_CHUNK)
        .max(1);
    let pace = min_pass / 2 / u32::try_from(chunks).unwrap_or(u32::MAX);
    Ok(pace.clamp(Duration::from_millis(2), Duration::from_secs(1)))
}
