//! `AnalyticsRouter`: the telemetry pipeline's analytics observer. Runs on an arbiter thread of
//! its own, starts one [`AnalyticsActor`] per tenant on that tenant's first event and routes
//! telemetry and configuration reloads to it. A tenant whose analytics fall behind loses events
//! (counted in `drover_analytics_events_dropped_total`); ingestion never waits for analytics.
//!
//! Messages: [`ObservedTelemetry`] (the pipeline's, a turn's events at once),
//! [`TelemetryAccepted`], [`ReloadAnalytics`], [`FlushAnalytics`], [`StopAnalytics`].

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use actix::prelude::*;

use super::actor::{AnalyticsActor, AnalyticsDeps, FlushAnalytics, ReloadAnalytics};
use crate::ids::TenantId;
use crate::pipeline::{ObservedTelemetry, TelemetryAccepted};

/// Stops every analytics actor (shutdown); they flush and save their snapshots as they stop.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct StopAnalytics {}

pub struct AnalyticsRouter {
    deps: AnalyticsDeps,
    tenants: HashMap<TenantId, Addr<AnalyticsActor>>,
}

impl AnalyticsRouter {
    /// Starts the router and its tenant actors on a new arbiter thread.
    pub fn start_on_own_thread(deps: AnalyticsDeps) -> (Addr<AnalyticsRouter>, Arbiter) {
        let arbiter = Arbiter::new();
        let addr = AnalyticsRouter::start_in_arbiter(&arbiter.handle(), move |_| AnalyticsRouter {
            deps,
            tenants: HashMap::new(),
        });
        (addr, arbiter)
    }

    fn actor(&mut self, tenant: &TenantId) -> &Addr<AnalyticsActor> {
        let deps = &self.deps;
        self.tenants.entry(tenant.clone()).or_insert_with(|| {
            // The capacity is set before the address is handed out: a burst that arrives
            // while the actor starts (loading its snapshots) waits rather than being dropped
            // against actix's default of 16.
            AnalyticsActor::create(|ctx| {
                ctx.set_mailbox_capacity(deps.mailbox.max(16));
                AnalyticsActor::new(tenant.clone(), deps.clone())
            })
        })
    }
}

impl Actor for AnalyticsRouter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(crate::pipeline::router_mailbox(self.deps.mailbox));
    }
}

impl Handler<ObservedTelemetry> for AnalyticsRouter {
    type Result = ();

    /// The events' room in the router's queue is given back once all are routed.
    fn handle(&mut self, msg: ObservedTelemetry, ctx: &mut Context<Self>) {
        for event in msg.events {
            <Self as Handler<TelemetryAccepted>>::handle(self, event, ctx);
        }
    }
}

impl Handler<TelemetryAccepted> for AnalyticsRouter {
    type Result = ();

    fn handle(&mut self, msg: TelemetryAccepted, _ctx: &mut Context<Self>) {
        let tenant = msg.tenant.clone();
        if self.actor(&tenant).try_send(msg).is_err() {
            self.deps.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Handler<ReloadAnalytics> for AnalyticsRouter {
    type Result = ();

    fn handle(&mut self, msg: ReloadAnalytics, _ctx: &mut Context<Self>) {
        // Only a running actor has configuration to reload; a new one reads it as it starts.
        if let Some(actor) = self.tenants.get(&msg.tenant) {
            actor.do_send(msg);
        }
    }
}

impl Handler<FlushAnalytics> for AnalyticsRouter {
    type Result = ResponseFuture<()>;

    /// Answers once every tenant's actor has stored what it had.
    fn handle(&mut self, msg: FlushAnalytics, _ctx: &mut Context<Self>) -> Self::Result {
        let sends: Vec<_> = self.tenants.values().map(|a| a.send(msg.clone())).collect();
        Box::pin(async move {
            for send in sends {
                let _ = send.await;
            }
        })
    }
}

impl Handler<StopAnalytics> for AnalyticsRouter {
    type Result = ();

    fn handle(&mut self, _msg: StopAnalytics, ctx: &mut Context<Self>) {
        self.tenants.clear();
        ctx.stop();
    }
}
