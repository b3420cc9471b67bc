//! Rules engine figures for `/metrics`: notifications by channel kind and outcome, delivery
//! attempts that failed, alarm changes, and the evaluation counters the actors keep.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use drover_actors::rule_actor::RuleCounters;
use drover_actors::rules::stats::StatsBoard;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, Opts};

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct RulesMetrics {
    /// Notifications by kind (webhook, email, sms, mqttCommand, shadowPatch) and outcome.
    pub notifications: IntCounterVec,
    /// Failed delivery attempts (each retry counts) by kind.
    pub attempt_failures: IntCounterVec,
    /// Alarm changes by event (opened, updated, escalated, cleared, acknowledged).
    pub alarms: IntCounterVec,
    /// Alarm signals the alarm service could not store.
    pub store_errors: IntCounter,
}

impl RulesMetrics {
    pub fn new(metrics: &Metrics, counters: Arc<RuleCounters>, board: StatsBoard) -> RulesMetrics {
        let notifications = IntCounterVec::new(
            Opts::new(
                "drover_rule_notifications_total",
                "Notifications sent by channel kind and outcome (delivered, failed)",
            ),
            &["kind", "outcome"],
        )
        .expect("valid metric");
        let attempt_failures = IntCounterVec::new(
            Opts::new(
                "drover_rule_delivery_attempt_failures_total",
                "Failed notification attempts (retries included) by channel kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let alarms = IntCounterVec::new(
            Opts::new("drover_alarm_events_total", "Alarm changes by event"),
            &["event"],
        )
        .expect("valid metric");
        let store_errors = IntCounter::new(
            "drover_alarm_store_errors_total",
            "Alarm changes that could not be written to the registry",
        )
        .expect("valid metric");
        metrics.register(Box::new(notifications.clone()));
        metrics.register(Box::new(attempt_failures.clone()));
        metrics.register(Box::new(alarms.clone()));
        metrics.register(Box::new(store_errors.clone()));
        metrics.register(Box::new(EngineCollector::new(counters, board)));
        RulesMetrics {
            notifications,
            attempt_failures,
            alarms,
            store_errors,
        }
    }
}

/// Reads the actors' atomic counters at scrape time.
struct EngineCollector {
    counters: Arc<RuleCounters>,
    board: StatsBoard,
    descs: Vec<Desc>,
}

const ENGINE_FIGURES: &[(&str, &str)] = &[
    (
        "drover_rule_events_dropped_total",
        "Telemetry events not evaluated because the rules engine was behind: its router's mailbox, a tenant's rule actor or rule queue was full",
    ),
    (
        "drover_rule_events_queued",
        "Telemetry events waiting for a rule evaluation thread",
    ),
    (
        "drover_rule_slices_exhausted_total",
        "Turns in which a tenant's rules used their whole time slice and waited behind the other tenants",
    ),
    (
        "drover_rule_signals_total",
        "Alarm changes rule evaluation produced",
    ),
    (
        "drover_rule_signals_dropped_total",
        "Alarm changes dropped because the alarm service was behind",
    ),
    (
        "drover_rule_load_errors_total",
        "Stored rules that failed to load",
    ),
    (
        "drover_rule_evaluations_total",
        "Rule evaluations (one rule on one message) of loaded rules",
    ),
    (
        "drover_rule_errors_total",
        "Rule evaluations that failed at run time (limit hits and timeouts included)",
    ),
    (
        "drover_rule_limit_hits_total",
        "Rule evaluations stopped by a sandbox limit",
    ),
    (
        "drover_rule_evaluation_timeouts_total",
        "Rule evaluations stopped by the wall-time limit (RULES_EVAL_TIMEOUT_MS)",
    ),
    (
        "drover_rules_stopped",
        "Rules stopped after hitting a sandbox limit",
    ),
];

impl EngineCollector {
    fn new(counters: Arc<RuleCounters>, board: StatsBoard) -> EngineCollector {
        let descs = ENGINE_FIGURES
            .iter()
            .map(|(name, help)| {
                Desc::new(name.to_string(), help.to_string(), vec![], Default::default())
                    .expect("valid metric")
            })
            .collect();
        EngineCollector {
            counters,
            board,
            descs,
        }
    }
}

impl Collector for EngineCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (mut evaluations, mut errors, mut limits, mut timeouts, mut stopped) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        if let Ok(board) = self.board.lock() {
            for stats in board.values() {
                let v = stats.view();
                evaluations += v.evaluations;
                errors += v.errors + v.limit_hits + v.timeouts;
                limits += v.limit_hits;
                timeouts += v.timeouts;
                stopped += u64::from(v.status == "stopped");
            }
        }
        let c = &self.counters;
        let values = [
            c.dropped.load(Ordering::Relaxed),
            c.queued.load(Ordering::Relaxed),
            c.slices_exhausted.load(Ordering::Relaxed),
            c.signals.load(Ordering::Relaxed),
            c.signals_dropped.load(Ordering::Relaxed),
            c.load_errors.load(Ordering::Relaxed),
            evaluations,
            errors,
            limits,
            timeouts,
            stopped,
        ];
        ENGINE_FIGURES
            .iter()
            .zip(values)
            .map(|((name, help), value)| {
                if name.ends_with("_total") {
                    let counter = IntCounter::new(*name, *help).expect("valid metric");
                    counter.inc_by(value);
                    counter.collect().remove(0)
                } else {
                    let gauge = prometheus::IntGauge::new(*name, *help).expect("valid metric");
                    gauge.set(value as i64);
                    gauge.collect().remove(0)
                }
            })
            .collect()
    }
}
