//! The scenarios: throughput rounds (shovel, dedupd, alternating) over a preloaded backlog,
//! latency at a fixed rate, and memory over many messages.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::ctx::{Ctx, Publisher};
use crate::harness::{poll_until, scrape, Broker, POLL};
use crate::measure::{proc_cpu_secs, proc_status_kb, quantile_of_samples, spawn_sink};
use crate::movers::{
    audit_names, start_dedupd, start_shovel, stop_dedupd, stop_shovel, wait_moved, Mover,
};
use crate::report::{fmt_ms, scenario_name};
use crate::{ROUTE, STALL};

/// The message numbers to publish, in order, and the first-seen order of the distinct ones
/// (what dedupd must forward).
pub struct Workload {
    pub seq: Vec<u32>,
    pub first_seen: Vec<u32>,
}

/// `round(n × dup)` of the messages (never the first) repeat the id of a uniformly chosen
/// earlier distinct message.
pub fn workload(n: u32, dup: f64, seed: u64) -> Workload {
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

pub struct ShovelRound {
    pub rate: f64,
    /// CPU µs per message of the broker.
    pub broker_us: f64,
}

pub struct DedupdRound {
    pub rate: f64,
    /// CPU µs per message of the broker, dedupd and Redis.
    pub broker_us: f64,
    pub proxy_us: f64,
    pub redis_us: f64,
    pub cmds_per_msg: f64,
    pub evalsha_per_msg: f64,
    /// Commands dedupd sent (`dedupd_store_commands_total`) per message.
    pub store_cmds_per_msg: f64,
    pub msgs_per_rtt: f64,
    /// Mean store round trip of a claim and of a commit, ms (`None` without calls).
    pub claim_ms: Option<f64>,
    pub commit_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub hwm_mb: f64,
    /// Per command, calls per message (script-internal calls included).
    pub breakdown: String,
}

pub async fn shovel_round(ctx: &mut Ctx<'_>, tag: &str, wl: &Workload) -> Result<ShovelRound> {
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

pub async fn dedupd_round(ctx: &mut Ctx<'_>, tag: &str, wl: &Workload) -> Result<DedupdRound> {
    let name = format!("{}-{tag}-dedupd", ctx.run_id);
    let (src, dst) = (format!("{name}.in"), format!("{name}.out"));
    let n = wl.seq.len() as u32;
    let unique = wl.first_seen.len() as u32;
    ctx.declare(&src).await?;
    ctx.declare(&dst).await?;
    let (audit_exchange, audited) = audit_names(&dst);
    if ctx.opts.audit {
        ctx.declare_audit(&audit_exchange, &audited).await?;
    }
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
            let log = started
                .proxy
                .log_file()
                .map_or(String::new(), |p| p.display().to_string());
            let tail = started.proxy.log_tail(20);
            return Err(e.context(format!("dedupd {tag} (log {log}); its tail:\n{tail}")));
        }
    };
    let (broker1, redis_after) = ctx.server_cpu().await?;
    let proxy_cpu = proc_cpu_secs(started.proxy.pid).unwrap_or(f64::NAN);
    let m = scrape(started.port().await?).await?;
    let hwm_kb = proc_status_kb(started.proxy.pid, "VmHWM").unwrap_or(0);
    let what = format!("dedupd {tag}");
    stop_dedupd(ctx, &what, started).await?;
    if ctx.opts.audit {
        // Every duplicate was confirmed by the audit exchange before its upstream ack.
        let in_audit = ctx.count(&audited).await?;
        if in_audit != n - unique {
            let expected = n - unique;
            bail!("dedupd {tag}: {audited} holds {in_audit} duplicates, expected {expected}");
        }
        ctx.delete(&audited).await?;
    }

    let labels = [("route", ROUTE)];
    let consumed = m.sum("dedupd_messages_consumed_total", &labels);
    let forwarded = m.sum("dedupd_messages_forwarded_total", &labels);
    let duplicates = m.sum("dedupd_duplicates_total", &labels);
    let takeovers = m.sum("dedupd_takeovers_total", &labels);
    let rejected = m.sum("dedupd_messages_rejected_total", &labels);
    let store_errors = m.sum("dedupd_store_errors_total", &labels);
    let round_trips = m.sum("dedupd_store_duration_seconds_count", &[]);
    let store_commands = m.sum("dedupd_store_commands_total", &[]);
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
    let mean_ms = |op: &str| {
        let calls = m.sum("dedupd_store_duration_seconds_count", &[("op", op)]);
        let secs = m.sum("dedupd_store_duration_seconds_sum", &[("op", op)]);
        (calls > 0.0).then(|| secs * 1000.0 / calls)
    };
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
        store_cmds_per_msg: store_commands / n as f64,
        msgs_per_rtt: if round_trips > 0.0 {
            n as f64 / round_trips
        } else {
            f64::NAN
        },
        claim_ms: mean_ms("claim"),
        commit_ms: mean_ms("commit"),
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

pub struct LatencyRound {
    pub mover: &'static str,
    pub rate: f64,
    pub sent: u64,
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    pub proxy_p50_ms: Option<f64>,
    pub proxy_p99_ms: Option<f64>,
}

/// Publishes unique messages at `rate` for `secs` while `mover` runs, measuring publish →
/// arrival in the destination for every message (and dedupd's delivery → ack histogram).
pub async fn latency_round(
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
            let port = s.port().await?;
            let m = poll_until(
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

pub struct RssSample {
    pub secs: f64,
    pub consumed: f64,
    pub rss_mb: f64,
}

pub struct RssResult {
    pub n: u32,
    pub secs: f64,
    pub samples: Vec<RssSample>,
    pub hwm_mb: f64,
}

/// Moves `n` unique messages through dedupd, publishing while it runs (the source backlog
/// kept under 200k), sampling the child's RSS every second.
pub async fn rss_scenario(ctx: &mut Ctx<'_>, n: u32) -> Result<RssResult> {
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
            let consumed = scrape(s.port().await?)
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
        let port = s.port().await?;
        let consumed = poll_until(
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

pub struct Scenario {
    pub dup: f64,
    pub unique: usize,
    pub rounds: Vec<(ShovelRound, DedupdRound)>,
}

/// Every duplicate ratio's rounds, alternating shovel and dedupd.
pub async fn throughput(ctx: &mut Ctx<'_>) -> Result<Vec<Scenario>> {
    let opts = ctx.opts;
    let mut scenarios = Vec::new();
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
            let a = shovel_round(ctx, &tag, &wl).await?;
            let b = dedupd_round(ctx, &tag, &wl).await?;
            rounds.push((a, b));
        }
        scenarios.push(Scenario {
            dup,
            unique: wl.first_seen.len(),
            rounds,
        });
    }
    Ok(scenarios)
}
