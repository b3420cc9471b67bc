//! The rules engine's domain: what a rule is once validated ([`RuleSpec`]), what evaluating it
//! produces ([`AlarmSignal`]), and what the engine needs from the rest of the platform
//! ([`RuleSource`] to load rules, [`DesiredStatePatcher`] to act on device shadows).
//!
//! The pure parts live beside this file: `script` (the rhai sandbox), `window` (window
//! statistics), `evaluator` (per-tenant state machines), `condition` (each condition type) and
//! `stats` (per-rule counters). `RuleActor` and `RuleRouter` only add mailboxes and timers
//! around them.

mod condition;
pub mod evaluator;
pub mod findings;
mod index;
pub mod names;
pub mod native;
pub mod script;
pub mod seen_metrics;
pub mod stats;
pub mod window;

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{DeviceId, TenantId};

/// A small deterministic random source for the rules' randomised tests: `next(n)` is in `0..n`
/// (xorshift; the same seed gives the same sequence).
#[cfg(test)]
pub(crate) fn test_random(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}

/// Alarm severity, lowest first (so `max` is the more severe one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Minor,
    Major,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Minor => "minor",
            Severity::Major => "major",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(value: &str) -> Option<Severity> {
        match value.to_ascii_lowercase().as_str() {
            "warning" => Some(Severity::Warning),
            "minor" => Some(Severity::Minor),
            "major" => Some(Severity::Major),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// Which devices a rule watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleScope {
    All,
    DeviceType(String),
    /// Devices of a group (`members` resolved by the [`RuleSource`] when rules are loaded).
    Group {
        name: String,
        members: Arc<HashSet<DeviceId>>,
    },
    /// Devices with a tag (resolved like groups).
    Tag {
        tag: String,
        members: Arc<HashSet<DeviceId>>,
    },
    Device(DeviceId),
}

impl RuleScope {
    pub fn matches(&self, device: &DeviceId, device_type: &str) -> bool {
        match self {
            RuleScope::All => true,
            RuleScope::DeviceType(t) => t == device_type,
            RuleScope::Group { members, .. } | RuleScope::Tag { members, .. } => members.contains(device),
            RuleScope::Device(d) => d == device,
        }
    }
}

/// When a rule fires.
#[derive(Debug, Clone, PartialEq)]
pub enum ConditionSpec {
    /// The expression holds for a message.
    Expression { expression: String },
    /// The expression held on every message for at least `for_ms`.
    Duration { expression: String, for_ms: i64 },
    /// The expression held on `count` messages within `within_ms`.
    Repeating {
        expression: String,
        count: u32,
        within_ms: i64,
    },
    /// `|z| = |current - avg| / std` over the window exceeds `threshold` (the server's
    /// `ANOMALY_THRESHOLD` when `None`), once the window has `min_samples` values.
    Statistical {
        threshold: Option<f64>,
        min_samples: u32,
    },
    /// `first` held on a message, then `then` held on a later message of the same device
    /// within `within_ms`.
    Pattern {
        first: String,
        then: String,
        within_ms: i64,
    },
    /// The expression held on at least `min_devices` distinct devices within `within_ms`.
    Group {
        expression: String,
        min_devices: u32,
        within_ms: i64,
    },
    /// No telemetry from a device for `for_ms` (it clears when telemetry arrives).
    Absence { for_ms: i64 },
    /// The live analytics' `method` scored a message at `threshold` or more (in the method's
    /// unit, see [`findings::MethodScore::statistic`]; `None`: the analytics' own flag). Judged
    /// on the analytics' scores, not on telemetry; clears once the score stayed under the
    /// threshold for `clear_after_ms`.
    Anomaly {
        method: crate::analytics::detector::Method,
        threshold: Option<f64>,
        clear_after_ms: i64,
    },
    /// The forecast of `metric` crosses `limit` (`direction`) within `within_ms` of its last
    /// value. Judged on the forecasts the analytics fit (every
    /// [`findings::FORECAST_INTERVAL_MS`]); clears when a later forecast no longer crosses in
    /// time.
    Forecast {
        metric: String,
        limit: f64,
        direction: crate::analytics::forecast::Direction,
        within_ms: i64,
    },
}

impl ConditionSpec {
    /// Whether the condition's state spans devices (group, absence): in a cluster such a rule is
    /// judged on one node at a time, which sees the telemetry of every node (see [`Spanning`]).
    pub fn spans_devices(&self) -> bool {
        matches!(self, ConditionSpec::Group { .. } | ConditionSpec::Absence { .. })
    }
}

/// Which of a tenant's rules judge an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judge {
    /// Every rule (a single node, or the node that judges the tenant's spanning rules).
    All,
    /// Per-device rules only: the event's spanning rules are judged on another node.
    PerDevice,
    /// Spanning rules only: an event forwarded by the device's owner node.
    Spanning,
}

impl Judge {
    pub fn admits(self, spec: &RuleSpec) -> bool {
        match self {
            Judge::All => true,
            Judge::PerDevice => !spec.condition.spans_devices(),
            Judge::Spanning => spec.condition.spans_devices(),
        }
    }
}

/// Where a tenant's rules whose state spans devices (group, absence) are judged in a cluster:
/// on the node holding the tenant's lease, to which the other nodes forward their devices'
/// telemetry. A single node has none of this and judges everything itself.
pub trait Spanning: Send + Sync {
    /// Whether this node judges the tenant's spanning rules now (called for every event).
    fn judged_here(&self, tenant: &TenantId) -> bool;
    /// The tenant has (`true`) or no longer has enabled spanning rules: contend for their lease
    /// or give it up.
    fn want(&self, tenant: &TenantId, wanted: bool);
    /// Hands an event (arrived at `now_ms`) to the node that judges the tenant's spanning rules.
    fn forward(&self, event: &crate::pipeline::TelemetryAccepted, now_ms: i64);
}

/// When an active alarm clears by itself: `expression` held (continuously for `for_ms`).
/// For group conditions, any clear spec means "when fewer than `min_devices` hold".
#[derive(Debug, Clone, PartialEq)]
pub struct ClearSpec {
    pub expression: String,
    pub for_ms: i64,
}

/// A validated rule as the evaluator runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleSpec {
    pub id: String,
    pub tenant: TenantId,
    pub name: String,
    pub enabled: bool,
    pub severity: Severity,
    /// The metric `current` stands for (and the one statistical conditions score).
    pub metric: Option<String>,
    /// Span of the window statistics (`metrics.<name>.avg`…), in milliseconds.
    pub window_ms: i64,
    pub condition: ConditionSpec,
    pub clear: Option<ClearSpec>,
    pub scope: RuleScope,
}

/// What evaluation asks the alarm service to do.
#[derive(Debug, Clone, PartialEq)]
pub enum AlarmChange {
    /// Open the alarm, or update it (count, last seen, severity) when it is already active.
    /// `occurrences`: how many times the condition held since the last report (repeats of an
    /// active alarm are reported once per tick, or at once when the severity rises).
    Raise {
        severity: Severity,
        value: Option<f64>,
        occurrences: u32,
    },
    /// The clear condition held (or telemetry came back for an absence alarm); `repeats` are
    /// occurrences not reported yet.
    Clear { repeats: u32 },
}

/// One alarm change of one (device, rule).
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmSignal {
    pub tenant: TenantId,
    pub device: DeviceId,
    pub rule_id: String,
    pub rule_name: String,
    pub change: AlarmChange,
    /// Server time the condition was evaluated at.
    pub at_ms: i64,
    /// What the rule saw (message metrics, z-score, group members…), for people.
    pub details: Value,
}

/// Where rule actors get their rules from (the registry in the application).
#[async_trait]
pub trait RuleSource: Send + Sync {
    /// The enabled and disabled rules of a tenant, scopes resolved.
    async fn tenant_rules(&self, tenant: &TenantId) -> Result<Vec<RuleSpec>, String>;
    /// The (device, rule id) pairs that have an active alarm, so evaluation resumes where it was.
    async fn active_alarms(&self, tenant: &TenantId) -> Result<Vec<(DeviceId, String)>, String>;
    /// Devices of the tenant connected to any node now, with their type: a node that takes over
    /// the tenant's absence rules watches them from then on.
    async fn connected_devices(&self, _tenant: &TenantId) -> Result<Vec<(DeviceId, String)>, String> {
        Ok(Vec::new())
    }
}

/// Applies a desired-state patch to a device's shadow (the "shadow patch" rule action).
#[async_trait]
pub trait DesiredStatePatcher: Send + Sync {
    async fn patch_desired(&self, tenant: &TenantId, device: &DeviceId, patch: Value) -> Result<(), String>;
}
