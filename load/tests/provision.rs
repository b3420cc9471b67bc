//! `drover-load provision` against a real server.

use std::process::Command;

use drover::config::Config;
use drover::server::ServerThread;

#[test]
fn provision_registers_devices_and_writes_their_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.http.bind = "127.0.0.1".into();
    config.http.port = 0;
    config.mqtt.bind = "127.0.0.1".into();
    config.mqtt.port = 0;
    config.storage.data_dir = dir.path().to_path_buf();
    let server = ServerThread::spawn(config, Some("load-test-password".into())).unwrap();
    let base = format!("http://{}", server.http_addr);

    let client = reqwest::blocking::Client::new();
    let login: serde_json::Value = client
        .post(format!("{base}/api/auth/login"))
        .json(&serde_json::json!({"username": "admin", "password": "load-test-password"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let token = login["token"].as_str().unwrap();
    let output = dir.path().join("devices.csv");
    let run = |count: &str| {
        Command::new(env!("CARGO_BIN_EXE_drover-load"))
            .args([
                "provision",
                "--url",
                &base,
                "--api-key",
                token,
                "--devices",
                count,
                "--output",
            ])
            .arg(&output)
            .output()
            .unwrap()
    };
    let result = run("25");
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let csv = std::fs::read_to_string(&output).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 25);
    assert!(rows[0].starts_with("sim-00001,dvt_"));

    let list: serde_json::Value = client
        .get(format!("{base}/api/devices?tag=simulated&limit=1"))
        .bearer_auth(token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(list["total"], 25);

    // Running again with more devices registers only the new ones.
    let result = run("30");
    assert!(result.status.success());
    assert!(String::from_utf8_lossy(&result.stdout).contains("registered 5 devices (25 already existed)"));
    server.stop();
}
