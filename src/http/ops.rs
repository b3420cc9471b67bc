//! Operations: health, Prometheus metrics, platform statistics and the live actor tree.

use actix_web::{HttpResponse, get, web};
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::health::PublicHealthReport;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::principal::Principal;
use crate::state::AppState;
use crate::storage::records::DeviceCounts;

/// Health of each backend; 503 when a required one is down. Anyone gets each backend's status
/// (`PublicHealthReport`); a platform admin's credentials add targets, latencies, errors and the
/// version (`HealthReport`).
#[utoipa::path(
    tag = "operations",
    responses(
        (status = 200, body = PublicHealthReport, description = "Statuses; a platform admin gets a HealthReport"),
        (status = 503, description = "A required backend is down", body = PublicHealthReport)
    ),
    security((), ("bearer" = []))
)]
#[get("/health")]
pub async fn health(state: web::Data<AppState>, principal: Option<Principal>) -> HttpResponse {
    let report = state.health.check(state.started.elapsed()).await;
    let mut response = if report.healthy() {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    if principal.is_some_and(|p| p.platform_admin) {
        response.json(report)
    } else {
        response.json(report.public())
    }
}

/// Prometheus text exposition format.
#[utoipa::path(tag = "operations", responses((status = 200, description = "Prometheus metrics", content_type = "text/plain")))]
#[get("/metrics")]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state
        .metrics
        .uptime_seconds
        .set(state.started.elapsed().as_secs() as i64);
    if let Some(bytes) = crate::heap::allocated_bytes() {
        state.metrics.heap_allocated_bytes.set(bytes as i64);
    }
    // Registry figures are read at scrape time; if the registry is down they keep their last value.
    if let Ok(counts) = state.registry.device_counts(None).await {
        state.metrics.devices_registered.set(counts.registered as i64);
        state.metrics.devices_connected.set(counts.connected as i64);
    }
    if let Ok(tenants) = state.registry.count_tenants().await {
        state.metrics.tenants.set(tenants as i64);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCountsView {
    pub registered: u64,
    pub connected: u64,
    pub disabled: u64,
}

impl From<DeviceCounts> for DeviceCountsView {
    fn from(c: DeviceCounts) -> Self {
        DeviceCountsView {
            registered: c.registered,
            connected: c.connected,
            disabled: c.disabled,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryStatsView {
    /// Messages (a batch counts once) whose points were committed.
    pub messages: u64,
    pub points: u64,
}

impl From<drover_actors::pipeline::TenantTelemetry> for TelemetryStatsView {
    fn from(t: drover_actors::pipeline::TenantTelemetry) -> Self {
        TelemetryStatsView {
            messages: t.messages,
            points: t.points,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlatformStats {
    pub tenants: u64,
    /// Telemetry committed since the server started, all tenants.
    pub telemetry: TelemetryStatsView,
    pub devices: DeviceCountsView,
    pub tenant_supervisors: usize,
    pub device_actors: usize,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatsView {
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub uptime_seconds: u64,
    /// The caller's tenant.
    pub tenant: String,
    pub devices: DeviceCountsView,
    /// Telemetry of the caller's tenant committed since the server started.
    pub telemetry: TelemetryStatsView,
    /// Whole-platform figures, for platform admins.
    pub platform: Option<PlatformStats>,
}

/// Device and platform statistics for the caller's tenant (whole platform for platform admins).
#[utoipa::path(tag = "operations", responses((status = 200, body = StatsView), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
#[get("/stats")]
pub async fn stats(
    state: web::Data<AppState>,
    principal: Principal,
) -> Result<web::Json<StatsView>, ApiError> {
    let devices = state.registry.device_counts(Some(&principal.tenant)).await?;
    let platform = if principal.platform_admin {
        let tree = state.fleet.inspect().await;
        Some(PlatformStats {
            tenants: state.registry.count_tenants().await?,
            telemetry: state.pipeline.counts(None).into(),
            devices: state.registry.device_counts(None).await?.into(),
            tenant_supervisors: tree.len(),
            device_actors: tree.iter().map(|t| t.devices.len()).sum(),
        })
    } else {
        None
    };
    let uptime = state.started.elapsed();
    Ok(web::Json(StatsView {
        version: env!("CARGO_PKG_VERSION").into(),
        // Milliseconds, like every other time the API shows.
        started_at: (Utc::now() - chrono::Duration::from_std(uptime).unwrap_or_default()).trunc_subsecs(3),
        uptime_seconds: uptime.as_secs(),
        tenant: principal.tenant.to_string(),
        devices: devices.into(),
        telemetry: state.pipeline.counts(Some(&principal.tenant)).into(),
        platform,
    }))
}

/// How long the actor listing waits for one singleton actor busy with a long message.
const INSPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A singleton actor's answer, or why there is none.
async fn inspected<T: Serialize>(
    answer: impl std::future::Future<Output = Result<T, actix::MailboxError>>,
) -> serde_json::Value {
    match tokio::time::timeout(INSPECT_TIMEOUT, answer).await {
        Ok(Ok(snapshot)) => serde_json::to_value(snapshot).unwrap_or_default(),
        Ok(Err(_)) => serde_json::json!({ "state": "stopped" }),
        Err(_) => serde_json::json!({ "state": "busy", "message": "did not answer within 2 s" }),
    }
}

/// The live actor tree (platform admins): tenant supervisors and their device actors, the
/// telemetry writers, the spool replayer, the downsampler, the rule router with its rule
/// actors and evaluation threads, the alarm service, the batch job runner, the OTA campaign
/// runner, and the `/ws` session actors.
#[utoipa::path(
    tag = "operations",
    responses((status = 200, description = "Every kind of actor the platform runs: tenants (supervisors with their device actors), writers, spool, replayer, downsampler, rules (router, rule actors, workers), alarmService, jobRunner, campaignRunner, sessions", body = Object), (status = 403, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/admin/actors")]
pub async fn actors(state: web::Data<AppState>, principal: Principal) -> Result<HttpResponse, ApiError> {
    principal.require_platform_admin("admin.actors")?;
    let tenants = state.fleet.inspect().await;
    let writers = state.writers.inspect().await;
    let replayer = inspected(
        state
            .replayer
            .send(drover_actors::telemetry_writer::InspectReplayer {}),
    )
    .await;
    let downsampler = inspected(
        state
            .downsampler
            .send(drover_actors::downsampler::GetDownsamplerState {}),
    )
    .await;
    let router = inspected(
        state
            .rules
            .router
            .send(drover_actors::rule_router::InspectRules {}),
    )
    .await;
    let alarm_service = inspected(
        state
            .rules
            .alarms
            .send(crate::rules::alarms::InspectAlarmService {}),
    )
    .await;
    let job_runner = inspected(
        state
            .fleet_ops
            .jobs
            .runner
            .send(drover_actors::job_actor::InspectJobRunner {}),
    )
    .await;
    let campaign_runner = inspected(state.ota.runner.send(crate::ota::runner::InspectRunner {})).await;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "tenants": tenants,
        "writers": writers,
        "spooling": state.writers.is_spooling(),
        "spool": state.telemetry_spool.depth(),
        "replayer": replayer,
        "downsampler": downsampler,
        "rules": {
            "router": router,
            "workers": state.rules.workers_snapshot(),
        },
        "alarmService": alarm_service,
        "jobRunner": job_runner,
        "campaignRunner": campaign_runner,
        "sessions": state.hub.session_snapshots(None),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusiestQuery {
    limit: Option<String>,
}

/// The caller's tenant's devices that sent the most telemetry lately, most active first.
/// Device actors are asked for their message counts on request (at most every 2 s per
/// tenant), never on the ingestion path; a first request waits about 1 s for two samples.
#[utoipa::path(
    tag = "operations",
    params(("limit" = Option<u32>, Query, description = "1-100 (default 10)")),
    responses((status = 200, body = crate::dashboard::activity::BusiestDevices), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/stats/busiest-devices")]
pub async fn busiest_devices(
    state: web::Data<AppState>,
    principal: Principal,
    query: web::Query<BusiestQuery>,
) -> Result<web::Json<crate::dashboard::activity::BusiestDevices>, ApiError> {
    let max = crate::dashboard::activity::MAX_RANKED;
    let limit = match query.limit.as_deref() {
        None => 10,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("limit: expected a number from 1 to {max}, got {v:?}"),
                ));
            }
        },
    };
    Ok(web::Json(
        state
            .hub
            .activity()
            .busiest(&state.fleet, &principal.tenant, limit)
            .await,
    ))
}

/// One device actor's live state: connection, counters, record, mailbox (platform admins).
/// The actor is started if it was not running, as any access to the device does.
#[utoipa::path(
    tag = "operations",
    params(("tenant" = String, Path), ("deviceId" = String, Path)),
    responses((status = 200, description = "The device actor's state", body = Object), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/admin/actors/{tenant}/{deviceId}")]
pub async fn device_actor(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    principal.require_platform_admin("admin.actors")?;
    let (tenant, device) = path.into_inner();
    let tenant = drover_actors::TenantId::parse(tenant.as_str()).map_err(ApiError::invalid_id)?;
    let device = crate::http::devices::device_id(&device)?;
    let addr = state
        .fleet
        .device(&tenant, &device)
        .await
        .map_err(|e| ApiError::unavailable(format!("device actors: {e}"), 5))?
        .ok_or_else(|| ApiError::not_found(format!("no device `{device}` in tenant `{tenant}`")))?;
    let snapshot = addr
        .send(drover_actors::device_actor::GetDeviceState {})
        .await
        .map_err(|e| ApiError::unavailable(format!("device actor: {e}"), 5))?;
    let restarts = state
        .fleet
        .inspect()
        .await
        .into_iter()
        .filter(|t| t.tenant == tenant)
        .flat_map(|t| t.devices)
        .find(|d| d.device == device);
    Ok(HttpResponse::Ok().json(serde_json::json!({ "actor": snapshot, "supervision": restarts })))
}
