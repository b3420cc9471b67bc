//! Cluster mode: several nodes over shared PostgreSQL, InfluxDB and Redis, with no consensus
//! protocol of their own (DESIGN.md §9). Everything the nodes share in Redis lives under
//! `drover:{CLUSTER_NAME}:`:
//!
//! - `node:{id}`: each node's heartbeat (its advertisement, with a TTL), listed in `nodes`.
//! - `owner:{ns}:{device}`: the lease of the node that hosts a device's actor and session, with
//!   a fencing counter `fence:{ns}:{device}`; a connection arriving elsewhere asks the owner to
//!   hand over on `control:{id}` (see [`ownership`]).
//! - `routes:{id}`: the filters a node's sessions hold; changes announced on `routes`.
//! - `fwd:{id}`: the stream of publications forwarded to a node (consumer group, XACK).
//! - `retained:{ns}`: retained messages, for nodes that join later.
//! - `handoff:{ns}:{client}`, `session-handoff:{ns}:{class}:{client}`: a session on its way
//!   from one live node to another.
//! - `session:{ns}:{class}:{client}`, `sq:{ns}:{class}:{client}`: persistent sessions and the
//!   messages promised to them, written through (see [`sessions`]).
//! - `lease:rules:{tenant}`: the node judging a tenant's group and absence rules, fed through
//!   its stream `rules:{id}` (see [`spanning`]).

pub mod leases;
pub mod live;
pub mod notices;
pub mod ownership;
pub mod routes;
pub mod sessions;
pub mod spanning;
mod stream;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drover_actors::Fleet;
use parking_lot::{Mutex, RwLock};
use prometheus::{IntCounterVec, IntGauge, Opts};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use crate::config::ClusterConfig;
use crate::dashboard::DashboardHub;
use crate::metrics::Metrics;
use crate::mqtt::broker::Broker;
use crate::mqtt::connection::MqttContext;

/// How long the routes of a node that died are kept (see [`Cluster::forget_node_later`]).
pub const DEAD_NODE_ROUTES_KEPT: Duration = Duration::from_secs(120);

/// Why a node could not join its cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster mode needs Redis (REDIS_URL): {0}")]
    Redis(#[from] redis::RedisError),
    #[error("node id {0:?} (CLUSTER_NODE_ID) is in use by a running node of this cluster")]
    NodeIdInUse(String),
}

/// What a node tells the others about itself, renewed with every heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeAdvert {
    pub node: String,
    pub http: String,
    pub mqtt: String,
    pub version: String,
    /// Unix milliseconds.
    pub started_at: i64,
    /// Unix milliseconds of this heartbeat.
    pub heartbeat_at: i64,
    pub connections: usize,
    pub sessions: usize,
    pub owned_devices: usize,
    /// `/ws` sessions of this node.
    #[serde(default)]
    pub live_sessions: usize,
    /// Tenants whose live telemetry a session of this node watches.
    #[serde(default)]
    pub watched_tenants: Vec<String>,
    /// Distinguishes two processes that were given the same node id.
    pub incarnation: String,
}

/// Counters of the cluster layer, in `/metrics`.
#[derive(Clone)]
pub struct ClusterMetrics {
    /// Publications forwarded to other nodes, by outcome (sent, dropped, failed).
    pub forwarded: IntCounterVec,
    /// Publications received from other nodes.
    pub received: prometheus::IntCounter,
    /// Device sessions taken over, by direction (in, out) and how (handover, expired).
    pub takeovers: IntCounterVec,
    /// Other live nodes seen at the last heartbeat.
    pub peers: IntGauge,
    /// 1 while Redis answers, 0 while the node serves alone.
    pub redis_up: IntGauge,
    /// Writes of persistent sessions to Redis by outcome (written, failed, skipped).
    pub session_writes: IntCounterVec,
    /// Persistent sessions resumed here that this node did not hold, by where from (node:
    /// handed over by a live node; redis: the stored copy).
    pub sessions_resumed: IntCounterVec,
}

impl ClusterMetrics {
    fn new(metrics: &Metrics) -> ClusterMetrics {
        let forwarded = IntCounterVec::new(
            Opts::new(
                "drover_cluster_forwarded_total",
                "Publications forwarded to other nodes by outcome (sent, dropped, failed)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let received = prometheus::IntCounter::new(
            "drover_cluster_received_total",
            "Publications received from other nodes",
        )
        .expect("valid metric");
        let takeovers = IntCounterVec::new(
            Opts::new(
                "drover_cluster_takeovers_total",
                "Device sessions moved between nodes by direction (in, out) and how (handover, expired)",
            ),
            &["direction", "how"],
        )
        .expect("valid metric");
        let peers =
            IntGauge::new("drover_cluster_peers", "Other live nodes of the cluster").expect("valid metric");
        let redis_up = IntGauge::new("drover_cluster_redis_up", "1 while the cluster's Redis answers")
            .expect("valid metric");
        metrics.register(Box::new(forwarded.clone()));
        metrics.register(Box::new(received.clone()));
        metrics.register(Box::new(takeovers.clone()));
        metrics.register(Box::new(peers.clone()));
        metrics.register(Box::new(redis_up.clone()));
        let session_writes = IntCounterVec::new(
            Opts::new(
                "drover_cluster_session_writes_total",
                "Writes of persistent MQTT sessions to Redis by outcome (written, failed, skipped)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let sessions_resumed = IntCounterVec::new(
            Opts::new(
                "drover_cluster_sessions_resumed_total",
                "Persistent MQTT sessions resumed on this node from elsewhere (node: handed over; redis: the stored copy)",
            ),
            &["from"],
        )
        .expect("valid metric");
        metrics.register(Box::new(session_writes.clone()));
        metrics.register(Box::new(sessions_resumed.clone()));
        ClusterMetrics {
            session_writes,
            sessions_resumed,
            forwarded,
            received,
            takeovers,
            peers,
            redis_up,
        }
    }
}

/// This node's membership of a cluster. Cheap to share (`Arc`).
pub struct Cluster {
    pub node_id: String,
    prefix: String,
    lease: Duration,
    client: redis::Client,
    conn: ConnectionManager,
    broker: Arc<Broker>,
    fleet: Fleet,
    /// This node's live stream (frames from other nodes go there).
    hub: DashboardHub,
    live: std::sync::OnceLock<tokio::sync::mpsc::Sender<live::Frame>>,
    /// What other nodes' notices about rules and device types are handed to.
    notice_hook: std::sync::OnceLock<notices::NoticeHook>,
    /// What notices from other nodes act on (access rules, CAs).
    ctx: std::sync::Weak<MqttContext>,
    advert: Mutex<NodeAdvert>,
    /// Live nodes (this one included) as of the last heartbeat.
    peers: RwLock<HashMap<String, NodeAdvert>>,
    routes: routes::RouteTable,
    owned: ownership::Owned,
    sessions: sessions::SessionStore,
    redis_up: AtomicBool,
    heartbeats: AtomicU64,
    pub metrics: ClusterMetrics,
    started: Instant,
}

/// Connections that fail fast while Redis is away, so callers fall back to serving alone.
fn manager_config(lease: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_number_of_retries(1)
        .set_max_delay(500)
        .set_connection_timeout(Duration::from_secs(1))
        .set_response_timeout(lease.min(Duration::from_secs(3)))
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Cluster {
    /// Joins the cluster: registers this node, clears what an earlier run of it left (its
    /// routes), loads retained messages and starts heartbeats, route sync, the forwarder, the
    /// stream consumer and the control listener.
    pub async fn join(
        config: &ClusterConfig,
        redis_url: &str,
        http: SocketAddr,
        mqtt: SocketAddr,
        metrics: &Metrics,
        ctx: &Arc<MqttContext>,
        hub: &DashboardHub,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let client = redis::Client::open(redis_url)?;
        let lease = Duration::from_secs(config.lease_secs);
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config(lease)).await?;
        let prefix = format!("drover:{}", config.name);
        let host = if config.advertise_host.is_empty() {
            hostname()
        } else {
            config.advertise_host.clone()
        };
        let incarnation = uuid::Uuid::new_v4().simple().to_string();
        let advert = NodeAdvert {
            node: config.node_id.clone(),
            http: format!("{host}:{}", http.port()),
            mqtt: format!("{host}:{}", mqtt.port()),
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: now_ms(),
            heartbeat_at: now_ms(),
            connections: 0,
            sessions: 0,
            owned_devices: 0,
            live_sessions: 0,
            watched_tenants: Vec::new(),
            incarnation,
        };
        let cluster = Arc::new(Cluster {
            node_id: config.node_id.clone(),
            prefix,
            lease,
            client,
            conn,
            broker: ctx.broker.clone(),
            fleet: ctx.fleet.clone(),
            ctx: Arc::downgrade(ctx),
            notice_hook: std::sync::OnceLock::new(),
            hub: hub.clone(),
            live: std::sync::OnceLock::new(),
            advert: Mutex::new(advert),
            peers: RwLock::new(HashMap::new()),
            routes: routes::RouteTable::default(),
            owned: ownership::Owned::default(),
            sessions: sessions::SessionStore::default(),
            redis_up: AtomicBool::new(true),
            heartbeats: AtomicU64::new(0),
            metrics: ClusterMetrics::new(metrics),
            started: Instant::now(),
        });
        cluster.claim_node_id().await?;
        // A restarted node starts without sessions: what it announced before is void, and the
        // others (which keep a dead node's routes for a while) are told at once.
        let mut conn = cluster.conn.clone();
        redis::pipe()
            .cmd("DEL")
            .arg(cluster.key(&format!("routes:{}", cluster.node_id)))
            .ignore()
            .cmd("PUBLISH")
            .arg(cluster.key("routes"))
            .arg(serde_json::json!({"node": cluster.node_id, "full": true}).to_string())
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        cluster.heartbeat().await?;
        cluster.load_retained().await;
        let forwarder = routes::start_forwarder(cluster.clone());
        cluster.routes.attach_forwarder(forwarder);
        sessions::start(&cluster);
        ctx.broker.set_remote(Arc::new(cluster.clone()));
        cluster.start_live(hub);
        routes::start(cluster.clone());
        ownership::start(cluster.clone());
        let heartbeat = Arc::downgrade(&cluster);
        actix_rt::spawn(async move {
            loop {
                let Some(cluster) = heartbeat.upgrade() else {
                    return;
                };
                let period = cluster.heartbeat_period();
                if let Err(error) = cluster.heartbeat().await {
                    cluster.set_redis_up(false, &error);
                }
                drop(cluster);
                tokio::time::sleep(period).await;
            }
        });
        tracing::info!(
            node = %config.node_id,
            cluster = %config.name,
            peers = cluster.peers.read().len().saturating_sub(1),
            "joined the cluster"
        );
        Ok(cluster)
    }

    fn context(&self) -> Option<Arc<MqttContext>> {
        self.ctx.upgrade()
    }

    /// `drover:{name}:{rest}`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    fn heartbeat_period(&self) -> Duration {
        (self.lease / 4).max(Duration::from_millis(250))
    }

    /// Refuses to start as a node id another live process uses (its heartbeat is fresh and
    /// not ours): two nodes with one id would take each other's devices and routes.
    async fn claim_node_id(&self) -> Result<(), ClusterError> {
        let mut conn = self.conn.clone();
        let current: Option<String> = redis::cmd("GET")
            .arg(self.key(&format!("node:{}", self.node_id)))
            .query_async(&mut conn)
            .await?;
        let Some(current) = current else { return Ok(()) };
        let Ok(advert) = serde_json::from_str::<NodeAdvert>(&current) else {
            return Ok(());
        };
        // A heartbeat older than two periods is a node that died (kill -9) and now restarts.
        let stale = now_ms() - advert.heartbeat_at > (self.heartbeat_period().as_millis() as i64) * 2;
        if stale {
            return Ok(());
        }
        Err(ClusterError::NodeIdInUse(self.node_id.clone()))
    }

    /// Renews this node's advertisement and reads everyone's.
    async fn heartbeat(self: &Arc<Self>) -> Result<(), redis::RedisError> {
        let advert = {
            let mut advert = self.advert.lock();
            advert.heartbeat_at = now_ms();
            advert.connections = self.broker.connection_count();
            advert.sessions = self.broker.session_count();
            advert.owned_devices = self.owned.len();
            advert.live_sessions = self.hub.sessions();
            advert.watched_tenants = self.hub.watched_tenants().iter().map(|t| t.to_string()).collect();
            advert.clone()
        };
        let mut conn = self.conn.clone();
        let nodes_key = self.key("nodes");
        let (_, _, members): ((), (), Vec<String>) = redis::pipe()
            .cmd("SET")
            .arg(self.key(&format!("node:{}", self.node_id)))
            .arg(serde_json::to_string(&advert).unwrap_or_default())
            .arg("PX")
            .arg(self.lease.as_millis() as u64)
            .cmd("SADD")
            .arg(&nodes_key)
            .arg(&self.node_id)
            .cmd("SMEMBERS")
            .arg(&nodes_key)
            .query_async(&mut conn)
            .await?;
        let keys: Vec<String> = members.iter().map(|m| self.key(&format!("node:{m}"))).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut live = HashMap::new();
        let mut gone = Vec::new();
        for (member, value) in members.into_iter().zip(values) {
            match value.and_then(|v| serde_json::from_str::<NodeAdvert>(&v).ok()) {
                Some(advert) => {
                    live.insert(member, advert);
                }
                None => gone.push(member),
            }
        }
        if !gone.is_empty() {
            let _: () = redis::cmd("SREM")
                .arg(&nodes_key)
                .arg(&gone)
                .query_async(&mut conn)
                .await?;
        }
        let departed: Vec<String> = {
            let mut peers = self.peers.write();
            let departed = peers.keys().filter(|n| !live.contains_key(*n)).cloned().collect();
            *peers = live;
            departed
        };
        for node in departed {
            if node != self.node_id {
                tracing::warn!(%node, "node left the cluster (no heartbeat)");
                self.forget_node_later(node);
            }
        }
        self.metrics
            .peers
            .set(self.peers.read().len().saturating_sub(1) as i64);
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
        self.set_redis_up(true, &"heartbeat written");
        Ok(())
    }

    /// A node that died keeps attracting forwards into its stream for [`DEAD_NODE_ROUTES_KEPT`]:
    /// the persistent sessions it held find there, when they resume on another node, what was
    /// published for them meanwhile (see [`sessions`]). Forgotten then, unless it came back.
    fn forget_node_later(self: &Arc<Self>, node: String) {
        let weak = Arc::downgrade(self);
        actix_rt::spawn(async move {
            tokio::time::sleep(DEAD_NODE_ROUTES_KEPT).await;
            if let Some(cluster) = weak.upgrade()
                && !cluster.is_live(&node)
            {
                cluster.routes.forget_node(&node);
            }
        });
    }

    /// Records whether Redis answers; logs the changes only.
    pub fn set_redis_up(&self, up: bool, why: &dyn std::fmt::Display) {
        let was = self.redis_up.swap(up, Ordering::AcqRel);
        self.metrics.redis_up.set(i64::from(up));
        if was && !up {
            tracing::warn!(error = %why, "cluster Redis unreachable: serving this node's devices alone until it returns");
        } else if !was && up {
            tracing::info!("cluster Redis reachable again: rejoining");
            self.routes.resync_needed();
        }
    }

    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Acquire)
    }

    pub fn is_live(&self, node: &str) -> bool {
        self.peers.read().contains_key(node)
    }

    /// Other live nodes.
    pub fn peer_ids(&self) -> Vec<String> {
        self.peers
            .read()
            .keys()
            .filter(|n| **n != self.node_id)
            .cloned()
            .collect()
    }

    /// `GET /admin/cluster`: the nodes as Redis knows them, and this node's view.
    pub fn describe(&self) -> serde_json::Value {
        let mut nodes: Vec<NodeAdvert> = self.peers.read().values().cloned().collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        let now = now_ms();
        let nodes: Vec<serde_json::Value> = nodes
            .into_iter()
            .map(|n| {
                let age = now - n.heartbeat_at;
                serde_json::json!({
                    "node": n.node,
                    "http": n.http,
                    "mqtt": n.mqtt,
                    "version": n.version,
                    "startedAt": n.started_at,
                    "heartbeatAgeMs": age,
                    "connections": n.connections,
                    "sessions": n.sessions,
                    "ownedDevices": n.owned_devices,
                    "liveSessions": n.live_sessions,
                    "watchedTenants": n.watched_tenants,
                    "self": n.node == self.node_id,
                    "health": if age <= self.lease.as_millis() as i64 { "up" } else { "late" },
                })
            })
            .collect();
        serde_json::json!({
            "cluster": self.prefix.trim_start_matches("drover:"),
            "node": self.node_id,
            "redis": if self.redis_up() { "up" } else { "down" },
            "leaseSecs": self.lease.as_secs(),
            "uptimeSecs": self.started.elapsed().as_secs(),
            "nodes": nodes,
            "routes": self.routes.describe(),
            "ownedDevices": self.owned.len(),
        })
    }

    /// Retained messages kept in Redis, into this node's broker (at join).
    async fn load_retained(&self) {
        let mut conn = self.conn.clone();
        let namespaces: Vec<String> = match redis::cmd("SMEMBERS")
            .arg(self.key("retained-ns"))
            .query_async(&mut conn)
            .await
        {
            Ok(namespaces) => namespaces,
            Err(error) => {
                tracing::warn!(%error, "cannot read the cluster's retained messages");
                return;
            }
        };
        let keys = namespaces.iter().map(|ns| self.key(&format!("retained:{ns}")));
        let mut loaded = 0;
        for key in keys {
            let entries: HashMap<String, Vec<u8>> =
                match redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await {
                    Ok(entries) => entries,
                    Err(_) => continue,
                };
            for (_, entry) in entries {
                if let Some((namespace, publication)) = routes::decode_retained(&entry) {
                    self.broker
                        .route_local(&namespace, Arc::new(publication), &mut Vec::new());
                    loaded += 1;
                }
            }
        }
        if loaded > 0 {
            tracing::info!(retained = loaded, "retained messages loaded from the cluster");
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}
