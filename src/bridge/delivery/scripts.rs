//! The protocol's Lua scripts (`scripts/*.lua`, included at build time),
//! each with the helpers of `lib.lua` (and, for those that keep ACK keys,
//! `acked.lua`) in front, and how they are run.

use std::sync::LazyLock;

use redis::{RedisResult, Script};

macro_rules! lua {
    ($($file:literal),+) => {
        concat!(include_str!("scripts/lib.lua"), $(include_str!(concat!("scripts/", $file))),+)
    };
}

/// A reader's first mark, inside the MULTI that subscribes, with the seal
/// its marks are checked with.
pub static START: &str = lua!("start.lua");
/// A process's cycle: its beat, a mark, the records it asks about.
pub static CYCLE: &str = lua!("cycle.lua");
/// Becoming a stream's writer, fencing the one before.
pub static TAKEOVER: &str = lua!("takeover.lua");
/// Putting right a writer record whose position is impossible.
pub static REPAIR: &str = lua!("repair.lua");
/// A writer stepping down.
pub static RELEASE: &str = lua!("release.lua");
/// MIN_REPLICAS_ACKED: how far the replicas hold a writer's writes.
pub static CONFIRM: &str = lua!("confirm.lua");
/// The fenced write of a batch.
pub static WRITE: &str = lua!("write.lua");
/// Race: claiming a batch.
pub static CLAIM: &str = lua!("acked.lua", "claim.lua");
/// Race: writing what was claimed.
pub static RACE_WRITE: &str = lua!("acked.lua", "race_write.lua");
/// A write with ACK keys and no lock (the publisher's fast path on a cluster).
pub static WRITE_ACKED: &str = lua!("acked.lua", "write_acked.lua");
/// The publisher's batch on one server.
pub static PUBLISH: &str = lua!("publish.lua");
/// The publisher's part on a cluster with sharded Pub/Sub.
pub static PUBLISH_SHARDED: &str = lua!("publish_sharded.lua");

/// Every script, loaded together when the server lacks one.
static ALL: [&str; 12] = [
    START,
    REPAIR,
    CYCLE,
    TAKEOVER,
    RELEASE,
    CONFIRM,
    WRITE,
    CLAIM,
    RACE_WRITE,
    WRITE_ACKED,
    PUBLISH,
    PUBLISH_SHARDED,
];

/// A script's SHA1, as EVALSHA names it.
pub fn sha(script: &'static str) -> &'static str {
    static SHAS: LazyLock<Vec<(usize, String)>> = LazyLock::new(|| {
        ALL.iter()
            .map(|s| (s.as_ptr() as usize, Script::new(s).get_hash().to_string()))
            .collect()
    });
    SHAS.iter()
        .find(|(ptr, _)| *ptr == script.as_ptr() as usize)
        .map(|(_, sha)| sha.as_str())
        .expect("one of the protocol's scripts")
}

/// An `EVALSHA` of `script` with its keys, for the caller to add the args.
pub fn evalsha(script: &'static str, keys: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha(script)).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    cmd
}

/// Runs a pipeline of EVALSHAs; when the server does not know the scripts
/// (first use, or after a restart or a SCRIPT FLUSH) it loads them all and
/// runs it again.
pub async fn query<T, C>(conn: &mut C, pipe: &redis::Pipeline) -> RedisResult<T>
where
    T: redis::FromRedisValue,
    C: redis::aio::ConnectionLike,
{
    match pipe.query_async(conn).await {
        Err(err) if is_noscript(&err) => {
            load_all(conn).await?;
            pipe.query_async(conn).await
        }
        result => result,
    }
}

/// [`query`] as one request to the server that holds `key`
/// ([`Conn::query_at`]): for a pipeline that ends in WAIT.
pub async fn query_at<T>(
    conn: &mut crate::connect::Conn,
    key: &str,
    pipe: &redis::Pipeline,
) -> RedisResult<T>
where
    T: redis::FromRedisValue,
{
    match conn.query_at(key, pipe).await {
        Err(err) if is_noscript(&err) => {
            load_all(conn).await?;
            conn.query_at(key, pipe).await
        }
        result => result,
    }
}

/// Runs one EVALSHA as [`query`] does.
pub async fn run<T, C>(conn: &mut C, cmd: redis::Cmd) -> RedisResult<T>
where
    T: redis::FromRedisValue,
    C: redis::aio::ConnectionLike,
{
    let mut pipe = redis::pipe();
    pipe.add_command(cmd);
    let (value,): (T,) = query(conn, &pipe).await?;
    Ok(value)
}

/// Whether Redis did not know a script: the error of a single EVALSHA, or
/// of one in a pipeline (a cluster reports those one by one).
fn is_noscript(err: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
        || err.clone().into_server_errors().is_some_and(|errors| {
            errors
                .iter()
                .any(|(_, e)| e.kind() == Some(ServerErrorKind::NoScript))
        })
}

/// Loads every script: one command each, which a cluster connection sends
/// to every node.
pub async fn load_all<C: redis::aio::ConnectionLike>(conn: &mut C) -> RedisResult<()> {
    for script in ALL {
        redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(script)
            .query_async::<redis::Value>(conn)
            .await?;
    }
    Ok(())
}
