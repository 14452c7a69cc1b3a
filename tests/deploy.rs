//! The deployment files in `deploy/` agree with the code and with each other: every YAML file
//! parses, the dashboard and the alert rules use only metrics dedupd exports, the rules pass
//! `promtool check rules` and their unit tests, the PrometheusRule manifest carries the same
//! rules, the Dockerfile, compose and Kubernetes files name paths, binaries and ports that
//! exist, and a real Prometheus scrapes a live dedupd, loads the rules and answers every
//! dashboard query.
//!
//! Self-contained (no `tests/common`): needs RabbitMQ on 127.0.0.1:5672 and Debian's
//! `prometheus` package (`promtool`, `prometheus`; `scripts/services.sh` installs it). Without
//! them the Prometheus tests are skipped with a note, except under `CI`, where they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use serde_norway::Value as Yaml;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Every alert the rules must define (issue "Operate it").
const REQUIRED_ALERTS: &[&str] = &[
    "DedupdTargetDown",
    "DedupdStoreDown",
    "DedupdUpstreamDown",
    "DedupdDownstreamDown",
    "DedupdRouteFailed",
    "DedupdDuplicateRatioSpike",
    "DedupdForwardLatencyHigh",
    "DedupdMessagesRejected",
    "DedupdTakeovers",
    "DedupdStoreErrors",
    "DedupdStoreMemoryNearLimit",
    "DedupdPublishesNacked",
    "DedupdLogWriteErrors",
];

const RULES: &str = "deploy/prometheus/dedupd-rules.yaml";
const RULES_TEST: &str = "deploy/prometheus/dedupd-rules.test.yaml";
const DASHBOARD: &str = "deploy/grafana/dedupd.json";

// ---------------------------------------------------------------------------------------------
// Helpers

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Every document of a YAML file (`---` separated).
fn yaml_docs(rel: &str) -> Vec<Yaml> {
    let text = read(rel);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

/// The one document of a YAML file.
fn yaml(rel: &str) -> Yaml {
    let mut docs = yaml_docs(rel);
    assert_eq!(docs.len(), 1, "{rel}: expected one YAML document");
    docs.remove(0)
}

/// `v[k1][k2]...`, or panics naming the path.
fn at<'a>(v: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(v, |v, k| {
        v.get(*k)
            .unwrap_or_else(|| panic!("no {k:?} in {path:?} of {v:?}"))
    })
}

fn s(v: &Yaml) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn seq(v: &Yaml) -> &Vec<Yaml> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a sequence: {v:?}"))
}

/// Every file under `dir` (recursively) whose name ends with one of `exts`.
fn files_under(dir: &Path, exts: &[&str], found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            files_under(&path, exts, found);
        } else if exts.iter().any(|e| name.ends_with(e)) {
            found.push(path);
        }
    }
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The Kubernetes documents in `deploy/k8s/`, by kind.
fn k8s(kind: &str) -> Yaml {
    let mut files = Vec::new();
    files_under(&root().join("deploy/k8s"), &[".yaml"], &mut files);
    let mut found: Vec<Yaml> = files
        .iter()
        .flat_map(|f| yaml_docs(&rel(f)))
        .filter(|d| d.get("kind").and_then(Yaml::as_str) == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} in deploy/k8s/");
    found.remove(0)
}

/// `[[bin]]` name, version and rust-version from Cargo.toml.
fn cargo_toml() -> (String, String, String) {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).expect("Cargo.toml parses");
    let bins = manifest["bin"].as_array().expect("[[bin]] in Cargo.toml");
    assert_eq!(bins.len(), 1, "one [[bin]] in Cargo.toml");
    let bin = bins[0]["name"].as_str().expect("bin name").to_owned();
    let version = manifest["package"]["version"].as_str().expect("version");
    let msrv = manifest["package"]["rust-version"]
        .as_str()
        .expect("rust-version");
    (bin, version.to_owned(), msrv.to_owned())
}

/// The port of a `metrics.listen` in a dedupd config.
fn metrics_port(proxy_toml: &str) -> u16 {
    let config: toml::Value = toml::from_str(proxy_toml).expect("proxy.toml parses");
    let listen = config["metrics"]["listen"]
        .as_str()
        .expect("metrics.listen");
    listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in metrics.listen = {listen:?}"))
}

/// The `${VAR}` names a config's values read from the environment (`$${` is a literal;
/// comments do not count).
fn env_vars(proxy_toml: &str) -> BTreeSet<String> {
    fn strings<'a>(v: &'a toml::Value, out: &mut Vec<&'a str>) {
        match v {
            toml::Value::String(s) => out.push(s),
            toml::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            toml::Value::Table(t) => t.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    let config: toml::Value = toml::from_str(proxy_toml).expect("proxy.toml parses");
    let mut values = Vec::new();
    strings(&config, &mut values);
    let mut vars = BTreeSet::new();
    for text in values {
        for (i, _) in text.match_indices("${") {
            if !text[..i].ends_with('$') {
                if let Some((name, _)) = text[i + 2..].split_once('}') {
                    vars.insert(name.to_owned());
                }
            }
        }
    }
    vars
}

/// The metric names dedupd exports: the `pub const NAME: &str = "dedupd_..."` lines of
/// `src/telemetry/mod.rs`, each histogram's also with `_bucket`, `_sum` and `_count`.
fn exported_metrics() -> BTreeSet<String> {
    let text = read("src/telemetry/mod.rs");
    let mut consts = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("pub const ") else {
            continue;
        };
        let Some((ident, value)) = rest.split_once(": &str = \"") else {
            continue;
        };
        let name = value.trim_end_matches("\";");
        if name.starts_with("dedupd_") {
            consts.insert(ident.to_owned(), name.to_owned());
        }
    }
    assert!(
        consts.len() >= 10,
        "found only {consts:?} in src/telemetry/mod.rs: has the way names are declared changed?"
    );
    let histograms: BTreeSet<&str> = text
        .match_indices("histogram!(")
        .map(|(i, m)| {
            text[i + m.len()..]
                .trim_start()
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("")
        })
        .collect();
    let mut names = BTreeSet::new();
    for (ident, name) in &consts {
        if histograms.contains(ident.as_str()) {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name.clone());
    }
    assert!(
        names.iter().any(|n| n.ends_with("_bucket")),
        "no histogram found in src/telemetry/mod.rs"
    );
    names
}

/// Every `dedupd_...` name in `text` (not preceded by an identifier character).
fn metric_names_in(text: &str) -> BTreeSet<String> {
    text.match_indices("dedupd_")
        .filter(|(i, _)| {
            !text[..*i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(|(i, _)| {
            text[i..]
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// Every query of the dashboard's panels: (panel title, expr, legend).
fn dashboard_queries(dashboard: &Json) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                panel["title"].as_str().unwrap_or("?").to_owned(),
                target["expr"].as_str().unwrap_or("").to_owned(),
                target["legendFormat"].as_str().unwrap_or("").to_owned(),
            ));
        }
    }
    out
}

/// Every `expr` of the dashboard's panels: (panel title, expr).
fn dashboard_exprs(dashboard: &Json) -> Vec<(String, String)> {
    dashboard_queries(dashboard)
        .into_iter()
        .map(|(title, expr, _)| (title, expr))
        .collect()
}

/// The labels a legend shows: `{{route}} p99` -> [route].
fn legend_labels(legend: &str) -> Vec<&str> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|part| part.split_once("}}").map(|(l, _)| l.trim()))
        .collect()
}

/// The alerting rules of a rules file's `groups`: (name, rule).
fn alert_rules(groups_doc: &Yaml) -> Vec<(String, Yaml)> {
    seq(at(groups_doc, &["groups"]))
        .iter()
        .flat_map(|g| seq(at(g, &["rules"])).iter())
        .filter_map(|r| r.get("alert").map(|a| (s(a).to_owned(), r.clone())))
        .collect()
}

/// `promtool`, or `None` (with a note) when it is missing outside CI. Under CI a missing
/// promtool fails the test: it would otherwise pass without checking anything.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let msg = format!(
            "`{name}` not found on PATH: install Debian's prometheus package \
             (./scripts/services.sh does)"
        );
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
    }
    found
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "dedupd-deploy-{what}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `check` every 100ms until it returns `Some`, or panics with `what` after `timeout`.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET `path` from `addr` (HTTP/1.0: no chunked body): (status, body), `None` if nothing answers.
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .ok()
        .flatten()
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Prometheus' HTTP API: the `data` of a successful answer, or the error.
async fn prom_api(addr: &str, path: &str) -> Result<Json, String> {
    let (status, body) = http_get(addr, path)
        .await
        .ok_or_else(|| format!("no answer from Prometheus for {path}"))?;
    let json: Json =
        serde_json::from_str(&body).map_err(|e| format!("{status} {path}: {e}: {body}"))?;
    if json["status"] != "success" {
        return Err(format!("{status} {path}: {body}"));
    }
    Ok(json["data"].clone())
}

/// An instant query's result vector.
async fn prom_query(addr: &str, query: &str) -> Result<Vec<Json>, String> {
    let data = prom_api(addr, &format!("/api/v1/query?query={}", urlencode(query))).await?;
    Ok(data["result"].as_array().cloned().unwrap_or_default())
}

/// Deletes queues on drop (on its own thread and runtime: drop may run inside the test's).
struct Queues(Vec<String>);

impl Drop for Queues {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let Ok(conn) =
                    lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
                        .await
                else {
                    return;
                };
                if let Ok(ch) = conn.create_channel().await {
                    for q in &names {
                        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                    }
                }
                let _ = conn.close(200, "cleanup".into()).await;
            });
        })
        .join();
    }
}

// ---------------------------------------------------------------------------------------------
// Files that parse

#[test]
fn every_yaml_file_parses() {
    let mut files = Vec::new();
    files_under(&root().join("deploy"), &[".yaml", ".yml"], &mut files);
    let names: BTreeSet<String> = files.iter().map(|f| rel(f)).collect();
    for expected in [
        "deploy/compose.yaml",
        "deploy/compose/prometheus.yml",
        RULES,
        RULES_TEST,
        "deploy/grafana/provisioning/dashboards/dedupd.yaml",
        "deploy/grafana/provisioning/datasources/prometheus.yaml",
        "deploy/k8s/kustomization.yaml",
        "deploy/k8s/deployment.yaml",
        "deploy/k8s/prometheusrule.yaml",
    ] {
        assert!(names.contains(expected), "{expected} not in {names:?}");
    }
    for file in &names {
        let docs = yaml_docs(file);
        assert!(!docs.is_empty(), "{file}: no YAML document");
        if file.starts_with("deploy/k8s/") {
            for doc in &docs {
                for key in ["apiVersion", "kind"] {
                    assert!(doc.get(key).is_some(), "{file}: no {key}");
                }
            }
        }
    }
    // Every manifest is applied by kustomization.yaml.
    let listed: BTreeSet<String> = seq(at(&yaml("deploy/k8s/kustomization.yaml"), &["resources"]))
        .iter()
        .map(|r| format!("deploy/k8s/{}", s(r)))
        .collect();
    let manifests: BTreeSet<String> = names
        .iter()
        .filter(|n| n.starts_with("deploy/k8s/") && !n.ends_with("kustomization.yaml"))
        .cloned()
        .collect();
    assert_eq!(listed, manifests, "kustomization.yaml resources");
}

#[test]
fn dashboard_has_every_panel_the_operator_needs() {
    let dashboard: Json = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON parses");
    assert_eq!(dashboard["uid"], "dedupd");
    let vars: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["datasource", "job", "instance", "route"] {
        assert!(vars.contains(v), "no ${v} template variable in {vars:?}");
    }

    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("panel title");
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        assert!(
            panel["gridPos"]["w"].as_u64().is_some(),
            "{title}: no gridPos"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            assert!(
                expr.contains("dedupd_") || expr.contains("up{"),
                "{title}: {expr}"
            );
            assert!(expr.contains("job=~\"$job\""), "{title}: no $job in {expr}");
            // A panel split by route follows the route variable.
            if expr.contains("by (route") {
                assert!(
                    expr.contains("route=~\"$route\""),
                    "{title}: no $route in {expr}"
                );
            }
        }
    }

    let exprs = dashboard_exprs(&dashboard);
    let all: String = exprs.iter().map(|(_, e)| e.as_str()).collect();
    for needed in [
        "rate(dedupd_messages_consumed_total",
        "rate(dedupd_messages_forwarded_total",
        "rate(dedupd_duplicates_total",
        "dedupd_messages_rejected_total",
        "by (route, reason)",
        "dedupd_takeovers_total",
        "histogram_quantile(0.5, sum by (route, le) (rate(dedupd_forward_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (route, le) (rate(dedupd_forward_duration_seconds_bucket",
        "sum by (op, le) (rate(dedupd_store_duration_seconds_bucket",
        "dedupd_inflight_messages",
        "by (component) (dedupd_up",
        "dedupd_store_keys",
        "dedupd_store_memory_bytes",
        "dedupd_publishes_nacked_total",
        "dedupd_route_failures_total",
        "dedupd_log_write_errors_total",
        "dedupd_store_errors_total",
    ] {
        assert!(all.contains(needed), "no panel queries {needed}");
    }
    // The duplicate ratio: duplicates over consumed, per route.
    assert!(
        exprs
            .iter()
            .any(|(_, e)| e.contains("dedupd_duplicates_total")
                && e.contains(") / sum by (route) (rate(dedupd_messages_consumed_total")),
        "no duplicate ratio panel"
    );
}

#[test]
fn dashboard_and_rules_use_only_exported_metrics() {
    let exported = exported_metrics();
    for name in [
        "dedupd_messages_forwarded_total",
        "dedupd_forward_duration_seconds_bucket",
    ] {
        assert!(
            exported.contains(name),
            "{name} not parsed from src/telemetry/mod.rs"
        );
    }
    for file in [
        DASHBOARD,
        RULES,
        RULES_TEST,
        "deploy/k8s/prometheusrule.yaml",
    ] {
        let used = metric_names_in(&read(file));
        assert!(used.len() >= 5, "{file}: only {used:?}");
        let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics dedupd does not export: {unknown:?} (exported: {exported:?})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Alert rules

#[test]
fn alert_rules_are_complete_and_pass_promtool() {
    let rules = yaml(RULES);
    let alerts = alert_rules(&rules);
    let names: BTreeSet<&str> = alerts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), alerts.len(), "an alert name twice");
    for required in REQUIRED_ALERTS {
        assert!(names.contains(required), "no alert {required}");
    }
    for (name, rule) in &alerts {
        assert!(rule.get("for").is_some(), "{name}: no for:");
        let severity = s(at(rule, &["labels", "severity"]));
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity}"
        );
        let summary = s(at(rule, &["annotations", "summary"]));
        let description = s(at(rule, &["annotations", "description"]));
        assert!(!summary.is_empty(), "{name}: empty summary");
        assert!(
            description.len() > 150 && description.contains("Check"),
            "{name}: the description must tell the operator what to check: {description}"
        );
        // job="dedupd" everywhere: the scrape job of compose and the ServiceMonitor.
        assert!(s(at(rule, &["expr"])).contains("job=\"dedupd\""), "{name}");
    }
    // Every alert is exercised by the unit tests.
    let tests = read(RULES_TEST);
    for name in &names {
        assert!(
            tests.contains(&format!("alertname=\"{name}\", alertstate=\"firing\"")),
            "{RULES_TEST} never expects {name} to fire"
        );
    }

    let Some(promtool) = tool("promtool") else {
        return;
    };
    let (ok, out) = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(root().join(RULES)));
    assert!(ok, "promtool check rules {RULES}:\n{out}");
    assert!(
        out.contains(&format!("{} rules found", alerts.len())),
        "{out}"
    );
    let (ok, out) = run(Command::new(&promtool)
        .args(["test", "rules"])
        .arg(root().join(RULES_TEST)));
    assert!(ok, "promtool test rules {RULES_TEST}:\n{out}");
    let (ok, out) = run(Command::new(&promtool)
        .args(["check", "config"])
        .arg(root().join("deploy/compose/prometheus.yml")));
    assert!(
        ok,
        "promtool check config deploy/compose/prometheus.yml:\n{out}"
    );
}

#[test]
fn prometheusrule_manifest_carries_the_rules_file() {
    let rule = k8s("PrometheusRule");
    assert_eq!(
        at(&rule, &["spec", "groups"]),
        at(&yaml(RULES), &["groups"]),
        "deploy/k8s/prometheusrule.yaml spec.groups differs from {RULES}: regenerate it with \
         the command in its header"
    );
}

// ---------------------------------------------------------------------------------------------
// Dockerfile, compose, Kubernetes

/// The Dockerfile's instructions, continuation lines joined: (INSTRUCTION, arguments).
fn dockerfile() -> Vec<(String, String)> {
    let text = read("deploy/Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                let (inst, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((inst.to_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

/// The config file the image runs: CMD's path after `-c`.
fn image_config_path(instructions: &[(String, String)]) -> String {
    let cmd = &instructions
        .iter()
        .rfind(|(i, _)| i == "CMD")
        .expect("CMD")
        .1;
    let cmd: Vec<String> = serde_json::from_str(cmd).expect("CMD in exec (JSON) form");
    let i = cmd.iter().position(|a| a == "-c").expect("-c in CMD");
    cmd[i + 1].clone()
}

#[test]
fn dockerfile_matches_the_repo() {
    let (bin, version, msrv) = cargo_toml();
    let inst = dockerfile();
    let get = |name: &str| -> Vec<&str> {
        inst.iter()
            .filter(|(i, _)| i == name)
            .map(|(_, a)| a.as_str())
            .collect()
    };

    // Two stages: a Rust builder at (at least) the MSRV, then a small runtime.
    let froms = get("FROM");
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    let builder = froms[0].split_whitespace().next().unwrap();
    let rust = builder
        .strip_prefix("rust:")
        .and_then(|t| t.split('-').next())
        .unwrap_or_else(|| panic!("builder is not rust:VERSION: {builder}"));
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        parse(rust) >= parse(&msrv),
        "builder rust {rust} below rust-version {msrv}"
    );
    assert!(froms[0].ends_with(" AS builder"), "{}", froms[0]);
    assert!(
        froms[1].starts_with("debian:"),
        "runtime image: {}",
        froms[1]
    );

    // COPY sources exist and are in the build context (.dockerignore).
    let ignore = read(".dockerignore");
    let kept: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.strip_prefix('!'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    assert!(
        ignore.lines().any(|l| l == "*"),
        ".dockerignore starts from nothing"
    );
    let mut copied = Vec::new();
    for args in get("COPY") {
        if args.starts_with("--from=") {
            continue;
        }
        let parts: Vec<&str> = args.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            assert!(
                root().join(src).exists(),
                "COPY {src}: no such path in the repo"
            );
            assert!(
                kept.iter()
                    .any(|k| src == k || src.starts_with(&format!("{k}/"))),
                "COPY {src}: excluded by .dockerignore (kept: {kept:?})"
            );
            copied.push(src.to_string());
        }
    }
    for needed in ["Cargo.toml", "Cargo.lock", "src"] {
        assert!(copied.iter().any(|c| c == needed), "{needed} is not copied");
    }
    // Cargo refuses a manifest whose declared targets are missing.
    let manifest = read("Cargo.toml");
    if manifest.contains("[[bench]]") {
        assert!(
            copied.iter().any(|c| c == "benches"),
            "benches/ is not copied"
        );
    }

    // The build, the binary and what runs.
    let runs = get("RUN").join("\n");
    assert!(runs.contains("cargo build --release --locked"), "{runs}");
    assert!(runs.contains(&format!("--bin {bin}")), "{runs}");
    assert!(runs.contains(&format!("target/release/{bin} ")), "{runs}");
    assert!(runs.contains("ca-certificates"), "{runs}");
    assert_eq!(get("ENTRYPOINT"), [format!("[\"{bin}\"]")]);
    assert_eq!(image_config_path(&inst), "/etc/dedupd/proxy.toml");
    let user = get("USER");
    assert_eq!(user, ["10001:10001"], "non-root, numeric");
    let health = get("HEALTHCHECK").join(" ");
    assert!(
        health.contains("dedupd-healthcheck") && health.contains("/healthz"),
        "{health}"
    );
    assert!(
        get("COPY")
            .iter()
            .any(|c| c.starts_with("deploy/healthcheck.sh ") && c.ends_with("/dedupd-healthcheck")),
        "the health check script is installed as dedupd-healthcheck"
    );
    let expose = get("EXPOSE");
    assert_eq!(expose, ["9187"]);

    // Compose and Kubernetes run the image this version builds.
    let compose = yaml("deploy/compose.yaml");
    let image = format!("dedupd:{version}");
    assert_eq!(s(at(&compose, &["services", "dedupd", "image"])), image);
    let deployment = k8s("Deployment");
    let container = &seq(at(&deployment, &["spec", "template", "spec", "containers"]))[0];
    assert_eq!(s(at(container, &["image"])), image);
}

#[test]
fn compose_mounts_and_ports_match_the_repo() {
    let compose = yaml("deploy/compose.yaml");
    let deploy = root().join("deploy");
    let services = at(&compose, &["services"]);
    let config_path = image_config_path(&dockerfile());

    // Every bind mount's source exists; collect each service's mounts: target -> source.
    let mut mounts: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (name, service) in services.as_mapping().expect("services") {
        let name = s(name).to_owned();
        for volume in service.get("volumes").map(seq).into_iter().flatten() {
            let parts: Vec<&str> = s(volume).split(':').collect();
            if parts[0].starts_with('.') {
                assert!(
                    deploy.join(parts[0]).exists(),
                    "compose {name}: mount source {} does not exist",
                    parts[0]
                );
                mounts
                    .entry(name.clone())
                    .or_default()
                    .insert(parts[1].to_owned(), parts[0].to_owned());
            }
        }
    }

    // dedupd: built from the repo, its config mounted where the image reads it, the variables
    // the config reads set, the metrics port published.
    let dedupd = at(services, &["dedupd"]);
    let context = deploy.join(s(at(dedupd, &["build", "context"])));
    assert!(
        context
            .join(s(at(dedupd, &["build", "dockerfile"])))
            .is_file(),
        "compose dedupd: build context/dockerfile"
    );
    let config_src = mounts["dedupd"]
        .get(&config_path)
        .unwrap_or_else(|| panic!("compose dedupd: nothing mounted at {config_path}"));
    let config = std::fs::read_to_string(deploy.join(config_src)).expect("compose config");
    let env = at(dedupd, &["environment"]);
    for var in env_vars(&config) {
        assert!(
            env.get(var.as_str()).is_some(),
            "compose dedupd: {var} not set"
        );
    }
    let port = metrics_port(&config);
    let ports: Vec<&str> = seq(at(dedupd, &["ports"])).iter().map(s).collect();
    assert!(
        ports.contains(&format!("{port}:{port}").as_str()),
        "{ports:?}"
    );
    assert_eq!(
        mounts["declare"].get(&config_path),
        Some(config_src),
        "declare reads the same config"
    );

    // Prometheus scrapes dedupd's port as job dedupd and loads the rules file.
    let prom = yaml("deploy/compose/prometheus.yml");
    let scrape = &seq(at(&prom, &["scrape_configs"]))[0];
    assert_eq!(s(at(scrape, &["job_name"])), "dedupd");
    let target = s(&seq(at(&seq(at(scrape, &["static_configs"]))[0], &["targets"]))[0]);
    assert_eq!(target, format!("dedupd:{port}"));
    let prom_mounts = &mounts["prometheus"];
    assert_eq!(
        prom_mounts
            .get("/etc/prometheus/prometheus.yml")
            .map(String::as_str),
        Some("./compose/prometheus.yml")
    );
    let rules_target = prom_mounts
        .iter()
        .find(|(_, src)| deploy.join(src.as_str()) == deploy.join("prometheus/dedupd-rules.yaml"))
        .map(|(t, _)| t.clone())
        .expect("compose prometheus mounts the rules file");
    let rule_glob = s(&seq(at(&prom, &["rule_files"]))[0]);
    let (dir, pattern) = rule_glob.rsplit_once('/').expect("rule_files path");
    assert!(
        rules_target.starts_with(&format!("{dir}/"))
            && rules_target.ends_with(pattern.trim_start_matches('*')),
        "rules mounted at {rules_target}, loaded from {rule_glob}"
    );

    // Grafana: provisioning mounted, the dashboard where the provider looks.
    let provider = yaml("deploy/grafana/provisioning/dashboards/dedupd.yaml");
    let path = s(at(
        &seq(at(&provider, &["providers"]))[0],
        &["options", "path"],
    ));
    let graf = &mounts["grafana"];
    assert_eq!(
        graf.get(&format!("{path}/dedupd.json")).map(String::as_str),
        Some("./grafana/dedupd.json")
    );
    assert_eq!(
        graf.get("/etc/grafana/provisioning").map(String::as_str),
        Some("./grafana/provisioning")
    );
    // Redis runs with the settings file.
    assert!(mounts["redis"].values().any(|s| s == "./redis.conf"));
    let redis_conf = read("deploy/redis.conf");
    assert!(redis_conf.contains("\nmaxmemory-policy noeviction"));
    assert!(redis_conf.contains("\nappendonly yes"));
}

#[test]
fn k8s_probes_ports_and_secrets_match_the_config() {
    let deployment = k8s("Deployment");
    let pod = at(&deployment, &["spec", "template", "spec"]);
    let container = &seq(at(pod, &["containers"]))[0];

    // The config: from the ConfigMap, mounted where the args say, its metrics port the
    // container's.
    let configmap = k8s("ConfigMap");
    let cm_name = s(at(&configmap, &["metadata", "name"]));
    let config = s(at(&configmap, &["data", "proxy.toml"]));
    let port = metrics_port(config);
    let args: Vec<&str> = seq(at(container, &["args"])).iter().map(s).collect();
    let config_path = image_config_path(&dockerfile());
    assert_eq!(&args[..3], ["run", "-c", config_path.as_str()]);
    let volume = seq(at(pod, &["volumes"]))
        .iter()
        .find(|v| v.get("configMap").is_some())
        .expect("a configMap volume");
    assert_eq!(s(at(volume, &["configMap", "name"])), cm_name);
    let mount = seq(at(container, &["volumeMounts"]))
        .iter()
        .find(|m| at(m, &["name"]) == at(volume, &["name"]))
        .expect("the config volume mounted");
    assert_eq!(
        format!("{}/proxy.toml", s(at(mount, &["mountPath"]))),
        config_path
    );

    let ports = seq(at(container, &["ports"]));
    let metrics = ports
        .iter()
        .find(|p| p.get("name").and_then(Yaml::as_str) == Some("metrics"))
        .expect("a port named metrics");
    assert_eq!(at(metrics, &["containerPort"]).as_u64(), Some(port.into()));
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = at(container, &[probe, "httpGet"]);
        assert_eq!(s(at(get, &["path"])), path, "{probe}");
        let p = at(get, &["port"]);
        assert!(
            p.as_str() == Some("metrics") || p.as_u64() == Some(port.into()),
            "{probe} port {p:?}"
        );
    }

    // Non-root, no privilege, resources.
    assert_eq!(
        at(pod, &["securityContext", "runAsNonRoot"]).as_bool(),
        Some(true)
    );
    assert_eq!(
        at(pod, &["securityContext", "runAsUser"]).as_u64(),
        Some(10001)
    );
    let csc = at(container, &["securityContext"]);
    assert_eq!(
        at(csc, &["allowPrivilegeEscalation"]).as_bool(),
        Some(false)
    );
    assert_eq!(at(csc, &["readOnlyRootFilesystem"]).as_bool(), Some(true));
    for key in [
        ["requests", "cpu"],
        ["requests", "memory"],
        ["limits", "memory"],
    ] {
        at(container, &["resources", key[0], key[1]]);
    }
    // Longer than the config's shutdown grace, so SIGTERM can drain.
    let grace = at(pod, &["terminationGracePeriodSeconds"])
        .as_u64()
        .unwrap();
    let cfg: toml::Value = toml::from_str(config).unwrap();
    let shutdown = cfg
        .get("tuning")
        .and_then(|t| t.get("shutdown_grace"))
        .and_then(|v| v.as_str())
        .unwrap_or("10s");
    assert!(
        grace > shutdown.trim_end_matches('s').parse::<u64>().unwrap(),
        "terminationGracePeriodSeconds {grace} <= shutdown_grace {shutdown}"
    );

    // The Secret provides every ${VAR} of the config, through envFrom.
    let secret = k8s("Secret");
    let secret_name = s(at(&secret, &["metadata", "name"]));
    let from = seq(at(container, &["envFrom"]));
    assert!(
        from.iter()
            .any(|f| f.get("secretRef").map(|r| at(r, &["name"])) == Some(&Yaml::from(secret_name))),
        "envFrom does not name secret {secret_name}"
    );
    let keys = at(&secret, &["stringData"]);
    let vars = env_vars(config);
    assert!(
        !vars.is_empty(),
        "the ConfigMap's proxy.toml reads no secret"
    );
    for var in &vars {
        assert!(keys.get(var.as_str()).is_some(), "secret has no {var}");
    }

    // Service and ServiceMonitor reach the metrics port; selectors match the pods.
    let labels = at(&deployment, &["spec", "template", "metadata", "labels"]);
    let service = k8s("Service");
    assert_eq!(at(&service, &["spec", "selector"]), labels);
    let sport = &seq(at(&service, &["spec", "ports"]))[0];
    assert_eq!(s(at(sport, &["name"])), "metrics");
    assert_eq!(s(at(sport, &["targetPort"])), "metrics");
    let monitor = k8s("ServiceMonitor");
    assert_eq!(
        at(&monitor, &["spec", "selector", "matchLabels"]),
        at(&service, &["metadata", "labels"])
    );
    let endpoint = &seq(at(&monitor, &["spec", "endpoints"]))[0];
    assert_eq!(s(at(endpoint, &["port"])), "metrics");
    assert_eq!(s(at(endpoint, &["path"])), "/metrics");
    // The job label is the Service's name: the rules select job="dedupd".
    assert_eq!(s(at(&service, &["metadata", "name"])), "dedupd");
}

#[test]
fn shipped_configs_pass_dedupd_check() {
    let tmp = TempDir::new("check");
    let configmap = k8s("ConfigMap");
    let k8s_config = tmp.0.join("k8s-proxy.toml");
    std::fs::write(&k8s_config, s(at(&configmap, &["data", "proxy.toml"]))).unwrap();
    let secret = k8s("Secret");
    let mut envs: Vec<(String, String)> = at(&secret, &["stringData"])
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (s(k).to_owned(), s(v).to_owned()))
        .collect();
    envs.push(("AMQP_PASSWORD".into(), "secret%2Fpw".into()));
    envs.push(("REDIS_PASSWORD".into(), "secret-pw".into()));
    for config in [k8s_config, root().join("deploy/compose/proxy.toml")] {
        let (ok, out) = run(Command::new(env!("CARGO_BIN_EXE_dedupd"))
            .args(["check", "-c"])
            .arg(&config)
            .envs(envs.iter().map(|(k, v)| (k, v))));
        assert!(ok, "dedupd check -c {}:\n{out}", config.display());
        assert!(out.contains("orders"), "check prints the routes: {out}");
        assert!(
            !out.contains("CHANGE-ME") && !out.contains("secret-pw"),
            "{out}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus and a live dedupd

/// dedupd as a child process: its metrics address, read from the `dedupd starting` log line.
fn start_dedupd(config: &Path) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dedupd"))
        .args(["run", "-c"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dedupd");
    let stderr = child.stderr.take().expect("stderr");
    let child = Proc(child);
    let (tx, rx) = mpsc::channel();
    // Keeps draining the log (a full pipe would block dedupd's logging) until dedupd exits.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("dedupd: {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("no `dedupd starting` log line within 30s (or dedupd exited)");
        if line.contains("dedupd starting") {
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("metrics="))
                .unwrap_or_else(|| panic!("no metrics= in {line}"))
                .to_owned();
            return (child, addr);
        }
    }
}

/// Debian's prometheus on a free port (it cannot bind port 0): retried on a bind failure.
async fn start_prometheus(prometheus: &Path, dir: &Path, config: &Path) -> (Proc, String) {
    for attempt in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = dir.join(format!("prometheus-{attempt}.log"));
        let mut child = Proc(
            Command::new(prometheus)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("spawn prometheus"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((200, _)) = http_get(&addr, "/-/ready").await {
                return (child, addr);
            }
            if let Some(status) = child.0.try_wait().expect("wait") {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("address already in use") {
                    break; // another process took the port: try another
                }
                panic!("prometheus exited ({status}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready on {addr} within 30s:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!("prometheus could not bind a port in 5 attempts");
}

fn sample_value(sample: &Json) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test]
async fn prometheus_scrapes_a_live_dedupd_and_loads_the_rules_and_dashboard() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let tmp = TempDir::new("prom");
    let route = format!("deploy{:08x}", rand::random::<u32>());
    let (inq, outq) = (format!("t-{route}.in"), format!("t-{route}.out"));
    let queues = Queues(vec![inq.clone(), outq.clone()]);

    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (tests need it: ./scripts/services.sh)");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    for q in &queues.0 {
        ch.queue_declare(
            q.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("declare");
    }

    // dedupd: one route, memory store, metrics on a port the OS picks.
    let config = tmp.0.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[upstream]\nurl = \"{AMQP_URL}\"\nprefetch = 100\n\n[store]\nkind = \"memory\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\n[routes.{route}]\nqueue = \"{inq}\"\n\
             exchange = \"\"\nrouting_key = \"{outq}\"\nkey = \"message_id\"\n"
        ),
    )
    .unwrap();
    let (dedupd, metrics) = start_dedupd(&config);
    wait_for("dedupd /readyz", Duration::from_secs(30), || async {
        (http_get(&metrics, "/readyz").await?.0 == 200).then_some(())
    })
    .await;

    // The image's health check script against it.
    let port = metrics.rsplit_once(':').unwrap().1;
    let script = root().join("deploy/healthcheck.sh");
    for (path, port, healthy) in [
        ("/healthz", port, true),
        ("/readyz", port, true),
        ("/no-such-page", port, false),
        ("/healthz", "1", false),
    ] {
        let (ok, out) = run(Command::new("bash").arg(&script).args([path, port]));
        assert_eq!(ok, healthy, "healthcheck.sh {path} {port}: {out}");
    }

    // 15 unique ids, then 5 copies of the first 5.
    let (unique, copies) = (15u32, 5u32);
    for i in (0..unique).chain(0..copies) {
        let props = lapin::BasicProperties::default().with_message_id(format!("m-{i}").into());
        let confirm = ch
            .basic_publish(
                "".into(),
                inq.as_str().into(),
                Default::default(),
                format!("body {i}").as_bytes(),
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack());
    }
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let out_count = || async {
        ch.queue_declare(outq.as_str().into(), passive, Default::default())
            .await
            .expect("passive declare")
            .message_count()
    };
    wait_for(
        "forwarded messages downstream",
        Duration::from_secs(30),
        || async { (out_count().await == unique).then_some(()) },
    )
    .await;

    // Prometheus scraping it every second, with the alert rules.
    let prom_config = tmp.0.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: dedupd\n    static_configs:\n      - targets: [\"{metrics}\"]\n",
            root().join(RULES).display()
        ),
    )
    .unwrap();
    let (prom, addr) = start_prometheus(&prometheus, &tmp.0, &prom_config).await;

    // What Prometheus read is what was forwarded.
    let forwarded =
        format!("sum(dedupd_messages_forwarded_total{{job=\"dedupd\", route=\"{route}\"}})");
    let seen = wait_for(
        "Prometheus to scrape the forwarded count",
        Duration::from_secs(30),
        || async {
            let result = prom_query(&addr, &forwarded).await.ok()?;
            let v = sample_value(result.first()?);
            (v == f64::from(unique)).then_some(v)
        },
    )
    .await;
    assert_eq!(
        seen,
        f64::from(out_count().await),
        "Prometheus vs the downstream queue"
    );
    for (metric, expected) in [
        ("dedupd_messages_consumed_total", unique + copies),
        ("dedupd_duplicates_total", copies),
    ] {
        let q = format!("sum({metric}{{job=\"dedupd\", route=\"{route}\"}})");
        let result = prom_query(&addr, &q).await.expect("query");
        assert_eq!(sample_value(&result[0]), f64::from(expected), "{q}");
    }

    // The alert rules loaded and evaluate without error; none fires for a healthy dedupd.
    let rules = yaml(RULES);
    let expected: BTreeSet<String> = alert_rules(&rules).into_iter().map(|(n, _)| n).collect();
    let loaded = wait_for("every rule evaluated", Duration::from_secs(30), || async {
        let data = prom_api(&addr, "/api/v1/rules").await.ok()?;
        let rules: Vec<Json> = data["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown");
        evaluated.then_some(rules)
    })
    .await;
    let names: BTreeSet<String> = loaded
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(names, expected, "rules loaded by Prometheus");
    for rule in &loaded {
        assert_eq!(rule["health"], "ok", "rule failed to evaluate: {rule}");
        assert_eq!(rule["type"], "alerting");
        assert_ne!(
            rule["state"], "firing",
            "fires for a healthy dedupd: {rule}"
        );
    }

    // Every dashboard query runs; those over metrics dedupd exports now return data.
    let dashboard: Json = serde_json::from_str(&read(DASHBOARD)).expect("dashboard");
    let (_, scrape) = http_get(&metrics, "/metrics").await.expect("/metrics");
    let present = metric_names_in(&scrape);
    for (title, expr, legend) in dashboard_queries(&dashboard) {
        let query = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", "dedupd")
            .replace("$instance", ".*")
            .replace("$route", ".*");
        let must_have_data = metric_names_in(&query).iter().all(|n| present.contains(n));
        let result = wait_for(
            &format!("panel {title}: {query}"),
            Duration::from_secs(20),
            || async {
                match prom_query(&addr, &query).await {
                    Err(e) => panic!("panel {title}: {e}"),
                    Ok(r) if must_have_data && r.is_empty() => None,
                    Ok(r) => Some(r),
                }
            },
        )
        .await;
        eprintln!("panel {title}: {query} -> {} series", result.len());
        // The legend's labels are the ones the query keeps (a typo in `by (...)` shows here).
        for series in &result {
            for label in legend_labels(&legend) {
                assert!(
                    series["metric"].get(label).is_some(),
                    "panel {title}: legend {legend:?} shows {label}, the query keeps {}: {query}",
                    series["metric"]
                );
            }
        }
    }

    drop(prom);
    drop(dedupd);
    let _ = conn.close(200, "done".into()).await;
    drop(queues);
}
