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
    /// When a `rediss://` connection fails without a TLS error of its own (a
    /// plain server reads the TLS greeting as the start of a command and
    /// waits, so the attempt times out), asks the port in plain text: a
    /// Redis server that answers is not speaking TLS, which retrying cannot
    /// mend. Returns that finding as a fatal error, or `err` as it was.
    pub async fn diagnose(&self, err: RedisError) -> RedisError {
        if !self.is_tls() || is_fatal(&err) || !(err.is_timeout() || err.is_io_error()) {
            return err;
        }
        let Ok(info) = self.info() else { return err };
        let redis::ConnectionAddr::TcpTls { host, port, .. } = info.addr() else {
            return err;
        };
        if !answers_plain_redis(host, *port).await {
            return err;
        }
        RedisError::from((
            ErrorKind::InvalidClientConfig,
            "TLS",
            format!(
                "TLS handshake failed: {host}:{port} answers plain Redis, not TLS (use redis://, or turn TLS on in the server)"
            ),
        ))
    }

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

/// A byte stream to one server: TCP, TLS over TCP, or a unix socket.
pub trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Transport for T {}

impl Endpoint {
    /// A raw byte stream to the server (one server, not a cluster), TLS
    /// applied, for a connection that speaks RESP itself (the subscription's
    /// reader). Fails after 5 s.
    pub async fn open_stream(&self) -> RedisResult<Box<dyn Transport>> {
        let opened = tokio::time::timeout(Duration::from_secs(5), self.open_stream_now()).await;
        match opened {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(err)) => Err(self.diagnose(err).await),
            Err(_) => {
                let err = RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting timed out",
                ));
                Err(self.diagnose(err).await)
            }
        }
    }

    async fn open_stream_now(&self) -> RedisResult<Box<dyn Transport>> {
        use redis::ConnectionAddr;
        let info = self.info()?;
        match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                tcp.set_nodelay(true)?;
                Ok(Box::new(tcp))
            }
            ConnectionAddr::TcpTls { host, port, .. } => {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| {
                    RedisError::from((
                        ErrorKind::InvalidClientConfig,
                        "TLS",
                        format!("{host} is not a name a certificate can carry"),
                    ))
                })?;
                let connector =
                    tokio_rustls::TlsConnector::from(std::sync::Arc::new(self.tls_config()?));
                Ok(Box::new(connector.connect(name, tcp).await?))
            }
            ConnectionAddr::Unix(path) => {
                Ok(Box::new(tokio::net::UnixStream::connect(path).await?))
            }
            other => Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "unsupported address",
                other.to_string(),
            ))),
        }
    }

    /// The TLS client settings: the CA file's certificates (or the
    /// system's), and the client certificate when there is one.
    fn tls_config(&self) -> RedisResult<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str, err: String| {
            RedisError::from((
                ErrorKind::InvalidClientConfig,
                "TLS",
                format!("{what}: {err}"),
            ))
        };
        let mut roots = rustls::RootCertStore::empty();
        match self.tls.as_ref().and_then(|t| t.root_cert.as_ref()) {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| bad("REDIS_TLS_CA_FILE", e.to_string()))?;
                    roots
                        .add(cert)
                        .map_err(|e| bad("REDIS_TLS_CA_FILE", e.to_string()))?;
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("TLS versions", e.to_string()))?
            .with_root_certificates(roots);
        match self.tls.as_ref().and_then(|t| t.client_tls.as_ref()) {
            None => Ok(builder.with_no_client_auth()),
            Some(client) => {
                let certs = CertificateDer::pem_slice_iter(&client.client_cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad("REDIS_TLS_CERT_FILE", e.to_string()))?;
                let key = PrivateKeyDer::from_pem_slice(&client.client_key)
                    .map_err(|e| bad("REDIS_TLS_KEY_FILE", e.to_string()))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| bad("REDIS_TLS_CERT_FILE", e.to_string()))
            }
        }
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
    match endpoint
        .client()?
        .get_multiplexed_async_connection_with_config(&config)
        .await
    {
        Ok(conn) => Ok(conn),
        Err(err) => Err(endpoint.diagnose(err).await),
    }
}

/// Whether something at `host:port` answers a plain-text PING the way a
/// Redis server does (`+PONG`, or an error reply such as `-NOAUTH`).
async fn answers_plain_redis(host: &str, port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut reply = [0u8; 1];
        let n = stream.read(&mut reply).await.ok()?;
        Some(n == 1 && matches!(reply[0], b'+' | b'-'))
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// A command connection that reconnects by itself (a cluster connection
/// also follows the slots), waiting until Redis is reachable. Returns
/// `Ok(None)` when cancelled first, and an error only when it is [`is_fatal`].
pub async fn connection(
    endpoint: &Endpoint,
    cancel: &CancellationToken,
) -> Result<Option<Conn>, RedisError> {
    if !endpoint.is_cluster() {
        return Ok(connection_manager(endpoint, cancel)
            .await?
            .map(Conn::Single));
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
/// wrong (also inside a pipeline's replies), TLS failed (a certificate not
/// trusted or not accepted, a server that does not speak TLS), the peer does
/// not speak the Redis protocol, the database does not exist, or the client
/// settings cannot work. Everything else (refused connections, dropped
/// connections, a loading or paused server, timeouts, out-of-memory) is
/// retried with backoff.
pub fn is_fatal(err: &RedisError) -> bool {
    matches!(
        err.kind(),
        ErrorKind::AuthenticationFailed
            | ErrorKind::Parse
            | ErrorKind::InvalidClientConfig
            | ErrorKind::RESP3NotSupported
    ) || has_code(err, |code| {
        matches!(code, "NOAUTH" | "WRONGPASS" | "NOPERM")
    }) || err.detail().is_some_and(|d| {
        // A server that wants a password refuses long commands from a
        // client that gave none, with this protocol error.
        d.contains("DB index is out of range") || d.contains("Protocol error: unauthenticated")
    }) || tls_failure(err).is_some()
}

/// Whether the server's error (or one of a pipeline's) has a code `is`
/// takes.
pub fn has_code(err: &RedisError, is: impl Fn(&str) -> bool) -> bool {
    err.code().is_some_and(&is)
        || err
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| is(e.code())))
}

/// Longest error text a log line or an error line carries.
const MAX_ERROR_TEXT: usize = 240;

/// `err` as a user should read it, on one short line: a TLS failure says so,
/// and what to check; a peer that is not Redis, or a missing database, says
/// so; a pipeline's failures are shown by their first one.
pub fn explain(err: &RedisError) -> String {
    let text = match tls_failure(err) {
        Some(tls) => explain_tls(tls),
        None if err.kind() == ErrorKind::Parse => format!(
            "the server's reply is not the Redis protocol: is this a Redis port? ({err})"
        ),
        None if err.detail().is_some_and(|d| d.contains("DB index is out of range")) => {
            "no such database on that server (the number after the host in REDIS_URL is beyond its `databases` setting)".to_string()
        }
        None if err.kind() == ErrorKind::InvalidClientConfig && err.detail().is_some() => {
            err.detail().unwrap_or_default().to_string()
        }
        None => match err.clone().into_server_errors() {
            Some(errors) if !errors.is_empty() => {
                let (_, first) = &errors[0];
                let more = match errors.len() - 1 {
                    0 => String::new(),
                    n => format!(" (and {n} more replies of the pipeline)"),
                };
                format!("{} {}{more}", first.code(), first.details().unwrap_or(""))
            }
            _ => err.to_string(),
        },
    };
    short(&text)
}

/// `text` on one line, at most [`MAX_ERROR_TEXT`] characters.
fn short(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(MAX_ERROR_TEXT) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// A Redis error for a log field: [`explain`]ed, so one short line.
pub fn brief(err: &RedisError) -> impl fmt::Display + '_ {
    struct Brief<'a>(&'a RedisError);
    impl fmt::Display for Brief<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&explain(self.0))
        }
    }
    Brief(err)
}

fn explain_tls(tls: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, Error as Tls};
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

/// Warns, in one line, when the server may evict keys under memory
/// pressure (`maxmemory-policy` `allkeys-*` or `volatile-*`): it could drop
/// the stream, or the keys the delivery protocol relies on, and so lose or
/// duplicate messages. optimus needs `noeviction`. Says nothing when the
/// server will not tell (an ACL user without CONFIG or INFO).
pub async fn warn_if_evicting<C: ConnectionLike + Send>(conn: &mut C, what: &str) {
    let policy = match redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async::<Vec<String>>(conn)
        .await
    {
        Ok(pair) => pair.get(1).cloned(),
        Err(_) => redis::cmd("INFO")
            .arg("memory")
            .query_async::<String>(conn)
            .await
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("maxmemory_policy:"))
                    .map(|p| p.trim().to_string())
            }),
    };
    if let Some(policy) = policy
        && (policy.starts_with("allkeys-") || policy.starts_with("volatile-"))
    {
        tracing::warn!(
            "maxmemory-policy is {policy}: under memory pressure Redis may evict {what}, losing or duplicating messages; optimus needs maxmemory-policy noeviction"
        );
    }
}

/// The longest wait between two reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The backoff between reconnection attempts: exponential from 100 ms up,
/// never above [`MAX_BACKOFF`], never giving up. Each wait is a base delay
/// (doubling, up to half the maximum) plus a random jitter of up to that
/// base again, so that many workers do not knock at once.
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(MAX_BACKOFF / 2)
        .with_jitter()
        .without_max_times()
        .build()
        .map(|wait| wait.min(MAX_BACKOFF))
}

/// Connection attempts that failed, process-wide (every kind of connection:
/// commands, subscriptions, one-shot commands); exported as a metric.
pub static CONNECT_FAILURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts a failed attempt to reach Redis (`optimus_connect_failures_total`).
pub fn count_connect_failure() {
    CONNECT_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// How long one command may take before it counts as failed. Long enough
/// for a `CLIENT PAUSE` of a few seconds to pass without errors.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A command connection that reconnects by itself, waiting until Redis is
/// reachable. Returns `Ok(None)` when cancelled first, and an error only when
/// it is [`is_fatal`].
pub async fn connection_manager(
    endpoint: &Endpoint,
    cancel: &CancellationToken,
) -> Result<Option<ConnectionManager>, RedisError> {
    let config = manager_config();
    let client = endpoint.client()?;
    let shown = endpoint.to_string();
    retry_until_connected(&shown, cancel, || async {
        match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
            Ok(conn) => Ok(conn),
            Err(err) => Err(endpoint.diagnose(err).await),
        }
    })
    .await
}

/// One attempt at a command connection to one server that reconnects by
/// itself once made (as [`connection_manager`]'s).
pub async fn managed(endpoint: &Endpoint) -> RedisResult<Conn> {
    let client = endpoint.client()?;
    ConnectionManager::new_with_config(client, manager_config())
        .await
        .map(Conn::Single)
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_max_delay(MAX_BACKOFF)
        .set_number_of_retries(0)
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
    Fut: Future<Output = Result<T, RedisError>>,
{
    let counted = || {
        let attempt = connect();
        async {
            let result = attempt.await;
            if result.is_err() {
                count_connect_failure();
            }
            result
        }
    };
    retry_until(cancel, counted, |err, wait| {
        tracing::warn!(
            server = %server,
            cause = %brief(err),
            retry_in_ms = wait.as_millis() as u64,
            "Redis unreachable, retrying"
        )
    })
    .await
}

/// Calls `step` until it succeeds: an error retrying cannot mend (see
/// [`is_fatal`]) is returned, any other is passed to `on_retry` with the
/// wait before the next attempt (backing off, with jitter). `None` when
/// cancelled first.
pub async fn retry_until<T, F, Fut>(
    cancel: &CancellationToken,
    mut step: F,
    on_retry: impl Fn(&RedisError, Duration),
) -> Result<Option<T>, RedisError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RedisError>>,
{
    let mut backoff = reconnect_backoff();
    loop {
        let err = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            result = step() => match result {
                Ok(done) => return Ok(Some(done)),
                Err(err) => err,
            },
        };
        if is_fatal(&err) {
            return Err(err);
        }
        let wait = backoff.next().unwrap_or(MAX_BACKOFF);
        on_retry(&err, wait);
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
