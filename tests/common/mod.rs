//! Test harness: starts the real server in process on 127.0.0.1:0 with a fresh registry
//! (a temporary SQLite file, or a throwaway PostgreSQL database) and talks to it over HTTP.
#![allow(dead_code)]

pub mod ca;
pub mod mosquitto;
pub mod receiver;
pub mod wire;
pub mod ws;

use std::net::SocketAddr;
use std::time::Duration;

use actix_web::web;
use diesel::{Connection, RunQueryDsl};
use drover::config::{Config, Secret};
use drover::server::ServerThread;
use drover::state::AppState;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";
/// Fixed so tests can mint tokens (expired ones, for instance) the server accepts as signed.
pub const JWT_SECRET: &str = "test-jwt-secret-test-jwt-secret-0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Whether a missing external service fails the test instead of skipping it.
pub fn services_required() -> bool {
    std::env::var("DROVER_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// The URL of an external service for tests, or `None` (with a notice) when it is not set.
/// Panics when it is missing and `DROVER_REQUIRE_SERVICES=1`.
pub fn service_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if services_required() => panic!("{var} is not set but DROVER_REQUIRE_SERVICES=1"),
        _ => {
            eprintln!("skipped: {var} is not set");
            None
        }
    }
}

/// A PostgreSQL database created for one test and dropped after it.
pub struct PgDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl PgDatabase {
    pub fn create(admin_url: &str) -> PgDatabase {
        let name = format!("drover_t_{}", uuid::Uuid::new_v4().simple());
        let mut conn =
            diesel::PgConnection::establish(admin_url).expect("connect to DROVER_TEST_POSTGRES_URL");
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .expect("create test database");
        let (base, query) = match admin_url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin_url, String::new()),
        };
        let prefix = base.rsplit_once('/').map(|(p, _)| p).unwrap_or(base);
        PgDatabase {
            admin_url: admin_url.to_string(),
            url: format!("{prefix}/{name}{query}"),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if let Ok(mut conn) = diesel::PgConnection::establish(&self.admin_url) {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
                .execute(&mut conn);
        }
    }
}

pub struct TestServer {
    pub base: String,
    pub addr: SocketAddr,
    pub mqtt: SocketAddr,
    pub mqtt_tls: Option<SocketAddr>,
    pub client: reqwest::Client,
    pub state: web::Data<AppState>,
    pub data_dir: tempfile::TempDir,
    server: Option<ServerThread>,
    _pg: Option<PgDatabase>,
    /// What the server was started with, so [`TestServer::restart`] can start it again.
    config: Config,
    clock: drover_actors::clock::SharedClock,
}

/// A configuration for tests: loopback, port 0, small pools, a temporary data dir.
pub fn test_config(data_dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.http.bind = "127.0.0.1".into();
    config.http.port = 0;
    config.http.workers = 2;
    config.http.shutdown_timeout_secs = 5;
    // Port 1883 belongs to the machine's Mosquitto: tests never use it.
    config.mqtt.bind = "127.0.0.1".into();
    config.mqtt.port = 0;
    config.mqtt.workers = 1;
    config.storage.data_dir = data_dir.to_path_buf();
    config.storage.pool_size = 4;
    config.actors.threads = 1;
    config.auth.jwt_secret = Secret::new(JWT_SECRET);
    config
}

impl TestServer {
    /// Starts a server on `backend`; `None` (after a notice) when PostgreSQL is not configured.
    pub fn start(backend: Backend) -> Option<TestServer> {
        Self::start_with(backend, |_| {})
    }

    pub fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Option<TestServer> {
        Self::start_with_clock(
            backend,
            std::sync::Arc::new(drover_actors::clock::SystemClock),
            tweak,
        )
    }

    /// As [`TestServer::start_with`], with the clock the rules engine reads (a `ManualClock`
    /// lets a test move time for windows, timers and escalation instead of sleeping).
    pub fn start_with_clock(
        backend: Backend,
        clock: drover_actors::clock::SharedClock,
        tweak: impl FnOnce(&mut Config),
    ) -> Option<TestServer> {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(data_dir.path());
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let admin_url = service_url("DROVER_TEST_POSTGRES_URL")?;
                let db = PgDatabase::create(&admin_url);
                config.storage.database_url = Secret::new(db.url.clone());
                Some(db)
            }
        };
        tweak(&mut config);
        let kept = config.clone();
        let server = ServerThread::spawn_with_clock(config, Some(ADMIN_PASSWORD.to_string()), clock.clone())
            .unwrap_or_else(|e| panic!("server failed to start: {e}"));
        Some(TestServer {
            base: format!("http://{}", server.http_addr),
            addr: server.http_addr,
            mqtt: server.mqtt_addr,
            mqtt_tls: server.mqtt_tls_addr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            state: server.state.clone(),
            data_dir,
            server: Some(server),
            _pg: pg,
            config: kept,
            clock,
        })
    }

    /// Stops the server and starts it again on the same data (new ports).
    pub fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        let server = ServerThread::spawn_with_clock(self.config.clone(), None, self.clock.clone())
            .unwrap_or_else(|e| panic!("server failed to restart: {e}"));
        self.base = format!("http://{}", server.http_addr);
        self.addr = server.http_addr;
        self.mqtt = server.mqtt_addr;
        self.mqtt_tls = server.mqtt_tls_addr;
        self.state = server.state.clone();
        self.server = Some(server);
    }

    /// Stops the server, keeping its data, until [`TestServer::resume_on_same_ports`].
    pub fn pause(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }

    /// Starts a paused (or running) server again on the same data and the same HTTP and MQTT
    /// ports, so clients that keep the address (a browser) reconnect to it.
    pub fn resume_on_same_ports(&mut self) {
        self.config.http.port = self.addr.port();
        self.config.mqtt.port = self.mqtt.port();
        self.restart();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// One figure of `/metrics`: `series` is the name with its labels as printed (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Sends a request; returns the status and the JSON body (`Null` when empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.client.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// Sends a raw body (for malformed JSON tests).
    pub async fn call_raw(&self, method: Method, path: &str, token: &str, body: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request sent");
        let status = response.status();
        let value = response.json().await.unwrap_or(Value::Null);
        (status, value)
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn patch(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, Some(token), None).await
    }

    pub async fn login(&self, username: &str, password: &str) -> String {
        let (status, body) = self
            .call(
                Method::POST,
                "/api/auth/login",
                None,
                Some(json!({"username": username, "password": password})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "login of {username}: {body}");
        body["token"].as_str().expect("token").to_string()
    }

    /// A login token of the platform admin created on first start.
    pub async fn admin_token(&self) -> String {
        self.login("admin", ADMIN_PASSWORD).await
    }

    /// Creates a tenant with an admin `<id>-admin` and returns that admin's login token.
    pub async fn tenant_admin(&self, platform_token: &str, id: &str) -> String {
        let username = format!("{id}-admin");
        let (status, body) = self
            .post(
                "/api/tenants",
                platform_token,
                json!({"id": id, "name": id, "admin": {"username": username, "password": ADMIN_PASSWORD}}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        self.login(&username, ADMIN_PASSWORD).await
    }

    /// Creates an API key with `role` and returns the key.
    pub async fn api_key(&self, token: &str, role: &str) -> String {
        let (status, body) = self
            .post(
                "/api/keys",
                token,
                json!({"name": format!("{role}-key"), "role": role}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["key"].as_str().unwrap().to_string()
    }

    /// Registers a device and returns its token.
    pub async fn register(&self, token: &str, body: Value) -> String {
        let (status, response) = self.post("/api/devices/register", token, body).await;
        assert_eq!(status, StatusCode::CREATED, "{response}");
        response["token"].as_str().unwrap().to_string()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // The server stops before its PostgreSQL database is dropped.
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }
}

/// Runs each listed `async fn name(backend: Backend)` as a test on SQLite and on PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// Whether an external client program is installed; a notice (or, with
/// `DROVER_REQUIRE_SERVICES=1`, a failure) when it is not.
pub fn tool_available(program: &str, install: &str) -> bool {
    let found = std::process::Command::new(program)
        .arg("--help")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        if services_required() {
            panic!("{program} is not installed ({install}) but DROVER_REQUIRE_SERVICES=1");
        }
        eprintln!("skipped: {program} is not installed ({install})");
    }
    found
}

/// Whether Python's paho-mqtt is importable, with the same rule.
pub fn paho_available() -> bool {
    let found = std::process::Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if services_required() {
            panic!(
                "python3 with paho-mqtt is not available (pip install paho-mqtt) but DROVER_REQUIRE_SERVICES=1"
            );
        }
        eprintln!("skipped: python3 with paho-mqtt is not available (pip install paho-mqtt)");
    }
    found
}

/// Runs a scenario of tests/support/paho_probe.py against the MQTT broker at `mqtt` and
/// returns the JSON it printed. `arguments` without a password get `password`.
pub fn paho_probe(mqtt: SocketAddr, password: &str, scenario: &str, mut arguments: Value) -> Value {
    arguments["host"] = json!(mqtt.ip().to_string());
    arguments["port"] = json!(mqtt.port());
    if arguments.get("password").is_none() {
        arguments["password"] = json!(password);
    }
    let output = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/paho_probe.py"
        ))
        .arg(scenario)
        .arg(arguments.to_string())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{scenario}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("{scenario}: {e}: {stdout}"))
}

/// Polls `condition` until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while !condition().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
