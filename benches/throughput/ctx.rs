//! The state of a run: options, connections, what was created (removed at the end, also
//! after an error), notes and problems; message bodies and a confirm-window publisher.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection, PublisherConfirm};

use crate::harness::{poll_until, rabbitmqctl, timed, Broker, RPC};
use crate::measure::{proc_cpu_secs, spawn_sink, Redis, RedisStats};
use crate::{Opts, BODY_LEN, STALL};

/// The process-wide reference instant that body timestamps count from.
pub fn clock() -> Instant {
    static CLOCK: OnceLock<Instant> = OnceLock::new();
    *CLOCK.get_or_init(Instant::now)
}

/// Microseconds since [`clock`].
pub fn now_us() -> u64 {
    clock().elapsed().as_micros() as u64
}

/// `m-0000042`: the message_id of message number `num`.
pub fn message_id(num: u32) -> String {
    format!("m-{num:07}")
}

/// A 256-byte ASCII body: publish timestamp (µs since [`clock`], 20 digits; 0 when not
/// `timestamped`), the id, padding.
pub fn body(num: u32, timestamped: bool) -> Vec<u8> {
    let at = if timestamped { now_us() } else { 0 };
    let mut b = format!("{at:020} m-{num:07} ").into_bytes();
    b.resize(BODY_LEN, b'.');
    b
}

// ---------------------------------------------------------------------------------------------
// What the benchmark created, so it can be removed at the end, also after an error.

#[derive(Default)]
struct Created {
    queues: Vec<String>,
    shovels: Vec<String>,
    prefixes: Vec<String>,
    files: Vec<PathBuf>,
}

/// Everything created so far; [`Cleanup::run`] removes what is still there.
#[derive(Clone, Default)]
pub struct Cleanup(Arc<Mutex<Created>>);

impl Cleanup {
    fn with<R>(&self, f: impl FnOnce(&mut Created) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
    pub fn queue(&self, q: &str) {
        self.with(|c| c.queues.push(q.to_owned()));
    }
    pub fn queue_gone(&self, q: &str) {
        self.with(|c| c.queues.retain(|x| x != q));
    }
    pub fn shovel(&self, s: &str) {
        self.with(|c| c.shovels.push(s.to_owned()));
    }
    pub fn shovel_gone(&self, s: &str) {
        self.with(|c| c.shovels.retain(|x| x != s));
    }
    pub fn prefix(&self, p: &str) {
        self.with(|c| c.prefixes.push(p.to_owned()));
    }
    pub fn prefix_gone(&self, p: &str) {
        self.with(|c| c.prefixes.retain(|x| x != p));
    }
    pub fn file(&self, f: PathBuf) {
        self.with(|c| c.files.push(f));
    }

    /// Removes shovels, queues, Redis keys (or the store's tables) and files still registered.
    /// Best effort: a failure is printed, never fatal.
    pub async fn run(&self, store: &crate::StoreChoice) {
        let redis_urls = &store.redis_urls();
        let created = self.with(std::mem::take);
        for p in &created.prefixes {
            if let Err(e) = store.forget_prefix(p).await {
                eprintln!("cleanup: store of prefix {p}: {e:#}");
            }
        }
        for s in &created.shovels {
            if let Err(e) = rabbitmqctl(&["clear_parameter", "shovel", s]).await {
                eprintln!("cleanup: shovel {s}: {e:#}");
            }
        }
        if !created.queues.is_empty() {
            match Broker::connect("dedupd-bench cleanup").await {
                Ok(b) => {
                    for q in &created.queues {
                        if let Err(e) = b.delete(q).await {
                            eprintln!("cleanup: queue {q}: {e:#}");
                        }
                    }
                    b.close().await;
                }
                Err(e) => eprintln!(
                    "cleanup: cannot reach RabbitMQ ({e:#}); queues left: {:?}",
                    created.queues
                ),
            }
        }
        if !created.prefixes.is_empty() {
            match Redis::connect(redis_urls).await {
                Ok(mut r) => {
                    for p in &created.prefixes {
                        if let Err(e) = r.delete_prefix(p).await {
                            eprintln!("cleanup: Redis keys {p}:*: {e:#}");
                        }
                    }
                }
                Err(e) => eprintln!("cleanup: cannot reach Redis: {e:#}"),
            }
        }
        for f in &created.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

pub struct Ctx<'a> {
    pub opts: &'a Opts,
    pub cleanup: &'a Cleanup,
    pub broker: Broker,
    pub redis: Redis,
    /// Prefix of every queue, shovel, Redis key prefix and file of this run.
    pub run_id: String,
    /// Things that are wrong but not a miscount (reported at the end; the run then fails).
    pub problems: Vec<String>,
    /// Things worth a look (dedupd log lines, metric oddities).
    pub notes: Vec<String>,
    /// The RabbitMQ server's OS process, for its CPU time.
    pub broker_pid: Option<u32>,
}

impl Ctx<'_> {
    /// CPU seconds of the broker and Redis so far.
    pub async fn server_cpu(&mut self) -> Result<(f64, RedisStats)> {
        let broker = self.broker_pid.and_then(proc_cpu_secs).unwrap_or(f64::NAN);
        Ok((broker, self.redis.stats().await?))
    }
}

impl Ctx<'_> {
    pub async fn declare(&self, q: &str) -> Result<()> {
        self.cleanup.queue(q);
        // A leftover of the same name would falsify the counts.
        self.broker.delete(q).await?;
        self.broker.declare(q).await
    }

    /// Declares the fanout exchange `exchange`, auto-deleted with its binding (so removing
    /// `queue` removes it too), and `queue` bound to it.
    pub async fn declare_audit(&self, exchange: &str, queue: &str) -> Result<()> {
        self.declare(queue).await?;
        let ch = &self.broker.ch;
        let options = lapin::options::ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        };
        ch.exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Fanout,
            options,
            lapin::types::FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring exchange {exchange}"))?;
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .with_context(|| format!("binding {queue} to {exchange}"))?;
        Ok(())
    }

    pub async fn delete(&self, q: &str) -> Result<()> {
        self.broker.delete(q).await?;
        self.cleanup.queue_gone(q);
        Ok(())
    }

    pub async fn count(&self, q: &str) -> Result<u32> {
        Ok(self.broker.count(q).await?.messages)
    }

    /// Publishes `seq` to `queue` with wide confirm windows and waits until it holds them all.
    pub async fn preload(&self, queue: &str, seq: &[u32]) -> Result<Duration> {
        let started = Instant::now();
        let mut p = Publisher::connect(self.opts.window).await?;
        // A duplicate is a true copy, body and all (else dedupd would count it a conflict);
        // no round reads preloaded timestamps.
        p.timestamped = false;
        for &num in seq {
            p.publish(queue, num).await?;
        }
        p.close().await?;
        let n = seq.len() as u32;
        poll_until(
            &format!("{queue} to hold the {n} preloaded messages"),
            Duration::from_secs(60),
            || async {
                let c = self.count(queue).await?;
                if c > n {
                    bail!("{queue} holds {c} messages after publishing {n}");
                }
                Ok((c == n).then_some(()))
            },
        )
        .await?;
        Ok(started.elapsed())
    }

    /// Generous deadline for moving `n` messages.
    pub fn move_limit(n: u64) -> Duration {
        Duration::from_secs(120 + n / 500)
    }

    /// Checks that `queue` holds exactly `expected` (in order) and nothing else, by draining it.
    pub async fn verify(&mut self, queue: &str, expected: &[u32], what: &str) -> Result<()> {
        let count = self.count(queue).await?;
        if count as usize != expected.len() {
            bail!(
                "{what}: {queue} holds {count} messages, expected {} ({})",
                expected.len(),
                if (count as usize) < expected.len() {
                    "messages lost"
                } else {
                    "duplicates forwarded"
                }
            );
        }
        if !self.opts.verify {
            return Ok(());
        }
        let target = Arc::new(AtomicU64::new(expected.len() as u64));
        let limit = Duration::from_secs(60 + expected.len() as u64 / 2000);
        let sink = spawn_sink(&self.broker, queue, target, STALL, limit)
            .await?
            .await
            .context("sink task")?;
        if sink.foreign > 0 {
            bail!(
                "{what}: {} messages in {queue} without a benchmark message_id",
                sink.foreign
            );
        }
        if sink.ids.len() != expected.len() {
            bail!(
                "{what}: drained {} of the {} messages {queue} held",
                sink.ids.len(),
                expected.len()
            );
        }
        if sink.ids != expected {
            let mut got = sink.ids.clone();
            let mut want = expected.to_vec();
            got.sort_unstable();
            want.sort_unstable();
            if got != want {
                let got_set: HashSet<u32> = got.iter().copied().collect();
                let want_set: HashSet<u32> = want.iter().copied().collect();
                let lost: Vec<_> = want_set.difference(&got_set).take(5).collect();
                let extra: Vec<_> = got_set.difference(&want_set).take(5).collect();
                let repeated = got.windows(2).filter(|w| w[0] == w[1]).count();
                bail!(
                    "{what}: {queue} does not hold the expected messages: e.g. missing ids {lost:?}, \
                     unexpected ids {extra:?}, {repeated} repeated"
                );
            }
            let at = sink
                .ids
                .iter()
                .zip(expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            self.problems.push(format!(
                "{what}: right messages in the wrong order (first difference at position {at}: \
                 got m-{:07}, expected m-{:07})",
                sink.ids[at], expected[at]
            ));
        }
        Ok(())
    }
}

/// A confirm-mode publisher that keeps up to `window` confirms outstanding.
pub struct Publisher {
    conn: Connection,
    ch: Channel,
    pending: VecDeque<PublisherConfirm>,
    window: usize,
    pub sent: u64,
    /// Whether bodies carry their publish time (for latency).
    pub timestamped: bool,
}

impl Publisher {
    pub async fn connect(window: usize) -> Result<Publisher> {
        let b = Broker::connect("dedupd-bench publisher").await?;
        b.confirms().await?;
        Ok(Publisher {
            conn: b.conn,
            ch: b.ch,
            pending: VecDeque::with_capacity(window),
            window: window.max(1),
            sent: 0,
            timestamped: true,
        })
    }

    /// Publishes message `num` (persistent, message_id set) to `queue` via the default exchange.
    pub async fn publish(&mut self, queue: &str, num: u32) -> Result<()> {
        let props = BasicProperties::default()
            .with_message_id(message_id(num).into())
            .with_delivery_mode(2);
        let confirm = timed("publishing", RPC, async {
            Ok(self
                .ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body(num, self.timestamped),
                    props,
                )
                .await?)
        })
        .await?;
        self.pending.push_back(confirm);
        self.sent += 1;
        while self.pending.len() >= self.window {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<()> {
        if let Some(confirm) = self.pending.pop_front() {
            let c = timed("waiting for a publisher confirm", RPC, async {
                Ok(confirm.await?)
            })
            .await?;
            if !c.is_ack() {
                bail!("the broker nacked a published message: {c:?}");
            }
        }
        Ok(())
    }

    /// Waits for every outstanding confirm.
    pub async fn flush(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    pub async fn close(mut self) -> Result<()> {
        self.flush().await?;
        let _ = tokio::time::timeout(RPC, self.conn.close(200, "".into())).await;
        Ok(())
    }
}
