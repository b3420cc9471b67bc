//! Who may publish and subscribe where.
//!
//! Devices follow a built-in rule: they may only use their own `devices/{id}/…`, and may not
//! publish the topics the platform answers on (shadow replies, commands to themselves).
//! Applications (API keys) and anonymous clients follow the rules managed through the API,
//! first matching rule by priority; without a matching rule applications may subscribe to
//! anything in their tenant and publish if their role is operator or admin, and anonymous
//! clients may do anything in their own namespace. Nobody publishes to `$` topics.
//!
//! As in Mosquitto and EMQX, a deny rule refuses a subscription only when the subscription lies
//! wholly inside the denied filter; a subscription that merely overlaps one (`#` and a rule on
//! `test/secret`) is granted, and the denied topics' messages are withheld at delivery
//! ([`may_read`], decided once per session and topic by the broker).

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

/// What the access rules say about a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeDecision {
    /// Every topic the filter matches may be read.
    Allow,
    /// Some topics the filter matches are denied: the subscription is granted and each topic
    /// is checked with [`may_read`] before a message on it is delivered.
    AllowChecked,
    /// Every topic the filter matches is denied.
    Deny(String),
}

/// Decides one publish (`topic` is a topic name) or subscribe (`topic` is a filter, without
/// any `$share/<group>/` prefix). `rules` are the rules of the client's namespace, in order.
/// A subscription is denied only when all of it is (see [`subscription`]).
pub fn authorize(identity: &Identity, access: Access, topic: &str, rules: &[AclRule]) -> Decision {
    if access == Access::Subscribe {
        return match subscription(identity, topic, rules) {
            SubscribeDecision::Deny(why) => Decision::Deny(why),
            SubscribeDecision::Allow | SubscribeDecision::AllowChecked => Decision::Allow,
        };
    }
    if topic.starts_with('$') {
        return Decision::Deny("topics starting with $ are reserved".into());
    }
    if is_platform_reply(topic) {
        return Decision::Deny("shadow replies are published by the platform only".into());
    }
    let (subject, default) = match identity {
        Identity::Device { device, .. } => return device_rule(device.as_str(), access, topic),
        Identity::Application { key_id, role, .. } => (
            SubjectMatch::Application { key_id, role },
            if role.allows(Role::Operator) {
                Decision::Allow
            } else {
                Decision::Deny("viewer keys may not publish".into())
            },
        ),
        Identity::Anonymous => (SubjectMatch::Anonymous, Decision::Allow),
    };
    rules
        .iter()
        .filter(|r| subject.applies(&r.subject) && matches!(r.action, AclAction::All | AclAction::Publish))
        .find(|r| topic::matches(&r.topic, topic))
        .map_or(default, |r| match r.effect {
            AclEffect::Allow => Decision::Allow,
            AclEffect::Deny => Decision::Deny(format!("denied by access rule {}", r.id)),
        })
}

/// Decides a subscription to a valid `filter` (without any `$share/<group>/` prefix): the
/// rules apply in order, and the first one containing the whole filter decides what is left;
/// rules before it that merely overlap the filter allow or deny part of it.
pub fn subscription(identity: &Identity, filter: &str, rules: &[AclRule]) -> SubscribeDecision {
    let applies = match identity {
        Identity::Device { device, .. } => {
            return match device_rule(device.as_str(), Access::Subscribe, filter) {
                Decision::Allow => SubscribeDecision::Allow,
                Decision::Deny(why) => SubscribeDecision::Deny(why),
            };
        }
        Identity::Application { key_id, role, .. } => SubjectMatch::Application { key_id, role },
        Identity::Anonymous => SubjectMatch::Anonymous,
    };
    let mut partly_denied = false;
    let mut partly_allowed = false;
    for rule in read_rules(rules, &applies) {
        if filter_contains(&rule.topic, filter) {
            return match rule.effect {
                AclEffect::Allow if partly_denied => SubscribeDecision::AllowChecked,
                AclEffect::Allow => SubscribeDecision::Allow,
                AclEffect::Deny if partly_allowed => SubscribeDecision::AllowChecked,
                AclEffect::Deny => SubscribeDecision::Deny(format!("denied by access rule {}", rule.id)),
            };
        }
        if filters_overlap(&rule.topic, filter) {
            match rule.effect {
                AclEffect::Allow => partly_allowed = true,
                AclEffect::Deny => partly_denied = true,
            }
        }
    }
    // Without a rule, applications and anonymous clients may subscribe to anything.
    if partly_denied {
        SubscribeDecision::AllowChecked
    } else {
        SubscribeDecision::Allow
    }
}

/// Whether a message on topic `name` may be delivered to a subscriber (Mosquitto's read
/// check): the first rule whose filter matches the name decides; without one, it may.
/// Devices read only under their own prefix, which their subscriptions already ensure.
pub fn may_read(identity: &Identity, name: &str, rules: &[AclRule]) -> bool {
    let applies = match identity {
        Identity::Device { .. } => return true,
        Identity::Application { key_id, role, .. } => SubjectMatch::Application { key_id, role },
        Identity::Anonymous => SubjectMatch::Anonymous,
    };
    read_rules(rules, &applies)
        .find(|rule| topic::matches(&rule.topic, name))
        .is_none_or(|rule| rule.effect == AclEffect::Allow)
}

/// Who the rules are matched against.
enum SubjectMatch<'a> {
    Application { key_id: &'a str, role: &'a Role },
    Anonymous,
}

impl SubjectMatch<'_> {
    fn applies(&self, subject: &AclSubject) -> bool {
        match (self, subject) {
            (SubjectMatch::Application { role, .. }, AclSubject::Role(r)) => r == *role,
            (SubjectMatch::Application { key_id, .. }, AclSubject::ApiKey(id)) => id == key_id,
            (SubjectMatch::Anonymous, AclSubject::Anonymous) => true,
            _ => false,
        }
    }
}

/// The rules about reading (subscribe or all) that apply to a subject, in order.
fn read_rules<'r>(rules: &'r [AclRule], subject: &SubjectMatch<'_>) -> impl Iterator<Item = &'r AclRule> {
    rules.iter().filter(move |r| {
        subject.applies(&r.subject) && matches!(r.action, AclAction::All | AclAction::Subscribe)
    })
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
            Some(DeviceTopic::Other { .. })
                if topic[("devices/".len() + device.len() + 1)..].starts_with("jobs/notify") =>
            {
                Decision::Deny("jobs are sent to a device, not by it; report on jobs/{jobId}/update".into())
            }
            Some(_) => Decision::Allow,
        },
    }
}

/// Whether a topic filter level is a wildcard.
fn is_wildcard(level: &str) -> bool {
    level == "+" || level == "#"
}

/// Whether a filter can only match `$` topics (its first level is literal and starts with `$`),
/// which filters starting with a wildcard never match (MQTT 5.0 §4.7.2).
fn dollar_only(filter: &str) -> bool {
    filter.starts_with('$')
}

/// Whether every topic name that the valid filter `inner` matches is matched by the valid
/// filter `outer` too: `#` contains everything but `$` topics, `a/+` contains `a/b`, `a/#`
/// contains `a`.
pub fn filter_contains(outer: &str, inner: &str) -> bool {
    let outer_first = outer.split('/').next().unwrap_or_default();
    if dollar_only(inner) && is_wildcard(outer_first) {
        return false;
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (_, Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            // `a/#` contains `a`.
            (Some(rest), None) => return rest == "#" && o.next().is_none(),
            _ => return false,
        }
    }
}

/// Whether some topic name is matched by both valid filters.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let first = |f: &str| f.split('/').next().unwrap_or_default().to_string();
    if (dollar_only(a) && is_wildcard(&first(b))) || (dollar_only(b) && is_wildcard(&first(a))) {
        return false;
    }
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
        // A broader filter overlapping a denied one is granted; the denied topics are withheld.
        assert_eq!(
            subscription(&other_op, "#", &rules),
            SubscribeDecision::AllowChecked
        );
        assert!(!may_read(&other_op, "alerts/fire", &rules));
        assert!(may_read(&other_op, "devices/s1/telemetry", &rules));
        assert_eq!(subscription(&op, "#", &rules), SubscribeDecision::AllowChecked);
        assert!(may_read(&op, "alerts/fire", &rules), "key rule first");
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
    fn containment_of_filters() {
        // `#` contains everything but `$` topics.
        for inner in ["a", "a/b", "+", "+/b", "#", "a/#", "/"] {
            assert!(filter_contains("#", inner), "{inner}");
        }
        assert!(!filter_contains("#", "$SYS/#"));
        assert!(!filter_contains("#", "$SYS"));
        assert!(!filter_contains("+/broker", "$SYS/broker"));
        assert!(filter_contains("$SYS/#", "$SYS/broker/+"));
        assert!(filter_contains("$SYS/+", "$SYS/broker"));
        assert!(!filter_contains("$SYS/#", "#"));
        // `+` is one level; `a/+` contains `a/b` and itself, not the reverse.
        assert!(filter_contains("a/+", "a/b"));
        assert!(filter_contains("a/+", "a/+"));
        assert!(!filter_contains("a/b", "a/+"));
        assert!(!filter_contains("a/+", "a/b/c"));
        assert!(!filter_contains("a/+", "a"));
        assert!(!filter_contains("a/+", "a/#"));
        // `a/#` contains `a` and everything below it.
        assert!(filter_contains("a/#", "a"));
        assert!(filter_contains("a/#", "a/+/c"));
        assert!(filter_contains("a/#", "a/#"));
        assert!(!filter_contains("a/b/#", "a/#"));
        assert!(!filter_contains("a/b", "a"));
        assert!(!filter_contains("a", "a/b"));
        assert!(filter_contains("test/nosubscribe", "test/nosubscribe"));
        assert!(!filter_contains("test/nosubscribe", "+/+"));
    }

    #[test]
    fn overlap_of_filters() {
        assert!(filters_overlap("#", "x"));
        assert!(filters_overlap("a/+", "+/b"));
        assert!(filters_overlap("a/#", "a"));
        assert!(!filters_overlap("a/b", "a/c"));
        assert!(!filters_overlap("a/+", "a/b/c"));
        assert!(filters_overlap("a/+/c", "a/b/#"));
        assert!(filters_overlap("test/nosubscribe", "+/+"));
        assert!(filters_overlap("$SYS/#", "$SYS/+"));
        assert!(!filters_overlap("#", "$SYS/#"));
        assert!(!filters_overlap("$SYS/a", "+/a"));
    }

    #[test]
    fn a_narrow_deny_rule_withholds_topics_without_refusing_wildcards() {
        let rules = vec![rule(
            AclSubject::Anonymous,
            AclAction::Subscribe,
            "test/nosubscribe",
            AclEffect::Deny,
            1,
        )];
        let anon = Identity::Anonymous;
        for filter in ["#", "+/+", "test/#", "test/+", "+/nosubscribe"] {
            assert_eq!(
                subscription(&anon, filter, &rules),
                SubscribeDecision::AllowChecked,
                "{filter}"
            );
        }
        assert!(matches!(
            subscription(&anon, "test/nosubscribe", &rules),
            SubscribeDecision::Deny(_)
        ));
        for filter in ["test/other", "other/#", "+", "$SYS/#"] {
            assert_eq!(
                subscription(&anon, filter, &rules),
                SubscribeDecision::Allow,
                "{filter}"
            );
        }
        assert!(!may_read(&anon, "test/nosubscribe", &rules));
        assert!(may_read(&anon, "test/other", &rules));
        assert!(may_read(&anon, "test/nosubscribe/deeper", &rules));
        // Publishing is another action.
        assert!(authorize(&anon, Access::Publish, "test/nosubscribe", &rules).is_allowed());
    }

    #[test]
    fn earlier_rules_carve_out_parts_of_a_later_one() {
        let viewer = app(Role::Viewer);
        // Allow a/b, deny a/#: a/+ is granted for a/b only.
        let rules = vec![
            rule(
                AclSubject::Role(Role::Viewer),
                AclAction::Subscribe,
                "a/b",
                AclEffect::Allow,
                1,
            ),
            rule(
                AclSubject::Role(Role::Viewer),
                AclAction::All,
                "a/#",
                AclEffect::Deny,
                2,
            ),
        ];
        assert_eq!(
            subscription(&viewer, "a/+", &rules),
            SubscribeDecision::AllowChecked
        );
        assert!(may_read(&viewer, "a/b", &rules));
        assert!(!may_read(&viewer, "a/c", &rules));
        assert!(matches!(
            subscription(&viewer, "a/c/#", &rules),
            SubscribeDecision::Deny(_)
        ));
        assert_eq!(subscription(&viewer, "a/b", &rules), SubscribeDecision::Allow);
        // Deny a/secret, allow a/#: a/# is granted without a/secret.
        let rules = vec![
            rule(
                AclSubject::Role(Role::Viewer),
                AclAction::Subscribe,
                "a/secret",
                AclEffect::Deny,
                1,
            ),
            rule(
                AclSubject::Role(Role::Viewer),
                AclAction::Subscribe,
                "a/#",
                AclEffect::Allow,
                2,
            ),
        ];
        assert_eq!(
            subscription(&viewer, "a/#", &rules),
            SubscribeDecision::AllowChecked
        );
        assert!(!may_read(&viewer, "a/secret", &rules));
        // Rules of other subjects and publish rules do not count.
        assert_eq!(
            subscription(&app(Role::Operator), "a/#", &rules),
            SubscribeDecision::Allow
        );
        let publish_only = vec![rule(
            AclSubject::Role(Role::Viewer),
            AclAction::Publish,
            "#",
            AclEffect::Deny,
            1,
        )];
        assert_eq!(
            subscription(&viewer, "#", &publish_only),
            SubscribeDecision::Allow
        );
        assert!(may_read(&viewer, "x", &publish_only));
        // Devices follow their own rule.
        assert_eq!(
            subscription(&device("s1"), "devices/s1/#", &rules),
            SubscribeDecision::Allow
        );
        assert!(matches!(
            subscription(&device("s1"), "#", &[]),
            SubscribeDecision::Deny(_)
        ));
    }
}
