//! What the actors need from the device registry.
//!
//! The application crate implements this over its database; tests implement it in memory.

use async_trait::async_trait;

use crate::device::DeviceRecord;
use crate::ids::{DeviceId, TenantId};
use crate::telemetry::schema::DeviceTypeSchema;

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

    /// The telemetry schema declared for a device type, if any.
    async fn device_type_schema(
        &self,
        _tenant: &TenantId,
        _device_type: &str,
    ) -> Result<Option<DeviceTypeSchema>, DirectoryError> {
        Ok(None)
    }
}
