//! Registry access for the rules engine: rules, named channels, alarms, their event history
//! and delivery log. API changes are written in one transaction with their audit entry, like
//! the rest of the registry; changes made by the engine itself (raise, auto-clear, escalation)
//! are recorded in the alarm's own history instead.

use diesel::prelude::*;
use drover_actors::rules::Severity;
use drover_actors::{DeviceId, GroupName, TenantId};
use serde_json::{Value, json};

use super::db::{DbConnection, StoreError};
use super::records::AuditActor;
use super::registry::{RegistryStore, audit, insert_audit};
use super::schema::*;
use crate::rules::model::{ChannelBody, RuleBody};

/// A stored rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleRecord {
    pub id: String,
    pub tenant: TenantId,
    pub body: RuleBody,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A stored channel; the secret stays sealed.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelRecord {
    pub id: String,
    pub tenant: TenantId,
    pub body: ChannelBody,
    pub secret_sealed: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// An alarm.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmRecord {
    pub id: String,
    pub tenant: TenantId,
    pub rule_id: String,
    pub rule_name: String,
    pub device: String,
    pub severity: Severity,
    pub active: bool,
    pub acknowledged: bool,
    pub count: i64,
    pub first_seen: i64,
    pub last_seen: i64,
    pub acked_at: Option<i64>,
    pub acked_by: Option<String>,
    pub cleared_at: Option<i64>,
    pub cleared_by: Option<String>,
    pub value: Option<f64>,
    pub details: Value,
    pub escalation_step: i32,
    pub next_escalation_at: Option<i64>,
}

impl AlarmRecord {
    /// ThingsBoard's four states.
    pub fn status(&self) -> &'static str {
        status_name(self.active, self.acknowledged)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AlarmEventRecord {
    pub at: i64,
    pub kind: String,
    pub actor: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    pub at: i64,
    pub channel: String,
    pub kind: String,
    pub step: i32,
    pub attempts: i32,
    pub outcome: String,
    pub detail: String,
}

/// A delivery attempt's result, to record.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub alarm_id: String,
    pub at: i64,
    pub channel: String,
    pub kind: String,
    pub step: i32,
    pub attempts: i32,
    pub delivered: bool,
    pub detail: String,
}

/// What raising did.
#[derive(Debug, Clone, PartialEq)]
pub enum RaiseOutcome {
    /// A new alarm; `quiet` when a previous one of the same (device, rule) cleared within the
    /// rule's quiet period.
    Created { alarm: AlarmRecord, quiet: bool },
    /// The active alarm was updated (count, last seen, maybe severity).
    Updated { alarm: AlarmRecord, severity_rose: bool },
}

/// Filters of `GET /api/alerts`.
#[derive(Debug, Clone, Default)]
pub struct AlarmFilter {
    pub status: Option<String>,
    pub active: Option<bool>,
    pub acknowledged: Option<bool>,
    pub severity: Option<Severity>,
    pub device: Option<String>,
    pub rule_id: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: i64,
}

type AlarmRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    bool,
    bool,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<f64>,
    String,
    i32,
    Option<i64>,
);

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

fn tenant_of(s: String) -> Result<TenantId, StoreError> {
    TenantId::parse(s).map_err(internal)
}

fn alarm_from_row(r: AlarmRow) -> Result<AlarmRecord, StoreError> {
    Ok(AlarmRecord {
        id: r.0,
        tenant: tenant_of(r.1)?,
        rule_id: r.2,
        rule_name: r.3,
        device: r.4,
        severity: Severity::parse(&r.5).ok_or_else(|| internal("stored severity"))?,
        active: r.6,
        acknowledged: r.7,
        count: r.8,
        first_seen: r.9,
        last_seen: r.10,
        acked_at: r.11,
        acked_by: r.12,
        cleared_at: r.13,
        cleared_by: r.14,
        value: r.15,
        details: serde_json::from_str(&r.16).unwrap_or(Value::Null),
        escalation_step: r.17,
        next_escalation_at: r.18,
    })
}

macro_rules! alarm_columns {
    () => {
        (
            alarms::id,
            alarms::tenant_id,
            alarms::rule_id,
            alarms::rule_name,
            alarms::device_id,
            alarms::severity,
            alarms::active,
            alarms::acknowledged,
            alarms::count,
            alarms::first_seen,
            alarms::last_seen,
            alarms::acked_at,
            alarms::acked_by,
            alarms::cleared_at,
            alarms::cleared_by,
            alarms::value,
            alarms::details,
            alarms::escalation_step,
            alarms::next_escalation_at,
        )
    };
}

fn load_alarm(conn: &mut DbConnection, id: &str) -> Result<Option<AlarmRecord>, StoreError> {
    let row: Option<AlarmRow> = alarms::table
        .filter(alarms::id.eq(id))
        .select(alarm_columns!())
        .first(conn)
        .optional()?;
    row.map(alarm_from_row).transpose()
}

fn tenant_alarm(conn: &mut DbConnection, tenant: &TenantId, id: &str) -> Result<AlarmRecord, StoreError> {
    match load_alarm(conn, id)? {
        Some(a) if &a.tenant == tenant => Ok(a),
        _ => Err(StoreError::NotFound(format!("alert {id}"))),
    }
}

pub(crate) fn insert_event(
    conn: &mut DbConnection,
    alarm_id: &str,
    at: i64,
    kind: &str,
    actor: Option<&str>,
    message: &str,
) -> Result<(), StoreError> {
    diesel::insert_into(alarm_events::table)
        .values((
            alarm_events::alarm_id.eq(alarm_id),
            alarm_events::at.eq(at),
            alarm_events::kind.eq(kind),
            alarm_events::actor.eq(actor),
            alarm_events::message.eq(message),
        ))
        .execute(conn)?;
    Ok(())
}

/// Marks an alarm cleared (stopping its escalation) and records why.
fn close_alarm(
    conn: &mut DbConnection,
    id: &str,
    at: i64,
    by: Option<&str>,
    why: &str,
) -> Result<(), StoreError> {
    diesel::update(alarms::table.filter(alarms::id.eq(id)))
        .set((
            alarms::active.eq(false),
            alarms::cleared_at.eq(Some(at)),
            alarms::cleared_by.eq(Some(by.unwrap_or("rule"))),
            alarms::next_escalation_at.eq(None::<i64>),
        ))
        .execute(conn)?;
    insert_event(conn, id, at, "cleared", by, why)
}

/// ThingsBoard's name of an alarm state.
fn status_name(active: bool, acknowledged: bool) -> &'static str {
    match (active, acknowledged) {
        (true, false) => "ACTIVE_UNACK",
        (true, true) => "ACTIVE_ACK",
        (false, false) => "CLEARED_UNACK",
        (false, true) => "CLEARED_ACK",
    }
}

fn rule_from_row(row: (String, String, String, i64, i64)) -> Result<RuleRecord, StoreError> {
    Ok(RuleRecord {
        id: row.0,
        tenant: tenant_of(row.1)?,
        body: serde_json::from_str(&row.2).map_err(|e| internal(format!("stored rule: {e}")))?,
        created_at: row.3,
        updated_at: row.4,
    })
}

type ChannelRow = (String, String, String, Option<String>, i64, i64);

fn channel_from_row(row: ChannelRow) -> Result<ChannelRecord, StoreError> {
    Ok(ChannelRecord {
        id: row.0,
        tenant: tenant_of(row.1)?,
        body: serde_json::from_str(&row.2).map_err(|e| internal(format!("stored channel: {e}")))?,
        secret_sealed: row.3,
        created_at: row.4,
        updated_at: row.5,
    })
}

fn name_taken(what: &str, name: &str) -> impl FnOnce(diesel::result::Error) -> StoreError {
    let message = format!("a {what} named {name:?} already exists");
    move |e| match StoreError::from(e) {
        StoreError::AlreadyExists(_) => StoreError::AlreadyExists(message),
        other => other,
    }
}

impl RegistryStore {
    // ---- rules -----------------------------------------------------------------------------

    pub async fn create_rule(
        &self,
        tenant: TenantId,
        body: RuleBody,
        by: AuditActor,
    ) -> Result<RuleRecord, StoreError> {
        self.database()
            .write(move |conn| {
                let now = super::registry::now_ms();
                let id = uuid::Uuid::now_v7().to_string();
                let text = serde_json::to_string(&body).map_err(internal)?;
                diesel::insert_into(rules::table)
                    .values((
                        rules::id.eq(&id),
                        rules::tenant_id.eq(tenant.as_str()),
                        rules::name.eq(&body.name),
                        rules::enabled.eq(body.enabled),
                        rules::body.eq(&text),
                        rules::created_at.eq(now),
                        rules::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .map_err(name_taken("rule", &body.name))?;
                insert_audit(
                    conn,
                    &audit(&by, "rule.create", &id, Some(json!({ "name": body.name }))),
                )?;
                Ok(RuleRecord {
                    id,
                    tenant,
                    body,
                    created_at: now,
                    updated_at: now,
                })
            })
            .await
    }

    pub async fn list_rules(&self, tenant: &TenantId) -> Result<Vec<RuleRecord>, StoreError> {
        let tenant = tenant.clone();
        self.database()
            .read(move |conn| {
                let rows: Vec<(String, String, String, i64, i64)> = rules::table
                    .filter(rules::tenant_id.eq(tenant.as_str()))
                    .order(rules::created_at)
                    .select((
                        rules::id,
                        rules::tenant_id,
                        rules::body,
                        rules::created_at,
                        rules::updated_at,
                    ))
                    .load(conn)?;
                rows.into_iter().map(rule_from_row).collect()
            })
            .await
    }

    pub async fn get_rule(&self, tenant: &TenantId, id: &str) -> Result<Option<RuleRecord>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.to_string());
        self.database()
            .read(move |conn| {
                let row: Option<(String, String, String, i64, i64)> = rules::table
                    .filter(rules::tenant_id.eq(tenant.as_str()))
                    .filter(rules::id.eq(&id))
                    .select((
                        rules::id,
                        rules::tenant_id,
                        rules::body,
                        rules::created_at,
                        rules::updated_at,
                    ))
                    .first(conn)
                    .optional()?;
                row.map(rule_from_row).transpose()
            })
            .await
    }

    pub async fn update_rule(
        &self,
        tenant: TenantId,
        id: String,
        body: RuleBody,
        by: AuditActor,
    ) -> Result<RuleRecord, StoreError> {
        self.database()
            .write(move |conn| {
                let now = super::registry::now_ms();
                let text = serde_json::to_string(&body).map_err(internal)?;
                let changed = diesel::update(
                    rules::table
                        .filter(rules::tenant_id.eq(tenant.as_str()))
                        .filter(rules::id.eq(&id)),
                )
                .set((
                    rules::name.eq(&body.name),
                    rules::enabled.eq(body.enabled),
                    rules::body.eq(&text),
                    rules::updated_at.eq(now),
                ))
                .execute(conn)
                .map_err(name_taken("rule", &body.name))?;
                if changed == 0 {
                    return Err(StoreError::NotFound(format!("rule {id}")));
                }
                insert_audit(
                    conn,
                    &audit(&by, "rule.update", &id, Some(json!({ "name": body.name }))),
                )?;
                let row: (String, String, String, i64, i64) = rules::table
                    .filter(rules::id.eq(&id))
                    .select((
                        rules::id,
                        rules::tenant_id,
                        rules::body,
                        rules::created_at,
                        rules::updated_at,
                    ))
                    .first(conn)?;
                rule_from_row(row)
            })
            .await
    }

    /// Deletes a rule; its active alarms are cleared (by `rule deleted`).
    pub async fn delete_rule(
        &self,
        tenant: TenantId,
        id: String,
        at: i64,
        by: AuditActor,
    ) -> Result<(), StoreError> {
        self.database()
            .write(move |conn| {
                let removed = diesel::delete(
                    rules::table
                        .filter(rules::tenant_id.eq(tenant.as_str()))
                        .filter(rules::id.eq(&id)),
                )
                .execute(conn)?;
                if removed == 0 {
                    return Err(StoreError::NotFound(format!("rule {id}")));
                }
                let active: Vec<String> = alarms::table
                    .filter(alarms::tenant_id.eq(tenant.as_str()))
                    .filter(alarms::rule_id.eq(&id))
                    .filter(alarms::active.eq(true))
                    .select(alarms::id)
                    .load(conn)?;
                for alarm in &active {
                    close_alarm(conn, alarm, at, Some(&by.actor), "rule deleted")?;
                }
                insert_audit(conn, &audit(&by, "rule.delete", &id, None))
            })
            .await
    }

    /// Devices of a group or with a tag, for rule scopes.
    pub async fn scope_members(
        &self,
        tenant: &TenantId,
        group: Option<String>,
        tag: Option<String>,
    ) -> Result<Vec<DeviceId>, StoreError> {
        let tenant = tenant.clone();
        self.database()
            .read(move |conn| {
                // Through the registry's device filter, so a dynamic group's scope follows its query.
                let ids: Vec<String> = if let Some(group) = group {
                    let name = GroupName::parse(group).map_err(internal)?;
                    let filter = crate::storage::records::DeviceFilter {
                        group: Some(name),
                        ..Default::default()
                    };
                    crate::storage::registry::matching_device_ids(conn, &tenant, filter)?
                } else if let Some(tag) = tag {
                    device_tags::table
                        .filter(device_tags::tenant_id.eq(tenant.as_str()))
                        .filter(device_tags::tag.eq(tag))
                        .select(device_tags::device_id)
                        .load(conn)?
                } else {
                    Vec::new()
                };
                Ok(ids.into_iter().filter_map(|d| DeviceId::parse(d).ok()).collect())
            })
            .await
    }

    // ---- channels --------------------------------------------------------------------------

    pub async fn create_channel(
        &self,
        tenant: TenantId,
        body: ChannelBody,
        secret_sealed: Option<String>,
        by: AuditActor,
    ) -> Result<ChannelRecord, StoreError> {
        self.database()
            .write(move |conn| {
                let now = super::registry::now_ms();
                let id = uuid::Uuid::now_v7().to_string();
                let body = body.without_secret();
                diesel::insert_into(rule_channels::table)
                    .values((
                        rule_channels::id.eq(&id),
                        rule_channels::tenant_id.eq(tenant.as_str()),
                        rule_channels::name.eq(&body.name),
                        rule_channels::kind.eq(body.kind.as_str()),
                        rule_channels::config.eq(serde_json::to_string(&body).map_err(internal)?),
                        rule_channels::secret.eq(secret_sealed.as_deref()),
                        rule_channels::created_at.eq(now),
                        rule_channels::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .map_err(name_taken("channel", &body.name))?;
                insert_audit(conn, &audit(&by, "channel.create", &body.name, None))?;
                Ok(ChannelRecord {
                    id,
                    tenant,
                    body,
                    secret_sealed,
                    created_at: now,
                    updated_at: now,
                })
            })
            .await
    }

    pub async fn list_channels(&self, tenant: &TenantId) -> Result<Vec<ChannelRecord>, StoreError> {
        let tenant = tenant.clone();
        self.database()
            .read(move |conn| {
                let rows: Vec<ChannelRow> = rule_channels::table
                    .filter(rule_channels::tenant_id.eq(tenant.as_str()))
                    .order(rule_channels::name)
                    .select((
                        rule_channels::id,
                        rule_channels::tenant_id,
                        rule_channels::config,
                        rule_channels::secret,
                        rule_channels::created_at,
                        rule_channels::updated_at,
                    ))
                    .load(conn)?;
                rows.into_iter().map(channel_from_row).collect()
            })
            .await
    }

    /// A channel by id or by name.
    pub async fn get_channel(
        &self,
        tenant: &TenantId,
        key: &str,
    ) -> Result<Option<ChannelRecord>, StoreError> {
        let (tenant, key) = (tenant.clone(), key.to_string());
        self.database()
            .read(move |conn| {
                let row: Option<ChannelRow> = rule_channels::table
                    .filter(rule_channels::tenant_id.eq(tenant.as_str()))
                    .filter(rule_channels::id.eq(&key).or(rule_channels::name.eq(&key)))
                    .select((
                        rule_channels::id,
                        rule_channels::tenant_id,
                        rule_channels::config,
                        rule_channels::secret,
                        rule_channels::created_at,
                        rule_channels::updated_at,
                    ))
                    .first(conn)
                    .optional()?;
                row.map(channel_from_row).transpose()
            })
            .await
    }

    /// Replaces a channel's settings; `secret_sealed: None` keeps the stored secret.
    pub async fn update_channel(
        &self,
        tenant: TenantId,
        key: String,
        body: ChannelBody,
        secret_sealed: Option<String>,
        by: AuditActor,
    ) -> Result<ChannelRecord, StoreError> {
        let this = self.clone();
        let current = self
            .get_channel(&tenant, &key)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("channel {key}")))?;
        let id = current.id.clone();
        this.database()
            .write(move |conn| {
                let now = super::registry::now_ms();
                let body = body.without_secret();
                let secret = secret_sealed.or(current.secret_sealed);
                diesel::update(rule_channels::table.filter(rule_channels::id.eq(&id)))
                    .set((
                        rule_channels::name.eq(&body.name),
                        rule_channels::kind.eq(body.kind.as_str()),
                        rule_channels::config.eq(serde_json::to_string(&body).map_err(internal)?),
                        rule_channels::secret.eq(secret.as_deref()),
                        rule_channels::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .map_err(name_taken("channel", &body.name))?;
                insert_audit(conn, &audit(&by, "channel.update", &body.name, None))?;
                Ok(ChannelRecord {
                    id,
                    tenant,
                    body,
                    secret_sealed: secret,
                    created_at: current.created_at,
                    updated_at: now,
                })
            })
            .await
    }

    pub async fn delete_channel(
        &self,
        tenant: TenantId,
        key: String,
        by: AuditActor,
    ) -> Result<(), StoreError> {
        self.database()
            .write(move |conn| {
                let removed = diesel::delete(
                    rule_channels::table
                        .filter(rule_channels::tenant_id.eq(tenant.as_str()))
                        .filter(rule_channels::id.eq(&key).or(rule_channels::name.eq(&key))),
                )
                .execute(conn)?;
                if removed == 0 {
                    return Err(StoreError::NotFound(format!("channel {key}")));
                }
                insert_audit(conn, &audit(&by, "channel.delete", &key, None))
            })
            .await
    }

    // ---- alarms: the engine's side ---------------------------------------------------------

    /// (device, rule id) of every active alarm of a tenant.
    pub async fn active_alarm_keys(&self, tenant: &TenantId) -> Result<Vec<(DeviceId, String)>, StoreError> {
        let tenant = tenant.clone();
        self.database()
            .read(move |conn| {
                let rows: Vec<(String, String)> = alarms::table
                    .filter(alarms::tenant_id.eq(tenant.as_str()))
                    .filter(alarms::active.eq(true))
                    .select((alarms::device_id, alarms::rule_id))
                    .load(conn)?;
                Ok(rows
                    .into_iter()
                    .filter_map(|(d, r)| DeviceId::parse(d).ok().map(|d| (d, r)))
                    .collect())
            })
            .await
    }

    /// The tenant's devices connected to any node now, with their type (from the presence
    /// records every node writes).
    pub async fn connected_device_types(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<(DeviceId, String)>, StoreError> {
        let tenant = tenant.clone();
        self.database()
            .read(move |conn| {
                let rows: Vec<(String, String)> = devices::table
                    .filter(devices::tenant_id.eq(tenant.as_str()))
                    .filter(devices::connected.eq(true))
                    .select((devices::device_id, devices::device_type))
                    .load(conn)?;
                Ok(rows
                    .into_iter()
                    .filter_map(|(d, t)| DeviceId::parse(d).ok().map(|d| (d, t)))
                    .collect())
            })
            .await
    }

    /// Opens the (device, rule) alarm or updates the active one. The database allows one active
    /// alarm per (tenant, rule, device) (`alarms_one_active`): when another writer (another
    /// node of a cluster) opened it between this one's read and insert, the insert is refused
    /// and the raise is applied again, now as an update of that alarm.
    #[allow(clippy::too_many_arguments)]
    pub async fn raise_alarm(
        &self,
        tenant: TenantId,
        rule_id: String,
        rule_name: String,
        device: String,
        severity: Severity,
        value: Option<f64>,
        occurrences: u32,
        details: Value,
        at: i64,
        quiet_period_ms: i64,
        first_escalation_ms: Option<i64>,
    ) -> Result<RaiseOutcome, StoreError> {
        let attempt = || {
            self.raise_alarm_once(
                tenant.clone(),
                rule_id.clone(),
                rule_name.clone(),
                device.clone(),
                severity,
                value,
                occurrences,
                details.clone(),
                at,
                quiet_period_ms,
                first_escalation_ms,
            )
        };
        match attempt().await {
            Err(StoreError::AlreadyExists(_)) => attempt().await,
            outcome => outcome,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn raise_alarm_once(
        &self,
        tenant: TenantId,
        rule_id: String,
        rule_name: String,
        device: String,
        severity: Severity,
        value: Option<f64>,
        occurrences: u32,
        details: Value,
        at: i64,
        quiet_period_ms: i64,
        first_escalation_ms: Option<i64>,
    ) -> Result<RaiseOutcome, StoreError> {
        self.database()
            .write(move |conn| {
                let active: Option<String> = alarms::table
                    .filter(alarms::tenant_id.eq(tenant.as_str()))
                    .filter(alarms::rule_id.eq(&rule_id))
                    .filter(alarms::device_id.eq(&device))
                    .filter(alarms::active.eq(true))
                    .select(alarms::id)
                    .first(conn)
                    .optional()?;
                let details_text = details.to_string();
                if let Some(id) = active {
                    let current = load_alarm(conn, &id)?.ok_or_else(|| internal("alarm vanished"))?;
                    let rose = severity > current.severity;
                    let new_severity = current.severity.max(severity);
                    diesel::update(alarms::table.filter(alarms::id.eq(&id)))
                        .set((
                            alarms::count.eq(alarms::count + i64::from(occurrences)),
                            alarms::last_seen.eq(at),
                            alarms::severity.eq(new_severity.as_str()),
                            alarms::value.eq(value),
                            alarms::details.eq(&details_text),
                        ))
                        .execute(conn)?;
                    if rose {
                        insert_event(
                            conn,
                            &id,
                            at,
                            "severity",
                            None,
                            &format!(
                                "severity rose from {} to {}",
                                current.severity.as_str(),
                                severity.as_str()
                            ),
                        )?;
                    }
                    let alarm = load_alarm(conn, &id)?.ok_or_else(|| internal("alarm vanished"))?;
                    return Ok(RaiseOutcome::Updated {
                        alarm,
                        severity_rose: rose,
                    });
                }
                let last_cleared: Option<Option<i64>> = alarms::table
                    .filter(alarms::tenant_id.eq(tenant.as_str()))
                    .filter(alarms::rule_id.eq(&rule_id))
                    .filter(alarms::device_id.eq(&device))
                    .filter(alarms::active.eq(false))
                    .select(diesel::dsl::max(alarms::cleared_at))
                    .first(conn)
                    .optional()?;
                let quiet =
                    quiet_period_ms > 0 && last_cleared.flatten().is_some_and(|c| at - c < quiet_period_ms);
                let id = uuid::Uuid::now_v7().to_string();
                diesel::insert_into(alarms::table)
                    .values((
                        alarms::id.eq(&id),
                        alarms::tenant_id.eq(tenant.as_str()),
                        alarms::rule_id.eq(&rule_id),
                        alarms::rule_name.eq(&rule_name),
                        alarms::device_id.eq(&device),
                        alarms::severity.eq(severity.as_str()),
                        alarms::active.eq(true),
                        alarms::acknowledged.eq(false),
                        alarms::count.eq(i64::from(occurrences.max(1))),
                        alarms::first_seen.eq(at),
                        alarms::last_seen.eq(at),
                        alarms::value.eq(value),
                        alarms::details.eq(&details_text),
                        alarms::escalation_step.eq(1),
                        alarms::next_escalation_at.eq(first_escalation_ms.map(|d| at + d)),
                    ))
                    .execute(conn)?;
                insert_event(
                    conn,
                    &id,
                    at,
                    "created",
                    None,
                    &format!("{} on {device}", severity.as_str()),
                )?;
                if quiet {
                    insert_event(
                        conn,
                        &id,
                        at,
                        "suppressed",
                        None,
                        "quiet period after the previous alarm: not notified",
                    )?;
                }
                let alarm = load_alarm(conn, &id)?.ok_or_else(|| internal("alarm vanished"))?;
                Ok(RaiseOutcome::Created { alarm, quiet })
            })
            .await
    }

    /// Clears the active (device, rule) alarm because its clear condition held, counting the
    /// `repeats` that were not reported yet.
    pub async fn auto_clear_alarm(
        &self,
        tenant: TenantId,
        rule_id: String,
        device: String,
        repeats: u32,
        at: i64,
    ) -> Result<Option<AlarmRecord>, StoreError> {
        self.database()
            .write(move |conn| {
                let id: Option<String> = alarms::table
                    .filter(alarms::tenant_id.eq(tenant.as_str()))
                    .filter(alarms::rule_id.eq(&rule_id))
                    .filter(alarms::device_id.eq(&device))
                    .filter(alarms::active.eq(true))
                    .select(alarms::id)
                    .first(conn)
                    .optional()?;
                let Some(id) = id else { return Ok(None) };
                if repeats > 0 {
                    diesel::update(alarms::table.filter(alarms::id.eq(&id)))
                        .set(alarms::count.eq(alarms::count + i64::from(repeats)))
                        .execute(conn)?;
                }
                close_alarm(conn, &id, at, None, "the clear condition held")?;
                load_alarm(conn, &id)
            })
            .await
    }

    /// Active, unacknowledged alarms whose next escalation step is due.
    pub async fn due_escalations(&self, now: i64, limit: i64) -> Result<Vec<AlarmRecord>, StoreError> {
        self.database()
            .read(move |conn| {
                let rows: Vec<AlarmRow> = alarms::table
                    .filter(alarms::next_escalation_at.le(now))
                    .filter(alarms::active.eq(true))
                    .filter(alarms::acknowledged.eq(false))
                    .order(alarms::next_escalation_at)
                    .limit(limit)
                    .select(alarm_columns!())
                    .load(conn)?;
                rows.into_iter().map(alarm_from_row).collect()
            })
            .await
    }

    /// Moves an alarm past escalation step `step` (only if it is still there: one node fires it).
    pub async fn advance_escalation(
        &self,
        id: String,
        step: i32,
        next_at: Option<i64>,
        at: i64,
        message: String,
    ) -> Result<bool, StoreError> {
        self.database()
            .write(move |conn| {
                let changed = diesel::update(
                    alarms::table
                        .filter(alarms::id.eq(&id))
                        .filter(alarms::escalation_step.eq(step))
                        .filter(alarms::active.eq(true))
                        .filter(alarms::acknowledged.eq(false)),
                )
                .set((
                    alarms::escalation_step.eq(step + 1),
                    alarms::next_escalation_at.eq(next_at),
                ))
                .execute(conn)?;
                if changed > 0 {
                    insert_event(conn, &id, at, "escalated", None, &message)?;
                }
                Ok(changed > 0)
            })
            .await
    }

    pub async fn record_delivery(&self, d: NewDelivery) -> Result<(), StoreError> {
        self.database()
            .write(move |conn| {
                diesel::insert_into(alarm_deliveries::table)
                    .values((
                        alarm_deliveries::alarm_id.eq(&d.alarm_id),
                        alarm_deliveries::at.eq(d.at),
                        alarm_deliveries::channel.eq(&d.channel),
                        alarm_deliveries::kind.eq(&d.kind),
                        alarm_deliveries::step.eq(d.step),
                        alarm_deliveries::attempts.eq(d.attempts),
                        alarm_deliveries::outcome.eq(if d.delivered { "delivered" } else { "failed" }),
                        alarm_deliveries::detail.eq(&d.detail),
                    ))
                    .execute(conn)?;
                Ok(())
            })
            .await
    }

    pub async fn add_alarm_event(
        &self,
        alarm_id: String,
        at: i64,
        kind: &'static str,
        message: String,
    ) -> Result<(), StoreError> {
        self.database()
            .write(move |conn| insert_event(conn, &alarm_id, at, kind, None, &message))
            .await
    }

    // ---- alarms: the API's side ------------------------------------------------------------

    pub async fn list_alarms(
        &self,
        tenant: &TenantId,
        filter: AlarmFilter,
    ) -> Result<Vec<AlarmRecord>, StoreError> {
        let tenant = tenant.clone();
        self.database()
            .read(move |conn| {
                let mut q = alarms::table
                    .filter(alarms::tenant_id.eq(tenant.as_str()))
                    .select(alarm_columns!())
                    .into_boxed();
                if let Some(status) = &filter.status {
                    let (active, acked) = match status.as_str() {
                        "ACTIVE_UNACK" => (true, false),
                        "ACTIVE_ACK" => (true, true),
                        "CLEARED_UNACK" => (false, false),
                        _ => (false, true),
                    };
                    q = q
                        .filter(alarms::active.eq(active))
                        .filter(alarms::acknowledged.eq(acked));
                }
                if let Some(active) = filter.active {
                    q = q.filter(alarms::active.eq(active));
                }
                if let Some(acked) = filter.acknowledged {
                    q = q.filter(alarms::acknowledged.eq(acked));
                }
                if let Some(severity) = filter.severity {
                    q = q.filter(alarms::severity.eq(severity.as_str()));
                }
                if let Some(device) = &filter.device {
                    q = q.filter(alarms::device_id.eq(device.clone()));
                }
                if let Some(rule) = &filter.rule_id {
                    q = q.filter(alarms::rule_id.eq(rule.clone()));
                }
                if let Some(since) = filter.since_ms {
                    q = q.filter(alarms::last_seen.ge(since));
                }
                let rows: Vec<AlarmRow> = q.order(alarms::last_seen.desc()).limit(filter.limit).load(conn)?;
                rows.into_iter().map(alarm_from_row).collect()
            })
            .await
    }

    /// An alarm with its history and delivery log.
    pub async fn get_alarm(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<(AlarmRecord, Vec<AlarmEventRecord>, Vec<DeliveryRecord>), StoreError> {
        let (tenant, id) = (tenant.clone(), id.to_string());
        self.database()
            .read(move |conn| {
                let alarm = tenant_alarm(conn, &tenant, &id)?;
                let events: Vec<(i64, String, Option<String>, String)> = alarm_events::table
                    .filter(alarm_events::alarm_id.eq(&id))
                    .order(alarm_events::id)
                    .select((
                        alarm_events::at,
                        alarm_events::kind,
                        alarm_events::actor,
                        alarm_events::message,
                    ))
                    .load(conn)?;
                let deliveries: Vec<(i64, String, String, i32, i32, String, String)> =
                    alarm_deliveries::table
                        .filter(alarm_deliveries::alarm_id.eq(&id))
                        .order(alarm_deliveries::id)
                        .select((
                            alarm_deliveries::at,
                            alarm_deliveries::channel,
                            alarm_deliveries::kind,
                            alarm_deliveries::step,
                            alarm_deliveries::attempts,
                            alarm_deliveries::outcome,
                            alarm_deliveries::detail,
                        ))
                        .load(conn)?;
                Ok((
                    alarm,
                    events
                        .into_iter()
                        .map(|(at, kind, actor, message)| AlarmEventRecord {
                            at,
                            kind,
                            actor,
                            message,
                        })
                        .collect(),
                    deliveries
                        .into_iter()
                        .map(
                            |(at, channel, kind, step, attempts, outcome, detail)| DeliveryRecord {
                                at,
                                channel,
                                kind,
                                step,
                                attempts,
                                outcome,
                                detail,
                            },
                        )
                        .collect(),
                ))
            })
            .await
    }

    /// Acknowledges an alarm (stops its escalation). Idempotent.
    pub async fn ack_alarm(
        &self,
        tenant: TenantId,
        id: String,
        at: i64,
        by: AuditActor,
    ) -> Result<AlarmRecord, StoreError> {
        self.database()
            .write(move |conn| {
                let alarm = tenant_alarm(conn, &tenant, &id)?;
                if alarm.acknowledged {
                    return Ok(alarm);
                }
                diesel::update(alarms::table.filter(alarms::id.eq(&id)))
                    .set((
                        alarms::acknowledged.eq(true),
                        alarms::acked_at.eq(Some(at)),
                        alarms::acked_by.eq(Some(by.actor.as_str())),
                        alarms::next_escalation_at.eq(None::<i64>),
                    ))
                    .execute(conn)?;
                insert_event(conn, &id, at, "acknowledged", Some(&by.actor), "acknowledged")?;
                insert_audit(conn, &audit(&by, "alert.ack", &id, None))?;
                load_alarm(conn, &id)?.ok_or_else(|| internal("alarm vanished"))
            })
            .await
    }

    /// Clears an alarm by hand. Idempotent.
    pub async fn clear_alarm(
        &self,
        tenant: TenantId,
        id: String,
        at: i64,
        by: AuditActor,
    ) -> Result<AlarmRecord, StoreError> {
        self.database()
            .write(move |conn| {
                let alarm = tenant_alarm(conn, &tenant, &id)?;
                if !alarm.active {
                    return Ok(alarm);
                }
                close_alarm(conn, &id, at, Some(&by.actor), "cleared by an operator")?;
                insert_audit(conn, &audit(&by, "alert.clear", &id, None))?;
                load_alarm(conn, &id)?.ok_or_else(|| internal("alarm vanished"))
            })
            .await
    }

    pub async fn comment_alarm(
        &self,
        tenant: TenantId,
        id: String,
        text: String,
        at: i64,
        by: AuditActor,
    ) -> Result<AlarmEventRecord, StoreError> {
        self.database()
            .write(move |conn| {
                tenant_alarm(conn, &tenant, &id)?;
                insert_event(conn, &id, at, "comment", Some(&by.actor), &text)?;
                insert_audit(conn, &audit(&by, "alert.comment", &id, None))?;
                Ok(AlarmEventRecord {
                    at,
                    kind: "comment".into(),
                    actor: Some(by.actor.clone()),
                    message: text,
                })
            })
            .await
    }
}
