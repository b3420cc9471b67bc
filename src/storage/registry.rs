//! `RegistryStore`: tenants, users, API keys, devices, groups, tags and the audit log.
//!
//! Every mutation runs in one transaction together with its audit entry, so a change is never
//! recorded without its audit line nor the other way round, and a rejected request writes nothing.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use diesel::prelude::*;
use drover_actors::device::rules;
use drover_actors::{
    ConnectionStatus, DeviceDirectory, DeviceId, DeviceRecord, DirectoryError, GroupName, Role, TenantId,
};
use serde_json::{Map, Value};

use super::db::{Database, DbConnection, MultiBackend, StoreError};
use super::records::*;
use super::schema::*;

pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

pub fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// Registry access for the API and the actors.
#[derive(Clone)]
pub struct RegistryStore {
    db: Database,
}

// ---- rows ----------------------------------------------------------------------------------

#[derive(Queryable, Selectable)]
#[diesel(table_name = tenants)]
struct TenantRow {
    id: String,
    name: String,
    disabled: bool,
    created_at: i64,
    updated_at: i64,
}

impl TenantRow {
    fn into_record(self) -> Result<Tenant, StoreError> {
        Ok(Tenant {
            id: parse_stored(TenantId::parse(self.id))?,
            name: self.name,
            disabled: self.disabled,
            created_at: from_ms(self.created_at),
            updated_at: from_ms(self.updated_at),
        })
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = users)]
struct UserRow {
    id: String,
    tenant_id: String,
    username: String,
    password_hash: String,
    role: String,
    platform_admin: bool,
    disabled: bool,
    created_at: i64,
    updated_at: i64,
    token_generation: i64,
}

impl UserRow {
    fn into_record(self) -> Result<(User, String), StoreError> {
        let user = User {
            id: self.id,
            tenant: parse_stored(TenantId::parse(self.tenant_id))?,
            username: self.username,
            role: parse_role(&self.role)?,
            platform_admin: self.platform_admin,
            disabled: self.disabled,
            created_at: from_ms(self.created_at),
            updated_at: from_ms(self.updated_at),
            token_generation: self.token_generation,
        };
        Ok((user, self.password_hash))
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = api_keys)]
struct ApiKeyRow {
    id: String,
    tenant_id: String,
    name: String,
    role: String,
    prefix: String,
    created_by: String,
    created_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl ApiKeyRow {
    fn into_record(self) -> Result<ApiKey, StoreError> {
        Ok(ApiKey {
            id: self.id,
            tenant: parse_stored(TenantId::parse(self.tenant_id))?,
            name: self.name,
            role: parse_role(&self.role)?,
            prefix: self.prefix,
            created_by: self.created_by,
            created_at: from_ms(self.created_at),
            expires_at: self.expires_at.map(from_ms),
            revoked_at: self.revoked_at.map(from_ms),
        })
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = devices)]
struct DeviceRow {
    tenant_id: String,
    device_id: String,
    device_type: String,
    enabled: bool,
    connected: bool,
    last_seen_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = device_groups)]
struct GroupRow {
    tenant_id: String,
    name: String,
    description: String,
    created_at: i64,
    updated_at: i64,
    query: Option<String>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = audit_log)]
struct AuditRow {
    id: i64,
    at: i64,
    tenant_id: Option<String>,
    actor: String,
    action: String,
    target: Option<String>,
    outcome: String,
    detail: Option<String>,
    source_ip: Option<String>,
    occurrences: i64,
}

fn parse_stored<T>(value: Result<T, drover_actors::IdError>) -> Result<T, StoreError> {
    value.map_err(|e| StoreError::Internal(format!("invalid stored identifier: {e}")))
}

fn parse_role(value: &str) -> Result<Role, StoreError> {
    value.parse().map_err(StoreError::Internal)
}

fn not_found(what: impl Into<String>) -> StoreError {
    StoreError::NotFound(what.into())
}

/// Gives a unique violation a message for people.
fn conflict_as(message: impl Into<String>) -> impl FnOnce(diesel::result::Error) -> StoreError {
    let message = message.into();
    move |e| match StoreError::from(e) {
        StoreError::AlreadyExists(_) => StoreError::AlreadyExists(message),
        other => other,
    }
}

pub(crate) fn insert_audit(conn: &mut DbConnection, event: &AuditEvent) -> Result<(), StoreError> {
    insert_audit_row(conn, event).map(drop)
}

/// Inserts `event`; answers its row's id.
fn insert_audit_row(conn: &mut DbConnection, event: &AuditEvent) -> Result<i64, StoreError> {
    Ok(diesel::insert_into(audit_log::table)
        .values((
            audit_log::at.eq(now_ms()),
            audit_log::tenant_id.eq(event.actor.tenant.as_ref().map(|t| t.as_str().to_string())),
            audit_log::actor.eq(&event.actor.actor),
            audit_log::action.eq(&event.action),
            audit_log::target.eq(event.target.as_deref()),
            audit_log::outcome.eq(event.outcome.as_str()),
            audit_log::detail.eq(event.detail.as_ref().map(Value::to_string)),
            audit_log::source_ip.eq(event.actor.source_ip.as_deref()),
        ))
        .returning(audit_log::id)
        .get_result::<i64>(conn)?)
}

pub(crate) fn audit(
    actor: &AuditActor,
    action: &str,
    target: impl Into<String>,
    detail: Option<Value>,
) -> AuditEvent {
    AuditEvent {
        actor: actor.clone(),
        action: action.to_string(),
        target: Some(target.into()),
        outcome: AuditOutcome::Ok,
        detail,
    }
}

/// JSON text a metadata value is stored as.
fn metadata_text(value: &Value) -> String {
    value.to_string()
}

impl RegistryStore {
    pub fn new(db: Database) -> Self {
        RegistryStore { db }
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    // ---- tenants ---------------------------------------------------------------------------

    /// Creates a tenant, and its first user when `admin` is given, in one transaction.
    pub async fn create_tenant(
        &self,
        id: TenantId,
        name: String,
        admin: Option<NewUser>,
        by: AuditActor,
    ) -> Result<(Tenant, Option<User>), StoreError> {
        self.db
            .write(move |conn| {
                let now = now_ms();
                diesel::insert_into(tenants::table)
                    .values((
                        tenants::id.eq(id.as_str()),
                        tenants::name.eq(&name),
                        tenants::disabled.eq(false),
                        tenants::created_at.eq(now),
                        tenants::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .map_err(conflict_as(format!("tenant {id} already exists")))?;
                insert_audit(
                    conn,
                    &audit(
                        &by,
                        "tenant.create",
                        id.as_str(),
                        Some(serde_json::json!({ "name": name })),
                    ),
                )?;
                let user = match admin {
                    Some(new) => Some(insert_user(conn, &new, &by)?),
                    None => None,
                };
                let tenant = load_tenant(conn, &id)?.ok_or_else(|| not_found(format!("tenant {id}")))?;
                Ok((tenant, user))
            })
            .await
    }

    pub async fn get_tenant(&self, id: &TenantId) -> Result<Option<Tenant>, StoreError> {
        let id = id.clone();
        self.db.read(move |conn| load_tenant(conn, &id)).await
    }

    pub async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        self.db
            .read(|conn| {
                tenants::table
                    .order(tenants::id)
                    .select(TenantRow::as_select())
                    .load(conn)?
                    .into_iter()
                    .map(TenantRow::into_record)
                    .collect()
            })
            .await
    }

    pub async fn update_tenant(
        &self,
        id: TenantId,
        name: Option<String>,
        disabled: Option<bool>,
        by: AuditActor,
    ) -> Result<Tenant, StoreError> {
        self.db
            .write(move |conn| {
                let now = now_ms();
                let target = tenants::table.filter(tenants::id.eq(id.as_str()));
                let changed = match (&name, disabled) {
                    (Some(n), Some(d)) => diesel::update(target)
                        .set((
                            tenants::name.eq(n),
                            tenants::disabled.eq(d),
                            tenants::updated_at.eq(now),
                        ))
                        .execute(conn)?,
                    (Some(n), None) => diesel::update(target)
                        .set((tenants::name.eq(n), tenants::updated_at.eq(now)))
                        .execute(conn)?,
                    (None, Some(d)) => diesel::update(target)
                        .set((tenants::disabled.eq(d), tenants::updated_at.eq(now)))
                        .execute(conn)?,
                    (None, None) => target.count().get_result::<i64>(conn)? as usize,
                };
                if changed == 0 {
                    return Err(not_found(format!("tenant {id}")));
                }
                insert_audit(
                    conn,
                    &audit(
                        &by,
                        "tenant.update",
                        id.as_str(),
                        Some(serde_json::json!({ "name": name, "disabled": disabled })),
                    ),
                )?;
                load_tenant(conn, &id)?.ok_or_else(|| not_found(format!("tenant {id}")))
            })
            .await
    }

    pub async fn count_users(&self) -> Result<u64, StoreError> {
        self.db
            .read(|conn| Ok(users::table.count().get_result::<i64>(conn)? as u64))
            .await
    }

    pub async fn count_tenants(&self) -> Result<u64, StoreError> {
        self.db
            .read(|conn| Ok(tenants::table.count().get_result::<i64>(conn)? as u64))
            .await
    }

    // ---- users -----------------------------------------------------------------------------

    pub async fn create_user(&self, new: NewUser, by: AuditActor) -> Result<User, StoreError> {
        self.db
            .write(move |conn| {
                if load_tenant(conn, &new.tenant)?.is_none() {
                    return Err(not_found(format!("tenant {}", new.tenant)));
                }
                insert_user(conn, &new, &by)
            })
            .await
    }

    /// The user with that username and its password hash, for a login.
    pub async fn user_credentials(&self, username: &str) -> Result<Option<UserCredentials>, StoreError> {
        let username = username.to_string();
        self.db
            .read(move |conn| {
                let row = users::table
                    .inner_join(tenants::table.on(tenants::id.eq(users::tenant_id)))
                    .filter(users::username.eq(&username))
                    .select((UserRow::as_select(), tenants::disabled))
                    .first::<(UserRow, bool)>(conn)
                    .optional()?;
                row.map(|(row, tenant_disabled)| {
                    let (user, password_hash) = row.into_record()?;
                    Ok(UserCredentials {
                        user,
                        password_hash,
                        tenant_disabled,
                    })
                })
                .transpose()
            })
            .await
    }

    /// A user by id in any tenant, with whether its tenant is disabled (for checking a token).
    pub async fn user_by_id(&self, id: &str) -> Result<Option<(User, bool)>, StoreError> {
        let id = id.to_string();
        self.db
            .read(move |conn| {
                let row = users::table
                    .inner_join(tenants::table.on(tenants::id.eq(users::tenant_id)))
                    .filter(users::id.eq(&id))
                    .select((UserRow::as_select(), tenants::disabled))
                    .first::<(UserRow, bool)>(conn)
                    .optional()?;
                row.map(|(row, disabled)| Ok((row.into_record()?.0, disabled)))
                    .transpose()
            })
            .await
    }

    pub async fn get_user(&self, tenant: &TenantId, id: &str) -> Result<Option<User>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.to_string());
        self.db
            .read(move |conn| Ok(load_user(conn, Some(&tenant), &id)?.map(|(u, _)| u)))
            .await
    }

    pub async fn list_users(&self, tenant: &TenantId) -> Result<Vec<User>, StoreError> {
        let tenant = tenant.clone();
        self.db
            .read(move |conn| {
                users::table
                    .filter(users::tenant_id.eq(tenant.as_str()))
                    .order(users::username)
                    .select(UserRow::as_select())
                    .load(conn)?
                    .into_iter()
                    .map(|r| r.into_record().map(|(u, _)| u))
                    .collect()
            })
            .await
    }

    pub async fn update_user(
        &self,
        tenant: TenantId,
        id: String,
        patch: UserPatch,
        by: AuditActor,
    ) -> Result<User, StoreError> {
        self.db
            .write(move |conn| {
                let (current, _) = load_user(conn, Some(&tenant), &id)?.ok_or_else(|| not_found("user"))?;
                let demoted = patch.role.is_some_and(|r| r != Role::Admin) || patch.disabled == Some(true);
                if demoted && current.role == Role::Admin && !current.disabled {
                    ensure_other_admin(conn, &tenant, &id)?;
                }
                let target = users::table.filter(users::id.eq(&id));
                let now = now_ms();
                diesel::update(target).set(users::updated_at.eq(now)).execute(conn)?;
                if let Some(role) = patch.role {
                    diesel::update(target).set(users::role.eq(role.as_str())).execute(conn)?;
                }
                if let Some(hash) = &patch.password_hash {
                    // Ends every login of this user (see `token_generation`).
                    diesel::update(target)
                        .set((
                            users::password_hash.eq(hash),
                            users::token_generation.eq(users::token_generation + 1),
                        ))
                        .execute(conn)?;
                }
                if let Some(disabled) = patch.disabled {
                    diesel::update(target).set(users::disabled.eq(disabled)).execute(conn)?;
                }
                let detail = serde_json::json!({
                    "role": patch.role, "disabled": patch.disabled, "passwordChanged": patch.password_hash.is_some()
                });
                insert_audit(conn, &audit(&by, "user.update", &current.username, Some(detail)))?;
                load_user(conn, Some(&tenant), &id)?.map(|(u, _)| u).ok_or_else(|| not_found("user"))
            })
            .await
    }

    pub async fn delete_user(&self, tenant: TenantId, id: String, by: AuditActor) -> Result<(), StoreError> {
        self.db
            .write(move |conn| {
                let (current, _) = load_user(conn, Some(&tenant), &id)?.ok_or_else(|| not_found("user"))?;
                if current.role == Role::Admin && !current.disabled {
                    ensure_other_admin(conn, &tenant, &id)?;
                }
                diesel::delete(users::table.filter(users::id.eq(&id))).execute(conn)?;
                insert_audit(conn, &audit(&by, "user.delete", &current.username, None))
            })
            .await
    }

    // ---- API keys --------------------------------------------------------------------------

    pub async fn create_api_key(&self, new: NewApiKey, by: AuditActor) -> Result<ApiKey, StoreError> {
        self.db
            .write(move |conn| {
                let id = uuid::Uuid::now_v7().to_string();
                diesel::insert_into(api_keys::table)
                    .values((
                        api_keys::id.eq(&id),
                        api_keys::tenant_id.eq(new.tenant.as_str()),
                        api_keys::name.eq(&new.name),
                        api_keys::role.eq(new.role.as_str()),
                        api_keys::digest.eq(&new.digest),
                        api_keys::prefix.eq(&new.prefix),
                        api_keys::created_by.eq(&new.created_by),
                        api_keys::created_at.eq(now_ms()),
                        api_keys::expires_at.eq(new.expires_at.map(|t| t.timestamp_millis())),
                    ))
                    .execute(conn)?;
                insert_audit(
                    conn,
                    &audit(
                        &by,
                        "api_key.create",
                        &id,
                        Some(serde_json::json!({ "name": new.name, "role": new.role })),
                    ),
                )?;
                load_api_key(conn, &new.tenant, &id)?.ok_or_else(|| not_found("API key"))
            })
            .await
    }

    pub async fn api_key_by_digest(&self, digest: &str) -> Result<Option<ApiKeyLookup>, StoreError> {
        let digest = digest.to_string();
        self.db
            .read(move |conn| {
                let row = api_keys::table
                    .inner_join(tenants::table.on(tenants::id.eq(api_keys::tenant_id)))
                    .filter(api_keys::digest.eq(&digest))
                    .select((ApiKeyRow::as_select(), tenants::disabled))
                    .first::<(ApiKeyRow, bool)>(conn)
                    .optional()?;
                row.map(|(row, tenant_disabled)| {
                    Ok(ApiKeyLookup {
                        key: row.into_record()?,
                        tenant_disabled,
                    })
                })
                .transpose()
            })
            .await
    }

    pub async fn list_api_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKey>, StoreError> {
        let tenant = tenant.clone();
        self.db
            .read(move |conn| {
                api_keys::table
                    .filter(api_keys::tenant_id.eq(tenant.as_str()))
                    .order(api_keys::created_at.desc())
                    .select(ApiKeyRow::as_select())
                    .load(conn)?
                    .into_iter()
                    .map(ApiKeyRow::into_record)
                    .collect()
            })
            .await
    }

    /// Revokes a key (idempotent: revoking a revoked key keeps its first revocation time).
    pub async fn revoke_api_key(
        &self,
        tenant: TenantId,
        id: String,
        by: AuditActor,
    ) -> Result<ApiKey, StoreError> {
        self.db
            .write(move |conn| {
                let key = load_api_key(conn, &tenant, &id)?.ok_or_else(|| not_found("API key"))?;
                if key.revoked_at.is_none() {
                    diesel::update(api_keys::table.filter(api_keys::id.eq(&id)))
                        .set(api_keys::revoked_at.eq(now_ms()))
                        .execute(conn)?;
                    insert_audit(
                        conn,
                        &audit(
                            &by,
                            "api_key.revoke",
                            &id,
                            Some(serde_json::json!({ "name": key.name })),
                        ),
                    )?;
                }
                load_api_key(conn, &tenant, &id)?.ok_or_else(|| not_found("API key"))
            })
            .await
    }

    // ---- devices ---------------------------------------------------------------------------

    /// Registers a device with its first token, within the tenant's device limit.
    pub async fn register_device(
        &self,
        new: NewDevice,
        max_devices: u64,
        by: AuditActor,
    ) -> Result<DeviceRecord, StoreError> {
        self.db
            .write(move |conn| {
                let tenant = new.tenant.as_str();
                let count: i64 = devices::table
                    .filter(devices::tenant_id.eq(tenant))
                    .count()
                    .get_result(conn)?;
                if count as u64 >= max_devices {
                    return Err(StoreError::LimitReached(format!(
                        "tenant {tenant} already has {count} devices, the maximum (MAX_DEVICES)"
                    )));
                }
                let missing = missing_groups(conn, &new.tenant, &new.groups)?;
                if !missing.is_empty() {
                    return Err(not_found(format!("group {}", missing.join(", "))));
                }
                let now = now_ms();
                diesel::insert_into(devices::table)
                    .values((
                        devices::tenant_id.eq(tenant),
                        devices::device_id.eq(new.id.as_str()),
                        devices::device_type.eq(&new.device_type),
                        devices::enabled.eq(true),
                        devices::connected.eq(false),
                        devices::created_at.eq(now),
                        devices::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .map_err(conflict_as(format!("device {} is already registered", new.id)))?;
                write_metadata(conn, &new.tenant, &new.id, &new.metadata)?;
                insert_tags(conn, &new.tenant, &new.id, &new.tags)?;
                for group in &new.groups {
                    diesel::insert_into(device_group_members::table)
                        .values((
                            device_group_members::tenant_id.eq(tenant),
                            device_group_members::group_name.eq(group.as_str()),
                            device_group_members::device_id.eq(new.id.as_str()),
                            device_group_members::added_at.eq(now),
                        ))
                        .execute(conn)?;
                }
                insert_token(conn, &new.tenant, &new.id, &new.token_digest)?;
                insert_audit(
                    conn,
                    &audit(
                        &by,
                        "device.register",
                        new.id.as_str(),
                        Some(serde_json::json!({ "type": new.device_type })),
                    ),
                )?;
                load_device(conn, &new.tenant, &new.id)?
                    .ok_or_else(|| not_found(format!("device {}", new.id)))
            })
            .await
    }

    pub async fn get_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.clone());
        self.db.read(move |conn| load_device(conn, &tenant, &id)).await
    }

    /// The ids of the tenant's devices matching `filter` (dynamic groups resolved), in id order.
    pub async fn matching_devices(
        &self,
        tenant: &TenantId,
        filter: DeviceFilter,
    ) -> Result<Vec<DeviceId>, StoreError> {
        let tenant = tenant.clone();
        self.db
            .read(move |conn| {
                Ok(matching_device_ids(conn, &tenant, filter)?
                    .into_iter()
                    .filter_map(|id| DeviceId::parse(id).ok())
                    .collect())
            })
            .await
    }

    /// Which of `ids` are registered devices of `tenant` (one query).
    pub async fn registered_devices(
        &self,
        tenant: &TenantId,
        ids: &[DeviceId],
    ) -> Result<Vec<DeviceId>, StoreError> {
        let tenant = tenant.clone();
        let wanted: Vec<String> = ids.iter().map(|d| d.to_string()).collect();
        self.db
            .read(move |conn| {
                let found: Vec<String> = devices::table
                    .filter(devices::tenant_id.eq(tenant.as_str()))
                    .filter(devices::device_id.eq_any(&wanted))
                    .select(devices::device_id)
                    .load(conn)?;
                Ok(found
                    .into_iter()
                    .filter_map(|id| DeviceId::parse(id).ok())
                    .collect())
            })
            .await
    }

    pub async fn list_devices(
        &self,
        tenant: &TenantId,
        filter: DeviceFilter,
        page: PageRequest,
    ) -> Result<Page<DeviceRecord>, StoreError> {
        let tenant = tenant.clone();
        self.db
            .read(move |conn| {
                let filter = resolve_groups(conn, &tenant, filter)?;
                let total: i64 = filtered_devices(&tenant, &filter).count().get_result(conn)?;
                let mut query = filtered_devices(&tenant, &filter);
                if let Some(after) = &page.after {
                    query = query.filter(devices::device_id.gt(after.clone()));
                }
                let limit = page.limit.clamp(1, 1000) as i64;
                let mut rows: Vec<DeviceRow> = query
                    .order(devices::device_id)
                    .limit(limit + 1)
                    .select(DeviceRow::as_select())
                    .load(conn)?;
                let more = rows.len() as i64 > limit;
                rows.truncate(limit as usize);
                let next = if more {
                    rows.last().map(|r| r.device_id.clone())
                } else {
                    None
                };
                let items = assemble_devices(conn, &tenant, rows)?;
                Ok(Page {
                    items,
                    next,
                    total: total as u64,
                })
            })
            .await
    }

    pub async fn update_device(
        &self,
        tenant: TenantId,
        id: DeviceId,
        patch: DevicePatch,
        by: AuditActor,
    ) -> Result<DeviceRecord, StoreError> {
        self.db
            .write(move |conn| {
                let target = devices::table
                    .filter(devices::tenant_id.eq(tenant.as_str()))
                    .filter(devices::device_id.eq(id.as_str()));
                let touched = diesel::update(target)
                    .set(devices::updated_at.eq(now_ms()))
                    .execute(conn)?;
                if touched == 0 {
                    return Err(not_found(format!("device {id}")));
                }
                if let Some(device_type) = &patch.device_type {
                    diesel::update(target)
                        .set(devices::device_type.eq(device_type))
                        .execute(conn)?;
                }
                if let Some(enabled) = patch.enabled {
                    diesel::update(target)
                        .set(devices::enabled.eq(enabled))
                        .execute(conn)?;
                }
                if let Some(merge) = &patch.metadata {
                    for (name, value) in merge {
                        let row = device_metadata::table
                            .filter(device_metadata::tenant_id.eq(tenant.as_str()))
                            .filter(device_metadata::device_id.eq(id.as_str()))
                            .filter(device_metadata::name.eq(name));
                        diesel::delete(row).execute(conn)?;
                        if !value.is_null() {
                            let one = Map::from_iter([(name.clone(), value.clone())]);
                            write_metadata(conn, &tenant, &id, &one)?;
                        }
                    }
                }
                if let Some(tags) = &patch.tags {
                    diesel::delete(
                        device_tags::table
                            .filter(device_tags::tenant_id.eq(tenant.as_str()))
                            .filter(device_tags::device_id.eq(id.as_str())),
                    )
                    .execute(conn)?;
                    insert_tags(conn, &tenant, &id, tags)?;
                }
                let detail = serde_json::json!({
                    "type": patch.device_type,
                    "enabled": patch.enabled,
                    "metadataKeys": patch.metadata.as_ref().map(|m| m.keys().cloned().collect::<Vec<_>>()),
                    "tags": patch.tags,
                });
                insert_audit(conn, &audit(&by, "device.update", id.as_str(), Some(detail)))?;
                let device =
                    load_device(conn, &tenant, &id)?.ok_or_else(|| not_found(format!("device {id}")))?;
                // Merging can grow metadata past its limits; refusing here rolls the change back.
                rules::metadata(&device.metadata)
                    .map_err(|m| StoreError::Invalid(format!("metadata: {m}")))?;
                Ok(device)
            })
            .await
    }

    pub async fn add_device_tags(
        &self,
        tenant: TenantId,
        id: DeviceId,
        tags: Vec<String>,
        by: AuditActor,
    ) -> Result<DeviceRecord, StoreError> {
        self.db
            .write(move |conn| {
                let current =
                    load_device(conn, &tenant, &id)?.ok_or_else(|| not_found(format!("device {id}")))?;
                let new: Vec<String> = tags
                    .iter()
                    .filter(|t| !current.tags.contains(t))
                    .cloned()
                    .collect();
                insert_tags(conn, &tenant, &id, &new)?;
                insert_audit(
                    conn,
                    &audit(
                        &by,
                        "device.tag",
                        id.as_str(),
                        Some(serde_json::json!({ "added": new })),
                    ),
                )?;
                let device =
                    load_device(conn, &tenant, &id)?.ok_or_else(|| not_found(format!("device {id}")))?;
                rules::tags(&device.tags).map_err(|m| StoreError::Invalid(format!("tags: {m}")))?;
                Ok(device)
            })
            .await
    }

    pub async fn remove_device_tag(
        &self,
        tenant: TenantId,
        id: DeviceId,
        tag: String,
        by: AuditActor,
    ) -> Result<DeviceRecord, StoreError> {
        self.db
            .write(move |conn| {
                if load_device_row(conn, &tenant, &id)?.is_none() {
                    return Err(not_found(format!("device {id}")));
                }
                let removed = diesel::delete(
                    device_tags::table
                        .filter(device_tags::tenant_id.eq(tenant.as_str()))
                        .filter(device_tags::device_id.eq(id.as_str()))
                        .filter(device_tags::tag.eq(&tag)),
                )
                .execute(conn)?;
                if removed == 0 {
                    return Err(not_found(format!("tag {tag} on device {id}")));
                }
                insert_audit(
                    conn,
                    &audit(
                        &by,
                        "device.untag",
                        id.as_str(),
                        Some(serde_json::json!({ "removed": tag })),
                    ),
                )?;
                load_device(conn, &tenant, &id)?.ok_or_else(|| not_found(format!("device {id}")))
            })
            .await
    }

    /// Deletes a device with its credentials, tags, metadata and memberships.
    pub async fn delete_device(
        &self,
        tenant: TenantId,
        id: DeviceId,
        by: AuditActor,
    ) -> Result<(), StoreError> {
        self.db
            .write(move |conn| {
                // Children first: the cascade is declared, but not every SQLite build enforces it.
                let t = tenant.as_str();
                let d = id.as_str();
                diesel::delete(
                    device_credentials::table
                        .filter(device_credentials::tenant_id.eq(t))
                        .filter(device_credentials::device_id.eq(d)),
                )
                .execute(conn)?;
                diesel::delete(
                    device_metadata::table
                        .filter(device_metadata::tenant_id.eq(t))
                        .filter(device_metadata::device_id.eq(d)),
                )
                .execute(conn)?;
                diesel::delete(
                    device_tags::table
                        .filter(device_tags::tenant_id.eq(t))
                        .filter(device_tags::device_id.eq(d)),
                )
                .execute(conn)?;
                diesel::delete(
                    device_group_members::table
                        .filter(device_group_members::tenant_id.eq(t))
                        .filter(device_group_members::device_id.eq(d)),
                )
                .execute(conn)?;
                diesel::delete(
                    device_shadows::table
                        .filter(device_shadows::tenant_id.eq(t))
                        .filter(device_shadows::device_id.eq(d)),
                )
                .execute(conn)?;
                let removed = diesel::delete(
                    devices::table
                        .filter(devices::tenant_id.eq(t))
                        .filter(devices::device_id.eq(d)),
                )
                .execute(conn)?;
                if removed == 0 {
                    return Err(not_found(format!("device {id}")));
                }
                insert_audit(conn, &audit(&by, "device.delete", d, None))
            })
            .await
    }

    /// Replaces a device's token: the old one stops working at once.
    pub async fn rotate_device_token(
        &self,
        tenant: TenantId,
        id: DeviceId,
        digest: String,
        by: AuditActor,
    ) -> Result<(), StoreError> {
        self.db
            .write(move |conn| {
                if load_device_row(conn, &tenant, &id)?.is_none() {
                    return Err(not_found(format!("device {id}")));
                }
                diesel::delete(
                    device_credentials::table
                        .filter(device_credentials::tenant_id.eq(tenant.as_str()))
                        .filter(device_credentials::device_id.eq(id.as_str()))
                        .filter(device_credentials::kind.eq("token")),
                )
                .execute(conn)?;
                insert_token(conn, &tenant, &id, &digest)?;
                insert_audit(conn, &audit(&by, "device.rotate_token", id.as_str(), None))
            })
            .await
    }

    /// Registered, connected and disabled devices of one tenant, or of all when `None`.
    pub async fn device_counts(&self, tenant: Option<&TenantId>) -> Result<DeviceCounts, StoreError> {
        let tenant = tenant.cloned();
        self.db
            .read(move |conn| {
                let base = || {
                    let mut q = devices::table.into_boxed::<MultiBackend>();
                    if let Some(t) = &tenant {
                        q = q.filter(devices::tenant_id.eq(t.as_str().to_string()));
                    }
                    q
                };
                let registered: i64 = base().count().get_result(conn)?;
                let connected: i64 = base()
                    .filter(devices::connected.eq(true))
                    .count()
                    .get_result(conn)?;
                let disabled: i64 = base()
                    .filter(devices::enabled.eq(false))
                    .count()
                    .get_result(conn)?;
                Ok(DeviceCounts {
                    registered: registered as u64,
                    connected: connected as u64,
                    disabled: disabled as u64,
                })
            })
            .await
    }

    // ---- groups ----------------------------------------------------------------------------

    pub async fn create_group(
        &self,
        tenant: TenantId,
        name: GroupName,
        description: String,
        query: Option<GroupQuery>,
        by: AuditActor,
    ) -> Result<Group, StoreError> {
        let query_text = query_text(query.as_ref())?;
        self.db
            .write(move |conn| {
                let now = now_ms();
                diesel::insert_into(device_groups::table)
                    .values((
                        device_groups::tenant_id.eq(tenant.as_str()),
                        device_groups::name.eq(name.as_str()),
                        device_groups::description.eq(&description),
                        device_groups::created_at.eq(now),
                        device_groups::updated_at.eq(now),
                        device_groups::query.eq(&query_text),
                    ))
                    .execute(conn)
                    .map_err(conflict_as(format!("group {name} already exists")))?;
                let detail = query.as_ref().map(|q| serde_json::json!({ "query": q }));
                insert_audit(conn, &audit(&by, "group.create", name.as_str(), detail))?;
                load_group(conn, &tenant, &name)?.ok_or_else(|| not_found(format!("group {name}")))
            })
            .await
    }

    pub async fn get_group(&self, tenant: &TenantId, name: &GroupName) -> Result<Option<Group>, StoreError> {
        let (tenant, name) = (tenant.clone(), name.clone());
        self.db.read(move |conn| load_group(conn, &tenant, &name)).await
    }

    pub async fn list_groups(&self, tenant: &TenantId) -> Result<Vec<Group>, StoreError> {
        let tenant = tenant.clone();
        self.db
            .read(move |conn| {
                let rows: Vec<GroupRow> = device_groups::table
                    .filter(device_groups::tenant_id.eq(tenant.as_str()))
                    .order(device_groups::name)
                    .select(GroupRow::as_select())
                    .load(conn)?;
                let counts: HashMap<String, i64> = device_group_members::table
                    .filter(device_group_members::tenant_id.eq(tenant.as_str()))
                    .group_by(device_group_members::group_name)
                    .select((device_group_members::group_name, diesel::dsl::count_star()))
                    .load::<(String, i64)>(conn)?
                    .into_iter()
                    .collect();
                rows.into_iter()
                    .map(|row| {
                        let members = match parse_query(row.query.as_deref())? {
                            Some(query) => count_matching(conn, &tenant, &query)?,
                            None => counts.get(&row.name).copied().unwrap_or(0),
                        };
                        group_record(row, members)
                    })
                    .collect()
            })
            .await
    }

    pub async fn update_group(
        &self,
        tenant: TenantId,
        name: GroupName,
        description: Option<String>,
        query: Option<GroupQuery>,
        by: AuditActor,
    ) -> Result<Group, StoreError> {
        let query_text = query_text(query.as_ref())?;
        self.db
            .write(move |conn| {
                let Some(current) = load_group(conn, &tenant, &name)? else {
                    return Err(not_found(format!("group {name}")));
                };
                // A static group keeps its members; it cannot become dynamic while it has any.
                if query.is_some() && current.query.is_none() && current.member_count > 0 {
                    return Err(StoreError::Conflict(format!(
                        "group {name} has {} members; remove them before giving it a query",
                        current.member_count
                    )));
                }
                if query.is_none() && description.is_none() {
                    return Ok(current);
                }
                let target = device_groups::table
                    .filter(device_groups::tenant_id.eq(tenant.as_str()))
                    .filter(device_groups::name.eq(name.as_str()));
                diesel::update(target)
                    .set(device_groups::updated_at.eq(now_ms()))
                    .execute(conn)?;
                if let Some(description) = &description {
                    diesel::update(target)
                        .set(device_groups::description.eq(description))
                        .execute(conn)?;
                }
                if query_text.is_some() {
                    diesel::update(target)
                        .set(device_groups::query.eq(&query_text))
                        .execute(conn)?;
                }
                let detail = query.as_ref().map(|q| serde_json::json!({ "query": q }));
                insert_audit(conn, &audit(&by, "group.update", name.as_str(), detail))?;
                load_group(conn, &tenant, &name)?.ok_or_else(|| not_found(format!("group {name}")))
            })
            .await
    }

    pub async fn delete_group(
        &self,
        tenant: TenantId,
        name: GroupName,
        by: AuditActor,
    ) -> Result<(), StoreError> {
        self.db
            .write(move |conn| {
                diesel::delete(
                    device_group_members::table
                        .filter(device_group_members::tenant_id.eq(tenant.as_str()))
                        .filter(device_group_members::group_name.eq(name.as_str())),
                )
                .execute(conn)?;
                let removed = diesel::delete(
                    device_groups::table
                        .filter(device_groups::tenant_id.eq(tenant.as_str()))
                        .filter(device_groups::name.eq(name.as_str())),
                )
                .execute(conn)?;
                if removed == 0 {
                    return Err(not_found(format!("group {name}")));
                }
                insert_audit(conn, &audit(&by, "group.delete", name.as_str(), None))
            })
            .await
    }

    /// Adds devices to a group; all of them must exist (nothing is added otherwise).
    /// Devices already in the group are left as they are.
    pub async fn add_group_members(
        &self,
        tenant: TenantId,
        name: GroupName,
        members: Vec<DeviceId>,
        by: AuditActor,
    ) -> Result<Group, StoreError> {
        self.db
            .write(move |conn| {
                match load_group(conn, &tenant, &name)? {
                    None => return Err(not_found(format!("group {name}"))),
                    Some(group) if group.query.is_some() => {
                        return Err(StoreError::Conflict(format!(
                            "group {name} is dynamic: its members are the devices matching its query"
                        )));
                    }
                    Some(_) => {}
                }
                let wanted: Vec<String> = members.iter().map(|d| d.as_str().to_string()).collect();
                let existing: Vec<String> = devices::table
                    .filter(devices::tenant_id.eq(tenant.as_str()))
                    .filter(devices::device_id.eq_any(&wanted))
                    .select(devices::device_id)
                    .load(conn)?;
                let missing: Vec<&String> = wanted.iter().filter(|d| !existing.contains(d)).collect();
                if !missing.is_empty() {
                    let list: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
                    return Err(not_found(format!("device {}", list.join(", "))));
                }
                let already: Vec<String> = device_group_members::table
                    .filter(device_group_members::tenant_id.eq(tenant.as_str()))
                    .filter(device_group_members::group_name.eq(name.as_str()))
                    .filter(device_group_members::device_id.eq_any(&wanted))
                    .select(device_group_members::device_id)
                    .load(conn)?;
                let now = now_ms();
                let mut added = Vec::new();
                for device in wanted.iter().filter(|d| !already.contains(d)) {
                    if added.contains(device) {
                        continue;
                    }
                    diesel::insert_into(device_group_members::table)
                        .values((
                            device_group_members::tenant_id.eq(tenant.as_str()),
                            device_group_members::group_name.eq(name.as_str()),
                            device_group_members::device_id.eq(device),
                            device_group_members::added_at.eq(now),
                        ))
                        .execute(conn)?;
                    added.push(device.clone());
                }
                insert_audit(
                    conn,
                    &audit(
                        &by,
                        "group.add_members",
                        name.as_str(),
                        Some(serde_json::json!({ "added": added })),
                    ),
                )?;
                load_group(conn, &tenant, &name)?.ok_or_else(|| not_found(format!("group {name}")))
            })
            .await
    }

    pub async fn remove_group_member(
        &self,
        tenant: TenantId,
        name: GroupName,
        device: DeviceId,
        by: AuditActor,
    ) -> Result<Group, StoreError> {
        self.db
            .write(move |conn| {
                if load_group(conn, &tenant, &name)?.is_none() {
                    return Err(not_found(format!("group {name}")));
                }
                let removed = diesel::delete(
                    device_group_members::table
                        .filter(device_group_members::tenant_id.eq(tenant.as_str()))
                        .filter(device_group_members::group_name.eq(name.as_str()))
                        .filter(device_group_members::device_id.eq(device.as_str())),
                )
                .execute(conn)?;
                if removed == 0 {
                    return Err(not_found(format!("device {device} in group {name}")));
                }
                insert_audit(
                    conn,
                    &audit(
                        &by,
                        "group.remove_member",
                        name.as_str(),
                        Some(serde_json::json!({ "device": device })),
                    ),
                )?;
                load_group(conn, &tenant, &name)?.ok_or_else(|| not_found(format!("group {name}")))
            })
            .await
    }

    // ---- audit -----------------------------------------------------------------------------

    /// Records an event outside any other change (denials, logins); answers its row's id.
    pub async fn record(&self, event: AuditEvent) -> Result<i64, StoreError> {
        self.db.write(move |conn| insert_audit_row(conn, &event)).await
    }

    /// Adds repeated occurrences to recorded events: `(row id, how many more)`.
    pub async fn add_audit_occurrences(&self, counts: Vec<(i64, u64)>) -> Result<(), StoreError> {
        self.db
            .write(move |conn| {
                for (id, more) in &counts {
                    let more = i64::try_from(*more).unwrap_or(i64::MAX);
                    diesel::update(audit_log::table.filter(audit_log::id.eq(id)))
                        .set(audit_log::occurrences.eq(audit_log::occurrences + more))
                        .execute(conn)?;
                }
                Ok(())
            })
            .await
    }

    /// Deletes audit entries recorded before `cutoff_ms`; answers how many. Deletes in chunks,
    /// each its own transaction, so a large backlog never holds the write lock for long.
    pub async fn prune_audit(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        const CHUNK: i64 = 5000;
        let mut removed = 0u64;
        loop {
            let deleted = self
                .db
                .write(move |conn| {
                    let oldest = audit_log::table
                        .filter(audit_log::at.lt(cutoff_ms))
                        .select(audit_log::id)
                        .order(audit_log::id)
                        .limit(CHUNK)
                        .load::<i64>(conn)?;
                    if oldest.is_empty() {
                        return Ok(0);
                    }
                    Ok(
                        diesel::delete(audit_log::table.filter(audit_log::id.eq_any(&oldest)))
                            .execute(conn)?,
                    )
                })
                .await?;
            removed += deleted as u64;
            if (deleted as i64) < CHUNK {
                return Ok(removed);
            }
        }
    }

    /// Audit entries, newest first; `tenant` `None` lists every tenant's (platform admins).
    pub async fn list_audit(
        &self,
        tenant: Option<&TenantId>,
        filter: AuditFilter,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let tenant = tenant.cloned();
        self.db
            .read(move |conn| {
                let mut q = audit_log::table.into_boxed::<MultiBackend>();
                if let Some(t) = &tenant {
                    q = q.filter(audit_log::tenant_id.eq(t.as_str().to_string()));
                }
                if let Some(a) = filter.action {
                    q = q.filter(audit_log::action.eq(a));
                }
                if let Some(a) = filter.actor {
                    q = q.filter(audit_log::actor.eq(a));
                }
                if let Some(o) = filter.outcome {
                    q = q.filter(audit_log::outcome.eq(o));
                }
                if let Some(t) = filter.target {
                    q = q.filter(audit_log::target.eq(t));
                }
                if let Some(s) = filter.since {
                    q = q.filter(audit_log::at.ge(s.timestamp_millis()));
                }
                if let Some(u) = filter.until {
                    q = q.filter(audit_log::at.lt(u.timestamp_millis()));
                }
                if let Some(b) = filter.before_id {
                    q = q.filter(audit_log::id.lt(b));
                }
                let rows: Vec<AuditRow> = q
                    .order(audit_log::id.desc())
                    .limit(filter.limit.clamp(1, 1000) as i64)
                    .select(AuditRow::as_select())
                    .load(conn)?;
                Ok(rows
                    .into_iter()
                    .map(|r| AuditEntry {
                        id: r.id,
                        at: from_ms(r.at),
                        tenant: r.tenant_id,
                        actor: r.actor,
                        action: r.action,
                        target: r.target,
                        outcome: r.outcome,
                        detail: r.detail.and_then(|d| serde_json::from_str(&d).ok()),
                        source_ip: r.source_ip,
                        count: u64::try_from(r.occurrences).unwrap_or(1),
                    })
                    .collect())
            })
            .await
    }

    // ---- platform settings -----------------------------------------------------------------

    /// The stored value of a platform setting, storing `generate()` first if there is none.
    /// Safe when several nodes start at once: they all end up with the first value stored.
    pub async fn setting_or_insert(
        &self,
        name: &str,
        generate: impl FnOnce() -> String + Send + 'static,
    ) -> Result<String, StoreError> {
        let name = name.to_string();
        self.db
            .write(move |conn| {
                let existing = platform_settings::table
                    .filter(platform_settings::name.eq(&name))
                    .select(platform_settings::value)
                    .first::<String>(conn)
                    .optional()?;
                if let Some(value) = existing {
                    return Ok(value);
                }
                let value = generate();
                diesel::insert_into(platform_settings::table)
                    .values((
                        platform_settings::name.eq(&name),
                        platform_settings::value.eq(&value),
                    ))
                    .execute(conn)?;
                Ok(value)
            })
            .await
    }

    /// The stored value of a platform setting.
    pub async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = name.to_string();
        self.db
            .read(move |conn| {
                Ok(platform_settings::table
                    .filter(platform_settings::name.eq(&name))
                    .select(platform_settings::value)
                    .first::<String>(conn)
                    .optional()?)
            })
            .await
    }

    /// Deletes a platform setting if it still holds `value` (another node may have changed it).
    pub async fn delete_setting(&self, name: &str, value: &str) -> Result<bool, StoreError> {
        let (name, value) = (name.to_string(), value.to_string());
        self.db
            .write(move |conn| {
                let deleted = diesel::delete(
                    platform_settings::table
                        .filter(platform_settings::name.eq(&name))
                        .filter(platform_settings::value.eq(&value)),
                )
                .execute(conn)?;
                Ok(deleted > 0)
            })
            .await
    }
}

#[async_trait]
impl DeviceDirectory for RegistryStore {
    async fn find_device(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<DeviceRecord>, DirectoryError> {
        self.get_device(tenant, device)
            .await
            .map_err(|e| DirectoryError(e.to_string()))
    }

    async fn device_type_schema(
        &self,
        tenant: &TenantId,
        device_type: &str,
    ) -> Result<Option<drover_actors::telemetry::schema::DeviceTypeSchema>, DirectoryError> {
        self.get_device_type(tenant, device_type)
            .await
            .map(|found| found.map(|t| t.schema))
            .map_err(|e| DirectoryError(e.to_string()))
    }
}

// ---- query helpers (run inside a connection) -----------------------------------------------

fn load_tenant(conn: &mut DbConnection, id: &TenantId) -> Result<Option<Tenant>, StoreError> {
    tenants::table
        .filter(tenants::id.eq(id.as_str()))
        .select(TenantRow::as_select())
        .first(conn)
        .optional()?
        .map(TenantRow::into_record)
        .transpose()
}

fn load_user(
    conn: &mut DbConnection,
    tenant: Option<&TenantId>,
    id: &str,
) -> Result<Option<(User, String)>, StoreError> {
    let mut q = users::table
        .filter(users::id.eq(id.to_string()))
        .into_boxed::<MultiBackend>();
    if let Some(t) = tenant {
        q = q.filter(users::tenant_id.eq(t.as_str().to_string()));
    }
    q.select(UserRow::as_select())
        .first(conn)
        .optional()?
        .map(UserRow::into_record)
        .transpose()
}

fn insert_user(conn: &mut DbConnection, new: &NewUser, by: &AuditActor) -> Result<User, StoreError> {
    let id = uuid::Uuid::now_v7().to_string();
    let now = now_ms();
    diesel::insert_into(users::table)
        .values((
            users::id.eq(&id),
            users::tenant_id.eq(new.tenant.as_str()),
            users::username.eq(&new.username),
            users::password_hash.eq(&new.password_hash),
            users::role.eq(new.role.as_str()),
            users::platform_admin.eq(new.platform_admin),
            users::disabled.eq(false),
            users::created_at.eq(now),
            users::updated_at.eq(now),
        ))
        .execute(conn)
        .map_err(conflict_as(format!("username {} is already taken", new.username)))?;
    let detail =
        serde_json::json!({ "tenant": new.tenant, "role": new.role, "platformAdmin": new.platform_admin });
    insert_audit(conn, &audit(by, "user.create", &new.username, Some(detail)))?;
    load_user(conn, Some(&new.tenant), &id)?
        .map(|(u, _)| u)
        .ok_or_else(|| not_found("user"))
}

/// Refuses a change that would leave the tenant without an active admin.
fn ensure_other_admin(conn: &mut DbConnection, tenant: &TenantId, except: &str) -> Result<(), StoreError> {
    let others: i64 = users::table
        .filter(users::tenant_id.eq(tenant.as_str()))
        .filter(users::role.eq(Role::Admin.as_str()))
        .filter(users::disabled.eq(false))
        .filter(users::id.ne(except))
        .count()
        .get_result(conn)?;
    if others == 0 {
        return Err(StoreError::Conflict(format!(
            "this is the last active admin of tenant {tenant}"
        )));
    }
    Ok(())
}

fn load_api_key(conn: &mut DbConnection, tenant: &TenantId, id: &str) -> Result<Option<ApiKey>, StoreError> {
    api_keys::table
        .filter(api_keys::tenant_id.eq(tenant.as_str()))
        .filter(api_keys::id.eq(id))
        .select(ApiKeyRow::as_select())
        .first(conn)
        .optional()?
        .map(ApiKeyRow::into_record)
        .transpose()
}

fn load_device_row(
    conn: &mut DbConnection,
    tenant: &TenantId,
    id: &DeviceId,
) -> Result<Option<DeviceRow>, StoreError> {
    Ok(devices::table
        .filter(devices::tenant_id.eq(tenant.as_str()))
        .filter(devices::device_id.eq(id.as_str()))
        .select(DeviceRow::as_select())
        .first(conn)
        .optional()?)
}

fn load_device(
    conn: &mut DbConnection,
    tenant: &TenantId,
    id: &DeviceId,
) -> Result<Option<DeviceRecord>, StoreError> {
    let Some(row) = load_device_row(conn, tenant, id)? else {
        return Ok(None);
    };
    Ok(assemble_devices(conn, tenant, vec![row])?.pop())
}

/// Completes device rows with their metadata, tags and groups (three queries for any number).
fn assemble_devices(
    conn: &mut DbConnection,
    tenant: &TenantId,
    rows: Vec<DeviceRow>,
) -> Result<Vec<DeviceRecord>, StoreError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = rows.iter().map(|r| r.device_id.clone()).collect();
    let mut metadata: HashMap<String, BTreeMap<String, Value>> = HashMap::new();
    for (device, name, value) in device_metadata::table
        .filter(device_metadata::tenant_id.eq(tenant.as_str()))
        .filter(device_metadata::device_id.eq_any(&ids))
        .select((
            device_metadata::device_id,
            device_metadata::name,
            device_metadata::value,
        ))
        .load::<(String, String, String)>(conn)?
    {
        let value = serde_json::from_str(&value).unwrap_or(Value::String(value));
        metadata.entry(device).or_default().insert(name, value);
    }
    let mut tags: HashMap<String, Vec<String>> = HashMap::new();
    for (device, tag) in device_tags::table
        .filter(device_tags::tenant_id.eq(tenant.as_str()))
        .filter(device_tags::device_id.eq_any(&ids))
        .order(device_tags::tag)
        .select((device_tags::device_id, device_tags::tag))
        .load::<(String, String)>(conn)?
    {
        tags.entry(device).or_default().push(tag);
    }
    let mut groups: HashMap<String, Vec<GroupName>> = HashMap::new();
    for (device, group) in device_group_members::table
        .filter(device_group_members::tenant_id.eq(tenant.as_str()))
        .filter(device_group_members::device_id.eq_any(&ids))
        .order(device_group_members::group_name)
        .select((device_group_members::device_id, device_group_members::group_name))
        .load::<(String, String)>(conn)?
    {
        groups
            .entry(device)
            .or_default()
            .push(parse_stored(GroupName::parse(group))?);
    }
    rows.into_iter()
        .map(|row| {
            Ok(DeviceRecord {
                tenant: parse_stored(TenantId::parse(row.tenant_id))?,
                metadata: metadata
                    .remove(&row.device_id)
                    .map(|m| m.into_iter().collect())
                    .unwrap_or_default(),
                tags: tags.remove(&row.device_id).unwrap_or_default(),
                groups: groups.remove(&row.device_id).unwrap_or_default(),
                id: parse_stored(DeviceId::parse(row.device_id))?,
                device_type: row.device_type,
                enabled: row.enabled,
                connected: row.connected,
                last_seen_at: row.last_seen_at.map(from_ms),
                created_at: from_ms(row.created_at),
                updated_at: from_ms(row.updated_at),
            })
        })
        .collect()
}

/// The device query with every filter applied; built twice (count and page). A dynamic group
/// must have been resolved first ([`resolve_groups`]).
pub(crate) fn filtered_devices(
    tenant: &TenantId,
    filter: &DeviceFilter,
) -> devices::BoxedQuery<'static, MultiBackend> {
    let t = tenant.as_str().to_string();
    let q = devices::table
        .filter(devices::tenant_id.eq(t.clone()))
        .into_boxed::<MultiBackend>();
    apply_filter(q, &t, filter)
}

fn apply_filter(
    mut q: devices::BoxedQuery<'static, MultiBackend>,
    t: &str,
    filter: &DeviceFilter,
) -> devices::BoxedQuery<'static, MultiBackend> {
    let t = t.to_string();
    if let Some(device_type) = &filter.device_type {
        q = q.filter(devices::device_type.eq(device_type.clone()));
    }
    if let Some(ids) = &filter.ids {
        q = q.filter(devices::device_id.eq_any(ids.clone()));
    }
    for tag in filter.tag.iter().chain(filter.tags.iter()) {
        q = q.filter(
            devices::device_id.eq_any(
                device_tags::table
                    .filter(device_tags::tenant_id.eq(t.clone()))
                    .filter(device_tags::tag.eq(tag.clone()))
                    .select(device_tags::device_id),
            ),
        );
    }
    match (&filter.group_query, &filter.group) {
        (Some(query), _) => q = apply_filter(q, &t, query),
        (None, Some(group)) => {
            q = q.filter(
                devices::device_id.eq_any(
                    device_group_members::table
                        .filter(device_group_members::tenant_id.eq(t.clone()))
                        .filter(device_group_members::group_name.eq(group.as_str().to_string()))
                        .select(device_group_members::device_id),
                ),
            );
        }
        (None, None) => {}
    }
    match filter.status {
        Some(ConnectionStatus::Online) => {
            q = q
                .filter(devices::enabled.eq(true))
                .filter(devices::connected.eq(true))
        }
        Some(ConnectionStatus::Offline) => {
            q = q
                .filter(devices::enabled.eq(true))
                .filter(devices::connected.eq(false))
        }
        Some(ConnectionStatus::Disabled) => q = q.filter(devices::enabled.eq(false)),
        None => {}
    }
    for (name, value) in &filter.metadata {
        // A query string value matches the string itself or a JSON value with that text (3, true).
        let candidates = vec![Value::String(value.clone()).to_string(), value.clone()];
        q = q.filter(
            devices::device_id.eq_any(
                device_metadata::table
                    .filter(device_metadata::tenant_id.eq(t.clone()))
                    .filter(device_metadata::name.eq(name.clone()))
                    .filter(device_metadata::value.eq_any(candidates))
                    .select(device_metadata::device_id),
            ),
        );
    }
    if let Some(firmware) = &filter.firmware {
        q = q.filter(
            devices::device_id.eq_any(
                device_shadows::table
                    .filter(device_shadows::tenant_id.eq(t.clone()))
                    .filter(device_shadows::firmware.eq(firmware.clone()))
                    .select(device_shadows::device_id),
            ),
        );
    }
    q
}

/// Puts a dynamic group's query into the filter (a static group stays a membership check).
/// A group that does not exist matches no device, as an empty static group would.
pub(crate) fn resolve_groups(
    conn: &mut DbConnection,
    tenant: &TenantId,
    mut filter: DeviceFilter,
) -> Result<DeviceFilter, StoreError> {
    if let Some(group) = &filter.group {
        let query: Option<Option<String>> = device_groups::table
            .filter(device_groups::tenant_id.eq(tenant.as_str()))
            .filter(device_groups::name.eq(group.as_str()))
            .select(device_groups::query)
            .first(conn)
            .optional()?;
        if let Some(query) = parse_query(query.flatten().as_deref())? {
            filter.group_query = Some(Box::new(query.to_filter()));
        }
    }
    Ok(filter)
}

/// The ids of every device matching `filter` (dynamic groups resolved), in id order.
pub(crate) fn matching_device_ids(
    conn: &mut DbConnection,
    tenant: &TenantId,
    filter: DeviceFilter,
) -> Result<Vec<String>, StoreError> {
    let filter = resolve_groups(conn, tenant, filter)?;
    Ok(filtered_devices(tenant, &filter)
        .order(devices::device_id)
        .select(devices::device_id)
        .load(conn)?)
}

fn count_matching(conn: &mut DbConnection, tenant: &TenantId, query: &GroupQuery) -> Result<i64, StoreError> {
    Ok(filtered_devices(tenant, &query.to_filter())
        .count()
        .get_result(conn)?)
}

fn parse_query(text: Option<&str>) -> Result<Option<GroupQuery>, StoreError> {
    text.map(|t| {
        serde_json::from_str(t).map_err(|e| StoreError::Internal(format!("stored group query: {e}")))
    })
    .transpose()
}

fn query_text(query: Option<&GroupQuery>) -> Result<Option<String>, StoreError> {
    query
        .map(|q| serde_json::to_string(q).map_err(|e| StoreError::Internal(e.to_string())))
        .transpose()
}

fn write_metadata(
    conn: &mut DbConnection,
    tenant: &TenantId,
    id: &DeviceId,
    metadata: &Map<String, Value>,
) -> Result<(), StoreError> {
    for (name, value) in metadata {
        diesel::insert_into(device_metadata::table)
            .values((
                device_metadata::tenant_id.eq(tenant.as_str()),
                device_metadata::device_id.eq(id.as_str()),
                device_metadata::name.eq(name),
                device_metadata::value.eq(metadata_text(value)),
            ))
            .execute(conn)?;
    }
    Ok(())
}

fn insert_tags(
    conn: &mut DbConnection,
    tenant: &TenantId,
    id: &DeviceId,
    tags: &[String],
) -> Result<(), StoreError> {
    let mut seen: Vec<&String> = Vec::new();
    for tag in tags {
        if seen.contains(&tag) {
            continue;
        }
        seen.push(tag);
        diesel::insert_into(device_tags::table)
            .values((
                device_tags::tenant_id.eq(tenant.as_str()),
                device_tags::device_id.eq(id.as_str()),
                device_tags::tag.eq(tag),
            ))
            .execute(conn)?;
    }
    Ok(())
}

fn insert_token(
    conn: &mut DbConnection,
    tenant: &TenantId,
    id: &DeviceId,
    digest: &str,
) -> Result<(), StoreError> {
    diesel::insert_into(device_credentials::table)
        .values((
            device_credentials::id.eq(uuid::Uuid::now_v7().to_string()),
            device_credentials::tenant_id.eq(tenant.as_str()),
            device_credentials::device_id.eq(id.as_str()),
            device_credentials::kind.eq("token"),
            device_credentials::digest.eq(digest),
            device_credentials::created_at.eq(now_ms()),
        ))
        .execute(conn)?;
    Ok(())
}

fn missing_groups(
    conn: &mut DbConnection,
    tenant: &TenantId,
    groups: &[GroupName],
) -> Result<Vec<String>, StoreError> {
    if groups.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: Vec<String> = groups.iter().map(|g| g.as_str().to_string()).collect();
    let existing: Vec<String> = device_groups::table
        .filter(device_groups::tenant_id.eq(tenant.as_str()))
        .filter(device_groups::name.eq_any(&wanted))
        .select(device_groups::name)
        .load(conn)?;
    Ok(wanted.into_iter().filter(|g| !existing.contains(g)).collect())
}

fn load_group(
    conn: &mut DbConnection,
    tenant: &TenantId,
    name: &GroupName,
) -> Result<Option<Group>, StoreError> {
    let Some(row) = device_groups::table
        .filter(device_groups::tenant_id.eq(tenant.as_str()))
        .filter(device_groups::name.eq(name.as_str()))
        .select(GroupRow::as_select())
        .first::<GroupRow>(conn)
        .optional()?
    else {
        return Ok(None);
    };
    let members: i64 = match parse_query(row.query.as_deref())? {
        Some(query) => count_matching(conn, tenant, &query)?,
        None => device_group_members::table
            .filter(device_group_members::tenant_id.eq(tenant.as_str()))
            .filter(device_group_members::group_name.eq(name.as_str()))
            .count()
            .get_result(conn)?,
    };
    group_record(row, members).map(Some)
}

fn group_record(row: GroupRow, members: i64) -> Result<Group, StoreError> {
    Ok(Group {
        tenant: parse_stored(TenantId::parse(row.tenant_id))?,
        name: parse_stored(GroupName::parse(row.name))?,
        description: row.description,
        query: parse_query(row.query.as_deref())?,
        member_count: members as u64,
        created_at: from_ms(row.created_at),
        updated_at: from_ms(row.updated_at),
    })
}
