//! The PostgreSQL store end to end: the built binary as a child process with `kind =
//! "postgres"`, the real RabbitMQ and a real PostgreSQL. Every test ends with the tally of
//! `tests/faults.rs`: lost = 0 and nothing left upstream, always; duplicates = 0 except where a
//! fault cuts confirms off (SIGKILL), where they stay within what was in flight.
//!
//! Most tests use the local PostgreSQL (127.0.0.1:5432, `scripts/services.sh`), each under its
//! own key prefix, so its own table, dropped at the end. The restart tests run a private
//! PostgreSQL ([`OwnPostgres`]: `initdb` and `pg_ctl` on a free port, in a temp dir), since
//! restarting the shared one would break the other tests of this binary running beside them.
//!
//! The tests run one at a time (they publish thousands of messages and kill processes).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::flow::*;
use common::*;
use lapin::BasicProperties;
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());
const LONG: Duration = Duration::from_secs(60);
/// The prefetch of `Setup`'s config: what one process can have in flight.
const PREFETCH: usize = 200;
/// The local PostgreSQL (trust auth, user `postgres`).
const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

// ---- a private PostgreSQL ----------------------------------------------------------------

/// A PostgreSQL server of the test's own: a fresh cluster (`initdb`) in a temp dir, on a port
/// that was free a moment ago, trust auth for `postgres`. PostgreSQL refuses to run as root,
/// so as root its commands run as the `postgres` user (`runuser`), which owns the dir. Dropping
/// it stops the server (immediate shutdown) and removes the dir, also when a test fails.
struct OwnPostgres {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl OwnPostgres {
    /// initdb and start; panics with the server's log if that fails.
    async fn run() -> OwnPostgres {
        let bin = pg_bindir();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "dedupd-test-pg-{port}-{:08x}",
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let server = OwnPostgres { port, dir, bin };
        if is_root() {
            let status = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&server.dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown postgres {}", server.dir.display());
        }
        let data = server.data();
        server
            .pg(
                "initdb",
                &[
                    "-D",
                    &data,
                    "--auth=trust",
                    "--username=postgres",
                    "--no-sync",
                    "--no-instructions",
                ],
            )
            .await;
        server.start().await;
        server
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl start`, waiting until it accepts connections. fsync is off: the restarts of
    /// these tests are process restarts, after which the OS still has every write.
    async fn start(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-o",
                &options,
                "start",
            ],
        )
        .await;
    }

    /// `pg_ctl stop -m immediate`: every connection cut at once, as a crash would, and the
    /// next start recovers from the write-ahead log.
    async fn crash(&self) {
        self.pg(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )
        .await;
    }

    /// Runs a PostgreSQL program of the bin dir (as `postgres` when we are root); panics with
    /// its output and the server log if it fails.
    async fn pg(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut cmd = tokio::process::Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&path);
            cmd
        } else {
            tokio::process::Command::new(&path)
        };
        let out = cmd
            .args(args)
            .output()
            .await
            .expect("run a PostgreSQL program");
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            panic!(
                "{program} {args:?}: {}\n{}\n{}\nserver log:\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let path = self.bin.join("pg_ctl");
        let data = self.data();
        let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
        let _ = if is_root() {
            std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&path)
                .args(args)
                .output()
        } else {
            std::process::Command::new(&path).args(args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// PostgreSQL's programs: `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
fn pg_bindir() -> PathBuf {
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|d| d.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.pop()
        .expect("PostgreSQL's initdb (scripts/services.sh installs it)")
}

fn props(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(id.into())
        .with_delivery_mode(2)
}

// ---- set-up --------------------------------------------------------------------------------

/// A route of the PostgreSQL store at `url`: `Setup` with the store swapped.
fn setup(test: &str) -> Setup {
    let mut setup = Setup::new(test);
    setup.store_kind = "postgres";
    setup
}

/// Writes the config of `setup` with its store at `url` as `{name}{suffix}.toml`.
fn write_config(setup: &Setup, url: &str, suffix: &str) -> String {
    let path = std::env::temp_dir().join(format!("{}{suffix}.toml", setup.name));
    std::fs::write(&path, setup.toml().replace(REDIS_URL, url)).expect("config");
    path.to_str().expect("utf-8 path").to_owned()
}

/// Removes the config file [`write_config`] wrote.
fn remove_config(setup: &Setup) {
    let _ = std::fs::remove_file(std::env::temp_dir().join(format!("{}.toml", setup.name)));
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// Drops the table of key prefix `prefix` on the local PostgreSQL.
async fn drop_table(prefix: &str) {
    let table = dedupd::store::postgres_table_name(prefix);
    admin(POSTGRES_URL)
        .await
        .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
        .await
        .expect("DROP TABLE");
}

// ---- the tests -------------------------------------------------------------------------------

/// 3,000 messages, 30% of them repeating an earlier id: exactly the unique ones arrive, once,
/// in about one statement per batch and operation.
#[tokio::test]
async fn forwards_each_id_once() {
    let _serial = SERIAL.lock().await;
    let setup = setup("pgonce");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(3_000, 0.3);
    broker.publish_all(&setup.queue, &messages).await;
    let path = write_config(&setup, POSTGRES_URL, "");
    let proxy = Child::start(&["run", "-c", &path]).await;

    let t = finish(
        &broker,
        &setup,
        vec![proxy],
        &expected,
        "3,000 messages, 30% duplicates",
    )
    .await;
    println!(
        "PG-FIGURES statements per message: {:.3} ({} statements for {} messages)",
        t.statements / messages.len() as f64,
        t.statements,
        messages.len()
    );
    assert_clean(&t, 0);
    assert_eq!(t.forwarded, expected.len());
    assert_eq!(t.dropped as usize, messages.len() - expected.len());
    assert!(t.statements > 0.0, "statements are counted");
    broker.cleanup().await;
    remove_config(&setup);
    drop_table(&setup.name).await;
}

/// The store outlives the process: after a clean stop and a new start, copies of every id
/// already forwarded are all dropped.
#[tokio::test]
async fn restart_keeps_memory() {
    let _serial = SERIAL.lock().await;
    let setup = setup("pgrestart");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(1_000, 0.0);
    broker.publish_all(&setup.queue, &messages).await;
    let path = write_config(&setup, POSTGRES_URL, "");
    let proxy = Child::start(&["run", "-c", &path]).await;
    wait_drained(&broker, &setup, proxy.port).await;
    proxy.stop().await;
    assert_eq!(broker.drain(&setup.out).await.len(), expected.len());

    let proxy = Child::start(&["run", "-c", &path]).await;
    let copies: Vec<_> = expected
        .iter()
        .map(|id| (b"a later copy".to_vec(), props(id)))
        .collect();
    broker.publish_all(&setup.queue, &copies).await;
    setup
        .wait_settled(proxy.port, copies.len() as u64, LONG)
        .await;
    let dropped = setup.metric(proxy.port, "dedupd_duplicates_total").await;
    proxy.stop().await;
    let again = broker.drain(&setup.out).await;
    println!(
        "PG-FIGURES restart: {} copies after the restart, {dropped} dropped, {} forwarded",
        copies.len(),
        again.len()
    );
    assert_eq!(again.len(), 0, "a copy was forwarded after the restart");
    assert_eq!(dropped, copies.len() as f64);
    assert_eq!(broker.ready(&setup.queue).await, 0);
    broker.cleanup().await;
    remove_config(&setup);
    drop_table(&setup.name).await;
}

/// SIGKILL three times mid-stream: nothing lost; what arrives twice is at most what was in
/// flight at each kill (a publish whose confirm the dead process never saw).
#[tokio::test]
async fn sigkill_three_times_mid_stream() {
    let _serial = SERIAL.lock().await;
    let mut setup = setup("pgsigkill");
    setup.lease = "1s";
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(6_000, 0.3);
    broker.publish_all(&setup.queue, &messages).await;
    let path = write_config(&setup, POSTGRES_URL, "");
    let args = ["run", "-c", path.as_str()];

    let mut proxy = Child::start(&args).await;
    for kill in 1..=3u32 {
        wait_downstream(&broker, &setup.out, kill * expected.len() as u32 / 5).await;
        proxy.signal(9);
        let _ = proxy.child.wait().await;
        let left = broker.ready(&setup.queue).await;
        println!("PG-FIGURES sigkill {kill}: {left} messages ready upstream");
        proxy = Child::start(&args).await;
    }
    let t = finish(&broker, &setup, vec![proxy], &expected, "sigkill x3").await;
    assert_clean(&t, PREFETCH * 3);
    broker.cleanup().await;
    remove_config(&setup);
    drop_table(&setup.name).await;
}

/// Two instances consume one queue and share one table: nothing lost, nothing twice.
#[tokio::test]
async fn two_instances_share_one_table() {
    let _serial = SERIAL.lock().await;
    let setup = setup("pgtwo");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(5_000, 0.5);
    let path = write_config(&setup, POSTGRES_URL, "");
    let a = Child::start(&["run", "-c", &path]).await;
    let b = Child::start(&["run", "-c", &path]).await;
    wait_for("both instances ready", LONG, || async {
        let ra = status(a.port, "/readyz").await;
        let rb = status(b.port, "/readyz").await;
        (ra == Some(200) && rb == Some(200)).then_some(())
    })
    .await;
    broker.publish_all(&setup.queue, &messages).await;

    let t = finish(
        &broker,
        &setup,
        vec![a, b],
        &expected,
        "two instances, 50% duplicates",
    )
    .await;
    println!(
        "PG-FIGURES two instances: consumed a={} b={}",
        t.consumed[0], t.consumed[1]
    );
    assert!(
        t.consumed[0] > 0.0 && t.consumed[1] > 0.0,
        "both instances took part: {t:?}"
    );
    assert_clean(&t, 0);
    broker.cleanup().await;
    remove_config(&setup);
    drop_table(&setup.name).await;
}

/// The server crashes (immediate shutdown) and restarts mid-stream with on_error = block:
/// nothing is forwarded or acked while it is away, the pool reconnects by itself, and nothing
/// is lost or forwarded twice.
#[tokio::test]
async fn server_restart_mid_stream() {
    let _serial = SERIAL.lock().await;
    let server = OwnPostgres::run().await;
    let setup = setup("pgserver");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, expected) = workload(6_000, 0.3);
    broker.publish_all(&setup.queue, &messages).await;
    let path = write_config(&setup, &server.url(), "");
    let proxy = Child::start(&["run", "-c", &path]).await;

    wait_downstream(&broker, &setup.out, expected.len() as u32 / 4).await;
    server.crash().await;
    wait_for("store marked down", LONG, || async {
        let up = metric(proxy.port, "dedupd_up", &[("component", "store")]).await;
        (up == 0.0).then_some(())
    })
    .await;
    let left = broker.ready(&setup.queue).await;
    println!("PG-FIGURES server restart: crashed with {left} messages ready upstream");
    assert!(left > 0, "the stream was already over");
    server.start().await;

    let t = finish(
        &broker,
        &setup,
        vec![proxy],
        &expected,
        "server crash and restart",
    )
    .await;
    assert_clean(&t, 0);
    assert!(t.store_errors > 0.0, "the outage was noticed");
    broker.cleanup().await;
    remove_config(&setup);
}

/// The pool of a store handle recovers from a server restart without being reopened: the
/// first operation after the restart may fail (its connection was cut), the next ones work,
/// and what was committed before the crash is still there.
#[tokio::test]
async fn store_handle_survives_a_server_restart() {
    let _serial = SERIAL.lock().await;
    let server = OwnPostgres::run().await;
    let cfg = dedupd::config::StoreConfig {
        kind: dedupd::config::StoreKind::Postgres,
        url: dedupd::config::StoreUrl::One(server.url()),
        key_prefix: "dedupd-restart".into(),
        timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let store = dedupd::store::Store::open(&cfg).await.expect("open");
    let a = dedupd::store::Owner::new("inst-a".into(), 1);
    let keys: Vec<String> = (0..100).map(|i| format!("dedupd-restart:r:{i}")).collect();
    // Several connections in the pool, all cut by the crash.
    let batches = keys
        .chunks(10)
        .map(|chunk| store.claim(chunk, &[], &a, Duration::from_secs(30), None));
    for outcome in futures::future::join_all(batches).await {
        outcome.expect("claim");
    }
    store
        .commit(&keys, &[], &a, Duration::from_secs(600))
        .await
        .expect("commit");
    server.crash().await;
    assert!(store.ping().await.is_err(), "the server is down");
    server.start().await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut failures = 0;
    let outcomes = loop {
        match store
            .claim(&keys, &[], &a, Duration::from_secs(30), None)
            .await
        {
            Ok(outcomes) => break outcomes,
            Err(e) => {
                failures += 1;
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still failing after the restart: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    println!("PG-FIGURES store restart: {failures} failed operations before the first success");
    assert!(
        failures <= 2,
        "{failures} failures: broken connections handed out again"
    );
    assert!(outcomes
        .iter()
        .all(|o| *o == dedupd::store::ClaimOutcome::Done));
    for _ in 0..5 {
        store.ping().await.expect("every pooled connection works");
    }
}

/// `dedupd check --connect` with a role that may not create the table: exit 1, naming the
/// table and printing the SQL an administrator can run; after it ran, exit 0.
#[tokio::test]
async fn check_connect_says_what_is_missing() {
    let _serial = SERIAL.lock().await;
    let admin = admin(POSTGRES_URL).await;
    let role = format!("dedupd_check_{:08x}", rand::random::<u32>());
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
        .await
        .expect("CREATE ROLE");
    let setup = setup("pgcheck");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let path = write_config(
        &setup,
        &format!("postgres://{role}@127.0.0.1:5432/postgres"),
        "",
    );
    let table = dedupd::store::postgres_table_name(&setup.name);

    let (code, out, err) = run_binary(&["check", "--connect", "-c", &path], &[]).await;
    println!("{out}{err}");
    assert_eq!(code, 1, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains("store"))
        .unwrap_or_else(|| panic!("no FAIL line for the store:\n{out}"));
    assert!(
        line.contains(&format!("table \"{table}\" does not exist")),
        "{line}"
    );
    let sql = line
        .split_once("an administrator can run: ")
        .map(|(_, sql)| sql)
        .unwrap_or_else(|| panic!("no SQL to run: {line}"));
    assert!(sql.starts_with("CREATE TABLE"), "{sql}");
    admin
        .batch_execute(sql)
        .await
        .expect("the printed SQL runs");

    let (code, out, err) = run_binary(&["check", "--connect", "-c", &path], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok") && l.contains("store") && l.contains(&table)),
        "{out}"
    );
    // Redis settings are not PostgreSQL's: no line about them.
    assert!(
        !out.contains("maxmemory-policy") && !out.contains("listpack"),
        "{out}"
    );
    broker.cleanup().await;
    remove_config(&setup);
    drop_table(&setup.name).await;
    admin
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .expect("DROP ROLE");
}

/// Bytes per remembered key. Growth: `pg_total_relation_size` of the table between 20,000 and
/// 120,000 done keys, written as dedupd writes them (claimed, then committed, in batches of
/// 200), each with a body digest (the `body` column filled, as it is unless `key = "body"`). After a refill: once those keys' window (20 s) ended, the store's sweeper deleted them
/// and a VACUUM ran (as autovacuum would), 120,000 new keys are written, and the table's size is
/// divided by them. Also times the writes: the refill must not be slower than the first fill
/// (it was 40 times slower when the generic plans read the whole "empty" table). Run with
/// `cargo test --test postgres -- --ignored measure --nocapture`.
#[tokio::test]
#[ignore]
async fn measure_postgres_bytes_per_remembered_key() {
    let prefix = format!("dedupd-measure-{:08x}", rand::random::<u32>());
    let cfg = dedupd::config::StoreConfig {
        kind: dedupd::config::StoreKind::Postgres,
        url: dedupd::config::StoreUrl::One(POSTGRES_URL.into()),
        key_prefix: prefix.clone(),
        timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let store = dedupd::store::Store::open(&cfg).await.expect("open");
    let a = dedupd::store::Owner::new("8c1f0e6a2b7d4e95".into(), 1);
    let admin = admin(POSTGRES_URL).await;
    let table = dedupd::store::postgres_table_name(&prefix);
    let sizes = || async {
        let row = admin
            .query_one(
                &format!(
                    "SELECT pg_total_relation_size('\"{table}\"'), pg_relation_size('\"{table}\"'), \
                     pg_indexes_size('\"{table}\"'), (SELECT count(*) FROM \"{table}\")"
                ),
                &[],
            )
            .await
            .expect("sizes");
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3),
        )
    };
    let write = |from: usize, to: usize, window: Duration| {
        let store = store.clone();
        let a = a.clone();
        let prefix = prefix.clone();
        async move {
            let keys: Vec<String> = (from..to).map(|i| format!("{prefix}:orders:{i}")).collect();
            // Every key with its body's digest, as with `key` set to a header: the dearer case.
            let bodies: Vec<Option<dedupd::store::BodyDigest>> = (from..to)
                .map(|i| {
                    Some(dedupd::store::BodyDigest::of(
                        format!("body {i}").as_bytes(),
                    ))
                })
                .collect();
            for (batch, bodies) in keys.chunks(200).zip(bodies.chunks(200)) {
                store
                    .claim(batch, bodies, &a, Duration::from_secs(30), None)
                    .await
                    .expect("claim");
                store
                    .commit(batch, bodies, &a, window)
                    .await
                    .expect("commit");
            }
        }
    };
    let short = Duration::from_secs(20);
    let started = std::time::Instant::now();
    write(0, 20_000, short).await;
    let (total_20, heap_20, index_20, _) = sizes().await;
    write(20_000, 120_000, short).await;
    let first_fill = started.elapsed();
    let (total_120, heap_120, index_120, rows) = sizes().await;
    assert_eq!(rows, 120_000);
    println!("PG-FIGURES 120,000 keys claimed and committed in {first_fill:?}");
    let per = |a: i64, b: i64| (b - a) as f64 / 100_000.0;
    println!(
        "PG-FIGURES growth 20,000 -> 120,000 keys: {:.1} bytes per key (heap {:.1}, primary key \
         {:.1}); at 120,000 keys: {total_120} bytes, {:.1} per key",
        per(total_20, total_120),
        per(heap_20, heap_120),
        per(index_20, index_120),
        total_120 as f64 / 120_000.0
    );

    // Expired, swept by the store's own sweeper (a 1 s window: a pass every 5 s), vacuumed.
    let tracker = tokio_util::task::TaskTracker::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    store.start_upkeep(
        &[("orders".to_owned(), Duration::from_secs(1))],
        &tracker,
        &shutdown,
    );
    wait_for(
        "every key expired and swept",
        Duration::from_secs(90),
        || async { (sizes().await.3 == 0).then_some(()) },
    )
    .await;
    shutdown.cancel();
    println!("PG-FIGURES expired and swept after {:?}", started.elapsed());
    admin
        .batch_execute(&format!("VACUUM \"{table}\""))
        .await
        .expect("VACUUM");
    let rewrite = std::time::Instant::now();
    write(1_000_000, 1_120_000, Duration::from_secs(3600)).await;
    let refill = rewrite.elapsed();
    println!("PG-FIGURES 120,000 new keys after the sweep and VACUUM in {refill:?}");
    assert!(
        refill < first_fill * 3 + Duration::from_secs(5),
        "the refill took {refill:?}, the first fill {first_fill:?}"
    );
    let (total, heap, index, rows) = sizes().await;
    assert_eq!(rows, 120_000);
    println!(
        "PG-FIGURES after a refill, 120,000 keys: {:.1} bytes per key (heap {:.1}, primary key \
         {:.1})",
        total as f64 / 120_000.0,
        heap as f64 / 120_000.0,
        index as f64 / 120_000.0
    );
    let size = store
        .size(&prefix, &["orders".to_owned()])
        .await
        .expect("size");
    println!("PG-FIGURES size(): {size:?}");
    let counted = size.keys[0] as f64;
    if size.exact {
        assert_eq!(counted, 120_000.0);
    } else {
        assert!((counted - 120_000.0).abs() < 12_000.0, "{size:?}");
    }
    println!(
        "PG-FIGURES statements sent: {} for 240,000 keys in batches of 200, and the sweeps",
        store.commands_sent()
    );
    drop_table(&prefix).await;
}
