//! The firmware registry: upload (streamed to disk), list, describe, delete, download with
//! HTTP Range, and the public key devices verify manifests with.
//!
//! Uploads take the raw image as the body (`?version=&deviceTypes=&notes=`) or a
//! `multipart/form-data` form with fields `file`, `version`, `deviceTypes`, `notes`. Downloads
//! accept the device's own token (as devices fetch their update) or any caller of the tenant.

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, HttpResponse, delete, get, post, web};
use chrono::{DateTime, Utc};
use drover_actors::{Role, TenantId};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use utoipa::ToSchema;
use utoipa_actix_web::service_config::ServiceConfig;

use crate::auth::secrets::digest;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::principal::Principal;
use crate::ota::OtaError;
use crate::ota::firmware::{FirmwareFields, register};
use crate::ota::images::{Unsatisfiable, parse_range};
use crate::state::AppState;
use crate::storage::ota::FirmwareRecord;

pub fn routes(cfg: &mut ServiceConfig) {
    // The fixed path first: `signing-key` is not a firmware id.
    cfg.service(signing_key)
        .service(upload)
        .service(list)
        .service(get_one)
        .service(delete_one)
        .service(download);
}

/// Bytes read from the image file per chunk of a download. The HTTP/1 writer takes chunks
/// while its buffer holds less than 32 KiB, so a chunk this size keeps each download's buffer
/// under 64 KiB (64 KiB chunks grew it to 128 KiB: 32 MiB more at the peak of a campaign with
/// 256 downloads at once).
const DOWNLOAD_CHUNK: usize = 16 * 1024;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareView {
    pub id: String,
    pub version: String,
    pub device_types: Vec<String>,
    pub notes: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
    /// The signed manifest (JSON text: firmwareId, tenant, version, size, sha256, deviceTypes,
    /// createdAt) and its Ed25519 signature, base64.
    pub manifest: String,
    pub signature: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub download_url: String,
}

impl From<FirmwareRecord> for FirmwareView {
    fn from(f: FirmwareRecord) -> Self {
        FirmwareView {
            download_url: format!("/api/firmware/{}/download", f.id),
            id: f.id,
            version: f.version,
            device_types: f.device_types,
            notes: f.notes,
            size: f.size,
            sha256: f.sha256,
            manifest: f.manifest,
            signature: f.signature,
            created_by: f.created_by,
            created_at: f.created_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FirmwareList {
    pub firmware: Vec<FirmwareView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SigningKey {
    /// Always `Ed25519`.
    pub algorithm: String,
    /// The raw 32-byte public key, base64.
    pub public_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UploadQuery {
    version: Option<String>,
    device_types: Option<String>,
    notes: Option<String>,
}

/// Upload a firmware image.
#[utoipa::path(
    tag = "firmware",
    params(
        ("version" = Option<String>, Query, description = "Semantic version (raw body uploads)"),
        ("deviceTypes" = Option<String>, Query, description = "Comma-separated device types it fits (empty: any)"),
        ("notes" = Option<String>, Query, description = "Release notes"),
    ),
    request_body(content = Vec<u8>, description = "The image (application/octet-stream), or multipart/form-data with file, version, deviceTypes, notes"),
    responses(
        (status = 201, body = FirmwareView),
        (status = 400, body = ErrorBody, description = "invalid_version, validation_failed"),
        (status = 409, body = ErrorBody, description = "already_exists: the version is registered"),
        (status = 413, body = ErrorBody, description = "payload_too_large"),
    ),
    security(("bearer" = []))
)]
#[post("/firmware")]
async fn upload(
    state: web::Data<AppState>,
    principal: Principal,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "firmware.create")?;
    let ota = state.ota.clone();
    let limit = ota.max_image_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    // A multipart body carries a little more than the file; a raw one exactly the file.
    let allowance = if multipart { limit + 64 * 1024 } else { limit };
    if declared.is_some_and(|length| length > allowance) {
        return Err(OtaError::Image(crate::ota::images::ImageError::TooLarge { limit }).into());
    }
    let query = web::Query::<UploadQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))?
        .into_inner();
    let mut fields = FirmwareFields::default();
    let mut writer = ota.files.begin(limit).await.map_err(OtaError::from)?;
    if multipart {
        let mut form = actix_multipart::Multipart::new(req.headers(), payload);
        let mut saw_file = false;
        while let Some(field) = form.next().await {
            let mut field = field.map_err(|e| ApiError::bad_request("invalid_multipart", e.to_string()))?;
            let name = field.name().unwrap_or_default().to_string();
            if name == "file" {
                if saw_file {
                    return Err(ApiError::invalid("file", "give one file"));
                }
                saw_file = true;
                while let Some(chunk) = field.next().await {
                    let chunk =
                        chunk.map_err(|e| ApiError::bad_request("invalid_multipart", e.to_string()))?;
                    writer.write(&chunk).await.map_err(OtaError::from)?;
                }
                continue;
            }
            // Text fields are small: read at most a few KiB.
            let mut value = Vec::new();
            while let Some(chunk) = field.next().await {
                let chunk = chunk.map_err(|e| ApiError::bad_request("invalid_multipart", e.to_string()))?;
                if value.len() + chunk.len() > 8 * 1024 {
                    return Err(ApiError::invalid(&name, "at most 8 KiB"));
                }
                value.extend_from_slice(&chunk);
            }
            let value = String::from_utf8(value).map_err(|_| ApiError::invalid(&name, "not UTF-8 text"))?;
            match name.as_str() {
                "version" => fields.version = Some(value),
                "deviceTypes" => fields.set_device_types(&value)?,
                "notes" => fields.notes = value,
                other => {
                    return Err(ApiError::bad_request(
                        "invalid_multipart",
                        format!("unknown field {other:?}; use file, version, deviceTypes, notes"),
                    ));
                }
            }
        }
        if !saw_file {
            return Err(ApiError::invalid("file", "the form has no file field"));
        }
        // Query parameters may complete a form (never override it).
        if fields.version.is_none() {
            fields.version = query.version;
        }
    } else {
        fields.version = query.version;
        if let Some(types) = &query.device_types {
            fields.set_device_types(types)?;
        }
        fields.notes = query.notes.unwrap_or_default();
        // Checked before the body is read: a bad version need not upload 200 MB first.
        fields.validate()?;
        let mut payload = payload;
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad_request("invalid_body", e.to_string()))?;
            writer.write(&chunk).await.map_err(OtaError::from)?;
        }
    }
    let record = register(
        &ota,
        &state.registry,
        &principal.tenant,
        fields,
        writer,
        principal.audit_actor(),
    )
    .await?;
    Ok(HttpResponse::Created().json(FirmwareView::from(record)))
}

/// The tenant's firmware images, newest first.
#[utoipa::path(tag = "firmware", responses((status = 200, body = FirmwareList)), security(("bearer" = [])))]
#[get("/firmware")]
async fn list(state: web::Data<AppState>, principal: Principal) -> Result<web::Json<FirmwareList>, ApiError> {
    let firmware = state.registry.list_firmware(&principal.tenant).await?;
    Ok(web::Json(FirmwareList {
        firmware: firmware.into_iter().map(Into::into).collect(),
    }))
}

async fn find(state: &AppState, tenant: &TenantId, id: &str) -> Result<FirmwareRecord, ApiError> {
    state
        .registry
        .get_firmware(tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("firmware {id} not found")))
}

/// One firmware image.
#[utoipa::path(
    tag = "firmware",
    params(("id" = String, Path, description = "Firmware id")),
    responses((status = 200, body = FirmwareView), (status = 404, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/firmware/{id}")]
async fn get_one(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<web::Json<FirmwareView>, ApiError> {
    Ok(web::Json(find(&state, &principal.tenant, &id).await?.into()))
}

/// Delete a firmware image; refused (409 `conflict`) while a running or paused campaign uses it.
#[utoipa::path(
    tag = "firmware",
    params(("id" = String, Path, description = "Firmware id")),
    responses((status = 204, description = "Deleted"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []))
)]
#[delete("/firmware/{id}")]
async fn delete_one(
    state: web::Data<AppState>,
    principal: Principal,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    principal.require(Role::Operator, "firmware.delete")?;
    state
        .registry
        .delete_firmware(&principal.tenant, &id, principal.audit_actor())
        .await?;
    if let Err(error) = state.ota.files.remove(&principal.tenant, &id).await {
        tracing::warn!(%error, firmware = %id, "firmware record deleted, its file could not be removed");
    }
    Ok(HttpResponse::NoContent().finish())
}

/// The tenant a download is for: the device token's device (enabled, of an enabled tenant) or
/// the caller's.
async fn downloader_tenant(req: &HttpRequest, state: &web::Data<AppState>) -> Result<TenantId, ApiError> {
    if let Some(token) = crate::http::ingest::device_token(req) {
        let Some(login) = state.registry.device_by_token(&digest(&token)).await? else {
            state
                .metrics
                .auth_failures
                .with_label_values(&["device_token"])
                .inc();
            return Err(ApiError::unauthorized(
                "invalid_device_token",
                "unknown device token",
            ));
        };
        if !login.enabled || login.tenant_disabled {
            return Err(ApiError::forbidden("this device or its tenant is disabled"));
        }
        return Ok(login.tenant);
    }
    Ok(Principal::extract(req)
        .await
        .map_err(|e| match e.as_error::<ApiError>() {
            Some(refused) => refused.clone(),
            None => ApiError::unauthorized("unauthenticated", "missing credentials"),
        })?
        .tenant)
}

/// The public key firmware manifests are signed with.
#[utoipa::path(
    tag = "firmware",
    responses((status = 200, body = SigningKey), (status = 401, body = ErrorBody)),
    security(("bearer" = []))
)]
#[get("/firmware/signing-key")]
async fn signing_key(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<web::Json<SigningKey>, ApiError> {
    downloader_tenant(&req, &state).await?;
    Ok(web::Json(SigningKey {
        algorithm: "Ed25519".into(),
        public_key: state.ota.signer.public_key_base64(),
    }))
}

/// Download an image: whole, or the byte range a `Range` header asks (206), so an interrupted
/// download resumes. Devices use their own token (`Authorization: Bearer dvt_…`).
#[utoipa::path(
    tag = "firmware",
    params(("id" = String, Path, description = "Firmware id")),
    responses(
        (status = 200, description = "The image", content_type = "application/octet-stream"),
        (status = 206, description = "The range asked for", content_type = "application/octet-stream"),
        (status = 404, body = ErrorBody),
        (status = 416, body = ErrorBody, description = "range_not_satisfiable"),
        (status = 503, body = ErrorBody, description = "busy: too many downloads at once; retry after Retry-After"),
    ),
    security(("bearer" = []))
)]
#[get("/firmware/{id}/download")]
async fn download(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let tenant = downloader_tenant(&req, &state).await?;
    let record = find(&state, &tenant, &id).await?;
    // Held until the body is sent (or the client goes away): the memory of downloads in
    // flight is bounded, whatever the size of the fleet a campaign notifies.
    let slot = state
        .ota
        .download_slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError {
            code: "busy",
            ..ApiError::unavailable("too many firmware downloads at once; retry shortly", 1)
        })?;
    let path = state.ota.files.path(&tenant, &record.id);
    let mut file = tokio::fs::File::open(&path).await.map_err(|error| {
        tracing::error!(%error, path = %path.display(), "firmware image missing");
        ApiError::internal("the firmware image cannot be read")
    })?;
    let size = record.size;
    let range = match req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(raw) => parse_range(raw, size).map_err(|Unsatisfiable| {
            ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the image has {size} bytes"),
            )
        })?,
        None => None,
    };
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let length = if size == 0 { 0 } else { end - start + 1 };
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| ApiError::internal(format!("firmware read: {e}")))?;
    }
    let body = futures_util::stream::unfold((file, length, slot), |(mut file, left, slot)| async move {
        if left == 0 {
            drop(slot);
            return None;
        }
        let mut buffer = vec![0u8; DOWNLOAD_CHUNK.min(left as usize)];
        match file.read(&mut buffer).await {
            Ok(0) => Some((
                Err(std::io::Error::other("firmware image shorter than recorded")),
                (file, 0, slot),
            )),
            Ok(n) => {
                buffer.truncate(n);
                Some((Ok(bytes::Bytes::from(buffer)), (file, left - n as u64, slot)))
            }
            Err(e) => Some((Err(e), (file, 0, slot))),
        }
    });
    let mut response = if range.is_some() {
        let mut r = HttpResponse::PartialContent();
        r.insert_header((header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}")));
        r
    } else {
        HttpResponse::Ok()
    };
    Ok(response
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .insert_header((header::ETAG, format!("\"{}\"", record.sha256)))
        .insert_header(("X-Firmware-Sha256", record.sha256.clone()))
        .content_type("application/octet-stream")
        .no_chunking(length)
        .streaming(body))
}
