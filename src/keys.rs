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
/// hash tag (or the stream's own tag, see [`slot_tag`]), so on a cluster
/// they live on the stream's shard.
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
    /// `{<stream>}:…` for a plain name; a name with a hash tag of its own
    /// (`{orders}:out`), or one braces would break, gets
    /// `{<tag>}:optimus:<stream>:…` instead: in the stream's slot, and with
    /// the whole name in it, so that streams sharing a tag (as on a cluster
    /// they are told to) never share a record, a lock or an ACK.
    pub fn new(stream: &str) -> Self {
        let tag = slot_tag(stream);
        let prefix = if tag == stream {
            format!("{{{stream}}}")
        } else {
            format!("{{{tag}}}:optimus:{stream}")
        };
        Self {
            writer: format!("{prefix}:writer"),
            handoff: format!("{prefix}:handoff"),
            lock_prefix: format!("{prefix}:lock:"),
            ack_prefix: format!("{prefix}:ack:"),
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
/// (OUTPUT_STREAM, whatever the routes). On a cluster they live in the
/// input channel's slot (see [`Pool::sharded`]).
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
    /// Sharded Pub/Sub on a cluster: marks go out with SPUBLISH, and the
    /// writer records (in their streams' slots) are read apart from the
    /// cycle.
    pub sharded: bool,
}

impl Pool {
    /// With MIN_REPLICAS_ACKED, the replication history the clock was last
    /// taken in (see `next_mark` in the protocol's `lib.lua`).
    pub fn clock_history(&self) -> String {
        format!("{}:history", self.clock)
    }

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
            sharded: false,
        }
    }

    /// The pool of `stream` on a cluster with sharded Pub/Sub, whose
    /// messages come on `channel`: its keys and marks channel
    /// `{<tag>}:optimus:<stream>:…` share the channel's slot (see
    /// [`slot_tag`]), so that one node orders the marks among the messages
    /// and each script stays in one slot.
    pub fn sharded(stream: &str, channel: &str) -> Self {
        let tag = slot_tag(channel);
        let name = |what: &str| format!("{{{tag}}}:optimus:{stream}:{what}");
        Self {
            clock: name("clock"),
            marks: name("marks"),
            members: name("members"),
            handoff: name("handoff"),
            sharded: true,
        }
    }
}

/// A hash tag whose slot is `name`'s: `name`'s own tag when it has one
/// (`{orders}:in` → `orders`), else `name` itself; a name that braces would
/// break (`a}b`) gets the first `s<n>` of its slot.
pub fn slot_tag(name: &str) -> String {
    use redis::cluster_routing::Slot;
    let slot = Slot::for_key(name);
    if let Some(open) = name.find('{')
        && let Some(len) = name[open + 1..].find('}')
        && len > 0
    {
        return name[open + 1..open + 1 + len].to_string();
    }
    if !name.contains('}') && !name.is_empty() {
        return name.to_string();
    }
    (0u32..)
        .map(|n| format!("s{n}"))
        .find(|tag| Slot::for_key(tag) == slot)
        .expect("every slot has a short name")
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

/// The probe channel of a route: [`sharded_probe_channel`] with sharded
/// Pub/Sub on a cluster, else [`probe_channel`].
pub fn route_probe(sharded: bool, db: i64, source: &str, target: &str) -> String {
    match sharded {
        true => sharded_probe_channel(source, target),
        false => probe_channel(db, source, target),
    }
}

/// With sharded Pub/Sub on a cluster, the probe channel lives in its
/// channel's slot (one SSUBSCRIBE takes channels of one slot, and the
/// publisher asks it on that slot's master):
/// `{<the channel's tag>}:optimus:bridge:<source>-><target>`.
pub fn sharded_probe_channel(source: &str, target: &str) -> String {
    format!("{{{}}}:{PROBE_PREFIX}{source}->{target}", slot_tag(source))
}

/// Whether a channel is one of optimus's own (a marks channel
/// `{<stream>}:marks`, or on a cluster `{<tag>}:optimus:<stream>:marks`, a
/// [`probe_channel`], or an older optimus's mark
/// channel `{<stream>}:mark:<worker>`): never bridged, whatever pattern
/// matches it.
pub fn is_internal_channel(name: &[u8]) -> bool {
    const MARK: &[u8] = b"}:mark:";
    const MARKS_DB: &[u8] = b"}:marks:db";
    const SHARDED: &[u8] = b"}:optimus:";
    const SHARDED_PROBE: &[u8] = b"}:optimus:bridge:";
    name.starts_with(PROBE_PREFIX.as_bytes())
        || (name.first() == Some(&b'{')
            && (name.ends_with(b"}:marks")
                || name
                    .windows(SHARDED_PROBE.len())
                    .any(|w| w == SHARDED_PROBE)
                || (name.ends_with(b":marks")
                    && name.windows(SHARDED.len()).any(|w| w == SHARDED))
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
    fn a_sharded_pool_lives_in_its_channel_s_slot() {
        use redis::cluster_routing::Slot;
        for channel in ["messages:published", "{orders}:in", "a}b", "{}x", "x{y"] {
            let pool = Pool::sharded("messages:processed", channel);
            for key in [&pool.clock, &pool.marks, &pool.members, &pool.handoff] {
                assert_eq!(
                    Slot::for_key(key),
                    Slot::for_key(channel),
                    "{key} shares {channel}'s slot"
                );
            }
            assert!(is_internal_channel(pool.marks.as_bytes()), "{}", pool.marks);
            // The bridge's probe, SSUBSCRIBEd with the channel.
            let probe = sharded_probe_channel(channel, "messages:processed");
            assert_eq!(Slot::for_key(&probe), Slot::for_key(channel), "{probe}");
            assert!(is_internal_channel(probe.as_bytes()), "{probe}");
            let keys = Keys::new(channel);
            for key in [&keys.writer, &keys.handoff, &keys.ack("x")] {
                assert_eq!(Slot::for_key(key), Slot::for_key(channel), "{key}");
            }
        }
        assert_eq!(Keys::new("out").writer, "{out}:writer");
        assert!(!is_internal_channel(b"{orders}:marks:x"));
    }

    #[test]
    fn streams_sharing_a_hash_tag_keep_keys_of_their_own() {
        let streams = ["{o}:a", "{o}:b", "o", "{o}:a:writer"];
        let keys: Vec<Keys> = streams.iter().map(|s| Keys::new(s)).collect();
        let mut seen = std::collections::HashSet::new();
        for k in &keys {
            for key in [k.writer.clone(), k.handoff.clone(), k.lock("x"), k.ack("x")] {
                assert!(seen.insert(key.clone()), "{key} named twice");
            }
        }
        assert_eq!(keys[0].writer, "{o}:optimus:{o}:a:writer");
        assert_eq!(keys[2].writer, "{o}:writer");
    }

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
