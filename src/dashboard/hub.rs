//! `DashboardHub`: where live events (alarms opening, escalating, clearing) are published for
//! the `/ws` sessions. A broadcast channel: a session that falls behind skips events (it is told
//! how many) rather than holding memory for them.

use std::sync::Arc;

use drover_actors::TenantId;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::rules::view::AlarmView;

/// What the live stream carries (one JSON text frame each).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum LiveMessage {
    /// Sent first: whose stream this is.
    Hello { tenant: String },
    /// An alarm changed: `event` is opened, updated, escalated, acknowledged or cleared.
    Alarm {
        event: &'static str,
        alarm: Box<AlarmView>,
    },
    /// The session fell behind and missed `missed` events.
    Lagged { missed: u64 },
}

/// One event of one tenant, serialised once for every session.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    pub tenant: TenantId,
    pub json: Arc<str>,
}

#[derive(Debug, Clone)]
pub struct DashboardHub {
    sender: broadcast::Sender<LiveEvent>,
}

impl Default for DashboardHub {
    fn default() -> Self {
        DashboardHub::new(4096)
    }
}

impl DashboardHub {
    pub fn new(capacity: usize) -> DashboardHub {
        DashboardHub {
            sender: broadcast::channel(capacity).0,
        }
    }

    pub fn publish(&self, tenant: &TenantId, message: &LiveMessage) {
        if self.sender.receiver_count() == 0 {
            return;
        }
        if let Ok(json) = serde_json::to_string(message) {
            let _ = self.sender.send(LiveEvent {
                tenant: tenant.clone(),
                json: json.into(),
            });
        }
    }

    pub fn alarm(&self, event: &'static str, alarm: AlarmView) {
        let tenant = alarm.tenant.clone();
        self.publish(
            &tenant,
            &LiveMessage::Alarm {
                event,
                alarm: Box::new(alarm),
            },
        );
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.sender.subscribe()
    }

    pub fn sessions(&self) -> usize {
        self.sender.receiver_count()
    }
}
