//! The real-server test harness: every test starts its own `redis-server` on a
//! free port with a temp dir, and its own `optimus` processes; all are killed
//! when the test's handles drop. Nothing here touches the machine's own Redis.
//!
//! A failing wait or command panics with what it was waiting for, the
//! process's command line, its stdout and stderr, and the server log.

#[cfg(feature = "tls")]
pub mod certs;
pub mod cluster;
pub mod proxy;
pub mod sentinel;

pub use tempfile::{TempDir, tempdir};

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Polls `check` until it returns `Some`, at most `timeout`; panics naming
/// `what` (and anything `context` adds) when the time runs out.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
    context: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A `redis-server` of this test's own.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    dir: TempDir,
    extra_args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// As [`start`](Self::start), for a program rather than a test (the
    /// benchmark): an error instead of a panic when redis-server cannot be
    /// run or does not start.
    pub fn try_start() -> Result<Self, String> {
        let runs = Command::new(redis_server())
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !runs {
            return Err("cannot run redis-server (install Debian's redis-server package)".into());
        }
        std::panic::catch_unwind(Self::start).map_err(|_| "redis-server did not start".into())
    }

    /// Starts a replica of `primary` and waits (at most 20 s) until it
    /// follows it.
    pub fn start_replica_of(primary: &RedisServer) -> Self {
        let replica = Self::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
        wait_for(
            "the replica to sync",
            Duration::from_secs(20),
            || {
                let info: String = replica.command(&["INFO", "replication"]);
                info.contains("master_link_status:up").then_some(())
            },
            || replica.log(),
        );
        replica
    }

    /// Starts a server with extra arguments (e.g. `--requirepass x`), retrying
    /// on another port if the chosen one was taken meanwhile.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempdir().expect("temp dir");
        let extra_args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn_server(dir.path(), port, &extra_args);
            if wait_ready(&mut child, &admin_url(port, &extra_args)) {
                return RedisServer {
                    child,
                    port,
                    dir,
                    extra_args,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "redis-server did not start:\n{}",
            std::fs::read_to_string(dir.path().join("redis.log")).unwrap_or_default()
        );
    }

    /// Starts a server on a given port (a test that needs the port before the
    /// server exists).
    pub fn start_on(port: u16) -> Self {
        let dir = tempdir().expect("temp dir");
        let mut child = spawn_server(dir.path(), port, &[]);
        assert!(
            wait_ready(&mut child, &admin_url(port, &[])),
            "redis-server did not start on port {port}:\n{}",
            std::fs::read_to_string(dir.path().join("redis.log")).unwrap_or_default()
        );
        RedisServer {
            child,
            port,
            dir,
            extra_args: Vec::new(),
        }
    }

    /// Stops the server and starts it again on the same port and directory:
    /// `graceful` sends SIGTERM (it saves what its persistence settings say),
    /// otherwise SIGKILL, as a crash would.
    pub fn restart(&mut self, graceful: bool) {
        if graceful {
            self.signal("TERM");
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        self.start_again();
    }

    /// Kills the server (as a crash would); [`RedisServer::start_again`]
    /// brings it back on the same port.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on its port and directory, after
    /// [`RedisServer::stop`].
    pub fn start_again(&mut self) {
        let args = self.extra_args.clone();
        self.start_again_with(&args);
    }

    /// Spawns the server on its port and directory with `args`, and waits
    /// until it answers.
    fn start_again_with(&mut self, args: &[String]) {
        self.child = spawn_server(self.dir.path(), self.port, args);
        let url = self.admin_url();
        assert!(
            wait_ready(&mut self.child, &url),
            "redis-server did not come back on port {}\n{}",
            self.port,
            self.log()
        );
    }

    /// Starts the server again on its port and directory as a replica of
    /// the server on `primary`'s port that the sentinels never promote
    /// (`replica-priority 0`): how a server without persistence must come
    /// back after a failover. Come back a primary, empty, it could be taken
    /// for the primary again and the other server would copy its empty
    /// data (Redis's documentation warns against it); a replica still
    /// copying its primary, promoted by a second failover, would do the
    /// same.
    pub fn start_again_as_replica_of(&mut self, primary: u16) {
        let mut args = self.extra_args.clone();
        args.extend([
            "--replicaof".to_string(),
            "127.0.0.1".to_string(),
            primary.to_string(),
            "--replica-priority".to_string(),
            "0".to_string(),
        ]);
        self.start_again_with(&args);
    }

    /// Sends the server process a signal (`STOP` hangs it, `CONT` resumes it).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} redis-server failed");
    }

    /// The URL the bridge should use.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A URL with the admin password when the server requires one.
    fn admin_url(&self) -> String {
        admin_url(self.port, &self.extra_args)
    }

    /// A plain synchronous connection for the test's own checks.
    /// Runs one command given as words (`["XADD", "s", "*", "n", "1"]`).
    pub fn command<T: redis::FromRedisValue>(&self, words: &[&str]) -> T {
        let mut cmd = redis::cmd(words[0]);
        for w in &words[1..] {
            cmd.arg(*w);
        }
        cmd.query(&mut self.conn())
            .unwrap_or_else(|e| panic!("{words:?}: {e}"))
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.admin_url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log"))
            .unwrap_or_else(|e| format!("(no server log: {e})"))
    }

    /// Every entry of a stream, as field maps.
    pub fn stream_entries(&self, stream: &str) -> Vec<BTreeMap<String, Vec<u8>>> {
        stream_entries(&mut self.conn(), stream)
    }

    pub fn xlen(&self, stream: &str) -> usize {
        redis::cmd("XLEN")
            .arg(stream)
            .query(&mut self.conn())
            .expect("XLEN")
    }

    /// Names of the keys matching `pattern` (SCAN, so it is safe on any size).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut conn = self.conn();
        let iter: redis::Iter<String> = redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .clone()
            .iter(&mut conn)
            .expect("SCAN");
        iter.map(|k| k.expect("key")).collect()
    }
}

fn admin_url(port: u16, extra: &[String]) -> String {
    match extra.iter().position(|a| a == "--requirepass") {
        Some(i) => format!("redis://:{}@127.0.0.1:{port}", extra[i + 1]),
        None => format!("redis://127.0.0.1:{port}"),
    }
}

/// Waits until the server answers PING, or has exited (port taken, bad
/// arguments), at most 10 s.
fn wait_ready(child: &mut Child, url: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        let answered = redis::Client::open(url)
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn));
        if answered.is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server binary every harness starts: REDIS_SERVER when set (another
/// version, or Valkey: `tests/servers.sh` sets it), else `redis-server`.
pub fn redis_server() -> std::ffi::OsString {
    std::env::var_os("REDIS_SERVER")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "redis-server".into())
}

fn spawn_server(dir: &Path, port: u16, extra: &[String]) -> Child {
    Command::new(redis_server())
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot run redis-server: is it installed? (tests/run.sh installs it)")
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// The `optimus` binary under test, with a clean environment: only what the
/// test gives, so the machine's own REDIS_URL and friends cannot leak in.
pub fn optimus(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(optimus_binary());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(args)
        .envs(env.iter().copied());
    if let Ok(filter) = std::env::var("TEST_LOG") {
        cmd.env("RUST_LOG", filter);
    }
    cmd
}

/// Runs `optimus` to completion (at most `timeout`) and returns its output.
pub fn run_optimus(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let mut process = OptimusProcess::spawn(args, env);
    let status = process.wait_exit(timeout);
    Output {
        status,
        stdout: process.stdout().into_bytes(),
        stderr: process.stderr().into_bytes(),
    }
}

/// Runs `optimus publish` against `server` with no pauses and these extra
/// flags; checks it succeeded and returns its `publish done` summary.
pub fn publish(server: &RedisServer, args: &[&str]) -> Fields {
    publish_with(&[("REDIS_URL", server.url().as_str())], args)
}

/// Runs `optimus publish` with these settings (where Redis is, how to log
/// in) and flags, as [`publish`] does.
pub fn publish_with(env: &[(&str, &str)], args: &[&str]) -> Fields {
    let mut all = vec!["publish", "--pause-min", "0", "--pause-max", "0"];
    all.extend_from_slice(args);
    let out = run_optimus(&all, env, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "publish failed: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("publish done"))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    Fields::parse(line)
}

/// A running `optimus`, its stdout and stderr collected as they come.
pub struct OptimusProcess {
    child: Child,
    description: String,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    exited: Option<ExitStatus>,
}

impl OptimusProcess {
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = optimus(args, env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start optimus");
        let env_text: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        Self {
            description: format!("{} optimus {}", env_text.join(" "), args.join(" ")),
            stdout: collect(child.stdout.take().unwrap()),
            stderr: collect(child.stderr.take().unwrap()),
            child,
            exited: None,
        }
    }

    /// `optimus consume` against `server` with these settings.
    pub fn consume(server: &RedisServer, env: &[(&str, &str)]) -> Self {
        let url = server.url();
        let mut all = vec![("REDIS_URL", url.as_str()), ("MONITORING_INTERVAL", "0.2")];
        all.extend_from_slice(env);
        Self::spawn(&["consume"], &all)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The command, exit status, and the end of stdout and stderr, for
    /// failure messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {:?}\n--- stdout (last 20 lines) ---\n{}\n--- stderr (last 60 lines) ---\n{}",
            self.description,
            self.exited,
            tail(&self.stdout(), 20),
            tail(&self.stderr(), 60)
        )
    }

    /// Its error lines: those of stderr that start with `optimus: `.
    pub fn error_lines(&self) -> Vec<String> {
        self.stderr()
            .lines()
            .filter(|l| l.starts_with("optimus: "))
            .map(String::from)
            .collect()
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{signal} failed\n{}", self.describe());
    }

    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Waits for the process to exit, and for its output to be read to the end.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = wait_for("optimus to exit", timeout, || self.try_exit(), String::new);
        // Output readers finish right after the pipes close.
        std::thread::sleep(Duration::from_millis(50));
        status
    }

    /// The last stdout line starting with `prefix` that satisfies `check`,
    /// waiting up to `timeout` for one to appear.
    pub fn wait_for_line(
        &mut self,
        prefix: &str,
        timeout: Duration,
        check: impl Fn(&Fields) -> bool,
    ) -> Fields {
        let stdout = self.stdout.clone();
        let found = wait_for_inner(timeout, || {
            let text = stdout.lock().unwrap().clone();
            text.lines()
                .rev()
                .filter(|l| l.starts_with(prefix))
                .map(Fields::parse)
                .find(|f| check(f))
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {timeout:?} waiting for a matching '{prefix}' line\n{}",
                self.describe()
            )
        })
    }
}

impl OptimusProcess {
    /// The latest stdout line starting with `prefix`, if any.
    pub fn latest_line(&self, prefix: &str) -> Option<Fields> {
        let text = self.stdout.lock().unwrap().clone();
        text.lines()
            .rev()
            .find(|l| l.starts_with(prefix))
            .map(Fields::parse)
    }

    /// Waits until the *latest* line starting with `prefix` satisfies `check`
    /// (an older line that did is not enough: it may be stale).
    pub fn wait_for_latest(
        &self,
        prefix: &str,
        timeout: Duration,
        check: impl Fn(&Fields) -> bool,
    ) -> Fields {
        wait_for_inner(timeout, || self.latest_line(prefix).filter(|f| check(f))).unwrap_or_else(|| {
            panic!(
                "timed out after {timeout:?} waiting for the latest '{prefix}' line to match\n{}",
                self.describe()
            )
        })
    }

    /// Waits until its monitoring line counts `n` live workers (all processes).
    pub fn wait_consumers(&self, n: u64) {
        self.wait_for_latest("monitor ", Duration::from_secs(30), |f| {
            f.values.get("consumers") == Some(&n.to_string())
        });
    }

    /// Waits until every message this process received is accounted for in
    /// a monitoring line printed *after* this call: written, skipped,
    /// dead-lettered, expired or dropped on overflow, with nothing pending.
    /// Nothing it holds can still reach the stream after that.
    pub fn wait_settled(&self, timeout: Duration) -> Fields {
        let count = |text: &str| text.lines().filter(|l| l.starts_with("monitor ")).count();
        let seen = count(&self.stdout.lock().unwrap());
        wait_for_inner(timeout, || {
            let text = self.stdout.lock().unwrap().clone();
            if count(&text) <= seen {
                return None;
            }
            let f = self.latest_line("monitor ")?;
            let accounted = f.num("written")
                + f.num("duplicates_skipped")
                + f.num("dead")
                + f.num("expired")
                + f.num("overflow");
            (f.num("pending") == 0 && f.num("received") == accounted).then_some(f)
        })
        .unwrap_or_else(|| {
            panic!(
                "timed out after {timeout:?} waiting for a settled monitoring line\n{}",
                self.describe()
            )
        })
    }
}

fn wait_for_inner<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for OptimusProcess {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.describe());
        }
    }
}

fn collect(pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut t = sink.lock().unwrap();
            t.push_str(&line);
            t.push('\n');
        }
    });
    text
}

/// The `key=value` fields of a monitoring or summary line.
#[derive(Debug, Clone)]
pub struct Fields {
    pub line: String,
    pub values: BTreeMap<String, String>,
}

impl Fields {
    pub fn parse(line: &str) -> Self {
        let values = line
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self {
            line: line.to_string(),
            values,
        }
    }

    /// A numeric field (a trailing `/s` or `s` is ignored).
    pub fn num(&self, key: &str) -> u64 {
        let raw = self
            .values
            .get(key)
            .unwrap_or_else(|| panic!("no field {key} in {:?}", self.line));
        raw.trim_end_matches("/s")
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("field {key} is not a number in {:?}", self.line))
            as u64
    }
}

/// What a stream holds against the sequence numbers that were published.
#[derive(Debug, Default)]
pub struct Tally {
    pub entries: usize,
    pub expected: usize,
    /// Expected sequence numbers with no entry.
    pub missing: Vec<u64>,
    /// Sequence numbers (or message ids) with more than one entry.
    pub duplicated: Vec<String>,
    /// Entries outside the expected sequence numbers.
    pub unexpected: usize,
}

impl Tally {
    /// Counts the entries (test messages: JSON with `message_id` and `seq`).
    pub fn of(
        entries: &[BTreeMap<String, Vec<u8>>],
        expected_seqs: impl IntoIterator<Item = u64>,
    ) -> Self {
        let expected: HashSet<u64> = expected_seqs.into_iter().collect();
        let mut tally = Tally {
            entries: entries.len(),
            expected: expected.len(),
            ..Tally::default()
        };
        let mut ids = HashSet::new();
        let mut seqs = HashSet::new();
        for entry in entries {
            let id = String::from_utf8_lossy(&entry["message_id"]).to_string();
            let payload: serde_json::Value =
                serde_json::from_slice(&entry["payload"]).expect("payload is the published JSON");
            assert_eq!(
                payload["message_id"].as_str(),
                Some(id.as_str()),
                "entry id is the payload's id"
            );
            let seq = payload["seq"].as_u64().expect("seq");
            if !ids.insert(id.clone()) || !seqs.insert(seq) {
                tally.duplicated.push(format!("seq {seq} ({id})"));
            }
            if !expected.contains(&seq) {
                tally.unexpected += 1;
            }
        }
        tally.missing = expected
            .iter()
            .copied()
            .filter(|s| !seqs.contains(s))
            .collect();
        tally.missing.sort_unstable();
        tally
    }

    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.duplicated.is_empty() && self.unexpected == 0
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stream has {} entries for {} expected messages; missing {} (first: {:?}); duplicated {} (first: {:?}); unexpected {}",
            self.entries,
            self.expected,
            self.missing.len(),
            self.missing.iter().take(10).collect::<Vec<_>>(),
            self.duplicated.len(),
            self.duplicated.iter().take(10).collect::<Vec<_>>(),
            self.unexpected
        )
    }
}

/// Checks that `entries` hold each of `expected_seqs` exactly once (by the
/// `seq` in their JSON payload), and that their message ids are distinct.
pub fn assert_exactly_once(
    entries: &[BTreeMap<String, Vec<u8>>],
    expected_seqs: impl IntoIterator<Item = u64>,
) {
    let tally = Tally::of(entries, expected_seqs);
    assert!(tally.is_exact(), "{tally}");
}

/// `GET /metrics` from an `optimus` process serving METRICS_ADDR=`addr`:
/// the body. Retries while nothing listens yet, for at most 5 s.
pub fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// `GET path` on `addr` (waiting up to 5 s for it to listen): the status
/// code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = wait_for(
        &format!("HTTP served on {addr}"),
        Duration::from_secs(5),
        || std::net::TcpStream::connect(addr).ok(),
        String::new,
    );
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A sample's value in a scraped `body` (the first of that name, with
/// labels or without).
pub fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = match rest.strip_prefix('{') {
            Some(labelled) => labelled.split_once("} ")?.1,
            None => rest.strip_prefix(' ')?,
        };
        value.trim().parse().ok()
    })
}

/// A metric's value, scraped now from `addr`.
pub fn metric(addr: &str, name: &str) -> Option<f64> {
    sample(&scrape(addr), name)
}

/// Path of a file of the optimus repository, for tests that read the README
/// or scripts.
pub fn crate_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// The `optimus` binary: `OPTIMUS_BIN` when set, else the one cargo built
/// beside the running program (a test binary sits in `target/<profile>/deps`,
/// the benchmark in `target/<profile>`).
pub fn optimus_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("OPTIMUS_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the running program's path");
    let mut dir = exe.parent().expect("the program's directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("optimus")
}

/// Every entry of a stream, as field maps, through any connection (a
/// server's or a cluster's).
pub fn stream_entries(
    conn: &mut impl redis::ConnectionLike,
    stream: &str,
) -> Vec<BTreeMap<String, Vec<u8>>> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query(conn)
        .expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|entry| {
            entry
                .map
                .into_iter()
                .map(|(k, v)| {
                    let bytes: Vec<u8> = redis::from_redis_value(v).expect("bytes");
                    (k, bytes)
                })
                .collect()
        })
        .collect()
}

/// The `seq` of each entry's payload (test messages), in stream order.
pub fn seqs(entries: &[BTreeMap<String, Vec<u8>>]) -> Vec<u64> {
    entries
        .iter()
        .filter_map(|e| {
            serde_json::from_slice::<serde_json::Value>(&e["payload"])
                .ok()?
                .get("seq")?
                .as_u64()
        })
        .collect()
}

/// How many entries stand out of the order Redis delivered their messages
/// in (`delivered`: seqs in delivery order, as a [`Witness`] saw them): an
/// entry whose message was delivered before that of an entry ahead of it.
/// Entries the witness did not see are left out.
pub fn out_of_order(entries: &[BTreeMap<String, Vec<u8>>], delivered: &[u64]) -> usize {
    let mut rank = std::collections::HashMap::with_capacity(delivered.len());
    for (i, seq) in delivered.iter().enumerate() {
        rank.entry(*seq).or_insert(i);
    }
    let mut highest: Option<usize> = None;
    let mut out = 0;
    for seq in seqs(entries) {
        let Some(&r) = rank.get(&seq) else { continue };
        if highest.is_some_and(|h| r < h) {
            out += 1;
        } else {
            highest = Some(r);
        }
    }
    out
}

/// A plain subscriber of the test's own on a channel: the order in which
/// Redis delivered its messages (their `seq`), to hold the stream's order
/// against. It reconnects when the server goes away (what is published
/// meanwhile it does not see).
pub struct Witness {
    stop: Arc<std::sync::atomic::AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a [`Witness`] saw: the seqs, and where each of its subscriptions
/// began among them.
#[derive(Default)]
struct Seen {
    seqs: Vec<u64>,
    /// Each seq's run (the test publisher's `run`), by index into `names`.
    runs: Vec<usize>,
    names: Vec<String>,
    starts: Vec<usize>,
}

impl Seen {
    fn subscribed(seen: &Mutex<Seen>) {
        let mut seen = seen.lock().unwrap();
        let at = seen.seqs.len();
        seen.starts.push(at);
    }

    /// Records a payload of the test publisher's (others are left out).
    fn delivered(seen: &Mutex<Seen>, payload: &[u8]) {
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return;
        };
        let Some(seq) = value.get("seq").and_then(|s| s.as_u64()) else {
            return;
        };
        let run = value.get("run").and_then(|r| r.as_str()).unwrap_or("");
        let mut seen = seen.lock().unwrap();
        let index = match seen.names.iter().position(|n| n == run) {
            Some(i) => i,
            None => {
                seen.names.push(run.to_string());
                seen.names.len() - 1
            }
        };
        seen.seqs.push(seq);
        seen.runs.push(index);
    }
}

impl Witness {
    /// Subscribes (returning once subscribed) and starts listening.
    pub fn start(server: &RedisServer, channel: &str) -> Self {
        let port = server.port;
        Self::following(channel, move || Some(port))
    }

    /// A witness on the server `locate` names (asked again after each lost
    /// connection, so it follows a failover; what is published meanwhile it
    /// does not see).
    pub fn following(channel: &str, locate: impl Fn() -> Option<u16> + Send + 'static) -> Self {
        let channel = channel.to_string();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (ready, subscribed) = std::sync::mpsc::channel();
        let thread = std::thread::spawn({
            let (stop, seen) = (stop.clone(), seen.clone());
            move || {
                let stopped = || stop.load(std::sync::atomic::Ordering::Relaxed);
                while !stopped() {
                    let Some(Ok(mut conn)) = locate().map(|port| {
                        redis::Client::open(format!("redis://127.0.0.1:{port}"))
                            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
                    }) else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                    let mut pubsub = conn.as_pubsub();
                    if pubsub.subscribe(&channel).is_err() {
                        continue;
                    }
                    Seen::subscribed(&seen);
                    let _ = ready.send(());
                    while !stopped() {
                        match pubsub.get_message() {
                            Ok(msg) => {
                                let payload: Vec<u8> = msg.get_payload().unwrap_or_default();
                                Seen::delivered(&seen, &payload);
                            }
                            Err(e) if e.is_timeout() => {}
                            Err(_) => break,
                        }
                    }
                }
            }
        });
        subscribed
            .recv_timeout(Duration::from_secs(10))
            .expect("the witness subscribed");
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// A witness of a sharded channel on a cluster: SSUBSCRIBE on the node
    /// `locate` names (asked again after each lost connection or
    /// SUNSUBSCRIBE, so it follows a failover or a slot move; what is
    /// published meanwhile it does not see).
    pub fn sharded(channel: &str, locate: impl Fn() -> Option<u16> + Send + 'static) -> Self {
        use std::io::Write;
        let channel = channel.to_string();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (ready, subscribed) = std::sync::mpsc::channel();
        let thread = std::thread::spawn({
            let (stop, seen) = (stop.clone(), seen.clone());
            move || {
                let stopped = || stop.load(std::sync::atomic::Ordering::Relaxed);
                while !stopped() {
                    let Some(mut stream) = locate()
                        .and_then(|port| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
                    else {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                    let command = format!(
                        "*2\r\n$10\r\nSSUBSCRIBE\r\n${}\r\n{channel}\r\n",
                        channel.len()
                    );
                    if stream.write_all(command.as_bytes()).is_err() {
                        continue;
                    }
                    let mut reader = BufReader::new(stream);
                    let mut parser = redis::Parser::new();
                    while !stopped() {
                        let items = match parser.parse_value(&mut reader) {
                            Ok(redis::Value::Array(items)) => items,
                            Err(e) if e.is_timeout() => continue,
                            _ => break,
                        };
                        let text = |i: usize| match items.get(i) {
                            Some(redis::Value::BulkString(b)) => b.clone(),
                            _ => Vec::new(),
                        };
                        match text(0).as_slice() {
                            b"ssubscribe" => {
                                Seen::subscribed(&seen);
                                let _ = ready.send(());
                            }
                            b"smessage" => Seen::delivered(&seen, &text(2)),
                            _ => break,
                        }
                    }
                }
            }
        });
        subscribed
            .recv_timeout(Duration::from_secs(10))
            .expect("the witness subscribed");
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// The seqs delivered so far, in delivery order.
    pub fn order(&self) -> Vec<u64> {
        self.seen.lock().unwrap().seqs.clone()
    }

    /// The seqs of the test publisher's run `run` delivered so far, in
    /// delivery order.
    pub fn order_of(&self, run: &str) -> Vec<u64> {
        let seen = self.seen.lock().unwrap();
        let Some(index) = seen.names.iter().position(|n| n == run) else {
            return Vec::new();
        };
        let runs = seen.runs.iter();
        let seqs = seen.seqs.iter().zip(runs).filter(|(_, r)| **r == index);
        seqs.map(|(s, _)| *s).collect()
    }

    /// Waits (at most `timeout`) until the witness has subscribed again
    /// after losing its connection `nth` times, and returns where in
    /// [`Witness::order`] that subscription began: what it saw from there
    /// on was delivered after it subscribed again. (Counting from the
    /// moment the test saw the server go would also count what the witness
    /// still had to read from before.)
    pub fn resubscribed(&self, nth: usize, timeout: Duration) -> usize {
        wait_for(
            &format!("the witness subscribed again ({nth} times)"),
            timeout,
            || self.seen.lock().unwrap().starts.get(nth).copied(),
            || {
                format!(
                    "subscriptions began at {:?}",
                    self.seen.lock().unwrap().starts
                )
            },
        )
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Peak resident set size of a process, in bytes (Linux: VmHWM in /proc).
pub fn peak_rss(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM:")
}

/// A process's resident memory now, in bytes (0 when unknown).
pub fn rss(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS:")
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// User plus system CPU time of a process so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ")".
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after ")".
    Duration::from_millis((ticks(11) + ticks(12)) * 10) // 100 ticks per second on Linux
}
