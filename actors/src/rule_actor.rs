//! `RuleActor`: one per tenant. Owns the tenant's [`TenantRules`] (rules, windows, per-device
//! condition state), evaluates every accepted telemetry batch of the tenant's devices, fires
//! time-based conditions on a tick, re-reads its rules every minute (group and tag members
//! change without a rule changing), and hands the resulting alarm changes to the alarm sink.
//!
//! Messages: [`TelemetryAccepted`] (from the router), [`ReloadRules`] (a rule changed),
//! [`AlarmClosed`] (an operator cleared an alarm).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::prelude::*;

use crate::clock::SharedClock;
use crate::ids::{DeviceId, TenantId};
use crate::pipeline::TelemetryAccepted;
use crate::rules::evaluator::TenantRules;
use crate::rules::script::Sandbox;
use crate::rules::stats::StatsBoard;
use crate::rules::{AlarmSignal, RuleSource};

/// Re-read the tenant's rules from the source.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ReloadRules {
    pub tenant: TenantId,
}

/// An alarm was closed from outside (operator clear): its condition may raise it again.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct AlarmClosed {
    pub tenant: TenantId,
    pub rule_id: String,
    pub device: DeviceId,
}

/// Alarm changes from one evaluation, for the alarm service.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct AlarmSignals {
    pub signals: Vec<AlarmSignal>,
}

/// Counters the rules engine exposes in `/metrics`.
#[derive(Debug, Default)]
pub struct RuleCounters {
    /// Telemetry events a rule actor missed because its mailbox was full.
    pub dropped: AtomicU64,
    /// Alarm changes handed to the alarm service.
    pub signals: AtomicU64,
    /// Alarm changes the alarm service could not take (its mailbox was full).
    pub signals_dropped: AtomicU64,
    /// Rules that failed to load (bad expression stored before validation existed, for instance).
    pub load_errors: AtomicU64,
}

/// What every rule actor shares.
#[derive(Clone)]
pub struct RuleSettings {
    pub source: Arc<dyn RuleSource>,
    pub sink: Recipient<AlarmSignals>,
    pub clock: SharedClock,
    pub sandbox: Arc<Sandbox>,
    pub anomaly_threshold: f64,
    /// How often absence timers are checked.
    pub tick: Duration,
    pub board: StatsBoard,
    pub counters: Arc<RuleCounters>,
    pub mailbox: usize,
}

/// How often a tenant's rules are re-read even when none changed, so group and tag scopes follow
/// membership changes (a rule whose members did not change keeps its state).
pub const SCOPE_REFRESH: Duration = Duration::from_secs(60);

pub struct RuleActor {
    tenant: TenantId,
    settings: RuleSettings,
    rules: TenantRules,
}

impl RuleActor {
    pub fn new(tenant: TenantId, settings: RuleSettings) -> RuleActor {
        let rules = TenantRules::new(
            tenant.clone(),
            settings.sandbox.clone(),
            settings.anomaly_threshold,
            settings.board.clone(),
        );
        RuleActor {
            tenant,
            settings,
            rules,
        }
    }

    fn emit(&self, signals: Vec<AlarmSignal>) {
        if signals.is_empty() {
            return;
        }
        let n = signals.len() as u64;
        if self.settings.sink.try_send(AlarmSignals { signals }).is_err() {
            self.settings
                .counters
                .signals_dropped
                .fetch_add(n, Ordering::Relaxed);
        } else {
            self.settings.counters.signals.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Loads the rules; the mailbox waits meanwhile, so no telemetry is judged by a stale set.
    fn load(&mut self, ctx: &mut Context<Self>) {
        let source = self.settings.source.clone();
        let tenant = self.tenant.clone();
        let fut = async move {
            let rules = source.tenant_rules(&tenant).await?;
            let active = source.active_alarms(&tenant).await?;
            Ok::<_, String>((rules, active))
        };
        ctx.wait(fut.into_actor(self).map(|result, actor, _| match result {
            Ok((rules, active)) => {
                let errors = actor.rules.set_rules(rules, &active);
                for error in &errors {
                    tracing::warn!(tenant = %actor.tenant, %error, "rule not loaded");
                }
                actor
                    .settings
                    .counters
                    .load_errors
                    .fetch_add(errors.len() as u64, Ordering::Relaxed);
                tracing::debug!(tenant = %actor.tenant, rules = actor.rules.rule_count(), "rules loaded");
            }
            Err(error) => tracing::warn!(tenant = %actor.tenant, %error, "cannot load rules"),
        }));
    }
}

impl Actor for RuleActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.settings.mailbox);
        self.load(ctx);
        ctx.run_interval(SCOPE_REFRESH, |actor, ctx| actor.load(ctx));
        ctx.run_interval(self.settings.tick, |actor, _| {
            let now = actor.settings.clock.now_ms();
            let signals = actor.rules.on_tick(now);
            actor.emit(signals);
        });
    }
}

impl Handler<TelemetryAccepted> for RuleActor {
    type Result = ();

    fn handle(&mut self, msg: TelemetryAccepted, _ctx: &mut Context<Self>) {
        let now = self.settings.clock.now_ms();
        let signals = self.rules.on_telemetry(&msg, now);
        self.emit(signals);
    }
}

impl Handler<ReloadRules> for RuleActor {
    type Result = ();

    fn handle(&mut self, _msg: ReloadRules, ctx: &mut Context<Self>) {
        self.load(ctx);
    }
}

impl Handler<AlarmClosed> for RuleActor {
    type Result = ();

    fn handle(&mut self, msg: AlarmClosed, _ctx: &mut Context<Self>) {
        self.rules.alarm_closed(&msg.rule_id, &msg.device);
    }
}
