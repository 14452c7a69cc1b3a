//! Per-route dedup policies end to end, against the real RabbitMQ and each store kind (memory,
//! Redis, PostgreSQL, embedded), the proxy in-process through `dedupd::run_on`: conflicts
//! (same key, another body) under each `on_conflict`, the `duplicates_exchange` audit copies
//! and their headers, `stamp_header` on forwarded copies, and sliding windows. Each case is
//! written once over a [`Kind`]; `kinds!` generates a `#[tokio::test]` per store kind.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};

const SETTLE: Duration = Duration::from_secs(60);
const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    Redis,
    Postgres,
    Embedded,
}

/// One route of the test, on the store of `kind`, with an audit exchange `{name}.audit`
/// (fanout) bound to the queue `{name}.audited` when the test asks for one.
struct Route {
    setup: Setup,
    kind: Kind,
    /// The embedded store's directory.
    dir: PathBuf,
}

impl Route {
    fn new(test: &str, kind: Kind) -> Route {
        let mut setup = Setup::new(test);
        setup.store_kind = match kind {
            Kind::Memory => "memory",
            Kind::Redis => "redis",
            Kind::Postgres => "postgres",
            Kind::Embedded => "embedded",
        };
        let dir = std::env::temp_dir().join(format!("{}-store", setup.name));
        Route { setup, kind, dir }
    }

    fn audit_exchange(&self) -> String {
        format!("{}.audit", self.setup.name)
    }

    fn audit_queue(&self) -> String {
        format!("{}.audited", self.setup.name)
    }

    fn config(&self) -> dedupd::config::Config {
        let toml = self.setup.toml();
        let toml = match self.kind {
            Kind::Postgres => toml.replace(REDIS_URL, POSTGRES_URL),
            Kind::Embedded => toml.replace(
                "[store]\n",
                &format!("[store]\npath = {:?}\n", self.dir.display().to_string()),
            ),
            Kind::Memory | Kind::Redis => toml,
        };
        dedupd::config::Config::from_toml(&toml, std::path::Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("test config: {e}\n{toml}"))
    }

    /// Declares the route's queues, and the audit exchange and its queue.
    async fn declare(&self, broker: &mut Broker, audit: bool) -> String {
        let dlq = self.setup.declare(broker).await;
        if audit {
            self.declare_audit(broker).await;
        }
        dlq
    }

    async fn declare_audit(&self, broker: &mut Broker) {
        let exchange = self.audit_exchange();
        let queue = self.audit_queue();
        broker
            .ch
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the audit exchange");
        broker.queue(&queue, FieldTable::default()).await;
        broker
            .ch
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the audit queue");
    }

    async fn metric(&self, proxy: &InProcess, name: &str) -> f64 {
        self.setup.metric(proxy.port, name).await
    }

    /// Stops the proxy and removes the queues, the audit exchange and the store's keys.
    async fn finish(&self, broker: Broker, proxy: InProcess) {
        proxy.stop().await;
        let _ = broker
            .ch
            .exchange_delete(
                self.audit_exchange().as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        broker.cleanup().await;
        match self.kind {
            Kind::Memory => {}
            Kind::Redis => redis_cleanup(&self.setup.name).await,
            Kind::Postgres => {
                let (client, conn) = tokio_postgres::connect(POSTGRES_URL, tokio_postgres::NoTls)
                    .await
                    .expect("PostgreSQL on 127.0.0.1:5432");
                tokio::spawn(conn);
                let table = dedupd::store::postgres_table_name(&self.setup.name);
                client
                    .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
                    .await
                    .expect("drop the test's table");
            }
            Kind::Embedded => {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }
    }
}

fn message(id: &str, body: &str) -> (Vec<u8>, BasicProperties) {
    let mut headers = FieldTable::default();
    headers.insert("n".into(), AMQPValue::LongInt(7));
    headers.insert("text".into(), AMQPValue::LongString(body.into()));
    let props = BasicProperties::default()
        .with_message_id(id.into())
        .with_correlation_id(format!("corr-{body}").into())
        .with_content_type("text/plain".into())
        .with_delivery_mode(2)
        .with_priority(3)
        .with_headers(headers);
    (body.as_bytes().to_vec(), props)
}

/// `props` with a string header added, as dedupd adds it.
fn with_header(props: &BasicProperties, name: &str, value: &str) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(name.into(), AMQPValue::LongString(value.into()));
    props.clone().with_headers(headers)
}

fn header(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    match d.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => panic!("{name}: {other:?}"),
    }
}

fn body(d: &lapin::message::Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

// ---- the cases -----------------------------------------------------------------------------

/// `on_conflict = "drop"` (the default) with an audit exchange and a stamp header: the first
/// copy of each key is forwarded, stamped with its key (the id, or `#` and a hash for a long
/// one); every dropped copy reaches the audit exchange unchanged plus the route and the reason,
/// a conflict is counted as one, and nothing is left upstream or dead-lettered.
async fn conflicts_dropped_and_audited_copies_stamped(kind: Kind) {
    let mut route = Route::new("audit", kind);
    route.setup.extra = format!(
        "duplicates_exchange = {:?}\nstamp_header = \"x-dedup-key\"",
        route.audit_exchange()
    );
    let mut broker = Broker::connect().await;
    let dlq = route.declare(&mut broker, true).await;
    let long_id = "l".repeat(100);
    let messages = vec![
        message("a", "a-1"),
        message("a", "a-1"), // duplicate
        message("a", "a-2"), // conflict
        message("b", "b-1"),
        message(&long_id, "l-1"),
        message("b", "b-1"),      // duplicate
        message(&long_id, "l-2"), // conflict
    ];
    broker.publish_all(&route.setup.queue, &messages).await;
    let proxy = InProcess::start(route.config());
    route.setup.wait_settled(proxy.port, 7, SETTLE).await;

    let forwarded = broker.receive(&route.setup.out, 3, SETTLE).await;
    let bodies: Vec<String> = forwarded.iter().map(body).collect();
    assert_eq!(bodies, ["a-1", "b-1", "l-1"]);
    let stamps: Vec<String> = forwarded
        .iter()
        .map(|d| header(d, "x-dedup-key").expect("stamped"))
        .collect();
    assert_eq!(stamps[..2], ["a", "b"]);
    assert!(
        stamps[2].starts_with('#') && stamps[2].len() == 33,
        "a long id is stamped as its hash: {}",
        stamps[2]
    );
    // Nothing else of the copy changed.
    assert_eq!(
        forwarded[0].properties,
        with_header(&messages[0].1, "x-dedup-key", "a")
    );

    let audited = broker.receive(&route.audit_queue(), 4, SETTLE).await;
    let mut seen: Vec<(String, String, String)> = audited
        .iter()
        .map(|d| {
            assert_eq!(
                header(d, "x-dedupd-route").as_deref(),
                Some(route.setup.name.as_str())
            );
            assert_eq!(
                header(d, "x-dedup-key"),
                None,
                "audit copies are not stamped"
            );
            let reason = header(d, "x-dedupd-reason").expect("reason");
            let id = d.properties.message_id().clone().expect("id").to_string();
            (id, body(d), reason)
        })
        .collect();
    seen.sort();
    let mut expected = vec![
        ("a".to_owned(), "a-1".to_owned(), "duplicate".to_owned()),
        ("a".to_owned(), "a-2".to_owned(), "conflict".to_owned()),
        ("b".to_owned(), "b-1".to_owned(), "duplicate".to_owned()),
        (long_id.clone(), "l-2".to_owned(), "conflict".to_owned()),
    ];
    expected.sort();
    assert_eq!(seen, expected);
    // Body and every property arrive unchanged, plus the two headers.
    let conflict = audited.iter().find(|d| body(d) == "a-2").expect("a-2");
    let props = with_header(&messages[2].1, "x-dedupd-route", &route.setup.name);
    assert_eq!(
        conflict.properties,
        with_header(&props, "x-dedupd-reason", "conflict")
    );

    assert_eq!(route.metric(&proxy, "dedupd_conflicts_total").await, 2.0);
    assert_eq!(route.metric(&proxy, "dedupd_duplicates_total").await, 4.0);
    assert_eq!(
        route
            .metric(&proxy, "dedupd_duplicates_audited_total")
            .await,
        4.0
    );
    assert_eq!(
        route
            .metric(&proxy, "dedupd_messages_forwarded_total")
            .await,
        3.0
    );
    assert_eq!(broker.ready(&route.setup.queue).await, 0, "left upstream");
    assert_eq!(broker.ready(&dlq).await, 0, "dead-lettered");
    route.finish(broker, proxy).await;
}

/// `on_conflict = "forward"`: a conflicting copy is another message and is forwarded (not
/// stamped differently, not remembered); a repeat of the first body is still a duplicate.
async fn conflicts_forwarded(kind: Kind) {
    let mut route = Route::new("cfwd", kind);
    route.setup.extra = "on_conflict = \"forward\"".into();
    let mut broker = Broker::connect().await;
    let dlq = route.declare(&mut broker, false).await;
    let messages = vec![
        message("a", "a-1"),
        message("a", "a-2"),
        message("a", "a-1"),
        message("b", "b-1"),
    ];
    broker.publish_all(&route.setup.queue, &messages).await;
    let proxy = InProcess::start(route.config());
    route.setup.wait_settled(proxy.port, 4, SETTLE).await;
    // A conflicting copy that arrives while the first copy of its key is in flight is held
    // until that one settles, so it may go out after the copies behind it.
    let mut bodies: Vec<String> = broker
        .drain(&route.setup.out)
        .await
        .iter()
        .map(body)
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["a-1", "a-2", "b-1"]);
    assert_eq!(route.metric(&proxy, "dedupd_conflicts_total").await, 1.0);
    assert_eq!(route.metric(&proxy, "dedupd_duplicates_total").await, 1.0);
    assert_eq!(broker.ready(&dlq).await, 0, "dead-lettered");
    route.finish(broker, proxy).await;
}

/// `on_conflict = "reject"`: a conflicting copy goes to the queue's dead-letter exchange,
/// counted as a conflict and as rejected with reason `conflict`.
async fn conflicts_rejected(kind: Kind) {
    let mut route = Route::new("crej", kind);
    route.setup.extra = "on_conflict = \"reject\"".into();
    let mut broker = Broker::connect().await;
    let dlq = route.declare(&mut broker, false).await;
    let messages = vec![
        message("a", "a-1"),
        message("a", "a-2"),
        message("a", "a-1"),
    ];
    broker.publish_all(&route.setup.queue, &messages).await;
    let proxy = InProcess::start(route.config());
    route.setup.wait_settled(proxy.port, 3, SETTLE).await;
    let bodies: Vec<String> = broker
        .drain(&route.setup.out)
        .await
        .iter()
        .map(body)
        .collect();
    assert_eq!(bodies, ["a-1"]);
    let dead: Vec<String> = broker
        .receive(&dlq, 1, SETTLE)
        .await
        .iter()
        .map(body)
        .collect();
    assert_eq!(dead, ["a-2"]);
    assert_eq!(route.metric(&proxy, "dedupd_conflicts_total").await, 1.0);
    assert_eq!(route.metric(&proxy, "dedupd_duplicates_total").await, 1.0);
    let rejected = metric(
        proxy.port,
        "dedupd_messages_rejected_total",
        &[("route", &route.setup.name), ("reason", "conflict")],
    )
    .await;
    assert_eq!(rejected, 1.0);
    route.finish(broker, proxy).await;
}

/// `window_mode = "sliding"`: copies that keep coming keep their key remembered past its
/// window; once they stop for a window, the next copy is forwarded again.
async fn sliding_window_keeps_repeated_keys(kind: Kind) {
    let mut route = Route::new("slide", kind);
    route.setup.window = "2s";
    route.setup.extra = "window_mode = \"sliding\"".into();
    let mut broker = Broker::connect().await;
    route.declare(&mut broker, false).await;
    let proxy = InProcess::start(route.config());
    let consumed = |n: u64| {
        let route = &route;
        let proxy = &proxy;
        async move {
            wait_for(&format!("{n} consumed and settled"), SETTLE, || async {
                let consumed = route.metric(proxy, "dedupd_messages_consumed_total").await;
                let inflight = route.metric(proxy, "dedupd_inflight_messages").await;
                (consumed as u64 >= n && inflight == 0.0).then_some(())
            })
            .await
        }
    };
    // Every copy has the same body: a conflict would not restart the window.
    let (copy, props) = message("k", "k");
    broker
        .publish(&route.setup.queue, &copy, props.clone())
        .await;
    consumed(1).await;
    // A copy every 400 ms for 5 s: two and a half windows, each copy well inside the window
    // the one before it restarted.
    let started = Instant::now();
    let mut sent = 1;
    while started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(400)).await;
        broker
            .publish(&route.setup.queue, &copy, props.clone())
            .await;
        sent += 1;
        consumed(sent).await;
    }
    assert_eq!(
        route
            .metric(&proxy, "dedupd_messages_forwarded_total")
            .await,
        1.0,
        "a repeated key was forgotten while copies kept coming"
    );
    assert_eq!(
        route.metric(&proxy, "dedupd_duplicates_total").await,
        (sent - 1) as f64
    );
    // Quiet for longer than the window (+1/8 rounding): forgotten, the next copy goes out.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    broker.publish(&route.setup.queue, &copy, props).await;
    consumed(sent + 1).await;
    assert_eq!(broker.drain(&route.setup.out).await.len(), 2);
    route.finish(broker, proxy).await;
}

macro_rules! kinds {
    ($($case:ident),* $(,)?) => {
        mod memory { $( #[tokio::test] async fn $case() { super::$case(super::Kind::Memory).await } )* }
        mod redis { $( #[tokio::test] async fn $case() { super::$case(super::Kind::Redis).await } )* }
        mod postgres { $( #[tokio::test] async fn $case() { super::$case(super::Kind::Postgres).await } )* }
        mod embedded { $( #[tokio::test] async fn $case() { super::$case(super::Kind::Embedded).await } )* }
    };
}

kinds!(
    conflicts_dropped_and_audited_copies_stamped,
    conflicts_forwarded,
    conflicts_rejected,
    sliding_window_keeps_repeated_keys,
);

// ---- the audit exchange when it fails ------------------------------------------------------

/// An audit publish that fails (the exchange does not exist: the broker closes the channel) is
/// retried like any publish: the duplicate stays upstream, unacked, until the exchange exists,
/// then reaches it. Store-independent, so on the memory store only.
#[tokio::test]
async fn audit_exchange_missing_keeps_the_duplicate_upstream() {
    let mut route = Route::new("auditgone", Kind::Memory);
    route.setup.extra = format!("duplicates_exchange = {:?}", route.audit_exchange());
    let mut broker = Broker::connect().await;
    route.declare(&mut broker, false).await;
    broker
        .publish_all(
            &route.setup.queue,
            &[message("a", "a-1"), message("a", "a-1")],
        )
        .await;
    let proxy = InProcess::start(route.config());
    let first = broker.receive(&route.setup.out, 1, SETTLE).await;
    assert_eq!(body(&first[0]), "a-1");
    // Sessions keep failing on the audit publish; the duplicate is never acked.
    wait_for("a few failed audit sessions", SETTLE, || async {
        let failed = route.metric(&proxy, "dedupd_duplicates_total").await;
        (failed >= 3.0).then_some(())
    })
    .await;
    assert_eq!(
        route
            .metric(&proxy, "dedupd_duplicates_audited_total")
            .await,
        0.0
    );
    assert_eq!(
        route.metric(&proxy, "dedupd_messages_consumed_total").await,
        route.metric(&proxy, "dedupd_duplicates_total").await + 1.0,
        "each delivery of the duplicate was one more try"
    );
    route.declare_audit(&mut broker).await;
    let audited = broker.receive(&route.audit_queue(), 1, SETTLE).await;
    assert_eq!(
        header(&audited[0], "x-dedupd-reason").as_deref(),
        Some("duplicate")
    );
    wait_for("the duplicate acked upstream", SETTLE, || async {
        let audited = route
            .metric(&proxy, "dedupd_duplicates_audited_total")
            .await;
        let inflight = route.metric(&proxy, "dedupd_inflight_messages").await;
        (audited == 1.0 && inflight == 0.0).then_some(())
    })
    .await;
    assert_eq!(broker.ready(&route.setup.queue).await, 0, "left upstream");
    assert!(
        broker.drain(&route.setup.out).await.is_empty(),
        "forwarded twice"
    );
    route.finish(broker, proxy).await;
}

/// An audit copy that no queue bound to the audit exchange takes comes back as returned (it is
/// published `mandatory`, like a forwarded copy) and is rejected to the dead-letter exchange,
/// not silently dropped.
#[tokio::test]
async fn audit_copy_nobody_takes_is_dead_lettered() {
    let mut route = Route::new("auditnone", Kind::Memory);
    route.setup.extra = format!("duplicates_exchange = {:?}", route.audit_exchange());
    let mut broker = Broker::connect().await;
    let dlq = route.declare(&mut broker, false).await;
    broker
        .ch
        .exchange_declare(
            route.audit_exchange().as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare the audit exchange, bound to nothing");
    broker
        .publish_all(
            &route.setup.queue,
            &[message("a", "a-1"), message("a", "a-1")],
        )
        .await;
    let proxy = InProcess::start(route.config());
    route.setup.wait_settled(proxy.port, 2, SETTLE).await;
    assert_eq!(broker.drain(&route.setup.out).await.len(), 1);
    let dead = broker.receive(&dlq, 1, SETTLE).await;
    assert_eq!(
        dead[0].properties.message_id().as_ref().map(|s| s.as_str()),
        Some("a")
    );
    let rejected = metric(
        proxy.port,
        "dedupd_messages_rejected_total",
        &[("route", &route.setup.name), ("reason", "unroutable")],
    )
    .await;
    assert_eq!(rejected, 1.0);
    assert_eq!(
        route
            .metric(&proxy, "dedupd_duplicates_audited_total")
            .await,
        0.0
    );
    route.finish(broker, proxy).await;
}

/// With `key = "body"` the key is the body's hash already: Redis keeps no second digest (the
/// value stays a decimal tick, 32 bytes a key), while a `message_id` route stores 12-byte
/// values (tick and digest).
#[tokio::test]
async fn a_body_keyed_route_stores_no_body_digest() {
    for (key, expected_len) in [("body", None), ("message_id", Some(12))] {
        let mut route = Route::new("nodigest", Kind::Redis);
        route.setup.key = key.into();
        let mut broker = Broker::connect().await;
        route.declare(&mut broker, false).await;
        let messages: Vec<_> = (0..5)
            .map(|n| message(&format!("id-{n}"), &format!("b-{n}")))
            .collect();
        broker.publish_all(&route.setup.queue, &messages).await;
        let proxy = InProcess::start(route.config());
        route.setup.wait_settled(proxy.port, 5, SETTLE).await;
        let mut conn = redis_conn().await;
        let names: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{}:*", route.setup.name))
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        let mut values = Vec::new();
        for name in names.iter().filter(|n| !n.ends_with(":m")) {
            let kind: String = ::redis::cmd("TYPE")
                .arg(name)
                .query_async(&mut conn)
                .await
                .expect("TYPE");
            if kind == "hash" {
                let fields: Vec<Vec<u8>> = ::redis::cmd("HVALS")
                    .arg(name)
                    .query_async(&mut conn)
                    .await
                    .expect("HVALS");
                values.extend(fields);
            }
        }
        assert_eq!(values.len(), 5, "{key}: {names:?}");
        for value in &values {
            match expected_len {
                Some(len) => assert_eq!(value.len(), len, "{key}: {value:?}"),
                None => assert!(
                    value.len() <= 11 && value.iter().all(u8::is_ascii_digit),
                    "{key}: {value:?} is not a decimal tick"
                ),
            }
        }
        route.finish(broker, proxy).await;
    }
}

// ---- what a conflict logs ------------------------------------------------------------------

/// A conflict is logged at warn, rate-limited (two conflicts within a second: one line, the
/// second one suppressed and counted), never with the key: ids can carry customer data. The
/// key is logged at debug only, which the second run (RUST_LOG=debug for dedupd) shows, so
/// the first run's absence of it is not an accident of where the id would appear. The built
/// binary as a child process, its stderr read whole.
#[tokio::test]
async fn a_conflict_is_logged_once_a_while_and_never_with_its_key() {
    for debug in [false, true] {
        let setup = Setup::new("conflictlog");
        let secret = format!("customer-{}", rand::random::<u32>());
        let mut broker = Broker::connect().await;
        setup.declare(&mut broker).await;
        let messages = vec![
            message(&format!("{secret}-a"), "a-1"),
            message(&format!("{secret}-a"), "a-2"), // conflict
            message(&format!("{secret}-b"), "b-1"),
            message(&format!("{secret}-b"), "b-2"), // conflict, within the same 10 s
        ];
        broker.publish_all(&setup.queue, &messages).await;
        let config = std::env::temp_dir().join(format!("{}.toml", setup.name));
        std::fs::write(&config, setup.toml()).expect("config");
        let args = ["run", "-c", config.to_str().expect("utf-8 path")];
        let mut launch = Launch::new(&args);
        if debug {
            launch = launch.env("RUST_LOG", "info,dedupd=debug");
        }
        let child = Child::launch(launch).await;
        setup.wait_settled(child.port, 4, SETTLE).await;
        assert_eq!(
            setup.metric(child.port, "dedupd_conflicts_total").await,
            2.0
        );
        let log = child.stop().await;
        let _ = std::fs::remove_file(&config);
        broker.cleanup().await;
        redis_cleanup(&setup.name).await;

        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("reused the key of a remembered message"))
            .collect();
        assert_eq!(warnings.len(), 1, "one warning per 10 s:\n{log}");
        assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
        let keyed: Vec<&str> = log.lines().filter(|l| l.contains(&secret)).collect();
        if debug {
            assert_eq!(keyed.len(), 2, "each conflicting key at debug:\n{log}");
            assert!(keyed.iter().all(|l| l.contains("DEBUG")), "{keyed:?}");
        } else {
            assert!(keyed.is_empty(), "the key logged above debug: {keyed:?}");
        }
    }
}
