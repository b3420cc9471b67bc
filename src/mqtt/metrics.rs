//! Broker figures for `/metrics`.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct BrokerMetrics {
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    pub sessions: IntGauge,
    pub subscriptions: IntGauge,
    pub retained: IntGauge,
    pub received: IntCounterVec,
    pub sent: IntCounterVec,
    pub dropped: IntCounterVec,
    pub refused: IntCounterVec,
    pub slow_subscriber_disconnects: IntCounter,
    /// `received` and `sent` by QoS, resolved once: counted for every PUBLISH.
    received_by_qos: [IntCounter; 3],
    sent_by_qos: [IntCounter; 3],
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

impl BrokerMetrics {
    pub fn new(metrics: &Metrics) -> BrokerMetrics {
        let received = counter_vec(
            "drover_mqtt_messages_received_total",
            "PUBLISH packets received, by QoS",
            &["qos"],
        );
        let sent = counter_vec(
            "drover_mqtt_messages_sent_total",
            "PUBLISH packets sent to subscribers, by QoS",
            &["qos"],
        );
        let by_qos = |vec: &IntCounterVec| ["0", "1", "2"].map(|qos| vec.with_label_values(&[qos]));
        let m = BrokerMetrics {
            received_by_qos: by_qos(&received),
            sent_by_qos: by_qos(&sent),
            connections: IntGauge::new("drover_mqtt_connections", "Open MQTT connections")
                .expect("valid metric"),
            connections_total: IntCounter::new("drover_mqtt_connections_total", "MQTT connections accepted")
                .expect("valid metric"),
            sessions: IntGauge::new(
                "drover_mqtt_sessions",
                "MQTT sessions, connected or kept for reconnection",
            )
            .expect("valid metric"),
            subscriptions: IntGauge::new("drover_mqtt_subscriptions", "MQTT subscriptions")
                .expect("valid metric"),
            retained: IntGauge::new("drover_mqtt_retained_messages", "Retained MQTT messages")
                .expect("valid metric"),
            received,
            sent,
            dropped: counter_vec(
                "drover_mqtt_messages_dropped_total",
                "Messages not delivered: queue_full (slow subscriber), offline_qos0, expired, too_large (for the client), rate_limited, not_authorized (withheld by an access rule)",
                &["reason"],
            ),
            refused: counter_vec(
                "drover_mqtt_refused_total",
                "Refusals: connect (bad credentials, not authorized, limit), publish and subscribe (not authorized, invalid, quota)",
                &["kind", "reason"],
            ),
            slow_subscriber_disconnects: IntCounter::new(
                "drover_mqtt_slow_subscriber_disconnects_total",
                "Clients disconnected under MQTT_SLOW_SUBSCRIBER=backpressure for taking no message while publishers waited",
            )
            .expect("valid metric"),
        };
        for c in [
            Box::new(m.connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.connections_total.clone()),
            Box::new(m.sessions.clone()),
            Box::new(m.subscriptions.clone()),
            Box::new(m.retained.clone()),
            Box::new(m.received.clone()),
            Box::new(m.sent.clone()),
            Box::new(m.dropped.clone()),
            Box::new(m.refused.clone()),
            Box::new(m.slow_subscriber_disconnects.clone()),
        ] {
            metrics.register(c);
        }
        m
    }

    /// The counter of PUBLISH packets received at `qos`.
    pub fn received(&self, qos: ntex_mqtt::QoS) -> &IntCounter {
        &self.received_by_qos[qos as usize]
    }

    /// The counter of PUBLISH packets sent at `qos`.
    pub fn sent(&self, qos: ntex_mqtt::QoS) -> &IntCounter {
        &self.sent_by_qos[qos as usize]
    }

    pub fn qos_label(qos: ntex_mqtt::QoS) -> &'static str {
        match qos {
            ntex_mqtt::QoS::AtMostOnce => "0",
            ntex_mqtt::QoS::AtLeastOnce => "1",
            ntex_mqtt::QoS::ExactlyOnce => "2",
        }
    }
}
