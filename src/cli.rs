//! The command line (`dedupd run|check|inspect|forget`) and the one-shot commands behind it.
//! `main.rs` parses, sets up logging and calls [`execute`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use crate::amqp::Endpoint;
use crate::config::{Config, KeySpec, OnMissingKey, Route, SecretUrl, StoreKind};
use crate::error_chain;
use crate::keys;
use crate::store::{KeyState, Store};

/// Exit code: the command succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit code: something at run time failed (broker, store).
pub const EXIT_RUNTIME: u8 = 1;
/// Exit code: bad configuration or usage.
pub const EXIT_CONFIG: u8 = 2;

/// Deduplicating proxy for RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "dedupd", version, about)]
pub struct Cli {
    /// Log line format on stderr (filter with RUST_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// The config file argument shared by every subcommand.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(short, long, env = "DEDUPD_CONFIG", default_value = "proxy.toml")]
    pub config: PathBuf,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy until SIGTERM or SIGINT.
    Run(ConfigArg),
    /// Validate the configuration and print the routes (exit 0 valid, 2 invalid).
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Also connect to the brokers, check every route's queue and exchange, and ping the
        /// store (exit 1 if any fails).
        #[arg(long)]
        connect: bool,
    },
    /// Declare every route's queues for a trial: the upstream queue (durable, dead-lettering
    /// to `QUEUE.dlq`, also declared) and, on the default exchange, the queue named by
    /// `routing_key`. Existing queues are left as they are. Production brokers declare their
    /// own topology; `run` never declares anything.
    Declare(ConfigArg),
    /// Show what the store holds for a key of a route.
    #[command(
        override_usage = "dedupd inspect -c FILE ROUTE <KEY | --body-file PATH | --typed TYPE:VALUE | --json JSON>"
    )]
    Inspect {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Delete a key, so the next copy is forwarded again.
    #[command(
        override_usage = "dedupd forget -c FILE ROUTE <KEY | --body-file PATH | --typed TYPE:VALUE | --json JSON>"
    )]
    Forget {
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        key: KeyArg,
    },
    /// Try dedupd in a minute: publish messages with duplicates through a throwaway route on
    /// the local broker, run the proxy on it, show what it forwarded and dropped, clean up.
    /// Needs no config file.
    Demo(crate::demo::DemoArgs),
}

/// Which key of a route `inspect` and `forget` act on: KEY or exactly one of the options, in
/// whatever form the operator has at hand.
#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("which")
        .required(true)
        .args(["key", "body_file", "typed", "json"])
))]
pub struct KeyArg {
    /// Route name.
    pub route: String,
    /// The key as the message carries it: its message_id, a string header value or a string
    /// JSON value. Or the stored form of a hashed key, '#' followed by 32 hex digits as
    /// `inspect` prints it (quote it: the shell reads # as a comment).
    pub key: Option<String>,
    /// The message body, for routes with key = "body" or on_missing_key = "hash_body": the
    /// key is its hash.
    #[arg(long, value_name = "PATH")]
    pub body_file: Option<PathBuf>,
    /// A header value that is not a string, for key = "header:NAME" routes: TYPE:VALUE, TYPE
    /// one of bool, i8, u8, i16, u16, i32, u32, i64, f32, f64, timestamp (AMQP 'I' is i32,
    /// 'l' is i64), e.g. i64:42.
    #[arg(long, value_name = "TYPE:VALUE")]
    pub typed: Option<String>,
    /// A JSON value that is not a string, for key = "json:/pointer" routes, as JSON text:
    /// e.g. 42, true, '{"a":1}'.
    #[arg(long, value_name = "JSON")]
    pub json: Option<String>,
}

impl Command {
    /// The config file this command reads.
    pub fn config_path(&self) -> &std::path::Path {
        match self {
            Command::Run(c)
            | Command::Declare(c)
            | Command::Check { config: c, .. }
            | Command::Inspect { config: c, .. }
            | Command::Forget { config: c, .. } => &c.config,
            // Reads no file: `main` runs the demo before loading one.
            Command::Demo(_) => std::path::Path::new(""),
        }
    }
}

/// Runs a one-shot command against a loaded config (`run` is `main`'s own business).
pub async fn execute(command: &Command, config: &Config) -> ExitCode {
    match command {
        // `run` is the daemon, started by `main` itself; asking for it here is a caller's bug.
        Command::Run(_) => ExitCode::from(EXIT_CONFIG),
        Command::Check { connect, .. } => {
            println!("{}", config.describe());
            if *connect {
                ExitCode::from(check_connect(config).await)
            } else {
                ExitCode::from(EXIT_OK)
            }
        }
        Command::Declare(_) => ExitCode::from(declare(config).await),
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Inspect { key, .. } => {
            with_key(config, key, |store, key| async move {
                let state = store.inspect(&key).await?;
                match state {
                    KeyState::Absent => println!("{key}: absent"),
                    KeyState::InFlight { owner, lease_left } => println!(
                        "{key}: in-flight, owner {owner}, lease left {}",
                        humantime::format_duration(round_ms(lease_left))
                    ),
                    KeyState::Done { window_left } => println!(
                        "{key}: done, window left {}",
                        humantime::format_duration(round_ms(window_left))
                    ),
                }
                Ok(())
            })
            .await
        }
        Command::Forget { key, .. } => {
            with_key(config, key, |store, key| async move {
                if store.forget(&key).await? {
                    println!("{key}: forgotten");
                } else {
                    println!("{key}: was absent");
                }
                Ok(())
            })
            .await
        }
    }
}

fn round_ms(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(d.as_millis() as u64)
}

async fn with_key<F, Fut>(config: &Config, args: &KeyArg, f: F) -> ExitCode
where
    F: FnOnce(Store, String) -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::store::StoreError>>,
{
    let name = args.route.as_str();
    let Some(route) = config.routes.get(name) else {
        let known: Vec<_> = config.routes.keys().map(String::as_str).collect();
        eprintln!(
            "no route {name:?} in the config (routes: {})",
            known.join(", ")
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    let store_key = match resolve_key(&config.store.key_prefix, name, route, args) {
        Ok(key) => key,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(note) = other_forms_note(route, args) {
        // The plain form may be right; if it is not, the operator must not stop at "absent".
        eprintln!("note: {note}");
    }
    let result = match Store::open(&config.store).await {
        Ok(store) => f(store, store_key).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(error) => {
            eprintln!("store: {}", error_chain(&error));
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// The store key `args` designate on route `name`, or why that form cannot be a key of it
/// (so that `inspect` never answers "absent" for a key nobody could have stored).
fn resolve_key(prefix: &str, name: &str, route: &Route, args: &KeyArg) -> Result<String, String> {
    let by_body = route.key == KeySpec::Body || route.on_missing_key == OnMissingKey::HashBody;
    let id = if let Some(key) = &args.key {
        if keys::is_hashed_id(key) {
            return Ok(format!("{prefix}:{name}:{key}"));
        }
        if route.key == KeySpec::Body {
            return Err(format!(
                "route {name:?} keys messages by a hash of their body (key = \"body\"), which \
                 cannot be typed: give the body with --body-file PATH, or the stored form '#' \
                 followed by 32 hex digits"
            ));
        }
        if key.is_empty() {
            return Err(
                "an empty key is never stored (such messages have no key): give the \
                        key as the message carries it"
                    .into(),
            );
        }
        key.as_bytes().to_vec()
    } else if let Some(path) = &args.body_file {
        if !by_body {
            return Err(format!(
                "route {name:?} does not key messages by their body (key = \"{}\", \
                 on_missing_key = \"{}\"): --body-file is for key = \"body\" or \
                 on_missing_key = \"hash_body\"; give KEY",
                route.key, route.on_missing_key
            ));
        }
        let body = std::fs::read(path)
            .map_err(|e| format!("cannot read --body-file {}: {e}", path.display()))?;
        keys::body_hash(&body)
    } else if let Some(typed) = &args.typed {
        if !matches!(route.key, KeySpec::Header(_)) {
            return Err(format!(
                "route {name:?} has key = \"{}\": --typed is for key = \"header:NAME\" routes",
                route.key
            ));
        }
        keys::header_value_key(&parse_typed(typed)?)
            .ok_or("an empty or void header value is never stored: give the header's value")?
    } else if let Some(json) = &args.json {
        if !matches!(route.key, KeySpec::Json(_)) {
            return Err(format!(
                "route {name:?} has key = \"{}\": --json is for key = \"json:/pointer\" routes",
                route.key
            ));
        }
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
            format!("--json {json:?} is not JSON ({e}): e.g. 42, true, '{{\"a\":1}}'")
        })?;
        keys::json_value_key(&value)
            .map_err(|_| "null and the empty string are never stored (such messages have no key)")?
    } else {
        return Err("give KEY, --body-file, --typed or --json".into());
    };
    Ok(keys::store_key(prefix, name, &id))
}

/// For a plain KEY, the other key forms the route could have stored for the same text.
fn other_forms_note(route: &Route, args: &KeyArg) -> Option<String> {
    let key = args.key.as_deref().filter(|k| !keys::is_hashed_id(k))?;
    match &route.key {
        KeySpec::Header(header) => Some(format!(
            "KEY is the value of a string header; if {header:?} carries another type (a \
             number, a boolean, ...), its key differs: give --typed TYPE:VALUE, e.g. \
             --typed i64:{key}"
        )),
        KeySpec::Json(_) => match serde_json::from_str::<serde_json::Value>(key) {
            Ok(serde_json::Value::String(_)) | Err(_) => None,
            Ok(_) => Some(format!(
                "KEY is the value of a JSON string; if the value is the JSON {key} (not the \
                 string \"{key}\"), its key differs: give --json {key}"
            )),
        },
        _ => None,
    }
}

/// `--typed TYPE:VALUE` as the AMQP value a producer would have sent.
fn parse_typed(typed: &str) -> Result<lapin::types::AMQPValue, String> {
    use lapin::types::AMQPValue as V;
    let usage = "give TYPE:VALUE with TYPE one of bool, i8, u8, i16, u16, i32, u32, i64, f32, \
                 f64, timestamp, e.g. i64:42";
    let (kind, value) = typed
        .split_once(':')
        .ok_or_else(|| format!("--typed {typed:?}: {usage}"))?;
    fn num<T: std::str::FromStr>(value: &str, wrap: fn(T) -> V) -> Option<V> {
        value.trim().parse().ok().map(wrap)
    }
    let parsed = match kind {
        "bool" => num(value, V::Boolean),
        "i8" => num(value, V::ShortShortInt),
        "u8" => num(value, V::ShortShortUInt),
        "i16" => num(value, V::ShortInt),
        "u16" => num(value, V::ShortUInt),
        "i32" => num(value, V::LongInt),
        "u32" => num(value, V::LongUInt),
        "i64" => num(value, V::LongLongInt),
        "f32" => num(value, V::Float),
        "f64" => num(value, V::Double),
        "timestamp" => num(value, V::Timestamp),
        _ => return Err(format!("--typed {typed:?}: unknown type {kind:?}: {usage}")),
    };
    parsed.ok_or_else(|| format!("--typed {typed:?}: {value:?} is not a {kind}"))
}

/// `declare`: 0 when every queue exists afterwards, 1 otherwise.
async fn declare(config: &Config) -> u8 {
    let mut wanted: Vec<(String, &SecretUrl, FieldTable)> = Vec::new();
    for route in config.routes.values() {
        let dlq = format!("{}.dlq", route.queue);
        let args = crate::amqp::dead_letter_to(&dlq);
        wanted.push((dlq, &config.upstream.url, FieldTable::default()));
        wanted.push((route.queue.clone(), &config.upstream.url, args));
        if let (true, Some(rk)) = (route.exchange.is_empty(), &route.routing_key) {
            wanted.push((rk.clone(), config.downstream_url(), FieldTable::default()));
        }
    }
    let mut failed = false;
    for (queue, url, args) in wanted {
        let endpoint = Endpoint {
            url: url.clone(),
            tls: if *url == config.upstream.url {
                config.upstream.tls.clone()
            } else {
                config.downstream_tls().cloned()
            },
            name: "dedupd declare".into(),
        };
        let result = async {
            let conn = endpoint.connect().await?;
            let channel = endpoint
                .rpc("opening a channel", conn.create_channel())
                .await?;
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            let declared = endpoint
                .rpc(
                    "declaring the queue",
                    channel.queue_declare(queue.as_str().into(), durable, args),
                )
                .await;
            let _ = conn.close(200, "declare done".into()).await;
            declared.map(|_| ())
        }
        .await;
        match result {
            Ok(()) => println!("ok    queue {queue:?} on {}", endpoint.redacted()),
            Err(e) => {
                failed = true;
                println!("FAIL  queue {queue:?}: {}", error_chain(&e));
            }
        }
    }
    if failed {
        EXIT_RUNTIME
    } else {
        EXIT_OK
    }
}

/// `check --connect`: every problem is printed, then 1 if there was any.
async fn check_connect(config: &Config) -> u8 {
    let mut failed = false;
    let mut report = |what: String, result: Result<(), String>| match result {
        Ok(()) => println!("ok    {what}"),
        Err(e) => {
            failed = true;
            println!("FAIL  {what}: {e}");
        }
    };

    let upstream = Endpoint {
        url: config.upstream.url.clone(),
        tls: config.upstream.tls.clone(),
        name: "dedupd check".into(),
    };
    let downstream = Endpoint {
        url: config.downstream_url().clone(),
        tls: config.downstream_tls().cloned(),
        name: "dedupd check".into(),
    };
    for (side, endpoint) in [("upstream", &upstream), ("downstream", &downstream)] {
        let conn = match endpoint.connect().await {
            Ok(conn) => {
                report(format!("{side} {}", endpoint.redacted()), Ok(()));
                conn
            }
            Err(e) => {
                report(
                    format!("{side} {}", endpoint.redacted()),
                    Err(error_chain(&e)),
                );
                continue;
            }
        };
        for (name, route) in &config.routes {
            // What this side needs of the route: the upstream queue it consumes; downstream,
            // the exchange it publishes to or, on the default exchange, the queue its
            // routing_key names (without it, every message comes back unroutable and is
            // dead-lettered), and the exchange that audits its duplicates. The message's own
            // routing key cannot be checked beforehand.
            let mut targets = Vec::new();
            match (side, route.exchange.is_empty(), &route.routing_key) {
                ("upstream", _, _) => targets.push(Passive::Queue(&route.queue, "queue", "")),
                (_, true, Some(rk)) => targets.push(Passive::Queue(
                    rk,
                    "destination queue",
                    " (with exchange = \"\", routing_key names the queue every message is \
                     published to; without it, each one would be returned as unroutable and \
                     dead-lettered): declare the queue on the downstream broker, or fix \
                     routing_key",
                )),
                (_, true, None) => {}
                (_, false, _) => targets.push(Passive::Exchange(&route.exchange, "exchange", "")),
            }
            if side == "downstream" && !route.duplicates_exchange.is_empty() {
                targets.push(Passive::Exchange(
                    &route.duplicates_exchange,
                    "duplicates_exchange",
                    " (duplicates would be requeued, not acked, until it exists): declare it \
                     on the downstream broker and bind a queue to it",
                ));
            }
            for target in targets {
                let (what, hint) = target.describe(name);
                let result = target.declare(endpoint, &conn).await;
                report(
                    what,
                    result.map_err(|e| format!("{}{hint}", error_chain(&e))),
                );
            }
        }
        let _ = conn.close(200, "check done".into()).await;
    }

    let store = match Store::open(&config.store).await {
        Ok(store) => store.ping().await.map(|_| store),
        Err(e) => Err(e),
    };
    match store {
        Ok(store) => {
            report(format!("store {}", store.label()), Ok(()));
            if config.store.kind == StoreKind::Redis {
                check_redis_settings(&store, config.store.allow_eviction, &mut report).await;
            }
        }
        Err(e) => report("store".into(), Err(error_chain(&e))),
    }
    if failed {
        EXIT_RUNTIME
    } else {
        EXIT_OK
    }
}

/// A queue or exchange `check --connect` declares passively: its name, what it is to the
/// route, and a hint for when it is missing.
enum Passive<'a> {
    Queue(&'a str, &'static str, &'static str),
    Exchange(&'a str, &'static str, &'static str),
}

impl Passive<'_> {
    fn describe(&self, route: &str) -> (String, &'static str) {
        let (Passive::Queue(name, role, hint) | Passive::Exchange(name, role, hint)) = self;
        (format!("route {route}: {role} {name:?}"), hint)
    }

    /// A passive declare that fails closes the channel: one channel per check.
    async fn declare(
        &self,
        endpoint: &Endpoint,
        conn: &lapin::Connection,
    ) -> Result<(), crate::amqp::AmqpError> {
        let channel = endpoint
            .rpc("opening a channel", conn.create_channel())
            .await?;
        match *self {
            Passive::Queue(queue, ..) => {
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                let declare = channel.queue_declare(queue.into(), passive, FieldTable::default());
                endpoint
                    .rpc("declaring the queue passively", declare)
                    .await?;
            }
            Passive::Exchange(exchange, ..) => {
                let passive = ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                let declare = channel.exchange_declare(
                    exchange.into(),
                    lapin::ExchangeKind::Direct,
                    passive,
                    FieldTable::default(),
                );
                endpoint
                    .rpc("declaring the exchange passively", declare)
                    .await?;
            }
        }
        let _ = channel.close(200, "check done".into()).await;
        Ok(())
    }
}

/// The Redis settings `check --connect` reports: eviction (an error unless allowed) and the
/// listpack limits (a warning).
async fn check_redis_settings(
    store: &Store,
    allow_eviction: bool,
    report: &mut impl FnMut(String, Result<(), String>),
) {
    // An evicted key is a forgotten key: its next copy would be forwarded again.
    let what = format!("store {} maxmemory-policy", store.label());
    match store.eviction_risk().await {
        Ok(None) => report(what, Ok(())),
        Ok(Some(policy)) if allow_eviction => {
            println!("WARN  {what}: {policy} may evict keys (store.allow_eviction = true)")
        }
        Ok(Some(policy)) => report(
            what,
            Err(format!(
                "{policy} may evict keys, and an evicted key's next copy would be \
                 forwarded again: set maxmemory-policy noeviction, or \
                 store.allow_eviction = true to run anyway"
            )),
        ),
        Err(e) => println!(
            "WARN  {what}: cannot read it ({}); make sure it is noeviction",
            error_chain(&e)
        ),
    }
    // Not an error: keys are kept either way, only at a higher cost.
    let what = format!("store {} hash-max-listpack settings", store.label());
    match store.layout_risk().await {
        Ok(None) => report(what, Ok(())),
        Ok(Some(risk)) => println!("WARN  {what}: {risk}"),
        Err(e) => println!(
            "WARN  {what}: cannot read them ({}); the defaults suit dedupd",
            error_chain(&e)
        ),
    }
}
