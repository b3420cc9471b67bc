//! What the actors need from the device registry.
//!
//! The application crate implements this over its database; tests implement it in memory.

use async_trait::async_trait;

use crate::device::DeviceRecord;
use crate::ids::{DeviceId, TenantId};

/// The registry could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("device registry unavailable: {0}")]
pub struct DirectoryError(pub String);

/// Read access to registered devices, used by supervisors to decide whether a device exists and
/// by device actors to rebuild their state when they (re)start.
#[async_trait]
pub trait DeviceDirectory: Send + Sync + 'static {
    /// The device, or `None` when no such device is registered in that tenant.
    async fn find_device(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<DeviceRecord>, DirectoryError>;
}
