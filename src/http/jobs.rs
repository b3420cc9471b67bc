//! Batch operations as jobs: `POST /api/devices/batch` (or its dry run), the jobs with their
//! progress and per-device results, cancelling, and collecting rotated tokens once.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, get, post, web};
use chrono::{DateTime, Utc};
use drover_actors::Role;
use drover_actors::job_actor::{CancelJob, RunJob};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::fleet_ops::jobs::{
    DEFAULT_CONCURRENCY, DEFAULT_RATE, LaunchError, MAX_CONCURRENCY, MAX_JOB_DEVICES, MAX_RATE, Operation,
    parse_filter,
};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::params::limit_param;
use crate::http::principal::Principal;
use crate::state::AppState;
use crate::storage::jobs::{JobDeviceRecord, JobRecord, NewJob};

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(create_batch)
        .service(list_jobs)
        .service(get_job)
        .service(cancel_job)
        .service(job_tokens);
}

/// Longest a cancellation waits for the devices in progress.
const CANCEL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Devices a dry run lists at most (it counts them all).
const DRY_RUN_LIST: usize = 1000;

/// Body of `POST /api/devices/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchBody {
    /// `set_metadata`, `unset_metadata`, `add_tags`, `remove_tags`, `add_to_group`,
    /// `remove_from_group`, `shadow_desired`, `send_command`, `enable`, `disable`,
    /// `rotate_tokens`, `delete` or `update_firmware`.
    #[schema(example = "add_tags")]
    pub operation: String,
    /// Which devices: `type`, `tag`, `tags`, `group` (static or dynamic), `status`, `firmware`,
    /// `deviceIds`, `metadata` (object), `all`; any other key is a metadata key.
    #[schema(value_type = Object, example = json!({"type": "sensor", "location": "warehouse-a"}))]
    pub filter: Value,
    /// The operation's parameters.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: Value,
    /// Devices worked on at once (1-256, default 16).
    pub concurrency: Option<u32>,
    /// Devices started per second at most (1-100000, default 1000).
    pub rate_per_sec: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatchQuery {
    pub dry_run: Option<bool>,
}

/// A job with its progress.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub id: String,
    pub operation: String,
    #[schema(value_type = Object)]
    pub params: Value,
    #[schema(value_type = Object)]
    pub filter: Value,
    /// `queued`, `running`, `completed` or `cancelled`.
    pub status: String,
    /// Devices the job targets (fixed when it was created).
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub skipped: u64,
    /// Devices not done yet.
    pub pending: u64,
    pub concurrency: u32,
    pub rate_per_sec: u32,
    /// For `update_firmware`: `{"campaignId": …}`.
    #[schema(value_type = Option<Object>)]
    pub detail: Option<Value>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

impl From<JobRecord> for JobView {
    fn from(j: JobRecord) -> Self {
        let done = j.succeeded + j.failed + j.skipped;
        JobView {
            pending: if j.status == "cancelled" {
                0
            } else {
                j.total.saturating_sub(done)
            },
            id: j.id,
            operation: j.operation,
            params: j.params,
            filter: j.filter,
            status: j.status,
            total: j.total,
            succeeded: j.succeeded,
            failed: j.failed,
            skipped: j.skipped,
            concurrency: j.concurrency,
            rate_per_sec: j.rate_per_sec,
            detail: j.detail,
            created_by: j.created_by,
            created_at: j.created_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            updated_at: j.updated_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobDeviceView {
    pub device_id: String,
    /// `pending`, `succeeded`, `failed`, `skipped` or `cancelled`.
    pub status: String,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub updated_at: DateTime<Utc>,
}

impl From<JobDeviceRecord> for JobDeviceView {
    fn from(d: JobDeviceRecord) -> Self {
        JobDeviceView {
            device_id: d.device,
            status: d.status,
            result: d.result,
            updated_at: d.updated_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: JobView,
    /// A page of per-device results, in device id order.
    pub devices: Vec<JobDeviceView>,
    /// Pass as `after` to read the next page of results; absent on the last page.
    pub next: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
    /// Pass as `before` to read older jobs.
    pub next: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DryRun {
    pub dry_run: bool,
    pub operation: String,
    /// Devices the job would touch now.
    pub total: u64,
    /// The first of them, in id order (at most 1000).
    pub devices: Vec<String>,
    pub truncated: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobToken {
    pub device_id: String,
    pub token: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobTokens {
    /// Tokens not collected before; each is handed out once.
    pub tokens: Vec<JobToken>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobQuery {
    pub status: Option<String>,
    pub limit: Option<String>,
    pub after: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobListQuery {
    pub limit: Option<String>,
    pub before: Option<String>,
}

fn launch_error(error: LaunchError) -> ApiError {
    match error {
        LaunchError::Invalid(m) => ApiError::bad_request("validation_failed", m),
        LaunchError::NotFound(m) => ApiError::not_found(m),
        LaunchError::Store(e) => e.into(),
    }
}

/// Run one operation over the devices a filter selects, as a job (202 with the job), or see
/// which devices it would touch (`?dryRun=true`).
#[utoipa::path(
    tag = "jobs",
    params(("dryRun" = Option<bool>, Query, description = "Only list what would be touched")),
    request_body = BatchBody,
    responses(
        (status = 202, description = "Job created", body = JobView),
        (status = 200, description = "Dry run", body = DryRun),
        (status = 400, body = ErrorBody),
        (status = 409, description = "Too many devices (limit_reached)", body = ErrorBody),
        (status = 501, description = "update_firmware without OTA campaigns", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
#[post("/devices/batch")]
async fn create_batch(
    state: web::Data<AppState>,
    principal: Principal,
    query: web::Query<BatchQuery>,
    body: web::Json<BatchBody>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "job.create")?;
    let body = body.into_inner();
    let operation = Operation::parse(&body.operation, &body.params)
        .map_err(|m| ApiError::bad_request("validation_failed", m))?;
    let filter = parse_filter(&body.filter).map_err(|m| ApiError::bad_request("validation_failed", m))?;
    let concurrency = body.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
        return Err(ApiError::invalid(
            "concurrency",
            format!("1 to {MAX_CONCURRENCY}"),
        ));
    }
    let rate = body.rate_per_sec.unwrap_or(DEFAULT_RATE);
    if !(1..=MAX_RATE).contains(&rate) {
        return Err(ApiError::invalid("ratePerSec", format!("1 to {MAX_RATE}")));
    }
    if query.dry_run.unwrap_or(false) {
        let (devices, total) = state
            .registry
            .preview_targets(&principal.tenant, filter, DRY_RUN_LIST)
            .await?;
        return Ok(HttpResponse::Ok().json(DryRun {
            dry_run: true,
            operation: body.operation,
            truncated: (devices.len() as u64) < total,
            total,
            devices,
        }));
    }
    let detail = if let Operation::UpdateFirmware { params } = &operation {
        let launcher = state.fleet_ops.jobs.campaigns().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "campaigns_unavailable",
                "update_firmware starts an OTA campaign, and OTA campaigns are not available on this server",
            )
        })?;
        let campaign = launcher
            .launch(
                &principal.tenant,
                filter.clone(),
                params.clone(),
                principal.audit_actor(),
            )
            .await
            .map_err(launch_error)?;
        Some(json!({ "campaignId": campaign }))
    } else {
        None
    };
    let new = NewJob {
        tenant: principal.tenant.clone(),
        operation: body.operation,
        params: body.params,
        filter_json: body.filter,
        filter,
        concurrency,
        rate_per_sec: rate,
        max_devices: MAX_JOB_DEVICES,
        detail,
    };
    let job = state.registry.create_job(new, principal.audit_actor()).await?;
    if job.status == crate::storage::jobs::QUEUED {
        state
            .fleet_ops
            .jobs
            .runner
            .send(RunJob { job: job.id.clone() })
            .await
            .map_err(|e| ApiError::unavailable(format!("job runner: {e}"), 1))?;
    }
    tracing::info!(tenant = %principal.tenant, job = %job.id, operation = %job.operation, devices = job.total, "batch job created");
    Ok(HttpResponse::Accepted()
        .insert_header(("Location", format!("/api/jobs/{}", job.id)))
        .json(JobView::from(job)))
}

/// The tenant's jobs, newest first.
#[utoipa::path(
    tag = "jobs",
    params(
        ("limit" = Option<u32>, Query, description = "Page size, 1-1000 (default 100)"),
        ("before" = Option<String>, Query, description = "The `next` value of the previous page"),
    ),
    responses((status = 200, body = JobList), (status = 400, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/jobs")]
async fn list_jobs(
    state: web::Data<AppState>,
    principal: Principal,
    query: web::Query<JobListQuery>,
) -> Result<web::Json<JobList>, ApiError> {
    let query = query.into_inner();
    let limit = limit_param(query.limit.as_deref())?;
    let (jobs, next) = state
        .registry
        .list_jobs(&principal.tenant, limit, query.before)
        .await?;
    Ok(web::Json(JobList {
        jobs: jobs.into_iter().map(Into::into).collect(),
        next,
    }))
}

async fn tenant_job(state: &AppState, principal: &Principal, id: &str) -> Result<JobRecord, ApiError> {
    state
        .registry
        .get_job(&principal.tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("job {id} not found")))
}

/// A job's progress and a page of its per-device results.
#[utoipa::path(
    tag = "jobs",
    params(
        ("id" = String, Path, description = "Job id"),
        ("status" = Option<String>, Query, description = "Only results of this status"),
        ("limit" = Option<u32>, Query, description = "Page size, 1-1000 (default 100)"),
        ("after" = Option<String>, Query, description = "The `next` value of the previous page"),
    ),
    responses((status = 200, body = JobDetail), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/jobs/{id}")]
async fn get_job(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    query: web::Query<JobQuery>,
) -> Result<web::Json<JobDetail>, ApiError> {
    let query = query.into_inner();
    let limit = limit_param(query.limit.as_deref())?;
    if let Some(status) = &query.status
        && !["pending", "succeeded", "failed", "skipped", "cancelled"].contains(&status.as_str())
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("status {status:?}: use pending, succeeded, failed, skipped or cancelled"),
        ));
    }
    let job = tenant_job(&state, &principal, &id).await?;
    let (devices, next) = state
        .registry
        .job_devices(&job.id, query.status, limit, query.after)
        .await?;
    Ok(web::Json(JobDetail {
        job: job.into(),
        devices: devices.into_iter().map(Into::into).collect(),
        next,
    }))
}

/// Cancel a job: devices in progress finish (the answer waits for them, up to 10 s), the rest
/// are left undone (`cancelled`).
#[utoipa::path(
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/jobs/{id}/cancel")]
async fn cancel_job(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<JobView>, ApiError> {
    principal.require(Role::Operator, "job.cancel")?;
    let job = state
        .registry
        .cancel_job(&principal.tenant, &id, principal.audit_actor())
        .await?;
    // Answer once the devices in progress are done (their results recorded), so nothing more
    // happens to the job's devices after this answer; a device still waiting for a command's
    // answer is not waited for beyond CANCEL_WAIT.
    let stopped = state
        .fleet_ops
        .jobs
        .runner
        .send(CancelJob { job: job.id.clone() });
    let _ = tokio::time::timeout(CANCEL_WAIT, stopped).await;
    let job = tenant_job(&state, &principal, &job.id).await?;
    tracing::info!(tenant = %principal.tenant, job = %job.id, "batch job cancelled");
    Ok(web::Json(job.into()))
}

/// The new tokens of a `rotate_tokens` job, for the caller that created it; each is handed out
/// once (a second call answers only tokens rotated since).
#[utoipa::path(
    tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = JobTokens), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/jobs/{id}/tokens")]
async fn job_tokens(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<JobTokens>, ApiError> {
    let job = tenant_job(&state, &principal, &id).await?;
    if job.created_by != principal.actor() {
        return Err(ApiError::forbidden(
            "only the caller that created the job receives its tokens",
        ));
    }
    let sealed = state
        .registry
        .take_job_secrets(&principal.tenant, &job.id)
        .await?;
    let mut tokens = Vec::with_capacity(sealed.len());
    for (device_id, secret) in sealed {
        let token = state
            .fleet_ops
            .secrets
            .open(&secret)
            .map_err(|e| ApiError::internal(format!("token of {device_id}: {e}")))?;
        tokens.push(JobToken { device_id, token });
    }
    Ok(web::Json(JobTokens { tokens }))
}
