//! Smoke runs of drover-load against a real server (tiny parameters: these check that each
//! command works end to end, not how fast anything is).

use std::process::Command;

use drover::config::Config;
use drover::server::ServerThread;
use serde_json::Value;

struct Server {
    server: ServerThread,
    base: String,
    token: String,
    _dir: tempfile::TempDir,
}

fn start() -> Server {
    start_with(|_| {})
}

fn start_with(tweak: impl FnOnce(&mut Config)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.http.bind = "127.0.0.1".into();
    config.http.port = 0;
    config.mqtt.bind = "127.0.0.1".into();
    config.mqtt.port = 0;
    config.storage.data_dir = dir.path().to_path_buf();
    tweak(&mut config);
    let server = ServerThread::spawn(config, Some("load-test-password".into())).unwrap();
    let base = format!("http://{}", server.http_addr);
    let login: Value = reqwest::blocking::Client::new()
        .post(format!("{base}/api/auth/login"))
        .json(&serde_json::json!({"username": "admin", "password": "load-test-password"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let token = login["token"].as_str().unwrap().to_string();
    Server {
        server,
        base,
        token,
        _dir: dir,
    }
}

fn load(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_drover-load"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

/// The JSON line a command printed last.
fn json_line(stdout: &str) -> Value {
    serde_json::from_str(stdout.lines().rev().find(|l| l.starts_with('{')).unwrap()).unwrap()
}

#[test]
fn provision_registers_devices_and_reuses_them() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("devices.csv");
    let file = file.to_str().unwrap();
    let (ok, _, err) = load(&[
        "provision",
        "--url",
        &s.base,
        "--api-key",
        &s.token,
        "--devices",
        "25",
        "--devices-file",
        file,
    ]);
    assert!(ok, "{err}");
    let csv = std::fs::read_to_string(file).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 25);
    assert!(rows[0].starts_with("sim-00001,dvt_"));
    let list: Value = reqwest::blocking::Client::new()
        .get(format!("{}/api/devices?tag=simulated&limit=1", s.base))
        .bearer_auth(&s.token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(list["total"], 25);
    // Again with more: the 25 are reused (their tokens kept), 5 are new.
    let (ok, _, err) = load(&[
        "provision",
        "--url",
        &s.base,
        "--api-key",
        &s.token,
        "--devices",
        "30",
        "--devices-file",
        file,
    ]);
    assert!(ok);
    assert!(
        err.contains("30 devices ready") && err.contains("(5 new)"),
        "{err}"
    );
    let again = std::fs::read_to_string(file).unwrap();
    assert!(again.contains(rows[0]), "existing tokens are kept");

    // A smaller run keeps the other rows: their tokens are the only copy.
    let provision = |devices: &str| {
        load(&[
            "provision",
            "--url",
            &s.base,
            "--api-key",
            &s.token,
            "--devices",
            devices,
            "--devices-file",
            file,
        ])
    };
    let (ok, _, err) = provision("5");
    assert!(ok, "{err}");
    assert!(err.contains("(0 new)"), "{err}");
    assert_eq!(std::fs::read_to_string(file).unwrap(), again, "no row dropped");
    let (ok, _, err) = provision("30");
    assert!(ok && err.contains("(0 new)"), "nothing rotated: {err}");
    assert_eq!(std::fs::read_to_string(file).unwrap(), again);

    // Devices registered before but missing from the file can only get new tokens: said so.
    let first_ten: String = again.lines().take(11).map(|l| format!("{l}\n")).collect();
    std::fs::write(file, &first_ten).unwrap();
    let (ok, _, err) = provision("12");
    assert!(ok, "{err}");
    assert!(err.contains("(0 new, 2 registered before"), "{err}");
    let now = std::fs::read_to_string(file).unwrap();
    assert!(now.starts_with(&first_ten), "{now}");
    let old: Vec<&str> = again.lines().collect();
    let new: Vec<&str> = now.lines().collect();
    assert_eq!(new.len(), 13);
    assert!(
        new[11].starts_with("sim-00011,") && new[11] != old[11],
        "rotated: {now}"
    );
}

#[test]
fn simulate_connects_publishes_and_the_server_counts_it() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("devices.csv");
    let port = s.server.mqtt_addr.port().to_string();
    let (ok, out, err) = load(&[
        "simulate",
        "--url",
        &s.base,
        "--api-key",
        &s.token,
        "--mqtt-port",
        &port,
        "--devices",
        "5",
        "--rate",
        "5",
        "--duration",
        "2",
        "--quiet",
        "--devices-file",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let summary = json_line(&out);
    assert_eq!(summary["connected"], 5, "{out}");
    assert!(summary["messages_sent"].as_u64().unwrap() >= 20, "{out}");
    assert_eq!(summary["errors"], 0);
    let metrics = reqwest::blocking::get(format!("{}/metrics", s.base))
        .unwrap()
        .text()
        .unwrap();
    let received: f64 = metrics
        .lines()
        .find(|l| l.starts_with(r#"drover_mqtt_messages_received_total{qos="1"}"#))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    // Besides telemetry each device publishes its firmware report and asks for a pending OTA
    // job when it connects; the telemetry alone is checked against the store below.
    assert!(
        received as u64 >= summary["messages_sent"].as_u64().unwrap(),
        "every message sent was received: {received} < {}",
        summary["messages_sent"]
    );
    // The server's own figures agree: every message was committed to the store. A message
    // sent right before the simulator's DISCONNECT may still be on its way to the store when
    // the simulator returns: its commit is counted a moment later.
    let read_stats = || -> Value {
        reqwest::blocking::Client::new()
            .get(format!("{}/stats", s.base))
            .bearer_auth(&s.token)
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let sent = summary["messages_sent"].as_u64().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut stats = read_stats();
    while stats["telemetry"]["messages"].as_u64().unwrap_or(0) < sent && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
        stats = read_stats();
    }
    assert_eq!(
        stats["telemetry"]["messages"], summary["messages_sent"],
        "{stats}"
    );
    assert_eq!(stats["devices"]["registered"], 5, "{stats}");
}

#[test]
fn bench_scenarios_run_with_tiny_parameters() {
    let s = start();
    let port = s.server.mqtt_addr.port().to_string();
    let (_, created, _) = {
        let key: Value = reqwest::blocking::Client::new()
            .post(format!("{}/api/keys", s.base))
            .bearer_auth(&s.token)
            .json(&serde_json::json!({"name": "bench", "role": "operator"}))
            .send()
            .unwrap()
            .json()
            .unwrap();
        (true, key["key"].as_str().unwrap().to_string(), String::new())
    };
    for qos in ["0", "1", "2"] {
        let (ok, out, err) = load(&[
            "bench",
            "fanout",
            "--target",
            "drover",
            "--port",
            &port,
            "--username",
            "b",
            "--password",
            &created,
            "--qos",
            qos,
            "--messages",
            "200",
            "--subscribers",
            "2",
        ]);
        assert!(ok, "{err}");
        let report = json_line(&out);
        assert_eq!(report["scenario"], "fanout");
        assert_eq!(report["results"]["expected"], 400);
        assert_eq!(report["results"]["delivered"], 400, "q{qos}: {out}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("devices.csv");
    let record = dir.path().join("results.jsonl");
    let (ok, out, err) = load(&[
        "bench",
        "connect",
        "--url",
        &s.base,
        "--api-key",
        &s.token,
        "--mqtt-port",
        &port,
        "--devices",
        "20",
        "--hold",
        "0",
        "--settle",
        "2",
        "--devices-file",
        file.to_str().unwrap(),
        "--record",
        record.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let report = json_line(&out);
    assert_eq!(report["results"]["connected"], 20, "{out}");
    assert_eq!(report["results"]["failed"], 0);
    // The RSS reported is the lowest seen over the settle window, the one right after the hold
    // is kept beside it.
    let rss = report["results"]["server_rss_mib"].as_f64().expect("RSS");
    let held = report["results"]["server_rss_held_mib"]
        .as_f64()
        .expect("RSS after the hold");
    assert!(rss > 0.0 && rss <= held, "{out}");
    assert!(
        report["results"]["server_rss_per_connection_kib"].is_number(),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(record).unwrap().lines().count(),
        1,
        "recorded"
    );
}

#[test]
fn bench_ingest_reads_back_what_was_acknowledged_and_bench_query_times_each_shape() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("devices.csv");
    let port = s.server.mqtt_addr.port().to_string();
    let (ok, out, err) = load(&[
        "bench",
        "ingest",
        "--url",
        &s.base,
        "--api-key",
        &s.token,
        "--mqtt-port",
        &port,
        "--devices",
        "4",
        "--qos",
        "1",
        "--seconds",
        "2",
        "--rate",
        "200",
        "--watch",
        "2",
        "--devices-file",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let report = json_line(&out);
    let r = &report["results"];
    assert!(r["sent"].as_u64().unwrap() >= 300, "{out}");
    // The dashboard watching two of the four devices saw each of their messages, once.
    assert_eq!(r["dashboard_devices"], 2, "{out}");
    assert!(r["dashboard_expected"].as_u64().unwrap() >= 150, "{out}");
    assert_eq!(r["dashboard_received"], r["dashboard_expected"], "{out}");
    assert!(r["dashboard_latency_p99_ms"].as_f64().unwrap() > 0.0, "{out}");
    assert_eq!(r["acked"], r["sent"], "{out}");
    assert_eq!(
        r["stored"], r["sent"],
        "every acknowledged message is stored: {out}"
    );
    assert!(r["ack_latency_p99_ms"].as_f64().unwrap() > 0.0, "{out}");

    let (ok, out, err) = load(&[
        "bench",
        "query",
        "--url",
        &s.base,
        "--api-key",
        &s.token,
        "--points",
        "20000",
        "--repeat",
        "2",
        "--wait-rollups",
        "0",
    ]);
    assert!(ok, "{err}");
    let report = json_line(&out);
    let r = &report["results"];
    assert_eq!(r["raw_last_10000_rows"], 10000, "{out}");
    assert_eq!(r["count_whole_range_rows"], 1, "{out}");
    assert!(r["mean_per_hour_p50_ms"].as_f64().unwrap() > 0.0, "{out}");
}

#[test]
fn bench_rules_creates_rules_and_counts_their_evaluations() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("devices.csv");
    let port = s.server.mqtt_addr.port().to_string();
    let (ok, out, err) = load(&[
        "bench",
        "rules",
        "--url",
        &s.base,
        "--api-key",
        &s.token,
        "--mqtt-port",
        &port,
        "--devices",
        "2",
        "--rules",
        "8",
        "--seconds",
        "2",
        "--rate",
        "50",
        "--devices-file",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let report = json_line(&out);
    let r = &report["results"];
    assert_eq!(r["rules_created"], 8, "{out}");
    assert_eq!(r["stored"], r["sent"], "{out}");
    // Every stored message was evaluated by every rule.
    assert_eq!(
        r["rule_evaluations"].as_f64().unwrap(),
        8.0 * r["stored"].as_f64().unwrap(),
        "{out}"
    );
}

#[test]
fn simulate_connects_over_tls() {
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = drover::devcerts::generate("Load CA", &["127.0.0.1".to_string()], &[]).unwrap();
    certs.write(certs_dir.path()).unwrap();
    let (cert, key) = (
        certs_dir.path().join("server.pem"),
        certs_dir.path().join("server.key"),
    );
    let s = start_with(|c| {
        c.mqtt.tls_port = 0;
        c.mqtt.tls_cert = cert.to_string_lossy().to_string();
        c.mqtt.tls_key = key.to_string_lossy().to_string();
    });
    let (server, base, token) = (&s.server, &s.base, &s.token);
    let dir = tempfile::tempdir().unwrap();
    let tls_port = server.mqtt_tls_addr.expect("TLS listener").port().to_string();
    let file = dir.path().join("devices.csv");
    let ca = certs_dir.path().join("ca.pem");
    let (ok, out, err) = load(&[
        "simulate",
        "--url",
        base,
        "--api-key",
        token,
        "--mqtt-port",
        &tls_port,
        "--tls-ca",
        ca.to_str().unwrap(),
        "--devices",
        "3",
        "--rate",
        "5",
        "--duration",
        "2",
        "--quiet",
        "--devices-file",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let summary = json_line(&out);
    assert_eq!(summary["connected"], 3, "{out}");
    assert!(summary["messages_acked"].as_u64().unwrap() >= 10, "{out}");
    assert_eq!(summary["errors"], 0, "{out}");
}
