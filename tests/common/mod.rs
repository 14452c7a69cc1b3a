//! Test harness of the integration tests: the shared one (`harness.rs`, also used by the
//! benchmark) plus what only tests need, panicking where the shared one returns errors: unique
//! names, a broker client to set up queues, publish and drain, a route's config, the proxy
//! in-process (`dedupd::run_on` on a listener bound to port 0) or as a child process (its
//! metrics port read from its log), throwaway redis-servers, metrics, polling with deadlines,
//! and clean-up.
#![allow(dead_code)]

pub mod flow;
pub mod harness;

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use harness::{binary, Launch, Proxy, Scrape, AMQP_URL, REDIS_URL};

/// How long a child process may take to log its metrics address.
const STARTUP: Duration = Duration::from_secs(60);

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
    harness::poll_until(what, timeout, || {
        let fut = check();
        async move { Ok(fut.await) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A local TCP port that was free a moment ago: bound to port 0, then released.
///
/// Only for servers that cannot be handed a bound socket nor pick a port and say which:
/// `redis-server --port 0` turns TCP off instead. Another process may take the port between
/// the release and the server's bind; [`OwnRedis::run`] notices (its server exits, or another
/// one answers) and tries a second port. dedupd itself never gets a port from here: in-process
/// it is handed a bound listener, as a child process it binds port 0 and logs the address.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `rabbitmqctl -q args…`, which must succeed.
pub async fn rabbitmqctl(args: &[&str]) {
    let all: Vec<&str> = std::iter::once("-q").chain(args.iter().copied()).collect();
    if let Err(e) = harness::command("rabbitmqctl", &all).await {
        panic!("rabbitmqctl {args:?}: {e:#}");
    }
}

/// The broker side of a test: one connection and a confirm-mode channel (the shared
/// [`harness::Broker`], which it derefs to), and the queues to delete at the end.
pub struct Broker {
    base: harness::Broker,
    queues: Vec<String>,
}

impl std::ops::Deref for Broker {
    type Target = harness::Broker;
    fn deref(&self) -> &harness::Broker {
        &self.base
    }
}

impl Broker {
    pub async fn connect() -> Broker {
        let base = harness::Broker::connect("dedupd-test")
            .await
            .unwrap_or_else(|e| {
                panic!("RabbitMQ on 127.0.0.1:5672 (see README: tests need it): {e:#}")
            });
        base.confirms().await.expect("confirm mode");
        Broker {
            base,
            queues: Vec::new(),
        }
    }

    /// Declares a durable queue (deleted by `cleanup`), with `args`.
    pub async fn queue(&mut self, name: &str, args: FieldTable) {
        self.base
            .declare_with(name, args)
            .await
            .unwrap_or_else(|e| panic!("declare {name}: {e:#}"));
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

    /// Ready messages in `queue` (not counting unacked ones), on a channel of its own.
    pub async fn ready(&self, queue: &str) -> u32 {
        let ch = self.channel().await.expect("channel");
        let count = harness::count_on(&ch, queue)
            .await
            .unwrap_or_else(|e| panic!("passive declare: {e:#}"));
        let _ = ch.close(200, "".into()).await;
        count.messages
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
        let ch = self.channel().await.expect("channel");
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
            let _ = self.base.delete(q).await;
        }
        self.base.close().await;
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

/// The seed URLs of the test Redis Cluster (`DEDUPD_TEST_REDIS_CLUSTER`, set by
/// `scripts/test.sh`); `None`, after saying so, when it is not set outside CI. Under CI a missing
/// cluster fails the test instead of skipping it.
pub fn cluster_urls() -> Option<Vec<String>> {
    let Ok(urls) = std::env::var("DEDUPD_TEST_REDIS_CLUSTER") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "DEDUPD_TEST_REDIS_CLUSTER is not set: run the tests with scripts/test.sh"
        );
        eprintln!("SKIPPED: set DEDUPD_TEST_REDIS_CLUSTER to run against a Redis Cluster");
        return None;
    };
    Some(urls.split(',').map(|u| u.trim().to_owned()).collect())
}

/// Deletes every key under `prefix:` on every primary of the Redis Cluster `seed` belongs to
/// (SCAN per primary, then one UNLINK per key: keys of different slots cannot share one).
pub async fn cluster_cleanup(seed: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(seed) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let slots: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    let mut nodes: Vec<String> = slots
        .iter()
        .filter_map(|range| {
            let node: Vec<redis::Value> = redis::from_redis_value(range.get(2)?.clone()).ok()?;
            let host: String = redis::from_redis_value(node.first()?.clone()).ok()?;
            let port: u16 = redis::from_redis_value(node.get(1)?.clone()).ok()?;
            Some(format!("redis://{host}:{port}"))
        })
        .collect();
    nodes.sort();
    nodes.dedup();
    for node in nodes {
        let Ok(client) = redis::Client::open(node.as_str()) else {
            continue;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            continue;
        };
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
            else {
                break;
            };
            for key in keys {
                let _: redis::RedisResult<i64> =
                    redis::cmd("UNLINK").arg(key).query_async(&mut conn).await;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
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
    pub extra: String,
}

impl Setup {
    /// A route `{name}` from `{name}.in` to `{name}.out` through the default exchange,
    /// Redis store with key prefix `{name}`, metrics on port 0 (the proxy picks one).
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
listen = "127.0.0.1:0"

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

    /// A metric's value for this route (0 if absent), from the proxy whose endpoint is `port`.
    pub async fn metric(&self, port: u16, name: &str) -> f64 {
        metric(port, name, &[("route", &self.name)]).await
    }

    /// Waits until the proxy on `port` consumed `n` and nothing is in flight.
    pub async fn wait_settled(&self, port: u16, n: u64, timeout: Duration) {
        wait_for(
            &format!("{} consumed {n} and settled", self.name),
            timeout,
            || async {
                let consumed = self.metric(port, "dedupd_messages_consumed_total").await;
                let inflight = self.metric(port, "dedupd_inflight_messages").await;
                (consumed as u64 >= n && inflight == 0.0).then_some(())
            },
        )
        .await
    }
}

/// The proxy running in this process through `dedupd::run_on`, its metrics endpoint on a
/// listener bound to port 0.
pub struct InProcess {
    pub port: u16,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<()>,
}

/// A listener on 127.0.0.1, port 0 (the system picks a free one): (listener, its port).
pub fn bind_any() -> (tokio::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.set_nonblocking(true).expect("non-blocking");
    let port = listener.local_addr().expect("bound address").port();
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    (listener, port)
}

impl InProcess {
    pub fn start(config: dedupd::config::Config) -> InProcess {
        let (listener, port) = bind_any();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            dedupd::run_on(config, listener, token)
                .await
                .expect("dedupd::run_on");
        });
        InProcess {
            port,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("run returns within the grace period")
            .expect("run task");
    }
}

/// The built binary as a child process (the shared [`Proxy`], which it derefs to), with the
/// port its metrics endpoint bound.
pub struct Child {
    pub proxy: Proxy,
    pub port: u16,
}

impl std::ops::Deref for Child {
    type Target = Proxy;
    fn deref(&self) -> &Proxy {
        &self.proxy
    }
}

impl std::ops::DerefMut for Child {
    fn deref_mut(&mut self) -> &mut Proxy {
        &mut self.proxy
    }
}

impl Child {
    /// Runs `dedupd args…` (a `run` command) and waits for its metrics address.
    pub async fn start(args: &[&str]) -> Child {
        Self::launch(Launch::new(args)).await
    }

    /// Like `start`, for a [`Launch`] with other settings.
    pub async fn launch(launch: Launch) -> Child {
        let mut proxy = launch.spawn().unwrap_or_else(|e| panic!("{e:#}"));
        let port = proxy
            .metrics_port(STARTUP)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        Child { proxy, port }
    }

    pub fn signal(&self, sig: i32) {
        self.proxy.signal(sig).unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// SIGTERM: the process exits with 0 within 15 s. Returns its whole log.
    pub async fn stop(mut self) -> String {
        self.signal(15);
        let status = tokio::time::timeout(Duration::from_secs(15), self.proxy.child.wait())
            .await
            .expect("exits within the grace period after SIGTERM")
            .expect("wait");
        assert_eq!(
            status.code(),
            Some(0),
            "exit code after SIGTERM: {status:?}"
        );
        let lines = self.proxy.log_closed(Duration::from_secs(5)).await;
        lines.map(|l| l.join("\n")).unwrap_or_else(|_| self.log())
    }

    /// Every log line so far, one a line.
    pub fn log(&self) -> String {
        self.proxy.lines().join("\n")
    }
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

/// GET `path` on 127.0.0.1:`port`: (status, body). `None` if nothing answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    harness::http_get(port, path).await.ok()
}

/// The status of GET `path` on 127.0.0.1:`port`, `None` if nothing answers.
pub async fn status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).await.map(|(s, _)| s)
}

/// The value of the first sample of `name` whose labels include `labels` (0 if none).
pub async fn metric(port: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    let Some((200, body)) = http_get(port, "/metrics").await else {
        return 0.0;
    };
    parse_metric(&body, name, labels).unwrap_or(0.0)
}

pub fn parse_metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    Scrape::parse(body).first(name, labels)
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

/// A throwaway redis-server of the test's own (a child process, killed if the test ends
/// without stopping it), so Redis faults touch nobody else. `persist`: AOF, fsync always, in
/// a folder of its own, so keys survive a restart (as in production, see deploy/redis.conf);
/// otherwise a restart starts empty.
pub struct OwnRedis {
    pub port: u16,
    persist: bool,
    child: Option<tokio::process::Child>,
}

impl OwnRedis {
    /// Whether a `redis-server` binary can be run here.
    pub fn installed() -> bool {
        std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok()
    }

    /// A server not started yet, on a port that was free a moment ago ([`free_port`]): for
    /// tests that give the proxy its URL before it runs.
    pub fn reserve(persist: bool) -> OwnRedis {
        OwnRedis {
            port: free_port(),
            persist,
            child: None,
        }
    }

    /// A running server on a free port; if another process took the port before the server
    /// bound it, a second port is tried.
    pub async fn run(persist: bool) -> OwnRedis {
        let mut redis = OwnRedis::reserve(persist);
        if let Err(e) = redis.try_start().await {
            eprintln!(
                "own redis-server on port {}: {e:#}; another port",
                redis.port
            );
            redis = OwnRedis::reserve(persist);
            redis.start().await;
        }
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("dedupd-test-redis-{}", self.port))
    }

    /// Starts the server on its port (again, after `stop` or `kill`).
    pub async fn start(&mut self) {
        if let Err(e) = self.try_start().await {
            panic!("own redis-server on port {}: {e:#}", self.port);
        }
    }

    async fn try_start(&mut self) -> anyhow::Result<()> {
        let port = self.port.to_string();
        let mut cmd = tokio::process::Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", ""]);
        if self.persist {
            let dir = self.dir();
            std::fs::create_dir_all(&dir)?;
            cmd.args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                .arg(dir);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().unwrap_or_default();
        self.child = Some(child);
        // Answering, and as this process: another server on a raced port would answer too.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                anyhow::bail!("redis-server exited at start ({status}): port taken?");
            }
            if let Some(info) = self.output(&["INFO", "server"]).await {
                let ours = info
                    .lines()
                    .any(|l| l.trim() == format!("process_id:{pid}"));
                if !ours {
                    anyhow::bail!("another server answers on port {}", self.port);
                }
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "own redis-server on port {} not answering after 20s",
                    self.port
                );
            }
            tokio::time::sleep(harness::POLL).await;
        }
    }

    /// `redis-cli -p PORT args…`: its output, if it succeeded.
    async fn output(&self, args: &[&str]) -> Option<String> {
        let out = tokio::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .await
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a command; whether it succeeded (ERR replies count as failures).
    pub async fn cmd(&self, args: &[&str]) -> bool {
        self.output(args).await.is_some_and(|o| !o.contains("ERR"))
    }

    /// SHUTDOWN NOSAVE (the AOF, if any, is on disk), and waits until the process is gone.
    pub async fn stop(&mut self) {
        let _ = self.cmd(&["SHUTDOWN", "NOSAVE"]).await;
        if let Some(mut child) = self.child.take() {
            let exited = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
            if exited.is_err() {
                let _ = child.kill().await;
                panic!("own redis-server on port {} ignored SHUTDOWN", self.port);
            }
        }
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill our redis-server");
        }
    }

    /// Stops the server and deletes its folder.
    pub async fn remove(mut self) {
        self.stop().await;
        let _ = std::fs::remove_dir_all(self.dir());
    }
}
