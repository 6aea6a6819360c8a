//! Routes: which channels, or channel patterns, go to which stream.
//!
//! ROUTES is a comma-separated list of `source=target[;option]…`:
//! - `source`: a channel, or a pattern (PSUBSCRIBE glob: `*`, `?`, `[…]`);
//! - `target`: a stream, or a template in which `{channel}` stands for the
//!   channel a message came on (`events:*={channel}:processed` writes
//!   `events:eu` to `events:eu:processed`);
//! - options: `maxlen=N` or `max_age=SECONDS` caps that route's streams,
//!   instead of STREAM_MAXLEN / STREAM_MAX_AGE.
//!
//! Without ROUTES, `INPUT_CHANNEL=OUTPUT_STREAM` is the one route. Every
//! worker subscribes to every route's source, so every worker still sees
//! every message; each message carries the [`Lane`] of its stream.

use std::sync::Arc;
use std::time::Duration;

use super::delivery::OutputFormat;
use super::delivery::{Cap, Destination, Lane, Trim};
use crate::keys::default_dead_stream;
use crate::settings::ConfigError;

/// One route: a source and where its messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// A channel, or a pattern when `pattern`.
    pub source: String,
    pub pattern: bool,
    /// A stream name, or a template with `{channel}`.
    pub target: String,
    /// This route's cap (`None`: the global one, if any).
    pub trim: Option<Trim>,
}

/// What a template's channel placeholder looks like.
pub const CHANNEL: &str = "{channel}";

/// Whether a channel name is a PSUBSCRIBE pattern.
pub fn is_pattern(source: &str) -> bool {
    source.contains(['*', '?', '['])
}

impl Route {
    /// A route from `source` (a channel or a pattern) to `target`.
    pub fn new(source: impl Into<String>, target: impl Into<String>) -> Self {
        let source = source.into();
        Self {
            pattern: is_pattern(&source),
            source,
            target: target.into(),
            trim: None,
        }
    }

    /// The stream a message on `channel` goes to.
    pub fn stream_for(&self, channel: &str) -> String {
        self.target.replace(CHANNEL, channel)
    }

    /// Whether this route reads `channel`: it is the route's channel, or
    /// the route's pattern matches it.
    pub fn matches(&self, channel: &str) -> bool {
        match self.pattern {
            true => glob_match(self.source.as_bytes(), channel.as_bytes()),
            false => self.source == channel,
        }
    }

    /// Whether the stream depends on the channel.
    pub fn is_template(&self) -> bool {
        self.target.contains(CHANNEL)
    }

    /// Checks the route; errors name `var`.
    pub fn check(&self, var: &'static str) -> Result<(), ConfigError> {
        let bad = |why: &str| Err(ConfigError::new(var, self.to_string(), why));
        if self.source.trim().is_empty() {
            return bad("a route needs a channel or pattern before '='");
        }
        if self.target.trim().is_empty() {
            return bad("a route needs a stream after '='");
        }
        if self.target.replace(CHANNEL, "").contains(['{', '}']) {
            return bad(
                "a stream name has no '{' or '}' (they become its keys' hash tag); {channel} is the only placeholder",
            );
        }
        if self.is_template() && !self.pattern {
            // Harmless, but the user probably meant a pattern.
            return bad("{channel} in the stream only makes sense with a pattern (events:*)");
        }
        Ok(())
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.source, self.target)
    }
}

/// Whether `text` matches the PSUBSCRIBE pattern `pattern`, as Redis
/// matches them (its `stringmatchlen`): `*` any run, `?` one byte, `[…]` one
/// of a set or range (`[^…]` none of them), `\` makes the next byte plain.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    while p < pattern.len() {
        match pattern[p] {
            b'*' => {
                while p + 1 < pattern.len() && pattern[p + 1] == b'*' {
                    p += 1;
                }
                if p + 1 == pattern.len() {
                    return true;
                }
                return (t..=text.len()).any(|from| glob_match(&pattern[p + 1..], &text[from..]));
            }
            b'?' => {
                if t >= text.len() {
                    return false;
                }
                t += 1;
            }
            b'[' => {
                if t >= text.len() {
                    return false;
                }
                p += 1;
                let not = pattern.get(p) == Some(&b'^');
                if not {
                    p += 1;
                }
                let mut matched = false;
                while p < pattern.len() && pattern[p] != b']' {
                    if pattern[p] == b'\\' && p + 1 < pattern.len() {
                        p += 1;
                        matched |= pattern[p] == text[t];
                    } else if p + 2 < pattern.len()
                        && pattern[p + 1] == b'-'
                        && pattern[p + 2] != b']'
                    {
                        let (mut lo, mut hi) = (pattern[p], pattern[p + 2]);
                        if lo > hi {
                            std::mem::swap(&mut lo, &mut hi);
                        }
                        matched |= (lo..=hi).contains(&text[t]);
                        p += 2;
                    } else {
                        matched |= pattern[p] == text[t];
                    }
                    p += 1;
                }
                if p >= pattern.len() {
                    // An unclosed set stands for its last byte (as Redis does).
                    p = pattern.len() - 1;
                }
                if matched == not {
                    return false;
                }
                t += 1;
            }
            b'\\' if p + 1 < pattern.len() => {
                p += 1;
                if t >= text.len() || pattern[p] != text[t] {
                    return false;
                }
                t += 1;
            }
            byte => {
                if t >= text.len() || byte != text[t] {
                    return false;
                }
                t += 1;
            }
        }
        p += 1;
    }
    t == text.len()
}

/// Parses ROUTES (see the module's notes); `exact` is STREAM_TRIM=exact.
pub fn parse_routes(raw: &str, exact: bool) -> Result<Vec<Route>, ConfigError> {
    const VAR: &str = "ROUTES";
    let mut routes = Vec::new();
    for item in raw.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let mut parts = item.split(';').map(str::trim);
        let head = parts.next().unwrap_or_default();
        let Some((source, target)) = head.split_once('=') else {
            return Err(ConfigError::new(
                VAR,
                item,
                "expected channel=stream (or pattern=template), e.g. orders=orders:processed",
            ));
        };
        let mut route = Route::new(source.trim(), target.trim());
        for option in parts {
            let (name, value) = option.split_once('=').unwrap_or((option, ""));
            let cap = match name.trim() {
                "maxlen" => value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .map(Cap::MaxLen),
                "max_age" => value
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|s| *s > 0.0 && s.is_finite())
                    .map(|s| Cap::MaxAge(Duration::from_secs_f64(s))),
                _ => {
                    return Err(ConfigError::new(
                        VAR,
                        item,
                        "options are maxlen=N or max_age=SECONDS",
                    ));
                }
            };
            let Some(cap) = cap else {
                return Err(ConfigError::new(
                    VAR,
                    item,
                    format!("{name} needs a number above 0"),
                ));
            };
            route.trim = Some(Trim { cap, exact });
        }
        route.check(VAR)?;
        routes.push(route);
    }
    if routes.is_empty() {
        return Err(ConfigError::new(VAR, raw, "no route in it"));
    }
    for (i, route) in routes.iter().enumerate() {
        if routes[..i].iter().any(|r| r.source == route.source) {
            return Err(ConfigError::new(
                VAR,
                raw,
                format!("{} is routed twice", route.source),
            ));
        }
    }
    Ok(routes)
}

/// How lanes are made: what all streams share.
#[derive(Debug, Clone)]
pub struct LanePlan {
    /// DEAD_LETTER_STREAM, when set: one for all streams.
    pub dead_letter_stream: Option<String>,
    pub cluster: bool,
    pub format: OutputFormat,
    pub id_field: String,
    /// The database the streams are in (the probe channels name it).
    pub db: i64,
    /// The pool's handoff key, which every stream's write scripts hold to
    /// (one server; `None` on a cluster).
    pub handoff: Option<String>,
    /// Sharded Pub/Sub on a cluster: each channel's probe is in its slot,
    /// subscribed to with it (see [`crate::keys::sharded_probe_channel`]).
    pub sharded: bool,
}

/// A process's routes, resolved to lanes. Shared by its workers.
///
/// A channel route's lane is made once; a pattern route's lane is made for
/// each channel as its messages come, and lives only as long as messages
/// hold it (a subscription caches a few), so that many short-lived channels
/// under a pattern leave nothing behind once they go quiet.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    /// Per route: its lane, for a channel (not a pattern).
    fixed: Vec<Option<Arc<Lane>>>,
    /// Per route: its probe channel (see [`crate::keys::route_probe`]).
    probes: Vec<String>,
    plan: LanePlan,
}

impl Router {
    pub fn new(routes: Vec<Route>, plan: LanePlan) -> Self {
        let mut router = Router {
            fixed: Vec::new(),
            probes: routes
                .iter()
                .map(|r| super::delivery::route_probe(plan.sharded, plan.db, &r.source, &r.target))
                .collect(),
            routes,
            plan,
        };
        router.fixed = (0..router.routes.len())
            .map(|i| {
                let route = &router.routes[i];
                (!route.pattern).then(|| router.make(route, &route.source))
            })
            .collect();
        router
    }

    /// The channels to SUBSCRIBE to (with sharded Pub/Sub, each followed
    /// by its probe, in its slot).
    pub fn channels(&self) -> Vec<&str> {
        let mut channels = Vec::new();
        for (route, probe) in self.routes.iter().zip(&self.probes) {
            if !route.pattern {
                channels.push(route.source.as_str());
                if self.plan.sharded {
                    channels.push(probe.as_str());
                }
            }
        }
        channels
    }

    /// The patterns to PSUBSCRIBE to.
    pub fn patterns(&self) -> Vec<&str> {
        self.routes
            .iter()
            .filter(|r| r.pattern)
            .map(|r| r.source.as_str())
            .collect()
    }

    /// The route of a message that came on `channel` (SUBSCRIBE).
    pub fn for_channel(&self, channel: &[u8]) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| !r.pattern && r.source.as_bytes() == channel)
    }

    /// The route of a message that matched `pattern` (PSUBSCRIBE).
    pub fn for_pattern(&self, pattern: &[u8]) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| r.pattern && r.source.as_bytes() == pattern)
    }

    /// The lane of a channel's route (not a pattern's).
    pub fn fixed(&self, route: usize) -> Option<Arc<Lane>> {
        self.fixed.get(route)?.clone()
    }

    /// The lane of a message on `channel` by route `route`.
    pub fn lane(&self, route: usize, channel: &str) -> Arc<Lane> {
        match self.fixed(route) {
            Some(lane) => lane,
            None => self.make(&self.routes[route], channel),
        }
    }

    /// The probe channels, one per route (see [`crate::keys::route_probe`]).
    pub fn probes(&self) -> impl Iterator<Item = &str> {
        self.probes.iter().map(String::as_str)
    }

    /// Whether one PUBLISH can reach a subscription through more than one
    /// route (several sources, at least one of them a pattern).
    pub fn may_overlap(&self) -> bool {
        self.routes.len() > 1 && self.routes.iter().any(|r| r.pattern)
    }

    /// The stream a message on `channel` by route `route` goes to.
    pub fn stream_of(&self, route: usize, channel: &[u8]) -> String {
        match self.fixed(route) {
            Some(lane) => lane.to.stream.clone(),
            None => self.routes[route].stream_for(&String::from_utf8_lossy(channel)),
        }
    }

    /// The lane of messages on `channel` by `route`.
    fn make(&self, route: &Route, channel: &str) -> Arc<Lane> {
        let stream = route.stream_for(channel);
        let stream = stream.as_str();
        let dead_stream = self
            .plan
            .dead_letter_stream
            .clone()
            .unwrap_or_else(|| default_dead_stream(stream, self.plan.cluster));
        let mut lane = Lane::new(
            Destination {
                stream: stream.to_string(),
                dead_stream,
                channel: channel.to_string(),
                format: self.plan.format,
                id_field: self.plan.id_field.clone(),
            },
            route.trim,
        );
        if let Some(handoff) = &self.plan.handoff {
            lane.keys.handoff = handoff.clone();
        }
        Arc::new(lane)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_with_patterns_templates_and_caps() {
        let routes = parse_routes(
            "orders=orders:out, events:*={channel}:processed;maxlen=1000,logs=logs:out;max_age=60",
            false,
        )
        .unwrap();
        assert_eq!(routes.len(), 3);
        assert!(!routes[0].pattern && !routes[0].is_template());
        assert!(routes[1].pattern && routes[1].is_template());
        assert_eq!(routes[1].stream_for("events:eu"), "events:eu:processed");
        assert_eq!(
            routes[1].trim,
            Some(Trim {
                cap: Cap::MaxLen(1000),
                exact: false
            })
        );
        assert_eq!(
            routes[2].trim.map(|t| t.cap),
            Some(Cap::MaxAge(Duration::from_secs(60)))
        );
    }

    #[test]
    fn patterns_match_as_redis_matches_them() {
        for (pattern, text, yes) in [
            ("ev:*", "ev:a", true),
            ("ev:*", "ev:", true),
            ("ev:*", "e", false),
            ("ev:a*", "ev:ab", true),
            ("ev:a*", "ev:b", false),
            ("ev:?b", "ev:ab", true),
            ("ev:?b", "ev:abb", false),
            ("*", "anything:at:all", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("[abc]x", "bx", true),
            ("[abc]x", "dx", false),
            ("[^abc]x", "dx", true),
            ("[a-c]x", "cx", true),
            ("[c-a]x", "bx", true),
            ("[a-c]x", "dx", false),
            ("a\\*", "a*", true),
            ("a\\*", "ab", false),
        ] {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                yes,
                "{pattern} ~ {text}"
            );
        }
    }

    #[test]
    fn bad_routes_are_one_error_naming_routes() {
        for raw in [
            "orders",
            "=s",
            "a=",
            "a=b;maxlen=x",
            "a=b;maxlen=0",
            "a=b;size=3",
            "a=b{c}",
            "a=b,a=c",
            "a={channel}:x",
            "",
        ] {
            let err = parse_routes(raw, false).unwrap_err();
            assert_eq!(err.var, "ROUTES", "{raw}: {err}");
        }
    }
}
