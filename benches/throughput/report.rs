//! The report: markdown tables on stdout, pasteable into the README.

use std::fmt::Write as _;

use anyhow::Result;

use crate::harness::{command, rabbitmqctl};
use crate::scenarios::{LatencyRound, RssResult, RssSample, Scenario};
use crate::{Ctx, Opts, BODY_LEN};

pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
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

pub fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

pub fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.decimals$}"))
}

pub fn scenario_name(dup: f64) -> String {
    format!("{:.0}% duplicates", dup * 100.0)
}

/// The test machine, the servers and the build, on one line.
pub async fn environment(ctx: &mut Ctx<'_>) -> Result<String> {
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

/// The title and the environment line.
pub fn header(out: &mut String, env: &str) {
    let _ = writeln!(
        out,
        "### dedupd vs. RabbitMQ shovel, end to end (provisional)\n"
    );
    let _ = writeln!(out, "- {env}");
}

/// The workload, the method and the tables of the throughput scenarios.
pub fn throughput(out: &mut String, opts: &Opts, scenarios: &[Scenario]) {
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
         dynamic shovel (ack-mode on-confirm) or by dedupd ({store}, window 1h, {tuning}{audit}); \
         prefetch {} for both; {} round(s) of each, alternating shovel, dedupd",
        opts.n,
        opts.prefetch,
        opts.rounds,
        store = opts.store.label(),
        audit = if opts.audit {
            ", duplicates published to a duplicates_exchange bound to one queue"
        } else {
            ""
        },
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
    for s in scenarios {
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
        "\n| scenario | median shovel msg/s | median dedupd msg/s | median ratio | store cmds/msg sent by dedupd | Redis EVALSHA/msg | Redis cmds/msg incl. in scripts | msgs per store round trip | claim / commit ms per call | delivery→ack p50 ms | p99 ms | peak RSS MB |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for s in scenarios {
        let d = || s.rounds.iter().map(|(_, b)| b);
        let _ = writeln!(
            out,
            "| {} ({} distinct) | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {:.1} |",
            scenario_name(s.dup),
            s.unique,
            fmt_opt(median(s.rounds.iter().map(|(a, _)| a.rate)), 0),
            fmt_opt(median(d().map(|b| b.rate)), 0),
            fmt_opt(median(s.rounds.iter().map(|(a, b)| b.rate / a.rate)), 2),
            fmt_opt(median(d().map(|b| b.store_cmds_per_msg)), 3),
            fmt_opt(median(d().map(|b| b.evalsha_per_msg)), 2),
            fmt_opt(median(d().map(|b| b.cmds_per_msg)), 2),
            fmt_opt(median(d().map(|b| b.msgs_per_rtt)), 0),
            fmt_opt(median(d().filter_map(|b| b.claim_ms)), 1),
            fmt_opt(median(d().filter_map(|b| b.commit_ms)), 1),
            fmt_ms(median(d().filter_map(|b| b.p50_ms))),
            fmt_ms(median(d().filter_map(|b| b.p99_ms))),
            d().map(|b| b.hwm_mb).fold(0.0, f64::max),
        );
    }
    let _ = writeln!(
        out,
        "\nStore commands sent by dedupd: `dedupd_store_commands_total` ÷ messages (a script call \
         is one). Redis per message: `cmdstat_evalsha` calls (summed over a cluster's primaries) and \
         `total_commands_processed` (which also counts the GET/SET each script runs) deltas ÷ \
         messages consumed; server-wide, so other clients of the same Redis add to them. \
         Store round trips: `dedupd_store_duration_seconds_count`, all ops; claim / commit \
         ms: that histogram's sum ÷ count for `op` claim and commit (a batch's round trip). \
         Latency: interpolated \
         in the buckets of `dedupd_forward_duration_seconds` (delivery → upstream ack) while \
         draining the preloaded backlog, so it includes waiting in the proxy's prefetch \
         buffer. Peak RSS: `VmHWM` of the dedupd process."
    );
    let _ = writeln!(
        out,
        "\n| scenario | CPU µs/msg, shovel round: RabbitMQ | dedupd round: RabbitMQ | dedupd | Redis | dedupd round total |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for s in scenarios {
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

/// The latency table of a shovel round `a` and a dedupd round `b` at `rate`.
pub fn latency(out: &mut String, opts: &Opts, rate: f64, a: &LatencyRound, b: &LatencyRound) {
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

/// The memory table; a note if RSS grows with the message count.
pub fn rss(out: &mut String, r: &RssResult) -> Option<String> {
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
    slope.filter(|s| s.abs() >= 1.0).map(|_| {
        format!(
            "rss: dedupd's RSS grows by {} MB per 100k messages in the second half of the run",
            fmt_opt(slope, 2)
        )
    })
}

/// Notes and problems, if any.
pub fn notes(out: &mut String, notes: &[String], problems: &[String]) {
    if !notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n");
        for n in notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    if !problems.is_empty() {
        let _ = writeln!(out, "\nProblems:\n");
        for p in problems {
            let _ = writeln!(out, "- {p}");
        }
    }
}
