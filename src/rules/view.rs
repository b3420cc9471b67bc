//! Alarms and rules as the API and the live stream show them.

use chrono::{DateTime, Utc};
use drover_actors::TenantId;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::storage::registry::from_ms;
use crate::storage::rules::{AlarmEventRecord, AlarmRecord, DeliveryRecord};

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlarmView {
    pub id: String,
    #[serde(skip)]
    pub tenant: TenantId,
    pub rule_id: String,
    pub rule_name: String,
    pub device_id: String,
    /// critical, major, minor or warning.
    pub severity: String,
    /// ACTIVE_UNACK, ACTIVE_ACK, CLEARED_UNACK or CLEARED_ACK.
    pub status: String,
    pub active: bool,
    pub acknowledged: bool,
    /// Times the condition held while the alarm was active.
    pub count: i64,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub acked_at: Option<DateTime<Utc>>,
    pub acked_by: Option<String>,
    pub cleared_at: Option<DateTime<Utc>>,
    pub cleared_by: Option<String>,
    /// The rule's metric when it fired last.
    pub value: Option<f64>,
    #[schema(value_type = Object)]
    pub details: Value,
    /// Escalation steps already run (0 = only the initial actions).
    pub escalation_step: i32,
    pub next_escalation_at: Option<DateTime<Utc>>,
}

impl From<&AlarmRecord> for AlarmView {
    fn from(a: &AlarmRecord) -> Self {
        AlarmView {
            id: a.id.clone(),
            tenant: a.tenant.clone(),
            rule_id: a.rule_id.clone(),
            rule_name: a.rule_name.clone(),
            device_id: a.device.clone(),
            severity: a.severity.as_str().into(),
            status: a.status().into(),
            active: a.active,
            acknowledged: a.acknowledged,
            count: a.count,
            first_seen: from_ms(a.first_seen),
            last_seen: from_ms(a.last_seen),
            acked_at: a.acked_at.map(from_ms),
            acked_by: a.acked_by.clone(),
            cleared_at: a.cleared_at.map(from_ms),
            cleared_by: a.cleared_by.clone(),
            value: a.value,
            details: a.details.clone(),
            escalation_step: (a.escalation_step - 1).max(0),
            next_escalation_at: a.next_escalation_at.map(from_ms),
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlarmEventView {
    pub at: DateTime<Utc>,
    /// created, severity, suppressed, escalated, acknowledged, cleared or comment.
    pub kind: String,
    pub actor: Option<String>,
    pub message: String,
}

impl From<AlarmEventRecord> for AlarmEventView {
    fn from(e: AlarmEventRecord) -> Self {
        AlarmEventView {
            at: from_ms(e.at),
            kind: e.kind,
            actor: e.actor,
            message: e.message,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryView {
    pub at: DateTime<Utc>,
    /// The channel's name, or the inline target (URL, recipients, command).
    pub channel: String,
    pub kind: String,
    /// 0 for the initial actions, n for escalation step n.
    pub step: i32,
    pub attempts: i32,
    /// delivered or failed.
    pub outcome: String,
    pub detail: String,
}

impl From<DeliveryRecord> for DeliveryView {
    fn from(d: DeliveryRecord) -> Self {
        DeliveryView {
            at: from_ms(d.at),
            channel: d.channel,
            kind: d.kind,
            step: d.step,
            attempts: d.attempts,
            outcome: d.outcome,
            detail: d.detail,
        }
    }
}
