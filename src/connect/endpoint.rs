//! [`Endpoint`]: where Redis is and how to log in (URL or cluster seeds, ACL
//! credentials, TLS certificates), printed with the password masked.

use std::fmt;
use std::time::Duration;

use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Client, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError, RedisResult};

use super::open::{RESPONSE_TIMEOUT, answers_plain_redis, open_single};
use super::retry::is_fatal;

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
    /// Redis Sentinel: `url` only carries the scheme and database; the
    /// primary's address is asked of the sentinels at each connection.
    sentinel: Option<Sentinel>,
}

/// The sentinels that name the primary, and their own credentials.
#[derive(Clone)]
struct Sentinel {
    /// `host:port` of each sentinel.
    addrs: Vec<String>,
    /// The primary's name among them (`sentinel monitor <name> …`).
    master: String,
    username: Option<String>,
    password: Option<String>,
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
            sentinel: None,
        }
    }

    /// The primary the sentinels at `addrs` (`host:port` each) know as
    /// `master`, in database `db`, over TLS when `tls`: every connection asks
    /// them where it is, so that connections follow a failover.
    pub fn sentinel<S: Into<String>>(
        addrs: impl IntoIterator<Item = S>,
        master: impl Into<String>,
        db: i64,
        tls: bool,
    ) -> Self {
        let scheme = if tls { "rediss" } else { "redis" };
        let mut endpoint = Self::new(format!("{scheme}://sentinel-primary/{db}"));
        endpoint.sentinel = Some(Sentinel {
            addrs: addrs.into_iter().map(Into::into).collect(),
            master: master.into(),
            username: None,
            password: None,
        });
        endpoint
    }

    /// The sentinels' own ACL user and password (REDIS_SENTINEL_USERNAME,
    /// REDIS_SENTINEL_PASSWORD), when they ask for one.
    pub fn sentinel_auth(mut self, username: Option<String>, password: Option<String>) -> Self {
        if let Some(sentinel) = &mut self.sentinel {
            sentinel.username = username;
            sentinel.password = password;
        }
        self
    }

    /// Whether the primary is found through sentinels.
    pub fn is_sentinel(&self) -> bool {
        self.sentinel.is_some()
    }

    /// `host:port` of a TCP server (a resolved primary), for comparing
    /// with what the sentinels name.
    pub fn address(&self) -> Option<String> {
        match self.info().ok()?.addr() {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => Some(format!("{host}:{port}")),
            _ => None,
        }
    }

    /// A client for each sentinel (their own credentials applied), and the
    /// primary's name among them. `None` unless this is a sentinel endpoint.
    pub(super) fn sentinel_clients(&self) -> Option<(Vec<RedisResult<Client>>, String)> {
        let sentinel = self.sentinel.as_ref()?;
        let clients = sentinel
            .addrs
            .iter()
            .map(|addr| {
                let info = format!("redis://{addr}").as_str().into_connection_info()?;
                let mut settings = info.redis_settings().clone();
                if let Some(username) = &sentinel.username {
                    settings = settings.set_username(username);
                }
                if let Some(password) = &sentinel.password {
                    settings = settings.set_password(password);
                }
                Client::open(info.set_redis_settings(settings))
            })
            .collect();
        Some((clients, sentinel.master.clone()))
    }

    /// The server to connect to now: for sentinels, the primary they name
    /// (the process's watch of them has the last word, so that all its
    /// connections agree; before its first answer, the redis crate's
    /// sentinel client asks them and checks the role); else this.
    /// (Boxed: every way of connecting awaits it, and the futures of a
    /// bridge are deep enough.)
    pub fn resolve(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = RedisResult<Endpoint>> + Send + '_>> {
        Box::pin(self.resolve_now())
    }

    async fn resolve_now(&self) -> RedisResult<Endpoint> {
        let Some(sentinel) = &self.sentinel else {
            return Ok(self.clone());
        };
        let watched = super::follow::primary_watch(self).and_then(|w| w.borrow().clone());
        if let Some(address) = watched {
            return Ok(self.primary_at(&address));
        }
        let addrs = sentinel
            .addrs
            .iter()
            .map(|addr| {
                let info = format!("redis://{addr}").as_str().into_connection_info()?;
                Ok(info.addr().clone())
            })
            .collect::<RedisResult<Vec<_>>>()?;
        let db = self.info()?.redis_settings().db();
        let mut builder = redis::sentinel::SentinelClientBuilder::new(
            addrs,
            &sentinel.master,
            redis::sentinel::SentinelServerType::Master,
        )?
        .set_client_to_redis_db(db);
        if let Some(username) = &self.username {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = &self.password {
            builder = builder.set_client_to_redis_password(password);
        }
        if self.is_tls() {
            builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            if let Some(certs) = &self.tls {
                builder = builder.set_client_to_redis_certificates(certs.clone());
            }
        }
        if let Some(username) = &sentinel.username {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = &sentinel.password {
            builder = builder.set_client_to_sentinel_password(password);
        }
        let client = builder.build()?.async_get_client().await?;
        let (host, port) = match client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port),
            other => {
                return Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "the sentinels named an address that is not TCP",
                    other.to_string(),
                )));
            }
        };
        Ok(self.primary_at(&format!("{host}:{port}")))
    }

    /// The server at `address` (`host:port`) as this sentinel endpoint's
    /// primary (or this cluster's node): its credentials, TLS and database.
    fn primary_at(&self, address: &str) -> Endpoint {
        let scheme = if self.is_tls() { "rediss" } else { "redis" };
        let db = self.info().map_or(0, |info| info.redis_settings().db());
        Endpoint {
            url: format!("{scheme}://{address}/{db}"),
            sentinel: None,
            cluster: None,
            ..self.clone()
        }
    }

    /// On a cluster, the master that serves `key`'s slot now, as a server
    /// of its own (credentials and TLS kept), asked of the cluster through
    /// `conn` (CLUSTER SLOTS, from any node the client knows).
    pub async fn slot_owner(&self, conn: &mut super::Conn, key: &str) -> RedisResult<Endpoint> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
        let super::Conn::Cluster(cluster) = conn else {
            return self.resolve().await;
        };
        let of_key = Slot::for_key(key);
        let slot = (0..16_384u16)
            .find(|n| Slot::new(*n) == Some(of_key))
            .map_or(0, i64::from);
        let slots = cluster
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let owner = match slots {
            redis::Value::Array(ranges) => ranges.into_iter().find_map(|range| {
                let redis::Value::Array(parts) = range else {
                    return None;
                };
                let (start, end) = (int_of(parts.first()?)?, int_of(parts.get(1)?)?);
                if !(start..=end).contains(&slot) {
                    return None;
                }
                let redis::Value::Array(master) = parts.get(2)? else {
                    return None;
                };
                let host = match master.first()? {
                    redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    redis::Value::SimpleString(text) => text.clone(),
                    _ => return None,
                };
                let port = int_of(master.get(1)?)?;
                (!host.is_empty() && host != "?").then(|| format!("{host}:{port}"))
            }),
            _ => None,
        };
        let owner = owner.ok_or_else(|| {
            RedisError::from((
                ErrorKind::ClusterConnectionNotFound,
                "no master serves the slot now",
                format!("slot {slot} of {key}"),
            ))
        })?;
        Ok(self.primary_at(&owner))
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

/// An integer of a RESP reply.
fn int_of(value: &redis::Value) -> Option<i64> {
    match value {
        redis::Value::Int(n) => Some(*n),
        _ => None,
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
        if self.is_sentinel() {
            let primary = tokio::time::timeout(Duration::from_secs(5), self.resolve())
                .await
                .map_err(|_| {
                    RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the sentinels did not answer",
                    ))
                })??;
            return Box::pin(primary.open_stream()).await;
        }
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
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(sentinel) = &self.sentinel {
            return write!(
                f,
                "sentinels {} (primary {})",
                sentinel.addrs.join(","),
                sentinel.master
            );
        }
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

/// `url` with any password replaced by `***`, for logs and errors.
pub fn mask_password(url: &str) -> String {
    // Several seeds: each masked. A password may hold an unencoded `/`, so
    // the user part ends at a seed's last `@` (a Redis URL's path is a
    // database number, never an `@`).
    if url.contains(',') {
        return url
            .split(',')
            .map(mask_password)
            .collect::<Vec<_>>()
            .join(",");
    }
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let masked = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None => "***".to_string(),
    };
    format!("{}{}{}", &url[..scheme_end + 3], masked, &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_seed_s_password_and_slashes_in_one() {
        assert_eq!(
            mask_password("redis://:s3cret@h1:7000,redis://:s3cret@h2:70000"),
            "redis://:***@h1:7000,redis://:***@h2:70000"
        );
        assert_eq!(
            mask_password("redis://:ab/cd@h:6379/0"),
            "redis://:***@h:6379/0"
        );
    }

    #[test]
    fn masks_passwords_in_urls() {
        assert_eq!(
            mask_password("redis://user:secret@host:1/0"),
            "redis://user:***@host:1/0"
        );
        assert_eq!(mask_password("redis://:secret@host"), "redis://:***@host");
        assert_eq!(mask_password("redis://host:6379"), "redis://host:6379");
        assert_eq!(mask_password("unix:///tmp/r.sock"), "unix:///tmp/r.sock");
    }
}
