//! PostgreSQL backend of the store (`store.kind = "postgres"`): one row per remembered key
//! under a unique constraint, shared by any number of instances, durable and transactional.
//! This module owns the connection pool, the table's lazy creation, and the operations;
//! `schema` holds the table's shape and the SQL (and why one statement per batch is safe),
//! `tls` the rustls connector, `upkeep` the sweeper of expired rows.
//!
//! # Why tokio-postgres with deadpool-postgres
//!
//! tokio-postgres is the asynchronous client the other Rust PostgreSQL layers are built on, on
//! the runtime dedupd already uses; deadpool-postgres adds a pool with a per-connection
//! statement cache (`prepare_cached`), from the same family as the deadpool crates dedupd
//! knows. Measured with `cargo tree --prune`: the two add 28 crates to the build (the wire
//! protocol, its types, SCRAM's hashes, stringprep, the pool), about 117,000 lines of Rust
//! with their tests, and no proc macro. sqlx (not measured here) would bring its query macros,
//! its own runtime and driver layers for four databases, and a far longer build, for the
//! handful of statements this store sends, which are plain SQL text either way; its pool and
//! prepared-statement cache are what deadpool-postgres already gives.
//!
//! Measured with it (see `tests/postgres.rs`): 0.05 statements per message end to end with
//! batches of 50 (two per batch: claim and commit), 0.008 in the throughput benchmark's
//! default batches; the bytes each remembered key costs are in `schema` (about 190, or 204
//! with a body digest).
//!
//! # What a batch costs
//!
//! One statement per batch of claims, commits, renewals or releases, however many keys (see
//! `schema` for how each decides every key in one statement). Repeated keys of a batch are sent
//! once and answered as the memory store answers them (a second claim of a key is `Ours`, a
//! second commit `DoneElsewhere`, each copy of a done key is `Done` or `Conflict` by its own
//! body digest, and the key's window slides if any of them is `Done`). Body digests travel as
//! an `int8[]` beside the keys (the first copy's); the other digests of a key repeated with
//! another body, rare, as a second pair of arrays, so that a claim stays one statement; a
//! sliding claim lengthens its duplicates' windows in that statement too. A claim
//! or commit that raced another instance's insert of the same new key sends a second statement
//! for those keys alone, rarely. `commands_sent` counts statements; each statement is also
//! parsed once per pooled connection (the first time that connection sends it), which is not
//! counted.
//!
//! # Connections, PostgreSQL down, restarts
//!
//! [`PostgresStore::open`] parses the URL and the TLS files and builds the pool; it does not
//! connect. Each operation checks a connection out of the pool (at most [`POOL_SIZE`]), and the
//! whole operation — checkout, connect if needed, schema setup if needed, its statements — is
//! bounded by `store.timeout` ([`StoreError::Timeout`] past it). The same timeout is sent as
//! the session's `statement_timeout`, so the server stops a statement the client gave up on
//! rather than applying it later (the session also sets `enable_seqscan = off`, see `schema`). A connection that failed (closed, or timed out: a silent
//! server) is dropped from the pool rather than returned, and a closed one is never handed out
//! again (deadpool's recycling checks it), so after a PostgreSQL restart the next batch simply
//! connects anew. Outcomes of a failed statement are unknown to the caller, which retries; the
//! retry finds its own claim (`Ours`) or its own commit (`DoneElsewhere`).
//!
//! Claims and commits lock their existing keys in key order and then insert their new ones in
//! key order, so two instances' batches almost always wait for each other rather than
//! deadlock (the two phases leave a narrow window); should PostgreSQL report a deadlock, it
//! is an error like any other, and the caller retries the batch.
//!
//! # Server version and poolers
//!
//! PostgreSQL 12 or later (`WITH … AS MATERIALIZED`); the sweeper's TID range scans need 14
//! (on 12 and 13 each of its statements reads the whole table). The session settings travel in
//! the startup packet (`options=-c statement_timeout=…`) and statements are prepared per
//! connection, so a pooler in front of PostgreSQL must run in session mode (PgBouncer's
//! transaction mode supports neither).
//!
//! # The table
//!
//! Created by the first claim, commit, renewal, release or ping that reaches the server
//! (`CREATE TABLE IF NOT EXISTS`, once per process however many operations start at once), and
//! again after a statement says it is missing. A table created by dedupd 0.4 lacks the `body`
//! column of body digests: the first of those operations adds it, instantly (see `schema`,
//! "Tables of dedupd 0.4"), or, for a role that does not own the table, fails with the
//! statement to run. Reads (`inspect`, `forget`, `size`, the sweeper) of a prefix that has no
//! table answer "nothing there" and create none. When the role may not create it (or may not
//! read and write an existing one), every operation — and so `dedupd check --connect`, through
//! `ping` — fails with what is missing and the SQL an administrator can run.
//!
//! # TLS
//!
//! `?sslmode=require` in the URL turns TLS on (see `tls`); `store.tls` without it is refused at
//! open, as a `redis://` URL with `store.tls` is, rather than silently sending in the clear.
//! Without `require` the connection is not encrypted (`prefer`, libpq's default, acts as
//! `disable` here rather than trying TLS with a certificate nobody verifies). The URL parser
//! knows only `disable`, `prefer` and `require`: `verify-ca` and `verify-full` are refused
//! when the config is read; `require` verifies as `verify-full` does.

mod schema;
mod tls;
mod upkeep;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio::time::Instant;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{NoTls, Row};

use super::{
    body_at, done_or_conflict, BodyDigest, ClaimOutcome, CommitOutcome, KeyState, Owner,
    StoreError, StoreSize,
};
use crate::config::{redact_url, StoreConfig, StoreUrl};

pub use schema::table_name;
use schema::{quote_ident, route_id, Statements, RETRY};

/// Connections per store (per process). Each route has at most a few operations in flight at
/// once (a claim, a commit, a renewal), and every PostgreSQL connection is a server process.
pub const POOL_SIZE: usize = 16;

/// Statements one claim or commit may send when other instances keep inserting the same new
/// keys in between (each retry is for the raced keys only).
const MAX_ATTEMPTS: usize = 4;

/// Above this many heap pages (about 16 MB, 270,000 keys), `size` counts a sample of the
/// table's pages instead of every row (see [`PostgresStore::size`]).
const EXACT_PAGES: i64 = 2_000;

/// The PostgreSQL store. Cloning shares the pool.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    timeout: Duration,
    /// `store.key_prefix`.
    prefix: String,
    /// The table's name, unquoted.
    table: String,
    sql: Statements,
    /// Whether the table is known to exist and be usable; cleared when a statement says the
    /// table is missing, so the next operation creates it again.
    ready: AtomicBool,
    /// Held while a session sets the table up, so the concurrent first operations of a process
    /// probe and create it once rather than racing each other's `CREATE TABLE`.
    setup: tokio::sync::Mutex<()>,
    commands: AtomicU64,
    label: String,
}

/// A digest sent as a `uuid` (see `schema`): 16 raw bytes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Uuid([u8; 16]);

impl ToSql for Uuid {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::UUID
    }

    to_sql_checked!();
}

/// A batch's distinct keys (first occurrence order) and, per key, which distinct key it is
/// and whether an earlier key of the batch was the same.
struct Batch {
    digests: Vec<Uuid>,
    routes: Vec<i32>,
    /// The body digest of each distinct key's first copy (the `body` column's value).
    bodies: Vec<Option<i64>>,
    /// The other body digests of repeated keys, as (index into `digests`, digest), each once
    /// per key: what a claim needs to know whether any copy of a done key is a duplicate.
    /// Empty unless a batch repeats a key with another body (or with and without one).
    others: Vec<(usize, Option<i64>)>,
    /// For each key of the batch: (index into `digests`, repeated).
    slots: Vec<(usize, bool)>,
}

impl Batch {
    fn new(keys: &[String], bodies: &[Option<BodyDigest>], prefix: &str) -> Batch {
        let mut index: HashMap<Uuid, usize> = HashMap::with_capacity(keys.len());
        let mut batch = Batch {
            digests: Vec::with_capacity(keys.len()),
            routes: Vec::with_capacity(keys.len()),
            bodies: Vec::with_capacity(keys.len()),
            others: Vec::new(),
            slots: Vec::with_capacity(keys.len()),
        };
        for (n, key) in keys.iter().enumerate() {
            let digest = Uuid(schema::digest(key));
            let body = body_at(bodies, n).map(to_column);
            match index.get(&digest) {
                Some(&i) => {
                    batch.slots.push((i, true));
                    if body != batch.bodies[i] && !batch.others.contains(&(i, body)) {
                        batch.others.push((i, body));
                    }
                }
                None => {
                    let i = batch.digests.len();
                    index.insert(digest, i);
                    batch.digests.push(digest);
                    batch
                        .routes
                        .push(route_id(super::layout::route_of(prefix, key)));
                    batch.bodies.push(body);
                    batch.slots.push((i, false));
                }
            }
        }
        batch
    }

    /// The answer for every key of the batch from the answers of the distinct keys: a repeated
    /// key gets `again` of its first occurrence's answer.
    fn spread<T: Clone>(&self, answers: &[T], again: impl Fn(&T) -> T) -> Vec<T> {
        self.slots
            .iter()
            .map(|&(i, repeated)| {
                if repeated {
                    again(&answers[i])
                } else {
                    answers[i].clone()
                }
            })
            .collect()
    }
}

impl PostgresStore {
    /// Parses the URL and the TLS files and builds the pool: no network I/O here, so a
    /// PostgreSQL that is down only makes operations fail until it answers.
    pub async fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        let StoreUrl::One(url) = &cfg.url else {
            return Err(StoreError::Config(
                "store.url: kind = \"postgres\" takes one URL, not a list".into(),
            ));
        };
        // A password may also sit in the query string (`?password=`): shown without it.
        let shown = redact_url(url.split('?').next().unwrap_or(url));
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Config(format!("store.url {shown}: {e}")))?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(cfg.timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("dedupd");
        }
        // The server gives up on a statement when dedupd does; and plans always use the
        // primary key (see `schema`, "Plans").
        let options = format!(
            "{} -c statement_timeout={} -c enable_seqscan=off",
            pg.get_options().unwrap_or(""),
            super::px_millis(cfg.timeout)
        );
        pg.options(options.trim());
        let target = describe_target(&pg);
        let manager_config = ManagerConfig {
            // A closed connection is never handed out again; an open one is not pinged first
            // (that would be a second round trip per batch): a dead one fails its statement,
            // and is dropped then.
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match (pg.get_ssl_mode(), &cfg.tls) {
            (SslMode::Require, tls) => {
                Manager::from_config(pg, tls::RustlsConnect::new(tls.as_ref())?, manager_config)
            }
            (_, Some(_)) => {
                return Err(StoreError::Config(format!(
                    "store.tls is set but {shown} does not ask for TLS: add ?sslmode=require"
                )))
            }
            (_, None) => Manager::from_config(pg, NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .build()
            .map_err(|e| StoreError::Config(format!("store.url {shown}: {e}")))?;
        let table = table_name(&cfg.key_prefix);
        let label = format!("{target} (table {})", quote_ident(&table));
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                timeout: cfg.timeout,
                prefix: cfg.key_prefix.clone(),
                sql: Statements::new(&table, &cfg.key_prefix),
                table,
                ready: AtomicBool::new(false),
                setup: tokio::sync::Mutex::new(()),
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
        let batch = Batch::new(keys, bodies, &self.inner.prefix);
        let token = owner.token();
        let instance = owner.instance_prefix();
        let epoch = i64::try_from(owner.epoch()).unwrap_or(i64::MAX);
        let lease_ms = millis(lease);
        let slide_ms = slide.map(millis);
        let mut session = self.session().await?;
        let answers = session
            .decide(
                &self.inner.sql.claim,
                &batch,
                Others::Send,
                &[&token, &instance, &epoch, &lease_ms, &slide_ms],
            )
            .await?
            .into_iter()
            .map(|answer| Ok((claim_outcome(answer.code, answer.left)?, answer.body)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        // Each copy of a done key compares its own body: a batch may repeat a key with another.
        Ok(batch
            .slots
            .iter()
            .enumerate()
            .map(|(n, &(i, repeated))| match &answers[i] {
                (ClaimOutcome::Done | ClaimOutcome::Conflict, stored) => {
                    done_or_conflict(stored.and_then(from_column), body_at(bodies, n))
                }
                (ClaimOutcome::Claimed | ClaimOutcome::TakenOver | ClaimOutcome::Ours, _)
                    if repeated =>
                {
                    ClaimOutcome::Ours
                }
                (outcome, _) => outcome.clone(),
            })
            .collect())
    }

    /// See `Store::commit`.
    pub async fn commit(
        &self,
        keys: &[String],
        bodies: &[Option<BodyDigest>],
        owner: &Owner,
        window: Duration,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let batch = Batch::new(keys, bodies, &self.inner.prefix);
        let token = owner.token();
        let window_ms = millis(window);
        let mut session = self.session().await?;
        let answers = session
            .decide(
                &self.inner.sql.commit,
                &batch,
                Others::Skip,
                &[&token, &window_ms],
            )
            .await?
            .into_iter()
            .map(|Answer { code, .. }| {
                CommitOutcome::from_code(i64::from(code))
                    .ok_or_else(|| unexpected(format!("commit answered code {code}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(batch.spread(&answers, |_| CommitOutcome::DoneElsewhere))
    }

    /// See `Store::renew`.
    pub async fn renew(
        &self,
        keys: &[String],
        owner: &Owner,
        lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        let lease_ms = millis(lease);
        let sql = &self.inner.sql.renew;
        let batch = Batch::new(keys, &[], &self.inner.prefix);
        let found = self
            .compare_and(sql, &batch, &[&batch.digests, &owner.token(), &lease_ms])
            .await?;
        Ok(batch.spread(&found, |first| *first))
    }

    /// See `Store::release`.
    pub async fn release(&self, keys: &[String], owner: &Owner) -> Result<Vec<bool>, StoreError> {
        let sql = &self.inner.sql.release;
        let batch = Batch::new(keys, &[], &self.inner.prefix);
        let found = self
            .compare_and(sql, &batch, &[&batch.digests, &owner.token()])
            .await?;
        Ok(batch.spread(&found, |_| false))
    }

    /// Runs a compare-on-token statement that returns the keys it changed; whether it changed
    /// each distinct key of `batch`.
    async fn compare_and(
        &self,
        sql: &str,
        batch: &Batch,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<bool>, StoreError> {
        let rows = self.session().await?.query(sql, params).await?;
        let mut changed = vec![false; batch.digests.len()];
        let index: HashMap<[u8; 16], usize> = batch
            .digests
            .iter()
            .enumerate()
            .map(|(i, d)| (d.0, i))
            .collect();
        for row in rows {
            let key: Uuid = row.try_get::<_, RawUuid>(0).map_err(failure)?.0;
            if let Some(&i) = index.get(&key.0) {
                changed[i] = true;
            }
        }
        Ok(changed)
    }

    /// See `Store::inspect`.
    pub async fn inspect(&self, key: &str) -> Result<KeyState, StoreError> {
        let digest = Uuid(schema::digest(key));
        let mut session = self.session_with(Setup::ReadOnly).await?;
        if session.missing {
            return Ok(KeyState::Absent);
        }
        let rows = session.query(&self.inner.sql.inspect, &[&digest]).await?;
        let Some(row) = rows.first() else {
            return Ok(KeyState::Absent);
        };
        let owner: Option<String> = row.try_get(0).map_err(failure)?;
        let left = Duration::from_millis(
            u64::try_from(row.try_get::<_, i64>(1).map_err(failure)?).unwrap_or(0),
        );
        Ok(match owner {
            None => KeyState::Done { window_left: left },
            Some(owner) => KeyState::InFlight {
                owner,
                lease_left: left,
            },
        })
    }

    /// See `Store::forget`: `true` if the key had a row that had not expired.
    pub async fn forget(&self, key: &str) -> Result<bool, StoreError> {
        let digest = Uuid(schema::digest(key));
        let mut session = self.session_with(Setup::ReadOnly).await?;
        if session.missing {
            return Ok(false);
        }
        let rows = session.query(&self.inner.sql.forget, &[&digest]).await?;
        match rows.first() {
            Some(row) => row.try_get(0).map_err(failure),
            None => Ok(false),
        }
    }

    /// See `Store::size`: live rows (in flight and done, expired ones not counted) per route
    /// of the table of `prefix`, and the table's total size (`pg_total_relation_size`: heap,
    /// primary key, free-space and visibility maps). Two statements. Counting reads the whole
    /// table, which is fine every 15 s up to [`EXACT_PAGES`] pages (16 MB); above that it
    /// reads a random sample of that many pages (`TABLESAMPLE SYSTEM`) and scales the counts
    /// up, with `exact: false` (a few percent off for routes with thousands of keys).
    pub async fn size(&self, prefix: &str, routes: &[String]) -> Result<StoreSize, StoreError> {
        let own = prefix == self.inner.prefix;
        let table = if own {
            self.inner.table.clone()
        } else {
            table_name(prefix)
        };
        let other;
        let sql = if own {
            &self.inner.sql
        } else {
            other = Statements::new(&table, prefix);
            &other
        };
        // Measured whether or not the table exists (a missing one measures as nothing).
        let mut session = self.session_with(Setup::ReadOnly).await?;
        let rows = session.query(sql.measure, &[&quote_ident(&table)]).await?;
        let (bytes, pages): (Option<i64>, Option<i64>) = match rows.first() {
            Some(row) => (
                row.try_get(0).map_err(failure)?,
                row.try_get(1).map_err(failure)?,
            ),
            None => (None, None),
        };
        let (Some(bytes), Some(pages)) = (bytes, pages) else {
            // No table yet: nothing remembered.
            return Ok(StoreSize {
                keys: vec![0; routes.len()],
                exact: true,
                memory_bytes: 0,
            });
        };
        let ids: Vec<i32> = routes.iter().map(|r| route_id(r)).collect();
        let percent: f32 = if pages <= EXACT_PAGES {
            100.0
        } else {
            (EXACT_PAGES as f64 * 100.0 / pages as f64) as f32
        };
        let rows = session.query(&sql.count, &[&ids, &percent]).await?;
        let (scale, exact) = (100.0 / f64::from(percent), percent >= 100.0);
        let mut counts: HashMap<i32, u64> = HashMap::new();
        for row in rows {
            let id: i32 = row.try_get(0).map_err(failure)?;
            let n: i64 = row.try_get(1).map_err(failure)?;
            counts.insert(id, (n as f64 * scale).round() as u64);
        }
        Ok(StoreSize {
            keys: ids
                .iter()
                .map(|id| counts.get(id).copied().unwrap_or(0))
                .collect(),
            exact,
            memory_bytes: u64::try_from(bytes).unwrap_or(0),
        })
    }

    /// See `Store::ping`: a connection, the table ready (created if it may be), one round trip.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut session = self.session().await?;
        if session.probed {
            return Ok(());
        }
        session.query("SELECT 1", &[]).await.map(drop)
    }

    /// See `Store::start_upkeep`: one sweeper for the table (whatever the routes), passing at
    /// most every eighth of the shortest window.
    pub fn start_upkeep(
        &self,
        routes: &[(String, Duration)],
        tracker: &tokio_util::task::TaskTracker,
        shutdown: &tokio_util::sync::CancellationToken,
    ) {
        let Some(shortest) = routes.iter().map(|(_, window)| *window).min() else {
            return;
        };
        tracker.spawn(upkeep::run(
            self.clone(),
            upkeep::pass_every(shortest),
            shutdown.clone(),
        ));
    }

    /// Statements sent to PostgreSQL so far by this store.
    pub fn commands_sent(&self) -> u64 {
        self.inner.commands.load(Ordering::Relaxed)
    }

    /// The URL without its password, and the table.
    pub fn label(&self) -> String {
        self.inner.label.clone()
    }

    /// Counts `n` statements sent.
    fn sent(&self, n: u64) {
        self.inner.commands.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::STORE_COMMANDS).increment(n);
    }

    /// A pooled connection for one operation, with the table ready (created if missing), and
    /// the deadline every statement of the operation must meet.
    async fn session(&self) -> Result<Session<'_>, StoreError> {
        self.session_with(Setup::Create).await
    }

    /// [`PostgresStore::session`], where `ReadOnly` does not create a missing table but says
    /// it is missing (`Session::missing`): `inspect` of a mistyped prefix, or the sampler, must
    /// not leave a table behind.
    async fn session_with(&self, setup: Setup) -> Result<Session<'_>, StoreError> {
        let deadline = Instant::now() + self.inner.timeout;
        let client = match tokio::time::timeout_at(deadline, self.inner.pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(StoreError::Postgres(crate::error_chain(&e))),
            Err(_) => return Err(StoreError::Timeout(self.inner.timeout)),
        };
        let mut session = Session {
            store: self,
            client: Some(client),
            deadline,
            probed: false,
            missing: false,
        };
        if !self.inner.ready.load(Ordering::Relaxed) {
            let Ok(_setting_up) = tokio::time::timeout_at(deadline, self.inner.setup.lock()).await
            else {
                return Err(StoreError::Timeout(self.inner.timeout));
            };
            // Another session may have set it up while this one waited.
            if !self.inner.ready.load(Ordering::Relaxed) {
                session.prepare_table(setup).await?;
            }
        }
        Ok(session)
    }
}

/// One operation's connection. A connection that failed is dropped from the pool instead of
/// going back to it.
struct Session<'s> {
    store: &'s PostgresStore,
    client: Option<Object>,
    deadline: Instant,
    /// Whether this session already made a round trip to set up the table.
    probed: bool,
    /// The table does not exist (a [`Setup::ReadOnly`] session only).
    missing: bool,
}

/// Whether an operation creates the table when it is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Create,
    ReadOnly,
}

/// Whether a statement takes the other body digests of repeated keys (claims do, commits
/// write the first copy's only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Others {
    Send,
    Skip,
}

/// A claim's or commit's answer for one distinct key.
#[derive(Debug, Clone, Copy)]
struct Answer {
    code: i32,
    /// Lease left in ms (in flight elsewhere).
    left: Option<i64>,
    /// The stored body digest of a live done key (the `body` column).
    body: Option<i64>,
}

impl Session<'_> {
    /// Runs `sql` (prepared once per connection) within the operation's deadline.
    async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let Some(client) = self.client.as_ref() else {
            return Err(StoreError::Postgres("the connection was dropped".into()));
        };
        self.store.sent(1);
        let run = async {
            let statement = client.prepare_cached(sql).await?;
            client.query(&statement, params).await
        };
        match tokio::time::timeout_at(self.deadline, run).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(self.failed(&e)),
            Err(_) => {
                self.discard();
                Err(StoreError::Timeout(self.store.inner.timeout))
            }
        }
    }

    /// Like [`Session::query`] for a statement whose rows are not wanted: how many it changed.
    async fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let Some(client) = self.client.as_ref() else {
            return Err(StoreError::Postgres("the connection was dropped".into()));
        };
        self.store.sent(1);
        let run = async {
            let statement = client.prepare_cached(sql).await?;
            client.execute(&statement, params).await
        };
        match tokio::time::timeout_at(self.deadline, run).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(self.failed(&e)),
            Err(_) => {
                self.discard();
                Err(StoreError::Timeout(self.store.inner.timeout))
            }
        }
    }

    /// Sends a claim or commit statement for the distinct keys of `batch`, then again for the
    /// keys it answered [`RETRY`], until all are decided: one [`Answer`] per distinct key.
    /// Parameters: the keys, their routes, their bodies, `more`, then (with [`Others::Send`])
    /// the other digests of repeated keys as key numbers and digests.
    async fn decide(
        &mut self,
        sql: &str,
        batch: &Batch,
        others: Others,
        more: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Answer>, StoreError> {
        let mut answers: Vec<Option<Answer>> = vec![None; batch.digests.len()];
        let mut todo: Vec<usize> = (0..batch.digests.len()).collect();
        for _ in 0..MAX_ATTEMPTS {
            let keys: Vec<Uuid> = todo.iter().map(|&i| batch.digests[i]).collect();
            let routes: Vec<i32> = todo.iter().map(|&i| batch.routes[i]).collect();
            let bodies: Vec<Option<i64>> = todo.iter().map(|&i| batch.bodies[i]).collect();
            // Key numbers of this statement (1-based, as `WITH ORDINALITY` counts).
            let (other_keys, other_bodies): (Vec<i32>, Vec<Option<i64>>) = batch
                .others
                .iter()
                .filter_map(|&(i, body)| {
                    let n = todo.iter().position(|&t| t == i)?;
                    Some((i32::try_from(n + 1).ok()?, body))
                })
                .unzip();
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&keys, &routes, &bodies];
            params.extend_from_slice(more);
            if others == Others::Send {
                params.push(&other_keys);
                params.push(&other_bodies);
            }
            let rows = self.query(sql, &params).await?;
            let mut retry = Vec::new();
            for row in rows {
                let n: i64 = row.try_get(0).map_err(failure)?;
                let answer = Answer {
                    code: row.try_get(1).map_err(failure)?,
                    left: row.try_get(2).map_err(failure)?,
                    body: row.try_get(3).map_err(failure)?,
                };
                let i = usize::try_from(n - 1)
                    .ok()
                    .and_then(|n| todo.get(n).copied())
                    .ok_or_else(|| unexpected(format!("an answer for key number {n}")))?;
                if answer.code == RETRY {
                    retry.push(i);
                } else {
                    answers[i] = Some(answer);
                }
            }
            if retry.is_empty() {
                break;
            }
            todo = retry;
        }
        answers
            .into_iter()
            .map(|a| {
                a.ok_or_else(|| {
                    StoreError::Postgres(format!(
                        "keys still contended after {MAX_ATTEMPTS} statements (other instances \
                         kept inserting them); retrying"
                    ))
                })
            })
            .collect()
    }

    /// Makes sure the table exists and this role may use it: creates it when it may, or says
    /// what an administrator must run.
    async fn prepare_table(&mut self, setup: Setup) -> Result<(), StoreError> {
        let inner = &self.store.inner;
        let quoted = quote_ident(&inner.table);
        self.probed = true;
        let rows = self.query(inner.sql.probe, &[&quoted]).await?;
        let row = rows
            .first()
            .ok_or_else(|| unexpected("the table probe answered no row".into()))?;
        let exists: bool = row.try_get(0).map_err(failure)?;
        let usable: bool = row.try_get(1).map_err(failure)?;
        let may_create: bool = row.try_get(2).map_err(failure)?;
        let role: String = row.try_get(3).map_err(failure)?;
        let schema_name: String = row.try_get(4).map_err(failure)?;
        let has_body: bool = row.try_get(5).map_err(failure)?;
        let grant = schema::grant(&inner.table, &role);
        if exists && usable && has_body {
            inner.ready.store(true, Ordering::Relaxed);
            return Ok(());
        }
        if setup == Setup::ReadOnly {
            // Reads never change the schema, and a table of 0.4 reads as well as a new one;
            // the next claim or commit upgrades it (and until then reads probe again).
            self.missing = !exists;
            return Ok(());
        }
        if exists && !usable {
            let sql = if has_body {
                grant
            } else {
                format!("{} {grant}", inner.sql.upgrade)
            };
            return Err(StoreError::Postgres(format!(
                "role {role:?} may not read and write table {quoted} (it needs SELECT, INSERT, \
                 UPDATE and DELETE): an administrator can run: {sql}"
            )));
        }
        if exists {
            return self.upgrade_table(&role).await;
        }
        if !may_create {
            let schema_name = if schema_name.is_empty() {
                "(no schema on the search_path)".to_owned()
            } else {
                quote_ident(&schema_name)
            };
            return Err(StoreError::Postgres(format!(
                "table {quoted} does not exist and role {role:?} may not create it (no CREATE \
                 privilege on schema {schema_name}): an administrator can run: {} {grant}",
                inner.sql.create
            )));
        }
        match self.run_ddl(&inner.sql.create).await? {
            Ok(()) => {
                tracing::info!(store = %inner.label, "created the table of the key store");
            }
            // Another instance created it at the same moment: the table, or its row type
            // (42710), or a catalog row (23505) was there first.
            Err(e)
                if matches!(
                    e.code(),
                    Some(
                        &SqlState::DUPLICATE_TABLE
                            | &SqlState::DUPLICATE_OBJECT
                            | &SqlState::UNIQUE_VIOLATION
                    )
                ) => {}
            Err(e) => return Err(self.failed(&e)),
        }
        inner.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Runs the DDL `sql` (not prepared) within the operation's deadline. The server's refusal
    /// comes back as it is, for the caller to tell a concurrent instance's identical change
    /// from a failure; only a dropped connection or the deadline is a [`StoreError`] here.
    async fn run_ddl(
        &mut self,
        sql: &str,
    ) -> Result<Result<(), tokio_postgres::Error>, StoreError> {
        let Some(client) = self.client.as_ref() else {
            return Err(StoreError::Postgres("the connection was dropped".into()));
        };
        self.store.sent(1);
        match tokio::time::timeout_at(self.deadline, client.batch_execute(sql)).await {
            Ok(result) => Ok(result),
            Err(_) => {
                self.discard();
                Err(StoreError::Timeout(self.store.inner.timeout))
            }
        }
    }

    /// Adds the `body` column to a table created by dedupd 0.4. Only the table's owner may:
    /// anyone else is told what to run.
    async fn upgrade_table(&mut self, role: &str) -> Result<(), StoreError> {
        let inner = &self.store.inner;
        // Takes the table's exclusive lock for a moment (a catalog change, no rewrite), after
        // the batches of other instances that hold its rows; bounded by statement_timeout.
        match self.run_ddl(&inner.sql.upgrade).await? {
            Ok(()) => {
                tracing::info!(
                    store = %inner.label,
                    "added the body column to the key store's table (created by dedupd 0.4)"
                );
            }
            // Another instance added it at the same moment.
            Err(e)
                if matches!(
                    e.code(),
                    Some(&SqlState::DUPLICATE_COLUMN | &SqlState::UNIQUE_VIOLATION)
                ) => {}
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                return Err(StoreError::Postgres(format!(
                    "table {} lacks the body column dedupd 0.5 keeps body digests in (created \
                     by dedupd 0.4), and role {role:?} may not add it (only the table's owner \
                     may): an administrator can run: {}",
                    quote_ident(&inner.table),
                    inner.sql.upgrade
                )));
            }
            Err(e) => return Err(self.failed(&e)),
        }
        inner.ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The error of a failed statement; drops the connection if it is closed, and forgets that
    /// the table is ready if it is missing or lacks a column.
    fn failed(&mut self, e: &tokio_postgres::Error) -> StoreError {
        // A missing column: the table was dropped and created again by dedupd 0.4.
        if matches!(
            e.code(),
            Some(&SqlState::UNDEFINED_TABLE | &SqlState::UNDEFINED_COLUMN)
        ) {
            self.store.inner.ready.store(false, Ordering::Relaxed);
        }
        // A server that turned read-only (a primary demoted in a failover) keeps refusing
        // writes on this connection; a new one may reach the new primary (with
        // `target_session_attrs=read-write` and several hosts in the URL).
        let read_only = e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION);
        if read_only || e.is_closed() || self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.discard();
        }
        StoreError::Postgres(describe(e))
    }

    /// Takes the connection out of the pool for good (it closes when dropped): after a
    /// timeout it may be stuck on a silent server, and a closed one is useless.
    fn discard(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

/// An unreadable row or failed statement as a store error.
fn failure(e: tokio_postgres::Error) -> StoreError {
    StoreError::Postgres(describe(&e))
}

/// An error's text: for a server error its message, SQLSTATE, detail and hint.
fn describe(e: &tokio_postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return crate::error_chain(e);
    };
    let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
    if let Some(detail) = db.detail() {
        text.push_str(": ");
        text.push_str(detail);
    }
    if let Some(hint) = db.hint() {
        text.push_str(" (hint: ");
        text.push_str(hint);
        text.push(')');
    }
    text
}

fn unexpected(detail: String) -> StoreError {
    StoreError::Postgres(format!("unexpected answer: {detail}"))
}

/// Reads a `uuid` column as 16 raw bytes.
struct RawUuid(Uuid);

impl<'a> tokio_postgres::types::FromSql<'a> for RawUuid {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let bytes: [u8; 16] = raw.try_into().map_err(|_| "a uuid that is not 16 bytes")?;
        Ok(RawUuid(Uuid(bytes)))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::UUID
    }
}

/// A claim code (see `schema`) as an outcome.
fn claim_outcome(code: i32, left_ms: Option<i64>) -> Result<ClaimOutcome, StoreError> {
    Ok(match code {
        0 => ClaimOutcome::Claimed,
        1 => ClaimOutcome::Done,
        5 => ClaimOutcome::Conflict,
        2 => ClaimOutcome::Ours,
        3 => ClaimOutcome::TakenOver,
        4 => ClaimOutcome::InFlightElsewhere {
            lease_left: Duration::from_millis(
                left_ms.and_then(|ms| u64::try_from(ms).ok()).unwrap_or(0),
            ),
        },
        other => return Err(unexpected(format!("claim answered code {other}"))),
    })
}

/// `postgres://user@host:port/database` from the parsed URL: never a password, wherever the
/// URL had one.
fn describe_target(pg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            match pg.get_ports().get(i).or(pg.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    let user = pg.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    let database = pg.get_dbname().unwrap_or("");
    format!("postgres://{user}{}/{database}", hosts.join(","))
}

/// A body digest as the `body` column keeps it: the same 64 bits, as PostgreSQL has no
/// unsigned integers.
fn to_column(body: BodyDigest) -> i64 {
    i64::from_be_bytes(body.to_bytes())
}

/// A `body` column's value as a digest (never 0, as [`to_column`] never writes 0).
fn from_column(body: i64) -> Option<BodyDigest> {
    BodyDigest::from_u64(u64::from_be_bytes(body.to_be_bytes()))
}

/// A lease or window in ms for the SQL (at least 1 ms, as everywhere else).
fn millis(d: Duration) -> i64 {
    i64::try_from(super::px_millis(d)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| format!("dd:r:{n}")).collect()
    }

    #[test]
    fn a_batch_sends_each_key_once_and_answers_every_copy() {
        let batch = Batch::new(&keys(&["x", "y", "x", "x", "z"]), &[], "dd");
        assert_eq!(batch.digests.len(), 3);
        assert_eq!(batch.routes, vec![route_id("r"); 3]);
        assert_eq!(batch.bodies, [None; 3]);
        assert!(batch.others.is_empty());
        let answers = [1, 2, 3];
        assert_eq!(batch.spread(&answers, |a| a * 10), [1, 2, 10, 10, 3]);
    }

    #[test]
    fn a_batch_sends_each_other_body_of_a_repeated_key_once() {
        let digest = |text: &str| Some(BodyDigest::of(text.as_bytes()));
        let column = |text: &str| digest(text).map(to_column);
        let bodies = [
            digest("a"),
            digest("b"),
            digest("a"),
            digest("c"),
            None,
            digest("c"),
            digest("b"),
        ];
        let batch = Batch::new(&keys(&["x", "y", "x", "x", "x", "x", "y"]), &bodies, "dd");
        assert_eq!(batch.bodies, [column("a"), column("b")]);
        assert_eq!(batch.others, [(0, column("c")), (0, None)]);
    }

    #[test]
    fn body_digests_survive_the_signed_column() {
        for value in [1, 0x7fff_ffff_ffff_ffff, 0x8000_0000_0000_0000, u64::MAX] {
            let digest = BodyDigest::from_u64(value).unwrap();
            assert_eq!(from_column(to_column(digest)), Some(digest));
        }
        assert_eq!(to_column(BodyDigest::from_u64(u64::MAX).unwrap()), -1);
        assert_eq!(from_column(0), None);
    }

    #[test]
    fn claim_codes_read_as_the_redis_scripts_answer() {
        assert_eq!(claim_outcome(0, None).ok(), Some(ClaimOutcome::Claimed));
        assert_eq!(claim_outcome(3, None).ok(), Some(ClaimOutcome::TakenOver));
        assert_eq!(claim_outcome(5, None).ok(), Some(ClaimOutcome::Conflict));
        assert_eq!(
            claim_outcome(4, Some(1500)).ok(),
            Some(ClaimOutcome::InFlightElsewhere {
                lease_left: Duration::from_millis(1500)
            })
        );
        assert_eq!(
            claim_outcome(4, Some(-3)).ok(),
            Some(ClaimOutcome::InFlightElsewhere {
                lease_left: Duration::ZERO
            })
        );
        assert!(claim_outcome(RETRY, None).is_err());
    }

    #[tokio::test]
    async fn tls_settings_need_sslmode_require_and_bad_files_fail_open() {
        let mut cfg = StoreConfig {
            kind: crate::config::StoreKind::Postgres,
            url: StoreUrl::One("postgres://u:secret@127.0.0.1:1/db".into()),
            tls: Some(crate::config::Tls {
                ca_file: None,
                cert_file: None,
                key_file: None,
            }),
            ..StoreConfig::default()
        };
        let err = PostgresStore::open(&cfg).await.err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("sslmode=require"), "{err}");
        assert!(!err.contains("secret"), "{err}");

        // The label never shows a password, in the userinfo or the query string.
        let mut plain = cfg.clone();
        plain.tls = None;
        plain.url = StoreUrl::One("postgres://u:secret@db.example:6543/app?password=secret".into());
        let label = PostgresStore::open(&plain).await.map(|s| s.label());
        let label = label.unwrap_or_default();
        assert!(
            label.starts_with("postgres://u@db.example:6543/app (table "),
            "{label}"
        );
        assert!(!label.contains("secret"), "{label}");

        cfg.url = StoreUrl::One("postgres://u@127.0.0.1:1/db?sslmode=require".into());
        cfg.tls = Some(crate::config::Tls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            cert_file: None,
            key_file: None,
        });
        let err = PostgresStore::open(&cfg).await.err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("/nonexistent/ca.pem"));

        // Without store.tls, sslmode=require verifies with the webpki roots.
        cfg.tls = None;
        assert!(PostgresStore::open(&cfg).await.is_ok());
    }
}
