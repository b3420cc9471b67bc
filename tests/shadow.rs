//! Device shadows end to end: devices speak to them over MQTT with mosquitto_pub/mosquitto_sub
//! (Debian's mosquitto-clients), operators over the REST API, and shadows outlive the server.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::mosquitto::{args, mosquitto, publish, spawn_lines, with};
use common::{ADMIN_PASSWORD, Backend, TestServer, test_config};
use drover::server::ServerThread;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

// ---- fixtures ------------------------------------------------------------------------------

/// A server with a tenant admin token, an operator API key and two registered lamps.
struct Fleet {
    server: TestServer,
    admin: String,
    key: String,
    tokens: Vec<(String, String)>,
}

impl Fleet {
    async fn start() -> Fleet {
        let server = TestServer::start(Backend::Sqlite).unwrap();
        let admin = server.admin_token().await;
        let key = server.api_key(&admin, "operator").await;
        let mut tokens = Vec::new();
        for id in ["lamp-1", "lamp-2"] {
            let token = server
                .register(&admin, json!({"deviceId": id, "type": "lamp"}))
                .await;
            tokens.push((id.to_string(), token));
        }
        Fleet {
            server,
            admin,
            key,
            tokens,
        }
    }

    fn port(&self) -> String {
        self.server.mqtt.port().to_string()
    }

    fn device_args(&self, device: &str) -> Vec<String> {
        let token = &self.tokens.iter().find(|(d, _)| d == device).unwrap().1;
        args(&["-u", device, "-P", token, "-i", device])
    }

    fn app_args(&self, client_id: &str) -> Vec<String> {
        args(&["-u", "app", "-P", &self.key, "-i", client_id])
    }

    /// The device publishes `payload` on `devices/{device}/shadow/{action}` at QoS 1.
    fn device_publishes(&self, device: &str, version: &str, action: &str, payload: &str) {
        let topic = format!("devices/{device}/shadow/{action}");
        let (code, out) = publish(
            &self.port(),
            &with(
                self.device_args(device),
                &["-V", version, "-q", "1", "-t", &topic, "-m", payload],
            ),
        );
        assert_eq!(code, 0, "{out}");
    }

    /// An application watching every shadow reply of `device` (`shadow/+/+`).
    fn watch_replies(&self, device: &str, version: &str) -> Sub {
        Sub::start(
            &self.port(),
            &with(
                self.app_args(&format!("watch-{device}-{version}")),
                &[
                    "-V",
                    version,
                    "-q",
                    "1",
                    "-t",
                    &format!("devices/{device}/shadow/+/+"),
                ],
            ),
        )
    }

    async fn metrics(&self) -> String {
        let response = self
            .server
            .client
            .get(self.server.url("/metrics"))
            .send()
            .await
            .unwrap();
        response.text().await.unwrap()
    }
}

/// A message as mosquitto_sub -v prints it, with a JSON payload.
#[derive(Debug, Clone)]
struct Received {
    topic: String,
    payload: Value,
}

/// mosquitto_sub in debug mode, read line by line.
struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines read while waiting for the SUBACK (messages may come before it).
    early: std::collections::VecDeque<String>,
    log: Vec<String>,
}

impl Sub {
    /// Starts mosquitto_sub and waits until its subscription is acknowledged.
    fn start(port: &str, args: &[String]) -> Sub {
        // mosquitto_sub block-buffers a piped stdout: make it write each line as it comes.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-d", "-v"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub runs");
        let lines = spawn_lines(&mut child);
        let mut sub = Sub {
            child,
            lines,
            early: Default::default(),
            log: Vec::new(),
        };
        let deadline = Instant::now() + WAIT;
        loop {
            let line = sub
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("mosquitto_sub did not subscribe: {:?}", sub.log));
            sub.log.push(line.clone());
            sub.early.push_back(line.clone());
            if line.starts_with("Subscribed (mid: ") {
                return sub;
            }
            assert!(
                !(line.contains("Connection error") || line.contains("refused")),
                "mosquitto_sub could not connect: {:?}",
                sub.log
            );
        }
    }

    /// The next message, within `timeout`.
    fn next(&mut self, timeout: Duration) -> Received {
        let deadline = Instant::now() + timeout;
        loop {
            let line = match self.early.pop_front() {
                Some(line) => line,
                None => {
                    let Ok(line) = self
                        .lines
                        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    else {
                        panic!("no message within {timeout:?}; output: {:?}", self.log);
                    };
                    self.log.push(line.clone());
                    line
                }
            };
            if line.starts_with("Client ") || line.starts_with("stderr:") || line.starts_with("Subscribed") {
                continue;
            }
            let (topic, payload) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            let payload = serde_json::from_str(payload)
                .unwrap_or_else(|e| panic!("payload of {topic} is not JSON ({e}): {payload}"));
            return Received {
                topic: topic.to_string(),
                payload,
            };
        }
    }

    /// The next `n` messages, by topic (each topic at most once).
    fn by_topic(&mut self, n: usize) -> std::collections::HashMap<String, Value> {
        let mut out = std::collections::HashMap::new();
        for _ in 0..n {
            let received = self.next(WAIT);
            assert!(
                out.insert(received.topic.clone(), received.payload).is_none(),
                "{} twice",
                received.topic
            );
        }
        out
    }

    /// Asserts no message arrives for `wait`.
    fn none(&mut self, wait: Duration) {
        for line in self.early.drain(..) {
            assert!(
                !line.contains("received PUBLISH"),
                "unexpected message; output: {:?}",
                self.log
            );
        }
        let deadline = Instant::now() + wait;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.log.push(line.clone());
            assert!(
                !line.contains("received PUBLISH"),
                "unexpected message; output: {:?}",
                self.log
            );
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- MQTT ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_update_and_get_round_trip_on_both_versions() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    for (device, version) in [("lamp-1", "mqttv311"), ("lamp-2", "mqttv5")] {
        let mut replies = fleet.watch_replies(device, version);

        // The cloud's wish arrives first (here from the device itself, as AWS allows).
        fleet.device_publishes(
            device,
            version,
            "update",
            r#"{"state":{"desired":{"led":"on","color":{"r":255,"g":0}}},"clientToken":"c-1"}"#,
        );
        let got = replies.by_topic(3);
        let accepted = &got[&format!("devices/{device}/shadow/update/accepted")];
        assert_eq!(
            accepted["state"]["desired"],
            json!({"led": "on", "color": {"r": 255, "g": 0}})
        );
        assert_eq!(accepted["version"], 1);
        assert_eq!(accepted["clientToken"], "c-1");
        let ts = accepted["timestamp"].as_i64().unwrap();
        assert!(
            (Utc::now().timestamp() - ts).abs() < 60,
            "timestamps are epoch seconds"
        );
        assert_eq!(accepted["metadata"]["desired"]["color"]["r"]["timestamp"], ts);
        let documents = &got[&format!("devices/{device}/shadow/update/documents")];
        assert_eq!(documents["previous"], Value::Null);
        assert_eq!(documents["current"]["version"], 1);
        assert_eq!(documents["clientToken"], "c-1");
        let delta = &got[&format!("devices/{device}/shadow/update/delta")];
        assert_eq!(delta["state"], json!({"led": "on", "color": {"r": 255, "g": 0}}));
        assert_eq!(delta["version"], 1);
        assert_eq!(delta["metadata"]["led"]["timestamp"], ts);

        // The device reports part of it: accepted and documents, no delta (AWS does the same).
        fleet.device_publishes(
            device,
            version,
            "update",
            r#"{"state":{"reported":{"led":"on","color":{"r":255,"g":10}}}}"#,
        );
        let got = replies.by_topic(2);
        assert!(
            got.contains_key(&format!("devices/{device}/shadow/update/accepted")),
            "{got:?}"
        );
        let documents = &got[&format!("devices/{device}/shadow/update/documents")];
        assert_eq!(documents["previous"]["version"], 1);
        assert_eq!(documents["current"]["state"]["reported"]["color"]["g"], 10);
        replies.none(Duration::from_millis(300));

        // get: the whole document with what is still to do.
        fleet.device_publishes(device, version, "get", r#"{"clientToken":"g-1"}"#);
        let got = replies.next(WAIT);
        assert_eq!(got.topic, format!("devices/{device}/shadow/get/accepted"));
        assert_eq!(got.payload["version"], 2);
        assert_eq!(got.payload["clientToken"], "g-1");
        assert_eq!(got.payload["state"]["delta"], json!({"color": {"g": 0}}));
        assert_eq!(got.payload["state"]["reported"]["led"], "on");
        assert!(got.payload["metadata"]["reported"]["led"]["timestamp"].is_i64());
        // An empty get works too.
        fleet.device_publishes(device, version, "get", "");
        assert_eq!(
            replies.next(WAIT).topic,
            format!("devices/{device}/shadow/get/accepted")
        );
    }
    let metrics = fleet.metrics().await;
    assert!(
        metrics.contains(r#"drover_shadow_updates_total{code="",outcome="accepted"} 4"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_application_updates_and_reads_a_shadow_over_mqtt() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    let mut replies = fleet.watch_replies("lamp-1", "mqttv5");
    let mut device = Sub::start(
        &port,
        &with(
            fleet.device_args("lamp-1"),
            &["-q", "1", "-t", "devices/lamp-1/shadow/update/delta"],
        ),
    );
    let app_publishes = |topic: &str, payload: &str| {
        let (code, out) = publish(
            &port,
            &with(
                fleet.app_args("backend"),
                &["-q", "1", "-t", topic, "-m", payload],
            ),
        );
        assert_eq!(code, 0, "{out}");
    };

    app_publishes(
        "devices/lamp-1/shadow/update",
        r#"{"state":{"desired":{"led":"off"}},"clientToken":"app-1"}"#,
    );
    let got = replies.by_topic(3);
    assert_eq!(
        got["devices/lamp-1/shadow/update/accepted"]["clientToken"],
        "app-1"
    );
    let delta = device.next(WAIT);
    assert_eq!(delta.payload["state"], json!({"led": "off"}));

    app_publishes(
        "devices/lamp-1/shadow/update",
        r#"{"state":{"desired":{"led":"on"}},"version":7}"#,
    );
    let got = replies.next(WAIT);
    assert_eq!(got.topic, "devices/lamp-1/shadow/update/rejected");
    assert_eq!(got.payload["errorCode"], "version_conflict");

    app_publishes("devices/lamp-1/shadow/get", r#"{"clientToken":"app-2"}"#);
    let got = replies.next(WAIT);
    assert_eq!(got.topic, "devices/lamp-1/shadow/get/accepted");
    assert_eq!(got.payload["state"]["desired"], json!({"led": "off"}));
    assert_eq!(got.payload["clientToken"], "app-2");

    // A device that never connected gets its shadow from an application too.
    app_publishes(
        "devices/lamp-2/shadow/update",
        r#"{"state":{"desired":{"led":"on"}}}"#,
    );
    let (status, shadow) = fleet.server.get("/api/devices/lamp-2/shadow", &fleet.admin).await;
    assert_eq!(status, StatusCode::OK, "{shadow}");
    assert_eq!(shadow["state"]["delta"], json!({"led": "on"}));

    // A topic naming no device is only routed; a viewer key may not publish at all.
    app_publishes("devices/nope/shadow/update", r#"{"state":{"desired":{"a":1}}}"#);
    let viewer = fleet.server.api_key(&fleet.admin, "viewer").await;
    let (_, out) = publish(
        &port,
        &args(&[
            "-u",
            "viewer",
            "-P",
            &viewer,
            "-i",
            "viewer",
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "devices/lamp-1/shadow/update",
            "-m",
            r#"{"state":{"desired":{"led":"blue"}}}"#,
        ]),
    );
    assert!(
        out.contains("135") || out.to_lowercase().contains("not authorized"),
        "{out}"
    );
    replies.none(Duration::from_millis(300));
    let (_, shadow) = fleet.server.get("/api/devices/lamp-1/shadow", &fleet.admin).await;
    assert_eq!(shadow["state"]["desired"], json!({"led": "off"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_refusals_go_to_the_rejected_topics() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let mut replies = fleet.watch_replies("lamp-1", "mqttv5");
    let rejected = "devices/lamp-1/shadow/update/rejected";

    // No shadow yet: get is refused with 404.
    fleet.device_publishes("lamp-1", "mqttv5", "get", r#"{"clientToken":"g"}"#);
    let got = replies.next(WAIT);
    assert_eq!(got.topic, "devices/lamp-1/shadow/get/rejected");
    assert_eq!(got.payload["code"], 404);
    assert_eq!(got.payload["errorCode"], "not_found");
    assert_eq!(got.payload["clientToken"], "g");

    let cases = [
        ("{not json", 400, "invalid_json"),
        (
            r#"{"state":{"desired":{"a":1}},"version":4,"clientToken":"v"}"#,
            409,
            "version_conflict",
        ),
        (
            r#"{"state":{"desired":{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}}}"#,
            400,
            "too_deep",
        ),
        (r#"{"state":{"desired":[1]}}"#, 400, "invalid_state"),
        (
            r#"{"state":{"desired":{"a":1}},"extra":true}"#,
            400,
            "unknown_field",
        ),
    ];
    for (payload, code, error_code) in cases {
        fleet.device_publishes("lamp-1", "mqttv311", "update", payload);
        let got = replies.next(WAIT);
        assert_eq!(got.topic, rejected, "{payload}");
        assert_eq!(got.payload["code"], code, "{payload}");
        assert_eq!(got.payload["errorCode"], error_code, "{payload}");
        assert!(got.payload["message"].as_str().unwrap().len() > 5);
        assert!(got.payload["timestamp"].is_i64());
    }
    // The conflict echoed the token of the refused request.
    fleet.device_publishes(
        "lamp-1",
        "mqttv311",
        "update",
        r#"{"state":{"desired":{"a":1}},"version":9,"clientToken":"tok-9"}"#,
    );
    let got = replies.next(WAIT);
    assert_eq!(got.payload["clientToken"], "tok-9");

    // 8 KiB per section.
    let big = format!(r#"{{"state":{{"reported":{{"blob":"{}"}}}}}}"#, "x".repeat(9000));
    fleet.device_publishes("lamp-1", "mqttv311", "update", &big);
    let got = replies.next(WAIT);
    assert_eq!(got.payload["code"], 413);
    assert_eq!(got.payload["errorCode"], "state_too_large");

    // Nothing was stored by any of them; a conditional first update (version 0) works.
    fleet.device_publishes(
        "lamp-1",
        "mqttv311",
        "update",
        r#"{"state":{"reported":{"a":1}},"version":0}"#,
    );
    let got = replies.by_topic(2);
    assert_eq!(got["devices/lamp-1/shadow/update/accepted"]["version"], 1);
    let metrics = fleet.metrics().await;
    assert!(
        metrics.contains(r#"drover_shadow_updates_total{code="version_conflict",outcome="rejected"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gets_its_delta_live_on_subscribe_and_on_reconnect() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    let delta_topic = "devices/lamp-1/shadow/update/delta";
    let device_sub = |version: &str, extra: &[&str]| {
        Sub::start(
            &port,
            &with(
                with(fleet.device_args("lamp-1"), &["-V", version, "-t", delta_topic]),
                extra,
            ),
        )
    };

    // Online: an operator's change of desired reaches the device at once.
    let mut device = device_sub("mqttv311", &["-q", "1"]);
    device.none(Duration::from_millis(300)); // no shadow, no delta
    let (status, body) = fleet
        .server
        .patch(
            "/api/devices/lamp-1/shadow",
            &fleet.key,
            json!({"state": {"desired": {"brightness": 80}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got = device.next(WAIT);
    assert_eq!(got.topic, delta_topic);
    assert_eq!(got.payload["state"], json!({"brightness": 80}));
    assert_eq!(got.payload["version"], 1);
    drop(device);

    // Offline, with no session: the change is pending and delivered when it subscribes again.
    let (status, _) = fleet
        .server
        .patch(
            "/api/devices/lamp-1/shadow",
            &fleet.admin,
            json!({"state": {"desired": {"mode": "eco"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut device = device_sub("mqttv5", &["-q", "1"]);
    let got = device.next(WAIT);
    assert_eq!(got.topic, delta_topic);
    assert_eq!(got.payload["state"], json!({"brightness": 80, "mode": "eco"}));
    assert_eq!(got.payload["version"], 2);
    device.none(Duration::from_millis(300));
    drop(device);

    // Once reported, nothing is pending: a new subscription gets nothing.
    fleet.device_publishes(
        "lamp-1",
        "mqttv311",
        "update",
        r#"{"state":{"reported":{"brightness":80,"mode":"eco"}}}"#,
    );
    let mut device = device_sub("mqttv311", &["-q", "1"]);
    device.none(Duration::from_millis(500));
    drop(device);

    // A persistent session at QoS 0 (nothing is queued for it while away): the session's
    // subscription gets the pending delta when the device comes back, once, though the
    // device subscribes again.
    let session = ["-c", "-x", "600", "-q", "0"];
    let device = device_sub("mqttv5", &session);
    drop(device);
    let (status, _) = fleet
        .server
        .patch(
            "/api/devices/lamp-1/shadow",
            &fleet.key,
            json!({"state": {"desired": {"mode": "boost"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut device = device_sub("mqttv5", &session);
    let got = device.next(WAIT);
    assert_eq!(got.topic, delta_topic);
    assert_eq!(got.payload["state"], json!({"mode": "boost"}));
    assert_eq!(got.payload["version"], 4);
    device.none(Duration::from_millis(500));
}

// ---- HTTP ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_get_and_patch_with_versions_roles_tenants_and_limits() {
    let fleet = Fleet::start().await;
    let server = &fleet.server;
    let path = "/api/devices/lamp-1/shadow";

    let (status, body) = server.get(path, &fleet.admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _) = server.get("/api/devices/nope/shadow", &fleet.admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, accepted) = server
        .patch(
            path,
            &fleet.key,
            json!({"state": {"desired": {"led": "on", "list": [1, 2]}}, "clientToken": "http-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{accepted}");
    assert_eq!(accepted["version"], 1);
    assert_eq!(accepted["clientToken"], "http-1");
    assert_eq!(accepted["state"]["desired"]["led"], "on");
    assert!(accepted["metadata"]["desired"]["led"]["timestamp"].is_i64());

    let (status, doc) = server.get(path, &fleet.admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["state"]["desired"], json!({"led": "on", "list": [1, 2]}));
    assert_eq!(doc["state"]["delta"], json!({"led": "on", "list": [1, 2]}));
    assert!(doc["state"].get("reported").is_none());

    // Merge rules: arrays replace, null deletes, objects merge.
    let (status, _) = server
        .patch(
            path,
            &fleet.key,
            json!({"state": {"desired": {"list": [3], "led": null, "cfg": {"a": 1}}, "reported": {"list": [3]}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, doc) = server.get(path, &fleet.admin).await;
    assert_eq!(doc["state"]["desired"], json!({"list": [3], "cfg": {"a": 1}}));
    assert_eq!(doc["state"]["delta"], json!({"cfg": {"a": 1}}));
    assert_eq!(doc["version"], 2);

    // Conditional updates.
    let (status, body) = server
        .patch(
            path,
            &fleet.key,
            json!({"state": {"desired": {"x": 1}}, "version": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "version_conflict");
    let (status, body) = server
        .patch(
            path,
            &fleet.key,
            json!({"state": {"desired": {"x": 1}}, "version": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 3);

    // "desired": null clears the section.
    let (status, _) = server
        .patch(path, &fleet.key, json!({"state": {"desired": null}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, doc) = server.get(path, &fleet.admin).await;
    assert!(doc["state"].get("desired").is_none(), "{doc}");
    assert!(doc["state"].get("delta").is_none(), "{doc}");
    assert_eq!(doc["state"]["reported"], json!({"list": [3]}));

    // Bad input, each with its own code.
    let (status, body) = server
        .call_raw(Method::PATCH, path, &fleet.key, "{\"state\": ")
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_json"))
    );
    let deep = json!({"state": {"desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}});
    let (status, body) = server.patch(path, &fleet.key, deep).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("too_deep"))
    );
    let (status, body) = server.patch(path, &fleet.key, json!({"state": {}})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_state"))
    );
    let (status, body) = server.patch(path, &fleet.key, json!({"desired": {"a": 1}})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unknown_field"))
    );
    let (status, body) = server
        .patch(
            path,
            &fleet.key,
            json!({"state": {"desired": {"blob": "x".repeat(9000)}}}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("state_too_large"))
    );
    let (status, body) = server
        .patch(
            path,
            &fleet.key,
            json!({"state": {"desired": {"blob": "x".repeat(40_000)}}}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    let (_, doc) = server.get(path, &fleet.admin).await;
    assert_eq!(doc["version"], 4, "refused updates change nothing");

    // Viewers read but do not write.
    let viewer = server.api_key(&fleet.admin, "viewer").await;
    let (status, _) = server.get(path, &viewer).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server
        .patch(path, &viewer, json!({"state": {"desired": {"a": 1}}}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // Another tenant does not see the device at all.
    let other = server.tenant_admin(&fleet.admin, "other").await;
    let (status, _) = server.get(path, &other).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = server
        .patch(path, &other, json!({"state": {"desired": {"a": 1}}}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, doc) = server.get(path, &fleet.admin).await;
    assert_eq!(doc["version"], 4);

    let (status, _) = server.call(Method::GET, path, None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

// ---- persistence -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadows_survive_a_server_restart() {
    let data_dir = tempfile::tempdir().unwrap();
    let start =
        || ServerThread::spawn(test_config(data_dir.path()), Some(ADMIN_PASSWORD.to_string())).unwrap();
    let client = reqwest::Client::new();
    let call = |server: &ServerThread, method: Method, path: &str, token: &str, body: Option<Value>| {
        let mut request = client
            .request(method, format!("http://{}{path}", server.http_addr))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    let first = start();
    let login: Value = client
        .post(format!("http://{}/api/auth/login", first.http_addr))
        .json(&json!({"username": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["token"].as_str().unwrap().to_string();
    let (status, _) = call(
        &first,
        Method::POST,
        "/api/devices/register",
        &token,
        Some(json!({"deviceId": "lamp-1", "type": "lamp"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    for body in [
        json!({"state": {"desired": {"led": "on"}}}),
        json!({"state": {"reported": {"led": "off", "fw": "1.2"}}}),
    ] {
        let (status, body) = call(
            &first,
            Method::PATCH,
            "/api/devices/lamp-1/shadow",
            &token,
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, before) = call(&first, Method::GET, "/api/devices/lamp-1/shadow", &token, None).await;
    first.stop();

    let second = start();
    // The signing key is configured, so the login token is still good.
    let (status, after) = call(&second, Method::GET, "/api/devices/lamp-1/shadow", &token, None).await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after, before);
    assert_eq!(after["version"], 2);
    assert_eq!(after["state"]["delta"], json!({"led": "on"}));
    // Versions continue where they were.
    let (status, body) = call(
        &second,
        Method::PATCH,
        "/api/devices/lamp-1/shadow",
        &token,
        Some(json!({"state": {"reported": {"led": "on"}}, "version": 2})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], 3);
    second.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_configured_shadows_are_cached_and_forgotten_with_the_device() {
    let Some(url) = common::service_url("DROVER_TEST_REDIS_URL") else {
        return;
    };
    let redis_url = url.clone();
    let server = TestServer::start_with(Backend::Sqlite, move |config| {
        config.redis.url = drover::config::Secret::new(redis_url);
    })
    .unwrap();
    let admin = server.admin_token().await;
    // A device id of its own, so runs sharing the Redis server never meet.
    let id = format!("lamp-{}", uuid::Uuid::new_v4().simple());
    server
        .register(&admin, json!({"deviceId": id, "type": "lamp"}))
        .await;
    let path = format!("/api/devices/{id}/shadow");
    let (status, body) = server
        .patch(&path, &admin, json!({"state": {"desired": {"led": "on"}}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // The cache key is scoped by the registry it belongs to: find it by the device's unique id.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("drover:*:shadow:default/{id}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "one cached shadow: {keys:?}");
    let key = keys[0].clone();
    let cached: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
    let cached: Value = serde_json::from_str(&cached.expect("written through to Redis")).unwrap();
    assert_eq!(cached["version"], 1);
    assert_eq!(cached["state"]["desired"], json!({"led": "on"}));

    let (status, _) = server.delete(&format!("/api/devices/{id}"), &admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let cached: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await.unwrap();
    assert_eq!(cached, None, "a deleted device's shadow leaves the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_device_actor_is_restarted_with_its_shadow_and_the_restart_is_visible() {
    let server = TestServer::start(Backend::Sqlite).unwrap();
    let admin = server.admin_token().await;
    server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "t"}))
        .await;
    let (status, _) = server
        .patch(
            "/api/devices/sensor-001/shadow",
            &admin,
            json!({"state": {"desired": {"target": 21}}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let tenant = drover_actors::TenantId::parse("default").unwrap();
    let device = drover_actors::DeviceId::parse("sensor-001").unwrap();
    let actor = server
        .state
        .fleet
        .device(&tenant, &device)
        .await
        .unwrap()
        .unwrap();
    // A handler panics: the actor dies and its supervisor starts a new one from storage.
    let _ = actor.send(drover_actors::device_actor::Crash {}).await;
    let restarted = |tree: Value| {
        tree["tenants"][0]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == "sensor-001")
            .map(|d| d["restarts"].clone())
    };
    common::eventually(
        Duration::from_secs(10),
        "restart shown by /admin/actors",
        || async { restarted(server.get("/admin/actors", &admin).await.1) == Some(json!(1)) },
    )
    .await;
    let (status, shadow) = server.get("/api/devices/sensor-001/shadow", &admin).await;
    assert_eq!(status, StatusCode::OK, "{shadow}");
    assert_eq!(shadow["state"]["desired"]["target"], 21, "{shadow}");
    assert_eq!(shadow["version"], 1);
    let (_, one) = server.get("/admin/actors/default/sensor-001", &admin).await;
    assert_eq!(one["supervision"]["restarts"], 1, "{one}");
    assert_eq!(one["actor"]["generation"], 2, "{one}");
}
