//! MQTT topic names and filters: validation, matching and the platform's typed device topics.
//!
//! Rules (MQTT 3.1.1 §4.7 and 5.0 §4.7): names and filters are 1..=65535 bytes of UTF-8 without
//! U+0000; names carry no wildcards; in filters `#` is alone in the last level and `+` is alone
//! in its level; filters starting with a wildcard do not match names starting with `$`.
//! Shared subscriptions are `$share/<group>/<filter>` (MQTT 5.0 §4.8.2).

use std::fmt;

pub const MAX_TOPIC_BYTES: usize = 65_535;

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic must not be empty")]
    Empty,
    #[error("topic is longer than {MAX_TOPIC_BYTES} bytes")]
    TooLong,
    #[error("topic must not contain U+0000")]
    Null,
    #[error("a topic name must not contain wildcards (+ or #)")]
    WildcardInName,
    #[error("'#' must be the last level of a filter and alone in it")]
    BadMultiLevel,
    #[error("'+' must be alone in its level")]
    BadSingleLevel,
    #[error("a shared subscription is $share/<group>/<filter> with a non-empty group without wildcards")]
    BadShare,
}

fn check_common(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong);
    }
    if topic.contains('\0') {
        return Err(TopicError::Null);
    }
    Ok(())
}

/// Checks a topic name (what a PUBLISH carries).
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    check_common(name)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter (what a SUBSCRIBE carries), without the `$share` prefix.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != last) {
            return Err(TopicError::BadMultiLevel);
        }
        if level.contains('+') && *level != "+" {
            return Err(TopicError::BadSingleLevel);
        }
    }
    Ok(())
}

/// A subscription filter, possibly shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subscription {
    /// The share group of `$share/<group>/<filter>`, if shared.
    pub share: Option<String>,
    pub filter: String,
}

impl Subscription {
    /// Parses and validates what a SUBSCRIBE or UNSUBSCRIBE names.
    pub fn parse(raw: &str) -> Result<Subscription, TopicError> {
        if let Some(rest) = raw.strip_prefix("$share/") {
            let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(TopicError::BadShare);
            }
            validate_filter(filter)?;
            return Ok(Subscription {
                share: Some(group.to_string()),
                filter: filter.to_string(),
            });
        }
        validate_filter(raw)?;
        Ok(Subscription {
            share: None,
            filter: raw.to_string(),
        })
    }
}

impl fmt::Display for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.share {
            Some(group) => write!(f, "$share/{group}/{}", self.filter),
            None => f.write_str(&self.filter),
        }
    }
}

/// Whether a valid `filter` matches a valid topic `name`.
pub fn matches(filter: &str, name: &str) -> bool {
    // A wildcard in the first level never matches a `$` topic.
    if name.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The topics with a meaning for the platform, under `devices/{id}/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTopic<'a> {
    /// `devices/{id}/telemetry`
    Telemetry { device: &'a str },
    /// `devices/{id}/shadow/update`
    ShadowUpdate { device: &'a str },
    /// `devices/{id}/shadow/get`
    ShadowGet { device: &'a str },
    /// `devices/{id}/commands/{name}/response`
    CommandResponse { device: &'a str, command: &'a str },
    /// `devices/{id}/jobs/{job}/update` (OTA job progress)
    JobUpdate { device: &'a str, job: &'a str },
    /// `devices/{id}/jobs/get` (asks for the pending job)
    JobGet { device: &'a str },
    /// Anything else under `devices/{id}/` (shadow replies, commands to the device, custom topics).
    Other { device: &'a str },
}

impl<'a> DeviceTopic<'a> {
    /// Parses a topic name; `None` when it is not under `devices/{id}/`.
    pub fn parse(name: &'a str) -> Option<DeviceTopic<'a>> {
        let rest = name.strip_prefix("devices/")?;
        let (device, tail) = rest.split_once('/')?;
        if device.is_empty() {
            return None;
        }
        Some(match tail.split('/').collect::<Vec<_>>().as_slice() {
            ["telemetry"] => DeviceTopic::Telemetry { device },
            ["shadow", "update"] => DeviceTopic::ShadowUpdate { device },
            ["shadow", "get"] => DeviceTopic::ShadowGet { device },
            ["commands", command, "response"] if !command.is_empty() => {
                DeviceTopic::CommandResponse { device, command }
            }
            ["jobs", job, "update"] if !job.is_empty() => DeviceTopic::JobUpdate { device, job },
            ["jobs", "get"] => DeviceTopic::JobGet { device },
            _ => DeviceTopic::Other { device },
        })
    }

    pub fn device(&self) -> &'a str {
        match self {
            DeviceTopic::Telemetry { device }
            | DeviceTopic::ShadowUpdate { device }
            | DeviceTopic::ShadowGet { device }
            | DeviceTopic::CommandResponse { device, .. }
            | DeviceTopic::JobUpdate { device, .. }
            | DeviceTopic::JobGet { device }
            | DeviceTopic::Other { device } => device,
        }
    }
}

/// Whether every topic `filter` could match lies under `devices/{device}/` (so a device may
/// subscribe to it). Wildcards are allowed only after that prefix.
pub fn filter_within_device(filter: &str, device: &str) -> bool {
    let Some(rest) = filter.strip_prefix("devices/") else {
        return false;
    };
    let Some((first, tail)) = rest.split_once('/') else {
        return false;
    };
    first == device && !tail.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_filters() {
        assert!(validate_name("devices/a/telemetry").is_ok());
        assert!(validate_name("/").is_ok());
        assert_eq!(validate_name("a/+/b"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert_eq!(validate_name("a\0b"), Err(TopicError::Null));
        assert!(validate_filter("a/+/c/#").is_ok());
        assert!(validate_filter("#").is_ok());
        assert!(validate_filter("+").is_ok());
        assert_eq!(validate_filter("a/#/c"), Err(TopicError::BadMultiLevel));
        assert_eq!(validate_filter("a/b#"), Err(TopicError::BadMultiLevel));
        assert_eq!(validate_filter("a/b+/c"), Err(TopicError::BadSingleLevel));
        assert_eq!(validate_name(&"x".repeat(65_536)), Err(TopicError::TooLong));
    }

    #[test]
    fn matching_follows_the_spec_examples() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1/ranking"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(!matches("#", "$SYS/broker"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/broker"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn shared_subscriptions() {
        let s = Subscription::parse("$share/workers/devices/+/telemetry").unwrap();
        assert_eq!(s.share.as_deref(), Some("workers"));
        assert_eq!(s.filter, "devices/+/telemetry");
        assert_eq!(s.to_string(), "$share/workers/devices/+/telemetry");
        assert_eq!(Subscription::parse("$share/workers"), Err(TopicError::BadShare));
        assert_eq!(Subscription::parse("$share//a"), Err(TopicError::BadShare));
        assert_eq!(Subscription::parse("$share/a+/x"), Err(TopicError::BadShare));
        assert_eq!(Subscription::parse("a/b").unwrap().share, None);
    }

    #[test]
    fn device_topics_are_typed() {
        assert_eq!(
            DeviceTopic::parse("devices/s1/jobs/c-1/update"),
            Some(DeviceTopic::JobUpdate {
                device: "s1",
                job: "c-1"
            })
        );
        assert_eq!(
            DeviceTopic::parse("devices/s1/jobs/get"),
            Some(DeviceTopic::JobGet { device: "s1" })
        );
        assert_eq!(
            DeviceTopic::parse("devices/s1/telemetry"),
            Some(DeviceTopic::Telemetry { device: "s1" })
        );
        assert_eq!(
            DeviceTopic::parse("devices/s1/shadow/update"),
            Some(DeviceTopic::ShadowUpdate { device: "s1" })
        );
        assert_eq!(
            DeviceTopic::parse("devices/s1/shadow/get"),
            Some(DeviceTopic::ShadowGet { device: "s1" })
        );
        assert_eq!(
            DeviceTopic::parse("devices/s1/commands/reboot/response"),
            Some(DeviceTopic::CommandResponse {
                device: "s1",
                command: "reboot"
            })
        );
        assert_eq!(
            DeviceTopic::parse("devices/s1/shadow/update/accepted"),
            Some(DeviceTopic::Other { device: "s1" })
        );
        assert_eq!(DeviceTopic::parse("devices/s1"), None);
        assert_eq!(DeviceTopic::parse("devices//telemetry"), None);
        assert_eq!(DeviceTopic::parse("sensors/s1/telemetry"), None);
    }

    #[test]
    fn device_filters_stay_under_the_device() {
        assert!(filter_within_device("devices/s1/#", "s1"));
        assert!(filter_within_device("devices/s1/shadow/update/delta", "s1"));
        assert!(filter_within_device("devices/s1/commands/+", "s1"));
        assert!(!filter_within_device("devices/+/telemetry", "s1"));
        assert!(!filter_within_device("devices/#", "s1"));
        assert!(!filter_within_device("devices/s2/#", "s1"));
        assert!(!filter_within_device("devices/s1", "s1"));
        assert!(!filter_within_device("#", "s1"));
    }
}
