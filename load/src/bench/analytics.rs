//! Ingestion with live analytics on and off: runs the ingest scenario twice on the same fleet,
//! first with the tenant's analytics turned off (`PUT /api/analytics/config {"enabled": false}`),
//! then with the defaults (ensemble, isolation forest and drift on every numeric metric of every
//! device), and reports both throughputs, their ratio and the server's analytics figures.
//!
//! With `rules > 0` the second run also has that many rules in the tenant (the `rules`
//! scenario's mix, created between the two runs): the cost of the rest of the platform, rules
//! and analytics together, against plain ingestion. Run it on a tenant without rules, or the
//! first run is not plain ingestion.

use serde_json::json;

use super::ingest::{self, IngestOptions};
use super::report::Report;
use crate::api::{Api, DeviceCredentials};

/// The server's analytics counters, read before and after a run.
const FIGURES: [&str; 6] = [
    "drover_analytics_messages_total",
    "drover_analytics_events_dropped_total",
    "drover_analytics_trainings_total",
    "drover_analytics_training_microseconds_total",
    "drover_analytics_scoring_microseconds_total",
    "drover_analytics_anomalies_total",
];

async fn figures(api: &Api) -> Vec<f64> {
    let mut out = Vec::with_capacity(FIGURES.len());
    for name in FIGURES {
        out.push(api.metric(name).await.unwrap_or(0.0));
    }
    out
}

async fn set_enabled(api: &Api, enabled: bool) -> anyhow::Result<()> {
    let body = if enabled {
        json!({})
    } else {
        json!({"enabled": false})
    };
    let (status, answer) = api.put("/api/analytics/config", &body).await?;
    anyhow::ensure!(
        status.is_success(),
        "PUT /api/analytics/config: {status} {answer}"
    );
    Ok(())
}

pub async fn run(
    api: &Api,
    devices: Vec<DeviceCredentials>,
    rules: u32,
    options: impl Fn() -> IngestOptions,
) -> anyhow::Result<Report> {
    // The rules read a second metric (`m1`): both runs carry it.
    let options = || {
        let o = options();
        IngestOptions {
            metrics: if rules > 0 { o.metrics.max(2) } else { o.metrics },
            ..o
        }
    };
    set_enabled(api, false).await?;
    let without = ingest::run(api, devices.clone(), options()).await?;
    let created = super::rules::create_rules(api, rules).await?;
    set_enabled(api, true).await?;
    let before = figures(api).await;
    let evaluations_before = api.metric("drover_rule_evaluations_total").await.unwrap_or(0.0);
    let rules_dropped_before = api
        .metric("drover_rule_events_dropped_total")
        .await
        .unwrap_or(0.0);
    let mut with = ingest::run(api, devices, options()).await?;
    // Scoring trails ingestion by the actors' queue; give it a moment.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let after = figures(api).await;
    let delta: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    if rules > 0 {
        with.parameters["rules"] = serde_json::json!(rules);
        with.set("rules_created", created);
        with.set(
            "rule_evaluations",
            api.metric("drover_rule_evaluations_total").await.unwrap_or(0.0) - evaluations_before,
        );
        with.set(
            "rule_events_dropped",
            api.metric("drover_rule_events_dropped_total")
                .await
                .unwrap_or(0.0)
                - rules_dropped_before,
        );
    }
    let rate = |r: &Report| {
        r.results
            .get("acked_per_second")
            .or_else(|| r.results.get("sent_per_second"))
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0)
    };
    let (off, on) = (rate(&without), rate(&with));
    with.scenario = "analytics".into();
    with.set("msgs_per_second_without_analytics", off);
    with.set("msgs_per_second_with_analytics", on);
    with.set("throughput_ratio", if off > 0.0 { on / off } else { 0.0 });
    with.set("analysed_messages", delta[0]);
    with.set("analytics_events_dropped", delta[1]);
    with.set("forest_trainings", delta[2]);
    with.set(
        "training_ms_per_forest",
        if delta[2] > 0.0 {
            delta[3] / delta[2] / 1000.0
        } else {
            0.0
        },
    );
    with.set(
        "scoring_us_per_message",
        if delta[0] > 0.0 { delta[4] / delta[0] } else { 0.0 },
    );
    with.set("anomalies", delta[5]);
    Ok(with)
}
