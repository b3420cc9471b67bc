//! An MQTT session: a client's subscriptions and the messages on their way to it, kept across
//! connections when the client asked for a persistent session.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// An access rule denies some of the topics the filter matches: each topic is checked at
    /// delivery (see [`ReadDecisions`]).
    pub read_checked: bool,
}

/// Whether this session may read a topic, as the access rules of one generation decided it:
/// a subscription that overlaps a deny rule checks each topic once, not each message.
#[derive(Default)]
pub struct ReadDecisions {
    generation: u64,
    allowed: HashMap<Box<str>, bool>,
}

impl ReadDecisions {
    /// Topics remembered per session; past that the cache starts over (topic names come from
    /// clients and are unbounded).
    const MAX_TOPICS: usize = 4096;

    /// The decision for `topic` under the rules of `generation`, computed by `decide` the
    /// first time.
    pub fn may_read(&mut self, generation: u64, topic: &str, decide: impl FnOnce() -> bool) -> bool {
        if self.generation != generation || self.allowed.len() >= Self::MAX_TOPICS {
            self.allowed.clear();
            self.generation = generation;
        }
        if let Some(allowed) = self.allowed.get(topic) {
            return *allowed;
        }
        let allowed = decide();
        self.allowed.insert(topic.into(), allowed);
        allowed
    }
}

/// What a delivery costs in a queue: its payload and topic plus bookkeeping.
pub fn cost(delivery: &Delivery) -> usize {
    delivery.publication.payload.len() + delivery.publication.topic.len() + 64
}

/// Why a delivery was not queued.
pub enum PushError {
    /// `max_queued_bytes` are waiting already.
    Full(Delivery),
    /// The connection is gone.
    Closed(Delivery),
}

/// The sending side of a connection's queue. The channel itself is unbounded; what it holds is
/// bounded in bytes, so memory stays flat whatever the message sizes and a burst of small
/// messages does not overflow a queue sized for the worst case.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Outbound>,
    pending: Arc<AtomicUsize>,
}

/// The receiving side, drained by the connection's outbound task.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Outbound>,
    pending: Arc<AtomicUsize>,
}

impl Outbox {
    pub fn new() -> (Outbox, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        (
            Outbox {
                tx,
                pending: pending.clone(),
            },
            Inbox { rx, pending },
        )
    }

    /// Queues a delivery unless `max_bytes` are waiting already.
    pub fn push(&self, delivery: Delivery, max_bytes: usize) -> Result<(), PushError> {
        let size = cost(&delivery);
        if self.pending.load(Ordering::Acquire) + size > max_bytes {
            return Err(PushError::Full(delivery));
        }
        self.force(delivery).map_err(PushError::Closed)
    }

    /// Queues a delivery whatever is waiting (a resumed session's own backlog).
    pub fn force(&self, delivery: Delivery) -> Result<(), Delivery> {
        let size = cost(&delivery);
        self.pending.fetch_add(size, Ordering::AcqRel);
        match self.tx.send(Outbound::Deliver(delivery)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(Outbound::Deliver(d))) => {
                self.pending.fetch_sub(size, Ordering::AcqRel);
                Err(d)
            }
            Err(_) => unreachable!("a delivery was sent"),
        }
    }

    /// Tells the connection to close; `false` if it is gone already.
    pub fn disconnect(&self, reason: u8, message: &str) -> bool {
        self.tx
            .send(Outbound::Disconnect {
                reason,
                message: message.to_string(),
            })
            .is_ok()
    }
}

impl Inbox {
    fn taken(&self, message: &Outbound) {
        if let Outbound::Deliver(d) = message {
            self.pending.fetch_sub(cost(d), Ordering::AcqRel);
        }
    }

    pub async fn recv(&mut self) -> Option<Outbound> {
        let message = self.rx.recv().await?;
        self.taken(&message);
        Some(message)
    }

    pub fn try_recv(&mut self) -> Option<Outbound> {
        let message = self.rx.try_recv().ok()?;
        self.taken(&message);
        Some(message)
    }

    pub fn close(&mut self) {
        self.rx.close();
    }
}

/// The connection currently carrying a session.
pub struct Link {
    pub conn_id: u64,
    pub outbox: Outbox,
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
    /// Taken alone, never while another lock is acquired.
    pub read_decisions: Mutex<ReadDecisions>,
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
            read_decisions: Mutex::new(ReadDecisions::default()),
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub(super) fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    /// Hands a delivery to the connection (at most `max_bytes` waiting), or queues it while the
    /// client is away (at most `max_queued` messages). What does not fit is dropped: the
    /// oldest messages are kept, as Mosquitto does.
    pub fn deliver(&self, delivery: Delivery, max_bytes: usize, max_queued: usize) -> Handoff {
        let mut state = self.state.lock();
        if let Some(link) = &state.link {
            match link.outbox.push(delivery, max_bytes) {
                Ok(()) => return Handoff::Sent,
                Err(PushError::Full(_)) => return Handoff::Dropped("queue_full"),
                // The connection is going away (its detach is on the way); keep the message
                // for its successor.
                Err(PushError::Closed(d)) => return Self::enqueue(&mut state, d, max_queued),
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

#[cfg(test)]
mod tests {
    use super::ReadDecisions;

    #[test]
    fn read_decisions_are_taken_once_per_topic_and_rules_generation() {
        let mut cache = ReadDecisions::default();
        let mut asked = 0;
        for _ in 0..3 {
            assert!(!cache.may_read(1, "test/secret", || {
                asked += 1;
                false
            }));
        }
        assert_eq!(asked, 1);
        assert!(
            cache.may_read(2, "test/secret", || true),
            "new rules, new decision"
        );
        assert!(cache.may_read(2, "test/secret", || unreachable!()));
        for i in 0..ReadDecisions::MAX_TOPICS * 2 {
            cache.may_read(2, &format!("t/{i}"), || true);
        }
        assert!(cache.allowed.len() <= ReadDecisions::MAX_TOPICS);
    }
}
