//! One claim-protocol suite, run against both stores: each case is written once as an async fn
//! over a `Ctx`, and `suite!` generates a `#[tokio::test]` per store. The Redis cases need a
//! server on 127.0.0.1:6379 (db 0); every test writes under its own random key prefix and
//! deletes its keys at the end. Waits poll with a deadline, never a bare sleep.
//!
//! A third copy runs against a Redis Cluster when `DEDUPD_TEST_REDIS_CLUSTER` lists its seed
//! URLs (comma-separated), e.g. three `--cluster-enabled yes` servers joined with
//! `redis-cli --cluster create ... --cluster-replicas 0`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{OwnRedis, REDIS_URL};

use dedupd::config::{StoreConfig, StoreKind, StoreUrl};
use dedupd::store::{BodyDigest, ClaimOutcome, CommitOutcome, KeyState, Owner, Store, StoreError};

const LEASE: Duration = Duration::from_secs(30);
const WINDOW: Duration = Duration::from_secs(60);
/// How long an expiry test may wait for a 200 ms TTL to run out, with room for a slow CI box.
const EXPIRY_DEADLINE: Duration = Duration::from_secs(10);

/// Seed URLs of a Redis Cluster for the `cluster` copy of the suite, comma-separated;
/// `scripts/test.sh` starts one and sets it. Unset under CI: those tests fail; unset in a bare
/// `cargo test`: they report SKIPPED.
const CLUSTER_ENV: &str = "DEDUPD_TEST_REDIS_CLUSTER";

enum Backend {
    Memory,
    Redis,
    Cluster(Vec<String>),
    Postgres,
    /// The embedded store's directory, removed at cleanup.
    Embedded(std::path::PathBuf),
}

struct Ctx {
    store: Store,
    prefix: String,
    backend: Backend,
}

impl Ctx {
    /// A store key as dedupd builds them: `{prefix}:{route}:{id}` (route "r").
    fn key(&self, name: &str) -> String {
        format!("{}:r:{name}", self.prefix)
    }

    fn keys(&self, names: &[&str]) -> Vec<String> {
        names.iter().map(|n| self.key(n)).collect()
    }

    /// Deletes every key the test wrote (Redis only: a memory store dies with the test).
    async fn cleanup(&self) {
        match &self.backend {
            Backend::Memory => {}
            Backend::Redis => self.cleanup_redis().await,
            Backend::Cluster(urls) => common::cluster_cleanup(&urls[0], &self.prefix).await,
            Backend::Postgres => cleanup_postgres(&self.prefix).await,
            Backend::Embedded(dir) => cleanup_embedded(dir),
        }
    }

    async fn cleanup_redis(&self) {
        let client = ::redis::Client::open(REDIS_URL).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection for cleanup");
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        for chunk in keys.chunks(500) {
            let _: i64 = ::redis::cmd("DEL")
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .expect("DEL");
        }
    }
}

fn prefix(store: &str, test: &str) -> String {
    format!("dedupd-test-{store}-{test}-{:016x}", rand::random::<u64>())
}

fn store_config(kind: StoreKind, url: &str, timeout: Duration) -> StoreConfig {
    StoreConfig {
        kind,
        url: StoreUrl::One(url.to_owned()),
        timeout,
        ..StoreConfig::default()
    }
}

async fn memory_ctx(test: &str) -> Ctx {
    let prefix = prefix("mem", test);
    let cfg = StoreConfig {
        key_prefix: prefix.clone(),
        ..store_config(StoreKind::Memory, REDIS_URL, Duration::from_secs(2))
    };
    Ctx {
        store: Store::open(&cfg).await.expect("memory store"),
        prefix,
        backend: Backend::Memory,
    }
}

async fn redis_ctx(test: &str) -> Ctx {
    let prefix = prefix("redis", test);
    let cfg = StoreConfig {
        key_prefix: prefix.clone(),
        ..store_config(StoreKind::Redis, REDIS_URL, Duration::from_secs(5))
    };
    Ctx {
        store: Store::open(&cfg).await.expect("redis store"),
        prefix,
        backend: Backend::Redis,
    }
}

async fn cluster_ctx(test: &str) -> Option<Ctx> {
    let Ok(urls) = std::env::var(CLUSTER_ENV) else {
        // scripts/test.sh (the README's test command, and CI) always provides a cluster.
        assert!(
            std::env::var_os("CI").is_none(),
            "{CLUSTER_ENV} is not set: run the tests with scripts/test.sh"
        );
        eprintln!("SKIPPED: set {CLUSTER_ENV} to run against a Redis Cluster");
        return None;
    };
    let urls: Vec<String> = urls.split(',').map(|u| u.trim().to_owned()).collect();
    let prefix = prefix("cluster", test);
    let cfg = StoreConfig {
        kind: StoreKind::Redis,
        url: StoreUrl::Cluster(urls.clone()),
        timeout: Duration::from_secs(5),
        key_prefix: prefix.clone(),
        ..StoreConfig::default()
    };
    Some(Ctx {
        store: Store::open(&cfg).await.expect("cluster store"),
        prefix,
        backend: Backend::Cluster(urls),
    })
}

fn owner(instance: &str, epoch: u64) -> Owner {
    Owner::new(Arc::from(instance), epoch)
}

/// Polls `claim` by `by` until it returns `Claimed`, asserting that every earlier answer
/// satisfied `before`. Fails past `EXPIRY_DEADLINE`.
async fn wait_until_claimable(
    ctx: &Ctx,
    key: &str,
    by: &Owner,
    before: impl Fn(&ClaimOutcome) -> bool,
) {
    let deadline = Instant::now() + EXPIRY_DEADLINE;
    let keys = vec![key.to_owned()];
    loop {
        let outcome = ctx
            .store
            .claim(&keys, &[], by, LEASE, None)
            .await
            .unwrap()
            .remove(0);
        if outcome == ClaimOutcome::Claimed {
            return;
        }
        assert!(before(&outcome), "unexpected {outcome:?} while waiting");
        assert!(
            Instant::now() < deadline,
            "{key} still {outcome:?} after {EXPIRY_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- the shared cases -------------------------------------------------------------------

async fn claim_absent_is_claimed(ctx: &Ctx) {
    let a = owner("inst-a", 1);
    let keys = ctx.keys(&["k"]);
    assert_eq!(
        ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap(),
        [ClaimOutcome::Claimed]
    );
}

async fn other_instance_sees_in_flight_elsewhere(ctx: &Ctx) {
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let keys = ctx.keys(&["k"]);
    ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap();
    match ctx.store.claim(&keys, &[], &b, LEASE, None).await.unwrap()[..] {
        [ClaimOutcome::InFlightElsewhere { lease_left }] => {
            assert!(lease_left <= LEASE, "{lease_left:?}");
            assert!(
                lease_left > LEASE - Duration::from_secs(5),
                "{lease_left:?}"
            );
        }
        ref other => panic!("{other:?}"),
    }
    // B's attempt changed nothing.
    assert!(matches!(
        ctx.store.inspect(&keys[0]).await.unwrap(),
        KeyState::InFlight { owner, .. } if owner == a.token()
    ));
}

async fn same_token_is_ours_and_refreshes_lease(ctx: &Ctx) {
    let a = owner("inst-a", 1);
    let keys = ctx.keys(&["k"]);
    ctx.store
        .claim(&keys, &[], &a, Duration::from_secs(5), None)
        .await
        .unwrap();
    assert_eq!(
        ctx.store.claim(&keys, &[], &a, WINDOW, None).await.unwrap(),
        [ClaimOutcome::Ours]
    );
    match ctx.store.inspect(&keys[0]).await.unwrap() {
        KeyState::InFlight { lease_left, .. } => {
            assert!(
                lease_left > Duration::from_secs(30),
                "not refreshed: {lease_left:?}"
            )
        }
        other => panic!("{other:?}"),
    }
}

async fn older_epoch_of_same_instance_is_taken_over(ctx: &Ctx) {
    // 9 -> 10 also checks that epochs compare as numbers, not as text.
    let (old, new) = (owner("inst-a", 9), owner("inst-a", 10));
    let keys = ctx.keys(&["k"]);
    ctx.store
        .claim(&keys, &[], &old, LEASE, None)
        .await
        .unwrap();
    assert_eq!(
        ctx.store
            .claim(&keys, &[], &new, LEASE, None)
            .await
            .unwrap(),
        [ClaimOutcome::TakenOver]
    );
    assert!(matches!(
        ctx.store.inspect(&keys[0]).await.unwrap(),
        KeyState::InFlight { owner, .. } if owner == new.token()
    ));
    // The stale epoch cannot take it back, nor commit or release it.
    assert!(matches!(
        ctx.store
            .claim(&keys, &[], &old, LEASE, None)
            .await
            .unwrap()[..],
        [ClaimOutcome::InFlightElsewhere { .. }]
    ));
    assert_eq!(ctx.store.release(&keys, &old).await.unwrap(), [false]);
    // An instance whose id merely starts like ours is someone else.
    let lookalike = owner("inst-a:10", 11);
    assert!(matches!(
        ctx.store
            .claim(&keys, &[], &lookalike, LEASE, None)
            .await
            .unwrap()[..],
        [ClaimOutcome::InFlightElsewhere { .. }]
    ));
    assert_eq!(
        ctx.store.commit(&keys, &[], &new, WINDOW).await.unwrap(),
        [CommitOutcome::Committed]
    );
}

async fn commit_by_owner_then_claim_is_done(ctx: &Ctx) {
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let keys = ctx.keys(&["k"]);
    ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap();
    assert_eq!(
        ctx.store.commit(&keys, &[], &a, WINDOW).await.unwrap(),
        [CommitOutcome::Committed]
    );
    assert_eq!(
        ctx.store.claim(&keys, &[], &b, LEASE, None).await.unwrap(),
        [ClaimOutcome::Done]
    );
    // Done is done for its owner too, and a second commit leaves it as it is.
    assert_eq!(
        ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap(),
        [ClaimOutcome::Done]
    );
    assert_eq!(
        ctx.store.commit(&keys, &[], &a, WINDOW).await.unwrap(),
        [CommitOutcome::DoneElsewhere]
    );
}

/// A commit follows a confirmed publish, so it always leaves the key done, and says what it
/// found: another owner's claim (that owner may publish a second copy), or nothing (our claim
/// lapsed and nobody took it).
async fn commit_writes_done_whatever_it_finds(ctx: &Ctx) {
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let keys = ctx.keys(&["k", "absent"]);
    ctx.store
        .claim(&keys[..1], &[], &a, LEASE, None)
        .await
        .unwrap();
    assert_eq!(
        ctx.store.commit(&keys, &[], &b, WINDOW).await.unwrap(),
        [CommitOutcome::Overrode, CommitOutcome::Restored]
    );
    for key in &keys {
        assert!(matches!(
            ctx.store.inspect(key).await.unwrap(),
            KeyState::Done { window_left } if window_left > WINDOW - Duration::from_secs(5)
        ));
    }
    // The overridden owner can no longer release it: the key stays done.
    assert_eq!(ctx.store.release(&keys[..1], &a).await.unwrap(), [false]);
    assert_eq!(
        ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap(),
        [ClaimOutcome::Done, ClaimOutcome::Done]
    );
}

/// Renewal extends only our own claims, and keeps a claim alive past its first lease.
async fn renew_keeps_only_our_claims_alive(ctx: &Ctx) {
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let keys = ctx.keys(&["mine", "theirs", "done", "absent"]);
    let short = Duration::from_millis(300);
    ctx.store
        .claim(&keys[..1], &[], &a, short, None)
        .await
        .unwrap();
    ctx.store
        .claim(&keys[1..2], &[], &b, LEASE, None)
        .await
        .unwrap();
    ctx.store
        .claim(&keys[2..3], &[], &a, LEASE, None)
        .await
        .unwrap();
    ctx.store
        .commit(&keys[2..3], &[], &a, WINDOW)
        .await
        .unwrap();
    // Renewed again and again for three times the first lease: never lapses.
    let started = Instant::now();
    while started.elapsed() < short * 3 {
        assert_eq!(
            ctx.store.renew(&keys, &a, short).await.unwrap(),
            [true, false, false, false]
        );
        tokio::time::sleep(short / 3).await;
    }
    assert!(matches!(
        ctx.store
            .claim(&keys[..1], &[], &b, LEASE, None)
            .await
            .unwrap()[..],
        [ClaimOutcome::InFlightElsewhere { .. }]
    ));
    assert!(matches!(
        ctx.store.inspect(&keys[2]).await.unwrap(),
        KeyState::Done { window_left } if window_left > LEASE
    ));
    assert_eq!(ctx.store.inspect(&keys[3]).await.unwrap(), KeyState::Absent);
}

async fn release_by_owner_then_claim_is_claimed(ctx: &Ctx) {
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let keys = ctx.keys(&["k"]);
    ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap();
    assert_eq!(ctx.store.release(&keys, &a).await.unwrap(), [true]);
    assert_eq!(ctx.store.inspect(&keys[0]).await.unwrap(), KeyState::Absent);
    assert_eq!(
        ctx.store.claim(&keys, &[], &b, LEASE, None).await.unwrap(),
        [ClaimOutcome::Claimed]
    );
}

async fn release_by_non_owner_is_refused(ctx: &Ctx) {
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let keys = ctx.keys(&["k", "done", "absent"]);
    ctx.store
        .claim(&keys[..2], &[], &a, LEASE, None)
        .await
        .unwrap();
    ctx.store
        .commit(&keys[1..2], &[], &a, WINDOW)
        .await
        .unwrap();
    assert_eq!(
        ctx.store.release(&keys, &b).await.unwrap(),
        [false, false, false]
    );
    assert!(matches!(
        ctx.store.inspect(&keys[0]).await.unwrap(),
        KeyState::InFlight { owner, .. } if owner == a.token()
    ));
    // Release never undoes a commit, even by the former owner.
    assert_eq!(ctx.store.release(&keys[1..2], &a).await.unwrap(), [false]);
    assert!(matches!(
        ctx.store.inspect(&keys[1]).await.unwrap(),
        KeyState::Done { .. }
    ));
}

async fn lease_expiry_frees_the_key(ctx: &Ctx) {
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let key = ctx.key("k");
    let keys = std::slice::from_ref(&key);
    let lease = Duration::from_millis(200);
    ctx.store.claim(keys, &[], &a, lease, None).await.unwrap();
    wait_until_claimable(
        ctx,
        &key,
        &b,
        |o| matches!(o, ClaimOutcome::InFlightElsewhere { lease_left } if *lease_left <= lease),
    )
    .await;
    // The expired owner's commit still writes it (its copy was confirmed), and says it had
    // lapsed to someone else's claim.
    assert_eq!(
        ctx.store.commit(keys, &[], &a, WINDOW).await.unwrap(),
        [CommitOutcome::Overrode]
    );
}

async fn window_expiry_forgets_done_keys(ctx: &Ctx) {
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let key = ctx.key("k");
    let keys = std::slice::from_ref(&key);
    ctx.store.claim(keys, &[], &a, LEASE, None).await.unwrap();
    assert_eq!(
        ctx.store
            .commit(keys, &[], &a, Duration::from_millis(200))
            .await
            .unwrap(),
        [CommitOutcome::Committed]
    );
    wait_until_claimable(ctx, &key, &b, |o| *o == ClaimOutcome::Done).await;
}

async fn duplicate_key_in_one_batch(ctx: &Ctx) {
    let a = owner("inst-a", 1);
    let keys = ctx.keys(&["k", "k"]);
    assert_eq!(
        ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap(),
        [ClaimOutcome::Claimed, ClaimOutcome::Ours]
    );
    let keys = ctx.keys(&["x", "y", "x", "x"]);
    assert_eq!(
        ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap(),
        [
            ClaimOutcome::Claimed,
            ClaimOutcome::Claimed,
            ClaimOutcome::Ours,
            ClaimOutcome::Ours
        ]
    );
    // Commit of a repeated key: the first wins, the later ones find it done.
    assert_eq!(
        ctx.store.commit(&keys, &[], &a, WINDOW).await.unwrap(),
        [
            CommitOutcome::Committed,
            CommitOutcome::Committed,
            CommitOutcome::DoneElsewhere,
            CommitOutcome::DoneElsewhere
        ]
    );
}

async fn mixed_batch_keeps_key_order(ctx: &Ctx) {
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let keys = ctx.keys(&["done", "elsewhere", "mine", "new"]);
    ctx.store
        .claim(&keys[..1], &[], &b, LEASE, None)
        .await
        .unwrap();
    ctx.store.commit(&keys[..1], &[], &b, WINDOW).await.unwrap();
    ctx.store
        .claim(&keys[1..2], &[], &b, LEASE, None)
        .await
        .unwrap();
    ctx.store
        .claim(&keys[2..3], &[], &a, LEASE, None)
        .await
        .unwrap();
    let outcomes = ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap();
    assert_eq!(outcomes[0], ClaimOutcome::Done);
    assert!(matches!(
        outcomes[1],
        ClaimOutcome::InFlightElsewhere { .. }
    ));
    assert_eq!(outcomes[2], ClaimOutcome::Ours);
    assert_eq!(outcomes[3], ClaimOutcome::Claimed);
}

async fn empty_batches(ctx: &Ctx) {
    let a = owner("inst-a", 1);
    assert!(ctx
        .store
        .claim(&[], &[], &a, LEASE, None)
        .await
        .unwrap()
        .is_empty());
    assert!(ctx
        .store
        .commit(&[], &[], &a, WINDOW)
        .await
        .unwrap()
        .is_empty());
    assert!(ctx.store.renew(&[], &a, LEASE).await.unwrap().is_empty());
    assert!(ctx.store.release(&[], &a).await.unwrap().is_empty());
}

async fn batch_of_1000_keys(ctx: &Ctx) {
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let keys: Vec<String> = (0..1000).map(|i| ctx.key(&format!("bulk-{i}"))).collect();
    let claimed = ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap();
    assert_eq!(claimed.len(), 1000);
    assert!(claimed.iter().all(|o| *o == ClaimOutcome::Claimed));
    // Commit the even keys, release the odd ones.
    let even: Vec<String> = keys.iter().step_by(2).cloned().collect();
    let odd: Vec<String> = keys.iter().skip(1).step_by(2).cloned().collect();
    let committed = ctx.store.commit(&even, &[], &a, WINDOW).await.unwrap();
    assert_eq!(committed, vec![CommitOutcome::Committed; 500]);
    let released = ctx.store.release(&odd, &a).await.unwrap();
    assert_eq!(released, vec![true; 500]);
    let again = ctx.store.claim(&keys, &[], &b, LEASE, None).await.unwrap();
    for (i, outcome) in again.iter().enumerate() {
        let expected = if i % 2 == 0 {
            ClaimOutcome::Done
        } else {
            ClaimOutcome::Claimed
        };
        assert_eq!(*outcome, expected, "key {i}");
    }
}

async fn inspect_each_state(ctx: &Ctx) {
    let a = owner("inst-a", 7);
    let key = ctx.key("k");
    let keys = std::slice::from_ref(&key);
    assert_eq!(ctx.store.inspect(&key).await.unwrap(), KeyState::Absent);
    ctx.store.claim(keys, &[], &a, LEASE, None).await.unwrap();
    match ctx.store.inspect(&key).await.unwrap() {
        KeyState::InFlight { owner, lease_left } => {
            assert_eq!(owner, a.token());
            assert!(lease_left <= LEASE && lease_left > LEASE - Duration::from_secs(5));
        }
        other => panic!("{other:?}"),
    }
    ctx.store.commit(keys, &[], &a, WINDOW).await.unwrap();
    match ctx.store.inspect(&key).await.unwrap() {
        // A window ends rounded up, by at most an eighth of it.
        KeyState::Done { window_left } => {
            assert!(
                window_left <= WINDOW + WINDOW / 8 && window_left > WINDOW - Duration::from_secs(5),
                "{window_left:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

async fn forget_deletes_whatever_is_there(ctx: &Ctx) {
    let a = owner("inst-a", 1);
    let keys = ctx.keys(&["done", "inflight"]);
    ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap();
    ctx.store.commit(&keys[..1], &[], &a, WINDOW).await.unwrap();
    for key in &keys {
        assert!(ctx.store.forget(key).await.unwrap(), "{key}");
        assert_eq!(ctx.store.inspect(key).await.unwrap(), KeyState::Absent);
        assert!(!ctx.store.forget(key).await.unwrap(), "{key} twice");
    }
    assert_eq!(
        ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap(),
        [ClaimOutcome::Claimed, ClaimOutcome::Claimed]
    );
}

async fn ping_answers(ctx: &Ctx) {
    ctx.store.ping().await.unwrap();
}

fn body(text: &str) -> Option<BodyDigest> {
    Some(BodyDigest::of(text.as_bytes()))
}

/// What is left of a done key's window, from `inspect`.
async fn window_left(ctx: &Ctx, key: &str) -> Duration {
    match ctx.store.inspect(key).await.unwrap() {
        KeyState::Done { window_left } => window_left,
        other => panic!("{key}: {other:?}"),
    }
}

/// A done key remembers its first copy's body digest: the same body is a duplicate, another
/// body a conflict, and a copy without a digest (or a key committed without one) cannot tell,
/// so it is a duplicate. A second commit keeps the first digest.
async fn conflicting_body_is_a_conflict(ctx: &Ctx) {
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let keys = ctx.keys(&["k", "plain"]);
    let first = [body("first"), None];
    ctx.store
        .claim(&keys, &first, &a, LEASE, None)
        .await
        .unwrap();
    assert_eq!(
        ctx.store.commit(&keys, &first, &a, WINDOW).await.unwrap(),
        [CommitOutcome::Committed, CommitOutcome::Committed]
    );
    let rows = [
        (
            [body("first"), body("other")],
            [ClaimOutcome::Done, ClaimOutcome::Done],
        ),
        (
            [body("other"), body("first")],
            [ClaimOutcome::Conflict, ClaimOutcome::Done],
        ),
        ([None, None], [ClaimOutcome::Done, ClaimOutcome::Done]),
    ];
    for (bodies, expected) in rows {
        assert_eq!(
            ctx.store
                .claim(&keys, &bodies, &b, LEASE, None)
                .await
                .unwrap(),
            expected,
            "{bodies:?}"
        );
    }
    // Outcomes follow key order in a batch that mixes both, each key twice.
    let mixed = ctx.keys(&["k", "k", "plain", "k"]);
    let bodies = [body("other"), body("first"), body("x"), None];
    assert_eq!(
        ctx.store
            .claim(&mixed, &bodies, &b, LEASE, None)
            .await
            .unwrap(),
        [
            ClaimOutcome::Conflict,
            ClaimOutcome::Done,
            ClaimOutcome::Done,
            ClaimOutcome::Done
        ]
    );
    assert_eq!(
        ctx.store
            .commit(&keys[..1], &[body("other")], &b, WINDOW)
            .await
            .unwrap(),
        [CommitOutcome::DoneElsewhere]
    );
    assert_eq!(
        ctx.store
            .claim(&keys[..1], &[body("first")], &b, LEASE, None)
            .await
            .unwrap(),
        [ClaimOutcome::Done]
    );
    // Forgotten and committed again, the key remembers the new body.
    assert!(ctx.store.forget(&keys[0]).await.unwrap());
    ctx.store
        .commit(&keys[..1], &[body("other")], &a, WINDOW)
        .await
        .unwrap();
    assert_eq!(
        ctx.store
            .claim(&keys[..1], &[body("first")], &b, LEASE, None)
            .await
            .unwrap(),
        [ClaimOutcome::Conflict]
    );
}

/// A sliding claim moves a duplicate's window to `slide` from now, never shortens it, and
/// leaves conflicts and fixed-window claims alone. Asked through `inspect`, so no clock needs
/// to pass.
async fn sliding_claim_restarts_the_window_of_duplicates(ctx: &Ctx) {
    let a = owner("inst-a", 1);
    let short = Duration::from_secs(2);
    let keys = ctx.keys(&["slides", "fixed", "conflict", "long"]);
    let bodies = [body("s"), body("f"), body("c"), body("l")];
    ctx.store
        .claim(&keys, &bodies, &a, LEASE, None)
        .await
        .unwrap();
    ctx.store
        .commit(&keys[..3], &bodies[..3], &a, short)
        .await
        .unwrap();
    ctx.store
        .commit(&keys[3..], &bodies[3..], &a, WINDOW)
        .await
        .unwrap();
    let slide = Some(WINDOW);
    assert_eq!(
        ctx.store
            .claim(&keys[..1], &bodies[..1], &a, LEASE, slide)
            .await
            .unwrap(),
        [ClaimOutcome::Done]
    );
    assert!(window_left(ctx, &keys[0]).await > WINDOW / 2);
    assert_eq!(
        ctx.store
            .claim(&keys[1..2], &bodies[1..2], &a, LEASE, None)
            .await
            .unwrap(),
        [ClaimOutcome::Done]
    );
    assert!(window_left(ctx, &keys[1]).await <= short);
    assert_eq!(
        ctx.store
            .claim(&keys[2..3], &[body("other")], &a, LEASE, slide)
            .await
            .unwrap(),
        [ClaimOutcome::Conflict]
    );
    assert!(window_left(ctx, &keys[2]).await <= short);
    assert_eq!(
        ctx.store
            .claim(&keys[3..], &bodies[3..], &a, LEASE, Some(short))
            .await
            .unwrap(),
        [ClaimOutcome::Done]
    );
    assert!(window_left(ctx, &keys[3]).await > WINDOW / 2);
    // A slid key stays remembered after its first window: claimed again past it, still done.
    let key = ctx.key("slid");
    let one = std::slice::from_ref(&key);
    let started = Instant::now();
    ctx.store
        .claim(one, &[body("s")], &a, LEASE, None)
        .await
        .unwrap();
    ctx.store
        .commit(one, &[body("s")], &a, Duration::from_millis(600))
        .await
        .unwrap();
    while started.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            ctx.store
                .claim(
                    one,
                    &[body("s")],
                    &a,
                    LEASE,
                    Some(Duration::from_millis(600))
                )
                .await
                .unwrap(),
            [ClaimOutcome::Done],
            "after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once copies stop coming, it is forgotten.
    wait_until_claimable(ctx, &key, &a, |o| *o == ClaimOutcome::Done).await;
}

macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $case() {
                    let ctx = super::memory_ctx(stringify!($case)).await;
                    super::$case(&ctx).await;
                    ctx.cleanup().await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $case() {
                    let ctx = super::redis_ctx(stringify!($case)).await;
                    super::$case(&ctx).await;
                    ctx.cleanup().await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(ctx) = super::cluster_ctx(stringify!($case)).await else {
                        return;
                    };
                    super::$case(&ctx).await;
                    ctx.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let ctx = super::postgres_ctx(stringify!($case)).await;
                    super::$case(&ctx).await;
                    ctx.cleanup().await;
                }
            )*
        }
        mod embedded {
            $(
                #[tokio::test]
                async fn $case() {
                    let ctx = super::embedded_ctx(stringify!($case)).await;
                    super::$case(&ctx).await;
                    ctx.cleanup().await;
                }
            )*
        }
    };
}

suite!(
    claim_absent_is_claimed,
    other_instance_sees_in_flight_elsewhere,
    same_token_is_ours_and_refreshes_lease,
    older_epoch_of_same_instance_is_taken_over,
    commit_by_owner_then_claim_is_done,
    commit_writes_done_whatever_it_finds,
    renew_keeps_only_our_claims_alive,
    release_by_owner_then_claim_is_claimed,
    release_by_non_owner_is_refused,
    lease_expiry_frees_the_key,
    window_expiry_forgets_done_keys,
    duplicate_key_in_one_batch,
    mixed_batch_keeps_key_order,
    empty_batches,
    batch_of_1000_keys,
    inspect_each_state,
    forget_deletes_whatever_is_there,
    ping_answers,
    conflicting_body_is_a_conflict,
    sliding_claim_restarts_the_window_of_duplicates,
);

// ---- Stores that are away ---------------------------------------------------------------

/// Every operation of `store`, three times over, fails, each within `timeout` (plus slack):
/// what a store that is away must do so the routes can block and retry instead of hanging.
async fn every_operation_fails_within(store: &Store, timeout: Duration) {
    let a = owner("inst-a", 1);
    let keys = vec!["dedupd-test-unreachable:r:k".to_owned()];
    for _ in 0..3 {
        let started = Instant::now();
        let results: [Result<(), StoreError>; 8] = [
            store.claim(&keys, &[], &a, LEASE, None).await.map(drop),
            store.commit(&keys, &[], &a, WINDOW).await.map(drop),
            store.renew(&keys, &a, LEASE).await.map(drop),
            store.release(&keys, &a).await.map(drop),
            store.inspect(&keys[0]).await.map(drop),
            store.forget(&keys[0]).await.map(drop),
            store
                .size("dedupd-test-unreachable", &["r".to_owned()])
                .await
                .map(drop),
            store.ping().await,
        ];
        for r in &results {
            assert!(r.is_err(), "{r:?}");
        }
        assert!(
            started.elapsed() < 8 * timeout + Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
}

/// A server that accepts connections and never answers (no RST, so only a timeout can tell),
/// reached through `url(its address)`: three claims each end in an error that `timed_out`
/// accepts, within the timeout, not in a hang, also after the stuck connection is replaced.
async fn claims_time_out_on_a_silent_server(
    kind: StoreKind,
    url: impl Fn(std::net::SocketAddr) -> String,
    timed_out: impl Fn(&StoreError) -> bool,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let timeout = Duration::from_millis(300);
    let store = Store::open(&store_config(kind, &url(addr), timeout))
        .await
        .unwrap();
    let keys = vec!["dedupd-test-silent:r:k".to_owned()];
    for _ in 0..3 {
        let started = Instant::now();
        let result = store
            .claim(&keys, &[], &owner("inst-a", 1), LEASE, None)
            .await;
        assert!(result.as_ref().is_err_and(&timed_out), "{result:?}");
        assert!(
            started.elapsed() < timeout + Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
    silent.abort();
}

// ---- Redis only -------------------------------------------------------------------------

/// Redis absent: `open` succeeds (the daemon must not exit), every operation fails within the
/// timeout instead of hanging, again and again.
#[tokio::test]
async fn redis_unreachable_fails_fast_and_open_does_not() {
    let timeout = Duration::from_millis(500);
    let cfg = store_config(StoreKind::Redis, "redis://127.0.0.1:1/0", timeout);
    let store = Store::open(&cfg)
        .await
        .expect("open must not need the server");
    every_operation_fails_within(&store, timeout).await;
}

/// A server that accepts and never answers (no RST, so only a timeout can tell): operations
/// end within the timeout, not in a hang, including after the connection is replaced.
#[tokio::test]
async fn redis_silent_server_times_out() {
    // The client's own response timeout answers first here, as a Redis error.
    claims_time_out_on_a_silent_server(
        StoreKind::Redis,
        |addr| format!("redis://{addr}/0"),
        |e| matches!(e, StoreError::Timeout(_)) || e.to_string().contains("timed out"),
    )
    .await;
}

/// `SCRIPT FLUSH` (what a restart does to the script cache): claims, commits and releases
/// still work on the same store handle.
#[tokio::test]
async fn redis_noscript_recovery() {
    let ctx = redis_ctx("noscript").await;
    let a = owner("inst-a", 1);
    let flush = || async {
        let client = ::redis::Client::open(REDIS_URL).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = ::redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
    };
    let keys = ctx.keys(&["a", "b", "a"]);
    assert_eq!(
        ctx.store
            .claim(&keys[..1], &[], &a, LEASE, None)
            .await
            .unwrap(),
        [ClaimOutcome::Claimed]
    );
    flush().await;
    assert_eq!(
        ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap(),
        [
            ClaimOutcome::Ours,
            ClaimOutcome::Claimed,
            ClaimOutcome::Ours
        ]
    );
    flush().await;
    assert_eq!(
        ctx.store.commit(&keys[..1], &[], &a, WINDOW).await.unwrap(),
        [CommitOutcome::Committed]
    );
    flush().await;
    assert_eq!(ctx.store.release(&keys[1..2], &a).await.unwrap(), [true]);
    ctx.cleanup().await;
}

/// TLS settings with a plain `redis://` url would silently not apply: refused at open.
#[tokio::test]
async fn redis_tls_settings_need_rediss() {
    let mut cfg = store_config(StoreKind::Redis, REDIS_URL, Duration::from_secs(1));
    cfg.tls = Some(dedupd::config::Tls {
        ca_file: None,
        cert_file: None,
        key_file: None,
    });
    assert!(matches!(
        Store::open(&cfg).await,
        Err(StoreError::Config(_))
    ));
}

/// Polls a claim of `key` until the store answers, within a deadline.
async fn claim_when_up(store: &Store, key: &str, by: &Owner) -> ClaimOutcome {
    let deadline = Instant::now() + Duration::from_secs(10);
    let keys = vec![key.to_owned()];
    loop {
        match store.claim(&keys, &[], by, LEASE, None).await {
            Ok(mut outcomes) => return outcomes.remove(0),
            Err(e) => assert!(Instant::now() < deadline, "store still down: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Redis absent at start, then up; then restarted (empty script cache): the same store
/// handle recovers each time without being reopened.
#[tokio::test]
async fn redis_comes_up_later_and_restarts() {
    // Not started until the store is open: its port is reserved (and cannot change later).
    let mut server = OwnRedis::reserve(false);
    let cfg = store_config(StoreKind::Redis, &server.url(), Duration::from_secs(1));
    let store = Store::open(&cfg).await.expect("open without a server");
    let a = owner("inst-a", 1);
    assert!(store.ping().await.is_err());

    if !OwnRedis::installed() {
        eprintln!("SKIPPED: no redis-server binary to start");
        return;
    }
    server.start().await;
    assert_eq!(
        claim_when_up(&store, "dedupd-test:k1", &a).await,
        ClaimOutcome::Claimed
    );
    server.kill().await;
    assert!(store.ping().await.is_err());

    server.start().await;
    // A fresh server: no data (persistence off) and no scripts cached.
    assert_eq!(
        claim_when_up(&store, "dedupd-test:k2", &a).await,
        ClaimOutcome::Claimed
    );
    assert_eq!(
        store
            .commit(&["dedupd-test:k2".to_owned()], &[], &a, WINDOW)
            .await
            .unwrap(),
        [CommitOutcome::Committed]
    );
    server.kill().await;
}

/// NOSCRIPT on a cluster: the per-key calls reload the script on every primary and go on.
#[tokio::test]
async fn cluster_noscript_recovery() {
    let Some(ctx) = cluster_ctx("noscript").await else {
        return;
    };
    let Backend::Cluster(urls) = &ctx.backend else {
        unreachable!()
    };
    let a = owner("inst-a", 1);
    let keys: Vec<String> = (0..50).map(|i| ctx.key(&format!("k{i}"))).collect();
    ctx.store
        .claim(&keys[..1], &[], &a, LEASE, None)
        .await
        .unwrap();
    let client = ::redis::cluster::ClusterClient::new(urls.clone()).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    // Routed to every primary by redis-rs.
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let outcomes = ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap();
    assert_eq!(outcomes[0], ClaimOutcome::Ours);
    assert!(outcomes[1..].iter().all(|o| *o == ClaimOutcome::Claimed));
    assert!(ctx
        .store
        .commit(&keys, &[], &a, WINDOW)
        .await
        .unwrap()
        .iter()
        .all(|o| *o == CommitOutcome::Committed));
    ctx.cleanup().await;
}

/// Cluster seeds that do not answer: `open` succeeds, operations fail within the timeout.
#[tokio::test]
async fn cluster_unreachable_fails_fast_and_open_does_not() {
    let timeout = Duration::from_millis(500);
    let cfg = StoreConfig {
        kind: StoreKind::Redis,
        url: StoreUrl::Cluster(vec![
            "redis://127.0.0.1:1".to_owned(),
            "redis://127.0.0.1:2".to_owned(),
        ]),
        timeout,
        ..StoreConfig::default()
    };
    let store = Store::open(&cfg)
        .await
        .expect("open must not need the servers");
    let keys = vec!["dedupd-test-unreachable:k".to_owned()];
    for _ in 0..3 {
        let started = Instant::now();
        assert!(store
            .claim(&keys, &[], &owner("inst-a", 1), LEASE, None)
            .await
            .is_err());
        assert!(store.ping().await.is_err());
        assert!(
            started.elapsed() < 2 * timeout + Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
}

/// A store that may evict keys is reported (an evicted done key is a forgotten key): every
/// policy but `noeviction` on the server, and on every primary of a cluster.
#[tokio::test]
async fn eviction_policy_is_reported() {
    let mut server = OwnRedis::run(false).await;
    let cfg = store_config(StoreKind::Redis, &server.url(), Duration::from_secs(1));
    let store = Store::open(&cfg).await.expect("open");
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "own redis-server never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for (policy, expected) in [
        ("noeviction", None),
        ("allkeys-lru", Some("allkeys-lru")),
        ("volatile-ttl", Some("volatile-ttl")),
    ] {
        let _: () = ::redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg(policy)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            store.eviction_risk().await.unwrap().as_deref(),
            expected,
            "{policy}"
        );
    }
    assert_eq!(
        Store::open(&store_config(StoreKind::Memory, REDIS_URL, LEASE))
            .await
            .unwrap()
            .eviction_risk()
            .await
            .unwrap(),
        None
    );
    server.kill().await;

    // The throwaway cluster runs with the default policy (noeviction) on every primary.
    if let Some(ctx) = cluster_ctx("eviction").await {
        assert_eq!(ctx.store.eviction_risk().await.unwrap(), None);
    }
}

// ---- PostgreSQL -------------------------------------------------------------------------

/// The local PostgreSQL (`scripts/services.sh` starts it): trust auth, user `postgres`.
const POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

async fn postgres_ctx(test: &str) -> Ctx {
    let prefix = prefix("pg", test);
    let cfg = StoreConfig {
        key_prefix: prefix.clone(),
        ..store_config(StoreKind::Postgres, POSTGRES_URL, Duration::from_secs(5))
    };
    Ctx {
        store: Store::open(&cfg).await.expect("postgres store"),
        prefix,
        backend: Backend::Postgres,
    }
}

/// Deletes what a test wrote under `prefix`: its table.
async fn cleanup_postgres(prefix: &str) {
    let table = dedupd::store::postgres_table_name(prefix);
    pg_admin()
        .await
        .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
        .await
        .expect("DROP TABLE");
}

/// A connection to the local PostgreSQL as its superuser, to look behind the store's back.
async fn pg_admin() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(POSTGRES_URL, tokio_postgres::NoTls)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432 (scripts/services.sh starts it)");
    tokio::spawn(conn);
    client
}

/// Rows in the table of `prefix`, expired or not.
async fn pg_rows(prefix: &str) -> i64 {
    let table = dedupd::store::postgres_table_name(prefix);
    pg_admin()
        .await
        .query_one(&format!("SELECT count(*) FROM \"{table}\""), &[])
        .await
        .expect("count rows")
        .get(0)
}

/// PostgreSQL absent: `open` succeeds (the daemon must not exit), every operation fails within
/// the timeout instead of hanging, again and again.
#[tokio::test]
async fn postgres_unreachable_fails_fast_and_open_does_not() {
    let timeout = Duration::from_millis(500);
    let cfg = store_config(
        StoreKind::Postgres,
        "postgres://postgres@127.0.0.1:1/postgres",
        timeout,
    );
    let store = Store::open(&cfg)
        .await
        .expect("open must not need the server");
    every_operation_fails_within(&store, timeout).await;
}

/// A server that accepts and never answers: operations end within the timeout, each time (the
/// stuck connection is not handed out again).
#[tokio::test]
async fn postgres_silent_server_times_out() {
    claims_time_out_on_a_silent_server(
        StoreKind::Postgres,
        |addr| format!("postgres://postgres@{addr}/postgres"),
        |e| matches!(e, StoreError::Timeout(_)),
    )
    .await;
}

/// Four instances (each its own pool) claim the same new keys at once, in different orders,
/// round after round: every key is `Claimed` by exactly one and `InFlightElsewhere` for the
/// others, whatever the interleaving of their statements.
#[tokio::test]
async fn postgres_racing_instances_claim_each_key_once() {
    let ctx = postgres_ctx("racing").await;
    let cfg = StoreConfig {
        key_prefix: ctx.prefix.clone(),
        ..store_config(StoreKind::Postgres, POSTGRES_URL, Duration::from_secs(10))
    };
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(Store::open(&cfg).await.expect("store"));
    }
    for round in 0..10 {
        let keys: Vec<String> = (0..200).map(|i| ctx.key(&format!("{round}-{i}"))).collect();
        let racers = stores.iter().enumerate().map(|(n, store)| {
            let mut mine = keys.clone();
            if n % 2 == 1 {
                mine.reverse();
            }
            let by = owner(&format!("inst-{n}"), 1);
            async move {
                let outcomes = store
                    .claim(&mine, &[], &by, LEASE, None)
                    .await
                    .expect("claim");
                let mut by_key: Vec<(String, ClaimOutcome)> =
                    mine.into_iter().zip(outcomes).collect();
                by_key.sort_by(|a, b| a.0.cmp(&b.0));
                by_key
            }
        });
        let results = futures::future::join_all(racers).await;
        for k in 0..keys.len() {
            let outcomes: Vec<&ClaimOutcome> = results.iter().map(|r| &r[k].1).collect();
            let claimed = outcomes
                .iter()
                .filter(|o| ***o == ClaimOutcome::Claimed)
                .count();
            let elsewhere = outcomes
                .iter()
                .filter(|o| matches!(o, ClaimOutcome::InFlightElsewhere { .. }))
                .count();
            assert_eq!((claimed, elsewhere), (1, 3), "round {round}: {outcomes:?}");
        }
    }
    // One claim statement per round and instance, plus the table probe; more means some keys
    // were inserted by another instance between a statement's snapshot and its insert, and
    // were asked again (the path this test is for).
    let sent: Vec<u64> = stores.iter().map(Store::commands_sent).collect();
    println!("statements per instance for 10 racing claims: {sent:?}");
    ctx.cleanup().await;
}

/// Rows whose lease or window ended are deleted by the sweeper; live ones stay.
#[tokio::test]
async fn postgres_sweeper_deletes_expired_rows() {
    let ctx = postgres_ctx("sweeper").await;
    let a = owner("inst-a", 1);
    let keys: Vec<String> = (0..300).map(|i| ctx.key(&format!("k{i}"))).collect();
    let short = Duration::from_millis(200);
    ctx.store
        .claim(&keys[..200], &[], &a, short, None)
        .await
        .unwrap();
    ctx.store
        .claim(&keys[200..], &[], &a, LEASE, None)
        .await
        .unwrap();
    ctx.store
        .commit(&keys[..100], &[], &a, short)
        .await
        .unwrap();
    ctx.store
        .commit(&keys[250..], &[], &a, WINDOW)
        .await
        .unwrap();
    assert_eq!(pg_rows(&ctx.prefix).await, 300);

    let tracker = tokio_util::task::TaskTracker::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    // A 1 s window: a pass every 5 s.
    ctx.store.start_upkeep(
        &[("r".to_owned(), Duration::from_secs(1))],
        &tracker,
        &shutdown,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = pg_rows(&ctx.prefix).await;
        if rows == 100 {
            break;
        }
        assert!(Instant::now() < deadline, "{rows} rows left, expected 100");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .expect("the sweeper stops on shutdown");
    assert!(matches!(
        ctx.store.inspect(&keys[299]).await.unwrap(),
        KeyState::Done { .. }
    ));
    assert!(matches!(
        ctx.store.inspect(&keys[200]).await.unwrap(),
        KeyState::InFlight { .. }
    ));
    ctx.cleanup().await;
}

/// Exact live counts per route (in flight and done, not expired), and the table's size.
#[tokio::test]
async fn postgres_size_counts_each_route() {
    let ctx = postgres_ctx("size").await;
    let a = owner("inst-a", 1);
    let of = |route: &str, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("{}:{route}:{i}", ctx.prefix))
            .collect()
    };
    let routes: Vec<String> = ["orders", "payments", "idle"].map(String::from).to_vec();
    let before = ctx.store.size(&ctx.prefix, &routes).await.unwrap();
    assert_eq!(before.keys, [0, 0, 0]);
    ctx.store
        .claim(&of("orders", 30), &[], &a, LEASE, None)
        .await
        .unwrap();
    ctx.store
        .commit(&of("orders", 20), &[], &a, WINDOW)
        .await
        .unwrap();
    ctx.store
        .claim(&of("payments", 7), &[], &a, LEASE, None)
        .await
        .unwrap();
    let expired = of("payments", 12)[7..].to_vec();
    ctx.store
        .commit(&expired, &[], &a, Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let size = ctx.store.size(&ctx.prefix, &routes).await.unwrap();
    assert_eq!(size.keys, [30, 7, 0]);
    assert!(size.exact);
    assert!(size.memory_bytes > 8192, "{size:?}");
    // Another prefix's table (none here) holds nothing.
    let other = ctx
        .store
        .size("dedupd-test-nothing", &routes)
        .await
        .unwrap();
    assert_eq!(other.keys, [0, 0, 0]);
    ctx.cleanup().await;
}

/// Reading a prefix that has no table (`dedupd inspect` with a mistyped prefix, the size
/// sampler, the sweeper) creates none; the first claim does.
#[tokio::test]
async fn postgres_reads_create_no_table() {
    let ctx = postgres_ctx("readonly").await;
    let table = dedupd::store::postgres_table_name(&ctx.prefix);
    let exists = || async {
        pg_admin()
            .await
            .query_one(
                "SELECT to_regclass($1::text) IS NOT NULL",
                &[&format!("\"{table}\"")],
            )
            .await
            .expect("to_regclass")
            .get::<_, bool>(0)
    };
    let key = ctx.key("k");
    assert_eq!(ctx.store.inspect(&key).await.unwrap(), KeyState::Absent);
    assert!(!ctx.store.forget(&key).await.unwrap());
    let size = ctx
        .store
        .size(&ctx.prefix, &["r".to_owned()])
        .await
        .unwrap();
    assert_eq!((size.keys, size.memory_bytes), (vec![0], 0));
    assert!(!exists().await, "a read created the table");
    assert_eq!(
        ctx.store
            .claim(
                std::slice::from_ref(&key),
                &[],
                &owner("inst-a", 1),
                LEASE,
                None
            )
            .await
            .unwrap(),
        [ClaimOutcome::Claimed]
    );
    assert!(exists().await);
    ctx.cleanup().await;
}

/// After the table was emptied and vacuumed (PostgreSQL then believes it holds nothing), the
/// batches still find their rows through the primary key: no statement of the store reads the
/// whole table while it fills up again. Counted by the server: `pg_stat_user_tables.seq_scan`
/// ends at 1, the heap scan that built the primary key when the store created the table.
#[tokio::test]
async fn postgres_batches_never_read_the_whole_table() {
    let ctx = postgres_ctx("noseqscan").await;
    let a = owner("inst-a", 1);
    let table = format!("\"{}\"", dedupd::store::postgres_table_name(&ctx.prefix));
    let batch = |round: usize| -> Vec<String> {
        (0..200).map(|i| ctx.key(&format!("{round}-{i}"))).collect()
    };
    for round in 0..10 {
        ctx.store
            .claim(&batch(round), &[], &a, LEASE, None)
            .await
            .unwrap();
        ctx.store
            .commit(&batch(round), &[], &a, WINDOW)
            .await
            .unwrap();
    }
    // Emptied without a sequential scan of its own, and vacuumed.
    let admin = pg_admin().await;
    for sql in [
        "SET enable_seqscan = off".to_owned(),
        format!("DELETE FROM {table} WHERE key >= '00000000-0000-0000-0000-000000000000'"),
        format!("VACUUM {table}"),
    ] {
        admin.batch_execute(&sql).await.expect(&sql);
    }
    for round in 10..30 {
        let keys = batch(round);
        ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap();
        ctx.store.renew(&keys[..100], &a, LEASE).await.unwrap();
        ctx.store.release(&keys[100..], &a).await.unwrap();
        ctx.store
            .commit(&keys[..100], &[], &a, WINDOW)
            .await
            .unwrap();
        ctx.store.inspect(&keys[0]).await.unwrap();
    }
    // One more insert last: a session's statistics reach the others (within seconds) all at
    // once, so once this row is counted, every statement before it is.
    ctx.store
        .claim(&ctx.keys(&["last"]), &[], &a, LEASE, None)
        .await
        .unwrap();
    let inserted = 10 * 200 + 20 * 200 + 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    let seq_scans = loop {
        let row = pg_admin()
            .await
            .query_one(
                "SELECT seq_scan, n_tup_ins FROM pg_stat_user_tables \
                 WHERE relid = to_regclass($1::text)",
                &[&table],
            )
            .await
            .expect("pg_stat_user_tables");
        let (seq, ins): (i64, i64) = (row.get(0), row.get(1));
        if ins >= inserted {
            break seq;
        }
        assert!(
            Instant::now() < deadline,
            "{ins} of {inserted} inserts counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        seq_scans, 1,
        "sequential scans of the table besides the index build"
    );
    ctx.cleanup().await;
}

/// A table dropped under a running store is created again by the next operations.
#[tokio::test]
async fn postgres_dropped_table_is_created_again() {
    let ctx = postgres_ctx("dropped").await;
    let a = owner("inst-a", 1);
    let keys = ctx.keys(&["k"]);
    assert_eq!(
        ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap(),
        [ClaimOutcome::Claimed]
    );
    cleanup_postgres(&ctx.prefix).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ctx.store.claim(&keys, &[], &a, LEASE, None).await {
            Ok(outcomes) => {
                assert_eq!(outcomes, [ClaimOutcome::Claimed]);
                break;
            }
            Err(e) => {
                assert!(e.to_string().contains("does not exist"), "{e}");
                assert!(Instant::now() < deadline, "still failing: {e}");
            }
        }
    }
    ctx.cleanup().await;
}

/// A role that may not create tables is told, by every operation (and so by `check
/// --connect`, through ping), which table is missing and what an administrator can run; once
/// that SQL ran, the same store works.
#[tokio::test]
async fn postgres_without_create_privilege_says_what_to_run() {
    let admin = pg_admin().await;
    let role = format!("dedupd_test_{:08x}", rand::random::<u32>());
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN"))
        .await
        .expect("CREATE ROLE");
    let prefix = prefix("pg", "noprivilege");
    let cfg = StoreConfig {
        key_prefix: prefix.clone(),
        ..store_config(
            StoreKind::Postgres,
            &format!("postgres://{role}@127.0.0.1:5432/postgres"),
            Duration::from_secs(5),
        )
    };
    let store = Store::open(&cfg).await.expect("open");
    let table = dedupd::store::postgres_table_name(&prefix);
    let error = store
        .ping()
        .await
        .expect_err("no table, no privilege")
        .to_string();
    assert!(
        error.contains(&format!("table \"{table}\" does not exist")),
        "{error}"
    );
    assert!(error.contains("may not create it"), "{error}");
    let claim = store
        .claim(
            &[format!("{prefix}:r:k")],
            &[],
            &owner("inst-a", 1),
            LEASE,
            None,
        )
        .await;
    assert!(claim.is_err(), "{claim:?}");
    let sql = error
        .split_once("an administrator can run: ")
        .map(|(_, sql)| sql.to_owned())
        .expect("the SQL to run");
    assert!(
        sql.contains("CREATE TABLE") && sql.contains(&format!("TO \"{role}\"")),
        "{sql}"
    );
    admin
        .batch_execute(&sql)
        .await
        .expect("the printed SQL runs");

    store
        .ping()
        .await
        .expect("usable once the administrator ran it");
    assert_eq!(
        store
            .claim(
                &[format!("{prefix}:r:k")],
                &[],
                &owner("inst-a", 1),
                LEASE,
                None
            )
            .await
            .unwrap(),
        [ClaimOutcome::Claimed]
    );
    cleanup_postgres(&prefix).await;
    admin
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .expect("DROP ROLE");
}

/// Creates the table of `prefix` as dedupd 0.4 did (no `body` column) and writes `done` and
/// `in_flight` (store keys) into it as 0.4 wrote them.
async fn pg_create_0_4_table(prefix: &str, done: &[&str], in_flight: &[&str]) {
    let table = dedupd::store::postgres_table_name(prefix);
    let admin = pg_admin().await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE \"{table}\" (expires_at timestamptz NOT NULL, route int4 NOT NULL, \
             key uuid NOT NULL PRIMARY KEY, owner text) WITH (fillfactor = 60)"
        ))
        .await
        .expect("CREATE TABLE as 0.4");
    let rows = done
        .iter()
        .map(|key| (key, None))
        .chain(in_flight.iter().map(|key| (key, Some("old-inst:1"))));
    for (key, owner) in rows {
        let uuid: String = dedupd::store::layout::digest16(key)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        admin
            .execute(
                &format!(
                    "INSERT INTO \"{table}\" (expires_at, route, key, owner) \
                     VALUES (clock_timestamp() + interval '1 minute', 0, $1::text::uuid, $2)"
                ),
                &[&uuid, &owner],
            )
            .await
            .expect("INSERT as 0.4");
    }
}

/// Whether the table of `prefix` has the `body` column.
async fn pg_has_body_column(prefix: &str) -> bool {
    let table = dedupd::store::postgres_table_name(prefix);
    pg_admin()
        .await
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass($1::text) \
             AND attname = 'body' AND NOT attisdropped)",
            &[&format!("\"{table}\"")],
        )
        .await
        .expect("pg_attribute")
        .get(0)
}

/// A table dedupd 0.4 created has no `body` column: reads use it as it is, the first claim
/// adds the column, and the keys 0.4 wrote keep their state (done ones read as duplicates
/// whatever the copy's body, having no digest to compare). A table dropped and created again
/// by a 0.4 instance still running is upgraded again.
#[tokio::test]
async fn postgres_upgrades_a_table_of_0_4() {
    let ctx = postgres_ctx("upgrade04").await;
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let [old, busy, new] = [ctx.key("old"), ctx.key("busy"), ctx.key("new")];
    pg_create_0_4_table(&ctx.prefix, &[&old], &[&busy]).await;

    assert!(matches!(
        ctx.store.inspect(&old).await.unwrap(),
        KeyState::Done { .. }
    ));
    assert!(!pg_has_body_column(&ctx.prefix).await, "a read altered it");

    let keys = [old.clone(), busy.clone(), new.clone()];
    let bodies = [body("o"), body("b"), body("n")];
    let outcomes = ctx
        .store
        .claim(&keys, &bodies, &a, LEASE, Some(WINDOW * 10))
        .await
        .unwrap();
    assert_eq!(outcomes[0], ClaimOutcome::Done);
    assert!(
        matches!(outcomes[1], ClaimOutcome::InFlightElsewhere { .. }),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[2], ClaimOutcome::Claimed);
    assert!(pg_has_body_column(&ctx.prefix).await);
    // The old done key slid like any other; it remembers no body, so nothing conflicts.
    assert!(window_left(&ctx, &old).await > WINDOW * 5);
    assert_eq!(
        ctx.store
            .claim(&keys[..1], &[body("other")], &b, LEASE, None)
            .await
            .unwrap(),
        [ClaimOutcome::Done]
    );
    assert_eq!(
        ctx.store
            .commit(&keys[2..], &bodies[2..], &a, WINDOW)
            .await
            .unwrap(),
        [CommitOutcome::Committed]
    );
    assert_eq!(
        ctx.store
            .claim(&keys[2..], &[body("other")], &b, LEASE, None)
            .await
            .unwrap(),
        [ClaimOutcome::Conflict]
    );

    // Dropped and created again by 0.4: the first statement fails on the missing column, and
    // the next operations add it again.
    cleanup_postgres(&ctx.prefix).await;
    pg_create_0_4_table(&ctx.prefix, &[&old], &[]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ctx
            .store
            .claim(&keys[..1], &[body("o")], &b, LEASE, None)
            .await
        {
            Ok(outcomes) => {
                assert_eq!(outcomes, [ClaimOutcome::Done]);
                break;
            }
            Err(e) => {
                assert!(e.to_string().contains("body"), "{e}");
                assert!(Instant::now() < deadline, "still failing: {e}");
            }
        }
    }
    assert!(pg_has_body_column(&ctx.prefix).await);
    ctx.cleanup().await;
}

/// A role that may use a table of 0.4 but does not own it may not add the column: every
/// operation says what an administrator can run, and once that ran, the same store works.
#[tokio::test]
async fn postgres_upgrade_without_owning_the_table_says_what_to_run() {
    let admin = pg_admin().await;
    let role = format!("dedupd_test_{:08x}", rand::random::<u32>());
    let prefix = prefix("pg", "upgradegrant");
    let table = dedupd::store::postgres_table_name(&prefix);
    let old = format!("{prefix}:r:old");
    pg_create_0_4_table(&prefix, &[&old], &[]).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON \"{table}\" TO {role}"
        ))
        .await
        .expect("CREATE ROLE, GRANT");
    let cfg = StoreConfig {
        key_prefix: prefix.clone(),
        ..store_config(
            StoreKind::Postgres,
            &format!("postgres://{role}@127.0.0.1:5432/postgres"),
            Duration::from_secs(5),
        )
    };
    let store = Store::open(&cfg).await.expect("open");
    assert!(matches!(
        store.inspect(&old).await.unwrap(),
        KeyState::Done { .. }
    ));
    let error = store.ping().await.expect_err("not the owner").to_string();
    assert!(error.contains("may not add it"), "{error}");
    let keys = [old.clone(), format!("{prefix}:r:new")];
    let claim = store
        .claim(&keys, &[], &owner("inst-a", 1), LEASE, None)
        .await;
    assert!(claim.is_err(), "{claim:?}");
    let sql = error
        .split_once("an administrator can run: ")
        .map(|(_, sql)| sql.to_owned())
        .expect("the SQL to run");
    assert!(sql.starts_with("ALTER TABLE"), "{sql}");
    admin
        .batch_execute(&sql)
        .await
        .expect("the printed SQL runs");
    assert_eq!(
        store
            .claim(&keys, &[], &owner("inst-a", 1), LEASE, None)
            .await
            .unwrap(),
        [ClaimOutcome::Done, ClaimOutcome::Claimed]
    );
    cleanup_postgres(&prefix).await;
    admin
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .expect("DROP ROLE");
}

/// `sslmode=require`: the connection is encrypted (the server says so in `pg_stat_ssl`) and the
/// server's certificate verified, against `store.tls.ca_file` (here the self-signed certificate
/// Debian's PostgreSQL serves, for `localhost`); without it, the webpki roots refuse it.
#[tokio::test]
async fn postgres_tls_with_sslmode_require() {
    const CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";
    let admin = pg_admin().await;
    let ssl: String = admin.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    if ssl != "on" || !std::path::Path::new(CERT).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the local PostgreSQL has no TLS (ssl = {ssl}, {CERT})"
        );
        eprintln!("SKIPPED: the local PostgreSQL has no TLS (ssl = {ssl})");
        return;
    }
    let app = format!("dedupd-tls-test-{:08x}", rand::random::<u32>());
    let url = format!(
        "postgres://postgres@localhost:5432/postgres?sslmode=require&application_name={app}"
    );
    let mut cfg = store_config(StoreKind::Postgres, &url, Duration::from_secs(5));
    cfg.key_prefix = prefix("pg", "tls");
    cfg.tls = Some(dedupd::config::Tls {
        ca_file: Some(CERT.into()),
        cert_file: None,
        key_file: None,
    });
    let store = Store::open(&cfg).await.expect("open");
    store.ping().await.expect("TLS connection");
    let encrypted: bool = admin
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted, "the store's connection is not encrypted");
    cleanup_postgres(&cfg.key_prefix).await;

    cfg.tls = None;
    let store = Store::open(&cfg).await.expect("open");
    let error = store.ping().await.expect_err("an unknown CA").to_string();
    assert!(error.contains("certificate"), "{error}");
}

// ---- Embedded ---------------------------------------------------------------------------

async fn embedded_ctx(test: &str) -> Ctx {
    let prefix = prefix("emb", test);
    let dir = std::env::temp_dir().join(&prefix);
    let cfg = StoreConfig {
        key_prefix: prefix.clone(),
        path: Some(dir.clone()),
        ..store_config(StoreKind::Embedded, REDIS_URL, Duration::from_secs(5))
    };
    Ctx {
        store: Store::open(&cfg).await.expect("embedded store"),
        prefix,
        backend: Backend::Embedded(dir),
    }
}

/// Removes the store's directory.
fn cleanup_embedded(dir: &std::path::Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// The config of an embedded store in `dir` with key prefix `prefix`.
fn embedded_config(prefix: &str, dir: &std::path::Path) -> StoreConfig {
    StoreConfig {
        key_prefix: prefix.to_owned(),
        path: Some(dir.to_owned()),
        ..store_config(StoreKind::Embedded, REDIS_URL, Duration::from_secs(5))
    }
}

/// Closed and opened again: every done key is still done, with its window; claims in flight
/// are gone (their process is, see the module docs), so their keys can be claimed at once.
#[tokio::test]
async fn embedded_reopened_remembers_done_keys_and_drops_claims() {
    let ctx = embedded_ctx("reopen").await;
    let Backend::Embedded(dir) = &ctx.backend else {
        unreachable!()
    };
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let done: Vec<String> = (0..300).map(|i| ctx.key(&format!("done-{i}"))).collect();
    let flying = ctx.keys(&["flying-1", "flying-2"]);
    ctx.store.claim(&done, &[], &a, LEASE, None).await.unwrap();
    ctx.store.commit(&done, &[], &a, WINDOW).await.unwrap();
    ctx.store
        .claim(&flying, &[], &a, LEASE, None)
        .await
        .unwrap();
    drop(ctx.store);

    let store = Store::open(&embedded_config(&ctx.prefix, dir))
        .await
        .expect("reopen");
    let again = store.claim(&done, &[], &b, LEASE, None).await.unwrap();
    assert!(again.iter().all(|o| *o == ClaimOutcome::Done), "{again:?}");
    match store.inspect(&done[0]).await.unwrap() {
        KeyState::Done { window_left } => assert!(
            window_left > WINDOW - Duration::from_secs(10) && window_left <= WINDOW + WINDOW / 8,
            "{window_left:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.claim(&flying, &[], &b, LEASE, None).await.unwrap(),
        [ClaimOutcome::Claimed, ClaimOutcome::Claimed]
    );
    let size = store.size(&ctx.prefix, &["r".to_owned()]).await.unwrap();
    assert_eq!(size.keys, [302]);
    assert!(size.memory_bytes > 0);
    drop(store);
    cleanup_embedded(dir);
}

/// Opening a path this process already has open shares that store (a reload whose old routes
/// are still finishing) instead of failing on its own lock.
#[tokio::test]
async fn embedded_same_path_twice_in_one_process_shares_the_store() {
    let ctx = embedded_ctx("twice").await;
    let Backend::Embedded(dir) = &ctx.backend else {
        unreachable!()
    };
    let second = Store::open(&embedded_config(&ctx.prefix, dir))
        .await
        .expect("second open in the same process");
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let keys = ctx.keys(&["k", "d"]);
    ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap();
    ctx.store.commit(&keys[1..], &[], &a, WINDOW).await.unwrap();
    let outcomes = second.claim(&keys, &[], &b, LEASE, None).await.unwrap();
    assert!(
        matches!(
            outcomes[..],
            [ClaimOutcome::InFlightElsewhere { .. }, ClaimOutcome::Done]
        ),
        "{outcomes:?}"
    );
    assert_eq!(second.label(), format!("embedded {}", dir.display()));
    drop(second);
    ctx.cleanup().await;
}

/// A path that cannot be a directory is refused at open, naming it.
#[tokio::test]
async fn embedded_unusable_path_is_a_clear_error() {
    let file = std::env::temp_dir().join(prefix("emb", "file"));
    std::fs::write(&file, b"not a directory").unwrap();
    for path in [file.clone(), file.join("below-a-file")] {
        let cfg = embedded_config("dd", &path);
        match Store::open(&cfg).await {
            Err(StoreError::Embedded(message)) => {
                assert!(message.contains(&path.display().to_string()), "{message}");
            }
            Err(other) => panic!("{}: {other}", path.display()),
            Ok(_) => panic!("{} opened", path.display()),
        }
    }
    let _ = std::fs::remove_file(&file);
}

/// Expired keys read as absent at once, and the upkeep removes them from disk in the
/// background: the table's own count (which includes expired keys not yet swept) falls to
/// what is still remembered.
#[tokio::test]
async fn embedded_sweeper_removes_expired_keys() {
    let ctx = embedded_ctx("sweep").await;
    let a = owner("inst-a", 1);
    let short: Vec<String> = (0..500).map(|i| ctx.key(&format!("short-{i}"))).collect();
    let long: Vec<String> = (0..100).map(|i| ctx.key(&format!("long-{i}"))).collect();
    ctx.store.claim(&short, &[], &a, LEASE, None).await.unwrap();
    ctx.store
        .commit(&short, &[], &a, Duration::from_millis(200))
        .await
        .unwrap();
    ctx.store.claim(&long, &[], &a, LEASE, None).await.unwrap();
    ctx.store.commit(&long, &[], &a, WINDOW).await.unwrap();
    let routes = ["r".to_owned()];
    assert_eq!(
        ctx.store.size(&ctx.prefix, &routes).await.unwrap().keys,
        [600]
    );

    let tracker = tokio_util::task::TaskTracker::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    // A 1 s window: a pass every second (the shortest the sweeper allows).
    ctx.store.start_upkeep(
        &[("r".to_owned(), Duration::from_secs(1))],
        &tracker,
        &shutdown,
    );
    tracker.close();
    let deadline = Instant::now() + EXPIRY_DEADLINE;
    loop {
        let keys = ctx.store.size(&ctx.prefix, &routes).await.unwrap().keys;
        if keys == [100] {
            break;
        }
        assert!(Instant::now() < deadline, "still {keys:?} keys on disk");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = ctx.store.claim(&long, &[], &a, LEASE, None).await.unwrap();
    assert!(again.iter().all(|o| *o == ClaimOutcome::Done));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .expect("the sweeper stops at shutdown");
    ctx.cleanup().await;
}

/// Claims racing commits of the same keys (other threads, other owners) never find a key
/// absent: in flight until the commit's write is visible, done after. Claims racing each
/// other claim each key exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_racing_claims_and_commits() {
    let ctx = embedded_ctx("race").await;
    let (a, b) = (owner("inst-a", 1), owner("inst-b", 1));
    let keys: Vec<String> = (0..2000).map(|i| ctx.key(&format!("k{i}"))).collect();
    let claimed = ctx.store.claim(&keys, &[], &a, LEASE, None).await.unwrap();
    assert!(claimed.iter().all(|o| *o == ClaimOutcome::Claimed));

    let committer = {
        let (store, keys, a) = (ctx.store.clone(), keys.clone(), a.clone());
        tokio::spawn(async move {
            for batch in keys.chunks(200) {
                let outcomes = store.commit(batch, &[], &a, WINDOW).await.unwrap();
                assert!(outcomes.iter().all(|o| *o == CommitOutcome::Committed));
            }
        })
    };
    let mut rounds = 0;
    while !committer.is_finished() {
        for batch in keys.chunks(200) {
            for outcome in ctx.store.claim(batch, &[], &b, LEASE, None).await.unwrap() {
                assert!(
                    matches!(
                        outcome,
                        ClaimOutcome::Done | ClaimOutcome::InFlightElsewhere { .. }
                    ),
                    "round {rounds}: {outcome:?}"
                );
            }
        }
        rounds += 1;
    }
    committer.await.expect("committer");
    println!("{rounds} rounds of claims raced the commits");
    let after = ctx.store.claim(&keys, &[], &b, LEASE, None).await.unwrap();
    assert!(after.iter().all(|o| *o == ClaimOutcome::Done));

    let fresh: Vec<String> = (0..2000).map(|i| ctx.key(&format!("f{i}"))).collect();
    let racers: Vec<_> = (0..4)
        .map(|i| {
            let (store, keys) = (ctx.store.clone(), fresh.clone());
            tokio::spawn(async move {
                let by = owner(&format!("racer-{i}"), 1);
                let mut outcomes = Vec::new();
                for batch in keys.chunks(100) {
                    outcomes.extend(store.claim(batch, &[], &by, LEASE, None).await.unwrap());
                }
                outcomes
            })
        })
        .collect();
    let mut won = vec![0; fresh.len()];
    for racer in racers {
        for (k, outcome) in racer.await.expect("racer").iter().enumerate() {
            if *outcome == ClaimOutcome::Claimed {
                won[k] += 1;
            }
        }
    }
    assert!(won.iter().all(|&n| n == 1), "each key claimed exactly once");
    ctx.cleanup().await;
}
