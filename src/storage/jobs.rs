//! Batch jobs in the registry: the job, its targets (one row per device, fixed at creation)
//! and each device's result. The registry is the [`JobStore`] the job actor runs from, so a job
//! resumes from here after a restart (or, in a cluster, on another node).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use drover_actors::job_actor::{DeviceResult, JobEnd, JobPlan, JobStore, JobStoreError};
use drover_actors::{DeviceId, TenantId};
use serde_json::Value;

use super::db::StoreError;
use super::records::{AuditActor, DeviceFilter};
use super::registry::{RegistryStore, audit, from_ms, insert_audit, matching_device_ids, now_ms};
use super::schema::{job_devices, jobs};

/// Where a job stands.
pub const QUEUED: &str = "queued";
pub const RUNNING: &str = "running";
pub const COMPLETED: &str = "completed";
pub const CANCELLED: &str = "cancelled";

/// A job to create.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub tenant: TenantId,
    pub operation: String,
    pub params: Value,
    /// The filter as the caller gave it (kept for display).
    pub filter_json: Value,
    pub filter: DeviceFilter,
    pub concurrency: u32,
    pub rate_per_sec: u32,
    /// Refuse a job over more devices than this.
    pub max_devices: usize,
    /// Set for a job finished at creation (update_firmware: the campaign does the work).
    pub detail: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub tenant: TenantId,
    pub operation: String,
    pub params: Value,
    pub filter: Value,
    pub status: String,
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub skipped: u64,
    pub concurrency: u32,
    pub rate_per_sec: u32,
    pub detail: Option<Value>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobDeviceRecord {
    pub device: String,
    pub status: String,
    pub result: Option<Value>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = jobs)]
struct JobRow {
    id: String,
    tenant_id: String,
    operation: String,
    params: String,
    filter: String,
    status: String,
    total: i64,
    succeeded: i64,
    failed: i64,
    skipped: i64,
    concurrency: i64,
    rate_per_sec: i64,
    detail: Option<String>,
    created_by: String,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    updated_at: i64,
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

impl JobRow {
    fn into_record(self) -> Result<JobRecord, StoreError> {
        Ok(JobRecord {
            tenant: TenantId::parse(self.tenant_id)
                .map_err(|e| StoreError::Internal(format!("stored job tenant: {e}")))?,
            params: json(&self.params),
            filter: json(&self.filter),
            detail: self.detail.as_deref().map(json),
            total: self.total.max(0) as u64,
            succeeded: self.succeeded.max(0) as u64,
            failed: self.failed.max(0) as u64,
            skipped: self.skipped.max(0) as u64,
            concurrency: self.concurrency.clamp(0, i64::from(u32::MAX)) as u32,
            rate_per_sec: self.rate_per_sec.clamp(0, i64::from(u32::MAX)) as u32,
            created_at: from_ms(self.created_at),
            started_at: self.started_at.map(from_ms),
            finished_at: self.finished_at.map(from_ms),
            updated_at: from_ms(self.updated_at),
            id: self.id,
            operation: self.operation,
            status: self.status,
            created_by: self.created_by,
        })
    }
}

fn store_error(e: StoreError) -> JobStoreError {
    JobStoreError(e.to_string())
}

impl RegistryStore {
    /// The devices a filter selects now: the ids (up to `limit`) and how many there are.
    pub async fn preview_targets(
        &self,
        tenant: &TenantId,
        filter: DeviceFilter,
        limit: usize,
    ) -> Result<(Vec<String>, u64), StoreError> {
        let tenant = tenant.clone();
        self.database()
            .read(move |conn| {
                let mut ids = matching_device_ids(conn, &tenant, filter)?;
                let total = ids.len() as u64;
                ids.truncate(limit);
                Ok((ids, total))
            })
            .await
    }

    /// Creates a job with its targets (the devices the filter selects now), in one transaction.
    pub async fn create_job(&self, new: NewJob, by: AuditActor) -> Result<JobRecord, StoreError> {
        self.database()
            .write(move |conn| {
                let now = now_ms();
                let id = uuid::Uuid::now_v7().to_string();
                let targets = if new.detail.is_some() {
                    Vec::new()
                } else {
                    matching_device_ids(conn, &new.tenant, new.filter.clone())?
                };
                if targets.len() > new.max_devices {
                    return Err(StoreError::LimitReached(format!(
                        "the filter selects {} devices; a job may target at most {}",
                        targets.len(),
                        new.max_devices
                    )));
                }
                let status = if new.detail.is_some() || targets.is_empty() {
                    COMPLETED
                } else {
                    QUEUED
                };
                diesel::insert_into(jobs::table)
                    .values((
                        jobs::id.eq(&id),
                        jobs::tenant_id.eq(new.tenant.as_str()),
                        jobs::operation.eq(&new.operation),
                        jobs::params.eq(new.params.to_string()),
                        jobs::filter.eq(new.filter_json.to_string()),
                        jobs::status.eq(status),
                        jobs::total.eq(targets.len() as i64),
                        jobs::concurrency.eq(i64::from(new.concurrency)),
                        jobs::rate_per_sec.eq(i64::from(new.rate_per_sec)),
                        jobs::detail.eq(new.detail.as_ref().map(Value::to_string)),
                        jobs::created_by.eq(&by.actor),
                        jobs::created_at.eq(now),
                        jobs::updated_at.eq(now),
                        jobs::finished_at.eq((status == COMPLETED).then_some(now)),
                    ))
                    .execute(conn)?;
                // One row per device (diesel's multi-backend connection has no batch insert;
                // inside one transaction these are cheap).
                for device in &targets {
                    diesel::insert_into(job_devices::table)
                        .values((
                            job_devices::job_id.eq(&id),
                            job_devices::device_id.eq(device),
                            job_devices::status.eq("pending"),
                            job_devices::updated_at.eq(now),
                        ))
                        .execute(conn)?;
                }
                insert_audit(
                    conn,
                    &audit(
                        &by,
                        "job.create",
                        &id,
                        Some(serde_json::json!({"operation": new.operation, "devices": targets.len()})),
                    ),
                )?;
                load_job(conn, &id)?.ok_or_else(|| StoreError::NotFound(format!("job {id}")))
            })
            .await
    }

    pub async fn get_job(&self, tenant: &TenantId, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.to_string());
        self.database()
            .read(move |conn| Ok(load_job(conn, &id)?.filter(|j| j.tenant == tenant)))
            .await
    }

    /// The tenant's jobs, newest first; `before` is the `next` of the previous page.
    pub async fn list_jobs(
        &self,
        tenant: &TenantId,
        limit: u32,
        before: Option<String>,
    ) -> Result<(Vec<JobRecord>, Option<String>), StoreError> {
        let tenant = tenant.clone();
        self.database()
            .read(move |conn| {
                let mut query = jobs::table
                    .filter(jobs::tenant_id.eq(tenant.as_str().to_string()))
                    .into_boxed();
                if let Some(before) = before {
                    query = query.filter(jobs::id.lt(before));
                }
                let limit = i64::from(limit.clamp(1, 1000));
                let mut rows: Vec<JobRow> = query
                    .order(jobs::id.desc())
                    .limit(limit + 1)
                    .select(JobRow::as_select())
                    .load(conn)?;
                let more = rows.len() as i64 > limit;
                rows.truncate(limit as usize);
                let next = more.then(|| rows.last().map(|r| r.id.clone())).flatten();
                let jobs = rows
                    .into_iter()
                    .map(JobRow::into_record)
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((jobs, next))
            })
            .await
    }

    /// A page of a job's per-device results in device id order, optionally of one status.
    pub async fn job_devices(
        &self,
        id: &str,
        status: Option<String>,
        limit: u32,
        after: Option<String>,
    ) -> Result<(Vec<JobDeviceRecord>, Option<String>), StoreError> {
        let id = id.to_string();
        self.database()
            .read(move |conn| {
                let mut query = job_devices::table.filter(job_devices::job_id.eq(id)).into_boxed();
                if let Some(status) = status {
                    query = query.filter(job_devices::status.eq(status));
                }
                if let Some(after) = after {
                    query = query.filter(job_devices::device_id.gt(after));
                }
                let limit = i64::from(limit.clamp(1, 1000));
                let mut rows: Vec<(String, String, Option<String>, i64)> = query
                    .order(job_devices::device_id)
                    .limit(limit + 1)
                    .select((
                        job_devices::device_id,
                        job_devices::status,
                        job_devices::result,
                        job_devices::updated_at,
                    ))
                    .load(conn)?;
                let more = rows.len() as i64 > limit;
                rows.truncate(limit as usize);
                let next = more.then(|| rows.last().map(|r| r.0.clone())).flatten();
                let items = rows
                    .into_iter()
                    .map(|(device, status, result, updated_at)| JobDeviceRecord {
                        device,
                        status,
                        result: result.as_deref().map(json),
                        updated_at: from_ms(updated_at),
                    })
                    .collect();
                Ok((items, next))
            })
            .await
    }

    /// Marks a job cancelled unless it has finished; answers the job as it is now.
    pub async fn cancel_job(
        &self,
        tenant: &TenantId,
        id: &str,
        by: AuditActor,
    ) -> Result<JobRecord, StoreError> {
        let (tenant, id) = (tenant.clone(), id.to_string());
        self.database()
            .write(move |conn| {
                let job = load_job(conn, &id)?
                    .filter(|j| j.tenant == tenant)
                    .ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
                if job.status != QUEUED && job.status != RUNNING {
                    return Err(StoreError::Conflict(format!(
                        "job {id} is already {}",
                        job.status
                    )));
                }
                finish(conn, &id, CANCELLED)?;
                insert_audit(conn, &audit(&by, "job.cancel", &id, None))?;
                load_job(conn, &id)?.ok_or_else(|| StoreError::NotFound(format!("job {id}")))
            })
            .await
    }

    /// The sealed secrets (rotated tokens) of a job, removed as they are read: they are handed
    /// out once.
    pub async fn take_job_secrets(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.to_string());
        self.database()
            .write(move |conn| {
                if load_job(conn, &id)?.filter(|j| j.tenant == tenant).is_none() {
                    return Err(StoreError::NotFound(format!("job {id}")));
                }
                let secrets: Vec<(String, Option<String>)> = job_devices::table
                    .filter(job_devices::job_id.eq(&id))
                    .filter(job_devices::secret.is_not_null())
                    .order(job_devices::device_id)
                    .select((job_devices::device_id, job_devices::secret))
                    .load(conn)?;
                diesel::update(
                    job_devices::table
                        .filter(job_devices::job_id.eq(&id))
                        .filter(job_devices::secret.is_not_null()),
                )
                .set(job_devices::secret.eq(None::<String>))
                .execute(conn)?;
                Ok(secrets
                    .into_iter()
                    .filter_map(|(d, s)| s.map(|s| (d, s)))
                    .collect())
            })
            .await
    }
}

fn load_job(conn: &mut super::db::DbConnection, id: &str) -> Result<Option<JobRecord>, StoreError> {
    jobs::table
        .filter(jobs::id.eq(id))
        .select(JobRow::as_select())
        .first::<JobRow>(conn)
        .optional()?
        .map(JobRow::into_record)
        .transpose()
}

/// Ends a job: devices without a result stay `pending` for a completed job (none are left) or
/// become `cancelled`.
fn finish(conn: &mut super::db::DbConnection, id: &str, status: &str) -> Result<(), StoreError> {
    let now = now_ms();
    diesel::update(
        jobs::table
            .filter(jobs::id.eq(id))
            .filter(jobs::status.eq_any([QUEUED, RUNNING])),
    )
    .set((
        jobs::status.eq(status),
        jobs::finished_at.eq(now),
        jobs::updated_at.eq(now),
    ))
    .execute(conn)?;
    if status == CANCELLED {
        diesel::update(
            job_devices::table
                .filter(job_devices::job_id.eq(id))
                .filter(job_devices::status.eq("pending")),
        )
        .set((job_devices::status.eq(CANCELLED), job_devices::updated_at.eq(now)))
        .execute(conn)?;
    }
    Ok(())
}

/// The job store the job actor runs from; `seal` protects secrets at rest.
pub struct RegistryJobStore {
    pub registry: RegistryStore,
    pub seal: std::sync::Arc<dyn Fn(&str) -> String + Send + Sync>,
}

#[async_trait]
impl JobStore for RegistryJobStore {
    async fn runnable_jobs(&self) -> Result<Vec<String>, JobStoreError> {
        self.registry
            .database()
            .read(|conn| {
                Ok(jobs::table
                    .filter(jobs::status.eq_any([QUEUED, RUNNING]))
                    .order(jobs::id)
                    .select(jobs::id)
                    .load::<String>(conn)?)
            })
            .await
            .map_err(store_error)
    }

    async fn start_job(&self, job: &str) -> Result<Option<JobPlan>, JobStoreError> {
        let id = job.to_string();
        self.registry
            .database()
            .write(move |conn| {
                let Some(record) = load_job(conn, &id)? else {
                    return Ok(None);
                };
                if record.status != QUEUED && record.status != RUNNING {
                    return Ok(None);
                }
                let now = now_ms();
                diesel::update(jobs::table.filter(jobs::id.eq(&id)))
                    .set((jobs::status.eq(RUNNING), jobs::updated_at.eq(now)))
                    .execute(conn)?;
                diesel::update(
                    jobs::table
                        .filter(jobs::id.eq(&id))
                        .filter(jobs::started_at.is_null()),
                )
                .set(jobs::started_at.eq(now))
                .execute(conn)?;
                Ok(Some(JobPlan {
                    id: record.id,
                    tenant: record.tenant,
                    operation: record.operation,
                    params: record.params,
                    created_by: record.created_by,
                    concurrency: record.concurrency.max(1) as usize,
                    rate_per_sec: record.rate_per_sec,
                }))
            })
            .await
            .map_err(store_error)
    }

    async fn pending_devices(
        &self,
        job: &str,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<Vec<DeviceId>, JobStoreError> {
        let (id, after) = (job.to_string(), after.map(|d| d.as_str().to_string()));
        self.registry
            .database()
            .read(move |conn| {
                let mut query = job_devices::table
                    .filter(job_devices::job_id.eq(id))
                    .filter(job_devices::status.eq("pending"))
                    .into_boxed();
                if let Some(after) = after {
                    query = query.filter(job_devices::device_id.gt(after));
                }
                let ids: Vec<String> = query
                    .order(job_devices::device_id)
                    .limit(limit as i64)
                    .select(job_devices::device_id)
                    .load(conn)?;
                Ok(ids.into_iter().filter_map(|d| DeviceId::parse(d).ok()).collect())
            })
            .await
            .map_err(store_error)
    }

    async fn record_results(&self, job: &str, results: Vec<DeviceResult>) -> Result<bool, JobStoreError> {
        let id = job.to_string();
        let sealed: Vec<Option<String>> = results
            .iter()
            .map(|r| r.secret.as_deref().map(|s| (self.seal)(s)))
            .collect();
        self.registry
            .database()
            .write(move |conn| {
                let now = now_ms();
                let (mut succeeded, mut failed, mut skipped) = (0i64, 0i64, 0i64);
                for (result, secret) in results.iter().zip(sealed) {
                    // A device still in progress when the job was cancelled was done all the
                    // same: its real outcome replaces `cancelled`.
                    let changed = diesel::update(
                        job_devices::table
                            .filter(job_devices::job_id.eq(&id))
                            .filter(job_devices::device_id.eq(result.device.as_str()))
                            .filter(job_devices::status.eq_any(["pending", CANCELLED])),
                    )
                    .set((
                        job_devices::status.eq(result.status.as_str()),
                        job_devices::result.eq(result.detail.to_string()),
                        job_devices::secret.eq(secret),
                        job_devices::updated_at.eq(now),
                    ))
                    .execute(conn)?;
                    if changed == 1 {
                        match result.status {
                            drover_actors::job_actor::DeviceOutcome::Succeeded => succeeded += 1,
                            drover_actors::job_actor::DeviceOutcome::Failed => failed += 1,
                            drover_actors::job_actor::DeviceOutcome::Skipped => skipped += 1,
                        }
                    }
                }
                diesel::update(jobs::table.filter(jobs::id.eq(&id)))
                    .set((
                        jobs::succeeded.eq(jobs::succeeded + succeeded),
                        jobs::failed.eq(jobs::failed + failed),
                        jobs::skipped.eq(jobs::skipped + skipped),
                        jobs::updated_at.eq(now),
                    ))
                    .execute(conn)?;
                let status: String = jobs::table
                    .filter(jobs::id.eq(&id))
                    .select(jobs::status)
                    .first(conn)?;
                Ok(status == CANCELLED)
            })
            .await
            .map_err(store_error)
    }

    async fn finish_job(&self, job: &str, end: JobEnd) -> Result<(), JobStoreError> {
        let id = job.to_string();
        let status = match end {
            JobEnd::Completed => COMPLETED,
            JobEnd::Cancelled => CANCELLED,
        };
        self.registry
            .database()
            .write(move |conn| finish(conn, &id, status))
            .await
            .map_err(store_error)
    }
}
