//! The least-privilege broker permissions the README gives are enough, and nothing less is
//! needed: an upstream user that may only read the route's queue and a downstream user that may
//! only write to the default exchange forward every first-seen message and dead-letter the rest
//! as usual; `check --connect` passes with them too.

mod common;

use std::time::Duration;

use common::*;
use lapin::BasicProperties;

const SETTLE: Duration = Duration::from_secs(60);

/// A broker user with `configure`, `write`, `read` permissions on vhost `/`; deleted on drop.
struct User {
    name: String,
}

impl User {
    async fn add(name: String, perms: [&str; 3]) -> User {
        rabbitmqctl(&["add_user", &name, "pw"]).await;
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            "/",
            &name,
            perms[0],
            perms[1],
            perms[2],
        ])
        .await;
        User { name }
    }

    fn url(&self) -> String {
        format!("amqp://{}:pw@127.0.0.1:5672/%2f", self.name)
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .status();
    }
}

fn escape(name: &str) -> String {
    name.replace('.', "\\.").replace('-', "\\-")
}

#[tokio::test]
async fn least_privilege_users_are_enough() {
    let setup = Setup::new("perms");
    let mut broker = Broker::connect().await;
    let dlq = setup.declare(&mut broker).await;
    let upstream = User::add(
        format!("{}-in", setup.name),
        ["^$", "^$", &format!("^{}$", escape(&setup.queue))],
    )
    .await;
    let downstream = User::add(
        format!("{}-out", setup.name),
        ["^$", "^amq\\.default$", "^$"],
    )
    .await;
    let toml = setup.toml().replacen(
        &format!("url = \"{AMQP_URL}\""),
        &format!("url = \"{}\"", upstream.url()),
        1,
    );
    let toml = toml.replacen(
        "[store]",
        &format!("[downstream]\nurl = \"{}\"\n\n[store]", downstream.url()),
        1,
    );
    assert_ne!(toml, setup.toml());
    let path = std::env::temp_dir().join(format!("{}.toml", setup.name));
    std::fs::write(&path, &toml).expect("config");

    let (code, out, err) =
        run_binary(&["check", "--connect", "-c", path.to_str().unwrap()], &[]).await;
    assert_eq!(
        code, 0,
        "check --connect with least privilege:\n{out}\n{err}"
    );

    // 30 messages: 20 distinct ids and 10 repeats, plus 2 without a key (dead-lettered).
    let mut messages: Vec<(Vec<u8>, BasicProperties)> = (0..30)
        .map(|i| {
            let props = BasicProperties::default().with_message_id(format!("id-{}", i % 20).into());
            (format!("body-{i}").into_bytes(), props)
        })
        .collect();
    messages.extend((0..2).map(|i| {
        (
            format!("keyless-{i}").into_bytes(),
            BasicProperties::default(),
        )
    }));
    broker.publish_all(&setup.queue, &messages).await;
    let config = dedupd::config::Config::from_toml(&toml, &path).expect("config parses");
    let proxy = InProcess::start(config);
    setup.wait_settled(proxy.port, 32, SETTLE).await;
    let forwarded = setup
        .metric(proxy.port, "dedupd_messages_forwarded_total")
        .await;
    proxy.stop().await;

    assert_eq!(forwarded, 20.0);
    assert_eq!(
        broker.drain(&setup.out).await.len(),
        20,
        "first copies downstream"
    );
    assert_eq!(
        broker.ready(&dlq).await,
        2,
        "keyless messages dead-lettered"
    );
    assert_eq!(broker.ready(&setup.queue).await, 0, "nothing left upstream");
    let _ = std::fs::remove_file(&path);
    broker.cleanup().await;
    redis_cleanup(&setup.name).await;
}
