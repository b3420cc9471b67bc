//! One connection's outbound delivery: the task that writes what its session's queue holds to
//! the client, in order, and hands back what was not acknowledged when the connection ends.
//! The inbound half (CONNECT, PUBLISH, SUBSCRIBE) is in [`super::connection`].
//!
//! The task runs on the ntex worker that serves the connection, the only code that touches its
//! sink. QoS 2 deliveries are sent one at a time: ntex-mqtt keeps a single PUBREC→PUBCOMP slot
//! per connection. MQTT 5 clients that accept topic aliases get them ([`TopicAliases`]).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::num::{NonZeroU16, NonZeroU32};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use ntex::util::ByteString;
use ntex_mqtt::error::SendPacketError;
use ntex_mqtt::{QoS, v3, v5};

use super::connection::Connection;
use super::message::{Delivery, Outbound};
use super::metrics::BrokerMetrics;
use super::session::{Backlog, Inbox, SLOW_SUBSCRIBER_STALL};

/// MQTT 5 DISCONNECT reason for a client disconnected for not taking its messages.
const QUOTA_EXCEEDED: u8 = 0x97;

/// Poll a future once now: ntex-mqtt encodes a QoS 1 PUBLISH (and takes its packet id and
/// in-flight slot) on the first poll, so wire order stays the order of the calls.
async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut *fut).poll(cx))).await
}

/// The write side of a connection, per protocol.
pub enum Sink {
    V3(v3::MqttSink),
    V5(v5::MqttSink),
}

impl Sink {
    async fn ready(&self) -> bool {
        match self {
            Sink::V3(s) => s.ready().await,
            Sink::V5(s) => s.ready().await,
        }
    }

    fn close(&self, reason: u8, message: String) {
        match self {
            Sink::V3(s) => s.close(),
            Sink::V5(s) => {
                let code = v5::codec::DisconnectReasonCode::try_from(reason)
                    .unwrap_or(v5::codec::DisconnectReasonCode::UnspecifiedError);
                let mut packet = v5::codec::Disconnect::new(code);
                packet.reason_string = Some(message.into());
                s.close_with_reason(packet);
            }
        }
    }
}

/// Deliveries written but not yet acknowledged, by send order; what is left when the
/// connection ends goes back to the session.
type Inflight = Rc<RefCell<BTreeMap<u64, Delivery>>>;

/// What the outbound task and its QoS 2 sender share.
struct Writer {
    conn: Rc<Connection>,
    sink: Sink,
    inflight: Inflight,
    aliases: RefCell<TopicAliases>,
    backlog: Arc<Backlog>,
    /// The connection was closed for taking nothing (once, whichever waiter saw it first).
    evicted: Cell<bool>,
}

impl Writer {
    /// Waits until the sink takes another packet; `false` when the connection is closing,
    /// or closed here because a publisher gave up waiting for this client.
    async fn ready(&self) -> bool {
        // The sink first: when it is ready, the eviction signal is not even registered.
        tokio::select! {
            biased;
            ready = self.sink.ready() => ready,
            _ = self.backlog.evicted() => {
                self.evict();
                false
            }
        }
    }

    fn evict(&self) {
        if self.evicted.replace(true) {
            return;
        }
        self.conn.ctx.metrics().slow_subscriber_disconnects.inc();
        tracing::warn!(client = %self.conn.client_id, identity = %self.conn.identity.label(), stall_secs = SLOW_SUBSCRIBER_STALL.as_secs(), "slow subscriber disconnected: it took no message while publishers waited");
        self.sink.close(
            QUOTA_EXCEEDED,
            format!(
                "no message taken for {} s while publishers waited",
                SLOW_SUBSCRIBER_STALL.as_secs()
            ),
        );
    }
}

/// The QoS 2 sender of a connection and what it shares with the outbound task, made with the
/// connection's first QoS 2 delivery: most connections never get one.
struct Qos2Sender {
    queue: Rc<RefCell<VecDeque<(u64, Delivery)>>>,
    wake: Rc<tokio::sync::Notify>,
    stop: Rc<Cell<bool>>,
    task: ntex::rt::JoinHandle<()>,
}

/// Where the outbound task is between bursts of messages.
struct Outgoing {
    /// Send order, the key of `Writer::inflight`.
    seq: u64,
    qos2: Option<Qos2Sender>,
}

/// The outbound task: writes deliveries in order until the connection closes, then hands
/// back to the session what was not acknowledged.
///
/// Every connected client has one, and most of them wait almost all the time: between
/// bursts the task holds only its wait for the next message (or the close, or an eviction);
/// a burst of messages is written by a future boxed for that burst ([`burst`]), so what
/// writing takes (the sink's readiness, the publish builders) is not held by idle clients.
pub(super) async fn run_outbound(
    conn: Rc<Connection>,
    sink: Sink,
    mut rx: Inbox,
    mut close: tokio::sync::oneshot::Receiver<()>,
) {
    let w = Rc::new(Writer {
        aliases: RefCell::new(TopicAliases::new(conn.topic_alias_max)),
        conn,
        sink,
        inflight: Rc::new(RefCell::new(BTreeMap::new())),
        backlog: rx.backlog(),
        evicted: Cell::new(false),
    });
    let mut out = Outgoing { seq: 0, qos2: None };
    loop {
        let next = tokio::select! {
            biased;
            _ = &mut close => None,
            message = rx.recv() => message,
            // Only looked at when nothing is queued: a client that stalls with messages
            // queued is waited for in `ready`.
            _ = w.backlog.evicted() => {
                w.evict();
                None
            }
        };
        let Some(message) = next else { break };
        if !Box::pin(burst(&w, message, &mut rx, &mut close, &mut out)).await {
            break;
        }
    }
    let mut qos2_unsent = VecDeque::new();
    if let Some(qos2) = out.qos2 {
        qos2.stop.set(true);
        qos2.wake.notify_one();
        let _ = qos2.task.await;
        qos2_unsent = std::mem::take(&mut *qos2.queue.borrow_mut());
    }
    // What did not make it: unacknowledged first (oldest), then queued QoS 2, then the channel.
    rx.close();
    let mut unsent: Vec<Delivery> = std::mem::take(&mut *w.inflight.borrow_mut())
        .into_values()
        .collect();
    unsent.extend(qos2_unsent.into_iter().map(|(_, d)| d));
    while let Some(message) = rx.try_recv() {
        if let Outbound::Deliver(d) = message {
            unsent.push(d);
        }
    }
    w.conn.ctx.broker.detach(&w.conn.session, w.conn.conn_id, unsent);
}

/// Writes `message` and whatever is queued behind it, in order, as long as the connection
/// is not closing (the close signal goes first, as in the task's wait). `false`: the
/// connection is closing or closed, stop.
async fn burst(
    w: &Rc<Writer>,
    mut message: Outbound,
    rx: &mut Inbox,
    close: &mut tokio::sync::oneshot::Receiver<()>,
    out: &mut Outgoing,
) -> bool {
    loop {
        if !deliver(w, message, out).await {
            return false;
        }
        if !matches!(
            close.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        ) {
            return false;
        }
        match rx.try_recv() {
            Some(next) => message = next,
            None => return true,
        }
    }
}

/// One message of the queue; `false` when the connection is closing or closed.
async fn deliver(w: &Rc<Writer>, message: Outbound, out: &mut Outgoing) -> bool {
    let delivery = match message {
        Outbound::Disconnect { reason, message } => {
            w.sink.close(reason, message);
            return false;
        }
        Outbound::Deliver(d) => d,
    };
    let now = Instant::now();
    if delivery.publication.is_expired(now) {
        w.backlog.release(&delivery);
        forget(&w.conn, &delivery);
        w.conn.ctx.metrics().dropped.with_label_values(&["expired"]).inc();
        return true;
    }
    out.seq += 1;
    let seq = out.seq;
    if delivery.qos == QoS::ExactlyOnce {
        let qos2 = out.qos2.get_or_insert_with(|| {
            let queue = Rc::new(RefCell::new(VecDeque::new()));
            let wake = Rc::new(tokio::sync::Notify::new());
            let stop = Rc::new(Cell::new(false));
            let task = ntex::rt::spawn(qos2_sender(w.clone(), queue.clone(), wake.clone(), stop.clone()));
            Qos2Sender {
                queue,
                wake,
                stop,
                task,
            }
        });
        qos2.queue.borrow_mut().push_back((seq, delivery));
        qos2.wake.notify_one();
        return true;
    }
    if !w.ready().await {
        w.inflight.borrow_mut().insert(seq, delivery);
        return false;
    }
    // Nothing is awaited between the sink's readiness and the write: the PUBLISH is
    // encoded now, so topic aliases are assigned in wire order.
    w.backlog.release(&delivery);
    send(w, seq, delivery).await;
    true
}

/// Sends QoS 2 deliveries one at a time; a PUBREC means the client has it. They count in
/// the connection's queue until they are written.
async fn qos2_sender(
    w: Rc<Writer>,
    queue: Rc<RefCell<VecDeque<(u64, Delivery)>>>,
    wake: Rc<tokio::sync::Notify>,
    stop: Rc<Cell<bool>>,
) {
    loop {
        let next = queue.borrow_mut().pop_front();
        let Some((seq, delivery)) = next else {
            if stop.get() {
                return;
            }
            wake.notified().await;
            continue;
        };
        if stop.get() || !w.ready().await {
            queue.borrow_mut().push_front((seq, delivery));
            return;
        }
        w.backlog.release(&delivery);
        send(&w, seq, delivery).await;
    }
}

/// Writes one delivery. QoS 1 waits in a task of its own for the PUBACK; QoS 2 waits here
/// (called only from the QoS 2 sender) for PUBREC, then completes PUBREL/PUBCOMP.
async fn send(w: &Writer, seq: u64, delivery: Delivery) {
    let metrics = w.conn.ctx.metrics();
    let inflight = &w.inflight;
    let qos = delivery.qos;
    let payload = delivery.publication.payload.clone();
    match &w.sink {
        Sink::V3(s) => {
            let mut builder = s.publish(delivery.publication.topic.clone()).dup(delivery.dup);
            if delivery.retain {
                builder = builder.retain();
            }
            match qos {
                QoS::AtMostOnce => match builder.send_at_most_once(payload) {
                    Ok(()) => metrics.sent(qos).inc(),
                    Err(e) => drop_failed(metrics, &e),
                },
                QoS::AtLeastOnce => {
                    inflight.borrow_mut().insert(seq, delivery);
                    let mut fut = Box::pin(builder.send_at_least_once(payload));
                    let inflight = inflight.clone();
                    let sent = metrics.sent(qos).clone();
                    match poll_once(&mut fut).await {
                        Poll::Ready(result) => acked(&w.conn, &inflight, seq, result.is_ok(), &sent),
                        Poll::Pending => {
                            let conn = w.conn.clone();
                            ntex::rt::spawn(async move {
                                let result = fut.await;
                                acked(&conn, &inflight, seq, result.is_ok(), &sent);
                            });
                        }
                    }
                }
                QoS::ExactlyOnce => {
                    inflight.borrow_mut().insert(seq, delivery);
                    // Boxed, here and below: QoS 2's futures are the largest of this function,
                    // which the outbound task of every connection holds while it sends.
                    if let Ok(received) = Box::pin(builder.send_exactly_once(payload)).await {
                        acked(&w.conn, inflight, seq, true, metrics.sent(qos));
                        let _ = Box::pin(received.release()).await;
                    }
                }
            }
        }
        Sink::V5(s) => {
            let alias = w.aliases.borrow_mut().lookup(&delivery.publication.topic);
            // A PUBLISH that was not written did not set its alias: the next one must.
            let unsent = |w: &Writer| {
                if let AliasUse::Assign(a) = alias {
                    w.aliases.borrow_mut().forget(a);
                }
            };
            let builder = v5_publish(s, &delivery, alias);
            match qos {
                QoS::AtMostOnce => match builder.send_at_most_once(payload) {
                    Ok(()) => metrics.sent(qos).inc(),
                    Err(e) => {
                        unsent(w);
                        drop_failed(metrics, &e);
                    }
                },
                QoS::AtLeastOnce => {
                    inflight.borrow_mut().insert(seq, delivery);
                    let mut fut = Box::pin(builder.send_at_least_once(payload));
                    let inflight = inflight.clone();
                    let sent = metrics.sent(qos).clone();
                    match poll_once(&mut fut).await {
                        Poll::Ready(result) => {
                            if result.is_err() {
                                unsent(w);
                            }
                            acked(&w.conn, &inflight, seq, result.is_ok(), &sent);
                        }
                        Poll::Pending => {
                            let conn = w.conn.clone();
                            ntex::rt::spawn(async move {
                                let result = fut.await;
                                acked(&conn, &inflight, seq, result.is_ok(), &sent);
                            });
                        }
                    }
                }
                QoS::ExactlyOnce => {
                    inflight.borrow_mut().insert(seq, delivery);
                    let mut fut = Box::pin(builder.send_exactly_once(payload));
                    let result = match poll_once(&mut fut).await {
                        Poll::Ready(result) => {
                            if result.is_err() {
                                unsent(w);
                            }
                            result
                        }
                        Poll::Pending => fut.await,
                    };
                    if let Ok(received) = result {
                        acked(&w.conn, inflight, seq, true, metrics.sent(qos));
                        let _ = Box::pin(received.release()).await;
                    }
                }
            }
        }
    }
}

/// The client acknowledged a delivery (PUBACK, or PUBREC for QoS 2).
fn acked(conn: &Connection, inflight: &Inflight, seq: u64, ok: bool, sent: &prometheus::IntCounter) {
    if ok {
        let delivery = inflight.borrow_mut().remove(&seq);
        if let Some(delivery) = delivery {
            forget(conn, &delivery);
        }
        sent.inc();
    }
}

/// A delivery the client has, or that will never be sent: a cluster forgets its stored copy.
fn forget(conn: &Connection, delivery: &Delivery) {
    if let Some(id) = &delivery.stored {
        conn.ctx.broker.unstore(&conn.session.key, id);
    }
}

fn drop_failed(metrics: &BrokerMetrics, error: &SendPacketError) {
    // The client's Maximum Packet Size: MQTT 5 says to drop the message for that client.
    let reason = if matches!(error, SendPacketError::Encode(_)) {
        "too_large"
    } else {
        "closed"
    };
    metrics.dropped.with_label_values(&[reason]).inc();
}

/// An MQTT 5 PUBLISH with the message's properties, its remaining expiry and, when the client
/// accepts them, a topic alias (with an empty topic once the client knows the alias).
fn v5_publish(sink: &v5::MqttSink, delivery: &Delivery, alias: AliasUse) -> v5::PublishBuilder {
    let p = &delivery.publication;
    let expiry = p.remaining_expiry(Instant::now()).and_then(NonZeroU32::new);
    let props = p.properties.clone();
    let subscription_ids = delivery.subscription_ids.clone();
    let (topic, topic_alias) = match alias {
        AliasUse::None => (p.topic.clone(), None),
        AliasUse::Assign(a) => (p.topic.clone(), Some(a)),
        AliasUse::Reuse(a) => (ByteString::new(), Some(a)),
    };
    sink.publish(topic)
        .retain(delivery.retain)
        .dup(delivery.dup)
        .properties(move |out| {
            out.topic_alias = topic_alias;
            out.message_expiry_interval = expiry;
            out.content_type = props.content_type;
            out.response_topic = props.response_topic;
            out.correlation_data = props.correlation_data;
            out.user_properties = props.user_properties;
            out.is_utf8_payload = props.payload_is_utf8;
            out.subscription_ids = subscription_ids;
        })
}

/// How a PUBLISH names its topic to an MQTT 5 client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AliasUse {
    /// The topic only: aliases are off for this client, or the topic is too long to keep.
    None,
    /// The topic and the alias it gets from now on.
    Assign(NonZeroU16),
    /// The alias only (empty topic): the client has seen it with this topic.
    Reuse(NonZeroU16),
}

/// Server→client topic aliases of one connection (MQTT 5 §3.3.2.3.4), up to the Topic Alias
/// Maximum the client sent in CONNECT and at most [`TopicAliases::MAX`]. Aliases live as long
/// as the connection; a client with a maximum of 0 never gets one.
///
/// When all are taken, the least recently used alias is given to the new topic. First come,
/// first served would pin the aliases to whichever topics came first, while a subscriber's
/// topics change (commands, shadow replies, a backend following its fleet); with LRU the
/// aliases follow the topics in use, and a miss costs what no alias costs: the full topic.
#[derive(Debug)]
pub struct TopicAliases {
    capacity: u16,
    /// Topic → its alias and when it was last used.
    by_topic: HashMap<ByteString, (NonZeroU16, u64)>,
    /// Aliases given back by [`TopicAliases::forget`].
    free: Vec<NonZeroU16>,
    /// The highest alias handed out so far.
    issued: u16,
    clock: u64,
}

impl TopicAliases {
    /// Aliases kept per connection, whatever the client allows: a client's maximum of 65535
    /// must not make the broker keep 65535 topics for it.
    pub const MAX: u16 = 64;
    /// Longer topics are always sent in full, so a connection's aliases take at most
    /// 64 × 256 bytes.
    pub const MAX_TOPIC_LEN: usize = 256;

    pub fn new(client_maximum: u16) -> TopicAliases {
        TopicAliases {
            capacity: client_maximum.min(Self::MAX),
            by_topic: HashMap::new(),
            free: Vec::new(),
            issued: 0,
            clock: 0,
        }
    }

    /// How to name `topic` in the PUBLISH about to be written.
    pub fn lookup(&mut self, topic: &ByteString) -> AliasUse {
        if self.capacity == 0 || topic.is_empty() || topic.len() > Self::MAX_TOPIC_LEN {
            return AliasUse::None;
        }
        self.clock += 1;
        if let Some((alias, used)) = self.by_topic.get_mut(topic) {
            *used = self.clock;
            return AliasUse::Reuse(*alias);
        }
        let alias = if let Some(free) = self.free.pop() {
            Some(free)
        } else if self.issued < self.capacity {
            self.issued += 1;
            NonZeroU16::new(self.issued)
        } else {
            let oldest = self
                .by_topic
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(topic, (alias, _))| (topic.clone(), *alias));
            oldest.map(|(topic, alias)| {
                self.by_topic.remove(&topic);
                alias
            })
        };
        let Some(alias) = alias else {
            return AliasUse::None;
        };
        // A copy: the publication's topic may share the buffer of a much larger packet.
        self.by_topic
            .insert(ByteString::from(topic.to_string()), (alias, self.clock));
        AliasUse::Assign(alias)
    }

    /// The PUBLISH that was to assign `alias` was not written.
    pub fn forget(&mut self, alias: NonZeroU16) {
        self.by_topic.retain(|_, (a, _)| *a != alias);
        self.free.push(alias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of four arguments returns, without calling it.
    fn future_size<A, B, C, D, F: Future>(_: impl Fn(A, B, C, D) -> F) -> usize {
        size_of::<F>()
    }

    #[test]
    fn an_idle_outbound_task_holds_only_its_wait() {
        // Every connected client has an outbound task; the writing of a burst is boxed per
        // burst, so the task itself stays at its wait (320 bytes in a release build, against
        // 800 when the writing was awaited inline).
        let size = future_size(run_outbound);
        println!("run_outbound: {size} bytes");
        assert!(size <= 640, "the outbound task's future is {size} bytes");
    }

    fn topic(s: &str) -> ByteString {
        ByteString::from(s.to_string())
    }

    fn alias(n: u16) -> NonZeroU16 {
        NonZeroU16::new(n).unwrap()
    }

    #[test]
    fn a_topic_is_sent_in_full_with_its_alias_once_then_by_alias_only() {
        let mut aliases = TopicAliases::new(10);
        assert_eq!(aliases.lookup(&topic("a/1")), AliasUse::Assign(alias(1)));
        assert_eq!(aliases.lookup(&topic("a/2")), AliasUse::Assign(alias(2)));
        assert_eq!(aliases.lookup(&topic("a/1")), AliasUse::Reuse(alias(1)));
        assert_eq!(aliases.lookup(&topic("a/2")), AliasUse::Reuse(alias(2)));
    }

    #[test]
    fn no_aliases_for_a_client_that_allows_none_or_for_long_topics() {
        let mut none = TopicAliases::new(0);
        assert_eq!(none.lookup(&topic("a/1")), AliasUse::None);
        assert_eq!(none.lookup(&topic("a/1")), AliasUse::None);
        let mut aliases = TopicAliases::new(10);
        let long = topic(&"x".repeat(TopicAliases::MAX_TOPIC_LEN + 1));
        assert_eq!(aliases.lookup(&long), AliasUse::None);
        assert_eq!(aliases.lookup(&long), AliasUse::None);
    }

    #[test]
    fn the_least_recently_used_alias_goes_to_a_new_topic() {
        let mut aliases = TopicAliases::new(2);
        assert_eq!(aliases.lookup(&topic("a")), AliasUse::Assign(alias(1)));
        assert_eq!(aliases.lookup(&topic("b")), AliasUse::Assign(alias(2)));
        assert_eq!(aliases.lookup(&topic("a")), AliasUse::Reuse(alias(1)));
        // "b" is the least recently used: "c" takes its alias, and "b" needs a new one later.
        assert_eq!(aliases.lookup(&topic("c")), AliasUse::Assign(alias(2)));
        assert_eq!(aliases.lookup(&topic("c")), AliasUse::Reuse(alias(2)));
        assert_eq!(aliases.lookup(&topic("b")), AliasUse::Assign(alias(1)));
        assert_eq!(aliases.lookup(&topic("a")), AliasUse::Assign(alias(2)));
    }

    #[test]
    fn a_client_maximum_above_the_broker_cap_is_capped() {
        let mut aliases = TopicAliases::new(u16::MAX);
        for i in 1..=TopicAliases::MAX {
            assert_eq!(
                aliases.lookup(&topic(&format!("t/{i}"))),
                AliasUse::Assign(alias(i))
            );
        }
        // All taken: the least recently used (t/1) is reused, never an alias above the cap.
        assert_eq!(aliases.lookup(&topic("t/new")), AliasUse::Assign(alias(1)));
    }

    #[test]
    fn an_alias_whose_publish_was_not_written_is_assigned_again() {
        let mut aliases = TopicAliases::new(4);
        assert_eq!(aliases.lookup(&topic("a")), AliasUse::Assign(alias(1)));
        aliases.forget(alias(1));
        assert_eq!(aliases.lookup(&topic("a")), AliasUse::Assign(alias(1)));
        assert_eq!(aliases.lookup(&topic("a")), AliasUse::Reuse(alias(1)));
    }
}
