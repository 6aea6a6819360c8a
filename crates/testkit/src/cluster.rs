//! A Redis Cluster of the test's own: `redis-server --cluster-enabled yes`
//! processes on free ports (each needs its port + 10000 for the cluster
//! bus), joined by `redis-cli --cluster create`. Killed when dropped.
//!
//! [`RedisCluster::start_tls`] adds a TLS port to every node (mutual TLS,
//! certificates from a [`TestCa`]) and runs the cluster bus over TLS; the
//! plain port stays for the test's own checks.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[cfg(feature = "tls")]
use super::certs::TestCa;
use super::{free_port, wait_for};

/// One node: its process, port and directory.
pub struct ClusterNode {
    child: Option<Child>,
    pub port: u16,
    /// The TLS port, in a TLS cluster.
    pub tls_port: Option<u16>,
    dir: tempfile::TempDir,
}

pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
}

/// What a TLS cluster's nodes need: the CA they trust and their own
/// certificate.
struct NodeTls<'a> {
    ca: &'a Path,
    cert: &'a Path,
    key: &'a Path,
}

/// A port whose cluster-bus port (+10000) is free too.
fn free_node_port() -> u16 {
    use std::net::TcpListener;
    for _ in 0..200 {
        let port = 20000 + rand_port() % 25000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

fn rand_port() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (nanos ^ (std::process::id() << 7)) as u16
}

fn spawn_node(dir: &Path, port: u16, tls: Option<(u16, &NodeTls)>) -> Child {
    let mut cmd = Command::new(super::redis_server());
    if let Some((tls_port, files)) = tls {
        cmd.arg("--tls-port")
            .arg(tls_port.to_string())
            .arg("--tls-cert-file")
            .arg(files.cert)
            .arg("--tls-key-file")
            .arg(files.key)
            .arg("--tls-ca-cert-file")
            .arg(files.ca)
            .args(["--tls-auth-clients", "yes", "--tls-cluster", "yes"]);
    }
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1500"])
        .args(["--cluster-config-file", "nodes.conf"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot run redis-server: is it installed? (tests/run.sh installs it)")
}

impl RedisCluster {
    /// `masters` masters, each with `replicas` replicas, every slot
    /// assigned and every replica in sync.
    pub fn start(masters: usize, replicas: usize) -> Self {
        Self::start_with(masters, replicas, None)
    }

    /// `masters` masters without replicas that also take TLS clients (which
    /// must show a certificate `ca` signed) and talk TLS among themselves.
    #[cfg(feature = "tls")]
    pub fn start_tls(masters: usize, ca: &TestCa) -> Self {
        let cert = ca.node("cluster-node");
        let tls = NodeTls {
            ca: &ca.cert_file,
            cert: &cert.cert,
            key: &cert.key,
        };
        Self::start_with(masters, 0, Some(&tls))
    }

    fn start_with(masters: usize, replicas: usize, tls: Option<&NodeTls>) -> Self {
        let count = masters * (1 + replicas);
        let mut nodes: Vec<ClusterNode> = Vec::new();
        for _ in 0..count {
            let dir = tempfile::tempdir().expect("temp dir");
            let port = free_node_port();
            let tls_port = tls.map(|_| free_port());
            let child = spawn_node(dir.path(), port, tls_port.zip(tls));
            nodes.push(ClusterNode {
                child: Some(child),
                port,
                tls_port,
                dir,
            });
        }
        let cluster = RedisCluster { nodes };
        for node in &cluster.nodes {
            wait_for(
                &format!("node {} to answer PING", node.port),
                Duration::from_secs(10),
                || node.query::<String>(&["PING"]).ok(),
                || cluster.logs(),
            );
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("cannot run redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_healthy(count, Duration::from_secs(30));
        cluster
    }

    /// Waits until every live node says the cluster is ok and sees `known`
    /// nodes, and every replica's link to its master is up.
    pub fn wait_healthy(&self, known: usize, timeout: Duration) {
        wait_for(
            "the cluster to be healthy",
            timeout,
            || {
                self.live()
                    .all(|node| {
                        let info: String = node.query(&["CLUSTER", "INFO"]).unwrap_or_default();
                        let repl: String = node.query(&["INFO", "replication"]).unwrap_or_default();
                        info.contains("cluster_state:ok")
                            && info.contains(&format!("cluster_known_nodes:{known}"))
                            && (repl.contains("role:master")
                                || repl.contains("master_link_status:up"))
                    })
                    .then_some(())
            },
            || self.logs(),
        );
    }

    fn live(&self) -> impl Iterator<Item = &ClusterNode> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    /// The seed list for REDIS_URL: every node, comma-separated.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The seed list of a TLS cluster: every node's TLS port.
    pub fn tls_seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("rediss://127.0.0.1:{}", n.tls_port.expect("a TLS cluster")))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A cluster connection for the test's own checks.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        let seeds: Vec<String> = self
            .live()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect();
        redis::cluster::ClusterClient::new(seeds)
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("cannot connect to the test cluster: {e}\n{}", self.logs()))
    }

    /// The port of the live master serving `key`'s slot.
    pub fn master_of(&self, key: &str) -> u16 {
        self.serving(key)
            .unwrap_or_else(|| panic!("no live master serves the slot of {key}\n{}", self.logs()))
    }

    /// The port of the live master serving `key`'s slot, if one does (none
    /// between a master's failure and its replica's promotion).
    pub fn serving(&self, key: &str) -> Option<u16> {
        let slot: u16 = self
            .live()
            .next()
            .expect("a live node")
            .query(&["CLUSTER", "KEYSLOT", key])
            .expect("CLUSTER KEYSLOT");
        for node in self.live() {
            let nodes: String = node.query(&["CLUSTER", "NODES"]).unwrap_or_default();
            for line in nodes.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                    continue;
                }
                let serves = fields[8..].iter().any(|range| {
                    let mut ends = range.split('-');
                    let lo: u16 = ends.next().and_then(|v| v.parse().ok()).unwrap_or(u16::MAX);
                    let hi: u16 = ends.next().and_then(|v| v.parse().ok()).unwrap_or(lo);
                    (lo..=hi).contains(&slot)
                });
                if serves {
                    let port = fields[1].split(['@', ':']).nth(1).unwrap_or_default();
                    return Some(port.parse().expect("node port"));
                }
            }
        }
        None
    }

    /// A function that names the port of the live master serving `key`'s
    /// slot, asking the nodes by their ports (for a thread of its own, such
    /// as a sharded [`super::Witness`]).
    pub fn locator(&self, key: &str) -> impl Fn() -> Option<u16> + Send + 'static {
        let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        let key = key.to_string();
        move || {
            ports.iter().find_map(|port| {
                let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                    .ok()?
                    .get_connection_with_timeout(Duration::from_millis(300))
                    .ok()?;
                let slot: i64 = redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(&key)
                    .query(&mut conn)
                    .ok()?;
                let slots: Vec<redis::Value> =
                    redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn).ok()?;
                slots.iter().find_map(|range| {
                    let redis::Value::Array(parts) = range else {
                        return None;
                    };
                    let int = |v: Option<&redis::Value>| match v {
                        Some(redis::Value::Int(n)) => Some(*n),
                        _ => None,
                    };
                    let (lo, hi) = (int(parts.first())?, int(parts.get(1))?);
                    let redis::Value::Array(master) = parts.get(2)? else {
                        return None;
                    };
                    (lo..=hi)
                        .contains(&slot)
                        .then(|| int(master.get(1)))?
                        .map(|p| p as u16)
                })
            })
        }
    }

    /// SIGKILLs the node on `port`, as a crash would.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node on that port");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the node on `port` again after [`Self::kill`], on its port and
    /// with its `nodes.conf` (its data is gone: no persistence): once it
    /// hears that a replica took its slots over, it becomes that one's
    /// replica and copies it, as a crashed master does.
    pub fn restart(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node on that port");
        assert!(node.child.is_none(), "node {port} still runs");
        node.child = Some(spawn_node(node.dir.path(), port, None));
        let node = self.node(port);
        wait_for(
            &format!("node {port} to come back as a replica in sync"),
            Duration::from_secs(30),
            || {
                let repl: String = node.query(&["INFO", "replication"]).ok()?;
                (repl.contains("role:slave") && repl.contains("master_link_status:up"))
                    .then_some(())
            },
            || self.logs(),
        );
    }

    /// Every node's log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let log =
                    std::fs::read_to_string(n.dir.path().join("redis.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "--- node {} ---\n{}",
                    n.port,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl ClusterNode {
    /// One command on this node alone.
    pub fn query<T: redis::FromRedisValue>(&self, words: &[&str]) -> redis::RedisResult<T> {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?
            .get_connection_with_timeout(Duration::from_secs(2))?;
        let mut cmd = redis::cmd(words[0]);
        for w in &words[1..] {
            cmd.arg(*w);
        }
        cmd.query(&mut conn)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl RedisCluster {
    /// The node id of the node on `port`.
    pub fn id_of(&self, port: u16) -> String {
        self.node(port)
            .query(&["CLUSTER", "MYID"])
            .expect("CLUSTER MYID")
    }

    pub fn node(&self, port: u16) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .expect("a node on that port")
    }

    /// Moves `slot` with its keys from the master on `from` to the one on
    /// `to`, the way `redis-cli --cluster reshard` does: IMPORTING and
    /// MIGRATING, MIGRATE of every key, then the slot's new owner told to
    /// every node.
    pub fn move_slot(&self, slot: u16, from: u16, to: u16) {
        let (from_id, to_id) = (self.id_of(from), self.id_of(to));
        let slot = slot.to_string();
        let run = |port: u16, words: &[&str]| {
            let _: redis::Value = self
                .node(port)
                .query(words)
                .unwrap_or_else(|e| panic!("{words:?} on {port}: {e}\n{}", self.logs()));
        };
        run(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
        run(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
        let to_port = to.to_string();
        loop {
            let keys: Vec<String> = self
                .node(from)
                .query(&["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
                .expect("CLUSTER GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let mut words = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            words.extend(keys.iter().map(String::as_str));
            run(from, &words);
        }
        run(to, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        run(from, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        for node in self.live() {
            if node.port != from && node.port != to {
                let _: redis::RedisResult<String> =
                    node.query(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
            }
        }
    }

    /// Redis commands the masters ran since [`RedisCluster::reset_stats`],
    /// by name (INFO commandstats, summed over the masters).
    pub fn commands(&self) -> std::collections::HashMap<String, u64> {
        let mut calls = std::collections::HashMap::new();
        for node in self.live() {
            let Ok(info) = node.query::<String>(&["INFO", "commandstats"]) else {
                continue;
            };
            let role: String =
                node.query(&["ROLE"])
                    .map_or(String::new(), |r: Vec<redis::Value>| match r.first() {
                        Some(redis::Value::BulkString(b)) => {
                            String::from_utf8_lossy(b).into_owned()
                        }
                        _ => String::new(),
                    });
            if role != "master" {
                continue;
            }
            for line in info.lines() {
                let Some((name, rest)) = line
                    .strip_prefix("cmdstat_")
                    .and_then(|l| l.split_once(':'))
                else {
                    continue;
                };
                let n: u64 = rest
                    .split(',')
                    .find_map(|f| f.strip_prefix("calls="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                *calls.entry(name.to_string()).or_default() += n;
            }
        }
        calls
    }

    /// CONFIG RESETSTAT on every node.
    pub fn reset_stats(&self) {
        for node in self.live() {
            let _: redis::RedisResult<String> = node.query(&["CONFIG", "RESETSTAT"]);
        }
    }

    /// The slot of `key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        self.live()
            .next()
            .expect("a live node")
            .query(&["CLUSTER", "KEYSLOT", key])
            .expect("CLUSTER KEYSLOT")
    }
}
