//! The end-to-end fault tests' workload and checker, shared by `tests/faults.rs` and the
//! store kinds' own end-to-end tests: messages with duplicates, then, after the fault, a tally
//! of what arrived downstream (lost, duplicated, left upstream, dead-lettered) and the proxies'
//! counters.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use lapin::BasicProperties;

use super::{metric, wait_for, Broker, Child, Setup};

/// How long the checker waits for a drain or a destination count.
const LONG: Duration = Duration::from_secs(120);

/// `n` messages whose ids repeat with probability `dup_ratio`; returns them and the unique ids.
pub fn workload(n: usize, dup_ratio: f64) -> (Vec<(Vec<u8>, BasicProperties)>, HashSet<String>) {
    let mut ids: Vec<String> = Vec::with_capacity(n);
    let mut unique = HashSet::new();
    for i in 0..n {
        let id = if i > 0 && rand::random::<f64>() < dup_ratio {
            ids[rand::random_range(0..ids.len())].clone()
        } else {
            format!("id-{i}")
        };
        unique.insert(id.clone());
        ids.push(id);
    }
    let messages = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            (
                format!("body-{i}").into_bytes(),
                BasicProperties::default()
                    .with_message_id(id.into())
                    .with_delivery_mode(2),
            )
        })
        .collect();
    (messages, unique)
}

/// What the checker found after the run, and the proxies' counters at the end.
#[derive(Debug, Default)]
pub struct Tally {
    pub forwarded: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub left_upstream: u32,
    pub dead_lettered: u32,
    /// `dedupd_takeovers_total` of the last processes, summed.
    pub takeovers: f64,
    /// `dedupd_store_errors_total` of the last processes, summed.
    pub store_errors: f64,
    /// `dedupd_duplicates_total` (copies dropped) of the last processes, summed.
    pub dropped: f64,
    /// `dedupd_messages_consumed_total` of each last process.
    pub consumed: Vec<f64>,
    /// `dedupd_store_commands_total` (store operations sent) of the last processes, summed.
    pub statements: f64,
}

/// The end of a fault test: waits until the upstream queue is drained and every proxy has
/// nothing in flight, reads their counters, stops them (exit 0 after SIGTERM), drains the
/// destination and counts it against the expected ids; prints the FAULT-FIGURES line `label`.
pub async fn finish(
    broker: &Broker,
    setup: &Setup,
    proxies: Vec<Child>,
    expected: &HashSet<String>,
    label: &str,
) -> Tally {
    let mut t = Tally::default();
    for proxy in &proxies {
        wait_drained(broker, setup, proxy.port).await;
    }
    for proxy in &proxies {
        t.takeovers += setup.metric(proxy.port, "dedupd_takeovers_total").await;
        t.store_errors += setup.metric(proxy.port, "dedupd_store_errors_total").await;
        t.dropped += setup.metric(proxy.port, "dedupd_duplicates_total").await;
        t.statements += metric(proxy.port, "dedupd_store_commands_total", &[]).await;
        t.consumed.push(
            setup
                .metric(proxy.port, "dedupd_messages_consumed_total")
                .await,
        );
    }
    for proxy in proxies {
        proxy.stop().await;
    }

    let got = broker.drain(&setup.out).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for d in &got {
        let id = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        *counts.entry(id).or_default() += 1;
    }
    t.forwarded = got.len();
    t.lost = expected
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .count();
    t.duplicates = counts.values().map(|c| c - 1).sum();
    t.left_upstream = broker.ready(&setup.queue).await;
    t.dead_lettered = broker.ready(&format!("{}.dlq", setup.queue)).await;
    println!(
        "FAULT-FIGURES {label}: forwarded={} lost={} duplicates={} left={} dead_lettered={} \
         takeovers(last process)={} store_errors={}",
        t.forwarded,
        t.lost,
        t.duplicates,
        t.left_upstream,
        t.dead_lettered,
        t.takeovers,
        t.store_errors
    );
    t
}

/// Nothing lost, left upstream or dead-lettered, and at most `max_duplicates` forwarded twice
/// (0 unless the fault cut confirms off: then what was in flight).
pub fn assert_clean(t: &Tally, max_duplicates: usize) {
    assert_eq!(
        (t.lost, t.left_upstream, t.dead_lettered),
        (0, 0, 0),
        "{t:?}"
    );
    assert!(
        t.duplicates <= max_duplicates,
        "duplicates beyond what was in flight ({max_duplicates}): {t:?}"
    );
}

/// Waits until the destination holds at least `n` messages.
pub async fn wait_downstream(broker: &Broker, queue: &str, n: u32) {
    wait_for(&format!("{n} messages in {queue}"), LONG, || async {
        (broker.ready(queue).await >= n).then_some(())
    })
    .await
}

/// Waits until the upstream queue is empty and the proxy on `port` has nothing in flight.
pub async fn wait_drained(broker: &Broker, setup: &Setup, port: u16) {
    wait_for("upstream drained and nothing in flight", LONG, || async {
        let inflight = setup.metric(port, "dedupd_inflight_messages").await;
        let consumed = setup.metric(port, "dedupd_messages_consumed_total").await;
        (broker.ready(&setup.queue).await == 0 && consumed > 0.0 && inflight == 0.0).then_some(())
    })
    .await
}
