//! How messages and sessions travel between nodes: publications as Redis stream entries
//! (binary payload as it is), handed-over sessions as JSON.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use drover_actors::TenantId;
use ntex::util::{ByteString, Bytes};
use ntex_mqtt::QoS;
use serde::{Deserialize, Serialize};

use crate::mqtt::acl::Namespace;
use crate::mqtt::broker::TakenSession;
use crate::mqtt::message::{Delivery, MessageProperties, Publication};
use crate::mqtt::session::SubOptions;
use crate::mqtt::topic::Subscription;

/// A namespace as a key part: `t:<tenant>` or `anon`.
pub fn namespace_key(namespace: &Namespace) -> String {
    match namespace {
        Namespace::Tenant(t) => format!("t:{t}"),
        Namespace::Anonymous => "anon".into(),
    }
}

pub fn parse_namespace(key: &str) -> Option<Namespace> {
    match key {
        "anon" => Some(Namespace::Anonymous),
        _ => TenantId::parse(key.strip_prefix("t:")?)
            .ok()
            .map(Namespace::Tenant),
    }
}

pub fn qos_number(qos: QoS) -> u8 {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

pub fn qos_from(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// MQTT 5 properties, as JSON; omitted from a stream entry when all are absent.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct Properties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expiry: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    user: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    utf8: bool,
}

impl Properties {
    fn of(p: &MessageProperties, received_at: Instant) -> Properties {
        // The expiry left, so the receiving node counts from its own clock.
        let expiry = p.message_expiry.map(|secs| {
            let elapsed = u32::try_from(received_at.elapsed().as_secs()).unwrap_or(u32::MAX);
            secs.saturating_sub(elapsed).max(1)
        });
        Properties {
            expiry,
            content_type: p.content_type.as_ref().map(|v| v.to_string()),
            response_topic: p.response_topic.as_ref().map(|v| v.to_string()),
            correlation: p.correlation_data.as_ref().map(|v| B64.encode(v)),
            user: p
                .user_properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            utf8: p.payload_is_utf8,
        }
    }

    fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    fn into_message(self) -> MessageProperties {
        MessageProperties {
            message_expiry: self.expiry,
            content_type: self.content_type.map(ByteString::from),
            response_topic: self.response_topic.map(ByteString::from),
            correlation_data: self.correlation.and_then(|c| B64.decode(c).ok()).map(Bytes::from),
            user_properties: self
                .user
                .into_iter()
                .map(|(k, v)| (ByteString::from(k), ByteString::from(v)))
                .collect(),
            payload_is_utf8: self.utf8,
        }
    }
}

/// The fields of one forwarded publication (XADD field/value pairs).
pub fn publication_fields(
    namespace: &Namespace,
    p: &Publication,
    origin: &str,
) -> Vec<(&'static str, Vec<u8>)> {
    let mut fields = vec![
        ("ns", namespace_key(namespace).into_bytes()),
        ("t", p.topic.as_bytes().to_vec()),
        ("p", p.payload.to_vec()),
        ("q", vec![b'0' + qos_number(p.qos)]),
        ("r", vec![if p.retain { b'1' } else { b'0' }]),
        ("o", origin.as_bytes().to_vec()),
    ];
    let props = Properties::of(&p.properties, p.received_at);
    if !props.is_empty() {
        fields.push(("m", serde_json::to_vec(&props).unwrap_or_default()));
    }
    fields
}

/// A forwarded publication read back from a stream entry.
pub fn publication_from_fields(
    fields: &std::collections::HashMap<String, redis::Value>,
) -> Option<(Namespace, Publication)> {
    let bytes = |name: &str| -> Option<Vec<u8>> {
        match fields.get(name)? {
            redis::Value::BulkString(b) => Some(b.clone()),
            redis::Value::SimpleString(s) => Some(s.clone().into_bytes()),
            _ => None,
        }
    };
    let namespace = parse_namespace(std::str::from_utf8(&bytes("ns")?).ok()?)?;
    let topic = String::from_utf8(bytes("t")?).ok()?;
    let qos = qos_from(bytes("q")?.first()?.checked_sub(b'0')?);
    let retain = bytes("r")?.first() == Some(&b'1');
    let properties = match bytes("m") {
        Some(json) => serde_json::from_slice::<Properties>(&json).ok()?.into_message(),
        None => MessageProperties::default(),
    };
    Some((
        namespace,
        Publication {
            topic: topic.into(),
            payload: Bytes::from(bytes("p")?),
            qos,
            retain,
            properties,
            received_at: Instant::now(),
            origin: None,
        },
    ))
}

#[derive(Serialize, Deserialize)]
struct WireSubscription {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    share: Option<String>,
    filter: String,
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<u32>,
    read_checked: bool,
}

#[derive(Serialize, Deserialize)]
struct WireDelivery {
    topic: String,
    payload: String,
    qos: u8,
    publication_qos: u8,
    retain: bool,
    publication_retain: bool,
    #[serde(default)]
    subscription_ids: Vec<u32>,
    dup: bool,
    #[serde(default)]
    properties: Properties,
    /// Its id in the cluster's copy of the session, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
}

fn wire_delivery(d: &Delivery) -> WireDelivery {
    WireDelivery {
        topic: d.publication.topic.to_string(),
        payload: B64.encode(&d.publication.payload),
        qos: qos_number(d.qos),
        publication_qos: qos_number(d.publication.qos),
        retain: d.retain,
        publication_retain: d.publication.retain,
        subscription_ids: d.subscription_ids.iter().map(|id| id.get()).collect(),
        dup: d.dup,
        properties: Properties::of(&d.publication.properties, d.publication.received_at),
        id: d.stored.as_deref().map(str::to_string),
    }
}

fn delivery_of(d: WireDelivery) -> Option<Delivery> {
    Some(Delivery {
        publication: Arc::new(Publication {
            topic: d.topic.into(),
            payload: Bytes::from(B64.decode(d.payload).ok()?),
            qos: qos_from(d.publication_qos),
            retain: d.publication_retain,
            properties: d.properties.into_message(),
            received_at: Instant::now(),
            origin: None,
        }),
        qos: qos_from(d.qos),
        retain: d.retain,
        subscription_ids: d
            .subscription_ids
            .into_iter()
            .filter_map(NonZeroU32::new)
            .collect(),
        dup: d.dup,
        stored: d.id.map(Arc::from),
    })
}

/// One message of a persistent session as the cluster keeps it (`sq:` hash value). `sent`:
/// it may have reached the client already, so it goes out again with DUP.
pub fn encode_delivery(d: &Delivery, sent: bool) -> Vec<u8> {
    let mut wire = wire_delivery(d);
    wire.dup |= sent;
    wire.id = None;
    serde_json::to_vec(&wire).unwrap_or_default()
}

/// A stored message read back under its id.
pub fn decode_delivery(id: &str, bytes: &[u8]) -> Option<Delivery> {
    let mut wire: WireDelivery = serde_json::from_slice(bytes).ok()?;
    wire.id = Some(id.to_string());
    delivery_of(wire)
}

#[derive(Serialize, Deserialize)]
struct WireSession {
    subscriptions: Vec<WireSubscription>,
    #[serde(default)]
    queued: Vec<WireDelivery>,
    expiry_secs: u64,
    /// Who may resume it (`device:<id>`, `key:<id>`, `anonymous`): the cluster's copy only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<String>,
}

fn wire_subscription((sub, o): &(Subscription, SubOptions)) -> WireSubscription {
    WireSubscription {
        share: sub.share.clone(),
        filter: sub.filter.clone(),
        qos: qos_number(o.qos),
        no_local: o.no_local,
        retain_as_published: o.retain_as_published,
        retain_handling: o.retain_handling,
        id: o.subscription_id.map(NonZeroU32::get),
        read_checked: o.read_checked,
    }
}

/// The cluster's copy of a persistent session without its messages (kept apart, one hash
/// field each): who may resume it, its subscriptions and its expiry.
pub fn encode_stored_session(
    identity: &str,
    subscriptions: &[(Subscription, SubOptions)],
    expiry: Duration,
) -> String {
    let session = WireSession {
        subscriptions: subscriptions.iter().map(wire_subscription).collect(),
        queued: Vec::new(),
        expiry_secs: expiry.as_secs(),
        identity: Some(identity.to_string()),
    };
    serde_json::to_string(&session).unwrap_or_default()
}

/// A stored session read back: the identity that may resume it, and the session without
/// its messages.
pub fn decode_stored_session(json: &str) -> Option<(String, TakenSession)> {
    let mut session = decode_session(json)?;
    session.queued.clear();
    let identity = serde_json::from_str::<WireSession>(json).ok()?.identity?;
    Some((identity, session))
}

/// A session handed over to another node, as JSON.
pub fn encode_session(taken: &TakenSession) -> String {
    let session = WireSession {
        subscriptions: taken.subscriptions.iter().map(wire_subscription).collect(),
        queued: taken.queued.iter().map(wire_delivery).collect(),
        expiry_secs: taken.expiry.as_secs(),
        identity: None,
    };
    serde_json::to_string(&session).unwrap_or_default()
}

pub fn decode_session(json: &str) -> Option<TakenSession> {
    let session: WireSession = serde_json::from_str(json).ok()?;
    Some(TakenSession {
        subscriptions: session
            .subscriptions
            .into_iter()
            .map(|s| {
                (
                    Subscription {
                        share: s.share,
                        filter: s.filter,
                    },
                    SubOptions {
                        qos: qos_from(s.qos),
                        no_local: s.no_local,
                        retain_as_published: s.retain_as_published,
                        retain_handling: s.retain_handling,
                        subscription_id: s.id.and_then(NonZeroU32::new),
                        read_checked: s.read_checked,
                    },
                )
            })
            .collect(),
        queued: session.queued.into_iter().filter_map(delivery_of).collect(),
        expiry: Duration::from_secs(session.expiry_secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publication_survives_the_trip_through_stream_fields() {
        let tenant = TenantId::parse("acme").unwrap();
        let namespace = Namespace::Tenant(tenant);
        let mut p = Publication::internal(
            "devices/d1/telemetry",
            &b"\x00\xffbin"[..],
            QoS::AtLeastOnce,
            true,
        );
        p.properties.response_topic = Some("reply/here".into());
        p.properties.correlation_data = Some(Bytes::from_static(b"\x01\x02"));
        p.properties.user_properties = vec![("k".into(), "v".into())];
        let fields: std::collections::HashMap<String, redis::Value> =
            publication_fields(&namespace, &p, "n1")
                .into_iter()
                .map(|(k, v)| (k.to_string(), redis::Value::BulkString(v)))
                .collect();
        let (ns, back) = publication_from_fields(&fields).unwrap();
        assert_eq!(ns, namespace);
        assert_eq!(back.topic, p.topic);
        assert_eq!(back.payload, p.payload);
        assert_eq!(back.qos, QoS::AtLeastOnce);
        assert!(back.retain);
        assert_eq!(back.properties, p.properties);
    }

    #[test]
    fn namespaces_round_trip_and_garbage_is_refused() {
        assert_eq!(parse_namespace("anon"), Some(Namespace::Anonymous));
        let ns = Namespace::Tenant(TenantId::parse("t-1").unwrap());
        assert_eq!(parse_namespace(&namespace_key(&ns)), Some(ns));
        assert_eq!(parse_namespace("x:t-1"), None);
        assert_eq!(parse_namespace("t:"), None);
    }

    #[test]
    fn a_session_survives_the_handover_encoding() {
        let taken = TakenSession {
            subscriptions: vec![(
                Subscription {
                    share: None,
                    filter: "devices/+/telemetry".into(),
                },
                SubOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: false,
                    retain_handling: 1,
                    subscription_id: NonZeroU32::new(7),
                    read_checked: false,
                },
            )],
            queued: vec![Delivery {
                publication: Arc::new(Publication::internal("a/b", &b"x"[..], QoS::AtLeastOnce, false)),
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: vec![NonZeroU32::new(7).unwrap()],
                dup: true,
                stored: Some("0000000000001-00000001-n1".into()),
            }],
            expiry: Duration::from_secs(300),
        };
        let back = decode_session(&encode_session(&taken)).unwrap();
        assert_eq!(back.subscriptions, taken.subscriptions);
        assert_eq!(back.queued.len(), 1);
        assert_eq!(back.queued[0].publication.payload, Bytes::from_static(b"x"));
        assert!(back.queued[0].dup);
        assert_eq!(
            back.queued[0].stored, taken.queued[0].stored,
            "its stored id travels along"
        );
        assert_eq!(back.expiry, Duration::from_secs(300));
        assert!(decode_session("{not json").is_none());
    }

    #[test]
    fn a_stored_session_names_who_may_resume_it() {
        let subs = vec![(
            Subscription {
                share: None,
                filter: "orders/#".into(),
            },
            SubOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
                subscription_id: None,
                read_checked: false,
            },
        )];
        let json = encode_stored_session("key:k1", &subs, Duration::from_secs(600));
        let (identity, back) = decode_stored_session(&json).unwrap();
        assert_eq!(identity, "key:k1");
        assert_eq!(back.subscriptions, subs);
        assert_eq!(back.expiry, Duration::from_secs(600));
        assert!(back.queued.is_empty());
        // A handover (no identity) is not a stored session.
        let handed = encode_session(&TakenSession {
            subscriptions: subs,
            queued: Vec::new(),
            expiry: Duration::from_secs(1),
        });
        assert!(decode_stored_session(&handed).is_none());
    }

    #[test]
    fn a_stored_message_comes_back_under_its_id_marked_dup_once_sent() {
        let d = Delivery {
            publication: Arc::new(Publication::internal(
                "a/b",
                &b"\x00x"[..],
                QoS::ExactlyOnce,
                false,
            )),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![],
            dup: false,
            stored: Some("id-1".into()),
        };
        let queued = decode_delivery("id-1", &encode_delivery(&d, false)).unwrap();
        assert!(!queued.dup);
        assert_eq!(queued.stored.as_deref(), Some("id-1"));
        assert_eq!(queued.qos, QoS::AtLeastOnce);
        assert_eq!(queued.publication.qos, QoS::ExactlyOnce);
        assert_eq!(queued.publication.payload, d.publication.payload);
        assert!(decode_delivery("id-1", &encode_delivery(&d, true)).unwrap().dup);
        assert!(decode_delivery("id-1", b"[]").is_none());
    }
}
