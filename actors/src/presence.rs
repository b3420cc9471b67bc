//! Where device actors report connection changes, so the registry's status and last-seen
//! follow them. Implementations batch the writes; reporting never blocks an actor.

use chrono::{DateTime, Utc};

use crate::ids::{DeviceId, TenantId};

pub trait PresenceSink: Send + Sync + 'static {
    /// The device connected (`true`) or disconnected (`false`) at `at`.
    fn connection_changed(&self, tenant: &TenantId, device: &DeviceId, connected: bool, at: DateTime<Utc>);
}

/// Discards reports (tests, tools without a registry).
pub struct NoPresence;

impl PresenceSink for NoPresence {
    fn connection_changed(&self, _: &TenantId, _: &DeviceId, _: bool, _: DateTime<Utc>) {}
}
