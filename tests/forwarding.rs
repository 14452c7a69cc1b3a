//! End-to-end forwarding against the real RabbitMQ and Redis, the proxy running in-process
//! through `dedupd::run`: first-seen order, transparency, key kinds, policies, observe mode,
//! restarts, and duplicates that arrive while their first copy is in flight.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable};
use lapin::BasicProperties;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const SETTLE: Duration = Duration::from_secs(60);

/// Headers with every field type RabbitMQ carries, nested tables and arrays included.
fn every_header_type(n: usize) -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongString("deep".into()));
    nested.insert("n".into(), AMQPValue::LongLongInt(-(n as i64)));
    let mut h = FieldTable::default();
    h.insert("bool".into(), AMQPValue::Boolean(n.is_multiple_of(2)));
    h.insert("i8".into(), AMQPValue::ShortShortInt(-8));
    h.insert("u8".into(), AMQPValue::ShortShortUInt(8));
    h.insert("i16".into(), AMQPValue::ShortInt(-1600));
    h.insert("u16".into(), AMQPValue::ShortUInt(1600));
    h.insert("i32".into(), AMQPValue::LongInt(-320_000));
    h.insert("u32".into(), AMQPValue::LongUInt(320_000));
    h.insert(
        "i64".into(),
        AMQPValue::LongLongInt(n as i64 * 1_000_000_007),
    );
    h.insert("f32".into(), AMQPValue::Float(1.5));
    h.insert("f64".into(), AMQPValue::Double(-2.25e100));
    h.insert(
        "decimal".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 12345,
        }),
    );
    h.insert(
        "text".into(),
        AMQPValue::LongString(format!("héllo {n}").into()),
    );
    h.insert(
        "array".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongInt(1),
            AMQPValue::LongString("two".into()),
            AMQPValue::FieldTable(nested.clone()),
        ])),
    );
    h.insert("ts".into(), AMQPValue::Timestamp(1_700_000_000 + n as u64));
    h.insert("table".into(), AMQPValue::FieldTable(nested));
    h.insert(
        "bytes".into(),
        AMQPValue::ByteArray(ByteArray::from(vec![0u8, 255, 7])),
    );
    h.insert("void".into(), AMQPValue::Void);
    h
}

fn full_properties(id: &str, n: usize) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(id.into())
        .with_correlation_id(format!("corr-{n}").into())
        .with_reply_to("replies".into())
        .with_expiration("3600000".into())
        .with_timestamp(1_700_000_000 + n as u64)
        .with_type("order.created".into())
        .with_app_id("shop".into())
        .with_priority((n % 10) as u8)
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_content_encoding("identity".into())
        .with_user_id("guest".into())
        .with_headers(every_header_type(n))
}

#[tokio::test]
async fn forwards_first_seen_in_order_with_30pct_duplicates() {
    let setup = Setup::new("order");
    let mut broker = Broker::connect().await;
    let dlq = setup.declare(&mut broker).await;

    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let unique_ids: Vec<String> = (0..2100).map(|i| format!("order-{i}")).collect();
    let mut ids: Vec<&String> = unique_ids.iter().collect();
    ids.extend((0..900).map(|_| &unique_ids[rng.random_range(0..unique_ids.len())]));
    ids.shuffle(&mut rng);

    let messages: Vec<(Vec<u8>, BasicProperties)> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            (
                format!("{{\"id\":\"{id}\",\"copy\":{n}}}").into_bytes(),
                full_properties(id, n),
            )
        })
        .collect();
    let mut seen = HashSet::new();
    let expected: Vec<&(Vec<u8>, BasicProperties)> = messages
        .iter()
        .zip(&ids)
        .filter(|(_, id)| seen.insert(id.as_str()))
        .map(|(m, _)| m)
        .collect();
    assert_eq!(expected.len(), 2100);

    broker.publish_all(&setup.queue, &messages).await;
    let proxy = InProcess::start(setup.config());
    setup.wait_settled(proxy.port, 3000, SETTLE).await;

    let got = broker.drain(&setup.out).await;
    assert_eq!(got.len(), expected.len(), "forwarded count");
    for (i, (got, (body, props))) in got.iter().zip(expected).enumerate() {
        assert_eq!(&got.data, body, "message {i}: body or order differs");
        assert_eq!(&got.properties, props, "message {i}: properties differ");
    }
    assert_eq!(
        setup
            .metric(proxy.port, "dedupd_messages_consumed_total")
            .await,
        3000.0
    );
    assert_eq!(
        setup
            .metric(proxy.port, "dedupd_messages_forwarded_total")
            .await,
        2100.0
    );
    assert_eq!(
        setup.metric(proxy.port, "dedupd_duplicates_total").await,
        900.0
    );
    assert_eq!(broker.ready(&setup.queue).await, 0, "left upstream");
    assert_eq!(broker.ready(&dlq).await, 0, "dead-lettered");

    proxy.stop().await;
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

/// Publishes the messages, runs the proxy until they are settled, and returns the bodies
/// forwarded (the proxy still running, for metric checks).
async fn forwarded_bodies(
    setup: &Setup,
    messages: Vec<(Vec<u8>, BasicProperties)>,
) -> (Vec<String>, Broker, String, InProcess) {
    let mut broker = Broker::connect().await;
    let dlq = setup.declare(&mut broker).await;
    let n = messages.len() as u64;
    broker.publish_all(&setup.queue, &messages).await;
    let proxy = InProcess::start(setup.config());
    setup.wait_settled(proxy.port, n, SETTLE).await;
    let bodies = broker
        .drain(&setup.out)
        .await
        .into_iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    (bodies, broker, dlq, proxy)
}

async fn finish(setup: &Setup, broker: Broker, proxy: InProcess) {
    proxy.stop().await;
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

#[tokio::test]
async fn key_from_header_of_any_type() {
    let mut setup = Setup::new("hdr");
    setup.key = "header:x-id".into();
    setup.store_kind = "memory";
    let with = |v: AMQPValue, body: &str| {
        let mut h = FieldTable::default();
        h.insert("x-id".into(), v);
        (
            body.as_bytes().to_vec(),
            BasicProperties::default().with_headers(h),
        )
    };
    let messages = vec![
        with(AMQPValue::LongString("7".into()), "a"),
        with(AMQPValue::LongInt(7), "b"), // same digits, other type: another key
        with(AMQPValue::LongString("7".into()), "c"), // duplicate of a
        with(AMQPValue::LongInt(7), "d"), // duplicate of b
        with(
            AMQPValue::FieldArray(vec![AMQPValue::Boolean(true)].into()),
            "e",
        ),
        with(
            AMQPValue::FieldArray(vec![AMQPValue::Boolean(true)].into()),
            "f",
        ),
    ];
    let (bodies, broker, _, proxy) = forwarded_bodies(&setup, messages).await;
    assert_eq!(bodies, ["a", "b", "e"]);
    assert_eq!(
        setup.metric(proxy.port, "dedupd_duplicates_total").await,
        3.0
    );
    finish(&setup, broker, proxy).await;
}

#[tokio::test]
async fn key_from_body_hash() {
    let mut setup = Setup::new("body");
    setup.key = "body".into();
    let messages = ["x", "y", "x", "z", "y"]
        .iter()
        .map(|b| (b.as_bytes().to_vec(), BasicProperties::default()))
        .collect();
    let (bodies, broker, _, proxy) = forwarded_bodies(&setup, messages).await;
    assert_eq!(bodies, ["x", "y", "z"]);
    finish(&setup, broker, proxy).await;
}

#[tokio::test]
async fn key_from_json_pointer_and_malformed_json_is_rejected() {
    let mut setup = Setup::new("json");
    setup.key = "json:/order/id".into();
    let messages = [
        r#"{"order":{"id":"A1"},"v":1}"#,
        r#"{"order":{"id":"A2"}}"#,
        r#"{"v":2,"order":{"id":"A1"}}"#, // duplicate of the first, other bytes
        r#"{"order":{"id":42}}"#,
        r#"{"order":{"id":42},"again":true}"#,
        "not json",
        r#"{"order":{}}"#,
    ]
    .iter()
    .map(|b| (b.as_bytes().to_vec(), BasicProperties::default()))
    .collect();
    let (bodies, broker, dlq, proxy) = forwarded_bodies(&setup, messages).await;
    assert_eq!(
        bodies,
        [
            r#"{"order":{"id":"A1"},"v":1}"#,
            r#"{"order":{"id":"A2"}}"#,
            r#"{"order":{"id":42}}"#
        ]
    );
    let dead: Vec<_> = broker
        .drain(&dlq)
        .await
        .into_iter()
        .map(|d| d.data)
        .collect();
    assert_eq!(dead, [b"not json".to_vec(), br#"{"order":{}}"#.to_vec()]);
    let rejected = metric(
        proxy.port,
        "dedupd_messages_rejected_total",
        &[("route", &setup.name), ("reason", "missing_key")],
    )
    .await;
    assert_eq!(rejected, 2.0);
    finish(&setup, broker, proxy).await;
}

fn with_id(id: Option<&str>, body: &str) -> (Vec<u8>, BasicProperties) {
    let props = match id {
        Some(id) => BasicProperties::default().with_message_id(id.into()),
        None => BasicProperties::default(),
    };
    (body.as_bytes().to_vec(), props)
}

#[tokio::test]
async fn missing_key_reject_goes_to_the_dead_letter_queue() {
    let setup = Setup::new("rej");
    let messages = vec![
        with_id(Some("1"), "a"),
        with_id(None, "b"),
        with_id(Some("2"), "c"),
    ];
    let (bodies, broker, dlq, proxy) = forwarded_bodies(&setup, messages).await;
    assert_eq!(bodies, ["a", "c"]);
    let dead: Vec<_> = broker
        .drain(&dlq)
        .await
        .into_iter()
        .map(|d| d.data)
        .collect();
    assert_eq!(dead, [b"b".to_vec()]);
    assert_eq!(broker.ready(&setup.queue).await, 0);
    finish(&setup, broker, proxy).await;
}

#[tokio::test]
async fn missing_key_forward_forwards_every_copy() {
    let mut setup = Setup::new("fwd");
    setup.on_missing_key = "forward";
    let messages = vec![
        with_id(None, "a"),
        with_id(None, "a"),
        with_id(Some("1"), "b"),
        with_id(Some("1"), "c"),
    ];
    let (bodies, broker, dlq, proxy) = forwarded_bodies(&setup, messages).await;
    assert_eq!(bodies, ["a", "a", "b"]);
    assert_eq!(broker.ready(&dlq).await, 0);
    finish(&setup, broker, proxy).await;
}

#[tokio::test]
async fn missing_key_hash_body_dedups_by_body() {
    let mut setup = Setup::new("hashbody");
    setup.on_missing_key = "hash_body";
    let messages = vec![
        with_id(None, "a"),
        with_id(None, "a"),
        with_id(None, "b"),
        with_id(Some("1"), "a"),
    ];
    let (bodies, broker, _, proxy) = forwarded_bodies(&setup, messages).await;
    assert_eq!(
        bodies,
        ["a", "b", "a"],
        "the message_id one has its own key"
    );
    finish(&setup, broker, proxy).await;
}

#[tokio::test]
async fn observe_mode_forwards_everything_and_counts_duplicates() {
    let mut setup = Setup::new("observe");
    setup.mode = "observe";
    let messages: Vec<_> = ["1", "2", "1", "3", "1"]
        .iter()
        .enumerate()
        .map(|(n, id)| with_id(Some(id), &n.to_string()))
        .collect();
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    broker.publish_all(&setup.queue, &messages).await;
    let proxy = InProcess::start(setup.config());
    setup.wait_settled(proxy.port, 5, SETTLE).await;
    assert_eq!(
        setup.metric(proxy.port, "dedupd_duplicates_total").await,
        2.0
    );
    assert_eq!(
        setup
            .metric(proxy.port, "dedupd_messages_forwarded_total")
            .await,
        5.0
    );
    let bodies: Vec<_> = broker
        .drain(&setup.out)
        .await
        .into_iter()
        .map(|d| d.data)
        .collect();
    assert_eq!(bodies, [b"0", b"1", b"2", b"3", b"4"]);
    finish(&setup, broker, proxy).await;
}

#[tokio::test]
async fn a_restarted_proxy_still_drops_keys_it_forwarded() {
    let setup = Setup::new("restart");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;

    broker
        .publish_all(
            &setup.queue,
            &[with_id(Some("a"), "a1"), with_id(Some("b"), "b1")],
        )
        .await;
    let proxy = InProcess::start(setup.config());
    setup.wait_settled(proxy.port, 2, SETTLE).await;
    proxy.stop().await;

    broker
        .publish_all(
            &setup.queue,
            &[
                with_id(Some("a"), "a2"),
                with_id(Some("c"), "c1"),
                with_id(Some("b"), "b2"),
            ],
        )
        .await;
    let proxy = InProcess::start(setup.config());
    // Counters are process-wide: the second run continues from 2.
    setup.wait_settled(proxy.port, 5, SETTLE).await;

    let bodies: Vec<_> = broker
        .drain(&setup.out)
        .await
        .into_iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    assert_eq!(bodies, ["a1", "b1", "c1"]);
    finish(&setup, broker, proxy).await;
}

/// Longer than any test: the other instance's claims never lapse by themselves.
const LONG_LEASE: Duration = Duration::from_secs(60);

/// Another dedupd instance on the same store, as far as the store can tell.
async fn other_instance(setup: &Setup) -> (dedupd::store::Store, dedupd::store::Owner) {
    let store = dedupd::store::Store::open(&setup.config().store)
        .await
        .expect("store");
    (store, dedupd::store::Owner::new("other-instance".into(), 1))
}

/// Another instance holds the key in flight: the copy here waits, unacked, then follows the
/// first copy's fate.
#[tokio::test]
async fn duplicate_of_a_message_in_flight_elsewhere_is_held_then_dropped_or_forwarded() {
    let setup = Setup::new("held");
    let mut broker = Broker::connect().await;
    let dlq = setup.declare(&mut broker).await;
    let key = |id: &str| dedupd::keys::store_key(&setup.name, &setup.name, id.as_bytes());
    let (other, other_owner) = other_instance(&setup).await;

    // "done-later" will be committed by the other owner, "released-later" released by it.
    other
        .claim(
            &[key("done-later"), key("released-later")],
            &[],
            &other_owner,
            LONG_LEASE,
            None,
        )
        .await
        .expect("the other instance claims");
    let proxy = InProcess::start(setup.config());
    broker
        .publish_all(
            &setup.queue,
            &[
                with_id(Some("done-later"), "d"),
                with_id(Some("released-later"), "r"),
                with_id(Some("free"), "f"),
            ],
        )
        .await;

    // "free" goes through; the two held ones stay unacked and unforwarded.
    let first = broker.receive(&setup.out, 1, SETTLE).await;
    assert_eq!(first[0].data, b"f");
    wait_for("two deliveries held", SETTLE, || async {
        let consumed = setup
            .metric(proxy.port, "dedupd_messages_consumed_total")
            .await;
        let inflight = setup.metric(proxy.port, "dedupd_inflight_messages").await;
        (consumed == 3.0 && inflight == 2.0).then_some(())
    })
    .await;
    assert_eq!(broker.ready(&setup.out).await, 0);
    assert_eq!(broker.ready(&setup.queue).await, 0, "held, not requeued");

    // The other instance's first copy of "done-later" is confirmed: ours is a duplicate.
    other
        .commit(
            &[key("done-later")],
            &[],
            &other_owner,
            Duration::from_secs(60),
        )
        .await
        .expect("the other instance commits");
    wait_for("held duplicate acked", SETTLE, || async {
        (setup.metric(proxy.port, "dedupd_duplicates_total").await == 1.0).then_some(())
    })
    .await;

    // The other instance's first copy of "released-later" failed: ours is forwarded.
    other
        .release(&[key("released-later")], &other_owner)
        .await
        .expect("the other instance releases");
    let second = broker.receive(&setup.out, 1, SETTLE).await;
    assert_eq!(second[0].data, b"r");
    setup.wait_settled(proxy.port, 3, SETTLE).await;

    assert_eq!(broker.ready(&setup.out).await, 0, "nothing forwarded twice");
    assert_eq!(broker.ready(&setup.queue).await, 0);
    assert_eq!(broker.ready(&dlq).await, 0);
    finish(&setup, broker, proxy).await;
}

/// The same pipeline over a Redis Cluster store (`scripts/test.sh` starts one).
#[tokio::test]
async fn forwards_through_a_redis_cluster_store() {
    let Ok(urls) = std::env::var("DEDUPD_TEST_REDIS_CLUSTER") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "DEDUPD_TEST_REDIS_CLUSTER is not set: run the tests with scripts/test.sh"
        );
        eprintln!("SKIPPED: set DEDUPD_TEST_REDIS_CLUSTER to run against a Redis Cluster");
        return;
    };
    let setup = Setup::new("cluster");
    let list: Vec<String> = urls
        .split(',')
        .map(|u| format!("\"{}\"", u.trim()))
        .collect();
    let toml = setup.toml().replace(
        &format!("url = \"{REDIS_URL}\""),
        &format!("url = [{}]", list.join(", ")),
    );
    let config = dedupd::config::Config::from_toml(&toml, std::path::Path::new("cluster.toml"))
        .expect("cluster config");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let messages: Vec<_> = (0..600)
        .map(|i| with_id(Some(&format!("k{}", i % 400)), &i.to_string()))
        .collect();
    broker.publish_all(&setup.queue, &messages).await;
    let proxy = InProcess::start(config);
    setup.wait_settled(proxy.port, 600, SETTLE).await;
    let bodies: Vec<String> = broker
        .drain(&setup.out)
        .await
        .into_iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    let expected: Vec<String> = (0..400).map(|i| i.to_string()).collect();
    assert_eq!(bodies, expected);
    assert_eq!(
        setup.metric(proxy.port, "dedupd_duplicates_total").await,
        200.0
    );
    proxy.stop().await;
    broker.cleanup().await;
    cluster_cleanup(
        urls.split(',').next().unwrap_or_default().trim(),
        &setup.name,
    )
    .await;
}

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let setup = Setup::new("endpoints");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    broker
        .publish_all(
            &setup.queue,
            &[with_id(Some("1"), "a"), with_id(Some("1"), "b")],
        )
        .await;
    let proxy = InProcess::start(setup.config());
    setup.wait_settled(proxy.port, 2, SETTLE).await;
    let port = proxy.port;
    wait_for("ready", SETTLE, || async {
        (http_get(port, "/readyz").await.map(|(s, _)| s) == Some(200)).then_some(())
    })
    .await;
    assert_eq!(http_get(port, "/healthz").await.map(|(s, _)| s), Some(200));
    let (status, body) = http_get(port, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    for name in [
        "dedupd_messages_consumed_total",
        "dedupd_messages_forwarded_total",
        "dedupd_duplicates_total",
        "dedupd_messages_rejected_total",
        "dedupd_takeovers_total",
        "dedupd_store_errors_total",
        "dedupd_store_duration_seconds_bucket",
        "dedupd_forward_duration_seconds_bucket",
        "dedupd_inflight_messages",
        "dedupd_up",
        "dedupd_build_info",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}");
    }
    assert!(!body.contains("message_id"), "no ids in labels");
    // `dedupd_up` has no route label, and the other in-process proxies of this test binary
    // write the same gauges (a proxy stopping sets them to 0): poll until a scrape shows all up.
    wait_for("every component up in /metrics", SETTLE, || async {
        let (_, body) = http_get(port, "/metrics").await?;
        ["upstream", "downstream", "store"]
            .iter()
            .all(|c| parse_metric(&body, "dedupd_up", &[("component", c)]) == Some(1.0))
            .then_some(())
    })
    .await;
    proxy.stop().await;
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

/// Holding a duplicate must not burn a quorum queue's delivery limit: the held delivery stays
/// unacked and is rechecked in the store, never requeued in a loop.
#[tokio::test]
async fn holding_does_not_burn_a_quorum_queue_delivery_limit() {
    let mut setup = Setup::new("quorum");
    setup.queue = format!("{}.qq", setup.name);
    let mut broker = Broker::connect().await;
    broker.queue(&setup.out, FieldTable::default()).await;
    let dlq = format!("{}.dlq", setup.queue);
    broker.queue(&dlq, FieldTable::default()).await;
    let mut args = dedupd::amqp::dead_letter_to(&dlq);
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(1));
    broker.queue(&setup.queue, args).await;
    let key = dedupd::keys::store_key(&setup.name, &setup.name, b"held");
    let (other, other_owner) = other_instance(&setup).await;
    other
        .claim(
            std::slice::from_ref(&key),
            &[],
            &other_owner,
            LONG_LEASE,
            None,
        )
        .await
        .expect("the other instance claims");

    let proxy = InProcess::start(setup.config());
    broker
        .publish_all(&setup.queue, &[with_id(Some("held"), "h")])
        .await;
    // Held through many rechecks (50 ms doubling to 1 s): about ten over three seconds.
    wait_for("the delivery held", SETTLE, || async {
        (setup.metric(proxy.port, "dedupd_inflight_messages").await == 1.0).then_some(())
    })
    .await;
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < watch_until {
        assert_eq!(
            broker.ready(&dlq).await,
            0,
            "dead-lettered by the delivery limit"
        );
        assert_eq!(
            setup.metric(proxy.port, "dedupd_inflight_messages").await,
            1.0,
            "still held"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    other
        .release(std::slice::from_ref(&key), &other_owner)
        .await
        .expect("the other instance releases");
    let got = broker.receive(&setup.out, 1, SETTLE).await;
    assert_eq!(got[0].data, b"h");
    setup.wait_settled(proxy.port, 1, SETTLE).await;
    assert_eq!(broker.ready(&dlq).await, 0);
    finish(&setup, broker, proxy).await;
}
