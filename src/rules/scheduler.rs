//! `EscalationScheduler`: runs due escalation steps. Due times live in the registry
//! (`alarms.next_escalation_at`), so a restart loses none; each tick asks for the active,
//! unacknowledged alarms that are due by the injected clock, moves each one step on (a
//! conditional update, so a step fires once) and starts that step's notifications.

use std::sync::Arc;
use std::time::Duration;

use drover_actors::clock::SharedClock;

use super::metrics::RulesMetrics;
use super::notifier::Notifier;
use super::view::AlarmView;
use crate::dashboard::DashboardHub;
use crate::storage::RegistryStore;

pub struct EscalationScheduler {
    pub registry: RegistryStore,
    pub notifier: Arc<Notifier>,
    pub hub: DashboardHub,
    pub clock: SharedClock,
    pub metrics: RulesMetrics,
    pub tick: Duration,
}

impl EscalationScheduler {
    /// Runs until the task is aborted.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = self.pass().await {
                tracing::warn!(%error, "escalation pass failed");
            }
        }
    }

    /// One pass over what is due now.
    pub async fn pass(&self) -> Result<usize, String> {
        let now = self.clock.now_ms();
        let due = self
            .registry
            .due_escalations(now, 200)
            .await
            .map_err(|e| e.to_string())?;
        let mut fired = 0;
        for alarm in due {
            let rule = self
                .registry
                .get_rule(&alarm.tenant, &alarm.rule_id)
                .await
                .map_err(|e| e.to_string())?;
            let step = alarm.escalation_step.max(1) as usize;
            let next_at = rule
                .as_ref()
                .and_then(|r| r.body.escalation.get(step))
                .map(|s| alarm.first_seen + s.after_secs as i64 * 1000);
            let moved = self
                .registry
                .advance_escalation(
                    alarm.id.clone(),
                    alarm.escalation_step,
                    next_at,
                    now,
                    format!("escalation step {step}"),
                )
                .await
                .map_err(|e| e.to_string())?;
            if !moved {
                continue;
            }
            let Some(rule) = rule else { continue };
            fired += 1;
            self.metrics.alarms.with_label_values(&["escalated"]).inc();
            tracing::info!(alarm = %alarm.id, step, "alarm escalated");
            let mut view = AlarmView::from(&alarm);
            view.escalation_step = step as i32;
            view.next_escalation_at = next_at.map(crate::storage::registry::from_ms);
            self.hub.alarm("escalated", view);
            self.notifier
                .dispatch(&alarm, rule.body.step_actions(step), step, "alarm.escalated");
        }
        Ok(fired)
    }
}
