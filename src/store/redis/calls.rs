//! How a batch of keys becomes script calls: keys are placed in their tables
//! (`store::layout`), then sent as **one call per batch on a single server** (a script there
//! may touch any key) or **one call per table on Redis Cluster** (a script must stay in one
//! slot; a table's keys share one). Calls of one batch run concurrently, so a batch costs about
//! one round trip of wall time either way.
//!
//! A key repeated in a batch is in the same table, so in the same call, in batch order: it
//! sees its earlier copy's effect, as the protocol needs. A call that finds the script missing
//! (NOSCRIPT: a restarted or flushed server) loads it and is sent again once; it never ran, so
//! that is safe. Every command sent is counted in `dedupd_store_commands_total`.

use std::collections::HashMap;
use std::sync::Arc;

use ::redis::{Cmd, ErrorKind, RedisResult, Script, ServerErrorKind, Value};

use super::{unexpected, Conn};
use crate::store::layout::{self, Tables};
use crate::store::{body_at, BodyDigest};

/// One key, placed.
pub(super) struct Placed {
    /// The meta of its table (what the call declares in `KEYS`).
    pub meta: Arc<str>,
    /// Its field.
    pub field: [u8; layout::FIELD_BYTES],
    /// Its 0.1-layout name when the claim must also read it, else `None`.
    pub legacy: Option<String>,
    /// Its copy's body digest, for claims and commits.
    pub body: Option<BodyDigest>,
}

/// What a script takes per key after its table, field and hex (see `scripts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PerKey {
    /// Nothing more: release and renew touch only the claim.
    Bare,
    /// The 0.1 name (or '') and the body digest (or '').
    LegacyAndBody,
    /// The body digest (or '').
    Body,
}

/// One script call: the metas it declares and, per key, its position in the batch and args.
struct Call<'a> {
    metas: Vec<&'a str>,
    positions: Vec<usize>,
    args: Vec<Vec<u8>>,
}

impl<'a> Call<'a> {
    fn new() -> Self {
        Call {
            metas: Vec::new(),
            positions: Vec::new(),
            args: Vec::new(),
        }
    }

    fn push(&mut self, position: usize, key: &'a Placed, per_key: PerKey) {
        let table = match self.metas.iter().position(|m| *m == &*key.meta) {
            Some(i) => i + 1,
            None => {
                self.metas.push(&key.meta);
                self.metas.len()
            }
        };
        self.positions.push(position);
        self.args.push(table.to_string().into_bytes());
        self.args.push(key.field.to_vec());
        self.args.push(layout::hex(&key.field).to_vec());
        if per_key == PerKey::LegacyAndBody {
            self.args
                .push(key.legacy.as_deref().unwrap_or("").as_bytes().to_vec());
        }
        if per_key != PerKey::Bare {
            self.args
                .push(key.body.map_or_else(Vec::new, |b| b.to_bytes().to_vec()));
        }
    }

    fn command(&self, script: &Script, head: &[String]) -> Cmd {
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(script.get_hash())
            .arg(self.metas.len())
            .arg(&self.metas)
            .arg(head)
            .arg(&self.args);
        cmd
    }
}

/// Places `keys` (`{prefix}:{route}:{id}`, with `bodies`: one per key, or empty) using
/// `tables` to name each route's tables and `legacy` to say whether claims of the route read
/// old names too. Both are asked once per route in the batch (a batch is nearly always one
/// route's), not once per key.
pub(super) fn place(
    keys: &[String],
    bodies: &[Option<BodyDigest>],
    prefix: &str,
    tables: impl Fn(&str) -> Arc<Tables>,
    legacy: impl Fn(&str) -> bool,
) -> Vec<Placed> {
    let mut routes: Vec<(&str, Arc<Tables>, bool)> = Vec::with_capacity(1);
    keys.iter()
        .enumerate()
        .map(|(i, key)| {
            let route = layout::route_of(prefix, key);
            let r = match routes.iter().position(|(known, _, _)| *known == route) {
                Some(r) => r,
                None => {
                    routes.push((route, tables(route), legacy(route)));
                    routes.len() - 1
                }
            };
            let (_, route_tables, read_legacy) = &routes[r];
            let placement = layout::place(key);
            Placed {
                meta: route_tables.meta_shared(placement.group),
                field: placement.field,
                legacy: read_legacy.then(|| key.clone()),
                body: body_at(bodies, i),
            }
        })
        .collect()
}

/// Runs `script` over `keys`: `head` arguments first, then each key's table, field, field in
/// hex and what `per_key` adds. Returns `stride` values per key, in key order. `sent` counts
/// commands.
pub(super) async fn run(
    conn: &mut Conn,
    script: &Script,
    head: &[String],
    keys: &[Placed],
    per_key: PerKey,
    stride: usize,
    sent: &(dyn Fn(u64) + Sync),
) -> RedisResult<Vec<Vec<Value>>> {
    let calls: Vec<Call> = match conn {
        Conn::Single(_) => {
            let mut call = Call::new();
            for (i, key) in keys.iter().enumerate() {
                call.push(i, key, per_key);
            }
            vec![call]
        }
        Conn::Cluster(_) => {
            let mut by_table: HashMap<&str, Call> = HashMap::new();
            let mut order = Vec::new();
            for (i, key) in keys.iter().enumerate() {
                by_table
                    .entry(&key.meta)
                    .or_insert_with(|| {
                        order.push(&*key.meta);
                        Call::new()
                    })
                    .push(i, key, per_key);
            }
            order
                .into_iter()
                .filter_map(|meta| by_table.remove(meta))
                .collect()
        }
    };
    let replies = futures::future::join_all(calls.iter().map(|call| {
        let mut conn = conn.clone();
        let cmd = call.command(script, head);
        async move { eval(&mut conn, script, &cmd, sent).await }
    }))
    .await;
    let mut out: Vec<Vec<Value>> = (0..keys.len()).map(|_| Vec::new()).collect();
    for (call, reply) in calls.iter().zip(replies) {
        let values = match reply? {
            Value::Array(values) => values,
            other => return Err(unexpected(format!("script returned {other:?}"))),
        };
        if values.len() != call.positions.len() * stride {
            return Err(unexpected(format!(
                "{} values for {} keys",
                values.len(),
                call.positions.len()
            )));
        }
        let mut values = values.into_iter();
        for &position in &call.positions {
            out[position] = values.by_ref().take(stride).collect();
        }
    }
    Ok(out)
}

/// Sends one script call, loading the script once if the server answers NOSCRIPT (`SCRIPT
/// LOAD` goes to every primary of a cluster).
pub(super) async fn eval(
    conn: &mut Conn,
    script: &Script,
    cmd: &Cmd,
    sent: &(dyn Fn(u64) + Sync),
) -> RedisResult<Value> {
    sent(1);
    match cmd.query_async::<Value>(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            tracing::debug!("redis: NOSCRIPT, loading the script");
            sent(2);
            script.prepare_invoke().load_async(conn).await?;
            cmd.query_async::<Value>(conn).await
        }
        other => other,
    }
}

/// `EVALSHA` of `script` declaring `keys`, with `args`.
pub(super) fn evalsha(script: &Script, keys: &[&str], args: &[&[u8]]) -> Cmd {
    let mut cmd = ::redis::cmd("EVALSHA");
    cmd.arg(script.get_hash())
        .arg(keys.len())
        .arg(keys)
        .arg(args);
    cmd
}
