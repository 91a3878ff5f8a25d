//! The speed layer's connection: one Redis (`redis://`, `unix://`) or a Redis Cluster
//! (`redis+cluster://host:port[,host:port…]`).
//!
//! Every key the speed layer writes carries the same hash tag in cluster mode (`Keys`' prefix,
//! chosen by the caller), so all of one speed state lives in one slot: each compare-and-set
//! write (`WATCH`, then `MULTI`/`EXEC`) runs on the one master that owns it, over the cluster
//! client's connection to that master, as it does on a single Redis. Load spreads across the
//! masters by speed state — one per tally node in cluster mode — not within one.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// The scheme that names a Redis Cluster.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// The seed nodes of a `redis+cluster://` URL as `redis://` URLs; `None` for any other URL.
pub fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let rest = url.strip_prefix(CLUSTER_SCHEME)?;
    Some(
        rest.split(',')
            .map(|h| h.trim().trim_start_matches(CLUSTER_SCHEME))
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{h}"))
            .collect(),
    )
}

/// A connection to the speed layer's Redis. Cheap to clone; reconnects by itself.
#[derive(Clone)]
pub enum SpeedConn {
    Single(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// A Redis Cluster connection made on first use (and again after a failed attempt), so that a
/// cluster down at start-up is a Redis outage like any other, not a start-up failure.
pub struct LazyCluster {
    client: ClusterClient,
    conn: tokio::sync::Mutex<Option<ClusterConnection>>,
}

impl LazyCluster {
    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self.client.get_async_connection().await?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

impl SpeedConn {
    /// Opens (lazily) the Redis or Redis Cluster `url` names.
    pub fn open(url: &str) -> redis::RedisResult<SpeedConn> {
        let connect = Duration::from_secs(1);
        let respond = Duration::from_secs(30);
        if let Some(nodes) = cluster_nodes(url) {
            let client = ClusterClient::builder(nodes)
                .connection_timeout(connect)
                .response_timeout(respond)
                .retries(1)
                .build()?;
            return Ok(SpeedConn::Cluster(Arc::new(LazyCluster {
                client,
                conn: tokio::sync::Mutex::new(None),
            })));
        }
        let client = redis::Client::open(url)?;
        let cfg = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1))
            .set_connection_timeout(Some(connect))
            .set_response_timeout(Some(respond));
        Ok(SpeedConn::Single(ConnectionManager::new_lazy_with_config(
            client, cfg,
        )?))
    }
}

impl ConnectionLike for SpeedConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            SpeedConn::Single(c) => c.req_packed_command(cmd),
            SpeedConn::Cluster(c) => Box::pin(async move {
                let mut conn = c.get().await?;
                conn.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            SpeedConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            SpeedConn::Cluster(c) => Box::pin(async move {
                let mut conn = c.get().await?;
                conn.req_packed_commands(cmd, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            SpeedConn::Single(c) => c.get_db(),
            SpeedConn::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_url_lists_its_seed_nodes() {
        assert_eq!(
            cluster_nodes("redis+cluster://a:7000,b:7001, c:7002"),
            Some(vec![
                "redis://a:7000".to_string(),
                "redis://b:7001".to_string(),
                "redis://c:7002".to_string()
            ])
        );
        assert_eq!(cluster_nodes("redis://a:6379/0"), None);
    }
}
