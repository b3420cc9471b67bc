//! Commands with responses: send a command to a device and get its answer (or 504), or its id
//! to look the answer up later; a device's command history.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, get, post, web};
use chrono::{DateTime, Utc};
use drover_actors::Role;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::fleet_ops::commands::{CommandError, CommandSpec, DEFAULT_TIMEOUT_SECS};
use crate::http::devices::device_id;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::params::limit_param;
use crate::http::principal::Principal;
use crate::state::AppState;
use crate::storage::commands::{CommandRecord, CommandStatus};

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(send_command)
        .service(device_commands)
        .service(get_command);
}

/// Body of `POST /api/devices/{id}/commands`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendCommandBody {
    /// The command name, a topic level: `devices/{id}/commands/{name}`.
    #[schema(example = "reboot")]
    pub name: String,
    /// Any JSON, handed to the device as `payload`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: Value,
    /// Seconds the device has to answer once it has the command (1-300, default 30).
    pub timeout_secs: Option<u64>,
    /// `sync` (default): the answer comes in the response, or 504. `async`: 202 at once, the
    /// answer at `GET /api/commands/{id}`.
    pub mode: Option<String>,
    /// When the device is offline, keep the command this many seconds and send it when the
    /// device subscribes to its commands again (answers 202). Without it an offline device is
    /// refused with 409 `device_offline`.
    pub ttl_secs: Option<u64>,
}

/// A command and its outcome.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandView {
    pub id: String,
    pub device_id: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub payload: Value,
    /// `pending`, `queued`, `sent`, `succeeded`, `failed` (the device answered a status of 400
    /// or more), `timed_out`, `expired` (offline past its time to live) or `undelivered`.
    pub status: String,
    /// The device's answer payload.
    #[schema(value_type = Option<Object>)]
    pub response: Option<Value>,
    /// The status the device answered with (200 unless it said otherwise).
    pub response_status: Option<i64>,
    pub error: Option<String>,
    pub timeout_secs: u64,
    pub expires_at: Option<DateTime<Utc>>,
    pub requested_by: String,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl From<CommandRecord> for CommandView {
    fn from(c: CommandRecord) -> Self {
        CommandView {
            id: c.id,
            device_id: c.device.into_string(),
            name: c.name,
            payload: c.payload,
            status: c.status.as_str().to_string(),
            response: c.response,
            response_status: c.response_status,
            error: c.error,
            timeout_secs: c.timeout_secs,
            expires_at: c.expires_at,
            requested_by: c.requested_by,
            created_at: c.created_at,
            sent_at: c.sent_at,
            completed_at: c.completed_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandList {
    pub commands: Vec<CommandView>,
    /// Pass as `before` to read older commands; absent on the last page.
    pub next: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    pub limit: Option<String>,
    pub before: Option<String>,
}

fn command_error(error: CommandError) -> ApiError {
    match error {
        CommandError::Invalid(m) => ApiError::bad_request("validation_failed", m),
        CommandError::DeviceNotFound(d) => ApiError::not_found(format!("device {d} not found")),
        CommandError::DeviceOffline(d) => ApiError::conflict(
            "device_offline",
            format!("device {d} is offline; give ttlSecs to keep the command until it is back"),
        ),
        CommandError::Busy { device, waiting } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_commands",
            format!("device {device} already has {waiting} commands waiting"),
        ),
        CommandError::Unavailable(m) => ApiError::unavailable(m, 1),
        CommandError::Store(e) => e.into(),
    }
}

fn accepted(record: CommandRecord) -> HttpResponse {
    HttpResponse::Accepted()
        .insert_header(("Location", format!("/api/commands/{}", record.id)))
        .json(CommandView::from(record))
}

/// Send a command to a device and wait for its answer (or, async, get its id at once).
#[utoipa::path(
    tag = "commands",
    params(("id" = String, Path, description = "Device id")),
    request_body = SendCommandBody,
    responses(
        (status = 200, description = "The device answered", body = CommandView),
        (status = 202, description = "Accepted (async, or queued for an offline device)", body = CommandView),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "device_offline", body = ErrorBody),
        (status = 504, description = "command_timeout: no answer in time", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
#[post("/devices/{id}/commands")]
async fn send_command(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    body: web::Json<SendCommandBody>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "device.command")?;
    let device = device_id(&id)?;
    let body = body.into_inner();
    let asynchronous = match body.mode.as_deref() {
        None | Some("sync") => false,
        Some("async") => true,
        Some(other) => {
            return Err(ApiError::invalid("mode", format!("{other:?}: use sync or async")));
        }
    };
    let spec = CommandSpec {
        name: body.name,
        payload: body.payload,
        timeout: Duration::from_secs(body.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS)),
        queue_ttl: body.ttl_secs.map(Duration::from_secs),
    };
    let ticket = state
        .fleet_ops
        .commands
        .send(&principal.tenant, &device, spec, principal.actor())
        .await
        .map_err(command_error)?;
    tracing::info!(tenant = %principal.tenant, %device, command = %ticket.record.id, name = %ticket.record.name, status = ticket.record.status.as_str(), "command handed to the device");
    if asynchronous || ticket.record.status == CommandStatus::Queued {
        return Ok(accepted(ticket.record));
    }
    let id = ticket.record.id.clone();
    let record = ticket
        .finished
        .await
        .map_err(|_| ApiError::internal(format!("command {id}: its outcome was not recorded")))?;
    match record.status {
        CommandStatus::TimedOut => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "command_timeout",
            format!(
                "device {device} did not answer command {id} within {} s (see /api/commands/{id})",
                record.timeout_secs
            ),
        )),
        CommandStatus::Undelivered => Err(ApiError::conflict(
            "device_offline",
            format!(
                "device {device} went away before answering command {id}: {}",
                record.error.unwrap_or_default()
            ),
        )),
        _ => Ok(HttpResponse::Ok().json(CommandView::from(record))),
    }
}

/// A device's commands, newest first.
#[utoipa::path(
    tag = "commands",
    params(
        ("id" = String, Path, description = "Device id"),
        ("limit" = Option<u32>, Query, description = "Page size, 1-1000 (default 100)"),
        ("before" = Option<String>, Query, description = "The `next` value of the previous page"),
    ),
    responses((status = 200, body = CommandList), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/devices/{id}/commands")]
async fn device_commands(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    query: web::Query<HistoryQuery>,
) -> Result<web::Json<CommandList>, ApiError> {
    let device = device_id(&id)?;
    let query = query.into_inner();
    let limit = limit_param(query.limit.as_deref())?;
    if state
        .registry
        .get_device(&principal.tenant, &device)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found(format!("device {device} not found")));
    }
    let (commands, next) = state
        .registry
        .list_commands(&principal.tenant, &device, limit, query.before)
        .await?;
    Ok(web::Json(CommandList {
        commands: commands.into_iter().map(Into::into).collect(),
        next,
    }))
}

/// One command and its outcome.
#[utoipa::path(
    tag = "commands",
    params(("id" = String, Path, description = "Command id")),
    responses((status = 200, body = CommandView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/commands/{id}")]
async fn get_command(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<CommandView>, ApiError> {
    let command = state
        .registry
        .get_command(&principal.tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("command {id} not found")))?;
    Ok(web::Json(command.into()))
}
