//! The two movers: a dynamic shovel (set and cleared with `rabbitmqctl`) and the built dedupd
//! binary as a child process; waiting until a mover has moved a queue.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::ctx::Ctx;
use crate::harness::{rabbitmqctl, scrape, Launch, Proxy, AMQP_URL, POLL};
use crate::{ROUTE, STALL};

/// How long dedupd may take to log its metrics port.
const STARTUP: Duration = Duration::from_secs(30);

/// When a move started and ended.
pub struct Timing {
    /// The mover was told to start (rabbitmqctl started / process spawned).
    pub start: Instant,
    /// Last poll that saw the source untouched (≈ the consumer attached).
    pub first: Instant,
    pub done: Instant,
}

impl Timing {
    /// Seconds from the first message leaving the source to the end.
    pub fn secs(&self) -> f64 {
        (self.done - self.first).as_secs_f64()
    }
    /// Seconds including startup (process start, or the rabbitmqctl call).
    pub fn wall_secs(&self) -> f64 {
        (self.done - self.start).as_secs_f64()
    }
}

/// What is moving the messages, for the completion and liveness checks.
pub enum Mover<'a> {
    Shovel(&'a mut Option<tokio::task::JoinHandle<Result<String>>>),
    Dedupd { proxy: &'a mut Proxy, consumed: u64 },
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
            Mover::Dedupd { proxy, consumed: n } => {
                let m = scrape(proxy.metrics_port(STARTUP).await?).await?;
                let labels = [("route", ROUTE)];
                let consumed = m.sum("dedupd_messages_consumed_total", &labels);
                let inflight = m.sum("dedupd_inflight_messages", &labels);
                Ok(consumed >= *n as f64 && inflight == 0.0)
            }
        }
    }
}

/// Polls until `src` is empty, `dst` holds at least `expect_dst` and the mover is done.
pub async fn wait_moved(
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

pub fn shovel_json(src: &str, dst: &str, prefetch: u16) -> String {
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

pub async fn start_shovel(
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

pub async fn stop_shovel(ctx: &Ctx<'_>, name: &str) -> Result<()> {
    rabbitmqctl(&["clear_parameter", "shovel", name]).await?;
    ctx.cleanup.shovel_gone(name);
    Ok(())
}

/// A running proxy with its key prefix.
pub struct Started {
    pub proxy: Proxy,
    pub prefix: String,
}

impl Started {
    /// The port of its metrics endpoint (from its log: it binds port 0).
    pub async fn port(&mut self) -> Result<u16> {
        self.proxy.metrics_port(STARTUP).await
    }
}

/// The config of a dedupd round; its metrics endpoint on port 0 (dedupd logs the port it got).
pub fn dedupd_config(ctx: &Ctx<'_>, prefix: &str, src: &str, dst: &str) -> String {
    format!(
        r#"[upstream]
url = "{AMQP_URL}"
prefetch = {prefetch}

[store]
{store}
key_prefix = "{prefix}"

[metrics]
listen = "127.0.0.1:0"

[tuning]
{tuning}

[routes.{ROUTE}]
queue = "{src}"
exchange = ""
routing_key = "{dst}"
key = "message_id"
window = "1h"
{audit}
"#,
        audit = if ctx.opts.audit {
            format!("duplicates_exchange = \"{}\"", audit_names(dst).0)
        } else {
            String::new()
        },
        prefetch = ctx.opts.prefetch,
        tuning = ctx.opts.tuning,
        store = ctx.opts.store.toml(),
    )
}

/// The audit exchange and the queue bound to it of a round whose destination is `dst`.
pub fn audit_names(dst: &str) -> (String, String) {
    (format!("{dst}.audit"), format!("{dst}.audited"))
}

/// Starts the built binary on a config of its own, its log in a file (level warn, but for
/// dedupd's own info lines, among them the one naming the metrics port: see
/// [`Started::port`]). Returns at once, so the timing starts at the spawn.
pub fn start_dedupd(ctx: &Ctx<'_>, name: &str, src: &str, dst: &str) -> Result<Started> {
    let prefix = name.to_owned();
    ctx.cleanup.prefix(&prefix);
    let dir = std::env::temp_dir();
    let config = dir.join(format!("{name}.toml"));
    ctx.cleanup.file(config.clone());
    std::fs::write(&config, dedupd_config(ctx, &prefix, src, dst))
        .with_context(|| format!("writing {}", config.display()))?;
    let log = dir.join(format!("{name}.log"));
    let config = config.to_str().context("a UTF-8 temp path")?;
    let proxy = Launch::new(&["run", "-c", config])
        .env("RUST_LOG", "warn,dedupd=info")
        .log_to(log)
        .spawn()?;
    Ok(Started { proxy, prefix })
}

/// SIGTERM, exit status, log lines; removes the Redis keys.
pub async fn stop_dedupd(ctx: &mut Ctx<'_>, what: &str, mut s: Started) -> Result<()> {
    let status = s.proxy.terminate(Duration::from_secs(30)).await?;
    if !status.success() {
        ctx.problems.push(format!(
            "{what}: dedupd exited with {status} after SIGTERM; log tail:\n{}",
            s.proxy.log_tail(20)
        ));
    }
    let log = s.proxy.log_file().map(|p| p.to_owned()).unwrap_or_default();
    let all = s.proxy.log_closed(Duration::from_secs(5)).await?;
    let warnings = warnings(&all);
    let lines = warnings.len();
    if lines > 0 {
        ctx.notes.push(format!(
            "{what}: dedupd logged {lines} line(s) at warn level or above ({}); last ones:\n```\n{}\n```",
            log.display(),
            warnings[lines.saturating_sub(5)..].join("\n")
        ));
    } else {
        let _ = std::fs::remove_file(&log);
    }
    ctx.redis.delete_prefix(&s.prefix).await?;
    ctx.opts.store.forget_prefix(&s.prefix).await?;
    ctx.cleanup.prefix_gone(&s.prefix);
    Ok(())
}

/// The log lines at level WARN or ERROR (the level is a text line's second word).
fn warnings(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .filter(|l| matches!(l.split_whitespace().nth(1), Some("WARN" | "ERROR")))
        .map(String::as_str)
        .collect()
}
