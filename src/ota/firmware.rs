//! Registering an uploaded image: the version must be semver and new in the tenant; the record
//! gets the measured size and SHA-256, and a manifest signed with the platform's Ed25519 key.

use chrono::Utc;
use drover_actors::TenantId;
use serde::Serialize;

use super::images::ImageWriter;
use super::{Ota, OtaError};
use crate::storage::RegistryStore;
use crate::storage::ota::FirmwareRecord;
use crate::storage::records::AuditActor;

/// Most device types one image may list, and longest notes.
pub const MAX_DEVICE_TYPES: usize = 64;
pub const MAX_NOTES_CHARS: usize = 4096;

/// What an upload says about itself.
#[derive(Debug, Clone, Default)]
pub struct FirmwareFields {
    pub version: Option<String>,
    pub device_types: Vec<String>,
    pub notes: String,
}

impl FirmwareFields {
    /// `deviceTypes` as given: a comma-separated list or a JSON array.
    pub fn set_device_types(&mut self, raw: &str) -> Result<(), OtaError> {
        let raw = raw.trim();
        let types: Vec<String> = if raw.starts_with('[') {
            serde_json::from_str(raw).map_err(|e| OtaError::invalid("deviceTypes", e))?
        } else {
            raw.split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect()
        };
        if types.len() > MAX_DEVICE_TYPES || types.iter().any(|t| t.is_empty() || t.len() > 64) {
            return Err(OtaError::invalid(
                "deviceTypes",
                format!("at most {MAX_DEVICE_TYPES} names of 1 to 64 characters"),
            ));
        }
        self.device_types = types;
        Ok(())
    }

    /// The checked version, device types and notes.
    pub fn validate(&self) -> Result<(semver::Version, Vec<String>, String), OtaError> {
        let raw = self
            .version
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| OtaError::invalid("version", "required (semver, e.g. 1.4.2)"))?;
        let version = semver::Version::parse(raw).map_err(|_| OtaError::BadVersion(raw.to_string()))?;
        if self.notes.chars().count() > MAX_NOTES_CHARS {
            return Err(OtaError::invalid(
                "notes",
                format!("at most {MAX_NOTES_CHARS} characters"),
            ));
        }
        let mut types = self.device_types.clone();
        types.sort();
        types.dedup();
        Ok((version, types, self.notes.clone()))
    }
}

/// The manifest devices verify, signed as the exact text stored.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest<'a> {
    firmware_id: &'a str,
    tenant: &'a str,
    version: &'a str,
    size: u64,
    sha256: &'a str,
    device_types: &'a [String],
    created_at: String,
}

/// Checks `fields`, moves the written image into place and records it.
pub async fn register(
    ota: &Ota,
    registry: &RegistryStore,
    tenant: &TenantId,
    fields: FirmwareFields,
    image: ImageWriter,
    by: AuditActor,
) -> Result<FirmwareRecord, OtaError> {
    let (version, device_types, notes) = fields.validate()?;
    if image.size() == 0 {
        return Err(OtaError::invalid("file", "the image is empty"));
    }
    let id = uuid::Uuid::now_v7().to_string();
    let path = ota.files.path(tenant, &id);
    let written = image.finish(&path).await?;
    let created_at = Utc::now();
    let version = version.to_string();
    let manifest = serde_json::to_string(&Manifest {
        firmware_id: &id,
        tenant: tenant.as_str(),
        version: &version,
        size: written.size,
        sha256: &written.sha256,
        device_types: &device_types,
        created_at: created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
    .map_err(|e| OtaError::Internal(e.to_string()))?;
    let record = FirmwareRecord {
        signature: ota.signer.sign_base64(manifest.as_bytes()),
        id: id.clone(),
        tenant: tenant.clone(),
        version,
        device_types,
        notes,
        size: written.size,
        sha256: written.sha256,
        manifest,
        created_by: by.actor.clone(),
        created_at,
    };
    match registry.insert_firmware(record, by).await {
        Ok(record) => Ok(record),
        Err(error) => {
            // The record is what makes an image exist: no record, no file.
            let _ = ota.files.remove(tenant, &id).await;
            Err(error.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_device_types_are_checked() {
        let mut fields = FirmwareFields {
            version: Some("1.2.3".into()),
            ..FirmwareFields::default()
        };
        fields.set_device_types("sensor, gateway,,").unwrap();
        assert_eq!(fields.validate().unwrap().1, vec!["gateway", "sensor"]);
        fields.set_device_types(r#"["a","b"]"#).unwrap();
        assert_eq!(fields.device_types, vec!["a", "b"]);
        assert!(fields.set_device_types("[1]").is_err());
        for bad in ["1.2", "v1.2.3", "latest", ""] {
            fields.version = Some(bad.into());
            assert!(fields.validate().is_err(), "{bad}");
        }
        fields.version = Some("2.0.0-rc.1+build.5".into());
        assert!(fields.validate().is_ok());
    }
}
