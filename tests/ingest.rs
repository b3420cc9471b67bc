//! Telemetry ingestion end to end: MQTT, HTTP and WebSocket senders are answered only after
//! their points are committed (read back through the query API right after the answer), bad
//! payloads get their specific errors and store nothing, a SIGKILL loses no acknowledged point,
//! and an InfluxDB outage is bridged by the spool with every point stored exactly once.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::mosquitto::{args, mosquitto, publish, with};
use common::ws::Socket;
use common::{ADMIN_PASSWORD, Backend, TestServer, eventually, services_required, tool_available};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Points of `metric` of `device` in the last hour, as (epoch ms, value).
async fn points(server: &TestServer, token: &str, device: &str, metric: &str) -> Vec<(i64, Value)> {
    let start = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let (status, body) = server
        .get(
            &format!("/api/telemetry/{device}?metric={metric}&start={start}&limit=100000"),
            token,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["series"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let t = chrono::DateTime::parse_from_rfc3339(p["t"].as_str().unwrap()).unwrap();
            (t.timestamp_millis(), p["v"].clone())
        })
        .collect()
}

/// A server whose writers hold points for a second before writing them: an answer that came
/// before the commit would show up as a point missing from the read that follows it.
fn slow_batching_server() -> TestServer {
    TestServer::start_with(Backend::Sqlite, |c| {
        c.telemetry.batch_interval_ms = 1000;
        c.telemetry.batch_size = 100_000;
        c.telemetry.writer_queue_points = 100_000;
    })
    .unwrap()
}

async fn post_telemetry(server: &TestServer, device: &str, auth: &str, body: &str) -> (StatusCode, Value) {
    let response = server
        .client
        .post(server.url(&format!("/api/devices/{device}/telemetry")))
        .header("Authorization", format!("Bearer {auth}"))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_publish_is_readable_once_its_puback_arrives() {
    if !mosquitto() {
        return;
    }
    let server = slow_batching_server();
    let admin = server.admin_token().await;
    let token = server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "thermometer"}))
        .await;
    let port = server.mqtt.port().to_string();
    let device = args(&["-q", "1", "-i", "sensor-001", "-u", "sensor-001", "-P", &token]);
    for (version, value) in [("mqttv311", 21.5), ("mqttv5", 22.5)] {
        let payload = json!({"metrics": {"temperature": value}}).to_string();
        let started = Instant::now();
        let (code, out) = publish(
            &port,
            &with(
                device.clone(),
                &[
                    "-V",
                    version,
                    "-t",
                    "devices/sensor-001/telemetry",
                    "-m",
                    &payload,
                ],
            ),
        );
        assert_eq!(code, 0, "{out}");
        // The PUBACK waited for the batch's commit (up to the 1 s batch interval)…
        let waited = started.elapsed();
        // …so the point is there at once.
        let stored = points(&server, &admin, "sensor-001", "temperature").await;
        assert!(
            stored.iter().any(|(_, v)| v == &json!(value)),
            "{version}: {value} missing right after PUBACK (after {waited:?}): {stored:?}"
        );
    }
    // A payload that is not telemetry is refused with PUBACK reason 0x99 on v5 and stores nothing.
    let (code, out) = publish(
        &port,
        &with(
            device,
            &[
                "-V",
                "mqttv5",
                "-t",
                "devices/sensor-001/telemetry",
                "-m",
                r#"{"metrics":{"temperature":"#,
            ],
        ),
    );
    assert!(out.contains("PUBACK") || code != 0, "{out}");
    assert_eq!(
        points(&server, &admin, "sensor-001", "temperature").await.len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingestion_answers_after_commit_and_refuses_bad_input_specifically() {
    let server = slow_batching_server();
    let admin = server.admin_token().await;
    let token = server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "thermometer"}))
        .await;
    let other_token = server
        .register(&admin, json!({"deviceId": "sensor-002", "type": "t"}))
        .await;
    let operator = server.api_key(&admin, "operator").await;
    let viewer = server.api_key(&admin, "viewer").await;
    let now = chrono::Utc::now().timestamp_millis();

    // One message with the device token, a batch with an operator's API key.
    let (status, body) = post_telemetry(
        &server,
        "sensor-001",
        &token,
        r#"{"metrics":{"temperature":20.5,"door":true,"mode":"eco"}}"#,
    )
    .await;
    assert_eq!(
        (status, body["points"].clone()),
        (StatusCode::OK, json!(3)),
        "{body}"
    );
    let batch = json!([
        {"timestamp": now - 2000, "metrics": {"temperature": 19.0}},
        {"timestamp": now - 1000, "metrics": {"temperature": 19.5}}
    ]);
    let (status, body) = post_telemetry(&server, "sensor-001", &operator, &batch.to_string()).await;
    assert_eq!(
        (status, body["points"].clone()),
        (StatusCode::OK, json!(2)),
        "{body}"
    );
    // Messages without a timestamp are stamped by the server, each with its own millisecond,
    // so none replaces another (a batch, or two arriving in the same millisecond).
    let unstamped = r#"[{"metrics":{"counter":1}},{"metrics":{"counter":2}},{"metrics":{"counter":3}}]"#;
    let (status, _) = post_telemetry(&server, "sensor-001", &token, unstamped).await;
    assert_eq!(status, StatusCode::OK);
    let counters = points(&server, &admin, "sensor-001", "counter").await;
    assert_eq!(
        counters.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
        vec![json!(1.0), json!(2.0), json!(3.0)]
    );
    // Read at once: the 200 came after the commit.
    let stored = points(&server, &admin, "sensor-001", "temperature").await;
    assert_eq!(stored.len(), 3, "{stored:?}");
    assert!(stored.contains(&(now - 2000, json!(19.0))));
    assert_eq!(
        points(&server, &admin, "sensor-001", "door").await[0].1,
        json!(true)
    );
    assert_eq!(
        points(&server, &admin, "sensor-001", "mode").await[0].1,
        json!("eco")
    );

    // Each fault has its own code, and none of them stores anything.
    let far_future = now + 86_400_000;
    let bad: Vec<(String, &str)> = vec![
        (r#"{"metrics":{"temperature":"#.into(), "invalid_json"),
        (r#"{"metrics":{"temperature":[1,2]}}"#.into(), "invalid_value"),
        (r#"{"metrics":{"temperature":{"c":1}}}"#.into(), "invalid_value"),
        (r#"{"metrics":{"bad name!":1}}"#.into(), "invalid_metric_name"),
        (r#"{"metrics":{}}"#.into(), "empty_message"),
        ("[]".into(), "empty_message"),
        (r#""just a string""#.into(), "invalid_message"),
        (
            format!(r#"{{"timestamp":{far_future},"metrics":{{"temperature":1}}}}"#),
            "timestamp_out_of_range",
        ),
        (
            r#"{"timestamp":"yesterday","metrics":{"temperature":1}}"#.into(),
            "invalid_timestamp",
        ),
        // A good message followed by a bad one: the batch is refused whole.
        (
            r#"[{"metrics":{"temperature":5}},{"metrics":{"temperature":null}}]"#.into(),
            "invalid_value",
        ),
    ];
    for (payload, code) in &bad {
        let (status, body) = post_telemetry(&server, "sensor-001", &token, payload).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{payload}: {body}");
        assert_eq!(body["error"]["code"], *code, "{payload}: {body}");
    }
    let huge = format!(r#"{{"metrics":{{"s":"{}"}}}}"#, "x".repeat(2 * 1024 * 1024));
    let (status, body) = post_telemetry(&server, "sensor-001", &token, &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], "payload_too_large");
    assert_eq!(
        points(&server, &admin, "sensor-001", "temperature").await.len(),
        3
    );

    // Who may send: the device's own token, or an operator of its tenant.
    let good = r#"{"metrics":{"temperature":1}}"#;
    let (status, body) = post_telemetry(&server, "sensor-001", &other_token, good).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("token_of_another_device"))
    );
    let (status, body) = post_telemetry(&server, "sensor-001", "dvt_not-a-real-token", good).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_device_token"))
    );
    let (status, _) = post_telemetry(&server, "sensor-001", &viewer, good).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = post_telemetry(&server, "ghost", &operator, good).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server
        .call_raw(Method::POST, "/api/devices/sensor-001/telemetry", "", good)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Another tenant's operator cannot write into this tenant's device of the same name.
    let globex = server.tenant_admin(&admin, "globex").await;
    let globex_key = server.api_key(&globex, "operator").await;
    let (status, _) = post_telemetry(&server, "sensor-001", &globex_key, good).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        points(&server, &admin, "sensor-001", "temperature").await.len(),
        3
    );

    // The device actor counted what it took and refused.
    let (status, actor) = server.get("/admin/actors/default/sensor-001", &admin).await;
    assert_eq!(status, StatusCode::OK, "{actor}");
    assert_eq!(actor["actor"]["inbound"]["points"], 8, "{actor}");
    assert_eq!(actor["actor"]["inbound"]["refused"], bad.len(), "{actor}");
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains(r#"drover_telemetry_ingested_points_total{outcome="committed"} 8"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ingestion_replies_per_frame_after_commit() {
    let server = slow_batching_server();
    let admin = server.admin_token().await;
    let token = server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "thermometer"}))
        .await;
    // A browser cannot set headers on a WebSocket: the token goes in the query string.
    let url = format!("ws://{}/ws/devices/sensor-001?token={token}", server.addr);
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let reply = async |socket: &mut Socket, frame: &str| -> Value {
        common::ws::request(socket, frame, Duration::from_secs(10)).await
    };
    let answer = reply(&mut socket, r#"{"metrics":{"temperature":23.5}}"#).await;
    assert_eq!(answer, json!({"ok": true, "points": 1}));
    assert_eq!(
        points(&server, &admin, "sensor-001", "temperature").await[0].1,
        json!(23.5)
    );
    // A bad frame is answered with its code and the socket stays open.
    let answer = reply(&mut socket, "not json").await;
    assert_eq!(
        (answer["ok"].clone(), answer["code"].clone()),
        (json!(false), json!("invalid_json"))
    );
    let answer = reply(
        &mut socket,
        r#"[{"metrics":{"temperature":24}},{"metrics":{"humidity":40}}]"#,
    )
    .await;
    assert_eq!(answer, json!({"ok": true, "points": 2}));
    assert_eq!(
        points(&server, &admin, "sensor-001", "temperature").await.len(),
        2
    );
    // The device is connected while the socket is open.
    let (_, device) = server.get("/api/devices/sensor-001", &admin).await;
    assert_eq!(device["status"], "online", "{device}");
    socket.close(None).await.unwrap();
    eventually(Duration::from_secs(5), "device offline after close", || async {
        server.get("/api/devices/sensor-001", &admin).await.1["status"] == "offline"
    })
    .await;

    // Wrong credentials are refused before the upgrade.
    let bad = format!("ws://{}/ws/devices/sensor-001?token=dvt_nope", server.addr);
    let refused = tokio_tungstenite::connect_async(&bad).await.unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_device_actors_stop_and_come_back_on_demand() {
    let server = TestServer::start_with(Backend::Sqlite, |c| c.actors.device_idle_secs = 1).unwrap();
    let admin = server.admin_token().await;
    let token = server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "t"}))
        .await;
    let (status, _) = post_telemetry(&server, "sensor-001", &token, r#"{"metrics":{"x":1}}"#).await;
    assert_eq!(status, StatusCode::OK);
    let running = |tree: &Value| {
        tree["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|t| t["devices"].as_array().unwrap().clone())
            .any(|d| d["device"] == "sensor-001")
    };
    assert!(running(&server.get("/admin/actors", &admin).await.1));
    eventually(Duration::from_secs(5), "idle actor stopped", || async {
        !running(&server.get("/admin/actors", &admin).await.1)
    })
    .await;
    let (status, _) = post_telemetry(&server, "sensor-001", &token, r#"{"metrics":{"x":2}}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(points(&server, &admin, "sensor-001", "x").await.len(), 2);
    let tree = server.get("/admin/actors", &admin).await.1;
    assert!(running(&tree));
    assert!(!tree["writers"].as_array().unwrap().is_empty(), "{tree}");
}

// ---- a real process, killed -------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Process {
    child: Child,
    http: u16,
}

impl Process {
    fn start(data_dir: &std::path::Path, http: u16, mqtt: u16) -> Process {
        let child = Command::new(env!("CARGO_BIN_EXE_drover"))
            .arg("serve")
            .env("DATA_DIR", data_dir)
            .env("HTTP_BIND", "127.0.0.1")
            .env("PORT", http.to_string())
            .env("MQTT_BIND", "127.0.0.1")
            .env("MQTT_PORT", mqtt.to_string())
            .env("DROVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("LOG_LEVEL", "warn")
            .env_remove("DATABASE_URL")
            .env_remove("INFLUX_URL")
            .env_remove("REDIS_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Process { child, http }
    }

    async fn ready(&self) {
        let url = format!("http://127.0.0.1:{}/health", self.http);
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(&url).await.map(|r| r.status().is_success()).ok() != Some(true) {
            assert!(Instant::now() < deadline, "server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill(mut self) {
        // SIGKILL: no shutdown path runs.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn login(http: u16) -> String {
    let response: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/api/auth/login"))
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    response["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_qos1_ingestion_loses_no_acknowledged_point() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

    let data_dir = tempfile::tempdir().unwrap();
    let (http, mqtt) = (free_port(), free_port());
    let process = Process::start(data_dir.path(), http, mqtt);
    process.ready().await;
    let admin = login(http).await;
    let registered: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{http}/api/devices/register"))
        .bearer_auth(&admin)
        .json(&json!({"deviceId": "sensor-001", "type": "t"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = registered["token"].as_str().unwrap().to_string();

    let mut options = MqttOptions::new("sensor-001", "127.0.0.1", mqtt);
    options.set_credentials("sensor-001", token);
    options.set_inflight(50);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 100);
    let base = chrono::Utc::now().timestamp_millis() - 600_000;
    tokio::spawn(async move {
        for seq in 0i64.. {
            let payload = json!({"timestamp": base + seq, "metrics": {"seq": seq}}).to_string();
            if client
                .publish("devices/sensor-001/telemetry", QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    // Publishes leave in order, so the n-th outgoing publish carries seq n.
    let mut next_seq = 0i64;
    let mut in_flight = std::collections::HashMap::new();
    let mut acked = BTreeSet::new();
    let kill_at = Instant::now() + Duration::from_secs(3);
    let mut process = Some(process);
    loop {
        if Instant::now() >= kill_at
            && let Some(p) = process.take()
        {
            p.kill();
        }
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                in_flight.insert(pkid, next_seq);
                next_seq += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(seq) = in_flight.remove(&ack.pkid) {
                    acked.insert(seq);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => {
                if process.is_none() {
                    break; // the server is gone
                }
            }
        }
    }
    assert!(
        acked.len() > 100,
        "too few acknowledged publishes to prove anything: {}",
        acked.len()
    );

    let process = Process::start(data_dir.path(), http, mqtt);
    process.ready().await;
    let admin = login(http).await;
    let start = base - 1;
    let stored: Value = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{http}/api/telemetry/sensor-001?metric=seq&start={start}&limit=100000"
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let stored: BTreeSet<i64> = stored["series"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["v"].as_f64().unwrap() as i64)
        .collect();
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged points lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
    eprintln!(
        "{} acknowledged before SIGKILL, {} stored after restart (unacknowledged ones may be stored too)",
        acked.len(),
        stored.len()
    );
}

// ---- InfluxDB going away ------------------------------------------------------------------

/// A private InfluxDB 1.x on its own ports and data directory, stopped and started at will.
struct Influx {
    dir: tempfile::TempDir,
    http: u16,
    child: Option<Child>,
}

impl Influx {
    fn start() -> Option<Influx> {
        if !tool_available("influxd", "apt install influxdb") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (http, rpc) = (free_port(), free_port());
        let root = dir.path().display().to_string();
        std::fs::write(
            dir.path().join("influxdb.conf"),
            format!(
                "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n[meta]\n  dir = \"{root}/meta\"\n\
                 [data]\n  dir = \"{root}/data\"\n  wal-dir = \"{root}/wal\"\n  query-log-enabled = false\n\
                 [http]\n  bind-address = \"127.0.0.1:{http}\"\n  log-enabled = false\n[monitor]\n  store-enabled = false\n"
            ),
        )
        .unwrap();
        let mut influx = Influx {
            dir,
            http,
            child: None,
        };
        influx.resume();
        Some(influx)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    fn resume(&mut self) {
        let child = Command::new("influxd")
            .arg("-config")
            .arg(self.dir.path().join("influxdb.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Generous: on a loaded 2-core machine a restart replays the WAL written before the
        // outage while the other tests of this file run beside it.
        let deadline = Instant::now() + Duration::from_secs(120);
        while reqwest::blocking::get(format!("{}/ping", self.url())).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("influxd exited before answering on port {}: {status}", self.http);
            }
            assert!(
                Instant::now() < deadline,
                "influxd did not answer on port {} within 120 s",
                self.http
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Influx {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn influxdb_outage_is_bridged_by_the_spool_and_every_point_lands_once() {
    let Some(mut influx) = tokio::task::spawn_blocking(Influx::start).await.unwrap() else {
        assert!(!services_required(), "influxd is required");
        return;
    };
    let url = influx.url();
    let server = TestServer::start_with(Backend::Sqlite, move |c| {
        c.influx.url = url;
        c.influx.db = "drover_outage".into();
        c.telemetry.batch_interval_ms = 20;
    })
    .unwrap();
    let admin = server.admin_token().await;
    let token = server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "t"}))
        .await;
    let base = chrono::Utc::now().timestamp_millis() - 600_000;
    let send = |seq: i64| {
        let body = json!({"timestamp": base + seq, "metrics": {"seq": seq}}).to_string();
        let (server, token) = (&server, &token);
        async move {
            let (status, body) = post_telemetry(server, "sensor-001", token, &body).await;
            assert_eq!(status, StatusCode::OK, "seq {seq}: {body}");
        }
    };
    for seq in 0..50 {
        send(seq).await;
    }
    // The store goes away: answers keep coming, from the spool.
    influx = tokio::task::spawn_blocking(move || {
        influx.stop();
        influx
    })
    .await
    .unwrap();
    for seq in 50..150 {
        send(seq).await;
    }
    let metrics = server.metrics_text().await;
    assert!(metrics.contains("drover_telemetry_spooling 1"), "{metrics}");
    let spooled = metric(
        &metrics,
        r#"drover_telemetry_ingested_points_total{outcome="spooled"}"#,
    );
    assert!(spooled >= 100.0, "{spooled}");
    let (status, health) = server.get("/health", &admin).await;
    assert!(health.to_string().contains("spool"), "{status} {health}");

    // It comes back: the spool drains in order and new points go straight to it again.
    influx = tokio::task::spawn_blocking(move || {
        influx.resume();
        influx
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(30), "spool drained", || async {
        let metrics = server.metrics_text().await;
        metric(&metrics, "drover_telemetry_spool_batches") == 0.0
            && metrics.contains("drover_telemetry_spooling 0")
    })
    .await;
    for seq in 150..160 {
        send(seq).await;
    }
    let stored = points(&server, &admin, "sensor-001", "seq").await;
    let values: Vec<i64> = stored.iter().map(|(_, v)| v.as_f64().unwrap() as i64).collect();
    assert_eq!(
        values,
        (0..160).collect::<Vec<_>>(),
        "every point exactly once, in order"
    );
    drop(influx);
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_type_schema_renames_converts_and_checks_telemetry() {
    let server = TestServer::start(Backend::Sqlite).unwrap();
    let admin = server.admin_token().await;
    let token = server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "thermometer"}))
        .await;
    let other = server
        .register(&admin, json!({"deviceId": "meter-001", "type": "meter"}))
        .await;
    let viewer = server.api_key(&admin, "viewer").await;
    // The actor runs before the schema exists: the change must reach it.
    let (status, _) = post_telemetry(&server, "sensor-001", &token, r#"{"metrics":{"temp":99}}"#).await;
    assert_eq!(status, StatusCode::OK);

    let schema = json!({
        "rename": {"temp": "temperature"},
        "convert": {"temperature_f": {"scale": 0.5, "offset": -16, "to": "temperature"}},
        "metrics": {"temperature": {"type": "number", "min": -40, "max": 85, "unit": "°C"}, "door": {"type": "boolean"}}
    });
    let (status, _) = server
        .call(
            Method::PUT,
            "/api/device-types/thermometer",
            Some(&viewer),
            Some(schema.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, bad) = server
        .call(
            Method::PUT,
            "/api/device-types/thermometer",
            Some(&admin),
            Some(json!({"metrics": {"temperature": {"min": 10, "max": 0}}})),
        )
        .await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_schema"))
    );
    let (status, created) = server
        .call(
            Method::PUT,
            "/api/device-types/thermometer",
            Some(&admin),
            Some(schema),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        server.get("/api/device-types", &viewer).await.1["types"][0]["type"],
        "thermometer"
    );

    let (status, _) = post_telemetry(&server, "sensor-001", &token, r#"{"metrics":{"temp":21.5}}"#).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = post_telemetry(
        &server,
        "sensor-001",
        &token,
        r#"{"metrics":{"temperature_f":70}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for (payload, code) in [
        (r#"{"metrics":{"temp":120}}"#, "schema_out_of_range"),
        (r#"{"metrics":{"door":"open"}}"#, "schema_wrong_type"),
        (
            r#"{"metrics":{"temperature_f":"warm"}}"#,
            "schema_conversion_failed",
        ),
    ] {
        let (status, body) = post_telemetry(&server, "sensor-001", &token, payload).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{payload}"
        );
    }
    let stored: Vec<Value> = points(&server, &admin, "sensor-001", "temperature")
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(stored, vec![json!(21.5), json!(19.0)]);
    // Other types are not affected.
    let (status, _) = post_telemetry(&server, "meter-001", &other, r#"{"metrics":{"temp":120}}"#).await;
    assert_eq!(status, StatusCode::OK);

    // Without the schema, values pass unchanged again.
    let (status, _) = server
        .call(
            Method::DELETE,
            "/api/device-types/thermometer",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = post_telemetry(&server, "sensor-001", &token, r#"{"metrics":{"temp":120}}"#).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(points(&server, &admin, "sensor-001", "temp").await.len(), 2);
}
