//! Device types' telemetry schemas (renames, conversions, declared types and ranges), read by
//! device actors through [`DeviceDirectory::device_type_schema`].

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use drover_actors::TenantId;
use drover_actors::telemetry::schema::DeviceTypeSchema;

use super::db::StoreError;
use super::records::AuditActor;
use super::registry::{RegistryStore, audit, from_ms, insert_audit, now_ms};
use super::schema::device_types;

/// A device type with its schema.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceType {
    pub tenant: TenantId,
    pub name: String,
    pub schema: DeviceTypeSchema,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

type Row = (String, String, String, i64, i64);

fn from_row((tenant, name, definition, created_at, updated_at): Row) -> Result<DeviceType, StoreError> {
    Ok(DeviceType {
        tenant: TenantId::parse(tenant)
            .map_err(|e| StoreError::Internal(format!("invalid stored tenant: {e}")))?,
        schema: serde_json::from_str(&definition)
            .map_err(|e| StoreError::Internal(format!("invalid stored schema of device type {name}: {e}")))?,
        name,
        created_at: from_ms(created_at),
        updated_at: from_ms(updated_at),
    })
}

const COLUMNS: (
    device_types::tenant_id,
    device_types::name,
    device_types::definition,
    device_types::created_at,
    device_types::updated_at,
) = (
    device_types::tenant_id,
    device_types::name,
    device_types::definition,
    device_types::created_at,
    device_types::updated_at,
);

impl RegistryStore {
    /// Creates or replaces a device type's schema; `true` when it was created.
    pub async fn put_device_type(
        &self,
        tenant: &TenantId,
        name: &str,
        schema: &DeviceTypeSchema,
        by: AuditActor,
    ) -> Result<(DeviceType, bool), StoreError> {
        let (tenant, name) = (tenant.clone(), name.to_string());
        let definition = serde_json::to_string(schema).map_err(|e| StoreError::Internal(e.to_string()))?;
        self.database()
            .write(move |conn| {
                let now = now_ms();
                let updated = diesel::update(
                    device_types::table
                        .filter(device_types::tenant_id.eq(tenant.as_str()))
                        .filter(device_types::name.eq(&name)),
                )
                .set((
                    device_types::definition.eq(&definition),
                    device_types::updated_at.eq(now),
                ))
                .execute(conn)?;
                let created = updated == 0;
                if created {
                    diesel::insert_into(device_types::table)
                        .values((
                            device_types::tenant_id.eq(tenant.as_str()),
                            device_types::name.eq(&name),
                            device_types::definition.eq(&definition),
                            device_types::created_at.eq(now),
                            device_types::updated_at.eq(now),
                        ))
                        .execute(conn)?;
                }
                let action = if created {
                    "device_type.create"
                } else {
                    "device_type.update"
                };
                insert_audit(conn, &audit(&by, action, name.as_str(), None))?;
                let row: Row = device_types::table
                    .filter(device_types::tenant_id.eq(tenant.as_str()))
                    .filter(device_types::name.eq(&name))
                    .select(COLUMNS)
                    .first(conn)?;
                Ok((from_row(row)?, created))
            })
            .await
    }

    pub async fn get_device_type(
        &self,
        tenant: &TenantId,
        name: &str,
    ) -> Result<Option<DeviceType>, StoreError> {
        let (tenant, name) = (tenant.clone(), name.to_string());
        self.database()
            .read(move |conn| {
                device_types::table
                    .filter(device_types::tenant_id.eq(tenant.as_str()))
                    .filter(device_types::name.eq(&name))
                    .select(COLUMNS)
                    .first::<Row>(conn)
                    .optional()?
                    .map(from_row)
                    .transpose()
            })
            .await
    }

    pub async fn list_device_types(&self, tenant: &TenantId) -> Result<Vec<DeviceType>, StoreError> {
        let tenant = tenant.clone();
        self.database()
            .read(move |conn| {
                device_types::table
                    .filter(device_types::tenant_id.eq(tenant.as_str()))
                    .order(device_types::name)
                    .select(COLUMNS)
                    .load::<Row>(conn)?
                    .into_iter()
                    .map(from_row)
                    .collect()
            })
            .await
    }

    /// Deletes a device type's schema; `false` when there was none.
    pub async fn delete_device_type(
        &self,
        tenant: &TenantId,
        name: &str,
        by: AuditActor,
    ) -> Result<bool, StoreError> {
        let (tenant, name) = (tenant.clone(), name.to_string());
        self.database()
            .write(move |conn| {
                let deleted = diesel::delete(
                    device_types::table
                        .filter(device_types::tenant_id.eq(tenant.as_str()))
                        .filter(device_types::name.eq(&name)),
                )
                .execute(conn)?;
                if deleted > 0 {
                    insert_audit(conn, &audit(&by, "device_type.delete", name.as_str(), None))?;
                }
                Ok(deleted > 0)
            })
            .await
    }
}
