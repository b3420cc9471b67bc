//! One connection's outbound delivery: the task that writes what its session's queue holds to
//! the client, in order, and hands back what was not acknowledged when the connection ends.
//! The inbound half (CONNECT, PUBLISH, SUBSCRIBE) is in [`super::connection`].
//!
//! The task runs on the ntex worker that serves the connection, the only code that touches its
//! sink. QoS 2 deliveries are sent one at a time: ntex-mqtt keeps a single PUBREC→PUBCOMP slot
//! per connection.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::{Future, poll_fn};
use std::num::NonZeroU32;
use std::rc::Rc;
use std::task::Poll;
use std::time::Instant;

use ntex_mqtt::error::SendPacketError;
use ntex_mqtt::{QoS, v3, v5};

use super::connection::Connection;
use super::message::{Delivery, Outbound};
use super::metrics::BrokerMetrics;
use super::session::Inbox;

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

/// The outbound task: writes deliveries in order until the connection closes, then hands
/// back to the session what was not acknowledged.
pub(super) async fn run_outbound(
    conn: Rc<Connection>,
    sink: Sink,
    mut rx: Inbox,
    mut close: tokio::sync::oneshot::Receiver<()>,
) {
    let sink = Rc::new(sink);
    let inflight: Inflight = Rc::new(RefCell::new(BTreeMap::new()));
    let qos2_queue: Rc<RefCell<VecDeque<(u64, Delivery)>>> = Rc::new(RefCell::new(VecDeque::new()));
    let qos2_wake = Rc::new(tokio::sync::Notify::new());
    let stop = Rc::new(Cell::new(false));
    // The QoS 2 sender starts with the first QoS 2 delivery: most connections never get one,
    // and an idle sender task cost about 0.9 KiB per connection.
    let mut qos2_task = None;
    let mut seq: u64 = 0;
    loop {
        let next = tokio::select! {
            biased;
            _ = &mut close => None,
            message = rx.recv() => message,
        };
        let Some(message) = next else { break };
        let delivery = match message {
            Outbound::Disconnect { reason, message } => {
                sink.close(reason, message);
                break;
            }
            Outbound::Deliver(d) => d,
        };
        let now = Instant::now();
        if delivery.publication.is_expired(now) {
            conn.ctx.metrics().dropped.with_label_values(&["expired"]).inc();
            continue;
        }
        seq += 1;
        if delivery.qos == QoS::ExactlyOnce {
            qos2_queue.borrow_mut().push_back((seq, delivery));
            if qos2_task.is_none() {
                qos2_task = Some(ntex::rt::spawn(qos2_sender(
                    conn.clone(),
                    sink.clone(),
                    inflight.clone(),
                    qos2_queue.clone(),
                    qos2_wake.clone(),
                    stop.clone(),
                )));
            }
            qos2_wake.notify_one();
            continue;
        }
        if !sink.ready().await {
            inflight.borrow_mut().insert(seq, delivery);
            break;
        }
        send(&conn, &sink, seq, delivery, &inflight).await;
    }
    stop.set(true);
    qos2_wake.notify_one();
    if let Some(task) = qos2_task {
        let _ = task.await;
    }
    // What did not make it: unacknowledged first (oldest), then queued QoS 2, then the channel.
    rx.close();
    let mut unsent: Vec<Delivery> = std::mem::take(&mut *inflight.borrow_mut())
        .into_values()
        .collect();
    unsent.extend(qos2_queue.borrow_mut().drain(..).map(|(_, d)| d));
    while let Some(message) = rx.try_recv() {
        if let Outbound::Deliver(d) = message {
            unsent.push(d);
        }
    }
    conn.ctx.broker.detach(&conn.session, conn.conn_id, unsent);
}

/// Sends QoS 2 deliveries one at a time; a PUBREC means the client has it.
async fn qos2_sender(
    conn: Rc<Connection>,
    sink: Rc<Sink>,
    inflight: Inflight,
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
        if stop.get() || !sink.ready().await {
            queue.borrow_mut().push_front((seq, delivery));
            return;
        }
        send(&conn, &sink, seq, delivery, &inflight).await;
    }
}

/// Writes one delivery. QoS 1 waits in a task of its own for the PUBACK; QoS 2 waits here
/// (called only from the QoS 2 sender) for PUBREC, then completes PUBREL/PUBCOMP.
async fn send(conn: &Rc<Connection>, sink: &Sink, seq: u64, delivery: Delivery, inflight: &Inflight) {
    let metrics = conn.ctx.metrics();
    let qos = delivery.qos;
    let payload = delivery.publication.payload.clone();
    let label = BrokerMetrics::qos_label(qos);
    match sink {
        Sink::V3(s) => {
            let mut builder = s.publish(delivery.publication.topic.clone()).dup(delivery.dup);
            if delivery.retain {
                builder = builder.retain();
            }
            match qos {
                QoS::AtMostOnce => match builder.send_at_most_once(payload) {
                    Ok(()) => metrics.sent.with_label_values(&[label]).inc(),
                    Err(e) => drop_failed(metrics, &e),
                },
                QoS::AtLeastOnce => {
                    inflight.borrow_mut().insert(seq, delivery);
                    let mut fut = Box::pin(builder.send_at_least_once(payload));
                    let inflight = inflight.clone();
                    let sent = metrics.sent.with_label_values(&[label]);
                    match poll_once(&mut fut).await {
                        Poll::Ready(result) => acked(&inflight, seq, result.is_ok(), &sent),
                        Poll::Pending => {
                            ntex::rt::spawn(async move {
                                let result = fut.await;
                                acked(&inflight, seq, result.is_ok(), &sent);
                            });
                        }
                    }
                }
                QoS::ExactlyOnce => {
                    inflight.borrow_mut().insert(seq, delivery);
                    if let Ok(received) = builder.send_exactly_once(payload).await {
                        inflight.borrow_mut().remove(&seq);
                        metrics.sent.with_label_values(&[label]).inc();
                        let _ = received.release().await;
                    }
                }
            }
        }
        Sink::V5(s) => {
            let builder = v5_publish(s, &delivery);
            match qos {
                QoS::AtMostOnce => match builder.send_at_most_once(payload) {
                    Ok(()) => metrics.sent.with_label_values(&[label]).inc(),
                    Err(e) => drop_failed(metrics, &e),
                },
                QoS::AtLeastOnce => {
                    inflight.borrow_mut().insert(seq, delivery);
                    let mut fut = Box::pin(builder.send_at_least_once(payload));
                    let inflight = inflight.clone();
                    let sent = metrics.sent.with_label_values(&[label]);
                    match poll_once(&mut fut).await {
                        Poll::Ready(result) => acked(&inflight, seq, result.is_ok(), &sent),
                        Poll::Pending => {
                            ntex::rt::spawn(async move {
                                let result = fut.await;
                                acked(&inflight, seq, result.is_ok(), &sent);
                            });
                        }
                    }
                }
                QoS::ExactlyOnce => {
                    inflight.borrow_mut().insert(seq, delivery);
                    if let Ok(received) = builder.send_exactly_once(payload).await {
                        inflight.borrow_mut().remove(&seq);
                        metrics.sent.with_label_values(&[label]).inc();
                        let _ = received.release().await;
                    }
                }
            }
        }
    }
}

fn acked(inflight: &Inflight, seq: u64, ok: bool, sent: &prometheus::IntCounter) {
    if ok {
        inflight.borrow_mut().remove(&seq);
        sent.inc();
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

/// An MQTT 5 PUBLISH with the message's properties and its remaining expiry. The broker
/// sends no topic aliases of its own: it may, and Mosquitto's 2.0 clients reject alias-only
/// PUBLISH packets.
fn v5_publish(sink: &v5::MqttSink, delivery: &Delivery) -> v5::PublishBuilder {
    let p = &delivery.publication;
    let expiry = p.remaining_expiry(Instant::now()).and_then(NonZeroU32::new);
    let props = p.properties.clone();
    let subscription_ids = delivery.subscription_ids.clone();
    sink.publish(p.topic.clone())
        .retain(delivery.retain)
        .dup(delivery.dup)
        .properties(move |out| {
            out.message_expiry_interval = expiry;
            out.content_type = props.content_type;
            out.response_topic = props.response_topic;
            out.correlation_data = props.correlation_data;
            out.user_properties = props.user_properties;
            out.is_utf8_payload = props.payload_is_utf8;
            out.subscription_ids = subscription_ids;
        })
}
