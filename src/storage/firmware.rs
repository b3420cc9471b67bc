//! Firmware images in the registry (the bytes are under the data directory, see
//! `crate::ota::images`; campaigns are [`super::ota`]): version, device types, size, SHA-256 and the signed manifest.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use drover_actors::TenantId;

use super::db::StoreError;
use super::ota::{internal, tenant_of};
use super::records::AuditActor;
use super::registry::{RegistryStore, audit, from_ms, insert_audit};
use super::schema::{campaigns, firmware};

#[derive(Debug, Clone, PartialEq)]
pub struct FirmwareRecord {
    pub id: String,
    pub tenant: TenantId,
    pub version: String,
    pub device_types: Vec<String>,
    pub notes: String,
    pub size: u64,
    pub sha256: String,
    pub manifest: String,
    pub signature: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = firmware)]
pub(super) struct FirmwareRow {
    id: String,
    tenant_id: String,
    version: String,
    device_types: String,
    notes: String,
    size: i64,
    sha256: String,
    manifest: String,
    signature: String,
    created_by: String,
    created_at: i64,
}

pub(super) fn firmware_from_row(row: FirmwareRow) -> Result<FirmwareRecord, StoreError> {
    Ok(FirmwareRecord {
        device_types: serde_json::from_str(&row.device_types)
            .map_err(|e| internal("device types")(e.to_string()))?,
        tenant: tenant_of(row.tenant_id)?,
        id: row.id,
        version: row.version,
        notes: row.notes,
        size: row.size.max(0) as u64,
        sha256: row.sha256,
        manifest: row.manifest,
        signature: row.signature,
        created_by: row.created_by,
        created_at: from_ms(row.created_at),
    })
}

impl RegistryStore {
    pub async fn insert_firmware(
        &self,
        record: FirmwareRecord,
        by: AuditActor,
    ) -> Result<FirmwareRecord, StoreError> {
        self.database()
            .write(move |conn| {
                diesel::insert_into(firmware::table)
                    .values((
                        firmware::id.eq(&record.id),
                        firmware::tenant_id.eq(record.tenant.as_str()),
                        firmware::version.eq(&record.version),
                        firmware::device_types.eq(serde_json::to_string(&record.device_types).unwrap_or_default()),
                        firmware::notes.eq(&record.notes),
                        firmware::size.eq(record.size as i64),
                        firmware::sha256.eq(&record.sha256),
                        firmware::manifest.eq(&record.manifest),
                        firmware::signature.eq(&record.signature),
                        firmware::created_by.eq(&record.created_by),
                        firmware::created_at.eq(record.created_at.timestamp_millis()),
                    ))
                    .execute(conn)
                    .map_err(|e| match StoreError::from(e) {
                        StoreError::AlreadyExists(_) => StoreError::AlreadyExists(format!(
                            "firmware version {} is already registered",
                            record.version
                        )),
                        other => other,
                    })?;
                insert_audit(
                    conn,
                    &audit(
                        &by,
                        "firmware.create",
                        record.id.as_str(),
                        Some(serde_json::json!({"version": record.version, "size": record.size, "sha256": record.sha256})),
                    ),
                )?;
                Ok(record)
            })
            .await
    }

    pub async fn list_firmware(&self, tenant: &TenantId) -> Result<Vec<FirmwareRecord>, StoreError> {
        let tenant = tenant.clone();
        self.database()
            .read(move |conn| {
                firmware::table
                    .filter(firmware::tenant_id.eq(tenant.as_str()))
                    .order(firmware::created_at.desc())
                    .select(FirmwareRow::as_select())
                    .load::<FirmwareRow>(conn)?
                    .into_iter()
                    .map(firmware_from_row)
                    .collect()
            })
            .await
    }

    pub async fn get_firmware(
        &self,
        tenant: &TenantId,
        id: &str,
    ) -> Result<Option<FirmwareRecord>, StoreError> {
        let (tenant, id) = (tenant.clone(), id.to_string());
        self.database()
            .read(move |conn| {
                firmware::table
                    .filter(firmware::tenant_id.eq(tenant.as_str()))
                    .filter(firmware::id.eq(&id))
                    .select(FirmwareRow::as_select())
                    .first::<FirmwareRow>(conn)
                    .optional()?
                    .map(firmware_from_row)
                    .transpose()
            })
            .await
    }

    /// Deletes an image's record; refused (conflict) while a running or paused campaign uses it.
    pub async fn delete_firmware(
        &self,
        tenant: &TenantId,
        id: &str,
        by: AuditActor,
    ) -> Result<(), StoreError> {
        let (tenant, id) = (tenant.clone(), id.to_string());
        self.database()
            .write(move |conn| {
                let users: Vec<String> = campaigns::table
                    .filter(campaigns::tenant_id.eq(tenant.as_str()))
                    .filter(
                        campaigns::firmware_id
                            .eq(&id)
                            .or(campaigns::rollback_firmware_id.eq(&id)),
                    )
                    .filter(campaigns::status.eq_any(["running", "paused"]))
                    .select(campaigns::id)
                    .load(conn)?;
                if !users.is_empty() {
                    return Err(StoreError::Conflict(format!(
                        "firmware {id} is used by campaign(s) {}; cancel them first",
                        users.join(", ")
                    )));
                }
                let deleted = diesel::delete(
                    firmware::table
                        .filter(firmware::tenant_id.eq(tenant.as_str()))
                        .filter(firmware::id.eq(&id)),
                )
                .execute(conn)?;
                if deleted == 0 {
                    return Err(StoreError::NotFound(format!("firmware {id}")));
                }
                insert_audit(conn, &audit(&by, "firmware.delete", id.as_str(), None))?;
                Ok(())
            })
            .await
    }
}
