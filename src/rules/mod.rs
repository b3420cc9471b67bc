//! The rules engine in the application: rule and channel definitions, alarm lifecycle,
//! notifications and escalation around the pure evaluation of `drover_actors::rules`.
//!
//! [`RulesEngine::start`] wires it: the `RuleRouter` (pipeline observer, own arbiter thread) →
//! per-tenant `RuleActor`s → the `RuleWorkers` (the threads that run scripts, shared fairly
//! between tenants) → [`alarms::AlarmService`] → [`notifier::Notifier`], plus the
//! [`scheduler::EscalationScheduler`] task.

pub mod alarms;
pub mod crypto;
pub mod destination;
pub mod metrics;
pub mod model;
pub mod notifier;
pub mod scheduler;
pub mod shadow_patch;
pub mod source;
pub mod view;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use drover_actors::clock::SharedClock;
use drover_actors::rule_actor::{AlarmClosed, ReloadRules, RuleCounters, RuleSettings};
use drover_actors::rule_router::{RuleRouter, StopRules};
use drover_actors::rule_workers::{RuleWorkers, WorkerSettings};
use drover_actors::rules::DesiredStatePatcher;
use drover_actors::rules::findings::AnalyticsDemand;
use drover_actors::rules::script::{Sandbox, ScriptLimits};
use drover_actors::rules::seen_metrics::SeenMetrics;
use drover_actors::rules::stats::StatsBoard;
use drover_actors::{DeviceId, TenantId};

use crate::config::Config;
use crate::dashboard::DashboardHub;
use crate::metrics::Metrics;
use crate::storage::RegistryStore;

/// What the API needs of the rules engine.
pub struct RulesEngine {
    pub router: Addr<RuleRouter>,
    pub board: StatsBoard,
    pub sandbox: Arc<Sandbox>,
    pub secrets: crypto::SecretBox,
    /// Where webhooks may go (`NOTIFY_ALLOWED_NETWORKS`); literal addresses are checked on write.
    pub destinations: Arc<destination::DestinationPolicy>,
    pub clock: SharedClock,
    pub hub: DashboardHub,
    pub counters: Arc<RuleCounters>,
    /// Metric names each tenant's devices reported since the start (for rule warnings).
    pub seen: Arc<SeenMetrics>,
    /// What each tenant's `anomaly` and `forecast` rules need from the live analytics.
    pub demand: Arc<AnalyticsDemand>,
    /// What the configuration lets notifications reach.
    pub delivery: model::DeliveryConfig,
    workers: Arc<RuleWorkers>,
    /// Where the rule actors' alarm signals go (listed by `GET /admin/actors`).
    pub alarms: Addr<alarms::AlarmService>,
    /// Delivers notifications (the API's channel test sends through it too).
    pub notifier: Arc<notifier::Notifier>,
    /// In a cluster: which node judges each tenant's group and absence rules.
    pub spanning: Option<Arc<crate::cluster::spanning::SpanningLeases>>,
    arbiter: Mutex<Option<Arbiter>>,
    scheduler: Mutex<Option<actix_rt::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for RulesEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RulesEngine").finish_non_exhaustive()
    }
}

/// What starting the engine needs from the server.
pub struct RulesDeps {
    pub registry: RegistryStore,
    pub metrics: Arc<Metrics>,
    pub hub: DashboardHub,
    pub clock: SharedClock,
    pub patcher: Arc<dyn DesiredStatePatcher>,
    pub secret_key: String,
    /// The `mqttCommand` action sends through the device commands (attached once they run).
    pub commands: crate::fleet_ops::commands::SharedLateCommands,
    /// In a cluster: the leases of the tenants' group and absence rules (`None`: single node).
    pub spanning: Option<Arc<crate::cluster::spanning::SpanningLeases>>,
}

impl RulesEngine {
    /// Starts the alarm service, the escalation scheduler and the rule router. Must run inside
    /// an actix system.
    pub fn start(config: &Config, deps: RulesDeps) -> Result<RulesEngine, String> {
        let sandbox = Arc::new(Sandbox::new(ScriptLimits {
            max_wall: Duration::from_millis(config.rules.eval_timeout_ms),
            ..ScriptLimits::default()
        }));
        let board = StatsBoard::default();
        let counters = Arc::new(RuleCounters::default());
        let metrics = metrics::RulesMetrics::new(&deps.metrics, counters.clone(), board.clone());
        let secrets = crypto::SecretBox::from_passphrase(&deps.secret_key);
        let destinations = Arc::new(
            destination::DestinationPolicy::parse(&config.rules.notify_allowed_networks)
                .map_err(|e| format!("rules.notify_allowed_networks (NOTIFY_ALLOWED_NETWORKS): {e}"))?,
        );
        let notifier = Arc::new(notifier::Notifier::new(
            config,
            destinations.clone(),
            deps.registry.clone(),
            secrets.clone(),
            deps.patcher,
            deps.commands,
            metrics.clone(),
            deps.clock.clone(),
        )?);
        let alarms = alarms::AlarmService::new(
            deps.registry.clone(),
            notifier.clone(),
            deps.hub.clone(),
            deps.clock.clone(),
            metrics.clone(),
        )
        .start();
        let tick = Duration::from_millis(config.rules.tick_ms);
        let scheduler = scheduler::EscalationScheduler {
            registry: deps.registry.clone(),
            notifier: notifier.clone(),
            hub: deps.hub.clone(),
            clock: deps.clock.clone(),
            metrics,
            tick,
        };
        let scheduler = actix_rt::spawn(scheduler.run());
        let workers = RuleWorkers::start(WorkerSettings {
            threads: config.rules.workers,
            slice: Duration::from_millis(config.rules.tenant_slice_ms),
            queue_capacity: config.rules.mailbox,
            shared_capacity: config.rules.shared_queue,
            sandbox: sandbox.clone(),
            anomaly_threshold: config.rules.anomaly_threshold,
            board: board.clone(),
            sink: alarms.clone().recipient(),
            counters: counters.clone(),
            nice: config.rules.thread_nice,
        })
        .map_err(|e| format!("cannot start the rule evaluation threads: {e}"))?;
        let seen = Arc::new(SeenMetrics::default());
        let demand = Arc::new(AnalyticsDemand::default());
        let settings = RuleSettings {
            source: Arc::new(source::RegistryRuleSource {
                registry: deps.registry,
            }),
            workers: workers.clone(),
            seen: seen.clone(),
            demand: demand.clone(),
            clock: deps.clock.clone(),
            tick,
            counters: counters.clone(),
            mailbox: config.rules.mailbox,
            spanning: deps
                .spanning
                .clone()
                .map(|s| s as Arc<dyn drover_actors::rules::Spanning>),
        };
        let (router, arbiter) = RuleRouter::start_on_own_thread(settings);
        drover_actors::sched::lower_arbiter(&arbiter.handle(), config.rules.thread_nice, "rule router");
        if let Some(spanning) = &deps.spanning {
            spanning.attach(router.clone().recipient());
        }
        Ok(RulesEngine {
            router,
            board,
            sandbox,
            secrets,
            destinations,
            clock: deps.clock,
            hub: deps.hub,
            counters,
            seen,
            demand,
            delivery: model::DeliveryConfig {
                email: !config.smtp.host.is_empty(),
                sms_account: !config.sms.account_sid.is_empty(),
            },
            workers,
            alarms,
            notifier,
            spanning: deps.spanning,
            arbiter: Mutex::new(Some(arbiter)),
            scheduler: Mutex::new(Some(scheduler)),
        })
    }

    /// A tenant's rules changed: its rule actor reloads them.
    pub fn reload(&self, tenant: &TenantId) {
        self.router.do_send(ReloadRules {
            tenant: tenant.clone(),
        });
    }

    /// An operator cleared an alarm: its condition may raise a new one.
    pub fn alarm_closed(&self, tenant: &TenantId, rule_id: &str, device: &str) {
        if let Ok(device) = DeviceId::parse(device) {
            self.router.do_send(AlarmClosed {
                tenant: tenant.clone(),
                rule_id: rule_id.to_string(),
                device,
            });
        }
    }

    /// The evaluation threads and each tenant's queue.
    pub fn workers_snapshot(&self) -> drover_actors::rule_workers::WorkersSnapshot {
        self.workers.snapshot()
    }

    /// Stops the scheduler, the rule actors and their thread, then the evaluation threads.
    pub async fn shutdown(&self) {
        if let Some(spanning) = &self.spanning {
            spanning.release_all().await;
        }
        if let Some(task) = self.scheduler.lock().ok().and_then(|mut s| s.take()) {
            task.abort();
        }
        let _ = self.router.send(StopRules {}).await;
        if let Some(arbiter) = self.arbiter.lock().ok().and_then(|mut a| a.take()) {
            arbiter.stop();
            let _ = arbiter.join();
        }
        let workers = self.workers.clone();
        let _ = tokio::task::spawn_blocking(move || workers.stop()).await;
    }
}
