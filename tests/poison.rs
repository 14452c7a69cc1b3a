//! Poison: input and surroundings that must not take the process down or stop a route. Headers
//! nested as deeply as a frame can carry (published frame by frame over a raw socket, since a
//! client library would overflow its own stack serializing them), a log reader that went away,
//! route tasks that end on their own, and an unusable store at start.
//!
//! The deep-header and log tests run the built binary as a child process; the tests here run one
//! at a time, each against its own queues and key prefix.

mod common;

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use common::*;
use dedupd::telemetry::{Component, Health};
use lapin::BasicProperties;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

static SERIAL: Mutex<()> = Mutex::const_new(());
const LONG: Duration = Duration::from_secs(60);

/// The frame_max the test's raw publisher negotiates: RabbitMQ's default, the most it allows.
const FRAME_MAX: u32 = 131_072;

/// A minimal AMQP 0-9-1 publisher, frame by frame, so that headers too deep for any client
/// library's recursive serializer can be sent as the bytes they are.
struct RawAmqp {
    stream: TcpStream,
}

fn method(class: u16, method: u16) -> Vec<u8> {
    let mut p = class.to_be_bytes().to_vec();
    p.extend(method.to_be_bytes());
    p
}

fn shortstr(out: &mut Vec<u8>, s: &str) {
    out.push(u8::try_from(s.len()).expect("short string"));
    out.extend(s.as_bytes());
}

impl RawAmqp {
    async fn connect() -> RawAmqp {
        let mut stream = TcpStream::connect("127.0.0.1:5672")
            .await
            .expect("RabbitMQ on 127.0.0.1:5672");
        stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .expect("send");
        let mut c = RawAmqp { stream };
        c.expect_method(0, 10, 10).await; // connection.start
        let mut p = method(10, 11); // start-ok
        p.extend(0u32.to_be_bytes()); // no client properties
        shortstr(&mut p, "PLAIN");
        let response = b"\0guest\0guest";
        p.extend((response.len() as u32).to_be_bytes());
        p.extend(response);
        shortstr(&mut p, "en_US");
        c.send(1, 0, &p).await;
        let tune = c.expect_method(0, 10, 30).await;
        let mut p = method(10, 31); // tune-ok: the broker's channel_max, FRAME_MAX, no heartbeats
        p.extend(&tune[..2]);
        p.extend(FRAME_MAX.to_be_bytes());
        p.extend(0u16.to_be_bytes());
        c.send(1, 0, &p).await;
        let mut p = method(10, 40); // open "/"
        shortstr(&mut p, "/");
        shortstr(&mut p, "");
        p.push(0);
        c.send(1, 0, &p).await;
        c.expect_method(0, 10, 41).await;
        let mut p = method(20, 10); // channel.open 1
        shortstr(&mut p, "");
        c.send(1, 1, &p).await;
        c.expect_method(1, 20, 11).await;
        let mut p = method(85, 10); // confirm.select
        p.push(0);
        c.send(1, 1, &p).await;
        c.expect_method(1, 85, 11).await;
        c
    }

    async fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut frame = vec![kind];
        frame.extend(channel.to_be_bytes());
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend(payload);
        frame.push(0xCE);
        self.stream.write_all(&frame).await.expect("send frame");
    }

    /// Reads frames until the method `class.method` on `channel`; returns its arguments.
    async fn expect_method(&mut self, channel: u16, class: u16, id: u16) -> Vec<u8> {
        loop {
            let mut head = [0u8; 7];
            self.stream
                .read_exact(&mut head)
                .await
                .expect("frame header");
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            self.stream.read_exact(&mut payload).await.expect("frame");
            if head[0] != 1 {
                continue; // heartbeat
            }
            let got = (
                u16::from_be_bytes([head[1], head[2]]),
                u16::from_be_bytes([payload[0], payload[1]]),
                u16::from_be_bytes([payload[2], payload[3]]),
            );
            if got == (channel, class, id) {
                payload.truncate(size);
                return payload.split_off(4);
            }
            panic!(
                "expected {class}.{id} on channel {channel}, got {got:?}: {}",
                String::from_utf8_lossy(&payload)
            );
        }
    }

    /// Publishes through the default exchange with `headers` (a whole encoded table) and a
    /// message_id, and waits for the broker's ack.
    async fn publish(&mut self, queue: &str, headers: &[u8], message_id: &str, body: &[u8]) {
        let mut p = method(60, 40);
        p.extend(0u16.to_be_bytes());
        shortstr(&mut p, "");
        shortstr(&mut p, queue);
        p.push(0);
        self.send(1, 1, &p).await;
        let mut h = method(60, 0); // class 60, weight 0
        h.extend((body.len() as u64).to_be_bytes());
        h.extend((0x2000u16 | 0x0080).to_be_bytes()); // headers, message-id
        h.extend(headers);
        shortstr(&mut h, message_id);
        assert!(
            h.len() + 8 <= FRAME_MAX as usize,
            "header frame of {} bytes",
            h.len() + 8
        );
        self.send(2, 1, &h).await;
        self.send(3, 1, body).await;
        self.expect_method(1, 60, 80).await; // basic.ack
    }

    async fn close(mut self) {
        let mut p = method(10, 50);
        p.extend(200u16.to_be_bytes());
        shortstr(&mut p, "");
        p.extend([0, 0, 0, 0]);
        self.send(1, 0, &p).await;
        self.expect_method(0, 10, 51).await;
    }
}

/// Header bytes a message with `message_id` may use so that its content header frame is
/// exactly the largest `FRAME_MAX` allows: 8 bytes of frame, 14 of class, weight, body size
/// and flags, the message_id.
fn header_budget(message_id: &str) -> usize {
    FRAME_MAX as usize - 8 - 14 - 1 - message_id.len()
}

/// An encoded headers table `{"d": [[[...]]]}`: arrays nested as deep as `budget` bytes allow
/// (5 bytes a level), built iteratively. Returns the bytes and the depth of the headers.
fn deep_arrays(budget: usize) -> (Vec<u8>, usize) {
    let levels = (budget - 4 - 2) / 5;
    let mut out = Vec::with_capacity(budget);
    out.extend(((2 + 5 * levels) as u32).to_be_bytes());
    shortstr(&mut out, "d");
    for i in 0..levels {
        out.push(b'A');
        out.extend(((5 * (levels - 1 - i)) as u32).to_be_bytes());
    }
    (out, levels + 1)
}

/// An encoded headers table `{"d": {"": {"": ...}}}`: tables under empty keys nested as deep
/// as `budget` bytes allow (6 bytes a level), built iteratively.
fn deep_tables(budget: usize) -> (Vec<u8>, usize) {
    let levels = (budget - 4 - 2 + 1) / 6;
    let mut out = Vec::with_capacity(budget);
    out.extend(((2 + 6 * levels - 1) as u32).to_be_bytes());
    shortstr(&mut out, "d");
    for i in 0..levels {
        out.push(b'F');
        out.extend(((6 * (levels - 1 - i)) as u32).to_be_bytes());
        if i + 1 < levels {
            out.push(0); // the next table's key: ""
        }
    }
    (out, levels + 1)
}

/// Panics if the proxy has exited.
fn assert_alive(proxy: &mut Child) {
    if let Ok(Some(status)) = proxy.child.try_wait() {
        panic!("dedupd died: {status:?}");
    }
}

/// Waits until `queue` holds `n` ready messages, checking that the proxy stays alive.
async fn wait_ready(broker: &Broker, proxy: &mut Child, queue: &str, n: u32) {
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        assert_alive(proxy);
        let have = broker.ready(queue).await;
        if have >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue}: {have} of {n} messages within {LONG:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_readyz(port: u16) {
    wait_for("/readyz 200", LONG, || async {
        matches!(http_get(port, "/readyz").await, Some((200, _))).then_some(())
    })
    .await
}

fn ordinary(n: usize) -> Vec<(Vec<u8>, BasicProperties)> {
    (0..n)
        .map(|i| {
            (
                format!("body-{i}").into_bytes(),
                BasicProperties::default().with_message_id(format!("id-{i}").into()),
            )
        })
        .collect()
}

#[tokio::test]
async fn headers_nested_as_deep_as_a_frame_allows_neither_crash_nor_stop_the_route() {
    let _serial = SERIAL.lock().await;
    let setup = Setup::new("deep");
    let mut broker = Broker::connect().await;
    let dlq = setup.declare(&mut broker).await;
    let path = setup.write();
    let mut proxy = Child::start(&["run", "-c", path.to_str().expect("utf-8 path")]).await;
    wait_readyz(proxy.port).await;

    let mut raw = RawAmqp::connect().await;
    let (arrays, depth) = deep_arrays(header_budget("deep-arrays"));
    println!("POISON arrays nested {depth} deep");
    raw.publish(&setup.queue, &arrays, "deep-arrays", b"a")
        .await;
    let (tables, depth) = deep_tables(header_budget("deep-tables"));
    println!("POISON tables nested {depth} deep");
    raw.publish(&setup.queue, &tables, "deep-tables", b"t")
        .await;
    raw.close().await;
    let messages = ordinary(20);
    broker.publish_all(&setup.queue, &messages).await;

    // Counted, not received: a client library would crash parsing the deep ones here too.
    wait_ready(&broker, &mut proxy, &setup.out, messages.len() as u32).await;
    setup
        .wait_settled(proxy.port, 2 + messages.len() as u64, LONG)
        .await;
    assert_alive(&mut proxy);
    assert_eq!(status(proxy.port, "/readyz").await, Some(200));

    // The deep ones are refused as unparsable (the pipeline checks amqp::header_depth).
    wait_ready(&broker, &mut proxy, &dlq, 2).await;
    let unparsable = metric(
        proxy.port,
        "dedupd_messages_rejected_total",
        &[("route", &setup.name), ("reason", "unparsable")],
    )
    .await;
    assert_eq!(unparsable, 2.0);
    assert_eq!(broker.ready(&setup.out).await, messages.len() as u32);
    proxy.stop().await;
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

#[tokio::test]
async fn a_log_reader_that_went_away_stops_neither_routes_nor_signals() {
    let _serial = SERIAL.lock().await;
    let setup = Setup::new("epipe");
    let mut broker = Broker::connect().await;
    let dlq = setup.declare(&mut broker).await;
    let path = setup.write();
    // Debug logs a line per message without a key, so the route itself writes to the pipe.
    // The harness stops reading at the route's "consuming" line and closes the pipe: every
    // later write to stderr fails with EPIPE.
    let launch = Launch::new(&["run", "-c", path.to_str().expect("utf-8 path")])
        .env("RUST_LOG", "info,dedupd=debug")
        .close_stderr_after("consuming");
    let mut proxy = Child::launch(launch).await;
    if let Err(e) = proxy.wait_line("consuming", LONG).await {
        panic!("the route consuming within the deadline: {e:#}");
    }

    let keyless: Vec<_> = (0..10)
        .map(|i| {
            (
                format!("keyless-{i}").into_bytes(),
                BasicProperties::default(),
            )
        })
        .collect();
    broker.publish_all(&setup.queue, &keyless).await;
    let messages = ordinary(50);
    broker.publish_all(&setup.queue, &messages).await;

    wait_ready(&broker, &mut proxy, &setup.out, messages.len() as u32).await;
    wait_ready(&broker, &mut proxy, &dlq, keyless.len() as u32).await;
    let dropped = metric(proxy.port, "dedupd_log_write_errors_total", &[]).await;
    // Rejections are logged rate-limited: at least the first one hit the closed pipe.
    assert!(dropped >= 1.0, "log lines dropped and counted: {dropped}");
    assert_eq!(status(proxy.port, "/readyz").await, Some(200));
    proxy.stop().await;
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

/// Log lines written while `f` runs, on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<StdMutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture lock")).into_owned()
    }
}

/// Supervises `task` as the route `r` with a fresh [`Health`]; returns it and the log.
async fn supervise(
    task: impl std::future::Future<Output = ()>,
    shutdown: CancellationToken,
) -> (Arc<Health>, String) {
    let health = Health::new();
    assert!(health.ready());
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    dedupd::supervise_route("r".into(), task, shutdown, health.clone()).await;
    (health, log.text())
}

#[tokio::test]
async fn a_route_task_that_panics_is_logged_and_holds_readiness_down() {
    let (health, log) = supervise(
        async { panic!("boom in the route") },
        CancellationToken::new(),
    )
    .await;
    assert!(log.contains("ERROR"), "{log}");
    assert!(log.contains("route=r"), "{log}");
    assert!(log.contains("boom in the route"), "{log}");
    assert!(!health.ready());
    assert!(!health.is_up(Component::Upstream));
    // For good: other holders coming up do not make it ready again.
    let other = health.flag(Component::Upstream);
    other.set(true);
    assert!(!health.ready());
}

#[tokio::test]
async fn a_route_task_that_returns_before_shutdown_is_logged_and_holds_readiness_down() {
    let (health, log) = supervise(async {}, CancellationToken::new()).await;
    assert!(log.contains("ERROR"), "{log}");
    assert!(log.contains("returned before shutdown"), "{log}");
    assert!(!health.ready());

    // The same end once shutdown was asked for is the normal one: nothing logged, still ready.
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let (health, log) = supervise(async {}, shutdown).await;
    assert!(log.is_empty(), "{log}");
    assert!(health.ready());
}

/// `run` binds `metrics.listen` and hands the listener to `run_on`, which serves it: the
/// release on an early error is `run_on`'s, checked here on a listener bound to port 0.
#[tokio::test]
async fn run_releases_the_metrics_port_when_the_store_is_unusable() {
    let setup = Setup::new("badstore");
    let mut config = setup.config();
    config.store.url = dedupd::config::StoreUrl::Cluster(Vec::new());
    let (listener, port) = bind_any();
    let result = dedupd::run_on(config, listener, CancellationToken::new()).await;
    assert!(
        matches!(result, Err(dedupd::RunError::Store(_))),
        "{result:?}"
    );
    // Nothing of that run goes on serving: the port is free again.
    wait_for(
        "the metrics port released",
        Duration::from_secs(5),
        || async {
            std::net::TcpListener::bind(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        },
    )
    .await;
}

/// Resident kB of each large private read-write mapping of `pid`, keyed by its size in kB:
/// thread stacks among them, told apart by their sizes.
fn large_mappings(pid: u32) -> Vec<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut out = Vec::new();
    let mut writable = false;
    let mut size = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Size:") => size = words.next().and_then(|n| n.parse().ok()).unwrap_or(0),
            Some("Rss:") if writable && size >= 16 << 10 => {
                out.push((size, words.next().and_then(|n| n.parse().ok()).unwrap_or(0)));
            }
            Some(first) if first.contains('-') => {
                writable = words.next().is_some_and(|perms| perms.starts_with("rw"));
            }
            _ => {}
        }
    }
    out
}

/// Not a check but a measurement (`cargo test --test poison -- --ignored --nocapture`; set
/// DEDUPD_TEST_BIN to measure a release binary): stack resident in each thread of the proxy after a
/// shallow and after the deepest header, per level of nesting. lapin's I/O threads get a
/// RUST_MIN_STACK of 777 MiB so that their mappings stand out.
#[tokio::test]
#[ignore]
async fn stack_use_per_nesting_level() {
    let _serial = SERIAL.lock().await;
    const IO_STACK_KB: u64 = 777 << 10;
    for (kind, build) in [
        ("arrays", deep_arrays as fn(usize) -> (Vec<u8>, usize)),
        ("tables", deep_tables),
    ] {
        let setup = Setup::new("stack");
        let mut broker = Broker::connect().await;
        setup.declare(&mut broker).await;
        let path = setup.write();
        let min_stack = (IO_STACK_KB << 10).to_string();
        let launch = Launch::new(&["run", "-c", path.to_str().expect("utf-8 path")])
            .env("RUST_MIN_STACK", &min_stack);
        let mut proxy = Child::launch(launch).await;
        wait_readyz(proxy.port).await;
        let pid = proxy.child.id().expect("running");
        let mut raw = RawAmqp::connect().await;
        let mut before = Vec::new();
        let mut depths = Vec::new();
        // A shallow one, then the deepest forwarded (the downstream I/O thread serializes it),
        // then the deepest again as a duplicate (the runtime thread drops it, as it drops the
        // ones it rejects).
        let deepest = header_budget("deep-2");
        for (n, budget, id) in [
            (1, 5_000, "deep-1"),
            (2, deepest, "deep-2"),
            (3, deepest, "deep-2"),
        ] {
            let (headers, depth) = build(budget);
            raw.publish(&setup.queue, &headers, id, b"x").await;
            setup.wait_settled(proxy.port, n, LONG).await;
            assert_alive(&mut proxy);
            depths.push(depth);
            let now = large_mappings(pid);
            if n == 1 {
                before = now;
                continue;
            } else if n == 2 {
                continue;
            }
            for ((size, rss), (_, rss_before)) in now.iter().zip(&before) {
                let thread = if *size >= IO_STACK_KB && *size <= IO_STACK_KB + 1024 {
                    "lapin I/O thread"
                } else {
                    "other (runtime thread stack, or heap)"
                };
                println!(
                    "STACK {kind}: {thread} mapping {size} kB: {rss_before} kB resident at depth {}, {rss} kB at depth {}: {:.0} bytes/level",
                    depths[0],
                    depths[1],
                    (rss.saturating_sub(*rss_before) * 1024) as f64 / (depths[1] - depths[0]) as f64
                );
            }
        }
        raw.close().await;
        proxy.stop().await;
        broker.cleanup().await;
        redis_cleanup(&setup.name).await;
    }
}
