//! The configuration file (`proxy.toml`): its types, loading with `${VAR}` interpolation,
//! defaults, and the one `validate()` that tells an operator which key is wrong and how to fix it.
//!
//! Every other module takes its settings from the types here; nothing else reads the file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::uri::AMQPUri;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where messages are consumed.
    pub upstream: Upstream,
    /// Where first-seen messages are published. Default: the upstream broker.
    #[serde(default)]
    pub downstream: Option<Downstream>,
    /// The shared key store.
    #[serde(default)]
    pub store: StoreConfig,
    /// The Prometheus and health endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Throughput and latency knobs; the defaults suit most deployments.
    #[serde(default)]
    pub tuning: Tuning,
    /// One table per route; the table name is the route name.
    #[serde(default)]
    pub routes: BTreeMap<String, Route>,
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// AMQP URL, `amqp://` or `amqps://`. Required.
    pub url: String,
    /// basic.qos prefetch per consumer channel. Default 2000.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// TLS settings for `amqps://`. Default: none (system roots).
    #[serde(default)]
    pub tls: Option<Tls>,
}

/// `[downstream]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Downstream {
    /// AMQP URL. Default: `upstream.url`.
    #[serde(default)]
    pub url: Option<String>,
    /// TLS settings for `amqps://`. Default: none.
    #[serde(default)]
    pub tls: Option<Tls>,
}

/// `[upstream.tls]`, `[downstream.tls]`, `[store.tls]`
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM CA bundle used to verify the server. Default: the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS. Default: none.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`. Default: none.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `"redis"` or `"memory"`. Default `"redis"`.
    #[serde(default)]
    pub kind: StoreKind,
    /// One URL (`redis://`, `rediss://`) or a list of them (Redis Cluster).
    /// Default `redis://127.0.0.1:6379/0`.
    #[serde(default = "default_store_url")]
    pub url: StoreUrl,
    /// Prefix of every key dedupd writes, at most 64 bytes. Default `"dedupd"`.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// How long an in-flight claim lives without its owner, 1s to 1h. Default 30s.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// What to do while the store does not answer. Default `"block"`.
    #[serde(default)]
    pub on_error: OnStoreError,
    /// Deadline of one store round trip; past it the store counts as down. 10ms to 1m.
    /// Default 2s.
    #[serde(default = "default_store_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// TLS settings for `rediss://`. Default: none.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// Run even when Redis may evict keys (`maxmemory-policy` other than `noeviction`): an
    /// evicted key is forgotten, and its next copy forwarded again. Default `false`: routes
    /// do not consume from such a store.
    #[serde(default)]
    pub allow_eviction: bool,
}

/// `store.kind`
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// Shared Redis (or Redis Cluster): the only kind that several instances can share.
    #[default]
    Redis,
    /// In-process map: one instance, forgets everything on restart.
    Memory,
}

/// `store.url`: one URL, or a list of seed URLs for Redis Cluster.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum StoreUrl {
    /// A single Redis server.
    One(String),
    /// Redis Cluster seed nodes.
    Cluster(Vec<String>),
}

/// `store.on_error`
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Forward nothing and ack nothing until the store answers.
    #[default]
    Block,
    /// Fail open: forward without dedup, counted in `dedupd_store_errors_total`.
    Forward,
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address serving `/metrics`, `/healthz`, `/readyz`. Default `127.0.0.1:9187`.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

/// `[tuning]`: what each knob trades is in the README.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tuning {
    /// Most deliveries claimed in one store round trip and published together. Default 500.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Most messages per route between claim and upstream ack (published, confirm or commit
    /// pending). Past it, intake waits and the next batch grows. Default 1000.
    #[serde(default = "default_publish_window")]
    pub publish_window: usize,
    /// How long to wait for a publisher confirm before the outcome counts as unknown, 1s to
    /// 10m. Default 15s.
    #[serde(default = "default_confirm_timeout", with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// How long SIGTERM/SIGINT waits for in-flight messages before closing, at most 1h.
    /// Default 10s.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// First wait before reconnecting to a broker or retrying the store; doubles up to
    /// `backoff_max`. Default 100ms.
    #[serde(default = "default_backoff_min", with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Longest wait between reconnect or retry attempts, at most 1h. Default 5s.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
}

/// `[routes.NAME]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Upstream queue to consume. Required.
    pub queue: String,
    /// Downstream exchange; `""` is the default exchange. Default `""`.
    #[serde(default)]
    pub exchange: String,
    /// Routing key of the forwarded copy. Default: the message's own routing key.
    #[serde(default)]
    pub routing_key: Option<String>,
    /// Where the dedup key comes from. Default `"message_id"`.
    #[serde(default)]
    pub key: KeySpec,
    /// How long a forwarded key is remembered, 1s to 365d. Default 24h.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
    /// What to do with a message that has no key. Default `"reject"`.
    #[serde(default)]
    pub on_missing_key: OnMissingKey,
    /// `"enforce"` drops duplicates; `"observe"` forwards everything and counts them.
    /// Default `"enforce"`.
    #[serde(default)]
    pub mode: Mode,
}

/// `routes.NAME.key`: `message_id`, `header:NAME`, `body`, `json:/pointer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum KeySpec {
    /// The AMQP `message_id` property.
    #[default]
    MessageId,
    /// A header value (any AMQP field type, canonically encoded).
    Header(String),
    /// A hash of the body bytes.
    Body,
    /// A JSON pointer (RFC 6901) into a JSON body.
    Json(String),
}

impl TryFrom<String> for KeySpec {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s == "message_id" {
            Ok(KeySpec::MessageId)
        } else if s == "body" {
            Ok(KeySpec::Body)
        } else if let Some(name) = s.strip_prefix("header:").filter(|n| !n.is_empty()) {
            Ok(KeySpec::Header(name.to_owned()))
        } else if let Some(ptr) = s.strip_prefix("json:").filter(|p| p.starts_with('/')) {
            Ok(KeySpec::Json(ptr.to_owned()))
        } else {
            Err(format!(
                "unknown key source {s:?}: use \"message_id\", \"header:NAME\", \"body\" \
                 or \"json:/json/pointer\""
            ))
        }
    }
}

/// `routes.NAME.on_missing_key`
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnMissingKey {
    /// Nack without requeue, so the queue's dead-letter exchange receives it.
    #[default]
    Reject,
    /// Forward without dedup.
    Forward,
    /// Use the body hash as the key.
    HashBody,
}

/// `routes.NAME.mode`
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Drop duplicates.
    #[default]
    Enforce,
    /// Forward everything, count what would have been dropped.
    Observe,
}

/// Why a config could not be loaded. Messages name the key and say how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not fit the schema (unknown key, wrong type).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// `${VAR}` named a variable that is not set.
    #[error("{path}: environment variable ${{{var}}} is not set (used at line {line})")]
    MissingEnv {
        /// The file.
        path: PathBuf,
        /// The variable.
        var: String,
        /// 1-based line of the reference.
        line: usize,
    },
    /// A value parsed but makes no sense.
    #[error("{key}: {message}")]
    Invalid {
        /// Dotted key path, e.g. `routes.orders.routing_key`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

fn default_prefetch() -> u16 {
    2000
}
fn default_store_url() -> StoreUrl {
    StoreUrl::One("redis://127.0.0.1:6379/0".into())
}
fn default_key_prefix() -> String {
    "dedupd".into()
}
fn default_lease() -> Duration {
    Duration::from_secs(30)
}
fn default_store_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_metrics_listen() -> String {
    "127.0.0.1:9187".into()
}
fn default_batch_size() -> usize {
    500
}
fn default_publish_window() -> usize {
    1000
}
fn default_confirm_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_backoff_min() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(5)
}
fn default_window() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: StoreKind::default(),
            url: default_store_url(),
            key_prefix: default_key_prefix(),
            lease: default_lease(),
            on_error: OnStoreError::default(),
            timeout: default_store_timeout(),
            tls: None,
            allow_eviction: false,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
        }
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            batch_size: default_batch_size(),
            publish_window: default_publish_window(),
            confirm_timeout: default_confirm_timeout(),
            shutdown_grace: default_shutdown_grace(),
            backoff_min: default_backoff_min(),
            backoff_max: default_backoff_max(),
        }
    }
}

impl Config {
    /// Reads, interpolates `${VAR}`, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates TOML text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let src = interpolate(text, path)?;
        let config: Config =
            toml::from_str(&src.text).map_err(|e| src.parse_error(e, text, path))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: returns the first problem, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_brokers()?;
        self.store.validate()?;
        self.validate_tuning()?;
        self.validate_routes()
    }

    /// The downstream URL, defaulting to the upstream one.
    pub fn downstream_url(&self) -> &str {
        self.downstream
            .as_ref()
            .and_then(|d| d.url.as_deref())
            .unwrap_or(&self.upstream.url)
    }

    /// The downstream TLS settings (the upstream ones when the downstream URL is defaulted).
    pub fn downstream_tls(&self) -> Option<&Tls> {
        match &self.downstream {
            Some(Downstream { url: Some(_), tls }) => tls.as_ref(),
            Some(Downstream {
                url: None,
                tls: Some(tls),
            }) => Some(tls),
            _ => self.upstream.tls.as_ref(),
        }
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Longest AMQP short string (queue, exchange and routing key names, header names, consumer
/// tags): the broker refuses longer ones, so a route with one would fail at run time.
const MAX_SHORTSTR: usize = 255;

/// Longest route name: the consumer tag `dedupd-{route}-{instance}-{epoch}` is a short string,
/// and `dedupd-` (7), the 16 hex digits of the instance, an epoch of up to 20 digits and two
/// dashes take 45 of its 255 bytes.
pub const MAX_ROUTE_NAME: usize = MAX_SHORTSTR - 45;

/// Longest `store.key_prefix`: it is repeated in every remembered key, so it is Redis memory
/// per key; 64 bytes is room for any naming scheme.
const MAX_KEY_PREFIX: usize = 64;

/// Refuses a name the broker would refuse at run time.
fn check_shortstr(key: &str, value: &str, what: &str) -> Result<(), ConfigError> {
    if value.len() > MAX_SHORTSTR {
        return Err(invalid(
            key,
            format!(
                "is {} bytes long: AMQP limits {what} to {MAX_SHORTSTR} bytes, and the broker \
                 would refuse it at run time; use a shorter name",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Refuses a duration outside `min..=max`, saying `why` the bounds are there.
fn check_duration(
    key: &str,
    value: Duration,
    (min, max): (Duration, Duration),
    why: &str,
    default: &str,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!(
                "is {}: use \"{}\" to \"{}\" ({why}); the default is \"{default}\"",
                fmt_duration(value),
                fmt_bound(min),
                fmt_bound(max)
            ),
        ));
    }
    Ok(())
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// `store.lease` bounds. Below 1s a claim can expire while its publish is still in flight on a
/// merely slow broker or store, and another instance forwards a duplicate; above 1h the
/// messages of a crashed instance wait that long before they are forwarded again.
pub const LEASE_BOUNDS: (Duration, Duration) = (SECOND, HOUR);
/// `store.timeout` bounds: under 10ms a healthy store on another host counts as down; over 60s
/// a store that stopped answering stalls every route that long before it counts as down.
pub const STORE_TIMEOUT_BOUNDS: (Duration, Duration) = (Duration::from_millis(10), MINUTE);
/// `routes.*.window` bounds: under 1s nothing is deduplicated; over 365 days is past any
/// retry horizon, costs Redis memory for every key that long, and nears the expiry times
/// Redis accepts.
pub const WINDOW_BOUNDS: (Duration, Duration) = (SECOND, Duration::from_secs(365 * 86_400));
/// `tuning.confirm_timeout` bounds: confirms of persistent messages wait for the broker's disk,
/// so under 1s a loaded but healthy broker has its publishes counted as failed and sent again
/// (duplicates); over 10 minutes a stuck broker holds the route's messages that long.
pub const CONFIRM_TIMEOUT_BOUNDS: (Duration, Duration) = (SECOND, Duration::from_secs(600));
/// `tuning.shutdown_grace` and `tuning.backoff_max` bounds: longer than an hour reads like a
/// unit mistake, and service managers kill a process that takes that long to stop anyway.
pub const MAX_WAIT: Duration = HOUR;

impl Config {
    fn validate_brokers(&self) -> Result<(), ConfigError> {
        check_amqp_url("upstream.url", &self.upstream.url)?;
        if self.upstream.prefetch == 0 {
            // basic.qos 0 means "unlimited": a stalled store would buffer the whole queue here.
            return Err(invalid(
                "upstream.prefetch",
                "must be at least 1 (0 means unlimited in AMQP); the default is 2000",
            ));
        }
        let up = [self.upstream.url.as_str()];
        check_tls(
            "upstream.tls",
            self.upstream.tls.as_ref(),
            &up,
            "upstream.url",
            "amqps://",
        )?;
        if let Some(down) = &self.downstream {
            let url_key = match &down.url {
                Some(url) => {
                    check_amqp_url("downstream.url", url)?;
                    "downstream.url"
                }
                None => "upstream.url (which downstream.url defaults to)",
            };
            let urls = [self.downstream_url()];
            check_tls(
                "downstream.tls",
                down.tls.as_ref(),
                &urls,
                url_key,
                "amqps://",
            )?;
        }
        Ok(())
    }

    fn validate_tuning(&self) -> Result<(), ConfigError> {
        if self.metrics.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "{:?} is not IP:PORT: write e.g. \"127.0.0.1:9187\" or \"0.0.0.0:9187\" \
                     (host names are not accepted)",
                    self.metrics.listen
                ),
            ));
        }
        let t = &self.tuning;
        if !(1..=10_000).contains(&t.batch_size) {
            return Err(invalid(
                "tuning.batch_size",
                format!("is {}: use 1 to 10000; the default is 500", t.batch_size),
            ));
        }
        if t.publish_window == 0 {
            return Err(invalid(
                "tuning.publish_window",
                "must be at least 1, or nothing is ever published; the default is 1000",
            ));
        }
        check_duration(
            "tuning.confirm_timeout",
            t.confirm_timeout,
            CONFIRM_TIMEOUT_BOUNDS,
            "a confirm of a persistent message waits for the broker's disk: a shorter timeout \
             republishes what a busy broker was about to confirm, a longer one holds messages \
             behind a stuck broker",
            "15s",
        )?;
        check_duration(
            "tuning.shutdown_grace",
            t.shutdown_grace,
            (Duration::ZERO, MAX_WAIT),
            "how long SIGTERM waits for in-flight messages; longer reads like a unit mistake",
            "10s",
        )?;
        check_duration(
            "tuning.backoff_max",
            t.backoff_max,
            (Duration::ZERO, MAX_WAIT),
            "the longest wait before reconnecting; longer reads like a unit mistake",
            "5s",
        )?;
        if t.backoff_min.is_zero() {
            // The backoff doubles from backoff_min: from zero it would retry in a hot loop.
            return Err(invalid(
                "tuning.backoff_min",
                "must be longer than 0 (it doubles up to backoff_max); the default is \"100ms\"",
            ));
        }
        if t.backoff_min > t.backoff_max {
            return Err(invalid(
                "tuning.backoff_min",
                format!(
                    "{} is longer than tuning.backoff_max ({}): lower backoff_min or raise backoff_max",
                    fmt_duration(t.backoff_min),
                    fmt_duration(t.backoff_max)
                ),
            ));
        }
        Ok(())
    }

    fn validate_routes(&self) -> Result<(), ConfigError> {
        if self.routes.is_empty() {
            return Err(invalid(
                "routes",
                "no route is configured: add a [routes.NAME] table with at least `queue`",
            ));
        }
        // A default-exchange publish only loops back when it lands on the broker it came from.
        // Asked lazily: it may resolve host names, which only such routes need.
        let same_broker_cell = std::cell::OnceCell::new();
        let same_broker = || {
            *same_broker_cell.get_or_init(|| same_broker(&self.upstream.url, self.downstream_url()))
        };
        let mut consumers: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, route) in &self.routes {
            let key = |field: &str| format!("routes.{name}.{field}");
            let name_ok = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if name.is_empty() || !name_ok {
                return Err(invalid(
                    format!("routes.{name}"),
                    "route names may only use A-Z a-z 0-9 _ . - (they go into store keys and \
                     metric labels): rename the table",
                ));
            }
            if name.len() > MAX_ROUTE_NAME {
                return Err(invalid(
                    format!("routes.{name}"),
                    format!(
                        "the route name is {} bytes long: use at most {MAX_ROUTE_NAME} (it goes \
                         into the AMQP consumer tag, which is limited to {MAX_SHORTSTR}); rename \
                         the table",
                        name.len()
                    ),
                ));
            }
            let queue = route.queue.as_str();
            if queue.is_empty() {
                return Err(invalid(
                    key("queue"),
                    "is empty: name the upstream queue to consume",
                ));
            }
            check_shortstr(&key("queue"), queue, "queue names")?;
            check_shortstr(&key("exchange"), &route.exchange, "exchange names")?;
            if let Some(rk) = &route.routing_key {
                check_shortstr(&key("routing_key"), rk, "routing keys")?;
            }
            if let KeySpec::Header(header) = &route.key {
                // A longer header name cannot occur in a message: every message would miss it.
                check_shortstr(&key("key"), header, "header names")?;
            }
            if let Some(other) = consumers.insert(queue, name) {
                return Err(invalid(
                    key("queue"),
                    format!(
                        "route {other:?} already consumes {queue:?}: two routes would split one \
                         stream between two dedup namespaces; keep one route per queue"
                    ),
                ));
            }
            if route.exchange.is_empty() {
                match route.routing_key.as_deref() {
                    Some("") => {
                        return Err(invalid(
                            key("routing_key"),
                            "is empty, and the default exchange (exchange = \"\") routes an \
                             empty key nowhere: name the downstream queue",
                        ));
                    }
                    None if same_broker() => {
                        return Err(invalid(
                            key("routing_key"),
                            format!(
                                "is required with exchange = \"\": the default exchange delivers \
                                 to the queue named by the message's own routing key, which for \
                                 messages published straight to {queue:?} is {queue:?} itself (a \
                                 forwarding loop); set routing_key to the downstream queue, or \
                                 set exchange"
                            ),
                        ));
                    }
                    Some(rk) if rk == queue && same_broker() => {
                        return Err(invalid(
                            key("routing_key"),
                            format!(
                                "{rk:?} with exchange = \"\" publishes back into the route's own \
                                 queue (a forwarding loop): name a different downstream queue"
                            ),
                        ));
                    }
                    _ => {}
                }
            }
            check_duration(
                &key("window"),
                route.window,
                WINDOW_BOUNDS,
                "how long a forwarded key is remembered: every key costs Redis memory for that \
                 long, and Redis limits expiry times",
                "24h",
            )?;
        }
        Ok(())
    }

    /// The human summary `dedupd check` prints: endpoints (passwords redacted), store settings
    /// and one line per route.
    pub fn describe(&self) -> String {
        let s = &self.store;
        let tls = |t: Option<&Tls>| if t.is_some() { " (tls settings)" } else { "" };
        let store_url = match (&s.kind, &s.url) {
            (StoreKind::Memory, _) => "in-process, not shared".to_owned(),
            (StoreKind::Redis, StoreUrl::One(url)) => redact_url(url),
            (StoreKind::Redis, StoreUrl::Cluster(urls)) => {
                let urls: Vec<String> = urls.iter().map(|u| redact_url(u)).collect();
                format!("cluster [{}]", urls.join(", "))
            }
        };
        let mut out = format!(
            "upstream:   {}{}, prefetch {}\n\
             downstream: {}{}\n\
             store:      {} {}{}, key_prefix {}, lease {}, timeout {}, on_error {}\n\
             metrics:    {}\n\
             routes:\n",
            redact_url(&self.upstream.url),
            tls(self.upstream.tls.as_ref()),
            self.upstream.prefetch,
            redact_url(self.downstream_url()),
            tls(self.downstream_tls()),
            s.kind,
            store_url,
            tls(s.tls.as_ref().filter(|_| s.kind == StoreKind::Redis)),
            s.key_prefix,
            fmt_duration(s.lease),
            fmt_duration(s.timeout),
            s.on_error,
            self.metrics.listen,
        );
        for (name, r) in &self.routes {
            let routing_key = r.routing_key.as_deref().unwrap_or("(the message's own)");
            out.push_str(&format!(
                "  {name}: {} -> exchange {:?} routing_key {routing_key}, key {}, window {}, \
                 on_missing_key {}, mode {}\n",
                r.queue,
                r.exchange,
                r.key,
                fmt_duration(r.window),
                r.on_missing_key,
                r.mode,
            ));
        }
        out
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        // kind = "memory" never connects, so its url and tls are ignored rather than checked.
        if self.kind == StoreKind::Redis {
            let urls: Vec<&str> = match &self.url {
                StoreUrl::One(url) => vec![url.as_str()],
                StoreUrl::Cluster(urls) => urls.iter().map(String::as_str).collect(),
            };
            if urls.is_empty() {
                return Err(invalid(
                    "store.url",
                    "the cluster list is empty: give at least one seed node, \
                     e.g. [\"redis://10.0.0.1:6379\"]",
                ));
            }
            let cluster = matches!(self.url, StoreUrl::Cluster(_));
            for url in &urls {
                check_redis_url(url, cluster)?;
            }
            if cluster
                && urls
                    .iter()
                    .any(|u| u.starts_with("rediss://") != urls[0].starts_with("rediss://"))
            {
                return Err(invalid(
                    "store.url",
                    "mixes redis:// and rediss://: use one scheme for every cluster node",
                ));
            }
            check_tls(
                "store.tls",
                self.tls.as_ref(),
                &urls,
                "store.url",
                "rediss://",
            )?;
        }
        if self.key_prefix.len() > MAX_KEY_PREFIX {
            return Err(invalid(
                "store.key_prefix",
                format!(
                    "is {} bytes long: use at most {MAX_KEY_PREFIX} (it is repeated in every \
                     remembered key); the default is \"dedupd\"",
                    self.key_prefix.len()
                ),
            ));
        }
        if self.key_prefix.is_empty() || self.key_prefix.chars().any(char::is_whitespace) {
            return Err(invalid(
                "store.key_prefix",
                format!(
                    "{:?} must be non-empty and without whitespace; the default is \"dedupd\"",
                    self.key_prefix
                ),
            ));
        }
        check_duration(
            "store.lease",
            self.lease,
            LEASE_BOUNDS,
            "a claim must outlive its publish and confirm, or a slow broker lets another \
             instance forward a duplicate; a crashed instance's messages wait out the lease, \
             so a few seconds take over fast",
            "30s",
        )?;
        check_duration(
            "store.timeout",
            self.timeout,
            STORE_TIMEOUT_BOUNDS,
            "the deadline of one store round trip: shorter fails a healthy remote store, \
             longer stalls every route behind a dead one",
            "2s",
        )?;
        Ok(())
    }
}

fn check_amqp_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let shown = redact_url(url);
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(invalid(
            key,
            format!(
                "{shown:?} is not an AMQP URL: write amqp://user:password@host:5672/vhost \
                 (amqps:// for TLS)"
            ),
        ));
    }
    match url.parse::<AMQPUri>() {
        Err(e) => Err(invalid(
            key,
            format!(
                "{shown:?} does not parse ({}): write amqp://user:password@host:5672/vhost, \
                 percent-encoding special characters in the password",
                redact_in_text(&e.replace(url, &shown))
            ),
        )),
        // lapin reads "amqp://host/" as the vhost "", which RabbitMQ does not have.
        Ok(uri) if uri.vhost.is_empty() => Err(invalid(
            key,
            format!(
                "{shown:?} names the empty virtual host: end it with /%2f for the default \
                 vhost \"/\", or drop the trailing slash"
            ),
        )),
        Ok(_) => Ok(()),
    }
}

fn check_redis_url(url: &str, cluster: bool) -> Result<(), ConfigError> {
    let shown = redact_url(url);
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(invalid(
            "store.url",
            format!(
                "{shown:?} is not a Redis URL: write redis://[:password@]host:6379/db \
                 (rediss:// for TLS)"
            ),
        ));
    }
    match redis::IntoConnectionInfo::into_connection_info(url) {
        Err(e) => Err(invalid(
            "store.url",
            format!(
                "{shown:?} does not parse ({}): write redis://[:password@]host:6379/db",
                redact_in_text(&e.to_string().replace(url, &shown))
            ),
        )),
        Ok(info) if cluster && info.redis_settings().db() != 0 => Err(invalid(
            "store.url",
            format!(
                "{shown:?} selects a database, but Redis Cluster only has database 0: drop the /db"
            ),
        )),
        Ok(_) => Ok(()),
    }
}

/// Checks a `tls` table against the URLs it applies to (`url_key` names them in messages).
fn check_tls(
    key: &str,
    tls: Option<&Tls>,
    urls: &[&str],
    url_key: &str,
    scheme: &str,
) -> Result<(), ConfigError> {
    let Some(tls) = tls else { return Ok(()) };
    if let Some(plain) = urls.iter().find(|u| !u.starts_with(scheme)) {
        return Err(invalid(
            key,
            format!(
                "TLS settings need a {scheme} URL, but {url_key} is {:?}: change it to {scheme}",
                redact_url(plain)
            ),
        ));
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(_), None) => {
            return Err(invalid(
                format!("{key}.key_file"),
                "is missing: cert_file and key_file go together (the client certificate and its \
                 private key)",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                format!("{key}.cert_file"),
                "is missing: cert_file and key_file go together (the client certificate and its \
                 private key)",
            ));
        }
        _ => {}
    }
    let files = [
        ("ca_file", &tls.ca_file),
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
    ];
    for (field, file) in files {
        if let Some(file) = file.as_deref().filter(|f| !f.is_file()) {
            return Err(invalid(
                format!("{key}.{field}"),
                format!(
                    "{} is not a file: give the path of a PEM file (relative paths start at the \
                     working directory)",
                    file.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Whether two AMQP URLs reach the same broker and vhost (credentials may differ), however the
/// host is spelled: `localhost` and `127.0.0.1` are one broker. Same port and vhost, and either
/// the same host name or any address in common once both names are resolved.
///
/// Unparsable URLs count as the same: the checks that depend on it then err on the safe side.
/// A name that does not resolve (yet: `check` may run where production DNS is not) counts as
/// another broker, so a config is never refused for DNS being away.
fn same_broker(a: &str, b: &str) -> bool {
    let (Ok(a), Ok(b)) = (a.parse::<AMQPUri>(), b.parse::<AMQPUri>()) else {
        return true;
    };
    if a.authority.port != b.authority.port || a.vhost != b.vhost {
        return false;
    }
    if a.authority.host.eq_ignore_ascii_case(&b.authority.host) {
        return true;
    }
    let resolve = |host: &str| -> Vec<std::net::IpAddr> {
        // `ToSocketAddrs` takes IPv6 literals without the brackets URLs put around them.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        std::net::ToSocketAddrs::to_socket_addrs(&(host, a.authority.port))
            .map(|addrs| addrs.map(|addr| addr.ip()).collect())
            .unwrap_or_default()
    };
    let theirs = resolve(&b.authority.host);
    resolve(&a.authority.host)
        .iter()
        .any(|ip| theirs.contains(ip))
}

/// A bound in a message: whole days as days (`365d`, which humantime reads), else as
/// [`fmt_duration`].
fn fmt_bound(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() == 0 && secs >= 2 * 86_400 && secs.is_multiple_of(86_400) {
        format!("{}d", secs / 86_400)
    } else {
        fmt_duration(d)
    }
}

/// A duration in the largest whole unit, so it reads like the config (`24h`, not `1day`).
fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        humantime::format_duration(d).to_string()
    } else if ms == 0 || !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// `url` with any password replaced by `***`, for logs and `check` output.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    // The last '@' ends the userinfo; an unencoded '/' or '@' in a password then errs towards
    // hiding too much rather than too little.
    match rest.rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end + 3],
                &rest[..colon],
                &rest[at..]
            ),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// `text` with anything that may be a password hidden, for messages that may quote a config
/// line or value, whatever its syntax.
///
/// A broken line cannot be trusted to delimit a URL: `"`, `'`, `,`, `]`, `#`, `@`, `:` and
/// spaces are all legal in a password, and a TOML syntax error is exactly when a quote in one
/// ends the string early. So each line is treated on its own: on a line with an `@`, everything
/// from its first `:` to its *last* `@` may be userinfo. If that `:` starts `://`, a plain user
/// name right after it is kept (`amqp://user:***@host`); otherwise (a URL fragment quoted
/// without its scheme) all of it goes (`...:***@host`). This hides too much rather than too
/// little, and only ever runs on error messages.
fn redact_in_text(text: &str) -> String {
    text.split_inclusive('\n').map(redact_line).collect()
}

fn redact_line(line: &str) -> String {
    let Some(at) = line.rfind('@') else {
        return line.to_owned();
    };
    let Some(colon) = line[..at].find(':') else {
        return line.to_owned();
    };
    if !line[colon..].starts_with("://") {
        // `user:password@host` without a scheme, or a scheme after the first `:` (inside a
        // password, for all we know).
        return format!("{}:***{}", &line[..colon], &line[at..]);
    }
    let scheme_end = colon + 3;
    let userinfo = &line[scheme_end..at];
    // A user name as URLs spell it; anything else may be the tail of a broken password.
    let plain = |user: &str| {
        user.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '%'))
    };
    let shown = match userinfo.split_once(':') {
        Some((user, _)) if plain(user) => format!("{user}:***"),
        None if plain(userinfo) => userinfo.to_owned(),
        _ => "***".to_owned(),
    };
    format!("{}{shown}{}", &line[..scheme_end], &line[at..])
}

/// The kind of TOML string a `${VAR}` sits in: it decides how the value is escaped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    Basic,
    MultiBasic,
    Literal,
    MultiLiteral,
}

impl Quote {
    fn delimiter(self) -> &'static str {
        match self {
            Quote::Basic => "\"",
            Quote::MultiBasic => "\"\"\"",
            Quote::Literal => "'",
            Quote::MultiLiteral => "'''",
        }
    }
}

/// One replaced span: `len` bytes at `at` in the interpolated text were `orig_len` at `orig_at`.
struct Substitution {
    at: usize,
    len: usize,
    orig_at: usize,
    orig_len: usize,
}

/// The TOML text after `${VAR}` interpolation, with what is needed to point parse errors back
/// at the original text and keep the substituted values out of them.
struct Interpolated {
    text: String,
    subs: Vec<Substitution>,
    /// `(name, value)` of every substituted variable.
    values: Vec<(String, String)>,
}

/// Replaces `${VAR}` inside quoted strings (comments and bare words are left alone) with the
/// variable's value, escaped for the kind of string it is in, so a value can never end the
/// string or add keys. `$${` stands for a literal `${`. Line numbers are preserved.
fn interpolate(text: &str, path: &Path) -> Result<Interpolated, ConfigError> {
    let parse_err = |line: usize, message: String| ConfigError::Parse {
        path: path.to_owned(),
        message: format!("line {line}: {message}"),
    };
    let mut out = Interpolated {
        text: String::with_capacity(text.len()),
        subs: Vec::new(),
        values: Vec::new(),
    };
    let (mut line, mut in_comment, mut quote) = (1, false, None::<Quote>);
    let mut i = 0;
    while let Some(c) = text[i..].chars().next() {
        let rest = &text[i..];
        let mut take = c.len_utf8();
        match quote {
            None if in_comment => in_comment = c != '\n',
            None => {
                let opened = [
                    Quote::MultiBasic,
                    Quote::MultiLiteral,
                    Quote::Basic,
                    Quote::Literal,
                ]
                .into_iter()
                .find(|q| rest.starts_with(q.delimiter()));
                if let Some(q) = opened {
                    take = q.delimiter().len();
                    quote = Some(q);
                }
                in_comment = c == '#';
            }
            Some(q) => {
                if matches!(q, Quote::Basic | Quote::MultiBasic) && c == '\\' {
                    // Copy an escape whole, so `\"` does not end the string.
                    take += rest[1..].chars().next().map_or(0, char::len_utf8);
                } else if rest.starts_with(q.delimiter()) {
                    // A multi-line string may end with up to two extra quotes of content.
                    let d = q.delimiter();
                    take = rest.len() - rest.trim_start_matches(&d[..1]).len();
                    take = take.min(d.len() + 2 * usize::from(d.len() == 3));
                    quote = None;
                } else if c == '\n' && matches!(q, Quote::Basic | Quote::Literal) {
                    // Unterminated: leave the error to the TOML parser.
                    quote = None;
                } else if rest.starts_with("$${") {
                    out.substitute(i, 3, "${");
                    i += 3;
                    continue;
                } else if let Some(after) = rest.strip_prefix("${") {
                    let name = after.split_once('}').map(|(n, _)| n).filter(|n| {
                        n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    });
                    let Some(name) = name else {
                        return Err(parse_err(
                            line,
                            "`${` must start a reference like ${NAME} (letters, digits, _); \
                             write $${ for a literal ${"
                                .into(),
                        ));
                    };
                    let value = match std::env::var(name) {
                        Ok(value) => value,
                        Err(std::env::VarError::NotPresent) => {
                            return Err(ConfigError::MissingEnv {
                                path: path.to_owned(),
                                var: name.to_owned(),
                                line,
                            });
                        }
                        Err(std::env::VarError::NotUnicode(_)) => {
                            return Err(parse_err(
                                line,
                                format!("environment variable ${{{name}}} is not valid UTF-8"),
                            ));
                        }
                    };
                    let escaped = match q {
                        Quote::Basic | Quote::MultiBasic => escape_basic(&value),
                        // Literal strings have no escapes: refuse what they cannot hold.
                        _ if value
                            .contains(|c: char| c == '\'' || (c.is_control() && c != '\t')) =>
                        {
                            return Err(parse_err(
                                line,
                                format!(
                                    "${{{name}}} holds a quote or control character, which a \
                                     '...' string cannot contain: use a \"...\" string"
                                ),
                            ));
                        }
                        _ => value.clone(),
                    };
                    let ref_len = name.len() + 3;
                    out.substitute(i, ref_len, &escaped);
                    out.values.push((name.to_owned(), value));
                    i += ref_len;
                    continue;
                }
            }
        }
        line += rest[..take].matches('\n').count();
        out.text.push_str(&rest[..take]);
        i += take;
    }
    Ok(out)
}

/// `value` escaped for a TOML basic string: quotes, backslashes and control characters.
fn escape_basic(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

impl Interpolated {
    /// Appends `replacement` for the `orig_len` bytes at `orig_at` of the original text.
    fn substitute(&mut self, orig_at: usize, orig_len: usize, replacement: &str) {
        self.subs.push(Substitution {
            at: self.text.len(),
            len: replacement.len(),
            orig_at,
            orig_len,
        });
        self.text.push_str(replacement);
    }

    /// The original-text offset of `pos` in the interpolated text (a position inside a
    /// substituted value maps to the start of its `${VAR}`).
    fn to_original(&self, pos: usize) -> usize {
        let (mut from, mut to) = (0, 0);
        for s in &self.subs {
            if pos < s.at {
                break;
            }
            if pos < s.at + s.len {
                return s.orig_at;
            }
            (from, to) = (s.at + s.len, s.orig_at + s.orig_len);
        }
        to + (pos - from)
    }

    /// Renders toml's error like toml does (line, column, the line, carets, message), but
    /// quoting the original line, so an interpolated secret never shows; values quoted by the
    /// message itself are replaced by their `${VAR}`, and URL passwords are redacted.
    fn parse_error(&self, err: toml::de::Error, original: &str, path: &Path) -> ConfigError {
        let message = match err.span() {
            Some(span) => {
                let start = self.to_original(span.start).min(original.len());
                let line_start = original[..start].rfind('\n').map_or(0, |p| p + 1);
                let line_end = original[start..]
                    .find('\n')
                    .map_or(original.len(), |p| start + p);
                let end = self.to_original(span.end).clamp(start, line_end);
                let line_no = original[..line_start].matches('\n').count() + 1;
                let column = original[line_start..start].chars().count();
                let width = original
                    .get(start..end)
                    .map_or(1, |s| s.chars().count().max(1));
                let gutter = " ".repeat(line_no.to_string().len());
                format!(
                    "TOML parse error at line {line_no}, column {}\n{gutter} |\n{line_no} | {}\n\
                     {gutter} | {}{}\n{}",
                    column + 1,
                    original[line_start..line_end].trim_end_matches('\r'),
                    " ".repeat(column),
                    "^".repeat(width),
                    err.message().trim_end(),
                )
            }
            None => {
                let mut err = err;
                err.set_input(None);
                err.to_string().trim_end().to_owned()
            }
        };
        // serde's message for an untagged enum names the Rust type, not what to write.
        let message = message.replace(
            "data did not match any variant of untagged enum StoreUrl",
            "expected a URL string, or a list of URL strings for Redis Cluster",
        );
        let mut message = redact_in_text(&message);
        // Short values would garble the message and hide little; four characters is a compromise.
        for (name, value) in self.values.iter().filter(|(_, v)| v.chars().count() >= 4) {
            // serde quotes strings with `{:?}`: scrub that form too.
            let debug = format!("{value:?}");
            for form in [value.as_str(), &debug[1..debug.len() - 1]] {
                message = message.replace(form, &format!("${{{name}}}"));
            }
        }
        ConfigError::Parse {
            path: path.to_owned(),
            message,
        }
    }
}

/// Writes each setting the way the config file spells it.
macro_rules! display_as_config {
    ($($ty:ty { $($variant:ident => $text:literal),+ $(,)? })+) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $(<$ty>::$variant => $text),+ })
            }
        }
    )+};
}

display_as_config! {
    StoreKind { Redis => "redis", Memory => "memory" }
    OnStoreError { Block => "block", Forward => "forward" }
    OnMissingKey { Reject => "reject", Forward => "forward", HashBody => "hash_body" }
    Mode { Enforce => "enforce", Observe => "observe" }
}

impl fmt::Display for KeySpec {
    /// The config spelling: `message_id`, `header:NAME`, `body`, `json:/pointer`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySpec::MessageId => f.write_str("message_id"),
            KeySpec::Header(name) => write!(f, "header:{name}"),
            KeySpec::Body => f.write_str("body"),
            KeySpec::Json(ptr) => write!(f, "json:{ptr}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[upstream]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"

[store]
kind = "memory"

[routes.orders]
queue = "orders.in"
exchange = ""
routing_key = "orders.out"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    /// Parses `text`, expecting a validation error, and returns `(key, message)`.
    fn invalid_of(text: &str) -> (String, String) {
        match parse(text) {
            Err(ConfigError::Invalid { key, message }) => (key, message),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// Asserts that `BASE` with `from` replaced by `to` is refused for `key`, message containing `hint`.
    fn refused(from: &str, to: &str, key: &str, hint: &str) {
        assert!(BASE.contains(from), "{from:?} not in BASE");
        let (k, message) = invalid_of(&BASE.replacen(from, to, 1));
        assert_eq!(k, key, "{message}");
        assert!(message.contains(hint), "{key}: {message:?} lacks {hint:?}");
    }

    #[test]
    fn base_is_valid_with_defaults() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.upstream.prefetch, 2000);
        assert_eq!(c.routes["orders"].window, Duration::from_secs(86400));
        assert_eq!(c.downstream_url(), c.upstream.url);
        assert_eq!(c.tuning.batch_size, 500);
    }

    #[test]
    fn interpolates_env_in_strings_only() {
        std::env::set_var("DEDUPD_T_INTERP_PW", "s3cret");
        let text = BASE.replace("guest:guest@", "guest:${DEDUPD_T_INTERP_PW}@")
            + "# ${DEDUPD_T_UNSET_IN_COMMENT} is ignored in comments\n";
        let c = parse(&text).unwrap();
        assert_eq!(c.upstream.url, "amqp://guest:s3cret@127.0.0.1:5672/%2f");
    }

    #[test]
    fn dollar_dollar_is_a_literal() {
        let c = parse(&BASE.replace("orders.out", "out$${NOT_A_VAR}")).unwrap();
        assert_eq!(
            c.routes["orders"].routing_key.as_deref(),
            Some("out${NOT_A_VAR}")
        );
    }

    #[test]
    fn missing_env_names_var_and_line() {
        let text = BASE.replace("orders.out", "${DEDUPD_T_SURELY_UNSET}");
        match parse(&text) {
            Err(ConfigError::MissingEnv { var, line, .. }) => {
                assert_eq!(var, "DEDUPD_T_SURELY_UNSET");
                assert_eq!(line, 11);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_reference_is_refused() {
        let err = parse(&BASE.replace("orders.out", "a${oops")).unwrap_err();
        assert!(err.to_string().contains("line 11"), "{err}");
    }

    #[test]
    fn quotes_in_values_cannot_break_out() {
        let evil = "x\"\nprefetch = 1\nq = \"\\";
        std::env::set_var("DEDUPD_T_EVIL", evil);
        let c = parse(&BASE.replace("orders.out", "${DEDUPD_T_EVIL}")).unwrap();
        assert_eq!(c.routes["orders"].routing_key.as_deref(), Some(evil));
        assert_eq!(c.upstream.prefetch, 2000);
        // Multi-line basic strings take the same escaping.
        let c = parse(&BASE.replace("\"orders.out\"", "\"\"\"${DEDUPD_T_EVIL}\"\"\"")).unwrap();
        assert_eq!(c.routes["orders"].routing_key.as_deref(), Some(evil));
        // Literal strings cannot escape, so such a value is refused instead.
        let err = parse(&BASE.replace("\"orders.out\"", "'${DEDUPD_T_EVIL}'")).unwrap_err();
        assert!(err.to_string().contains("\"...\" string"), "{err}");
        std::env::set_var("DEDUPD_T_PLAIN", "plain.out");
        let c = parse(&BASE.replace("\"orders.out\"", "'${DEDUPD_T_PLAIN}'")).unwrap();
        assert_eq!(c.routes["orders"].routing_key.as_deref(), Some("plain.out"));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = BASE.replace("url = ", "prefecth = 10\nurl = ");
        let err = parse(&text).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Parse { .. }), "{msg}");
        assert!(msg.contains("prefecth"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn parse_errors_do_not_show_interpolated_secrets() {
        std::env::set_var("DEDUPD_T_PARSE_PW", "hunter2\"hunter2");
        let text = BASE.replace(
            "[store]",
            "[store]\nlease = \"${DEDUPD_T_PARSE_PW}\"\nkey_prefix = 7",
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("line"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        let text = BASE.replace("url = \"amqp", "url = 5\nurll = \"amqp");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(!msg.contains("guest:guest"), "{msg}");
    }

    #[test]
    fn column_points_at_the_original_text() {
        // The value is longer than `${DEDUPD_T_COL}`: the column must not count it.
        std::env::set_var("DEDUPD_T_COL", "a-much-longer-value-than-its-reference");
        let text = BASE.replace(
            "exchange = \"\"",
            "exchange = \"\"\nwhat = \"${DEDUPD_T_COL}\"; x = 1",
        );
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.contains("line 11, column 25"), "{msg}");
        assert!(
            msg.contains("11 | what = \"${DEDUPD_T_COL}\"; x = 1"),
            "{msg}"
        );
    }

    #[test]
    fn broker_urls() {
        refused("amqp://guest", "http://guest", "upstream.url", "amqp://");
        refused(
            "127.0.0.1:5672",
            "127.0.0.1:notaport",
            "upstream.url",
            "does not parse",
        );
        refused("5672/%2f", "5672/", "upstream.url", "/%2f");
        refused(
            "[store]",
            "[downstream]\nurl = \"redis://x\"\n[store]",
            "downstream.url",
            "amqp://",
        );
        refused(
            "%2f\"",
            "%2f\"\nprefetch = 0",
            "upstream.prefetch",
            "at least 1",
        );
        // Passwords stay out of messages.
        let (_, message) = invalid_of(&BASE.replace("amqp://", "ftp://"));
        assert!(!message.contains("guest:guest"), "{message}");
    }

    #[test]
    fn store_rules() {
        let redis = |rest: &str| format!("kind = \"redis\"\n{rest}");
        let kind = "kind = \"memory\"";
        refused(kind, &redis("url = \"http://x\""), "store.url", "redis://");
        refused(kind, &redis("url = []"), "store.url", "at least one");
        refused(
            kind,
            &redis("url = [\"redis://a\", \"rediss://b\"]"),
            "store.url",
            "one scheme",
        );
        refused(
            kind,
            &redis("url = [\"redis://a/3\"]"),
            "store.url",
            "database 0",
        );
        refused(
            kind,
            &redis("url = \"redis://a/x\""),
            "store.url",
            "does not parse",
        );
        refused(kind, "key_prefix = \"\"", "store.key_prefix", "non-empty");
        refused(
            kind,
            "key_prefix = \"a b\"",
            "store.key_prefix",
            "whitespace",
        );
        refused(
            kind,
            "timeout = \"0s\"",
            "store.timeout",
            "\"10ms\" to \"1m\"",
        );
        // kind = "memory" ignores the url.
        parse(&BASE.replace(kind, "kind = \"memory\"\nurl = \"nonsense\"")).unwrap();
        parse(&BASE.replace(
            kind,
            &redis("url = [\"rediss://:pw@a:7000\", \"rediss://b\"]"),
        ))
        .unwrap();
    }

    #[test]
    fn tls_rules() {
        let tls = |table: &str, body: &str| format!("[{table}.tls]\n{body}\n[store]");
        let existing = file!(); // a file that exists while tests run from the crate root
        refused(
            "[store]",
            &tls("upstream", "ca_file = \"/x\""),
            "upstream.tls",
            "amqps://",
        );
        let amqps = BASE.replace("amqp://", "amqps://");
        let cases = [
            (
                "ca_file = \"/nonexistent/ca.pem\"",
                "upstream.tls.ca_file",
                "not a file",
            ),
            (
                "cert_file = \"/nonexistent\"",
                "upstream.tls.key_file",
                "go together",
            ),
            (
                "key_file = \"/nonexistent\"",
                "upstream.tls.cert_file",
                "go together",
            ),
        ];
        for (body, key, hint) in cases {
            let (k, m) = invalid_of(&amqps.replace("[store]", &tls("upstream", body)));
            assert_eq!((k.as_str(), m.contains(hint)), (key, true), "{m}");
        }
        parse(&amqps.replace(
            "[store]",
            &tls("upstream", &format!("ca_file = {existing:?}")),
        ))
        .unwrap();
        // A downstream that defaults to a plain upstream URL cannot take TLS settings.
        refused(
            "[store]",
            &tls("downstream", "ca_file = \"/x\""),
            "downstream.tls",
            "amqps://",
        );
        refused(
            "kind = \"memory\"",
            "kind = \"redis\"\n[store.tls]",
            "store.tls",
            "rediss://",
        );
    }

    #[test]
    fn metrics_and_tuning_rules() {
        let at = "[store]";
        let with = |s: &str| format!("{s}\n[store]");
        refused(
            at,
            &with("[metrics]\nlisten = \"localhost:9187\""),
            "metrics.listen",
            "IP:PORT",
        );
        let cases = [
            ("batch_size = 0", "tuning.batch_size", "1 to 10000"),
            ("batch_size = 10001", "tuning.batch_size", "1 to 10000"),
            ("publish_window = 0", "tuning.publish_window", "at least 1"),
            (
                "backoff_min = \"0s\"",
                "tuning.backoff_min",
                "longer than 0",
            ),
            ("backoff_min = \"10s\"", "tuning.backoff_min", "backoff_max"),
        ];
        for (line, key, hint) in cases {
            refused(at, &with(&format!("[tuning]\n{line}")), key, hint);
        }
    }

    #[test]
    fn route_rules() {
        let (key, _) = invalid_of(BASE.split("[routes.orders]").next().unwrap());
        assert_eq!(key, "routes");
        refused(
            "[routes.orders]",
            "[routes.\"or ders\"]",
            "routes.or ders",
            "A-Z",
        );
        refused("[routes.orders]", "[routes.\"\"]", "routes.", "A-Z");
        refused(
            "queue = \"orders.in\"",
            "queue = \"\"",
            "routes.orders.queue",
            "empty",
        );
        refused(
            "routing_key = \"orders.out\"",
            "window = \"500ms\"",
            "routes.orders.routing_key",
            "loop",
        );
        refused(
            "\"orders.out\"",
            "\"orders.in\"",
            "routes.orders.routing_key",
            "loop",
        );
        refused(
            "\"orders.out\"",
            "\"\"",
            "routes.orders.routing_key",
            "nowhere",
        );
        refused(
            "\"orders.out\"",
            "\"x\"\nwindow = \"500ms\"",
            "routes.orders.window",
            "1s",
        );
        let twin = "[routes.orders]\nqueue = \"orders.in\"\nexchange = \"x\"\n[routes.twin]";
        refused("[routes.orders]", twin, "routes.twin.queue", "\"orders\"");
        // With a non-default exchange, or on another broker, the message's own key is fine.
        parse(
            &BASE
                .replace("exchange = \"\"", "exchange = \"out\"")
                .replace("routing_key = \"orders.out\"", ""),
        )
        .unwrap();
        let other = "[downstream]\nurl = \"amqp://10.255.255.1:5672/%2f\"\n[store]";
        parse(
            &BASE
                .replace("[store]", other)
                .replace("routing_key = \"orders.out\"", ""),
        )
        .unwrap();
    }

    /// Values no operator means, each refused with its bounds and the reason for them; short
    /// leases of a few seconds stay valid with every other setting at its default.
    #[test]
    fn durations_are_bounded() {
        let kind = "kind = \"memory\"";
        let store = |line: &str| format!("{kind}\n{line}");
        let tuning = |line: &str| format!("[tuning]\n{line}\n[store]");
        let cases = [
            (
                kind,
                store("lease = \"500ms\""),
                "store.lease",
                "\"1s\" to \"1h\"",
            ),
            (
                kind,
                store("lease = \"300000000years\""),
                "store.lease",
                "crashed",
            ),
            (
                kind,
                store("timeout = \"5ms\""),
                "store.timeout",
                "\"10ms\"",
            ),
            (kind, store("timeout = \"2m\""), "store.timeout", "\"1m\""),
            (
                "[store]",
                tuning("confirm_timeout = \"1ns\""),
                "tuning.confirm_timeout",
                "\"1s\" to \"10m\"",
            ),
            (
                "[store]",
                tuning("confirm_timeout = \"1h\""),
                "tuning.confirm_timeout",
                "stuck broker",
            ),
            (
                "[store]",
                tuning("shutdown_grace = \"2h\""),
                "tuning.shutdown_grace",
                "\"1h\"",
            ),
            (
                "[store]",
                tuning("backoff_max = \"1day\""),
                "tuning.backoff_max",
                "\"1h\"",
            ),
            (
                "routing_key = \"orders.out\"",
                "routing_key = \"orders.out\"\nwindow = \"300000000years\"".to_owned(),
                "routes.orders.window",
                "\"1s\" to \"365d\"",
            ),
            (
                "routing_key = \"orders.out\"",
                "routing_key = \"orders.out\"\nwindow = \"366days\"".to_owned(),
                "routes.orders.window",
                "Redis",
            ),
        ];
        for (from, to, key, hint) in cases {
            refused(from, &to, key, hint);
        }
        for ok in [
            store("lease = \"1s\""),
            store("lease = \"3s\""),
            store("lease = \"1h\"\ntimeout = \"10ms\""),
            store("timeout = \"1m\""),
        ] {
            parse(&BASE.replace(kind, &ok)).unwrap();
        }
        parse(&BASE.replace(
            "[store]",
            &tuning("confirm_timeout = \"1s\"\nshutdown_grace = \"0s\"\nbackoff_max = \"1h\""),
        ))
        .unwrap();
        parse(&BASE.replace(
            "routing_key = \"orders.out\"",
            "routing_key = \"orders.out\"\nwindow = \"365d\"",
        ))
        .unwrap();
    }

    /// Names the broker would refuse at run time are refused by `check`.
    #[test]
    fn names_fit_amqp_limits() {
        let long = "q".repeat(256);
        let max = "q".repeat(255);
        for (from, field) in [
            ("queue = \"orders.in\"", "queue"),
            ("exchange = \"\"", "exchange"),
            ("routing_key = \"orders.out\"", "routing_key"),
        ] {
            let (k, m) = invalid_of(&BASE.replace(from, &format!("{field} = \"{long}\"")));
            assert_eq!(k, format!("routes.orders.{field}"), "{m}");
            assert!(m.contains("255 bytes"), "{m}");
            parse(&BASE.replace(from, &format!("{field} = \"{max}\""))).unwrap();
        }
        refused(
            "exchange = \"\"",
            &format!("exchange = \"\"\nkey = \"header:{long}\""),
            "routes.orders.key",
            "255 bytes",
        );
        // The consumer tag `dedupd-{route}-{16 hex}-{epoch}` must fit in 255 bytes.
        let name = "r".repeat(MAX_ROUTE_NAME);
        let tag = format!("dedupd-{name}-{:016x}-{}", u64::MAX, u64::MAX);
        assert_eq!(tag.len(), 255);
        parse(&BASE.replace("[routes.orders]", &format!("[routes.{name}]"))).unwrap();
        let name = "r".repeat(MAX_ROUTE_NAME + 1);
        let (k, m) = invalid_of(&BASE.replace("[routes.orders]", &format!("[routes.{name}]")));
        assert_eq!(k, format!("routes.{name}"));
        assert!(m.contains("at most 210"), "{m}");
        refused(
            "kind = \"memory\"",
            &format!("kind = \"memory\"\nkey_prefix = \"{}\"", "p".repeat(65)),
            "store.key_prefix",
            "at most 64",
        );
        parse(&BASE.replace(
            "kind = \"memory\"",
            &format!("kind = \"memory\"\nkey_prefix = \"{}\"", "p".repeat(64)),
        ))
        .unwrap();
    }

    /// The loop guard knows one broker by any of its names, and tells ports and vhosts apart.
    #[test]
    fn same_broker_however_spelled() {
        let url = |host: &str| format!("amqp://guest:guest@{host}/%2f");
        assert!(same_broker(&url("127.0.0.1:5672"), &url("localhost:5672")));
        assert!(same_broker(&url("LOCALHOST:5672"), &url("localhost")));
        assert!(same_broker(&url("127.0.0.1"), &url("localhost:5672")));
        assert!(!same_broker(&url("127.0.0.1:5672"), &url("localhost:5673")));
        assert!(!same_broker(&url("127.0.0.1:5672"), &url("127.0.0.1:5673")));
        assert!(!same_broker(&url("127.0.0.1:5672"), &url("127.0.0.2:5672")));
        assert!(!same_broker(
            "amqp://127.0.0.1:5672/%2f",
            "amqp://localhost:5672/other"
        ));
        // Unparsable counts as the same (refuse rather than risk a loop).
        assert!(same_broker(&url("127.0.0.1:5672"), "amqp://h:notaport/%2f"));

        // The route's own queue as routing_key, downstream spelled differently: a loop.
        let text = BASE.replace(
            "[store]",
            "[downstream]\nurl = \"amqp://guest:guest@localhost:5672/%2f\"\n[store]",
        );
        let (key, message) = invalid_of(&text.replace("\"orders.out\"", "\"orders.in\""));
        assert_eq!(key, "routes.orders.routing_key");
        assert!(message.contains("loop"), "{message}");
        parse(&text).unwrap();
        // Same host, another port: another broker, so the queue's own name is fine.
        let other_port = BASE.replace(
            "[store]",
            "[downstream]\nurl = \"amqp://guest:guest@localhost:5673/%2f\"\n[store]",
        );
        parse(&other_port.replace("\"orders.out\"", "\"orders.in\"")).unwrap();
    }

    #[test]
    fn bad_key_source_is_a_parse_error() {
        let err = parse(&BASE.replace("exchange = \"\"", "exchange = \"\"\nkey = \"header:\""))
            .unwrap_err();
        assert!(err.to_string().contains("header:NAME"), "{err}");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:guest@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(redact_url("amqps://u:p%40ss@h/v"), "amqps://u:***@h/v");
        assert_eq!(
            redact_url("redis://:pw@127.0.0.1:6379/0"),
            "redis://:***@127.0.0.1:6379/0"
        );
        assert_eq!(redact_url("rediss://user:p@ss/x@h"), "rediss://user:***@h");
        assert_eq!(redact_url("redis://user@h"), "redis://user@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_in_text("url = \"amqp://a:b@h\", [\"redis://:c@d\"]"),
            "url = \"amqp://a:***@d\"]"
        );
    }

    /// Passwords made of `Zq` pieces joined by every character a URL delimiter search could
    /// stop at: no output may contain `Zq`.
    const NASTY_PASSWORDS: &[&str] = &[
        "Zq1\"Zq2",
        "Zq1'Zq2",
        "Zq1,Zq2",
        "Zq1]Zq2",
        "Zq1@Zq2",
        "Zq1#Zq2",
        "Zq1 Zq2",
        "Zq1\"], Zq2@Zq3#Zq4'Zq5",
        "Zq1://Zq2",
    ];

    #[test]
    fn redaction_survives_any_password_syntax() {
        for pw in NASTY_PASSWORDS {
            let lines = [
                format!("url = \"amqp://guest:{pw}@127.0.0.1:5672/%2f\""),
                format!("url = 'amqp://guest:{pw}@h/%2f' # note"),
                format!("url = [\"redis://:{pw}@a:7000\", \"redis://b:7001\"]"),
                format!("11 | url = amqp://u:{pw}@h\n   |       ^^^^\nexpected a value"),
                format!("invalid type: string \"u:{pw}@h\", expected a URL"),
                format!("a = \"http://x\", url = \"amqp://u:{pw}@h\""),
            ];
            for line in lines {
                let out = redact_in_text(&line);
                assert!(!out.contains("Zq"), "{line:?} -> {out:?}");
            }
        }
        // What is not a password stays readable.
        assert_eq!(
            redact_in_text("line 3, column 7\nexpected `=`"),
            "line 3, column 7\nexpected `=`"
        );
        assert_eq!(
            redact_in_text("url = \"amqp://guest:pw@h:5672/%2f\""),
            "url = \"amqp://guest:***@h:5672/%2f\""
        );
    }

    /// Whatever the file's syntax, `check` shows no password: neither in a TOML error quoting
    /// the line, nor in a URL parser's complaint, nor in the summary of a valid file.
    #[test]
    fn no_password_shown_whatever_the_syntax() {
        for pw in NASTY_PASSWORDS {
            // Valid TOML: the URL parsers' messages, or `describe`.
            let escaped = escape_basic(pw);
            for (from, to) in [
                ("guest:guest", format!("guest:{escaped}")),
                ("guest:guest", format!(":{escaped}")),
                (
                    "kind = \"memory\"",
                    format!("kind = \"redis\"\nurl = \"redis://:{escaped}@h:6379/0\""),
                ),
                (
                    "kind = \"memory\"",
                    format!("kind = \"redis\"\nurl = [\"redis://:{escaped}@h:6379/1\"]"),
                ),
                (
                    "kind = \"memory\"",
                    format!("kind = \"redis\"\nurl = \"redis://u:{escaped}@h:x/0\""),
                ),
            ] {
                let shown = match parse(&BASE.replace(from, &to)) {
                    Ok(c) => c.describe(),
                    Err(e) => e.to_string(),
                };
                assert!(!shown.contains("Zq"), "{pw:?} in {to:?}:\n{shown}");
            }
            // Syntax errors on the URL line.
            for line in [
                // Unescaped, so the quote ends the string early.
                format!("url = \"amqp://guest:{pw}@127.0.0.1:5672/%2f\""),
                format!("url = 'amqp://guest:{pw}@127.0.0.1:5672/%2f'"),
                // Unterminated.
                format!("url = \"amqp://guest:{pw}@127.0.0.1:5672/%2f"),
                // Unquoted.
                format!("url = amqp://guest:{pw}@127.0.0.1:5672/%2f"),
                // A list where a string was expected, or a bracket in the wrong place.
                format!("url = [\"amqp://guest:{pw}@127.0.0.1:5672/%2f\"]"),
                format!("url = \"amqp://guest:{pw}@127.0.0.1:5672/%2f\"]"),
            ] {
                let text = BASE.replace("url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"", &line);
                let shown = match parse(&text) {
                    Ok(c) => c.describe(),
                    Err(e) => e.to_string(),
                };
                assert!(!shown.contains("Zq"), "{line}\n->\n{shown}");
            }
        }
    }

    #[test]
    fn describe_shows_routes_but_no_password() {
        std::env::set_var("DEDUPD_T_DESCRIBE_PW", "topsecretpw");
        let text = BASE
            .replace("guest:guest@", "guest:${DEDUPD_T_DESCRIBE_PW}@")
            .replace(
                "kind = \"memory\"",
                "kind = \"redis\"\nurl = [\"redis://:${DEDUPD_T_DESCRIBE_PW}@a:7000\"]",
            );
        let out = parse(&text).unwrap().describe();
        assert!(!out.contains("topsecretpw"), "{out}");
        assert!(out.contains("amqp://guest:***@127.0.0.1:5672/%2f"), "{out}");
        assert!(out.contains("redis://:***@a:7000"), "{out}");
        assert!(
            out.contains(
                "orders: orders.in -> exchange \"\" routing_key orders.out, key message_id, \
             window 24h, on_missing_key reject, mode enforce"
            ),
            "{out}"
        );
        assert!(out.contains("lease 30s"), "{out}");
    }

    #[test]
    fn durations_read_like_the_config() {
        let f = |ms| fmt_duration(Duration::from_millis(ms));
        assert_eq!(
            [
                f(86_400_000),
                f(30_000),
                f(90_000),
                f(120_000),
                f(100),
                f(1_500)
            ],
            ["24h", "30s", "90s", "2m", "100ms", "1500ms"]
        );
    }
}
