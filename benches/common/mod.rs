//! Helpers of the end-to-end benchmark (`benches/throughput.rs`): what it creates and must
//! clean up, a broker client (declare, count, publish with wide confirm windows, consume),
//! Redis statistics, scraping the proxy's `/metrics`, child processes, and waiting with
//! deadlines. Nothing here waits without one.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// How often queue counts and metrics are polled while something is timed.
pub const POLL: Duration = Duration::from_millis(20);
/// Every body has this size.
pub const BODY_LEN: usize = 256;
/// Deadline of one broker, Redis or HTTP request, and of a `rabbitmqctl` call.
pub const RPC: Duration = Duration::from_secs(30);

/// The process-wide reference instant that body timestamps count from.
pub fn clock() -> Instant {
    static CLOCK: OnceLock<Instant> = OnceLock::new();
    *CLOCK.get_or_init(Instant::now)
}

/// Microseconds since [`clock`].
pub fn now_us() -> u64 {
    clock().elapsed().as_micros() as u64
}

/// `m-0000042`: the message_id of message number `num`.
pub fn message_id(num: u32) -> String {
    format!("m-{num:07}")
}

/// A 256-byte ASCII body: publish timestamp (µs since [`clock`], 20 digits), the id, padding.
pub fn body(num: u32) -> Vec<u8> {
    let mut b = format!("{:020} m-{num:07} ", now_us()).into_bytes();
    b.resize(BODY_LEN, b'.');
    b
}

fn parse_id(id: &str) -> Option<u32> {
    id.strip_prefix("m-")?.parse().ok()
}

fn parse_ts(body: &[u8]) -> Option<u64> {
    std::str::from_utf8(body.get(..20)?).ok()?.parse().ok()
}

/// Runs `fut` with a deadline, naming `what` when it passes.
pub async fn timed<T>(
    what: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.with_context(|| what.to_owned()),
        Err(_) => bail!("{what}: no answer within {limit:?}"),
    }
}

/// Polls `check` every [`POLL`] until it returns `Some`, or fails after `limit`.
pub async fn wait_until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// What the benchmark created, so it can be removed at the end, also after an error.

#[derive(Default)]
struct Created {
    queues: Vec<String>,
    shovels: Vec<String>,
    prefixes: Vec<String>,
    files: Vec<PathBuf>,
}

/// Everything created so far; [`Cleanup::run`] removes what is still there.
#[derive(Clone, Default)]
pub struct Cleanup(Arc<Mutex<Created>>);

impl Cleanup {
    fn with<R>(&self, f: impl FnOnce(&mut Created) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
    pub fn queue(&self, q: &str) {
        self.with(|c| c.queues.push(q.to_owned()));
    }
    pub fn queue_gone(&self, q: &str) {
        self.with(|c| c.queues.retain(|x| x != q));
    }
    pub fn shovel(&self, s: &str) {
        self.with(|c| c.shovels.push(s.to_owned()));
    }
    pub fn shovel_gone(&self, s: &str) {
        self.with(|c| c.shovels.retain(|x| x != s));
    }
    pub fn prefix(&self, p: &str) {
        self.with(|c| c.prefixes.push(p.to_owned()));
    }
    pub fn prefix_gone(&self, p: &str) {
        self.with(|c| c.prefixes.retain(|x| x != p));
    }
    pub fn file(&self, f: PathBuf) {
        self.with(|c| c.files.push(f));
    }

    /// Removes shovels, queues, Redis keys and files still registered. Best effort: a failure
    /// is printed, never fatal.
    pub async fn run(&self) {
        let created = self.with(std::mem::take);
        for s in &created.shovels {
            if let Err(e) = rabbitmqctl(&["clear_parameter", "shovel", s]).await {
                eprintln!("cleanup: shovel {s}: {e:#}");
            }
        }
        if !created.queues.is_empty() {
            match Broker::connect("dedupd-bench cleanup").await {
                Ok(b) => {
                    for q in &created.queues {
                        if let Err(e) = b.delete(q).await {
                            eprintln!("cleanup: queue {q}: {e:#}");
                        }
                    }
                    b.close().await;
                }
                Err(e) => eprintln!(
                    "cleanup: cannot reach RabbitMQ ({e:#}); queues left: {:?}",
                    created.queues
                ),
            }
        }
        if !created.prefixes.is_empty() {
            match Redis::connect().await {
                Ok(mut r) => {
                    for p in &created.prefixes {
                        if let Err(e) = r.delete_prefix(p).await {
                            eprintln!("cleanup: Redis keys {p}:*: {e:#}");
                        }
                    }
                }
                Err(e) => eprintln!("cleanup: cannot reach Redis: {e:#}"),
            }
        }
        for f in &created.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ

/// Ready messages and consumers of a queue (passive queue.declare).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCount {
    pub messages: u32,
    pub consumers: u32,
}

/// One connection and a channel for declares, deletes and passive declares.
pub struct Broker {
    pub conn: Connection,
    ch: Channel,
}

impl Broker {
    pub async fn connect(name: &str) -> Result<Broker> {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let conn = timed("connecting to RabbitMQ on 127.0.0.1:5672", RPC, async {
            Ok(Connection::connect(AMQP_URL, props).await?)
        })
        .await?;
        let ch = timed("opening a channel", RPC, async {
            Ok(conn.create_channel().await?)
        })
        .await?;
        Ok(Broker { conn, ch })
    }

    /// Declares a durable classic queue.
    pub async fn declare(&self, q: &str) -> Result<()> {
        let opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        timed(&format!("declaring {q}"), RPC, async {
            self.ch
                .queue_declare(q.into(), opts, FieldTable::default())
                .await?;
            Ok(())
        })
        .await
    }

    pub async fn delete(&self, q: &str) -> Result<()> {
        timed(&format!("deleting {q}"), RPC, async {
            self.ch
                .queue_delete(q.into(), QueueDeleteOptions::default())
                .await?;
            Ok(())
        })
        .await
    }

    pub async fn count(&self, q: &str) -> Result<QueueCount> {
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        timed(&format!("counting {q}"), RPC, async {
            let queue = self
                .ch
                .queue_declare(q.into(), opts, FieldTable::default())
                .await?;
            Ok(QueueCount {
                messages: queue.message_count(),
                consumers: queue.consumer_count(),
            })
        })
        .await
    }

    /// A new channel on this connection (for a consumer).
    pub async fn channel(&self) -> Result<Channel> {
        timed("opening a channel", RPC, async {
            Ok(self.conn.create_channel().await?)
        })
        .await
    }

    pub async fn close(self) {
        let _ = tokio::time::timeout(RPC, self.conn.close(200, "".into())).await;
    }
}

/// A confirm-mode publisher that keeps up to `window` confirms outstanding.
pub struct Publisher {
    conn: Connection,
    ch: Channel,
    pending: VecDeque<PublisherConfirm>,
    window: usize,
    pub sent: u64,
}

impl Publisher {
    pub async fn connect(window: usize) -> Result<Publisher> {
        let b = Broker::connect("dedupd-bench publisher").await?;
        timed("enabling confirms", RPC, async {
            Ok(b.ch.confirm_select(ConfirmSelectOptions::default()).await?)
        })
        .await?;
        Ok(Publisher {
            conn: b.conn,
            ch: b.ch,
            pending: VecDeque::with_capacity(window),
            window: window.max(1),
            sent: 0,
        })
    }

    /// Publishes message `num` (persistent, message_id set) to `queue` via the default exchange.
    pub async fn publish(&mut self, queue: &str, num: u32) -> Result<()> {
        let props = BasicProperties::default()
            .with_message_id(message_id(num).into())
            .with_delivery_mode(2);
        let confirm = timed("publishing", RPC, async {
            Ok(self
                .ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body(num),
                    props,
                )
                .await?)
        })
        .await?;
        self.pending.push_back(confirm);
        self.sent += 1;
        while self.pending.len() >= self.window {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<()> {
        if let Some(confirm) = self.pending.pop_front() {
            let c = timed("waiting for a publisher confirm", RPC, async {
                Ok(confirm.await?)
            })
            .await?;
            if !c.is_ack() {
                bail!("the broker nacked a published message: {c:?}");
            }
        }
        Ok(())
    }

    /// Waits for every outstanding confirm.
    pub async fn flush(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    pub async fn close(mut self) -> Result<()> {
        self.flush().await?;
        let _ = tokio::time::timeout(RPC, self.conn.close(200, "".into())).await;
        Ok(())
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

/// Runs `rabbitmqctl args…` (as root) and returns its stdout; fails with its stderr.
pub async fn rabbitmqctl(args: &[&str]) -> Result<String> {
    command("rabbitmqctl", args).await
}

/// Runs a short command with a deadline; stdout on success, an error with stderr otherwise.
pub async fn command(program: &str, args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(Duration::from_secs(120), out).await {
        Ok(out) => out.with_context(|| format!("cannot run {program}"))?,
        Err(_) => bail!("{program} {args:?} did not finish within 120s"),
    };
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Redis

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

pub struct Redis {
    conn: redis::aio::MultiplexedConnection,
}

impl Redis {
    pub async fn connect() -> Result<Redis> {
        let client = redis::Client::open(REDIS_URL)?;
        let conn = timed("connecting to Redis on 127.0.0.1:6379", RPC, async {
            Ok(client.get_multiplexed_async_connection().await?)
        })
        .await?;
        Ok(Redis { conn })
    }

    async fn info(&mut self, section: &str) -> Result<String> {
        let conn = &mut self.conn;
        timed("Redis INFO", RPC, async {
            Ok(redis::cmd("INFO")
                .arg(section)
                .query_async::<String>(conn)
                .await?)
        })
        .await
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
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("no total_commands_processed in INFO stats"))?;
        let cmdstats = self.info("commandstats").await?;
        let calls = cmdstats
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_owned(), calls.trim().parse().ok()?))
            })
            .collect();
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

    /// Deletes every key under `prefix:` (SCAN + UNLINK); returns how many.
    pub async fn delete_prefix(&mut self, prefix: &str) -> Result<u64> {
        let pattern = format!("{prefix}:*");
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let conn = &mut self.conn;
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
            if !keys.is_empty() {
                let conn = &mut self.conn;
                let n: u64 = timed("Redis UNLINK", RPC, async {
                    Ok(redis::cmd("UNLINK").arg(&keys).query_async(conn).await?)
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
}

// ---------------------------------------------------------------------------------------------
// The proxy's /metrics

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn matches(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.name == name && labels.iter().all(|(k, v)| self.label(k) == Some(v))
    }
}

/// A parsed `/metrics` page.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let labels = labels
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.trim().to_owned(), v.trim_matches('"').to_owned()))
                    .collect();
                let value = match value.trim() {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().ok()?,
                };
                Some(Sample {
                    name: name.to_owned(),
                    labels,
                    value,
                })
            })
            .collect();
        Scrape { samples }
    }

    /// Sum of every sample of `name` whose labels include `labels` (0 if none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.matches(name, labels))
            .map(|s| s.value)
            .sum()
    }

    /// The `q` quantile (0..1) of histogram `name`, interpolated linearly within its bucket
    /// like Prometheus' `histogram_quantile`. `None` without observations. A quantile in the
    /// `+Inf` bucket is reported as the largest finite bound.
    pub fn quantile(&self, name: &str, labels: &[(&str, &str)], q: f64) -> Option<f64> {
        let bucket = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|s| s.matches(&bucket, labels))
            .filter_map(|s| {
                let le = match s.label("le")? {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().ok()?,
                };
                Some((le, s.value))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        quantile_of_buckets(&buckets, q)
    }
}

/// See [`Scrape::quantile`]; `buckets` are (upper bound, cumulative count), ascending.
pub fn quantile_of_buckets(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            if cum <= below {
                return Some(le);
            }
            return Some(lower + (le - lower) * (rank - below) / (cum - below));
        }
        if le.is_finite() {
            lower = le;
        }
        below = cum;
    }
    Some(lower)
}

/// The `q` quantile of raw samples (nearest rank).
pub fn quantile_of_samples(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

/// GET `/metrics` on 127.0.0.1:`port`.
pub async fn scrape(port: u16) -> Result<Scrape> {
    let body = timed("GET /metrics", Duration::from_secs(5), async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let req = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        if !text.starts_with("HTTP/1.1 200") {
            bail!(
                "unexpected answer: {}",
                text.lines().next().unwrap_or_default()
            );
        }
        Ok(text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default())
    })
    .await?;
    Ok(Scrape::parse(&body))
}

/// A free local TCP port (bound and released).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

// ---------------------------------------------------------------------------------------------
// The proxy as a child process

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

/// The built `dedupd` binary running `run -c CONFIG`, stderr to a log file.
pub struct Proxy {
    child: tokio::process::Child,
    pub pid: u32,
    pub log: PathBuf,
}

impl Proxy {
    pub fn spawn(config: &std::path::Path, log: PathBuf) -> Result<Proxy> {
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dedupd"))
            .arg("run")
            .arg("-c")
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the dedupd binary")?;
        let pid = child.id().ok_or_else(|| anyhow!("dedupd exited at once"))?;
        Ok(Proxy { child, pid, log })
    }

    /// Fails if the process has exited (it should run until told to stop).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "dedupd exited unexpectedly ({status}); its log ({}):\n{}",
                self.log.display(),
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `grace` for the exit; SIGKILL and an error past it.
    pub async fn terminate(&mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        command("kill", &["-TERM", &self.pid.to_string()]).await?;
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
                bail!("dedupd did not exit within {grace:?} of SIGTERM (killed)")
            }
        }
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn log_lines(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }
}
