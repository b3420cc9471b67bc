//! The condition types of a rule (expression, duration, repeating, statistical, pattern, group,
//! absence) and how one of them judges one message: the per-(device, rule) state machines that
//! [`super::evaluator::TenantRules`] drives.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rhai::{Dynamic, Map, Scope};
use serde_json::{Value, json};

use super::findings::{AnalyticsFindings, Finding, MethodScore};
use super::native::{Operand, Predicate, Stat};
use super::script::{Expression, Sandbox, ScriptError, Verdict};
use super::stats::RuleStats;
use super::window::{MetricWindow, WindowStats};
use super::{AlarmChange, AlarmSignal, ConditionSpec, RuleSpec, Severity};
use crate::analytics::detector::Method;
use crate::analytics::forecast::{Direction, time_to_threshold};
use crate::ids::{DeviceId, TenantId};
use crate::pipeline::TelemetryAccepted;
use crate::telemetry::MetricValue;

pub(super) enum Condition {
    Expression(Expression),
    Duration {
        expr: Expression,
        for_ms: i64,
    },
    Repeating {
        expr: Expression,
        count: u32,
        within_ms: i64,
    },
    Statistical {
        threshold: f64,
        min_samples: u32,
    },
    Pattern {
        first: Expression,
        then: Expression,
        within_ms: i64,
    },
    Group {
        expr: Expression,
        min_devices: u32,
        within_ms: i64,
    },
    Absence {
        for_ms: i64,
    },
    Anomaly {
        method: Method,
        threshold: Option<f64>,
        clear_after_ms: i64,
    },
    Forecast {
        metric: String,
        limit: f64,
        direction: Direction,
        within_ms: i64,
    },
}

impl Condition {
    /// Judged on the analytics' findings rather than on telemetry.
    pub(super) fn on_findings(&self) -> bool {
        matches!(self, Condition::Anomaly { .. } | Condition::Forecast { .. })
    }
}

/// Where one (device, rule) stands.
#[derive(Debug, Default, Clone)]
pub(super) struct DeviceRuleState {
    pub(super) active: bool,
    /// Duration: since when the expression has held.
    pub(super) since: Option<i64>,
    /// Repeating: when it held, within the window.
    pub(super) hits: VecDeque<i64>,
    /// Pattern: when `first` last held.
    pub(super) first_at: Option<i64>,
    /// Clear with a duration: since when the clear expression has held.
    pub(super) clear_since: Option<i64>,
    /// The severity last reported for the active alarm.
    pub(super) severity: Option<Severity>,
    /// Repeats of the active alarm not reported yet (flushed on the next tick).
    pub(super) pending: Option<Pending>,
}

impl DeviceRuleState {
    /// Nothing to remember: the same as no state at all.
    pub(super) fn is_idle(&self) -> bool {
        !self.active
            && self.since.is_none()
            && self.hits.is_empty()
            && self.first_at.is_none()
            && self.clear_since.is_none()
            && self.severity.is_none()
            && self.pending.is_none()
    }
}

/// Repeats of an active alarm, coalesced so an alarm that holds on every message costs one
/// registry write per tick rather than one per message.
#[derive(Debug, Clone, Default)]
pub(super) struct Pending {
    pub(super) count: u32,
    pub(super) value: Option<f64>,
    pub(super) details: Value,
    pub(super) at_ms: i64,
}

#[derive(Debug, Default)]
pub(super) struct GroupState {
    pub(super) held_at: HashMap<DeviceId, i64>,
    /// The device the group alarm was raised on, while it is active.
    pub(super) active_device: Option<DeviceId>,
}

pub(super) struct CompiledRule {
    pub(super) spec: RuleSpec,
    pub(super) condition: Condition,
    pub(super) clear: Option<(Expression, i64)>,
    pub(super) stats: Arc<RuleStats>,
    pub(super) devices: HashMap<DeviceId, DeviceRuleState>,
    pub(super) group: GroupState,
    /// Judged as a member of a group of the evaluator's index, which counts its evaluations.
    pub(super) grouped: bool,
}

#[derive(Debug, Default)]
pub(super) struct DeviceState {
    pub(super) device_type: String,
    pub(super) last_seen_ms: i64,
    pub(super) windows: HashMap<String, MetricWindow>,
}

pub(super) fn compile_condition(
    sandbox: &Sandbox,
    spec: &RuleSpec,
    anomaly_threshold: f64,
) -> Result<Condition, ScriptError> {
    Ok(match &spec.condition {
        ConditionSpec::Expression { expression } => Condition::Expression(sandbox.compile(expression)?),
        ConditionSpec::Duration { expression, for_ms } => Condition::Duration {
            expr: sandbox.compile(expression)?,
            for_ms: *for_ms,
        },
        ConditionSpec::Repeating {
            expression,
            count,
            within_ms,
        } => Condition::Repeating {
            expr: sandbox.compile(expression)?,
            count: (*count).max(1),
            within_ms: *within_ms,
        },
        ConditionSpec::Statistical {
            threshold,
            min_samples,
        } => Condition::Statistical {
            threshold: threshold.unwrap_or(anomaly_threshold),
            min_samples: (*min_samples).max(2),
        },
        ConditionSpec::Pattern {
            first,
            then,
            within_ms,
        } => Condition::Pattern {
            first: sandbox.compile(first)?,
            then: sandbox.compile(then)?,
            within_ms: *within_ms,
        },
        ConditionSpec::Group {
            expression,
            min_devices,
            within_ms,
        } => Condition::Group {
            expr: sandbox.compile(expression)?,
            min_devices: (*min_devices).max(1),
            within_ms: *within_ms,
        },
        ConditionSpec::Absence { for_ms } => Condition::Absence { for_ms: *for_ms },
        ConditionSpec::Anomaly {
            method,
            threshold,
            clear_after_ms,
        } => Condition::Anomaly {
            method: *method,
            threshold: *threshold,
            clear_after_ms: *clear_after_ms,
        },
        ConditionSpec::Forecast {
            metric,
            limit,
            direction,
            within_ms,
        } => Condition::Forecast {
            metric: metric.clone(),
            limit: *limit,
            direction: *direction,
            within_ms: *within_ms,
        },
    })
}

pub(super) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Converts JSON to what scripts see (objects become maps).
pub fn json_to_dynamic(value: &Value) -> Dynamic {
    match value {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => Dynamic::from_float(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Array(items) => Dynamic::from_array(items.iter().map(json_to_dynamic).collect()),
        Value::Object(map) => Dynamic::from_map(
            map.iter()
                .map(|(k, v)| (k.as_str().into(), json_to_dynamic(v)))
                .collect::<Map>(),
        ),
    }
}

pub(super) fn metric_dynamic(value: &MetricValue) -> Dynamic {
    match value {
        MetricValue::Number(n) => Dynamic::from_float(*n),
        MetricValue::Bool(b) => Dynamic::from_bool(*b),
        MetricValue::Text(s) => Dynamic::from(s.clone()),
    }
}

/// One message of a batch as rules see it.
pub(super) struct Message<'a> {
    pub(super) event: &'a TelemetryAccepted,
    pub(super) metrics: Vec<(&'a str, &'a MetricValue)>,
}

impl Message<'_> {
    pub(super) fn value(&self, name: &str) -> Option<&MetricValue> {
        self.metrics.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    /// The variables every expression run on this message sees: its metrics (those named
    /// like identifiers), `device` and `deviceType`.
    fn scope(&self) -> Scope<'static> {
        let mut scope = Scope::new();
        for (name, value) in &self.metrics {
            if is_identifier(name) {
                scope.push_constant_dynamic(name.to_string(), metric_dynamic(value));
            }
        }
        scope.push_constant("device", self.event.device.as_str().to_string());
        scope.push_constant("deviceType", self.event.device_type.to_string());
        scope
    }

    /// The value a script's variable `name` reads: the last one pushed, should a batch hold
    /// the metric twice at one timestamp.
    fn last_value(&self, name: &str) -> Option<&MetricValue> {
        self.metrics
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    fn details(&self) -> Value {
        let metrics: serde_json::Map<String, Value> = self
            .metrics
            .iter()
            .map(|(n, v)| (n.to_string(), serde_json::to_value(v).unwrap_or(Value::Null)))
            .collect();
        json!({ "metrics": metrics })
    }
}

pub(super) struct EvalContext<'a> {
    pub(super) sandbox: &'a Sandbox,
    /// The message's variables, made when rhai first runs on this message; each evaluation
    /// pushes its extras and rewinds.
    scope: Option<Scope<'static>>,
    pub(super) message: &'a Message<'a>,
    pub(super) device: &'a DeviceState,
    pub(super) now_ms: i64,
    pub(super) metadata: Option<Dynamic>,
    pub(super) shadow: Option<Dynamic>,
    /// Window statistics computed for this message, by (metric, window): rules sharing a
    /// window read it once.
    pub(super) windows: Vec<(String, i64, WindowStats)>,
}

/// Why a predicate's values could not all be read as numbers: rhai answers instead.
pub(super) enum Unreadable {
    /// The rule's metric (`current`) or a window is missing: the evaluation is skipped, as
    /// rhai's run would be.
    Missing(ScriptError),
    /// Some value is not a number (or not there): rhai decides.
    NotNumeric,
}

impl<'a> EvalContext<'a> {
    pub(super) fn new(
        sandbox: &'a Sandbox,
        message: &'a Message<'a>,
        device: &'a DeviceState,
        now_ms: i64,
    ) -> Self {
        EvalContext {
            sandbox,
            scope: None,
            message,
            device,
            now_ms,
            metadata: None,
            shadow: None,
            windows: Vec::new(),
        }
    }

    /// The statistics of `metric`'s window of `window_ms` before this message.
    fn window(&mut self, metric: &str, window_ms: i64) -> WindowStats {
        if let Some((_, _, stats)) = self
            .windows
            .iter()
            .find(|(m, w, _)| m == metric && *w == window_ms)
        {
            return *stats;
        }
        let stats = self
            .device
            .windows
            .get(metric)
            .map(|w| w.stats(self.now_ms, window_ms))
            .unwrap_or_default();
        self.windows.push((metric.to_string(), window_ms, stats));
        stats
    }

    /// What every evaluation of an expression needs before it runs: the rule's metric in the
    /// message, and two values in each window it reads.
    fn prerequisites(&mut self, window_metrics: &[String], rule: &RuleSpec) -> Result<(), ScriptError> {
        if let Some(metric) = &rule.metric
            && self.message.value(metric).is_none()
        {
            return Err(ScriptError::Missing(metric.clone()));
        }
        for name in window_metrics {
            // One value has no spread: statistics need two before they mean anything.
            if self.window(name, rule.window_ms).count < 2 {
                return Err(ScriptError::Missing(format!("window of {name}")));
            }
        }
        Ok(())
    }

    /// The values of `predicate`'s operands for this message, into `values`.
    pub(super) fn predicate_values(
        &mut self,
        predicate: &Predicate,
        window_metrics: &[String],
        rule: &RuleSpec,
        values: &mut Vec<f64>,
    ) -> Result<(), Unreadable> {
        self.prerequisites(window_metrics, rule)
            .map_err(Unreadable::Missing)?;
        values.clear();
        for operand in &predicate.operands {
            let value = match operand {
                Operand::Current if rule.metric.is_some() => {
                    rule.metric.as_deref().and_then(|m| self.message.value(m))
                }
                Operand::Current => self.message.last_value("current"),
                Operand::Metric(name) => self.message.last_value(name),
                Operand::Window(name, stat) => {
                    let s = self.window(name, rule.window_ms);
                    values.push(match stat {
                        Stat::Avg => s.avg,
                        Stat::Std => s.std,
                        Stat::Min => s.min,
                        Stat::Max => s.max,
                        Stat::Last => s.last,
                        Stat::Sum => s.sum,
                        Stat::Count => s.count as f64,
                    });
                    continue;
                }
            };
            match value {
                Some(MetricValue::Number(n)) => values.push(*n),
                _ => return Err(Unreadable::NotNumeric),
            }
        }
        Ok(())
    }

    fn run(
        &mut self,
        expr: &Expression,
        rule: &RuleSpec,
        extra: &[(&str, f64)],
    ) -> Result<Verdict, ScriptError> {
        if let Some(predicate) = &expr.native
            && extra.is_empty()
        {
            let mut values = Vec::with_capacity(predicate.operands.len());
            match self.predicate_values(predicate, &expr.window_metrics, rule, &mut values) {
                Ok(()) => {
                    return Ok(if predicate.eval(&values) {
                        Verdict::True
                    } else {
                        Verdict::False
                    });
                }
                Err(Unreadable::Missing(e)) => return Err(e),
                Err(Unreadable::NotNumeric) => {}
            }
        }
        self.prerequisites(&expr.window_metrics, rule)?;
        let message = self.message;
        let windows = if expr.window_metrics.is_empty() {
            None
        } else {
            let mut metrics = Map::new();
            for name in &expr.window_metrics {
                let stats = self.window(name, rule.window_ms);
                let mut m = Map::new();
                m.insert("avg".into(), Dynamic::from_float(stats.avg));
                m.insert("std".into(), Dynamic::from_float(stats.std));
                m.insert(
                    "min".into(),
                    Dynamic::from_float(if stats.count > 0 { stats.min } else { 0.0 }),
                );
                m.insert(
                    "max".into(),
                    Dynamic::from_float(if stats.count > 0 { stats.max } else { 0.0 }),
                );
                m.insert("last".into(), Dynamic::from_float(stats.last));
                m.insert("sum".into(), Dynamic::from_float(stats.sum));
                m.insert("count".into(), Dynamic::from_int(stats.count as i64));
                metrics.insert(name.as_str().into(), Dynamic::from_map(m));
            }
            Some(metrics)
        };
        let metadata = expr.reads_metadata.then(|| {
            self.metadata
                .get_or_insert_with(|| json_to_dynamic(&Value::Object((*message.event.metadata).clone())))
                .clone()
        });
        let shadow = expr.reads_shadow.then(|| {
            self.shadow
                .get_or_insert_with(|| {
                    message
                        .event
                        .shadow
                        .as_deref()
                        .map(json_to_dynamic)
                        .unwrap_or_else(|| Dynamic::from_map(Map::new()))
                })
                .clone()
        });
        let scope = self.scope.get_or_insert_with(|| message.scope());
        let base_len = scope.len();
        if let Some(metric) = &rule.metric
            && let Some(v) = message.value(metric)
        {
            scope.push_constant_dynamic("current", metric_dynamic(v));
        }
        if let Some(metadata) = metadata {
            scope.push_constant_dynamic("metadata", metadata);
        }
        if let Some(shadow) = shadow {
            scope.push_constant_dynamic("shadow", shadow);
        }
        if let Some(metrics) = windows {
            scope.push_constant("metrics", metrics);
        }
        for (name, value) in extra {
            scope.push_constant(name.to_string(), *value);
        }
        let result = self.sandbox.eval(expr, scope);
        scope.rewind(base_len);
        result
    }
}

/// The condition held for an alarm: `Some(occurrences)` to report now (it opens, or its severity
/// rises, with the repeats not reported yet), `None` when the repeat waits for the next tick.
fn report(
    state: &mut DeviceRuleState,
    severity: Severity,
    value: Option<f64>,
    details: &Value,
    now: i64,
) -> Option<u32> {
    if state.active && state.severity.is_some_and(|reported| severity <= reported) {
        let pending = state.pending.get_or_insert_with(Pending::default);
        pending.count += 1;
        pending.value = value;
        pending.details = details.clone();
        pending.at_ms = now;
        return None;
    }
    state.active = true;
    state.severity = Some(state.severity.map_or(severity, |s| s.max(severity)));
    Some(1 + state.pending.take().map_or(0, |p| p.count))
}

fn severity_of(verdict: Verdict, rule: &RuleSpec) -> Severity {
    match verdict {
        Verdict::Severity(s) => s,
        _ => rule.severity,
    }
}

/// A message's details for an alarm, made only when a judgement needs them (most judge
/// nothing and need none).
struct LazyDetails<'m> {
    message: &'m Message<'m>,
    value: Option<Value>,
}

impl<'m> LazyDetails<'m> {
    fn new(message: &'m Message<'m>) -> Self {
        LazyDetails { message, value: None }
    }

    fn get(&mut self) -> &mut Value {
        let message = self.message;
        self.value.get_or_insert_with(|| message.details())
    }

    fn take(&mut self) -> Value {
        self.value.take().unwrap_or_else(|| self.message.details())
    }
}

/// Runs one rule on one message; returns the alarm change it causes.
pub(super) fn evaluate(
    rule: &mut CompiledRule,
    ctx: &mut EvalContext,
    tenant: &TenantId,
) -> Option<AlarmSignal> {
    if rule.condition.on_findings() {
        return None;
    }
    let now = ctx.now_ms;
    let device = ctx.message.event.device.clone();
    if !rule.grouped {
        rule.stats.evaluations.fetch_add(1, Ordering::Relaxed);
    }
    let current = rule
        .spec
        .metric
        .as_ref()
        .and_then(|m| ctx.message.value(m))
        .and_then(MetricValue::as_f64);
    let signal = |rule: &CompiledRule, device: DeviceId, change: AlarmChange, details: Value| AlarmSignal {
        tenant: tenant.clone(),
        device,
        rule_id: rule.spec.id.clone(),
        rule_name: rule.spec.name.clone(),
        change,
        at_ms: now,
        details,
    };
    let mut details = LazyDetails::new(ctx.message);

    // Group conditions keep their state across devices.
    if let Condition::Group {
        expr,
        min_devices,
        within_ms,
    } = &rule.condition
    {
        let verdict = match ctx.run(expr, &rule.spec, &[]) {
            Ok(v) => v,
            Err(e) => {
                rule.stats.error(&e);
                return None;
            }
        };
        if verdict.holds() {
            rule.group.held_at.insert(device.clone(), now);
        } else {
            rule.group.held_at.remove(&device);
        }
        rule.group.held_at.retain(|_, at| now - *at <= *within_ms);
        let holding = rule.group.held_at.len() as u32;
        let mut members: Vec<&str> = rule.group.held_at.keys().map(|d| d.as_str()).collect();
        members.sort_unstable();
        details.get()["devices"] = json!(members);
        if holding >= *min_devices {
            let origin = rule
                .group
                .active_device
                .get_or_insert_with(|| device.clone())
                .clone();
            rule.stats.matches.fetch_add(1, Ordering::Relaxed);
            let severity = severity_of(verdict, &rule.spec);
            // The group alarm's repeats are kept on its originator's state.
            let state = rule.devices.entry(origin.clone()).or_default();
            let occurrences = report(state, severity, current, details.get(), now)?;
            return Some(signal(
                rule,
                origin,
                AlarmChange::Raise {
                    severity,
                    value: current,
                    occurrences,
                },
                details.take(),
            ));
        }
        if rule.clear.is_some()
            && let Some(origin) = rule.group.active_device.take()
        {
            let state = rule.devices.remove(&origin).unwrap_or_default();
            let repeats = state.pending.map_or(0, |p| p.count);
            return Some(signal(
                rule,
                origin,
                AlarmChange::Clear { repeats },
                details.take(),
            ));
        }
        return None;
    }

    let state = rule.devices.entry(device.clone()).or_default();

    // Absence alarms clear as soon as the device speaks again.
    if let Condition::Absence { .. } = rule.condition {
        if state.active {
            state.active = false;
            return Some(signal(
                rule,
                device,
                AlarmChange::Clear { repeats: 0 },
                details.take(),
            ));
        }
        return None;
    }

    // Statistical conditions score `current` against the window before it.
    let mut extra: Vec<(&str, f64)> = Vec::new();
    if let Condition::Statistical { .. } = rule.condition {
        let metric = rule.spec.metric.as_ref()?;
        let Some(x) = current else {
            rule.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let stats = ctx
            .device
            .windows
            .get(metric)
            .map(|w| w.stats(now, rule.spec.window_ms))
            .unwrap_or_default();
        let z = if stats.std > 0.0 {
            (x - stats.avg) / stats.std
        } else {
            0.0
        };
        details.get()["zscore"] = json!(z);
        details.get()["avg"] = json!(stats.avg);
        details.get()["std"] = json!(stats.std);
        details.get()["samples"] = json!(stats.count);
        extra.push(("zscore", z));
        if let Condition::Statistical { min_samples, .. } = rule.condition
            && stats.count < u64::from(min_samples)
        {
            return None;
        }
    }

    // An active alarm: does the clear condition hold?
    if state.active
        && let Some((clear, for_ms)) = &rule.clear
    {
        match ctx.run(clear, &rule.spec, &extra) {
            Ok(v) if v.holds() => {
                let since = *state.clear_since.get_or_insert(now);
                if now - since >= *for_ms {
                    let repeats = state.pending.take().map_or(0, |p| p.count);
                    *state = DeviceRuleState::default();
                    return Some(signal(
                        rule,
                        device,
                        AlarmChange::Clear { repeats },
                        details.take(),
                    ));
                }
            }
            Ok(_) => state.clear_since = None,
            Err(e) => rule.stats.error(&e),
        }
        if rule.stats.stopped.load(Ordering::Relaxed) {
            return None;
        }
    }

    let fired: Option<Severity> = match &rule.condition {
        Condition::Expression(expr) => match ctx.run(expr, &rule.spec, &extra) {
            Ok(v) => v.holds().then(|| severity_of(v, &rule.spec)),
            Err(e) => {
                rule.stats.error(&e);
                None
            }
        },
        Condition::Duration { expr, for_ms } => match ctx.run(expr, &rule.spec, &extra) {
            Ok(v) if v.holds() => {
                let since = *state.since.get_or_insert(now);
                details.get()["heldForMs"] = json!(now - since);
                (now - since >= *for_ms).then(|| severity_of(v, &rule.spec))
            }
            Ok(_) => {
                state.since = None;
                None
            }
            Err(e) => {
                rule.stats.error(&e);
                None
            }
        },
        Condition::Repeating {
            expr,
            count,
            within_ms,
        } => match ctx.run(expr, &rule.spec, &extra) {
            Ok(v) => {
                if v.holds() {
                    state.hits.push_back(now);
                }
                while state.hits.front().is_some_and(|t| now - *t > *within_ms) {
                    state.hits.pop_front();
                }
                while state.hits.len() > *count as usize * 2 {
                    state.hits.pop_front();
                }
                details.get()["occurrences"] = json!(state.hits.len());
                (v.holds() && state.hits.len() >= *count as usize).then(|| severity_of(v, &rule.spec))
            }
            Err(e) => {
                rule.stats.error(&e);
                None
            }
        },
        Condition::Statistical { threshold, .. } => {
            let z = extra.first().map(|(_, z)| *z).unwrap_or(0.0);
            (z.abs() > *threshold).then_some(rule.spec.severity)
        }
        Condition::Pattern {
            first,
            then,
            within_ms,
        } => {
            let mut fired = None;
            if let Some(at) = state.first_at {
                if now - at > *within_ms {
                    state.first_at = None;
                } else {
                    match ctx.run(then, &rule.spec, &extra) {
                        Ok(v) if v.holds() => {
                            details.get()["firstAtMs"] = json!(at);
                            state.first_at = None;
                            fired = Some(severity_of(v, &rule.spec));
                        }
                        Ok(_) => {}
                        Err(e) => rule.stats.error(&e),
                    }
                }
            }
            if fired.is_none() {
                match ctx.run(first, &rule.spec, &extra) {
                    Ok(v) if v.holds() => state.first_at = Some(now),
                    Ok(_) => {}
                    Err(e) => rule.stats.error(&e),
                }
            }
            fired
        }
        Condition::Group { .. }
        | Condition::Absence { .. }
        | Condition::Anomaly { .. }
        | Condition::Forecast { .. } => None,
    };
    let severity = fired?;
    state.clear_since = None;
    rule.stats.matches.fetch_add(1, Ordering::Relaxed);
    let occurrences = report(state, severity, current, details.get(), now)?;
    Some(signal(
        rule,
        device,
        AlarmChange::Raise {
            severity,
            value: current,
            occurrences,
        },
        details.take(),
    ))
}

/// Whether `score` meets an anomaly condition's threshold (in the method's unit), or the
/// analytics' own flag when the rule sets none.
fn anomaly_holds(score: &MethodScore, threshold: Option<f64>) -> bool {
    match threshold {
        Some(t) => score.statistic >= t,
        None => score.score >= 1.0,
    }
}

/// Runs one `anomaly` or `forecast` rule on the analytics' findings for one device; returns the
/// alarm changes they cause (several when a batch's messages open and then clear an alarm).
pub(super) fn evaluate_findings(
    rule: &mut CompiledRule,
    findings: &AnalyticsFindings,
    now: i64,
    tenant: &TenantId,
    out: &mut Vec<AlarmSignal>,
) {
    let device = findings.device.clone();
    let signal = |rule: &CompiledRule, change: AlarmChange, details: Value| AlarmSignal {
        tenant: tenant.clone(),
        device: device.clone(),
        rule_id: rule.spec.id.clone(),
        rule_name: rule.spec.name.clone(),
        change,
        at_ms: now,
        details,
    };
    match (&rule.condition, &findings.finding) {
        (
            Condition::Anomaly {
                method,
                threshold,
                clear_after_ms,
            },
            Finding::Scored(messages),
        ) => {
            let (method, threshold, clear_after_ms) = (*method, *threshold, *clear_after_ms);
            for message in messages {
                // A method that did not score the message (warming up, not configured for the
                // device) says nothing either way.
                let Some(score) = message.scores.iter().find(|s| s.method == method) else {
                    continue;
                };
                rule.stats.evaluations.fetch_add(1, Ordering::Relaxed);
                let details = json!({
                    "method": method.as_str(),
                    "statistic": score.statistic,
                    "score": score.score,
                    "threshold": threshold,
                    "metric": score.metric,
                    "value": score.value,
                    "ts": message.ts_ms,
                });
                let state = rule.devices.entry(device.clone()).or_default();
                if anomaly_holds(score, threshold) {
                    state.clear_since = None;
                    rule.stats.matches.fetch_add(1, Ordering::Relaxed);
                    let severity = rule.spec.severity;
                    if let Some(occurrences) = report(state, severity, score.value, &details, now) {
                        out.push(signal(
                            rule,
                            AlarmChange::Raise {
                                severity,
                                value: score.value,
                                occurrences,
                            },
                            details,
                        ));
                    }
                } else if state.active {
                    let since = *state.clear_since.get_or_insert(now);
                    if now - since >= clear_after_ms {
                        let repeats = state.pending.take().map_or(0, |p| p.count);
                        *state = DeviceRuleState::default();
                        out.push(signal(rule, AlarmChange::Clear { repeats }, details));
                    }
                }
            }
        }
        (
            Condition::Forecast {
                metric,
                limit,
                direction,
                within_ms,
            },
            Finding::Forecast(f),
        ) if *metric == f.metric => {
            rule.stats.evaluations.fetch_add(1, Ordering::Relaxed);
            let (limit, direction, within_ms) = (*limit, *direction, *within_ms);
            let crossed = match direction {
                Direction::Below => f.last_value <= limit,
                Direction::Above => f.last_value >= limit,
            };
            let crossing = time_to_threshold(&f.forecast, limit, direction);
            let in_ms = |step: Option<usize>| step.map(|s| s as i64 * f.step_ms);
            let expected_ms = if crossed {
                Some(0)
            } else {
                in_ms(crossing.expected)
            };
            let details = json!({
                "metric": f.metric,
                "limit": limit,
                "direction": if direction == Direction::Below { "below" } else { "above" },
                "withinSecs": within_ms / 1000,
                "lastValue": f.last_value,
                "lastTs": f.last_ts_ms,
                "expectedInSecs": expected_ms.map(|ms| ms / 1000),
                "earliestInSecs": in_ms(crossing.earliest).map(|ms| ms / 1000),
                "latestInSecs": in_ms(crossing.latest).map(|ms| ms / 1000),
                "expectedAtMs": expected_ms.map(|ms| f.last_ts_ms + ms),
                "level": f.forecast.level,
            });
            let state = rule.devices.entry(device.clone()).or_default();
            if expected_ms.is_some_and(|ms| ms <= within_ms) {
                state.clear_since = None;
                rule.stats.matches.fetch_add(1, Ordering::Relaxed);
                let severity = rule.spec.severity;
                let value = Some(f.last_value);
                if let Some(occurrences) = report(state, severity, value, &details, now) {
                    out.push(signal(
                        rule,
                        AlarmChange::Raise {
                            severity,
                            value,
                            occurrences,
                        },
                        details,
                    ));
                }
            } else if state.active {
                let repeats = state.pending.take().map_or(0, |p| p.count);
                *state = DeviceRuleState::default();
                out.push(signal(rule, AlarmChange::Clear { repeats }, details));
            }
        }
        _ => {}
    }
}
