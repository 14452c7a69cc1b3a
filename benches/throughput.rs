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

mod common;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use common::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The route name in every generated config (the `route` label of the metrics).
const ROUTE: &str = "bench";
/// A round that makes no progress for this long has failed.
const STALL: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs bench targets without it,
    // and a three-minute run against live servers is not a unit test.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("throughput: skipped (run it with `cargo bench --bench throughput`)");
        return ExitCode::SUCCESS;
    }
    let opts = match Opts::from_env() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("dedupd bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let started = Instant::now();
        let cleanup = Cleanup::default();
        let result = tokio::select! {
            r = run(&opts, &cleanup) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        };
        eprintln!("cleaning up…");
        cleanup.run().await;
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

struct Opts {
    n: u32,
    dups: Vec<f64>,
    rounds: u32,
    prefetch: u16,
    tuning: String,
    verify: bool,
    seed: u64,
    throughput: bool,
    latency: bool,
    latency_secs: f64,
    latency_rate: Option<f64>,
    rss: bool,
    rss_n: u32,
    /// Publisher confirms outstanding at once.
    window: usize,
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
    fn from_env() -> Result<Opts> {
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
            window: 10_000,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The workload

/// The message numbers to publish, in order, and the first-seen order of the distinct ones
/// (what dedupd must forward).
struct Workload {
    seq: Vec<u32>,
    first_seen: Vec<u32>,
}

/// `round(n × dup)` of the messages (never the first) repeat the id of a uniformly chosen
/// earlier distinct message.
fn workload(n: u32, dup: f64, seed: u64) -> Workload {
    let n = n as usize;
    let dups = ((n as f64 * dup).round() as usize).min(n - 1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut positions: Vec<usize> = (1..n).collect();
    positions.shuffle(&mut rng);
    let mut is_dup = vec![false; n];
    for &p in &positions[..dups] {
        is_dup[p] = true;
    }
    let mut seq = Vec::with_capacity(n);
    let mut first_seen = Vec::with_capacity(n - dups);
    let mut next = 0u32;
    for d in is_dup {
        if d {
            seq.push(rng.random_range(0..next));
        } else {
            seq.push(next);
            first_seen.push(next);
            next += 1;
        }
    }
    Workload { seq, first_seen }
}

// ---------------------------------------------------------------------------------------------
// Shared state of a run

struct Ctx<'a> {
    opts: &'a Opts,
    cleanup: &'a Cleanup,
    broker: Broker,
    redis: Redis,
    /// Prefix of every queue, shovel, Redis key prefix and file of this run.
    run_id: String,
    /// Things that are wrong but not a miscount (reported at the end; the run then fails).
    problems: Vec<String>,
    /// Things worth a look (dedupd log lines, metric oddities).
    notes: Vec<String>,
    /// The RabbitMQ server's OS process, for its CPU time.
    broker_pid: Option<u32>,
}

impl Ctx<'_> {
    /// CPU seconds of the broker and Redis so far.
    async fn server_cpu(&mut self) -> Result<(f64, RedisStats)> {
        let broker = self.broker_pid.and_then(proc_cpu_secs).unwrap_or(f64::NAN);
        Ok((broker, self.redis.stats().await?))
    }
}

impl Ctx<'_> {
    async fn declare(&self, q: &str) -> Result<()> {
        self.cleanup.queue(q);
        // A leftover of the same name would falsify the counts.
        self.broker.delete(q).await?;
        self.broker.declare(q).await
    }

    async fn delete(&self, q: &str) -> Result<()> {
        self.broker.delete(q).await?;
        self.cleanup.queue_gone(q);
        Ok(())
    }

    async fn count(&self, q: &str) -> Result<u32> {
        Ok(self.broker.count(q).await?.messages)
    }

    /// Publishes `seq` to `queue` with wide confirm windows and waits until it holds them all.
    async fn preload(&self, queue: &str, seq: &[u32]) -> Result<Duration> {
        let started = Instant::now();
        let mut p = Publisher::connect(self.opts.window).await?;
        for &num in seq {
            p.publish(queue, num).await?;
        }
        p.close().await?;
        let n = seq.len() as u32;
        wait_until(
            &format!("{queue} to hold the {n} preloaded messages"),
            Duration::from_secs(60),
            || async {
                let c = self.count(queue).await?;
                if c > n {
                    bail!("{queue} holds {c} messages after publishing {n}");
                }
                Ok((c == n).then_some(()))
            },
        )
        .await?;
        Ok(started.elapsed())
    }

    /// Generous deadline for moving `n` messages.
    fn move_limit(n: u64) -> Duration {
        Duration::from_secs(120 + n / 500)
    }

    /// Checks that `queue` holds exactly `expected` (in order) and nothing else, by draining it.
    async fn verify(&mut self, queue: &str, expected: &[u32], what: &str) -> Result<()> {
        let count = self.count(queue).await?;
        if count as usize != expected.len() {
            bail!(
                "{what}: {queue} holds {count} messages, expected {} ({})",
                expected.len(),
                if (count as usize) < expected.len() {
                    "messages lost"
                } else {
                    "duplicates forwarded"
                }
            );
        }
        if !self.opts.verify {
            return Ok(());
        }
        let target = Arc::new(AtomicU64::new(expected.len() as u64));
        let limit = Duration::from_secs(60 + expected.len() as u64 / 2000);
        let sink = spawn_sink(&self.broker, queue, target, STALL, limit)
            .await?
            .await
            .context("sink task")?;
        if sink.foreign > 0 {
            bail!(
                "{what}: {} messages in {queue} without a benchmark message_id",
                sink.foreign
            );
        }
        if sink.ids.len() != expected.len() {
            bail!(
                "{what}: drained {} of the {} messages {queue} held",
                sink.ids.len(),
                expected.len()
            );
        }
        if sink.ids != expected {
            let mut got = sink.ids.clone();
            let mut want = expected.to_vec();
            got.sort_unstable();
            want.sort_unstable();
            if got != want {
                let got_set: HashSet<u32> = got.iter().copied().collect();
                let want_set: HashSet<u32> = want.iter().copied().collect();
                let lost: Vec<_> = want_set.difference(&got_set).take(5).collect();
                let extra: Vec<_> = got_set.difference(&want_set).take(5).collect();
                let repeated = got.windows(2).filter(|w| w[0] == w[1]).count();
                bail!(
                    "{what}: {queue} does not hold the expected messages: e.g. missing ids {lost:?}, \
                     unexpected ids {extra:?}, {repeated} repeated"
                );
            }
            let at = sink
                .ids
                .iter()
                .zip(expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            self.problems.push(format!(
                "{what}: right messages in the wrong order (first difference at position {at}: \
                 got m-{:07}, expected m-{:07})",
                sink.ids[at], expected[at]
            ));
        }
        Ok(())
    }
}

/// When a move started and ended.
struct Timing {
    /// The mover was told to start (rabbitmqctl started / process spawned).
    start: Instant,
    /// Last poll that saw the source untouched (≈ the consumer attached).
    first: Instant,
    done: Instant,
}

impl Timing {
    /// Seconds from the first message leaving the source to the end.
    fn secs(&self) -> f64 {
        (self.done - self.first).as_secs_f64()
    }
    /// Seconds including startup (process start, or the rabbitmqctl call).
    fn wall_secs(&self) -> f64 {
        (self.done - self.start).as_secs_f64()
    }
}

/// What is moving the messages, for the completion and liveness checks.
enum Mover<'a> {
    Shovel(&'a mut Option<tokio::task::JoinHandle<Result<String>>>),
    Dedupd {
        proxy: &'a mut Proxy,
        port: u16,
        consumed: u64,
    },
}

impl Mover<'_> {
    fn check_alive(&mut self) -> Result<()> {
        match self {
            Mover::Shovel(_) => Ok(()),
            Mover::Dedupd { proxy, .. } => proxy.check_alive(),
        }
    }

    /// Whether the mover has finished its part (besides the queue counts).
    async fn finished(&mut self) -> Result<bool> {
        match self {
            Mover::Shovel(set) => match set {
                Some(h) if h.is_finished() => {
                    set.take().expect("checked").await??;
                    Ok(true)
                }
                Some(_) => Ok(false),
                None => Ok(true),
            },
            Mover::Dedupd {
                port, consumed: n, ..
            } => {
                let m = scrape(*port).await?;
                let labels = [("route", ROUTE)];
                let consumed = m.sum("dedupd_messages_consumed_total", &labels);
                let inflight = m.sum("dedupd_inflight_messages", &labels);
                Ok(consumed >= *n as f64 && inflight == 0.0)
            }
        }
    }
}

/// Polls until `src` is empty, `dst` holds at least `expect_dst` and the mover is done.
async fn wait_moved(
    ctx: &Ctx<'_>,
    src: &str,
    dst: &str,
    n: u32,
    expect_dst: u32,
    start: Instant,
    mover: &mut Mover<'_>,
) -> Result<Timing> {
    let limit = Ctx::move_limit(n as u64);
    let mut untouched = start;
    let mut first = None;
    let mut last = (u32::MAX, u32::MAX);
    let mut last_change = Instant::now();
    loop {
        mover.check_alive()?;
        let polled = Instant::now();
        let s = ctx.count(src).await?;
        let d = ctx.count(dst).await?;
        if first.is_none() {
            if s < n || d > 0 {
                first = Some(untouched);
            } else {
                untouched = polled;
            }
        }
        if s == 0 && d >= expect_dst && mover.finished().await? {
            return Ok(Timing {
                start,
                first: first.unwrap_or(start),
                done: Instant::now(),
            });
        }
        if (s, d) != last {
            last = (s, d);
            last_change = Instant::now();
        } else if last_change.elapsed() > STALL && s + d > 0 {
            bail!(
                "no progress for {STALL:?}: {src} holds {s} ready, {dst} holds {d} (expected {expect_dst})"
            );
        }
        if start.elapsed() > limit {
            bail!("not done after {limit:?}: {src} holds {s} ready, {dst} holds {d} (expected {expect_dst})");
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Rounds

struct ShovelRound {
    rate: f64,
    /// CPU µs per message of the broker.
    broker_us: f64,
}

struct DedupdRound {
    rate: f64,
    /// CPU µs per message of the broker, dedupd and Redis.
    broker_us: f64,
    proxy_us: f64,
    redis_us: f64,
    cmds_per_msg: f64,
    evalsha_per_msg: f64,
    msgs_per_rtt: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    hwm_mb: f64,
    /// Per command, calls per message (script-internal calls included).
    breakdown: String,
}

fn shovel_json(src: &str, dst: &str, prefetch: u16) -> String {
    serde_json::json!({
        "src-protocol": "amqp091",
        "src-uri": AMQP_URL,
        "src-queue": src,
        "src-prefetch-count": prefetch,
        "src-delete-after": "never",
        "dest-protocol": "amqp091",
        "dest-uri": AMQP_URL,
        "dest-queue": dst,
        "ack-mode": "on-confirm",
    })
    .to_string()
}

async fn start_shovel(
    ctx: &Ctx<'_>,
    name: &str,
    src: &str,
    dst: &str,
) -> tokio::task::JoinHandle<Result<String>> {
    ctx.cleanup.shovel(name);
    let json = shovel_json(src, dst, ctx.opts.prefetch);
    let name = name.to_owned();
    tokio::spawn(async move { rabbitmqctl(&["set_parameter", "shovel", &name, &json]).await })
}

async fn stop_shovel(ctx: &Ctx<'_>, name: &str) -> Result<()> {
    rabbitmqctl(&["clear_parameter", "shovel", name]).await?;
    ctx.cleanup.shovel_gone(name);
    Ok(())
}

async fn shovel_round(ctx: &mut Ctx<'_>, tag: &str, wl: &Workload) -> Result<ShovelRound> {
    let name = format!("{}-{tag}-shovel", ctx.run_id);
    let (src, dst) = (format!("{name}.in"), format!("{name}.out"));
    let n = wl.seq.len() as u32;
    ctx.declare(&src).await?;
    ctx.declare(&dst).await?;
    let pre = ctx.preload(&src, &wl.seq).await?;
    eprintln!(
        "  [{tag}] shovel: preloaded {n} in {:.1} s",
        pre.as_secs_f64()
    );

    let (cpu0, _) = ctx.server_cpu().await?;
    let start = Instant::now();
    let mut set = Some(start_shovel(ctx, &name, &src, &dst).await);
    let timing = wait_moved(ctx, &src, &dst, n, n, start, &mut Mover::Shovel(&mut set)).await;
    let (cpu1, _) = ctx.server_cpu().await?;
    let stopped = stop_shovel(ctx, &name).await;
    let timing = timing?;
    stopped?;
    let rate = n as f64 / timing.secs();
    let broker_us = (cpu1 - cpu0) * 1e6 / n as f64;
    eprintln!(
        "  [{tag}] shovel: {n} moved in {:.2} s → {rate:.0} msg/s ({:.0} msg/s counting the {:.2} s rabbitmqctl call); RabbitMQ CPU {broker_us:.0} µs/msg",
        timing.secs(),
        n as f64 / timing.wall_secs(),
        (timing.first - timing.start).as_secs_f64(),
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = ctx.count(&src).await?;
    if left != 0 {
        bail!("shovel {tag}: {left} messages left in {src}");
    }
    ctx.verify(&dst, &wl.seq, &format!("shovel {tag}")).await?;
    ctx.delete(&src).await?;
    ctx.delete(&dst).await?;
    Ok(ShovelRound { rate, broker_us })
}

/// A running proxy with its port and key prefix.
struct Started {
    proxy: Proxy,
    port: u16,
    prefix: String,
}

fn dedupd_config(ctx: &Ctx<'_>, prefix: &str, port: u16, src: &str, dst: &str) -> String {
    format!(
        r#"[upstream]
url = "{AMQP_URL}"
prefetch = {prefetch}

[store]
kind = "redis"
url = "{REDIS_URL}"
key_prefix = "{prefix}"

[metrics]
listen = "127.0.0.1:{port}"

[tuning]
{tuning}

[routes.{ROUTE}]
queue = "{src}"
exchange = ""
routing_key = "{dst}"
key = "message_id"
window = "1h"
"#,
        prefetch = ctx.opts.prefetch,
        tuning = ctx.opts.tuning,
    )
}

fn start_dedupd(ctx: &Ctx<'_>, name: &str, src: &str, dst: &str) -> Result<Started> {
    let prefix = name.to_owned();
    ctx.cleanup.prefix(&prefix);
    let port = free_port()?;
    let dir = std::env::temp_dir();
    let config = dir.join(format!("{name}.toml"));
    ctx.cleanup.file(config.clone());
    std::fs::write(&config, dedupd_config(ctx, &prefix, port, src, dst))
        .with_context(|| format!("writing {}", config.display()))?;
    let log = dir.join(format!("{name}.log"));
    let proxy = Proxy::spawn(&config, log)?;
    Ok(Started {
        proxy,
        port,
        prefix,
    })
}

/// SIGTERM, exit status, log lines; removes the Redis keys.
async fn stop_dedupd(ctx: &mut Ctx<'_>, what: &str, mut s: Started) -> Result<()> {
    let status = s.proxy.terminate(Duration::from_secs(30)).await?;
    if !status.success() {
        ctx.problems.push(format!(
            "{what}: dedupd exited with {status} after SIGTERM; log tail:\n{}",
            s.proxy.log_tail(20)
        ));
    }
    let lines = s.proxy.log_lines();
    if lines > 0 {
        ctx.notes.push(format!(
            "{what}: dedupd logged {lines} line(s) at warn level or above ({}); last ones:\n```\n{}\n```",
            s.proxy.log.display(),
            s.proxy.log_tail(5)
        ));
    } else {
        let _ = std::fs::remove_file(&s.proxy.log);
    }
    ctx.redis.delete_prefix(&s.prefix).await?;
    ctx.cleanup.prefix_gone(&s.prefix);
    Ok(())
}

async fn dedupd_round(ctx: &mut Ctx<'_>, tag: &str, wl: &Workload) -> Result<DedupdRound> {
    let name = format!("{}-{tag}-dedupd", ctx.run_id);
    let (src, dst) = (format!("{name}.in"), format!("{name}.out"));
    let n = wl.seq.len() as u32;
    let unique = wl.first_seen.len() as u32;
    ctx.declare(&src).await?;
    ctx.declare(&dst).await?;
    let pre = ctx.preload(&src, &wl.seq).await?;
    eprintln!(
        "  [{tag}] dedupd: preloaded {n} in {:.1} s",
        pre.as_secs_f64()
    );

    let (broker0, redis_before) = ctx.server_cpu().await?;
    let start = Instant::now();
    let mut started = start_dedupd(ctx, &name, &src, &dst)?;
    let timing = wait_moved(
        ctx,
        &src,
        &dst,
        n,
        unique,
        start,
        &mut Mover::Dedupd {
            proxy: &mut started.proxy,
            port: started.port,
            consumed: n as u64,
        },
    )
    .await;
    let timing = match timing {
        Ok(t) => t,
        Err(e) => {
            if started.proxy.check_alive().is_err() {
                // The error carries the log already.
                return Err(e.context(format!("dedupd {tag}")));
            }
            let _ = started.proxy.terminate(Duration::from_secs(15)).await;
            let log = started.proxy.log.display().to_string();
            let tail = started.proxy.log_tail(20);
            return Err(e.context(format!("dedupd {tag} (log {log}); its tail:\n{tail}")));
        }
    };
    let (broker1, redis_after) = ctx.server_cpu().await?;
    let proxy_cpu = proc_cpu_secs(started.proxy.pid).unwrap_or(f64::NAN);
    let m = scrape(started.port).await?;
    let hwm_kb = proc_status_kb(started.proxy.pid, "VmHWM").unwrap_or(0);
    let what = format!("dedupd {tag}");
    stop_dedupd(ctx, &what, started).await?;

    let labels = [("route", ROUTE)];
    let consumed = m.sum("dedupd_messages_consumed_total", &labels);
    let forwarded = m.sum("dedupd_messages_forwarded_total", &labels);
    let duplicates = m.sum("dedupd_duplicates_total", &labels);
    let takeovers = m.sum("dedupd_takeovers_total", &labels);
    let rejected = m.sum("dedupd_messages_rejected_total", &labels);
    let store_errors = m.sum("dedupd_store_errors_total", &labels);
    let round_trips = m.sum("dedupd_store_duration_seconds_count", &[]);
    if consumed != n as f64
        || forwarded != unique as f64
        || duplicates != (n - unique) as f64
        || takeovers + rejected + store_errors > 0.0
    {
        ctx.notes.push(format!(
            "{what}: metrics consumed {consumed}, forwarded {forwarded}, duplicates {duplicates}, \
             takeovers {takeovers}, rejected {rejected}, store errors {store_errors} \
             (expected {n}, {unique}, {}, 0, 0, 0)",
            n - unique
        ));
    }
    let q = |q: f64| {
        m.quantile("dedupd_forward_duration_seconds", &labels, q)
            .map(|s| s * 1000.0)
    };
    let round = DedupdRound {
        rate: n as f64 / timing.secs(),
        broker_us: (broker1 - broker0) * 1e6 / n as f64,
        proxy_us: proxy_cpu * 1e6 / n as f64,
        redis_us: (redis_after.cpu_secs - redis_before.cpu_secs) * 1e6 / n as f64,
        cmds_per_msg: (redis_after.commands - redis_before.commands) as f64 / n as f64,
        evalsha_per_msg: redis_after.calls_since(&redis_before, "evalsha") as f64 / n as f64,
        msgs_per_rtt: if round_trips > 0.0 {
            n as f64 / round_trips
        } else {
            f64::NAN
        },
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        hwm_mb: hwm_kb as f64 / 1024.0,
        breakdown: {
            let mut per: Vec<(String, f64)> = redis_after
                .calls
                .keys()
                .map(|c| {
                    let calls = redis_after.calls_since(&redis_before, c);
                    (c.clone(), calls as f64 / n as f64)
                })
                .filter(|(_, v)| *v >= 0.005)
                .collect();
            per.sort_by(|a, b| b.1.total_cmp(&a.1));
            per.iter()
                .map(|(c, v)| format!("{c} {v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
    };
    eprintln!(
        "  [{tag}] dedupd: {n} consumed, {unique} forwarded in {:.2} s → {:.0} msg/s ({:.0} msg/s from spawn); \
         Redis {:.2} cmds/msg ({}), {:.0} msgs/store round trip; delivery→ack p50 {} p99 {} ms; VmHWM {:.1} MB; CPU µs/msg: RabbitMQ {:.0}, dedupd {:.0}, Redis {:.0}",
        timing.secs(),
        round.rate,
        n as f64 / timing.wall_secs(),
        round.cmds_per_msg,
        round.breakdown,
        round.msgs_per_rtt,
        fmt_ms(round.p50_ms),
        fmt_ms(round.p99_ms),
        round.hwm_mb,
        round.broker_us,
        round.proxy_us,
        round.redis_us,
    );

    let left = ctx.count(&src).await?;
    if left != 0 {
        bail!("{what}: {left} messages left in {src}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    ctx.verify(&dst, &wl.first_seen, &what).await?;
    ctx.delete(&src).await?;
    ctx.delete(&dst).await?;
    Ok(round)
}

// ---------------------------------------------------------------------------------------------
// Latency at a fixed rate

struct LatencyRound {
    mover: &'static str,
    rate: f64,
    sent: u64,
    e2e_p50_ms: f64,
    e2e_p99_ms: f64,
    proxy_p50_ms: Option<f64>,
    proxy_p99_ms: Option<f64>,
}

/// Publishes unique messages at `rate` for `secs` while `mover` runs, measuring publish →
/// arrival in the destination for every message (and dedupd's delivery → ack histogram).
async fn latency_round(
    ctx: &mut Ctx<'_>,
    mover: &'static str,
    rate: f64,
    secs: f64,
) -> Result<LatencyRound> {
    let name = format!("{}-latency-{mover}", ctx.run_id);
    let (src, dst) = (format!("{name}.in"), format!("{name}.out"));
    ctx.declare(&src).await?;
    ctx.declare(&dst).await?;
    let mut started = None;
    if mover == "shovel" {
        start_shovel(ctx, &name, &src, &dst).await.await??;
    } else {
        started = Some(start_dedupd(ctx, &name, &src, &dst)?);
    }
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while ctx.broker.count(&src).await?.consumers == 0 {
            if let Some(s) = started.as_mut() {
                s.proxy.check_alive()?;
            }
            if Instant::now() > deadline {
                bail!("latency {mover}: nothing consumes {src} after 30 s");
            }
            tokio::time::sleep(POLL).await;
        }
        let target = Arc::new(AtomicU64::new(u64::MAX));
        let limit = Duration::from_secs_f64(secs) + Ctx::move_limit((rate * secs) as u64);
        let sink = spawn_sink(&ctx.broker, &dst, target.clone(), STALL, limit).await?;

        let total = (rate * secs).round().max(1.0) as u64;
        let mut p = Publisher::connect(2_000).await?;
        let began = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        while p.sent < total {
            tick.tick().await;
            let due = ((began.elapsed().as_secs_f64() * rate) as u64).min(total);
            while p.sent < due {
                p.publish(&src, p.sent as u32).await?;
            }
        }
        let publish_secs = began.elapsed().as_secs_f64();
        p.close().await?;
        target.store(total, Ordering::Release);
        let sink = sink.await.context("sink task")?;
        if sink.ids.len() as u64 != total {
            bail!(
                "latency {mover}: {} of {total} messages arrived in {dst}",
                sink.ids.len()
            );
        }
        let distinct: HashSet<u32> = sink.ids.iter().copied().collect();
        if distinct.len() as u64 != total {
            bail!(
                "latency {mover}: {} duplicates arrived",
                total - distinct.len() as u64
            );
        }
        let (mut proxy_p50, mut proxy_p99) = (None, None);
        if let Some(s) = started.as_mut() {
            let port = s.port;
            let m = wait_until(
                "dedupd to settle every message",
                Duration::from_secs(30),
                || async move {
                    let m = scrape(port).await?;
                    let labels = [("route", ROUTE)];
                    let done = m.sum("dedupd_messages_consumed_total", &labels) >= total as f64
                        && m.sum("dedupd_inflight_messages", &labels) == 0.0;
                    Ok(done.then_some(m))
                },
            )
            .await?;
            let labels = [("route", ROUTE)];
            proxy_p50 = m
                .quantile("dedupd_forward_duration_seconds", &labels, 0.5)
                .map(|s| s * 1000.0);
            proxy_p99 = m
                .quantile("dedupd_forward_duration_seconds", &labels, 0.99)
                .map(|s| s * 1000.0);
        }
        let mut lat = sink.latencies_us;
        lat.sort_unstable();
        let ms = |q| quantile_of_samples(&lat, q).unwrap_or(0) as f64 / 1000.0;
        Ok(LatencyRound {
            mover,
            rate: total as f64 / publish_secs,
            sent: total,
            e2e_p50_ms: ms(0.5),
            e2e_p99_ms: ms(0.99),
            proxy_p50_ms: proxy_p50,
            proxy_p99_ms: proxy_p99,
        })
    }
    .await;
    match started {
        Some(s) => stop_dedupd(ctx, &format!("latency {mover}"), s).await?,
        None => stop_shovel(ctx, &name).await?,
    }
    let result = result?;
    eprintln!(
        "  latency {mover}: {} msgs at {:.0} msg/s: publish→arrival p50 {:.2} ms p99 {:.2} ms; delivery→ack p50 {} p99 {} ms",
        result.sent,
        result.rate,
        result.e2e_p50_ms,
        result.e2e_p99_ms,
        fmt_ms(result.proxy_p50_ms),
        fmt_ms(result.proxy_p99_ms)
    );
    ctx.delete(&src).await?;
    ctx.delete(&dst).await?;
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// Memory over many messages

struct RssSample {
    secs: f64,
    consumed: f64,
    rss_mb: f64,
}

struct RssResult {
    n: u32,
    secs: f64,
    samples: Vec<RssSample>,
    hwm_mb: f64,
}

/// Moves `n` unique messages through dedupd, publishing while it runs (the source backlog
/// kept under 200k), sampling the child's RSS every second.
async fn rss_scenario(ctx: &mut Ctx<'_>, n: u32) -> Result<RssResult> {
    let name = format!("{}-rss-dedupd", ctx.run_id);
    let (src, dst) = (format!("{name}.in"), format!("{name}.out"));
    ctx.declare(&src).await?;
    ctx.declare(&dst).await?;
    let target = Arc::new(AtomicU64::new(n as u64));
    let limit = Ctx::move_limit(n as u64);
    let sink = spawn_sink(&ctx.broker, &dst, target, Duration::from_secs(120), limit).await?;
    let publisher = {
        let src = src.clone();
        let window = ctx.opts.window;
        tokio::spawn(async move {
            let counter = Broker::connect("dedupd-bench backlog").await?;
            let mut p = Publisher::connect(window).await?;
            let deadline = Instant::now() + limit;
            for chunk_start in (0..n).step_by(10_000) {
                while counter.count(&src).await?.messages > 200_000 {
                    if Instant::now() > deadline {
                        bail!("the source backlog did not shrink before the deadline");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                for num in chunk_start..(chunk_start + 10_000).min(n) {
                    p.publish(&src, num).await?;
                }
            }
            p.close().await?;
            counter.close().await;
            Ok(())
        })
    };
    let mut s = start_dedupd(ctx, &name, &src, &dst)?;
    let began = Instant::now();
    let result = async {
        let mut samples = Vec::new();
        let mut last_change = (Instant::now(), -1.0);
        while !sink.is_finished() {
            s.proxy.check_alive()?;
            let consumed = scrape(s.port)
                .await
                .map(|m| m.sum("dedupd_messages_consumed_total", &[("route", ROUTE)]))
                .unwrap_or(0.0);
            let rss = proc_status_kb(s.proxy.pid, "VmRSS").unwrap_or(0) as f64 / 1024.0;
            samples.push(RssSample {
                secs: began.elapsed().as_secs_f64(),
                consumed,
                rss_mb: rss,
            });
            if consumed != last_change.1 {
                last_change = (Instant::now(), consumed);
            } else if last_change.0.elapsed() > Duration::from_secs(120) {
                bail!("rss: dedupd consumed nothing for 120 s (at {consumed})");
            }
            if began.elapsed() > limit {
                bail!("rss: not done after {limit:?}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        publisher.await.context("publisher task")??;
        let got = sink.await.context("sink task")?;
        if got.ids.len() != n as usize {
            bail!("rss: {} of {n} messages arrived", got.ids.len());
        }
        let mut seen = vec![false; n as usize];
        for id in &got.ids {
            match seen.get_mut(*id as usize) {
                Some(s) if !*s => *s = true,
                _ => bail!("rss: m-{id:07} arrived twice (or is not ours)"),
            }
        }
        let secs = began.elapsed().as_secs_f64();
        let port = s.port;
        let consumed = wait_until(
            "dedupd to settle every message",
            Duration::from_secs(30),
            || async move {
                let m = scrape(port).await?;
                let labels = [("route", ROUTE)];
                let consumed = m.sum("dedupd_messages_consumed_total", &labels);
                Ok((m.sum("dedupd_inflight_messages", &labels) == 0.0).then_some(consumed))
            },
        )
        .await?;
        samples.push(RssSample {
            secs: began.elapsed().as_secs_f64(),
            consumed,
            rss_mb: proc_status_kb(s.proxy.pid, "VmRSS").unwrap_or(0) as f64 / 1024.0,
        });
        let hwm = proc_status_kb(s.proxy.pid, "VmHWM").unwrap_or(0) as f64 / 1024.0;
        Ok(RssResult {
            n,
            secs,
            samples,
            hwm_mb: hwm,
        })
    }
    .await;
    stop_dedupd(ctx, "rss", s).await?;
    let result = result?;
    ctx.delete(&src).await?;
    ctx.delete(&dst).await?;
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// Report

fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.decimals$}"))
}

fn scenario_name(dup: f64) -> String {
    format!("{:.0}% duplicates", dup * 100.0)
}

struct Scenario {
    dup: f64,
    unique: usize,
    rounds: Vec<(ShovelRound, DedupdRound)>,
}

async fn environment(ctx: &mut Ctx<'_>) -> Result<String> {
    let date = command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).await?;
    let nproc = command("nproc", &[]).await?;
    let rabbit = rabbitmqctl(&["version"]).await?;
    let redis = ctx.redis.version().await?;
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(String::new(), |kb| {
            format!(", {:.0} GiB RAM", kb / 1024.0 / 1024.0)
        });
    let dir = env!("CARGO_MANIFEST_DIR");
    let commit = command("git", &["-C", dir, "rev-parse", "--short", "HEAD"])
        .await
        .map(|c| c.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let dirty = command("git", &["-C", dir, "status", "--porcelain", "--", "src"])
        .await
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false);
    Ok(format!(
        "{date}; `nproc` {nproc}{mem}; RabbitMQ {rabbit}, Redis {redis}; dedupd {} (git {commit}{})",
        env!("CARGO_PKG_VERSION"),
        if dirty { ", src/ with uncommitted changes" } else { "" },
        date = date.trim(),
        nproc = nproc.trim(),
        rabbit = rabbit.trim(),
    ))
}

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
        redis: Redis::connect().await?,
        run_id: format!("dedupd-bench-{:06x}", rand::random::<u32>() & 0xff_ffff),
        problems: Vec::new(),
        notes: Vec::new(),
        broker_pid: None,
    };
    ctx.broker_pid = rabbitmqctl(&["eval", "list_to_integer(os:getpid())."])
        .await
        .ok()
        .and_then(|p| p.trim().parse().ok());
    let env = environment(&mut ctx).await?;
    eprintln!("{env}\nrun id {}", ctx.run_id);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "### dedupd vs. RabbitMQ shovel, end to end (provisional)\n"
    );
    let _ = writeln!(out, "- {env}");

    let mut scenarios = Vec::new();
    if opts.throughput {
        for (si, &dup) in opts.dups.iter().enumerate() {
            let wl = workload(opts.n, dup, opts.seed.wrapping_add(si as u64));
            eprintln!(
                "scenario {}: {} messages, {} distinct",
                scenario_name(dup),
                wl.seq.len(),
                wl.first_seen.len()
            );
            let mut rounds = Vec::new();
            for r in 1..=opts.rounds {
                let tag = format!("d{si}-r{r}");
                let a = shovel_round(&mut ctx, &tag, &wl).await?;
                let b = dedupd_round(&mut ctx, &tag, &wl).await?;
                rounds.push((a, b));
            }
            scenarios.push(Scenario {
                dup,
                unique: wl.first_seen.len(),
                rounds,
            });
        }
        let tuning = if opts.tuning.trim().is_empty() {
            "default `[tuning]`".to_owned()
        } else {
            format!("`[tuning]` {}", opts.tuning.trim().replace('\n', "; "))
        };
        let _ = writeln!(
            out,
            "- workload: {} persistent messages of {BODY_LEN} B per round, each with a message_id \
             (duplicates repeat the id of a random earlier message), preloaded into a durable \
             classic queue; moved to another durable classic queue on the same broker by a \
             dynamic shovel (ack-mode on-confirm) or by dedupd (Redis store, window 1h, {tuning}); \
             prefetch {} for both; {} round(s) of each, alternating shovel, dedupd",
            opts.n, opts.prefetch, opts.rounds
        );
        let _ = writeln!(
            out,
            "- msg/s = messages consumed from the source ÷ seconds from the first message leaving \
             it until it is empty, the destination holds every expected message and dedupd has \
             nothing in flight (queue counts and /metrics polled every 20 ms; process start and \
             the `rabbitmqctl set_parameter` call are not counted); ratio = dedupd ÷ shovel"
        );
        let _ = writeln!(
            out,
            "- every round's destination was {}",
            if opts.verify {
                "drained and checked message by message: exactly the expected ids, in order"
            } else {
                "counted (DEDUPD_BENCH_VERIFY=0: not drained)"
            }
        );
        let _ = writeln!(
            out,
            "\n| scenario | round | shovel msg/s | dedupd msg/s | ratio |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|");
        for s in &scenarios {
            for (i, (a, b)) in s.rounds.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.0} | {:.2} |",
                    scenario_name(s.dup),
                    i + 1,
                    a.rate,
                    b.rate,
                    b.rate / a.rate
                );
            }
        }
        let _ = writeln!(
            out,
            "\n| scenario | median shovel msg/s | median dedupd msg/s | median ratio | Redis EVALSHA/msg | Redis cmds/msg incl. in scripts | msgs per store round trip | delivery→ack p50 ms | p99 ms | peak RSS MB |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for s in &scenarios {
            let d = || s.rounds.iter().map(|(_, b)| b);
            let _ = writeln!(
                out,
                "| {} ({} distinct) | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |",
                scenario_name(s.dup),
                s.unique,
                fmt_opt(median(s.rounds.iter().map(|(a, _)| a.rate)), 0),
                fmt_opt(median(d().map(|b| b.rate)), 0),
                fmt_opt(median(s.rounds.iter().map(|(a, b)| b.rate / a.rate)), 2),
                fmt_opt(median(d().map(|b| b.evalsha_per_msg)), 2),
                fmt_opt(median(d().map(|b| b.cmds_per_msg)), 2),
                fmt_opt(median(d().map(|b| b.msgs_per_rtt)), 0),
                fmt_ms(median(d().filter_map(|b| b.p50_ms))),
                fmt_ms(median(d().filter_map(|b| b.p99_ms))),
                d().map(|b| b.hwm_mb).fold(0.0, f64::max),
            );
        }
        let _ = writeln!(
            out,
            "\nRedis per message: `cmdstat_evalsha` calls (what dedupd sends) and \
             `total_commands_processed` (which also counts the GET/SET each script runs) deltas ÷ \
             messages consumed; server-wide, so other clients of the same Redis add to them. \
             Store round trips: `dedupd_store_duration_seconds_count`, all ops. Latency: interpolated \
             in the buckets of `dedupd_forward_duration_seconds` (delivery → upstream ack) while \
             draining the preloaded backlog, so it includes waiting in the proxy's prefetch \
             buffer. Peak RSS: `VmHWM` of the dedupd process."
        );
        let _ = writeln!(
            out,
            "\n| scenario | CPU µs/msg, shovel round: RabbitMQ | dedupd round: RabbitMQ | dedupd | Redis | dedupd round total |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        for s in &scenarios {
            let d = || s.rounds.iter().map(|(_, b)| b);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                scenario_name(s.dup),
                fmt_opt(median(s.rounds.iter().map(|(a, _)| a.broker_us)), 0),
                fmt_opt(median(d().map(|b| b.broker_us)), 0),
                fmt_opt(median(d().map(|b| b.proxy_us)), 0),
                fmt_opt(median(d().map(|b| b.redis_us)), 0),
                fmt_opt(
                    median(d().map(|b| b.broker_us + b.proxy_us + b.redis_us)),
                    0
                ),
            );
        }
        let _ = writeln!(
            out,
            "\nCPU: user + system time of the RabbitMQ server process (/proc), of the dedupd \
             process (startup included) and of Redis (`INFO cpu`) during the timed part, ÷ \
             messages; medians over rounds. RabbitMQ and Redis figures include any other \
             client's load."
        );
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
        let _ = writeln!(
            out,
            "\n#### Latency at a steady {rate:.0} msg/s ({}), {:.0} s, unique ids\n",
            if opts.latency_rate.is_some() {
                "DEDUPD_BENCH_LATENCY_RATE"
            } else {
                "about half dedupd's median peak rate"
            },
            opts.latency_secs
        );
        let _ = writeln!(
            out,
            "| mover | messages | publish→arrival p50 ms | p99 ms | dedupd delivery→ack p50 ms | p99 ms |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        for r in [&a, &b] {
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {:.2} | {} | {} |",
                r.mover,
                r.sent,
                r.e2e_p50_ms,
                r.e2e_p99_ms,
                fmt_ms(r.proxy_p50_ms),
                fmt_ms(r.proxy_p99_ms)
            );
        }
        let _ = writeln!(
            out,
            "\npublish→arrival: from the publisher's timestamp in the body to the benchmark's \
             auto-ack consumer on the destination queue (exact, per message)."
        );
    }

    if opts.rss {
        eprintln!("rss: {} messages through dedupd", opts.rss_n);
        let r = rss_scenario(&mut ctx, opts.rss_n).await?;
        let max = r.samples.iter().map(|s| s.rss_mb).fold(0.0, f64::max);
        let _ = writeln!(
            out,
            "\n#### dedupd memory over {} messages ({:.0} s, {:.0} msg/s, published while it runs)\n",
            r.n,
            r.secs,
            r.n as f64 / r.secs
        );
        let _ = writeln!(out, "| messages consumed | seconds | RSS MB |");
        let _ = writeln!(out, "|---:|---:|---:|");
        let mut shown = Vec::new();
        for k in 1..=10u32 {
            let mark = r.n as f64 * k as f64 / 10.0;
            let at = r
                .samples
                .iter()
                .position(|s| s.consumed >= mark)
                .or((k == 10).then(|| r.samples.len().saturating_sub(1)));
            if let Some(i) = at.filter(|i| !shown.contains(i) && *i < r.samples.len()) {
                shown.push(i);
                let s = &r.samples[i];
                let _ = writeln!(
                    out,
                    "| {:.0} | {:.0} | {:.1} |",
                    s.consumed, s.secs, s.rss_mb
                );
            }
        }
        // Least squares of RSS over consumed, second half of the run.
        let half: Vec<&RssSample> = r
            .samples
            .iter()
            .filter(|s| s.consumed >= r.n as f64 / 2.0)
            .collect();
        let slope = if half.len() >= 10 {
            let k = half.len() as f64;
            let mx = half.iter().map(|s| s.consumed).sum::<f64>() / k;
            let my = half.iter().map(|s| s.rss_mb).sum::<f64>() / k;
            let sxy: f64 = half
                .iter()
                .map(|s| (s.consumed - mx) * (s.rss_mb - my))
                .sum();
            let sxx: f64 = half.iter().map(|s| (s.consumed - mx).powi(2)).sum();
            (sxx > 0.0).then(|| sxy / sxx * 100_000.0)
        } else {
            None
        };
        let verdict = match slope {
            Some(s) if s.abs() < 1.0 => "flat: does not grow with the message count",
            Some(_) => "GROWS with the message count",
            None => "too short a run to tell (fewer than 10 samples in its second half)",
        };
        let _ = writeln!(
            out,
            "\nmax sampled RSS {max:.1} MB, VmHWM {:.1} MB; second half of the run: {} MB per 100k messages → {verdict}",
            r.hwm_mb,
            fmt_opt(slope, 2)
        );
        if slope.is_some_and(|s| s.abs() >= 1.0) {
            ctx.notes.push(format!(
                "rss: dedupd's RSS grows by {} MB per 100k messages in the second half of the run",
                fmt_opt(slope, 2)
            ));
        }
    }

    if !ctx.notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n");
        for n in &ctx.notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    if !ctx.problems.is_empty() {
        let _ = writeln!(out, "\nProblems:\n");
        for p in &ctx.problems {
            let _ = writeln!(out, "- {p}");
        }
    }
    println!("\n{out}");
    ctx.broker.close().await;
    if !ctx.problems.is_empty() {
        bail!("{} problem(s), listed above", ctx.problems.len());
    }
    Ok(())
}
