//! Device types' telemetry schemas: `GET /api/device-types`, `GET|PUT|DELETE
//! /api/device-types/{type}`. Device actors of the type apply the schema to every payload
//! (renames, unit conversions, declared types and ranges); a change reaches running actors at
//! once.

use actix_web::{HttpResponse, delete, get, put, web};
use chrono::{DateTime, Utc};
use drover_actors::Role;
use drover_actors::device::rules;
use drover_actors::telemetry::schema::DeviceTypeSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::http::error::{ApiError, ErrorBody};
use crate::http::principal::Principal;

use crate::state::AppState;
use crate::storage::device_types::DeviceType;

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(list_device_types)
        .service(get_device_type)
        .service(put_device_type)
        .service(delete_device_type);
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceTypeView {
    #[serde(rename = "type")]
    pub device_type: String,
    /// `rename`, `convert`, `metrics`, `strict` as sent.
    #[schema(value_type = Object)]
    pub schema: DeviceTypeSchema,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<DeviceType> for DeviceTypeView {
    fn from(t: DeviceType) -> Self {
        DeviceTypeView {
            device_type: t.name,
            schema: t.schema,
            created_at: t.created_at,
            updated_at: t.updated_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceTypeList {
    pub types: Vec<DeviceTypeView>,
}

fn type_name(raw: &str) -> Result<String, ApiError> {
    rules::device_type(raw).map_err(|m| ApiError::invalid("type", m))?;
    Ok(raw.to_string())
}

/// Device types of the caller's tenant that declare a telemetry schema.
#[utoipa::path(tag = "telemetry", responses((status = 200, body = DeviceTypeList)), security(("bearer" = [])))]
#[get("/device-types")]
async fn list_device_types(
    state: web::Data<AppState>,
    principal: Principal,
) -> Result<web::Json<DeviceTypeList>, ApiError> {
    principal.require(Role::Viewer, "device_type.list")?;
    let types = state.registry.list_device_types(&principal.tenant).await?;
    Ok(web::Json(DeviceTypeList {
        types: types.into_iter().map(Into::into).collect(),
    }))
}

/// One device type's telemetry schema.
#[utoipa::path(tag = "telemetry", params(("type" = String, Path)), responses((status = 200, body = DeviceTypeView), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
#[get("/device-types/{type}")]
async fn get_device_type(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
) -> Result<web::Json<DeviceTypeView>, ApiError> {
    principal.require(Role::Viewer, "device_type.get")?;
    let name = type_name(&path)?;
    let found = state.registry.get_device_type(&principal.tenant, &name).await?;
    found
        .map(|t| web::Json(t.into()))
        .ok_or_else(|| ApiError::not_found(format!("device type `{name}` declares no schema")))
}

/// Declares (or replaces) a device type's telemetry schema: `{"rename": {"temp": "temperature"},
/// "convert": {"temperature_f": {"scale": 0.5555556, "offset": -17.777778, "to": "temperature"}},
/// "metrics": {"temperature": {"type": "number", "min": -40, "max": 85, "unit": "°C"}},
/// "strict": false}`.
#[utoipa::path(tag = "telemetry", params(("type" = String, Path)), request_body(content = Object), responses((status = 200, body = DeviceTypeView), (status = 201, body = DeviceTypeView), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
#[put("/device-types/{type}")]
async fn put_device_type(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
    body: web::Json<DeviceTypeSchema>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "device_type.put")?;
    let name = type_name(&path)?;
    body.validate()
        .map_err(|m| ApiError::bad_request("invalid_schema", m))?;
    let (stored, created) = state
        .registry
        .put_device_type(&principal.tenant, &name, &body, principal.audit_actor())
        .await?;
    state.fleet.device_type_changed(&principal.tenant, &name);
    state
        .mqtt
        .tell_cluster(crate::cluster::notices::Notice::DeviceType {
            tenant: principal.tenant.to_string(),
            device_type: name.to_string(),
        });
    let view = DeviceTypeView::from(stored);
    Ok(if created {
        HttpResponse::Created().json(view)
    } else {
        HttpResponse::Ok().json(view)
    })
}

/// Removes a device type's schema: its devices' telemetry is no longer transformed or checked.
#[utoipa::path(tag = "telemetry", params(("type" = String, Path)), responses((status = 204), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
#[delete("/device-types/{type}")]
async fn delete_device_type(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "device_type.delete")?;
    let name = type_name(&path)?;
    if !state
        .registry
        .delete_device_type(&principal.tenant, &name, principal.audit_actor())
        .await?
    {
        return Err(ApiError::not_found(format!(
            "device type `{name}` declares no schema"
        )));
    }
    state.fleet.device_type_changed(&principal.tenant, &name);
    state
        .mqtt
        .tell_cluster(crate::cluster::notices::Notice::DeviceType {
            tenant: principal.tenant.to_string(),
            device_type: name.to_string(),
        });
    Ok(HttpResponse::NoContent().finish())
}
