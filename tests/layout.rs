//! The compact Redis layout, looked at from Redis' side: shards stay listpacks as tables grow,
//! the sweeper deletes keys whose window ended, keys of the old layout (`{prefix}:{route}:{id}`
//! strings) are honored until they expire and not read after, and on Redis Cluster a batch
//! costs one call per table with the tables spread over the masters.
//!
//! Single-server cases use a private `redis-server` (so every key in it is the test's); the
//! cluster cases use the cluster `scripts/test.sh` starts (`DEDUPD_TEST_REDIS_CLUSTER`).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{wait_for, OwnRedis};
use dedupd::config::{Config, StoreConfig};
use dedupd::store::layout::{self, Tables};
use dedupd::store::{ClaimOutcome, Owner, Store};
use redis::aio::ConnectionLike;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const DAY: Duration = Duration::from_secs(24 * 3600);
const LEASE: Duration = Duration::from_secs(30);

fn store_config(url_toml: &str, prefix: &str) -> StoreConfig {
    let toml = format!(
        "[upstream]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n\
         [store]\nurl = {url_toml}\nkey_prefix = \"{prefix}\"\ntimeout = \"2s\"\n\
         [routes.r]\nqueue = \"q\"\nrouting_key = \"out\"\n"
    );
    Config::from_toml(&toml, std::path::Path::new("layout.toml"))
        .unwrap_or_else(|e| panic!("test config: {e}"))
        .store
}

fn ids(route: &str, prefix: &str, tag: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| dedupd::keys::store_key(prefix, route, format!("{tag}-{i}").as_bytes()))
        .collect()
}

fn owner() -> Owner {
    Owner::new(Arc::from("layout-test"), 1)
}

/// Claims and commits `keys` in batches of 500.
async fn remember(store: &Store, keys: &[String], window: Duration) {
    for batch in keys.chunks(500) {
        let claimed = store
            .claim(batch, &[], &owner(), LEASE, None)
            .await
            .expect("claim");
        assert!(claimed.iter().all(|c| *c == ClaimOutcome::Claimed));
        store
            .commit(batch, &[], &owner(), window)
            .await
            .expect("commit");
    }
}

async fn cmd<T: redis::FromRedisValue>(conn: &mut impl ConnectionLike, args: &[&str]) -> T {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Every key of the single server whose name starts with `prefix:{`.
async fn layout_keys(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    cmd(conn, &["KEYS", &format!("{prefix}:{{*")]).await
}

/// `calls` of a command in `INFO commandstats`.
fn calls(info: &str, command: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn shards_stay_listpacks_and_split_as_a_table_grows() {
    let redis = OwnRedis::run(false).await;
    let store = Store::open(&store_config(&format!("{:?}", redis.url()), "dd"))
        .await
        .expect("store");
    let mut conn = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys = ids("orders", "dd", "grow", 30_000);
    remember(&store, &keys, DAY).await;

    let tables = Tables::new("dd", "orders");
    let mut total = 0u64;
    let mut shards_seen = 0u64;
    for g in 0..layout::GROUPS {
        let meta: HashMap<String, String> = cmd(&mut conn, &["HGETALL", &tables.meta(g)]).await;
        let n: u64 = meta.get("n").map_or(1, |n| n.parse().expect("n"));
        let c: u64 = meta.get("c").expect("c").parse().expect("c");
        let meta_ttl: i64 = cmd(&mut conn, &["PTTL", &tables.meta(g)]).await;
        assert!(meta_ttl > 0, "table {g}: meta without TTL ({meta_ttl})");
        total += c;
        // Split at 40 per shard on average; not split needlessly either.
        assert!(
            c <= 40 * n && c > 20 * n,
            "table {g}: {c} keys in {n} shards"
        );
        for s in 0..n {
            let shard = format!("{}:{s}", tables.bases[g]);
            let len: u64 = cmd(&mut conn, &["HLEN", &shard]).await;
            let encoding: String = cmd(&mut conn, &["OBJECT", "ENCODING", &shard]).await;
            assert_eq!(encoding, "listpack", "{shard} with {len} fields");
            assert!(len <= 128, "{shard}: {len} fields");
            let ttl: i64 = cmd(&mut conn, &["PTTL", &shard]).await;
            assert!(
                ttl > 0 && ttl <= (DAY.as_millis() + 250) as i64,
                "{shard}: {ttl}"
            );
            shards_seen += 1;
        }
    }
    assert_eq!(total, 30_000, "each table counts its keys exactly");
    // Nothing else: metas, shards, and no claim left behind by a commit.
    let all = layout_keys(&mut conn, "dd").await;
    assert_eq!(
        all.len() as u64,
        shards_seen + layout::GROUPS as u64,
        "{:?}",
        &all[..5]
    );
    // Every key is still remembered after the splits moved them.
    for batch in keys.chunks(3000) {
        let again = store
            .claim(batch, &[], &owner(), LEASE, None)
            .await
            .expect("claim");
        assert!(again.iter().all(|c| *c == ClaimOutcome::Done));
    }
}

#[tokio::test]
async fn the_sweeper_deletes_keys_whose_window_ended() {
    let redis = OwnRedis::run(false).await;
    let config = store_config(&format!("{:?}", redis.url()), "sw");
    let store = Store::open(&config).await.expect("store");
    let conn = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let window = Duration::from_secs(1);
    let keys = ids("orders", "sw", "sweep", 3000);
    let started = tokio::time::Instant::now();
    remember(&store, &keys, window).await;
    // Remembered for the whole window (the first batch was committed after `started`).
    let early = store
        .claim(&keys[..10], &[], &owner(), LEASE, None)
        .await
        .expect("claim");
    if started.elapsed() < window {
        assert!(early.iter().all(|c| *c == ClaimOutcome::Done), "{early:?}");
    }
    store.release(&keys[..10], &owner()).await.expect("release");

    // Two instances sweep; fields go once their window (plus at most an eighth) has passed.
    let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
    let other = Store::open(&config).await.expect("second store");
    for s in [&store, &other] {
        s.start_upkeep(&[("orders".to_owned(), window)], &tracker, &stop);
    }
    let tables = Tables::new("sw", "orders");
    wait_for("every field swept", Duration::from_secs(20), || async {
        let mut conn = conn.clone();
        let mut left = 0u64;
        let mut count = 0i64;
        for g in 0..layout::GROUPS {
            let meta: HashMap<String, String> = cmd(&mut conn, &["HGETALL", &tables.meta(g)]).await;
            count += meta.get("c").map_or(0, |c| c.parse().unwrap_or(0));
            let n: u64 = meta.get("n").map_or(1, |n| n.parse().unwrap_or(1));
            for s in 0..n {
                left += cmd::<u64>(&mut conn, &["HLEN", &format!("{}:{s}", tables.bases[g])]).await;
            }
        }
        (left == 0 && count == 0).then_some(())
    })
    .await;
    // Forgotten: the next copy is claimed again.
    let later = store
        .claim(&keys[..100], &[], &owner(), LEASE, None)
        .await
        .expect("claim");
    assert!(later.iter().all(|c| *c == ClaimOutcome::Claimed));
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    let size = store
        .size("sw", &["orders".to_owned()])
        .await
        .expect("size");
    assert_eq!(size.keys, vec![0]);
}

#[tokio::test]
async fn keys_of_the_old_layout_are_honored_until_they_expire_and_not_read_after() {
    let redis = OwnRedis::run(false).await;
    let config = store_config(&format!("{:?}", redis.url()), "up");
    let mut conn = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    // What an older dedupd left: a done key, an in-flight claim, both with TTLs.
    let done = dedupd::keys::store_key("up", "orders", b"old-done");
    let flying = dedupd::keys::store_key("up", "orders", b"old-flying");
    let fresh = dedupd::keys::store_key("up", "orders", b"new");
    let _: () = cmd(&mut conn, &["SET", &done, "1", "PX", "4000"]).await;
    let _: () = cmd(&mut conn, &["SET", &flying, "0123abcd:7", "PX", "4000"]).await;

    let store = Store::open(&config).await.expect("store");
    let batch = [done.clone(), flying.clone(), fresh.clone()];
    let check = |outcomes: Vec<ClaimOutcome>| {
        assert_eq!(outcomes[0], ClaimOutcome::Done);
        assert!(
            matches!(outcomes[1], ClaimOutcome::InFlightElsewhere { lease_left } if lease_left <= Duration::from_secs(4)),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[2], ClaimOutcome::Claimed);
    };
    // Before the upgrade check has answered: read anyway, one GET per key.
    let before: String = cmd(&mut conn, &["INFO", "commandstats"]).await;
    check(
        store
            .claim(&batch, &[], &owner(), LEASE, None)
            .await
            .expect("claim"),
    );
    let after: String = cmd(&mut conn, &["INFO", "commandstats"]).await;
    assert_eq!(calls(&after, "get") - calls(&before, "get"), 3);
    store.release(&batch[2..], &owner()).await.expect("release");

    let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
    store.start_upkeep(&[("orders".to_owned(), DAY)], &tracker, &stop);
    let marker = layout::legacy_marker("up", "orders");
    let until: u64 = wait_for("upgrade marker", Duration::from_secs(10), || async {
        let mut conn = conn.clone();
        cmd::<Option<u64>>(&mut conn, &["GET", &marker]).await
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(
        until > now && until <= now + 4000,
        "until {until}, now {now}"
    );
    check(
        store
            .claim(&batch, &[], &owner(), LEASE, None)
            .await
            .expect("claim"),
    );
    store.release(&batch[2..], &owner()).await.expect("release");

    // Once they expired, claims read only the new layout: a claim of a fresh key is an HGET
    // and a SET; a GET is what reading the old name costs.
    wait_for("old keys expired", Duration::from_secs(10), || async {
        let mut conn = conn.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        (cmd::<i64>(&mut conn, &["EXISTS", &done, &flying]).await == 0 && now >= until)
            .then_some(())
    })
    .await;
    assert!(!store.reads_old_layout("orders"));
    let fresh_keys = ids("orders", "up", "after", 100);
    let before: String = cmd(&mut conn, &["INFO", "commandstats"]).await;
    let outcomes = store
        .claim(&fresh_keys, &[], &owner(), LEASE, None)
        .await
        .expect("claim");
    let after: String = cmd(&mut conn, &["INFO", "commandstats"]).await;
    assert!(outcomes.iter().all(|c| *c == ClaimOutcome::Claimed));
    assert_eq!(calls(&after, "get") - calls(&before, "get"), 0);
    assert_eq!(calls(&after, "hget") - calls(&before, "hget"), 100);
    assert_eq!(calls(&after, "set") - calls(&before, "set"), 100);
    assert_eq!(calls(&after, "evalsha") - calls(&before, "evalsha"), 1);
    // And a restart reads the marker instead of scanning again.
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    let before: String = cmd(&mut conn, &["INFO", "commandstats"]).await;
    let restarted = Store::open(&config).await.expect("store");
    let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
    restarted.start_upkeep(&[("orders".to_owned(), DAY)], &tracker, &stop);
    wait_for("marker read", Duration::from_secs(10), || async {
        let mut conn = conn.clone();
        let info: String = cmd(&mut conn, &["INFO", "commandstats"]).await;
        (calls(&info, "get") > calls(&before, "get")).then_some(())
    })
    .await;
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    let info: String = cmd(&mut conn, &["INFO", "commandstats"]).await;
    assert_eq!(
        calls(&info, "scan"),
        calls(&before, "scan"),
        "no second scan"
    );
}

/// The cluster's primaries: (host:port, first and last slot of each range).
async fn primaries(seed: &str) -> Vec<(String, Vec<(u16, u16)>)> {
    let mut conn = redis::Client::open(seed)
        .expect("seed")
        .get_multiplexed_async_connection()
        .await
        .expect("cluster node");
    let slots: Vec<redis::Value> = cmd(&mut conn, &["CLUSTER", "SLOTS"]).await;
    let mut by_node: HashMap<String, Vec<(u16, u16)>> = HashMap::new();
    for range in slots {
        let (start, end, node): (u16, u16, Vec<redis::Value>) =
            redis::from_redis_value(range).expect("CLUSTER SLOTS range");
        let (host, port): (String, u16) = (
            redis::from_redis_value(node[0].clone()).expect("host"),
            redis::from_redis_value(node[1].clone()).expect("port"),
        );
        by_node
            .entry(format!("{host}:{port}"))
            .or_default()
            .push((start, end));
    }
    let mut nodes: Vec<_> = by_node.into_iter().collect();
    nodes.sort();
    nodes
}

#[tokio::test]
async fn on_a_cluster_a_batch_costs_one_call_per_table_spread_over_the_masters() {
    let Some(urls) = common::cluster_urls() else {
        return;
    };
    let prefix = common::unique("layout-cluster");
    let store = Store::open(&store_config(&format!("{urls:?}"), &prefix))
        .await
        .expect("cluster store");
    // No old keys under a new prefix: the upgrade check answers at once.
    let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
    store.start_upkeep(&[("orders".to_owned(), DAY)], &tracker, &stop);
    let client = redis::cluster::ClusterClient::new(urls.clone()).expect("urls");
    let mut cluster = client.get_async_connection().await.expect("cluster");
    let marker = layout::legacy_marker(&prefix, "orders");
    wait_for("upgrade check", Duration::from_secs(10), || async {
        (!store.reads_old_layout("orders")).then_some(())
    })
    .await;
    // Stopped, so that its sweeper calls are not counted below.
    stop.cancel();
    tracker.close();
    tracker.wait().await;

    // The six tables: two on each of the three masters.
    let nodes = primaries(&urls[0]).await;
    let tables = Tables::new(&prefix, "orders");
    let master_of = |name: &str| {
        let slot = layout::slot(name.as_bytes());
        nodes
            .iter()
            .position(|(_, ranges)| ranges.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .expect("a master owns every slot")
    };
    let mut per_master = vec![0; nodes.len()];
    for g in 0..layout::GROUPS {
        per_master[master_of(&tables.meta(g))] += 1;
    }
    assert_eq!(per_master, vec![2; 3], "tables per master");

    let evalsha = |nodes: Vec<(String, Vec<(u16, u16)>)>| async move {
        let mut out = Vec::new();
        for (node, _) in nodes {
            let mut conn = redis::Client::open(format!("redis://{node}"))
                .expect("node url")
                .get_multiplexed_async_connection()
                .await
                .expect("node");
            let info: String = cmd(&mut conn, &["INFO", "commandstats"]).await;
            out.push(calls(&info, "evalsha"));
        }
        out
    };
    // A first batch loads the scripts on every master (NOSCRIPT, SCRIPT LOAD, again).
    let warm = ids("orders", &prefix, "warm", 100);
    store
        .claim(&warm, &[], &owner(), LEASE, None)
        .await
        .expect("claim");
    store
        .commit(&warm, &[], &owner(), DAY)
        .await
        .expect("commit");
    let keys = ids("orders", &prefix, "spread", 3000);
    let (sent_before, calls_before) = (store.commands_sent(), evalsha(nodes.clone()).await);
    for batch in keys.chunks(200) {
        store
            .claim(batch, &[], &owner(), LEASE, None)
            .await
            .expect("claim");
        store
            .commit(batch, &[], &owner(), Duration::from_secs(300))
            .await
            .expect("commit");
    }
    let (sent, calls_after) = (store.commands_sent() - sent_before, evalsha(nodes).await);
    let per_node: Vec<u64> = calls_after
        .iter()
        .zip(&calls_before)
        .map(|(a, b)| a - b)
        .collect();
    println!("{sent} commands for 3000 keys; script calls per master {per_node:?}");
    let _: Result<(), _> = redis::cmd("DEL")
        .arg(&marker)
        .query_async(&mut cluster)
        .await;
    // 15 batches × (claim + commit) × 6 tables.
    assert_eq!(sent, 15 * 2 * 6);
    assert!(per_node.iter().sum::<u64>() >= sent);
    // Two tables per master: 15 batches × 2 operations × 2 tables each.
    assert_eq!(per_node, vec![60; 3], "not even");
    common::cluster_cleanup(&urls[0], &prefix).await;
}

/// At full load (a queue already holding 20,000 messages, default tuning) on a 3-master
/// cluster, the whole pipeline sends under 0.1 Redis commands per message.
#[tokio::test]
async fn on_a_cluster_the_pipeline_sends_under_a_tenth_of_a_command_per_message() {
    let Some(urls) = common::cluster_urls() else {
        return;
    };
    let setup = common::Setup::new("cluster-load");
    let list: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
    let toml = setup
        .toml()
        .replace(
            &format!("url = \"{}\"", common::REDIS_URL),
            &format!("url = [{}]", list.join(", ")),
        )
        // The defaults: what "full load" means for an operator who changed nothing.
        .replace("prefetch = 200", "prefetch = 2000")
        .replace("batch_size = 50", "batch_size = 500");
    let path = std::env::temp_dir().join(format!("{}.toml", setup.name));
    std::fs::write(&path, &toml).expect("config");
    let mut broker = common::Broker::connect().await;
    setup.declare(&mut broker).await;
    const N: usize = 20_000;
    let messages: Vec<_> = (0..N)
        .map(|i| with_id(Some(&format!("k{}", i % 15_000)), &i.to_string()))
        .collect();
    broker.publish_all(&setup.queue, &messages).await;

    let proxy = common::Child::start(&["run", "-c", &path.display().to_string()]).await;
    setup
        .wait_settled(proxy.port, N as u64, Duration::from_secs(120))
        .await;
    let commands = common::metric(proxy.port, "dedupd_store_commands_total", &[]).await;
    let forwarded = setup
        .metric(proxy.port, "dedupd_messages_forwarded_total")
        .await;
    let duplicates = setup.metric(proxy.port, "dedupd_duplicates_total").await;
    println!(
        "{commands} store commands for {N} messages: {:.4} per message",
        commands / N as f64
    );
    assert_eq!((forwarded, duplicates), (15_000.0, 5_000.0));
    assert!(commands > 0.0 && commands / N as f64 <= 0.1, "{commands}");
    proxy.stop().await;
    broker.cleanup().await;
    common::cluster_cleanup(&urls[0], &setup.name).await;
    let _ = std::fs::remove_file(path);
}

fn with_id(id: Option<&str>, body: &str) -> (Vec<u8>, lapin::BasicProperties) {
    let props = lapin::BasicProperties::default().with_delivery_mode(2);
    let props = match id {
        Some(id) => props.with_message_id(id.into()),
        None => props,
    };
    (body.as_bytes().to_vec(), props)
}

#[tokio::test]
async fn listpack_limits_too_small_for_the_layout_are_reported() {
    let redis = OwnRedis::run(false).await;
    let store = Store::open(&store_config(&format!("{:?}", redis.url()), "lp"))
        .await
        .expect("store");
    assert_eq!(store.layout_risk().await.expect("CONFIG GET"), None);
    // Each setting in turn: the risk names it and its value.
    for (setting, value, fixed) in [
        ("hash-max-listpack-entries", "64", "128"),
        ("hash-max-listpack-value", "8", "64"),
    ] {
        assert!(redis.cmd(&["CONFIG", "SET", setting, value]).await);
        let risk = store.layout_risk().await.expect("CONFIG GET");
        let expected = format!("{setting} is {value}");
        assert!(
            risk.as_deref().is_some_and(|r| r.contains(&expected)),
            "{risk:?}"
        );
        assert!(redis.cmd(&["CONFIG", "SET", setting, fixed]).await);
    }
    assert_eq!(store.layout_risk().await.expect("CONFIG GET"), None);
}
