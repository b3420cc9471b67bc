//! Device registry endpoints: register, list and filter, read, change, delete, rotate tokens, tags.

use actix_web::{HttpResponse, delete, get, patch, post, web};
use chrono::{DateTime, Utc};
use drover_actors::device::rules;
use drover_actors::{ConnectionStatus, DeviceId, DeviceRecord, GroupName, Role};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::auth::secrets::{self, DEVICE_TOKEN_PREFIX};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::params::limit_param;
use crate::http::principal::Principal;
use crate::state::AppState;
use crate::storage::records::{DeviceFilter, DevicePatch, NewDevice, PageRequest};

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(register)
        .service(list)
        .service(get_device)
        .service(patch_device)
        .service(delete_device)
        .service(rotate_token)
        .service(add_tags)
        .service(remove_tag);
}

/// A device as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceView {
    pub device_id: String,
    pub tenant: String,
    #[serde(rename = "type")]
    pub device_type: String,
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    pub tags: Vec<String>,
    pub groups: Vec<String>,
    /// `online`, `offline` or `disabled`.
    pub status: String,
    pub enabled: bool,
    pub connected: bool,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<DeviceRecord> for DeviceView {
    fn from(d: DeviceRecord) -> Self {
        DeviceView {
            status: d.status().as_str().to_string(),
            device_id: d.id.into_string(),
            tenant: d.tenant.into_string(),
            device_type: d.device_type,
            metadata: d.metadata,
            tags: d.tags,
            groups: d.groups.into_iter().map(GroupName::into_string).collect(),
            enabled: d.enabled,
            connected: d.connected,
            last_seen_at: d.last_seen_at,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

/// Body of `POST /api/devices/register`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterDevice {
    /// 1–128 of letters, digits, `-`, `_`, `.`, `:`; unique in the tenant.
    #[schema(example = "sensor-001")]
    pub device_id: String,
    #[serde(rename = "type")]
    #[schema(example = "temperature")]
    pub device_type: String,
    #[serde(default)]
    #[schema(value_type = Object, example = json!({"location": "warehouse-a", "model": "DHT22"}))]
    pub metadata: Map<String, Value>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Existing groups to put the device in.
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisteredDevice {
    pub device: DeviceView,
    /// The device's secret: its MQTT password (username = deviceId) and HTTP bearer token.
    /// Shown only here; only its digest is stored.
    pub token: String,
}

/// Body of `PATCH /api/devices/{id}`. Metadata is merged key by key; `null` removes a key.
/// Tags, when given, replace the device's tags.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchDevice {
    #[serde(rename = "type")]
    pub device_type: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    pub tags: Option<Vec<String>>,
    /// `false` refuses the device's credentials until enabled again.
    pub enabled: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceList {
    pub devices: Vec<DeviceView>,
    /// Devices matching the filters, over all pages.
    pub total: u64,
    /// Pass as `after` to read the next page; absent on the last page.
    pub next: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceToken {
    pub device_id: String,
    pub token: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagsBody {
    pub tags: Vec<String>,
}

pub fn device_id(raw: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(raw).map_err(ApiError::invalid_id)
}

fn group_names(raw: &[String]) -> Result<Vec<GroupName>, ApiError> {
    raw.iter()
        .map(|g| GroupName::parse(g.as_str()).map_err(ApiError::invalid_id))
        .collect()
}

/// Register a device; returns it with its token (shown once).
#[utoipa::path(
    tag = "devices",
    request_body = RegisterDevice,
    responses(
        (status = 201, description = "Registered", body = RegisteredDevice),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "A listed group does not exist", body = ErrorBody),
        (status = 409, description = "Device id taken, or the device limit reached", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
#[post("/devices/register")]
async fn register(
    state: web::Data<AppState>,
    principal: Principal,
    body: web::Json<RegisterDevice>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "device.register")?;
    let body = body.into_inner();
    let id = device_id(&body.device_id)?;
    rules::device_type(&body.device_type).map_err(|m| ApiError::invalid("type", m))?;
    rules::metadata(&body.metadata).map_err(|m| ApiError::invalid("metadata", m))?;
    rules::tags(&body.tags).map_err(|m| ApiError::invalid("tags", m))?;
    let groups = group_names(&body.groups)?;
    let token = secrets::new_secret(DEVICE_TOKEN_PREFIX);
    let new = NewDevice {
        tenant: principal.tenant.clone(),
        id,
        device_type: body.device_type,
        metadata: body.metadata,
        tags: body.tags,
        groups,
        token_digest: secrets::digest(&token),
    };
    let device = state
        .registry
        .register_device(new, state.config.limits.max_devices, principal.audit_actor())
        .await?;
    tracing::info!(tenant = %device.tenant, device = %device.id, "device registered");
    Ok(HttpResponse::Created().json(RegisteredDevice {
        device: device.into(),
        token,
    }))
}

/// List devices, filtered and paged by device id.
#[utoipa::path(
    tag = "devices",
    params(
        ("type" = Option<String>, Query, description = "Device type"),
        ("tag" = Option<String>, Query, description = "Has this tag"),
        ("group" = Option<String>, Query, description = "Member of this group (static, or matching a dynamic group's query)"),
        ("firmware" = Option<String>, Query, description = "Firmware version the device reports (reported shadow `firmware`)"),
        ("status" = Option<String>, Query, description = "online, offline or disabled"),
        ("metadata.{key}" = Option<String>, Query, description = "Metadata key equals value, e.g. metadata.location=warehouse-a; at most 32 such filters (more: 400 too_many_filters)"),
        ("limit" = Option<u32>, Query, description = "Page size, 1-1000 (default 100)"),
        ("after" = Option<String>, Query, description = "The `next` value of the previous page"),
    ),
    responses((status = 200, body = DeviceList), (status = 400, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/devices")]
async fn list(
    state: web::Data<AppState>,
    principal: Principal,
    query: web::Query<Vec<(String, String)>>,
) -> Result<web::Json<DeviceList>, ApiError> {
    let (filter, page) = device_query(&query)?;
    let page = state
        .registry
        .list_devices(&principal.tenant, filter, page)
        .await?;
    Ok(web::Json(DeviceList {
        devices: page.items.into_iter().map(Into::into).collect(),
        total: page.total,
        next: page.next,
    }))
}

/// Most `metadata.<key>` filters one device list request may carry. Each becomes a nested
/// SQL condition, and SQLite refuses expression trees deeper than 1000 (a 500); no real
/// query needs more than a handful.
pub const MAX_METADATA_FILTERS: usize = 32;

/// Parses the device list filters; unknown parameters are refused rather than ignored.
pub fn device_query(pairs: &[(String, String)]) -> Result<(DeviceFilter, PageRequest), ApiError> {
    let mut filter = DeviceFilter::default();
    let mut limit = None;
    let mut after = None;
    for (key, value) in pairs {
        match key.as_str() {
            "type" => filter.device_type = Some(value.clone()),
            "tag" => filter.tag = Some(value.clone()),
            "firmware" => filter.firmware = Some(value.clone()),
            "group" => filter.group = Some(GroupName::parse(value.as_str()).map_err(ApiError::invalid_id)?),
            "status" => {
                filter.status = Some(
                    value
                        .parse::<ConnectionStatus>()
                        .map_err(|m| ApiError::bad_request("invalid_query", format!("status: {m}")))?,
                )
            }
            "limit" => limit = Some(value.as_str()),
            "after" => after = Some(value.clone()),
            other => match other.strip_prefix("metadata.") {
                Some(name) if !name.is_empty() => {
                    if filter.metadata.len() == MAX_METADATA_FILTERS {
                        return Err(ApiError::bad_request(
                            "too_many_filters",
                            format!("at most {MAX_METADATA_FILTERS} metadata.<key> filters per request"),
                        ));
                    }
                    filter.metadata.push((name.to_string(), value.clone()))
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_query",
                        format!(
                            "unknown parameter {other:?}; use type, tag, group, status, firmware, metadata.<key>, limit or after"
                        ),
                    ));
                }
            },
        }
    }
    Ok((
        filter,
        PageRequest {
            after,
            limit: limit_param(limit)?,
        },
    ))
}

/// One device.
#[utoipa::path(
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses((status = 200, body = DeviceView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/devices/{id}")]
async fn get_device(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<DeviceView>, ApiError> {
    let id = device_id(&id)?;
    let device = state
        .registry
        .get_device(&principal.tenant, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {id} not found")))?;
    Ok(web::Json(device.into()))
}

/// Change a device's type, metadata (merge), tags (replace) or enabled flag.
#[utoipa::path(
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    request_body = PatchDevice,
    responses((status = 200, body = DeviceView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[patch("/devices/{id}")]
async fn patch_device(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    body: web::Json<PatchDevice>,
) -> Result<web::Json<DeviceView>, ApiError> {
    principal.require(Role::Operator, "device.update")?;
    let id = device_id(&id)?;
    let body = body.into_inner();
    if let Some(t) = &body.device_type {
        rules::device_type(t).map_err(|m| ApiError::invalid("type", m))?;
    }
    if let Some(m) = &body.metadata {
        rules::metadata(m).map_err(|m| ApiError::invalid("metadata", m))?;
    }
    if let Some(t) = &body.tags {
        rules::tags(t).map_err(|m| ApiError::invalid("tags", m))?;
    }
    let disabling = body.enabled == Some(false);
    let patch = DevicePatch {
        device_type: body.device_type,
        metadata: body.metadata,
        tags: body.tags,
        enabled: body.enabled,
    };
    let device = state
        .registry
        .update_device(
            principal.tenant.clone(),
            id.clone(),
            patch,
            principal.audit_actor(),
        )
        .await?;
    if disabling {
        stop_actor(&state, &principal, &id, "device disabled").await;
    }
    Ok(web::Json(device.into()))
}

/// Delete a device with its credentials, tags, metadata and group memberships.
#[utoipa::path(
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[delete("/devices/{id}")]
async fn delete_device(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "device.delete")?;
    let id = device_id(&id)?;
    state
        .registry
        .delete_device(principal.tenant.clone(), id.clone(), principal.audit_actor())
        .await?;
    stop_actor(&state, &principal, &id, "device deleted").await;
    // The registry deleted the shadow with the device; this also drops a cached copy.
    if let Err(error) = state.shadow_store.delete_shadow(&principal.tenant, &id).await {
        tracing::warn!(device = %id, %error, "could not forget the deleted device's shadow");
    }
    tracing::info!(tenant = %principal.tenant, device = %id, "device deleted");
    Ok(HttpResponse::NoContent().finish())
}

/// Ends the device's live connection and stops its actor (deleted, disabled, new token).
async fn stop_actor(state: &AppState, principal: &Principal, id: &DeviceId, why: &str) {
    state.mqtt.broker.disconnect_device(&principal.tenant, id, why);
    if let Err(error) = state.fleet.stop_device(&principal.tenant, id).await {
        tracing::warn!(device = %id, %error, "could not stop the device actor");
    }
}

/// Issue a new device token; the previous one stops working at once.
#[utoipa::path(
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses((status = 200, body = DeviceToken), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/devices/{id}/token")]
async fn rotate_token(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<DeviceToken>, ApiError> {
    principal.require(Role::Operator, "device.rotate_token")?;
    let id = device_id(&id)?;
    let token = secrets::new_secret(DEVICE_TOKEN_PREFIX);
    state
        .registry
        .rotate_device_token(
            principal.tenant.clone(),
            id.clone(),
            secrets::digest(&token),
            principal.audit_actor(),
        )
        .await?;
    // A session opened with the old token must not outlive it.
    state
        .mqtt
        .broker
        .disconnect_device(&principal.tenant, &id, "device token rotated");
    Ok(web::Json(DeviceToken {
        device_id: id.into_string(),
        token,
    }))
}

/// Add tags to a device (existing tags stay).
#[utoipa::path(
    tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    request_body = TagsBody,
    responses((status = 200, body = DeviceView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/devices/{id}/tags")]
async fn add_tags(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    body: web::Json<TagsBody>,
) -> Result<web::Json<DeviceView>, ApiError> {
    principal.require(Role::Operator, "device.tag")?;
    let id = device_id(&id)?;
    let tags = body.into_inner().tags;
    rules::tags(&tags).map_err(|m| ApiError::invalid("tags", m))?;
    let device = state
        .registry
        .add_device_tags(principal.tenant.clone(), id, tags, principal.audit_actor())
        .await?;
    Ok(web::Json(device.into()))
}

/// Remove one tag from a device.
#[utoipa::path(
    tag = "devices",
    params(("id" = String, Path, description = "Device id"), ("tag" = String, Path, description = "Tag")),
    responses((status = 200, body = DeviceView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[delete("/devices/{id}/tags/{tag}")]
async fn remove_tag(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<(String, String)>,
) -> Result<web::Json<DeviceView>, ApiError> {
    principal.require(Role::Operator, "device.untag")?;
    let (id, tag) = path.into_inner();
    let id = device_id(&id)?;
    let device = state
        .registry
        .remove_device_tag(principal.tenant.clone(), id, tag, principal.audit_actor())
        .await?;
    Ok(web::Json(device.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata_filters(n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("metadata.k{i}"), "v".to_string()))
            .collect()
    }

    #[test]
    fn metadata_filters_are_capped() {
        let (filter, _) = device_query(&metadata_filters(MAX_METADATA_FILTERS)).expect("at the cap");
        assert_eq!(filter.metadata.len(), MAX_METADATA_FILTERS);
        let Err(refused) = device_query(&metadata_filters(999)) else {
            panic!("999 metadata filters were accepted");
        };
        assert_eq!(refused.status, actix_web::http::StatusCode::BAD_REQUEST);
        assert_eq!(refused.code, "too_many_filters");
    }
}
