//! The command line (`dedupd run|check|inspect|forget`) and the one-shot commands behind it.
//! `main.rs` parses, sets up logging and calls [`execute`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use crate::amqp::Endpoint;
use crate::config::Config;
use crate::error_chain;
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
    Inspect {
        #[command(flatten)]
        config: ConfigArg,
        /// Route name.
        route: String,
        /// The key as derived from the message (e.g. its message_id).
        key: String,
    },
    /// Delete a key, so the next copy is forwarded again.
    Forget {
        #[command(flatten)]
        config: ConfigArg,
        /// Route name.
        route: String,
        /// The key as derived from the message.
        key: String,
    },
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
        Command::Inspect { route, key, .. } => {
            with_key(config, route, key, |store, key| async move {
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
        Command::Forget { route, key, .. } => {
            with_key(config, route, key, |store, key| async move {
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

async fn with_key<F, Fut>(config: &Config, route: &str, key: &str, f: F) -> ExitCode
where
    F: FnOnce(Store, String) -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::store::StoreError>>,
{
    if !config.routes.contains_key(route) {
        let known: Vec<_> = config.routes.keys().map(String::as_str).collect();
        eprintln!(
            "no route {route:?} in the config (routes: {})",
            known.join(", ")
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let store_key = crate::keys::store_key(&config.store.key_prefix, route, key.as_bytes());
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

/// `declare`: 0 when every queue exists afterwards, 1 otherwise.
async fn declare(config: &Config) -> u8 {
    let mut wanted: Vec<(String, &str, FieldTable)> = Vec::new();
    for route in config.routes.values() {
        let dlq = format!("{}.dlq", route.queue);
        let args = crate::amqp::dead_letter_to(&dlq);
        wanted.push((dlq, config.upstream.url.as_str(), FieldTable::default()));
        wanted.push((route.queue.clone(), config.upstream.url.as_str(), args));
        if let (true, Some(rk)) = (route.exchange.is_empty(), &route.routing_key) {
            wanted.push((rk.clone(), config.downstream_url(), FieldTable::default()));
        }
    }
    let mut failed = false;
    for (queue, url, args) in wanted {
        let endpoint = Endpoint {
            url: url.to_owned(),
            tls: if url == config.upstream.url {
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
        url: config.downstream_url().to_owned(),
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
            // dead-lettered). The message's own routing key cannot be checked beforehand.
            let queue = match (side, route.exchange.is_empty(), &route.routing_key) {
                ("upstream", _, _) => Some(route.queue.as_str()),
                (_, true, Some(rk)) => Some(rk.as_str()),
                (_, true, None) => continue,
                (_, false, _) => None,
            };
            // A passive declare that fails closes the channel: one channel per check.
            let result = async {
                let channel = endpoint
                    .rpc("opening a channel", conn.create_channel())
                    .await?;
                if let Some(queue) = queue {
                    let passive = QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    };
                    endpoint
                        .rpc(
                            "declaring the queue passively",
                            channel.queue_declare(queue.into(), passive, FieldTable::default()),
                        )
                        .await?;
                } else {
                    let passive = ExchangeDeclareOptions {
                        passive: true,
                        ..Default::default()
                    };
                    endpoint
                        .rpc(
                            "declaring the exchange passively",
                            channel.exchange_declare(
                                route.exchange.as_str().into(),
                                lapin::ExchangeKind::Direct,
                                passive,
                                FieldTable::default(),
                            ),
                        )
                        .await?;
                }
                let _ = channel.close(200, "check done".into()).await;
                Ok::<(), crate::amqp::AmqpError>(())
            }
            .await;
            let (what, hint) = match (side, queue) {
                ("upstream", _) => (format!("route {name}: queue {:?}", route.queue), ""),
                (_, Some(queue)) => (
                    format!("route {name}: destination queue {queue:?}"),
                    " (with exchange = \"\", routing_key names the queue every message is \
                     published to; without it, each one would be returned as unroutable and \
                     dead-lettered): declare the queue on the downstream broker, or fix \
                     routing_key",
                ),
                (_, None) => (format!("route {name}: exchange {:?}", route.exchange), ""),
            };
            report(
                what,
                result.map_err(|e| format!("{}{hint}", error_chain(&e))),
            );
        }
        let _ = conn.close(200, "check done".into()).await;
    }

    let store = match Store::open(&config.store).await {
        Ok(store) => store.ping().await.map(|_| ()),
        Err(e) => Err(e),
    };
    report("store".into(), store.map_err(|e| error_chain(&e)));
    if failed {
        EXIT_RUNTIME
    } else {
        EXIT_OK
    }
}
