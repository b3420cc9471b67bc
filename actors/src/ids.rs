//! Validated identifiers.
//!
//! Device ids and tenant ids end up in MQTT topics (`devices/{id}/telemetry`), URLs and storage
//! keys, so they are checked once at the edge and carried as newtypes afterwards. The character
//! sets exclude everything that has a meaning in MQTT topic filters (`/`, `+`, `#`, `$`) or URLs.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} must be at most {max} characters (got {len})")]
    TooLong {
        what: &'static str,
        max: usize,
        len: usize,
    },
    #[error("{what} may only contain {allowed}; found {found:?} at position {position}")]
    InvalidChar {
        what: &'static str,
        allowed: &'static str,
        found: char,
        position: usize,
    },
    /// `.` and `..` are path segments with a meaning in URLs (clients and proxies normalise
    /// `/devices/..` away), so such an id could not be addressed through the API.
    #[error("{what} must not be \".\" or \"..\"")]
    DotSegment { what: &'static str },
}

impl IdError {
    /// Which kind of identifier failed (`"deviceId"`, `"tenant id"`…), for error codes.
    pub fn what(&self) -> &'static str {
        match self {
            IdError::Empty { what }
            | IdError::TooLong { what, .. }
            | IdError::InvalidChar { what, .. }
            | IdError::DotSegment { what } => what,
        }
    }
}

fn check(
    value: &str,
    what: &'static str,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    let len = value.chars().count();
    if len > max {
        return Err(IdError::TooLong { what, max, len });
    }
    if let Some((position, found)) = value.chars().enumerate().find(|(_, c)| !ok(*c)) {
        return Err(IdError::InvalidChar {
            what,
            allowed,
            found,
            position,
        });
    }
    if value == "." || value == ".." {
        return Err(IdError::DotSegment { what });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $allowed:literal, $ok:expr) => {
        $(#[$doc])*
        ///
        /// Shared, not copied: ids travel with every telemetry point, event and frame, so a
        /// clone is a reference count, not an allocation.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Longest accepted value, in characters.
            pub const MAX_LEN: usize = $max;

            /// Validates `value` and wraps it.
            pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check(&value, $what, $max, $allowed, $ok)?;
                Ok(Self(Arc::from(value)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::parse(raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

fn device_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')
}

fn tenant_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_')
}

string_id!(
    /// A device's id, unique within its tenant: 1–128 of `A-Z a-z 0-9 - _ . :`.
    DeviceId,
    "deviceId",
    128,
    "letters, digits, '-', '_', '.' and ':'",
    device_char
);

string_id!(
    /// A tenant's id: 1–64 of `a-z 0-9 - _`.
    TenantId,
    "tenant id",
    64,
    "lowercase letters, digits, '-' and '_'",
    tenant_char
);

string_id!(
    /// A device group's name, unique within its tenant: 1–64 of `A-Z a-z 0-9 - _ . :`.
    GroupName,
    "group name",
    64,
    "letters, digits, '-', '_', '.' and ':'",
    device_char
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_seed_style_ids() {
        assert_eq!(DeviceId::parse("sensor-001").unwrap().as_str(), "sensor-001");
        assert!(DeviceId::parse("plant.A:line_2").is_ok());
        assert!(TenantId::parse("acme-corp_1").is_ok());
    }

    #[test]
    fn rejects_mqtt_and_url_metacharacters() {
        for bad in ["a/b", "a+b", "a#b", "$sys", "a b", "ü"] {
            let err = DeviceId::parse(bad).unwrap_err();
            assert!(matches!(err, IdError::InvalidChar { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn rejects_empty_and_overlong() {
        assert_eq!(
            DeviceId::parse("").unwrap_err(),
            IdError::Empty { what: "deviceId" }
        );
        let long = "x".repeat(129);
        assert!(matches!(
            DeviceId::parse(long).unwrap_err(),
            IdError::TooLong {
                max: 128,
                len: 129,
                ..
            }
        ));
        assert!(DeviceId::parse("x".repeat(128)).is_ok());
    }

    #[test]
    fn rejects_dot_segments() {
        for bad in [".", ".."] {
            assert_eq!(
                DeviceId::parse(bad).unwrap_err(),
                IdError::DotSegment { what: "deviceId" }
            );
            assert!(GroupName::parse(bad).is_err());
        }
        assert!(DeviceId::parse("...").is_ok());
        assert!(DeviceId::parse(".hidden").is_ok());
    }

    #[test]
    fn tenant_ids_are_lowercase() {
        assert!(TenantId::parse("Acme").is_err());
    }

    #[test]
    fn deserialize_validates() {
        let err = serde_json::from_str::<DeviceId>("\"a/b\"").unwrap_err();
        assert!(err.to_string().contains("deviceId may only contain"));
    }
}
