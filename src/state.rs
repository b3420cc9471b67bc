//! What every request handler (and, later, the broker) shares: configuration, the registry,
//! the actor tree, credentials checking and operational figures.

use std::sync::Arc;
use std::time::Instant;

use drover_actors::pipeline::Pipeline;
use drover_actors::telemetry_writer::WriterPool;
use drover_actors::{Fleet, ShadowStore, TelemetrySpool, TelemetryStore};

use crate::analytics::engine::AnalyticsEngine;
use crate::audit::AuditSink;
use crate::auth::{JwtKeys, LoginThrottle};
use crate::config::Config;
use crate::dashboard::DashboardHub;
use crate::health::HealthChecker;
use crate::metrics::Metrics;
use crate::mqtt::connection::MqttContext;
use crate::rules::RulesEngine;
use crate::storage::RegistryStore;

pub struct AppState {
    pub config: Arc<Config>,
    pub registry: RegistryStore,
    pub fleet: Fleet,
    pub jwt: JwtKeys,
    pub login_throttle: LoginThrottle,
    pub audit: AuditSink,
    pub metrics: Arc<Metrics>,
    pub health: HealthChecker,
    /// The MQTT broker and what it shares with the API (kicking devices, reloading rules).
    pub mqtt: Arc<MqttContext>,
    pub started: Instant,
    /// The telemetry store (SQLite or InfluxDB), counted for `/metrics`.
    pub telemetry: Arc<dyn TelemetryStore>,
    /// Where batches wait while the telemetry store is unreachable.
    pub telemetry_spool: Arc<dyn TelemetrySpool>,
    /// The batching writers every device actor commits telemetry through.
    pub writers: WriterPool,
    /// Payload rules, observers and per-tenant telemetry counts shared by the device actors.
    pub pipeline: Arc<Pipeline>,
    /// Device shadows (written by device actors only; the API forgets deleted devices' ones).
    pub shadow_store: Arc<dyn ShadowStore>,
    /// Rules, alarms and notifications.
    pub rules: Arc<RulesEngine>,
    /// The live stream `/ws` sessions subscribe to.
    pub hub: DashboardHub,
    /// Singletons `GET /admin/actors` lists besides the fleet, writers and rules.
    pub downsampler: actix::Addr<drover_actors::downsampler::Downsampler>,
    pub replayer: actix::Addr<drover_actors::telemetry_writer::SpoolReplayer>,
    /// Live anomaly and drift detection (per-tenant actors).
    pub analytics: Arc<AnalyticsEngine>,
    /// Batch jobs and device commands.
    pub fleet_ops: Arc<crate::fleet_ops::FleetOps>,
    /// Firmware images and the OTA campaign runner.
    pub ota: Arc<crate::ota::Ota>,
}
