//! The rule actors' [`RuleSource`]: rules from the registry, with group and tag scopes resolved
//! to their member devices at load time. Loading runs no script (the rule actors' thread is
//! shared by every tenant); the evaluation threads compile what is loaded.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use drover_actors::rules::{RuleSource, RuleSpec};
use drover_actors::{DeviceId, TenantId};

use crate::storage::RegistryStore;

pub struct RegistryRuleSource {
    pub registry: RegistryStore,
}

#[async_trait]
impl RuleSource for RegistryRuleSource {
    async fn tenant_rules(&self, tenant: &TenantId) -> Result<Vec<RuleSpec>, String> {
        let records = self
            .registry
            .list_rules(tenant)
            .await
            .map_err(|e| e.to_string())?;
        let mut specs = Vec::with_capacity(records.len());
        for record in records {
            let body = &record.body;
            let members = match body.scope.kind.as_str() {
                "group" => Some(
                    self.registry
                        .scope_members(tenant, body.scope.value.clone(), None)
                        .await,
                ),
                "tag" => Some(
                    self.registry
                        .scope_members(tenant, None, body.scope.value.clone())
                        .await,
                ),
                _ => None,
            };
            let members = match members.transpose() {
                Ok(m) => m.map(|m| Arc::new(m.into_iter().collect::<HashSet<DeviceId>>())),
                Err(e) => return Err(e.to_string()),
            };
            match body.to_spec(&record.id, tenant, members) {
                Ok(spec) => specs.push(spec),
                Err(error) => {
                    tracing::warn!(rule = %record.id, %error, "stored rule is invalid; not evaluated")
                }
            }
        }
        Ok(specs)
    }

    async fn active_alarms(&self, tenant: &TenantId) -> Result<Vec<(DeviceId, String)>, String> {
        self.registry
            .active_alarm_keys(tenant)
            .await
            .map_err(|e| e.to_string())
    }

    async fn connected_devices(&self, tenant: &TenantId) -> Result<Vec<(DeviceId, String)>, String> {
        self.registry
            .connected_device_types(tenant)
            .await
            .map_err(|e| e.to_string())
    }
}
