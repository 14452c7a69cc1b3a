//! The harness shared by the integration tests (`tests/common/mod.rs` adds the test-only layer
//! that panics instead of returning errors) and the end-to-end benchmark
//! (`benches/throughput/main.rs` includes this file by path): polling with deadlines, a broker
//! client, `/metrics` scraping, short commands and the built `dedupd` binary as a child process
//! whose log is read line by line (it says which metrics port it bound). Every wait here has a
//! deadline; errors are `anyhow` errors naming what was awaited.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// How often queue counts, metrics and logs are polled.
pub const POLL: Duration = Duration::from_millis(20);
/// Deadline of one broker, Redis or HTTP request.
pub const RPC: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Waiting

/// Polls `check` every [`POLL`] until it returns `Some`, or fails after `limit`.
pub async fn poll_until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<T>
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

/// Runs `rabbitmqctl args…` (as root) and returns its stdout; fails with its stderr.
pub async fn rabbitmqctl(args: &[&str]) -> Result<String> {
    command("rabbitmqctl", args).await
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ

/// Ready messages and consumers of a queue (passive queue.declare).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCount {
    pub messages: u32,
    pub consumers: u32,
}

/// One named connection and a channel for declares, deletes, counts (and, after
/// [`Broker::confirms`], publishes).
pub struct Broker {
    pub conn: Connection,
    pub ch: Channel,
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

    /// Puts the channel in confirm mode.
    pub async fn confirms(&self) -> Result<()> {
        timed("enabling confirms", RPC, async {
            Ok(self
                .ch
                .confirm_select(ConfirmSelectOptions::default())
                .await?)
        })
        .await
    }

    /// Declares a durable queue with `args`.
    pub async fn declare_with(&self, q: &str, args: FieldTable) -> Result<()> {
        let opts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        timed(&format!("declaring {q}"), RPC, async {
            self.ch.queue_declare(q.into(), opts, args).await?;
            Ok(())
        })
        .await
    }

    /// Declares a durable classic queue.
    pub async fn declare(&self, q: &str) -> Result<()> {
        self.declare_with(q, FieldTable::default()).await
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

    /// Counts on this broker's channel (a missing queue closes it: see [`count_on`]).
    pub async fn count(&self, q: &str) -> Result<QueueCount> {
        count_on(&self.ch, q).await
    }

    /// A new channel on this connection (for a consumer, or a count that may fail).
    pub async fn channel(&self) -> Result<Channel> {
        timed("opening a channel", RPC, async {
            Ok(self.conn.create_channel().await?)
        })
        .await
    }

    pub async fn close(&self) {
        let _ = tokio::time::timeout(RPC, self.conn.close(200, "".into())).await;
    }
}

/// Ready messages and consumers of `q`, by a passive declare on `ch` (which the broker closes
/// if `q` does not exist).
pub async fn count_on(ch: &Channel, q: &str) -> Result<QueueCount> {
    let opts = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    timed(&format!("counting {q}"), RPC, async {
        let queue = ch
            .queue_declare(q.into(), opts, FieldTable::default())
            .await?;
        Ok(QueueCount {
            messages: queue.message_count(),
            consumers: queue.consumer_count(),
        })
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The proxy's HTTP endpoint and /metrics

/// GET `path` on 127.0.0.1:`port`: (status, body).
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    timed(&format!("GET {path}"), Duration::from_secs(5), async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("not an HTTP answer: {:?}", text.lines().next()))?;
        let (_, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("an HTTP answer without a body"))?;
        Ok((status, body.to_owned()))
    })
    .await
}

/// GET `/metrics` on 127.0.0.1:`port`; anything but a 200 is an error.
pub async fn scrape(port: u16) -> Result<Scrape> {
    match http_get(port, "/metrics").await? {
        (200, body) => Ok(Scrape::parse(&body)),
        (status, _) => bail!("GET /metrics: unexpected answer: status {status}"),
    }
}

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

    /// The first sample of `name` whose labels include `labels`.
    pub fn first(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.matches(name, labels))
            .map(|s| s.value)
    }

    /// Sum of every sample of `name` whose labels include `labels` (0 if none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.matches(name, labels))
            // Not `sum()`: a float sum of nothing is -0.0, which reports print as "-0.000".
            .fold(0.0, |total, s| total + s.value)
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

// ---------------------------------------------------------------------------------------------
// The built binary as a child process

/// The binary under test: this build's, or `DEDUPD_TEST_BIN` (to measure another build, e.g.
/// an older release or a release build, with the same tests; `DEDUPD_BIN` is the older name).
pub fn binary() -> String {
    std::env::var("DEDUPD_TEST_BIN")
        .or_else(|_| std::env::var("DEDUPD_BIN"))
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_dedupd").to_owned())
}

/// How to run the binary: its arguments, environment and where its log (stderr) goes.
pub struct Launch {
    args: Vec<String>,
    envs: Vec<(String, String)>,
    tee: bool,
    log_file: Option<PathBuf>,
    close_stderr_after: Option<String>,
}

impl Launch {
    /// `dedupd args…` with `RUST_LOG=info`, its log lines copied to this process's stderr (the
    /// test's: libtest shows it for failed tests) and kept.
    pub fn new(args: &[&str]) -> Launch {
        Launch {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            envs: vec![("RUST_LOG".into(), "info".into())],
            tee: true,
            log_file: None,
            close_stderr_after: None,
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Writes the log lines to `path` instead of this process's stderr.
    pub fn log_to(mut self, path: PathBuf) -> Launch {
        self.tee = false;
        self.log_file = Some(path);
        self
    }

    /// Closes the read end of the child's stderr after the first line containing `needle`:
    /// every later log write of the child fails (EPIPE).
    pub fn close_stderr_after(mut self, needle: &str) -> Launch {
        self.close_stderr_after = Some(needle.to_owned());
        self
    }

    /// Spawns the binary (killed when the [`Proxy`] is dropped) and a task reading its log.
    pub fn spawn(self) -> Result<Proxy> {
        let mut file = match &self.log_file {
            Some(p) => Some(
                std::fs::File::create(p)
                    .with_context(|| format!("cannot create {}", p.display()))?,
            ),
            None => None,
        };
        let mut child = tokio::process::Command::new(binary())
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the dedupd binary")?;
        let pid = child.id().ok_or_else(|| anyhow!("dedupd exited at once"))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(LogState::default()));
        let (tee, close_after, kept) = (self.tee, self.close_stderr_after, log.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tee {
                    eprintln!("[dedupd {pid}] {line}");
                }
                if let Some(f) = file.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(f, "{line}");
                }
                let close = close_after.as_deref().is_some_and(|n| line.contains(n));
                lock(&kept).lines.push(line);
                if close {
                    break;
                }
            }
            lock(&kept).closed = true;
        });
        Ok(Proxy {
            child,
            pid,
            log,
            log_file: self.log_file,
            port: None,
        })
    }
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// The reader stopped: the child closed its stderr (exited), or `close_stderr_after`.
    closed: bool,
}

fn lock(log: &Mutex<LogState>) -> std::sync::MutexGuard<'_, LogState> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// The address in a `dedupd starting … metrics=127.0.0.1:PORT` log line (text or JSON).
pub fn metrics_addr(line: &str) -> Option<std::net::SocketAddr> {
    if !line.contains("dedupd starting") {
        return None;
    }
    let (_, rest) = line
        .split_once("metrics=")
        .or_else(|| line.split_once("\"metrics\":\""))?;
    rest.split(|c: char| c.is_whitespace() || c == '"' || c == ',')
        .next()?
        .parse()
        .ok()
}

/// The built `dedupd` binary, running; its log lines are read as they come.
pub struct Proxy {
    pub child: tokio::process::Child,
    pub pid: u32,
    log: Arc<Mutex<LogState>>,
    log_file: Option<PathBuf>,
    /// The metrics port, once read from the log.
    port: Option<u16>,
}

impl Proxy {
    /// The port of the metrics endpoint, from the `dedupd starting` log line (the binary
    /// binds `metrics.listen`, port 0 in the harness's configs, and logs what it got).
    pub async fn metrics_port(&mut self, limit: Duration) -> Result<u16> {
        let deadline = Instant::now() + limit;
        loop {
            if self.port.is_none() {
                self.port = self
                    .lines()
                    .iter()
                    .find_map(|l| metrics_addr(l))
                    .map(|a| a.port());
            }
            if let Some(port) = self.port {
                return Ok(port);
            }
            self.check_alive()?;
            if lock(&self.log).closed {
                bail!("dedupd closed its log without a `dedupd starting … metrics=` line");
            }
            if Instant::now() > deadline {
                bail!(
                    "no `dedupd starting … metrics=` log line within {limit:?}; log:\n{}",
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The metrics port of the latest `dedupd starting` log line: a reload (SIGHUP) starts
    /// again and binds `metrics.listen` anew, another port where that is port 0.
    pub fn latest_port(&self) -> Option<u16> {
        self.lines()
            .iter()
            .rev()
            .find_map(|l| metrics_addr(l))
            .map(|a| a.port())
    }

    /// Waits for the first log line containing `needle`, failing if the process exits first.
    pub async fn wait_line(&mut self, needle: &str, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return Ok(l);
            }
            let closed = lock(&self.log).closed;
            if closed {
                bail!("dedupd closed its log before a line with {needle:?}");
            }
            if Instant::now() > deadline {
                bail!("no log line with {needle:?} within {limit:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the log has been read to its end (after the process exited, its last
    /// lines may still be on their way); the lines read.
    pub async fn log_closed(&self, limit: Duration) -> Result<Vec<String>> {
        poll_until("the end of the log", limit, || async {
            let log = lock(&self.log);
            Ok(log.closed.then(|| log.lines.clone()))
        })
        .await
    }

    /// Every log line read so far.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.log).lines.clone()
    }

    /// The last `n` log lines.
    pub fn log_tail(&self, n: usize) -> String {
        let log = lock(&self.log);
        log.lines[log.lines.len().saturating_sub(n)..].join("\n")
    }

    /// Where the log is written, if to a file.
    pub fn log_file(&self) -> Option<&std::path::Path> {
        self.log_file.as_deref()
    }

    /// Fails if the process has exited (it should run until told to stop).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "dedupd exited unexpectedly ({status}); its log{}:\n{}",
                self.log_file
                    .as_ref()
                    .map_or(String::new(), |p| format!(" ({})", p.display())),
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// Sends signal `sig` (kill(1) keeps the harness free of libc).
    pub fn signal(&self, sig: i32) -> Result<()> {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .status()
            .context("kill")?;
        if !status.success() {
            bail!("kill -{sig} {}: {status}", self.pid);
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `grace` for the exit; SIGKILL and an error past it.
    pub async fn terminate(&mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.signal(15)?;
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
                bail!("dedupd did not exit within {grace:?} of SIGTERM (killed)")
            }
        }
    }
}
