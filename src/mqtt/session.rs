//! An MQTT session: a client's subscriptions and the messages on their way to it, kept across
//! connections when the client asked for a persistent session.

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ntex_mqtt::QoS;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::acl::{Identity, Namespace};
use super::message::{Delivery, Outbound};
use super::topic::Subscription;
use crate::config::SlowSubscriber;

/// Under `MQTT_SLOW_SUBSCRIBER=backpressure`, how long a publisher waits for a client that
/// takes nothing from its queue before that client is disconnected (its session is kept).
/// Long enough for a congested mobile link to recover, short enough that one stuck client
/// cannot hold publishers for long.
pub const SLOW_SUBSCRIBER_STALL: Duration = Duration::from_secs(10);

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

/// A delivery that was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    WithinLimit,
    /// Queued past `max_bytes` (backpressure): the publisher waits for room before it
    /// acknowledges the message.
    OverLimit,
}

/// Why a delivery was not queued.
pub enum PushError {
    /// `max_queued_bytes` are waiting already.
    Full(Delivery),
    /// The connection is gone.
    Closed(Delivery),
}

/// The sending side of a connection's queue. The queue itself is unbounded; what it holds is
/// bounded in bytes, so memory stays flat whatever the message sizes and a burst of small
/// messages does not overflow a queue sized for the worst case.
#[derive(Clone)]
pub struct Outbox {
    backlog: Arc<Backlog>,
    policy: SlowSubscriber,
}

/// The receiving side, drained by the connection's outbound task.
pub struct Inbox {
    backlog: Arc<Backlog>,
}

/// The messages on their way to one connection. A plain locked deque rather than a channel:
/// tokio's unbounded channel allocates a block of 32 slots (2.3 KiB) when it is created, and
/// most connections (devices) never receive a message, while an empty deque holds nothing.
#[derive(Default)]
struct Queue {
    items: VecDeque<Outbound>,
    /// The receiving side is closed: nothing more is taken.
    closed: bool,
}

impl Queue {
    /// Capacity kept when the queue runs empty; a burst's larger buffer is given back.
    const KEEP: usize = 64;
}

/// What waits for one connection, shared by everyone who queues for it and its outbound task.
/// A delivery counts from the moment it is queued until it is written (or given up), so QoS 2
/// deliveries waiting for their turn count too.
#[derive(Default)]
pub struct Backlog {
    queue: Mutex<Queue>,
    /// Wakes the outbound task when a message is queued (a permit is kept if it is not waiting).
    queued: Notify,
    pending: AtomicUsize,
    /// Deliveries released so far: a publisher that waited `stall` tells a client that took
    /// nothing from one that is slow.
    released: AtomicU64,
    /// Publishers waiting for room; the outbound task wakes them only when there are some.
    waiting: AtomicUsize,
    progress: Notify,
    /// Set by a publisher that gave up on the client; the outbound task then closes the
    /// connection.
    evicted: AtomicBool,
    evict: Notify,
    /// The outbound task has ended.
    closed: AtomicBool,
}

impl Backlog {
    /// A delivery has been written to the client, or given up.
    pub fn release(&self, delivery: &Delivery) {
        self.pending.fetch_sub(cost(delivery), Ordering::SeqCst);
        self.released.fetch_add(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.progress.notify_waiters();
        }
    }

    /// Resolves once a publisher has given up on the client.
    pub async fn evicted(&self) {
        let notified = self.evict.notified();
        if self.evicted.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }

    fn close(&self) {
        self.queue.lock().closed = true;
        self.closed.store(true, Ordering::Release);
        self.progress.notify_waiters();
    }

    /// Queues a message unless the receiving side is closed.
    fn send(&self, message: Outbound) -> Result<(), Outbound> {
        {
            let mut queue = self.queue.lock();
            if queue.closed {
                return Err(message);
            }
            queue.items.push_back(message);
        }
        self.queued.notify_one();
        Ok(())
    }

    fn take(&self) -> Option<Outbound> {
        let mut queue = self.queue.lock();
        let message = queue.items.pop_front();
        if queue.items.is_empty() && queue.items.capacity() > Queue::KEEP {
            queue.items = VecDeque::new();
        }
        message
    }

    fn is_closed(&self) -> bool {
        self.queue.lock().closed
    }
}

/// How a publisher's wait for room in a subscriber's queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// At most `max_bytes` wait again.
    Available,
    /// The connection is gone (its queue went back to the session).
    Closed,
    /// The client took nothing for [`SLOW_SUBSCRIBER_STALL`]; it is being disconnected.
    Stalled,
}

impl Outbox {
    /// A queue that drops what does not fit (`MQTT_SLOW_SUBSCRIBER=drop`).
    pub fn new() -> (Outbox, Inbox) {
        Self::with_policy(SlowSubscriber::Drop)
    }

    pub fn with_policy(policy: SlowSubscriber) -> (Outbox, Inbox) {
        let backlog = Arc::new(Backlog::default());
        (
            Outbox {
                backlog: backlog.clone(),
                policy,
            },
            Inbox { backlog },
        )
    }

    /// Queues a delivery unless `max_bytes` are waiting already. Under backpressure a QoS 1/2
    /// delivery is queued anyway (in order, at once) and its publisher waits for [`Outbox::room`]
    /// before acknowledging; what the queue can exceed its limit by is then bounded by the
    /// publishers' own in-flight windows (`receive_maximum` messages each).
    pub fn push(&self, delivery: Delivery, max_bytes: usize) -> Result<Pushed, PushError> {
        let size = cost(&delivery);
        if self.backlog.pending.load(Ordering::Acquire) + size <= max_bytes {
            return self
                .force(delivery)
                .map(|()| Pushed::WithinLimit)
                .map_err(PushError::Closed);
        }
        if self.policy == SlowSubscriber::Backpressure && delivery.qos != QoS::AtMostOnce {
            return self
                .force(delivery)
                .map(|()| Pushed::OverLimit)
                .map_err(PushError::Closed);
        }
        Err(PushError::Full(delivery))
    }

    /// Queues a delivery whatever is waiting (a resumed session's own backlog).
    pub fn force(&self, delivery: Delivery) -> Result<(), Delivery> {
        let size = cost(&delivery);
        self.backlog.pending.fetch_add(size, Ordering::AcqRel);
        match self.backlog.send(Outbound::Deliver(delivery)) {
            Ok(()) => Ok(()),
            Err(Outbound::Deliver(d)) => {
                self.backlog.pending.fetch_sub(size, Ordering::AcqRel);
                Err(d)
            }
            Err(_) => unreachable!("a delivery was sent"),
        }
    }

    /// Bytes waiting for the connection.
    pub fn pending(&self) -> usize {
        self.backlog.pending.load(Ordering::Acquire)
    }

    /// Whether two handles queue for the same connection.
    pub fn same_queue(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.backlog, &other.backlog)
    }

    /// Waits until at most `max_bytes` wait for the connection. The wait is bounded by the
    /// client's progress: when it takes nothing for `stall`, the connection is told to close
    /// (MQTT 5: DISCONNECT 0x97) and the wait ends.
    pub async fn room(&self, max_bytes: usize, stall: Duration) -> Room {
        let backlog = &self.backlog;
        backlog.waiting.fetch_add(1, Ordering::SeqCst);
        let room = loop {
            let released = backlog.released.load(Ordering::SeqCst);
            // Registered before the checks, so a release between them is not missed.
            let progress = backlog.progress.notified();
            if backlog.closed.load(Ordering::Acquire) || backlog.is_closed() {
                break Room::Closed;
            }
            if backlog.evicted.load(Ordering::Acquire) {
                break Room::Stalled;
            }
            if backlog.pending.load(Ordering::SeqCst) <= max_bytes {
                break Room::Available;
            }
            if ntex::time::timeout(stall, progress).await.is_err()
                && backlog.released.load(Ordering::SeqCst) == released
            {
                backlog.evicted.store(true, Ordering::Release);
                backlog.evict.notify_one();
                break Room::Stalled;
            }
        };
        backlog.waiting.fetch_sub(1, Ordering::SeqCst);
        room
    }

    /// Tells the connection to close; `false` if it is gone already.
    pub fn disconnect(&self, reason: u8, message: &str) -> bool {
        self.backlog
            .send(Outbound::Disconnect {
                reason,
                message: message.to_string(),
            })
            .is_ok()
    }
}

impl Inbox {
    /// The next message. A delivery still counts as waiting until it is passed to
    /// [`Backlog::release`].
    /// `None` once the queue is closed and empty.
    pub async fn recv(&mut self) -> Option<Outbound> {
        loop {
            if let Some(message) = self.backlog.take() {
                return Some(message);
            }
            if self.backlog.is_closed() {
                return None;
            }
            // A message queued since `take` left a permit: this returns at once.
            self.backlog.queued.notified().await;
        }
    }

    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.backlog.take()
    }

    pub fn backlog(&self) -> Arc<Backlog> {
        self.backlog.clone()
    }

    /// No more deliveries are taken; publishers waiting for room stop waiting.
    pub fn close(&mut self) {
        self.backlog.close();
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.backlog.close();
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
pub enum Handoff {
    Sent,
    /// Sent past the queue's limit: the publisher waits for room in this queue.
    Backlogged(Outbox),
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
                Ok(Pushed::WithinLimit) => return Handoff::Sent,
                Ok(Pushed::OverLimit) => return Handoff::Backlogged(link.outbox.clone()),
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
    use super::*;
    use crate::mqtt::message::Publication;

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

    fn delivery(qos: QoS) -> Delivery {
        Delivery {
            publication: Arc::new(Publication::internal("t", vec![0u8; 100], qos, false)),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            dup: false,
            stored: None,
        }
    }

    #[test]
    fn a_full_queue_drops_unless_backpressure_keeps_qos_1_and_2() {
        let max = cost(&delivery(QoS::AtLeastOnce));
        let (drop, _rx) = Outbox::with_policy(SlowSubscriber::Drop);
        assert!(matches!(
            drop.push(delivery(QoS::AtLeastOnce), max),
            Ok(Pushed::WithinLimit)
        ));
        assert!(matches!(
            drop.push(delivery(QoS::AtLeastOnce), max),
            Err(PushError::Full(_))
        ));

        let (held, _rx) = Outbox::with_policy(SlowSubscriber::Backpressure);
        assert!(matches!(
            held.push(delivery(QoS::AtLeastOnce), max),
            Ok(Pushed::WithinLimit)
        ));
        assert!(matches!(
            held.push(delivery(QoS::ExactlyOnce), max),
            Ok(Pushed::OverLimit)
        ));
        assert!(matches!(
            held.push(delivery(QoS::AtLeastOnce), max),
            Ok(Pushed::OverLimit)
        ));
        // QoS 0 is never waited for: dropped as before.
        assert!(matches!(
            held.push(delivery(QoS::AtMostOnce), max),
            Err(PushError::Full(_))
        ));
        assert_eq!(held.pending(), 3 * max);
    }

    #[tokio::test]
    async fn a_closed_queue_hands_out_what_it_holds_then_ends_and_takes_nothing_more() {
        let (outbox, mut inbox) = Outbox::new();
        outbox.push(delivery(QoS::AtLeastOnce), usize::MAX).ok().unwrap();
        assert!(outbox.disconnect(0x8B, "bye"));
        inbox.close();
        let Some(Outbound::Deliver(first)) = inbox.recv().await else {
            panic!("the queued delivery first")
        };
        inbox.backlog().release(&first);
        assert!(matches!(inbox.recv().await, Some(Outbound::Disconnect { .. })));
        assert!(inbox.recv().await.is_none());
        assert!(matches!(
            outbox.push(delivery(QoS::AtLeastOnce), usize::MAX),
            Err(PushError::Closed(_))
        ));
        assert_eq!(outbox.pending(), 0, "a refused delivery does not count");
        assert!(!outbox.disconnect(0x8B, "bye"));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_message_queued_later() {
        let (outbox, mut inbox) = Outbox::new();
        let sender = tokio::spawn(async move {
            tokio::task::yield_now().await;
            outbox.push(delivery(QoS::AtMostOnce), usize::MAX).ok().unwrap();
            outbox
        });
        assert!(matches!(inbox.recv().await, Some(Outbound::Deliver(_))));
        let outbox = sender.await.unwrap();
        drop(inbox);
        assert!(matches!(
            outbox.push(delivery(QoS::AtMostOnce), usize::MAX),
            Err(PushError::Closed(_))
        ));
    }

    #[test]
    fn a_delivery_counts_until_it_is_released() {
        let (outbox, mut inbox) = Outbox::new();
        outbox.push(delivery(QoS::ExactlyOnce), usize::MAX).ok().unwrap();
        let Some(Outbound::Deliver(d)) = inbox.try_recv() else {
            panic!("queued")
        };
        assert_eq!(outbox.pending(), cost(&d), "taken, not yet written");
        inbox.backlog().release(&d);
        assert_eq!(outbox.pending(), 0);
        assert!(outbox.same_queue(&outbox.clone()));
        assert!(!outbox.same_queue(&Outbox::new().0));
    }
}
