//! What travels through the broker: a publication (shared by every subscriber it reaches) and
//! the per-subscriber delivery of it.

use std::sync::Arc;
use std::time::Instant;

use ntex::util::{ByteString, Bytes};
use ntex_mqtt::QoS;

/// MQTT 5 properties that travel with a message to its subscribers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MessageProperties {
    /// Seconds the message stays valid, counted from `received_at`.
    pub message_expiry: Option<u32>,
    pub content_type: Option<ByteString>,
    pub response_topic: Option<ByteString>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(ByteString, ByteString)>,
    pub payload_is_utf8: bool,
}

/// One published message, shared (`Arc`) by every delivery of it.
#[derive(Debug)]
pub struct Publication {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: MessageProperties,
    pub received_at: Instant,
    /// The session that published it (for MQTT 5 No Local); `None` for the platform's own.
    pub origin: Option<u64>,
}

impl Publication {
    /// A message from the platform itself (shadow replies, commands, wills).
    pub fn internal(
        topic: impl Into<ByteString>,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Publication {
        Publication {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            properties: MessageProperties::default(),
            received_at: Instant::now(),
            origin: None,
        }
    }

    /// Seconds of validity left, `None` without an expiry; `Some(0)` means expired.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        let expiry = self.properties.message_expiry?;
        let waited = now.saturating_duration_since(self.received_at).as_secs();
        Some(u32::try_from(u64::from(expiry).saturating_sub(waited)).unwrap_or(0))
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.remaining_expiry(now) == Some(0)
    }
}

/// A publication on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub publication: Arc<Publication>,
    /// The QoS it is delivered with: the lower of the publication's and the subscription's.
    pub qos: QoS,
    /// The RETAIN flag as the subscriber sees it.
    pub retain: bool,
    /// Identifiers of the subscriptions it matched (MQTT 5).
    pub subscription_ids: Vec<std::num::NonZeroU32>,
    /// Set when it is sent again after the connection that carried it was lost.
    pub dup: bool,
    /// Its id in the cluster's copy of a persistent session (cluster mode only): removed
    /// there once the client acknowledges it.
    pub stored: Option<Arc<str>>,
}

/// What a connection's outbound task is told to do.
#[derive(Debug)]
pub enum Outbound {
    Deliver(Delivery),
    /// Close the connection (MQTT 5: with this DISCONNECT reason code and string).
    Disconnect {
        reason: u8,
        message: String,
    },
}
