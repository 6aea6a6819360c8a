//! The one way to open each kind of command connection: [`open`] (one
//! attempt, for a command that should fail rather than wait), [`connection`]
//! and [`connection_manager`] (waiting until Redis is reachable, then
//! reconnecting by themselves), [`managed`] (one attempt at a reconnecting
//! one). Subscriptions open their own byte stream ([`Endpoint::stream`]).

use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, RedisError, RedisFuture, RedisResult};
use tokio_util::sync::CancellationToken;

use super::endpoint::Endpoint;
use super::follow::Following;
use super::retry::{MAX_BACKOFF, retry_until_connected};

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
    /// The primary Redis Sentinel names, following a failover.
    Following(Following),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Following(c) => c.req_packed_command(cmd),
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
            Conn::Following(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Following(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// A pipeline sent as one request on one connection to the server that
    /// holds `key` (on a cluster, the master of its slot). A WAIT at its
    /// end counts the replicas that hold the writes before it in the same
    /// pipeline: were the request sent again on a new connection (the
    /// client reconnects by itself), the writes go again with it, so the
    /// WAIT never stands alone on a connection that wrote nothing.
    pub async fn query_at<T: redis::FromRedisValue>(
        &mut self,
        key: &str,
        pipe: &redis::Pipeline,
    ) -> RedisResult<T> {
        use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
        match self {
            Conn::Cluster(cluster) => {
                let route =
                    SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master));
                let values = cluster
                    .route_pipeline(pipe.clone(), 0, pipe.len(), route)
                    .await?
                    .into_iter()
                    .map(redis::Value::extract_error)
                    .collect::<RedisResult<Vec<_>>>()?;
                Ok(redis::from_redis_value(redis::Value::Array(values))?)
            }
            _ => pipe.query_async(self).await,
        }
    }

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
pub(super) async fn open_single(endpoint: &Endpoint) -> RedisResult<MultiplexedConnection> {
    let endpoint = &endpoint.resolve().await?;
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
pub(super) async fn answers_plain_redis(host: &str, port: u16) -> bool {
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
    let shown = endpoint.to_string();
    if endpoint.is_sentinel() {
        return retry_until_connected(&shown, cancel, || Following::connect(endpoint))
            .await
            .map(|c| c.map(Conn::Following));
    }
    if !endpoint.is_cluster() {
        return Ok(connection_manager(endpoint, cancel)
            .await?
            .map(Conn::Single));
    }
    retry_until_connected(&shown, cancel, || async {
        endpoint.connect_cluster(endpoint.cluster_builder()?).await
    })
    .await
    .map(|c| c.map(Conn::Cluster))
}

/// How long one command may take before it counts as failed. Long enough
/// for a `CLIENT PAUSE` of a few seconds to pass without errors.
pub(super) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// One attempt at a command connection that reconnects by itself once made
/// (as [`connection`]'s): a cluster's follows its slots, a sentinel's its
/// primary.
pub async fn managed(endpoint: &Endpoint) -> RedisResult<Conn> {
    if endpoint.is_cluster() {
        let builder = endpoint.cluster_builder()?;
        return Ok(Conn::Cluster(endpoint.connect_cluster(builder).await?));
    }
    if endpoint.is_sentinel() {
        return Ok(Conn::Following(Following::connect(endpoint).await?));
    }
    match ConnectionManager::new_with_config(endpoint.client()?, manager_config()).await {
        Ok(conn) => Ok(Conn::Single(conn)),
        Err(err) => Err(endpoint.diagnose(err).await),
    }
}

pub(super) fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_max_delay(MAX_BACKOFF)
        .set_number_of_retries(0)
}
