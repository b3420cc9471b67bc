//! Simulated devices answer commands (`devices/{id}/commands/{name}`), as the platform's
//! command API expects: MQTT 3.1.1 devices on `…/{name}/response` with the `requestId` in the
//! body, MQTT 5 devices on the Response Topic with the Correlation Data they were given.
//!
//! What a simulated device answers: `ping` → `{"pong": <ms>}`, `reboot` → `{"rebooting": true}`,
//! `fail` → status 500 with `{"error": "simulated failure"}`, anything else → 200 with
//! `{"command": name, "echo": payload}`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::api::DeviceCredentials;
use crate::sensors::{SensorModel, message};
use crate::simulate::Counters;

/// The filter a device subscribes to for its commands.
pub fn command_filter(device: &str) -> String {
    format!("devices/{device}/commands/+")
}

/// The command name of `topic` when it is a command to `device` (not an answer).
pub fn command_name<'a>(device: &str, topic: &'a str) -> Option<&'a str> {
    let rest = topic.strip_prefix("devices/")?.strip_prefix(device)?;
    let name = rest.strip_prefix("/commands/")?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// What the device answers: its status and payload.
pub fn execute(name: &str, payload: &Value) -> (u16, Value) {
    match name {
        "ping" => (200, json!({"pong": chrono::Utc::now().timestamp_millis()})),
        "reboot" => (200, json!({"rebooting": true})),
        "fail" => (500, json!({"error": "simulated failure"})),
        other => (200, json!({"command": other, "echo": payload})),
    }
}

/// The 3.1.1 answer to a command body: `(response topic, body)`.
pub fn answer_v311(device: &str, topic: &str, body: &[u8]) -> Option<(String, String)> {
    let name = command_name(device, topic)?;
    let command: Value = serde_json::from_slice(body).ok()?;
    let (status, payload) = execute(name, &command["payload"]);
    let reply = json!({"requestId": command["requestId"], "status": status, "payload": payload});
    Some((format!("{topic}/response"), reply.to_string()))
}

#[allow(clippy::too_many_arguments)]
/// An MQTT 5 simulated device: telemetry at `interval`, commands answered on their Response
/// Topic with their Correlation Data, until `stop`.
pub async fn run_device_v5(
    index: usize,
    device: DeviceCredentials,
    host: String,
    port: u16,
    interval: Duration,
    fault_rate: f64,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let mut rng = StdRng::seed_from_u64(index as u64);
    let mut model = SensorModel::new(&mut rng, fault_rate);
    let mut options = MqttOptions::new(&device.id, &host, port);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_credentials(&device.id, &device.token);
    let (client, mut events) = AsyncClient::new(options, 64);
    let _ = client
        .subscribe(command_filter(&device.id), QoS::AtLeastOnce)
        .await;
    let telemetry_topic = format!("devices/{}/telemetry", device.id);
    let started = Instant::now();
    let offset = interval.mul_f64(rand::Rng::gen_range(&mut rng, 0.0..1.0));
    let mut ticker = tokio::time::interval_at((Instant::now() + offset).into(), interval);
    let mut seen_online = false;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = ticker.tick() => {
                let now = chrono::Utc::now().timestamp_millis();
                let hours = started.elapsed().as_secs_f64() / 3600.0;
                let body = message(now, model.reading(&mut rng, now, hours)).to_string();
                match client.try_publish(telemetry_topic.as_str(), QoS::AtLeastOnce, false, body) {
                    Ok(()) => { counters.sent.fetch_add(1, Ordering::Relaxed); }
                    Err(_) => { counters.errors.fetch_add(1, Ordering::Relaxed); }
                }
            }
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) if !seen_online => {
                    seen_online = true;
                    counters.connected.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    counters.acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let Some(name) = command_name(&device.id, &topic) else { continue };
                    let props = p.properties.unwrap_or_default();
                    let command: Value = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    let (status, payload) = execute(name, &command["payload"]);
                    let reply = json!({"status": status, "payload": payload}).to_string();
                    let response_topic = props.response_topic.unwrap_or_else(|| format!("{topic}/response"));
                    let properties = PublishProperties {
                        correlation_data: props.correlation_data,
                        ..Default::default()
                    };
                    if client
                        .try_publish_with_properties(response_topic, QoS::AtLeastOnce, false, reply, properties)
                        .is_ok()
                    {
                        counters.commands_answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while events.poll().await.is_ok() {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_to_the_device_are_answered_on_their_response_topic() {
        assert_eq!(command_name("d1", "devices/d1/commands/reboot"), Some("reboot"));
        assert_eq!(command_name("d1", "devices/d1/commands/reboot/response"), None);
        assert_eq!(command_name("d1", "devices/d12/commands/reboot"), None);
        let (topic, body) = answer_v311(
            "d1",
            "devices/d1/commands/echo",
            br#"{"requestId": "c1", "payload": {"x": 1}}"#,
        )
        .unwrap();
        assert_eq!(topic, "devices/d1/commands/echo/response");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            json!({"requestId": "c1", "status": 200, "payload": {"command": "echo", "echo": {"x": 1}}})
        );
        let (_, failed) = answer_v311("d1", "devices/d1/commands/fail", br#"{"requestId": "c2"}"#).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&failed).unwrap()["status"], 500);
    }
}
