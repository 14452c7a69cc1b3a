//! What is measured besides time: CPU and memory of processes (/proc), Redis' counters and
//! CPU (`INFO`), and latency (a consumer timing each message from its publish timestamp).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;

use crate::ctx::now_us;
use crate::harness::{timed, Broker, RPC};

/// `field` (e.g. "VmHWM", "VmRSS") of /proc/PID/status, in KiB.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// User + system CPU seconds `pid` has used so far (/proc/PID/stat; clock ticks of 1/100 s,
/// the Linux `USER_HZ` on every common architecture).
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is parenthesised and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Redis counters read from `INFO`: all commands, and calls per command.
#[derive(Debug, Clone, Default)]
pub struct RedisStats {
    pub commands: u64,
    pub calls: HashMap<String, u64>,
    /// `used_cpu_user` + `used_cpu_sys`, seconds.
    pub cpu_secs: f64,
}

impl RedisStats {
    /// Calls of `cmd` (lower case: "evalsha") since `before`.
    pub fn calls_since(&self, before: &RedisStats, cmd: &str) -> u64 {
        let get = |s: &RedisStats| s.calls.get(cmd).copied().unwrap_or(0);
        get(self).saturating_sub(get(before))
    }
}

/// The Redis server, or every primary of a cluster: counters are summed over them.
pub struct Redis {
    nodes: Vec<redis::aio::MultiplexedConnection>,
}

impl Redis {
    /// Connects to each of `urls` (one server, or a cluster's primaries).
    pub async fn connect(urls: &[String]) -> Result<Redis> {
        let mut nodes = Vec::new();
        for url in urls {
            let client = redis::Client::open(url.as_str())?;
            nodes.push(
                timed(&format!("connecting to Redis {url}"), RPC, async {
                    Ok(client.get_multiplexed_async_connection().await?)
                })
                .await?,
            );
        }
        Ok(Redis { nodes })
    }

    /// `INFO section` of every node.
    async fn infos(&mut self, section: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for conn in &mut self.nodes {
            out.push(
                timed("Redis INFO", RPC, async {
                    Ok(redis::cmd("INFO")
                        .arg(section)
                        .query_async::<String>(conn)
                        .await?)
                })
                .await?,
            );
        }
        Ok(out)
    }

    async fn info(&mut self, section: &str) -> Result<String> {
        Ok(self.infos(section).await?.join("\n"))
    }

    pub async fn version(&mut self) -> Result<String> {
        let info = self.info("server").await?;
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_owned())
            .ok_or_else(|| anyhow!("no redis_version in INFO server"))
    }

    /// `total_commands_processed` and the `calls` of every command in `INFO commandstats`.
    /// Counts are server-wide: other clients' commands are included.
    pub async fn stats(&mut self) -> Result<RedisStats> {
        let stats = self.info("stats").await?;
        let commands = stats
            .lines()
            .filter_map(|l| l.strip_prefix("total_commands_processed:"))
            .map(|v| v.trim().parse::<u64>())
            .sum::<Result<u64, _>>()
            .map_err(|e| anyhow!("total_commands_processed in INFO stats: {e}"))?;
        let cmdstats = self.info("commandstats").await?;
        let mut calls: HashMap<String, u64> = HashMap::new();
        for (name, n) in cmdstats.lines().filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.trim().parse::<u64>().ok()?))
        }) {
            *calls.entry(name).or_default() += n;
        }
        let cpu = self.info("cpu").await?;
        let cpu_secs = cpu
            .lines()
            .filter_map(|l| {
                l.strip_prefix("used_cpu_user:")
                    .or_else(|| l.strip_prefix("used_cpu_sys:"))
            })
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .sum();
        Ok(RedisStats {
            commands,
            calls,
            cpu_secs,
        })
    }

    /// Deletes every key under `prefix:` (SCAN + UNLINK, on every node); returns how many.
    pub async fn delete_prefix(&mut self, prefix: &str) -> Result<u64> {
        let cluster = self.nodes.len() > 1;
        let mut deleted = 0;
        for conn in &mut self.nodes {
            deleted += delete_prefix_on(conn, prefix, cluster).await?;
        }
        Ok(deleted)
    }
}

/// Deletes every key under `prefix:` on one node; on a cluster node one key per UNLINK, since
/// keys of different slots cannot share a command.
async fn delete_prefix_on(
    node: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    cluster: bool,
) -> Result<u64> {
    let pattern = format!("{prefix}:*");
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let conn = &mut *node;
        let (next, keys): (u64, Vec<String>) = timed("Redis SCAN", RPC, async {
            Ok(redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(10_000)
                .query_async(conn)
                .await?)
        })
        .await?;
        let batches: Vec<&[String]> = if cluster {
            keys.chunks(1).collect()
        } else {
            keys.chunks(keys.len().max(1)).collect()
        };
        for batch in batches.into_iter().filter(|b| !b.is_empty()) {
            let conn = &mut *node;
            let n: u64 = timed("Redis UNLINK", RPC, async {
                Ok(redis::cmd("UNLINK").arg(batch).query_async(conn).await?)
            })
            .await?;
            deleted += n;
        }
        cursor = next;
        if cursor == 0 {
            return Ok(deleted);
        }
        if Instant::now() > deadline {
            bail!("deleting {pattern} took over 10 minutes");
        }
    }
}

/// What a [`spawn_sink`] consumer received: ids in arrival order, and per message the time from
/// publish (body timestamp) to arrival.
#[derive(Debug, Default)]
pub struct Sink {
    pub ids: Vec<u32>,
    pub latencies_us: Vec<u64>,
    /// Messages whose message_id was not one of ours.
    pub foreign: u64,
}

/// Consumes `queue` with auto-ack until `target` messages arrived (`target` may be raised
/// later; `u64::MAX` = not known yet), nothing arrived for `idle`, or `limit` passed. Returns
/// what arrived; the caller checks the count.
pub async fn spawn_sink(
    broker: &Broker,
    queue: &str,
    target: Arc<AtomicU64>,
    idle: Duration,
    limit: Duration,
) -> Result<tokio::task::JoinHandle<Sink>> {
    let ch = broker.channel().await?;
    let opts = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = timed(&format!("consuming {queue}"), RPC, async {
        Ok(ch
            .basic_consume(queue.into(), "".into(), opts, FieldTable::default())
            .await?)
    })
    .await?;
    Ok(tokio::spawn(async move {
        let mut sink = Sink::default();
        let deadline = tokio::time::Instant::now() + limit;
        let mut last = tokio::time::Instant::now();
        while (sink.ids.len() as u64) < target.load(Ordering::Acquire) {
            // Short waits, so a lowered target is seen at once.
            let next = tokio::time::timeout(Duration::from_millis(100), consumer.next()).await;
            let now = tokio::time::Instant::now();
            let d = match next {
                Ok(Some(Ok(d))) => d,
                Err(_) if now < deadline && now - last < idle => continue,
                // Idle, deadline, consumer gone or channel error: the count tells the caller.
                _ => break,
            };
            last = now;
            let now = now_us();
            match d
                .properties
                .message_id()
                .as_ref()
                .and_then(|id| parse_id(id.as_str()))
            {
                Some(id) => sink.ids.push(id),
                None => sink.foreign += 1,
            }
            if let Some(ts) = parse_ts(&d.data) {
                sink.latencies_us.push(now.saturating_sub(ts));
            }
        }
        let _ = tokio::time::timeout(RPC, ch.close(200, "".into())).await;
        sink
    }))
}

fn parse_id(id: &str) -> Option<u32> {
    id.strip_prefix("m-")?.parse().ok()
}

fn parse_ts(body: &[u8]) -> Option<u64> {
    std::str::from_utf8(body.get(..20)?).ok()?.parse().ok()
}

/// The `q` quantile of raw samples (nearest rank).
pub fn quantile_of_samples(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}
