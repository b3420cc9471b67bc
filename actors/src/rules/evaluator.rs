//! Evaluation of one tenant's rules: pure state machines, no actors, no I/O.
//!
//! [`TenantRules::on_telemetry`] takes one accepted batch and the server time it arrived at and
//! returns the alarm changes it causes; [`TenantRules::on_telemetry_until`] does the same in
//! steps, pausing between two rule evaluations when its caller's time is up (so one tenant's
//! slow rules cannot hold an evaluation thread that other tenants wait for);
//! [`TenantRules::on_tick`] fires time-based conditions (absence). Window statistics are per (device, metric) and cover the values that arrived before
//! the message being evaluated. A rule whose expression hits a sandbox limit at run time is
//! stopped (its stats say why) and the tenant's other rules carry on. The condition types
//! themselves are in `condition`, the per-rule counters in `stats`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::json;

use super::condition::{
    CompiledRule, Condition, DeviceRuleState, DeviceState, EvalContext, GroupState, Message, Unreadable,
    compile_condition, evaluate, evaluate_findings,
};
use super::findings::AnalyticsFindings;
use super::index::{Bits, RuleIndex};
use super::script::{Sandbox, ScriptError};
use super::stats::{RuleStats, StatsBoard};
use super::{AlarmChange, AlarmSignal, Judge, RuleSpec};
use crate::ids::{DeviceId, TenantId};
use crate::pipeline::TelemetryAccepted;
use crate::telemetry::MetricValue;

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
    /// Where the batch that paused resumes.
    cursor: Option<Cursor>,
    /// The rules grouped by shape, so that a message is judged by a group at once.
    index: RuleIndex,
    /// Judge each rule on its own (tests compare the two ways).
    #[cfg(test)]
    unindexed: bool,
}

/// A position in a batch: the message (in timestamp order) and the rule to judge it next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Cursor {
    message: usize,
    rule: usize,
}

/// Whether [`TenantRules::on_telemetry_until`] judged the whole batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Done,
    /// Time was up: the same batch must be passed again, before anything else of the tenant.
    Paused,
}

/// Why a rule could not be loaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rule {rule}: {error}")]
pub struct LoadError {
    pub rule: String,
    pub error: ScriptError,
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
            cursor: None,
            index: RuleIndex::default(),
            #[cfg(test)]
            unindexed: false,
        }
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Replaces the rule set. A rule whose spec did not change keeps its state; a changed one
    /// starts afresh (and runs again if it had been stopped). Rules that fail to compile are
    /// left out and reported.
    pub fn set_rules(&mut self, specs: Vec<RuleSpec>, active: &[(DeviceId, String)]) -> Vec<LoadError> {
        // A batch paused for this change resumes at the message it stopped in, judged by the new
        // set from its first rule (rule indexes mean nothing in the new set).
        self.cursor = self.cursor.map(|c| Cursor {
            message: c.message,
            rule: 0,
        });
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
                grouped: false,
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
        drop(board);
        self.reindex();
        errors
    }

    fn reindex(&mut self) {
        self.index = RuleIndex::build(&mut self.rules);
        #[cfg(test)]
        if self.unindexed {
            for rule in &mut self.rules {
                rule.grouped = false;
                rule.stats.share(None);
            }
            self.index = RuleIndex::default();
        }
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

    /// This node starts (`judging`) or stops judging the tenant's spanning rules (group,
    /// absence). Their state starts afresh either way: group windows are empty, the alarms
    /// active now (`active`) are seeded, and every device's absence timer restarts at `now_ms`
    /// (the devices `connected` to any node are watched from now on, even before they speak).
    /// So an absence alarm may come up to its duration late after a takeover, never early.
    pub fn reset_spanning(
        &mut self,
        judging: bool,
        now_ms: i64,
        active: &[(DeviceId, String)],
        connected: &[(DeviceId, String)],
    ) {
        for rule in self.rules.iter_mut().filter(|r| r.spec.condition.spans_devices()) {
            rule.devices.clear();
            rule.group = GroupState::default();
            if !judging {
                continue;
            }
            for (device, rule_id) in active {
                if *rule_id == rule.spec.id {
                    rule.devices.entry(device.clone()).or_default().active = true;
                    if matches!(rule.condition, Condition::Group { .. }) {
                        rule.group.active_device = Some(device.clone());
                    }
                }
            }
        }
        if judging {
            for (device, device_type) in connected {
                let state = self.devices.entry(device.clone()).or_default();
                if state.device_type.is_empty() {
                    state.device_type = device_type.clone();
                }
            }
        }
        for device in self.devices.values_mut() {
            device.last_seen_ms = device.last_seen_ms.max(now_ms);
        }
    }

    /// Evaluates every rule in scope on each message of the batch, in timestamp order.
    pub fn on_telemetry(&mut self, event: &TelemetryAccepted, now_ms: i64) -> Vec<AlarmSignal> {
        let mut out = Vec::new();
        self.on_telemetry_until(event, now_ms, &mut out, &mut || false);
        out
    }

    /// As [`TenantRules::on_telemetry`], asking `out_of_time` after each rule evaluation: when
    /// it answers `true`, evaluation pauses there and the next call with the same batch resumes
    /// at the next rule (each call judges at least one rule or one message, so a batch always
    /// moves on).
    /// Between a `Paused` and the call that resumes it, only [`TenantRules::set_rules`] may
    /// change these rules.
    pub fn on_telemetry_until(
        &mut self,
        event: &TelemetryAccepted,
        now_ms: i64,
        out: &mut Vec<AlarmSignal>,
        out_of_time: &mut dyn FnMut() -> bool,
    ) -> Progress {
        self.judge_until(event, now_ms, Judge::All, out, out_of_time)
    }

    /// As [`TenantRules::on_telemetry_until`], with only the rules `judge` admits (in a cluster,
    /// spanning rules are judged on one node; see [`Judge`]). The device's last-seen time and
    /// windows are kept whatever the rules judged.
    pub fn judge_until(
        &mut self,
        event: &TelemetryAccepted,
        now_ms: i64,
        judge: Judge,
        out: &mut Vec<AlarmSignal>,
        out_of_time: &mut dyn FnMut() -> bool,
    ) -> Progress {
        let mut by_ts: BTreeMap<i64, Vec<(&str, &MetricValue)>> = BTreeMap::new();
        for p in event.points.iter() {
            by_ts
                .entry(p.ts_ms)
                .or_default()
                .push((p.metric.as_str(), &p.value));
        }
        let messages = by_ts.len();
        let start = self.cursor.take().unwrap_or_default();
        for (index, (_, metrics)) in by_ts.into_iter().enumerate().skip(start.message) {
            let first_rule = if index == start.message { start.rule } else { 0 };
            let message = Message { event, metrics };
            if let Some(rule) = self.on_message(&message, now_ms, judge, first_rule, out, out_of_time) {
                self.cursor = Some(Cursor { message: index, rule });
                return Progress::Paused;
            }
            if index + 1 < messages && out_of_time() {
                self.cursor = Some(Cursor {
                    message: index + 1,
                    rule: 0,
                });
                return Progress::Paused;
            }
        }
        Progress::Done
    }

    /// Judges one message from rule `first_rule` on; `Some(next rule)` when time ran out before
    /// the last rule (the message then joins the windows when it is finished).
    fn on_message(
        &mut self,
        message: &Message,
        now_ms: i64,
        judge: Judge,
        first_rule: usize,
        out: &mut Vec<AlarmSignal>,
        out_of_time: &mut dyn FnMut() -> bool,
    ) -> Option<usize> {
        let event = message.event;
        let device = self.devices.entry(event.device.clone()).or_default();
        device.last_seen_ms = now_ms;
        if *device.device_type != *event.device_type {
            device.device_type = event.device_type.to_string();
        }
        let mut ctx = EvalContext::new(&self.sandbox, message, &*device, now_ms);
        // The rules to judge one by one: those outside the index, the grouped ones that keep
        // state for the device, and those of each group whose predicate holds (or all of a
        // group whose values are not all numbers: rhai has the last word on them).
        let run = if self.index.len() == self.rules.len() {
            let mut run = Bits::new(self.rules.len());
            if let Some(stateful) = self.index.stateful.get(&event.device) {
                run.union(stateful);
            }
            let mut values = Vec::new();
            for candidates in self.index.candidates(&event.device, &event.device_type) {
                run.union(&candidates.ungrouped);
                for group in candidates.groups.iter().map(|g| &self.index.groups[*g]) {
                    let probe = &self.rules[group.probe()].spec;
                    if !judge.admits(probe) || !probe.scope.matches(&event.device, &event.device_type) {
                        continue;
                    }
                    // A message resumed after a pause was counted when it started.
                    if first_rule == 0 {
                        group.evaluations.fetch_add(1, Ordering::Relaxed);
                    }
                    match ctx.predicate_values(&group.predicate, &group.window_metrics, probe, &mut values) {
                        Ok(()) => group.holding(&values, &mut run),
                        // The rule's metric or a window is missing: judged alone, each member
                        // would only count the message as skipped; those with state are judged
                        // alone all the same (a clear condition may not need what is missing).
                        // Counted once per message, like the evaluations.
                        Err(Unreadable::Missing(_)) if first_rule > 0 => {}
                        Err(Unreadable::Missing(_)) => {
                            let stateful = self.index.stateful.get(&event.device);
                            for (_, position) in &group.members {
                                let stats = &self.rules[*position].stats;
                                if !stateful.is_some_and(|s| s.contains(*position))
                                    && !stats.stopped.load(Ordering::Relaxed)
                                {
                                    stats.skipped.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        // A value is not a number: rhai judges each member.
                        Err(Unreadable::NotNumeric) => group.all(&mut run),
                    }
                }
            }
            run.ones_from(first_rule)
        } else {
            (first_rule..self.rules.len()).collect()
        };
        let count = self.rules.len();
        for index in run {
            let rule = &mut self.rules[index];
            if !rule.spec.enabled
                || !judge.admits(&rule.spec)
                || rule.stats.stopped.load(Ordering::Relaxed)
                || !rule.spec.scope.matches(&event.device, &event.device_type)
            {
                continue;
            }
            if let Some(signal) = evaluate(rule, &mut ctx, &self.tenant) {
                out.push(signal);
            }
            // An idle state is no state: dropping it keeps memory to the devices and rules
            // that have something to remember, and tells the index what to judge next time.
            let stateful = match rule.devices.get(&event.device) {
                Some(state) if state.is_idle() => {
                    rule.devices.remove(&event.device);
                    false
                }
                Some(_) => true,
                None => false,
            };
            if rule.grouped {
                self.index.set_stateful(&event.device, index, stateful);
            }
            if index + 1 < count && out_of_time() {
                return Some(index + 1);
            }
        }
        // The message joins the windows after it was judged against them.
        let keep = self.keep_ms;
        let device = self.devices.entry(event.device.clone()).or_default();
        if keep > 0 {
            for (name, value) in &message.metrics {
                if let Some(v) = value.as_f64() {
                    let window = match device.windows.get_mut(*name) {
                        Some(window) => window,
                        None => device.windows.entry(name.to_string()).or_default(),
                    };
                    window.prune(now_ms, keep);
                    window.push(now_ms, v);
                }
            }
        }
        None
    }

    /// Judges the tenant's `anomaly` and `forecast` rules in scope on the analytics' findings
    /// for one device.
    pub fn on_findings(&mut self, findings: &AnalyticsFindings, now_ms: i64) -> Vec<AlarmSignal> {
        let mut out = Vec::new();
        for rule in &mut self.rules {
            if !rule.condition.on_findings()
                || !rule.spec.enabled
                || rule.stats.stopped.load(Ordering::Relaxed)
                || !rule.spec.scope.matches(&findings.device, &findings.device_type)
            {
                continue;
            }
            evaluate_findings(rule, findings, now_ms, &self.tenant, &mut out);
        }
        out
    }

    /// Reports coalesced repeats, fires time-based conditions (absence) and drops window values
    /// no rule needs any more.
    pub fn on_tick(&mut self, now_ms: i64) -> Vec<AlarmSignal> {
        self.tick(now_ms, true)
    }

    /// As [`TenantRules::on_tick`]; absence conditions fire only when `spanning` (this node
    /// judges the tenant's spanning rules).
    pub fn tick(&mut self, now_ms: i64, spanning: bool) -> Vec<AlarmSignal> {
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
            if !rule.spec.enabled || !spanning {
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::analytics::detector::Method;
    use crate::analytics::forecast::{Direction, Forecast};
    use crate::rules::findings::{Finding, ForecastFinding, MethodScore, ScoredMessage, TenantDemand};
    use crate::rules::{ClearSpec, ConditionSpec, RuleScope, Severity};
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

    /// The index changes what is judged one by one, never the outcome: a mix of rules (grouped
    /// thresholds of every ordering, window and `current` thresholds, predicates without a
    /// threshold, rhai-only expressions, durations, repeats, clears, scopes, a disabled rule)
    /// judged on random telemetry (values missing, or text, now and then), with ticks and
    /// operator clears, gives the same signals in the same order and the same counters as the
    /// same rules judged each on its own.
    #[test]
    fn the_index_judges_as_every_rule_alone_would() {
        let mut next = crate::rules::test_random(0x2545_f491_4f6c_dd1du64);
        let mut specs = Vec::new();
        for i in 0..60 {
            let t = next(40) as f64 + if next(2) == 0 { 0.5 } else { 0.0 };
            let op = ["<", "<=", ">", ">="][next(4) as usize];
            let expression = match i % 8 {
                0 | 1 => format!("temperature {op} {t}"),
                2 => format!("humidity < 0 || temperature {op} {t}"),
                3 => format!("metrics.temperature.count > 2 && metrics.temperature.max {op} {t}"),
                4 => format!("{t} {op} current"),
                5 => "temperature > humidity".to_string(),
                6 => format!("temperature + 1 {op} {t}"),
                _ => format!("!(humidity >= 50) && temperature {op} {t}"),
            };
            let condition = match next(4) {
                0 => ConditionSpec::Duration {
                    expression,
                    for_ms: 3,
                },
                1 => ConditionSpec::Repeating {
                    expression,
                    count: 2,
                    within_ms: 10,
                },
                _ => expr(&expression),
            };
            let mut r = rule(&format!("r{i}"), condition);
            if next(3) == 0 {
                r.clear = Some(ClearSpec {
                    expression: format!("temperature < {}", t - 5.0),
                    for_ms: next(3) as i64,
                });
            }
            r.scope = match next(6) {
                0 => RuleScope::DeviceType("thermo".into()),
                1 => RuleScope::DeviceType("other".into()),
                2 => RuleScope::Device(DeviceId::parse("d2").unwrap()),
                _ => RuleScope::All,
            };
            r.enabled = i != 17;
            specs.push(r);
        }
        let mut indexed = engine(specs.clone());
        let alone_board = StatsBoard::default();
        let mut alone = TenantRules::new(tenant(), Arc::new(Sandbox::default()), 3.0, alone_board.clone());
        alone.unindexed = true;
        assert_eq!(alone.set_rules(specs.clone(), &[]), vec![]);
        assert!(!indexed.index.groups.is_empty());
        assert!(alone.rules.iter().all(|r| !r.grouped));

        for step in 0..600i64 {
            let device = ["d1", "d2", "d3"][next(3) as usize];
            let mut points = Vec::new();
            for metric in ["temperature", "humidity"] {
                let value = match next(20) {
                    0 => continue,
                    1 => MetricValue::Text("n/a".into()),
                    _ => MetricValue::Number(next(45) as f64 - 2.0),
                };
                points.push(TelemetryPoint {
                    tenant: tenant(),
                    device: DeviceId::parse(device).unwrap(),
                    device_type: "thermo".into(),
                    metric: MetricName::parse(metric).unwrap(),
                    ts_ms: step,
                    value,
                });
            }
            let mut e = event(device, &[]);
            e.points = points.into();
            let a = indexed.on_telemetry(&e, step);
            let b = alone.on_telemetry(&e, step);
            assert_eq!(a, b, "step {step}");
            if step % 10 == 9 {
                // A tick reports a rule's devices in its map's order, which no one relies on.
                let by_device = |mut v: Vec<AlarmSignal>| {
                    v.sort_by(|a, b| (&a.rule_id, a.device.as_str()).cmp(&(&b.rule_id, b.device.as_str())));
                    v
                };
                assert_eq!(
                    by_device(indexed.on_tick(step)),
                    by_device(alone.on_tick(step)),
                    "tick at {step}"
                );
            }
            if step % 37 == 0 {
                let rule_id = format!("r{}", next(60));
                let device = DeviceId::parse(["d1", "d2", "d3"][next(3) as usize]).unwrap();
                indexed.alarm_closed(&rule_id, &device);
                alone.alarm_closed(&rule_id, &device);
            }
        }
        let board = indexed.board.lock().unwrap();
        let alone_board = alone_board.lock().unwrap();
        let mut evaluated = 0;
        for spec in &specs {
            let (a, b) = (board[&spec.id].view(), alone_board[&spec.id].view());
            assert_eq!(a, b, "{}", spec.id);
            evaluated += a.evaluations;
        }
        assert!(evaluated > 10_000, "{evaluated}");
        assert!(
            indexed.rules.iter().map(|r| r.devices.len()).sum::<usize>()
                <= alone.rules.iter().map(|r| r.devices.len()).sum::<usize>()
        );
    }

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

    /// In a cluster: a node that does not judge the spanning rules runs the per-device ones
    /// only; the judging node gets the other nodes' events for the spanning ones only.
    #[test]
    fn judges_split_per_device_and_spanning_rules() {
        let group = rule(
            "grp",
            ConditionSpec::Group {
                expression: "temperature > 30".into(),
                min_devices: 2,
                within_ms: 60_000,
            },
        );
        let mut t = engine(vec![rule("hot", expr("temperature > 30")), group]);
        let judge = |t: &mut TenantRules, d: &str, now, judge| {
            let mut out = Vec::new();
            t.judge_until(
                &event(d, &[("temperature", 31.0)]),
                now,
                judge,
                &mut out,
                &mut || false,
            );
            out.into_iter().map(|s| s.rule_id).collect::<Vec<_>>()
        };
        assert_eq!(judge(&mut t, "a", 0, Judge::PerDevice), ["hot"]);
        assert_eq!(
            judge(&mut t, "b", 1, Judge::PerDevice),
            ["hot"],
            "the group never sees a"
        );
        assert!(
            judge(&mut t, "c", 2, Judge::Spanning).is_empty(),
            "one device so far"
        );
        assert_eq!(judge(&mut t, "d", 3, Judge::Spanning), ["grp"]);
        // Devices judged elsewhere still count as heard from.
        assert_eq!(t.devices[&DeviceId::parse("d").unwrap()].last_seen_ms, 3);
    }

    #[test]
    fn taking_over_spanning_rules_restarts_their_state() {
        let mut t = engine(vec![
            rule("off", ConditionSpec::Absence { for_ms: 30_000 }),
            rule(
                "grp",
                ConditionSpec::Group {
                    expression: "temperature > 30".into(),
                    min_devices: 2,
                    within_ms: 60_000,
                },
            ),
        ]);
        assert!(temp(&mut t, "a", 31.0, 0).is_empty());
        // Not judging: no absence alarm however long the device is silent.
        assert!(t.tick(40_000, false).is_empty());
        // Taking over at 50 s: a is watched again from then on, the connected b too (it never
        // spoke here); the group window is empty, and the alarm active elsewhere is kept.
        let active = [(DeviceId::parse("z").unwrap(), "grp".to_string())];
        let connected = [(DeviceId::parse("b").unwrap(), "thermo".to_string())];
        t.reset_spanning(true, 50_000, &active, &connected);
        assert!(
            t.tick(79_999, true).is_empty(),
            "the timer restarted at the takeover"
        );
        let mut absent: Vec<String> = t
            .tick(80_000, true)
            .into_iter()
            .map(|s| s.device.as_str().to_string())
            .collect();
        absent.sort();
        assert_eq!(absent, ["a", "b"]);
        // z's group alarm is active: two devices holding again update it, on z.
        assert!(temp(&mut t, "c", 31.0, 81_000).is_empty());
        let mut out = Vec::new();
        t.judge_until(
            &event("d", &[("temperature", 31.0)]),
            81_001,
            Judge::All,
            &mut out,
            &mut || false,
        );
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].device.as_str(), "z");
        assert_eq!(out[0].rule_id, "grp");
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

    #[test]
    fn a_paused_batch_resumes_where_it_stopped_and_judges_like_an_uninterrupted_one() {
        let rules = vec![
            rule("hot", expr("temperature > 30")),
            rule(
                "spike",
                expr("metrics.temperature.count >= 2 && current > metrics.temperature.avg"),
            ),
            rule(
                "dur",
                ConditionSpec::Duration {
                    expression: "temperature > 20".into(),
                    for_ms: 1,
                },
            ),
        ];
        let mut batch = event("d1", &[("temperature", 25.0)]);
        let points: Vec<TelemetryPoint> = [(1, 25.0), (2, 31.0), (3, 40.0), (4, 10.0)]
            .into_iter()
            .map(|(ts, v)| TelemetryPoint {
                ts_ms: ts,
                value: MetricValue::Number(v),
                ..batch.points[0].clone()
            })
            .collect();
        batch.points = points.into();
        let mut whole = engine(rules.clone());
        let expected = whole.on_telemetry(&batch, 1_000);
        assert!(expected.len() >= 2, "{expected:?}");

        // Out of time after every evaluation: one rule per call (each rule on its own), or
        // fewer calls with the index (which judges one by one only the rules whose verdict
        // holds or that keep state).
        for unindexed in [true, false] {
            let board = StatsBoard::default();
            let mut stepped = TenantRules::new(tenant(), Arc::new(Sandbox::default()), 3.0, board.clone());
            stepped.unindexed = unindexed;
            stepped.set_rules(rules.clone(), &[]);
            let mut got = Vec::new();
            let mut calls = 0;
            while stepped.on_telemetry_until(&batch, 1_000, &mut got, &mut || true) == Progress::Paused {
                calls += 1;
                assert!(calls < 100, "no progress");
            }
            if unindexed {
                assert_eq!(calls + 1, 4 * 3, "one evaluation per call");
            } else {
                assert!(calls + 1 < 4 * 3, "{calls}");
            }
            assert_eq!(got, expected);
            let stats = board.lock().unwrap();
            for id in ["hot", "spike", "dur"] {
                assert_eq!(stats[id].view().evaluations, 4, "{id} judged each message once");
            }
        }
    }

    /// The event's first point at timestamps 1..=n: a batch of n messages.
    fn repeated(mut batch: TelemetryAccepted, n: i64) -> TelemetryAccepted {
        let points: Vec<TelemetryPoint> = (1..=n)
            .map(|ts| TelemetryPoint {
                ts_ms: ts,
                ..batch.points[0].clone()
            })
            .collect();
        batch.points = points.into();
        batch
    }

    /// A message resumed after a pause is not counted twice by a group that could not decide.
    #[test]
    fn a_resumed_message_counts_a_groups_skips_once() {
        // The rhai rule comes first, so the batch pauses after it, before the group's member.
        let rules = vec![
            rule("rhai", expr("humidity + 1 > 100")),
            rule("grouped", expr("temperature > 30")),
        ];
        let batch = repeated(event("d1", &[("humidity", 50.0)]), 3);
        let board = StatsBoard::default();
        let mut t = TenantRules::new(tenant(), Arc::new(Sandbox::default()), 3.0, board.clone());
        t.set_rules(rules, &[]);
        assert!(t.rules[1].grouped && !t.rules[0].grouped);
        let mut got = Vec::new();
        let mut calls = 0;
        while t.on_telemetry_until(&batch, 1_000, &mut got, &mut || true) == Progress::Paused {
            calls += 1;
            assert!(calls < 100, "no progress");
        }
        assert!(calls >= 3, "paused after the rhai rule of each message: {calls}");
        let stats = board.lock().unwrap();
        for id in ["rhai", "grouped"] {
            let view = stats[id].view();
            assert_eq!(
                (view.evaluations, view.skipped),
                (3, 3),
                "{id}: the metric is missing"
            );
        }
    }

    #[test]
    fn rules_changed_while_a_batch_is_paused_judge_the_rest_of_it() {
        let batch = repeated(event("d1", &[("temperature", 25.0)]), 4);
        let board = StatsBoard::default();
        let mut t = TenantRules::new(tenant(), Arc::new(Sandbox::default()), 3.0, board.clone());
        // Each rule judged on its own, so that the batch pauses after "old" (the index would
        // judge "old" with its group and pause only between messages).
        t.unindexed = true;
        t.set_rules(
            vec![rule("old", expr("temperature > 30")), rule("kept", expr("true"))],
            &[],
        );
        let mut got = Vec::new();
        // Paused after the first evaluation (rule "old" on message 1).
        assert_eq!(
            t.on_telemetry_until(&batch, 1_000, &mut got, &mut || true),
            Progress::Paused
        );
        let old = board.lock().unwrap()["old"].clone();
        // "old" is deleted, "new" added while the batch waits.
        assert_eq!(
            t.set_rules(vec![rule("kept", expr("true")), rule("new", expr("true"))], &[]),
            vec![]
        );
        assert_eq!(
            t.on_telemetry_until(&batch, 1_000, &mut got, &mut || false),
            Progress::Done
        );
        assert_eq!(old.view().evaluations, 1, "the deleted rule stopped at once");
        assert!(!board.lock().unwrap().contains_key("old"));
        let stats = board.lock().unwrap();
        assert_eq!(
            stats["new"].view().evaluations,
            4,
            "the new rule judged the rest of the batch"
        );
        assert_eq!(stats["kept"].view().evaluations, 4);
    }

    fn scored(device: &str, ts: i64, scores: &[(Method, f64, f64)]) -> AnalyticsFindings {
        AnalyticsFindings {
            tenant: tenant(),
            device: DeviceId::parse(device).unwrap(),
            device_type: "thermo".into(),
            finding: Finding::Scored(vec![ScoredMessage {
                ts_ms: ts,
                scores: scores
                    .iter()
                    .map(|(method, statistic, score)| MethodScore {
                        method: *method,
                        statistic: *statistic,
                        score: *score,
                        metric: Some("temperature".into()),
                        value: Some(40.0),
                    })
                    .collect(),
            }]),
        }
    }

    fn changes(signals: Vec<AlarmSignal>) -> Vec<AlarmChange> {
        signals.into_iter().map(|s| s.change).collect()
    }

    #[test]
    fn anomaly_conditions_judge_the_named_method_and_clear_after_a_quiet_spell() {
        let mut r = rule(
            "odd",
            ConditionSpec::Anomaly {
                method: Method::Eif,
                threshold: Some(0.7),
                clear_after_ms: 10_000,
            },
        );
        r.metric = None;
        let mut t = engine(vec![r]);
        // Telemetry alone never judges it.
        assert!(temp(&mut t, "d1", 1000.0, 0).is_empty());
        assert!(
            t.on_findings(&scored("d1", 1, &[(Method::ZScore, 9.0, 3.0)]), 1)
                .is_empty(),
            "another method"
        );
        assert!(
            t.on_findings(&scored("d1", 2, &[(Method::Eif, 0.6, 0.63)]), 2)
                .is_empty()
        );
        let signals = t.on_findings(&scored("d1", 3, &[(Method::Eif, 0.8, 0.84)]), 3);
        assert_eq!(changes(signals.clone()), vec![raise(Severity::Major, 40.0)]);
        assert_eq!(signals[0].details["method"], json!("eif"));
        assert_eq!(signals[0].details["statistic"], json!(0.8));
        // Repeats of the open alarm wait for the tick; another device is its own alarm.
        assert!(
            t.on_findings(&scored("d1", 4, &[(Method::Eif, 0.9, 0.95)]), 4)
                .is_empty()
        );
        assert_eq!(
            t.on_findings(&scored("d2", 4, &[(Method::Eif, 0.9, 0.95)]), 4)
                .len(),
            1
        );
        assert_eq!(changes(t.on_tick(5)), vec![raise_n(Severity::Major, 40.0, 1)]);
        // Under the threshold: cleared once it stayed there for 10 s.
        assert!(
            t.on_findings(&scored("d1", 6, &[(Method::Eif, 0.3, 0.3)]), 6)
                .is_empty()
        );
        assert!(
            t.on_findings(&scored("d1", 7, &[(Method::Eif, 0.3, 0.3)]), 9_000)
                .is_empty()
        );
        assert_eq!(
            changes(t.on_findings(&scored("d1", 8, &[(Method::Eif, 0.3, 0.3)]), 10_006)),
            vec![CLEAR]
        );
        // Without a threshold the analytics' own flag (score >= 1) decides.
        let mut r = rule(
            "flag",
            ConditionSpec::Anomaly {
                method: Method::Mad,
                threshold: None,
                clear_after_ms: 0,
            },
        );
        r.metric = None;
        let mut t = engine(vec![r]);
        assert!(
            t.on_findings(&scored("d1", 1, &[(Method::Mad, 2.9, 0.97)]), 1)
                .is_empty()
        );
        assert_eq!(
            t.on_findings(&scored("d1", 2, &[(Method::Mad, 3.1, 1.03)]), 2)
                .len(),
            1
        );
        assert_eq!(
            changes(t.on_findings(&scored("d1", 3, &[(Method::Mad, 0.1, 0.03)]), 3)),
            vec![CLEAR],
            "clearAfterSecs 0 clears at the first quiet message"
        );
    }

    fn forecast_of(device: &str, metric: &str, last: f64, slope_per_step: f64) -> AnalyticsFindings {
        let point: Vec<f64> = (1..=100).map(|i| last + slope_per_step * i as f64).collect();
        AnalyticsFindings {
            tenant: tenant(),
            device: DeviceId::parse(device).unwrap(),
            device_type: "thermo".into(),
            finding: Finding::Forecast(ForecastFinding {
                metric: metric.into(),
                last_ts_ms: 0,
                last_value: last,
                step_ms: 3_600_000,
                forecast: Arc::new(Forecast {
                    lower: point.iter().map(|v| v - 5.0).collect(),
                    upper: point.iter().map(|v| v + 5.0).collect(),
                    point,
                    level: 0.95,
                    season: None,
                }),
            }),
        }
    }

    #[test]
    fn forecast_conditions_open_before_the_crossing_and_clear_when_it_moves_away() {
        let mut r = rule(
            "battery",
            ConditionSpec::Forecast {
                metric: "battery".into(),
                limit: 10.0,
                direction: Direction::Below,
                within_ms: 72 * 3_600_000,
            },
        );
        r.metric = None;
        let mut t = engine(vec![r]);
        // 1 % an hour from 90: 10 % in 80 h, beyond 72 h.
        assert!(
            t.on_findings(&forecast_of("d1", "battery", 90.0, -1.0), 0)
                .is_empty()
        );
        assert!(
            t.on_findings(&forecast_of("d1", "temperature", 20.0, -1.0), 0)
                .is_empty(),
            "another metric"
        );
        // From 50: 10 % in 40 h.
        let signals = t.on_findings(&forecast_of("d1", "battery", 50.0, -1.0), 1);
        assert_eq!(changes(signals.clone()), vec![raise(Severity::Major, 50.0)]);
        assert_eq!(signals[0].details["expectedInSecs"], json!(40 * 3600));
        assert_eq!(signals[0].details["earliestInSecs"], json!(35 * 3600));
        // A new battery: the next forecast no longer crosses, the alarm clears.
        assert_eq!(
            changes(t.on_findings(&forecast_of("d1", "battery", 100.0, 0.0), 2)),
            vec![CLEAR]
        );
        // Already under the limit counts as crossing now.
        assert_eq!(t.on_findings(&forecast_of("d1", "battery", 5.0, 0.0), 3).len(), 1);
        let mut r = rule(
            "hot",
            ConditionSpec::Forecast {
                metric: "vibration".into(),
                limit: 30.0,
                direction: Direction::Above,
                within_ms: 3_600_000,
            },
        );
        r.metric = None;
        let mut t = engine(vec![r]);
        assert!(
            t.on_findings(&forecast_of("d1", "vibration", 20.0, 5.0), 0)
                .is_empty(),
            "in 2 h"
        );
        assert_eq!(
            t.on_findings(&forecast_of("d1", "vibration", 26.0, 5.0), 0).len(),
            1
        );
    }

    #[test]
    fn demand_follows_the_enabled_rules_and_their_scopes() {
        let mut anomaly = rule(
            "a",
            ConditionSpec::Anomaly {
                method: Method::Ensemble,
                threshold: None,
                clear_after_ms: 0,
            },
        );
        anomaly.scope = RuleScope::DeviceType("pump".into());
        let forecast = |id: &str, within_ms| {
            rule(
                id,
                ConditionSpec::Forecast {
                    metric: "battery".into(),
                    limit: 10.0,
                    direction: Direction::Below,
                    within_ms,
                },
            )
        };
        let mut off = forecast("off", 999_999_999);
        off.enabled = false;
        let demand = TenantDemand::of(&[
            anomaly,
            forecast("f1", 1_000),
            forecast("f2", 5_000),
            off,
            rule("plain", expr("temperature > 1")),
        ]);
        let d = DeviceId::parse("d1").unwrap();
        assert!(demand.wants_scores(&d, "pump"));
        assert!(!demand.wants_scores(&d, "thermo"));
        assert_eq!(
            demand.forecasts_for(&d, "thermo"),
            HashMap::from([("battery", 5_000)])
        );
        assert!(TenantDemand::of(&[rule("plain", expr("temperature > 1"))]).is_empty());
    }
}
