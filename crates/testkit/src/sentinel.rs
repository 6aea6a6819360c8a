//! A primary, a replica and three sentinels watching them, each on a free
//! loopback port, for the failover tests.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{RedisServer, TempDir, free_port, tempdir, wait_for};

/// The name the sentinels know the primary by.
pub const MASTER: &str = "optimus-primary";

/// A primary with a replica under three sentinels (quorum 2).
pub struct SentinelSetup {
    /// The first primary and its replica; after a failover their roles swap.
    pub servers: [RedisServer; 2],
    sentinels: Vec<(u16, Child)>,
    _dir: TempDir,
}

impl SentinelSetup {
    /// Starts them and waits until every sentinel knows the replica and the
    /// other sentinels (a failover needs both).
    pub fn start() -> Self {
        let primary = RedisServer::start();
        let replica = RedisServer::start_replica_of(&primary);
        let dir = tempdir().expect("temp dir");
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 10000\n\
                     sentinel parallel-syncs {MASTER} 1\n",
                    dir = dir.path().display(),
                    primary = primary.port,
                ),
            )
            .expect("sentinel config");
            let child = Command::new(super::redis_server())
                .arg(&conf)
                .arg("--sentinel")
                .arg("--logfile")
                .arg(dir.path().join(format!("sentinel-{i}.log")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot run redis-server --sentinel");
            sentinels.push((port, child));
        }
        let setup = Self {
            servers: [primary, replica],
            sentinels,
            _dir: dir,
        };
        for &(port, _) in &setup.sentinels {
            wait_for(
                "every sentinel to know the replica and the other sentinels",
                Duration::from_secs(30),
                || {
                    let mut conn = sentinel_conn(port)?;
                    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("REPLICAS")
                        .arg(MASTER)
                        .query(&mut conn)
                        .ok()?;
                    let others: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("SENTINELS")
                        .arg(MASTER)
                        .query(&mut conn)
                        .ok()?;
                    (replicas.len() == 1 && others.len() == 2).then_some(())
                },
                String::new,
            );
        }
        setup
    }

    /// `REDIS_SENTINELS`: every sentinel's `host:port`.
    pub fn sentinels(&self) -> String {
        let addrs: Vec<String> = self
            .sentinels
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        addrs.join(",")
    }

    /// The port of the primary as the sentinels name it now.
    pub fn primary_port(&self) -> u16 {
        let (port, _) = &self.sentinels[0];
        primary_named_by(*port).expect("a sentinel names the primary")
    }

    /// What names the primary's port as the sentinels see it, for a
    /// [`crate::Witness::following`] (None while no sentinel answers).
    pub fn primary_locator(&self) -> impl Fn() -> Option<u16> + Send + 'static {
        let sentinels: Vec<u16> = self.sentinels.iter().map(|(port, _)| *port).collect();
        move || sentinels.iter().find_map(|port| primary_named_by(*port))
    }

    /// The server that is the primary now.
    pub fn primary(&self) -> &RedisServer {
        let port = self.primary_port();
        self.servers
            .iter()
            .find(|s| s.port == port)
            .expect("the primary is one of ours")
    }

    /// `SENTINEL FAILOVER`, then waits (at most 30 s) until the other server
    /// is the primary and says so itself.
    pub fn failover(&self) {
        let before = self.primary_port();
        let mut conn = sentinel_conn(self.sentinels[0].0).expect("a sentinel answers");
        let deadline = Instant::now() + Duration::from_secs(30);
        // Refused while a failover is still settling: asked again.
        while redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(MASTER)
            .query::<()>(&mut conn)
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "SENTINEL FAILOVER was refused for 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        self.wait_primary_other_than(before);
    }

    /// Waits (at most 60 s) until a server other than the one on `port` is
    /// the primary, by the sentinels and by its own role.
    pub fn wait_primary_other_than(&self, port: u16) {
        wait_for(
            "the sentinels to promote the replica",
            Duration::from_secs(60),
            || {
                let now = self.primary_port();
                if now == port {
                    return None;
                }
                let server = self.servers.iter().find(|s| s.port == now)?;
                let role: Vec<redis::Value> = server.command(&["ROLE"]);
                let master =
                    matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master");
                master.then_some(())
            },
            String::new,
        );
    }
}

impl Drop for SentinelSetup {
    fn drop(&mut self) {
        for (_, child) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The primary's port as the sentinel on `sentinel` names it (None when
/// it does not answer).
fn primary_named_by(sentinel: u16) -> Option<u16> {
    let mut conn = sentinel_conn(sentinel)?;
    let (_, port): (String, u16) = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(MASTER)
        .query(&mut conn)
        .ok()?;
    Some(port)
}

fn sentinel_conn(port: u16) -> Option<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .ok()?
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()
}
