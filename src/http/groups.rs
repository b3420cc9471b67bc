//! Device groups: create, list, describe, delete, and manage members.

use actix_web::{HttpResponse, delete, get, patch, post, web};
use chrono::{DateTime, Utc};
use drover_actors::{GroupName, Role};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::http::devices::{DeviceList, device_id, device_query};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::principal::Principal;
use crate::state::AppState;
use crate::storage::records::{Group, GroupQuery};

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(create_group)
        .service(list_groups)
        .service(get_group)
        .service(patch_group)
        .service(delete_group)
        .service(list_members)
        .service(add_members)
        .service(remove_member);
}

const MAX_DESCRIPTION: usize = 1024;
const MAX_MEMBERS_PER_CALL: usize = 1000;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupView {
    pub name: String,
    pub description: String,
    /// A dynamic group's query: its members are the devices matching it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<GroupQuery>,
    pub member_count: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Group> for GroupView {
    fn from(g: Group) -> Self {
        GroupView {
            name: g.name.into_string(),
            description: g.description,
            query: g.query,
            member_count: g.member_count,
            created_at: g.created_at,
            updated_at: g.updated_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    /// 1–64 of letters, digits, `-`, `_`, `.`, `:`; unique in the tenant.
    #[schema(example = "warehouse-a")]
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Makes the group dynamic: its members are the devices matching this query (type, tags,
    /// metadata, status, firmware), followed as the devices change.
    pub query: Option<GroupQuery>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchGroup {
    pub description: Option<String>,
    /// A dynamic group's new query (a static group without members may be given one).
    pub query: Option<GroupQuery>,
}

fn check_query(query: Option<&GroupQuery>) -> Result<(), ApiError> {
    match query {
        Some(q) => q.validate().map_err(|m| ApiError::invalid("query", m)),
        None => Ok(()),
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GroupList {
    pub groups: Vec<GroupView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddMembers {
    pub device_ids: Vec<String>,
}

fn group_name(raw: &str) -> Result<GroupName, ApiError> {
    GroupName::parse(raw).map_err(ApiError::invalid_id)
}

fn check_description(description: &str) -> Result<(), ApiError> {
    if description.chars().count() > MAX_DESCRIPTION {
        return Err(ApiError::invalid(
            "description",
            format!("at most {MAX_DESCRIPTION} characters"),
        ));
    }
    Ok(())
}

/// Create a group.
#[utoipa::path(
    tag = "groups",
    request_body = CreateGroup,
    responses((status = 201, body = GroupView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/groups")]
async fn create_group(
    state: web::Data<AppState>,
    principal: Principal,
    body: web::Json<CreateGroup>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "group.create")?;
    let body = body.into_inner();
    let name = group_name(&body.name)?;
    check_description(&body.description)?;
    check_query(body.query.as_ref())?;
    let group = state
        .registry
        .create_group(
            principal.tenant.clone(),
            name,
            body.description,
            body.query,
            principal.audit_actor(),
        )
        .await?;
    Ok(HttpResponse::Created().json(GroupView::from(group)))
}

/// List the tenant's groups with their member counts.
#[utoipa::path(tag = "groups", responses((status = 200, body = GroupList)), security(("bearer" = [])))]
#[get("/groups")]
async fn list_groups(
    state: web::Data<AppState>,
    principal: Principal,
) -> Result<web::Json<GroupList>, ApiError> {
    let groups = state.registry.list_groups(&principal.tenant).await?;
    Ok(web::Json(GroupList {
        groups: groups.into_iter().map(Into::into).collect(),
    }))
}

/// One group.
#[utoipa::path(
    tag = "groups",
    params(("name" = String, Path, description = "Group name")),
    responses((status = 200, body = GroupView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/groups/{name}")]
async fn get_group(
    state: web::Data<AppState>,
    principal: Principal,
    name: web::Path<String>,
) -> Result<web::Json<GroupView>, ApiError> {
    let name = group_name(&name)?;
    let group = state
        .registry
        .get_group(&principal.tenant, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("group {name} not found")))?;
    Ok(web::Json(group.into()))
}

/// Change a group's description, or a dynamic group's query.
#[utoipa::path(
    tag = "groups",
    params(("name" = String, Path, description = "Group name")),
    request_body = PatchGroup,
    responses((status = 200, body = GroupView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[patch("/groups/{name}")]
async fn patch_group(
    state: web::Data<AppState>,
    principal: Principal,
    name: web::Path<String>,
    body: web::Json<PatchGroup>,
) -> Result<web::Json<GroupView>, ApiError> {
    principal.require(Role::Operator, "group.update")?;
    let name = group_name(&name)?;
    let body = body.into_inner();
    if let Some(description) = &body.description {
        check_description(description)?;
    }
    check_query(body.query.as_ref())?;
    let group = state
        .registry
        .update_group(
            principal.tenant.clone(),
            name,
            body.description,
            body.query,
            principal.audit_actor(),
        )
        .await?;
    Ok(web::Json(group.into()))
}

/// Delete a group (its devices stay registered).
#[utoipa::path(
    tag = "groups",
    params(("name" = String, Path, description = "Group name")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[delete("/groups/{name}")]
async fn delete_group(
    state: web::Data<AppState>,
    principal: Principal,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "group.delete")?;
    let name = group_name(&name)?;
    state
        .registry
        .delete_group(principal.tenant.clone(), name, principal.audit_actor())
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The group's devices, with the same filters and paging as `GET /api/devices`.
#[utoipa::path(
    tag = "groups",
    params(
        ("name" = String, Path, description = "Group name"),
        ("limit" = Option<u32>, Query, description = "Page size, 1-1000 (default 100)"),
        ("after" = Option<String>, Query, description = "The `next` value of the previous page"),
    ),
    responses((status = 200, body = DeviceList), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/groups/{name}/members")]
async fn list_members(
    state: web::Data<AppState>,
    principal: Principal,
    name: web::Path<String>,
    query: web::Query<Vec<(String, String)>>,
) -> Result<web::Json<DeviceList>, ApiError> {
    let name = group_name(&name)?;
    if state
        .registry
        .get_group(&principal.tenant, &name)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found(format!("group {name} not found")));
    }
    let (mut filter, page) = device_query(&query)?;
    filter.group = Some(name);
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

/// Add devices to a group. All must exist, or none is added.
#[utoipa::path(
    tag = "groups",
    params(("name" = String, Path, description = "Group name")),
    request_body = AddMembers,
    responses((status = 200, body = GroupView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/groups/{name}/members")]
async fn add_members(
    state: web::Data<AppState>,
    principal: Principal,
    name: web::Path<String>,
    body: web::Json<AddMembers>,
) -> Result<web::Json<GroupView>, ApiError> {
    principal.require(Role::Operator, "group.add_members")?;
    let name = group_name(&name)?;
    let ids = body.into_inner().device_ids;
    if ids.is_empty() || ids.len() > MAX_MEMBERS_PER_CALL {
        return Err(ApiError::invalid(
            "deviceIds",
            format!("give 1 to {MAX_MEMBERS_PER_CALL} device ids"),
        ));
    }
    let members = ids
        .iter()
        .map(|id| device_id(id))
        .collect::<Result<Vec<_>, _>>()?;
    let group = state
        .registry
        .add_group_members(principal.tenant.clone(), name, members, principal.audit_actor())
        .await?;
    Ok(web::Json(group.into()))
}

/// Remove a device from a group.
#[utoipa::path(
    tag = "groups",
    params(("name" = String, Path, description = "Group name"), ("deviceId" = String, Path, description = "Device id")),
    responses((status = 200, body = GroupView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[delete("/groups/{name}/members/{deviceId}")]
async fn remove_member(
    state: web::Data<AppState>,
    principal: Principal,
    path: web::Path<(String, String)>,
) -> Result<web::Json<GroupView>, ApiError> {
    principal.require(Role::Operator, "group.remove_member")?;
    let (name, device) = path.into_inner();
    let (name, device) = (group_name(&name)?, device_id(&device)?);
    let group = state
        .registry
        .remove_group_member(principal.tenant.clone(), name, device, principal.audit_actor())
        .await?;
    Ok(web::Json(group.into()))
}
