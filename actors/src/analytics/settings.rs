//! What the live analytics do for a device: which metrics, which methods, window, warm-up,
//! thresholds, training size and retraining interval.
//!
//! Configuration comes in layers, each optional field by field: the built-in defaults, then the
//! tenant's, then the device type's, then the device's own ([`AnalyticsConfig::overlay`]). No
//! configuration at all gives [`MonitorSettings::default`]: every numeric metric, the
//! univariate ensemble, the isolation forest and drift detection. The forest is one per device
//! type by default, trained on the type's devices together and shared by them: a trained forest
//! of 100 trees holds megabytes (measured by `actors/tests/forest_memory.rs`, figures in
//! README), which one per device type costs once and one per device (`"forestPer": "device"`,
//! for the machines worth it) costs for every device.

use serde::{Deserialize, Serialize};

use super::AnalyticsError;
use super::detector::{DEFAULT_THRESHOLD, DEFAULT_WINDOW, Method};
use super::isolation::{DEFAULT_EIF_THRESHOLD, DEFAULT_SEED, MAX_METRICS};

/// One layer of configuration; a missing field takes the layer below.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnalyticsConfig {
    /// `false` turns live analytics off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Metrics to watch; absent or empty: every numeric metric.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Vec<String>>,
    /// Among `zscore`, `mad`, `ewma`, `ensemble`, `eif`, `drift`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Values in the sliding window of the z-score and MAD detectors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
    /// Values a detector sees before it scores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_up: Option<usize>,
    /// Standard deviations from which a value is anomalous (`ANOMALY_THRESHOLD`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Normalised isolation-forest score (0..1) from which a message is anomalous.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eif_threshold: Option<f64>,
    /// Feature vectors the forest is trained on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_size: Option<usize>,
    /// Seconds (of message time) between retrainings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrain_interval_secs: Option<u64>,
    /// Trees of the forest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trees: Option<usize>,
    /// Seed of the forest's random draws.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `deviceType` (default): one forest per device type, trained on the type's devices
    /// together and shared by them; `device`: a forest of its own per device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forest_per: Option<String>,
}

impl AnalyticsConfig {
    /// `self` with every field `over` sets replaced.
    pub fn overlay(&self, over: &AnalyticsConfig) -> AnalyticsConfig {
        AnalyticsConfig {
            enabled: over.enabled.or(self.enabled),
            metrics: over.metrics.clone().or_else(|| self.metrics.clone()),
            methods: over.methods.clone().or_else(|| self.methods.clone()),
            window: over.window.or(self.window),
            warm_up: over.warm_up.or(self.warm_up),
            threshold: over.threshold.or(self.threshold),
            eif_threshold: over.eif_threshold.or(self.eif_threshold),
            training_size: over.training_size.or(self.training_size),
            retrain_interval_secs: over.retrain_interval_secs.or(self.retrain_interval_secs),
            trees: over.trees.or(self.trees),
            seed: over.seed.or(self.seed),
            forest_per: over.forest_per.clone().or_else(|| self.forest_per.clone()),
        }
    }

    /// Checks every field set; the error names the field.
    pub fn validate(&self) -> Result<(), AnalyticsError> {
        fn bad(name: &'static str, reason: impl Into<String>) -> AnalyticsError {
            AnalyticsError::InvalidParameter {
                name,
                reason: reason.into(),
            }
        }
        if let Some(methods) = &self.methods {
            for m in methods {
                m.parse::<Method>()?;
            }
        }
        if let Some(metrics) = &self.metrics {
            if metrics.len() > 64 {
                return Err(bad("metrics", "at most 64 metrics"));
            }
            if let Some(m) = metrics.iter().find(|m| m.is_empty() || m.len() > 128) {
                return Err(bad("metrics", format!("{m:?} is not a metric name")));
            }
        }
        if let Some(w) = self.window
            && !(5..=10_000).contains(&w)
        {
            return Err(bad("window", format!("{w}: expected 5 to 10000 values")));
        }
        if let Some(w) = self.warm_up
            && !(2..=10_000).contains(&w)
        {
            return Err(bad("warmUp", format!("{w}: expected 2 to 10000 values")));
        }
        if let Some(t) = self.threshold
            && !(t.is_finite() && t > 0.0 && t <= 100.0)
        {
            return Err(bad(
                "threshold",
                format!("{t}: expected a number above 0 and at most 100"),
            ));
        }
        if let Some(t) = self.eif_threshold
            && !(t.is_finite() && t > 0.0 && t <= 1.0)
        {
            return Err(bad(
                "eifThreshold",
                format!("{t}: expected a number above 0 and at most 1"),
            ));
        }
        if let Some(n) = self.training_size
            && !(32..=5_000).contains(&n)
        {
            return Err(bad("trainingSize", format!("{n}: expected 32 to 5000 vectors")));
        }
        if let Some(s) = self.retrain_interval_secs
            && !(60..=30 * 86_400).contains(&s)
        {
            return Err(bad(
                "retrainIntervalSecs",
                format!("{s}: expected 60 to 2592000 seconds"),
            ));
        }
        if let Some(t) = self.trees
            && !(1..=500).contains(&t)
        {
            return Err(bad("trees", format!("{t}: expected 1 to 500 trees")));
        }
        if let Some(p) = &self.forest_per
            && p != "deviceType"
            && p != "device"
        {
            return Err(bad("forestPer", format!("{p:?}: expected deviceType or device")));
        }
        Ok(())
    }

    /// The settings this configuration gives (validated first).
    pub fn resolve(&self) -> Result<MonitorSettings, AnalyticsError> {
        self.validate()?;
        let d = MonitorSettings::default();
        let methods = match &self.methods {
            Some(m) => m.iter().map(|m| m.parse()).collect::<Result<Vec<Method>, _>>()?,
            None => d.methods.clone(),
        };
        Ok(MonitorSettings {
            enabled: self.enabled.unwrap_or(d.enabled),
            metrics: self.metrics.clone().filter(|m| !m.is_empty()),
            methods,
            window: self.window.unwrap_or(d.window),
            warm_up: self.warm_up.unwrap_or(d.warm_up),
            threshold: self.threshold.unwrap_or(d.threshold),
            eif_threshold: self.eif_threshold.unwrap_or(d.eif_threshold),
            training_size: self.training_size.unwrap_or(d.training_size),
            retrain_interval_ms: self
                .retrain_interval_secs
                .map_or(d.retrain_interval_ms, |s| s as i64 * 1000),
            trees: self.trees.unwrap_or(d.trees),
            seed: self.seed.unwrap_or(d.seed),
            shared_forest: self
                .forest_per
                .as_deref()
                .map_or(d.shared_forest, |p| p != "device"),
        })
    }
}

/// Resolved settings of one device's monitor.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorSettings {
    pub enabled: bool,
    /// `None`: every numeric metric (the forest takes the first [`MAX_METRICS`] by name).
    pub metrics: Option<Vec<String>>,
    pub methods: Vec<Method>,
    pub window: usize,
    pub warm_up: usize,
    pub threshold: f64,
    pub eif_threshold: f64,
    pub training_size: usize,
    pub retrain_interval_ms: i64,
    pub trees: usize,
    pub seed: u64,
    /// One forest per device type, shared by its devices (`forestPer: deviceType`), rather
    /// than one per device.
    pub shared_forest: bool,
}

impl Default for MonitorSettings {
    fn default() -> Self {
        MonitorSettings {
            enabled: true,
            metrics: None,
            methods: vec![Method::Ensemble, Method::Eif, Method::Drift],
            window: DEFAULT_WINDOW,
            warm_up: DEFAULT_WINDOW,
            threshold: DEFAULT_THRESHOLD,
            eif_threshold: DEFAULT_EIF_THRESHOLD,
            training_size: 500,
            retrain_interval_ms: 6 * 3_600_000,
            trees: 100,
            seed: DEFAULT_SEED,
            shared_forest: true,
        }
    }
}

impl MonitorSettings {
    /// Whether `metric` is watched.
    pub fn watches(&self, metric: &str) -> bool {
        self.metrics
            .as_ref()
            .is_none_or(|m| m.iter().any(|n| n == metric))
    }

    /// The default with `threshold` (the `ANOMALY_THRESHOLD` setting).
    pub fn with_threshold(threshold: f64) -> Self {
        MonitorSettings {
            threshold,
            ..MonitorSettings::default()
        }
    }
}

/// At most this many metrics go into one device's forest.
pub const FOREST_METRICS: usize = MAX_METRICS;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_overlay_field_by_field() {
        let tenant = AnalyticsConfig {
            threshold: Some(4.0),
            window: Some(50),
            ..Default::default()
        };
        let device = AnalyticsConfig {
            threshold: Some(2.5),
            methods: Some(vec!["mad".into()]),
            ..Default::default()
        };
        let s = tenant.overlay(&device).resolve().unwrap();
        assert_eq!(s.threshold, 2.5);
        assert_eq!(s.window, 50);
        assert_eq!(s.methods, vec![Method::Mad]);
        assert_eq!(s.training_size, 500);
        assert_eq!(
            AnalyticsConfig::default().resolve().unwrap(),
            MonitorSettings::default()
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (r#"{"window": 2}"#, "window"),
            (r#"{"threshold": 0}"#, "threshold"),
            (r#"{"eifThreshold": 1.5}"#, "eifThreshold"),
            (r#"{"methods": ["prophet"]}"#, "method"),
            (r#"{"trainingSize": 5}"#, "trainingSize"),
            (r#"{"retrainIntervalSecs": 1}"#, "retrainIntervalSecs"),
            (r#"{"trees": 0}"#, "trees"),
            (r#"{"forestPer": "tenant"}"#, "forestPer"),
        ];
        for (json, field) in cases {
            let config: AnalyticsConfig = serde_json::from_str(json).unwrap();
            match config.validate() {
                Err(AnalyticsError::InvalidParameter { name, .. }) => assert_eq!(name, field, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
        assert!(serde_json::from_str::<AnalyticsConfig>(r#"{"colour": 1}"#).is_err());
    }
}
