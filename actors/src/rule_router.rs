//! `RuleRouter`: the telemetry pipeline's rules observer. Runs on an arbiter thread of its own,
//! starts one [`RuleActor`] per tenant on that tenant's first event, and routes telemetry,
//! rule reloads and operator clears to it; it also notes the metric names each tenant reports
//! ([`SeenMetrics`](crate::rules::seen_metrics::SeenMetrics)). A tenant whose rules fall behind loses events (counted); ingestion never
//! waits for rules. Scripts run on the `RuleWorkers`' threads, never on this one.
//!
//! Messages: [`TelemetryAccepted`], [`AnalyticsFindings`] (from the analytics actors),
//! [`SpanningTelemetry`], [`ReloadRules`], [`AlarmClosed`], [`StopRules`], [`InspectRules`].

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::ids::TenantId;
use crate::pipeline::TelemetryAccepted;
use crate::rule_actor::{AlarmClosed, ReloadRules, RuleActor, RuleSettings, SpanningTelemetry};
use crate::rules::findings::AnalyticsFindings;

/// Stops every rule actor (shutdown).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct StopRules {}

/// Reports the router and its rule actors, for `GET /admin/actors`.
#[derive(Message, Debug, Clone)]
#[rtype(result = "RulesSnapshot")]
pub struct InspectRules {}

/// What [`InspectRules`] answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RulesSnapshot {
    #[serde(serialize_with = "crate::clock::rfc3339_ms")]
    pub started_at: DateTime<Utc>,
    /// Telemetry events routed to rule actors (dropped ones included).
    pub messages_handled: u64,
    pub mailbox_capacity: usize,
    /// One rule actor per tenant that sent telemetry or changed its rules.
    pub rule_actors: Vec<RuleActorInfo>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleActorInfo {
    pub tenant: TenantId,
    #[serde(serialize_with = "crate::clock::rfc3339_ms")]
    pub started_at: DateTime<Utc>,
    /// Telemetry events offered to it.
    pub messages_handled: u64,
    /// Events its full mailbox refused (dropped and counted).
    pub dropped: u64,
    pub mailbox_capacity: usize,
    pub connected: bool,
}

pub struct RuleRouter {
    settings: RuleSettings,
    tenants: HashMap<TenantId, Addr<RuleActor>>,
    started_at: DateTime<Utc>,
    handled: u64,
    /// Per tenant: when its rule actor started, events offered, events refused.
    routed: HashMap<TenantId, (DateTime<Utc>, u64, u64)>,
}

impl RuleRouter {
    /// Starts the router and its rule actors on a new arbiter thread.
    pub fn start_on_own_thread(settings: RuleSettings) -> (Addr<RuleRouter>, Arbiter) {
        let arbiter = Arbiter::new();
        let addr = RuleRouter::start_in_arbiter(&arbiter.handle(), move |_| RuleRouter {
            settings,
            tenants: HashMap::new(),
            started_at: Utc::now(),
            handled: 0,
            routed: HashMap::new(),
        });
        (addr, arbiter)
    }

    fn actor(&mut self, tenant: &TenantId) -> &Addr<RuleActor> {
        let settings = &self.settings;
        let routed = &mut self.routed;
        self.tenants.entry(tenant.clone()).or_insert_with(|| {
            routed.insert(tenant.clone(), (Utc::now(), 0, 0));
            // The capacity is set before the address is handed out (not in `started`), so a
            // burst that arrives while the actor starts is not dropped against actix's default.
            RuleActor::create(|ctx| {
                ctx.set_mailbox_capacity(settings.mailbox);
                RuleActor::new(tenant.clone(), settings.clone())
            })
        })
    }
}

impl Actor for RuleRouter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.settings.mailbox.max(1024));
    }
}

impl Handler<TelemetryAccepted> for RuleRouter {
    type Result = ();

    fn handle(&mut self, msg: TelemetryAccepted, _ctx: &mut Context<Self>) {
        let tenant = msg.tenant.clone();
        self.settings
            .seen
            .observe(&tenant, msg.points.iter().map(|p| p.metric.as_str()));
        self.handled += 1;
        let refused = self.actor(&tenant).try_send(msg).is_err();
        if refused {
            self.settings.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((_, offered, dropped)) = self.routed.get_mut(&tenant) {
            *offered += 1;
            *dropped += u64::from(refused);
        }
    }
}

impl Handler<AnalyticsFindings> for RuleRouter {
    type Result = ();

    /// Routed like telemetry: a tenant whose rules are behind loses findings (counted). Only a
    /// tenant with a rule actor has rules that asked for them.
    fn handle(&mut self, msg: AnalyticsFindings, _ctx: &mut Context<Self>) {
        let Some(actor) = self.tenants.get(&msg.tenant) else {
            return;
        };
        let tenant = msg.tenant.clone();
        let refused = actor.try_send(msg).is_err();
        if refused {
            self.settings.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if let Some((_, offered, dropped)) = self.routed.get_mut(&tenant) {
            *offered += 1;
            *dropped += u64::from(refused);
        }
    }
}

impl Handler<SpanningTelemetry> for RuleRouter {
    type Result = ();

    fn handle(&mut self, msg: SpanningTelemetry, _ctx: &mut Context<Self>) {
        let tenant = msg.event.tenant.clone();
        self.handled += 1;
        let refused = self.actor(&tenant).try_send(msg).is_err();
        if refused {
            self.settings.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Handler<ReloadRules> for RuleRouter {
    type Result = ();

    fn handle(&mut self, msg: ReloadRules, _ctx: &mut Context<Self>) {
        // Control messages wait for room rather than being lost.
        self.actor(&msg.tenant.clone()).do_send(msg);
    }
}

impl Handler<AlarmClosed> for RuleRouter {
    type Result = ();

    fn handle(&mut self, msg: AlarmClosed, _ctx: &mut Context<Self>) {
        if let Some(actor) = self.tenants.get(&msg.tenant) {
            actor.do_send(msg);
        }
    }
}

impl Handler<StopRules> for RuleRouter {
    type Result = ();

    fn handle(&mut self, _msg: StopRules, ctx: &mut Context<Self>) {
        self.tenants.clear();
        ctx.stop();
    }
}

impl Handler<InspectRules> for RuleRouter {
    type Result = MessageResult<InspectRules>;

    fn handle(&mut self, _msg: InspectRules, _ctx: &mut Context<Self>) -> Self::Result {
        let mut rule_actors: Vec<RuleActorInfo> = self
            .tenants
            .iter()
            .map(|(tenant, addr)| {
                let (started_at, offered, dropped) =
                    self.routed
                        .get(tenant)
                        .copied()
                        .unwrap_or((self.started_at, 0, 0));
                RuleActorInfo {
                    tenant: tenant.clone(),
                    started_at,
                    messages_handled: offered,
                    dropped,
                    mailbox_capacity: self.settings.mailbox,
                    connected: addr.connected(),
                }
            })
            .collect();
        rule_actors.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        MessageResult(RulesSnapshot {
            started_at: self.started_at,
            messages_handled: self.handled,
            mailbox_capacity: self.settings.mailbox.max(1024),
            rule_actors,
        })
    }
}
