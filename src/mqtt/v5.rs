//! MQTT 5.0: ntex-mqtt services that decode packets and hand them to [`Connection`], and the
//! reason codes the broker answers with.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use ntex::service::{ServiceFactory, fn_factory_with_config, fn_service};
use ntex_mqtt::{Control, Reason, v5};
use v5::codec::{
    ConnectAckReason, Disconnect, DisconnectReasonCode, Packet, PublishAckReason, SubscribeAckReason,
    UnsubscribeAckReason,
};

use super::auth::{Credentials, Refusal};
use super::connection::{
    self, BrokerError, ConnectRefusal, ConnectRequest, Connection, ConnectionSlot, InboundPublish,
    MqttContext, Protocol, PublishRefusal, Sink, SubscribeResult, Will,
};
use super::message::{MessageProperties, Publication};
use super::qos2::Qos2Link;

type Session = v5::Session<Rc<Connection>>;

impl TryFrom<BrokerError> for v5::PublishAck {
    type Error = BrokerError;

    /// Refusals that do not close the connection become a PUBACK/PUBREC reason code.
    fn try_from(error: BrokerError) -> Result<Self, Self::Error> {
        let (reason, text) = match error {
            BrokerError::Refused(PublishRefusal::NotAuthorized(why)) => {
                (PublishAckReason::NotAuthorized, why)
            }
            BrokerError::Refused(PublishRefusal::Rejected { code, message }) => (
                PublishAckReason::PayloadFormatInvalid,
                format!("{code}: {message}"),
            ),
            BrokerError::Refused(PublishRefusal::Unavailable(why)) => (
                PublishAckReason::UnspecifiedError,
                format!("not stored, retry: {why}"),
            ),
            other => return Err(other),
        };
        Ok(v5::PublishAck::new(reason).reason(text.into()))
    }
}

/// Keep-alive to advertise (Server Keep Alive) and the idle timeout to enforce. A maximum of
/// 65535 means none: a client's 0 (keep-alive off) is then honoured as far as ntex allows.
fn keep_alive(client: u16, max: u16) -> (Option<u16>, u16) {
    let granted = match (client, max) {
        (0, u16::MAX) => return (None, u16::MAX),
        (_, u16::MAX) => client,
        (0, _) => max,
        _ => client.min(max),
    };
    let advertise = (granted != client).then_some(granted);
    // Idle for one and a half keep-alive periods before the connection is closed.
    (advertise, granted.saturating_add(granted / 2))
}

pub async fn handshake(
    ctx: Arc<MqttContext>,
    hs: v5::Handshake,
) -> Result<v5::HandshakeAck<Rc<Connection>>, BrokerError> {
    let Some(slot) = ConnectionSlot::reserve(&ctx.broker) else {
        ctx.broker
            .metrics
            .refused
            .with_label_values(&["connect", "connection_limit"])
            .inc();
        return Ok(hs.fail_with(v5::codec::ConnectAck {
            reason_code: ConnectAckReason::QuotaExceeded,
            reason_string: Some("connection limit reached".into()),
            ..Default::default()
        }));
    };
    let pkt = hs.packet();
    let client_id = pkt.client_id.to_string();
    let client_keep_alive = pkt.keep_alive;
    let will = pkt.last_will.as_ref().map(|w| Will {
        publication: Publication {
            topic: w.topic.clone(),
            payload: w.message.clone(),
            qos: w.qos,
            retain: w.retain,
            properties: MessageProperties {
                message_expiry: w.message_expiry_interval.map(std::num::NonZeroU32::get),
                content_type: w.content_type.clone(),
                response_topic: w.response_topic.clone(),
                correlation_data: w.correlation_data.clone(),
                user_properties: w.user_properties.clone(),
                payload_is_utf8: w.is_utf8_payload.unwrap_or(false),
            },
            received_at: Instant::now(),
            origin: None,
        },
        delay_secs: w.will_delay_interval_sec.unwrap_or(0),
    });
    let request = ConnectRequest {
        protocol: Protocol::V5,
        client_id: &client_id,
        credentials: Credentials {
            username: pkt.username.as_deref(),
            password: pkt.password.as_deref(),
            certificates: connection::peer_certificates(hs.io()),
        },
        clean_start: pkt.clean_start,
        session_expiry_secs: Some(pkt.session_expiry_interval_secs),
        keep_alive: client_keep_alive,
        will,
        qos2: hs.io().query::<Qos2Link>().as_ref().cloned(),
        topic_alias_max: pkt.topic_alias_max,
    };
    let requested_expiry = pkt.session_expiry_interval_secs;
    match connection::connect(&ctx, slot, request).await {
        Ok(accepted) => {
            let (advertise, timeout) = keep_alive(client_keep_alive, ctx.config.max_keep_alive_secs);
            let session_present = accepted.session_present;
            let assigned = accepted.assigned_client_id.clone();
            let granted_expiry = accepted.session_expiry_secs;
            Ok(hs
                .ack(accepted.connection)
                .keep_alive(timeout)
                .max_send(Some(ctx.config.max_inflight))
                .with(|ack| {
                    ack.session_present = session_present;
                    ack.retain_available = true;
                    ack.wildcard_subscription_available = true;
                    ack.shared_subscription_available = true;
                    ack.subscription_identifiers_available = true;
                    ack.server_keepalive_sec = advertise;
                    ack.assigned_client_id = assigned.map(Into::into);
                    if granted_expiry != requested_expiry {
                        ack.session_expiry_interval_secs = Some(granted_expiry);
                    }
                }))
        }
        Err(refusal) => {
            super::v3::refused(&ctx, &client_id, super::v3::peer_ip(hs.io()), &refusal);
            let (reason_code, text) = match &refusal {
                ConnectRefusal::ConnectionLimit => {
                    (ConnectAckReason::QuotaExceeded, "connection limit reached")
                }
                ConnectRefusal::Auth(Refusal::BadCredentials(_)) => (
                    ConnectAckReason::BadUserNameOrPassword,
                    "bad username or password",
                ),
                ConnectRefusal::Auth(Refusal::NotAuthorized(why)) => (ConnectAckReason::NotAuthorized, *why),
                ConnectRefusal::Auth(Refusal::Unavailable) => (
                    ConnectAckReason::ServerUnavailable,
                    "the registry is unavailable; retry later",
                ),
                ConnectRefusal::ClientId(why) => (ConnectAckReason::ClientIdentifierNotValid, *why),
                ConnectRefusal::KeepAlive => (
                    ConnectAckReason::ImplementationSpecificError,
                    "keep-alive above the maximum",
                ),
            };
            Ok(hs.fail_with(v5::codec::ConnectAck {
                reason_code,
                reason_string: Some(text.into()),
                ..Default::default()
            }))
        }
    }
}

pub async fn publish(session: Session, mut p: v5::Publish) -> Result<v5::PublishAck, BrokerError> {
    let payload = connection::publish_payload(p.take_payload());
    let props = &p.packet().properties;
    let inbound = InboundPublish {
        topic: &p.packet().topic,
        qos: session.inbound_qos(p.qos(), p.id()),
        retain: p.retain(),
        packet_id: p.id(),
        payload_size: p.payload_size(),
        properties: MessageProperties {
            message_expiry: props.message_expiry_interval.map(std::num::NonZeroU32::get),
            content_type: props.content_type.clone(),
            response_topic: props.response_topic.clone(),
            correlation_data: props.correlation_data.clone(),
            user_properties: props.user_properties.clone(),
            payload_is_utf8: props.is_utf8_payload,
        },
    };
    match session.publish(inbound, payload).outcome().await {
        Ok(()) => Ok(p.ack()),
        Err(refusal) => Err(BrokerError::Refused(refusal)),
    }
}

pub fn protocol() -> impl ServiceFactory<
    v5::ProtocolMessage,
    Session,
    Response = v5::ProtocolMessageAck,
    Error = BrokerError,
    InitError = BrokerError,
> {
    fn_factory_with_config(async |session: Session| {
        Ok(fn_service(move |message: v5::ProtocolMessage| {
            let session = session.clone();
            async move {
                Ok(match message {
                    v5::ProtocolMessage::Subscribe(mut s) => {
                        let id = s.packet().id;
                        let mut retained = Vec::new();
                        for mut sub in s.iter_mut() {
                            let filter = sub.topic().clone();
                            let options = connection::sub_options(sub.options(), id);
                            match session.subscribe(&filter, options, &mut retained) {
                                SubscribeResult::Granted(qos) => sub.confirm(qos),
                                SubscribeResult::TopicFilterInvalid => {
                                    sub.fail(SubscribeAckReason::TopicFilterInvalid)
                                }
                                SubscribeResult::NotAuthorized => sub.fail(SubscribeAckReason::NotAuthorized),
                                SubscribeResult::QuotaExceeded => sub.fail(SubscribeAckReason::QuotaExceeded),
                            }
                        }
                        if !retained.is_empty() {
                            let connection = (*session).clone();
                            ntex::rt::spawn(async move { connection.send_retained(retained) });
                        }
                        s.ack()
                    }
                    v5::ProtocolMessage::Unsubscribe(mut s) => {
                        for mut item in s.iter_mut() {
                            if !session.unsubscribe(item.topic()) {
                                item.fail(UnsubscribeAckReason::NoSubscriptionExisted);
                            }
                        }
                        s.ack()
                    }
                    v5::ProtocolMessage::PublishRelease(release) => {
                        session.released(release.packet().packet_id.get());
                        release.ack()
                    }
                    v5::ProtocolMessage::Ping(ping) => ping.ack(),
                    v5::ProtocolMessage::Disconnect(d) => {
                        let packet = d.packet();
                        let with_will = packet.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                        session.disconnect_requested(with_will, packet.session_expiry_interval_secs);
                        d.ack()
                    }
                    // Enhanced authentication is not offered.
                    v5::ProtocolMessage::Auth(a) => v5::ProtocolMessage::Auth(a)
                        .disconnect_with(Disconnect::new(DisconnectReasonCode::BadAuthenticationMethod)),
                })
            }
        }))
    })
}

pub fn control() -> impl ServiceFactory<
    Control<BrokerError>,
    Session,
    Response = Option<v5::codec::Encoded>,
    Error = BrokerError,
    InitError = BrokerError,
> {
    fn_factory_with_config(async |session: Session| {
        session.spawn_outbound(Sink::V5(session.sink().clone()));
        Ok(fn_service(move |message: Control<BrokerError>| {
            let session = session.clone();
            async move {
                let Control::Stop(reason) = message else {
                    return Ok(None);
                };
                connection::settle().await;
                session.closed(&connection::describe_stop(&reason));
                Ok(disconnect_for(&reason).map(|d| Packet::Disconnect(d).into()))
            }
        }))
    })
}

/// The DISCONNECT sent when the broker ends a connection (none when the peer left).
fn disconnect_for(reason: &Reason<BrokerError>) -> Option<Disconnect> {
    use ntex_mqtt::error::{DecodeError, ProtocolError};
    match reason {
        Reason::PeerGone(_) => None,
        Reason::Protocol(e) => {
            let mut d = match e.get_ref() {
                ProtocolError::Decode(DecodeError::MaxSizeExceeded { .. }) => {
                    Disconnect::new(DisconnectReasonCode::PacketTooLarge)
                }
                ProtocolError::Decode(DecodeError::Utf8Error) => {
                    Disconnect::new(DisconnectReasonCode::TopicNameInvalid)
                }
                ProtocolError::Decode(_) => Disconnect::new(DisconnectReasonCode::MalformedPacket),
                other => Disconnect::from_proto_error(other),
            };
            d.reason_string = Some(e.get_ref().to_string().into());
            Some(d)
        }
        Reason::Error(e) => {
            let (code, text) = match e.get_ref() {
                BrokerError::Refused(PublishRefusal::TooLarge(size)) => (
                    DisconnectReasonCode::PacketTooLarge,
                    format!("payload of {size} bytes is over the limit"),
                ),
                BrokerError::Refused(PublishRefusal::TopicInvalid(why)) => {
                    (DisconnectReasonCode::TopicNameInvalid, why.to_string())
                }
                BrokerError::Refused(PublishRefusal::RateTooHigh) => (
                    DisconnectReasonCode::MessageRateTooHigh,
                    "publish rate above the limit".to_string(),
                ),
                other => (DisconnectReasonCode::UnspecifiedError, format!("{other:?}")),
            };
            let mut d = Disconnect::new(code);
            d.reason_string = Some(text.into());
            Some(d)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::keep_alive;

    #[test]
    fn keep_alive_is_capped_and_advertised() {
        assert_eq!(keep_alive(60, u16::MAX), (None, 90));
        assert_eq!(keep_alive(0, u16::MAX), (None, u16::MAX));
        assert_eq!(keep_alive(60, 30), (Some(30), 45));
        assert_eq!(keep_alive(0, 30), (Some(30), 45));
        assert_eq!(keep_alive(10, 30), (None, 15));
    }
}
