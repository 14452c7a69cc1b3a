//! Redis and Redis Cluster backend of the store: the connection's life, and the operations
//! on the compact key layout (`store::layout` says where a key lives, `scripts` what each
//! step decides, `calls` how a batch becomes script calls, `upkeep` the sweeper and the
//! upgrade check).
//!
//! # Connection
//!
//! One URL: a `redis::aio::ConnectionManager`, i.e. one multiplexed connection shared by every
//! route. Concurrent batches from several routes are written back to back on that socket and
//! their replies matched in order, so they pipeline with each other for free, and the manager
//! reconnects by itself when the socket drops. A pool (deadpool-redis) would add checkouts and
//! more sockets without more throughput: Redis executes commands on one thread anyway, and a
//! pooled connection sits idle for a whole round trip per batch.
//!
//! A list of URLs: a `redis::cluster_async::ClusterConnection` (multiplexed per node, follows
//! MOVED/ASK and slot changes itself).
//!
//! # Redis down at start, and recovery
//!
//! [`RedisStore::open`] never touches the network: the manager is built with
//! `ConnectionManager::new_lazy_with_config` and the cluster connection with
//! `get_pending_async_connection_with_config`; both connect on first use. A Redis that is
//! absent at start therefore only makes operations fail, and the caller retries them.
//!
//! The manager reconnects on its own after a dropped or refused socket, but not after every
//! failure: a connect that failed with a server error (`LOADING` while Redis loads its data,
//! an auth error) or a socket that stopped answering (no RST, so only timeouts) would leave it
//! failing forever. So the connection sits in a small holder: after such an error, or after an
//! operation overran `store.timeout`, the holder swaps in a fresh lazy connection, and the next
//! operation connects anew. A generation number makes concurrent failures swap only once.
//! Operations still running on the old connection finish on it; it closes when they drop it.
//!
//! # What a batch costs
//!
//! Single server: one `EVALSHA` per batch of claims (or commits, releases, renewals), however
//! many keys. Cluster: one per table the batch touches, at most [`layout::GROUPS`] (six), sent
//! concurrently; plus, only while keys of the 0.1 layout may exist, one probe per claimed key
//! (see `upkeep`). Scripts are called by hash; a server that lost its script cache answers
//! NOSCRIPT and the call is sent again after a `SCRIPT LOAD`.
//!
//! # TLS
//!
//! `rediss://` uses the webpki roots, or `store.tls.ca_file` when given; `cert_file` and
//! `key_file` add a client certificate (mutual TLS). They are read once, at open.

mod calls;
mod scripts;
mod upkeep;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClient, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    Client, ClientTlsConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult,
    Script, ServerErrorKind, TlsCertificates, Value,
};
use tokio_util::sync::CancellationToken;

use super::layout::{self, Tables};
use super::{
    px_millis, BodyDigest, ClaimOutcome, CommitOutcome, KeyState, Owner, StoreError, StoreSize,
};
use crate::config::{StoreConfig, StoreUrl, Tls};

/// A table is split when it holds more than this many remembered keys per shard on average
/// (see `scripts`): shards then stay well under the 128 fields of a listpack.
const SPLIT_ALPHA: u32 = 40;

/// The Redis store. Cloning shares the connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    timeout: Duration,
    slot: Mutex<Slot>,
    scripts: Scripts,
    /// `store.key_prefix`.
    prefix: String,
    /// Each route's table names, derived once.
    tables: Mutex<HashMap<String, Arc<Tables>>>,
    /// Per route, until when keys of the 0.1 layout may exist (see [`Legacy`]).
    legacy: Mutex<HashMap<String, Legacy>>,
    /// Commands sent, for `dedupd_store_commands_total`.
    commands: AtomicU64,
    /// The URL(s) without passwords, for log lines.
    label: String,
}

/// The loaded scripts (see `scripts.rs`).
struct Scripts {
    claim: Script,
    commit: Script,
    release: Script,
    renew: Script,
    inspect: Script,
    forget: Script,
    sweep: Script,
    legacy_probe: Script,
}

impl Scripts {
    fn new() -> Self {
        let load = |body| Script::new(&scripts::source(body));
        Scripts {
            claim: load(scripts::CLAIM_LUA),
            commit: load(scripts::COMMIT_LUA),
            release: load(scripts::RELEASE_LUA),
            renew: load(scripts::RENEW_LUA),
            inspect: load(scripts::INSPECT_LUA),
            forget: load(scripts::FORGET_LUA),
            sweep: load(scripts::SWEEP_LUA),
            legacy_probe: load(scripts::LEGACY_PROBE_LUA),
        }
    }
}

/// Whether a route's keys may still exist in the 0.1 layout. Until the upgrade check
/// (`upkeep.rs`) has answered, they may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Legacy {
    /// Not checked yet: read the 0.1 name of every key claimed.
    Unknown,
    /// The last such key expires at this Unix time in ms (0: there were none).
    Until(u64),
}

/// What to connect to; builds a fresh lazy connection on demand.
enum Target {
    Single {
        client: Client,
        config: ConnectionManagerConfig,
    },
    Cluster {
        client: ClusterClient,
        config: ClusterConfig,
    },
}

/// The current connection and how many times it was replaced.
struct Slot {
    generation: u64,
    conn: Conn,
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisStore {
    /// Parses the URL(s) and TLS files and builds a lazy connection: no network I/O here.
    pub fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        let urls: Vec<&str> = match &cfg.url {
            StoreUrl::One(url) => vec![url.as_str()],
            StoreUrl::Cluster(urls) => urls.iter().map(String::as_str).collect(),
        };
        if urls.is_empty() {
            return Err(StoreError::Config(
                "store.url: the list of urls is empty".into(),
            ));
        }
        let certs = match &cfg.tls {
            Some(tls) => Some(load_tls(tls, &urls)?),
            None => None,
        };
        let timeout = cfg.timeout;
        let target = match &cfg.url {
            StoreUrl::One(url) => {
                let client = match certs {
                    Some(certs) => Client::build_with_tls(url.as_str(), certs),
                    None => Client::open(url.as_str()),
                }
                .map_err(|e| StoreError::Config(format!("store.url: {e}")))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    // No retry inside the manager: an operation would sit through its backoff
                    // only to fail anyway, while the caller already retries with its own
                    // capped backoff (and reports the store down meanwhile).
                    .set_number_of_retries(0);
                Target::Single { client, config }
            }
            StoreUrl::Cluster(urls) => {
                let mut builder = ClusterClient::builder(urls.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout);
                if let Some(certs) = certs {
                    builder = builder.certs(certs);
                }
                let client = builder
                    .build()
                    .map_err(|e| StoreError::Config(format!("store.url: {e}")))?;
                let config = ClusterConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout);
                Target::Cluster { client, config }
            }
        };
        let conn = target.connect()?;
        let label = match urls.as_slice() {
            [one] => crate::config::redact_url(one),
            many => format!(
                "cluster [{}]",
                many.iter()
                    .map(|u| crate::config::redact_url(u))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                target,
                timeout,
                slot: Mutex::new(Slot {
                    generation: 0,
                    conn,
                }),
                scripts: Scripts::new(),
                prefix: cfg.key_prefix.clone(),
                tables: Mutex::new(HashMap::new()),
                legacy: Mutex::new(HashMap::new()),
                commands: AtomicU64::new(0),
                label,
            }),
        })
    }

    /// See `Store::claim`.
    pub async fn claim(
        &self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        owner: &Owner,
        lease: Duration,
        slide: Option<Duration>,
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        let placed = self.place(keys, bodies, true);
        let head = [
            owner.token().to_owned(),
            px_millis(lease).to_string(),
            owner.instance_prefix(),
            owner.epoch().to_string(),
            slide.map_or_else(|| "0".to_owned(), |w| px_millis(w).to_string()),
        ];
        let scripts = &self.inner.scripts;
        self.bounded(move |mut conn| async move {
            let mut outcomes: Vec<Option<ClaimOutcome>> = vec![None; keys.len()];
            let mut placed = placed;
            // On a cluster a key's 0.1 name is in another slot than its table: probe it first,
            // on its own (only while the route may still have such keys).
            if matches!(conn, Conn::Cluster(_)) {
                let probes = placed.iter().enumerate().filter_map(|(i, p)| {
                    let name = p.legacy.clone()?;
                    let mut conn = conn.clone();
                    Some(async move {
                        let cmd = calls::evalsha(&scripts.legacy_probe, &[&name], &[]);
                        let reply =
                            calls::eval(&mut conn, &scripts.legacy_probe, &cmd, &|n| self.sent(n))
                                .await;
                        (i, reply)
                    })
                });
                for (i, reply) in futures::future::join_all(probes).await {
                    let values = array(reply?)?;
                    let outcome = parse_claim(&values)?;
                    if outcome != ClaimOutcome::Claimed {
                        outcomes[i] = Some(outcome);
                    }
                }
                for p in &mut placed {
                    p.legacy = None;
                }
            }
            let (rest, todo): (Vec<usize>, Vec<calls::Placed>) = placed
                .into_iter()
                .enumerate()
                .filter(|(i, _)| outcomes[*i].is_none())
                .unzip();
            let replies = calls::run(
                &mut conn,
                &scripts.claim,
                &head,
                &todo,
                calls::PerKey::LegacyAndBody,
                2,
                &|n| self.sent(n),
            )
            .await?;
            for (i, values) in rest.into_iter().zip(replies) {
                outcomes[i] = Some(parse_claim(&values)?);
            }
            outcomes
                .into_iter()
                .map(|o| o.ok_or_else(|| unexpected("a key without outcome".into())))
                .collect()
        })
        .await
    }

    /// See `Store::commit`.
    pub async fn commit(
        &self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        owner: &Owner,
        window: Duration,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let placed = self.place(keys, bodies, false);
        let head = [
            owner.token().to_owned(),
            px_millis(window).to_string(),
            SPLIT_ALPHA.to_string(),
        ];
        let script = &self.inner.scripts.commit;
        self.bounded(move |mut conn| async move {
            let replies = calls::run(
                &mut conn,
                script,
                &head,
                &placed,
                calls::PerKey::Body,
                1,
                &|n| self.sent(n),
            )
            .await?;
            replies
                .into_iter()
                .map(|v| {
                    let code = parse_int(&v[0])?;
                    CommitOutcome::from_code(code)
                        .ok_or_else(|| unexpected(format!("commit script returned {code}")))
                })
                .collect()
        })
        .await
    }

    /// See `Store::renew`.
    pub async fn renew(
        &self,
        keys: &[String],
        owner: &Owner,
        lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        let head = [owner.token().to_owned(), px_millis(lease).to_string()];
        self.compare_and(&self.inner.scripts.renew, keys, &head)
            .await
    }

    /// See `Store::release`.
    pub async fn release(&self, keys: &[String], owner: &Owner) -> Result<Vec<bool>, StoreError> {
        let head = [owner.token().to_owned()];
        self.compare_and(&self.inner.scripts.release, keys, &head)
            .await
    }

    /// Runs a compare-on-token script (release or renew) on the claims of `keys`.
    async fn compare_and(
        &self,
        script: &Script,
        keys: &[String],
        head: &[String],
    ) -> Result<Vec<bool>, StoreError> {
        let placed = self.place(keys, &[], false);
        self.bounded(move |mut conn| async move {
            let replies = calls::run(
                &mut conn,
                script,
                head,
                &placed,
                calls::PerKey::Bare,
                1,
                &|n| self.sent(n),
            )
            .await?;
            replies
                .into_iter()
                .map(|v| parse_int(&v[0]).map(|n| n == 1))
                .collect()
        })
        .await
    }

    /// See `Store::eviction_risk`: `CONFIG GET maxmemory-policy` on the server, or on every
    /// primary of a cluster. A server that refuses CONFIG (managed services rename it) is an
    /// error the caller reports as "cannot verify".
    pub async fn eviction_risk(&self) -> Result<Option<String>, StoreError> {
        let policies = self.config_get("maxmemory-policy").await?;
        Ok(policies.into_iter().find(|p| p != "noeviction"))
    }

    /// See `Store::layout_risk`: `hash-max-listpack-entries` and `-value` on every primary.
    pub async fn layout_risk(&self) -> Result<Option<String>, StoreError> {
        let entries = self.config_get("hash-max-listpack-entries").await?;
        let values = self.config_get("hash-max-listpack-value").await?;
        let below = |values: &[String], least: u64| {
            values
                .iter()
                .filter_map(|v| v.parse::<u64>().ok())
                .find(|&v| v < least)
        };
        Ok(match (below(&entries, 128), below(&values, 16)) {
            (Some(n), _) => Some(format!(
                "hash-max-listpack-entries is {n}: dedupd's shards hold up to about 110 fields, \
                 and a larger hash is stored as a hash table at about four times the memory per \
                 key; set it to 128 (the default) or more"
            )),
            (None, Some(n)) => Some(format!(
                "hash-max-listpack-value is {n}: dedupd's 15-byte fields do not fit a listpack, \
                 which costs about four times the memory per key; set it to 64 (the default)"
            )),
            (None, None) => None,
        })
    }

    /// `CONFIG GET parameter` on the server, or on every primary of a cluster: its values.
    async fn config_get(&self, parameter: &str) -> Result<Vec<String>, StoreError> {
        self.bounded(|mut conn| async move {
            let mut cmd = ::redis::cmd("CONFIG");
            cmd.arg("GET").arg(parameter);
            self.sent(1);
            let reply = match &mut conn {
                Conn::Single(c) => cmd.query_async::<Value>(c).await?,
                Conn::Cluster(c) => {
                    use ::redis::cluster_routing::{
                        MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo,
                    };
                    let routing = RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllMasters,
                        Some(ResponsePolicy::CombineArrays),
                    ));
                    c.route_command(cmd, routing).await?
                }
            };
            let fields = match reply {
                Value::Array(items) => items,
                Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                other => return Err(unexpected(format!("CONFIG GET returned {other:?}"))),
            };
            let values: Vec<String> = fields
                .chunks(2)
                .filter_map(|pair| match pair.get(1) {
                    Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                    Some(Value::SimpleString(s)) => Some(s.clone()),
                    _ => None,
                })
                .collect();
            if values.is_empty() {
                return Err(unexpected(format!("CONFIG GET {parameter}: no value")));
            }
            Ok(values)
        })
        .await
    }

    /// See `Store::size`: each route's remembered keys from its tables' own counters (exact
    /// for done keys, including keys whose window ended since the sweeper last passed, at most
    /// `window / 8` of them; in-flight claims and keys of the 0.1 layout are not counted), and
    /// `used_memory` (summed over a cluster's primaries). Six `HGET`s per route and one `INFO`:
    /// one pipeline on a single server, concurrent commands on a cluster.
    pub async fn size(&self, prefix: &str, routes: &[String]) -> Result<StoreSize, StoreError> {
        let metas: Vec<Vec<String>> = routes
            .iter()
            .map(|route| {
                let tables = self.tables_with_prefix(prefix, route);
                (0..layout::GROUPS).map(|g| tables.meta(g)).collect()
            })
            .collect();
        let metas = &metas;
        self.bounded(move |mut conn| async move {
            let flat: Vec<&String> = metas.iter().flatten().collect();
            let (counts, info) = match &mut conn {
                Conn::Single(c) => {
                    let mut pipe = Pipeline::new();
                    pipe.cmd("INFO").arg("memory");
                    for meta in &flat {
                        pipe.hget(*meta, "c");
                    }
                    self.sent(1 + flat.len() as u64);
                    let mut replies: Vec<Value> = pipe.query_async(c).await?;
                    if replies.len() != 1 + flat.len() {
                        return Err(unexpected("short pipeline reply".into()));
                    }
                    let counts = replies.split_off(1);
                    (counts, replies.remove(0))
                }
                Conn::Cluster(c) => {
                    use ::redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
                    let mut info = ::redis::cmd("INFO");
                    info.arg("memory");
                    // No response policy: a map of each primary's answer, summed below.
                    let routing =
                        RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                    let info = c.route_command(info, routing).await?;
                    self.sent(1 + flat.len() as u64);
                    let counts = futures::future::join_all(flat.iter().map(|meta| {
                        let mut c = c.clone();
                        async move {
                            ::redis::cmd("HGET")
                                .arg(*meta)
                                .arg("c")
                                .query_async::<Value>(&mut c)
                                .await
                        }
                    }))
                    .await
                    .into_iter()
                    .collect::<RedisResult<Vec<Value>>>()?;
                    (counts, info)
                }
            };
            let mut counts = counts.iter();
            let keys = metas
                .iter()
                .map(|tables| {
                    counts
                        .by_ref()
                        .take(tables.len())
                        .map(|v| parse_count(v).map(|n| u64::try_from(n).unwrap_or(0)))
                        .sum::<RedisResult<u64>>()
                })
                .collect::<RedisResult<Vec<u64>>>()?;
            Ok(StoreSize {
                keys,
                exact: false,
                memory_bytes: used_memory(&info)?,
            })
        })
        .await
    }

    /// The URL(s) without passwords.
    pub fn label(&self) -> String {
        self.inner.label.clone()
    }

    /// See `Store::inspect`: the key's table (remembered field and claim) and its 0.1 name.
    pub async fn inspect(&self, key: &str) -> Result<KeyState, StoreError> {
        let placed = self.place(std::slice::from_ref(&key.to_owned()), &[], false);
        let script = &self.inner.scripts.inspect;
        self.bounded(move |mut conn| async move {
            let p = &placed[0];
            let cmd = calls::evalsha(
                script,
                &[&p.meta],
                &[b"1", &p.field, &layout::hex(&p.field)],
            );
            let values = array(calls::eval(&mut conn, script, &cmd, &|n| self.sent(n)).await?)?;
            let [owner, lease, left] = values.as_slice() else {
                return Err(unexpected(format!("inspect returned {values:?}")));
            };
            let left = parse_int(left)?;
            if left >= 0 {
                return Ok(KeyState::Done {
                    window_left: ttl_left(left),
                });
            }
            if let Value::BulkString(owner) = owner {
                return Ok(KeyState::InFlight {
                    owner: String::from_utf8_lossy(owner).into_owned(),
                    lease_left: ttl_left(parse_int(lease)?),
                });
            }
            // The 0.1 layout: the key itself, GET and PTTL in one pipeline (one slot).
            let mut pipe = Pipeline::new();
            pipe.get(key).pttl(key);
            self.sent(2);
            let (value, pttl): (Option<String>, i64) = pipe.query_async(&mut conn).await?;
            Ok(match value {
                None => KeyState::Absent,
                Some(_) if pttl == -2 => KeyState::Absent,
                Some(v) if v == "1" => KeyState::Done {
                    window_left: ttl_left(pttl),
                },
                Some(owner) => KeyState::InFlight {
                    owner,
                    lease_left: ttl_left(pttl),
                },
            })
        })
        .await
    }

    /// See `Store::forget`: the remembered field, the claim, and the 0.1 name.
    pub async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        let placed = self.place(std::slice::from_ref(&key.to_owned()), &[], false);
        let script = &self.inner.scripts.forget;
        self.bounded(move |mut conn| async move {
            let p = &placed[0];
            let cmd = calls::evalsha(
                script,
                &[&p.meta],
                &[b"1", &p.field, &layout::hex(&p.field)],
            );
            let found = parse_int(&calls::eval(&mut conn, script, &cmd, &|n| self.sent(n)).await?)?;
            self.sent(1);
            let legacy: i64 = ::redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
            Ok(found + legacy > 0)
        })
        .await
    }

    /// Places `keys` (with their `bodies`, one per key or none) in their tables; `claiming`
    /// adds the 0.1 names a claim must also read.
    fn place(
        &self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        claiming: bool,
    ) -> Vec<calls::Placed> {
        calls::place(
            keys,
            bodies,
            &self.inner.prefix,
            |route| self.tables_with_prefix(&self.inner.prefix, route),
            |route| claiming && self.legacy_possible(route),
        )
    }

    /// The table names of `route` under `prefix` (cached for the store's own prefix).
    fn tables_with_prefix(&self, prefix: &str, route: &str) -> Arc<Tables> {
        if prefix != self.inner.prefix {
            return Arc::new(Tables::new(prefix, route));
        }
        let mut tables = self
            .inner
            .tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        tables
            .entry(route.to_owned())
            .or_insert_with(|| Arc::new(Tables::new(prefix, route)))
            .clone()
    }

    /// Whether keys of `route` may still exist in the 0.1 layout.
    pub fn legacy_possible(&self, route: &str) -> bool {
        let legacy = self
            .inner
            .legacy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match legacy.get(route).copied().unwrap_or(Legacy::Unknown) {
            Legacy::Unknown => true,
            Legacy::Until(ms) => now_ms() < ms,
        }
    }

    /// Records what the upgrade check found for `route`.
    fn set_legacy(&self, route: &str, state: Legacy) {
        self.inner
            .legacy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(route.to_owned(), state);
    }

    /// Counts `n` commands sent.
    fn sent(&self, n: u64) {
        self.inner.commands.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::STORE_COMMANDS).increment(n);
    }

    /// Commands sent to Redis so far by this store (each script call is one).
    pub fn commands_sent(&self) -> u64 {
        self.inner.commands.load(Ordering::Relaxed)
    }

    /// Starts the background upkeep (upgrade check, then sweeper) of each `(route, window)`
    /// on `tracker`; the tasks end on `shutdown`.
    pub fn start_upkeep(
        &self,
        routes: &[(String, Duration)],
        tracker: &tokio_util::task::TaskTracker,
        shutdown: &CancellationToken,
    ) {
        tracker.spawn(upkeep::warn_layout_risk(self.clone(), shutdown.clone()));
        for (route, window) in routes {
            tracker.spawn(upkeep::run(
                self.clone(),
                route.clone(),
                *window,
                shutdown.clone(),
            ));
        }
    }

    /// See `Store::ping`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(
            |mut conn| async move { ::redis::cmd("PING").query_async::<()>(&mut conn).await },
        )
        .await
    }

    /// Runs `op` on the current connection within `store.timeout`, and replaces the
    /// connection when the failure says it is unusable (see the module docs).
    async fn bounded<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (generation, conn) = {
            let slot = self.lock_slot();
            (slot.generation, slot.conn.clone())
        };
        match tokio::time::timeout(self.inner.timeout, op(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if needs_new_connection(&e) {
                    self.replace(generation, &e.to_string());
                }
                Err(StoreError::Redis(e))
            }
            Err(_) => {
                self.replace(generation, "timed out");
                Err(StoreError::Timeout(self.inner.timeout))
            }
        }
    }

    fn replace(&self, failed_generation: u64, why: &str) {
        let mut slot = self.lock_slot();
        if slot.generation != failed_generation {
            // Someone else already replaced it after the same failure.
            return;
        }
        match self.inner.target.connect() {
            Ok(conn) => {
                slot.conn = conn;
                slot.generation += 1;
                tracing::debug!(generation = slot.generation, why, "redis: new connection");
            }
            Err(e) => tracing::warn!(error = %e, "redis: cannot build a new connection"),
        }
    }

    fn lock_slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        // The guarded section only swaps a handle; a panic there leaves a usable value.
        self.inner
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Target {
    /// A new connection that connects on first use (needs a tokio runtime, no network).
    fn connect(&self) -> Result<Conn, StoreError> {
        match self {
            Target::Single { client, config } => {
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map(Conn::Single)
                    .map_err(|e| StoreError::Config(format!("store.url: {e}")))
            }
            Target::Cluster { client, config } => Ok(Conn::Cluster(
                client.get_pending_async_connection_with_config(config.clone()),
            )),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Whether `e` means the connection itself is unusable and will not heal by itself.
fn needs_new_connection(e: &RedisError) -> bool {
    match e.kind() {
        // A dropped or refused socket: the manager and the cluster client reconnect on their
        // own. Other I/O errors (a response timeout on a silent socket) they do not.
        ErrorKind::Io => !e.is_connection_dropped(),
        ErrorKind::Parse
        | ErrorKind::AuthenticationFailed
        | ErrorKind::ClusterConnectionNotFound => true,
        // A server that is loading, lost its master, or became a replica in a failover: a
        // new connection may reach the new primary (single node behind a moving address).
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::ClusterDown,
        ) => true,
        // Answers to our commands (script errors, NOSCRIPT, OOM under noeviction, ...): the
        // connection is fine.
        _ => false,
    }
}

fn array(reply: Value) -> RedisResult<Vec<Value>> {
    match reply {
        Value::Array(items) => Ok(items),
        other => Err(unexpected(format!("script returned {other:?}"))),
    }
}

fn parse_claim(reply: &[Value]) -> RedisResult<ClaimOutcome> {
    let [code, pttl] = reply else {
        return Err(unexpected(format!("claim returned {reply:?}")));
    };
    Ok(match parse_int(code)? {
        0 => ClaimOutcome::Claimed,
        1 => ClaimOutcome::Done,
        2 => ClaimOutcome::Ours,
        3 => ClaimOutcome::TakenOver,
        4 => ClaimOutcome::InFlightElsewhere {
            lease_left: ttl_left(parse_int(pttl)?),
        },
        5 => ClaimOutcome::Conflict,
        other => return Err(unexpected(format!("claim script returned {other}"))),
    })
}

/// A table's count field: absent (no table yet) is 0.
fn parse_count(reply: &Value) -> RedisResult<i64> {
    match reply {
        Value::Nil => Ok(0),
        Value::Int(n) => Ok(*n),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| unexpected("a table count that is not a number".into())),
        other => Err(unexpected(format!("expected a count, got {other:?}"))),
    }
}

/// Unix time in ms (the upgrade marker's unit).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `used_memory` from an `INFO memory` reply; summed over the primaries for a cluster's map of
/// answers (one per primary).
fn used_memory(reply: &Value) -> RedisResult<u64> {
    let text = match reply {
        Value::BulkString(b) => String::from_utf8_lossy(b),
        Value::VerbatimString { text, .. } => text.as_str().into(),
        Value::SimpleString(s) => s.as_str().into(),
        Value::Map(answers) => {
            return answers
                .iter()
                .try_fold(0u64, |sum, (_, answer)| Ok(sum + used_memory(answer)?))
        }
        other => return Err(unexpected(format!("INFO returned {other:?}"))),
    };
    text.lines()
        .find_map(|line| line.trim_end().strip_prefix("used_memory:"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| unexpected("INFO memory has no used_memory".into()))
}

fn parse_int(reply: &Value) -> RedisResult<i64> {
    match reply {
        Value::Int(n) => Ok(*n),
        other => Err(unexpected(format!("expected an integer, got {other:?}"))),
    }
}

/// A PTTL reply as a duration: -1 (no expiry) is "forever", anything else negative is none.
fn ttl_left(pttl: i64) -> Duration {
    match pttl {
        -1 => Duration::MAX,
        ms => Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
    }
}

fn unexpected(detail: String) -> RedisError {
    RedisError::from((
        ErrorKind::UnexpectedReturnType,
        "unexpected reply from a dedupd script",
        detail,
    ))
}

/// Reads the TLS files into redis-rs' form; every URL must be `rediss://`, or the settings
/// would silently not apply.
fn load_tls(tls: &Tls, urls: &[&str]) -> Result<TlsCertificates, StoreError> {
    if let Some(url) = urls.iter().find(|u| !u.starts_with("rediss://")) {
        let shown = url_host(url);
        return Err(StoreError::Config(format!(
            "store.tls is set but {shown} is not a rediss:// url"
        )));
    }
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path)
            .map_err(|e| StoreError::Config(format!("store.tls.{what} {}: {e}", path.display())))
    };
    let root_cert = tls
        .ca_file
        .as_deref()
        .map(|p| read(p, "ca_file"))
        .transpose()?;
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read(cert, "cert_file")?,
            client_key: read(key, "key_file")?,
        }),
        (None, None) => None,
        _ => {
            return Err(StoreError::Config(
                "store.tls: cert_file and key_file go together (mutual TLS needs both)".into(),
            ))
        }
    };
    Ok(TlsCertificates {
        client_tls,
        root_cert,
    })
}

/// The scheme and host of `url` only, so a password never reaches an error message.
fn url_host(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let host = host.split('/').next().unwrap_or(host);
    format!("{scheme}://{host}")
}
