//! `update_firmware` batch jobs start OTA campaigns: the batch's filter picks the devices, its
//! params name the firmware (`firmwareId`, or `version` of an image of the tenant) and may carry
//! any other campaign field (`rollout`, `failureRule`, `timeoutSecs`, `maintenanceWindow`,
//! `rollbackFirmwareId`, `name`).

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use drover_actors::TenantId;
use serde_json::Value;

use super::OtaError;
use super::campaigns::{CampaignSpec, create_campaign};
use crate::fleet_ops::jobs::{CampaignLauncher, LaunchError};
use crate::state::AppState;
use crate::storage::records::{AuditActor, DeviceFilter};

/// The launcher the batch jobs use; holds the state weakly (the state holds the jobs).
pub struct OtaLauncher {
    state: Weak<AppState>,
}

impl OtaLauncher {
    pub fn new(state: &Arc<AppState>) -> OtaLauncher {
        OtaLauncher {
            state: Arc::downgrade(state),
        }
    }
}

impl From<OtaError> for LaunchError {
    fn from(error: OtaError) -> LaunchError {
        match error {
            OtaError::UnknownFirmware(_) | OtaError::UnknownDevices(_) => {
                LaunchError::NotFound(error.to_string())
            }
            OtaError::Store(store) => LaunchError::Store(store),
            other => LaunchError::Invalid(other.to_string()),
        }
    }
}

#[async_trait]
impl CampaignLauncher for OtaLauncher {
    async fn launch(
        &self,
        tenant: &TenantId,
        filter: DeviceFilter,
        params: Value,
        by: AuditActor,
    ) -> Result<String, LaunchError> {
        let state = self
            .state
            .upgrade()
            .ok_or_else(|| LaunchError::Invalid("the server is stopping".into()))?;
        let Value::Object(mut spec) = params else {
            return Err(LaunchError::Invalid(
                "params: expected an object with firmwareId or version".into(),
            ));
        };
        if spec.contains_key("target") {
            return Err(LaunchError::Invalid(
                "params.target: the batch's filter is the target".into(),
            ));
        }
        if let Some(version) = spec.remove("version") {
            let version = version
                .as_str()
                .ok_or_else(|| LaunchError::Invalid("params.version: expected a string".into()))?
                .to_string();
            if spec.contains_key("firmwareId") {
                return Err(LaunchError::Invalid(
                    "params: give firmwareId or version, not both".into(),
                ));
            }
            let images = state.registry.list_firmware(tenant).await?;
            let image = images.into_iter().find(|f| f.version == version).ok_or_else(|| {
                LaunchError::NotFound(format!("no firmware version {version} in this tenant"))
            })?;
            spec.insert("firmwareId".into(), Value::String(image.id));
        }
        let devices = state.registry.matching_devices(tenant, filter).await?;
        if devices.is_empty() {
            return Err(LaunchError::Invalid(OtaError::EmptyTarget.to_string()));
        }
        let ids: Vec<Value> = devices
            .into_iter()
            .map(|d| Value::String(d.into_string()))
            .collect();
        spec.insert("target".into(), serde_json::json!({ "deviceIds": ids }));
        let spec: CampaignSpec = serde_json::from_value(Value::Object(spec))
            .map_err(|e| LaunchError::Invalid(format!("params: {e}")))?;
        let campaign = create_campaign(&state, tenant, spec, by).await?;
        Ok(campaign.id)
    }
}
