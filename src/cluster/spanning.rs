//! Rules whose state spans devices (group, absence) in a cluster (DESIGN.md §9). Each node
//! judges its own devices' telemetry with the per-device rules, but a group condition needs
//! every device's telemetry and an absence condition must not fire on a node a device merely
//! left. So one node at a time judges a tenant's spanning rules: the holder of the lease
//! `lease:rules:{tenant}` (contended by every node that has the tenant's rules loaded, renewed
//! each heartbeat period, lasting `CLUSTER_LEASE_SECS`). The other nodes forward the tenant's
//! events to it through its stream `rules:{node}` (consumer group, XACK after the rule actor
//! took them).
//!
//! When the holder dies, its lease expires and another node takes it: that node rebuilds the
//! state from the registry (active alarms; devices connected anywhere are watched for absence)
//! and starts afresh: group windows restart empty, and absence timers restart at the takeover
//! (an absence alarm may come up to its duration late, never early). Events forwarded to the
//! dead holder and not judged yet are lost to these rules (they were stored and judged by the
//! per-device rules on their own node). Without Redis nobody holds the lease: spanning rules
//! pause until it returns, per-device rules go on.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use actix::Recipient;
use drover_actors::pipeline::TelemetryAccepted;
use drover_actors::rule_actor::SpanningTelemetry;
use drover_actors::rules::Spanning;
use drover_actors::telemetry::TelemetryPoint;
use drover_actors::{DeviceId, TenantId};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Cluster;
use super::stream::StreamConsumer;

/// Events waiting to be forwarded; beyond it they are dropped (counted).
const FORWARD_QUEUE: usize = 16_384;
const FORWARD_BATCH: usize = 512;
/// Length a node's rules stream is capped at (approximately).
const STREAM_CAP: u64 = 100_000;

/// Takes the lease when free, renews it when held; answers the holder.
const TAKE_OR_RENEW: &str = r"
local current = redis.call('GET', KEYS[1])
if (not current) or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return current
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// A forwarded event as it travels in a stream entry.
#[derive(Serialize, Deserialize)]
struct WireEvent {
    tenant: TenantId,
    device: DeviceId,
    device_type: Arc<str>,
    #[serde(default)]
    metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    shadow: Option<serde_json::Value>,
    points: Vec<TelemetryPoint>,
    now_ms: i64,
}

fn encode(event: &TelemetryAccepted, now_ms: i64) -> Vec<u8> {
    let wire = WireEvent {
        tenant: event.tenant.clone(),
        device: event.device.clone(),
        device_type: event.device_type.clone(),
        metadata: (*event.metadata).clone(),
        shadow: event.shadow.as_deref().cloned(),
        points: event.points.to_vec(),
        now_ms,
    };
    serde_json::to_vec(&wire).unwrap_or_default()
}

fn decode(bytes: &[u8]) -> Option<SpanningTelemetry> {
    let wire: WireEvent = serde_json::from_slice(bytes).ok()?;
    Some(SpanningTelemetry {
        event: TelemetryAccepted {
            tenant: wire.tenant,
            device: wire.device,
            device_type: wire.device_type,
            metadata: Arc::new(wire.metadata),
            shadow: wire.shadow.map(Arc::new),
            points: wire.points.into(),
        },
        now_ms: wire.now_ms,
    })
}

/// This node's side of the spanning-rules leases: which tenants it wants and holds, who holds
/// the others, and the forwarding of events to them.
#[derive(Default)]
pub struct SpanningLeases {
    cluster: OnceLock<Weak<Cluster>>,
    router: OnceLock<Recipient<SpanningTelemetry>>,
    /// Tenants with enabled spanning rules loaded on this node.
    wanted: Mutex<HashSet<TenantId>>,
    /// Tenants whose spanning rules this node judges.
    held: RwLock<HashSet<TenantId>>,
    /// Who judges each wanted tenant's spanning rules, as of the last renewal.
    holders: RwLock<HashMap<TenantId, String>>,
    outbox: OnceLock<mpsc::Sender<(String, Vec<u8>)>>,
    forwarded: AtomicU64,
    /// Events no node could take (no holder known, queue full, Redis away).
    dropped: AtomicU64,
    received: AtomicU64,
    /// A tenant became wanted: contend now rather than at the next renewal.
    wake: tokio::sync::Notify,
}

impl Spanning for SpanningLeases {
    fn judged_here(&self, tenant: &TenantId) -> bool {
        self.held.read().contains(tenant)
    }

    fn want(&self, tenant: &TenantId, wanted: bool) {
        let mut set = self.wanted.lock();
        if wanted {
            if set.insert(tenant.clone()) {
                self.wake.notify_one();
            }
        } else {
            set.remove(tenant);
        }
    }

    fn forward(&self, event: &TelemetryAccepted, now_ms: i64) {
        let target = self.holders.read().get(&event.tenant).cloned();
        let sent = match (target, self.outbox.get()) {
            (Some(target), Some(outbox)) => outbox.try_send((target, encode(event, now_ms))).is_ok(),
            _ => false,
        };
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl SpanningLeases {
    /// Where forwarded events go (the rule router), once the rules engine runs.
    pub fn attach(&self, router: Recipient<SpanningTelemetry>) {
        let _ = self.router.set(router);
    }

    /// Starts contending for leases, forwarding and consuming, once the node joined.
    pub fn start(self: &Arc<Self>, cluster: &Arc<Cluster>) {
        if self.cluster.set(Arc::downgrade(cluster)).is_err() {
            return;
        }
        let (tx, rx) = mpsc::channel(FORWARD_QUEUE);
        let _ = self.outbox.set(tx);
        actix_rt::spawn(renew(Arc::downgrade(self), Arc::downgrade(cluster)));
        actix_rt::spawn(send(Arc::downgrade(self), Arc::downgrade(cluster), rx));
        actix_rt::spawn(consume(Arc::downgrade(self), Arc::downgrade(cluster)));
    }

    /// Gives up every lease this node holds (a clean stop): another node takes over at once.
    pub async fn release_all(&self) {
        let Some(cluster) = self.cluster.get().and_then(Weak::upgrade) else {
            return;
        };
        let held: Vec<TenantId> = self.held.write().drain().collect();
        if held.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for tenant in &held {
            pipe.cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(lease_key(&cluster, tenant))
                .arg(&cluster.node_id)
                .ignore();
        }
        let mut conn = cluster.conn.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), pipe.query_async::<()>(&mut conn)).await;
    }

    /// For `GET /admin/cluster`: tenants whose spanning rules this node judges, who judges the
    /// others it has rules of, and the forwarding counters.
    pub fn describe(&self) -> serde_json::Value {
        let mut held: Vec<String> = self.held.read().iter().map(|t| t.to_string()).collect();
        held.sort();
        let holders: serde_json::Map<String, serde_json::Value> = self
            .holders
            .read()
            .iter()
            .map(|(t, n)| (t.to_string(), serde_json::Value::String(n.clone())))
            .collect();
        serde_json::json!({
            "judgedHere": held,
            "holders": holders,
            "forwarded": self.forwarded.load(Ordering::Relaxed),
            "received": self.received.load(Ordering::Relaxed),
            "dropped": self.dropped.load(Ordering::Relaxed),
        })
    }
}

fn lease_key(cluster: &Cluster, tenant: &TenantId) -> String {
    cluster.key(&format!("lease:rules:{tenant}"))
}

/// Takes or renews the leases of the wanted tenants each heartbeat period, learns who holds the
/// others, and releases the leases of tenants no longer wanted.
async fn renew(weak: Weak<SpanningLeases>, cluster: Weak<Cluster>) {
    loop {
        let (Some(leases), Some(cluster)) = (weak.upgrade(), cluster.upgrade()) else {
            return;
        };
        let period = cluster.heartbeat_period();
        let wanted: Vec<TenantId> = leases.wanted.lock().iter().cloned().collect();
        let unwanted: Vec<TenantId> = leases
            .held
            .read()
            .iter()
            .filter(|t| !wanted.contains(t))
            .cloned()
            .collect();
        let mut pipe = redis::pipe();
        for tenant in &wanted {
            pipe.cmd("EVAL")
                .arg(TAKE_OR_RENEW)
                .arg(1)
                .arg(lease_key(&cluster, tenant))
                .arg(&cluster.node_id)
                .arg(cluster.lease.as_millis() as u64);
        }
        for tenant in &unwanted {
            pipe.cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(lease_key(&cluster, tenant))
                .arg(&cluster.node_id)
                .ignore();
        }
        let mut conn = cluster.conn.clone();
        let answer: redis::RedisResult<Vec<String>> = if wanted.is_empty() && unwanted.is_empty() {
            Ok(Vec::new())
        } else {
            pipe.query_async(&mut conn).await
        };
        match answer {
            Ok(holders) => {
                let mine: HashSet<TenantId> = wanted
                    .iter()
                    .zip(&holders)
                    .filter(|(_, h)| **h == cluster.node_id)
                    .map(|(t, _)| t.clone())
                    .collect();
                {
                    let mut held = leases.held.write();
                    for tenant in mine.difference(&held) {
                        tracing::info!(%tenant, "took the lease of the tenant's group and absence rules");
                    }
                    *held = mine;
                }
                *leases.holders.write() = wanted.into_iter().zip(holders).collect();
            }
            Err(error) => {
                // Nobody can tell who judges: stop rather than risk two judges.
                leases.held.write().clear();
                leases.holders.write().clear();
                cluster.set_redis_up(false, &error);
            }
        }
        drop(cluster);
        let woken = async { leases.wake.notified().await };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = woken => {}
        }
    }
}

/// Sends forwarded events in batches: one pipeline of XADDs per batch.
async fn send(weak: Weak<SpanningLeases>, cluster: Weak<Cluster>, mut rx: mpsc::Receiver<(String, Vec<u8>)>) {
    let mut batch = Vec::with_capacity(FORWARD_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < FORWARD_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let (Some(leases), Some(cluster)) = (weak.upgrade(), cluster.upgrade()) else {
            return;
        };
        let mut pipe = redis::pipe();
        for (target, event) in &batch {
            pipe.cmd("XADD")
                .arg(cluster.key(&format!("rules:{target}")))
                .arg("MAXLEN")
                .arg("~")
                .arg(STREAM_CAP)
                .arg("*")
                .arg("e")
                .arg(event.as_slice())
                .ignore();
        }
        let mut conn = cluster.conn.clone();
        let counter = match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => &leases.forwarded,
            Err(error) => {
                cluster.set_redis_up(false, &error);
                &leases.dropped
            }
        };
        counter.fetch_add(batch.len() as u64, Ordering::Relaxed);
        batch.clear();
    }
}

/// Reads this node's rules stream and hands each event to the rule router, then XACKs it.
async fn consume(weak: Weak<SpanningLeases>, cluster: Weak<Cluster>) {
    let Some(c) = cluster.upgrade() else { return };
    let mut stream = StreamConsumer::new(&c, &format!("rules:{}", c.node_id));
    drop(c);
    loop {
        let read = stream.read().await;
        let (Some(leases), Some(c)) = (weak.upgrade(), cluster.upgrade()) else {
            return;
        };
        let entries = match read {
            Ok(entries) => entries,
            Err((error, wait)) => {
                c.set_redis_up(false, &error);
                drop((leases, c));
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        drop(c);
        if entries.is_empty() {
            continue;
        }
        let mut ids = Vec::with_capacity(entries.len());
        for entry in entries {
            let event = entry
                .map
                .get("e")
                .and_then(|v| redis::from_redis_value::<Vec<u8>>(v).ok())
                .and_then(|bytes| decode(&bytes));
            if let (Some(event), Some(router)) = (event, leases.router.get()) {
                router.do_send(event);
                leases.received.fetch_add(1, Ordering::Relaxed);
            }
            ids.push(entry.id);
        }
        if let Err(error) = stream.done(&ids).await
            && let Some(c) = cluster.upgrade()
        {
            c.set_redis_up(false, &error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_actors::telemetry::{MetricName, MetricValue};

    #[test]
    fn forwarded_events_round_trip() {
        let tenant = TenantId::parse("acme").unwrap();
        let device = DeviceId::parse("d1").unwrap();
        let mut metadata = serde_json::Map::new();
        metadata.insert("site".into(), serde_json::json!("north"));
        let event = TelemetryAccepted {
            tenant: tenant.clone(),
            device: device.clone(),
            device_type: "sensor".into(),
            metadata: Arc::new(metadata),
            shadow: Some(Arc::new(serde_json::json!({"reported": {"mode": "eco"}}))),
            points: vec![TelemetryPoint {
                tenant,
                device,
                device_type: "sensor".into(),
                metric: MetricName::parse("temperature").unwrap(),
                ts_ms: 1_800_000_000_000,
                value: MetricValue::Number(61.5),
            }]
            .into(),
        };
        let back = decode(&encode(&event, 42)).expect("decodes");
        assert_eq!(back.now_ms, 42);
        assert_eq!(back.event.tenant, event.tenant);
        assert_eq!(back.event.device, event.device);
        assert_eq!(&*back.event.device_type, "sensor");
        assert_eq!(back.event.metadata, event.metadata);
        assert_eq!(back.event.shadow, event.shadow);
        assert_eq!(&*back.event.points, &*event.points);
        assert!(decode(b"not json").is_none());
    }
}
