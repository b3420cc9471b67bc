//! What device actors need beyond storage to serve shadows: a way to publish on a device's
//! topics (the MQTT broker, which this crate does not know) and counters for the metrics.
//!
//! [`ShadowServices`] bundles these with the shadow store and limits, so the supervisor hands
//! one value to every device actor it starts.

use std::sync::Arc;

use bytes::Bytes;

use crate::directory::{MemoryShadowStore, ShadowStore};
use crate::ids::TenantId;
use crate::shadow::ShadowLimits;

/// Publishes platform messages (shadow replies and deltas) to a tenant's subscribers.
/// Implementations must not block: the broker queues, it never waits for a subscriber.
pub trait DeviceOutbound: Send + Sync + 'static {
    fn publish(&self, tenant: &TenantId, topic: String, payload: Bytes);

    /// Publishes a command to a device, with the MQTT 5 request/response properties. Without a
    /// broker that knows properties, it is a plain publish.
    fn publish_command(&self, tenant: &TenantId, message: CommandMessage) {
        self.publish(tenant, message.topic, message.payload);
    }
}

/// A command on its way to a device (`devices/{id}/commands/{name}`).
#[derive(Debug, Clone)]
pub struct CommandMessage {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 Response Topic (for MQTT 5 devices).
    pub response_topic: Option<String>,
    /// MQTT 5 Correlation Data: the command id.
    pub correlation: Option<Bytes>,
    /// MQTT 5 Message Expiry Interval: a command is useless after its timeout.
    pub expiry_secs: Option<u32>,
}

/// Publishes nothing (tests, tools without a broker).
pub struct NoOutbound;

impl DeviceOutbound for NoOutbound {
    fn publish(&self, _: &TenantId, _: String, _: Bytes) {}
}

/// Counts shadow updates, for `/metrics`.
pub trait ShadowMetrics: Send + Sync + 'static {
    fn update_accepted(&self);
    /// `code` is the stable code of the [`ShadowError`](crate::shadow::ShadowError).
    fn update_rejected(&self, code: &'static str);
}

/// Counts nothing.
pub struct NoShadowMetrics;

impl ShadowMetrics for NoShadowMetrics {
    fn update_accepted(&self) {}
    fn update_rejected(&self, _: &'static str) {}
}

/// Everything a device actor needs to keep and announce its shadow.
#[derive(Clone)]
pub struct ShadowServices {
    pub store: Arc<dyn ShadowStore>,
    pub outbound: Arc<dyn DeviceOutbound>,
    pub metrics: Arc<dyn ShadowMetrics>,
    pub limits: ShadowLimits,
    /// The store is shared with other nodes (cluster mode): an actor whose device is not
    /// connected to this node reads the stored shadow again before serving a request, since
    /// the device's owner node may have written it since.
    pub shared_store: bool,
}

impl Default for ShadowServices {
    /// In memory, publishing nothing.
    fn default() -> Self {
        ShadowServices {
            store: Arc::new(MemoryShadowStore::default()),
            outbound: Arc::new(NoOutbound),
            metrics: Arc::new(NoShadowMetrics),
            limits: ShadowLimits::default(),
            shared_store: false,
        }
    }
}

impl std::fmt::Debug for ShadowServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowServices")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}
