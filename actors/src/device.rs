//! The registry's view of a device, as actors and the API see it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, GroupName, TenantId};

/// Whether a device is reachable right now, as far as the platform knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionStatus {
    /// Has a live connection (MQTT session or WebSocket).
    Online,
    /// Registered and enabled, not connected.
    Offline,
    /// Switched off by an operator: its credentials are refused.
    Disabled,
}

impl ConnectionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionStatus::Online => "online",
            ConnectionStatus::Offline => "offline",
            ConnectionStatus::Disabled => "disabled",
        }
    }
}

impl std::str::FromStr for ConnectionStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "online" => Ok(Self::Online),
            "offline" => Ok(Self::Offline),
            "disabled" => Ok(Self::Disabled),
            other => Err(format!(
                "unknown status {other:?}; expected online, offline or disabled"
            )),
        }
    }
}

/// A registered device with everything the registry knows about it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRecord {
    pub tenant: TenantId,
    pub id: DeviceId,
    pub device_type: String,
    /// Free-form attributes (location, model…); top-level keys can be filtered on.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub tags: Vec<String>,
    pub groups: Vec<GroupName>,
    pub enabled: bool,
    pub connected: bool,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl DeviceRecord {
    pub fn status(&self) -> ConnectionStatus {
        if !self.enabled {
            ConnectionStatus::Disabled
        } else if self.connected {
            ConnectionStatus::Online
        } else {
            ConnectionStatus::Offline
        }
    }
}

/// Limits on the descriptive fields of a device.
pub mod rules {
    use serde_json::{Map, Value};

    pub const MAX_TYPE_LEN: usize = 64;
    pub const MAX_TAGS: usize = 32;
    pub const MAX_TAG_LEN: usize = 64;
    pub const MAX_METADATA_KEYS: usize = 64;
    pub const MAX_METADATA_KEY_LEN: usize = 64;
    pub const MAX_METADATA_BYTES: usize = 16 * 1024;

    /// A device type: 1–64 printable characters.
    pub fn device_type(value: &str) -> Result<(), String> {
        let len = value.chars().count();
        if value.trim().is_empty() {
            return Err("type must not be empty".into());
        }
        if len > MAX_TYPE_LEN {
            return Err(format!(
                "type must be at most {MAX_TYPE_LEN} characters (got {len})"
            ));
        }
        if value.chars().any(char::is_control) {
            return Err("type must not contain control characters".into());
        }
        Ok(())
    }

    /// A tag: 1–64 of letters, digits, `-`, `_`, `.`, `:`, `=`, `/`.
    pub fn tag(value: &str) -> Result<(), String> {
        let len = value.chars().count();
        if len == 0 || len > MAX_TAG_LEN {
            return Err(format!("tag {value:?} must be 1 to {MAX_TAG_LEN} characters"));
        }
        if let Some(c) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '=' | '/')))
        {
            return Err(format!(
                "tag {value:?} contains {c:?}; allowed are letters, digits and - _ . : = /"
            ));
        }
        Ok(())
    }

    pub fn tags(values: &[String]) -> Result<(), String> {
        if values.len() > MAX_TAGS {
            return Err(format!(
                "at most {MAX_TAGS} tags per device (got {})",
                values.len()
            ));
        }
        values.iter().try_for_each(|t| tag(t))
    }

    /// Metadata: at most 64 top-level keys of 1–64 characters, 16 KiB of JSON in all.
    pub fn metadata(value: &Map<String, Value>) -> Result<(), String> {
        if value.len() > MAX_METADATA_KEYS {
            return Err(format!(
                "metadata may have at most {MAX_METADATA_KEYS} keys (got {})",
                value.len()
            ));
        }
        for key in value.keys() {
            let len = key.chars().count();
            if len == 0 || len > MAX_METADATA_KEY_LEN || key.chars().any(char::is_control) {
                return Err(format!(
                    "metadata key {key:?} must be 1 to {MAX_METADATA_KEY_LEN} printable characters"
                ));
            }
        }
        let size = Value::Object(value.clone()).to_string().len();
        if size > MAX_METADATA_BYTES {
            return Err(format!(
                "metadata is {size} bytes of JSON; the limit is {MAX_METADATA_BYTES}"
            ));
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn device_types() {
            assert!(device_type("temperature").is_ok());
            assert!(device_type("").is_err());
            assert!(device_type(&"x".repeat(65)).is_err());
            assert!(device_type("a\nb").is_err());
        }

        #[test]
        fn tag_rules() {
            assert!(tags(&["floor=3".into(), "zone/a".into()]).is_ok());
            assert!(tag("has space").is_err());
            assert!(tags(&vec!["t".to_string(); 33]).is_err());
        }

        #[test]
        fn metadata_rules() {
            let ok: Map<String, Value> =
                serde_json::from_str(r#"{"location":"warehouse-a","model":"DHT22"}"#).unwrap();
            assert!(metadata(&ok).is_ok());
            let big: Map<String, Value> = [("blob".to_string(), Value::String("x".repeat(20_000)))]
                .into_iter()
                .collect();
            assert!(metadata(&big).unwrap_err().contains("limit"));
            let many: Map<String, Value> = (0..65).map(|i| (format!("k{i}"), Value::Null)).collect();
            assert!(metadata(&many).is_err());
        }
    }
}
