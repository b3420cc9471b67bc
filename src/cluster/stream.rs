//! A node's own Redis stream, read through a consumer group: first what was delivered before a
//! restart and never acknowledged, then new entries (blocking up to a second); the caller
//! handles a batch, then acknowledges and deletes it. Used by the forwarded publications
//! (`fwd:{node}`) and the spanning rules' events (`rules:{node}`).

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::{StreamId, StreamReadReply};

use super::Cluster;

/// The consumer group every node reads its streams with.
const GROUP: &str = "drover";
/// Entries read at once.
const BATCH: usize = 512;

pub(super) struct StreamConsumer {
    client: redis::Client,
    lease: Duration,
    stream: String,
    consumer: String,
    conn: Option<ConnectionManager>,
    /// "0": the backlog of unacknowledged entries; ">": new ones.
    cursor: &'static str,
}

impl StreamConsumer {
    /// The stream `name` (under the cluster's key prefix), read as this node.
    pub(super) fn new(cluster: &Cluster, name: &str) -> StreamConsumer {
        StreamConsumer {
            client: cluster.client.clone(),
            lease: cluster.lease,
            stream: cluster.key(name),
            consumer: cluster.node_id.clone(),
            conn: None,
            cursor: "0",
        }
    }

    /// The next entries (none once the backlog is done or nothing came within a second).
    /// On an error the caller reports Redis down and waits the duration returned; the next
    /// call connects again and creates the group (the stream is gone when Redis restarted
    /// empty).
    pub(super) async fn read(&mut self) -> Result<Vec<StreamId>, (redis::RedisError, Duration)> {
        if self.conn.is_none() {
            let config = super::manager_config(self.lease).set_response_timeout(Duration::from_secs(5));
            let mut conn = ConnectionManager::new_with_config(self.client.clone(), config)
                .await
                .map_err(|e| (e, Duration::from_secs(1)))?;
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&self.stream)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            if let Err(error) = created
                && error.code() != Some("BUSYGROUP")
            {
                return Err((error, Duration::from_secs(1)));
            }
            self.conn = Some(conn);
            self.cursor = "0";
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Vec::new());
        };
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(BATCH);
        if self.cursor == ">" {
            read.arg("BLOCK").arg(1000);
        }
        read.arg("STREAMS").arg(&self.stream).arg(self.cursor);
        let reply: Option<StreamReadReply> = match read.query_async(conn).await {
            Ok(reply) => reply,
            Err(error) => {
                self.conn = None;
                return Err((error, Duration::from_millis(500)));
            }
        };
        let entries: Vec<StreamId> = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        if entries.is_empty() {
            // The backlog of unacknowledged entries is done: block for new ones.
            self.cursor = ">";
        }
        Ok(entries)
    }

    /// Acknowledges and deletes the entries `ids`, handled.
    pub(super) async fn done(&mut self, ids: &[String]) -> Result<(), redis::RedisError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(&self.stream).arg(GROUP).arg(ids).ignore();
        pipe.cmd("XDEL").arg(&self.stream).arg(ids).ignore();
        let result = pipe.query_async::<()>(conn).await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}
