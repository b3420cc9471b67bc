//! Starts the live analytics (the router on its own arbiter thread, one actor per tenant), shows
//! their events on `/ws`, and reads their counters for `/metrics`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::prelude::*;
use drover_actors::analytics::actor::{
    AnalyticsCounters, AnalyticsDeps, AnalyticsLive, FlushAnalytics, ReloadAnalytics,
};
use drover_actors::analytics::monitor::AnalyticsEvent;
use drover_actors::analytics::router::{AnalyticsRouter, StopAnalytics};
use drover_actors::analytics::settings::AnalyticsConfig;
use drover_actors::clock::SharedClock;
use drover_actors::rules::findings::{AnalyticsDemand, AnalyticsFindings};
use drover_actors::telemetry_writer::WriterPool;
use drover_actors::{DeviceId, TenantId};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntGauge};

use super::store::RegistryAnalyticsStore;
use crate::config::Config;
use crate::dashboard::DashboardHub;
use crate::dashboard::hub::LiveMessage;
use crate::metrics::Metrics;
use crate::storage::RegistryStore;

/// How the analytics reach the node's rules engine (for `anomaly` and `forecast` rules).
pub struct RulesLink {
    pub findings: Recipient<AnalyticsFindings>,
    pub demand: Arc<AnalyticsDemand>,
    pub clock: SharedClock,
}

/// The running analytics.
pub struct AnalyticsEngine {
    pub router: Addr<AnalyticsRouter>,
    pub counters: Arc<AnalyticsCounters>,
    arbiter: Arbiter,
}

impl std::fmt::Debug for AnalyticsEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnalyticsEngine").finish_non_exhaustive()
    }
}

impl AnalyticsEngine {
    pub fn start(
        config: &Config,
        registry: RegistryStore,
        hub: DashboardHub,
        writers: WriterPool,
        metrics: &Metrics,
        rules: RulesLink,
    ) -> AnalyticsEngine {
        let counters = Arc::new(AnalyticsCounters::default());
        metrics.register(Box::new(AnalyticsCollector::new(counters.clone())));
        let deps = AnalyticsDeps {
            store: Arc::new(RegistryAnalyticsStore { registry }),
            live: Arc::new(hub),
            writers: Some(writers),
            counters: counters.clone(),
            // ANOMALY_THRESHOLD is the univariate detectors' default too.
            defaults: AnalyticsConfig {
                threshold: Some(config.rules.anomaly_threshold),
                ..AnalyticsConfig::default()
            },
            mailbox: config.rules.mailbox,
            rules: Some(rules.findings),
            demand: rules.demand,
            clock: rules.clock,
        };
        let (router, arbiter) = AnalyticsRouter::start_on_own_thread(deps);
        // Scoring sheds what it cannot keep up with: on a busy CPU it yields to ingestion.
        drover_actors::sched::lower_arbiter(&arbiter.handle(), config.rules.thread_nice, "analytics");
        AnalyticsEngine {
            router,
            counters,
            arbiter,
        }
    }

    /// Tells the tenant's actor its configuration changed.
    pub fn reload(&self, tenant: &TenantId) {
        self.router.do_send(ReloadAnalytics {
            tenant: tenant.clone(),
        });
    }

    /// Stores pending events and snapshots; resolves when they are written (or after `timeout`).
    pub async fn flush(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.router.send(FlushAnalytics {})).await;
    }

    /// Saves everything, then stops the actors and their thread.
    pub async fn shutdown(&self) {
        self.flush(Duration::from_secs(10)).await;
        let _ = self.router.send(StopAnalytics {}).await;
        self.arbiter.stop();
    }
}

impl AnalyticsLive for DashboardHub {
    fn publish(&self, tenant: &TenantId, device: &DeviceId, event: &AnalyticsEvent) {
        if self.sessions() == 0 {
            return;
        }
        DashboardHub::publish(
            self,
            tenant,
            &LiveMessage::Analytics {
                event: event.kind.as_str(),
                device_id: device.as_str(),
                ts: event.ts_ms,
                method: event.method.as_str(),
                score: event.score,
                statistic: event.statistic,
                metrics: &event.metrics,
                value: event.value,
            },
        );
    }
}

const FIGURES: &[(&str, &str)] = &[
    (
        "drover_analytics_events_dropped_total",
        "Telemetry events not analysed because the analytics were behind: the router's or the tenant actor's mailbox was full",
    ),
    ("drover_analytics_messages_total", "Telemetry events analysed"),
    ("drover_analytics_anomalies_total", "Anomaly events raised"),
    ("drover_analytics_drifts_total", "Drift events raised"),
    (
        "drover_analytics_results_dropped_total",
        "Anomaly and drift events not stored because too many waited for the registry",
    ),
    ("drover_analytics_trainings_total", "Isolation forests trained"),
    (
        "drover_analytics_training_failures_total",
        "Isolation forest trainings that failed",
    ),
    (
        "drover_analytics_trainings_deferred_total",
        "Due trainings postponed because the tenant had the most trainings running",
    ),
    (
        "drover_analytics_training_microseconds_total",
        "Time spent training isolation forests (blocking pool)",
    ),
    (
        "drover_analytics_scoring_microseconds_total",
        "Time analytics actors spent scoring telemetry",
    ),
    (
        "drover_analytics_store_errors_total",
        "Analytics reads and writes of the registry that failed",
    ),
    (
        "drover_analytics_devices",
        "Devices with a live analytics monitor",
    ),
    (
        "drover_analytics_findings_dropped_total",
        "Scores and forecasts for anomaly and forecast rules that the rules engine's mailbox refused",
    ),
    (
        "drover_analytics_forecasts_total",
        "Forecasts fitted for forecast rules (blocking pool)",
    ),
    (
        "drover_analytics_forecasts_deferred_total",
        "Due forecast fits postponed because the tenant had the most fits running",
    ),
];

/// Reads the actors' atomic counters at scrape time.
struct AnalyticsCollector {
    counters: Arc<AnalyticsCounters>,
    descs: Vec<Desc>,
}

impl AnalyticsCollector {
    fn new(counters: Arc<AnalyticsCounters>) -> Self {
        let descs = FIGURES
            .iter()
            .map(|(name, help)| {
                Desc::new(name.to_string(), help.to_string(), vec![], Default::default())
                    .expect("valid metric")
            })
            .collect();
        AnalyticsCollector { counters, descs }
    }
}

impl Collector for AnalyticsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let c = &self.counters;
        let values = [
            c.dropped.load(Ordering::Relaxed),
            c.messages.load(Ordering::Relaxed),
            c.anomalies.load(Ordering::Relaxed),
            c.drifts.load(Ordering::Relaxed),
            c.events_dropped.load(Ordering::Relaxed),
            c.trainings.load(Ordering::Relaxed),
            c.training_failures.load(Ordering::Relaxed),
            c.trainings_deferred.load(Ordering::Relaxed),
            c.training_micros.load(Ordering::Relaxed),
            c.scoring_micros.load(Ordering::Relaxed),
            c.store_errors.load(Ordering::Relaxed),
            c.devices.load(Ordering::Relaxed),
            c.findings_dropped.load(Ordering::Relaxed),
            c.forecasts.load(Ordering::Relaxed),
            c.forecasts_deferred.load(Ordering::Relaxed),
        ];
        FIGURES
            .iter()
            .zip(values)
            .map(|((name, help), value)| {
                if name.ends_with("_total") {
                    let counter = IntCounter::new(*name, *help).expect("valid metric");
                    counter.inc_by(value);
                    counter.collect().remove(0)
                } else {
                    let gauge = IntGauge::new(*name, *help).expect("valid metric");
                    gauge.set(value as i64);
                    gauge.collect().remove(0)
                }
            })
            .collect()
    }
}
