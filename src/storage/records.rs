//! Plain registry records and the inputs of registry operations (no diesel types here).

use chrono::{DateTime, Utc};
use drover_actors::{ConnectionStatus, DeviceId, GroupName, Role, TenantId};
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub id: String,
    pub tenant: TenantId,
    pub username: String,
    pub role: Role,
    pub platform_admin: bool,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Raised by every password change; login tokens of an earlier generation are refused.
    pub token_generation: i64,
}

/// A user with the password hash, only for checking a login.
#[derive(Debug, Clone)]
pub struct UserCredentials {
    pub user: User,
    pub password_hash: String,
    pub tenant_disabled: bool,
}

#[derive(Debug, Clone)]
pub struct NewUser {
    pub tenant: TenantId,
    pub username: String,
    pub password_hash: String,
    pub role: Role,
    pub platform_admin: bool,
}

#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    pub role: Option<Role>,
    pub password_hash: Option<String>,
    pub disabled: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub id: String,
    pub tenant: TenantId,
    pub name: String,
    pub role: Role,
    pub prefix: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub tenant: TenantId,
    pub name: String,
    pub role: Role,
    pub digest: String,
    pub prefix: String,
    pub created_by: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// An API key found by its digest, with its tenant's state.
#[derive(Debug, Clone)]
pub struct ApiKeyLookup {
    pub key: ApiKey,
    pub tenant_disabled: bool,
}

#[derive(Debug, Clone)]
pub struct NewDevice {
    pub tenant: TenantId,
    pub id: DeviceId,
    pub device_type: String,
    pub metadata: Map<String, Value>,
    pub tags: Vec<String>,
    pub groups: Vec<GroupName>,
    /// SHA-256 digest of the device token handed out once.
    pub token_digest: String,
}

/// Changes to a device; `None` leaves a field alone. Metadata follows JSON merge patch
/// (RFC 7396) at the top level: a `null` value removes the key.
#[derive(Debug, Clone, Default)]
pub struct DevicePatch {
    pub device_type: Option<String>,
    pub metadata: Option<Map<String, Value>>,
    pub tags: Option<Vec<String>>,
    pub enabled: Option<bool>,
}

/// Device list filters; all given filters must match.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    pub device_type: Option<String>,
    pub tag: Option<String>,
    pub group: Option<GroupName>,
    pub status: Option<ConnectionStatus>,
    /// `metadata.<name>=<value>` pairs; the value matches a string or the JSON text of a value.
    pub metadata: Vec<(String, String)>,
    /// Further tags the device must all have.
    pub tags: Vec<String>,
    /// The `firmware` the device's reported shadow holds.
    pub firmware: Option<String>,
    /// Only these devices (batch jobs and campaigns that name their targets).
    pub ids: Option<Vec<String>>,
    /// The query of `group` when it is a dynamic group; filled in by the registry, which
    /// applies it instead of the membership table.
    pub group_query: Option<Box<DeviceFilter>>,
}

/// The query of a dynamic group: its members are the devices that match all of it, at the
/// moment anyone asks (device lists, rule scopes, batch jobs, campaign targets).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupQuery {
    /// Device type.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    /// Tags the device must all have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Metadata keys and the values they must hold.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    /// `online`, `offline` or `disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// The firmware version the device reports (reported shadow `firmware`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
}

impl GroupQuery {
    /// Checks the query; the message names the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.device_type.is_none()
            && self.tags.is_empty()
            && self.metadata.is_empty()
            && self.status.is_none()
            && self.firmware.is_none()
        {
            return Err(
                "a dynamic group's query needs at least one of type, tags, metadata, status, firmware".into(),
            );
        }
        if self.metadata.len() > 32 {
            return Err("metadata: at most 32 keys".into());
        }
        if self.tags.len() > 32 {
            return Err("tags: at most 32".into());
        }
        if let Some(status) = &self.status {
            status
                .parse::<ConnectionStatus>()
                .map_err(|m| format!("status: {m}"))?;
        }
        if self
            .firmware
            .as_ref()
            .is_some_and(|f| f.is_empty() || f.len() > 64)
        {
            return Err("firmware: 1 to 64 characters".into());
        }
        Ok(())
    }

    /// The device filter this query stands for.
    pub fn to_filter(&self) -> DeviceFilter {
        DeviceFilter {
            device_type: self.device_type.clone(),
            tags: self.tags.clone(),
            status: self.status.as_deref().and_then(|s| s.parse().ok()),
            metadata: self
                .metadata
                .iter()
                .map(|(k, v)| {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), text)
                })
                .collect(),
            firmware: self.firmware.clone(),
            ..DeviceFilter::default()
        }
    }
}

/// Keyset pagination: items after `after` in id order.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub after: Option<String>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<String>,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub tenant: TenantId,
    pub name: GroupName,
    pub description: String,
    /// Set for a dynamic group: its members are the devices matching it.
    pub query: Option<GroupQuery>,
    pub member_count: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    Ok,
    Denied,
}

impl AuditOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Ok => "ok",
            AuditOutcome::Denied => "denied",
        }
    }
}

/// Who did something, for the audit log.
#[derive(Debug, Clone)]
pub struct AuditActor {
    pub tenant: Option<TenantId>,
    /// `user:<username>`, `key:<id>`, `device:<id>`, `system`…
    pub actor: String,
    pub source_ip: Option<String>,
}

impl AuditActor {
    pub fn system() -> Self {
        AuditActor {
            tenant: None,
            actor: "system".into(),
            source_ip: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub actor: AuditActor,
    pub action: String,
    pub target: Option<String>,
    pub outcome: AuditOutcome,
    pub detail: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub tenant: Option<String>,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    pub detail: Option<Value>,
    pub source_ip: Option<String>,
    /// How many times this happened: repeated refusals of one kind from one source within a
    /// minute are one entry (see `crate::audit`).
    pub count: u64,
}

#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub action: Option<String>,
    pub actor: Option<String>,
    pub outcome: Option<String>,
    /// What the entry is about (a device id, a user name, a rule id…).
    pub target: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Entries with an id below this (newest first paging).
    pub before_id: Option<i64>,
    pub limit: u32,
}

/// Device counts for `/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounts {
    pub registered: u64,
    pub connected: u64,
    pub disabled: u64,
}

/// A device's credentials checked at connect time.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceLogin {
    pub tenant: TenantId,
    pub device: DeviceId,
    pub device_type: String,
    pub enabled: bool,
    pub tenant_disabled: bool,
}

/// A device connecting or disconnecting, recorded in batches.
#[derive(Debug, Clone, PartialEq)]
pub struct Presence {
    pub tenant: TenantId,
    pub device: DeviceId,
    pub connected: bool,
    pub at: DateTime<Utc>,
}

/// Who an MQTT access rule is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AclSubject {
    /// Applications whose API key has this role.
    Role(Role),
    /// One application, by API key id.
    ApiKey(String),
    /// Clients connected without credentials (allow_anonymous).
    Anonymous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclAction {
    Publish,
    Subscribe,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclEffect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AclRule {
    pub id: String,
    /// `None` for rules about anonymous clients.
    pub tenant: Option<TenantId>,
    pub subject: AclSubject,
    pub action: AclAction,
    /// A valid topic filter.
    pub topic: String,
    pub effect: AclEffect,
    pub priority: i32,
    pub created_at: DateTime<Utc>,
}

/// A CA certificate that signs a tenant's device certificates.
#[derive(Debug, Clone, PartialEq)]
pub struct CaCertificate {
    pub id: String,
    pub tenant: TenantId,
    pub fingerprint: String,
    pub subject: String,
    pub pem: String,
    pub not_after: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}
