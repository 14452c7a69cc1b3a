//! Faults, with the built binary as a child process: SIGKILL, broker connections closed, Redis
//! paused, killed and absent, two instances on one queue, and bad input. Every test ends with a
//! tally of what arrived downstream and what was left upstream: lost = 0 and left = 0 always;
//! duplicates = 0 except where the fault cuts confirms off, where they stay within what was in
//! flight (prefetch × faults).
//!
//! The tests here run one at a time (they share `rabbitmqctl` and restart things), each against
//! its own queues, key prefix and, for Redis faults, its own `redis-server` on a free port.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::flow::*;
use common::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());
const LONG: Duration = Duration::from_secs(120);
const PREFETCH: usize = 200;

/// Writes `toml` as this test's config file `{name}{suffix}.toml`; returns its path.
fn write_config(setup: &Setup, suffix: &str, toml: &str) -> String {
    let path = std::env::temp_dir().join(format!("{}{suffix}.toml", setup.name));
    std::fs::write(&path, toml).expect("config");
    path.to_str().expect("utf-8 path").to_owned()
}

/// Closes every broker connection of `user` in one call, as `rabbitmqctl
/// close_all_connections` would for the proxy, without touching the test's own connections.
async fn close_user_connections(user: &str) {
    rabbitmqctl(&["close_all_user_connections", user, "dedupd fault test"]).await;
}

/// A broker user for the proxy alone, so its connections can be closed by user.
async fn proxy_user(setup: &Setup) -> String {
    let user = format!("dedupd-{}", setup.name);
    rabbitmqctl(&["add_user", &user, "pw"]).await;
    rabbitmqctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]).await;
    user
}

#[tokio::test]
async fn sigkill_five_times_mid_stream() {
    let _serial = SERIAL.lock().await;
    let mut setup = Setup::new("sigkill");
    setup.lease = "1s";
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(20_000, 0.3);
    broker.publish_all(&setup.queue, &messages).await;
    let path = setup.write();
    let args = ["run", "-c", path.to_str().expect("utf-8 path")];

    let mut proxy = Child::start(&args).await;
    for kill in 1..=5u32 {
        wait_downstream(&broker, &setup.out, kill * expected.len() as u32 / 7).await;
        proxy.signal(9);
        let _ = proxy.child.wait().await;
        proxy = Child::start(&args).await;
    }

    let t = finish(&broker, &setup, vec![proxy], &expected, "sigkill x5").await;
    assert_clean(&t, PREFETCH * 5);
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

#[tokio::test]
async fn broker_connections_closed_three_times() {
    let _serial = SERIAL.lock().await;
    // A lease far longer than the test: claims left by a closed connection must be taken
    // over at once (same instance, older epoch), not after the lease.
    let mut setup = Setup::new("connclose");
    setup.lease = "60s";
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(20_000, 0.3);
    broker.publish_all(&setup.queue, &messages).await;
    let user = proxy_user(&setup).await;
    let path = write_config(
        &setup,
        "",
        // Small batches and a small window slow the proxy down, so that all three faults
        // land mid-stream even on a fast machine (rabbitmqctl takes most of a second).
        &setup
            .toml()
            .replace("guest:guest@", &format!("{user}:pw@"))
            .replace("batch_size = 50", "batch_size = 10\npublish_window = 40"),
    );
    let proxy = Child::start(&["run", "-c", &path]).await;

    for round in 1..=3u32 {
        wait_downstream(&broker, &setup.out, round * expected.len() as u32 / 8).await;
        // Between a close and the reconnect there is nothing to close: wait for a connection.
        wait_for("the proxy connected", LONG, || async {
            let up = metric(proxy.port, "dedupd_up", &[("component", "upstream")]).await;
            (up == 1.0).then_some(())
        })
        .await;
        close_user_connections(&user).await;
        let left = broker.ready(&setup.queue).await;
        println!("FAULT-FIGURES connections closed: round {round} with {left} messages upstream");
        assert!(left > 0, "round {round}: the stream was already over");
    }
    let last_close = tokio::time::Instant::now();
    wait_drained(&broker, &setup, proxy.port).await;
    let recovery = last_close.elapsed();

    let t = finish(
        &broker,
        &setup,
        vec![proxy],
        &expected,
        "connections closed x3",
    )
    .await;
    println!(
        "FAULT-FIGURES connections closed: drained {recovery:?} after the last close (lease 60s)"
    );
    assert!(
        recovery < Duration::from_secs(45),
        "waited out the lease: {recovery:?}"
    );
    assert_clean(&t, PREFETCH * 3);
    assert!(
        t.duplicates as f64 <= t.takeovers,
        "every duplicate was counted: {t:?}"
    );
    rabbitmqctl(&["delete_user", &user]).await;
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

#[tokio::test]
async fn redis_paused_then_its_connections_killed_twice() {
    let _serial = SERIAL.lock().await;
    let redis = OwnRedis::run(true).await;
    let mut setup = Setup::new("redispause");
    setup.extra = String::new();
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(20_000, 0.3);
    broker.publish_all(&setup.queue, &messages).await;
    let path = write_config(&setup, "", &setup.toml().replace(REDIS_URL, &redis.url()));
    let proxy = Child::start(&["run", "-c", &path]).await;

    let third = expected.len() as u32 / 4;
    wait_downstream(&broker, &setup.out, third).await;
    assert!(redis.cmd(&["CLIENT", "PAUSE", "3000", "ALL"]).await);
    wait_for("store marked down during the pause", LONG, || async {
        let up = metric(proxy.port, "dedupd_up", &[("component", "store")]).await;
        (up == 0.0).then_some(())
    })
    .await;
    for round in 2..=3u32 {
        wait_downstream(&broker, &setup.out, round * third).await;
        assert!(redis.cmd(&["CLIENT", "KILL", "TYPE", "normal"]).await);
    }
    let label = "redis pause + client kill x2";
    let t = finish(&broker, &setup, vec![proxy], &expected, label).await;
    redis.remove().await;
    println!("FAULT-FIGURES redis pause: store_errors={}", t.store_errors);
    assert_clean(&t, 0);
    assert!(t.store_errors > 0.0, "the pause was noticed");
    broker.cleanup().await;
}

#[tokio::test]
async fn redis_absent_at_start_then_started() {
    let _serial = SERIAL.lock().await;
    // Not started until the proxy runs: its port is reserved (and cannot be changed later).
    let mut redis = OwnRedis::reserve(true);
    let setup = Setup::new("redisabsent");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(3_000, 0.3);
    broker.publish_all(&setup.queue, &messages).await;
    let path = write_config(&setup, "", &setup.toml().replace(REDIS_URL, &redis.url()));
    let proxy = Child::start(&["run", "-c", &path]).await;
    let port = proxy.port;

    // Up and answering, not ready, consuming nothing, for several store retries.
    wait_for("metrics endpoint up", LONG, || async {
        http_get(port, "/healthz").await.map(|_| ())
    })
    .await;
    let total = messages.len() as u32;
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < watch_until {
        assert_eq!(
            status(port, "/readyz").await,
            Some(503),
            "not ready without a store"
        );
        assert_eq!(broker.ready(&setup.queue).await, total, "nothing consumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each component reads for itself: the brokers are connected, only the store is down.
    let up = |component: &'static str| async move {
        metric(port, "dedupd_up", &[("component", component)]).await
    };
    wait_for("brokers read up while the store is down", LONG, || async {
        (up("upstream").await == 1.0 && up("downstream").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(up("store").await, 0.0);

    redis.start().await;
    wait_drained(&broker, &setup, port).await;
    assert_eq!(status(port, "/readyz").await, Some(200));

    let t = finish(
        &broker,
        &setup,
        vec![proxy],
        &expected,
        "redis absent at start",
    )
    .await;
    redis.remove().await;
    assert_clean(&t, 0);
    broker.cleanup().await;
}

#[tokio::test]
async fn two_instances_share_one_window() {
    let _serial = SERIAL.lock().await;
    let setup = Setup::new("twoinst");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(10_000, 0.5);
    // One file: each instance binds a port of its own (port 0) and logs it.
    let path = setup.write();
    let path = path.to_str().expect("utf-8 path");
    let a = Child::start(&["run", "-c", path]).await;
    let b = Child::start(&["run", "-c", path]).await;
    wait_for("both instances consuming", LONG, || async {
        let ra = status(a.port, "/readyz").await;
        let rb = status(b.port, "/readyz").await;
        (ra == Some(200) && rb == Some(200)).then_some(())
    })
    .await;
    broker.publish_all(&setup.queue, &messages).await;

    let label = "two instances, 50% duplicates";
    let t = finish(&broker, &setup, vec![a, b], &expected, label).await;
    let (consumed_a, consumed_b) = (t.consumed[0], t.consumed[1]);
    println!("FAULT-FIGURES two instances: consumed a={consumed_a} b={consumed_b}");
    assert!(
        consumed_a > 0.0 && consumed_b > 0.0,
        "both instances took part"
    );
    assert_clean(&t, 0);
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

/// Bad input never stops the route: after each bad message, a good one still goes through.
#[tokio::test]
async fn bad_input_goes_through_policy_and_the_flow_continues() {
    let _serial = SERIAL.lock().await;
    let mut setup = Setup::new("badinput");
    // Publish through a direct exchange, so "unroutable" can be produced and then fixed.
    let exchange = format!("{}.x", setup.name);
    setup.extra = String::new();
    let mut broker = Broker::connect().await;
    let dlq = setup.declare(&mut broker).await;
    broker
        .ch
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    // The proxy publishes as another user than the producer, so the producer's own user_id
    // ("guest") is one the downstream user may not set.
    let user = proxy_user(&setup).await;
    let toml = setup
        .toml()
        .replace(
            "[store]",
            &format!("[downstream]\nurl = \"amqp://{user}:pw@127.0.0.1:5672/%2f\"\n\n[store]"),
        )
        .replace("exchange = \"\"", &format!("exchange = \"{exchange}\""))
        .replace(
            &format!("routing_key = \"{}\"", setup.out),
            "routing_key = \"bound\"",
        );
    let path = write_config(&setup, "", &toml);
    let proxy = Child::start(&["run", "-c", &path]).await;
    let port = proxy.port;
    let rejected = |reason: &'static str| {
        let name = setup.name.clone();
        async move {
            metric(
                port,
                "dedupd_messages_rejected_total",
                &[("route", &name), ("reason", reason)],
            )
            .await
        }
    };

    // Unroutable: no queue is bound yet. Rejected to the DLQ, key not remembered.
    broker
        .publish(
            &setup.queue,
            b"early",
            BasicProperties::default().with_message_id("u1".into()),
        )
        .await;
    wait_for("unroutable rejected", LONG, || async {
        (broker.ready(&dlq).await == 1).then_some(())
    })
    .await;
    assert_eq!(rejected("unroutable").await, 1.0);
    broker
        .ch
        .queue_bind(
            setup.out.as_str().into(),
            exchange.as_str().into(),
            "bound".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    broker
        .publish(
            &setup.queue,
            b"retry",
            BasicProperties::default().with_message_id("u1".into()),
        )
        .await;
    let got = broker.receive(&setup.out, 1, LONG).await;
    assert_eq!(got[0].data, b"retry", "the retried key goes through");

    let good = |n: usize| BasicProperties::default().with_message_id(format!("good-{n}").into());
    let mut bad: Vec<(&str, Vec<u8>, BasicProperties)> = vec![
        (
            "5 MB body",
            vec![b'x'; 5 * 1024 * 1024],
            BasicProperties::default().with_message_id("big".into()),
        ),
        (
            "255-byte UTF-8 message_id",
            b"long id".to_vec(),
            BasicProperties::default().with_message_id(format!("{}x", "é".repeat(127)).into()),
        ),
        (
            "missing message_id",
            b"no key".to_vec(),
            BasicProperties::default(),
        ),
        (
            "user_id of another user",
            b"foreign user_id".to_vec(),
            BasicProperties::default()
                .with_message_id("uid".into())
                .with_user_id("guest".into()),
        ),
    ];
    let mut expect_forwarded = Vec::new();
    for (n, (what, body, props)) in bad.drain(..).enumerate() {
        broker.publish(&setup.queue, &body, props.clone()).await;
        broker
            .publish(&setup.queue, format!("good-{n}").as_bytes(), good(n))
            .await;
        if what == "missing message_id" {
            let got = broker.receive(&setup.out, 1, LONG).await;
            assert_eq!(
                got[0].data,
                format!("good-{n}").as_bytes(),
                "{what}: flow continues"
            );
            continue;
        }
        let got = broker.receive(&setup.out, 2, LONG).await;
        assert_eq!(got[0].data, body, "{what}: forwarded intact");
        assert_eq!(
            got[1].data,
            format!("good-{n}").as_bytes(),
            "{what}: flow continues"
        );
        if what == "user_id of another user" {
            assert_eq!(got[0].properties.user_id(), &None, "user_id stripped");
            assert_eq!(
                got[0].properties.message_id().as_ref().map(|s| s.as_str()),
                Some("uid")
            );
        } else {
            assert_eq!(got[0].properties, props, "{what}: properties intact");
        }
        expect_forwarded.push(what);
    }
    // The long id is remembered like any other.
    broker
        .publish(
            &setup.queue,
            b"again",
            BasicProperties::default().with_message_id(format!("{}x", "é".repeat(127)).into()),
        )
        .await;
    wait_drained(&broker, &setup, port).await;
    assert_eq!(
        broker.ready(&setup.out).await,
        0,
        "long-id duplicate dropped"
    );
    assert_eq!(rejected("missing_key").await, 1.0);
    assert_eq!(rejected("user_id_stripped").await, 1.0);
    proxy.stop().await;

    let dead = broker.drain(&dlq).await;
    let dead: Vec<&[u8]> = dead.iter().map(|d| d.data.as_slice()).collect();
    assert_eq!(dead, [b"early".as_slice(), b"no key".as_slice()]);
    assert_eq!(broker.ready(&setup.queue).await, 0);
    println!("FAULT-FIGURES bad input: forwarded {expect_forwarded:?}, rejected unroutable=1 missing_key=1, user_id_stripped=1");
    let _ = broker
        .ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    rabbitmqctl(&["delete_user", &user]).await;
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

/// Redis stops in the middle of the stream and comes back: nothing is forwarded or acked while
/// it is away (on_error = block), and no key is forwarded twice.
#[tokio::test]
async fn redis_down_mid_stream_then_back() {
    let _serial = SERIAL.lock().await;
    let mut redis = OwnRedis::run(true).await;
    let setup = Setup::new("redisdown");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(20_000, 0.3);
    broker.publish_all(&setup.queue, &messages).await;
    let path = write_config(&setup, "", &setup.toml().replace(REDIS_URL, &redis.url()));
    let proxy = Child::start(&["run", "-c", &path]).await;

    wait_downstream(&broker, &setup.out, expected.len() as u32 / 4).await;
    redis.stop().await;
    wait_for("not ready while the store is down", LONG, || async {
        (status(proxy.port, "/readyz").await == Some(503)).then_some(())
    })
    .await;
    let left = broker.ready(&setup.queue).await;
    println!("FAULT-FIGURES redis down: stopped with {left} messages upstream");
    assert!(left > 0, "the stream was already over");
    redis.start().await;

    let label = "redis down mid-stream, restarted";
    let t = finish(&broker, &setup, vec![proxy], &expected, label).await;
    redis.remove().await;
    println!("FAULT-FIGURES redis down: store_errors={}", t.store_errors);
    assert_clean(&t, 0);
    assert!(t.store_errors > 0.0, "the outage was noticed");
    broker.cleanup().await;
}

/// on_error = "forward": with the store away, messages are forwarded without dedup (fail
/// open), and every failed store operation is counted.
#[tokio::test]
async fn store_away_with_on_error_forward_fails_open() {
    let _serial = SERIAL.lock().await;
    let redis = OwnRedis::reserve(false); // never started
    let setup = Setup::new("failopen");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, _) = workload(1_000, 0.3);
    broker.publish_all(&setup.queue, &messages).await;
    let toml = setup
        .toml()
        .replace(REDIS_URL, &redis.url())
        .replace("lease = ", "on_error = \"forward\"\nlease = ");
    let path = write_config(&setup, "", &toml);
    let proxy = Child::start(&["run", "-c", &path]).await;
    wait_drained(&broker, &setup, proxy.port).await;
    let errors = setup.metric(proxy.port, "dedupd_store_errors_total").await;
    let forwarded = setup
        .metric(proxy.port, "dedupd_messages_forwarded_total")
        .await;
    proxy.stop().await;

    let got = broker.drain(&setup.out).await;
    println!(
        "FAULT-FIGURES fail open: forwarded={} store_errors={errors}",
        got.len()
    );
    assert_eq!(
        got.len(),
        messages.len(),
        "every copy forwarded, duplicates included"
    );
    assert_eq!(forwarded, messages.len() as f64);
    assert!(errors > 0.0, "store failures counted");
    assert_eq!(broker.ready(&setup.queue).await, 0);
    broker.cleanup().await;
}

/// The ids whose keys are in flight (hold an owner token, not the done marker) under the
/// route's prefix in the shared Redis.
/// Which of `ids` are claimed in flight right now (asked through the store, whose layout
/// hides ids behind digests).
async fn in_flight_ids(setup: &Setup, ids: &HashSet<String>) -> HashSet<String> {
    let store = dedupd::store::Store::open(&setup.config().store)
        .await
        .expect("store");
    let mut flying = HashSet::new();
    for id in ids {
        let key = dedupd::keys::store_key(&setup.name, &setup.name, id.as_bytes());
        if let dedupd::store::KeyState::InFlight { .. } =
            store.inspect(&key).await.expect("inspect")
        {
            flying.insert(id.clone());
        }
    }
    flying
}

fn message(id: &str) -> (Vec<u8>, BasicProperties) {
    (
        format!("copy of {id}").into_bytes(),
        BasicProperties::default()
            .with_message_id(id.into())
            .with_delivery_mode(2),
    )
}

/// Confirms slower than the lease (the downstream broker's replies held back by a relay for
/// three leases): the owner keeps renewing its claims, so a second instance that gets another
/// copy of each of those ids holds it instead of forwarding it, and nothing arrives twice.
/// Before leases were renewed, the claims lapsed after one lease and the second instance
/// forwarded every copy again, uncounted.
#[tokio::test]
async fn claims_outlive_their_lease_while_their_owner_works_on_them() {
    let _serial = SERIAL.lock().await;
    let mut setup = Setup::new("leaselive");
    setup.lease = "1s";
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(2_000, 0.0);
    broker.publish_all(&setup.queue, &messages).await;

    let relay = Relay::start("127.0.0.1:5672").await;
    let toml_a = setup.toml().replace(
        "[store]",
        &format!(
            "[downstream]\nurl = \"amqp://guest:guest@127.0.0.1:{}/%2f\"\n\n[store]",
            relay.port
        ),
    );
    let path_a = write_config(&setup, "-a", &toml_a);
    let path_b = write_config(&setup, "-b", &setup.toml());
    let a = Child::start(&["run", "-c", &path_a]).await;
    wait_downstream(&broker, &setup.out, 300).await;

    relay.pause(true);
    let paused_at = std::time::Instant::now();
    wait_for(
        "A's prefetch full of unconfirmed publishes",
        LONG,
        || async {
            let inflight = setup.metric(a.port, "dedupd_inflight_messages").await;
            (inflight >= PREFETCH as f64).then_some(())
        },
    )
    .await;
    let held_by_a = in_flight_ids(&setup, &expected).await;
    assert!(!held_by_a.is_empty(), "A has claims in flight");
    let b = Child::start(&["run", "-c", &path_b]).await;
    let copies: Vec<_> = held_by_a.iter().map(|id| message(id)).collect();
    broker.publish_all(&setup.queue, &copies).await;
    wait_for(
        "B took the whole queue, and three leases passed",
        LONG,
        || async {
            let empty = broker.ready(&setup.queue).await == 0;
            (empty && paused_at.elapsed() > Duration::from_secs(3)).then_some(())
        },
    )
    .await;
    let still = in_flight_ids(&setup, &held_by_a).await;
    let lapsed = held_by_a.difference(&still).count();
    relay.pause(false);

    let label = "confirms held back for 3 leases, second instance";
    let t = finish(&broker, &setup, vec![a, b], &expected, label).await;
    println!(
        "FAULT-FIGURES lease renewal: {} claims in flight at the pause, {lapsed} lapsed after 3 leases",
        held_by_a.len()
    );
    assert_eq!(
        lapsed, 0,
        "claims lapsed while their owner was working on them"
    );
    assert_clean(&t, 0);
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

/// Redis full (maxmemory reached, noeviction) for longer than the lease: commits of confirmed
/// messages are refused with OOM and retried while their claims are kept alive, so no key is
/// forgotten: a second copy of every message, published afterwards, is dropped. Before, the
/// claims lapsed during the retries, the commit then found them absent and wrote nothing, and
/// later copies went through uncounted.
#[tokio::test]
async fn redis_full_longer_than_the_lease_forgets_nothing() {
    let _serial = SERIAL.lock().await;
    let redis = OwnRedis::run(true).await;
    let mut setup = Setup::new("redisfull");
    setup.lease = "1s";
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(6_000, 0.0);
    broker.publish_all(&setup.queue, &messages).await;
    let path = write_config(&setup, "", &setup.toml().replace(REDIS_URL, &redis.url()));
    let proxy = Child::start(&["run", "-c", &path]).await;

    wait_downstream(&broker, &setup.out, expected.len() as u32 / 4).await;
    assert!(redis.cmd(&["CONFIG", "SET", "maxmemory", "1"]).await);
    let full_at = std::time::Instant::now();
    wait_for("writes refused for three leases", LONG, || async {
        let errors = setup.metric(proxy.port, "dedupd_store_errors_total").await;
        (errors > 0.0 && full_at.elapsed() > Duration::from_secs(3)).then_some(())
    })
    .await;
    assert!(redis.cmd(&["CONFIG", "SET", "maxmemory", "0"]).await);
    wait_drained(&broker, &setup, proxy.port).await;

    let copies: Vec<_> = expected.iter().map(|id| message(id)).collect();
    broker.publish_all(&setup.queue, &copies).await;
    setup
        .wait_settled(proxy.port, (messages.len() + copies.len()) as u64, LONG)
        .await;

    let label = "redis full (noeviction) for 3 leases";
    let t = finish(&broker, &setup, vec![proxy], &expected, label).await;
    redis.remove().await;
    println!(
        "FAULT-FIGURES redis full: store_errors={} second copies dropped={}",
        t.store_errors, t.dropped
    );
    assert_clean(&t, 0);
    assert_eq!(t.dropped, copies.len() as f64, "every second copy dropped");
    assert!(t.store_errors > 0.0, "the refused writes were noticed");
    broker.cleanup().await;
}

/// A downstream queue that is full with `x-overflow = reject-publish` nacks every publish:
/// the proxy backs off instead of spinning (requeue, redeliver, publish, nack, at once, in a
/// loop), counts the nacks, writes a handful of log lines, counts no takeover (a nacked
/// publish certainly did not arrive), and loses nothing once the queue has room again.
#[tokio::test]
async fn downstream_that_keeps_nacking_is_backed_off() {
    let _serial = SERIAL.lock().await;
    let setup = Setup::new("nacking");
    let mut broker = Broker::connect().await;
    broker.queue_with_dlq(&setup.queue).await;
    let mut full = FieldTable::default();
    full.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(10));
    full.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    broker.queue(&setup.out, full).await;
    let (messages, expected) = workload(90, 0.0);
    broker.publish_all(&setup.queue, &messages).await;
    let toml = setup
        .toml()
        .replace("backoff_max = \"500ms\"", "backoff_max = \"2s\"");
    let path = write_config(&setup, "", &toml);
    let proxy = Child::start(&["run", "-c", &path]).await;
    let port = proxy.port;

    wait_for("publishes nacked", LONG, || async {
        let nacked = setup.metric(port, "dedupd_publishes_nacked_total").await;
        let consumed = setup.metric(port, "dedupd_messages_consumed_total").await;
        (nacked > 0.0 || consumed > 1000.0).then_some(())
    })
    .await;
    let before = setup.metric(port, "dedupd_messages_consumed_total").await;
    // The fault itself lasts five seconds: how many redeliveries it causes meanwhile is the
    // measure (a spinning proxy redelivers thousands per second).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let redelivered = setup.metric(port, "dedupd_messages_consumed_total").await - before;
    let nacked = setup.metric(port, "dedupd_publishes_nacked_total").await;
    let takeovers = setup.metric(port, "dedupd_takeovers_total").await;

    let got = broker.receive(&setup.out, messages.len(), LONG).await;
    wait_drained(&broker, &setup, port).await;
    let logged = proxy.stop().await;
    let nack_lines = logged.lines().filter(|l| l.contains("nacked")).count();

    let ids: Vec<String> = got
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(|s| s.to_string()))
        .collect();
    let unique: HashSet<String> = ids.iter().cloned().collect();
    println!(
        "FAULT-FIGURES downstream nacking: {redelivered} deliveries in 5 s, {nacked} nacks counted, takeovers={takeovers}, {nack_lines} log lines; then {} arrived, {} distinct",
        ids.len(),
        unique.len()
    );
    assert!(nacked > 0.0, "nacks counted");
    assert!(
        redelivered < 1000.0,
        "{redelivered} deliveries in 5 s: spinning"
    );
    assert_eq!(takeovers, 0.0, "a nacked publish is no possible duplicate");
    assert!(nack_lines <= 3, "{nack_lines} log lines about nacks");
    assert_eq!(unique, expected, "every message arrives");
    assert_eq!(ids.len(), unique.len(), "and once");
    assert_eq!(broker.ready(&setup.queue).await, 0);
    assert_eq!(broker.ready(&format!("{}.dlq", setup.queue)).await, 0);
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

/// A store that may evict keys (`maxmemory-policy allkeys-lru`) would forget keys without a
/// word, and their next copies would be forwarded: the proxy refuses to consume from it, says
/// why, and reads not ready; once the policy is `noeviction` it starts on its own.
#[tokio::test]
async fn evicting_store_is_refused_until_fixed() {
    let _serial = SERIAL.lock().await;
    let redis = OwnRedis::run(true).await;
    assert!(
        redis
            .cmd(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
            .await
    );
    let setup = Setup::new("evicting");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(500, 0.3);
    broker.publish_all(&setup.queue, &messages).await;
    let path = write_config(&setup, "", &setup.toml().replace(REDIS_URL, &redis.url()));
    let proxy = Child::start(&["run", "-c", &path]).await;

    wait_for("the refusal logged", LONG, || async {
        proxy.log().contains("allkeys-lru").then_some(())
    })
    .await;
    let ready = status(proxy.port, "/readyz").await;
    assert_eq!(ready, Some(503), "not ready with an evicting store");
    assert_eq!(
        broker.ready(&setup.queue).await,
        messages.len() as u32,
        "nothing consumed"
    );

    assert!(
        redis
            .cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
            .await
    );
    wait_for("the log to say how to fix it", LONG, || async {
        proxy
            .log()
            .contains("maxmemory-policy noeviction")
            .then_some(())
    })
    .await;

    let t = finish(
        &broker,
        &setup,
        vec![proxy],
        &expected,
        "evicting store refused",
    )
    .await;
    redis.remove().await;
    assert_clean(&t, 0);
    broker.cleanup().await;
}
