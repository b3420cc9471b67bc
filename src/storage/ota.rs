//! OTA campaigns in the registry (images are [`super::firmware`]): the campaign runner
//! (`crate::ota`) keeps every bit of a campaign's state here — status, stage, one row per targeted device with its
//! history — so a restarted node, or another node taking the runner's lease, resumes it.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use drover_actors::campaign::{CampaignStatus, JobState, StageCounts};
use drover_actors::{DeviceId, TenantId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::db::{DbConnection, StoreError};
pub use super::firmware::FirmwareRecord;
use super::firmware::{FirmwareRow, firmware_from_row};
use super::records::{AuditActor, Page};
use super::registry::{RegistryStore, audit, from_ms, insert_audit, now_ms};
use super::schema::{campaign_devices, campaigns, firmware};

/// Most history entries kept per device and campaign (the first, "notified", is always kept).
pub const MAX_HISTORY: usize = 20;

/// A campaign's devices counted by (0-based stage, job state).
pub type StateCounts = Vec<(u32, JobState, u64)>;

#[derive(Debug, Clone, PartialEq)]
pub struct CampaignRecord {
    pub id: String,
    pub tenant: TenantId,
    pub name: String,
    pub firmware_id: String,
    pub firmware_version: String,
    pub rollback_firmware_id: Option<String>,
    pub rollback_of: Option<String>,
    /// The plan as the OTA layer stores it (rollout, failure rule, timeout, window, target).
    pub spec: Value,
    pub status: CampaignStatus,
    /// 0-based current stage.
    pub stage: u32,
    pub stages: u32,
    pub status_reason: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When it was paused, while it is paused.
    pub paused_at: Option<DateTime<Utc>>,
}

/// One entry of a device's history in a campaign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub at: DateTime<Utc>,
    #[schema(value_type = String)]
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CampaignDevice {
    pub device: String,
    pub stage: u32,
    pub state: JobState,
    pub progress: u8,
    pub attempts: u32,
    pub reason: Option<String>,
    pub notified_at: Option<DateTime<Utc>>,
    /// When a device holding the job times out: its notification plus the campaign's
    /// timeout, moved later by the time the campaign spent paused since.
    pub deadline_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub history: Vec<HistoryEntry>,
}

/// A device's state change the runner decided, applied in a batch.
#[derive(Debug, Clone)]
pub struct DeviceTransition {
    pub campaign: String,
    pub tenant: TenantId,
    pub device: DeviceId,
    /// Applied only when the row is in one of these states (what the decision was based on).
    pub from: Vec<JobState>,
    pub to: JobState,
    pub progress: Option<u8>,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// A pending job of a device: its campaign and the image.
#[derive(Debug, Clone)]
pub struct PendingJob {
    pub campaign: CampaignRecord,
    pub firmware: FirmwareRecord,
    pub timeout_at: Option<DateTime<Utc>>,
}

pub(super) fn internal(what: &str) -> impl Fn(String) -> StoreError + '_ {
    move |e| StoreError::Internal(format!("invalid stored {what}: {e}"))
}

pub(super) fn tenant_of(raw: String) -> Result<TenantId, StoreError> {
    TenantId::parse(raw).map_err(|e| StoreError::Internal(format!("invalid stored tenant: {e}")))
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = campaigns)]
struct CampaignRow {
    id: String,
    tenant_id: String,
    name: String,
    firmware_id: String,
    firmware_version: String,
    rollback_firmware_id: Option<String>,
    rollback_of: Option<String>,
    spec: String,
    status: String,
    stage: i32,
    stages: i32,
    status_reason: Option<String>,
    created_by: String,
    created_at: i64,
    updated_at: i64,
    paused_at: Option<i64>,
}

fn campaign_from_row(row: CampaignRow) -> Result<CampaignRecord, StoreError> {
    Ok(CampaignRecord {
        tenant: tenant_of(row.tenant_id)?,
        spec: serde_json::from_str(&row.spec).map_err(|e| internal("campaign spec")(e.to_string()))?,
        status: row.status.parse().map_err(internal("campaign status"))?,
        id: row.id,
        name: row.name,
        firmware_id: row.firmware_id,
        firmware_version: row.firmware_version,
        rollback_firmware_id: row.rollback_firmware_id,
        rollback_of: row.rollback_of,
        stage: row.stage.max(0) as u32,
        stages: row.stages.max(1) as u32,
        status_reason: row.status_reason,
        created_by: row.created_by,
        created_at: from_ms(row.created_at),
        updated_at: from_ms(row.updated_at),
        paused_at: row.paused_at.map(from_ms),
    })
}

type DeviceRow = (
    String,
    i32,
    String,
    i32,
    i32,
    Option<String>,
    Option<i64>,
    i64,
    String,
    Option<i64>,
);

const DEVICE_COLUMNS: (
    campaign_devices::device_id,
    campaign_devices::stage,
    campaign_devices::state,
    campaign_devices::progress,
    campaign_devices::attempts,
    campaign_devices::reason,
    campaign_devices::notified_at,
    campaign_devices::updated_at,
    campaign_devices::history,
    campaign_devices::deadline_at,
) = (
    campaign_devices::device_id,
    campaign_devices::stage,
    campaign_devices::state,
    campaign_devices::progress,
    campaign_devices::attempts,
    campaign_devices::reason,
    campaign_devices::notified_at,
    campaign_devices::updated_at,
    campaign_devices::history,
    campaign_devices::deadline_at,
);

fn device_from_row(row: DeviceRow) -> Result<CampaignDevice, StoreError> {
    let (device, stage, state, progress, attempts, reason, notified_at, updated_at, history, deadline_at) =
        row;
    Ok(CampaignDevice {
        device,
        stage: stage.max(0) as u32,
        state: state.parse().map_err(internal("job state"))?,
        progress: progress.clamp(0, 100) as u8,
        attempts: attempts.max(0) as u32,
        reason,
        notified_at: notified_at.map(from_ms),
        deadline_at: deadline_at.map(from_ms),
        updated_at: from_ms(updated_at),
        history: serde_json::from_str(&history).unwrap_or_default(),
    })
}

fn history_json(history: &[HistoryEntry]) -> String {
    serde_json::to_string(history).unwrap_or_else(|_| "[]".into())
}

/// `history` with `entry` appended, capped at [`MAX_HISTORY`] (the first entry stays).
pub fn push_history(mut history: Vec<HistoryEntry>, entry: HistoryEntry) -> Vec<HistoryEntry> {
    history.push(entry);
    if history.len() > MAX_HISTORY {
        history.remove(1);
    }
    history
}

fn state_strs(states: &[JobState]) -> Vec<&'static str> {
    states.iter().map(|s| s.as_str()).collect()
}

/// States a device holds its job in.
const ACTIVE: [JobState; 3] = [JobState::Notified, JobState::InProgress, JobState::Verifying];

/// The campaign's devices counted by stage and state.
fn count_devices(conn: &mut DbConnection, campaign: &str) -> Result<StateCounts, StoreError> {
    let rows: Vec<(i32, String, i64)> = campaign_devices::table
        .filter(campaign_devices::campaign_id.eq(campaign))
        .group_by((campaign_devices::stage, campaign_devices::state))
        .select((
            campaign_devices::stage,
            campaign_devices::state,
            diesel::dsl::count_star(),
        ))
        .load(conn)?;
    rows.into_iter()
        .map(|(stage, state, n)| {
            Ok((
                stage.max(0) as u32,
                state.parse().map_err(internal("job state"))?,
                n.max(0) as u64,
            ))
        })
        .collect()
}

/// Moves one device row, if it is in one of `from`, appending to its history. `notify`: the
/// device is being notified, with this timeout (seconds) from `at`.
#[allow(clippy::too_many_arguments)]
fn move_device(
    conn: &mut DbConnection,
    campaign: &str,
    device: &str,
    from: &[JobState],
    to: JobState,
    progress: Option<u8>,
    reason: Option<String>,
    at: DateTime<Utc>,
    notify: Option<u64>,
) -> Result<bool, StoreError> {
    let row: Option<(String, String, i32)> = campaign_devices::table
        .filter(campaign_devices::campaign_id.eq(campaign))
        .filter(campaign_devices::device_id.eq(device))
        .select((
            campaign_devices::state,
            campaign_devices::history,
            campaign_devices::attempts,
        ))
        .first(conn)
        .optional()?;
    let Some((state, history, attempts)) = row else {
        return Ok(false);
    };
    let current: JobState = state.parse().map_err(internal("job state"))?;
    if !from.contains(&current) {
        return Ok(false);
    }
    // Progress reports within one state only change the percentage; history keeps transitions.
    let history: Vec<HistoryEntry> = serde_json::from_str(&history).unwrap_or_default();
    let history = if current == to {
        history
    } else {
        push_history(
            history,
            HistoryEntry {
                at,
                state: to,
                progress,
                reason: reason.clone(),
            },
        )
    };
    let progress = match (to, progress) {
        (JobState::Succeeded | JobState::Verifying, _) => Some(100),
        (JobState::Pending | JobState::Notified, _) => Some(0),
        (_, p) => p,
    };
    let target = campaign_devices::table
        .filter(campaign_devices::campaign_id.eq(campaign))
        .filter(campaign_devices::device_id.eq(device));
    let now = at.timestamp_millis();
    diesel::update(target)
        .set((
            campaign_devices::state.eq(to.as_str()),
            campaign_devices::reason.eq(reason),
            campaign_devices::updated_at.eq(now),
            campaign_devices::history.eq(history_json(&history)),
        ))
        .execute(conn)?;
    if let Some(progress) = progress {
        diesel::update(target)
            .set(campaign_devices::progress.eq(i32::from(progress)))
            .execute(conn)?;
    }
    if let Some(timeout_secs) = notify {
        diesel::update(target)
            .set((
                campaign_devices::attempts.eq(attempts + 1),
                campaign_devices::notified_at.eq(Some(now)),
                campaign_devices::deadline_at.eq(Some(now.saturating_add(timeout_ms(timeout_secs)))),
            ))
            .execute(conn)?;
    }
    Ok(true)
}

/// Inputs of [`RegistryStore::create_campaign`].
#[derive(Debug, Clone)]
pub struct NewCampaign {
    pub id: String,
    pub tenant: TenantId,
    pub name: String,
    pub firmware_id: String,
    pub firmware_version: String,
    pub rollback_firmware_id: Option<String>,
    pub rollback_of: Option<String>,
    pub spec: Value,
    pub stages: u32,
    /// Target devices in rollout order with their stage, and `Some(reason)` for those skipped.
    pub devices: Vec<(String, u32, Option<String>)>,
}

impl RegistryStore {
    // ---- campaigns -----------------------------------------------------------------------

    /// Creates a campaign with its device rows, running, in one transaction.
    pub async fn create_campaign(
        &self,
        new: NewCampaign,
        by: AuditActor,
    ) -> Result<CampaignRecord, StoreError> {
        self.database()
            .write(move |conn| {
                let now = now_ms();
                diesel::insert_into(campaigns::table)
                    .values((
                        campaigns::id.eq(&new.id),
                        campaigns::tenant_id.eq(new.tenant.as_str()),
                        campaigns::name.eq(&new.name),
                        campaigns::firmware_id.eq(&new.firmware_id),
                        campaigns::firmware_version.eq(&new.firmware_version),
                        campaigns::rollback_firmware_id.eq(&new.rollback_firmware_id),
                        campaigns::rollback_of.eq(&new.rollback_of),
                        campaigns::spec.eq(new.spec.to_string()),
                        campaigns::status.eq(CampaignStatus::Running.as_str()),
                        campaigns::stage.eq(0),
                        campaigns::stages.eq(new.stages.max(1) as i32),
                        campaigns::status_reason.eq(None::<String>),
                        campaigns::created_by.eq(&by.actor),
                        campaigns::created_at.eq(now),
                        campaigns::updated_at.eq(now),
                    ))
                    .execute(conn)?;
                let at = from_ms(now);
                // One statement per row: diesel's multi-backend connection has no batch insert.
                // Inside the transaction, 10,000 rows take well under a second on SQLite.
                for (device, stage, skipped) in &new.devices {
                    let state = if skipped.is_some() {
                        JobState::Skipped
                    } else {
                        JobState::Pending
                    };
                    let history = vec![HistoryEntry {
                        at,
                        state,
                        progress: None,
                        reason: skipped.clone(),
                    }];
                    diesel::insert_into(campaign_devices::table)
                        .values((
                            campaign_devices::campaign_id.eq(&new.id),
                            campaign_devices::device_id.eq(device),
                            campaign_devices::tenant_id.eq(new.tenant.as_str()),
                            campaign_devices::stage.eq(*stage as i32),
                            campaign_devices::state.eq(state.as_str()),
                            campaign_devices::progress.eq(0),
                            campaign_devices::attempts.eq(0),
                            campaign_devices::reason.eq(skipped),
                            campaign_devices::notified_at.eq(None::<i64>),
                            campaign_devices::updated_at.eq(now),
                            campaign_devices::history.eq(history_json(&history)),
                        ))
                        .execute(conn)?;
                }
                insert_audit(
                    conn,
                    &audit(
                        &by,
                        "campaign.create",
                        new.id.as_str(),
                        Some(serde_json::json!({
                            "firmware": new.firmware_id,
                            "version": new.firmware_version,
                            "devices": new.devices.len(),
                            "rollbackOf": new.rollback_of,
                        })),
                    ),
                )?;
                let row: CampaignRow = campaigns::table
                    .filter(campaigns::id.eq(&new.id))
                    .select(CampaignRow::as_select())
                    .first(conn)?;
                campaign_from_row(row)
            })
            .await
    }

    /// A tenant's campaigns, newest first, `limit` after the campaign id `after`.
    pub async fn list_campaigns(
        &self,
        tenant: &TenantId,
        status: Option<CampaignStatus>,
        limit: u32,
        offset: u64,
    ) -> Result<Page<CampaignRecord>, StoreError> {
        let tenant = tenant.clone();
        self.database()
            .read(move |conn| {
                let filtered = || {
                    let mut q = campaigns::table
                        .filter(campaigns::tenant_id.eq(tenant.as_str().to_string()))
                        .into_boxed();
                    if let Some(status) = status {
                        q = q.filter(campaigns::status.eq(status.as_str()));
                    }
                    q
                };
                let total: i64 = filtered().count().get_result(conn)?;
                let rows: Vec<CampaignRow> = filtered()
                    .order((campaigns::created_at.desc(), campaigns::id.desc()))
                    .offset(offset as i64)
                    .limit(i64::from(limit))
                    .select(CampaignRow::as_select())
                    .load(conn)?;
                let items = rows
                    .into_iter()
                    .map(campaign_from_row)
                    .collect::<Result<Vec<_>, _>>()?;
                let next = (offset + (items.len() as u64) < total as u64)
                    .then(|| (offset + items.len() as u64).to_string());
                Ok(Page {
                    items,
                    next,
                    total: total as u64,
                })
            })
            .await
    }

    pub async fn get_campaign(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<CampaignRecord>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.to_string());
        self.database()
            .read(move |conn| {
                campaigns::table
                    .filter(campaigns::tenant_id.eq(tenant.as_str()))
                    .filter(campaigns::id.eq(&id))
                    .select(CampaignRow::as_select())
                    .first::<CampaignRow>(conn)
                    .optional()?
                    .map(campaign_from_row)
                    .transpose()
            })
            .await
    }

    /// Running campaigns of every tenant: what the runner drives.
    pub async fn running_campaigns(&self) -> Result<Vec<CampaignRecord>, StoreError> {
        self.database()
            .read(move |conn| {
                campaigns::table
                    .filter(campaigns::status.eq(CampaignStatus::Running.as_str()))
                    .order(campaigns::created_at)
                    .select(CampaignRow::as_select())
                    .load::<CampaignRow>(conn)?
                    .into_iter()
                    .map(campaign_from_row)
                    .collect()
            })
            .await
    }

    /// Counts by stage and state.
    pub async fn campaign_counts(&self, campaign: &str) -> Result<StateCounts, StoreError> {
        let campaign = campaign.to_string();
        self.database()
            .read(move |conn| count_devices(conn, &campaign))
            .await
    }

    /// Changes a campaign's status (and stage) if it is in one of `from`; `false` otherwise.
    /// With `retry_failures`, the failed devices of the stages reached are made pending again
    /// (a resume after a fix). With `cancel_devices`, devices not finished are cancelled and
    /// those that held the job are returned (to be told).
    #[allow(clippy::too_many_arguments)]
    pub async fn set_campaign_status(
        &self,
        tenant: &TenantId,
        id: &str,
        from: &[CampaignStatus],
        to: CampaignStatus,
        stage: Option<u32>,
        reason: Option<String>,
        retry_failures: bool,
        cancel_devices: bool,
        by: AuditActor,
    ) -> Result<Option<(CampaignRecord, Vec<String>)>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.to_string());
        let from: Vec<&'static str> = from.iter().map(|s| s.as_str()).collect();
        self.database()
            .write(move |conn| {
                let target = campaigns::table
                    .filter(campaigns::tenant_id.eq(tenant.as_str()))
                    .filter(campaigns::id.eq(&id))
                    .filter(campaigns::status.eq_any(&from));
                let now = now_ms();
                // What it was: a resume moves the deadlines of devices at work by the pause.
                let before: Option<(String, Option<i64>, i64, String)> = target
                    .clone()
                    .select((
                        campaigns::status,
                        campaigns::paused_at,
                        campaigns::updated_at,
                        campaigns::spec,
                    ))
                    .first(conn)
                    .optional()?;
                let touched = match stage {
                    Some(stage) => diesel::update(target)
                        .set((
                            campaigns::status.eq(to.as_str()),
                            campaigns::status_reason.eq(&reason),
                            campaigns::stage.eq(stage as i32),
                            campaigns::updated_at.eq(now),
                        ))
                        .execute(conn)?,
                    None => diesel::update(target)
                        .set((
                            campaigns::status.eq(to.as_str()),
                            campaigns::status_reason.eq(&reason),
                            campaigns::updated_at.eq(now),
                        ))
                        .execute(conn)?,
                };
                if touched == 0 {
                    return Ok(None);
                }
                let paused_at = (to == CampaignStatus::Paused).then_some(now);
                diesel::update(campaigns::table.filter(campaigns::id.eq(&id)))
                    .set(campaigns::paused_at.eq(paused_at))
                    .execute(conn)?;
                if let Some((status, was_paused_at, updated_at, spec)) = before
                    && status == CampaignStatus::Paused.as_str()
                    && to == CampaignStatus::Running
                {
                    // A campaign paused before pauses were recorded: its last change was the pause.
                    let paused_for = now.saturating_sub(was_paused_at.unwrap_or(updated_at)).max(0);
                    let working = || {
                        campaign_devices::table
                            .filter(campaign_devices::campaign_id.eq(&id))
                            .filter(campaign_devices::state.eq_any(state_strs(&ACTIVE)))
                    };
                    diesel::update(working().filter(campaign_devices::deadline_at.is_not_null()))
                        .set(campaign_devices::deadline_at.eq(campaign_devices::deadline_at + paused_for))
                        .execute(conn)?;
                    // Rows notified before deadlines were kept.
                    let timeout = serde_json::from_str::<Value>(&spec)
                        .map(|spec| spec_timeout_secs(&spec))
                        .unwrap_or(DEFAULT_TIMEOUT_SECS);
                    diesel::update(
                        working()
                            .filter(campaign_devices::deadline_at.is_null())
                            .filter(campaign_devices::notified_at.is_not_null()),
                    )
                    .set(
                        campaign_devices::deadline_at
                            .eq(campaign_devices::notified_at + (timeout_ms(timeout) + paused_for)),
                    )
                    .execute(conn)?;
                }
                let row: CampaignRow = campaigns::table
                    .filter(campaigns::id.eq(&id))
                    .select(CampaignRow::as_select())
                    .first(conn)?;
                let campaign = campaign_from_row(row)?;
                let at = from_ms(now);
                if retry_failures {
                    let failed = [JobState::Failed, JobState::Rejected, JobState::TimedOut];
                    let devices: Vec<String> = campaign_devices::table
                        .filter(campaign_devices::campaign_id.eq(&id))
                        .filter(campaign_devices::stage.le(campaign.stage as i32))
                        .filter(campaign_devices::state.eq_any(state_strs(&failed)))
                        .select(campaign_devices::device_id)
                        .load(conn)?;
                    for device in devices {
                        move_device(
                            conn,
                            &id,
                            &device,
                            &failed,
                            JobState::Pending,
                            None,
                            Some("retried on resume".into()),
                            at,
                            None,
                        )?;
                    }
                }
                let mut told = Vec::new();
                if cancel_devices {
                    let open = [
                        JobState::Pending,
                        JobState::Notified,
                        JobState::InProgress,
                        JobState::Verifying,
                    ];
                    let devices: Vec<(String, String)> = campaign_devices::table
                        .filter(campaign_devices::campaign_id.eq(&id))
                        .filter(campaign_devices::state.eq_any(state_strs(&open)))
                        .select((campaign_devices::device_id, campaign_devices::state))
                        .load(conn)?;
                    for (device, state) in devices {
                        if state != JobState::Pending.as_str() {
                            told.push(device.clone());
                        }
                        move_device(
                            conn,
                            &id,
                            &device,
                            &open,
                            JobState::Cancelled,
                            None,
                            Some(format!("campaign {to}")),
                            at,
                            None,
                        )?;
                    }
                }
                let action = match to {
                    CampaignStatus::Running => "campaign.resume",
                    CampaignStatus::Paused => "campaign.pause",
                    CampaignStatus::Completed => "campaign.complete",
                    CampaignStatus::Cancelled => "campaign.cancel",
                    CampaignStatus::Aborted => "campaign.abort",
                };
                insert_audit(
                    conn,
                    &audit(
                        &by,
                        action,
                        id.as_str(),
                        reason.as_ref().map(|r| serde_json::json!({"reason": r})),
                    ),
                )?;
                Ok(Some((campaign, told)))
            })
            .await
    }

    /// Advances a running campaign to `stage` (only from `stage - 1`).
    pub async fn advance_campaign(&self, id: &str, stage: u32) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.database()
            .write(move |conn| {
                let touched = diesel::update(
                    campaigns::table
                        .filter(campaigns::id.eq(&id))
                        .filter(campaigns::status.eq(CampaignStatus::Running.as_str()))
                        .filter(campaigns::stage.eq(stage as i32 - 1)),
                )
                .set((
                    campaigns::stage.eq(stage as i32),
                    campaigns::updated_at.eq(now_ms()),
                ))
                .execute(conn)?;
                Ok(touched == 1)
            })
            .await
    }

    /// A page of a campaign's devices in device order, optionally in one state.
    pub async fn list_campaign_devices(
        &self,
        campaign: &str,
        state: Option<JobState>,
        after: Option<String>,
        limit: u32,
    ) -> Result<Page<CampaignDevice>, StoreError> {
        let campaign = campaign.to_string();
        self.database()
            .read(move |conn| {
                let filtered = || {
                    let mut q = campaign_devices::table
                        .filter(campaign_devices::campaign_id.eq(campaign.clone()))
                        .into_boxed();
                    if let Some(state) = state {
                        q = q.filter(campaign_devices::state.eq(state.as_str()));
                    }
                    q
                };
                let total: i64 = filtered().count().get_result(conn)?;
                let mut q = filtered();
                if let Some(after) = &after {
                    q = q.filter(campaign_devices::device_id.gt(after.clone()));
                }
                let limit = i64::from(limit.clamp(1, 1000));
                let mut rows: Vec<DeviceRow> = q
                    .order(campaign_devices::device_id)
                    .limit(limit + 1)
                    .select(DEVICE_COLUMNS)
                    .load(conn)?;
                let more = rows.len() as i64 > limit;
                rows.truncate(limit as usize);
                let next = more.then(|| rows.last().map(|r| r.0.clone())).flatten();
                Ok(Page {
                    items: rows.into_iter().map(device_from_row).collect::<Result<_, _>>()?,
                    next,
                    total: total as u64,
                })
            })
            .await
    }

    pub async fn get_campaign_device(
        &self,
        campaign: &str,
        device: &str,
    ) -> Result<Option<CampaignDevice>, StoreError> {
        let (campaign, device) = (campaign.to_string(), device.to_string());
        self.database()
            .read(move |conn| {
                campaign_devices::table
                    .filter(campaign_devices::campaign_id.eq(&campaign))
                    .filter(campaign_devices::device_id.eq(&device))
                    .select(DEVICE_COLUMNS)
                    .first::<DeviceRow>(conn)
                    .optional()?
                    .map(device_from_row)
                    .transpose()
            })
            .await
    }

    /// Takes up to `limit` pending devices of the stages up to `stage` and marks them notified,
    /// each with `timeout_secs` to succeed: the runner then publishes their jobs.
    pub async fn claim_pending_devices(
        &self,
        campaign: &str,
        stage: u32,
        limit: u32,
        timeout_secs: u64,
    ) -> Result<Vec<String>, StoreError> {
        let campaign = campaign.to_string();
        self.database()
            .write(move |conn| {
                let devices: Vec<String> = campaign_devices::table
                    .filter(campaign_devices::campaign_id.eq(&campaign))
                    .filter(campaign_devices::stage.le(stage as i32))
                    .filter(campaign_devices::state.eq(JobState::Pending.as_str()))
                    .order((campaign_devices::stage, campaign_devices::device_id))
                    .limit(i64::from(limit))
                    .select(campaign_devices::device_id)
                    .load(conn)?;
                let at = Utc::now();
                for device in &devices {
                    move_device(
                        conn,
                        &campaign,
                        device,
                        &[JobState::Pending],
                        JobState::Notified,
                        None,
                        None,
                        at,
                        Some(timeout_secs),
                    )?;
                }
                Ok(devices)
            })
            .await
    }

    /// Devices of a campaign in `state`, at most `limit`, optionally notified before `before`.
    pub async fn campaign_devices_in(
        &self,
        campaign: &str,
        states: &[JobState],
        notified_before: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let campaign = campaign.to_string();
        let states = state_strs(states);
        self.database()
            .read(move |conn| {
                let mut q = campaign_devices::table
                    .filter(campaign_devices::campaign_id.eq(campaign))
                    .filter(campaign_devices::state.eq_any(states))
                    .into_boxed();
                if let Some(before) = notified_before {
                    q = q.filter(campaign_devices::notified_at.lt(before.timestamp_millis()));
                }
                Ok(q.order(campaign_devices::device_id)
                    .limit(i64::from(limit))
                    .select(campaign_devices::device_id)
                    .load(conn)?)
            })
            .await
    }

    /// Devices holding a job of the campaign past their deadline at `now`, at most `limit`.
    /// (A row notified before deadlines were kept has none: its notification plus
    /// `timeout_secs` is its deadline.)
    pub async fn campaign_devices_due(
        &self,
        campaign: &str,
        now: DateTime<Utc>,
        timeout_secs: u64,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        let campaign = campaign.to_string();
        let now = now.timestamp_millis();
        let legacy_cutoff = now.saturating_sub(timeout_ms(timeout_secs));
        self.database()
            .read(move |conn| {
                Ok(campaign_devices::table
                    .filter(campaign_devices::campaign_id.eq(campaign))
                    .filter(campaign_devices::state.eq_any(state_strs(&ACTIVE)))
                    .filter(
                        campaign_devices::deadline_at
                            .lt(now)
                            .or(campaign_devices::deadline_at
                                .is_null()
                                .and(campaign_devices::notified_at.lt(legacy_cutoff))),
                    )
                    .order(campaign_devices::device_id)
                    .limit(i64::from(limit))
                    .select(campaign_devices::device_id)
                    .load(conn)?)
            })
            .await
    }

    /// Applies a batch of transitions in one transaction; returns the campaigns touched.
    pub async fn apply_transitions(
        &self,
        transitions: Vec<DeviceTransition>,
    ) -> Result<Vec<String>, StoreError> {
        self.database()
            .write(move |conn| {
                let mut touched = Vec::new();
                let mut owners = std::collections::HashMap::<(String, TenantId), bool>::new();
                for t in transitions {
                    // A report about another tenant's campaign never matches: the row is keyed
                    // by campaign and device, and the campaign's tenant is checked.
                    let key = (t.campaign.clone(), t.tenant.clone());
                    let owned = match owners.get(&key) {
                        Some(owned) => *owned,
                        None => {
                            let n: i64 = campaigns::table
                                .filter(campaigns::id.eq(&t.campaign))
                                .filter(campaigns::tenant_id.eq(t.tenant.as_str()))
                                .count()
                                .get_result(conn)?;
                            owners.insert(key, n > 0);
                            n > 0
                        }
                    };
                    if !owned {
                        continue;
                    }
                    if move_device(
                        conn,
                        &t.campaign,
                        t.device.as_str(),
                        &t.from,
                        t.to,
                        t.progress,
                        t.reason,
                        t.at,
                        None,
                    )? && !touched.contains(&t.campaign)
                    {
                        touched.push(t.campaign);
                    }
                }
                Ok(touched)
            })
            .await
    }

    /// The job a device holds or may start now: notified or in progress in a running campaign.
    pub async fn pending_job(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<PendingJob>, StoreError> {
        let (tenant, device) = (tenant.clone(), device.clone());
        self.database()
            .read(move |conn| {
                let held: Option<(String, Option<i64>, Option<i64>)> = campaign_devices::table
                    .inner_join(campaigns::table.on(campaigns::id.eq(campaign_devices::campaign_id)))
                    .filter(campaign_devices::tenant_id.eq(tenant.as_str()))
                    .filter(campaign_devices::device_id.eq(device.as_str()))
                    .filter(campaign_devices::state.eq_any(state_strs(&ACTIVE[..2])))
                    .filter(campaigns::status.eq(CampaignStatus::Running.as_str()))
                    .order(campaigns::created_at)
                    .select((
                        campaigns::id,
                        campaign_devices::notified_at,
                        campaign_devices::deadline_at,
                    ))
                    .first(conn)
                    .optional()?;
                let Some((campaign_id, notified_at, deadline_at)) = held else {
                    return Ok(None);
                };
                let row: CampaignRow = campaigns::table
                    .filter(campaigns::id.eq(&campaign_id))
                    .select(CampaignRow::as_select())
                    .first(conn)?;
                let campaign = campaign_from_row(row)?;
                let image: Option<FirmwareRow> = firmware::table
                    .filter(firmware::id.eq(&campaign.firmware_id))
                    .select(FirmwareRow::as_select())
                    .first(conn)
                    .optional()?;
                let Some(image) = image else {
                    return Ok(None);
                };
                let timeout = spec_timeout_secs(&campaign.spec);
                Ok(Some(PendingJob {
                    timeout_at: deadline_at
                        .or_else(|| notified_at.map(|at| at.saturating_add(timeout_ms(timeout))))
                        .map(from_ms),
                    campaign,
                    firmware: firmware_from_row(image)?,
                }))
            })
            .await
    }
}

/// A timeout in milliseconds.
fn timeout_ms(secs: u64) -> i64 {
    i64::try_from(secs)
        .unwrap_or(i64::MAX / 1000)
        .saturating_mul(1000)
}

/// The per-device timeout a campaign's stored plan names (`timeoutSecs`; the API's default
/// when absent).
pub fn spec_timeout_secs(spec: &Value) -> u64 {
    spec.get("timeoutSecs")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_TIMEOUT_SECS)
}

/// The per-device timeout when a plan names none.
pub const DEFAULT_TIMEOUT_SECS: u64 = 3600;

/// Folds counts by (stage, state) into the counts of one stage.
pub fn stage_counts(counts: &[(u32, JobState, u64)], stage: u32) -> StageCounts {
    let mut out = StageCounts::default();
    for (s, state, n) in counts {
        if *s == stage {
            out.add(*state, *n);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_capped_keeping_the_first_entry() {
        let entry = |n: u8| HistoryEntry {
            at: Utc::now(),
            state: JobState::InProgress,
            progress: Some(n),
            reason: None,
        };
        let mut history = Vec::new();
        for n in 0..30 {
            history = push_history(history, entry(n));
        }
        assert_eq!(history.len(), MAX_HISTORY);
        assert_eq!(history[0].progress, Some(0));
        assert_eq!(history.last().unwrap().progress, Some(29));
    }
}
