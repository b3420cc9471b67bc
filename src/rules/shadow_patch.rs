//! The "shadow patch" rule action: merges a patch into a device's desired state through its
//! device actor, like an operator's `PATCH /api/devices/{id}/shadow`, so the device gets the
//! delta on its shadow topics.

use std::sync::OnceLock;

use async_trait::async_trait;
use chrono::Utc;
use drover_actors::device_actor::{ShadowAction, ShadowRequest};
use drover_actors::rules::DesiredStatePatcher;
use drover_actors::{DeviceId, Fleet, TenantId};
use serde_json::{Value, json};

/// Patches shadows through the fleet's device actors. The rules engine starts before the
/// fleet (rule actors observe the pipeline the fleet is built with), so the fleet is attached
/// once it runs; a patch before that fails and is retried like any delivery.
#[derive(Default)]
pub struct FleetShadowPatcher {
    fleet: OnceLock<Fleet>,
}

impl FleetShadowPatcher {
    pub fn attach(&self, fleet: Fleet) {
        let _ = self.fleet.set(fleet);
    }
}

#[async_trait]
impl DesiredStatePatcher for FleetShadowPatcher {
    async fn patch_desired(&self, tenant: &TenantId, device: &DeviceId, patch: Value) -> Result<(), String> {
        let fleet = self.fleet.get().ok_or("device actors are not running yet")?;
        let actor = fleet
            .device(tenant, device)
            .await
            .map_err(|e| format!("device actors: {e}"))?
            .ok_or_else(|| format!("no device `{device}` in this tenant"))?;
        let body = json!({"state": {"desired": patch}});
        actor
            .send(ShadowRequest {
                action: ShadowAction::Update {
                    payload: body.to_string().into(),
                },
                at: Utc::now(),
            })
            .await
            .map_err(|e| format!("device actor: {e}"))?
            .map(|_| ())
            .map_err(|e| format!("shadow update refused ({}): {e}", e.code()))
    }
}
