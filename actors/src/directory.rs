//! What the actors need from the device registry: device records and device shadows.
//!
//! The application crate implements these over its database; tests implement them in memory.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::device::DeviceRecord;
use crate::ids::{DeviceId, TenantId};
use crate::shadow::ShadowDocument;
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

/// Why a shadow could not be loaded or saved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShadowStoreError {
    /// The stored shadow is not at the version the save expected (another writer was first).
    #[error("the stored shadow changed since it was read")]
    Conflict,
    #[error("shadow storage unavailable: {0}")]
    Unavailable(String),
}

/// Where device shadows are kept. The device actor is their only writer; saves are still
/// conditional on the version read, so two writers (two nodes, a restarted actor racing its
/// predecessor) can never both win.
#[async_trait]
pub trait ShadowStore: Send + Sync + 'static {
    /// The device's shadow, or `None` before its first update.
    async fn load_shadow(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<ShadowDocument>, ShadowStoreError>;

    /// Stores `document` if the stored shadow is at `expected_previous_version` (0: there is
    /// none yet); otherwise [`ShadowStoreError::Conflict`] and nothing is written.
    async fn save_shadow(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        document: &ShadowDocument,
        expected_previous_version: u64,
    ) -> Result<(), ShadowStoreError>;

    /// Forgets the device's shadow (the device was deleted).
    async fn delete_shadow(&self, tenant: &TenantId, device: &DeviceId) -> Result<(), ShadowStoreError>;
}

/// Shadows in process memory: for tests and tools without a registry.
#[derive(Debug, Default)]
pub struct MemoryShadowStore {
    shadows: Mutex<HashMap<(TenantId, DeviceId), ShadowDocument>>,
}

#[async_trait]
impl ShadowStore for MemoryShadowStore {
    async fn load_shadow(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<ShadowDocument>, ShadowStoreError> {
        let shadows = self.shadows.lock().unwrap_or_else(|e| e.into_inner());
        Ok(shadows.get(&(tenant.clone(), device.clone())).cloned())
    }

    async fn save_shadow(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        document: &ShadowDocument,
        expected_previous_version: u64,
    ) -> Result<(), ShadowStoreError> {
        let mut shadows = self.shadows.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tenant.clone(), device.clone());
        let stored = shadows.get(&key).map_or(0, |d| d.version);
        if stored != expected_previous_version {
            return Err(ShadowStoreError::Conflict);
        }
        shadows.insert(key, document.clone());
        Ok(())
    }

    async fn delete_shadow(&self, tenant: &TenantId, device: &DeviceId) -> Result<(), ShadowStoreError> {
        let mut shadows = self.shadows.lock().unwrap_or_else(|e| e.into_inner());
        shadows.remove(&(tenant.clone(), device.clone()));
        Ok(())
    }
}
