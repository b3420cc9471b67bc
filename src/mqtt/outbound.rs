//! The broker side of the device actors' [`DeviceOutbound`]: shadow replies and deltas are
//! published into the tenant's namespace like any message, so every subscriber of the topic
//! (the device, a backend application) receives them.

use std::sync::Arc;

use drover_actors::outbound::CommandMessage;
use drover_actors::{DeviceOutbound, TenantId};
use ntex_mqtt::QoS;

use super::acl::Namespace;
use super::broker::Broker;
use super::message::Publication;

pub struct BrokerOutbound {
    broker: Arc<Broker>,
}

impl BrokerOutbound {
    pub fn new(broker: Arc<Broker>) -> BrokerOutbound {
        BrokerOutbound { broker }
    }
}

impl DeviceOutbound for BrokerOutbound {
    fn publish(&self, tenant: &TenantId, topic: String, payload: bytes::Bytes) {
        // QoS 1: each subscriber gets it at the QoS of its subscription, up to 1.
        let publication = Publication::internal(
            topic,
            ntex::util::Bytes::copy_from_slice(&payload),
            QoS::AtLeastOnce,
            false,
        );
        self.broker
            .publish(&Namespace::Tenant(tenant.clone()), publication);
    }

    fn publish_command(&self, tenant: &TenantId, message: CommandMessage) {
        let mut publication = Publication::internal(
            message.topic,
            ntex::util::Bytes::copy_from_slice(&message.payload),
            QoS::AtLeastOnce,
            false,
        );
        publication.properties.response_topic = message.response_topic.map(Into::into);
        publication.properties.correlation_data = message
            .correlation
            .map(|c| ntex::util::Bytes::copy_from_slice(&c));
        publication.properties.message_expiry = message.expiry_secs;
        publication.properties.content_type = Some("application/json".into());
        self.broker
            .publish(&Namespace::Tenant(tenant.clone()), publication);
    }
}
