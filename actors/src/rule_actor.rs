//! `RuleActor`: one per tenant. Loads the tenant's rules (re-reading them every minute, since
//! group and tag members change without a rule changing), and hands the tenant's telemetry,
//! rule changes, operator clears and ticks to the [`RuleWorkers`] in the order they came, where
//! the tenant's rules are evaluated. The actor itself runs no script: it shares its thread with
//! the other tenants' actors.
//!
//! Messages: [`TelemetryAccepted`] and [`AnalyticsFindings`] (from the router), [`ReloadRules`]
//! (a rule changed), [`AlarmClosed`] (an operator cleared an alarm).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use actix::prelude::*;

use crate::clock::SharedClock;
use crate::ids::{DeviceId, TenantId};
use crate::pipeline::TelemetryAccepted;
use crate::rule_workers::{RuleWork, RuleWorkers};
use crate::rules::findings::{AnalyticsDemand, AnalyticsFindings, TenantDemand};
use crate::rules::seen_metrics::SeenMetrics;
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
    /// Telemetry events not evaluated because the tenant's queue (or its actor's mailbox) was
    /// full.
    pub dropped: AtomicU64,
    /// Telemetry events waiting for an evaluation thread.
    pub queued: AtomicU64,
    /// Turns in which a tenant used its whole time slice with work left, and went behind the
    /// other tenants with work.
    pub slices_exhausted: AtomicU64,
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
    pub workers: Arc<RuleWorkers>,
    /// Metric names each tenant reported (fed by the router, read when rules are created).
    pub seen: Arc<SeenMetrics>,
    /// What each tenant's `anomaly` and `forecast` rules need from the analytics (written here
    /// when rules load, read by the analytics actors).
    pub demand: Arc<AnalyticsDemand>,
    pub clock: SharedClock,
    /// How often absence timers are checked.
    pub tick: Duration,
    pub counters: Arc<RuleCounters>,
    pub mailbox: usize,
}

/// How often a tenant's rules are re-read even when none changed, so group and tag scopes follow
/// membership changes (a rule whose members did not change keeps its state).
pub const SCOPE_REFRESH: Duration = Duration::from_secs(60);

pub struct RuleActor {
    tenant: TenantId,
    settings: RuleSettings,
}

impl RuleActor {
    pub fn new(tenant: TenantId, settings: RuleSettings) -> RuleActor {
        RuleActor { tenant, settings }
    }

    fn push(&self, work: RuleWork) {
        self.settings.workers.push(&self.tenant, work);
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
                actor.settings.demand.set(&actor.tenant, TenantDemand::of(&rules));
                actor.push(RuleWork::SetRules { rules, active });
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
            let now_ms = actor.settings.clock.now_ms();
            actor.push(RuleWork::Tick { now_ms });
        });
    }
}

impl Handler<TelemetryAccepted> for RuleActor {
    type Result = ();

    fn handle(&mut self, msg: TelemetryAccepted, _ctx: &mut Context<Self>) {
        let now_ms = self.settings.clock.now_ms();
        self.push(RuleWork::Telemetry { event: msg, now_ms });
    }
}

impl Handler<AnalyticsFindings> for RuleActor {
    type Result = ();

    fn handle(&mut self, msg: AnalyticsFindings, _ctx: &mut Context<Self>) {
        let now_ms = self.settings.clock.now_ms();
        self.push(RuleWork::Findings {
            findings: msg,
            now_ms,
        });
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
        self.push(RuleWork::AlarmClosed {
            rule_id: msg.rule_id,
            device: msg.device,
        });
    }
}
