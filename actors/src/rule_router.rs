//! `RuleRouter`: the telemetry pipeline's rules observer. Runs on an arbiter thread of its own,
//! starts one [`RuleActor`] per tenant on that tenant's first event, and routes telemetry,
//! rule reloads and operator clears to it; it also notes the metric names each tenant reports
//! ([`SeenMetrics`](crate::rules::seen_metrics::SeenMetrics)). A tenant whose rules fall behind loses events (counted); ingestion never
//! waits for rules. Scripts run on the `RuleWorkers`' threads, never on this one.
//!
//! Messages: [`TelemetryAccepted`], [`ReloadRules`], [`AlarmClosed`], [`StopRules`].

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use actix::prelude::*;

use crate::ids::TenantId;
use crate::pipeline::TelemetryAccepted;
use crate::rule_actor::{AlarmClosed, ReloadRules, RuleActor, RuleSettings};

/// Stops every rule actor (shutdown).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct StopRules {}

pub struct RuleRouter {
    settings: RuleSettings,
    tenants: HashMap<TenantId, Addr<RuleActor>>,
}

impl RuleRouter {
    /// Starts the router and its rule actors on a new arbiter thread.
    pub fn start_on_own_thread(settings: RuleSettings) -> (Addr<RuleRouter>, Arbiter) {
        let arbiter = Arbiter::new();
        let addr = RuleRouter::start_in_arbiter(&arbiter.handle(), move |_| RuleRouter {
            settings,
            tenants: HashMap::new(),
        });
        (addr, arbiter)
    }

    fn actor(&mut self, tenant: &TenantId) -> &Addr<RuleActor> {
        let settings = &self.settings;
        self.tenants
            .entry(tenant.clone())
            .or_insert_with(|| RuleActor::new(tenant.clone(), settings.clone()).start())
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
        if self.actor(&tenant).try_send(msg).is_err() {
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
