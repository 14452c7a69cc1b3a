//! Test harness shared by the integration tests: unique names, a broker client to set up queues,
//! publish and drain, a proxy runner (in-process through `dedupd::run`, or the built binary as a
//! child process), metrics scraping, polling with deadlines, and clean-up.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// A unique, readable name for one test run: `t-{test}-{random}`.
pub fn unique(test: &str) -> String {
    format!("t-{test}-{:08x}", rand::random::<u32>())
}

/// Polls `check` every 20ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free local TCP port (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The broker side of a test: one connection and a confirm-mode channel.
pub struct Broker {
    pub conn: Connection,
    pub ch: Channel,
    queues: Vec<String>,
}

impl Broker {
    pub async fn connect() -> Broker {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (see README: tests need it)");
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Broker {
            conn,
            ch,
            queues: Vec::new(),
        }
    }

    /// Declares a durable queue (deleted by `cleanup`), with `args`.
    pub async fn queue(&mut self, name: &str, args: FieldTable) {
        self.ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap_or_else(|e| panic!("declare {name}: {e}"));
        self.queues.push(name.to_owned());
    }

    /// Declares `name` with a dead-letter queue `{name}.dlq` behind the default exchange.
    pub async fn queue_with_dlq(&mut self, name: &str) -> String {
        let dlq = format!("{name}.dlq");
        self.queue(&dlq, FieldTable::default()).await;
        let args = dedupd::amqp::dead_letter_to(&dlq);
        self.queue(name, args).await;
        dlq
    }

    /// Publishes to `queue` through the default exchange and waits for the confirm.
    pub async fn publish(&self, queue: &str, body: &[u8], props: BasicProperties) {
        let confirm = self
            .ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack());
    }

    /// Publishes many messages with all confirms outstanding at once.
    pub async fn publish_all(&self, queue: &str, messages: &[(Vec<u8>, BasicProperties)]) {
        for chunk in messages.chunks(500) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for (body, props) in chunk {
                confirms.push(
                    self.ch
                        .basic_publish(
                            "".into(),
                            queue.into(),
                            BasicPublishOptions::default(),
                            body,
                            props.clone(),
                        )
                        .await
                        .expect("publish"),
                );
            }
            for c in confirms {
                assert!(c.await.expect("confirm").is_ack());
            }
        }
    }

    /// Ready messages in `queue` (not counting unacked ones).
    pub async fn ready(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let _ = ch.close(200, "".into()).await;
        q.message_count()
    }

    /// Takes every message now in `queue` (acking them), in queue order.
    pub async fn drain(&self, queue: &str) -> Vec<lapin::message::Delivery> {
        let mut out = Vec::new();
        while let Some(msg) = self
            .ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")
        {
            msg.delivery
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
            out.push(msg.delivery);
        }
        out
    }

    /// Consumes `queue` until `n` messages arrived (acking them), or panics after `timeout`.
    pub async fn receive(
        &self,
        queue: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<lapin::message::Delivery> {
        let ch = self.conn.create_channel().await.expect("channel");
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut out = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    d.ack(BasicAckOptions::default()).await.expect("ack");
                    out.push(d);
                }
                Ok(other) => panic!("consumer of {queue} ended: {other:?}"),
                Err(_) => panic!(
                    "{queue}: got {} of {n} messages within {timeout:?}",
                    out.len()
                ),
            }
        }
        let _ = ch.close(200, "".into()).await;
        out
    }

    /// Deletes every queue this broker declared.
    pub async fn cleanup(&self) {
        for q in &self.queues {
            let _ = self
                .ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self.conn.close(200, "".into()).await;
    }
}

/// Deletes every Redis key under `prefix:`.
pub async fn redis_cleanup(prefix: &str) {
    let client = redis::Client::open(REDIS_URL).expect("redis url");
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
    }
}

/// A route's TOML for tests.
pub struct Setup {
    pub name: String,
    pub queue: String,
    pub out: String,
    pub store_kind: &'static str,
    pub key: String,
    pub on_missing_key: &'static str,
    pub mode: &'static str,
    pub window: &'static str,
    pub lease: &'static str,
    pub metrics_port: u16,
    pub extra: String,
}

impl Setup {
    /// A route `{name}` from `{name}.in` to `{name}.out` through the default exchange,
    /// Redis store with key prefix `{name}`.
    pub fn new(test: &str) -> Setup {
        let name = unique(test);
        Setup {
            queue: format!("{name}.in"),
            out: format!("{name}.out"),
            name,
            store_kind: "redis",
            key: "message_id".into(),
            on_missing_key: "reject",
            mode: "enforce",
            window: "1h",
            lease: "5s",
            metrics_port: free_port(),
            extra: String::new(),
        }
    }

    pub fn toml(&self) -> String {
        format!(
            r#"
[upstream]
url = "{AMQP_URL}"
prefetch = 200

[store]
kind = "{kind}"
url = "{REDIS_URL}"
key_prefix = "{name}"
lease = "{lease}"

[metrics]
listen = "127.0.0.1:{port}"

[tuning]
batch_size = 50
shutdown_grace = "5s"
backoff_max = "500ms"

[routes.{name}]
queue = "{queue}"
exchange = ""
routing_key = "{out}"
key = "{key}"
window = "{window}"
on_missing_key = "{missing}"
mode = "{mode}"
{extra}
"#,
            kind = self.store_kind,
            name = self.name,
            lease = self.lease,
            port = self.metrics_port,
            queue = self.queue,
            out = self.out,
            key = self.key,
            window = self.window,
            missing = self.on_missing_key,
            mode = self.mode,
            extra = self.extra,
        )
    }

    pub fn config(&self) -> dedupd::config::Config {
        dedupd::config::Config::from_toml(&self.toml(), std::path::Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("test config: {e}\n{}", self.toml()))
    }

    /// Declares `{name}.in` (with a DLQ) and `{name}.out`.
    pub async fn declare(&self, broker: &mut Broker) -> String {
        broker.queue(&self.out, FieldTable::default()).await;
        broker.queue_with_dlq(&self.queue).await
    }

    /// Writes the config to a temp file for the binary.
    pub fn write(&self) -> PathBuf {
        let path = std::env::temp_dir().join(format!("{}.toml", self.name));
        std::fs::write(&path, self.toml()).expect("write config");
        path
    }

    /// A metric's value for this route (0 if absent), from the proxy's endpoint.
    pub async fn metric(&self, name: &str) -> f64 {
        metric(self.metrics_port, name, &[("route", &self.name)]).await
    }

    /// Waits until the proxy consumed `n` and nothing is in flight.
    pub async fn wait_settled(&self, n: u64, timeout: Duration) {
        wait_for(
            &format!("{} consumed {n} and settled", self.name),
            timeout,
            || async {
                let consumed = self.metric("dedupd_messages_consumed_total").await;
                let inflight = self.metric("dedupd_inflight_messages").await;
                (consumed as u64 >= n && inflight == 0.0).then_some(())
            },
        )
        .await
    }
}

/// The proxy running in this process through `dedupd::run`.
pub struct InProcess {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

impl InProcess {
    pub fn start(config: dedupd::config::Config) -> InProcess {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            dedupd::run(config, token).await.expect("dedupd::run");
        });
        InProcess { shutdown, task }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("run returns within the grace period")
            .expect("run task");
    }
}

/// The built binary as a child process.
pub struct Child {
    pub child: tokio::process::Child,
}

impl Child {
    pub fn spawn(args: &[&str]) -> Child {
        Self::spawn_with_stderr(args, Stdio::inherit())
    }

    /// Like `spawn`, with the child's log lines (stderr) going to `stderr`.
    pub fn spawn_with_stderr(args: &[&str], stderr: impl Into<Stdio>) -> Child {
        let child = tokio::process::Command::new(binary())
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn dedupd");
        Child { child }
    }

    pub fn signal(&self, sig: i32) {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY-free: kill(1) through the shell keeps tests free of libc.
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

/// The binary under test: this build's, or `DEDUPD_TEST_BIN` (to measure another build, e.g.
/// an older release, with the same tests).
pub fn binary() -> String {
    std::env::var("DEDUPD_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_dedupd").to_owned())
}

/// Runs the binary to completion with `args`: (exit code, stdout, stderr).
pub async fn run_binary(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = tokio::process::Command::new(binary())
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .await
        .expect("run dedupd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// GET `path` on 127.0.0.1:`port`: (status, body). `None` if nothing listens.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// The value of the first sample of `name` whose labels include `labels` (0 if none).
pub async fn metric(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    let Some((200, body)) = http_get(port, "/metrics").await else {
        return 0.0;
    };
    parse_metric(&body, name, labels).unwrap_or(0.0)
}

pub fn parse_metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let have: HashMap<&str, &str> = label_text
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            labels
                .iter()
                .all(|(k, v)| have.get(k) == Some(v))
                .then(|| value.parse().ok())?
        })
        .next()
}

/// A connection to the test Redis.
pub async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis on 127.0.0.1:6379 (see README: tests need it)")
}

/// `SET key value PX px`: writes a store key as another instance (or an operator) would.
pub async fn redis_set(
    redis: &mut redis::aio::MultiplexedConnection,
    key: &str,
    value: &str,
    px: u64,
) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(px)
        .query_async(redis)
        .await
        .unwrap_or_else(|e| panic!("SET {key}: {e}"));
}

/// A TCP relay on 127.0.0.1 (port 0) to `target`, whose server-to-client direction can be
/// paused: the client's requests still go out, but nothing comes back (replies, confirms)
/// until it resumes. Stops with the test's runtime.
pub struct Relay {
    pub port: u16,
    paused: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    pub async fn start(target: &str) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let port = listener.local_addr().expect("relay address").port();
        let (paused, watch) = tokio::sync::watch::channel(false);
        let target = target.to_owned();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                });
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if watch.wait_for(|paused| !*paused).await.is_err() {
                            return;
                        }
                        if client_tx.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Relay { port, paused }
    }

    pub fn pause(&self, paused: bool) {
        self.paused.send_replace(paused);
    }
}
