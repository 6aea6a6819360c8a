//! Connecting to Redis: the [`Endpoint`] every command connects through
//! (URL, ACL credentials, TLS), and the one function that decides whether a
//! Redis error is worth retrying.

use std::fmt;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError, RedisFuture, RedisResult,
};
use tokio_util::sync::CancellationToken;

use crate::config::mask_password;

/// Where Redis is and how to log in: the URL, the ACL user and password
/// (from the URL or given apart), and for `rediss://` the certificates.
///
/// It prints (`{}` and `{:?}`) with the password masked, so a config that
/// holds one can be logged.
#[derive(Clone)]
pub struct Endpoint {
    url: String,
    /// Redis Cluster: `url` and these are seed nodes.
    cluster: Option<Vec<String>>,
    username: Option<String>,
    password: Option<String>,
    tls: Option<redis::TlsCertificates>,
    sharded_pubsub: bool,
}

/// PEM bytes for a TLS connection: the CA to trust instead of the system's,
/// and a client certificate and key for mutual TLS.
#[derive(Clone, Default)]
pub struct TlsFiles {
    pub ca: Option<Vec<u8>>,
    pub client_cert_and_key: Option<(Vec<u8>, Vec<u8>)>,
}

impl Endpoint {
    /// A server by URL: `redis://[user:pass@]host:port/db`, `rediss://…`
    /// for TLS, or `unix:///path`. Checked when connecting (or by
    /// [`Endpoint::check`]).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            cluster: None,
            username: None,
            password: None,
            tls: None,
            sharded_pubsub: false,
        }
    }

    /// A Redis Cluster, found through these seed nodes (URLs as for
    /// [`Endpoint::new`]; one is enough, the others are tried when it is down).
    pub fn cluster<S: Into<String>>(seeds: impl IntoIterator<Item = S>) -> Self {
        let seeds: Vec<String> = seeds.into_iter().map(Into::into).collect();
        let mut endpoint = Self::new(seeds.first().cloned().unwrap_or_default());
        endpoint.cluster = Some(seeds);
        endpoint
    }

    /// Sharded Pub/Sub (SSUBSCRIBE/SPUBLISH, Redis 7) instead of the classic
    /// SUBSCRIBE/PUBLISH.
    pub fn sharded_pubsub(mut self, sharded: bool) -> Self {
        self.sharded_pubsub = sharded;
        self
    }

    /// Whether this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Whether Pub/Sub is sharded.
    pub fn is_sharded(&self) -> bool {
        self.sharded_pubsub
    }

    /// The ACL user, overriding one in the URL.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    /// The password, overriding one in the URL.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// Certificates for a `rediss://` server.
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(redis::TlsCertificates {
            client_tls: files.client_cert_and_key.map(|(client_cert, client_key)| {
                redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }
            }),
            root_cert: files.ca,
        });
        self
    }

    /// Whether the URL asks for TLS.
    pub fn is_tls(&self) -> bool {
        self.url.trim_start().starts_with("rediss://")
    }

    /// The connection details, credentials applied.
    pub fn info(&self) -> RedisResult<ConnectionInfo> {
        let info = self.url.as_str().into_connection_info()?;
        let mut settings = info.redis_settings().clone();
        if let Some(username) = &self.username {
            settings = settings.set_username(username);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        Ok(info.set_redis_settings(settings))
    }

    /// A client for this server (no connection is made yet).
    pub fn client(&self) -> RedisResult<Client> {
        let info = self.info()?;
        match &self.tls {
            Some(certs) if self.is_tls() => Client::build_with_tls(info, certs.clone()),
            _ => Client::open(info),
        }
    }

    /// Checks the URL's form and the certificates, without connecting.
    pub fn check(&self) -> RedisResult<()> {
        self.client().map(drop)?;
        if self.is_cluster() {
            self.cluster_builder()?.build().map(drop)?;
        }
        Ok(())
    }

    /// A cluster client builder over the seed nodes, credentials and
    /// certificates applied (a subscription adds RESP3 and its push sender).
    pub fn cluster_builder(&self) -> RedisResult<ClusterClientBuilder> {
        let seeds = self
            .cluster
            .clone()
            .unwrap_or_else(|| vec![self.url.clone()]);
        let infos = seeds
            .iter()
            .map(|seed| {
                Endpoint {
                    url: seed.clone(),
                    ..self.clone()
                }
                .info()
            })
            .collect::<RedisResult<Vec<_>>>()?;
        let mut builder = ClusterClientBuilder::new(infos)
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(RESPONSE_TIMEOUT);
        if let Some(certs) = &self.tls
            && self.is_tls()
        {
            builder = builder.certs(certs.clone());
        }
        Ok(builder)
    }

    /// A cluster connection from `builder` (made by [`Endpoint::cluster_builder`]).
    ///
    /// The cluster client says why its first connection failed only in
    /// words, so a wrong password or certificate would look like an
    /// unreachable cluster and be retried for ever. When it fails, each seed
    /// is tried once as a single server with the same credentials and
    /// certificates, and an error retrying cannot mend ([`is_fatal`]) is
    /// returned in place of the cluster's.
    pub async fn connect_cluster(
        &self,
        builder: ClusterClientBuilder,
    ) -> RedisResult<ClusterConnection> {
        let err = match builder.build()?.get_async_connection().await {
            Ok(conn) => return Ok(conn),
            Err(err) => err,
        };
        for seed in self.cluster.iter().flatten() {
            let single = Endpoint {
                url: seed.clone(),
                cluster: None,
                ..self.clone()
            };
            if let Err(fatal) = open_single(&single).await
                && is_fatal(&fatal)
            {
                return Err(fatal);
            }
        }
        Err(err)
    }
}

/// A command connection to a single server or a cluster: the same commands
/// and scripts go through either (on a cluster, each to the shard of its
/// first key).
#[derive(Clone)]
pub enum Conn {
    /// One server, reconnecting by itself.
    Single(ConnectionManager),
    /// One server, one connection (a subscription's, which reconnects
    /// itself).
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Every key of a type (`SCAN … TYPE kind`), from every master on a
    /// cluster (each node SCANs only its own keys), in no order.
    pub async fn keys_of_type(&mut self, kind: &str) -> RedisResult<Vec<String>> {
        use redis::cluster_routing::{
            MultipleNodeRoutingInfo as Many, RoutingInfo, SingleNodeRoutingInfo as One,
        };
        let scan = |cursor: u64| {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor).arg("COUNT").arg(1000).arg("TYPE").arg(kind);
            cmd
        };
        let Conn::Cluster(cluster) = self else {
            let mut keys = Vec::new();
            let mut cursor = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = scan(cursor).query_async(self).await?;
                keys.extend(batch);
                if next == 0 {
                    return Ok(keys);
                }
                cursor = next;
            }
        };
        // The first page from all masters at once, answered per address;
        // then each node's cursor on that node.
        let first = cluster
            .route_command(scan(0), RoutingInfo::MultiNode((Many::AllMasters, None)))
            .await?;
        let mut keys = Vec::new();
        let pages: std::collections::HashMap<String, (u64, Vec<String>)> =
            redis::from_redis_value(first)?;
        for (address, (mut cursor, batch)) in pages {
            keys.extend(batch);
            let (host, port) = address
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
                .ok_or_else(|| {
                    RedisError::from((
                        ErrorKind::UnexpectedReturnType,
                        "cluster node address",
                        address.clone(),
                    ))
                })?;
            while cursor != 0 {
                let node = One::ByAddress {
                    host: host.clone(),
                    port,
                };
                let page = cluster
                    .route_command(scan(cursor), RoutingInfo::SingleNode(node))
                    .await?;
                let (next, batch): (u64, Vec<String>) = redis::from_redis_value(page)?;
                keys.extend(batch);
                cursor = next;
            }
        }
        Ok(keys)
    }
}

/// One attempt at a command connection, for a command that should fail
/// rather than wait: a plain connection to one server, or a cluster one.
pub async fn open(endpoint: &Endpoint) -> RedisResult<Conn> {
    if endpoint.is_cluster() {
        let conn = endpoint
            .connect_cluster(endpoint.cluster_builder()?)
            .await?;
        return Ok(Conn::Cluster(conn));
    }
    Ok(Conn::Plain(open_single(endpoint).await?))
}

/// One attempt at a plain connection to one server.
async fn open_single(endpoint: &Endpoint) -> RedisResult<MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    endpoint
        .client()?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// A command connection that reconnects by itself (a cluster connection
/// also follows the slots), waiting until Redis is reachable. Returns
/// `Ok(None)` when cancelled first, and an error only when it is [`is_fatal`].
pub async fn connection(
    endpoint: &Endpoint,
    cancel: &CancellationToken,
) -> Result<Option<Conn>, RedisError> {
    if !endpoint.is_cluster() {
        let client = endpoint.client()?;
        return Ok(connection_manager(&client, cancel).await?.map(Conn::Single));
    }
    let shown = endpoint.to_string();
    retry_until_connected(&shown, cancel, || async {
        endpoint.connect_cluster(endpoint.cluster_builder()?).await
    })
    .await
    .map(|c| c.map(Conn::Cluster))
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cluster {
            None => f.write_str(&mask_password(self.url.trim())),
            Some(seeds) => {
                let shown: Vec<String> = seeds.iter().map(|s| mask_password(s.trim())).collect();
                write!(f, "cluster {}", shown.join(","))
            }
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.to_string())
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// An error retrying cannot mend: the credentials or the permissions are
/// wrong, or TLS failed (a certificate not trusted or not accepted, a server
/// that does not speak TLS). Everything else (refused connections, dropped
/// connections, a loading or paused server, timeouts, out-of-memory) is
/// retried with backoff.
pub fn is_fatal(err: &RedisError) -> bool {
    err.kind() == ErrorKind::AuthenticationFailed
        || matches!(err.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        || tls_failure(err).is_some()
}

/// `err` as a user should read it: a TLS failure says so, and what to check.
pub fn explain(err: &RedisError) -> String {
    use rustls::{AlertDescription as Alert, Error as Tls};
    let Some(tls) = tls_failure(err) else {
        return err.to_string();
    };
    let hint = match tls {
        Tls::InvalidCertificate(_) | Tls::NoCertificatesPresented => {
            "the server's certificate is not vouched for by REDIS_TLS_CA_FILE (or the system's CAs), or does not name this host"
        }
        Tls::AlertReceived(
            Alert::UnknownCA
            | Alert::BadCertificate
            | Alert::CertificateRequired
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::AccessDenied,
        ) => "the server did not accept the client certificate (REDIS_TLS_CERT_FILE)",
        Tls::InvalidMessage(_) => "is the server speaking TLS on that port?",
        _ => "check the TLS settings",
    };
    format!("TLS handshake failed: {tls} ({hint})")
}

/// The TLS error behind `err`, if that is what it is. (redis keeps the I/O
/// error in an `Arc`, and `io::Error` hides what it wraps from `source()`,
/// so both are unwrapped by hand.)
pub fn tls_failure(err: &RedisError) -> Option<&rustls::Error> {
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(mut e) = next {
        if let Some(shared) = e.downcast_ref::<Shared>() {
            e = shared.as_ref();
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        next = wrapped.or_else(|| e.source());
    }
    None
}

/// The backoff between reconnection attempts: exponential from 100 ms to 5 s,
/// with jitter so that many workers do not knock at once, never giving up.
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// How long one command may take before it counts as failed. Long enough
/// for a `CLIENT PAUSE` of a few seconds to pass without errors.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A command connection that reconnects by itself, waiting until Redis is
/// reachable. Returns `Ok(None)` when cancelled first, and an error only when
/// it is [`is_fatal`].
pub async fn connection_manager(
    client: &Client,
    cancel: &CancellationToken,
) -> Result<Option<ConnectionManager>, RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_max_delay(Duration::from_secs(5))
        .set_number_of_retries(1);
    let shown = client.get_connection_info().addr().to_string();
    retry_until_connected(&shown, cancel, || {
        ConnectionManager::new_with_config(client.clone(), config.clone())
    })
    .await
}

/// Calls `connect` until it succeeds, backing off and saying so on stderr
/// while Redis is unreachable.
pub async fn retry_until_connected<T, F, Fut>(
    server: &str,
    cancel: &CancellationToken,
    mut connect: F,
) -> Result<Option<T>, RedisError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RedisError>>,
{
    let mut backoff = reconnect_backoff();
    loop {
        let err = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            result = connect() => match result {
                Ok(conn) => return Ok(Some(conn)),
                Err(err) => err,
            },
        };
        if is_fatal(&err) {
            return Err(err);
        }
        let wait = backoff.next().unwrap_or(Duration::from_secs(5));
        tracing::warn!(
            server = %server,
            cause = %err,
            retry_in_ms = wait.as_millis() as u64,
            "Redis unreachable, retrying"
        );
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
