//! The built `dedupd` binary: exit codes, `check`, `inspect`, `forget`, and SIGTERM during a
//! stream of messages.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use lapin::BasicProperties;

#[tokio::test]
async fn check_accepts_a_valid_file_and_never_prints_the_password() {
    let mut setup = Setup::new("check-ok");
    setup.extra = String::new();
    let toml = setup
        .toml()
        .replace("amqp://guest:guest@", "amqp://guest:${DEDUPD_TEST_SECRET}@");
    let path = std::env::temp_dir().join(format!("{}.toml", setup.name));
    std::fs::write(&path, toml).expect("write");
    let (code, out, err) = run_binary(
        &["check", "-c", path.to_str().expect("utf-8 path")],
        &[("DEDUPD_TEST_SECRET", "guest")],
    )
    .await;
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains(&setup.queue), "routes listed: {out}");
    assert!(
        !out.contains(":guest@") && !err.contains(":guest@"),
        "password printed: {out}"
    );
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn check_names_a_misspelled_key_and_exits_2() {
    let setup = Setup::new("check-typo");
    let toml = setup.toml().replace("prefetch = 200", "prefecth = 200");
    let path = std::env::temp_dir().join(format!("{}.toml", setup.name));
    std::fs::write(&path, toml).expect("write");
    let (code, _, err) =
        run_binary(&["check", "-c", path.to_str().expect("utf-8 path")], &[]).await;
    assert_eq!(code, 2, "stderr: {err}");
    assert!(err.contains("prefecth"), "names the key: {err}");
    assert!(err.contains("line 4"), "names the line: {err}");
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let (code, _, _) = run_binary(&["frobnicate"], &[]).await;
    assert_eq!(code, 2);
    let (code, _, err) = run_binary(&["check", "-c", "/nonexistent/proxy.toml"], &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/proxy.toml"), "{err}");
}

#[tokio::test]
async fn check_connect_reports_a_missing_queue_with_exit_1() {
    let setup = Setup::new("check-connect");
    let path = setup.write();
    let path = path.to_str().expect("utf-8 path");
    let (code, out, _) = run_binary(&["check", "--connect", "-c", path], &[]).await;
    assert_eq!(code, 1, "queue does not exist yet: {out}");
    assert!(out.contains("FAIL") && out.contains(&setup.queue), "{out}");

    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (code, out, _) = run_binary(&["check", "--connect", "-c", path], &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    broker.cleanup().await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn inspect_and_forget_a_key() {
    let setup = Setup::new("inspect");
    let path = setup.write();
    let path = path.to_str().expect("utf-8 path");
    let mut redis = redis_conn().await;
    let key = dedupd::keys::store_key(&setup.name, &setup.name, b"order-1");

    let args = ["inspect", "-c", path, &setup.name, "order-1"];
    let (code, out, err) = run_binary(&args, &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("absent"), "{out}");

    redis_set(&mut redis, &key, "1", 3_600_000).await;
    let (_, out, _) = run_binary(&args, &[]).await;
    assert!(out.contains("done") && out.contains("window left"), "{out}");

    redis_set(&mut redis, &key, "abc:3", 30_000).await;
    let (_, out, _) = run_binary(&args, &[]).await;
    assert!(out.contains("in-flight") && out.contains("abc:3"), "{out}");

    let (code, out, _) = run_binary(&["forget", "-c", path, &setup.name, "order-1"], &[]).await;
    assert_eq!(code, 0);
    assert!(out.contains("forgotten"), "{out}");
    let (_, out, _) = run_binary(&args, &[]).await;
    assert!(out.contains("absent"), "{out}");

    let (code, _, err) = run_binary(&["inspect", "-c", path, "no-such-route", "x"], &[]).await;
    assert_eq!(code, 2, "{err}");
    redis_cleanup(&setup.name).await;
    let _ = std::fs::remove_file(path);
}

/// The same on the layout dedupd writes (the test above plants keys of the old layout, which
/// `inspect` and `forget` still handle during an upgrade).
#[tokio::test]
async fn inspect_and_forget_a_key_of_the_compact_layout() {
    let setup = Setup::new("inspect-compact");
    let path = setup.write();
    let path = path.to_str().expect("utf-8 path");
    let store = dedupd::store::Store::open(&setup.config().store)
        .await
        .expect("store");
    let owner = dedupd::store::Owner::new("cli-test".into(), 4);
    let key = dedupd::keys::store_key(&setup.name, &setup.name, b"order-2");
    let keys = std::slice::from_ref(&key);
    let args = ["inspect", "-c", path, &setup.name, "order-2"];

    store
        .claim(keys, &[], &owner, Duration::from_secs(30), None)
        .await
        .expect("claim");
    let (_, out, _) = run_binary(&args, &[]).await;
    assert!(
        out.contains("in-flight") && out.contains("cli-test:4"),
        "{out}"
    );

    store
        .commit(keys, &[], &owner, Duration::from_secs(3600))
        .await
        .expect("commit");
    let (_, out, _) = run_binary(&args, &[]).await;
    assert!(out.contains("done") && out.contains("window left"), "{out}");
    // About an hour left: the window, rounded up by at most an eighth.
    assert!(out.contains("59m") || out.contains("1h"), "{out}");

    let (code, out, _) = run_binary(&["forget", "-c", path, &setup.name, "order-2"], &[]).await;
    assert_eq!(code, 0);
    assert!(out.contains("forgotten"), "{out}");
    let (_, out, _) = run_binary(&args, &[]).await;
    assert!(out.contains("absent"), "{out}");
    let again = store
        .claim(keys, &[], &owner, Duration::from_secs(30), None)
        .await
        .expect("claim");
    assert_eq!(again, vec![dedupd::store::ClaimOutcome::Claimed]);
    redis_cleanup(&setup.name).await;
    let _ = std::fs::remove_file(path);
}

/// SIGTERM mid-stream: exit 0 within the grace period, nothing lost or doubled, and a restarted
/// proxy forwards the rest.
#[tokio::test]
async fn sigterm_mid_stream_exits_0_and_a_restart_finishes_the_rest() {
    let setup = Setup::new("sigterm");
    let mut broker = Broker::connect().await;
    let dlq = setup.declare(&mut broker).await;
    let path = setup.write();
    let path = path.to_str().expect("utf-8 path");

    let n = 3000;
    let messages: Vec<_> = (0..n)
        .map(|i| {
            (
                format!("m{i}").into_bytes(),
                BasicProperties::default()
                    .with_message_id(format!("m{}", i % 2000).into())
                    .with_delivery_mode(2),
            )
        })
        .collect();
    broker.publish_all(&setup.queue, &messages).await;

    let mut proxy = Child::start(&["run", "-c", path]).await;
    wait_for(
        "some messages forwarded",
        Duration::from_secs(60),
        || async { (broker.ready(&setup.out).await > 0).then_some(()) },
    )
    .await;
    proxy.signal(15);
    let status = tokio::time::timeout(Duration::from_secs(10), proxy.child.wait())
        .await
        .expect("exits within the grace period")
        .expect("wait");
    assert_eq!(status.code(), Some(0));

    let mut proxy = Child::start(&["run", "-c", path]).await;
    wait_for("upstream drained", Duration::from_secs(60), || async {
        let consumed = metric(
            proxy.port,
            "dedupd_messages_consumed_total",
            &[("route", &setup.name)],
        )
        .await;
        let inflight = metric(
            proxy.port,
            "dedupd_inflight_messages",
            &[("route", &setup.name)],
        )
        .await;
        (broker.ready(&setup.queue).await == 0 && consumed > 0.0 && inflight == 0.0).then_some(())
    })
    .await;
    proxy.signal(15);
    let status = proxy.child.wait().await.expect("wait");
    assert_eq!(status.code(), Some(0));

    let got = broker.drain(&setup.out).await;
    let ids: Vec<String> = got
        .iter()
        .map(|d| {
            d.properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default()
        })
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 2000, "lost: {}", 2000 - unique.len());
    assert_eq!(ids.len(), 2000, "duplicated: {}", ids.len() - unique.len());
    assert_eq!(broker.ready(&dlq).await, 0);
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
    let _ = std::fs::remove_file(path);
}

/// SIGHUP re-reads the file: a valid one takes over (routes restart with it), an invalid one is
/// refused and the running configuration kept.
#[tokio::test]
async fn sighup_reloads_a_valid_file_and_refuses_an_invalid_one() {
    let setup = Setup::new("sighup");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let second_out = format!("{}.out2", setup.name);
    broker
        .queue(&second_out, lapin::types::FieldTable::default())
        .await;
    let path = setup.write();
    let path_str = path.to_str().expect("utf-8 path");
    let proxy = Child::start(&["run", "-c", path_str]).await;

    let id = |s: &str| BasicProperties::default().with_message_id(s.into());
    broker.publish(&setup.queue, b"one", id("1")).await;
    assert_eq!(
        broker.receive(&setup.out, 1, Duration::from_secs(60)).await[0].data,
        b"one"
    );

    // Same queue, renamed route (so its metrics show when it runs), other destination.
    let renamed = format!("{}-v2", setup.name);
    let v2 = setup
        .toml()
        .replace(
            &format!("[routes.{}]", setup.name),
            &format!("[routes.{renamed}]"),
        )
        .replace(
            &format!("routing_key = \"{}\"", setup.out),
            &format!("routing_key = \"{second_out}\""),
        );
    std::fs::write(&path, v2).expect("write v2");
    proxy.signal(1);
    wait_for(
        "the reloaded route running",
        Duration::from_secs(60),
        || async {
            let (_, body) = http_get(proxy.latest_port()?, "/metrics").await?;
            parse_metric(
                &body,
                "dedupd_messages_consumed_total",
                &[("route", &renamed)],
            )
            .map(|_| ())
        },
    )
    .await;
    broker.publish(&setup.queue, b"two", id("2")).await;
    assert_eq!(
        broker
            .receive(&second_out, 1, Duration::from_secs(60))
            .await[0]
            .data,
        b"two"
    );

    std::fs::write(&path, "[upstream]\nurl = \"amqp://nowhere\"\nbogus = 1\n").expect("write bad");
    proxy.signal(1);
    broker.publish(&setup.queue, b"three", id("3")).await;
    assert_eq!(
        broker
            .receive(&second_out, 1, Duration::from_secs(60))
            .await[0]
            .data,
        b"three"
    );
    assert_eq!(broker.ready(&setup.out).await, 0);

    let mut proxy = proxy;
    assert!(
        proxy.child.try_wait().expect("try_wait").is_none(),
        "still running"
    );
    proxy.signal(15);
    let status = proxy.child.wait().await.expect("wait");
    assert_eq!(status.code(), Some(0));
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
    let _ = std::fs::remove_file(path);
}

/// A password with characters that end a URL in naive redaction (`"`, `'`, `,`, `]`, `#`, `@`,
/// a space), on a URL line with a TOML syntax error: `check` refuses the file and neither of its
/// outputs shows any piece of the password (each piece starts with `Zq`).
#[tokio::test]
async fn check_never_prints_a_password_from_a_broken_url_line() {
    let setup = Setup::new("check-broken-url");
    let good = format!("url = \"{AMQP_URL}\"");
    assert!(setup.toml().contains(&good));
    let pw = "Zq1\"Zq2'Zq3,Zq4]Zq5#Zq6 Zq7@Zq8";
    let broken_lines = [
        // The quote in the password ends the string early.
        format!("url = \"amqp://guest:{pw}@127.0.0.1:5672/%2f\""),
        format!("url = 'amqp://guest:{pw}@127.0.0.1:5672/%2f'"),
        // Unterminated, unquoted, stray bracket.
        format!("url = \"amqp://guest:{pw}@127.0.0.1:5672/%2f"),
        format!("url = amqp://guest:{pw}@127.0.0.1:5672/%2f"),
        format!("url = \"amqp://guest:{pw}@127.0.0.1:5672/%2f\"]"),
        // Redis, in a cluster list.
        format!("url = [\"redis://:{pw}@127.0.0.1:6379\"]"),
    ];
    let path = std::env::temp_dir().join(format!("{}.toml", setup.name));
    for (i, line) in broken_lines.iter().enumerate() {
        let toml = if line.starts_with("url = [\"redis") {
            setup
                .toml()
                .replace(&format!("url = \"{REDIS_URL}\""), line)
        } else {
            setup.toml().replace(&good, line)
        };
        std::fs::write(&path, toml).expect("write");
        let (code, out, err) =
            run_binary(&["check", "-c", path.to_str().expect("utf-8 path")], &[]).await;
        assert_eq!(code, 2, "variant {i}: stdout {out}\nstderr {err}");
        assert!(err.contains("line"), "variant {i} names the line: {err}");
        assert!(
            !out.contains("Zq") && !err.contains("Zq"),
            "variant {i} shows the password:\nstdout {out}\nstderr {err}"
        );
    }
    let _ = std::fs::remove_file(path);
}

/// A default-exchange route whose routing_key names no queue on the downstream broker would
/// dead-letter every message: `check --connect` says so, naming the route and the queue.
#[tokio::test]
async fn check_connect_reports_a_missing_destination_queue() {
    let setup = Setup::new("check-dest");
    let path = setup.write();
    let path = path.to_str().expect("utf-8 path");
    let mut broker = Broker::connect().await;
    broker.queue_with_dlq(&setup.queue).await;

    let (code, out, _) = run_binary(&["check", "--connect", "-c", path], &[]).await;
    assert_eq!(code, 1, "destination queue does not exist yet: {out}");
    let fail = format!(
        "FAIL  route {}: destination queue {:?}",
        setup.name, setup.out
    );
    assert!(out.contains(&fail), "{out}");
    assert!(out.contains("declare the queue"), "hint: {out}");
    assert!(
        !out.contains(&format!("FAIL  route {}: queue", setup.name)),
        "upstream queue exists: {out}"
    );

    broker
        .queue(&setup.out, lapin::types::FieldTable::default())
        .await;
    let (code, out, _) = run_binary(&["check", "--connect", "-c", path], &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("ok    route {}: destination queue", setup.name)),
        "{out}"
    );
    broker.cleanup().await;
    let _ = std::fs::remove_file(path);
}

/// `check` refuses an audit exchange that is the route's own destination (duplicates would
/// reach the consumers after all), and `check --connect` reports one that does not exist.
#[tokio::test]
async fn check_refuses_an_audit_exchange_equal_to_the_destination_and_reports_a_missing_one() {
    let mut setup = Setup::new("check-audit");
    let route_exchange = format!("{}.x", setup.name);
    setup.extra = format!("duplicates_exchange = {route_exchange:?}");
    let toml = setup.toml().replace(
        "exchange = \"\"\n",
        &format!("exchange = {route_exchange:?}\n"),
    );
    let path = std::env::temp_dir().join(format!("{}.toml", setup.name));
    std::fs::write(&path, &toml).expect("write");
    let path_str = path.to_str().expect("utf-8 path");
    let (code, _, err) = run_binary(&["check", "-c", path_str], &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("routes.{}.duplicates_exchange", setup.name)),
        "names the key: {err}"
    );
    assert!(
        err.contains("separate exchange"),
        "says how to fix it: {err}"
    );

    let audit = format!("{}.audit", setup.name);
    setup.extra = format!("duplicates_exchange = {audit:?}");
    std::fs::write(&path, setup.toml()).expect("write");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (code, out, _) = run_binary(&["check", "--connect", "-c", path_str], &[]).await;
    assert_eq!(code, 1, "{out}");
    let fail = format!("FAIL  route {}: duplicates_exchange {audit:?}", setup.name);
    assert!(out.contains(&fail), "{out}");
    broker
        .ch
        .exchange_declare(
            audit.as_str().into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare the audit exchange");
    let (code, out, _) = run_binary(&["check", "--connect", "-c", path_str], &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("ok    route {}: duplicates_exchange", setup.name)),
        "{out}"
    );
    let _ = broker
        .ch
        .exchange_delete(audit.as_str().into(), Default::default())
        .await;
    broker.cleanup().await;
    let _ = std::fs::remove_file(path);
}

/// Writes `id`'s key on `setup`'s route the way the proxy does: claimed, then committed.
async fn commit_id(setup: &Setup, id: &[u8]) -> String {
    let config = setup.config();
    let key = dedupd::keys::store_key(&config.store.key_prefix, &setup.name, id);
    let store = dedupd::store::Store::open(&config.store)
        .await
        .expect("store");
    let owner = dedupd::store::Owner::new("cli-test".into(), 1);
    let keys = [key.clone()];
    store
        .claim(&keys, &[], &owner, Duration::from_secs(30), None)
        .await
        .expect("claim");
    assert_eq!(
        store
            .commit(&keys, &[], &owner, Duration::from_secs(3600))
            .await
            .expect("commit"),
        [dedupd::store::CommitOutcome::Committed]
    );
    key
}

/// `inspect ARGS` on `setup`'s route: (exit code, stdout, stderr).
async fn inspect(path: &str, setup: &Setup, verb: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec![verb, "-c", path, &setup.name];
    all.extend_from_slice(args);
    run_binary(&all, &[]).await
}

/// A body-keyed route: the body file and the stored `#hash` form find the key, forget removes
/// it, and a plain KEY is refused (it could never be stored) instead of answering "absent".
#[tokio::test]
async fn inspect_and_forget_a_body_hash_key() {
    let mut setup = Setup::new("inspect-body");
    setup.key = "body".into();
    let path = setup.write();
    let path = path.to_str().expect("utf-8 path");
    let body_path = std::env::temp_dir().join(format!("{}.body", setup.name));
    std::fs::write(&body_path, b"the body \x00\xff").expect("write body");
    let body_file = body_path.to_str().expect("utf-8 path");
    let key = commit_id(&setup, &dedupd::keys::body_hash(b"the body \x00\xff")).await;
    let hashed = key.rsplit(':').next().expect("id");
    assert!(hashed.starts_with('#'), "{key}");

    let (code, out, err) = inspect(path, &setup, "inspect", &["--body-file", body_file]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("done") && out.contains(hashed), "{out}");
    let (code, out, err) = inspect(path, &setup, "inspect", &[hashed]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("done"), "{out}");

    let (code, out, err) = inspect(path, &setup, "inspect", &["the body"]).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        err.contains("--body-file") && err.contains('#') && !out.contains("absent"),
        "{err}"
    );
    let (code, _, err) = inspect(path, &setup, "inspect", &["--json", "1"]).await;
    assert_eq!(code, 2, "{err}");

    let (code, out, err) = inspect(path, &setup, "forget", &["--body-file", body_file]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("forgotten"), "{out}");
    let (_, out, _) = inspect(path, &setup, "inspect", &[hashed]).await;
    assert!(out.contains("absent"), "{out}");
    commit_id(&setup, &dedupd::keys::body_hash(b"the body \x00\xff")).await;
    let (_, out, _) = inspect(path, &setup, "forget", &[hashed]).await;
    assert!(out.contains("forgotten"), "{out}");

    redis_cleanup(&setup.name).await;
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(body_path);
}

/// A header route keyed by an integer header: `--typed` finds it; the plain KEY (the string
/// form) is another key, and inspect says how to reach the typed one.
#[tokio::test]
async fn inspect_and_forget_a_typed_header_key() {
    let mut setup = Setup::new("inspect-header");
    setup.key = "header:order".into();
    let path = setup.write();
    let path = path.to_str().expect("utf-8 path");
    let id =
        dedupd::keys::header_value_key(&lapin::types::AMQPValue::LongLongInt(42)).expect("a key");
    commit_id(&setup, &id).await;
    commit_id(&setup, b"s-42").await;

    let (code, out, err) = inspect(path, &setup, "inspect", &["--typed", "i64:42"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("done"), "{out}");
    let (_, out, _) = inspect(path, &setup, "inspect", &["--typed", "i32:42"]).await;
    assert!(out.contains("absent"), "another type, another key: {out}");
    let (_, out, err) = inspect(path, &setup, "inspect", &["42"]).await;
    assert!(out.contains("absent"), "{out}");
    assert!(
        err.contains("--typed"),
        "says how to reach a typed value: {err}"
    );
    // The SPEC form still works for string headers.
    let (_, out, _) = inspect(path, &setup, "inspect", &["s-42"]).await;
    assert!(out.contains("done"), "{out}");
    let (code, _, err) = inspect(path, &setup, "inspect", &["--typed", "int:42"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("i64"), "{err}");

    let (_, out, _) = inspect(path, &setup, "forget", &["--typed", "i64:42"]).await;
    assert!(out.contains("forgotten"), "{out}");
    let (_, out, _) = inspect(path, &setup, "inspect", &["--typed", "i64:42"]).await;
    assert!(out.contains("absent"), "{out}");
    redis_cleanup(&setup.name).await;
    let _ = std::fs::remove_file(path);
}

/// A JSON route: a string value by the SPEC form, a number by `--json`, and the plain form of
/// a number hints at `--json`.
#[tokio::test]
async fn inspect_and_forget_json_keys() {
    let mut setup = Setup::new("inspect-json");
    setup.key = "json:/id".into();
    let path = setup.write();
    let path = path.to_str().expect("utf-8 path");
    let number = dedupd::keys::json_value_key(&serde_json::json!(42)).expect("a key");
    commit_id(&setup, &number).await;
    commit_id(&setup, b"A1").await;

    let (_, out, _) = inspect(path, &setup, "inspect", &["--json", "42"]).await;
    assert!(out.contains("done"), "{out}");
    let (_, out, err) = inspect(path, &setup, "inspect", &["42"]).await;
    assert!(
        out.contains("absent"),
        "the string \"42\" is another key: {out}"
    );
    assert!(err.contains("--json 42"), "{err}");
    let (_, out, _) = inspect(path, &setup, "inspect", &["A1"]).await;
    assert!(out.contains("done"), "{out}");
    let (_, out, _) = inspect(path, &setup, "inspect", &["--json", "\"A1\""]).await;
    assert!(out.contains("done"), "{out}");
    let (code, _, err) = inspect(path, &setup, "inspect", &["--typed", "i64:42"]).await;
    assert_eq!(code, 2, "{err}");

    let (_, out, _) = inspect(path, &setup, "forget", &["--json", "42"]).await;
    assert!(out.contains("forgotten"), "{out}");
    let (_, out, _) = inspect(path, &setup, "inspect", &["--json", "42"]).await;
    assert!(out.contains("absent"), "{out}");
    redis_cleanup(&setup.name).await;
    let _ = std::fs::remove_file(path);
}

/// `check --connect` reports a store that may evict keys (an evicted key's next copy would be
/// forwarded again), and passes it with a warning once the operator opts in.
#[tokio::test]
async fn check_connect_reports_an_evicting_store() {
    let port = free_port();
    let mut redis = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--maxmemory-policy", "allkeys-lru"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server");
    let url = format!("redis://127.0.0.1:{port}/0");
    wait_for("own redis answers", Duration::from_secs(10), || async {
        let client = redis::Client::open(url.as_str()).ok()?;
        client
            .get_multiplexed_async_connection()
            .await
            .ok()
            .map(drop)
    })
    .await;
    let mut broker = Broker::connect().await;
    let setup = Setup::new("check-evict");
    setup.declare(&mut broker).await;
    let toml = setup.toml().replace(REDIS_URL, &url);
    let path = std::env::temp_dir().join(format!("{}.toml", setup.name));
    std::fs::write(&path, &toml).expect("config");
    let path = path.to_str().expect("utf-8 path");

    let (code, out, _) = run_binary(&["check", "--connect", "-c", path], &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("FAIL")
            && l.contains("allkeys-lru")
            && l.contains("noeviction")),
        "{out}"
    );

    let opted_in = toml.replacen("[store]\n", "[store]\nallow_eviction = true\n", 1);
    assert_ne!(opted_in, toml);
    std::fs::write(path, opted_in).expect("config");
    let (code, out, _) = run_binary(&["check", "--connect", "-c", path], &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("WARN") && out.contains("allkeys-lru"), "{out}");

    let _ = redis.kill().await;
    let _ = std::fs::remove_file(path);
    broker.cleanup().await;
}
