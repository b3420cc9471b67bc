//! The live dashboard stream (`/ws`): a session subscribes to devices (or its whole tenant) and
//! receives their telemetry as it is accepted, before the batch holding it is committed; it
//! never sees another tenant's devices, and bad requests get an error frame, not a closed socket.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::mosquitto::{args, mosquitto};
use common::ws::{self, Socket};
use common::{Backend, TestServer};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

/// A server whose writers hold points for 10 s (or 1,000 points) before committing them.
fn slow_batching_server(backend: Backend) -> Option<TestServer> {
    TestServer::start_with(backend, |c| {
        c.telemetry.batch_interval_ms = 10_000;
    })
}

async fn open(server: &TestServer, token: &str) -> Socket {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?token={token}", server.addr))
        .await
        .expect("websocket");
    let hello = next_frame(&mut socket).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    socket
}

/// The next JSON frame (alarms and telemetry alike).
async fn next_frame(socket: &mut Socket) -> Value {
    ws::next_json(socket, WAIT).await
}

async fn request(socket: &mut Socket, frame: Value) -> Value {
    ws::request(socket, &frame.to_string(), WAIT).await
}

/// No frame arrives within `quiet`.
async fn silent(socket: &mut Socket, quiet: Duration) {
    if let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(quiet, socket.next()).await {
        panic!("unexpected frame {text}");
    }
}

async fn post_telemetry(server: &TestServer, token: &str, device: &str, body: Value) {
    // The HTTP answer waits for the commit (10 s here): send it without waiting for it.
    let (client, url, token) = (
        server.client.clone(),
        server.url(&format!("/api/devices/{device}/telemetry")),
        token.to_string(),
    );
    let accepted = tokio::spawn(async move {
        // The server may stop (end of test) before it answers.
        let Ok(response) = client.post(url).bearer_auth(token).json(&body).send().await else {
            return;
        };
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, StatusCode::OK, "{text}");
    });
    // A refusal comes at once (the commit would take 10 s): fail here rather than time out later.
    if let Ok(outcome) = tokio::time::timeout(Duration::from_millis(200), accepted).await {
        outcome.expect("the telemetry was accepted");
    }
}

async fn live_telemetry(backend: Backend) {
    let Some(server) = slow_batching_server(backend) else {
        return;
    };
    let admin = server.admin_token().await;
    let pump1 = server
        .register(&admin, json!({"deviceId": "pump-1", "type": "pump"}))
        .await;
    server
        .register(&admin, json!({"deviceId": "pump-2", "type": "pump"}))
        .await;
    let globex = server.tenant_admin(&admin, "globex").await;
    server
        .register(&globex, json!({"deviceId": "pump-9", "type": "pump"}))
        .await;

    let mut ws = open(&server, &admin).await;
    // Subscribing answers with what the session watches.
    let answer = request(&mut ws, json!({"type": "subscribe", "devices": ["pump-1"]})).await;
    assert_eq!(
        answer,
        json!({"type": "subscribed", "all": false, "devices": ["pump-1"]})
    );

    // A message of two timestamps arrives as two readings, long before its batch is committed.
    let t0 = chrono::Utc::now().timestamp_millis() - 60_000;
    post_telemetry(
        &server,
        &admin,
        "pump-1",
        json!([
            {"timestamp": t0, "metrics": {"pressure": 2.5, "running": true}},
            {"timestamp": t0 + 1000, "metrics": {"pressure": 2.75, "mode": "eco"}}
        ]),
    )
    .await;
    let frame = next_frame(&mut ws).await;
    assert_eq!(
        frame,
        json!({"type": "telemetry", "deviceId": "pump-1", "deviceType": "pump", "messages": [
            {"ts": t0, "metrics": {"pressure": 2.5, "running": true}},
            {"ts": t0 + 1000, "metrics": {"mode": "eco", "pressure": 2.75}}
        ]})
    );
    let (_, stored) = server
        .get(
            &format!(
                "/api/telemetry/pump-1?metric=pressure&start={}&end={}",
                t0 - 1,
                t0 + 2000
            ),
            &admin,
        )
        .await;
    assert_eq!(
        stored["series"][0]["points"],
        json!([]),
        "not committed yet: {stored}"
    );

    // Devices not subscribed to are not shown.
    post_telemetry(&server, &admin, "pump-2", json!({"metrics": {"pressure": 1.0}})).await;
    silent(&mut ws, Duration::from_millis(500)).await;

    // Over MQTT, and with an acknowledgement (QoS 1) that waits for the commit: the dashboard
    // has the reading while the publisher still waits for its PUBACK.
    if mosquitto() {
        let port = server.mqtt.port().to_string();
        let mut publisher = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args(&["-q", "1", "-i", "pump-1", "-u", "pump-1", "-P", &pump1]))
            .args([
                "-t",
                "devices/pump-1/telemetry",
                "-m",
                r#"{"metrics":{"pressure":3.5}}"#,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let frame = next_frame(&mut ws).await;
        assert_eq!(frame["deviceId"], "pump-1");
        assert_eq!(frame["messages"][0]["metrics"], json!({"pressure": 3.5}));
        assert!(
            publisher.try_wait().unwrap().is_none(),
            "the PUBACK waits for the commit, 10 s away"
        );
        let _ = publisher.kill();
        let _ = publisher.wait();
    }

    // The whole tenant; then back to nothing.
    let answer = request(&mut ws, json!({"type": "subscribe", "devices": "*"})).await;
    assert_eq!(
        answer,
        json!({"type": "subscribed", "all": true, "devices": ["pump-1"]})
    );
    post_telemetry(&server, &admin, "pump-2", json!({"metrics": {"pressure": 1.5}})).await;
    let frame = next_frame(&mut ws).await;
    assert_eq!(frame["deviceId"], "pump-2", "{frame}");
    let answer = request(&mut ws, json!({"type": "unsubscribe", "devices": "*"})).await;
    assert_eq!(
        answer,
        json!({"type": "subscribed", "all": false, "devices": ["pump-1"]})
    );
    let answer = request(&mut ws, json!({"type": "unsubscribe", "devices": ["pump-1"]})).await;
    assert_eq!(answer, json!({"type": "subscribed", "all": false, "devices": []}));
    post_telemetry(&server, &admin, "pump-1", json!({"metrics": {"pressure": 4.0}})).await;
    silent(&mut ws, Duration::from_millis(500)).await;

    // Another tenant's device is unknown here, even by exact id; nothing changes.
    let refused = request(
        &mut ws,
        json!({"type": "subscribe", "devices": ["pump-1", "pump-9"]}),
    )
    .await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "unknown_device");
    assert_eq!(refused["devices"], json!(["pump-9"]));
    let answer = request(&mut ws, json!({"type": "subscribe", "devices": []})).await;
    assert_eq!(
        answer["devices"],
        json!([]),
        "the refused request changed nothing"
    );

    // Bad requests get an error frame; the session stays open.
    for bad in [
        json!("not an object").to_string(),
        "{not json".to_string(),
        json!({"type": "subscribe"}).to_string(),
        json!({"type": "subscribe", "devices": "everything"}).to_string(),
        json!({"type": "explode", "devices": "*"}).to_string(),
    ] {
        ws.send(Message::text(bad.clone())).await.unwrap();
        let refused = next_frame(&mut ws).await;
        assert_eq!(refused["type"], "error", "{bad}: {refused}");
        assert_eq!(refused["code"], "invalid_request", "{bad}: {refused}");
    }
    let refused = request(
        &mut ws,
        json!({"type": "subscribe", "devices": ["no spaces allowed"]}),
    )
    .await;
    assert_eq!(refused["code"], "invalid_device_id", "{refused}");
    let too_many: Vec<String> = (0..1001).map(|i| format!("d{i}")).collect();
    let refused = request(&mut ws, json!({"type": "subscribe", "devices": too_many})).await;
    assert_eq!(refused["code"], "too_many_devices", "{refused}");

    // A session of the other tenant watching everything sees only its own devices.
    let mut other = open(&server, &globex).await;
    let answer = request(&mut other, json!({"type": "subscribe", "devices": "*"})).await;
    assert_eq!(answer["all"], true);
    post_telemetry(&server, &admin, "pump-2", json!({"metrics": {"pressure": 5.0}})).await;
    silent(&mut other, Duration::from_millis(500)).await;
    post_telemetry(&server, &globex, "pump-9", json!({"metrics": {"pressure": 6.0}})).await;
    let frame = next_frame(&mut other).await;
    assert_eq!(frame["deviceId"], "pump-9");

    // Closing the sessions removes their subscriptions.
    drop(ws);
    drop(other);
    common::eventually(WAIT, "subscriptions released", || async {
        server.state.hub.telemetry_watchers() == 0
    })
    .await;
}

on_both_backends!(live_telemetry);

/// The next frame is the close frame ending a session whose credential stopped authenticating
/// (1008, `credential revoked`); any data frame before it fails the test.
async fn closed_as_revoked(socket: &mut Socket, wait: Duration) {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let frame = tokio::time::timeout(wait, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected the socket to close, got {other:?}"),
            }
        }
    })
    .await
    .expect("closed in time")
    .expect("a close frame");
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "credential revoked");
}

/// Revoking an API key ends the live streams opened with it: a request on one closes it at
/// once, and an idle one is closed by the periodic check (every 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_key_ends_its_streams() {
    let Some(server) = TestServer::start(Backend::Sqlite) else {
        return;
    };
    let admin = server.admin_token().await;
    let (status, created) = server
        .post("/api/keys", &admin, json!({"name": "wall", "role": "viewer"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap();
    let mut idle = open(&server, key).await;
    let mut active = open(&server, key).await;
    let answer = request(&mut idle, json!({"type": "subscribe", "devices": "*"})).await;
    assert_eq!(answer["type"], "subscribed", "{answer}");

    let (status, body) = server
        .delete(
            &format!("/api/keys/{}", created["apiKey"]["id"].as_str().unwrap()),
            &admin,
        )
        .await;
    assert!(status.is_success(), "{body}");
    let subscribe = json!({"type": "subscribe", "devices": "*"}).to_string();
    active.send(Message::text(subscribe)).await.unwrap();
    closed_as_revoked(&mut active, Duration::from_secs(5)).await;
    closed_as_revoked(&mut idle, Duration::from_secs(15)).await;
}

/// A burst of messages from one device reaches the dashboard whole and in order: the frames
/// waiting for the session are written together, each still a message of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_arrives_whole_and_in_order() {
    if !mosquitto() {
        return;
    }
    let Some(server) = TestServer::start(Backend::Sqlite) else {
        return;
    };
    let admin = server.admin_token().await;
    let pump1 = server
        .register(&admin, json!({"deviceId": "pump-1", "type": "pump"}))
        .await;
    let mut ws = open(&server, &admin).await;
    let answer = request(&mut ws, json!({"type": "subscribe", "devices": ["pump-1"]})).await;
    assert_eq!(answer["type"], "subscribed", "{answer}");

    // 600 messages as fast as mosquitto_pub sends them (one per line of its input; QoS 1, so
    // none is dropped when the device's actor is busy, as QoS 0 messages may be).
    const BURST: u64 = 600;
    let lines: String = (0..BURST)
        .map(|seq| format!("{{\"metrics\":{{\"seq\":{seq}}}}}\n"))
        .collect();
    let port = server.mqtt.port().to_string();
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port])
        .args(args(&[
            "-q", "1", "-M", "1000", "-i", "pump-1", "-u", "pump-1", "-P", &pump1,
        ]))
        .args(["-t", "devices/pump-1/telemetry", "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = publisher.stdin.take().unwrap();
        stdin.write_all(lines.as_bytes()).unwrap();
    }
    let mut seqs = Vec::new();
    while (seqs.len() as u64) < BURST {
        let frame = next_frame(&mut ws).await;
        assert_ne!(frame["type"], "lagged", "nothing skipped: {frame}");
        // Analytics events (a counter drifts) come on the same stream.
        if frame["type"] != "telemetry" {
            continue;
        }
        assert_eq!(frame["deviceId"], "pump-1");
        for reading in frame["messages"].as_array().unwrap() {
            seqs.push(reading["metrics"]["seq"].as_f64().unwrap() as u64);
        }
    }
    assert_eq!(seqs, (0..BURST).collect::<Vec<_>>());
    let _ = publisher.wait();
}
