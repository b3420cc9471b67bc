//! An MQTT session: a client's subscriptions and the messages on their way to it, kept across
//! connections when the client asked for a persistent session.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ntex_mqtt::QoS;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::acl::{Identity, Namespace};
use super::message::{Delivery, Outbound};
use super::topic::Subscription;

/// Devices, applications and anonymous clients have separate client-id spaces, so an
/// application cannot take over a device's session by reusing its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientClass {
    Device,
    Application,
    Anonymous,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub namespace: Namespace,
    pub class: ClientClass,
    pub client_id: Arc<str>,
}

/// Options of one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained messages at subscribe; 1: only for a new subscription; 2: never.
    pub retain_handling: u8,
    pub subscription_id: Option<NonZeroU32>,
}

/// The connection currently carrying a session.
pub struct Link {
    pub conn_id: u64,
    pub tx: mpsc::Sender<Outbound>,
}

pub struct SessionState {
    pub subscriptions: HashMap<Subscription, SubOptions>,
    pub link: Option<Link>,
    /// Messages waiting while the client is away (persistent sessions only).
    pub queue: VecDeque<Delivery>,
    /// How long the session outlives its connection; zero: it ends with it.
    pub expiry: Duration,
    pub disconnected_at: Option<Instant>,
    /// Incremented at every connect, so a delayed will can tell the client came back.
    pub generation: u64,
    /// Packet ids of QoS 2 messages received and acknowledged with PUBREC but not yet
    /// released: a resent PUBLISH with one of them (after a reconnect) is not routed again.
    pub qos2_pending: HashSet<u16>,
}

/// What happened to a delivery handed to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    Sent,
    Queued,
    Dropped(&'static str),
}

pub struct Session {
    pub id: u64,
    pub key: SessionKey,
    pub identity: Identity,
    connected: AtomicBool,
    pub state: Mutex<SessionState>,
}

impl Session {
    pub fn new(id: u64, key: SessionKey, identity: Identity) -> Session {
        Session {
            id,
            key,
            identity,
            connected: AtomicBool::new(false),
            state: Mutex::new(SessionState {
                subscriptions: HashMap::new(),
                link: None,
                queue: VecDeque::new(),
                expiry: Duration::ZERO,
                disconnected_at: None,
                generation: 0,
                qos2_pending: HashSet::new(),
            }),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub(super) fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    /// Hands a delivery to the connection, or queues it while the client is away.
    /// `max_queued` bounds both the connection's queue and the offline queue; what does not
    /// fit is dropped (the oldest messages are kept, as Mosquitto does).
    pub fn deliver(&self, delivery: Delivery, max_queued: usize) -> Handoff {
        let mut state = self.state.lock();
        if let Some(link) = &state.link {
            match link.tx.try_send(Outbound::Deliver(delivery)) {
                Ok(()) => return Handoff::Sent,
                Err(mpsc::error::TrySendError::Full(_)) => return Handoff::Dropped("queue_full"),
                Err(mpsc::error::TrySendError::Closed(Outbound::Deliver(d))) => {
                    // The connection is going away (its detach is on the way); keep the
                    // message for its successor.
                    return Self::enqueue(&mut state, d, max_queued);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Handoff::Dropped("closed"),
            }
        }
        Self::enqueue(&mut state, delivery, max_queued)
    }

    fn enqueue(state: &mut SessionState, delivery: Delivery, max_queued: usize) -> Handoff {
        if state.expiry.is_zero() {
            return Handoff::Dropped("offline");
        }
        if delivery.qos == QoS::AtMostOnce {
            return Handoff::Dropped("offline_qos0");
        }
        if state.queue.len() >= max_queued {
            return Handoff::Dropped("queue_full");
        }
        state.queue.push_back(delivery);
        Handoff::Queued
    }
}
