//! One device's live analytics state: a set of streaming detectors per (device, metric) and an
//! isolation forest per device over its metrics together.
//!
//! Pure like the rest of this folder: [`DeviceMonitor::observe`] takes a message's numeric
//! metrics and returns the events and scores; it never trains a forest itself but hands a
//! [`TrainingJob`] back, which the caller runs wherever training belongs (the analytics actor:
//! a blocking pool) and installs with [`DeviceMonitor::install`]. A [`MonitorSnapshot`] keeps
//! what a restart needs: each metric's recent values (replayed into fresh detectors) and the
//! forest's training set and seed (a seeded forest retrained on the same set is the same
//! forest).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::detector::{
    DEFAULT_EWMA_ALPHA, Detector, Ensemble, EwmaDetector, MadDetector, Method, ZScoreDetector,
};
use super::drift::DriftDetector;
use super::isolation::{FEATURES_PER_METRIC, FeatureBuilder, IsolationModel, IsolationOptions};
use super::settings::{FOREST_METRICS, MonitorSettings};
use crate::rules::findings::MethodScore;

/// Messages the forest's rolling features look back over.
const FEATURE_WINDOW: usize = 10;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A value or combination of values unlike the device's recent ones.
    Anomaly,
    /// A lasting change of a metric's level (Page–Hinkley).
    Drift,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Anomaly => "anomaly",
            EventKind::Drift => "drift",
        }
    }
}

/// An anomaly or drift detected on one message.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalyticsEvent {
    pub kind: EventKind,
    pub ts_ms: i64,
    pub method: Method,
    /// Threshold-relative score: `>= 1` is over the threshold, whatever the method.
    pub score: f64,
    /// The method's own statistic (deviations for univariate methods, the normalised 0..1
    /// score for the forest, signed evidence for drift).
    pub statistic: f64,
    /// The metrics that made the message stand out, most deviating first.
    pub metrics: Vec<String>,
    /// The value of the first metric in `metrics`.
    pub value: Option<f64>,
}

/// What one message gave.
#[derive(Debug, Default)]
pub struct Observation {
    pub events: Vec<AnalyticsEvent>,
    /// The message's highest threshold-relative score over every scoring method (`None`
    /// while everything warms up): the `anomaly_score` series.
    pub score: Option<f64>,
    /// Per method, the highest score of this message.
    pub scores: Vec<(Method, f64)>,
    /// Per method (an ensemble's voters included, drift left out), the largest statistic of
    /// this message and the metric it came from: what `anomaly` rule conditions judge.
    pub statistics: Vec<MethodScore>,
    /// A forest to train, when one is due.
    pub training: Option<TrainingJob>,
    /// With a forest per device type: the message's feature vector, for the type's training
    /// set (the caller pools them; the monitor keeps none).
    pub features: Option<Vec<f64>>,
}

/// The forest of a device type, which every device of the type scores with when forests are
/// shared ([`MonitorSettings::shared_forest`]).
#[derive(Debug, Clone)]
pub struct SharedForest {
    /// The metrics of the forest's feature vectors, in order.
    pub metrics: Arc<Vec<String>>,
    pub model: Option<Arc<IsolationModel>>,
}

/// A forest to train off the actor thread.
#[derive(Debug, Clone)]
pub struct TrainingJob {
    pub generation: u64,
    pub features: Arc<Vec<Vec<f64>>>,
    pub options: IsolationOptions,
}

impl TrainingJob {
    /// Trains (CPU-bound: milliseconds to tens of milliseconds for 100 trees).
    pub fn run(&self) -> Result<IsolationModel, super::AnalyticsError> {
        IsolationModel::train_on_messages(&self.features, &self.options)
    }
}

struct MetricMonitor {
    recent: VecDeque<f64>,
    detectors: Vec<Box<dyn Detector + Send>>,
}

impl MetricMonitor {
    fn new(settings: &MonitorSettings) -> Self {
        let (w, warm, t) = (settings.window, settings.warm_up, settings.threshold);
        let detectors: Vec<Box<dyn Detector + Send>> = settings
            .methods
            .iter()
            .filter_map(|m| -> Option<Box<dyn Detector + Send>> {
                Some(match m {
                    Method::ZScore => Box::new(ZScoreDetector::new(w, warm, t)),
                    Method::Mad => Box::new(MadDetector::new(w, warm, t)),
                    Method::Ewma => Box::new(EwmaDetector::new(DEFAULT_EWMA_ALPHA, warm, t)),
                    Method::Ensemble => Box::new(Ensemble::new(
                        vec![
                            Box::new(ZScoreDetector::new(w, warm, t)),
                            Box::new(MadDetector::new(w, warm, t)),
                            Box::new(EwmaDetector::new(DEFAULT_EWMA_ALPHA, warm, t)),
                        ],
                        vec![],
                        2,
                    )),
                    Method::Drift => Box::new(DriftDetector::new(
                        super::drift::DEFAULT_DRIFT_DELTA,
                        super::drift::DEFAULT_DRIFT_LAMBDA,
                        warm,
                    )),
                    Method::Eif => return None,
                })
            })
            .collect();
        MetricMonitor {
            recent: VecDeque::with_capacity(w),
            detectors,
        }
    }

    fn remember(&mut self, value: f64, keep: usize) {
        if self.recent.len() == keep {
            self.recent.pop_front();
        }
        self.recent.push_back(value);
    }
}

struct ForestState {
    metrics: Vec<String>,
    features: FeatureBuilder,
    /// The last raw vectors (for the rolling features after a restart).
    raw: VecDeque<Vec<f64>>,
    recent: VecDeque<Vec<f64>>,
    model: Option<Arc<IsolationModel>>,
    /// The set `model` was trained on (kept for the snapshot).
    model_training: Option<Arc<Vec<Vec<f64>>>>,
    /// Message time of the last training started.
    trained_at_ms: Option<i64>,
    generation: u64,
    in_flight: bool,
}

/// The options of a forest trained with `settings`.
pub fn forest_options(settings: &MonitorSettings) -> IsolationOptions {
    IsolationOptions {
        trees: settings.trees,
        threshold: settings.eif_threshold,
        seed: settings.seed,
        ..IsolationOptions::default()
    }
}

/// The analytics state of one device.
pub struct DeviceMonitor {
    settings: MonitorSettings,
    metrics: BTreeMap<String, MetricMonitor>,
    forest: Option<ForestState>,
    messages: u64,
}

impl std::fmt::Debug for DeviceMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMonitor")
            .field("metrics", &self.metrics.keys().collect::<Vec<_>>())
            .field("forest", &self.forest.as_ref().map(|f| f.model.is_some()))
            .field("messages", &self.messages)
            .finish()
    }
}

/// What a restart keeps of a [`DeviceMonitor`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitorSnapshot {
    /// Each metric's last `window` values.
    pub metrics: BTreeMap<String, Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forest: Option<ForestSnapshot>,
    /// The shared forest of the device's type, when this device carries it (the one whose
    /// message made its last training due).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub type_forest: Option<TypeForestSnapshot>,
}

/// What a restart keeps of a device type's shared forest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeForestSnapshot {
    pub device_type: String,
    pub forest: ForestSnapshot,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForestSnapshot {
    pub metrics: Vec<String>,
    /// The last raw vectors (rebuild the rolling features).
    pub raw: Vec<Vec<f64>>,
    /// The trained model's training set; empty when none was trained.
    pub training: Vec<Vec<f64>>,
    pub seed: u64,
    pub trees: usize,
    pub trained_at_ms: Option<i64>,
}

impl DeviceMonitor {
    pub fn new(settings: MonitorSettings) -> Self {
        DeviceMonitor {
            settings,
            metrics: BTreeMap::new(),
            forest: None,
            messages: 0,
        }
    }

    pub fn settings(&self) -> &MonitorSettings {
        &self.settings
    }

    /// Whether a forest is trained.
    pub fn has_model(&self) -> bool {
        self.forest.as_ref().is_some_and(|f| f.model.is_some())
    }

    /// The trained forest, if any.
    pub fn model(&self) -> Option<&Arc<IsolationModel>> {
        self.forest.as_ref().and_then(|f| f.model.as_ref())
    }

    /// The options a forest trained for this device (or its type) gets.
    pub fn forest_options(&self) -> IsolationOptions {
        forest_options(&self.settings)
    }

    /// Scores one message (`values`: its numeric metrics, any order) and learns from it.
    pub fn observe(&mut self, ts_ms: i64, values: &[(&str, f64)]) -> Observation {
        self.observe_shared(ts_ms, values, None)
    }

    /// The metrics of the device's forest features, once it has seen a message.
    pub fn forest_metrics(&self) -> Option<&[String]> {
        self.forest.as_ref().map(|f| f.metrics.as_slice())
    }

    /// As [`DeviceMonitor::observe`]; with a shared forest, scores with the type's `shared`
    /// forest (when its metrics are the device's) and hands the feature vector back in
    /// [`Observation::features`] instead of keeping a training set.
    pub fn observe_shared(
        &mut self,
        ts_ms: i64,
        values: &[(&str, f64)],
        shared: Option<&SharedForest>,
    ) -> Observation {
        let mut out = Observation::default();
        if !self.settings.enabled {
            return out;
        }
        self.messages += 1;
        let window = self.settings.window;
        for &(name, value) in values {
            if !value.is_finite() || !self.settings.watches(name) {
                continue;
            }
            if !self.metrics.contains_key(name) {
                if self.metrics.len() >= 64 {
                    continue;
                }
                self.metrics
                    .insert(name.to_string(), MetricMonitor::new(&self.settings));
            }
            let Some(monitor) = self.metrics.get_mut(name) else {
                continue;
            };
            for detector in &mut monitor.detectors {
                let Some(verdict) = detector.observe(value) else {
                    continue;
                };
                let method = detector.method();
                if method != Method::Drift {
                    note_score(&mut out, method, verdict.score);
                    note_statistic(&mut out, method, &verdict, Some(name), Some(value));
                    for (member, v) in detector.members() {
                        note_statistic(&mut out, *member, v, Some(name), Some(value));
                    }
                }
                if verdict.anomalous {
                    out.events.push(AnalyticsEvent {
                        kind: if method == Method::Drift {
                            EventKind::Drift
                        } else {
                            EventKind::Anomaly
                        },
                        ts_ms,
                        method,
                        score: verdict.score,
                        statistic: verdict.statistic,
                        metrics: vec![name.to_string()],
                        value: Some(value),
                    });
                }
            }
            monitor.remember(value, window);
        }
        if self.settings.methods.contains(&Method::Eif) {
            self.observe_forest(ts_ms, values, &mut out, shared);
        }
        out
    }

    fn observe_forest(
        &mut self,
        ts_ms: i64,
        values: &[(&str, f64)],
        out: &mut Observation,
        shared: Option<&SharedForest>,
    ) {
        let shared_mode = self.settings.shared_forest;
        if self.forest.is_none()
            && let Some(shared) = shared.filter(|_| shared_mode)
            && shared
                .metrics
                .iter()
                .all(|m| values.iter().any(|(n, v)| n == m && v.is_finite()))
        {
            // A device of a type that has a forest takes the type's metrics.
            self.forest = Some(ForestState::new(shared.metrics.to_vec()));
        }
        if self.forest.is_none() {
            let mut names: Vec<String> = values
                .iter()
                .filter(|(n, v)| v.is_finite() && self.settings.watches(n))
                .map(|(n, _)| n.to_string())
                .collect();
            names.sort();
            names.dedup();
            names.truncate(FOREST_METRICS);
            if names.is_empty() {
                return;
            }
            self.forest = Some(ForestState::new(names));
        }
        let options = self.forest_options();
        let (training_size, interval) = (self.settings.training_size, self.settings.retrain_interval_ms);
        let Some(forest) = self.forest.as_mut() else {
            return;
        };
        // A message without every forest metric is not a vector of the model's space.
        let Some(vector) = forest
            .metrics
            .iter()
            .map(|m| {
                values
                    .iter()
                    .find(|(n, v)| n == m && v.is_finite())
                    .map(|(_, v)| *v)
            })
            .collect::<Option<Vec<f64>>>()
        else {
            return;
        };
        if forest.raw.len() == FEATURE_WINDOW {
            forest.raw.pop_front();
        }
        forest.raw.push_back(vector.clone());
        let Ok(Some(features)) = forest.features.push(&vector) else {
            return;
        };
        let model = if shared_mode {
            shared
                .filter(|s| *s.metrics == forest.metrics)
                .and_then(|s| s.model.as_ref())
        } else {
            forest.model.as_ref()
        };
        if let Some(model) = model
            && let Ok(verdict) = model.verdict(&features)
        {
            note_score(out, Method::Eif, verdict.score);
            let mut named = false;
            if verdict.anomalous {
                let deviations = model.deviations(&features);
                let m = forest.metrics.len();
                let mut per_metric: Vec<(usize, f64)> = (0..m)
                    .map(|i| {
                        let worst = (0..FEATURES_PER_METRIC)
                            .filter_map(|k| deviations.get(k * m + i))
                            .fold(0.0_f64, |a, b| a.max(*b));
                        (i, worst)
                    })
                    .collect();
                per_metric.sort_by(|a, b| b.1.total_cmp(&a.1));
                let top = per_metric[0].1;
                let metrics: Vec<String> = per_metric
                    .iter()
                    .filter(|(_, d)| *d >= top / 2.0)
                    .map(|(i, _)| forest.metrics[*i].clone())
                    .collect();
                let value = per_metric.first().map(|(i, _)| vector[*i]);
                note_statistic(
                    out,
                    Method::Eif,
                    &verdict,
                    metrics.first().map(String::as_str),
                    value,
                );
                named = true;
                out.events.push(AnalyticsEvent {
                    kind: EventKind::Anomaly,
                    ts_ms,
                    method: Method::Eif,
                    score: verdict.score,
                    statistic: verdict.statistic,
                    metrics,
                    value,
                });
            }
            if !named {
                note_statistic(out, Method::Eif, &verdict, None, None);
            }
        }
        if shared_mode {
            out.features = Some(features);
            return;
        }
        if forest.recent.len() == training_size {
            forest.recent.pop_front();
        }
        forest.recent.push_back(features);
        let due = !forest.in_flight
            && forest.recent.len() >= training_size
            && match forest.trained_at_ms {
                None => true,
                Some(at) => ts_ms - at >= interval,
            };
        if due {
            forest.in_flight = true;
            forest.trained_at_ms = Some(ts_ms);
            forest.generation += 1;
            out.training = Some(TrainingJob {
                generation: forest.generation,
                features: Arc::new(forest.recent.iter().cloned().collect()),
                options,
            });
        }
    }

    /// Installs the forest trained for `job` (a result for an older generation is ignored);
    /// `None` when the training failed, so the next message may try again.
    pub fn install(&mut self, job: &TrainingJob, model: Option<IsolationModel>) {
        let Some(forest) = self.forest.as_mut() else {
            return;
        };
        if job.generation != forest.generation {
            return;
        }
        forest.in_flight = false;
        match model {
            Some(model) => {
                forest.model = Some(Arc::new(model));
                forest.model_training = Some(job.features.clone());
            }
            None => forest.trained_at_ms = None,
        }
    }

    /// What a restart needs.
    pub fn snapshot(&self) -> MonitorSnapshot {
        MonitorSnapshot {
            metrics: self
                .metrics
                .iter()
                .map(|(name, m)| (name.clone(), m.recent.iter().copied().collect()))
                .collect(),
            forest: self.forest.as_ref().map(|f| ForestSnapshot {
                metrics: f.metrics.clone(),
                raw: f.raw.iter().cloned().collect(),
                training: f.model_training.as_ref().map(|t| t.to_vec()).unwrap_or_default(),
                seed: self.settings.seed,
                trees: self.settings.trees,
                trained_at_ms: f.trained_at_ms,
            }),
            type_forest: None,
        }
    }

    /// A monitor as it was at `snapshot`: detectors replayed over each metric's recent values,
    /// and the forest's training job (same set and seed, so the same forest) to run before it
    /// scores again.
    pub fn restore(settings: MonitorSettings, snapshot: &MonitorSnapshot) -> (Self, Option<TrainingJob>) {
        let mut monitor = DeviceMonitor::new(settings);
        for (name, values) in &snapshot.metrics {
            if !monitor.settings.watches(name) {
                continue;
            }
            let mut m = MetricMonitor::new(&monitor.settings);
            for &v in values.iter().rev().take(monitor.settings.window).rev() {
                for d in &mut m.detectors {
                    d.observe(v);
                }
                m.remember(v, monitor.settings.window);
            }
            monitor.metrics.insert(name.clone(), m);
        }
        let mut job = None;
        if let Some(f) = &snapshot.forest
            && monitor.settings.methods.contains(&Method::Eif)
            && !f.metrics.is_empty()
            && f.metrics.len() <= FOREST_METRICS
        {
            let mut state = ForestState::new(f.metrics.clone());
            for raw in &f.raw {
                if raw.len() == f.metrics.len() {
                    if state.raw.len() == FEATURE_WINDOW {
                        state.raw.pop_front();
                    }
                    state.raw.push_back(raw.clone());
                    let _ = state.features.push(raw);
                }
            }
            let width = f.metrics.len() * FEATURES_PER_METRIC;
            if !monitor.settings.shared_forest
                && !f.training.is_empty()
                && f.training.iter().all(|v| v.len() == width)
            {
                state.recent = f.training.iter().cloned().collect();
                state.generation = 1;
                state.in_flight = true;
                state.trained_at_ms = f.trained_at_ms;
                let options = IsolationOptions {
                    seed: f.seed,
                    trees: f.trees,
                    ..monitor.forest_options()
                };
                job = Some(TrainingJob {
                    generation: 1,
                    features: Arc::new(f.training.clone()),
                    options,
                });
            }
            monitor.forest = Some(state);
        }
        (monitor, job)
    }
}

impl ForestState {
    fn new(metrics: Vec<String>) -> Self {
        let n = metrics.len();
        ForestState {
            metrics,
            // `n` is within 1..=FOREST_METRICS here, which FeatureBuilder accepts.
            features: FeatureBuilder::new(n, FEATURE_WINDOW).unwrap_or_else(|_| unreachable_builder()),
            raw: VecDeque::with_capacity(FEATURE_WINDOW),
            recent: VecDeque::new(),
            model: None,
            model_training: None,
            trained_at_ms: None,
            generation: 0,
            in_flight: false,
        }
    }
}

fn unreachable_builder() -> FeatureBuilder {
    // One metric always builds.
    FeatureBuilder::new(1, FEATURE_WINDOW).expect("one metric is a valid feature builder")
}

fn note_score(out: &mut Observation, method: Method, score: f64) {
    let score = if score.is_finite() { score } else { f64::MAX };
    out.score = Some(out.score.map_or(score, |s: f64| s.max(score)));
    match out.scores.iter_mut().find(|(m, _)| *m == method) {
        Some((_, s)) => *s = s.max(score),
        None => out.scores.push((method, score)),
    }
}

/// Keeps, per method, the message's largest statistic (absolute) with its metric and value.
fn note_statistic(
    out: &mut Observation,
    method: Method,
    verdict: &super::detector::Verdict,
    metric: Option<&str>,
    value: Option<f64>,
) {
    let statistic = if verdict.statistic.is_finite() {
        verdict.statistic.abs()
    } else {
        f64::MAX
    };
    let score = if verdict.score.is_finite() {
        verdict.score
    } else {
        f64::MAX
    };
    let entry = MethodScore {
        method,
        statistic,
        score,
        metric: metric.map(str::to_string),
        value,
    };
    match out.statistics.iter_mut().find(|s| s.method == method) {
        Some(s) if s.statistic < statistic => *s = entry,
        Some(_) => {}
        None => out.statistics.push(entry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(i: usize) -> (f64, f64) {
        let t = 20.0 + (i as f64 * 0.3).sin() + ((i * 7919) % 13) as f64 / 30.0;
        let h = 50.0 - 2.0 * (i as f64 * 0.3).sin() + ((i * 104_729) % 11) as f64 / 20.0;
        (t, h)
    }

    fn settings() -> MonitorSettings {
        MonitorSettings {
            methods: vec![Method::Ensemble, Method::Eif, Method::Drift],
            training_size: 200,
            window: 50,
            warm_up: 50,
            shared_forest: false,
            ..MonitorSettings::default()
        }
    }

    /// Feeds `n` messages, training inline (the actor does it on a blocking pool).
    fn feed(monitor: &mut DeviceMonitor, from: usize, n: usize) -> Vec<Observation> {
        (from..from + n)
            .map(|i| {
                let (t, h) = series(i);
                let mut o = monitor.observe(i as i64 * 1000, &[("temperature", t), ("humidity", h)]);
                if let Some(job) = o.training.take() {
                    let model = job.run().ok();
                    monitor.install(&job, model);
                }
                o
            })
            .collect()
    }

    #[test]
    fn warms_up_trains_then_flags_a_spike_with_its_metric() {
        let mut monitor = DeviceMonitor::new(settings());
        let early = feed(&mut monitor, 0, 300);
        assert!(early[..49].iter().all(|o| o.score.is_none()));
        assert!(monitor.has_model());
        let o = monitor.observe(300_000, &[("temperature", 60.0), ("humidity", 50.0)]);
        let eif = o
            .events
            .iter()
            .find(|e| e.method == Method::Eif)
            .expect("forest flags it");
        assert_eq!(eif.metrics[0], "temperature");
        assert!(o.events.iter().any(|e| e.method == Method::Ensemble));
        assert!(o.score.unwrap() >= 1.0);
    }

    /// The forest comes back exactly, windowed detectors to rounding; the EWMA and drift detectors, whose
    /// state is not windowed, re-learn from the replayed window instead.
    #[test]
    fn restart_from_a_snapshot_scores_like_before() {
        let settings = || MonitorSettings {
            methods: vec![Method::ZScore, Method::Mad, Method::Eif],
            ..settings()
        };
        let mut monitor = DeviceMonitor::new(settings());
        feed(&mut monitor, 0, 300);
        let snapshot = monitor.snapshot();
        let json = serde_json::to_string(&snapshot).unwrap();
        let snapshot: MonitorSnapshot = serde_json::from_str(&json).unwrap();
        let (mut restored, job) = DeviceMonitor::restore(settings(), &snapshot);
        let job = job.expect("the forest is retrained from its set");
        let model = job.run().ok();
        restored.install(&job, model);
        for i in 300..340 {
            let (t, h) = series(i);
            let values = [("temperature", t), ("humidity", h)];
            let a = monitor.observe(i as i64 * 1000, &values);
            let b = restored.observe(i as i64 * 1000, &values);
            let eif = |o: &Observation| o.scores.iter().find(|(m, _)| *m == Method::Eif).map(|s| s.1);
            assert_eq!(eif(&a), eif(&b), "message {i}");
            assert!(eif(&a).is_some());
            for method in [Method::ZScore, Method::Mad] {
                let score = |o: &Observation| o.scores.iter().find(|(m, _)| *m == method).map(|s| s.1);
                let (a, b) = (score(&a).unwrap(), score(&b).unwrap());
                // Running sums differ from a replay's in the last bits only.
                assert!(
                    (a - b).abs() <= 1e-9 * a.abs().max(1.0),
                    "{method:?}, message {i}: {a} {b}"
                );
            }
        }
    }

    #[test]
    fn retrains_on_message_time_and_ignores_stale_results() {
        let mut monitor = DeviceMonitor::new(MonitorSettings {
            retrain_interval_ms: 100_000,
            ..settings()
        });
        let mut trainings = Vec::new();
        for i in 0..520 {
            let (t, h) = series(i);
            if let Some(job) = monitor
                .observe(i as i64 * 1000, &[("temperature", t), ("humidity", h)])
                .training
            {
                trainings.push(i);
                let model = job.run().ok();
                monitor.install(&job, model);
            }
        }
        // The first vector comes at message 9, the set is full at 208; then every 100 s.
        assert_eq!(trainings, vec![208, 308, 408, 508]);
        // A job from generation 1 arriving after generation 2 started is ignored.
        let mut m = DeviceMonitor::new(settings());
        let mut jobs = Vec::new();
        for i in 0..260 {
            let (t, h) = series(i);
            if let Some(job) = m
                .observe(i as i64 * 1000, &[("temperature", t), ("humidity", h)])
                .training
            {
                jobs.push(job);
            }
        }
        assert_eq!(jobs.len(), 1, "one training in flight at a time");
        m.install(
            &TrainingJob {
                generation: 7,
                ..jobs[0].clone()
            },
            jobs[0].run().ok(),
        );
        assert!(!m.has_model());
        m.install(&jobs[0], jobs[0].run().ok());
        assert!(m.has_model());
    }

    #[test]
    fn a_shared_forest_scores_every_device_of_the_type_and_keeps_no_training_set() {
        let shared_settings = || MonitorSettings {
            shared_forest: true,
            ..settings()
        };
        let mut a = DeviceMonitor::new(shared_settings());
        let mut pool = Vec::new();
        for i in 0..300 {
            let (t, h) = series(i);
            let o = a.observe_shared(i as i64 * 1000, &[("temperature", t), ("humidity", h)], None);
            assert!(o.training.is_none(), "the type trains, not the device");
            pool.extend(o.features);
        }
        assert_eq!(pool.len(), 300 - 9, "a vector once the rolling window is full");
        assert!(a.snapshot().forest.unwrap().training.is_empty());
        let job = TrainingJob {
            generation: 1,
            features: Arc::new(pool[pool.len() - 200..].to_vec()),
            options: a.forest_options(),
        };
        let shared = SharedForest {
            metrics: Arc::new(a.forest_metrics().unwrap().to_vec()),
            model: Some(Arc::new(job.run().unwrap())),
        };
        // A new device of the type scores with it once its rolling window is full, and flags a
        // spike with its metric.
        let mut b = DeviceMonitor::new(shared_settings());
        for i in 0..20 {
            let (t, h) = series(i);
            let o = b.observe_shared(
                i as i64 * 1000,
                &[("humidity", h), ("temperature", t)],
                Some(&shared),
            );
            let eif = o.statistics.iter().any(|s| s.method == Method::Eif);
            assert_eq!(eif, i >= 9, "message {i}");
        }
        let o = b.observe_shared(
            20_000,
            &[("temperature", 60.0), ("humidity", 50.0)],
            Some(&shared),
        );
        let eif = o
            .events
            .iter()
            .find(|e| e.method == Method::Eif)
            .expect("flagged");
        assert_eq!(eif.metrics[0], "temperature");
        // A device with other metrics does not use the type's forest.
        let mut c = DeviceMonitor::new(shared_settings());
        for i in 0..20 {
            let o = c.observe_shared(i as i64 * 1000, &[("pressure", 1.0 + i as f64)], Some(&shared));
            assert!(o.scores.iter().all(|(m, _)| *m != Method::Eif));
        }
    }

    #[test]
    fn unwatched_and_disabled() {
        let mut monitor = DeviceMonitor::new(MonitorSettings {
            metrics: Some(vec!["humidity".into()]),
            ..settings()
        });
        feed(&mut monitor, 0, 60);
        assert_eq!(
            monitor.snapshot().metrics.keys().collect::<Vec<_>>(),
            vec!["humidity"]
        );
        let mut off = DeviceMonitor::new(MonitorSettings {
            enabled: false,
            ..settings()
        });
        assert!(feed(&mut off, 0, 300).iter().all(|o| o.score.is_none()));
    }
}
