//! Who may publish and subscribe where.
//!
//! Devices follow a built-in rule: they may only use their own `devices/{id}/…`, and may not
//! publish the topics the platform answers on (shadow replies, commands to themselves).
//! Applications (API keys) and anonymous clients follow the rules managed through the API,
//! first matching rule by priority; without a matching rule applications may subscribe to
//! anything in their tenant and publish if their role is operator or admin, and anonymous
//! clients may do anything in their own namespace. Nobody publishes to `$` topics.

use drover_actors::{DeviceId, Role, TenantId};

use super::topic::{self, DeviceTopic};
use crate::storage::records::{AclAction, AclEffect, AclRule, AclSubject};

/// The topic space a client lives in: a tenant's, or the one shared by anonymous clients.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Namespace {
    Tenant(TenantId),
    Anonymous,
}

/// An authenticated MQTT client.
#[derive(Debug, Clone, PartialEq)]
pub enum Identity {
    Device {
        tenant: TenantId,
        device: DeviceId,
    },
    Application {
        tenant: TenantId,
        key_id: String,
        role: Role,
    },
    Anonymous,
}

impl Identity {
    pub fn namespace(&self) -> Namespace {
        match self {
            Identity::Device { tenant, .. } | Identity::Application { tenant, .. } => {
                Namespace::Tenant(tenant.clone())
            }
            Identity::Anonymous => Namespace::Anonymous,
        }
    }

    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            Identity::Device { tenant, .. } | Identity::Application { tenant, .. } => Some(tenant),
            Identity::Anonymous => None,
        }
    }

    /// `device:<id>`, `key:<id>` or `anonymous`, as logs and the audit log name clients.
    pub fn label(&self) -> String {
        match self {
            Identity::Device { device, .. } => format!("device:{device}"),
            Identity::Application { key_id, .. } => format!("key:{key_id}"),
            Identity::Anonymous => "anonymous".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Publish,
    Subscribe,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(String),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Decides one publish (`topic` is a topic name) or subscribe (`topic` is a filter, without
/// any `$share/<group>/` prefix). `rules` are the rules of the client's namespace, in order.
pub fn authorize(identity: &Identity, access: Access, topic: &str, rules: &[AclRule]) -> Decision {
    if access == Access::Publish && topic.starts_with('$') {
        return Decision::Deny("topics starting with $ are reserved".into());
    }
    if access == Access::Publish && is_platform_reply(topic) {
        return Decision::Deny("shadow replies are published by the platform only".into());
    }
    match identity {
        Identity::Device { device, .. } => device_rule(device.as_str(), access, topic),
        Identity::Application { key_id, role, .. } => {
            let applies = |s: &AclSubject| match s {
                AclSubject::Role(r) => r == role,
                AclSubject::ApiKey(id) => id == key_id,
                AclSubject::Anonymous => false,
            };
            first_rule(rules, applies, access, topic).unwrap_or_else(|| match access {
                Access::Subscribe => Decision::Allow,
                Access::Publish if role.allows(Role::Operator) => Decision::Allow,
                Access::Publish => Decision::Deny("viewer keys may not publish".into()),
            })
        }
        Identity::Anonymous => {
            first_rule(rules, |s| *s == AclSubject::Anonymous, access, topic).unwrap_or(Decision::Allow)
        }
    }
}

/// `devices/{id}/shadow/…/accepted|rejected|delta|documents`.
fn is_platform_reply(name: &str) -> bool {
    let Some(DeviceTopic::Other { device }) = DeviceTopic::parse(name) else {
        return false;
    };
    let tail = &name["devices/".len() + device.len() + 1..];
    tail.starts_with("shadow/")
}

fn device_rule(device: &str, access: Access, topic: &str) -> Decision {
    match access {
        Access::Subscribe if topic::filter_within_device(topic, device) => Decision::Allow,
        Access::Subscribe => Decision::Deny(format!("a device may only subscribe under devices/{device}/")),
        Access::Publish => match DeviceTopic::parse(topic) {
            Some(t) if t.device() != device => {
                Decision::Deny(format!("a device may only publish under devices/{device}/"))
            }
            None => Decision::Deny(format!("a device may only publish under devices/{device}/")),
            Some(DeviceTopic::Other { .. })
                if topic[("devices/".len() + device.len() + 1)..].starts_with("commands/") =>
            {
                Decision::Deny(
                    "commands are sent to a device, not by it; answer on commands/{name}/response".into(),
                )
            }
            Some(_) => Decision::Allow,
        },
    }
}

fn first_rule(
    rules: &[AclRule],
    applies: impl Fn(&AclSubject) -> bool,
    access: Access,
    topic: &str,
) -> Option<Decision> {
    rules
        .iter()
        .filter(|r| applies(&r.subject))
        .filter(|r| {
            matches!(
                (r.action, access),
                (AclAction::All, _)
                    | (AclAction::Publish, Access::Publish)
                    | (AclAction::Subscribe, Access::Subscribe)
            )
        })
        .find(|r| match (access, r.effect) {
            (Access::Publish, _) => topic::matches(&r.topic, topic),
            // Allowing a subscription needs a rule covering all of it; refusing it, any overlap.
            (Access::Subscribe, AclEffect::Allow) => filter_covers(&r.topic, topic),
            (Access::Subscribe, AclEffect::Deny) => filters_overlap(&r.topic, topic),
        })
        .map(|r| match r.effect {
            AclEffect::Allow => Decision::Allow,
            AclEffect::Deny => Decision::Deny(format!("denied by access rule {}", r.id)),
        })
}

/// Whether every topic that `specific` matches is matched by `general` (both valid filters).
pub fn filter_covers(general: &str, specific: &str) -> bool {
    let mut g = general.split('/');
    let mut s = specific.split('/');
    loop {
        match (g.next(), s.next()) {
            (Some("#"), _) => return true,
            (_, Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            // `a/#` covers `a`.
            (Some(rest), None) => return rest == "#" && g.next().is_none(),
            _ => return false,
        }
    }
}

/// Whether some topic name is matched by both filters.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            (Some(rest), None) | (None, Some(rest)) => return rest == "#",
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn device(id: &str) -> Identity {
        Identity::Device {
            tenant: TenantId::parse("t").unwrap(),
            device: DeviceId::parse(id).unwrap(),
        }
    }

    fn app(role: Role) -> Identity {
        Identity::Application {
            tenant: TenantId::parse("t").unwrap(),
            key_id: "k1".into(),
            role,
        }
    }

    fn rule(
        subject: AclSubject,
        action: AclAction,
        topic: &str,
        effect: AclEffect,
        priority: i32,
    ) -> AclRule {
        AclRule {
            id: format!("r-{topic}"),
            tenant: None,
            subject,
            action,
            topic: topic.into(),
            effect,
            priority,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn devices_stay_under_their_own_prefix() {
        let d = device("s1");
        for ok in [
            "devices/s1/telemetry",
            "devices/s1/shadow/update",
            "devices/s1/shadow/get",
            "devices/s1/commands/reboot/response",
            "devices/s1/events/door",
        ] {
            assert!(authorize(&d, Access::Publish, ok, &[]).is_allowed(), "{ok}");
        }
        for bad in [
            "devices/s2/telemetry",
            "other/topic",
            "devices/s1/shadow/update/accepted",
            "devices/s1/shadow/update/delta",
            "devices/s1/commands/reboot",
            "$SYS/x",
        ] {
            assert!(!authorize(&d, Access::Publish, bad, &[]).is_allowed(), "{bad}");
        }
        assert!(authorize(&d, Access::Subscribe, "devices/s1/#", &[]).is_allowed());
        assert!(authorize(&d, Access::Subscribe, "devices/s1/shadow/update/delta", &[]).is_allowed());
        assert!(!authorize(&d, Access::Subscribe, "devices/+/telemetry", &[]).is_allowed());
        assert!(!authorize(&d, Access::Subscribe, "#", &[]).is_allowed());
    }

    #[test]
    fn application_defaults_follow_the_role() {
        assert!(authorize(&app(Role::Viewer), Access::Subscribe, "devices/+/telemetry", &[]).is_allowed());
        assert!(
            !authorize(
                &app(Role::Viewer),
                Access::Publish,
                "devices/s1/commands/reboot",
                &[]
            )
            .is_allowed()
        );
        assert!(
            authorize(
                &app(Role::Operator),
                Access::Publish,
                "devices/s1/commands/reboot",
                &[]
            )
            .is_allowed()
        );
        assert!(
            !authorize(
                &app(Role::Admin),
                Access::Publish,
                "devices/s1/shadow/update/accepted",
                &[]
            )
            .is_allowed()
        );
    }

    #[test]
    fn rules_apply_in_order_to_their_subjects() {
        let rules = vec![
            rule(
                AclSubject::ApiKey("k1".into()),
                AclAction::Subscribe,
                "alerts/#",
                AclEffect::Allow,
                10,
            ),
            rule(
                AclSubject::Role(Role::Operator),
                AclAction::Subscribe,
                "alerts/#",
                AclEffect::Deny,
                20,
            ),
            rule(
                AclSubject::Role(Role::Operator),
                AclAction::Publish,
                "devices/+/commands/#",
                AclEffect::Deny,
                30,
            ),
            rule(
                AclSubject::Role(Role::Viewer),
                AclAction::All,
                "public/#",
                AclEffect::Allow,
                40,
            ),
        ];
        let op = app(Role::Operator);
        assert!(
            authorize(&op, Access::Subscribe, "alerts/fire", &rules).is_allowed(),
            "key rule first"
        );
        let other_op = Identity::Application {
            tenant: TenantId::parse("t").unwrap(),
            key_id: "k2".into(),
            role: Role::Operator,
        };
        assert!(!authorize(&other_op, Access::Subscribe, "alerts/fire", &rules).is_allowed());
        // A broader filter overlapping a denied one is refused.
        assert!(!authorize(&other_op, Access::Subscribe, "#", &rules).is_allowed());
        assert!(!authorize(&op, Access::Publish, "devices/s1/commands/reboot", &rules).is_allowed());
        assert!(authorize(&op, Access::Publish, "devices/s1/events", &rules).is_allowed());
        assert!(authorize(&app(Role::Viewer), Access::Publish, "public/news", &rules).is_allowed());
    }

    #[test]
    fn anonymous_rules() {
        let rules = vec![rule(
            AclSubject::Anonymous,
            AclAction::Publish,
            "#",
            AclEffect::Deny,
            1,
        )];
        assert!(!authorize(&Identity::Anonymous, Access::Publish, "a/b", &rules).is_allowed());
        assert!(authorize(&Identity::Anonymous, Access::Subscribe, "a/b", &rules).is_allowed());
        assert!(authorize(&Identity::Anonymous, Access::Publish, "a/b", &[]).is_allowed());
    }

    #[test]
    fn covering_and_overlapping_filters() {
        assert!(filter_covers("#", "a/b"));
        assert!(filter_covers("a/#", "a"));
        assert!(filter_covers("a/#", "a/+/c"));
        assert!(filter_covers("a/+", "a/b"));
        assert!(filter_covers("a/+", "a/+"));
        assert!(!filter_covers("a/b", "a/+"));
        assert!(!filter_covers("a/+", "a/#"));
        assert!(!filter_covers("a/+", "a/b/c"));
        assert!(!filter_covers("a/b", "a"));
        assert!(filters_overlap("#", "x"));
        assert!(filters_overlap("a/+", "+/b"));
        assert!(filters_overlap("a/#", "a"));
        assert!(!filters_overlap("a/b", "a/c"));
        assert!(!filters_overlap("a/+", "a/b/c"));
        assert!(filters_overlap("a/+/c", "a/b/#"));
    }
}
