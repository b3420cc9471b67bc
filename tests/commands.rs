//! Commands with responses end to end: devices on MQTT 3.1.1 and 5.0 (rumqttc) answer commands
//! sent over the REST API; timeouts, offline devices (refused or queued with a time to live),
//! the asynchronous mode, the history, tenants, roles and bad input.

mod common;

use std::time::Duration;

use common::{Backend, TestServer, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

on_both_backends!(timeouts_offline_devices_and_queued_commands);

struct Fleet {
    server: TestServer,
    admin: String,
    tokens: Vec<(String, String)>,
}

impl Fleet {
    async fn start(devices: &[&str]) -> Fleet {
        Self::start_on(Backend::Sqlite, devices).await.unwrap()
    }

    async fn start_on(backend: Backend, devices: &[&str]) -> Option<Fleet> {
        let server = TestServer::start(backend)?;
        let admin = server.admin_token().await;
        let mut tokens = Vec::new();
        for id in devices {
            let token = server
                .register(&admin, json!({"deviceId": id, "type": "valve"}))
                .await;
            tokens.push((id.to_string(), token));
        }
        Some(Fleet {
            server,
            admin,
            tokens,
        })
    }

    fn token(&self, device: &str) -> String {
        self.tokens.iter().find(|(d, _)| d == device).unwrap().1.clone()
    }

    async fn command(&self, device: &str, body: Value) -> (StatusCode, Value) {
        self.server
            .post(&format!("/api/devices/{device}/commands"), &self.admin, body)
            .await
    }
}

/// A 3.1.1 device that answers every command with `{"requestId", "status": 200, "payload": {"echo": …}}`,
/// once subscribed. `answer` false: it only listens (for timeouts). Returns the commands it saw.
async fn device_v311(
    fleet: &Fleet,
    device: &str,
    answer: bool,
) -> (rumqttc::AsyncClient, mpsc::UnboundedReceiver<Value>) {
    let mut options = rumqttc::MqttOptions::new(device, "127.0.0.1", fleet.server.mqtt.port());
    options.set_credentials(device, fleet.token(device));
    let (client, mut events) = rumqttc::AsyncClient::new(options, 16);
    client
        .subscribe(format!("devices/{device}/commands/+"), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let responder = client.clone();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            match event {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    let _ = ready_tx.send(());
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    let command: Value = serde_json::from_slice(&p.payload).unwrap();
                    let _ = seen_tx.send(json!({"topic": p.topic, "body": command}));
                    if answer {
                        let reply = json!({"requestId": command["requestId"], "status": 200,
                                           "payload": {"echo": command["payload"]}});
                        let _ = responder
                            .publish(
                                format!("{}/response", p.topic),
                                rumqttc::QoS::AtLeastOnce,
                                false,
                                reply.to_string(),
                            )
                            .await;
                    }
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, ready_rx.recv())
        .await
        .expect("subscribed");
    (client, seen_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_round_trip_on_mqtt_3_1_1_and_its_history() {
    let fleet = Fleet::start(&["valve-1"]).await;
    let (_device, mut seen) = device_v311(&fleet, "valve-1", true).await;
    let (status, body) = fleet
        .command(
            "valve-1",
            json!({"name": "close", "payload": {"valve": "main"}, "timeoutSecs": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["responseStatus"], 200);
    assert_eq!(body["response"], json!({"echo": {"valve": "main"}}));
    let id = body["id"].as_str().unwrap().to_string();

    let delivered = seen.recv().await.unwrap();
    assert_eq!(delivered["topic"], "devices/valve-1/commands/close");
    assert_eq!(
        delivered["body"],
        json!({"requestId": id, "payload": {"valve": "main"}})
    );

    let (status, history) = fleet
        .server
        .get("/api/devices/valve-1/commands", &fleet.admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{history}");
    assert_eq!(history["commands"][0]["id"], id.as_str());
    assert_eq!(history["commands"][0]["requestedBy"], "user:admin");
    let (status, one) = fleet
        .server
        .get(&format!("/api/commands/{id}"), &fleet.admin)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["status"], "succeeded");
    assert!(
        one["sentAt"].is_string() && one["completedAt"].is_string(),
        "{one}"
    );

    // Asynchronous: 202 at once, the answer at /api/commands/{id}.
    let (status, body) = fleet
        .command("valve-1", json!({"name": "open", "mode": "async"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    eventually(WAIT, "the async command answered", || async {
        fleet
            .server
            .get(&format!("/api/commands/{id}"), &fleet.admin)
            .await
            .1["status"]
            == "succeeded"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_round_trip_on_mqtt_5_with_response_topic_and_correlation_data() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    let fleet = Fleet::start(&["valve-5"]).await;
    let mut options = rumqttc::v5::MqttOptions::new("valve-5", "127.0.0.1", fleet.server.mqtt.port());
    options.set_credentials("valve-5", fleet.token("valve-5"));
    let (client, mut events) = rumqttc::v5::AsyncClient::new(options, 16);
    client
        .subscribe("devices/valve-5/commands/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let responder = client.clone();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            match event {
                rumqttc::v5::Event::Incoming(Packet::SubAck(_)) => {
                    let _ = ready_tx.send(());
                }
                rumqttc::v5::Event::Incoming(Packet::Publish(p)) => {
                    let props = p.properties.clone().unwrap_or_default();
                    let _ = seen_tx.send((props.response_topic.clone(), props.correlation_data.clone()));
                    let (Some(topic), Some(correlation)) = (props.response_topic, props.correlation_data)
                    else {
                        continue;
                    };
                    let reply = PublishProperties {
                        correlation_data: Some(correlation),
                        ..Default::default()
                    };
                    // A bare MQTT 5 answer: the whole body is the payload.
                    let _ = responder
                        .publish_with_properties(topic, QoS::AtLeastOnce, false, r#"{"uptime": 5}"#, reply)
                        .await;
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, ready_rx.recv())
        .await
        .expect("subscribed");
    let (status, body) = fleet
        .command("valve-5", json!({"name": "status", "timeoutSecs": 10}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["response"], json!({"uptime": 5}));
    let (response_topic, correlation) = seen_rx.recv().await.unwrap();
    assert_eq!(
        response_topic.as_deref(),
        Some("devices/valve-5/commands/status/response")
    );
    assert_eq!(
        correlation.as_deref(),
        Some(body["id"].as_str().unwrap().as_bytes())
    );
}

async fn timeouts_offline_devices_and_queued_commands(backend: Backend) {
    let Some(fleet) = Fleet::start_on(backend, &["quiet-1", "sleepy-1"]).await else {
        return;
    };
    // Connected, never answers: 504 after the timeout, recorded as timed out.
    let (_quiet, mut seen) = device_v311(&fleet, "quiet-1", false).await;
    let (status, body) = fleet
        .command("quiet-1", json!({"name": "reboot", "timeoutSecs": 1}))
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "command_timeout");
    assert!(seen.recv().await.is_some(), "the device had the command");
    let (_, history) = fleet
        .server
        .get("/api/devices/quiet-1/commands", &fleet.admin)
        .await;
    assert_eq!(history["commands"][0]["status"], "timed_out");

    // Offline: refused, or kept with a time to live and delivered when the device is back.
    let (status, body) = fleet.command("sleepy-1", json!({"name": "wake"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "device_offline");
    let (status, body) = fleet
        .command(
            "sleepy-1",
            json!({"name": "wake", "payload": {"n": 1}, "ttlSecs": 60, "timeoutSecs": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "queued");
    assert!(body["expiresAt"].is_string());
    let id = body["id"].as_str().unwrap().to_string();
    let (status, body) = fleet
        .command("sleepy-1", json!({"name": "short", "ttlSecs": 1}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let expiring = body["id"].as_str().unwrap().to_string();
    eventually(WAIT, "the short-lived command expired", || async {
        fleet
            .server
            .get(&format!("/api/commands/{expiring}"), &fleet.admin)
            .await
            .1["status"]
            == "expired"
    })
    .await;

    let (_sleepy, mut seen) = device_v311(&fleet, "sleepy-1", true).await;
    let delivered = tokio::time::timeout(WAIT, seen.recv()).await.unwrap().unwrap();
    assert_eq!(delivered["topic"], "devices/sleepy-1/commands/wake");
    eventually(WAIT, "the queued command answered", || async {
        let (_, c) = fleet
            .server
            .get(&format!("/api/commands/{id}"), &fleet.admin)
            .await;
        c["status"] == "succeeded" && c["response"] == json!({"echo": {"n": 1}})
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_respect_tenants_and_roles_and_refuse_bad_input() {
    let fleet = Fleet::start(&["valve-1"]).await;
    let viewer = fleet.server.api_key(&fleet.admin, "viewer").await;
    let other = fleet.server.tenant_admin(&fleet.admin, "other").await;
    let (status, body) = fleet
        .server
        .post("/api/devices/valve-1/commands", &viewer, json!({"name": "close"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = fleet
        .server
        .post("/api/devices/valve-1/commands", &other, json!({"name": "close"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = fleet.server.get("/api/devices/valve-1/commands", &other).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = fleet
        .command("valve-1", json!({"name": "x", "ttlSecs": 60}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["id"].as_str().unwrap();
    let (status, _) = fleet.server.get(&format!("/api/commands/{id}"), &other).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "another tenant does not see the command"
    );
    let (status, _) = fleet.server.get(&format!("/api/commands/{id}"), &viewer).await;
    assert_eq!(status, StatusCode::OK, "a viewer reads commands");
    let (status, _) = fleet.server.get("/api/devices/valve-1/commands", &viewer).await;
    assert_eq!(status, StatusCode::OK);

    for (body, code) in [
        (json!({"name": "a/b"}), "validation_failed"),
        (json!({"name": "#"}), "validation_failed"),
        (json!({"name": ""}), "validation_failed"),
        (json!({"name": "ok", "timeoutSecs": 0}), "validation_failed"),
        (json!({"name": "ok", "timeoutSecs": 100000}), "validation_failed"),
        (json!({"name": "ok", "mode": "later"}), "validation_failed"),
        (json!({"name": "ok", "ttlSecs": 0}), "validation_failed"),
        (json!({"name": "ok", "surprise": 1}), "unknown_field"),
        (json!({"payload": {}}), "missing_field"),
    ] {
        let (status, answer) = fleet.command("valve-1", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {answer}");
        assert_eq!(answer["error"]["code"], code, "{body} -> {answer}");
    }
    let (status, _) = fleet.command("ghost", json!({"name": "close"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = fleet.command("bad id!", json!({"name": "close"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = fleet.server.get("/api/commands/nope", &fleet.admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
