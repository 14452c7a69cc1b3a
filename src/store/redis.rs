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
//! Each script takes a whole batch of keys (`KEYS`) and loops over them, so on a single node a
//! batch of claims (or commits, or releases) is one EVALSHA: one command and one round trip,
//! however many keys. The script is atomic and handles keys in order, so a key repeated in a
//! batch sees its earlier claim. A batch of a few hundred keys keeps Redis busy for well under
//! a millisecond.
//!
//! Cluster: a script may only touch keys of one slot, and redis-rs 1.8 does not split a
//! pipeline across nodes either (it routes the whole pipeline by its first key, see
//! `route_for_pipeline` in `cluster_handling/async_connection/routing.rs`). So each key is its
//! own call of the same script, all issued concurrently over the multiplexed cluster
//! connection: still about one round trip of wall time, but one command per key. Calls for a
//! repeated key run one after the other, so it still sees its earlier claim.
//!
//! # Scripts
//!
//! Scripts are called with EVALSHA, so a call carries a 40-byte hash rather than the script
//! text. Redis answers NOSCRIPT when its script cache is empty (restart, failover, `SCRIPT
//! FLUSH`); the call is then sent again once after a `SCRIPT LOAD` (to every primary in a
//! cluster). A call that got NOSCRIPT did not run, so resending it is safe.
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

use super::{
    px_millis, route_index, route_lookup, ClaimOutcome, CommitOutcome, KeyState, Owner, StoreError,
    StoreSize, SIZE_SAMPLES,
};
use crate::config::{StoreConfig, StoreUrl, Tls};

/// KEYS: the batch; ARGV: token, lease ms, instance prefix, our epoch. Two values per key:
/// {0, 0} claimed, {1, 0} done, {2, 0} ours, {3, 0} taken over, {4, pttl} in flight elsewhere.
/// Keys are handled in order, so a key repeated in the batch sees its earlier claim.
const CLAIM_LUA: &str = r"
local token, lease, prefix, ours = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  local code, pttl = 4, 0
  if not v then
    redis.call('SET', key, token, 'PX', lease)
    code = 0
  elseif v == '1' then
    code = 1
  elseif v == token then
    redis.call('PEXPIRE', key, lease)
    code = 2
  else
    if string.sub(v, 1, #prefix) == prefix then
      -- Epochs are decimal u64: compare by length, then by digits (exact, unlike Lua numbers).
      local theirs = string.sub(v, #prefix + 1)
      if string.match(theirs, '^%d+$') then
        theirs = (string.gsub(theirs, '^0+(%d)', '%1'))
        if #theirs < #ours or (#theirs == #ours and theirs < ours) then
          redis.call('SET', key, token, 'PX', lease)
          code = 3
        end
      end
    end
    if code == 4 then
      pttl = redis.call('PTTL', key)
    end
  end
  out[2 * i - 1] = code
  out[2 * i] = pttl
end
return out
";

/// KEYS: the batch; ARGV: token, window ms. Per key: 0 committed (ours), 1 restored (absent),
/// 2 done already (left alone), 3 overrode another owner's claim. See `CommitOutcome`.
const COMMIT_LUA: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('GET', key)
  if v == '1' then
    out[i] = 2
  else
    redis.call('SET', key, '1', 'PX', ARGV[2])
    if v == ARGV[1] then
      out[i] = 0
    elseif not v then
      out[i] = 1
    else
      out[i] = 3
    end
  end
end
return out
";

/// KEYS: the batch; ARGV: token, lease ms. Per key: 1 if the lease was extended, 0 if the key
/// no longer carries the token. PEXPIRE is not refused by a full Redis (noeviction), SET is.
const RENEW_LUA: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    out[i] = redis.call('PEXPIRE', key, ARGV[2])
  else
    out[i] = 0
  end
end
return out
";

/// KEYS: the batch; ARGV: token. Per key: 1 if deleted, 0 if no longer ours.
const RELEASE_LUA: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    out[i] = redis.call('DEL', key)
  else
    out[i] = 0
  end
end
return out
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
    renew: Script,
    /// The URL(s) without passwords, for log lines.
    label: String,
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
                claim: Script::new(CLAIM_LUA),
                commit: Script::new(COMMIT_LUA),
                release: Script::new(RELEASE_LUA),
                renew: Script::new(RENEW_LUA),
                label,
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
        let args = [
            owner.token().to_owned(),
            px_millis(lease).to_string(),
            owner.instance_prefix(),
            owner.epoch().to_string(),
        ];
        let script = &self.inner.claim;
        self.bounded(move |mut conn| async move {
            let replies = eval_batch(&mut conn, script, keys, &args, 2).await?;
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
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let args = [owner.token().to_owned(), px_millis(window).to_string()];
        let script = &self.inner.commit;
        self.bounded(move |mut conn| async move {
            let replies = eval_batch(&mut conn, script, keys, &args, 1).await?;
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
        self.compare_and(&self.inner.renew, keys, owner, Some(px_millis(lease)))
            .await
    }

    /// See `Store::release`.
    pub async fn release(&self, keys: &[String], owner: &Owner) -> Result<Vec<bool>, StoreError> {
        self.compare_and(&self.inner.release, keys, owner, None)
            .await
    }

    /// Runs a compare-on-token script (release or renew) for every key.
    async fn compare_and(
        &self,
        script: &Script,
        keys: &[String],
        owner: &Owner,
        px: Option<u64>,
    ) -> Result<Vec<bool>, StoreError> {
        let mut args = vec![owner.token().to_owned()];
        args.extend(px.map(|px| px.to_string()));
        self.bounded(move |mut conn| async move {
            let replies = eval_batch(&mut conn, script, keys, &args, 1).await?;
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
        self.bounded(|mut conn| async move {
            let mut cmd = ::redis::cmd("CONFIG");
            cmd.arg("GET").arg("maxmemory-policy");
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
            let policies: Vec<String> = fields
                .chunks(2)
                .filter_map(|pair| match pair.get(1) {
                    Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                    Some(Value::SimpleString(s)) => Some(s.clone()),
                    _ => None,
                })
                .collect();
            if policies.is_empty() {
                return Err(unexpected("CONFIG GET maxmemory-policy: no value".into()));
            }
            Ok(policies.into_iter().find(|p| p != "noeviction"))
        })
        .await
    }

    /// See `Store::size` (and the parent module for the estimate): one pipeline of `DBSIZE`,
    /// `INFO memory` and [`SIZE_SAMPLES`] `RANDOMKEY`s on a single server. In a cluster,
    /// `DBSIZE` and `INFO` go to every primary (summed), and each `RANDOMKEY` is answered by one
    /// primary; they are sent concurrently, so it is still about one round trip of wall time.
    pub async fn size(&self, prefix: &str, routes: &[String]) -> Result<StoreSize, StoreError> {
        let lookup = route_lookup(routes);
        let (dbsize, memory_bytes, samples) = self
            .bounded(|mut conn| async move {
                match &mut conn {
                    Conn::Single(c) => {
                        let mut pipe = Pipeline::new();
                        pipe.cmd("DBSIZE").cmd("INFO").arg("memory");
                        for _ in 0..SIZE_SAMPLES {
                            pipe.cmd("RANDOMKEY");
                        }
                        let mut replies: Vec<Value> = pipe.query_async(c).await?;
                        if replies.len() != 2 + SIZE_SAMPLES {
                            return Err(unexpected(format!(
                                "{} replies to a pipeline of {}",
                                replies.len(),
                                2 + SIZE_SAMPLES
                            )));
                        }
                        let samples = replies.split_off(2);
                        let dbsize = parse_int(&replies[0])?;
                        let memory = used_memory(&replies[1])?;
                        Ok((dbsize, memory, samples))
                    }
                    Conn::Cluster(c) => {
                        use ::redis::cluster_routing::{
                            AggregateOp, MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo,
                        };
                        let all = |policy| {
                            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, policy))
                        };
                        let dbsize = c
                            .route_command(
                                ::redis::cmd("DBSIZE"),
                                all(Some(ResponsePolicy::Aggregate(AggregateOp::Sum))),
                            )
                            .await?;
                        // No policy: a map of each primary's answer, summed by `used_memory`.
                        let mut info = ::redis::cmd("INFO");
                        info.arg("memory");
                        let info = c.route_command(info, all(None)).await?;
                        let samples =
                            futures::future::join_all((0..SIZE_SAMPLES).map(|_| {
                                let mut c = c.clone();
                                async move {
                                    ::redis::cmd("RANDOMKEY").query_async::<Value>(&mut c).await
                                }
                            }))
                            .await
                            .into_iter()
                            .collect::<RedisResult<Vec<Value>>>()?;
                        Ok((parse_int(&dbsize)?, used_memory(&info)?, samples))
                    }
                }
            })
            .await?;
        let mut hits = vec![0u64; routes.len()];
        let mut drawn = 0u64;
        for sample in &samples {
            let key: &[u8] = match sample {
                Value::BulkString(key) => key,
                Value::SimpleString(key) => key.as_bytes(),
                // An empty database (or an empty primary).
                Value::Nil => continue,
                other => {
                    return Err(StoreError::Redis(unexpected(format!(
                        "RANDOMKEY returned {other:?}"
                    ))))
                }
            };
            drawn += 1;
            if let Some(i) = route_index(key, prefix, &lookup) {
                hits[i] += 1;
            }
        }
        let dbsize = u64::try_from(dbsize).unwrap_or(0);
        let keys = hits
            .iter()
            .map(|&h| match drawn {
                0 => 0,
                // Rounded to the nearest key; exact when every sample is this route's.
                n => (dbsize as f64 * h as f64 / n as f64).round() as u64,
            })
            .collect();
        Ok(StoreSize {
            keys,
            exact: false,
            memory_bytes,
        })
    }

    /// The URL(s) without passwords.
    pub fn label(&self) -> String {
        self.inner.label.clone()
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

/// `EVALSHA <sha> <n> <keys...> <args...>`.
fn evalsha(script: &Script, keys: &[String], args: &[String]) -> Cmd {
    let mut cmd = ::redis::cmd("EVALSHA");
    cmd.arg(script.get_hash())
        .arg(keys.len())
        .arg(keys)
        .arg(args);
    cmd
}

/// Runs a batch script over `keys` and returns `stride` values per key, in key order.
///
/// One server: the whole batch is one script call (one command, one round trip; the script
/// is atomic, so a repeated key sees its earlier copy). Cluster: keys live in different slots,
/// so each key is its own call; distinct keys run concurrently, a repeated key's calls in
/// order. A call that finds the script missing (NOSCRIPT: restarted or flushed server) loads
/// it and is sent again once; it never ran, so that is safe.
async fn eval_batch(
    conn: &mut Conn,
    script: &Script,
    keys: &[String],
    args: &[String],
    stride: usize,
) -> RedisResult<Vec<Vec<Value>>> {
    let flat = match conn {
        Conn::Single(manager) => {
            let cmd = evalsha(script, keys, args);
            let reply = match cmd.query_async::<Value>(manager).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    tracing::debug!("redis: NOSCRIPT, loading the script");
                    script.prepare_invoke().load_async(manager).await?;
                    cmd.query_async::<Value>(manager).await?
                }
                other => other?,
            };
            array(reply)?
        }
        Conn::Cluster(cluster) => {
            let mut chains: Vec<Vec<usize>> = Vec::new();
            let mut chain_of: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
            for (i, key) in keys.iter().enumerate() {
                let chain = *chain_of.entry(key.as_str()).or_insert_with(|| {
                    chains.push(Vec::new());
                    chains.len() - 1
                });
                chains[chain].push(i);
            }
            let runs = chains.into_iter().map(|chain| {
                let mut cluster = cluster.clone();
                async move {
                    let mut out = Vec::with_capacity(chain.len());
                    for i in chain {
                        let cmd = evalsha(script, std::slice::from_ref(&keys[i]), args);
                        let reply = match cmd.query_async::<Value>(&mut cluster).await {
                            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                                // SCRIPT LOAD goes to every primary in a cluster.
                                match script.prepare_invoke().load_async(&mut cluster).await {
                                    Ok(_) => cmd.query_async::<Value>(&mut cluster).await,
                                    Err(e) => Err(e),
                                }
                            }
                            other => other,
                        };
                        out.push((i, reply));
                    }
                    out
                }
            });
            let mut replies: Vec<Option<RedisResult<Value>>> =
                std::iter::repeat_with(|| None).take(keys.len()).collect();
            for (i, reply) in futures::future::join_all(runs).await.into_iter().flatten() {
                replies[i] = Some(reply);
            }
            let mut flat = Vec::with_capacity(keys.len() * stride);
            for reply in replies {
                let reply = reply.unwrap_or_else(|| Err(unexpected("missing reply".into())))?;
                flat.extend(array(reply)?);
            }
            flat
        }
    };
    if flat.len() != keys.len() * stride {
        return Err(unexpected(format!(
            "{} values for {} keys",
            flat.len(),
            keys.len()
        )));
    }
    let mut flat = flat.into_iter();
    Ok((0..keys.len())
        .map(|_| flat.by_ref().take(stride).collect())
        .collect())
}

fn array(reply: Value) -> RedisResult<Vec<Value>> {
    match reply {
        Value::Array(items) => Ok(items),
        other => Err(unexpected(format!("script returned {other:?}"))),
    }
}

fn parse_claim(reply: Vec<Value>) -> RedisResult<ClaimOutcome> {
    let code = parse_int(&reply[0])?;
    Ok(match code {
        0 => ClaimOutcome::Claimed,
        1 => ClaimOutcome::Done,
        2 => ClaimOutcome::Ours,
        3 => ClaimOutcome::TakenOver,
        4 => ClaimOutcome::InFlightElsewhere {
            lease_left: ttl_left(parse_int(&reply[1])?),
        },
        other => return Err(unexpected(format!("claim script returned {other}"))),
    })
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
