//! No password reaches the binary's output, even at `RUST_LOG=trace`: the built `dedupd`, with
//! wrong passwords on every side (upstream, downstream, store), each given literally in one
//! case and through `${VAR}` in another, runs until the failures are logged and is stopped
//! with SIGTERM; `check --connect` runs with all of them wrong at once. Neither stdout nor
//! stderr may hold any of the passwords: as written, percent-decoded, or as the decimal bytes
//! lapin's frame log prints the SASL response in.
//!
//! Needs the test broker and Redis (127.0.0.1:5672 guest/guest, 127.0.0.1:6379 without a
//! password, so any password is refused).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Wrong passwords, one per side and form, each unique in the output. `%40` is an `@` once
/// decoded, which is what the broker would be sent.
const UP_LITERAL: &str = "Up-Lit-7c41%40x";
const UP_ENV: &str = "Up-Env-2b9e%40y";
const DOWN_LITERAL: &str = "Down-Lit-5d07";
const DOWN_ENV: &str = "Down-Env-81fa%40z";
const STORE_LITERAL: &str = "Store-Lit-3e6c";
const STORE_ENV: &str = "Store-Env-d52b";
const ALL: [&str; 6] = [
    UP_LITERAL,
    UP_ENV,
    DOWN_LITERAL,
    DOWN_ENV,
    STORE_LITERAL,
    STORE_ENV,
];

const ENV: [(&str, &str); 3] = [
    ("DEDUPD_T_UP_PW", UP_ENV),
    ("DEDUPD_T_DOWN_PW", DOWN_ENV),
    ("DEDUPD_T_STORE_PW", STORE_ENV),
];

fn binary() -> String {
    std::env::var("DEDUPD_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_dedupd").to_owned())
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("dedupd-secrets-{}-{name}", std::process::id()))
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// A config with these URL passwords (`None`: the right one), written to a file.
fn config(name: &str, up: Option<&str>, down: Option<&str>, store: Option<&str>) -> PathBuf {
    let amqp =
        |pw: Option<&str>| format!("amqp://guest:{}@127.0.0.1:5672/%2f", pw.unwrap_or("guest"));
    let redis = match store {
        Some(pw) => format!("redis://:{pw}@127.0.0.1:6379/0"),
        None => "redis://127.0.0.1:6379/0".to_owned(),
    };
    let text = format!(
        "[upstream]\nurl = \"{}\"\n\n[downstream]\nurl = \"{}\"\n\n[store]\nkind = \"redis\"\n\
         url = \"{redis}\"\nkey_prefix = \"dedupd-secrets\"\n\n[metrics]\n\
         listen = \"127.0.0.1:{}\"\n\n[tuning]\nbackoff_max = \"1s\"\n\n\
         [routes.secrets]\nqueue = \"dedupd-secrets-{name}.in\"\nexchange = \"\"\n\
         routing_key = \"dedupd-secrets-{name}.out\"\n",
        amqp(up),
        amqp(down),
        free_port(),
    );
    // Passwords given through the environment are written as references.
    let text = ENV.iter().fold(text, |text, (var, value)| {
        text.replace(&format!(":{value}@"), &format!(":${{{var}}}@"))
    });
    let path = scratch(&format!("{name}.toml"));
    std::fs::write(&path, text).expect("write the config");
    path
}

/// Every form in which `password` (as written in a URL) must not appear.
fn forms(password: &str) -> Vec<String> {
    let decoded = password.replace("%40", "@");
    let bytes: Vec<String> = decoded.bytes().map(|b| b.to_string()).collect();
    vec![password.to_owned(), decoded, bytes.join(", ")]
}

fn assert_no_password(what: &str, stdout: &str, stderr: &str) {
    for password in ALL {
        for form in forms(password) {
            assert!(
                !stdout.contains(&form) && !stderr.contains(&form),
                "{what}: {form:?} (of {password:?}) in the output:\nstdout:\n{stdout}\nstderr:\n{}",
                tail(stderr, 20_000)
            );
        }
    }
}

/// The last `n` bytes of `text` or a little more (whole characters): trace output is long, and
/// the cause of a failure is usually near its end.
fn tail(text: &str, n: usize) -> &str {
    let mut start = text.len().saturating_sub(n);
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    &text[start..]
}

/// `dedupd run` at trace level, its output going to files that can be read while it runs.
struct Daemon {
    name: String,
    child: std::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    fn start(name: &str, config: &Path) -> Daemon {
        let (stdout, stderr) = (
            scratch(&format!("{name}.out")),
            scratch(&format!("{name}.err")),
        );
        let child = Command::new(binary())
            .args(["run", "-c", config.to_str().expect("utf-8 path")])
            .env("RUST_LOG", "trace")
            .envs(ENV)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn dedupd");
        Daemon {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
        }
    }

    /// Waits up to 60s for `done` to hold of the log so far.
    fn wait_for(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            if done(&stderr) {
                return;
            }
            let exited = self.child.try_wait().expect("try_wait");
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{}: no {what} within 60s (exit: {exited:?}); stderr tail:\n{}",
                self.name,
                tail(&stderr, 5_000)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "{}: kill {signal}", self.name);
    }

    /// SIGTERM, then (stdout, stderr) once it exited (with 0).
    fn stop(mut self) -> (String, String) {
        self.signal("-TERM");
        let code = self.child.wait().expect("wait");
        let stdout = std::fs::read_to_string(&self.stdout).expect("stdout");
        let stderr = std::fs::read_to_string(&self.stderr).expect("stderr");
        for file in [&self.stdout, &self.stderr] {
            let _ = std::fs::remove_file(file);
        }
        assert_eq!(code.code(), Some(0), "{}: SIGTERM exits 0", self.name);
        (stdout, stderr)
    }
}

/// Each side refused in turn (the route connects upstream, then downstream, then asks the
/// store), its password given literally in one case and through `${VAR}` in another.
#[test]
fn run_at_trace_logs_no_password() {
    // (name, upstream, downstream, store, the failure logged, a trace that the password was
    // sent: lapin's frame log of the SASL response, or the store's refusal of it)
    let cases = [
        (
            "up-literal",
            Some(UP_LITERAL),
            Some(DOWN_ENV),
            Some(STORE_ENV),
            "ACCESS_REFUSED",
            "StartOk",
        ),
        (
            "up-env",
            Some(UP_ENV),
            Some(DOWN_LITERAL),
            Some(STORE_LITERAL),
            "ACCESS_REFUSED",
            "StartOk",
        ),
        (
            "down-literal",
            None,
            Some(DOWN_LITERAL),
            Some(STORE_ENV),
            "ACCESS_REFUSED",
            "StartOk",
        ),
        (
            "down-env",
            None,
            Some(DOWN_ENV),
            Some(STORE_LITERAL),
            "ACCESS_REFUSED",
            "StartOk",
        ),
        (
            "store-literal",
            None,
            None,
            Some(STORE_LITERAL),
            "store not answering",
            "AuthenticationFailed",
        ),
        (
            "store-env",
            None,
            None,
            Some(STORE_ENV),
            "store not answering",
            "AuthenticationFailed",
        ),
    ];
    std::thread::scope(|scope| {
        let runs: Vec<_> = cases
            .iter()
            .map(|&(name, up, down, store, failure, frame)| {
                scope.spawn(move || {
                    let path = config(name, up, down, store);
                    let mut daemon = Daemon::start(name, &path);
                    daemon.wait_for(&format!("{failure:?} and {frame:?}"), |log| {
                        log.contains(failure) && log.contains(frame)
                    });
                    let (stdout, stderr) = daemon.stop();
                    let _ = std::fs::remove_file(&path);
                    assert_no_password(name, &stdout, &stderr);
                })
            })
            .collect();
        for run in runs {
            if let Err(panic) = run.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    forget_store_keys();
}

/// Deletes what a dedupd that reached Redis wrote under the tests' prefix (the upgrade marker
/// of its route).
fn forget_store_keys() {
    let keys = std::process::Command::new("redis-cli")
        .args(["--scan", "--pattern", "dedupd-secrets:*"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for key in keys.lines().filter(|k| !k.is_empty()) {
        let _ = std::process::Command::new("redis-cli")
            .args(["UNLINK", key])
            .output();
    }
}

/// `check --connect` with every password wrong: literal in one file, `${VAR}` in the other.
#[test]
fn check_connect_at_trace_prints_no_password() {
    for (name, up, down, store) in [
        ("check-literal", UP_LITERAL, DOWN_LITERAL, STORE_LITERAL),
        ("check-env", UP_ENV, DOWN_ENV, STORE_ENV),
    ] {
        let path = config(name, Some(up), Some(down), Some(store));
        let out = Command::new(binary())
            .args([
                "check",
                "--connect",
                "-c",
                path.to_str().expect("utf-8 path"),
            ])
            .env("RUST_LOG", "trace")
            .envs(ENV)
            .output()
            .expect("run dedupd check");
        let _ = std::fs::remove_file(&path);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: every side fails\n{stdout}"
        );
        for side in ["FAIL  upstream", "FAIL  downstream", "FAIL  store"] {
            assert!(stdout.contains(side), "{name}: {side:?} not in\n{stdout}");
        }
        assert!(
            stderr.contains("StartOk"),
            "{name}: lapin's frame trace not seen"
        );
        assert_no_password(name, &stdout, &stderr);
    }
}

/// A reload to a file with another wrong password: the new one is hidden from the start, and
/// the old one still (its routes log while they drain).
#[test]
fn reload_at_trace_logs_neither_password() {
    let path = config("reload", Some(UP_LITERAL), None, None);
    let mut daemon = Daemon::start("reload", &path);
    daemon.wait_for("a refused login", |log| log.contains("ACCESS_REFUSED"));
    let reloaded = config("reload", Some(UP_ENV), None, None);
    assert_eq!(reloaded, path, "the same file, rewritten");
    daemon.signal("-HUP");
    daemon.wait_for("a refused login after the reload", |log| {
        log.split_once("configuration reloaded")
            .is_some_and(|(_, after)| after.contains("ACCESS_REFUSED"))
    });
    let (stdout, stderr) = daemon.stop();
    let _ = std::fs::remove_file(&path);
    forget_store_keys();
    assert_no_password("reload", &stdout, &stderr);
}
