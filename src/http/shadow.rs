//! Device shadow endpoints: read the document, update it with an AWS-style update body.
//!
//! Both go through the device's actor, the shadow's only writer, so an operator's update is
//! ordered with the device's own and announced on the device's shadow topics (a change of
//! `desired` publishes the delta the device acts on).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, get, patch, web};
use chrono::Utc;
use drover_actors::device_actor::{DeviceActor, ShadowAction, ShadowRequest};
use drover_actors::{Role, ShadowError};
use serde_json::Value;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::http::devices::device_id;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::principal::Principal;
use crate::state::AppState;

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(get_shadow).service(update_shadow);
}

impl From<ShadowError> for ApiError {
    fn from(error: ShadowError) -> Self {
        let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST);
        match error {
            ShadowError::Unavailable(why) => {
                tracing::warn!(%why, "shadow storage unavailable");
                ApiError::unavailable("shadow storage is unavailable; retry later", 5)
            }
            other => ApiError::new(status, other.code(), other.to_string()),
        }
    }
}

/// The device's actor; 404 when the caller's tenant has no such device.
async fn device_actor(
    state: &AppState,
    principal: &Principal,
    raw: &str,
) -> Result<actix::Addr<DeviceActor>, ApiError> {
    let id = device_id(raw)?;
    match state.fleet.device(&principal.tenant, &id).await {
        Ok(Some(addr)) => Ok(addr),
        Ok(None) => Err(ApiError::not_found(format!("device {id} not found"))),
        Err(error) => {
            tracing::warn!(device = %id, %error, "device actor unavailable");
            Err(ApiError::unavailable(
                "the device's actor is unavailable; retry later",
                1,
            ))
        }
    }
}

async fn ask(addr: actix::Addr<DeviceActor>, action: ShadowAction) -> Result<Value, ApiError> {
    let answer = addr
        .send(ShadowRequest {
            action,
            at: Utc::now(),
        })
        .await
        .map_err(|error| ApiError::unavailable(format!("the device's actor did not answer: {error}"), 1))?;
    Ok(answer?)
}

/// The device's shadow: `state` (`desired`, `reported` and their `delta`), per-key `metadata`
/// timestamps, `version` and `timestamp` (epoch seconds). 404 before the first update.
#[utoipa::path(
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses(
        (status = 200, description = "The shadow document", body = Object,
         example = json!({"state": {"desired": {"led": "on"}, "reported": {"led": "off"}, "delta": {"led": "on"}},
                          "metadata": {"desired": {"led": {"timestamp": 1700000000}}, "reported": {"led": {"timestamp": 1699999990}}},
                          "version": 2, "timestamp": 1700000000})),
        (status = 404, description = "No such device, or no shadow yet", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
#[get("/devices/{id}/shadow")]
async fn get_shadow(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<Value>, ApiError> {
    let addr = device_actor(&state, &principal, &id).await?;
    let document = ask(addr, ShadowAction::Get).await.map_err(|e| {
        if e.code == "not_found" {
            ApiError::not_found(format!("device {id} has no shadow yet"))
        } else {
            e
        }
    })?;
    Ok(web::Json(document))
}

/// Updates the shadow with an AWS IoT update body: `{"state": {"desired": {...},
/// "reported": {...}}, "version": N, "clientToken": "..."}`. Objects merge, arrays replace,
/// `null` deletes a key (`"desired": null` clears the section). With `version` the update
/// applies only to that version (409 otherwise). Answers what `update/accepted` carries.
#[utoipa::path(
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    request_body(content = Object, description = "AWS IoT Device Shadow update document",
                 example = json!({"state": {"desired": {"led": "on"}}, "version": 1})),
    responses(
        (status = 200, description = "Accepted: the update's state and metadata, the new version", body = Object),
        (status = 400, description = "Malformed update (invalid_json, invalid_state, too_deep, …)", body = ErrorBody),
        (status = 403, description = "Viewers may not update shadows", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "version_conflict", body = ErrorBody),
        (status = 413, description = "payload_too_large or state_too_large", body = ErrorBody),
        (status = 415, description = "unsupported_media_type: a body whose Content-Type is not JSON", body = ErrorBody)
    ),
    security(("bearer" = []))
)]
#[patch("/devices/{id}/shadow")]
async fn update_shadow(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "shadow.update")?;
    let addr = device_actor(&state, &principal, &id).await?;
    let accepted = ask(addr, ShadowAction::Update { payload: body }).await?;
    tracing::info!(tenant = %principal.tenant, device = %id, actor = %principal.actor(), version = %accepted["version"], "shadow updated through the API");
    Ok(HttpResponse::Ok().json(accepted))
}
