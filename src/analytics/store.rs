//! Registry access for analytics: configuration layers, model snapshots and events (tables of
//! `schema/*/2026-12-07-000300_analytics`). [`RegistryAnalyticsStore`] is the actors'
//! [`AnalyticsStore`]; the other functions serve the REST endpoints.

use std::collections::HashMap;

use async_trait::async_trait;
use diesel::prelude::*;
use drover_actors::analytics::actor::{AnalyticsStore, StoredAnalytics, TenantConfigs};
use drover_actors::analytics::monitor::{AnalyticsEvent, MonitorSnapshot};
use drover_actors::analytics::settings::AnalyticsConfig;
use drover_actors::{DeviceId, TenantId};
use serde::Serialize;

use crate::storage::RegistryStore;
use crate::storage::db::StoreError;
use crate::storage::registry::now_ms;
use crate::storage::schema::{analytics_configs, analytics_events, analytics_models, devices};

/// Where a configuration layer applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigScope {
    Tenant,
    DeviceType(String),
    Device(DeviceId),
}

impl ConfigScope {
    fn key(&self) -> (&'static str, &str) {
        match self {
            ConfigScope::Tenant => ("tenant", ""),
            ConfigScope::DeviceType(t) => ("device_type", t.as_str()),
            ConfigScope::Device(d) => ("device", d.as_str()),
        }
    }
}

/// A stored event, as the API lists it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    pub id: i64,
    pub device_id: String,
    /// Milliseconds since the Unix epoch of the message that raised it.
    pub ts: i64,
    /// `anomaly` or `drift`.
    pub kind: String,
    pub method: String,
    /// Threshold-relative: 1.0 is the method's threshold.
    pub score: f64,
    pub statistic: f64,
    pub metrics: Vec<String>,
    pub value: Option<f64>,
}

type EventRow = (i64, String, i64, String, String, f64, f64, String, Option<f64>);

fn event_from_row(r: EventRow) -> EventRecord {
    EventRecord {
        id: r.0,
        device_id: r.1,
        ts: r.2,
        kind: r.3,
        method: r.4,
        score: r.5,
        statistic: r.6,
        metrics: serde_json::from_str(&r.7).unwrap_or_default(),
        value: r.8,
    }
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

/// What [`list_events`] selects.
#[derive(Debug, Clone)]
pub struct EventFilter {
    pub device: Option<DeviceId>,
    pub kind: Option<String>,
    pub start_ms: i64,
    pub end_ms: i64,
    pub limit: i64,
}

/// Events of `tenant` in `filter`, newest first.
pub async fn list_events(
    registry: &RegistryStore,
    tenant: &TenantId,
    filter: EventFilter,
) -> Result<Vec<EventRecord>, StoreError> {
    let tenant = tenant.clone();
    registry
        .database()
        .read(move |conn| {
            let mut q = analytics_events::table
                .filter(analytics_events::tenant_id.eq(tenant.as_str()))
                .filter(analytics_events::at.ge(filter.start_ms))
                .filter(analytics_events::at.lt(filter.end_ms))
                .into_boxed();
            if let Some(device) = &filter.device {
                q = q.filter(analytics_events::device_id.eq(device.as_str().to_string()));
            }
            if let Some(kind) = &filter.kind {
                q = q.filter(analytics_events::kind.eq(kind.clone()));
            }
            let rows: Vec<EventRow> = q
                .order((analytics_events::at.desc(), analytics_events::id.desc()))
                .limit(filter.limit)
                .select((
                    analytics_events::id,
                    analytics_events::device_id,
                    analytics_events::at,
                    analytics_events::kind,
                    analytics_events::method,
                    analytics_events::score,
                    analytics_events::statistic,
                    analytics_events::metrics,
                    analytics_events::value,
                ))
                .load(conn)?;
            Ok(rows.into_iter().map(event_from_row).collect())
        })
        .await
}

/// One configuration layer (`None`: not set).
pub async fn get_config(
    registry: &RegistryStore,
    tenant: &TenantId,
    scope: ConfigScope,
) -> Result<Option<AnalyticsConfig>, StoreError> {
    let tenant = tenant.clone();
    registry
        .database()
        .read(move |conn| {
            let (scope, target) = scope.key();
            let text: Option<String> = analytics_configs::table
                .filter(analytics_configs::tenant_id.eq(tenant.as_str()))
                .filter(analytics_configs::scope.eq(scope))
                .filter(analytics_configs::target.eq(target))
                .select(analytics_configs::config)
                .first(conn)
                .optional()?;
            text.map(|t| serde_json::from_str(&t).map_err(internal))
                .transpose()
        })
        .await
}

/// Sets (or with `None` removes) one configuration layer.
pub async fn put_config(
    registry: &RegistryStore,
    tenant: &TenantId,
    scope: ConfigScope,
    config: Option<AnalyticsConfig>,
) -> Result<(), StoreError> {
    let tenant = tenant.clone();
    registry
        .database()
        .write(move |conn| {
            let (scope_name, target) = scope.key();
            diesel::delete(
                analytics_configs::table
                    .filter(analytics_configs::tenant_id.eq(tenant.as_str()))
                    .filter(analytics_configs::scope.eq(scope_name))
                    .filter(analytics_configs::target.eq(target)),
            )
            .execute(conn)?;
            if let Some(config) = config {
                let text = serde_json::to_string(&config).map_err(internal)?;
                diesel::insert_into(analytics_configs::table)
                    .values((
                        analytics_configs::tenant_id.eq(tenant.as_str()),
                        analytics_configs::scope.eq(scope_name),
                        analytics_configs::target.eq(target),
                        analytics_configs::config.eq(&text),
                        analytics_configs::updated_at.eq(now_ms()),
                    ))
                    .execute(conn)?;
            }
            Ok(())
        })
        .await
}

fn load_configs(
    conn: &mut crate::storage::db::DbConnection,
    tenant: &TenantId,
) -> Result<TenantConfigs, StoreError> {
    let rows: Vec<(String, String, String)> = analytics_configs::table
        .filter(analytics_configs::tenant_id.eq(tenant.as_str()))
        .select((
            analytics_configs::scope,
            analytics_configs::target,
            analytics_configs::config,
        ))
        .load(conn)?;
    let mut configs = TenantConfigs::default();
    for (scope, target, text) in rows {
        let Ok(config) = serde_json::from_str::<AnalyticsConfig>(&text) else {
            tracing::warn!(%tenant, scope, target, "stored analytics configuration unreadable; skipped");
            continue;
        };
        match scope.as_str() {
            "tenant" => configs.tenant = config,
            "device_type" => {
                configs.device_types.insert(target, config);
            }
            "device" => {
                if let Ok(device) = DeviceId::parse(&target) {
                    configs.devices.insert(device, config);
                }
            }
            _ => {}
        }
    }
    Ok(configs)
}

/// The registry as the analytics actors' store.
#[derive(Clone)]
pub struct RegistryAnalyticsStore {
    pub registry: RegistryStore,
}

#[async_trait]
impl AnalyticsStore for RegistryAnalyticsStore {
    async fn load(&self, tenant: &TenantId) -> Result<StoredAnalytics, String> {
        let tenant = tenant.clone();
        self.registry
            .database()
            .read(move |conn| {
                let configs = load_configs(conn, &tenant)?;
                let rows: Vec<(String, String)> = analytics_models::table
                    .filter(analytics_models::tenant_id.eq(tenant.as_str()))
                    .select((analytics_models::device_id, analytics_models::snapshot))
                    .load(conn)?;
                let snapshots = rows
                    .into_iter()
                    .filter_map(|(device, text)| {
                        let device = DeviceId::parse(&device).ok()?;
                        let snapshot: MonitorSnapshot = serde_json::from_str(&text).ok()?;
                        Some((device, snapshot))
                    })
                    .collect();
                Ok(StoredAnalytics { configs, snapshots })
            })
            .await
            .map_err(|e| e.to_string())
    }

    async fn load_configs(&self, tenant: &TenantId) -> Result<TenantConfigs, String> {
        let tenant = tenant.clone();
        self.registry
            .database()
            .read(move |conn| load_configs(conn, &tenant))
            .await
            .map_err(|e| e.to_string())
    }

    async fn save_snapshots(
        &self,
        tenant: &TenantId,
        snapshots: Vec<(DeviceId, MonitorSnapshot)>,
    ) -> Result<(), String> {
        let tenant = tenant.clone();
        let texts: Vec<(String, String)> = snapshots
            .into_iter()
            .filter_map(|(d, s)| Some((d.into_string(), serde_json::to_string(&s).ok()?)))
            .collect();
        self.registry
            .database()
            .write(move |conn| {
                let existing =
                    existing_devices(conn, &tenant, texts.iter().map(|(d, _)| d.clone()).collect())?;
                let now = now_ms();
                for (device, text) in texts.iter().filter(|(d, _)| existing.contains_key(d)) {
                    diesel::delete(
                        analytics_models::table
                            .filter(analytics_models::tenant_id.eq(tenant.as_str()))
                            .filter(analytics_models::device_id.eq(device)),
                    )
                    .execute(conn)?;
                    diesel::insert_into(analytics_models::table)
                        .values((
                            analytics_models::tenant_id.eq(tenant.as_str()),
                            analytics_models::device_id.eq(device),
                            analytics_models::snapshot.eq(text),
                            analytics_models::updated_at.eq(now),
                        ))
                        .execute(conn)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())
    }

    async fn record_events(
        &self,
        tenant: &TenantId,
        events: Vec<(DeviceId, AnalyticsEvent)>,
    ) -> Result<(), String> {
        let tenant = tenant.clone();
        self.registry
            .database()
            .write(move |conn| {
                let existing = existing_devices(
                    conn,
                    &tenant,
                    events.iter().map(|(d, _)| d.as_str().to_string()).collect(),
                )?;
                // A device deleted since its telemetry arrived has no events to keep.
                let rows: Vec<_> = events
                    .iter()
                    .filter(|(d, _)| existing.contains_key(d.as_str()))
                    .map(|(d, e)| {
                        (
                            analytics_events::tenant_id.eq(tenant.as_str()),
                            analytics_events::device_id.eq(d.as_str()),
                            analytics_events::at.eq(e.ts_ms),
                            analytics_events::kind.eq(e.kind.as_str()),
                            analytics_events::method.eq(e.method.as_str()),
                            analytics_events::score.eq(finite(e.score)),
                            analytics_events::statistic.eq(finite(e.statistic)),
                            analytics_events::metrics
                                .eq(serde_json::to_string(&e.metrics).unwrap_or_else(|_| "[]".into())),
                            analytics_events::value.eq(e.value.filter(|v| v.is_finite())),
                        )
                    })
                    .collect();
                // One statement per row: diesel's MultiConnection has no batch insert for both
                // backends; the rows share one transaction.
                for row in rows {
                    diesel::insert_into(analytics_events::table)
                        .values(row)
                        .execute(conn)?;
                }
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())
    }
}

/// Infinite statistics (a change from a flat history) are stored as the largest finite value.
fn finite(v: f64) -> f64 {
    if v.is_finite() { v } else { f64::MAX.copysign(v) }
}

fn existing_devices(
    conn: &mut crate::storage::db::DbConnection,
    tenant: &TenantId,
    mut ids: Vec<String>,
) -> Result<HashMap<String, ()>, StoreError> {
    ids.sort();
    ids.dedup();
    let mut found = HashMap::new();
    for chunk in ids.chunks(500) {
        let rows: Vec<String> = devices::table
            .filter(devices::tenant_id.eq(tenant.as_str()))
            .filter(devices::device_id.eq_any(chunk))
            .select(devices::device_id)
            .load(conn)?;
        found.extend(rows.into_iter().map(|d| (d, ())));
    }
    Ok(found)
}
