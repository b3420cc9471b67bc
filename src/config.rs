//! Configuration: one serde tree, a commented default file, environment overrides, validation.
//!
//! Precedence, lowest first: built-in defaults, the TOML file (`--config`, `DROVER_CONFIG`, or
//! `./drover.toml` when it exists), then environment variables. Every key has an environment
//! variable; the names from the product description (`PORT`, `MQTT_PORT`, `REDIS_HOST`, …) are
//! kept. Invalid configuration stops the start with a message naming the key.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A configuration value that must not be shown: `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("\"***\"")
        }
    }
}

/// Replaces the password of a URL (`scheme://user:password@host`) and every query value
/// (`?token=secret` becomes `?token=***`) with `***`: webhook and service URLs carry tokens in
/// either place, and the masked form is what logs and API views show.
pub fn mask_url(url: &str) -> String {
    let (base, fragment) = url.split_at(url.find('#').unwrap_or(url.len()));
    match base.split_once('?') {
        Some((head, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, value)) if !value.is_empty() => format!("{key}=***"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{}?{}{fragment}", mask_userinfo(head), query.join("&"))
        }
        None => format!("{}{fragment}", mask_userinfo(base)),
    }
}

fn mask_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            format!("{}{}{}", &url[..scheme_end + 3], masked, &rest[at..])
        }
        None => url.to_string(),
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub http: HttpConfig,
    pub mqtt: MqttConfig,
    pub storage: StorageConfig,
    pub influx: InfluxConfig,
    pub redis: RedisConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub actors: ActorsConfig,
    pub telemetry: TelemetryConfig,
    pub rules: RulesConfig,
    pub smtp: SmtpConfig,
    pub sms: SmsConfig,
    pub cluster: ClusterConfig,
    pub firmware: FirmwareConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub bind: String,
    pub port: u16,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// Largest accepted JSON request body, in bytes.
    pub max_body_bytes: usize,
    /// Seconds in-flight requests get to finish on shutdown.
    pub shutdown_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    pub bind: String,
    /// Plain MQTT (3.1.1 and 5.0 on one port); 0 picks a free port.
    pub port: u16,
    /// MQTT over TLS; used when `tls_cert` and `tls_key` are set.
    pub tls_port: u16,
    /// PEM certificate chain and private key of the TLS listener.
    pub tls_cert: String,
    pub tls_key: String,
    /// Threads serving MQTT connections; 0 means one per core.
    pub workers: usize,
    /// Accept clients without credentials into a namespace of their own (like Mosquitto's).
    pub allow_anonymous: bool,
    /// Largest MQTT packet accepted, in bytes (advertised to MQTT 5 clients).
    pub max_packet_size: u32,
    /// QoS 1/2 messages in flight to one client (also capped by its Receive Maximum).
    pub max_inflight: u16,
    /// QoS 1/2 messages a client may have in flight to the broker (MQTT 5 Receive Maximum).
    pub receive_maximum: u16,
    /// Topic aliases a client may use towards the broker (MQTT 5).
    pub max_topic_alias: u16,
    /// Longest keep-alive granted (65535: no maximum). MQTT 5 clients asking for more, or for
    /// none, are given this (Server Keep Alive); MQTT 3.1.1 clients doing so are refused.
    pub max_keep_alive_secs: u16,
    /// Subscriptions one client may hold.
    pub max_subscriptions: usize,
    /// QoS 1/2 messages kept for a persistent session while its client is away.
    pub max_queued_messages: usize,
    /// Bytes of messages waiting to be written to one connected client; beyond, new messages
    /// for it are dropped and counted (a slow subscriber never holds up anyone else), unless
    /// `slow_subscriber` is `backpressure`.
    pub max_queued_bytes: usize,
    /// What happens to a QoS 1/2 message for a connected client whose queue is full.
    pub slow_subscriber: SlowSubscriber,
    /// Messages per second one connection may publish (0: no limit); beyond, it is disconnected.
    pub max_publish_rate: u32,
    /// Longest session expiry granted; also the expiry of MQTT 3.1.1 persistent sessions.
    pub max_session_expiry_secs: u32,
    /// Seconds a new connection has to send CONNECT.
    pub connect_timeout_secs: u16,
    /// Longest client identifier accepted, in bytes; longer ones are refused (v5 0x85, v3 0x02).
    pub max_client_id_len: usize,
}

/// `MQTT_SLOW_SUBSCRIBER`: what happens to a QoS 1/2 message for a connected client that
/// already has `max_queued_bytes` waiting. QoS 0 messages are dropped either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowSubscriber {
    /// Drop it and count it: a slow subscriber never slows anyone down, and loses messages.
    Drop,
    /// Queue it and hold back the publisher's PUBACK/PUBREC until the queue is within its
    /// limit again: publishers go at the pace of their slowest QoS 1/2 subscriber.
    Backpressure,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// Empty: SQLite file `drover.db` in the data dir. Otherwise `postgres://…` or `sqlite://path`.
    pub database_url: Secret,
    /// Registry connection pool size; 0 picks a size for the backend.
    pub pool_size: u32,
    /// Days audit log entries are kept (enforced by the maintenance pass).
    pub audit_retention_days: u32,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InfluxConfig {
    /// Empty: telemetry stays in the embedded store.
    pub url: String,
    pub db: String,
    pub token: Secret,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Empty: cache and sessions stay in process.
    pub url: Secret,
}

/// Cluster mode: several nodes over shared PostgreSQL, InfluxDB and Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Empty: a single node with nothing shared.
    pub node_id: String,
    /// Nodes with the same name (and Redis) form one cluster.
    pub name: String,
    /// Host name other nodes and `/admin/cluster` show for this node; empty: the machine's.
    pub advertise_host: String,
    /// Seconds a node's heartbeat and its device leases last without renewal.
    pub lease_secs: u64,
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.node_id.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Devices a tenant may register (and, with the broker, connect).
    pub max_devices: u64,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HMAC key for JWTs. Empty: keys come from `key_file`.
    pub jwt_secret: Secret,
    /// Signing keys (JWT keys with ids, the rules' secrets key), created 0600 on first start.
    /// Empty: `keys.json` in the data directory.
    pub key_file: PathBuf,
    pub token_ttl_secs: u64,
    /// Tolerated clock difference when checking `exp`/`nbf`.
    pub clock_skew_secs: u64,
    /// Failed logins per username from one source before that pair is locked for
    /// `login_lockout_secs`.
    pub max_failed_logins: u32,
    pub login_lockout_secs: u64,
    /// Failed logins from one source, across usernames, before the source is locked.
    pub max_failed_logins_per_source: u32,
    /// Entries each failed-login table holds at most (fixed size each).
    pub login_throttle_entries: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter (`info`, `drover=debug,actix_web=warn`…); `RUST_LOG` also works.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActorsConfig {
    /// Threads the device actors run on; 0 means one per core.
    pub threads: usize,
    /// Messages a device actor's mailbox holds before senders are pushed back.
    pub device_mailbox: usize,
    /// Seconds a device actor without a connection or a message lives before it stops (it
    /// starts again on the next use); 0 keeps actors until shutdown.
    pub device_idle_secs: u64,
}

/// Telemetry batching, validation, retention, spool and query limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Points a writer collects before it writes a batch.
    pub batch_size: usize,
    /// Longest a point waits in a writer before its batch is written, in milliseconds.
    pub batch_interval_ms: u64,
    /// Batching writer actors; 0 means one per core.
    pub writers: usize,
    /// Points one writer holds (queued and being written) before senders are pushed back:
    /// QoS 1/2 publishers wait, HTTP gets 503, QoS 0 points are dropped.
    pub writer_queue_points: usize,
    /// Days raw points are kept; also the oldest timestamp a device may send.
    pub raw_retention_days: u32,
    /// Days 1-minute rollups are kept.
    pub rollup_1m_retention_days: u32,
    /// Days 1-hour rollups are kept.
    pub rollup_1h_retention_days: u32,
    /// Seconds between rollup and retention passes.
    pub maintenance_interval_secs: u64,
    /// How far ahead of the server's clock a timestamp may be, in seconds.
    pub max_future_secs: u64,
    /// Metrics in one message.
    pub max_metrics_per_message: usize,
    /// Bytes of one string value.
    pub max_string_bytes: usize,
    /// Messages in one batch payload (a JSON array).
    pub max_batch_messages: usize,
    /// Bytes the local spool may hold while the store is unreachable.
    pub spool_max_bytes: u64,
    /// Raw points a query returns when it sets no `limit`.
    pub query_default_points: usize,
    /// Largest `limit` a query may set.
    pub query_max_points: usize,
    /// Page cache of the embedded telemetry database, in MiB.
    pub sqlite_cache_mib: u32,
}

/// The rules engine: expression limits, timers, notification retries, the secrets key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesConfig {
    /// Key (any string; its SHA-256 is the AES-256-GCM key) that seals channel secrets. Empty:
    /// one is generated on first start and kept in `auth.key_file`.
    pub secret_key: Secret,
    /// |z-score| above which a statistical condition fires when the rule sets no threshold.
    pub anomaly_threshold: f64,
    /// How often absence timers and escalation due times are checked, in milliseconds.
    pub tick_ms: u64,
    /// Attempts per notification before it is recorded as failed.
    pub delivery_attempts: u32,
    /// Wait before the first retry; doubled for each further one, in milliseconds.
    pub retry_backoff_ms: u64,
    /// Timeout of one webhook or SMS gateway request, in milliseconds.
    pub http_timeout_ms: u64,
    /// Destinations webhooks may reach besides public addresses: CIDRs, addresses or host
    /// names. Loopback, private, link-local, unique-local, multicast and unspecified addresses
    /// are refused unless listed here.
    pub notify_allowed_networks: Vec<String>,
    /// Telemetry events a tenant's rule actor may have waiting before new ones are dropped.
    pub mailbox: usize,
    /// Telemetry events the tenants' bursts beyond `mailbox` may borrow, all tenants together.
    pub shared_queue: usize,
    /// Threads that evaluate rules, shared fairly between tenants.
    pub workers: usize,
    /// Time a tenant's rules may use per turn before the next tenant with work gets the thread,
    /// in milliseconds.
    pub tenant_slice_ms: u64,
    /// Wall time one rule evaluation may take, in milliseconds.
    pub eval_timeout_ms: u64,
    /// How much lower than the rest of the server the threads that evaluate rules and live
    /// analytics run (a nice increment, 0–19): when the CPU is short they yield it to
    /// ingestion and fall behind, dropping and counting events; on an idle CPU nothing changes.
    pub thread_nice: i32,
}

/// The SMTP server email notifications go through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// Empty disables email notifications (they are recorded as failed).
    pub host: String,
    pub port: u16,
    /// "none", "starttls" or "tls".
    pub tls: String,
    pub username: String,
    pub password: Secret,
    pub from: String,
    pub timeout_secs: u64,
}

/// The SMS gateway (Twilio-compatible: form POST to `{base_url}/2010-04-01/Accounts/{sid}/Messages.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmsConfig {
    pub base_url: String,
    pub account_sid: String,
    pub auth_token: Secret,
    pub from: String,
}

/// The firmware registry (OTA).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FirmwareConfig {
    /// Largest firmware image accepted, in bytes.
    pub max_image_bytes: u64,
    /// Downloads served at once; beyond, devices are answered 503 with Retry-After, so a
    /// campaign over a large fleet holds the server's memory flat.
    pub max_concurrent_downloads: usize,
    /// Ed25519 key signing firmware manifests: the 32-byte seed, base64. Empty: a key is
    /// created in `firmware-signing.key` (mode 0600) in the data directory on first start.
    pub signing_key: Secret,
}

impl fmt::Debug for FirmwareConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FirmwareConfig")
            .field("max_image_bytes", &self.max_image_bytes)
            .field("max_concurrent_downloads", &self.max_concurrent_downloads)
            .field("signing_key", &self.signing_key)
            .finish()
    }
}

impl Default for FirmwareConfig {
    fn default() -> Self {
        Config::default().firmware
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http: HttpConfig {
                bind: "0.0.0.0".into(),
                port: 8080,
                workers: 0,
                max_body_bytes: 1024 * 1024,
                shutdown_timeout_secs: 30,
            },
            mqtt: MqttConfig {
                bind: "0.0.0.0".into(),
                port: 1883,
                tls_port: 8883,
                tls_cert: String::new(),
                tls_key: String::new(),
                workers: 0,
                allow_anonymous: false,
                max_packet_size: 1024 * 1024,
                max_inflight: 32,
                receive_maximum: 64,
                max_topic_alias: 64,
                max_keep_alive_secs: u16::MAX,
                max_subscriptions: 100,
                max_queued_messages: 1000,
                max_queued_bytes: 16 * 1024 * 1024,
                slow_subscriber: SlowSubscriber::Drop,
                max_publish_rate: 0,
                max_session_expiry_secs: 7 * 86_400,
                connect_timeout_secs: 10,
                max_client_id_len: 128,
            },
            storage: StorageConfig {
                data_dir: PathBuf::from("./data"),
                database_url: Secret::default(),
                pool_size: 0,
                audit_retention_days: 90,
            },
            influx: InfluxConfig {
                url: String::new(),
                db: "drover".into(),
                token: Secret::default(),
            },
            redis: RedisConfig {
                url: Secret::default(),
            },
            limits: LimitsConfig { max_devices: 50_000 },
            auth: AuthConfig {
                jwt_secret: Secret::default(),
                token_ttl_secs: 3600,
                clock_skew_secs: 60,
                max_failed_logins: 5,
                login_lockout_secs: 300,
                max_failed_logins_per_source: 50,
                login_throttle_entries: 50_000,
                key_file: PathBuf::new(),
            },
            log: LogConfig {
                format: LogFormat::Text,
                level: "info".into(),
            },
            actors: ActorsConfig {
                threads: 0,
                device_mailbox: 256,
                device_idle_secs: 600,
            },
            telemetry: TelemetryConfig {
                batch_size: 1000,
                batch_interval_ms: 100,
                writers: 0,
                writer_queue_points: 50_000,
                raw_retention_days: 30,
                rollup_1m_retention_days: 90,
                rollup_1h_retention_days: 730,
                maintenance_interval_secs: 60,
                max_future_secs: 600,
                max_metrics_per_message: 100,
                max_string_bytes: 1024,
                max_batch_messages: 1000,
                spool_max_bytes: 1024 * 1024 * 1024,
                query_default_points: 10_000,
                query_max_points: 100_000,
                sqlite_cache_mib: 64,
            },
            rules: RulesConfig {
                secret_key: Secret::default(),
                anomaly_threshold: 3.0,
                tick_ms: 1000,
                delivery_attempts: 4,
                retry_backoff_ms: 500,
                http_timeout_ms: 5000,
                notify_allowed_networks: Vec::new(),
                mailbox: 4096,
                shared_queue: 65_536,
                workers: 2,
                tenant_slice_ms: 20,
                eval_timeout_ms: 50,
                thread_nice: 10,
            },
            cluster: ClusterConfig {
                node_id: String::new(),
                name: "drover".into(),
                advertise_host: String::new(),
                lease_secs: 10,
            },
            smtp: SmtpConfig {
                host: String::new(),
                port: 587,
                tls: "starttls".into(),
                username: String::new(),
                password: Secret::default(),
                from: "drover@localhost".into(),
                timeout_secs: 10,
            },
            sms: SmsConfig {
                base_url: "https://api.twilio.com".into(),
                account_sid: String::new(),
                auth_token: Secret::default(),
                from: String::new(),
            },
            firmware: FirmwareConfig {
                max_image_bytes: 256 * 1024 * 1024,
                max_concurrent_downloads: 256,
                signing_key: Secret::default(),
            },
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Config::default().http
    }
}
impl Default for MqttConfig {
    fn default() -> Self {
        Config::default().mqtt
    }
}
impl Default for StorageConfig {
    fn default() -> Self {
        Config::default().storage
    }
}
impl Default for InfluxConfig {
    fn default() -> Self {
        Config::default().influx
    }
}
impl Default for RedisConfig {
    fn default() -> Self {
        Config::default().redis
    }
}
impl Default for ClusterConfig {
    fn default() -> Self {
        Config::default().cluster
    }
}
impl Default for LimitsConfig {
    fn default() -> Self {
        Config::default().limits
    }
}
impl Default for AuthConfig {
    fn default() -> Self {
        Config::default().auth
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        Config::default().log
    }
}
impl Default for ActorsConfig {
    fn default() -> Self {
        Config::default().actors
    }
}
impl Default for TelemetryConfig {
    fn default() -> Self {
        Config::default().telemetry
    }
}

impl Default for RulesConfig {
    fn default() -> Self {
        Config::default().rules
    }
}
impl Default for SmtpConfig {
    fn default() -> Self {
        Config::default().smtp
    }
}
impl Default for SmsConfig {
    fn default() -> Self {
        Config::default().sms
    }
}

impl TelemetryConfig {
    /// What a device payload must respect.
    pub fn payload_limits(&self) -> drover_actors::telemetry::PayloadLimits {
        drover_actors::telemetry::PayloadLimits {
            max_messages: self.max_batch_messages,
            max_metrics: self.max_metrics_per_message,
            max_string_bytes: self.max_string_bytes,
            max_future_ms: self.max_future_secs as i64 * 1000,
            max_age_ms: days_ms(self.raw_retention_days),
        }
    }
}

/// Days in milliseconds.
pub fn days_ms(days: u32) -> i64 {
    i64::from(days) * 86_400_000
}

// Hand-written so secrets and URL passwords never reach a log line.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("http", &self.http)
            .field("mqtt", &self.mqtt)
            .field("storage", &self.storage)
            .field("influx", &self.influx)
            .field("redis", &self.redis)
            .field("limits", &self.limits)
            .field("auth", &self.auth)
            .field("log", &self.log)
            .field("actors", &self.actors)
            .field("telemetry", &self.telemetry)
            .field("rules", &self.rules)
            .field("smtp", &self.smtp)
            .field("sms", &self.sms)
            .field("cluster", &self.cluster)
            .field("firmware", &self.firmware)
            .finish()
    }
}

impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageConfig")
            .field("data_dir", &self.data_dir)
            .field("database_url", &mask_url(self.database_url.expose()))
            .field("pool_size", &self.pool_size)
            .field("audit_retention_days", &self.audit_retention_days)
            .finish()
    }
}

impl fmt::Debug for InfluxConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InfluxConfig")
            .field("url", &mask_url(&self.url))
            .field("db", &self.db)
            .field("token", &self.token)
            .finish()
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &mask_url(self.redis_url()))
            .finish()
    }
}

impl RedisConfig {
    fn redis_url(&self) -> &str {
        self.url.expose()
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_secret", &self.jwt_secret)
            .field("key_file", &self.key_file)
            .field("token_ttl_secs", &self.token_ttl_secs)
            .field("clock_skew_secs", &self.clock_skew_secs)
            .field("max_failed_logins", &self.max_failed_logins)
            .field("login_lockout_secs", &self.login_lockout_secs)
            .field("max_failed_logins_per_source", &self.max_failed_logins_per_source)
            .field("login_throttle_entries", &self.login_throttle_entries)
            .finish()
    }
}

/// Configuration that cannot be used, naming the key (and its environment variable).
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Where the registry lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    Sqlite(PathBuf),
    Postgres(String),
}

/// One environment override: the variable, the file key it sets, and how.
pub struct EnvKey {
    pub env: &'static str,
    pub key: &'static str,
    apply: fn(&mut Config, &str) -> Result<(), String>,
}

fn parse<T: std::str::FromStr>(value: &str, expected: &str) -> Result<T, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("expected {expected}, got {value:?}"))
}

/// Every environment variable Drover reads for its configuration.
pub const ENV_KEYS: &[EnvKey] = &[
    EnvKey {
        env: "HTTP_BIND",
        key: "http.bind",
        apply: |c, v| {
            c.http.bind = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "PORT",
        key: "http.port",
        apply: |c, v| {
            c.http.port = parse(v, "a port number 0-65535")?;
            Ok(())
        },
    },
    EnvKey {
        env: "HTTP_WORKERS",
        key: "http.workers",
        apply: |c, v| {
            c.http.workers = parse(v, "a number of threads")?;
            Ok(())
        },
    },
    EnvKey {
        env: "HTTP_MAX_BODY_BYTES",
        key: "http.max_body_bytes",
        apply: |c, v| {
            c.http.max_body_bytes = parse(v, "a size in bytes")?;
            Ok(())
        },
    },
    EnvKey {
        env: "HTTP_SHUTDOWN_TIMEOUT_SECS",
        key: "http.shutdown_timeout_secs",
        apply: |c, v| {
            c.http.shutdown_timeout_secs = parse(v, "a number of seconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_BIND",
        key: "mqtt.bind",
        apply: |c, v| {
            c.mqtt.bind = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_PORT",
        key: "mqtt.port",
        apply: |c, v| {
            c.mqtt.port = parse(v, "a port number 0-65535")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_TLS_PORT",
        key: "mqtt.tls_port",
        apply: |c, v| {
            c.mqtt.tls_port = parse(v, "a port number 0-65535")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_TLS_CERT",
        key: "mqtt.tls_cert",
        apply: |c, v| {
            c.mqtt.tls_cert = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_TLS_KEY",
        key: "mqtt.tls_key",
        apply: |c, v| {
            c.mqtt.tls_key = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_WORKERS",
        key: "mqtt.workers",
        apply: |c, v| {
            c.mqtt.workers = parse(v, "a number of threads")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_ALLOW_ANONYMOUS",
        key: "mqtt.allow_anonymous",
        apply: |c, v| {
            c.mqtt.allow_anonymous = parse(v, "true or false")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_MAX_PACKET_SIZE",
        key: "mqtt.max_packet_size",
        apply: |c, v| {
            c.mqtt.max_packet_size = parse(v, "a size in bytes")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_MAX_INFLIGHT",
        key: "mqtt.max_inflight",
        apply: |c, v| {
            c.mqtt.max_inflight = parse(v, "a number of messages (1-65535)")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_RECEIVE_MAXIMUM",
        key: "mqtt.receive_maximum",
        apply: |c, v| {
            c.mqtt.receive_maximum = parse(v, "a number of messages (1-65535)")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_MAX_TOPIC_ALIAS",
        key: "mqtt.max_topic_alias",
        apply: |c, v| {
            c.mqtt.max_topic_alias = parse(v, "a number of aliases (0-65535)")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_MAX_KEEP_ALIVE",
        key: "mqtt.max_keep_alive_secs",
        apply: |c, v| {
            c.mqtt.max_keep_alive_secs = parse(v, "a number of seconds (1-65535)")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_MAX_SUBSCRIPTIONS",
        key: "mqtt.max_subscriptions",
        apply: |c, v| {
            c.mqtt.max_subscriptions = parse(v, "a number of subscriptions")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_MAX_QUEUED_MESSAGES",
        key: "mqtt.max_queued_messages",
        apply: |c, v| {
            c.mqtt.max_queued_messages = parse(v, "a number of messages")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_MAX_QUEUED_BYTES",
        key: "mqtt.max_queued_bytes",
        apply: |c, v| {
            c.mqtt.max_queued_bytes = parse(v, "a size in bytes")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_SLOW_SUBSCRIBER",
        key: "mqtt.slow_subscriber",
        apply: |c, v| {
            c.mqtt.slow_subscriber = match v.trim() {
                "drop" => SlowSubscriber::Drop,
                "backpressure" => SlowSubscriber::Backpressure,
                other => return Err(format!("expected \"drop\" or \"backpressure\", got {other:?}")),
            };
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_MAX_PUBLISH_RATE",
        key: "mqtt.max_publish_rate",
        apply: |c, v| {
            c.mqtt.max_publish_rate = parse(v, "messages per second")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_MAX_SESSION_EXPIRY",
        key: "mqtt.max_session_expiry_secs",
        apply: |c, v| {
            c.mqtt.max_session_expiry_secs = parse(v, "a number of seconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_CONNECT_TIMEOUT",
        key: "mqtt.connect_timeout_secs",
        apply: |c, v| {
            c.mqtt.connect_timeout_secs = parse(v, "a number of seconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MQTT_MAX_CLIENT_ID_LEN",
        key: "mqtt.max_client_id_len",
        apply: |c, v| {
            c.mqtt.max_client_id_len = parse(v, "a length in bytes")?;
            Ok(())
        },
    },
    EnvKey {
        env: "DATA_DIR",
        key: "storage.data_dir",
        apply: |c, v| {
            c.storage.data_dir = PathBuf::from(v);
            Ok(())
        },
    },
    EnvKey {
        env: "DATABASE_URL",
        key: "storage.database_url",
        apply: |c, v| {
            c.storage.database_url = Secret::new(v);
            Ok(())
        },
    },
    EnvKey {
        env: "DATABASE_POOL_SIZE",
        key: "storage.pool_size",
        apply: |c, v| {
            c.storage.pool_size = parse(v, "a number of connections")?;
            Ok(())
        },
    },
    EnvKey {
        env: "AUDIT_RETENTION_DAYS",
        key: "storage.audit_retention_days",
        apply: |c, v| {
            c.storage.audit_retention_days = parse(v, "a number of days")?;
            Ok(())
        },
    },
    EnvKey {
        env: "INFLUX_URL",
        key: "influx.url",
        apply: |c, v| {
            c.influx.url = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "INFLUX_DB",
        key: "influx.db",
        apply: |c, v| {
            c.influx.db = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "INFLUX_TOKEN",
        key: "influx.token",
        apply: |c, v| {
            c.influx.token = Secret::new(v);
            Ok(())
        },
    },
    EnvKey {
        env: "REDIS_URL",
        key: "redis.url",
        apply: |c, v| {
            c.redis.url = Secret::new(v);
            Ok(())
        },
    },
    EnvKey {
        env: "CLUSTER_NODE_ID",
        key: "cluster.node_id",
        apply: |c, v| {
            c.cluster.node_id = v.trim().to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "CLUSTER_NAME",
        key: "cluster.name",
        apply: |c, v| {
            c.cluster.name = v.trim().to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "CLUSTER_ADVERTISE_HOST",
        key: "cluster.advertise_host",
        apply: |c, v| {
            c.cluster.advertise_host = v.trim().to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "CLUSTER_LEASE_SECS",
        key: "cluster.lease_secs",
        apply: |c, v| {
            c.cluster.lease_secs = parse(v, "a number of seconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MAX_DEVICES",
        key: "limits.max_devices",
        apply: |c, v| {
            c.limits.max_devices = parse(v, "a number of devices")?;
            Ok(())
        },
    },
    EnvKey {
        env: "JWT_SECRET",
        key: "auth.jwt_secret",
        apply: |c, v| {
            c.auth.jwt_secret = Secret::new(v);
            Ok(())
        },
    },
    EnvKey {
        env: "AUTH_KEY_FILE",
        key: "auth.key_file",
        apply: |c, v| {
            c.auth.key_file = PathBuf::from(v);
            Ok(())
        },
    },
    EnvKey {
        env: "JWT_TTL_SECS",
        key: "auth.token_ttl_secs",
        apply: |c, v| {
            c.auth.token_ttl_secs = parse(v, "a number of seconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "JWT_CLOCK_SKEW_SECS",
        key: "auth.clock_skew_secs",
        apply: |c, v| {
            c.auth.clock_skew_secs = parse(v, "a number of seconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MAX_FAILED_LOGINS",
        key: "auth.max_failed_logins",
        apply: |c, v| {
            c.auth.max_failed_logins = parse(v, "a number of attempts")?;
            Ok(())
        },
    },
    EnvKey {
        env: "LOGIN_LOCKOUT_SECS",
        key: "auth.login_lockout_secs",
        apply: |c, v| {
            c.auth.login_lockout_secs = parse(v, "a number of seconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "MAX_FAILED_LOGINS_PER_SOURCE",
        key: "auth.max_failed_logins_per_source",
        apply: |c, v| {
            c.auth.max_failed_logins_per_source = parse(v, "a number of attempts")?;
            Ok(())
        },
    },
    EnvKey {
        env: "LOGIN_THROTTLE_ENTRIES",
        key: "auth.login_throttle_entries",
        apply: |c, v| {
            c.auth.login_throttle_entries = parse(v, "a number of entries")?;
            Ok(())
        },
    },
    EnvKey {
        env: "LOG_FORMAT",
        key: "log.format",
        apply: |c, v| {
            c.log.format = match v.trim() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => return Err(format!("expected \"text\" or \"json\", got {other:?}")),
            };
            Ok(())
        },
    },
    EnvKey {
        env: "LOG_LEVEL",
        key: "log.level",
        apply: |c, v| {
            c.log.level = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "ACTOR_THREADS",
        key: "actors.threads",
        apply: |c, v| {
            c.actors.threads = parse(v, "a number of threads")?;
            Ok(())
        },
    },
    EnvKey {
        env: "DEVICE_MAILBOX",
        key: "actors.device_mailbox",
        apply: |c, v| {
            c.actors.device_mailbox = parse(v, "a number of messages")?;
            Ok(())
        },
    },
    EnvKey {
        env: "DEVICE_IDLE_SECS",
        key: "actors.device_idle_secs",
        apply: |c, v| {
            c.actors.device_idle_secs = parse(v, "a number of seconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "BATCH_SIZE",
        key: "telemetry.batch_size",
        apply: |c, v| {
            c.telemetry.batch_size = parse(v, "a number of points")?;
            Ok(())
        },
    },
    EnvKey {
        env: "BATCH_INTERVAL_MS",
        key: "telemetry.batch_interval_ms",
        apply: |c, v| {
            c.telemetry.batch_interval_ms = parse(v, "a number of milliseconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_WRITERS",
        key: "telemetry.writers",
        apply: |c, v| {
            c.telemetry.writers = parse(v, "a number of writers")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_WRITER_QUEUE_POINTS",
        key: "telemetry.writer_queue_points",
        apply: |c, v| {
            c.telemetry.writer_queue_points = parse(v, "a number of points")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_RAW_RETENTION_DAYS",
        key: "telemetry.raw_retention_days",
        apply: |c, v| {
            c.telemetry.raw_retention_days = parse(v, "a number of days")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_ROLLUP_1M_RETENTION_DAYS",
        key: "telemetry.rollup_1m_retention_days",
        apply: |c, v| {
            c.telemetry.rollup_1m_retention_days = parse(v, "a number of days")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_ROLLUP_1H_RETENTION_DAYS",
        key: "telemetry.rollup_1h_retention_days",
        apply: |c, v| {
            c.telemetry.rollup_1h_retention_days = parse(v, "a number of days")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_MAINTENANCE_INTERVAL_SECS",
        key: "telemetry.maintenance_interval_secs",
        apply: |c, v| {
            c.telemetry.maintenance_interval_secs = parse(v, "a number of seconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_MAX_FUTURE_SECS",
        key: "telemetry.max_future_secs",
        apply: |c, v| {
            c.telemetry.max_future_secs = parse(v, "a number of seconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_MAX_METRICS",
        key: "telemetry.max_metrics_per_message",
        apply: |c, v| {
            c.telemetry.max_metrics_per_message = parse(v, "a number of metrics")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_MAX_STRING_BYTES",
        key: "telemetry.max_string_bytes",
        apply: |c, v| {
            c.telemetry.max_string_bytes = parse(v, "a size in bytes")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_MAX_BATCH_MESSAGES",
        key: "telemetry.max_batch_messages",
        apply: |c, v| {
            c.telemetry.max_batch_messages = parse(v, "a number of messages")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_SPOOL_MAX_BYTES",
        key: "telemetry.spool_max_bytes",
        apply: |c, v| {
            c.telemetry.spool_max_bytes = parse(v, "a size in bytes")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_QUERY_DEFAULT_POINTS",
        key: "telemetry.query_default_points",
        apply: |c, v| {
            c.telemetry.query_default_points = parse(v, "a number of points")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_QUERY_MAX_POINTS",
        key: "telemetry.query_max_points",
        apply: |c, v| {
            c.telemetry.query_max_points = parse(v, "a number of points")?;
            Ok(())
        },
    },
    EnvKey {
        env: "TELEMETRY_SQLITE_CACHE_MIB",
        key: "telemetry.sqlite_cache_mib",
        apply: |c, v| {
            c.telemetry.sqlite_cache_mib = parse(v, "a size in MiB")?;
            Ok(())
        },
    },
    EnvKey {
        env: "RULES_SECRET_KEY",
        key: "rules.secret_key",
        apply: |c, v| {
            c.rules.secret_key = Secret::new(v);
            Ok(())
        },
    },
    EnvKey {
        env: "DROVER_SECRET_KEY",
        key: "rules.secret_key",
        apply: |c, v| {
            c.rules.secret_key = Secret::new(v);
            Ok(())
        },
    },
    EnvKey {
        env: "ANOMALY_THRESHOLD",
        key: "rules.anomaly_threshold",
        apply: |c, v| {
            c.rules.anomaly_threshold = parse(v, "a positive number")?;
            Ok(())
        },
    },
    EnvKey {
        env: "RULES_TICK_MS",
        key: "rules.tick_ms",
        apply: |c, v| {
            c.rules.tick_ms = parse(v, "milliseconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "RULES_DELIVERY_ATTEMPTS",
        key: "rules.delivery_attempts",
        apply: |c, v| {
            c.rules.delivery_attempts = parse(v, "a number of attempts")?;
            Ok(())
        },
    },
    EnvKey {
        env: "RULES_RETRY_BACKOFF_MS",
        key: "rules.retry_backoff_ms",
        apply: |c, v| {
            c.rules.retry_backoff_ms = parse(v, "milliseconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "RULES_HTTP_TIMEOUT_MS",
        key: "rules.http_timeout_ms",
        apply: |c, v| {
            c.rules.http_timeout_ms = parse(v, "milliseconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "NOTIFY_ALLOWED_NETWORKS",
        key: "rules.notify_allowed_networks",
        apply: |c, v| {
            c.rules.notify_allowed_networks = v
                .split(',')
                .map(str::trim)
                .filter(|entry| !entry.is_empty())
                .map(String::from)
                .collect();
            Ok(())
        },
    },
    EnvKey {
        env: "RULES_MAILBOX",
        key: "rules.mailbox",
        apply: |c, v| {
            c.rules.mailbox = parse(v, "a number of events")?;
            Ok(())
        },
    },
    EnvKey {
        env: "RULES_SHARED_QUEUE",
        key: "rules.shared_queue",
        apply: |c, v| {
            c.rules.shared_queue = parse(v, "a number of events")?;
            Ok(())
        },
    },
    EnvKey {
        env: "RULES_WORKERS",
        key: "rules.workers",
        apply: |c, v| {
            c.rules.workers = parse(v, "a number of threads")?;
            Ok(())
        },
    },
    EnvKey {
        env: "RULES_TENANT_SLICE_MS",
        key: "rules.tenant_slice_ms",
        apply: |c, v| {
            c.rules.tenant_slice_ms = parse(v, "milliseconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "RULES_EVAL_TIMEOUT_MS",
        key: "rules.eval_timeout_ms",
        apply: |c, v| {
            c.rules.eval_timeout_ms = parse(v, "milliseconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "RULES_THREAD_NICE",
        key: "rules.thread_nice",
        apply: |c, v| {
            c.rules.thread_nice = parse(v, "a nice increment (0-19)")?;
            Ok(())
        },
    },
    EnvKey {
        env: "SMTP_HOST",
        key: "smtp.host",
        apply: |c, v| {
            c.smtp.host = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "SMTP_PORT",
        key: "smtp.port",
        apply: |c, v| {
            c.smtp.port = parse(v, "a port number")?;
            Ok(())
        },
    },
    EnvKey {
        env: "SMTP_TLS",
        key: "smtp.tls",
        apply: |c, v| {
            c.smtp.tls = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "SMTP_USERNAME",
        key: "smtp.username",
        apply: |c, v| {
            c.smtp.username = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "SMTP_PASSWORD",
        key: "smtp.password",
        apply: |c, v| {
            c.smtp.password = Secret::new(v);
            Ok(())
        },
    },
    EnvKey {
        env: "SMTP_FROM",
        key: "smtp.from",
        apply: |c, v| {
            c.smtp.from = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "SMTP_TIMEOUT_SECS",
        key: "smtp.timeout_secs",
        apply: |c, v| {
            c.smtp.timeout_secs = parse(v, "seconds")?;
            Ok(())
        },
    },
    EnvKey {
        env: "SMS_BASE_URL",
        key: "sms.base_url",
        apply: |c, v| {
            c.sms.base_url = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "SMS_ACCOUNT_SID",
        key: "sms.account_sid",
        apply: |c, v| {
            c.sms.account_sid = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "SMS_AUTH_TOKEN",
        key: "sms.auth_token",
        apply: |c, v| {
            c.sms.auth_token = Secret::new(v);
            Ok(())
        },
    },
    EnvKey {
        env: "SMS_FROM",
        key: "sms.from",
        apply: |c, v| {
            c.sms.from = v.to_string();
            Ok(())
        },
    },
    EnvKey {
        env: "FIRMWARE_MAX_IMAGE_BYTES",
        key: "firmware.max_image_bytes",
        apply: |c, v| {
            c.firmware.max_image_bytes = parse(v, "a size in bytes")?;
            Ok(())
        },
    },
    EnvKey {
        env: "FIRMWARE_MAX_CONCURRENT_DOWNLOADS",
        key: "firmware.max_concurrent_downloads",
        apply: |c, v| {
            c.firmware.max_concurrent_downloads = parse(v, "a number of downloads")?;
            Ok(())
        },
    },
    EnvKey {
        env: "FIRMWARE_SIGNING_KEY",
        key: "firmware.signing_key",
        apply: |c, v| {
            c.firmware.signing_key = Secret::new(v);
            Ok(())
        },
    },
];

/// Host-only variables from the product description, used when the matching URL is not set.
const HOST_SHORTHANDS: &[(&str, &str)] = &[
    ("REDIS_HOST", "REDIS_URL"),
    ("INFLUX_HOST", "INFLUX_URL"),
    ("POSTGRES_HOST", "DATABASE_URL"),
];

/// Environment variables that look like a misspelling of one Drover reads, each with the one it
/// most resembles: an override that is silently ignored (`MQTT_MAX_KEEPALIVE` for
/// `MQTT_MAX_KEEP_ALIVE`) is worse than a warning. Only near misses count (at most two edits),
/// so other programs' variables stay quiet.
pub fn misspelled_env_vars(names: impl IntoIterator<Item = String>) -> Vec<(String, &'static str)> {
    let known = || {
        ENV_KEYS
            .iter()
            .map(|key| key.env)
            .chain(HOST_SHORTHANDS.iter().map(|(host, _)| *host))
    };
    names
        .into_iter()
        .filter(|name| name.len() >= 6 && !known().any(|k| k == name))
        .filter_map(|name| {
            let closest = known()
                .map(|k| (strsim::damerau_levenshtein(&name, k), k))
                .min()?;
            (closest.0 <= 2).then_some((name, closest.1))
        })
        .collect()
}

impl Config {
    /// Loads defaults, then `path` (or `./drover.toml` if present), then the environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// As [`Config::load`], reading variables through `env` (tests pass a map).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut config = match Self::file_to_read(path, &env) {
            Some(file) => Self::from_file(&file)?,
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration file [`Config::load_with_env`] reads: `path`, else `$DROVER_CONFIG`,
    /// else `./drover.toml` when it exists; `None` means defaults and environment only.
    pub fn file_to_read(path: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
        let default_path = Path::new("drover.toml");
        match path {
            Some(p) => Some(p.to_path_buf()),
            None => env("DROVER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| default_path.exists().then(|| default_path.to_path_buf())),
        }
    }

    pub fn from_file(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            ConfigError::new(file.display().to_string(), format!("cannot read the file: {e}"))
        })?;
        Self::from_toml(&text)
            .map_err(|e| ConfigError::new(e.key, format!("{} (in {})", e.message, file.display())))
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml's message already names the key and line; keep it whole.
            ConfigError::new("config file", e.to_string().trim_end().to_string())
        })
    }

    /// Applies every environment override. Errors name the variable.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        for key in ENV_KEYS {
            if let Some(value) = env(key.env) {
                (key.apply)(self, &value)
                    .map_err(|m| ConfigError::new(format!("{} ({})", key.env, key.key), m))?;
            }
        }
        for (host_var, url_var) in HOST_SHORTHANDS {
            let Some(host) = env(host_var).filter(|h| !h.trim().is_empty()) else {
                continue;
            };
            if env(url_var).is_some() {
                continue;
            }
            let host = host.trim();
            match *host_var {
                "REDIS_HOST" if self.redis.url.is_empty() => {
                    let port = env("REDIS_PORT").unwrap_or_else(|| "6379".into());
                    self.redis.url = Secret::new(format!("redis://{host}:{port}/"));
                }
                "INFLUX_HOST" if self.influx.url.is_empty() => {
                    let port = env("INFLUX_PORT").unwrap_or_else(|| "8086".into());
                    self.influx.url = format!("http://{host}:{port}");
                }
                "POSTGRES_HOST" if self.storage.database_url.is_empty() => {
                    let port = env("POSTGRES_PORT").unwrap_or_else(|| "5432".into());
                    let user = env("POSTGRES_USER").unwrap_or_else(|| "postgres".into());
                    let db = env("POSTGRES_DB").unwrap_or_else(|| "drover".into());
                    let auth = match env("POSTGRES_PASSWORD") {
                        Some(pw) => format!("{user}:{pw}"),
                        None => user,
                    };
                    self.storage.database_url = Secret::new(format!("postgres://{auth}@{host}:{port}/{db}"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.http.bind.parse::<std::net::IpAddr>().is_err() {
            return Err(ConfigError::new(
                "http.bind (HTTP_BIND)",
                format!("expected an IP address, got {:?}", self.http.bind),
            ));
        }
        if self.http.max_body_bytes < 1024 {
            return Err(ConfigError::new(
                "http.max_body_bytes (HTTP_MAX_BODY_BYTES)",
                "must be at least 1024",
            ));
        }
        self.validate_mqtt()?;
        if self.storage.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::new(
                "storage.data_dir (DATA_DIR)",
                "must not be empty",
            ));
        }
        self.database_target()?;
        if !self.influx.url.is_empty() {
            if !(self.influx.url.starts_with("http://") || self.influx.url.starts_with("https://")) {
                return Err(ConfigError::new(
                    "influx.url (INFLUX_URL)",
                    format!(
                        "expected an http:// or https:// URL, got {:?}",
                        mask_url(&self.influx.url)
                    ),
                ));
            }
            if self.influx.db.trim().is_empty() {
                return Err(ConfigError::new(
                    "influx.db (INFLUX_DB)",
                    "must not be empty when influx.url is set",
                ));
            }
        }
        let redis = self.redis.url.expose();
        if !(redis.is_empty() || redis.starts_with("redis://") || redis.starts_with("rediss://")) {
            return Err(ConfigError::new(
                "redis.url (REDIS_URL)",
                format!("expected a redis:// or rediss:// URL, got {:?}", mask_url(redis)),
            ));
        }
        self.validate_cluster()?;
        if self.storage.audit_retention_days == 0 {
            return Err(ConfigError::new(
                "storage.audit_retention_days (AUDIT_RETENTION_DAYS)",
                "must be at least 1",
            ));
        }
        if self.limits.max_devices == 0 {
            return Err(ConfigError::new(
                "limits.max_devices (MAX_DEVICES)",
                "must be at least 1",
            ));
        }
        let secret = self.auth.jwt_secret.expose();
        if !secret.is_empty() && secret.len() < 32 {
            return Err(ConfigError::new(
                "auth.jwt_secret (JWT_SECRET)",
                "must be at least 32 characters",
            ));
        }
        if self.auth.token_ttl_secs < 60 {
            return Err(ConfigError::new(
                "auth.token_ttl_secs (JWT_TTL_SECS)",
                "must be at least 60",
            ));
        }
        if self.auth.max_failed_logins == 0 {
            return Err(ConfigError::new(
                "auth.max_failed_logins (MAX_FAILED_LOGINS)",
                "must be at least 1",
            ));
        }
        if self.auth.max_failed_logins_per_source < self.auth.max_failed_logins {
            return Err(ConfigError::new(
                "auth.max_failed_logins_per_source (MAX_FAILED_LOGINS_PER_SOURCE)",
                "must be at least max_failed_logins (MAX_FAILED_LOGINS)",
            ));
        }
        if !(100..=10_000_000).contains(&self.auth.login_throttle_entries) {
            return Err(ConfigError::new(
                "auth.login_throttle_entries (LOGIN_THROTTLE_ENTRIES)",
                "must be 100 to 10000000",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::new(
                "log.level (LOG_LEVEL)",
                format!("not a valid filter: {:?}", self.log.level),
            ));
        }
        if self.actors.device_mailbox == 0 {
            return Err(ConfigError::new(
                "actors.device_mailbox (DEVICE_MAILBOX)",
                "must be at least 1",
            ));
        }
        self.validate_telemetry()?;
        self.validate_firmware()?;
        self.validate_rules()
    }

    /// Cluster mode shares every store between nodes: the embedded ones cannot be shared.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if !c.enabled() {
            return Ok(());
        }
        let valid_id = |v: &str| {
            !v.is_empty()
                && v.len() <= 64
                && v.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
        };
        if !valid_id(&c.node_id) {
            return Err(ConfigError::new(
                "cluster.node_id (CLUSTER_NODE_ID)",
                "expected 1-64 letters, digits, '-', '_' or '.'",
            ));
        }
        if !valid_id(&c.name) {
            return Err(ConfigError::new(
                "cluster.name (CLUSTER_NAME)",
                "expected 1-64 letters, digits, '-', '_' or '.'",
            ));
        }
        if c.lease_secs < 2 || c.lease_secs > 300 {
            return Err(ConfigError::new(
                "cluster.lease_secs (CLUSTER_LEASE_SECS)",
                "expected 2 to 300 seconds",
            ));
        }
        if !matches!(self.database_target()?, DatabaseTarget::Postgres(_)) {
            return Err(ConfigError::new(
                "storage.database_url (DATABASE_URL)",
                "cluster mode (CLUSTER_NODE_ID) shares the registry between nodes: set a \
                 postgres:// URL; the embedded SQLite registry belongs to one node",
            ));
        }
        if self.influx.url.is_empty() {
            return Err(ConfigError::new(
                "influx.url (INFLUX_URL)",
                "cluster mode (CLUSTER_NODE_ID) shares telemetry between nodes: set INFLUX_URL; \
                 the embedded telemetry store belongs to one node",
            ));
        }
        if self.redis.url.is_empty() {
            return Err(ConfigError::new(
                "redis.url (REDIS_URL)",
                "cluster mode (CLUSTER_NODE_ID) keeps device ownership, routes and sessions in \
                 Redis: set REDIS_URL",
            ));
        }
        Ok(())
    }

    fn validate_firmware(&self) -> Result<(), ConfigError> {
        if self.firmware.max_concurrent_downloads == 0 {
            return Err(ConfigError::new(
                "firmware.max_concurrent_downloads (FIRMWARE_MAX_CONCURRENT_DOWNLOADS)",
                "must be at least 1",
            ));
        }
        if self.firmware.max_image_bytes == 0 {
            return Err(ConfigError::new(
                "firmware.max_image_bytes (FIRMWARE_MAX_IMAGE_BYTES)",
                "must be at least 1",
            ));
        }
        if !self.firmware.signing_key.is_empty() {
            crate::ota::signing::ManifestSigner::from_seed_base64(self.firmware.signing_key.expose())
                .map_err(|m| ConfigError::new("firmware.signing_key (FIRMWARE_SIGNING_KEY)", m))?;
        }
        Ok(())
    }

    fn validate_rules(&self) -> Result<(), ConfigError> {
        let r = &self.rules;
        if !(r.anomaly_threshold.is_finite() && r.anomaly_threshold > 0.0) {
            return Err(ConfigError::new(
                "rules.anomaly_threshold (ANOMALY_THRESHOLD)",
                "must be a positive number",
            ));
        }
        for (value, key) in [
            (r.tick_ms, "rules.tick_ms (RULES_TICK_MS)"),
            (r.http_timeout_ms, "rules.http_timeout_ms (RULES_HTTP_TIMEOUT_MS)"),
            (
                u64::from(r.delivery_attempts),
                "rules.delivery_attempts (RULES_DELIVERY_ATTEMPTS)",
            ),
            (r.mailbox as u64, "rules.mailbox (RULES_MAILBOX)"),
            (r.workers as u64, "rules.workers (RULES_WORKERS)"),
            (r.tenant_slice_ms, "rules.tenant_slice_ms (RULES_TENANT_SLICE_MS)"),
            (r.eval_timeout_ms, "rules.eval_timeout_ms (RULES_EVAL_TIMEOUT_MS)"),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        for (value, max, key) in [
            (r.workers as u64, 64, "rules.workers (RULES_WORKERS)"),
            (
                r.tenant_slice_ms,
                10_000,
                "rules.tenant_slice_ms (RULES_TENANT_SLICE_MS)",
            ),
            (
                r.eval_timeout_ms,
                10_000,
                "rules.eval_timeout_ms (RULES_EVAL_TIMEOUT_MS)",
            ),
        ] {
            if value > max {
                return Err(ConfigError::new(key, format!("at most {max}")));
            }
        }
        if !(0..=19).contains(&r.thread_nice) {
            return Err(ConfigError::new(
                "rules.thread_nice (RULES_THREAD_NICE)",
                "a nice increment from 0 (the server's own priority) to 19",
            ));
        }
        if r.delivery_attempts > 20 {
            return Err(ConfigError::new(
                "rules.delivery_attempts (RULES_DELIVERY_ATTEMPTS)",
                "at most 20",
            ));
        }
        crate::rules::destination::DestinationPolicy::parse(&r.notify_allowed_networks).map_err(|e| {
            ConfigError::new(
                "rules.notify_allowed_networks (NOTIFY_ALLOWED_NETWORKS)",
                e.to_string(),
            )
        })?;
        if !["none", "starttls", "tls"].contains(&self.smtp.tls.as_str()) {
            return Err(ConfigError::new(
                "smtp.tls (SMTP_TLS)",
                format!("expected none, starttls or tls, got {:?}", self.smtp.tls),
            ));
        }
        if !self.smtp.from.is_empty() && self.smtp.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(ConfigError::new(
                "smtp.from (SMTP_FROM)",
                format!("not an email address: {:?}", self.smtp.from),
            ));
        }
        if !(self.sms.base_url.starts_with("http://") || self.sms.base_url.starts_with("https://")) {
            return Err(ConfigError::new(
                "sms.base_url (SMS_BASE_URL)",
                "must be an http:// or https:// URL",
            ));
        }
        Ok(())
    }

    fn validate_telemetry(&self) -> Result<(), ConfigError> {
        let t = &self.telemetry;
        let at_least = |value: u64, min: u64, key: &str| {
            if value < min {
                Err(ConfigError::new(key, format!("must be at least {min}")))
            } else {
                Ok(())
            }
        };
        at_least(t.batch_size as u64, 1, "telemetry.batch_size (BATCH_SIZE)")?;
        at_least(
            t.batch_interval_ms,
            1,
            "telemetry.batch_interval_ms (BATCH_INTERVAL_MS)",
        )?;
        at_least(
            t.writer_queue_points as u64,
            t.batch_size as u64,
            "telemetry.writer_queue_points (TELEMETRY_WRITER_QUEUE_POINTS)",
        )?;
        at_least(
            t.raw_retention_days.into(),
            1,
            "telemetry.raw_retention_days (TELEMETRY_RAW_RETENTION_DAYS)",
        )?;
        at_least(
            t.maintenance_interval_secs,
            1,
            "telemetry.maintenance_interval_secs (TELEMETRY_MAINTENANCE_INTERVAL_SECS)",
        )?;
        at_least(
            t.max_metrics_per_message as u64,
            1,
            "telemetry.max_metrics_per_message (TELEMETRY_MAX_METRICS)",
        )?;
        at_least(
            t.max_batch_messages as u64,
            1,
            "telemetry.max_batch_messages (TELEMETRY_MAX_BATCH_MESSAGES)",
        )?;
        at_least(
            t.spool_max_bytes,
            1024 * 1024,
            "telemetry.spool_max_bytes (TELEMETRY_SPOOL_MAX_BYTES)",
        )?;
        at_least(
            t.query_default_points as u64,
            1,
            "telemetry.query_default_points (TELEMETRY_QUERY_DEFAULT_POINTS)",
        )?;
        at_least(
            t.sqlite_cache_mib.into(),
            1,
            "telemetry.sqlite_cache_mib (TELEMETRY_SQLITE_CACHE_MIB)",
        )?;
        // Rollups are computed from raw points (and 1-hour from 1-minute ones), so each level must
        // outlive the one it is computed from.
        if t.rollup_1m_retention_days < t.raw_retention_days {
            return Err(ConfigError::new(
                "telemetry.rollup_1m_retention_days (TELEMETRY_ROLLUP_1M_RETENTION_DAYS)",
                format!(
                    "must be at least telemetry.raw_retention_days ({})",
                    t.raw_retention_days
                ),
            ));
        }
        if t.rollup_1h_retention_days < t.rollup_1m_retention_days {
            return Err(ConfigError::new(
                "telemetry.rollup_1h_retention_days (TELEMETRY_ROLLUP_1H_RETENTION_DAYS)",
                format!(
                    "must be at least telemetry.rollup_1m_retention_days ({})",
                    t.rollup_1m_retention_days
                ),
            ));
        }
        if t.query_max_points < t.query_default_points {
            return Err(ConfigError::new(
                "telemetry.query_max_points (TELEMETRY_QUERY_MAX_POINTS)",
                format!(
                    "must be at least telemetry.query_default_points ({})",
                    t.query_default_points
                ),
            ));
        }
        Ok(())
    }

    fn validate_mqtt(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        if m.bind.parse::<std::net::IpAddr>().is_err() {
            return Err(ConfigError::new(
                "mqtt.bind (MQTT_BIND)",
                format!("expected an IP address, got {:?}", m.bind),
            ));
        }
        if m.tls_cert.is_empty() != m.tls_key.is_empty() {
            return Err(ConfigError::new(
                "mqtt.tls_cert (MQTT_TLS_CERT)",
                "mqtt.tls_cert and mqtt.tls_key (MQTT_TLS_KEY) must be set together",
            ));
        }
        for (key, path) in [
            ("mqtt.tls_cert (MQTT_TLS_CERT)", &m.tls_cert),
            ("mqtt.tls_key (MQTT_TLS_KEY)", &m.tls_key),
        ] {
            if !path.is_empty() && !Path::new(path).is_file() {
                return Err(ConfigError::new(key, format!("no such file: {path}")));
            }
        }
        if !(1024..=268_435_455).contains(&m.max_packet_size) {
            return Err(ConfigError::new(
                "mqtt.max_packet_size (MQTT_MAX_PACKET_SIZE)",
                "must be 1024 to 268435455",
            ));
        }
        for (key, value) in [
            ("mqtt.max_inflight (MQTT_MAX_INFLIGHT)", u64::from(m.max_inflight)),
            (
                "mqtt.receive_maximum (MQTT_RECEIVE_MAXIMUM)",
                u64::from(m.receive_maximum),
            ),
            (
                "mqtt.max_keep_alive_secs (MQTT_MAX_KEEP_ALIVE)",
                u64::from(m.max_keep_alive_secs),
            ),
            (
                "mqtt.max_subscriptions (MQTT_MAX_SUBSCRIPTIONS)",
                m.max_subscriptions as u64,
            ),
            (
                "mqtt.max_queued_messages (MQTT_MAX_QUEUED_MESSAGES)",
                m.max_queued_messages as u64,
            ),
            (
                "mqtt.connect_timeout_secs (MQTT_CONNECT_TIMEOUT)",
                u64::from(m.connect_timeout_secs),
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
        }
        // A device connects with its device id as client id: every device id must fit.
        if !(drover_actors::DeviceId::MAX_LEN..=65_535).contains(&m.max_client_id_len) {
            return Err(ConfigError::new(
                "mqtt.max_client_id_len (MQTT_MAX_CLIENT_ID_LEN)",
                format!(
                    "must be {} (the longest device id) to 65535",
                    drover_actors::DeviceId::MAX_LEN
                ),
            ));
        }
        Ok(())
    }

    /// Whether the MQTT TLS listener is configured.
    pub fn mqtt_tls_enabled(&self) -> bool {
        !self.mqtt.tls_cert.is_empty()
    }

    pub fn mqtt_workers(&self) -> usize {
        if self.mqtt.workers == 0 {
            num_cpus()
        } else {
            self.mqtt.workers
        }
    }

    /// The registry database: SQLite in the data dir unless a URL says otherwise.
    pub fn database_target(&self) -> Result<DatabaseTarget, ConfigError> {
        let url = self.storage.database_url.expose().trim();
        if url.is_empty() {
            return Ok(DatabaseTarget::Sqlite(self.storage.data_dir.join("drover.db")));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseTarget::Postgres(url.to_string()));
        }
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(ConfigError::new(
                    "storage.database_url (DATABASE_URL)",
                    "sqlite:// needs a file path",
                ));
            }
            return Ok(DatabaseTarget::Sqlite(PathBuf::from(path)));
        }
        Err(ConfigError::new(
            "storage.database_url (DATABASE_URL)",
            format!("expected postgres://… or sqlite://path, got {:?}", mask_url(url)),
        ))
    }

    pub fn http_workers(&self) -> usize {
        if self.http.workers == 0 {
            num_cpus()
        } else {
            self.http.workers
        }
    }

    pub fn telemetry_writers(&self) -> usize {
        if self.telemetry.writers == 0 {
            num_cpus()
        } else {
            self.telemetry.writers
        }
    }

    pub fn device_idle_timeout(&self) -> Option<std::time::Duration> {
        (self.actors.device_idle_secs > 0)
            .then(|| std::time::Duration::from_secs(self.actors.device_idle_secs))
    }

    pub fn actor_threads(&self) -> usize {
        if self.actors.threads == 0 {
            num_cpus()
        } else {
            self.actors.threads
        }
    }
}

pub fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The file `drover generate-config` writes: every key with its default and its variable.
pub const DEFAULT_CONFIG_TOML: &str = r#"# Drover configuration.
#
# Every key below shows its default. Each can also be set by the environment variable named in
# its comment, which wins over this file. Drover reads this file from --config, from
# $DROVER_CONFIG, or from ./drover.toml when it exists.

[http]
# Address the REST API, dashboard and WebSocket endpoints listen on.  (HTTP_BIND)
bind = "0.0.0.0"
# HTTP port; 0 picks a free port.  (PORT)
port = 8080
# Worker threads; 0 means one per core.  (HTTP_WORKERS)
workers = 0
# Largest accepted JSON request body, in bytes.  (HTTP_MAX_BODY_BYTES)
max_body_bytes = 1048576
# Seconds in-flight requests get to finish on shutdown.  (HTTP_SHUTDOWN_TIMEOUT_SECS)
shutdown_timeout_secs = 30

[mqtt]
# Address the MQTT listeners bind.  (MQTT_BIND)
bind = "0.0.0.0"
# MQTT 3.1.1 and 5.0 on one port; 0 picks a free port.  (MQTT_PORT)
port = 1883
# MQTT over TLS, served when tls_cert and tls_key are set.  (MQTT_TLS_PORT)
tls_port = 8883
# PEM certificate chain of the TLS listener.  (MQTT_TLS_CERT)
tls_cert = ""
# PEM private key of the TLS listener.  (MQTT_TLS_KEY)
tls_key = ""
# Threads serving MQTT connections; 0 means one per core.  (MQTT_WORKERS)
workers = 0
# Let clients without credentials in, into a namespace of their own that holds no devices.  (MQTT_ALLOW_ANONYMOUS)
allow_anonymous = false
# Largest MQTT packet accepted, in bytes.  (MQTT_MAX_PACKET_SIZE)
max_packet_size = 1048576
# QoS 1/2 messages in flight to one client.  (MQTT_MAX_INFLIGHT)
max_inflight = 32
# QoS 1/2 messages one client may have in flight to the broker.  (MQTT_RECEIVE_MAXIMUM)
receive_maximum = 64
# Topic aliases a client may use (MQTT 5).  (MQTT_MAX_TOPIC_ALIAS)
max_topic_alias = 64
# Longest keep-alive granted, in seconds; 65535 means no maximum. Below that, MQTT 5 clients
# asking for more (or for none) are told this value, and MQTT 3.1.1 clients are refused.  (MQTT_MAX_KEEP_ALIVE)
max_keep_alive_secs = 65535
# Subscriptions one client may hold.  (MQTT_MAX_SUBSCRIPTIONS)
max_subscriptions = 100
# QoS 1/2 messages kept for a persistent session while its client is away.  (MQTT_MAX_QUEUED_MESSAGES)
max_queued_messages = 1000
# Bytes of messages waiting to be written to one connected client; beyond, new messages for
# it are dropped and counted, so a slow subscriber never holds up anyone else (unless
# slow_subscriber = "backpressure").  (MQTT_MAX_QUEUED_BYTES)
max_queued_bytes = 16777216
# A QoS 1/2 message for a connected client with max_queued_bytes waiting: "drop" drops and
# counts it (the client loses it); "backpressure" queues it and holds back the publisher's
# PUBACK/PUBREC until the queue has room again, and disconnects a client that takes nothing
# for 10 seconds while a publisher waits. QoS 0 is dropped either way.  (MQTT_SLOW_SUBSCRIBER)
slow_subscriber = "drop"
# Messages per second one connection may publish; 0 means no limit.  (MQTT_MAX_PUBLISH_RATE)
max_publish_rate = 0
# Longest session expiry granted, in seconds (also for MQTT 3.1.1 persistent sessions).  (MQTT_MAX_SESSION_EXPIRY)
max_session_expiry_secs = 604800
# Seconds a new connection has to send CONNECT.  (MQTT_CONNECT_TIMEOUT)
connect_timeout_secs = 10
# Longest client identifier accepted, in bytes (at least 128, the longest device id); longer
# ones are refused with CONNACK 0x85 (MQTT 5) or 0x02 (3.1.1).  (MQTT_MAX_CLIENT_ID_LEN)
max_client_id_len = 128

[storage]
# Where the embedded databases live; created on first start.  (DATA_DIR)
data_dir = "./data"
# Registry database. Empty: SQLite file drover.db in data_dir.
# Production: "postgres://user:password@host:5432/drover". Also "sqlite:///path/to/file.db".
# POSTGRES_HOST (+ POSTGRES_PORT, POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB) builds one.  (DATABASE_URL)
database_url = ""
# Registry connection pool size; 0 picks one for the backend.  (DATABASE_POOL_SIZE)
pool_size = 0
# Days audit log entries are kept; older ones are deleted by the maintenance pass.  (AUDIT_RETENTION_DAYS)
audit_retention_days = 90

[influx]
# InfluxDB 1.x HTTP API (or 2.x/3.x through its 1.x-compatible API) for telemetry.
# Empty: telemetry stays in the embedded store. INFLUX_HOST builds http://host:8086.  (INFLUX_URL)
url = ""
# Database (bucket) name.  (INFLUX_DB)
db = "drover"
# Token for InfluxDB 2.x/3.x; empty for 1.x without auth.  (INFLUX_TOKEN)
token = ""

[redis]
# Redis for cache, MQTT session state and scale-out, e.g. "redis://127.0.0.1:6379/".
# Empty: kept in process. REDIS_HOST builds redis://host:6379/.  (REDIS_URL)
url = ""

[cluster]
# Joins a cluster of nodes sharing PostgreSQL, InfluxDB and Redis (all three required).
# Empty: a single node.  (CLUSTER_NODE_ID)
node_id = ""
# Nodes with the same name and Redis form one cluster.  (CLUSTER_NAME)
name = "drover"
# Host name shown for this node; empty: the machine's.  (CLUSTER_ADVERTISE_HOST)
advertise_host = ""
# Seconds a node's heartbeat and device leases last without renewal.  (CLUSTER_LEASE_SECS)
lease_secs = 10

[limits]
# Devices a tenant may register.  (MAX_DEVICES)
max_devices = 50000

[auth]
# HMAC key (32+ characters) signing login tokens. Empty: the keys of key_file are used
# (rotated with `drover admin rotate-jwt-key`).  (JWT_SECRET)
jwt_secret = ""
# File holding the signing keys (login token keys with ids, the rules' secrets key), created
# with mode 0600 on first start. Empty: keys.json in data_dir. Nodes sharing a registry must
# share this file's content.  (AUTH_KEY_FILE)
key_file = ""
# Lifetime of a login token, in seconds.  (JWT_TTL_SECS)
token_ttl_secs = 3600
# Clock difference tolerated when checking a token's expiry.  (JWT_CLOCK_SKEW_SECS)
clock_skew_secs = 60
# Failed logins for one username from one address before that pair is locked.  (MAX_FAILED_LOGINS)
max_failed_logins = 5
# How long failures are remembered and a lock lasts, in seconds.  (LOGIN_LOCKOUT_SECS)
login_lockout_secs = 300
# Failed logins from one address, across usernames, before the address is locked.  (MAX_FAILED_LOGINS_PER_SOURCE)
max_failed_logins_per_source = 50
# Entries each failed-login table holds at most (about 120 bytes each).  (LOGIN_THROTTLE_ENTRIES)
login_throttle_entries = 50000

[log]
# "text" for people, "json" for log pipelines.  (LOG_FORMAT)
format = "text"
# A tracing filter such as "info" or "drover=debug,actix_web=warn"; RUST_LOG also works.  (LOG_LEVEL)
level = "info"

[actors]
# Threads the device actors run on; 0 means one per core.  (ACTOR_THREADS)
threads = 0
# Messages a device actor's mailbox holds before senders are pushed back.  (DEVICE_MAILBOX)
device_mailbox = 256
# Seconds a device actor without a connection or a message lives before it stops; it starts
# again, from storage, on the next use. 0 keeps actors until shutdown.  (DEVICE_IDLE_SECS)
device_idle_secs = 600

[telemetry]
# Telemetry is stored in SQLite (telemetry.db in data_dir) unless influx.url is set.
# Points a writer collects before it writes a batch.  (BATCH_SIZE)
batch_size = 1000
# Longest a point waits in a writer before its batch is written, in milliseconds.  (BATCH_INTERVAL_MS)
batch_interval_ms = 100
# Batching writer actors; 0 means one per core.  (TELEMETRY_WRITERS)
writers = 0
# Points one writer holds before senders are pushed back (QoS 1/2 publishers wait, HTTP gets
# 503 with Retry-After, QoS 0 points are dropped and counted).  (TELEMETRY_WRITER_QUEUE_POINTS)
writer_queue_points = 50000
# Days raw points are kept; also the oldest timestamp a device may send.  (TELEMETRY_RAW_RETENTION_DAYS)
raw_retention_days = 30
# Days 1-minute rollups (mean/min/max/sum/count) are kept; at least the raw retention.  (TELEMETRY_ROLLUP_1M_RETENTION_DAYS)
rollup_1m_retention_days = 90
# Days 1-hour rollups are kept; at least the 1-minute retention.  (TELEMETRY_ROLLUP_1H_RETENTION_DAYS)
rollup_1h_retention_days = 730
# Seconds between rollup and retention passes.  (TELEMETRY_MAINTENANCE_INTERVAL_SECS)
maintenance_interval_secs = 60
# How far ahead of the server's clock a device timestamp may be, in seconds.  (TELEMETRY_MAX_FUTURE_SECS)
max_future_secs = 600
# Metrics in one message.  (TELEMETRY_MAX_METRICS)
max_metrics_per_message = 100
# Bytes of one string value.  (TELEMETRY_MAX_STRING_BYTES)
max_string_bytes = 1024
# Messages in one batch payload (a JSON array).  (TELEMETRY_MAX_BATCH_MESSAGES)
max_batch_messages = 1000
# Bytes the local spool (data_dir/spool) may hold while the store is unreachable.  (TELEMETRY_SPOOL_MAX_BYTES)
spool_max_bytes = 1073741824
# Raw points a query returns when it sets no limit.  (TELEMETRY_QUERY_DEFAULT_POINTS)
query_default_points = 10000
# Largest limit a query may set.  (TELEMETRY_QUERY_MAX_POINTS)
query_max_points = 100000
# Page cache of the embedded telemetry database, in MiB.  (TELEMETRY_SQLITE_CACHE_MIB)
sqlite_cache_mib = 64

[rules]
# Key that seals channel secrets stored in the registry (webhook HMAC keys, SMS gateway tokens) with
# AES-256-GCM; any string, its SHA-256 is the key. Empty: generated on first start and kept in
# the key file ([auth] key_file).  (RULES_SECRET_KEY)  Also read from (DROVER_SECRET_KEY)
secret_key = ""
# |z-score| above which a statistical condition fires unless the rule sets its own.  (ANOMALY_THRESHOLD)
anomaly_threshold = 3.0
# How often absence timers and escalation due times are checked, in milliseconds.  (RULES_TICK_MS)
tick_ms = 1000
# Attempts per notification before it is recorded as failed.  (RULES_DELIVERY_ATTEMPTS)
delivery_attempts = 4
# Wait before the first retry, doubled for each further one, in milliseconds.  (RULES_RETRY_BACKOFF_MS)
retry_backoff_ms = 500
# Timeout of one webhook or SMS gateway request, in milliseconds.  (RULES_HTTP_TIMEOUT_MS)
http_timeout_ms = 5000
# Where webhooks may go besides public addresses: CIDRs ("10.0.0.0/8"), addresses or host names
# (comma-separated in the variable). Loopback, private, link-local, unique-local, multicast and
# unspecified addresses are refused unless listed.  (NOTIFY_ALLOWED_NETWORKS)
notify_allowed_networks = []
# Telemetry events a tenant's rule actor may have waiting before new ones are dropped.  (RULES_MAILBOX)
mailbox = 4096
# Telemetry events the tenants' bursts beyond `mailbox` may borrow, all tenants together
# (0: none).  (RULES_SHARED_QUEUE)
shared_queue = 65536
# Threads that evaluate rules, shared fairly between tenants.  (RULES_WORKERS)
workers = 2
# Time a tenant's rules may use per turn before the next tenant with work gets the thread, in
# milliseconds.  (RULES_TENANT_SLICE_MS)
tenant_slice_ms = 20
# Wall time one rule evaluation may take, in milliseconds.  (RULES_EVAL_TIMEOUT_MS)
eval_timeout_ms = 50
# How much lower the threads that evaluate rules and live analytics run than the rest of the
# server (a nice increment, 0-19): when the CPU is short they yield it to ingestion and fall
# behind, dropping and counting events; on an idle CPU they run as fast as ever. 0: the
# server's own priority.  (RULES_THREAD_NICE)
thread_nice = 10

[smtp]
# SMTP server for email notifications; empty disables email.  (SMTP_HOST)
host = ""
# (SMTP_PORT)
port = 587
# "none", "starttls" or "tls".  (SMTP_TLS)
tls = "starttls"
# (SMTP_USERNAME)
username = ""
# (SMTP_PASSWORD)
password = ""
# Sender address.  (SMTP_FROM)
from = "drover@localhost"
# (SMTP_TIMEOUT_SECS)
timeout_secs = 10

[sms]
# Twilio-compatible gateway: form POST to {base_url}/2010-04-01/Accounts/{account_sid}/Messages.json.  (SMS_BASE_URL)
base_url = "https://api.twilio.com"
# (SMS_ACCOUNT_SID)
account_sid = ""
# Gateway token (basic auth password).  (SMS_AUTH_TOKEN)
auth_token = ""
# Sender number.  (SMS_FROM)
from = ""

[firmware]
# Largest firmware image accepted, in bytes.  (FIRMWARE_MAX_IMAGE_BYTES)
max_image_bytes = 268435456
# Downloads served at once; beyond, devices get 503 with Retry-After.  (FIRMWARE_MAX_CONCURRENT_DOWNLOADS)
max_concurrent_downloads = 256
# Ed25519 key signing firmware manifests (32-byte seed, base64). Empty: created in
# firmware-signing.key in the data directory on first start. Nodes of a cluster share it.  (FIRMWARE_SIGNING_KEY)
signing_key = ""
"#;

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn cluster_mode_refuses_the_embedded_stores_and_says_which() {
        let pg = ("DATABASE_URL", "postgres://db/drover");
        let influx = ("INFLUX_URL", "http://influx:8086");
        let redis = ("REDIS_URL", "redis://cache:6379/");
        let node = ("CLUSTER_NODE_ID", "node-1");
        let config = Config::load_with_env(None, env(&[node, pg, influx, redis])).unwrap();
        assert!(config.cluster.enabled());
        assert_eq!(config.cluster.name, "drover");
        let missing =
            |pairs: &[(&str, &str)]| Config::load_with_env(None, env(pairs)).unwrap_err().to_string();
        assert!(missing(&[node, influx, redis]).contains("DATABASE_URL"));
        assert!(missing(&[node, pg, redis]).contains("INFLUX_URL"));
        assert!(missing(&[node, pg, influx]).contains("REDIS_URL"));
        assert!(missing(&[("CLUSTER_NODE_ID", "a b"), pg, influx, redis]).contains("CLUSTER_NODE_ID"));
        assert!(
            missing(&[node, ("CLUSTER_LEASE_SECS", "1"), pg, influx, redis]).contains("CLUSTER_LEASE_SECS")
        );
        // A single node needs none of them.
        assert!(!Config::load_with_env(None, env(&[])).unwrap().cluster.enabled());
    }

    #[test]
    fn default_file_matches_defaults() {
        assert_eq!(Config::from_toml(DEFAULT_CONFIG_TOML).unwrap(), Config::default());
    }

    #[test]
    fn default_file_names_every_variable() {
        for key in ENV_KEYS {
            assert!(
                DEFAULT_CONFIG_TOML.contains(&format!("({})", key.env)),
                "{} missing from the default file",
                key.env
            );
            let leaf = key.key.rsplit('.').next().unwrap();
            assert!(
                DEFAULT_CONFIG_TOML.contains(&format!("\n{leaf} = ")),
                "{} missing from the default file",
                key.key
            );
        }
    }

    #[test]
    fn near_misses_of_known_variables_are_reported() {
        let names = [
            "MQTT_MAX_KEEPALIVE",
            "MQTT_MAX_KEEP_ALIVE",
            "PATH",
            "HOSTNAME",
            "REDIS_URLS",
            "CARGO_HOME",
        ];
        let found = misspelled_env_vars(names.iter().map(|n| n.to_string()));
        assert_eq!(
            found,
            vec![
                ("MQTT_MAX_KEEPALIVE".to_string(), "MQTT_MAX_KEEP_ALIVE"),
                ("REDIS_URLS".to_string(), "REDIS_URL"),
            ]
        );
    }

    #[test]
    fn environment_overrides_file() {
        let mut config = Config::from_toml("[http]\nport = 9000\n").unwrap();
        config
            .apply_env(env(&[
                ("PORT", "9100"),
                ("LOG_FORMAT", "json"),
                ("MAX_DEVICES", "10"),
            ]))
            .unwrap();
        assert_eq!(config.http.port, 9100);
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.limits.max_devices, 10);
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = Config::load_with_env(None, env(&[("PORT", "eighty")])).unwrap_err();
        assert!(err.to_string().contains("PORT (http.port)"), "{err}");
        let err = Config::load_with_env(None, env(&[("DATABASE_URL", "mysql://x")])).unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
        let err = Config::load_with_env(None, env(&[("JWT_SECRET", "short")])).unwrap_err();
        assert!(err.to_string().contains("JWT_SECRET"), "{err}");
        let err = Config::load_with_env(None, env(&[("LOG_FORMAT", "xml")])).unwrap_err();
        assert!(err.to_string().contains("LOG_FORMAT"), "{err}");
        let err = Config::from_toml("[http]\nprot = 1\n").unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
    }

    #[test]
    fn slow_subscriber_policy_is_drop_unless_set() {
        assert_eq!(Config::default().mqtt.slow_subscriber, SlowSubscriber::Drop);
        let config = Config::load_with_env(None, env(&[("MQTT_SLOW_SUBSCRIBER", "backpressure")])).unwrap();
        assert_eq!(config.mqtt.slow_subscriber, SlowSubscriber::Backpressure);
        let config = Config::from_toml("[mqtt]\nslow_subscriber = \"backpressure\"\n").unwrap();
        assert_eq!(config.mqtt.slow_subscriber, SlowSubscriber::Backpressure);
        let err = Config::load_with_env(None, env(&[("MQTT_SLOW_SUBSCRIBER", "block")])).unwrap_err();
        assert!(err.to_string().contains("MQTT_SLOW_SUBSCRIBER"), "{err}");
        assert!(Config::from_toml("[mqtt]\nslow_subscriber = \"block\"\n").is_err());
    }

    #[test]
    fn seed_host_variables_build_urls() {
        let mut config = Config::default();
        config
            .apply_env(env(&[
                ("REDIS_HOST", "cache"),
                ("INFLUX_HOST", "tsdb"),
                ("POSTGRES_HOST", "db"),
                ("POSTGRES_PASSWORD", "pw"),
            ]))
            .unwrap();
        assert_eq!(config.redis.url.expose(), "redis://cache:6379/");
        assert_eq!(config.influx.url, "http://tsdb:8086");
        assert_eq!(
            config.storage.database_url.expose(),
            "postgres://postgres:pw@db:5432/drover"
        );
        // An explicit URL wins over the host shorthand.
        let mut config = Config::default();
        config
            .apply_env(env(&[("REDIS_HOST", "cache"), ("REDIS_URL", "redis://other/")]))
            .unwrap();
        assert_eq!(config.redis.url.expose(), "redis://other/");
    }

    #[test]
    fn debug_hides_secrets() {
        let mut config = Config::default();
        config
            .apply_env(env(&[
                ("JWT_SECRET", "a-very-long-secret-value-that-is-secret"),
                ("DATABASE_URL", "postgres://drover:hunter2@db/drover"),
                ("INFLUX_TOKEN", "influx-token-value"),
                ("REDIS_URL", "redis://:redispass@cache:6379/"),
            ]))
            .unwrap();
        let shown = format!("{config:?}");
        for secret in ["a-very-long-secret", "hunter2", "influx-token-value", "redispass"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert!(shown.contains("postgres://drover:***@db/drover"));
    }

    #[test]
    fn rules_smtp_and_sms_settings() {
        let config = Config::load_with_env(
            None,
            env(&[
                ("ANOMALY_THRESHOLD", "2.5"),
                ("DROVER_SECRET_KEY", "rules-key-value"),
                ("SMTP_HOST", "mail.internal"),
                ("SMTP_TLS", "tls"),
                ("SMTP_PASSWORD", "smtp-password-value"),
                ("SMS_AUTH_TOKEN", "sms-token-value"),
                ("SMS_BASE_URL", "http://127.0.0.1:9999"),
                ("NOTIFY_ALLOWED_NETWORKS", "127.0.0.1/32, hooks.internal,"),
            ]),
        )
        .unwrap();
        assert_eq!(config.rules.anomaly_threshold, 2.5);
        assert_eq!(
            config.rules.notify_allowed_networks,
            vec!["127.0.0.1/32".to_string(), "hooks.internal".to_string()]
        );
        assert_eq!(config.rules.secret_key.expose(), "rules-key-value");
        assert_eq!(config.smtp.tls, "tls");
        let shown = format!("{config:?}");
        for secret in ["rules-key-value", "smtp-password-value", "sms-token-value"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        for (var, value) in [
            ("ANOMALY_THRESHOLD", "0"),
            ("ANOMALY_THRESHOLD", "high"),
            ("SMTP_TLS", "maybe"),
            ("SMTP_FROM", "not an address"),
            ("SMS_BASE_URL", "ftp://gateway"),
            ("RULES_DELIVERY_ATTEMPTS", "0"),
            ("RULES_TICK_MS", "0"),
            ("NOTIFY_ALLOWED_NETWORKS", "10.0.0.0/8, not a host"),
        ] {
            let err = Config::load_with_env(None, env(&[(var, value)])).unwrap_err();
            assert!(err.to_string().contains(var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn database_target_defaults_to_sqlite_in_data_dir() {
        let config = Config::default();
        assert_eq!(
            config.database_target().unwrap(),
            DatabaseTarget::Sqlite(PathBuf::from("./data/drover.db"))
        );
    }

    #[test]
    fn telemetry_settings() {
        let config = Config::load_with_env(
            None,
            env(&[("BATCH_SIZE", "500"), ("TELEMETRY_RAW_RETENTION_DAYS", "7")]),
        )
        .unwrap();
        assert_eq!(config.telemetry.batch_size, 500);
        assert_eq!(config.telemetry.payload_limits().max_age_ms, 7 * 86_400_000);
        let err = Config::load_with_env(None, env(&[("BATCH_SIZE", "0")])).unwrap_err();
        assert!(err.to_string().contains("BATCH_SIZE"), "{err}");
        let err = Config::load_with_env(None, env(&[("BATCH_INTERVAL_MS", "soon")])).unwrap_err();
        assert!(err.to_string().contains("BATCH_INTERVAL_MS"), "{err}");
        let err = Config::load_with_env(None, env(&[("TELEMETRY_RAW_RETENTION_DAYS", "120")])).unwrap_err();
        assert!(
            err.to_string().contains("TELEMETRY_ROLLUP_1M_RETENTION_DAYS"),
            "{err}"
        );
        let err = Config::load_with_env(None, env(&[("TELEMETRY_SPOOL_MAX_BYTES", "10")])).unwrap_err();
        assert!(err.to_string().contains("TELEMETRY_SPOOL_MAX_BYTES"), "{err}");
    }

    #[test]
    fn rule_and_analytics_threads_niceness() {
        assert_eq!(Config::default().rules.thread_nice, 10);
        let config = Config::load_with_env(None, env(&[("RULES_THREAD_NICE", "0")])).unwrap();
        assert_eq!(config.rules.thread_nice, 0);
        for bad in ["20", "-1", "low"] {
            let err = Config::load_with_env(None, env(&[("RULES_THREAD_NICE", bad)])).unwrap_err();
            assert!(err.to_string().contains("RULES_THREAD_NICE"), "{bad}: {err}");
        }
    }

    #[test]
    fn mask_url_keeps_user_and_host() {
        assert_eq!(mask_url("redis://user:pw@h:1/0"), "redis://user:***@h:1/0");
        assert_eq!(mask_url("http://h:8086"), "http://h:8086");
        assert_eq!(mask_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            mask_url("https://h/s/T0?token=Q456&x=&flag#frag"),
            "https://h/s/T0?token=***&x=&flag#frag"
        );
    }
}
