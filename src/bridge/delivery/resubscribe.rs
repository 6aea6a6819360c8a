//! The one resubscribe loop of the bridge's subscriptions (a [`Reader`] on
//! one server, a worker's [`Subscription`] on a cluster): subscribe (with
//! back-off until it takes, or until stopped), read until the subscription
//! ends, and when it was lost, subscribe again. [`Link`] keeps the
//! subscription's state: the process's coverage (how many of its
//! subscriptions are up, from which gaps are counted), the reconnects, and
//! the one log line of a loss and of a return.
//!
//! [`Reader`]: super::reader::Reader
//! [`Subscription`]: super::cluster::Subscription

use std::fmt::Display;
use std::time::Instant;

use redis::RedisError;
use tokio_util::sync::CancellationToken;

use super::reader::Coverage;
use crate::connect::{Endpoint, primary_watch, retry_until_connected, until_moved};
use crate::monitor::Counters;

/// How a session's reading ended.
pub(super) enum Ended {
    /// Stopped for good: cancelled (what was received handed over), or
    /// nobody takes what it reads any more.
    Stopped,
    /// The subscription was lost (why): subscribe again.
    Lost(String),
}

/// A subscription the loop keeps up.
pub(super) trait Subscriber {
    /// One connection's subscription.
    type Session;

    /// Who it is, for the log lines (`reader 0`, `worker w-1 on orders`).
    fn who(&self) -> String;
    fn endpoint(&self) -> &Endpoint;
    fn cancel(&self) -> &CancellationToken;

    /// Subscribes on a new connection.
    fn subscribe(&self) -> impl Future<Output = Result<Self::Session, RedisError>> + Send;

    /// Reads from a new session until it ends. `link` is up; a subscriber
    /// whose client resubscribes by itself (a cluster connection) marks
    /// losses and returns on it as they come.
    fn read(
        &mut self,
        session: Self::Session,
        link: &mut Link,
    ) -> impl Future<Output = Ended> + Send;

    /// After the loop stopped (cancelled before or after subscribing).
    fn stopped(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Keeps `subscriber` subscribed until it stops; returns an error only when
/// subscribing again cannot help (credentials, permissions).
pub(super) async fn keep_subscribed<S: Subscriber>(
    mut subscriber: S,
    coverage: &Coverage,
    counters: &Counters,
) -> Result<(), RedisError> {
    let shown = subscriber.endpoint().to_string();
    let cancel = subscriber.cancel().clone();
    let mut link = Link::new(coverage, counters, subscriber.who());
    // Through sentinels: a primary that moves cuts the back-off short.
    let mut primary = primary_watch(subscriber.endpoint());
    loop {
        let named = primary.as_ref().and_then(|w| w.borrow().clone());
        let connected = tokio::select! {
            connected = retry_until_connected(&shown, &cancel, || subscriber.subscribe()) => connected?,
            () = until_moved(primary.as_mut(), named.as_deref().unwrap_or_default()) => continue,
        };
        let Some(session) = connected else {
            subscriber.stopped().await;
            return Ok(());
        };
        link.up();
        match subscriber.read(session, &mut link).await {
            Ended::Stopped => {
                link.stopped();
                subscriber.stopped().await;
                return Ok(());
            }
            Ended::Lost(why) => link.lost(&why),
        }
    }
}

/// A subscription's state as the process counts it.
pub(super) struct Link<'a> {
    coverage: &'a Coverage,
    counters: &'a Counters,
    who: String,
    /// Counted among the process's subscriptions that are up.
    up: bool,
    /// When it was lost, until it is back.
    lost_at: Option<Instant>,
}

impl<'a> Link<'a> {
    fn new(coverage: &'a Coverage, counters: &'a Counters, who: String) -> Self {
        Self {
            coverage,
            counters,
            who,
            up: false,
            lost_at: None,
        }
    }

    /// Subscribed (again): a return after a loss is a reconnect, said with
    /// how long it was down.
    pub fn up(&mut self) {
        if !self.up {
            self.up = true;
            self.coverage.up(self.counters);
        }
        match self.lost_at.take() {
            Some(at) => {
                Counters::add(&self.counters.reconnects, 1);
                tracing::warn!(
                    subscriber = %self.who,
                    down_ms = at.elapsed().as_millis() as u64,
                    "resubscribed (what was published while it was down reached this process only if another of its subscriptions was up: a gap is reported otherwise)"
                );
            }
            None => tracing::debug!(subscriber = %self.who, "subscribed"),
        }
    }

    /// The subscription was lost (why); said once per loss.
    pub fn lost(&mut self, why: &dyn Display) {
        if self.up {
            self.up = false;
            self.coverage.down(true);
        }
        if self.lost_at.is_none() {
            self.lost_at = Some(Instant::now());
            tracing::warn!(subscriber = %self.who, cause = %why, "subscription lost; subscribing again");
        }
    }

    /// Stopped on purpose: not a gap.
    fn stopped(&mut self) {
        if self.up {
            self.up = false;
            self.coverage.down(false);
        }
    }
}
