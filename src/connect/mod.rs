//! Connecting to Redis: the [`Endpoint`] every command connects through
//! (URL, ACL credentials, TLS), one way to open each kind of connection, and
//! the one back-off loop, which decides whether a Redis error is worth
//! retrying.

mod endpoint;
mod follow;
mod open;
mod retry;

pub use endpoint::{Endpoint, TlsFiles, Transport, mask_password};
pub use follow::{WATCH_EVERY as SENTINEL_WATCH_EVERY, primary_watch, until_moved};
pub use open::{Conn, connection, connection_manager, managed, open};
pub use retry::{
    Backoff, CONNECT_FAILURES, MAX_BACKOFF, brief, count_connect_failure, explain, has_code,
    is_fatal, lacks_sharded_pubsub, retry_until, retry_until_connected, server_version,
    tls_failure, warn_if_evicting,
};
