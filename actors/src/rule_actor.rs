//! `RuleActor`: one per tenant. Loads the tenant's rules (re-reading them every minute, since
//! group and tag members change without a rule changing), and hands the tenant's rule changes,
//! operator clears and ticks to the [`RuleWorkers`], where the tenant's rules are evaluated. The
//! actor itself runs no script: it shares its thread with the other tenants' actors.
//!
//! Telemetry reaches the workers from the router directly, without a second mailbox, when the
//! tenant's [`RuleGate`] is open: rules loaded and none of the tenant's events still waiting in
//! the actor's mailbox. While the rules (re)load, the router sends the events through the
//! actor instead, whose mailbox waits for the load, so a rule created just before an event
//! judges it and the events keep their order. A tenant without enabled rules queues nothing.
//!
//! Messages: [`TelemetryAccepted`] and [`AnalyticsFindings`] (from the router), [`ReloadRules`]
//! (a rule changed), [`AlarmClosed`] (an operator cleared an alarm), [`SpanningTelemetry`]
//! (another node's event for the group and absence rules this node judges).
//!
//! In a cluster, rules whose state spans devices (group, absence) are judged by one node at a
//! time, the holder of the tenant's lease ([`Spanning`]): the other nodes judge their devices'
//! events with the per-device rules only and forward them to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use actix::prelude::*;

use crate::clock::SharedClock;
use crate::ids::{DeviceId, TenantId};
use crate::pipeline::TelemetryAccepted;
use crate::rule_workers::{RuleWork, RuleWorkers};
use crate::rules::findings::{AnalyticsDemand, AnalyticsFindings, TenantDemand};
use crate::rules::seen_metrics::SeenMetrics;
use crate::rules::{AlarmSignal, Judge, RuleSource, Spanning};

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

/// Telemetry another node forwarded because this node judges the tenant's spanning rules
/// (group, absence); `now_ms` is when it arrived there.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct SpanningTelemetry {
    pub event: TelemetryAccepted,
    pub now_ms: i64,
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
    /// Telemetry events not evaluated because the tenant's queue, its actor's mailbox or the
    /// router's mailbox was full.
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
    /// In a cluster: where the tenants' spanning rules (group, absence) are judged. `None` on a
    /// single node, which judges every rule itself.
    pub spanning: Option<Arc<dyn Spanning>>,
}

/// How often a tenant's rules are re-read even when none changed, so group and tag scopes follow
/// membership changes (a rule whose members did not change keeps its state).
pub const SCOPE_REFRESH: Duration = Duration::from_secs(60);

/// What a tenant's rule actor shares with the router (both run on the router's thread): whether
/// telemetry may go to the workers directly, and what judging an event needs to know.
#[derive(Debug)]
pub struct RuleGate {
    /// Events the router sent through the actor's mailbox that it has not handled yet.
    via_actor: AtomicUsize,
    /// The rules are loading after a change (or for the first time); the actor's mailbox waits
    /// meanwhile, and so do the tenant's events.
    loading: AtomicBool,
    /// A reload waits in the actor's mailbox: a further rule change needs no other one (the
    /// waiting reload reads the rules after it).
    reload_queued: AtomicBool,
    /// The tenant has enabled rules: its events need judging.
    has_rules: AtomicBool,
    /// The tenant has enabled rules whose state spans devices (group, absence).
    spans: AtomicBool,
    /// This node judges them (always on a single node).
    judging: AtomicBool,
}

impl RuleGate {
    fn new(judging: bool) -> RuleGate {
        RuleGate {
            via_actor: AtomicUsize::new(0),
            // Until the first load, events wait for the rules in the actor's mailbox.
            loading: AtomicBool::new(true),
            reload_queued: AtomicBool::new(false),
            has_rules: AtomicBool::new(false),
            spans: AtomicBool::new(false),
            judging: AtomicBool::new(judging),
        }
    }

    /// Whether an event may go to the workers now, ahead of nothing: the rules are loaded and
    /// no earlier event of the tenant waits in the actor's mailbox.
    pub fn open(&self) -> bool {
        !self.loading.load(Ordering::Acquire) && self.via_actor.load(Ordering::Acquire) == 0
    }

    /// The router sends an event through the actor; `false` undoes it (the mailbox was full).
    pub fn sent_via_actor(&self, sent: bool) {
        if sent {
            self.via_actor.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A rule changed: `true` when a reload must be sent to the actor, `false` when one is
    /// already waiting there (so creating 1,000 rules in a row reloads a few times, not 1,000).
    pub fn reload_wanted(&self) -> bool {
        !self.reload_queued.swap(true, Ordering::AcqRel)
    }

    fn handled_via_actor(&self) {
        // Saturating: the actor also takes events not counted here (from tests, or sent
        // before the gate existed).
        let _ = self
            .via_actor
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

/// Hands a telemetry event to the tenant's queue in the workers (`false`: the queue refused it),
/// or nothing when the tenant has no enabled rule. In a cluster where another node judges the
/// tenant's group and absence rules, that node gets the event too.
pub fn judge_event(
    settings: &RuleSettings,
    gate: &RuleGate,
    tenant: &TenantId,
    event: TelemetryAccepted,
) -> bool {
    if !gate.has_rules.load(Ordering::Acquire) {
        return true;
    }
    let now_ms = settings.clock.now_ms();
    let judge = match &settings.spanning {
        Some(spanning) if gate.spans.load(Ordering::Acquire) && !gate.judging.load(Ordering::Acquire) => {
            spanning.forward(&event, now_ms);
            Judge::PerDevice
        }
        _ => Judge::All,
    };
    settings
        .workers
        .push(tenant, RuleWork::Telemetry { event, now_ms, judge })
}

pub struct RuleActor {
    tenant: TenantId,
    settings: RuleSettings,
    gate: Arc<RuleGate>,
}

impl RuleActor {
    /// The actor and the gate the router consults before sending it telemetry.
    pub fn new(tenant: TenantId, settings: RuleSettings) -> (RuleActor, Arc<RuleGate>) {
        let gate = Arc::new(RuleGate::new(settings.spanning.is_none()));
        let actor = RuleActor {
            tenant,
            settings,
            gate: gate.clone(),
        };
        (actor, gate)
    }

    fn spans(&self) -> bool {
        self.gate.spans.load(Ordering::Acquire)
    }

    fn judging(&self) -> bool {
        self.gate.judging.load(Ordering::Acquire)
    }

    /// Follows the tenant's spanning-rules lease: when this node starts judging them, their
    /// state is rebuilt from the registry (active alarms, connected devices); when it stops,
    /// it is dropped.
    fn follow_lease(&mut self, ctx: &mut Context<Self>) {
        let Some(spanning) = &self.settings.spanning else {
            return;
        };
        let judging = self.spans() && spanning.judged_here(&self.tenant);
        if judging == self.judging() {
            return;
        }
        self.gate.judging.store(judging, Ordering::Release);
        let now_ms = self.settings.clock.now_ms();
        if !judging {
            tracing::info!(tenant = %self.tenant, "group and absence rules are judged on another node now");
            self.push(RuleWork::ResetSpanning {
                judging,
                now_ms,
                active: Vec::new(),
                connected: Vec::new(),
            });
            return;
        }
        tracing::info!(tenant = %self.tenant, "judging the tenant's group and absence rules on this node");
        let source = self.settings.source.clone();
        let tenant = self.tenant.clone();
        let fut = async move {
            let active = source.active_alarms(&tenant).await?;
            let connected = source.connected_devices(&tenant).await?;
            Ok::<_, String>((active, connected))
        };
        ctx.wait(fut.into_actor(self).map(move |result, actor, _| {
            let (active, connected) = result.unwrap_or_else(|error| {
                tracing::warn!(tenant = %actor.tenant, %error, "cannot read the tenant's alarms and connected devices");
                (Vec::new(), Vec::new())
            });
            actor.push(RuleWork::ResetSpanning {
                judging: true,
                now_ms,
                active,
                connected,
            });
        }));
    }

    fn push(&self, work: RuleWork) {
        self.settings.workers.push(&self.tenant, work);
    }

    /// Loads the rules; the mailbox waits meanwhile. With `hold` (a rule changed) the router
    /// sends the tenant's events through the mailbox too, so none is judged by a stale set;
    /// the periodic refresh of scopes lets them flow.
    fn load(&mut self, ctx: &mut Context<Self>, hold: bool) {
        if hold {
            self.gate.loading.store(true, Ordering::Release);
        }
        let source = self.settings.source.clone();
        let tenant = self.tenant.clone();
        let fut = async move {
            let rules = source.tenant_rules(&tenant).await?;
            let active = source.active_alarms(&tenant).await?;
            Ok::<_, String>((rules, active))
        };
        ctx.wait(fut.into_actor(self).map(move |result, actor, ctx| match result {
            Ok((rules, active)) => {
                actor.settings.demand.set(&actor.tenant, TenantDemand::of(&rules));
                let spans = rules.iter().any(|r| r.enabled && r.condition.spans_devices());
                actor.gate.spans.store(spans, Ordering::Release);
                actor
                    .gate
                    .has_rules
                    .store(rules.iter().any(|r| r.enabled), Ordering::Release);
                if let Some(spanning) = &actor.settings.spanning {
                    spanning.want(&actor.tenant, spans);
                }
                actor.push(RuleWork::SetRules { rules, active });
                actor.follow_lease(ctx);
                if hold {
                    actor.gate.loading.store(false, Ordering::Release);
                }
            }
            Err(error) => {
                tracing::warn!(tenant = %actor.tenant, %error, "cannot load rules");
                // The rules judged so far stay; events flow again.
                if hold {
                    actor.gate.loading.store(false, Ordering::Release);
                }
            }
        }));
    }
}

impl Actor for RuleActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.settings.mailbox);
        self.load(ctx, true);
        ctx.run_interval(SCOPE_REFRESH, |actor, ctx| actor.load(ctx, false));
        ctx.run_interval(self.settings.tick, |actor, ctx| {
            actor.follow_lease(ctx);
            let now_ms = actor.settings.clock.now_ms();
            actor.push(RuleWork::Tick {
                now_ms,
                spanning: actor.judging(),
            });
        });
    }
}

impl Handler<TelemetryAccepted> for RuleActor {
    type Result = ();

    fn handle(&mut self, msg: TelemetryAccepted, _ctx: &mut Context<Self>) {
        self.gate.handled_via_actor();
        judge_event(&self.settings, &self.gate, &self.tenant, msg);
    }
}

impl Handler<SpanningTelemetry> for RuleActor {
    type Result = ();

    fn handle(&mut self, msg: SpanningTelemetry, _ctx: &mut Context<Self>) {
        // Forwarded while this node held the lease; after it moved on, the new holder's state
        // starts afresh anyway.
        if !self.judging() {
            tracing::debug!(tenant = %self.tenant, device = %msg.event.device, "forwarded telemetry for rules judged elsewhere now");
            return;
        }
        self.push(RuleWork::Telemetry {
            event: msg.event,
            now_ms: msg.now_ms,
            judge: Judge::Spanning,
        });
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
        // Cleared before the rules are read: a change from now on queues another reload.
        self.gate.reload_queued.store(false, Ordering::Release);
        self.load(ctx, true);
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
