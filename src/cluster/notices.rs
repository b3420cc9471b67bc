//! What every node must hear: connections to close (device deleted, token rotated, key
//! revoked, tenant disabled), access rules and CAs to reload. Published on `notices`; each node
//! acts on the others' notices (it acted on its own already).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Cluster;
use super::wire::parse_namespace;
use crate::mqtt::broker::Kick;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Notice {
    /// Close these connections; a device's actor stops too (it restarts from storage).
    Kick { kick: Kick, reason: u8, message: String },
    /// A namespace's MQTT access rules changed.
    Acl { namespace: String },
    /// Device CAs were added or removed.
    Cas,
    /// A tenant's rules changed: the rule actors reload them.
    Rules { tenant: String },
    /// An operator cleared an alarm: the device's rule state may raise a new one.
    AlarmClosed {
        tenant: String,
        rule_id: String,
        device: String,
    },
    /// A device type's schema changed: its device actors reload it.
    DeviceType { tenant: String, device_type: String },
}

/// Applies the notices that concern the rest of the platform (rules, device types), set by the
/// server once its parts exist.
pub type NoticeHook = Box<dyn Fn(&Notice) + Send + Sync>;

#[derive(Serialize, Deserialize)]
struct Envelope {
    from: String,
    notice: Notice,
}

impl Cluster {
    /// Where the notices about rules and device types go (once, at start).
    pub fn set_notice_hook(&self, hook: NoticeHook) {
        let _ = self.notice_hook.set(hook);
    }

    /// Tells the other nodes; best effort (a node that misses it while Redis is away keeps
    /// what it had: kicked clients are refused at their next connect anyway).
    pub fn notify(self: &Arc<Self>, notice: Notice) {
        let envelope = Envelope {
            from: self.node_id.clone(),
            notice,
        };
        let channel = self.key("notices");
        let cluster = self.clone();
        actix_rt::spawn(async move {
            let mut conn = cluster.conn.clone();
            let sent: redis::RedisResult<()> = redis::cmd("PUBLISH")
                .arg(channel)
                .arg(serde_json::to_string(&envelope).unwrap_or_default())
                .query_async(&mut conn)
                .await;
            if let Err(error) = sent {
                cluster.set_redis_up(false, &error);
            }
        });
    }

    /// A notice from another node.
    pub(super) fn heard(self: &Arc<Self>, payload: &[u8]) {
        let Ok(envelope) = serde_json::from_slice::<Envelope>(payload) else {
            return;
        };
        if envelope.from == self.node_id {
            return;
        }
        let cluster = self.clone();
        actix_rt::spawn(async move { cluster.act_on(envelope.notice).await });
    }

    async fn act_on(&self, notice: Notice) {
        match notice {
            Notice::Kick {
                kick,
                reason,
                message,
            } => {
                self.broker.kick_here(&kick, reason, &message);
                if let Kick::Device { tenant, device } = &kick
                    && let (Ok(tenant), Ok(device)) = (
                        drover_actors::TenantId::parse(tenant.as_str()),
                        drover_actors::DeviceId::parse(device.as_str()),
                    )
                {
                    let _ = self.fleet.stop_device(&tenant, &device).await;
                }
            }
            Notice::Acl { namespace } => {
                let Some(namespace) = parse_namespace(&namespace) else {
                    return;
                };
                // Only namespaces this node has loaded; the others load fresh at first use.
                if self.broker.acl_rules(&namespace).is_none() {
                    return;
                }
                let Some(ctx) = self.context() else { return };
                let tenant = match &namespace {
                    crate::mqtt::acl::Namespace::Tenant(t) => Some(t.clone()),
                    crate::mqtt::acl::Namespace::Anonymous => None,
                };
                match ctx.registry.list_acl_rules(tenant.as_ref()).await {
                    Ok(rules) => {
                        self.broker.set_acl_rules(namespace, rules);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not reload MQTT access rules another node changed")
                    }
                }
            }
            Notice::Cas => {
                let Some(ctx) = self.context() else { return };
                if let Err(error) = ctx.auth.reload_cas().await {
                    tracing::warn!(%error, "could not reload device CAs another node changed");
                }
            }
            other => {
                if let Some(hook) = self.notice_hook.get() {
                    hook(&other);
                }
            }
        }
    }
}

impl crate::mqtt::connection::MqttContext {
    /// Tells the other nodes of a cluster, if this node is in one.
    pub fn tell_cluster(&self, notice: Notice) {
        if let Some(cluster) = self.cluster.get() {
            cluster.notify(notice);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_travel_as_tagged_json() {
        let notice = Notice::Kick {
            kick: Kick::Device {
                tenant: "acme".into(),
                device: "d1".into(),
            },
            reason: 0x98,
            message: "device deleted".into(),
        };
        let text = serde_json::to_string(&Envelope {
            from: "n1".into(),
            notice: notice.clone(),
        })
        .unwrap();
        assert!(text.contains(r#""op":"kick""#), "{text}");
        assert!(text.contains(r#""kind":"device""#), "{text}");
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.notice, notice);
    }
}
