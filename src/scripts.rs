//! The Lua scripts of what runs around the delivery core (presence, `ctl`,
//! `work`): `scripts/*.lua`, included at build time, each with
//! `clock.lua` in front and its KEYS, ARGV and reply described at its top.
//! The delivery protocol's own scripts are in `bridge/delivery/scripts/`.

macro_rules! lua {
    ($file:literal) => {
        concat!(
            include_str!("scripts/clock.lua"),
            include_str!(concat!("scripts/", $file))
        )
    };
}

/// Keeps workers' presence keys alive.
pub(crate) const PRESENCE_REFRESH: &str = lua!("presence_refresh.lua");
/// How many members of an expiring index (workers, processes) are live.
pub(crate) const LIVE_COUNT: &str = lua!("live_count.lua");
/// The live members of an expiring index, with their keys' values.
pub(crate) const LIVE_LIST: &str = lua!("live_list.lua");
/// A process's `ctl scale` registration and share.
pub(crate) const SCALE: &str = lua!("scale.lua");
/// `work`: an entry to the dead-letter stream and acknowledged.
pub(crate) const DEAD_LETTER: &str = lua!("dead_letter.lua");
/// `work`: the consumer group made if missing.
pub(crate) const MAKE_GROUP: &str = lua!("make_group.lua");
