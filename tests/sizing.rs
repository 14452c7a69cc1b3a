//! Store sizing: `Store::size` and the sampler behind `dedupd_store_keys{route}` and
//! `dedupd_store_memory_bytes`, against a private Redis server (so the key counts are known) and
//! the memory store; that Redis keeps a remembered key in at most 32 bytes of `used_memory`, 40
//! with its body digest (growth from 20,000 to 120,000 keys); and, `#[ignore]`d, the
//! measurements at a million keys that the README's "Sizing the store" quotes:
//!
//!     cargo test --release --test sizing -- --ignored --nocapture --test-threads 1

mod own_redis;

use std::sync::Arc;
use std::time::Duration;

use dedupd::config::{Config, StoreConfig};
use dedupd::store::{BodyDigest, Owner, Store};
use dedupd::telemetry::{self, STORE_KEYS, STORE_MEMORY, STORE_SAMPLE_ERRORS};
use own_redis::OwnRedis;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// The `[store]` of a minimal valid configuration; `url` is TOML (a string, or a list for a
/// cluster).
fn store_config_toml(kind: &str, url: &str, prefix: &str) -> StoreConfig {
    let toml = format!(
        r#"
[upstream]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"

[store]
kind = "{kind}"
url = {url}
key_prefix = "{prefix}"
timeout = "2s"

[routes.r]
queue = "q"
exchange = ""
routing_key = "out"
"#
    );
    Config::from_toml(&toml, std::path::Path::new("sizing.toml"))
        .unwrap_or_else(|e| panic!("test config: {e}"))
        .store
}

fn store_config(kind: &str, url: &str, prefix: &str) -> StoreConfig {
    store_config_toml(kind, &format!("{url:?}"), prefix)
}

fn unique(what: &str) -> String {
    format!("{what}-{:08x}", rand::random::<u32>())
}

/// A random id spelled like a UUID: 36 characters, as most producers' message ids.
fn uuid() -> String {
    let n: u128 = rand::random();
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Claims and commits `n` new keys of `route` through the store API, as the pipeline does.
async fn remember(
    store: &Store,
    prefix: &str,
    route: &str,
    n: usize,
    window: Duration,
) -> Vec<String> {
    let mut all = Vec::with_capacity(n);
    remember_each(store, prefix, route, n, window, false, |keys| {
        all.extend(keys)
    })
    .await;
    all
}

/// [`remember`] without keeping the keys: a measurement must not count them in the RSS.
async fn remember_with(
    store: &Store,
    prefix: &str,
    route: &str,
    n: usize,
    window: Duration,
    bodies: bool,
) {
    remember_each(store, prefix, route, n, window, bodies, drop).await;
}

/// Remembers `n` new keys in batches of 500, each key with its body's digest when `bodies` (as
/// a route keyed on anything but the body does), handing each batch's keys to `each`.
async fn remember_each(
    store: &Store,
    prefix: &str,
    route: &str,
    n: usize,
    window: Duration,
    bodies: bool,
    mut each: impl FnMut(Vec<String>),
) {
    let owner = Owner::new(Arc::from("sizing-test"), 1);
    let mut left = n;
    while left > 0 {
        let batch = left.min(500);
        left -= batch;
        let keys: Vec<String> = (0..batch)
            .map(|_| dedupd::keys::store_key(prefix, route, uuid().as_bytes()))
            .collect();
        // Random digests, as real bodies give: none of them shortened by a listpack's
        // integer encoding.
        let digests: Vec<Option<BodyDigest>> = if bodies {
            keys.iter()
                .map(|k| Some(BodyDigest::of(k.as_bytes())))
                .collect()
        } else {
            Vec::new()
        };
        store
            .claim(&keys, &digests, &owner, Duration::from_secs(30), None)
            .await
            .expect("claim");
        store
            .commit(&keys, &digests, &owner, window)
            .await
            .expect("commit");
        each(keys);
    }
}

/// The value of the sample of `name` whose labels include `labels`, in Prometheus text.
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

#[tokio::test]
async fn redis_counts_each_routes_remembered_keys_exactly() {
    let redis = OwnRedis::start().await;
    let store = Store::open(&store_config("redis", &redis.url(), "dd"))
        .await
        .expect("store");
    let routes: Vec<String> = ["orders", "payments", "idle"].map(String::from).into();

    let empty = store
        .size("dd", &routes)
        .await
        .expect("size of an empty db");
    assert_eq!(empty.keys, vec![0, 0, 0]);

    remember(&store, "dd", "orders", 3000, DAY).await;
    let size = store.size("dd", &routes).await.expect("size");
    assert_eq!(size.keys, vec![3000, 0, 0]);
    assert!(size.memory_bytes > 0);

    // Another route, another deployment's keys under a prefix that starts alike, keys that are
    // not dedupd's at all, and claims in flight: none of them count for "orders".
    remember(&store, "dd", "payments", 1000, DAY).await;
    remember(&store, "dd2", "orders", 1000, DAY).await;
    let mut conn = redis.conn().await;
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.set(format!("session:{i}"), "x").ignore();
    }
    let () = pipe.query_async(&mut conn).await.expect("foreign keys");
    let owner = Owner::new(Arc::from("sizing-test"), 1);
    let flying: Vec<String> = (0..50)
        .map(|_| dedupd::keys::store_key("dd", "orders", uuid().as_bytes()))
        .collect();
    store
        .claim(&flying, &[], &owner, Duration::from_secs(30), None)
        .await
        .expect("claim");
    let size = store.size("dd", &routes).await.expect("size");
    assert_eq!(size.keys, vec![3000, 1000, 0]);
    // A remembered key forgotten by hand is no longer counted.
    let forgotten = dedupd::keys::store_key("dd", "payments", b"to-forget");
    store
        .claim(
            std::slice::from_ref(&forgotten),
            &[],
            &owner,
            Duration::from_secs(30),
            None,
        )
        .await
        .expect("claim");
    store
        .commit(std::slice::from_ref(&forgotten), &[], &owner, DAY)
        .await
        .expect("commit");
    assert!(store.forget(&forgotten).await.expect("forget"));
    assert_eq!(store.size("dd", &routes).await.expect("size").keys[1], 1000);
}

#[tokio::test]
async fn memory_store_counts_exactly_the_unexpired_keys_of_each_route() {
    let store = Store::open(&store_config("memory", "redis://127.0.0.1:1/0", "mm"))
        .await
        .expect("store");
    let routes: Vec<String> = ["orders", "payments", "idle"].map(String::from).into();
    let empty = store.size("mm", &routes).await.expect("size");
    assert_eq!(empty.keys, vec![0, 0, 0]);
    assert!(empty.exact);

    remember(&store, "mm", "orders", 1500, DAY).await;
    remember(&store, "mm", "payments", 500, DAY).await;
    // Claimed and not committed yet: in flight, held by the store all the same.
    let owner = Owner::new(Arc::from("sizing-test"), 1);
    let inflight: Vec<String> = (0..100)
        .map(|i| dedupd::keys::store_key("mm", "orders", format!("inflight-{i}").as_bytes()))
        .collect();
    store
        .claim(&inflight, &[], &owner, Duration::from_secs(60), None)
        .await
        .expect("claim");
    // Expired (a 1 ms window), and another deployment's prefix: neither counts.
    remember(&store, "mm", "payments", 200, Duration::from_millis(1)).await;
    remember(&store, "mm2", "orders", 300, DAY).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let size = loop {
        let size = store.size("mm", &routes).await.expect("size");
        if size.keys == [1600, 500, 0] || tokio::time::Instant::now() > deadline {
            break size;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(size.keys, vec![1600, 500, 0]);
    assert!(size.exact);
    // 2,600 entries (the expired ones may be swept already, so at least 2,400), each at least
    // a table slot (a 16-byte digest, a 4-byte expiry, a control byte).
    let per_entry = size.memory_bytes as f64 / 2600.0;
    assert!(
        (21.0..1000.0).contains(&per_entry),
        "estimate of {} bytes for about 2,600 entries",
        size.memory_bytes
    );
}

#[tokio::test]
async fn sampler_sets_the_gauges_and_keeps_them_when_a_sample_fails() {
    let handle = telemetry::install();
    let route = unique("gauged");
    let routes = vec![route.clone()];
    let store = Store::open(&store_config("memory", "redis://127.0.0.1:1/0", "gg"))
        .await
        .expect("store");
    remember(&store, "gg", &route, 42, DAY).await;

    telemetry::sizing::sample(&store, "gg", &routes)
        .await
        .expect("sample");
    let body = handle.render();
    assert_eq!(metric(&body, STORE_KEYS, &[("route", &route)]), Some(42.0));
    assert!(metric(&body, STORE_MEMORY, &[]).is_some_and(|m| m > 0.0));
    let errors_before = metric(&body, STORE_SAMPLE_ERRORS, &[]).unwrap_or(0.0);

    // Nothing listens there: the sample fails, is counted, and the gauge keeps its value.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let dead = Store::open(&store_config(
        "redis",
        &format!("redis://127.0.0.1:{port}/0"),
        "gg",
    ))
    .await
    .expect("store");
    assert!(telemetry::sizing::sample(&dead, "gg", &routes)
        .await
        .is_err());
    let body = handle.render();
    assert_eq!(metric(&body, STORE_KEYS, &[("route", &route)]), Some(42.0));
    let errors_after = metric(&body, STORE_SAMPLE_ERRORS, &[]).unwrap_or(0.0);
    assert!(errors_after > errors_before, "the failed sample is counted");
}

/// Seed URLs of a Redis Cluster, comma-separated, as for `tests/store.rs`; `scripts/test.sh`
/// starts one and sets it.
const CLUSTER_ENV: &str = "DEDUPD_TEST_REDIS_CLUSTER";

/// In a cluster, each route's tables sit on different primaries: their counts are summed, and
/// so is `used_memory`.
#[tokio::test]
async fn cluster_counts_are_summed_over_the_tables_and_memory_over_the_primaries() {
    let Ok(urls) = std::env::var(CLUSTER_ENV) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "{CLUSTER_ENV} is not set: run the tests with scripts/test.sh"
        );
        eprintln!("SKIPPED: set {CLUSTER_ENV} to run against a Redis Cluster");
        return;
    };
    let urls: Vec<String> = urls.split(',').map(|u| u.trim().to_owned()).collect();
    let prefix = unique("sizing-cluster");
    let store = Store::open(&store_config_toml("redis", &format!("{urls:?}"), &prefix))
        .await
        .expect("cluster store");
    let routes = vec!["orders".to_owned(), "idle".to_owned()];
    let keys = remember(&store, &prefix, "orders", 3000, Duration::from_secs(300)).await;

    let result = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        let size = store.size(&prefix, &routes).await.expect("size");
        assert_eq!(size.keys, vec![3000, 0]);
        let mut primaries = 0u64;
        for url in &urls {
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(
                    &mut redis::Client::open(url.as_str())
                        .expect("url")
                        .get_multiplexed_async_connection()
                        .await
                        .expect("node"),
                )
                .await
                .expect("INFO");
            primaries += info
                .lines()
                .find_map(|l| l.trim_end().strip_prefix("used_memory:"))
                .and_then(|n| n.parse::<u64>().ok())
                .expect("used_memory");
        }
        // Summed over the primaries (the seed URLs here), within what moved meanwhile.
        let off = size.memory_bytes.abs_diff(primaries) as f64 / primaries as f64;
        assert!(
            off < 0.2,
            "dedupd_store_memory_bytes {} vs the primaries' sum {primaries}",
            size.memory_bytes
        );
    }))
    .await;
    for key in keys {
        let _ = store.forget(&key).await;
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

const FROM: usize = 20_000;
const TO: usize = 120_000;

/// `used_memory` growth per key of one route, from `from` to `to` remembered keys (each with
/// its body digest if `bodies`), on a private Redis.
async fn redis_bytes_per_key(from: usize, to: usize, bodies: bool) -> f64 {
    let redis = OwnRedis::start().await;
    let store = Store::open(&store_config("redis", &redis.url(), "dedupd"))
        .await
        .expect("store");
    remember_with(&store, "dedupd", "orders", from, DAY, bodies).await;
    let before = redis.used_memory().await;
    remember_with(&store, "dedupd", "orders", to - from, DAY, bodies).await;
    let after = redis.used_memory().await;
    let size = store
        .size("dedupd", &["orders".to_owned()])
        .await
        .expect("size");
    assert_eq!(size.keys, vec![to as u64]);
    let per_key = (after - before) as f64 / (to - from) as f64;
    let key = dedupd::keys::store_key("dedupd", "orders", uuid().as_bytes());
    println!(
        "redis: used_memory {before} at {from} keys, {after} at {to} keys: {per_key:.1} bytes \
         per key {} (keys like {key:?}, {} bytes; window 24h)",
        if bodies {
            "with its body digest"
        } else {
            "without body digest"
        },
        key.len(),
    );
    per_key
}

/// The promise of the compact layout: at most 32 bytes of `used_memory` per remembered key.
#[tokio::test]
async fn redis_remembers_a_key_in_at_most_32_bytes() {
    let per_key = redis_bytes_per_key(FROM, TO, false).await;
    assert!(per_key <= 32.0, "{per_key:.1} bytes per key");
}

/// A key remembered with its body digest (8 bytes more, and its tick in 4 bytes instead of a
/// listpack integer) within 40 bytes.
#[tokio::test]
async fn redis_remembers_a_key_with_its_body_digest_in_at_most_40_bytes() {
    let per_key = redis_bytes_per_key(FROM, TO, true).await;
    assert!(per_key <= 40.0, "{per_key:.1} bytes per key");
}

/// The same at a larger scale: `DEDUPD_SIZING_KEYS` keys (default 1,000,000), measured from a
/// tenth of them, without and with body digests (one private Redis each).
#[tokio::test]
#[ignore = "measurement: run alone, see the module docs"]
async fn measure_redis_bytes_per_remembered_key() {
    let to = std::env::var("DEDUPD_SIZING_KEYS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000usize);
    redis_bytes_per_key(to / 10, to, false).await;
    redis_bytes_per_key(to / 10, to, true).await;
}

/// The memory store's own estimate grows by at most 72 bytes per remembered key (a 28-byte slot
/// with the body digest plus a control byte, in a table just past a doubling at 120,000 keys;
/// the RSS figure, which only a test running alone can read, is the measurement below).
#[tokio::test]
async fn memory_store_estimates_at_most_72_bytes_per_key() {
    let store = Store::open(&store_config("memory", "redis://127.0.0.1:1/0", "est"))
        .await
        .expect("store");
    let routes = ["orders".to_owned()];
    remember(&store, "est", "orders", FROM, DAY).await;
    let before = store.size("est", &routes).await.expect("size").memory_bytes;
    remember(&store, "est", "orders", TO - FROM, DAY).await;
    let after = store.size("est", &routes).await.expect("size").memory_bytes;
    let per_key = (after - before) as f64 / (TO - FROM) as f64;
    assert!(per_key <= 72.0, "{per_key:.1} bytes per key");
}

#[tokio::test]
#[ignore = "measurement: run alone, see the module docs"]
async fn measure_memory_store_bytes_per_remembered_key() {
    let store = Store::open(&store_config("memory", "redis://127.0.0.1:1/0", "dedupd"))
        .await
        .expect("store");
    let routes = ["orders".to_owned()];
    remember_with(&store, "dedupd", "orders", FROM, DAY, true).await;
    let (rss_before, est_before) = (rss(), store.size("dedupd", &routes).await.expect("size"));
    remember_with(&store, "dedupd", "orders", TO - FROM, DAY, true).await;
    let (rss_after, est_after) = (rss(), store.size("dedupd", &routes).await.expect("size"));
    assert_eq!(est_after.keys, vec![TO as u64]);
    let rss_per_key = (rss_after - rss_before) as f64 / (TO - FROM) as f64;
    assert!(rss_per_key <= 80.0, "{rss_per_key:.1} bytes of RSS per key");
    println!(
        "memory store: RSS {rss_before} at {FROM} keys, {rss_after} at {TO} keys: {:.1} bytes \
         per key; dedupd_store_memory_bytes {} -> {}: {:.1} bytes per key",
        (rss_after - rss_before) as f64 / (TO - FROM) as f64,
        est_before.memory_bytes,
        est_after.memory_bytes,
        (est_after.memory_bytes - est_before.memory_bytes) as f64 / (TO - FROM) as f64,
    );
}
