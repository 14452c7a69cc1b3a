//! TLS to RabbitMQ, tested end to end: a `socat` TLS terminator started by the test sits in
//! front of the local plain-AMQP broker, with a throwaway PKI made by `openssl` per test. The
//! proxy runs as the built binary, its stderr captured, with `amqps://` URLs and `[*.tls]`
//! tables. Covered: `ca_file` verification on both sides (two terminators, two CAs), mutual TLS
//! with `cert_file`/`key_file`, and the refusals (no client certificate, wrong CA): a log line
//! that says why, nothing consumed, `/readyz` 503.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use lapin::BasicProperties;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncBufReadExt;

const SETTLE: Duration = Duration::from_secs(60);
/// How long a refused proxy gets to fail its handshake twice (the test backoff is <= 500ms).
const REFUSED: Duration = Duration::from_secs(30);

/// A directory under the system temp dir, removed with everything in it on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// OpenSSL settings for the throwaway PKI: a CA, a server certificate, a client certificate.
const OPENSSL_CNF: &str = r#"
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"#;

/// A throwaway PKI in a temp dir (removed on drop):
/// - `ca-a.pem` and `ca-b.pem`: two unrelated CAs;
/// - `server-a.pem`/`.key` and `server-b.pem`/`.key`: `localhost` and 127.0.0.1, signed by a / b;
/// - `client.pem`/`client.key`: a client certificate (CN `dedupd-test-client`) signed by a.
///
/// Every key is what the README asks users for: an unencrypted PEM PKCS#8 private key
/// (`-----BEGIN PRIVATE KEY-----`, as `openssl genpkey` writes it); every certificate is PEM.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new(test: &str) -> Pki {
        let dir = TempDir::new(&unique(&format!("tls-{test}")));
        std::fs::write(dir.0.join("openssl.cnf"), OPENSSL_CNF).expect("write openssl.cnf");
        let pki = Pki { dir };
        for ca in ["ca-a", "ca-b"] {
            pki.key(ca);
            pki.openssl(&[
                "req",
                "-x509",
                "-new",
                "-config",
                "openssl.cnf",
                "-extensions",
                "ca",
                "-key",
                &format!("{ca}.key"),
                "-subj",
                &format!("/CN=dedupd test {ca}"),
                "-days",
                "2",
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        pki.signed("server-a", "localhost", "ca-a", "server");
        pki.signed("server-b", "localhost", "ca-b", "server");
        pki.signed("client", "dedupd-test-client", "ca-a", "client");
        let key = std::fs::read_to_string(pki.path("client.key")).expect("client key");
        assert!(
            key.starts_with("-----BEGIN PRIVATE KEY-----"),
            "the client key is not PEM PKCS#8:\n{key}"
        );
        pki
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.0.join(file)
    }

    /// Runs `openssl args` in the PKI directory; panics with its stderr if it fails.
    fn openssl(&self, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&self.dir.0)
            .output()
            .expect("openssl (see README: tests need it; scripts/services.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `{name}.key`: a new unencrypted PKCS#8 PEM key.
    fn key(&self, name: &str) {
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &format!("{name}.key"),
        ]);
    }

    /// `{name}.key` and `{name}.pem`, a certificate for `cn` signed by `ca` with the
    /// `extensions` section of the config.
    fn signed(&self, name: &str, cn: &str, ca: &str, extensions: &str) {
        self.key(name);
        self.openssl(&[
            "req",
            "-new",
            "-config",
            "openssl.cnf",
            "-key",
            &format!("{name}.key"),
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            &format!("{name}.csr"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            &format!("{}", rand::random::<u32>()),
            "-days",
            "2",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            extensions,
            "-out",
            &format!("{name}.pem"),
        ]);
    }
}

/// A `socat` TLS terminator on 127.0.0.1 in front of the plain broker on 5672, killed (with the
/// children it forked per connection: they share its process group) on drop. It listens on a
/// port the OS picks (port 0), learnt from its own "listening on" log line, so no port is
/// guessed and none can be taken in between.
struct Terminator {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

impl Terminator {
    /// Serves `{server}.pem`/`{server}.key`; with `client_ca`, requires a client certificate
    /// signed by it (`verify=1`: a client without one fails the handshake).
    async fn start(pki: &Pki, server: &str, client_ca: Option<&str>) -> Terminator {
        use std::os::unix::process::CommandExt;
        let log = pki.path(&format!("socat-{server}-{}.log", rand::random::<u32>()));
        let mut listen = format!(
            "openssl-listen:0,bind=127.0.0.1,reuseaddr,fork,cert={},key={}",
            pki.path(&format!("{server}.pem")).display(),
            pki.path(&format!("{server}.key")).display(),
        );
        match client_ca {
            Some(ca) => {
                listen += &format!(
                    ",verify=1,cafile={}",
                    pki.path(&format!("{ca}.pem")).display()
                )
            }
            None => listen += ",verify=0",
        }
        let child = std::process::Command::new("socat")
            .args(["-d", "-d", &listen, "tcp:127.0.0.1:5672"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("socat log file"))
            .process_group(0)
            .spawn()
            .expect("socat (see README: tests need it; scripts/services.sh installs it)");
        let mut terminator = Terminator {
            child,
            port: 0,
            log,
        };
        terminator.port = wait_for("socat listening", Duration::from_secs(10), || {
            let text = terminator.log();
            let exited = terminator.child.try_wait().ok().flatten();
            async move {
                if let Some(status) = exited {
                    panic!("socat exited ({status}) before listening:\n{text}");
                }
                // "N listening on AF=2 127.0.0.1:40125": the port the OS gave.
                text.lines()
                    .find_map(|l| l.split_once("listening on AF=2 127.0.0.1:"))
                    .and_then(|(_, port)| port.trim().parse().ok())
            }
        })
        .await;
        terminator
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// TCP connections accepted so far.
    fn accepted(&self) -> usize {
        self.log().matches("accepting connection from").count()
    }

    /// An `amqps://` URL through this terminator, by name so the certificate's DNS name matches.
    fn url(&self) -> String {
        format!("amqps://guest:guest@localhost:{}/%2f", self.port)
    }

    /// [`Terminator::url`] as dedupd logs it, without the password.
    fn redacted(&self) -> String {
        format!("amqps://guest:***@localhost:{}/%2f", self.port)
    }

    /// The URL as log lines show it: the log writer also hides a user name equal to the
    /// password (`guest:guest`), so match from the host on.
    fn logged(&self) -> String {
        format!(":***@localhost:{}/%2f", self.port)
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        // The whole process group: socat and the children it forked, all started by this test.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The built binary running `dedupd run -c {config}`, its stderr captured line by line (and
/// echoed, so a failing test shows it). Killed on drop.
struct Proxy {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn spawn(config: &Path) -> Proxy {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_dedupd"))
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn dedupd");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("dedupd: {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Proxy { child, lines }
    }

    /// The metrics port it bound (`listen = "127.0.0.1:0"`), from its `dedupd starting` line.
    async fn port(&self) -> u16 {
        wait_for("the dedupd starting line", SETTLE, || async {
            self.lines_with("dedupd starting")
                .iter()
                .find_map(|l| common::harness::metrics_addr(l))
                .map(|addr| addr.port())
        })
        .await
    }

    /// Captured log lines containing `needle`.
    fn lines_with(&self, needle: &str) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// SIGTERM, then waits for a clean exit.
    async fn stop(mut self) {
        let pid = self.child.id().expect("dedupd running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("dedupd exits within 20s of SIGTERM")
            .expect("wait");
        assert!(exit.success(), "dedupd exit status {exit}");
        let lines = self.lines.lock().unwrap();
        let leaked: Vec<_> = lines
            .iter()
            .filter(|l| l.contains("guest:guest@"))
            .collect();
        assert!(leaked.is_empty(), "a password in the logs: {leaked:#?}");
    }
}

/// `[upstream]` pointed at `up` with `up_tls`, then `[downstream]` at `down` with `down_tls` if
/// given (else the downstream defaults to the upstream, TLS settings included).
fn tls_config(setup: &Setup, up: &str, up_tls: &str, down: Option<(&str, &str)>) -> String {
    let mut toml = setup.toml().replacen(
        &format!("url = \"{AMQP_URL}\""),
        &format!("url = \"{up}\""),
        1,
    );
    assert!(toml.contains(up), "the upstream url was replaced");
    toml += &format!("\n[upstream.tls]\n{up_tls}\n");
    if let Some((url, tls)) = down {
        toml += &format!("\n[downstream]\nurl = \"{url}\"\n\n[downstream.tls]\n{tls}\n");
    }
    toml
}

/// `ca_file = "…"` (and more fields) for a `tls` table.
fn tls_files(pki: &Pki, fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(field, file)| format!("{field} = {:?}\n", pki.path(file).display().to_string()))
        .collect()
}

/// `unique` messages keyed by message_id plus `dups` copies of random ones, shuffled; and the
/// bodies of the first-seen copies, in order.
fn with_duplicates(unique: usize, dups: usize) -> (Vec<(Vec<u8>, BasicProperties)>, Vec<String>) {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ids: Vec<usize> = (0..unique).collect();
    ids.extend((0..dups).map(|_| rng.random_range(0..unique)));
    ids.shuffle(&mut rng);
    let mut seen = std::collections::HashSet::new();
    let mut expected = Vec::new();
    let messages = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let body = format!("msg-{id} copy-{n}");
            if seen.insert(*id) {
                expected.push(body.clone());
            }
            (
                body.into_bytes(),
                BasicProperties::default().with_message_id(format!("msg-{id}").into()),
            )
        })
        .collect();
    (messages, expected)
}

/// Publishes messages with duplicates, runs the proxy with `toml` until they are settled, and
/// checks that exactly the first-seen ones arrived downstream, in order. Returns the proxy,
/// still running.
async fn forwards_first_seen(setup: &Setup, broker: &mut Broker, toml: &str, dir: &Path) -> Proxy {
    let dlq = setup.declare(broker).await;
    let (messages, expected) = with_duplicates(40, 20);
    broker.publish_all(&setup.queue, &messages).await;

    let path = dir.join("proxy.toml");
    std::fs::write(&path, toml).expect("write config");
    let proxy = Proxy::spawn(&path);
    let port = proxy.port().await;
    setup.wait_settled(port, 60, SETTLE).await;

    let got: Vec<String> = broker
        .drain(&setup.out)
        .await
        .iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    assert_eq!(got, expected, "exactly the first-seen messages, in order");
    assert_eq!(
        setup.metric(port, "dedupd_messages_forwarded_total").await,
        40.0
    );
    assert_eq!(setup.metric(port, "dedupd_duplicates_total").await, 20.0);
    assert_eq!(broker.ready(&setup.queue).await, 0, "left upstream");
    assert_eq!(broker.ready(&dlq).await, 0, "dead-lettered");
    assert_eq!(
        http_get(port, "/readyz").await.map(|r| r.0),
        Some(200),
        "ready while connected over TLS"
    );
    proxy
}

/// Waits until the proxy has failed to connect `n` times, and returns those log lines.
async fn refused(proxy: &Proxy, n: usize) -> Vec<String> {
    wait_for(
        &format!("{n} failed connection attempts"),
        REFUSED,
        || async {
            let failed = proxy.lines_with("session ended; reconnecting");
            (failed.len() >= n).then_some(failed)
        },
    )
    .await
}

/// The proxy is up but the route is not: nothing consumed, nothing forwarded, `/readyz` 503,
/// `dedupd_up{component="upstream"}` 0, the messages still in the upstream queue.
async fn nothing_consumed(proxy: &Proxy, setup: &Setup, broker: &Broker, published: u32) {
    let port = proxy.port().await;
    assert_eq!(
        http_get(port, "/readyz").await.map(|r| r.0),
        Some(503),
        "/readyz while refused"
    );
    assert_eq!(
        metric(port, "dedupd_up", &[("component", "upstream")]).await,
        0.0
    );
    assert_eq!(
        setup.metric(port, "dedupd_messages_consumed_total").await,
        0.0
    );
    assert_eq!(broker.ready(&setup.queue).await, published, "left upstream");
    assert_eq!(broker.ready(&setup.out).await, 0, "forwarded");
}

#[tokio::test]
async fn amqps_both_sides_verified_with_their_ca_file() {
    let pki = Pki::new("ca");
    // Two terminators with certificates from two unrelated CAs: each side must use its own
    // ca_file, and each terminator must see the proxy's connection.
    let up = Terminator::start(&pki, "server-a", None).await;
    let down = Terminator::start(&pki, "server-b", None).await;
    let setup = Setup::new("tls-ca");
    let toml = tls_config(
        &setup,
        &up.url(),
        &tls_files(&pki, &[("ca_file", "ca-a.pem")]),
        Some((&down.url(), &tls_files(&pki, &[("ca_file", "ca-b.pem")]))),
    );
    let mut broker = Broker::connect().await;
    let proxy = forwards_first_seen(&setup, &mut broker, &toml, &pki.dir.0).await;

    assert!(up.accepted() >= 1, "upstream terminator:\n{}", up.log());
    assert!(
        down.accepted() >= 1,
        "downstream terminator:\n{}",
        down.log()
    );
    assert!(
        proxy
            .lines_with("consuming")
            .iter()
            .any(|l| l.contains("upstream=amqps://")
                && l.contains(&up.logged())
                && l.contains(&down.logged())),
        "a log line shows consuming through the upstream terminator"
    );

    proxy.stop().await;
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

#[tokio::test]
async fn mutual_tls_with_cert_file_and_key_file() {
    let pki = Pki::new("mtls");
    let tls = Terminator::start(&pki, "server-a", Some("ca-a")).await;
    let setup = Setup::new("tls-mtls");
    // The downstream URL is defaulted: it takes the upstream's TLS settings, client cert included.
    let toml = tls_config(
        &setup,
        &tls.url(),
        &tls_files(
            &pki,
            &[
                ("ca_file", "ca-a.pem"),
                ("cert_file", "client.pem"),
                ("key_file", "client.key"),
            ],
        ),
        None,
    );
    let mut broker = Broker::connect().await;
    let proxy = forwards_first_seen(&setup, &mut broker, &toml, &pki.dir.0).await;

    // Upstream and downstream connections, both through the terminator that checks certificates.
    assert!(tls.accepted() >= 2, "terminator:\n{}", tls.log());

    proxy.stop().await;
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

#[tokio::test]
async fn mutual_tls_without_a_client_certificate_is_refused() {
    let pki = Pki::new("nocert");
    let tls = Terminator::start(&pki, "server-a", Some("ca-a")).await;
    let setup = Setup::new("tls-nocert");
    let toml = tls_config(
        &setup,
        &tls.url(),
        &tls_files(&pki, &[("ca_file", "ca-a.pem")]),
        None,
    );
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, _) = with_duplicates(5, 2);
    broker.publish_all(&setup.queue, &messages).await;
    let path = pki.path("proxy.toml");
    std::fs::write(&path, &toml).expect("write config");
    let proxy = Proxy::spawn(&path);

    // Two attempts, each refused for the same reason, named in the warning itself.
    let failures = refused(&proxy, 2).await;
    for line in &failures {
        assert!(
            line.contains("connecting (amqps://") && line.contains(&format!("{})", tls.logged()))
                // TLS 1.3 (what socat and rustls agree on) has an alert for it; TLS 1.2 has not.
                && (line.contains("received fatal alert: CertificateRequired")
                    || line.contains("received fatal alert: HandshakeFailure")),
            "the warning names the missing client certificate: {line}"
        );
    }
    // The terminator saw the connections and refused them for want of a certificate.
    assert!(tls.accepted() >= 2, "terminator:\n{}", tls.log());
    assert!(
        tls.log().contains("peer did not return a certificate"),
        "terminator:\n{}",
        tls.log()
    );
    nothing_consumed(&proxy, &setup, &broker, 7).await;

    proxy.stop().await;
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

#[tokio::test]
async fn a_wrong_ca_file_is_refused() {
    let pki = Pki::new("wrongca");
    // The server's certificate comes from CA a; the proxy trusts only the unrelated CA b.
    let tls = Terminator::start(&pki, "server-a", None).await;
    let setup = Setup::new("tls-wrongca");
    let toml = tls_config(
        &setup,
        &tls.url(),
        &tls_files(&pki, &[("ca_file", "ca-b.pem")]),
        None,
    );
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let (messages, _) = with_duplicates(5, 2);
    broker.publish_all(&setup.queue, &messages).await;
    let path = pki.path("proxy.toml");
    std::fs::write(&path, &toml).expect("write config");
    let proxy = Proxy::spawn(&path);

    let failures = refused(&proxy, 2).await;
    for line in &failures {
        assert!(
            line.contains("connecting (amqps://")
                && line.contains(&format!("{})", tls.logged()))
                && line.contains("invalid peer certificate: UnknownIssuer"),
            "the warning names the untrusted certificate: {line}"
        );
    }
    // The handshake reached the terminator and was aborted by the proxy.
    assert!(tls.accepted() >= 2, "terminator:\n{}", tls.log());
    assert!(
        tls.log().contains("alert unknown ca"),
        "terminator:\n{}",
        tls.log()
    );
    nothing_consumed(&proxy, &setup, &broker, 7).await;

    proxy.stop().await;
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}

/// `dedupd check --connect` through a terminator that requires a client certificate, with
/// `key_file` in each format: (file, expected to connect). The README asks for an unencrypted
/// PEM PKCS#8 key; rustls also reads PKCS#1 ("RSA PRIVATE KEY"); an encrypted key cannot work
/// (there is no setting for a passphrase).
#[tokio::test]
async fn key_file_formats_with_check_connect() {
    let pki = Pki::new("keys");
    let tls = Terminator::start(&pki, "server-a", Some("ca-a")).await;
    let setup = Setup::new("tls-keys");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    pki.openssl(&[
        "pkey",
        "-in",
        "client.key",
        "-traditional",
        "-out",
        "client-pkcs1.key",
    ]);
    pki.openssl(&[
        "pkcs8",
        "-topk8",
        "-in",
        "client.key",
        "-passout",
        "pass:secret",
        "-out",
        "client-encrypted.key",
    ]);
    let cases = [
        ("client.key", "-----BEGIN PRIVATE KEY-----", true),
        ("client-pkcs1.key", "-----BEGIN RSA PRIVATE KEY-----", true),
        (
            "client-encrypted.key",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----",
            false,
        ),
    ];
    for (key, header, connects) in cases {
        let text = std::fs::read_to_string(pki.path(key)).expect("key file");
        assert!(text.starts_with(header), "{key} is not {header}:\n{text}");
        let toml = tls_config(
            &setup,
            &tls.url(),
            &tls_files(
                &pki,
                &[
                    ("ca_file", "ca-a.pem"),
                    ("cert_file", "client.pem"),
                    ("key_file", key),
                ],
            ),
            None,
        );
        let path = pki.path(&format!("check-{key}.toml"));
        std::fs::write(&path, &toml).expect("write config");
        let before = tls.accepted();
        let (code, out, err) =
            run_binary(&["check", "--connect", "-c", path.to_str().unwrap()], &[]).await;
        let upstream = format!("upstream {}", tls.redacted());
        if connects {
            assert_eq!(code, 0, "{key}: check --connect\n{out}\n{err}");
            assert!(out.contains(&format!("ok    {upstream}")), "{key}:\n{out}");
            assert!(
                out.contains(&format!("ok    route {}", setup.name)),
                "{key}:\n{out}"
            );
            // Upstream and downstream each connected through the terminator.
            assert!(tls.accepted() >= before + 2, "{key}:\n{}", tls.log());
        } else {
            // The message is only "IO error: no items found" (see the report on src/amqp.rs).
            assert_eq!(code, 1, "{key}: check --connect\n{out}\n{err}");
            assert!(out.contains(&format!("FAIL  {upstream}")), "{key}:\n{out}");
        }
    }
    broker.cleanup().await;
}

/// `ca_file` is the CA the server is verified with, not one more root next to the system's
/// (SPEC: "verify the server with this CA; system roots otherwise"). `SSL_CERT_FILE` stands in
/// for the system roots: with CA b there, a server certificate from CA b is accepted without
/// `ca_file` (the control), and must be refused with `ca_file` = CA a.
#[tokio::test]
async fn ca_file_replaces_the_system_roots() {
    let pki = Pki::new("roots");
    let tls = Terminator::start(&pki, "server-b", None).await;
    let setup = Setup::new("tls-roots");
    let mut broker = Broker::connect().await;
    setup.declare(&mut broker).await;
    let system_roots = pki.path("ca-b.pem");
    let env = [("SSL_CERT_FILE", system_roots.to_str().unwrap())];
    let upstream = format!("upstream {}", tls.redacted());

    // Control: without ca_file the "system" CA b is trusted.
    let toml = setup.toml().replacen(AMQP_URL, &tls.url(), 1);
    let path = pki.path("system.toml");
    std::fs::write(&path, &toml).expect("write config");
    let (code, out, err) =
        run_binary(&["check", "--connect", "-c", path.to_str().unwrap()], &env).await;
    assert_eq!(code, 0, "system roots from SSL_CERT_FILE\n{out}\n{err}");
    assert!(out.contains(&format!("ok    {upstream}")), "{out}");

    // With ca_file = CA a, only CA a is trusted.
    let toml = tls_config(
        &setup,
        &tls.url(),
        &tls_files(&pki, &[("ca_file", "ca-a.pem")]),
        None,
    );
    let path = pki.path("ca-file.toml");
    std::fs::write(&path, &toml).expect("write config");
    let (code, out, err) =
        run_binary(&["check", "--connect", "-c", path.to_str().unwrap()], &env).await;
    assert_eq!(
        code, 1,
        "a server certificate from outside ca_file\n{out}\n{err}"
    );
    assert!(
        out.contains(&format!("FAIL  {upstream}")) && out.contains("UnknownIssuer"),
        "{out}"
    );
    broker.cleanup().await;
}
