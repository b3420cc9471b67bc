//! Evaluation of one tenant's rules: pure state machines, no actors, no I/O.
//!
//! [`TenantRules::on_telemetry`] takes one accepted batch and the server time it arrived at and
//! returns the alarm changes it causes; [`TenantRules::on_tick`] fires time-based conditions
//! (absence). Window statistics are per (device, metric) and cover the values that arrived before
//! the message being evaluated. A rule whose expression hits a sandbox limit at run time is
//! stopped (its stats say why) and the tenant's other rules carry on.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rhai::{Dynamic, Map, Scope};
use serde::Serialize;
use serde_json::{Value, json};

use super::script::{Expression, Sandbox, ScriptError, Verdict};
use super::window::MetricWindow;
use super::{AlarmChange, AlarmSignal, ConditionSpec, RuleSpec, Severity};
use crate::ids::{DeviceId, TenantId};
use crate::pipeline::TelemetryAccepted;
use crate::telemetry::MetricValue;

/// Counters of one rule, shared with the API (`GET /api/rules/{id}` shows them).
#[derive(Debug, Default)]
pub struct RuleStats {
    pub evaluations: AtomicU64,
    pub matches: AtomicU64,
    /// Messages that lacked a value the rule reads.
    pub skipped: AtomicU64,
    pub errors: AtomicU64,
    pub limit_hits: AtomicU64,
    /// Set when a sandbox limit was hit: the rule no longer runs until it is changed.
    pub stopped: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

/// [`RuleStats`] as JSON.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuleStatsView {
    pub evaluations: u64,
    pub matches: u64,
    pub skipped: u64,
    pub errors: u64,
    pub limit_hits: u64,
    /// `running`, `stopped` (a limit was hit) or `idle` (not loaded yet).
    pub status: &'static str,
    pub last_error: Option<String>,
}

impl RuleStats {
    pub fn view(&self) -> RuleStatsView {
        RuleStatsView {
            evaluations: self.evaluations.load(Ordering::Relaxed),
            matches: self.matches.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            limit_hits: self.limit_hits.load(Ordering::Relaxed),
            status: if self.stopped.load(Ordering::Relaxed) {
                "stopped"
            } else {
                "running"
            },
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn error(&self, error: &ScriptError) {
        match error {
            ScriptError::Missing(_) => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            ScriptError::Limit { .. } => {
                self.limit_hits.fetch_add(1, Ordering::Relaxed);
                self.stopped.store(true, Ordering::Relaxed);
            }
            _ => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error.to_string());
        }
    }
}

/// Stats of every loaded rule by id, shared between the rule actors and the API.
pub type StatsBoard = Arc<Mutex<HashMap<String, Arc<RuleStats>>>>;

enum Condition {
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
}

/// Where one (device, rule) stands.
#[derive(Debug, Default, Clone)]
struct DeviceRuleState {
    active: bool,
    /// Duration: since when the expression has held.
    since: Option<i64>,
    /// Repeating: when it held, within the window.
    hits: VecDeque<i64>,
    /// Pattern: when `first` last held.
    first_at: Option<i64>,
    /// Clear with a duration: since when the clear expression has held.
    clear_since: Option<i64>,
    /// The severity last reported for the active alarm.
    severity: Option<Severity>,
    /// Repeats of the active alarm not reported yet (flushed on the next tick).
    pending: Option<Pending>,
}

/// Repeats of an active alarm, coalesced so an alarm that holds on every message costs one
/// registry write per tick rather than one per message.
#[derive(Debug, Clone, Default)]
struct Pending {
    count: u32,
    value: Option<f64>,
    details: Value,
    at_ms: i64,
}

#[derive(Debug, Default)]
struct GroupState {
    held_at: HashMap<DeviceId, i64>,
    /// The device the group alarm was raised on, while it is active.
    active_device: Option<DeviceId>,
}

struct CompiledRule {
    spec: RuleSpec,
    condition: Condition,
    clear: Option<(Expression, i64)>,
    stats: Arc<RuleStats>,
    devices: HashMap<DeviceId, DeviceRuleState>,
    group: GroupState,
}

#[derive(Debug, Default)]
struct DeviceState {
    device_type: String,
    last_seen_ms: i64,
    windows: HashMap<String, MetricWindow>,
}

/// One tenant's rules and everything they remember.
pub struct TenantRules {
    tenant: TenantId,
    sandbox: Arc<Sandbox>,
    anomaly_threshold: f64,
    rules: Vec<CompiledRule>,
    devices: HashMap<DeviceId, DeviceState>,
    /// Longest window any rule needs (values older than this are dropped).
    keep_ms: i64,
    board: StatsBoard,
}

/// Why a rule could not be loaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rule {rule}: {error}")]
pub struct LoadError {
    pub rule: String,
    pub error: ScriptError,
}

fn compile_condition(
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
    })
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

fn metric_dynamic(value: &MetricValue) -> Dynamic {
    match value {
        MetricValue::Number(n) => Dynamic::from_float(*n),
        MetricValue::Bool(b) => Dynamic::from_bool(*b),
        MetricValue::Text(s) => Dynamic::from(s.clone()),
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One message of a batch as rules see it.
struct Message<'a> {
    event: &'a TelemetryAccepted,
    metrics: Vec<(&'a str, &'a MetricValue)>,
}

impl Message<'_> {
    fn value(&self, name: &str) -> Option<&MetricValue> {
        self.metrics.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
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

impl TenantRules {
    pub fn new(
        tenant: TenantId,
        sandbox: Arc<Sandbox>,
        anomaly_threshold: f64,
        board: StatsBoard,
    ) -> TenantRules {
        TenantRules {
            tenant,
            sandbox,
            anomaly_threshold,
            rules: Vec::new(),
            devices: HashMap::new(),
            keep_ms: 0,
            board,
        }
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Replaces the rule set. A rule whose spec did not change keeps its state; a changed one
    /// starts afresh (and runs again if it had been stopped). Rules that fail to compile are
    /// left out and reported.
    pub fn set_rules(&mut self, specs: Vec<RuleSpec>, active: &[(DeviceId, String)]) -> Vec<LoadError> {
        let mut previous: HashMap<String, CompiledRule> =
            self.rules.drain(..).map(|r| (r.spec.id.clone(), r)).collect();
        let mut errors = Vec::new();
        let mut board = self.board.lock().unwrap_or_else(|e| e.into_inner());
        for old in previous.keys() {
            if !specs.iter().any(|s| &s.id == old) {
                board.remove(old);
            }
        }
        for spec in specs {
            if let Some(old) = previous.remove(&spec.id)
                && old.spec == spec
            {
                self.rules.push(old);
                continue;
            }
            let condition = match compile_condition(&self.sandbox, &spec, self.anomaly_threshold) {
                Ok(c) => c,
                Err(error) => {
                    errors.push(LoadError {
                        rule: spec.id.clone(),
                        error,
                    });
                    continue;
                }
            };
            let clear = match spec
                .clear
                .as_ref()
                .map(|c| self.sandbox.compile(&c.expression).map(|e| (e, c.for_ms)))
            {
                Some(Err(error)) => {
                    errors.push(LoadError {
                        rule: spec.id.clone(),
                        error,
                    });
                    continue;
                }
                Some(Ok(c)) => Some(c),
                None => None,
            };
            let stats = Arc::new(RuleStats::default());
            board.insert(spec.id.clone(), stats.clone());
            let mut rule = CompiledRule {
                spec,
                condition,
                clear,
                stats,
                devices: HashMap::new(),
                group: GroupState::default(),
            };
            for (device, rule_id) in active {
                if *rule_id == rule.spec.id {
                    rule.devices.entry(device.clone()).or_default().active = true;
                    if matches!(rule.condition, Condition::Group { .. }) {
                        rule.group.active_device = Some(device.clone());
                    }
                }
            }
            self.rules.push(rule);
        }
        self.keep_ms = self.rules.iter().map(|r| r.spec.window_ms).max().unwrap_or(0);
        errors
    }

    /// An alarm was cleared by an operator (or deleted): evaluation may raise it again.
    pub fn alarm_closed(&mut self, rule_id: &str, device: &DeviceId) {
        if let Some(rule) = self.rules.iter_mut().find(|r| r.spec.id == rule_id) {
            if let Some(state) = rule.devices.get_mut(device) {
                *state = DeviceRuleState::default();
            }
            if rule.group.active_device.as_ref() == Some(device) {
                rule.group = GroupState::default();
            }
        }
    }

    /// Evaluates every rule in scope on each message of the batch, in timestamp order.
    pub fn on_telemetry(&mut self, event: &TelemetryAccepted, now_ms: i64) -> Vec<AlarmSignal> {
        let mut by_ts: BTreeMap<i64, Vec<(&str, &MetricValue)>> = BTreeMap::new();
        for p in event.points.iter() {
            by_ts
                .entry(p.ts_ms)
                .or_default()
                .push((p.metric.as_str(), &p.value));
        }
        let mut out = Vec::new();
        for (_, metrics) in by_ts {
            let message = Message { event, metrics };
            self.on_message(&message, now_ms, &mut out);
        }
        out
    }

    fn on_message(&mut self, message: &Message, now_ms: i64, out: &mut Vec<AlarmSignal>) {
        let event = message.event;
        let device = self.devices.entry(event.device.clone()).or_default();
        device.last_seen_ms = now_ms;
        if device.device_type != event.device_type {
            device.device_type = event.device_type.clone();
        }
        let mut base = Scope::new();
        for (name, value) in &message.metrics {
            if is_identifier(name) {
                base.push_constant_dynamic(name.to_string(), metric_dynamic(value));
            }
        }
        base.push_constant("device", event.device.as_str().to_string());
        base.push_constant("deviceType", event.device_type.clone());
        let mut ctx = EvalContext {
            sandbox: &self.sandbox,
            scope: base,
            message,
            device: &*device,
            now_ms,
            metadata: None,
            shadow: None,
        };
        for rule in &mut self.rules {
            if !rule.spec.enabled
                || rule.stats.stopped.load(Ordering::Relaxed)
                || !rule.spec.scope.matches(&event.device, &event.device_type)
            {
                continue;
            }
            if let Some(signal) = evaluate(rule, &mut ctx, &self.tenant) {
                out.push(signal);
            }
        }
        // The message joins the windows after it was judged against them.
        let keep = self.keep_ms;
        let device = self.devices.entry(event.device.clone()).or_default();
        if keep > 0 {
            for (name, value) in &message.metrics {
                if let Some(v) = value.as_f64() {
                    let window = device.windows.entry(name.to_string()).or_default();
                    window.prune(now_ms, keep);
                    window.push(now_ms, v);
                }
            }
        }
    }

    /// Reports coalesced repeats, fires time-based conditions (absence) and drops window values
    /// no rule needs any more.
    pub fn on_tick(&mut self, now_ms: i64) -> Vec<AlarmSignal> {
        let mut out = Vec::new();
        for rule in &mut self.rules {
            for (device, state) in rule.devices.iter_mut() {
                if let Some(p) = state.pending.take() {
                    out.push(AlarmSignal {
                        tenant: self.tenant.clone(),
                        device: device.clone(),
                        rule_id: rule.spec.id.clone(),
                        rule_name: rule.spec.name.clone(),
                        change: AlarmChange::Raise {
                            severity: state.severity.unwrap_or(rule.spec.severity),
                            value: p.value,
                            occurrences: p.count,
                        },
                        at_ms: p.at_ms,
                        details: p.details,
                    });
                }
            }
        }
        for rule in &mut self.rules {
            let Condition::Absence { for_ms } = rule.condition else {
                continue;
            };
            if !rule.spec.enabled {
                continue;
            }
            for (id, device) in &self.devices {
                if !rule.spec.scope.matches(id, &device.device_type) || now_ms - device.last_seen_ms < for_ms
                {
                    continue;
                }
                let state = rule.devices.entry(id.clone()).or_default();
                if state.active {
                    continue;
                }
                state.active = true;
                rule.stats.matches.fetch_add(1, Ordering::Relaxed);
                out.push(AlarmSignal {
                    tenant: self.tenant.clone(),
                    device: id.clone(),
                    rule_id: rule.spec.id.clone(),
                    rule_name: rule.spec.name.clone(),
                    change: AlarmChange::Raise {
                        severity: rule.spec.severity,
                        value: None,
                        occurrences: 1,
                    },
                    at_ms: now_ms,
                    details: json!({ "silentForMs": now_ms - device.last_seen_ms, "lastSeenMs": device.last_seen_ms }),
                });
            }
        }
        let keep = self.keep_ms;
        for device in self.devices.values_mut() {
            device.windows.retain(|_, w| {
                w.prune(now_ms, keep);
                !w.is_empty()
            });
        }
        out
    }
}

struct EvalContext<'a> {
    sandbox: &'a Sandbox,
    /// The message's variables; each evaluation pushes its extras and rewinds.
    scope: Scope<'static>,
    message: &'a Message<'a>,
    device: &'a DeviceState,
    now_ms: i64,
    metadata: Option<Dynamic>,
    shadow: Option<Dynamic>,
}

impl EvalContext<'_> {
    fn run(
        &mut self,
        expr: &Expression,
        rule: &RuleSpec,
        extra: &[(&str, f64)],
    ) -> Result<Verdict, ScriptError> {
        let base_len = self.scope.len();
        if let Some(metric) = &rule.metric {
            match self.message.value(metric) {
                Some(v) => {
                    self.scope.push_constant_dynamic("current", metric_dynamic(v));
                }
                None => return Err(ScriptError::Missing(metric.clone())),
            }
        }
        if expr.reads_metadata {
            let metadata = self.metadata.get_or_insert_with(|| {
                json_to_dynamic(&Value::Object((*self.message.event.metadata).clone()))
            });
            self.scope.push_constant_dynamic("metadata", metadata.clone());
        }
        if expr.reads_shadow {
            let shadow = self.shadow.get_or_insert_with(|| {
                self.message
                    .event
                    .shadow
                    .as_deref()
                    .map(json_to_dynamic)
                    .unwrap_or_else(|| Dynamic::from_map(Map::new()))
            });
            self.scope.push_constant_dynamic("shadow", shadow.clone());
        }
        if !expr.window_metrics.is_empty() {
            let mut metrics = Map::new();
            for name in &expr.window_metrics {
                let stats = self
                    .device
                    .windows
                    .get(name)
                    .map(|w| w.stats(self.now_ms, rule.window_ms))
                    .unwrap_or_default();
                // One value has no spread: statistics need two before they mean anything.
                if stats.count < 2 {
                    self.scope.rewind(base_len);
                    return Err(ScriptError::Missing(format!("window of {name}")));
                }
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
            self.scope.push_constant("metrics", metrics);
        }
        for (name, value) in extra {
            self.scope.push_constant(name.to_string(), *value);
        }
        let result = self.sandbox.eval(expr, &mut self.scope);
        self.scope.rewind(base_len);
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

/// Runs one rule on one message; returns the alarm change it causes.
fn evaluate(rule: &mut CompiledRule, ctx: &mut EvalContext, tenant: &TenantId) -> Option<AlarmSignal> {
    let now = ctx.now_ms;
    let device = ctx.message.event.device.clone();
    rule.stats.evaluations.fetch_add(1, Ordering::Relaxed);
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
    let mut details = ctx.message.details();

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
        details["devices"] = json!(members);
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
            let occurrences = report(state, severity, current, &details, now)?;
            return Some(signal(
                rule,
                origin,
                AlarmChange::Raise {
                    severity,
                    value: current,
                    occurrences,
                },
                details,
            ));
        }
        if rule.clear.is_some()
            && let Some(origin) = rule.group.active_device.take()
        {
            let state = rule.devices.remove(&origin).unwrap_or_default();
            let repeats = state.pending.map_or(0, |p| p.count);
            return Some(signal(rule, origin, AlarmChange::Clear { repeats }, details));
        }
        return None;
    }

    let state = rule.devices.entry(device.clone()).or_default();

    // Absence alarms clear as soon as the device speaks again.
    if let Condition::Absence { .. } = rule.condition {
        if state.active {
            state.active = false;
            return Some(signal(rule, device, AlarmChange::Clear { repeats: 0 }, details));
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
        details["zscore"] = json!(z);
        details["avg"] = json!(stats.avg);
        details["std"] = json!(stats.std);
        details["samples"] = json!(stats.count);
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
                    return Some(signal(rule, device, AlarmChange::Clear { repeats }, details));
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
                details["heldForMs"] = json!(now - since);
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
                details["occurrences"] = json!(state.hits.len());
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
                            details["firstAtMs"] = json!(at);
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
        Condition::Group { .. } | Condition::Absence { .. } => None,
    };
    let severity = fired?;
    state.clear_since = None;
    rule.stats.matches.fetch_add(1, Ordering::Relaxed);
    let occurrences = report(state, severity, current, &details, now)?;
    Some(signal(
        rule,
        device,
        AlarmChange::Raise {
            severity,
            value: current,
            occurrences,
        },
        details,
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::rules::{ClearSpec, RuleScope};
    use crate::telemetry::{MetricName, TelemetryPoint};

    fn tenant() -> TenantId {
        TenantId::parse("acme").unwrap()
    }

    fn rule(id: &str, condition: ConditionSpec) -> RuleSpec {
        RuleSpec {
            id: id.into(),
            tenant: tenant(),
            name: format!("rule {id}"),
            enabled: true,
            severity: Severity::Major,
            metric: Some("temperature".into()),
            window_ms: 60_000,
            condition,
            clear: None,
            scope: RuleScope::All,
        }
    }

    fn expr(e: &str) -> ConditionSpec {
        ConditionSpec::Expression { expression: e.into() }
    }

    fn event(device: &str, metrics: &[(&str, f64)]) -> TelemetryAccepted {
        let points: Vec<TelemetryPoint> = metrics
            .iter()
            .map(|(m, v)| TelemetryPoint {
                tenant: tenant(),
                device: DeviceId::parse(device).unwrap(),
                device_type: "thermo".into(),
                metric: MetricName::parse(*m).unwrap(),
                ts_ms: 1,
                value: MetricValue::Number(*v),
            })
            .collect();
        let mut metadata = serde_json::Map::new();
        metadata.insert("site".into(), json!("north"));
        TelemetryAccepted {
            tenant: tenant(),
            device: DeviceId::parse(device).unwrap(),
            device_type: "thermo".into(),
            metadata: Arc::new(metadata),
            shadow: Some(Arc::new(
                json!({"desired": {"mode": "eco"}, "reported": {"mode": "eco"}}),
            )),
            points: points.into(),
        }
    }

    fn engine(rules: Vec<RuleSpec>) -> TenantRules {
        let mut t = TenantRules::new(tenant(), Arc::new(Sandbox::default()), 3.0, StatsBoard::default());
        assert_eq!(t.set_rules(rules, &[]), vec![]);
        t
    }

    fn temp(t: &mut TenantRules, device: &str, v: f64, now: i64) -> Vec<AlarmChange> {
        t.on_telemetry(&event(device, &[("temperature", v)]), now)
            .into_iter()
            .map(|s| s.change)
            .collect()
    }

    fn raise(sev: Severity, v: f64) -> AlarmChange {
        raise_n(sev, v, 1)
    }

    fn raise_n(sev: Severity, v: f64, occurrences: u32) -> AlarmChange {
        AlarmChange::Raise {
            severity: sev,
            value: Some(v),
            occurrences,
        }
    }

    const CLEAR: AlarmChange = AlarmChange::Clear { repeats: 0 };

    #[test]
    fn threshold_raises_repeats_and_clears() {
        let mut r = rule("hot", expr("temperature > 30"));
        r.clear = Some(ClearSpec {
            expression: "temperature < 25".into(),
            for_ms: 0,
        });
        let mut t = engine(vec![r]);
        assert_eq!(temp(&mut t, "d1", 20.0, 0), vec![]);
        assert_eq!(temp(&mut t, "d1", 31.0, 1), vec![raise(Severity::Major, 31.0)]);
        // Repeats are coalesced until the next tick.
        assert_eq!(temp(&mut t, "d1", 35.0, 2), vec![]);
        assert_eq!(temp(&mut t, "d1", 36.0, 3), vec![]);
        let flushed: Vec<AlarmChange> = t.on_tick(4).into_iter().map(|s| s.change).collect();
        assert_eq!(flushed, vec![raise_n(Severity::Major, 36.0, 2)]);
        assert!(t.on_tick(5).is_empty(), "reported once");
        assert_eq!(temp(&mut t, "d1", 37.0, 6), vec![]);
        assert_eq!(
            temp(&mut t, "d1", 27.0, 7),
            vec![],
            "between thresholds nothing changes"
        );
        assert_eq!(
            temp(&mut t, "d1", 24.0, 8),
            vec![AlarmChange::Clear { repeats: 1 }],
            "the clear carries the repeat not reported yet"
        );
        assert_eq!(temp(&mut t, "d1", 24.0, 9), vec![]);
    }

    #[test]
    fn expressions_see_metadata_shadow_device_and_severity_strings() {
        let mut t = engine(vec![
            rule(
                "meta",
                expr("metadata.site == \"north\" && device == \"d1\" && deviceType == \"thermo\""),
            ),
            rule("shadow", expr("shadow.desired.mode == \"eco\"")),
            rule(
                "sev",
                expr("if current > 50 { \"critical\" } else if current > 30 { \"minor\" } else { false }"),
            ),
        ]);
        let signals = t.on_telemetry(&event("d1", &[("temperature", 60.0)]), 0);
        let ids: Vec<&str> = signals.iter().map(|s| s.rule_id.as_str()).collect();
        assert_eq!(ids, vec!["meta", "shadow", "sev"]);
        assert_eq!(signals[2].change, raise(Severity::Critical, 60.0));
        assert_eq!(signals[2].details["metrics"]["temperature"], json!(60.0));
    }

    #[test]
    fn window_statistics_exclude_the_current_message() {
        let source = "const avg = metrics.temperature.avg; const std = metrics.temperature.std; return current > (avg + 3 * std);";
        let mut t = engine(vec![rule("spike", expr(source))]);
        for (i, v) in [20.0, 21.0, 19.0, 20.0, 21.0, 19.0].into_iter().enumerate() {
            assert_eq!(temp(&mut t, "d1", v, i as i64 * 1000), vec![]);
        }
        assert_eq!(temp(&mut t, "d1", 40.0, 7000), vec![raise(Severity::Major, 40.0)]);
        // Values older than the window no longer count: a 40 far later is judged on itself only.
        let mut t2 = engine(vec![rule("count", expr("metrics.temperature.count >= 3"))]);
        temp(&mut t2, "d1", 1.0, 0);
        temp(&mut t2, "d1", 1.0, 1);
        temp(&mut t2, "d1", 1.0, 2);
        assert_eq!(temp(&mut t2, "d1", 1.0, 3).len(), 1);
        let mut t3 = engine(vec![rule("count", expr("metrics.temperature.count >= 3"))]);
        temp(&mut t3, "d1", 1.0, 0);
        temp(&mut t3, "d1", 1.0, 1);
        temp(&mut t3, "d1", 1.0, 2);
        assert_eq!(temp(&mut t3, "d1", 1.0, 120_000), vec![], "window of 60 s");
    }

    #[test]
    fn duration_needs_the_condition_to_hold_continuously() {
        let mut t = engine(vec![rule(
            "dur",
            ConditionSpec::Duration {
                expression: "temperature > 30".into(),
                for_ms: 10_000,
            },
        )]);
        assert_eq!(temp(&mut t, "d1", 31.0, 0), vec![]);
        assert_eq!(temp(&mut t, "d1", 31.0, 5_000), vec![]);
        assert_eq!(temp(&mut t, "d1", 20.0, 8_000), vec![], "interrupted");
        assert_eq!(temp(&mut t, "d1", 31.0, 9_000), vec![]);
        assert_eq!(temp(&mut t, "d1", 31.0, 15_000), vec![]);
        assert_eq!(
            temp(&mut t, "d1", 31.0, 19_000),
            vec![raise(Severity::Major, 31.0)]
        );
    }

    #[test]
    fn repeating_counts_within_the_window() {
        let mut t = engine(vec![rule(
            "rep",
            ConditionSpec::Repeating {
                expression: "temperature > 30".into(),
                count: 3,
                within_ms: 10_000,
            },
        )]);
        assert_eq!(temp(&mut t, "d1", 31.0, 0), vec![]);
        assert_eq!(temp(&mut t, "d1", 31.0, 4_000), vec![]);
        assert_eq!(
            temp(&mut t, "d1", 31.0, 12_000),
            vec![],
            "the first fell out of the window"
        );
        assert_eq!(temp(&mut t, "d1", 10.0, 13_000), vec![]);
        assert_eq!(
            temp(&mut t, "d1", 31.0, 13_500),
            vec![raise(Severity::Major, 31.0)]
        );
    }

    #[test]
    fn statistical_scores_against_the_rolling_window() {
        let mut r = rule(
            "z",
            ConditionSpec::Statistical {
                threshold: None,
                min_samples: 5,
            },
        );
        r.clear = Some(ClearSpec {
            expression: "zscore.abs() < 1.0".into(),
            for_ms: 0,
        });
        let mut t = engine(vec![r]);
        assert_eq!(temp(&mut t, "d1", 100.0, 0), vec![], "too few samples");
        for (i, v) in [20.0, 22.0, 20.0, 22.0, 20.0, 22.0].into_iter().enumerate() {
            temp(&mut t, "d2", v, i as i64);
        }
        // avg 21, std 1: 23.5 is z = 2.5 (under 3), 30 is z = 9.
        assert_eq!(temp(&mut t, "d2", 23.5, 10), vec![]);
        let signals = t.on_telemetry(&event("d2", &[("temperature", 40.0)]), 11);
        assert_eq!(signals.len(), 1);
        assert!(signals[0].details["zscore"].as_f64().unwrap() > 3.0);
        // A window dominated by the spike, then a value near the mean clears it.
        assert_eq!(temp(&mut t, "d2", 23.0, 12), vec![CLEAR]);
    }

    #[test]
    fn statistical_threshold_comes_from_the_rule_or_the_server() {
        let r = rule(
            "z",
            ConditionSpec::Statistical {
                threshold: Some(1.5),
                min_samples: 2,
            },
        );
        let mut t = engine(vec![r]);
        for (i, v) in [20.0, 22.0, 20.0, 22.0].into_iter().enumerate() {
            temp(&mut t, "d1", v, i as i64);
        }
        assert_eq!(temp(&mut t, "d1", 23.5, 10).len(), 1, "z 2.5 > 1.5");
    }

    #[test]
    fn pattern_a_then_b_within_t_on_one_device() {
        let mut r = rule(
            "pat",
            ConditionSpec::Pattern {
                first: "door == 1.0".into(),
                then: "temperature > 30".into(),
                within_ms: 60_000,
            },
        );
        r.metric = None;
        let mut t = engine(vec![r]);
        let door = |t: &mut TenantRules, d: &str, now| t.on_telemetry(&event(d, &[("door", 1.0)]), now);
        let hot =
            |t: &mut TenantRules, d: &str, now| t.on_telemetry(&event(d, &[("temperature", 35.0)]), now);
        assert!(hot(&mut t, "d1", 0).is_empty(), "B before A");
        assert!(door(&mut t, "d1", 1_000).is_empty());
        assert!(hot(&mut t, "d2", 2_000).is_empty(), "another device");
        assert!(hot(&mut t, "d1", 100_000).is_empty(), "too late");
        assert!(door(&mut t, "d1", 101_000).is_empty());
        let signals = hot(&mut t, "d1", 110_000);
        assert_eq!(signals.len(), 1);
        assert_eq!(signals[0].details["firstAtMs"], json!(101_000));
    }

    #[test]
    fn group_needs_enough_devices_within_t() {
        let members: HashSet<DeviceId> = ["a", "b", "c", "d"]
            .iter()
            .map(|d| DeviceId::parse(*d).unwrap())
            .collect();
        let mut r = rule(
            "grp",
            ConditionSpec::Group {
                expression: "temperature > 30".into(),
                min_devices: 3,
                within_ms: 60_000,
            },
        );
        r.scope = RuleScope::Group {
            name: "hall".into(),
            members: Arc::new(members),
        };
        r.clear = Some(ClearSpec {
            expression: "true".into(),
            for_ms: 0,
        });
        let mut t = engine(vec![r]);
        assert!(temp(&mut t, "a", 31.0, 0).is_empty());
        assert!(temp(&mut t, "outsider", 31.0, 1).is_empty());
        assert!(temp(&mut t, "outsider2", 31.0, 2).is_empty());
        assert!(temp(&mut t, "b", 31.0, 70_000).is_empty(), "a is too old now");
        assert!(temp(&mut t, "c", 31.0, 71_000).is_empty());
        let signals = t.on_telemetry(&event("d", &[("temperature", 31.0)]), 72_000);
        assert_eq!(signals.len(), 1);
        assert_eq!(signals[0].device.as_str(), "d");
        assert_eq!(signals[0].details["devices"], json!(["b", "c", "d"]));
        // Still enough: a repeat of the same alarm (same originator), reported on the tick.
        assert!(temp(&mut t, "a", 31.0, 73_000).is_empty());
        let signals = t.on_tick(73_500);
        assert_eq!(signals.len(), 1);
        assert_eq!(signals[0].device.as_str(), "d");
        assert!(matches!(
            signals[0].change,
            AlarmChange::Raise { occurrences: 1, .. }
        ));
        // a drops out: b, c, d still hold (one more repeat). Then b drops out: two left, the
        // alarm clears, carrying that repeat.
        assert!(temp(&mut t, "a", 20.0, 74_000).is_empty());
        let signals = t.on_telemetry(&event("b", &[("temperature", 20.0)]), 75_000);
        assert_eq!(signals.len(), 1);
        assert_eq!(
            signals[0].device.as_str(),
            "d",
            "the clear is on the alarm's originator"
        );
        assert_eq!(signals[0].change, AlarmChange::Clear { repeats: 1 });
        assert!(temp(&mut t, "c", 20.0, 76_000).is_empty());
    }

    #[test]
    fn absence_raises_on_tick_and_clears_on_telemetry() {
        let mut r = rule("offline", ConditionSpec::Absence { for_ms: 30_000 });
        r.metric = None;
        let mut t = engine(vec![r]);
        temp(&mut t, "d1", 20.0, 0);
        assert!(t.on_tick(29_999).is_empty());
        let signals = t.on_tick(30_000);
        assert_eq!(signals.len(), 1);
        assert!(matches!(signals[0].change, AlarmChange::Raise { .. }));
        assert!(t.on_tick(60_000).is_empty(), "raised once");
        assert_eq!(temp(&mut t, "d1", 20.0, 61_000), vec![CLEAR]);
    }

    #[test]
    fn clear_with_a_duration_waits() {
        let mut r = rule("hot", expr("temperature > 30"));
        r.clear = Some(ClearSpec {
            expression: "temperature < 25".into(),
            for_ms: 10_000,
        });
        let mut t = engine(vec![r]);
        temp(&mut t, "d1", 31.0, 0);
        assert_eq!(temp(&mut t, "d1", 20.0, 1_000), vec![]);
        assert_eq!(temp(&mut t, "d1", 20.0, 5_000), vec![]);
        assert_eq!(temp(&mut t, "d1", 20.0, 11_000), vec![CLEAR]);
    }

    #[test]
    fn without_a_clear_only_an_operator_clears() {
        let mut t = engine(vec![rule("hot", expr("temperature > 30"))]);
        temp(&mut t, "d1", 31.0, 0);
        assert_eq!(temp(&mut t, "d1", 0.0, 1), vec![]);
        t.alarm_closed("hot", &DeviceId::parse("d1").unwrap());
        assert_eq!(temp(&mut t, "d1", 31.0, 2), vec![raise(Severity::Major, 31.0)]);
    }

    #[test]
    fn a_rule_hitting_a_limit_stops_and_others_keep_evaluating() {
        let board = StatsBoard::default();
        let mut t = TenantRules::new(tenant(), Arc::new(Sandbox::default()), 3.0, board.clone());
        t.set_rules(
            vec![
                rule("bad", expr("if temperature > 100 { loop {} } false")),
                rule("good", expr("temperature > 30")),
                rule("missing", expr("humidity > 30")),
            ],
            &[],
        );
        let signals = t.on_telemetry(&event("d1", &[("temperature", 150.0)]), 0);
        assert_eq!(signals.len(), 1);
        assert_eq!(signals[0].rule_id, "good");
        let stats = board.lock().unwrap();
        let bad = stats["bad"].view();
        assert_eq!(bad.status, "stopped");
        assert_eq!(bad.limit_hits, 1);
        assert!(bad.last_error.unwrap().contains("limit"));
        assert_eq!(stats["missing"].view().skipped, 1);
        assert_eq!(stats["missing"].view().status, "running");
        drop(stats);
        t.on_telemetry(&event("d1", &[("temperature", 150.0)]), 1);
        let stats = board.lock().unwrap();
        assert_eq!(
            stats["bad"].view().evaluations,
            1,
            "the stopped rule is not run again"
        );
        assert_eq!(stats["good"].view().evaluations, 2);
        assert_eq!(stats["good"].view().matches, 2);
    }

    #[test]
    fn scopes_and_disabled_rules() {
        let mut by_type = rule("t", expr("temperature > 30"));
        by_type.scope = RuleScope::DeviceType("other".into());
        let mut one = rule("one", expr("temperature > 30"));
        one.scope = RuleScope::Device(DeviceId::parse("d2").unwrap());
        let mut off = rule("off", expr("temperature > 30"));
        off.enabled = false;
        let mut t = engine(vec![by_type, one, off]);
        assert!(
            t.on_telemetry(&event("d1", &[("temperature", 50.0)]), 0)
                .is_empty()
        );
        assert_eq!(t.on_telemetry(&event("d2", &[("temperature", 50.0)]), 0).len(), 1);
    }

    #[test]
    fn unchanged_rules_keep_state_across_reloads_and_active_alarms_are_seeded() {
        let r = rule(
            "dur",
            ConditionSpec::Duration {
                expression: "temperature > 30".into(),
                for_ms: 10_000,
            },
        );
        let mut t = engine(vec![r.clone()]);
        temp(&mut t, "d1", 31.0, 0);
        t.set_rules(vec![r.clone()], &[]);
        assert_eq!(temp(&mut t, "d1", 31.0, 10_000).len(), 1);
        let mut hot = rule("hot", expr("temperature > 30"));
        hot.clear = Some(ClearSpec {
            expression: "temperature < 25".into(),
            for_ms: 0,
        });
        let mut t = TenantRules::new(tenant(), Arc::new(Sandbox::default()), 3.0, StatsBoard::default());
        t.set_rules(vec![hot], &[(DeviceId::parse("d1").unwrap(), "hot".into())]);
        assert_eq!(temp(&mut t, "d1", 20.0, 0), vec![CLEAR]);
    }
}
