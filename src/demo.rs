//! `dedupd demo`: a one-minute tour for a new user. It publishes a stream with duplicates into a
//! throwaway route on the local broker (queues `dedupd-demo-<tag>.in` dead-lettering to
//! `.in.dlq`, and `.out`, all declared here), runs the proxy on it in this process through
//! [`crate::run_on`], shows a progress bar fed by the proxy's own metrics, drains and counts the
//! destination, prints a summary, and deletes its queues and store keys, also on Ctrl-C.
//!
//! Everything it creates is named after one random tag, so a demo never touches a real route's
//! queues or keys, and two demos on one broker do not meet. Should the clean-up itself never
//! run (SIGKILL, a second Ctrl-C), the queues expire after an hour unused and the keys with the
//! route's one-hour window.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use rand::seq::SliceRandom;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::amqp::{AmqpError, Endpoint};
use crate::cli::{LogFormat, EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME};
use crate::config::{redact_url, Config, ConfigError};
use crate::error_chain;
use crate::store::{Store, StoreError};
use crate::telemetry;

/// The broker a fresh checkout runs against (the one in `proxy.toml`).
pub const DEFAULT_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The Redis a fresh checkout runs against (the one in `proxy.toml`).
pub const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379/0";

/// What a user who has no broker or Redis running should do: the README's set-up.
const SETUP_HINT: &str = "\
The demo needs RabbitMQ (--amqp) and Redis (--redis; --memory does without it).
To install and start both locally (Debian), from a clone of dedupd run the README's set-up:
    ./scripts/run-local.sh    # starts RabbitMQ and Redis, then runs the proxy: stop it with Ctrl-C
or only start them with ./scripts/services.sh; then run `dedupd demo` again.";

/// How long the settled count may stand still before the demo gives up: long enough for the
/// proxy to connect and for a slow, shared machine; short enough that a stuck demo says so.
const STALL_LIMIT: Duration = Duration::from_secs(20);
/// How often the progress bar reads the metrics.
const TICK: Duration = Duration::from_millis(100);
/// How long the demo's queues live unused and its keys are remembered, should its own
/// clean-up never run. Longer than any demo (a million messages take a few minutes).
const LEFTOVER_TTL: Duration = Duration::from_secs(3600);

/// `dedupd demo` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Broker to run the demo on (queues and proxy).
    #[arg(long, value_name = "URL", default_value = DEFAULT_AMQP)]
    pub amqp: String,
    /// Redis to keep the keys in.
    #[arg(long, value_name = "URL", default_value = DEFAULT_REDIS, conflicts_with = "memory")]
    pub redis: String,
    /// Keep the keys in the in-process store instead of Redis.
    #[arg(long)]
    pub memory: bool,
    /// Messages to publish, duplicates included.
    #[arg(long, value_name = "N", default_value_t = 2000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub messages: u32,
    /// Share of the messages that repeat an earlier id: 0 <= RATIO < 1.
    #[arg(long, value_name = "RATIO", default_value_t = 0.3, value_parser = parse_ratio)]
    pub duplicates: f64,
}

/// `--duplicates`: a ratio in [0, 1). 1 would leave no distinct message to repeat.
fn parse_ratio(text: &str) -> Result<f64, String> {
    let ratio: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number: give a ratio such as 0.3"))?;
    if (0.0..1.0).contains(&ratio) {
        Ok(ratio)
    } else {
        Err(format!(
            "{ratio} is not in 0..1: give a ratio such as 0.3 (30% duplicates)"
        ))
    }
}

/// Why the demo failed. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// `--amqp` or `--redis` does not make a valid configuration.
    #[error("--amqp/--redis: {0}")]
    Config(#[source] ConfigError),
    /// The broker could not be reached.
    #[error("cannot reach the broker at {url}")]
    Broker {
        /// Redacted URL.
        url: String,
        /// Why.
        #[source]
        source: AmqpError,
    },
    /// Redis could not be reached.
    #[error("cannot reach Redis at {url}")]
    Store {
        /// Redacted URL.
        url: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// A broker operation of the demo itself failed.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// The broker did not take a published message.
    #[error("the broker refused message {0} (publisher confirm nack)")]
    Refused(String),
    /// The proxy stopped making progress.
    #[error(
        "dedupd settled {settled} of {published} messages and then nothing for {}s; the log \
         lines above say why (RUST_LOG=info shows more)",
        STALL_LIMIT.as_secs()
    )]
    Stalled {
        /// Forwarded, dropped or rejected so far.
        settled: u64,
        /// Published.
        published: u64,
    },
    /// The proxy returned before it was asked to (it could not start).
    #[error("the proxy stopped: {0}")]
    Proxy(String),
    /// The destination queue did not hand over what it held.
    #[error("draining {queue}: got {got} of {expected} messages, then nothing for 10s")]
    Drain {
        /// The queue.
        queue: String,
        /// Received.
        got: u64,
        /// Its message count before draining.
        expected: u64,
    },
    /// The metrics recorder is not dedupd's (an embedding program installed its own).
    #[error(
        "dedupd's metrics are not readable in this process (another metrics recorder is installed)"
    )]
    NoMetrics,
}

/// The binary's entry point for `demo`: logging (quieter than `run`'s, drawn around the
/// progress bar), a current-thread runtime like `run`'s, then [`run`].
pub fn main(args: &DemoArgs, log_format: LogFormat) -> ExitCode {
    let bar = progress_bar(u64::from(args.messages));
    init_tracing(log_format, bar.clone());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    runtime.block_on(run_with(args, bar))
}

/// Runs the demo (inside a tokio runtime): 0 when every number agrees, 1 otherwise or when
/// something failed or the user interrupted it, 2 for unusable arguments.
pub async fn run(args: &DemoArgs) -> ExitCode {
    run_with(args, progress_bar(u64::from(args.messages))).await
}

async fn run_with(args: &DemoArgs, bar: ProgressBar) -> ExitCode {
    let plan = Plan::new(args);
    let config = match plan.config(args, false) {
        Ok(config) => config,
        Err(error) => {
            report_error(&DemoError::Config(error));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Ctrl-C (and SIGTERM) from here on: whatever was created gets deleted.
    let interrupt = match crate::shutdown::on_signals() {
        Ok(token) => token,
        Err(error) => {
            report_error_text(&format!("cannot watch for Ctrl-C: {error}"));
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    // Nothing exists yet to clean up while connecting.
    let setup = tokio::select! {
        setup = Setup::connect(args, &plan, config) => setup,
        () = interrupt.cancelled() => {
            say("interrupted");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let setup = match setup {
        Ok(setup) => setup,
        Err(error) => {
            report_error(&error);
            return ExitCode::from(EXIT_RUNTIME);
        }
    };

    let mut proxy = Proxy::default();
    let outcome = tokio::select! {
        outcome = play(&plan, &setup, &mut proxy, &bar) => Some(outcome),
        () = interrupt.cancelled() => None,
    };
    // Left where it stopped when the demo did not get to finish it.
    if !bar.is_finished() {
        bar.abandon();
    }
    let stopped = proxy.stop().await;
    if outcome.is_none() {
        say("\ninterrupted: cleaning up (Ctrl-C again leaves it to the one-hour expiry)");
    }
    let cleaned = setup.clean_up(&plan).await;

    let code = match (outcome, stopped) {
        (None, _) => EXIT_RUNTIME,
        // Both, when both failed: a proxy that could not start is why the demo stalled.
        (Some(Err(error)), stopped) => {
            report_error(&error);
            if let Err(error) = stopped {
                report_error(&error);
            }
            EXIT_RUNTIME
        }
        (Some(Ok(_)), Err(error)) => {
            report_error(&error);
            EXIT_RUNTIME
        }
        (Some(Ok(tally)), Ok(())) => {
            let consistent = print_summary(&plan, &tally);
            if consistent {
                EXIT_OK
            } else {
                EXIT_RUNTIME
            }
        }
    };
    match cleaned {
        Ok(cleaned) => say(&format!(
            "Cleaned up: deleted the queues {}.{{in,in.dlq,out}} and {} remembered keys ({} Redis \
             keys).",
            plan.queue_base, cleaned.remembered, cleaned.redis_keys
        )),
        Err(problem) => report_error_text(&format!(
            "clean-up incomplete: {problem} (what is left expires within an hour)"
        )),
    }
    ExitCode::from(code)
}

/// The demo's names and its message stream, fixed before anything is created.
struct Plan {
    /// `dedupd-demo-<tag>`: the queues' common stem and the store's key prefix.
    queue_base: String,
    route: String,
    queue_in: String,
    queue_dlq: String,
    queue_out: String,
    /// One entry per message to publish: the index of its id. Each index appears at least
    /// once; the duplicates repeat random ones, shuffled in among the first copies.
    stream: Vec<u32>,
    distinct: u32,
}

impl Plan {
    fn new(args: &DemoArgs) -> Plan {
        let tag = format!("{:08x}", rand::random::<u32>());
        let queue_base = format!("dedupd-demo-{tag}");
        let published = args.messages;
        // At least one distinct id: every duplicate needs something to repeat.
        let duplicates = ((f64::from(published) * args.duplicates).round() as u32)
            .min(published.saturating_sub(1));
        let distinct = published - duplicates;
        let mut rng = rand::rng();
        let mut stream: Vec<u32> = (0..distinct).collect();
        stream.extend((0..duplicates).map(|_| rng.random_range(0..distinct)));
        stream.shuffle(&mut rng);
        Plan {
            route: format!("demo-{tag}"),
            queue_in: format!("{queue_base}.in"),
            queue_dlq: format!("{queue_base}.in.dlq"),
            queue_out: format!("{queue_base}.out"),
            queue_base,
            stream,
            distinct,
        }
    }

    fn published(&self) -> u64 {
        self.stream.len() as u64
    }

    fn message_id(index: u32) -> String {
        format!("order-{index:07}")
    }

    /// The proxy's configuration, written as the TOML a user would write, so it goes through
    /// the same parsing and validation as `dedupd run`'s.
    fn config(&self, args: &DemoArgs, allow_eviction: bool) -> Result<Config, ConfigError> {
        let store = if args.memory {
            "kind = \"memory\"".to_owned()
        } else {
            format!("kind = \"redis\"\nurl = {}", toml_string(&args.redis))
        };
        let text = format!(
            "[upstream]\n\
             url = {amqp}\n\
             [store]\n\
             {store}\n\
             key_prefix = \"{prefix}\"\n\
             allow_eviction = {allow_eviction}\n\
             [tuning]\n\
             shutdown_grace = \"5s\"\n\
             [routes.{route}]\n\
             queue = \"{queue_in}\"\n\
             exchange = \"\"\n\
             routing_key = \"{queue_out}\"\n\
             key = \"message_id\"\n\
             window = \"{window}s\"\n",
            amqp = toml_string(&args.amqp),
            prefix = self.queue_base,
            route = self.route,
            queue_in = self.queue_in,
            queue_out = self.queue_out,
            window = LEFTOVER_TTL.as_secs(),
        );
        Config::from_toml(&text, Path::new("(dedupd demo)"))
    }
}

/// `text` as a TOML string literal in which `${` stays literal (the config interpolates it).
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned())
        .to_string()
        .replace("${", "$${")
}

/// The connections the demo works with, checked before anything is created.
struct Setup {
    config: Config,
    endpoint: Endpoint,
    conn: Connection,
    channel: Channel,
    /// `--redis` URL (None with `--memory`), for deleting the keys afterwards.
    redis: Option<String>,
}

impl Setup {
    /// Connects to the broker and pings Redis; on failure says what to start.
    async fn connect(args: &DemoArgs, plan: &Plan, config: Config) -> Result<Setup, DemoError> {
        let endpoint = Endpoint {
            url: config.upstream.url.clone(),
            tls: config.upstream.tls.clone(),
            name: "dedupd demo".into(),
        };
        let broker_down = |source| DemoError::Broker {
            url: endpoint.redacted(),
            source,
        };
        let conn = endpoint.connect().await.map_err(broker_down)?;
        let mut config = config;
        if !args.memory {
            // The proxy waits for an absent store forever (as it should); the demo must not.
            let store_down = |source| DemoError::Store {
                url: redact_url(&args.redis),
                source,
            };
            let store = Store::open(&config.store).await.map_err(store_down)?;
            store.ping().await.map_err(store_down)?;
            // dedupd refuses a Redis that may evict keys; the demo's keys are throwaway, so it
            // runs anyway, and says what `dedupd run` would do.
            if let Ok(Some(policy)) = store.eviction_risk().await {
                say(&format!(
                    "note: this Redis may evict keys (maxmemory-policy {policy}); `dedupd run` \
                     refuses it unless store.allow_eviction = true. The demo runs anyway."
                ));
                config = plan.config(args, true).map_err(DemoError::Config)?;
            }
        }
        let channel = endpoint
            .rpc("opening a channel", conn.create_channel())
            .await?;
        endpoint
            .rpc(
                "enabling publisher confirms",
                channel.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?;
        Ok(Setup {
            config,
            endpoint,
            conn,
            channel,
            redis: (!args.memory).then(|| args.redis.clone()),
        })
    }

    /// `.in` dead-lettering to `.in.dlq` (as `dedupd declare` does), and `.out`. Transient,
    /// and deleted by the broker after [`LEFTOVER_TTL`] unused should the clean-up not run.
    async fn declare(&self, plan: &Plan) -> Result<(), DemoError> {
        let expires = || {
            let mut args = FieldTable::default();
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(LEFTOVER_TTL.as_millis() as i64),
            );
            args
        };
        let mut upstream_args = crate::amqp::dead_letter_to(&plan.queue_dlq);
        upstream_args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(LEFTOVER_TTL.as_millis() as i64),
        );
        for (queue, args) in [
            (&plan.queue_dlq, expires()),
            (&plan.queue_in, upstream_args),
            (&plan.queue_out, expires()),
        ] {
            self.endpoint
                .rpc(
                    "declaring the demo's queues",
                    self.channel.queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions::default(),
                        args,
                    ),
                )
                .await?;
        }
        Ok(())
    }

    /// Ready messages in `queue`.
    async fn count(&self, queue: &str) -> Result<u64, DemoError> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let q = self
            .endpoint
            .rpc(
                "counting a queue's messages",
                self.channel
                    .queue_declare(queue.into(), passive, FieldTable::default()),
            )
            .await?;
        Ok(u64::from(q.message_count()))
    }

    /// Deletes the queues and the store keys. Runs after the proxy stopped, on a channel of
    /// its own (an interrupted publish may have left the demo's channel mid-way).
    async fn clean_up(&self, plan: &Plan) -> Result<Cleaned, String> {
        let mut problems = Vec::new();
        match self
            .endpoint
            .rpc("opening a channel", self.conn.create_channel())
            .await
        {
            Ok(channel) => {
                for queue in [&plan.queue_in, &plan.queue_dlq, &plan.queue_out] {
                    let deleted = self
                        .endpoint
                        .rpc(
                            "deleting a queue",
                            channel
                                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
                        )
                        .await;
                    if let Err(e) = deleted {
                        problems.push(format!("queue {queue}: {}", error_chain(&e)));
                    }
                }
                let _ = channel.close(200, "dedupd demo done".into()).await;
            }
            Err(e) => problems.push(format!("queues {}.*: {}", plan.queue_base, error_chain(&e))),
        }
        let _ = self.channel.close(200, "dedupd demo done".into()).await;
        let _ = self.conn.close(200, "dedupd demo done".into()).await;
        let mut keys = (0, 0);
        if let Some(url) = &self.redis {
            match delete_keys(url, &plan.queue_base).await {
                Ok(n) => keys = n,
                Err(e) => problems.push(format!("Redis keys {}:*: {e}", plan.queue_base)),
            }
        }
        if problems.is_empty() {
            Ok(Cleaned {
                remembered: keys.0,
                redis_keys: keys.1,
            })
        } else {
            Err(problems.join("; "))
        }
    }
}

/// What the clean-up deleted.
struct Cleaned {
    /// Remembered dedup keys.
    remembered: u64,
    /// Redis keys (the tables holding them, claims, the upgrade marker).
    redis_keys: u64,
}

/// Deletes every key under `prefix:` (SCAN, not KEYS: a shared Redis must not stall on it), and
/// says how many remembered keys they held (the count of each table's meta hash, `…:m`) and
/// how many Redis keys were deleted.
async fn delete_keys(url: &str, prefix: &str) -> Result<(u64, u64), String> {
    let work = async {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cursor: u64 = 0;
        let (mut deleted, mut redis_keys) = (0, 0);
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            for meta in keys.iter().filter(|k| k.ends_with(":m")) {
                let count: Option<u64> = redis::cmd("HGET")
                    .arg(meta)
                    .arg("c")
                    .query_async(&mut conn)
                    .await?;
                deleted += count.unwrap_or(0);
            }
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
                redis_keys += n;
            }
            if next == 0 {
                return Ok::<(u64, u64), redis::RedisError>((deleted, redis_keys));
            }
            cursor = next;
        }
    };
    match tokio::time::timeout(Duration::from_secs(30), work).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 30s".into()),
    }
}

/// The proxy running in this process, once started.
#[derive(Default)]
struct Proxy {
    running: Option<(
        CancellationToken,
        tokio::task::JoinHandle<Result<(), crate::RunError>>,
    )>,
    metrics: Option<std::net::SocketAddr>,
}

impl Proxy {
    async fn start(&mut self, config: Config) -> Result<(), DemoError> {
        // Port 0: the demo must not collide with a dedupd already running on 9187.
        let listener = telemetry::bind("127.0.0.1:0")
            .await
            .map_err(|e| DemoError::Proxy(error_chain(&e)))?;
        self.metrics = listener.local_addr().ok();
        let stop = CancellationToken::new();
        let task = tokio::spawn(crate::run_on(config, listener, stop.clone()));
        self.running = Some((stop, task));
        Ok(())
    }

    fn has_ended(&self) -> bool {
        self.running
            .as_ref()
            .is_some_and(|(_, task)| task.is_finished())
    }

    /// Stops the proxy (it finishes what is in flight) and says whether it ran without error.
    async fn stop(&mut self) -> Result<(), DemoError> {
        let Some((stop, task)) = self.running.take() else {
            return Ok(());
        };
        stop.cancel();
        // The proxy's own grace (5s, see the config) bounds this; the margin is for its exit.
        match tokio::time::timeout(Duration::from_secs(15), task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(DemoError::Proxy(error_chain(&e))),
            Ok(Err(e)) => Err(DemoError::Proxy(format!("its task failed: {e}"))),
            Err(_) => Err(DemoError::Proxy("it did not stop within 15s".into())),
        }
    }
}

/// What the demo counted, from the proxy's metrics and from the destination queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    forwarded: u64,
    dropped: u64,
    rejected: u64,
}

impl Counts {
    fn settled(&self) -> u64 {
        self.forwarded + self.dropped + self.rejected
    }
}

/// Everything the summary reports.
struct Tally {
    metrics: Counts,
    arrived: u64,
    arrived_distinct: u64,
    /// Distinct published ids that never arrived.
    missing: u64,
    dead_lettered: u64,
    elapsed: Duration,
}

/// Starts the proxy, publishes the stream while the bar follows the proxy's metrics, stops
/// the proxy and drains the destination.
async fn play(
    plan: &Plan,
    setup: &Setup,
    proxy: &mut Proxy,
    bar: &ProgressBar,
) -> Result<Tally, DemoError> {
    let published = plan.published();
    setup.declare(plan).await?;
    say(&format!(
        "dedupd demo: {published} messages, {} distinct ids and {} duplicates ({:.0}%), \
         through a throwaway route\n  \
         broker  {}\n  \
         store   {}\n  \
         queues  {} -> dedupd -> {} (rejects to {})",
        plan.distinct,
        published - u64::from(plan.distinct),
        100.0 * (published - u64::from(plan.distinct)) as f64 / published as f64,
        setup.endpoint.redacted(),
        match &setup.redis {
            Some(url) => format!("{} (keys {}:*)", redact_url(url), plan.queue_base),
            None => "memory (in-process)".into(),
        },
        plan.queue_in,
        plan.queue_out,
        plan.queue_dlq,
    ));
    proxy.start(setup.config.clone()).await?;
    if let Some(addr) = proxy.metrics {
        say(&format!(
            "  metrics http://{addr}/metrics (while the demo runs)"
        ));
    }

    let handle = telemetry::install();
    let started = Instant::now();
    let publish = publish_stream(plan, setup);
    let watch = async {
        bar.reset_elapsed();
        let mut last = Counts::default();
        let mut last_change = Instant::now();
        loop {
            let counts = read_counts(&handle.render(), &plan.route);
            // Message first: each call redraws, and the second draw shows both.
            bar.set_message(format!(
                "forwarded {}  dropped {}",
                counts.forwarded, counts.dropped
            ));
            bar.set_position(counts.settled());
            if counts.settled() >= published {
                return Ok(counts);
            }
            if counts != last {
                last = counts;
                last_change = Instant::now();
            } else if last_change.elapsed() > STALL_LIMIT {
                if !handle.render().contains(telemetry::BUILD_INFO) {
                    return Err(DemoError::NoMetrics);
                }
                return Err(DemoError::Stalled {
                    settled: counts.settled(),
                    published,
                });
            }
            if proxy.has_ended() {
                // Its error comes from `stop`, which the caller runs.
                return Err(DemoError::Proxy("it returned before the demo ended".into()));
            }
            tokio::time::sleep(TICK).await;
        }
    };
    let ((), metrics) = tokio::try_join!(publish, watch)?;
    let elapsed = started.elapsed();
    bar.finish();
    // Forwarded means confirmed by the broker: every forwarded copy is in `.out` already.
    proxy.stop().await?;
    let (arrived, ids) = drain(setup, &plan.queue_out).await?;
    let expected: HashSet<String> = (0..plan.distinct).map(Plan::message_id).collect();
    Ok(Tally {
        metrics,
        arrived,
        arrived_distinct: ids.len() as u64,
        missing: expected.difference(&ids).count() as u64,
        dead_lettered: setup.count(&plan.queue_dlq).await?,
        elapsed,
    })
}

/// Publishes the stream to `.in` with publisher confirms, 500 outstanding at a time.
async fn publish_stream(plan: &Plan, setup: &Setup) -> Result<(), DemoError> {
    for chunk in plan.stream.chunks(500) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for &index in chunk {
            let id = Plan::message_id(index);
            // Copies of one id carry the same bytes, as a producer's retry would.
            let body = format!("{{\"order\":{index},\"item\":\"demo\"}}");
            let props = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_content_type("application/json".into());
            let confirm = setup
                .endpoint
                .rpc(
                    "publishing",
                    setup.channel.basic_publish(
                        "".into(),
                        plan.queue_in.as_str().into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        props,
                    ),
                )
                .await?;
            confirms.push((id, confirm));
        }
        for (id, confirm) in confirms {
            let confirmation = setup
                .endpoint
                .rpc("awaiting a publish confirm", confirm)
                .await?;
            if !confirmation.is_ack() {
                return Err(DemoError::Refused(id));
            }
        }
    }
    Ok(())
}

/// Takes every message in `queue`: how many there were and their distinct message ids.
async fn drain(setup: &Setup, queue: &str) -> Result<(u64, HashSet<String>), DemoError> {
    let expected = setup.count(queue).await?;
    let mut ids = HashSet::new();
    let mut got = 0;
    if expected > 0 {
        let mut consumer = setup
            .endpoint
            .rpc(
                "consuming the destination queue",
                setup.channel.basic_consume(
                    queue.into(),
                    "dedupd-demo-drain".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await?;
        while got < expected {
            match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    got += 1;
                    if let Some(id) = delivery.properties.message_id() {
                        ids.insert(id.as_str().to_owned());
                    }
                }
                Ok(Some(Err(e))) => {
                    return Err(DemoError::Amqp(AmqpError::Broker {
                        what: "draining the destination queue",
                        url: setup.endpoint.redacted(),
                        source: e,
                    }))
                }
                Ok(None) | Err(_) => {
                    return Err(DemoError::Drain {
                        queue: queue.to_owned(),
                        got,
                        expected,
                    })
                }
            }
        }
        setup
            .endpoint
            .rpc(
                "cancelling the drain",
                setup.channel.basic_cancel(
                    consumer.tag(),
                    lapin::options::BasicCancelOptions::default(),
                ),
            )
            .await?;
    }
    // Nothing else may be there: the proxy has stopped, so this is the final count.
    let left = setup.count(queue).await?;
    Ok((got + left, ids))
}

/// The route's counters in a Prometheus scrape: forwarded, dropped as duplicates, and
/// rejected (every reason but `user_id_stripped`, which is forwarded, not rejected).
fn read_counts(scrape: &str, route: &str) -> Counts {
    let label = format!("route=\"{route}\"");
    let mut counts = Counts::default();
    for line in scrape.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if !series.contains(&label) {
            continue;
        }
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        // Counters are whole numbers; the exporter prints them as floats.
        let value = value as u64;
        let name = series.split('{').next().unwrap_or_default();
        match name {
            telemetry::FORWARDED => counts.forwarded += value,
            telemetry::DUPLICATES => counts.dropped += value,
            telemetry::REJECTED
                if !series.contains(&format!(
                    "reason=\"{}\"",
                    telemetry::reason::USER_ID_STRIPPED
                )) =>
            {
                counts.rejected += value
            }
            _ => {}
        }
    }
    counts
}

/// Prints the summary; true when every number agrees.
fn print_summary(plan: &Plan, tally: &Tally) -> bool {
    let published = plan.published();
    let distinct = u64::from(plan.distinct);
    let m = tally.metrics;
    let rate = published as f64 / tally.elapsed.as_secs_f64().max(1e-3);
    let mut problems = Vec::new();
    if m.forwarded != distinct {
        problems.push(format!(
            "forwarded {} but {distinct} distinct ids",
            m.forwarded
        ));
    }
    if m.dropped != published - distinct {
        problems.push(format!(
            "dropped {} but {} duplicates published",
            m.dropped,
            published - distinct
        ));
    }
    if tally.arrived != m.forwarded {
        problems.push(format!(
            "{} arrived but {} forwarded",
            tally.arrived, m.forwarded
        ));
    }
    if tally.arrived_distinct != tally.arrived {
        problems.push(format!(
            "{} copies arrived twice",
            tally.arrived - tally.arrived_distinct
        ));
    }
    if tally.missing > 0 {
        problems.push(format!("{} ids never arrived", tally.missing));
    }
    if m.rejected > 0 || tally.dead_lettered > 0 {
        problems.push(format!(
            "{} rejected, {} dead-lettered",
            m.rejected, tally.dead_lettered
        ));
    }
    say(&format!(
        "\nSummary ({:.1}s, {rate:.0} msg/s)\n  \
         published:          {published:>8}   into {}\n  \
         distinct:           {distinct:>8}   ids among them\n  \
         forwarded:          {:>8}   dedupd_messages_forwarded_total\n  \
         dropped:            {:>8}   dedupd_duplicates_total (duplicates, acked upstream)\n  \
         rejected:           {:>8}   dedupd_messages_rejected_total\n  \
         arrived:            {:>8}   drained from {} ({} distinct ids)\n  \
         dead-lettered:      {:>8}   in {}",
        tally.elapsed.as_secs_f64(),
        plan.queue_in,
        m.forwarded,
        m.dropped,
        m.rejected,
        tally.arrived,
        plan.queue_out,
        tally.arrived_distinct,
        tally.dead_lettered,
        plan.queue_dlq,
    ));
    if problems.is_empty() {
        say("OK: every distinct id arrived exactly once; every duplicate was dropped.");
        true
    } else {
        say(&format!("MISMATCH: {}", problems.join("; ")));
        false
    }
}

/// A bar on stdout when it is a terminal; otherwise none (CI logs get the summary only).
fn progress_bar(len: u64) -> ProgressBar {
    if !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stdout());
    // The template is a constant: it parses, but a failure must still not panic.
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{bar:40.cyan/blue}] {pos}/{len} settled  {msg}  ({elapsed})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// One line on stdout. Not println!: it panics when stdout is a closed pipe.
fn say(text: &str) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

fn report_error(error: &DemoError) {
    report_error_text(&error_chain(error));
    if matches!(error, DemoError::Broker { .. } | DemoError::Store { .. }) {
        let _ = writeln!(std::io::stderr(), "\n{SETUP_HINT}");
    }
}

fn report_error_text(text: &str) {
    let _ = writeln!(std::io::stderr(), "dedupd demo: {text}");
}

/// Warnings only by default (a demo's info lines would bury the bar); RUST_LOG as for `run`.
/// Lines go to stderr with the bar cleared around them.
fn init_tracing(format: LogFormat, bar: ProgressBar) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,lapin::returned_messages=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false)
        .with_writer(move || BarWriter(bar.clone()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// stderr, with the progress bar cleared while a line is written. A failed write drops the
/// line: the demo's logging must not stop the demo.
struct BarWriter(ProgressBar);

impl Write for BarWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .suspend(|| std::io::stderr().lock().write_all(buf).ok());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_bounds() {
        assert_eq!(parse_ratio("0"), Ok(0.0));
        assert_eq!(parse_ratio("0.3"), Ok(0.3));
        assert!(parse_ratio("1").is_err());
        assert!(parse_ratio("-0.1").is_err());
        assert!(parse_ratio("lots").is_err());
        assert!(parse_ratio("NaN").is_err());
    }

    fn args(messages: u32, duplicates: f64) -> DemoArgs {
        DemoArgs {
            amqp: DEFAULT_AMQP.into(),
            redis: DEFAULT_REDIS.into(),
            memory: false,
            messages,
            duplicates,
        }
    }

    #[test]
    fn plan_has_every_id_and_the_duplicates_asked_for() {
        for (n, ratio, distinct) in [(2000, 0.3, 1400), (1, 0.5, 1), (2, 0.9, 1), (10, 0.0, 10)] {
            let plan = Plan::new(&args(n, ratio));
            assert_eq!(plan.published(), u64::from(n));
            assert_eq!(plan.distinct, distinct, "{n} at {ratio}");
            let ids: HashSet<u32> = plan.stream.iter().copied().collect();
            assert_eq!(ids.len() as u32, distinct);
            assert!(ids.iter().all(|&i| i < distinct));
        }
    }

    #[test]
    fn plan_makes_a_valid_config_with_unique_names() {
        let a = Plan::new(&args(10, 0.3));
        let b = Plan::new(&args(10, 0.3));
        assert_ne!(a.queue_base, b.queue_base);
        let config = a.config(&args(10, 0.3), false).expect("valid");
        assert_eq!(config.store.key_prefix, a.queue_base);
        assert!(config.routes.contains_key(&a.route));
        let mut memory = args(10, 0.3);
        memory.memory = true;
        a.config(&memory, false).expect("valid with --memory");
    }

    #[test]
    fn a_url_is_taken_literally() {
        let mut odd = args(10, 0.3);
        odd.amqp = "amqp://u:p\"a${X}@127.0.0.1:5672/%2f".into();
        let plan = Plan::new(&odd);
        let config = plan.config(&odd, false).expect("valid");
        assert_eq!(config.upstream.url.expose(), odd.amqp);
    }

    #[test]
    fn counts_are_read_for_the_route_only() {
        let scrape = "\
# TYPE dedupd_messages_forwarded_total counter
dedupd_messages_forwarded_total{route=\"demo-1\"} 1400
dedupd_messages_forwarded_total{route=\"demo-10\"} 7
dedupd_duplicates_total{route=\"demo-1\"} 600
dedupd_messages_rejected_total{route=\"demo-1\",reason=\"missing_key\"} 2
dedupd_messages_rejected_total{route=\"demo-1\",reason=\"user_id_stripped\"} 5
dedupd_messages_consumed_total{route=\"demo-1\"} 2002
";
        assert_eq!(
            read_counts(scrape, "demo-1"),
            Counts {
                forwarded: 1400,
                dropped: 600,
                rejected: 2
            }
        );
        assert_eq!(read_counts(scrape, "demo-2"), Counts::default());
    }
}
