//! End-to-end throughput of dedupd against RabbitMQ's own shovel, on the real broker and Redis.
//!
//! `cargo bench --bench throughput` (about 3 minutes with the defaults on 2 cores). Needs
//! RabbitMQ on 127.0.0.1:5672 as guest/guest, Redis on 127.0.0.1:6379, and `rabbitmqctl` /
//! `rabbitmq-plugins` usable by this user (root); enables `rabbitmq_shovel` if it is off and
//! leaves it on. Without `--bench` (which `cargo bench` passes), e.g. under
//! `cargo test --all-targets`, it only says it was skipped.
//!
//! Per duplicate-ratio scenario it runs rounds alternating shovel, dedupd, shovel, dedupd…:
//! each round preloads N persistent 256-byte messages (each with a message_id; duplicates
//! repeat the id of an earlier message) into a fresh durable classic queue, then times moving
//! them to a fresh destination queue, either with a dynamic shovel (ack-mode on-confirm) or
//! with the built `dedupd` binary as a child process (Redis store). Counts are checked after
//! every round, and (unless `DEDUPD_BENCH_VERIFY=0`) the destination is drained and compared
//! message by message, in order, with what should have arrived: a lost, duplicated or
//! reordered message fails the run.
//!
//! The report (markdown, on stdout; progress goes to stderr) can be pasted into the README.
//!
//! Environment:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `DEDUPD_BENCH_N` | 100000 | messages per round |
//! | `DEDUPD_BENCH_DUP` | `0,0.5` | duplicate ratios, one scenario each |
//! | `DEDUPD_BENCH_ROUNDS` | 3 | rounds of each mover per scenario |
//! | `DEDUPD_BENCH_PREFETCH` | 2000 | prefetch of the shovel and of dedupd |
//! | `DEDUPD_BENCH_TUNING` | — | TOML lines for dedupd's `[tuning]`, e.g. `batch_size = 1000` |
//! | `DEDUPD_BENCH_VERIFY` | 1 | 0: skip the message-by-message check of the destination |
//! | `DEDUPD_BENCH_SEED` | 42 | seed of the duplicate positions |
//! | `DEDUPD_BENCH_THROUGHPUT` | 1 | 0: skip the throughput scenarios |
//! | `DEDUPD_BENCH_LATENCY` | 0 | 1: latency at about half the peak rate, shovel and dedupd |
//! | `DEDUPD_BENCH_LATENCY_SECS` | 10 | how long the latency scenario publishes |
//! | `DEDUPD_BENCH_LATENCY_RATE` | half the median dedupd rate (or 2000) | msg/s |
//! | `DEDUPD_BENCH_RSS` | 0 | 1: move `DEDUPD_BENCH_RSS_N` messages through dedupd, sampling RSS |
//! | `DEDUPD_BENCH_RSS_N` | 1000000 | messages of the RSS scenario |
//! | `DEDUPD_BENCH_AUDIT` | 0 | 1: dedupd publishes every dropped duplicate to a `duplicates_exchange` (a fanout exchange bound to one queue), and each round checks that queue holds them all |
//! | `DEDUPD_BENCH_STORE` | `redis` | dedupd's store: `redis` (127.0.0.1:6379), `cluster` (a 3-master Redis Cluster on 127.0.0.1:30001-30003, started by `scripts/redis-cluster.sh` if it is not running), `postgres` (127.0.0.1:5432, user and database `postgres`), `embedded` (a fresh directory under the temp dir), `memory` |
//!
//! Layout: `scenarios.rs` (the rounds and what each checks), `movers.rs` (the shovel and the
//! dedupd child process), `measure.rs` (CPU, RSS, Redis counters, latency), `report.rs` (the
//! tables), `ctx.rs` (the state of a run, clean-up, the publisher); the harness shared with the
//! integration tests is `tests/common/harness.rs`.

#[path = "../../tests/common/harness.rs"]
mod harness;

mod ctx;
mod measure;
mod movers;
mod report;
mod scenarios;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use ctx::{Cleanup, Ctx};
use harness::{command, rabbitmqctl, Broker};
use measure::Redis;
use report::median;
use scenarios::{latency_round, rss_scenario};

/// The route name in every generated config (the `route` label of the metrics).
const ROUTE: &str = "bench";
/// A round that makes no progress for this long has failed.
const STALL: Duration = Duration::from_secs(60);
/// Every body has this size.
const BODY_LEN: usize = 256;

fn main() -> ExitCode {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs bench targets without it,
    // and a three-minute run against live servers is not a unit test.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("throughput: skipped (run it with `cargo bench --bench throughput`)");
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let opts = match runtime.block_on(Opts::from_env()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("dedupd bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async {
        let started = Instant::now();
        let cleanup = Cleanup::default();
        let result = tokio::select! {
            r = run(&opts, &cleanup) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        eprintln!("cleaning up…");
        cleanup.run(&opts.store).await;
        if let StoreChoice::Embedded(dir) = &opts.store {
            // Every dedupd round of the run wrote its keys there, and nothing else did.
            if let Err(e) = std::fs::remove_dir_all(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("cleanup: {}: {e}", dir.display());
                }
            }
        }
        let took = started.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                eprintln!("benchmark finished in {took:.0} s");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("\nBENCHMARK FAILED after {took:.0} s: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Options

pub struct Opts {
    pub n: u32,
    pub dups: Vec<f64>,
    pub rounds: u32,
    pub prefetch: u16,
    pub tuning: String,
    pub verify: bool,
    pub seed: u64,
    pub throughput: bool,
    pub latency: bool,
    pub latency_secs: f64,
    pub latency_rate: Option<f64>,
    pub rss: bool,
    pub rss_n: u32,
    /// Publisher confirms outstanding at once.
    pub window: usize,
    /// dedupd's store.
    pub store: StoreChoice,
    /// Duplicates published to an audit exchange instead of only acked.
    pub audit: bool,
}

/// Which store dedupd uses in the benchmark.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreChoice {
    /// The Redis on 127.0.0.1:6379.
    Redis,
    /// A Redis Cluster: its primaries' URLs.
    Cluster(Vec<String>),
    /// dedupd's in-process store.
    Memory,
    /// PostgreSQL at 127.0.0.1:5432 (database `postgres`, user `postgres`).
    Postgres,
    /// The embedded store, in a directory of its own under the system's temp dir.
    Embedded(std::path::PathBuf),
}

/// The PostgreSQL the `postgres` choice uses.
const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

impl StoreChoice {
    /// `DEDUPD_BENCH_STORE`; a cluster is started when it does not answer.
    async fn from_env() -> Result<StoreChoice> {
        match std::env::var("DEDUPD_BENCH_STORE")
            .as_deref()
            .map(str::trim)
        {
            Err(_) | Ok("" | "redis") => Ok(StoreChoice::Redis),
            Ok("memory") => Ok(StoreChoice::Memory),
            Ok("postgres") => Ok(StoreChoice::Postgres),
            Ok("embedded") => Ok(StoreChoice::Embedded(std::env::temp_dir().join(format!(
                "dedupd-bench-embedded-{:016x}",
                rand::random::<u64>()
            )))),
            Ok("cluster") => {
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-cluster.sh");
                let urls = command(script, &["start"]).await?;
                Ok(StoreChoice::Cluster(
                    urls.trim()
                        .split(',')
                        .map(|u| u.trim().to_owned())
                        .collect(),
                ))
            }
            Ok(other) => bail!(
                "DEDUPD_BENCH_STORE={other:?}: use redis, cluster, postgres, embedded or memory"
            ),
        }
    }

    /// The Redis servers whose counters the report shows (the local one for `memory`, where
    /// they stay near zero).
    pub fn redis_urls(&self) -> Vec<String> {
        match self {
            StoreChoice::Cluster(urls) => urls.clone(),
            _ => vec![harness::REDIS_URL.to_owned()],
        }
    }

    /// The `[store]` lines of dedupd's config (without the key prefix).
    pub fn toml(&self) -> String {
        match self {
            StoreChoice::Redis => format!("kind = \"redis\"\nurl = \"{}\"", harness::REDIS_URL),
            StoreChoice::Cluster(urls) => format!("kind = \"redis\"\nurl = {urls:?}"),
            StoreChoice::Memory => "kind = \"memory\"".to_owned(),
            StoreChoice::Postgres => format!("kind = \"postgres\"\nurl = \"{POSTGRES_URL}\""),
            StoreChoice::Embedded(path) => format!(
                "kind = \"embedded\"\npath = {:?}",
                path.display().to_string()
            ),
        }
    }

    /// Removes what dedupd kept for `prefix` outside Redis: on PostgreSQL, the prefix's table.
    pub async fn forget_prefix(&self, prefix: &str) -> Result<()> {
        if *self != StoreChoice::Postgres {
            return Ok(());
        }
        let table = dedupd::store::postgres_table_name(prefix);
        let (client, conn) = tokio_postgres::connect(POSTGRES_URL, tokio_postgres::NoTls)
            .await
            .map_err(|e| anyhow!("PostgreSQL at {POSTGRES_URL}: {e}"))?;
        let conn = tokio::spawn(conn);
        let dropped = client
            .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
            .await
            .map_err(|e| anyhow!("DROP TABLE \"{table}\": {e}"));
        drop(client);
        let _ = conn.await;
        dropped
    }

    /// For the report.
    pub fn label(&self) -> &'static str {
        match self {
            StoreChoice::Redis => "Redis store",
            StoreChoice::Cluster(_) => "Redis Cluster store (3 primaries)",
            StoreChoice::Memory => "memory store",
            StoreChoice::Postgres => "PostgreSQL store",
            StoreChoice::Embedded(_) => "embedded store",
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().map_err(|e| anyhow!("{name}={v:?}: {e}")),
        _ => Ok(default),
    }
}

fn env_flag(name: &str, default: bool) -> Result<bool> {
    match std::env::var(name).as_deref().map(str::trim) {
        Ok("1" | "true" | "yes") => Ok(true),
        Ok("0" | "false" | "no") => Ok(false),
        Ok("") | Err(_) => Ok(default),
        Ok(v) => bail!("{name}={v:?}: expected 0 or 1"),
    }
}

impl Opts {
    async fn from_env() -> Result<Opts> {
        let n: u32 = env_or("DEDUPD_BENCH_N", 100_000)?;
        if n == 0 {
            bail!("DEDUPD_BENCH_N must be at least 1");
        }
        let dup_text = std::env::var("DEDUPD_BENCH_DUP").unwrap_or_else(|_| "0,0.5".into());
        let dups = dup_text
            .split(',')
            .map(|d| {
                let v: f64 = d
                    .trim()
                    .parse()
                    .map_err(|e| anyhow!("DEDUPD_BENCH_DUP={dup_text:?}: {e}"))?;
                if !(0.0..1.0).contains(&v) {
                    bail!("DEDUPD_BENCH_DUP: {v} is not in [0, 1)");
                }
                Ok(v)
            })
            .collect::<Result<Vec<_>>>()?;
        let rounds: u32 = env_or("DEDUPD_BENCH_ROUNDS", 3)?;
        if rounds == 0 {
            bail!("DEDUPD_BENCH_ROUNDS must be at least 1");
        }
        let latency_rate = match std::env::var("DEDUPD_BENCH_LATENCY_RATE") {
            Ok(v) if !v.trim().is_empty() => Some(
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| *r > 0.0)
                    .ok_or_else(|| anyhow!("DEDUPD_BENCH_LATENCY_RATE={v:?}"))?,
            ),
            _ => None,
        };
        Ok(Opts {
            n,
            dups,
            rounds,
            prefetch: env_or("DEDUPD_BENCH_PREFETCH", 2000)?,
            tuning: std::env::var("DEDUPD_BENCH_TUNING")
                .unwrap_or_default()
                .replace("\\n", "\n"),
            verify: env_flag("DEDUPD_BENCH_VERIFY", true)?,
            seed: env_or("DEDUPD_BENCH_SEED", 42)?,
            throughput: env_flag("DEDUPD_BENCH_THROUGHPUT", true)?,
            latency: env_flag("DEDUPD_BENCH_LATENCY", false)?,
            latency_secs: env_or("DEDUPD_BENCH_LATENCY_SECS", 10.0)?,
            latency_rate,
            rss: env_flag("DEDUPD_BENCH_RSS", false)?,
            rss_n: env_or("DEDUPD_BENCH_RSS_N", 1_000_000)?,
            audit: env_flag("DEDUPD_BENCH_AUDIT", false)?,
            window: 10_000,
            store: StoreChoice::from_env().await?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The run

async fn run(opts: &Opts, cleanup: &Cleanup) -> Result<()> {
    // The shovel plugin (left enabled afterwards: enabling is idempotent and disabling it
    // could disturb someone else's shovels).
    let enabled = command("rabbitmq-plugins", &["list", "-e", "rabbitmq_shovel"]).await?;
    if !enabled
        .lines()
        .any(|l| l.contains("rabbitmq_shovel ") && l.contains('*'))
    {
        eprintln!("enabling the rabbitmq_shovel plugin…");
        command("rabbitmq-plugins", &["enable", "rabbitmq_shovel"]).await?;
    }

    let mut ctx = Ctx {
        opts,
        cleanup,
        broker: Broker::connect("dedupd-bench").await?,
        redis: Redis::connect(&opts.store.redis_urls()).await?,
        run_id: format!("dedupd-bench-{:06x}", rand::random::<u32>() & 0xff_ffff),
        problems: Vec::new(),
        notes: Vec::new(),
        broker_pid: None,
    };
    ctx.broker_pid = rabbitmqctl(&["eval", "list_to_integer(os:getpid())."])
        .await
        .ok()
        .and_then(|p| p.trim().parse().ok());
    let env = report::environment(&mut ctx).await?;
    eprintln!("{env}\nrun id {}", ctx.run_id);

    let mut out = String::new();
    report::header(&mut out, &env);

    let mut scenarios = Vec::new();
    if opts.throughput {
        scenarios = scenarios::throughput(&mut ctx).await?;
        report::throughput(&mut out, opts, &scenarios);
    }

    if opts.latency {
        let rate = opts.latency_rate.unwrap_or_else(|| {
            scenarios
                .first()
                .and_then(|s| median(s.rounds.iter().map(|(_, b)| b.rate)))
                .map_or(2000.0, |peak| (peak / 2.0).round())
        });
        eprintln!(
            "latency: {rate:.0} msg/s for {:.0} s, shovel then dedupd",
            opts.latency_secs
        );
        let a = latency_round(&mut ctx, "shovel", rate, opts.latency_secs).await?;
        let b = latency_round(&mut ctx, "dedupd", rate, opts.latency_secs).await?;
        report::latency(&mut out, opts, rate, &a, &b);
    }

    if opts.rss {
        eprintln!("rss: {} messages through dedupd", opts.rss_n);
        let r = rss_scenario(&mut ctx, opts.rss_n).await?;
        if let Some(note) = report::rss(&mut out, &r) {
            ctx.notes.push(note);
        }
    }

    report::notes(&mut out, &ctx.notes, &ctx.problems);
    println!("\n{out}");
    ctx.broker.close().await;
    if !ctx.problems.is_empty() {
        bail!("{} problem(s), listed above", ctx.problems.len());
    }
    Ok(())
}
