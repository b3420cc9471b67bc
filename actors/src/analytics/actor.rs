//! `AnalyticsActor`: one tenant's live analytics. Owns a [`DeviceMonitor`] per device that
//! sends telemetry to this node (per-device state lives where the device's actor lives: its
//! owner node, DESIGN.md §9), scores every message, publishes and stores the events, writes the
//! `anomaly_score` series, and keeps snapshots in the [`AnalyticsStore`] (the registry) so a
//! restart, or the device moving to another node, does not start cold.
//!
//! Forest training runs on the runtime's blocking pool, at most [`MAX_TRAININGS`] at once per
//! tenant; the actor thread only scores. Everything outward is bounded: events wait at most
//! [`MAX_PENDING_EVENTS`] for their batch insert, `anomaly_score` points go to the writers
//! with `Backpressure::Drop`, and a full buffer is counted, never waited on.
//!
//! Messages: [`TelemetryAccepted`], [`ReloadAnalytics`], [`FlushAnalytics`] (and the internal
//! `TrainingDone`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_trait::async_trait;

use super::isolation::IsolationModel;
use super::monitor::{AnalyticsEvent, DeviceMonitor, MonitorSnapshot, TrainingJob};
use super::settings::{AnalyticsConfig, MonitorSettings};
use crate::ids::{DeviceId, TenantId};
use crate::pipeline::TelemetryAccepted;
use crate::telemetry::{MetricName, MetricValue, TelemetryPoint};
use crate::telemetry_writer::{Backpressure, WriterPool};

/// Trainings one tenant runs at once; a due training past this waits for a later message.
pub const MAX_TRAININGS: usize = 2;
/// Events waiting for their batch insert; past this they are counted and dropped.
pub const MAX_PENDING_EVENTS: usize = 10_000;
/// `anomaly_score` points gathered before they go to the writers.
const SCORE_BATCH: usize = 512;
/// How often events and scores are flushed.
const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How often changed devices' snapshots are saved.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(60);
/// The telemetry series of a message's highest threshold-relative score.
pub const ANOMALY_SCORE_METRIC: &str = "anomaly_score";

/// A tenant's analytics configuration layers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantConfigs {
    pub tenant: AnalyticsConfig,
    pub device_types: HashMap<String, AnalyticsConfig>,
    pub devices: HashMap<DeviceId, AnalyticsConfig>,
}

impl TenantConfigs {
    /// The settings of `device` of type `device_type`, over `base` (the server's defaults). An
    /// invalid stored layer is skipped (the API refuses them; this guards older rows).
    pub fn settings(&self, base: &AnalyticsConfig, device: &DeviceId, device_type: &str) -> MonitorSettings {
        let mut config = base.clone();
        for layer in [
            Some(&self.tenant),
            self.device_types.get(device_type),
            self.devices.get(device),
        ]
        .into_iter()
        .flatten()
        {
            let next = config.overlay(layer);
            if next.validate().is_ok() {
                config = next;
            }
        }
        config.resolve().unwrap_or_default()
    }
}

/// What the actor loads when it starts.
#[derive(Debug, Default)]
pub struct StoredAnalytics {
    pub configs: TenantConfigs,
    pub snapshots: Vec<(DeviceId, MonitorSnapshot)>,
}

/// The durable side of analytics (the registry in the server).
#[async_trait]
pub trait AnalyticsStore: Send + Sync + 'static {
    async fn load(&self, tenant: &TenantId) -> Result<StoredAnalytics, String>;
    async fn load_configs(&self, tenant: &TenantId) -> Result<TenantConfigs, String>;
    async fn save_snapshots(
        &self,
        tenant: &TenantId,
        snapshots: Vec<(DeviceId, MonitorSnapshot)>,
    ) -> Result<(), String>;
    async fn record_events(
        &self,
        tenant: &TenantId,
        events: Vec<(DeviceId, AnalyticsEvent)>,
    ) -> Result<(), String>;
}

/// Where events are shown live (the `/ws` hub); must not block.
pub trait AnalyticsLive: Send + Sync + 'static {
    fn publish(&self, tenant: &TenantId, device: &DeviceId, event: &AnalyticsEvent);
}

/// Figures for `/metrics`.
#[derive(Debug, Default)]
pub struct AnalyticsCounters {
    /// Telemetry events not analysed because the tenant's actor was behind.
    pub dropped: AtomicU64,
    pub messages: AtomicU64,
    pub anomalies: AtomicU64,
    pub drifts: AtomicU64,
    pub events_dropped: AtomicU64,
    pub trainings: AtomicU64,
    pub training_failures: AtomicU64,
    /// Trainings postponed because the tenant already had [`MAX_TRAININGS`] running.
    pub trainings_deferred: AtomicU64,
    pub training_micros: AtomicU64,
    /// Microseconds spent scoring on actor threads.
    pub scoring_micros: AtomicU64,
    pub store_errors: AtomicU64,
    /// Devices with a monitor (all tenants).
    pub devices: AtomicU64,
}

/// What every tenant's actor shares.
#[derive(Clone)]
pub struct AnalyticsDeps {
    pub store: Arc<dyn AnalyticsStore>,
    pub live: Arc<dyn AnalyticsLive>,
    pub writers: Option<WriterPool>,
    pub counters: Arc<AnalyticsCounters>,
    /// The server-wide defaults (`ANOMALY_THRESHOLD` and the like).
    pub defaults: AnalyticsConfig,
    pub mailbox: usize,
}

/// Re-read the tenant's configuration (after the API changed it).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ReloadAnalytics {
    pub tenant: TenantId,
}

/// Writes pending events, scores and changed snapshots now, and answers once they are stored
/// (shutdown, tests).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct FlushAnalytics {}

#[derive(Message)]
#[rtype(result = "()")]
struct TrainingDone {
    device: DeviceId,
    job: TrainingJob,
    model: Option<IsolationModel>,
}

pub struct AnalyticsActor {
    tenant: TenantId,
    deps: AnalyticsDeps,
    configs: TenantConfigs,
    monitors: HashMap<DeviceId, DeviceMonitor>,
    /// Snapshots loaded at start, restored when their device first sends telemetry here.
    stored: HashMap<DeviceId, MonitorSnapshot>,
    dirty: HashSet<DeviceId>,
    events: Vec<(DeviceId, AnalyticsEvent)>,
    scores: Vec<TelemetryPoint>,
    trainings: usize,
    score_metric: MetricName,
}

impl AnalyticsActor {
    pub fn new(tenant: TenantId, deps: AnalyticsDeps) -> Self {
        AnalyticsActor {
            tenant,
            deps,
            configs: TenantConfigs::default(),
            monitors: HashMap::new(),
            stored: HashMap::new(),
            dirty: HashSet::new(),
            events: Vec::new(),
            scores: Vec::with_capacity(SCORE_BATCH),
            trainings: 0,
            score_metric: MetricName::parse(ANOMALY_SCORE_METRIC).unwrap_or_else(|_| unreachable!()),
        }
    }

    fn monitor(
        &mut self,
        device: &DeviceId,
        device_type: &str,
        ctx: &mut Context<Self>,
    ) -> &mut DeviceMonitor {
        if !self.monitors.contains_key(device) {
            let settings = self.configs.settings(&self.deps.defaults, device, device_type);
            let monitor = match self.stored.remove(device) {
                Some(snapshot) => {
                    let (monitor, job) = DeviceMonitor::restore(settings, &snapshot);
                    if let Some(job) = job {
                        // A restored forest is retrained whatever the limit: it is the device's
                        // model, not a new one.
                        self.train(device.clone(), job, ctx);
                    }
                    monitor
                }
                None => DeviceMonitor::new(settings),
            };
            self.deps.counters.devices.fetch_add(1, Ordering::Relaxed);
            self.monitors.insert(device.clone(), monitor);
        }
        self.monitors
            .get_mut(device)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    fn train(&mut self, device: DeviceId, job: TrainingJob, ctx: &mut Context<Self>) {
        self.trainings += 1;
        let counters = self.deps.counters.clone();
        let work = async move {
            let started = Instant::now();
            let trained = tokio::task::spawn_blocking({
                let job = job.clone();
                move || job.run()
            })
            .await;
            counters
                .training_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            let model = match trained {
                Ok(Ok(model)) => {
                    counters.trainings.fetch_add(1, Ordering::Relaxed);
                    Some(model)
                }
                Ok(Err(error)) => {
                    tracing::debug!(%device, %error, "forest training failed");
                    counters.training_failures.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Err(_) => {
                    counters.training_failures.fetch_add(1, Ordering::Relaxed);
                    None
                }
            };
            TrainingDone { device, job, model }
        };
        ctx.spawn(work.into_actor(self).map(|done, act, ctx| {
            act.trainings -= 1;
            ctx.notify(done);
        }));
    }

    /// Stores the pending events (the future does the I/O).
    fn store_events(&mut self) -> impl Future<Output = ()> + 'static {
        let events = std::mem::take(&mut self.events);
        let (store, tenant, counters) = (
            self.deps.store.clone(),
            self.tenant.clone(),
            self.deps.counters.clone(),
        );
        async move {
            if events.is_empty() {
                return;
            }
            if let Err(error) = store.record_events(&tenant, events).await {
                counters.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%tenant, %error, "analytics events not stored");
            }
        }
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if !self.events.is_empty() {
            ctx.spawn(self.store_events().into_actor(self));
        }
        self.flush_scores();
    }

    fn flush_scores(&mut self) {
        if self.scores.is_empty() {
            return;
        }
        let points = std::mem::replace(&mut self.scores, Vec::with_capacity(SCORE_BATCH));
        if let Some(writers) = self.deps.writers.clone() {
            let (tenant, device) = (self.tenant.clone(), points[0].device.clone());
            // `Drop`: a busy writer loses the points (counted by the pool), the actor never waits.
            actix::spawn(async move {
                let _ = writers
                    .enqueue(&tenant, &device, points, Backpressure::Drop)
                    .await;
            });
        }
    }

    /// Saves the snapshots of the devices that changed (the future does the I/O).
    fn store_snapshots(&mut self) -> impl Future<Output = ()> + 'static {
        let snapshots: Vec<(DeviceId, MonitorSnapshot)> = self
            .dirty
            .drain()
            .filter_map(|d| self.monitors.get(&d).map(|m| (d.clone(), m.snapshot())))
            .collect();
        let (store, tenant, counters) = (
            self.deps.store.clone(),
            self.tenant.clone(),
            self.deps.counters.clone(),
        );
        async move {
            if snapshots.is_empty() {
                return;
            }
            if let Err(error) = store.save_snapshots(&tenant, snapshots).await {
                counters.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%tenant, %error, "analytics snapshots not saved");
            }
        }
    }

    fn save_snapshots(&mut self, ctx: &mut Context<Self>) {
        if !self.dirty.is_empty() {
            ctx.spawn(self.store_snapshots().into_actor(self));
        }
    }
}

impl Actor for AnalyticsActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.deps.mailbox.max(16));
        let (store, tenant) = (self.deps.store.clone(), self.tenant.clone());
        // Nothing is scored before the configuration and snapshots are in.
        ctx
            .wait(async move { store.load(&tenant).await }.into_actor(self).map(
            |loaded, act, _ctx| match loaded {
                Ok(stored) => {
                    act.configs = stored.configs;
                    act.stored = stored.snapshots.into_iter().collect();
                }
                Err(error) => {
                    act.deps.counters.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(tenant = %act.tenant, %error, "analytics state not loaded; starting cold");
                }
            },
        ));
        ctx.run_interval(FLUSH_INTERVAL, |act, ctx| act.flush(ctx));
        ctx.run_interval(SNAPSHOT_INTERVAL, |act, ctx| act.save_snapshots(ctx));
    }

    fn stopping(&mut self, _ctx: &mut Context<Self>) -> Running {
        // What was not flushed by FlushAnalytics still goes out, without anyone waiting.
        self.flush_scores();
        let (events, snapshots) = (self.store_events(), self.store_snapshots());
        actix::spawn(async move {
            events.await;
            snapshots.await;
        });
        Running::Stop
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.deps
            .counters
            .devices
            .fetch_sub(self.monitors.len() as u64, Ordering::Relaxed);
    }
}

impl Handler<TelemetryAccepted> for AnalyticsActor {
    type Result = ();

    fn handle(&mut self, msg: TelemetryAccepted, ctx: &mut Context<Self>) {
        let started = Instant::now();
        let counters = self.deps.counters.clone();
        counters.messages.fetch_add(1, Ordering::Relaxed);
        // Points of one message share a timestamp or come in runs of one: group by timestamp.
        let mut groups: Vec<(i64, Vec<(&str, f64)>)> = Vec::new();
        for point in msg.points.iter() {
            let MetricValue::Number(v) = point.value else {
                continue;
            };
            if point.metric.as_str() == ANOMALY_SCORE_METRIC {
                continue;
            }
            match groups.iter_mut().find(|(ts, _)| *ts == point.ts_ms) {
                Some((_, values)) => values.push((point.metric.as_str(), v)),
                None => groups.push((point.ts_ms, vec![(point.metric.as_str(), v)])),
            }
        }
        if groups.is_empty() {
            return;
        }
        let device = msg.device.clone();
        let mut jobs = Vec::new();
        let mut observed = Vec::new();
        {
            let monitor = self.monitor(&device, &msg.device_type, ctx);
            for (ts, values) in &groups {
                let mut o = monitor.observe(*ts, values);
                if let Some(job) = o.training.take() {
                    jobs.push(job);
                }
                observed.push((*ts, o));
            }
        }
        self.dirty.insert(device.clone());
        for (ts, o) in observed {
            if let Some(score) = o.score {
                self.scores.push(TelemetryPoint {
                    tenant: self.tenant.clone(),
                    device: device.clone(),
                    device_type: msg.device_type.clone(),
                    metric: self.score_metric.clone(),
                    ts_ms: ts,
                    value: MetricValue::Number(score.min(1e6)),
                });
            }
            for event in o.events {
                match event.kind {
                    super::monitor::EventKind::Anomaly => counters.anomalies.fetch_add(1, Ordering::Relaxed),
                    super::monitor::EventKind::Drift => counters.drifts.fetch_add(1, Ordering::Relaxed),
                };
                self.deps.live.publish(&self.tenant, &device, &event);
                if self.events.len() >= MAX_PENDING_EVENTS {
                    counters.events_dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.events.push((device.clone(), event));
                }
            }
        }
        for job in jobs {
            if self.trainings >= MAX_TRAININGS {
                counters.trainings_deferred.fetch_add(1, Ordering::Relaxed);
                if let Some(monitor) = self.monitors.get_mut(&device) {
                    monitor.install(&job, None);
                }
            } else {
                self.train(device.clone(), job, ctx);
            }
        }
        if self.scores.len() >= SCORE_BATCH {
            self.flush_scores();
        }
        counters
            .scoring_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

impl Handler<TrainingDone> for AnalyticsActor {
    type Result = ();

    fn handle(&mut self, msg: TrainingDone, _ctx: &mut Context<Self>) {
        if let Some(monitor) = self.monitors.get_mut(&msg.device) {
            monitor.install(&msg.job, msg.model);
            self.dirty.insert(msg.device);
        }
    }
}

impl Handler<ReloadAnalytics> for AnalyticsActor {
    type Result = ();

    fn handle(&mut self, _msg: ReloadAnalytics, ctx: &mut Context<Self>) {
        let (store, tenant) = (self.deps.store.clone(), self.tenant.clone());
        ctx.wait(
            async move { store.load_configs(&tenant).await }
                .into_actor(self)
                .map(|loaded, act, ctx| match loaded {
                    Ok(configs) => {
                        act.configs = configs;
                        // Monitors whose settings changed restart from their own snapshot, so
                        // what they learned survives a threshold change.
                        let changed: Vec<DeviceId> = act.monitors.keys().cloned().collect();
                        for device in changed {
                            let Some(monitor) = act.monitors.remove(&device) else {
                                continue;
                            };
                            act.deps.counters.devices.fetch_sub(1, Ordering::Relaxed);
                            act.stored.insert(device.clone(), monitor.snapshot());
                            act.dirty.remove(&device);
                        }
                        let _ = ctx;
                    }
                    Err(error) => {
                        act.deps.counters.store_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(tenant = %act.tenant, %error, "analytics configuration not reloaded");
                    }
                }),
        );
    }
}

impl Handler<FlushAnalytics> for AnalyticsActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: FlushAnalytics, _ctx: &mut Context<Self>) -> Self::Result {
        self.flush_scores();
        let (events, snapshots) = (self.store_events(), self.store_snapshots());
        Box::pin(async move {
            events.await;
            snapshots.await;
        })
    }
}
