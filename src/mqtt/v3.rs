//! MQTT 3.1.1: ntex-mqtt services that decode packets and hand them to [`Connection`].

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use ntex::service::{ServiceFactory, fn_factory_with_config, fn_service};
use ntex::time::Seconds;
use ntex_mqtt::{Control, v3};

use super::auth::{Credentials, Refusal};
use super::connection::{
    self, BrokerError, ConnectRefusal, ConnectRequest, Connection, ConnectionSlot, InboundPublish,
    MqttContext, Protocol, PublishRefusal, Sink, SubscribeResult, Will,
};
use super::message::{MessageProperties, Publication};
use super::qos2::Qos2Link;
use crate::logging::clip;

type Session = v3::Session<Rc<Connection>>;

pub async fn handshake(
    ctx: Arc<MqttContext>,
    hs: v3::Handshake,
) -> Result<v3::HandshakeAck<Rc<Connection>>, BrokerError> {
    let Some(slot) = ConnectionSlot::reserve(&ctx.broker) else {
        ctx.broker
            .metrics
            .refused
            .with_label_values(&["connect", "connection_limit"])
            .inc();
        return Ok(hs.service_unavailable());
    };
    let pkt = hs.packet();
    let keep_alive = pkt.keep_alive;
    let client_id = pkt.client_id.to_string();
    let will = pkt.last_will.as_ref().map(|w| Will {
        publication: Publication {
            topic: w.topic.clone(),
            payload: w.message.clone(),
            qos: w.qos,
            retain: w.retain,
            properties: MessageProperties::default(),
            received_at: Instant::now(),
            origin: None,
        },
        delay_secs: 0,
    });
    let request = ConnectRequest {
        protocol: Protocol::V3,
        client_id: &client_id,
        credentials: Credentials {
            username: pkt.username.as_deref(),
            password: pkt.password.as_deref(),
            certificates: connection::peer_certificates(hs.io()),
        },
        clean_start: pkt.clean_session,
        session_expiry_secs: None,
        keep_alive,
        will,
        qos2: hs.io().query::<Qos2Link>().as_ref().cloned(),
        topic_alias_max: 0,
    };
    match connection::connect(&ctx, slot, request).await {
        Ok(accepted) => {
            let mut ack = hs
                .ack(accepted.connection, accepted.session_present)
                .max_send(Some(ctx.config.max_inflight));
            if keep_alive == 0 {
                // Keep-alive 0 turns the mechanism off (MQTT 3.1.1 §3.1.2.10).
                ack = ack.idle_timeout(Seconds::ZERO);
            }
            Ok(ack)
        }
        Err(refusal) => {
            refused(&ctx, &client_id, peer_ip(hs.io()), &refusal);
            Ok(match refusal {
                ConnectRefusal::ConnectionLimit | ConnectRefusal::Auth(Refusal::Unavailable) => {
                    hs.service_unavailable()
                }
                ConnectRefusal::Auth(Refusal::BadCredentials(_)) => hs.bad_username_or_pwd(),
                ConnectRefusal::Auth(Refusal::NotAuthorized(_)) => hs.not_authorized(),
                ConnectRefusal::ClientId(_) | ConnectRefusal::KeepAlive => hs.identifier_rejected(),
            })
        }
    }
}

/// The address a connection comes from, as the audit log records it.
pub fn peer_ip(io: &ntex::io::IoBoxed) -> Option<String> {
    io.query::<ntex::io::types::PeerAddr>()
        .get()
        .map(|peer| peer.0.ip().to_string())
}

/// Counts, logs and audits a refused CONNECT (never with the credentials). The client id is
/// clipped: a refused client is not identified, and what it sends must not fill the disk.
/// Repeated refusals from one source are aggregated by the audit writer.
pub fn refused(ctx: &MqttContext, client_id: &str, source_ip: Option<String>, refusal: &ConnectRefusal) {
    let reason = match refusal {
        ConnectRefusal::ConnectionLimit => "connection_limit",
        ConnectRefusal::Auth(r) => r.label(),
        ConnectRefusal::ClientId(_) => "client_id",
        ConnectRefusal::KeepAlive => "keep_alive_above_maximum",
    };
    ctx.broker
        .metrics
        .refused
        .with_label_values(&["connect", reason])
        .inc();
    let client = clip(client_id);
    // One process-wide budget: refusals need no credentials, so their lines are rate limited
    // per reason (the count is in the metrics and the audit log whatever is logged).
    static BUDGET: std::sync::LazyLock<std::sync::Mutex<crate::logging::LogBudget>> =
        std::sync::LazyLock::new(Default::default);
    let admission = match BUDGET.lock() {
        Ok(mut budget) => budget.admit(reason, Instant::now()),
        Err(_) => crate::logging::LogAdmission {
            log: true,
            suppressed: 0,
        },
    };
    if admission.suppressed > 0 {
        tracing::warn!(
            reason,
            suppressed = admission.suppressed,
            "MQTT connect refusals not logged in the last interval"
        );
    }
    if admission.log {
        tracing::warn!(%client, source = source_ip.as_deref().unwrap_or("-"), reason, "MQTT connect refused");
    }
    ctx.audit.submit(crate::storage::records::AuditEvent {
        actor: crate::storage::records::AuditActor {
            tenant: None,
            actor: format!("mqtt:{client}"),
            source_ip,
        },
        action: "mqtt.connect".into(),
        target: None,
        outcome: crate::storage::records::AuditOutcome::Denied,
        detail: Some(serde_json::json!({ "reason": reason })),
    });
}

pub async fn publish(session: Session, mut p: v3::Publish) -> Result<(), BrokerError> {
    let payload = connection::publish_payload(p.take_payload());
    let inbound = InboundPublish {
        topic: &p.packet().topic,
        qos: session.inbound_qos(p.qos(), p.id()),
        retain: p.retain(),
        packet_id: p.id(),
        payload_size: p.payload_size(),
        properties: MessageProperties::default(),
    };
    match session.publish(inbound, payload).outcome().await {
        Ok(()) => Ok(()),
        // MQTT 3.1.1 has no negative acknowledgement: the message is acknowledged and dropped.
        Err(PublishRefusal::NotAuthorized(_) | PublishRefusal::Rejected { .. }) => Ok(()),
        // The rest closes the connection; what was not acknowledged is resent by the client.
        Err(other) => Err(BrokerError::Refused(other)),
    }
}

pub fn protocol() -> impl ServiceFactory<
    v3::ProtocolMessage,
    Session,
    Response = v3::ProtocolMessageAck,
    Error = BrokerError,
    InitError = BrokerError,
> {
    fn_factory_with_config(async |session: Session| {
        Ok(fn_service(move |message: v3::ProtocolMessage| {
            let session = session.clone();
            async move {
                Ok(match message {
                    v3::ProtocolMessage::Subscribe(mut s) => {
                        let mut retained = Vec::new();
                        for mut sub in s.iter_mut() {
                            let filter = sub.topic().clone();
                            match session.subscribe(
                                &filter,
                                connection::v3_sub_options(sub.qos()),
                                &mut retained,
                            ) {
                                SubscribeResult::Granted(qos) => sub.confirm(qos),
                                _ => sub.fail(),
                            }
                        }
                        if !retained.is_empty() {
                            let connection = (*session).clone();
                            ntex::rt::spawn(async move { connection.send_retained(retained) });
                        }
                        s.ack()
                    }
                    v3::ProtocolMessage::Unsubscribe(s) => {
                        for filter in s.iter() {
                            session.unsubscribe(filter);
                        }
                        s.ack()
                    }
                    v3::ProtocolMessage::PublishRelease(release) => {
                        session.released(release.id().get());
                        release.ack()
                    }
                    v3::ProtocolMessage::Ping(ping) => ping.ack(),
                    v3::ProtocolMessage::Disconnect(d) => {
                        session.disconnect_requested(false, None);
                        d.ack()
                    }
                })
            }
        }))
    })
}

pub fn control() -> impl ServiceFactory<
    Control<BrokerError>,
    Session,
    Response = Option<v3::codec::Encoded>,
    Error = BrokerError,
    InitError = BrokerError,
> {
    fn_factory_with_config(async |session: Session| {
        // Created once per connection after CONNACK: the outbound task starts here.
        session.spawn_outbound(Sink::V3(session.sink().clone()));
        Ok(fn_service(move |message: Control<BrokerError>| {
            let session = session.clone();
            async move {
                if let Control::Stop(reason) = message {
                    connection::settle().await;
                    session.closed(&connection::describe_stop(&reason));
                }
                // MQTT 3.1.1 has no server DISCONNECT.
                Ok(None)
            }
        }))
    })
}
