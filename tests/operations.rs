//! Operations: health, metrics, OpenAPI, and the `drover` binary as an operator runs it
//! (first start, configuration errors, signals, log hygiene).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Backend, TestServer, service_url};
use drover::config::{Config, Secret};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_ok_on_embedded_defaults() {
    let server = TestServer::start(Backend::Sqlite).unwrap();
    let response = server.client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["checks"]["registry"]["status"], "up");
    assert_eq!(body["checks"]["redis"]["status"], "not_configured");
    assert_eq!(body["checks"]["influxdb"]["status"], "not_configured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_when_a_configured_backend_is_down() {
    // Nothing listens on port 9 of loopback (discard), so both checks fail fast.
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.redis.url = Secret::new("redis://127.0.0.1:9/");
        c.influx.url = "http://127.0.0.1:9".into();
    })
    .unwrap();
    let response = server.client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["redis"]["status"], "down");
    assert_eq!(body["checks"]["influxdb"]["status"], "down");
    assert_eq!(body["checks"]["registry"]["status"], "up");
    // Why it is down is for the platform admin.
    assert!(body["checks"]["redis"].get("error").is_none(), "{body}");
    let admin = server.admin_token().await;
    let (status, body) = server.get("/health", &admin).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["checks"]["redis"]["error"].as_str().is_some(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_degraded_not_down_without_redis() {
    // Redis is a cache (and a cluster's meeting point): the platform serves without it.
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.redis.url = Secret::new("redis://127.0.0.1:9/");
    })
    .unwrap();
    let response = server.client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["checks"]["redis"]["status"], "down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_sees_real_redis_and_influxdb() {
    let (Some(redis), Some(influx)) = (
        service_url("DROVER_TEST_REDIS_URL"),
        service_url("DROVER_TEST_INFLUX_URL"),
    ) else {
        return;
    };
    let server = TestServer::start_with(Backend::Sqlite, |c| {
        c.redis.url = Secret::new(redis);
        c.influx.url = influx;
    })
    .unwrap();
    let response = server.client.get(server.url("/health")).send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checks"]["redis"]["status"], "up");
    assert_eq!(body["checks"]["influxdb"]["status"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text() {
    let server = TestServer::start(Backend::Sqlite).unwrap();
    let admin = server.admin_token().await;
    server
        .register(&admin, json!({"deviceId": "sensor-001", "type": "t"}))
        .await;
    server.get("/api/devices/sensor-001", &admin).await;
    server.get("/api/devices/ghost", &admin).await;
    let response = server.client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().await.unwrap();
    for expected in [
        r#"drover_http_requests_total{method="GET",route="/api/devices/{id}",status="200"} 1"#,
        r#"drover_http_requests_total{method="GET",route="/api/devices/{id}",status="404"} 1"#,
        r#"drover_http_requests_total{method="POST",route="/api/devices/register",status="201"} 1"#,
        "drover_http_request_duration_seconds_bucket{method=\"GET\",route=\"/api/devices/{id}\",le=\"0.005\"}",
        "drover_devices_registered 1",
        "drover_devices_connected 0",
        "drover_tenants 1",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "drover_build_info{version=",
    ] {
        assert!(text.contains(expected), "missing {expected}:\n{text}");
    }
    // Every non-comment line is `name{labels} value`.
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_every_endpoint() {
    let server = TestServer::start(Backend::Sqlite).unwrap();
    let response = server
        .client
        .get(server.url("/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(doc["info"]["title"], "Drover API");
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let expected = [
        ("/api/auth/login", "post"),
        ("/api/auth/me", "get"),
        ("/api/devices/register", "post"),
        ("/api/devices", "get"),
        ("/api/devices/{id}", "get"),
        ("/api/devices/{id}", "patch"),
        ("/api/devices/{id}", "delete"),
        ("/api/devices/{id}/shadow", "get"),
        ("/api/devices/{id}/shadow", "patch"),
        ("/api/devices/{id}/token", "post"),
        ("/api/devices/{id}/tags", "post"),
        ("/api/devices/{id}/tags/{tag}", "delete"),
        ("/api/groups", "get"),
        ("/api/groups", "post"),
        ("/api/groups/{name}", "get"),
        ("/api/groups/{name}", "patch"),
        ("/api/groups/{name}", "delete"),
        ("/api/groups/{name}/members", "get"),
        ("/api/groups/{name}/members", "post"),
        ("/api/groups/{name}/members/{deviceId}", "delete"),
        ("/api/users", "get"),
        ("/api/users", "post"),
        ("/api/users/{id}", "get"),
        ("/api/users/{id}", "patch"),
        ("/api/users/{id}", "delete"),
        ("/api/keys", "get"),
        ("/api/keys", "post"),
        ("/api/keys/{id}", "delete"),
        ("/api/tenants", "get"),
        ("/api/tenants", "post"),
        ("/api/tenants/{id}", "get"),
        ("/api/tenants/{id}", "patch"),
        ("/api/audit", "get"),
        ("/api/mqtt/acl", "get"),
        ("/api/mqtt/acl", "post"),
        ("/api/mqtt/acl/{id}", "delete"),
        ("/api/mqtt/cas", "get"),
        ("/api/mqtt/cas", "post"),
        ("/api/mqtt/cas/{id}", "delete"),
        ("/api/mqtt/cas/registration-code", "get"),
        ("/api/telemetry/{deviceId}", "get"),
        ("/api/devices/{deviceId}/telemetry", "post"),
        ("/api/device-types", "get"),
        ("/api/device-types/{type}", "get"),
        ("/api/device-types/{type}", "put"),
        ("/api/device-types/{type}", "delete"),
        ("/api/rules", "get"),
        ("/api/rules", "post"),
        ("/api/rules/{id}", "get"),
        ("/api/rules/{id}", "patch"),
        ("/api/rules/{id}", "delete"),
        ("/api/channels", "get"),
        ("/api/channels", "post"),
        ("/api/channels/{id}", "get"),
        ("/api/channels/{id}", "patch"),
        ("/api/channels/{id}", "delete"),
        ("/api/channels/{id}/test", "post"),
        ("/api/alerts", "get"),
        ("/api/alerts/{id}", "get"),
        ("/api/alerts/{id}/ack", "post"),
        ("/api/alerts/{id}/clear", "post"),
        ("/api/alerts/{id}/comments", "post"),
        ("/api/devices/batch", "post"),
        ("/api/jobs", "get"),
        ("/api/jobs/{id}", "get"),
        ("/api/jobs/{id}/cancel", "post"),
        ("/api/jobs/{id}/tokens", "post"),
        ("/api/devices/{id}/commands", "post"),
        ("/api/devices/{id}/commands", "get"),
        ("/api/commands/{id}", "get"),
        ("/ws", "get"),
        ("/ws/devices/{deviceId}", "get"),
        ("/health", "get"),
        ("/metrics", "get"),
        ("/stats", "get"),
        ("/stats/busiest-devices", "get"),
        ("/admin/actors", "get"),
        ("/admin/actors/{tenant}/{deviceId}", "get"),
        ("/admin/cluster", "get"),
        ("/api/analytics/anomalies", "get"),
        ("/api/analytics/anomalies/{deviceId}.svg", "get"),
        ("/api/analytics/backtest", "post"),
        ("/api/analytics/config", "get"),
        ("/api/analytics/config", "put"),
        ("/api/analytics/config/device-types/{type}", "get"),
        ("/api/analytics/config/device-types/{type}", "put"),
        ("/api/analytics/config/devices/{deviceId}", "get"),
        ("/api/analytics/config/devices/{deviceId}", "put"),
        ("/api/analytics/correlation", "get"),
        ("/api/analytics/drift/{deviceId}", "get"),
        ("/api/analytics/forecast/{deviceId}", "get"),
        ("/api/analytics/forecast/{deviceId}.svg", "get"),
        ("/api/analytics/maintenance", "get"),
        ("/api/analytics/maintenance/{deviceId}", "get"),
        ("/api/analytics/stats/{deviceId}", "get"),
        ("/api/analytics/trend/{deviceId}", "get"),
        ("/api/campaigns", "get"),
        ("/api/campaigns", "post"),
        ("/api/campaigns/{id}", "get"),
        ("/api/campaigns/{id}/cancel", "post"),
        ("/api/campaigns/{id}/devices", "get"),
        ("/api/campaigns/{id}/devices/{deviceId}", "get"),
        ("/api/campaigns/{id}/pause", "post"),
        ("/api/campaigns/{id}/resume", "post"),
        ("/api/campaigns/{id}/rollback", "post"),
        ("/api/firmware", "get"),
        ("/api/firmware", "post"),
        ("/api/firmware/signing-key", "get"),
        ("/api/firmware/{id}", "delete"),
        ("/api/firmware/{id}", "get"),
        ("/api/firmware/{id}/download", "get"),
    ];
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in expected {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} is not described"
        );
    }
    let described: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(
        described,
        expected.len(),
        "an endpoint is described that this test does not know: {:?}",
        paths.keys().collect::<Vec<_>>()
    );
    assert!(doc["components"]["schemas"]["RegisterDevice"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_get_a_json_404() {
    let server = TestServer::start(Backend::Sqlite).unwrap();
    let response = server.client.get(server.url("/api/nope")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

// ---- the binary --------------------------------------------------------------------------

const BINARY: &str = env!("CARGO_BIN_EXE_drover");

/// A `drover serve` process with its stdout and stderr collected line by line.
struct Process {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    out_lines: Vec<String>,
    err_lines: Vec<String>,
}

impl Process {
    fn spawn(data_dir: &std::path::Path, env: &[(&str, &str)]) -> Process {
        Process::spawn_with(data_dir, env, |_| {})
    }

    /// As [`Process::spawn`], with a last change to the command (limits, for instance).
    fn spawn_with(
        data_dir: &std::path::Path,
        env: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
    ) -> Process {
        let mut command = Command::new(BINARY);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", "0")
            .env("HTTP_BIND", "127.0.0.1")
            .env("MQTT_PORT", "0")
            .env("MQTT_BIND", "127.0.0.1")
            .env("DATA_DIR", data_dir)
            .current_dir(data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        adjust(&mut command);
        let mut child = command.spawn().expect("drover starts");
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        Process {
            child,
            stdout,
            stderr,
            out_lines: vec![],
            err_lines: vec![],
        }
    }

    /// Waits for the stdout line containing `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.drain_stderr();
            match self.stdout.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    self.out_lines.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("drover exited before printing {needle:?}: {:?}", self.err_lines)
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stdout: {:?} {:?}",
                self.out_lines,
                self.err_lines
            );
        }
    }

    fn base_url(&mut self) -> String {
        let line = self.wait_for("is running: console ");
        let start = line.find("API http://").unwrap() + "API ".len();
        let rest = &line[start..];
        rest[..rest.find("/api").unwrap()].to_string()
    }

    fn drain_stderr(&mut self) {
        while let Ok(line) = self.stderr.try_recv() {
            self.err_lines.push(line);
        }
    }

    fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>, Vec<String>) {
        unsafe_kill(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "drover did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        // The pipes close with the process; collect the rest.
        while let Ok(line) = self.stdout.recv_timeout(Duration::from_secs(2)) {
            self.out_lines.push(line);
        }
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(2)) {
            self.err_lines.push(line);
        }
        (status, self.out_lines, self.err_lines)
    }
}

fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn unsafe_kill(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success());
}

#[test]
fn generate_config_writes_the_defaults() {
    let output = Command::new(BINARY).arg("generate-config").output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert_eq!(Config::from_toml(&text).unwrap(), Config::default());

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("drover.toml");
    assert!(
        Command::new(BINARY)
            .args(["generate-config", "--output"])
            .arg(&file)
            .status()
            .unwrap()
            .success()
    );
    let again = Command::new(BINARY)
        .args(["generate-config", "--output"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!again.status.success(), "does not overwrite without --force");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn invalid_configuration_stops_the_start_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("PORT", "eighty")], "PORT"),
        (&[("DATABASE_URL", "mysql://db/drover")], "DATABASE_URL"),
        (&[("LOG_FORMAT", "xml")], "LOG_FORMAT"),
        (&[("JWT_SECRET", "too-short")], "JWT_SECRET"),
        (&[("REDIS_URL", "http://cache")], "REDIS_URL"),
        (&[("MAX_DEVICES", "0")], "MAX_DEVICES"),
    ];
    for (env, key) in cases {
        let mut command = Command::new(BINARY);
        command
            .env("DATA_DIR", dir.path())
            .env("MQTT_PORT", "0")
            .current_dir(dir.path());
        for (k, v) in *env {
            command.env(k, v);
        }
        let output = command.output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{env:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("invalid configuration") && stderr.contains(key),
            "{env:?}: {stderr}"
        );
    }
    // A typo in the file is named too.
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[http]\nprot = 8080\n").unwrap();
    let output = Command::new(BINARY).arg("--config").arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("prot"));
}

#[test]
fn first_start_prints_the_admin_password_once_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = Process::spawn(dir.path(), &[]);
    let password_line = process.wait_for("Password: ");
    let password = password_line.split_whitespace().nth(1).unwrap().to_string();
    assert!(password.len() >= 20, "{password_line}");
    let base = process.base_url();

    let client = reqwest::blocking::Client::new();
    let response = client
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"username": "admin", "password": password}))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, out, err) = process.terminate();
    assert!(status.success(), "exit status {status:?}: {out:?} {err:?}");
    assert!(!out.iter().any(|l| l.contains("panicked")));
    assert!(
        dir.path().join("drover.db").exists(),
        "the registry is created in the data dir"
    );

    // Second start: same data, no new admin, no password printed.
    let mut process = Process::spawn(dir.path(), &[]);
    process.base_url();
    let (status, out, _) = process.terminate();
    assert!(status.success());
    assert!(!out.iter().any(|l| l.contains("Password")), "{out:?}");
}

#[test]
fn logs_are_json_on_request_and_never_contain_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let admin_password = "operator-chosen-password";
    let jwt_secret = "jwt-secret-that-must-not-leak-0123456789";
    let mut process = Process::spawn(
        dir.path(),
        &[
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "debug"),
            ("DROVER_ADMIN_PASSWORD", admin_password),
            ("JWT_SECRET", jwt_secret),
        ],
    );
    let base = process.base_url();
    let client = reqwest::blocking::Client::new();
    let login: Value = client
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"username": "admin", "password": admin_password}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let token = login["token"].as_str().unwrap().to_string();
    let key: Value = client
        .post(format!("{base}/api/keys"))
        .bearer_auth(&token)
        .json(&json!({"name": "k", "role": "operator"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let key = key["key"].as_str().unwrap().to_string();
    let device: Value = client
        .post(format!("{base}/api/devices/register"))
        .bearer_auth(&key)
        .json(&json!({"deviceId": "sensor-001", "type": "t"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let device_token = device["token"].as_str().unwrap().to_string();
    // A failed login with a password in the body, and a secret in a query string.
    client
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"username": "admin", "password": "wrong-secret-guess"}))
        .send()
        .unwrap();
    client
        .get(format!("{base}/api/devices?token={device_token}"))
        .bearer_auth(&key)
        .send()
        .unwrap();

    let (status, out, err) = process.terminate();
    assert!(status.success());
    assert!(
        !out.iter().any(|l| l.contains(admin_password)),
        "a password chosen by the operator is not echoed"
    );
    assert!(err.len() > 5, "debug logs were written");
    for line in &err {
        let parsed: Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
        assert!(
            parsed["level"].is_string() && parsed["timestamp"].is_string(),
            "{line}"
        );
        for secret in [
            admin_password,
            jwt_secret,
            &token,
            &key,
            &device_token,
            "wrong-secret-guess",
        ] {
            assert!(!line.contains(secret), "secret in the log: {line}");
        }
    }
}

#[test]
fn migrate_and_admin_commands_work_on_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(BINARY);
        command
            .args(args)
            .env("DATA_DIR", dir.path())
            .current_dir(dir.path());
        for (k, v) in env {
            command.env(k, v);
        }
        let output = command.output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let (ok, out, err) = run(&["migrate"], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("up to date"));
    let (ok, _, err) = run(&["admin", "create-tenant", "acme", "--name", "Acme"], &[]);
    assert!(ok, "{err}");
    let (ok, out, _) = run(&["admin", "list-tenants"], &[]);
    assert!(ok && out.contains("acme"), "{out}");
    let (ok, _, err) = run(
        &[
            "admin",
            "create-user",
            "--tenant",
            "acme",
            "--username",
            "ann",
            "--role",
            "admin",
        ],
        &[("DROVER_PASSWORD", "ann-password")],
    );
    assert!(ok, "{err}");
    let (ok, out, err) = run(
        &[
            "admin",
            "create-api-key",
            "--tenant",
            "acme",
            "--name",
            "svc",
            "--role",
            "viewer",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("key: "))
        .unwrap()
        .to_string();
    let (ok, out, _) = run(&["admin", "reset-password", "ann"], &[]);
    assert!(ok);
    let new_password = out
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .unwrap()
        .to_string();
    let (ok, _, err) = run(&["admin", "create-tenant", "Bad Id"], &[]);
    assert!(!ok && err.contains("tenant id"), "{err}");

    // The server sees what the commands wrote.
    let mut process = Process::spawn(dir.path(), &[]);
    let base = process.base_url();
    let client = reqwest::blocking::Client::new();
    let me: Value = client
        .get(format!("{base}/api/auth/me"))
        .bearer_auth(&key)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(me["tenant"], "acme");
    assert_eq!(me["role"], "viewer");
    let response = client
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"username": "ann", "password": new_password}))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, _, _) = process.terminate();
    assert!(status.success());
}

#[test]
fn admin_commands_refuse_to_create_a_registry_and_say_where_they_looked() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, &std::path::Path)]| {
        let mut command = Command::new(BINARY);
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(dir.path());
        for (k, v) in env {
            command.env(k, v);
        }
        let output = command.output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).to_string(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    // From a directory the server never ran in: the default ./data is not there.
    let (ok, out, err) = run(&["admin", "list-tenants"], &[]);
    assert!(!ok, "{out}");
    let expected = dir.path().join("data").join("drover.db");
    assert!(err.contains(&expected.display().to_string()), "{err}");
    assert!(err.contains("DATA_DIR") && err.contains("--config"), "{err}");
    assert!(!dir.path().join("data").exists(), "nothing was created");

    let elsewhere = dir.path().join("elsewhere");
    let (ok, _, err) = run(&["admin", "create-tenant", "acme"], &[("DATA_DIR", &elsewhere)]);
    assert!(!ok && err.contains("elsewhere"), "{err}");
    assert!(!elsewhere.exists(), "nothing was created");

    // A registry created on purpose, with no tenant yet: the listing says it is empty.
    let (ok, _, err) = run(&["migrate"], &[("DATA_DIR", &elsewhere)]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["admin", "list-tenants"], &[("DATA_DIR", &elsewhere)]);
    assert!(ok, "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("no tenants"), "{err}");
}

/// The open-file limit of a process, as /proc shows it: (soft, hard).
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let mut numbers = line.split_whitespace().skip(3);
    (
        numbers.next().unwrap().to_string(),
        numbers.next().unwrap().to_string(),
    )
}

#[test]
fn a_start_raises_the_open_file_limit_and_tls_clients_by_ip_log_no_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let certs = drover::devcerts::generate("Test CA", &["127.0.0.1".to_string()], &[]).unwrap();
    let certs_dir = dir.path().join("certs");
    certs.write(&certs_dir).unwrap();
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let (cert, key) = (certs_dir.join("server.pem"), certs_dir.join("server.key"));
    let env = [
        ("MQTT_TLS_CERT", cert.to_str().unwrap()),
        ("MQTT_TLS_KEY", key.to_str().unwrap()),
        ("MQTT_TLS_PORT", tls_port.as_str()),
        ("MQTT_ALLOW_ANONYMOUS", "true"),
        ("MAX_DEVICES", "1000"),
    ];
    // A soft limit far below the hard one, as most systems start processes.
    let mut ours = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed to it.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) }, 0);
    let hard = ours.rlim_max.min(4096);
    let mut process = Process::spawn_with(dir.path(), &env, move |command| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe and touches only the child about to exec.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: hard.min(512),
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    process.base_url();
    assert_eq!(
        open_file_limits(process.child.id()),
        (hard.to_string(), hard.to_string()),
        "the soft limit is raised to the hard one"
    );

    if common::mosquitto::mosquitto() {
        // As README shows it: the host as an IP address, which mosquitto sends as the SNI.
        let ca = certs_dir.join("ca.pem");
        for n in 0..3 {
            let (code, output) = common::mosquitto::publish(
                &tls_port,
                &common::mosquitto::args(&[
                    "--cafile",
                    ca.to_str().unwrap(),
                    "-t",
                    "test/sni",
                    "-m",
                    &n.to_string(),
                ]),
            );
            assert_eq!(code, 0, "{output}");
        }
    }
    let (status, _, err) = process.terminate();
    assert!(status.success());
    for line in &err {
        assert!(!line.contains("SNI") && !line.contains("open-file"), "{line}");
    }
}
