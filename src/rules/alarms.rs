//! `AlarmService`: turns the rule actors' alarm signals into alarms. Opens an alarm or updates
//! the active one of the (device, rule) (repeats count, they do not notify again; severity may
//! rise), clears it when its clear condition held, applies the rule's notification policy
//! (per-rule rate limit, quiet period after a clear), starts the notifications, and tells the
//! live stream.
//!
//! Messages: [`AlarmSignals`] from the rule actors, handled one batch at a time in order so the
//! changes of one alarm never race each other; [`InspectAlarmService`] for `GET /admin/actors`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use actix::prelude::*;
use drover_actors::clock::SharedClock;
use drover_actors::rule_actor::AlarmSignals;
use drover_actors::rules::{AlarmChange, AlarmSignal};

use super::metrics::RulesMetrics;
use super::notifier::Notifier;
use super::view::AlarmView;
use crate::dashboard::DashboardHub;
use crate::storage::RegistryStore;
use crate::storage::rules::RaiseOutcome;

const HOUR_MS: i64 = 3_600_000;
const MAILBOX: usize = 4096;

/// Reports the service's figures (answered between two batches).
#[derive(Message)]
#[rtype(result = "AlarmServiceSnapshot")]
pub struct InspectAlarmService {}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AlarmServiceSnapshot {
    #[serde(serialize_with = "drover_actors::clock::rfc3339_ms")]
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Batches of alarm signals handled.
    pub messages_handled: u64,
    pub signals_handled: u64,
    pub mailbox_capacity: usize,
    /// Rules that notified within the last hour (their rate limit is tracked).
    pub rate_limited_rules: usize,
}

pub struct AlarmService {
    pub registry: RegistryStore,
    pub notifier: Arc<Notifier>,
    pub hub: DashboardHub,
    pub clock: SharedClock,
    pub metrics: RulesMetrics,
    /// When each rule last notified, within the last hour (its rate limit).
    sent: HashMap<String, VecDeque<i64>>,
    started_at: chrono::DateTime<chrono::Utc>,
    batches: u64,
    signals: u64,
}

impl AlarmService {
    pub fn new(
        registry: RegistryStore,
        notifier: Arc<Notifier>,
        hub: DashboardHub,
        clock: SharedClock,
        metrics: RulesMetrics,
    ) -> AlarmService {
        AlarmService {
            registry,
            notifier,
            hub,
            clock,
            metrics,
            sent: HashMap::new(),
            started_at: chrono::Utc::now(),
            batches: 0,
            signals: 0,
        }
    }

    /// Whether rule `rule_id` may notify now (and counts it when it may).
    fn within_rate(&mut self, rule_id: &str, max_per_hour: u32, now: i64) -> bool {
        if max_per_hour == 0 {
            return true;
        }
        let sent = self.sent.entry(rule_id.to_string()).or_default();
        while sent.front().is_some_and(|t| now - *t >= HOUR_MS) {
            sent.pop_front();
        }
        if sent.len() >= max_per_hour as usize {
            return false;
        }
        sent.push_back(now);
        true
    }
}

impl Actor for AlarmService {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX);
    }
}

impl Handler<InspectAlarmService> for AlarmService {
    type Result = MessageResult<InspectAlarmService>;

    fn handle(&mut self, _msg: InspectAlarmService, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(AlarmServiceSnapshot {
            started_at: self.started_at,
            messages_handled: self.batches,
            signals_handled: self.signals,
            mailbox_capacity: MAILBOX,
            rate_limited_rules: self.sent.len(),
        })
    }
}

async fn apply(
    registry: RegistryStore,
    signal: AlarmSignal,
) -> Result<
    Option<(
        AlarmSignal,
        Option<crate::storage::rules::RuleRecord>,
        RaiseOutcome,
    )>,
    String,
> {
    let rule = registry
        .get_rule(&signal.tenant, &signal.rule_id)
        .await
        .map_err(|e| e.to_string())?;
    match signal.change {
        AlarmChange::Raise {
            severity,
            value,
            occurrences,
        } => {
            let Some(rule) = rule else { return Ok(None) };
            let first_escalation = rule.body.escalation.first().map(|s| s.after_secs as i64 * 1000);
            let outcome = registry
                .raise_alarm(
                    signal.tenant.clone(),
                    signal.rule_id.clone(),
                    signal.rule_name.clone(),
                    signal.device.to_string(),
                    severity,
                    value,
                    occurrences,
                    signal.details.clone(),
                    signal.at_ms,
                    rule.body.notify.quiet_period_secs as i64 * 1000,
                    first_escalation,
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(Some((signal, Some(rule), outcome)))
        }
        AlarmChange::Clear { repeats } => {
            let cleared = registry
                .auto_clear_alarm(
                    signal.tenant.clone(),
                    signal.rule_id.clone(),
                    signal.device.to_string(),
                    repeats,
                    signal.at_ms,
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok(cleared.map(|alarm| {
                (
                    signal,
                    rule,
                    RaiseOutcome::Updated {
                        alarm,
                        severity_rose: false,
                    },
                )
            }))
        }
    }
}

impl Handler<AlarmSignals> for AlarmService {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: AlarmSignals, _ctx: &mut Context<Self>) -> Self::Result {
        self.batches += 1;
        self.signals += msg.signals.len() as u64;
        let registry = self.registry.clone();
        let work = async move {
            let mut done = Vec::with_capacity(msg.signals.len());
            for signal in msg.signals {
                done.push(apply(registry.clone(), signal).await);
            }
            done
        };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|results, actor, _| {
            for result in results {
                match result {
                    Ok(Some((signal, rule, outcome))) => actor.after(signal, rule, outcome),
                    Ok(None) => {}
                    Err(error) => {
                        actor.metrics.store_errors.inc();
                        tracing::warn!(%error, "cannot store an alarm change");
                    }
                }
            }
        })))
    }
}

impl AlarmService {
    fn after(
        &mut self,
        signal: AlarmSignal,
        rule: Option<crate::storage::rules::RuleRecord>,
        outcome: RaiseOutcome,
    ) {
        match (signal.change, outcome) {
            (AlarmChange::Clear { .. }, RaiseOutcome::Updated { alarm, .. }) => {
                self.metrics.alarms.with_label_values(&["cleared"]).inc();
                tracing::info!(alarm = %alarm.id, device = %alarm.device, rule = %alarm.rule_name, "alarm cleared");
                self.hub.alarm("cleared", AlarmView::from(&alarm));
            }
            (_, RaiseOutcome::Created { alarm, quiet }) => {
                self.metrics.alarms.with_label_values(&["opened"]).inc();
                tracing::info!(alarm = %alarm.id, device = %alarm.device, rule = %alarm.rule_name, severity = alarm.severity.as_str(), "alarm opened");
                self.hub.alarm("opened", AlarmView::from(&alarm));
                let Some(rule) = rule else { return };
                if quiet {
                    return;
                }
                let now = self.clock.now_ms();
                if !self.within_rate(&alarm.rule_id, rule.body.notify.max_per_hour, now) {
                    let registry = self.registry.clone();
                    let id = alarm.id.clone();
                    actix_rt::spawn(async move {
                        let _ = registry
                            .add_alarm_event(
                                id,
                                now,
                                "suppressed",
                                "the rule's notification rate limit is reached: not notified".into(),
                            )
                            .await;
                    });
                    return;
                }
                self.notifier
                    .dispatch(&alarm, rule.body.step_actions(0), 0, "alarm.opened");
            }
            (_, RaiseOutcome::Updated { alarm, severity_rose }) => {
                self.metrics.alarms.with_label_values(&["updated"]).inc();
                if severity_rose {
                    self.hub.alarm("updated", AlarmView::from(&alarm));
                }
            }
        }
    }
}
