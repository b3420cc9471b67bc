//! OTA campaigns: create, list, follow (counts, stages, per-device status and history), pause,
//! resume, cancel and roll back. The campaign runner (`crate::ota::runner`) does the rollout;
//! these handlers only change what it reads from the registry and wake it up.

use std::collections::BTreeMap;

use actix_web::{HttpResponse, get, post, web};
use chrono::{DateTime, Utc};
use drover_actors::Role;
use drover_actors::campaign::{CampaignStatus, JobState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::http::error::{ApiError, ErrorBody};
use crate::http::params::limit_param;
use crate::http::principal::Principal;
use crate::ota::campaigns::{CampaignSpec, rollback_campaign};
use crate::ota::runner::{Kick, TellCancelled};
use crate::state::AppState;
use crate::storage::ota::{CampaignDevice, CampaignRecord, HistoryEntry};

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(create)
        .service(list)
        .service(get_one)
        .service(devices)
        .service(device)
        .service(pause)
        .service(resume)
        .service(cancel)
        .service(rollback);
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageView {
    /// 1-based.
    pub stage: u32,
    pub devices: u64,
    pub pending: u64,
    pub active: u64,
    pub succeeded: u64,
    pub failed: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CampaignView {
    pub id: String,
    pub name: String,
    pub firmware_id: String,
    pub firmware_version: String,
    pub rollback_firmware_id: Option<String>,
    pub rollback_of: Option<String>,
    /// running, paused, completed, cancelled, aborted
    pub status: String,
    pub status_reason: Option<String>,
    /// 1-based current stage, of `stages`.
    pub stage: u32,
    pub stages: u32,
    /// The plan as created (target, rollout, failureRule, timeoutSecs, maintenanceWindow).
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Devices per job state (pending, notified, in_progress, verifying, succeeded, failed,
    /// rejected, timed_out, cancelled, skipped); only in single-campaign answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counts: Option<BTreeMap<String, u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage_progress: Option<Vec<StageView>>,
}

impl CampaignView {
    fn of(c: CampaignRecord) -> CampaignView {
        CampaignView {
            id: c.id,
            name: c.name,
            firmware_id: c.firmware_id,
            firmware_version: c.firmware_version,
            rollback_firmware_id: c.rollback_firmware_id,
            rollback_of: c.rollback_of,
            status: c.status.as_str().into(),
            status_reason: c.status_reason,
            stage: c.stage + 1,
            stages: c.stages,
            spec: c.spec,
            created_by: c.created_by,
            created_at: c.created_at,
            updated_at: c.updated_at,
            counts: None,
            stage_progress: None,
        }
    }

    fn with_counts(mut self, counts: &[(u32, JobState, u64)]) -> CampaignView {
        let mut by_state: BTreeMap<String, u64> = JobState::ALL
            .iter()
            .map(|s| (s.as_str().to_string(), 0))
            .collect();
        let mut stages: Vec<StageView> = (0..self.stages)
            .map(|s| StageView {
                stage: s + 1,
                devices: 0,
                pending: 0,
                active: 0,
                succeeded: 0,
                failed: 0,
            })
            .collect();
        for (stage, state, n) in counts {
            *by_state.entry(state.as_str().to_string()).or_insert(0) += n;
            if let Some(view) = stages.get_mut(*stage as usize)
                && *state != JobState::Skipped
            {
                let mut c = drover_actors::campaign::StageCounts::default();
                c.add(*state, *n);
                view.devices += c.total;
                view.pending += c.pending;
                view.active += c.active;
                view.succeeded += c.succeeded;
                view.failed += c.failed;
            }
        }
        self.counts = Some(by_state);
        self.stage_progress = Some(stages);
        self
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CampaignList {
    pub campaigns: Vec<CampaignView>,
    pub total: u64,
    pub next: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CampaignDeviceView {
    pub device_id: String,
    /// 1-based stage.
    pub stage: u32,
    pub state: String,
    pub progress: u8,
    pub attempts: u32,
    pub reason: Option<String>,
    pub notified_at: Option<DateTime<Utc>>,
    /// When the device times out if it has not succeeded: its notification plus the
    /// campaign's timeout, moved later by the time the campaign spent paused since (a pause
    /// suspends the clock; resuming gives the device the time it had left).
    pub deadline_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub history: Vec<HistoryEntry>,
}

impl From<CampaignDevice> for CampaignDeviceView {
    fn from(d: CampaignDevice) -> Self {
        CampaignDeviceView {
            device_id: d.device,
            stage: d.stage + 1,
            state: d.state.as_str().into(),
            progress: d.progress,
            attempts: d.attempts,
            reason: d.reason,
            notified_at: d.notified_at,
            deadline_at: d.deadline_at,
            updated_at: d.updated_at,
            history: d.history,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CampaignDeviceList {
    pub devices: Vec<CampaignDeviceView>,
    pub total: u64,
    pub next: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResumeBody {
    /// Make the failed, rejected and timed-out devices of the stages reached pending again
    /// (after fixing what made them fail). Default true.
    #[serde(default)]
    pub retry_failed: Option<bool>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RollbackBody {
    /// The image to go back to; default: the campaign's `rollbackFirmwareId`.
    #[serde(default)]
    pub firmware_id: Option<String>,
}

/// An optional JSON body: empty is the default, anything else must parse.
fn optional_body<T: Default + serde::de::DeserializeOwned>(body: &web::Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))
}

async fn find(state: &AppState, principal: &Principal, id: &str) -> Result<CampaignRecord, ApiError> {
    state
        .registry
        .get_campaign(&principal.tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("campaign {id} not found")))
}

/// Start an OTA campaign (it runs at once).
#[utoipa::path(
    tag = "campaigns",
    request_body = CampaignSpec,
    responses(
        (status = 201, body = CampaignView),
        (status = 400, body = ErrorBody, description = "validation_failed, unknown_firmware, unknown_device, empty_target, no_device_fits"),
    ),
    security(("bearer" = []))
)]
#[post("/campaigns")]
async fn create(
    state: web::Data<AppState>,
    principal: Principal,
    body: web::Json<CampaignSpec>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "campaign.create")?;
    let campaign = crate::ota::create_campaign(
        &state,
        &principal.tenant,
        body.into_inner(),
        principal.audit_actor(),
    )
    .await?;
    let counts = state.registry.campaign_counts(&campaign.id).await?;
    Ok(HttpResponse::Created().json(CampaignView::of(campaign).with_counts(&counts)))
}

/// The tenant's campaigns, newest first.
#[utoipa::path(
    tag = "campaigns",
    params(
        ("status" = Option<String>, Query, description = "running, paused, completed, cancelled or aborted"),
        ("limit" = Option<u32>, Query, description = "Page size, 1-1000 (default 100)"),
        ("after" = Option<String>, Query, description = "The `next` value of the previous page"),
    ),
    responses((status = 200, body = CampaignList), (status = 400, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/campaigns")]
async fn list(
    state: web::Data<AppState>,
    principal: Principal,
    query: web::Query<BTreeMap<String, String>>,
) -> Result<web::Json<CampaignList>, ApiError> {
    let mut status = None;
    let mut offset = 0;
    for (key, value) in query.iter() {
        match key.as_str() {
            "status" => {
                status = Some(
                    value
                        .parse::<CampaignStatus>()
                        .map_err(|m| ApiError::bad_request("invalid_query", format!("status: {m}")))?,
                )
            }
            "after" => {
                offset = value.parse::<u64>().map_err(|_| {
                    ApiError::bad_request("invalid_query", "after: use the `next` value of a page")
                })?
            }
            "limit" => {}
            other => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown parameter {other:?}; use status, limit or after"),
                ));
            }
        }
    }
    let limit = limit_param(query.get("limit").map(String::as_str))?;
    let page = state
        .registry
        .list_campaigns(&principal.tenant, status, limit, offset)
        .await?;
    Ok(web::Json(CampaignList {
        campaigns: page.items.into_iter().map(CampaignView::of).collect(),
        total: page.total,
        next: page.next,
    }))
}

/// One campaign with its counts per job state and per stage.
#[utoipa::path(
    tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id")),
    responses((status = 200, body = CampaignView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/campaigns/{id}")]
async fn get_one(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<CampaignView>, ApiError> {
    let campaign = find(&state, &principal, &id).await?;
    let counts = state.registry.campaign_counts(&campaign.id).await?;
    Ok(web::Json(CampaignView::of(campaign).with_counts(&counts)))
}

/// The campaign's devices with their state, progress and history, in device id order.
#[utoipa::path(
    tag = "campaigns",
    params(
        ("id" = String, Path, description = "Campaign id"),
        ("state" = Option<String>, Query, description = "Only devices in this job state"),
        ("limit" = Option<u32>, Query, description = "Page size, 1-1000 (default 100)"),
        ("after" = Option<String>, Query, description = "The `next` value of the previous page"),
    ),
    responses((status = 200, body = CampaignDeviceList), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/campaigns/{id}/devices")]
async fn devices(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    query: web::Query<BTreeMap<String, String>>,
) -> Result<web::Json<CampaignDeviceList>, ApiError> {
    let campaign = find(&state, &principal, &id).await?;
    let mut job_state = None;
    for key in query.keys() {
        if !matches!(key.as_str(), "state" | "limit" | "after") {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("unknown parameter {key:?}; use state, limit or after"),
            ));
        }
    }
    if let Some(raw) = query.get("state") {
        job_state = Some(
            raw.parse::<JobState>()
                .map_err(|m| ApiError::bad_request("invalid_query", format!("state: {m}")))?,
        );
    }
    let limit = limit_param(query.get("limit").map(String::as_str))?;
    let page = state
        .registry
        .list_campaign_devices(&campaign.id, job_state, query.get("after").cloned(), limit)
        .await?;
    Ok(web::Json(CampaignDeviceList {
        devices: page.items.into_iter().map(Into::into).collect(),
        total: page.total,
        next: page.next,
    }))
}

/// One device's job in the campaign, with its history.
#[utoipa::path(
    tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id"), ("deviceId" = String, Path, description = "Device id")),
    responses((status = 200, body = CampaignDeviceView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/campaigns/{id}/devices/{deviceId}")]
async fn device(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<(String, String)>,
) -> Result<web::Json<CampaignDeviceView>, ApiError> {
    let (id, device) = path.into_inner();
    let campaign = find(&state, &principal, &id).await?;
    let row = state
        .registry
        .get_campaign_device(&campaign.id, &device)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {device} is not in campaign {id}")))?;
    Ok(web::Json(row.into()))
}

/// Changes a campaign's status, or explains (409) why it cannot.
#[allow(clippy::too_many_arguments)]
async fn transition(
    state: &AppState,
    principal: &Principal,
    id: &str,
    from: &[CampaignStatus],
    to: CampaignStatus,
    reason: Option<String>,
    retry_failed: bool,
    cancel_devices: bool,
) -> Result<CampaignView, ApiError> {
    let campaign = find(state, principal, id).await?;
    let changed = state
        .registry
        .set_campaign_status(
            &principal.tenant,
            &campaign.id,
            from,
            to,
            None,
            reason,
            retry_failed,
            cancel_devices,
            principal.audit_actor(),
        )
        .await?;
    let Some((updated, told)) = changed else {
        return Err(ApiError::conflict(
            "invalid_state",
            format!("campaign {id} is {}; it cannot become {to}", campaign.status),
        ));
    };
    if !told.is_empty() {
        state.ota.runner.do_send(TellCancelled {
            tenant: principal.tenant.clone(),
            campaign: updated.id.clone(),
            devices: told,
        });
    }
    state.ota.runner.do_send(Kick {});
    let counts = state.registry.campaign_counts(&updated.id).await?;
    Ok(CampaignView::of(updated).with_counts(&counts))
}

/// Pause a running campaign: no more devices are notified; those working go on.
#[utoipa::path(
    tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id")),
    responses((status = 200, body = CampaignView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/campaigns/{id}/pause")]
async fn pause(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<CampaignView>, ApiError> {
    principal.require(Role::Operator, "campaign.pause")?;
    let reason = Some(format!("paused by {}", principal.actor()));
    let view = transition(
        &state,
        &principal,
        &id,
        &[CampaignStatus::Running],
        CampaignStatus::Paused,
        reason,
        false,
        false,
    )
    .await?;
    Ok(web::Json(view))
}

/// Resume a paused campaign; by default its failed devices are retried.
#[utoipa::path(
    tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id")),
    request_body(content = Option<ResumeBody>),
    responses((status = 200, body = CampaignView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/campaigns/{id}/resume")]
async fn resume(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<web::Json<CampaignView>, ApiError> {
    principal.require(Role::Operator, "campaign.resume")?;
    let body: ResumeBody = optional_body(&body)?;
    let view = transition(
        &state,
        &principal,
        &id,
        &[CampaignStatus::Paused],
        CampaignStatus::Running,
        None,
        body.retry_failed.unwrap_or(true),
        false,
    )
    .await?;
    Ok(web::Json(view))
}

/// Cancel a campaign: devices not finished are cancelled (and told, if they hold the job).
#[utoipa::path(
    tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id")),
    responses((status = 200, body = CampaignView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/campaigns/{id}/cancel")]
async fn cancel(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<CampaignView>, ApiError> {
    principal.require(Role::Operator, "campaign.cancel")?;
    let reason = Some(format!("cancelled by {}", principal.actor()));
    let view = transition(
        &state,
        &principal,
        &id,
        &[CampaignStatus::Running, CampaignStatus::Paused],
        CampaignStatus::Cancelled,
        reason,
        false,
        true,
    )
    .await?;
    Ok(web::Json(view))
}

/// Roll back: a new campaign installing the rollback firmware on every device this one
/// attempted, with the same rollout and failure rule. This one is cancelled if not finished.
#[utoipa::path(
    tag = "campaigns",
    params(("id" = String, Path, description = "Campaign id")),
    request_body(content = Option<RollbackBody>),
    responses(
        (status = 201, body = CampaignView, description = "The rollback campaign"),
        (status = 400, body = ErrorBody, description = "no_rollback_firmware, unknown_firmware, empty_target"),
        (status = 404, body = ErrorBody),
    ),
    security(("bearer" = []))
)]
#[post("/campaigns/{id}/rollback")]
async fn rollback(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "campaign.rollback")?;
    let body: RollbackBody = optional_body(&body)?;
    let campaign = find(&state, &principal, &id).await?;
    let created = rollback_campaign(
        &state,
        &principal.tenant,
        &campaign,
        body.firmware_id,
        principal.audit_actor(),
    )
    .await?;
    let counts = state.registry.campaign_counts(&created.id).await?;
    Ok(HttpResponse::Created().json(CampaignView::of(created).with_counts(&counts)))
}
