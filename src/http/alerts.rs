//! Alarms (`/api/alerts`): list with filters, one alarm with its history and delivery log,
//! acknowledge, clear, comment. Acknowledging or clearing stops the alarm's escalation.

use actix_web::{HttpResponse, get, post, web};
use drover_actors::Role;
use drover_actors::rules::Severity;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_actix_web::service_config::ServiceConfig;

use crate::http::error::{ApiError, ErrorBody};
use crate::http::principal::Principal;
use crate::rules::view::{AlarmEventView, AlarmView, DeliveryView};
use crate::state::AppState;
use crate::storage::rules::AlarmFilter;

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(list_alerts)
        .service(get_alert)
        .service(ack_alert)
        .service(clear_alert)
        .service(comment_alert);
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AlertQuery {
    /// ACTIVE_UNACK, ACTIVE_ACK, CLEARED_UNACK or CLEARED_ACK.
    pub status: Option<String>,
    pub active: Option<bool>,
    pub acknowledged: Option<bool>,
    /// critical, major, minor or warning.
    pub severity: Option<String>,
    pub device_id: Option<String>,
    pub rule_id: Option<String>,
    /// Last seen at or after this time (RFC 3339).
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// At most this many (default 100, at most 1000), most recently seen first.
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AlertList {
    pub alerts: Vec<AlarmView>,
}

/// An alarm with its history (created, severity, escalated, acknowledged, cleared, comments) and
/// its delivery log.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertDetail {
    #[serde(flatten)]
    pub alert: AlarmView,
    pub events: Vec<AlarmEventView>,
    pub deliveries: Vec<DeliveryView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommentBody {
    pub text: String,
}

/// Alarms of the tenant.
#[utoipa::path(
    tag = "alerts",
    params(AlertQuery),
    responses((status = 200, body = AlertList), (status = 400, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/alerts")]
async fn list_alerts(
    state: web::Data<AppState>,
    principal: Principal,
    query: web::Query<AlertQuery>,
) -> Result<web::Json<AlertList>, ApiError> {
    let q = query.into_inner();
    if let Some(status) = &q.status
        && !["ACTIVE_UNACK", "ACTIVE_ACK", "CLEARED_UNACK", "CLEARED_ACK"].contains(&status.as_str())
    {
        return Err(ApiError::invalid(
            "status",
            "ACTIVE_UNACK, ACTIVE_ACK, CLEARED_UNACK or CLEARED_ACK",
        ));
    }
    let severity = q
        .severity
        .as_deref()
        .map(|s| {
            Severity::parse(s)
                .ok_or_else(|| ApiError::invalid("severity", "critical, major, minor or warning"))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit", "between 1 and 1000"));
    }
    let alarms = state
        .registry
        .list_alarms(
            &principal.tenant,
            AlarmFilter {
                status: q.status,
                active: q.active,
                acknowledged: q.acknowledged,
                severity,
                device: q.device_id,
                rule_id: q.rule_id,
                since_ms: q.since.map(|t| t.timestamp_millis()),
                limit,
            },
        )
        .await?;
    Ok(web::Json(AlertList {
        alerts: alarms.iter().map(AlarmView::from).collect(),
    }))
}

/// One alarm with its history and delivery log.
#[utoipa::path(
    tag = "alerts",
    params(("id" = String, Path, description = "Alarm id")),
    responses((status = 200, body = AlertDetail), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/alerts/{id}")]
async fn get_alert(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<AlertDetail>, ApiError> {
    let (alarm, events, deliveries) = state.registry.get_alarm(&principal.tenant, &id).await?;
    Ok(web::Json(AlertDetail {
        alert: AlarmView::from(&alarm),
        events: events.into_iter().map(Into::into).collect(),
        deliveries: deliveries.into_iter().map(Into::into).collect(),
    }))
}

/// Acknowledge an alarm (stops its escalation).
#[utoipa::path(
    tag = "alerts",
    params(("id" = String, Path, description = "Alarm id")),
    responses((status = 200, body = AlarmView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/alerts/{id}/ack")]
async fn ack_alert(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<AlarmView>, ApiError> {
    principal.require(Role::Operator, "alert.ack")?;
    let now = state.rules.clock.now_ms();
    let alarm = state
        .registry
        .ack_alarm(
            principal.tenant.clone(),
            id.into_inner(),
            now,
            principal.audit_actor(),
        )
        .await?;
    let view = AlarmView::from(&alarm);
    state.hub.alarm("acknowledged", view.clone());
    Ok(web::Json(view))
}

/// Clear an alarm by hand (stops its escalation; the rule may raise a new one).
#[utoipa::path(
    tag = "alerts",
    params(("id" = String, Path, description = "Alarm id")),
    responses((status = 200, body = AlarmView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/alerts/{id}/clear")]
async fn clear_alert(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<AlarmView>, ApiError> {
    principal.require(Role::Operator, "alert.clear")?;
    let now = state.rules.clock.now_ms();
    let alarm = state
        .registry
        .clear_alarm(
            principal.tenant.clone(),
            id.into_inner(),
            now,
            principal.audit_actor(),
        )
        .await?;
    state
        .rules
        .alarm_closed(&principal.tenant, &alarm.rule_id, &alarm.device);
    state
        .mqtt
        .tell_cluster(crate::cluster::notices::Notice::AlarmClosed {
            tenant: principal.tenant.to_string(),
            rule_id: alarm.rule_id.clone(),
            device: alarm.device.clone(),
        });
    let view = AlarmView::from(&alarm);
    state.hub.alarm("cleared", view.clone());
    Ok(web::Json(view))
}

/// Comment on an alarm.
#[utoipa::path(
    tag = "alerts",
    params(("id" = String, Path, description = "Alarm id")),
    request_body = CommentBody,
    responses((status = 201, body = AlarmEventView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/alerts/{id}/comments")]
async fn comment_alert(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    body: web::Json<CommentBody>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "alert.comment")?;
    let text = body.into_inner().text;
    if text.trim().is_empty() || text.chars().count() > 4096 {
        return Err(ApiError::invalid("text", "1 to 4096 characters"));
    }
    let now = state.rules.clock.now_ms();
    let event = state
        .registry
        .comment_alarm(
            principal.tenant.clone(),
            id.into_inner(),
            text,
            now,
            principal.audit_actor(),
        )
        .await?;
    Ok(HttpResponse::Created().json(AlarmEventView::from(event)))
}
