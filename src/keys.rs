//! Every Redis key and channel name optimus uses beside the ones the user
//! sets, how a name is kept in another's cluster slot, and who a process
//! is (its worker ids and presence value).
//!
//! - A stream's keys ([`Keys`]: writer record, handoff, race locks and ACK
//!   keys) and a pool's ([`Pool`]: clock, marks channel, members, handoff),
//!   all with the stream's name as hash tag.
//! - The probe channels the publisher asks ([`probe_channel`]), and which
//!   channels are optimus's own ([`is_internal_channel`]).
//! - The control plane's keys (`{optimus:ctl}:…`).
//! - `work`'s group marker, the dead-letter stream's default name.
//! - A process's name, its workers' ids and its presence value
//!   ([`Process`]).

use crate::settings::ConfigError;

// ---- A stream's keys and a pool's ----

/// Names of a stream's keys in the protocol. They carry the stream's name as
/// hash tag, so on a cluster they live on the stream's shard.
#[derive(Debug, Clone)]
pub struct Keys {
    /// The stream's writer record: a hash of `epoch`, `owner`, `pos`.
    pub writer: String,
    /// The handoff key the write scripts hold to: the pool's on one server
    /// (see `bridge::delivery::members`); on a cluster (no handoff) one of the stream's own,
    /// never set, for the scripts' keys to share a slot.
    pub handoff: String,
    lock_prefix: String,
    ack_prefix: String,
}

impl Keys {
    pub fn new(stream: &str) -> Self {
        Self {
            writer: format!("{{{stream}}}:writer"),
            handoff: format!("{{{stream}}}:handoff"),
            lock_prefix: format!("{{{stream}}}:lock:"),
            ack_prefix: format!("{{{stream}}}:ack:"),
        }
    }

    /// Race: a message's lock.
    pub fn lock(&self, id: &str) -> String {
        format!("{}{id}", self.lock_prefix)
    }

    /// Race (and the fast path on a cluster): a message's ACK.
    pub fn ack(&self, id: &str) -> String {
        format!("{}{id}", self.ack_prefix)
    }
}

/// The pool's keys and channels, named after its bookkeeping stream
/// (OUTPUT_STREAM, whatever the routes).
#[derive(Debug, Clone)]
pub struct Pool {
    /// The clock marks are taken from.
    pub clock: String,
    /// The marks channel every subscription listens to.
    pub marks: String,
    /// The live processes: a hash of member name to `<beat ms>:<last mark seen>`.
    pub members: String,
    /// The strategy handoff (see `bridge::delivery::members`).
    pub handoff: String,
}

impl Pool {
    pub fn new(stream: &str) -> Self {
        Self::in_db(stream, 0)
    }

    /// The pool of `stream` in database `db`. Pub/Sub ignores databases:
    /// pools in other databases of one server have marks channels of their
    /// own (`…:marks:db<n>`), not to mix their clocks.
    pub fn in_db(stream: &str, db: i64) -> Self {
        let marks = match db {
            0 => format!("{{{stream}}}:marks"),
            n => format!("{{{stream}}}:marks:db{n}"),
        };
        Self {
            clock: format!("{{{stream}}}:clock"),
            marks,
            members: format!("{{{stream}}}:members"),
            handoff: format!("{{{stream}}}:handoff"),
        }
    }
}

// ---- Channels ----

/// The prefix of [`probe_channel`]s.
const PROBE_PREFIX: &str = "optimus:bridge:";

/// The channel every bridge subscription to a route's `source` (a channel
/// or a pattern) also subscribes to, in the same command: `PUBSUB NUMSUB`
/// of it counts the bridge's subscriptions for that route and nobody
/// else's. Nothing is ever published on it. (The publisher's fast path
/// asks it.) It names the database, the source and the route's target (a
/// stream, or a template): Pub/Sub ignores databases, and a pool writing
/// another stream from the same channel is no bridge for this one.
/// `optimus:bridge:<db>:<source>-><target>`.
pub fn probe_channel(db: i64, source: &str, target: &str) -> String {
    format!("{PROBE_PREFIX}{db}:{source}->{target}")
}

/// Whether a channel is one of optimus's own (a marks channel
/// `{<stream>}:marks`, a [`probe_channel`], or an older optimus's mark
/// channel `{<stream>}:mark:<worker>`): never bridged, whatever pattern
/// matches it.
pub fn is_internal_channel(name: &[u8]) -> bool {
    const MARK: &[u8] = b"}:mark:";
    const MARKS_DB: &[u8] = b"}:marks:db";
    name.starts_with(PROBE_PREFIX.as_bytes())
        || (name.first() == Some(&b'{')
            && (name.ends_with(b"}:marks")
                || name.windows(MARK.len()).any(|w| w == MARK)
                || name.windows(MARKS_DB.len()).any(|w| w == MARKS_DB)))
}

// ---- The control plane ----

/// The kill switch's key.
pub const STOP_KEY: &str = "{optimus:ctl}:stop";

/// The desired total number of bridge workers, all processes together.
pub const WORKERS_KEY: &str = "{optimus:ctl}:workers";

/// The live `consume` processes: a sorted set scored by the server time (ms)
/// at which each registration lapses.
pub const PROCESSES_KEY: &str = "{optimus:ctl}:processes";

/// Where a process reports its rate for `ctl status`: this prefix and its
/// presence value (`host=… pid=…`).
pub const RATE_PREFIX: &str = "{optimus:ctl}:rate:";

/// Where a `consume` process describes itself for `ctl status` while it is
/// registered: this prefix and its name; the value is `host=… pid=…
/// workers=N`, so a process that `ctl scale` left without workers still
/// shows.
pub const PROCESS_PREFIX: &str = "{optimus:ctl}:process:";

// ---- Streams and markers ----

/// The key that says a group was made: it goes only with Redis's data, so
/// a group missing while it is there was deleted (in the stream's slot on a
/// cluster).
pub fn group_marker(stream: &str, group: &str, cluster: bool) -> String {
    slot_mate(stream, &format!(":work-group:{group}"), cluster)
}

/// The dead-letter stream of `stream`: `<stream>:dead`, or on a cluster
/// one in the stream's slot (the write script touches both), see
/// [`slot_mate`].
pub fn default_dead_stream(stream: &str, cluster: bool) -> String {
    slot_mate(stream, ":dead", cluster)
}

/// `<key><suffix>`; on a cluster, a name in `key`'s slot: `{<key>}<suffix>`,
/// or, when `key` has a hash tag of its own (`{orders}:processed`), the
/// plain `<key><suffix>`, which keeps it.
pub fn slot_mate(key: &str, suffix: &str, cluster: bool) -> String {
    use redis::cluster_routing::Slot;
    let wrapped = format!("{{{key}}}{suffix}");
    if cluster && Slot::for_key(&wrapped) == Slot::for_key(key) {
        wrapped
    } else {
        format!("{key}{suffix}")
    }
}

/// On a cluster, `key` (the setting `var`) must share `stream`'s slot, since
/// one script touches both; the error suggests [`slot_mate`]`(stream, suffix)`.
pub fn require_slot_mate(
    var: &'static str,
    key: &str,
    stream: &str,
    suffix: &str,
) -> Result<(), ConfigError> {
    use redis::cluster_routing::Slot;
    if Slot::for_key(key) == Slot::for_key(stream) {
        return Ok(());
    }
    Err(ConfigError::new(
        var,
        key,
        format!(
            "on a cluster it must be in {stream}'s slot, e.g. {}",
            slot_mate(stream, suffix, true)
        ),
    ))
}

// ---- Who a process is ----

/// This machine's name, for worker ids and presence values.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Who this process is, for worker ids and presence values.
pub(crate) struct Process {
    host: String,
    pid: u32,
    /// Tells apart two processes with the same host name and pid (containers).
    nonce: u16,
}

impl Process {
    pub(crate) fn new() -> Self {
        Self {
            host: host_name(),
            pid: std::process::id(),
            nonce: rand::random(),
        }
    }

    pub(crate) fn worker_id(&self, index: usize) -> String {
        format!("{}-{}-{:04x}-{index}", self.host, self.pid, self.nonce)
    }

    /// Its presence value, `host=… pid=…` (what `ctl status` shows, what
    /// [`description_field`] reads).
    pub(crate) fn describe(&self) -> String {
        format!("host={} pid={}", self.host, self.pid)
    }

    /// This process, among the processes registered for `ctl scale`.
    pub(crate) fn name(&self) -> String {
        format!("{}-{}-{:04x}", self.host, self.pid, self.nonce)
    }
}

/// The value of `name=` in a process's description (`host=… pid=…
/// workers=…`, see [`Process::describe`]).
pub(crate) fn description_field<'a>(description: &'a str, name: &str) -> Option<&'a str> {
    description
        .split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_mates_share_the_slot_on_a_cluster() {
        use redis::cluster_routing::Slot;
        for key in ["messages:processed", "{orders}:processed", "a{b", "x{y}z"] {
            let mate = slot_mate(key, ":dead", true);
            assert_eq!(
                Slot::for_key(&mate),
                Slot::for_key(key),
                "{mate} is not in {key}'s slot"
            );
            assert!(mate.ends_with(":dead"), "{mate}");
        }
        assert_eq!(slot_mate("s", ":dead", true), "{s}:dead");
        assert_eq!(slot_mate("{o}:s", ":dead", true), "{o}:s:dead");
        assert_eq!(slot_mate("s", ":dead", false), "s:dead");
    }
}
