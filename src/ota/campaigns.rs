//! Creating OTA campaigns: checking the plan, resolving the target to devices with the
//! registry's device filter (so groups — static or dynamic — tags, type and metadata mean what
//! they mean in `GET /api/devices`), cutting the rollout into stages, and the job notification
//! devices receive. [`create_campaign`] is also what batch jobs call for `update_firmware`.

use std::collections::BTreeMap;

use bytes::Bytes;
use drover_actors::campaign::{FailureRule, MaintenanceWindow, Rollout};
use drover_actors::{DeviceId, GroupName, TenantId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::OtaError;
use super::runner::Kick;
use crate::state::AppState;
use crate::storage::ota::{CampaignRecord, DEFAULT_TIMEOUT_SECS, FirmwareRecord, NewCampaign};
use crate::storage::records::{AuditActor, DeviceFilter, PageRequest};

/// Shortest and longest per-device timeout.
pub const MIN_TIMEOUT_SECS: u64 = 10;
pub const MAX_TIMEOUT_SECS: u64 = 7 * 86_400;
const MAX_NAME_CHARS: usize = 128;
/// Most device ids a target may list.
pub const MAX_TARGET_IDS: usize = 50_000;

/// Which devices a campaign updates: listed ids, or every device matching all the filters given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CampaignTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_ids: Option<Vec<String>>,
    /// A group (static, or dynamic: its members are whatever the group's query matches now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Devices carrying every one of these tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    /// `{"site": "berlin"}`: top-level metadata values, as in `?metadata.site=berlin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `POST /api/campaigns`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CampaignSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub firmware_id: String,
    pub target: CampaignTarget,
    /// `{"stages": [1, 10, 50, 100]}` (cumulative percentages) or `{"batchSize": 100}`, with an
    /// optional `maxPerMinute`. Default: all at once.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub rollout: Rollout,
    /// `{"maxFailureRate": 0.1, "action": "pause"|"abort"}` per stage. Default: pause above 10%.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub failure_rule: FailureRule,
    /// A device that has not succeeded this long after its notification counts as failed.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// `{"start": "22:00", "end": "04:00"}` (UTC): devices are notified only within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub maintenance_window: Option<MaintenanceWindow>,
    /// The image a rollback of this campaign installs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_firmware_id: Option<String>,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECS
}

/// What the runner reads back from a campaign's stored spec.
#[derive(Debug, Clone)]
pub struct CampaignPlan {
    pub rollout: Rollout,
    pub failure_rule: FailureRule,
    pub timeout_secs: u64,
    pub maintenance_window: Option<MaintenanceWindow>,
}

impl CampaignPlan {
    pub fn from_record(campaign: &CampaignRecord) -> CampaignPlan {
        match serde_json::from_value::<CampaignSpec>(campaign.spec.clone()) {
            Ok(spec) => CampaignPlan {
                rollout: spec.rollout,
                failure_rule: spec.failure_rule,
                timeout_secs: spec.timeout_secs,
                maintenance_window: spec.maintenance_window,
            },
            Err(error) => {
                tracing::warn!(campaign = %campaign.id, %error, "stored campaign spec unreadable; using defaults");
                CampaignPlan {
                    rollout: Rollout::default(),
                    failure_rule: FailureRule::default(),
                    timeout_secs: DEFAULT_TIMEOUT_SECS,
                    maintenance_window: None,
                }
            }
        }
    }
}

/// What `devices/{id}/jobs/notify` carries.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobNotification {
    pub job_id: String,
    pub operation: String,
    pub firmware_id: String,
    pub version: String,
    /// Relative to the API's base URL; the device downloads with its own token.
    pub url: String,
    pub size: u64,
    pub sha256: String,
    /// The signed manifest (JSON text) and its Ed25519 signature (base64), checked with the key
    /// from `GET /api/firmware/signing-key`.
    pub manifest: String,
    pub signature: String,
    pub timeout_secs: u64,
}

/// The notification of `campaign`'s job.
pub fn job_notification(campaign: &CampaignRecord, firmware: &FirmwareRecord) -> Bytes {
    let plan = CampaignPlan::from_record(campaign);
    let notification = JobNotification {
        job_id: campaign.id.clone(),
        operation: "update_firmware".into(),
        firmware_id: firmware.id.clone(),
        version: firmware.version.clone(),
        url: format!("/api/firmware/{}/download", firmware.id),
        size: firmware.size,
        sha256: firmware.sha256.clone(),
        manifest: firmware.manifest.clone(),
        signature: firmware.signature.clone(),
        timeout_secs: plan.timeout_secs,
    };
    Bytes::from(serde_json::to_vec(&notification).unwrap_or_default())
}

impl CampaignSpec {
    fn validate(&self) -> Result<(), OtaError> {
        if let Some(name) = &self.name
            && (name.trim().is_empty() || name.chars().count() > MAX_NAME_CHARS)
        {
            return Err(OtaError::invalid(
                "name",
                format!("1 to {MAX_NAME_CHARS} characters"),
            ));
        }
        self.rollout
            .validate()
            .map_err(|m| OtaError::invalid("rollout", m))?;
        self.failure_rule
            .validate()
            .map_err(|m| OtaError::invalid("failureRule", m))?;
        if !(MIN_TIMEOUT_SECS..=MAX_TIMEOUT_SECS).contains(&self.timeout_secs) {
            return Err(OtaError::invalid(
                "timeoutSecs",
                format!("from {MIN_TIMEOUT_SECS} to {MAX_TIMEOUT_SECS}"),
            ));
        }
        let t = &self.target;
        let any_filter =
            t.group.is_some() || t.tags.is_some() || t.device_type.is_some() || t.metadata.is_some();
        match (&t.device_ids, any_filter) {
            (Some(_), true) => Err(OtaError::invalid(
                "target",
                "give deviceIds, or filters (group, tags, type, metadata), not both",
            )),
            (None, false) => Err(OtaError::invalid(
                "target",
                "give deviceIds or at least one filter (group, tags, type, metadata)",
            )),
            (Some(ids), false) if ids.is_empty() || ids.len() > MAX_TARGET_IDS => Err(OtaError::invalid(
                "target.deviceIds",
                format!("1 to {MAX_TARGET_IDS} device ids"),
            )),
            _ => Ok(()),
        }
    }
}

/// A target device: id and type.
type TargetDevice = (String, String);

/// The devices `target` names in `tenant`, in id order.
async fn resolve_target(
    state: &AppState,
    tenant: &TenantId,
    target: &CampaignTarget,
    max: usize,
) -> Result<Vec<TargetDevice>, OtaError> {
    if let Some(ids) = &target.device_ids {
        let mut devices = Vec::with_capacity(ids.len());
        let mut unknown = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for raw in ids {
            let id = DeviceId::parse(raw.as_str()).map_err(|e| OtaError::invalid("target.deviceIds", e))?;
            if !seen.insert(id.clone()) {
                continue;
            }
            match state.registry.get_device(tenant, &id).await? {
                Some(record) => devices.push((record.id.as_str().to_string(), record.device_type)),
                None => unknown.push(raw.clone()),
            }
        }
        if !unknown.is_empty() {
            unknown.truncate(20);
            return Err(OtaError::UnknownDevices(unknown));
        }
        devices.sort();
        return Ok(devices);
    }
    let tags: Vec<String> = target.tags.clone().unwrap_or_default();
    let filter = DeviceFilter {
        device_type: target.device_type.clone(),
        // Every tag listed must be on the device.
        tags: tags.clone(),
        group: target
            .group
            .as_deref()
            .map(GroupName::parse)
            .transpose()
            .map_err(|e| OtaError::invalid("target.group", e))?,
        metadata: target.metadata.clone().unwrap_or_default().into_iter().collect(),
        ..DeviceFilter::default()
    };
    let mut devices = Vec::new();
    let mut after = None;
    loop {
        let page = state
            .registry
            .list_devices(
                tenant,
                filter.clone(),
                PageRequest {
                    after: after.clone(),
                    limit: 1000,
                },
            )
            .await?;
        for record in page.items {
            if tags.iter().all(|t| record.tags.contains(t)) {
                devices.push((record.id.as_str().to_string(), record.device_type));
            }
        }
        if devices.len() > max {
            return Err(OtaError::TooManyDevices(max));
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(devices)
}

/// Orders devices by a hash of campaign and device: each stage gets a spread of the fleet
/// rather than the alphabetically first ids (often one site or one batch of hardware).
fn rollout_order(campaign: &str, devices: &mut [TargetDevice]) {
    devices.sort_by_cached_key(|(id, _)| {
        let digest = Sha256::digest(format!("{campaign}/{id}").as_bytes());
        u64::from_be_bytes(digest[..8].try_into().unwrap_or_default())
    });
}

/// Creates a campaign (running at once) and tells the runner. The device list is fixed when
/// the campaign is created: devices joining the group later are not added.
pub async fn create_campaign(
    state: &AppState,
    tenant: &TenantId,
    spec: CampaignSpec,
    by: AuditActor,
) -> Result<CampaignRecord, OtaError> {
    create(state, tenant, spec, None, by).await
}

async fn create(
    state: &AppState,
    tenant: &TenantId,
    spec: CampaignSpec,
    rollback_of: Option<String>,
    by: AuditActor,
) -> Result<CampaignRecord, OtaError> {
    spec.validate()?;
    let firmware = state
        .registry
        .get_firmware(tenant, &spec.firmware_id)
        .await?
        .ok_or_else(|| OtaError::UnknownFirmware(spec.firmware_id.clone()))?;
    if let Some(rollback) = &spec.rollback_firmware_id
        && state.registry.get_firmware(tenant, rollback).await?.is_none()
    {
        return Err(OtaError::UnknownFirmware(rollback.clone()));
    }
    let max = state.config.limits.max_devices as usize;
    let mut devices = resolve_target(state, tenant, &spec.target, max).await?;
    if devices.is_empty() {
        return Err(OtaError::EmptyTarget);
    }
    let id = uuid::Uuid::now_v7().to_string();
    if spec.target.device_ids.is_none() {
        rollout_order(&id, &mut devices);
    }
    let fits = |device_type: &str| {
        firmware.device_types.is_empty() || firmware.device_types.iter().any(|t| t == device_type)
    };
    let eligible = devices.iter().filter(|(_, t)| fits(t)).count();
    if eligible == 0 {
        return Err(OtaError::NoDeviceFits(firmware.device_types.join(", ")));
    }
    let ends = spec.rollout.stage_ends(eligible);
    let mut rows = Vec::with_capacity(devices.len());
    let mut position = 0usize;
    for (device, device_type) in devices {
        if fits(&device_type) {
            let stage = ends
                .iter()
                .position(|&end| position < end)
                .unwrap_or(ends.len() - 1);
            rows.push((device, stage as u32, None));
            position += 1;
        } else {
            rows.push((
                device,
                0,
                Some(format!(
                    "device type {device_type} is not one firmware {} fits",
                    firmware.version
                )),
            ));
        }
    }
    let name = spec
        .name
        .clone()
        .unwrap_or_else(|| format!("update to {}", firmware.version));
    let new = NewCampaign {
        id,
        tenant: tenant.clone(),
        name,
        firmware_id: firmware.id.clone(),
        firmware_version: firmware.version.clone(),
        rollback_firmware_id: spec.rollback_firmware_id.clone(),
        rollback_of,
        spec: serde_json::to_value(&spec).map_err(|e| OtaError::Internal(e.to_string()))?,
        stages: ends.len() as u32,
        devices: rows,
    };
    let campaign = state.registry.create_campaign(new, by).await?;
    tracing::info!(campaign = %campaign.id, tenant = %tenant, version = %campaign.firmware_version, stages = campaign.stages, "campaign created");
    state.ota.runner.do_send(Kick {});
    Ok(campaign)
}

/// A campaign installing `of`'s rollback firmware (or `firmware_id`) on every device `of`
/// attempted, with `of`'s rollout and rules; `of` is cancelled if still running or paused.
pub async fn rollback_campaign(
    state: &AppState,
    tenant: &TenantId,
    of: &CampaignRecord,
    firmware_id: Option<String>,
    by: AuditActor,
) -> Result<CampaignRecord, OtaError> {
    let firmware_id = firmware_id
        .or_else(|| of.rollback_firmware_id.clone())
        .ok_or(OtaError::NoRollbackFirmware)?;
    let mut attempted = Vec::new();
    let mut after = None;
    loop {
        let page = state
            .registry
            .list_campaign_devices(&of.id, None, after.clone(), 1000)
            .await?;
        attempted.extend(
            page.items
                .into_iter()
                .filter(|d| d.attempts > 0)
                .map(|d| d.device),
        );
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    if attempted.is_empty() {
        return Err(OtaError::EmptyTarget);
    }
    let original: CampaignSpec =
        serde_json::from_value(of.spec.clone()).map_err(|e| OtaError::Internal(e.to_string()))?;
    if !of.status.is_final() {
        let cancelled = state
            .registry
            .set_campaign_status(
                tenant,
                &of.id,
                &[
                    drover_actors::campaign::CampaignStatus::Running,
                    drover_actors::campaign::CampaignStatus::Paused,
                ],
                drover_actors::campaign::CampaignStatus::Cancelled,
                None,
                Some("rolled back".into()),
                false,
                true,
                by.clone(),
            )
            .await?;
        if let Some((_, told)) = cancelled {
            state.ota.runner.do_send(super::runner::TellCancelled {
                tenant: tenant.clone(),
                campaign: of.id.clone(),
                devices: told,
            });
        }
    }
    let spec = CampaignSpec {
        name: Some(format!("rollback of {}", of.name)),
        firmware_id,
        target: CampaignTarget {
            device_ids: Some(attempted),
            ..CampaignTarget::default()
        },
        rollout: original.rollout,
        failure_rule: original.failure_rule,
        timeout_secs: original.timeout_secs,
        maintenance_window: None,
        rollback_firmware_id: None,
    };
    create(state, tenant, spec, Some(of.id.clone()), by).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rollout_order_is_stable_and_spread() {
        let mut a: Vec<TargetDevice> = (0..100).map(|i| (format!("d{i:03}"), "t".into())).collect();
        let mut b = a.clone();
        rollout_order("c1", &mut a);
        rollout_order("c1", &mut b);
        assert_eq!(a, b);
        // Not the alphabetical order.
        assert_ne!(a[0].0, "d000");
    }

    #[test]
    fn a_spec_needs_one_kind_of_target() {
        let spec = |target: CampaignTarget| CampaignSpec {
            name: None,
            firmware_id: "f".into(),
            target,
            rollout: Rollout::default(),
            failure_rule: FailureRule::default(),
            timeout_secs: 60,
            maintenance_window: None,
            rollback_firmware_id: None,
        };
        assert!(spec(CampaignTarget::default()).validate().is_err());
        assert!(
            spec(CampaignTarget {
                device_ids: Some(vec!["a".into()]),
                group: Some("g".into()),
                ..CampaignTarget::default()
            })
            .validate()
            .is_err()
        );
        assert!(
            spec(CampaignTarget {
                group: Some("g".into()),
                ..CampaignTarget::default()
            })
            .validate()
            .is_ok()
        );
    }
}
