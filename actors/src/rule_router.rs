//! `RuleRouter`: the telemetry pipeline's rules observer. Runs on an arbiter thread of its own,
//! starts one [`RuleActor`] per tenant on that tenant's first event, and routes telemetry,
//! rule reloads and operator clears to it; it also notes the metric names each tenant reports
//! ([`SeenMetrics`](crate::rules::seen_metrics::SeenMetrics)). A tenant whose rules fall behind loses events (counted); ingestion never
//! waits for rules. Scripts run on the `RuleWorkers`' threads, never on this one. Telemetry
//! goes to the tenant's queue in the workers directly while the tenant's [`RuleGate`] is open,
//! and through its rule actor while its rules load.
//!
//! Messages: [`ObservedTelemetry`] (the pipeline's, a turn's events at once) and
//! [`TelemetryAccepted`], [`AnalyticsFindings`] (from the analytics actors),
//! [`SpanningTelemetry`], [`ReloadRules`], [`AlarmClosed`], [`StopRules`], [`InspectRules`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::ids::TenantId;
use crate::pipeline::{ObservedTelemetry, TelemetryAccepted};
use crate::rule_actor::{
    AlarmClosed, ReloadRules, RuleActor, RuleGate, RuleSettings, SpanningTelemetry, judge_event,
};
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
    /// Events its full mailbox or its queue in the workers refused (dropped and counted).
    pub dropped: u64,
    pub mailbox_capacity: usize,
    pub connected: bool,
}

pub struct RuleRouter {
    settings: RuleSettings,
    tenants: HashMap<TenantId, (Addr<RuleActor>, Arc<RuleGate>)>,
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

    fn actor(&mut self, tenant: &TenantId) -> &(Addr<RuleActor>, Arc<RuleGate>) {
        let settings = &self.settings;
        let routed = &mut self.routed;
        self.tenants.entry(tenant.clone()).or_insert_with(|| {
            routed.insert(tenant.clone(), (Utc::now(), 0, 0));
            let (actor, gate) = RuleActor::new(tenant.clone(), settings.clone());
            // The capacity is set before the address is handed out (not in `started`), so a
            // burst that arrives while the actor starts is not dropped against actix's default.
            let addr = RuleActor::create(|ctx| {
                ctx.set_mailbox_capacity(settings.mailbox);
                actor
            });
            (addr, gate)
        })
    }

    /// A telemetry event for `tenant`'s rules: straight to its queue in the workers when the
    /// gate is open, else through its rule actor. `false` when it was refused.
    fn route(&mut self, tenant: &TenantId, event: TelemetryAccepted) -> bool {
        self.actor(tenant);
        let Some((actor, gate)) = self.tenants.get(tenant) else {
            return false;
        };
        if gate.open() {
            return judge_event(&self.settings, gate, tenant, event);
        }
        let sent = actor.try_send(event).is_ok();
        gate.sent_via_actor(sent);
        if !sent {
            self.settings.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }
}

impl Actor for RuleRouter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(crate::pipeline::router_mailbox(self.settings.mailbox));
    }
}

impl Handler<ObservedTelemetry> for RuleRouter {
    type Result = ();

    /// The events' room in the router's queue is given back once all are routed.
    fn handle(&mut self, msg: ObservedTelemetry, ctx: &mut Context<Self>) {
        for event in msg.events {
            <Self as Handler<TelemetryAccepted>>::handle(self, event, ctx);
        }
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
        let refused = !self.route(&tenant, msg);
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
        let Some((actor, _)) = self.tenants.get(&msg.tenant) else {
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
        let refused = self.actor(&tenant).0.try_send(msg).is_err();
        if refused {
            self.settings.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Handler<ReloadRules> for RuleRouter {
    type Result = ();

    fn handle(&mut self, msg: ReloadRules, _ctx: &mut Context<Self>) {
        // Control messages wait for room rather than being lost; a reload already waiting in
        // the actor's mailbox will read this change too.
        let (actor, gate) = self.actor(&msg.tenant.clone());
        if gate.reload_wanted() {
            actor.do_send(msg);
        }
    }
}

impl Handler<AlarmClosed> for RuleRouter {
    type Result = ();

    fn handle(&mut self, msg: AlarmClosed, _ctx: &mut Context<Self>) {
        if let Some((actor, _)) = self.tenants.get(&msg.tenant) {
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
            .map(|(tenant, (addr, _))| {
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
            mailbox_capacity: crate::pipeline::router_mailbox(self.settings.mailbox),
            rule_actors,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use async_trait::async_trait;

    use super::*;
    use crate::clock::SystemClock;
    use crate::ids::DeviceId;
    use crate::rule_actor::{AlarmSignals, RuleCounters};
    use crate::rule_workers::{RuleWorkers, WorkerSettings};
    use crate::rules::findings::AnalyticsDemand;
    use crate::rules::script::Sandbox;
    use crate::rules::seen_metrics::SeenMetrics;
    use crate::rules::stats::StatsBoard;
    use crate::rules::{AlarmChange, AlarmSignal, ConditionSpec, RuleScope, RuleSource, RuleSpec, Severity};
    use crate::telemetry::{MetricName, MetricValue, TelemetryPoint};

    fn tenant() -> TenantId {
        TenantId::parse("acme").unwrap()
    }

    /// Rules that load only once the test lets them.
    struct GatedSource {
        enabled: bool,
        release: tokio::sync::watch::Receiver<bool>,
        /// Times the rules were read.
        loads: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[async_trait]
    impl RuleSource for GatedSource {
        async fn tenant_rules(&self, tenant: &TenantId) -> Result<Vec<RuleSpec>, String> {
            let mut release = self.release.clone();
            let _ = release.wait_for(|go| *go).await;
            self.loads.fetch_add(1, Ordering::Relaxed);
            Ok(vec![RuleSpec {
                id: "hot".into(),
                tenant: tenant.clone(),
                name: "hot".into(),
                enabled: self.enabled,
                severity: Severity::Major,
                metric: Some("temperature".into()),
                window_ms: 60_000,
                condition: ConditionSpec::Expression {
                    expression: "temperature > 50".into(),
                },
                clear: None,
                scope: RuleScope::All,
            }])
        }

        async fn active_alarms(&self, _tenant: &TenantId) -> Result<Vec<(DeviceId, String)>, String> {
            Ok(Vec::new())
        }
    }

    struct Collector(Arc<Mutex<Vec<AlarmSignal>>>);

    impl Actor for Collector {
        type Context = Context<Self>;
    }

    impl Handler<AlarmSignals> for Collector {
        type Result = ();

        fn handle(&mut self, msg: AlarmSignals, _ctx: &mut Context<Self>) {
            self.0.lock().unwrap().extend(msg.signals);
        }
    }

    fn event(temperature: f64) -> TelemetryAccepted {
        TelemetryAccepted {
            tenant: tenant(),
            device: DeviceId::parse("d1").unwrap(),
            device_type: "thermo".into(),
            metadata: Arc::default(),
            shadow: None,
            points: vec![TelemetryPoint {
                tenant: tenant(),
                device: DeviceId::parse("d1").unwrap(),
                device_type: "thermo".into(),
                metric: MetricName::parse("temperature").unwrap(),
                ts_ms: 1,
                value: MetricValue::Number(temperature),
            }]
            .into(),
        }
    }

    struct Setup {
        router: Addr<RuleRouter>,
        release: tokio::sync::watch::Sender<bool>,
        board: StatsBoard,
        signals: Arc<Mutex<Vec<AlarmSignal>>>,
        loads: Arc<std::sync::atomic::AtomicUsize>,
        _arbiter: Arbiter,
    }

    /// A router whose rule actors have a mailbox of 8 events, and workers that queue 100,000.
    fn setup(enabled: bool) -> Setup {
        let signals = Arc::new(Mutex::new(Vec::new()));
        let board = StatsBoard::default();
        let counters = Arc::new(RuleCounters::default());
        let workers = RuleWorkers::start(WorkerSettings {
            threads: 1,
            slice: Duration::from_millis(20),
            queue_capacity: 100_000,
            shared_capacity: 0,
            sandbox: Arc::new(Sandbox::default()),
            anomaly_threshold: 3.0,
            board: board.clone(),
            sink: Collector(signals.clone()).start().recipient(),
            counters: counters.clone(),
            nice: 0,
        })
        .unwrap();
        let (release, gate) = tokio::sync::watch::channel(false);
        let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (router, arbiter) = RuleRouter::start_on_own_thread(RuleSettings {
            source: Arc::new(GatedSource {
                enabled,
                release: gate,
                loads: loads.clone(),
            }),
            workers,
            seen: Arc::new(SeenMetrics::default()),
            demand: Arc::new(AnalyticsDemand::default()),
            clock: Arc::new(SystemClock),
            tick: Duration::from_secs(3600),
            counters,
            mailbox: 8,
            spanning: None,
        });
        Setup {
            router,
            release,
            board,
            signals,
            loads,
            _arbiter: arbiter,
        }
    }

    fn evaluations(board: &StatsBoard) -> u64 {
        board
            .lock()
            .unwrap()
            .get("hot")
            .map_or(0, |s| s.view().evaluations)
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[actix::test]
    async fn events_wait_for_loading_rules_and_then_skip_the_actors_mailbox() {
        let s = setup(true);
        // Sent while the rules load: it waits in the rule actor's mailbox for them.
        s.router.send(event(60.0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            evaluations(&s.board),
            0,
            "nothing judged before the rules are there"
        );
        s.release.send(true).unwrap();
        until("the event sent during the load to be judged", || {
            evaluations(&s.board) == 1
        })
        .await;
        until("its alarm", || {
            s.signals
                .lock()
                .unwrap()
                .iter()
                .any(|sig| matches!(sig.change, AlarmChange::Raise { .. }))
        })
        .await;
        // A burst far beyond the actor's mailbox of 8: every event reaches the workers.
        for n in 0..5_000 {
            s.router.do_send(event(f64::from(n % 40)));
        }
        until("the burst to be judged", || evaluations(&s.board) == 5_001).await;
        let snapshot = s.router.send(InspectRules {}).await.unwrap();
        let actor = &snapshot.rule_actors[0];
        assert_eq!((actor.messages_handled, actor.dropped), (5_001, 0));
    }

    #[actix::test]
    async fn a_tenant_without_enabled_rules_judges_nothing_and_drops_nothing() {
        let s = setup(false);
        s.release.send(true).unwrap();
        s.router.send(event(60.0)).await.unwrap();
        until("the rules to load", || {
            s.board.lock().unwrap().contains_key("hot")
        })
        .await;
        for _ in 0..2_000 {
            s.router.do_send(event(60.0));
        }
        s.router.send(event(60.0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let snapshot = s.router.send(InspectRules {}).await.unwrap();
        assert_eq!(snapshot.rule_actors[0].dropped, 0);
        assert_eq!(evaluations(&s.board), 0);
        assert!(s.signals.lock().unwrap().is_empty());
    }

    #[actix::test]
    async fn a_burst_of_rule_changes_reloads_a_few_times_not_once_each() {
        let s = setup(true);
        let reload = || ReloadRules { tenant: tenant() };
        // The first change starts the tenant's actor (and its first load), which holds the
        // rules back until released: the other 199 find a reload waiting.
        for _ in 0..200 {
            s.router.do_send(reload());
        }
        s.router.send(event(60.0)).await.unwrap();
        s.release.send(true).unwrap();
        until("the event to be judged", || evaluations(&s.board) == 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let loads = s.loads.load(Ordering::Relaxed);
        assert!((1..=3).contains(&loads), "{loads} loads for 200 changes");
        // A change after them is read again.
        s.router.send(reload()).await.unwrap();
        until("one more load", || s.loads.load(Ordering::Relaxed) == loads + 1).await;
    }
}
