//! The file's schema: every table and key, its type and its default (named `default_*`
//! functions, so the default is written once), and how each setting is spelled in the file
//! (`Display`, for `check` and messages). No rules beyond what serde checks: those are in
//! `validate`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::secret::{redact_url, Interpolations, SecretUrl};

/// The whole file. `Debug` (in `config`) shows no password and no value from `${VAR}`.
#[derive(Clone, Deserialize)]
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
    /// What `${VAR}` filled in, so that `Debug` can show `${VAR}` instead. Not a key of the
    /// file: set by `Config::from_toml`, empty otherwise.
    #[serde(skip)]
    pub(super) interpolated: Interpolations,
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// AMQP URL, `amqp://` or `amqps://`. Required.
    pub url: SecretUrl,
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
    pub url: Option<SecretUrl>,
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
    /// `"redis"`, `"postgres"`, `"embedded"` or `"memory"`. Default `"redis"`.
    #[serde(default)]
    pub kind: StoreKind,
    /// For `redis`: one URL (`redis://`, `rediss://`) or a list of them (Redis Cluster).
    /// For `postgres`: one `postgres://user:password@host:5432/database` URL.
    /// Default `redis://127.0.0.1:6379/0`.
    #[serde(default = "default_store_url")]
    pub url: StoreUrl,
    /// For `embedded` only, and required there: the directory that holds the store's files,
    /// created if missing. One process at a time. Default: none.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Prefix of every key dedupd writes: at most 64 bytes, no whitespace, no braces (dedupd
    /// places its own hash tags). Default `"dedupd"`.
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
    /// PostgreSQL: shared by any number of instances, durable, one row per remembered key.
    Postgres,
    /// Files on local disk under `path`: one instance, survives restarts and SIGKILL.
    Embedded,
}

/// `store.url`: one URL, or a list of seed URLs for Redis Cluster. `Debug` shows them with
/// their passwords masked; [`StoreUrl::expose`] gives them as written.
///
/// The variants hold plain strings, not [`SecretUrl`]s, so that `StoreUrl::One(url)` keeps
/// building one from a `String` (the store tests do); the masking `Debug` covers printing.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum StoreUrl {
    /// A single Redis server.
    One(String),
    /// Redis Cluster seed nodes.
    Cluster(Vec<String>),
}

impl StoreUrl {
    /// Every URL, with its password, for connecting. Never format these into output.
    pub fn expose(&self) -> Vec<&str> {
        match self {
            StoreUrl::One(url) => vec![url.as_str()],
            StoreUrl::Cluster(urls) => urls.iter().map(String::as_str).collect(),
        }
    }
}

impl fmt::Debug for StoreUrl {
    /// Like the derived form, each URL redacted: `One("redis://:***@h")`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::One(url) => f.debug_tuple("One").field(&redact_url(url)).finish(),
            StoreUrl::Cluster(urls) => {
                let shown: Vec<String> = urls.iter().map(|u| redact_url(u)).collect();
                f.debug_tuple("Cluster").field(&shown).finish()
            }
        }
    }
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
    /// `"fixed"`: a key is remembered for `window` from its first copy's commit; `"sliding"`:
    /// every duplicate restarts its key's window. Default `"fixed"`.
    #[serde(default)]
    pub window_mode: WindowMode,
    /// A copy whose key is remembered with a different body: `"drop"` it as a duplicate,
    /// `"forward"` it as another message, or `"reject"` it to the queue's dead-letter
    /// exchange. Always counted in `dedupd_conflicts_total`. Default `"drop"`.
    #[serde(default)]
    pub on_conflict: OnConflict,
    /// An exchange on the downstream broker that receives every dropped duplicate and
    /// conflict unchanged, plus headers `x-dedupd-route` and `x-dedupd-reason`, confirmed
    /// before the upstream ack. Default `""`: dropped copies are only acked.
    #[serde(default)]
    pub duplicates_exchange: String,
    /// A header that carries the dedup key on every forwarded copy, for idempotent consumers.
    /// Default `""`: copies are forwarded byte for byte.
    #[serde(default)]
    pub stamp_header: String,
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

/// `routes.NAME.window_mode`
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WindowMode {
    /// The window counts from the commit of the key's first copy.
    #[default]
    Fixed,
    /// Each duplicate restarts the window: a key stays remembered while copies keep coming.
    Sliding,
}

/// `routes.NAME.on_conflict`
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// Drop it (ack) as a duplicate.
    #[default]
    Drop,
    /// Forward it: it is another message that reused the key.
    Forward,
    /// Nack without requeue, so the queue's dead-letter exchange receives it.
    Reject,
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
            path: None,
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
    StoreKind { Redis => "redis", Memory => "memory", Postgres => "postgres", Embedded => "embedded" }
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
