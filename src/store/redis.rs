//! Redis and Redis Cluster backend of the store: the Lua scripts of the claim protocol (see the
//! parent module for what they decide and why), how a batch is sent, and the connection's life.
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
//! # Batches
//!
//! Single node: all script calls of a batch go out as one pipeline, one round trip, replies in
//! key order. Redis runs them one after another, so a key repeated in a batch sees its earlier
//! claim.
//!
//! Cluster: redis-rs 1.8 does not split a pipeline across nodes (it routes the whole pipeline
//! by its first key and the rest fail with CROSSSLOT, see `route_for_pipeline` in
//! `cluster_handling/async_connection/routing.rs`), and the keys of a batch hash to different
//! slots. So each key gets its own call, all issued concurrently over the multiplexed cluster
//! connection: still about one round trip of wall time. Calls for a repeated key run one after
//! the other, so it still sees its earlier claim.
//!
//! # Scripts
//!
//! Scripts are called with EVALSHA, so a batch carries 40-byte hashes rather than the script
//! text. Redis answers NOSCRIPT when its script cache is empty (restart, failover, `SCRIPT
//! FLUSH`); the pipeline runs with `ignore_errors` so those replies can be told apart from other
//! errors, and exactly the calls that got NOSCRIPT are sent again once after a `SCRIPT LOAD`
//! (a call that got NOSCRIPT did not run, so resending it is safe). redis-rs only does this by
//! itself for a lone `ScriptInvocation`, not inside a pipeline.
//!
//! # TLS
//!
//! `rediss://` uses the webpki roots, or `store.tls.ca_file` when given; `cert_file` and
//! `key_file` add a client certificate (mutual TLS). They are read once, at open.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClient, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    Client, ClientTlsConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult,
    Script, ServerErrorKind, TlsCertificates, Value,
};

use super::{px_millis, ClaimOutcome, KeyState, Owner, StoreError};
use crate::config::{StoreConfig, StoreUrl, Tls};

/// KEYS[1] key; ARGV: token, lease ms, instance prefix, our epoch.
/// Returns {0} claimed, {1} done, {2} ours, {3} taken over, {4, pttl} in flight elsewhere.
const CLAIM_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {0}
end
if v == '1' then
  return {1}
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {2}
end
local prefix = ARGV[3]
if string.sub(v, 1, #prefix) == prefix then
  -- Epochs are decimal u64: compare by length, then by digits (exact, unlike Lua numbers).
  local theirs = string.sub(v, #prefix + 1)
  local ours = ARGV[4]
  if string.match(theirs, '^%d+$') then
    theirs = (string.gsub(theirs, '^0+(%d)', '%1'))
    if #theirs < #ours or (#theirs == #ours and theirs < ours) then
      redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
      return {3}
    end
  end
end
return {4, redis.call('PTTL', KEYS[1])}
";

/// KEYS[1] key; ARGV: token, window ms. 1 if committed, 0 if the key is no longer ours.
const COMMIT_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
  return 1
end
return 0
";

/// KEYS[1] key; ARGV: token. 1 if deleted, 0 if the key is no longer ours.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The Redis store. Cloning shares the connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    timeout: Duration,
    slot: Mutex<Slot>,
    claim: Script,
    commit: Script,
    release: Script,
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
        Ok(Self {
            inner: Arc::new(Inner {
                target,
                timeout,
                slot: Mutex::new(Slot {
                    generation: 0,
                    conn,
                }),
                claim: Script::new(CLAIM_LUA),
                commit: Script::new(COMMIT_LUA),
                release: Script::new(RELEASE_LUA),
            }),
        })
    }

    /// See `Store::claim`.
    pub async fn claim(
        &self,
        keys: &[String],
        owner: &Owner,
        lease: Duration,
    ) -> Result<Vec<ClaimOutcome>, StoreError> {
        let script = &self.inner.claim;
        let prefix = owner.instance_prefix();
        let epoch = owner.epoch().to_string();
        let lease = px_millis(lease);
        let cmds: Vec<Cmd> = keys
            .iter()
            .map(|key| {
                let mut cmd = evalsha(script, key);
                cmd.arg(owner.token()).arg(lease).arg(&prefix).arg(&epoch);
                cmd
            })
            .collect();
        let cmds = &cmds;
        self.bounded(move |mut conn| async move {
            let replies = eval_all(&mut conn, script, keys, cmds).await?;
            replies.into_iter().map(parse_claim).collect()
        })
        .await
    }

    /// See `Store::commit`.
    pub async fn commit(
        &self,
        keys: &[String],
        owner: &Owner,
        window: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        let window = px_millis(window);
        self.compare_and(&self.inner.commit, keys, owner, Some(window))
            .await
    }

    /// See `Store::release`.
    pub async fn release(&self, keys: &[String], owner: &Owner) -> Result<Vec<bool>, StoreError> {
        self.compare_and(&self.inner.release, keys, owner, None)
            .await
    }

    /// Runs a compare-on-token script (commit or release) for every key.
    async fn compare_and(
        &self,
        script: &Script,
        keys: &[String],
        owner: &Owner,
        px: Option<u64>,
    ) -> Result<Vec<bool>, StoreError> {
        let cmds: Vec<Cmd> = keys
            .iter()
            .map(|key| {
                let mut cmd = evalsha(script, key);
                cmd.arg(owner.token());
                if let Some(px) = px {
                    cmd.arg(px);
                }
                cmd
            })
            .collect();
        let cmds = &cmds;
        self.bounded(move |mut conn| async move {
            let replies = eval_all(&mut conn, script, keys, cmds).await?;
            replies
                .into_iter()
                .map(|v| parse_int(&v).map(|n| n == 1))
                .collect()
        })
        .await
    }

    /// See `Store::inspect`: GET and PTTL in one pipeline (same key, so same slot in a
    /// cluster).
    pub async fn inspect(&self, key: &str) -> Result<KeyState, StoreError> {
        self.bounded(move |mut conn| async move {
            let mut pipe = Pipeline::new();
            pipe.get(key).pttl(key);
            let (value, pttl): (Option<String>, i64) = pipe.query_async(&mut conn).await?;
            // PTTL -2: the key vanished between the two commands.
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

    /// See `Store::forget`.
    pub async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        self.bounded(move |mut conn| async move {
            let deleted: i64 = ::redis::cmd("DEL").arg(key).query_async(&mut conn).await?;
            Ok(deleted > 0)
        })
        .await
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

/// `EVALSHA <sha> 1 <key>`, ready for the script's arguments.
fn evalsha(script: &Script, key: &str) -> Cmd {
    let mut cmd = ::redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(1).arg(key);
    cmd
}

/// Sends every command (`cmds[i]` runs the script on `keys[i]`) and returns the replies in
/// order; calls that found the script missing are sent again once after loading it.
async fn eval_all(
    conn: &mut Conn,
    script: &Script,
    keys: &[String],
    cmds: &[Cmd],
) -> RedisResult<Vec<Value>> {
    let all: Vec<usize> = (0..cmds.len()).collect();
    let mut replies = send(conn, keys, cmds, &all).await?;
    let missing: Vec<usize> = replies
        .iter()
        .enumerate()
        .filter(|(_, reply)| is_noscript(reply))
        .map(|(i, _)| i)
        .collect();
    if !missing.is_empty() {
        tracing::debug!(calls = missing.len(), "redis: NOSCRIPT, loading the script");
        script.prepare_invoke().load_async(conn).await?;
        let retried = send(conn, keys, cmds, &missing).await?;
        for (i, reply) in missing.into_iter().zip(retried) {
            replies[i] = reply;
        }
    }
    replies.into_iter().collect()
}

fn is_noscript(reply: &RedisResult<Value>) -> bool {
    matches!(reply, Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
}

/// Sends `cmds[i]` for each `i` in `which`; one reply (or server error) per command, in the
/// order of `which`. An `Err` of the whole call means no reply can be trusted.
async fn send(
    conn: &mut Conn,
    keys: &[String],
    cmds: &[Cmd],
    which: &[usize],
) -> RedisResult<Vec<RedisResult<Value>>> {
    match conn {
        Conn::Single(manager) => {
            let mut pipe = Pipeline::with_capacity(which.len());
            pipe.ignore_errors();
            for &i in which {
                pipe.add_command(cmds[i].clone());
            }
            let replies: Vec<Value> = pipe.query_async(manager).await?;
            if replies.len() != which.len() {
                return Err(unexpected(format!(
                    "{} replies to {} commands",
                    replies.len(),
                    which.len()
                )));
            }
            Ok(replies
                .into_iter()
                .map(|reply| match reply {
                    Value::ServerError(e) => Err(e.into()),
                    other => Ok(other),
                })
                .collect())
        }
        Conn::Cluster(cluster) => {
            // One chain per distinct key, so a repeated key's calls stay in order; distinct
            // keys (different slots, often different nodes) run concurrently.
            let mut chains: Vec<Vec<usize>> = Vec::new();
            let mut chain_of: HashMap<&str, usize> = HashMap::with_capacity(which.len());
            for (pos, &i) in which.iter().enumerate() {
                let chain = *chain_of.entry(keys[i].as_str()).or_insert_with(|| {
                    chains.push(Vec::new());
                    chains.len() - 1
                });
                chains[chain].push(pos);
            }
            let runs = chains.into_iter().map(|chain| {
                let mut cluster = cluster.clone();
                async move {
                    let mut out = Vec::with_capacity(chain.len());
                    for pos in chain {
                        let reply = cmds[which[pos]].query_async::<Value>(&mut cluster).await;
                        out.push((pos, reply));
                    }
                    out
                }
            });
            let mut replies: Vec<Option<RedisResult<Value>>> =
                std::iter::repeat_with(|| None).take(which.len()).collect();
            for (pos, reply) in futures::future::join_all(runs).await.into_iter().flatten() {
                replies[pos] = Some(reply);
            }
            Ok(replies
                .into_iter()
                .map(|reply| reply.unwrap_or_else(|| Err(unexpected("missing reply".into()))))
                .collect())
        }
    }
}

fn parse_claim(reply: Value) -> RedisResult<ClaimOutcome> {
    let items = match reply {
        Value::Array(items) => items,
        other => return Err(unexpected(format!("claim script returned {other:?}"))),
    };
    let code = items.first().map(parse_int).transpose()?;
    Ok(match code {
        Some(0) => ClaimOutcome::Claimed,
        Some(1) => ClaimOutcome::Done,
        Some(2) => ClaimOutcome::Ours,
        Some(3) => ClaimOutcome::TakenOver,
        Some(4) => {
            let pttl = items.get(1).map(parse_int).transpose()?.unwrap_or(0);
            ClaimOutcome::InFlightElsewhere {
                lease_left: ttl_left(pttl),
            }
        }
        _ => return Err(unexpected(format!("claim script returned {items:?}"))),
    })
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
