//! Batch jobs, the adapter half: the operations a job runs on each device (through the same
//! registry calls, actors and broker as the single-device API), the filter of
//! `POST /api/devices/batch`, and the hook through which `update_firmware` starts an OTA
//! campaign. The runner is `drover_actors::job_actor`; job state is `storage::jobs`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use actix::Addr;
use async_trait::async_trait;
use chrono::Utc;
use drover_actors::device::rules;
use drover_actors::device_actor::{ShadowAction, ShadowRequest};
use drover_actors::job_actor::{DeviceOutcome, DeviceResult, JobActor, JobExecutor, JobPlan};
use drover_actors::{ConnectionStatus, DeviceId, Fleet, GroupName, ShadowStore, TenantId};
use serde_json::{Map, Value, json};

use super::commands::{CommandError, CommandService, CommandSpec, DEFAULT_TIMEOUT_SECS};
use crate::auth::secrets::{self, DEVICE_TOKEN_PREFIX};
use crate::mqtt::broker::Broker;
use crate::storage::records::{AuditActor, DeviceFilter, DevicePatch};
use crate::storage::{RegistryStore, StoreError};

/// Devices one job may target at most.
pub const MAX_JOB_DEVICES: usize = 100_000;
pub const DEFAULT_CONCURRENCY: u32 = 16;
pub const MAX_CONCURRENCY: u32 = 256;
pub const DEFAULT_RATE: u32 = 1000;
pub const MAX_RATE: u32 = 100_000;

/// What a batch job does to each device, with its parameters checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    SetMetadata {
        metadata: Map<String, Value>,
    },
    UnsetMetadata {
        keys: Vec<String>,
    },
    AddTags {
        tags: Vec<String>,
    },
    RemoveTags {
        tags: Vec<String>,
    },
    AddToGroup {
        group: GroupName,
    },
    RemoveFromGroup {
        group: GroupName,
    },
    ShadowDesired {
        desired: Map<String, Value>,
    },
    SendCommand {
        name: String,
        payload: Value,
        timeout_secs: u64,
        ttl_secs: Option<u64>,
    },
    Enable,
    Disable,
    RotateTokens,
    Delete,
    /// Handed to the OTA campaigns as one campaign over the filter's devices.
    UpdateFirmware {
        params: Value,
    },
}

pub const OPERATIONS: &str = "set_metadata, unset_metadata, add_tags, remove_tags, add_to_group, \
     remove_from_group, shadow_desired, send_command, enable, disable, rotate_tokens, delete, update_firmware";

fn field<'a>(params: &'a Value, name: &str) -> Result<&'a Value, String> {
    params
        .get(name)
        .ok_or_else(|| format!("params.{name} is required"))
}

fn string_list(params: &Value, name: &str) -> Result<Vec<String>, String> {
    let list: Vec<String> = serde_json::from_value(field(params, name)?.clone())
        .map_err(|_| format!("params.{name} must be a list of strings"))?;
    if list.is_empty() {
        return Err(format!("params.{name} must not be empty"));
    }
    Ok(list)
}

fn object(params: &Value, name: &str) -> Result<Map<String, Value>, String> {
    match field(params, name)? {
        Value::Object(map) if !map.is_empty() => Ok(map.clone()),
        _ => Err(format!("params.{name} must be a non-empty object")),
    }
}

fn no_params(params: &Value) -> Result<(), String> {
    match params {
        Value::Null => Ok(()),
        Value::Object(map) if map.is_empty() => Ok(()),
        _ => Err("this operation takes no params".into()),
    }
}

impl Operation {
    /// Parses and checks an operation and its `params` (the message names the field at fault).
    pub fn parse(name: &str, params: &Value) -> Result<Operation, String> {
        let op = match name {
            "set_metadata" => {
                let metadata = object(params, "metadata")?;
                rules::metadata(&metadata).map_err(|m| format!("params.metadata: {m}"))?;
                Operation::SetMetadata { metadata }
            }
            "unset_metadata" => Operation::UnsetMetadata {
                keys: string_list(params, "keys")?,
            },
            "add_tags" | "remove_tags" => {
                let tags = string_list(params, "tags")?;
                rules::tags(&tags).map_err(|m| format!("params.tags: {m}"))?;
                if name == "add_tags" {
                    Operation::AddTags { tags }
                } else {
                    Operation::RemoveTags { tags }
                }
            }
            "add_to_group" | "remove_from_group" => {
                let group = field(params, "group")?
                    .as_str()
                    .ok_or("params.group must be a group name")?;
                let group = GroupName::parse(group).map_err(|e| format!("params.group: {e}"))?;
                if name == "add_to_group" {
                    Operation::AddToGroup { group }
                } else {
                    Operation::RemoveFromGroup { group }
                }
            }
            "shadow_desired" => Operation::ShadowDesired {
                desired: object(params, "desired")?,
            },
            "send_command" => {
                let name = field(params, "name")?
                    .as_str()
                    .ok_or("params.name must be a string")?
                    .to_string();
                let timeout_secs = match params.get("timeoutSecs") {
                    None => DEFAULT_TIMEOUT_SECS,
                    Some(v) => v
                        .as_u64()
                        .ok_or("params.timeoutSecs must be a positive integer")?,
                };
                let ttl_secs = match params.get("ttlSecs") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(v.as_u64().ok_or("params.ttlSecs must be a positive integer")?),
                };
                let spec = CommandSpec {
                    name: name.clone(),
                    payload: params.get("payload").cloned().unwrap_or(Value::Null),
                    timeout: Duration::from_secs(timeout_secs),
                    queue_ttl: ttl_secs.map(Duration::from_secs),
                };
                spec.validate().map_err(|m| format!("params.{m}"))?;
                Operation::SendCommand {
                    name,
                    payload: spec.payload,
                    timeout_secs,
                    ttl_secs,
                }
            }
            "enable" => no_params(params).map(|()| Operation::Enable)?,
            "disable" => no_params(params).map(|()| Operation::Disable)?,
            "rotate_tokens" => no_params(params).map(|()| Operation::RotateTokens)?,
            "delete" => no_params(params).map(|()| Operation::Delete)?,
            "update_firmware" => Operation::UpdateFirmware {
                params: params.clone(),
            },
            other => return Err(format!("unknown operation {other:?}; use one of {OPERATIONS}")),
        };
        Ok(op)
    }
}

/// Parses the batch filter. Known keys: `type`, `tag`, `tags`, `group` (static or dynamic),
/// `status`, `firmware`, `deviceIds`, `metadata` (object); any other key is a metadata key
/// (the product's own example filters on `"location": "warehouse-a"`). An empty filter would
/// select the whole tenant and is refused: name the devices or say `"all": true`.
pub fn parse_filter(filter: &Value) -> Result<DeviceFilter, String> {
    let Value::Object(map) = filter else {
        return Err("filter must be an object".into());
    };
    let mut out = DeviceFilter::default();
    let mut all = false;
    let text = |k: &str, v: &Value| -> Result<String, String> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("filter.{k} must be a string"))
    };
    for (key, value) in map {
        match key.as_str() {
            "type" => out.device_type = Some(text(key, value)?),
            "tag" => out.tag = Some(text(key, value)?),
            "tags" => {
                out.tags = serde_json::from_value(value.clone())
                    .map_err(|_| "filter.tags must be a list of strings".to_string())?
            }
            "group" => {
                out.group =
                    Some(GroupName::parse(text(key, value)?).map_err(|e| format!("filter.group: {e}"))?)
            }
            "status" => {
                out.status = Some(
                    text(key, value)?
                        .parse::<ConnectionStatus>()
                        .map_err(|m| format!("filter.status: {m}"))?,
                )
            }
            "firmware" => out.firmware = Some(text(key, value)?),
            "all" => all = value.as_bool().ok_or("filter.all must be true or false")?,
            "deviceIds" => {
                let ids: Vec<String> = serde_json::from_value(value.clone())
                    .map_err(|_| "filter.deviceIds must be a list of device ids".to_string())?;
                if ids.len() > MAX_JOB_DEVICES {
                    return Err(format!("filter.deviceIds: at most {MAX_JOB_DEVICES}"));
                }
                for id in &ids {
                    DeviceId::parse(id.as_str()).map_err(|e| format!("filter.deviceIds: {e}"))?;
                }
                out.ids = Some(ids);
            }
            "metadata" => {
                let Value::Object(pairs) = value else {
                    return Err("filter.metadata must be an object".into());
                };
                for (k, v) in pairs {
                    out.metadata.push((k.clone(), metadata_text(v)));
                }
            }
            other => out.metadata.push((other.to_string(), metadata_text(value))),
        }
    }
    if out.metadata.len() > crate::http::devices::MAX_METADATA_FILTERS {
        return Err(format!(
            "filter: at most {} metadata keys",
            crate::http::devices::MAX_METADATA_FILTERS
        ));
    }
    let selective = out.device_type.is_some()
        || out.tag.is_some()
        || !out.tags.is_empty()
        || out.group.is_some()
        || out.status.is_some()
        || out.firmware.is_some()
        || out.ids.is_some()
        || !out.metadata.is_empty();
    if !selective && !all {
        return Err("filter selects every device of the tenant; say \"all\": true if that is meant".into());
    }
    Ok(out)
}

fn metadata_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ---- update_firmware ---------------------------------------------------------------------

/// Starts an OTA campaign for a batch job's `update_firmware`: the OTA campaigns module
/// implements it and the server attaches it ([`JobService::attach_campaigns`]). The campaign
/// then owns the rollout (stages, failure rules, per-device status).
#[async_trait]
pub trait CampaignLauncher: Send + Sync + 'static {
    /// Creates and starts a campaign over the devices `filter` selects, with the batch body's
    /// `params` (e.g. `{"firmwareId": …}` or `{"version": "2.1.0"}`); answers the campaign id.
    async fn launch(
        &self,
        tenant: &TenantId,
        filter: DeviceFilter,
        params: Value,
        by: AuditActor,
    ) -> Result<String, LaunchError>;
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The params or target are wrong (400 with this message).
    #[error("{0}")]
    Invalid(String),
    /// The firmware or a group named does not exist (404).
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

// ---- the executor --------------------------------------------------------------------------

/// What the operations need; cloned into the job actor.
#[derive(Clone)]
pub struct OperationContext {
    pub registry: RegistryStore,
    pub fleet: Fleet,
    pub broker: Arc<Broker>,
    pub shadows: Arc<dyn ShadowStore>,
    pub commands: CommandService,
}

/// Ends a device's live connection and stops its actor (deleted, disabled).
pub async fn end_device_session(broker: &Broker, fleet: &Fleet, tenant: &TenantId, id: &DeviceId, why: &str) {
    broker.disconnect_device(tenant, id, why);
    if let Err(error) = fleet.stop_device(tenant, id).await {
        tracing::warn!(device = %id, %error, "could not stop the device actor");
    }
}

pub struct OperationExecutor {
    pub ctx: OperationContext,
}

fn done(device: &DeviceId, status: DeviceOutcome, detail: Value) -> DeviceResult {
    DeviceResult {
        device: device.clone(),
        status,
        detail,
        secret: None,
    }
}

fn failed(device: &DeviceId, code: &str, message: impl std::fmt::Display) -> DeviceResult {
    done(
        device,
        DeviceOutcome::Failed,
        json!({"error": {"code": code, "message": message.to_string()}}),
    )
}

fn store_failure(device: &DeviceId, error: StoreError) -> DeviceResult {
    match error {
        StoreError::NotFound(what) if what.starts_with("device") => done(
            device,
            DeviceOutcome::Skipped,
            json!({"reason": "device no longer registered"}),
        ),
        StoreError::NotFound(what) => failed(device, "not_found", format!("{what} not found")),
        StoreError::Invalid(m) => failed(device, "validation_failed", m),
        StoreError::Conflict(m) => failed(device, "conflict", m),
        other => failed(device, "internal", other),
    }
}

impl OperationExecutor {
    async fn run(&self, plan: &JobPlan, op: Operation, device: &DeviceId) -> DeviceResult {
        let ctx = &self.ctx;
        let tenant = plan.tenant.clone();
        let by = AuditActor {
            tenant: Some(tenant.clone()),
            actor: format!("{} (job {})", plan.created_by, plan.id),
            source_ip: None,
        };
        let patch = |patch: DevicePatch| {
            let (registry, tenant, device, by) =
                (ctx.registry.clone(), tenant.clone(), device.clone(), by.clone());
            async move { registry.update_device(tenant, device, patch, by).await }
        };
        match op {
            Operation::SetMetadata { metadata } => match patch(DevicePatch {
                metadata: Some(metadata),
                ..Default::default()
            })
            .await
            {
                Ok(d) => done(device, DeviceOutcome::Succeeded, json!({"metadata": d.metadata})),
                Err(e) => store_failure(device, e),
            },
            Operation::UnsetMetadata { keys } => {
                let metadata = keys.into_iter().map(|k| (k, Value::Null)).collect();
                match patch(DevicePatch {
                    metadata: Some(metadata),
                    ..Default::default()
                })
                .await
                {
                    Ok(d) => done(device, DeviceOutcome::Succeeded, json!({"metadata": d.metadata})),
                    Err(e) => store_failure(device, e),
                }
            }
            Operation::AddTags { tags } => {
                match ctx
                    .registry
                    .add_device_tags(tenant, device.clone(), tags, by)
                    .await
                {
                    Ok(d) => done(device, DeviceOutcome::Succeeded, json!({"tags": d.tags})),
                    Err(e) => store_failure(device, e),
                }
            }
            Operation::RemoveTags { tags } => {
                let current = match ctx.registry.get_device(&tenant, device).await {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        return store_failure(device, StoreError::NotFound(format!("device {device}")));
                    }
                    Err(e) => return store_failure(device, e),
                };
                let kept: Vec<String> = current.tags.into_iter().filter(|t| !tags.contains(t)).collect();
                match patch(DevicePatch {
                    tags: Some(kept),
                    ..Default::default()
                })
                .await
                {
                    Ok(d) => done(device, DeviceOutcome::Succeeded, json!({"tags": d.tags})),
                    Err(e) => store_failure(device, e),
                }
            }
            Operation::AddToGroup { group } => {
                match ctx
                    .registry
                    .add_group_members(tenant, group.clone(), vec![device.clone()], by)
                    .await
                {
                    Ok(_) => done(device, DeviceOutcome::Succeeded, json!({"group": group})),
                    Err(StoreError::NotFound(what)) if what.starts_with("group") => {
                        failed(device, "not_found", format!("{what} not found"))
                    }
                    Err(e) => store_failure(device, e),
                }
            }
            Operation::RemoveFromGroup { group } => {
                match ctx
                    .registry
                    .remove_group_member(tenant, group.clone(), device.clone(), by)
                    .await
                {
                    Ok(_) => done(device, DeviceOutcome::Succeeded, json!({"group": group})),
                    // Not a member (any more): the goal is reached.
                    Err(StoreError::NotFound(what)) if what.starts_with("device") => {
                        done(device, DeviceOutcome::Skipped, json!({"reason": "not a member"}))
                    }
                    Err(e) => store_failure(device, e),
                }
            }
            Operation::ShadowDesired { desired } => {
                let actor = match ctx.fleet.device(&tenant, device).await {
                    Ok(Some(actor)) => actor,
                    Ok(None) => {
                        return store_failure(device, StoreError::NotFound(format!("device {device}")));
                    }
                    Err(e) => return failed(device, "unavailable", e),
                };
                let body = json!({"state": {"desired": desired}});
                match actor
                    .send(ShadowRequest {
                        action: ShadowAction::Update {
                            payload: body.to_string().into(),
                        },
                        at: Utc::now(),
                    })
                    .await
                {
                    Ok(Ok(accepted)) => done(
                        device,
                        DeviceOutcome::Succeeded,
                        json!({"version": accepted.get("version")}),
                    ),
                    Ok(Err(e)) => failed(device, e.code(), e),
                    Err(e) => failed(device, "unavailable", e),
                }
            }
            Operation::SendCommand {
                name,
                payload,
                timeout_secs,
                ttl_secs,
            } => {
                let spec = CommandSpec {
                    name,
                    payload,
                    timeout: Duration::from_secs(timeout_secs),
                    queue_ttl: ttl_secs.map(Duration::from_secs),
                };
                match ctx.commands.send(&tenant, device, spec, by.actor).await {
                    Ok(ticket) if ticket.record.status == crate::storage::commands::CommandStatus::Queued => {
                        done(
                            device,
                            DeviceOutcome::Succeeded,
                            json!({"commandId": ticket.record.id, "status": "queued"}),
                        )
                    }
                    Ok(ticket) => {
                        let id = ticket.record.id.clone();
                        match ticket.finished.await {
                            Ok(record) => {
                                let ok = record.status == crate::storage::commands::CommandStatus::Succeeded;
                                done(
                                    device,
                                    if ok {
                                        DeviceOutcome::Succeeded
                                    } else {
                                        DeviceOutcome::Failed
                                    },
                                    json!({
                                        "commandId": id,
                                        "status": record.status.as_str(),
                                        "responseStatus": record.response_status,
                                        "response": record.response,
                                    }),
                                )
                            }
                            Err(_) => failed(device, "internal", "the command's outcome was lost"),
                        }
                    }
                    Err(CommandError::DeviceNotFound(_)) => {
                        store_failure(device, StoreError::NotFound(format!("device {device}")))
                    }
                    Err(CommandError::DeviceOffline(_)) => {
                        failed(device, "device_offline", "the device is offline")
                    }
                    Err(e) => failed(device, "command_failed", e),
                }
            }
            Operation::Enable | Operation::Disable => {
                let enable = op == Operation::Enable;
                match patch(DevicePatch {
                    enabled: Some(enable),
                    ..Default::default()
                })
                .await
                {
                    Ok(d) => {
                        if !enable {
                            end_device_session(&ctx.broker, &ctx.fleet, &tenant, device, "device disabled")
                                .await;
                        }
                        done(device, DeviceOutcome::Succeeded, json!({"enabled": d.enabled}))
                    }
                    Err(e) => store_failure(device, e),
                }
            }
            Operation::RotateTokens => {
                let token = secrets::new_secret(DEVICE_TOKEN_PREFIX);
                match ctx
                    .registry
                    .rotate_device_token(tenant.clone(), device.clone(), secrets::digest(&token), by)
                    .await
                {
                    Ok(()) => {
                        ctx.broker
                            .disconnect_device(&tenant, device, "device token rotated");
                        DeviceResult {
                            secret: Some(token),
                            ..done(device, DeviceOutcome::Succeeded, json!({"rotated": true}))
                        }
                    }
                    Err(e) => store_failure(device, e),
                }
            }
            Operation::Delete => match ctx
                .registry
                .delete_device(tenant.clone(), device.clone(), by)
                .await
            {
                Ok(()) => {
                    end_device_session(&ctx.broker, &ctx.fleet, &tenant, device, "device deleted").await;
                    if let Err(error) = ctx.shadows.delete_shadow(&tenant, device).await {
                        tracing::warn!(%device, %error, "could not forget the deleted device's shadow");
                    }
                    done(device, DeviceOutcome::Succeeded, json!({"deleted": true}))
                }
                Err(e) => store_failure(device, e),
            },
            Operation::UpdateFirmware { .. } => failed(
                device,
                "invalid_operation",
                "update_firmware runs as an OTA campaign, not per device",
            ),
        }
    }
}

#[async_trait]
impl JobExecutor for OperationExecutor {
    async fn execute(&self, plan: &JobPlan, device: &DeviceId) -> DeviceResult {
        match Operation::parse(&plan.operation, &plan.params) {
            Ok(op) => self.run(plan, op, device).await,
            Err(why) => failed(device, "invalid_operation", why),
        }
    }
}

// ---- the service ---------------------------------------------------------------------------

/// Creating, cancelling and resuming jobs; the HTTP handlers call it.
pub struct JobService {
    pub registry: RegistryStore,
    pub runner: Addr<JobActor>,
    campaigns: OnceLock<Arc<dyn CampaignLauncher>>,
}

impl JobService {
    pub fn new(registry: RegistryStore, runner: Addr<JobActor>) -> JobService {
        JobService {
            registry,
            runner,
            campaigns: OnceLock::new(),
        }
    }

    /// Connects `update_firmware` to the OTA campaigns.
    pub fn attach_campaigns(&self, launcher: Arc<dyn CampaignLauncher>) {
        let _ = self.campaigns.set(launcher);
    }

    pub fn campaigns(&self) -> Option<&Arc<dyn CampaignLauncher>> {
        self.campaigns.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_check_their_params() {
        assert_eq!(
            Operation::parse("add_tags", &json!({"tags": ["a"]})),
            Ok(Operation::AddTags {
                tags: vec!["a".into()]
            })
        );
        assert!(
            Operation::parse("add_tags", &json!({}))
                .unwrap_err()
                .contains("params.tags")
        );
        assert!(Operation::parse("add_tags", &json!({"tags": []})).is_err());
        assert!(Operation::parse("set_metadata", &json!({"metadata": 3})).is_err());
        assert!(Operation::parse("add_to_group", &json!({"group": "a/b"})).is_err());
        assert!(Operation::parse("delete", &json!({"x": 1})).is_err());
        assert_eq!(Operation::parse("delete", &Value::Null), Ok(Operation::Delete));
        assert!(Operation::parse("send_command", &json!({"name": "re/boot"})).is_err());
        assert!(Operation::parse("send_command", &json!({"name": "reboot", "timeoutSecs": 0})).is_err());
        assert!(
            Operation::parse("explode", &Value::Null)
                .unwrap_err()
                .contains("unknown operation")
        );
    }

    #[test]
    fn unknown_filter_keys_are_metadata_and_an_empty_filter_is_refused() {
        let f = parse_filter(&json!({"type": "sensor", "location": "warehouse-a", "floor": 3})).unwrap();
        assert_eq!(f.device_type.as_deref(), Some("sensor"));
        assert_eq!(
            f.metadata,
            vec![
                ("floor".to_string(), "3".to_string()),
                ("location".to_string(), "warehouse-a".to_string())
            ]
        );
        assert!(parse_filter(&json!({})).is_err());
        assert!(parse_filter(&json!({"all": true})).is_ok());
        assert!(parse_filter(&json!({"status": "sleepy"})).is_err());
        assert!(parse_filter(&json!({"deviceIds": ["bad id"]})).is_err());
        assert!(parse_filter(&json!([1])).is_err());
    }
}
