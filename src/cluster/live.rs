//! Live dashboard frames across nodes. Telemetry is shown by the device's owner node; a
//! `/ws` session on another node of the tenant gets it through the cluster's `live` channel,
//! published only while some other node has a session watching the tenant (nodes advertise the
//! tenants they watch in their heartbeat). Tenant-wide frames (alarms, analytics events,
//! campaign progress) go to every node with sessions.

use std::sync::{Arc, OnceLock};

use drover_actors::pipeline::LiveTelemetry;
use drover_actors::telemetry::TelemetryPoint;
use drover_actors::{DeviceId, TenantId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Cluster;
use crate::dashboard::DashboardHub;

/// Frames waiting to be published; beyond it they are dropped (counted), never waited for.
const LIVE_QUEUE: usize = 4096;

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub(super) enum Frame {
    #[serde(rename_all = "camelCase")]
    Telemetry {
        from: String,
        tenant: TenantId,
        device: DeviceId,
        device_type: String,
        points: Vec<TelemetryPoint>,
    },
    /// A tenant-wide frame: an alarm, an analytics event, a campaign's progress.
    Event {
        from: String,
        tenant: TenantId,
        json: String,
    },
}

/// The live-telemetry sink device actors write to: this node's hub, and the other nodes
/// watching the tenant.
pub struct ClusterLive {
    hub: DashboardHub,
    cluster: Arc<OnceLock<Arc<Cluster>>>,
}

impl ClusterLive {
    pub fn new(hub: DashboardHub, cluster: Arc<OnceLock<Arc<Cluster>>>) -> ClusterLive {
        ClusterLive { hub, cluster }
    }

    fn watched_elsewhere(&self, tenant: &TenantId) -> Option<&Arc<Cluster>> {
        let cluster = self.cluster.get()?;
        cluster.watched_elsewhere(tenant.as_str()).then_some(cluster)
    }
}

impl LiveTelemetry for ClusterLive {
    fn watching(&self, tenant: &TenantId, device: &DeviceId) -> bool {
        self.hub.watching(tenant, device) || self.watched_elsewhere(tenant).is_some()
    }

    fn show(&self, tenant: &TenantId, device: &DeviceId, device_type: &str, points: &[TelemetryPoint]) {
        self.hub.show(tenant, device, device_type, points);
        if let Some(cluster) = self.watched_elsewhere(tenant) {
            cluster.send_live(Frame::Telemetry {
                from: cluster.node_id.clone(),
                tenant: tenant.clone(),
                device: device.clone(),
                device_type: device_type.to_string(),
                points: points.to_vec(),
            });
        }
    }
}

impl Cluster {
    /// Whether another node has a session watching the tenant's telemetry.
    pub fn watched_elsewhere(&self, tenant: &str) -> bool {
        self.peers
            .read()
            .values()
            .any(|p| p.node != self.node_id && p.watched_tenants.iter().any(|t| t == tenant))
    }

    fn has_remote_sessions(&self) -> bool {
        self.peers
            .read()
            .values()
            .any(|p| p.node != self.node_id && p.live_sessions > 0)
    }

    fn send_live(&self, frame: Frame) {
        let Some(sender) = self.live.get() else { return };
        if sender.try_send(frame).is_err() {
            self.metrics.forwarded.with_label_values(&["live_dropped"]).inc();
        }
    }

    /// Starts the publisher of live frames and taps the hub's tenant-wide frames.
    pub(super) fn start_live(self: &Arc<Self>, hub: &DashboardHub) {
        let (tx, mut rx) = mpsc::channel::<Frame>(LIVE_QUEUE);
        let _ = self.live.set(tx);
        let weak = Arc::downgrade(self);
        let tap_weak = weak.clone();
        hub.set_event_tap(Box::new(move |tenant, json| {
            if let Some(cluster) = tap_weak.upgrade()
                && cluster.has_remote_sessions()
            {
                cluster.send_live(Frame::Event {
                    from: cluster.node_id.clone(),
                    tenant: tenant.clone(),
                    json: json.to_string(),
                });
            }
        }));
        actix_rt::spawn(async move {
            let mut batch = Vec::new();
            while let Some(frame) = rx.recv().await {
                batch.push(frame);
                while batch.len() < 256 {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                let Some(cluster) = weak.upgrade() else { return };
                let channel = cluster.key("live");
                let mut pipe = redis::pipe();
                for frame in batch.drain(..) {
                    if let Ok(json) = serde_json::to_string(&frame) {
                        pipe.cmd("PUBLISH").arg(&channel).arg(json).ignore();
                    }
                }
                let mut conn = cluster.conn.clone();
                if let Err(error) = pipe.query_async::<()>(&mut conn).await {
                    cluster.set_redis_up(false, &error);
                }
            }
        });
    }

    /// A frame another node published, for this node's sessions.
    pub(super) fn live_frame(&self, payload: &[u8], hub: &DashboardHub) {
        match serde_json::from_slice::<Frame>(payload) {
            Ok(Frame::Telemetry {
                from,
                tenant,
                device,
                device_type,
                points,
            }) if from != self.node_id => hub.show(&tenant, &device, &device_type, &points),
            Ok(Frame::Event { from, tenant, json }) if from != self.node_id => {
                hub.publish_json(&tenant, json.into())
            }
            _ => {}
        }
    }
}
