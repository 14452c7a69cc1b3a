//! The embedded store end to end, with the built binary as a child process on the real
//! broker and a store directory of its own under the temp dir: duplicates dropped, memory kept
//! across a restart and across SIGKILLs, a second process on the same path refused. Plus the
//! `#[ignore]`d measurement of the disk a remembered key costs.
//!
//! Every test ends with a tally of what arrived downstream and what was left upstream: lost = 0
//! and left = 0 always; duplicates = 0 except where SIGKILL cuts confirms off, where they stay
//! within what was in flight (prefetch × kills, the bound `tests/faults.rs` uses). The tests run
//! one at a time: the SIGKILL test must land its kills mid-stream on a shared 2-core machine.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use lapin::BasicProperties;
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());
const LONG: Duration = Duration::from_secs(60);
/// `upstream.prefetch` of `Setup::toml`: what one process can have in flight.
const PREFETCH: usize = 200;

/// A route on the embedded store in a directory of its own; its config written for the binary.
struct Embedded {
    setup: Setup,
    dir: PathBuf,
    config: String,
}

impl Embedded {
    fn new(test: &str) -> Embedded {
        let mut setup = Setup::new(test);
        setup.store_kind = "embedded";
        let dir = std::env::temp_dir().join(format!("{}-store", setup.name));
        let toml = setup.toml().replace(
            "[store]\n",
            &format!("[store]\npath = {:?}\n", dir.display().to_string()),
        );
        let config = std::env::temp_dir().join(format!("{}.toml", setup.name));
        std::fs::write(&config, toml).expect("config");
        Embedded {
            setup,
            dir,
            config: config.to_str().expect("utf-8 path").to_owned(),
        }
    }

    fn args(&self) -> [&str; 3] {
        ["run", "-c", &self.config]
    }

    async fn start(&self) -> Child {
        Child::start(&self.args()).await
    }

    /// Removes the store's directory and the config file.
    fn cleanup(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.config);
    }
}

/// `n` messages whose ids (`{tag}-{i}`) repeat an earlier one with probability `dup_ratio`;
/// returns them and the distinct ids.
fn workload(
    tag: &str,
    n: usize,
    dup_ratio: f64,
) -> (Vec<(Vec<u8>, BasicProperties)>, HashSet<String>) {
    let mut ids: Vec<String> = Vec::with_capacity(n);
    for i in 0..n {
        let id = if i > 0 && rand::random::<f64>() < dup_ratio {
            ids[rand::random_range(0..ids.len())].clone()
        } else {
            format!("{tag}-{i}")
        };
        ids.push(id);
    }
    let unique = ids.iter().cloned().collect();
    (copies(tag, &ids), unique)
}

/// One message per id, in order.
fn copies<'a>(
    tag: &str,
    ids: impl IntoIterator<Item = &'a String>,
) -> Vec<(Vec<u8>, BasicProperties)> {
    ids.into_iter()
        .enumerate()
        .map(|(i, id)| {
            (
                format!("{tag} body {i}").into_bytes(),
                BasicProperties::default()
                    .with_message_id(id.as_str().into())
                    .with_delivery_mode(2),
            )
        })
        .collect()
}

/// How many copies of each id the destination holds (drained).
async fn drain_counts(broker: &Broker, queue: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for d in broker.drain(queue).await {
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        *counts.entry(id).or_default() += 1;
    }
    counts
}

/// Waits until the upstream queue is empty and the proxy on `port` consumed at least
/// `consumed` and has nothing in flight.
async fn wait_drained(broker: &Broker, setup: &Setup, port: u16, consumed: f64) {
    wait_for("upstream drained and nothing in flight", LONG, || async {
        let inflight = setup.metric(port, "dedupd_inflight_messages").await;
        let done = setup.metric(port, "dedupd_messages_consumed_total").await;
        (broker.ready(&setup.queue).await == 0 && done >= consumed && inflight == 0.0).then_some(())
    })
    .await
}

/// Waits until the destination holds at least `n` messages.
async fn wait_downstream(broker: &Broker, queue: &str, n: u32) {
    wait_for(&format!("{n} messages in {queue}"), LONG, || async {
        (broker.ready(queue).await >= n).then_some(())
    })
    .await
}

/// Nothing left upstream or dead-lettered.
async fn assert_nothing_left(broker: &Broker, setup: &Setup) {
    assert_eq!(broker.ready(&setup.queue).await, 0, "left upstream");
    let dlq = format!("{}.dlq", setup.queue);
    assert_eq!(broker.ready(&dlq).await, 0, "dead-lettered");
}

/// 3,000 messages, 30% of them copies of earlier ones: exactly the distinct ones arrive, once
/// each, and the store is written once per batch, not once per message.
#[tokio::test]
async fn three_thousand_messages_with_30_percent_duplicates() {
    let _serial = SERIAL.lock().await;
    let e = Embedded::new("emb-dups");
    let mut broker = Broker::connect().await;
    e.setup.declare(&mut broker).await;
    let (messages, unique) = workload("a", 3_000, 0.3);
    broker.publish_all(&e.setup.queue, &messages).await;

    let proxy = e.start().await;
    wait_drained(&broker, &e.setup, proxy.port, messages.len() as f64).await;
    let forwarded = e
        .setup
        .metric(proxy.port, "dedupd_messages_forwarded_total")
        .await;
    let dropped = e.setup.metric(proxy.port, "dedupd_duplicates_total").await;
    let writes = metric(proxy.port, "dedupd_store_commands_total", &[]).await;
    proxy.stop().await;

    let counts = drain_counts(&broker, &e.setup.out).await;
    let got: HashSet<String> = counts.keys().cloned().collect();
    let twice = counts.values().filter(|&&c| c > 1).count();
    let per_message = writes / messages.len() as f64;
    println!(
        "EMBEDDED-FIGURES 3000 messages, {} distinct: forwarded={forwarded} dropped={dropped} \
         store write transactions={writes} ({per_message:.3} per message)",
        unique.len()
    );
    assert_eq!(got, unique, "every distinct id arrives");
    assert_eq!(twice, 0, "and once");
    assert_eq!(forwarded, unique.len() as f64);
    assert_eq!(dropped, (messages.len() - unique.len()) as f64);
    // One synced write per commit batch (at most 50 messages here), never one per message.
    assert!(writes > 0.0, "commits were written");
    assert!(
        per_message < 0.25,
        "{per_message} write transactions per message"
    );
    assert_nothing_left(&broker, &e.setup).await;
    broker.cleanup().await;
    e.cleanup();
}

/// Stopped (SIGTERM) and started again on the same path: a copy of every id forwarded before
/// is dropped.
#[tokio::test]
async fn restart_keeps_memory() {
    let _serial = SERIAL.lock().await;
    let e = Embedded::new("emb-restart");
    let mut broker = Broker::connect().await;
    e.setup.declare(&mut broker).await;
    let (messages, unique) = workload("r", 1_000, 0.0);
    broker.publish_all(&e.setup.queue, &messages).await;
    let proxy = e.start().await;
    wait_drained(&broker, &e.setup, proxy.port, messages.len() as f64).await;
    proxy.stop().await;

    let proxy = e.start().await;
    let again = copies("again", &unique);
    broker.publish_all(&e.setup.queue, &again).await;
    wait_drained(&broker, &e.setup, proxy.port, again.len() as f64).await;
    let forwarded = e
        .setup
        .metric(proxy.port, "dedupd_messages_forwarded_total")
        .await;
    let dropped = e.setup.metric(proxy.port, "dedupd_duplicates_total").await;
    proxy.stop().await;

    let counts = drain_counts(&broker, &e.setup.out).await;
    println!(
        "EMBEDDED-FIGURES restart: after the restart forwarded={forwarded} dropped={dropped} of {}",
        again.len()
    );
    assert_eq!(forwarded, 0.0, "nothing forwarded after the restart");
    assert_eq!(dropped, again.len() as f64, "every copy dropped");
    assert_eq!(counts.len(), unique.len());
    assert!(counts.values().all(|&c| c == 1), "each id arrived once");
    assert_nothing_left(&broker, &e.setup).await;
    broker.cleanup().await;
    e.cleanup();
}

/// SIGKILL three times mid-stream. Keys committed before the first kill are remembered after
/// every restart (copies of them, published after each restart, are all dropped); nothing is
/// lost or left upstream; duplicates stay within what was in flight at the kills.
#[tokio::test]
async fn sigkill_three_times_mid_stream() {
    let _serial = SERIAL.lock().await;
    // No lease to wait out after a kill: claims die with their process (see the store's docs).
    let e = Embedded::new("emb-sigkill");
    let mut broker = Broker::connect().await;
    e.setup.declare(&mut broker).await;

    // Committed before any kill: a first set, settled.
    let (early, early_ids) = workload("early", 300, 0.0);
    broker.publish_all(&e.setup.queue, &early).await;
    let mut proxy = e.start().await;
    wait_drained(&broker, &e.setup, proxy.port, early.len() as f64).await;

    let (messages, unique) = workload("k", 9_000, 0.3);
    broker.publish_all(&e.setup.queue, &messages).await;
    let early_copies = copies("early again", &early_ids);
    let base = early_ids.len() as u32;
    for kill in 1..=3u32 {
        wait_downstream(&broker, &e.setup.out, base + kill * unique.len() as u32 / 5).await;
        let left = broker.ready(&e.setup.queue).await;
        assert!(left > 0, "kill {kill}: the stream was already over");
        proxy.signal(9);
        let _ = proxy.child.wait().await;
        proxy = e.start().await;
        broker.publish_all(&e.setup.queue, &early_copies).await;
        println!("EMBEDDED-FIGURES sigkill {kill}: {left} messages were upstream");
    }
    let total = messages.len() + early.len() + 3 * early_copies.len();
    wait_for("upstream drained and nothing in flight", LONG, || async {
        let inflight = e.setup.metric(proxy.port, "dedupd_inflight_messages").await;
        let consumed = e
            .setup
            .metric(proxy.port, "dedupd_messages_consumed_total")
            .await;
        (broker.ready(&e.setup.queue).await == 0 && consumed > 0.0 && inflight == 0.0).then_some(())
    })
    .await;
    proxy.stop().await;

    let counts = drain_counts(&broker, &e.setup.out).await;
    let lost = unique
        .iter()
        .chain(&early_ids)
        .filter(|id| !counts.contains_key(*id))
        .count();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let early_twice = early_ids
        .iter()
        .filter(|id| counts.get(*id).copied().unwrap_or(0) > 1)
        .count();
    println!(
        "EMBEDDED-FIGURES sigkill x3: {total} published, forwarded={} lost={lost} \
         duplicates={duplicates} (bound {}), early keys forwarded twice={early_twice}",
        counts.values().sum::<usize>(),
        PREFETCH * 3
    );
    assert_eq!(lost, 0, "lost messages");
    assert_eq!(
        early_twice, 0,
        "a key committed before the kills was forgotten"
    );
    assert!(
        duplicates <= PREFETCH * 3,
        "{duplicates} duplicates, beyond what was in flight"
    );
    assert_nothing_left(&broker, &e.setup).await;
    broker.cleanup().await;
    e.cleanup();
}

/// SIGHUP: the routes restart and open the store again in the same process, which still holds
/// it (or is closing it): the reopen works, and what was remembered before still is.
#[tokio::test]
async fn reload_reopens_the_store_and_keeps_memory() {
    let _serial = SERIAL.lock().await;
    let e = Embedded::new("emb-reload");
    let mut broker = Broker::connect().await;
    e.setup.declare(&mut broker).await;
    let (messages, unique) = workload("h", 500, 0.0);
    broker.publish_all(&e.setup.queue, &messages).await;
    let mut proxy = e.start().await;
    wait_drained(&broker, &e.setup, proxy.port, messages.len() as f64).await;

    proxy.signal(1);
    proxy
        .wait_line("configuration reloaded", LONG)
        .await
        .unwrap_or_else(|err| panic!("{err:#}"));
    wait_for("the reloaded routes running", LONG, || async {
        let starts = proxy
            .lines()
            .iter()
            .filter(|l| l.contains("dedupd starting"))
            .count();
        let port = proxy.latest_port()?;
        (starts == 2 && status(port, "/readyz").await == Some(200)).then_some(())
    })
    .await;
    proxy.check_alive().unwrap_or_else(|err| panic!("{err:#}"));

    let mut after = copies("h again", &unique);
    let (fresh, fresh_ids) = workload("fresh", 200, 0.0);
    after.extend(fresh);
    broker.publish_all(&e.setup.queue, &after).await;
    let expected = (unique.len() + fresh_ids.len()) as u32;
    wait_downstream(&broker, &e.setup.out, expected).await;
    wait_for("upstream drained", LONG, || async {
        (broker.ready(&e.setup.queue).await == 0).then_some(())
    })
    .await;
    proxy.stop().await;

    let counts = drain_counts(&broker, &e.setup.out).await;
    let all: HashSet<String> = unique.union(&fresh_ids).cloned().collect();
    let got: HashSet<String> = counts.keys().cloned().collect();
    assert_eq!(got, all, "every id arrived");
    assert!(
        counts.values().all(|&c| c == 1),
        "an id remembered before the reload was forwarded again"
    );
    assert_nothing_left(&broker, &e.setup).await;
    broker.cleanup().await;
    e.cleanup();
}

/// A second `dedupd run` on the same path exits 1 at start, naming the path, while the first
/// keeps forwarding; so does `dedupd inspect`. Once the first has stopped, the path is free.
#[tokio::test]
async fn second_process_on_the_same_path_is_refused() {
    let _serial = SERIAL.lock().await;
    let e = Embedded::new("emb-second");
    let mut broker = Broker::connect().await;
    e.setup.declare(&mut broker).await;
    let first = e.start().await;
    wait_for("the first instance ready", LONG, || async {
        (status(first.port, "/readyz").await == Some(200)).then_some(())
    })
    .await;

    let dir = e.dir.display().to_string();
    let second = tokio::time::timeout(LONG, run_binary(&e.args(), &[]))
        .await
        .expect("the second instance exits by itself");
    let (code, _, stderr) = second;
    println!("EMBEDDED-FIGURES second process: exit {code}, stderr: {stderr}");
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&dir), "the path is named: {stderr}");
    assert!(stderr.contains("in use by another process"), "{stderr}");

    let inspect = ["inspect", "-c", &e.config, &e.setup.name, "id-0"];
    let (code, _, stderr) = run_binary(&inspect, &[]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&dir), "{stderr}");

    // The first one still works.
    let (messages, _) = workload("s", 100, 0.0);
    broker.publish_all(&e.setup.queue, &messages).await;
    let got = broker.receive(&e.setup.out, messages.len(), LONG).await;
    assert_eq!(got.len(), messages.len());
    wait_drained(&broker, &e.setup, first.port, messages.len() as f64).await;
    first.stop().await;

    let inspect = ["inspect", "-c", &e.config, &e.setup.name, "s-0"];
    let (code, stdout, stderr) = run_binary(&inspect, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("done"), "{stdout}");
    assert_nothing_left(&broker, &e.setup).await;
    broker.cleanup().await;
    e.cleanup();
}

/// Disk per remembered key: the store directory's growth (blocks allocated, as
/// `dedupd_store_memory_bytes` reports it) between 20,000 and 120,000 keys committed in
/// batches of 200, divided by the 100,000 keys. `cargo test --release --test embedded --
/// --ignored --nocapture measure_`.
#[tokio::test]
#[ignore = "a measurement: run it with --ignored --nocapture"]
async fn measure_embedded_store_bytes_per_remembered_key() {
    use dedupd::config::{StoreConfig, StoreKind};
    use dedupd::store::{BodyDigest, Owner, Store};

    let dir = std::env::temp_dir().join(unique("emb-measure"));
    let cfg = StoreConfig {
        kind: StoreKind::Embedded,
        path: Some(dir.clone()),
        key_prefix: "dd".to_owned(),
        ..StoreConfig::default()
    };
    let store = Store::open(&cfg).await.expect("open");
    let owner = Owner::new("measure".into(), 1);
    let routes = ["r".to_owned()];
    let mut measured = Vec::new();
    let mut written = 0usize;
    for target in [20_000usize, 120_000] {
        while written < target {
            let keys: Vec<String> = (written..written + 200)
                .map(|i| format!("dd:r:id-{i}"))
                .collect();
            // Each key with its body digest, as a route keyed on anything but the body.
            let bodies: Vec<Option<BodyDigest>> = keys
                .iter()
                .map(|k| Some(BodyDigest::of(k.as_bytes())))
                .collect();
            store
                .claim(&keys, &bodies, &owner, Duration::from_secs(30), None)
                .await
                .expect("claim");
            store
                .commit(&keys, &bodies, &owner, Duration::from_secs(3600))
                .await
                .expect("commit");
            written += keys.len();
        }
        let size = store.size("dd", &routes).await.expect("size");
        assert_eq!(size.keys, [target as u64]);
        measured.push(size.memory_bytes);
        println!(
            "EMBEDDED-FIGURES {target} keys: {} bytes on disk ({:.1} per key), file {} bytes",
            size.memory_bytes,
            size.memory_bytes as f64 / target as f64,
            file_len(&dir)
        );
    }
    let per_key = (measured[1] - measured[0]) as f64 / 100_000.0;
    println!("EMBEDDED-FIGURES growth 20k -> 120k keys: {per_key:.1} bytes per remembered key");
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    // 28 bytes of entry in B-tree leaves: anything far past that is a layout mistake.
    assert!((20.0..120.0).contains(&per_key), "{per_key} bytes per key");
}

fn file_len(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A full disk: commits fail (and are counted as store errors by the caller, which retries),
/// and once there is room again the store works without a restart (redb needs its file opened
/// again after an I/O error; the store does that itself). Needs a small filesystem of its own:
/// `DEDUPD_TEST_SMALL_FS=/mnt/small` (e.g. `mount -t tmpfs -o size=4m tmpfs /mnt/small`).
#[tokio::test]
#[ignore = "needs a small filesystem: set DEDUPD_TEST_SMALL_FS"]
async fn full_disk_fails_commits_then_recovers() {
    use dedupd::config::{StoreConfig, StoreKind};
    use dedupd::store::{ClaimOutcome, CommitOutcome, Owner, Store};

    let Ok(fs) = std::env::var("DEDUPD_TEST_SMALL_FS") else {
        panic!("set DEDUPD_TEST_SMALL_FS to a small filesystem's mount point");
    };
    let dir = Path::new(&fs).join(unique("emb-full"));
    let filler = Path::new(&fs).join(unique("filler"));
    let cfg = StoreConfig {
        kind: StoreKind::Embedded,
        path: Some(dir.clone()),
        key_prefix: "dd".to_owned(),
        ..StoreConfig::default()
    };
    let store = Store::open(&cfg).await.expect("open");
    let owner = Owner::new("full".into(), 1);
    let (lease, window) = (Duration::from_secs(30), Duration::from_secs(3600));
    let first: Vec<String> = (0..200).map(|i| format!("dd:r:first-{i}")).collect();
    store
        .claim(&first, &[], &owner, lease, None)
        .await
        .expect("claim");
    store
        .commit(&first, &[], &owner, window)
        .await
        .expect("commit");

    // Fill the filesystem, then commit until a commit fails.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let mut failed = None;
    for batch in 0..2_000 {
        let keys: Vec<String> = (0..200).map(|i| format!("dd:r:fill-{batch}-{i}")).collect();
        store
            .claim(&keys, &[], &owner, lease, None)
            .await
            .expect("claims need no disk space");
        if let Err(e) = store.commit(&keys, &[], &owner, window).await {
            failed = Some((keys, e));
            break;
        }
    }
    let (keys, error) = failed.expect("a commit failed on a full disk");
    println!("EMBEDDED-FIGURES full disk: {error}");
    assert!(
        store.commit(&keys, &[], &owner, window).await.is_err(),
        "still full"
    );

    std::fs::remove_file(&filler).expect("remove filler");
    let retried = store
        .commit(&keys, &[], &owner, window)
        .await
        .expect("commit after room");
    assert!(
        retried.iter().all(|o| *o == CommitOutcome::Committed),
        "{retried:?}"
    );
    let again = store
        .claim(&first, &[], &owner, lease, None)
        .await
        .expect("claim");
    assert!(again.iter().all(|o| *o == ClaimOutcome::Done));
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
