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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_trait::async_trait;

use super::forecast::{MIN_HISTORY, fit_recent};
use super::isolation::{IsolationModel, IsolationOptions};
use super::monitor::forest_options;
use super::monitor::{
    AnalyticsEvent, DeviceMonitor, ForestSnapshot, MonitorSnapshot, SharedForest, TrainingJob,
    TypeForestSnapshot,
};
use super::settings::{AnalyticsConfig, MonitorSettings};
use crate::clock::SharedClock;
use crate::ids::{DeviceId, TenantId};
use crate::pipeline::TelemetryAccepted;
use crate::rules::findings::{
    AnalyticsDemand, AnalyticsFindings, FORECAST_INTERVAL_MS, Finding, ForecastFinding, ScoredMessage,
};
use crate::telemetry::{MetricName, MetricValue, TelemetryPoint};
use crate::telemetry_writer::{Backpressure, WriterPool};

/// Trainings one tenant runs at once; a due training past this waits for a later message.
pub const MAX_TRAININGS: usize = 2;
/// Forecast fits (for `forecast` rules) one tenant runs at once on the blocking pool.
pub const MAX_FORECASTS: usize = 2;
/// Recent values kept per (device, metric) that a forecast rule watches.
pub const FORECAST_HISTORY: usize = 512;
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
    /// Telemetry events not analysed because the tenant's actor or the router was behind.
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
    /// Findings for `anomaly` and `forecast` rules the rules engine's mailbox refused.
    pub findings_dropped: AtomicU64,
    /// Forecasts fitted for `forecast` rules.
    pub forecasts: AtomicU64,
    /// Due forecast fits postponed because the tenant had [`MAX_FORECASTS`] running.
    pub forecasts_deferred: AtomicU64,
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
    /// Where findings for `anomaly` and `forecast` rules go (the node's `RuleRouter`).
    pub rules: Option<Recipient<AnalyticsFindings>>,
    /// What each tenant's rules need (set by the rule actors).
    pub demand: Arc<AnalyticsDemand>,
    /// Server time, for the forecast interval.
    pub clock: SharedClock,
}

/// Recent values of one (device, metric) that a forecast rule watches.
#[derive(Debug, Default)]
struct ForecastTrack {
    points: VecDeque<(i64, f64)>,
    /// Server time of the last fit started.
    fitted_at_ms: Option<i64>,
    in_flight: bool,
}

impl ForecastTrack {
    /// Adds a value in timestamp order (a value at a known timestamp replaces it).
    fn push(&mut self, ts: i64, value: f64) {
        let at = self.points.partition_point(|(t, _)| *t < ts);
        if self.points.get(at).is_some_and(|(t, _)| *t == ts) {
            self.points[at].1 = value;
            return;
        }
        self.points.insert(at, (ts, value));
        if self.points.len() > FORECAST_HISTORY {
            self.points.pop_front();
        }
    }

    fn due(&self, now_ms: i64) -> bool {
        !self.in_flight
            && self.points.len() >= MIN_HISTORY
            && self
                .fitted_at_ms
                .is_none_or(|at| now_ms - at >= FORECAST_INTERVAL_MS)
    }
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
    target: Trained,
    job: TrainingJob,
    model: Option<IsolationModel>,
}

/// Whose forest a training is for.
#[derive(Debug, Clone)]
enum Trained {
    Device(DeviceId),
    /// A device type's shared forest; the device whose message made it due carries it in its
    /// snapshot.
    Type {
        device_type: String,
        carrier: DeviceId,
    },
}

/// A device type's forest, shared by its devices (`forestPer: deviceType`): trained on the
/// recent feature vectors of all of them together.
struct TypeForest {
    shared: SharedForest,
    pool: VecDeque<Vec<f64>>,
    /// The set the model was trained on (for the snapshot).
    training: Option<Arc<Vec<Vec<f64>>>>,
    options: IsolationOptions,
    training_size: usize,
    retrain_interval_ms: i64,
    /// Message time of the last training started.
    trained_at_ms: Option<i64>,
    generation: u64,
    in_flight: bool,
    /// The device whose snapshot holds this forest.
    carrier: Option<DeviceId>,
}

impl TypeForest {
    fn new(
        metrics: Vec<String>,
        training_size: usize,
        retrain_interval_ms: i64,
        options: IsolationOptions,
    ) -> Self {
        TypeForest {
            shared: SharedForest {
                metrics: Arc::new(metrics),
                model: None,
            },
            pool: VecDeque::new(),
            training: None,
            options,
            training_size,
            retrain_interval_ms,
            trained_at_ms: None,
            generation: 0,
            in_flight: false,
            carrier: None,
        }
    }

    fn snapshot(&self, device_type: &str) -> TypeForestSnapshot {
        TypeForestSnapshot {
            device_type: device_type.to_string(),
            forest: ForestSnapshot {
                metrics: self.shared.metrics.to_vec(),
                raw: Vec::new(),
                training: self.training.as_ref().map(|t| t.to_vec()).unwrap_or_default(),
                seed: self.options.seed,
                trees: self.options.trees,
                trained_at_ms: self.trained_at_ms,
            },
        }
    }
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
    forecast_tracks: HashMap<(DeviceId, String), ForecastTrack>,
    forecasting: usize,
    /// Shared forests by device type.
    type_forests: HashMap<String, TypeForest>,
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
            forecast_tracks: HashMap::new(),
            forecasting: 0,
            type_forests: HashMap::new(),
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
                        self.train(Trained::Device(device.clone()), job, ctx);
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

    fn train(&mut self, target: Trained, job: TrainingJob, ctx: &mut Context<Self>) {
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
                    tracing::debug!(?target, %error, "forest training failed");
                    counters.training_failures.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Err(_) => {
                    counters.training_failures.fetch_add(1, Ordering::Relaxed);
                    None
                }
            };
            TrainingDone { target, job, model }
        };
        ctx.spawn(work.into_actor(self).map(|done, act, ctx| {
            act.trainings -= 1;
            ctx.notify(done);
        }));
    }

    /// Adds a device's feature vectors to its type's shared forest, and trains the forest when
    /// it is due (a full set, the retraining interval of message time past).
    fn pool_features(
        &mut self,
        device: &DeviceId,
        device_type: &str,
        (metrics, training_size, interval, options): (Vec<String>, usize, i64, IsolationOptions),
        pooled: Vec<(i64, Vec<f64>)>,
        ctx: &mut Context<Self>,
    ) {
        let forest = self
            .type_forests
            .entry(device_type.to_string())
            .or_insert_with(|| TypeForest::new(metrics.clone(), training_size, interval, options));
        if forest.options != options
            || forest.training_size != training_size
            || forest.retrain_interval_ms != interval
        {
            // The type's configuration changed: a new forest, trained with it.
            *forest = TypeForest::new(metrics.clone(), training_size, interval, options);
        }
        // A device whose metrics differ from the type's forest is scored by its univariate
        // detectors only.
        if *forest.shared.metrics != metrics {
            return;
        }
        let Some(last_ts) = pooled.last().map(|(ts, _)| *ts) else {
            return;
        };
        for (_, features) in pooled {
            if forest.pool.len() == forest.training_size {
                forest.pool.pop_front();
            }
            forest.pool.push_back(features);
        }
        let due = !forest.in_flight
            && forest.pool.len() >= forest.training_size
            && forest
                .trained_at_ms
                .is_none_or(|at| last_ts - at >= forest.retrain_interval_ms);
        if !due {
            return;
        }
        if self.trainings >= MAX_TRAININGS {
            self.deps
                .counters
                .trainings_deferred
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        forest.in_flight = true;
        forest.trained_at_ms = Some(last_ts);
        forest.generation += 1;
        let job = TrainingJob {
            generation: forest.generation,
            features: Arc::new(forest.pool.iter().cloned().collect()),
            options: forest.options,
        };
        self.train(
            Trained::Type {
                device_type: device_type.to_string(),
                carrier: device.clone(),
            },
            job,
            ctx,
        );
    }

    /// A shared forest kept in a stored snapshot: restored and retrained (same set and seed,
    /// same forest) before its type's devices score with it.
    fn restore_type_forest(
        &mut self,
        carrier: &DeviceId,
        stored: &TypeForestSnapshot,
        ctx: &mut Context<Self>,
    ) {
        let settings = self
            .configs
            .settings(&self.deps.defaults, carrier, &stored.device_type);
        let f = &stored.forest;
        let width = f.metrics.len() * super::isolation::FEATURES_PER_METRIC;
        if !settings.shared_forest
            || !settings.methods.contains(&super::detector::Method::Eif)
            || f.metrics.is_empty()
            || f.training.is_empty()
            || f.training.iter().any(|v| v.len() != width)
        {
            return;
        }
        let options = IsolationOptions {
            seed: f.seed,
            trees: f.trees,
            ..forest_options(&settings)
        };
        let mut forest = TypeForest::new(
            f.metrics.clone(),
            settings.training_size,
            settings.retrain_interval_ms,
            options,
        );
        forest.pool = f.training.iter().cloned().collect();
        forest.generation = 1;
        forest.in_flight = true;
        forest.trained_at_ms = f.trained_at_ms;
        forest.carrier = Some(carrier.clone());
        let job = TrainingJob {
            generation: 1,
            features: Arc::new(f.training.clone()),
            options,
        };
        self.type_forests.insert(stored.device_type.clone(), forest);
        self.train(
            Trained::Type {
                device_type: stored.device_type.clone(),
                carrier: carrier.clone(),
            },
            job,
            ctx,
        );
    }

    /// Drops the recent values of metrics no forecast rule of the tenant names any more.
    fn forget_unwatched_forecasts(&mut self) {
        let demand = self.deps.demand.get(&self.tenant);
        self.forecast_tracks.retain(|(_, metric), track| {
            track.in_flight
                || demand
                    .as_ref()
                    .is_some_and(|d| d.forecasts.iter().any(|n| n.metric == *metric))
        });
    }

    /// Hands findings to the rules engine; a full mailbox drops them (counted).
    fn send_findings(&self, device: &DeviceId, device_type: &str, finding: Finding) {
        let Some(rules) = &self.deps.rules else {
            return;
        };
        let findings = AnalyticsFindings {
            tenant: self.tenant.clone(),
            device: device.clone(),
            device_type: device_type.to_string(),
            finding,
        };
        if rules.try_send(findings).is_err() {
            self.deps
                .counters
                .findings_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Fits the forecast of `metric` on the blocking pool and sends it to the rules.
    fn fit_forecast(
        &mut self,
        key: (DeviceId, String),
        device_type: String,
        within_ms: i64,
        now_ms: i64,
        ctx: &mut Context<Self>,
    ) {
        let Some(track) = self.forecast_tracks.get_mut(&key) else {
            return;
        };
        track.in_flight = true;
        track.fitted_at_ms = Some(now_ms);
        let points: Vec<(i64, f64)> = track.points.iter().copied().collect();
        self.forecasting += 1;
        let work = async move { tokio::task::spawn_blocking(move || fit_recent(&points, within_ms)).await };
        ctx.spawn(work.into_actor(self).map(move |fitted, act, _ctx| {
            act.forecasting -= 1;
            let track = act.forecast_tracks.get_mut(&key);
            match fitted {
                Ok(Ok((step_ms, last_ts_ms, last_value, forecast))) => {
                    if let Some(track) = track {
                        track.in_flight = false;
                    }
                    act.deps.counters.forecasts.fetch_add(1, Ordering::Relaxed);
                    let (device, metric) = key;
                    act.send_findings(
                        &device,
                        &device_type,
                        Finding::Forecast(ForecastFinding {
                            metric,
                            last_ts_ms,
                            last_value,
                            step_ms,
                            forecast: Arc::new(forecast),
                        }),
                    );
                }
                Ok(Err(error)) => {
                    if let Some(track) = track {
                        track.in_flight = false;
                        // Too few values on the grid yet: try again with the next value.
                        if matches!(error, super::AnalyticsError::NotEnoughData { .. }) {
                            track.fitted_at_ms = None;
                        }
                    }
                    tracing::debug!(tenant = %act.tenant, device = %key.0, %error, "forecast not fitted");
                }
                Err(_) => {
                    if let Some(track) = track {
                        track.in_flight = false;
                    }
                }
            }
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
        let type_forests = &self.type_forests;
        let snapshots: Vec<(DeviceId, MonitorSnapshot)> = self
            .dirty
            .drain()
            .filter_map(|d| {
                self.monitors.get(&d).map(|m| {
                    let mut snapshot = m.snapshot();
                    snapshot.type_forest = type_forests
                        .iter()
                        .find(|(_, f)| f.carrier.as_ref() == Some(&d) && f.training.is_some())
                        .map(|(t, f)| f.snapshot(t));
                    (d.clone(), snapshot)
                })
            })
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
        ctx.wait(async move { store.load(&tenant).await }.into_actor(self).map(
            |loaded, act, ctx| match loaded {
                Ok(stored) => {
                    act.configs = stored.configs;
                    for (device, snapshot) in &stored.snapshots {
                        if let Some(forest) = &snapshot.type_forest {
                            act.restore_type_forest(device, forest, ctx);
                        }
                    }
                    act.stored = stored.snapshots.into_iter().collect();
                }
                Err(error) => {
                    act.deps.counters.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(tenant = %act.tenant, %error, "analytics state not loaded; starting cold");
                }
            },
        ));
        ctx.run_interval(FLUSH_INTERVAL, |act, ctx| act.flush(ctx));
        ctx.run_interval(SNAPSHOT_INTERVAL, |act, ctx| {
            act.save_snapshots(ctx);
            act.forget_unwatched_forecasts();
        });
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
        let demand = self.deps.demand.get(&self.tenant);
        let wants_scores = demand
            .as_ref()
            .is_some_and(|d| self.deps.rules.is_some() && d.wants_scores(&device, &msg.device_type));
        let mut scored: Vec<ScoredMessage> = Vec::new();
        let mut jobs = Vec::new();
        let mut observed = Vec::new();
        let shared = self.type_forests.get(&*msg.device_type).map(|f| f.shared.clone());
        let mut pooled: Vec<(i64, Vec<f64>)> = Vec::new();
        let pool_into = {
            let monitor = self.monitor(&device, &msg.device_type, ctx);
            for (ts, values) in &groups {
                let mut o = monitor.observe_shared(*ts, values, shared.as_ref());
                if let Some(job) = o.training.take() {
                    jobs.push(job);
                }
                if let Some(features) = o.features.take() {
                    pooled.push((*ts, features));
                }
                observed.push((*ts, o));
            }
            match monitor.forest_metrics() {
                Some(metrics) if !pooled.is_empty() => {
                    let settings = monitor.settings();
                    Some((
                        metrics.to_vec(),
                        settings.training_size,
                        settings.retrain_interval_ms,
                        monitor.forest_options(),
                    ))
                }
                _ => None,
            }
        };
        if let Some((metrics, training_size, interval, options)) = pool_into {
            self.pool_features(
                &device,
                &msg.device_type,
                (metrics, training_size, interval, options),
                pooled,
                ctx,
            );
        }
        self.dirty.insert(device.clone());
        for (ts, mut o) in observed {
            if wants_scores && !o.statistics.is_empty() {
                scored.push(ScoredMessage {
                    ts_ms: ts,
                    scores: std::mem::take(&mut o.statistics),
                });
            }
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
        if !scored.is_empty() {
            self.send_findings(&device, &msg.device_type, Finding::Scored(scored));
        }
        if let Some(demand) = demand.filter(|_| self.deps.rules.is_some()) {
            let now_ms = self.deps.clock.now_ms();
            for (metric, within_ms) in demand.forecasts_for(&device, &msg.device_type) {
                let key = (device.clone(), metric.to_string());
                let track = self.forecast_tracks.entry(key.clone()).or_default();
                for (ts, values) in &groups {
                    if let Some((_, v)) = values.iter().find(|(n, v)| *n == metric && v.is_finite()) {
                        track.push(*ts, *v);
                    }
                }
                if track.due(now_ms) {
                    if self.forecasting >= MAX_FORECASTS {
                        counters.forecasts_deferred.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.fit_forecast(key, msg.device_type.to_string(), within_ms, now_ms, ctx);
                    }
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
                self.train(Trained::Device(device.clone()), job, ctx);
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
        match msg.target {
            Trained::Device(device) => {
                if let Some(monitor) = self.monitors.get_mut(&device) {
                    monitor.install(&msg.job, msg.model);
                    self.dirty.insert(device);
                }
            }
            Trained::Type { device_type, carrier } => {
                let Some(forest) = self.type_forests.get_mut(&device_type) else {
                    return;
                };
                if msg.job.generation != forest.generation {
                    return;
                }
                forest.in_flight = false;
                match msg.model {
                    Some(model) => {
                        forest.shared.model = Some(Arc::new(model));
                        forest.training = Some(msg.job.features.clone());
                        forest.carrier = Some(carrier.clone());
                        self.dirty.insert(carrier);
                    }
                    None => forest.trained_at_ms = None,
                }
            }
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
