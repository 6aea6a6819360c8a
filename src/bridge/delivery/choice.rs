//! The delivery core's named choices: how the workers share the duty to
//! write ([`Strategy`]), how an entry is laid out ([`OutputFormat`]) and
//! which Pub/Sub commands carry the messages ([`PubSubMode`]).

use crate::settings::Named;

/// How a message is laid out in the output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// `message_id`, `payload` (the published bytes, untouched) and `consumer_id`.
    #[default]
    Envelope,
    /// Like envelope, plus every top-level string/number/bool field of a JSON
    /// object payload copied into the entry (as the replaced system did).
    Flat,
}

/// Which Pub/Sub commands carry the messages (PUBSUB_MODE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PubSubMode {
    /// SUBSCRIBE and PUBLISH; on a cluster, every node relays every message.
    #[default]
    Classic,
    /// SSUBSCRIBE and SPUBLISH (Redis 7): only the shard that holds the
    /// channel's slot carries its messages.
    Sharded,
}

/// How the workers share the duty to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// One writer per stream among the live processes, fenced by the
    /// stream's writer record; the others keep copies as standbys and take
    /// over when it falls silent, stops receiving or gets stuck. Writes in
    /// publish order, keeps no key per message, and costs Redis the same
    /// whatever the number of workers. (`partitioned`, the name of the
    /// strategy it replaces, is taken for it.)
    #[default]
    Fenced,
    /// The design card's protocol: every worker races for every message's
    /// lock; the winner writes. Redis work per message grows with the workers.
    Race,
}

impl Strategy {
    /// The setting's value (`fenced`, `race`).
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Fenced => "fenced",
            Strategy::Race => "race",
        }
    }
}

impl Named for Strategy {
    const NAMES: &'static [(&'static str, Self)] =
        &[("fenced", Strategy::Fenced), ("race", Strategy::Race)];
    /// `partitioned`, the name of the strategy fenced replaces.
    const ALIASES: &'static [(&'static str, Self)] = &[("partitioned", Strategy::Fenced)];
}

impl Named for OutputFormat {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("envelope", OutputFormat::Envelope),
        ("flat", OutputFormat::Flat),
    ];
}

impl Named for PubSubMode {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("classic", PubSubMode::Classic),
        ("sharded", PubSubMode::Sharded),
    ];
}
