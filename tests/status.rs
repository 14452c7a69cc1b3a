//! The status page (`GET /`) rendered by a real browser: headless Chromium (Debian's
//! `chromium`, or `DEDUPD_CHROMIUM`) loads it, runs its script for 5 s of virtual time (so it
//! refreshes twice), and the test reads the rendered DOM (`--dump-dom`).
//!
//! - Against a real dedupd (in-process, RabbitMQ, a private Redis): what the page shows equals
//!   what `/metrics` says. With `DEDUPD_SCREENSHOT=1` it also writes `docs/status.png`.
//! - Against a scripted `/metrics` (a small server here that serves the real page): rates from
//!   successive samples, ratios, rejections by reason, components down and never reported.
//!
//! Without Chromium the tests are skipped with a message, or fail when `CI` is set.

mod own_redis;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use dedupd::telemetry::{
    CONSUMED, DUPLICATES, FORWARDED, INFLIGHT, REJECTED, STORE_KEYS, STORE_MEMORY, TAKEOVERS, UP,
};
use own_redis::OwnRedis;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const SETTLE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Chromium

/// The browser to use, `None` to skip (outside CI).
fn chromium() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("DEDUPD_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let found = ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        });
    if found.is_none() {
        let why = "headless Chromium is needed for the status page tests: install Debian's \
                   `chromium` (scripts/services.sh does), or set DEDUPD_CHROMIUM to a browser";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIPPED: {why}");
    }
    found
}

/// Runs headless Chromium on `url` with `args` and a fresh profile; returns its stdout.
async fn run_chromium(browser: &Path, url: &str, args: &[String]) -> String {
    let profile = std::env::temp_dir().join(format!(
        "dedupd-status-chromium-{:016x}",
        rand::random::<u64>()
    ));
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let _ = std::fs::remove_dir_all(&profile);
    let output = output
        .expect("chromium finishes within 90 s")
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The page's DOM after its script ran for 5 s of virtual time: the first sample at load and
/// two refreshes (every 2 s), so rates exist.
async fn rendered(browser: &Path, url: &str) -> String {
    let dom = run_chromium(
        browser,
        url,
        &["--virtual-time-budget=5000".into(), "--dump-dom".into()],
    )
    .await;
    assert!(dom.contains("<table"), "not the status page: {dom}");
    dom
}

// ---------------------------------------------------------------------------------------------
// Reading the rendered DOM

/// The `<tr>` of `route`.
fn row<'a>(dom: &'a str, route: &str) -> &'a str {
    let start = dom
        .find(&format!("data-route=\"{route}\""))
        .unwrap_or_else(|| panic!("no row for route {route} in the page:\n{dom}"));
    let rest = &dom[start..];
    &rest[..rest.find("</tr>").unwrap_or(rest.len())]
}

/// A cell's `data-value` and its text (up to the first nested element).
fn cell(row: &str, field: &str) -> (String, String) {
    let start = row
        .find(&format!("data-field=\"{field}\""))
        .unwrap_or_else(|| panic!("no {field} cell in {row}"));
    let rest = &row[start..];
    let value = attribute(rest, "data-value");
    let text_start = rest.find('>').map_or(rest.len(), |i| i + 1);
    let text = &rest[text_start..];
    let text = &text[..text.find('<').unwrap_or(text.len())];
    (value, text.to_owned())
}

/// The value of the first `name="..."` attribute in `tag`.
fn attribute(tag: &str, name: &str) -> String {
    let key = format!("{name}=\"");
    let start = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {tag}"))
        + key.len();
    let rest = &tag[start..];
    rest[..rest.find('"').unwrap_or(rest.len())].to_owned()
}

/// (data-state, text) of a component's indicator.
fn component(dom: &str, name: &str) -> (String, String) {
    let start = dom
        .find(&format!("id=\"c-{name}\""))
        .unwrap_or_else(|| panic!("no {name} indicator"));
    let tag_start = dom[..start].rfind('<').unwrap_or(0);
    let element = &dom[tag_start..];
    let state = attribute(element, "data-state");
    let text_start = element.find('>').map_or(0, |i| i + 1);
    let text = &element[text_start..];
    (state, text[..text.find('<').unwrap_or(0)].to_owned())
}

fn text_of_id(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id}"));
    let rest = &dom[start..];
    let rest = &rest[rest.find('>').map_or(0, |i| i + 1)..];
    rest[..rest.find('<').unwrap_or(rest.len())].to_owned()
}

fn en_us(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP and metrics

/// GET `path`: (status, headers lower-cased, body). `None` if nothing answers.
async fn http_get(port: u16, path: &str) -> Option<(u16, HashMap<String, String>, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((status, headers, body.to_owned()))
}

/// The value of the sample of `name` whose labels include `labels`.
fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = series.split_once('{').unwrap_or((series, "}"));
            let label_text = label_text.strip_suffix('}')?;
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            matches.then(|| value.parse().ok())?
        })
}

async fn scrape(port: u16) -> String {
    match http_get(port, "/metrics").await {
        Some((200, _, body)) => body,
        other => panic!("/metrics: {other:?}"),
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Broker

struct Broker {
    conn: Connection,
    ch: Channel,
    queues: Vec<String>,
}

impl Broker {
    async fn connect() -> Broker {
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

    /// A durable queue that also expires 10 minutes after its last use, should the clean-up
    /// never run (a killed test process).
    async fn queue(&mut self, name: &str, mut args: FieldTable) {
        args.insert("x-expires".into(), AMQPValue::LongUInt(600_000));
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

    async fn publish(&self, queue: &str, messages: &[(Vec<u8>, BasicProperties)]) {
        let mut confirms = Vec::new();
        for (body, props) in messages {
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

    async fn cleanup(&self) {
        for q in &self.queues {
            let _ = self
                .ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self.conn.close(200, "".into()).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

/// Unique ids, duplicates and messages without a key through a real dedupd; the page must show
/// the same numbers as `/metrics`, all components up, and the sampled store keys.
#[tokio::test]
async fn status_page_shows_what_metrics_says_for_a_real_route() {
    let Some(browser) = chromium() else { return };
    let redis = OwnRedis::start().await;
    let name = format!("t-status-{:08x}", rand::random::<u32>());
    let (input, output, dlq) = (
        format!("{name}.in"),
        format!("{name}.out"),
        format!("{name}.in.dlq"),
    );
    let mut broker = Broker::connect().await;
    broker.queue(&dlq, FieldTable::default()).await;
    broker
        .queue(&input, dedupd::amqp::dead_letter_to(&dlq))
        .await;
    broker.queue(&output, FieldTable::default()).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let port = listener.local_addr().expect("address").port();
    let toml = format!(
        r#"
[upstream]
url = "{AMQP_URL}"
prefetch = 200

[store]
kind = "redis"
url = "{redis_url}"
key_prefix = "{name}"

[tuning]
shutdown_grace = "5s"
backoff_max = "500ms"

[routes.{name}]
queue = "{input}"
exchange = ""
routing_key = "{output}"
window = "1h"
"#,
        redis_url = redis.url()
    );
    let config = dedupd::config::Config::from_toml(&toml, Path::new("status.toml"))
        .unwrap_or_else(|e| panic!("test config: {e}"));
    let shutdown = CancellationToken::new();
    let proxy = tokio::spawn(dedupd::run_on(config, listener, shutdown.clone()));

    let body = std::panic::AssertUnwindSafe(async {
        // 40 distinct ids, 15 more copies of some of them, 3 messages without an id.
        let mut messages: Vec<(Vec<u8>, BasicProperties)> = (0..55)
            .map(|i| {
                let id = format!("order-{}", i % 40);
                (
                    format!("body {id}").into_bytes(),
                    BasicProperties::default().with_message_id(id.as_str().into()),
                )
            })
            .collect();
        messages.extend((0..3).map(|_| (b"no id".to_vec(), BasicProperties::default())));
        broker.publish(&input, &messages).await;

        let route = name.as_str();
        let settled = wait_for("all 58 messages settled", SETTLE, || async move {
            let m = scrape(port).await;
            let done = metric(&m, CONSUMED, &[("route", route)]) == Some(58.0)
                && metric(&m, FORWARDED, &[("route", route)]) == Some(40.0)
                && metric(&m, INFLIGHT, &[("route", route)]) == Some(0.0);
            done.then_some(m)
        })
        .await;
        assert_eq!(
            metric(&settled, DUPLICATES, &[("route", route)]),
            Some(15.0)
        );
        // The sampler runs at start and every 15 s: wait for the sample after the commits.
        wait_for("the store keys gauge to reach 40", SETTLE, || async move {
            let m = scrape(port).await;
            (metric(&m, STORE_KEYS, &[("route", route)]) == Some(40.0)).then_some(())
        })
        .await;

        let (status, headers, page) = http_get(port, "/").await.expect("GET /");
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "text/html; charset=utf-8");
        assert!(headers["content-security-policy"].contains("default-src 'none'"));
        assert!(page.contains("<title>dedupd status</title>"));

        let url = format!("http://127.0.0.1:{port}/");
        let dom = rendered(&browser, &url).await;
        // Nothing moves any more, so the page and a scrape now agree exactly.
        let m = scrape(port).await;
        let value = |name: &str, labels: &[(&str, &str)]| {
            metric(&m, name, labels).unwrap_or_else(|| panic!("{name} {labels:?} in /metrics"))
        };
        let r = row(&dom, route);
        for (field, name) in [
            ("consumed", CONSUMED),
            ("forwarded", FORWARDED),
            ("duplicates", DUPLICATES),
            ("takeovers", TAKEOVERS),
            ("conflicts", "dedupd_conflicts_total"),
            ("inflight", INFLIGHT),
            ("store_keys", STORE_KEYS),
        ] {
            let expected = value(name, &[("route", route)]);
            let (shown, text) = cell(r, field);
            assert_eq!(shown.parse::<f64>().ok(), Some(expected), "{field}: {r}");
            assert_eq!(text, en_us(expected as u64), "{field} as shown: {r}");
        }
        assert_eq!(cell(r, "forwarded").0, "40");
        assert_eq!(cell(r, "duplicates").0, "15");
        let missing = value(REJECTED, &[("route", route), ("reason", "missing_key")]);
        assert_eq!(missing, 3.0);
        assert_eq!(cell(r, "rejected").0, "3");
        assert_eq!(
            attribute(
                &r[r.find("data-field=\"rejected\"").unwrap_or(0)..],
                "data-reason_missing_key"
            ),
            "3"
        );
        assert!(r.contains("missing_key 3"), "rejections by reason: {r}");
        // Two samples with no traffic between them: every rate is there, and zero.
        for field in ["consumed_rate", "forwarded_rate", "duplicates_rate"] {
            assert_eq!(cell(r, field), ("0".into(), "0.0/s".into()), "{field}");
        }
        assert_eq!(cell(r, "duplicate_ratio").1, "25.9%", "15 of 58 consumed");
        assert_eq!(
            cell(r, "duplicate_ratio_recent").1,
            "–",
            "nothing consumed lately"
        );
        for c in ["upstream", "downstream", "store"] {
            assert_eq!(value(UP, &[("component", c)]), 1.0);
            assert_eq!(component(&dom, c), ("up".into(), "up".into()), "{c}");
        }
        let memory = value(STORE_MEMORY, &[]);
        assert!(memory > 0.0);
        let size = text_of_id(&dom, "store-size");
        assert!(
            size.starts_with("40 keys (sampled) · "),
            "store size: {size}"
        );
        assert_eq!(
            text_of_id(&dom, "version"),
            env!("CARGO_PKG_VERSION"),
            "version from dedupd_build_info"
        );

        if std::env::var_os("DEDUPD_SCREENSHOT").is_some() {
            screenshot(&browser, port, &broker, &input).await;
        }
    })
    .catch_unwind()
    .await;

    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(20), proxy).await;
    broker.cleanup().await;
    drop(redis);
    if let Err(panic) = body {
        std::panic::resume_unwind(panic);
    }
    stopped
        .expect("dedupd stops within its grace period")
        .expect("run task")
        .expect("run");
}

/// Writes `docs/status.png` while messages flow (about 40 a second, a quarter of them
/// duplicates), so the rates are not all zero.
///
/// The browser runs on virtual time (a screenshot is taken at the load event otherwise, before
/// the first refresh), which stands still while a request is pending and jumps over idle time.
/// So the page is reached through a relay that holds each request for [`SCREENSHOT_DELAY`]:
/// between two samples, as much real time passes as the page believes (its 2 s timer takes no
/// real time), and the rates shown are the real ones.
async fn screenshot(browser: &Path, port: u16, broker: &Broker, input: &str) {
    let stop = CancellationToken::new();
    let traffic = {
        let stop = stop.clone();
        let ch = broker.ch.clone();
        let input = input.to_owned();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            let mut n = 0u64;
            while !stop.is_cancelled() {
                tick.tick().await;
                n += 1;
                // Every fourth message repeats the one before it.
                let id = format!("live-{}", if n.is_multiple_of(4) { n - 1 } else { n });
                let _ = ch
                    .basic_publish(
                        "".into(),
                        input.as_str().into(),
                        BasicPublishOptions::default(),
                        id.as_bytes(),
                        BasicProperties::default().with_message_id(id.as_str().into()),
                    )
                    .await;
            }
        })
    };
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let relay_port = relay.local_addr().expect("relay address").port();
    let relaying = tokio::spawn(async move {
        while let Ok((client, _)) = relay.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = client_rx.read(&mut buf).await {
                    tokio::time::sleep(SCREENSHOT_DELAY).await;
                    if server_tx.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status.png");
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).expect("docs/");
    run_chromium(
        browser,
        &format!("http://127.0.0.1:{relay_port}/"),
        &[
            format!("--screenshot={}", path.display()),
            "--window-size=1200,800".into(),
            "--hide-scrollbars".into(),
            "--virtual-time-budget=5000".into(),
        ],
    )
    .await;
    stop.cancel();
    relaying.abort();
    let _ = traffic.await;
    assert!(path.is_file(), "no screenshot at {}", path.display());
    println!("screenshot: {}", path.display());
}

/// How long the screenshot's relay holds each request (see [`screenshot`]).
const SCREENSHOT_DELAY: Duration = Duration::from_secs(2);

/// A `/metrics` that changes by known amounts at each fetch, served with the real page: the
/// page must compute rates from successive samples, ratios and rejections by reason, show a
/// component that is down as down and one never reported as "no data yet", and a store that was
/// never sampled as such.
#[tokio::test]
async fn status_page_computes_rates_and_shows_missing_and_down_states() {
    let Some(browser) = chromium() else { return };
    let fetches = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let server = {
        let fetches = fetches.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let fetches = fetches.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let (content_type, body) = if request.starts_with("GET /metrics") {
                        let k = fetches.fetch_add(1, Ordering::SeqCst);
                        ("text/plain", scripted_metrics(k))
                    } else {
                        ("text/html", dedupd::telemetry::status::page().to_owned())
                    };
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        })
    };

    let dom = rendered(&browser, &format!("http://127.0.0.1:{port}/")).await;
    server.abort();
    assert!(
        fetches.load(Ordering::SeqCst) >= 2,
        "the page refreshed: {} fetches",
        fetches.load(Ordering::SeqCst)
    );

    let busy = row(&dom, "busy");
    // +200 consumed, +150 forwarded, +50 duplicates per fetch, 2 s apart (virtual time).
    for (field, per_second) in [
        ("consumed_rate", 100.0),
        ("forwarded_rate", 75.0),
        ("duplicates_rate", 25.0),
    ] {
        let (value, text) = cell(busy, field);
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("{field} has no rate: {busy}"));
        assert!(
            (value - per_second).abs() <= per_second * 0.05,
            "{field}: {value} ({text}), expected about {per_second}"
        );
        assert!(text.ends_with("/s"), "{text}");
    }
    assert_eq!(cell(busy, "duplicate_ratio_recent").1, "25.0%");
    let consumed: f64 = cell(busy, "consumed").0.parse().expect("consumed");
    let duplicates: f64 = cell(busy, "duplicates").0.parse().expect("duplicates");
    assert_eq!(
        cell(busy, "duplicate_ratio").1,
        format!("{:.1}%", 100.0 * duplicates / consumed)
    );
    assert_eq!(
        cell(busy, "rejected").0,
        "7",
        "missing_key 4 + unroutable 3"
    );
    assert!(busy.contains("missing_key 4, unroutable 3"), "{busy}");
    assert!(
        !busy.contains("user_id_stripped"),
        "not a rejection: {busy}"
    );
    assert_eq!(cell(busy, "takeovers").0, "2");
    assert_eq!(cell(busy, "conflicts").0, "5");
    assert_eq!(cell(busy, "store_errors").0, "1");
    assert_eq!(cell(busy, "inflight").1, "1,234");
    assert_eq!(cell(busy, "store_keys").1, "not sampled yet");

    let idle = row(&dom, "idle");
    assert_eq!(cell(idle, "consumed_rate").1, "0.0/s");
    assert_eq!(cell(idle, "duplicate_ratio").1, "–", "nothing consumed yet");
    assert_eq!(cell(idle, "rejected").1, "0");

    assert_eq!(component(&dom, "upstream"), ("up".into(), "up".into()));
    assert_eq!(
        component(&dom, "downstream"),
        ("down".into(), "down".into())
    );
    assert_eq!(
        component(&dom, "store"),
        ("unknown".into(), "no data yet".into())
    );
    assert_eq!(text_of_id(&dom, "store-size"), "size not sampled yet");
    assert_eq!(text_of_id(&dom, "version"), "unknown");
}

/// The `k`-th scrape of the scripted `/metrics`.
fn scripted_metrics(k: u64) -> String {
    let (consumed, forwarded, duplicates) = (1000 + 200 * k, 800 + 150 * k, 200 + 50 * k);
    format!(
        "# TYPE {CONSUMED} counter\n\
         {CONSUMED}{{route=\"busy\"}} {consumed}\n\
         {CONSUMED}{{route=\"idle\"}} 0\n\
         {FORWARDED}{{route=\"busy\"}} {forwarded}\n\
         {FORWARDED}{{route=\"idle\"}} 0\n\
         {DUPLICATES}{{route=\"busy\"}} {duplicates}\n\
         {DUPLICATES}{{route=\"idle\"}} 0\n\
         {REJECTED}{{route=\"busy\",reason=\"missing_key\"}} 4\n\
         {REJECTED}{{route=\"busy\",reason=\"unroutable\"}} 3\n\
         {REJECTED}{{route=\"busy\",reason=\"user_id_stripped\"}} 9\n\
         {TAKEOVERS}{{route=\"busy\"}} 2\n\
         dedupd_conflicts_total{{route=\"busy\"}} 5\n\
         {store_errors}{{route=\"busy\"}} 1\n\
         {INFLIGHT}{{route=\"busy\"}} 1234\n\
         {INFLIGHT}{{route=\"idle\"}} 0\n\
         {UP}{{component=\"upstream\"}} 1\n\
         {UP}{{component=\"downstream\"}} 0\n\
         {histogram}_bucket{{route=\"busy\",le=\"+Inf\"}} {forwarded}\n",
        store_errors = dedupd::telemetry::STORE_ERRORS,
        histogram = dedupd::telemetry::FORWARD_DURATION,
    )
}
