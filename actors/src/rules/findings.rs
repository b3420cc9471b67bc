//! What the live analytics hand to the rules engine, and what the rules engine asks of them.
//!
//! `anomaly` and `forecast` rule conditions are judged on the analytics' results, not on raw
//! telemetry: the tenant's `AnalyticsActor` scores every message, and when the tenant has rules
//! that need it ([`AnalyticsDemand`], set by the rule actor each time it loads the rules) it
//! sends an [`AnalyticsFindings`] to the `RuleRouter`, which routes it like telemetry (bounded,
//! dropped and counted when the tenant's queue is full) to the rule worker judging that tenant.
//! Both actors run on the node that owns the device (DESIGN.md §9), so nothing crosses nodes.
//!
//! Forecasts are fitted by the analytics actor on the blocking pool, per (device, metric) at
//! most every [`FORECAST_INTERVAL_MS`] of server time, and only for the metrics a forecast rule
//! names; each rule then only compares the fitted forecast with its own limit.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use actix::Message;

use super::{ConditionSpec, RuleScope, RuleSpec};
use crate::analytics::detector::Method;
use crate::analytics::forecast::Forecast;
use crate::ids::{DeviceId, TenantId};

/// Server time between two forecast fits of one (device, metric): five minutes. A forecast
/// alarm therefore opens or clears at most this long after the data that justifies it.
pub const FORECAST_INTERVAL_MS: i64 = 5 * 60_000;

/// One method's verdict on one message.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodScore {
    pub method: Method,
    /// The method's own statistic, as an absolute value: standard deviations for `zscore`,
    /// `mad` and `ewma`; the normalised 0..1 score for `eif`; the threshold-relative score for
    /// `ensemble` (1.0 = the configured threshold).
    pub statistic: f64,
    /// Threshold-relative score (`>= 1` is what the analytics flag as anomalous).
    pub score: f64,
    /// The metric that gave the statistic (the most deviating one for `eif`), if known.
    pub metric: Option<String>,
    pub value: Option<f64>,
}

/// The verdicts on one message of a device.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredMessage {
    pub ts_ms: i64,
    pub scores: Vec<MethodScore>,
}

/// A forecast of one metric of a device, fitted on its recent values.
#[derive(Debug, Clone)]
pub struct ForecastFinding {
    pub metric: String,
    /// Time of the last value the forecast was fitted on.
    pub last_ts_ms: i64,
    pub last_value: f64,
    /// Spacing of the forecast's steps (step 1 is `last_ts_ms + step_ms`).
    pub step_ms: i64,
    pub forecast: Arc<Forecast>,
}

#[derive(Debug, Clone)]
pub enum Finding {
    /// The scores of the messages of one telemetry batch.
    Scored(Vec<ScoredMessage>),
    Forecast(ForecastFinding),
}

/// Analytics results for one device, for the tenant's `anomaly` and `forecast` rules.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct AnalyticsFindings {
    pub tenant: TenantId,
    pub device: DeviceId,
    pub device_type: String,
    pub finding: Finding,
}

/// A forecast some rule needs: `metric` of the devices in `scope`, far enough ahead to see
/// `within_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct ForecastNeed {
    pub metric: String,
    pub within_ms: i64,
    pub scope: RuleScope,
}

/// What one tenant's enabled rules need from the analytics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantDemand {
    /// Scopes of the `anomaly` rules (scores are sent for devices in any of them).
    pub anomaly: Vec<RuleScope>,
    pub forecasts: Vec<ForecastNeed>,
}

impl TenantDemand {
    /// What `rules` need.
    pub fn of(rules: &[RuleSpec]) -> TenantDemand {
        let mut demand = TenantDemand::default();
        for rule in rules.iter().filter(|r| r.enabled) {
            match &rule.condition {
                ConditionSpec::Anomaly { .. } => demand.anomaly.push(rule.scope.clone()),
                ConditionSpec::Forecast {
                    metric, within_ms, ..
                } => demand.forecasts.push(ForecastNeed {
                    metric: metric.clone(),
                    within_ms: *within_ms,
                    scope: rule.scope.clone(),
                }),
                _ => {}
            }
        }
        demand
    }

    pub fn is_empty(&self) -> bool {
        self.anomaly.is_empty() && self.forecasts.is_empty()
    }

    /// Whether scores of `device` are wanted.
    pub fn wants_scores(&self, device: &DeviceId, device_type: &str) -> bool {
        self.anomaly.iter().any(|s| s.matches(device, device_type))
    }

    /// The metrics of `device` to forecast, each with the longest look-ahead a rule needs.
    pub fn forecasts_for(&self, device: &DeviceId, device_type: &str) -> HashMap<&str, i64> {
        let mut out: HashMap<&str, i64> = HashMap::new();
        for need in &self.forecasts {
            if need.scope.matches(device, device_type) {
                let within = out.entry(need.metric.as_str()).or_insert(0);
                *within = (*within).max(need.within_ms);
            }
        }
        out
    }
}

/// Every tenant's [`TenantDemand`], shared by the rule actors (writers) and the analytics
/// actors (readers, once per telemetry batch).
#[derive(Debug, Default)]
pub struct AnalyticsDemand {
    tenants: RwLock<HashMap<TenantId, Arc<TenantDemand>>>,
}

impl AnalyticsDemand {
    pub fn set(&self, tenant: &TenantId, demand: TenantDemand) {
        let mut tenants = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        if demand.is_empty() {
            tenants.remove(tenant);
        } else {
            tenants.insert(tenant.clone(), Arc::new(demand));
        }
    }

    /// `None` when the tenant has no rule that needs analytics.
    pub fn get(&self, tenant: &TenantId) -> Option<Arc<TenantDemand>> {
        self.tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .cloned()
    }
}
