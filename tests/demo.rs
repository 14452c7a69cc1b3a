//! `dedupd demo` as a new user runs it: the built binary, from a directory without a config
//! file, against the local RabbitMQ (127.0.0.1:5672, guest/guest) and Redis (127.0.0.1:6379).
//! Each run names its queues and keys after a random tag it prints; the tests read the tag
//! from the output and check that nothing under it is left on the broker or in Redis.
//! Self-contained on purpose: it shares no harness with the other suites.

use std::collections::HashMap;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// Generous: a debug build on a shared 2-core machine; a healthy run of 500 takes a second.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// `dedupd ARGS` from an empty directory (the demo needs no `proxy.toml`), stdout not a
/// terminal (so no bar), within [`RUN_TIMEOUT`].
async fn demo(args: &[&str]) -> Output {
    let dir = std::env::temp_dir();
    let child = Command::new(env!("CARGO_BIN_EXE_dedupd"))
        .arg("demo")
        .args(args)
        .current_dir(&dir)
        .env_remove("DEDUPD_CONFIG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(RUN_TIMEOUT, child)
        .await
        .unwrap_or_else(|_| panic!("dedupd demo {args:?} did not finish within {RUN_TIMEOUT:?}"))
        .expect("the dedupd binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The run's tag: what follows `dedupd-demo-` in its first queue name.
fn tag(stdout: &str) -> String {
    let start = stdout
        .find("dedupd-demo-")
        .unwrap_or_else(|| panic!("no dedupd-demo- name in the output:\n{stdout}"));
    let tag: String = stdout[start + "dedupd-demo-".len()..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    assert_eq!(tag.len(), 8, "a tag of 8 hex digits in:\n{stdout}");
    format!("dedupd-demo-{tag}")
}

/// The summary's `label: number` lines.
fn summary(stdout: &str) -> HashMap<String, u64> {
    let after = stdout
        .split_once("\nSummary")
        .unwrap_or_else(|| panic!("no summary in:\n{stdout}"))
        .1;
    after
        .lines()
        .filter_map(|line| {
            let (label, rest) = line.trim().split_once(':')?;
            let number = rest.split_whitespace().next()?.parse().ok()?;
            Some((label.to_owned(), number))
        })
        .collect()
}

/// The number of Redis keys the clean-up line says it deleted.
fn redis_keys_deleted(stdout: &str) -> u64 {
    stdout
        .lines()
        .find(|l| l.starts_with("Cleaned up:"))
        .and_then(|l| {
            l.rsplit_once('(')?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no Redis key count in:\n{stdout}"))
}

/// The number of remembered keys the clean-up line says it deleted.
fn keys_deleted(stdout: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("Cleaned up:"))
        .unwrap_or_else(|| panic!("no clean-up line in:\n{stdout}"));
    line.split(" and ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no key count in {line:?}"))
}

/// Queues on the broker whose name starts with `base`, per `rabbitmqctl list_queues name`.
async fn queues_named(base: &str) -> Vec<String> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name"])
        .output()
        .await
        .expect("rabbitmqctl runs (the tests need the local RabbitMQ: ./scripts/services.sh)");
    assert!(
        out.status.success(),
        "rabbitmqctl list_queues failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|name| name.starts_with(base))
        .map(str::to_owned)
        .collect()
}

/// Redis keys under `base`, per `KEYS base*`.
async fn redis_keys(base: &str) -> Vec<String> {
    let client = redis::Client::open(REDIS_URL).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis on 127.0.0.1:6379 (./scripts/services.sh)");
    redis::cmd("KEYS")
        .arg(format!("{base}*"))
        .query_async(&mut conn)
        .await
        .expect("KEYS")
}

/// Exit 0, numbers that agree with each other and with what was asked, nothing left behind.
async fn assert_consistent_run(args: &[&str], published: u64, distinct: u64, redis: bool) {
    let out = demo(args).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status.code()
    );
    let base = tag(&stdout);
    let s = summary(&stdout);
    let get = |label: &str| {
        *s.get(label)
            .unwrap_or_else(|| panic!("no {label:?} in the summary:\n{stdout}"))
    };
    assert_eq!(get("published"), published, "{stdout}");
    assert_eq!(get("distinct"), distinct, "{stdout}");
    assert_eq!(get("forwarded"), get("distinct"), "{stdout}");
    assert_eq!(
        get("dropped"),
        get("published") - get("distinct"),
        "{stdout}"
    );
    assert_eq!(get("arrived"), get("forwarded"), "{stdout}");
    assert_eq!(get("rejected"), 0, "{stdout}");
    assert_eq!(get("dead-lettered"), 0, "{stdout}");
    assert!(
        !stdout.contains('\u{1b}'),
        "no bar or colours when stdout is not a terminal:\n{stdout}"
    );
    // With Redis the demo must have written one key per distinct id under its prefix (so the
    // check below looks in the right place) and deleted them; the memory store writes none.
    let expected_keys = if redis { distinct } else { 0 };
    assert_eq!(keys_deleted(&stdout), expected_keys, "{stdout}");
    assert_eq!(
        queues_named(&base).await,
        Vec::<String>::new(),
        "queues left behind"
    );
    assert_eq!(
        redis_keys(&base).await,
        Vec::<String>::new(),
        "Redis keys left behind"
    );
}

#[tokio::test]
async fn demo_with_redis_forwards_each_id_once_and_cleans_up() {
    assert_consistent_run(
        &["--messages", "500", "--duplicates", "0.3"],
        500,
        350,
        true,
    )
    .await;
}

#[tokio::test]
async fn demo_with_the_memory_store_forwards_each_id_once_and_cleans_up() {
    assert_consistent_run(
        &["--memory", "--messages", "500", "--duplicates", "0.3"],
        500,
        350,
        false,
    )
    .await;
}

/// A port nobody listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test]
async fn demo_without_a_broker_says_how_to_start_one() {
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
    let out = demo(&["--amqp", &url]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach the broker"), "{stderr}");
    assert!(stderr.contains("./scripts/run-local.sh"), "{stderr}");
    assert!(!stderr.contains("guest:guest"), "password shown: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn demo_without_redis_says_how_to_start_it() {
    let url = format!("redis://127.0.0.1:{}/0", closed_port());
    let out = demo(&["--redis", &url]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach Redis"), "{stderr}");
    assert!(stderr.contains("./scripts/run-local.sh"), "{stderr}");
    assert!(stderr.contains("--memory"), "{stderr}");
}

#[tokio::test]
async fn demo_refuses_a_duplicate_ratio_of_one() {
    let out = demo(&["--duplicates", "1"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// Ctrl-C mid-stream: the demo stops the proxy, deletes its queues and keys, exits 1.
#[tokio::test]
async fn demo_cleans_up_on_ctrl_c() {
    // Far more than can pass before the signal: it lands mid-stream.
    let mut child = Command::new(env!("CARGO_BIN_EXE_dedupd"))
        .args(["demo", "--messages", "1000000"])
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the dedupd binary runs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    // The banner names the queues; the metrics line comes once the proxy runs.
    let banner = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("/metrics") {
                return;
            }
        }
        panic!("the demo ended before starting the proxy:\n{seen}");
    };
    tokio::time::timeout(RUN_TIMEOUT, banner)
        .await
        .expect("the demo starts the proxy");
    let base = tag(&seen);
    // Mid-stream: the proxy has claimed keys in Redis.
    let deadline = tokio::time::Instant::now() + RUN_TIMEOUT;
    while redis_keys(&base).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no key under {base} within {RUN_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.id().expect("running").to_string();
    let kill = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(kill.success());
    let rest = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            seen.push_str(&line);
            seen.push('\n');
        }
        child.wait().await.expect("wait")
    };
    let status = tokio::time::timeout(RUN_TIMEOUT, rest)
        .await
        .expect("the demo exits after Ctrl-C");
    assert_eq!(status.code(), Some(1), "{seen}");
    assert!(seen.contains("interrupted"), "{seen}");
    assert!(redis_keys_deleted(&seen) > 0, "{seen}");
    assert_eq!(
        queues_named(&base).await,
        Vec::<String>::new(),
        "queues left behind"
    );
    assert_eq!(
        redis_keys(&base).await,
        Vec::<String>::new(),
        "Redis keys left behind"
    );
}
