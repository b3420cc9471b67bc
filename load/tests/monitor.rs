//! `drover-load monitor` against a real server: it connects to the live stream and prints the
//! alarm that a device's telemetry opens, then its acknowledgement and clear, each dated by the
//! time it happened.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use drover::config::Config;
use drover::server::ServerThread;
use serde_json::{Value, json};

#[test]
fn monitor_prints_an_alarm_as_it_opens_is_acknowledged_and_clears() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.http.bind = "127.0.0.1".into();
    config.http.port = 0;
    config.mqtt.bind = "127.0.0.1".into();
    config.mqtt.port = 0;
    config.storage.data_dir = dir.path().to_path_buf();
    let server = ServerThread::spawn(config, Some("monitor-test-password".into())).unwrap();
    let base = format!("http://{}", server.http_addr);
    let http = reqwest::blocking::Client::new();
    let login: Value = http
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"username": "admin", "password": "monitor-test-password"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let token = login["token"].as_str().unwrap().to_string();
    let call = |path: &str, body: Value| -> Value {
        let response = http
            .post(format!("{base}{path}"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .unwrap();
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.json().unwrap()
    };
    call(
        "/api/rules",
        json!({"name": "Hot", "condition": "temperature > 30", "severity": "critical"}),
    );
    let device = call(
        "/api/devices/register",
        json!({"deviceId": "boiler-7", "type": "boiler"}),
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_drover-load"))
        .args(["monitor", "--url", &base, "--api-key", &token, "--count", "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let hello = lines.next().unwrap().unwrap();
    assert_eq!(hello, "connected to tenant default");

    let mut options = rumqttc::MqttOptions::new("boiler-7", "127.0.0.1", server.mqtt_addr.port());
    options.set_credentials("boiler-7", device["token"].as_str().unwrap());
    let (client, mut connection) = rumqttc::Client::new(options, 10);
    std::thread::spawn(move || for _ in connection.iter() {});
    client
        .publish(
            "devices/boiler-7/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            json!({"metrics": {"temperature": 95}}).to_string(),
        )
        .unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(20)).expect("an alarm line");
    assert!(line.contains("OPENED"), "{line}");
    assert!(
        line.contains("critical") && line.contains("boiler-7") && line.contains("Hot"),
        "{line}"
    );
    let id = line
        .rsplit("id=")
        .next()
        .expect("the line names the alarm")
        .to_string();

    for (action, event, field) in [
        ("ack", "ACKNOWLEDGED", "ackedAt"),
        ("clear", "CLEARED", "clearedAt"),
    ] {
        let response = http
            .post(format!("{base}/api/alerts/{id}/{action}"))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert!(response.status().is_success(), "{action}: {}", response.status());
        let alarm: Value = response.json().unwrap();
        let at = alarm[field].as_str().expect("the time of the change");
        let line = rx.recv_timeout(Duration::from_secs(20)).expect("an alarm line");
        assert!(line.contains(event), "{line}");
        assert!(line.starts_with(at), "dated by {field} {at}: {line}");
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "monitor exits after --count 3");
    server.stop();
}
