//! A private `redis-server` for one test, on a port picked bind-and-release style: tests that
//! count keys or measure memory need a database nobody else writes to (the shared server's db 0
//! holds every other test's keys). Killed when dropped, so also when the test panics.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` child process on 127.0.0.1.
pub struct OwnRedis {
    child: Child,
    pub port: u16,
}

impl OwnRedis {
    /// Starts one, and waits (with a deadline) until it answers PING. A port taken between
    /// the release and the server's bind makes the server exit: another port is tried.
    pub async fn start() -> OwnRedis {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port");
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--dir", &std::env::temp_dir().display().to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server on PATH (scripts/services.sh installs it)");
            let mut redis = OwnRedis { child, port };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::time::Instant::now() < deadline {
                if let Ok(Some(_)) = redis.child.try_wait() {
                    break; // exited: most likely the port was taken meanwhile
                }
                if redis.ping().await {
                    return redis;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("could not start a private redis-server");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("private redis-server answers")
    }

    async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }

    /// `used_memory` from `INFO memory`.
    pub async fn used_memory(&self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.conn().await)
            .await
            .expect("INFO memory");
        info.lines()
            .find_map(|l| l.trim_end().strip_prefix("used_memory:"))
            .and_then(|n| n.parse().ok())
            .expect("used_memory in INFO memory")
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
