//! Store cost per key: what one key costs in `Store::claim` and `Store::commit`, on each store
//! kind, so store layouts can be compared.
//!
//! Kinds: `memory`; `redis`, a single server on 127.0.0.1:6379; `cluster`, the Redis Cluster of
//! `./scripts/redis-cluster.sh start` (seeds 127.0.0.1:30001-30003; the group is skipped with a
//! note when it does not answer, and so is `redis`). Per kind, batches of 1 and of 200 keys:
//!
//! - `claim_fresh`: claim of keys never seen (absent → claimed);
//! - `commit`: commit of keys just claimed (each batch is claimed first, outside the timing);
//! - `claim_done`: claim of keys already committed (the duplicate path).
//!
//! Keys are `keys::store_key` of UUID-like ids, under a random key prefix per run (window 24 h,
//! lease 30 s); every key under it is deleted at the end. Criterion reports the time per batch
//! and, through `Throughput::Elements`, keys per second; each case also prints its µs per key
//! (mean over all its timed runs, warm-up included) and the Redis commands it sent per key
//! (0 for the memory store). Only the store call is timed, not making the keys.
//! On Redis the layout's upkeep is run once before measuring, so the claims see the steady
//! state (upgrade check done), as in a running proxy.
//!
//!     cargo bench --bench store
//!
//! A run takes about a minute and a half.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dedupd::config::{Config, StoreConfig};
use dedupd::keys::store_key;
use dedupd::store::{ClaimOutcome, CommitOutcome, Owner, Store};
use tokio::runtime::Runtime;

const LEASE: Duration = Duration::from_secs(30);
const WINDOW: Duration = Duration::from_secs(24 * 3600);
const ROUTE: &str = "bench";
const BATCHES: [usize; 2] = [1, 200];
const REDIS_URL: &str = "redis://127.0.0.1:6379";
const CLUSTER_SEEDS: [&str; 3] = [
    "redis://127.0.0.1:30001",
    "redis://127.0.0.1:30002",
    "redis://127.0.0.1:30003",
];
/// Keys committed up front for `claim_done`, which cycles through them.
const DONE_KEYS: usize = 4000;

/// What the store API offers beyond claim and commit, which differs between layouts. The
/// layout before the compact one (db6f667) has none of `Store::commands_sent`,
/// `Store::start_upkeep` and `Store::reads_old_layout`: to run this benchmark there, make
/// `commands_sent` return `None` and `settle` do nothing.
mod shim {
    use super::*;

    /// Commands the store has sent so far, where it counts them.
    pub fn commands_sent(store: &Store) -> Option<u64> {
        Some(store.commands_sent())
    }

    /// Brings a Redis store to its steady state: runs the route's upkeep until the upgrade
    /// check has answered (until then each claim also reads the key's 0.1 name), then stops
    /// it, so no sweeper call lands among the measured commands.
    pub async fn settle(store: &Store, admin: Option<&Admin>, _prefix: &str) {
        if admin.is_none() {
            return;
        }
        let tracker = tokio_util::task::TaskTracker::new();
        let shutdown = tokio_util::sync::CancellationToken::new();
        store.start_upkeep(&[(ROUTE.to_owned(), WINDOW)], &tracker, &shutdown);
        let deadline = Instant::now() + Duration::from_secs(60);
        while store.reads_old_layout(ROUTE) {
            assert!(
                Instant::now() < deadline,
                "the upgrade check did not finish"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }
}

/// A random id spelled like a UUID: 36 characters, as most producers' message ids.
fn uuid() -> String {
    let n: u128 = rand::random();
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn fresh_keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| store_key(prefix, ROUTE, uuid().as_bytes()))
        .collect()
}

/// The `[store]` of a minimal valid configuration; `url` is TOML (a string, or a list for a
/// cluster).
fn store_config(kind: &str, url: &str, prefix: &str) -> StoreConfig {
    let toml = format!(
        r#"
[upstream]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"

[store]
kind = "{kind}"
url = {url}
key_prefix = "{prefix}"
timeout = "5s"

[routes.{ROUTE}]
queue = "q"
exchange = ""
routing_key = "out"
"#
    );
    Config::from_toml(&toml, std::path::Path::new("bench.toml"))
        .unwrap_or_else(|e| panic!("bench config: {e}"))
        .store
}

/// Direct connections to the Redis behind a store, for the upkeep marker and the clean-up.
enum Admin {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Admin {
    /// Connects, or says why not: three tries of up to 5 s (another test may pause the
    /// shared server for a few seconds).
    async fn connect(kind: &str) -> Result<Admin, String> {
        let mut why = String::new();
        for _ in 0..3 {
            match Admin::try_connect(kind).await {
                Ok(admin) => return Ok(admin),
                Err(e) => why = e,
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(why)
    }

    async fn try_connect(kind: &str) -> Result<Admin, String> {
        let attempt = async {
            let admin = if kind == "cluster" {
                let client = redis::cluster::ClusterClient::builder(CLUSTER_SEEDS)
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(Duration::from_secs(2))
                    .build()?;
                Admin::Cluster(client.get_async_connection().await?)
            } else {
                let client = redis::Client::open(REDIS_URL)?;
                Admin::Single(client.get_multiplexed_async_connection().await?)
            };
            match &admin {
                Admin::Single(c) => redis::cmd("PING").query_async::<()>(&mut c.clone()).await?,
                Admin::Cluster(c) => redis::cmd("PING").query_async::<()>(&mut c.clone()).await?,
            }
            Ok::<_, redis::RedisError>(admin)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(admin)) => Ok(admin),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 5 s".into()),
        }
    }

    /// Deletes every key matching `{prefix}:*` (SCAN + UNLINK, on each primary of a cluster);
    /// returns how many.
    async fn clean(&self, prefix: &str) -> u64 {
        let pattern = format!("{prefix}:*");
        match self {
            Admin::Single(c) => scan_unlink(&mut c.clone(), &pattern).await,
            Admin::Cluster(c) => {
                let nodes: String = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut c.clone())
                    .await
                    .expect("CLUSTER NODES");
                let mut deleted = 0;
                // `<id> <ip:port@cport> <flags> ...`: every node flagged master.
                for line in nodes.lines() {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
                        continue;
                    };
                    if !flags.split(',').any(|f| f == "master") {
                        continue;
                    }
                    let addr = addr.split('@').next().unwrap_or(addr);
                    let mut node = redis::Client::open(format!("redis://{addr}"))
                        .expect("node url")
                        .get_multiplexed_async_connection()
                        .await
                        .expect("node connection");
                    deleted += scan_unlink(&mut node, &pattern).await;
                }
                deleted
            }
        }
    }
}

/// One node: SCAN for `pattern`, UNLINK what it finds, one key per command (keys of a cluster
/// node may be in different slots). Key names can be binary (the compact layout's fields).
async fn scan_unlink(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> u64 {
    let mut cursor = 0u64;
    let mut deleted = 0u64;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("UNLINK").arg(key);
            }
            let counts: Vec<u64> = pipe.query_async(conn).await.expect("UNLINK");
            deleted += counts.iter().sum::<u64>();
        }
        cursor = next;
        if cursor == 0 {
            return deleted;
        }
    }
}

/// Deletes the run's keys when dropped, so a failed run cleans up too.
struct Cleanup<'a> {
    rt: &'a Runtime,
    admin: Option<&'a Admin>,
    prefix: &'a str,
    label: &'a str,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some(admin) = self.admin {
            let deleted = self.rt.block_on(admin.clean(self.prefix));
            println!(
                "store/{}: cleaned up {deleted} Redis keys under {}:",
                self.label, self.prefix
            );
        }
    }
}

/// Timed work and commands of one case, over all its runs.
#[derive(Default)]
struct Tally {
    keys: Cell<u64>,
    elapsed: Cell<Duration>,
    commands: Cell<Option<u64>>,
}

impl Tally {
    fn add(&self, keys: usize, elapsed: Duration, commands: Option<u64>) {
        self.keys.set(self.keys.get() + keys as u64);
        self.elapsed.set(self.elapsed.get() + elapsed);
        self.commands
            .set(commands.map(|n| n + self.commands.get().unwrap_or(0)));
    }

    fn print(&self, kind: &str, case: &str, batch: usize) {
        let keys = self.keys.get().max(1) as f64;
        let us = self.elapsed.get().as_secs_f64() * 1e6 / keys;
        let commands = match self.commands.get() {
            Some(n) => format!("{:.3} commands/key", n as f64 / keys),
            None => "commands not counted".to_owned(),
        };
        println!("store/{kind} {case} batch={batch}: {us:.3} µs/key, {commands}");
    }
}

/// Runs `op` on the store `iters` times, timing only the store call; returns the time.
fn timed<S, F>(
    rt: &Runtime,
    store: &Store,
    iters: u64,
    tally: &Tally,
    batch: usize,
    mut op: S,
) -> Duration
where
    S: FnMut() -> F,
    F: std::future::Future<Output = Duration>,
{
    rt.block_on(async {
        let mut total = Duration::ZERO;
        let mut commands = 0u64;
        for _ in 0..iters {
            let before = shim::commands_sent(store);
            total += op().await;
            if let (Some(b), Some(a)) = (before, shim::commands_sent(store)) {
                commands += a - b;
            }
        }
        let counted = shim::commands_sent(store).map(|_| commands);
        tally.add(batch * iters as usize, total, counted);
        total
    })
}

fn bench_kind(c: &mut Criterion, rt: &Runtime, kind: &str) {
    let admin = match kind {
        "memory" => None,
        _ => match rt.block_on(Admin::connect(kind)) {
            Ok(admin) => Some(admin),
            Err(e) => {
                let how = if kind == "cluster" {
                    " (start it with ./scripts/redis-cluster.sh start)"
                } else {
                    ""
                };
                println!("note: skipping store/{kind}: Redis does not answer: {e}{how}");
                return;
            }
        },
    };
    let prefix = format!("dedupd-bench-{:016x}", rand::random::<u64>());
    let url = match kind {
        "memory" | "redis" => format!("{REDIS_URL:?}"),
        _ => format!("{CLUSTER_SEEDS:?}"),
    };
    let store_kind = if kind == "memory" { "memory" } else { "redis" };
    let cfg = store_config(store_kind, &url, &prefix);
    let _cleanup = Cleanup {
        rt,
        admin: admin.as_ref(),
        prefix: &prefix,
        label: kind,
    };
    let store = rt.block_on(async {
        let store = Store::open(&cfg).await.expect("store");
        shim::settle(&store, admin.as_ref(), &prefix).await;
        store
    });
    let owner = Owner::new(Arc::from("bench"), 1);

    // Keys committed up front, in batches of each size, for the duplicate path.
    let done: Vec<String> = fresh_keys(&prefix, DONE_KEYS);
    rt.block_on(async {
        for chunk in done.chunks(200) {
            store
                .claim(chunk, &[], &owner, LEASE, None)
                .await
                .expect("claim");
            store
                .commit(chunk, &[], &owner, WINDOW)
                .await
                .expect("commit");
        }
    });

    let mut group = c.benchmark_group(format!("store/{kind}"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    for batch in BATCHES {
        group.throughput(Throughput::Elements(batch as u64));
        let tally = Tally::default();
        let (store, owner, prefix) = (&store, &owner, prefix.as_str());
        group.bench_function(BenchmarkId::new("claim_fresh", batch), |b| {
            b.iter_custom(|iters| {
                timed(rt, store, iters, &tally, batch, move || async move {
                    let keys = fresh_keys(prefix, batch);
                    let started = Instant::now();
                    let outcomes = store
                        .claim(&keys, &[], owner, LEASE, None)
                        .await
                        .expect("claim");
                    let elapsed = started.elapsed();
                    assert!(outcomes.iter().all(|o| *o == ClaimOutcome::Claimed));
                    elapsed
                })
            })
        });
        tally.print(kind, "claim_fresh", batch);
    }

    for batch in BATCHES {
        group.throughput(Throughput::Elements(batch as u64));
        let tally = Tally::default();
        group.bench_function(BenchmarkId::new("commit", batch), |b| {
            b.iter_custom(|iters| {
                let mut claimed = Vec::with_capacity(iters as usize);
                rt.block_on(async {
                    for _ in 0..iters {
                        let keys = fresh_keys(&prefix, batch);
                        store
                            .claim(&keys, &[], &owner, LEASE, None)
                            .await
                            .expect("claim");
                        claimed.push(keys);
                    }
                });
                let mut claimed = claimed.into_iter();
                timed(rt, &store, iters, &tally, batch, || {
                    let keys = claimed.next().expect("a claimed batch");
                    let (store, owner) = (&store, &owner);
                    async move {
                        let started = Instant::now();
                        let outcomes = store
                            .commit(&keys, &[], owner, WINDOW)
                            .await
                            .expect("commit");
                        let elapsed = started.elapsed();
                        assert!(outcomes.iter().all(|o| *o == CommitOutcome::Committed));
                        elapsed
                    }
                })
            })
        });
        tally.print(kind, "commit", batch);
    }

    for batch in BATCHES {
        group.throughput(Throughput::Elements(batch as u64));
        let tally = Tally::default();
        let mut batches = done.chunks(batch).cycle();
        group.bench_function(BenchmarkId::new("claim_done", batch), |b| {
            b.iter_custom(|iters| {
                timed(rt, &store, iters, &tally, batch, || {
                    let keys = batches.next().expect("a done batch");
                    let (store, owner) = (&store, &owner);
                    async move {
                        let started = Instant::now();
                        let outcomes = store
                            .claim(keys, &[], owner, LEASE, None)
                            .await
                            .expect("claim");
                        let elapsed = started.elapsed();
                        assert!(outcomes.iter().all(|o| *o == ClaimOutcome::Done));
                        elapsed
                    }
                })
            })
        });
        tally.print(kind, "claim_done", batch);
    }
    group.finish();
}

fn bench_store(c: &mut Criterion) {
    // The proxy runs its routes on a current-thread runtime too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    for kind in ["memory", "redis", "cluster"] {
        bench_kind(c, &rt, kind);
    }
}

criterion_group!(benches, bench_store);
criterion_main!(benches);
