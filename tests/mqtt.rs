//! The MQTT broker, driven by clients nobody here wrote: mosquitto_pub/mosquitto_sub
//! (Debian's mosquitto-clients), paho-mqtt (Python) and rumqttc (Rust), plus raw sockets for
//! malformed input. Each test starts its own server on 127.0.0.1 ports chosen by the system.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::ca::register_ca;
use common::mosquitto::{args, mosquitto, publish, spawn_lines, with};
use common::wire::{connect_packet, remaining_length};
use common::{Backend, TestServer, eventually};
use reqwest::StatusCode;
use serde_json::json;

// ---- fixtures ------------------------------------------------------------------------------

/// A server with a tenant admin token, an operator API key, and two registered devices.
struct Fleet {
    server: TestServer,
    admin: String,
    key: String,
    tokens: Vec<(String, String)>,
}

impl Fleet {
    async fn start() -> Fleet {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tweak: impl FnOnce(&mut drover::config::Config)) -> Fleet {
        let server = TestServer::start_with(Backend::Sqlite, tweak).unwrap();
        let admin = server.admin_token().await;
        let key = server.api_key(&admin, "operator").await;
        let mut tokens = Vec::new();
        for id in ["sensor-001", "sensor-002"] {
            let token = server
                .register(&admin, json!({"deviceId": id, "type": "temperature"}))
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

    fn token(&self, device: &str) -> &str {
        &self.tokens.iter().find(|(d, _)| d == device).unwrap().1
    }

    /// mosquitto arguments logging in as a device.
    fn device_args(&self, device: &str) -> Vec<String> {
        vec![
            "-u".into(),
            device.into(),
            "-P".into(),
            self.token(device).into(),
            "-i".into(),
            device.into(),
        ]
    }

    /// mosquitto arguments logging in as the operator application.
    fn app_args(&self, client_id: &str) -> Vec<String> {
        vec![
            "-u".into(),
            "app".into(),
            "-P".into(),
            self.key.clone(),
            "-i".into(),
            client_id.into(),
        ]
    }

    async fn device_status(&self, device: &str) -> String {
        let (_, body) = self
            .server
            .get(&format!("/api/devices/{device}"), &self.admin)
            .await;
        body["status"].as_str().unwrap_or_default().to_string()
    }

    async fn metrics(&self) -> String {
        self.server
            .client
            .get(self.server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// A message as mosquitto_sub -d -v reports it.
#[derive(Debug, Clone, PartialEq)]
struct Received {
    topic: String,
    payload: String,
    qos: u8,
    retain: bool,
    dup: bool,
}

/// mosquitto_sub in debug mode, read line by line.
struct Sub {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines read while waiting for the SUBACK (a resumed session's queue comes first).
    early: std::collections::VecDeque<String>,
    /// SUBACK return codes, one per filter.
    granted: Vec<u8>,
    /// Everything it printed, for failure messages.
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
            granted: Vec::new(),
            log: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let line = sub
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("mosquitto_sub did not subscribe: {:?}", sub.log));
            sub.log.push(line.clone());
            sub.early.push_back(line.clone());
            if let Some(codes) = line
                .strip_prefix("Subscribed (mid: ")
                .and_then(|l| l.split_once("): "))
                .map(|(_, c)| c)
            {
                sub.granted = codes.split(", ").filter_map(|c| c.trim().parse().ok()).collect();
                return sub;
            }
            if line.contains("Connection error") || line.contains("refused") {
                panic!("mosquitto_sub could not connect: {:?}", sub.log);
            }
        }
    }

    /// The next `n` messages, each within `timeout` of the previous.
    fn take(&mut self, n: usize, timeout: Duration) -> Vec<Received> {
        let mut out = Vec::new();
        let mut flags: Option<(u8, bool, bool)> = None;
        while out.len() < n {
            let line = match self.early.pop_front() {
                Some(line) => line,
                None => {
                    let Ok(line) = self.lines.recv_timeout(timeout) else {
                        panic!(
                            "expected {n} messages, got {}; output: {:?}",
                            out.len(),
                            short(&self.log)
                        );
                    };
                    self.log.push(line.clone());
                    line
                }
            };
            if let Some(rest) = line.split(" received PUBLISH (").nth(1) {
                let parts: Vec<&str> = rest.split(", ").collect();
                let dup = parts[0] == "d1";
                let qos = parts[1][1..].parse().unwrap_or(0);
                let retain = parts[2] == "r1";
                flags = Some((qos, retain, dup));
                continue;
            }
            if line.starts_with("Client ") || line.starts_with("stderr:") || line.starts_with("Subscribed") {
                continue;
            }
            let (topic, payload) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            let (qos, retain, dup) = flags.take().unwrap_or((0, false, false));
            out.push(Received {
                topic: topic.to_string(),
                payload: payload.to_string(),
                qos,
                retain,
                dup,
            });
        }
        out
    }

    /// Asserts nothing arrives for `wait`.
    fn none(&mut self, wait: Duration) {
        let early: Vec<String> = self.early.drain(..).collect();
        for line in early {
            assert!(
                !line.contains("received PUBLISH"),
                "unexpected message: {line}; output: {:?}",
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
                "unexpected message: {line}; output: {:?}",
                self.log
            );
        }
    }

    /// Waits for the client to be disconnected by the broker (or to exit).
    fn disconnected(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                // The process ended: read what it wrote until its pipes close.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.log.push(line);
                }
                return self.log.clone();
            }
            while let Ok(line) = self.lines.try_recv() {
                self.log.push(line);
            }
            if self.log.iter().any(|l| {
                l.contains("received DISCONNECT") || l.contains("Connection error") || l.contains("Error")
            }) {
                return self.log.clone();
            }
            assert!(Instant::now() < deadline, "still connected: {:?}", self.log);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of a log, each cut to 200 characters, for failure messages.
fn short(log: &[String]) -> Vec<String> {
    log.iter()
        .rev()
        .take(40)
        .rev()
        .map(|l| l.chars().take(200).collect())
        .collect()
}

const WAIT: Duration = Duration::from_secs(5);

// ---- protocol ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qos_flows_from_device_to_application_on_both_versions() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    for version in ["mqttv311", "mqttv5"] {
        for sub_qos in ["0", "1", "2"] {
            let mut sub = Sub::start(
                &port,
                &with(
                    fleet.app_args(&format!("app-{version}-{sub_qos}")),
                    &["-V", version, "-q", sub_qos, "-t", "devices/+/telemetry"],
                ),
            );
            assert_eq!(sub.granted, [sub_qos.parse::<u8>().unwrap()]);
            for pub_qos in ["0", "1", "2"] {
                let payload = format!("{{\"metrics\":{{\"temperature\":{pub_qos}}}}}");
                let (code, out) = publish(
                    &port,
                    &with(
                        fleet.device_args("sensor-001"),
                        &[
                            "-V",
                            version,
                            "-q",
                            pub_qos,
                            "-t",
                            "devices/sensor-001/telemetry",
                            "-m",
                            &payload,
                        ],
                    ),
                );
                assert_eq!(code, 0, "{version} publish q{pub_qos}: {out}");
                let got = sub.take(1, WAIT);
                assert_eq!(got[0].topic, "devices/sensor-001/telemetry");
                assert_eq!(got[0].payload, payload);
                let expected_qos = pub_qos.parse::<u8>().unwrap().min(sub_qos.parse().unwrap());
                assert_eq!(
                    got[0].qos, expected_qos,
                    "{version} pub q{pub_qos} sub q{sub_qos}"
                );
                assert!(!got[0].retain);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_set_replaced_cleared_and_delivered_on_subscribe() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    for version in ["mqttv311", "mqttv5"] {
        let topic = format!("fleet/{version}/config");
        let pub_args = |message: &[&str]| {
            with(
                with(
                    fleet.app_args("retainer"),
                    &["-V", version, "-q", "1", "-r", "-t", &topic],
                ),
                message,
            )
        };
        assert_eq!(publish(&port, &pub_args(&["-m", "v1"])).0, 0);
        let mut sub = Sub::start(
            &port,
            &with(
                fleet.app_args("late"),
                &["-V", version, "-t", "fleet/+/config", "-q", "1"],
            ),
        );
        let got = sub.take(1, WAIT);
        assert_eq!(
            (got[0].payload.as_str(), got[0].retain),
            ("v1", true),
            "{version}"
        );
        drop(sub);
        assert_eq!(publish(&port, &pub_args(&["-m", "v2"])).0, 0);
        let mut sub = Sub::start(
            &port,
            &with(fleet.app_args("later"), &["-V", version, "-t", &topic]),
        );
        let got = sub.take(1, WAIT);
        assert_eq!(got[0].payload, "v2", "replaced");
        // A live subscriber gets new messages with RETAIN 0 (they match an existing subscription).
        assert_eq!(publish(&port, &pub_args(&["-m", "v3"])).0, 0);
        let got = sub.take(1, WAIT);
        assert_eq!((got[0].payload.as_str(), got[0].retain), ("v3", false));
        drop(sub);
        // An empty retained message clears it.
        assert_eq!(publish(&port, &pub_args(&["-n"])).0, 0);
        let mut sub = Sub::start(
            &port,
            &with(fleet.app_args("latest"), &["-V", version, "-t", &topic]),
        );
        sub.none(Duration::from_millis(500));
    }
    assert!(fleet.metrics().await.contains("drover_mqtt_retained_messages 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_match_and_dollar_topics_are_reserved() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    let mut plus = Sub::start(&port, &with(fleet.app_args("plus"), &["-t", "plant/+/status"]));
    let mut hash = Sub::start(&port, &with(fleet.app_args("hash"), &["-t", "plant/#"]));
    let mut all = Sub::start(&port, &with(fleet.app_args("all"), &["-t", "#"]));
    publish(
        &port,
        &with(fleet.app_args("p"), &["-t", "plant/a/status", "-m", "1"]),
    );
    publish(
        &port,
        &with(fleet.app_args("p"), &["-t", "plant/a/b/status", "-m", "2"]),
    );
    assert_eq!(plus.take(1, WAIT)[0].payload, "1");
    plus.none(Duration::from_millis(300));
    let got: Vec<String> = hash.take(2, WAIT).into_iter().map(|m| m.payload).collect();
    assert_eq!(got, ["1", "2"]);
    assert_eq!(all.take(2, WAIT).len(), 2);
    // Nobody publishes `$` topics; MQTT 5 says why.
    let (_, out) = publish(
        &port,
        &with(
            fleet.app_args("p"),
            &["-V", "mqttv5", "-q", "1", "-t", "$SYS/fake", "-m", "x"],
        ),
    );
    assert!(out.contains("RC:135"), "PUBACK 0x87 not authorized: {out}");
    all.none(Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_confined_to_their_own_topics() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    let mut watcher = Sub::start(&port, &with(fleet.app_args("watcher"), &["-t", "#"]));
    // Subscribing outside its prefix: SUBACK failure (3.1.1: 0x80, 5: 0x87); its own: granted.
    let sub = Sub::start(
        &port,
        &with(
            fleet.device_args("sensor-001"),
            &["-t", "devices/sensor-002/#", "-t", "devices/sensor-001/#"],
        ),
    );
    assert_eq!(sub.granted, [128, 0]);
    drop(sub);
    let sub = Sub::start(
        &port,
        &with(
            fleet.device_args("sensor-001"),
            &["-V", "mqttv5", "-t", "devices/+/telemetry"],
        ),
    );
    assert_eq!(sub.granted, [135]);
    drop(sub);
    // Publishing as another device: MQTT 5 gets PUBACK 0x87, 3.1.1 is acknowledged and dropped.
    let (_, out) = publish(
        &port,
        &with(
            fleet.device_args("sensor-001"),
            &[
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-t",
                "devices/sensor-002/telemetry",
                "-m",
                "spoof",
            ],
        ),
    );
    assert!(out.contains("RC:135"), "{out}");
    let (code, _) = publish(
        &port,
        &with(
            fleet.device_args("sensor-001"),
            &["-q", "1", "-t", "devices/sensor-002/telemetry", "-m", "spoof"],
        ),
    );
    assert_eq!(code, 0);
    for topic in [
        "other/topic",
        "devices/sensor-001/shadow/update/accepted",
        "devices/sensor-001/commands/reboot",
    ] {
        publish(
            &port,
            &with(
                fleet.device_args("sensor-001"),
                &["-q", "1", "-t", topic, "-m", "spoof"],
            ),
        );
    }
    watcher.none(Duration::from_millis(500));
    // The connection was not harmed: the same client can still publish where it may.
    let (code, _) = publish(
        &port,
        &with(
            fleet.device_args("sensor-001"),
            &["-q", "1", "-t", "devices/sensor-001/events", "-m", "ok"],
        ),
    );
    assert_eq!(code, 0);
    assert_eq!(watcher.take(1, WAIT)[0].payload, "ok");
    // A device must use its id as client id.
    let (code, out) = publish(
        &port,
        &args(&[
            "-u",
            "sensor-001",
            "-P",
            fleet.token("sensor-001"),
            "-i",
            "sensor-002",
            "-t",
            "devices/sensor-001/x",
            "-m",
            "x",
        ]),
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        fleet
            .metrics()
            .await
            .contains(r#"drover_mqtt_refused_total{kind="publish",reason="not_authorized"}"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_see_each_others_topics() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    let other_admin = fleet.server.tenant_admin(&fleet.admin, "globex").await;
    let other_key = fleet.server.api_key(&other_admin, "operator").await;
    let other_token = fleet
        .server
        .register(&other_admin, json!({"deviceId": "sensor-001", "type": "t"}))
        .await;
    let mut ours = Sub::start(&port, &with(fleet.app_args("ours"), &["-t", "#"]));
    let mut theirs = Sub::start(
        &port,
        &args(&["-u", "app", "-P", &other_key, "-i", "theirs", "-t", "#"]),
    );
    // The same device id and topic in both tenants.
    publish(
        &port,
        &with(
            fleet.device_args("sensor-001"),
            &[
                "-q",
                "1",
                "-t",
                "devices/sensor-001/telemetry",
                "-m",
                r#"{"metrics":{"from":1}}"#,
            ],
        ),
    );
    publish(
        &port,
        &args(&[
            "-u",
            "sensor-001",
            "-P",
            &other_token,
            "-q",
            "1",
            "-t",
            "devices/sensor-001/telemetry",
            "-m",
            r#"{"metrics":{"from":2}}"#,
        ]),
    );
    assert_eq!(ours.take(1, WAIT)[0].payload, r#"{"metrics":{"from":1}}"#);
    assert_eq!(theirs.take(1, WAIT)[0].payload, r#"{"metrics":{"from":2}}"#);
    ours.none(Duration::from_millis(300));
    theirs.none(Duration::from_millis(300));
    // Same client id in two tenants: two sessions, no takeover.
    let mut a = Sub::start(&port, &with(fleet.app_args("same-id"), &["-t", "x"]));
    let mut b = Sub::start(
        &port,
        &args(&["-u", "app", "-P", &other_key, "-i", "same-id", "-t", "x"]),
    );
    publish(&port, &with(fleet.app_args("p"), &["-t", "x", "-m", "1"]));
    assert_eq!(a.take(1, WAIT)[0].payload, "1");
    b.none(Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_get_what_was_queued_while_away_exactly_once() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    for version in ["mqttv311", "mqttv5"] {
        let client = format!("keeper-{version}");
        let mut session = with(
            fleet.app_args(&client),
            &["-V", version, "-c", "-q", "2", "-t", "jobs/#"],
        );
        if version == "mqttv5" {
            session.extend(args(&["-x", "3600"]));
        }
        let sub = Sub::start(&port, &session);
        sub.kill();
        for (i, qos) in ["1", "2", "1", "2", "0"].iter().enumerate() {
            let (code, out) = publish(
                &port,
                &with(
                    fleet.app_args("producer"),
                    &[
                        "-V",
                        version,
                        "-q",
                        qos,
                        "-t",
                        &format!("jobs/{i}"),
                        "-m",
                        &format!("job-{i}"),
                    ],
                ),
            );
            assert_eq!(code, 0, "{out}");
        }
        let mut back = Sub::start(&port, &session);
        // Order is kept per topic and QoS (MQTT 4.6), not across them.
        let mut got = back.take(4, WAIT);
        got.sort_by(|a, b| a.payload.cmp(&b.payload));
        let payloads: Vec<&str> = got.iter().map(|m| m.payload.as_str()).collect();
        assert_eq!(
            payloads,
            ["job-0", "job-1", "job-2", "job-3"],
            "{version}: QoS 0 is not kept for absent clients"
        );
        assert_eq!(got.iter().map(|m| m.qos).collect::<Vec<_>>(), [1, 2, 1, 2]);
        assert!(
            got.iter().all(|m| !m.dup),
            "never written before, so not duplicates: {got:?}"
        );
        back.none(Duration::from_millis(500));
        drop(back);
        // Clean start forgets the session.
        let mut clean = with(
            fleet.app_args(&client),
            &["-V", version, "-q", "2", "-t", "jobs/#"],
        );
        if version == "mqttv5" {
            clean.extend(args(&["-x", "0"]));
        }
        let mut fresh = Sub::start(&port, &clean);
        fresh.none(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_client_id_takes_the_session_over() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    let mut first = Sub::start(&port, &with(fleet.app_args("twin"), &["-V", "mqttv5", "-t", "t"]));
    let mut second = Sub::start(&port, &with(fleet.app_args("twin"), &["-V", "mqttv5", "-t", "t"]));
    let log = first.disconnected(WAIT);
    assert!(
        log.iter()
            .any(|l| l.contains("received DISCONNECT") || l.contains("taken over") || l.contains("142")),
        "{log:?}"
    );
    publish(
        &port,
        &with(fleet.app_args("p"), &["-t", "t", "-m", "for-second"]),
    );
    assert_eq!(second.take(1, WAIT)[0].payload, "for-second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclean_disconnect_publishes_the_will_and_the_device_goes_offline() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    let mut watcher = Sub::start(
        &port,
        &with(fleet.app_args("watcher"), &["-t", "devices/+/status", "-q", "1"]),
    );
    let device = Sub::start(
        &port,
        &with(
            fleet.device_args("sensor-001"),
            &[
                "-t",
                "devices/sensor-001/commands/#",
                "--will-topic",
                "devices/sensor-001/status",
                "--will-payload",
                "gone",
                "--will-qos",
                "1",
            ],
        ),
    );
    eventually(WAIT, "device online", || async {
        fleet.device_status("sensor-001").await == "online"
    })
    .await;
    let (_, stats) = fleet.server.get("/stats", &fleet.admin).await;
    assert_eq!(stats["devices"]["connected"], 1);
    device.kill(); // SIGKILL: no DISCONNECT packet
    let got = watcher.take(1, WAIT);
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.as_str()),
        ("devices/sensor-001/status", "gone")
    );
    eventually(WAIT, "device offline", || async {
        fleet.device_status("sensor-001").await == "offline"
    })
    .await;
    // A clean DISCONNECT discards the will.
    let device = Sub::start(
        &port,
        &with(
            fleet.device_args("sensor-001"),
            &[
                "-t",
                "devices/sensor-001/x",
                "--will-topic",
                "devices/sensor-001/status",
                "--will-payload",
                "gone",
                "-C",
                "1",
                "-W",
                "1",
            ],
        ),
    );
    let mut device = device;
    device.disconnected(WAIT);
    watcher.none(Duration::from_millis(500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_enforced_and_a_silent_client_loses_its_connection() {
    let fleet = Fleet::start().await;
    // A raw MQTT 3.1.1 client with keep-alive 1 s and a will, that never sends anything after CONNECT.
    let mut stream = TcpStream::connect(fleet.server.mqtt).unwrap();
    stream
        .write_all(&connect_packet(
            "sensor-002",
            "sensor-002",
            fleet.token("sensor-002"),
            1,
            Some(("devices/sensor-002/status", "silent")),
        ))
        .unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    eventually(WAIT, "device online", || async {
        fleet.device_status("sensor-002").await == "online"
    })
    .await;
    let started = Instant::now();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    eventually(WAIT, "device offline after keep-alive", || async {
        fleet.device_status("sensor-002").await == "offline"
    })
    .await;
}

/// A raw MQTT 3.1.1 PUBLISH (QoS 0).
fn publish_packet(topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic);
    body.extend_from_slice(payload);
    let mut packet = vec![0x30];
    packet.extend(remaining_length(body.len()));
    packet.extend(body);
    packet
}

/// Whether the broker closed `stream` within `timeout`.
fn closed_by_broker(stream: &mut TcpStream, timeout: Duration) -> bool {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a DISCONNECT or other bytes before the close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_input_closes_only_that_connection() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    let mut bystander = Sub::start(&port, &with(fleet.app_args("bystander"), &["-t", "#"]));

    // Garbage instead of CONNECT.
    let mut s = TcpStream::connect(fleet.server.mqtt).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(closed_by_broker(&mut s, WAIT), "garbage CONNECT");

    let connected = || {
        let mut s = TcpStream::connect(fleet.server.mqtt).unwrap();
        s.write_all(&connect_packet(
            "sensor-001",
            "sensor-001",
            fleet.token("sensor-001"),
            60,
            None,
        ))
        .unwrap();
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).unwrap();
        assert_eq!(connack[3], 0);
        s
    };
    // A wildcard in a PUBLISH topic.
    let mut s = connected();
    s.write_all(&publish_packet(b"devices/sensor-001/+", b"x"))
        .unwrap();
    assert!(closed_by_broker(&mut s, WAIT), "wildcard topic");
    // A topic that is not UTF-8.
    let mut s = connected();
    s.write_all(&publish_packet(b"devices/sensor-001/\xff\xfe", b"x"))
        .unwrap();
    assert!(closed_by_broker(&mut s, WAIT), "invalid UTF-8 topic");
    // A 10 MB payload (the limit is 1 MiB).
    let mut s = connected();
    let big = vec![b'x'; 10 * 1024 * 1024];
    let _ = s.write_all(&publish_packet(b"devices/sensor-001/telemetry", &big));
    assert!(closed_by_broker(&mut s, WAIT), "oversized publish");
    // A remaining length over four bytes.
    let mut s = connected();
    s.write_all(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f]).unwrap();
    assert!(closed_by_broker(&mut s, WAIT), "bad remaining length");

    // MQTT 5 clients learn the limit from CONNACK (Maximum Packet Size) and keep to it:
    // mosquitto_pub does not even send the 2 MiB message.
    let (_, out) = publish_stdin(
        &port,
        with(
            fleet.device_args("sensor-002"),
            &[
                "-V",
                "mqttv5",
                "-q",
                "1",
                "-t",
                "devices/sensor-002/telemetry",
                "-s",
            ],
        ),
        vec![b'y'; 2 * 1024 * 1024],
    );
    assert!(!out.contains("sending PUBLISH"), "{out}");

    // Everybody else is still served.
    let (code, _) = publish(
        &port,
        &with(
            fleet.device_args("sensor-002"),
            &[
                "-q",
                "1",
                "-t",
                "devices/sensor-002/telemetry",
                "-m",
                r#"{"metrics":{"still":1}}"#,
            ],
        ),
    );
    assert_eq!(code, 0);
    let got = bystander.take(1, WAIT);
    assert_eq!(got[0].payload, r#"{"metrics":{"still":1}}"#);
    let (status, _) = fleet.server.get("/health", &fleet.admin).await;
    assert_eq!(status, StatusCode::OK);
}

/// Runs mosquitto_pub with `stdin` as its standard input (`-s`: one message, `-l`: a line each).
fn publish_stdin(port: &str, args: Vec<String>, stdin: Vec<u8>) -> (i32, String) {
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", port, "-d"])
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let output = child.wait_with_output().unwrap();
    let _ = writer.join();
    (
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

// ---- authentication ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_checked_and_refusals_counted() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    let attempt = |version: &str, creds: &[&str]| {
        publish(
            &port,
            &with(
                args(creds),
                &[
                    "-V",
                    version,
                    "-t",
                    "devices/sensor-001/telemetry",
                    "-m",
                    "x",
                    "-q",
                    "1",
                ],
            ),
        )
    };
    let token = fleet.token("sensor-001").to_string();
    for version in ["mqttv311", "mqttv5"] {
        let (code, out) = attempt(version, &["-u", "sensor-001", "-P", &token]);
        assert_eq!(code, 0, "{version}: {out}");
        // Wrong token, another device's token, no password: bad username or password (4 / 0x86).
        for creds in [
            vec!["-u", "sensor-001", "-P", "dvt_wrong"],
            vec!["-u", "sensor-002", "-P", &token],
            vec!["-u", "sensor-001"],
        ] {
            let (code, out) = attempt(version, &creds);
            assert_ne!(code, 0, "{version} {creds:?}: {out}");
            assert!(
                out.to_lowercase().contains("bad user name or password"),
                "{version} {creds:?}: {out}"
            );
        }
        // No credentials, anonymous not allowed: not authorised (5 / 0x87).
        let (code, out) = attempt(version, &[]);
        assert_ne!(code, 0);
        assert!(out.to_lowercase().contains("not authori"), "{version}: {out}");
    }
    // A rotated token stops working, and the session it opened is closed.
    let mut live = Sub::start(
        &port,
        &with(
            fleet.device_args("sensor-001"),
            &["-V", "mqttv5", "-t", "devices/sensor-001/commands/#"],
        ),
    );
    let (status, rotated) = fleet
        .server
        .post("/api/devices/sensor-001/token", &fleet.admin, json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let log = live.disconnected(WAIT);
    assert!(
        log.iter().any(|l| l.contains("DISCONNECT") || l.contains("152")),
        "{log:?}"
    );
    let (code, _) = attempt("mqttv311", &["-u", "sensor-001", "-P", &token]);
    assert_ne!(code, 0);
    let new_token = rotated["token"].as_str().unwrap().to_string();
    let (code, _) = attempt("mqttv311", &["-u", "sensor-001", "-P", &new_token]);
    assert_eq!(code, 0);
    // A disabled device is known but not authorised.
    fleet
        .server
        .patch("/api/devices/sensor-001", &fleet.admin, json!({"enabled": false}))
        .await;
    let (code, out) = attempt("mqttv311", &["-u", "sensor-001", "-P", &new_token]);
    assert_ne!(code, 0);
    assert!(out.to_lowercase().contains("not authori"), "{out}");
    // Applications log in with an API key (any username); a revoked key is refused.
    let (_, created) = fleet
        .server
        .post(
            "/api/keys",
            &fleet.admin,
            json!({"name": "temp", "role": "operator"}),
        )
        .await;
    let key = created["key"].as_str().unwrap().to_string();
    let (code, _) = publish(
        &port,
        &args(&["-u", "anything", "-P", &key, "-t", "apps/x", "-m", "x"]),
    );
    assert_eq!(code, 0);
    fleet
        .server
        .delete(
            &format!("/api/keys/{}", created["apiKey"]["id"].as_str().unwrap()),
            &fleet.admin,
        )
        .await;
    let (code, _) = publish(
        &port,
        &args(&["-u", "anything", "-P", &key, "-t", "apps/x", "-m", "x"]),
    );
    assert_ne!(code, 0);

    let metrics = fleet.metrics().await;
    assert!(
        metrics.contains(r#"drover_mqtt_refused_total{kind="connect",reason="unknown_token"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"drover_mqtt_refused_total{kind="connect",reason="anonymous_not_allowed"}"#));
    // Secrets never reach the audit log, refusals do.
    let (_, audit) = fleet
        .server
        .get(
            "/api/audit?scope=platform&action=mqtt.connect&limit=100",
            &fleet.admin,
        )
        .await;
    let text = audit.to_string();
    assert!(audit["entries"].as_array().unwrap().len() >= 5, "{text}");
    assert!(!text.contains("dvt_") && !text.contains(&key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_live_in_a_namespace_of_their_own() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start_with(|c| c.mqtt.allow_anonymous = true).await;
    let port = fleet.port();
    let mut anonymous = Sub::start(&port, &args(&["-t", "#"]));
    let mut tenant_app = Sub::start(&port, &with(fleet.app_args("app"), &["-t", "#"]));
    publish(
        &port,
        &with(
            fleet.device_args("sensor-001"),
            &["-t", "devices/sensor-001/telemetry", "-m", "tenant-data"],
        ),
    );
    publish(
        &port,
        &args(&["-t", "devices/sensor-001/telemetry", "-m", "anonymous-data"]),
    );
    assert_eq!(tenant_app.take(1, WAIT)[0].payload, "tenant-data");
    assert_eq!(anonymous.take(1, WAIT)[0].payload, "anonymous-data");
    anonymous.none(Duration::from_millis(300));
    tenant_app.none(Duration::from_millis(300));
}

// ---- access rules through the API ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_apply_to_live_connections() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    let viewer_key = fleet.server.api_key(&fleet.admin, "viewer").await;
    let viewer = |id: &str| args(&["-u", "dashboard", "-P", &viewer_key, "-i", id]);
    let mut watching = Sub::start(
        &port,
        &with(viewer("dash-1"), &["-V", "mqttv5", "-t", "alerts/#"]),
    );
    publish(
        &port,
        &with(fleet.app_args("p"), &["-t", "alerts/fire", "-m", "1"]),
    );
    assert_eq!(watching.take(1, WAIT)[0].payload, "1");
    // Viewer keys may not publish by default.
    let (_, out) = publish(
        &port,
        &with(
            viewer("dash-pub"),
            &["-V", "mqttv5", "-q", "1", "-t", "alerts/fake", "-m", "x"],
        ),
    );
    assert!(out.contains("RC:135"), "{out}");

    // Deny viewers alerts/#: the live subscription is dropped and new ones are refused.
    let (status, change) = fleet
        .server
        .post("/api/mqtt/acl", &fleet.admin, json!({"subject": "role:viewer", "action": "subscribe", "topic": "alerts/#", "effect": "deny", "priority": 10}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{change}");
    assert_eq!(change["subscriptionsDropped"], 1);
    publish(
        &port,
        &with(fleet.app_args("p"), &["-t", "alerts/fire", "-m", "2"]),
    );
    watching.none(Duration::from_millis(500));
    let refused = Sub::start(
        &port,
        &with(viewer("dash-2"), &["-V", "mqttv5", "-t", "alerts/fire"]),
    );
    assert_eq!(refused.granted, [135]);
    drop(refused);

    // Allow this one viewer key to publish status/#.
    let (_, keys) = fleet.server.get("/api/keys", &fleet.admin).await;
    let viewer_id = keys["apiKeys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "viewer")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, allow) = fleet
        .server
        .post("/api/mqtt/acl", &fleet.admin, json!({"subject": format!("apiKey:{viewer_id}"), "action": "publish", "topic": "status/#", "effect": "allow"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let mut status_sub = Sub::start(&port, &with(fleet.app_args("s"), &["-t", "status/#"]));
    let (_, out) = publish(
        &port,
        &with(
            viewer("dash-pub"),
            &["-V", "mqttv5", "-q", "1", "-t", "status/ok", "-m", "fine"],
        ),
    );
    assert!(out.contains("RC:0"), "{out}");
    assert_eq!(status_sub.take(1, WAIT)[0].payload, "fine");

    // Deleting the deny rule lets viewers subscribe again.
    let (_, rules) = fleet.server.get("/api/mqtt/acl", &fleet.admin).await;
    assert_eq!(rules["rules"].as_array().unwrap().len(), 2);
    let deny_id = rules["rules"][0]["id"].as_str().unwrap();
    assert_eq!(rules["rules"][0]["effect"], "deny", "ordered by priority");
    let (status, _) = fleet
        .server
        .delete(&format!("/api/mqtt/acl/{deny_id}"), &fleet.admin)
        .await;
    assert_eq!(status, StatusCode::OK);
    let again = Sub::start(
        &port,
        &with(viewer("dash-3"), &["-V", "mqttv5", "-t", "alerts/fire"]),
    );
    assert_eq!(again.granted, [0]);
    let _ = allow;

    // Bad rules are refused with specific errors; rules need an admin.
    for (body, code) in [
        (
            json!({"subject": "role:root", "action": "publish", "topic": "a", "effect": "deny"}),
            "validation_failed",
        ),
        (
            json!({"subject": "role:viewer", "action": "read", "topic": "a", "effect": "deny"}),
            "validation_failed",
        ),
        (
            json!({"subject": "role:viewer", "action": "publish", "topic": "a/#/b", "effect": "deny"}),
            "validation_failed",
        ),
        (
            json!({"subject": "apiKey:nope", "action": "publish", "topic": "a", "effect": "deny"}),
            "not_found",
        ),
    ] {
        let (_, response) = fleet.server.post("/api/mqtt/acl", &fleet.admin, body).await;
        assert_eq!(response["error"]["code"], code, "{response}");
    }
    let (status, _) = fleet
        .server
        .post(
            "/api/mqtt/acl",
            &fleet.key,
            json!({"subject": "anonymous", "action": "all", "topic": "#", "effect": "deny"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A connection that published to a topic is refused it once a rule denies it (a
    // connection remembers the last topic it was allowed, for the rules as they were), and
    // allowed again when the rule goes.
    let mut options = rumqttc::MqttOptions::new("dash-live", "127.0.0.1", port.parse::<u16>().unwrap());
    options.set_credentials("dashboard", viewer_key.as_str());
    let (live, mut events) = rumqttc::AsyncClient::new(options, 16);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let send = |payload: &'static str| {
        let live = live.clone();
        async move {
            live.publish("status/live", rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    };
    send("1").await;
    assert_eq!(status_sub.take(1, WAIT)[0].payload, "1");
    let (status, deny) = fleet
        .server
        .post("/api/mqtt/acl", &fleet.admin, json!({"subject": format!("apiKey:{viewer_id}"), "action": "publish", "topic": "status/#", "effect": "deny", "priority": 20}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{deny}");
    send("2").await;
    status_sub.none(Duration::from_millis(500));
    let (status, _) = fleet
        .server
        .delete(
            &format!("/api/mqtt/acl/{}", deny["rule"]["id"].as_str().unwrap()),
            &fleet.admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    send("3").await;
    // In order on one connection: had "2" been let through it would come first.
    assert_eq!(status_sub.take(1, WAIT)[0].payload, "3");
}

// ---- the actor tree --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_connections_and_publishes_reach_the_device_actor() {
    use drover_actors::device_actor::GetDeviceState;
    use drover_actors::{DeviceId, TenantId};
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start().await;
    let port = fleet.port();
    let device = Sub::start(
        &port,
        &with(fleet.device_args("sensor-001"), &["-t", "devices/sensor-001/#"]),
    );
    eventually(WAIT, "device online", || async {
        fleet.device_status("sensor-001").await == "online"
    })
    .await;
    let (_, stats) = fleet.server.get("/stats", &fleet.admin).await;
    assert_eq!(stats["devices"]["connected"], 1);
    drop(device);
    eventually(WAIT, "device offline", || async {
        fleet.device_status("sensor-001").await == "offline"
    })
    .await;
    // Each publish is a short connection of the device (its client id is its device id).
    for topic in [
        "devices/sensor-001/telemetry",
        "devices/sensor-001/telemetry",
        "devices/sensor-001/shadow/get",
        "devices/sensor-001/commands/reboot/response",
    ] {
        let (code, out) = publish(
            &port,
            &with(
                fleet.device_args("sensor-001"),
                &["-q", "1", "-t", topic, "-m", "{}"],
            ),
        );
        assert_eq!(code, 0, "{out}");
    }
    let actor = fleet
        .server
        .state
        .fleet
        .device(
            &TenantId::parse("default").unwrap(),
            &DeviceId::parse("sensor-001").unwrap(),
        )
        .await
        .unwrap()
        .unwrap();
    let state = actor.send(GetDeviceState {}).await.unwrap();
    assert_eq!(state.inbound.telemetry, 2);
    assert_eq!(state.inbound.shadow, 1);
    assert_eq!(state.inbound.command_responses, 1);
    assert!(state.last_seen.is_some());
    let (_, device) = fleet.server.get("/api/devices/sensor-001", &fleet.admin).await;
    assert!(device["lastSeenAt"].is_string());
}

// ---- limits --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_subscription_and_rate_limits_refuse_specifically() {
    if !mosquitto() {
        return;
    }
    let fleet = Fleet::start_with(|c| {
        c.limits.max_devices = 2;
        c.mqtt.max_subscriptions = 2;
        c.mqtt.max_publish_rate = 20;
    })
    .await;
    let port = fleet.port();
    // Two subscriptions are granted, the third refused (5: 0x97 quota exceeded).
    let quota = Sub::start(
        &port,
        &with(
            fleet.app_args("quota"),
            &["-V", "mqttv5", "-t", "a", "-t", "b", "-t", "c"],
        ),
    );
    assert_eq!(quota.granted, [0, 0, 151]);
    let second = Sub::start(&port, &with(fleet.app_args("second"), &["-t", "x"]));
    // The third connection is over MAX_DEVICES.
    let (code, out) = publish(
        &port,
        &with(fleet.app_args("third"), &["-V", "mqttv5", "-t", "x", "-m", "x"]),
    );
    assert_ne!(code, 0);
    assert!(out.to_lowercase().contains("quota"), "{out}");
    let (code, out) = publish(&port, &with(fleet.app_args("third"), &["-t", "x", "-m", "x"]));
    assert_ne!(code, 0);
    assert!(out.contains("unavailable"), "{out}");
    drop(quota);
    drop(second);
    eventually(WAIT, "connections released", || async {
        fleet.metrics().await.contains("drover_mqtt_connections 0")
    })
    .await;
    // A burst far above 20 messages/s: MQTT 5 gets DISCONNECT 0x96.
    let lines = "m\n".repeat(200).into_bytes();
    let (code, out) = publish_stdin(
        &port,
        with(fleet.app_args("burst"), &["-V", "mqttv5", "-t", "burst", "-l"]),
        lines,
    );
    assert!(code != 0 || out.contains("DISCONNECT"), "{out}");
    let metrics = fleet.metrics().await;
    assert!(
        metrics.contains(r#"drover_mqtt_refused_total{kind="publish",reason="rate_limited"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"drover_mqtt_refused_total{kind="subscribe",reason="quota_exceeded"} 1"#));
    assert!(metrics.contains(r#"drover_mqtt_refused_total{kind="connect",reason="connection_limit"} 2"#));
}

// ---- MQTT 5 details, with paho-mqtt --------------------------------------------------------

/// Runs a scenario of tests/support/paho_probe.py against the fleet's broker.
fn paho(fleet: &Fleet, scenario: &str, arguments: serde_json::Value) -> serde_json::Value {
    common::paho_probe(fleet.server.mqtt, &fleet.key, scenario, arguments)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_split_messages_between_members() {
    if !common::paho_available() {
        return;
    }
    let fleet = Fleet::start().await;
    let result = paho(&fleet, "shared", json!({"count": 20}));
    let (a, b) = (result["a"].as_u64().unwrap(), result["b"].as_u64().unwrap());
    assert_eq!(a + b, 20, "each message to exactly one member: {result}");
    assert!(a > 0 && b > 0, "both members get work: {result}");
    assert_eq!(
        result["watcher"], 20,
        "an ordinary subscription still gets every message"
    );
    let mut payloads: Vec<String> = result["payloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    payloads.dedup();
    assert_eq!(payloads.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_tells_mqtt5_clients_the_limits_and_capabilities() {
    if !common::paho_available() {
        return;
    }
    let fleet = Fleet::start_with(|c| c.mqtt.max_keep_alive_secs = 10).await;
    let info = paho(
        &fleet,
        "connack",
        json!({"keepalive": 60, "session_expiry": 100_000_000u64, "client_id": ""}),
    );
    assert_eq!(info["reason"], 0, "{info}");
    let props = &info["properties"];
    assert_eq!(props["ServerKeepAlive"], 10, "{props}");
    assert_eq!(props["MaximumPacketSize"], 1_048_576);
    assert_eq!(props["ReceiveMaximum"], 64);
    assert_eq!(props["TopicAliasMaximum"], 64);
    assert_eq!(
        props["SessionExpiryInterval"], 604_800,
        "capped at max_session_expiry_secs"
    );
    assert!(
        props["AssignedClientIdentifier"]
            .as_str()
            .unwrap()
            .starts_with("auto-")
    );
    // Wildcards, shared subscriptions and subscription identifiers are available (absent = 1).
    for capability in [
        "WildcardSubscriptionAvailable",
        "SharedSubscriptionAvailable",
        "SubscriptionIdentifierAvailable",
        "RetainAvailable",
    ] {
        assert_ne!(props.get(capability), Some(&json!(0)), "{capability}: {props}");
    }
    // Within the maximum nothing is imposed.
    let info = paho(&fleet, "connack", json!({"keepalive": 5}));
    assert!(info["properties"].get("ServerKeepAlive").is_none(), "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_properties_topic_aliases_and_subscription_ids_pass_through() {
    if !common::paho_available() {
        return;
    }
    let fleet = Fleet::start().await;
    let result = paho(&fleet, "properties", json!({}));
    let messages = result["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{result}");
    let first = &messages[0]["properties"];
    assert_eq!(messages[0]["topic"], "props/a");
    assert_eq!(
        first["UserProperty"],
        json!([["site", "north"], ["shift", "night"]]),
        "{first}"
    );
    assert_eq!(first["ContentType"], "application/json");
    assert_eq!(first["ResponseTopic"], "props/replies");
    assert!(
        first["CorrelationData"].as_str().is_some_and(|c| !c.is_empty()),
        "{first}"
    );
    let expiry = first["MessageExpiryInterval"].as_u64().unwrap();
    assert!(
        (598..=600).contains(&expiry),
        "remaining expiry is forwarded: {expiry}"
    );
    assert_eq!(first["SubscriptionIdentifier"], json!([7]));
    // The second publish named its topic only by alias; subscribers get the full topic.
    assert_eq!(messages[1]["topic"], "props/a");
    assert_eq!(messages[1]["payload"], "alias-only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_not_delivered_from_a_session_queue() {
    if !common::paho_available() {
        return;
    }
    let fleet = Fleet::start().await;
    let result = paho(&fleet, "expiry", json!({}));
    assert_eq!(result["session_present"], true, "{result}");
    let messages = result["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "only the fresh one: {result}");
    assert_eq!(messages[0]["payload"], "fresh");
    let left = messages[0]["properties"]["MessageExpiryInterval"]
        .as_u64()
        .unwrap();
    assert!(left < 300, "the time spent queued is subtracted: {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_is_waited_out_and_cancelled_by_a_reconnect() {
    if !common::paho_available() {
        return;
    }
    let fleet = Fleet::start().await;
    let result = paho(&fleet, "will_delay", json!({"name": "late", "delay": 2}));
    let wills = result["wills"].as_array().unwrap();
    assert_eq!(wills.len(), 1, "{result}");
    let after = wills[0]["after"].as_f64().unwrap();
    assert!(after >= 1.5, "published after the delay, not at once: {after}");
    let result = paho(
        &fleet,
        "will_delay",
        json!({"name": "back", "delay": 2, "reconnect_after": 0.5}),
    );
    assert_eq!(
        result["wills"],
        json!([]),
        "the client came back in time: {result}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_reason_codes_for_refusals() {
    if !common::paho_available() {
        return;
    }
    let fleet = Fleet::start_with(|c| c.mqtt.max_publish_rate = 20).await;
    assert_eq!(
        paho(&fleet, "reason_codes", json!({"topic": "apps/ok"}))["puback"],
        0
    );
    assert_eq!(
        paho(&fleet, "reason_codes", json!({"topic": "$SYS/x"}))["puback"],
        135,
        "not authorized"
    );
    assert_eq!(
        paho(&fleet, "takeover", json!({}))["first_disconnects"],
        json!([142]),
        "session taken over"
    );
    let rate = paho(&fleet, "rate", json!({"count": 500}));
    assert_eq!(rate["disconnects"], json!([150]), "message rate too high: {rate}");
    let big = paho(&fleet, "oversize", json!({"size": 2 * 1024 * 1024}));
    assert_eq!(big["disconnects"].as_array().unwrap().len(), 1, "{big}");
}

// ---- a Rust client: rumqttc ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_clients_on_both_versions_exchange_messages() {
    let fleet = Fleet::start().await;
    let port = fleet.server.mqtt.port();

    // MQTT 3.1.1: the device publishes, the application receives.
    let (app_tx, mut app_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut options = rumqttc::MqttOptions::new("rust-app", "127.0.0.1", port);
    options.set_credentials("app", fleet.key.clone());
    let (app, mut events) = rumqttc::AsyncClient::new(options, 16);
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            let _ = app_tx.send(event);
        }
    });
    app.subscribe("devices/+/telemetry", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let suback = next_matching(&mut app_rx, |e| {
        matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))
    })
    .await;
    if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) = suback {
        assert_eq!(
            ack.return_codes,
            [rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)]
        );
    }
    let mut options = rumqttc::MqttOptions::new("sensor-001", "127.0.0.1", port);
    options.set_credentials("sensor-001", fleet.token("sensor-001"));
    let (device, mut device_events) = rumqttc::AsyncClient::new(options, 16);
    let (device_tx, mut device_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = device_events.poll().await {
            let _ = device_tx.send(event);
        }
    });
    device
        .publish(
            "devices/sensor-001/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"metrics":{"t":1}}"#,
        )
        .await
        .unwrap();
    next_matching(&mut device_rx, |e| {
        matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))
    })
    .await;
    let publish = next_matching(&mut app_rx, |e| {
        matches!(e, rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)))
    })
    .await;
    let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = publish else {
        unreachable!()
    };
    assert_eq!(p.topic, "devices/sensor-001/telemetry");
    assert_eq!(&p.payload[..], br#"{"metrics":{"t":1}}"#);

    // MQTT 5: QoS 2 both ways.
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    let mut options = rumqttc::v5::MqttOptions::new("rust-app-5", "127.0.0.1", port);
    options.set_credentials("app", fleet.key.clone());
    let (app5, mut events5) = rumqttc::v5::AsyncClient::new(options, 16);
    let (tx5, mut rx5) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events5.poll().await {
            let _ = tx5.send(event);
        }
    });
    app5.subscribe("devices/+/events", QoS5::ExactlyOnce)
        .await
        .unwrap();
    next_matching(&mut rx5, |e| {
        matches!(e, rumqttc::v5::Event::Incoming(Packet5::SubAck(_)))
    })
    .await;
    let mut options = rumqttc::v5::MqttOptions::new("sensor-002", "127.0.0.1", port);
    options.set_credentials("sensor-002", fleet.token("sensor-002"));
    let (device5, mut device_events5) = rumqttc::v5::AsyncClient::new(options, 16);
    tokio::spawn(async move { while device_events5.poll().await.is_ok() {} });
    device5
        .publish("devices/sensor-002/events", QoS5::ExactlyOnce, false, "door-open")
        .await
        .unwrap();
    let publish = next_matching(&mut rx5, |e| {
        matches!(e, rumqttc::v5::Event::Incoming(Packet5::Publish(_)))
    })
    .await;
    let rumqttc::v5::Event::Incoming(Packet5::Publish(p)) = publish else {
        unreachable!()
    };
    assert_eq!(&p.topic[..], b"devices/sensor-002/events");
    assert_eq!(p.qos, QoS5::ExactlyOnce);
    assert_eq!(&p.payload[..], b"door-open");
}

/// The next event satisfying `wanted`, within five seconds.
async fn next_matching<T: std::fmt::Debug>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
    wanted: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) if wanted(&event) => return event,
            Ok(Some(_)) => continue,
            other => panic!("event not seen: {other:?}"),
        }
    }
}

// ---- TLS and mTLS --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_logins_with_a_token_and_with_a_client_certificate() {
    if !mosquitto() {
        return;
    }
    let certs_dir = tempfile::tempdir().unwrap();
    let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let devices = vec!["sensor-001".to_string(), "ghost".to_string()];
    let certs = drover::devcerts::generate("Test CA", &hosts, &devices).unwrap();
    certs.write(certs_dir.path()).unwrap();
    let other = drover::devcerts::generate("Other CA", &hosts, &["sensor-001".to_string()]).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    other.write(other_dir.path()).unwrap();
    let path = |dir: &tempfile::TempDir, name: &str| dir.path().join(name).to_string_lossy().to_string();
    let (cert, key) = (path(&certs_dir, "server.pem"), path(&certs_dir, "server.key"));
    let fleet = Fleet::start_with(move |c| {
        c.mqtt.tls_cert = cert;
        c.mqtt.tls_key = key;
        c.mqtt.tls_port = 0;
    })
    .await;
    let tls_port = fleet.server.mqtt_tls.expect("TLS listener").port().to_string();
    let cafile = path(&certs_dir, "ca.pem");
    let mut watcher = Sub::start(
        &fleet.port(),
        &with(fleet.app_args("watcher"), &["-t", "devices/#"]),
    );

    // Token over TLS.
    let (code, out) = publish(
        &tls_port,
        &with(
            fleet.device_args("sensor-002"),
            &[
                "--cafile",
                &cafile,
                "-q",
                "1",
                "-t",
                "devices/sensor-002/telemetry",
                "-m",
                r#"{"metrics":{"tls":1}}"#,
            ],
        ),
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(watcher.take(1, WAIT)[0].payload, r#"{"metrics":{"tls":1}}"#);

    // A client certificate is refused until its CA is registered for the tenant.
    let cert_args = |dir: &tempfile::TempDir, device: &str| {
        args(&[
            "--cafile",
            &cafile,
            "--cert",
            &path(dir, &format!("device-{device}.pem")),
            "--key",
            &path(dir, &format!("device-{device}.key")),
            "-i",
            device,
            "-q",
            "1",
            "-t",
            &format!("devices/{device}/telemetry"),
            "-m",
            r#"{"metrics":{"cert":1}}"#,
        ])
    };
    let (code, _) = publish(&tls_port, &cert_args(&certs_dir, "sensor-001"));
    assert_ne!(code, 0, "no CA registered yet");
    let (status, ca) = register_ca(&fleet.server, &fleet.admin, &certs.ca).await;
    assert_eq!(status, StatusCode::CREATED, "{ca}");
    assert_eq!(ca["fingerprint"].as_str().unwrap().len(), 64);
    let (code, out) = publish(&tls_port, &cert_args(&certs_dir, "sensor-001"));
    assert_eq!(code, 0, "{out}");
    let got = watcher.take(1, WAIT);
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.as_str()),
        ("devices/sensor-001/telemetry", r#"{"metrics":{"cert":1}}"#)
    );

    // A certificate from a CA nobody registered, and one for a device that does not exist.
    let (code, _) = publish(&tls_port, &cert_args(&other_dir, "sensor-001"));
    assert_ne!(code, 0);
    let (code, _) = publish(&tls_port, &cert_args(&certs_dir, "ghost"));
    assert_ne!(code, 0);
    // Another tenant cannot register the same (public) CA certificate to claim these devices.
    let globex = fleet.server.tenant_admin(&fleet.admin, "globex").await;
    let (status, body) = register_ca(&fleet.server, &globex, &certs.ca).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another tenant"),
        "{body}"
    );
    // Not a CA, not PEM: refused with a reason.
    let (status, body) = fleet
        .server
        .post("/api/mqtt/cas", &fleet.admin, json!({"pem": certs.server.cert}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = fleet
        .server
        .post("/api/mqtt/cas", &fleet.admin, json!({"pem": "hello"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // Removing the CA stops its certificates at once.
    let (status, _) = fleet
        .server
        .delete(
            &format!("/api/mqtt/cas/{}", ca["id"].as_str().unwrap()),
            &fleet.admin,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (code, _) = publish(&tls_port, &cert_args(&certs_dir, "sensor-001"));
    assert_ne!(code, 0);
    // Plain MQTT on the TLS port gets nowhere.
    let (code, _) = publish(
        &tls_port,
        &with(
            fleet.device_args("sensor-002"),
            &["-t", "devices/sensor-002/x", "-m", "x"],
        ),
    );
    assert_ne!(code, 0);
    watcher.none(Duration::from_millis(300));
}

// ---- slow subscribers ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_loses_messages_but_stalls_nobody() {
    // 1 MiB may wait for a connected client: the stalled one overflows it, the reader does not.
    let fleet = Fleet::start_with(|c| c.mqtt.max_queued_bytes = 1 << 20).await;
    let port = fleet.server.mqtt.port();
    // A subscriber that never reads what it is sent.
    let mut stalled = TcpStream::connect(fleet.server.mqtt).unwrap();
    stalled
        .write_all(&connect_packet("stalled", "app", &fleet.key, 0, None))
        .unwrap();
    let mut connack = [0u8; 4];
    stalled.read_exact(&mut connack).unwrap();
    let topic = b"flood/#";
    let mut body = vec![0x00, 0x01];
    body.extend((topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    body.push(0);
    let mut subscribe = vec![0x82];
    subscribe.extend(remaining_length(body.len()));
    subscribe.extend(body);
    stalled.write_all(&subscribe).unwrap();
    let mut suback = [0u8; 5];
    stalled.read_exact(&mut suback).unwrap();
    assert_eq!(suback[0], 0x90);

    // A reader that keeps up.
    let mut options = rumqttc::MqttOptions::new("reader", "127.0.0.1", port);
    options.set_credentials("app", fleet.key.clone());
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (reader, mut reader_events) = rumqttc::AsyncClient::new(options, 64);
    let (count_tx, mut count_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = reader_events.poll().await {
            match event {
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    let _ = count_tx.send(p.payload.len());
                }
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    let _ = count_tx.send(0);
                }
                _ => {}
            }
        }
    });
    reader
        .subscribe("flood/#", rumqttc::QoS::AtMostOnce)
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, count_rx.recv()).await.unwrap(),
        Some(0),
        "subscribed"
    );

    // 2000 messages of 16 KiB (32 MiB), far more than the stalled socket and its queue hold,
    // paced so that a reading subscriber keeps up.
    let mut options = rumqttc::MqttOptions::new("producer", "127.0.0.1", port);
    options.set_credentials("app", fleet.key.clone());
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (producer, mut producer_events) = rumqttc::AsyncClient::new(options, 256);
    tokio::spawn(async move { while producer_events.poll().await.is_ok() {} });
    let payload = vec![b'z'; 16 * 1024];
    for _ in 0..20 {
        for _ in 0..100 {
            producer
                .publish("flood/data", rumqttc::QoS::AtMostOnce, false, payload.clone())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let mut received = 0;
    while received < 2000 {
        match tokio::time::timeout(WAIT, count_rx.recv()).await {
            Ok(Some(len)) => {
                assert_eq!(len, 16 * 1024);
                received += 1;
            }
            _ => panic!("the reading subscriber got {received} of 2000"),
        }
    }

    // Meanwhile the broker answers everyone else promptly.
    let started = Instant::now();
    if mosquitto() {
        let (code, _) = publish(
            &fleet.port(),
            &with(
                fleet.device_args("sensor-001"),
                &["-q", "1", "-t", "devices/sensor-001/telemetry", "-m", "ping"],
            ),
        );
        assert_eq!(code, 0);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    let metrics = fleet.metrics().await;
    let dropped: u64 = metrics
        .lines()
        .find(|l| l.starts_with(r#"drover_mqtt_messages_dropped_total{reason="queue_full"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "the stalled subscriber's overflow is counted");
    drop(stalled);
}
