//! Tenants (platform admins) and the audit log (tenant admins).

use actix_web::{HttpResponse, get, patch, post, web};
use chrono::{DateTime, Utc};
use drover_actors::{Role, TenantId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::http::accounts::{UserView, check_length, check_username, hash_password};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::params::{limit_param, time_param};
use crate::http::principal::Principal;
use crate::state::AppState;
use crate::storage::records::{AuditEntry, AuditFilter, NewUser, Tenant};

pub fn routes(cfg: &mut ServiceConfig) {
    cfg.service(list_tenants)
        .service(create_tenant)
        .service(get_tenant)
        .service(patch_tenant)
        .service(list_audit);
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantView {
    pub id: String,
    pub name: String,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Tenant> for TenantView {
    fn from(t: Tenant) -> Self {
        TenantView {
            id: t.id.into_string(),
            name: t.name,
            disabled: t.disabled,
            created_at: t.created_at,
            updated_at: t.updated_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantAdmin {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// 1–64 of lowercase letters, digits, `-`, `_`.
    #[schema(example = "acme")]
    pub id: String,
    #[schema(example = "Acme Corp")]
    pub name: String,
    /// The tenant's first admin, created with it.
    pub admin: Option<TenantAdmin>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedTenant {
    pub tenant: TenantView,
    pub admin: Option<UserView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchTenant {
    pub name: Option<String>,
    /// A disabled tenant's users, keys and devices are refused.
    pub disabled: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TenantList {
    pub tenants: Vec<TenantView>,
}

fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    TenantId::parse(raw).map_err(ApiError::invalid_id)
}

fn check_tenant_name(name: &str) -> Result<(), ApiError> {
    check_length("name", name, 128)?;
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        return Err(ApiError::invalid("name", "must be 1 to 128 printable characters"));
    }
    Ok(())
}

/// Every tenant (platform admins).
#[utoipa::path(tag = "tenants", responses((status = 200, body = TenantList), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
#[get("/tenants")]
async fn list_tenants(
    state: web::Data<AppState>,
    principal: Principal,
) -> Result<web::Json<TenantList>, ApiError> {
    principal.require_platform_admin("tenant.list")?;
    let tenants = state.registry.list_tenants().await?;
    Ok(web::Json(TenantList {
        tenants: tenants.into_iter().map(Into::into).collect(),
    }))
}

/// Create a tenant, optionally with its first admin (platform admins).
#[utoipa::path(
    tag = "tenants",
    request_body = CreateTenant,
    responses((status = 201, body = CreatedTenant), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []))
)]
#[post("/tenants")]
async fn create_tenant(
    state: web::Data<AppState>,
    principal: Principal,
    body: web::Json<CreateTenant>,
) -> Result<HttpResponse, ApiError> {
    principal.require_platform_admin("tenant.create")?;
    let body = body.into_inner();
    let id = tenant_id(&body.id)?;
    check_tenant_name(&body.name)?;
    let admin = match body.admin {
        Some(admin) => {
            check_username(&admin.username)?;
            Some(NewUser {
                tenant: id.clone(),
                username: admin.username,
                password_hash: hash_password(admin.password).await?,
                role: Role::Admin,
                platform_admin: false,
            })
        }
        None => None,
    };
    let (tenant, admin) = state
        .registry
        .create_tenant(id, body.name, admin, principal.audit_actor())
        .await?;
    Ok(HttpResponse::Created().json(CreatedTenant {
        tenant: tenant.into(),
        admin: admin.map(Into::into),
    }))
}

/// One tenant (platform admins, or members of that tenant).
#[utoipa::path(
    tag = "tenants",
    params(("id" = String, Path, description = "Tenant id")),
    responses((status = 200, body = TenantView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/tenants/{id}")]
async fn get_tenant(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<TenantView>, ApiError> {
    let id = tenant_id(&id)?;
    // Other tenants are invisible rather than forbidden, so their ids cannot be probed.
    if id != principal.tenant && !principal.platform_admin {
        return Err(ApiError::not_found(format!("tenant {id} not found")));
    }
    let tenant = state
        .registry
        .get_tenant(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("tenant {id} not found")))?;
    Ok(web::Json(tenant.into()))
}

/// Rename, disable or enable a tenant (platform admins).
#[utoipa::path(
    tag = "tenants",
    params(("id" = String, Path, description = "Tenant id")),
    request_body = PatchTenant,
    responses((status = 200, body = TenantView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[patch("/tenants/{id}")]
async fn patch_tenant(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
    body: web::Json<PatchTenant>,
) -> Result<web::Json<TenantView>, ApiError> {
    principal.require_platform_admin("tenant.update")?;
    let id = tenant_id(&id)?;
    let body = body.into_inner();
    if let Some(name) = &body.name {
        check_tenant_name(name)?;
    }
    if body.disabled == Some(true) && id == principal.tenant {
        return Err(ApiError::conflict(
            "conflict",
            "you cannot disable your own tenant",
        ));
    }
    let tenant = state
        .registry
        .update_tenant(id, body.name, body.disabled, principal.audit_actor())
        .await?;
    if body.disabled == Some(true) {
        // Its devices and applications are refused from now on, live connections included.
        state.mqtt.broker.kick(
            &crate::mqtt::broker::Kick::Tenant {
                tenant: tenant.id.to_string(),
            },
            crate::mqtt::broker::reason::NOT_AUTHORIZED,
            "tenant disabled",
        );
    }
    Ok(web::Json(tenant.into()))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub tenant: Option<String>,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    /// `ok` or `denied`.
    pub outcome: String,
    #[schema(value_type = Option<Object>)]
    pub detail: Option<serde_json::Value>,
    pub source_ip: Option<String>,
    /// How many times it happened: repeated refusals of one kind from one source within a
    /// minute are one entry.
    pub count: u64,
}

impl From<AuditEntry> for AuditView {
    fn from(e: AuditEntry) -> Self {
        AuditView {
            id: e.id,
            at: e.at,
            tenant: e.tenant,
            actor: e.actor,
            action: e.action,
            target: e.target,
            outcome: e.outcome,
            detail: e.detail,
            source_ip: e.source_ip,
            count: e.count,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditList {
    pub entries: Vec<AuditView>,
    /// Pass as `before` for older entries; absent when there are none.
    pub next: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    action: Option<String>,
    actor: Option<String>,
    outcome: Option<String>,
    target: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<i64>,
    limit: Option<String>,
    /// `platform`: every tenant's entries and those of unidentified callers (platform admins).
    scope: Option<String>,
}

/// The audit log, newest first (tenant admins; platform admins with `scope=platform` see all).
#[utoipa::path(
    tag = "audit",
    params(
        ("action" = Option<String>, Query, description = "e.g. device.register, auth.login"),
        ("actor" = Option<String>, Query, description = "e.g. user:admin, key:<id>"),
        ("outcome" = Option<String>, Query, description = "ok or denied"),
        ("target" = Option<String>, Query, description = "What the entry is about, e.g. a device id (pump-1)"),
        ("since" = Option<String>, Query, description = "RFC 3339, date, or epoch s/ms"),
        ("until" = Option<String>, Query, description = "RFC 3339, date, or epoch s/ms"),
        ("before" = Option<i64>, Query, description = "The `next` value of the previous page"),
        ("limit" = Option<u32>, Query, description = "1-1000 (default 100)"),
        ("scope" = Option<String>, Query, description = "`platform` for every tenant (platform admins)"),
    ),
    responses((status = 200, body = AuditList), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/audit")]
async fn list_audit(
    state: web::Data<AppState>,
    principal: Principal,
    query: web::Query<AuditQuery>,
) -> Result<web::Json<AuditList>, ApiError> {
    principal.require(Role::Admin, "audit.read")?;
    let q = query.into_inner();
    let tenant = match q.scope.as_deref() {
        None | Some("tenant") => Some(&principal.tenant),
        Some("platform") => {
            principal.require_platform_admin("audit.read_platform")?;
            None
        }
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("scope: expected tenant or platform, got {other:?}"),
            ));
        }
    };
    let limit = limit_param(q.limit.as_deref())?;
    let filter = AuditFilter {
        action: q.action,
        actor: q.actor,
        outcome: q.outcome,
        target: q.target,
        since: q.since.as_deref().map(|s| time_param("since", s)).transpose()?,
        until: q.until.as_deref().map(|s| time_param("until", s)).transpose()?,
        before_id: q.before,
        limit,
    };
    let entries = state.registry.list_audit(tenant, filter).await?;
    let next = (entries.len() as u32 == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(web::Json(AuditList {
        entries: entries.into_iter().map(Into::into).collect(),
        next,
    }))
}
