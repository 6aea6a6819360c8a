//! Every Redis key and channel name optimus uses beside the ones the user
//! sets, and how a name is kept in another's cluster slot.

use crate::settings::ConfigError;

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
